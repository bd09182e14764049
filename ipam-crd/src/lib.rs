//! # ipam-crd
//!
//! cnikit's datastore on Kubernetes custom resources: [`KubeStore`] implements
//! [`Store`](cni_core::store::Store), the versioned key/value store under the block IPAM
//! engine, with one custom resource per engine *object* (the pool record, a block's
//! ownership, a node's affinities, addresses and handles) and optimistic concurrency on
//! `resourceVersion` only: no lock object, no leader.
//!
//! ## Modules
//! - [`config`]: the `ipam.store` object of `type` [`TYPE`] (`"kubernetes"`).
//! - [`resources`]: the custom resources and their CRD manifests.
//! - [`store`]: the [`KubeStore`].
//!
//! ## Configuration
//! ```json
//! "ipam": {
//!   "type": "cnikit-ipam",
//!   "pool": "10.244.0.0/16",
//!   "store": {"type": "kubernetes", "kubeconfig": "/etc/cni/net.d/cnikit-kubeconfig"}
//! }
//! ```
//! | key | default | meaning |
//! |---|---|---|
//! | `kubeconfig` | in-cluster | a kubeconfig file; without it the service account under `/var/run/secrets/kubernetes.io/serviceaccount` |
//! | `prefix` | `/cnikit` | prefix of every key; names the pool's objects |
//! | `timeoutMs` | 5000 | deadline of every request |
//!
//! ## Install
//! `deploy/crds/ipam.cnikit.io.yaml` (the CRDs, generated from [`resources`] by
//! `cargo run -p ipam-crd --example crds`; a test checks it is current) and
//! `deploy/crds/rbac.yaml` (a ClusterRole with only the verbs the store uses).
//!
//! ## Round trips
//! An allocation is two requests: the `get` of the node's object and its `replace`. A 409
//! Conflict costs a re-read and a retry ([`KubeStore::conflicts`] counts them,
//! [`KubeStore::requests`] counts every request).
//!
//! ## Tests
//! The tests run a real kube-apiserver (built by `scripts/kube-apiserver.sh`) with its own
//! etcd in a network namespace of their own (`testkit::kube`); they need root.
#![warn(missing_docs)]

pub mod config;
pub mod registry;
pub mod resources;
pub mod store;

pub use config::{Config, TYPE};
pub use registry::KubeRegistry;
pub use store::KubeStore;
