//! A private Kubernetes API server for a test: etcd and kube-apiserver inside a network
//! namespace of the test's own (feature `kube`).
//!
//! [`KubeApi::start`] makes the namespace `cnkt-<tag>-<pid>-api` (only `lo`, up), a temp dir
//! with a self-signed CA and serving certificate ([`crate::apiserver`]), a static token
//! file, a service-account key and a kubeconfig, then starts `etcd` and `kube-apiserver`
//! inside the namespace and waits until `/readyz` answers. Everything is torn down when the
//! handle drops, also when the test panics: the two processes are killed by PID, the
//! namespace and the temp dir removed.
//!
//! The test talks to the server through [`KubeApi::client`], whose TCP connections are opened
//! inside the namespace (on a short-lived thread that entered it), so nothing listens or
//! connects outside it. Processes the test starts in the namespace ([`KubeApi::command`])
//! reach the server at [`KubeApi::server`] with the [`KubeApi::kubeconfig`] file.
//!
//! The kube-apiserver binary is built by `scripts/kube-apiserver.sh` (from Debian's
//! `kubernetes` source package) into `/var/cache/cnikit/kube-apiserver-1.20.2/`; the
//! environment variable [`KUBE_APISERVER_ENV`] names another one. Without it, or without
//! `etcd` or root, [`KubeApi::start`] [`skip`](crate::skip)s.

use std::fs;
use std::future::Future;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};
use kube::client::ConfigExt;
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::apiserver::{self, Token};
pub use crate::apiserver::{KUBE_APISERVER_CACHED, KUBE_APISERVER_ENV, kube_apiserver_binary};
use crate::netns::{Namespaces, ip, netns_path};

/// The bearer token of the `admin` user (group `system:masters`).
pub const ADMIN_TOKEN: &str = "cnikit-test-admin-token";

/// The bearer token of the user `cnikit-node` (group `cnikit:nodes`), which has no rights
/// until a test binds a role to it (to check an RBAC manifest).
pub const NODE_TOKEN: &str = "cnikit-test-node-token";

/// The address the API server advertises: on `lo` of its namespace (the server refuses a
/// loopback address for its own endpoints). It also serves there, for processes in other
/// namespaces of the test that the test routes to it (see [`KubeApi::remote_kubeconfig`]).
pub const ADVERTISE: &str = "192.0.2.1";

/// The port the API server serves on inside its namespace.
pub const PORT: u16 = 6443;

/// How long a fresh server may take to be ready.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// A running private etcd + kube-apiserver. See the [module docs](self).
pub struct KubeApi {
    // Field order is drop order after `Drop::drop`: the processes are gone by then.
    dir: TempDir,
    _namespaces: Namespaces,
    ns: String,
    etcd: Option<Child>,
    // Behind a lock so that a test can restart the server while requests to it run.
    apiserver: Mutex<Option<Child>>,
}

impl std::fmt::Debug for KubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApi")
            .field("ns", &self.ns)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl KubeApi {
    /// Starts etcd and kube-apiserver in a namespace `cnkt-<tag>-<pid>-api` and waits until
    /// the server is ready; `None` after a loud skip when root, `etcd` or the kube-apiserver
    /// binary is missing. Panics when the server does not come up.
    pub async fn start(test: &str, tag: &str) -> Option<KubeApi> {
        if !crate::root(test) {
            return None;
        }
        if !crate::on_path("etcd") {
            crate::skip(
                test,
                "the etcd binary is not on PATH (apt-get install etcd-server)",
            );
            return None;
        }
        let binary = kube_apiserver_binary();
        if !binary.is_file() {
            crate::skip(
                test,
                format_args!(
                    "{} is missing (build it: scripts/kube-apiserver.sh)",
                    binary.display()
                ),
            );
            return None;
        }
        match Self::launch(tag, &binary).await {
            Ok(api) => Some(api),
            Err(e) => panic!("{test}: cannot start kube-apiserver: {e}"),
        }
    }

    async fn launch(tag: &str, binary: &Path) -> Result<KubeApi, String> {
        let namespaces = Namespaces::new(tag);
        let ns = namespaces.add("api");
        ip(&ns, &["link", "set", "lo", "up"]);
        ip(
            &ns,
            &["addr", "add", &format!("{ADVERTISE}/32"), "dev", "lo"],
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("cnkt-kapi-{}-", std::process::id()))
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let mut api = KubeApi {
            dir,
            _namespaces: namespaces,
            ns,
            etcd: None,
            apiserver: Mutex::new(None),
        };
        api.write_files().map_err(|e| format!("write files: {e}"))?;
        api.spawn_etcd()?;
        api.spawn_apiserver(binary)?;
        api.wait_ready().await?;
        Ok(api)
    }

    /// The network namespace the server runs in.
    pub fn netns(&self) -> &str {
        &self.ns
    }

    /// The server URL, as seen from inside [`netns`](Self::netns).
    pub fn server(&self) -> String {
        format!("https://127.0.0.1:{PORT}")
    }

    /// A kubeconfig file for the admin user (valid inside [`netns`](Self::netns)).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// A kubeconfig file for the admin user with the server at [`ADVERTISE`]: for processes
    /// in other namespaces of the test that reach the server's namespace (a veth into it and
    /// a route to [`ADVERTISE`]; the server's certificate names that address too).
    pub fn remote_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("remote.kubeconfig")
    }

    /// A kubeconfig file for the unprivileged user `cnikit-node` (token [`NODE_TOKEN`]).
    pub fn node_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("node.kubeconfig")
    }

    /// The serving CA certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The temp dir of this server (certificates, logs, etcd data).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A command that runs `program` inside [`netns`](Self::netns) (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// A client as the admin user whose connections open inside the namespace.
    pub async fn client(&self) -> kube::Client {
        self.client_for(ADMIN_TOKEN).await
    }

    /// A client authenticating with `token` (see [`ADMIN_TOKEN`], [`NODE_TOKEN`]).
    pub async fn client_for(&self, token: &str) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(self.kubeconfig())
            .expect("read the kubeconfig written at start");
        let mut config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .expect("a client configuration from the kubeconfig written at start");
        config.auth_info.token = Some(token.to_owned().into());
        config.read_timeout = Some(Duration::from_secs(30));
        let https = config
            .rustls_https_connector_with_connector(NetnsConnector {
                netns: netns_path(&self.ns),
            })
            .expect("TLS connector");
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(https);
        let service = tower::ServiceBuilder::new()
            .layer(config.base_uri_layer())
            .option_layer(config.auth_layer().expect("auth layer"))
            .map_err(tower::BoxError::from)
            .service(http);
        kube::Client::new(service, "default")
    }

    /// Creates `crds` and waits until the server lists every one of their resources and has
    /// the `kube-system` namespace. Panics when that takes longer than a fresh server may.
    pub async fn install_crds(&self, crds: &[CustomResourceDefinition]) {
        let client = self.client().await;
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in crds {
            api.create(&PostParams::default(), crd)
                .await
                .expect("create CRD");
        }
        let resources: Vec<ApiResource> = crds
            .iter()
            .map(|crd| {
                let version = &crd.spec.versions[0].name;
                let gvk = GroupVersionKind::gvk(&crd.spec.group, version, &crd.spec.names.kind);
                ApiResource::from_gvk_with_plural(&gvk, &crd.spec.names.plural)
            })
            .collect();
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let mut ready = matches!(namespaces.get_opt("kube-system").await, Ok(Some(_)));
            for resource in &resources {
                ready = ready
                    && Api::<DynamicObject>::all_with(client.clone(), resource)
                        .list(&ListParams::default())
                        .await
                        .is_ok();
            }
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the CRDs are not served, or kube-system is missing, after {READY_WITHIN:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the API server (SIGKILL) without restarting it; etcd keeps running.
    pub fn kill_apiserver(&self) {
        stop(&mut self.apiserver_child(), Signal::SIGKILL);
    }

    /// Starts a stopped API server again on the same etcd and waits until it is ready.
    pub async fn start_apiserver(&self) -> Result<(), String> {
        if self.apiserver_child().is_none() {
            self.spawn_apiserver(&kube_apiserver_binary())?;
        }
        self.wait_ready().await
    }

    /// Freezes the API server (SIGSTOP): it keeps its connections and accepts new ones but
    /// answers nothing until the returned guard is dropped (SIGCONT).
    pub fn freeze_apiserver(&self) -> Frozen {
        let pid = self
            .apiserver_child()
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
            .map(Pid::from_raw)
            .expect("the API server runs");
        kill(pid, Signal::SIGSTOP).expect("SIGSTOP the API server");
        Frozen(pid)
    }

    fn apiserver_child(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.apiserver.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write_files(&self) -> Result<(), Box<dyn std::error::Error>> {
        let d = self.dir.path();
        apiserver::write_files(
            d,
            &[ADVERTISE],
            &[
                Token {
                    token: ADMIN_TOKEN,
                    user: "admin",
                    groups: &["system:masters"],
                },
                Token {
                    token: NODE_TOKEN,
                    user: "cnikit-node",
                    groups: &["cnikit:nodes"],
                },
            ],
        )?;
        let remote = format!("https://{ADVERTISE}:{PORT}");
        for (file, server, token) in [
            ("kubeconfig", self.server(), ADMIN_TOKEN),
            ("node.kubeconfig", self.server(), NODE_TOKEN),
            ("remote.kubeconfig", remote, ADMIN_TOKEN),
        ] {
            fs::write(
                d.join(file),
                apiserver::kubeconfig(&server, &d.join("ca.crt"), token),
            )?;
        }
        Ok(())
    }

    fn spawn_etcd(&mut self) -> Result<(), String> {
        let d = self.dir.path();
        let log = log_file(&d.join("etcd.log"))?;
        let child = self
            .command("etcd")
            .args(["--name", "kapi", "--data-dir"])
            .arg(d.join("etcd"))
            .args([
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=kapi=http://127.0.0.1:2380",
                "--unsafe-no-fsync",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn etcd: {e}"))?;
        self.etcd = Some(child);
        Ok(())
    }

    fn spawn_apiserver(&self, binary: &Path) -> Result<(), String> {
        let d = self.dir.path();
        let log = log_file(&d.join("kube-apiserver.log"))?;
        let child = self
            .command(binary)
            .args(apiserver::args(d, "http://127.0.0.1:2379", ADVERTISE, PORT))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", binary.display()))?;
        *self.apiserver_child() = Some(child);
        Ok(())
    }

    async fn wait_ready(&self) -> Result<(), String> {
        let client = self.client().await;
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let exited = self
                .apiserver_child()
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                return Err(format!(
                    "kube-apiserver exited with {status}; its log: {}",
                    tail(&self.dir.path().join("kube-apiserver.log"))
                ));
            }
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("a static request");
            match client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                _ if Instant::now() > deadline => {
                    return Err(format!(
                        "not ready within {READY_WITHIN:?}; its log: {}",
                        tail(&self.dir.path().join("kube-apiserver.log"))
                    ));
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        stop(&mut self.apiserver_child(), Signal::SIGTERM);
        stop(&mut self.etcd, Signal::SIGTERM);
        // `namespaces` and `dir` are removed by their own drops, after this.
    }
}

/// Signals our child and reaps it; SIGKILL if it is still there after 5 s.
fn stop(child: &mut Option<Child>, signal: Signal) {
    let Some(mut c) = child.take() else { return };
    let Ok(pid) = i32::try_from(c.id()) else {
        return;
    };
    let _ = kill(Pid::from_raw(pid), signal);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

fn log_file(path: &Path) -> Result<fs::File, String> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The last lines of a log, for an error message.
fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A hyper connector whose TCP connections are opened inside a network namespace: the
/// socket is made on a short-lived thread that entered the namespace, then driven by tokio.
#[derive(Debug, Clone)]
struct NetnsConnector {
    netns: PathBuf,
}

impl tower::Service<http::Uri> for NetnsConnector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let netns = self.netns.clone();
        Box::pin(async move {
            let addr: SocketAddr = format!(
                "{}:{}",
                uri.host().unwrap_or("127.0.0.1"),
                uri.port_u16().unwrap_or(443)
            )
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                let _ = tx.send(connect_in(&netns, addr));
            });
            let stream = rx.await.map_err(std::io::Error::other)??;
            stream.set_nonblocking(true)?;
            stream.set_nodelay(true)?;
            Ok(TokioIo::new(tokio::net::TcpStream::from_std(stream)?))
        })
    }
}

/// Connects to `addr` from inside the namespace at `netns` (on the calling thread, which
/// must be a thread of its own: it stays in that namespace).
fn connect_in(netns: &Path, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let file = fs::File::open(netns)?;
    setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
    TcpStream::connect_timeout(&addr, Duration::from_secs(5))
}

/// A frozen API server ([`KubeApi::freeze_apiserver`]); dropping it lets the server run again.
#[derive(Debug)]
#[must_use = "the server runs again when this is dropped"]
pub struct Frozen(Pid);

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}
