//! The etcd Store against a real etcd: semantics of get/list/commit, concurrency, outages.
//! Each test starts its own etcd (see `common`); they skip loudly without the `etcd` binary.

mod common;

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cni_core::StoreError;
use cni_core::store::{Compare, KeyValue, Store, Txn, TxnOutcome};
use common::Etcd;
use ipam_etcd::{Config, EtcdStore};

fn committed(outcome: TxnOutcome) -> u64 {
    match outcome {
        TxnOutcome::Committed(rev) => rev,
        TxnOutcome::Failed(kvs) => panic!("expected a commit, compare failed: {kvs:?}"),
    }
}

fn failed(outcome: TxnOutcome) -> Vec<KeyValue> {
    match outcome {
        TxnOutcome::Failed(kvs) => kvs,
        TxnOutcome::Committed(rev) => panic!("expected a failed compare, committed at {rev}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_list_commit_semantics() {
    let Some(etcd) = Etcd::start("store-semantics").await else {
        return;
    };
    let store = EtcdStore::connect(&etcd.config()).await.unwrap();
    let p = store.prefix().to_owned();
    let (k1, k2, k3) = (format!("{p}/a/1"), format!("{p}/a/2"), format!("{p}/a/3"));

    let before = store.round_trips();
    assert_eq!(store.get(&k1).await.unwrap(), None);
    assert_eq!(store.round_trips(), before + 1, "a get is one round trip");

    // Absent holds for a new key.
    let r1 = committed(
        store
            .commit(
                Txn::new()
                    .when(Compare::Absent(k1.clone()))
                    .put(&k1, b"v1".to_vec()),
            )
            .await
            .unwrap(),
    );
    assert!(r1 > 0);
    let kv1 = store.get(&k1).await.unwrap().expect("k1 written");
    assert_eq!((kv1.value.as_slice(), kv1.mod_revision), (&b"v1"[..], r1));

    // Absent fails for an existing key and hands back its current value.
    let before = store.round_trips();
    let current = failed(
        store
            .commit(
                Txn::new()
                    .when(Compare::Absent(k1.clone()))
                    .put(&k1, b"x".to_vec()),
            )
            .await
            .unwrap(),
    );
    assert_eq!(
        store.round_trips(),
        before + 1,
        "a failed commit is one round trip"
    );
    assert_eq!(current, vec![kv1.clone()]);

    // ModRevision holds for the revision read; several writes apply at one revision.
    let r2 = committed(
        store
            .commit(
                Txn::new()
                    .when(Compare::ModRevision(k1.clone(), r1))
                    .when(Compare::Absent(k2.clone()))
                    .put(&k1, b"v2".to_vec())
                    .put(&k2, b"w".to_vec()),
            )
            .await
            .unwrap(),
    );
    assert!(r2 > r1, "revisions grow: {r2} > {r1}");
    let kv1 = store.get(&k1).await.unwrap().unwrap();
    let kv2 = store.get(&k2).await.unwrap().unwrap();
    assert_eq!((kv1.mod_revision, kv2.mod_revision), (r2, r2));
    assert_eq!(kv1.value, b"v2");

    // A stale ModRevision fails; only existing compared keys come back; nothing is written.
    let current = failed(
        store
            .commit(
                Txn::new()
                    .when(Compare::ModRevision(k1.clone(), r1))
                    .when(Compare::Absent(k3.clone()))
                    .put(&k3, b"never".to_vec()),
            )
            .await
            .unwrap(),
    );
    assert_eq!(current, vec![kv1.clone()]);
    assert_eq!(
        store.get(&k3).await.unwrap(),
        None,
        "a failed txn writes nothing"
    );

    // ModRevision on an absent key fails with nothing to hand back.
    let current = failed(
        store
            .commit(
                Txn::new()
                    .when(Compare::ModRevision(k3.clone(), r2))
                    .put(&k3, b"x".to_vec()),
            )
            .await
            .unwrap(),
    );
    assert!(current.is_empty(), "{current:?}");

    // One compare holds, the other does not: all or nothing.
    let current = failed(
        store
            .commit(
                Txn::new()
                    .when(Compare::ModRevision(k2.clone(), r2))
                    .when(Compare::Absent(k1.clone()))
                    .delete(&k2)
                    .put(&k3, b"x".to_vec()),
            )
            .await
            .unwrap(),
    );
    assert_eq!(
        current,
        vec![kv2.clone(), kv1.clone()],
        "compare order, both current"
    );
    assert!(store.get(&k2).await.unwrap().is_some());
    assert!(store.get(&k3).await.unwrap().is_none());

    // Delete under a compare; a delete of an absent key is fine.
    let r3 = committed(
        store
            .commit(
                Txn::new()
                    .when(Compare::unchanged(&k2, Some(&kv2)))
                    .delete(&k2)
                    .delete(format!("{p}/a/never-there")),
            )
            .await
            .unwrap(),
    );
    assert!(r3 > r2);
    assert_eq!(store.get(&k2).await.unwrap(), None);

    // list: only under the prefix, sorted, values and revisions as written.
    for (k, v) in [
        ("b/2", "2"),
        ("b/10", "10"),
        ("b/1", "1"),
        ("bb", "outside"),
    ] {
        committed(
            store
                .commit(Txn::new().put(format!("{p}/{k}"), v))
                .await
                .unwrap(),
        );
    }
    let before = store.round_trips();
    let listed = store.list(&format!("{p}/b/")).await.unwrap();
    assert_eq!(
        store.round_trips(),
        before + 1,
        "a small list is one round trip"
    );
    let keys: Vec<&str> = listed.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        [format!("{p}/b/1"), format!("{p}/b/10"), format!("{p}/b/2")]
    );
    assert_eq!(listed[1].value, b"10");
    assert!(
        store
            .list(&format!("{p}/nothing/"))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.describe().contains(&etcd.endpoint()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_lists_are_paged_in_one_snapshot() {
    let Some(etcd) = Etcd::start("store-pages").await else {
        return;
    };
    let store = EtcdStore::connect(&etcd.config()).await.unwrap();
    let p = format!("{}/many/", store.prefix());
    const N: usize = 4_500;
    for chunk in (0..N).collect::<Vec<_>>().chunks(100) {
        let mut txn = Txn::new();
        for i in chunk {
            txn = txn.put(format!("{p}{i:05}"), format!("{i}"));
        }
        committed(store.commit(txn).await.unwrap());
    }
    let before = store.round_trips();
    let listed = store.list(&p).await.unwrap();
    let trips = store.round_trips() - before;
    assert_eq!(listed.len(), N);
    assert!(
        listed.windows(2).all(|w| w[0].key < w[1].key),
        "sorted by key"
    );
    assert_eq!(listed[N - 1].key, format!("{p}{:05}", N - 1));
    assert_eq!(trips, 3, "2000 keys per page");
}

/// Many clients increment one counter by compare-and-swap; no increment may be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cas_increments_lose_nothing() {
    let Some(etcd) = Etcd::start("store-cas").await else {
        return;
    };
    const CLIENTS: usize = 4;
    const TASKS_PER_CLIENT: usize = 4;
    const INCREMENTS: usize = 20;
    let config = etcd.config();
    let key = format!("{}/counter", config.prefix);
    let conflicts = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let store = Arc::new(EtcdStore::connect(&config).await.unwrap());
        for _ in 0..TASKS_PER_CLIENT {
            let (store, key, conflicts) = (store.clone(), key.clone(), conflicts.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..INCREMENTS {
                    let mut seen = store.get(&key).await.unwrap();
                    loop {
                        let n: u64 = seen
                            .as_ref()
                            .map(|kv| String::from_utf8_lossy(&kv.value).parse().unwrap())
                            .unwrap_or(0);
                        let txn = Txn::new()
                            .when(Compare::unchanged(&key, seen.as_ref()))
                            .put(&key, (n + 1).to_string());
                        match store.commit(txn).await.unwrap() {
                            TxnOutcome::Committed(_) => break,
                            TxnOutcome::Failed(current) => {
                                // Retry on the value the failed commit handed back: no re-read.
                                conflicts.fetch_add(1, Ordering::Relaxed);
                                seen = current.into_iter().find(|kv| kv.key == key);
                                assert!(seen.is_some(), "the counter exists once anyone wrote it");
                            }
                        }
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let store = EtcdStore::connect(&config).await.unwrap();
    let total = store.get(&key).await.unwrap().unwrap();
    let expected = CLIENTS * TASKS_PER_CLIENT * INCREMENTS;
    assert_eq!(String::from_utf8_lossy(&total.value), expected.to_string());
    eprintln!(
        "{expected} increments by {} tasks on {CLIENTS} clients: {} conflicts retried",
        CLIENTS * TASKS_PER_CLIENT,
        conflicts.load(Ordering::Relaxed)
    );
}

fn assert_try_again(e: &StoreError, endpoint: &str) {
    assert_eq!(e.code().0, 11, "{e}");
    let full = format!(
        "{e}: {:?}",
        std::error::Error::source(e).map(ToString::to_string)
    );
    assert!(full.contains(endpoint), "names the endpoint: {full}");
}

/// Nothing listens on the port: code 11 at once, naming the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_is_code_11() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut config = Config::new([endpoint.clone()]);
    config.timeout_ms = 2_000;
    let store = EtcdStore::connect(&config).await.unwrap();
    let started = Instant::now();
    let e = store.get("/cnikit/pool").await.unwrap_err();
    let took = started.elapsed();
    eprintln!(
        "refused connection reported in {took:?}: {e} ({:?})",
        std::error::Error::source(&e).map(ToString::to_string)
    );
    assert_try_again(&e, &endpoint);
    let cause = std::error::Error::source(&e)
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(cause.contains("Connection refused"), "says why: {cause}");
    // Not a timing assertion: a hang would be an unbounded wait; the deadline is 2 s.
    assert!(took < Duration::from_secs(30), "hung for {took:?}");
    let e = store
        .commit(Txn::new().put("/cnikit/x", "y"))
        .await
        .unwrap_err();
    assert_try_again(&e, &endpoint);
}

/// Something accepts TCP but never speaks: the request deadline ends the wait with code 11.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_times_out_with_code_11() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let mut config = Config::new([endpoint.clone()]);
    config.timeout_ms = 1_500;
    config.dial_timeout_ms = 1_000;
    let store = EtcdStore::connect(&config).await.unwrap();
    let started = Instant::now();
    let e = store.list("/cnikit/").await.unwrap_err();
    let took = started.elapsed();
    eprintln!("silent peer reported in {took:?}: {e}");
    assert_try_again(&e, &endpoint);
    assert!(took < Duration::from_secs(30), "hung for {took:?}");
    drop(listener);
}

/// etcd stops: code 11; it comes back on the same data: the same store works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_survives_an_etcd_restart() {
    let Some(mut etcd) = Etcd::start("store-restart").await else {
        return;
    };
    let store = EtcdStore::connect(&etcd.config()).await.unwrap();
    let key = format!("{}/pool", store.prefix());
    let r1 = committed(store.commit(Txn::new().put(&key, "a")).await.unwrap());
    etcd.stop().await;
    let e = store.get(&key).await.unwrap_err();
    eprintln!("while etcd is stopped: {e}");
    assert_try_again(&e, &etcd.endpoint());
    etcd.resume().await.unwrap();
    let kv = store
        .get(&key)
        .await
        .unwrap()
        .expect("data kept across the restart");
    assert_eq!((kv.value.as_slice(), kv.mod_revision), (&b"a"[..], r1));
    let r2 = committed(
        store
            .commit(
                Txn::new()
                    .when(Compare::ModRevision(key.clone(), r1))
                    .put(&key, "b"),
            )
            .await
            .unwrap(),
    );
    assert!(r2 > r1);
}
