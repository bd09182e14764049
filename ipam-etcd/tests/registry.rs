//! The etcd node registry against a real etcd: watch delivery, resuming after an etcd
//! restart, lease expiry and loss, and compaction. Delays are printed, never asserted.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cni_core::registry::{NodeEvent, NodeRecord, NodeRegistry};
use common::Etcd;
use futures::StreamExt;
use futures::stream::BoxStream;
use ipam_etcd::{Config, EtcdRegistry};

/// The longest any expected event may take before the test calls it lost.
const EVENT_DEADLINE: Duration = Duration::from_secs(30);

type Events = BoxStream<'static, cni_core::Result<NodeEvent>>;

fn node(name: &str, last_octet: u8) -> NodeRecord {
    NodeRecord {
        name: name.to_owned(),
        address: format!("192.0.2.{last_octet}").parse().unwrap(),
        prefix_len: 24,
        blocks: vec![format!("10.244.{last_octet}.0/26").parse().unwrap()],
        backend: BTreeMap::from([(
            "vtepMac".to_owned(),
            format!("02:00:00:00:00:{last_octet:02x}"),
        )]),
    }
}

async fn next_event(events: &mut Events, what: &str) -> NodeEvent {
    match tokio::time::timeout(EVENT_DEADLINE, events.next()).await {
        Ok(Some(Ok(event))) => event,
        Ok(Some(Err(e))) => panic!("{what}: watch error {e}"),
        Ok(None) => panic!("{what}: watch ended"),
        Err(_) => panic!("{what}: no event within {EVENT_DEADLINE:?}"),
    }
}

/// Asserts nothing more arrives for a short while (no duplicate, no stray event).
async fn assert_quiet(events: &mut Events, for_: Duration) {
    if let Ok(item) = tokio::time::timeout(for_, events.next()).await {
        panic!("unexpected item: {item:?}");
    }
}

fn names(list: &cni_core::registry::NodeList) -> Vec<&str> {
    list.nodes.iter().map(|n| n.name.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_sees_records_come_and_go() {
    let Some(etcd) = Etcd::start("registry-watch").await else {
        return;
    };
    let agent = EtcdRegistry::connect(&etcd.config()).await.unwrap();
    let watcher = EtcdRegistry::connect(&etcd.config()).await.unwrap();
    let start = watcher.list().await.unwrap();
    assert!(start.nodes.is_empty());
    let mut events = watcher.watch(start.revision).await.unwrap();

    let a = node("node-a", 1);
    let t = Instant::now();
    agent.register(&a, Duration::from_secs(10)).await.unwrap();
    let registered = t.elapsed();
    let NodeEvent::Put(seen, put_rev) = next_event(&mut events, "put node-a").await else {
        panic!("expected a Put");
    };
    eprintln!(
        "register took {registered:?}; the watcher saw the Put {:?} after register returned",
        t.elapsed() - registered
    );
    assert_eq!(seen, a);
    assert!(put_rev > start.revision);
    let listed = watcher.list().await.unwrap();
    assert_eq!(listed.nodes, vec![a.clone()]);
    assert!(listed.revision >= put_rev);

    // Registering again with new data updates the record on the same lease.
    let mut a2 = a.clone();
    a2.blocks.push("10.244.100.0/26".parse().unwrap());
    agent.register(&a2, Duration::from_secs(10)).await.unwrap();
    let NodeEvent::Put(seen, rev2) = next_event(&mut events, "update node-a").await else {
        panic!("expected a Put");
    };
    assert_eq!(seen, a2);
    assert!(rev2 > put_rev);

    // Another TTL moves the record to a new lease without a Delete in between.
    agent.register(&a2, Duration::from_secs(20)).await.unwrap();
    let event = next_event(&mut events, "new ttl").await;
    assert!(
        matches!(&event, NodeEvent::Put(r, rev) if *r == a2 && *rev > rev2),
        "{event:?}"
    );
    let NodeEvent::Put(_, rev2) = event else {
        unreachable!()
    };
    assert_quiet(&mut events, Duration::from_millis(300)).await;

    let t = Instant::now();
    agent.deregister("node-a").await.unwrap();
    let deregistered = t.elapsed();
    let event = next_event(&mut events, "delete node-a").await;
    eprintln!(
        "deregister took {deregistered:?}; the watcher saw the Delete {:?} after it returned",
        t.elapsed() - deregistered
    );
    assert!(
        matches!(&event, NodeEvent::Delete(name, rev) if name == "node-a" && *rev > rev2),
        "{event:?}"
    );
    assert!(watcher.list().await.unwrap().nodes.is_empty());
    // Deregistering what is not there is fine.
    agent.deregister("node-a").await.unwrap();
    agent.deregister("never-registered").await.unwrap();
    assert_quiet(&mut events, Duration::from_millis(300)).await;

    // Bad names are refused with code 7 and write nothing.
    let e = agent
        .register(&node("a/b", 9), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(e.code().0, 7, "{e}");
    assert!(watcher.list().await.unwrap().nodes.is_empty());
}

/// The watcher's etcd restarts; records written while the watcher cannot reach it are
/// delivered once it is back, in order, none twice; a live registration survives.
///
/// To be sure the watcher is disconnected while they are written, etcd comes back first on
/// another client port (same data), takes the writes there, then returns to its own port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_after_an_etcd_restart() {
    let Some(mut etcd) = Etcd::start("registry-restart").await else {
        return;
    };
    let config = etcd.config();
    let agent = EtcdRegistry::connect(&config).await.unwrap();
    let watcher = EtcdRegistry::connect(&config).await.unwrap();
    let start = watcher.list().await.unwrap();
    let mut events = watcher.watch(start.revision).await.unwrap();

    agent
        .register(&node("node-a", 1), Duration::from_secs(5))
        .await
        .unwrap();
    let NodeEvent::Put(_, rev_a) = next_event(&mut events, "put node-a").await else {
        panic!("expected a Put");
    };

    // etcd restarts where the watcher cannot see it; records change meanwhile.
    let home = etcd.client_port();
    etcd.move_to(common::free_port().unwrap()).await.unwrap();
    {
        let writer = EtcdRegistry::connect(&etcd.config()).await.unwrap();
        writer
            .register(&node("node-b", 2), Duration::from_secs(5))
            .await
            .unwrap();
        writer.deregister("node-b").await.unwrap();
        // Outlives the writer (dropped below) for the rest of the test.
        writer
            .register(&node("node-c", 3), Duration::from_secs(120))
            .await
            .unwrap();
    }
    let t = Instant::now();
    etcd.move_to(home).await.unwrap();
    eprintln!("etcd back on its endpoint after {:?}", t.elapsed());

    let mut got = Vec::new();
    for what in ["put node-b", "delete node-b", "put node-c"] {
        got.push(next_event(&mut events, what).await);
    }
    eprintln!(
        "events missed during the outage delivered {:?} after etcd was back",
        t.elapsed()
    );
    match &got[..] {
        [
            NodeEvent::Put(b, rb),
            NodeEvent::Delete(b_name, rbd),
            NodeEvent::Put(c, rc),
        ] => {
            assert_eq!(
                (b.name.as_str(), b_name.as_str(), c.name.as_str()),
                ("node-b", "node-b", "node-c")
            );
            assert!(
                rev_a < *rb && rb < rbd && rbd < rc,
                "revisions in order: {got:?}"
            );
        }
        other => panic!("unexpected events: {other:?}"),
    }
    assert_quiet(&mut events, Duration::from_millis(300)).await;

    // And the watch goes on after the reconnect.
    agent
        .register(&node("node-d", 4), Duration::from_secs(5))
        .await
        .unwrap();
    let event = next_event(&mut events, "put node-d").await;
    assert!(
        matches!(&event, NodeEvent::Put(d, _) if d.name == "node-d"),
        "{event:?}"
    );

    // node-a's keep-alive reconnected too: it outlives its 5 s TTL well after the restart.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let listed = watcher.list().await.unwrap();
    assert_eq!(names(&listed), ["node-a", "node-c", "node-d"]);
    assert_quiet(&mut events, Duration::from_millis(100)).await;
}

/// A node whose keep-alive stops (its registry dropped, as when the agent dies) disappears
/// when its lease expires: gone from the list, and a Delete for watchers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_removes_the_node() {
    let Some(etcd) = Etcd::start("registry-expiry").await else {
        return;
    };
    let watcher = EtcdRegistry::connect(&etcd.config()).await.unwrap();
    let start = watcher.list().await.unwrap();
    let mut events = watcher.watch(start.revision).await.unwrap();

    let agent = EtcdRegistry::connect(&etcd.config()).await.unwrap();
    agent
        .register(&node("node-x", 7), Duration::from_secs(2))
        .await
        .unwrap();
    assert!(matches!(
        next_event(&mut events, "put node-x").await,
        NodeEvent::Put(..)
    ));
    // Kept alive past its TTL while the agent lives.
    let trips = watcher.connection().round_trips();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(names(&watcher.list().await.unwrap()), ["node-x"]);

    let t = Instant::now();
    drop(agent);
    let event = next_event(&mut events, "delete node-x").await;
    eprintln!(
        "lease of 2 s expired; Delete seen {:?} after the keep-alive stopped",
        t.elapsed()
    );
    assert!(
        matches!(&event, NodeEvent::Delete(name, _) if name == "node-x"),
        "{event:?}"
    );
    // The watch stream outlived the 3 s request deadline without being reopened: the only
    // request since is the list.
    assert_eq!(watcher.connection().round_trips(), trips + 1);
    assert!(watcher.list().await.unwrap().nodes.is_empty());
}

/// A record that does not decode is an error item in the watch (code 5), which goes on; the
/// list leaves it out instead of failing for every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_records_are_reported_not_fatal() {
    let Some(etcd) = Etcd::start("registry-corrupt").await else {
        return;
    };
    let registry = EtcdRegistry::connect(&etcd.config()).await.unwrap();
    let start = registry.list().await.unwrap();
    let mut events = registry.watch(start.revision).await.unwrap();
    let mut raw = etcd.raw_client().await.unwrap();
    raw.put(registry.key_of("garbage"), "{not json", None)
        .await
        .unwrap();
    match tokio::time::timeout(EVENT_DEADLINE, events.next()).await {
        Ok(Some(Err(e))) => {
            assert_eq!(e.code().0, 5, "{e}");
            assert!(e.to_string().contains("garbage"), "{e}");
        }
        other => panic!("expected an error item, got {other:?}"),
    }
    registry
        .register(&node("good", 1), Duration::from_secs(10))
        .await
        .unwrap();
    let event = next_event(&mut events, "put after the corrupt record").await;
    assert!(
        matches!(&event, NodeEvent::Put(r, _) if r.name == "good"),
        "{event:?}"
    );
    assert_eq!(names(&registry.list().await.unwrap()), ["good"]);
}

/// The lease is lost under a live registration (revoked behind its back, as when etcd lost its
/// data): the keep-alive grants a new lease and writes the record again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_lease_is_granted_again() {
    let Some(etcd) = Etcd::start("registry-lost-lease").await else {
        return;
    };
    let agent = EtcdRegistry::connect(&etcd.config()).await.unwrap();
    let watcher = EtcdRegistry::connect(&etcd.config()).await.unwrap();
    let start = watcher.list().await.unwrap();
    let mut events = watcher.watch(start.revision).await.unwrap();
    let record = node("node-l", 5);
    agent
        .register(&record, Duration::from_secs(3))
        .await
        .unwrap();
    assert!(matches!(
        next_event(&mut events, "put").await,
        NodeEvent::Put(..)
    ));

    let mut raw = etcd.raw_client().await.unwrap();
    let key = agent.key_of("node-l");
    let lease = raw.get(key.as_str(), None).await.unwrap().kvs()[0].lease();
    assert_ne!(lease, 0, "the record is on a lease");
    raw.lease_revoke(lease).await.unwrap();

    let t = Instant::now();
    let event = next_event(&mut events, "delete on revoke").await;
    assert!(
        matches!(&event, NodeEvent::Delete(n, _) if n == "node-l"),
        "{event:?}"
    );
    let event = next_event(&mut events, "put again").await;
    eprintln!(
        "record written again {:?} after its lease was revoked",
        t.elapsed()
    );
    assert!(
        matches!(&event, NodeEvent::Put(r, _) if *r == record),
        "{event:?}"
    );
    let new_lease = raw.get(key.as_str(), None).await.unwrap().kvs()[0].lease();
    assert!(
        new_lease != 0 && new_lease != lease,
        "{new_lease} vs {lease}"
    );
    // And the new lease is kept alive.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(names(&watcher.list().await.unwrap()), ["node-l"]);
}

/// Watching from a compacted revision yields a Reset with the current nodes, then goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_leads_to_reset() {
    let Some(etcd) = Etcd::start("registry-compact").await else {
        return;
    };
    let agent = EtcdRegistry::connect(&etcd.config()).await.unwrap();
    let watcher = EtcdRegistry::connect(&etcd.config()).await.unwrap();
    let old = watcher.list().await.unwrap();
    agent
        .register(&node("n1", 1), Duration::from_secs(10))
        .await
        .unwrap();
    agent
        .register(&node("n2", 2), Duration::from_secs(10))
        .await
        .unwrap();
    agent.deregister("n1").await.unwrap();
    let now = watcher.list().await.unwrap();
    let mut raw = etcd.raw_client().await.unwrap();
    raw.compact(i64::try_from(now.revision).unwrap(), None)
        .await
        .unwrap();

    let mut events = watcher.watch(old.revision).await.unwrap();
    let NodeEvent::Reset(nodes, rev) = next_event(&mut events, "reset").await else {
        panic!("expected a Reset");
    };
    assert_eq!(nodes, vec![node("n2", 2)]);
    assert!(rev >= now.revision);

    agent
        .register(&node("n3", 3), Duration::from_secs(10))
        .await
        .unwrap();
    let event = next_event(&mut events, "put after reset").await;
    assert!(
        matches!(&event, NodeEvent::Put(r, rr) if r.name == "n3" && *rr > rev),
        "{event:?}"
    );
}

/// A watch or a registration against an unreachable etcd fails at once with code 11.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_registry_is_code_11() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = Config::new([format!("http://127.0.0.1:{port}")]);
    config.timeout_ms = 2_000;
    let registry = EtcdRegistry::connect(&config).await.unwrap();
    let e = registry.watch(0).await.err().expect("no etcd, no watch");
    assert_eq!(e.code().0, 11, "{e}");
    let e = registry
        .register(&node("n", 1), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(e.code().0, 11, "{e}");
    let e = registry.list().await.unwrap_err();
    assert_eq!(e.code().0, 11, "{e}");
}
