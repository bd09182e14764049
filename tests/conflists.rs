//! The sample configuration lists in `examples/conf/` run as they are (only `dataDir`,
//! `nodeName` and `logFile` pointed at the test's own places) through ADD, CHECK and DEL,
//! chained with the reference `portmap` and `tuning`, as a runtime runs them.
//!
//! Needs root; each test builds its own node and pod namespaces.
#![cfg(all(feature = "bridge", feature = "routed"))]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cnikit::core::exec::{Invocation, add_list, del_list, plugin_version};
use cnikit::core::spec::{Command, ConfList, Version};
use cnikit::core::state::NodeState;
use common::*;
use serde_json::{Value, json};

fn conflist_path(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/conf")
        .join(file)
}

/// The versions every plugin of `list` speaks, as a version-aware runtime finds out with
/// VERSION.
async fn spoken_by_all(list: &ConfList, cni_path: &[PathBuf]) -> Vec<Version> {
    let mut common = Version::ALL.to_vec();
    for plugin in &list.plugins {
        let info = plugin_version(&plugin.plugin_type, cni_path, Version::V1_0_0)
            .await
            .unwrap_or_else(|e| panic!("VERSION of {}: {e}", plugin.plugin_type));
        common.retain(|v| info.supports(*v));
    }
    common
}

async fn run_sample(file: &str, tag: &str, pod_network: &str) {
    let test = format!("conflist {file}");
    let Some(env) = Env::with_reference(&test, &["portmap", "tuning"]) else {
        return;
    };
    let lab = Lab::new(tag);
    let node = lab.node();
    let pod = lab.pod("pod");
    let data = lab.dir("data");
    let log = lab.path("cnikit.log");

    let bytes = std::fs::read(conflist_path(file)).expect("read the sample");
    let mut list = ConfList::from_slice(&bytes).expect("the sample is a valid list");
    let types: Vec<&str> = list
        .plugins
        .iter()
        .map(|p| p.plugin_type.as_str())
        .collect();
    assert_eq!(types, ["cnikit", "portmap", "tuning"], "{file}");
    assert_eq!(list.cni_version, "1.0.0", "{file}");
    assert_eq!(list.cni_versions, ["1.0.0", "1.1.0"], "{file}");
    assert_eq!(list.plugins[0].plugin["podNetwork"], pod_network, "{file}");
    assert!(list.plugins[1].has_capability("portMappings"), "{file}");
    // A runtime that honours `cniVersions` alone picks 1.1.0; the reference plugins here
    // speak up to 1.0.0, so a runtime that asks them (as this test does) runs the list at
    // 1.0.0, the version `cniVersion` names for runtimes that predate `cniVersions`.
    assert_eq!(list.negotiate().unwrap(), Version::V1_1_0);
    let spoken = spoken_by_all(&list, &env.cni_path()).await;
    list.cni_versions
        .retain(|v| v.parse::<Version>().is_ok_and(|v| spoken.contains(&v)));
    let version = list.negotiate().expect("a version every plugin speaks");
    println!("{file}: versions all plugins speak: {spoken:?}; running at {version}");
    assert!(version >= Version::V1_0_0);

    let own = &mut list.plugins[0].plugin;
    own.insert("dataDir".into(), json!(data));
    own.insert("nodeName".into(), json!("node-a"));
    own.insert("logFile".into(), json!(log));
    own.insert("logLevel".into(), json!("info"));

    let container = format!("{tag}-ctr-1");
    let invocation = Invocation::new(
        Command::Add,
        &container,
        Some(pod.path.clone()),
        "eth0",
        env.cni_path(),
    )
    .in_netns(&node.path);
    let runtime_config = json!({
        "portMappings": [{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}]
    });
    let runtime_config = runtime_config.as_object().expect("object").clone();

    let start = std::time::Instant::now();
    let result = add_list(&list, &invocation, &runtime_config)
        .await
        .unwrap_or_else(|e| panic!("ADD of {file}: {e}"));
    println!("{file}: ADD of the list took {:?}", start.elapsed());
    let pod_ip = result.ips[0].address.addr();
    let pool: ipnet::IpNet = list.plugins[0].ipam.as_ref().unwrap().config["pool"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(pool.contains(&pod_ip), "{pod_ip} outside {pool}");
    assert_eq!(ipv4_of(&pod.name, "eth0"), vec![pod_ip]);
    assert_eq!(host_veths(&node.name).len(), 1);
    assert!(
        ping(&node.name, pod_ip),
        "node cannot ping the pod {pod_ip}"
    );
    assert!(
        ping(&pod.name, NODE_IP.parse().unwrap()),
        "the pod cannot ping the node"
    );
    // tuning ran in the pod.
    assert_eq!(sysctl(&pod.path, "net.core.somaxconn"), "1024");
    // portmap: its DNAT rule, and a connection to the host port reaches the pod.
    let nat = nat_rules(&node.name);
    assert!(
        nat.contains(&format!("--to-destination {pod_ip}:8080")),
        "no DNAT to the pod:\n{nat}"
    );
    let server = serve_once(
        &pod.path,
        8080,
        "hello from the pod",
        Duration::from_secs(5),
    );
    let addr: SocketAddr = format!("{NODE_IP}:18080").parse().unwrap();
    let reply = fetch(&node.path, addr);
    assert!(
        server.join().unwrap(),
        "the server in the pod got no connection"
    );
    assert_eq!(
        reply.expect("connect to the host port"),
        "hello from the pod"
    );

    check_chain(&list, &invocation, &runtime_config, &result).await;

    del_list(&list, &invocation, &runtime_config, Some(&result))
        .await
        .unwrap_or_else(|e| panic!("DEL of {file}: {e}"));
    assert!(host_veths(&node.name).is_empty(), "a veth is left");
    assert!(
        !links(&pod.name).contains("eth0"),
        "eth0 is left in the pod"
    );
    let store = StoreView::read(&data);
    assert!(store.holds_nothing(), "allocations left: {store:?}");
    assert!(store.free.contains(&pod_ip), "{pod_ip} not released");
    let nat = nat_rules(&node.name);
    assert!(!nat.contains("CNI-DN-"), "a portmap chain is left:\n{nat}");
    assert!(
        !nat.contains(&pod_ip.to_string()),
        "a rule names {pod_ip}:\n{nat}"
    );
    // DEL again, as runtimes do: still fine.
    del_list(&list, &invocation, &runtime_config, Some(&result))
        .await
        .unwrap_or_else(|e| panic!("second DEL of {file}: {e}"));

    let logged = std::fs::read_to_string(&log).expect("the plugin wrote its log file");
    assert!(logged.contains("CNI request"), "log: {logged}");

    // STATUS is spec 1.1.0: ask the cnikit entry in the version `cniVersions` offers.
    let runtime = Runtime::new(&env, &lab, &node);
    let status_conf = list
        .plugin_config(0, Version::V1_1_0, None, &serde_json::Map::new())
        .unwrap();
    let routing = status_conf.get("routing").and_then(Value::as_str);
    if let Some(mode) = routing {
        let out = runtime.global("STATUS", &status_conf);
        assert_eq!(out.error_code("STATUS before the agent"), 50);
        NodeState::new("node-a", mode, 1500, Vec::new())
            .write(&data)
            .unwrap();
    }
    runtime
        .global("STATUS", &status_conf)
        .ok(&format!("STATUS of {file}"));
}

#[tokio::test]
async fn bridge_sample_runs_with_portmap_and_tuning() {
    run_sample("10-cnikit-bridge.conflist", "cfbr", "bridge").await;
}

#[tokio::test]
async fn routed_sample_runs_with_portmap_and_tuning() {
    run_sample("10-cnikit-routed.conflist", "cfrt", "routed").await;
}
