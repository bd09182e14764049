//! [`StoreRegistry`]: a [`NodeRegistry`] over any [`Store`], for stores without leases or
//! watches (the local [`FileStore`](crate::store::FileStore) above all).
//!
//! # Keys
//!
//! | key | value |
//! |---|---|
//! | `<prefix>/registry/nodes/<name>` | `{"record": NodeRecord, "expiresAtMs": <unix ms>}` |
//! | `<prefix>/registry/epoch` | `{}`, rewritten by every deletion of a record |
//!
//! A record is live until its expiry time (wall clock, shared by the processes of a node);
//! [`register`](NodeRegistry::register) refreshes it in the background every third of its
//! TTL. The registry revision is the highest `mod_revision` under `<prefix>/registry/`;
//! since every deletion rewrites the epoch key, a watch can tell whether records were
//! deleted after a given revision.
//!
//! [`watch`](NodeRegistry::watch) polls (every 50 ms by default), and looks at once when the
//! store hints at a change ([`Store::change_hints`]: inotify for the file store, so a commit
//! reaches the watches of the node in a few milliseconds; the poll remains for what inotify
//! cannot see). One list per look, and records are compared by content, so refreshes are
//! not events. A record whose expiry
//! passes is reported as a [`NodeEvent::Delete`], and as a [`NodeEvent::Put`] again if it is
//! refreshed later.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{NodeEvent, NodeList, NodeRecord, NodeRegistry};
use crate::error::{Error, Result, StoreError};
use crate::store::{Compare, KeyValue, Revision, Store, Txn, TxnOutcome};

/// Default poll interval of [`watch`](NodeRegistry::watch).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// How many times a deletion is tried against concurrent writers.
const MAX_ATTEMPTS: u32 = 16;

/// A [`NodeRegistry`] kept in a [`Store`]. See the [module docs](self).
///
/// Dropping it stops its keep-alive tasks (records then expire) and ends its watches.
pub struct StoreRegistry<S> {
    shared: Arc<Shared<S>>,
    poll: Duration,
    keepalives: Mutex<HashMap<String, KeepAlive>>,
    /// Dropped with the registry, which ends every watch stream.
    shutdown: watch::Sender<()>,
}

struct Shared<S> {
    store: S,
    nodes_prefix: String,
    registry_prefix: String,
    epoch_key: String,
}

struct KeepAlive {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The stored form of a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Stored {
    record: NodeRecord,
    expires_at_ms: u64,
}

impl<S> std::fmt::Debug for StoreRegistry<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreRegistry")
            .field("prefix", &self.shared.registry_prefix)
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

impl<S: Store + 'static> StoreRegistry<S> {
    /// A registry under the default key prefix `/cnikit`.
    pub fn new(store: S) -> Self {
        StoreRegistry::with_prefix(store, crate::ipam::block::DEFAULT_KEY_PREFIX)
    }

    /// A registry under `<key_prefix>/registry/`.
    pub fn with_prefix(store: S, key_prefix: &str) -> Self {
        let registry_prefix = format!("{key_prefix}/registry/");
        StoreRegistry {
            shared: Arc::new(Shared {
                store,
                nodes_prefix: format!("{registry_prefix}nodes/"),
                epoch_key: format!("{registry_prefix}epoch"),
                registry_prefix,
            }),
            poll: DEFAULT_POLL_INTERVAL,
            keepalives: Mutex::new(HashMap::new()),
            shutdown: watch::Sender::new(()),
        }
    }

    /// Sets the poll interval of watches (default 50 ms).
    pub fn with_poll_interval(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    fn keepalives(&self) -> std::sync::MutexGuard<'_, HashMap<String, KeepAlive>> {
        // The map is only inserted into and removed from: a panic cannot leave it broken.
        self.keepalives.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops refreshing `name`, waiting for a refresh under way so it cannot land later.
    async fn stop_keepalive(&self, name: &str) {
        let keepalive = self.keepalives().remove(name);
        if let Some(k) = keepalive {
            let _ = k.stop.send(true);
            if let Err(e) = k.task.await
                && e.is_panic()
            {
                tracing::warn!(node = name, "keep-alive task panicked");
            }
        }
    }
}

impl<S> Drop for StoreRegistry<S> {
    fn drop(&mut self) {
        let keepalives =
            std::mem::take(self.keepalives.get_mut().unwrap_or_else(|p| p.into_inner()));
        for (_, k) in keepalives {
            k.task.abort();
        }
    }
}

impl<S: Store> Shared<S> {
    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.nodes_prefix)
    }

    async fn put(&self, record: &NodeRecord, ttl: Duration) -> Result<(), StoreError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let stored = Stored {
            record: record.clone(),
            expires_at_ms: now_ms().saturating_add(ttl_ms),
        };
        // A plain struct of strings and numbers: serialization cannot fail.
        let value = serde_json::to_vec(&stored).unwrap_or_default();
        self.store
            .commit(Txn::new().put(self.key(&record.name), value))
            .await?;
        Ok(())
    }

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let kvs = self.store.list(&self.registry_prefix).await?;
        let mut snapshot = Snapshot::default();
        for kv in kvs {
            snapshot.revision = snapshot.revision.max(kv.mod_revision);
            if kv.key == self.epoch_key {
                snapshot.epoch = kv.mod_revision;
            } else if kv.key.starts_with(&self.nodes_prefix) {
                let stored: Stored =
                    serde_json::from_slice(&kv.value).map_err(|source| StoreError::Corrupt {
                        key: kv.key.clone(),
                        source,
                    })?;
                snapshot.nodes.push((stored, kv));
            }
        }
        Ok(snapshot)
    }
}

/// One read of the registry.
#[derive(Debug, Default)]
struct Snapshot {
    /// Highest revision under the registry prefix.
    revision: Revision,
    /// Revision of the last deletion.
    epoch: Revision,
    nodes: Vec<(Stored, KeyValue)>,
}

impl Snapshot {
    /// Records live at `now`, by name, with the revision that wrote them.
    fn live(&self, now: u64) -> BTreeMap<String, (NodeRecord, Revision)> {
        self.nodes
            .iter()
            .filter(|(s, _)| s.expires_at_ms > now)
            .map(|(s, kv)| (s.record.name.clone(), (s.record.clone(), kv.mod_revision)))
            .collect()
    }

    /// When the first live record expires.
    fn next_expiry(&self, now: u64) -> Option<u64> {
        self.nodes
            .iter()
            .map(|(s, _)| s.expires_at_ms)
            .filter(|e| *e > now)
            .min()
    }
}

fn now_ms() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

/// The state of one watch stream.
struct Watcher<S> {
    shared: Arc<Shared<S>>,
    poll: Duration,
    shutdown: watch::Receiver<()>,
    /// What the consumer believes is live.
    known: BTreeMap<String, NodeRecord>,
    pending: VecDeque<NodeEvent>,
    /// Registry revision of the last poll.
    revision: Revision,
    /// Expiry of the first live record at the last poll.
    next_expiry: Option<u64>,
    /// Wake-ups from the store, when it gives them.
    hints: Option<BoxStream<'static, ()>>,
}

/// Why a watch looks at the store again.
enum Wake {
    /// The poll interval passed, or the store hinted at a change.
    Look,
    /// The store's hints ended: poll only from now on.
    HintsEnded,
    /// The registry was dropped.
    Closed,
}

impl<S: Store> Watcher<S> {
    /// Turns a snapshot into events: puts for new or changed records, deletes for records
    /// gone or expired.
    fn diff(&mut self, snapshot: &Snapshot) {
        let now = now_ms();
        let live = snapshot.live(now);
        for (name, (record, rev)) in &live {
            if self.known.get(name) != Some(record) {
                self.known.insert(name.clone(), record.clone());
                self.pending.push_back(NodeEvent::Put(record.clone(), *rev));
            }
        }
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|n| !live.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            self.known.remove(&name);
            self.pending
                .push_back(NodeEvent::Delete(name, snapshot.revision));
        }
        self.revision = snapshot.revision;
        self.next_expiry = snapshot.next_expiry(now);
    }

    async fn poll(&mut self) -> Result<(), StoreError> {
        let snapshot = self.shared.snapshot().await?;
        let expired = self.next_expiry.is_some_and(|e| e <= now_ms());
        if snapshot.revision != self.revision || expired {
            self.diff(&snapshot);
        }
        Ok(())
    }

    /// The next event; `None` once the registry is dropped.
    async fn next(&mut self) -> Option<Result<NodeEvent>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(event));
            }
            let hints = &mut self.hints;
            let hint = async {
                let Some(hints) = hints.as_mut() else {
                    return std::future::pending().await;
                };
                let hint = hints.next().await;
                // One look for a burst of commits (parallel ADDs) that are all in already.
                while let Some(Some(())) = hints.next().now_or_never() {}
                hint
            };
            let wake = tokio::select! {
                () = tokio::time::sleep(self.poll) => Wake::Look,
                hint = hint => match hint {
                    Some(()) => Wake::Look,
                    None => Wake::HintsEnded,
                },
                closed = self.shutdown.changed() => match closed {
                    Ok(()) => Wake::Look,
                    Err(_) => Wake::Closed,
                },
            };
            match wake {
                Wake::Look => {}
                Wake::HintsEnded => {
                    self.hints = None;
                    continue;
                }
                Wake::Closed => return None,
            }
            if let Err(e) = self.poll().await {
                return Some(Err(e.into()));
            }
        }
    }
}

#[async_trait]
impl<S: Store + 'static> NodeRegistry for StoreRegistry<S> {
    /// Errors: 7 for an empty or `/`-containing name or a zero TTL, 11 or 5 from the store.
    async fn register(&self, node: &NodeRecord, ttl: Duration) -> Result<()> {
        crate::ipam::block::check_segment("name", "node name", &node.name)?;
        if ttl.is_zero() {
            return Err(Error::invalid_config("ttl", "the registration TTL is zero"));
        }
        self.stop_keepalive(&node.name).await;
        self.shared.put(node, ttl).await?;
        let (stop, mut stopped) = watch::channel(false);
        let shared = Arc::clone(&self.shared);
        let record = node.clone();
        let interval = ttl / 3;
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(interval) => {}
                    _ = stopped.changed() => return,
                }
                if let Err(e) = shared.put(&record, ttl).await {
                    tracing::warn!(node = %record.name, error = %e, "refreshing the node record failed");
                }
            }
        });
        let replaced = self
            .keepalives()
            .insert(node.name.clone(), KeepAlive { stop, task });
        // A concurrent registration of the same name: this one's task refreshes from now on.
        if let Some(old) = replaced {
            old.task.abort();
        }
        Ok(())
    }

    async fn deregister(&self, name: &str) -> Result<()> {
        crate::ipam::block::check_segment("name", "node name", name)?;
        self.stop_keepalive(name).await;
        let key = self.shared.key(name);
        for _ in 0..MAX_ATTEMPTS {
            let Some(kv) = self.shared.store.get(&key).await? else {
                return Ok(());
            };
            let txn = Txn::new()
                .when(Compare::ModRevision(key.clone(), kv.mod_revision))
                .delete(key.clone())
                .put(self.shared.epoch_key.clone(), "{}");
            if let TxnOutcome::Committed(_) = self.shared.store.commit(txn).await? {
                return Ok(());
            }
        }
        Err(StoreError::Conflict {
            what: key,
            attempts: MAX_ATTEMPTS,
        }
        .into())
    }

    async fn list(&self) -> Result<NodeList> {
        let snapshot = self.shared.snapshot().await?;
        Ok(NodeList {
            nodes: snapshot
                .live(now_ms())
                .into_values()
                .map(|(record, _)| record)
                .collect(),
            revision: snapshot.revision,
        })
    }

    async fn watch(&self, revision: Revision) -> Result<BoxStream<'static, Result<NodeEvent>>> {
        let snapshot = self.shared.snapshot().await?;
        let mut watcher = Watcher {
            shared: Arc::clone(&self.shared),
            poll: self.poll,
            shutdown: self.shutdown.subscribe(),
            known: BTreeMap::new(),
            pending: VecDeque::new(),
            revision: snapshot.revision,
            next_expiry: None,
            // After the snapshot, which made the file store's directory if it was missing.
            hints: self.shared.store.change_hints(),
        };
        if snapshot.epoch > revision || revision > snapshot.revision {
            // Records were deleted after `revision` (we cannot tell which), or the revision
            // is not one of this registry's: start over from a full list.
            let now = now_ms();
            let live = snapshot.live(now);
            watcher.known = live
                .iter()
                .map(|(n, (r, _))| (n.clone(), r.clone()))
                .collect();
            watcher.next_expiry = snapshot.next_expiry(now);
            watcher.pending.push_back(NodeEvent::Reset(
                live.into_values().map(|(r, _)| r).collect(),
                snapshot.revision,
            ));
        } else {
            // The consumer saw every record written up to `revision` (expired ones
            // included, so that their expiry is reported); newer writes are puts.
            watcher.known = snapshot
                .nodes
                .iter()
                .filter(|(_, kv)| kv.mod_revision <= revision)
                .map(|(s, _)| (s.record.name.clone(), s.record.clone()))
                .collect();
            watcher.diff(&snapshot);
        }
        let stream = futures::stream::unfold(watcher, |mut w| async move {
            let event = w.next().await?;
            Some((event, w))
        });
        Ok(stream.boxed())
    }

    /// Deletes the records whose expiry has passed, in one transaction that compares each
    /// (a record refreshed meanwhile fails it: the next run looks again); returns their
    /// names. Watches report them as deleted when they expire, whether or not this runs; a
    /// node still refreshing puts its record back at its next refresh.
    async fn prune_expired(&self) -> Result<Vec<String>> {
        let snapshot = self.shared.snapshot().await?;
        let now = now_ms();
        let mut txn = Txn::new();
        let mut names = Vec::new();
        for (stored, kv) in &snapshot.nodes {
            if stored.expires_at_ms <= now {
                txn = txn
                    .when(Compare::ModRevision(kv.key.clone(), kv.mod_revision))
                    .delete(kv.key.clone());
                names.push(stored.record.name.clone());
            }
        }
        if names.is_empty() {
            return Ok(names);
        }
        match self
            .shared
            .store
            .commit(txn.put(self.shared.epoch_key.clone(), "{}"))
            .await?
        {
            TxnOutcome::Committed(_) => Ok(names),
            // Refreshed meanwhile: they are not dead after all; the next run looks again.
            TxnOutcome::Failed(_) => Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use futures::stream::BoxStream;

    use super::*;
    use crate::store::{FileStore, MemoryStore};

    fn record(name: &str, last_octet: u8) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            address: IpAddr::from([192, 0, 2, last_octet]),
            prefix_len: 24,
            blocks: vec!["10.244.0.0/26".parse().unwrap()],
            backend: BTreeMap::new(),
        }
    }

    /// The next event, failing the test if none comes within `within`.
    async fn next_event(
        stream: &mut BoxStream<'static, Result<NodeEvent>>,
        within: Duration,
    ) -> NodeEvent {
        tokio::time::timeout(within, stream.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on")
            .expect("no error")
    }

    fn file_registry(dir: &std::path::Path) -> StoreRegistry<FileStore> {
        StoreRegistry::new(FileStore::new(dir)).with_poll_interval(Duration::from_millis(10))
    }

    #[tokio::test]
    async fn register_list_watch_deregister_on_the_file_store() {
        let dir = tempfile::tempdir().unwrap();
        let a = file_registry(dir.path());
        let observer = file_registry(dir.path());
        a.register(&record("n1", 1), Duration::from_secs(30))
            .await
            .unwrap();
        let list = observer.list().await.unwrap();
        assert_eq!(list.nodes, vec![record("n1", 1)]);
        let mut events = observer.watch(list.revision).await.unwrap();

        a.register(&record("n2", 2), Duration::from_secs(30))
            .await
            .unwrap();
        match next_event(&mut events, Duration::from_secs(5)).await {
            NodeEvent::Put(r, rev) => {
                assert_eq!(r, record("n2", 2));
                assert!(rev > list.revision);
            }
            other => panic!("{other:?}"),
        }
        // A changed record is a put; registering it again unchanged is not an event.
        let mut moved = record("n1", 1);
        moved.blocks.push("10.244.0.64/26".parse().unwrap());
        a.register(&moved, Duration::from_secs(30)).await.unwrap();
        a.register(&moved, Duration::from_secs(30)).await.unwrap();
        let n1_rev = observer
            .shared
            .store
            .get("/cnikit/registry/nodes/n1")
            .await
            .unwrap()
            .expect("stored")
            .mod_revision;
        match next_event(&mut events, Duration::from_secs(5)).await {
            NodeEvent::Put(r, rev) => {
                assert_eq!(r, moved);
                assert!(list.revision < rev && rev <= n1_rev, "{rev}");
            }
            other => panic!("{other:?}"),
        }
        a.deregister("n2").await.unwrap();
        a.deregister("n2")
            .await
            .expect("deregistering twice is fine");
        match next_event(&mut events, Duration::from_secs(5)).await {
            NodeEvent::Delete(name, _) => assert_eq!(name, "n2"),
            other => panic!("{other:?}"),
        }
        assert_eq!(observer.list().await.unwrap().nodes, vec![moved]);
    }

    #[tokio::test]
    async fn a_file_store_watch_wakes_on_a_commit_before_its_poll() {
        let dir = tempfile::tempdir().unwrap();
        let writer = file_registry(dir.path());
        writer
            .register(&record("n1", 1), Duration::from_secs(30))
            .await
            .unwrap();
        if FileStore::new(dir.path()).change_hints().is_none() {
            testkit::skip(
                "a_file_store_watch_wakes_on_a_commit_before_its_poll",
                "no inotify on this file system",
            );
            return;
        }
        // A poll far beyond the test's patience: only the store's hints can wake the watch.
        let observer = StoreRegistry::new(FileStore::new(dir.path()))
            .with_poll_interval(Duration::from_secs(3600));
        let start = observer.list().await.unwrap();
        let mut events = observer.watch(start.revision).await.unwrap();
        writer
            .register(&record("n2", 2), Duration::from_secs(30))
            .await
            .unwrap();
        match next_event(&mut events, Duration::from_secs(5)).await {
            NodeEvent::Put(r, _) => assert_eq!(r, record("n2", 2)),
            other => panic!("{other:?}"),
        }
        writer.deregister("n1").await.unwrap();
        match next_event(&mut events, Duration::from_secs(5)).await {
            NodeEvent::Delete(name, _) => assert_eq!(name, "n1"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_unrefreshed_record_expires_and_watches_see_a_delete() {
        let dir = tempfile::tempdir().unwrap();
        let observer = file_registry(dir.path());
        let start = observer.list().await.unwrap();
        let mut events = observer.watch(start.revision).await.unwrap();
        {
            let crashed = file_registry(dir.path());
            crashed
                .register(&record("gone", 9), Duration::from_millis(150))
                .await
                .unwrap();
            // Dropped without deregistering, like a node that dies: no more refreshes.
        }
        assert_eq!(
            next_event(&mut events, Duration::from_secs(5)).await,
            NodeEvent::Put(record("gone", 9), 1)
        );
        match next_event(&mut events, Duration::from_secs(5)).await {
            NodeEvent::Delete(name, _) => assert_eq!(name, "gone"),
            other => panic!("{other:?}"),
        }
        assert!(observer.list().await.unwrap().nodes.is_empty());
        assert_eq!(observer.prune_expired().await.unwrap(), vec!["gone"]);
        assert!(
            observer
                .shared
                .store
                .list("/cnikit/registry/nodes/")
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn keep_alive_outlives_the_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let reg = file_registry(dir.path());
        reg.register(&record("alive", 3), Duration::from_millis(120))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(reg.list().await.unwrap().nodes, vec![record("alive", 3)]);
        reg.deregister("alive").await.unwrap();
        // The stopped keep-alive does not bring it back.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(reg.list().await.unwrap().nodes.is_empty());
    }

    #[tokio::test]
    async fn a_watch_from_before_a_deletion_starts_with_a_reset() {
        let store = Arc::new(MemoryStore::new());
        let reg = StoreRegistry::new(Arc::clone(&store));
        reg.register(&record("a", 1), Duration::from_secs(30))
            .await
            .unwrap();
        reg.register(&record("b", 2), Duration::from_secs(30))
            .await
            .unwrap();
        let old = reg.list().await.unwrap();
        reg.deregister("a").await.unwrap();
        let mut events = reg.watch(old.revision).await.unwrap();
        let now = reg.list().await.unwrap();
        assert_eq!(
            next_event(&mut events, Duration::from_secs(5)).await,
            NodeEvent::Reset(vec![record("b", 2)], now.revision)
        );
        // From the current revision there is nothing to tell.
        let mut quiet = reg.watch(now.revision).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(150), quiet.next())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn watches_end_when_the_registry_is_dropped() {
        let reg = StoreRegistry::new(MemoryStore::new());
        let mut events = reg.watch(0).await.unwrap();
        drop(reg);
        let end = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("ends in time");
        assert!(end.is_none());
    }

    #[tokio::test]
    async fn bad_names_and_ttls_are_code_7() {
        let reg = StoreRegistry::new(MemoryStore::new());
        let err = reg
            .register(&record("a/b", 1), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(err.code().0, 7);
        let err = reg
            .register(&record("a", 1), Duration::ZERO)
            .await
            .unwrap_err();
        assert_eq!(err.code().0, 7);
        assert!(reg.list().await.unwrap().nodes.is_empty());
    }
}
