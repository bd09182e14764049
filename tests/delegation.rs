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
    let msg = out.json().unwrap()["msg"].as_str().unwrap().to_owned();
    let taken = format!(
        "interface eth0 already exists in the pod's network namespace {}",
        busy.path.display()
    );
    assert!(msg.contains(&taken), "{msg:?}");
    assert!(
        !msg.contains("already set up"),
        "not this attachment's: {msg:?}"
    );
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

/// An `ipam.type` that resolves to the plugin itself would make it exec itself as its own
/// IPAM plugin, again and again: refused at once with code 7, creating nothing. By name
/// (`"ipam": {"type": "cnikit"}` in cnikit's entry), by path (another name in `CNI_PATH`
/// for the same executable), and as the reference `bridge` would call it (its own entry,
/// `"ipam": {"type": "cnikit"}`). Each run is bounded: a plugin still running after the
/// bound is killed with every process it started, and the test fails.
#[test]
fn an_ipam_type_that_is_the_plugin_itself_is_refused_at_once() {
    let Some(env) = Env::get("an_ipam_type_that_is_the_plugin_itself_is_refused_at_once") else {
        return;
    };
    let lab = Lab::new("dlself");
    let node = lab.node();
    let pod = lab.pod("pod");
    let data = lab.dir("data");
    let cwd = lab.dir("cwd");
    // A directory in front of `CNI_PATH` where `my-ipam` is the cnikit binary.
    let aliases = lab.dir("aliases");
    std::os::unix::fs::symlink(&env.plugin, aliases.join("my-ipam")).unwrap();
    let cni_path = format!("{}:{}", aliases.display(), env.cni_path_var());
    let conf = |plugin_type: &str, ipam_type: &str| {
        json!({
            "cniVersion": "1.0.0", "name": NETWORK, "type": plugin_type,
            "dataDir": data, "nodeName": "node-d",
            "ipam": {"type": ipam_type, "dataDir": data}
        })
    };
    let node_links = links(&node.name);
    let pod_links = links(&pod.name);
    for (what, conf) in [
        ("by name", conf("cnikit", "cnikit")),
        ("by path", conf("cnikit", "my-ipam")),
        ("called by bridge", conf("bridge", "cnikit")),
    ] {
        for command in ["ADD", "DEL"] {
            let pod_path = pod.path.display().to_string();
            let vars = [
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", "ctr-self"),
                ("CNI_NETNS", pod_path.as_str()),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", cni_path.as_str()),
            ];
            let stdin = conf.to_string();
            let limit = std::time::Duration::from_secs(30);
            let out = run_bounded(
                &env.plugin,
                &node.path,
                &vars,
                stdin.as_bytes(),
                &cwd,
                limit,
            )
            .unwrap_or_else(|| {
                panic!("{what}: {command} still running after {limit:?} (it execs itself)")
            });
            println!("{what} {command}: {:?} {}", out.elapsed, out.brief());
            assert_eq!(out.error_code(&format!("{what} {command}")), 7);
            let msg = out.json().unwrap()["msg"].as_str().unwrap().to_owned();
            assert!(
                msg.contains("ipam.type") && msg.contains("itself"),
                "{what}: {msg}"
            );
        }
    }
    assert_eq!(links(&node.name), node_links);
    assert_eq!(links(&pod.name), pod_links);
    assert!(files_under(&data).is_empty(), "{:?}", files_under(&data));
}
