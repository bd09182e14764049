//! IP address management: the [`Ipam`] trait and its implementations.
//!
//! - [`BlockIpam`]: a pool cut into blocks that nodes claim by affinity,
//!   over any [`Store`](crate::store::Store).
//! - [`DelegatedIpam`]: execs a CNI IPAM plugin (such as the
//!   reference `host-local`) found in `CNI_PATH`, as the spec describes.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::spec::{CniResult, Dns, IpConfig, Route};

pub mod block;
pub mod delegate;

pub use block::{BlockIpam, BlockIpamConfig};
pub use delegate::DelegatedIpam;

/// What identifies one attachment of a container to a network: the spec's primary key
/// `(network name, CNI_CONTAINERID, CNI_IFNAME)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    /// Network name (`name` of the configuration).
    pub network: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
}

impl Attachment {
    /// Builds an attachment key.
    pub fn new(
        network: impl Into<String>,
        container_id: impl Into<String>,
        ifname: impl Into<String>,
    ) -> Self {
        Attachment {
            network: network.into(),
            container_id: container_id.into(),
            ifname: ifname.into(),
        }
    }
}

/// What an IPAM hands out for one attachment: the IPAM part of a CNI result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// Addresses, each with the prefix length of its subnet and, if any, its gateway.
    pub ips: Vec<IpConfig>,
    /// Routes the IPAM asks for.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// DNS settings the IPAM knows of.
    #[serde(default)]
    pub dns: Dns,
    /// The attachment held these addresses before this call (a repeated ADD, or a
    /// concurrent one that won): they may be in use, so a caller rolling back a failed ADD
    /// must not release them. Not part of any JSON.
    #[serde(skip)]
    pub existing: bool,
}

impl From<CniResult> for Allocation {
    fn from(r: CniResult) -> Self {
        Allocation {
            ips: r.ips,
            routes: r.routes,
            dns: r.dns,
            existing: false,
        }
    }
}

/// What a GC pass released.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Attachments whose addresses were released.
    pub released: Vec<Attachment>,
}

/// IP address management for pods.
///
/// Runs in no particular network namespace (only the datastore is touched).
#[async_trait]
pub trait Ipam: Send + Sync {
    /// Allocates the addresses of an attachment.
    ///
    /// Idempotent: asking again for the same attachment returns the same allocation.
    /// Errors: 11 when the datastore is unavailable or contended, 100 when no address is
    /// left, 7 for a bad configuration.
    async fn allocate(&self, attachment: &Attachment) -> Result<Allocation>;

    /// Releases the addresses of an attachment. `Ok` when it holds none (idempotent).
    /// Errors: 11 when the datastore is unavailable or contended.
    async fn release(&self, attachment: &Attachment) -> Result<()>;

    /// Checks that the attachment still holds its allocation and returns it.
    /// Errors: 3 when it holds nothing, 11 when the datastore is unavailable.
    async fn check(&self, attachment: &Attachment) -> Result<Allocation>;

    /// Releases every attachment of this network (on this node) that is not in `valid`.
    /// Errors: 11 when the datastore is unavailable or contended.
    async fn gc(&self, valid: &[Attachment]) -> Result<GcReport>;

    /// Whether the IPAM can serve requests now (its datastore answers); used by STATUS.
    /// The default is always ready. Errors: 11 when the datastore is unavailable.
    async fn ready(&self) -> Result<()> {
        Ok(())
    }
}
