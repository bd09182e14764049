//! host-gw with 1000 simulated peers programmed into one real node namespace (needs root;
//! skips loudly). Asserts the netlink writes of each pass and the kernel's table;
//! prints how long the passes took.

mod lab;

use std::collections::BTreeSet;
use std::time::Instant;

use backend_hostgw::HostGw;
use cni_core::linux::NetNs;
use cni_core::registry::NodeRecord;
use cni_core::routing::CrossNodeRouting;
use lab::{Lab, cnikit_routes, scale_node, scale_peer};

const PEERS: u32 = 1000;

fn expected(peers: &[NodeRecord]) -> BTreeSet<(String, String, String)> {
    peers
        .iter()
        .flat_map(|p| {
            p.blocks
                .iter()
                .map(|b| (b.to_string(), p.address.to_string(), "eth0".to_owned()))
        })
        .collect()
}

fn kernel(ns: &str) -> BTreeSet<(String, String, String)> {
    let routes = cnikit_routes(ns);
    let set: BTreeSet<_> = routes.iter().cloned().collect();
    assert_eq!(set.len(), routes.len(), "duplicate routes");
    set
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_peers() {
    if !lab::root("host-gw scale test") {
        return;
    }
    let lab = Lab::new("hgs");
    let (node, local) = scale_node(&lab);
    let mut hostgw = HostGw::new(NetNs::named(&node).await.expect("open node"));
    hostgw.init(&local).await.expect("init");
    let mut peers: Vec<NodeRecord> = (0..PEERS).map(scale_peer).collect();

    let started = Instant::now();
    let report = hostgw.reconcile(&peers).await.expect("reconcile");
    let first = started.elapsed();
    assert_eq!(report.writes, PEERS as usize);
    assert_eq!(report.routed, PEERS as usize);
    assert!(report.unroutable.is_empty(), "{:?}", report.unroutable);
    assert_eq!(kernel(&node).len(), PEERS as usize);
    assert_eq!(kernel(&node), expected(&peers));

    let started = Instant::now();
    assert_eq!(hostgw.reconcile(&peers).await.unwrap().writes, 0);
    let unchanged = started.elapsed();

    // One peer moves to another address: one route replaced.
    peers[500].address = "172.16.9.9".parse().unwrap();
    let started = Instant::now();
    assert_eq!(hostgw.reconcile(&peers).await.unwrap().writes, 1);
    let one_changed = started.elapsed();
    assert_eq!(kernel(&node), expected(&peers));

    // One peer gets another block: one added, one deleted.
    peers[700].blocks = vec!["10.200.0.0/26".parse().unwrap()];
    assert_eq!(hostgw.reconcile(&peers).await.unwrap().writes, 2);
    assert_eq!(kernel(&node), expected(&peers));

    // One peer leaves: one deleted.
    peers.pop();
    assert_eq!(hostgw.reconcile(&peers).await.unwrap().writes, 1);
    assert_eq!(kernel(&node), expected(&peers));
    assert_eq!(kernel(&node).len(), PEERS as usize - 1);

    let started = Instant::now();
    hostgw.teardown().await.expect("teardown");
    let teardown = started.elapsed();
    assert!(kernel(&node).is_empty());
    eprintln!(
        "host-gw, {PEERS} peers: first reconcile {first:?} ({PEERS} writes), unchanged \
         {unchanged:?}, one peer changed {one_changed:?}, teardown {teardown:?}"
    );
}
