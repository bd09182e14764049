//! Benchmark: how fast the node agents converge. A small cluster of node namespaces on one
//! underlay bridge runs the real `cnikit-agent` binary in every node namespace (one process
//! per node). The benchmark then writes a synthetic peer's node record into the registry (a
//! name, an underlay address on the subnet, a fresh block; for vxlan also a VTEP address and
//! MAC) and polls every node's route table over netlink until the block's route is there on
//! all of them; then removes the record and polls until the route is gone everywhere.
//! Repeated for each join, for each routing mode and each registry:
//!
//! - `file`: the file store shared by the node namespaces (as on nodes sharing a
//!   filesystem), whose registry watch polls;
//! - `etcd`: a private etcd (Debian `etcd-server`) started inside the underlay namespace,
//!   reached by the agents over the underlay; skipped when `etcd` is not installed.
//!
//! Printed: the time from the start of the registry write to the route being present
//! (removed) on every node, median, p90 and max over the joins; beside it the baseline of
//! what the datastore alone costs in the same run: the write itself, and the time until a
//! registry watch in the benchmark process reports the change.
//!
//! Needs root. Everything happens in namespaces the benchmark creates and removes, also on
//! failure or ctrl-c.
//!
//! ```text
//! cargo build --release --example cnikit-agent --example cnikit
//! cargo run --release --example bench_convergence -- --nodes 3 --joins 20
//! ```

#[path = "bench_support/mod.rs"]
mod support;

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Parser;
use cni_core::linux::{NetNs, route};
use cni_core::registry::{NodeEvent, NodeRecord, NodeRegistry, StoreRegistry};
use cni_core::store::FileStore;
use futures::StreamExt;
use ipnet::IpNet;
use serde_json::{Value, json};
use support::{Lab, Stats};
use tokio::sync::{mpsc, oneshot};

#[derive(Parser)]
struct Args {
    /// Node namespaces, each with its own agent.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Synthetic peers that join (and leave), one at a time, per mode and registry.
    #[arg(long, default_value_t = 20)]
    joins: usize,
    /// Routing modes to measure.
    #[arg(long, value_delimiter = ',', default_value = "host-gw,vxlan")]
    modes: Vec<String>,
    /// Registries to measure: `file`, `etcd`.
    #[arg(long, value_delimiter = ',', default_value = "file,etcd")]
    registries: Vec<String>,
    /// How often the route tables are polled, in microseconds.
    #[arg(long, default_value_t = 1000)]
    poll_us: u64,
    /// Agent log filter.
    #[arg(long, default_value = "info")]
    log: String,
}

/// The figures of one event kind (join or removal) over all rounds.
#[derive(Default)]
struct Figures {
    write: Vec<Duration>,
    watch: Vec<Duration>,
    first_node: Vec<Duration>,
    every_node: Vec<Duration>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.nodes >= 1, "--nodes must be at least 1");
    ensure!(
        (1..=500).contains(&args.joins),
        "--joins must be in 1..=500"
    );
    for r in &args.registries {
        ensure!(
            r == "file" || r == "etcd",
            "unknown registry {r:?}: file or etcd"
        );
    }
    let agent = support::binary("cnikit-agent")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        tokio::select! {
            result = run(&args, &agent) => result,
            () = support::interrupted() => bail!("interrupted; cleaned up"),
        }
    })
}

async fn run(args: &Args, agent: &Path) -> Result<()> {
    let mut results = Vec::new();
    for registry in &args.registries {
        if registry == "etcd" && support::run("etcd", &["--version"]).is_err() {
            eprintln!("etcd: not installed (apt-get install etcd-server): skipped");
            continue;
        }
        for mode in &args.modes {
            eprintln!(
                "{mode}, {registry} registry: {} nodes, {} joins…",
                args.nodes, args.joins
            );
            let figures = measure(args, agent, mode, registry).await?;
            results.push((format!("{mode}/{registry}"), figures));
        }
    }
    println!(
        "Convergence: {} node namespaces on one bridge, one real cnikit-agent process per node; \
         {} synthetic peers join and leave one at a time; route tables polled every {} us \
         (file registry: inotify wake-ups, and a poll every {} ms for what inotify misses)",
        args.nodes,
        args.joins,
        args.poll_us,
        cni_core::registry::store::DEFAULT_POLL_INTERVAL.as_millis(),
    );
    println!(
        "{:<13} {:<7} | {:>9} {:>13} | {:>11} | {:>26}",
        "mode/registry",
        "event",
        "write ms",
        "reg. watch ms",
        "first node",
        "route on every node, ms"
    );
    println!(
        "{:<13} {:<7} | {:>9} {:>13} | {:>11} | {:>8} {:>8} {:>8}",
        "", "", "median", "median", "median ms", "median", "p90", "max"
    );
    for (name, (join, leave)) in &results {
        for (event, f) in [("join", join), ("remove", leave)] {
            let every = Stats::of_ms(&f.every_node);
            println!(
                "{:<13} {:<7} | {:>9.2} {:>13.2} | {:>11.2} | {:>8.2} {:>8.2} {:>8.2}",
                name,
                event,
                Stats::of_ms(&f.write).median,
                Stats::of_ms(&f.watch).median,
                Stats::of_ms(&f.first_node).median,
                every.median,
                every.p90,
                every.max,
            );
        }
    }
    for (name, (join, leave)) in &results {
        let (join, leave) = (
            Stats::of_ms(&join.every_node),
            Stats::of_ms(&leave.every_node),
        );
        println!(
            "{name}: join median {:.1} ms, removal median {:.1} ms (goal <= 100 ms: {})",
            join.median,
            leave.median,
            if join.median <= 100.0 && leave.median <= 100.0 {
                "met"
            } else {
                "MISSED"
            },
        );
    }
    Ok(())
}

/// One mode and registry: a fresh cluster, `joins` joins and removals.
async fn measure(
    args: &Args,
    agent: &Path,
    mode: &str,
    registry: &str,
) -> Result<(Figures, Figures)> {
    let mut lab = Lab::new("conv")?;
    let underlay = lab.underlay("", args.nodes)?;
    let (store, mut side) = match registry {
        "etcd" => {
            let endpoint = start_etcd(&mut lab, &underlay.ns)?;
            let mut config = cnikit::etcd::Config::new([endpoint]);
            config.prefix = "/bench".into();
            let store = serde_json::to_value(&config)?;
            let mut store = store.as_object().cloned().context("an object")?;
            store.insert("type".into(), json!(cnikit::etcd::TYPE));
            let side =
                RegistrySide::start(Kind::Etcd(config), Some(support::ns_path(&underlay.ns)))?;
            (Value::Object(store), side)
        }
        _ => {
            let dir = lab.store_dir();
            let side = RegistrySide::start(Kind::File(dir.clone()), None)?;
            (support::file_store(&dir), side)
        }
    };
    for node in &underlay.nodes {
        let conf = support::conflist(node, mode, "routed", store.clone(), json!({}));
        lab.start_agent(agent, node, &conf, &args.log).await?;
    }
    let mut handles = Vec::new();
    for node in &underlay.nodes {
        handles.push(NetNs::named(&node.ns).await?);
    }
    // Every agent routes to every other node before the clock starts.
    let deadline = Instant::now() + Duration::from_secs(20);
    for (node, ns) in underlay.nodes.iter().zip(&handles) {
        loop {
            let routes = route::list_gateway(ns, support::ROUTE_PROTOCOL).await?;
            if routes.len() + 1 >= args.nodes {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{}: {} routes to its {} peers after 20 s (log: {})",
                node.name,
                routes.len(),
                args.nodes - 1,
                lab.agent_log(&node.name).display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    let poll = Duration::from_micros(args.poll_us);
    let (mut join, mut leave) = (Figures::default(), Figures::default());
    for k in 0..args.joins {
        let record = synthetic(k, mode);
        let block = record.blocks[0];
        side.forget_events();

        let t0 = Instant::now();
        join.write
            .push(side.call(Op::Register(record.clone())).await?);
        let nodes = until_routes(&handles, block, true, t0, poll).await?;
        join.first_node
            .push(nodes.iter().copied().min().unwrap_or_default());
        join.every_node
            .push(nodes.iter().copied().max().unwrap_or_default());
        join.watch
            .push(side.event_time(&record.name, true, t0).await?);

        gap(k).await;
        let t0 = Instant::now();
        leave
            .write
            .push(side.call(Op::Deregister(record.name.clone())).await?);
        let nodes = until_routes(&handles, block, false, t0, poll).await?;
        leave
            .first_node
            .push(nodes.iter().copied().min().unwrap_or_default());
        leave
            .every_node
            .push(nodes.iter().copied().max().unwrap_or_default());
        leave
            .watch
            .push(side.event_time(&record.name, false, t0).await?);
        gap(k + 7).await;
    }
    for node in &underlay.nodes {
        let log = std::fs::read_to_string(lab.agent_log(&node.name)).unwrap_or_default();
        let warnings = log.lines().filter(|l| l.contains(" WARN ")).count();
        if warnings > 0 {
            eprintln!(
                "{mode}/{registry}: the agent of {} logged {warnings} warnings ({})",
                node.name,
                lab.agent_log(&node.name).display()
            );
        }
    }
    drop(handles);
    // The agents deregister on SIGTERM: before etcd goes.
    drop(side);
    drop(lab);
    Ok((join, leave))
}

/// Starts a private etcd inside the underlay namespace, listening on the bridge's address;
/// returns its client URL.
fn start_etcd(lab: &mut Lab, underlay_ns: &str) -> Result<String> {
    let data = lab.dir.path().join("etcd");
    let client = format!("http://{}:2379", support::SERVICE_ADDRESS);
    let peer = "http://127.0.0.1:2380";
    let mut etcd = Command::new("etcd");
    etcd.arg("--name")
        .arg("bench")
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen-client-urls", &client])
        .args(["--advertise-client-urls", &client])
        .args(["--listen-peer-urls", peer])
        .args(["--initial-advertise-peer-urls", peer])
        .args(["--initial-cluster", &format!("bench={peer}")])
        .args(["--log-level", "error"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(lab.dir.path().join("etcd.log"))?);
    lab.spawn("etcd", underlay_ns, etcd)?;
    Ok(client)
}

/// A pause of 100–150 ms between events, varied so that events fall at every phase of a
/// polling registry.
async fn gap(k: usize) {
    let ms = 100 + (k as u64 * 37) % 50;
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// A peer that does not exist: a name, an underlay address on the subnet and a block of its
/// own (in the upper half of the pool, which the real nodes never reach here); for vxlan a
/// VTEP too.
fn synthetic(k: usize, mode: &str) -> NodeRecord {
    let index = u32::try_from(k).expect("few joins");
    let block_addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 128, 0)) + index * 64);
    let address = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 1, 0)) + index + 1);
    support::synthetic_peer(format!("synthetic-{k}"), index, address, block_addr, mode)
}

/// Polls every node until the route to `block` is there (`present`) or gone; returns, per
/// node, when that was first seen, from `t0`.
async fn until_routes(
    nodes: &[NetNs],
    block: IpNet,
    present: bool,
    t0: Instant,
    poll: Duration,
) -> Result<Vec<Duration>> {
    let mut done: Vec<Option<Duration>> = vec![None; nodes.len()];
    loop {
        for (i, ns) in nodes.iter().enumerate() {
            if done[i].is_some() {
                continue;
            }
            let routes = route::list_gateway(ns, support::ROUTE_PROTOCOL).await?;
            if routes.iter().any(|r| r.dst == block) == present {
                done[i] = Some(t0.elapsed());
            }
        }
        if done.iter().all(Option::is_some) {
            return Ok(done.into_iter().flatten().collect());
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!(
                "the route to {block} is still {} after 10 s on {} of {} nodes",
                if present { "missing" } else { "there" },
                done.iter().filter(|d| d.is_none()).count(),
                nodes.len()
            );
        }
        tokio::time::sleep(poll).await;
    }
}

/// Which registry the benchmark writes to and watches.
enum Kind {
    File(PathBuf),
    Etcd(cnikit::etcd::Config),
}

/// A registry write.
enum Op {
    Register(NodeRecord),
    Deregister(String),
}

type Reply = oneshot::Sender<Result<Duration>>;
type Seen = ((String, bool), Instant);

/// The benchmark's side of the registry: a writer and a watcher on a thread of their own,
/// inside the namespace the registry is reached from (etcd listens in the underlay).
struct RegistrySide {
    ops: Option<mpsc::UnboundedSender<(Op, Reply)>>,
    seen: mpsc::UnboundedReceiver<Seen>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RegistrySide {
    fn start(kind: Kind, netns: Option<PathBuf>) -> Result<RegistrySide> {
        let (ops, mut op_rx) = mpsc::unbounded_channel::<(Op, Reply)>();
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread = std::thread::Builder::new()
            .name("bench-registry".into())
            .spawn(move || {
                let ready = ready_tx.clone();
                let result = (|| -> Result<()> {
                    if let Some(path) = netns {
                        let file = std::fs::File::open(&path)?;
                        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
                    }
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    runtime.block_on(async move {
                        let (writer, observer) = open(kind).await?;
                        let start = observer.list().await?;
                        let mut events = observer.watch(start.revision).await?;
                        let _ = ready.send(Ok(()));
                        loop {
                            tokio::select! {
                                op = op_rx.recv() => {
                                    let Some((op, reply)) = op else { return Ok(()) };
                                    let t = Instant::now();
                                    let done = match op {
                                        Op::Register(r) => {
                                            writer.register(&r, Duration::from_secs(600)).await
                                        }
                                        Op::Deregister(name) => writer.deregister(&name).await,
                                    };
                                    let _ = reply.send(
                                        done.map(|()| t.elapsed()).map_err(anyhow::Error::from),
                                    );
                                }
                                event = events.next() => {
                                    let at = Instant::now();
                                    let key = match event {
                                        Some(Ok(NodeEvent::Put(r, _))) => (r.name, true),
                                        Some(Ok(NodeEvent::Delete(name, _))) => (name, false),
                                        Some(Ok(NodeEvent::Reset(..)) | Err(_)) => continue,
                                        None => bail!("the registry watch ended"),
                                    };
                                    let _ = seen_tx.send((key, at));
                                }
                            }
                        }
                    })
                })();
                if let Err(e) = result {
                    let _ = ready_tx.send(Err(e));
                }
            })?;
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| anyhow!("the registry did not open in 30 s"))??;
        Ok(RegistrySide {
            ops: Some(ops),
            seen,
            thread: Some(thread),
        })
    }

    /// Runs `op`; returns how long the write took.
    async fn call(&self, op: Op) -> Result<Duration> {
        let (reply, done) = oneshot::channel();
        self.ops
            .as_ref()
            .context("closed")?
            .send((op, reply))
            .map_err(|_| anyhow!("the registry thread ended"))?;
        done.await.context("the registry thread ended")?
    }

    fn forget_events(&mut self) {
        while self.seen.try_recv().is_ok() {}
    }

    /// When the benchmark's own registry watch reported the change, from `t0`.
    async fn event_time(&mut self, name: &str, put: bool, t0: Instant) -> Result<Duration> {
        let wait = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(((n, p), at)) = self.seen.recv().await {
                if n == name && p == put {
                    return Some(at.saturating_duration_since(t0));
                }
            }
            None
        });
        wait.await
            .context("the registry watch reported nothing in 10 s")?
            .context("the registry watch ended")
    }
}

impl Drop for RegistrySide {
    fn drop(&mut self) {
        self.ops.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A writer and an observer on the registry `kind` (two instances, as two processes would
/// have). etcd is retried while it starts.
async fn open(kind: Kind) -> Result<(Arc<dyn NodeRegistry>, Arc<dyn NodeRegistry>)> {
    match kind {
        Kind::File(dir) => Ok((
            Arc::new(StoreRegistry::new(FileStore::new(&dir))),
            Arc::new(StoreRegistry::new(FileStore::new(&dir))),
        )),
        Kind::Etcd(config) => {
            let deadline = Instant::now() + Duration::from_secs(20);
            let writer = loop {
                match cnikit::etcd::EtcdRegistry::connect(&config).await {
                    Ok(r) => match r.list().await {
                        Ok(_) => break r,
                        Err(e) if Instant::now() > deadline => return Err(e.into()),
                        Err(_) => {}
                    },
                    Err(e) if Instant::now() > deadline => return Err(e.into()),
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let observer = cnikit::etcd::EtcdRegistry::connect(&config).await?;
            Ok((Arc::new(writer), Arc::new(observer)))
        }
    }
}
