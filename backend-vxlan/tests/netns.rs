//! VXLAN against the real kernel, in private namespaces (needs root; skips loudly).
//!
//! Nodes are namespaces joined by switch namespaces (and a router between two subnets);
//! each has a pod plugged in by cni-core's bridge pod network with the MTU the backend
//! leaves; the backend programs each node's namespace.

#[path = "../../backend-hostgw/tests/lab/mod.rs"]
mod lab;

use std::net::IpAddr;

use backend_vxlan::{Config, Vxlan};
use cni_core::linux::NetNs;
use cni_core::registry::NodeRecord;
use cni_core::routing::CrossNodeRouting;
use lab::{Lab, NodeDef, NodeSpec, cnikit_routes, ping, ping_once};
use serde_json::Value;
use testkit::{bridge_json, ip_json};

const DEV: &str = "cnikit.vxlan";

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Nodes with a pod each (`10.244.N.2` in block `10.244.N.0/24`, pod MTU = underlay MTU −
/// overhead), their backends initialized, and their records.
async fn cluster(
    lab: &Lab,
    config: &Config,
    nodes: &[NodeDef<'_>],
) -> (Vec<NodeSpec>, Vec<String>, Vec<Vxlan>, Vec<NodeRecord>) {
    lab::cluster(lab, nodes, |ns| {
        Vxlan::new(config.clone(), ns).expect("config")
    })
    .await
}

/// `(vtep address, MAC)` of the permanent neighbour entries on the VXLAN device.
fn neighbours(ns: &str) -> Vec<(String, String)> {
    let mut n: Vec<_> = ip_json(ns, &["neigh", "show", "dev", DEV, "nud", "permanent"])
        .iter()
        .map(|e| {
            (
                e["dst"].as_str().unwrap_or_default().to_owned(),
                e["lladdr"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    n.sort();
    n
}

/// `(MAC, dst)` of the FDB entries with a destination on the VXLAN device.
fn fdb(ns: &str) -> Vec<(String, String)> {
    let mut f: Vec<_> = bridge_json(ns, &["fdb", "show", "dev", DEV])
        .iter()
        .filter(|e| e.get("dst").is_some())
        .map(|e| {
            (
                e["mac"].as_str().unwrap_or_default().to_owned(),
                e["dst"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    f.sort();
    f
}

fn strs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_on_three_nodes_reach_each_other_through_the_tunnel() {
    if !lab::root("vxlan netns test") {
        return;
    }
    let lab = Lab::new("vx3");
    let sw = lab.switch("sw");
    let (specs, pods, mut backends, records) = cluster(
        &lab,
        &Config::default(),
        &[
            ("a", &sw, "192.168.60.11/24", None),
            ("b", &sw, "192.168.60.12/24", None),
            ("c", &sw, "192.168.60.13/24", None),
        ],
    )
    .await;

    // The device as `ip -d` shows it.
    let dev = &ip_json(&specs[0].ns, &["-d", "link", "show", "dev", DEV])[0];
    let info = &dev["linkinfo"]["info_data"];
    assert_eq!(dev["linkinfo"]["info_kind"], "vxlan");
    assert_eq!(info["id"], 1);
    assert_eq!(info["port"], 4789);
    assert_eq!(info["local"], "192.168.60.11");
    assert_eq!(info["link"], "eth0");
    assert_eq!(info["learning"], false);
    assert_eq!(dev["mtu"], 1450);
    assert!(
        dev["flags"]
            .as_array()
            .unwrap()
            .contains(&Value::from("UP"))
    );
    let data = backends[0].node_data();
    assert_eq!(
        dev["address"].as_str(),
        data.get("vtepMac").map(String::as_str)
    );
    assert_eq!(data["vtepAddr"], "10.244.1.0");
    let addrs = ip_json(&specs[0].ns, &["-4", "addr", "show", "dev", DEV]);
    assert_eq!(addrs[0]["addr_info"][0]["local"], "10.244.1.0");
    assert_eq!(addrs[0]["addr_info"][0]["prefixlen"], 32);

    for backend in &mut backends {
        let report = backend.reconcile(&records).await.expect("reconcile");
        assert_eq!(report.writes, 6, "{report:?}");
        assert_eq!(report.routed, 2);
    }
    let mac = |i: usize| records[i].backend["vtepMac"].clone();
    assert_eq!(
        cnikit_routes(&specs[0].ns),
        vec![
            ("10.244.2.0/24".into(), "10.244.2.0".into(), DEV.into()),
            ("10.244.3.0/24".into(), "10.244.3.0".into(), DEV.into()),
        ]
    );
    assert_eq!(
        neighbours(&specs[0].ns),
        vec![("10.244.2.0".into(), mac(1)), ("10.244.3.0".into(), mac(2))]
    );
    assert_eq!(
        fdb(&specs[0].ns),
        vec![
            (mac(1), "192.168.60.12".into()),
            (mac(2), "192.168.60.13".into())
        ]
    );

    assert!(ping(&pods[0], addr("10.244.2.2")), "pod a -> pod b");
    assert!(ping(&pods[0], addr("10.244.3.2")), "pod a -> pod c");
    assert!(ping(&pods[2], addr("10.244.2.2")), "pod c -> pod b");
    // A full-size pod packet (1450 bytes, DF) fits the tunnel over the 1500-byte underlay.
    assert!(
        ping_once(&pods[0], addr("10.244.2.2"), &["-M", "do", "-s", "1422"]),
        "1450-byte packet with DF"
    );
    assert_eq!(backends[0].reconcile(&records).await.unwrap().writes, 0);

    // c leaves a's desired set: its route, neighbour and FDB entry go, nothing else.
    let report = backends[0].reconcile(&records[..2]).await.unwrap();
    assert_eq!(report.writes, 3);
    assert_eq!(
        cnikit_routes(&specs[0].ns),
        vec![("10.244.2.0/24".into(), "10.244.2.0".into(), DEV.into())]
    );
    assert_eq!(
        neighbours(&specs[0].ns),
        vec![("10.244.2.0".into(), mac(1))]
    );
    assert_eq!(fdb(&specs[0].ns), vec![(mac(1), "192.168.60.12".into())]);
    assert!(
        !ping_once(&pods[0], addr("10.244.3.2"), &[]),
        "c is no longer routed"
    );
    assert!(ping(&pods[0], addr("10.244.2.2")), "b still is");
    assert_eq!(backends[0].reconcile(&records).await.unwrap().writes, 3);
    assert!(ping(&pods[0], addr("10.244.3.2")), "pod a -> pod c again");

    // A restarted agent adopts the device as it is: same index, same MAC, no writes.
    let index = ip_json(&specs[0].ns, &["link", "show", "dev", DEV])[0]["ifindex"].clone();
    let mut restarted =
        Vxlan::new(Config::default(), NetNs::named(&specs[0].ns).await.unwrap()).unwrap();
    restarted.init(&specs[0].local).await.unwrap();
    assert_eq!(restarted.node_data(), backends[0].node_data());
    assert_eq!(
        ip_json(&specs[0].ns, &["link", "show", "dev", DEV])[0]["ifindex"],
        index
    );
    assert_eq!(restarted.reconcile(&records).await.unwrap().writes, 0);

    for backend in &mut backends {
        backend.teardown().await.expect("teardown");
        backend.teardown().await.expect("teardown again");
    }
    for spec in &specs {
        let links = ip_json(&spec.ns, &["link", "show"]);
        assert!(links.iter().all(|l| l["ifname"] != DEV));
        assert!(cnikit_routes(&spec.ns).is_empty());
    }
}

async fn across_a_router(tag: &str, direct_routing: bool) {
    let lab = Lab::new(tag);
    let (s1, s2) = (lab.switch("s1"), lab.switch("s2"));
    lab.router("r", &[(&s1, "192.168.61.1/24"), (&s2, "192.168.62.1/24")]);
    let config = Config {
        direct_routing,
        ..Config::default()
    };
    let (specs, pods, mut backends, records) = cluster(
        &lab,
        &config,
        &[
            ("a", &s1, "192.168.61.11/24", Some("192.168.61.1")),
            ("b", &s1, "192.168.61.12/24", Some("192.168.61.1")),
            ("c", &s2, "192.168.62.13/24", Some("192.168.62.1")),
        ],
    )
    .await;
    for backend in &mut backends {
        let report = backend.reconcile(&records).await.expect("reconcile");
        assert_eq!(report.routed, 2, "{report:?}");
        assert!(report.unroutable.is_empty());
    }
    let c_mac = records[2].backend["vtepMac"].clone();
    if direct_routing {
        // b shares a's subnet: a plain route through eth0, no tunnel entries.
        assert_eq!(
            cnikit_routes(&specs[0].ns),
            vec![
                (
                    "10.244.2.0/24".into(),
                    "192.168.61.12".into(),
                    "eth0".into()
                ),
                ("10.244.3.0/24".into(), "10.244.3.0".into(), DEV.into()),
            ]
        );
        assert_eq!(neighbours(&specs[0].ns), strs(&[("10.244.3.0", &c_mac)]));
        assert_eq!(fdb(&specs[0].ns), strs(&[(&c_mac, "192.168.62.13")]));
    } else {
        assert_eq!(neighbours(&specs[0].ns).len(), 2);
        assert_eq!(fdb(&specs[0].ns).len(), 2);
        assert!(cnikit_routes(&specs[0].ns).iter().all(|r| r.2 == DEV));
    }
    assert!(ping(&pods[0], addr("10.244.2.2")), "pod a -> pod b");
    assert!(
        ping(&pods[0], addr("10.244.3.2")),
        "pod a -> pod c, across the router"
    );
    assert!(
        ping(&pods[2], addr("10.244.2.2")),
        "pod c -> pod b, across the router"
    );
    for backend in &mut backends {
        backend.teardown().await.expect("teardown");
    }
    assert!(cnikit_routes(&specs[0].ns).is_empty());
    assert!(!ping_once(&pods[0], addr("10.244.3.2"), &[]), "torn down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_crosses_routed_underlay_subnets() {
    if !lab::root("vxlan netns test") {
        return;
    }
    across_a_router("vxr", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_routing_tunnels_only_across_subnets() {
    if !lab::root("vxlan netns test") {
        return;
    }
    across_a_router("vxd", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_device_replaces_the_old_one() {
    if !lab::root("vxlan netns test") {
        return;
    }
    let lab = Lab::new("vxn");
    let sw = lab.switch("sw");
    let (specs, pods, mut backends, records) = cluster(
        &lab,
        &Config::default(),
        &[
            ("a", &sw, "192.168.61.11/24", None),
            ("b", &sw, "192.168.61.12/24", None),
        ],
    )
    .await;
    for backend in &mut backends {
        backend.reconcile(&records).await.expect("reconcile");
    }
    assert!(ping(&pods[0], addr("10.244.2.2")), "pod a -> pod b");

    // The agent of a restarts with another device name: same VNI, port and underlay.
    const NEW: &str = "cnikit.vx2";
    let config = Config {
        device: NEW.into(),
        ..Config::default()
    };
    let mut renamed = Vxlan::new(config, NetNs::named(&specs[0].ns).await.unwrap()).unwrap();
    renamed
        .init(&specs[0].local)
        .await
        .expect("init under the new name");
    let names: Vec<_> = ip_json(&specs[0].ns, &["link", "show"])
        .iter()
        .map(|l| l["ifname"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(names.iter().any(|n| n == NEW), "{names:?}");
    assert!(names.iter().all(|n| n != DEV), "old device left: {names:?}");
    renamed.reconcile(&records).await.expect("reconcile");
    assert_eq!(
        cnikit_routes(&specs[0].ns),
        vec![("10.244.2.0/24".into(), "10.244.2.0".into(), NEW.into())]
    );
    assert!(ping(&pods[0], addr("10.244.2.2")), "through the new device");
    renamed.teardown().await.expect("teardown");
    backends[1].teardown().await.expect("teardown");
    assert!(cnikit_routes(&specs[0].ns).is_empty());
}
