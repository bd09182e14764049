//! The harness shared by the benchmarks (`bench_add_del`, `bench_convergence`,
//! `bench_throughput`, `bench_memory`): namespaces and processes that are removed on drop
//! (also on an error, a panic or ctrl-c), an underlay of node namespaces on a bridge, the real
//! `cnikit-agent` started inside a node namespace, and a few statistics.
//!
//! Safety: nothing here touches the root network namespace. Every link, address, route and
//! sysctl is made inside a namespace named `cnkb-<tag>-<pid>-…` that the benchmark creates;
//! processes are started inside those namespaces and ended by PID.
//!
//! Environment: `CNIKIT_BENCH_KEEP=1` keeps the scratch directory (configuration lists,
//! agent logs, stores) and prints where; `CNIKIT_BENCH_VERBOSE=1` reports processes that
//! did not end cleanly.
#![allow(dead_code)] // Each benchmark uses a part of the harness.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cni_core::linux::netns;
use cni_core::registry::NodeRecord;
use cni_core::state::NodeState;
use ipnet::IpNet;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// The underlay subnet: node `i` is `10.200.0.<i+1>/16`; a /16 leaves room for a thousand
/// synthetic peers.
pub const UNDERLAY_PREFIX_LEN: u8 = 16;
/// The underlay bridge's own address, where services of the underlay listen (etcd).
pub const SERVICE_ADDRESS: &str = "10.200.255.254";
/// The pod address pool of the benchmark networks.
pub const POOL: &str = "10.244.0.0/16";
/// Route protocol of the routes the routing backends write.
pub const ROUTE_PROTOCOL: u8 = cni_core::linux::kernel::ROUTE_PROTOCOL;

/// Address of node `i` on the underlay.
pub fn node_address(i: usize) -> Ipv4Addr {
    let i = u32::try_from(i + 1).expect("few nodes");
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + i)
}

/// An example binary built next to this one (`<target>/release/examples/<name>`), refused
/// when it is older than the cnikit sources it is built from.
pub fn binary(name: &str) -> Result<PathBuf> {
    let path = testkit::examples_dir().join(name);
    let hint = "cargo build --release --example cnikit --example cnikit-agent";
    ensure!(path.is_file(), "{} is missing: {hint}", path.display());
    ensure!(
        !testkit::stale(&path, &testkit::sources_of(name)),
        "{} is older than the cnikit sources: {hint}",
        path.display()
    );
    Ok(path)
}

/// Runs `ip ARGS…` and fails with its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}

/// Runs `ip -n NS ARGS…`.
pub fn ip_in(ns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Runs `program ARGS…`, returns its stdout, fails with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes a sysctl inside namespace `ns` (`ip netns exec NS sysctl -qw KEY=VALUE`).
pub fn sysctl_in(ns: &str, key: &str, value: &str) -> Result<()> {
    run(
        "ip",
        &[
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ],
    )
    .map(drop)
}

/// The MAC address of `dev` in namespace `ns`.
pub fn mac_of(ns: &str, dev: &str) -> Result<String> {
    let out = ip_in(ns, &["-j", "link", "show", "dev", dev])?;
    let links: Value = serde_json::from_str(&out)?;
    links
        .pointer("/0/address")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("no MAC address of {dev} in {ns}"))
}

/// `ip -n NS neigh replace ADDRESS lladdr MAC dev DEV nud permanent`.
pub fn static_neighbour(ns: &str, dev: &str, address: &str, mac: &str) -> Result<()> {
    ip_in(
        ns,
        &[
            "neigh",
            "replace",
            address,
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ],
    )
    .map(drop)
}

/// `/run/netns/<name>`.
pub use testkit::netns_path as ns_path;

/// A process the benchmark started.
struct Proc {
    what: String,
    child: Child,
}

/// The namespaces, processes and temporary directory of one benchmark; all removed on drop:
/// processes first, the last started first (SIGTERM, then SIGKILL after 3 s), then
/// namespaces.
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    children: Vec<Proc>,
    /// Scratch directory: stores, data directories, configuration lists, logs.
    pub dir: tempfile::TempDir,
}

impl Lab {
    /// A lab whose namespaces are named `cnkb-<tag>-<pid>-…`. Needs root.
    pub fn new(tag: &str) -> Result<Lab> {
        ensure!(
            nix::unistd::geteuid().is_root(),
            "needs root (it builds network namespaces)"
        );
        Ok(Lab {
            prefix: format!("cnkb-{tag}-{}", std::process::id()),
            namespaces: Vec::new(),
            children: Vec::new(),
            dir: tempfile::Builder::new()
                .prefix(&format!("cnkb-{tag}-"))
                .tempdir()?,
        })
    }

    /// A fresh namespace `<prefix>-<suffix>` with `lo` up; returns its name.
    pub fn netns(&mut self, suffix: &str) -> Result<String> {
        let name = format!("{}-{suffix}", self.prefix);
        netns::create_named(&name)?;
        self.namespaces.push(name.clone());
        ip_in(&name, &["link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// Starts `cmd` inside namespace `ns`; the lab ends it on drop. Returns its PID.
    pub fn spawn(&mut self, what: &str, ns: &str, mut cmd: Command) -> Result<u32> {
        enter_on_exec(&mut cmd, ns)?;
        let child = cmd.spawn().with_context(|| format!("start {what}"))?;
        let pid = child.id();
        self.children.push(Proc {
            what: what.to_owned(),
            child,
        });
        Ok(pid)
    }

    /// Runs `cmd` inside namespace `ns` to completion and returns its output.
    pub fn output_in(&self, ns: &str, mut cmd: Command) -> Result<std::process::Output> {
        enter_on_exec(&mut cmd, ns)?;
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .context("run a command in a netns")?;
        Ok(out)
    }

    /// Whether the process `pid` still runs; an error naming it if it exited.
    pub fn check_alive(&mut self, pid: u32) -> Result<()> {
        let Some(p) = self.children.iter_mut().find(|p| p.child.id() == pid) else {
            bail!("process {pid} is not one of the lab's");
        };
        if let Some(status) = p.child.try_wait()? {
            bail!("{} (pid {pid}) exited: {status}", p.what);
        }
        Ok(())
    }

    /// Ends process `pid` with SIGTERM (SIGKILL after `grace`) and reaps it.
    pub fn stop(&mut self, pid: u32, grace: Duration) -> Result<ExitStatus> {
        let i = self
            .children
            .iter()
            .position(|p| p.child.id() == pid)
            .context("not one of the lab's processes")?;
        let mut p = self.children.swap_remove(i);
        Ok(terminate(&mut p.child, grace))
    }

    /// An underlay: namespace `<prefix>-<tag>u` with bridge `br0` (netfilter calls off, as
    /// on a switch; address [`SERVICE_ADDRESS`]) and `nodes` node namespaces
    /// `<prefix>-<tag>n<i>`, each with `eth0` on the bridge at [`node_address`]`(i)`/16.
    /// Node `i` is named `<tag>node<i>`. Underlay addresses are resolved statically.
    pub fn underlay(&mut self, tag: &str, nodes: usize) -> Result<Underlay> {
        let ns = self.netns(&format!("{tag}u"))?;
        ip_in(&ns, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(
            &ns,
            &[
                "link",
                "set",
                "br0",
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
        ip_in(&ns, &["link", "set", "br0", "up"])?;
        let mut list = Vec::new();
        for i in 0..nodes {
            let node_ns = self.netns(&format!("{tag}n{i}"))?;
            let port = format!("n{i}");
            ip_in(
                &node_ns,
                &[
                    "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &ns,
                ],
            )?;
            ip_in(&ns, &["link", "set", &port, "master", "br0", "up"])?;
            let address = node_address(i);
            ip_in(
                &node_ns,
                &[
                    "addr",
                    "add",
                    &format!("{address}/{UNDERLAY_PREFIX_LEN}"),
                    "dev",
                    "eth0",
                ],
            )?;
            ip_in(&node_ns, &["link", "set", "eth0", "up"])?;
            let name = format!("{tag}node{i}");
            list.push(Node {
                data_dir: self.dir.path().join(&name),
                name,
                ns: node_ns,
                address,
            });
        }
        ip_in(
            &ns,
            &[
                "addr",
                "add",
                &format!("{SERVICE_ADDRESS}/{UNDERLAY_PREFIX_LEN}"),
                "dev",
                "br0",
            ],
        )?;
        // Static ARP on the underlay. The kernel's table of dynamic neighbour entries is one
        // for all namespaces of the machine (net.ipv4.neigh.default.gc_thresh3, 1024 by
        // default); when other namespaces fill it, new entries fail ("neighbor table
        // overflow", ENOBUFS) and the underlay would drop packets at random. Permanent entries
        // do not count against it. Every path the benchmarks compare gets the same underlay.
        let mut stations = vec![(ns.clone(), "br0", SERVICE_ADDRESS.parse()?)];
        stations.extend(list.iter().map(|n| (n.ns.clone(), "eth0", n.address)));
        let macs = stations
            .iter()
            .map(|(ns, dev, _)| mac_of(ns, dev))
            .collect::<Result<Vec<_>>>()?;
        for (i, (ns, dev, _)) in stations.iter().enumerate() {
            for (j, (_, _, address)) in stations.iter().enumerate() {
                if i != j {
                    static_neighbour(ns, dev, &address.to_string(), &macs[j])?;
                }
            }
        }
        Ok(Underlay { ns, nodes: list })
    }

    /// The shared file store of the lab's network (`<dir>/store`).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Starts the real `cnikit-agent` in `node`'s namespace with the configuration list
    /// `conflist` (see [`conflist`]), logging to `<dir>/<node>.agent.log`, and waits until it
    /// wrote its node state file. Returns its PID.
    pub async fn start_agent(
        &mut self,
        agent: &Path,
        node: &Node,
        conflist: &Value,
        log: &str,
    ) -> Result<u32> {
        let conf_path = self.dir.path().join(format!("{}.conflist", node.name));
        std::fs::write(&conf_path, serde_json::to_vec_pretty(conflist)?)?;
        let log_path = self.agent_log(&node.name);
        let mut cmd = Command::new(agent);
        cmd.arg("--conflist")
            .arg(&conf_path)
            .arg("--log")
            .arg(log)
            .env_remove("CNIKIT_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log_path)?);
        let pid = self.spawn(&format!("cnikit-agent of {}", node.name), &node.ns, cmd)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if NodeState::read(&node.data_dir)?.is_some() {
                return Ok(pid);
            }
            if let Err(e) = self.check_alive(pid) {
                let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("{e}\n--- {} ---\n{tail}", log_path.display());
            }
            ensure!(
                Instant::now() < deadline,
                "the agent of {} did not come up in 20 s (log: {})",
                node.name,
                log_path.display()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Where the agent of node `name` logs.
    pub fn agent_log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.agent.log"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Last started, first stopped: agents deregister while the datastore still runs.
        for p in self.children.iter_mut().rev() {
            let status = terminate(&mut p.child, Duration::from_secs(3));
            if !status.success() && std::env::var_os("CNIKIT_BENCH_VERBOSE").is_some() {
                eprintln!("{} ended: {status}", p.what);
            }
        }
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = netns::delete_named(ns) {
                eprintln!("cannot remove namespace {ns}: {e}");
            }
        }
        if std::env::var_os("CNIKIT_BENCH_KEEP").is_some() {
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
            eprintln!("kept {}", kept.keep().display());
        }
    }
}

/// Makes `cmd` enter namespace `ns` between fork and exec.
fn enter_on_exec(cmd: &mut Command, ns: &str) -> Result<()> {
    let file = File::open(ns_path(ns)).with_context(|| format!("open netns {ns}"))?;
    // SAFETY: only setns(2), a plain syscall, runs between fork and exec. The closure owns
    // the file, so the fd stays open as long as `cmd` may spawn; it has O_CLOEXEC, so the
    // program never sees it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// SIGTERM, wait up to `grace`, SIGKILL; reaps the child.
fn terminate(child: &mut Child, grace: Duration) -> ExitStatus {
    if let Ok(Some(status)) = child.try_wait() {
        return status;
    }
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    child.wait().unwrap_or_else(|_| {
        use std::os::unix::process::ExitStatusExt;
        ExitStatus::from_raw(-1)
    })
}

/// The node namespaces on one bridge.
#[derive(Debug)]
pub struct Underlay {
    /// The namespace of the bridge.
    pub ns: String,
    /// The nodes.
    pub nodes: Vec<Node>,
}

/// One node of an [`Underlay`].
#[derive(Debug, Clone)]
pub struct Node {
    /// Node name (`node<i>`).
    pub name: String,
    /// Its namespace.
    pub ns: String,
    /// Its underlay address.
    pub address: Ipv4Addr,
    /// Its data directory (node state file).
    pub data_dir: PathBuf,
}

/// The node record of a peer that does not exist: `name`, an underlay `address`, the /26
/// block at `block`, and for vxlan a VTEP (the block's first address, a MAC made from
/// `index`).
pub fn synthetic_peer(
    name: String,
    index: u32,
    address: Ipv4Addr,
    block: Ipv4Addr,
    mode: &str,
) -> NodeRecord {
    let mut backend = std::collections::BTreeMap::new();
    if mode == "vxlan" {
        let [_, _, hi, lo] = index.to_be_bytes();
        backend.insert(
            "vtepMac".to_owned(),
            format!("02:cb:00:00:{hi:02x}:{lo:02x}"),
        );
        backend.insert("vtepAddr".to_owned(), block.to_string());
    }
    NodeRecord {
        name,
        address: IpAddr::V4(address),
        prefix_len: UNDERLAY_PREFIX_LEN,
        blocks: vec![IpNet::new(IpAddr::V4(block), 26).expect("valid prefix")],
        backend,
    }
}

/// The `ipam.store` object of the file store in `dir`.
pub fn file_store(dir: &Path) -> Value {
    json!({ "type": "file", "path": dir })
}

/// The configuration list of the benchmark network for `node`: the `cnikit` plugin with
/// pod network `pod_network`, routing `mode`, the block IPAM on the datastore `store` (an
/// `ipam.store` object, see [`file_store`]), and the agent on `eth0`. `agent` adds agent
/// keys (`resyncSeconds`…).
pub fn conflist(node: &Node, mode: &str, pod_network: &str, store: Value, agent: Value) -> Value {
    let mut agent_keys = json!({ "interface": "eth0" });
    if let (Some(keys), Value::Object(more)) = (agent_keys.as_object_mut(), agent) {
        keys.extend(more);
    }
    json!({
        "cniVersion": "1.0.0",
        "name": "bench",
        "plugins": [{
            "type": "cnikit",
            "podNetwork": pod_network,
            "routing": mode,
            "nodeName": node.name,
            "dataDir": node.data_dir,
            "logLevel": "warn",
            "ipam": {
                "type": "cnikit-ipam",
                "pool": POOL,
                "blockSize": 26,
                "store": store
            },
            "agent": agent_keys
        }]
    })
}

/// Resolves on SIGINT or SIGTERM.
pub async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Median, 90th percentile and maximum of a sample.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    /// Median.
    pub median: f64,
    /// 90th percentile (nearest rank).
    pub p90: f64,
    /// Maximum.
    pub max: f64,
    /// Minimum.
    pub min: f64,
}

impl Stats {
    /// Of a non-empty sample.
    pub fn of(values: &[f64]) -> Stats {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        assert!(n > 0, "an empty sample");
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        let rank = ((n as f64) * 0.9).ceil() as usize;
        Stats {
            median,
            p90: v[rank.clamp(1, n) - 1],
            max: v[n - 1],
            min: v[0],
        }
    }

    /// Of durations, in milliseconds.
    pub fn of_ms(values: &[Duration]) -> Stats {
        Stats::of(
            &values
                .iter()
                .map(|d| d.as_secs_f64() * 1000.0)
                .collect::<Vec<_>>(),
        )
    }
}
