//! The node registry: how nodes publish themselves and find their peers.
//!
//! [`NodeRegistry`] is the trait; [`StoreRegistry`] implements it over any
//! [`Store`](crate::store::Store) (the local file store in particular) by polling, woken
//! early by the store's change hints where it gives them (inotify for the file store).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::store::Revision;

pub mod store;

pub use store::StoreRegistry;

/// Checks a node name (`nodeName`, code 7): 1 to 253 letters, digits, `-`, `.` and `_`,
/// starting with a letter or digit, so that it can also name a file or a directory.
pub fn validate_node_name(name: &str) -> Result<()> {
    let ok = name.len() <= 253
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(())
    } else {
        Err(crate::Error::invalid_config(
            "nodeName",
            format!(
                "{name:?} is not a node name (letters, digits, '-', '.', '_', starting with a \
                 letter or digit)"
            ),
        ))
    }
}

/// What a node publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    /// Node name (unique in the cluster).
    pub name: String,
    /// Underlay address other nodes reach this node at.
    pub address: IpAddr,
    /// Prefix length of the underlay subnet, to tell on-link peers from others.
    pub prefix_len: u8,
    /// Pod address blocks this node owns.
    #[serde(default)]
    pub blocks: Vec<IpNet>,
    /// Data the routing backend publishes (VTEP MAC, BGP AS…), by key.
    #[serde(default)]
    pub backend: BTreeMap<String, String>,
}

/// A change seen by [`NodeRegistry::watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// A node was added or changed.
    Put(NodeRecord, Revision),
    /// A node left (deregistered or its lease expired).
    Delete(String, Revision),
    /// The watch could not resume from the revision asked for (compacted or lost): here is a
    /// fresh full list, the watch continues after it.
    Reset(Vec<NodeRecord>, Revision),
}

/// A snapshot of all live nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeList {
    /// The nodes, sorted by name.
    pub nodes: Vec<NodeRecord>,
    /// Store revision of the snapshot; pass it to [`NodeRegistry::watch`].
    pub revision: Revision,
}

/// Where nodes register themselves and find their peers (local file, etcd, CRDs).
#[async_trait]
pub trait NodeRegistry: Send + Sync {
    /// Registers or updates this node's record, kept alive for `ttl` after the last refresh.
    /// The implementation refreshes it in the background until [`deregister`] or drop.
    /// Idempotent. Errors: 11 when the datastore is unavailable.
    ///
    /// [`deregister`]: NodeRegistry::deregister
    async fn register(&self, node: &NodeRecord, ttl: Duration) -> Result<()>;

    /// Removes this node's record and stops refreshing it. `Ok` if it was absent.
    async fn deregister(&self, name: &str) -> Result<()>;

    /// Lists live nodes.
    async fn list(&self) -> Result<NodeList>;

    /// Streams changes after `revision`. When the history is gone the stream yields
    /// [`NodeEvent::Reset`]; it ends only when the registry is dropped.
    async fn watch(&self, revision: Revision) -> Result<BoxStream<'static, Result<NodeEvent>>>;

    /// Deletes what nodes that died without deregistering left behind (their records, and
    /// whatever kept them alive), and returns those nodes' names. They are no longer live
    /// peers already: this only keeps the registry from growing with every node that ever
    /// came and went. Safe on every node at once: each deletion is guarded by what was
    /// read, and a node that comes back writes its record again at its next refresh.
    ///
    /// The default does nothing, for registries whose records expire by themselves (etcd's
    /// leases). Errors: 11 when the datastore is unavailable.
    async fn prune_expired(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}
