//! [`KubeRegistry`]: the node registry on the Kubernetes API — a [`NetworkNode`] per node
//! for its record, a `coordination.k8s.io/v1` Lease per node for its liveness.
//!
//! | object | name | written by |
//! |---|---|---|
//! | [`NetworkNode`] (cluster-scoped) | `<pool>.<node>` | the node's agent: on register, on a change of its record, deleted on deregister |
//! | `Lease` (namespace `leaseNamespace`, default `kube-system`) | `<pool>.<node>` | the node's agent: `renewTime` every third of its TTL, as kubelet's heartbeat |
//!
//! A node is a **live peer** while its record exists and its Lease's `renewTime` plus
//! `leaseDurationSeconds` lies ahead (the holder's clock against the reader's: the nodes'
//! clocks must agree to well within the TTL, as they do under NTP). A node that dies stops
//! renewing and drops out of [`list`](NodeRegistry::list) and, through a timer of the
//! watch, out of every [`watch`](NodeRegistry::watch) once its Lease expires. Its objects
//! stay until [`prune_expired`](NodeRegistry::prune_expired) deletes them, once the pruner
//! has seen the Lease unrenewed for two lease durations by its own clock (a node that comes
//! back later registers again at its next renewal). A node that deregisters deletes both.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cni_core::StoreError;
use cni_core::registry::{NodeEvent, NodeList, NodeRecord, NodeRegistry};
use cni_core::store::Revision;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, DeleteParams, ListParams, ObjectMeta, PostParams, Preconditions, VersionMatch, WatchEvent,
    WatchParams,
};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::resources::{NetworkNode, NetworkNodeSpec, PREFIX_LABEL};
use crate::store::{api_error, is_dns_subdomain, pool_name, within};

/// First pause after a failed request of a background task; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between two attempts of a background task.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Events buffered for a slow watch consumer before the watch waits for it.
const WATCH_BUFFER: usize = 256;
/// How often a write re-reads its object after a 409 Conflict before it gives up.
const MAX_CONFLICTS: u32 = 10;
/// How long [`NodeRegistry::prune_expired`] must have seen a record without a Lease before
/// it deletes it (a node whose Lease was deleted by hand creates it again within a third of
/// its TTL).
pub const ORPHAN_AGE: Duration = Duration::from_secs(60);
/// The annotation a node's record gets a fresh value of (the time) whenever the node
/// registers or its Lease had to be created again: a write that always changes the
/// resourceVersion.
pub const REGISTERED_ANNOTATION: &str = "ipam.cnikit.io/registered";
/// Every how many renewals a node also checks that its record is there.
pub const RECORD_CHECK_EVERY: u32 = 10;
/// Added to a Lease's expiry before the watch's timer looks again, so that the expiry has
/// passed by then.
const EXPIRY_MARGIN: Duration = Duration::from_millis(50);

/// The cnikit [`NodeRegistry`] on the Kubernetes API. See the [module docs](self).
///
/// - [`register`](NodeRegistry::register): creates or replaces the node's [`NetworkNode`]
///   and its Lease (`holderIdentity` the node, `leaseDurationSeconds` the TTL in whole
///   seconds, rounded up), then renews the Lease every third of the TTL in the background
///   until [`deregister`](NodeRegistry::deregister) or drop. A Lease found gone at a renewal
///   (pruned while the node could not renew, or deleted by hand) is created again and the
///   record written again with it, always as a new write (a fresh annotation
///   [`REGISTERED_ANNOTATION`]), so that a pruner's delete guarded by the record's old
///   resourceVersion cannot take it away after the node came back. Every
///   [`RECORD_CHECK_EVERY`]th renewal also writes the record again if it is gone (deleted by
///   hand).
/// - [`deregister`](NodeRegistry::deregister): stops the renewals, deletes the record and the
///   Lease (`Ok` when they are absent).
/// - [`list`](NodeRegistry::list): two lists (records, then Leases at exactly the records'
///   resourceVersion, so both are one snapshot); the live records, and that resourceVersion
///   as the revision.
/// - [`watch`](NodeRegistry::watch): reads both kinds at exactly the given revision, then
///   watches both from it, and yields the changes of the *live* set: a `Put` when a node
///   appears, changes or its Lease comes back, a `Delete` when its record or Lease goes or
///   the Lease expires. A watch broken by the server (its timeout, a restart) resumes from
///   the last resourceVersion it saw; one answered 410 Gone (the history is compacted or
///   past the server's watch cache) lists that kind again and yields
///   [`NodeEvent::Reset`] with the fresh live set. A record that does not decode is left
///   out with a warning.
/// - [`prune_expired`](NodeRegistry::prune_expired): deletes the Lease and then the record
///   of every node whose Lease this registry has seen at one resourceVersion for two lease
///   durations (by its own monotonic clock, across its calls: the holders' and the pruner's
///   clocks do not matter, and a first call deletes nothing), each with a precondition on
///   the resourceVersion (and uid) it read, so a Lease renewed meanwhile stays, and with it
///   the record. A record seen without a Lease for [`ORPHAN_AGE`], and a Lease without a
///   record seen unrenewed for two durations, go too.
///
/// Errors: 7 for a node name that is not a Kubernetes object name, or when the server
/// refuses (401/403/404: the CRDs or RBAC rules of `deploy/crds/` missing); 11 when it
/// cannot be reached in time.
pub struct KubeRegistry {
    apis: Apis,
    registrations: tokio::sync::Mutex<HashMap<String, Registration>>,
    /// What [`NodeRegistry::prune_expired`] has seen unchanged, and since when.
    sightings: StdMutex<Sightings>,
    /// How long a record without a Lease is seen before it is pruned.
    orphan_age: Duration,
    /// Dropped with the registry, which ends every background task.
    shutdown: watch::Sender<()>,
}

impl std::fmt::Debug for KubeRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeRegistry")
            .field("pool", &self.apis.pool)
            .field("lease_namespace", &self.apis.namespace)
            .finish_non_exhaustive()
    }
}

/// One node this registry keeps alive.
struct Registration {
    ttl: i32,
    /// The record, written again when the Lease has to be created again.
    record: Arc<StdMutex<NetworkNodeSpec>>,
    /// Held by the renewal task during each write, so that `deregister` never races it.
    writing: Arc<tokio::sync::Mutex<()>>,
    task: JoinHandle<()>,
}

impl Drop for KubeRegistry {
    fn drop(&mut self) {
        for (_, registration) in self.registrations.get_mut().drain() {
            registration.task.abort();
        }
    }
}

impl KubeRegistry {
    /// A registry with the client `config` describes (a kubeconfig file, or the in-cluster
    /// service account). Reads the credentials; sends no request.
    pub async fn connect(config: &Config) -> Result<Self, StoreError> {
        let client = config.client().await?;
        Ok(KubeRegistry::new(client, config))
    }

    /// A registry on an existing client: records named after `config.prefix`, Leases in
    /// `config.lease_namespace`.
    pub fn new(client: Client, config: &Config) -> Self {
        let pool = pool_name(&config.prefix);
        KubeRegistry {
            apis: Apis {
                records: Api::all(client.clone()),
                leases: Api::namespaced(client, &config.lease_namespace),
                namespace: config.lease_namespace.clone(),
                selector: format!("{PREFIX_LABEL}={pool}"),
                pool,
                timeout: Duration::from_millis(config.timeout_ms),
            },
            registrations: tokio::sync::Mutex::new(HashMap::new()),
            sightings: StdMutex::new(Sightings::default()),
            orphan_age: ORPHAN_AGE,
            shutdown: watch::channel(()).0,
        }
    }

    /// The same registry, pruning records seen without a Lease for `age` instead of
    /// [`ORPHAN_AGE`].
    pub fn with_orphan_age(mut self, age: Duration) -> Self {
        self.orphan_age = age;
        self
    }

    /// The name of a node's [`NetworkNode`] and Lease: `<pool>.<node>`. Errors: code 7 when
    /// that is not a Kubernetes object name.
    pub fn object_name(&self, node: &str) -> cni_core::Result<String> {
        let name = format!("{}.{node}", self.apis.pool);
        if node.is_empty() || !is_dns_subdomain(&name) {
            return Err(cni_core::Error::invalid_config(
                "nodeName",
                format!(
                    "{node:?} gives the object name {name:?}, which is not a Kubernetes object \
                     name (lowercase letters, digits, '-' and '.')"
                ),
            ));
        }
        Ok(name)
    }
}

/// Everything the background tasks need to reach the server.
#[derive(Clone)]
struct Apis {
    records: Api<NetworkNode>,
    leases: Api<Lease>,
    namespace: String,
    /// The label selector of this registry's objects.
    selector: String,
    pool: String,
    timeout: Duration,
}

impl Apis {
    fn describe(&self) -> String {
        format!("Kubernetes API (node registry {})", self.pool)
    }

    /// Runs one request within the deadline.
    async fn call<T>(
        &self,
        op: &'static str,
        request: impl Future<Output = kube::Result<T>>,
    ) -> Result<kube::Result<T>, StoreError> {
        within(self.timeout, || self.describe(), op, request).await
    }

    fn error(&self, e: kube::Error) -> StoreError {
        api_error(self.describe(), e)
    }

    /// The node an object of this registry belongs to, from its name.
    fn node_of<'a>(&self, name: &'a str) -> Option<&'a str> {
        name.strip_prefix(&self.pool)?.strip_prefix('.')
    }

    fn meta(&self, name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some([(PREFIX_LABEL.to_owned(), self.pool.clone())].into()),
            ..ObjectMeta::default()
        }
    }

    /// Creates or replaces the record `name` (re-reading after a 409, or a 404 when it was
    /// deleted between the read and the write). `fresh`: always a new write, with a new
    /// [`REGISTERED_ANNOTATION`]; else nothing when the record is there with `spec`.
    async fn put_record(
        &self,
        name: &str,
        spec: &NetworkNodeSpec,
        fresh: bool,
    ) -> Result<(), StoreError> {
        let stamp = || {
            (
                REGISTERED_ANNOTATION.to_owned(),
                Timestamp::now().to_string(),
            )
        };
        for _ in 0..=MAX_CONFLICTS {
            let current = self
                .call("get node record", self.records.get_opt(name))
                .await?
                .map_err(|e| self.error(e))?;
            let result = match current {
                Some(object) if object.spec == *spec && !fresh => return Ok(()),
                Some(mut object) => {
                    object.spec = spec.clone();
                    if fresh {
                        let (key, value) = stamp();
                        object
                            .metadata
                            .annotations
                            .get_or_insert_default()
                            .insert(key, value);
                    }
                    self.call(
                        "replace node record",
                        self.records.replace(name, &PostParams::default(), &object),
                    )
                    .await?
                }
                None => {
                    let mut object = NetworkNode::new(name, spec.clone());
                    object.metadata = self.meta(name);
                    object.metadata.annotations = Some(BTreeMap::from([stamp()]));
                    self.call(
                        "create node record",
                        self.records.create(&PostParams::default(), &object),
                    )
                    .await?
                }
            };
            match result {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => continue,
                Err(e) => return Err(self.error(e)),
            }
        }
        Err(StoreError::Conflict {
            what: format!("NetworkNode {name}"),
            attempts: MAX_CONFLICTS + 1,
        })
    }

    /// Renews the Lease `name` for `holder` (creating it when it is gone); `true` when it
    /// had to be created.
    async fn renew_lease(&self, name: &str, holder: &str, ttl: i32) -> Result<bool, StoreError> {
        for _ in 0..=MAX_CONFLICTS {
            let now = MicroTime(Timestamp::now());
            let current = self
                .call("get lease", self.leases.get_opt(name))
                .await?
                .map_err(|e| self.error(e))?;
            let created = current.is_none();
            let result = match current {
                Some(mut lease) => {
                    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                    if spec.holder_identity.as_deref() != Some(holder) {
                        spec.holder_identity = Some(holder.to_owned());
                        spec.acquire_time = Some(now.clone());
                        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                    }
                    spec.lease_duration_seconds = Some(ttl);
                    spec.renew_time = Some(now);
                    self.call(
                        "renew lease",
                        self.leases.replace(name, &PostParams::default(), &lease),
                    )
                    .await?
                }
                None => {
                    let lease = Lease {
                        metadata: ObjectMeta {
                            namespace: Some(self.namespace.clone()),
                            ..self.meta(name)
                        },
                        spec: Some(LeaseSpec {
                            holder_identity: Some(holder.to_owned()),
                            lease_duration_seconds: Some(ttl),
                            acquire_time: Some(now.clone()),
                            renew_time: Some(now),
                            ..LeaseSpec::default()
                        }),
                    };
                    self.call(
                        "create lease",
                        self.leases.create(&PostParams::default(), &lease),
                    )
                    .await?
                }
            };
            match result {
                Ok(_) => return Ok(created),
                // 404: deleted between the read and the replace; created on the next turn.
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => continue,
                Err(e) => return Err(self.error(e)),
            }
        }
        Err(StoreError::Conflict {
            what: format!("Lease {}/{name}", self.namespace),
            attempts: MAX_CONFLICTS + 1,
        })
    }

    /// Deletes both objects of a node; absent ones are fine.
    async fn delete(&self, name: &str) -> Result<(), StoreError> {
        let records = self
            .call(
                "delete node record",
                self.records.delete(name, &DeleteParams::default()),
            )
            .await?
            .map(drop);
        self.absent_ok(records)?;
        let lease = self
            .call(
                "delete lease",
                self.leases.delete(name, &DeleteParams::default()),
            )
            .await?
            .map(drop);
        self.absent_ok(lease)
    }

    /// A deletion's result: a 404 is fine.
    fn absent_ok(&self, result: kube::Result<()>) -> Result<(), StoreError> {
        match result {
            Ok(()) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(self.error(e)),
        }
    }

    /// See [`KubeRegistry`]'s `prune_expired`: the nodes whose records were deleted.
    async fn prune(
        &self,
        sightings: &StdMutex<Sightings>,
        orphan_age: Duration,
    ) -> Result<Vec<String>, StoreError> {
        let params = ListParams::default().labels(&self.selector);
        let records = self
            .call("list node records", self.records.list(&params))
            .await?
            .map_err(|e| self.error(e))?;
        let leases = self
            .call("list leases", self.leases.list(&params))
            .await?
            .map_err(|e| self.error(e))?;
        let mut leases: BTreeMap<String, Lease> = leases
            .items
            .into_iter()
            .filter_map(|l| Some((self.node_of(&l.name_any())?.to_owned(), l)))
            .collect();
        // Decided under the lock, deleted after it.
        let mut doomed: Vec<(String, Option<Lease>, Option<&NetworkNode>)> = Vec::new();
        {
            let mut seen = sightings.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            for record in &records.items {
                let Some(node) = self.node_of(&record.name_any()).map(str::to_owned) else {
                    continue;
                };
                let lease = leases.remove(&node);
                let dead = match &lease {
                    Some(lease) => seen.lease(lease, now) >= unrenewed_limit(lease),
                    None => seen.orphan(record, now) >= orphan_age,
                };
                if dead {
                    doomed.push((node, lease, Some(record)));
                }
            }
            // Leases whose record is gone (deleted by hand): the same rule.
            for (node, lease) in leases {
                if seen.lease(&lease, now) >= unrenewed_limit(&lease) {
                    doomed.push((node, Some(lease), None));
                }
            }
            seen.end_pass();
        }
        let mut pruned = Vec::new();
        for (node, lease, record) in doomed {
            // The Lease first: if the node renewed since the list, the precondition fails
            // and both objects stay. A node that creates its Lease again after this also
            // writes its record anew, which fails the record's precondition below.
            if let Some(lease) = &lease
                && !self
                    .delete_unchanged(&self.leases, lease, "delete lease")
                    .await?
            {
                continue;
            }
            if let Some(record) = record
                && self
                    .delete_unchanged(&self.records, record, "delete node record")
                    .await?
            {
                pruned.push(node);
            }
        }
        Ok(pruned)
    }

    /// Deletes `object` if it is still at the resourceVersion it was read at; `false` when it
    /// changed or is gone.
    async fn delete_unchanged<K>(
        &self,
        api: &Api<K>,
        object: &K,
        op: &'static str,
    ) -> Result<bool, StoreError>
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: object.meta().resource_version.clone(),
                uid: object.meta().uid.clone(),
            }),
            ..DeleteParams::default()
        };
        match self
            .call(op, api.delete(&object.name_any(), &params))
            .await?
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(false),
            Err(e) => Err(self.error(e)),
        }
    }

    /// Both kinds: the records now (`at` `None`) or at exactly `at`, the Leases at exactly
    /// the records' resourceVersion. A 410 Gone for `at` is an `Err(Gone)`.
    async fn snapshot(&self, at: Option<Revision>) -> Result<Snapshot, Listed> {
        let params = ListParams::default().labels(&self.selector);
        let exact = |rv: &str| params.clone().at(rv).matching(VersionMatch::Exact);
        let first = match at {
            None => params.clone(),
            Some(rv) => exact(&rv.to_string()),
        };
        let records = self
            .call("list node records", self.records.list(&first))
            .await?
            .map_err(|e| Listed::from_api(self, e))?;
        let rv = records
            .metadata
            .resource_version
            .clone()
            .unwrap_or_default();
        let leases = self
            .call("list leases", self.leases.list(&exact(&rv)))
            .await?
            .map_err(|e| Listed::from_api(self, e))?;
        let mut state = State::default();
        for record in &records.items {
            if let Some((node, value)) = self.record_entry(record) {
                state.records.insert(node, value);
            }
        }
        for lease in &leases.items {
            if let Some((node, value)) = self.lease_entry(lease) {
                state.leases.insert(node, value);
            }
        }
        Ok(Snapshot {
            state,
            revision: parse_revision(&rv),
        })
    }

    fn record_entry(&self, record: &NetworkNode) -> Option<(String, Option<NodeRecord>)> {
        let name = record.name_any();
        let node = self.node_of(&name)?.to_owned();
        let value = match NodeRecord::try_from(&record.spec) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(record = name, error = e, "skipping corrupt node record");
                None
            }
        };
        Some((node, value))
    }

    fn lease_entry(&self, lease: &Lease) -> Option<(String, Option<Timestamp>)> {
        let name = lease.name_any();
        let node = self.node_of(&name)?.to_owned();
        Some((node, expiry(lease)))
    }
}

/// When a Lease expires: its last renewal (or acquisition) plus its duration.
fn expiry(lease: &Lease) -> Option<Timestamp> {
    let spec = lease.spec.as_ref()?;
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?;
    let secs = u64::try_from(spec.lease_duration_seconds?).ok()?;
    renewed.0.checked_add(Duration::from_secs(secs)).ok()
}

/// How long a Lease must be seen at one resourceVersion before it is pruned: two of its
/// durations (its holder renews it every third of one), or [`ORPHAN_AGE`] for a Lease
/// without a duration.
fn unrenewed_limit(lease: &Lease) -> Duration {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.lease_duration_seconds)
        .and_then(|d| u64::try_from(d).ok())
        .map_or(ORPHAN_AGE, |d| Duration::from_secs(d * 2))
}

/// What the pruner has seen, by key, at which version, and since when by its own monotonic
/// clock: a Lease at one resourceVersion, a record without a Lease. A key not seen in a
/// pass is forgotten at [`end_pass`](Self::end_pass), so one that comes back starts again
/// from zero.
#[derive(Debug, Default)]
struct Sightings {
    since: HashMap<String, (String, Instant)>,
    /// The keys seen in this pass.
    looked: HashSet<String>,
}

impl Sightings {
    /// Notes `key` at `version` (`now` starts its clock when it is new or changed); how long
    /// it has been seen at that version.
    fn note(&mut self, key: String, version: String, now: Instant) -> Duration {
        let since = match self.since.get(&key) {
            Some((v, since)) if *v == version => *since,
            _ => {
                self.since.insert(key.clone(), (version, now));
                now
            }
        };
        self.looked.insert(key);
        now.saturating_duration_since(since)
    }

    /// A Lease, by uid (a Lease deleted and created again is another), at its
    /// resourceVersion: how long it has been unrenewed.
    fn lease(&mut self, lease: &Lease, now: Instant) -> Duration {
        let meta = lease.meta();
        let key = format!(
            "lease {}",
            meta.uid.clone().unwrap_or_else(|| lease.name_any())
        );
        self.note(key, meta.resource_version.clone().unwrap_or_default(), now)
    }

    /// A record without a Lease, by uid: how long it has been without one.
    fn orphan(&mut self, record: &NetworkNode, now: Instant) -> Duration {
        let key = format!(
            "orphan {}",
            record
                .meta()
                .uid
                .clone()
                .unwrap_or_else(|| record.name_any())
        );
        self.note(key, String::new(), now)
    }

    /// Forgets every key not noted since the last pass.
    fn end_pass(&mut self) {
        let looked = std::mem::take(&mut self.looked);
        self.since.retain(|k, _| looked.contains(k));
    }
}

/// A resourceVersion as a revision (0 when it is not a number, which no server built on
/// etcd sends; 0 makes the next watch start with a fresh list).
fn parse_revision(rv: &str) -> Revision {
    rv.parse().unwrap_or(0)
}

/// TTL in whole seconds, rounded up, at least 1.
fn ttl_secs(ttl: Duration) -> i32 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i32::try_from(secs.max(1)).unwrap_or(i32::MAX)
}

/// Why a snapshot failed.
enum Listed {
    /// 410 Gone: the revision asked for is compacted.
    Gone,
    /// Anything else.
    Failed(StoreError),
}

impl Listed {
    fn from_api(apis: &Apis, e: kube::Error) -> Listed {
        match &e {
            kube::Error::Api(s) if s.code == 410 => Listed::Gone,
            _ => Listed::Failed(apis.error(e)),
        }
    }
}

impl From<StoreError> for Listed {
    fn from(e: StoreError) -> Self {
        Listed::Failed(e)
    }
}

impl From<Listed> for cni_core::Error {
    fn from(l: Listed) -> Self {
        match l {
            Listed::Gone => StoreError::Unavailable {
                endpoint: "Kubernetes API (node registry)".to_owned(),
                source: "410 Gone for a list without a resourceVersion".into(),
            }
            .into(),
            Listed::Failed(e) => e.into(),
        }
    }
}

/// What a reader knows of the registry's objects, by node.
#[derive(Debug, Default, Clone)]
struct State {
    /// The records (`None`: there, but corrupt).
    records: BTreeMap<String, Option<NodeRecord>>,
    /// The Leases' expiries (`None`: there, but never renewed).
    leases: BTreeMap<String, Option<Timestamp>>,
}

impl State {
    /// The live nodes at `now`.
    fn live(&self, now: Timestamp) -> BTreeMap<String, NodeRecord> {
        self.records
            .iter()
            .filter_map(|(node, record)| {
                let record = record.as_ref()?;
                let expires = self.leases.get(node).copied().flatten()?;
                (expires > now).then(|| (node.clone(), record.clone()))
            })
            .collect()
    }

    /// The next expiry after `now` of a Lease whose node has a record.
    fn next_expiry(&self, now: Timestamp) -> Option<Timestamp> {
        self.records
            .keys()
            .filter_map(|node| self.leases.get(node).copied().flatten())
            .filter(|e| *e > now)
            .min()
    }
}

struct Snapshot {
    state: State,
    revision: Revision,
}

/// A change of one kind seen by its watch.
#[derive(Debug)]
enum Change<V> {
    Put(String, V, Revision),
    Gone(String, Revision),
    /// Listed again after a 410: everything of the kind.
    Relisted(BTreeMap<String, V>, Revision),
}

#[async_trait]
impl NodeRegistry for KubeRegistry {
    async fn register(&self, node: &NodeRecord, ttl: Duration) -> cni_core::Result<()> {
        let name = self.object_name(&node.name)?;
        let ttl = ttl_secs(ttl);
        let spec = NetworkNodeSpec::from(node);
        let mut registrations = self.registrations.lock().await;
        if let Some(existing) = registrations.get(&node.name)
            && existing.ttl == ttl
            && !existing.task.is_finished()
        {
            let _writing = existing.writing.lock().await;
            self.apis.put_record(&name, &spec, false).await?;
            *existing.record.lock().unwrap_or_else(|p| p.into_inner()) = spec;
            return Ok(());
        }
        if let Some(old) = registrations.remove(&node.name) {
            let _writing = old.writing.lock().await;
            old.task.abort();
        }
        // The Lease first, then the record as a new write: a pruner that read the node's
        // objects before this (a node back after a long absence) cannot delete the record
        // any more, its precondition names the old resourceVersion.
        self.apis.renew_lease(&name, &node.name, ttl).await?;
        self.apis.put_record(&name, &spec, true).await?;
        let record = Arc::new(StdMutex::new(spec));
        let writing = Arc::new(tokio::sync::Mutex::new(()));
        let task = tokio::spawn(renew(
            self.apis.clone(),
            name,
            node.name.clone(),
            ttl,
            record.clone(),
            writing.clone(),
            self.shutdown.subscribe(),
        ));
        registrations.insert(
            node.name.clone(),
            Registration {
                ttl,
                record,
                writing,
                task,
            },
        );
        Ok(())
    }

    async fn deregister(&self, node: &str) -> cni_core::Result<()> {
        let name = self.object_name(node)?;
        let mut registrations = self.registrations.lock().await;
        let registration = registrations.remove(node);
        // Stop the renewals between two writes, so none writes the Lease back.
        let _writing = match &registration {
            Some(r) => Some(r.writing.lock().await),
            None => None,
        };
        if let Some(r) = &registration {
            r.task.abort();
        }
        Ok(self.apis.delete(&name).await?)
    }

    async fn list(&self) -> cni_core::Result<NodeList> {
        let snapshot = self.apis.snapshot(None).await?;
        Ok(NodeList {
            nodes: snapshot
                .state
                .live(Timestamp::now())
                .into_values()
                .collect(),
            revision: snapshot.revision,
        })
    }

    async fn watch(
        &self,
        revision: Revision,
    ) -> cni_core::Result<BoxStream<'static, cni_core::Result<NodeEvent>>> {
        // Read here, so a caller learns at once that the server is unreachable.
        let (snapshot, reset) = match revision {
            0 => (self.apis.snapshot(None).await?, true),
            at => match self.apis.snapshot(Some(at)).await {
                Ok(s) => (s, false),
                Err(Listed::Gone) => {
                    tracing::warn!(revision, "node registry revision is gone; listing again");
                    (self.apis.snapshot(None).await?, true)
                }
                Err(Listed::Failed(e)) => return Err(e.into()),
            },
        };
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let (records_tx, records_rx) = mpsc::channel(WATCH_BUFFER);
        let (leases_tx, leases_rx) = mpsc::channel(WATCH_BUFFER);
        let apis = self.apis.clone();
        let a = apis.clone();
        tokio::spawn(follow_kind(
            apis.records.clone(),
            apis.selector.clone(),
            snapshot.revision,
            move |r: &NetworkNode| a.record_entry(r),
            records_tx,
            self.shutdown.subscribe(),
        ));
        let a = apis.clone();
        tokio::spawn(follow_kind(
            apis.leases.clone(),
            apis.selector.clone(),
            snapshot.revision,
            move |l: &Lease| a.lease_entry(l),
            leases_tx,
            self.shutdown.subscribe(),
        ));
        tokio::spawn(merge(
            snapshot,
            reset,
            records_rx,
            leases_rx,
            tx,
            self.shutdown.subscribe(),
        ));
        Ok(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })
        .boxed())
    }

    async fn prune_expired(&self) -> cni_core::Result<Vec<String>> {
        Ok(self.apis.prune(&self.sightings, self.orphan_age).await?)
    }
}

/// Sleeps, or returns `false` at once if the registry is dropped meanwhile.
async fn pause(shutdown: &mut watch::Receiver<()>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shutdown.changed() => false,
    }
}

/// Renews one node's Lease every third of its TTL until aborted or the registry is dropped;
/// writes the record anew when the Lease had to be created again, and checks it every
/// [`RECORD_CHECK_EVERY`]th renewal.
async fn renew(
    apis: Apis,
    name: String,
    node: String,
    ttl: i32,
    record: Arc<StdMutex<NetworkNodeSpec>>,
    writing: Arc<tokio::sync::Mutex<()>>,
    mut shutdown: watch::Receiver<()>,
) {
    let interval = Duration::from_millis(u64::try_from(ttl).unwrap_or(1) * 1000 / 3);
    let mut wait = interval;
    let mut backoff = MIN_BACKOFF;
    let mut renewals: u32 = 0;
    let mut owe_fresh_record = false;
    loop {
        if !pause(&mut shutdown, wait).await {
            return;
        }
        let _writing = writing.lock().await;
        let renewed = match apis.renew_lease(&name, &node, ttl).await {
            Ok(created) => {
                renewals = renewals.wrapping_add(1);
                if created {
                    tracing::warn!(lease = name, "node lease was gone; created it again");
                    owe_fresh_record = true;
                }
                let spec = record.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if owe_fresh_record {
                    // Pruned while this node could not renew (or deleted by hand): the
                    // record again, as a new write (see `KubeRegistry`).
                    apis.put_record(&name, &spec, true)
                        .await
                        .map(|()| owe_fresh_record = false)
                } else if renewals.is_multiple_of(RECORD_CHECK_EVERY) {
                    // A record deleted by hand comes back.
                    apis.put_record(&name, &spec, false).await
                } else {
                    Ok(())
                }
            }
            Err(e) => Err(e),
        };
        match renewed {
            Ok(()) => {
                wait = interval;
                backoff = MIN_BACKOFF;
            }
            Err(e) => {
                tracing::warn!(lease = name, error = %e, "cannot renew the node lease; retrying");
                wait = backoff.min(interval);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Watches one kind from `revision` on, sending its changes as `entry` maps them; resumes
/// after a broken stream from the last resourceVersion seen, lists again after a 410 Gone.
async fn follow_kind<K, V>(
    api: Api<K>,
    selector: String,
    revision: Revision,
    entry: impl Fn(&K) -> Option<(String, V)> + Send + 'static,
    tx: mpsc::Sender<Change<V>>,
    mut shutdown: watch::Receiver<()>,
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
    V: Send + 'static,
{
    let kind = K::kind(&Default::default()).into_owned();
    let mut rv = revision.to_string();
    let mut backoff = MIN_BACKOFF;
    let params = WatchParams::default().labels(&selector).timeout(240);
    loop {
        if tx.is_closed() {
            return;
        }
        let gone = match api.watch(&params, &rv).await {
            Err(kube::Error::Api(s)) if s.code == 410 => true,
            Err(e) => {
                tracing::debug!(kind, error = %e, "cannot open the watch yet");
                if !pause(&mut shutdown, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            Ok(stream) => {
                futures::pin_mut!(stream);
                let mut gone = false;
                loop {
                    let item = tokio::select! {
                        item = stream.try_next() => item,
                        _ = shutdown.changed() => return,
                        _ = tx.closed() => return,
                    };
                    let event = match item {
                        Ok(Some(event)) => event,
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(kind, error = %e, "watch stream broke; resuming");
                            break;
                        }
                    };
                    backoff = MIN_BACKOFF;
                    let change = match event {
                        WatchEvent::Added(o) | WatchEvent::Modified(o) => {
                            rv = o.resource_version().unwrap_or(rv);
                            entry(&o).map(|(node, v)| Change::Put(node, v, parse_revision(&rv)))
                        }
                        WatchEvent::Deleted(o) => {
                            rv = o.resource_version().unwrap_or(rv);
                            entry(&o).map(|(node, _)| Change::Gone(node, parse_revision(&rv)))
                        }
                        WatchEvent::Bookmark(b) => {
                            rv = b.metadata.resource_version;
                            None
                        }
                        WatchEvent::Error(s) if s.code == 410 => {
                            gone = true;
                            break;
                        }
                        WatchEvent::Error(s) => {
                            tracing::warn!(kind, status = ?s, "watch error; resuming");
                            break;
                        }
                    };
                    if let Some(change) = change
                        && tx.send(change).await.is_err()
                    {
                        return;
                    }
                }
                gone
            }
        };
        if !gone {
            continue;
        }
        tracing::warn!(kind, rv, "watch answered 410 Gone; listing again");
        loop {
            let listed = api.list(&ListParams::default().labels(&selector)).await;
            match listed {
                Ok(list) => {
                    rv = list.metadata.resource_version.clone().unwrap_or_default();
                    let all = list.items.iter().filter_map(&entry).collect();
                    if tx
                        .send(Change::Relisted(all, parse_revision(&rv)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    break;
                }
                Err(e) => {
                    tracing::debug!(kind, error = %e, "cannot list again yet");
                    if !pause(&mut shutdown, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

fn apply<V>(map: &mut BTreeMap<String, V>, change: Change<V>, revision: &mut Revision) -> bool {
    match change {
        Change::Put(node, v, rv) => {
            *revision = (*revision).max(rv);
            map.insert(node, v);
            false
        }
        Change::Gone(node, rv) => {
            *revision = (*revision).max(rv);
            map.remove(&node);
            false
        }
        Change::Relisted(all, rv) => {
            *revision = (*revision).max(rv);
            *map = all;
            true
        }
    }
}

/// Combines the two kinds into the changes of the live set, with a timer for expiries.
async fn merge(
    snapshot: Snapshot,
    reset_first: bool,
    mut records: mpsc::Receiver<Change<Option<NodeRecord>>>,
    mut leases: mpsc::Receiver<Change<Option<Timestamp>>>,
    tx: mpsc::Sender<cni_core::Result<NodeEvent>>,
    mut shutdown: watch::Receiver<()>,
) {
    let Snapshot {
        mut state,
        mut revision,
    } = snapshot;
    let mut emitted = state.live(Timestamp::now());
    if reset_first
        && tx
            .send(Ok(NodeEvent::Reset(
                emitted.values().cloned().collect(),
                revision,
            )))
            .await
            .is_err()
    {
        return;
    }
    loop {
        let now = Timestamp::now();
        let timer = match state.next_expiry(now) {
            Some(at) => {
                let left = now.duration_until(at).unsigned_abs();
                tokio::time::sleep(left + EXPIRY_MARGIN)
            }
            None => tokio::time::sleep(Duration::from_secs(3600)),
        };
        let reset = tokio::select! {
            change = records.recv() => match change {
                Some(c) => apply(&mut state.records, c, &mut revision),
                None => return,
            },
            change = leases.recv() => match change {
                Some(c) => apply(&mut state.leases, c, &mut revision),
                None => return,
            },
            () = timer => false,
            _ = shutdown.changed() => return,
            () = tx.closed() => return,
        };
        let live = state.live(Timestamp::now());
        if reset {
            let event = NodeEvent::Reset(live.values().cloned().collect(), revision);
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        } else {
            for (node, record) in &live {
                if emitted.get(node) != Some(record)
                    && tx
                        .send(Ok(NodeEvent::Put(record.clone(), revision)))
                        .await
                        .is_err()
                {
                    return;
                }
            }
            for node in emitted.keys().filter(|n| !live.contains_key(*n)) {
                if tx
                    .send(Ok(NodeEvent::Delete(node.clone(), revision)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        emitted = live;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            address: "192.0.2.1".parse().unwrap(),
            prefix_len: 24,
            blocks: vec!["10.1.0.0/26".parse().unwrap()],
            backend: BTreeMap::new(),
        }
    }

    #[test]
    fn ttl_rounds_up() {
        assert_eq!(ttl_secs(Duration::from_millis(1)), 1);
        assert_eq!(ttl_secs(Duration::from_millis(2500)), 3);
        assert_eq!(ttl_secs(Duration::from_secs(20)), 20);
    }

    #[test]
    fn a_node_is_live_while_its_lease_is_ahead() {
        let now = Timestamp::now();
        let later = now.checked_add(Duration::from_secs(5)).unwrap();
        let earlier = now.checked_sub(Duration::from_secs(5)).unwrap();
        let mut state = State::default();
        for n in ["a", "b", "c", "d"] {
            state.records.insert(n.into(), Some(record(n)));
        }
        state.records.insert("corrupt".into(), None);
        state.leases.insert("a".into(), Some(later));
        state.leases.insert("b".into(), Some(earlier));
        state.leases.insert("c".into(), None);
        state.leases.insert("corrupt".into(), Some(later));
        state.leases.insert("lease-only".into(), Some(later));
        let live = state.live(now);
        assert_eq!(live.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(state.next_expiry(now), Some(later));
        assert_eq!(state.next_expiry(later), None);
    }

    #[test]
    fn a_lease_is_unrenewed_for_two_durations_by_the_pruners_clock() {
        let lease = |uid: &str, rv: &str, duration: Option<i32>| Lease {
            metadata: ObjectMeta {
                name: Some("cnikit.n".into()),
                uid: Some(uid.into()),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                lease_duration_seconds: duration,
                ..LeaseSpec::default()
            }),
        };
        assert_eq!(
            unrenewed_limit(&lease("u", "1", Some(10))),
            Duration::from_secs(20)
        );
        assert_eq!(unrenewed_limit(&lease("u", "1", None)), ORPHAN_AGE);

        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let mut seen = Sightings::default();
        // First seen: zero, whatever the Lease's own times say.
        assert_eq!(
            seen.lease(&lease("u", "1", Some(10)), at(0)),
            Duration::ZERO
        );
        assert_eq!(
            seen.lease(&lease("u", "1", Some(10)), at(15)),
            Duration::from_secs(15)
        );
        // Renewed (a new resourceVersion): the clock starts again.
        seen.lease(&lease("u", "2", Some(10)), at(16));
        assert_eq!(
            seen.lease(&lease("u", "2", Some(10)), at(30)),
            Duration::from_secs(14)
        );
        // Deleted and created again (a new uid): another Lease.
        assert_eq!(
            seen.lease(&lease("v", "2", Some(10)), at(30)),
            Duration::ZERO
        );
        // Not seen in a pass: forgotten, and new when it shows up again.
        seen.end_pass();
        seen.lease(&lease("v", "2", Some(10)), at(35));
        seen.end_pass();
        assert_eq!(
            seen.lease(&lease("u", "2", Some(10)), at(40)),
            Duration::ZERO
        );
        let mut orphan = NetworkNode::new("cnikit.n", NetworkNodeSpec::from(&record("n")));
        orphan.metadata.uid = Some("w".into());
        seen.orphan(&orphan, at(40));
        assert_eq!(seen.orphan(&orphan, at(100)), Duration::from_secs(60));
    }

    #[test]
    fn records_round_trip() {
        let mut r = record("n1");
        r.backend
            .insert("vtepMac".into(), "02:00:00:00:00:01".into());
        let spec = NetworkNodeSpec::from(&r);
        assert_eq!(NodeRecord::try_from(&spec).unwrap(), r);
        let bad = NetworkNodeSpec {
            address: "nope".into(),
            ..spec
        };
        assert!(NodeRecord::try_from(&bad).is_err());
    }
}
