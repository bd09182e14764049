//! Benchmark: the `ebpf` pod network and routing mode against cnikit's other datapaths, all
//! built in the same run by the real `cnikit-agent` and `cnikit` plugin:
//!
//! - **same node**, two pods of one node: `ebpf` (delivery by `bpf_redirect_peer`), `routed`
//!   and `bridge` pod networks (each node's agent in host-gw mode, pod MTU 1500), and one
//!   plain veth pair between two namespaces (the machine's limit);
//! - **two nodes**, a pod on each, nodes on one underlay bridge: `ebpf` routing (with the
//!   ebpf pod network: the collect_md VXLAN device), `vxlan` and `host-gw` (with the routed
//!   pod network), pod MTU as the agent computes it.
//!
//! Each path gets single-stream TCP throughput (iperf3, one second omitted as warm-up) and a
//! request/response latency: one byte each way over one TCP connection (`TCP_NODELAY`),
//! many times, measured by this program from a thread inside the client pod's namespace
//! against a server thread inside the server pod's. The runs alternate between the paths of
//! a group (each cycle starts one path later), the cycle repeats; printed are the medians
//! (latency: the median of each run's p50) and the ratios against the baselines: same node
//! against `bridge` and the plain veth pair, two nodes against `vxlan`.
//!
//! The `ebpf` maps and links are pinned on a BPF filesystem the benchmark mounts in its
//! scratch directory (and unmounts at the end), not on the machine's `/sys/fs/bpf`.
//!
//! Needs root and iperf3. Everything happens in namespaces the benchmark creates and removes,
//! also on failure or ctrl-c. The datapath is the kernel's: a debug build of the binaries
//! measures the same as a release one.
//!
//! ```text
//! cargo build --examples
//! sudo target/debug/examples/bench_ebpf --seconds 5 --repeats 3
//! ```

#[path = "bench_support/mod.rs"]
mod support;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use cni_core::exec::Invocation;
use cni_core::spec::ConfList;
use serde_json::{Value, json};
use support::{Lab, Node, Stats, ip_in, ns_path};

#[derive(Parser)]
struct Args {
    /// Seconds of each iperf3 run (one more second is omitted as TCP warm-up).
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Request/response round trips per latency run.
    #[arg(long, default_value_t = 20000)]
    round_trips: usize,
    /// Cycles over each group's paths.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Print every run.
    #[arg(long)]
    verbose: bool,
}

const IPERF_PORT: &str = "5201";
const RR_PORT: u16 = 5202;

/// One pod-to-pod path.
struct PathUnderTest {
    name: &'static str,
    client: String,
    server: String,
    server_ip: IpAddr,
    mtu: u32,
}

/// What one path measured: Gbit/s per run, p50 round trip (µs) per run.
#[derive(Default)]
struct Figures {
    gbits: Vec<f64>,
    p50_us: Vec<f64>,
}

/// The benchmark's own BPF filesystem, unmounted on drop (after the lab: declare it first).
struct Bpffs(PathBuf);

impl Bpffs {
    fn mount(dir: PathBuf) -> Result<Bpffs> {
        std::fs::create_dir_all(&dir)?;
        nix::mount::mount(
            Some("bpf"),
            &dir,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mount -t bpf bpf {}", dir.display()))?;
        Ok(Bpffs(dir))
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        // Its pins go with it: the links detach, the maps and programs are freed.
        if let Err(e) = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("cannot unmount {}: {e}", self.0.display());
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.seconds >= 1 && args.repeats >= 1 && args.round_trips >= 1,
        "--seconds, --repeats and --round-trips must be at least 1"
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
    let scratch = tempfile::Builder::new()
        .prefix("cnkb-ebpf-bpf-")
        .tempdir()?;
    let bpffs = Bpffs::mount(scratch.path().join("bpffs"))?;
    let mut lab = Lab::new("ebpf")?;
    let tools = Tools {
        agent,
        plugin,
        bpffs: &bpffs.0,
    };

    // Same node: ebpf, routed, bridge (agents in host-gw mode, MTU 1500), plain veth.
    let mut same = Vec::new();
    for (tag, name, pod_network) in [
        ("s1", "ebpf", "ebpf"),
        ("s2", "routed", "routed"),
        ("s3", "bridge", "bridge"),
    ] {
        same.push(cluster_path(&mut lab, &tools, tag, name, "host-gw", pod_network, 1).await?);
    }
    same.push(plain_path(&mut lab)?);
    // Two nodes: ebpf routing (ebpf pods), vxlan and host-gw (routed pods).
    let mut cross = Vec::new();
    for (tag, name, mode, pod_network) in [
        ("x1", "ebpf", "ebpf", "ebpf"),
        ("x2", "vxlan", "vxlan", "routed"),
        ("x3", "host-gw", "host-gw", "routed"),
    ] {
        cross.push(cluster_path(&mut lab, &tools, tag, name, mode, pod_network, 2).await?);
    }
    for p in same.iter().chain(&cross) {
        start_servers(&mut lab, p)?;
    }
    let same_figures = measure(args, &lab, "same node", &same)?;
    let cross_figures = measure(args, &lab, "two nodes", &cross)?;
    drop(lab);
    drop(bpffs);

    println!(
        "Single-stream TCP (iperf3, {} s per run) and request/response latency (1 byte each \
         way, {} round trips per run), {} alternated cycles; medians",
        args.seconds, args.round_trips, args.repeats
    );
    report("same node", &same, &same_figures, &["bridge", "plain veth"]);
    report("two nodes", &cross, &cross_figures, &["vxlan"]);
    let median = |paths: &[PathUnderTest], figures: &[Figures], name: &str| {
        let i = paths.iter().position(|p| p.name == name).expect("path");
        (
            Stats::of(&figures[i].gbits).median,
            Stats::of(&figures[i].p50_us).median,
        )
    };
    let (ebpf, ebpf_us) = median(&same, &same_figures, "ebpf");
    let (bridge, _) = median(&same, &same_figures, "bridge");
    let (_, plain_us) = median(&same, &same_figures, "plain veth");
    let (x_ebpf, _) = median(&cross, &cross_figures, "ebpf");
    let (x_vxlan, _) = median(&cross, &cross_figures, "vxlan");
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "goals: same node ebpf/bridge {:.3} (>= 1.10: {}); ebpf p50 {:.1} us vs plain veth \
         {:.1} us = {:.3} (<= 1.05: {}); two nodes ebpf/vxlan {:.3} (>= 1.00: {})",
        ebpf / bridge,
        verdict(ebpf / bridge >= 1.10),
        ebpf_us,
        plain_us,
        ebpf_us / plain_us,
        verdict(ebpf_us / plain_us <= 1.05),
        x_ebpf / x_vxlan,
        verdict(x_ebpf / x_vxlan >= 1.0)
    );
    Ok(())
}

/// The binaries and the BPF filesystem the paths are built with.
struct Tools<'a> {
    agent: &'a Path,
    plugin: &'a Path,
    bpffs: &'a Path,
}

/// Prints one group: per path the medians, the MTU and the ratios to `baselines`.
fn report(group: &str, paths: &[PathUnderTest], figures: &[Figures], baselines: &[&str]) {
    println!("\n{group}:");
    let mut header = format!(
        "  {:<11} {:>5} {:>9} {:>13}",
        "path", "MTU", "Gbit/s", "p50 RTT (us)"
    );
    for b in baselines {
        header.push_str(&format!(
            " {:>16} {:>16}",
            format!("Gbit/s / {b}"),
            format!("p50 / {b}")
        ));
    }
    println!("{header}");
    let base: Vec<(f64, f64)> = baselines
        .iter()
        .map(|b| {
            let i = paths.iter().position(|p| p.name == *b).expect("baseline");
            (
                Stats::of(&figures[i].gbits).median,
                Stats::of(&figures[i].p50_us).median,
            )
        })
        .collect();
    for (p, f) in paths.iter().zip(figures) {
        let (g, us) = (Stats::of(&f.gbits), Stats::of(&f.p50_us));
        let mut line = format!(
            "  {:<11} {:>5} {:>9.2} {:>13.1}",
            p.name, p.mtu, g.median, us.median
        );
        for (bg, bus) in &base {
            line.push_str(&format!(
                " {:>16.3} {:>16.3}",
                g.median / bg,
                us.median / bus
            ));
        }
        line.push_str(&format!(
            "   (Gbit/s {:.2}..{:.2}, p50 {:.1}..{:.1})",
            g.min, g.max, us.min, us.max
        ));
        println!("{line}");
    }
}

/// Runs the cycles of one group; the figures in the order of `paths`.
fn measure(args: &Args, lab: &Lab, group: &str, paths: &[PathUnderTest]) -> Result<Vec<Figures>> {
    let mut figures: Vec<Figures> = paths.iter().map(|_| Figures::default()).collect();
    eprintln!(
        "{group}: {} cycles of {} paths ({} s iperf3 + {} round trips each)…",
        args.repeats,
        paths.len(),
        args.seconds,
        args.round_trips
    );
    for cycle in 0..args.repeats {
        for i in (0..paths.len()).map(|k| (cycle + k) % paths.len()) {
            let p = &paths[i];
            let gbits = iperf_retried(lab, p, args.seconds)?;
            let rtts = round_trips(p, args.round_trips)?;
            let p50 = Stats::of(&rtts).median;
            if args.verbose {
                eprintln!(
                    "{group} cycle {cycle}: {:<11} {gbits:.2} Gbit/s, p50 {p50:.1} us",
                    p.name
                );
            }
            figures[i].gbits.push(gbits);
            figures[i].p50_us.push(p50);
        }
    }
    Ok(figures)
}

/// A cluster of `nodes` node namespaces (underlay `tag`), each with the real agent in
/// routing `mode` and `pod_network`; the path is from a pod on the first node to a pod on
/// the last (the same node when there is one).
async fn cluster_path(
    lab: &mut Lab,
    tools: &Tools<'_>,
    tag: &str,
    name: &'static str,
    mode: &str,
    pod_network: &str,
    nodes: usize,
) -> Result<PathUnderTest> {
    let underlay = lab.underlay(tag, nodes)?;
    // A store of the cluster's own: the clusters are separate networks.
    let store = lab.dir.path().join(format!("store-{tag}"));
    let mut lists = Vec::new();
    for node in &underlay.nodes {
        let mut conf = support::conflist(
            node,
            mode,
            pod_network,
            support::file_store(&store),
            json!({}),
        );
        conf["plugins"][0]["bpffs"] = json!(tools.bpffs);
        lab.start_agent(tools.agent, node, &conf, "warn").await?;
        lists.push(conf);
    }
    if nodes > 1 {
        wait_for_peers(&underlay.nodes).await?;
    }
    let plugin_dir = tools.plugin.parent().context("plugin dir")?.to_path_buf();
    let first = (&underlay.nodes[0], &lists[0]);
    let last = (&underlay.nodes[nodes - 1], &lists[nodes - 1]);
    let client = lab.netns(&format!("{tag}c"))?;
    let server = lab.netns(&format!("{tag}s"))?;
    add_pod(first.0, first.1, &client, &plugin_dir).await?;
    let server_ip = add_pod(last.0, last.1, &server, &plugin_dir).await?;
    Ok(PathUnderTest {
        name,
        mtu: pod_mtu(&client)?,
        client,
        server,
        server_ip,
    })
}

/// Waits until each node has a route (protocol 107) to its peer's block.
async fn wait_for_peers(nodes: &[Node]) -> Result<()> {
    for node in nodes {
        let ns = cni_core::linux::NetNs::named(&node.ns).await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while cni_core::linux::route::list_gateway(&ns, support::ROUTE_PROTOCOL)
            .await?
            .is_empty()
        {
            ensure!(
                Instant::now() < deadline,
                "{}: no route to its peer after 20 s",
                node.name
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(())
}

/// ADD of a pod as a runtime does it (the plugin in the node's namespace); its address.
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
    let result = cni_core::exec::add_list(&list, &invocation, &Default::default())
        .await
        .with_context(|| format!("ADD of {pod} on {}", node.name))?;
    Ok(result
        .ips
        .first()
        .context("the ADD result has no address")?
        .address
        .addr())
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

/// The iperf3 server (a process of the lab) and the request/response server (a thread of
/// this process) in the server pod of `p`; waits until both answer.
fn start_servers(lab: &mut Lab, p: &PathUnderTest) -> Result<()> {
    let mut server = Command::new("iperf3");
    server
        .args(["-s", "-p", IPERF_PORT, "-B", &p.server_ip.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    lab.spawn(&format!("iperf3 server ({})", p.name), &p.server, server)?;
    echo_server(&p.server, p.server_ip)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match iperf(lab, p, 1, 0) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{}: no iperf3 run succeeded", p.name)));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// [`iperf`] with one second of warm-up, tried again (up to 5 times) when it fails.
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

/// Runs `f` on a new thread inside namespace `ns` (never a runtime worker) and returns what
/// it returns.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    let path = ns_path(ns);
    std::thread::spawn(move || {
        let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        f()
    })
}

/// A thread in `ns` that echoes every byte it gets on `ip`:RR_PORT, one connection at a
/// time, for the rest of the process; returns once it listens.
fn echo_server(ns: &str, ip: IpAddr) -> Result<()> {
    let (ready, listening) = std::sync::mpsc::channel();
    // Detached: it serves until the process exits (its namespace goes with the lab).
    drop(in_netns(ns, move || {
        let listener = match TcpListener::bind((ip, RR_PORT)) {
            Ok(l) => {
                let _ = ready.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return Ok(());
            }
        };
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_nodelay(true);
            let mut byte = [0u8; 1];
            while conn.read_exact(&mut byte).is_ok() && conn.write_all(&byte).is_ok() {}
        }
        Ok(())
    }));
    listening
        .recv()
        .context("the echo server thread ended")?
        .with_context(|| format!("listen on {ip}:{RR_PORT} in {ns}"))
}

/// `count` request/response round trips (1 byte each way) from the client pod of `p` to its
/// echo server, after 1000 not counted; each in microseconds.
fn round_trips(p: &PathUnderTest, count: usize) -> Result<Vec<f64>> {
    let ip = p.server_ip;
    in_netns(&p.client, move || {
        let mut conn = TcpStream::connect((ip, RR_PORT)).context("connect to the echo server")?;
        conn.set_nodelay(true)?;
        let mut byte = [7u8; 1];
        let mut rtts = Vec::with_capacity(count);
        for i in 0..count + 1000 {
            let started = Instant::now();
            conn.write_all(&byte)?;
            conn.read_exact(&mut byte)?;
            if i >= 1000 {
                rtts.push(started.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(rtts)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the round-trip thread panicked"))?
}
