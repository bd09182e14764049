//! Benchmark of the block IPAM engine on the Kubernetes store beside the etcd store, in the
//! same run: allocations per second and API requests (etcd: round trips) per allocation
//! with 1, 8 and 32 concurrent allocators, each its own node with its block already claimed.
//!
//! Needs root: it starts a private etcd + kube-apiserver in a network namespace of its own
//! (`testkit::kube`, the binary from `scripts/kube-apiserver.sh`) and a private etcd on
//! 127.0.0.1 (free ports, temp data dir) for the etcd store. Every allocator is a task with
//! its own engine, client and connection, as separate plugin processes have. Each figure is
//! the median of three runs; addresses are released between runs, outside the measurement.
//!
//! Then each store's floor, what no allocation can go below: one read and one
//! compare-and-swap write of a one-record object (Kubernetes: a GET and a replace of a node
//! object; etcd: a range and a txn) by one client, in a row; and how far the engine's
//! single-allocator median lies above it.
//!
//! ```text
//! sudo cargo run --release -p ipam-crd --example kube_bench            # 96 allocations per run
//! sudo cargo run --release -p ipam-crd --example kube_bench -- 256
//! ```

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use cni_core::ipam::{Attachment, BlockIpam, BlockIpamConfig, Ipam};
use cni_core::store::{Compare, Store, Txn, TxnOutcome};
use futures::future::join_all;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, PostParams};
use testkit::kube::KubeApi;

const CONCURRENCY: [usize; 3] = [1, 8, 32];
const RUNS: usize = 3;

/// A private etcd on 127.0.0.1, killed (by PID) on drop.
struct Etcd {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn start_etcd() -> anyhow::Result<Etcd> {
    let dir = tempfile::Builder::new().prefix("cnkb-etcd-").tempdir()?;
    let (client, peer) = (free_port()?, free_port()?);
    let endpoint = format!("http://127.0.0.1:{client}");
    let child = Command::new("etcd")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args([
            format!("--listen-client-urls={endpoint}"),
            format!("--advertise-client-urls={endpoint}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
            format!("--initial-cluster=default=http://127.0.0.1:{peer}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start etcd (Debian etcd-server)")?;
    let etcd = Etcd {
        child,
        endpoint,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let config = ipam_etcd::Config::new([etcd.endpoint.clone()]);
        if let Ok(store) = ipam_etcd::EtcdStore::connect(&config).await
            && store.get("/probe").await.is_ok()
        {
            return Ok(etcd);
        }
        if Instant::now() > deadline {
            return Err(anyhow!("etcd did not come up"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn config(node: usize) -> BlockIpamConfig {
    let mut c = BlockIpamConfig::new("10.90.0.0/16".parse().unwrap(), format!("n{node}"), "net");
    c.block_prefix = 24;
    c
}

/// One store kind: builds an engine for node `i` and counts the requests of all engines.
trait Side {
    type S: Store + Clone + 'static;
    fn name(&self) -> &'static str;
    async fn store(&self) -> anyhow::Result<Self::S>;
    fn requests(store: &Self::S) -> u64;
}

struct EtcdSide(String);
struct KubeSide<'a>(&'a KubeApi);

impl Side for EtcdSide {
    type S = ipam_etcd::EtcdStore;
    fn name(&self) -> &'static str {
        "etcd"
    }
    async fn store(&self) -> anyhow::Result<Self::S> {
        Ok(ipam_etcd::EtcdStore::connect(&ipam_etcd::Config::new([self.0.clone()])).await?)
    }
    fn requests(store: &Self::S) -> u64 {
        store.round_trips()
    }
}

impl Side for KubeSide<'_> {
    type S = ipam_crd::KubeStore;
    fn name(&self) -> &'static str {
        "kubernetes"
    }
    async fn store(&self) -> anyhow::Result<Self::S> {
        let mut config = ipam_crd::Config::new(None);
        config.timeout_ms = 60_000;
        Ok(ipam_crd::KubeStore::new(self.0.client().await, &config))
    }
    fn requests(store: &Self::S) -> u64 {
        store.requests()
    }
}

/// What [`measure`] found.
struct Figures {
    /// Median allocations per second over the runs.
    rate: f64,
    /// Median requests (round trips) per allocation over the runs.
    requests: f64,
    /// Latency of one allocation over all runs, ms: median, 99th percentile, max.
    latency: [f64; 3],
}

/// Allocations/s, requests per allocation and allocation latency of `total` allocations by
/// `c` allocators.
async fn measure<X: Side>(side: &X, c: usize, total: usize) -> anyhow::Result<Figures> {
    let mut engines = Vec::new();
    for i in 0..c {
        let store = side.store().await?;
        let ipam = BlockIpam::new(store.clone(), config(i))?;
        ipam.ensure_block().await?;
        engines.push((store, ipam));
    }
    let per = total / c;
    let mut rates = Vec::new();
    let mut per_alloc = Vec::new();
    let mut latencies = Vec::new();
    for run in 0..RUNS {
        let before: u64 = engines.iter().map(|(s, _)| X::requests(s)).sum();
        let start = Instant::now();
        let results = join_all(engines.iter().map(|(_, ipam)| async move {
            let mut took = Vec::with_capacity(per);
            for k in 0..per {
                let one = Instant::now();
                ipam.allocate(&Attachment::new("net", format!("r{run}-{k}"), "eth0"))
                    .await?;
                took.push(one.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(took)
        }))
        .await;
        let secs = start.elapsed().as_secs_f64();
        for r in results {
            latencies.extend(r?);
        }
        let after: u64 = engines.iter().map(|(s, _)| X::requests(s)).sum();
        let n = (per * c) as f64;
        rates.push(n / secs);
        per_alloc.push((after - before) as f64 / n);
        for (_, ipam) in &engines {
            ipam.gc(&[]).await?;
        }
    }
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    Ok(Figures {
        rate: median(rates),
        requests: median(per_alloc),
        latency: [at(0.5), at(0.99), at(1.0)],
    })
}

/// The store's floor: the median latency (ms) of one read and one compare-and-swap write of
/// a single small record, `rounds` times in a row by one client.
async fn floor<X: Side>(side: &X, rounds: usize) -> anyhow::Result<f64> {
    let store = side.store().await?;
    let key = format!("{}/nodes/floor/used/10.90.255.1", config(0).key_prefix);
    let mut took = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let start = Instant::now();
        let seen = store.get(&key).await?;
        let txn = Txn::new()
            .when(Compare::unchanged(key.clone(), seen.as_ref()))
            .put(key.clone(), format!("{{\"round\":{round}}}"));
        match store.commit(txn).await? {
            TxnOutcome::Committed(_) => took.push(start.elapsed().as_secs_f64() * 1000.0),
            TxnOutcome::Failed(_) => {
                return Err(anyhow!("{}: floor write conflicted", side.name()));
            }
        }
    }
    Ok(median(took))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let total: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(96);
    let most = CONCURRENCY.iter().max().copied().unwrap_or(1);
    anyhow::ensure!(
        total >= most,
        "{total} allocations per run: at least {most}, one per allocator"
    );
    let api = KubeApi::start("kube_bench", "kbench")
        .await
        .ok_or_else(|| anyhow!("cannot run: see the SKIPPED line"))?;
    let crds: Api<CustomResourceDefinition> = Api::all(api.client().await);
    for crd in ipam_crd::resources::crds() {
        crds.create(&PostParams::default(), &crd).await?;
    }
    let nodes: Api<ipam_crd::resources::IPAMNode> = Api::all(api.client().await);
    while nodes.list(&ListParams::default()).await.is_err() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let etcd = start_etcd().await?;
    println!("block IPAM, {total} allocations per run, median of {RUNS} runs, node per allocator");
    println!(
        "store        allocators   allocations/s   requests per allocation   \
         latency ms p50 / p99 / max"
    );
    let mut rows = Vec::new();
    let mut single = (0.0, 0.0);
    for c in CONCURRENCY {
        let (etcd_side, kube_side) = (EtcdSide(etcd.endpoint.clone()), KubeSide(&api));
        let e = measure(&etcd_side, c, total).await?;
        let k = measure(&kube_side, c, total).await?;
        for (name, f) in [(etcd_side.name(), &e), (kube_side.name(), &k)] {
            let [p50, p99, max] = f.latency;
            println!(
                "{name:<12} {c:>10}   {:>13.0}   {:>23.2}   {p50:>8.1} / {p99:.1} / {max:.1}",
                f.rate, f.requests
            );
        }
        rows.push((c, k.rate / e.rate));
        if c == 1 {
            single = (e.latency[0], k.latency[0]);
        }
    }
    for (c, ratio) in rows {
        println!("kubernetes/etcd allocations/s at {c}: {ratio:.2}");
    }
    let rounds = 3 * total;
    let (etcd_floor, kube_floor) = (
        floor(&EtcdSide(etcd.endpoint.clone()), rounds).await?,
        floor(&KubeSide(&api), rounds).await?,
    );
    println!(
        "floor (one read + one compare-and-swap write of one record, 1 client, {rounds} \
         rounds), ms p50: etcd {etcd_floor:.1}, kubernetes {kube_floor:.1} \
         (kubernetes/etcd {:.1})",
        kube_floor / etcd_floor
    );
    println!(
        "allocation p50 at 1 allocator / floor: etcd {:.2}, kubernetes {:.2}",
        single.0 / etcd_floor,
        single.1 / kube_floor
    );
    Ok(())
}
