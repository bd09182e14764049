//! The key/value table behind [`MemoryStore`](super::MemoryStore) and
//! [`FileStore`](super::FileStore): a sorted map with etcd-like revisions, and the
//! transaction semantics both share.

use std::collections::BTreeMap;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Compare, KeyValue, Op, Revision, Txn, TxnOutcome};

/// One stored value with the revision that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) value: Vec<u8>,
    pub(crate) mod_revision: Revision,
}

/// All keys of a store and its current revision.
///
/// This is also the on-disk format of the file store:
/// `{"revision": 7, "keys": {"/a": {"rev": 7, "value": "…"}}}`; values that are not UTF-8
/// are written as `{"rev": 7, "hex": "…"}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Table {
    pub(crate) revision: Revision,
    pub(crate) keys: BTreeMap<String, Entry>,
}

impl Table {
    fn key_value(key: &str, entry: &Entry) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: entry.value.clone(),
            mod_revision: entry.mod_revision,
        }
    }

    /// Reads one key.
    pub(crate) fn get(&self, key: &str) -> Option<KeyValue> {
        self.keys.get(key).map(|e| Self::key_value(key, e))
    }

    /// Reads every key starting with `prefix`, sorted.
    pub(crate) fn list(&self, prefix: &str) -> Vec<KeyValue> {
        self.keys
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| Self::key_value(k, e))
            .collect()
    }

    /// Checks the compares of `txn`: `Err` holds the current values of the compared keys
    /// that exist (each once, in compare order).
    pub(crate) fn check(&self, compares: &[Compare]) -> Result<(), Vec<KeyValue>> {
        let holds = compares.iter().all(|c| match c {
            Compare::Absent(k) => !self.keys.contains_key(k),
            Compare::ModRevision(k, rev) => {
                self.keys.get(k).is_some_and(|e| e.mod_revision == *rev)
            }
        });
        if holds {
            return Ok(());
        }
        let mut current: Vec<KeyValue> = Vec::new();
        for c in compares {
            let key = c.key();
            if current.iter().any(|kv| kv.key == key) {
                continue;
            }
            if let Some(kv) = self.get(key) {
                current.push(kv);
            }
        }
        Err(current)
    }

    /// Applies the ops of a transaction whose compares hold; returns the new revision.
    ///
    /// A transaction without ops writes nothing and keeps the revision, as in etcd.
    pub(crate) fn apply(&mut self, ops: Vec<Op>) -> Revision {
        if ops.is_empty() {
            return self.revision;
        }
        self.revision += 1;
        let revision = self.revision;
        for op in ops {
            match op {
                Op::Put(key, value) => {
                    self.keys.insert(
                        key,
                        Entry {
                            value,
                            mod_revision: revision,
                        },
                    );
                }
                Op::Delete(key) => {
                    self.keys.remove(&key);
                }
            }
        }
        revision
    }

    /// Checks and applies a transaction.
    pub(crate) fn commit(&mut self, txn: Txn) -> TxnOutcome {
        match self.check(&txn.compares) {
            Ok(()) => TxnOutcome::Committed(self.apply(txn.ops)),
            Err(current) => TxnOutcome::Failed(current),
        }
    }
}

/// The serialized form of an [`Entry`].
#[derive(Deserialize)]
struct EntryRepr {
    rev: Revision,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    hex: Option<String>,
}

/// What [`Entry`] serializes as: the [`EntryRepr`] shape, borrowing a UTF-8 value, so that
/// writing the file store does not copy every value on every commit.
#[derive(Serialize)]
struct EntryReprRef<'a> {
    rev: Revision,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hex: Option<String>,
}

impl Serialize for Entry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = std::str::from_utf8(&self.value).ok();
        EntryReprRef {
            rev: self.mod_revision,
            value: text,
            hex: match text {
                Some(_) => None,
                None => Some(self.value.iter().map(|b| format!("{b:02x}")).collect()),
            },
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let repr = EntryRepr::deserialize(d)?;
        let value = match (repr.value, repr.hex) {
            (Some(text), None) => text.into_bytes(),
            (None, Some(hex)) => {
                decode_hex(&hex).ok_or_else(|| D::Error::custom("bad hex value"))?
            }
            _ => {
                return Err(D::Error::custom(
                    "an entry needs exactly one of value and hex",
                ));
            }
        };
        Ok(Entry {
            value,
            mod_revision: repr.rev,
        })
    }
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_compare_returns_current_values_once() {
        let mut t = Table::default();
        let rev = match t.commit(Txn::new().put("/a", "1").put("/b", "2")) {
            TxnOutcome::Committed(r) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(rev, 1);
        let outcome = t.commit(
            Txn::new()
                .when(Compare::Absent("/a".into()))
                .when(Compare::ModRevision("/a".into(), 1))
                .when(Compare::Absent("/c".into()))
                .put("/c", "3"),
        );
        let TxnOutcome::Failed(current) = outcome else {
            panic!("compare on an existing key must fail");
        };
        assert_eq!(current.len(), 1);
        assert_eq!(current[0].key, "/a");
        assert_eq!(current[0].mod_revision, 1);
        assert!(t.get("/c").is_none(), "a failed txn writes nothing");
        assert_eq!(t.revision, 1);
    }

    #[test]
    fn list_is_prefix_bounded_and_sorted() {
        let mut t = Table::default();
        t.apply(vec![
            Op::Put("/n/a2".into(), b"x".to_vec()),
            Op::Put("/n/a1".into(), b"x".to_vec()),
            Op::Put("/n/a".into(), b"x".to_vec()),
            Op::Put("/m".into(), b"x".to_vec()),
            Op::Put("/o".into(), b"x".to_vec()),
        ]);
        let keys: Vec<_> = t.list("/n/a").into_iter().map(|kv| kv.key).collect();
        assert_eq!(keys, ["/n/a", "/n/a1", "/n/a2"]);
        assert!(t.list("/z").is_empty());
    }

    #[test]
    fn empty_txn_keeps_the_revision_and_delete_bumps_it() {
        let mut t = Table::default();
        assert_eq!(t.commit(Txn::new()), TxnOutcome::Committed(0));
        t.apply(vec![Op::Put("/a".into(), b"1".to_vec())]);
        assert_eq!(t.commit(Txn::new().delete("/a")), TxnOutcome::Committed(2));
        assert!(t.get("/a").is_none());
    }

    #[test]
    fn serde_round_trip_keeps_binary_values() {
        let mut t = Table::default();
        t.apply(vec![
            Op::Put("/text".into(), br#"{"node":"n1"}"#.to_vec()),
            Op::Put("/bin".into(), vec![0xff, 0x00, 0x10]),
        ]);
        let json = serde_json::to_string(&t).expect("serializes");
        assert!(json.contains(r#""hex":"ff0010""#), "{json}");
        let back: Table = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, t);
        assert!(
            serde_json::from_str::<Table>(r#"{"revision":1,"keys":{"/a":{"rev":1,"hex":"f"}}}"#)
                .is_err()
        );
    }
}
