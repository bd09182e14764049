//! [`MemoryStore`]: an in-process [`Store`] for unit tests.
//!
//! It has the exact transaction semantics of the other stores (one global revision, a
//! `mod_revision` per key, failed compares return the current values) and two test aids:
//!
//! - **interleaving**: [`MemoryStore::with_interleaving`] makes every operation first yield to
//!   the runtime a seeded-random number of times, so concurrent clients really interleave
//!   between their reads and their commits (reproducibly on a current-thread runtime);
//! - **round-trip counting**: [`MemoryStore::stats`] tells how many reads and commits a piece
//!   of code needed.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use super::table::Table;
use super::{KeyValue, Revision, Store, Txn, TxnOutcome};
use crate::error::StoreError;

/// How many operations a [`MemoryStore`] served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// [`Store::get`] calls.
    pub gets: u64,
    /// [`Store::list`] calls.
    pub lists: u64,
    /// [`Store::commit`] calls (committed or failed).
    pub commits: u64,
    /// Commits whose compares failed.
    pub failed_commits: u64,
    /// Commits whose keys lie in more than one object (see [`object_of`](super::object_of)):
    /// a store of per-object compare-and-swap (Kubernetes) could not apply them atomically.
    pub multi_object_commits: u64,
}

impl StoreStats {
    /// Round trips: every call is one.
    pub fn round_trips(&self) -> u64 {
        self.gets + self.lists + self.commits
    }
}

/// An in-memory [`Store`]. Cheap to create; clone an `Arc` of it to share.
#[derive(Debug, Default)]
pub struct MemoryStore {
    table: Mutex<Table>,
    interleaving: Option<Interleaving>,
    gets: AtomicU64,
    lists: AtomicU64,
    commits: AtomicU64,
    failed_commits: AtomicU64,
    multi_object_commits: AtomicU64,
}

#[derive(Debug)]
struct Interleaving {
    rng: Mutex<fastrand::Rng>,
    max_yields: u32,
}

impl MemoryStore {
    /// An empty store that answers at once.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    /// An empty store that yields to the runtime `0..=max_yields` times (drawn from a generator
    /// seeded with `seed`; one time in eight, sixteen times longer) before each operation, so
    /// that concurrent tasks interleave, now and then with whole operations of one task
    /// between two steps of another.
    pub fn with_interleaving(seed: u64, max_yields: u32) -> Self {
        MemoryStore {
            interleaving: Some(Interleaving {
                rng: Mutex::new(fastrand::Rng::with_seed(seed)),
                max_yields,
            }),
            ..MemoryStore::default()
        }
    }

    /// Operations served so far.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            gets: self.gets.load(Ordering::Relaxed),
            lists: self.lists.load(Ordering::Relaxed),
            commits: self.commits.load(Ordering::Relaxed),
            failed_commits: self.failed_commits.load(Ordering::Relaxed),
            multi_object_commits: self.multi_object_commits.load(Ordering::Relaxed),
        }
    }

    /// The current store revision (0 before the first write).
    pub fn revision(&self) -> Revision {
        self.table().revision
    }

    /// Every key, sorted, without yielding or counting: for assertions in tests.
    pub fn dump(&self) -> Vec<KeyValue> {
        self.table().list("")
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while the lock is held cannot leave the table half-written: every mutation
        // is a single `Table::commit` call; so a poisoned lock is still a consistent table.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn interleave(&self) {
        let Some(i) = &self.interleaving else {
            return;
        };
        let n = {
            let mut rng = i.rng.lock().unwrap_or_else(|p| p.into_inner());
            let n = rng.u32(0..=i.max_yields);
            // Now and then a much longer pause, so that another client can run a whole
            // multi-step operation between two steps of this one.
            if rng.u8(..8) == 0 { n * 16 } else { n }
        };
        for _ in 0..n {
            tokio::task::yield_now().await;
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.interleave().await;
        self.gets.fetch_add(1, Ordering::Relaxed);
        Ok(self.table().get(key))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        self.interleave().await;
        self.lists.fetch_add(1, Ordering::Relaxed);
        Ok(self.table().list(prefix))
    }

    async fn commit(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        self.interleave().await;
        self.commits.fetch_add(1, Ordering::Relaxed);
        if super::objects(&txn).len() > 1 {
            self.multi_object_commits.fetch_add(1, Ordering::Relaxed);
        }
        let outcome = self.table().commit(txn);
        if matches!(outcome, TxnOutcome::Failed(_)) {
            self.failed_commits.fetch_add(1, Ordering::Relaxed);
        }
        Ok(outcome)
    }

    fn describe(&self) -> String {
        "memory".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::Compare;

    #[tokio::test]
    async fn revisions_and_failed_compares() {
        let s = MemoryStore::new();
        let TxnOutcome::Committed(r1) = s.commit(Txn::new().put("/k", "a")).await.unwrap() else {
            panic!("unconditional put must commit");
        };
        let kv = s.get("/k").await.unwrap().expect("written");
        assert_eq!(kv.mod_revision, r1);
        let outcome = s
            .commit(Txn::new().when(Compare::Absent("/k".into())).put("/k", "b"))
            .await
            .unwrap();
        assert_eq!(outcome, TxnOutcome::Failed(vec![kv.clone()]));
        let outcome = s
            .commit(
                Txn::new()
                    .when(Compare::unchanged("/k", Some(&kv)))
                    .put("/k", "b"),
            )
            .await
            .unwrap();
        assert_eq!(outcome, TxnOutcome::Committed(r1 + 1));
        assert_eq!(s.revision(), r1 + 1);
        let stats = s.stats();
        assert_eq!((stats.gets, stats.commits, stats.failed_commits), (1, 3, 1));
    }

    /// Concurrent compare-and-swap increments on an interleaving store: retries happen and no
    /// increment is lost.
    #[tokio::test]
    async fn interleaved_cas_increments_lose_nothing() {
        let s = Arc::new(MemoryStore::with_interleaving(7, 3));
        let tasks = (0..8).map(|_| {
            let s = Arc::clone(&s);
            async move {
                for _ in 0..25 {
                    loop {
                        let cur = s.get("/counter").await.unwrap();
                        let n: u64 = cur
                            .as_ref()
                            .map(|kv| String::from_utf8_lossy(&kv.value).parse().unwrap())
                            .unwrap_or(0);
                        let txn = Txn::new()
                            .when(Compare::unchanged("/counter", cur.as_ref()))
                            .put("/counter", (n + 1).to_string());
                        if let TxnOutcome::Committed(_) = s.commit(txn).await.unwrap() {
                            break;
                        }
                    }
                }
            }
        });
        futures::future::join_all(tasks).await;
        let kv = s.get("/counter").await.unwrap().unwrap();
        assert_eq!(kv.value, b"200");
        assert!(
            s.stats().failed_commits > 0,
            "the injected yields should make some compares fail"
        );
    }
}
