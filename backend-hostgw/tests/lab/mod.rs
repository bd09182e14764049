//! A virtual underlay made of network namespaces, for the routing backends' tests (needs
//! root). Shared by backend-hostgw, backend-vxlan and backend-ipip (included with `#[path]`).
//!
//! Everything lives in namespaces named `cnkt-<tag>-<pid>-<suffix>`: "switches" (a
//! namespace holding a bridge `br0`), "nodes" joined to a switch by a veth (`eth0` in the
//! node), routers with a leg on several switches, and pods plugged into a node by cni-core's
//! bridge pod network. The namespaces are deleted when the [`Lab`] is dropped, also when a
//! test panics. Nothing is created in the root namespace: every `ip` command runs with
//! `-n NS`, and every veth is created inside a lab namespace.
#![allow(dead_code)]

use std::net::IpAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use cni_core::ipam::{Allocation, Attachment};
use cni_core::linux::{BridgeConfig, BridgeNetwork, NetNs};
use cni_core::network::{Pod, PodNetwork};
use cni_core::registry::NodeRecord;
use cni_core::routing::{CrossNodeRouting, LocalNode};
use cni_core::spec::IpConfig;
use testkit::{Namespaces, ip, ip_json};

/// Whether the test can run; says loudly why not.
pub fn root(what: &str) -> bool {
    if !testkit::root(what) {
        return false;
    }
    match ["ip", "bridge", "ping"]
        .into_iter()
        .find(|t| !testkit::on_path(t))
    {
        Some(tool) => {
            testkit::skip(
                what,
                format_args!("needs the {tool} command (iproute2, iputils-ping)"),
            );
            false
        }
        None => true,
    }
}

/// The namespaces of one test, deleted on drop.
pub struct Lab {
    namespaces: Namespaces,
    ports: AtomicU32,
}

impl Lab {
    /// A lab whose namespaces are named `cnkt-TAG-PID-…`.
    pub fn new(tag: &str) -> Self {
        Lab {
            namespaces: Namespaces::new(tag),
            ports: AtomicU32::new(0),
        }
    }

    /// The full name of the namespace `suffix`.
    pub fn name(&self, suffix: &str) -> String {
        self.namespaces.name(suffix)
    }

    /// Creates the namespace `suffix` with `lo` up and returns its full name.
    pub fn netns(&self, suffix: &str) -> String {
        let name = self.namespaces.add(suffix);
        ip(&name, &["link", "set", "lo", "up"]);
        name
    }

    /// A switch: a namespace with a bridge `br0`, up.
    pub fn switch(&self, suffix: &str) -> String {
        let ns = self.netns(suffix);
        ip(&ns, &["link", "add", "br0", "type", "bridge"]);
        ip(&ns, &["link", "set", "br0", "up"]);
        ns
    }

    /// Plugs `ns` into `switch` with a veth: `ifname` in `ns`, with `cidr` on it, up.
    pub fn attach(&self, switch: &str, ns: &str, ifname: &str, cidr: &str) {
        let port = format!("p{}", self.ports.fetch_add(1, Ordering::Relaxed));
        ip(
            switch,
            &[
                "link", "add", &port, "type", "veth", "peer", "name", ifname, "netns", ns,
            ],
        );
        ip(switch, &["link", "set", &port, "master", "br0", "up"]);
        ip(ns, &["addr", "add", cidr, "dev", ifname]);
        ip(ns, &["link", "set", ifname, "up"]);
    }

    /// A node on `switch`: `eth0` with `cidr`, forwarding on, a default route via
    /// `gateway` if given.
    pub fn node(&self, suffix: &str, switch: &str, cidr: &str, gateway: Option<&str>) -> String {
        let ns = self.netns(suffix);
        self.attach(switch, &ns, "eth0", cidr);
        sysctl(&ns, "net.ipv4.ip_forward=1");
        if let Some(gw) = gateway {
            ip(&ns, &["route", "add", "default", "via", gw]);
        }
        ns
    }

    /// A router with one leg (`ethN`, address `cidr`) on each `(switch, cidr)`.
    pub fn router(&self, suffix: &str, legs: &[(&str, &str)]) -> String {
        let ns = self.netns(suffix);
        for (i, (switch, cidr)) in legs.iter().enumerate() {
            self.attach(switch, &ns, &format!("eth{i}"), cidr);
        }
        sysctl(&ns, "net.ipv4.ip_forward=1");
        ns
    }

    /// A pod on `node`, plugged in by cni-core's bridge pod network with `address` (its
    /// block's `.1` is the gateway on the node's bridge) and `mtu`. Returns the pod's
    /// namespace.
    pub async fn pod(
        &self,
        node: &str,
        suffix: &str,
        address: &str,
        gateway: &str,
        mtu: u32,
    ) -> String {
        let pod_ns = self.netns(suffix);
        let host = NetNs::named(node).await.expect("open node netns");
        let network = BridgeNetwork::new(
            BridgeConfig {
                mtu,
                ..BridgeConfig::default()
            },
            host,
        )
        .expect("bridge network");
        let allocation = Allocation {
            ips: vec![IpConfig {
                address: address.parse().expect("pod address"),
                gateway: Some(gateway.parse().expect("gateway")),
                interface: None,
            }],
            ..Allocation::default()
        };
        network
            .add(
                &Pod {
                    attachment: Attachment::new("cnkt-net", &pod_ns, "eth0"),
                    netns: Some(testkit::netns_path(&pod_ns)),
                },
                &allocation,
            )
            .await
            .expect("plug the pod in");
        pod_ns
    }
}

/// One node of a test cluster: its namespace and what the agent would know of it.
pub struct NodeSpec {
    /// Namespace name.
    pub ns: String,
    /// What `init` gets.
    pub local: LocalNode,
}

impl NodeSpec {
    /// The node's record for its peers, with the backend's data.
    pub fn record(&self, data: std::collections::BTreeMap<String, String>) -> NodeRecord {
        NodeRecord {
            name: self.local.name.clone(),
            address: self.local.address,
            prefix_len: self.local.prefix_len,
            blocks: self.local.blocks.clone(),
            backend: data,
        }
    }
}

/// A node of [`cluster`]: its name, switch, underlay address/prefix, default gateway.
pub type NodeDef<'a> = (&'a str, &'a str, &'a str, Option<&'a str>);

/// The nodes, each with a pod (`10.244.N.2` in block `10.244.N.0/24`, pod MTU = underlay MTU
/// − the backend's overhead) and a backend made by `backend` in its namespace and
/// initialized; returns their specs, pod namespaces, backends and records.
pub async fn cluster<B: CrossNodeRouting>(
    lab: &Lab,
    nodes: &[NodeDef<'_>],
    backend: impl Fn(NetNs) -> B,
) -> (Vec<NodeSpec>, Vec<String>, Vec<B>, Vec<NodeRecord>) {
    let (mut specs, mut pods, mut backends, mut records) = (vec![], vec![], vec![], vec![]);
    for (i, (name, switch, cidr, gw)) in nodes.iter().enumerate() {
        let n = i + 1;
        let spec = NodeSpec {
            local: local(name, cidr, &format!("10.244.{n}.0/24")),
            ns: lab.node(name, switch, cidr, *gw),
        };
        let mut b = backend(NetNs::named(&spec.ns).await.expect("open node"));
        b.init(&spec.local).await.expect("init");
        let pod_mtu = spec.local.underlay_mtu - b.mtu_overhead();
        let pod = lab
            .pod(
                &spec.ns,
                &format!("{name}-pod"),
                &format!("10.244.{n}.2/24"),
                &format!("10.244.{n}.1"),
                pod_mtu,
            )
            .await;
        records.push(spec.record(b.node_data()));
        specs.push(spec);
        pods.push(pod);
        backends.push(b);
    }
    (specs, pods, backends, records)
}

/// The `LocalNode` of a lab node: underlay `eth0` with `cidr`, MTU 1500, one block.
pub fn local(name: &str, cidr: &str, block: &str) -> LocalNode {
    let net: ipnet::IpNet = cidr.parse().expect("cidr");
    LocalNode {
        name: name.into(),
        address: net.addr(),
        prefix_len: net.prefix_len(),
        interface: "eth0".into(),
        underlay_mtu: 1500,
        blocks: vec![block.parse().expect("block")],
        tunnel_address: None,
    }
}

/// `sysctl -w KEY=VALUE` inside `ns`.
pub fn sysctl(ns: &str, setting: &str) {
    testkit::exec_in(ns, &["sysctl", "-qw", setting]);
}

/// Whether `ns` gets an answer from `dst`, trying up to three times (the first packet
/// may wait for neighbour resolution).
pub fn ping(ns: &str, dst: IpAddr) -> bool {
    (0..3).any(|_| ping_once(ns, dst, &[]))
}

/// One ping with extra arguments (`-s SIZE -M do`), one second to answer.
pub fn ping_once(ns: &str, dst: IpAddr, extra: &[&str]) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-c1", "-W1", "-q"])
        .args(extra)
        .arg(dst.to_string())
        .output()
        .expect("run ping")
        .status
        .success()
}

/// The routes with cnikit's protocol in `ns`'s main table, as `(dst, gateway, dev)`.
pub fn cnikit_routes(ns: &str) -> Vec<(String, String, String)> {
    let proto = cni_core::linux::kernel::ROUTE_PROTOCOL.to_string();
    let mut routes: Vec<_> = ip_json(ns, &["route", "show", "table", "main", "proto", &proto])
        .iter()
        .map(|r| {
            (
                r["dst"].as_str().unwrap_or_default().to_owned(),
                r["gateway"].as_str().unwrap_or_default().to_owned(),
                r["dev"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    routes.sort();
    routes
}

/// The node of the scale tests: `eth0` with 172.16.0.1/16 (its other end in a second
/// namespace, so that it has a carrier), block 10.0.0.0/26. Returns the node's namespace
/// and its `LocalNode`.
pub fn scale_node(lab: &Lab) -> (String, LocalNode) {
    let node = lab.netns("node");
    let far = lab.netns("far");
    ip(
        &far,
        &[
            "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", &node,
        ],
    );
    ip(&far, &["link", "set", "up0", "up"]);
    ip(&node, &["addr", "add", "172.16.0.1/16", "dev", "eth0"]);
    ip(&node, &["link", "set", "eth0", "up"]);
    (node, local("node", "172.16.0.1/16", "10.0.0.0/26"))
}

/// Simulated peer `i` (0-based) of the scale tests: underlay address in 172.16.0.0/16,
/// block `10.0.0.0 + (i+1)·64` /26 (a /8 pool), VTEP = the block's network address with
/// MAC `0a:00:00:00:HI:LO` of i+1.
pub fn scale_peer(i: u32) -> NodeRecord {
    let n = i + 1;
    let block = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 0, 0, 0)) + n * 64);
    NodeRecord {
        name: format!("peer-{i:04}"),
        address: format!("172.16.{}.{}", 1 + i / 200, 10 + i % 200)
            .parse()
            .expect("address"),
        prefix_len: 16,
        blocks: vec![ipnet::IpNet::new(IpAddr::V4(block), 26).expect("block")],
        backend: std::collections::BTreeMap::from([
            (
                "vtepMac".to_owned(),
                format!("0a:00:00:00:{:02x}:{:02x}", n >> 8, n & 0xff),
            ),
            ("vtepAddr".to_owned(), block.to_string()),
        ]),
    }
}
