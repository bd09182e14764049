//! IPAM delegation through the binary: with `"ipam": {"type": "host-local", …}` the plugin
//! execs the reference host-local from `CNI_PATH`; the pod gets host-local's address; DEL
//! and an ADD that fails halfway both release it in host-local's `dataDir`.
//!
//! Needs root and /usr/lib/cni/host-local; each test builds its own namespaces.
#![cfg(all(feature = "bridge", feature = "routed"))]

mod common;

use std::net::IpAddr;
use std::path::Path;

use common::*;
use serde_json::{Value, json};

const NETWORK: &str = "deleg";

fn conf(kind: &str, data: &Path, host_local: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "type": "cnikit",
        "podNetwork": kind,
        "dataDir": data,
        "nodeName": "node-d",
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "10.247.0.0/28", "gateway": "10.247.0.1"}]],
            "dataDir": host_local
        }
    })
}

fn delegate(kind: &str, tag: &str) {
    let Some(env) = Env::with_reference(&format!("delegation, {kind}"), &["host-local"]) else {
        return;
    };
    let lab = Lab::new(tag);
    let node = lab.node();
    let pod = lab.pod("pod");
    let data = lab.dir("data");
    let hl = lab.dir("host-local");
    let conf = conf(kind, &data, &hl);
    let rt = Runtime::new(&env, &lab, &node);
    let container = format!("{tag}-ctr");

    let result = rt.add(&container, &pod, &conf);
    let pod_ip = result_ip(&result);
    println!("{kind}: host-local gave {pod_ip}");
    assert_eq!(pod_ip, "10.247.0.2".parse::<IpAddr>().unwrap());
    assert_eq!(
        host_local_held(&hl, NETWORK),
        vec![(pod_ip, container.clone())]
    );
    assert_eq!(ipv4_of(&pod.name, "eth0"), vec![pod_ip]);
    assert!(ping(&node.name, pod_ip), "node cannot ping {pod_ip}");
    assert!(
        ping(&pod.name, NODE_IP.parse().unwrap()),
        "pod cannot ping the node"
    );
    // The block IPAM's store is not used.
    assert!(!data.join("ipam").exists());

    let mut with_prev = conf.clone();
    with_prev["prevResult"] = result.clone();
    rt.call("CHECK", &container, Some(&pod.path), "eth0", &with_prev)
        .ok("CHECK with host-local");

    rt.del(&container, Some(&pod.path), &with_prev);
    assert_eq!(host_local_held(&hl, NETWORK), vec![]);
    assert!(host_veths(&node.name).is_empty());
    rt.del(&container, Some(&pod.path), &with_prev);

    // ADD into a pod whose eth0 exists: host-local allocates, the pod network fails, and
    // the address goes back to host-local.
    let busy = lab.pod("busy");
    ip(
        &busy.name,
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "blocker",
        ],
    );
    let out = rt.call("ADD", "ctr-busy", Some(&busy.path), "eth0", &conf);
    assert_eq!(out.error_code("ADD with eth0 taken"), 101);
    assert_eq!(
        host_local_held(&hl, NETWORK),
        vec![],
        "host-local still holds the address of the failed ADD"
    );
    assert!(host_veths(&node.name).is_empty());
}

#[test]
fn bridge_pod_gets_its_address_from_host_local() {
    delegate("bridge", "dlbr");
}

#[test]
fn routed_pod_gets_its_address_from_host_local() {
    delegate("routed", "dlrt");
}
