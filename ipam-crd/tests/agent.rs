//! Three `cnikit-agent` processes (`host-gw`) whose IPAM and node registry are the
//! Kubernetes API find each other and program routes to each other's blocks; a node that
//! stops cleanly (deregisters) and a node that is killed (its Lease expires) both lose
//! their routes on the others, and the survivor prunes what the killed node left.
//!
//! The API server runs with its own etcd in a namespace of the test (`testkit::kube`); that
//! namespace holds the underlay bridge `br0` (10.98.0.254/24), each node is a namespace with
//! a veth `eth0` on it (10.98.0.N/24) and a route to the server's address. Needs root, the
//! kube-apiserver binary and the example binary built with the `kubernetes` feature
//! (`cargo build -p cnikit --examples --all-features`); skips loudly otherwise.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use cni_core::registry::NodeRegistry;
use ipam_crd::resources::NetworkNode;
use ipam_crd::{Config, KubeRegistry};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use serde_json::json;
use testkit::kube::{ADVERTISE, KubeApi};
use testkit::{AgentProcess, Namespaces, agent_binary, ip, ip_json};

const BUILD_AGENT: &str = "cargo build -p cnikit --examples --all-features";
const WAIT: Duration = Duration::from_secs(90);

/// The gateway routes on `eth0` of `ns`: (block, via).
fn peer_routes(ns: &str) -> BTreeSet<(String, String)> {
    ip_json(ns, &["route", "show", "dev", "eth0"])
        .iter()
        .filter_map(|r| {
            let via = r["gateway"].as_str()?;
            let dst = r["dst"].as_str()?;
            (dst != ADVERTISE).then(|| (dst.to_owned(), via.to_owned()))
        })
        .collect()
}

async fn wait_until(what: &str, logs: &[PathBuf], mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond().await {
        if Instant::now() > deadline {
            let logs: Vec<String> = logs
                .iter()
                .map(|l| {
                    format!(
                        "{}:\n{}",
                        l.display(),
                        std::fs::read_to_string(l).unwrap_or_default()
                    )
                })
                .collect();
            panic!(
                "timed out waiting for {what}; agent logs:\n{}",
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_on_the_kubernetes_store_route_to_each_other() {
    let test = "agents_on_the_kubernetes_store_route_to_each_other";
    if !testkit::root(test) {
        return;
    }
    let Some(bin) = agent_binary(test, BUILD_AGENT) else {
        return;
    };
    let Some(api) = KubeApi::start(test, "kagent").await else {
        return;
    };
    api.install_crds(&ipam_crd::resources::crds()).await;
    let client = api.client().await;
    let records: Api<NetworkNode> = Api::all(client.clone());

    // The underlay: a bridge in the server's namespace, a veth per node.
    let hub = api.netns().to_owned();
    ip(&hub, &["link", "add", "br0", "type", "bridge"]);
    ip(&hub, &["addr", "add", "10.98.0.254/24", "dev", "br0"]);
    ip(&hub, &["link", "set", "br0", "up"]);
    let namespaces = Namespaces::new("kagn");
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<(String, String)> = (1..=3)
        .map(|i| {
            let ns = namespaces.add(&format!("n{i}"));
            ip(&ns, &["link", "set", "lo", "up"]);
            ip(
                &ns,
                &[
                    "link",
                    "add",
                    "eth0",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &format!("v{i}"),
                    "netns",
                    &hub,
                ],
            );
            ip(
                &hub,
                &["link", "set", &format!("v{i}"), "master", "br0", "up"],
            );
            ip(
                &ns,
                &["addr", "add", &format!("10.98.0.{i}/24"), "dev", "eth0"],
            );
            ip(&ns, &["link", "set", "eth0", "up"]);
            ip(&ns, &["route", "add", ADVERTISE, "via", "10.98.0.254"]);
            (format!("node-{i}"), ns)
        })
        .collect();

    let mut agents = Vec::new();
    let mut logs = Vec::new();
    for (name, ns) in &nodes {
        let conflist = dir.path().join(format!("{name}.conflist"));
        std::fs::write(
            &conflist,
            serde_json::to_vec_pretty(&json!({
                "cniVersion": "1.1.0",
                "name": "kubenet",
                "plugins": [{
                    "type": "cnikit",
                    "nodeName": name,
                    "dataDir": dir.path().join(name),
                    "routing": "host-gw",
                    "agent": {"interface": "eth0", "ttlSeconds": 3, "resyncSeconds": 2},
                    "ipam": {
                        "type": "cnikit-ipam",
                        "pool": "10.253.0.0/16",
                        "blockSize": 26,
                        "store": {"type": "kubernetes", "kubeconfig": api.remote_kubeconfig()},
                    },
                }],
            }))
            .unwrap(),
        )
        .unwrap();
        let log = dir.path().join(format!("{name}.log"));
        agents.push(AgentProcess::start(&bin, ns, &conflist, &log));
        logs.push(log);
    }

    // Every node routes every other node's block via its underlay address.
    let mut config = Config::new(Some(api.kubeconfig()));
    config.timeout_ms = 60_000;
    let registry = KubeRegistry::new(client.clone(), &config);
    // The peers' blocks and addresses, from their NetworkNode objects: unlike the registry's
    // list, not filtered by liveness, which a 3 s lease on a loaded machine can lapse for a
    // moment between renewals.
    let expected = async |peers: &[&str]| -> BTreeSet<(String, String)> {
        let mut want = BTreeSet::new();
        for peer in peers {
            // Absent: never written yet, or pruned after a long stall (the route waits
            // then fail naming what they miss).
            let Some(node) = records.get_opt(&format!("cnikit.{peer}")).await.unwrap() else {
                continue;
            };
            for block in &node.spec.blocks {
                want.insert((block.clone(), node.spec.address.clone()));
            }
        }
        want
    };
    let all = ["node-1", "node-2", "node-3"];
    wait_until("three live nodes", &logs, async || {
        registry.list().await.unwrap().nodes.len() == 3
    })
    .await;
    for (name, ns) in &nodes {
        let peers: Vec<&str> = all.iter().copied().filter(|n| n != name).collect();
        let want = expected(&peers).await;
        assert_eq!(want.len(), 2, "one block per peer: {want:?}");
        wait_until(
            &format!("{name}'s routes to {peers:?}"),
            &logs,
            async || peer_routes(ns) == want,
        )
        .await;
    }
    let ping = Command::new("ip")
        .args([
            "netns",
            "exec",
            &nodes[0].1,
            "ping",
            "-c1",
            "-W5",
            "10.98.0.2",
        ])
        .output()
        .unwrap();
    assert!(ping.status.success(), "the underlay works");

    // node-3 stops cleanly: it deregisters, the others drop its routes.
    let node3_blocks = expected(&["node-3"]).await;
    assert!(!node3_blocks.is_empty(), "node-3 published its block");
    assert!(agents[2].stop(), "node-3 stops cleanly");
    assert!(records.get_opt("cnikit.node-3").await.unwrap().is_none());
    for (_, ns) in &nodes[..2] {
        wait_until("node-3's routes gone", &logs, async || {
            peer_routes(ns).is_disjoint(&node3_blocks)
        })
        .await;
    }
    assert!(
        peer_routes(&nodes[2].1).is_empty(),
        "a clean stop removes node-3's routes"
    );

    // node-2 is killed: no deregistration; its Lease expires and node-1 drops its route.
    let node2_blocks = expected(&["node-2"]).await;
    agents[1].kill();
    wait_until("node-2's lease to expire on node-1", &logs, async || {
        peer_routes(&nodes[0].1).is_empty()
    })
    .await;
    assert!(!node2_blocks.is_empty());
    // node-1, the only live node, prunes what node-2 left once its Lease has been expired
    // for a whole TTL more (at a resync, every 2 s here).
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    wait_until(
        "node-1 to prune node-2's record and Lease",
        &logs,
        async || {
            records.get_opt("cnikit.node-2").await.unwrap().is_none()
                && leases.get_opt("cnikit.node-2").await.unwrap().is_none()
        },
    )
    .await;
    assert!(
        records.get_opt("cnikit.node-1").await.unwrap().is_some(),
        "the live node's record stays"
    );
    assert!(agents[0].stop(), "node-1 stops cleanly");
}
