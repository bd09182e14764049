//! Benchmark of the block IPAM engine on etcd: allocations per second and etcd round trips per
//! allocation once the node's blocks are claimed, with 1, 8 and 32 concurrent allocators.
//!
//! Starts its own etcd on 127.0.0.1 (free ports, temp data dir, like the tests; needs the
//! `etcd` binary, Debian `etcd-server`), no root. Every allocator is an in-process task with
//! its own engine and its own etcd connection, as separate plugin processes would be. Two
//! layouts: each allocator its own node (pods starting on many nodes at once), and all
//! allocators on one node (a burst of pods on one node, racing for its addresses).
//!
//! Each measured round, every allocator allocates its share (a node holds at most 96 pods
//! in a round, a realistic node size, or the second argument: the list an allocation reads
//! grows with it); the addresses are released between rounds, outside
//! the measurement, so later rounds reuse released addresses. A warm-up round claims the
//! blocks first. A baseline measured in the same run, plain etcd puts from 1 and 32
//! clients, makes the figures comparable across machines.
//!
//! ```text
//! cargo run --release -p ipam-etcd --example etcd_bench            # about a minute
//! cargo run --release -p ipam-etcd --example etcd_bench -- 500     # allocations per run
//! cargo run --release -p ipam-etcd --example etcd_bench -- 2000 16 # and pods per node
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use cni_core::ipam::{Attachment, BlockIpam, BlockIpamConfig, Ipam};
use cni_core::store::{Store, Txn};
use common::Etcd;
use futures::future::join_all;
use ipam_etcd::EtcdStore;

/// Concurrency levels measured.
const CONCURRENCY: [usize; 3] = [1, 8, 32];
/// Addresses one node holds at most in a round, unless given on the command line.
const DEFAULT_NODE_PODS: usize = 96;
/// Allocations per measured run, unless given on the command line.
const DEFAULT_ALLOCATIONS: usize = 2_000;

/// Where the allocators run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Allocator `i` is node `n<i>`.
    NodePerAllocator,
    /// Every allocator is node `n0`.
    SharedNode,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::NodePerAllocator => "node per allocator",
            Layout::SharedNode => "one shared node",
        }
    }
}

/// One allocator: an engine on its own connection.
struct Allocator {
    id: usize,
    store: EtcdStore,
    ipam: BlockIpam<EtcdStore>,
}

/// What one run measured.
struct Row {
    layout: Layout,
    allocators: usize,
    allocations: usize,
    wall: Duration,
    round_trips: u64,
    claims: usize,
    latencies: Vec<Duration>,
}

impl Row {
    fn per_second(&self) -> f64 {
        self.allocations as f64 / self.wall.as_secs_f64()
    }
}

/// Plain etcd puts from `clients` connections at once: the machine's baseline.
struct Baseline {
    clients: usize,
    per_second: f64,
    p50: Duration,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let arg = |i: usize, default: usize| -> anyhow::Result<usize> {
        match std::env::args().nth(i) {
            Some(n) => n
                .parse()
                .with_context(|| format!("argument {i} must be a number: {n:?}")),
            None => Ok(default),
        }
    };
    let allocations = arg(1, DEFAULT_ALLOCATIONS)?;
    let node_pods = arg(2, DEFAULT_NODE_PODS)?;
    let etcd = Etcd::start("bench")
        .await
        .ok_or_else(|| anyhow!("the etcd binary is needed (apt-get install -y etcd-server)"))?;
    let mut baselines = Vec::new();
    for n in CONCURRENCY {
        baselines.push(baseline(&etcd, n).await?);
    }
    let mut rows = Vec::new();
    for layout in [Layout::NodePerAllocator, Layout::SharedNode] {
        for n in CONCURRENCY {
            let row = run(&etcd, layout, n, allocations, node_pods).await?;
            eprintln!(
                "{} × {n}: {:.0}/s, {:.2} round trips per allocation",
                layout.name(),
                row.per_second(),
                row.round_trips as f64 / row.allocations as f64
            );
            rows.push(row);
        }
    }
    print_table(&baselines, &rows);
    Ok(())
}

/// `clients` connections each put 500 / `clients` keys (at least 50), one after the other.
async fn baseline(etcd: &Etcd, clients: usize) -> anyhow::Result<Baseline> {
    let prefix = format!("{}/baseline-{clients}", etcd.prefix());
    let mut stores = Vec::new();
    for _ in 0..clients {
        let s = EtcdStore::connect(&etcd.config()).await?;
        s.commit(Txn::new().put(format!("{prefix}/warm"), "x"))
            .await?;
        stores.push(s);
    }
    let per_client = 500usize.div_ceil(clients).max(50);
    let started = Instant::now();
    let runs = stores.iter().enumerate().map(|(c, s)| {
        let prefix = &prefix;
        async move {
            let mut latencies = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let t = Instant::now();
                s.commit(Txn::new().put(format!("{prefix}/{c}/{i}"), "x"))
                    .await?;
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        }
    });
    let mut latencies = Vec::new();
    for r in join_all(runs).await {
        latencies.extend(r?);
    }
    let per_second = latencies.len() as f64 / started.elapsed().as_secs_f64();
    latencies.sort();
    Ok(Baseline {
        clients,
        per_second,
        p50: latencies[latencies.len() / 2],
    })
}

/// One measured run: `n` allocators in `layout`, about `target` allocations, at most
/// `node_pods` addresses per node in a round.
async fn run(
    etcd: &Etcd,
    layout: Layout,
    n: usize,
    target: usize,
    node_pods: usize,
) -> anyhow::Result<Row> {
    let prefix = format!(
        "{}/bench-{}-{n}",
        etcd.prefix(),
        match layout {
            Layout::NodePerAllocator => "nodes",
            Layout::SharedNode => "shared",
        }
    );
    let share = match layout {
        Layout::NodePerAllocator => node_pods,
        Layout::SharedNode => (node_pods / n).max(1),
    };
    let rounds = (target / (share * n)).max(2);
    let mut allocators = Vec::new();
    for id in 0..n {
        let mut config = etcd.config();
        config.prefix = prefix.clone();
        config.timeout_ms = 10_000;
        let store = EtcdStore::connect(&config).await?;
        let node = match layout {
            Layout::NodePerAllocator => format!("n{id}"),
            Layout::SharedNode => "n0".to_owned(),
        };
        let mut ipam = BlockIpamConfig::new("10.0.0.0/8".parse()?, node, "bench");
        ipam.block_prefix = 26;
        ipam.key_prefix = prefix.clone();
        allocators.push(Allocator {
            id,
            ipam: BlockIpam::new(store.clone(), ipam)?,
            store,
        });
    }
    // Warm-up: connects, claims the blocks a round needs.
    allocate_round(&allocators, share, 0).await?;
    release_round(&allocators, share, 0).await?;
    let blocks_before = blocks_held(&allocators, layout).await?;

    let mut row = Row {
        layout,
        allocators: n,
        allocations: 0,
        wall: Duration::ZERO,
        round_trips: 0,
        claims: 0,
        latencies: Vec::new(),
    };
    for round in 1..=rounds {
        let trips: u64 = allocators.iter().map(|a| a.store.round_trips()).sum();
        let started = Instant::now();
        let latencies = allocate_round(&allocators, share, round).await?;
        row.wall += started.elapsed();
        row.round_trips += allocators
            .iter()
            .map(|a| a.store.round_trips())
            .sum::<u64>()
            - trips;
        row.allocations += latencies.len();
        row.latencies.extend(latencies);
        release_round(&allocators, share, round).await?;
    }
    row.claims = blocks_held(&allocators, layout).await? - blocks_before;
    let problems = allocators[0].ipam.audit().await?;
    anyhow::ensure!(problems.is_empty(), "inconsistent pool: {problems:#?}");
    row.latencies.sort();
    Ok(row)
}

fn attachment(allocator: usize, round: usize, k: usize) -> Attachment {
    Attachment::new("bench", format!("a{allocator}-r{round}-{k}"), "eth0")
}

/// Every allocator allocates `share` addresses, one after the other; returns the latency of
/// each allocation.
async fn allocate_round(
    allocators: &[Allocator],
    share: usize,
    round: usize,
) -> anyhow::Result<Vec<Duration>> {
    let runs = allocators.iter().map(|a| async move {
        let mut latencies = Vec::with_capacity(share);
        for k in 0..share {
            let t = Instant::now();
            a.ipam
                .allocate(&attachment(a.id, round, k))
                .await
                .with_context(|| format!("allocator {} round {round}", a.id))?;
            latencies.push(t.elapsed());
        }
        anyhow::Ok(latencies)
    });
    let mut all = Vec::new();
    for r in join_all(runs).await {
        all.extend(r?);
    }
    Ok(all)
}

async fn release_round(allocators: &[Allocator], share: usize, round: usize) -> anyhow::Result<()> {
    let runs = allocators.iter().map(|a| async move {
        for k in 0..share {
            a.ipam.release(&attachment(a.id, round, k)).await?;
        }
        anyhow::Ok(())
    });
    for r in join_all(runs).await {
        r?;
    }
    Ok(())
}

/// Blocks held by the allocators' nodes.
async fn blocks_held(allocators: &[Allocator], layout: Layout) -> anyhow::Result<usize> {
    let nodes = match layout {
        Layout::NodePerAllocator => allocators,
        Layout::SharedNode => &allocators[..1],
    };
    let mut n = 0;
    for a in nodes {
        n += a.ipam.node_blocks().await?.len();
    }
    Ok(n)
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

fn print_table(baselines: &[Baseline], rows: &[Row]) {
    println!("| baseline: etcd puts | clients | puts/s | p50 ms |");
    println!("|---|---:|---:|---:|");
    for b in baselines {
        println!(
            "| one key per put | {} | {:.0} | {:.2} |",
            b.clients,
            b.per_second,
            millis(b.p50)
        );
    }
    println!();
    println!(
        "| layout | allocators | allocations | allocations/s | round trips/allocation | p50 ms | p99 ms | claims | allocations/s ÷ puts/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let puts = baselines
            .iter()
            .find(|b| b.clients == r.allocators)
            .map_or(f64::NAN, |b| b.per_second);
        let pct = |p: f64| {
            let i = ((r.latencies.len() as f64 - 1.0) * p).round() as usize;
            millis(r.latencies.get(i).copied().unwrap_or_default())
        };
        println!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {:.2} |",
            r.layout.name(),
            r.allocators,
            r.allocations,
            r.per_second(),
            r.round_trips as f64 / r.allocations as f64,
            pct(0.5),
            pct(0.99),
            r.claims,
            r.per_second() / puts
        );
    }
}
