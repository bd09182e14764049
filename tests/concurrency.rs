//! 50 ADDs at once, as 50 plugin processes sharing the local file store, then 50 DELs at
//! once: 50 distinct addresses, every pod answers the node's ping, the store passes its
//! consistency audit, and after the DELs it holds no used record and no handle, and the
//! node has no veth left.
//!
//! Needs root; each test builds its own node and 50 pod namespaces.
#![cfg(all(feature = "bridge", feature = "routed"))]

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;
use std::time::Instant;

use cnikit::core::ipam::block::Reserve;
use cnikit::core::ipam::{BlockIpam, BlockIpamConfig};
use cnikit::core::store::FileStore;
use common::*;
use serde_json::json;

const PODS: usize = 50;

/// The block engine's own consistency audit of the store in `data`.
fn audit(data: &Path, pool: &str, block: u8, network: &str, reserve: Reserve) -> Vec<String> {
    let mut config = BlockIpamConfig::new(pool.parse().unwrap(), "node-x", network);
    config.block_prefix = block;
    config.reserve = reserve;
    let ipam = BlockIpam::new(FileStore::new(data.join("ipam")), config).expect("config");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(ipam.audit())
        .expect("audit")
}

fn parallel(kind: &str, tag: &str, pool: &str) {
    let Some(env) = Env::get(&format!("{PODS} parallel ADDs, {kind}")) else {
        return;
    };
    let lab = Lab::new(tag);
    let node = lab.node();
    let pods: Vec<Ns> = (0..PODS).map(|i| lab.pod(&format!("p{i}"))).collect();
    let data = lab.dir("data");
    let network = format!("par-{kind}");
    // /28 blocks, so that the racing ADDs also race to claim blocks.
    let block = 28;
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": network,
        "type": "cnikit",
        "podNetwork": kind,
        "dataDir": data,
        "nodeName": "node-x",
        "ipam": {"type": "cnikit-ipam", "pool": pool, "blockSize": block}
    });
    let stdin = conf.to_string();
    let cwd = lab.dir("cwd");
    let cni_path = env.cni_path_var();
    let container = |i: usize| format!("{tag}-ctr-{i}");

    let run_all = |command: &str| {
        let start = Instant::now();
        let children: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let netns = pod.path.display().to_string();
                let id = container(i);
                let vars = [
                    ("CNI_COMMAND", command),
                    ("CNI_CONTAINERID", id.as_str()),
                    ("CNI_NETNS", netns.as_str()),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_PATH", cni_path.as_str()),
                ];
                spawn_raw(&env.plugin, &node.path, &vars, stdin.as_bytes(), &cwd)
            })
            .collect();
        let outputs: Vec<_> = children
            .into_iter()
            .map(|c| c.wait_with_output().expect("wait"))
            .collect();
        let elapsed = start.elapsed();
        println!("{kind}: {PODS} parallel {command}s took {elapsed:?}");
        outputs
    };

    let outputs = run_all("ADD");
    let mut ips = BTreeSet::new();
    for (i, out) in outputs.iter().enumerate() {
        assert!(
            out.status.success(),
            "ADD {i} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("result");
        let ip = result_ip(&result);
        assert_eq!(ipv4_of(&pods[i].name, "eth0"), vec![ip], "pod {i}");
        ips.insert(ip);
    }
    assert_eq!(ips.len(), PODS, "duplicate addresses: {ips:?}");
    let store = StoreView::read(&data);
    assert_eq!(store.used_ips(), ips);
    assert_eq!(store.handles.len(), PODS);
    let reserve = if kind == "bridge" {
        Reserve::Gateway
    } else {
        Reserve::None
    };
    let problems = audit(&data, pool, block, &network, reserve);
    assert!(problems.is_empty(), "store audit: {problems:#?}");
    assert_eq!(host_veths(&node.name).len(), PODS);

    let start = Instant::now();
    let unreachable: Vec<IpAddr> = ips
        .iter()
        .copied()
        .filter(|ip| !ping(&node.name, *ip))
        .collect();
    println!(
        "{kind}: pinged {PODS} pods from the node in {:?}",
        start.elapsed()
    );
    assert!(
        unreachable.is_empty(),
        "pods not answering: {unreachable:?}"
    );

    let outputs = run_all("DEL");
    for (i, out) in outputs.iter().enumerate() {
        assert!(
            out.status.success(),
            "DEL {i} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let store = StoreView::read(&data);
    assert!(store.used.is_empty(), "used records left: {:?}", store.used);
    assert!(
        store.handles.is_empty(),
        "handles left: {:?}",
        store.handles
    );
    assert_eq!(store.free.iter().copied().collect::<BTreeSet<_>>(), ips);
    assert!(host_veths(&node.name).is_empty(), "veths left");
    let problems = audit(&data, pool, block, &network, reserve);
    assert!(problems.is_empty(), "store audit after DEL: {problems:#?}");
}

#[test]
fn fifty_parallel_bridge_pods() {
    parallel("bridge", "cpbr", "10.246.0.0/24");
}

#[test]
fn fifty_parallel_routed_pods() {
    parallel("routed", "cprt", "10.246.1.0/24");
}
