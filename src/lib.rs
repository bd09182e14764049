//! # cnikit
//!
//! Build Kubernetes CNI network plugins from swappable parts.
pub use cni_core as core;
/// The etcd v3 datastore and node registry (feature `etcd`).
#[cfg(feature = "etcd")]
pub use ipam_etcd as etcd;
