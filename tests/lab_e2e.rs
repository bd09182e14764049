//! End-to-end tests of the lab: the `lab` example binary driven as a user drives it (`up`,
//! `check --json`, `status --json`, `show`, `node-del`, `node-add`, `down`), with the real
//! `cnikit` plugin and `cnikit-agent` binaries it runs. Each test has its own lab name (so
//! its own namespaces `cnkl-<name>-…` and state dir) and runs `down` from a guard, also when
//! it fails.
//!
//! Needs root and the example binaries in `<target>/debug/examples` (build them with
//! `cargo build -p cnikit --examples --all-features`: `cargo test` builds the lab only as a
//! test harness); skips loudly otherwise. The ipip tests run in the test VM
//! (`testkit::vm::here_or_in_vm`) when this kernel has no ipip module loaded: there the
//! same test binary drives the lab binaries read from the host's filesystem. The etcd test needs the `etcd` binary (Debian
//! `etcd-server`); the Kubernetes store tests also kube-apiserver (`scripts/kube-apiserver.sh`)
//! and `kubectl`. With `CNIKIT_REQUIRE_ALL=1` (set by `scripts/test.sh`) a skip fails.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use testkit::{bridge_json, ip_json};

/// Where the lab keeps its state (the lab's `STATE_ROOT`).
const STATE_ROOT: &str = "/run/cnikit-lab";

/// The lab binary, or `None` after a loud `SKIPPED` line.
fn lab_binary(test: &str) -> Option<PathBuf> {
    if !testkit::root(test) {
        return None;
    }
    let examples = testkit::examples_dir();
    let lab = examples.join("lab");
    for bin in ["lab", "cnikit", "cnikit-agent"] {
        if !examples.join(bin).is_file() {
            testkit::skip(
                test,
                format_args!(
                    "{} is not built (run `cargo build -p cnikit --examples --all-features` \
                     first; `cargo test` builds the lab only as a test)",
                    examples.join(bin).display()
                ),
            );
            return None;
        }
    }
    for bin in ["lab", "cnikit", "cnikit-agent"] {
        testkit::assert_fresh(&examples.join(bin));
    }
    Some(lab)
}

/// A lab of one test: `down` when dropped.
struct Lab {
    bin: PathBuf,
    name: String,
    down: bool,
}

impl Lab {
    /// A lab named `<tag><pid>`.
    fn new(bin: PathBuf, tag: &str) -> Lab {
        Lab {
            bin,
            name: format!("{tag}{}", std::process::id()),
            down: false,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("--name")
            .arg(&self.name)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run the lab binary")
    }

    /// Runs `lab ARGS`, panics unless it succeeds; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let started = Instant::now();
        let out = self.run(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "lab --name {} {} failed ({}):\n{stdout}\n{stderr}",
            self.name,
            args.join(" "),
            out.status
        );
        eprintln!(
            "lab {} {} took {} ms",
            self.name,
            args.join(" "),
            started.elapsed().as_millis()
        );
        stdout
    }

    fn status(&self) -> Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status JSON")
    }

    /// `check --json` and whether it exited 0.
    fn check(&self) -> (Value, bool) {
        let out = self.run(&["check", "--json"]);
        let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "check --json printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (report, out.status.success())
    }

    /// `down`, then checks that nothing is left: no namespace, no agent, etcd or API server process,
    /// no state directory (which holds the file store).
    fn down_and_verify(&mut self) {
        let status = self.status();
        let pids: Vec<i64> = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["agentPid"].as_i64())
            .chain(status["etcd"]["pid"].as_i64())
            .chain(status["kubeApiserver"]["pid"].as_i64())
            .chain(status["tor"]["pid"].as_i64())
            .collect();
        let out = self.ok(&["down"]);
        self.down = true;
        println!("{out}");
        assert!(!out.contains("UNEXPECTED"), "down found leftovers: {out}");
        assert!(
            out.contains("the store is empty") || out.contains("the store holds"),
            "down read the store: {out}"
        );
        assert!(
            namespaces(&self.name).is_empty(),
            "namespaces left: {:?}",
            namespaces(&self.name)
        );
        for pid in pids {
            assert!(
                !runs_for_lab(pid, &self.name),
                "process {pid} of the lab still runs"
            );
        }
        let dir = Path::new(STATE_ROOT).join(&self.name);
        assert!(!dir.exists(), "{} is left", dir.display());
        let again = self.ok(&["down"]);
        assert!(again.contains("nothing to remove"), "second down: {again}");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.down {
            let out = self.run(&["down"]);
            eprintln!(
                "cleanup: lab {} down: {}{}",
                self.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The namespaces of lab `name`.
fn namespaces(name: &str) -> Vec<String> {
    let prefix = format!("cnkl-{name}-");
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// Whether `pid` runs (not a zombie) with the lab's state dir in its command line.
fn runs_for_lab(pid: i64, name: &str) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rfind(')')
        .and_then(|i| stat.get(i + 2..i + 3))
        .is_some_and(|s| s == "Z");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    !zombie && String::from_utf8_lossy(&cmdline).contains(&format!("{STATE_ROOT}/{name}/"))
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

fn node<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no node {name} in {status}"))
}

/// What the agents wrote about one node, to look for on the others.
struct Peer {
    address: String,
    blocks: Vec<String>,
    vtep: Option<(String, String)>,
}

impl Peer {
    fn of(status: &Value, name: &str) -> Peer {
        let n = node(status, name);
        let ns = n["ns"].as_str().unwrap();
        let vtep = ip_json(ns, &["addr", "show"])
            .into_iter()
            .find(|l| l["ifname"] == "cnikit.vxlan")
            .map(|l| {
                let ip = l["addr_info"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|a| a["family"] == "inet")
                    .expect("VTEP address")["local"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                (ip, l["address"].as_str().unwrap().to_lowercase())
            });
        Peer {
            address: n["address"].as_str().unwrap().to_owned(),
            blocks: n["nodeState"]["blocks"]
                .as_array()
                .expect("node state with blocks")
                .iter()
                .map(|b| b.as_str().unwrap().to_owned())
                .collect(),
            vtep,
        }
    }

    /// The routes, neighbour and FDB entries in `ns` that lead to this peer (the kernel's
    /// own ARP entry for its underlay address aside: no agent writes it).
    fn traces_in(&self, ns: &str) -> Vec<String> {
        let mut found = Vec::new();
        let vtep_ip = self.vtep.as_ref().map(|v| v.0.as_str());
        let vtep_mac = self.vtep.as_ref().map(|v| v.1.as_str());
        for r in ip_json(ns, &["route", "show"]) {
            let dst = r["dst"].as_str().unwrap_or("");
            let gw = r["gateway"].as_str();
            if (self.blocks.iter().any(|b| b == dst) && r["type"] != "blackhole")
                || gw == Some(self.address.as_str())
                || (gw.is_some() && gw == vtep_ip)
            {
                found.push(format!("route {r}"));
            }
        }
        for n in ip_json(ns, &["neigh", "show"]) {
            let lladdr = n["lladdr"].as_str().map(str::to_lowercase);
            if (vtep_ip.is_some() && n["dst"].as_str() == vtep_ip)
                || (vtep_mac.is_some() && lladdr.as_deref() == vtep_mac)
            {
                found.push(format!("neigh {n}"));
            }
        }
        for f in bridge_json(ns, &["fdb", "show"]) {
            let mac = f["mac"].as_str().map(str::to_lowercase);
            if f["dst"].as_str() == Some(self.address.as_str())
                || (vtep_mac.is_some() && mac.as_deref() == vtep_mac)
            {
                found.push(format!("fdb {f}"));
            }
        }
        found
    }
}

/// Asserts every probe of a `check` report of `kind` answered.
fn assert_all_ok(report: &Value, kind: &str) -> usize {
    let probes = report[kind].as_array().expect("probes");
    let failed: Vec<String> = probes
        .iter()
        .filter(|p| p["ok"] != true)
        .map(|p| format!("{} -> {} ({})", p["from"], p["to"], p["ip"]))
        .collect();
    assert!(failed.is_empty(), "{kind}: failed {failed:?}");
    probes.len()
}

/// The whole life of a 3-node lab in one mode: up, every pair pings, pods reach nodes, a
/// node leaves (its entries disappear from the others), a node joins (its pods are
/// reachable), down leaves nothing.
fn lifecycle(test: &str, tag: &str, mode: &str) {
    lifecycle_with(test, tag, mode, &[]);
}

/// [`lifecycle`] with more `up` arguments (`--bgp-engine bird`).
fn lifecycle_with(test: &str, tag: &str, mode: &str, extra: &[&str]) {
    let Some(bin) = lab_binary(test) else {
        return;
    };
    let bird = extra.contains(&"bird");
    // The protocol of the routes the mode installs: BIRD writes its own.
    let proto = if bird { "bird" } else { "107" };
    let mut lab = Lab::new(bin, tag);
    // Resync and TTL far longer than the wait below: entries that disappear in time were
    // removed by the watch event of the deregistration, not by a resync or an expiry.
    let mut up = vec![
        "up", "--mode", mode, "--nodes", "3", "--pods", "2", "--ttl", "60", "--resync", "60",
    ];
    up.extend(extra);
    lab.ok(&up);
    let kube = extra.contains(&"kubernetes").then(|| Kubectl::of(&lab));
    if let Some(kube) = &kube {
        kube.assert_registry(&["node1", "node2", "node3"]);
        kube.assert_node_rights();
    }

    let (report, ok) = lab.check();
    assert_eq!(assert_all_ok(&report, "podToPod"), 30, "3 nodes x 2 pods");
    assert_eq!(assert_all_ok(&report, "nodeToPod"), 18);
    assert_eq!(
        assert_all_ok(&report, "podToNode"),
        18,
        "pods reach every node"
    );
    assert!(ok, "check exits 0 when every probe answers");
    println!("{mode}: 30/30 pod pairs, 18/18 node->pod, 18/18 pod->node");

    // The node state's BGP report follows the sessions within a poll of the agent (1 s),
    // so it can lag the routes the probes above used: `show` reads it once it has caught up.
    let bgp_status = (mode == "bgp").then(|| assert_bgp_sessions(&lab, 2));
    let show = lab.ok(&["show"]);
    for needle in [
        "blackhole",
        &format!("proto {proto}"),
        "underlay NIC",
        "-> ",
    ] {
        assert!(show.contains(needle), "show lacks {needle:?}:\n{show}");
    }
    if mode != "ebpf" {
        assert!(
            show.contains("pod bridge"),
            "show lacks the pod bridge:\n{show}"
        );
    }
    #[cfg(feature = "ebpf")]
    let programs = if mode == "ebpf" {
        ebpf::assert_show(&show)
    } else {
        Vec::new()
    };
    if mode == "vxlan" {
        for needle in [
            "VXLAN device: VNI 1",
            "PERMANENT",
            "VTEP MAC ->",
            "learning off",
        ] {
            assert!(show.contains(needle), "show lacks {needle:?}");
        }
    }
    if mode == "ipip" {
        for needle in [
            "IPIP device: local 172.30.1.",
            "MTU 1480 = underlay MTU 1500 - 20",
            "this node's tunnel address",
            "IPIP route to node",
            "onlink: ",
            "ENCAPSULATED through cnikit.ipip: mode always",
        ] {
            assert!(show.contains(needle), "show lacks {needle:?}:\n{show}");
        }
        // Mode always: every peer's block through the tunnel, none through eth0.
        let status = lab.status();
        assert_eq!(status["ipipMode"], "always");
        let tunnelled = assert_ipip_routes(&status);
        assert_eq!(tunnelled, 6, "each of 3 nodes tunnels to its 2 peers");
    }
    if mode == "bgp" {
        for needle in [
            "BGP sessions (AS 64512, router id 172.30.1.",
            "learned over BGP from node",
            "with NEXT_HOP 172.30.1.",
            "iBGP (same AS",
        ] {
            assert!(show.contains(needle), "show lacks {needle:?}:\n{show}");
        }
        if bird {
            assert!(
                show.contains("BIRD's kernel protocol put it here (proto bird)"),
                "show explains BIRD's routes:\n{show}"
            );
        }
        let status = bgp_status.expect("waited for the sessions above");
        let ipip = extra.contains(&"--ipip-mode");
        assert_eq!(
            assert_block_routes(&status, proto, |_, _| ipip),
            if ipip { 6 } else { 0 },
            "BGP routes through the tunnel with --ipip-mode always, else nothing"
        );
        if ipip {
            assert!(
                show.contains("through the IPIP device: ENCAPSULATED"),
                "show explains the tunnelled BGP routes:\n{show}"
            );
        }
        assert_bgp_listening(&status);
    }
    let node3_birds = if bird {
        let ns = node(&lab.status(), "node3")["ns"]
            .as_str()
            .unwrap()
            .to_owned();
        let birds = birds_in(&ns);
        assert_eq!(birds.len(), 1, "one bird in {ns}: {birds:?}");
        birds
    } else {
        Vec::new()
    };

    // node-del node3: its entries must vanish from node1 and node2.
    let before = lab.status();
    // The agents' endpoints: `status` shows every node alive and ready; node1's /metrics,
    // curled inside its namespace, follows node3 leaving and node4 joining below.
    for n in before["nodes"].as_array().expect("nodes") {
        assert_eq!(n["endpoints"]["healthz"]["status"], 200, "{n}");
        assert_eq!(n["endpoints"]["readyz"]["status"], 200, "{n}");
        assert_eq!(n["endpoints"]["metrics"]["peers"], 2.0, "{n}");
    }
    let metrics = AgentMetrics::of(&before, "node1");
    let routes_before = metrics.until("node1 routes node2 and node3", |m| {
        m.get("cnikit_agent_peers") == Some(2.0)
            && m.get("cnikit_agent_programmed_routes")
                .is_some_and(|r| r > 0.0)
    });
    let routes = |m: &Page| m.get("cnikit_agent_programmed_routes").unwrap_or(-1.0);
    let gone = Peer::of(&before, "node3");
    let others: Vec<String> = ["node1", "node2"]
        .iter()
        .map(|n| node(&before, n)["ns"].as_str().unwrap().to_owned())
        .collect();
    #[cfg(feature = "ebpf")]
    let remotes = |lab: &Lab| ebpf::remotes_towards(lab, &["node1", "node2"], &gone.address);
    #[cfg(feature = "ebpf")]
    if mode == "ebpf" {
        assert_eq!(
            remotes(&lab).len(),
            2,
            "node1 and node2 send node3's block to it"
        );
    }
    for ns in &others {
        let traces = gone.traces_in(ns);
        let want = if mode == "vxlan" { 3 } else { 1 };
        assert!(
            traces.len() >= want,
            "{ns} should route node3 before it leaves: {traces:?}"
        );
    }
    let child = Command::new(&lab.bin)
        .args(["--name", &lab.name, "node-del", "node3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node-del");
    let watch = Instant::now();
    let mut cleared_at = None;
    while watch.elapsed() < Duration::from_secs(20) {
        if others.iter().all(|ns| gone.traces_in(ns).is_empty()) {
            cleared_at = Some(unix_ms());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().expect("node-del");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "node-del: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    #[cfg(feature = "ebpf")]
    if mode == "ebpf" {
        // The agents' reconcile took node3's block out of their LPM maps.
        assert_eq!(remotes(&lab), Vec::<String>::new(), "node3's LPM entries");
    }
    let left: Vec<String> = others.iter().flat_map(|ns| gone.traces_in(ns)).collect();
    assert!(
        cleared_at.is_some() && left.is_empty(),
        "node3's entries still on the other nodes 20 s after node-del: {left:?}"
    );
    let sigterm: u128 = stdout
        .split("SIGTERM at unix_ms ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("node-del prints when it signalled the agent: {stdout}"));
    let delay = cleared_at.unwrap().saturating_sub(sigterm);
    println!(
        "{mode}: node3's routes, neighbour and FDB entries left node1 and node2 {delay} ms after \
         its agent got SIGTERM (target < 1000 ms)"
    );
    if delay >= 1000 {
        eprintln!("SLOW: {mode}: removal took {delay} ms (target < 1000 ms)");
    }
    for pid in &node3_birds {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "node3's bird {pid} outlived node-del"
        );
    }
    if let Some(kube) = &kube {
        kube.assert_registry(&["node1", "node2"]);
    }
    let routes_after_del = metrics.until("node3 gone from node1's metrics", |m| {
        m.get("cnikit_agent_peers") == Some(1.0)
            && (0.0..routes(&routes_before)).contains(&routes(m))
    });

    // node-add: node4 joins, its pods reach and are reached by the old ones.
    let added = lab.ok(&["node-add"]);
    assert!(added.contains("node4 added"), "{added}");
    let (report, ok) = lab.check();
    assert!(ok, "check after node-add: {report}");
    let pairs = assert_all_ok(&report, "podToPod");
    assert_eq!(
        pairs, 30,
        "3 nodes x 2 pods after node3 left and node4 came"
    );
    let node4_pairs = report["podToPod"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            let from = p["from"].as_str().unwrap();
            let to = p["to"].as_str().unwrap();
            from.starts_with("node4/") != to.starts_with("node4/")
        })
        .count();
    assert_eq!(
        node4_pairs, 16,
        "node4's 2 pods with the 4 old pods, both ways"
    );
    assert!(
        !report.to_string().contains("node3"),
        "node3 is gone from the lab"
    );
    if let Some(kube) = &kube {
        kube.assert_registry(&["node1", "node2", "node4"]);
        // Each running node's blocks are owned by that node in the store: the IPAMBlock's
        // ownership record names it. (IPAMBlocks are never deleted: a given-back block's
        // object stays, empty, so its existence alone says nothing.)
        let status = lab.status();
        let mut owned = Vec::new();
        for node in ["node1", "node2", "node4"] {
            let blocks = Peer::of(&status, node).blocks;
            assert!(!blocks.is_empty(), "{node} owns a block: {status}");
            for cidr in blocks {
                let block = cidr.replace('/', "-");
                assert_eq!(
                    kube.block_owner(&block).as_deref(),
                    Some(node),
                    "the owner of IPAMBlock {block}"
                );
                owned.push(block);
            }
        }
        let count = owned.len();
        owned.sort();
        owned.dedup();
        assert_eq!(
            owned.len(),
            count,
            "no block is listed by two nodes: {owned:?}"
        );
        println!("kubernetes store: each running node's blocks are owned by it: {owned:?}");
    }
    let joined = metrics.until("node4 in node1's metrics", |m| {
        m.get("cnikit_agent_peers") == Some(2.0) && routes(m) == routes(&routes_before)
    });
    assert!(
        joined.get("cnikit_agent_reconciles_total").unwrap_or(0.0)
            > routes_after_del
                .get("cnikit_agent_reconciles_total")
                .unwrap_or(f64::MAX),
        "node4's arrival was reconciled"
    );
    println!(
        "{mode}: node1's /metrics: peers 2 -> 1 -> 2, programmed routes {} -> {} -> {}",
        routes(&routes_before),
        routes(&routes_after_del),
        routes(&joined),
    );

    if mode == "bgp" {
        // The survivors and the newcomer listen; `down` must take their sockets away with
        // their agents and namespaces.
        let status = assert_bgp_sessions(&lab, 2);
        assert_bgp_listening(&status);
    }
    let birds: Vec<(String, u32)> = lab.status()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|n| {
            let ns = n["ns"].as_str().unwrap().to_owned();
            birds_in(&ns).into_iter().map(move |p| (ns.clone(), p))
        })
        .collect();
    assert_eq!(birds.len(), if bird { 3 } else { 0 }, "{birds:?}");
    lab.down_and_verify();
    #[cfg(feature = "ebpf")]
    if mode == "ebpf" {
        ebpf::assert_gone(&lab, &programs);
    }
    for (ns, pid) in birds {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the bird of {ns} ({pid}) outlived down"
        );
    }
}

/// A node agent's `/metrics`, fetched with `curl` inside the node's namespace at the
/// address `status --json` reports.
struct AgentMetrics {
    ns: String,
    url: String,
}

/// One fetched metrics page.
struct Page(String);

impl Page {
    /// The value of the sample `name` (a whole line `name value`).
    fn get(&self, name: &str) -> Option<f64> {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }
}

impl AgentMetrics {
    fn of(status: &Value, name: &str) -> Self {
        let n = node(status, name);
        AgentMetrics {
            ns: n["ns"].as_str().expect("ns").to_owned(),
            url: format!(
                "http://{}/metrics",
                n["endpoints"]["address"]
                    .as_str()
                    .expect("endpoints address")
            ),
        }
    }

    fn fetch(&self) -> Page {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &self.ns, "curl", "-sf", "-m", "5", &self.url,
            ])
            .output()
            .expect("run curl");
        Page(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Fetches until `cond` holds (20 s at most); the page it held on.
    fn until(&self, what: &str, cond: impl Fn(&Page) -> bool) -> Page {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let page = self.fetch();
            if cond(&page) {
                return page;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; {} said\n{}",
                self.url,
                page.0
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The PIDs of the `bird` processes in namespace `ns`.
fn birds_in(ns: &str) -> Vec<u32> {
    let out = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .expect("ip netns pids");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p: &u32| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "bird")
        })
        .collect()
}

/// What the ebpf lab shows and leaves, read from its own BPF filesystem.
#[cfg(feature = "ebpf")]
mod ebpf {
    use super::{Lab, STATE_ROOT};
    use std::path::Path;

    /// The network name the lab gives its conflists.
    const NETWORK: &str = "cnikit-lab";

    /// Checks that `show` lists the programs per device with their ids and explains each
    /// map entry; returns the program ids.
    pub fn assert_show(show: &str) -> Vec<u32> {
        for needle in [
            "VXLAN device in external (collect_md) mode",
            "cnikit.ebpf ingress: prog id ",
            "cnikit.ebpf egress: prog id ",
            "ingress: prog id ",
            " from_pod\n",
            "endpoints (2 entries",
            "remotes (2 entries",
            "are delivered into the veth peer of cnk",
            "goes to node",
            "through VNI 1",
            "tunnel[0] = ifindex",
            "pod to pod of this node, by bpf_redirect_peer",
            "from the tunnel into a pod, by bpf_redirect_peer",
        ] {
            assert!(show.contains(needle), "show lacks {needle:?}:\n{show}");
        }
        let ids: Vec<u32> = show
            .split("prog id ")
            .skip(1)
            .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .collect();
        // 3 nodes: from_pod on 6 veths, from_tunnel and to_tunnel on 3 devices.
        assert_eq!(ids.len(), 12, "programs listed: {ids:?}");
        ids
    }

    /// The LPM entries on `nodes` that send a block to `address`.
    pub fn remotes_towards(lab: &Lab, nodes: &[&str], address: &str) -> Vec<String> {
        let bpffs = Path::new(STATE_ROOT).join(&lab.name).join("bpffs");
        let mut found = Vec::new();
        for node in nodes {
            let pins = cnikit::ebpf::Pins::new(&bpffs, NETWORK, node).expect("pins");
            let remotes = pins.open_remotes().expect("open remotes").expect("pinned");
            for (block, via) in remotes.list().expect("list") {
                if via.to_string() == address {
                    found.push(format!("{node}: {block} -> {via}"));
                }
            }
        }
        found
    }

    /// After `down`: no program the lab attached is loaded, no BPF filesystem is mounted.
    pub fn assert_gone(lab: &Lab, programs: &[u32]) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let loaded = || -> Vec<u32> {
            programs
                .iter()
                .copied()
                .filter(|id| {
                    cnikit::ebpf::program::program_maps(*id)
                        .expect("list programs")
                        .is_some()
                })
                .collect()
        };
        // The kernel frees a program once its last link and descriptor are gone.
        while !loaded().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(
            loaded(),
            Vec::<u32>::new(),
            "programs still loaded after down"
        );
        let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
        assert!(
            !mounts.contains(&format!("{STATE_ROOT}/{}/bpffs", lab.name)),
            "the lab's bpffs is still mounted"
        );
    }
}

/// Waits (10 s at most: the agents rewrite their node state within a block poll) until
/// every node's BGP report lists `peers` sessions, all Established with one prefix sent and
/// one received (a /26 block per node); returns that status.
fn assert_bgp_sessions(lab: &Lab, peers: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = lab.status();
        let mut wrong = Vec::new();
        for n in status["nodes"].as_array().expect("nodes") {
            let sessions = n["nodeState"]["routing"]["peers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let good = sessions
                .iter()
                .filter(|s| {
                    s["state"] == "established"
                        && s["prefixesSent"] == 1
                        && s["prefixesReceived"] == 1
                })
                .count();
            if sessions.len() != peers || good != peers {
                wrong.push(format!("{}: {sessions:?}", n["name"]));
            }
        }
        if wrong.is_empty() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "BGP sessions not all established with 1/1 prefixes after 10 s: {wrong:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Asserts every node's speaker (or BIRD) listens on its underlay address, TCP 179 (`ss
/// -ltn` in the node's namespace).
fn assert_bgp_listening(status: &Value) {
    for n in status["nodes"].as_array().expect("nodes") {
        let ns = n["ns"].as_str().unwrap();
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "ss", "-Hltn"])
            .output()
            .expect("ss");
        let listening = String::from_utf8_lossy(&out.stdout);
        let want = format!("{}:179 ", n["address"].as_str().unwrap());
        assert!(
            listening.contains(&want),
            "{ns}: no BGP listener on {want}: {listening}"
        );
    }
}

/// Checks the agents' routes of an ipip lab against the topology ([`assert_block_routes`]):
/// through the tunnel when the lab's IPIP mode is `always` or the peer is on another
/// underlay subnet. Returns the number of tunnel routes.
fn assert_ipip_routes(status: &Value) -> usize {
    let cross_subnet = status["ipipMode"] == "crossSubnet";
    assert_block_routes(status, "107", |me, peer| {
        !cross_subnet || peer["subnet"] != me["subnet"]
    })
}

/// Checks the mode's routes (protocol `proto`: 107, the agent's; `bird` for BIRD's) on
/// every node: one per peer block, via the peer's underlay address, through `cnikit.ipip`
/// (`onlink`) when `tunnel(me, peer)`, else through `eth0` without `onlink`; no other
/// route of the mode. Returns the number of tunnel routes.
fn assert_block_routes(
    status: &Value,
    proto: &str,
    tunnel: impl Fn(&Value, &Value) -> bool,
) -> usize {
    let nodes = status["nodes"].as_array().expect("nodes");
    let mut tunnelled = 0;
    for me in nodes {
        let ns = me["ns"].as_str().unwrap();
        let routes: Vec<Value> = ip_json(ns, &["route", "show"])
            .into_iter()
            .filter(|r| r["protocol"] == proto)
            .collect();
        let mut expected = 0;
        for peer in nodes.iter().filter(|p| p["name"] != me["name"]) {
            let tunnel = tunnel(me, peer);
            for block in peer["nodeState"]["blocks"].as_array().expect("blocks") {
                expected += 1;
                let found: Vec<&Value> = routes.iter().filter(|r| r["dst"] == *block).collect();
                assert_eq!(
                    found.len(),
                    1,
                    "{}: one route to {}'s block {block}: {routes:?}",
                    me["name"],
                    peer["name"]
                );
                let r = found[0];
                let onlink = r["flags"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|x| x == "onlink"));
                assert_eq!(r["gateway"], peer["address"], "{}: {r}", me["name"]);
                if tunnel {
                    tunnelled += 1;
                    assert!(
                        r["dev"] == "cnikit.ipip" && onlink,
                        "{} -> {} ({} -> {}): a tunnel route `via PEER dev cnikit.ipip \
                         onlink`, not {r}",
                        me["name"],
                        peer["name"],
                        me["subnet"],
                        peer["subnet"]
                    );
                } else {
                    assert!(
                        r["dev"] == "eth0" && !onlink,
                        "{} -> {} (both on {}): a direct route via eth0, not {r}",
                        me["name"],
                        peer["name"],
                        me["subnet"]
                    );
                }
            }
        }
        assert_eq!(
            routes.len(),
            expected,
            "{}: only the peers' block routes are the agent's: {routes:?}",
            me["name"]
        );
    }
    tunnelled
}

#[test]
fn host_gw_lifecycle() {
    lifecycle("host_gw_lifecycle", "hg", "host-gw");
}

/// eBPF (pods on tc programs, the blocks of other nodes through a collect_md VXLAN device),
/// 3 nodes x 2 pods: `show` lists each program with its id and explains every map entry; a
/// node that leaves takes its LPM entries with it; `down` leaves no program loaded, no pin
/// and no device.
#[cfg(feature = "ebpf")]
#[test]
fn ebpf_lifecycle() {
    lifecycle("ebpf_lifecycle", "eb", "ebpf");
}

#[test]
fn vxlan_lifecycle() {
    lifecycle("vxlan_lifecycle", "vx", "vxlan");
}

/// BGP (the agents' own speakers, iBGP full mesh on one segment), 3 nodes x 2 pods: the
/// routes come over the sessions; a node that leaves takes its routes with it; `down`
/// leaves no agent, no listening socket (their namespaces are gone).
#[test]
fn bgp_lifecycle() {
    lifecycle("bgp_lifecycle", "bg", "bgp");
}

/// BGP through BIRD (`--bgp-engine bird`: each agent supervises a BIRD in its node), 3
/// nodes x 2 pods: every pair pings over BIRD's routes (`proto bird`); a node that leaves
/// takes its routes and its BIRD with it; `down` leaves no BIRD and no socket.
#[test]
fn bgp_bird_lifecycle() {
    let test = "bgp_bird_lifecycle";
    if !testkit::on_path("bird") || !testkit::on_path("birdc") {
        testkit::skip(test, "needs bird and birdc (Debian package bird2)");
        return;
    }
    lifecycle_with(test, "bb", "bgp", &["--bgp-engine", "bird"]);
}

/// BGP with IPIP (`--ipip-mode always`: the learned routes go through cnikit.ipip
/// on-link), the native engine and then BIRD, 3 nodes x 2 pods each; in the VM when this
/// kernel has no ipip module.
#[test]
fn bgp_ipip_lifecycle() {
    let test = "bgp_ipip_lifecycle";
    if lab_binary(test).is_none() || !testkit::vm::here_or_in_vm(test, "ipip") {
        return;
    }
    lifecycle_with(test, "bi", "bgp", &["--ipip-mode", "always"]);
    lifecycle_with(
        test,
        "bj",
        "bgp",
        &["--ipip-mode", "always", "--bgp-engine", "bird"],
    );
}

/// BGP with a route reflector and a top-of-rack router (the agents' own speakers): 5
/// nodes, node1 the reflector and the others its clients; a BIRD in AS 65000 peers with
/// every node over eBGP. See [`reflector_with_tor`].
#[test]
fn bgp_reflector_tor_lifecycle() {
    reflector_with_tor("bgp_reflector_tor_lifecycle", "br", &[]);
}

/// [`bgp_reflector_tor_lifecycle`] with BIRD as every node's engine.
#[test]
fn bgp_bird_reflector_tor_lifecycle() {
    reflector_with_tor(
        "bgp_bird_reflector_tor_lifecycle",
        "bt",
        &["--bgp-engine", "bird"],
    );
}

/// A 5-node `bgp` lab, `--bgp-topology reflector --reflectors 1 --tor bird`: the clients
/// peer with node1 and the router only; every pod pair pings over the reflected routes; the
/// router has every node's block via that node; `show` explains each role and the router's
/// view; node5 leaves → its block is gone from every node and from the router; `down`
/// leaves no agent, no BIRD (the router's included), no socket, no namespace.
fn reflector_with_tor(test: &str, tag: &str, extra: &[&str]) {
    let Some(bin) = lab_binary(test) else {
        return;
    };
    if !testkit::on_path("bird") || !testkit::on_path("birdc") {
        testkit::skip(test, "needs bird and birdc (Debian package bird2)");
        return;
    }
    let bird = extra.contains(&"bird");
    let proto = if bird { "bird" } else { "107" };
    let mut lab = Lab::new(bin, tag);
    let mut up = vec![
        "up",
        "--mode",
        "bgp",
        "--nodes",
        "5",
        "--pods",
        "1",
        "--bgp-topology",
        "reflector",
        "--reflectors",
        "1",
        "--tor",
        "bird",
        "--ttl",
        "60",
        "--resync",
        "60",
    ];
    up.extend(extra);
    lab.ok(&up);
    let kube = extra.contains(&"kubernetes").then(|| Kubectl::of(&lab));
    if let Some(kube) = &kube {
        kube.assert_registry(&["node1", "node2", "node3", "node4", "node5"]);
        kube.assert_node_rights();
    }

    let (report, ok) = lab.check();
    assert_eq!(assert_all_ok(&report, "podToPod"), 20, "5 nodes x 1 pod");
    assert_eq!(
        assert_all_ok(&report, "torToPod"),
        5,
        "the router reaches every pod over what it learned"
    );
    assert!(ok, "check exits 0 when every probe answers: {report}");

    // Sessions: the reflector with the 4 clients and the router; each client with the
    // reflector and the router only.
    let status = tor_sessions(&lab);
    for n in status["nodes"].as_array().expect("nodes") {
        let name = n["name"].as_str().unwrap();
        let mut peers: Vec<&str> = n["nodeState"]["routing"]["peers"]
            .as_array()
            .expect("BGP report")
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        peers.sort();
        let want: Vec<&str> = if name == "node1" {
            vec!["node2", "node3", "node4", "node5", "tor"]
        } else {
            vec!["node1", "tor"]
        };
        assert_eq!(peers, want, "{name}'s sessions");
        assert_eq!(n["reflector"], name == "node1", "{name}");
        // Every other node's block is in its kernel, via that node (reflection keeps the
        // next hop).
        let ns = n["ns"].as_str().unwrap();
        let routes: BTreeSet<(String, String)> = ip_json(ns, &["route", "show"])
            .into_iter()
            .filter(|r| r["protocol"] == proto)
            .map(|r| {
                (
                    r["dst"].as_str().unwrap().to_owned(),
                    r["gateway"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        let want: BTreeSet<(String, String)> = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["name"] != n["name"])
            .flat_map(|o| {
                let via = o["address"].as_str().unwrap().to_owned();
                o["nodeState"]["blocks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(move |b| (b.as_str().unwrap().to_owned(), via.clone()))
            })
            .collect();
        assert_eq!(routes, want, "{name}'s BGP routes");
    }
    assert_tor_table(&status, &["node1", "node2", "node3", "node4", "node5"]);

    let show = lab.ok(&["show"]);
    for needle in [
        "1 route reflector, top-of-rack router",
        "iBGP to a route-reflector client",
        "iBGP to a route reflector (a client",
        "eBGP (another AS",
        "== top-of-rack router (",
        "tor 172.30.1.254 AS 65000 established",
        "learned over eBGP from node5",
        "sessions (5):",
        "table (5 routes):",
    ] {
        assert!(show.contains(needle), "show lacks {needle:?}:\n{show}");
    }
    assert!(
        show.contains("a route reflector, reflected") || show.contains("through a route reflector"),
        "show explains the reflected routes:\n{show}"
    );

    // node5 leaves: its block goes from every node and from the router.
    let gone = Peer::of(&status, "node5");
    let out = lab.ok(&["node-del", "node5"]);
    assert!(
        out.contains("top-of-rack router: no route via node5"),
        "node-del follows node5 out of the router: {out}"
    );
    let status = lab.status();
    for n in status["nodes"].as_array().unwrap() {
        let ns = n["ns"].as_str().unwrap();
        assert_eq!(gone.traces_in(ns), Vec::<String>::new(), "node5 on {ns}");
    }
    assert_tor_table(&status, &["node1", "node2", "node3", "node4"]);
    let tor_pid = status["tor"]["pid"].as_i64().expect("the router's pid");
    let tor_ns = status["tor"]["ns"].as_str().unwrap().to_owned();
    assert_eq!(
        birds_in(&tor_ns),
        vec![tor_pid as u32],
        "one bird in {tor_ns}"
    );

    // `down_and_verify` checks the router's BIRD too (its PID is in `status`).
    lab.down_and_verify();
    assert!(
        !runs_for_lab(tor_pid, &lab.name),
        "the router's bird {tor_pid} outlived down"
    );
    println!(
        "{test}: 5 nodes (1 reflector), 20/20 pod pairs, the router learned 5 blocks; node5 \
         left every table; down left nothing"
    );
}

/// Waits (15 s at most) until every node's sessions, and the router's, are established;
/// returns that status.
fn tor_sessions(lab: &Lab) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = lab.status();
        let mut wrong: Vec<String> = Vec::new();
        for n in status["nodes"].as_array().expect("nodes") {
            let peers = n["nodeState"]["routing"]["peers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if peers.is_empty() || peers.iter().any(|p| p["state"] != "established") {
                wrong.push(format!("{}: {peers:?}", n["name"]));
            }
        }
        let tor = status["tor"]["sessions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if tor.len() != status["nodes"].as_array().unwrap().len()
            || tor.iter().any(|p| p["state"] != "established")
        {
            wrong.push(format!("tor: {tor:?}"));
        }
        if wrong.is_empty() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "BGP sessions not all established after 15 s: {wrong:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Asserts the router's table (from `status`) holds exactly the blocks of `nodes`, each via
/// its node's address and learned from it, and that its kernel has them too.
fn assert_tor_table(status: &Value, nodes: &[&str]) {
    let table: BTreeSet<(String, String, String)> = status["tor"]["routes"]
        .as_array()
        .expect("the router's table")
        .iter()
        .map(|r| {
            (
                r["dst"].as_str().unwrap().to_owned(),
                r["via"].as_str().unwrap().to_owned(),
                r["from"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String, String)> = nodes
        .iter()
        .flat_map(|name| {
            let n = node(status, name);
            let via = n["address"].as_str().unwrap().to_owned();
            n["nodeState"]["blocks"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |b| {
                    (
                        b.as_str().unwrap().to_owned(),
                        via.clone(),
                        name.to_string(),
                    )
                })
        })
        .collect();
    assert_eq!(table, want, "the router's table");
    let ns = status["tor"]["ns"].as_str().unwrap();
    let kernel: BTreeSet<(String, String, String)> = ip_json(ns, &["route", "show"])
        .into_iter()
        .filter(|r| r["protocol"] == "bird")
        .map(|r| {
            let via = r["gateway"].as_str().unwrap_or("").to_owned();
            let from = nodes
                .iter()
                .find(|n| node(status, n)["address"] == via.as_str())
                .map(|n| n.to_string())
                .unwrap_or_default();
            (r["dst"].as_str().unwrap().to_owned(), via, from)
        })
        .collect();
    assert_eq!(kernel, want, "the router's kernel routes");
}

/// IPIP (mode always), 3 nodes x 2 pods; in the VM when this kernel has no ipip module.
#[test]
fn ipip_lifecycle() {
    let test = "ipip_lifecycle";
    if lab_binary(test).is_none() || !testkit::vm::here_or_in_vm(test, "ipip") {
        return;
    }
    lifecycle(test, "ip", "ipip");
}

/// Two subnets joined by a router, IPIP crossSubnet: every pair pings, and the tunnel
/// routes are exactly those to the peers across the router; the same-subnet peers get
/// plain routes via eth0.
#[test]
fn two_subnets_ipip_cross_subnet_tunnels_only_across() {
    let test = "two_subnets_ipip_cross_subnet_tunnels_only_across";
    let Some(bin) = lab_binary(test) else {
        return;
    };
    if !testkit::vm::here_or_in_vm(test, "ipip") {
        return;
    }
    let mut lab = Lab::new(bin, "tsi");
    let status = two_subnets_every_pair(&lab, &["--mode", "ipip", "--ipip-mode", "cross-subnet"]);
    assert_eq!(status["ipipMode"], "crossSubnet");
    let subnets: Vec<&str> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["subnet"].as_str().unwrap())
        .collect();
    assert_eq!(
        subnets,
        ["172.30.1.0/24", "172.30.2.0/24", "172.30.1.0/24"],
        "nodes alternate between the segments"
    );
    // node1 <-> node2 and node3 <-> node2 cross the router; node1 <-> node3 do not.
    assert_eq!(assert_ipip_routes(&status), 4, "tunnel routes");

    let show = lab.ok(&["show", "--node", "node1"]);
    for needle in [
        "IPIP per peer (mode crossSubnet)",
        "ENCAPSULATED through cnikit.ipip: another subnet",
        "crossSubnet tunnels node2 because it is on 172.30.2.0/24",
        "direct via eth0, no encapsulation",
        "crossSubnet, not tunnelled: node3 shares",
    ] {
        assert!(show.contains(needle), "show lacks {needle:?}:\n{show}");
    }
    assert!(!show.contains("UNEXPECTED"), "{show}");
    println!("ipip crossSubnet, two subnets: 30/30 pod pairs; 4 tunnel routes, 2 direct");
    lab.down_and_verify();
}

/// BGP with `--ipip-mode cross-subnet` on two subnets joined by a router, the native engine
/// and then BIRD: the sessions across the router come up (multihop), every pod pair pings,
/// and only the blocks of peers on the other subnet go through the tunnel (4 routes), the
/// others plainly via eth0. In the VM when this kernel has no ipip module.
#[test]
fn two_subnets_bgp_cross_subnet_tunnels_only_across() {
    let test = "two_subnets_bgp_cross_subnet_tunnels_only_across";
    let Some(bin) = lab_binary(test) else {
        return;
    };
    if !testkit::vm::here_or_in_vm(test, "ipip") {
        return;
    }
    let mut engines = vec![("tsb", "native", "107")];
    if testkit::on_path("bird") && testkit::on_path("birdc") {
        engines.push(("tsc", "bird", "bird"));
    } else {
        testkit::skip(test, "the bird engine's half needs bird and birdc (bird2)");
    }
    for (tag, engine, proto) in engines {
        let mut lab = Lab::new(bin.clone(), tag);
        two_subnets_every_pair(
            &lab,
            &[
                "--mode",
                "bgp",
                "--bgp-engine",
                engine,
                "--ipip-mode",
                "cross-subnet",
            ],
        );
        let status = assert_bgp_sessions(&lab, 2);
        let tunnelled =
            assert_block_routes(&status, proto, |me, peer| peer["subnet"] != me["subnet"]);
        assert_eq!(
            tunnelled, 4,
            "{engine}: node2's block and node2's routes to 1 and 3"
        );
        println!(
            "bgp ({engine}) crossSubnet, two subnets: 30/30 pod pairs; 4 tunnel routes, 2 direct"
        );
        lab.down_and_verify();
    }
}

/// Two subnets joined by a router: host-gw reports the off-link peers, routes only the
/// on-link one, and pods across the router do not reach each other.
#[test]
fn two_subnets_host_gw_reports_off_link_peers() {
    let Some(bin) = lab_binary("two_subnets_host_gw_reports_off_link_peers") else {
        return;
    };
    let mut lab = Lab::new(bin, "tsh");
    lab.ok(&[
        "up",
        "--mode",
        "host-gw",
        "--topology",
        "two-subnets",
        "--nodes",
        "3",
        "--pods",
        "1",
    ]);
    // node1 and node3 on 172.30.1.0/24, node2 on 172.30.2.0/24.
    let status = lab.status();
    let unroutable = |n: &str| -> BTreeSet<String> {
        node(&status, n)["nodeState"]["unroutable"]
            .as_object()
            .expect("unroutable map")
            .keys()
            .cloned()
            .collect()
    };
    assert_eq!(unroutable("node1"), BTreeSet::from(["node2".to_owned()]));
    assert_eq!(unroutable("node3"), BTreeSet::from(["node2".to_owned()]));
    assert_eq!(
        unroutable("node2"),
        BTreeSet::from(["node1".to_owned(), "node3".to_owned()])
    );
    let show = lab.ok(&["show", "--node", "node1"]);
    assert!(show.contains("UNROUTABLE peer node2"), "{show}");

    let node2 = Peer::of(&status, "node2");
    let node3 = Peer::of(&status, "node3");
    let node1_ns = node(&status, "node1")["ns"].as_str().unwrap();
    assert!(
        node2.traces_in(node1_ns).is_empty(),
        "node1 must not route node2's block"
    );
    assert!(
        !node3.traces_in(node1_ns).is_empty(),
        "node1 routes node3's block (same segment)"
    );

    let (report, ok) = lab.check();
    assert!(
        !ok,
        "check fails: pods across the router cannot reach each other"
    );
    for p in report["podToPod"].as_array().unwrap() {
        let from = p["from"].as_str().unwrap();
        let to = p["to"].as_str().unwrap();
        let across = from.starts_with("node2/") != to.starts_with("node2/");
        assert_eq!(
            p["ok"] == true,
            !across,
            "{from} -> {to}: host-gw reaches exactly the same-segment pods"
        );
    }
    println!(
        "host-gw two subnets: node2 unroutable from node1/node3, and back; same-segment pods reach each other"
    );
    lab.down_and_verify();
}

/// `up` of 3 nodes x 2 pods on two subnets joined by a router with the `mode` flags; asserts
/// that every pod reaches every pod and node and that every node routes every peer.
/// Returns `status --json`.
fn two_subnets_every_pair(lab: &Lab, mode: &[&str]) -> Value {
    let mut up = vec!["up"];
    up.extend_from_slice(mode);
    up.extend(["--topology", "two-subnets", "--nodes", "3", "--pods", "2"]);
    lab.ok(&up);
    let (report, ok) = lab.check();
    assert_eq!(assert_all_ok(&report, "podToPod"), 30);
    assert_all_ok(&report, "nodeToPod");
    assert!(ok, "check exits 0 when every probe answers");
    let status = lab.status();
    for n in status["nodes"].as_array().unwrap() {
        assert_eq!(
            n["nodeState"]["unroutable"],
            serde_json::json!({}),
            "{mode:?} routes every peer"
        );
    }
    status
}

/// Two subnets joined by a router: VXLAN carries every pair across.
#[test]
fn two_subnets_vxlan_routes_across() {
    let Some(bin) = lab_binary("two_subnets_vxlan_routes_across") else {
        return;
    };
    let mut lab = Lab::new(bin, "tsv");
    two_subnets_every_pair(&lab, &["--mode", "vxlan"]);
    println!("vxlan two subnets: 30/30 pod pairs across the router");
    lab.down_and_verify();
}

/// The routed pod network (Calico style /32 + proxy ARP) with VXLAN.
#[test]
fn routed_pod_network_with_vxlan() {
    let Some(bin) = lab_binary("routed_pod_network_with_vxlan") else {
        return;
    };
    let mut lab = Lab::new(bin, "rt");
    lab.ok(&[
        "up",
        "--mode",
        "vxlan",
        "--pod-network",
        "routed",
        "--nodes",
        "3",
        "--pods",
        "2",
    ]);
    let (report, ok) = lab.check();
    assert_eq!(assert_all_ok(&report, "podToPod"), 30);
    assert_all_ok(&report, "podToNode");
    assert!(ok);
    for (name, ip) in report["pods"].as_array().unwrap().iter().map(|p| {
        (
            p[0].as_str().unwrap().to_owned(),
            p[1].as_str().unwrap().to_owned(),
        )
    }) {
        assert!(!ip.is_empty(), "{name} has an address");
    }
    let status = lab.status();
    for n in status["nodes"].as_array().unwrap() {
        for p in n["pods"].as_array().unwrap() {
            let ip = p["ips"][0].as_str().unwrap();
            assert!(ip.ends_with("/32"), "routed pods get a /32: {ip}");
        }
    }
    println!("routed + vxlan: 30/30 pod pairs");
    lab.down_and_verify();
}

/// `kubectl` against the API server of a lab with `--store kubernetes`, run inside the
/// underlay namespace as `status` says, with the lab's administrator or its nodes' kubeconfig.
struct Kubectl {
    ns: String,
    admin: String,
    node: String,
}

impl Kubectl {
    fn of(lab: &Lab) -> Kubectl {
        let status = lab.status();
        let kube = &status["kubeApiserver"];
        assert_eq!(status["store"], "kubernetes", "{status}");
        assert_eq!(kube["alive"], true, "{status}");
        assert_eq!(
            status["etcd"]["alive"], true,
            "the API server's etcd: {status}"
        );
        let hint = kube["kubectl"]
            .as_str()
            .expect("status prints a kubectl command line");
        let words: Vec<&str> = hint.split_whitespace().collect();
        assert_eq!(words[..3], ["ip", "netns", "exec"], "{hint}");
        Kubectl {
            ns: words[3].to_owned(),
            admin: kube["kubeconfig"].as_str().unwrap().to_owned(),
            node: kube["nodeKubeconfig"].as_str().unwrap().to_owned(),
        }
    }

    fn run(&self, kubeconfig: &str, args: &[&str]) -> Output {
        // Its discovery cache beside the kubeconfig, in the lab's state dir.
        let cache = Path::new(kubeconfig).with_file_name("kubectl-cache");
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "kubectl",
                "--kubeconfig",
                kubeconfig,
            ])
            .arg("--cache-dir")
            .arg(cache)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl")
    }

    /// The names of the lab's objects of `resource` (the prefix label `cnikit`), without
    /// the pool's `cnikit.` prefix, sorted.
    fn names(&self, resource: &str, namespace: Option<&str>) -> Vec<String> {
        let mut args = vec![
            "get",
            resource,
            "-l",
            "ipam.cnikit.io/prefix=cnikit",
            "-o",
            "name",
        ];
        if let Some(ns) = namespace {
            args.extend(["-n", ns]);
        }
        let out = self.run(&self.admin, &args);
        assert!(
            out.status.success(),
            "kubectl get {resource}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let name = l.rsplit('/').next().unwrap_or(l);
                name.strip_prefix("cnikit.").unwrap_or(name).to_owned()
            })
            .collect();
        names.sort();
        names
    }

    /// The node named by the ownership record of IPAMBlock `block` (`10.244.0.64-26`), or
    /// `None` when the object holds no record (never claimed, or given back).
    fn block_owner(&self, block: &str) -> Option<String> {
        let name = format!("ipamblock/cnikit.{block}");
        let out = self.run(&self.admin, &["get", &name, "-o", "json"]);
        assert!(
            out.status.success(),
            "kubectl get {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let object: Value = serde_json::from_slice(&out.stdout).expect("kubectl's JSON");
        let records = object["spec"]["records"]
            .as_object()
            .unwrap_or_else(|| panic!("{name} has a records map: {object}"));
        assert!(
            records.len() <= 1,
            "{name} holds one ownership record: {object}"
        );
        records.values().next().map(|record| {
            let value: Value = serde_json::from_str(
                record["value"]
                    .as_str()
                    .unwrap_or_else(|| panic!("a record's value is text: {object}")),
            )
            .expect("an ownership record is JSON");
            value["node"]
                .as_str()
                .unwrap_or_else(|| panic!("the ownership record names a node: {value}"))
                .to_owned()
        })
    }

    /// The registry holds a NetworkNode and a Lease for exactly `nodes`.
    fn assert_registry(&self, nodes: &[&str]) {
        assert_eq!(
            self.names("networknodes", None),
            nodes,
            "NetworkNode objects"
        );
        assert_eq!(
            self.names("leases", Some("kube-system")),
            nodes,
            "Leases in kube-system"
        );
        println!("kubernetes store: a NetworkNode and a Lease for each of {nodes:?}");
    }

    /// The nodes' identity has the rights of `deploy/crds/rbac.yaml`, no more.
    fn assert_node_rights(&self) {
        for (args, allowed) in [
            (&["create", "ipamblocks.ipam.cnikit.io"][..], true),
            (&["update", "ipamnodes.ipam.cnikit.io"], true),
            (&["watch", "networknodes.ipam.cnikit.io"], true),
            (&["update", "leases", "-n", "kube-system"], true),
            (&["delete", "ipamblocks.ipam.cnikit.io"], false),
            (&["update", "leases", "-n", "default"], false),
            (&["get", "secrets", "-n", "kube-system"], false),
        ] {
            let mut can = vec!["auth", "can-i"];
            can.extend(args);
            let out = self.run(&self.node, &can);
            let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            assert_eq!(
                answer,
                if allowed { "yes" } else { "no" },
                "kubectl auth can-i {} as the nodes: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        println!("kubernetes store: the nodes run as kube-system/cnikit-node with the RBAC rules");
    }
}

/// [`lifecycle`] on the Kubernetes datastore (`--store kubernetes`: a kube-apiserver on the
/// lab's etcd in the underlay namespace), or a loud skip without kube-apiserver or kubectl.
#[cfg(feature = "kubernetes")]
fn kubernetes_lifecycle(test: &str, tag: &str, mode: &str) {
    let binary = testkit::apiserver::kube_apiserver_binary();
    if !binary.is_file() {
        testkit::skip(
            test,
            format_args!(
                "{} is missing (build it: scripts/kube-apiserver.sh)",
                binary.display()
            ),
        );
        return;
    }
    for (tool, package) in [("etcd", "etcd-server"), ("kubectl", "kubernetes-client")] {
        if !testkit::on_path(tool) {
            testkit::skip(
                test,
                format_args!("{tool} is not on PATH (apt-get install -y {package})"),
            );
            return;
        }
    }
    lifecycle_with(test, tag, mode, &["--store", "kubernetes"]);
}

/// host-gw with the IPAM and the node registry in custom resources: the lifecycle, with
/// the nodes' NetworkNodes and Leases following node-del and node-add, and the nodes'
/// identity limited to the RBAC rules.
#[cfg(feature = "kubernetes")]
#[test]
fn host_gw_kubernetes_store_lifecycle() {
    kubernetes_lifecycle("host_gw_kubernetes_store_lifecycle", "hk", "host-gw");
}

/// vxlan on the Kubernetes datastore (see [`host_gw_kubernetes_store_lifecycle`]).
#[cfg(feature = "kubernetes")]
#[test]
fn vxlan_kubernetes_store_lifecycle() {
    kubernetes_lifecycle("vxlan_kubernetes_store_lifecycle", "vk", "vxlan");
}

/// Nodes sharing a private etcd that runs inside the underlay namespace.
#[test]
fn etcd_store() {
    let test = "etcd_store";
    if !testkit::on_path("etcd") {
        testkit::skip(
            test,
            "the etcd binary is not on PATH (apt-get install -y etcd-server)",
        );
        return;
    }
    let Some(bin) = lab_binary(test) else {
        return;
    };
    let mut lab = Lab::new(bin, "et");
    lab.ok(&[
        "up", "--mode", "vxlan", "--store", "etcd", "--nodes", "3", "--pods", "2",
    ]);
    let status = lab.status();
    assert_eq!(status["store"], "etcd");
    assert_eq!(status["etcd"]["alive"], true, "{status}");
    let (report, ok) = lab.check();
    assert_eq!(assert_all_ok(&report, "podToPod"), 30);
    assert!(ok);
    let added = lab.ok(&["node-add", "--pods", "1"]);
    assert!(added.contains("node4 added"), "{added}");
    let (report, ok) = lab.check();
    assert_eq!(assert_all_ok(&report, "podToPod"), 42, "7 pods");
    assert!(ok);
    println!("etcd store: 30/30 pod pairs, then 42/42 with node4");
    lab.down_and_verify();
}

/// `up` that fails halfway (the agent does not know the mode) removes what it built;
/// `down` afterwards finds nothing, and is safe to run twice.
#[test]
fn failed_up_cleans_up_and_down_is_idempotent() {
    let Some(bin) = lab_binary("failed_up_cleans_up_and_down_is_idempotent") else {
        return;
    };
    let mut lab = Lab::new(bin, "fu");
    let out = lab.run(&["up", "--mode", "nosuchmode", "--nodes", "2", "--pods", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "up with an unknown mode fails");
    assert!(
        stderr.contains("unknown routing mode"),
        "the agent's reason is shown: {stderr}"
    );
    assert!(
        namespaces(&lab.name).is_empty(),
        "namespaces left: {:?}",
        namespaces(&lab.name)
    );
    assert!(!Path::new(STATE_ROOT).join(&lab.name).exists());
    for _ in 0..2 {
        let again = lab.ok(&["down"]);
        assert!(again.contains("nothing to remove"), "{again}");
    }
    lab.down = true;

    // A lab name that could reach another lab's namespaces is refused.
    let bad = Command::new(&lab.bin)
        .args(["--name", "a-b", "down"])
        .output()
        .expect("run the lab binary");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("lab name"));
}
