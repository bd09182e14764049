//! The sample configuration lists in `examples/conf/` run as they are (only `dataDir`,
//! `nodeName`, `logFile` and the ebpf sample's `bpffs` pointed at the test's own places)
//! through ADD, CHECK and DEL,
//! chained with the reference `portmap` and `tuning`, as a runtime runs them.
//!
//! The version is the one libcni 1.2 and later pick: the newest of `cniVersions` and
//! `cniVersion` that libcni itself speaks, whatever the plugins say. A list that advertises
//! a version one of its plugins does not speak (the reference plugins of this machine speak
//! up to 1.0.0) fails there, so every plugin is asked with VERSION first and must speak the
//! version the list negotiates.
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

/// The newest spec version libcni 1.2 speaks (`version.Current()`).
const LIBCNI_CURRENT: (u32, u32, u32) = (1, 1, 0);

/// `major.minor.patch` as numbers; `None` when it is not such a version.
fn semver(v: &str) -> Option<(u32, u32, u32)> {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    let version = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(version)
}

/// The version libcni 1.2 and later run a list with (`NetworkConfFromBytes`): every entry of
/// `cniVersions` plus `cniVersion`, those newer than libcni's own dropped, the newest of the
/// rest. It does not ask the plugins.
fn libcni_negotiate(list: &ConfList) -> Version {
    let newest = list
        .cni_versions
        .iter()
        .chain(std::iter::once(&list.cni_version))
        .filter(|v| !v.is_empty())
        .map(|v| {
            (
                semver(v).unwrap_or_else(|| panic!("{v:?} is not a version")),
                v,
            )
        })
        .filter(|(n, _)| *n <= LIBCNI_CURRENT)
        .max()
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| "0.1.0".to_owned());
    newest.parse().unwrap_or_else(|_| {
        panic!(
            "libcni would run {} at {newest}, which cnikit does not speak",
            list.name
        )
    })
}

#[test]
fn libcni_negotiation_picks_the_newest_it_speaks() {
    let list = |version: &str, versions: &[&str]| ConfList {
        cni_version: version.into(),
        cni_versions: versions.iter().map(|v| v.to_string()).collect(),
        ..ConfList::default()
    };
    assert_eq!(libcni_negotiate(&list("1.0.0", &[])), Version::V1_0_0);
    assert_eq!(
        libcni_negotiate(&list("1.0.0", &["1.0.0", "1.1.0"])),
        Version::V1_1_0
    );
    assert_eq!(
        libcni_negotiate(&list("0.4.0", &["1.0.0", "1.2.0"])),
        Version::V1_0_0
    );
}

/// Asks every plugin of `list` with VERSION, as `ValidateNetworkList` does, and panics
/// unless each speaks `version`.
async fn every_plugin_speaks(list: &ConfList, cni_path: &[PathBuf], version: Version, file: &str) {
    for plugin in &list.plugins {
        let info = plugin_version(&plugin.plugin_type, cni_path, Version::V1_0_0)
            .await
            .unwrap_or_else(|e| panic!("VERSION of {}: {e}", plugin.plugin_type));
        assert!(
            info.supports(version),
            "{file}: libcni runs it at {version}, but {} here speaks only {:?}: a shipped list \
             must advertise only versions every plugin in it speaks",
            plugin.plugin_type,
            info.supported_versions
        );
    }
}

/// The sample lists shipped in `examples/conf/`.
fn shipped() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/conf");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".conflist"))
        .collect();
    names.sort();
    names
}

/// Each shipped list has a test below.
#[test]
fn every_shipped_list_is_run() {
    assert_eq!(
        shipped(),
        [
            "10-cnikit-bridge.conflist",
            "10-cnikit-ebpf.conflist",
            "10-cnikit-routed.conflist"
        ]
    );
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
    let version = libcni_negotiate(&list);
    every_plugin_speaks(&list, &env.cni_path(), version, file).await;
    // cnikit's own runner (the exec module) runs the list at the same version.
    assert_eq!(list.negotiate().unwrap(), version, "{file}");
    println!("{file}: libcni runs it at {version}; every plugin speaks it");
    let types: Vec<&str> = list
        .plugins
        .iter()
        .map(|p| p.plugin_type.as_str())
        .collect();
    assert_eq!(types, ["cnikit", "portmap", "tuning"], "{file}");
    assert_eq!(list.plugins[0].plugin["podNetwork"], pod_network, "{file}");
    assert!(list.plugins[1].has_capability("portMappings"), "{file}");
    assert!(
        version >= Version::V1_0_0,
        "{file}: CHECK and prevResult on DEL"
    );

    let own = &mut list.plugins[0].plugin;
    own.insert("dataDir".into(), json!(data));
    own.insert("nodeName".into(), json!("node-a"));
    own.insert("logFile".into(), json!(log));
    own.insert("logLevel".into(), json!("info"));
    // The ebpf pod network pins on a BPF filesystem of the test's own, not the machine's.
    let bpffs = (pod_network == "ebpf").then(|| testkit::Bpffs::mount(tag));
    if let Some(bpffs) = &bpffs {
        own.insert("bpffs".into(), json!(bpffs.path()));
    }

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

    // STATUS is spec 1.1.0: ask the cnikit entry at 1.1.0, as a runtime does once the list
    // is raised to 1.1.0 (see the README).
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

#[cfg(feature = "ebpf")]
#[tokio::test]
async fn ebpf_sample_runs_with_portmap_and_tuning() {
    run_sample("10-cnikit-ebpf.conflist", "cfeb", "ebpf").await;
}

#[tokio::test]
async fn routed_sample_runs_with_portmap_and_tuning() {
    run_sample("10-cnikit-routed.conflist", "cfrt", "routed").await;
}
