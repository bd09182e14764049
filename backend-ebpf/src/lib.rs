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
//! Ethernet addresses rewritten from the entry); anything else (other nodes, the node, the
//! outside, ARP, IPv6) goes on into the node's stack, where the routed network's routes
//! take it. Per-CPU counters say which way each packet went ([`Counter`]).
//!
//! ## Pins
//! bpffs is one per machine, shared by every network namespace: the maps and links of a
//! network live in a directory of their own per node ([`Pins`]):
//! `/sys/fs/bpf/cnikit/<network>/<node>/{endpoints,counters,links/<veth>}`. The maps are
//! created by the first ADD and shared by every program instance and by every later
//! plugin run.
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
