//! [`EtcdStore`]: the cnikit [`Store`] on etcd v3 transactions.

use async_trait::async_trait;
use cni_core::StoreError;
use cni_core::store::{Compare, KeyValue, Op, Revision, Store, Txn, TxnOutcome};
use etcd_client::{
    Compare as EtcdCompare, CompareOp, GetOptions, SortOrder, SortTarget, Txn as EtcdTxn, TxnOp,
    TxnOpResponse,
};

use crate::config::Config;
use crate::connection::Connection;
use crate::error::Result;

/// Keys per range request when listing; larger lists are read in pages at one revision, so
/// they stay one consistent snapshot without hitting the gRPC message size limit.
const LIST_PAGE: i64 = 2_000;

/// The cnikit [`Store`] on etcd v3.
///
/// - [`get`](Store::get): one linearizable range request.
/// - [`list`](Store::list): one range request per 2000 keys, all at the revision of the first,
///   sorted by key.
/// - [`commit`](Store::commit): one etcd transaction. [`Compare::Absent`] is
///   `create_revision == 0`, [`Compare::ModRevision`] is `mod_revision == r`; the success
///   branch holds the puts and deletes, the failure branch reads every compared key, so a
///   failed commit returns the current values in the same round trip.
///
/// Keys arrive already prefixed (see the crate docs for the layout). etcd limits a
/// transaction to 128 operations by default (`--max-txn-ops`).
#[derive(Debug, Clone)]
pub struct EtcdStore {
    conn: Connection,
}

impl EtcdStore {
    /// Connects as [`Connection::connect`] does.
    pub async fn connect(config: &Config) -> Result<Self> {
        Ok(EtcdStore::new(Connection::connect(config).await?))
    }

    /// A store on an existing connection (shared with a registry, say).
    pub fn new(conn: Connection) -> Self {
        EtcdStore { conn }
    }

    /// The connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The configured key prefix, under which the engine puts its keys.
    pub fn prefix(&self) -> &str {
        self.conn.prefix()
    }

    /// Requests sent so far on this store's connection; see [`Connection::round_trips`].
    pub fn round_trips(&self) -> u64 {
        self.conn.round_trips()
    }
}

/// Reads every key under `prefix`, sorted by key, in pages at one revision; returns the keys
/// and that revision.
pub(crate) async fn list_prefix(
    conn: &Connection,
    prefix: &str,
) -> Result<(Vec<KeyValue>, Revision)> {
    let mut kv = conn.client().kv_client();
    let (mut start, end) = prefix_range(prefix);
    let mut out = Vec::new();
    let mut at: i64 = 0;
    loop {
        let mut options = GetOptions::new()
            .with_range(end.clone())
            .with_limit(LIST_PAGE)
            .with_sort(SortTarget::Key, SortOrder::Ascend);
        if at > 0 {
            options = options.with_revision(at);
        }
        let resp = conn
            .call("list", kv.get(start.clone(), Some(options)))
            .await?;
        if at == 0 {
            at = resp.header().map(|h| h.revision()).unwrap_or(0);
        }
        out.extend(resp.kvs().iter().map(key_value));
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                // The next page starts just after the last key.
                start = last.key().to_vec();
                start.push(0);
            }
            _ => break,
        }
    }
    Ok((out, revision(at)))
}

/// An etcd revision as cnikit's (etcd's are never negative).
pub(crate) fn revision(r: i64) -> Revision {
    Revision::try_from(r).unwrap_or(0)
}

fn key_value(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        // cnikit only writes UTF-8 keys; a foreign key under the prefix still gets listed.
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        mod_revision: revision(kv.mod_revision()),
    }
}

/// The key range `[start, end)` of every key that starts with `prefix`, as etcd spells it
/// (`"\0"` as end means "to the last key").
fn prefix_range(prefix: &str) -> (Vec<u8>, Vec<u8>) {
    let start = prefix.as_bytes().to_vec();
    let mut end = start.clone();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return (start, end);
        }
    }
    // An empty prefix, or one of 0xff bytes only: everything from `start` on.
    let start = if start.is_empty() { vec![0] } else { start };
    (start, vec![0])
}

fn compare(c: &Compare) -> EtcdCompare {
    match c {
        Compare::Absent(key) => EtcdCompare::create_revision(key.as_str(), CompareOp::Equal, 0),
        Compare::ModRevision(key, rev) => {
            // No etcd revision exceeds i64::MAX: a compare against one can never hold.
            let rev = i64::try_from(*rev).unwrap_or(-1);
            EtcdCompare::mod_revision(key.as_str(), CompareOp::Equal, rev)
        }
    }
}

fn op(o: Op) -> TxnOp {
    match o {
        Op::Put(key, value) => TxnOp::put(key, value, None),
        Op::Delete(key) => TxnOp::delete(key, None),
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut kv = self.conn.client().kv_client();
        let resp = self.conn.call("get", kv.get(key, None)).await?;
        Ok(resp.kvs().first().map(key_value))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        Ok(list_prefix(&self.conn, prefix).await?.0)
    }

    async fn commit(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let mut compared: Vec<&str> = Vec::new();
        for c in &txn.compares {
            if !compared.contains(&c.key()) {
                compared.push(c.key());
            }
        }
        let reads: Vec<TxnOp> = compared.iter().map(|k| TxnOp::get(*k, None)).collect();
        let request = EtcdTxn::new()
            .when(txn.compares.iter().map(compare).collect::<Vec<_>>())
            .and_then(txn.ops.into_iter().map(op).collect::<Vec<_>>())
            .or_else(reads);
        let mut kv = self.conn.client().kv_client();
        let resp = self.conn.call("txn", kv.txn(request)).await?;
        if resp.succeeded() {
            let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
            return Ok(TxnOutcome::Committed(revision(rev)));
        }
        let current = resp
            .op_responses()
            .iter()
            .filter_map(|r| match r {
                TxnOpResponse::Get(get) => get.kvs().first().map(key_value),
                _ => None,
            })
            .collect();
        Ok(TxnOutcome::Failed(current))
    }

    fn describe(&self) -> String {
        format!("etcd {}", self.conn.endpoints())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ranges() {
        assert_eq!(prefix_range("/a/"), (b"/a/".to_vec(), b"/a0".to_vec()));
        assert_eq!(prefix_range(""), (vec![0], vec![0]));
    }

    #[test]
    fn compares_map_to_revisions() {
        let absent = compare(&Compare::Absent("/k".into()));
        assert_eq!(
            format!("{absent:?}"),
            format!(
                "{:?}",
                EtcdCompare::create_revision("/k", CompareOp::Equal, 0)
            )
        );
        let huge = compare(&Compare::ModRevision("/k".into(), u64::MAX));
        assert_eq!(
            format!("{huge:?}"),
            format!(
                "{:?}",
                EtcdCompare::mod_revision("/k", CompareOp::Equal, -1)
            )
        );
    }
}
