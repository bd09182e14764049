//! `bird.conf` from the node's desired state. Pure.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::config::Config;
use crate::speaker::Neighbor;

/// The name of the static protocol holding the node's blocks (blackholes in BIRD's table,
/// announced to the peers; the kernel's blackhole is the agent's).
pub const BLOCKS: &str = "cnikit_blocks";
/// The name of the kernel protocol that installs the learned routes.
pub const KERNEL: &str = "cnikit_kernel";
/// The prefix of every BGP protocol's name.
const PEER_PREFIX: &str = "peer_";

/// What the configuration is rendered from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node<'a> {
    /// The node's name (a comment only).
    pub name: &'a str,
    /// The BGP identifier and the session's local address.
    pub router_id: Ipv4Addr,
    /// The underlay subnet (for `ipip.crossSubnet`).
    pub subnet: Ipv4Net,
    /// The node's blocks.
    pub blocks: &'a [Ipv4Net],
    /// The sessions, by peer name.
    pub peers: &'a BTreeMap<String, Neighbor>,
}

/// BIRD's name of the BGP protocol of peer `name`: `peer_` and the name with every
/// character other than `a-z0-9` written `_XX` (hex), so that it is a BIRD symbol, stable
/// and tells the name back ([`peer_name`]).
pub fn protocol_name(name: &str) -> String {
    let mut out = String::from(PEER_PREFIX);
    for c in name.chars() {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else {
            let mut buf = [0; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "_{b:02x}");
            }
        }
    }
    out
}

/// The peer name of BGP protocol `protocol`, when it is one of ours.
pub fn peer_name(protocol: &str) -> Option<String> {
    let rest = protocol.strip_prefix(PEER_PREFIX)?;
    let mut bytes = Vec::new();
    let mut chars = rest.bytes();
    while let Some(b) = chars.next() {
        if b == b'_' {
            let hex = [chars.next()?, chars.next()?];
            bytes.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            bytes.push(b);
        }
    }
    String::from_utf8(bytes).ok()
}

/// The whole `bird.conf`.
///
/// Sessions as the native speaker keeps them: iBGP with on-link next hops (`direct`,
/// `gateway direct`) on the node's segment, `multihop` (`gateway recursive`) to a peer on
/// another subnet, whose routes only a tunnel can carry (`ipip`, crossSubnet or always);
/// the node's blocks exported to every peer, and on a route reflector (`rr client` on its
/// clients, `rr cluster id`) the iBGP routes reflected as RFC 4456 says; eBGP to the global peers with the blocks only. The kernel protocol installs what
/// BGP learned (BIRD marks it `proto bird`; its `graceful restart` keeps the routes while a
/// restarted BIRD relearns them) and, with `ipip`, through the IPIP device on-link.
pub fn render(config: &Config, node: &Node<'_>) -> String {
    let mut c = String::new();
    let rid = node.router_id;
    let _ = writeln!(
        c,
        "# cnikit bgp, bird engine, node {:?}: rendered by the agent, reloaded with\n\
         # `birdc configure` when the peers change. Do not edit.\n\
         router id {rid};\n\
         log stderr {{ warning, error, bug }};\n\
         timeformat protocol \"%s\";\n\
         \n\
         protocol device {{ scan time 2; }}\n",
        node.name
    );
    let _ = writeln!(c, "protocol static {BLOCKS} {{\n    ipv4;");
    for block in node.blocks {
        let _ = writeln!(c, "    route {block} blackhole;");
    }
    let _ = writeln!(c, "}}\n");

    // The tunnel's outer destination is the BGP next hop itself: a peer behind a router has
    // no route BIRD could resolve it through (the session is multihop, below), so such a
    // route reaches this filter unreachable, and only the tunnel makes it usable.
    let mut export = String::from("if source != RTS_BGP then reject; ");
    if let Some(ipip) = &config.ipip {
        let tunnel = format!(
            "ip g = bgp_next_hop; onlink = true; ifname = \"{}\"; gw = g; ",
            ipip.device
        );
        if ipip.cross_subnet {
            let _ = write!(
                export,
                "if bgp_next_hop !~ {} then {{ {tunnel}}} ",
                node.subnet
            );
        } else {
            export.push_str(&tunnel);
        }
    }
    // Without a tunnel a next hop off the segment cannot be routed to (the native engine
    // reports such peers unroutable): no `unreachable` route in the kernel for it.
    export.push_str("if dest = RTD_UNREACHABLE then reject; accept;");
    let _ = writeln!(
        c,
        "protocol kernel {KERNEL} {{\n    \
             ipv4 {{ import none; export filter {{ {export} }}; }};\n    \
             graceful restart;\n\
         }}\n"
    );

    let _ = writeln!(
        c,
        "filter cnikit_blocks_only {{ if proto = \"{BLOCKS}\" then accept; reject; }}\n\
         filter cnikit_reflect {{ if proto = \"{BLOCKS}\" || source = RTS_BGP then accept; reject; }}\n"
    );

    if config.graceful_restart {
        // How long a BIRD started in recovery (`-R`) keeps the previous run's routes at most.
        let _ = writeln!(c, "graceful restart wait {};\n", config.restart_time);
    }
    let graceful = if config.graceful_restart {
        format!(
            "graceful restart on;\n    graceful restart time {};",
            config.restart_time
        )
    } else {
        "graceful restart off;".to_owned()
    };
    let hold = if config.hold_time == 0 {
        // BIRD has no "no hold time": the longest it takes.
        65535
    } else {
        config.hold_time
    };
    let retry = config.connect_retry;
    let _ = writeln!(
        c,
        "template bgp cnikit_peer {{\n    \
             local {rid} port {port} as {asn};\n    \
             strict bind on;\n    \
             hold time {hold};\n    \
             connect delay time {retry};\n    \
             connect retry time {retry};\n    \
             error wait time {retry}, {wait};\n    \
             {graceful}\n\
         }}\n",
        port = config.port,
        asn = config.as_number,
        wait = u32::from(retry) * 8,
    );
    let reflector = config.route_reflector_cluster_id;
    for (name, peer) in node.peers {
        let ibgp = peer.as_number == config.as_number;
        let filter = if ibgp && reflector.is_some() {
            "cnikit_reflect"
        } else {
            "cnikit_blocks_only"
        };
        let _ = writeln!(
            c,
            "# {name:?}\nprotocol bgp {} from cnikit_peer {{\n    \
                 neighbor {} port {} as {};",
            protocol_name(name),
            peer.address,
            config.port,
            peer.as_number
        );
        // iBGP next hops on the shared segment are on-link; a peer on another subnet is
        // reached through the underlay's router (a multihop session), its next hop resolved
        // recursively (unresolvable here, so only a tunnel route can carry it).
        let on_segment = node.subnet.contains(&peer.address);
        if ibgp {
            let _ = writeln!(c, "    {};", if on_segment { "direct" } else { "multihop" });
        }
        let gateway = if ibgp && !on_segment {
            "recursive"
        } else {
            "direct"
        };
        if let (Some(cluster), true) = (reflector, ibgp && peer.client) {
            let _ = writeln!(c, "    rr client;\n    rr cluster id {cluster};");
        }
        let _ = writeln!(
            c,
            "    ipv4 {{ gateway {gateway}; import all; export filter {filter}; }};\n}}\n"
        );
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Engine, IpipConfig};

    fn neighbor(address: &str, as_number: u32, client: bool) -> Neighbor {
        Neighbor {
            address: address.parse().unwrap(),
            as_number,
            client,
        }
    }

    fn render_with(config: &Config, peers: &BTreeMap<String, Neighbor>) -> String {
        let blocks = [
            "10.244.1.0/26".parse().unwrap(),
            "10.244.9.0/26".parse().unwrap(),
        ];
        render(
            config,
            &Node {
                name: "a",
                router_id: "192.168.1.2".parse().unwrap(),
                subnet: "192.168.1.0/24".parse().unwrap(),
                blocks: &blocks,
                peers,
            },
        )
    }

    #[test]
    fn protocol_names_are_symbols_and_tell_the_name_back() {
        for name in [
            "b",
            "node-1",
            "n.example.com",
            "global-192.168.1.1",
            "a_b",
            "é",
        ] {
            let p = protocol_name(name);
            assert!(
                p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{p}"
            );
            assert_eq!(peer_name(&p).as_deref(), Some(name));
        }
        assert_ne!(protocol_name("a-b"), protocol_name("a_b"));
        assert_eq!(protocol_name("node-1"), "peer_node_2d1");
        assert_eq!(peer_name("cnikit_kernel"), None);
        assert_eq!(peer_name("peer_x_4"), None);
    }

    #[test]
    fn full_mesh_with_a_global_peer() {
        let config = Config {
            engine: Engine::Bird,
            port: 1179,
            hold_time: 9,
            connect_retry: 1,
            ..Config::default()
        };
        let peers = BTreeMap::from([
            ("b".to_owned(), neighbor("192.168.1.3", 64512, false)),
            ("tor".to_owned(), neighbor("192.168.1.1", 65000, false)),
        ]);
        let c = render_with(&config, &peers);
        for line in [
            "router id 192.168.1.2;",
            "protocol static cnikit_blocks {\n    ipv4;\n    route 10.244.1.0/26 blackhole;\n    route 10.244.9.0/26 blackhole;\n}",
            "ipv4 { import none; export filter { if source != RTS_BGP then reject; if dest = RTD_UNREACHABLE then reject; accept; }; };",
            "local 192.168.1.2 port 1179 as 64512;\n    strict bind on;",
            "hold time 9;",
            "connect retry time 1;",
            "graceful restart on;\n    graceful restart time 120;",
            "graceful restart wait 120;",
            "protocol bgp peer_b from cnikit_peer {\n    neighbor 192.168.1.3 port 1179 as 64512;\n    direct;\n    ipv4 { gateway direct; import all; export filter cnikit_blocks_only; };\n}",
            "protocol bgp peer_tor from cnikit_peer {\n    neighbor 192.168.1.1 port 1179 as 65000;\n    ipv4 { gateway direct; import all; export filter cnikit_blocks_only; };\n}",
        ] {
            assert!(c.contains(line), "missing {line:?} in\n{c}");
        }
        assert!(!c.contains("rr client"), "{c}");
        assert!(!c.contains("ifname"), "{c}");
    }

    #[test]
    fn a_route_reflector_reflects_to_its_clients_only_over_ibgp() {
        let config = Config {
            engine: Engine::Bird,
            route_reflector_cluster_id: Some("10.0.0.1".parse().unwrap()),
            graceful_restart: false,
            ..Config::default()
        };
        let peers = BTreeMap::from([
            ("b".to_owned(), neighbor("192.168.1.3", 64512, true)),
            ("rr2".to_owned(), neighbor("192.168.1.4", 64512, false)),
            ("tor".to_owned(), neighbor("192.168.1.1", 65000, false)),
        ]);
        let c = render_with(&config, &peers);
        assert!(
            c.contains(
                "neighbor 192.168.1.3 port 179 as 64512;\n    direct;\n    rr client;\n    rr cluster id 10.0.0.1;\n    ipv4 { gateway direct; import all; export filter cnikit_reflect; };"
            ),
            "{c}"
        );
        assert!(
            c.contains(
                "neighbor 192.168.1.4 port 179 as 64512;\n    direct;\n    ipv4 { gateway direct; import all; export filter cnikit_reflect; };"
            ),
            "{c}"
        );
        assert!(
            c.contains("neighbor 192.168.1.1 port 179 as 65000;\n    ipv4 { gateway direct; import all; export filter cnikit_blocks_only; };"),
            "{c}"
        );
        assert_eq!(c.matches("rr client").count(), 1, "{c}");
        assert!(c.contains("graceful restart off;"), "{c}");
        assert!(!c.contains("graceful restart wait"), "{c}");
    }

    #[test]
    fn ipip_routes_go_through_the_device_on_link() {
        let mut config = Config {
            engine: Engine::Bird,
            ipip: Some(IpipConfig {
                device: "cnikit.ipip".into(),
                cross_subnet: false,
            }),
            ..Config::default()
        };
        let c = render_with(&config, &BTreeMap::new());
        assert!(
            c.contains("export filter { if source != RTS_BGP then reject; ip g = bgp_next_hop; onlink = true; ifname = \"cnikit.ipip\"; gw = g; if dest = RTD_UNREACHABLE then reject; accept; };"),
            "{c}"
        );
        config.ipip.as_mut().unwrap().cross_subnet = true;
        let c = render_with(&config, &BTreeMap::new());
        assert!(
            c.contains("if bgp_next_hop !~ 192.168.1.0/24 then { ip g = bgp_next_hop; onlink = true; ifname = \"cnikit.ipip\"; gw = g; } if dest = RTD_UNREACHABLE then reject; accept;"),
            "{c}"
        );
        // A peer behind the router: a multihop session, its next hop resolved recursively.
        let far = BTreeMap::from([
            ("b".to_owned(), neighbor("192.168.1.3", 64512, false)),
            ("c".to_owned(), neighbor("192.168.2.5", 64512, false)),
        ]);
        let with_peers = render_with(&config, &far);
        assert!(
            with_peers.contains("neighbor 192.168.2.5 port 179 as 64512;\n    multihop;\n    ipv4 { gateway recursive; import all;"),
            "{with_peers}"
        );
        assert!(
            with_peers.contains("neighbor 192.168.1.3 port 179 as 64512;\n    direct;\n    ipv4 { gateway direct; import all;"),
            "{with_peers}"
        );
        assert!(!c.contains("protocol bgp "), "no peers, no sessions:\n{c}");
    }
}
