//! The IPIP backend.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use async_trait::async_trait;
use cni_core::linux::NetNs;
use cni_core::linux::kernel::{
    Desired, Kernel, Netlink, Ownership, Underlay, configure_device, ensure_device, remove_owned,
};
use cni_core::registry::NodeRecord;
use cni_core::routing::{CrossNodeRouting, LocalNode, ReconcileReport};

use crate::config::{Config, Mode};
use crate::error::{Error, Result};
use crate::{OVERHEAD, device};

/// This node's tunnel device, known after `init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tunnel {
    /// Index of the IPIP device.
    pub ifindex: u32,
    /// Its address: the node's IPv4 tunnel address, else the network address of the node's
    /// first IPv4 block.
    pub addr: Ipv4Addr,
    /// Its MTU (the pod MTU).
    pub mtu: u32,
}

/// IPIP cross-node routing (see the [crate docs](crate)).
///
/// `K` is the kernel it programs: [`Netlink`] in a network namespace, or
/// [`Recording`](cni_core::linux::kernel::Recording) in unit tests.
#[derive(Debug)]
pub struct Ipip<K = Netlink> {
    config: Config,
    kernel: K,
    node: Option<Node>,
}

#[derive(Debug)]
struct Node {
    local: LocalNode,
    underlay: Underlay,
    tunnel: Tunnel,
}

impl Ipip<Netlink> {
    /// Validates `config` (code 7) and builds the backend acting in the node namespace
    /// `ns` (for a node agent: [`NetNs::current`]). Touches nothing until
    /// [`init`](CrossNodeRouting::init).
    pub fn new(config: Config, ns: NetNs) -> Result<Self> {
        Self::with_kernel(config, Netlink::new(ns))
    }
}

impl<K: Kernel> Ipip<K> {
    /// Validates `config` (code 7) and builds the backend programming `kernel`. Touches
    /// nothing.
    pub fn with_kernel(config: Config, kernel: K) -> Result<Self> {
        config.validate()?;
        Ok(Ipip {
            config,
            kernel,
            node: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The kernel it programs.
    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    /// This node's tunnel device, after `init`.
    pub fn tunnel(&self) -> Option<Tunnel> {
        self.node.as_ref().map(|n| n.tunnel)
    }

    async fn init_inner(&mut self, local: &LocalNode) -> Result<()> {
        let underlay = Underlay::resolve(&self.kernel, local).await?;
        let IpAddr::V4(underlay_v4) = underlay.address else {
            return Err(Error::NotIpv4 {
                address: underlay.address,
            });
        };
        let mtu = underlay
            .tunnel_mtu(self.config.mtu, OVERHEAD, "IPIP")
            .map_err(|reason| Error::InvalidConfig {
                field: "mtu",
                reason,
            })?;
        let addr = local.tunnel_ipv4().ok_or_else(|| Error::NoTunnelAddress {
            node: local.name.clone(),
        })?;

        let spec = device::spec(&self.config.device, mtu, underlay_v4, underlay.ifindex);
        let dev = ensure_device(&self.kernel, &spec).await?;
        configure_device(&self.kernel, &dev, mtu, IpAddr::V4(addr)).await?;
        let tunnel = Tunnel {
            ifindex: dev.link.index,
            addr,
            mtu,
        };
        tracing::info!(
            node = %local.name,
            device = %self.config.device,
            address = %addr,
            mtu,
            mode = self.config.mode.as_str(),
            "ipip: ready"
        );
        self.node = Some(Node {
            local: local.clone(),
            underlay,
            tunnel,
        });
        Ok(())
    }

    /// The routes and unroutable peers `peers` call for. Pure.
    fn desired(&self, node: &Node, peers: &[NodeRecord]) -> Desired {
        let mut desired = Desired::new();
        let mut peers: Vec<&NodeRecord> =
            peers.iter().filter(|p| p.name != node.local.name).collect();
        // Conflicts (two peers claiming one block) go to the first by name, every time.
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        let underlay = &node.underlay;
        for peer in peers {
            desired.peer(&peer.name);
            if peer.address == underlay.address {
                desired.unroutable(
                    &peer.name,
                    format!("it has this node's underlay address {}", peer.address),
                );
            } else if !peer.address.is_ipv4() {
                desired.unroutable(
                    &peer.name,
                    format!(
                        "its underlay address {} is not IPv4: ipip tunnels IPv4 in IPv4",
                        peer.address
                    ),
                );
            } else if self.config.mode == Mode::CrossSubnet && underlay.on_link(peer.address) {
                desired.blocks(
                    peer,
                    &node.local.blocks,
                    peer.address,
                    underlay.ifindex,
                    false,
                );
            } else {
                desired.blocks(
                    peer,
                    &node.local.blocks,
                    peer.address,
                    node.tunnel.ifindex,
                    true,
                );
            }
        }
        desired
    }

    async fn reconcile_inner(&mut self, peers: &[NodeRecord]) -> Result<ReconcileReport> {
        let node = self.node.as_ref().ok_or(Error::NotInitialized)?;
        let report = self
            .desired(node, peers)
            .apply(&self.kernel, &Ownership::default())
            .await?;
        tracing::debug!(
            writes = report.writes,
            routed = report.routed,
            unroutable = report.unroutable.len(),
            "ipip: reconciled"
        );
        Ok(report)
    }

    async fn teardown_inner(&mut self) -> Result<()> {
        // Only a device of our kind is ours to delete; what goes through it goes with it.
        remove_owned(&self.kernel, Some((&self.config.device, crate::TYPE))).await?;
        self.node = None;
        Ok(())
    }
}

#[async_trait]
impl<K: Kernel> CrossNodeRouting for Ipip<K> {
    fn mode(&self) -> &'static str {
        crate::TYPE
    }

    /// Creates the IPIP device (`local` = node address, `dev` = underlay interface, TTL
    /// inherited, don't-fragment, MTU = underlay MTU − 20 unless configured lower), gives
    /// it the tunnel address and brings it up. Idempotent: an existing device with the
    /// same parameters is adopted, one with other parameters is made again. Errors: 7 for
    /// a bad node description, an IPv6 underlay, an MTU too large for the underlay, no
    /// IPv4 block, a non-IPIP device of the same name; 101 for kernel failures.
    async fn init(&mut self, local: &LocalNode) -> cni_core::Result<()> {
        Ok(self.init_inner(local).await?)
    }

    /// Nothing: peers route to a node's blocks through its underlay address.
    fn node_data(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    /// 20 bytes, the outer IPv4 header (in `crossSubnet` too: the pod MTU is one for
    /// every peer).
    fn mtu_overhead(&self) -> u32 {
        OVERHEAD
    }

    /// The tunnel device needs an address of the node's block that no pod gets.
    fn needs_tunnel_address(&self) -> bool {
        true
    }

    /// Per peer, a route to each IPv4 block via its underlay address: through the IPIP
    /// device (on-link) in `always` mode and for peers outside the underlay subnet in
    /// `crossSubnet` mode; through the underlay interface for the same-subnet peers of
    /// `crossSubnet`. Peers with an IPv6 or this node's underlay address are reported
    /// unroutable. Errors: 50 before init, 101 when the routes cannot be listed or a stale
    /// one cannot be deleted.
    async fn reconcile(&mut self, peers: &[NodeRecord]) -> cni_core::Result<ReconcileReport> {
        Ok(self.reconcile_inner(peers).await?)
    }

    /// Deletes the IPIP device (with every route through it) and the routes it made
    /// through the underlay. Idempotent; works without init. Errors: 101.
    async fn teardown(&mut self) -> cni_core::Result<()> {
        Ok(self.teardown_inner().await?)
    }
}

#[cfg(test)]
mod tests {
    use cni_core::linux::kernel::{GatewayRoute, IpipParams, LinkKind, LinkSpec, Recording, Write};
    use ipnet::IpNet;

    use super::*;

    const ETH0: u32 = 2;
    /// The IPIP device is the next link the fake makes.
    const TUN: u32 = 3;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn kernel() -> Recording {
        let k = Recording::new();
        assert_eq!(
            k.add_plain_link("eth0", 1500, &[net("192.168.1.2/24")]),
            ETH0
        );
        k
    }

    fn local() -> LocalNode {
        LocalNode {
            name: "a".into(),
            address: ip("192.168.1.2"),
            prefix_len: 24,
            interface: "eth0".into(),
            underlay_mtu: 1500,
            blocks: vec![net("10.244.0.0/24")],
            tunnel_address: Some(ip("10.244.0.1")),
        }
    }

    /// Peer `n`: block 10.244.n.0/24, underlay `address`.
    fn peer(n: u8, address: &str) -> NodeRecord {
        NodeRecord {
            name: format!("p{n}"),
            address: ip(address),
            prefix_len: 24,
            blocks: vec![net(&format!("10.244.{n}.0/24"))],
            backend: BTreeMap::new(),
        }
    }

    /// `BLOCK via PEER dev cnikit.ipip onlink`.
    fn tunnel_route(block: &str, via: &str) -> GatewayRoute {
        GatewayRoute {
            dst: net(block),
            via: ip(via),
            oif: TUN,
            onlink: true,
        }
    }

    /// `BLOCK via PEER dev eth0`.
    fn direct_route(block: &str, via: &str) -> GatewayRoute {
        GatewayRoute {
            dst: net(block),
            via: ip(via),
            oif: ETH0,
            onlink: false,
        }
    }

    fn config(mode: Mode) -> Config {
        Config {
            mode,
            ..Config::default()
        }
    }

    async fn ready(k: &Recording, mode: Mode) -> Ipip<Recording> {
        let mut b = Ipip::with_kernel(config(mode), k.clone()).unwrap();
        b.init(&local()).await.expect("init");
        k.take_writes();
        b
    }

    fn sorted(mut writes: Vec<Write>) -> Vec<Write> {
        writes.sort_by_key(|w| format!("{w:?}"));
        writes
    }

    /// The node itself (skipped by name), two peers on its subnet, one behind a router.
    fn three_peers() -> Vec<NodeRecord> {
        let mut me = peer(0, "192.168.1.2");
        me.name = "a".into();
        vec![
            me,
            peer(1, "192.168.1.11"),
            peer(2, "192.168.1.12"),
            peer(3, "192.168.7.13"),
        ]
    }

    #[tokio::test]
    async fn init_makes_the_device_with_the_tunnel_address() {
        let k = kernel();
        let mut b = Ipip::with_kernel(Config::default(), k.clone()).unwrap();
        b.init(&local()).await.unwrap();
        assert_eq!(
            k.take_writes(),
            vec![
                Write::AddLink(LinkSpec {
                    name: "cnikit.ipip".into(),
                    mtu: 1480,
                    mac: None,
                    kind: LinkKind::Ipip(IpipParams {
                        local: Some("192.168.1.2".parse().unwrap()),
                        underlay: Some(ETH0),
                        ttl: 0,
                        pmtudisc: true,
                    }),
                }),
                Write::AddAddress {
                    ifindex: TUN,
                    addr: net("10.244.0.1/32"),
                },
                Write::SetUp { ifindex: TUN },
            ]
        );
        assert_eq!(
            b.tunnel(),
            Some(Tunnel {
                ifindex: TUN,
                addr: "10.244.0.1".parse().unwrap(),
                mtu: 1480
            })
        );
        assert_eq!(b.mtu_overhead(), 20);
        assert!(b.needs_tunnel_address());
        assert!(b.node_data().is_empty());
        assert_eq!(b.mode(), "ipip");

        // Again, and as a restarted agent: the device is adopted, nothing written.
        b.init(&local()).await.unwrap();
        Ipip::with_kernel(Config::default(), k.clone())
            .unwrap()
            .init(&local())
            .await
            .unwrap();
        assert!(k.writes().is_empty(), "{:?}", k.writes());
    }

    #[tokio::test]
    async fn init_fixes_a_device_that_differs() {
        let k = kernel();
        ready(&k, Mode::Always).await;
        // The node's underlay address changed: the device is made again with it.
        k.add_plain_link("eth1", 1500, &[net("192.168.2.2/24")]);
        let moved = LocalNode {
            address: ip("192.168.2.2"),
            interface: "eth1".into(),
            ..local()
        };
        let mut b = Ipip::with_kernel(Config::default(), k.clone()).unwrap();
        b.init(&moved).await.unwrap();
        let writes = k.take_writes();
        assert_eq!(
            writes[0],
            Write::DeleteLink {
                name: "cnikit.ipip".into()
            }
        );
        assert!(matches!(
            &writes[1],
            Write::AddLink(LinkSpec { kind: LinkKind::Ipip(p), .. })
                if p.local == Some("192.168.2.2".parse().unwrap()) && p.underlay == Some(4)
        ));
        // Another MTU and tunnel address: changed in place.
        let index = b.tunnel().unwrap().ifindex;
        let mut b = Ipip::with_kernel(
            Config {
                mtu: Some(1400),
                ..Config::default()
            },
            k.clone(),
        )
        .unwrap();
        b.init(&LocalNode {
            tunnel_address: Some(ip("10.244.0.9")),
            ..moved
        })
        .await
        .unwrap();
        assert_eq!(
            sorted(k.take_writes()),
            sorted(vec![
                Write::SetMtu {
                    ifindex: index,
                    mtu: 1400
                },
                Write::DeleteAddress {
                    ifindex: index,
                    addr: net("10.244.0.1/32")
                },
                Write::AddAddress {
                    ifindex: index,
                    addr: net("10.244.0.9/32")
                },
            ])
        );
    }

    #[tokio::test]
    async fn init_refuses_what_it_cannot_use() {
        let k = kernel();
        k.add_plain_link("taken0", 1500, &[]);
        k.add_plain_link("eth6", 1500, &[net("fd00:1::2/64")]);
        let cases = [
            (
                Config {
                    device: "taken0".into(),
                    ..Config::default()
                },
                local(),
            ),
            (
                Config {
                    mtu: Some(1481),
                    ..Config::default()
                },
                local(),
            ),
            (
                Config::default(),
                LocalNode {
                    blocks: vec![net("fd00:a::/64")],
                    tunnel_address: None,
                    ..local()
                },
            ),
            (
                Config::default(),
                LocalNode {
                    address: ip("fd00:1::2"),
                    prefix_len: 64,
                    interface: "eth6".into(),
                    ..local()
                },
            ),
            (
                Config::default(),
                LocalNode {
                    interface: "eth7".into(),
                    ..local()
                },
            ),
        ];
        for (config, node) in cases {
            let mut b = Ipip::with_kernel(config, k.clone()).unwrap();
            let e = b.init(&node).await.unwrap_err();
            assert_eq!(e.code().0, 7, "{e}");
            assert_eq!(b.reconcile(&[]).await.unwrap_err().code().0, 50);
        }
        assert!(k.writes().is_empty(), "{:?}", k.writes());
        assert!(k.link("taken0").is_some());
        let e = Ipip::with_kernel(
            Config {
                device: "tunl0".into(),
                ..Config::default()
            },
            k.clone(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("fallback"), "{e}");
    }

    #[tokio::test]
    async fn always_tunnels_to_every_peer() {
        let k = kernel();
        let mut b = ready(&k, Mode::Always).await;
        let report = b.reconcile(&three_peers()).await.unwrap();
        assert_eq!(report.writes, 3);
        assert_eq!(report.routed, 3);
        assert!(report.unroutable.is_empty(), "{:?}", report.unroutable);
        assert_eq!(
            sorted(k.take_writes()),
            sorted(vec![
                Write::AddRoute(tunnel_route("10.244.1.0/24", "192.168.1.11")),
                Write::AddRoute(tunnel_route("10.244.2.0/24", "192.168.1.12")),
                Write::AddRoute(tunnel_route("10.244.3.0/24", "192.168.7.13")),
            ])
        );
        assert_eq!(b.reconcile(&three_peers()).await.unwrap().writes, 0);
        assert!(k.writes().is_empty());
    }

    #[tokio::test]
    async fn cross_subnet_tunnels_only_to_other_subnets() {
        let k = kernel();
        let mut b = ready(&k, Mode::CrossSubnet).await;
        let report = b.reconcile(&three_peers()).await.unwrap();
        assert_eq!(report.writes, 3);
        assert_eq!(report.routed, 3);
        assert_eq!(
            sorted(k.take_writes()),
            sorted(vec![
                Write::AddRoute(direct_route("10.244.1.0/24", "192.168.1.11")),
                Write::AddRoute(direct_route("10.244.2.0/24", "192.168.1.12")),
                Write::AddRoute(tunnel_route("10.244.3.0/24", "192.168.7.13")),
            ])
        );
        assert_eq!(b.reconcile(&three_peers()).await.unwrap().writes, 0);
    }

    #[tokio::test]
    async fn a_peer_moving_subnet_switches_between_tunnel_and_direct() {
        let k = kernel();
        let mut b = ready(&k, Mode::CrossSubnet).await;
        let mut peers = three_peers();
        b.reconcile(&peers).await.unwrap();
        k.take_writes();

        // p2 moves behind the router: its route now goes through the tunnel.
        peers[2].address = ip("192.168.9.12");
        assert_eq!(b.reconcile(&peers).await.unwrap().writes, 1);
        assert_eq!(
            k.take_writes(),
            vec![Write::ReplaceRoute(tunnel_route(
                "10.244.2.0/24",
                "192.168.9.12"
            ))]
        );
        // p3 comes onto the node's subnet: a direct route, no tunnel.
        peers[3].address = ip("192.168.1.13");
        assert_eq!(b.reconcile(&peers).await.unwrap().writes, 1);
        assert_eq!(
            k.take_writes(),
            vec![Write::ReplaceRoute(direct_route(
                "10.244.3.0/24",
                "192.168.1.13"
            ))]
        );
        // In always mode a move only changes the gateway.
        let k = kernel();
        let mut b = ready(&k, Mode::Always).await;
        b.reconcile(&peers).await.unwrap();
        k.take_writes();
        peers[1].address = ip("192.168.8.11");
        assert_eq!(b.reconcile(&peers).await.unwrap().writes, 1);
        assert_eq!(
            k.take_writes(),
            vec![Write::ReplaceRoute(tunnel_route(
                "10.244.1.0/24",
                "192.168.8.11"
            ))]
        );
        // A peer that leaves: exactly its route.
        peers.remove(1);
        assert_eq!(b.reconcile(&peers).await.unwrap().writes, 1);
        assert_eq!(
            k.take_writes(),
            vec![Write::DeleteRoute(tunnel_route(
                "10.244.1.0/24",
                "192.168.8.11"
            ))]
        );
    }

    #[tokio::test]
    async fn peers_it_cannot_tunnel_to_are_unroutable() {
        let k = kernel();
        let mut b = ready(&k, Mode::Always).await;
        let v6 = peer(1, "fd00::1");
        let same = peer(2, "192.168.1.2");
        let mut dual = peer(3, "192.168.1.13");
        dual.blocks.push(net("fd00:3::/64"));
        let mut overlapping = peer(4, "192.168.1.14");
        overlapping.blocks = vec![net("10.244.0.0/25")];
        let report = b.reconcile(&[v6, same, dual, overlapping]).await.unwrap();
        assert_eq!(
            report.unroutable.keys().collect::<Vec<_>>(),
            vec!["p1", "p2", "p3", "p4"]
        );
        assert!(report.unroutable["p1"].contains("not IPv4"));
        assert!(report.unroutable["p2"].contains("this node's underlay address"));
        assert!(report.unroutable["p3"].contains("fd00:3::/64"));
        assert!(report.unroutable["p4"].contains("overlaps"));
        // p3's IPv4 block still works.
        assert_eq!(
            k.routes(),
            vec![tunnel_route("10.244.3.0/24", "192.168.1.13")]
        );
    }

    #[tokio::test]
    async fn teardown_removes_what_it_made_and_nothing_else() {
        let k = kernel();
        let mut b = ready(&k, Mode::CrossSubnet).await;
        b.reconcile(&three_peers()).await.unwrap();
        let foreign = GatewayRoute {
            dst: net("10.99.0.0/16"),
            via: ip("192.168.1.1"),
            oif: ETH0,
            onlink: false,
        };
        k.add_foreign_route(foreign);
        k.take_writes();
        b.teardown().await.unwrap();
        assert_eq!(
            sorted(k.take_writes()),
            sorted(vec![
                Write::DeleteLink {
                    name: "cnikit.ipip".into()
                },
                Write::DeleteRoute(direct_route("10.244.1.0/24", "192.168.1.11")),
                Write::DeleteRoute(direct_route("10.244.2.0/24", "192.168.1.12")),
            ])
        );
        assert!(k.link("cnikit.ipip").is_none());
        assert!(k.routes().is_empty());
        assert_eq!(k.foreign_routes(), vec![foreign]);
        b.teardown().await.unwrap();
        assert!(k.writes().is_empty(), "teardown again writes nothing");
        assert_eq!(b.reconcile(&[]).await.unwrap_err().code().0, 50);

        // A device of that name that is not IPIP is not ours.
        let k = kernel();
        k.add_plain_link("cnikit.ipip", 1500, &[]);
        let mut b = Ipip::with_kernel(Config::default(), k.clone()).unwrap();
        b.teardown().await.unwrap();
        assert!(k.link("cnikit.ipip").is_some());
        assert!(k.writes().is_empty());
    }
}
