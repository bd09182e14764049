//! # cnikit
//!
//! Build Kubernetes CNI network plugins from swappable parts.
//!
//! ## Features
//! - `bridge`, `routed` (default): the built-in pod networks of [`core::linux`].
//! - `host-gw`: `cnikit::hostgw`, cross-node routing by static routes to on-link peers.
//! - `vxlan`: `cnikit::vxlan`, cross-node routing over a VXLAN overlay.
pub use cni_core as core;

#[cfg(feature = "host-gw")]
pub use backend_hostgw as hostgw;
#[cfg(feature = "vxlan")]
pub use backend_vxlan as vxlan;
