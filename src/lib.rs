//! # cnikit
//!
//! Build Kubernetes CNI network plugins from swappable parts: an IPAM, a pod network (how a
//! pod is plugged into its node) and a cross-node routing mode. This facade re-exports the
//! parts behind Cargo features and holds the standard composition, [`plugin`], that the
//! example binary `cnikit` runs, the node agent's set-up, [`agent`], and the node installer,
//! [`install`], that a DaemonSet's init container runs (`cnikit-install`).
//!
//! | feature | part |
//! |---|---|
//! | `bridge` (default) | pod network: veth on a Linux bridge, gateway on the bridge |
//! | `routed` (default) | pod network: Calico-style /32 veth, gateway 169.254.1.1 |
//! | `ebpf` (default) | pod network: routed, same-node traffic delivered by a tc eBPF program ([`ebpf`]) |
//! | `etcd` | datastore and node registry on etcd v3 ([`etcd`]) |
//! | `kubernetes` | datastore and node registry on Kubernetes custom resources and Leases ([`kubernetes`]) |
//! | `host-gw` | cross-node routing: static routes to on-link peers' blocks ([`hostgw`]) |
//! | `vxlan` | cross-node routing: a VXLAN overlay ([`vxlan`]) |
//! | `ipip` | cross-node routing: IP-in-IP tunnels, always or only across subnets ([`ipip`]) |
//! | `bgp` | cross-node routing: blocks distributed over BGP by an in-process speaker ([`bgp`]) |
//!
//! ## Quick start: your own CNI binary
//! The whole `main` of a plugin binary:
//! ```no_run
//! std::process::exit(cnikit::plugin::main());
//! ```
//! For a different combination of parts, implement [`core::compose::Parts`] and run
//! [`core::compose::Composed`] with [`core::runner::run`].
#![warn(missing_docs)]

pub use cni_core as core;

pub mod agent;
pub mod install;
pub mod plugin;

/// The etcd v3 datastore and node registry (feature `etcd`).
#[cfg(feature = "etcd")]
pub use ipam_etcd as etcd;

/// The datastore and node registry on Kubernetes custom resources and Leases (feature `kubernetes`).
#[cfg(feature = "kubernetes")]
pub use ipam_crd as kubernetes;

/// The eBPF pod network: same-node delivery by `bpf_redirect_peer` (feature `ebpf`).
#[cfg(feature = "ebpf")]
pub use backend_ebpf as ebpf;

/// Cross-node routing over BGP: an in-process speaker per node (feature `bgp`).
#[cfg(feature = "bgp")]
pub use backend_bgp as bgp;
/// Cross-node routing by static routes to on-link peers (feature `host-gw`).
#[cfg(feature = "host-gw")]
pub use backend_hostgw as hostgw;
/// Cross-node routing over IP-in-IP tunnels, Calico's `ipipMode` (feature `ipip`).
#[cfg(feature = "ipip")]
pub use backend_ipip as ipip;
/// Cross-node routing over a VXLAN overlay (feature `vxlan`).
#[cfg(feature = "vxlan")]
pub use backend_vxlan as vxlan;
