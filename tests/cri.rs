//! A real CRI runtime: Debian's containerd (1.6) runs pod sandboxes on a cnikit network,
//! driven through the CRI gRPC API (`runtime.v1.RuntimeService`) the way kubelet drives it.
//!
//! The test plays the node: it makes a node namespace (with an uplink to an "outside"
//! namespace), installs the plugin and the conflist there with `cnikit::install` (as the
//! DaemonSet's init container does), and starts its own containerd inside that namespace,
//! with its own root, state and socket under the test's directory and its CRI plugin pointed
//! at those plugin and configuration directories. The sandbox ("pause") image is built here
//! from Debian's static busybox as an OCI layout and imported with `ctr images import`: there
//! is no registry. containerd never runs in the root namespace.
//!
//! Needs root, containerd, runc, busybox-static, iptables and the reference plugins
//! (`portmap`, `loopback`); skips loudly without them.
#![cfg(feature = "routed")]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::*;
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    Capability, ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ImageSpec, Int64Value, KeyValue, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    ListPodSandboxRequest, Mount, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, PodSandboxStatusRequest, PortMapping, Protocol, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest, VersionRequest,
};
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint, Uri};

const BUSYBOX: &str = "/bin/busybox";
/// The sandbox image's name, as the CRI plugin's `sandbox_image` names it.
const PAUSE_IMAGE: &str = "localhost/cnikit-pause:test";
/// The network's pool.
const POOL: &str = "10.247.0.0/16";
/// The host port of the first pod, and the port its server listens on inside the pod.
const HOST_PORT: u16 = 18080;
const POD_PORT: u16 = 8080;

/// The binaries this test needs, with the package that has each.
const PREREQUISITES: [(&str, &str); 8] = [
    ("/usr/bin/containerd", "containerd"),
    ("/usr/bin/ctr", "containerd"),
    ("/usr/bin/containerd-shim-runc-v2", "containerd"),
    ("/usr/sbin/runc", "runc"),
    (BUSYBOX, "busybox-static"),
    ("/usr/sbin/iptables", "iptables"),
    ("/usr/lib/cni/portmap", "containernetworking-plugins"),
    ("/usr/lib/cni/loopback", "containernetworking-plugins"),
];

/// A containerd of this test: started in the node namespace, stopped (its sandboxes removed,
/// its shims ended by PID, its mounts undone) on drop, also when the test fails.
struct Containerd {
    dir: PathBuf,
    node: Ns,
    child: Option<Child>,
    runtime: tokio::runtime::Runtime,
    client: Option<RuntimeServiceClient<Channel>>,
}

impl Containerd {
    /// Writes the configuration and starts containerd; returns once the CRI answers.
    fn start(dir: &Path, node: &Ns, bin_dir: &Path, conf_dir: &Path) -> Result<Containerd> {
        std::fs::create_dir_all(dir)?;
        let config = format!(
            r#"version = 2
root = "{dir}/root"
state = "{dir}/state"
plugin_dir = ""
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{dir}/containerd.sock"

[ttrpc]
  address = "{dir}/containerd.sock.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  disable_apparmor = true
  # Sandboxes get a negative oom_score_adj, which needs CAP_SYS_RESOURCE; a machine that is
  # itself a container may lack it: keep the test's own score instead.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{dir}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
"#,
            dir = dir.display(),
            bin = bin_dir.display(),
            conf = conf_dir.display(),
        );
        std::fs::write(dir.join("config.toml"), config)?;
        let mut containerd = Containerd {
            dir: dir.to_owned(),
            node: node.clone(),
            child: None,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            client: None,
        };
        containerd.spawn()?;
        Ok(containerd)
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// Starts the containerd process (in the node namespace) and connects to its CRI.
    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("containerd.log"))?;
        // nsenter execs containerd: the child's PID is containerd's.
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.node.path.display()))
            .arg("containerd")
            .arg("--config")
            .arg(self.dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start containerd")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("containerd exited ({status}):\n{}", self.log_tail());
            }
            if self.socket().exists() {
                let socket = self.socket();
                let connected = self.runtime.block_on(async move {
                    let channel = Endpoint::try_from("http://[::]:50051")?
                        .connect_with_connector(tower::service_fn(move |_: Uri| {
                            let socket = socket.clone();
                            async move {
                                Ok::<_, std::io::Error>(TokioIo::new(
                                    tokio::net::UnixStream::connect(socket).await?,
                                ))
                            }
                        }))
                        .await?;
                    let mut client = RuntimeServiceClient::new(channel);
                    let version = client
                        .version(VersionRequest {
                            version: "v1".into(),
                        })
                        .await?
                        .into_inner();
                    anyhow::Ok((client, version))
                });
                if let Ok((client, version)) = connected {
                    println!(
                        "{} {} (CRI {})",
                        version.runtime_name, version.runtime_version, version.runtime_api_version
                    );
                    self.client = Some(client);
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("containerd's CRI did not answer:\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Ends containerd (SIGTERM, then SIGKILL after 10 s); its shims and pods keep running.
    fn stop(&mut self, signal: nix::sys::signal::Signal) {
        self.client = None;
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, signal);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn client(&self) -> RuntimeServiceClient<Channel> {
        self.client.clone().expect("containerd is running")
    }

    /// `ctr images import` of an image archive into the CRI's namespace.
    fn import(&self, archive: &Path) -> Result<()> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args([
                "-n",
                "k8s.io",
                "images",
                "import",
                "--snapshotter",
                "native",
            ])
            .arg(archive)
            .output()?;
        ensure!(
            out.status.success(),
            "ctr images import: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// RunPodSandbox of a pod on the pod network; returns the sandbox id.
    fn run_pod(&self, name: &str, ports: Vec<PortMapping>) -> Result<String> {
        self.run_sandbox(self.pod_config(name, ports, NamespaceMode::Pod))
    }

    /// A sandbox configuration as kubelet sends it, reduced to what a pod network needs;
    /// `network`: `Pod` (its own namespace, set up by the CNI plugins) or `Node` (the host's).
    fn pod_config(
        &self,
        name: &str,
        ports: Vec<PortMapping>,
        network: NamespaceMode,
    ) -> PodSandboxConfig {
        let log_dir = self.dir.join("logs").join(name);
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "default".into(),
                attempt: 0,
            }),
            // kubelet names only pods with a namespace of their own; a host-network pod
            // shares the node's UTS namespace and hostname.
            hostname: if network == NamespaceMode::Node {
                String::new()
            } else {
                name.into()
            },
            log_directory: log_dir.display().to_string(),
            dns_config: None,
            port_mappings: ports,
            labels: [("app".to_owned(), name.to_owned())].into_iter().collect(),
            annotations: Default::default(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: String::new(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: network as i32,
                        pid: NamespaceMode::Pod as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            windows: None,
        }
    }

    /// RunPodSandbox; returns the sandbox id.
    fn run_sandbox(&self, config: PodSandboxConfig) -> Result<String> {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let mut client = self.client();
        let response = self
            .runtime
            .block_on(client.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            }))
            .with_context(|| format!("RunPodSandbox {name}:\n{}", self.log_tail()))?;
        Ok(response.into_inner().pod_sandbox_id)
    }

    /// CreateContainer + StartContainer in a sandbox, then waits (up to a minute) for the
    /// container to exit; returns its exit code and its log.
    fn run_to_completion(
        &self,
        sandbox: &str,
        sandbox_config: &PodSandboxConfig,
        config: ContainerConfig,
    ) -> Result<(i32, String)> {
        let mut client = self.client();
        let log = Path::new(&sandbox_config.log_directory).join(&config.log_path);
        let id = self
            .runtime
            .block_on(client.create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox.into(),
                config: Some(config),
                sandbox_config: Some(sandbox_config.clone()),
            }))
            .with_context(|| format!("CreateContainer:\n{}", self.log_tail()))?
            .into_inner()
            .container_id;
        self.runtime
            .block_on(client.start_container(StartContainerRequest {
                container_id: id.clone(),
            }))
            .with_context(|| format!("StartContainer:\n{}", self.log_tail()))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self
                .runtime
                .block_on(client.container_status(ContainerStatusRequest {
                    container_id: id.clone(),
                    verbose: false,
                }))?
                .into_inner()
                .status
                .context("ContainerStatus without a status")?;
            if status.state == ContainerState::ContainerExited as i32 {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                return Ok((status.exit_code, log));
            }
            ensure!(
                Instant::now() < deadline,
                "container {id} still running: {status:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The pod's address (from PodSandboxStatus) and its network namespace (from the verbose
    /// info: the sandbox's runtime spec).
    fn pod(&self, id: &str) -> Result<Pod> {
        let mut client = self.client();
        let status = self
            .runtime
            .block_on(client.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            }))?
            .into_inner();
        let ip = status
            .status
            .as_ref()
            .and_then(|s| s.network.as_ref())
            .map(|n| n.ip.clone())
            .context("PodSandboxStatus has no network")?;
        let info: Value = serde_json::from_str(
            status
                .info
                .get("info")
                .context("PodSandboxStatus has no verbose info")?,
        )?;
        let netns = info
            .pointer("/runtimeSpec/linux/namespaces")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|ns| ns["type"] == "network")
            .and_then(|ns| ns["path"].as_str())
            .map(PathBuf::from)
            .with_context(|| format!("no network namespace path in {info}"))?;
        Ok(Pod {
            id: id.into(),
            ip: ip.parse().with_context(|| format!("pod address {ip:?}"))?,
            netns,
        })
    }

    /// StopPodSandbox then RemovePodSandbox, as kubelet does when a pod is deleted.
    fn remove_pod(&self, id: &str) -> Result<()> {
        let mut client = self.client();
        self.runtime
            .block_on(client.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            }))
            .with_context(|| format!("StopPodSandbox {id}:\n{}", self.log_tail()))?;
        self.runtime
            .block_on(client.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            }))
            .with_context(|| format!("RemovePodSandbox {id}:\n{}", self.log_tail()))?;
        Ok(())
    }

    /// The ids of the sandboxes containerd knows.
    fn pods(&self) -> Result<Vec<String>> {
        let mut client = self.client();
        let list = self
            .runtime
            .block_on(client.list_pod_sandbox(ListPodSandboxRequest { filter: None }))?
            .into_inner();
        Ok(list.items.into_iter().map(|p| p.id).collect())
    }

    /// Shims of this containerd (their command line names its socket), by PID.
    fn shims(&self) -> Vec<nix::unistd::Pid> {
        let socket = self.socket().display().to_string();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if args.first().is_some_and(|a| a.contains("containerd-shim"))
                && args.iter().any(|a| a == &socket)
            {
                found.push(nix::unistd::Pid::from_raw(pid));
            }
        }
        found
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Whatever sandboxes are left: through the CRI, so that the plugin's DEL runs.
        if self.client.is_some()
            && let Ok(ids) = self.pods()
        {
            for id in ids {
                if let Err(e) = self.remove_pod(&id) {
                    eprintln!("cleanup: {e:#}");
                }
            }
        }
        self.stop(nix::sys::signal::Signal::SIGTERM);
        for pid in self.shims() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        // Mounts left under the test's directory (sandbox rootfs, shm) by a shim that was
        // killed: detach them so that the directory can go.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| Path::new(m).starts_with(&self.dir))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// A running sandbox.
#[derive(Debug)]
struct Pod {
    id: String,
    ip: IpAddr,
    netns: PathBuf,
}

fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    ensure!(out.status.success(), "sha256sum {}", path.display());
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .context("sha256sum printed nothing")?
        .to_owned())
}

/// Puts `path` into the OCI layout's blobs; returns its descriptor.
fn blob(layout: &Path, path: &Path, media_type: &str) -> Result<Value> {
    let digest = sha256(path)?;
    let size = std::fs::metadata(path)?.len();
    std::fs::rename(path, layout.join("blobs/sha256").join(&digest))?;
    Ok(json!({"mediaType": media_type, "digest": format!("sha256:{digest}"), "size": size}))
}

/// The sandbox image: busybox as PID 1 waiting for SIGTERM (as `pause` does), one
/// uncompressed layer, in an OCI image layout tarball named [`PAUSE_IMAGE`].
fn pause_image(dir: &Path) -> Result<PathBuf> {
    let rootfs = dir.join("pause-rootfs");
    std::fs::create_dir_all(rootfs.join("bin"))?;
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox"))?;
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh"))?;
    let layout = dir.join("pause-oci");
    std::fs::create_dir_all(layout.join("blobs/sha256"))?;
    let layer = dir.join("layer.tar");
    let out = Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg(".")
        .output()?;
    ensure!(out.status.success(), "tar the pause layer");
    let layer_digest = format!("sha256:{}", sha256(&layer)?);
    let layer = blob(&layout, &layer, "application/vnd.oci.image.layer.v1.tar")?;
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = json!({
        "architecture": architecture,
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin"],
            // PID 1 has no default signal actions: the trap is what ends it on SIGTERM.
            "Entrypoint": ["/bin/sh", "-c",
                "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"],
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, serde_json::to_vec(&config)?)?;
    let config = blob(
        &layout,
        &config_path,
        "application/vnd.oci.image.config.v1+json",
    )?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": [layer],
    });
    let manifest_path = dir.join("manifest.json");
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest)?)?;
    let mut manifest = blob(
        &layout,
        &manifest_path,
        "application/vnd.oci.image.manifest.v1+json",
    )?;
    manifest["annotations"] = json!({
        "io.containerd.image.name": PAUSE_IMAGE,
        "org.opencontainers.image.ref.name": "test",
    });
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [manifest]}))?,
    )?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion": "1.0.0"}"#,
    )?;
    let archive = dir.join("pause.tar");
    let out = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .arg(".")
        .output()?;
    ensure!(out.status.success(), "tar the pause image");
    Ok(archive)
}

/// The network: cnikit's routed pods from [`POOL`], the reference `portmap` chained for
/// hostPorts.
fn template(dir: &Path, data_dir: &Path) -> Result<PathBuf> {
    let list = json!({
        "cniVersion": "1.0.0",
        "name": "cri",
        "plugins": [
            {
                "type": "cnikit",
                "podNetwork": "routed",
                "dataDir": data_dir,
                "logFile": dir.join("cnikit.log"),
                "logLevel": "info",
                "ipam": {"type": "cnikit-ipam", "pool": POOL, "blockSize": 26}
            },
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
        ]
    });
    let path = dir.join("template.conflist");
    std::fs::write(&path, serde_json::to_vec_pretty(&list)?)?;
    Ok(path)
}

/// What must be gone once a pod is removed: its veth and its address.
fn assert_gone(node: &Ns, data_dir: &Path, pod: &Pod) -> Result<()> {
    let veths = host_veths(&node.name);
    let store = StoreView::read(data_dir);
    ensure!(
        !store.used_ips().contains(&pod.ip),
        "pod {} removed, {} still allocated: {store:?}",
        pod.id,
        pod.ip
    );
    let routes = ip(&node.name, &["-4", "route", "show", &pod.ip.to_string()]);
    ensure!(
        routes.trim().is_empty(),
        "a route to the removed pod is left: {routes} (veths: {veths:?})"
    );
    Ok(())
}

/// Skips `test` unless root and every binary it needs (besides [`PREREQUISITES`], `extra`)
/// are there.
fn prerequisites(test: &str, extra: &[(&str, &str)]) -> bool {
    if !testkit::root(test) {
        return false;
    }
    match PREREQUISITES
        .iter()
        .chain(extra)
        .find(|(p, _)| !Path::new(p).exists())
    {
        Some((missing, package)) => {
            testkit::skip(
                test,
                format!("{missing} is missing (apt-get install {package})"),
            );
            false
        }
        None => true,
    }
}

/// The node's CNI directories, inside the test's directory: the plugin directory (with the
/// reference plugins the network and the CRI need already there), the configuration
/// directory (empty) and the plugin's data directory.
struct HostDirs {
    bin: PathBuf,
    conf: PathBuf,
    data: PathBuf,
}

impl HostDirs {
    fn new(lab: &Lab) -> Result<HostDirs> {
        let root = lab.dir("host");
        let dirs = HostDirs {
            bin: root.join("opt/cni/bin"),
            conf: root.join("etc/cni/net.d"),
            data: root.join("var/lib/cni/cnikit"),
        };
        std::fs::create_dir_all(&dirs.bin)?;
        std::fs::create_dir_all(&dirs.conf)?;
        // containerd 1.6 takes one plugin directory: the reference plugins the list and the
        // CRI need (containerd sets up the pod's loopback with `loopback`) go next to cnikit.
        for plugin in ["portmap", "loopback"] {
            std::os::unix::fs::symlink(
                Path::new(REFERENCE_DIR).join(plugin),
                dirs.bin.join(plugin),
            )?;
        }
        Ok(dirs)
    }
}

#[test]
fn containerd_runs_pods_on_a_cnikit_network() -> Result<()> {
    let test = "containerd_runs_pods_on_a_cnikit_network";
    if !prerequisites(test, &[]) {
        return Ok(());
    }
    let Some(env) = Env::get(test) else {
        return Ok(());
    };

    let lab = Lab::new("cri");
    let node = lab.node();
    let outside = lab.uplink();
    let host = HostDirs::new(&lab)?;
    let (bin_dir, conf_dir, data_dir) = (&host.bin, &host.conf, &host.data);
    let installed = cnikit::install::install(&cnikit::install::Install {
        plugin: env.plugin.clone(),
        plugin_name: "cnikit".into(),
        bin_dir: bin_dir.clone(),
        conf_dir: conf_dir.clone(),
        host_conf_dir: None,
        template: template(&lab.dir("conf"), data_dir)?,
        file_name: "10-cnikit.conflist".into(),
        node_name: Some("cri-node".into()),
        service_account: None,
        copy_etcd_credentials: false,
    })?;
    ensure!(installed.shadowed_by.is_empty(), "{installed:?}");

    let mut containerd = Containerd::start(&lab.dir("containerd"), &node, bin_dir, conf_dir)?;
    containerd.import(&pause_image(&lab.dir("image"))?)?;

    // Two pods; the first publishes a hostPort (containerd hands `portmap` the mapping with
    // capitalised keys: `HostPort`, `ContainerPort`, `Protocol`, `HostIP`).
    let web = containerd.run_pod(
        "web",
        vec![PortMapping {
            protocol: Protocol::Tcp as i32,
            container_port: POD_PORT.into(),
            host_port: HOST_PORT.into(),
            host_ip: String::new(),
        }],
    )?;
    let client = containerd.run_pod("client", Vec::new())?;
    let (web, client) = (containerd.pod(&web)?, containerd.pod(&client)?);
    println!("pods: {web:?} {client:?}");
    let pool: ipnet::IpNet = POOL.parse()?;
    for pod in [&web, &client] {
        ensure!(pool.contains(&pod.ip), "{} is not from {POOL}", pod.ip);
    }
    ensure!(web.ip != client.ip);
    let store = StoreView::read(data_dir);
    ensure!(
        store.used_ips() == [web.ip, client.ip].into_iter().collect(),
        "the store's allocations are not the pods' addresses: {store:?}"
    );
    ensure!(
        host_veths(&node.name).len() == 2,
        "one host veth per pod: {:?}",
        host_veths(&node.name)
    );

    // The pods reach each other.
    for (from, to) in [(&client, &web), (&web, &client)] {
        let ok = Command::new("nsenter")
            .arg(format!("--net={}", from.netns.display()))
            .args(["ping", "-c", "1", "-W", "2", "-q"])
            .arg(to.ip.to_string())
            .stdout(Stdio::null())
            .status()?
            .success();
        ensure!(ok, "{} cannot ping {}", from.ip, to.ip);
    }

    // The hostPort: from outside the node to the node's address, and from the other pod.
    let node_ip: IpAddr = NODE_IP.parse()?;
    for (what, from) in [("outside", &outside.path), ("the other pod", &client.netns)] {
        let server = serve_once(&web.netns, POD_PORT, "web", Duration::from_secs(10));
        let got = fetch(from, SocketAddr::new(node_ip, HOST_PORT));
        let served = server.join().expect("server thread");
        ensure!(
            served && got.as_deref().ok() == Some("web"),
            "hostPort {HOST_PORT} from {what}: {got:?} (nat: {})",
            nat_rules(&node.name)
        );
    }

    // Removal: no veth, no allocation, no route, no port mapping.
    containerd.remove_pod(&web.id)?;
    assert_gone(&node, data_dir, &web)?;
    ensure!(
        host_veths(&node.name).len() == 1,
        "{:?}",
        host_veths(&node.name)
    );
    ensure!(
        !nat_rules(&node.name).contains(&HOST_PORT.to_string()),
        "the hostPort's rules are left: {}",
        nat_rules(&node.name)
    );

    // containerd restarts (killed, as by a crash) while a pod runs; the restarted one still
    // knows the pod, and removing it runs the plugin's DEL.
    containerd.stop(nix::sys::signal::Signal::SIGKILL);
    containerd.spawn()?;
    ensure!(
        containerd.pods()?.contains(&client.id),
        "the restarted containerd lost the pod"
    );
    containerd.remove_pod(&client.id)?;
    assert_gone(&node, data_dir, &client)?;
    ensure!(
        host_veths(&node.name).is_empty(),
        "veths left: {:?}",
        host_veths(&node.name)
    );
    let store = StoreView::read(data_dir);
    ensure!(store.holds_nothing(), "allocations left: {store:?}");
    for pod in [&web, &client] {
        ensure!(
            !pod.netns.exists(),
            "the pod's namespace {} is left",
            pod.netns.display()
        );
    }
    Ok(())
}

/// The cnikit image, loaded into containerd the README's way (`scripts/image.sh --import`,
/// `podman save | ctr -n k8s.io images import`), runs its installer as the DaemonSet's init
/// container: in a host-network sandbox, every capability dropped, the node's plugin and
/// configuration directories mounted under `/host`, the node name from the environment.
/// containerd picks up the conflist it writes and runs the next pod with the installed plugin.
#[test]
fn the_image_installs_the_plugin_containerd_then_uses() -> Result<()> {
    let test = "the_image_installs_the_plugin_containerd_then_uses";
    if !prerequisites(
        test,
        &[
            ("/usr/bin/podman", "podman"),
            ("/usr/bin/strip", "binutils"),
        ],
    ) {
        return Ok(());
    }
    let Some(_env) = Env::get(test) else {
        return Ok(());
    };
    let bins = testkit::examples_dir();
    for b in ["cnikit", "cnikit-agent", "cnikit-install"] {
        testkit::assert_fresh(&bins.join(b));
    }
    let lab = Lab::new("crim");
    let node = lab.node();
    let host = HostDirs::new(&lab)?;
    let containerd = Containerd::start(&lab.dir("containerd"), &node, &host.bin, &host.conf)?;
    containerd.import(&pause_image(&lab.dir("image"))?)?;

    // The image, in a podman storage of the test's own, saved into containerd's namespace.
    let image = "localhost/cnikit:cri";
    let podman = lab.dir("podman");
    let storage = podman.join("storage.conf");
    std::fs::write(
        &storage,
        format!(
            "[storage]\ndriver = \"vfs\"\nrunroot = \"{0}/run\"\ngraphroot = \"{0}/root\"\n",
            podman.display()
        ),
    )?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/image.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--bin-dir")
        .arg(&bins)
        .arg("--out")
        .arg(podman.join("image"))
        .args(["--tag", image, "--import"])
        .env("CONTAINERS_STORAGE_CONF", &storage)
        .output()?;
    ensure!(
        out.status.success(),
        "scripts/image.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("bash")
        .args(["-o", "pipefail", "-c"])
        .arg(format!(
            "podman save {image} | ctr --address {} -n k8s.io images import --snapshotter native -",
            containerd.socket().display()
        ))
        .env("CONTAINERS_STORAGE_CONF", &storage)
        .output()?;
    ensure!(
        out.status.success(),
        "podman save | ctr images import: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The DaemonSet's pod: host network; its init container runs the installer.
    let template = template(&lab.dir("conf"), &host.data)?;
    let daemon = containerd.pod_config("cnikit-node", Vec::new(), NamespaceMode::Node);
    let sandbox = containerd.run_sandbox(daemon.clone())?;
    let mount = |host: &Path, container: &str, readonly: bool| Mount {
        container_path: container.into(),
        host_path: host.display().to_string(),
        readonly,
        ..Default::default()
    };
    let install = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "install-cni".into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: vec!["/usr/local/bin/cnikit-install".into()],
        args: vec![
            "--template=/etc/cnikit/config/cni.conflist".into(),
            "--bin-dir=/host/opt/cni/bin".into(),
            "--conf-dir=/host/etc/cni/net.d".into(),
            format!("--host-conf-dir={}", host.conf.display()),
        ],
        envs: vec![KeyValue {
            key: "NODE_NAME".into(),
            value: "cri-node".into(),
        }],
        mounts: vec![
            mount(&host.bin, "/host/opt/cni/bin", false),
            mount(&host.conf, "/host/etc/cni/net.d", false),
            mount(&template, "/etc/cnikit/config/cni.conflist", true),
        ],
        log_path: "install-cni.log".into(),
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                capabilities: Some(Capability {
                    drop_capabilities: vec!["ALL".into()],
                    ..Default::default()
                }),
                run_as_user: Some(Int64Value { value: 0 }),
                no_new_privs: true,
                namespace_options: daemon
                    .linux
                    .as_ref()
                    .and_then(|l| l.security_context.as_ref())
                    .and_then(|s| s.namespace_options.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let (code, log) = containerd.run_to_completion(&sandbox, &daemon, install)?;
    println!("install-cni (exit {code}):\n{log}");
    ensure!(code == 0, "the installer failed ({code}): {log}");
    // The installed binary is the image's plugin (stripped of debug info): it answers VERSION.
    let version = Command::new(host.bin.join("cnikit"))
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()?;
    let version: Value = serde_json::from_slice(&version.stdout)
        .with_context(|| format!("VERSION of the installed plugin: {version:?}"))?;
    ensure!(version["supportedVersions"].is_array(), "{version}");
    let installed: Value =
        serde_json::from_slice(&std::fs::read(host.conf.join("10-cnikit.conflist"))?)?;
    ensure!(
        installed["plugins"][0]["nodeName"] == "cri-node",
        "{installed}"
    );

    // containerd reloads its network configuration when the directory changes; a pod sandbox
    // runs on the installed plugin once it has.
    let deadline = Instant::now() + Duration::from_secs(30);
    let pod = loop {
        match containerd.run_pod("after-install", Vec::new()) {
            Ok(id) => break id,
            Err(e) if Instant::now() < deadline => {
                println!("not yet: {e:#}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    };
    let pod = containerd.pod(&pod)?;
    let pool: ipnet::IpNet = POOL.parse()?;
    ensure!(pool.contains(&pod.ip), "{} is not from {POOL}", pod.ip);
    ensure!(
        StoreView::read(&host.data).used_ips() == [pod.ip].into_iter().collect(),
        "the installed plugin's store does not hold the pod's address"
    );
    containerd.remove_pod(&pod.id)?;
    assert_gone(&node, &host.data, &pod)?;
    containerd.remove_pod(&sandbox)?;
    ensure!(host_veths(&node.name).is_empty());
    Ok(())
}
