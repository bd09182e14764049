//! STATUS (spec 1.1.0) through the binary: a single-node network is ready at once; a network
//! with a routing mode is not ready (code 50) until the node agent's state file exists, and
//! then takes its MTU from it; a data directory that cannot hold the store is not ready
//! either. DEL goes on when the state file no longer decodes.
//!
//! Needs root (the plugin runs in a node namespace of the test).
#![cfg(all(feature = "bridge", feature = "routed"))]

mod common;

use std::path::Path;

use cnikit::core::state::NodeState;
use common::*;
use serde_json::{Value, json};

fn conf(data: &Path, routing: Option<&str>) -> Value {
    let mut conf = json!({
        "cniVersion": "1.1.0",
        "name": "status",
        "type": "cnikit",
        "podNetwork": "bridge",
        "dataDir": data,
        "nodeName": "node-s",
        "ipam": {"type": "cnikit-ipam", "pool": "10.244.128.0/24", "blockSize": 26}
    });
    if let Some(mode) = routing {
        conf["routing"] = json!(mode);
    }
    conf
}

#[test]
fn single_node_network_is_ready() {
    let Some(env) = Env::get("single_node_network_is_ready") else {
        return;
    };
    let lab = Lab::new("stsn");
    let node = lab.node();
    let rt = Runtime::new(&env, &lab, &node);
    let data = lab.path("data");
    let out = rt.global("STATUS", &conf(&data, None)).ok("STATUS");
    assert!(
        out.stdout.trim().is_empty(),
        "STATUS prints nothing: {}",
        out.stdout
    );
    println!("STATUS took {:?}", out.elapsed);
}

#[test]
fn routing_mode_waits_for_the_node_agent() {
    let Some(env) = Env::get("routing_mode_waits_for_the_node_agent") else {
        return;
    };
    let lab = Lab::new("stvx");
    let node = lab.node();
    let pod = lab.pod("pod");
    let rt = Runtime::new(&env, &lab, &node);
    let data = lab.dir("data");
    let conf = conf(&data, Some("vxlan"));

    let out = rt.global("STATUS", &conf);
    assert_eq!(out.error_code("STATUS without a node state file"), 50);
    let msg = out.json().unwrap()["msg"].as_str().unwrap().to_owned();
    assert!(
        msg.contains(NodeState::FILE),
        "the message names the file: {msg}"
    );
    println!("not ready: {msg}");

    NodeState::new(
        "node-s",
        "vxlan",
        1450,
        vec!["10.244.128.0/26".parse().unwrap()],
    )
    .write(&data)
    .unwrap();
    rt.global("STATUS", &conf)
        .ok("STATUS with the node state file");

    // ADD takes the agent's MTU when the configuration names none.
    let result = rt.add("st-ctr", &pod, &conf);
    assert_eq!(result["interfaces"][1]["mtu"], 1450);
    let eth0 = ip_json(&pod.name, &["link", "show", "dev", "eth0"]);
    assert_eq!(eth0[0]["mtu"], 1450);
    rt.del("st-ctr", Some(&pod.path), &conf);

    // The agent goes away: not ready again.
    NodeState::remove(&data).unwrap();
    let out = rt.global("STATUS", &conf);
    assert_eq!(out.error_code("STATUS after the agent left"), 50);
}

#[test]
fn unusable_data_dir_is_not_ready() {
    let Some(env) = Env::get("unusable_data_dir_is_not_ready") else {
        return;
    };
    let lab = Lab::new("stdd");
    let node = lab.node();
    let rt = Runtime::new(&env, &lab, &node);
    // The data directory would live under a regular file.
    let file = lab.path("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let out = rt.global("STATUS", &conf(&file.join("data"), None));
    assert_eq!(out.error_code("STATUS with an unusable dataDir"), 50);
    println!("not ready: {}", out.brief());
}

/// DEL needs no MTU: a node state file that no longer decodes (say, the node's disk was
/// damaged) must not keep DEL from removing the pod's veth and releasing its address.
#[test]
fn del_goes_on_when_the_node_state_file_is_corrupt() {
    let Some(env) = Env::get("del_goes_on_when_the_node_state_file_is_corrupt") else {
        return;
    };
    let lab = Lab::new("stcr");
    let node = lab.node();
    let pod = lab.pod("pod");
    let rt = Runtime::new(&env, &lab, &node);
    let data = lab.dir("data");
    let conf = conf(&data, Some("host-gw"));
    NodeState::new(
        "node-s",
        "host-gw",
        1500,
        vec!["10.244.128.0/26".parse().unwrap()],
    )
    .write(&data)
    .unwrap();
    rt.add("cr-ctr", &pod, &conf);
    assert_eq!(host_veths(&node.name).len(), 1, "ADD made a host veth");
    assert_eq!(used_addresses(&data), 1, "ADD holds one address");

    std::fs::write(NodeState::path(&data), b"{ not json").unwrap();
    rt.del("cr-ctr", Some(&pod.path), &conf);
    assert!(host_veths(&node.name).is_empty(), "DEL removed the veth");
    assert_eq!(used_addresses(&data), 0, "DEL released the address");
}

/// Addresses in use in the network's file store (`<dataDir>/ipam/store.json`).
fn used_addresses(data: &Path) -> usize {
    let store: Value =
        serde_json::from_slice(&std::fs::read(data.join("ipam").join("store.json")).unwrap())
            .unwrap();
    store["keys"]
        .as_object()
        .expect("the store's keys")
        .keys()
        .filter(|k| k.contains("/used/"))
        .count()
}
