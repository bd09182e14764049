//! Benchmark: single-stream TCP throughput (iperf3) from a pod on one node to a pod on
//! another, through the path cnikit builds, against two baselines built in the same run:
//!
//! - **cnikit**: two node namespaces on an underlay bridge, the real `cnikit-agent` in each
//!   (host-gw, vxlan or ipip), pods plugged in by the real `cnikit` plugin exec'd as a runtime does
//!   (in the node's namespace, with `CNI_NETNS` the pod's), MTU as the agent computes it;
//! - **hand-built**: the same path (pod veth → node → underlay bridge → node → pod) made
//!   with `ip` and `bridge` commands as a careful admin would: the same pod network shape
//!   (routed: /32 pod address, gateway 169.254.1.1 with a permanent neighbour entry, proxy
//!   ARP, host route; or bridge with netfilter calls off, the gateway on the bridge), MTU
//!   1500 for host-gw; for vxlan a VXLAN device (VNI 1, port 4789, nolearning) with MTU 1450,
//!   static neighbour, FDB entry and `onlink` route per peer, and pod MTU 1450; for ipip an
//!   IPIP device (`local` the node's address, `dev eth0`, `ttl inherit pmtudisc`) with MTU
//!   1480, a /32 address, an `onlink` route per peer via its underlay address, and pod MTU
//!   1480;
//! - **plain veth**: one veth pair between two namespaces, the machine's limit.
//!
//! The runs alternate (cnikit, hand-built, plain, cnikit, …; each cycle starts one path
//! later), several seconds each, and the cycle repeats; printed are the medians and the
//! ratios cnikit / hand-built (the goal is ≥ 0.95: the configuration costs nothing) and
//! each / plain veth. `CNIKIT_BENCH_PAUSE=SECONDS` holds the namespaces that long before the
//! measurements, to inspect them (`ip netns list | grep cnkb-tput`).
//!
//! Needs root and iperf3. Everything happens in namespaces the benchmark creates and removes,
//! also on failure or ctrl-c. ipip needs a kernel with the ipip module loaded: where the
//! machine's has none, the benchmark refuses `--mode ipip` (loading it would add `tunl0` to
//! the machine's own namespace); run it inside the test VM (one CPU: compare the ratios, not
//! the figures, with the other modes').
//!
//! ```text
//! cargo build --release --examples
//! sudo target/release/examples/bench_throughput --seconds 5 --repeats 3
//! sudo scripts/vm.sh --mem 2G -- target/release/examples/bench_throughput --mode ipip
//! ```

#[path = "bench_support/mod.rs"]
mod support;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use cni_core::exec::Invocation;
use cni_core::linux::{NetNs, route};
use cni_core::spec::ConfList;
use serde_json::{Value, json};
use support::{Lab, Node, Stats, ip_in, ns_path, sysctl_in};

#[derive(Parser)]
struct Args {
    /// Routing modes to measure (host-gw, vxlan, ipip).
    #[arg(long, alias = "mode", value_delimiter = ',', default_value = "host-gw,vxlan",
          value_parser = ["host-gw", "vxlan", "ipip"])]
    modes: Vec<String>,
    /// Pod network of the cnikit path (and the shape of the hand-built one).
    #[arg(long, default_value = "routed", value_parser = ["routed", "bridge"])]
    pod_network: String,
    /// Seconds of each iperf3 run (one more second is omitted as TCP warm-up).
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Cycles of (cnikit, hand-built, plain veth).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Print every run.
    #[arg(long)]
    verbose: bool,
}

const IPERF_PORT: &str = "5201";
/// The host veth's MAC of the routed pod network, as cnikit and Calico set it.
const ROUTED_HOST_MAC: &str = "ee:ee:ee:ee:ee:ee";

/// One pod-to-pod path: the client's namespace, the server's namespace and address.
struct PathUnderTest {
    name: &'static str,
    client: String,
    server: String,
    server_ip: IpAddr,
    mtu: u32,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.seconds >= 1 && args.repeats >= 1,
        "--seconds and --repeats must be at least 1"
    );
    support::run("iperf3", &["--version"]).context("iperf3 is needed (apt-get install iperf3)")?;
    let agent = support::binary("cnikit-agent")?;
    let plugin = support::binary("cnikit")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        tokio::select! {
            result = run(&args, &agent, &plugin) => result,
            () = support::interrupted() => bail!("interrupted; cleaned up"),
        }
    })
}

async fn run(args: &Args, agent: &Path, plugin: &Path) -> Result<()> {
    // Making an ipip device loads the module, which adds tunl0 to the machine's own
    // namespace: only where it is loaded already, or in the test VM.
    ensure!(
        !args.modes.iter().any(|m| m == "ipip") || testkit::vm::kernel_has_link_kind("ipip"),
        "--mode ipip needs the kernel's ipip module, and this kernel has none loaded (loading \
         it would add tunl0 to the machine's own namespace): run it in the test VM, \
         sudo scripts/vm.sh --mem 2G -- target/release/examples/bench_throughput --mode ipip"
    );
    let mut rows = Vec::new();
    for mode in &args.modes {
        eprintln!(
            "{mode}: {} cycles of {} s runs…",
            args.repeats, args.seconds
        );
        rows.push((mode.clone(), measure(args, agent, plugin, mode).await?));
    }
    println!(
        "Single-stream TCP (iperf3, {} s per run, {} alternated cycles), pod on one node to a \
         pod on another; pod network {}",
        args.seconds, args.repeats, args.pod_network
    );
    println!(
        "{:<8} | {:>17} {:>17} {:>17} | {:>12} {:>12} {:>12}",
        "mode",
        "cnikit Gbit/s",
        "hand-built Gbit/s",
        "plain veth Gbit/s",
        "cnikit/hand",
        "cnikit/plain",
        "hand/plain"
    );
    for (mode, r) in &rows {
        let (o, h, p) = (
            Stats::of(&r.ours).median,
            Stats::of(&r.hand).median,
            Stats::of(&r.plain).median,
        );
        println!(
            "{:<8} | {:>12.2} {:>4} {:>12.2} {:>4} {:>12.2} {:>4} | {:>12.3} {:>12.3} {:>12.3}",
            mode,
            o,
            r.mtus.0,
            h,
            r.mtus.1,
            p,
            r.mtus.2,
            o / h,
            o / p,
            h / p
        );
    }
    println!("(the number after each figure is the pod MTU of that path)");
    for (mode, r) in &rows {
        let ratio = Stats::of(&r.ours).median / Stats::of(&r.hand).median;
        let paired: Vec<f64> = r.ours.iter().zip(&r.hand).map(|(o, h)| o / h).collect();
        let spread = |v: &[f64]| {
            let s = Stats::of(v);
            format!("{:.2}..{:.2}", s.min, s.max)
        };
        println!(
            "{mode}: cnikit/hand-built {ratio:.3} (goal >= 0.95: {}; median of the per-cycle \
             ratios {:.3}); ranges cnikit {}, hand {}, plain {}",
            if ratio >= 0.95 { "met" } else { "MISSED" },
            Stats::of(&paired).median,
            spread(&r.ours),
            spread(&r.hand),
            spread(&r.plain)
        );
    }
    Ok(())
}

/// Throughputs of one mode, Gbit/s, and the pod MTUs (cnikit, hand-built, plain).
struct Figures {
    ours: Vec<f64>,
    hand: Vec<f64>,
    plain: Vec<f64>,
    mtus: (u32, u32, u32),
}

async fn measure(args: &Args, agent: &Path, plugin: &Path, mode: &str) -> Result<Figures> {
    let mut lab = Lab::new("tput")?;
    let ours = cnikit_path(&mut lab, args, agent, plugin, mode).await?;
    let hand = hand_built_path(&mut lab, args, mode)?;
    let plain = plain_path(&mut lab)?;
    let paths = [ours, hand, plain];
    for p in &paths {
        let mut server = Command::new("iperf3");
        server
            .args(["-s", "-p", IPERF_PORT, "-B", &p.server_ip.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        lab.spawn(&format!("iperf3 server ({})", p.name), &p.server, server)?;
    }
    // The servers take a moment to listen; a short run of each also warms the paths up.
    // Patient: on a machine whose neighbour table is full a path may take a while.
    for p in &paths {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match iperf(&lab, p, 1, 0) {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("{}: no iperf3 run succeeded", p.name)));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
    if let Ok(secs) = std::env::var("CNIKIT_BENCH_PAUSE") {
        eprintln!("paused {secs} s: namespaces of {}", paths[0].client);
        std::thread::sleep(Duration::from_secs(secs.parse().unwrap_or(60)));
    }
    let mut figures = Figures {
        ours: Vec::new(),
        hand: Vec::new(),
        plain: Vec::new(),
        mtus: (paths[0].mtu, paths[1].mtu, paths[2].mtu),
    };
    for cycle in 0..args.repeats {
        // Each cycle starts one path later, so that no path always runs first.
        for i in (0..paths.len()).map(|k| (cycle + k) % paths.len()) {
            let p = &paths[i];
            let gbits = iperf_retried(&lab, p, args.seconds)?;
            if args.verbose {
                eprintln!("{mode} cycle {cycle}: {:<10} {gbits:.2} Gbit/s", p.name);
            }
            match i {
                0 => figures.ours.push(gbits),
                1 => figures.hand.push(gbits),
                _ => figures.plain.push(gbits),
            }
        }
    }
    drop(lab);
    Ok(figures)
}

/// [`iperf`] with one second of warm-up, tried again (up to 5 times) when it fails: when
/// the machine's neighbour table is full (see the underlay's static ARP), a pod's or a node's
/// dynamic entry may be evicted between runs and not come back at once.
fn iperf_retried(lab: &Lab, path: &PathUnderTest, seconds: u32) -> Result<f64> {
    let mut attempt = 1;
    loop {
        match iperf(lab, path, seconds, 1) {
            Ok(gbits) => return Ok(gbits),
            Err(e) if attempt >= 5 => return Err(e),
            Err(e) => {
                eprintln!("{}: run failed ({e:#}); again", path.name);
                attempt += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// One iperf3 run from the client to the server of `path`; Gbit/s received.
fn iperf(lab: &Lab, path: &PathUnderTest, seconds: u32, omit: u32) -> Result<f64> {
    let mut client = Command::new("iperf3");
    client.args([
        "-c",
        &path.server_ip.to_string(),
        "-p",
        IPERF_PORT,
        "-t",
        &seconds.to_string(),
        "-O",
        &omit.to_string(),
        "-J",
    ]);
    let out = lab.output_in(&path.client, client)?;
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 printed no JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(error) = report.get("error") {
        bail!("iperf3 ({}): {error}", path.name);
    }
    let bits = report
        .pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .context("no end.sum_received.bits_per_second in iperf3's report")?;
    Ok(bits / 1e9)
}

/// The MTU of `eth0` in namespace `ns`.
fn pod_mtu(ns: &str) -> Result<u32> {
    let out = ip_in(ns, &["-j", "link", "show", "eth0"])?;
    let links: Value = serde_json::from_str(&out)?;
    links
        .pointer("/0/mtu")
        .and_then(Value::as_u64)
        .and_then(|m| u32::try_from(m).ok())
        .context("no MTU of eth0")
}

/// The cnikit path: agents in two node namespaces, a pod on each plugged in by the plugin.
async fn cnikit_path(
    lab: &mut Lab,
    args: &Args,
    agent: &Path,
    plugin: &Path,
    mode: &str,
) -> Result<PathUnderTest> {
    let underlay = lab.underlay("c", 2)?;
    let store = lab.store_dir();
    let mut lists = Vec::new();
    for node in &underlay.nodes {
        let conf = support::conflist(
            node,
            mode,
            &args.pod_network,
            support::file_store(&store),
            json!({}),
        );
        lab.start_agent(agent, node, &conf, "info").await?;
        lists.push(conf);
    }
    for node in &underlay.nodes {
        let ns = NetNs::named(&node.ns).await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while route::list_gateway(&ns, support::ROUTE_PROTOCOL)
            .await?
            .is_empty()
        {
            ensure!(
                Instant::now() < deadline,
                "{}: no route to its peer after 20 s (log: {})",
                node.name,
                lab.agent_log(&node.name).display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let plugin_dir: PathBuf = plugin.parent().context("plugin dir")?.to_path_buf();
    let mut pods = Vec::new();
    for (i, (node, conf)) in underlay.nodes.iter().zip(&lists).enumerate() {
        let pod = lab.netns(&format!("cp{i}"))?;
        let ip = add_pod(node, conf, &pod, &plugin_dir)
            .await
            .with_context(|| format!("ADD of the pod on {}", node.name))?;
        pods.push((pod, ip));
    }
    Ok(PathUnderTest {
        name: "cnikit",
        mtu: pod_mtu(&pods[0].0)?,
        client: pods[0].0.clone(),
        server: pods[1].0.clone(),
        server_ip: pods[1].1,
    })
}

/// ADD of a pod as a runtime does it: the plugin process in the node's namespace, with
/// `CNI_NETNS` the pod's. Returns the pod's address.
async fn add_pod(node: &Node, conflist: &Value, pod: &str, plugin_dir: &Path) -> Result<IpAddr> {
    let list = ConfList::from_slice(&serde_json::to_vec(conflist)?)?;
    let invocation = Invocation::new(
        cni_core::spec::Command::Add,
        format!("bench-{pod}"),
        Some(ns_path(pod)),
        "eth0",
        vec![plugin_dir.to_path_buf()],
    )
    .in_netns(ns_path(&node.ns));
    let result = cni_core::exec::add_list(&list, &invocation, &Default::default()).await?;
    Ok(result
        .ips
        .first()
        .context("the ADD result has no address")?
        .address
        .addr())
}

/// The hand-built path of the module docs.
fn hand_built_path(lab: &mut Lab, args: &Args, mode: &str) -> Result<PathUnderTest> {
    let underlay = lab.underlay("h", 2)?;
    let vxlan = mode == "vxlan";
    let ipip = mode == "ipip";
    let mtu: u32 = match mode {
        "vxlan" => 1450,
        "ipip" => 1480,
        _ => 1500,
    };
    let mtu_s = mtu.to_string();
    let block = |i: usize| format!("10.244.{i}.0/26");
    let pod_ip = |i: usize| format!("10.244.{i}.2");
    // The VTEP, or the IPIP device's address.
    let vtep_ip = |i: usize| format!("10.244.{i}.0");
    let vtep_mac = |i: usize| format!("02:aa:00:00:00:{:02x}", i + 1);
    let mut pods = Vec::new();
    for (i, node) in underlay.nodes.iter().enumerate() {
        let n = node.ns.as_str();
        let pod = lab.netns(&format!("hp{i}"))?;
        sysctl_in(n, "net.ipv4.ip_forward", "1")?;
        ip_in(
            n,
            &[
                "link", "add", "vpod", "mtu", &mtu_s, "type", "veth", "peer", "name", "eth0",
                "mtu", &mtu_s, "netns", &pod,
            ],
        )?;
        if args.pod_network == "routed" {
            // A fixed host-side MAC and a permanent neighbour entry for the gateway in the
            // pod: the pod never resolves 169.254.1.1, which exists on no wire.
            ip_in(n, &["link", "set", "vpod", "address", ROUTED_HOST_MAC])?;
        }
        ip_in(&pod, &["link", "set", "eth0", "up"])?;
        match args.pod_network.as_str() {
            "routed" => {
                sysctl_in(n, "net.ipv4.conf.vpod.proxy_arp", "1")?;
                ip_in(n, &["link", "set", "vpod", "up"])?;
                ip_in(
                    n,
                    &["route", "add", &format!("{}/32", pod_ip(i)), "dev", "vpod"],
                )?;
                ip_in(
                    &pod,
                    &["addr", "add", &format!("{}/32", pod_ip(i)), "dev", "eth0"],
                )?;
                ip_in(
                    &pod,
                    &[
                        "route",
                        "add",
                        "169.254.1.1",
                        "dev",
                        "eth0",
                        "scope",
                        "link",
                    ],
                )?;
                ip_in(
                    &pod,
                    &[
                        "route",
                        "add",
                        "default",
                        "via",
                        "169.254.1.1",
                        "dev",
                        "eth0",
                    ],
                )?;
                ip_in(
                    &pod,
                    &[
                        "neigh",
                        "add",
                        "169.254.1.1",
                        "lladdr",
                        ROUTED_HOST_MAC,
                        "dev",
                        "eth0",
                        "nud",
                        "permanent",
                    ],
                )?;
            }
            _ => {
                ip_in(n, &["link", "add", "cbr0", "mtu", &mtu_s, "type", "bridge"])?;
                ip_in(
                    n,
                    &[
                        "link",
                        "set",
                        "cbr0",
                        "type",
                        "bridge",
                        "nf_call_iptables",
                        "0",
                        "nf_call_ip6tables",
                        "0",
                        "nf_call_arptables",
                        "0",
                    ],
                )?;
                ip_in(
                    n,
                    &["addr", "add", &format!("10.244.{i}.1/26"), "dev", "cbr0"],
                )?;
                ip_in(n, &["link", "set", "cbr0", "up"])?;
                ip_in(n, &["link", "set", "vpod", "master", "cbr0", "up"])?;
                ip_in(
                    &pod,
                    &["addr", "add", &format!("{}/26", pod_ip(i)), "dev", "eth0"],
                )?;
                ip_in(
                    &pod,
                    &["route", "add", "default", "via", &format!("10.244.{i}.1")],
                )?;
            }
        }
        if vxlan {
            ip_in(
                n,
                &[
                    "link",
                    "add",
                    "vx0",
                    "address",
                    &vtep_mac(i),
                    "mtu",
                    &mtu_s,
                    "type",
                    "vxlan",
                    "id",
                    "1",
                    "dstport",
                    "4789",
                    "local",
                    &node.address.to_string(),
                    "dev",
                    "eth0",
                    "nolearning",
                ],
            )?;
            ip_in(
                n,
                &["addr", "add", &format!("{}/32", vtep_ip(i)), "dev", "vx0"],
            )?;
            ip_in(n, &["link", "set", "vx0", "up"])?;
        }
        if ipip {
            ip_in(
                n,
                &[
                    "link",
                    "add",
                    "ipip0",
                    "mtu",
                    &mtu_s,
                    "type",
                    "ipip",
                    "local",
                    &node.address.to_string(),
                    "dev",
                    "eth0",
                    "ttl",
                    "inherit",
                    "pmtudisc",
                ],
            )?;
            ip_in(
                n,
                &["addr", "add", &format!("{}/32", vtep_ip(i)), "dev", "ipip0"],
            )?;
            ip_in(n, &["link", "set", "ipip0", "up"])?;
        }
        pods.push(pod);
    }
    for (i, node) in underlay.nodes.iter().enumerate() {
        let n = node.ns.as_str();
        for (j, peer) in underlay.nodes.iter().enumerate() {
            if i == j {
                continue;
            }
            if vxlan {
                ip_in(
                    n,
                    &[
                        "neigh",
                        "add",
                        &vtep_ip(j),
                        "lladdr",
                        &vtep_mac(j),
                        "dev",
                        "vx0",
                        "nud",
                        "permanent",
                    ],
                )?;
                support::run(
                    "bridge",
                    &[
                        "-n",
                        n,
                        "fdb",
                        "append",
                        &vtep_mac(j),
                        "dev",
                        "vx0",
                        "dst",
                        &peer.address.to_string(),
                        "self",
                        "permanent",
                    ],
                )?;
            }
            // Through the tunnel devices the gateway is on no subnet of theirs: onlink.
            let (via, dev) = match mode {
                "vxlan" => (vtep_ip(j), "vx0"),
                "ipip" => (peer.address.to_string(), "ipip0"),
                _ => (peer.address.to_string(), "eth0"),
            };
            let dst = block(j);
            let mut route = vec!["route", "add", &dst, "via", &via, "dev", dev];
            if dev != "eth0" {
                route.push("onlink");
            }
            ip_in(n, &route)?;
        }
    }
    Ok(PathUnderTest {
        name: "hand-built",
        mtu,
        client: pods[0].clone(),
        server: pods[1].clone(),
        server_ip: pod_ip(1).parse()?,
    })
}

/// One veth pair between two namespaces.
fn plain_path(lab: &mut Lab) -> Result<PathUnderTest> {
    let a = lab.netns("pa")?;
    let b = lab.netns("pb")?;
    ip_in(
        &a,
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b,
        ],
    )?;
    ip_in(&a, &["addr", "add", "10.99.0.1/24", "dev", "eth0"])?;
    ip_in(&b, &["addr", "add", "10.99.0.2/24", "dev", "eth0"])?;
    ip_in(&a, &["link", "set", "eth0", "up"])?;
    ip_in(&b, &["link", "set", "eth0", "up"])?;
    Ok(PathUnderTest {
        name: "plain veth",
        mtu: pod_mtu(&a)?,
        client: a,
        server: b,
        server_ip: "10.99.0.2".parse()?,
    })
}
