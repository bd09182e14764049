//! Benchmark: how fast the node agents converge. A small cluster of node namespaces on one
//! underlay bridge runs the real `cnikit-agent` binary in every node namespace (one process
//! per node, sharing a file store, as on nodes that share a filesystem). The benchmark then
//! writes a synthetic peer's node record into the registry (a name, an underlay address on
//! the subnet, a fresh block; for vxlan also a VTEP address and MAC) and polls every node's
//! route table over netlink until the block's route is there on all of them; then removes
//! the record and polls until the route is gone everywhere. Repeated for each join.
//!
//! Printed per routing mode: the time from the start of the registry write to the route
//! being present (removed) on every node, median, p90 and max over the joins; the baseline
//! beside it is what the datastore alone costs in the same run: the store write, and the
//! time until a registry watch in the benchmark process itself reports the change.
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

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use cni_core::linux::{NetNs, route};
use cni_core::registry::{NodeEvent, NodeRecord, NodeRegistry, StoreRegistry};
use cni_core::store::FileStore;
use futures::StreamExt;
use ipnet::IpNet;
use serde_json::json;
use support::{Lab, Stats};
use tokio::sync::mpsc;

#[derive(Parser)]
struct Args {
    /// Node namespaces, each with its own agent.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Synthetic peers that join (and leave), one at a time, per mode.
    #[arg(long, default_value_t = 20)]
    joins: usize,
    /// Routing modes to measure.
    #[arg(long, value_delimiter = ',', default_value = "host-gw,vxlan")]
    modes: Vec<String>,
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
    for mode in &args.modes {
        eprintln!("{mode}: {} nodes, {} joins…", args.nodes, args.joins);
        results.push((mode.clone(), measure(args, agent, mode).await?));
    }
    println!(
        "Convergence: {} node namespaces on one bridge, one real cnikit-agent process per node, \
         file store registry (watch poll {} ms); {} synthetic peers join and leave one at a time; \
         route tables polled every {} us",
        args.nodes,
        cni_core::registry::store::DEFAULT_POLL_INTERVAL.as_millis(),
        args.joins,
        args.poll_us
    );
    println!(
        "{:<8} {:<7} | {:>9} {:>13} | {:>11} | {:>26}",
        "mode", "event", "write ms", "reg. watch ms", "first node", "route on every node, ms"
    );
    println!(
        "{:<8} {:<7} | {:>9} {:>13} | {:>11} | {:>8} {:>8} {:>8}",
        "", "", "median", "median", "median ms", "median", "p90", "max"
    );
    for (mode, (join, leave)) in &results {
        for (event, f) in [("join", join), ("remove", leave)] {
            let every = Stats::of_ms(&f.every_node);
            println!(
                "{:<8} {:<7} | {:>9.2} {:>13.2} | {:>11.2} | {:>8.2} {:>8.2} {:>8.2}",
                mode,
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
    for (mode, (join, _)) in &results {
        let every = Stats::of_ms(&join.every_node);
        let watch = Stats::of_ms(&join.watch);
        println!(
            "{mode}: join median {:.1} ms (goal <= 100 ms: {}); on top of the registry watch \
             alone: {:.1} ms (ratio {:.2})",
            every.median,
            if every.median <= 100.0 {
                "met"
            } else {
                "MISSED"
            },
            every.median - watch.median,
            every.median / watch.median.max(0.001),
        );
    }
    Ok(())
}

/// One mode: a fresh cluster, `joins` joins and removals.
async fn measure(args: &Args, agent: &Path, mode: &str) -> Result<(Figures, Figures)> {
    let mut lab = Lab::new("conv")?;
    let underlay = lab.underlay("", args.nodes)?;
    let store = lab.store_dir();
    for node in &underlay.nodes {
        let conf = support::conflist(node, mode, "routed", &store, json!({}));
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

    let registry = StoreRegistry::new(FileStore::new(&store));
    let observer = Arc::new(StoreRegistry::new(FileStore::new(&store)));
    let (tx, mut seen) = mpsc::unbounded_channel();
    let start = observer.list().await?;
    let mut events = observer.watch(start.revision).await?;
    let watcher = tokio::spawn(async move {
        while let Some(event) = events.next().await {
            let at = Instant::now();
            let key = match event {
                Ok(NodeEvent::Put(r, _)) => (r.name, true),
                Ok(NodeEvent::Delete(name, _)) => (name, false),
                Ok(NodeEvent::Reset(..)) | Err(_) => continue,
            };
            if tx.send((key, at)).is_err() {
                return;
            }
        }
    });

    let poll = Duration::from_micros(args.poll_us);
    let (mut join, mut leave) = (Figures::default(), Figures::default());
    for k in 0..args.joins {
        let record = synthetic(k, mode);
        let block = record.blocks[0];
        while seen.try_recv().is_ok() {}

        let t0 = Instant::now();
        registry.register(&record, Duration::from_secs(600)).await?;
        join.write.push(t0.elapsed());
        let nodes = until_routes(&handles, block, true, t0, poll).await?;
        join.first_node
            .push(nodes.iter().copied().min().unwrap_or_default());
        join.every_node
            .push(nodes.iter().copied().max().unwrap_or_default());
        join.watch
            .push(event_time(&mut seen, &record.name, true, t0).await?);

        gap(k).await;
        let t0 = Instant::now();
        registry.deregister(&record.name).await?;
        leave.write.push(t0.elapsed());
        let nodes = until_routes(&handles, block, false, t0, poll).await?;
        leave
            .first_node
            .push(nodes.iter().copied().min().unwrap_or_default());
        leave
            .every_node
            .push(nodes.iter().copied().max().unwrap_or_default());
        leave
            .watch
            .push(event_time(&mut seen, &record.name, false, t0).await?);
        gap(k + 7).await;
    }
    watcher.abort();
    for node in &underlay.nodes {
        let log = std::fs::read_to_string(lab.agent_log(&node.name)).unwrap_or_default();
        let warnings = log.lines().filter(|l| l.contains(" WARN ")).count();
        if warnings > 0 {
            eprintln!(
                "{mode}: the agent of {} logged {warnings} warnings ({})",
                node.name,
                lab.agent_log(&node.name).display()
            );
        }
    }
    drop(handles);
    drop(lab);
    Ok((join, leave))
}

/// A pause of 100–150 ms between events, varied so that events fall at every phase of the
/// registry's poll.
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
    let mut backend = BTreeMap::new();
    if mode == "vxlan" {
        let [_, _, hi, lo] = index.to_be_bytes();
        backend.insert(
            "vtepMac".to_owned(),
            format!("02:cb:00:00:{hi:02x}:{lo:02x}"),
        );
        backend.insert("vtepAddr".to_owned(), block_addr.to_string());
    }
    NodeRecord {
        name: format!("synthetic-{k}"),
        address: IpAddr::V4(address),
        prefix_len: support::UNDERLAY_PREFIX_LEN,
        blocks: vec![IpNet::new(IpAddr::V4(block_addr), 26).expect("valid prefix")],
        backend,
    }
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

/// When the benchmark's own registry watch reported the change, from `t0`.
async fn event_time(
    seen: &mut mpsc::UnboundedReceiver<((String, bool), Instant)>,
    name: &str,
    put: bool,
    t0: Instant,
) -> Result<Duration> {
    let wait = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(((n, p), at)) = seen.recv().await {
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
