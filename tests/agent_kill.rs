//! The `cnikit-agent` binary (`host-gw`) killed with SIGKILL in the middle of a reconcile:
//! the peer set changes while it is dead, and the restarted agent converges on exactly the
//! new set: one route per live peer block, none for a peer that left, one blackhole route
//! and one node record for itself, one block, no duplicate anywhere.
//!
//! The node is a namespace of the test with a veth uplink `eth0` (172.29.0.1/16); the peers
//! are records in the shared file store, on-link on that subnet. Needs root and the example
//! binary (`cargo build -p cnikit --example cnikit-agent`); skips loudly otherwise.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cni_core::ipam::block::DEFAULT_KEY_PREFIX;
use cni_core::registry::{NodeRecord, NodeRegistry, StoreRegistry};
use cni_core::store::{FileStore, Store};
use ipnet::IpNet;
use serde_json::json;
use testkit::{AgentProcess, Namespaces, agent_binary, ip, ip_json};

const BUILD_AGENT: &str = "cargo build -p cnikit --example cnikit-agent";
const WAIT: Duration = Duration::from_secs(60);
/// Enough peers that programming their routes takes a while.
const PEERS: u32 = 300;
const NODE: &str = "killed";

fn peer_name(i: u32) -> String {
    format!("peer-{i}")
}

fn peer_address(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 29, 1, 0)) + i))
}

fn peer_block(i: u32) -> IpNet {
    let base = u32::from(Ipv4Addr::new(10, 200, 0, 0)) + i * 64;
    IpNet::new(IpAddr::V4(Ipv4Addr::from(base)), 26).expect("a /26")
}

fn peer(i: u32) -> NodeRecord {
    NodeRecord {
        name: peer_name(i),
        address: peer_address(i),
        prefix_len: 16,
        blocks: vec![peer_block(i)],
        backend: Default::default(),
    }
}

/// The gateway routes the agent programmed for peers: (block, via).
fn peer_routes(ns: &str) -> Vec<(String, String)> {
    let mut routes: Vec<(String, String)> = ip_json(ns, &["route", "show", "dev", "eth0"])
        .iter()
        .filter_map(|r| {
            let via = r["gateway"].as_str()?;
            Some((r["dst"].as_str()?.to_owned(), via.to_owned()))
        })
        .collect();
    routes.sort();
    routes
}

fn blackholes(ns: &str) -> Vec<String> {
    let mut routes: Vec<String> = ip_json(ns, &["route", "show", "type", "blackhole"])
        .iter()
        .filter_map(|r| r["dst"].as_str().map(str::to_owned))
        .collect();
    routes.sort();
    routes
}

fn expected(peers: &BTreeSet<u32>) -> Vec<(String, String)> {
    let mut routes: Vec<(String, String)> = peers
        .iter()
        .map(|i| (peer_block(*i).to_string(), peer_address(*i).to_string()))
        .collect();
    routes.sort();
    routes
}

/// Waits for the first peer route the agent adds (from `ip monitor`), then SIGKILLs it:
/// the agent dies with its first reconcile under way. Returns how many peer routes it
/// had programmed by then.
fn kill_mid_reconcile(agent: &mut AgentProcess, ns: &str) -> usize {
    let mut monitor = Command::new("ip")
        .args(["-n", ns, "monitor", "route"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ip monitor");
    let lines = BufReader::new(monitor.stdout.take().expect("monitor stdout"));
    for line in lines.lines() {
        let line = line.expect("monitor output");
        if line.contains("via 172.29.") {
            agent.kill();
            break;
        }
    }
    let _ = monitor.kill();
    let _ = monitor.wait();
    peer_routes(ns).len()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_reconcile_then_restart_converges_without_duplicates_or_stale_routes() {
    let test = "sigkill_mid_reconcile_then_restart_converges_without_duplicates_or_stale_routes";
    let Some(bin) = agent_binary(test, BUILD_AGENT) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let namespaces = Namespaces::new("akill");
    let ns = namespaces.add("node");
    ip(&ns, &["link", "set", "lo", "up"]);
    // The uplink: a veth whose other end lies in a namespace of its own.
    let up = namespaces.add("up");
    ip(
        &up,
        &[
            "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ],
    );
    ip(&up, &["link", "set", "up0", "up"]);
    ip(&ns, &["addr", "add", "172.29.0.1/16", "dev", "eth0"]);
    ip(&ns, &["link", "set", "eth0", "up"]);

    let store_dir = dir.path().join("store");
    let data = dir.path().join("data");
    let conflist = dir.path().join("net.conflist");
    std::fs::write(
        &conflist,
        serde_json::to_vec_pretty(&json!({
            "cniVersion": "1.1.0",
            "name": "killnet",
            "plugins": [{
                "type": "cnikit",
                "nodeName": NODE,
                "dataDir": data,
                "routing": "host-gw",
                "agent": {"interface": "eth0", "ttlSeconds": 30, "resyncSeconds": 1},
                "ipam": {
                    "type": "cnikit-ipam",
                    "pool": "10.252.0.0/16",
                    "blockSize": 26,
                    "store": {"type": "file", "path": store_dir},
                },
            }],
        }))
        .expect("json"),
    )
    .expect("conflist");
    let log = dir.path().join("agent.log");

    let store: Arc<dyn Store> = Arc::new(FileStore::new(&store_dir));
    let registry = StoreRegistry::with_prefix(store.clone(), DEFAULT_KEY_PREFIX);
    let ttl = Duration::from_secs(3600);
    let mut live: BTreeSet<u32> = (0..PEERS).collect();
    for i in &live {
        registry
            .register(&peer(*i), ttl)
            .await
            .expect("register a peer");
    }

    let mut agent = AgentProcess::start(&bin, &ns, &conflist, &log);
    let programmed = kill_mid_reconcile(&mut agent, &ns);
    eprintln!("agent killed with {programmed} of {PEERS} peer routes programmed");
    assert!(
        programmed < PEERS as usize,
        "the kill came after the reconcile ({programmed} routes): not mid-reconcile"
    );

    // While it is dead: a third of the peers leave, new ones join.
    for i in (0..PEERS).step_by(3) {
        registry
            .deregister(&peer_name(i))
            .await
            .expect("a peer leaves");
        live.remove(&i);
    }
    for i in PEERS..PEERS + 30 {
        registry
            .register(&peer(i), ttl)
            .await
            .expect("a peer joins");
        live.insert(i);
    }

    let mut agent = AgentProcess::start(&bin, &ns, &conflist, &log);
    let want = expected(&live);
    wait_until("the restarted agent to converge", || {
        peer_routes(&ns) == want
    });

    // Converged exactly: no stale route, no duplicate, one block, one record, one blackhole.
    let routes = peer_routes(&ns);
    assert_eq!(routes, want);
    let dsts: BTreeSet<&String> = routes.iter().map(|(d, _)| d).collect();
    assert_eq!(dsts.len(), routes.len(), "one route per block");
    let nodes = registry.list().await.expect("registry").nodes;
    let ours: Vec<&NodeRecord> = nodes.iter().filter(|n| n.name == NODE).collect();
    assert_eq!(ours.len(), 1, "one record for the node: {ours:?}");
    assert_eq!(
        ours[0].blocks.len(),
        1,
        "one block after the restart: {ours:?}"
    );
    assert_eq!(
        blackholes(&ns),
        vec![ours[0].blocks[0].to_string()],
        "one blackhole route, for the node's block"
    );
    assert_eq!(
        nodes.len(),
        live.len() + 1,
        "the registry holds the live peers and the node"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("node-state.json")).expect("state"))
            .expect("state json");
    let peers: BTreeSet<String> = state["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .map(|p| p.as_str().expect("a name").to_owned())
        .collect();
    let want_peers: BTreeSet<String> = live.iter().map(|i| peer_name(*i)).collect();
    assert_eq!(peers, want_peers, "the node state lists the live peers");

    assert!(
        agent.stop(),
        "clean stop after the restart; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        peer_routes(&ns).is_empty(),
        "a clean stop removes the routes"
    );
}
