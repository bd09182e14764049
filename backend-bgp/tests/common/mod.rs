//! What the BGP tests share: nodes on one switch, each a network namespace, and a speaker
//! driven through the crate's API in each (needs root; skips loudly).
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use backend_bgp::{Bgp, Config};
use cni_core::registry::NodeRecord;
use cni_core::routing::{CrossNodeRouting, LocalNode};
use testkit::{Namespaces, Segment, ip_json};

/// Whether the test can run here; says loudly why not.
pub fn root(what: &str) -> bool {
    testkit::root(what)
}

/// A switch namespace (`br0`) and the nodes plugged into it.
pub struct Net {
    pub namespaces: Namespaces,
    segment: Segment,
}

impl Net {
    /// Namespaces named `cnkt-TAG-PID-…`, a switch among them.
    pub fn new(tag: &str) -> Self {
        let namespaces = Namespaces::new(tag);
        let segment = Segment::new(&namespaces, "sw");
        Net {
            namespaces,
            segment,
        }
    }

    /// A node namespace with `eth0` (`cidr`) on the switch and `lo` up.
    pub fn node(&self, suffix: &str, cidr: &str) -> String {
        let ns = self.namespaces.add(suffix);
        self.segment.plug(&ns, "eth0", cidr);
        ns
    }
}

/// The `LocalNode` of a node with `eth0` at `cidr` owning `blocks`.
pub fn local(name: &str, cidr: &str, blocks: &[&str]) -> LocalNode {
    let net: ipnet::IpNet = cidr.parse().expect("cidr");
    LocalNode {
        name: name.into(),
        address: net.addr(),
        prefix_len: net.prefix_len(),
        interface: "eth0".into(),
        underlay_mtu: 1500,
        blocks: blocks.iter().map(|b| b.parse().expect("block")).collect(),
        tunnel_address: None,
    }
}

/// The registry record of a peer: only its name and address matter to BGP.
pub fn record(name: &str, address: &str) -> NodeRecord {
    NodeRecord {
        name: name.into(),
        address: address.parse().expect("address"),
        prefix_len: 24,
        blocks: vec![],
        backend: Default::default(),
    }
}

/// Short timers for tests: hold 9 s, connect retry 1 s, on `port`.
pub fn config(port: u16) -> Config {
    Config {
        port,
        hold_time: 9,
        connect_retry: 1,
        ..Config::default()
    }
}

/// A speaker in `ns`, initialised with `local`.
pub async fn speaker(ns: &str, config: Config, local: &LocalNode) -> Bgp {
    let mut bgp = Bgp::open(config, &testkit::netns_path(ns))
        .await
        .expect("open the bgp mode");
    bgp.init(local).await.expect("init");
    bgp
}

/// `(destination, gateway)` of the routes in `ns` with protocol `proto` (`107` for
/// cnikit's, `bird` for bird's).
pub fn routes(ns: &str, proto: &str) -> Vec<(String, String)> {
    let mut list: Vec<(String, String)> = ip_json(ns, &["route", "show", "proto", proto])
        .iter()
        .map(|r| {
            (
                r["dst"].as_str().unwrap_or_default().to_owned(),
                r["gateway"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    list.sort();
    list
}

/// Routes of `ns` with `proto`, polled until `want(routes)` holds; panics with what was
/// there after `within`.
pub async fn wait_routes(
    ns: &str,
    proto: &str,
    within: Duration,
    want: impl Fn(&[(String, String)]) -> bool,
) -> Vec<(String, String)> {
    let deadline = Instant::now() + within;
    loop {
        let now = routes(ns, proto);
        if want(&now) {
            return now;
        }
        if Instant::now() > deadline {
            panic!("{ns}: routes (proto {proto}) never matched; last seen {now:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `within`.
pub async fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the speaker's session to `peer` is Established.
pub fn established(bgp: &Bgp, peer: &str) -> bool {
    bgp.summary()
        .iter()
        .any(|p| p.name == peer && p.state == "established")
}

/// `(dst, gateway)` pair, for asserting.
pub fn r(dst: &str, via: &str) -> (String, String) {
    (dst.to_owned(), via.to_owned())
}

/// The IPv4 address of a CIDR string.
pub fn addr(cidr: &str) -> Ipv4Addr {
    match cidr.parse::<ipnet::IpNet>().expect("cidr").addr() {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => panic!("IPv4 expected"),
    }
}

/// A child process (a BGP daemon in a test namespace), killed by PID when dropped.
pub struct Daemon {
    pub child: std::process::Child,
    pub name: &'static str,
}

impl Daemon {
    /// Runs `args` inside `ns` (`ip netns exec` execs it, so the PID is the daemon's).
    pub fn spawn(name: &'static str, ns: &str, args: &[&str], log: &std::path::Path) -> Self {
        let out = std::fs::File::create(log).expect("log file");
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Daemon { child, name }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
