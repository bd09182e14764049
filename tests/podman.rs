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
    fn new() -> Result<Podman> {
        let netns = format!("cnkt-podman-{}", std::process::id());
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

    fn podman_output(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg("podman")
            .args(args)
            .env("CONTAINERS_CONF", self.path("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.path("storage.conf"))
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
    let podman = Podman::new()?;
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
