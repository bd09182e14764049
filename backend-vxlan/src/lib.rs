//! # backend-vxlan
//!
//! cnikit's `vxlan` cross-node routing: one VXLAN device per node (VNI 1, UDP port 4789,
//! learning off, `local` = the node's underlay address) and, per peer, three static
//! entries, as flannel programs them:
//!
//! ```text
//! ip route replace PEER_BLOCK via PEER_VTEP dev cnikit.vxlan onlink proto 107
//! ip neigh replace PEER_VTEP lladdr PEER_VTEP_MAC dev cnikit.vxlan nud permanent
//! bridge fdb replace PEER_VTEP_MAC dev cnikit.vxlan dst PEER_UNDERLAY_IP self permanent
//! ```
//!
//! The device's address (the VTEP address), as a /32, is the node's
//! [`tunnel_address`](cni_core::routing::LocalNode::tunnel_address) (an IPv4 address the
//! node agent allocates from the node's block, so no pod gets it); without one, the network
//! address of the node's first IPv4 pod block, which the pod IPAM must then not hand to a
//! pod. Peers learn it and the device's MAC from the node record ([`node_data`]:
//! `vtepAddr`, `vtepMac`).
//! With [`Config::direct_routing`], peers in the same underlay subnet get plain host-gw
//! routes (`PEER_BLOCK via PEER_UNDERLAY_IP dev UNDERLAY`) instead and only the others go
//! through the tunnel. The device MTU, and the pod MTU, is the underlay MTU minus
//! [`mtu_overhead`] (50 bytes over IPv4, 70 over IPv6).
//!
//! [`node_data`]: cni_core::routing::CrossNodeRouting::node_data
//! [`mtu_overhead`]: cni_core::routing::CrossNodeRouting::mtu_overhead
//!
//! ## Modules
//! - [`Vxlan`]: the [`CrossNodeRouting`](cni_core::routing::CrossNodeRouting)
//!   implementation, generic over the [`Kernel`](cni_core::linux::kernel::Kernel) it
//!   programs (netlink in a namespace, or the recording fake in unit tests).
//! - [`Config`]: VNI, port, device name, MTU, DirectRouting; serde names `vni`, `port`,
//!   `device`, `mtu`, `directRouting`.
//! - [`Error`]: what can go wrong, with its CNI code.
//!
//! ## Quick start
//! ```no_run
//! # async fn run(peers: Vec<cni_core::registry::NodeRecord>) -> cni_core::Result<()> {
//! use backend_vxlan::{Config, Vxlan};
//! use cni_core::linux::NetNs;
//! use cni_core::routing::{CrossNodeRouting, LocalNode};
//!
//! let config: Config = serde_json::from_str(r#"{"vni": 7, "directRouting": true}"#).unwrap();
//! let mut vxlan = Vxlan::new(config, NetNs::current().await?)?;
//! vxlan
//!     .init(&LocalNode {
//!         name: "node-a".into(),
//!         address: "192.168.1.2".parse().unwrap(),
//!         prefix_len: 24,
//!         interface: "eth0".into(),
//!         underlay_mtu: 1500,
//!         blocks: vec!["10.244.1.0/26".parse().unwrap()],
//!         tunnel_address: None,
//!     })
//!     .await?;
//! let publish = vxlan.node_data(); // vtepMac, vtepAddr: into this node's record
//! let report = vxlan.reconcile(&peers).await?;
//! # Ok(()) }
//! ```
//!
//! ## What it owns
//! The VXLAN device (and so every neighbour and FDB entry on it) and the routes with
//! protocol [`ROUTE_PROTOCOL`](cni_core::linux::kernel::ROUTE_PROTOCOL) in the main table.
//! Reconcile never touches anything else; teardown deletes the device and those routes.
#![warn(missing_docs)]

mod backend;
mod config;
mod device;
mod error;

pub use backend::{Vtep, Vxlan};
pub use config::{Config, DEFAULT_DEVICE, DEFAULT_PORT, DEFAULT_VNI};
pub use error::{Error, Result};

/// The mode name and configuration `type`.
pub const TYPE: &str = "vxlan";

/// Key of the VTEP MAC address in a node record's backend data (`aa:bb:cc:dd:ee:ff`).
pub const VTEP_MAC: &str = "vtepMac";

/// Key of the VTEP address in a node record's backend data.
pub const VTEP_ADDR: &str = "vtepAddr";

/// Bytes VXLAN adds over an IPv4 underlay: outer IPv4 20, UDP 8, VXLAN 8, inner
/// Ethernet 14.
pub const OVERHEAD_IPV4: u32 = 50;

/// Bytes VXLAN adds over an IPv6 underlay (outer IPv6 header 40).
pub const OVERHEAD_IPV6: u32 = 70;
