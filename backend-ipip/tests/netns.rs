//! IPIP against the real kernel, in private namespaces (needs root and a kernel with ipip:
//! each test runs in the test VM when this one has none; skips loudly without root).
//!
//! Three nodes: `a` and `b` on one underlay switch, `c` on a second one behind a router.
//! Each has a pod plugged in by cni-core's bridge pod network with the MTU the backend
//! leaves; the backend programs each node's namespace; tcpdump on the first switch shows
//! what the underlay carries.

#[path = "../../backend-hostgw/tests/lab/mod.rs"]
mod lab;

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use backend_ipip::{Config, DEFAULT_DEVICE as DEV, Ipip, Mode};
use cni_core::linux::NetNs;
use cni_core::registry::NodeRecord;
use cni_core::routing::CrossNodeRouting;
use lab::{Lab, NodeSpec, cnikit_routes, ping, ping_once};
use serde_json::Value;
use testkit::ip_json;

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Whether the test can run here or in the VM; says loudly why not.
fn runs(test: &str) -> bool {
    if !lab::root(test) {
        return false;
    }
    if !testkit::on_path("tcpdump") {
        testkit::skip(test, "needs tcpdump (Debian tcpdump, scripts/deps.sh)");
        return false;
    }
    testkit::vm::here_or_in_vm(test, "ipip")
}

/// A tcpdump on one interface of one namespace, listening once `start` returns.
struct Capture {
    child: Child,
    lines: Option<JoinHandle<Vec<String>>>,
}

impl Capture {
    /// Captures the first `count` packets `filter` matches on `iface` in `ns`.
    fn start(ns: &str, iface: &str, filter: &str, count: usize) -> Self {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "tcpdump", "-i", iface, "-nn", "-l"])
            .args(["-c", &count.to_string(), filter])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tcpdump");
        let mut said = Vec::new();
        let stderr = BufReader::new(child.stderr.take().expect("stderr"));
        // tcpdump says "listening on" once its socket is open and filtered.
        for line in stderr.lines() {
            let line = line.expect("read tcpdump's stderr");
            let listening = line.contains("listening on");
            said.push(line);
            if listening {
                break;
            }
        }
        assert!(
            said.last().is_some_and(|l| l.contains("listening on")),
            "tcpdump did not start: {said:?}"
        );
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let lines = std::thread::spawn(move || stdout.lines().map_while(Result::ok).collect());
        Capture {
            child,
            lines: Some(lines),
        }
    }

    /// The packets, one line each without its timestamp, cut before `, id` (ICMP ids
    /// differ from run to run): once tcpdump has its `count`, or after 10 seconds with
    /// what it has.
    fn packets(mut self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().expect("tcpdump status").is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.wait();
        let lines = self.lines.take().expect("once").join().expect("reader");
        lines
            .iter()
            .map(|l| {
                let l = l.split_once(' ').map_or(l.as_str(), |(_, rest)| rest);
                l.split(", id").next().unwrap_or(l).to_owned()
            })
            .collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // Ours, by its handle; already reaped when `packets` ran.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What the underlay switch `switch` carries while pod `from` pings `to` once: the echo
/// request and reply, as tcpdump prints them (IPIP and plain ICMP both match).
fn on_the_wire(switch: &str, from: &str, to: IpAddr) -> Vec<String> {
    let capture = Capture::start(switch, "br0", "ip proto 4 or icmp", 2);
    assert!(ping_once(from, to, &[]), "{from} -> {to}");
    capture.packets()
}

/// One ping's success and what ping printed (`-M do -s SIZE`…).
fn ping_output(ns: &str, dst: IpAddr, extra: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-c1", "-W1"])
        .args(extra)
        .arg(dst.to_string())
        .output()
        .expect("run ping");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

struct Cluster {
    switch: String,
    specs: Vec<NodeSpec>,
    pods: Vec<String>,
    backends: Vec<Ipip>,
    records: Vec<NodeRecord>,
    _lab: Lab,
}

/// Nodes `a`, `b` (192.168.71.0/24) and `c` (192.168.72.0/24, behind a router), each with a
/// pod `10.244.N.2` in block `10.244.N.0/24` (pod MTU = underlay MTU − overhead), their
/// backends in `mode` initialized and reconciled.
async fn cluster(tag: &str, mode: Mode) -> Cluster {
    let lab = Lab::new(tag);
    let (s1, s2) = (lab.switch("s1"), lab.switch("s2"));
    lab.router("r", &[(&s1, "192.168.71.1/24"), (&s2, "192.168.72.1/24")]);
    let config = Config {
        mode,
        ..Config::default()
    };
    let nodes = [
        ("a", s1.as_str(), "192.168.71.11/24", Some("192.168.71.1")),
        ("b", s1.as_str(), "192.168.71.12/24", Some("192.168.71.1")),
        ("c", s2.as_str(), "192.168.72.13/24", Some("192.168.72.1")),
    ];
    let (specs, pods, mut backends, records) = lab::cluster(&lab, &nodes, |ns| {
        Ipip::new(config.clone(), ns).expect("config")
    })
    .await;
    for backend in &mut backends {
        let report = backend.reconcile(&records).await.expect("reconcile");
        assert_eq!(report.writes, 2, "{report:?}");
        assert_eq!(report.routed, 2);
        assert!(report.unroutable.is_empty());
    }
    Cluster {
        switch: s1,
        specs,
        pods,
        backends,
        records,
        _lab: lab,
    }
}

fn route(block: &str, via: &str, dev: &str) -> (String, String, String) {
    (block.into(), via.into(), dev.into())
}

/// Every pod reaches every other pod, and node `a` (from its tunnel address, when the
/// route is through the tunnel) reaches the pods of `b` and `c`.
fn all_reach(c: &Cluster) {
    let pod_ip = |n: usize| addr(&format!("10.244.{n}.2"));
    for (i, from) in c.pods.iter().enumerate() {
        for n in (1..=3).filter(|n| *n != i + 1) {
            assert!(ping(from, pod_ip(n)), "pod {} -> pod {n}", i + 1);
        }
    }
    assert!(ping(&c.specs[0].ns, pod_ip(2)), "node a -> pod b");
    assert!(ping(&c.specs[0].ns, pod_ip(3)), "node a -> pod c");
}

async fn teardown(mut c: Cluster) {
    for backend in &mut c.backends {
        backend.teardown().await.expect("teardown");
        backend.teardown().await.expect("teardown again");
    }
    for spec in &c.specs {
        let links = ip_json(&spec.ns, &["link", "show"]);
        assert!(links.iter().all(|l| l["ifname"] != DEV));
        assert!(cnikit_routes(&spec.ns).is_empty());
    }
    assert!(
        !ping_once(&c.pods[0], addr("10.244.3.2"), &[]),
        "torn down: pod a no longer reaches pod c"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_encapsulates_for_every_peer() {
    const NAME: &str = "always_encapsulates_for_every_peer";
    if !runs(NAME) {
        return;
    }
    let c = cluster("ipa", Mode::Always).await;
    let a = &c.specs[0].ns;

    // The device as `ip -d` shows it.
    let dev = &ip_json(a, &["-d", "link", "show", "dev", DEV])[0];
    let info = &dev["linkinfo"]["info_data"];
    assert_eq!(dev["linkinfo"]["info_kind"], "ipip");
    assert_eq!(info["local"], "192.168.71.11");
    assert_eq!(info["remote"], "any");
    assert_eq!(info["link"], "eth0");
    assert_eq!(info["ttl"], 0);
    assert_eq!(info["pmtudisc"], true);
    assert_eq!(dev["mtu"], 1480);
    assert!(
        dev["flags"]
            .as_array()
            .unwrap()
            .contains(&Value::from("UP"))
    );
    let addrs = ip_json(a, &["-4", "addr", "show", "dev", DEV]);
    assert_eq!(addrs[0]["addr_info"][0]["local"], "10.244.1.0");
    assert_eq!(addrs[0]["addr_info"][0]["prefixlen"], 32);

    // Every peer through the tunnel, the one on a's own subnet too.
    assert_eq!(
        cnikit_routes(a),
        vec![
            route("10.244.2.0/24", "192.168.71.12", DEV),
            route("10.244.3.0/24", "192.168.72.13", DEV),
        ]
    );
    let onlink = ip_json(a, &["route", "show", "10.244.2.0/24"]);
    assert!(
        onlink[0]["flags"]
            .as_array()
            .is_some_and(|f| f.contains(&Value::from("onlink"))),
        "{onlink:?}"
    );
    all_reach(&c);

    // On the underlay, pod a's ping to pod b (same subnet) is IP protocol 4: an outer
    // header between the nodes around the pods' packet.
    assert_eq!(
        on_the_wire(&c.switch, &c.pods[0], addr("10.244.2.2")),
        vec![
            "IP 192.168.71.11 > 192.168.71.12: IP 10.244.1.2 > 10.244.2.2: ICMP echo request",
            "IP 192.168.71.12 > 192.168.71.11: IP 10.244.2.2 > 10.244.1.2: ICMP echo reply",
        ]
    );
    // And to pod c, through the router.
    assert_eq!(
        on_the_wire(&c.switch, &c.pods[0], addr("10.244.3.2")),
        vec![
            "IP 192.168.71.11 > 192.168.72.13: IP 10.244.1.2 > 10.244.3.2: ICMP echo request",
            "IP 192.168.72.13 > 192.168.71.11: IP 10.244.3.2 > 10.244.1.2: ICMP echo reply",
        ]
    );

    // The largest don't-fragment packet the pod MTU (1480) allows crosses the tunnel;
    // one byte more is refused in the pod itself, not lost on the wire.
    for (to, what) in [("10.244.2.2", "same subnet"), ("10.244.3.2", "routed")] {
        let (ok, out) = ping_output(&c.pods[0], addr(to), &["-M", "do", "-s", "1452"]);
        assert!(ok, "1480-byte DF packet to {to} ({what}): {out}");
        let (ok, out) = ping_output(&c.pods[0], addr(to), &["-M", "do", "-s", "1453"]);
        assert!(!ok, "1481-byte DF packet to {to} went through: {out}");
        assert!(out.contains("message too long"), "{out}");
    }

    // A restarted agent adopts the device as it is: same index, no writes.
    let index = ip_json(a, &["link", "show", "dev", DEV])[0]["ifindex"].clone();
    let mut restarted = Ipip::new(Config::default(), NetNs::named(a).await.unwrap()).unwrap();
    restarted.init(&c.specs[0].local).await.unwrap();
    assert_eq!(
        ip_json(a, &["link", "show", "dev", DEV])[0]["ifindex"],
        index
    );
    assert_eq!(restarted.reconcile(&c.records).await.unwrap().writes, 0);

    teardown(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_subnet_encapsulates_only_across_the_router() {
    const NAME: &str = "cross_subnet_encapsulates_only_across_the_router";
    if !runs(NAME) {
        return;
    }
    let mut c = cluster("ipx", Mode::CrossSubnet).await;
    let a = &c.specs[0].ns;

    // b shares a's subnet: a plain route through eth0; c is behind the router: the tunnel.
    assert_eq!(
        cnikit_routes(a),
        vec![
            route("10.244.2.0/24", "192.168.71.12", "eth0"),
            route("10.244.3.0/24", "192.168.72.13", DEV),
        ]
    );
    // c is alone on its subnet: both peers through the tunnel.
    assert_eq!(
        cnikit_routes(&c.specs[2].ns),
        vec![
            route("10.244.1.0/24", "192.168.71.11", DEV),
            route("10.244.2.0/24", "192.168.71.12", DEV),
        ]
    );
    all_reach(&c);

    // On the underlay: a to b is plain IPv4, a to c is IPIP.
    assert_eq!(
        on_the_wire(&c.switch, &c.pods[0], addr("10.244.2.2")),
        vec![
            "IP 10.244.1.2 > 10.244.2.2: ICMP echo request",
            "IP 10.244.2.2 > 10.244.1.2: ICMP echo reply",
        ]
    );
    assert_eq!(
        on_the_wire(&c.switch, &c.pods[0], addr("10.244.3.2")),
        vec![
            "IP 192.168.71.11 > 192.168.72.13: IP 10.244.1.2 > 10.244.3.2: ICMP echo request",
            "IP 192.168.72.13 > 192.168.71.11: IP 10.244.3.2 > 10.244.1.2: ICMP echo reply",
        ]
    );
    // The pod MTU is one for every peer: the largest DF packet passes both ways too.
    for to in ["10.244.2.2", "10.244.3.2"] {
        let (ok, out) = ping_output(&c.pods[0], addr(to), &["-M", "do", "-s", "1452"]);
        assert!(ok, "1480-byte DF packet to {to}: {out}");
    }

    // c leaves a's desired set: exactly its route goes.
    let report = c.backends[0].reconcile(&c.records[..2]).await.unwrap();
    assert_eq!(report.writes, 1);
    assert_eq!(
        cnikit_routes(&c.specs[0].ns),
        vec![route("10.244.2.0/24", "192.168.71.12", "eth0")]
    );
    assert!(
        !ping_once(&c.pods[0], addr("10.244.3.2"), &[]),
        "c is no longer routed"
    );
    assert_eq!(c.backends[0].reconcile(&c.records).await.unwrap().writes, 1);
    assert!(ping(&c.pods[0], addr("10.244.3.2")), "pod a -> pod c again");

    teardown(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_device_replaces_the_old_one() {
    const NAME: &str = "a_renamed_device_replaces_the_old_one";
    if !runs(NAME) {
        return;
    }
    let c = cluster("ipn", Mode::Always).await;
    let a = &c.specs[0].ns;

    // The agent of a restarts with another device name: same local address and underlay,
    // which the kernel refuses for a second IPIP device.
    const NEW: &str = "cnikit.ip2";
    let config = Config {
        device: NEW.into(),
        ..Config::default()
    };
    let mut renamed = Ipip::new(config, NetNs::named(a).await.unwrap()).unwrap();
    renamed
        .init(&c.specs[0].local)
        .await
        .expect("init under the new name");
    let names: Vec<_> = ip_json(a, &["link", "show"])
        .iter()
        .map(|l| l["ifname"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(names.iter().any(|n| n == NEW), "{names:?}");
    assert!(names.iter().all(|n| n != DEV), "old device left: {names:?}");
    renamed.reconcile(&c.records).await.expect("reconcile");
    assert_eq!(
        cnikit_routes(a),
        vec![
            route("10.244.2.0/24", "192.168.71.12", NEW),
            route("10.244.3.0/24", "192.168.72.13", NEW),
        ]
    );
    all_reach(&c);
    renamed.teardown().await.expect("teardown");
    teardown(c).await;
}
