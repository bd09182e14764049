//! The datastore key layout of the block engine and the records stored under it (see the
//! [module docs](super) for the layout).

use std::net::IpAddr;

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::ipam::Attachment;
use crate::store::KeyValue;

/// `<prefix>/pool`: what the pool was set up with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PoolRecord {
    pub(crate) pool: IpNet,
    pub(crate) block_size: u8,
}

/// `<prefix>/blocks/<block>`: which node owns a block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OwnerRecord {
    pub(crate) node: String,
}

/// `<prefix>/nodes/<node>/blocks/<block>`: the node's affinity to a block.
///
/// A claim writes it `pending` before it creates the block's ownership record and confirms
/// it after; only confirmed, not draining affinities are allocated from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AffinityRecord {
    pub(crate) draining: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) pending: bool,
}

impl AffinityRecord {
    /// The affinity of a claim in progress.
    pub(crate) fn pending() -> Self {
        AffinityRecord {
            draining: false,
            pending: true,
        }
    }
}

/// `<prefix>/nodes/<node>/handles/<network>/<containerID>/<ifname>`: what an attachment holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HandleRecord {
    pub(crate) ip: IpAddr,
    pub(crate) block: IpNet,
}

/// `<prefix>/nodes/<node>/claim`: rewritten by every block claim of the node, so that two
/// claims racing on one node conflict instead of both taking a block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ClaimRecord {
    pub(crate) last_claimed: IpNet,
}

/// The value of a release record `<prefix>/nodes/<node>/free/<ip>`: only its revision
/// matters.
pub(crate) const FREE_VALUE: &[u8] = b"{}";

/// One key under a node's prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NodeKey {
    Affinity(IpNet),
    Used(IpAddr),
    Free(IpAddr),
    Handle(Attachment),
    Claim,
}

/// Builds and parses the keys of one pool and one node.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
    node_prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str, node: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
            node_prefix: format!("{prefix}/nodes/{node}/"),
        }
    }

    pub(crate) fn pool(&self) -> String {
        format!("{}/pool", self.prefix)
    }

    pub(crate) fn blocks(&self) -> String {
        format!("{}/blocks/", self.prefix)
    }

    pub(crate) fn block(&self, block: &IpNet) -> String {
        format!("{}/blocks/{}", self.prefix, encode_block(block))
    }

    pub(crate) fn node(&self) -> &str {
        &self.node_prefix
    }

    pub(crate) fn affinities(&self) -> String {
        format!("{}blocks/", self.node_prefix)
    }

    pub(crate) fn affinity(&self, block: &IpNet) -> String {
        format!("{}blocks/{}", self.node_prefix, encode_block(block))
    }

    pub(crate) fn used(&self, ip: &IpAddr) -> String {
        format!("{}used/{ip}", self.node_prefix)
    }

    pub(crate) fn free(&self, ip: &IpAddr) -> String {
        format!("{}free/{ip}", self.node_prefix)
    }

    pub(crate) fn handle(&self, a: &Attachment) -> String {
        format!(
            "{}handles/{}/{}/{}",
            self.node_prefix, a.network, a.container_id, a.ifname
        )
    }

    pub(crate) fn claim(&self) -> String {
        format!("{}claim", self.node_prefix)
    }

    /// What a key under the node prefix is; `None` for keys of other nodes or unknown kinds.
    pub(crate) fn parse_node_key(&self, key: &str) -> Option<NodeKey> {
        let rest = key.strip_prefix(&self.node_prefix)?;
        if rest == "claim" {
            return Some(NodeKey::Claim);
        }
        let (kind, rest) = rest.split_once('/')?;
        match kind {
            "blocks" => decode_block(rest).map(NodeKey::Affinity),
            "used" => rest.parse().ok().map(NodeKey::Used),
            "free" => rest.parse().ok().map(NodeKey::Free),
            "handles" => {
                let mut parts = rest.split('/');
                let (Some(network), Some(container_id), Some(ifname), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return None;
                };
                Some(NodeKey::Handle(Attachment::new(
                    network,
                    container_id,
                    ifname,
                )))
            }
            _ => None,
        }
    }
}

/// A block as a key segment: `10.244.0.64/26` → `10.244.0.64-26`.
pub(crate) fn encode_block(block: &IpNet) -> String {
    format!("{}-{}", block.network(), block.prefix_len())
}

/// The inverse of [`encode_block`].
pub(crate) fn decode_block(s: &str) -> Option<IpNet> {
    let (addr, len) = s.rsplit_once('-')?;
    let net = IpNet::new(addr.parse().ok()?, len.parse().ok()?).ok()?;
    (net.trunc() == net).then_some(net)
}

/// Decodes a stored record.
pub(crate) fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T, StoreError> {
    serde_json::from_slice(&kv.value).map_err(|source| StoreError::Corrupt {
        key: kv.key.clone(),
        source,
    })
}

/// Encodes a record.
pub(crate) fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // The records are plain structs of strings, numbers and addresses: serializing them to
    // a byte vector cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

/// A `Corrupt` error for a key whose name (not value) does not parse.
pub(crate) fn corrupt_key(key: &str, what: &str) -> StoreError {
    StoreError::Corrupt {
        key: key.to_owned(),
        source: <serde_json::Error as serde::de::Error>::custom(what),
    }
}
