//! The built-in pod networks against the real kernel (needs root; skips loudly without it).
//!
//! Each test builds its own namespaces, named `cnkt-<test>-<pid>-…`: a "node" standing in
//! for the host (the pod networks are given its handle, so nothing touches the root
//! namespace), an "uplink" giving the node an address and a default route, and pods.
//! They are removed on drop, also when a test fails.
#![cfg(all(feature = "bridge", feature = "routed"))]

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use cni_core::ipam::{Allocation, Attachment};
use cni_core::linux::{
    BridgeConfig, BridgeNetwork, NetNs, RoutedConfig, RoutedNetwork, netns, veth,
};
use cni_core::network::{Pod, PodNetwork};
use cni_core::spec::{CniResult, IpConfig};
use serde_json::Value;
use testkit::{Namespaces, ip, ip_json, netns_path};

fn root() -> bool {
    testkit::root("pod network tests")
}

/// Namespaces of one test, deleted on drop.
struct Lab(Namespaces);

impl Lab {
    fn new(tag: &str) -> Self {
        Lab(Namespaces::new(tag))
    }

    fn name(&self, suffix: &str) -> String {
        self.0.name(suffix)
    }

    fn netns(&self, suffix: &str) -> PathBuf {
        netns_path(&self.0.add(suffix))
    }

    /// A node namespace with `lo` up and an uplink `eth0` (192.0.2.2/24, fd00:ff::2/64,
    /// default routes via the uplink namespace), as a real node has.
    fn node(&self) -> String {
        let node = self.0.add("node");
        let up = self.0.add("up");
        ip(
            &up,
            &[
                "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", &node,
            ],
        );
        ip(&up, &["addr", "add", "192.0.2.1/24", "dev", "up0"]);
        ip(
            &up,
            &["addr", "add", "fd00:ff::1/64", "dev", "up0", "nodad"],
        );
        ip(&up, &["link", "set", "up0", "up"]);
        ip(&node, &["link", "set", "lo", "up"]);
        ip(&node, &["addr", "add", "192.0.2.2/24", "dev", "eth0"]);
        ip(
            &node,
            &["addr", "add", "fd00:ff::2/64", "dev", "eth0", "nodad"],
        );
        ip(&node, &["link", "set", "eth0", "up"]);
        ip(&node, &["route", "add", "default", "via", "192.0.2.1"]);
        ip(
            &node,
            &["-6", "route", "add", "default", "via", "fd00:ff::1"],
        );
        node
    }
}

/// Whether `ip -n NS link show dev NAME` finds the link.
fn has_link(ns: &str, name: &str) -> bool {
    ip_json(ns, &["link", "show"])
        .iter()
        .any(|l| l["ifname"] == name)
}

fn node_links(node: &str) -> Vec<String> {
    ip_json(node, &["link", "show"])
        .iter()
        .map(|l| l["ifname"].as_str().expect("ifname").to_owned())
        .collect()
}

fn link(ns: &str, name: &str) -> Value {
    ip_json(ns, &["-d", "link", "show", "dev", name])[0].clone()
}

fn addresses(ns: &str, dev: &str) -> Vec<String> {
    ip_json(ns, &["addr", "show", "dev", dev])[0]["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        .filter(|a| a["scope"] != "link")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

/// `ip netns exec NS ping -c1 -W1 DST`, up to three times (the first packet may wait for
/// neighbour resolution on a busy machine).
fn ping(ns: &str, dst: IpAddr) -> bool {
    (0..3).any(|_| {
        Command::new("ip")
            .args(["netns", "exec", ns, "ping", "-c1", "-W1", "-q"])
            .arg(dst.to_string())
            .output()
            .expect("run ping")
            .status
            .success()
    })
}

fn ipc(address: &str, gateway: Option<&str>) -> IpConfig {
    IpConfig {
        address: address.parse().unwrap(),
        gateway: gateway.map(|g| g.parse().unwrap()),
        interface: None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bridge,
    Routed,
}

impl Kind {
    async fn network(self, node: &str, mtu: u32) -> Box<dyn PodNetwork> {
        let host = NetNs::named(node).await.expect("open node netns");
        match self {
            Kind::Bridge => Box::new(
                BridgeNetwork::new(
                    BridgeConfig {
                        mtu,
                        hairpin_mode: true,
                        ..BridgeConfig::default()
                    },
                    host,
                )
                .expect("bridge network"),
            ),
            Kind::Routed => {
                Box::new(RoutedNetwork::new(RoutedConfig { mtu }, host).expect("routed network"))
            }
        }
    }

    /// The allocation of pod number `n` (2, 3, …), dual stack.
    fn allocation(self, n: u8) -> Allocation {
        let ips = match self {
            Kind::Bridge => vec![
                ipc(&format!("10.244.0.{n}/24"), Some("10.244.0.1")),
                ipc(&format!("fd00:0:0:1::{n}/64"), Some("fd00:0:0:1::1")),
            ],
            // A routed allocation's gateway is the IPAM's; the network ignores it.
            Kind::Routed => vec![
                ipc(&format!("10.244.1.{n}/26"), Some("10.244.1.1")),
                ipc(&format!("fd00:0:0:2::{n}/64"), None),
            ],
        };
        Allocation {
            ips,
            ..Allocation::default()
        }
    }

    fn pod_prefixes(self, n: u8) -> [String; 2] {
        match self {
            Kind::Bridge => [format!("10.244.0.{n}/24"), format!("fd00:0:0:1::{n}/64")],
            Kind::Routed => [format!("10.244.1.{n}/32"), format!("fd00:0:0:2::{n}/128")],
        }
    }
}

fn pod(lab: &Lab, suffix: &str) -> Pod {
    Pod {
        attachment: Attachment::new("cnkt-net", lab.name(suffix), "eth0"),
        netns: Some(lab.netns(suffix)),
    }
}

fn host_veth(pod: &Pod) -> String {
    veth::host_name(&pod.attachment.container_id, &pod.attachment.ifname)
}

fn pod_ips(result: &CniResult) -> Vec<IpAddr> {
    result.ips.iter().map(|i| i.address.addr()).collect()
}

/// This process's (the machine's) IPv4 and IPv6 forwarding switches, read from /proc.
fn our_forwarding() -> [String; 2] {
    [
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    ]
    .map(|path| {
        std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("read {path}: {e}"))
            .trim()
            .to_owned()
    })
}

async fn two_pods_reach_each_other_and_the_node(kind: Kind, tag: &str) {
    let forwarding_before = our_forwarding();
    let lab = Lab::new(tag);
    let node = lab.node();
    let net = kind.network(&node, 1400).await;
    let (a, b) = (pod(&lab, "a"), pod(&lab, "b"));
    let (ns_a, ns_b) = (lab.name("a"), lab.name("b"));

    let started = Instant::now();
    let ra = net.add(&a, &kind.allocation(2)).await.expect("ADD a");
    let add_time = started.elapsed();
    // The bridge keeps the MAC it was created with as ports come and go (pods cache it).
    let bridge_mac = (kind == Kind::Bridge).then(|| link(&node, "cnikit0")["address"].clone());
    let rb = net.add(&b, &kind.allocation(3)).await.expect("ADD b");

    // The result: host veth, then the pod interface with its sandbox and MTU.
    assert_eq!(ra.interfaces.len(), 2, "{ra:?}");
    assert_eq!(ra.interfaces[0].name, host_veth(&a));
    assert_eq!(ra.interfaces[0].sandbox, None);
    assert_eq!(ra.interfaces[1].name, "eth0");
    assert_eq!(
        ra.interfaces[1].sandbox.as_deref(),
        Some(a.netns.as_ref().unwrap().to_str().unwrap())
    );
    assert_eq!(ra.interfaces[1].mtu, Some(1400));
    assert!(ra.ips.iter().all(|i| i.interface == Some(1)), "{ra:?}");
    let pod_link = link(&ns_a, "eth0");
    assert_eq!(
        pod_link["address"].as_str(),
        ra.interfaces[1]
            .mac
            .as_ref()
            .map(|m| m.to_string())
            .as_deref()
    );
    let host_link = link(&node, &host_veth(&a));
    assert_eq!(
        host_link["address"].as_str(),
        ra.interfaces[0]
            .mac
            .as_ref()
            .map(|m| m.to_string())
            .as_deref()
    );

    // The MTU is applied to both ends, and both are up.
    assert_eq!(pod_link["mtu"], 1400);
    assert_eq!(host_link["mtu"], 1400);
    assert_eq!(pod_link["operstate"], "UP", "{pod_link}");
    assert_eq!(host_link["operstate"], "UP", "{host_link}");
    assert!(
        link(&ns_a, "lo")["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "UP")
    );
    let mut have = addresses(&ns_a, "eth0");
    have.sort();
    let mut want = kind.pod_prefixes(2).to_vec();
    want.sort();
    assert_eq!(have, want);

    match kind {
        Kind::Bridge => {
            let br = link(&node, "cnikit0");
            assert_eq!(host_link["master"], "cnikit0");
            assert_eq!(host_link["linkinfo"]["info_slave_data"]["hairpin"], true);
            assert_eq!(br["linkinfo"]["info_data"]["nf_call_iptables"], 0, "{br}");
            assert_eq!(br["linkinfo"]["info_data"]["nf_call_ip6tables"], 0, "{br}");
            assert_eq!(br["linkinfo"]["info_data"]["nf_call_arptables"], 0, "{br}");
            let mut gws = addresses(&node, "cnikit0");
            gws.sort();
            assert_eq!(gws, ["10.244.0.1/24", "fd00:0:0:1::1/64"]);
            let routes = Value::from(ip_json(&ns_a, &["route", "show", "default"]));
            assert_eq!(routes[0]["gateway"], "10.244.0.1", "{routes}");
        }
        Kind::Routed => {
            assert_eq!(host_link["address"], "ee:ee:ee:ee:ee:ee");
            let routes = Value::from(ip_json(&node, &["route", "show", "10.244.1.2/32"]));
            assert_eq!(routes[0]["dev"], host_veth(&a).as_str(), "{routes}");
            assert_eq!(routes[0]["scope"], "link", "{routes}");
            let routes = Value::from(ip_json(
                &node,
                &["-6", "route", "show", "fd00:0:0:2::2/128"],
            ));
            assert_eq!(routes[0]["dev"], host_veth(&a).as_str(), "{routes}");
            let routes = Value::from(ip_json(&ns_a, &["route", "show", "default"]));
            assert_eq!(routes[0]["gateway"], "169.254.1.1", "{routes}");
            let neigh = Value::from(ip_json(
                &ns_a,
                &["neigh", "show", "169.254.1.1", "dev", "eth0"],
            ));
            assert_eq!(neigh[0]["lladdr"], "ee:ee:ee:ee:ee:ee", "{neigh}");
            assert_eq!(neigh[0]["state"][0], "PERMANENT", "{neigh}");
            let node_ns = NetNs::named(&node).await.unwrap();
            let hv = host_veth(&a);
            for (key, value) in [
                ("net.ipv4.ip_forward".to_owned(), "1"),
                ("net.ipv6.conf.all.forwarding".to_owned(), "1"),
                (format!("net/ipv4/conf/{hv}/proxy_arp"), "1"),
                (format!("net/ipv4/conf/{hv}/forwarding"), "1"),
            ] {
                assert_eq!(node_ns.get_sysctl(&key).await.unwrap(), value, "{key}");
            }
            // Set in the node's namespace only: ours is as it was (only read here).
            assert_eq!(
                our_forwarding(),
                forwarding_before,
                "the routed network changed this machine's forwarding"
            );
        }
    }

    // Pod to pod, both ways, both families; pod to node (uplink address).
    for (from, to) in [(&ns_a, &rb), (&ns_b, &ra)] {
        for dst in pod_ips(to) {
            assert!(ping(from, dst), "ping {dst} from {from}");
        }
    }
    for dst in ["192.0.2.2", "fd00:ff::2"] {
        assert!(ping(&ns_a, dst.parse().unwrap()), "ping node {dst}");
    }
    // And the node reaches the pod.
    for dst in pod_ips(&ra) {
        assert!(ping(&node, dst), "ping {dst} from the node");
    }

    net.check(&a, &ra).await.expect("CHECK a");
    net.check(&b, &rb).await.expect("CHECK b");

    let started = Instant::now();
    net.del(&a, Some(&ra)).await.expect("DEL a");
    let del_time = started.elapsed();
    eprintln!("{kind:?}: ADD {add_time:?}, DEL {del_time:?} (informational)");
    net.del(&a, Some(&ra)).await.expect("DEL a again");
    net.del(&a, None).await.expect("DEL a without prevResult");
    assert!(!has_link(&node, &host_veth(&a)));
    assert!(!has_link(&ns_a, "eth0"));
    if let Some(mac) = bridge_mac {
        assert_eq!(link(&node, "cnikit0")["address"], mac);
    }
    // b is untouched and still reaches the node.
    assert!(ping(&ns_b, "192.0.2.2".parse().unwrap()));
    net.check(&b, &rb).await.expect("CHECK b after DEL a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_two_pods_reach_each_other_and_the_node() {
    if root() {
        two_pods_reach_each_other_and_the_node(Kind::Bridge, "br-ping").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_two_pods_reach_each_other_and_the_node() {
    if root() {
        two_pods_reach_each_other_and_the_node(Kind::Routed, "rt-ping").await;
    }
}

async fn del_after_the_netns_is_gone(kind: Kind, tag: &str) {
    let lab = Lab::new(tag);
    let node = lab.node();
    let net = kind.network(&node, 1500).await;
    let a = pod(&lab, "a");
    let ra = net.add(&a, &kind.allocation(2)).await.expect("ADD");
    assert!(has_link(&node, &host_veth(&a)));
    netns::delete_named(&lab.name("a")).expect("delete pod netns");
    assert!(!a.netns.as_ref().unwrap().exists());
    net.del(&a, Some(&ra)).await.expect("DEL without netns");
    net.del(&a, Some(&ra)).await.expect("DEL again");
    let gone = Pod {
        netns: None,
        ..a.clone()
    };
    net.del(&gone, None).await.expect("DEL with no CNI_NETNS");
    assert!(!has_link(&node, &host_veth(&a)), "host veth left behind");
    if kind == Kind::Routed {
        let routes = Value::from(ip_json(&node, &["route", "show", "10.244.1.2/32"]));
        assert_eq!(routes.as_array().map(Vec::len), Some(0), "{routes}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_del_after_the_netns_is_gone() {
    if root() {
        del_after_the_netns_is_gone(Kind::Bridge, "br-gone").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_del_after_the_netns_is_gone() {
    if root() {
        del_after_the_netns_is_gone(Kind::Routed, "rt-gone").await;
    }
}

async fn failed_add_leaves_nothing(kind: Kind, tag: &str) {
    let lab = Lab::new(tag);
    let node = lab.node();
    let net = kind.network(&node, 1500).await;

    // 1. Bad input is refused before anything is made: no bridge, no veth, no sysctl.
    let node_ns = NetNs::named(&node).await.unwrap();
    assert_eq!(
        node_ns.get_sysctl("net.ipv4.ip_forward").await.unwrap(),
        "0"
    );
    let c = pod(&lab, "c");
    let err = net.add(&c, &Allocation::default()).await.unwrap_err();
    assert_eq!(err.code().0, 7, "{err}");
    let bad_name = Pod {
        attachment: Attachment::new("cnkt-net", lab.name("c"), "this-name-is-too-long"),
        ..c.clone()
    };
    let err = net.add(&bad_name, &kind.allocation(4)).await.unwrap_err();
    assert_eq!(err.code().0, 4, "{err}");
    let no_netns = Pod {
        netns: None,
        ..c.clone()
    };
    let err = net.add(&no_netns, &kind.allocation(4)).await.unwrap_err();
    assert_eq!(err.code().0, 4, "{err}");
    let not_a_netns = Pod {
        netns: Some("/etc/hostname".into()),
        ..c.clone()
    };
    let err = net
        .add(&not_a_netns, &kind.allocation(4))
        .await
        .unwrap_err();
    assert_eq!(err.code().0, 4, "{err}");
    assert!(!has_link(&node, &host_veth(&c)));

    assert_eq!(node_links(&node), ["lo", "eth0"]);
    assert_eq!(
        node_ns.get_sysctl("net.ipv4.ip_forward").await.unwrap(),
        "0"
    );

    // 2. The interface name is taken in the pod: the veth cannot be created at all, and
    //    the existing interface is left alone.
    let a = pod(&lab, "a");
    let ns_a = lab.name("a");
    ip(
        &ns_a,
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "other0",
        ],
    );
    let err = net.add(&a, &kind.allocation(2)).await.unwrap_err();
    assert_eq!(err.code().0, 101, "{err}");
    assert!(!has_link(&node, &host_veth(&a)), "host veth left behind");
    assert!(has_link(&ns_a, "eth0") && has_link(&ns_a, "other0"));

    // 3. Halfway: the pod already has a default route, so adding ours fails after the veth,
    //    the addresses and (routed) the host routes exist. All of it must go.
    let b = pod(&lab, "b");
    let ns_b = lab.name("b");
    ip(&ns_b, &["link", "set", "lo", "up"]);
    ip(&ns_b, &["route", "add", "default", "dev", "lo"]);
    let err = net.add(&b, &kind.allocation(3)).await.unwrap_err();
    assert_eq!(err.code().0, 101, "{err}");
    assert!(
        err.to_string().contains("ip route add"),
        "failed at the wrong step: {err}"
    );
    assert!(!has_link(&node, &host_veth(&b)), "host veth left behind");
    assert!(!has_link(&ns_b, "eth0"), "pod end left behind");
    let host_routes = Value::from(ip_json(&node, &["route", "show", "table", "main"]));
    assert!(
        !host_routes.to_string().contains("10.244.1.3"),
        "host route left behind: {host_routes}"
    );

    // Nothing of ours is left in the node: only lo, the uplink and (bridge) the bridge.
    let links = node_links(&node);
    assert!(
        links
            .iter()
            .all(|l| ["lo", "eth0", "cnikit0"].contains(&l.as_str())),
        "{links:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_failed_add_leaves_nothing() {
    if root() {
        failed_add_leaves_nothing(Kind::Bridge, "br-fail").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_failed_add_leaves_nothing() {
    if root() {
        failed_add_leaves_nothing(Kind::Routed, "rt-fail").await;
    }
}

async fn check_notices_damage(kind: Kind, tag: &str) {
    let lab = Lab::new(tag);
    let node = lab.node();
    let net = kind.network(&node, 1500).await;
    let a = pod(&lab, "a");
    let ns_a = lab.name("a");
    let ra = net.add(&a, &kind.allocation(2)).await.expect("ADD");
    net.check(&a, &ra).await.expect("CHECK after ADD");

    // The node side broken: the host veth out of the bridge, or the host route gone.
    let hv = host_veth(&a);
    let expect = match kind {
        Kind::Bridge => {
            ip(&node, &["link", "set", "dev", &hv, "nomaster"]);
            "bridge port"
        }
        Kind::Routed => {
            ip(&node, &["route", "del", "10.244.1.2/32", "dev", &hv]);
            "host route"
        }
    };
    let err = net.check(&a, &ra).await.unwrap_err();
    assert_eq!(err.code().0, 101, "{err}");
    assert!(err.to_string().contains(expect), "{err}");

    // A lost address is a broken attachment (101).
    let v4 = kind.pod_prefixes(2)[0].clone();
    ip(&ns_a, &["addr", "del", &v4, "dev", "eth0"]);
    let err = net.check(&a, &ra).await.unwrap_err();
    assert_eq!(err.code().0, 101, "{err}");
    assert!(err.to_string().contains("addresses of eth0"), "{err}");

    // A missing interface is an unknown container (3).
    ip(&ns_a, &["link", "del", "eth0"]);
    let err = net.check(&a, &ra).await.unwrap_err();
    assert_eq!(err.code().0, 3, "{err}");
    // The pod end took the host end with it.
    assert!(!has_link(&node, &host_veth(&a)));
    net.del(&a, Some(&ra)).await.expect("DEL after damage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_check_notices_damage() {
    if root() {
        check_notices_damage(Kind::Bridge, "br-check").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_check_notices_damage() {
    if root() {
        check_notices_damage(Kind::Routed, "rt-check").await;
    }
}

/// Many ADDs at once on a node without a bridge: one of them creates it, the others use
/// it, all succeed. Each network has its own netlink connection, as separate plugin
/// processes would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_parallel_adds_share_one_bridge() {
    if !root() {
        return;
    }
    const PODS: u8 = 20;
    let lab = Lab::new("br-par");
    let node = lab.node();
    let mut tasks = Vec::new();
    for n in 2..2 + PODS {
        let net = Kind::Bridge.network(&node, 1500).await;
        let p = pod(&lab, &format!("p{n}"));
        tasks.push(tokio::spawn(async move {
            let r = net.add(&p, &Kind::Bridge.allocation(n)).await;
            (p, r)
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        let (p, r) = t.await.expect("task");
        results.push((p, r.expect("parallel ADD")));
    }
    let ports = Value::from(ip_json(&node, &["link", "show", "master", "cnikit0"]));
    assert_eq!(ports.as_array().map(Vec::len), Some(usize::from(PODS)));
    // Pods at both ends of the list reach each other.
    let last = pod_ips(&results[results.len() - 1].1)[0];
    assert!(ping(&lab.name("p2"), last));
}
