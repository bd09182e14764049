//! host-gw against the real kernel, in private namespaces (needs root; skips loudly).
//!
//! Nodes are namespaces joined by a switch namespace; each has a pod plugged in by
//! cni-core's bridge pod network; the backend programs each node's namespace.

mod lab;

use std::net::IpAddr;

use backend_hostgw::HostGw;
use cni_core::registry::NodeRecord;
use cni_core::routing::CrossNodeRouting;
use lab::{Lab, NodeDef, NodeSpec, cnikit_routes, ping, ping_once};
use testkit::ip_json;

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Nodes with a pod each (`10.244.N.2` in block `10.244.N.0/24`), their backends
/// initialized, and their records.
async fn cluster(
    lab: &Lab,
    nodes: &[NodeDef<'_>],
) -> (Vec<NodeSpec>, Vec<String>, Vec<HostGw>, Vec<NodeRecord>) {
    lab::cluster(lab, nodes, HostGw::new).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_on_three_nodes_reach_each_other() {
    if !lab::root("host-gw netns test") {
        return;
    }
    let lab = Lab::new("hg3");
    let sw = lab.switch("sw");
    let (specs, pods, mut backends, records) = cluster(
        &lab,
        &[
            ("a", &sw, "192.168.50.11/24", None),
            ("b", &sw, "192.168.50.12/24", None),
            ("c", &sw, "192.168.50.13/24", None),
        ],
    )
    .await;

    for backend in &mut backends {
        let report = backend.reconcile(&records).await.expect("reconcile");
        assert_eq!(report.writes, 2, "{report:?}");
        assert_eq!(report.routed, 2);
        assert!(report.unroutable.is_empty());
    }
    assert_eq!(
        cnikit_routes(&specs[0].ns),
        vec![
            (
                "10.244.2.0/24".into(),
                "192.168.50.12".into(),
                "eth0".into()
            ),
            (
                "10.244.3.0/24".into(),
                "192.168.50.13".into(),
                "eth0".into()
            ),
        ]
    );
    assert!(ping(&pods[0], addr("10.244.2.2")), "pod a -> pod b");
    assert!(ping(&pods[0], addr("10.244.3.2")), "pod a -> pod c");
    assert!(ping(&pods[1], addr("10.244.3.2")), "pod b -> pod c");
    // Nothing changed: nothing written.
    assert_eq!(backends[0].reconcile(&records).await.unwrap().writes, 0);

    // c leaves a's desired set: exactly its route goes, and a's pod cannot reach c's.
    let report = backends[0].reconcile(&records[..2]).await.unwrap();
    assert_eq!(report.writes, 1);
    assert_eq!(
        cnikit_routes(&specs[0].ns),
        vec![(
            "10.244.2.0/24".into(),
            "192.168.50.12".into(),
            "eth0".into()
        )]
    );
    assert!(
        !ping_once(&pods[0], addr("10.244.3.2"), &[]),
        "c is no longer routed"
    );
    assert!(ping(&pods[0], addr("10.244.2.2")), "b still is");

    // c comes back.
    assert_eq!(backends[0].reconcile(&records).await.unwrap().writes, 1);
    assert!(ping(&pods[0], addr("10.244.3.2")), "pod a -> pod c again");

    for backend in &mut backends {
        backend.teardown().await.expect("teardown");
        backend.teardown().await.expect("teardown again");
    }
    for spec in &specs {
        assert!(cnikit_routes(&spec.ns).is_empty());
        // The node's own routes (connected subnet, bridge) are still there.
        let routes = ip_json(&spec.ns, &["route", "show"]);
        assert!(routes.iter().any(|r| r["dst"] == "192.168.50.0/24"));
        assert!(routes.iter().any(|r| r["dev"] == "cnikit0"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_behind_a_router_is_reported_not_routed() {
    if !lab::root("host-gw netns test") {
        return;
    }
    let lab = Lab::new("hgr");
    let (s1, s2) = (lab.switch("s1"), lab.switch("s2"));
    lab.router("r", &[(&s1, "192.168.51.1/24"), (&s2, "192.168.52.1/24")]);
    let (specs, pods, mut backends, records) = cluster(
        &lab,
        &[
            ("a", &s1, "192.168.51.11/24", Some("192.168.51.1")),
            ("b", &s1, "192.168.51.12/24", Some("192.168.51.1")),
            ("c", &s2, "192.168.52.13/24", Some("192.168.52.1")),
        ],
    )
    .await;

    let report = backends[0].reconcile(&records).await.unwrap();
    assert_eq!(report.routed, 1);
    assert_eq!(report.writes, 1);
    let reason = report.unroutable.get("c").expect("c is reported");
    assert!(
        reason.contains("192.168.52.13") && reason.contains("192.168.51.0/24"),
        "{reason}"
    );
    assert_eq!(
        cnikit_routes(&specs[0].ns),
        vec![(
            "10.244.2.0/24".into(),
            "192.168.51.12".into(),
            "eth0".into()
        )]
    );
    backends[1].reconcile(&records).await.unwrap();
    let report = backends[2].reconcile(&records).await.unwrap();
    assert_eq!(
        report.unroutable.keys().collect::<Vec<_>>(),
        vec!["a", "b"],
        "c sees both others off-link"
    );
    assert!(cnikit_routes(&specs[2].ns).is_empty());

    assert!(
        ping(&pods[0], addr("10.244.2.2")),
        "pod a -> pod b, same segment"
    );
    // The underlay itself works across the router; c's pods are just not routed.
    assert!(
        ping(&specs[0].ns, addr("192.168.52.13")),
        "node a -> node c"
    );
    assert!(
        !ping_once(&pods[0], addr("10.244.3.2"), &[]),
        "pod a -> pod c"
    );

    for backend in &mut backends {
        backend.teardown().await.unwrap();
    }
    let defaults = ip_json(&specs[0].ns, &["route", "show", "default"]);
    assert_eq!(
        defaults.len(),
        1,
        "the node's default route is not ours to remove"
    );
}
