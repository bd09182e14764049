//! The `cnikit-agent` and `cnikit` binaries with `"podNetwork": "ebpf"` and `"routing":
//! "ebpf"`: two nodes, each a namespace on one switch with its own agent, sharing a file
//! store; pods plugged in by the plugin exec'd as a runtime does. The maps are pinned on a
//! BPF filesystem of the test's own.
//!
//! Shown here: pods ping across; the agent of a node restarts (`agent.keepOnExit`) while a
//! pod pings across without losing a packet, and its maps are the same afterwards; a pod
//! deleted while that agent was down (its namespace gone, no DEL) leaves no entry once the
//! new agent has reconciled; CHECK verifies a pod's entry and programs; DEL removes the
//! pod's entry and its program link.
//!
//! Needs root and the example binaries (`cargo build -p cnikit --examples`); skips loudly
//! otherwise.
#![cfg(feature = "ebpf")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cni_core::exec::{self, Invocation};
use cni_core::spec::{CniResult, ConfList};
use cnikit::ebpf::Pins;
use serde_json::{Value, json};
use testkit::{AgentProcess, Bpffs, Namespaces, Segment, netns_path};

const WAIT: Duration = Duration::from_secs(20);
const NETWORK: &str = "ebpfnet";

fn conflist(node: &str, data: &Path, store: &Path, bpffs: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [{
            "type": "cnikit",
            "podNetwork": "ebpf",
            "routing": "ebpf",
            "bpffs": bpffs,
            "nodeName": node,
            "dataDir": data,
            "agent": {
                "interface": "eth0", "ttlSeconds": 10, "resyncSeconds": 1, "keepOnExit": true
            },
            "ipam": {
                "type": "cnikit-ipam",
                "pool": "10.253.0.0/16",
                "blockSize": 26,
                "store": {"type": "file", "path": store},
            },
        }],
    })
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn binaries(test: &str) -> Option<(PathBuf, PathBuf)> {
    if !testkit::root(test) {
        return None;
    }
    let dir = testkit::examples_dir();
    for bin in ["cnikit", "cnikit-agent"] {
        if !dir.join(bin).is_file() {
            testkit::skip(
                test,
                format_args!(
                    "{} is not built (run `cargo build -p cnikit --examples` first)",
                    dir.join(bin).display()
                ),
            );
            return None;
        }
        testkit::assert_fresh(&dir.join(bin));
    }
    Some((dir.join("cnikit"), dir.join("cnikit-agent")))
}

/// One node: its namespace, conflist and agent.
struct Node {
    name: &'static str,
    ns: String,
    list: PathBuf,
    data: PathBuf,
    log: PathBuf,
    agent: AgentProcess,
}

impl Node {
    fn conflist(&self) -> ConfList {
        ConfList::from_slice(&std::fs::read(&self.list).unwrap()).unwrap()
    }

    fn invocation(&self, plugin: &Path, pod: &str) -> Invocation {
        Invocation::new(
            cni_core::spec::Command::Add,
            pod,
            Some(netns_path(pod)),
            "eth0",
            vec![plugin.parent().unwrap().to_path_buf()],
        )
        .in_netns(netns_path(&self.ns))
    }
}

fn ping(from: &str, to: &str, extra: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", from, "ping", "-q", "-W", "1"])
        .args(extra)
        .arg(to)
        .output()
        .expect("run ping");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn address(result: &CniResult) -> String {
    result.ips[0].address.addr().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_restart_without_loss_and_clean_what_gone_pods_left() {
    let test = "agents_restart_without_loss_and_clean_what_gone_pods_left";
    let Some((plugin, agent_bin)) = binaries(test) else {
        return;
    };
    if !cnikit::ebpf::program::has_tcx() {
        testkit::skip(
            test,
            "the kernel has no TCX (the backend tests cover tc clsact)",
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let bpffs = Bpffs::mount("ebag");
    let namespaces = Namespaces::new("ebag");
    let segment = Segment::new(&namespaces, "sw");
    let store = dir.path().join("store");
    let mut nodes = Vec::new();
    for (name, cidr) in [("n1", "192.168.75.11/24"), ("n2", "192.168.75.12/24")] {
        let ns = namespaces.add(name);
        segment.plug(&ns, "eth0", cidr);
        testkit::exec_in(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let data = dir.path().join(name);
        let list = dir.path().join(format!("{name}.conflist"));
        let conf = conflist(name, &data, &store, bpffs.path());
        std::fs::write(&list, conf.to_string()).unwrap();
        let log = dir.path().join(format!("{name}.log"));
        let agent = AgentProcess::start(&agent_bin, &ns, &list, &log);
        nodes.push(Node {
            name,
            ns,
            list,
            data,
            log,
            agent,
        });
    }
    for n in &nodes {
        wait_until(&format!("{}'s node state", n.name), || {
            n.data.join("node-state.json").exists()
        });
    }
    let pins = |n: &Node| Pins::new(bpffs.path(), NETWORK, n.name).unwrap();
    let remotes = |n: &Node| {
        pins(n)
            .open_remotes()
            .unwrap()
            .map(|r| r.list().unwrap())
            .unwrap_or_default()
    };
    wait_until("each node's LPM entry for the other's block", || {
        nodes.iter().all(|n| remotes(n).len() == 1)
    });

    // Pods: a1 and a2 on n1, b1 on n2, plugged in by the plugin.
    let mut pods = Vec::new();
    for (node, suffix) in [(0, "a1"), (0, "a2"), (1, "b1")] {
        let pod = namespaces.add(suffix);
        let n: &Node = &nodes[node];
        let result = exec::add_list(
            &n.conflist(),
            &n.invocation(&plugin, &pod),
            &Default::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("ADD {suffix}: {e}"));
        pods.push((node, pod, result));
    }
    let (a1, a2, b1) = (&pods[0], &pods[1], &pods[2]);
    assert!(
        ping(&a1.1, &address(&b1.2), &["-c", "3", "-i", "0.2"]).contains(" 0% packet loss"),
        "a1 pings b1 on the other node"
    );
    for (node, pod, result) in &pods {
        let n: &Node = &nodes[*node];
        exec::check_list(
            &n.conflist(),
            &n.invocation(&plugin, pod),
            &Default::default(),
            result,
        )
        .await
        .unwrap_or_else(|e| panic!("CHECK {pod}: {e}"));
    }

    let n1_remotes = remotes(&nodes[0]);
    let endpoints = |n: &Node| pins(n).open_endpoints().unwrap().unwrap().list().unwrap();
    let before = endpoints(&nodes[0]);
    assert_eq!(before.len(), 2, "a1 and a2: {before:?}");

    // 150 pings at 20 ms from a1 to b1 while n1's agent stops (keeping what it made) and a
    // new one starts; meanwhile a2 goes away without a DEL.
    let pinger = std::thread::spawn({
        let (from, to) = (a1.1.clone(), address(&b1.2));
        move || ping(&from, &to, &["-c", "150", "-i", "0.02"])
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(nodes[0].agent.stop(), "n1's agent exits cleanly");
    assert!(
        nodes[0].data.join("node-state.json").exists(),
        "keepOnExit leaves the node state"
    );
    namespaces.remove(&a2.1);
    let a2_veth = cni_core::linux::veth::host_name(&a2.1, "eth0");
    wait_until("a2's host veth goes with its namespace", || {
        !testkit::ip_json(&nodes[0].ns, &["link", "show"])
            .iter()
            .any(|l| l["ifname"] == a2_veth.as_str())
    });
    assert_eq!(
        endpoints(&nodes[0]).len(),
        2,
        "nothing removed a2's entry yet"
    );
    nodes[0].agent = AgentProcess::start(&agent_bin, &nodes[0].ns, &nodes[0].list, &nodes[0].log);
    let a2_ip: std::net::Ipv4Addr = address(&a2.2).parse().unwrap();
    wait_until("the new agent's reconcile removes a2's entry", || {
        endpoints(&nodes[0]).iter().all(|(ip, _)| *ip != a2_ip)
    });
    let out = pinger.join().expect("pinger");
    assert!(
        out.contains("150 packets transmitted, 150 received"),
        "a1 kept talking to b1 while n1's agent restarted: {out}"
    );
    // Nothing lost, nothing doubled.
    assert_eq!(remotes(&nodes[0]), n1_remotes);
    let after = endpoints(&nodes[0]);
    let kept: Vec<_> = before.into_iter().filter(|(ip, _)| *ip != a2_ip).collect();
    assert_eq!(after, kept);
    assert!(
        !pins(&nodes[0]).link(&a2_veth).exists(),
        "a2's link pin is gone"
    );
    let log = std::fs::read_to_string(&nodes[0].log).unwrap();
    assert!(log.contains("removed what gone pods left"), "{log}");

    // DEL b1: its entry and its program link go; CHECK of a1 still passes.
    let (node, pod, result) = b1;
    let n: &Node = &nodes[*node];
    exec::del_list(
        &n.conflist(),
        &n.invocation(&plugin, pod),
        &Default::default(),
        Some(result),
    )
    .await
    .expect("DEL b1");
    assert!(endpoints(&nodes[1]).is_empty(), "b1's entry is gone");
    let b1_veth = cni_core::linux::veth::host_name(pod, "eth0");
    assert!(!pins(&nodes[1]).link(&b1_veth).exists());
    exec::check_list(
        &nodes[0].conflist(),
        &nodes[0].invocation(&plugin, &a1.1),
        &Default::default(),
        &a1.2,
    )
    .await
    .expect("CHECK a1");
    for n in &mut nodes {
        assert!(n.agent.stop(), "{}'s agent exits cleanly", n.name);
    }
}
