//! The `ebpf` cross-node routing mode: a collect_md VXLAN device per node, an LPM map of
//! the other nodes' blocks, and the programs that use them.
//!
//! What [`EbpfRouting`] makes on a node:
//!
//! ```text
//! ip link add cnikit.ebpf address MAC(NODE) mtu UNDERLAY-50 type vxlan external dstport 4789 nolearning
//! tc: from_tunnel on its ingress, to_tunnel on its egress (TCX links pinned, or clsact)
//! tunnel map:  { ifindex of cnikit.ebpf, VNI }
//! per peer:    remotes map: PEER_BLOCK -> PEER_UNDERLAY_IP
//!              ip route replace PEER_BLOCK via PEER_UNDERLAY_IP dev cnikit.ebpf onlink proto 107
//!              ip neigh replace PEER_UNDERLAY_IP lladdr ee:ee:ee:ee:ee:ef dev cnikit.ebpf nud permanent
//! ```
//!
//! A pod's packet to another node's block never meets those routes: `from_pod` finds the
//! block in `remotes`, sets the tunnel key (that node's underlay address, the VNI) and
//! redirects it to the VXLAN device, which encapsulates it. On the other node
//! `from_tunnel` delivers it into the pod by `bpf_redirect_peer`. The routes and neighbour
//! entries are for what the node's own stack sends into the tunnel (the node talking to a
//! remote pod, or answering one): `to_tunnel` gives it the tunnel key of its block.
//!
//! The neighbour entries give every peer the same MAC, [`PEER_MAC`]: `from_tunnel` takes
//! every frame of its VNI as the node's own, whatever its destination MAC. Each device has
//! a MAC of its own ([`device_mac`]), as the kernel drops a decapsulated frame whose source
//! is the receiving device's MAC (a loop, to it).
//!
//! Each reconcile also removes what pods left behind without a DEL (endpoint entries and
//! pinned links of host veths that are gone; see
//! [`EbpfNetwork::remove_stale`](crate::EbpfNetwork::remove_stale)).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use async_trait::async_trait;
use cni_core::linux::NetNs;
use cni_core::linux::kernel::{
    Desired, LinkKind, LinkSpec, Links, Neighbour, Netlink, Ownership, Underlay, VxlanParams,
    ensure_device, remove_owned,
};
use cni_core::linux::{link, vxlan};
use cni_core::registry::NodeRecord;
use cni_core::routing::{CrossNodeRouting, LocalNode, ReconcileReport};
use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::maps::{Pins, Tunnel};
use crate::network::{Config as PodConfig, EbpfNetwork, ensure_bpffs};
use crate::program;

/// Default VXLAN network identifier.
pub const DEFAULT_VNI: u32 = 1;
/// Default name of the VXLAN device.
pub const DEFAULT_DEVICE: &str = "cnikit.ebpf";
/// The MAC of every peer in the neighbour entries through the VXLAN device.
pub const PEER_MAC: [u8; 6] = [0xee, 0xee, 0xee, 0xee, 0xee, 0xef];

/// The MAC of a node's VXLAN device: locally administered unicast, derived from the node
/// name, so a device made again keeps it.
pub fn device_mac(node: &str) -> [u8; 6] {
    let mut key = b"cnikit-ebpf\0".to_vec();
    key.extend_from_slice(node.as_bytes());
    let bits = cni_core::linux::veth::fnv1a64(&key).to_be_bytes();
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&bits[..6]);
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}
/// Bytes of VXLAN encapsulation over an IPv4 underlay.
pub const OVERHEAD: u32 = 50;

/// Configuration of [`EbpfRouting`], the `"ebpf"` key of the `cnikit` entry. Every field
/// has a default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// `vni`: VXLAN network identifier, the same on every node. Default 1.
    pub vni: u32,
    /// `port`: UDP port, the same on every node. Default 4789.
    pub port: u16,
    /// `device`: name of the VXLAN device. Default `cnikit.ebpf`.
    pub device: String,
    /// `mtu`: MTU of the VXLAN device; at most (and by default) the underlay MTU minus 50.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            vni: DEFAULT_VNI,
            port: vxlan::DEFAULT_PORT,
            device: DEFAULT_DEVICE.into(),
            mtu: None,
        }
    }
}

impl RoutingConfig {
    /// Checks the configuration without touching the system. Errors: code 7.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field, reason: String| Error::InvalidConfig { field, reason };
        vxlan::valid_vni(self.vni).map_err(|r| invalid("ebpf.vni", r))?;
        if self.port == 0 {
            return Err(invalid("ebpf.port", "UDP port 0 cannot be used".into()));
        }
        link::valid_device_name(&self.device).map_err(|r| invalid("ebpf.device", r))?;
        if let Some(mtu) = self.mtu {
            cni_core::linux::veth::valid_mtu(mtu).map_err(|r| invalid("ebpf.mtu", r))?;
        }
        Ok(())
    }
}

/// The `ebpf` cross-node routing (see the [module docs](self)).
#[derive(Debug)]
pub struct EbpfRouting {
    config: RoutingConfig,
    bpffs: PathBuf,
    network: String,
    kernel: Netlink,
    node: Option<Node>,
}

#[derive(Debug)]
struct Node {
    local: LocalNode,
    underlay: Underlay,
    ifindex: u32,
    pins: Pins,
    pods: EbpfNetwork,
}

impl EbpfRouting {
    /// Validates `config` and the names (code 7) and builds the mode for network `network`,
    /// whose pins live under `bpffs` (the pod network's `bpffs`), acting in the node
    /// namespace `ns`. Touches nothing until [`init`](CrossNodeRouting::init).
    pub fn new(config: RoutingConfig, bpffs: PathBuf, network: &str, ns: NetNs) -> Result<Self> {
        config.validate()?;
        crate::maps::check_bpffs(&bpffs)?;
        cni_core::spec::validate_network_name(network)?;
        Ok(EbpfRouting {
            config,
            bpffs,
            network: network.to_owned(),
            kernel: Netlink::new(ns),
            node: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RoutingConfig {
        &self.config
    }

    /// Where the maps are pinned, after init.
    pub fn pins(&self) -> Option<&Pins> {
        self.node.as_ref().map(|n| &n.pins)
    }

    /// The VXLAN device's index, after init.
    pub fn ifindex(&self) -> Option<u32> {
        self.node.as_ref().map(|n| n.ifindex)
    }

    async fn init_inner(&mut self, local: &LocalNode) -> Result<()> {
        let pins = Pins::new(&self.bpffs, &self.network, &local.name)?;
        ensure_bpffs(&self.bpffs)?;
        let underlay = Underlay::resolve(&self.kernel, local).await?;
        if !underlay.address.is_ipv4() {
            return Err(Error::InvalidConfig {
                field: "agent.address",
                reason: format!(
                    "the ebpf mode tunnels over IPv4; the underlay address is {}",
                    underlay.address
                ),
            });
        }
        let mtu = underlay
            .tunnel_mtu(self.config.mtu, OVERHEAD, "VXLAN")
            .map_err(|reason| Error::InvalidConfig {
                field: "ebpf.mtu",
                reason,
            })?;
        let spec = LinkSpec {
            name: self.config.device.clone(),
            kind: LinkKind::Vxlan(VxlanParams {
                vni: 0,
                port: self.config.port,
                local: None,
                underlay: None,
                learning: false,
                external: true,
            }),
            mtu,
            mac: Some(device_mac(&local.name)),
        };
        let dev = ensure_device(&self.kernel, &spec).await?;
        let ifindex = dev.link.index;
        if dev.link.mtu != Some(mtu) {
            self.kernel.set_mtu(ifindex, mtu).await?;
        }
        if !dev.link.up {
            self.kernel.set_up(ifindex).await?;
        }
        // Programs: attached once per device and process (init runs again when the node's
        // blocks change); a restarted agent replaces those of the one before.
        let attached = self.node.as_ref().is_some_and(|n| n.ifindex == ifindex);
        if !attached {
            let (p, device) = (pins.clone(), self.config.device.clone());
            let (ingress, egress) = self
                .kernel
                .ns()
                .run(move || program::attach_tunnel(&p, &device))
                .await??;
            tracing::info!(device = %self.config.device, ?ingress, ?egress, "ebpf: tunnel programs attached");
        }
        pins.write_tunnel(Tunnel {
            ifindex,
            vni: self.config.vni,
        })?;
        let pods = match self.node.take() {
            Some(n) => n.pods,
            None => EbpfNetwork::new(
                PodConfig {
                    bpffs: self.bpffs.clone(),
                    ..PodConfig::default()
                },
                &self.network,
                &local.name,
                NetNs::open(self.kernel.ns().path()).await?,
            )?,
        };
        tracing::info!(
            node = %local.name,
            device = %self.config.device,
            vni = self.config.vni,
            mtu,
            pins = %pins.dir().display(),
            "ebpf: ready"
        );
        self.node = Some(Node {
            local: local.clone(),
            underlay,
            ifindex,
            pins,
            pods,
        });
        Ok(())
    }

    async fn reconcile_inner(&mut self, peers: &[NodeRecord]) -> Result<ReconcileReport> {
        let node = self.node.as_ref().ok_or(Error::NotInitialized)?;
        let desired = desired(node, peers);
        // The LPM entries: the blocks the routes go to, through the same peer.
        let wanted: BTreeMap<Ipv4Net, Ipv4Addr> = desired
            .routes()
            .filter_map(|r| match (r.dst, r.via) {
                (IpNet::V4(block), IpAddr::V4(via)) => Some((block, via)),
                _ => None,
            })
            .collect();
        let owned = Ownership {
            neighbour_devices: vec![node.ifindex],
            fdb_devices: Vec::new(),
        };
        let mut report = desired.apply(&self.kernel, &owned).await?;
        report.writes += sync_remotes(&node.pins, &wanted)?;
        let stale = node.pods.remove_stale().await?;
        if !stale.entries.is_empty() || !stale.links.is_empty() {
            tracing::info!(entries = ?stale.entries, links = ?stale.links, "ebpf: removed what gone pods left");
            report.writes += stale.entries.len() + stale.links.len();
        }
        Ok(report)
    }

    async fn teardown_inner(&mut self) -> Result<()> {
        let mut errors: Vec<cni_core::Error> = Vec::new();
        let pins = self.node.as_ref().map(|n| n.pins.clone());
        if let Some(pins) = &pins {
            let cleared = (|| -> Result<()> {
                if pins.read_tunnel()?.is_some() {
                    pins.write_tunnel(Tunnel::default())?;
                }
                sync_remotes(pins, &BTreeMap::new())?;
                program::detach_tunnel(pins)
            })();
            if let Err(e) = cleared {
                errors.push(e.into());
            }
        }
        if let Err(e) = remove_owned(&self.kernel, Some((&self.config.device, "vxlan"))).await {
            errors.push(e);
        }
        self.node = None;
        cni_core::Error::collect(errors).map_err(Error::Core)
    }
}

/// The routes and neighbour entries `peers` call for (the LPM entries follow the routes).
/// Pure.
fn desired(node: &Node, peers: &[NodeRecord]) -> Desired {
    let mut desired = Desired::new();
    let mut peers: Vec<&NodeRecord> = peers.iter().filter(|p| p.name != node.local.name).collect();
    // Conflicts (two peers claiming one block) go to the first by name.
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    for peer in peers {
        desired.peer(&peer.name);
        if peer.address == node.underlay.address {
            desired.unroutable(
                &peer.name,
                format!("it has this node's underlay address {}", peer.address),
            );
            continue;
        }
        if !peer.address.is_ipv4() {
            desired.unroutable(
                &peer.name,
                format!("its underlay address {} is not IPv4", peer.address),
            );
            continue;
        }
        desired.neighbour(
            &peer.name,
            node.ifindex,
            Neighbour {
                ip: peer.address,
                mac: PEER_MAC,
            },
        );
        desired.blocks(peer, &node.local.blocks, peer.address, node.ifindex, true);
    }
    desired
}

/// Makes the pinned `remotes` map hold exactly `wanted`; returns the writes made.
fn sync_remotes(pins: &Pins, wanted: &BTreeMap<Ipv4Net, Ipv4Addr>) -> Result<usize> {
    let Some(mut remotes) = pins.open_remotes()? else {
        return Ok(0);
    };
    let have: BTreeMap<Ipv4Net, Ipv4Addr> = remotes.list()?.into_iter().collect();
    let mut writes = 0;
    for (block, via) in &have {
        if wanted.get(block) != Some(via) {
            tracing::debug!(%block, %via, "ebpf: removing remote block");
            remotes.remove(*block)?;
            writes += 1;
        }
    }
    for (block, via) in wanted {
        if have.get(block) != Some(via) {
            tracing::debug!(%block, %via, "ebpf: remote block");
            remotes.insert(*block, *via)?;
            writes += 1;
        }
    }
    Ok(writes)
}

#[async_trait]
impl CrossNodeRouting for EbpfRouting {
    fn mode(&self) -> &'static str {
        crate::TYPE
    }

    /// Mounts the BPF filesystem when needed, creates the collect_md VXLAN device (or
    /// adopts it), attaches `from_tunnel` and `to_tunnel` to it and writes its index and
    /// the VNI into the pinned `tunnel` map. Idempotent. Errors: 7 for a bad node
    /// description, an IPv6 underlay, an MTU too large, a device of another kind with the
    /// name; 101 for kernel and eBPF failures.
    async fn init(&mut self, local: &LocalNode) -> cni_core::Result<()> {
        Ok(self.init_inner(local).await?)
    }

    /// Nothing: peers need only the node's underlay address and blocks.
    fn node_data(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    /// 50 bytes of VXLAN over IPv4.
    fn mtu_overhead(&self) -> u32 {
        OVERHEAD
    }

    /// Per peer: its blocks in the `remotes` map, a route to each through the VXLAN device
    /// and a permanent neighbour entry for its underlay address there; then removes the
    /// endpoint entries and pinned links of pods whose host veth is gone. Changes only
    /// what differs. Errors: 50 before init, 101 when the kernel or a map cannot be read
    /// or written.
    async fn reconcile(&mut self, peers: &[NodeRecord]) -> cni_core::Result<ReconcileReport> {
        Ok(self.reconcile_inner(peers).await?)
    }

    /// Empties the `remotes` and `tunnel` maps, unpins the device's program links and
    /// deletes the device with every route through it. The pod maps stay (the pods use
    /// them). Idempotent; works without init (then only the device and routes go).
    /// Errors: 101.
    async fn teardown(&mut self) -> cni_core::Result<()> {
        Ok(self.teardown_inner().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_macs_are_stable_local_unicast_and_distinct() {
        let a = device_mac("node-a");
        assert_eq!(a, device_mac("node-a"));
        assert_eq!(a[0] & 0x03, 0x02);
        assert_ne!(a, device_mac("node-b"));
        assert_ne!(a, PEER_MAC);
    }

    #[test]
    fn config_defaults_names_and_validation() {
        let c: RoutingConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, RoutingConfig::default());
        assert_eq!((c.vni, c.port, c.device.as_str()), (1, 4789, "cnikit.ebpf"));
        c.validate().unwrap();
        let c: RoutingConfig =
            serde_json::from_str(r#"{"vni": 9, "port": 8472, "device": "ebx", "mtu": 1400}"#)
                .unwrap();
        assert_eq!((c.vni, c.port, c.mtu), (9, 8472, Some(1400)));
        assert!(serde_json::from_str::<RoutingConfig>(r#"{"vnid": 9}"#).is_err());
        for bad in [
            RoutingConfig {
                vni: 1 << 24,
                ..RoutingConfig::default()
            },
            RoutingConfig {
                port: 0,
                ..RoutingConfig::default()
            },
            RoutingConfig {
                device: "a-much-too-long-name".into(),
                ..RoutingConfig::default()
            },
            RoutingConfig {
                mtu: Some(20),
                ..RoutingConfig::default()
            },
        ] {
            assert_eq!(bad.validate().unwrap_err().code().0, 7, "{bad:?}");
        }
    }
}
