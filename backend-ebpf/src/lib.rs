//! # backend-ebpf
//!
//! cnikit's `ebpf` pod network, after Cilium: pods on one node reach each other through a
//! tc eBPF program on their host veths, without the node's routing table; with the `ebpf`
//! routing mode ([`EbpfRouting`], run by the node agent), pods on different nodes through
//! the same program and a collect_md VXLAN device (see [`routing`]).
//!
//! Addressing and plumbing are the routed pod network's
//! ([`RoutedNetwork`](cni_core::linux::RoutedNetwork)): a veth per pod, the pod's address as
//! /32, its gateway 169.254.1.1 (a permanent neighbour entry to the host veth's MAC
//! `ee:ee:ee:ee:ee:ee`), proxy ARP and a host route on the node side. On top of that, ADD
//! - loads `bpf/pod.c`'s program `from_pod` and attaches it to the host veth's ingress
//!   (every packet the pod sends): TCX on kernels that have it (6.6 and later), its link
//!   pinned; `tc` `clsact` on older ones;
//! - writes the pod's entry in the endpoint map: pod IPv4 → (host veth index, pod MAC,
//!   host veth MAC).
//!
//! The program looks each IPv4 packet's destination up in the endpoint map: a pod of this
//! node gets the packet by `bpf_redirect_peer` straight into its namespace (TTL minus one,
//! Ethernet addresses rewritten from the entry); a block of another node in the `remotes`
//! map (written by the `ebpf` routing mode) goes into the tunnel; anything else (the node,
//! the outside, ARP, IPv6, other nodes under another routing mode) goes on into the node's
//! stack, where the routed network's routes take it. Per-CPU counters say which way each packet went ([`Counter`]).
//!
//! ## Pins
//! bpffs is one per machine, shared by every network namespace: the maps and links of a
//! network live in a directory of their own per node ([`Pins`]):
//! `/sys/fs/bpf/cnikit/<network>/<node>/{endpoints,remotes,tunnel,counters,links/<veth>,
//! tunnel-links/{ingress,egress}}`. The maps are created by the first ADD (or the agent's
//! init) and shared by every program instance, every later plugin run and the agent.
//!
//! ## Cross-node: the `ebpf` routing mode
//! [`EbpfRouting`] (the node agent's `"routing": "ebpf"`) makes a collect_md VXLAN device
//! per node with `from_tunnel` and `to_tunnel` on its hooks, and keeps the `remotes` LPM map
//! (remote block → that node's underlay address) in line with the peers. `from_pod` then
//! tunnels a pod's packet to another node's block itself; `from_tunnel` delivers it into
//! the pod there by `bpf_redirect_peer`. Its reconcile also removes what pods left without
//! a DEL ([`EbpfNetwork::remove_stale`]). See [`routing`].
//!
//! ## The programs
//! The C sources are in `bpf/`; their objects, built by `scripts/bpf.sh` (`clang -O2 -g
//! -target bpf`, reproducible), are committed and embedded ([`program::OBJECT`]), so
//! building this crate needs no clang. `scripts/test.sh` rebuilds them and fails when they
//! differ from the committed ones.
//!
//! ## Quick start
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use backend_ebpf::{Config, EbpfNetwork};
//! use cni_core::linux::NetNs;
//!
//! let network = EbpfNetwork::new(Config::default(), "k8s-pod-network", "node-1",
//!     NetNs::current().await?)?;
//! // network.add(&pod, &allocation).await? as any cni_core::network::PodNetwork
//! # Ok(()) }
//! ```
//!
//! In the node agent, as any [`CrossNodeRouting`](cni_core::routing::CrossNodeRouting):
//! ```no_run
//! # async fn demo(local: cni_core::routing::LocalNode,
//! #               peers: Vec<cni_core::registry::NodeRecord>) -> cni_core::Result<()> {
//! use backend_ebpf::{EbpfRouting, RoutingConfig, DEFAULT_BPFFS};
//! use cni_core::linux::NetNs;
//! use cni_core::routing::CrossNodeRouting;
//!
//! let mut routing = EbpfRouting::new(RoutingConfig::default(), DEFAULT_BPFFS.into(),
//!     "k8s-pod-network", NetNs::current().await?)?;
//! routing.init(&local).await?;
//! let report = routing.reconcile(&peers).await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod error;
pub mod maps;
mod network;
pub mod program;
pub mod routing;

pub use error::{Error, Result};
pub use maps::{Counter, Counters, Endpoint, Endpoints, Pins, Remotes, Tunnel};
pub use network::{Config, DEFAULT_BPFFS, EbpfNetwork, Stale};
pub use routing::{EbpfRouting, RoutingConfig};

/// The configuration `type` of this pod network (`"podNetwork": "ebpf"`).
pub const TYPE: &str = "ebpf";
