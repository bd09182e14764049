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
    Ok(())
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
