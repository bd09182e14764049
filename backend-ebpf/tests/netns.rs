//! The `ebpf` pod network against the real kernel (needs root; skips loudly without it).
//!
//! Each test builds its own namespaces (`cnkt-<test>-<pid>-…`): a "node" standing in for
//! the host (the network is given its handle, so nothing is attached to a device of the
//! root namespace) and pods. The pins go to a BPF filesystem of the test's own
//! ([`testkit::Bpffs`], unmounted on drop, also when the test fails): nothing is left on the
//! machine's `/sys/fs/bpf`.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use backend_ebpf::{Config, Counter, EbpfNetwork, Endpoint, program};
use cni_core::ipam::{Allocation, Attachment};
use cni_core::linux::{NetNs, routed::HOST_MAC, veth};
use cni_core::network::{Pod, PodNetwork};
use cni_core::spec::{CniResult, IpConfig};
use testkit::{Bpffs, Namespaces, ip, ip_json, netns_path};

/// One test's namespaces (dropped last) and BPF filesystem.
struct Lab {
    bpffs: Bpffs,
    ns: Namespaces,
    node: String,
}

impl Lab {
    fn new(tag: &str) -> Self {
        let ns = Namespaces::new(tag);
        let node = ns.add("node");
        ip(&node, &["link", "set", "lo", "up"]);
        Lab {
            bpffs: Bpffs::mount(tag),
            ns,
            node,
        }
    }

    fn network_name(&self) -> String {
        self.ns.name("net")
    }

    async fn network(&self) -> EbpfNetwork {
        let host = NetNs::named(&self.node).await.expect("open node netns");
        let config = Config {
            mtu: 1500,
            bpffs: self.bpffs.path().to_path_buf(),
        };
        EbpfNetwork::new(config, &self.network_name(), "node1", host).expect("ebpf network")
    }

    fn pod(&self, suffix: &str) -> (Pod, String) {
        let name = self.ns.add(suffix);
        let pod = Pod {
            attachment: Attachment::new(self.network_name(), name.clone(), "eth0"),
            netns: Some(netns_path(&name)),
        };
        (pod, name)
    }
}

fn allocation(address: &str) -> Allocation {
    Allocation {
        ips: vec![IpConfig {
            address: address.parse().unwrap(),
            gateway: None,
            interface: None,
        }],
        ..Allocation::default()
    }
}

fn host_veth(pod: &Pod) -> String {
    veth::host_name(&pod.attachment.container_id, &pod.attachment.ifname)
}

fn has_link(ns: &str, name: &str) -> bool {
    ip_json(ns, &["link", "show"])
        .iter()
        .any(|l| l["ifname"] == name)
}

/// Waits up to 5 s for the kernel to destroy the host end of a veth whose pod namespace
/// went away; panics when it is still there.
fn wait_gone(node: &str, veth: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while has_link(node, veth) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!has_link(node, veth), "{veth} outlived its pod's namespace");
}

/// `ip netns exec NS ping -c COUNT -i 0.2 -W 1 DST`.
fn ping(ns: &str, dst: Ipv4Addr, count: u32) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", ns, "ping", "-q", "-i", "0.2", "-W", "1", "-c",
        ])
        .arg(count.to_string())
        .arg(dst.to_string())
        .output()
        .expect("run ping")
        .status
        .success()
}

fn ipv4(result: &CniResult) -> Ipv4Addr {
    match result.ips[0].address.addr() {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => panic!("{a} is not IPv4"),
    }
}

fn redirected(network: &EbpfNetwork) -> u64 {
    network
        .pins()
        .read_counters()
        .expect("read counters")
        .expect("counters pinned")
        .get(Counter::RedirectPeer)
}

/// The program attached to the TCX ingress of the pod's host veth, as the kernel lists it.
async fn attached(lab: &Lab, pod: &Pod) -> Vec<(u32, String)> {
    let device = host_veth(pod);
    NetNs::named(&lab.node)
        .await
        .expect("open node netns")
        .run(move || program::tcx_programs(&device))
        .await
        .expect("netns thread")
        .expect("query tcx")
        .expect("this kernel has TCX")
}

/// The ids of the loaded programs named [`program::PROGRAM`].
fn loaded() -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some(program::PROGRAM))
        .map(|p| p.id())
        .collect()
}

fn root(test: &str) -> bool {
    if !testkit::root(test) {
        return false;
    }
    if !program::has_tcx() {
        testkit::skip(
            test,
            "the kernel has no TCX (Linux 6.6); the tc clsact path needs the VM",
        );
        return false;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_on_one_node_talk_through_redirect_peer() {
    if !root("two_pods_on_one_node_talk_through_redirect_peer") {
        return;
    }
    two_pods("ebpf-2p").await;
}

/// The same on Linux 6.1 (the VM's kernel), which has no TCX: the program goes on the
/// `clsact` ingress hook with tc, and runs interpreted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_linux_6_1_two_pods_talk_through_tc_clsact() {
    let test = "on_linux_6_1_two_pods_talk_through_tc_clsact";
    if !testkit::root(test) || !testkit::vm::in_vm_only(test, "it needs a kernel without TCX") {
        return;
    }
    assert!(!program::has_tcx(), "the VM's kernel has no TCX");
    two_pods("ebpf-61").await;
}

/// Two pods on one node ping each other through the program; DEL removes one's entry, link
/// and veth (its program is unloaded), twice; the other stays.
async fn two_pods(tag: &str) {
    let lab = Lab::new(tag);
    let network = lab.network().await;
    let (a, a_ns) = lab.pod("a");
    let (b, b_ns) = lab.pod("b");
    let ra = network
        .add(&a, &allocation("10.244.7.2/26"))
        .await
        .expect("ADD a");
    let rb = network
        .add(&b, &allocation("10.244.7.3/26"))
        .await
        .expect("ADD b");
    let (ip_a, ip_b) = (ipv4(&ra), ipv4(&rb));
    network.check(&a, &ra).await.expect("CHECK a");
    network.check(&b, &rb).await.expect("CHECK b");

    // The pins and the entries, as ADD wrote them.
    let pins = network.pins();
    assert!(pins.dir().starts_with(lab.bpffs.path()));
    for pod in [&a, &b] {
        let pinned = pins.link(&host_veth(pod)).exists();
        assert_eq!(
            pinned,
            program::has_tcx(),
            "whether {pod:?}'s TCX link is pinned"
        );
    }
    let endpoints = pins.open_endpoints().unwrap().expect("endpoint map pinned");
    let veth_b = &ip_json(&lab.node, &["link", "show", "dev", &host_veth(&b)])[0];
    let pod_b = &ip_json(&b_ns, &["link", "show", "dev", "eth0"])[0];
    let mac = |v: &serde_json::Value| -> [u8; 6] {
        let bytes: Vec<u8> = v["address"]
            .as_str()
            .unwrap()
            .split(':')
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        bytes.try_into().unwrap()
    };
    assert_eq!(
        endpoints.get(ip_b).unwrap(),
        Some(Endpoint {
            ifindex: veth_b["ifindex"].as_u64().unwrap() as u32,
            pod_mac: mac(pod_b),
            host_mac: HOST_MAC,
        })
    );
    assert_eq!(endpoints.list().unwrap().len(), 2);
    // The program passed the verifier and sits on each host veth's ingress, as the kernel
    // lists it: TCX, or a tc filter on clsact.
    let program_b = if program::has_tcx() {
        let on_b = attached(&lab, &b).await;
        let id = on_b
            .iter()
            .find(|(_, name)| name == program::PROGRAM)
            .map(|(id, _)| *id);
        Some(id.unwrap_or_else(|| panic!("{} not on b's veth: {on_b:?}", program::PROGRAM)))
    } else {
        let filters = testkit::run_in(
            "tc",
            &lab.node,
            &["filter", "show", "dev", &host_veth(&b), "ingress"],
        );
        // (aya finds program names unsupported on the VM's kernel: the name stays empty.)
        assert!(
            filters.contains(" bpf ") && filters.contains("direct-action"),
            "{filters}"
        );
        None
    };

    // Pings both ways, every packet through bpf_redirect_peer.
    let before = redirected(&network);
    assert!(ping(&a_ns, ip_b, 3), "a pings b");
    assert!(ping(&b_ns, ip_a, 3), "b pings a");
    let after = redirected(&network);
    assert!(
        after - before >= 12,
        "12 echo requests and replies, {} redirected",
        after - before
    );

    // One hop, as through a router: the reply left b with TTL 64 and the program took one
    // off (with the header checksum fixed, or a would have dropped it).
    let out = testkit::exec_in(&a_ns, &["ping", "-c1", "-W1", &ip_b.to_string()]);
    assert!(out.contains("ttl=63"), "{out}");

    // Without the node's host routes the pods still reach each other: the routing table is
    // not on that path.
    for r in [ip_a, ip_b] {
        ip(&lab.node, &["route", "del", &format!("{r}/32")]);
    }
    let before = redirected(&network);
    assert!(ping(&a_ns, ip_b, 2), "a pings b without host routes");
    assert!(redirected(&network) - before >= 4);
    for (r, pod) in [(ip_a, &a), (ip_b, &b)] {
        let dst = format!("{r}/32");
        ip(
            &lab.node,
            &[
                "route",
                "add",
                &dst,
                "dev",
                &host_veth(pod),
                "scope",
                "link",
            ],
        );
    }

    // DEL removes b's entry, its pinned link and its veth: its program is unloaded. Twice
    // is fine.
    network.del(&b, Some(&rb)).await.expect("DEL b");
    assert_eq!(endpoints.get(ip_b).unwrap(), None);
    assert!(endpoints.get(ip_a).unwrap().is_some(), "a's entry stays");
    assert!(!pins.link(&host_veth(&b)).exists());
    assert!(!has_link(&lab.node, &host_veth(&b)));
    let deadline = Instant::now() + Duration::from_secs(5);
    if let Some(id) = program_b {
        while loaded().contains(&id) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!loaded().contains(&id), "b's program is unloaded");
    }
    network.del(&b, Some(&rb)).await.expect("DEL b again");
    network
        .del(&b, None)
        .await
        .expect("DEL b without prevResult");
    assert!(!ping(&a_ns, ip_b, 1), "b is gone");
    network.check(&a, &ra).await.expect("CHECK a after b's DEL");

    // CHECK notices a missing entry, and a program gone from the host veth.
    let mut writable = pins.open_endpoints().unwrap().unwrap();
    let entry = writable.get(ip_a).unwrap().unwrap();
    writable.remove(ip_a).unwrap();
    let err = network
        .check(&a, &ra)
        .await
        .expect_err("CHECK without a's entry");
    assert_eq!(err.code().0, 101, "{err}");
    assert!(err.to_string().contains(&ip_a.to_string()), "{err}");
    writable.insert(ip_a, entry).unwrap();
    network
        .check(&a, &ra)
        .await
        .expect("CHECK with a's entry back");
    if program::has_tcx() {
        assert!(
            pins.unpin_link(&host_veth(&a)).unwrap(),
            "a's link was pinned"
        );
    } else {
        testkit::run_in(
            "tc",
            &lab.node,
            &["filter", "del", "dev", &host_veth(&a), "ingress"],
        );
    }
    let err = network
        .check(&a, &ra)
        .await
        .expect_err("CHECK without a's program");
    assert_eq!(err.code().0, 101, "{err}");
    assert!(err.to_string().contains("ingress of"), "{err}");

    network.del(&a, Some(&ra)).await.expect("DEL a");
    assert!(endpoints.list().unwrap().is_empty());
    pins.remove_all().expect("remove pins");
    assert!(!pins.dir().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn del_after_the_netns_is_gone() {
    if !root("del_after_the_netns_is_gone") {
        return;
    }
    let lab = Lab::new("ebpf-gone");
    let network = lab.network().await;
    let (a, a_ns) = lab.pod("a");
    let ra = network
        .add(&a, &allocation("10.244.8.2/32"))
        .await
        .expect("ADD");
    lab.ns.remove(&a_ns);
    // The host end went with the pod's namespace; its entry and pinned link are stale.
    wait_gone(&lab.node, &host_veth(&a));
    let endpoints = network.pins().open_endpoints().unwrap().unwrap();
    assert!(endpoints.get(ipv4(&ra)).unwrap().is_some());
    network
        .del(&a, Some(&ra))
        .await
        .expect("DEL with the netns gone");
    assert_eq!(endpoints.get(ipv4(&ra)).unwrap(), None);
    assert!(!network.pins().link(&host_veth(&a)).exists());
    network.del(&a, Some(&ra)).await.expect("DEL again");
}

/// A pod whose namespace went away and that was never DEL'd: the cleanup finds its entry
/// and its pinned link stale, and leaves the living pod's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_stale_takes_only_what_lost_its_veth() {
    if !root("remove_stale_takes_only_what_lost_its_veth") {
        return;
    }
    let lab = Lab::new("ebpf-stale");
    let network = lab.network().await;
    let (a, _) = lab.pod("a");
    let (b, b_ns) = lab.pod("b");
    let ra = network
        .add(&a, &allocation("10.244.11.2/32"))
        .await
        .expect("ADD a");
    let rb = network
        .add(&b, &allocation("10.244.11.3/32"))
        .await
        .expect("ADD b");
    assert_eq!(
        network.remove_stale().await.unwrap(),
        backend_ebpf::Stale::default()
    );
    lab.ns.remove(&b_ns);
    wait_gone(&lab.node, &host_veth(&b));
    let stale = network.remove_stale().await.unwrap();
    assert_eq!(stale.entries, vec![ipv4(&rb)]);
    assert_eq!(stale.links, vec![host_veth(&b)]);
    let endpoints = network.pins().open_endpoints().unwrap().unwrap();
    assert_eq!(endpoints.get(ipv4(&rb)).unwrap(), None);
    assert!(endpoints.get(ipv4(&ra)).unwrap().is_some());
    network.check(&a, &ra).await.expect("a is untouched");
    assert_eq!(
        network.remove_stale().await.unwrap(),
        backend_ebpf::Stale::default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_add_leaves_nothing() {
    if !root("failed_add_leaves_nothing") {
        return;
    }
    let lab = Lab::new("ebpf-fail");
    let network = lab.network().await;
    // A map of the wrong shape where the endpoint map goes: the verifier refuses the
    // program (its entries are 16 bytes, this map's 8), after the veth was made.
    let pins = network.pins();
    std::fs::create_dir_all(pins.dir()).unwrap();
    let wrong =
        aya::maps::HashMap::<aya::maps::MapData, u32, u64>::create(16, 0).expect("create a map");
    wrong.pin(pins.endpoints()).expect("pin it");
    let (a, a_ns) = lab.pod("a");
    let err = network
        .add(&a, &allocation("10.244.9.2/32"))
        .await
        .expect_err("ADD must fail");
    assert_eq!(err.code().0, 101, "{err}");
    assert!(
        !has_link(&lab.node, &host_veth(&a)),
        "the host veth is gone"
    );
    assert!(!has_link(&a_ns, "eth0"), "the pod's interface is gone");
    assert!(!pins.link(&host_veth(&a)).exists(), "no pinned link");
    let wrong = aya::maps::MapData::from_pin(pins.endpoints()).expect("the map is still pinned");
    let wrong =
        aya::maps::HashMap::<_, u32, u64>::try_from(aya::maps::Map::from_map_data(wrong).unwrap())
            .unwrap();
    assert_eq!(wrong.keys().count(), 0, "nothing was written into it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_is_not_bpffs_is_refused_before_anything_is_made() {
    if !root("a_path_that_is_not_bpffs_is_refused_before_anything_is_made") {
        return;
    }
    let lab = Lab::new("ebpf-nofs");
    let plain = tempfile::tempdir().unwrap();
    let host = NetNs::named(&lab.node).await.unwrap();
    let config = Config {
        mtu: 1500,
        bpffs: plain.path().to_path_buf(),
    };
    let network = EbpfNetwork::new(config, &lab.network_name(), "node1", host).unwrap();
    let (a, a_ns) = lab.pod("a");
    let err = network
        .add(&a, &allocation("10.244.9.2/32"))
        .await
        .expect_err("not a BPF filesystem");
    assert_eq!(err.code().0, 7, "{err}");
    assert!(!has_link(&a_ns, "eth0"));
    assert_eq!(std::fs::read_dir(plain.path()).unwrap().count(), 0);
}

/// Plugins run side by side: concurrent ADDs on a fresh BPF filesystem end up with one
/// endpoint map and every pod gets its entry and its program.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_adds_share_one_endpoint_map() {
    if !root("racing_adds_share_one_endpoint_map") {
        return;
    }
    let lab = Lab::new("ebpf-race");
    let pods: Vec<(Pod, String)> = (0..4).map(|i| lab.pod(&format!("p{i}"))).collect();
    // One network per pod, as one plugin process each.
    let mut networks = Vec::new();
    for _ in &pods {
        networks.push(lab.network().await);
    }
    let adds = pods
        .iter()
        .zip(&networks)
        .enumerate()
        .map(|(i, ((pod, _), network))| {
            let alloc = allocation(&format!("10.244.10.{}/32", i + 2));
            async move { network.add(pod, &alloc).await }
        });
    let results: Vec<CniResult> = futures::future::join_all(adds)
        .await
        .into_iter()
        .map(|r| r.expect("ADD"))
        .collect();
    let endpoints = networks[0].pins().open_endpoints().unwrap().unwrap();
    assert_eq!(endpoints.list().unwrap().len(), 4);
    for ((pod, _), result) in pods.iter().zip(&results) {
        networks[0].check(pod, result).await.expect("CHECK");
    }
    assert!(ping(&pods[0].1, ipv4(&results[3]), 1), "p0 pings p3");
    for ((pod, _), result) in pods.iter().zip(&results) {
        networks[0].del(pod, Some(result)).await.expect("DEL");
    }
    assert!(endpoints.list().unwrap().is_empty());
}
