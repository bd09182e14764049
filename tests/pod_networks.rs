//! Both pod networks through the plugin binary, on one node: pods reach each other and the
//! node; CHECK passes; DEL is idempotent, works after the pod's namespace is gone, and
//! leaves no veth and no allocation; an ADD that fails halfway (after the IPAM allocated)
//! leaves nothing either, and its address can be allocated again; a repeated ADD of a
//! running attachment does not take its address away.
//!
//! Needs root; each test builds its own node and pod namespaces.
#![cfg(all(feature = "bridge", feature = "routed"))]

mod common;

use std::net::IpAddr;
use std::path::Path;

use common::*;
use serde_json::{Value, json};

fn conf(kind: &str, data: &Path, pool: &str, block: u8) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": format!("pods-{kind}"),
        "type": "cnikit",
        "podNetwork": kind,
        "dataDir": data,
        "nodeName": "node-p",
        "ipam": {"type": "cnikit-ipam", "pool": pool, "blockSize": block}
    })
}

fn with_prev(conf: &Value, result: &Value) -> Value {
    let mut c = conf.clone();
    c["prevResult"] = result.clone();
    c
}

fn two_pods(kind: &str, tag: &str, pool: &str) {
    let Some(env) = Env::get(&format!("two {kind} pods")) else {
        return;
    };
    let lab = Lab::new(tag);
    let node = lab.node();
    let (pod_a, pod_b) = (lab.pod("a"), lab.pod("b"));
    let data = lab.dir("data");
    let mut conf = conf(kind, &data, pool, 28);
    #[cfg(feature = "ebpf")]
    let ebpf = (kind == "ebpf").then(|| Ebpf::new(tag, &mut conf));
    let rt = Runtime::new(&env, &lab, &node);
    let node_ip: IpAddr = NODE_IP.parse().unwrap();

    let (ca, cb) = (format!("{tag}-a"), format!("{tag}-b"));
    let ra = rt.add(&ca, &pod_a, &conf);
    let rb = rt.add(&cb, &pod_b, &conf);
    let (ip_a, ip_b) = (result_ip(&ra), result_ip(&rb));
    println!("{kind}: pod a {ip_a}, pod b {ip_b}");
    assert_ne!(ip_a, ip_b);
    let pool_net: ipnet::IpNet = pool.parse().unwrap();
    assert!(pool_net.contains(&ip_a) && pool_net.contains(&ip_b));
    assert_eq!(ipv4_of(&pod_a.name, "eth0"), vec![ip_a]);
    assert_eq!(ipv4_of(&pod_b.name, "eth0"), vec![ip_b]);
    assert_eq!(host_veths(&node.name).len(), 2);
    assert_eq!(
        StoreView::read(&data).used_ips(),
        [ip_a, ip_b].into_iter().collect()
    );
    for (from, to) in [
        (&pod_a.name, ip_b),
        (&pod_b.name, ip_a),
        (&pod_a.name, node_ip),
        (&pod_b.name, node_ip),
        (&node.name, ip_a),
        (&node.name, ip_b),
    ] {
        assert!(ping(from, to), "{kind}: {from} cannot ping {to}");
    }
    #[cfg(feature = "ebpf")]
    if let Some(ebpf) = &ebpf {
        // a -> b and b -> a, each an echo request and a reply, went through
        // bpf_redirect_peer; the pings to and from the node through the stack.
        let counters = ebpf.counters();
        assert!(
            counters.get(backend_ebpf::Counter::RedirectPeer) >= 4,
            "{counters:?}"
        );
        assert!(
            counters.get(backend_ebpf::Counter::PassNotLocal) >= 2,
            "{counters:?}"
        );
        assert_eq!(ebpf.entries(), [ip_a, ip_b].into_iter().collect());
    }
    if kind == "bridge" {
        let gw: IpAddr = ra["ips"][0]["gateway"].as_str().unwrap().parse().unwrap();
        assert!(ping(&pod_a.name, gw), "pod a cannot ping its gateway {gw}");
        assert!(links_of_kind(&node.name, "bridge").contains("cnikit0"));
    }

    rt.call(
        "CHECK",
        &ca,
        Some(&pod_a.path),
        "eth0",
        &with_prev(&conf, &ra),
    )
    .ok("CHECK a");
    rt.call(
        "CHECK",
        &cb,
        Some(&pod_b.path),
        "eth0",
        &with_prev(&conf, &rb),
    )
    .ok("CHECK b");

    // A repeated ADD of a running attachment (a runtime bug, or a retry) fails, says that
    // the attachment is set up already and which interface exists, and does not take the
    // address away from the pod that holds it.
    let again = rt.call("ADD", &ca, Some(&pod_a.path), "eth0", &conf);
    println!(
        "{kind}: repeated ADD exit {:?}: {}",
        again.code,
        again.brief()
    );
    assert_eq!(again.error_code("repeated ADD"), 101);
    let msg = again.json().unwrap()["msg"].as_str().unwrap().to_owned();
    for part in [
        format!("container {ca} interface eth0 is already set up"),
        ip_a.to_string(),
        format!(
            "interface eth0 already exists in the pod's network namespace {}",
            pod_a.path.display()
        ),
    ] {
        assert!(msg.contains(&part), "{kind}: {msg:?} does not say {part:?}");
    }
    assert!(!msg.contains("os error"), "{kind}: {msg:?}");
    assert!(
        StoreView::read(&data).used_ips().contains(&ip_a),
        "the repeated ADD released {ip_a} of the running pod"
    );
    assert_eq!(ipv4_of(&pod_a.name, "eth0"), vec![ip_a]);
    rt.call(
        "CHECK",
        &ca,
        Some(&pod_a.path),
        "eth0",
        &with_prev(&conf, &ra),
    )
    .ok("CHECK a after the repeated ADD");

    // DEL twice.
    rt.del(&ca, Some(&pod_a.path), &with_prev(&conf, &ra));
    rt.del(&ca, Some(&pod_a.path), &with_prev(&conf, &ra));
    assert!(!links(&pod_a.name).contains("eth0"));
    assert_eq!(host_veths(&node.name).len(), 1);
    let code = rt
        .call(
            "CHECK",
            &ca,
            Some(&pod_a.path),
            "eth0",
            &with_prev(&conf, &ra),
        )
        .error_code("CHECK after DEL");
    assert!(code == 3 || code == 101, "CHECK after DEL: code {code}");

    // The pod's namespace disappears before DEL (its veth goes with it).
    let gone = pod_b.path.clone();
    lab.remove(&pod_b);
    rt.del(&cb, Some(&gone), &conf);
    rt.del(&cb, None, &conf);
    assert!(host_veths(&node.name).is_empty(), "veths left");
    let store = StoreView::read(&data);
    assert!(store.holds_nothing(), "allocations left: {store:?}");
    assert!(store.free.contains(&ip_a) && store.free.contains(&ip_b));
    #[cfg(feature = "ebpf")]
    if let Some(ebpf) = &ebpf {
        assert!(ebpf.entries().is_empty(), "endpoint entries left");
        assert!(
            ebpf.links().is_empty(),
            "pinned links left: {:?}",
            ebpf.links()
        );
    }
    if kind != "bridge" {
        let routes = ip(&node.name, &["route", "show"]);
        assert!(
            !routes.contains(&ip_a.to_string()) && !routes.contains(&ip_b.to_string()),
            "host routes left:\n{routes}"
        );
    }
}

#[test]
fn bridge_pods_reach_each_other_and_the_node() {
    two_pods("bridge", "pnbr", "10.251.0.0/24");
}

#[test]
fn routed_pods_reach_each_other_and_the_node() {
    two_pods("routed", "pnrt", "10.252.0.0/24");
}

#[cfg(feature = "ebpf")]
#[test]
fn ebpf_pods_reach_each_other_and_the_node() {
    two_pods("ebpf", "pneb", "10.252.1.0/24");
}

/// The `ebpf` pod network's pins of one test, on a BPF filesystem of its own (named in the
/// configuration's `bpffs`).
#[cfg(feature = "ebpf")]
struct Ebpf {
    pins: backend_ebpf::Pins,
    _bpffs: testkit::Bpffs,
}

#[cfg(feature = "ebpf")]
impl Ebpf {
    fn new(tag: &str, conf: &mut Value) -> Self {
        let bpffs = testkit::Bpffs::mount(tag);
        conf["bpffs"] = json!(bpffs.path());
        let pins = backend_ebpf::Pins::new(
            bpffs.path(),
            conf["name"].as_str().unwrap(),
            conf["nodeName"].as_str().unwrap(),
        )
        .unwrap();
        Ebpf {
            pins,
            _bpffs: bpffs,
        }
    }

    fn counters(&self) -> backend_ebpf::Counters {
        self.pins.read_counters().unwrap().expect("counters pinned")
    }

    fn entries(&self) -> std::collections::BTreeSet<IpAddr> {
        let endpoints = self
            .pins
            .open_endpoints()
            .unwrap()
            .expect("endpoints pinned");
        endpoints
            .list()
            .unwrap()
            .into_iter()
            .map(|(ip, _)| IpAddr::V4(ip))
            .collect()
    }

    fn links(&self) -> Vec<std::path::PathBuf> {
        match std::fs::read_dir(self.pins.dir().join("links")) {
            Ok(dir) => dir.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// ADD into a pod whose `CNI_IFNAME` already exists fails in the pod network, after the
/// IPAM allocated: the allocation is rolled back, no veth is left, and the pool's only
/// address can be allocated again.
fn halfway_failure(kind: &str, tag: &str, pool: &str, block: u8) {
    let Some(env) = Env::get(&format!("halfway failure, {kind}")) else {
        return;
    };
    let lab = Lab::new(tag);
    let node = lab.node();
    let busy = lab.pod("busy");
    ip(
        &busy.name,
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "blocker",
        ],
    );
    let data = lab.dir("data");
    let conf = conf(kind, &data, pool, block);
    let rt = Runtime::new(&env, &lab, &node);
    let busy_links = links(&busy.name);

    let out = rt.call("ADD", "ctr-busy", Some(&busy.path), "eth0", &conf);
    let code = out.error_code("ADD into a pod whose eth0 exists");
    println!(
        "{kind}: ADD with eth0 taken -> code {code}: {}",
        out.brief()
    );
    assert_eq!(code, 101);
    assert!(host_veths(&node.name).is_empty(), "a veth is left");
    assert_eq!(links(&busy.name), busy_links);
    let store = StoreView::read(&data);
    assert!(store.holds_nothing(), "the allocation is left: {store:?}");
    assert_eq!(store.free.len(), 1, "{store:?}");
    let freed = store.free[0];

    // The pool has one address: a new ADD gets it.
    let fresh = lab.pod("fresh");
    let result = rt.add("ctr-fresh", &fresh, &conf);
    assert_eq!(result_ip(&result), freed);
    assert!(ping(&node.name, freed), "node cannot ping {freed}");
    // The pool is full now: the failing pod gets code 100 and still nothing.
    let out = rt.call("ADD", "ctr-busy", Some(&busy.path), "eth0", &conf);
    assert_eq!(out.error_code("ADD into a full pool"), 100);
    assert_eq!(host_veths(&node.name).len(), 1);
    rt.del("ctr-fresh", Some(&fresh.path), &conf);
    assert!(StoreView::read(&data).holds_nothing());
    assert!(host_veths(&node.name).is_empty());
}

#[test]
fn bridge_add_failing_halfway_leaves_nothing() {
    // A /30 block on a bridge: network, gateway and last address are reserved, one is left.
    halfway_failure("bridge", "hfbr", "10.253.0.0/30", 30);
}

#[test]
fn routed_add_failing_halfway_leaves_nothing() {
    halfway_failure("routed", "hfrt", "10.253.1.7/32", 32);
}
