//! Pod networks: how a pod is plugged into its node.

use std::path::PathBuf;

use async_trait::async_trait;

use crate::error::Result;
use crate::ipam::{Allocation, Attachment};
use crate::spec::CniResult;

/// One pod attachment as a pod network sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// Network, container and interface name.
    pub attachment: Attachment,
    /// `CNI_NETNS`: the pod's network namespace. May be `None` on DEL (the netns is gone).
    pub netns: Option<PathBuf>,
}

/// Plugs pods into the node: creates the pod's interface, addresses and routes, and whatever
/// the node side needs (host veth, bridge port, host route).
///
/// Methods run from the node's (host) network namespace, the one the plugin was started in,
/// and reach into the pod's namespace through a handle; they never change the namespace of
/// the calling thread.
#[async_trait]
pub trait PodNetwork: Send + Sync {
    /// The configuration `type` string of this pod network (for example `bridge`).
    fn kind(&self) -> &'static str;

    /// Plugs the pod in with the given addresses and returns the interfaces, addresses (with
    /// interface indexes) and routes for the CNI result.
    ///
    /// Atomic: if it fails, everything it created is removed again before it returns.
    /// Errors: 4 when the netns is not a network namespace, 101 for kernel failures.
    async fn add(&self, pod: &Pod, allocation: &Allocation) -> Result<CniResult>;

    /// Unplugs the pod. Idempotent; succeeds when the netns or the interfaces are gone.
    /// Runs every step and reports all failures together (code of the first).
    async fn del(&self, pod: &Pod, prev: Option<&CniResult>) -> Result<()>;

    /// Checks that what `prev` lists still exists as this network made it.
    /// Errors: 3 when the interface is missing, 101 when it is in the wrong state.
    async fn check(&self, pod: &Pod, prev: &CniResult) -> Result<()>;
}
