//! The block IPAM engine on a real etcd, in-process: how many etcd round trips each
//! operation costs, and many engines (each with its own connection) racing on several nodes.
//! Each test starts its own etcd (see `common`); they skip loudly without the `etcd` binary.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;

use cni_core::ipam::{Attachment, BlockIpam, BlockIpamConfig, Ipam};
use common::Etcd;
use futures::future::join_all;
use ipam_etcd::EtcdStore;
use ipnet::IpNet;

fn config(store: &EtcdStore, pool: &str, node: &str) -> BlockIpamConfig {
    let mut c = BlockIpamConfig::new(pool.parse().unwrap(), node, "net");
    c.block_prefix = 26;
    c.key_prefix = store.prefix().to_owned();
    c
}

fn att(container: &str) -> Attachment {
    Attachment::new("net", container, "eth0")
}

/// Counts the round trips `op` costs on `store`.
async fn trips<T>(store: &EtcdStore, op: impl Future<Output = T>) -> (T, u64) {
    let before = store.round_trips();
    let out = op.await;
    (out, store.round_trips() - before)
}

/// Once the node holds a block, an allocation is one list and one transaction; so is a
/// release; a repeated ADD, a CHECK and a GC with nothing stale are one list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_per_operation() {
    let Some(etcd) = Etcd::start("engine-trips").await else {
        return;
    };
    let store = EtcdStore::connect(&etcd.config()).await.unwrap();
    let ipam = BlockIpam::new(store.clone(), config(&store, "10.90.0.0/16", "n1")).unwrap();

    let (first, n) = trips(&store, ipam.allocate(&att("c0"))).await;
    first.unwrap();
    // List the node; read and create the pool record; list the owned blocks; the claim's
    // three one-object steps (pending affinity, ownership, confirmation); list the node
    // again; allocate.
    assert_eq!(n, 9, "the first allocation claims a block");
    for i in 1..=40 {
        let (r, n) = trips(&store, ipam.allocate(&att(&format!("c{i}")))).await;
        r.unwrap();
        assert_eq!(n, 2, "allocation {i} in a claimed block");
    }
    let (r, n) = trips(&store, ipam.allocate(&att("c7"))).await;
    r.unwrap();
    assert_eq!(n, 1, "a repeated ADD only reads");
    let (r, n) = trips(&store, ipam.check(&att("c7"))).await;
    r.unwrap();
    assert_eq!(n, 1, "CHECK");
    let (r, n) = trips(&store, ipam.release(&att("c7"))).await;
    r.unwrap();
    assert_eq!(n, 2, "release");
    let (r, n) = trips(&store, ipam.release(&att("c7"))).await;
    r.unwrap();
    assert_eq!(n, 1, "releasing what is not held only reads");
    let valid: Vec<Attachment> = (0..=40).map(|i| att(&format!("c{i}"))).collect();
    let (r, n) = trips(&store, ipam.gc(&valid)).await;
    assert!(r.unwrap().released.is_empty());
    assert_eq!(n, 1, "GC with nothing stale");
    // Released addresses are reused at the same cost.
    let (r, n) = trips(&store, ipam.allocate(&att("again"))).await;
    r.unwrap();
    assert_eq!(n, 2);
    assert!(ipam.audit().await.unwrap().is_empty());
}

/// 4 nodes × 8 engines, each with its own etcd connection, 6 allocations each, all at once:
/// distinct addresses inside each node's own blocks; then everything is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_racing_on_four_nodes() {
    let Some(etcd) = Etcd::start("engine-race").await else {
        return;
    };
    let mut engines = Vec::new();
    for node in 0..4 {
        for task in 0..8 {
            let store = EtcdStore::connect(&etcd.config()).await.unwrap();
            let cfg = config(&store, "10.91.0.0/22", &format!("n{node}"));
            engines.push((node, task, BlockIpam::new(store, cfg).unwrap()));
        }
    }
    let runs = engines.iter().map(|(node, task, ipam)| async move {
        let mut got = Vec::new();
        for i in 0..6 {
            let a = att(&format!("n{node}-t{task}-{i}"));
            got.push((
                *node,
                ipam.allocate(&a).await.expect("allocates").ips[0].address,
            ));
        }
        got
    });
    let got: Vec<(usize, IpNet)> = join_all(runs).await.into_iter().flatten().collect();
    let distinct: BTreeSet<IpAddr> = got.iter().map(|(_, a)| a.addr()).collect();
    assert_eq!(distinct.len(), 4 * 8 * 6);
    let inspector = &engines[0].2;
    assert!(inspector.audit().await.unwrap().is_empty());
    for node in 0..4 {
        let blocks = engines[node * 8].2.node_blocks().await.unwrap();
        for (_, a) in got.iter().filter(|(n, _)| *n == node) {
            assert!(
                blocks.iter().any(|b| b.contains(&a.addr())),
                "n{node}: {a} outside {blocks:?}"
            );
        }
    }
    let releases = engines.iter().map(|(node, task, ipam)| async move {
        for i in 0..6 {
            ipam.release(&att(&format!("n{node}-t{task}-{i}")))
                .await
                .expect("releases");
        }
    });
    join_all(releases).await;
    for (node, _, ipam) in engines.iter().step_by(8) {
        assert!(
            ipam.allocations().await.unwrap().is_empty(),
            "n{node} holds nothing"
        );
    }
    assert!(inspector.audit().await.unwrap().is_empty());
}
