//! The agents' `/healthz`, `/readyz` and `/metrics`: each node's agent serves them on its
//! underlay address ([`address`]), and `status` fetches them from inside the node's
//! namespace, as a probe or a Prometheus on the node would.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use cnikit::core::linux::NetNs;
use serde_json::{Map, Value, json};

use crate::state::Node;

/// The port of the agents' endpoints (calico-node's Felix metrics port is 9091, cilium's
/// 9962; this one is the conflist's `agent.metricsAddress` in every lab node).
pub const PORT: u16 = 9153;

/// The metrics `status` shows, by their name without the `cnikit_agent_` prefix.
pub const KEY_METRICS: [&str; 11] = [
    "peers",
    "routed_peers",
    "unroutable_peers",
    "programmed_routes",
    "programmed_neighbours",
    "programmed_fdb_entries",
    "blocks",
    "addresses_in_use",
    "reconciles_total",
    "datastore_errors_total",
    "bgp_sessions{state=\"established\"}",
];

/// Where `node`'s agent serves its endpoints: its underlay address, so that the node
/// itself and the underlay reach them.
pub fn address(node: &Node) -> SocketAddr {
    SocketAddr::from((node.address, PORT))
}

/// `GET path` on `node`'s agent, from inside the node's namespace: (status, body).
pub async fn get(node: &Node, path: &str) -> Result<(u16, String)> {
    let address = address(node);
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    let ns = NetNs::named(&node.ns).await?;
    let response = ns
        .run(move || -> std::io::Result<String> {
            let mut stream =
                std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(request.as_bytes())?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })
        .await?
        .with_context(|| format!("GET http://{address}{path} in {}", node.ns))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("GET {path}: not an HTTP response"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("GET {path}: no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// The value of the sample `name` (labels included) in a metrics page.
pub fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// `node`'s endpoints for `status --json`: `address`, `healthz` and `readyz` (status code
/// and body, or the error), and `metrics`: the [`KEY_METRICS`] present.
pub async fn report(node: &Node) -> Value {
    let fetch = |path: &'static str| async move {
        match get(node, path).await {
            Ok((status, body)) => json!({"status": status, "body": body.trim()}),
            Err(e) => json!({"error": format!("{e:#}")}),
        }
    };
    let metrics = match get(node, "/metrics").await {
        Ok((200, page)) => {
            let values: Map<String, Value> = KEY_METRICS
                .iter()
                .filter_map(|m| {
                    sample(&page, &format!("cnikit_agent_{m}")).map(|v| ((*m).to_owned(), json!(v)))
                })
                .collect();
            Value::Object(values)
        }
        Ok((status, _)) => json!({"error": format!("HTTP {status}")}),
        Err(e) => json!({"error": format!("{e:#}")}),
    };
    json!({
        "address": address(node),
        "healthz": fetch("/healthz").await,
        "readyz": fetch("/readyz").await,
        "metrics": metrics,
    })
}

/// One line for `status`: `healthz 200 readyz 200 (ready) peers 2 …`.
pub fn line(report: &Value) -> String {
    let probe = |p: &Value| match p["status"].as_u64() {
        Some(200) => "200".to_owned(),
        Some(s) => format!("{s} ({})", p["body"].as_str().unwrap_or("")),
        None => format!("unreachable ({})", p["error"].as_str().unwrap_or("?")),
    };
    let mut out = format!(
        "http://{}: healthz {}, readyz {}",
        report["address"].as_str().unwrap_or("?"),
        probe(&report["healthz"]),
        probe(&report["readyz"])
    );
    if let Some(metrics) = report["metrics"].as_object() {
        for m in KEY_METRICS {
            if let Some(v) = metrics.get(m).and_then(Value::as_f64) {
                let name = m.replace("{state=\"established\"}", "_established");
                out.push_str(&format!(", {name} {v}"));
            }
        }
    }
    out
}
