//! The node agent: the long-running half of a multi-node network.
//!
//! One agent runs on each node, in the node's network namespace. [`Agent::run`]:
//!
//! 1. finds the node's underlay interface and address, turns IP forwarding on;
//! 2. makes sure the node owns a block of the pool and, if the routing mode needs one,
//!    allocates a tunnel address from it (so no pod ever gets the VTEP address);
//! 3. initialises the [`CrossNodeRouting`] mode (its devices) and installs a blackhole route
//!    per own block, so traffic to an unused address of the node's blocks dies here;
//! 4. registers the node record (underlay address, blocks, the mode's data) with a TTL;
//! 5. lists the peers, reconciles, writes the [node state file](crate::state::NodeState)
//!    that the CNI plugin reads (MTU; STATUS is ready once it exists); steps 2–5 are
//!    idempotent, and when the datastore fails them with code 11 they run again after a
//!    growing pause, so a node started before its datastore answers comes up once it does;
//! 6. then watches the peers: every change (and a periodic resync) leads to one
//!    level-triggered reconcile of the full peer set, which changes only what differs; the
//!    node's own blocks, which the plugin may have grown, are re-read every
//!    [`block_poll`](AgentConfig::block_poll) and a change is passed to the blackholes, the
//!    mode (through its idempotent `init`) and the node record; at the same pace the node
//!    state file follows the mode's [`report`](CrossNodeRouting::report); at each resync
//!    one node (the live one whose name sorts first) deletes what dead nodes left in the
//!    registry ([`NodeRegistry::prune_expired`]);
//! 7. on shutdown removes what it made: record, mode devices and routes, blackholes, tunnel
//!    address, state file (unless told to keep them for a restart).
//!
//! With [`AgentConfig::metrics_address`] set, it also serves `/healthz`, `/readyz` and
//! `/metrics` on that address in the node namespace ([`endpoints`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use ipnet::IpNet;

use crate::error::{Error, ErrorCode, Result};
use crate::ipam::{Attachment, BlockIpam, Ipam};
use crate::linux::{NetNs, addr, link, route, sysctl};
use crate::registry::{NodeEvent, NodeRecord, NodeRegistry};
use crate::routing::{CrossNodeRouting, LocalNode, ReconcileReport};
use crate::state::NodeState;
use crate::store::Store;

pub mod blackhole;
pub mod endpoints;

pub use endpoints::Metrics;

use endpoints::gauge;

/// The block IPAM the agent claims blocks and tunnel addresses from.
pub type AgentIpam = BlockIpam<Arc<dyn Store>>;

/// The pause before a start that failed with code 11 (the datastore unreachable or too
/// slow) is tried again; it doubles with each failure, up to [`START_RETRY_MAX`].
pub const START_RETRY_FIRST: Duration = Duration::from_millis(500);

/// The longest pause between two tries of a start that fails with code 11.
pub const START_RETRY_MAX: Duration = Duration::from_secs(30);

/// Network name under which tunnel addresses are allocated: not a pod network, so a
/// pod network's GC never releases them.
pub const TUNNEL_NETWORK: &str = "cnikit-tunnel";

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Node name.
    pub node: String,
    /// The data directory the plugin of this network reads the node state file from.
    pub data_dir: PathBuf,
    /// Underlay interface; default: the only interface with a global IPv4 address, or the
    /// one of the default route when there are several.
    pub interface: Option<String>,
    /// Underlay address; default: the first global address of the interface.
    pub address: Option<IpAddr>,
    /// Pod MTU; default: the underlay MTU minus the mode's overhead.
    pub mtu: Option<u32>,
    /// Lifetime of the node record without refresh.
    pub ttl: Duration,
    /// Interval of the full resync (peers and own blocks).
    pub resync: Duration,
    /// How often the node's own blocks are re-read between resyncs: the plugin claims a
    /// new block when the node's pods fill the last one, and peers learn of it only once
    /// the agent publishes it. One cheap datastore read per interval.
    pub block_poll: Duration,
    /// On shutdown, leave devices, routes and the record to expire (an agent restart or
    /// upgrade); default: remove everything.
    pub keep_on_exit: bool,
    /// Where to serve `/healthz`, `/readyz` and `/metrics` (inside the node namespace);
    /// default: nowhere.
    pub metrics_address: Option<SocketAddr>,
}

impl AgentConfig {
    /// A configuration with defaults: TTL 20 s, resync 10 s, own blocks re-read every
    /// second, remove everything on exit.
    pub fn new(node: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        AgentConfig {
            node: node.into(),
            data_dir: data_dir.into(),
            interface: None,
            address: None,
            mtu: None,
            ttl: Duration::from_secs(20),
            resync: Duration::from_secs(10),
            block_poll: Duration::from_secs(1),
            keep_on_exit: false,
            metrics_address: None,
        }
    }
}

/// What the agent knows about its node once it is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The local node as the routing mode sees it.
    pub local: LocalNode,
    /// Pod MTU.
    pub mtu: u32,
    /// Peers currently known, by name.
    pub peers: Vec<String>,
    /// The last reconcile.
    pub report: ReconcileReport,
}

/// The node agent. See the [module docs](self).
pub struct Agent {
    config: AgentConfig,
    ns: NetNs,
    ipam: AgentIpam,
    registry: Arc<dyn NodeRegistry>,
    routing: Box<dyn CrossNodeRouting>,
    peers: BTreeMap<String, NodeRecord>,
    local: Option<LocalNode>,
    record: Option<NodeRecord>,
    mtu: u32,
    report: ReconcileReport,
    tunnel: Option<Attachment>,
    /// The node state file as last written.
    written: Option<NodeState>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.config.node)
            .field("mode", &self.routing.mode())
            .finish()
    }
}

impl Agent {
    /// An agent acting in the node namespace `ns` (the agent process's own, in practice).
    /// Touches nothing until [`run`](Agent::run).
    pub fn new(
        config: AgentConfig,
        ns: NetNs,
        ipam: AgentIpam,
        registry: Arc<dyn NodeRegistry>,
        routing: Box<dyn CrossNodeRouting>,
    ) -> Self {
        Agent {
            config,
            ns,
            ipam,
            registry,
            routing,
            peers: BTreeMap::new(),
            local: None,
            record: None,
            mtu: 0,
            report: ReconcileReport::default(),
            tunnel: None,
            written: None,
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// The agent's metrics and health, as its endpoints serve them.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The routing mode's name.
    pub fn mode(&self) -> &'static str {
        self.routing.mode()
    }

    /// Runs until `shutdown` resolves: brings the node up, then keeps the routes in line
    /// with the peers. On shutdown removes what it made (see [`AgentConfig::keep_on_exit`]),
    /// also when `shutdown` resolves while the node is still coming up.
    ///
    /// Errors: what stops the node from coming up (no underlay, no free block, the mode's
    /// devices, a configuration the datastore refuses). A start that fails with code 11 (the
    /// datastore unreachable or too slow) is not an error: it is logged and tried again,
    /// after a pause from [`START_RETRY_FIRST`] doubling up to [`START_RETRY_MAX`], until it
    /// succeeds or `shutdown` resolves; meanwhile `/readyz` says why the node is not ready.
    /// Once up, failures are logged and retried at the next event or resync.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let endpoints = match self.config.metrics_address {
            Some(address) => Some(endpoints::serve(&self.ns, address, self.metrics.clone()).await?),
            None => None,
        };
        self.metrics.set_alive(true);
        let result = self.run_inner(shutdown).await;
        self.metrics.set_alive(false);
        if let Some(endpoints) = endpoints {
            endpoints.abort();
        }
        result
    }

    async fn run_inner(&mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let started = Instant::now();
        let shutdown = shutdown.fuse();
        futures::pin_mut!(shutdown);
        let mut pause = START_RETRY_FIRST;
        let start = loop {
            let result = tokio::select! {
                result = self.start() => result,
                () = &mut shutdown => break None,
            };
            match result {
                // The datastore was unreachable or slow (code 11): that may pass, and start
                // is idempotent, so it runs again from the top after a pause.
                Err(e) if e.code() == ErrorCode::TRY_AGAIN_LATER => {
                    tracing::warn!(
                        error = %e,
                        retry_in_ms = pause.as_millis() as u64,
                        "node agent cannot start yet; trying again"
                    );
                    self.metrics
                        .set_not_ready(Some("starting: the datastore failed; trying again"));
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = &mut shutdown => break None,
                    }
                    pause = (pause * 2).min(START_RETRY_MAX);
                }
                other => break Some(other),
            }
        };
        let revision = match start {
            Some(Ok(revision)) => revision,
            Some(Err(e)) => {
                tracing::error!(error = %e, "node agent failed to start; removing what it made");
                if let Err(cleanup) = self.stop().await {
                    tracing::warn!(error = %cleanup, "cleanup after a failed start");
                }
                return Err(e);
            }
            None => {
                // Stopped halfway: whatever start made is removed, as on a failed start.
                tracing::info!("shutdown while starting; removing what was made");
                return self.stop().await;
            }
        };
        tracing::info!(
            node = %self.config.node,
            mode = self.routing.mode(),
            mtu = self.mtu,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "node agent up"
        );
        self.metrics.set_not_ready(None);
        self.watch_loop(shutdown, revision).await;
        self.metrics.set_not_ready(Some("stopping"));
        if self.config.keep_on_exit {
            Ok(())
        } else {
            self.stop().await
        }
    }

    /// Steps 1–5 of the module docs; returns the registry revision the peers were read at.
    async fn start(&mut self) -> Result<u64> {
        let (interface, address, prefix_len, underlay_mtu) = self.underlay().await?;
        sysctl::ensure(&self.ns, vec![("net.ipv4.ip_forward".into(), "1".into())]).await?;
        self.ipam.ensure_block().await?;
        let blocks = self.ipam.node_blocks().await?;
        let tunnel_address = if self.routing.needs_tunnel_address() {
            let attachment = Attachment::new(TUNNEL_NETWORK, &self.config.node, "tunnel");
            // Recorded before allocating: a start stopped during the allocation must still
            // release it (release is Ok when nothing was allocated).
            self.tunnel = Some(attachment.clone());
            let allocation = self.ipam.allocate(&attachment).await?;
            allocation.ips.first().map(|ip| ip.address.addr())
        } else {
            None
        };
        let local = LocalNode {
            name: self.config.node.clone(),
            address,
            prefix_len,
            interface,
            underlay_mtu,
            blocks: blocks.clone(),
            tunnel_address,
        };
        self.routing.init(&local).await?;
        self.mtu = self
            .config
            .mtu
            .unwrap_or_else(|| underlay_mtu.saturating_sub(self.routing.mtu_overhead()));
        blackhole::sync(&self.ns, &blocks).await?;
        let record = NodeRecord {
            name: self.config.node.clone(),
            address,
            prefix_len,
            blocks,
            backend: self.routing.node_data(),
        };
        self.metrics.set_not_ready(Some("registering the node"));
        self.registry
            .register(&record, self.config.ttl)
            .await
            .inspect_err(|_| self.datastore_failed())?;
        self.metrics.blocks.set(gauge(record.blocks.len()));
        match self.ipam.usage().await {
            Ok(usage) => {
                self.metrics.addresses_in_use.set(gauge(usage.addresses));
            }
            Err(_) => self.datastore_failed(),
        }
        self.local = Some(local);
        self.record = Some(record);
        self.metrics
            .set_not_ready(Some("registered; first reconcile not done"));
        let list = self
            .registry
            .list()
            .await
            .inspect_err(|_| self.datastore_failed())?;
        self.peers = list
            .nodes
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect();
        self.reconcile().await?;
        Ok(list.revision)
    }

    /// Step 6: events and resyncs until shutdown. Failures are logged and retried.
    async fn watch_loop(&mut self, shutdown: impl Future<Output = ()>, mut revision: u64) {
        let shutdown = shutdown.fuse();
        futures::pin_mut!(shutdown);
        let mut resync = tokio::time::interval(self.config.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await;
        let mut block_poll = tokio::time::interval(self.config.block_poll);
        block_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        block_poll.tick().await;
        let mut events = tokio::select! {
            () = &mut shutdown => return,
            stream = self.rewatch(revision) => stream,
        };
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                event = events.next() => {
                    let mut changed = false;
                    let mut next = event;
                    // Take every event that is already there, then reconcile once.
                    loop {
                        match next {
                            Some(Ok(event)) => {
                                revision = revision.max(event_revision(&event));
                                changed |= self.apply(event);
                            }
                            broken => {
                                match broken {
                                    Some(Err(e)) => {
                                        self.datastore_failed();
                                        tracing::warn!(error = %e, "peer watch failed; listing again")
                                    }
                                    _ => tracing::warn!("peer watch ended; listing again"),
                                }
                                // The registry may stay away for long: a shutdown meanwhile
                                // must not wait for it.
                                let resumed = async {
                                    self.relist(&mut revision).await;
                                    self.rewatch(revision).await
                                };
                                tokio::select! {
                                    () = &mut shutdown => return,
                                    stream = resumed => events = stream,
                                }
                                changed = true;
                                break;
                            }
                        }
                        match events.next().now_or_never() {
                            Some(more) => next = more,
                            None => break,
                        }
                    }
                    if changed {
                        self.reconcile_logged().await;
                    }
                }
                _ = resync.tick() => {
                    self.relist(&mut revision).await;
                    self.prune_dead_nodes().await;
                    // Blocks the pods no longer need go back to the pool (never the last).
                    match self.ipam.release_empty_blocks().await {
                        Ok(blocks) if !blocks.is_empty() => {
                            tracing::info!(?blocks, "empty blocks given back");
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "giving back empty blocks failed"),
                    }
                    if let Err(e) = self.refresh_blocks().await {
                        tracing::warn!(error = %e, "re-reading the node's blocks failed");
                    }
                    self.reconcile_logged().await;
                }
                _ = block_poll.tick() => {
                    if let Err(e) = self.refresh_blocks().await {
                        tracing::debug!(error = %e, "re-reading the node's blocks failed");
                    }
                    // A mode that learns by itself (BGP) changes its report between
                    // reconciles: the state file follows within a poll (written only when
                    // it changed).
                    if let Err(e) = self.write_state() {
                        tracing::debug!(error = %e, "writing the node state file failed");
                    }
                }
            }
        }
    }

    /// Deletes what nodes that died without deregistering left in the registry
    /// ([`NodeRegistry::prune_expired`]). One node does it, so that the registry is not read
    /// in full by every node at every resync: the live node whose name sorts first, as this
    /// agent sees the registry. Two agents that both believe so for a moment both try, which
    /// is safe.
    async fn prune_dead_nodes(&self) {
        if self
            .peers
            .keys()
            .next()
            .is_some_and(|first| *first < self.config.node)
        {
            return;
        }
        match self.registry.prune_expired().await {
            Ok(nodes) if !nodes.is_empty() => {
                tracing::info!(?nodes, "registry records of dead nodes deleted");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "deleting dead nodes' registry records failed"),
        }
    }

    /// Applies one event to the peer map; whether anything changed.
    fn apply(&mut self, event: NodeEvent) -> bool {
        match event {
            NodeEvent::Put(node, _) => {
                self.peers.insert(node.name.clone(), node.clone()) != Some(node)
            }
            NodeEvent::Delete(name, _) => self.peers.remove(&name).is_some(),
            NodeEvent::Reset(nodes, _) => {
                let fresh: BTreeMap<_, _> =
                    nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
                let changed = fresh != self.peers;
                self.peers = fresh;
                changed
            }
        }
    }

    async fn relist(&mut self, revision: &mut u64) {
        match self.registry.list().await {
            Ok(list) => {
                *revision = (*revision).max(list.revision);
                self.peers = list
                    .nodes
                    .into_iter()
                    .map(|n| (n.name.clone(), n))
                    .collect();
            }
            Err(e) => {
                self.datastore_failed();
                tracing::warn!(error = %e, "listing peers failed; keeping the last known set")
            }
        }
    }

    /// Watches the peers after `revision`, retrying every 500 ms until the registry answers.
    async fn rewatch(
        &self,
        revision: u64,
    ) -> futures::stream::BoxStream<'static, Result<NodeEvent>> {
        loop {
            match self.registry.watch(revision).await {
                Ok(stream) => return stream,
                Err(e) => {
                    self.datastore_failed();
                    tracing::warn!(error = %e, "cannot watch peers; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// The plugin may have claimed more blocks for this node: follow them.
    async fn refresh_blocks(&mut self) -> Result<()> {
        let usage = self
            .ipam
            .usage()
            .await
            .inspect_err(|_| self.datastore_failed())?;
        let blocks = usage.blocks;
        self.metrics.blocks.set(gauge(blocks.len()));
        self.metrics.addresses_in_use.set(gauge(usage.addresses));
        let (Some(record), Some(local)) = (&self.record, &self.local) else {
            return Ok(());
        };
        if record.blocks == blocks {
            return Ok(());
        }
        tracing::info!(?blocks, "the node's blocks changed");
        let record = NodeRecord {
            blocks: blocks.clone(),
            ..record.clone()
        };
        let local = LocalNode {
            blocks,
            ..local.clone()
        };
        blackhole::sync(&self.ns, &local.blocks).await?;
        // The mode checks peers' blocks against the node's own: init again (idempotent)
        // tells it the new ones.
        self.routing.init(&local).await?;
        // Both change only once registered: a failed registration is retried at the next
        // poll instead of being taken for done.
        self.registry
            .register(&record, self.config.ttl)
            .await
            .inspect_err(|_| self.datastore_failed())?;
        self.record = Some(record);
        self.local = Some(local);
        self.write_state()
    }

    /// Counts a failed registry or datastore call.
    fn datastore_failed(&self) {
        self.metrics.datastore_errors.inc();
    }

    async fn reconcile_logged(&mut self) {
        if let Err(e) = self.reconcile().await {
            tracing::warn!(error = %e, "reconcile failed; retrying at the next event or resync");
        }
    }

    async fn reconcile(&mut self) -> Result<()> {
        let peers: Vec<NodeRecord> = self
            .peers
            .values()
            .filter(|p| p.name != self.config.node)
            .cloned()
            .collect();
        let started = Instant::now();
        let result = self.routing.reconcile(&peers).await;
        let m = &self.metrics;
        m.reconciles.inc();
        m.reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        m.peers.set(gauge(peers.len()));
        let report = result.inspect_err(|_| {
            m.reconcile_errors.inc();
        })?;
        m.kernel_writes.inc_by(report.writes as u64);
        m.routed_peers.set(gauge(report.routed));
        m.unroutable_peers.set(gauge(report.unroutable.len()));
        m.set_programmed(&report.programmed);
        for (peer, why) in &report.unroutable {
            if self.report.unroutable.get(peer) != Some(why) {
                tracing::warn!(peer = %peer, reason = %why, "peer is not routed");
            }
        }
        tracing::debug!(
            peers = peers.len(),
            writes = report.writes,
            elapsed_us = started.elapsed().as_micros() as u64,
            "reconciled"
        );
        self.report = report;
        self.write_state()
    }

    /// Writes the node state file when its contents changed since the last write (or the
    /// file is gone); a failed write is retried at the next call.
    fn write_state(&mut self) -> Result<()> {
        let Some(record) = &self.record else {
            return Ok(());
        };
        let state = NodeState {
            node: self.config.node.clone(),
            mode: self.routing.mode().to_owned(),
            mtu: self.mtu,
            blocks: record.blocks.clone(),
            peers: self
                .peers
                .keys()
                .filter(|p| **p != self.config.node)
                .cloned()
                .collect(),
            unroutable: self.report.unroutable.clone(),
            routing: self.routing.report(),
        };
        if let Some(report) = &state.routing {
            self.metrics.observe_report(report);
        }
        if self.written.as_ref() == Some(&state) && NodeState::path(&self.config.data_dir).exists()
        {
            return Ok(());
        }
        state.write(&self.config.data_dir)?;
        self.written = Some(state);
        Ok(())
    }

    /// The agent's view of its node, once up.
    pub fn status(&self) -> Option<Status> {
        Some(Status {
            local: self.local.clone()?,
            mtu: self.mtu,
            peers: self.peers.keys().cloned().collect(),
            report: self.report.clone(),
        })
    }

    /// Step 7: removes everything the agent made, running every step.
    async fn stop(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        if let Err(e) = NodeState::remove(&self.config.data_dir) {
            errors.push(e);
        }
        if let Err(e) = self.registry.deregister(&self.config.node).await {
            errors.push(e);
        }
        if let Err(e) = self.routing.teardown().await {
            errors.push(e);
        }
        if let Err(e) = blackhole::sync(&self.ns, &[]).await {
            errors.push(e);
        }
        if let Some(tunnel) = self.tunnel.take()
            && let Err(e) = self.ipam.release(&tunnel).await
        {
            errors.push(e);
        }
        // The node leaves: its empty blocks go back to the pool.
        match self.ipam.leave().await {
            Ok(blocks) if !blocks.is_empty() => tracing::info!(?blocks, "blocks given back"),
            Ok(_) => {}
            Err(e) => errors.push(e),
        }
        Error::collect(errors)
    }

    /// Finds the underlay: (interface, address, prefix length, MTU).
    async fn underlay(&self) -> Result<(String, IpAddr, u8, u32)> {
        let links = link::list(&self.ns).await?;
        let mut candidates = Vec::new();
        for l in &links {
            if let Some(name) = &self.config.interface {
                if &l.name != name {
                    continue;
                }
            } else if l.name == "lo" || l.kind.as_deref().is_some_and(|k| k != "veth") {
                // Bridges, VXLAN devices and other virtual devices are not underlays.
                continue;
            }
            let addresses: Vec<IpNet> = addr::list_on(&self.ns, l.index)
                .await?
                .into_iter()
                .filter(|a| match self.config.address {
                    Some(want) => a.addr() == want,
                    None => is_global(a.addr()),
                })
                .collect();
            if let Some(a) = addresses.first() {
                candidates.push((l.clone(), *a));
            }
        }
        let pick = match candidates.len() {
            0 => None,
            1 => candidates.pop(),
            _ => {
                // Several: the interface of the default route decides.
                let oif = route::lookup(&self.ns, IpAddr::from([192, 0, 2, 1])).await?;
                candidates.into_iter().find(|(l, _)| Some(l.index) == oif)
            }
        };
        let (link, address) = pick.ok_or_else(|| {
            Error::invalid_config(
                "agent.interface",
                match &self.config.interface {
                    Some(name) => format!("interface {name} has no usable address"),
                    None => "no single underlay interface found; set agent.interface".to_owned(),
                },
            )
        })?;
        Ok((
            link.name,
            address.addr(),
            address.prefix_len(),
            link.mtu.unwrap_or(1500),
        ))
    }
}

fn is_global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(_) => false,
    }
}

fn event_revision(event: &NodeEvent) -> u64 {
    match event {
        NodeEvent::Put(_, r) | NodeEvent::Delete(_, r) | NodeEvent::Reset(_, r) => *r,
    }
}
