//! The Kubernetes store and the block engine against a real kube-apiserver (with its own
//! etcd, in a network namespace of the test's own: `testkit::kube`). Needs root and the
//! binary `scripts/kube-apiserver.sh` builds; skips loudly otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use cni_core::ipam::{Attachment, BlockIpam, BlockIpamConfig, Ipam};
use cni_core::registry::{NodeEvent, NodeRegistry};
use cni_core::store::{Compare, Store, Txn, TxnOutcome};
use futures::StreamExt;
use ipam_crd::{Config, KubeRegistry, KubeStore};
use kube::api::{Api, PostParams};
use testkit::kube::KubeApi;

/// Starts a server and installs the CRDs of `deploy/crds/`; waits until they are served.
async fn server(test: &str, tag: &str) -> Option<KubeApi> {
    let api = KubeApi::start(test, tag).await?;
    api.install_crds(&ipam_crd::resources::crds()).await;
    Some(api)
}

async fn store(api: &KubeApi) -> KubeStore {
    let mut config = Config::new(Some(api.kubeconfig()));
    // A deadline, not a timing: the test machine may be busy with other builds.
    config.timeout_ms = 60_000;
    KubeStore::new(api.client().await, &config)
}

fn config(pool: &str, block: u8, node: &str) -> BlockIpamConfig {
    let mut c = BlockIpamConfig::new(pool.parse().unwrap(), node, "net");
    c.block_prefix = block;
    c
}

fn att(container: &str) -> Attachment {
    Attachment::new("net", container, "eth0")
}

/// Requests `op` costs on `store`.
async fn requests<T>(store: &KubeStore, op: impl Future<Output = T>) -> (T, u64) {
    let before = store.requests();
    let out = op.await;
    (out, store.requests() - before)
}

#[test]
fn the_checked_in_crds_are_current() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/crds/ipam.cnikit.io.yaml"
    );
    let checked_in = std::fs::read_to_string(path).expect("deploy/crds/ipam.cnikit.io.yaml");
    assert!(
        checked_in == ipam_crd::resources::crds_yaml(),
        "{path} is stale: cargo run -p ipam-crd --example crds > deploy/crds/ipam.cnikit.io.yaml"
    );
}

/// ADD twice for one attachment gives the same address; once the node holds a block an
/// allocation is two API requests, a repeated one a single read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_is_idempotent_in_two_requests() {
    let Some(api) = server("allocation_is_idempotent_in_two_requests", "kidem").await else {
        return;
    };
    let store = store(&api).await;
    let ipam = BlockIpam::new(store.clone(), config("10.70.0.0/16", 26, "n1")).unwrap();
    let first = ipam.allocate(&att("c0")).await.unwrap();
    let again = ipam.allocate(&att("c0")).await.unwrap();
    assert!(again.existing);
    assert_eq!(first.ips, again.ips, "ADD twice: the same address");
    let mut seen = BTreeSet::from([first.ips[0].address.addr()]);
    for i in 1..=20 {
        let (r, n) = requests(&store, ipam.allocate(&att(&format!("c{i}")))).await;
        assert!(seen.insert(r.unwrap().ips[0].address.addr()));
        assert_eq!(n, 2, "allocation {i}: read the node, replace it");
    }
    let (r, n) = requests(&store, ipam.allocate(&att("c3"))).await;
    assert!(r.unwrap().existing);
    assert_eq!(n, 1, "a repeated ADD only reads");
    ipam.release(&att("c3")).await.unwrap();
    ipam.release(&att("c3")).await.unwrap();
    assert_eq!(ipam.allocations().await.unwrap().len(), 20);
    assert_eq!(ipam.audit().await.unwrap(), Vec::<String>::new());
}

/// A commit from a stale read gets 409 Conflict, re-reads and retries: it applies when its
/// own compares still hold, and fails with the current values when they do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_resource_version_is_retried() {
    let Some(api) = server("a_stale_resource_version_is_retried", "kstale").await else {
        return;
    };
    let a = store(&api).await;
    let b = store(&api).await;
    let key = |k: &str| format!("/cnikit/nodes/n1/{k}");
    let put = |k: &str| {
        Txn::new()
            .when(Compare::Absent(key(k)))
            .put(key(k), b"{}".to_vec())
    };
    assert!(matches!(
        a.commit(put("x")).await.unwrap(),
        TxnOutcome::Committed(_)
    ));
    // `a` now holds the object at its resourceVersion; `b` writes another record of it.
    assert!(matches!(
        b.commit(put("y")).await.unwrap(),
        TxnOutcome::Committed(_)
    ));
    assert_eq!(a.conflicts(), 0);
    // `a`'s replace carries the stale resourceVersion: 409, re-read, compares hold, retry.
    assert!(matches!(
        a.commit(put("z")).await.unwrap(),
        TxnOutcome::Committed(_)
    ));
    assert_eq!(a.conflicts(), 1, "one 409 Conflict");
    let keys: Vec<String> = a
        .list(&key(""))
        .await
        .unwrap()
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, [key("x"), key("y"), key("z")], "no write lost");
    // Now `b` is stale and compares a record `a` changed: the compare fails after the 409.
    let seen = b.get(&key("x")).await.unwrap().unwrap();
    assert!(matches!(
        a.commit(
            Txn::new()
                .when(Compare::ModRevision(key("x"), seen.mod_revision))
                .put(key("x"), b"{\"v\":1}".to_vec())
        )
        .await
        .unwrap(),
        TxnOutcome::Committed(_)
    ));
    let stale = Txn::new()
        .when(Compare::ModRevision(key("x"), seen.mod_revision))
        .put(key("x"), b"{\"v\":2}".to_vec());
    match b.commit(stale).await.unwrap() {
        TxnOutcome::Failed(current) => {
            assert_eq!(current.len(), 1);
            assert_eq!(current[0].value, b"{\"v\":1}");
        }
        TxnOutcome::Committed(_) => panic!("a stale compare must not apply"),
    }
}

/// Four nodes with 64 concurrent allocations each (every one with its own client, as
/// separate plugin processes have) on a pool with no spare block: 256 distinct addresses,
/// each block's addresses on one node; releasing all leaves nothing; the same again works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_nodes_race_64_allocations_each() {
    let Some(api) = server("four_nodes_race_64_allocations_each", "krace").await else {
        return;
    };
    // 4 blocks of /26 (62 usable each with the default reserve... so no reserve here).
    let pool = "10.80.0.0/24";
    let mk = |node: &str| {
        let mut c = config(pool, 26, node);
        c.reserve = cni_core::ipam::block::Reserve::None;
        c
    };
    for round in 0..2 {
        let mut tasks = Vec::new();
        for n in 0..4 {
            for i in 0..64 {
                let s = store(&api).await;
                let ipam = BlockIpam::new(s, mk(&format!("n{n}"))).unwrap();
                tasks.push(tokio::spawn(async move {
                    let a = ipam.allocate(&att(&format!("r{round}-n{n}-{i}"))).await;
                    (n, a)
                }));
            }
        }
        let mut by_node: BTreeMap<u32, Vec<IpAddr>> = BTreeMap::new();
        let mut all = BTreeSet::new();
        for t in tasks {
            let (n, a) = t.await.unwrap();
            let ip = a
                .unwrap_or_else(|e| panic!("round {round} node n{n}: {e}"))
                .ips[0]
                .address
                .addr();
            assert!(all.insert(ip), "{ip} handed out twice");
            by_node.entry(n).or_default().push(ip);
        }
        assert_eq!(all.len(), 256);
        let mut block_node: BTreeMap<String, u32> = BTreeMap::new();
        for (n, ips) in &by_node {
            for ip in ips {
                let IpAddr::V4(v4) = ip else { unreachable!() };
                let block = format!("{}", v4.octets()[3] / 64);
                let owner = block_node.entry(block.clone()).or_insert(*n);
                assert_eq!(owner, n, "block {block} has addresses on two nodes");
            }
        }
        let audit = BlockIpam::new(store(&api).await, mk("n0")).unwrap();
        assert_eq!(audit.audit().await.unwrap(), Vec::<String>::new());
        for n in 0..4 {
            let ipam = BlockIpam::new(store(&api).await, mk(&format!("n{n}"))).unwrap();
            let report = ipam.gc(&[]).await.unwrap();
            assert_eq!(report.released.len(), 64);
            assert!(ipam.allocations().await.unwrap().is_empty());
            ipam.leave().await.unwrap();
        }
        let left = store(&api).await.list("/cnikit/").await.unwrap();
        assert!(
            !left.iter().any(|kv| kv.key.contains("/used/")
                || kv.key.contains("/handles/")
                || kv.key.contains("/blocks/")),
            "after DEL of all: {left:#?}"
        );
    }
}

/// The rules of `deploy/crds/rbac.yaml` are enough for every store operation of the engine
/// (allocate, release, give back, audit) and every registry operation (register, renew,
/// list, watch, deregister), and nothing more: without them the store and the registry get
/// code 7 naming the refusal, with them they work, and deleting an IPAM object or a Lease
/// outside the registry's namespace stays forbidden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rbac_manifest_grants_what_the_store_uses() {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    use serde::Deserialize;

    let Some(api) = server("the_rbac_manifest_grants_what_the_store_uses", "krbac").await else {
        return;
    };
    let admin = api.client().await;
    let node_client = api.client_for(testkit::kube::NODE_TOKEN).await;
    let node_store = KubeStore::new(node_client.clone(), &Config::new(None));
    let ipam = BlockIpam::new(node_store.clone(), config("10.72.0.0/24", 26, "n1")).unwrap();
    let refused = ipam.allocate(&att("c0")).await.unwrap_err();
    assert_eq!(refused.code().0, 7, "{refused}");
    assert!(
        refused.to_string().contains("403") || format!("{refused:?}").contains("403"),
        "{refused:?}"
    );

    // The registry (records, Leases) is refused too.
    let node_registry = KubeRegistry::new(node_client.clone(), &Config::new(None));
    let refused = node_registry.list().await.unwrap_err();
    assert_eq!(refused.code().0, 7, "{refused}");

    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds/rbac.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    // The manifest binds the DaemonSet's service account; here the test's node user.
    let user = vec![k8s_openapi::api::rbac::v1::Subject {
        kind: "User".into(),
        name: "cnikit-node".into(),
        api_group: Some("rbac.authorization.k8s.io".into()),
        namespace: None,
    }];
    let mut kinds = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_json::Value::deserialize(doc).unwrap();
        let kind = value["kind"].as_str().unwrap_or_default().to_owned();
        let pp = PostParams::default();
        match kind.as_str() {
            "ClusterRole" => drop(
                Api::<ClusterRole>::all(admin.clone())
                    .create(&pp, &serde_json::from_value(value).unwrap())
                    .await
                    .unwrap(),
            ),
            "Role" => drop(
                Api::<Role>::namespaced(admin.clone(), "kube-system")
                    .create(&pp, &serde_json::from_value(value).unwrap())
                    .await
                    .unwrap(),
            ),
            "ClusterRoleBinding" => {
                let mut binding: ClusterRoleBinding = serde_json::from_value(value).unwrap();
                binding.subjects = Some(user.clone());
                Api::<ClusterRoleBinding>::all(admin.clone())
                    .create(&pp, &binding)
                    .await
                    .unwrap();
            }
            "RoleBinding" => {
                let mut binding: RoleBinding = serde_json::from_value(value).unwrap();
                binding.subjects = Some(user.clone());
                Api::<RoleBinding>::namespaced(admin.clone(), "kube-system")
                    .create(&pp, &binding)
                    .await
                    .unwrap();
            }
            other => panic!("{path}: unexpected kind {other:?}"),
        }
        kinds.push(kind);
    }
    assert_eq!(
        kinds,
        ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"]
    );

    // The authorizer learns of the binding from its own watch: wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        match ipam.allocate(&att("c0")).await {
            Ok(a) => break a,
            Err(e) if Instant::now() < deadline && e.code().0 == 7 => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("allocate with the manifest's rights: {e}"),
        }
    };
    assert!(!first.existing);
    for i in 1..5 {
        ipam.allocate(&att(&format!("c{i}"))).await.unwrap();
    }
    ipam.release(&att("c1")).await.unwrap();
    ipam.gc(&[att("c0")]).await.unwrap();
    ipam.release(&att("c0")).await.unwrap();
    assert!(
        !ipam.leave().await.unwrap().is_empty(),
        "the empty block goes back"
    );
    assert_eq!(ipam.audit().await.unwrap(), Vec::<String>::new());
    // No delete: the store never deletes an object, so the role does not allow it.
    let nodes: Api<ipam_crd::resources::IPAMNode> = Api::all(node_client.clone());
    match nodes.delete("cnikit.n1", &Default::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403),
        other => panic!("delete must be forbidden: {other:?}"),
    }

    // The registry: register (record and Lease), renew, list, watch, deregister.
    let record = cni_core::registry::NodeRecord {
        name: "n1".into(),
        address: "192.0.2.10".parse().unwrap(),
        prefix_len: 24,
        blocks: vec!["10.72.0.0/26".parse().unwrap()],
        backend: Default::default(),
    };
    node_registry
        .register(&record, Duration::from_secs(5))
        .await
        .unwrap();
    let list = node_registry.list().await.unwrap();
    assert_eq!(list.nodes, vec![record.clone()]);
    // The pruner's reads (every node's record and Lease) are within the node's rights.
    assert!(node_registry.prune_expired().await.unwrap().is_empty());
    let mut events = node_registry.watch(list.revision).await.unwrap();
    // Renewals go on (they would log and retry if refused): still live after two TTLs. 5 s:
    // a renewal every 1.7 s leaves a loaded machine 3 s of slack before the lease lapses.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(node_registry.list().await.unwrap().nodes, vec![record]);
    node_registry.deregister("n1").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(Ok(NodeEvent::Delete(name, _)))) if name == "n1" => break,
            Ok(Some(Ok(_))) => {}
            other => panic!("no Delete of n1 from the watch: {other:?}"),
        }
    }
    // Leases elsewhere (kubelet's namespace) stay out of reach.
    let elsewhere: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(node_client, "kube-node-lease");
    match elsewhere.list(&Default::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403),
        other => panic!("leases outside kube-system must be forbidden: {other:?}"),
    }
}
