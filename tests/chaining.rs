//! cnikit as the first plugin of a chain with the reference `portmap`, `tuning` and
//! `bandwidth`, run with `add_list` / `check_list` / `del_list` as a runtime runs a
//! configuration list: every plugin takes cnikit's result as `prevResult`; portmap's DNAT
//! carries a connection from the node to a server in the pod; bandwidth's limits show up as
//! qdiscs; DEL of the chain leaves no veth, no ifb, no portmap chain or rule and no
//! allocation.
//!
//! Needs root and the reference plugins; each test builds its own namespaces.
#![cfg(all(feature = "bridge", feature = "routed"))]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use cnikit::core::exec::{Invocation, add_list, del_list};
use cnikit::core::spec::{Command, ConfList};
use common::*;
use serde_json::{Value, json};

/// The qdisc kinds on `dev` in `ns`.
fn qdisc_kinds(ns: &str, dev: &str) -> Vec<String> {
    qdiscs(ns)
        .as_array()
        .into_iter()
        .flatten()
        .filter(|q| q["dev"] == dev)
        .filter_map(|q| q["kind"].as_str().map(str::to_owned))
        .collect()
}

async fn chain(kind: &str, tag: &str, pool: &str, host_port: u16) {
    let test = format!("chain with {kind}");
    let Some(env) = Env::with_reference(&test, &["portmap", "tuning", "bandwidth"]) else {
        return;
    };
    let lab = Lab::new(tag);
    let node = lab.node();
    let pod = lab.pod("pod");
    let data = lab.dir("data");
    let list = ConfList::from_slice(
        json!({
            "cniVersion": "1.0.0",
            "name": format!("chain-{kind}"),
            "plugins": [
                {
                    "type": "cnikit", "podNetwork": kind, "dataDir": data, "nodeName": "node-c",
                    "ipam": {"type": "cnikit-ipam", "pool": pool, "blockSize": 26}
                },
                {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
                {"type": "tuning", "sysctl": {"net.core.somaxconn": "777"}},
                {"type": "bandwidth", "capabilities": {"bandwidth": true}}
            ]
        })
        .to_string()
        .as_bytes(),
    )
    .expect("a valid list");
    let runtime_config = json!({
        "portMappings": [{"hostPort": host_port, "containerPort": 8081, "protocol": "tcp"}],
        // Bits per second and bits, as the bandwidth capability takes them.
        "bandwidth": {
            "ingressRate": 8_000_000, "ingressBurst": 1_000_000,
            "egressRate": 16_000_000, "egressBurst": 2_000_000
        }
    });
    let runtime_config = runtime_config.as_object().unwrap().clone();
    let container = format!("{tag}-ctr");
    let invocation = Invocation::new(
        Command::Add,
        &container,
        Some(pod.path.clone()),
        "eth0",
        env.cni_path(),
    )
    .in_netns(&node.path);

    let start = std::time::Instant::now();
    let result = add_list(&list, &invocation, &runtime_config)
        .await
        .unwrap_or_else(|e| panic!("ADD of the chain: {e}"));
    println!(
        "{kind}: ADD of cnikit+portmap+tuning+bandwidth took {:?}; interfaces {:?}",
        start.elapsed(),
        result
            .interfaces
            .iter()
            .map(|i| &i.name)
            .collect::<Vec<_>>()
    );
    let pod_ip = result.ips[0].address.addr();
    let veths = host_veths(&node.name);
    assert_eq!(veths.len(), 1);
    let host_veth = veths.first().unwrap().clone();
    // The chain's final result still is cnikit's: its host veth, the pod's eth0, its address.
    assert_eq!(result.interfaces[0].name, host_veth);
    assert_eq!(result.interfaces[1].name, "eth0");
    assert_eq!(ipv4_of(&pod.name, "eth0"), vec![pod_ip]);

    // tuning
    assert_eq!(sysctl(&pod.path, "net.core.somaxconn"), "777");
    // bandwidth: tbf on the host veth shapes traffic into the pod; the pod's traffic is
    // redirected to an ifb device shaped by another tbf.
    let ifbs = links_of_kind(&node.name, "ifb");
    assert_eq!(ifbs.len(), 1, "one ifb for the pod: {ifbs:?}");
    let ifb = ifbs.first().unwrap();
    let on_veth = qdisc_kinds(&node.name, &host_veth);
    let on_ifb = qdisc_kinds(&node.name, ifb);
    println!("{kind}: qdiscs on {host_veth}: {on_veth:?}; on {ifb}: {on_ifb:?}");
    assert!(on_veth.iter().any(|k| k == "tbf"), "no tbf on {host_veth}");
    assert!(
        on_veth.iter().any(|k| k == "ingress"),
        "no ingress on {host_veth}"
    );
    assert!(on_ifb.iter().any(|k| k == "tbf"), "no tbf on {ifb}");
    // portmap
    let nat = nat_rules(&node.name);
    assert!(
        nat.contains(&format!("--to-destination {pod_ip}:8081")),
        "no DNAT to the pod:\n{nat}"
    );
    let server = serve_once(&pod.path, 8081, "through portmap", Duration::from_secs(5));
    let addr: SocketAddr = format!("{NODE_IP}:{host_port}").parse().unwrap();
    let reply = fetch(&node.path, addr);
    assert!(server.join().unwrap(), "the pod's server got no connection");
    assert_eq!(reply.expect("connect to the host port"), "through portmap");
    assert!(ping(&node.name, pod_ip));

    check_chain(&list, &invocation, &runtime_config, &result).await;

    del_list(&list, &invocation, &runtime_config, Some(&result))
        .await
        .unwrap_or_else(|e| panic!("DEL of the chain: {e}"));
    assert!(host_veths(&node.name).is_empty(), "a veth is left");
    assert!(
        links_of_kind(&node.name, "ifb").is_empty(),
        "an ifb is left"
    );
    let left_qdiscs: Vec<Value> = qdiscs(&node.name)
        .as_array()
        .into_iter()
        .flatten()
        .filter(|q| q["kind"] == "tbf")
        .cloned()
        .collect();
    assert!(left_qdiscs.is_empty(), "qdiscs left: {left_qdiscs:?}");
    let nat = nat_rules(&node.name);
    assert!(!nat.contains("CNI-DN-"), "a portmap chain is left:\n{nat}");
    assert!(
        !nat.contains(&pod_ip.to_string()),
        "a rule names {pod_ip}:\n{nat}"
    );
    assert!(
        !nat.contains(&host_port.to_string()),
        "a rule names the host port:\n{nat}"
    );
    let store = StoreView::read(&data);
    assert!(store.holds_nothing(), "allocations left: {store:?}");
}

#[tokio::test]
async fn bridge_chain_with_portmap_tuning_bandwidth() {
    chain("bridge", "chbr", "10.254.0.0/24", 18081).await;
}

#[tokio::test]
async fn routed_chain_with_portmap_tuning_bandwidth() {
    chain("routed", "chrt", "10.254.1.0/24", 18082).await;
}
