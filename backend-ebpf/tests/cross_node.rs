//! The `ebpf` routing mode against the real kernel (needs root; skips loudly without it):
//! two nodes on an underlay segment, each with its collect_md VXLAN device, programs and
//! pods of the `ebpf` pod network.
//!
//! Everything lives in the test's own namespaces (`cnkt-<tag>-<pid>-…`): a switch (the
//! underlay bridge), the nodes, the pods. The pins go to a BPF filesystem of the test's own
//! ([`testkit::Bpffs`]).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use backend_ebpf::routing::{DEFAULT_DEVICE, device_mac};
use backend_ebpf::{
    Config, Counter, EbpfNetwork, EbpfRouting, Pins, RoutingConfig, Tunnel, program,
};
use cni_core::ipam::{Allocation, Attachment};
use cni_core::linux::{NetNs, veth};
use cni_core::network::{Pod, PodNetwork};
use cni_core::registry::NodeRecord;
use cni_core::routing::{CrossNodeRouting, LocalNode};
use cni_core::spec::{CniResult, IpConfig};
use ipnet::Ipv4Net;
use testkit::{Bpffs, Namespaces, Segment, ip, ip_json, netns_path};

/// One node: its namespace, what the agent knows of it, its routing mode and pod network.
struct Node {
    ns: String,
    local: LocalNode,
    routing: EbpfRouting,
    pods: EbpfNetwork,
}

impl Node {
    fn record(&self) -> NodeRecord {
        NodeRecord {
            name: self.local.name.clone(),
            address: self.local.address,
            prefix_len: self.local.prefix_len,
            blocks: self.local.blocks.clone(),
            backend: self.routing.node_data(),
        }
    }

    fn pins(&self) -> &Pins {
        self.pods.pins()
    }

    fn remotes(&self) -> BTreeMap<Ipv4Net, Ipv4Addr> {
        self.pins()
            .open_remotes()
            .expect("open remotes")
            .expect("remotes pinned")
            .list()
            .expect("list remotes")
            .into_iter()
            .collect()
    }

    fn counter(&self, c: Counter) -> u64 {
        self.pins()
            .read_counters()
            .expect("read counters")
            .expect("counters pinned")
            .get(c)
    }
}

/// The test's namespaces (dropped last), BPF filesystem and underlay switch.
struct Cluster {
    bpffs: Bpffs,
    sw: Segment,
    ns: Namespaces,
}

impl Cluster {
    fn new(tag: &str) -> Self {
        let ns = Namespaces::new(tag);
        Cluster {
            bpffs: Bpffs::mount(tag),
            sw: Segment::new(&ns, "sw"),
            ns,
        }
    }

    fn network(&self) -> String {
        self.ns.name("net")
    }

    /// Node `n` (1, 2…): `eth0` 192.168.70.(10+n)/24 on the switch, block 10.246.n.0/26.
    async fn node(&self, n: u8) -> Node {
        let name = format!("node{n}");
        let ns = self.ns.add(&name);
        ip(&ns, &["link", "set", "lo", "up"]);
        let address = format!("192.168.70.{}", 10 + n);
        self.sw.plug(&ns, "eth0", &format!("{address}/24"));
        testkit::exec_in(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let local = LocalNode {
            name: name.clone(),
            address: address.parse().unwrap(),
            prefix_len: 24,
            interface: "eth0".into(),
            underlay_mtu: 1500,
            blocks: vec![format!("10.246.{n}.0/26").parse().unwrap()],
            tunnel_address: None,
        };
        let mut node = Node {
            routing: self.routing(&ns).await,
            pods: self.pods(&ns, &name).await,
            ns,
            local,
        };
        node.routing.init(&node.local).await.expect("init");
        node
    }

    /// A routing mode for the node in namespace `ns` (a fresh one: an agent started anew).
    async fn routing(&self, ns: &str) -> EbpfRouting {
        EbpfRouting::new(
            RoutingConfig::default(),
            self.bpffs.path().to_path_buf(),
            &self.network(),
            NetNs::named(ns).await.expect("open node"),
        )
        .expect("routing")
    }

    async fn pods(&self, ns: &str, node: &str) -> EbpfNetwork {
        let config = Config {
            mtu: 1450,
            bpffs: self.bpffs.path().to_path_buf(),
        };
        EbpfNetwork::new(
            config,
            &self.network(),
            node,
            NetNs::named(ns).await.expect("open node"),
        )
        .expect("pod network")
    }

    /// Pod `suffix` on `node` with `address`; returns the pod, its namespace and ADD's result.
    async fn pod(&self, node: &Node, suffix: &str, address: &str) -> (Pod, String, CniResult) {
        let name = self.ns.add(suffix);
        let pod = Pod {
            attachment: Attachment::new(self.network(), name.clone(), "eth0"),
            netns: Some(netns_path(&name)),
        };
        let allocation = Allocation {
            ips: vec![IpConfig {
                address: address.parse().unwrap(),
                gateway: None,
                interface: None,
            }],
            ..Allocation::default()
        };
        let result = node.pods.add(&pod, &allocation).await.expect("ADD");
        (pod, name, result)
    }
}

fn root(test: &str) -> bool {
    if !testkit::root(test) {
        return false;
    }
    for tool in ["ping", "tcpdump"] {
        if !testkit::on_path(tool) {
            testkit::skip(test, format_args!("needs {tool} (scripts/deps.sh)"));
            return false;
        }
    }
    true
}

/// `ping -c COUNT -i 0.2 -W 1 DST` from `ns`, with extra arguments.
fn ping(ns: &str, dst: &str, count: u32, extra: &[&str]) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", ns, "ping", "-q", "-i", "0.2", "-W", "1", "-c",
        ])
        .arg(count.to_string())
        .args(extra)
        .arg(dst)
        .output()
        .expect("run ping")
        .status
        .success()
}

fn has_link(ns: &str, name: &str) -> bool {
    ip_json(ns, &["link", "show"])
        .iter()
        .any(|l| l["ifname"] == name)
}

/// `(destination, gateway, device)` of the routes with cnikit's protocol (107).
fn cnikit_routes(ns: &str) -> Vec<(String, String, String)> {
    ip_json(ns, &["route", "show", "proto", "107"])
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            (s("dst"), s("gateway"), s("dev"))
        })
        .collect()
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// The names of the programs on `device`'s TCX hook `direction` (the kernel's list).
async fn tcx_names(ns: &str, device: &str, direction: aya::programs::TcAttachType) -> Vec<String> {
    let device = device.to_owned();
    NetNs::named(ns)
        .await
        .unwrap()
        .run(move || program::tcx_programs_on(&device, direction))
        .await
        .expect("netns thread")
        .expect("query tcx")
        .expect("this kernel has TCX")
        .into_iter()
        .map(|(_, name)| name)
        .collect()
}

/// Runs tcpdump on the underlay bridge while `traffic` runs; returns what it printed.
fn capture_underlay(switch: &str, traffic: impl FnOnce()) -> String {
    let dump = Command::new("ip")
        .args(["netns", "exec", switch, "tcpdump", "-l", "-nn", "-i", "br0"])
        .args(["-c", "4", "udp", "port", "4789"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tcpdump");
    // tcpdump says "listening on" on stderr once its socket is open.
    let pid = dump.id();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
        if fds > 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    traffic();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(5));
        // Our own tcpdump, by its PID, if it has not seen its 4 packets by then.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    });
    let out = dump.wait_with_output().expect("tcpdump output");
    drop(watchdog);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_on_two_nodes_talk_through_the_collect_md_tunnel() {
    let test = "pods_on_two_nodes_talk_through_the_collect_md_tunnel";
    if !root(test) {
        return;
    }
    if !program::has_tcx() {
        testkit::skip(
            test,
            "the kernel has no TCX; the VM variant covers tc clsact",
        );
        return;
    }
    two_nodes("ebx2").await;
}

/// The same on Linux 6.1 (the VM's kernel, no TCX, programs interpreted): the programs
/// pass its verifier and go on `clsact` with tc.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_linux_6_1_pods_on_two_nodes_talk_through_the_tunnel() {
    let test = "on_linux_6_1_pods_on_two_nodes_talk_through_the_tunnel";
    if !root(test) || !testkit::vm::in_vm_only(test, "it needs a kernel without TCX") {
        return;
    }
    assert!(!program::has_tcx(), "the VM's kernel has no TCX");
    two_nodes("ebx61").await;
}

async fn two_nodes(tag: &str) {
    let c = Cluster::new(tag);
    let mut n1 = c.node(1).await;
    let mut n2 = c.node(2).await;
    let (_, a1, _) = c.pod(&n1, "a1", "10.246.1.2/32").await;
    let (_, a2, _) = c.pod(&n1, "a2", "10.246.1.3/32").await;
    let (_, b1, _) = c.pod(&n2, "b1", "10.246.2.2/32").await;

    // The device: collect_md, no VNI of its own, its node's MAC, MTU underlay − 50.
    let dev = &ip_json(&n1.ns, &["-d", "link", "show", "dev", DEFAULT_DEVICE])[0];
    assert_eq!(dev["linkinfo"]["info_kind"], "vxlan");
    assert_eq!(dev["linkinfo"]["info_data"]["external"], true, "{dev}");
    assert_eq!(dev["linkinfo"]["info_data"]["port"], 4789);
    assert_eq!(dev["mtu"], 1450);
    assert_eq!(
        dev["address"],
        cni_core::spec::HwAddr::from(device_mac("node1")).to_string()
    );
    assert_eq!(
        n1.pins().read_tunnel().unwrap(),
        Some(Tunnel {
            ifindex: n1.routing.ifindex().unwrap(),
            vni: 1
        })
    );
    if program::has_tcx() {
        use aya::programs::TcAttachType::{Egress, Ingress};
        assert_eq!(
            tcx_names(&n1.ns, DEFAULT_DEVICE, Ingress).await,
            [program::FROM_TUNNEL]
        );
        assert_eq!(
            tcx_names(&n1.ns, DEFAULT_DEVICE, Egress).await,
            [program::TO_TUNNEL]
        );
    } else {
        for hook in ["ingress", "egress"] {
            let filters = testkit::run_in(
                "tc",
                &n1.ns,
                &["filter", "show", "dev", DEFAULT_DEVICE, hook],
            );
            assert!(filters.contains("direct-action"), "{hook}: {filters}");
        }
    }

    // Before the peers are known, a remote pod is out of reach.
    assert!(!ping(&a1, "10.246.2.2", 1, &[]));

    let records = vec![n1.record(), n2.record()];
    let r1 = n1.routing.reconcile(&records).await.expect("reconcile 1");
    let r2 = n2.routing.reconcile(&records).await.expect("reconcile 2");
    // One neighbour entry, one route, one LPM entry.
    assert_eq!((r1.writes, r1.routed), (3, 1), "{r1:?}");
    assert_eq!((r2.writes, r2.routed), (3, 1), "{r2:?}");
    assert_eq!(
        n1.remotes(),
        BTreeMap::from([(net("10.246.2.0/26"), v4("192.168.70.12"))])
    );
    assert_eq!(
        n2.remotes(),
        BTreeMap::from([(net("10.246.1.0/26"), v4("192.168.70.11"))])
    );
    assert_eq!(
        cnikit_routes(&n1.ns),
        [(
            "10.246.2.0/26".into(),
            "192.168.70.12".into(),
            DEFAULT_DEVICE.into()
        )]
    );
    // Level-triggered: nothing to do a second time.
    let again = n1.routing.reconcile(&records).await.unwrap();
    assert_eq!(again.writes, 0, "{again:?}");

    // Pods ping across, through the programs at both ends, and the underlay carries VXLAN
    // (UDP 4789) between the nodes' addresses.
    let before = (
        n1.counter(Counter::RedirectTunnel),
        n2.counter(Counter::TunnelRedirectPeer),
    );
    let mut pinged = false;
    let seen = capture_underlay(c.sw.name(), || {
        pinged = ping(&a1, "10.246.2.2", 3, &[]);
    });
    assert!(pinged, "pod a1 pings pod b1 on the other node");
    assert!(
        seen.contains("192.168.70.11.") && seen.contains("> 192.168.70.12.4789: VXLAN"),
        "{seen}"
    );
    assert!(seen.contains("vni 1"), "{seen}");
    assert!(
        n1.counter(Counter::RedirectTunnel) - before.0 >= 3,
        "from_pod sent the requests into the tunnel"
    );
    assert!(
        n2.counter(Counter::TunnelRedirectPeer) - before.1 >= 3,
        "from_tunnel delivered them by bpf_redirect_peer"
    );
    assert!(ping(&b1, "10.246.1.3", 2, &[]), "b1 pings a2");
    assert!(
        ping(&a2, "10.246.1.2", 2, &[]),
        "a2 pings a1 on its own node"
    );
    // A full-size pod packet (1450 bytes, DF) fits the tunnel over the 1500-byte underlay.
    assert!(ping(&a1, "10.246.2.2", 1, &["-M", "do", "-s", "1422"]));
    // Two hops (one per node), as through routers.
    let out = testkit::exec_in(&a1, &["ping", "-c1", "-W1", "10.246.2.2"]);
    assert!(out.contains("ttl=62"), "{out}");

    // The node's own stack reaches a remote pod through the tunnel (to_tunnel sets the key),
    // and a pod reaches the other node itself (outside the pool: the stack routes it).
    let stack = n2.counter(Counter::StackToTunnel);
    assert!(ping(&n1.ns, "10.246.2.2", 2, &[]), "node1 pings b1");
    assert!(ping(&b1, "192.168.70.11", 2, &[]), "b1 pings node1");
    assert!(ping(&a1, "192.168.70.12", 2, &[]), "a1 pings node2");
    assert!(
        n2.counter(Counter::StackToTunnel) > stack,
        "node2 answered node1's pings through to_tunnel"
    );

    // The peer leaves: its LPM entry, route and neighbour entry go; its pods are out of
    // reach.
    let gone = n1.routing.reconcile(&[n1.record()]).await.unwrap();
    assert_eq!((gone.writes, gone.routed), (3, 0), "{gone:?}");
    assert!(n1.remotes().is_empty());
    assert!(cnikit_routes(&n1.ns).is_empty());
    assert!(!ping(&a1, "10.246.2.2", 1, &[]));
    n1.routing.reconcile(&records).await.unwrap();
    assert!(ping(&a1, "10.246.2.2", 1, &[]), "back with the peer");

    // Teardown: the device, the routes, the tunnel links and LPM entries go; the pod maps
    // stay for the pods. Twice is fine.
    n1.routing.teardown().await.expect("teardown");
    n1.routing.teardown().await.expect("teardown again");
    assert!(!has_link(&n1.ns, DEFAULT_DEVICE));
    assert!(cnikit_routes(&n1.ns).is_empty());
    assert!(n1.remotes().is_empty());
    assert_eq!(n1.pins().read_tunnel().unwrap(), Some(Tunnel::default()));
    assert!(!n1.pins().tunnel_link("ingress").exists());
    assert!(!n1.pins().tunnel_link("egress").exists());
    assert!(n1.pins().open_endpoints().unwrap().is_some());
    // Without its tunnel, node 1's pods still reach each other, and the remote block
    // falls through to the stack (which has no route for it).
    assert!(ping(&a2, "10.246.1.2", 1, &[]));
    assert!(!ping(&a1, "10.246.2.2", 1, &[]));
    n2.routing.teardown().await.expect("teardown 2");
}

/// The agent restarts (a new process with the same pins, the device kept): pods keep
/// talking across throughout, and the maps end up exactly as they were; a pod deleted
/// while the agent was down leaves no entry once the new agent has reconciled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_keeps_traffic_and_cleans_what_gone_pods_left() {
    let test = "agent_restart_keeps_traffic_and_cleans_what_gone_pods_left";
    if !root(test) {
        return;
    }
    if !program::has_tcx() {
        testkit::skip(test, "the kernel has no TCX");
        return;
    }
    let c = Cluster::new("ebxr");
    let mut n1 = c.node(1).await;
    let mut n2 = c.node(2).await;
    let (_, a1, _) = c.pod(&n1, "a1", "10.246.1.2/32").await;
    let (_, a2, _) = c.pod(&n1, "a2", "10.246.1.3/32").await;
    let (_, _b1, _) = c.pod(&n2, "b1", "10.246.2.2/32").await;
    let records = vec![n1.record(), n2.record()];
    n1.routing.reconcile(&records).await.unwrap();
    n2.routing.reconcile(&records).await.unwrap();
    assert!(ping(&a1, "10.246.2.2", 1, &[]));
    let remotes = n1.remotes();
    let entries = n1.pins().open_endpoints().unwrap().unwrap().list().unwrap();

    // 60 pings at 20 ms while node 1's agent goes away (keeping what it made, as
    // `agent.keepOnExit` does) and a new one starts; meanwhile pod a2 goes away.
    let pinger = std::thread::spawn({
        let a1 = a1.clone();
        move || {
            testkit::exec_in(
                &a1,
                &[
                    "ping",
                    "-q",
                    "-i",
                    "0.02",
                    "-c",
                    "60",
                    "-W",
                    "1",
                    "10.246.2.2",
                ],
            )
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    drop(std::mem::replace(&mut n1.routing, c.routing(&n1.ns).await));
    c.ns.remove(&a2);
    let veth_a2 = veth::host_name(&a2, "eth0");
    let deadline = Instant::now() + Duration::from_secs(5);
    while has_link(&n1.ns, &veth_a2) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !has_link(&n1.ns, &veth_a2),
        "a2's veth went with its namespace"
    );
    n1.routing
        .init(&n1.local)
        .await
        .expect("init after restart");
    let report = n1.routing.reconcile(&records).await.expect("reconcile");
    let out = pinger.join().expect("pinger");
    assert!(out.contains(" 0% packet loss"), "{out}");

    // Nothing lost, nothing doubled: the same LPM entries, and only the gone pod's
    // endpoint entry (and pinned link) removed.
    assert_eq!(n1.remotes(), remotes);
    let now = n1.pins().open_endpoints().unwrap().unwrap().list().unwrap();
    let a2_ip = v4("10.246.1.3");
    let expected: Vec<_> = entries
        .iter()
        .filter(|(ip, _)| *ip != a2_ip)
        .copied()
        .collect();
    assert_eq!(now, expected);
    assert!(!n1.pins().link(&veth_a2).exists());
    assert_eq!(report.writes, 2, "the entry and the link of a2: {report:?}");
    use aya::programs::TcAttachType::{Egress, Ingress};
    assert_eq!(
        tcx_names(&n1.ns, DEFAULT_DEVICE, Ingress).await,
        [program::FROM_TUNNEL],
        "the new agent's program replaced the old one"
    );
    assert_eq!(
        tcx_names(&n1.ns, DEFAULT_DEVICE, Egress).await,
        [program::TO_TUNNEL]
    );
    assert!(ping(&a1, "10.246.2.2", 2, &[]), "still talking");
    n1.routing.teardown().await.unwrap();
    n2.routing.teardown().await.unwrap();
}
