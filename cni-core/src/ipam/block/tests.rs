//! Unit tests of the block engine on the in-memory store.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use ipnet::IpNet;

use super::*;
use crate::error::ErrorCode;
use crate::store::MemoryStore;

type Mem = Arc<MemoryStore>;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn config(pool: &str, block: u8, node: &str) -> BlockIpamConfig {
    let mut c = BlockIpamConfig::new(net(pool), node, "net");
    c.block_prefix = block;
    c
}

fn engine(store: &Mem, config: BlockIpamConfig) -> BlockIpam<Mem> {
    BlockIpam::new(Arc::clone(store), config).expect("valid configuration")
}

fn att(cid: &str) -> Attachment {
    Attachment::new("net", cid, "eth0")
}

async fn addr(ipam: &BlockIpam<Mem>, cid: &str) -> IpAddr {
    let a = ipam.allocate(&att(cid)).await.expect("allocates");
    assert_eq!(a.ips.len(), 1);
    a.ips[0].address.addr()
}

async fn assert_consistent(ipam: &BlockIpam<Mem>) {
    let problems = ipam.audit().await.unwrap();
    assert!(problems.is_empty(), "inconsistent datastore: {problems:#?}");
    assert_eq!(
        ipam.store().stats().multi_object_commits,
        0,
        "every commit stays within one object (a Kubernetes store can apply it)"
    );
}

fn code(e: &Error) -> u32 {
    e.code().0
}

#[tokio::test]
async fn allocate_is_idempotent_in_two_round_trips() {
    let store = Mem::default();
    let ipam = engine(&store, config("10.244.0.0/16", 26, "n1"));
    let first = ipam.allocate(&att("c1")).await.unwrap();
    let address = first.ips[0].address;
    assert_eq!(address.prefix_len(), 26);
    assert!(net("10.244.0.0/26").contains(&address.addr()), "{address}");
    assert_eq!(first.ips[0].gateway, None, "Reserve::None has no gateway");

    assert!(!first.existing, "a first allocation is new");
    let before = store.stats();
    let repeated = ipam.allocate(&att("c1")).await.unwrap();
    assert!(
        repeated.existing,
        "a repeated allocation says it was there before"
    );
    assert_eq!(repeated.ips, first.ips);
    let again = store.stats();
    assert_eq!(
        (again.lists - before.lists, again.commits - before.commits),
        (1, 0)
    );

    let second = addr(&ipam, "c2").await;
    let after = store.stats();
    assert_eq!(
        (
            after.round_trips() - again.round_trips(),
            after.commits - again.commits
        ),
        (2, 1),
        "an allocation in a held block is one list and one commit"
    );
    assert_ne!(second, address.addr());
    assert_eq!(ipam.check(&att("c1")).await.unwrap(), first);
    assert_consistent(&ipam).await;
}

#[tokio::test]
async fn never_used_addresses_come_lowest_first() {
    let store = Mem::default();
    let ipam = engine(&store, config("10.244.0.0/16", 26, "n1")).with_seed(1);
    let a = addr(&ipam, "c1").await;
    let n = config::to_u128(a) - config::to_u128(ip("10.244.0.0"));
    assert!(
        n < WINDOW as u128,
        "{a} is not among the lowest addresses of the block"
    );
}

#[tokio::test]
async fn release_is_idempotent_and_check_then_fails_with_code_3() {
    let store = Mem::default();
    let ipam = engine(&store, config("10.244.0.0/24", 26, "n1"));
    ipam.release(&att("never"))
        .await
        .expect("releasing nothing is fine");
    addr(&ipam, "c1").await;
    ipam.release(&att("c1")).await.unwrap();
    ipam.release(&att("c1")).await.unwrap();
    let err = ipam.check(&att("c1")).await.unwrap_err();
    assert_eq!(code(&err), 3, "{err}");
    assert!(ipam.allocations().await.unwrap().is_empty());
    assert_consistent(&ipam).await;
}

#[tokio::test]
async fn a_released_address_is_not_handed_out_while_fresh_ones_remain() {
    let store = Mem::default();
    let ipam = engine(&store, config("10.0.0.0/29", 29, "n1"));
    let a = addr(&ipam, "a").await;
    ipam.release(&att("a")).await.unwrap();
    for cid in ["b", "c", "d", "e", "f", "g", "h"] {
        assert_ne!(
            addr(&ipam, cid).await,
            a,
            "{cid} got the address just released"
        );
    }
    assert_eq!(addr(&ipam, "i").await, a, "the last address left");
}

#[tokio::test]
async fn most_recently_released_is_reused_last() {
    let store = Mem::default();
    let ipam = engine(&store, config("10.0.0.0/29", 29, "n1")).with_seed(3);
    let cids: Vec<String> = (0..8).map(|i| format!("c{i}")).collect();
    let mut held = Vec::new();
    for c in &cids {
        held.push(addr(&ipam, c).await);
    }
    let err = ipam.allocate(&att("full")).await.unwrap_err();
    assert_eq!(code(&err), 100, "{err}");
    // Release in a scrambled order; remember the order.
    let order = [5usize, 2, 7, 0, 3, 6, 1, 4];
    let released: Vec<IpAddr> = order.iter().map(|i| held[*i]).collect();
    for i in order {
        ipam.release(&att(&cids[i])).await.unwrap();
    }
    let mut got = Vec::new();
    for i in 0..8 {
        got.push(addr(&ipam, &format!("new{i}")).await);
    }
    assert!(
        released[..4].contains(&got[0]),
        "first reuse {} should be among the oldest releases {:?}",
        got[0],
        &released[..4]
    );
    assert_eq!(got[7], released[7], "the last released is reused last");
    let distinct: BTreeSet<_> = got.iter().collect();
    assert_eq!(distinct.len(), 8);
    assert_consistent(&ipam).await;
}

#[tokio::test]
async fn gateway_reserve_skips_network_gateway_and_last_address() {
    let store = Mem::default();
    let mut c = config("10.1.0.0/28", 29, "n1");
    c.reserve = Reserve::Gateway;
    let ipam = engine(&store, c);
    let mut got = BTreeSet::new();
    for i in 0..10 {
        let a = ipam.allocate(&att(&format!("c{i}"))).await.unwrap();
        let ipc = &a.ips[0];
        assert_eq!(ipc.address.prefix_len(), 29);
        let block = ipc.address.trunc();
        assert_eq!(
            ipc.gateway,
            Some(from_block(&block, 1)),
            "gateway of {block}"
        );
        got.insert(ipc.address.addr());
    }
    let expected: BTreeSet<IpAddr> = (2..7)
        .chain(10..15)
        .map(|i| ip(&format!("10.1.0.{i}")))
        .collect();
    assert_eq!(got, expected);
    let err = ipam.allocate(&att("c10")).await.unwrap_err();
    assert_eq!(code(&err), 100, "{err}");
    assert_consistent(&ipam).await;
}

fn from_block(block: &IpNet, offset: u128) -> IpAddr {
    config::from_u128(block, config::to_u128(block.network()) + offset)
}

#[tokio::test]
async fn ipv6_pools_work() {
    let store = Mem::default();
    let mut c = BlockIpamConfig::new(net("fd00:10::/120"), "n1", "net");
    assert_eq!(c.block_prefix, 122);
    c.reserve = Reserve::Gateway;
    let ipam = engine(&store, c);
    let a = ipam.allocate(&att("c1")).await.unwrap();
    let ipc = &a.ips[0];
    assert_eq!(ipc.address.prefix_len(), 122);
    assert_eq!(ipc.gateway, Some(ip("fd00:10::1")));
    assert!(net("fd00:10::/122").contains(&ipc.address.addr()));
    assert!(ipc.address.addr() >= ip("fd00:10::2") && ipc.address.addr() < ip("fd00:10::3f"));
    assert_eq!(
        ipam.node_blocks().await.unwrap(),
        vec![net("fd00:10::/122")]
    );
    assert!(
        store
            .dump()
            .iter()
            .any(|kv| kv.key == "/cnikit/nodes/n1/blocks/fd00:10::-122"),
        "block keys have no '/'"
    );
    assert_consistent(&ipam).await;
}

#[tokio::test]
async fn a_second_block_is_claimed_when_the_first_is_full() {
    let store = Mem::default();
    let ipam = engine(&store, config("10.2.0.0/24", 29, "n1"));
    for i in 0..8 {
        addr(&ipam, &format!("c{i}")).await;
    }
    assert_eq!(ipam.node_blocks().await.unwrap(), vec![net("10.2.0.0/29")]);
    let ninth = addr(&ipam, "c8").await;
    assert!(net("10.2.0.8/29").contains(&ninth), "{ninth}");
    assert_eq!(
        ipam.node_blocks().await.unwrap(),
        vec![net("10.2.0.0/29"), net("10.2.0.8/29")]
    );
    let usage = ipam.usage().await.unwrap();
    assert_eq!(usage.blocks, ipam.node_blocks().await.unwrap());
    assert_eq!(usage.addresses, 9);
    ipam.release(&att("c0")).await.unwrap();
    assert_eq!(ipam.usage().await.unwrap().addresses, 8);
    assert_consistent(&ipam).await;
}

#[tokio::test]
async fn the_block_limit_gives_code_100_and_writes_nothing() {
    let store = Mem::default();
    let mut c = config("10.3.0.0/24", 29, "n1");
    c.max_blocks_per_node = 1;
    let ipam = engine(&store, c);
    for i in 0..8 {
        addr(&ipam, &format!("c{i}")).await;
    }
    let rev = store.revision();
    let err = ipam.allocate(&att("c8")).await.unwrap_err();
    assert_eq!(code(&err), 100, "{err}");
    assert!(err.to_string().contains("maxBlocksPerNode"), "{err}");
    assert_eq!(store.revision(), rev);
}

#[tokio::test]
async fn a_full_pool_gives_code_100() {
    let store = Mem::default();
    let a = engine(&store, config("10.4.0.0/28", 29, "a"));
    let b = engine(&store, config("10.4.0.0/28", 29, "b"));
    let c = engine(&store, config("10.4.0.0/28", 29, "c"));
    let in_a = addr(&a, "x").await;
    let in_b = addr(&b, "x").await;
    assert_ne!(in_a, in_b);
    assert_ne!(
        a.node_blocks().await.unwrap(),
        b.node_blocks().await.unwrap()
    );
    let err = c.allocate(&att("x")).await.unwrap_err();
    assert_eq!(code(&err), 100, "{err}");
    assert!(err.to_string().contains("every /29 block"), "{err}");
    let err = c.ensure_block().await.unwrap_err();
    assert_eq!(code(&err), 100, "{err}");
    assert_consistent(&a).await;
}

#[test]
fn bad_configurations_are_code_7_with_the_key() {
    let cases: Vec<(BlockIpamConfig, &str)> = vec![
        (config("10.0.0.0/24", 16, "n"), "ipam.blockSize"),
        (config("10.0.0.0/24", 33, "n"), "ipam.blockSize"),
        (config("fd00::/64", 129, "n"), "ipam.blockSize"),
        (config("10.0.0.1/24", 26, "n"), "ipam.pool"),
        (
            BlockIpamConfig {
                reserve: Reserve::Gateway,
                ..config("10.0.0.0/24", 31, "n")
            },
            "ipam.blockSize",
        ),
        (
            BlockIpamConfig {
                max_blocks_per_node: 0,
                ..config("10.0.0.0/24", 26, "n")
            },
            "ipam.maxBlocksPerNode",
        ),
        (config("10.0.0.0/24", 26, ""), "ipam.node"),
        (config("10.0.0.0/24", 26, "a/b"), "ipam.node"),
        (
            BlockIpamConfig {
                network: String::new(),
                ..config("10.0.0.0/24", 26, "n")
            },
            "name",
        ),
        (
            BlockIpamConfig {
                key_prefix: "cnikit".into(),
                ..config("10.0.0.0/24", 26, "n")
            },
            "ipam.keyPrefix",
        ),
        (
            BlockIpamConfig {
                key_prefix: "/cnikit/".into(),
                ..config("10.0.0.0/24", 26, "n")
            },
            "ipam.keyPrefix",
        ),
    ];
    for (c, field) in cases {
        let err = c.validate().unwrap_err();
        assert_eq!(code(&err), 7, "{err}");
        match &err {
            Error::InvalidConfig { field: f, .. } => assert_eq!(f, field, "{c:?}: {err}"),
            other => panic!("{other:?}"),
        }
        let store = Mem::default();
        assert!(BlockIpam::new(Arc::clone(&store), c).is_err());
        assert_eq!(store.stats().round_trips(), 0);
    }
    for ok in [
        config("10.0.0.0/24", 24, "n"),
        config("10.0.0.0/24", 32, "n"),
        BlockIpamConfig {
            reserve: Reserve::Gateway,
            ..config("10.0.0.0/24", 30, "n")
        },
        BlockIpamConfig::new(net("fd00::/48"), "n", "net"),
        config("fd00::/64", 128, "n"),
    ] {
        ok.validate().expect("valid");
    }
}

#[test]
fn configuration_json() {
    let c: BlockIpamConfig = serde_json::from_str(r#"{"pool":"10.244.0.0/16"}"#).unwrap();
    assert_eq!(
        (
            c.block_prefix,
            c.max_blocks_per_node,
            c.reserve,
            c.key_prefix.as_str()
        ),
        (26, u32::MAX, Reserve::None, "/cnikit")
    );
    let c: BlockIpamConfig = serde_json::from_str(r#"{"pool":"fd00::/48"}"#).unwrap();
    assert_eq!(c.block_prefix, 122);
    let c: BlockIpamConfig = serde_json::from_str(
        r#"{"pool":"10.244.0.0/16","blockSize":24,"maxBlocksPerNode":3,"reserve":"gateway",
            "node":"n1","network":"k8s","keyPrefix":"/x"}"#,
    )
    .unwrap();
    assert_eq!(
        (
            c.block_prefix,
            c.max_blocks_per_node,
            c.reserve,
            c.node.as_str(),
            c.key_prefix.as_str()
        ),
        (24, 3, Reserve::Gateway, "n1", "/x")
    );
    c.validate().unwrap();
    assert!(serde_json::from_str::<BlockIpamConfig>(r#"{"pool":"10.244.0.0/33"}"#).is_err());
    // From a network configuration, a bad pool is code 7 and names the prefix length.
    for pool in ["10.244.0.0/+16", "10.244.0.0/016"] {
        let conf = crate::spec::NetConf::from_slice(
            format!(
                r#"{{"cniVersion":"1.1.0","name":"n","type":"t","ipam":{{"type":"cnikit","pool":"{pool}"}}}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        let err = conf.ipam.unwrap().config::<BlockIpamConfig>().unwrap_err();
        assert_eq!(err.code().0, 7, "{pool}: {err}");
        assert!(err.to_string().contains("prefix length"), "{pool}: {err}");
    }
}

#[tokio::test]
async fn a_datastore_of_another_pool_is_code_7_and_untouched() {
    let store = Mem::default();
    let a = engine(&store, config("10.5.0.0/24", 26, "a"));
    addr(&a, "x").await;
    let rev = store.revision();
    for other in [
        config("10.5.0.0/24", 27, "b"),
        config("10.6.0.0/24", 26, "b"),
    ] {
        let b = engine(&store, other);
        let err = b.allocate(&att("x")).await.unwrap_err();
        assert_eq!(code(&err), 7, "{err}");
        assert!(err.to_string().contains("ipam.keyPrefix"), "{err}");
    }
    // The same node under a changed configuration notices its blocks do not fit.
    let err = engine(&store, config("10.5.0.0/24", 27, "a"))
        .allocate(&att("y"))
        .await
        .unwrap_err();
    assert_eq!(code(&err), 7, "{err}");
    assert_eq!(store.revision(), rev);
}

#[tokio::test]
async fn unusable_attachment_names_are_refused() {
    let store = Mem::default();
    let ipam = engine(&store, config("10.7.0.0/24", 26, "n1"));
    let err = ipam
        .allocate(&Attachment::new("net", "a/b", "eth0"))
        .await
        .unwrap_err();
    assert_eq!(code(&err), 4, "{err}");
    let err = ipam
        .release(&Attachment::new("net", "c", ""))
        .await
        .unwrap_err();
    assert_eq!(code(&err), 4, "{err}");
    let err = ipam
        .check(&Attachment::new("", "c", "eth0"))
        .await
        .unwrap_err();
    assert_eq!(code(&err), 7, "{err}");
    assert_eq!(store.revision(), 0);
}

#[tokio::test]
async fn corrupt_records_are_code_5() {
    let store = Mem::default();
    let ipam = engine(&store, config("10.8.0.0/24", 26, "n1"));
    addr(&ipam, "c1").await;
    store
        .commit(Txn::new().put("/cnikit/nodes/n1/handles/net/c1/eth0", "{"))
        .await
        .unwrap();
    let err = ipam.allocate(&att("c1")).await.unwrap_err();
    assert_eq!(code(&err), 5, "{err}");
}

#[tokio::test]
async fn gc_releases_only_stale_attachments_of_its_network() {
    let store = Mem::default();
    let ipam = engine(&store, config("10.9.0.0/24", 26, "n1"));
    let mut other_net_cfg = config("10.9.0.0/24", 26, "n1");
    other_net_cfg.network = "net2".into();
    let other_net = engine(&store, other_net_cfg);
    let other_node = engine(&store, config("10.9.0.0/24", 26, "n2"));
    for c in ["keep", "stale1", "stale2"] {
        addr(&ipam, c).await;
    }
    let foreign = Attachment::new("net2", "stale1", "eth0");
    other_net.allocate(&foreign).await.unwrap();
    addr(&other_node, "stale1").await;

    let report = ipam
        .gc(&[att("keep"), Attachment::new("net", "ghost", "eth0")])
        .await
        .unwrap();
    let released: BTreeSet<_> = report.released.into_iter().collect();
    assert_eq!(
        released,
        [att("stale1"), att("stale2")].into_iter().collect()
    );
    ipam.check(&att("keep")).await.unwrap();
    ipam.check(&foreign)
        .await
        .expect("another network is left alone");
    other_node
        .check(&att("stale1"))
        .await
        .expect("another node is left alone");
    assert_eq!(code(&ipam.check(&att("stale2")).await.unwrap_err()), 3);
    assert!(ipam.gc(&[att("keep")]).await.unwrap().released.is_empty());
    assert_consistent(&ipam).await;
}

#[tokio::test]
async fn gc_of_many_attachments_spans_several_transactions() {
    let store = Mem::default();
    let ipam = engine(&store, config("10.10.0.0/24", 26, "n1"));
    for i in 0..(GC_BATCH + 7) {
        addr(&ipam, &format!("c{i}")).await;
    }
    let report = ipam.gc(&[]).await.unwrap();
    assert_eq!(report.released.len(), GC_BATCH + 7);
    assert!(ipam.allocations().await.unwrap().is_empty());
    assert_consistent(&ipam).await;
}

#[tokio::test]
async fn empty_blocks_go_back_but_never_the_last_or_a_used_one() {
    let store = Mem::default();
    let ipam = engine(&store, config("10.11.0.0/27", 29, "n1"));
    for i in 0..17 {
        addr(&ipam, &format!("c{i}")).await;
    }
    let blocks = ipam.node_blocks().await.unwrap();
    assert_eq!(blocks.len(), 3);
    // Empty the second block only.
    for (a, held) in ipam.allocations().await.unwrap() {
        if blocks[1].contains(&held) {
            ipam.release(&a).await.unwrap();
        }
    }
    assert_eq!(ipam.release_empty_blocks().await.unwrap(), vec![blocks[1]]);
    assert_eq!(
        ipam.node_blocks().await.unwrap(),
        vec![blocks[0], blocks[2]]
    );
    assert_consistent(&ipam).await;
    // Everything released: the lowest block stays.
    ipam.gc(&[]).await.unwrap();
    assert_eq!(ipam.release_empty_blocks().await.unwrap(), vec![blocks[2]]);
    assert_eq!(ipam.node_blocks().await.unwrap(), vec![blocks[0]]);
    assert!(ipam.release_empty_blocks().await.unwrap().is_empty());
    assert_eq!(ipam.ensure_block().await.unwrap(), blocks[0]);
    assert!(
        !store.dump().iter().any(|kv| kv.key.contains("/free/")
            && !blocks[0].contains(&ip(kv.key.rsplit('/').next().unwrap()))),
        "release records of given-back blocks are gone"
    );
    // A given-back block can be claimed by another node.
    let other = engine(&store, config("10.11.0.0/27", 29, "n2"));
    assert_eq!(other.ensure_block().await.unwrap(), blocks[1]);
    assert_consistent(&ipam).await;
}

#[tokio::test]
async fn a_block_with_an_allocation_is_kept_and_undrained() {
    let store = Mem::default();
    let ipam = engine(&store, config("10.12.0.0/28", 29, "n1"));
    ipam.ensure_block().await.unwrap();
    // Leave a block draining, as an interrupted give-back would.
    let key = "/cnikit/nodes/n1/blocks/10.12.0.0-29";
    let kv = store.get(key).await.unwrap().unwrap();
    ipam.set_draining(key, kv.mod_revision, true).await.unwrap();
    let err = ipam.allocate(&att("c1")).await;
    let a = err.expect("claims another block instead of the draining one");
    assert!(net("10.12.0.8/29").contains(&a.ips[0].address.addr()));
    // The draining block is empty and not the last: it goes.
    assert_eq!(
        ipam.release_empty_blocks().await.unwrap(),
        vec![net("10.12.0.0/29")]
    );
    assert_eq!(ipam.release_empty_blocks().await.unwrap(), vec![]);
    assert_eq!(ipam.node_blocks().await.unwrap(), vec![net("10.12.0.8/29")]);
    assert_consistent(&ipam).await;
}

/// A store that runs a hook once, just before the first commit that matches.
struct BeforeCommit<H> {
    inner: Mem,
    hook: tokio::sync::Mutex<Option<H>>,
    when: fn(&Txn) -> bool,
}

#[async_trait]
impl<H, F> Store for BeforeCommit<H>
where
    H: FnOnce() -> F + Send + Sync,
    F: std::future::Future<Output = ()> + Send,
{
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        self.inner.list(prefix).await
    }
    async fn commit(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        if (self.when)(&txn) {
            let hook = self.hook.lock().await.take();
            if let Some(h) = hook {
                h().await;
            }
        }
        self.inner.commit(txn).await
    }
    fn describe(&self) -> String {
        "hooked".into()
    }
}

#[tokio::test]
async fn an_allocation_racing_a_block_give_back_fails_over_cleanly() {
    let store = Mem::default();
    let cfg = config("10.13.0.0/28", 29, "n1");
    let agent = engine(&store, cfg.clone());
    for i in 0..9 {
        addr(&agent, &format!("c{i}")).await;
    }
    agent.release(&att("c8")).await.unwrap();
    let blocks = agent.node_blocks().await.unwrap();
    assert_eq!(blocks, vec![net("10.13.0.0/29"), net("10.13.0.8/29")]);
    // The allocator reads the node (second block empty, open), then the agent gives the
    // second block back before the allocator commits.
    let released = Arc::new(Mutex::new(Vec::new()));
    let hook_released = Arc::clone(&released);
    let agent = Arc::new(agent);
    let hook_agent = Arc::clone(&agent);
    let hooked = BeforeCommit {
        inner: Arc::clone(&store),
        hook: tokio::sync::Mutex::new(Some(move || async move {
            let r = hook_agent.release_empty_blocks().await.unwrap();
            hook_released.lock().unwrap().extend(r);
        })),
        when: |txn| {
            txn.ops
                .iter()
                .any(|op| matches!(op, crate::store::Op::Put(k, _) if k.contains("/used/")))
        },
    };
    let allocator = BlockIpam::new(hooked, cfg).unwrap();
    let got = allocator.allocate(&att("racer")).await.unwrap();
    assert_eq!(*released.lock().unwrap(), vec![net("10.13.0.8/29")]);
    let a = got.ips[0].address.addr();
    assert!(
        net("10.13.0.8/29").contains(&a),
        "re-claimed the block: {a}"
    );
    assert_eq!(agent.node_blocks().await.unwrap(), blocks);
    assert_consistent(&agent).await;
}

/// A process of n1 finishes a pending claim of a block that n2 owns; just before it creates
/// the ownership, another process of n1 drops that pending affinity (n2 owns the block)
/// and n2 gives the block back. The ownership it then creates has no affinity behind it:
/// the claim that follows takes that orphaned block on rather than a new one, and a node
/// that leaves gives an orphaned block back.
#[tokio::test]
async fn an_orphaned_block_is_taken_on_by_the_next_claim_and_given_back_on_leave() {
    let store = Mem::default();
    let pool = "10.14.0.0/28";
    let n2 = Arc::new(engine(&store, config(pool, 30, "n2")));
    let contested = n2.ensure_block().await.unwrap();
    assert_eq!(contested, net("10.14.0.0/30"));
    // n1's pending affinity to it, as a claim interrupted after step (1) leaves it.
    let n1_affinity = format!("{DEFAULT_KEY_PREFIX}/nodes/n1/blocks/10.14.0.0-30");
    let pending = Txn::new().put(n1_affinity.clone(), encode(&AffinityRecord::pending()));
    store.commit(pending).await.unwrap();

    let hook_store = Arc::clone(&store);
    let hook_n2 = Arc::clone(&n2);
    let hooked = BeforeCommit {
        inner: Arc::clone(&store),
        hook: tokio::sync::Mutex::new(Some(move || async move {
            let dropped = Txn::new().delete(n1_affinity);
            hook_store.commit(dropped).await.unwrap();
            assert_eq!(hook_n2.leave().await.unwrap(), vec![contested]);
        })),
        when: |txn| {
            txn.ops
                .iter()
                .any(|op| matches!(op, crate::store::Op::Put(k, _) if k.ends_with("/blocks/10.14.0.0-30") && !k.contains("/nodes/")))
        },
    };
    let n1 = BlockIpam::new(hooked, config(pool, 30, "n1")).unwrap();
    assert_eq!(
        n1.ensure_block().await.unwrap(),
        contested,
        "took the orphan on"
    );
    assert_eq!(n1.node_blocks().await.unwrap(), vec![contested]);
    assert_eq!(orphaned(&store.dump()), Vec::<String>::new());
    assert!(n1.audit().await.unwrap().is_empty());
    let a = n1.allocate(&att("c1")).await.unwrap();
    assert!(contested.contains(&a.ips[0].address.addr()));
    n1.release(&att("c1")).await.unwrap();

    // An orphaned ownership of a node that leaves goes back with its other blocks.
    let orphan = net("10.14.0.8/30");
    let owner = Txn::new().put(
        n1.keys.block(&orphan),
        encode(&OwnerRecord { node: "n1".into() }),
    );
    store.commit(owner).await.unwrap();
    assert_eq!(orphaned(&store.dump()), vec!["10.14.0.8-30 n1".to_owned()]);
    assert!(
        n1.audit().await.unwrap().is_empty(),
        "an orphan is no problem"
    );
    let mut gone = n1.leave().await.unwrap();
    gone.sort();
    assert_eq!(gone, vec![contested, orphan]);
    assert!(
        !store.dump().iter().any(|kv| kv.key.contains("/blocks/")),
        "{:#?}",
        store.dump()
    );
}

/// A store that runs a hook once, just before the first list of exactly `prefix`.
struct BeforeList<H> {
    inner: Mem,
    hook: tokio::sync::Mutex<Option<H>>,
    prefix: &'static str,
}

#[async_trait]
impl<H, F> Store for BeforeList<H>
where
    H: FnOnce() -> F + Send + Sync,
    F: std::future::Future<Output = ()> + Send,
{
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        if prefix == self.prefix {
            let hook = self.hook.lock().await.take();
            if let Some(h) = hook {
                h().await;
            }
        }
        self.inner.list(prefix).await
    }
    async fn commit(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        self.inner.commit(txn).await
    }
    fn describe(&self) -> String {
        "hooked".into()
    }
}

/// Two processes of one node start on an empty node; the other one claims the last free
/// block of the pool while this one looks for a block: this one must allocate in that block,
/// not report the pool as full.
#[tokio::test]
async fn a_block_claimed_by_the_same_node_meanwhile_is_used_not_code_100() {
    let store = Mem::default();
    let cfg = config("10.16.0.0/26", 26, "n1");
    let other = Arc::new(engine(&store, cfg.clone()));
    let other_got = Arc::new(Mutex::new(None));
    let (hook_other, hook_got) = (Arc::clone(&other), Arc::clone(&other_got));
    let hooked = BeforeList {
        inner: Arc::clone(&store),
        hook: tokio::sync::Mutex::new(Some(move || async move {
            let a = addr(&hook_other, "other").await;
            *hook_got.lock().unwrap() = Some(a);
        })),
        // The pool-wide ownership list, read when looking for a free block.
        prefix: "/cnikit/blocks/",
    };
    let this = BlockIpam::new(hooked, cfg).unwrap();
    let got = this
        .allocate(&att("this"))
        .await
        .expect("allocates in the block the other process claimed")
        .ips[0]
        .address
        .addr();
    let other_got = other_got.lock().unwrap().expect("the hook ran");
    assert_ne!(got, other_got);
    assert_eq!(
        other.node_blocks().await.unwrap(),
        vec![net("10.16.0.0/26")]
    );
    assert_consistent(&other).await;
}

/// A node whose blocks are full and that can claim no other block reports code 100, unless
/// an address of it was released after it read its keys.
#[tokio::test]
async fn an_address_released_while_the_pool_looks_full_is_used_not_code_100() {
    let store = Mem::default();
    let cfg = config("10.17.0.0/30", 30, "n1");
    let other = Arc::new(engine(&store, cfg.clone()));
    let mut held = Vec::new();
    for i in 0..4 {
        held.push(addr(&other, &format!("c{i}")).await);
    }
    let e = other.allocate(&att("c4")).await.unwrap_err();
    assert_eq!(code(&e), 100, "{e}");
    let hook_other = Arc::clone(&other);
    let hooked = BeforeList {
        inner: Arc::clone(&store),
        hook: tokio::sync::Mutex::new(Some(move || async move {
            hook_other.release(&att("c2")).await.unwrap();
        })),
        prefix: "/cnikit/blocks/",
    };
    let this = BlockIpam::new(hooked, cfg).unwrap();
    let got = this.allocate(&att("this")).await.expect("allocates").ips[0]
        .address
        .addr();
    assert_eq!(got, held[2], "the address c2 released");
    assert_consistent(&other).await;
}

#[tokio::test]
async fn racing_allocations_on_one_node_claim_one_block() {
    let store = Arc::new(MemoryStore::with_interleaving(11, 4));
    let engines: Vec<_> = (0..12)
        .map(|i| engine(&store, config("10.14.0.0/24", 26, "n1")).with_seed(i))
        .collect();
    let results = futures::future::join_all(
        engines
            .iter()
            .enumerate()
            .map(|(i, e)| async move { e.allocate(&att(&format!("c{i}"))).await }),
    )
    .await;
    let addrs: BTreeSet<IpAddr> = results
        .into_iter()
        .map(|r| r.expect("allocates").ips[0].address.addr())
        .collect();
    assert_eq!(addrs.len(), 12);
    assert_eq!(engines[0].node_blocks().await.unwrap().len(), 1);
    assert!(store.stats().failed_commits > 0, "the allocations did race");
    assert_eq!(store.stats().multi_object_commits, 0);
    assert_consistent(&engines[0]).await;
}

#[tokio::test]
async fn racing_nodes_get_distinct_blocks() {
    let store = Arc::new(MemoryStore::with_interleaving(5, 4));
    let engines: Vec<_> = (0..10)
        .map(|i| engine(&store, config("10.15.0.0/24", 28, &format!("node{i}"))).with_seed(i))
        .collect();
    let blocks = futures::future::join_all(engines.iter().map(|e| e.ensure_block())).await;
    let blocks: BTreeSet<IpNet> = blocks.into_iter().map(|b| b.expect("claims")).collect();
    assert_eq!(blocks.len(), 10);
    assert_consistent(&engines[0]).await;
}

/// The blocks owned by a node that has no affinity to them, as `block owner`.
fn orphaned(kvs: &[KeyValue]) -> Vec<String> {
    let blocks = format!("{DEFAULT_KEY_PREFIX}/blocks/");
    kvs.iter()
        .filter_map(|kv| {
            let block = kv.key.strip_prefix(&blocks)?;
            let owner: OwnerRecord = decode(kv).unwrap();
            let affinity = format!("{DEFAULT_KEY_PREFIX}/nodes/{}/blocks/{block}", owner.node);
            (!kvs.iter().any(|kv| kv.key == affinity)).then(|| format!("{block} {}", owner.node))
        })
        .collect()
}

/// What the property test's clients do.
#[derive(Debug, Clone)]
enum Action {
    Allocate(u8),
    Release(u8),
    /// GC keeping the attachments with these container numbers.
    Gc(Vec<u8>),
    GiveBackBlocks,
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            5 => (0u8..8).prop_map(Action::Allocate),
            3 => (0u8..8).prop_map(Action::Release),
            1 => proptest::collection::vec(0u8..8, 0..4).prop_map(Action::Gc),
            2 => Just(Action::GiveBackBlocks),
        ]
    }

    /// (node, network, max blocks) and the actions of one client.
    fn client() -> impl Strategy<Value = ((u8, bool, u32), Vec<Action>)> {
        (
            (0u8..2, any::<bool>(), 1u32..5),
            proptest::collection::vec(action(), 1..14),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Concurrent clients (several per node, several nodes, two networks) interleaved by
        /// the store: after every operation the datastore is consistent (no address twice,
        /// handles and used records match, one owner per block), each allocation returned
        /// is what the datastore holds, and in the end no address is lost.
        #[test]
        fn concurrent_clients_keep_the_pool_consistent(
            seed in any::<u64>(),
            gateway in any::<bool>(),
            small_pool in any::<bool>(),
            clients in proptest::collection::vec(client(), 2..6),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(run_clients(seed, gateway, small_pool, clients));
        }
    }

    fn client_config(
        pool: &str,
        gateway: bool,
        node: u8,
        network: &str,
        max: u32,
    ) -> BlockIpamConfig {
        // Small blocks, so that nodes need several and give them back.
        let mut c = config(pool, if gateway { 29 } else { 30 }, &format!("node{node}"));
        c.network = network.into();
        c.max_blocks_per_node = max;
        c.reserve = if gateway {
            Reserve::Gateway
        } else {
            Reserve::None
        };
        c
    }

    async fn run_clients(
        seed: u64,
        gateway: bool,
        small_pool: bool,
        clients: Vec<((u8, bool, u32), Vec<Action>)>,
    ) {
        let pool = if small_pool {
            "10.20.0.0/28"
        } else {
            "10.20.0.0/27"
        };
        let store = Arc::new(MemoryStore::with_interleaving(seed, 3));
        let audit_cfg = client_config(pool, gateway, 0, "net-a", u32::MAX);
        let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
        let check = |what: &str| {
            let problems = audit_kvs(&audit_cfg, &store.dump());
            if !problems.is_empty() {
                failures
                    .lock()
                    .unwrap()
                    .push(format!("after {what}: {problems:?}"));
            }
        };
        let runs = clients.iter().enumerate().map(|(i, ((node, net_b, max), actions))| {
            let network = if *net_b { "net-b" } else { "net-a" };
            let cfg = client_config(pool, gateway, *node, network, *max);
            let ipam = engine(&store, cfg).with_seed(seed ^ i as u64);
            let store = &store;
            let failures = &failures;
            let check = &check;
            async move {
                let a = |cid: &u8| Attachment::new(network, format!("c{cid}"), "eth0");
                for action in actions {
                    let result = match action {
                        Action::Allocate(cid) => {
                            let r = ipam.allocate(&a(cid)).await;
                            if let Ok(alloc) = &r {
                                // Same poll as the commit: the datastore holds exactly this.
                                let key = ipam.keys.handle(&a(cid));
                                let held = store.dump().into_iter().find(|kv| kv.key == key);
                                let held: Option<HandleRecord> =
                                    held.map(|kv| decode(&kv).unwrap());
                                if held.map(|h| h.ip) != Some(alloc.ips[0].address.addr()) {
                                    failures.lock().unwrap().push(format!(
                                        "allocate {cid} returned {alloc:?}, datastore holds {held:?}"
                                    ));
                                }
                            }
                            r.map(drop)
                        }
                        Action::Release(cid) => ipam.release(&a(cid)).await,
                        Action::Gc(keep) => {
                            let valid: Vec<_> = keep.iter().map(a).collect();
                            ipam.gc(&valid).await.map(drop)
                        }
                        Action::GiveBackBlocks => ipam.release_empty_blocks().await.map(drop),
                    };
                    check(&format!("{action:?} by client {i}"));
                    if let Err(e) = result
                        && !matches!(e.code(), ErrorCode::NO_ADDRESS | ErrorCode::TRY_AGAIN_LATER)
                    {
                        failures.lock().unwrap().push(format!("{action:?}: {e}"));
                    }
                }
            }
        });
        futures::future::join_all(runs).await;

        // Release everything, give back what can go, then fill the pool from scratch: every
        // usable address of the pool must be handed out exactly once.
        let nodes: BTreeSet<u8> = clients.iter().map(|((n, _, _), _)| *n).collect();
        for node in &nodes {
            for network in ["net-a", "net-b"] {
                let ipam = engine(
                    &store,
                    client_config(pool, gateway, *node, network, u32::MAX),
                );
                ipam.gc(&[]).await.unwrap();
                ipam.release_empty_blocks().await.unwrap();
            }
        }
        check("releasing everything");
        let dump = store.dump();
        assert!(
            !dump
                .iter()
                .any(|kv| kv.key.contains("/used/") || kv.key.contains("/handles/")),
            "{dump:#?}"
        );
        let mut handed_out = BTreeSet::new();
        for node in &nodes {
            let ipam = engine(
                &store,
                client_config(pool, gateway, *node, "net-a", u32::MAX),
            );
            for i in 0.. {
                match ipam
                    .allocate(&Attachment::new("net-a", format!("fill{i}"), "eth0"))
                    .await
                {
                    Ok(a) => assert!(handed_out.insert(a.ips[0].address.addr()), "twice: {a:?}"),
                    Err(e) if e.code() == ErrorCode::NO_ADDRESS => break,
                    Err(e) => panic!("filling: {e}"),
                }
            }
        }
        let per_block = if gateway { 5 } else { 4 };
        let blocks = (if small_pool { 2 } else { 4 }) * (if gateway { 1 } else { 2 });
        assert_eq!(handed_out.len(), per_block * blocks, "addresses lost");
        check("filling the pool");
        // Orphaned ownerships (the audit allows them while claims run) were taken on.
        assert_eq!(orphaned(&store.dump()), Vec::<String>::new());
        let failures = failures.into_inner().unwrap();
        assert!(failures.is_empty(), "{failures:#?}");
        assert_eq!(
            store.stats().multi_object_commits,
            0,
            "one object per commit"
        );
    }
}

/// Sixteen clients on four nodes and two networks race on one store from two threads: the
/// store stays consistent, every client gets work done (an engine that answered every
/// call with code 11 would leave an empty store that audits clean), and once the race is
/// over every client still gets an address of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_on_threads_stay_consistent() {
    const ROUNDS: u64 = 40;
    let store = Arc::new(MemoryStore::with_interleaving(99, 2));
    let client = |i: u64| {
        let mut cfg = config("10.30.0.0/25", 28, &format!("node{}", i % 4));
        cfg.network = format!("net{}", i % 2);
        BlockIpam::new(Arc::clone(&store), cfg)
            .unwrap()
            .with_seed(i)
    };
    let tasks: Vec<_> = (0..16u64)
        .map(|i| {
            let ipam = client(i);
            tokio::spawn(async move {
                let (mut allocated, mut failed) = (0u32, 0u32);
                for round in 0..ROUNDS {
                    let a = Attachment::new(
                        format!("net{}", i % 2),
                        format!("c{}", (round * 7 + i) % 9),
                        "eth0",
                    );
                    let r = match round % 5 {
                        0..=2 => ipam.allocate(&a).await.map(|_| allocated += 1),
                        3 => ipam.release(&a).await,
                        _ if round % 10 == 4 => ipam.release_empty_blocks().await.map(drop),
                        _ => ipam.gc(&[a]).await.map(drop),
                    };
                    if let Err(e) = r {
                        assert!(
                            matches!(e.code(), ErrorCode::NO_ADDRESS | ErrorCode::TRY_AGAIN_LATER),
                            "{e}"
                        );
                        failed += 1;
                    }
                }
                (allocated, failed)
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    println!("(allocated, failed) per client: {outcomes:?}");
    // 24 of the 40 rounds allocate: most of them must succeed for every client.
    let attempts = ROUNDS * 3 / 5;
    for (i, (allocated, failed)) in outcomes.iter().enumerate() {
        assert!(
            u64::from(*allocated) * 2 > attempts,
            "client {i} allocated only {allocated} times of {attempts} ({failed} calls failed)"
        );
    }
    let auditor = engine(&store, config("10.30.0.0/25", 28, "node0"));
    assert_consistent(&auditor).await;

    // After the race: one more attachment per client, all at once; each gets its own
    // address, and its node holds it for that attachment.
    let last: Vec<_> = (0..16u64)
        .map(|i| {
            let ipam = client(i);
            tokio::spawn(async move {
                let a = Attachment::new(format!("net{}", i % 2), format!("last{i}"), "eth0");
                let ip = ipam.allocate(&a).await.unwrap().ips[0].address.addr();
                (a, ip)
            })
        })
        .collect();
    let mut addresses = BTreeSet::new();
    let mut handed_out = Vec::new();
    for t in last {
        let (a, ip) = t.await.unwrap();
        assert!(addresses.insert(ip), "{ip} handed out twice");
        handed_out.push((a, ip));
    }
    for (i, (a, ip)) in handed_out.iter().enumerate() {
        let held = client(i as u64).allocations().await.unwrap();
        assert!(
            held.contains(&(a.clone(), *ip)),
            "{a:?} got {ip}, but its node holds {held:?}"
        );
    }
    assert_consistent(&auditor).await;
}

#[tokio::test]
async fn leave_gives_back_the_last_empty_block_but_never_a_used_one() {
    let store = Mem::default();
    let ipam = engine(&store, config("10.244.0.0/24", 26, "n1"));
    let first = addr(&ipam, "c1").await;
    assert_eq!(
        ipam.release_empty_blocks().await.unwrap(),
        Vec::<IpNet>::new()
    );
    assert_eq!(
        ipam.leave().await.unwrap(),
        Vec::<IpNet>::new(),
        "c1 holds an address"
    );
    assert!(ipam.node_blocks().await.unwrap()[0].contains(&first));

    ipam.release(&att("c1")).await.unwrap();
    assert_eq!(
        ipam.release_empty_blocks().await.unwrap(),
        Vec::<IpNet>::new(),
        "a running node keeps its last block"
    );
    let block = ipam.node_blocks().await.unwrap()[0];
    assert_eq!(ipam.leave().await.unwrap(), vec![block]);
    assert_eq!(ipam.node_blocks().await.unwrap(), Vec::<IpNet>::new());
    assert_consistent(&ipam).await;

    // Another node can claim it now.
    let other = engine(&store, config("10.244.0.0/24", 26, "n2"));
    let mut blocks = Vec::new();
    for i in 0..4 {
        let ip = addr(&other, &format!("o{i}")).await;
        blocks.push(other.node_blocks().await.unwrap());
        assert!(net("10.244.0.0/24").contains(&ip));
    }
    assert!(
        blocks.last().unwrap().contains(&block),
        "the freed block is claimable"
    );
}

/// Writes `value` at `key` unconditionally, as an interrupted process would have left it.
async fn leave(store: &Mem, key: &str, value: &str) {
    let txn = Txn::new().put(key, value.as_bytes().to_vec());
    assert!(matches!(
        store.commit(txn).await.unwrap(),
        TxnOutcome::Committed(_)
    ));
}

#[tokio::test]
async fn a_claim_interrupted_after_its_intent_is_finished_by_the_next_allocation() {
    let store = Mem::default();
    let ipam = engine(&store, config("10.13.0.0/28", 29, "n1"));
    ipam.ready().await.unwrap();
    // Step 1 done (pending affinity), steps 2 and 3 never ran.
    leave(
        &store,
        "/cnikit/nodes/n1/blocks/10.13.0.8-29",
        r#"{"draining":false,"pending":true}"#,
    )
    .await;
    let a = addr(&ipam, "c1").await;
    assert!(
        net("10.13.0.8/29").contains(&a),
        "the pending block is finished and used: {a}"
    );
    assert_eq!(ipam.node_blocks().await.unwrap(), vec![net("10.13.0.8/29")]);
    assert_consistent(&ipam).await;
}

#[tokio::test]
async fn a_pending_claim_on_a_block_another_node_owns_is_dropped() {
    let store = Mem::default();
    let n2 = engine(&store, config("10.14.0.0/28", 29, "n2"));
    let owned = n2.ensure_block().await.unwrap();
    assert_eq!(owned, net("10.14.0.0/29"));
    let ipam = engine(&store, config("10.14.0.0/28", 29, "n1"));
    leave(
        &store,
        "/cnikit/nodes/n1/blocks/10.14.0.0-29",
        r#"{"draining":false,"pending":true}"#,
    )
    .await;
    let a = addr(&ipam, "c1").await;
    assert!(
        net("10.14.0.8/29").contains(&a),
        "n1 gets the other block: {a}"
    );
    assert_eq!(ipam.node_blocks().await.unwrap(), vec![net("10.14.0.8/29")]);
    assert_consistent(&ipam).await;
    assert_consistent(&n2).await;
}

#[tokio::test]
async fn a_give_back_interrupted_after_the_ownership_went_is_finished() {
    let store = Mem::default();
    let ipam = engine(&store, config("10.15.0.0/28", 29, "n1"));
    let blocks = [net("10.15.0.0/29"), net("10.15.0.8/29")];
    ipam.ensure_block().await.unwrap();
    // Fill the first block so that a second one is claimed, then free everything.
    let mut n = 0;
    while ipam.node_blocks().await.unwrap().len() < 2 {
        addr(&ipam, &format!("c{n}")).await;
        n += 1;
    }
    ipam.gc(&[]).await.unwrap();
    // The second block: drained, ownership deleted, the process died before the affinity.
    let key = "/cnikit/nodes/n1/blocks/10.15.0.8-29";
    let kv = store.get(key).await.unwrap().unwrap();
    ipam.set_draining(key, kv.mod_revision, true).await.unwrap();
    let txn = Txn::new().delete("/cnikit/blocks/10.15.0.8-29");
    store.commit(txn).await.unwrap();
    assert_consistent(&ipam).await;
    // Another node may take the block meanwhile; n1 never allocates from it.
    let n2 = engine(&store, config("10.15.0.0/28", 29, "n2"));
    let a2 = addr(&n2, "x").await;
    assert!(blocks[1].contains(&a2));
    assert_eq!(ipam.release_empty_blocks().await.unwrap(), vec![blocks[1]]);
    assert_eq!(ipam.node_blocks().await.unwrap(), vec![blocks[0]]);
    assert_consistent(&ipam).await;
    assert_consistent(&n2).await;
}
