//! What the lab's datastore holds, sorted into what is expected to stay after every pod and
//! agent is gone and what is not.
//!
//! The file store is read directly. The lab's etcd listens only on the underlay, which the
//! root namespace cannot reach: it is read from a thread that entered the underlay namespace
//! and runs its own small runtime there. The Kubernetes store is read the same way, and its
//! node registry objects with `kubectl` ([`crate::kube::keys`]).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use cnikit::core::linux::NetNs;
use cnikit::core::store::{FileStore, KeyValue, Store};

use crate::state::{self, Lab, StoreKind};

/// The lab's datastore's key prefix (the block IPAM's default, which the lab keeps).
pub const PREFIX: &str = cnikit::core::ipam::block::DEFAULT_KEY_PREFIX;

/// Every key of the lab's datastore (all prefixes).
pub async fn keys(lab: &Lab) -> Result<Vec<KeyValue>> {
    match lab.store {
        StoreKind::File => {
            let dir = lab.store_dir();
            if !dir.join(cnikit::core::store::file::DATA_FILE).exists() {
                return Ok(Vec::new());
            }
            Ok(FileStore::new(dir).list("").await?)
        }
        StoreKind::Etcd => etcd_keys(lab).await,
        StoreKind::Kubernetes => crate::kube::keys(lab).await,
    }
}

/// Every key of the lab's etcd (all prefixes), read from inside the underlay.
async fn etcd_keys(lab: &Lab) -> Result<Vec<KeyValue>> {
    let etcd = lab.etcd.as_ref().context("the lab has no etcd")?;
    let underlay = lab.underlays.first().context("the lab has no underlay")?;
    let ns = NetNs::open(state::netns_path(&underlay.ns)).await?;
    let mut config = cnikit::etcd::Config::new([etcd.endpoint.clone()]);
    config.prefix = PREFIX.to_owned();
    config.timeout_ms = 3_000;
    config.dial_timeout_ms = 2_000;
    ns.run(move || -> Result<Vec<KeyValue>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let store = cnikit::etcd::EtcdStore::connect(&config).await?;
            Ok(store.list("/").await?)
        })
    })
    .await?
}

/// Waits until the lab's etcd answers (from inside the underlay), up to `within`.
pub async fn wait_etcd(lab: &Lab, within: Duration) -> Result<()> {
    let started = std::time::Instant::now();
    loop {
        match etcd_keys(lab).await {
            Ok(_) => return Ok(()),
            Err(e) if started.elapsed() > within => {
                return Err(e.context(format!("etcd did not answer within {within:?}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// What a key is, and whether it may outlive the lab's pods and agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeyKind {
    /// The pool record.
    Pool,
    /// A block owned by a node.
    Block,
    /// A node's affinity to a block.
    Affinity,
    /// A node's claim record (last block claimed).
    Claim,
    /// A record of an address a node released (kept to order reuse).
    Released,
    /// The registry's epoch counter.
    RegistryEpoch,
    /// An address in use: a pod or tunnel not released.
    Used,
    /// An attachment handle: a pod or tunnel not released.
    Handle,
    /// A node record in the registry: an agent still registered.
    NodeRecord,
    /// A node's Lease (the Kubernetes registry's liveness): an agent still registered.
    NodeLease,
    /// Anything else.
    Other,
}

impl KeyKind {
    /// Whether the key is expected to stay once every pod is deleted and every agent
    /// stopped: the pool and the block ownership (a node keeps its block for when it comes
    /// back), not addresses, handles or node records.
    pub fn expected_after_teardown(self) -> bool {
        matches!(
            self,
            KeyKind::Pool
                | KeyKind::Block
                | KeyKind::Affinity
                | KeyKind::Claim
                | KeyKind::Released
                | KeyKind::RegistryEpoch
        )
    }

    /// Plain words for the kind.
    pub fn describe(self) -> &'static str {
        match self {
            KeyKind::Pool => "pool record",
            KeyKind::Block => "block owned by a node",
            KeyKind::Affinity => "node affinity to a block",
            KeyKind::Claim => "node claim record",
            KeyKind::Released => "released-address record",
            KeyKind::RegistryEpoch => "registry epoch",
            KeyKind::Used => "address in use",
            KeyKind::Handle => "attachment handle",
            KeyKind::NodeRecord => "node record in the registry",
            KeyKind::NodeLease => "node Lease in the registry",
            KeyKind::Other => "other key",
        }
    }
}

/// Classifies a key of the block IPAM and the node registry under [`PREFIX`].
pub fn classify(key: &str) -> KeyKind {
    let Some(rest) = key.strip_prefix(PREFIX).and_then(|r| r.strip_prefix('/')) else {
        return KeyKind::Other;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["pool"] => KeyKind::Pool,
        ["blocks", _] => KeyKind::Block,
        ["registry", "epoch"] => KeyKind::RegistryEpoch,
        ["registry", "nodes", _] => KeyKind::NodeRecord,
        ["registry", "leases", _] => KeyKind::NodeLease,
        ["nodes", _, "claim"] => KeyKind::Claim,
        ["nodes", _, "blocks", _] => KeyKind::Affinity,
        ["nodes", _, "used", _] => KeyKind::Used,
        ["nodes", _, "free", _] => KeyKind::Released,
        ["nodes", _, "handles", ..] => KeyKind::Handle,
        _ => KeyKind::Other,
    }
}

/// Keys grouped by kind.
pub fn summarize(keys: &[KeyValue]) -> BTreeMap<KeyKind, Vec<String>> {
    let mut groups: BTreeMap<KeyKind, Vec<String>> = BTreeMap::new();
    for kv in keys {
        groups
            .entry(classify(&kv.key))
            .or_default()
            .push(kv.key.clone());
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_classified() {
        assert_eq!(classify("/cnikit/pool"), KeyKind::Pool);
        assert_eq!(classify("/cnikit/blocks/10.244.0.0-26"), KeyKind::Block);
        assert_eq!(
            classify("/cnikit/nodes/node1/blocks/10.244.0.0-26"),
            KeyKind::Affinity
        );
        assert_eq!(
            classify("/cnikit/nodes/node1/used/10.244.0.2"),
            KeyKind::Used
        );
        assert_eq!(
            classify("/cnikit/nodes/node1/handles/net/ctr/eth0"),
            KeyKind::Handle
        );
        assert_eq!(
            classify("/cnikit/registry/nodes/node1"),
            KeyKind::NodeRecord
        );
        assert_eq!(
            classify("/cnikit/registry/leases/node1"),
            KeyKind::NodeLease
        );
        assert_eq!(classify("/elsewhere/pool"), KeyKind::Other);
        assert!(!KeyKind::Used.expected_after_teardown());
        assert!(KeyKind::Affinity.expected_after_teardown());
    }
}
