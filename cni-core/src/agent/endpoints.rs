//! The agent's HTTP endpoints, as calico-node and cilium-agent serve them:
//!
//! - `/healthz`: 200 while the agent's loop runs, 503 once it has stopped;
//! - `/readyz`: 200 once the node is registered and the first reconcile is done, else 503
//!   with a one-line reason;
//! - `/metrics`: the [`Metrics`] in the Prometheus text format.
//!
//! The agent opens the listener in its node namespace when
//! [`AgentConfig::metrics_address`](super::AgentConfig::metrics_address) is set.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::{Error, Result};
use crate::linux::NetNs;
use crate::routing::Programmed;

/// The RFC 4271 session states (as the BGP mode's report names them), each exported for a
/// mode that reports sessions, with 0 when no session is in it.
pub const SESSION_STATES: [&str; 6] = [
    "idle",
    "connect",
    "active",
    "open_sent",
    "open_confirm",
    "established",
];

/// The label set of `cnikit_agent_bgp_sessions`: `state`.
type StateLabel = Vec<(String, String)>;

/// What the agent has done, in Prometheus metrics (all prefixed `cnikit_agent_`), and
/// whether it is alive and ready. Shared between the agent and its endpoints.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `cnikit_agent_reconciles_total`: reconciles run.
    pub reconciles: Counter,
    /// `cnikit_agent_reconcile_errors_total`: reconciles that failed.
    pub reconcile_errors: Counter,
    /// `cnikit_agent_reconcile_duration_seconds`: how long a reconcile took.
    pub reconcile_duration: Histogram,
    /// `cnikit_agent_kernel_writes_total`: netlink writes (routes, neighbours, FDB
    /// entries added, replaced or deleted) the reconciles made.
    pub kernel_writes: Counter,
    /// `cnikit_agent_peers`: peers known.
    pub peers: Gauge,
    /// `cnikit_agent_routed_peers`: peers the mode routes.
    pub routed_peers: Gauge,
    /// `cnikit_agent_unroutable_peers`: peers the mode cannot route.
    pub unroutable_peers: Gauge,
    /// `cnikit_agent_blocks`: IPAM blocks the node holds.
    pub blocks: Gauge,
    /// `cnikit_agent_addresses_in_use`: addresses in use in the node's blocks (pods' and
    /// the tunnel address).
    pub addresses_in_use: Gauge,
    /// `cnikit_agent_programmed_routes`: routes to peers' blocks in the kernel.
    pub programmed_routes: Gauge,
    /// `cnikit_agent_programmed_neighbours`: permanent neighbour entries for peers.
    pub programmed_neighbours: Gauge,
    /// `cnikit_agent_programmed_fdb_entries`: VXLAN FDB entries for peers.
    pub programmed_fdb: Gauge,
    /// `cnikit_agent_bgp_sessions{state}`: BGP sessions by state (modes that report
    /// sessions only).
    pub bgp_sessions: Family<StateLabel, Gauge>,
    /// States that have had a session, so that one emptied goes back to 0.
    session_states: Mutex<std::collections::BTreeSet<String>>,
    /// `cnikit_agent_datastore_errors_total`: failed registry and datastore calls.
    pub datastore_errors: Counter,
    alive: AtomicBool,
    /// `None` when ready, else why not.
    not_ready: Mutex<Option<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics: not alive, not ready ("starting").
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cnikit_agent");
        let reconciles = Counter::default();
        let reconcile_errors = Counter::default();
        // 1 ms to about 16 s.
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 4.0, 8));
        let kernel_writes = Counter::default();
        let peers = Gauge::default();
        let routed_peers = Gauge::default();
        let unroutable_peers = Gauge::default();
        let blocks = Gauge::default();
        let addresses_in_use = Gauge::default();
        let programmed_routes = Gauge::default();
        let programmed_neighbours = Gauge::default();
        let programmed_fdb = Gauge::default();
        let bgp_sessions = Family::<StateLabel, Gauge>::default();
        let datastore_errors = Counter::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of a reconcile",
            reconcile_duration.clone(),
        );
        registry.register(
            "kernel_writes",
            "Netlink writes (routes, neighbours, FDB entries) made by reconciles",
            kernel_writes.clone(),
        );
        registry.register("peers", "Peers known", peers.clone());
        registry.register("routed_peers", "Peers routed", routed_peers.clone());
        registry.register(
            "unroutable_peers",
            "Peers the routing mode cannot route",
            unroutable_peers.clone(),
        );
        registry.register("blocks", "IPAM blocks held by the node", blocks.clone());
        registry.register(
            "addresses_in_use",
            "Addresses in use in the node's IPAM blocks",
            addresses_in_use.clone(),
        );
        registry.register(
            "programmed_routes",
            "Routes to peers' blocks programmed in the kernel",
            programmed_routes.clone(),
        );
        registry.register(
            "programmed_neighbours",
            "Permanent neighbour entries programmed for peers",
            programmed_neighbours.clone(),
        );
        registry.register(
            "programmed_fdb_entries",
            "VXLAN forwarding database entries programmed for peers",
            programmed_fdb.clone(),
        );
        registry.register(
            "bgp_sessions",
            "BGP sessions by state",
            bgp_sessions.clone(),
        );
        registry.register(
            "datastore_errors",
            "Failed registry and datastore calls",
            datastore_errors.clone(),
        );
        Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            kernel_writes,
            peers,
            routed_peers,
            unroutable_peers,
            blocks,
            addresses_in_use,
            programmed_routes,
            programmed_neighbours,
            programmed_fdb,
            bgp_sessions,
            session_states: Mutex::new(std::collections::BTreeSet::new()),
            datastore_errors,
            alive: AtomicBool::new(false),
            not_ready: Mutex::new(Some("starting".to_owned())),
        }
    }

    /// Sets the programmed-entry gauges.
    pub fn set_programmed(&self, programmed: &Programmed) {
        self.programmed_routes.set(gauge(programmed.routes));
        self.programmed_neighbours.set(gauge(programmed.neighbours));
        self.programmed_fdb.set(gauge(programmed.fdb));
    }

    /// Takes what a mode reports by itself ([`CrossNodeRouting::report`]) into the
    /// metrics. The BGP mode's report (both engines) has `peers`, each with a `state`,
    /// counted into `cnikit_agent_bgp_sessions{state}` (every RFC 4271 state, 0 when
    /// empty), and `installed`, the routes in the kernel by peer, which then make
    /// `cnikit_agent_programmed_routes` (the speaker installs them between reconciles).
    /// Anything else is ignored.
    ///
    /// [`CrossNodeRouting::report`]: crate::routing::CrossNodeRouting::report
    pub fn observe_report(&self, report: &serde_json::Value) {
        if let Some(peers) = report.get("peers").and_then(|p| p.as_array()) {
            let mut counts: std::collections::BTreeMap<String, usize> = SESSION_STATES
                .iter()
                .map(|s| ((*s).to_owned(), 0))
                .collect();
            for state in peers
                .iter()
                .filter_map(|p| p.get("state").and_then(|s| s.as_str()))
            {
                *counts.entry(state.to_owned()).or_default() += 1;
            }
            let mut seen = self
                .session_states
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for state in seen.iter() {
                counts.entry(state.clone()).or_default();
            }
            for (state, n) in counts {
                self.bgp_sessions
                    .get_or_create(&vec![("state".to_owned(), state.clone())])
                    .set(gauge(n));
                seen.insert(state);
            }
        }
        if let Some(installed) = report.get("installed").and_then(|i| i.as_object()) {
            let routes = installed
                .values()
                .filter_map(|r| r.as_array())
                .map(Vec::len)
                .sum();
            self.programmed_routes.set(gauge(routes));
        }
    }

    /// Marks the agent's loop as running or stopped (`/healthz`).
    pub fn set_alive(&self, alive: bool) {
        self.alive.store(alive, Ordering::Relaxed);
    }

    /// Marks the agent ready (`None`) or not, with the reason (`/readyz`).
    pub fn set_not_ready(&self, reason: Option<&str>) {
        *self.lock_ready() = reason.map(str::to_owned);
    }

    /// Whether the loop runs.
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    /// `None` when ready, else why not.
    pub fn not_ready(&self) -> Option<String> {
        self.lock_ready().clone()
    }

    fn lock_ready(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // A panic while holding the lock leaves a plain Option behind: still valid.
        self.not_ready
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// A count as a gauge value (saturating; counts here are far below `i64::MAX`).
pub(crate) fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The endpoints' routes over `metrics`.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(metrics)
}

async fn healthz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.alive() {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "agent loop not running\n".to_owned(),
        )
    }
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    match m.not_ready() {
        None => (StatusCode::OK, "ready\n".to_owned()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics_text(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

/// Opens a TCP listener on `address` inside `ns` (the socket is created on a thread in
/// that namespace) and serves the endpoints on it from a background task, until the task
/// is aborted. Errors: 5 when the address cannot be bound.
pub async fn serve(
    ns: &NetNs,
    address: SocketAddr,
    metrics: Arc<Metrics>,
) -> Result<tokio::task::JoinHandle<()>> {
    let io = |e| Error::Io {
        what: format!("listen on {address} for the agent's endpoints"),
        source: e,
    };
    let listener = ns
        .run(move || {
            let listener = std::net::TcpListener::bind(address)?;
            listener.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(listener)
        })
        .await?
        .map_err(io)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(io)?;
    let app = router(metrics);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the agent's endpoints stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_names_every_metric() {
        let m = Metrics::new();
        m.reconciles.inc();
        m.peers.set(3);
        m.reconcile_duration.observe(0.002);
        let text = m.encode();
        for line in [
            "cnikit_agent_reconciles_total 1",
            "cnikit_agent_peers 3",
            "cnikit_agent_reconcile_duration_seconds_count 1",
            "cnikit_agent_unroutable_peers 0",
            "cnikit_agent_blocks 0",
            "cnikit_agent_datastore_errors_total 0",
            "cnikit_agent_kernel_writes_total 0",
            "cnikit_agent_addresses_in_use 0",
            "cnikit_agent_programmed_routes 0",
            "cnikit_agent_programmed_neighbours 0",
            "cnikit_agent_programmed_fdb_entries 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert!(
            !text.contains("cnikit_agent_bgp_sessions{"),
            "no sessions without a mode that reports them\n{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn a_bgp_report_gives_sessions_by_state_and_routes() {
        let m = Metrics::new();
        m.set_programmed(&Programmed {
            routes: 0,
            neighbours: 2,
            fdb: 1,
        });
        m.observe_report(&serde_json::json!({
            "peers": [
                {"name": "a", "state": "established"},
                {"name": "b", "state": "established"},
                {"name": "c", "state": "active"},
                {"name": "d", "state": "graceful_restart"},
            ],
            "installed": {"a": ["10.0.1.0/26 via 192.0.2.2"], "b": ["10.0.2.0/26 via 192.0.2.3", "10.0.3.0/26 via 192.0.2.3"]},
        }));
        let text = m.encode();
        for line in [
            "cnikit_agent_bgp_sessions{state=\"established\"} 2",
            "cnikit_agent_bgp_sessions{state=\"active\"} 1",
            "cnikit_agent_bgp_sessions{state=\"idle\"} 0",
            "cnikit_agent_bgp_sessions{state=\"graceful_restart\"} 1",
            "cnikit_agent_programmed_routes 3",
            "cnikit_agent_programmed_neighbours 2",
            "cnikit_agent_programmed_fdb_entries 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        // Sessions gone: their states go back to 0, an unusual one included.
        m.observe_report(&serde_json::json!({"peers": [], "installed": {}}));
        let text = m.encode();
        for line in [
            "cnikit_agent_bgp_sessions{state=\"established\"} 0",
            "cnikit_agent_bgp_sessions{state=\"graceful_restart\"} 0",
            "cnikit_agent_programmed_routes 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn readiness_carries_its_reason() {
        let m = Metrics::new();
        assert!(!m.alive());
        assert_eq!(m.not_ready().as_deref(), Some("starting"));
        m.set_not_ready(None);
        assert_eq!(m.not_ready(), None);
    }
}
