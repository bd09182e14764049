//! GC through the binary: a routed /29 pool (8 usable addresses) is filled by seven pods of
//! the network and one of another network sharing the store; the next ADD fails with code
//! 100 and creates nothing. Six pods then vanish without DEL; GC (1.1.0) with the one valid
//! attachment releases their addresses, and only theirs: the valid pod keeps its address
//! (CHECK passes, it still answers), the other network's pod keeps its own, and six new
//! pods get exactly the freed addresses.
//!
//! Every GC is sent exactly as libcni 1.2.3 and later send it (`GCNetworkList`): the valid
//! attachments under both `cni.dev/valid-attachments` and `cni.dev/attachments`. A GC whose
//! two keys list different attachments is refused (code 7) and releases nothing.
//!
//! Needs root; the test builds its own namespaces.
#![cfg(all(feature = "bridge", feature = "routed"))]

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

use common::*;
use serde_json::{Value, json};

const POOL: &str = "10.245.128.0/29";

fn conf(network: &str, data: &Path) -> Value {
    json!({
        "cniVersion": "1.1.0",
        "name": network,
        "type": "cnikit",
        "podNetwork": "routed",
        "dataDir": data,
        "nodeName": "node-g",
        "ipam": {"type": "cnikit-ipam", "pool": POOL, "blockSize": 29}
    })
}

/// `value` as Go's `encoding/json` writes a `map[string]interface{}`: keys sorted at every
/// level, no spaces.
fn go_json(value: &Value) -> String {
    fn sorted(value: &Value) -> Value {
        match value {
            Value::Object(map) => {
                let keys: BTreeSet<&String> = map.keys().collect();
                Value::Object(
                    keys.into_iter()
                        .map(|k| (k.clone(), sorted(&map[k])))
                        .collect(),
                )
            }
            Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(value).to_string()
}

/// GC of the list whose plugin entry is `entry`, as libcni 1.2.3 and later run it
/// (`GCNetworkList`): the entry with `name`, `cniVersion` and the valid attachments injected
/// under both keys (`legacy` under `cni.dev/attachments`; libcni puts the same list there),
/// re-marshalled by Go; all six `CNI_*` variables set, the attachment ones empty.
fn libcni_gc(rt: &Runtime, entry: &Value, valid: &[&str], legacy: &[&str]) -> Outcome {
    let list = |ids: &[&str]| -> Value {
        ids.iter()
            .map(|id| json!({"containerID": id, "ifname": "eth0"}))
            .collect()
    };
    let mut conf = entry.clone();
    conf["cni.dev/valid-attachments"] = list(valid);
    conf["cni.dev/attachments"] = list(legacy);
    let path = rt.env.cni_path_var();
    let vars = [
        ("CNI_COMMAND", "GC"),
        ("CNI_CONTAINERID", ""),
        ("CNI_NETNS", ""),
        ("CNI_ARGS", ""),
        ("CNI_IFNAME", ""),
        ("CNI_PATH", path.as_str()),
    ];
    run_raw(
        &rt.env.plugin,
        &rt.node.path,
        &vars,
        go_json(&conf).as_bytes(),
        &rt.cwd,
    )
}

#[test]
fn go_json_sorts_keys_like_go() {
    let text = go_json(
        &json!({"type": "cnikit", "cniVersion": "1.1.0", "cni.dev/valid-attachments": [{"ifname": "eth0", "containerID": "c"}], "cni.dev/attachments": []}),
    );
    assert_eq!(
        text,
        r#"{"cni.dev/attachments":[],"cni.dev/valid-attachments":[{"containerID":"c","ifname":"eth0"}],"cniVersion":"1.1.0","type":"cnikit"}"#
    );
}

#[test]
fn gc_releases_the_stale_and_keeps_the_valid() {
    let Some(env) = Env::get("gc_releases_the_stale_and_keeps_the_valid") else {
        return;
    };
    let lab = Lab::new("gc");
    let node = lab.node();
    let data = lab.dir("data");
    let (net, other) = (conf("gc-net", &data), conf("gc-other", &data));
    let rt = Runtime::new(&env, &lab, &node);

    let pods: Vec<Ns> = (0..7).map(|i| lab.pod(&format!("p{i}"))).collect();
    let results: Vec<Value> = pods
        .iter()
        .enumerate()
        .map(|(i, pod)| rt.add(&format!("gc-{i}"), pod, &net))
        .collect();
    let other_pod = lab.pod("other");
    let other_ip = result_ip(&rt.add("gc-other-0", &other_pod, &other));
    let ips: Vec<IpAddr> = results.iter().map(result_ip).collect();
    let all: BTreeSet<IpAddr> = ips.iter().copied().chain([other_ip]).collect();
    assert_eq!(all.len(), 8, "8 distinct addresses: {all:?}");
    let pool: ipnet::IpNet = POOL.parse().unwrap();
    assert!(all.iter().all(|ip| pool.contains(ip)));

    // The pool is full.
    let extra = lab.pod("extra");
    let links_before = links(&node.name);
    let out = rt.call("ADD", "gc-extra", Some(&extra.path), "eth0", &net);
    assert_eq!(out.error_code("ADD into a full pool"), 100);
    assert_eq!(
        links(&node.name),
        links_before,
        "the failed ADD left a link"
    );
    assert!(!links(&extra.name).contains("eth0"));

    // Pods 1..6 vanish without DEL; pod 0 stays.
    for pod in &pods[1..] {
        lab.remove(pod);
    }

    // A GC whose two keys disagree is refused and releases nothing.
    let used_before = StoreView::read(&data).used_ips();
    let out = libcni_gc(&rt, &net, &["gc-0"], &["gc-0", "gc-1"]);
    assert_eq!(out.error_code("GC with keys that disagree"), 7);
    let msg = out.json().unwrap()["msg"].to_string();
    assert!(
        msg.contains("cni.dev/attachments") && msg.contains("cni.dev/valid-attachments"),
        "{msg}"
    );
    assert_eq!(StoreView::read(&data).used_ips(), used_before);

    let out = libcni_gc(&rt, &net, &["gc-0"], &["gc-0"]).ok("GC");
    println!("GC took {:?}", out.elapsed);

    let store = StoreView::read(&data);
    let freed: BTreeSet<IpAddr> = ips[1..].iter().copied().collect();
    assert_eq!(
        store.used_ips(),
        [ips[0], other_ip].into_iter().collect(),
        "after GC: {store:?}"
    );
    assert_eq!(store.handles.len(), 2, "{:?}", store.handles);
    assert!(store.handles.iter().any(|h| h.contains("/gc-net/gc-0/")));
    assert!(
        store
            .handles
            .iter()
            .any(|h| h.contains("/gc-other/gc-other-0/"))
    );
    assert_eq!(
        store.free.iter().copied().collect::<BTreeSet<_>>(),
        freed,
        "free records"
    );

    // The valid pod keeps its address.
    let mut check = net.clone();
    check["prevResult"] = results[0].clone();
    rt.call("CHECK", "gc-0", Some(&pods[0].path), "eth0", &check)
        .ok("CHECK of the valid pod after GC");
    assert!(ping(&node.name, ips[0]));

    // Six new pods get exactly the freed addresses; the pool is full again.
    let got: BTreeSet<IpAddr> = (0..6)
        .map(|i| {
            let pod = lab.pod(&format!("n{i}"));
            result_ip(&rt.add(&format!("gc-new-{i}"), &pod, &net))
        })
        .collect();
    assert_eq!(got, freed);
    for ip in &got {
        assert!(ping(&node.name, *ip), "new pod {ip} does not answer");
    }
    let out = rt.call("ADD", "gc-extra", Some(&extra.path), "eth0", &net);
    assert_eq!(out.error_code("ADD into the full pool again"), 100);

    // GC with every attachment valid releases nothing.
    let valid: Vec<String> = std::iter::once("gc-0".to_owned())
        .chain((0..6).map(|i| format!("gc-new-{i}")))
        .collect();
    let valid: Vec<&str> = valid.iter().map(String::as_str).collect();
    libcni_gc(&rt, &net, &valid, &valid).ok("GC keeping all");
    assert_eq!(StoreView::read(&data).used_ips(), all);
}
