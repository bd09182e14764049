//! [`FileStore`]: the embedded datastore of a single node, one JSON file shared by every
//! process of the node.
//!
//! CNI plugins are separate short-lived processes, often started many at once, and the node
//! agent is another one; they coordinate through two files in the store directory:
//!
//! - `store.json`: every key with its value and `mod_revision`, and the store revision.
//!   It is replaced as a whole: a commit writes `store.json.tmp`, flushes it to disk and
//!   renames it over `store.json`, so a reader (or a crash) only ever sees a complete version.
//! - `store.lock`: taken with `flock(2)`: shared by reads, exclusive by commits, which makes
//!   every transaction atomic and isolated across processes. It also holds a generation
//!   counter bumped by every commit, which lets a process reuse the table it parsed last time
//!   when nothing changed (a cheap poll for the node registry watch, and no second parse when
//!   a commit follows a read, as in an ADD).
//!
//! Watchers learn of commits from inotify on the directory ([`Store::change_hints`]): a
//! commit's rename of the data file wakes them at once instead of at their next poll.
//!
//! All file operations run on tokio's blocking pool. An operation that cannot take the lock
//! within the lock timeout (10 s by default; a stopped process may hold it) fails with
//! [`StoreError::Timeout`] (code 11) and is abandoned: it never applies later. So is one
//! whose future is dropped (its caller cancelled) before it got the lock.

use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::{FileExt as _, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::table::Table;
use super::{KeyValue, Store, Txn, TxnOutcome};
use crate::error::StoreError;

/// Name of the data file in the store directory.
pub const DATA_FILE: &str = "store.json";
/// Name of the lock file in the store directory.
pub const LOCK_FILE: &str = "store.lock";
/// Name of the temporary file a commit writes before renaming it over [`DATA_FILE`].
pub const TEMP_FILE: &str = "store.json.tmp";

/// How long an operation waits for the lock by default.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// A [`Store`] in one JSON file, safe for many processes at once. See the [module
/// docs](self) for the file layout and the locking.
///
/// Cloning is cheap and shares the parsed-table cache and the [`backed_off`] count.
///
/// [`backed_off`]: FileStore::backed_off
#[derive(Debug, Clone)]
pub struct FileStore {
    paths: Arc<Paths>,
    cache: Arc<Mutex<Option<Cached>>>,
    lock_timeout: Duration,
    backed_off: Arc<AtomicU64>,
}

#[derive(Debug)]
struct Paths {
    dir: PathBuf,
    data: PathBuf,
    lock: PathBuf,
    temp: PathBuf,
}

/// The table as parsed at a given generation of a given data file.
#[derive(Debug)]
struct Cached {
    generation: u64,
    file: FileId,
    table: Arc<Table>,
}

/// What identifies one version of the data file, besides the lock file's generation (this
/// also catches a data file replaced by hand).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl FileId {
    fn of(m: &fs::Metadata) -> Self {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        }
    }
}

/// Progress of an operation on the blocking pool, so that a timed-out caller and the thread
/// agree on whether the operation runs.
const WAITING: u8 = 0;
const RUNNING: u8 = 1;
const ABANDONED: u8 = 2;

/// The progress of one operation, abandoned when dropped before the operation runs.
struct AbandonOnDrop(Arc<AtomicU8>);

impl AbandonOnDrop {
    /// Marks the operation abandoned unless it already runs; says whether it was.
    fn abandon(&self) -> bool {
        self.0
            .compare_exchange(WAITING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.abandon();
    }
}

impl FileStore {
    /// A store in `dir` (created on first use). Does no I/O.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        FileStore {
            paths: Arc::new(Paths {
                data: dir.join(DATA_FILE),
                lock: dir.join(LOCK_FILE),
                temp: dir.join(TEMP_FILE),
                dir,
            }),
            cache: Arc::new(Mutex::new(None)),
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            backed_off: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Sets how long an operation may wait for the lock before failing with code 11.
    pub fn with_lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// How many operations of this handle (and its clones) got the lock only after their
    /// caller had given up on them and so released it without reading or writing anything:
    /// after the lock timeout (the caller got code 11) or after the caller dropped the
    /// operation's future. Such an operation never applies.
    pub fn backed_off(&self) -> u64 {
        self.backed_off.load(Ordering::Acquire)
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.paths.dir
    }

    /// The data file, `<dir>/store.json`.
    pub fn path(&self) -> &Path {
        &self.paths.data
    }

    /// Runs `f` on the blocking pool with the lock held (exclusive or shared).
    async fn locked<T, F>(&self, op: &'static str, exclusive: bool, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Locked<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let paths = Arc::clone(&self.paths);
        let cache = Arc::clone(&self.cache);
        let progress = Arc::new(AtomicU8::new(WAITING));
        let thread_progress = Arc::clone(&progress);
        // If this future is dropped (its caller cancelled) while the thread still waits for
        // the lock, the operation is abandoned like one that timed out.
        let progress = AbandonOnDrop(progress);
        let backed_off = Arc::clone(&self.backed_off);
        let mut task = tokio::task::spawn_blocking(move || {
            let lock = open_lock(&paths)?;
            let taken = if exclusive {
                fs4::FileExt::lock(&lock)
            } else {
                fs4::FileExt::lock_shared(&lock)
            };
            taken.map_err(|e| io_error(&paths.lock, e))?;
            if thread_progress
                .compare_exchange(WAITING, RUNNING, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                // The caller gave up; closing `lock` releases it.
                backed_off.fetch_add(1, Ordering::AcqRel);
                return Err(StoreError::Timeout {
                    endpoint: paths.data.display().to_string(),
                    op,
                    millis: 0,
                });
            }
            let locked = Locked {
                paths: &paths,
                cache: &cache,
                lock: &lock,
            };
            f(&locked)
            // `lock` is closed here, which releases the flock.
        });
        let joined = match tokio::time::timeout(self.lock_timeout, &mut task).await {
            Ok(joined) => joined,
            Err(_) => {
                if progress.abandon() {
                    return Err(StoreError::Timeout {
                        endpoint: self.describe(),
                        op,
                        millis: u64::try_from(self.lock_timeout.as_millis()).unwrap_or(u64::MAX),
                    });
                }
                // The lock was taken in time and the operation is under way: let it finish.
                task.await
            }
        };
        joined.map_err(|e| io_error(&self.paths.data, std::io::Error::other(e)))?
    }
}

/// An operation's view of the store while it holds the lock.
struct Locked<'a> {
    paths: &'a Paths,
    cache: &'a Mutex<Option<Cached>>,
    lock: &'a File,
}

impl Locked<'_> {
    fn generation(&self) -> Result<u64, StoreError> {
        let mut buf = [0u8; 8];
        let n = self
            .lock
            .read_at(&mut buf, 0)
            .map_err(|e| io_error(&self.paths.lock, e))?;
        Ok(if n == buf.len() {
            u64::from_le_bytes(buf)
        } else {
            0
        })
    }

    fn set_generation(&self, generation: u64) -> Result<(), StoreError> {
        self.lock
            .write_all_at(&generation.to_le_bytes(), 0)
            .map_err(|e| io_error(&self.paths.lock, e))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Option<Cached>> {
        // The cache is replaced as a whole, so a poisoned lock still holds a valid value.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current table and generation, from the cache when the file did not change.
    fn load(&self) -> Result<(Arc<Table>, u64), StoreError> {
        let generation = self.generation()?;
        let data = &self.paths.data;
        let mut file = match File::open(data) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Ok((Arc::new(Table::default()), generation));
            }
            Err(e) => return Err(io_error(data, e)),
        };
        let id = FileId::of(&file.metadata().map_err(|e| io_error(data, e))?);
        if let Some(c) = self.cache().as_ref()
            && c.generation == generation
            && c.file == id
        {
            return Ok((Arc::clone(&c.table), generation));
        }
        let mut bytes = Vec::with_capacity(usize::try_from(id.size).unwrap_or(0));
        file.read_to_end(&mut bytes)
            .map_err(|e| io_error(data, e))?;
        let table: Table =
            serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                key: data.display().to_string(),
                source,
            })?;
        let table = Arc::new(table);
        *self.cache() = Some(Cached {
            generation,
            file: id,
            table: Arc::clone(&table),
        });
        Ok((table, generation))
    }

    /// Writes `table` as the new version of the data file.
    fn store(&self, table: Table, generation: u64) -> Result<(), StoreError> {
        let temp = &self.paths.temp;
        let bytes =
            serde_json::to_vec(&table).map_err(|e| io_error(temp, std::io::Error::other(e)))?;
        let write = || -> std::io::Result<FileId> {
            let mut file = crate::private_fs::open_options()
                .write(true)
                .create(true)
                .truncate(true)
                .open(temp)?;
            file.write_all(&bytes)?;
            // The data must be on disk before the rename makes it the store: otherwise a
            // crash could leave `store.json` naming an empty or partial file.
            file.sync_data()?;
            Ok(FileId::of(&file.metadata()?))
        };
        let id = write().map_err(|e| {
            // A partial temporary file (disk full) would hold on to the space that is
            // left, which the node's other writers (state file, logs) need too.
            let _ = fs::remove_file(temp);
            io_error(temp, e)
        })?;
        // Bump the generation before the rename: if we die in between, readers merely
        // re-parse an unchanged file; the other order could let them keep a stale table.
        let generation = generation.wrapping_add(1);
        self.set_generation(generation)?;
        fs::rename(temp, &self.paths.data).map_err(|e| io_error(&self.paths.data, e))?;
        // No fsync of the directory: without it a power loss may undo the last renames, which
        // leaves the previous complete version of the store, never a broken one. What is lost
        // is what happened just before the node lost power, and the containers those commits
        // were for died with it; the runtime's GC then releases what they held. That is not
        // worth a second fsync on every ADD and DEL.
        *self.cache() = Some(Cached {
            generation,
            file: id,
            table: Arc::new(table),
        });
        Ok(())
    }
}

fn io_error(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

fn open_lock(paths: &Paths) -> Result<File, StoreError> {
    let open = || {
        crate::private_fs::open_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&paths.lock)
    };
    match open() {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            crate::private_fs::create_dir_all(&paths.dir).map_err(|e| io_error(&paths.dir, e))?;
            open().map_err(|e| io_error(&paths.lock, e))
        }
        Err(e) => Err(io_error(&paths.lock, e)),
    }
}

#[async_trait]
impl Store for FileStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_owned();
        self.locked("get", false, move |l| Ok(l.load()?.0.get(&key)))
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        let prefix = prefix.to_owned();
        self.locked("list", false, move |l| Ok(l.load()?.0.list(&prefix)))
            .await
    }

    async fn commit(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        self.locked("commit", true, move |l| {
            let (table, generation) = l.load()?;
            if let Err(current) = table.check(&txn.compares) {
                return Ok(TxnOutcome::Failed(current));
            }
            if txn.ops.is_empty() {
                return Ok(TxnOutcome::Committed(table.revision));
            }
            // Take the table out of the cache to change it in place rather than copy it
            // (a copy only if another task of this process still reads it); if the write
            // fails, the emptied cache makes the next operation read the file again.
            l.cache().take();
            let mut next = Arc::try_unwrap(table).unwrap_or_else(|shared| Table::clone(&shared));
            let revision = next.apply(txn.ops);
            l.store(next, generation)?;
            Ok(TxnOutcome::Committed(revision))
        })
        .await
    }

    fn describe(&self) -> String {
        format!("file:{}", self.paths.data.display())
    }

    /// inotify on the store directory: a hint each time a new version of the data file is
    /// renamed into place (every commit) or written in place. `None`, with a debug log, where
    /// inotify is not available (no more instances, a directory not made yet).
    fn change_hints(&self) -> Option<BoxStream<'static, ()>> {
        match data_file_hints(&self.paths.dir) {
            Ok(hints) => Some(hints),
            Err(e) => {
                tracing::debug!(
                    dir = %self.paths.dir.display(),
                    error = %e,
                    "no inotify on the store directory: watchers only poll"
                );
                None
            }
        }
    }
}

/// An inotify instance as a file descriptor tokio can wait on.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Yields once per batch of inotify events about [`DATA_FILE`] in `dir`; ends on a read
/// error.
fn data_file_hints(dir: &Path) -> std::io::Result<BoxStream<'static, ()>> {
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
    // A commit renames the new version over the data file (IN_MOVED_TO); an edit by hand
    // may write it in place (IN_CLOSE_WRITE). Readers cause neither.
    inotify.add_watch(
        dir,
        AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE,
    )?;
    // SAFETY: `InotifyFd` owns the inotify descriptor (an `OwnedFd` inside `Inotify`), which
    // stays open and the same until the `AsyncFd` drops it; `as_raw_fd` always returns it.
    let fd = unsafe { AsyncFd::register_with_interest(InotifyFd(inotify), Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let stream = futures::stream::unfold(fd, |fd| async move {
        loop {
            let mut ready = fd.readable().await.ok()?;
            match ready.try_io(|fd| fd.get_ref().0.read_events().map_err(std::io::Error::from)) {
                Ok(Ok(events)) => {
                    if events
                        .iter()
                        .any(|e| e.name.as_deref() == Some(std::ffi::OsStr::new(DATA_FILE)))
                    {
                        return Some(((), fd));
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "reading inotify events failed: no more hints");
                    return None;
                }
                // Spurious readiness: wait again.
                Err(_would_block) => {}
            }
        }
    });
    Ok(stream.boxed())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::store::Compare;

    fn committed(o: TxnOutcome) -> u64 {
        match o {
            TxnOutcome::Committed(r) => r,
            TxnOutcome::Failed(kv) => panic!("unexpected compare failure: {kv:?}"),
        }
    }

    #[tokio::test]
    async fn store_files_and_directories_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let s = FileStore::new(tmp.path().join("data/ipam"));
        s.commit(Txn::new().put("/x", "1")).await.unwrap();
        for path in [
            tmp.path().join("data"),
            s.dir().to_owned(),
            s.path().to_owned(),
            s.dir().join(LOCK_FILE),
        ] {
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", path.display());
        }
    }

    #[tokio::test]
    async fn persists_across_instances() {
        let dir = tempfile::tempdir().unwrap();
        let a = FileStore::new(dir.path().join("nested/store"));
        assert!(
            a.list("").await.unwrap().is_empty(),
            "a missing file is an empty store"
        );
        let r = committed(
            a.commit(Txn::new().put("/x", "1").put("/y", vec![0xffu8]))
                .await
                .unwrap(),
        );
        assert_eq!(r, 1);
        let b = FileStore::new(a.dir());
        let kv = b
            .get("/y")
            .await
            .unwrap()
            .expect("visible to another instance");
        assert_eq!((kv.value, kv.mod_revision), (vec![0xff], 1));
        let outcome = b
            .commit(Txn::new().when(Compare::Absent("/x".into())).put("/x", "2"))
            .await
            .unwrap();
        let TxnOutcome::Failed(current) = outcome else {
            panic!("compare on an existing key must fail");
        };
        assert_eq!(current[0].value, b"1");
        // `a` has the file cached at generation 1: the write by `b` must be seen.
        committed(b.commit(Txn::new().put("/x", "3")).await.unwrap());
        assert_eq!(a.get("/x").await.unwrap().unwrap().value, b"3");
        assert!(!dir.path().join("nested/store").join(TEMP_FILE).exists());
    }

    #[tokio::test]
    async fn corrupt_file_is_code_5() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::new(dir.path());
        std::fs::write(s.path(), b"{not json").unwrap();
        let err = s.list("/").await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
        assert_eq!(err.code().0, 5);
        let err = s.commit(Txn::new().put("/a", "b")).await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
        assert_eq!(
            std::fs::read(s.path()).unwrap(),
            b"{not json",
            "nothing overwritten"
        );
    }

    #[tokio::test]
    async fn unwritable_directory_is_code_5() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"").unwrap();
        let s = FileStore::new(blocker.join("store"));
        let err = s.commit(Txn::new().put("/a", "b")).await.unwrap_err();
        assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
        assert_eq!(err.code().0, 5);
    }

    /// Waits until the one abandoned commit of `s` got the lock (now free) and either backed
    /// off or applied, and checks that it backed off: `/a` is still `1` at revision 1. (The
    /// bound only keeps a broken store from hanging the test.)
    async fn backs_off_and_never_applies(s: &FileStore) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let kv = s.get("/a").await.unwrap().unwrap();
            assert_eq!(
                (kv.value.as_slice(), kv.mod_revision),
                (&b"1"[..], 1),
                "the abandoned commit applied"
            );
            if s.backed_off() > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the abandoned commit never took the lock and backed off"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(s.backed_off(), 1);
    }

    #[tokio::test]
    async fn a_dropped_commit_never_applies() {
        use futures::FutureExt;

        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::new(dir.path());
        committed(s.commit(Txn::new().put("/a", "1")).await.unwrap());
        let holder = File::open(dir.path().join(LOCK_FILE)).unwrap();
        fs4::FileExt::lock(&holder).unwrap();
        // Polled once (which starts the wait for the lock), then dropped: a caller that
        // was cancelled, long before the lock timeout.
        assert!(
            s.commit(Txn::new().put("/a", "2")).now_or_never().is_none(),
            "the commit cannot finish while the lock is held"
        );
        assert_eq!(s.backed_off(), 0, "the commit still waits for the lock");
        drop(holder);
        backs_off_and_never_applies(&s).await;
        committed(s.commit(Txn::new().put("/a", "3")).await.unwrap());
        assert_eq!(s.get("/a").await.unwrap().unwrap().value, b"3");
    }

    #[tokio::test]
    async fn lock_timeout_is_code_11_and_the_op_never_applies() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::new(dir.path()).with_lock_timeout(Duration::from_millis(50));
        committed(s.commit(Txn::new().put("/a", "1")).await.unwrap());
        let holder = File::open(dir.path().join(LOCK_FILE)).unwrap();
        fs4::FileExt::lock(&holder).unwrap();
        let err = s.commit(Txn::new().put("/a", "2")).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Timeout { op: "commit", .. }),
            "{err:?}"
        );
        assert_eq!(err.code().0, 11);
        assert_eq!(s.backed_off(), 0, "the commit still waits for the lock");
        drop(holder);
        backs_off_and_never_applies(&s).await;
        // A commit that gets the lock in time is not counted, and applies.
        committed(s.commit(Txn::new().put("/a", "3")).await.unwrap());
        assert_eq!(s.backed_off(), 1);
        assert_eq!(s.get("/a").await.unwrap().unwrap().value, b"3");
    }

    #[tokio::test]
    async fn change_hints_follow_commits_of_other_instances_not_reads() {
        use futures::StreamExt;

        let dir = tempfile::tempdir().unwrap();
        let watcher = FileStore::new(dir.path());
        let mut hints = watcher
            .change_hints()
            .expect("inotify on a local directory");
        let writer = FileStore::new(dir.path());
        committed(writer.commit(Txn::new().put("/a", "1")).await.unwrap());
        tokio::time::timeout(Duration::from_secs(5), hints.next())
            .await
            .expect("a hint after a commit")
            .expect("the hints go on");
        // Drain what the first commit caused (the lock file's creation is not a hint).
        while tokio::time::timeout(Duration::from_millis(50), hints.next())
            .await
            .is_ok()
        {}
        writer.list("/").await.unwrap();
        writer.get("/a").await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), hints.next())
                .await
                .is_err(),
            "reads are not hints"
        );
        committed(writer.commit(Txn::new().put("/a", "2")).await.unwrap());
        tokio::time::timeout(Duration::from_secs(5), hints.next())
            .await
            .expect("a hint after the second commit")
            .expect("the hints go on");
    }

    /// 100 read-then-compare-and-swap cycles in a row all apply, and a fresh instance reads
    /// back every key; also prints what a cycle costs here (a figure, never a pass/fail).
    #[tokio::test]
    async fn read_commit_cycles_apply_in_order_and_print_their_cost() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::new(dir.path());
        // A store of realistic size: one node with two full /26 blocks.
        let mut seed = Txn::new();
        for i in 0..128 {
            seed = seed
                .put(format!("/cnikit/nodes/n1/used/10.244.0.{i}"), r#"{"network":"net","containerId":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef","ifname":"eth0"}"#)
                .put(format!("/cnikit/nodes/n1/handles/net/{i:064}/eth0"), r#"{"ip":"10.244.0.1","block":"10.244.0.0-26"}"#);
        }
        committed(s.commit(seed).await.unwrap());
        let mut samples = Vec::new();
        for i in 0..100 {
            let start = Instant::now();
            let kv = s.get("/counter").await.unwrap();
            committed(
                s.commit(
                    Txn::new()
                        .when(Compare::unchanged("/counter", kv.as_ref()))
                        .put("/counter", i.to_string()),
                )
                .await
                .unwrap(),
            );
            samples.push(start.elapsed());
        }
        samples.sort();
        let cold = FileStore::new(dir.path());
        let start = Instant::now();
        let listed = cold.list("/cnikit/nodes/n1/").await.unwrap();
        let cold_read = start.elapsed();
        assert_eq!(listed.len(), 256, "128 used records and 128 handles");
        let counter = cold.get("/counter").await.unwrap().expect("the counter");
        assert_eq!(counter.value, b"99", "the last of the 100 cycles");
        eprintln!(
            "FileStore read+commit ({} bytes file, {} build): p50 {:?}, p90 {:?}, max {:?}; cold list {:?}",
            std::fs::metadata(s.path()).unwrap().len(),
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            samples[50],
            samples[90],
            samples[99],
            cold_read,
        );
    }
}
