//! # cnikit
//!
//! Build Kubernetes CNI network plugins from swappable parts.
pub use cni_core as core;
