//! Benchmark: memory of the real `cnikit-agent` process with many peers. One node namespace
//! on an underlay bridge runs the agent; the benchmark writes synthetic peer records (each
//! with an underlay address on the subnet and a block; for vxlan a VTEP too) into the file
//! store registry, so the agent programs one route per peer (vxlan: route, neighbour and FDB
//! entry). Printed: the agent's peak resident set (`VmHWM` of `/proc/PID/status`) with the
//! peers against the baseline of the same agent with no peers, measured in the same run.
//!
//! Three runs per mode, each a fresh agent process:
//! - `0 peers`: the baseline, after a few resyncs;
//! - `peers join`: started with no peers, then the peers are written while it runs;
//! - `peers at start`: started with the peers already in the registry.
//!
//! Needs root. Everything happens in namespaces the benchmark creates and removes, also on
//! failure or ctrl-c.
//!
//! ```text
//! cargo build --release --example cnikit-agent --example cnikit
//! cargo run --release --example bench_memory -- --peers 1000
//! ```

#[path = "bench_support/mod.rs"]
mod support;

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use cni_core::linux::{NetNs, route};
use cni_core::registry::{NodeRecord, NodeRegistry, StoreRegistry};
use cni_core::store::FileStore;
use serde_json::json;
use support::Lab;

#[derive(Parser)]
struct Args {
    /// Synthetic peers.
    #[arg(long, default_value_t = 1000)]
    peers: usize,
    /// Routing modes to measure.
    #[arg(long, value_delimiter = ',', default_value = "host-gw,vxlan")]
    modes: Vec<String>,
    /// How long the agent runs on after it routed every peer (it resyncs every second).
    #[arg(long, default_value_t = 3)]
    settle_seconds: u64,
}

/// What `/proc/PID/status` says about memory.
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    /// Peak resident set, KiB.
    hwm: u64,
    /// Resident set now, KiB.
    rss: u64,
    /// Threads now.
    threads: u64,
    /// Resident anonymous memory now (heap, stacks), KiB.
    anon: u64,
    /// Resident file-backed memory now (the binary's pages, mostly), KiB.
    file: u64,
}

fn memory_of(pid: u32) -> Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let mut m = Memory::default();
    for line in status.lines() {
        let mut parts = line.split_whitespace();
        let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        let value: u64 = value.parse().unwrap_or(0);
        match key {
            "VmHWM:" => m.hwm = value,
            "VmRSS:" => m.rss = value,
            "Threads:" => m.threads = value,
            "RssAnon:" => m.anon = value,
            "RssFile:" => m.file = value,
            _ => {}
        }
    }
    Ok(m)
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        (1..=1000).contains(&args.peers),
        "--peers must be in 1..=1000 (the /26 blocks of the /16 pool)"
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
    let mut rows = Vec::new();
    for mode in &args.modes {
        eprintln!("{mode}: {} peers…", args.peers);
        rows.push((mode.clone(), measure(args, agent, mode).await?));
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "Peak RSS (VmHWM) of the cnikit-agent process, file store registry, {} synthetic peers",
        args.peers
    );
    println!(
        "{:<8} {:<15} {:>9} {:>12} {:>9} {:>9} {:>7} {:>10}",
        "mode", "run", "VmHWM MiB", "vs baseline", "anon MiB", "file MiB", "threads", "routed in"
    );
    for (mode, runs) in &rows {
        let base = runs[0].1.hwm;
        for (run, m, took) in runs {
            println!(
                "{:<8} {:<15} {:>9.2} {:>+12.2} {:>9.2} {:>9.2} {:>7} {:>8.0}ms",
                mode,
                run,
                mib(m.hwm),
                mib(m.hwm) - mib(base),
                mib(m.anon),
                mib(m.file),
                m.threads,
                took.as_secs_f64() * 1000.0,
            );
        }
    }
    println!(
        "(anon and file: resident now, heap and binary pages; routed in: from the agent's start, \
         or from the first of the writes when the peers join)"
    );
    for (mode, runs) in &rows {
        let peak = runs.iter().map(|(_, m, _)| m.hwm).max().unwrap_or(0);
        println!(
            "{mode}: peak {:.2} MiB with {} peers (goal <= 20 MiB: {}), baseline {:.2} MiB",
            mib(peak),
            args.peers,
            if mib(peak) <= 20.0 { "met" } else { "MISSED" },
            mib(runs[0].1.hwm),
        );
    }
    Ok(())
}

type Run = (String, Memory, Duration);

/// One mode: the three runs of the module docs, each with a fresh agent.
async fn measure(args: &Args, agent: &Path, mode: &str) -> Result<Vec<Run>> {
    let mut lab = Lab::new("mem")?;
    let underlay = lab.underlay("", 1)?;
    let node = &underlay.nodes[0];
    let store = lab.store_dir();
    let conf = support::conflist(
        node,
        mode,
        "routed",
        support::file_store(&store),
        json!({ "resyncSeconds": 1 }),
    );
    let ns = NetNs::named(&node.ns).await?;
    let settle = Duration::from_secs(args.settle_seconds);
    let registry = StoreRegistry::new(FileStore::new(&store));
    let peers: Vec<NodeRecord> = (0..args.peers).map(|k| synthetic(k, mode)).collect();
    let mut runs = Vec::new();

    // The baseline: no peers.
    let started = Instant::now();
    let pid = lab.start_agent(agent, node, &conf, "warn").await?;
    let took = started.elapsed();
    tokio::time::sleep(settle).await;
    runs.push(("0 peers".to_owned(), memory_of(pid)?, took));

    // The same agent sees the peers join while it runs.
    let started = Instant::now();
    for peer in &peers {
        registry.register(peer, Duration::from_secs(3600)).await?;
    }
    until_routes(&ns, args.peers, Duration::from_secs(120)).await?;
    let took = started.elapsed();
    tokio::time::sleep(settle).await;
    lab.check_alive(pid)?;
    runs.push(("peers join".to_owned(), memory_of(pid)?, took));
    lab.stop(pid, Duration::from_secs(10))?;

    // A fresh agent finds them all at start (its predecessor removed its own routes).
    until_routes(&ns, 0, Duration::from_secs(20)).await?;
    let started = Instant::now();
    let pid = lab.start_agent(agent, node, &conf, "warn").await?;
    until_routes(&ns, args.peers, Duration::from_secs(120)).await?;
    let took = started.elapsed();
    tokio::time::sleep(settle).await;
    lab.check_alive(pid)?;
    runs.push(("peers at start".to_owned(), memory_of(pid)?, took));
    if mode == "vxlan" {
        let device = cni_core::linux::link::get(&ns, "cnikit.vxlan")
            .await?
            .context("no vxlan device")?;
        let neighbours = cni_core::linux::neigh::list_permanent(&ns, device.index).await?;
        let fdb = cni_core::linux::fdb::list(&ns, device.index).await?;
        ensure!(
            neighbours.len() >= args.peers && fdb.len() >= args.peers,
            "vxlan: {} neighbours and {} FDB entries for {} peers",
            neighbours.len(),
            fdb.len(),
            args.peers
        );
    }
    let log = std::fs::read_to_string(lab.agent_log(&node.name)).unwrap_or_default();
    let warnings = log.lines().filter(|l| l.contains(" WARN ")).count();
    if warnings > 0 {
        eprintln!(
            "{mode}: the agent logged {warnings} warnings ({})",
            lab.agent_log(&node.name).display()
        );
    }
    drop(registry);
    drop(ns);
    drop(lab);
    Ok(runs)
}

/// Waits until the node has exactly `want` routes of the routing backend.
async fn until_routes(ns: &NetNs, want: usize, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let have = route::list_gateway(ns, support::ROUTE_PROTOCOL)
            .await?
            .len();
        if have == want {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{have} routes instead of {want} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Peer `k`: underlay address `10.200.(4 + k/250).(k%250 + 1)`, the /26 block `16 + k` of the
/// pool (the node claims one of the first blocks), and for vxlan a VTEP.
fn synthetic(k: usize, mode: &str) -> NodeRecord {
    let index = u32::try_from(k).expect("few peers");
    let block_addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 4, 0)) + index * 64);
    let address = Ipv4Addr::new(
        10,
        200,
        u8::try_from(4 + index / 250).expect("at most 1000 peers"),
        u8::try_from(index % 250 + 1).expect("below 251"),
    );
    support::synthetic_peer(format!("peer-{k:05}"), index, address, block_addr, mode)
}
