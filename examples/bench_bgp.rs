//! Benchmark: how fast BGP distributes the pod blocks, the native engine (the agent's own
//! speaker) against the bird engine (BIRD 2 supervised by the agent), in the same run with
//! the same configuration. Each round builds one underlay switch and node namespaces, and
//! drives the `bgp` mode of each node through the routing trait, as the agent does:
//!
//! - **start**: 3 nodes start at once (init, then reconcile with the 3 registry records) →
//!   every node has the 2 other blocks in its kernel;
//! - **join**: a 4th node starts and every node reconciles with the 4 records → the 4th
//!   block is on the 3 first nodes and theirs on it;
//! - **vanish**: the 4th node goes silent (its underlay link goes down: no FIN, no
//!   NOTIFICATION), then its registry lease expires (the others reconcile without it: the
//!   clock starts there, the TTL itself is the registry's) → its block is gone everywhere.
//!
//! The kernels are polled over netlink every `--poll-ms`. Printed: the median of each
//! phase per engine over the rounds, and the ratio bird / native.
//!
//! Then, per engine, a receiving node runs as an agent would: in a process of its own (this
//! binary, `receive`), its mode peered with a native speaker (the feeder) in another
//! namespace:
//!
//! - **prefixes**: once the session carries one route, the feeder announces
//!   `--prefixes` more (1000 /26 blocks by default, packed into UPDATEs as any speaker
//!   does) → all of them in the receiver's kernel;
//! - **memory**: the resident set (VmRSS) of the receiving process with those prefixes
//!   learned and installed, and for the bird engine the same plus BIRD's own (BIRD holds
//!   the routes there; the agent only supervises it); also before the prefixes came.
//!
//! Needs root and, for the bird engine, Debian's `bird2`. Everything happens in
//! namespaces the benchmark creates and removes.
//!
//! ```text
//! cargo build --release --example bench_bgp --features bgp
//! sudo target/release/examples/bench_bgp --rounds 5
//! ```

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use cni_core::linux::NetNs;
use cni_core::linux::kernel::{Netlink, Routes};
use cni_core::registry::NodeRecord;
use cni_core::routing::{CrossNodeRouting, LocalNode};
use cnikit::bgp::{Bgp, Bird, Config, Engine};
use testkit::{Namespaces, Segment};

#[derive(Parser)]
struct Args {
    /// Runs one receiving node (used by the benchmark itself, as a child process).
    #[command(subcommand)]
    receive: Option<Receive>,
    /// Prefixes the feeder announces in the `prefixes` phase.
    #[arg(long, default_value_t = 1000)]
    prefixes: u16,
    /// Rounds per engine (each a fresh set of namespaces).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// How often the kernels are polled, milliseconds.
    #[arg(long, default_value_t = 5)]
    poll_ms: u64,
    /// `connectRetry` of both engines, seconds (BIRD: its connect delay and retry).
    #[arg(long, default_value_t = cnikit::bgp::DEFAULT_CONNECT_RETRY)]
    connect_retry: u16,
    /// Give up on a phase after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

/// The receiving node of the `prefixes` phase, in a process of its own.
#[derive(clap::Subcommand)]
enum Receive {
    /// Runs the `bgp` mode of one node until standard input closes.
    Receive {
        /// `native` or `bird`.
        #[arg(long)]
        engine: String,
        /// The node's network namespace (a path).
        #[arg(long)]
        netns: std::path::PathBuf,
        /// The bird engine's run directory.
        #[arg(long)]
        dir: std::path::PathBuf,
    },
}

/// The receiving node of the `prefixes` phase.
const RECEIVER: &str = "192.168.92.12/24";
/// The node that announces the prefixes.
const FEEDER: &str = "192.168.92.11/24";

/// One node of a round.
struct Node {
    ns: String,
    record: NodeRecord,
    local: LocalNode,
    mode: Box<dyn CrossNodeRouting>,
    /// The mode's routes in the node's kernel (proto 107 or bird).
    kernel: Netlink,
}

const PHASES: [&str; 3] = ["start", "join", "vanish"];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(Receive::Receive { engine, netns, dir }) = &args.receive {
        return receive(&args, engine, netns, dir).await;
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("needs root (it creates network namespaces)");
    }
    let engines = [Engine::Native, Engine::Bird];
    if !testkit::on_path("bird") || !testkit::on_path("birdc") {
        bail!("the bird engine needs bird and birdc: apt-get install -y bird2");
    }
    let mut figures = vec![vec![Vec::new(); PHASES.len()]; engines.len()];
    for round in 0..args.rounds {
        // Alternate which engine goes first, so neither always runs on a warmer machine.
        for i in 0..engines.len() {
            let e = (i + round) % engines.len();
            let times = one_round(&args, engines[e], round)
                .await
                .with_context(|| format!("{:?} round {round}", engines[e]))?;
            println!(
                "round {round} {:<6} start {:>8.1} ms  join {:>8.1} ms  vanish {:>8.1} ms",
                name(engines[e]),
                ms(times[0]),
                ms(times[1]),
                ms(times[2])
            );
            for (p, t) in times.into_iter().enumerate() {
                figures[e][p].push(t);
            }
        }
    }
    println!(
        "\nmedians over {} rounds (3 nodes, connectRetry {} s, hold time {} s, graceful \
         restart on; poll every {} ms):",
        args.rounds,
        args.connect_retry,
        cnikit::bgp::DEFAULT_HOLD_TIME,
        args.poll_ms
    );
    println!(
        "{:<8} {:>12} {:>12} {:>14}",
        "phase", "native ms", "bird ms", "bird / native"
    );
    for (p, phase) in PHASES.iter().enumerate() {
        let native = median(&mut figures[0][p]);
        let bird = median(&mut figures[1][p]);
        println!(
            "{phase:<8} {:>12.1} {:>12.1} {:>14.2}",
            ms(native),
            ms(bird),
            bird.as_secs_f64() / native.as_secs_f64().max(1e-9)
        );
    }

    // prefixes and memory, with the receiver in a process of its own.
    let mut learned = vec![Vec::new(); engines.len()];
    let mut memory = vec![Vec::new(); engines.len()];
    for round in 0..args.rounds {
        for i in 0..engines.len() {
            let e = (i + round) % engines.len();
            let (took, rss) = prefixes_round(&args, engines[e], round)
                .await
                .with_context(|| format!("{:?} prefixes round {round}", engines[e]))?;
            println!(
                "round {round} {:<6} {} prefixes {:>8.1} ms  rss before {:>6.1} MiB  with \
                 them {:>6.1} MiB (agent {:.1} + bird {:.1})",
                name(engines[e]),
                args.prefixes,
                ms(took),
                mib(rss.before),
                mib(rss.total()),
                mib(rss.agent),
                mib(rss.bird)
            );
            learned[e].push(took);
            memory[e].push(rss);
        }
    }
    println!(
        "\nmedians over {} rounds ({} prefixes from a native feeder over one iBGP session):",
        args.rounds, args.prefixes
    );
    println!(
        "{:<22} {:>12} {:>12} {:>14}",
        "", "native", "bird", "bird / native"
    );
    let native = median(&mut learned[0]);
    let bird = median(&mut learned[1]);
    println!(
        "{:<22} {:>12.1} {:>12.1} {:>14.2}",
        "prefixes -> kernel ms",
        ms(native),
        ms(bird),
        bird.as_secs_f64() / native.as_secs_f64().max(1e-9)
    );
    for (label, f) in [
        ("rss before MiB", (|r: &Rss| r.before) as fn(&Rss) -> u64),
        ("rss with them MiB", |r: &Rss| r.total()),
    ] {
        let mut n: Vec<u64> = memory[0].iter().map(f).collect();
        let mut b: Vec<u64> = memory[1].iter().map(f).collect();
        let (n, b) = (median_u64(&mut n), median_u64(&mut b));
        println!(
            "{label:<22} {:>12.1} {:>12.1} {:>14.2}",
            mib(n),
            mib(b),
            b as f64 / (n as f64).max(1.0)
        );
    }
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn median_u64(v: &mut [u64]) -> u64 {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// The resident memory of a receiving node, bytes.
#[derive(Clone, Copy, Default)]
struct Rss {
    /// The receiving process and its children, before the prefixes came.
    before: u64,
    /// The receiving process with the prefixes.
    agent: u64,
    /// Its BIRD with the prefixes (bird engine).
    bird: u64,
}

impl Rss {
    fn total(&self) -> u64 {
        self.agent + self.bird
    }
}

/// VmRSS of `pid`, bytes.
fn vm_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The children of `pid`, all its threads'.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// The resident memory of `pid` (the agent) and of its descendants (BIRD).
fn rss_of(pid: u32) -> (u64, u64) {
    let mut rest = 0;
    let mut todo = children(pid);
    while let Some(c) = todo.pop() {
        rest += vm_rss(c);
        todo.extend(children(c));
    }
    (vm_rss(pid), rest)
}

/// A node record and local node for `cidr` with `blocks`.
fn node(name: &str, cidr: &str, blocks: Vec<ipnet::IpNet>) -> Result<(NodeRecord, LocalNode)> {
    let net: ipnet::IpNet = cidr.parse()?;
    Ok((
        NodeRecord {
            name: name.into(),
            address: net.addr(),
            prefix_len: net.prefix_len(),
            blocks: blocks.clone(),
            backend: Default::default(),
        },
        LocalNode {
            name: name.into(),
            address: net.addr(),
            prefix_len: net.prefix_len(),
            interface: "eth0".into(),
            underlay_mtu: 1500,
            blocks,
            tunnel_address: None,
        },
    ))
}

/// `count` /26 blocks from 10.200.0.0 up.
fn blocks(count: u16) -> Vec<ipnet::IpNet> {
    (0..u32::from(count))
        .map(|i| {
            let base = u32::from(std::net::Ipv4Addr::new(10, 200, 0, 0)) + (i << 6);
            ipnet::IpNet::V4(
                ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(base), 26).expect("a /26"),
            )
        })
        .collect()
}

/// The child process: the `bgp` mode of the receiving node, peered with the feeder, until
/// standard input closes.
async fn receive(
    args: &Args,
    engine: &str,
    netns: &std::path::Path,
    dir: &std::path::Path,
) -> Result<()> {
    let engine = if engine == "bird" {
        Engine::Bird
    } else {
        Engine::Native
    };
    let config = Config {
        engine,
        connect_retry: args.connect_retry,
        ..Config::default()
    };
    let mut mode: Box<dyn CrossNodeRouting> = match engine {
        Engine::Bird => Box::new(Bird::open(config, netns, dir).await?),
        _ => Box::new(Bgp::open(config, netns).await?),
    };
    let (_, local) = node("receiver", RECEIVER, vec!["10.244.2.0/26".parse()?])?;
    let (feeder, _) = node("feeder", FEEDER, vec!["10.244.1.0/26".parse()?])?;
    mode.init(&local).await?;
    mode.reconcile(&[feeder]).await?;
    println!("ready");
    // Until the parent closes standard input (a blocking read, on a thread of its own).
    tokio::task::spawn_blocking(|| {
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())
    })
    .await??;
    mode.teardown().await?;
    Ok(())
}

/// One `prefixes` round with the receiver on `engine`: how long the prefixes took to reach
/// its kernel, and its memory.
async fn prefixes_round(args: &Args, engine: Engine, round: usize) -> Result<(Duration, Rss)> {
    let namespaces = Namespaces::new(&format!("bp{}{round}", &name(engine)[..1]));
    let segment = Segment::new(&namespaces, "sw");
    let dir = tempfile::tempdir()?;
    let feeder_ns = namespaces.add("f");
    let receiver_ns = namespaces.add("r");
    segment.plug(&feeder_ns, "eth0", FEEDER);
    segment.plug(&receiver_ns, "eth0", RECEIVER);
    let receiver_path = testkit::netns_path(&receiver_ns);
    let timeout = Duration::from_secs(args.timeout);
    let poll = Duration::from_millis(args.poll_ms);

    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args([
            "--connect-retry",
            &args.connect_retry.to_string(),
            "receive",
        ])
        .args(["--engine", name(engine)])
        .arg("--netns")
        .arg(&receiver_path)
        .arg("--dir")
        .arg(dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("the receiver's pid")?;
    let mut out = tokio::io::BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line).await?;
    if line.trim() != "ready" {
        bail!("the receiver did not start: {line:?}");
    }

    let base: ipnet::IpNet = "10.244.1.0/26".parse()?;
    let (receiver, _) = node("receiver", RECEIVER, vec!["10.244.2.0/26".parse()?])?;
    let (_, mut feeder_local) = node("feeder", FEEDER, vec![base])?;
    let mut feeder = Bgp::open(
        Config {
            connect_retry: args.connect_retry,
            ..Config::default()
        },
        &testkit::netns_path(&feeder_ns),
    )
    .await?;
    feeder.init(&feeder_local).await?;
    feeder.reconcile(std::slice::from_ref(&receiver)).await?;
    let protocol = match engine {
        Engine::Bird => cnikit::bgp::bird::BIRD_ROUTE_PROTOCOL,
        _ => cni_core::linux::kernel::ROUTE_PROTOCOL,
    };
    let kernel = Netlink::with_protocol(NetNs::open(&receiver_path).await?, protocol);
    let feeder_address: IpAddr = FEEDER.parse::<ipnet::IpNet>()?.addr();
    let installed = |want: usize| {
        let kernel = &kernel;
        async move {
            let started = Instant::now();
            loop {
                let have = kernel
                    .owned_routes()
                    .await?
                    .into_iter()
                    .filter(|r| r.via == feeder_address)
                    .count();
                if have == want {
                    return Ok::<_, anyhow::Error>(());
                }
                if started.elapsed() > timeout {
                    bail!("{have} routes from the feeder, not {want}, after {timeout:?}");
                }
                tokio::time::sleep(poll).await;
            }
        }
    };
    // The session is up and carries the feeder's block.
    installed(1).await?;
    let before: u64 = {
        let (agent, bird) = rss_of(pid);
        agent + bird
    };

    feeder_local.blocks.extend(blocks(args.prefixes));
    let started = Instant::now();
    feeder.init(&feeder_local).await?;
    installed(1 + usize::from(args.prefixes)).await?;
    let took = started.elapsed();
    // Let the receiver settle (allocations after the routes are in) before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (agent, bird) = rss_of(pid);

    drop(child.stdin.take());
    tokio::time::timeout(timeout, child.wait())
        .await
        .context("the receiver did not stop")??;
    feeder.teardown().await?;
    Ok((
        took,
        Rss {
            before,
            agent,
            bird,
        },
    ))
}

fn name(engine: Engine) -> &'static str {
    match engine {
        Engine::Bird => "bird",
        _ => "native",
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// One round of the three phases with `engine`; their durations.
async fn one_round(args: &Args, engine: Engine, round: usize) -> Result<Vec<Duration>> {
    let namespaces = Namespaces::new(&format!("bb{}{round}", &name(engine)[..1]));
    let segment = Segment::new(&namespaces, "sw");
    let dir = tempfile::tempdir()?;
    let config = Config {
        engine,
        connect_retry: args.connect_retry,
        ..Config::default()
    };
    let timeout = Duration::from_secs(args.timeout);
    let poll = Duration::from_millis(args.poll_ms);
    let mut nodes = Vec::new();
    for i in 1..=4u8 {
        let cidr = format!("192.168.91.{}/24", 10 + i);
        let ns = namespaces.add(&format!("n{i}"));
        segment.plug(&ns, "eth0", &cidr);
        let net: ipnet::IpNet = cidr.parse()?;
        let name = format!("node{i}");
        let block: ipnet::IpNet = format!("10.244.{i}.0/26").parse()?;
        let path = testkit::netns_path(&ns);
        let mode: Box<dyn CrossNodeRouting> = match engine {
            Engine::Bird => {
                Box::new(Bird::open(config.clone(), &path, &dir.path().join(&name)).await?)
            }
            _ => Box::new(Bgp::open(config.clone(), &path).await?),
        };
        let protocol = match engine {
            Engine::Bird => cnikit::bgp::bird::BIRD_ROUTE_PROTOCOL,
            _ => cni_core::linux::kernel::ROUTE_PROTOCOL,
        };
        nodes.push(Node {
            kernel: Netlink::with_protocol(NetNs::open(&path).await?, protocol),
            record: NodeRecord {
                name: name.clone(),
                address: net.addr(),
                prefix_len: 24,
                blocks: vec![block],
                backend: Default::default(),
            },
            local: LocalNode {
                name,
                address: net.addr(),
                prefix_len: 24,
                interface: "eth0".into(),
                underlay_mtu: 1500,
                blocks: vec![block],
                tunnel_address: None,
            },
            mode,
            ns,
        });
    }
    let records: Vec<NodeRecord> = nodes.iter().map(|n| n.record.clone()).collect();
    let mut times = Vec::new();

    // start: 3 nodes at once.
    let started = Instant::now();
    futures::future::try_join_all(nodes[..3].iter_mut().map(|n| {
        let records = &records[..3];
        async move {
            n.mode.init(&n.local).await?;
            n.mode.reconcile(records).await
        }
    }))
    .await?;
    wait(&nodes[..3], &records[..3], started, timeout, poll).await?;
    times.push(started.elapsed());

    // join: the 4th node starts, everyone learns of it.
    let started = Instant::now();
    {
        let (old, new) = nodes.split_at_mut(3);
        let node4 = &mut new[0];
        node4.mode.init(&node4.local).await?;
        node4.mode.reconcile(&records).await?;
        futures::future::try_join_all(old.iter_mut().map(|n| n.mode.reconcile(&records))).await?;
    }
    wait(&nodes, &records, started, timeout, poll).await?;
    times.push(started.elapsed());

    // vanish: node4 goes silent, then its lease expires.
    testkit::ip(&nodes[3].ns, &["link", "set", "eth0", "down"]);
    let started = Instant::now();
    futures::future::try_join_all(
        nodes[..3]
            .iter_mut()
            .map(|n| n.mode.reconcile(&records[..3])),
    )
    .await?;
    wait(&nodes[..3], &records[..3], started, timeout, poll).await?;
    times.push(started.elapsed());

    for n in &mut nodes {
        n.mode.teardown().await?;
    }
    Ok(times)
}

/// Polls until each of `nodes` has exactly the blocks of the other `records` via their
/// addresses.
async fn wait(
    nodes: &[Node],
    records: &[NodeRecord],
    started: Instant,
    timeout: Duration,
    poll: Duration,
) -> Result<()> {
    loop {
        let mut done = true;
        for n in nodes {
            let mut have: Vec<(ipnet::IpNet, IpAddr)> = n
                .kernel
                .owned_routes()
                .await?
                .into_iter()
                .map(|r| (r.dst, r.via))
                .collect();
            have.sort();
            let mut want: Vec<(ipnet::IpNet, IpAddr)> = records
                .iter()
                .filter(|r| r.name != n.record.name)
                .flat_map(|r| r.blocks.iter().map(move |b| (*b, r.address)))
                .collect();
            want.sort();
            if have != want {
                done = false;
                if started.elapsed() > timeout {
                    bail!(
                        "{}: after {:?} the routes are {have:?}, not {want:?}",
                        n.ns,
                        timeout
                    );
                }
                break;
            }
        }
        if done {
            return Ok(());
        }
        tokio::time::sleep(poll).await;
    }
}
