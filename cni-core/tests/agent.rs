//! The node agent's life against the real kernel, in a private namespace (needs root; skips
//! loudly without it), with an in-memory datastore and a stand-in routing mode that records
//! what the agent asks of it.
//!
//! - Stopped once up: the node record, the tunnel address, the blackhole routes and the node
//!   state file are all gone, and the mode was torn down.
//! - Stopped while still coming up (the mode's `init` never finishes): the agent returns
//!   instead of hanging, and removes what it had made so far (the tunnel address).
//! - Stopped while the registry cannot be watched again: the agent returns instead of
//!   retrying the watch forever.
//! - A new block whose publication failed once is published at the next poll, and the
//!   routing mode learns it.
//! - A first watch that fails is retried: the agent stays up and follows the peers.
//! - The node state file follows the peer list.
//! - The endpoints, fetched over TCP inside the node namespace: `/readyz` is 503 while the
//!   node comes up and 200 after the first reconcile, `/healthz` is 200 while the loop
//!   runs, and `/metrics` counts reconciles, more of them once a peer joins; the
//!   addresses in use follow a pod's allocation and release within a block poll.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cni_core::agent::{Agent, AgentConfig, AgentIpam, blackhole};
use cni_core::ipam::{Attachment, BlockIpam, BlockIpamConfig, Ipam};
use cni_core::linux::NetNs;
use cni_core::registry::{NodeEvent, NodeList, NodeRecord, NodeRegistry, StoreRegistry};
use cni_core::routing::{CrossNodeRouting, LocalNode, ReconcileReport};
use cni_core::state::NodeState;
use cni_core::store::{MemoryStore, Revision, Store};
use cni_core::{Result, StoreError};
use futures::StreamExt;
use futures::stream::BoxStream;
use ipnet::IpNet;
use testkit::Namespaces;
use tokio::sync::Notify;

fn root(test: &str) -> bool {
    testkit::root(test)
}

/// A namespace with an "underlay": a veth pair whose `eth0` has 10.99.0.1/24; deleted on
/// drop.
struct Node {
    name: String,
    _namespaces: Namespaces,
}

impl Node {
    fn new(tag: &str) -> Node {
        let namespaces = Namespaces::new(&format!("agent-{tag}"));
        let name = namespaces.add("node");
        for args in [
            &["link", "set", "lo", "up"][..],
            &[
                "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
            ],
            &["addr", "add", "10.99.0.1/24", "dev", "eth0"],
            &["link", "set", "eth0", "up"],
            &["link", "set", "eth1", "up"],
        ] {
            testkit::ip(&name, args);
        }
        Node {
            name,
            _namespaces: namespaces,
        }
    }

    fn path(&self) -> std::path::PathBuf {
        testkit::netns_path(&self.name)
    }
}

/// A routing mode that needs a tunnel address and records init (with the node's blocks)
/// and teardown; its init can be made to never finish.
struct StandIn {
    init_hangs: bool,
    init_started: Arc<Notify>,
    torn_down: Arc<AtomicBool>,
    blocks: Arc<Mutex<Vec<IpNet>>>,
}

#[async_trait]
impl CrossNodeRouting for StandIn {
    fn mode(&self) -> &'static str {
        "stand-in"
    }
    async fn init(&mut self, local: &LocalNode) -> Result<()> {
        *self.blocks.lock().unwrap() = local.blocks.clone();
        self.init_started.notify_one();
        if self.init_hangs {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
    fn node_data(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
    fn mtu_overhead(&self) -> u32 {
        0
    }
    fn needs_tunnel_address(&self) -> bool {
        true
    }
    async fn reconcile(&mut self, _peers: &[NodeRecord]) -> Result<ReconcileReport> {
        Ok(ReconcileReport::default())
    }
    async fn teardown(&mut self) -> Result<()> {
        self.torn_down.store(true, Ordering::SeqCst);
        Ok(())
    }
    /// What it was told, as a mode that learns routes reports what it learned.
    fn report(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({ "blocks": *self.blocks.lock().unwrap() }))
    }
}

/// The registry over the test's store, with failures to order, as a datastore that went
/// away would give them: the next `ending_watches` watch streams end at once, the next
/// `failing_watches` watches after those fail, the next `failing_registers` registrations
/// fail.
struct Flaky {
    inner: StoreRegistry<Arc<dyn Store>>,
    ending_watches: AtomicUsize,
    failing_watches: AtomicUsize,
    watches: AtomicUsize,
    failing_registers: AtomicUsize,
    failed_registers: AtomicUsize,
}

impl Flaky {
    fn new(store: Arc<dyn Store>, ending_watches: usize, failing_watches: usize) -> Self {
        Flaky {
            inner: StoreRegistry::new(store),
            ending_watches: AtomicUsize::new(ending_watches),
            failing_watches: AtomicUsize::new(failing_watches),
            watches: AtomicUsize::new(0),
            failing_registers: AtomicUsize::new(0),
            failed_registers: AtomicUsize::new(0),
        }
    }
}

/// Counts `n` down by one; whether it was above zero.
fn take(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

fn unavailable() -> cni_core::Error {
    StoreError::Unavailable {
        endpoint: "flaky".into(),
        source: "the datastore went away".into(),
    }
    .into()
}

#[async_trait]
impl NodeRegistry for Flaky {
    async fn register(&self, node: &NodeRecord, ttl: Duration) -> Result<()> {
        if take(&self.failing_registers) {
            self.failed_registers.fetch_add(1, Ordering::SeqCst);
            return Err(unavailable());
        }
        self.inner.register(node, ttl).await
    }
    async fn deregister(&self, name: &str) -> Result<()> {
        self.inner.deregister(name).await
    }
    async fn list(&self) -> Result<NodeList> {
        self.inner.list().await
    }
    async fn watch(&self, revision: Revision) -> Result<BoxStream<'static, Result<NodeEvent>>> {
        self.watches.fetch_add(1, Ordering::SeqCst);
        if take(&self.ending_watches) {
            return Ok(futures::stream::empty().boxed());
        }
        if take(&self.failing_watches) {
            return Err(unavailable());
        }
        self.inner.watch(revision).await
    }
    async fn prune_expired(&self) -> Result<Vec<String>> {
        self.inner.prune_expired().await
    }
}

struct Setup {
    agent: Agent,
    store: Arc<dyn Store>,
    registry: Arc<StoreRegistry<Arc<dyn Store>>>,
    init_started: Arc<Notify>,
    torn_down: Arc<AtomicBool>,
    /// The node's blocks as the mode was last told them.
    mode_blocks: Arc<Mutex<Vec<IpNet>>>,
    data: tempfile::TempDir,
}

fn ipam_config() -> BlockIpamConfig {
    let mut config = BlockIpamConfig::new("10.98.0.0/24".parse().unwrap(), "n1", "agent-test");
    config.block_prefix = 28;
    config
}

async fn setup(node: &Node, init_hangs: bool) -> Setup {
    setup_serving(node, init_hangs, None).await
}

/// [`setup`] with the agent serving its endpoints on `metrics_address`.
async fn setup_serving(
    node: &Node,
    init_hangs: bool,
    metrics_address: Option<std::net::SocketAddr>,
) -> Setup {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let registry = Arc::new(StoreRegistry::new(store.clone()));
    let agent_registry = registry.clone();
    setup_full(
        node,
        init_hangs,
        store,
        registry,
        agent_registry,
        metrics_address,
    )
    .await
}

/// [`setup`] with the agent using `agent_registry` (over `store`).
async fn setup_with(
    node: &Node,
    init_hangs: bool,
    store: Arc<dyn Store>,
    registry: Arc<StoreRegistry<Arc<dyn Store>>>,
    agent_registry: Arc<dyn NodeRegistry>,
) -> Setup {
    setup_full(node, init_hangs, store, registry, agent_registry, None).await
}

async fn setup_full(
    node: &Node,
    init_hangs: bool,
    store: Arc<dyn Store>,
    registry: Arc<StoreRegistry<Arc<dyn Store>>>,
    agent_registry: Arc<dyn NodeRegistry>,
    metrics_address: Option<std::net::SocketAddr>,
) -> Setup {
    let ipam: AgentIpam = BlockIpam::new(store.clone(), ipam_config()).expect("ipam");
    let init_started = Arc::new(Notify::new());
    let torn_down = Arc::new(AtomicBool::new(false));
    let mode_blocks = Arc::new(Mutex::new(Vec::new()));
    let routing = StandIn {
        init_hangs,
        init_started: init_started.clone(),
        torn_down: torn_down.clone(),
        blocks: mode_blocks.clone(),
    };
    let data = tempfile::tempdir().expect("temp dir");
    let mut agent_config = AgentConfig::new("n1", data.path());
    agent_config.interface = Some("eth0".into());
    agent_config.block_poll = Duration::from_millis(50);
    agent_config.metrics_address = metrics_address;
    let ns = NetNs::open(node.path()).await.expect("open netns");
    let agent = Agent::new(agent_config, ns, ipam, agent_registry, Box::new(routing));
    Setup {
        agent,
        store,
        registry,
        init_started,
        torn_down,
        mode_blocks,
        data,
    }
}

/// Keys that must not outlive the agent: addresses in use, handles, node records.
async fn leftovers(store: &Arc<dyn Store>) -> Vec<String> {
    store
        .list("/")
        .await
        .expect("list")
        .into_iter()
        .map(|kv| kv.key)
        .filter(|k| {
            k.contains("/used/") || k.contains("/handles/") || k.contains("/registry/nodes/")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_once_up_removes_everything() {
    if !root("stopped_once_up_removes_everything") {
        return;
    }
    let node = Node::new("up");
    let s = setup(&node, false).await;
    let state_dir = s.data.path().to_path_buf();
    let registry = s.registry.clone();
    let store = s.store.clone();
    let (stop, run) = spawn(s.agent);

    // Up: the state file is written last.
    let up = tokio::time::timeout(Duration::from_secs(10), async {
        while NodeState::read(&state_dir).unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(up.is_ok(), "the agent wrote no node state within 10 s");
    let nodes = registry.list().await.unwrap().nodes;
    assert_eq!(nodes.len(), 1, "registered: {nodes:?}");
    assert_eq!(nodes[0].address, "10.99.0.1".parse::<IpAddr>().unwrap());
    let ns = NetNs::open(node.path()).await.unwrap();
    assert_eq!(blackhole::list(&ns).await.unwrap(), nodes[0].blocks);
    assert!(
        leftovers(&store)
            .await
            .iter()
            .any(|k| k.contains("/handles/cnikit-tunnel/")),
        "the tunnel address is allocated"
    );

    stop.notify_one();
    let result = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the agent stops within 10 s")
        .expect("agent task");
    result.expect("a clean stop");
    assert!(s.torn_down.load(Ordering::SeqCst), "the mode was torn down");
    assert_eq!(leftovers(&store).await, Vec::<String>::new());
    assert!(blackhole::list(&ns).await.unwrap().is_empty());
    assert!(NodeState::read(&state_dir).unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_while_coming_up_returns_and_cleans_up() {
    if !root("stopped_while_coming_up_returns_and_cleans_up") {
        return;
    }
    let node = Node::new("start");
    let s = setup(&node, true).await;
    let store = s.store.clone();
    let init_started = s.init_started.clone();
    // Shutdown comes while the mode's init hangs: the tunnel address is allocated by then.
    let shutdown = async move { init_started.notified().await };
    let result = tokio::time::timeout(Duration::from_secs(10), s.agent.run(shutdown)).await;
    let result = result.expect("the agent returns when stopped while starting, not hang");
    result.expect("a clean stop");
    assert!(s.torn_down.load(Ordering::SeqCst), "the mode was torn down");
    assert_eq!(
        leftovers(&store).await,
        Vec::<String>::new(),
        "the tunnel address is released"
    );
    assert!(NodeState::read(s.data.path()).unwrap().is_none());
}

/// Waits up to 10 s for the agent's node state file: the agent is up.
async fn until_up(state_dir: &std::path::Path) {
    let up = tokio::time::timeout(Duration::from_secs(10), async {
        while NodeState::read(state_dir).unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(up.is_ok(), "the agent wrote no node state within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_while_the_registry_cannot_be_watched_returns() {
    if !root("stopped_while_the_registry_cannot_be_watched_returns") {
        return;
    }
    let node = Node::new("rewatch");
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let registry = Arc::new(StoreRegistry::new(store.clone()));
    let flaky = Arc::new(Flaky::new(store.clone(), 1, usize::MAX));
    let s = setup_with(&node, false, store.clone(), registry, flaky.clone()).await;
    let (stop, run) = spawn(s.agent);
    until_up(s.data.path()).await;

    // The first watch has ended and the agent is trying to watch again, in vain.
    let retrying = tokio::time::timeout(Duration::from_secs(10), async {
        while flaky.watches.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(retrying.is_ok(), "the agent did not watch again");

    stop.notify_one();
    let result = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the agent stops within 10 s while the watch keeps failing")
        .expect("agent task");
    result.expect("a clean stop");
    assert!(s.torn_down.load(Ordering::SeqCst), "the mode was torn down");
    assert_eq!(leftovers(&store).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_whose_publication_failed_is_published_at_the_next_poll() {
    if !root("a_block_whose_publication_failed_is_published_at_the_next_poll") {
        return;
    }
    let node = Node::new("publish");
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let registry = Arc::new(StoreRegistry::new(store.clone()));
    let flaky = Arc::new(Flaky::new(store.clone(), 0, 0));
    let s = setup_with(&node, false, store.clone(), registry.clone(), flaky.clone()).await;
    let (stop, run) = spawn(s.agent);
    until_up(s.data.path()).await;
    let blocks = |nodes: Vec<NodeRecord>| nodes.into_iter().map(|n| n.blocks).collect::<Vec<_>>();
    assert_eq!(blocks(registry.list().await.unwrap().nodes)[0].len(), 1);

    // The plugin fills the node's /28 (the tunnel holds one address) and claims a second
    // block; the agent's first registration of it fails.
    flaky.failing_registers.store(1, Ordering::SeqCst);
    let plugin = BlockIpam::new(store.clone(), ipam_config()).expect("ipam");
    for i in 0..16 {
        let attachment = Attachment::new("agent-test", format!("pod{i}"), "eth0");
        plugin.allocate(&attachment).await.expect("allocate");
    }
    assert_eq!(plugin.node_blocks().await.unwrap().len(), 2);

    let published = tokio::time::timeout(Duration::from_secs(10), async {
        while blocks(registry.list().await.unwrap().nodes)[0].len() != 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(flaky.failed_registers.load(Ordering::SeqCst), 1);
    assert!(
        published.is_ok(),
        "the second block was never published: {:?}",
        blocks(registry.list().await.unwrap().nodes)
    );
    // The mode checks peers' blocks against the node's: it knows the new one too.
    let published = blocks(registry.list().await.unwrap().nodes).remove(0);
    assert_eq!(*s.mode_blocks.lock().unwrap(), published);

    stop_cleanly(&stop, run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_state_follows_the_peers() {
    if !root("the_node_state_follows_the_peers") {
        return;
    }
    let node = Node::new("peers");
    let s = setup(&node, false).await;
    let (stop, run) = spawn(s.agent);
    until_up(s.data.path()).await;
    let peers = || NodeState::read(s.data.path()).unwrap().map(|st| st.peers);
    assert_eq!(peers(), Some(vec![]));
    // The mode's own report lands in the state file.
    let state = NodeState::read(s.data.path()).unwrap().unwrap();
    assert_eq!(
        state.routing,
        Some(serde_json::json!({ "blocks": state.blocks })),
        "{state:?}"
    );
    assert!(!state.blocks.is_empty());
    // What the mode reports changes by itself (a BGP session learned something): the
    // state file follows at the next block poll (50 ms here), with no reconcile (the
    // resync is 10 s away).
    s.mode_blocks
        .lock()
        .unwrap()
        .push("10.97.0.0/28".parse().unwrap());
    let routing = || {
        NodeState::read(s.data.path())
            .unwrap()
            .and_then(|st| st.routing)
    };
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        while !routing().is_some_and(|r| r.to_string().contains("10.97.0.0/28")) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(seen.is_ok(), "the state file reports {:?}", routing());

    // The stand-in mode reports nothing routed either way: only the peer list changes.
    let peer = peer_p1();
    s.registry
        .register(&peer, Duration::from_secs(20))
        .await
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        while peers() != Some(vec!["p1".to_owned()]) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(seen.is_ok(), "the node state lists {:?}", peers());
    s.registry.deregister("p1").await.unwrap();

    stop_cleanly(&stop, run).await;
}

/// A start the datastore fails with code 11 is tried again until it succeeds; stopped
/// while the datastore keeps failing, the agent returns and leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_the_datastore_fails_is_tried_again() {
    if !root("a_start_the_datastore_fails_is_tried_again") {
        return;
    }
    let node = Node::new("restart");
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let registry = Arc::new(StoreRegistry::new(store.clone()));
    let flaky = Arc::new(Flaky::new(store.clone(), 0, 0));
    flaky.failing_registers.store(2, Ordering::SeqCst);
    let s = setup_with(&node, false, store.clone(), registry.clone(), flaky.clone()).await;
    let metrics = s.agent.metrics();
    let (stop, run) = spawn(s.agent);
    until_up(s.data.path()).await;
    assert_eq!(flaky.failed_registers.load(Ordering::SeqCst), 2);
    let names: Vec<String> = registry
        .list()
        .await
        .unwrap()
        .nodes
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(names, ["n1"]);
    assert_eq!(metrics.not_ready(), None, "ready once up");
    stop_cleanly(&stop, run).await;
    assert_eq!(leftovers(&store).await, Vec::<String>::new());

    // Now the datastore never answers: the agent keeps trying, not ready, until stopped.
    let node = Node::new("restart2");
    let flaky = Arc::new(Flaky::new(store.clone(), 0, 0));
    flaky.failing_registers.store(usize::MAX, Ordering::SeqCst);
    let s = setup_with(&node, false, store.clone(), registry.clone(), flaky.clone()).await;
    let metrics = s.agent.metrics();
    let (stop, run) = spawn(s.agent);
    let tried = tokio::time::timeout(Duration::from_secs(10), async {
        while flaky.failed_registers.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(tried.is_ok(), "the start was not tried twice within 10 s");
    assert!(!run.is_finished(), "the agent gave up: {:?}", run.await);
    let reason = metrics
        .not_ready()
        .expect("not ready while it cannot start");
    assert!(reason.contains("datastore"), "{reason}");
    assert!(NodeState::read(s.data.path()).unwrap().is_none());
    stop_cleanly(&stop, run).await;
    assert!(s.torn_down.load(Ordering::SeqCst), "the mode was torn down");
    assert_eq!(leftovers(&store).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_watch_that_fails_is_retried() {
    if !root("a_first_watch_that_fails_is_retried") {
        return;
    }
    let node = Node::new("watch1");
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let registry = Arc::new(StoreRegistry::new(store.clone()));
    let flaky = Arc::new(Flaky::new(store.clone(), 0, 1));
    let s = setup_with(&node, false, store.clone(), registry.clone(), flaky.clone()).await;
    let (stop, run) = spawn(s.agent);
    until_up(s.data.path()).await;

    let peer = peer_p1();
    registry
        .register(&peer, Duration::from_secs(20))
        .await
        .unwrap();
    let peers = || NodeState::read(s.data.path()).unwrap().map(|st| st.peers);
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        while peers() != Some(vec!["p1".to_owned()]) && !run.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(!run.is_finished(), "the agent stopped: {:?}", run.await);
    assert!(seen.is_ok(), "the node state lists {:?}", peers());
    assert!(flaky.watches.load(Ordering::SeqCst) >= 2, "watched again");
    registry.deregister("p1").await.unwrap();

    stop_cleanly(&stop, run).await;
}

/// A peer on the node's underlay, with no blocks.
fn peer_p1() -> NodeRecord {
    NodeRecord {
        name: "p1".into(),
        address: "10.99.0.2".parse().unwrap(),
        prefix_len: 24,
        blocks: vec![],
        backend: BTreeMap::new(),
    }
}

/// Runs `agent` in a task until the returned `Notify` is notified.
fn spawn(agent: Agent) -> (Arc<Notify>, tokio::task::JoinHandle<Result<()>>) {
    let stop = Arc::new(Notify::new());
    let stop_rx = stop.clone();
    let run = tokio::spawn(agent.run(async move { stop_rx.notified().await }));
    (stop, run)
}

/// Tells the agent running as `run` to stop; it must return `Ok` within 10 s.
async fn stop_cleanly(stop: &Notify, run: tokio::task::JoinHandle<Result<()>>) {
    stop.notify_one();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the agent stops within 10 s")
        .expect("agent task")
        .expect("a clean stop");
}

/// `GET path` over HTTP/1.1 from inside `ns` to `address`: (status, body).
async fn get(ns: &NetNs, address: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    let response = ns
        .run(move || -> std::io::Result<String> {
            let mut stream = std::net::TcpStream::connect(address)?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(request.as_bytes())?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })
        .await
        .expect("thread in the node namespace")
        .unwrap_or_else(|e| panic!("GET {path} from {address}: {e}"));
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_owned())
}

/// The value of the sample `name` (a whole line `name value`) in a metrics page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoints_report_health_readiness_and_reconciles() {
    if !root("the_endpoints_report_health_readiness_and_reconciles") {
        return;
    }
    let node = Node::new("endpoints");
    let ns = NetNs::open(node.path()).await.expect("open netns");

    // Coming up (the mode's init never finishes): alive, not ready, nothing reconciled.
    let address: std::net::SocketAddr = "127.0.0.1:9153".parse().unwrap();
    let s = setup_serving(&node, true, Some(address)).await;
    let init_started = s.init_started.clone();
    let (stop, run) = spawn(s.agent);
    init_started.notified().await;
    let (status, body) = get(&ns, address, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("not ready: "), "{body}");
    assert_eq!(get(&ns, address, "/healthz").await.0, 200);
    let (status, page) = get(&ns, address, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        sample(&page, "cnikit_agent_reconciles_total"),
        Some(0.0),
        "{page}"
    );
    stop_cleanly(&stop, run).await;

    // Up: ready after the first reconcile; a peer joining means another reconcile.
    let address: std::net::SocketAddr = "127.0.0.1:9154".parse().unwrap();
    let s = setup_serving(&node, false, Some(address)).await;
    let (stop, run) = spawn(s.agent);
    until_up(s.data.path()).await;
    let (status, body) = get(&ns, address, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    assert_eq!(get(&ns, address, "/healthz").await.0, 200);
    let page = get(&ns, address, "/metrics").await.1;
    let before = sample(&page, "cnikit_agent_reconciles_total").expect(&page);
    assert!(before >= 1.0, "{page}");
    assert_eq!(sample(&page, "cnikit_agent_peers"), Some(0.0), "{page}");
    assert_eq!(sample(&page, "cnikit_agent_blocks"), Some(1.0), "{page}");

    let peer = peer_p1();
    s.registry
        .register(&peer, Duration::from_secs(20))
        .await
        .unwrap();
    let mut page = String::new();
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            page = get(&ns, address, "/metrics").await.1;
            if sample(&page, "cnikit_agent_peers") == Some(1.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(seen.is_ok(), "the peer never showed in\n{page}");
    let after = sample(&page, "cnikit_agent_reconciles_total").expect(&page);
    assert!(after > before, "reconciles {before} -> {after}\n{page}");
    s.registry.deregister("p1").await.unwrap();

    // A pod allocated on the node (as the plugin does, in the same store): one more
    // address in use besides the tunnel address; released: back.
    let in_use = |page: &str| sample(page, "cnikit_agent_addresses_in_use");
    assert_eq!(in_use(&page), Some(1.0), "the tunnel address\n{page}");
    let pods: AgentIpam = BlockIpam::new(s.store.clone(), ipam_config()).expect("ipam");
    let pod = Attachment::new("agent-test", "pod-1", "eth0");
    pods.allocate(&pod).await.expect("allocate");
    let until = |want: f64| {
        let ns = &ns;
        async move {
            let mut page = String::new();
            let seen = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    page = get(ns, address, "/metrics").await.1;
                    if in_use(&page) == Some(want) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            assert!(seen.is_ok(), "addresses in use never {want} in\n{page}");
        }
    };
    until(2.0).await;
    pods.release(&pod).await.expect("release");
    until(1.0).await;

    stop_cleanly(&stop, run).await;
}
