//! The VXLAN backend.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use async_trait::async_trait;
use cni_core::linux::NetNs;
use cni_core::linux::kernel::{
    Desired, FdbEntry, Kernel, LinkKind, LinkSpec, Neighbour, Netlink, Ownership, Underlay,
    configure_device, ensure_device, remove_owned,
};
use cni_core::registry::NodeRecord;
use cni_core::routing::{CrossNodeRouting, LocalNode, ReconcileReport};
use cni_core::spec::HwAddr;

use crate::config::Config;
use crate::device;
use crate::error::{Error, Result};
use crate::{OVERHEAD_IPV4, OVERHEAD_IPV6, VTEP_ADDR, VTEP_MAC};

/// This node's VXLAN tunnel endpoint, known after `init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vtep {
    /// Index of the VXLAN device.
    pub ifindex: u32,
    /// Its address: the node's IPv4 tunnel address, else the network address of the node's
    /// first IPv4 block.
    pub addr: Ipv4Addr,
    /// Its MAC.
    pub mac: [u8; 6],
}

/// VXLAN cross-node routing (see the [crate docs](crate)).
///
/// `K` is the kernel it programs: [`Netlink`] in a network namespace, or
/// [`Recording`](cni_core::linux::kernel::Recording) in unit tests.
#[derive(Debug)]
pub struct Vxlan<K = Netlink> {
    config: Config,
    kernel: K,
    node: Option<Node>,
}

#[derive(Debug)]
struct Node {
    local: LocalNode,
    underlay: Underlay,
    vtep: Vtep,
}

impl Vxlan<Netlink> {
    /// Validates `config` (code 7) and builds the backend acting in the node namespace
    /// `ns` (for a node agent: [`NetNs::current`]). Touches nothing until
    /// [`init`](CrossNodeRouting::init).
    pub fn new(config: Config, ns: NetNs) -> Result<Self> {
        Self::with_kernel(config, Netlink::new(ns))
    }
}

impl<K: Kernel> Vxlan<K> {
    /// Validates `config` (code 7) and builds the backend programming `kernel`. Touches
    /// nothing.
    pub fn with_kernel(config: Config, kernel: K) -> Result<Self> {
        config.validate()?;
        Ok(Vxlan {
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

    /// This node's VTEP, after `init`.
    pub fn vtep(&self) -> Option<Vtep> {
        self.node.as_ref().map(|n| n.vtep)
    }

    /// The encapsulation overhead over an underlay of `address`'s family.
    fn overhead_for(address: IpAddr) -> u32 {
        if address.is_ipv4() {
            OVERHEAD_IPV4
        } else {
            OVERHEAD_IPV6
        }
    }

    async fn init_inner(&mut self, local: &LocalNode) -> Result<()> {
        let underlay = Underlay::resolve(&self.kernel, local).await?;
        let overhead = Self::overhead_for(underlay.address);
        let mtu = underlay
            .tunnel_mtu(self.config.mtu, overhead, "VXLAN")
            .map_err(|reason| Error::InvalidConfig {
                field: "mtu",
                reason,
            })?;
        let vtep_addr = local.tunnel_ipv4().ok_or_else(|| Error::NoVtepAddress {
            node: local.name.clone(),
        })?;

        let spec = LinkSpec {
            name: self.config.device.clone(),
            kind: LinkKind::Vxlan(device::params(
                self.config.vni,
                self.config.port,
                underlay.address,
                underlay.ifindex,
            )),
            mtu,
            mac: Some(device::vtep_mac(&local.name, self.config.vni)),
        };
        let dev = ensure_device(&self.kernel, &spec).await?;
        configure_device(&self.kernel, &dev, mtu, IpAddr::V4(vtep_addr)).await?;
        let vtep = Vtep {
            ifindex: dev.link.index,
            addr: vtep_addr,
            mac: device::mac_of(&dev)?,
        };
        tracing::info!(
            node = %local.name,
            device = %self.config.device,
            vtep = %vtep.addr,
            mac = %HwAddr::from(vtep.mac),
            mtu,
            direct_routing = self.config.direct_routing,
            "vxlan: ready"
        );
        self.node = Some(Node {
            local: local.clone(),
            underlay,
            vtep,
        });
        Ok(())
    }

    /// The entries and unroutable peers `peers` call for. Pure.
    fn desired(&self, node: &Node, peers: &[NodeRecord]) -> Desired {
        let mut desired = Desired::new();
        let mut peers: Vec<&NodeRecord> =
            peers.iter().filter(|p| p.name != node.local.name).collect();
        // Conflicts (two peers claiming one block or VTEP) go to the first by name.
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        let underlay = &node.underlay;
        let vtep = &node.vtep;
        for peer in peers {
            desired.peer(&peer.name);
            if peer.address == underlay.address {
                desired.unroutable(
                    &peer.name,
                    format!("it has this node's underlay address {}", peer.address),
                );
                continue;
            }
            if peer.address.is_ipv4() != underlay.address.is_ipv4() {
                desired.unroutable(
                    &peer.name,
                    format!(
                        "its underlay address {} is not of the family of this node's {}",
                        peer.address, underlay.address
                    ),
                );
                continue;
            }
            if self.config.direct_routing && underlay.on_link(peer.address) {
                desired.blocks(
                    peer,
                    &node.local.blocks,
                    peer.address,
                    underlay.ifindex,
                    false,
                );
                continue;
            }
            let (addr, mac) = match peer_vtep(peer) {
                Ok(v) => v,
                Err(reason) => {
                    desired.unroutable(&peer.name, reason);
                    continue;
                }
            };
            if addr == IpAddr::V4(vtep.addr) || mac == vtep.mac {
                desired.unroutable(
                    &peer.name,
                    format!(
                        "its VTEP {addr} {} collides with this node's",
                        HwAddr::from(mac)
                    ),
                );
                continue;
            }
            let taken = desired
                .neighbour_owner(vtep.ifindex, addr)
                .map(|o| format!("its VTEP address {addr} is node {o}'s too"))
                .or_else(|| {
                    desired
                        .fdb_owner(vtep.ifindex, mac)
                        .map(|o| format!("its VTEP MAC {} is node {o}'s too", HwAddr::from(mac)))
                });
            if let Some(reason) = taken {
                desired.unroutable(&peer.name, reason);
                continue;
            }
            desired.neighbour(&peer.name, vtep.ifindex, Neighbour { ip: addr, mac });
            desired.fdb(
                &peer.name,
                vtep.ifindex,
                FdbEntry {
                    mac,
                    dst: peer.address,
                },
            );
            desired.blocks(peer, &node.local.blocks, addr, vtep.ifindex, true);
        }
        desired
    }

    async fn reconcile_inner(&mut self, peers: &[NodeRecord]) -> Result<ReconcileReport> {
        let node = self.node.as_ref().ok_or(Error::NotInitialized)?;
        let owned = Ownership {
            neighbour_devices: vec![node.vtep.ifindex],
            fdb_devices: vec![node.vtep.ifindex],
        };
        let report = self
            .desired(node, peers)
            .apply(&self.kernel, &owned)
            .await?;
        tracing::debug!(
            writes = report.writes,
            routed = report.routed,
            unroutable = report.unroutable.len(),
            "vxlan: reconciled"
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

/// The VTEP address and MAC a peer published.
fn peer_vtep(peer: &NodeRecord) -> std::result::Result<(IpAddr, [u8; 6]), String> {
    let get = |key: &str| {
        peer.backend
            .get(key)
            .ok_or_else(|| format!("its record has no {key} (is it running vxlan?)"))
    };
    let raw_mac = get(VTEP_MAC)?;
    let raw_addr = get(VTEP_ADDR)?;
    let mac = raw_mac
        .parse::<HwAddr>()
        .ok()
        .and_then(|m| <[u8; 6]>::try_from(m.as_bytes()).ok())
        .filter(|m| m[0] & 1 == 0 && *m != [0; 6])
        .ok_or_else(|| format!("{VTEP_MAC} {raw_mac:?} is not a unicast MAC address"))?;
    let addr = raw_addr
        .parse::<Ipv4Addr>()
        .map_err(|_| format!("{VTEP_ADDR} {raw_addr:?} is not an IPv4 address"))?;
    Ok((IpAddr::V4(addr), mac))
}

#[async_trait]
impl<K: Kernel> CrossNodeRouting for Vxlan<K> {
    fn mode(&self) -> &'static str {
        crate::TYPE
    }

    /// Creates the VXLAN device (VNI, port, `local` = node address, `dev` = underlay
    /// interface, learning off, MTU), gives it the VTEP address and brings it up.
    /// Idempotent: an existing device with the same parameters is adopted (its MAC kept),
    /// one with other parameters is made again. Errors: 7 for a bad node description, an
    /// MTU too large for the underlay, no IPv4 block, a non-VXLAN device of the same name;
    /// 101 for kernel failures.
    async fn init(&mut self, local: &LocalNode) -> cni_core::Result<()> {
        Ok(self.init_inner(local).await?)
    }

    /// `vtepMac` and `vtepAddr`, after init (empty before).
    fn node_data(&self) -> BTreeMap<String, String> {
        self.node
            .as_ref()
            .map(|n| {
                BTreeMap::from([
                    (VTEP_MAC.to_owned(), HwAddr::from(n.vtep.mac).to_string()),
                    (VTEP_ADDR.to_owned(), n.vtep.addr.to_string()),
                ])
            })
            .unwrap_or_default()
    }

    /// 50 bytes over an IPv4 underlay, 70 over IPv6 (IPv4 until init tells).
    fn mtu_overhead(&self) -> u32 {
        self.node
            .as_ref()
            .map_or(OVERHEAD_IPV4, |n| Self::overhead_for(n.underlay.address))
    }

    /// The VTEP needs an address of the node's block that no pod gets.
    fn needs_tunnel_address(&self) -> bool {
        true
    }

    /// Per peer: the route to each block via its VTEP (on-link), a permanent neighbour
    /// entry for its VTEP and an FDB entry sending its VTEP MAC to its underlay address;
    /// with DirectRouting, same-subnet peers get only host-gw routes. Peers without VTEP
    /// data are reported unroutable. Errors: 50 before init, 101 when the kernel cannot be
    /// read or a stale entry cannot be deleted.
    async fn reconcile(&mut self, peers: &[NodeRecord]) -> cni_core::Result<ReconcileReport> {
        Ok(self.reconcile_inner(peers).await?)
    }

    /// Deletes the VXLAN device (with every neighbour, FDB entry and route through it) and
    /// the routes it made through the underlay. Idempotent; works without init.
    /// Errors: 101.
    async fn teardown(&mut self) -> cni_core::Result<()> {
        Ok(self.teardown_inner().await?)
    }
}

#[cfg(test)]
mod tests {
    use cni_core::linux::kernel::{GatewayRoute, Recording, Write};
    use ipnet::IpNet;

    use super::*;

    const ETH0: u32 = 2;
    /// The VXLAN device is the next link the fake makes.
    const VX: u32 = 3;

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
            blocks: vec![net("fd00:a::/64"), net("10.244.0.0/24")],
            tunnel_address: None,
        }
    }

    fn mac(n: u8) -> [u8; 6] {
        [0x0a, 0, 0, 0, 0, n]
    }

    /// Peer `n`: underlay 192.168.1.(10+n) unless given, block 10.244.n.0/24, VTEP
    /// 10.244.n.0 with MAC 0a:00:00:00:00:0n.
    fn peer(n: u8) -> NodeRecord {
        NodeRecord {
            name: format!("p{n}"),
            address: ip(&format!("192.168.1.{}", 10 + n)),
            prefix_len: 24,
            blocks: vec![net(&format!("10.244.{n}.0/24"))],
            backend: BTreeMap::from([
                (VTEP_MAC.into(), HwAddr::from(mac(n)).to_string()),
                (VTEP_ADDR.into(), format!("10.244.{n}.0")),
            ]),
        }
    }

    fn vx_route(block: &str, vtep: &str) -> GatewayRoute {
        GatewayRoute {
            dst: net(block),
            via: ip(vtep),
            oif: VX,
            onlink: true,
        }
    }

    async fn ready(k: &Recording, config: Config) -> Vxlan<Recording> {
        let mut v = Vxlan::with_kernel(config, k.clone()).unwrap();
        v.init(&local()).await.expect("init");
        v
    }

    /// The write that resolves the VTEP address `vtep` to `mac` on the VXLAN device.
    fn replace_neighbour(vtep: &str, mac: [u8; 6]) -> Write {
        Write::ReplaceNeighbour {
            ifindex: VX,
            entry: Neighbour { ip: ip(vtep), mac },
        }
    }

    fn sorted(mut writes: Vec<Write>) -> Vec<Write> {
        writes.sort_by_key(|w| format!("{w:?}"));
        writes
    }

    #[tokio::test]
    async fn init_makes_the_device_and_publishes_the_vtep() {
        let k = kernel();
        let v = ready(&k, Config::default()).await;
        let mac = device::vtep_mac("a", 1);
        assert_eq!(
            k.take_writes(),
            vec![
                Write::AddLink(LinkSpec {
                    name: "cnikit.vxlan".into(),
                    kind: LinkKind::Vxlan(cni_core::linux::kernel::VxlanParams {
                        vni: 1,
                        port: 4789,
                        local: Some(ip("192.168.1.2")),
                        underlay: Some(ETH0),
                        learning: false,
                        external: false,
                    }),
                    mtu: 1450,
                    mac: Some(mac),
                }),
                Write::AddAddress {
                    ifindex: VX,
                    addr: net("10.244.0.0/32"),
                },
                Write::SetUp { ifindex: VX },
            ]
        );
        assert_eq!(
            v.node_data(),
            BTreeMap::from([
                ("vtepAddr".to_owned(), "10.244.0.0".to_owned()),
                ("vtepMac".to_owned(), HwAddr::from(mac).to_string()),
            ])
        );
        assert_eq!(v.mtu_overhead(), 50);
        assert_eq!(v.mode(), "vxlan");
        assert_eq!(
            v.vtep(),
            Some(Vtep {
                ifindex: VX,
                addr: "10.244.0.0".parse().unwrap(),
                mac
            })
        );
    }

    #[tokio::test]
    async fn init_is_idempotent_and_adopts_the_device() {
        let k = kernel();
        let mut v = ready(&k, Config::default()).await;
        let data = v.node_data();
        k.take_writes();
        v.init(&local()).await.unwrap();
        assert!(k.writes().is_empty());
        // A restarted agent: a new backend adopts the device and its MAC.
        let again = ready(&k, Config::default()).await;
        assert!(k.writes().is_empty());
        assert_eq!(again.node_data(), data);
    }

    #[tokio::test]
    async fn init_fixes_a_device_that_differs() {
        let k = kernel();
        ready(&k, Config::default()).await;
        k.take_writes();
        // Another VNI: the device is made again.
        ready(
            &k,
            Config {
                vni: 9,
                ..Config::default()
            },
        )
        .await;
        let writes = k.take_writes();
        assert_eq!(
            writes[0],
            Write::DeleteLink {
                name: "cnikit.vxlan".into()
            }
        );
        assert!(
            matches!(&writes[1], Write::AddLink(LinkSpec { kind: LinkKind::Vxlan(p), .. }) if p.vni == 9)
        );
        // Another MTU and block: changed in place.
        let mut v = Vxlan::with_kernel(
            Config {
                vni: 9,
                mtu: Some(1400),
                ..Config::default()
            },
            k.clone(),
        )
        .unwrap();
        v.init(&LocalNode {
            blocks: vec![net("10.244.7.0/26")],
            tunnel_address: None,
            ..local()
        })
        .await
        .unwrap();
        let index = v.vtep().unwrap().ifindex;
        assert_eq!(
            sorted(k.take_writes()),
            sorted(vec![
                Write::SetMtu {
                    ifindex: index,
                    mtu: 1400
                },
                Write::DeleteAddress {
                    ifindex: index,
                    addr: net("10.244.0.0/32")
                },
                Write::AddAddress {
                    ifindex: index,
                    addr: net("10.244.7.0/32")
                },
            ])
        );
    }

    #[tokio::test]
    async fn init_refuses_what_it_cannot_use() {
        let k = kernel();
        k.add_plain_link("taken0", 1500, &[]);
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
                    mtu: Some(1451),
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
                    interface: "eth7".into(),
                    ..local()
                },
            ),
        ];
        for (config, node) in cases {
            let mut v = Vxlan::with_kernel(config, k.clone()).unwrap();
            let e = v.init(&node).await.unwrap_err();
            assert_eq!(e.code().0, 7, "{e}");
            assert_eq!(v.reconcile(&[]).await.unwrap_err().code().0, 50);
        }
        assert!(k.writes().is_empty(), "{:?}", k.writes());
        assert!(k.link("taken0").is_some());
        assert!(
            Vxlan::with_kernel(
                Config {
                    vni: 1 << 24,
                    ..Config::default()
                },
                k.clone()
            )
            .is_err()
        );
    }

    #[tokio::test]
    async fn programs_route_neighbour_and_fdb_per_peer() {
        let k = kernel();
        let mut v = ready(&k, Config::default()).await;
        k.take_writes();
        let mut me = peer(0);
        me.name = "a".into();
        let peers = vec![me, peer(1), peer(2), peer(3)];
        let report = v.reconcile(&peers).await.unwrap();
        assert_eq!(report.writes, 9);
        assert_eq!(report.routed, 3);
        assert!(report.unroutable.is_empty());
        assert_eq!(
            k.routes(),
            vec![
                vx_route("10.244.1.0/24", "10.244.1.0"),
                vx_route("10.244.2.0/24", "10.244.2.0"),
                vx_route("10.244.3.0/24", "10.244.3.0"),
            ]
        );
        assert_eq!(
            k.neighbours(VX),
            (1..=3)
                .map(|n| Neighbour {
                    ip: ip(&format!("10.244.{n}.0")),
                    mac: mac(n)
                })
                .collect::<Vec<_>>()
        );
        assert_eq!(
            k.fdb(VX),
            (1..=3)
                .map(|n| FdbEntry {
                    mac: mac(n),
                    dst: ip(&format!("192.168.1.{}", 10 + n))
                })
                .collect::<Vec<_>>()
        );
        k.take_writes();
        let report = v.reconcile(&peers).await.unwrap();
        assert_eq!(report.writes, 0);
        assert!(k.writes().is_empty());
    }

    #[tokio::test]
    async fn a_changed_peer_rewrites_only_its_entries() {
        let k = kernel();
        let mut v = ready(&k, Config::default()).await;
        let mut peers = vec![peer(1), peer(2), peer(3)];
        v.reconcile(&peers).await.unwrap();
        k.take_writes();

        // New underlay address: only its FDB entry.
        peers[1].address = ip("192.168.1.99");
        assert_eq!(v.reconcile(&peers).await.unwrap().writes, 1);
        let new_fdb = FdbEntry {
            mac: mac(2),
            dst: ip("192.168.1.99"),
        };
        assert_eq!(
            k.take_writes(),
            vec![Write::ReplaceFdb {
                ifindex: VX,
                entry: new_fdb
            }]
        );

        // New MAC (the peer's device was made again): neighbour replaced, FDB entry under
        // the new MAC, the old MAC's entry deleted.
        peers[1]
            .backend
            .insert(VTEP_MAC.into(), "0a:00:00:00:00:22".into());
        assert_eq!(v.reconcile(&peers).await.unwrap().writes, 3);
        let new_mac = [0x0a, 0, 0, 0, 0, 0x22];
        assert_eq!(
            sorted(k.take_writes()),
            sorted(vec![
                replace_neighbour("10.244.2.0", new_mac),
                Write::ReplaceFdb {
                    ifindex: VX,
                    entry: FdbEntry {
                        mac: new_mac,
                        ..new_fdb
                    }
                },
                Write::DeleteFdb {
                    ifindex: VX,
                    entry: new_fdb
                },
            ])
        );

        // New block (and so VTEP address): route, neighbour replaced; old ones deleted.
        peers[1].blocks = vec![net("10.244.20.0/24")];
        peers[1]
            .backend
            .insert(VTEP_ADDR.into(), "10.244.20.0".into());
        assert_eq!(v.reconcile(&peers).await.unwrap().writes, 4);
        assert_eq!(
            sorted(k.take_writes()),
            sorted(vec![
                replace_neighbour("10.244.20.0", new_mac),
                Write::AddRoute(vx_route("10.244.20.0/24", "10.244.20.0")),
                Write::DeleteRoute(vx_route("10.244.2.0/24", "10.244.2.0")),
                Write::DeleteNeighbour {
                    ifindex: VX,
                    ip: ip("10.244.2.0")
                },
            ])
        );

        // Removed peer: exactly its route, neighbour and FDB entry.
        peers.remove(0);
        assert_eq!(v.reconcile(&peers).await.unwrap().writes, 3);
        assert_eq!(
            sorted(k.take_writes()),
            sorted(vec![
                Write::DeleteRoute(vx_route("10.244.1.0/24", "10.244.1.0")),
                Write::DeleteNeighbour {
                    ifindex: VX,
                    ip: ip("10.244.1.0")
                },
                Write::DeleteFdb {
                    ifindex: VX,
                    entry: FdbEntry {
                        mac: mac(1),
                        dst: ip("192.168.1.11")
                    }
                },
            ])
        );
        assert_eq!(k.routes().len(), 2);
        assert_eq!(k.neighbours(VX).len(), 2);
        assert_eq!(k.fdb(VX).len(), 2);
    }

    #[tokio::test]
    async fn peers_without_usable_vtep_data_are_unroutable() {
        let k = kernel();
        let mut v = ready(&k, Config::default()).await;
        let mut none = peer(1);
        none.backend.clear();
        let mut bad_mac = peer(2);
        bad_mac
            .backend
            .insert(VTEP_MAC.into(), "01:00:5e:00:00:01".into());
        let mut bad_addr = peer(3);
        bad_addr.backend.insert(VTEP_ADDR.into(), "fd00::1".into());
        let mut same_mac = peer(5);
        same_mac
            .backend
            .insert(VTEP_MAC.into(), HwAddr::from(mac(4)).to_string());
        let mut v6 = peer(6);
        v6.address = ip("fd00::6");
        let mut dual = peer(7);
        dual.blocks.push(net("fd00:7::/64"));
        let peers = vec![none, bad_mac, bad_addr, peer(4), same_mac, v6, dual];
        let report = v.reconcile(&peers).await.unwrap();
        assert_eq!(
            report.unroutable.keys().collect::<Vec<_>>(),
            vec!["p1", "p2", "p3", "p5", "p6", "p7"]
        );
        assert!(report.unroutable["p1"].contains("no vtepMac"));
        assert!(report.unroutable["p2"].contains("not a unicast MAC"));
        assert!(report.unroutable["p3"].contains("not an IPv4 address"));
        assert!(report.unroutable["p5"].contains("node p4's too"));
        assert!(report.unroutable["p6"].contains("family"));
        assert!(report.unroutable["p7"].contains("fd00:7::/64"));
        assert_eq!(report.routed, 1);
        // p7's IPv4 block still works.
        assert_eq!(
            k.routes(),
            vec![
                vx_route("10.244.4.0/24", "10.244.4.0"),
                vx_route("10.244.7.0/24", "10.244.7.0"),
            ]
        );
        assert_eq!(k.fdb(VX).len(), 2);
    }

    #[tokio::test]
    async fn direct_routing_routes_same_subnet_peers_without_the_tunnel() {
        let k = kernel();
        let mut v = ready(
            &k,
            Config {
                direct_routing: true,
                ..Config::default()
            },
        )
        .await;
        let mut near = peer(1);
        near.backend.clear(); // not needed for a direct route
        let mut far = peer(2);
        far.address = ip("192.168.7.2");
        let report = v.reconcile(&[near.clone(), far.clone()]).await.unwrap();
        assert_eq!(report.routed, 2);
        assert_eq!(
            k.routes(),
            vec![
                GatewayRoute {
                    dst: net("10.244.1.0/24"),
                    via: ip("192.168.1.11"),
                    oif: ETH0,
                    onlink: false,
                },
                vx_route("10.244.2.0/24", "10.244.2.0"),
            ]
        );
        assert_eq!(
            k.neighbours(VX),
            vec![Neighbour {
                ip: ip("10.244.2.0"),
                mac: mac(2)
            }]
        );
        assert_eq!(
            k.fdb(VX),
            vec![FdbEntry {
                mac: mac(2),
                dst: ip("192.168.7.2")
            }]
        );

        // Teardown removes the device and the direct route, nobody else's.
        let foreign = GatewayRoute {
            dst: net("10.99.0.0/16"),
            via: ip("192.168.1.1"),
            oif: ETH0,
            onlink: false,
        };
        k.add_foreign_route(foreign);
        v.teardown().await.unwrap();
        assert!(k.link("cnikit.vxlan").is_none());
        assert!(k.routes().is_empty());
        assert!(k.neighbours(VX).is_empty() && k.fdb(VX).is_empty());
        assert_eq!(k.foreign_routes(), vec![foreign]);
        k.take_writes();
        v.teardown().await.unwrap();
        assert!(k.writes().is_empty(), "teardown again writes nothing");
    }

    #[tokio::test]
    async fn teardown_leaves_a_device_that_is_not_vxlan() {
        let k = kernel();
        k.add_plain_link("cnikit.vxlan", 1500, &[]);
        let mut v = Vxlan::with_kernel(Config::default(), k.clone()).unwrap();
        v.teardown().await.unwrap();
        assert!(k.link("cnikit.vxlan").is_some());
        assert!(k.writes().is_empty());
    }

    #[tokio::test]
    async fn an_ipv6_underlay_costs_70_bytes() {
        let k = Recording::new();
        k.add_plain_link("eth0", 1500, &[net("fd00:1::2/64")]);
        let mut v = Vxlan::with_kernel(Config::default(), k.clone()).unwrap();
        v.init(&LocalNode {
            address: ip("fd00:1::2"),
            prefix_len: 64,
            ..local()
        })
        .await
        .unwrap();
        assert_eq!(v.mtu_overhead(), 70);
        assert_eq!(k.link("cnikit.vxlan").unwrap().link.mtu, Some(1430));
        let mut p = peer(1);
        p.address = ip("fd00:1::11");
        let report = v.reconcile(&[p]).await.unwrap();
        assert_eq!(report.routed, 1);
        assert_eq!(
            k.fdb(VX),
            vec![FdbEntry {
                mac: mac(1),
                dst: ip("fd00:1::11")
            }]
        );
    }
}
