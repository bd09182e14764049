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
//! ```text
//! sudo cargo run --release -p ipam-crd --example kube_bench            # 96 allocations per run
//! sudo cargo run --release -p ipam-crd --example kube_bench -- 256
//! ```

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use cni_core::ipam::{Attachment, BlockIpam, BlockIpamConfig, Ipam};
use cni_core::store::Store;
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

/// Median allocations/s and requests per allocation of `total` allocations by `c` allocators.
async fn measure<X: Side>(side: &X, c: usize, total: usize) -> anyhow::Result<(f64, f64)> {
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
    for run in 0..RUNS {
        let before: u64 = engines.iter().map(|(s, _)| X::requests(s)).sum();
        let start = Instant::now();
        let results = join_all(engines.iter().map(|(_, ipam)| async move {
            for k in 0..per {
                ipam.allocate(&Attachment::new("net", format!("r{run}-{k}"), "eth0"))
                    .await?;
            }
            anyhow::Ok(())
        }))
        .await;
        let secs = start.elapsed().as_secs_f64();
        for r in results {
            r?;
        }
        let after: u64 = engines.iter().map(|(s, _)| X::requests(s)).sum();
        let n = (per * c) as f64;
        rates.push(n / secs);
        per_alloc.push((after - before) as f64 / n);
        for (_, ipam) in &engines {
            ipam.gc(&[]).await?;
        }
    }
    Ok((median(rates), median(per_alloc)))
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
    println!("store        allocators   allocations/s   requests per allocation");
    let mut rows = Vec::new();
    for c in CONCURRENCY {
        let (etcd_side, kube_side) = (EtcdSide(etcd.endpoint.clone()), KubeSide(&api));
        let (er, eq) = measure(&etcd_side, c, total).await?;
        let (kr, kq) = measure(&kube_side, c, total).await?;
        println!("{:<12} {c:>10}   {er:>13.0}   {eq:>10.2}", etcd_side.name());
        println!("{:<12} {c:>10}   {kr:>13.0}   {kq:>10.2}", kube_side.name());
        rows.push((c, kr / er));
    }
    for (c, ratio) in rows {
        println!("kubernetes/etcd allocations/s at {c}: {ratio:.2}");
    }
    Ok(())
}
