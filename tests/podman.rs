//! A real CNI client: podman (Debian, CNI network backend) runs containers on a network whose
//! configuration list uses the `cnikit` plugin chained with the reference `portmap` and
//! `tuning` plugins.
//!
//! Podman runs inside a network namespace this test creates (via `nsenter --net`, so podman's
//! own netns bind mounts stay visible to later podman commands): the bridge, veths and
//! iptables rules land there, never in the root namespace. Images come from a local tarball
//! made of Debian's static busybox; there is no registry.
//!
//! Needs root, podman, runc, busybox-static and iptables; skips loudly without them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, bail, ensure};

const BUSYBOX: &str = "/bin/busybox";
const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

fn missing_prerequisite() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root".into());
    }
    for (what, path) in [
        ("podman", "/usr/bin/podman"),
        ("runc", "/usr/bin/runc"),
        ("nsenter", "/usr/bin/nsenter"),
        ("busybox-static", BUSYBOX),
        ("iptables-save", "/usr/sbin/iptables-save"),
        ("curl", "/usr/bin/curl"),
        ("reference portmap", "/usr/lib/cni/portmap"),
        ("reference tuning", "/usr/lib/cni/tuning"),
    ] {
        if !Path::new(path).exists() {
            return Some(format!("{what} is not installed ({path})"));
        }
    }
    None
}

/// The `cnikit` example binary built next to this test.
fn plugin_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test binary has no target dir")?;
    let bin = dir.join("examples").join("cnikit");
    ensure!(
        bin.is_file(),
        "{} missing: build the `cnikit` example",
        bin.display()
    );
    Ok(bin)
}

/// One podman installation with private storage, configuration and network namespace;
/// removes its containers, storage and namespace on drop.
struct Podman {
    dir: tempfile::TempDir,
    netns: String,
}

impl Podman {
    /// `tag` tells apart the namespaces of tests that run at once.
    fn new(tag: &str) -> Result<Podman> {
        let netns = format!("cnkt-podman-{tag}-{}", std::process::id());
        cni_core::linux::netns::create_named(&netns)?;
        let podman = Podman {
            dir: tempfile::Builder::new().prefix("cnikit-podman").tempdir()?,
            netns,
        };
        podman.setup()?;
        Ok(podman)
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn setup(&self) -> Result<()> {
        let plugins = self.path("plugins");
        std::fs::create_dir_all(&plugins)?;
        std::os::unix::fs::symlink(plugin_binary()?, plugins.join("cnikit"))?;
        std::fs::create_dir_all(self.path("net.d"))?;
        std::fs::write(
            self.path("containers.conf"),
            format!(
                r#"[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[network]
network_backend = "cni"
cni_plugin_dirs = ["{plugins}", "{REFERENCE_PLUGINS}"]
network_config_dir = "{netd}"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
tmp_dir = "{tmp}"
"#,
                plugins = plugins.display(),
                netd = self.path("net.d").display(),
                tmp = self.path("tmp").display(),
            ),
        )?;
        std::fs::write(
            self.path("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                self.path("run").display(),
                self.path("root").display()
            ),
        )?;
        // lo up in the "host" namespace, as on any host.
        run(Command::new("ip").args(["-n", &self.netns, "link", "set", "lo", "up"]))?;
        // An image with busybox and its applets.
        let rootfs = self.path("rootfs");
        std::fs::create_dir_all(rootfs.join("bin"))?;
        std::fs::copy(BUSYBOX, rootfs.join("bin/busybox"))?;
        for applet in ["sh", "sleep", "ping", "httpd", "mkdir", "ip"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
        }
        let tar = self.path("image.tar");
        run(Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg("."))?;
        self.podman(&[
            "import",
            &tar.to_string_lossy(),
            "localhost/cnikit-busybox:test",
        ])?;
        Ok(())
    }

    /// Runs podman in the test's network namespace; fails on a non-zero exit.
    fn podman(&self, args: &[&str]) -> Result<String> {
        let out = self.podman_output(args)?;
        if !out.status.success() {
            bail!(
                "podman {} failed: {}\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The environment that points podman at this installation.
    fn env(&self) -> [(&'static str, PathBuf); 2] {
        [
            ("CONTAINERS_CONF", self.path("containers.conf")),
            ("CONTAINERS_STORAGE_CONF", self.path("storage.conf")),
        ]
    }

    fn podman_output(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg("podman")
            .args(args)
            .envs(self.env())
            .output()?)
    }

    /// Runs a command in the test's network namespace (the podman "host").
    fn host(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .args(args))
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers first (their CNI DEL runs now), then storage (vfs layers), then the netns.
        let _ = self.podman_output(&["rm", "--all", "--force", "--time", "0"]);
        let _ = self.podman_output(&["system", "reset", "--force"]);
        let _ = cni_core::linux::netns::delete_named(&self.netns);
    }
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Keys of the file store that hold an allocation (used-address records and handles).
fn allocations(data_dir: &Path) -> Result<Vec<String>> {
    let path = data_dir.join("ipam").join("store.json");
    if !path.exists() {
        return Ok(Vec::new());
    }
    let store: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
    Ok(store["keys"]
        .as_object()
        .context("store file has no keys")?
        .keys()
        .filter(|k| k.contains("/used/") || k.contains("/handles/"))
        .cloned()
        .collect())
}

#[test]
fn podman_runs_containers_on_a_cnikit_network() -> Result<()> {
    if let Some(why) = missing_prerequisite() {
        testkit::skip("podman_runs_containers_on_a_cnikit_network", why);
        return Ok(());
    }
    let podman = Podman::new("net")?;
    let data_dir = podman.path("cnikit-data");
    let network = "cnikitpodman";
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": network,
        "plugins": [
            {
                "type": "cnikit",
                "podNetwork": "bridge",
                "bridge": "cnikitpod0",
                "dataDir": data_dir,
                "nodeName": "podman-node",
                "ipam": {"type": "cnikit-ipam", "pool": "10.97.0.0/16", "blockSize": 26}
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "tuning"}
        ]
    });
    std::fs::write(
        podman.path("net.d").join("10-cnikit.conflist"),
        serde_json::to_vec_pretty(&conflist)?,
    )?;
    let image = "localhost/cnikit-busybox:test";

    podman.podman(&[
        "run",
        "-d",
        "--name",
        "a",
        "--network",
        network,
        "--cap-add",
        "NET_RAW",
        image,
        "sleep",
        "600",
    ])?;
    podman.podman(&[
        "run",
        "-d",
        "--name",
        "b",
        "--network",
        network,
        "--cap-add",
        "NET_RAW",
        "-p",
        "18080:80",
        image,
        "sh",
        "-c",
        "mkdir -p /www && echo hello-from-b > /www/index.html && exec httpd -f -p 80 -h /www",
    ])?;
    let ip_of = |name: &str| {
        podman.podman(&[
            "inspect",
            name,
            "--format",
            &format!("{{{{.NetworkSettings.Networks.{network}.IPAddress}}}}"),
        ])
    };
    let (ip_a, ip_b) = (ip_of("a")?, ip_of("b")?);
    eprintln!("container a: {ip_a}, container b: {ip_b}");
    ensure!(
        ip_a != ip_b && ip_a.starts_with("10.97."),
        "addresses {ip_a} {ip_b}"
    );
    ensure!(
        allocations(&data_dir)?.len() == 4,
        "two used records and two handles expected"
    );

    // They ping each other.
    podman.podman(&["exec", "a", "ping", "-c", "1", "-W", "2", &ip_b])?;
    podman.podman(&["exec", "b", "ping", "-c", "1", "-W", "2", &ip_a])?;

    // The hostPort works: the node reaches b's httpd through portmap's DNAT, on the node
    // address the bridge holds (the gateway of the pool's first block).
    let gateway = "10.97.0.1";
    let mut body = String::new();
    for _ in 0..20 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &podman.netns,
                "curl",
                "-s",
                "--max-time",
                "2",
            ])
            .arg(format!("http://{gateway}:18080/"))
            .output()?;
        body = String::from_utf8_lossy(&out.stdout).into_owned();
        if body.contains("hello-from-b") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    ensure!(
        body.contains("hello-from-b"),
        "hostPort 18080 did not reach b: {body:?}"
    );
    let rules = podman.host(&["iptables-save", "-t", "nat"])?;
    ensure!(
        rules.contains("--dport 18080"),
        "no portmap DNAT rule:\n{rules}"
    );

    // `podman rm` runs DEL through the chain: no veth, no rule, no allocation left.
    podman.podman(&["rm", "--force", "--time", "0", "a", "b"])?;
    let links = podman.host(&["ip", "-o", "link", "show"])?;
    ensure!(!links.contains("cnk"), "veths left behind:\n{links}");
    let rules = podman.host(&["iptables-save", "-t", "nat"])?;
    ensure!(
        !rules.contains("18080") && !rules.contains("CNI-DN-"),
        "portmap rules left behind:\n{rules}"
    );
    let left = allocations(&data_dir)?;
    ensure!(left.is_empty(), "allocations left behind: {left:?}");
    Ok(())
}

/// The container image (`scripts/image.sh`) runs the installer the way the DaemonSet's init
/// container does: the host's plugin and configuration directories mounted under `/host`,
/// the node name from the environment. What lands there is a working plugin and the node's
/// conflist; the agent and bird2 in the image start (their libraries are all there).
#[test]
fn the_image_installs_the_plugin_on_a_host() -> Result<()> {
    if let Some(why) = missing_prerequisite() {
        testkit::skip("the_image_installs_the_plugin_on_a_host", why);
        return Ok(());
    }
    let bins = testkit::examples_dir();
    for b in ["cnikit", "cnikit-agent", "cnikit-install"] {
        testkit::assert_fresh(&bins.join(b));
    }
    let podman = Podman::new("img")?;
    let image = "localhost/cnikit:test";
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/image.sh");
    let out = podman.path("image");
    run(Command::new("bash")
        .arg(&script)
        .arg("--bin-dir")
        .arg(&bins)
        .arg("--out")
        .arg(&out)
        .args(["--tag", image, "--import"])
        .envs(podman.env()))?;

    let host = podman.path("host");
    std::fs::create_dir_all(host.join("etc/cni/net.d"))?;
    let template = podman.path("cni.conflist");
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "cnikit",
        "plugins": [{
            "type": "cnikit", "podNetwork": "routed", "routing": "host-gw",
            "ipam": {"type": "cnikit-ipam", "pool": "10.245.0.0/16"}
        }]
    });
    std::fs::write(&template, serde_json::to_vec(&conflist)?)?;
    let volume = |from: &Path, to: &str| format!("{}:{to}", from.display());
    podman.podman(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--env",
        "NODE_NAME=node-7",
        "--volume",
        &volume(&host, "/host"),
        "--volume",
        &volume(&template, "/etc/cnikit/cni.conflist:ro"),
        "--entrypoint",
        "/usr/local/bin/cnikit-install",
        image,
        "--bin-dir",
        "/host/opt/cni/bin",
        "--conf-dir",
        "/host/etc/cni/net.d",
        "--host-conf-dir",
        "/etc/cni/net.d",
    ])?;
    let installed: serde_json::Value = serde_json::from_slice(&std::fs::read(
        host.join("etc/cni/net.d/10-cnikit.conflist"),
    )?)?;
    ensure!(
        installed["plugins"][0]["nodeName"] == "node-7",
        "nodeName not set: {installed}"
    );
    // The installed plugin runs on the host and answers VERSION.
    let version = run(Command::new(host.join("opt/cni/bin/cnikit"))
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::null()))?;
    let version: serde_json::Value = serde_json::from_str(&version)?;
    ensure!(
        version["supportedVersions"]
            .as_array()
            .is_some_and(|v| v.iter().any(|v| v == "1.0.0")),
        "VERSION of the installed plugin: {version}"
    );
    // The agent (the image's entrypoint) and bird2 start in the image.
    let help = podman.podman(&["run", "--rm", "--network", "none", image, "--help"])?;
    ensure!(help.contains("--conflist"), "agent --help: {help}");
    let bird = podman.podman_output(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "/usr/sbin/bird",
        image,
        "--version",
    ])?;
    // bird prints its version on stderr.
    let bird = String::from_utf8_lossy(&bird.stderr);
    ensure!(bird.contains("BIRD version 2"), "bird in the image: {bird}");
    Ok(())
}

/// The capabilities the DaemonSet gives the agent container (`deploy/cnikit-etcd.yaml`):
/// the flow list after `add:` in the `agent` container's section.
fn daemonset_agent_capabilities() -> Result<Vec<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/cnikit-etcd.yaml");
    let text = std::fs::read_to_string(&path)?;
    let agent = text
        .find("- name: agent")
        .context("no agent container in the manifest")?;
    let line = text[agent..]
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("add:"))
        .context("the agent container adds no capability")?;
    Ok(serde_json::from_str(line.trim())?)
}

/// The agent of the image runs with the capabilities the DaemonSet gives it and no others
/// (all dropped, then those added; no new privileges): it registers the node, reconciles,
/// reports ready on `/readyz`, and stops cleanly on SIGTERM. Without them it fails at once.
#[test]
fn the_image_agent_runs_with_the_daemonsets_capabilities_only() -> Result<()> {
    let test = "the_image_agent_runs_with_the_daemonsets_capabilities_only";
    if let Some(why) = missing_prerequisite() {
        testkit::skip(test, why);
        return Ok(());
    }
    let bins = testkit::examples_dir();
    for b in ["cnikit", "cnikit-agent", "cnikit-install"] {
        testkit::assert_fresh(&bins.join(b));
    }
    let caps = daemonset_agent_capabilities()?;
    ensure!(caps.contains(&"NET_ADMIN".to_owned()), "{caps:?}");
    let podman = Podman::new("cap")?;
    let image = "localhost/cnikit:captest";
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/image.sh");
    run(Command::new("bash")
        .arg(&script)
        .arg("--bin-dir")
        .arg(&bins)
        .arg("--out")
        .arg(podman.path("image"))
        .args(["--tag", image, "--import"])
        .envs(podman.env()))?;

    // The node: an underlay interface with an address, in the test's namespace.
    podman.host(&[
        "ip", "link", "add", "u0", "type", "veth", "peer", "name", "u1",
    ])?;
    podman.host(&["ip", "addr", "add", "192.0.2.10/24", "dev", "u0"])?;
    podman.host(&["ip", "link", "set", "u0", "up"])?;
    podman.host(&["ip", "link", "set", "u1", "up"])?;
    let config = podman.path("config");
    let data = podman.path("var-lib-cni");
    std::fs::create_dir_all(&config)?;
    std::fs::create_dir_all(&data)?;
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "capnet",
        "plugins": [{
            "type": "cnikit", "podNetwork": "routed", "routing": "host-gw",
            "dataDir": "/var/lib/cni/cnikit",
            "agent": {"interface": "u0", "metricsAddress": "127.0.0.1:19153"},
            "ipam": {"type": "cnikit-ipam", "pool": "10.246.0.0/16", "blockSize": 26,
                     "store": {"type": "file", "path": "/var/lib/cni/cnikit/ipam"}}
        }]
    });
    std::fs::write(config.join("cni.conflist"), serde_json::to_vec(&conflist)?)?;
    let netns = format!("ns:/run/netns/{}", podman.netns);
    let start = |name: &str, caps: &[String]| -> Result<String> {
        let mut args: Vec<String> = [
            "run",
            "--detach",
            "--name",
            name,
            "--network",
            &netns,
            "--cap-drop",
            "all",
            "--security-opt",
            "no-new-privileges",
            "--env",
            "NODE_NAME=node-cap",
            "--volume",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("{}:/etc/cnikit/config:ro", config.display()));
        args.push("--volume".into());
        args.push(format!("{}:/var/lib/cni", data.display()));
        for cap in caps {
            args.push("--cap-add".into());
            args.push(cap.clone());
        }
        args.push(image.into());
        args.push("--conflist=/etc/cnikit/config/cni.conflist".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        podman.podman(&args)
    };
    let ready = || {
        podman
            .host(&[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://127.0.0.1:19153/readyz",
            ])
            .unwrap_or_default()
            == "200"
    };

    // A container's /proc/sys is read-only: on a node that does not forward, the agent
    // cannot turn forwarding on, and says what to set on the node.
    start("agent-noforward", &caps)?;
    let code = podman.podman(&["wait", "agent-noforward"])?;
    ensure!(code != "0", "the agent ran on a node that does not forward");
    let logs = podman.podman_output(&["logs", "agent-noforward"])?;
    let logs = String::from_utf8_lossy(&logs.stderr).into_owned();
    ensure!(
        logs.contains("set net.ipv4.ip_forward=1 on the node"),
        "no hint about the read-only /proc/sys: {logs}"
    );
    podman.podman(&["rm", "agent-noforward"])?;
    // A Kubernetes node forwards already (kubeadm checks it).
    podman.host(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;

    // No capability at all: the agent cannot program the node and exits with an error.
    start("agent-nocaps", &[])?;
    let code = podman.podman(&["wait", "agent-nocaps"])?;
    ensure!(code != "0", "the agent ran without any capability");
    let logs = podman.podman_output(&["logs", "agent-nocaps"])?;
    let logs = String::from_utf8_lossy(&logs.stderr).into_owned();
    ensure!(
        logs.contains("Operation not permitted"),
        "the agent without capabilities failed for another reason: {logs}"
    );
    podman.podman(&["rm", "agent-nocaps"])?;

    // The DaemonSet's capabilities: ready within 30 s.
    start("agent", &caps)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !ready() {
        if std::time::Instant::now() > deadline {
            let logs = podman.podman_output(&["logs", "agent"])?;
            bail!(
                "the agent with {caps:?} never became ready:\n{}",
                String::from_utf8_lossy(&logs.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let metrics = podman.host(&["curl", "-s", "http://127.0.0.1:19153/metrics"])?;
    ensure!(
        metrics.contains("cnikit_agent_reconciles_total"),
        "metrics: {metrics}"
    );
    ensure!(
        !cnikit_state_files(&data).is_empty(),
        "no node state file under {}",
        data.display()
    );
    // SIGTERM (podman stop): a clean exit, the node state file removed.
    podman.podman(&["stop", "--time", "20", "agent"])?;
    let code = podman.podman(&["inspect", "--format", "{{.State.ExitCode}}", "agent"])?;
    ensure!(code == "0", "the agent exited with {code} on SIGTERM");
    ensure!(
        cnikit_state_files(&data).is_empty(),
        "the node state file is left: {:?}",
        cnikit_state_files(&data)
    );
    Ok(())
}

/// Node state files under `dir`.
fn cnikit_state_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .file_name()
                .is_some_and(|n| n == cnikit::core::state::NodeState::FILE)
            {
                found.push(p);
            }
        }
    }
    found
}
