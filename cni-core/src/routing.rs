//! Cross-node routing: how pod traffic reaches pods on other nodes.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use async_trait::async_trait;
use ipnet::IpNet;

use crate::error::Result;
use crate::registry::NodeRecord;

/// The node a routing backend runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNode {
    /// Node name.
    pub name: String,
    /// Underlay address.
    pub address: IpAddr,
    /// Prefix length of the underlay subnet.
    pub prefix_len: u8,
    /// Underlay interface name.
    pub interface: String,
    /// MTU of the underlay interface.
    pub underlay_mtu: u32,
    /// Pod blocks this node owns.
    pub blocks: Vec<IpNet>,
    /// An address of the node's own blocks reserved for a tunnel device (the VXLAN VTEP),
    /// allocated through the IPAM so no pod ever gets it. `None`: a mode that needs one
    /// falls back to the network address of the first block, which only a block IPAM that
    /// reserves network addresses (the bridge pod network) leaves free.
    pub tunnel_address: Option<IpAddr>,
}

impl LocalNode {
    /// The IPv4 address of the node's tunnel device: [`tunnel_address`] when it is IPv4,
    /// else the network address of the first IPv4 block (see [`tunnel_address`] for when
    /// that is safe). `None` without either.
    ///
    /// [`tunnel_address`]: LocalNode::tunnel_address
    pub fn tunnel_ipv4(&self) -> Option<Ipv4Addr> {
        match self.tunnel_address {
            Some(IpAddr::V4(a)) => Some(a),
            _ => self.blocks.iter().find_map(|b| match b {
                IpNet::V4(v4) => Some(v4.network()),
                IpNet::V6(_) => None,
            }),
        }
    }
}

/// What one reconcile pass found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Kernel writes (netlink add/replace/delete requests) made.
    pub writes: usize,
    /// Peers that are routed.
    pub routed: usize,
    /// Peers this mode cannot route, with the reason (a host-gw peer that is not on-link).
    pub unroutable: BTreeMap<String, String>,
    /// The entries the mode has in the kernel for its peers after the pass.
    pub programmed: Programmed,
}

/// Kernel entries a routing mode has programmed for its peers (wanted and written, or
/// found in place), as the node agent's metrics report them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Programmed {
    /// Routes to peers' blocks.
    pub routes: usize,
    /// Permanent neighbour (ARP) entries.
    pub neighbours: usize,
    /// Bridge forwarding database entries of a VXLAN device.
    pub fdb: usize,
}

/// Programs the node's kernel so that pods reach the blocks of other nodes.
///
/// Every method acts in the node's network namespace through handles the backend holds.
#[async_trait]
pub trait CrossNodeRouting: Send + Sync {
    /// The mode name (`host-gw`, `vxlan`, …), also the configuration string.
    fn mode(&self) -> &'static str;

    /// Creates the devices the mode needs (a VXLAN device…). Idempotent: the node agent
    /// calls it again with the new [`LocalNode::blocks`] when the node's blocks change.
    /// Errors: 101 for kernel failures, 7 for a bad configuration.
    async fn init(&mut self, local: &LocalNode) -> Result<()>;

    /// Data to publish in this node's record for peers (for example the VTEP MAC).
    /// Valid after [`init`](CrossNodeRouting::init).
    fn node_data(&self) -> BTreeMap<String, String>;

    /// Bytes of encapsulation this mode adds (pod MTU = underlay MTU − overhead).
    fn mtu_overhead(&self) -> u32;

    /// Whether the mode needs an address of the node's blocks for a tunnel device (the
    /// VXLAN VTEP). The node agent then allocates one through the IPAM, so no pod gets it,
    /// and passes it in [`LocalNode::tunnel_address`]. Default: no.
    fn needs_tunnel_address(&self) -> bool {
        false
    }

    /// Makes the kernel match the full desired set of peers: level-triggered, safe to call
    /// again, changes only what differs, removes what belongs to peers no longer listed.
    /// The local node may be in `peers` and is skipped.
    async fn reconcile(&mut self, peers: &[NodeRecord]) -> Result<ReconcileReport>;

    /// Removes everything the mode created. Idempotent.
    async fn teardown(&mut self) -> Result<()>;

    /// What the mode learned and did by itself, for the node state file: a mode that
    /// learns routes from elsewhere than the registry (BGP) reports its sessions, the routes
    /// it installed and its errors here. Cheap and side-effect free; the agent calls it
    /// whenever it writes the node state file. Default: nothing to report.
    fn report(&self) -> Option<serde_json::Value> {
        None
    }
}
