//! The binary's second role: installed as `cnikit-ipam`, it is the IPAM plugin of the
//! reference `bridge` plugin. The pod gets an address of the block pool (the gateway kept
//! back with `"reserve": "gateway"`), reaches the node, and DEL releases the address.
//!
//! Needs root and /usr/lib/cni/bridge; the test builds its own namespaces.
#![cfg(all(feature = "bridge", feature = "routed"))]

mod common;

use std::net::IpAddr;

use common::*;
use serde_json::json;

#[test]
fn reference_bridge_with_cnikit_ipam() {
    let Some(env) = Env::with_reference("reference_bridge_with_cnikit_ipam", &["bridge"]) else {
        return;
    };
    let lab = Lab::new("ipr");
    let node = lab.node();
    let pod = lab.pod("pod");
    let data = lab.dir("data");
    let cwd = lab.dir("cwd");
    // CNI_PATH holds the binary under its IPAM name.
    let bin = lab.dir("bin");
    std::os::unix::fs::symlink(&env.plugin, bin.join("cnikit-ipam")).unwrap();
    let cni_path = format!("{}:{REFERENCE_DIR}", bin.display());
    let reference_bridge = std::path::Path::new(REFERENCE_DIR).join("bridge");
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "refbr",
        "type": "bridge",
        "bridge": "refbr0",
        "isGateway": true,
        "ipam": {
            "type": "cnikit-ipam",
            "pool": "10.243.0.0/24",
            "blockSize": 26,
            "reserve": "gateway",
            "dataDir": data,
            "nodeName": "node-i"
        }
    })
    .to_string();
    let netns = pod.path.display().to_string();
    let vars = |command: &'static str| {
        [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "ipr-ctr"),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", cni_path.as_str()),
        ]
    };

    let result = run_raw(
        &reference_bridge,
        &node.path,
        &vars("ADD"),
        conf.as_bytes(),
        &cwd,
    )
    .result("reference bridge ADD with cnikit-ipam");
    let pod_ip = result_ip(&result);
    let gateway: IpAddr = result["ips"][0]["gateway"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    println!("reference bridge + cnikit-ipam: pod {pod_ip}, gateway {gateway}");
    // The first /26 block; its network address, gateway and last address are kept back.
    let block: ipnet::IpNet = "10.243.0.0/26".parse().unwrap();
    assert!(block.contains(&pod_ip), "{pod_ip} outside {block}");
    assert!(![block.network(), block.broadcast(), gateway].contains(&pod_ip));
    assert_eq!(gateway, "10.243.0.1".parse::<IpAddr>().unwrap());
    assert_eq!(result["ips"][0]["address"], format!("{pod_ip}/26"));
    assert_eq!(ipv4_of(&pod.name, "eth0"), vec![pod_ip]);
    assert!(ipv4_of(&node.name, "refbr0").contains(&gateway));
    assert!(ping(&pod.name, gateway));
    assert!(ping(&node.name, pod_ip));
    assert_eq!(
        StoreView::read(&data).used_ips(),
        [pod_ip].into_iter().collect()
    );

    run_raw(
        &reference_bridge,
        &node.path,
        &vars("DEL"),
        conf.as_bytes(),
        &cwd,
    )
    .ok("reference bridge DEL");
    let store = StoreView::read(&data);
    assert!(store.holds_nothing(), "allocations left: {store:?}");
    assert_eq!(store.free, vec![pod_ip]);
    assert!(!links(&pod.name).contains("eth0"));
}
