//! # backend-hostgw
//!
//! cnikit's `host-gw` cross-node routing: every peer node's pod blocks are routed straight
//! to the peer's underlay address, `BLOCK via PEER dev UNDERLAY proto 107`. No
//! encapsulation (MTU overhead 0), so it only works when all nodes share one L2 segment:
//! a peer whose address is outside the local underlay subnet is reported in
//! [`ReconcileReport::unroutable`](cni_core::routing::ReconcileReport::unroutable) (and
//! logged) instead of being routed through some gateway that would drop the traffic.
//!
//! ## Modules
//! - [`HostGw`]: the [`CrossNodeRouting`](cni_core::routing::CrossNodeRouting)
//!   implementation, generic over the [`Kernel`](cni_core::linux::kernel::Kernel) it
//!   programs (netlink in a namespace, or the recording fake in unit tests).
//! - [`Error`]: what can go wrong, with its CNI code.
//!
//! ## Quick start
//! ```no_run
//! # async fn run(peers: Vec<cni_core::registry::NodeRecord>) -> cni_core::Result<()> {
//! use backend_hostgw::HostGw;
//! use cni_core::linux::NetNs;
//! use cni_core::routing::{CrossNodeRouting, LocalNode};
//!
//! let mut hostgw = HostGw::new(NetNs::current().await?);
//! hostgw
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
//! let report = hostgw.reconcile(&peers).await?;
//! println!("{} writes, {} peers routed", report.writes, report.routed);
//! # Ok(()) }
//! ```
//!
//! ## What it owns
//! The routes with protocol [`ROUTE_PROTOCOL`](cni_core::linux::kernel::ROUTE_PROTOCOL)
//! in the main table; no devices. Reconcile lists exactly those, so it never touches
//! anyone else's route; teardown deletes them. The blackhole route of the node's own
//! blocks is the node agent's, not this backend's.
#![warn(missing_docs)]

mod backend;
mod error;

pub use backend::HostGw;
pub use error::{Error, Result};

/// The mode name and configuration `type`.
pub const TYPE: &str = "host-gw";
