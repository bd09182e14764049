//! The `bird` engine: BIRD 2 as a supervised child process, configured from the same
//! desired state as the native speaker.
//!
//! `init` renders `bird.conf` into the run directory and starts `bird -f` in the node's
//! network namespace (its own control socket `bird.ctl` and `bird.pid` there). A BIRD that
//! dies is started again (with `-R`: its kernel protocol keeps the installed routes until
//! the sessions are back, and the peers keep ours through graceful restart). `reconcile`
//! renders the configuration for the peers it is given; when it changed, it is written and
//! BIRD reloads it (`birdc configure`): sessions that did not change stay up, BIRD is never
//! restarted for a peer change. Session state comes back through `birdc show protocols
//! all`, the installed routes from the kernel (`proto bird`: BIRD 2 marks every route it
//! writes with its own protocol number, 12; it cannot write cnikit's 107), both into the
//! same [`Report`] the native engine fills. `teardown` withdraws the node's blocks, ends
//! BIRD by its PID (SIGTERM: it sends Cease to its peers and removes its routes), then
//! removes any route it left, its socket, PID file and configuration.
//!
//! Dropped without `teardown` (an agent restarting with `keepOnExit`), it kills BIRD as if
//! it crashed: the peers keep the node's routes (graceful restart), the kernel keeps the
//! learned ones, and the next run starts BIRD with `-R` on the previous configuration, so
//! they stay until relearned (at most `restartTime`).

mod birdc;
mod render;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cni_core::linux::NetNs;
use cni_core::linux::kernel::{Netlink, Routes, Underlay, remove_owned};
use cni_core::registry::NodeRecord;
use cni_core::routing::{CrossNodeRouting, LocalNode, ReconcileReport};
use ipnet::{IpNet, Ipv4Net};
use tokio::process::Command;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::backend::{ROUTE_REFLECTOR_KEY, Report};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::speaker::{Neighbor, PeerSummary};

pub use birdc::parse_protocols;
pub use render::{Node as RenderNode, peer_name, protocol_name, render};

/// The kernel's protocol number of the routes BIRD writes (`RTPROT_BIRD`, `proto bird`).
pub const BIRD_ROUTE_PROTOCOL: u8 = 12;

/// How long after BIRD died it is started again.
const RESTART_DELAY: Duration = Duration::from_millis(200);
/// How long BIRD has to answer on its socket after a start, and to exit after SIGTERM.
const PATIENCE: Duration = Duration::from_secs(10);
/// How often the report is refreshed from `birdc` and the kernel between reconciles.
const POLL: Duration = Duration::from_secs(1);

/// BGP through BIRD 2 (see the [module docs](self) and the [crate docs](crate)).
#[derive(Debug)]
pub struct Bird {
    config: Config,
    kernel: Arc<Netlink>,
    /// Opened on the namespace's path; BIRD enters it (setns) before it execs.
    netns: Arc<OwnedFd>,
    paths: Arc<Paths>,
    running: Option<Running>,
    report: Arc<Mutex<Option<Report>>>,
}

/// BIRD's files.
#[derive(Debug, Clone)]
struct Paths {
    dir: PathBuf,
    conf: PathBuf,
    socket: PathBuf,
    pid: PathBuf,
    bird: PathBuf,
    birdc: PathBuf,
}

#[derive(Debug)]
struct Running {
    local: LocalNode,
    router_id: Ipv4Addr,
    subnet: Ipv4Net,
    blocks: Vec<Ipv4Net>,
    peers: BTreeMap<String, Neighbor>,
    /// What `bird.conf` holds now.
    rendered: String,
    /// Node names by address (every registry record and global peer), to tell whose the
    /// installed routes are.
    names: Arc<Mutex<BTreeMap<Ipv4Addr, String>>>,
    unusable: Arc<Mutex<BTreeMap<String, String>>>,
    pid: Arc<AtomicU32>,
    restarts: Arc<AtomicU32>,
    stop: Option<oneshot::Sender<()>>,
    supervisor: JoinHandle<()>,
    poller: JoinHandle<()>,
}

impl Bird {
    /// The bird engine acting in the network namespace at `netns`, with its files in
    /// `run_dir` (made at init). Checks the configuration; touches nothing until
    /// [`init`](CrossNodeRouting::init). Errors: 7 for a bad configuration, 4 when `netns`
    /// is no network namespace.
    pub async fn open(config: Config, netns: &Path, run_dir: &Path) -> Result<Self> {
        config.validate()?;
        let kernel = Netlink::with_protocol(NetNs::open(netns).await?, BIRD_ROUTE_PROTOCOL);
        let fd = std::fs::File::open(netns).map_err(|source| Error::Bird {
            what: format!("open {}", netns.display()),
            source,
        })?;
        let paths = Paths {
            dir: run_dir.to_path_buf(),
            conf: run_dir.join("bird.conf"),
            socket: run_dir.join("bird.ctl"),
            pid: run_dir.join("bird.pid"),
            bird: config.bird.binary.clone().unwrap_or_else(|| "bird".into()),
            birdc: config.bird.birdc.clone().unwrap_or_else(|| "birdc".into()),
        };
        Ok(Bird {
            config,
            kernel: Arc::new(kernel),
            netns: Arc::new(fd.into()),
            paths: Arc::new(paths),
            running: None,
            report: Arc::default(),
        })
    }

    /// The PID of the running BIRD (none before init, after teardown, or while it is
    /// being started again).
    pub fn pid(&self) -> Option<u32> {
        let pid = self.running.as_ref()?.pid.load(Ordering::SeqCst);
        (pid != 0).then_some(pid)
    }

    /// How often BIRD was started again since init.
    pub fn restarts(&self) -> u32 {
        self.running
            .as_ref()
            .map_or(0, |r| r.restarts.load(Ordering::SeqCst))
    }

    /// BIRD's control socket.
    pub fn socket(&self) -> &Path {
        &self.paths.socket
    }

    /// Every peer's summary, as of the last look at BIRD (empty before init).
    pub fn summary(&self) -> Vec<PeerSummary> {
        self.typed_report().map(|r| r.peers).unwrap_or_default()
    }

    /// The report of [`CrossNodeRouting::report`], typed, as of the last look at BIRD.
    pub fn typed_report(&self) -> Option<Report> {
        self.report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Looks at BIRD and the kernel now, and returns the report.
    pub async fn refresh(&self) -> Option<Report> {
        let running = self.running.as_ref()?;
        let report = look(
            &self.paths,
            &self.kernel,
            &self.config,
            running.router_id,
            &running.names,
            &running.unusable,
        )
        .await;
        *self.report.lock().unwrap_or_else(|e| e.into_inner()) = Some(report.clone());
        Some(report)
    }

    fn rendered(&self, running: &Running) -> String {
        render(
            &self.config,
            &RenderNode {
                name: &running.local.name,
                router_id: running.router_id,
                subnet: running.subnet,
                blocks: &running.blocks,
                peers: &running.peers,
            },
        )
    }

    async fn init_inner(&mut self, local: &LocalNode) -> Result<()> {
        let IpAddr::V4(router_id) = local.address else {
            return Err(Error::NotIpv4 {
                address: local.address,
            });
        };
        let underlay = Underlay::resolve(&*self.kernel, local).await?;
        if let Some(ipip) = &self.config.ipip {
            crate::tunnel::ensure(&*self.kernel, ipip, &underlay, local).await?;
        }
        let subnet = match underlay.subnet {
            IpNet::V4(v4) => v4.trunc(),
            IpNet::V6(_) => Ipv4Net::from(router_id),
        };
        let blocks: Vec<Ipv4Net> = local
            .blocks
            .iter()
            .filter_map(|b| match b {
                IpNet::V4(v4) => Some(v4.trunc()),
                IpNet::V6(_) => None,
            })
            .collect();
        if let Some(mut running) = self.running.take() {
            running.local = local.clone();
            running.blocks = blocks;
            running.subnet = subnet;
            let result = self.apply(&mut running).await;
            self.running = Some(running);
            return result.map(|_| ());
        }
        std::fs::create_dir_all(&self.paths.dir).map_err(|source| Error::Bird {
            what: format!("create {}", self.paths.dir.display()),
            source,
        })?;
        let mut running = Running {
            local: local.clone(),
            router_id,
            subnet,
            blocks,
            peers: BTreeMap::new(),
            rendered: String::new(),
            names: Arc::default(),
            unusable: Arc::default(),
            pid: Arc::default(),
            restarts: Arc::default(),
            stop: None,
            supervisor: tokio::spawn(async {}),
            poller: tokio::spawn(async {}),
        };
        // A BIRD of a previous run of this node (the agent was killed) would hold the
        // socket: end it first, by the PID it wrote.
        end_stale(&self.paths).await;
        // Routes of a previous run (its agent restarted without a teardown): BIRD starts in
        // graceful-restart recovery (`-R`) on that run's configuration, so that the sessions
        // it had hold the routes in the kernel until they are relearned; the first
        // reconcile brings the configuration up to date.
        let previous = std::fs::read_to_string(&self.paths.conf).ok();
        let inherited = match previous {
            Some(conf) if !self.kernel.owned_routes().await?.is_empty() => {
                running.rendered = conf;
                true
            }
            _ => {
                running.rendered = self.rendered(&running);
                write_conf(&self.paths.conf, &running.rendered)?;
                false
            }
        };
        let (stop, stopped) = oneshot::channel();
        let first = spawn(&self.paths, &self.netns, inherited)?;
        running.pid.store(first.id().unwrap_or(0), Ordering::SeqCst);
        running.supervisor = tokio::spawn(supervise(
            self.paths.clone(),
            self.netns.clone(),
            first,
            running.pid.clone(),
            running.restarts.clone(),
            stopped,
        ));
        running.stop = Some(stop);
        let started = wait_ready(&self.paths).await;
        running.poller = tokio::spawn(poll(
            self.paths.clone(),
            self.kernel.clone(),
            self.config.clone(),
            router_id,
            running.names.clone(),
            running.unusable.clone(),
            self.report.clone(),
        ));
        self.running = Some(running);
        if let Err(e) = started {
            self.teardown_inner().await?;
            return Err(e);
        }
        tracing::info!(node = %local.name, %router_id, pid = ?self.pid(), "bgp: bird running");
        self.refresh().await;
        Ok(())
    }

    /// Renders the configuration and, when it changed, writes it and has BIRD reload it.
    /// Whether it changed.
    async fn apply(&self, running: &mut Running) -> Result<bool> {
        let rendered = self.rendered(running);
        if rendered == running.rendered {
            return Ok(false);
        }
        write_conf(&self.paths.conf, &rendered)?;
        running.rendered = rendered;
        let out = birdc(&self.paths, &["configure"]).await?;
        if out.contains("Reconfigured") || out.contains("Reconfiguration in progress") {
            return Ok(true);
        }
        if out.contains("Unable to connect") || out.contains("Connection refused") {
            // BIRD is being started again: it reads the new file when it starts.
            tracing::info!("bgp: bird is restarting; it reads the new configuration then");
            return Ok(true);
        }
        Err(Error::BirdSaid {
            what: "configure",
            output: out.trim().to_owned(),
        })
    }

    async fn reconcile_inner(&mut self, peers: &[NodeRecord]) -> Result<ReconcileReport> {
        let mut running = self.running.take().ok_or(Error::NotInitialized)?;
        let (wanted, unusable) =
            crate::topology::neighbors(&self.config, &running.local.name, peers);
        let mut names: BTreeMap<Ipv4Addr, String> = peers
            .iter()
            .filter_map(|p| match p.address {
                IpAddr::V4(a) => Some((a, p.name.clone())),
                IpAddr::V6(_) => None,
            })
            .collect();
        names.extend(wanted.iter().map(|(n, p)| (p.address, n.clone())));
        *running.names.lock().unwrap_or_else(|e| e.into_inner()) = names;
        *running.unusable.lock().unwrap_or_else(|e| e.into_inner()) = unusable;
        running.peers = wanted;
        let changed = self.apply(&mut running).await;
        self.running = Some(running);
        let changed = changed?;
        let report = self.refresh().await.ok_or(Error::NotInitialized)?;
        Ok(ReconcileReport {
            writes: usize::from(changed),
            routed: report
                .peers
                .iter()
                .filter(|p| p.state == "established")
                .count(),
            programmed: cni_core::routing::Programmed {
                routes: report.installed.values().map(Vec::len).sum(),
                ..Default::default()
            },
            unroutable: report.unroutable,
        })
    }

    async fn teardown_inner(&mut self) -> Result<()> {
        if let Some(mut running) = self.running.take() {
            running.poller.abort();
            withdraw_blocks(&self.paths).await;
            if let Some(stop) = running.stop.take() {
                let _ = stop.send(());
            }
            let _ = (&mut running.supervisor).await;
        }
        end_stale(&self.paths).await;
        for file in [&self.paths.socket, &self.paths.pid, &self.paths.conf] {
            match std::fs::remove_file(file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Bird {
                        what: format!("remove {}", file.display()),
                        source,
                    });
                }
            }
        }
        let _ = std::fs::remove_file(self.paths.conf.with_extension("conf.new"));
        let _ = std::fs::remove_dir(&self.paths.dir);
        // A BIRD that was killed leaves its routes behind.
        let device = self
            .config
            .ipip
            .as_ref()
            .map(|i| (i.device.as_str(), "ipip"));
        remove_owned(&*self.kernel, device).await?;
        *self.report.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }
}

#[async_trait]
impl CrossNodeRouting for Bird {
    fn mode(&self) -> &'static str {
        crate::TYPE
    }

    /// Starts BIRD on the first call (the node's blocks, no peers yet) and waits until it
    /// answers on its socket; later calls announce the node's new blocks (`birdc
    /// configure`). Errors: 7 when the underlay interface is missing, lacks the node's
    /// address, or the address is not IPv4; 101 when BIRD cannot be started or refuses its
    /// configuration.
    async fn init(&mut self, local: &LocalNode) -> cni_core::Result<()> {
        Ok(self.init_inner(local).await?)
    }

    /// The cluster id when this node is a route reflector (as the native engine).
    fn node_data(&self) -> BTreeMap<String, String> {
        self.config
            .route_reflector_cluster_id
            .map(|c| (ROUTE_REFLECTOR_KEY.to_owned(), c.to_string()))
            .into_iter()
            .collect()
    }

    /// 20 bytes with `bgp.ipip` (the outer IPv4 header), else 0.
    fn mtu_overhead(&self) -> u32 {
        if self.config.ipip.is_some() {
            crate::tunnel::OVERHEAD
        } else {
            0
        }
    }

    /// With `bgp.ipip`: the IPIP device needs an address of the node's block.
    fn needs_tunnel_address(&self) -> bool {
        self.config.ipip.is_some()
    }

    /// Renders the sessions for `peers` (same topology as the native engine) and, when the
    /// configuration changed, has BIRD reload it (`writes` is 1 then). `routed` counts the
    /// Established sessions. Errors: 50 before init, 101 when BIRD refuses the
    /// configuration or the file cannot be written.
    async fn reconcile(&mut self, peers: &[NodeRecord]) -> cni_core::Result<ReconcileReport> {
        Ok(self.reconcile_inner(peers).await?)
    }

    /// Ends BIRD (SIGTERM by its PID, SIGKILL after 10 s), deletes the routes it left and
    /// its files. Idempotent; works without init.
    async fn teardown(&mut self) -> cni_core::Result<()> {
        Ok(self.teardown_inner().await?)
    }

    /// Sessions, installed routes and what is not installed (a [`Report`]).
    fn report(&self) -> Option<serde_json::Value> {
        self.typed_report()
            .and_then(|r| serde_json::to_value(r).ok())
    }
}

impl Drop for Bird {
    /// Without a teardown (an agent restarting with `keepOnExit`): BIRD is killed as if
    /// it crashed, so its peers keep the node's routes (graceful restart) and its routes
    /// stay in the kernel until the next run's BIRD (started with `-R` on this run's
    /// configuration) has relearned them.
    fn drop(&mut self) {
        if let Some(running) = &mut self.running {
            running.poller.abort();
            running.supervisor.abort();
            let pid = running.pid.load(Ordering::SeqCst);
            if pid != 0 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Writes `bird.conf` whole (a new file renamed over the old one).
fn write_conf(path: &Path, text: &str) -> Result<()> {
    let new = path.with_extension("conf.new");
    std::fs::write(&new, text)
        .and_then(|()| std::fs::rename(&new, path))
        .map_err(|source| Error::Bird {
            what: format!("write {}", path.display()),
            source,
        })
}

/// Starts `bird -f` in the namespace `netns` (with `-R`, graceful-restart recovery, when
/// it is started again after it died or finds the routes of a previous run).
fn spawn(paths: &Paths, netns: &Arc<OwnedFd>, again: bool) -> Result<tokio::process::Child> {
    let mut command = Command::new(&paths.bird);
    command
        .arg("-f")
        .arg("-c")
        .arg(&paths.conf)
        .arg("-s")
        .arg(&paths.socket)
        .arg("-P")
        .arg(&paths.pid)
        .stdin(std::process::Stdio::null());
    if again {
        command.arg("-R");
    }
    let fd = netns.as_raw_fd();
    // SAFETY: between fork and exec the child only calls setns(2), which is
    // async-signal-safe; `fd` stays open in the parent for as long as `netns` lives.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    command.spawn().map_err(|source| Error::Bird {
        what: format!("start {}", paths.bird.display()),
        source,
    })
}

/// Keeps BIRD running until told to stop; then ends it (SIGTERM, SIGKILL after a while).
async fn supervise(
    paths: Arc<Paths>,
    netns: Arc<OwnedFd>,
    mut child: tokio::process::Child,
    pid: Arc<AtomicU32>,
    restarts: Arc<AtomicU32>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            status = child.wait() => {
                pid.store(0, Ordering::SeqCst);
                tracing::warn!(?status, "bgp: bird exited; starting it again");
                tokio::select! {
                    () = tokio::time::sleep(RESTART_DELAY) => {}
                    _ = &mut stop => return,
                }
                loop {
                    match spawn(&paths, &netns, true) {
                        Ok(c) => {
                            child = c;
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "bgp: bird does not start");
                            tokio::select! {
                                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                                _ = &mut stop => return,
                            }
                        }
                    }
                }
                pid.store(child.id().unwrap_or(0), Ordering::SeqCst);
                restarts.fetch_add(1, Ordering::SeqCst);
            }
            _ = &mut stop => {
                if let Some(id) = child.id() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(id as i32),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
                if tokio::time::timeout(PATIENCE, child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
                pid.store(0, Ordering::SeqCst);
                return;
            }
        }
    }
}

/// Kills the BIRD whose PID is in our PID file, if that process is a `bird` still running
/// (a previous run of this node was killed with it running), as if it had crashed: its
/// peers keep the node's routes through graceful restart until the new BIRD is up.
async fn end_stale(paths: &Paths) {
    let Ok(text) = std::fs::read_to_string(&paths.pid) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    if !bird_runs(pid) {
        return;
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while bird_runs(pid) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether `pid` is a `bird` that has not exited (a zombie has).
fn bird_runs(pid: i32) -> bool {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // `PID (COMM) STATE …`
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|s| s.trim().chars().next());
    comm.trim() == "bird" && !matches!(state, Some('Z' | 'X') | None)
}

/// Runs `birdc -s SOCKET ARGS…`; what it printed (stdout and stderr).
async fn birdc(paths: &Paths, args: &[&str]) -> Result<String> {
    let out = tokio::time::timeout(
        PATIENCE,
        Command::new(&paths.birdc)
            .arg("-s")
            .arg(&paths.socket)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .map_err(|_| Error::BirdSaid {
        what: "birdc",
        output: format!("no answer within {} s", PATIENCE.as_secs()),
    })?
    .map_err(|source| Error::Bird {
        what: format!("run {}", paths.birdc.display()),
        source,
    })?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(text)
}

/// Has BIRD withdraw the node's blocks from every peer (`birdc disable cnikit_blocks`) and
/// waits, a second at most, until no session exports anything: peers that do graceful
/// restart keep the routes of a speaker that just closes its sessions, but never
/// withdrawn ones.
async fn withdraw_blocks(paths: &Paths) {
    if birdc(paths, &["disable", render::BLOCKS]).await.is_err() {
        return;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while tokio::time::Instant::now() < deadline {
        match birdc(paths, &["show", "protocols", "all"]).await {
            Ok(out) if parse_protocols(&out).iter().all(|p| p.prefixes_sent == 0) => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(_) => return,
        }
    }
}

/// Waits until BIRD answers on its socket.
async fn wait_ready(paths: &Paths) -> Result<()> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let out = birdc(paths, &["show", "status"]).await?;
        if out.contains("Daemon is up and running") {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Error::BirdSaid {
                what: "start",
                output: out.trim().to_owned(),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The report: sessions from `birdc show protocols all`, installed routes from the kernel.
async fn look(
    paths: &Paths,
    kernel: &Netlink,
    config: &Config,
    router_id: Ipv4Addr,
    names: &Mutex<BTreeMap<Ipv4Addr, String>>,
    unusable: &Mutex<BTreeMap<String, String>>,
) -> Report {
    let mut unroutable = unusable.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let peers = match birdc(paths, &["show", "protocols", "all"]).await {
        Ok(out) if out.contains("BIRD ") && !out.contains("Unable to connect") => {
            parse_protocols(&out)
        }
        Ok(out) => {
            unroutable.insert("bird".into(), format!("not answering: {}", out.trim()));
            Vec::new()
        }
        Err(e) => {
            unroutable.insert("bird".into(), e.to_string());
            Vec::new()
        }
    };
    let mut installed: BTreeMap<String, Vec<String>> = BTreeMap::new();
    match kernel.owned_routes().await {
        Ok(routes) => {
            let names = names.lock().unwrap_or_else(|e| e.into_inner());
            for route in routes {
                let owner = match route.via {
                    IpAddr::V4(v4) => names.get(&v4).cloned(),
                    IpAddr::V6(_) => None,
                }
                .unwrap_or_else(|| format!("via {}", route.via));
                installed
                    .entry(owner)
                    .or_default()
                    .push(format!("{} via {}", route.dst, route.via));
            }
        }
        Err(e) => {
            unroutable.insert("kernel".into(), e.to_string());
        }
    }
    Report {
        engine: crate::config::Engine::Bird,
        as_number: config.as_number,
        router_id,
        listen: std::net::SocketAddr::from((router_id, config.port)).to_string(),
        peers,
        installed,
        unroutable,
    }
}

/// Refreshes the report every [`POLL`].
async fn poll(
    paths: Arc<Paths>,
    kernel: Arc<Netlink>,
    config: Config,
    router_id: Ipv4Addr,
    names: Arc<Mutex<BTreeMap<Ipv4Addr, String>>>,
    unusable: Arc<Mutex<BTreeMap<String, String>>>,
    report: Arc<Mutex<Option<Report>>>,
) {
    loop {
        tokio::time::sleep(POLL).await;
        let now = look(&paths, &kernel, &config, router_id, &names, &unusable).await;
        *report.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
    }
}
