//! IPIP with 1000 simulated peers programmed into one real node namespace (needs root and a
//! kernel with ipip: runs in the test VM when this one has none; skips loudly without root).
//! Asserts the netlink writes of each pass and the kernel's table; prints how long the passes
//! took.

#[path = "../../backend-hostgw/tests/lab/mod.rs"]
mod lab;

use std::collections::BTreeSet;
use std::time::Instant;

use backend_ipip::{Config, DEFAULT_DEVICE, Ipip, Mode};
use cni_core::linux::NetNs;
use cni_core::registry::NodeRecord;
use cni_core::routing::CrossNodeRouting;
use lab::{Lab, cnikit_routes, scale_node, scale_peer};
use testkit::ip_json;

const PEERS: usize = 1000;

type Set = BTreeSet<(String, String, String)>;

/// `(block, peer underlay address, device)`: through the tunnel, or through `eth0` for
/// the peers `direct` says.
fn expected(peers: &[NodeRecord], direct: impl Fn(&NodeRecord) -> bool) -> Set {
    peers
        .iter()
        .flat_map(|p| {
            let dev = if direct(p) { "eth0" } else { DEFAULT_DEVICE };
            p.blocks
                .iter()
                .map(move |b| (b.to_string(), p.address.to_string(), dev.to_owned()))
        })
        .collect()
}

fn tunnelled(peers: &[NodeRecord]) -> Set {
    expected(peers, |_| false)
}

fn kernel(ns: &str) -> Set {
    let routes = cnikit_routes(ns);
    let set: Set = routes.iter().cloned().collect();
    assert_eq!(set.len(), routes.len(), "duplicate routes");
    set
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_peers() {
    const NAME: &str = "a_thousand_peers";
    if !lab::root(NAME) || !testkit::vm::here_or_in_vm(NAME, "ipip") {
        return;
    }
    let lab = Lab::new("ips");
    let (node, local) = scale_node(&lab);
    let mut ipip = Ipip::new(
        Config::default(),
        NetNs::named(&node).await.expect("open node"),
    )
    .expect("config");
    ipip.init(&local).await.expect("init");
    let mut peers: Vec<NodeRecord> = (0..PEERS as u32).map(scale_peer).collect();

    let started = Instant::now();
    let report = ipip.reconcile(&peers).await.expect("reconcile");
    let first = started.elapsed();
    assert!(report.unroutable.is_empty(), "{:?}", report.unroutable);
    assert_eq!(report.writes, PEERS);
    assert_eq!(report.routed, PEERS);
    assert_eq!(kernel(&node).len(), PEERS);
    assert_eq!(kernel(&node), tunnelled(&peers));

    let started = Instant::now();
    assert_eq!(ipip.reconcile(&peers).await.unwrap().writes, 0);
    let unchanged = started.elapsed();

    // One peer moves to another underlay address: its route only, replaced.
    peers[500].address = "172.16.9.9".parse().unwrap();
    let started = Instant::now();
    assert_eq!(ipip.reconcile(&peers).await.unwrap().writes, 1);
    let one_changed = started.elapsed();
    assert_eq!(kernel(&node), tunnelled(&peers));

    // One peer gets another block: the new route added, the old one deleted.
    peers[700].blocks = vec!["10.200.0.0/26".parse().unwrap()];
    assert_eq!(ipip.reconcile(&peers).await.unwrap().writes, 2);
    assert_eq!(kernel(&node), tunnelled(&peers));

    // One peer leaves: its route.
    peers.pop();
    assert_eq!(ipip.reconcile(&peers).await.unwrap().writes, 1);
    assert_eq!(kernel(&node).len(), PEERS - 1);
    assert_eq!(kernel(&node), tunnelled(&peers));

    // The same node in crossSubnet mode: every peer (all in 172.16.0.0/16) becomes a direct
    // route; then one moves out of the subnet and only its route goes back into the tunnel.
    let mut cross = Ipip::new(
        Config {
            mode: Mode::CrossSubnet,
            ..Config::default()
        },
        NetNs::named(&node).await.expect("open node"),
    )
    .expect("config");
    cross.init(&local).await.expect("init");
    assert_eq!(cross.reconcile(&peers).await.unwrap().writes, PEERS - 1);
    assert_eq!(kernel(&node), expected(&peers, |_| true));
    peers[100].address = "172.31.0.100".parse().unwrap();
    assert_eq!(cross.reconcile(&peers).await.unwrap().writes, 1);
    let moved = peers[100].name.clone();
    assert_eq!(kernel(&node), expected(&peers, |p| p.name != moved));

    let started = Instant::now();
    cross.teardown().await.expect("teardown");
    let teardown = started.elapsed();
    assert!(cnikit_routes(&node).is_empty());
    assert!(
        ip_json(&node, &["link", "show"])
            .iter()
            .all(|l| l["ifname"] != DEFAULT_DEVICE)
    );
    eprintln!(
        "ipip, {PEERS} peers: first reconcile {first:?} ({PEERS} writes), unchanged \
         {unchanged:?}, one peer changed {one_changed:?} (1 write), teardown {teardown:?}"
    );
}
