//! [`EtcdRegistry`]: node records bound to etcd leases, and a watch that survives restarts
//! and compaction.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cni_core::registry::{NodeEvent, NodeList, NodeRecord, NodeRegistry};
use cni_core::store::Revision;
use etcd_client::{EventType, PutOptions, WatchOptions, WatchStream};
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::store::{list_prefix, revision};

/// First pause after a failure of a background stream; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between attempts to reach etcd again.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Events buffered for a slow watch consumer before the watch waits for it.
const WATCH_BUFFER: usize = 256;

/// The cnikit [`NodeRegistry`] on etcd.
///
/// A node's record is JSON at `<prefix>/registry/nodes/<name>`, attached to an etcd lease of
/// the registration's TTL (whole seconds, at least etcd's minimum, about 2 s). A background task
/// keeps the lease alive every third of the TTL; when etcd says the lease is gone (expired
/// during a long partition, or lost with etcd's data) it grants a new one and writes the
/// record again. Dropping the registry stops the keep-alive without revoking: the record then
/// disappears when the lease expires, as it does when the node dies.
///
/// [`watch`](NodeRegistry::watch) follows the records from a revision on, reconnects after a
/// disconnect or an etcd restart from the last revision it delivered (so no event is lost),
/// and yields [`NodeEvent::Reset`] with a fresh list when that revision was compacted away.
/// A record that does not decode is an `Err` item (code 5) and the watch goes on;
/// [`list`](NodeRegistry::list) leaves such a record out (with a warning) rather than fail
/// for every node.
///
/// [`deregister`](NodeRegistry::deregister) deletes the record by name (also one written by
/// an earlier run) and revokes the lease it keeps alive. Errors: 7 for a node name that is
/// empty, longer than 253 characters or holds `/`; 11 when etcd is unreachable (a watch is
/// opened before `watch` returns, so that is reported at once).
pub struct EtcdRegistry {
    conn: Connection,
    /// `<prefix>/registry/nodes/`.
    nodes: String,
    registrations: tokio::sync::Mutex<HashMap<String, Registration>>,
    /// Dropped with the registry, which ends every background task.
    shutdown: watch::Sender<()>,
}

impl std::fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRegistry")
            .field("conn", &self.conn)
            .field("nodes", &self.nodes)
            .finish_non_exhaustive()
    }
}

/// One node this registry keeps alive.
struct Registration {
    lease: Arc<Lease>,
    ttl: i64,
    task: JoinHandle<()>,
}

/// What the keep-alive task and `register` share about one registration.
struct Lease {
    /// The current lease id (changes when the lease is lost and granted again).
    id: AtomicI64,
    /// The record's JSON, written again with every new lease.
    value: StdMutex<Vec<u8>>,
    /// Held while the record is written or the lease replaced, so `register` and the
    /// keep-alive task never replace the lease at once (which could leave the record on a
    /// lease nobody keeps alive).
    write: tokio::sync::Mutex<()>,
}

impl Lease {
    fn value(&self) -> Vec<u8> {
        // A poisoned lock only means a panic elsewhere while copying bytes; the bytes are whole.
        match self.value.lock() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set_value(&self, value: Vec<u8>) {
        match self.value.lock() {
            Ok(mut v) => *v = value,
            Err(poisoned) => *poisoned.into_inner() = value,
        }
    }
}

impl Drop for EtcdRegistry {
    fn drop(&mut self) {
        for (_, registration) in self.registrations.get_mut().drain() {
            registration.task.abort();
        }
    }
}

impl EtcdRegistry {
    /// Connects as [`Connection::connect`] does; records live under the configured prefix.
    pub async fn connect(config: &Config) -> Result<Self> {
        Ok(EtcdRegistry::new(Connection::connect(config).await?))
    }

    /// A registry on an existing connection, under its prefix.
    pub fn new(conn: Connection) -> Self {
        let nodes = format!("{}/registry/nodes/", conn.prefix());
        EtcdRegistry {
            conn,
            nodes,
            registrations: tokio::sync::Mutex::new(HashMap::new()),
            shutdown: watch::channel(()).0,
        }
    }

    /// The connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The key of a node's record.
    pub fn key_of(&self, name: &str) -> String {
        format!("{}{name}", self.nodes)
    }

    /// Grants a lease and writes the record on it; revokes the lease again if the write fails.
    async fn grant_and_put(&self, key: &str, value: Vec<u8>, ttl: i64) -> Result<(i64, i64)> {
        let (id, granted) = grant(&self.conn, ttl).await?;
        if let Err(e) = put(&self.conn, key, value, id).await {
            // Best effort: an unrevoked lease expires on its own after the TTL.
            let _ = revoke(&self.conn, id).await;
            return Err(e);
        }
        Ok((id, granted))
    }
}

impl EtcdRegistry {
    /// Records a registration whose record is written on lease `id`, and keeps it alive.
    #[allow(clippy::too_many_arguments)]
    fn spawn_keep_alive(
        &self,
        registrations: &mut HashMap<String, Registration>,
        node: &NodeRecord,
        key: String,
        value: Vec<u8>,
        id: i64,
        ttl: i64,
        granted: i64,
    ) {
        let lease = Arc::new(Lease {
            id: AtomicI64::new(id),
            value: StdMutex::new(value),
            write: tokio::sync::Mutex::new(()),
        });
        let task = tokio::spawn(keep_alive(
            self.conn.clone(),
            key,
            lease.clone(),
            granted.max(ttl),
            self.shutdown.subscribe(),
        ));
        registrations.insert(node.name.clone(), Registration { lease, ttl, task });
    }
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name.len() > 253 {
        return Err(Error::config(
            "node.name",
            format!("{name:?} must be 1 to 253 characters without /"),
        ));
    }
    Ok(())
}

/// TTL in whole seconds, rounded up, at least 1.
fn ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

async fn grant(conn: &Connection, ttl: i64) -> Result<(i64, i64)> {
    let mut lease = conn.client().lease_client();
    let resp = conn.call("lease grant", lease.grant(ttl, None)).await?;
    Ok((resp.id(), resp.ttl()))
}

async fn put(conn: &Connection, key: &str, value: Vec<u8>, lease: i64) -> Result<()> {
    let mut kv = conn.client().kv_client();
    let options = PutOptions::new().with_lease(lease);
    conn.call("put node record", kv.put(key, value, Some(options)))
        .await
        .map(drop)
}

async fn revoke(conn: &Connection, id: i64) -> Result<()> {
    let mut lease = conn.client().lease_client();
    match conn.call("lease revoke", lease.revoke(id)).await {
        Err(e) if e.is_lease_not_found() => Ok(()),
        other => other.map(drop),
    }
}

/// Sleeps, or returns `false` at once if the registry is dropped meanwhile.
async fn pause(shutdown: &mut watch::Receiver<()>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shutdown.changed() => false,
    }
}

fn next_backoff(d: Duration) -> Duration {
    (d * 2).min(MAX_BACKOFF)
}

/// Keeps one lease alive until aborted or the registry is dropped; grants a new lease and
/// writes the record again when etcd has lost the old one.
async fn keep_alive(
    conn: Connection,
    key: String,
    lease: Arc<Lease>,
    ttl: i64,
    mut shutdown: watch::Receiver<()>,
) {
    // A third of the TTL leaves two tries before the lease expires.
    let interval = Duration::from_millis(u64::try_from(ttl).unwrap_or(1) * 1000 / 3);
    let retry_cap = interval.min(MAX_BACKOFF);
    let mut backoff = MIN_BACKOFF;
    // The lease etcd said is gone, if it did.
    let mut lost: Option<i64> = None;
    loop {
        if let Some(gone) = lost {
            if replace_lease(&conn, &key, &lease, gone, ttl).await {
                lost = None;
                backoff = MIN_BACKOFF;
            } else {
                if !pause(&mut shutdown, backoff).await {
                    return;
                }
                backoff = next_backoff(backoff).min(retry_cap);
                continue;
            }
        }
        let id = lease.id.load(Ordering::Relaxed);
        let mut client = conn.client().lease_client();
        let (mut keeper, mut stream) =
            match conn.call("lease keep-alive", client.keep_alive(id)).await {
                Ok(pair) => pair,
                Err(e) if lease_gone(&e) => {
                    tracing::warn!(key, lease = id, "lease lost; granting a new one");
                    lost = Some(id);
                    continue;
                }
                Err(e) => {
                    tracing::debug!(key, error = %e, "keep-alive stream failed; retrying");
                    if !pause(&mut shutdown, backoff).await {
                        return;
                    }
                    backoff = next_backoff(backoff).min(retry_cap);
                    continue;
                }
            };
        backoff = MIN_BACKOFF;
        // The opening answered the first keep-alive; now one every interval.
        loop {
            if !pause(&mut shutdown, interval).await {
                return;
            }
            if lease.id.load(Ordering::Relaxed) != id {
                // `register` replaced the lease: keep the new one alive.
                break;
            }
            conn.count();
            if keeper.keep_alive().await.is_err() {
                break;
            }
            match tokio::time::timeout(conn.timeout(), stream.message()).await {
                Ok(Ok(Some(resp))) if resp.ttl() > 0 => {}
                Ok(Ok(Some(_))) => {
                    tracing::warn!(key, lease = id, "lease expired; granting a new one");
                    lost = Some(id);
                    break;
                }
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                    tracing::debug!(key, "keep-alive stream broke; reopening");
                    break;
                }
            }
        }
    }
}

/// Grants a new lease and writes the record on it, unless someone already replaced the lost
/// one. `false` when etcd could not be reached (try again later).
async fn replace_lease(conn: &Connection, key: &str, lease: &Lease, gone: i64, ttl: i64) -> bool {
    let _writing = lease.write.lock().await;
    if lease.id.load(Ordering::Relaxed) != gone {
        return true;
    }
    let id = match grant(conn, ttl).await {
        Ok((id, _)) => id,
        Err(e) => {
            tracing::warn!(key, error = %e, "cannot grant a new lease");
            return false;
        }
    };
    match put(conn, key, lease.value(), id).await {
        Ok(()) => {
            tracing::info!(key, lease = id, "node record written again on a new lease");
            lease.id.store(id, Ordering::Relaxed);
            true
        }
        Err(e) => {
            let _ = revoke(conn, id).await;
            tracing::warn!(key, error = %e, "cannot write the node record again");
            false
        }
    }
}

/// Whether opening a keep-alive failed because etcd no longer knows the lease.
fn lease_gone(e: &Error) -> bool {
    e.is_lease_not_found()
        || matches!(e, Error::Unavailable { reason, .. } if reason.contains("lease not found"))
}

#[async_trait]
impl NodeRegistry for EtcdRegistry {
    async fn register(&self, node: &NodeRecord, ttl: Duration) -> cni_core::Result<()> {
        check_name(&node.name)?;
        let ttl = ttl_secs(ttl);
        let key = self.key_of(&node.name);
        let value = serde_json::to_vec(node).map_err(|e| cni_core::Error::Decode {
            what: "node record",
            source: e,
        })?;
        let mut registrations = self.registrations.lock().await;
        if let Some(existing) = registrations.get(&node.name)
            && existing.ttl == ttl
            && !existing.task.is_finished()
        {
            // Same lease: write the new record on it; the keep-alive task carries on.
            let lease = existing.lease.clone();
            let _writing = lease.write.lock().await;
            lease.set_value(value.clone());
            let id = lease.id.load(Ordering::Relaxed);
            match put(&self.conn, &key, value.clone(), id).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_lease_not_found() => {
                    let (id, _) = self.grant_and_put(&key, value, ttl).await?;
                    lease.id.store(id, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Another TTL: move the record to a new lease, then revoke the old one (which no
        // longer holds it, so watchers see no Delete). If that fails, the old registration
        // carries on.
        if let Some(old) = registrations.get(&node.name) {
            let old_lease = old.lease.clone();
            let _writing = old_lease.write.lock().await;
            let (id, granted) = self.grant_and_put(&key, value.clone(), ttl).await?;
            if let Some(old) = registrations.remove(&node.name) {
                old.task.abort();
            }
            let _ = revoke(&self.conn, old_lease.id.load(Ordering::Relaxed)).await;
            self.spawn_keep_alive(&mut registrations, node, key, value, id, ttl, granted);
            return Ok(());
        }
        let (id, granted) = self.grant_and_put(&key, value.clone(), ttl).await?;
        self.spawn_keep_alive(&mut registrations, node, key, value, id, ttl, granted);
        Ok(())
    }

    async fn deregister(&self, name: &str) -> cni_core::Result<()> {
        check_name(name)?;
        let mut registrations = self.registrations.lock().await;
        let registration = registrations.remove(name);
        // Stop the keep-alive between two writes, so it cannot write the record back.
        let _writing = match &registration {
            Some(r) => Some(r.lease.write.lock().await),
            None => None,
        };
        if let Some(r) = &registration {
            r.task.abort();
        }
        let lease = registration
            .as_ref()
            .map(|r| r.lease.id.load(Ordering::Relaxed));
        // The key may have been written by an earlier run of this node: delete it by name.
        let mut kv = self.conn.client().kv_client();
        self.conn
            .call("delete node record", kv.delete(self.key_of(name), None))
            .await
            .map_err(cni_core::Error::from)?;
        if let Some(id) = lease {
            revoke(&self.conn, id).await?;
        }
        Ok(())
    }

    async fn list(&self) -> cni_core::Result<NodeList> {
        Ok(list_nodes(&self.conn, &self.nodes).await?)
    }

    async fn watch(
        &self,
        revision: Revision,
    ) -> cni_core::Result<BoxStream<'static, cni_core::Result<NodeEvent>>> {
        // Opened here, so a caller learns at once that etcd is unreachable.
        let first = open_watch(&self.conn, &self.nodes, revision + 1).await?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(follow(
            self.conn.clone(),
            self.nodes.clone(),
            revision + 1,
            first,
            tx,
            self.shutdown.subscribe(),
        ));
        Ok(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })
        .boxed())
    }
}

/// Reads every record; corrupt ones are logged and left out, so one bad record does not hide
/// every other node.
async fn list_nodes(conn: &Connection, nodes: &str) -> Result<NodeList> {
    let (kvs, revision) = list_prefix(conn, nodes).await?;
    let mut list = NodeList {
        nodes: Vec::with_capacity(kvs.len()),
        revision,
    };
    for kv in kvs {
        match serde_json::from_slice::<NodeRecord>(&kv.value) {
            Ok(record) => list.nodes.push(record),
            Err(e) => tracing::warn!(key = kv.key, error = %e, "skipping corrupt node record"),
        }
    }
    list.nodes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(list)
}

/// A watch etcd acknowledged, or the compacted revision that keeps it from starting.
type Opened = std::result::Result<WatchStream, i64>;

/// Opens a watch on the records from revision `from` on and waits until etcd created it.
async fn open_watch(conn: &Connection, nodes: &str, from: Revision) -> Result<Opened> {
    let mut client = conn.client().watch_client();
    let options = WatchOptions::new()
        .with_prefix()
        .with_progress_notify()
        .with_start_revision(i64::try_from(from).unwrap_or(i64::MAX));
    conn.call("watch", async {
        let mut stream = client.watch(nodes, Some(options)).await?;
        loop {
            match stream.message().await? {
                Some(resp) if resp.compact_revision() > 0 => {
                    return Ok(Err(resp.compact_revision()));
                }
                Some(resp) if resp.created() && resp.canceled() => {
                    return Err(etcd_client::Error::WatchError(format!(
                        "etcd refused the watch: {}",
                        resp.cancel_reason()
                    )));
                }
                Some(resp) if resp.created() => return Ok(Ok(stream)),
                Some(_) => continue,
                None => {
                    return Err(etcd_client::Error::WatchError(
                        "etcd closed the watch before creating it".into(),
                    ));
                }
            }
        }
    })
    .await
}

/// What one watch stream ended with.
enum Ended {
    /// The registry or the consumer is gone.
    Stop,
    /// The stream broke (disconnect, etcd restart): reopen from the next revision.
    Broken(String),
    /// The revision to resume from was compacted: list again.
    Compacted(i64),
}

/// The watch task: delivers events from `next` on, reconnecting and resetting as needed.
async fn follow(
    conn: Connection,
    nodes: String,
    mut next: Revision,
    first: Opened,
    tx: mpsc::Sender<cni_core::Result<NodeEvent>>,
    mut shutdown: watch::Receiver<()>,
) {
    let mut opened = Some(first);
    let mut backoff = MIN_BACKOFF;
    loop {
        let opened_now = match opened.take() {
            Some(o) => o,
            None => match open_watch(&conn, &nodes, next).await {
                Ok(o) => {
                    tracing::info!(nodes, next, "node watch resumed");
                    o
                }
                Err(e) => {
                    tracing::debug!(nodes, error = %e, "cannot reopen the node watch yet");
                    let stop = tokio::select! {
                        go_on = pause(&mut shutdown, backoff) => !go_on,
                        _ = tx.closed() => true,
                    };
                    if stop {
                        return;
                    }
                    backoff = next_backoff(backoff);
                    continue;
                }
            },
        };
        let ended = match opened_now {
            Err(compacted) => Ended::Compacted(compacted),
            Ok(stream) => tokio::select! {
                ended = deliver(stream, &nodes, &mut next, &tx, &mut backoff) => ended,
                _ = shutdown.changed() => Ended::Stop,
            },
        };
        match ended {
            Ended::Stop => return,
            Ended::Broken(why) => {
                tracing::warn!(nodes, next, why, "node watch interrupted; resuming");
                // A stream that keeps breaking at once must not spin; one that lived long
                // had its backoff reset by `deliver`.
                if !pause(&mut shutdown, backoff).await {
                    return;
                }
                backoff = next_backoff(backoff);
            }
            Ended::Compacted(compacted) => {
                tracing::warn!(
                    nodes,
                    next,
                    compacted,
                    "node watch fell behind compaction; listing again"
                );
                loop {
                    match list_nodes(&conn, &nodes).await {
                        Ok(list) => {
                            next = list.revision + 1;
                            let reset = NodeEvent::Reset(list.nodes, list.revision);
                            if tx.send(Ok(reset)).await.is_err() {
                                return;
                            }
                            break;
                        }
                        Err(e) => {
                            tracing::debug!(nodes, error = %e, "cannot list nodes yet");
                            if !pause(&mut shutdown, backoff).await {
                                return;
                            }
                            backoff = next_backoff(backoff);
                        }
                    }
                }
            }
        }
    }
}

/// Reads one watch stream until it ends, sending events and advancing `next`.
async fn deliver(
    mut stream: WatchStream,
    nodes: &str,
    next: &mut Revision,
    tx: &mpsc::Sender<cni_core::Result<NodeEvent>>,
    backoff: &mut Duration,
) -> Ended {
    let started = Instant::now();
    loop {
        let resp = tokio::select! {
            r = stream.message() => r,
            _ = tx.closed() => return Ended::Stop,
        };
        let resp = match resp {
            Ok(Some(resp)) => resp,
            Ok(None) => return Ended::Broken("etcd closed the watch stream".into()),
            Err(e) => return Ended::Broken(crate::error::root_cause(&e)),
        };
        if started.elapsed() > MAX_BACKOFF {
            // The stream lived: the next failure starts over with a short pause.
            *backoff = MIN_BACKOFF;
        }
        if resp.compact_revision() > 0 {
            return Ended::Compacted(resp.compact_revision());
        }
        if resp.canceled() {
            return Ended::Broken(format!("etcd canceled the watch: {}", resp.cancel_reason()));
        }
        if resp.events().is_empty() {
            // A progress notification: everything up to the header's revision was delivered.
            if let Some(h) = resp.header() {
                *next = (*next).max(revision(h.revision()) + 1);
            }
            continue;
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let rev = revision(kv.mod_revision());
            let name = key.strip_prefix(nodes).unwrap_or(&key).to_owned();
            let item = match event.event_type() {
                EventType::Put => match serde_json::from_slice::<NodeRecord>(kv.value()) {
                    Ok(record) => Ok(NodeEvent::Put(record, rev)),
                    Err(source) => Err(Error::CorruptRecord { key, source }.into()),
                },
                EventType::Delete => Ok(NodeEvent::Delete(name, rev)),
            };
            if tx.send(item).await.is_err() {
                return Ended::Stop;
            }
            *next = (*next).max(rev + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rounds_up() {
        assert_eq!(ttl_secs(Duration::from_millis(1)), 1);
        assert_eq!(ttl_secs(Duration::from_secs(0)), 1);
        assert_eq!(ttl_secs(Duration::from_millis(2500)), 3);
        assert_eq!(ttl_secs(Duration::from_secs(30)), 30);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("node-1").is_ok());
        for bad in ["", "a/b", &"x".repeat(254)] {
            let e = check_name(bad).unwrap_err();
            assert_eq!(e.code().0, 7);
        }
    }
}
