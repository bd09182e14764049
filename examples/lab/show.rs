//! `show`: each node's devices, addresses, routes, neighbours and FDB entries, read with
//! `ip -j` and `bridge -j` inside the node's namespace, each with what it is for.
//!
//! The explanations come from matching every entry against what the lab knows about the
//! cluster: each node's underlay address, blocks (its node state file), VTEP (the address
//! and MAC of its VXLAN device), tunnel address (of its IPIP device) and pods (their
//! addresses, MACs and host-side veths).

use std::net::IpAddr;

use anyhow::Result;
use cnikit::core::linux::veth;
use cnikit::core::state::NodeState;
use ipnet::IpNet;
use serde_json::Value;

use crate::net::{self, NODE_NIC, bridge_json, ip_json};
use crate::state::{self, Lab, Node};
use crate::{bgp, modes};

/// A pod as `show` needs it.
#[derive(Debug, Clone)]
pub struct PodView {
    /// `node1/pod1`.
    pub name: String,
    /// Namespace.
    pub ns: String,
    /// Address.
    pub ip: Option<IpAddr>,
    /// MAC of its `eth0`.
    pub mac: Option<String>,
    /// Name of the host end of its veth.
    pub host_veth: String,
}

/// A node as `show` needs it.
#[derive(Debug, Clone)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// Underlay address.
    pub address: IpAddr,
    /// Its underlay segment.
    pub subnet: String,
    /// Its blocks (from its node state file).
    pub blocks: Vec<IpNet>,
    /// Its node state file, if written.
    pub state: Option<NodeState>,
    /// VTEP address and MAC, when it has a VXLAN device.
    pub vtep: Option<(IpAddr, String)>,
    /// The address of its IPIP device (its tunnel address), when it has one.
    pub tunnel: Option<IpAddr>,
    /// Its pods.
    pub pods: Vec<PodView>,
}

/// Everything the explanations refer to.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Routing mode.
    pub mode: String,
    /// Every node.
    pub nodes: Vec<NodeView>,
    /// Router addresses, one per segment.
    pub routers: Vec<IpAddr>,
    /// Whether the pod network is the routed one.
    pub routed: bool,
    /// Which peers IPIP tunnels to, in `ipip` mode.
    pub ipip_mode: Option<cnikit::ipip::Mode>,
    /// The lab's name.
    pub lab: String,
    /// Whether the pod network is `ebpf` (its maps and programs are shown).
    pub ebpf: bool,
    /// The nodes that are BGP route reflectors.
    pub reflectors: Vec<String>,
}

impl Cluster {
    /// Reads what the lab knows and each node's VTEP from its kernel.
    pub async fn gather(lab: &Lab) -> Cluster {
        let mut nodes = Vec::new();
        for node in &lab.nodes {
            let state = NodeState::read(&node.data_dir()).ok().flatten();
            // Only the mode's own tunnel device can exist: look up no other.
            let vtep = match lab.mode.as_str() {
                cnikit::vxlan::TYPE => device_address(&node.ns, modes::VXLAN_DEVICE).await,
                _ => None,
            };
            let tunnel = match lab.ipip_mode {
                Some(_) => device_address(&node.ns, modes::IPIP_DEVICE)
                    .await
                    .map(|(addr, _)| addr),
                None => None,
            };
            let pods = node
                .pods
                .iter()
                .map(|p| PodView {
                    name: p.name.clone(),
                    ns: p.ns.clone(),
                    ip: p.ip().and_then(|ip| ip.parse().ok()),
                    mac: pod_mac(p.result.as_ref()),
                    host_veth: veth::host_name(&p.container_id, state::POD_IFNAME),
                })
                .collect();
            nodes.push(NodeView {
                name: node.name.clone(),
                address: IpAddr::V4(node.address),
                subnet: lab.underlays[node.underlay].subnet(),
                blocks: state.as_ref().map(|s| s.blocks.clone()).unwrap_or_default(),
                state,
                vtep,
                tunnel,
                pods,
            });
        }
        Cluster {
            mode: lab.mode.clone(),
            routed: lab.pod_network != state::PodNetwork::Bridge,
            lab: lab.name.clone(),
            ebpf: lab.pod_network == state::PodNetwork::Ebpf,
            ipip_mode: lab.ipip_mode,
            reflectors: lab
                .nodes
                .iter()
                .filter(|n| n.reflector)
                .map(|n| n.name.clone())
                .collect(),
            routers: if lab.router.is_some() {
                lab.underlays
                    .iter()
                    .map(|u| IpAddr::V4(u.router()))
                    .collect()
            } else {
                Vec::new()
            },
            nodes,
        }
    }

    fn node_of_block(&self, dst: &str) -> Option<&NodeView> {
        let net: IpNet = dst.parse().ok()?;
        self.nodes.iter().find(|n| n.blocks.contains(&net))
    }

    fn node_by_address(&self, ip: &str) -> Option<&NodeView> {
        let ip: IpAddr = ip.parse().ok()?;
        self.nodes.iter().find(|n| n.address == ip)
    }

    fn node_by_vtep(&self, ip: &str) -> Option<&NodeView> {
        let ip: IpAddr = ip.parse().ok()?;
        self.nodes
            .iter()
            .find(|n| n.vtep.as_ref().is_some_and(|(a, _)| *a == ip))
    }

    fn node_by_vtep_mac(&self, mac: &str) -> Option<&NodeView> {
        self.nodes.iter().find(|n| {
            n.vtep
                .as_ref()
                .is_some_and(|(_, m)| m.eq_ignore_ascii_case(mac))
        })
    }

    fn pod_by_ip(&self, ip: &str) -> Option<&PodView> {
        let ip: IpAddr = ip.split('/').next()?.parse().ok()?;
        self.nodes
            .iter()
            .flat_map(|n| &n.pods)
            .find(|p| p.ip == Some(ip))
    }

    fn pod_by_mac(&self, mac: &str) -> Option<&PodView> {
        self.nodes.iter().flat_map(|n| &n.pods).find(|p| {
            p.mac
                .as_deref()
                .is_some_and(|m| m.eq_ignore_ascii_case(mac))
        })
    }

    fn pod_by_veth(&self, dev: &str) -> Option<&PodView> {
        self.nodes
            .iter()
            .flat_map(|n| &n.pods)
            .find(|p| p.host_veth == dev)
    }

    fn view(&self, name: &str) -> Option<&NodeView> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// The IPv4 address and link-layer address of device `dev` in `ns`, if it exists: a VXLAN
/// device's VTEP and its MAC; an IPIP device's tunnel address (and its local underlay
/// address, which `ip` prints as its link-layer address).
async fn device_address(ns: &str, dev: &str) -> Option<(IpAddr, String)> {
    let links = ip_json(ns, &["addr", "show", "dev", dev]).await.ok()?;
    let link = links.first()?;
    let mac = link["address"].as_str()?.to_owned();
    let addr = link["addr_info"]
        .as_array()?
        .iter()
        .find(|a| a["family"] == "inet")?["local"]
        .as_str()?
        .parse()
        .ok()?;
    Some((addr, mac))
}

/// The MAC of the pod's interface in an ADD result.
fn pod_mac(result: Option<&Value>) -> Option<String> {
    result?["interfaces"]
        .as_array()?
        .iter()
        .find(|i| i.get("sandbox").is_some())?["mac"]
        .as_str()
        .map(str::to_owned)
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

fn has_flag(v: &Value, key: &str, flag: &str) -> bool {
    v[key]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x.as_str() == Some(flag)))
}

fn is_multicast_mac(mac: &str) -> bool {
    mac.starts_with("33:33:") || mac.starts_with("01:00:5e:")
}

/// A route as `ip route` prints it.
fn route_line(r: &Value) -> String {
    let mut out = Vec::new();
    if s(r, "type") != "unicast" && !s(r, "type").is_empty() {
        out.push(s(r, "type").to_owned());
    }
    out.push(s(r, "dst").to_owned());
    if !s(r, "gateway").is_empty() {
        out.push(format!("via {}", s(r, "gateway")));
    }
    if !s(r, "dev").is_empty() {
        out.push(format!("dev {}", s(r, "dev")));
    }
    if !s(r, "protocol").is_empty() {
        out.push(format!("proto {}", s(r, "protocol")));
    }
    if s(r, "scope") == "link" {
        out.push("scope link".into());
    }
    if let Some(m) = r["metric"].as_u64() {
        out.push(format!("metric {m}"));
    }
    if has_flag(r, "flags", "onlink") {
        out.push("onlink".into());
    }
    out.join(" ")
}

/// What a route is for.
fn explain_route(c: &Cluster, me: &NodeView, r: &Value) -> String {
    let dst = s(r, "dst");
    let gw = s(r, "gateway");
    let dev = s(r, "dev");
    let proto = s(r, "protocol");
    if s(r, "type") == "blackhole" {
        let why = if c.routed {
            "each pod's /32 wins over it, so traffic to an address of the block that no pod \
             holds ends here instead of leaving the node again"
        } else {
            "the bridge's connected route for the same block (metric 0) wins while the bridge \
             holds the block's gateway; without it, traffic to the block ends here instead of \
             leaving the node again"
        };
        return format!(
            "blackhole for this node's own block {dst} (proto 108, metric 1024: the agent's): \
             {why}"
        );
    }
    if c.mode == cnikit::bgp::TYPE && proto == "bird" {
        let owner = c.node_of_block(dst).map(|n| n.name.as_str()).unwrap_or("?");
        return explain_bgp_route(me, owner, dst, gw, dev);
    }
    if proto == "107" {
        let owner = c.node_of_block(dst).map(|n| n.name.as_str()).unwrap_or("?");
        if c.mode == cnikit::bgp::TYPE {
            return explain_bgp_route(me, owner, dst, gw, dev);
        }
        if dev == modes::EBPF_DEVICE {
            return format!(
                "route to {owner}'s block through the collect_md VXLAN device, for what the \
                 node's own stack sends there (pods' packets never reach this table: from_pod \
                 tunnels them itself); onlink via {owner}'s underlay address {gw}, whose \
                 permanent neighbour entry below spares an ARP into the tunnel; to_tunnel on \
                 the device's egress sets the tunnel key from the `remotes` map (proto 107: \
                 the agent's)"
            );
        }
        if dev == modes::VXLAN_DEVICE {
            return format!(
                "VXLAN route to {owner}'s block via {owner}'s VTEP {gw}; onlink because the \
                 VTEP is in no connected subnet: the permanent neighbour entry below gives its \
                 MAC, the FDB entry where to send the UDP packet (proto 107: the agent's)"
            );
        }
        if dev == modes::IPIP_DEVICE {
            let owner_view = c.node_of_block(dst);
            let why = match (c.ipip_mode, owner_view) {
                (Some(cnikit::ipip::Mode::CrossSubnet), Some(o)) => format!(
                    "crossSubnet tunnels {owner} because it is on {}, not on this node's {}: \
                     only the router joins them",
                    o.subnet, me.subnet
                ),
                (Some(cnikit::ipip::Mode::CrossSubnet), None) => {
                    "crossSubnet tunnels it: not on this node's subnet".into()
                }
                _ => {
                    "mode always: every peer goes through the tunnel, on this segment or not".into()
                }
            };
            return format!(
                "IPIP route to {owner}'s block via {owner}'s underlay address {gw}: the packet \
                 gets an outer IPv4 header {} -> {gw} (IP protocol 4) and leaves by {NODE_NIC} \
                 along the underlay's route to {gw}. \
                 onlink: {gw} is in no subnet of {dev} (its only address is a /32), so without \
                 it the kernel refuses the gateway as unreachable; the tunnel has no link \
                 layer, nothing is resolved, the gateway only becomes the outer destination. \
                 {why} (proto 107: the agent's)",
                me.address
            );
        }
        if c.mode == cnikit::ipip::TYPE {
            return format!(
                "crossSubnet, not tunnelled: {owner} shares this node's underlay subnet {}, so \
                 its block goes straight to its underlay address {gw}, as host-gw does: no \
                 outer header on the wire (proto 107: the agent's)",
                me.subnet
            );
        }
        if c.mode == "vxlan" {
            return format!(
                "DirectRouting: {owner} shares this segment, so its block goes straight to its \
                 underlay address {gw}, without the tunnel (proto 107: the agent's)"
            );
        }
        return format!(
            "host-gw route to {owner}'s block via {owner}'s underlay address {gw}: same L2 \
             segment, so the packet is sent to {owner}'s MAC as it is, no encapsulation \
             (proto 107: the agent's)"
        );
    }
    if dev == "cnikit0" && me.blocks.iter().any(|b| b.to_string() == dst) {
        return format!(
            "this node's block {dst} on the pod bridge (connected, from the gateway address): \
             pods of this node are reached directly"
        );
    }
    if let Some(pod) = c.pod_by_veth(dev) {
        return format!(
            "routed pod network: host route to {}'s /32 through its veth {dev} (added by the \
             plugin at ADD)",
            pod.name
        );
    }
    if dev == NODE_NIC && proto == "kernel" {
        return format!("this node's underlay segment {dst} (connected): peers on it are on-link");
    }
    if !gw.is_empty() && c.routers.iter().any(|r| r.to_string() == gw) {
        return format!(
            "the other underlay segment {dst} via the router {gw}: peers there are off-link{}",
            match c.mode.as_str() {
                "host-gw" => " (host-gw cannot route their blocks: reported unroutable)",
                "vxlan" => " (VXLAN's UDP packets to them take this route)",
                "ipip" => " (IPIP's outer packets to them take this route)",
                "bgp" => " (BGP installs no next hop behind it: reported unroutable)",
                _ => "",
            }
        );
    }
    "a route not made by cnikit or the lab".into()
}

/// What a route the BGP speaker installed is for: which session brought it.
fn explain_bgp_route(me: &NodeView, owner: &str, dst: &str, gw: &str, dev: &str) -> String {
    let report = me.state.as_ref().and_then(bgp::report);
    let bird = report
        .as_ref()
        .is_some_and(|r| r.engine == cnikit::bgp::Engine::Bird);
    let (proto, installer) = if bird {
        ("proto bird", "BIRD's kernel protocol")
    } else {
        ("proto 107", "the speaker")
    };
    // BIRD's report names the peer of a route after its next hop: a reflected route is
    // listed under its owner (or the bare next hop), with whom this node has no session.
    let peer = report.as_ref().and_then(|r| {
        bgp::learned_from(r, dst, gw).filter(|p| r.peers.iter().any(|s| s.name == *p))
    });
    if peer.is_none()
        && owner != "?"
        && report.as_ref().is_some_and(|r| {
            r.installed
                .values()
                .flatten()
                .any(|x| x == &format!("{dst} via {gw}"))
        })
    {
        return format!(
            "learned over BGP through a route reflector: it reflected {owner}'s block {dst} \
             with NEXT_HOP {gw} ({owner}'s underlay address, unchanged by reflection) and \
             {installer} put it here ({proto}); {gw} is on {dev}'s segment, no \
             encapsulation. It goes when {owner} withdraws the block or leaves"
        );
    }
    let Some(peer) = peer else {
        return format!(
            "a BGP route ({proto}) that the node's BGP report does not list: left from an \
             earlier run (a restarted speaker keeps them until its peers have told again what \
             they have) or the report is older than the route"
        );
    };
    let announced = if owner == peer {
        format!("{peer} announced its block {dst} with NEXT_HOP {gw} (its underlay address)")
    } else {
        format!(
            "{peer}, a route reflector, reflected {owner}'s block {dst} with NEXT_HOP {gw} \
             ({owner}'s underlay address: reflection keeps it)"
        )
    };
    if dev == modes::IPIP_DEVICE {
        return format!(
            "learned over BGP from {peer}: {announced} and {installer} put it here ({proto}) \
             through the IPIP device: ENCAPSULATED, the packet gets an outer IPv4 header to {gw}; onlink \
             because the tunnel has no subnet {gw} is in. It goes when {peer} withdraws the \
             block or the session ends"
        );
    }
    format!(
        "learned over BGP from {peer}: {announced} and {installer} put it here ({proto}). \
         {gw} is on {dev}'s segment, so the packet goes to {owner}'s MAC as it is, no \
         encapsulation. Without it the pods of {owner} are unreachable from here; it goes \
         when {peer} withdraws the block or the session ends"
    )
}

/// What a route inside a pod is for.
fn explain_pod_route(r: &Value) -> String {
    let dst = s(r, "dst");
    let gw = s(r, "gateway");
    match (dst, gw) {
        ("default", "169.254.1.1") => "the pod's default route via 169.254.1.1: an address no \
             one has; the host end of the veth answers its ARP (proxy ARP), so every packet \
             goes to the node, which routes it"
            .into(),
        ("default", gw) => format!(
            "the pod's default route via {gw}, the node's pod bridge: everything off the \
             block goes to the node, which routes it"
        ),
        ("169.254.1.1", _) => "makes the gateway 169.254.1.1 on-link on eth0".into(),
        (dst, "") => format!(
            "the block {dst} is on-link: pods of the same node are reached over the bridge \
             directly"
        ),
        _ => "a route of the pod".into(),
    }
}

/// What a neighbour entry is for.
fn explain_neigh(c: &Cluster, n: &Value) -> String {
    let dst = s(n, "dst");
    let dev = s(n, "dev");
    let permanent = has_flag(n, "state", "PERMANENT");
    if dev == modes::EBPF_DEVICE {
        return match c.node_by_address(dst) {
            Some(peer) => format!(
                "{}'s underlay address, the gateway of the routes to its blocks: a MAC for the \
                 frames the node's stack sends into the tunnel (from_tunnel on {} takes them \
                 whatever it is), written by the agent so no ARP goes into the tunnel",
                peer.name, peer.name
            ),
            None => "a neighbour on the eBPF tunnel device that matches no current peer".into(),
        };
    }
    if dev == modes::VXLAN_DEVICE {
        if let Some(peer) = c.node_by_vtep(dst) {
            return format!(
                "{}'s VTEP {dst} -> its VTEP MAC{}: written by the agent, so the kernel never \
                 sends an ARP request into the tunnel",
                peer.name,
                if permanent { ", permanent" } else { "" }
            );
        }
        return "a neighbour on the VXLAN device that matches no current peer".into();
    }
    if let Some(peer) = c.node_by_address(dst) {
        return format!(
            "ARP entry for {}'s underlay address, learned by the kernel: the next hop of {} to \
             {}",
            peer.name,
            match c.mode.as_str() {
                "vxlan" => "VXLAN's UDP packets",
                "ipip" => "IPIP's outer packets (and crossSubnet's direct routes)",
                "bgp" => "the routes BGP learned, and of the BGP session itself (TCP 179)",
                _ => "host-gw routes",
            },
            peer.name
        );
    }
    if c.routers.iter().any(|r| r.to_string() == dst) {
        return "ARP entry for the router to the other segment, learned by the kernel".into();
    }
    if let Some(pod) = c.pod_by_ip(dst) {
        return format!(
            "ARP entry for pod {} on {dev}, learned by the kernel",
            pod.name
        );
    }
    "a neighbour entry".into()
}

/// What an FDB entry is for; `None` for the multicast entries counted in one line.
fn explain_fdb(c: &Cluster, f: &Value) -> Option<String> {
    let mac = s(f, "mac");
    let dev = s(f, "ifname");
    let dst = s(f, "dst");
    let master = s(f, "master");
    if dev == modes::VXLAN_DEVICE {
        let who = c
            .node_by_vtep_mac(mac)
            .map(|n| n.name.as_str())
            .unwrap_or("?");
        let to = c
            .node_by_address(dst)
            .map(|n| n.name.as_str())
            .unwrap_or("?");
        return Some(format!(
            "{who}'s VTEP MAC -> {to}'s underlay address {dst}: a frame for that MAC leaves in \
             a UDP packet to {dst} (written by the agent; learning is off)"
        ));
    }
    if !master.is_empty() {
        if s(f, "state") == "permanent" {
            return Some(if dev == master {
                format!("the bridge {master}'s own MAC")
            } else {
                format!("the MAC of port {dev} itself (local to the bridge)")
            });
        }
        let pod = c
            .pod_by_mac(mac)
            .map(|p| p.name.as_str())
            .unwrap_or("a pod");
        return Some(format!(
            "learned by the bridge {master}: {pod}'s MAC is behind port {dev}"
        ));
    }
    if is_multicast_mac(mac) {
        return None;
    }
    Some("a local entry of the device".into())
}

fn fdb_line(f: &Value) -> String {
    let mut out = vec![s(f, "mac").to_owned(), format!("dev {}", s(f, "ifname"))];
    if !s(f, "dst").is_empty() {
        out.push(format!("dst {}", s(f, "dst")));
    }
    if !s(f, "master").is_empty() {
        out.push(format!("master {}", s(f, "master")));
    }
    for flag in f["flags"].as_array().into_iter().flatten() {
        out.push(flag.as_str().unwrap_or("").to_owned());
    }
    if !s(f, "state").is_empty() {
        out.push(s(f, "state").to_owned());
    }
    out.join(" ")
}

/// What a device is for; `underlay_mtu` is the MTU of the node's underlay NIC.
fn explain_link(c: &Cluster, me: &NodeView, l: &Value, underlay_mtu: Option<u64>) -> String {
    let name = s(l, "ifname");
    let kind = l["linkinfo"]["info_kind"].as_str().unwrap_or("");
    let master = s(l, "master");
    if name == "lo" {
        return "loopback".into();
    }
    if name == NODE_NIC {
        return format!(
            "underlay NIC: veth to the bridge of segment {} (its peer, `{}`, is a port there); \
             {} here",
            me.subnet,
            me.name,
            match c.mode.as_str() {
                "vxlan" => "node-to-node traffic and VXLAN's UDP packets leave",
                "ipip" => "node-to-node traffic and IPIP's outer packets leave",
                _ => "node-to-node traffic leaves",
            }
        );
    }
    match kind {
        "bridge" => format!(
            "pod bridge: each pod's host-side veth is a port; its address is the pods' default \
             gateway and makes the node's block a connected subnet; MTU {}",
            l["mtu"]
        ),
        "vxlan" if l["linkinfo"]["info_data"]["external"] == true => format!(
            "VXLAN device in external (collect_md) mode: no VNI, remote or FDB of its own; \
             each packet's tunnel key (remote node, VNI) is set by an eBPF program (from_pod \
             on the pods' veths, to_tunnel on its egress) and from_tunnel on its ingress \
             reads it; UDP port {}, MTU {} = underlay MTU - 50",
            l["linkinfo"]["info_data"]["port"], l["mtu"]
        ),
        "vxlan" => {
            let d = &l["linkinfo"]["info_data"];
            format!(
                "VXLAN device: VNI {}, UDP port {}, local {} (this node's underlay address), \
                 dev {}, learning {}; its /32 address is this node's VTEP, taken from the \
                 node's own block so no pod gets it; MTU {} = underlay MTU - 50 bytes of \
                 outer Ethernet/IP/UDP/VXLAN headers",
                d["id"],
                d["port"],
                d["local"].as_str().unwrap_or("?"),
                d["link"].as_str().unwrap_or("?"),
                if d["learning"] == true { "ON" } else { "off" },
                l["mtu"]
            )
        }
        "ipip" if name == modes::IPIP_DEVICE => explain_ipip_device(me, l, underlay_mtu),
        "ipip" if name == cnikit::ipip::FALLBACK_DEVICE => "the ipip module's fallback device: \
             the module makes it in every namespace when it loads, and it takes the IPIP \
             packets no other device claims. cnikit leaves it alone (down, no address): its \
             parameters cannot be changed and it cannot be deleted, so no one could tell whose \
             it is (Calico uses it); cnikit.ipip takes the packets for this node's address \
             ahead of it"
            .into(),
        "veth" => match c.pod_by_veth(name) {
            Some(pod) => {
                let ip = pod.ip.map(|i| i.to_string()).unwrap_or_default();
                if master.is_empty() {
                    format!(
                        "host end of pod {}'s veth (its `eth0` {ip}); routed: no bridge, proxy \
                         ARP answers the pod's ARP for its gateway 169.254.1.1, a /32 route \
                         points here",
                        pod.name
                    )
                } else {
                    format!(
                        "host end of pod {}'s veth (its `eth0` {ip}), a port of {master}",
                        pod.name
                    )
                }
            }
            None => "a veth that belongs to no pod of the lab".into(),
        },
        "" => "a device".into(),
        other => format!("a {other} device"),
    }
}

/// What the IPIP device and its address are for.
fn explain_ipip_device(me: &NodeView, l: &Value, underlay_mtu: Option<u64>) -> String {
    let d = &l["linkinfo"]["info_data"];
    let mtu = l["mtu"].as_u64().unwrap_or(0);
    let underlay = match underlay_mtu {
        Some(u) => format!("underlay MTU {u} - 20"),
        None => "underlay MTU - 20".into(),
    };
    let address = match me.tunnel {
        Some(addr) => {
            let block = me
                .blocks
                .iter()
                .find(|b| b.contains(&addr))
                .map(|b| format!(" {b}"))
                .unwrap_or_default();
            format!(
                "Its /32 address {addr} is this node's tunnel address, taken from the node's \
                 own block{block} (the agent allocates it, so no pod gets it): what the node \
                 itself sends to a remote pod (a ping from the node, a health check) leaves \
                 with it as source, an address of this node's block that every peer routes \
                 back through its own tunnel. Without it the source would be the underlay \
                 address and the answer would come back unencapsulated, or not at all across \
                 a network that carries only node-to-node IPIP."
            )
        }
        None => "It has no address yet.".into(),
    };
    // What the device says, not what cnikit means to make: a device made by hand shows.
    let remote = match d["remote"].as_str() {
        Some("any") => "remote any (each route's gateway is the outer destination)".to_owned(),
        Some(other) => format!("remote {other} (every packet goes to it, whatever the route)"),
        None => "remote ?".to_owned(),
    };
    let ttl = match d["ttl"].as_u64() {
        Some(0) => "ttl inherit (the outer TTL is the inner packet's)".to_owned(),
        Some(ttl) => format!("ttl {ttl}"),
        None => "ttl ?".to_owned(),
    };
    let pmtudisc = if d["pmtudisc"] == true {
        "pmtudisc on (outer packets carry don't-fragment: too big means an ICMP error to the \
         sender, never fragments)"
    } else {
        "pmtudisc OFF (outer packets may be fragmented on the way)"
    };
    format!(
        "IPIP device: local {} (this node's underlay address, the outer source), underlay \
         link {}, {remote}, {ttl}, {pmtudisc}; it also takes in the IPIP packets sent to {}. \
         MTU {mtu} = {underlay} bytes of the outer IPv4 header; the pods get the same MTU, so \
         a full-size pod packet still fits the underlay once wrapped. {address}",
        d["local"].as_str().unwrap_or("?"),
        d["link"].as_str().unwrap_or("?"),
        d["local"].as_str().unwrap_or("?"),
    )
}

/// Per peer: whether IPIP encapsulates its traffic and why, from the routes in `routes`.
fn ipip_peers(c: &Cluster, me: &NodeView, routes: &[Value]) {
    let mode = c.ipip_mode.unwrap_or_default();
    println!("IPIP per peer (mode {}):", mode.as_str());
    for peer in c.nodes.iter().filter(|n| n.name != me.name) {
        let blocks: Vec<String> = peer.blocks.iter().map(|b| b.to_string()).collect();
        let devs: Vec<&str> = routes
            .iter()
            .filter(|r| {
                matches!(s(r, "protocol"), "107" | "bird")
                    && blocks.iter().any(|b| b == s(r, "dst"))
            })
            .map(|r| s(r, "dev"))
            .collect();
        let same = peer.subnet == me.subnet;
        let line = format!(
            "{} {} on {}",
            peer.name,
            peer.address,
            if same {
                "this node's subnet".to_owned()
            } else {
                peer.subnet.clone()
            }
        );
        let why = if devs.is_empty() {
            "no route to its blocks (yet): see the node state below".to_owned()
        } else if devs.iter().all(|d| *d == modes::IPIP_DEVICE) {
            format!(
                "ENCAPSULATED through {}: {}",
                modes::IPIP_DEVICE,
                match (mode, same) {
                    (cnikit::ipip::Mode::Always, _) => "mode always tunnels every peer",
                    (_, false) => "another subnet, reached through the router",
                    (_, true) => "UNEXPECTED for crossSubnet: it shares this node's subnet",
                }
            )
        } else if devs.iter().all(|d| *d == NODE_NIC) {
            format!(
                "direct via {NODE_NIC}, no encapsulation: {}",
                if same {
                    "crossSubnet, and it shares this node's subnet (one L2 segment)"
                } else {
                    "UNEXPECTED: it is behind the router"
                }
            )
        } else {
            format!("routes through {}", devs.join(", "))
        };
        item(&line, &why);
    }
}

/// Each BGP session of node `me`, then what its speaker could not install.
fn bgp_sessions(c: &Cluster, me: &str, report: &cnikit::bgp::Report) {
    println!(
        "BGP sessions (AS {}, router id {}, listening on {}):",
        report.as_number, report.router_id, report.listen
    );
    if report.peers.is_empty() {
        println!("  (none: no peer in the registry)");
    }
    for p in &report.peers {
        let reflects = |name: &str| c.reflectors.iter().any(|r| r == name);
        let role = match (c.reflectors.is_empty(), reflects(me)) {
            (true, _) => bgp::Role::Mesh,
            (false, true) => bgp::Role::Reflector {
                peer_reflects: reflects(&p.name),
            },
            (false, false) => bgp::Role::Client,
        };
        item(
            &bgp::session_line(p),
            &bgp::session_why(
                p,
                report.engine,
                report.as_number,
                modes::BGP_CONNECT_RETRY,
                role,
            ),
        );
    }
    for (peer, why) in &report.unroutable {
        println!("  NOT INSTALLED from {peer}: {why}");
    }
}

fn link_line(l: &Value) -> String {
    let addrs: Vec<String> = l["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["scope"] != "link" && a["scope"] != "host")
        .map(|a| format!("{}/{}", s(a, "local"), a["prefixlen"]))
        .collect();
    let kind = l["linkinfo"]["info_kind"].as_str().unwrap_or("");
    let mut out = format!("{} ", s(l, "ifname"));
    if !kind.is_empty() {
        out.push_str(&format!("({kind}) "));
    }
    if !s(l, "master").is_empty() {
        out.push_str(&format!("master {} ", s(l, "master")));
    }
    if s(l, "link_type") == "ipip" {
        out.push_str(&format!("mtu {}", l["mtu"]));
    } else {
        out.push_str(&format!("mac {} mtu {}", s(l, "address"), l["mtu"]));
    }
    if !addrs.is_empty() {
        out.push_str(&format!(" addr {}", addrs.join(" ")));
    }
    out
}

fn item(line: &str, why: &str) {
    println!("  {line}\n      -> {why}");
}

/// Prints every node (or one).
pub async fn show(lab: &Lab, only: Option<&str>) -> Result<()> {
    if let Some(name) = only {
        lab.node(name)?;
    }
    let c = Cluster::gather(lab).await;
    println!(
        "lab {}: mode {}, {} pod network, pool {} in /{} blocks",
        lab.name,
        lab.mode_label(),
        lab.pod_network.as_str(),
        state::POOL,
        state::BLOCK_SIZE
    );
    match modes::find(&lab.mode) {
        Some(mode) => println!("{}", wrap(mode.about, 92)),
        None => println!("(no description of mode {})", lab.mode),
    }
    if lab.pod_network != state::PodNetwork::Bridge {
        println!(
            "{}",
            wrap(
                "routed pod network: no bridge. Each pod has a /32 address and the default \
                 route via 169.254.1.1, which the host end of its veth answers by proxy ARP; \
                 the node has a /32 route per pod pointing at its veth.",
                92
            )
        );
    }
    for node in &lab.nodes {
        if only.is_some_and(|o| o != node.name) {
            continue;
        }
        let Some(me) = c.view(&node.name) else {
            continue;
        };
        show_node(&c, node, me).await?;
    }
    if only.is_none() {
        println!();
        crate::tor::print(lab).await;
    }
    Ok(())
}

async fn show_node(c: &Cluster, node: &Node, me: &NodeView) -> Result<()> {
    let ns = &node.ns;
    println!(
        "\n=== {} (netns {ns}) underlay {} on {}, agent pid {} ===",
        node.name,
        node.address,
        me.subnet,
        node.agent
            .as_ref()
            .map(|a| a.pid.to_string())
            .unwrap_or_else(|| "-".into())
    );
    for pod in &me.pods {
        println!(
            "pod {} (netns {}): eth0 {} mac {}, host end {}",
            pod.name,
            pod.ns,
            pod.ip.map(|i| i.to_string()).unwrap_or_default(),
            pod.mac.as_deref().unwrap_or("?"),
            pod.host_veth
        );
        if net::ns_exists(&pod.ns) {
            for r in ip_json(&pod.ns, &["route", "show"]).await? {
                item(&route_line(&r), &explain_pod_route(&r));
            }
        }
    }
    println!("devices:");
    let links = ip_json(ns, &["-d", "addr", "show"]).await?;
    let underlay_mtu = links
        .iter()
        .find(|l| s(l, "ifname") == NODE_NIC)
        .and_then(|l| l["mtu"].as_u64());
    for l in &links {
        item(&link_line(l), &explain_link(c, me, l, underlay_mtu));
    }
    println!("routes (main table):");
    let routes = ip_json(ns, &["-d", "route", "show"]).await?;
    for r in &routes {
        item(&route_line(r), &explain_route(c, me, r));
    }
    if c.ipip_mode.is_some() {
        ipip_peers(c, me, &routes);
    }
    println!("neighbours:");
    let neighbours = ip_json(ns, &["neigh", "show"]).await?;
    if neighbours.is_empty() {
        println!("  (none)");
    }
    for n in neighbours {
        let states = n["state"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let line = format!(
            "{} dev {} lladdr {} {states}",
            s(&n, "dst"),
            s(&n, "dev"),
            s(&n, "lladdr")
        );
        item(&line, &explain_neigh(c, &n));
    }
    println!("bridge FDB:");
    let mut multicast = 0;
    for f in bridge_json(ns, &["fdb", "show"]).await? {
        match explain_fdb(c, &f) {
            Some(why) => item(&fdb_line(&f), &why),
            None => multicast += 1,
        }
    }
    if multicast > 0 {
        println!(
            "  ({multicast} multicast entries 33:33:… / 01:00:5e:… not shown: the IPv4/IPv6 \
             multicast groups each device joined, not cnikit's)"
        );
    }
    if c.ebpf {
        let devices = links.iter().map(|l| s(l, "ifname").to_owned()).collect();
        crate::ebpf::show_node(c, node, me, devices).await?;
    }
    if let Some(report) = me.state.as_ref().and_then(bgp::report) {
        bgp_sessions(c, &node.name, &report);
    }
    match &me.state {
        Some(st) => {
            println!(
                "agent's node state ({}): mode {}, pod MTU {}, blocks {}, peers [{}]",
                NodeState::path(&node.data_dir()).display(),
                st.mode,
                st.mtu,
                st.blocks
                    .iter()
                    .map(|b| b.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                st.peers.join(", ")
            );
            if st.unroutable.is_empty() {
                println!("  every peer is routed");
            }
            for (peer, why) in &st.unroutable {
                println!("  UNROUTABLE peer {peer}: {why}");
            }
        }
        None => println!("agent's node state: none (the agent is not up)"),
    }
    Ok(())
}

/// Every route, neighbour and FDB entry on `on` that refers to node `of` (its blocks, its
/// underlay address as a gateway or FDB destination, its VTEP address or MAC). The
/// kernel's own ARP cache entry for its underlay address is not counted: the agent did not
/// write it and the kernel ages it out.
pub async fn traces_of(c: &Cluster, on: &Node, of: &str) -> Result<Vec<String>> {
    let Some(gone) = c.view(of) else {
        return Ok(Vec::new());
    };
    let addr = gone.address.to_string();
    let vtep_ip = gone.vtep.as_ref().map(|(ip, _)| ip.to_string());
    let vtep_mac = gone.vtep.as_ref().map(|(_, mac)| mac.to_lowercase());
    let blocks: Vec<String> = gone.blocks.iter().map(|b| b.to_string()).collect();
    let mut found = Vec::new();
    for r in ip_json(&on.ns, &["route", "show"]).await? {
        if blocks.iter().any(|b| b == s(&r, "dst"))
            || (s(&r, "protocol") == "107"
                && (s(&r, "gateway") == addr || vtep_ip.as_deref() == Some(s(&r, "gateway"))))
        {
            found.push(format!("route {}", route_line(&r)));
        }
    }
    for n in ip_json(&on.ns, &["neigh", "show"]).await? {
        let ebpf_peer = s(&n, "dev") == modes::EBPF_DEVICE && s(&n, "dst") == addr;
        if ebpf_peer
            || vtep_ip.as_deref() == Some(s(&n, "dst"))
            || vtep_mac.as_deref() == Some(s(&n, "lladdr").to_lowercase().as_str())
        {
            found.push(format!("neigh {} lladdr {}", s(&n, "dst"), s(&n, "lladdr")));
        }
    }
    if net::ns_exists(&on.ns) {
        for f in bridge_json(&on.ns, &["fdb", "show"]).await? {
            if s(&f, "dst") == addr
                || vtep_mac.as_deref() == Some(s(&f, "mac").to_lowercase().as_str())
            {
                found.push(format!("fdb {}", fdb_line(&f)));
            }
        }
    }
    if let (true, IpAddr::V4(v4)) = (c.ebpf, gone.address) {
        found.extend(crate::ebpf::traces(c, on, v4)?);
    }
    Ok(found)
}

/// Wraps text at `width` columns.
fn wrap(text: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            out.push_str(&line);
            out.push('\n');
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    out.push_str(&line);
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node() -> NodeView {
        NodeView {
            name: "n1".into(),
            address: "192.168.71.11".parse().unwrap(),
            subnet: "192.168.71.0/24".into(),
            blocks: vec!["10.244.1.0/26".parse().unwrap()],
            state: None,
            vtep: None,
            tunnel: Some("10.244.1.1".parse().unwrap()),
            pods: Vec::new(),
        }
    }

    /// `ip -j -d link show` of an IPIP device with `info_data`.
    fn device(data: Value) -> Value {
        json!({"ifname": "cnikit.ipip", "mtu": 1480, "linkinfo": {"info_kind": "ipip", "info_data": data}})
    }

    /// The explanation says what the device has, not what cnikit would have made.
    #[test]
    fn the_ipip_device_is_explained_from_its_parameters() {
        let ours = explain_ipip_device(
            &node(),
            &device(
                json!({"remote": "any", "local": "192.168.71.11", "link": "eth0",
                           "ttl": 0, "pmtudisc": true}),
            ),
            Some(1500),
        );
        for says in [
            "local 192.168.71.11",
            "link eth0",
            "remote any",
            "ttl inherit",
            "pmtudisc on",
            "MTU 1480 = underlay MTU 1500 - 20",
            "10.244.1.1",
        ] {
            assert!(ours.contains(says), "{says:?} missing from {ours}");
        }
        let other = explain_ipip_device(
            &node(),
            &device(
                json!({"remote": "192.0.2.9", "local": "192.168.71.11", "link": "eth0",
                           "ttl": 64, "pmtudisc": false}),
            ),
            Some(1500),
        );
        for says in ["remote 192.0.2.9", "ttl 64", "pmtudisc OFF"] {
            assert!(other.contains(says), "{says:?} missing from {other}");
        }
        for not in ["remote any", "ttl inherit", "pmtudisc on"] {
            assert!(!other.contains(not), "{not:?} in {other}");
        }
    }
}
