//! The block IPAM on etcd driven through the `cnikit` plugin binary, one process per CNI
//! command as a container runtime runs it: races between nodes and processes, processes
//! killed mid-way, an etcd restart in the middle of a burst, and an etcd that is unreachable
//! or silent.
//!
//! Each test starts its own etcd (see `common`) and skips loudly without the `etcd` binary.
//! The plugin binary must be built first: see `cni` (`cargo build --example cnikit --features
//! etcd`, which `scripts/test.sh` runs). The store is inspected in-process with the engine's
//! own `audit`, `allocations` and `node_blocks`.

mod cni;
#[path = "../common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cni::{Net, Outcome};
use cni_core::ErrorCode;
use cni_core::ipam::{Attachment, BlockIpam, BlockIpamConfig, Ipam};
use cni_core::store::Store;
use common::Etcd;
use futures::future::join_all;
use ipam_etcd::EtcdStore;
use ipnet::IpNet;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Request deadline of the plugin in the load tests: generous, since up to 256 plugin
/// processes share two cores with etcd; these tests are about correctness, not speed.
const LOAD_TIMEOUT_MS: u64 = 30_000;

/// In-process view of one pool in the test's etcd, through the engine itself.
struct Inspect {
    store: EtcdStore,
    config: BlockIpamConfig,
}

impl Inspect {
    async fn new(etcd: &Etcd, net: &Net) -> Inspect {
        let pool: IpNet = net.ipam["pool"].as_str().unwrap().parse().unwrap();
        let mut config = BlockIpamConfig::new(pool, "inspector", net.name.clone());
        config.block_prefix = u8::try_from(net.ipam["blockSize"].as_u64().unwrap()).unwrap();
        config.key_prefix = net.ipam["store"]["prefix"].as_str().unwrap().to_owned();
        let mut store_config = etcd.config();
        store_config.timeout_ms = LOAD_TIMEOUT_MS;
        Inspect {
            store: EtcdStore::connect(&store_config).await.unwrap(),
            config,
        }
    }

    /// The engine as node `node` runs it (same pool, same keys).
    fn engine(&self, node: &str) -> BlockIpam<EtcdStore> {
        let mut config = self.config.clone();
        config.node = node.to_owned();
        BlockIpam::new(self.store.clone(), config).unwrap()
    }

    /// Every consistency problem of the pool, as the engine's audit sees it.
    async fn audit(&self) -> Vec<String> {
        self.engine("inspector").audit().await.unwrap()
    }

    /// `containerID -> address` of every attachment node `node` holds.
    async fn allocations(&self, node: &str) -> BTreeMap<String, IpAddr> {
        self.engine(node)
            .allocations()
            .await
            .unwrap()
            .into_iter()
            .map(|(a, ip)| {
                assert_eq!(
                    (a.network.as_str(), a.ifname.as_str()),
                    (self.config.network.as_str(), "eth0")
                );
                (a.container_id, ip)
            })
            .collect()
    }

    /// Keys of addresses in use or attachments, anywhere in the pool.
    async fn used_and_handle_keys(&self) -> Vec<String> {
        self.store
            .list(&format!("{}/", self.config.key_prefix))
            .await
            .unwrap()
            .into_iter()
            .map(|kv| kv.key)
            .filter(|k| k.contains("/used/") || k.contains("/handles/"))
            .collect()
    }

    /// Allocates in-process on each node in turn until the node gets code 100, and returns
    /// every address handed out: with nothing leaked, that is every address of the pool.
    async fn fill(&self, nodes: &[String]) -> Vec<IpAddr> {
        let mut got = Vec::new();
        for node in nodes {
            let engine = self.engine(node);
            for i in 0.. {
                let a = Attachment::new(
                    self.config.network.clone(),
                    format!("fill-{node}-{i}"),
                    "eth0",
                );
                match engine.allocate(&a).await {
                    Ok(alloc) => got.push(alloc.ips[0].address.addr()),
                    Err(e) if e.code() == ErrorCode::NO_ADDRESS => break,
                    Err(e) => panic!("filling the pool on {node}: {e}"),
                }
            }
        }
        got
    }
}

fn assert_clean(problems: &[String], when: &str) {
    assert!(problems.is_empty(), "audit {when}: {problems:#?}");
}

fn node_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("n{i}")).collect()
}

/// Every address of `pool`.
fn addresses(pool: &IpNet) -> BTreeSet<IpAddr> {
    pool.hosts()
        .chain([pool.network(), pool.broadcast()])
        .collect()
}

/// 4 nodes × 64 ADD processes at once: 256 distinct addresses, each inside a block of its own
/// node, every block owned by one node; 256 DEL processes at once: nothing left in use. Twice
/// on the same pool, so the second round runs on released addresses only.
async fn race(test: &str, pool: &str, block_size: u8) {
    const NODES: usize = 4;
    const PER_NODE: usize = 64;
    let Some(etcd) = Etcd::start(test).await else {
        return;
    };
    cni::plugin_binary();
    let nodes = node_names(NODES);
    let net = Net::new(
        "race",
        pool,
        block_size,
        "n0",
        &etcd.endpoint(),
        &etcd.prefix(),
        LOAD_TIMEOUT_MS,
    );
    let inspect = Inspect::new(&etcd, &net).await;
    let pool: IpNet = pool.parse().unwrap();
    for round in 0..2 {
        let started = Instant::now();
        let adds = nodes.iter().flat_map(|node| {
            let net = net.on(node);
            (0..PER_NODE).map(move |i| {
                let net = net.clone();
                let container = format!("r{round}-{node}-{i}");
                async move {
                    let out = net.add(&container).await;
                    (
                        net.ipam["nodeName"].as_str().unwrap().to_owned(),
                        container,
                        out,
                    )
                }
            })
        });
        let results = join_all(adds).await;
        eprintln!(
            "{test}: round {round}: {} ADD processes in {:?}",
            results.len(),
            started.elapsed()
        );

        let mut by_node: BTreeMap<String, BTreeMap<String, IpAddr>> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for (node, container, out) in &results {
            let address = out.address(&format!("ADD {container} on {node}"));
            assert_eq!(address.prefix_len(), block_size, "{container}: {address}");
            assert!(
                pool.contains(&address.addr()),
                "{container}: {address} outside {pool}"
            );
            assert!(
                seen.insert(address.addr()),
                "{} handed out twice",
                address.addr()
            );
            by_node
                .entry(node.clone())
                .or_default()
                .insert(container.clone(), address.addr());
        }
        assert_eq!(seen.len(), NODES * PER_NODE);
        assert_clean(
            &inspect.audit().await,
            &format!("after round {round}'s ADDs"),
        );
        for node in &nodes {
            let blocks = inspect.engine(node).node_blocks().await.unwrap();
            // 64 attachments fit the first /26 exactly: a second block would be one taken
            // from another node (no spare) or wasted.
            assert_eq!(blocks.len(), 1, "{node} holds {blocks:?}");
            for (container, ip) in &by_node[node] {
                assert!(
                    blocks[0].contains(ip),
                    "{container}: {ip} outside {node}'s {blocks:?}"
                );
            }
            assert_eq!(
                inspect.allocations(node).await,
                by_node[node],
                "the store holds what the ADDs printed on {node}"
            );
        }

        let dels = results.iter().map(|(node, container, _)| {
            let net = net.on(node);
            let container = container.clone();
            async move { (container.clone(), net.del(&container).await) }
        });
        for (container, out) in join_all(dels).await {
            out.expect_ok(&format!("DEL {container}"));
        }
        assert_eq!(inspect.used_and_handle_keys().await, Vec::<String>::new());
        assert_clean(
            &inspect.audit().await,
            &format!("after round {round}'s DELs"),
        );
    }
    // The pool is whole: every address of it can be handed out once more.
    let all = inspect.fill(&nodes).await;
    let distinct: BTreeSet<IpAddr> = all.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        all.len(),
        "an address handed out twice while filling"
    );
    assert_eq!(
        distinct,
        addresses(&pool),
        "every address of {pool} is allocatable"
    );
    assert_clean(&inspect.audit().await, "after filling the pool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_256_processes_on_4_nodes_with_spare_blocks() {
    // 16 blocks of 64 for 4 nodes.
    race("race-spare", "10.80.0.0/22", 26).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_256_processes_on_4_nodes_without_a_spare_block() {
    // 4 blocks of 64 (no reserved address): exactly one block per node, 256 addresses.
    race("race-exact", "10.81.0.0/24", 26).await;
}

/// What the crash test's runtime knows.
#[derive(Default)]
struct Ledger {
    /// ADD printed a result and no DEL was started: `container -> (node, address)`.
    live: BTreeMap<String, (String, IpAddr)>,
    /// ADDs that succeeded but whose result the runtime lost.
    forgotten: usize,
    killed_adds: usize,
    killed_dels: usize,
    released: usize,
}

/// 200 ADD/DEL cycles on 3 nodes, 8 at a time, processes SIGKILLed at random points (and
/// every tenth ADD's result lost by the runtime); then GC with the attachments whose ADD
/// succeeded and that were not released: the store holds exactly those, and once they are
/// released every address of the pool is allocatable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_processes_then_gc_lose_no_address() {
    const CYCLES: usize = 200;
    const WORKERS: usize = 8;
    const FORGET_EVERY: usize = 10;
    let Some(etcd) = Etcd::start("crash").await else {
        return;
    };
    cni::plugin_binary();
    let nodes = node_names(3);
    let pool: IpNet = "10.82.0.0/24".parse().unwrap();
    let net = Net::new(
        "crash",
        "10.82.0.0/24",
        27,
        "n0",
        &etcd.endpoint(),
        &etcd.prefix(),
        LOAD_TIMEOUT_MS,
    );
    let inspect = Inspect::new(&etcd, &net).await;

    // How long an ADD takes here, so kills land anywhere in a process's life.
    let mut took = Vec::new();
    for i in 0..9 {
        let started = Instant::now();
        let c = format!("warmup-{i}");
        net.on(&nodes[i % 3]).add(&c).await.address(&c);
        took.push(started.elapsed());
        net.on(&nodes[i % 3]).del(&c).await.expect_ok(&c);
    }
    took.sort();
    let span = took[took.len() / 2].mul_f64(1.5);
    eprintln!(
        "crash: an ADD takes about {:?}; kills within {span:?}",
        took[took.len() / 2]
    );

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers = (0..WORKERS).map(|w| {
        let (ledger, next, net, nodes) = (ledger.clone(), next.clone(), net.clone(), nodes.clone());
        tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(w as u64 ^ u64::from(std::process::id()));
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= CYCLES {
                    return;
                }
                let node = &nodes[i % nodes.len()];
                let net = net.on(node);
                let container = format!("c{i}");
                if i % FORGET_EVERY == 0 {
                    // The plugin succeeds but the runtime dies before it records the result.
                    net.add(&container).await.ip(&format!("ADD {container}"));
                    ledger.lock().unwrap().forgotten += 1;
                    continue;
                }
                let out = if rng.bool() {
                    net.add_killed_after(&container, span.mul_f64(rng.f64()))
                        .await
                } else {
                    net.add(&container).await
                };
                let ip = match out {
                    Outcome::Killed => {
                        ledger.lock().unwrap().killed_adds += 1;
                        continue;
                    }
                    other => other.ip(&format!("ADD {container}")),
                };
                {
                    let mut l = ledger.lock().unwrap();
                    if let Some((c, _)) = l.live.iter().find(|(_, (_, held))| *held == ip) {
                        panic!("{ip} handed to {container} while {c} holds it");
                    }
                    l.live.insert(container.clone(), (node.clone(), ip));
                }
                if rng.bool() {
                    continue;
                }
                // The runtime tears the pod down; from here on it is not live, and a DEL
                // that dies is retried, as runtimes retry DEL until it succeeds.
                ledger.lock().unwrap().live.remove(&container);
                let mut kill = rng.f64() < 0.6;
                loop {
                    let out = if kill {
                        net.del_killed_after(&container, span.mul_f64(rng.f64()))
                            .await
                    } else {
                        net.del(&container).await
                    };
                    match out {
                        Outcome::Killed => {
                            ledger.lock().unwrap().killed_dels += 1;
                            kill = false;
                        }
                        other => {
                            other.expect_ok(&format!("DEL {container}"));
                            ledger.lock().unwrap().released += 1;
                            break;
                        }
                    }
                }
            }
        })
    });
    for w in join_all(workers).await {
        w.expect("a crash worker panicked");
    }
    let ledger = Arc::try_unwrap(ledger).ok().unwrap().into_inner().unwrap();
    eprintln!(
        "crash: {} live, {} released, {} ADDs and {} DELs killed",
        ledger.live.len(),
        ledger.released,
        ledger.killed_adds,
        ledger.killed_dels
    );
    assert!(
        ledger.killed_adds > 0 && ledger.killed_dels > 0,
        "no process was killed"
    );
    assert_clean(&inspect.audit().await, "after the killed processes");
    // Attachments whose ADD was killed after it committed: GC's work.
    let mut orphans = 0;
    for node in &nodes {
        let held = inspect.allocations(node).await;
        for (container, (n, ip)) in &ledger.live {
            if n == node {
                assert_eq!(held.get(container), Some(ip), "live {container} is held");
            }
        }
        orphans += held.len() - ledger.live.values().filter(|(n, _)| n == node).count();
    }
    eprintln!(
        "crash: {orphans} allocations left for GC ({} of ADDs the runtime forgot)",
        ledger.forgotten
    );
    assert_eq!(ledger.forgotten, CYCLES / FORGET_EVERY);
    assert!(
        orphans >= ledger.forgotten,
        "every forgotten ADD holds an address"
    );

    for node in &nodes {
        let live: Vec<String> = ledger
            .live
            .iter()
            .filter(|(_, (n, _))| n == node)
            .map(|(c, _)| c.clone())
            .collect();
        net.on(node)
            .gc(&live)
            .await
            .expect_ok(&format!("GC on {node}"));
        let expected: BTreeMap<String, IpAddr> = ledger
            .live
            .iter()
            .filter(|(_, (n, _))| n == node)
            .map(|(c, (_, ip))| (c.clone(), *ip))
            .collect();
        assert_eq!(
            inspect.allocations(node).await,
            expected,
            "after GC on {node}"
        );
    }
    assert_clean(&inspect.audit().await, "after GC");

    for (container, (node, _)) in &ledger.live {
        net.on(node)
            .del(container)
            .await
            .expect_ok(&format!("DEL {container}"));
    }
    assert_eq!(inspect.used_and_handle_keys().await, Vec::<String>::new());
    let all = inspect.fill(&nodes).await;
    let distinct: BTreeSet<IpAddr> = all.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        all.len(),
        "an address handed out twice while filling"
    );
    assert_eq!(distinct, addresses(&pool), "no address of {pool} is lost");
    assert_clean(&inspect.audit().await, "after filling the pool");
}

/// A burst of ADDs, 8 at a time, with etcd stopped and started again in the middle: each ADD
/// succeeds with an address no other holds, or fails with code 11; the successes survive
/// the restart, and GC with them leaves exactly them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_during_a_burst() {
    const ADDS: usize = 120;
    const AT_ONCE: usize = 8;
    let Some(mut etcd) = Etcd::start("restart").await else {
        return;
    };
    cni::plugin_binary();
    let nodes = node_names(2);
    let net = Net::new(
        "burst",
        "10.83.0.0/22",
        26,
        "n0",
        &etcd.endpoint(),
        &etcd.prefix(),
        2_000,
    );
    let inspect = Inspect::new(&etcd, &net).await;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let burst = {
        let (net, nodes) = (net.clone(), nodes.clone());
        tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
            let mut running = Vec::new();
            for i in 0..ADDS {
                let slot = slots.clone().acquire_owned().await.unwrap();
                let node = nodes[i % nodes.len()].clone();
                let net = net.on(&node);
                let tx = tx.clone();
                running.push(tokio::spawn(async move {
                    let container = format!("b{i}");
                    let out = net.add(&container).await;
                    drop(slot);
                    let _ = tx.send((i, node, container, out));
                }));
            }
            for r in running {
                r.await.expect("an ADD task panicked");
            }
        })
    };

    let mut results = Vec::new();
    // A third of the burst, then etcd goes away while ADDs keep coming.
    while results.len() < ADDS / 3 {
        results.push(rx.recv().await.expect("the burst ended early"));
    }
    etcd.stop().await;
    let stopped_at = results.len();
    // Stay down until several ADDs have failed against the stopped etcd.
    let mut failed_while_down = 0;
    while failed_while_down < 3 {
        let r = rx
            .recv()
            .await
            .expect("the burst ended while etcd was down");
        if matches!(r.3, Outcome::Err(_)) {
            failed_while_down += 1;
        }
        results.push(r);
    }
    etcd.resume().await.expect("etcd starts again");
    let resumed_at = results.len();
    while let Some(r) = rx.recv().await {
        results.push(r);
    }
    burst.await.expect("the burst panicked");
    assert_eq!(results.len(), ADDS);

    let mut ok: BTreeMap<String, (String, IpAddr)> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut failed = 0;
    for (_, node, container, out) in &results {
        match out {
            Outcome::Ok(Some(address)) => {
                assert!(seen.insert(address.addr()), "{address} handed out twice");
                ok.insert(container.clone(), (node.clone(), address.addr()));
            }
            Outcome::Err(e) => {
                assert_eq!(e.code, 11, "ADD {container} failed with another code: {e}");
                assert!(e.msg.contains(&etcd.endpoint()), "ADD {container}: {e}");
                failed += 1;
            }
            other => panic!("ADD {container}: {other:?}"),
        }
    }
    eprintln!(
        "restart: {} succeeded, {failed} failed with code 11; etcd stopped after {stopped_at} \
         results and resumed after {resumed_at}",
        ok.len()
    );
    assert!(failed >= 3);
    // The ADDs started after etcd came back have the working etcd.
    let last = &results.iter().max_by_key(|r| r.0).unwrap();
    assert!(
        matches!(last.3, Outcome::Ok(Some(_))),
        "the last ADD after the restart: {:?}",
        last.3
    );

    assert_clean(&inspect.audit().await, "after the restart");
    for node in &nodes {
        let keep: Vec<String> = ok
            .iter()
            .filter(|(_, (n, _))| n == node)
            .map(|(c, _)| c.clone())
            .collect();
        net.on(node)
            .gc(&keep)
            .await
            .expect_ok(&format!("GC on {node}"));
        let expected: BTreeMap<String, IpAddr> = ok
            .iter()
            .filter(|(_, (n, _))| n == node)
            .map(|(c, (_, ip))| (c.clone(), *ip))
            .collect();
        assert_eq!(
            inspect.allocations(node).await,
            expected,
            "after GC on {node}"
        );
    }
    assert_clean(&inspect.audit().await, "after GC");
}

/// A port nothing listens on.
fn dead_endpoint() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("http://127.0.0.1:{port}")
}

/// Nothing listens: ADD, DEL and GC fail at once with code 11 and a message naming the
/// endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_etcd_is_code_11_naming_the_endpoint() {
    // Needs no etcd: only the plugin.
    let endpoint = dead_endpoint();
    let net = Net::new(
        "down",
        "10.84.0.0/24",
        26,
        "n0",
        &endpoint,
        "/cnkt-down",
        5_000,
    );
    for (what, out) in [
        ("ADD", net.add("c1").await),
        ("DEL", net.del("c1").await),
        ("GC", net.gc(&[]).await),
    ] {
        let e = out.error(what);
        eprintln!("{what} against {endpoint}: {e}");
        assert_eq!(e.code, 11, "{what}: {e}");
        assert!(
            e.msg.contains(&endpoint),
            "{what}: the message names the endpoint: {e}"
        );
        assert!(
            e.details.contains("refused"),
            "{what}: the details say why: {e}"
        );
    }
}

/// Something accepts connections but never answers: ADD ends with code 11 after its
/// deadline instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_etcd_times_out_with_code_11() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let net = Net::new(
        "silent",
        "10.85.0.0/24",
        26,
        "n0",
        &endpoint,
        "/cnkt-silent",
        1_000,
    );
    for (what, out) in [("ADD", net.add("c1").await), ("DEL", net.del("c1").await)] {
        let e = out.error(what);
        eprintln!("{what} against a silent {endpoint}: {e}");
        assert_eq!(e.code, 11, "{what}: {e}");
        assert!(e.msg.contains(&endpoint), "{what}: {e}");
        assert!(
            e.msg.contains("timed out after"),
            "{what}: says it timed out: {e}"
        );
    }
    drop(listener);
}

/// etcd freezes (SIGSTOP) after serving an ADD: the next ADD times out with code 11; once it
/// runs again, ADDs succeed and the first address is still held, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_etcd_times_out_then_recovers() {
    let Some(etcd) = Etcd::start("frozen").await else {
        return;
    };
    cni::plugin_binary();
    let net = Net::new(
        "frozen",
        "10.86.0.0/24",
        26,
        "n0",
        &etcd.endpoint(),
        &etcd.prefix(),
        1_500,
    );
    let first = net.add("c1").await.ip("first ADD");
    let pid = Pid::from_raw(i32::try_from(etcd.pid().unwrap()).unwrap());
    kill(pid, Signal::SIGSTOP).unwrap();
    // Continue etcd even if an assertion below fails, so its Drop can stop it normally.
    struct Cont(Pid);
    impl Drop for Cont {
        fn drop(&mut self) {
            let _ = kill(self.0, Signal::SIGCONT);
        }
    }
    let cont = Cont(pid);
    let started = Instant::now();
    let out = net.add("c2").await;
    let e = out.error("ADD against a frozen etcd");
    eprintln!(
        "ADD against a frozen etcd: {e} after {:?}",
        started.elapsed()
    );
    assert_eq!(e.code, 11, "{e}");
    assert!(e.msg.contains("timed out after 1500 ms"), "{e}");
    drop(cont);
    let second = net.add("c2").await.ip("ADD after etcd resumed");
    assert_ne!(first, second);
    assert_eq!(
        net.add("c1").await.ip("repeated ADD"),
        first,
        "ADD is idempotent"
    );
    let inspect = Inspect::new(&etcd, &net).await;
    assert_eq!(
        inspect.allocations("n0").await,
        BTreeMap::from([("c1".to_owned(), first), ("c2".to_owned(), second)])
    );
    assert_clean(&inspect.audit().await, "after the freeze");
}

/// etcd with authentication, and the plugin logging everything it and its libraries say
/// (`trace`): neither the right password nor a wrong one appears in the log or in an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_reach_the_log_or_an_error() {
    let Some(etcd) = Etcd::start("pwlog").await else {
        return;
    };
    cni::plugin_binary();
    const PASSWORD: &str = "pw-Lk3s9Qx-never-in-a-log";
    const WRONG: &str = "wrong-Pz7c2Vb-never-in-a-log";
    let mut raw = etcd.raw_client().await.unwrap();
    raw.user_add("root", PASSWORD, None).await.unwrap();
    raw.user_grant_role("root", "root").await.unwrap();
    raw.auth_enable().await.unwrap();
    let dir = etcd.dir();
    std::fs::write(dir.join("pw"), format!("{PASSWORD}\n")).unwrap();
    std::fs::write(dir.join("bad-pw"), WRONG).unwrap();
    let log = dir.join("plugin.log");

    let mut net = Net::new(
        "pwlog",
        "10.87.0.0/24",
        26,
        "n0",
        &etcd.endpoint(),
        &etcd.prefix(),
        5_000,
    );
    net.ipam["logFile"] = serde_json::json!(log);
    net.ipam["logLevel"] = serde_json::json!("trace");
    net.ipam["store"]["username"] = serde_json::json!("root");
    net.ipam["store"]["passwordFile"] = serde_json::json!(dir.join("pw"));
    net.add("c1").await.ip("ADD with the right password");
    net.del("c1").await.expect_ok("DEL with the right password");

    let mut wrong = net.clone();
    wrong.ipam["store"]["passwordFile"] = serde_json::json!(dir.join("bad-pw"));
    let e = wrong
        .add("c2")
        .await
        .error("ADD with a wrong password")
        .clone();
    eprintln!("ADD with a wrong password: {e}");
    assert_eq!(e.code, 7, "{e}");

    let text = std::fs::read_to_string(&log).expect("the plugin's log");
    let lines = text.lines().count();
    eprintln!("{lines} log lines at trace level");
    assert!(
        text.contains("h2") || text.contains("tonic") || text.contains("hyper"),
        "the log holds the gRPC stack's trace too: {lines} lines"
    );
    for secret in [PASSWORD, WRONG] {
        assert!(!text.contains(secret), "a password is in the log");
        assert!(
            !e.to_string().contains(secret),
            "a password is in the error: {e}"
        );
    }
}
