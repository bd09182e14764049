//! The cnikit lab: a virtual multi-node cluster made of network namespaces, to see and test
//! every routing mode on one machine.
//!
//! `up` builds an underlay (a bridge in a namespace; with `--topology two-subnets` two of
//! them joined by a router namespace), N node namespaces plugged into it, one
//! `cnikit-agent` per node running inside its node namespace, and M pods per node plugged
//! in by the real `cnikit` plugin exec'd as a container runtime does. `check` pings every
//! pod from every pod; `show` prints each node's devices, routes, neighbours and FDB entries
//! with what each one is for (in `bgp` mode also each BGP session, and with `--tor` the
//! top-of-rack router's sessions and table; with the `ebpf` pod network each attached
//! program and every map entry); `node-add`/`node-del` grow and shrink the cluster; `down`
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
//!
//! `--mode ipip` (`--ipip-mode always|cross-subnet`) needs a kernel with the ipip module
//! loaded (`up` refuses it otherwise: loading it would add `tunl0` to the machine's namespace);
//! where the machine's has none loaded, run every command in one run of the test VM (the
//! lab's state in `/run` lives as long as the VM), as `scripts/lab.sh --mode ipip` does:
//!
//! ```text
//! sudo scripts/vm.sh --mem 2G -- sh -c 'L=target/release/examples/lab; $L up --mode ipip && $L check && $L show; $L down'
//! ```
//!
//! `--mode ebpf` (pods on tc eBPF programs, other nodes' blocks through a collect_md VXLAN
//! device) pins its maps and program links on a BPF filesystem of the lab's own, mounted at
//! `/run/cnikit-lab/<name>/bpffs` by `up` and unmounted by `down`.
//!
//! `--store kubernetes` keeps the IPAM and the node registry in custom resources behind a
//! private kube-apiserver (`scripts/kube-apiserver.sh` builds it once) that runs, on the lab's
//! etcd, inside the underlay namespace; `up` applies `deploy/crds/` with `kubectl`, and the
//! nodes authenticate as the DaemonSet's service account. Build with the feature:
//!
//! ```text
//! cargo build --release --examples --features kubernetes
//! sudo target/release/examples/lab up --mode host-gw --store kubernetes
//! ```

mod bgp;
mod check;
mod cni;
mod down;
mod ebpf;
mod endpoints;
mod kube;
mod modes;
mod net;
mod nodes;
mod procs;
mod show;
mod state;
mod status;
mod store;
mod tor;
mod up;

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::state::{Lab, PodNetwork, StoreKind, Topology};

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

/// The `--bgp-topology` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BgpTopology {
    /// Every node peers with every other (iBGP full mesh).
    Mesh,
    /// The first `--reflectors` nodes are route reflectors (RFC 4456); the others peer with
    /// them only.
    Reflector,
}

/// The `--tor` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TorKind {
    /// BIRD 2 in a namespace of its own on the first segment.
    Bird,
}

/// The `--bgp-engine` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BgpEngine {
    /// The agent's own speaker.
    Native,
    /// BIRD 2, supervised by the agent.
    Bird,
}

#[derive(Args, Clone)]
pub struct UpArgs {
    /// Routing mode, the conflist's `routing` (host-gw, vxlan, ipip, bgp, ebpf).
    #[arg(long)]
    pub mode: String,
    /// Number of nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=200))]
    pub nodes: u32,
    /// Pods per node.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=250))]
    pub pods: u32,
    /// Pod network. Default `bridge`, `ebpf` with `--mode ebpf`.
    #[arg(long, value_enum)]
    pub pod_network: Option<PodNetwork>,
    /// Datastore shared by the nodes.
    #[arg(long, value_enum, default_value_t = StoreKind::File)]
    pub store: StoreKind,
    /// Underlay wiring.
    #[arg(long, value_enum, default_value_t = Topology::Flat)]
    pub topology: Topology,
    /// VXLAN DirectRouting: same-subnet peers get plain routes, others the tunnel. With
    /// `--mode ipip` the same idea under Calico's name: `--ipip-mode cross-subnet`.
    #[arg(long)]
    pub direct_routing: bool,
    /// IPIP mode (`--mode ipip` only): `always` tunnels to every peer; `cross-subnet` only
    /// to peers on another underlay subnet (Calico's CrossSubnet). Default `always`, or
    /// `cross-subnet` with `--direct-routing`.
    #[arg(long, value_parser = state::ipip_mode_parser())]
    pub ipip_mode: Option<cnikit::ipip::Mode>,
    /// BGP engine (`--mode bgp` only): `native`, the agent's own speaker (default), or
    /// `bird`, BIRD 2 as the agent's supervised child.
    #[arg(long, value_enum)]
    pub bgp_engine: Option<BgpEngine>,
    /// BGP topology (`--mode bgp` only): `mesh` (default) or `reflector` (route reflectors
    /// among the nodes, see `--reflectors`).
    #[arg(long, value_enum)]
    pub bgp_topology: Option<BgpTopology>,
    /// How many nodes are route reflectors with `--bgp-topology reflector` (the first ones;
    /// `node-add` makes the new node one when fewer are left). Default 1.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=200))]
    pub reflectors: Option<u32>,
    /// A top-of-rack router (`--mode bgp` only): a namespace on the first segment at
    /// `.254`, running BIRD 2 in AS 65000, peering with every node over eBGP and learning
    /// every block (it announces nothing back).
    #[arg(long, value_enum)]
    pub tor: Option<TorKind>,
    /// Agent: lifetime of a node record without refresh, seconds.
    #[arg(long, default_value_t = 10)]
    pub ttl: u64,
    /// Agent: full resync interval, seconds.
    #[arg(long, default_value_t = 5)]
    pub resync: u64,
    /// On failure, leave what was built for inspection (`down` removes it).
    #[arg(long)]
    pub keep_on_failure: bool,
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
        Cmd::Up(args) => up::up(name, &args).await.map(|()| ExitCode::SUCCESS),
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
        Cmd::Status { json } => status::status(name, json).await.map(|()| ExitCode::SUCCESS),
        Cmd::NodeAdd { pods } => nodes::node_add(name, pods)
            .await
            .map(|()| ExitCode::SUCCESS),
        Cmd::NodeDel { node } => nodes::node_del(name, &node)
            .await
            .map(|()| ExitCode::SUCCESS),
        Cmd::Down => down::down(name).await,
    }
}

/// Milliseconds since the Unix epoch (printed with events, to line them up with others'
/// measurements).
pub fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}
