//! The node registry on a real kube-apiserver (with its own etcd, in a network namespace of
//! the test's own: `testkit::kube`): records as `NetworkNode`s, liveness as Leases, watches
//! that resume and relist. Needs root and the binary `scripts/kube-apiserver.sh` builds;
//! skips loudly otherwise.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cni_core::registry::{NodeEvent, NodeRecord, NodeRegistry};
use futures::StreamExt;
use futures::stream::BoxStream;
use ipam_crd::resources::NetworkNode;
use ipam_crd::{Config, KubeRegistry};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use testkit::kube::KubeApi;

/// A generous bound for things that take a moment on a busy machine: a deadline, not a
/// timing.
const DEADLINE: Duration = Duration::from_secs(60);

/// Starts a server, installs the CRDs and waits until they and `kube-system` are there.
async fn server(test: &str, tag: &str) -> Option<KubeApi> {
    let api = KubeApi::start(test, tag).await?;
    api.install_crds(&ipam_crd::resources::crds()).await;
    Some(api)
}

async fn registry(api: &KubeApi) -> KubeRegistry {
    let mut config = Config::new(Some(api.kubeconfig()));
    config.timeout_ms = 60_000;
    KubeRegistry::new(api.client().await, &config)
}

fn record(name: &str, last: u8) -> NodeRecord {
    NodeRecord {
        name: name.into(),
        address: format!("192.0.2.{last}").parse().unwrap(),
        prefix_len: 24,
        blocks: vec![format!("10.80.{last}.0/26").parse().unwrap()],
        backend: BTreeMap::from([("vtepMac".into(), format!("02:00:00:00:00:{last:02x}"))]),
    }
}

/// The live set a watch converges to: events applied as the agent applies them.
#[derive(Default)]
struct Follower {
    peers: BTreeMap<String, NodeRecord>,
    resets: usize,
}

impl Follower {
    fn apply(&mut self, event: NodeEvent) {
        match event {
            NodeEvent::Put(r, _) => {
                self.peers.insert(r.name.clone(), r);
            }
            NodeEvent::Delete(n, _) => {
                self.peers.remove(&n);
            }
            NodeEvent::Reset(all, _) => {
                self.resets += 1;
                self.peers = all.into_iter().map(|r| (r.name.clone(), r)).collect();
            }
        }
    }

    /// Applies events until `done` holds; panics after [`DEADLINE`].
    async fn until(
        &mut self,
        events: &mut BoxStream<'static, cni_core::Result<NodeEvent>>,
        what: &str,
        done: impl Fn(&Self) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !done(self) {
            match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(Some(Ok(event))) => self.apply(event),
                Ok(Some(Err(e))) => panic!("{what}: watch error {e}"),
                Ok(None) => panic!("{what}: the watch ended"),
                Err(_) => panic!("{what}: not within {DEADLINE:?}; peers {:?}", self.peers),
            }
        }
    }

    fn names(&self) -> Vec<&str> {
        self.peers.keys().map(String::as_str).collect()
    }
}

/// Two registry clients (two agents): each registers, each lists both, a watch from the
/// list's revision sees the other's change and deregistration, and deregistering removes
/// both objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_register_list_and_watch() {
    let Some(api) = server("two_clients_register_list_and_watch", "kreg").await else {
        return;
    };
    let a = registry(&api).await;
    let b = registry(&api).await;
    a.register(&record("n1", 1), Duration::from_secs(20))
        .await
        .unwrap();
    let list = b.list().await.unwrap();
    assert_eq!(list.nodes, vec![record("n1", 1)]);
    assert!(list.revision > 0);
    let mut events = b.watch(list.revision).await.unwrap();
    let mut follower = Follower {
        peers: list
            .nodes
            .iter()
            .map(|r| (r.name.clone(), r.clone()))
            .collect(),
        resets: 0,
    };
    b.register(&record("n2", 2), Duration::from_secs(20))
        .await
        .unwrap();
    follower
        .until(&mut events, "n2 appears", |f| f.names() == ["n1", "n2"])
        .await;
    // Idempotent, and a changed record is seen as such.
    let mut changed = record("n1", 1);
    changed.blocks.push("10.80.100.0/26".parse().unwrap());
    a.register(&changed, Duration::from_secs(20)).await.unwrap();
    a.register(&changed, Duration::from_secs(20)).await.unwrap();
    follower
        .until(&mut events, "n1 changes", |f| f.peers["n1"] == changed)
        .await;
    assert_eq!(
        a.list().await.unwrap().nodes,
        vec![changed.clone(), record("n2", 2)]
    );

    a.deregister("n1").await.unwrap();
    a.deregister("n1").await.unwrap();
    follower
        .until(&mut events, "n1 leaves", |f| f.names() == ["n2"])
        .await;
    assert_eq!(follower.resets, 0, "no history was lost");
    let client = api.client().await;
    let records: Api<NetworkNode> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, "kube-system");
    assert!(records.get_opt("cnikit.n1").await.unwrap().is_none());
    assert!(leases.get_opt("cnikit.n1").await.unwrap().is_none());
    let lease = leases.get("cnikit.n2").await.unwrap();
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("n2"));
    assert_eq!(spec.lease_duration_seconds, Some(20));
    assert_eq!(
        records.get("cnikit.n2").await.unwrap().spec.address,
        "192.0.2.2"
    );

    // A name that is not a Kubernetes object name: code 7.
    let e = a
        .register(&record("Node_1", 3), Duration::from_secs(20))
        .await
        .unwrap_err();
    assert_eq!(e.code().0, 7, "{e}");
}

/// A node that stops renewing its Lease (its agent died: the registry dropped without
/// deregistering) leaves the live peers once the Lease expires — the watch says so without
/// any other write — while its record stays; its Lease had indeed expired by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_is_not_renewed_expires() {
    let Some(api) = server("a_lease_that_is_not_renewed_expires", "klease").await else {
        return;
    };
    let watcher = registry(&api).await;
    watcher
        .register(&record("n1", 1), Duration::from_secs(30))
        .await
        .unwrap();
    let dying = registry(&api).await;
    dying
        .register(&record("n2", 2), Duration::from_secs(3))
        .await
        .unwrap();
    let list = watcher.list().await.unwrap();
    let mut follower = Follower::default();
    follower.apply(NodeEvent::Reset(list.nodes, list.revision));
    assert_eq!(follower.names(), ["n1", "n2"]);
    let mut events = watcher.watch(list.revision).await.unwrap();
    // Renewed while the registry lives: still live after several lease durations.
    let leases: Api<Lease> = Api::namespaced(api.client().await, "kube-system");
    let renewed_at = |l: &Lease| l.spec.as_ref().and_then(|s| s.renew_time.clone());
    let first = renewed_at(&leases.get("cnikit.n2").await.unwrap());
    until("the lease is not renewed", async || {
        renewed_at(&leases.get("cnikit.n2").await.unwrap()) != first
    })
    .await;
    assert!(
        watcher
            .list()
            .await
            .unwrap()
            .nodes
            .iter()
            .any(|n| n.name == "n2")
    );

    drop(dying);
    follower
        .until(&mut events, "n2 expires", |f| f.names() == ["n1"])
        .await;
    let lease = leases.get("cnikit.n2").await.unwrap();
    let spec = lease.spec.unwrap();
    let expiry = spec
        .renew_time
        .unwrap()
        .0
        .checked_add(Duration::from_secs(3))
        .unwrap();
    let now = k8s_openapi::jiff::Timestamp::now();
    assert!(
        expiry <= now,
        "n2 left before its lease expired ({expiry} > {now})"
    );
    println!(
        "n2 left the live set {} after its lease expired",
        now - expiry
    );
    assert_eq!(
        watcher.list().await.unwrap().nodes,
        vec![record("n1", 1)],
        "an expired node is not listed"
    );
    let records: Api<NetworkNode> = Api::all(api.client().await);
    assert!(
        records.get_opt("cnikit.n2").await.unwrap().is_some(),
        "the record of a dead node stays (it may come back)"
    );

    // It comes back: live again.
    let back = registry(&api).await;
    back.register(&record("n2", 2), Duration::from_secs(3))
        .await
        .unwrap();
    follower
        .until(&mut events, "n2 is back", |f| f.names() == ["n1", "n2"])
        .await;
    back.deregister("n2").await.unwrap();
}

/// What dead nodes leave (a record and a Lease no longer renewed) is pruned once the pruner
/// has seen the Lease unrenewed for two lease durations; a live node is never pruned, and a
/// live node whose record is deleted writes it again. A Lease without a record goes by the
/// same rule, a record without a Lease once it has been seen so for the orphan age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_nodes_are_pruned_and_live_ones_are_not() {
    let Some(api) = server("dead_nodes_are_pruned_and_live_ones_are_not", "kprune").await else {
        return;
    };
    let client = api.client().await;
    let records: Api<NetworkNode> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, "kube-system");
    let pruner = registry(&api).await.with_orphan_age(Duration::from_secs(2));
    pruner
        .register(&record("n1", 1), Duration::from_secs(3))
        .await
        .unwrap();
    let dying = registry(&api).await;
    let ttl = Duration::from_secs(2);
    dying.register(&record("n2", 2), ttl).await.unwrap();
    drop(dying);

    // The first look only starts the pruner's clock.
    let first_look = Instant::now();
    assert!(pruner.prune_expired().await.unwrap().is_empty());
    let pruned = until_pruned(&pruner).await;
    assert_eq!(pruned, ["n2"], "only the dead node");
    assert!(
        first_look.elapsed() >= ttl * 2,
        "pruned {:?} after the first look, before two lease durations",
        first_look.elapsed()
    );
    assert!(records.get_opt("cnikit.n2").await.unwrap().is_none());
    assert!(leases.get_opt("cnikit.n2").await.unwrap().is_none());
    assert_eq!(pruner.list().await.unwrap().nodes, vec![record("n1", 1)]);

    // n1's record deleted by hand: a later renewal (every 10th, each second) writes it again.
    records
        .delete("cnikit.n1", &Default::default())
        .await
        .unwrap();
    until("n1's record does not come back", async || {
        pruner.list().await.unwrap().nodes == vec![record("n1", 1)]
    })
    .await;

    // A Lease without a record and a record without a Lease, both left by hand.
    let label = || {
        Some(BTreeMap::from([(
            ipam_crd::resources::PREFIX_LABEL.to_owned(),
            "cnikit".to_owned(),
        )]))
    };
    let orphan = Lease {
        metadata: ObjectMeta {
            name: Some("cnikit.n3".into()),
            labels: label(),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("n3".into()),
            lease_duration_seconds: Some(1),
            renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            ..Default::default()
        }),
    };
    leases
        .create(&PostParams::default(), &orphan)
        .await
        .unwrap();
    let mut alone = NetworkNode::new("cnikit.n4", (&record("n4", 4)).into());
    alone.metadata.labels = label();
    records
        .create(&PostParams::default(), &alone)
        .await
        .unwrap();
    assert!(
        pruner.prune_expired().await.unwrap().is_empty(),
        "seen for the first time"
    );
    assert!(leases.get_opt("cnikit.n3").await.unwrap().is_some());
    assert!(records.get_opt("cnikit.n4").await.unwrap().is_some());
    assert_eq!(until_pruned(&pruner).await, ["n4"]);
    assert!(records.get_opt("cnikit.n4").await.unwrap().is_none());
    until("the orphan Lease is never pruned", async || {
        if leases.get_opt("cnikit.n3").await.unwrap().is_none() {
            return true;
        }
        pruner.prune_expired().await.unwrap();
        false
    })
    .await;
    assert!(
        leases.get_opt("cnikit.n1").await.unwrap().is_some()
            && records.get_opt("cnikit.n1").await.unwrap().is_some(),
        "the live node keeps both"
    );
    pruner.deregister("n1").await.unwrap();
}

/// Calls `prune_expired` until it prunes something; what it pruned.
async fn until_pruned(pruner: &KubeRegistry) -> Vec<String> {
    let mut pruned = Vec::new();
    until("nothing is ever pruned", async || {
        pruned = pruner.prune_expired().await.unwrap();
        !pruned.is_empty()
    })
    .await;
    pruned
}

/// Polls `done` every 200 ms until it holds; panics with `what` after [`DEADLINE`].
async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done().await {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A watch from a revision the server no longer has (before the watch cache began, or
/// compacted away in etcd) gets 410 Gone, lists again, says Reset with the live set, and
/// goes on delivering changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_revision_relists_and_converges() {
    let Some(api) = server("a_gone_revision_relists_and_converges", "kgone").await else {
        return;
    };
    let a = registry(&api).await;
    a.register(&record("n1", 1), Duration::from_secs(20))
        .await
        .unwrap();
    let old = a.list().await.unwrap().revision;
    for i in 2..=4 {
        a.register(&record(&format!("n{i}"), i), Duration::from_secs(20))
            .await
            .unwrap();
    }

    // Revision 1 is in etcd's history but before the server's watch cache: the list at it
    // works, the watch from it is answered 410.
    let mut events = a.watch(1).await.unwrap();
    let mut follower = Follower::default();
    follower
        .until(&mut events, "the relist", |f| {
            f.resets > 0 && f.peers.len() == 4
        })
        .await;
    a.register(&record("n5", 5), Duration::from_secs(20))
        .await
        .unwrap();
    a.deregister("n2").await.unwrap();
    follower
        .until(&mut events, "changes after the relist", |f| {
            f.names() == ["n1", "n3", "n4", "n5"]
        })
        .await;

    // Compact etcd's history past `old` (etcd's JSON gateway, inside the server's
    // namespace): a watch from `old` cannot read it any more and starts with a Reset.
    let now = a.list().await.unwrap().revision;
    if !testkit::on_path("curl") {
        testkit::skip(
            "a_gone_revision_relists_and_converges",
            "curl is missing: the etcd compaction part is not run",
        );
        return;
    }
    let out = api
        .command("curl")
        .args([
            "-sS",
            "-X",
            "POST",
            "http://127.0.0.1:2379/v3/kv/compaction",
            "-d",
        ])
        .arg(format!(r#"{{"revision": "{now}", "physical": true}}"#))
        .output()
        .unwrap();
    assert!(out.status.success(), "compaction: {out:?}");
    let mut events = a.watch(old).await.unwrap();
    let mut follower = Follower::default();
    follower
        .until(&mut events, "the reset after compaction", |f| {
            f.resets > 0 && f.names() == ["n1", "n3", "n4", "n5"]
        })
        .await;
    a.deregister("n3").await.unwrap();
    follower
        .until(&mut events, "a change after the reset", |f| {
            f.names() == ["n1", "n4", "n5"]
        })
        .await;
}
