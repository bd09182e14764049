//! The cnikit lab: a virtual multi-node cluster made of network namespaces, to see and test
//! every routing mode on one machine.
//!
//! `up` builds an underlay (a bridge in a namespace; with `--topology two-subnets` two of
//! them joined by a router namespace), N node namespaces plugged into it, one
//! `cnikit-agent` per node running inside its node namespace, and M pods per node plugged
//! in by the real `cnikit` plugin exec'd as a container runtime does. `check` pings every
//! pod from every pod; `show` prints each node's devices, routes, neighbours and FDB entries
//! with what each one is for; `node-add`/`node-del` grow and shrink the cluster; `down`
//! removes everything. Every namespace is named `cnkl-<name>-…`; nothing is done in the
//! machine's own network namespace. State lives in `/run/cnikit-lab/<name>/`.
//!
//! Needs root. Build and run (the plugin and agent binaries must sit next to this one):
//!
//! ```text
//! cargo build --release --examples
//! sudo target/release/examples/lab up --mode vxlan --nodes 3 --pods 2
//! sudo target/release/examples/lab check
//! sudo target/release/examples/lab show
//! sudo target/release/examples/lab down
//! ```

mod check;
mod cni;
mod modes;
mod net;
mod procs;
mod show;
mod state;
mod store;

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::cni::Binaries;
use crate::state::{Etcd, Lab, Node, Pod, PodNetwork, StoreKind, Topology, Underlay};

/// How long a node may take to become ready (agent up, STATUS ok).
const READY_WITHIN: Duration = Duration::from_secs(60);
/// How long an agent or etcd may take to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(
    name = "lab",
    about = "cnikit lab: a multi-node cluster of network namespaces"
)]
struct Cli {
    /// Lab name: namespaces `cnkl-<name>-…`, state in /run/cnikit-lab/<name>.
    #[arg(long, global = true, default_value = "lab")]
    name: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the lab: underlay, nodes with agents, pods.
    Up(UpArgs),
    /// Ping every pod from every pod (and nodes <-> pods); non-zero exit if any fails.
    Check {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Each node's devices, routes, neighbours and FDB entries, explained.
    Show {
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
    },
    /// What is running.
    Status {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a node (with its agent and pods) to the running lab.
    NodeAdd {
        /// Pods on the new node (default: as many as `up` gave each node).
        #[arg(long)]
        pods: Option<u32>,
    },
    /// Remove a node: DEL its pods, stop its agent, delete its namespaces.
    NodeDel {
        /// The node (`node3`).
        node: String,
    },
    /// Remove everything the lab made. Safe to run again and after a failed `up`.
    Down,
}

#[derive(Args, Clone)]
struct UpArgs {
    /// Routing mode, the conflist's `routing` (host-gw, vxlan).
    #[arg(long)]
    mode: String,
    /// Number of nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=200))]
    nodes: u32,
    /// Pods per node.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=250))]
    pods: u32,
    /// Pod network.
    #[arg(long, value_enum, default_value_t = PodNetwork::Bridge)]
    pod_network: PodNetwork,
    /// Datastore shared by the nodes.
    #[arg(long, value_enum, default_value_t = StoreKind::File)]
    store: StoreKind,
    /// Underlay wiring.
    #[arg(long, value_enum, default_value_t = Topology::Flat)]
    topology: Topology,
    /// VXLAN DirectRouting: same-subnet peers get plain routes, others the tunnel.
    #[arg(long)]
    direct_routing: bool,
    /// Agent: lifetime of a node record without refresh, seconds.
    #[arg(long, default_value_t = 10)]
    ttl: u64,
    /// Agent: full resync interval, seconds.
    #[arg(long, default_value_t = 5)]
    resync: u64,
    /// On failure, leave what was built for inspection (`down` removes it).
    #[arg(long)]
    keep_on_failure: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("lab: needs root (it creates network namespaces)");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lab: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    state::valid_name(&cli.name)?;
    let name = cli.name.as_str();
    match cli.command {
        Cmd::Up(args) => up(name, &args).await.map(|()| ExitCode::SUCCESS),
        Cmd::Check { json } => {
            let lab = Lab::require(name)?;
            let report = check::run(&lab).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                check::print(&report);
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Show { node } => {
            let lab = Lab::require(name)?;
            show::show(&lab, node.as_deref()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { json } => status(name, json).await.map(|()| ExitCode::SUCCESS),
        Cmd::NodeAdd { pods } => node_add(name, pods).await.map(|()| ExitCode::SUCCESS),
        Cmd::NodeDel { node } => node_del(name, &node).await.map(|()| ExitCode::SUCCESS),
        Cmd::Down => down(name).await,
    }
}

/// Milliseconds since the Unix epoch (printed with events, to line them up with others'
/// measurements).
fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// up

async fn up(name: &str, args: &UpArgs) -> Result<()> {
    let bins = Binaries::find()?;
    if Lab::load(name)?.is_some()
        || state::state_dir(name).exists()
        || !net::lab_namespaces(name).is_empty()
    {
        bail!(
            "lab {name:?} exists (state {} or namespaces {}*): run `lab --name {name} down` first",
            state::state_dir(name).display(),
            state::ns_prefix(name)
        );
    }
    if modes::find(&args.mode).is_none() {
        eprintln!(
            "note: the lab has no defaults for mode {:?} (it knows {}); passing it to the \
             agent as is",
            args.mode,
            modes::names()
        );
    }
    if args.store == StoreKind::Etcd && !on_path("etcd") {
        bail!("--store etcd needs the etcd server: apt-get install -y etcd-server");
    }
    let mut lab = Lab {
        name: name.to_owned(),
        mode: args.mode.clone(),
        direct_routing: args.direct_routing,
        pod_network: args.pod_network,
        store: args.store,
        topology: args.topology,
        ttl_seconds: args.ttl.max(1),
        resync_seconds: args.resync.max(1),
        pods_per_node: args.pods,
        next_index: 1,
        underlays: Vec::new(),
        router: None,
        etcd: None,
        nodes: Vec::new(),
    };
    lab.save()?;
    let started = Instant::now();
    // An interrupted `up` (Ctrl-C, SIGTERM) is a failed one: it cleans up too.
    let built = tokio::select! {
        result = build(&mut lab, &bins, args) => result,
        signal = interrupted() => Err(anyhow::anyhow!("interrupted by {signal}")),
    };
    match built {
        Ok(()) => {
            println!(
                "lab {name} is up in {:.1} s: {} nodes, {} pods, mode {}, {} pod network, {} \
                 store, {} topology",
                started.elapsed().as_secs_f64(),
                lab.nodes.len(),
                lab.pods().count(),
                lab.mode,
                lab.pod_network.as_str(),
                serde_json::to_value(lab.store)?.as_str().unwrap_or("?"),
                serde_json::to_value(lab.topology)?.as_str().unwrap_or("?"),
            );
            for (node, pod) in lab.pods() {
                println!(
                    "  {:<12} {:<16} on {}",
                    pod.name,
                    pod.ips.join(","),
                    node.name
                );
            }
            println!("next: lab --name {name} check | show | status | down");
            Ok(())
        }
        Err(e) => {
            let message = format!("{e:#}");
            diagnostics(&lab, &message);
            if args.keep_on_failure {
                eprintln!("lab: kept for inspection; `lab --name {name} down` removes it");
            } else {
                eprintln!("lab: removing what was built");
                if let Err(d) = down(name).await {
                    eprintln!("lab: cleanup after the failed up: {d:#}");
                }
            }
            Err(e.context("up failed"))
        }
    }
}

/// Resolves on SIGINT or SIGTERM, with the signal's name.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        // Without handlers the default action (exit) applies; `down` cleans up then.
        _ => std::future::pending().await,
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// The end of every agent's and plugin's log (those not already in `message`), to explain
/// a failure.
fn diagnostics(lab: &Lab, message: &str) {
    for node in &lab.nodes {
        for (what, path) in [("agent", node.agent_log()), ("plugin", node.plugin_log())] {
            let tail = procs::log_tail(&path, 15);
            if !tail.is_empty() && !message.contains(&tail) {
                eprintln!(
                    "--- {what} log of {} ({}):\n{tail}",
                    node.name,
                    path.display()
                );
            }
        }
    }
    if let Some(proc) = lab.etcd.as_ref().and_then(|e| e.proc.as_ref()) {
        let tail = procs::log_tail(&proc.log, 15);
        if !tail.is_empty() {
            eprintln!("--- etcd log ({}):\n{tail}", proc.log.display());
        }
    }
}

async fn build(lab: &mut Lab, bins: &Binaries, args: &UpArgs) -> Result<()> {
    let phase = Instant::now();
    // CNI_PATH: a directory with the plugin under its type name.
    let bin = lab.cni_bin();
    std::fs::create_dir_all(&bin)?;
    std::os::unix::fs::symlink(&bins.plugin, bin.join("cnikit"))
        .with_context(|| format!("symlink the plugin into {}", bin.display()))?;

    let segments: &[u8] = match lab.topology {
        Topology::Flat => &[1],
        Topology::TwoSubnets => &[1, 2],
    };
    for (i, octet) in segments.iter().enumerate() {
        let suffix = if segments.len() == 1 {
            "underlay".to_owned()
        } else {
            format!("underlay{}", i + 1)
        };
        lab.underlays.push(Underlay {
            ns: lab.ns(&suffix),
            octet: *octet,
        });
        lab.save()?;
        net::build_underlay(&lab.underlays[i]).await?;
    }
    if lab.topology == Topology::TwoSubnets {
        let router = lab.ns("router");
        lab.router = Some(router.clone());
        lab.save()?;
        net::build_router(&router, &lab.underlays).await?;
    }
    if lab.store == StoreKind::Etcd {
        start_etcd(lab).await?;
    }
    println!(
        "underlay ready ({} segment(s){}) in {} ms",
        lab.underlays.len(),
        if lab.store == StoreKind::Etcd {
            ", etcd up"
        } else {
            ""
        },
        phase.elapsed().as_millis()
    );

    let phase = Instant::now();
    let mut children = Vec::new();
    for _ in 0..args.nodes {
        let index = lab.next_index;
        let node = add_node(lab, index).await?;
        children.push((node, start_agent(lab, bins, index)?));
    }
    wait_ready_all(lab, children).await?;
    println!(
        "{} nodes ready (agents up, STATUS ok) in {} ms",
        lab.nodes.len(),
        phase.elapsed().as_millis()
    );

    let phase = Instant::now();
    let names: Vec<String> = lab.nodes.iter().map(|n| n.name.clone()).collect();
    for node in &names {
        add_pods(lab, node, args.pods).await?;
    }
    println!(
        "{} pods added in {} ms",
        lab.pods().count(),
        phase.elapsed().as_millis()
    );
    wait_blocks_announced(lab, &names).await
}

/// Waits until the agents of `nodes` announce every block their pods got addresses from.
/// A node whose pods outgrew its first block holds another one, which its agent picks up at
/// its next resync; until then the other nodes have no route to it.
async fn wait_blocks_announced(lab: &Lab, nodes: &[String]) -> Result<()> {
    let started = Instant::now();
    let within = Duration::from_secs(lab.resync_seconds + 10);
    let mut told = false;
    loop {
        let mut missing = Vec::new();
        for name in nodes {
            let node = lab.node(name)?;
            let state = cnikit::core::state::NodeState::read(&node.data_dir())?;
            let blocks = state.map(|s| s.blocks).unwrap_or_default();
            for pod in &node.pods {
                let Some(ip) = pod.ip().and_then(|ip| ip.parse::<std::net::IpAddr>().ok()) else {
                    continue;
                };
                if !blocks.iter().any(|b| b.contains(&ip)) {
                    missing.push(format!("{} ({ip})", pod.name));
                }
            }
        }
        if missing.is_empty() {
            if told {
                println!(
                    "the agents announced the new blocks after {} ms",
                    started.elapsed().as_millis()
                );
            }
            return Ok(());
        }
        if started.elapsed() > within {
            bail!(
                "the agents did not announce the blocks of {} within {within:?}",
                missing.join(", ")
            );
        }
        if !told {
            println!(
                "{} pods are in blocks their node claimed after its agent started: waiting for \
                 the agents' resync (every {} s) to announce them",
                missing.len(),
                lab.resync_seconds
            );
            told = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start_etcd(lab: &mut Lab) -> Result<()> {
    let underlay = lab.underlays[0].clone();
    let host = underlay.host();
    let client = format!("http://{host}:2379");
    let peer = format!("http://{host}:2380");
    let dir = lab.dir().join("etcd");
    std::fs::create_dir_all(&dir)?;
    let data = dir.join("data");
    lab.etcd = Some(Etcd {
        endpoint: client.clone(),
        proc: None,
    });
    lab.save()?;
    let data_arg = data.display().to_string();
    let cluster = format!("lab={peer}");
    let args = [
        "--name",
        "lab",
        "--data-dir",
        &data_arg,
        "--listen-client-urls",
        &client,
        "--advertise-client-urls",
        &client,
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
        "--initial-cluster",
        &cluster,
        "--initial-cluster-token",
        &lab.name,
        "--logger",
        "zap",
        "--log-outputs",
        "stderr",
        "--log-level",
        "warn",
    ];
    let etcd = which("etcd")?;
    let (proc, mut child) =
        procs::spawn_in_netns(&underlay.ns, &etcd, args, &dir.join("etcd.log"), &data_arg)?;
    if let Some(e) = lab.etcd.as_mut() {
        e.proc = Some(proc);
    }
    lab.save()?;
    let ready = store::wait_etcd(lab, Duration::from_secs(30)).await;
    if let Some(status) = child.try_wait()? {
        bail!("etcd exited with {status}");
    }
    ready
}

fn which(program: &str) -> Result<std::path::PathBuf> {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(program))
                .find(|c| c.is_file())
        })
        .with_context(|| format!("{program} is not on PATH"))
}

/// Creates node `index`: its namespace on its segment and its configuration list.
async fn add_node(lab: &mut Lab, index: u32) -> Result<String> {
    let name = format!("node{index}");
    let underlay = match lab.topology {
        Topology::Flat => 0,
        Topology::TwoSubnets => ((index - 1) % 2) as usize,
    };
    let node = Node {
        name: name.clone(),
        index,
        ns: lab.ns(&name),
        underlay,
        address: net::node_address(&lab.underlays[underlay], index)?,
        dir: lab.dir().join("nodes").join(&name),
        agent: None,
        pods: Vec::new(),
    };
    lab.nodes.push(node.clone());
    lab.next_index = index + 1;
    lab.save()?;
    net::build_node(lab, &node).await?;
    cni::write_conflist(lab, &node)?;
    Ok(name)
}

/// Starts node `index`'s agent inside its namespace.
fn start_agent(lab: &mut Lab, bins: &Binaries, index: u32) -> Result<std::process::Child> {
    let node = lab
        .nodes
        .iter_mut()
        .find(|n| n.index == index)
        .context("no such node")?;
    let conflist = node.conflist().display().to_string();
    let (proc, child) = procs::spawn_in_netns(
        &node.ns,
        &bins.agent,
        ["--conflist", conflist.as_str(), "--log", "info"],
        &node.agent_log(),
        &conflist,
    )?;
    node.agent = Some(proc);
    lab.save()?;
    Ok(child)
}

/// Waits until every node in `children` answers STATUS with ready; fails early when an
/// agent exits.
async fn wait_ready_all(lab: &Lab, children: Vec<(String, std::process::Child)>) -> Result<()> {
    let waits = children.into_iter().map(|(name, child)| async move {
        let node = lab.node(&name)?;
        wait_ready(lab, node, child).await
    });
    for result in futures::future::join_all(waits).await {
        result?;
    }
    Ok(())
}

async fn wait_ready(lab: &Lab, node: &Node, mut child: std::process::Child) -> Result<()> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the agent of {} exited ({status}); its log:\n{}",
                node.name,
                procs::log_tail(&node.agent_log(), 20)
            );
        }
        match cni::status(lab, node).await {
            Ok(()) => return Ok(()),
            Err(e) if started.elapsed() > READY_WITHIN => {
                bail!(
                    "{} not ready after {READY_WITHIN:?}: {e:#}; agent log:\n{}",
                    node.name,
                    procs::log_tail(&node.agent_log(), 20)
                );
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Creates `count` pod namespaces on `node` and ADDs them, concurrently.
async fn add_pods(lab: &mut Lab, node: &str, count: u32) -> Result<()> {
    let first = lab.node(node)?.pods.len() as u32 + 1;
    for j in first..first + count {
        let pod_name = format!("pod{j}");
        let pod = Pod {
            name: format!("{node}/{pod_name}"),
            ns: lab.ns(&format!("{node}-{pod_name}")),
            container_id: format!("{}-{node}-{pod_name}", lab.name),
            result: None,
            ips: Vec::new(),
        };
        if let Some(n) = lab.node_mut(node) {
            n.pods.push(pod.clone());
        }
        lab.save()?;
        net::create_ns(&pod.ns).await?;
    }
    let snapshot = lab.clone();
    let node_ref = snapshot.node(node)?;
    let adds = node_ref.pods[(first - 1) as usize..]
        .iter()
        .map(|pod| async { (pod.name.clone(), cni::add(&snapshot, node_ref, pod).await) });
    let results = futures::future::join_all(adds).await;
    let mut first_error = None;
    for (pod_name, result) in results {
        match result {
            Ok((value, ips)) => {
                if let Some(pod) = lab
                    .node_mut(node)
                    .and_then(|n| n.pods.iter_mut().find(|p| p.name == pod_name))
                {
                    pod.result = Some(value);
                    pod.ips = ips;
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    lab.save()?;
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------
// node-add, node-del

async fn node_add(name: &str, pods: Option<u32>) -> Result<()> {
    let bins = Binaries::find()?;
    let mut lab = Lab::require(name)?;
    let index = lab
        .next_index
        .max(lab.nodes.iter().map(|n| n.index + 1).max().unwrap_or(1));
    let started = Instant::now();
    let result = async {
        let node = add_node(&mut lab, index).await?;
        let child = start_agent(&mut lab, &bins, index)?;
        wait_ready_all(&lab, vec![(node.clone(), child)]).await?;
        let count = pods.unwrap_or(lab.pods_per_node);
        add_pods(&mut lab, &node, count).await?;
        wait_blocks_announced(&lab, std::slice::from_ref(&node)).await?;
        Ok::<_, anyhow::Error>(node)
    }
    .await;
    match result {
        Ok(node) => {
            let n = lab.node(&node)?;
            println!(
                "{node} added in {} ms: underlay {}, pods {}",
                started.elapsed().as_millis(),
                n.address,
                n.pods
                    .iter()
                    .map(|p| format!("{} {}", p.name, p.ips.join(",")))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            Ok(())
        }
        Err(e) => {
            let message = format!("{e:#}");
            diagnostics(&lab, &message);
            eprintln!("lab: node-add failed; removing the new node");
            let node = format!("node{index}");
            if lab.node(&node).is_ok()
                && let Err(d) = remove_node(&mut lab, &node, None).await
            {
                eprintln!("lab: removing {node}: {d:#}");
            }
            Err(e)
        }
    }
}

async fn node_del(name: &str, node: &str) -> Result<()> {
    let mut lab = Lab::require(name)?;
    let gone = lab.node(node)?.clone();
    // What the other nodes hold about it, to watch it disappear.
    let peers = show::Cluster::gather(&lab).await;
    let started = Instant::now();
    let removal = remove_node(&mut lab, node, Some(&peers)).await?;
    println!(
        "{node} removed in {} ms (pods deleted: {}, agent: {})",
        started.elapsed().as_millis(),
        gone.pods.len(),
        removal.agent
    );
    for line in &removal.forgotten {
        println!("  {line}");
    }
    Ok(())
}

/// What removing a node did.
struct Removal {
    /// How the agent stopped.
    agent: String,
    /// Per other node: when it no longer held entries towards the removed one.
    forgotten: Vec<String>,
}

/// DELs a node's pods, stops its agent, deletes its namespaces and forgets it. With
/// `watch`, also measures how soon after the agent's SIGTERM the other nodes no longer hold
/// any route, neighbour or FDB entry towards the node.
async fn remove_node(lab: &mut Lab, node: &str, watch: Option<&show::Cluster>) -> Result<Removal> {
    let gone = lab.node(node)?.clone();
    let mut errors = Vec::new();
    let dels = gone.pods.iter().map(|pod| cni::del(lab, &gone, pod));
    for result in futures::future::join_all(dels).await {
        if let Err(e) = result {
            errors.push(format!("{e:#}"));
        }
    }
    let signalled = Instant::now();
    let agent = match &gone.agent {
        Some(proc) => {
            let signalled = unix_ms();
            match procs::stop(proc, STOP_GRACE).await? {
                procs::Stopped::AlreadyGone => format!("pid {} had already exited", proc.pid),
                procs::Stopped::Terminated(after) => format!(
                    "pid {} got SIGTERM at unix_ms {signalled}, exited after {} ms",
                    proc.pid,
                    after.as_millis()
                ),
                procs::Stopped::Killed => {
                    errors.push(format!("agent pid {} ignored SIGTERM: killed", proc.pid));
                    format!("pid {} killed", proc.pid)
                }
            }
        }
        None => "none was running".to_owned(),
    };
    let mut forgotten = Vec::new();
    for other in lab.nodes.iter().filter(|n| n.name != node) {
        let Some(cluster) = watch else {
            break;
        };
        loop {
            let traces = show::traces_of(cluster, other, node).await?;
            if traces.is_empty() {
                forgotten.push(format!(
                    "{}: no route, neighbour or FDB entry towards {node} left {} ms after \
                     the SIGTERM",
                    other.name,
                    signalled.elapsed().as_millis()
                ));
                break;
            }
            if signalled.elapsed() > Duration::from_secs(5) {
                forgotten.push(format!(
                    "{}: STILL holds entries towards {node} 5 s after the SIGTERM:\n    {}",
                    other.name,
                    traces.join("\n    ")
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for pod in &gone.pods {
        if let Err(e) = net::delete_ns(&pod.ns) {
            errors.push(format!("{e:#}"));
        }
    }
    if let Err(e) = net::delete_ns(&gone.ns) {
        errors.push(format!("{e:#}"));
    }
    // The kernel destroys a namespace (and the veth to the underlay with it) a little
    // after its last reference goes: wait, so that the node is really gone on return.
    let underlay = &lab.underlays[gone.underlay].ns;
    let deleted = Instant::now();
    while net::ip(underlay, &["link", "show", "dev", &gone.name])
        .await
        .is_ok()
    {
        if deleted.elapsed() > Duration::from_secs(10) {
            errors.push(format!(
                "the underlay port of {node} is still there after 10 s"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    lab.nodes.retain(|n| n.name != node);
    lab.save()?;
    if gone.dir.starts_with(lab.dir()) {
        let _ = std::fs::remove_dir_all(&gone.dir);
    }
    if !errors.is_empty() {
        bail!("removing {node}: {}", errors.join("; "));
    }
    Ok(Removal { agent, forgotten })
}

// ---------------------------------------------------------------------------------------
// status

async fn status(name: &str, as_json: bool) -> Result<()> {
    let lab = Lab::require(name)?;
    let mut nodes = Vec::new();
    for node in &lab.nodes {
        let alive = node
            .agent
            .as_ref()
            .is_some_and(|p| procs::liveness(p) == procs::Liveness::Alive);
        let ready = cni::status(&lab, node).await;
        let node_state = cnikit::core::state::NodeState::read(&node.data_dir())
            .ok()
            .flatten();
        nodes.push(json!({
            "name": node.name,
            "ns": node.ns,
            "address": node.address,
            "subnet": lab.underlays[node.underlay].subnet(),
            "agentPid": node.agent.as_ref().map(|p| p.pid),
            "agentAlive": alive,
            "ready": ready.is_ok(),
            "notReady": ready.err().map(|e| format!("{e:#}")),
            "nodeState": node_state,
            "dataDir": node.data_dir(),
            "pods": node.pods.iter().map(|p| json!({
                "name": p.name, "ns": p.ns, "containerId": p.container_id, "ips": p.ips,
            })).collect::<Vec<_>>(),
        }));
    }
    let etcd = lab.etcd.as_ref().map(|e| {
        json!({
            "endpoint": e.endpoint,
            "pid": e.proc.as_ref().map(|p| p.pid),
            "alive": e.proc.as_ref().is_some_and(|p| procs::liveness(p) == procs::Liveness::Alive),
        })
    });
    let report = json!({
        "name": lab.name,
        "mode": lab.mode,
        "podNetwork": lab.pod_network,
        "store": lab.store,
        "topology": lab.topology,
        "stateDir": lab.dir(),
        "namespaces": net::lab_namespaces(&lab.name),
        "etcd": etcd,
        "nodes": nodes,
    });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "lab {}: mode {}, {} pod network, {} store, {} topology, state in {}",
        lab.name,
        lab.mode,
        lab.pod_network.as_str(),
        report["store"].as_str().unwrap_or("?"),
        report["topology"].as_str().unwrap_or("?"),
        lab.dir().display()
    );
    if let Some(etcd) = &report["etcd"].as_object() {
        println!(
            "etcd {} pid {} {}",
            etcd["endpoint"].as_str().unwrap_or("?"),
            etcd["pid"],
            if etcd["alive"] == true {
                "running"
            } else {
                "NOT RUNNING"
            }
        );
    }
    for n in report["nodes"].as_array().into_iter().flatten() {
        println!(
            "{} {} ({}): agent pid {} {}, {}",
            n["name"].as_str().unwrap_or("?"),
            n["address"].as_str().unwrap_or("?"),
            n["ns"].as_str().unwrap_or("?"),
            n["agentPid"],
            if n["agentAlive"] == true {
                "running"
            } else {
                "NOT RUNNING"
            },
            if n["ready"] == true {
                "STATUS ready".to_owned()
            } else {
                format!("NOT READY: {}", n["notReady"].as_str().unwrap_or("?"))
            }
        );
        for p in n["pods"].as_array().into_iter().flatten() {
            println!(
                "  {} {}",
                p["name"].as_str().unwrap_or("?"),
                p["ips"]
                    .as_array()
                    .map(|a| a
                        .iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(","))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// down

async fn down(name: &str) -> Result<ExitCode> {
    let dir = state::state_dir(name);
    let lab = match Lab::load(name) {
        Ok(lab) => lab,
        Err(e) => {
            eprintln!("lab: the state file is unreadable ({e:#}); sweeping namespaces only");
            None
        }
    };
    let namespaces = net::lab_namespaces(name);
    if lab.is_none() && namespaces.is_empty() && !dir.exists() {
        println!("lab {name}: nothing to remove");
        return Ok(ExitCode::SUCCESS);
    }
    let mut problems = Vec::new();
    if let Some(lab) = &lab {
        teardown_lab(lab, &mut problems).await;
    }
    for ns in net::lab_namespaces(name) {
        if let Err(e) = net::delete_ns(&ns) {
            problems.push(format!("{e:#}"));
        }
    }
    let left = net::lab_namespaces(name);
    if !left.is_empty() {
        problems.push(format!("namespaces left: {}", left.join(" ")));
    } else {
        println!("namespaces {}* removed", state::ns_prefix(name));
    }
    // The state directory is always /run/cnikit-lab/<valid name>.
    if dir.starts_with(state::STATE_ROOT)
        && dir != Path::new(state::STATE_ROOT)
        && let Err(e) = std::fs::remove_dir_all(&dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        problems.push(format!("remove {}: {e}", dir.display()));
    }
    if problems.is_empty() {
        println!("lab {name} is down");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("lab {name} is down, with problems:");
        for p in &problems {
            eprintln!("  - {p}");
        }
        Ok(ExitCode::FAILURE)
    }
}

/// DEL every pod, stop every agent, look at the store, stop etcd.
async fn teardown_lab(lab: &Lab, problems: &mut Vec<String>) {
    // Pods first, while agents and the datastore still run.
    let dels = lab
        .pods()
        .filter(|(node, _)| net::ns_exists(&node.ns))
        .map(|(node, pod)| async move { (pod.name.clone(), cni::del(lab, node, pod).await) });
    let results = futures::future::join_all(dels).await;
    let deleted = results.iter().filter(|(_, r)| r.is_ok()).count();
    for (pod, result) in &results {
        if let Err(e) = result {
            problems.push(format!("DEL {pod}: {e:#}"));
        }
    }
    if !results.is_empty() {
        println!("{deleted}/{} pods deleted (CNI DEL)", results.len());
    }
    let stops = lab
        .nodes
        .iter()
        .filter_map(|n| n.agent.as_ref().map(|p| (n, p)))
        .map(|(node, proc)| async move {
            (
                node.name.clone(),
                proc.pid,
                procs::stop(proc, STOP_GRACE).await,
            )
        });
    for (node, pid, result) in futures::future::join_all(stops).await {
        match result {
            Ok(procs::Stopped::Terminated(after)) => println!(
                "agent of {node} (pid {pid}) stopped after {} ms",
                after.as_millis()
            ),
            Ok(procs::Stopped::AlreadyGone) => {
                println!("agent of {node} (pid {pid}) was not running")
            }
            Ok(procs::Stopped::Killed) => problems.push(format!(
                "agent of {node} (pid {pid}) ignored SIGTERM: killed"
            )),
            Err(e) => problems.push(format!("stopping the agent of {node}: {e:#}")),
        }
    }
    let etcd_alive = lab
        .etcd
        .as_ref()
        .and_then(|e| e.proc.as_ref())
        .is_some_and(|p| procs::liveness(p) == procs::Liveness::Alive);
    if lab.store == StoreKind::File || etcd_alive {
        match store::keys(lab).await {
            Ok(keys) => {
                let groups = store::summarize(&keys);
                if keys.is_empty() {
                    println!("the store is empty");
                } else {
                    println!("the store holds {} keys after teardown:", keys.len());
                }
                for (kind, keys) in &groups {
                    let expected = kind.expected_after_teardown();
                    println!(
                        "  {:>3} {}{}",
                        keys.len(),
                        kind.describe(),
                        if expected {
                            " (expected)"
                        } else {
                            " UNEXPECTED"
                        }
                    );
                    if !expected {
                        problems.push(format!(
                            "store still holds {} {}: {}",
                            keys.len(),
                            kind.describe(),
                            keys.join(" ")
                        ));
                    }
                }
            }
            Err(e) => problems.push(format!("reading the store: {e:#}")),
        }
    }
    if let Some(proc) = lab.etcd.as_ref().and_then(|e| e.proc.as_ref()) {
        match procs::stop(proc, STOP_GRACE).await {
            Ok(procs::Stopped::Terminated(after)) => {
                println!(
                    "etcd (pid {}) stopped after {} ms",
                    proc.pid,
                    after.as_millis()
                )
            }
            Ok(procs::Stopped::AlreadyGone) => println!("etcd (pid {}) was not running", proc.pid),
            Ok(procs::Stopped::Killed) => println!("etcd (pid {}) killed", proc.pid),
            Err(e) => problems.push(format!("stopping etcd: {e:#}")),
        }
    }
}
