//! The routing modes the lab knows: what each adds to the conflist and how `show` explains
//! it. A mode is a string passed through to the conflist's `routing`; a new mode (ebpf)
//! is one more row in [`MODES`], plus explanations for its own devices in
//! `show.rs` if it makes any.

use serde_json::{Map, Value, json};

use crate::state::Lab;

/// The VXLAN device name the lab configures (the backend's default).
pub const VXLAN_DEVICE: &str = cnikit::vxlan::DEFAULT_DEVICE;
/// The VXLAN network identifier of the lab (the backend's default).
pub const VXLAN_VNI: u32 = cnikit::vxlan::DEFAULT_VNI;
/// The VXLAN UDP port of the lab (the backend's default, IANA's 4789).
pub const VXLAN_PORT: u16 = cnikit::vxlan::DEFAULT_PORT;

/// The eBPF mode's VXLAN device (the backend's default).
pub const EBPF_DEVICE: &str = cnikit::ebpf::routing::DEFAULT_DEVICE;

/// The IPIP device name the lab configures (the backend's default).
pub const IPIP_DEVICE: &str = cnikit::ipip::DEFAULT_DEVICE;

/// The AS of every lab node in `bgp` mode (the backend's default, iBGP full mesh).
pub const BGP_AS: u32 = cnikit::bgp::DEFAULT_AS;
/// Seconds between a `bgp` lab speaker's connection attempts: the backend's default is 2;
/// 1 lets a fresh lab, whose speakers start one after the other, converge sooner.
pub const BGP_CONNECT_RETRY: u16 = 1;
/// The route reflector cluster id of the lab's reflectors (`--bgp-topology reflector`).
pub const BGP_CLUSTER_ID: std::net::Ipv4Addr = std::net::Ipv4Addr::new(244, 0, 0, 1);

/// One routing mode.
pub struct Mode {
    /// The conflist's `routing` value.
    pub name: &'static str,
    /// How it works, for `show`.
    pub about: &'static str,
    /// Mode-specific keys of the `cnikit` conflist entry.
    pub keys: fn(&Lab) -> Map<String, Value>,
}

/// The modes with lab defaults.
pub const MODES: &[Mode] = &[
    Mode {
        name: cnikit::hostgw::TYPE,
        about: "host-gw: no encapsulation. Each node routes every peer's pod block to that \
                peer's underlay address (`BLOCK via PEER dev eth0`), so it only works when \
                the peers share the L2 segment; a peer behind a router is reported \
                unroutable (node-state.json `unroutable`) and gets no route.",
        keys: |_| Map::new(),
    },
    Mode {
        name: cnikit::vxlan::TYPE,
        about: "vxlan: pod packets to another node are wrapped in UDP (port 4789, VNI 1) by \
                the device cnikit.vxlan, whose address (the VTEP) comes from the node's own \
                block. Per peer the agent writes three entries: a route `BLOCK via \
                PEER_VTEP dev cnikit.vxlan onlink`, a permanent neighbour PEER_VTEP -> \
                PEER_VTEP_MAC (no ARP goes into the tunnel) and an FDB entry PEER_VTEP_MAC -> \
                PEER_UNDERLAY_IP (where the UDP packet goes). Learning is off: nothing is \
                guessed from traffic. Works across routers.",
        keys: |lab| {
            let mut keys = Map::new();
            keys.insert(
                "vxlan".into(),
                json!({
                    "vni": VXLAN_VNI,
                    "port": VXLAN_PORT,
                    "device": VXLAN_DEVICE,
                    "directRouting": lab.direct_routing,
                }),
            );
            keys
        },
    },
    Mode {
        name: cnikit::ipip::TYPE,
        about: "ipip: pod packets to another node get a second IPv4 header (IP protocol 4) \
                from the device cnikit.ipip (local = the node's underlay address, MTU 20 \
                bytes under the underlay's), whose /32 address comes from the node's own \
                block. Per peer one route `BLOCK via PEER_UNDERLAY_IP dev cnikit.ipip \
                onlink`: the gateway is the outer destination, on-link because the tunnel \
                has no neighbours and no subnet the gateway is in. --ipip-mode always (the \
                default) tunnels to every peer; --ipip-mode cross-subnet (Calico's \
                CrossSubnet; also what --direct-routing means here) only to peers behind a \
                router, the others get host-gw routes `BLOCK via PEER dev eth0`. Needs a \
                kernel with the ipip module.",
        keys: |lab| {
            let mut keys = Map::new();
            // `up` sets it for every ipip lab (see `state::ipip_mode`).
            let mode = lab.ipip_mode.unwrap_or_default();
            keys.insert(
                "ipip".into(),
                json!({ "mode": mode.as_str(), "device": IPIP_DEVICE }),
            );
            keys
        },
    },
    Mode {
        name: cnikit::bgp::TYPE,
        about: "bgp: no encapsulation, and the routes come over BGP, not from the node \
                registry. Each node's agent runs a BGP-4 speaker (TCP 179 on its underlay \
                address, AS 64512, iBGP full mesh: one session with every peer the registry \
                lists) that announces the node's blocks with NEXT_HOP = its underlay address \
                and installs what the peers announce as `BLOCK via PEER dev eth0 proto 107`, \
                as Calico's BIRD does; like host-gw, that needs the peers on this L2 segment. \
                A route lives as long as its session: a withdrawn block or a closed session \
                takes it away; a node that leaves the registry has its session closed at \
                once. The sessions and what they carry are in the node state (`routing`). \
                With --bgp-engine bird the agent runs BIRD 2 instead (its own child, \
                configuration rendered into the node's data dir `bird/bird.conf`, control \
                socket `bird/bird.ctl`, reloaded with `birdc configure` when peers change, \
                started again if it dies), and the routes are BIRD's: `proto bird`. With \
                --ipip-mode the learned routes go through the IPIP device cnikit.ipip \
                on-link, as in the ipip mode (Calico's IPIP with BGP). With --bgp-topology \
                reflector the first --reflectors nodes are route reflectors (cluster id \
                244.0.0.1): they peer with every node and reflect the routes, the others \
                peer with them only. With --tor bird a top-of-rack router (BIRD 2, AS 65000) \
                is every node's global peer over eBGP and learns every block.",
        keys: |lab| {
            let mut keys = Map::new();
            let mut bgp = json!({
                "asNumber": BGP_AS,
                "connectRetry": BGP_CONNECT_RETRY,
                "engine": lab.bgp_engine.unwrap_or_default(),
            });
            if let Some(tor) = &lab.tor {
                bgp["globalPeers"] = json!([{
                    "address": tor.address,
                    "asNumber": tor.as_number,
                    "name": crate::tor::TOR_PEER,
                }]);
            }
            if let Some(mode) = lab.ipip_mode {
                bgp["ipip"] = json!({
                    "device": IPIP_DEVICE,
                    "crossSubnet": mode == cnikit::ipip::Mode::CrossSubnet,
                });
            }
            keys.insert("bgp".into(), bgp);
            keys
        },
    },
    EBPF,
];

/// The `ebpf` mode: Cilium's datapath in miniature.
const EBPF: Mode = Mode {
    name: cnikit::ebpf::TYPE,
    about: "ebpf: pods are plugged in as by the routed pod network, plus a tc eBPF program             (from_pod) on the host end of each pod's veth, which looks every packet's             destination up in pinned maps: a pod of the same node (`endpoints`, written by             the plugin) gets it by bpf_redirect_peer, straight into its namespace, without             the node's routing table; a block of another node (`remotes`, an LPM map the             agent writes per peer) gets a tunnel key (that node's underlay address, VNI 1)             and is redirected into the collect_md VXLAN device cnikit.ebpf, which wraps it             in UDP 4789; there from_tunnel delivers it into the pod the same way. The rest             (the nodes themselves, the outside) goes through the node's stack. Maps and             program links are pinned on the lab's own BPF filesystem.",
    keys: |_| {
        let mut keys = Map::new();
        keys.insert(
            "ebpf".into(),
            json!({ "vni": VXLAN_VNI, "port": VXLAN_PORT, "device": EBPF_DEVICE }),
        );
        keys
    },
};

/// The row of `mode`, if the lab knows it.
pub fn find(mode: &str) -> Option<&'static Mode> {
    MODES.iter().find(|m| m.name == mode)
}

/// The names of the known modes, for messages.
pub fn names() -> String {
    MODES.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}
