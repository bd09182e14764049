//! The `cnikit-agent` binary with `"routing": "bgp"`: two nodes, each a namespace on one
//! switch with its own agent, sharing a file store. Their speakers peer, each installs the
//! other's block, the node state file reports the sessions, and a node whose agent stops is
//! forgotten by the other.
//!
//! Needs root and the example binary (`cargo build -p cnikit --example cnikit-agent`);
//! skips loudly otherwise.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testkit::{AgentProcess, Namespaces, Segment, agent_binary, ip_json};

const BUILD_AGENT: &str = "cargo build -p cnikit --example cnikit-agent";
const WAIT: Duration = Duration::from_secs(20);

fn conflist(node: &str, data: &Path, store: &Path) -> Value {
    json!({
        "cniVersion": "1.1.0",
        "name": "bgpnet",
        "plugins": [{
            "type": "cnikit",
            "nodeName": node,
            "dataDir": data,
            "routing": "bgp",
            "agent": {"interface": "eth0", "ttlSeconds": 5, "resyncSeconds": 1},
            "bgp": {"port": 10179, "holdTime": 9, "connectRetry": 1},
            "ipam": {
                "type": "cnikit-ipam",
                "pool": "10.251.0.0/16",
                "blockSize": 26,
                "store": {"type": "file", "path": store},
            },
        }],
    })
}

fn state(data: &Path) -> Option<Value> {
    let bytes = std::fs::read(data.join("node-state.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn cnikit_routes(ns: &str) -> Vec<(String, String)> {
    let mut routes: Vec<(String, String)> = ip_json(ns, &["route", "show", "proto", "107"])
        .iter()
        .map(|r| {
            (
                r["dst"].as_str().unwrap_or_default().to_owned(),
                r["gateway"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    routes.sort();
    routes
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_agents_exchange_their_blocks_over_bgp() {
    let Some(bin) = agent_binary("two_agents_exchange_their_blocks_over_bgp", BUILD_AGENT) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let namespaces = Namespaces::new("bgpa");
    let segment = Segment::new(&namespaces, "sw");
    let store = dir.path().join("store");
    let mut nodes = Vec::new();
    for (name, cidr) in [("n1", "192.168.74.11/24"), ("n2", "192.168.74.12/24")] {
        let ns = namespaces.add(name);
        segment.plug(&ns, "eth0", cidr);
        let data = dir.path().join(name);
        let list = dir.path().join(format!("{name}.conflist"));
        std::fs::write(&list, conflist(name, &data, &store).to_string()).unwrap();
        let agent = AgentProcess::start(&bin, &ns, &list, &dir.path().join(format!("{name}.log")));
        nodes.push((
            name,
            cidr.split('/').next().unwrap().to_owned(),
            ns,
            data,
            agent,
        ));
    }

    // Each node's state file shows an Established session and the other's block, and the
    // other's block is in each kernel, via the other node.
    let block = |data: &Path| state(data).and_then(|s| s["blocks"][0].as_str().map(str::to_owned));
    wait_until("both blocks claimed", || {
        nodes.iter().all(|n| block(&n.3).is_some())
    });
    for (i, (name, _, ns, data, _)) in nodes.iter().enumerate() {
        let (peer, peer_ip, _, peer_data, _) = &nodes[1 - i];
        let want = vec![(block(peer_data).unwrap(), peer_ip.clone())];
        wait_until(&format!("{name}: the route to {peer}'s block"), || {
            cnikit_routes(ns) == want
        });
        wait_until(
            &format!("{name}: the session in the node state file"),
            || {
                state(data).is_some_and(|s| {
                    s["mode"] == "bgp"
                        && s["routing"]["peers"][0]["name"] == **peer
                        && s["routing"]["peers"][0]["state"] == "established"
                        && s["routing"]["peers"][0]["prefixesReceived"] == 1
                })
            },
        );
    }

    // n2's agent stops: it deregisters and closes its session; n1 forgets its block.
    assert!(nodes[1].4.stop(), "n2's agent exits cleanly");
    assert!(
        cnikit_routes(&nodes[1].2).is_empty(),
        "n2 removed its routes"
    );
    wait_until("n1 forgets n2's block", || {
        cnikit_routes(&nodes[0].2).is_empty()
    });
    assert!(nodes[0].4.stop(), "n1's agent exits cleanly");
}
