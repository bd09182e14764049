//! The datastore abstraction: a versioned key/value store with multi-key compare-and-swap.
//!
//! Every write is a [`Txn`]: a list of [`Compare`]s that must all hold and a list of [`Op`]s
//! applied atomically if they do. This is exactly what etcd v3 offers, and what the
//! [`FileStore`] emulates under a file lock, so the block IPAM engine and the
//! node registry are written once for all datastores.
//!
//! # Objects: the unit of atomicity
//!
//! etcd and the file store apply any transaction atomically; the Kubernetes API offers
//! compare-and-swap on one object at a time (its `resourceVersion`) and no multi-object
//! transaction. So cnikit groups keys into *objects* ([`object_of`]) and commits only
//! transactions whose keys lie in one object: every key is its own object, except that the
//! keys under `…/nodes/<node>/` form one object per node (a node's affinities, used and
//! released addresses, handles and claim record). The block engine is written so (claims and
//! block give-backs are several one-object steps, safe at every step), and so a store that
//! maps each object to one Kubernetes resource needs no lock and no transaction of its own.
//!
//! Keys are `/`-separated strings; values are opaque bytes (cnikit writes JSON). Revisions
//! grow monotonically over the whole store, as in etcd: a key's `mod_revision` is the
//! revision of the transaction that last wrote it.

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::error::StoreError;

pub mod file;
pub mod memory;
mod table;

pub use file::FileStore;
pub use memory::MemoryStore;

/// The object a key belongs to (see the [module docs](self)): the key up to and including
/// `/nodes/<node>/` when it has more segments after that, else the key itself.
///
/// ```
/// use cni_core::store::object_of;
/// assert_eq!(object_of("/cnikit/nodes/n1/used/10.0.0.5"), "/cnikit/nodes/n1/");
/// assert_eq!(object_of("/cnikit/blocks/10.0.0.0-26"), "/cnikit/blocks/10.0.0.0-26");
/// assert_eq!(object_of("/cnikit/registry/nodes/n1"), "/cnikit/registry/nodes/n1");
/// ```
pub fn object_of(key: &str) -> &str {
    let mut from = 0;
    while let Some(i) = key[from..].find("/nodes/") {
        let node_start = from + i + "/nodes/".len();
        if let Some(j) = key[node_start..].find('/') {
            let end = node_start + j + 1;
            if j > 0 && end < key.len() {
                return &key[..end];
            }
        }
        from = node_start;
    }
    key
}

/// The objects a transaction touches (compared or written), sorted.
pub fn objects(txn: &Txn) -> std::collections::BTreeSet<&str> {
    txn.compares
        .iter()
        .map(Compare::key)
        .chain(txn.ops.iter().map(|op| match op {
            Op::Put(k, _) | Op::Delete(k) => k.as_str(),
        }))
        .map(object_of)
        .collect()
}

/// A store-wide revision number; 0 means "never written".
pub type Revision = u64;

/// One stored key with its value and the revision that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// Revision of the last write to this key.
    pub mod_revision: Revision,
}

/// A precondition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists and was last written at this revision.
    ModRevision(String, Revision),
}

impl Compare {
    /// The key this compare is about.
    pub fn key(&self) -> &str {
        match self {
            Compare::Absent(k) | Compare::ModRevision(k, _) => k,
        }
    }

    /// A compare that holds for the key as it was read (`None`: it was absent).
    pub fn unchanged(key: impl Into<String>, seen: Option<&KeyValue>) -> Self {
        match seen {
            None => Compare::Absent(key.into()),
            Some(kv) => Compare::ModRevision(key.into(), kv.mod_revision),
        }
    }
}

/// A write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create or replace a key.
    Put(String, Vec<u8>),
    /// Remove a key (no error if it is absent).
    Delete(String),
}

/// An atomic multi-key transaction: all `compares` hold, then all `ops` apply; or nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    /// Preconditions.
    pub compares: Vec<Compare>,
    /// Writes.
    pub ops: Vec<Op>,
}

impl Txn {
    /// An empty transaction.
    pub fn new() -> Self {
        Txn::default()
    }

    /// Adds a precondition.
    pub fn when(mut self, compare: Compare) -> Self {
        self.compares.push(compare);
        self
    }

    /// Adds a put.
    pub fn put(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.ops.push(Op::Put(key.into(), value.into()));
        self
    }

    /// Adds a delete.
    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.ops.push(Op::Delete(key.into()));
        self
    }
}

/// What a transaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Every compare held and every op applied at this revision.
    Committed(Revision),
    /// A compare failed; nothing was written. Holds the current value of every compared key
    /// that exists (read in the same round trip), so the caller can retry without re-reading.
    Failed(Vec<KeyValue>),
}

/// A versioned key/value datastore with multi-key compare-and-swap.
///
/// Implementations: [`MemoryStore`] (unit tests), [`FileStore`] (one node, the embedded
/// default), and the etcd store of the `ipam-etcd` crate. All methods are safe to call from
/// many tasks and processes at once; errors carry CNI code 11 when retrying later may help.
#[async_trait]
pub trait Store: Send + Sync {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Reads every key that starts with `prefix`, sorted by key, in one consistent snapshot.
    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError>;

    /// Applies a transaction atomically.
    async fn commit(&self, txn: Txn) -> Result<TxnOutcome, StoreError>;

    /// A short description for logs and errors (endpoints or path, never secrets).
    fn describe(&self) -> String;

    /// Wake-ups for a watcher that polls this store (the node registry over a store without
    /// watches): the stream yields when the store may have changed. It may yield when nothing
    /// did and may miss changes (made from another machine on a network filesystem, say),
    /// so a watcher still polls and only looks sooner; a stream that ends gives no more
    /// hints. `None`, the default: the store gives no hints. Must be called from within a
    /// tokio runtime with IO enabled.
    fn change_hints(&self) -> Option<BoxStream<'static, ()>> {
        None
    }
}

#[async_trait]
impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        (**self).get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        (**self).list(prefix).await
    }
    async fn commit(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        (**self).commit(txn).await
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn change_hints(&self) -> Option<BoxStream<'static, ()>> {
        (**self).change_hints()
    }
}
