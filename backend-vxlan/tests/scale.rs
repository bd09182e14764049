//! VXLAN with 1000 simulated peers programmed into one real node namespace (needs root;
//! skips loudly): 1000 routes, 1000 neighbours, 1000 FDB entries. Asserts the netlink
//! writes of each pass and the kernel's tables; prints how long the passes took.

#[path = "../../backend-hostgw/tests/lab/mod.rs"]
mod lab;

use std::collections::BTreeSet;
use std::time::Instant;

use backend_vxlan::{Config, Vxlan};
use cni_core::linux::NetNs;
use cni_core::registry::NodeRecord;
use cni_core::routing::CrossNodeRouting;
use lab::{Lab, cnikit_routes, scale_node, scale_peer};
use testkit::{bridge_json, ip_json};

const PEERS: usize = 1000;
const DEV: &str = "cnikit.vxlan";

type Set = BTreeSet<(String, String, String)>;

/// Routes `(block, vtep, dev)`, neighbours `(vtep, mac, "")`, FDB `(mac, dst, "")`.
fn expected(peers: &[NodeRecord]) -> (Set, Set, Set) {
    let mut sets = (Set::new(), Set::new(), Set::new());
    for p in peers {
        let (mac, vtep) = (&p.backend["vtepMac"], &p.backend["vtepAddr"]);
        for b in &p.blocks {
            sets.0.insert((b.to_string(), vtep.clone(), DEV.into()));
        }
        sets.1.insert((vtep.clone(), mac.clone(), String::new()));
        sets.2
            .insert((mac.clone(), p.address.to_string(), String::new()));
    }
    sets
}

fn unique(items: Vec<(String, String, String)>) -> Set {
    let n = items.len();
    let set: Set = items.into_iter().collect();
    assert_eq!(set.len(), n, "duplicate entries");
    set
}

fn kernel(ns: &str) -> (Set, Set, Set) {
    let routes = unique(cnikit_routes(ns));
    let neighbours = unique(
        ip_json(ns, &["neigh", "show", "dev", DEV, "nud", "permanent"])
            .iter()
            .map(|e| {
                (
                    e["dst"].as_str().unwrap_or_default().to_owned(),
                    e["lladdr"].as_str().unwrap_or_default().to_owned(),
                    String::new(),
                )
            })
            .collect(),
    );
    let fdb = unique(
        bridge_json(ns, &["fdb", "show", "dev", DEV])
            .iter()
            .filter(|e| e.get("dst").is_some())
            .map(|e| {
                (
                    e["mac"].as_str().unwrap_or_default().to_owned(),
                    e["dst"].as_str().unwrap_or_default().to_owned(),
                    String::new(),
                )
            })
            .collect(),
    );
    (routes, neighbours, fdb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_peers() {
    if !lab::root("vxlan scale test") {
        return;
    }
    let lab = Lab::new("vxs");
    let (node, local) = scale_node(&lab);
    let mut vxlan = Vxlan::new(
        Config::default(),
        NetNs::named(&node).await.expect("open node"),
    )
    .expect("config");
    vxlan.init(&local).await.expect("init");
    let mut peers: Vec<NodeRecord> = (0..PEERS as u32).map(scale_peer).collect();

    let started = Instant::now();
    let report = vxlan.reconcile(&peers).await.expect("reconcile");
    let first = started.elapsed();
    assert!(report.unroutable.is_empty(), "{:?}", report.unroutable);
    assert_eq!(report.writes, 3 * PEERS);
    assert_eq!(report.routed, PEERS);
    let (routes, neighbours, fdb) = kernel(&node);
    assert_eq!(
        (routes.len(), neighbours.len(), fdb.len()),
        (PEERS, PEERS, PEERS)
    );
    assert_eq!((routes, neighbours, fdb), expected(&peers));

    let started = Instant::now();
    assert_eq!(vxlan.reconcile(&peers).await.unwrap().writes, 0);
    let unchanged = started.elapsed();

    // One peer's device was made again (new MAC): neighbour replaced, FDB entry under the
    // new MAC, the old one deleted.
    peers[500]
        .backend
        .insert("vtepMac".into(), "0a:00:00:00:ff:01".into());
    let started = Instant::now();
    assert_eq!(vxlan.reconcile(&peers).await.unwrap().writes, 3);
    let one_changed = started.elapsed();
    assert_eq!(kernel(&node), expected(&peers));

    // One peer moves to another underlay address: its FDB entry only.
    peers[600].address = "172.16.9.9".parse().unwrap();
    assert_eq!(vxlan.reconcile(&peers).await.unwrap().writes, 1);
    assert_eq!(kernel(&node), expected(&peers));

    // One peer gets another block, so another VTEP address: route and neighbour added,
    // the old ones deleted.
    peers[700].blocks = vec!["10.200.0.0/26".parse().unwrap()];
    peers[700]
        .backend
        .insert("vtepAddr".into(), "10.200.0.0".into());
    assert_eq!(vxlan.reconcile(&peers).await.unwrap().writes, 4);
    assert_eq!(kernel(&node), expected(&peers));

    // One peer leaves: its route, neighbour and FDB entry.
    peers.pop();
    assert_eq!(vxlan.reconcile(&peers).await.unwrap().writes, 3);
    let (routes, neighbours, fdb) = kernel(&node);
    assert_eq!(
        (routes.len(), neighbours.len(), fdb.len()),
        (PEERS - 1, PEERS - 1, PEERS - 1)
    );
    assert_eq!((routes, neighbours, fdb), expected(&peers));

    let started = Instant::now();
    vxlan.teardown().await.expect("teardown");
    let teardown = started.elapsed();
    assert!(cnikit_routes(&node).is_empty());
    assert!(
        ip_json(&node, &["link", "show"])
            .iter()
            .all(|l| l["ifname"] != DEV)
    );
    eprintln!(
        "vxlan, {PEERS} peers: first reconcile {first:?} ({} writes), unchanged {unchanged:?}, \
         one peer changed {one_changed:?}, teardown {teardown:?}",
        3 * PEERS
    );
}
