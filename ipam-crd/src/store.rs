//! [`KubeStore`]: the cnikit [`Store`] on the custom resources of [`resources`](crate::resources).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cni_core::StoreError;
use cni_core::store::{Compare, KeyValue, Op, Store, Txn, TxnOutcome, object_of, objects};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, PostParams};
use kube::{Client, Resource};

use crate::config::Config;
use crate::resources::{IPAMBlock, IPAMNode, IPPool, PREFIX_LABEL, Record, RecordsSpec};

/// How many times a commit re-reads its object after a 409 Conflict before it gives up
/// (code 11). Dozens of writers of one node's object at once (a node starting many pods)
/// each win in turn: the bound is high, the pauses short.
const MAX_CONFLICTS: u32 = 100;
/// The longest random pause between two attempts after a 409, in milliseconds.
const MAX_PAUSE_MS: u64 = 32;

/// The kinds of object, by the part of the key after the prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Pool,
    Block,
    Node,
}

impl Kind {
    fn api_resource(self) -> ApiResource {
        match self {
            Kind::Pool => ApiResource::erase::<IPPool>(&()),
            Kind::Block => ApiResource::erase::<IPAMBlock>(&()),
            Kind::Node => ApiResource::erase::<IPAMNode>(&()),
        }
    }
}

/// Where an object lives: its kind and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ObjectRef {
    kind: Kind,
    name: String,
}

/// An object as last read or written: `None` when it does not exist.
#[derive(Debug, Clone)]
struct Seen {
    object: Option<DynamicObject>,
    spec: RecordsSpec,
}

/// The cnikit [`Store`] on Kubernetes custom resources.
///
/// - [`get`](Store::get): one `get` of the key's object.
/// - [`list`](Store::list): one `get` for a prefix inside one node's object, else one `list`
///   per kind that can hold such keys (label-selected by prefix).
/// - [`commit`](Store::commit): the transaction's keys must lie in one object (code 7
///   otherwise, a bug of the caller). The compares are checked against the object as this
///   store last read it, then one `replace` guarded by its `resourceVersion` (or one
///   `create`) applies the writes. A 409 Conflict (someone else wrote the object) re-reads
///   it and checks the compares again: if they still hold the write is retried after a
///   short random pause (at most 100 times, then code 11); if not, the commit fails with the
///   current values, as on etcd. So an allocation is two requests: the read of the node's
///   object and its replace.
///
/// No lock and no leader: concurrent writers of different objects never wait for each
/// other, and writers of one object only retry.
#[derive(Clone)]
pub struct KubeStore {
    client: Client,
    prefix: String,
    pool_name: String,
    timeout: Duration,
    seen: Arc<Mutex<HashMap<ObjectRef, Seen>>>,
    requests: Arc<AtomicU64>,
    conflicts: Arc<AtomicU64>,
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore")
            .field("prefix", &self.prefix)
            .field("requests", &self.requests())
            .finish_non_exhaustive()
    }
}

impl KubeStore {
    /// A store with the client `config` describes (a kubeconfig file, or the in-cluster
    /// service account). Reads the credentials; sends no request.
    pub async fn connect(config: &Config) -> Result<Self, StoreError> {
        let client = config.client().await?;
        Ok(KubeStore::new(client, config))
    }

    /// A store on an existing client.
    pub fn new(client: Client, config: &Config) -> Self {
        KubeStore {
            client,
            pool_name: pool_name(&config.prefix),
            prefix: config.prefix.clone(),
            timeout: Duration::from_millis(config.timeout_ms),
            seen: Arc::default(),
            requests: Arc::default(),
            conflicts: Arc::default(),
        }
    }

    /// The key prefix, under which the engine puts its keys.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// API requests sent so far by this store (and its clones).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// 409 Conflicts met so far (each followed by a re-read).
    pub fn conflicts(&self) -> u64 {
        self.conflicts.load(Ordering::Relaxed)
    }

    /// The object a datastore key lives in; code 7 for a key outside the engine's layout.
    fn object_ref(&self, key: &str) -> Result<ObjectRef, StoreError> {
        let object = object_of(key);
        let rest = object
            .strip_prefix(&self.prefix)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| unsupported(key))?;
        let (kind, part) = if rest == "pool" {
            (Kind::Pool, None)
        } else if let Some(block) = rest.strip_prefix("blocks/") {
            (Kind::Block, Some(block.replace(':', "x")))
        } else if let Some(node) = rest
            .strip_prefix("nodes/")
            .and_then(|n| n.strip_suffix('/'))
        {
            (Kind::Node, Some(node.to_owned()))
        } else {
            return Err(unsupported(key));
        };
        let name = match part {
            None => self.pool_name.clone(),
            Some(p) => format!("{}.{p}", self.pool_name),
        };
        if !is_dns_subdomain(&name) {
            return Err(StoreError::Config {
                reason: format!(
                    "{key:?} maps to the object name {name:?}, which is not a Kubernetes \
                     object name (lowercase letters, digits, '-' and '.'; a node name must be one)"
                ),
                source: None,
            });
        }
        Ok(ObjectRef { kind, name })
    }

    fn api(&self, kind: Kind) -> Api<DynamicObject> {
        Api::all_with(self.client.clone(), &kind.api_resource())
    }

    /// Runs one API request with the deadline and counts it.
    async fn call<T>(
        &self,
        op: &'static str,
        request: impl Future<Output = kube::Result<T>>,
    ) -> Result<kube::Result<T>, StoreError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        within(self.timeout, || self.describe(), op, request).await
    }

    /// Reads an object and remembers it.
    async fn fetch(&self, at: &ObjectRef) -> Result<Seen, StoreError> {
        let object = self
            .call("get", self.api(at.kind).get_opt(&at.name))
            .await?
            .map_err(|e| self.api_error(e))?;
        let seen = Seen {
            spec: spec_of(object.as_ref())?,
            object,
        };
        self.remember(at, &seen);
        Ok(seen)
    }

    fn remember(&self, at: &ObjectRef, seen: &Seen) {
        self.cache().insert(at.clone(), seen.clone());
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef, Seen>> {
        // The cache is only a hint (every write is guarded by its resourceVersion).
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The objects of `kind` under this prefix.
    async fn list_kind(&self, kind: Kind) -> Result<Vec<DynamicObject>, StoreError> {
        let params = ListParams::default().labels(&format!("{PREFIX_LABEL}={}", self.pool_name));
        let list = self
            .call("list", self.api(kind).list(&params))
            .await?
            .map_err(|e| self.api_error(e))?;
        Ok(list.items)
    }

    fn api_error(&self, e: kube::Error) -> StoreError {
        api_error(self.describe(), e)
    }

    /// A new object of `at` holding `spec`.
    fn new_object(&self, at: &ObjectRef, spec: &RecordsSpec) -> DynamicObject {
        let mut object = DynamicObject::new(&at.name, &at.kind.api_resource());
        object
            .meta_mut()
            .labels
            .get_or_insert_with(Default::default)
            .insert(PREFIX_LABEL.to_owned(), self.pool_name.clone());
        object.data = serde_json::json!({ "spec": spec });
        object
    }

    async fn backoff(&self, conflicts: u32) {
        let max = (1u64 << conflicts.min(6)).min(MAX_PAUSE_MS);
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=max))).await;
    }
}

/// Runs one API request within `timeout`; one that takes longer fails as a timeout of
/// `endpoint` during `op` (code 11).
pub(crate) async fn within<T>(
    timeout: Duration,
    endpoint: impl FnOnce() -> String,
    op: &'static str,
    request: impl Future<Output = kube::Result<T>>,
) -> Result<kube::Result<T>, StoreError> {
    tokio::time::timeout(timeout, request)
        .await
        .map_err(|_| StoreError::Timeout {
            endpoint: endpoint(),
            op,
            millis: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        })
}

/// A failed request as a store error: 401, 403 and 404 are configuration (code 7: the CRDs
/// or the RBAC rules are missing), anything else unavailability (code 11).
pub(crate) fn api_error(endpoint: String, e: kube::Error) -> StoreError {
    match &e {
        kube::Error::Api(status) if matches!(status.code, 401 | 403 | 404) => StoreError::Config {
            reason: format!(
                "{endpoint} answered {} {}: {} (are the CRDs of deploy/crds/ installed and \
                 the RBAC rules bound?)",
                status.code, status.reason, status.message
            ),
            source: Some(Box::new(e)),
        },
        _ => StoreError::Unavailable {
            endpoint,
            source: Box::new(e),
        },
    }
}

/// The records of an object (empty when it does not exist).
fn spec_of(object: Option<&DynamicObject>) -> Result<RecordsSpec, StoreError> {
    let Some(object) = object else {
        return Ok(RecordsSpec::default());
    };
    match object.data.get("spec") {
        None => Ok(RecordsSpec::default()),
        Some(spec) => serde_json::from_value(spec.clone()).map_err(|source| StoreError::Corrupt {
            key: object.metadata.name.clone().unwrap_or_default(),
            source,
        }),
    }
}

fn key_value(key: &str, record: &Record) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: record.value.clone().into_bytes(),
        mod_revision: u64::try_from(record.revision).unwrap_or(0),
    }
}

fn holds(compare: &Compare, spec: &RecordsSpec) -> bool {
    match compare {
        Compare::Absent(key) => !spec.records.contains_key(key),
        Compare::ModRevision(key, rev) => spec
            .records
            .get(key)
            .is_some_and(|r| u64::try_from(r.revision).ok() == Some(*rev)),
    }
}

fn unsupported(key: &str) -> StoreError {
    StoreError::Config {
        reason: format!("the Kubernetes store holds only block IPAM keys, not {key:?}"),
        source: None,
    }
}

/// The pool part of object names for a prefix: `/cnikit` → `cnikit`, `/a/b` → `a.b`.
pub fn pool_name(prefix: &str) -> String {
    prefix
        .trim_matches('/')
        .replace('/', ".")
        .to_ascii_lowercase()
}

/// Whether `name` is a DNS-1123 subdomain, as Kubernetes object names must be.
pub(crate) fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[async_trait]
impl Store for KubeStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let at = self.object_ref(key)?;
        let seen = self.fetch(&at).await?;
        Ok(seen.spec.records.get(key).map(|r| key_value(key, r)))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        // Inside one node's object: one read.
        let mut out = Vec::new();
        if let Ok(at) = self.object_ref(prefix)
            && at.kind == Kind::Node
        {
            let seen = self.fetch(&at).await?;
            out.extend(
                seen.spec
                    .records
                    .iter()
                    .filter(|(k, _)| k.starts_with(prefix))
                    .map(|(k, r)| key_value(k, r)),
            );
            return Ok(out);
        }
        let under = |part: &str| {
            let key = format!("{}/{part}", self.prefix);
            key.starts_with(prefix) || prefix.starts_with(&key)
        };
        for (kind, part) in [
            (Kind::Pool, "pool"),
            (Kind::Block, "blocks/"),
            (Kind::Node, "nodes/"),
        ] {
            if !under(part) {
                continue;
            }
            for object in self.list_kind(kind).await? {
                let spec = spec_of(Some(&object))?;
                if let Some(name) = object.metadata.name.clone() {
                    self.remember(
                        &ObjectRef { kind, name },
                        &Seen {
                            object: Some(object),
                            spec: spec.clone(),
                        },
                    );
                }
                out.extend(
                    spec.records
                        .iter()
                        .filter(|(k, _)| k.starts_with(prefix))
                        .map(|(k, r)| key_value(k, r)),
                );
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn commit(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let touched = objects(&txn);
        let Some(first) = touched.iter().next() else {
            return Ok(TxnOutcome::Committed(0));
        };
        if touched.len() > 1 {
            return Err(StoreError::Config {
                reason: format!(
                    "a transaction over several objects ({touched:?}) cannot be applied \
                     atomically by the Kubernetes store"
                ),
                source: None,
            });
        }
        let at = self.object_ref(first)?;
        let cached = self.cache().get(&at).cloned();
        let mut seen = match cached {
            Some(seen) => seen,
            None => self.fetch(&at).await?,
        };
        for conflicts in 0..=MAX_CONFLICTS {
            if !txn.compares.iter().all(|c| holds(c, &seen.spec)) {
                let current = txn
                    .compares
                    .iter()
                    .filter_map(|c| {
                        seen.spec
                            .records
                            .get(c.key())
                            .map(|r| key_value(c.key(), r))
                    })
                    .collect();
                return Ok(TxnOutcome::Failed(current));
            }
            let mut spec = seen.spec.clone();
            spec.revision += 1;
            for op in &txn.ops {
                match op {
                    Op::Put(key, value) => {
                        spec.records.insert(
                            key.clone(),
                            Record {
                                value: String::from_utf8_lossy(value).into_owned(),
                                revision: spec.revision,
                            },
                        );
                    }
                    Op::Delete(key) => {
                        spec.records.remove(key);
                    }
                }
            }
            let api = self.api(at.kind);
            let result = match &seen.object {
                None => {
                    let object = self.new_object(&at, &spec);
                    self.call("create", api.create(&PostParams::default(), &object))
                        .await?
                }
                Some(current) => {
                    let mut object = current.clone();
                    object.data["spec"] = serde_json::json!(spec);
                    self.call(
                        "replace",
                        api.replace(&at.name, &PostParams::default(), &object),
                    )
                    .await?
                }
            };
            match result {
                Ok(written) => {
                    let revision = u64::try_from(spec.revision).unwrap_or(0);
                    self.remember(
                        &at,
                        &Seen {
                            object: Some(written),
                            spec,
                        },
                    );
                    return Ok(TxnOutcome::Committed(revision));
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    // Written (or created) by someone else since we read it: read it again
                    // and check the compares against what is there now.
                    self.conflicts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(object = %at.name, conflicts, "409 Conflict, re-reading");
                    if conflicts > 0 {
                        self.backoff(conflicts).await;
                    }
                    seen = self.fetch(&at).await?;
                }
                Err(e) => {
                    // The outcome is unknown (a timeout after the write, say): forget the
                    // object so the next commit reads it first.
                    self.cache().remove(&at);
                    return Err(self.api_error(e));
                }
            }
        }
        Err(StoreError::Conflict {
            what: format!("{} {}", at.kind.api_resource().kind, at.name),
            attempts: MAX_CONFLICTS + 1,
        })
    }

    fn describe(&self) -> String {
        format!("Kubernetes API (prefix {})", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_names_and_dns_names() {
        assert_eq!(pool_name("/cnikit"), "cnikit");
        assert_eq!(pool_name("/a/b/"), "a.b");
        assert!(is_dns_subdomain("cnikit.10.244.0.64-26"));
        assert!(is_dns_subdomain("cnikit.fd00x10xx-122"));
        assert!(!is_dns_subdomain("cnikit.Node_1"));
        assert!(!is_dns_subdomain("cnikit..x"));
    }

    #[test]
    fn compares_hold_on_record_revisions() {
        let mut spec = RecordsSpec::default();
        spec.records.insert(
            "/p/pool".into(),
            Record {
                value: "{}".into(),
                revision: 3,
            },
        );
        assert!(holds(&Compare::ModRevision("/p/pool".into(), 3), &spec));
        assert!(!holds(&Compare::ModRevision("/p/pool".into(), 2), &spec));
        assert!(!holds(&Compare::Absent("/p/pool".into()), &spec));
        assert!(holds(&Compare::Absent("/p/other".into()), &spec));
    }
}
