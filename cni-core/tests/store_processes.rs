//! The file store and the block engine shared by many real processes, as CNI plugins share
//! them: this test binary re-executes itself as the child processes.
//!
//! Runs without root. Prints (does not assert) latency figures for whoever benchmarks.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cni_core::ipam::block::{BlockIpam, BlockIpamConfig};
use cni_core::ipam::{Attachment, Ipam};
use cni_core::store::{Compare, FileStore, Store, Txn, TxnOutcome};

/// Set in a child: what it does.
const ROLE: &str = "CNIKIT_STORE_TEST_ROLE";
/// Set in a child: the store directory.
const DIR: &str = "CNIKIT_STORE_TEST_DIR";
/// Set in a child: its number.
const INDEX: &str = "CNIKIT_STORE_TEST_INDEX";

const COUNTER_PROCESSES: usize = 8;
const INCREMENTS: u64 = 60;
const PODS: usize = 50;

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Ok(role) = std::env::var(ROLE) {
        let dir = PathBuf::from(std::env::var(DIR).expect("child needs the store directory"));
        let index: usize = std::env::var(INDEX)
            .expect("child needs its index")
            .parse()
            .expect("index is a number");
        rt.block_on(child(&role, &dir, index));
        return;
    }
    rt.block_on(async {
        concurrent_cas_increments_lose_nothing().await;
        fifty_parallel_adds_and_dels().await;
        latency_figures().await;
    });
    println!("store_processes: all checks passed");
}

fn ipam_config() -> BlockIpamConfig {
    let mut c = BlockIpamConfig::new("10.244.0.0/16".parse().unwrap(), "node-a", "podnet");
    c.block_prefix = 27;
    c
}

fn attachment(i: usize) -> Attachment {
    Attachment::new("podnet", format!("{i:064x}"), "eth0")
}

/// Waits until the parent has started every child, so that they really run at once.
async fn wait_for_go(dir: &Path) {
    let go = dir.join("go");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !go.exists() {
        assert!(Instant::now() < deadline, "the parent never said go");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn child(role: &str, dir: &Path, index: usize) {
    let store = FileStore::new(dir);
    wait_for_go(dir).await;
    match role {
        "counter" => {
            let mut conflicts = 0u64;
            for _ in 0..INCREMENTS {
                loop {
                    let seen = store.get("/counter").await.expect("get");
                    let n: u64 = seen
                        .as_ref()
                        .map(|kv| std::str::from_utf8(&kv.value).unwrap().parse().unwrap())
                        .unwrap_or(0);
                    let txn = Txn::new()
                        .when(Compare::unchanged("/counter", seen.as_ref()))
                        .put("/counter", (n + 1).to_string());
                    match store.commit(txn).await.expect("commit") {
                        TxnOutcome::Committed(_) => break,
                        TxnOutcome::Failed(_) => conflicts += 1,
                    }
                }
            }
            println!("{conflicts}");
        }
        "allocate" | "release" => {
            let ipam = BlockIpam::new(store, ipam_config()).expect("valid config");
            let start = Instant::now();
            if role == "allocate" {
                let a = ipam.allocate(&attachment(index)).await.expect("allocate");
                println!(
                    "{} {}",
                    a.ips[0].address.addr(),
                    start.elapsed().as_micros()
                );
            } else {
                ipam.release(&attachment(index)).await.expect("release");
                println!("- {}", start.elapsed().as_micros());
            }
        }
        other => panic!("unknown role {other}"),
    }
}

/// Starts one child per `(role, index)`, lets them go at once, and returns their outputs.
fn run_children(dir: &Path, jobs: &[(&str, usize)]) -> Vec<String> {
    let _ = std::fs::remove_file(dir.join("go"));
    let exe = std::env::current_exe().expect("own executable");
    let children: Vec<Child> = jobs
        .iter()
        .map(|(role, index)| {
            Command::new(&exe)
                .env(ROLE, role)
                .env(DIR, dir)
                .env(INDEX, index.to_string())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    std::fs::write(dir.join("go"), b"").expect("go file");
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().expect("child ran");
            assert!(out.status.success(), "a child failed: {:?}", out.status);
            String::from_utf8(out.stdout)
                .expect("utf-8")
                .trim()
                .to_owned()
        })
        .collect()
}

async fn concurrent_cas_increments_lose_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let jobs: Vec<_> = (0..COUNTER_PROCESSES).map(|i| ("counter", i)).collect();
    let started = Instant::now();
    let outputs = run_children(dir.path(), &jobs);
    let elapsed = started.elapsed();
    let store = FileStore::new(dir.path());
    let kv = store.get("/counter").await.expect("get").expect("written");
    let total = COUNTER_PROCESSES as u64 * INCREMENTS;
    assert_eq!(
        kv.value,
        total.to_string().into_bytes(),
        "an increment was lost"
    );
    assert_eq!(kv.mod_revision, total, "one revision per increment");
    let conflicts: u64 = outputs.iter().map(|o| o.parse::<u64>().unwrap()).sum();
    println!(
        "counter: {COUNTER_PROCESSES} processes x {INCREMENTS} CAS increments = {total} in {elapsed:?} \
         ({conflicts} failed compares retried)"
    );
}

async fn fifty_parallel_adds_and_dels() {
    let dir = tempfile::tempdir().expect("temp dir");
    let auditor = BlockIpam::new(FileStore::new(dir.path()), ipam_config()).expect("valid");

    let jobs: Vec<_> = (0..PODS).map(|i| ("allocate", i)).collect();
    let started = Instant::now();
    let outputs = run_children(dir.path(), &jobs);
    let wall = started.elapsed();
    let mut addrs = BTreeSet::new();
    let mut micros = Vec::new();
    for o in &outputs {
        let (ip, us) = o.split_once(' ').expect("ip and time");
        assert!(
            addrs.insert(ip.parse::<IpAddr>().expect("an address")),
            "{ip} twice"
        );
        micros.push(us.parse::<u64>().unwrap());
    }
    assert_eq!(addrs.len(), PODS);
    let problems = auditor.audit().await.expect("audit");
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(auditor.allocations().await.unwrap().len(), PODS);
    // 50 addresses in /27 blocks: exactly two blocks, racing claims did not take more.
    assert_eq!(auditor.node_blocks().await.unwrap().len(), 2);
    report("ADD", wall, &mut micros);

    // Half of the pods go while as many new ones come.
    let jobs: Vec<_> = (0..PODS / 2)
        .map(|i| ("release", i))
        .chain((PODS..PODS + PODS / 2).map(|i| ("allocate", i)))
        .collect();
    let started = Instant::now();
    let outputs = run_children(dir.path(), &jobs);
    let wall = started.elapsed();
    let mut micros: Vec<u64> = outputs
        .iter()
        .map(|o| o.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    let problems = auditor.audit().await.expect("audit");
    assert!(problems.is_empty(), "{problems:#?}");
    let held: BTreeSet<Attachment> = auditor
        .allocations()
        .await
        .unwrap()
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    let expected: BTreeSet<Attachment> = (PODS / 2..PODS + PODS / 2).map(attachment).collect();
    assert_eq!(held, expected);
    report("mixed DEL+ADD", wall, &mut micros);

    let report = auditor.gc(&[]).await.expect("gc");
    assert_eq!(report.released.len(), PODS);
    assert!(auditor.audit().await.unwrap().is_empty());
}

fn report(what: &str, wall: Duration, micros: &mut [u64]) {
    micros.sort_unstable();
    println!(
        "{} parallel {what} processes on one FileStore: wall {wall:?}; per operation p50 {} us, \
         max {} us (includes waiting for the lock)",
        micros.len(),
        micros[micros.len() / 2],
        micros[micros.len() - 1],
    );
}

async fn latency_figures() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ipam = BlockIpam::new(FileStore::new(dir.path()), ipam_config()).expect("valid");
    // Fill to a realistic node: 60 pods.
    let mut held = std::collections::BTreeSet::new();
    for i in 0..60 {
        let allocation = ipam.allocate(&attachment(i)).await.expect("allocate");
        held.extend(allocation.ips.iter().map(|ip| ip.address.addr()));
    }
    assert_eq!(held.len(), 60, "60 pods, 60 distinct addresses");
    let mut samples = Vec::new();
    for i in 1000..1100 {
        let started = Instant::now();
        let allocation = ipam.allocate(&attachment(i)).await.expect("allocate");
        ipam.release(&attachment(i)).await.expect("release");
        samples.push(started.elapsed());
        for ip in &allocation.ips {
            assert!(
                !held.contains(&ip.address.addr()),
                "{} is held by one of the 60 pods",
                ip.address
            );
        }
    }
    samples.sort_unstable();
    println!(
        "BlockIpam allocate+release on FileStore (60 pods held, {} build, one process): \
         p50 {:?}, p90 {:?}, max {:?}",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        samples[50],
        samples[90],
        samples[99]
    );
}
