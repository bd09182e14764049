//! The `cnikit-agent` binary's `/healthz`, `/readyz` and `/metrics`, scraped with `curl`
//! inside the node's namespace, in every routing mode that runs outside the VM (host-gw,
//! vxlan, bgp with both engines): two nodes on one switch, sharing a file store.
//!
//! A node alone is alive and ready, knows no peer and has programmed nothing; once the
//! second node's agent starts, its peers, routed peers and programmed routes go up (and
//! neighbour and FDB entries for vxlan, an Established session for bgp); once that agent
//! stops, they go back down. The node's block and its addresses in use (the VXLAN VTEP's
//! address) are there throughout.
//!
//! Needs root, `curl`, the example binary (`cargo build -p cnikit --example
//! cnikit-agent`) and, for the bird engine, BIRD 2; skips loudly otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testkit::{AgentProcess, Namespaces, Segment};

const WAIT: Duration = Duration::from_secs(30);
const METRICS: &str = "127.0.0.1:9153";

/// `GET path` on the agent's endpoints with `curl` inside `ns`: (status, body); status 0
/// when nothing answers.
fn get(ns: &str, path: &str) -> (u16, String) {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "curl",
            "-s",
            "-m",
            "5",
            "-w",
            "\n%{http_code}",
        ])
        .arg(format!("http://{METRICS}{path}"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// The value of the sample `name` (a whole line `name value`; labels included in `name`).
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Waits until `ns`'s metrics have every `(sample, value)` of `want`; the last page.
fn until_metrics(ns: &str, what: &str, want: &[(&str, f64)]) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, page) = get(ns, "/metrics");
        if status == 200 && want.iter().all(|(n, v)| sample(&page, n) == Some(*v)) {
            return page;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {want:?} in\n{page}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn conflist(node: &str, data: &Path, store: &Path, mode: &str, keys: &Value) -> Value {
    let mut entry = json!({
        "type": "cnikit",
        "nodeName": node,
        "dataDir": data,
        "routing": mode,
        "agent": {
            "interface": "eth0", "ttlSeconds": 5, "resyncSeconds": 1,
            "metricsAddress": METRICS,
        },
        "ipam": {
            "type": "cnikit-ipam",
            "pool": "10.252.0.0/16",
            "blockSize": 26,
            "store": {"type": "file", "path": store},
        },
    });
    if let (Some(entry), Some(keys)) = (entry.as_object_mut(), keys.as_object()) {
        entry.extend(keys.clone());
    }
    json!({"cniVersion": "1.1.0", "name": "metricsnet", "plugins": [entry]})
}

fn agent_binary(test: &str) -> Option<PathBuf> {
    if !testkit::root(test) {
        return None;
    }
    if !testkit::on_path("curl") {
        testkit::skip(test, "curl is not installed (scripts/deps.sh installs it)");
        return None;
    }
    testkit::agent_binary(test, "cargo build -p cnikit --example cnikit-agent")
}

/// What a second node adds to the first node's metrics in a mode, besides a peer and a
/// route.
struct Expect {
    neighbours: f64,
    fdb: f64,
    /// An Established BGP session.
    session: bool,
    /// Addresses in use on a node: its tunnel address, if the mode needs one.
    addresses: f64,
}

fn a_joining_node_shows_in_the_metrics(
    test: &str,
    tag: &str,
    subnet: u8,
    mode: &str,
    keys: Value,
    expect: Expect,
) {
    let Some(bin) = agent_binary(test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let namespaces = Namespaces::new(tag);
    let segment = Segment::new(&namespaces, "sw");
    let store = dir.path().join("store");
    let mut nodes = Vec::new();
    for (i, name) in ["n1", "n2"].into_iter().enumerate() {
        let ns = namespaces.add(name);
        segment.plug(&ns, "eth0", &format!("192.168.{subnet}.{}/24", 11 + i));
        testkit::ip(&ns, &["link", "set", "lo", "up"]);
        let list = dir.path().join(format!("{name}.conflist"));
        let data = dir.path().join(name);
        std::fs::write(
            &list,
            conflist(name, &data, &store, mode, &keys).to_string(),
        )
        .unwrap();
        nodes.push((ns, list, dir.path().join(format!("{name}.log"))));
    }
    let ns1 = &nodes[0].0;
    let mut n1 = AgentProcess::start(&bin, ns1, &nodes[0].1, &nodes[0].2);

    // Alone: alive, ready once registered and reconciled, nothing for peers.
    let deadline = Instant::now() + WAIT;
    while get(ns1, "/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "n1 never ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(get(ns1, "/healthz"), (200, "ok\n".to_owned()));
    let alone = until_metrics(
        ns1,
        "n1 alone",
        &[
            ("cnikit_agent_peers", 0.0),
            ("cnikit_agent_programmed_routes", 0.0),
            ("cnikit_agent_blocks", 1.0),
            ("cnikit_agent_addresses_in_use", expect.addresses),
        ],
    );
    let reconciles = sample(&alone, "cnikit_agent_reconciles_total").expect(&alone);
    assert!(reconciles >= 1.0, "{alone}");
    assert_eq!(
        sample(&alone, "cnikit_agent_reconcile_duration_seconds_count"),
        Some(reconciles),
        "every reconcile is timed\n{alone}"
    );
    let established = "cnikit_agent_bgp_sessions{state=\"established\"}";
    if expect.session {
        assert_eq!(sample(&alone, established), Some(0.0), "{alone}");
    } else {
        assert!(!alone.contains("cnikit_agent_bgp_sessions{"), "{alone}");
    }

    // n2 joins: a peer, routed, with its route (and entries, and session).
    let mut n2 = AgentProcess::start(&bin, &nodes[1].0, &nodes[1].1, &nodes[1].2);
    let mut want = vec![
        ("cnikit_agent_peers", 1.0),
        ("cnikit_agent_routed_peers", 1.0),
        ("cnikit_agent_unroutable_peers", 0.0),
        ("cnikit_agent_programmed_routes", 1.0),
        ("cnikit_agent_programmed_neighbours", expect.neighbours),
        ("cnikit_agent_programmed_fdb_entries", expect.fdb),
    ];
    if expect.session {
        want.push((established, 1.0));
    }
    let joined = until_metrics(ns1, "n2 in n1's metrics", &want);
    let more = sample(&joined, "cnikit_agent_reconciles_total").expect(&joined);
    assert!(more > reconciles, "reconciles {reconciles} -> {more}");
    until_metrics(&nodes[1].0, "n1 in n2's metrics", &want);

    // n2 leaves: back to nothing.
    assert!(n2.stop(), "n2's agent exits cleanly");
    let mut want = vec![
        ("cnikit_agent_peers", 0.0),
        ("cnikit_agent_programmed_routes", 0.0),
        ("cnikit_agent_programmed_neighbours", 0.0),
        ("cnikit_agent_programmed_fdb_entries", 0.0),
    ];
    if expect.session {
        want.push((established, 0.0));
    }
    until_metrics(ns1, "n2 gone from n1's metrics", &want);
    assert_eq!(get(ns1, "/readyz").0, 200);
    assert!(n1.stop(), "n1's agent exits cleanly");
    assert_eq!(
        get(ns1, "/healthz").0,
        0,
        "nothing serves once the agent is gone"
    );
}

#[test]
fn host_gw_metrics_follow_a_joining_node() {
    a_joining_node_shows_in_the_metrics(
        "host_gw_metrics_follow_a_joining_node",
        "mhgw",
        81,
        "host-gw",
        json!({}),
        Expect {
            neighbours: 0.0,
            fdb: 0.0,
            session: false,
            addresses: 0.0,
        },
    );
}

#[test]
fn vxlan_metrics_follow_a_joining_node() {
    a_joining_node_shows_in_the_metrics(
        "vxlan_metrics_follow_a_joining_node",
        "mvxl",
        82,
        "vxlan",
        json!({"vxlan": {"vni": 7}}),
        Expect {
            neighbours: 1.0,
            fdb: 1.0,
            session: false,
            addresses: 1.0,
        },
    );
}

#[test]
fn bgp_metrics_follow_a_joining_node() {
    a_joining_node_shows_in_the_metrics(
        "bgp_metrics_follow_a_joining_node",
        "mbgp",
        83,
        "bgp",
        json!({"bgp": {"port": 10180, "holdTime": 9, "connectRetry": 1}}),
        Expect {
            neighbours: 0.0,
            fdb: 0.0,
            session: true,
            addresses: 0.0,
        },
    );
}

#[test]
fn bird_metrics_follow_a_joining_node() {
    let test = "bird_metrics_follow_a_joining_node";
    if !testkit::on_path("bird") || !testkit::on_path("birdc") {
        testkit::skip(
            test,
            "BIRD 2 is not installed (scripts/deps.sh installs bird2)",
        );
        return;
    }
    a_joining_node_shows_in_the_metrics(
        test,
        "mbird",
        84,
        "bgp",
        json!({"bgp": {"engine": "bird", "port": 10181, "holdTime": 9, "connectRetry": 1}}),
        Expect {
            neighbours: 0.0,
            fdb: 0.0,
            session: true,
            addresses: 0.0,
        },
    );
}
