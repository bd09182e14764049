//! # backend-ipip
//!
//! cnikit's `ipip` cross-node routing, as Calico's `ipipMode`: one IP-in-IP tunnel device
//! per node and, per peer, one route for each of its pod blocks, sent to the peer's
//! underlay address through the tunnel:
//!
//! ```text
//! ip link add cnikit.ipip mtu UNDERLAY_MTU-20 type ipip local NODE_IP dev UNDERLAY ttl inherit pmtudisc
//! ip addr add TUNNEL_ADDR/32 dev cnikit.ipip
//! ip route replace PEER_BLOCK via PEER_UNDERLAY_IP dev cnikit.ipip onlink proto 107
//! ```
//!
//! The device has no `remote`: the outer destination of each packet is the gateway of the
//! route that sent it there (the peer's underlay address, on-link because the device has
//! no neighbours), and it takes in every IPIP packet addressed to `NODE_IP`. Its address,
//! as a /32, is the node's [`tunnel_address`](cni_core::routing::LocalNode::tunnel_address)
//! (an IPv4 address the node agent allocates from the node's block, so no pod gets it;
//! without one, the network address of the node's first IPv4 block): the node's own traffic
//! to remote pods leaves with it as its source, which the peers route back through their
//! tunnels. The device MTU, and the pod MTU, is the underlay MTU minus [`OVERHEAD`] (the
//! outer IPv4 header); the outer packets carry don't-fragment, so a packet too big for the
//! path is refused with an ICMP error, never fragmented.
//!
//! [`Mode`] picks which peers go through the tunnel: `always` every one; `crossSubnet` only
//! peers outside the node's underlay subnet, the others get plain host-gw routes
//! (`PEER_BLOCK via PEER_UNDERLAY_IP dev UNDERLAY`), without encapsulation. IPIP carries
//! IPv4 in IPv4: the underlay and the routed blocks are IPv4.
//!
//! ## The device
//! cnikit makes a device of its own, `cnikit.ipip` (as flannel makes `flannel.ipip`),
//! rather than using `tunl0`, the fallback device the ipip module makes in every network
//! namespace (which Calico uses):
//! - `tunl0`'s parameters are fixed (`ip link set tunl0 type ipip local …` fails with
//!   `EINVAL`) and it cannot be deleted (`ip link del tunl0` succeeds and leaves it), so
//!   teardown could not remove what the backend made, and another program on the node
//!   (Calico, kube-router) may be using it: nobody can tell whose it is.
//! - `cnikit.ipip` has `local` = the node's underlay address and `dev` = the underlay
//!   interface: it is made, checked against its [`LinkSpec`](cni_core::linux::kernel::LinkSpec),
//!   made again when they change, and deleted with everything through it, like the VXLAN
//!   device; the kernel hands it the IPIP packets to that address ahead of `tunl0`.
//!
//! A device with no `local` and no `dev` would have `tunl0`'s parameters, which the kernel
//! refuses (`EEXIST`): `local` is always set. `tunl0` itself is never touched and is
//! refused as a `device` name.
//!
//! ## Modules
//! - [`Ipip`]: the [`CrossNodeRouting`](cni_core::routing::CrossNodeRouting)
//!   implementation, generic over the [`Kernel`](cni_core::linux::kernel::Kernel) it
//!   programs (netlink in a namespace, or the recording fake in unit tests).
//! - [`Config`], [`Mode`]: serde names `mode` (`always`, `crossSubnet`), `device`, `mtu`.
//! - [`Error`]: what can go wrong, with its CNI code.
//!
//! ## Quick start
//! ```no_run
//! # async fn run(peers: Vec<cni_core::registry::NodeRecord>) -> cni_core::Result<()> {
//! use backend_ipip::{Config, Ipip};
//! use cni_core::linux::NetNs;
//! use cni_core::routing::{CrossNodeRouting, LocalNode};
//!
//! let config: Config = serde_json::from_str(r#"{"mode": "crossSubnet"}"#).unwrap();
//! let mut ipip = Ipip::new(config, NetNs::current().await?)?;
//! ipip.init(&LocalNode {
//!     name: "node-a".into(),
//!     address: "192.168.1.2".parse().unwrap(),
//!     prefix_len: 24,
//!     interface: "eth0".into(),
//!     underlay_mtu: 1500,
//!     blocks: vec!["10.244.1.0/26".parse().unwrap()],
//!     tunnel_address: Some("10.244.1.1".parse().unwrap()),
//! })
//! .await?;
//! let report = ipip.reconcile(&peers).await?;
//! # Ok(()) }
//! ```
//!
//! ## What it owns
//! The IPIP device and the routes with protocol
//! [`ROUTE_PROTOCOL`](cni_core::linux::kernel::ROUTE_PROTOCOL) in the main table.
//! Reconcile never touches anything else; teardown deletes the device and those routes.
#![warn(missing_docs)]

mod backend;
mod config;
mod device;
mod error;

pub use backend::Ipip;
pub use config::{Config, DEFAULT_DEVICE, FALLBACK_DEVICE, Mode};
pub use device::spec as device_spec;
pub use error::{Error, Result};

/// The mode name and configuration `type`.
pub const TYPE: &str = "ipip";

/// Bytes IPIP adds to each packet: the outer IPv4 header.
pub const OVERHEAD: u32 = cni_core::linux::ipip::OVERHEAD;
