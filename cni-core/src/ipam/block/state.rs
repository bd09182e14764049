//! What one list of a node's prefix tells: its blocks, used and released addresses and
//! handles, each with the revision a transaction compares against.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::config::{Geometry, from_u128};
use super::keys::{AffinityRecord, HandleRecord, Keys, NodeKey, decode};
use crate::error::StoreError;
use crate::ipam::Attachment;
use crate::store::{Compare, KeyValue, Revision};

/// A node's view of the datastore.
#[derive(Debug, Clone, Default)]
pub(crate) struct NodeState {
    pub(crate) affinities: BTreeMap<IpNet, (Revision, AffinityRecord)>,
    pub(crate) used: BTreeMap<IpAddr, (Revision, Attachment)>,
    pub(crate) free: BTreeMap<IpAddr, Revision>,
    pub(crate) handles: BTreeMap<Attachment, (Revision, HandleRecord)>,
    pub(crate) claim: Option<Revision>,
}

impl NodeState {
    /// Builds the state from the keys under the node prefix.
    pub(crate) fn from_kvs(keys: &Keys, kvs: &[KeyValue]) -> Result<Self, StoreError> {
        let mut state = NodeState::default();
        for kv in kvs {
            if let Some(k) = keys.parse_node_key(&kv.key) {
                state.set(k, Some(kv))?;
            }
        }
        Ok(state)
    }

    /// Records that the key is now `kv` (`None`: absent).
    pub(crate) fn set(&mut self, key: NodeKey, kv: Option<&KeyValue>) -> Result<(), StoreError> {
        match (key, kv) {
            (NodeKey::Affinity(b), Some(kv)) => {
                self.affinities.insert(b, (kv.mod_revision, decode(kv)?));
            }
            (NodeKey::Affinity(b), None) => {
                self.affinities.remove(&b);
            }
            (NodeKey::Used(ip), Some(kv)) => {
                self.used.insert(ip, (kv.mod_revision, decode(kv)?));
            }
            (NodeKey::Used(ip), None) => {
                self.used.remove(&ip);
            }
            (NodeKey::Free(ip), Some(kv)) => {
                self.free.insert(ip, kv.mod_revision);
            }
            (NodeKey::Free(ip), None) => {
                self.free.remove(&ip);
            }
            (NodeKey::Handle(a), Some(kv)) => {
                self.handles.insert(a, (kv.mod_revision, decode(kv)?));
            }
            (NodeKey::Handle(a), None) => {
                self.handles.remove(&a);
            }
            (NodeKey::Claim, kv) => self.claim = kv.map(|kv| kv.mod_revision),
        }
        Ok(())
    }

    /// Takes in what a failed transaction returned: every compared key of this node is now
    /// as returned, or absent if it was not returned.
    pub(crate) fn merge_failed(
        &mut self,
        keys: &Keys,
        compares: &[Compare],
        current: &[KeyValue],
    ) -> Result<(), StoreError> {
        for c in compares {
            if let Some(k) = keys.parse_node_key(c.key()) {
                self.set(k, current.iter().find(|kv| kv.key == c.key()))?;
            }
        }
        Ok(())
    }

    /// The compare that holds if the affinity of `block` is as seen.
    pub(crate) fn affinity_compare(&self, keys: &Keys, block: &IpNet) -> Compare {
        match self.affinities.get(block) {
            Some((rev, _)) => Compare::ModRevision(keys.affinity(block), *rev),
            None => Compare::Absent(keys.affinity(block)),
        }
    }

    pub(crate) fn used_compare(&self, keys: &Keys, ip: &IpAddr) -> Compare {
        match self.used.get(ip) {
            Some((rev, _)) => Compare::ModRevision(keys.used(ip), *rev),
            None => Compare::Absent(keys.used(ip)),
        }
    }

    pub(crate) fn free_compare(&self, keys: &Keys, ip: &IpAddr) -> Compare {
        match self.free.get(ip) {
            Some(rev) => Compare::ModRevision(keys.free(ip), *rev),
            None => Compare::Absent(keys.free(ip)),
        }
    }

    /// Blocks addresses may be taken from, lowest first.
    pub(crate) fn open_blocks(&self) -> impl Iterator<Item = &IpNet> {
        self.affinities
            .iter()
            .filter(|(_, (_, a))| !a.draining && !a.pending)
            .map(|(b, _)| b)
    }

    /// The addresses the next allocation should choose from, best first, and how many of the
    /// first ones it may pick among: never-used addresses (lowest first), else released
    /// ones in release order, keeping the most recently released for last.
    pub(crate) fn candidates(&self, geometry: &Geometry, window: usize) -> Candidates {
        let mut fresh = Vec::new();
        'blocks: for block in self.open_blocks() {
            let (first, last) = geometry.usable_range(block);
            let mut n = first;
            loop {
                let ip = from_u128(block, n);
                if !self.used.contains_key(&ip) && !self.free.contains_key(&ip) {
                    fresh.push((*block, ip));
                    if fresh.len() == window {
                        break 'blocks;
                    }
                }
                if n == last {
                    break;
                }
                n += 1;
            }
        }
        if !fresh.is_empty() {
            let pick_among = fresh.len();
            return Candidates {
                list: fresh,
                pick_among,
            };
        }
        let open: Vec<&IpNet> = self.open_blocks().collect();
        let mut released: Vec<(Revision, IpAddr, IpNet)> = self
            .free
            .iter()
            .filter(|(ip, _)| !self.used.contains_key(ip))
            .filter_map(|(ip, rev)| {
                open.iter()
                    .find(|b| geometry.is_usable(b, *ip))
                    .map(|b| (*rev, *ip, **b))
            })
            .collect();
        released.sort();
        // Picking among the older half only means the address released last is taken last.
        let pick_among = released.len().div_ceil(2).min(window);
        Candidates {
            list: released.into_iter().map(|(_, ip, b)| (b, ip)).collect(),
            pick_among,
        }
    }
}

/// Addresses an allocation may take, best first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Candidates {
    /// `(block, address)` pairs.
    pub(crate) list: Vec<(IpNet, IpAddr)>,
    /// How many of the first ones to choose among at random.
    pub(crate) pick_among: usize,
}
