//! `up`: the underlay, etcd, the nodes with their agents, the pods.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cnikit::core::state::NodeState;

use crate::cni::{self, Binaries};
use crate::state::{self, Etcd, Lab, Node, Pod, PodNetwork, StoreKind, Topology, Underlay};
use crate::{UpArgs, down, ebpf, kube, modes, net, procs, store, tor};

/// How long a node may take to become ready (agent up, STATUS ok).
const READY_WITHIN: Duration = Duration::from_secs(60);

/// `up`: builds the lab; on failure (or SIGINT/SIGTERM) removes what it built.
pub async fn up(name: &str, args: &UpArgs) -> Result<()> {
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
    let ipip_mode = state::ipip_mode(&args.mode, args.ipip_mode, args.direct_routing)?;
    let bgp_engine = match (args.mode == cnikit::bgp::TYPE, args.bgp_engine) {
        (false, Some(_)) => bail!("--bgp-engine is for --mode bgp only"),
        (false, None) => None,
        (true, Some(crate::BgpEngine::Bird)) => {
            if which("bird").is_err() || which("birdc").is_err() {
                bail!("--bgp-engine bird needs BIRD 2: apt-get install -y bird2");
            }
            Some(cnikit::bgp::Engine::Bird)
        }
        (true, _) => Some(cnikit::bgp::Engine::Native),
    };
    let bgp = args.mode == cnikit::bgp::TYPE;
    if !bgp && (args.bgp_topology.is_some() || args.reflectors.is_some() || args.tor.is_some()) {
        bail!("--bgp-topology, --reflectors and --tor are for --mode bgp only");
    }
    let bgp_reflectors = match (args.bgp_topology, args.reflectors) {
        (Some(crate::BgpTopology::Reflector), n) => n.unwrap_or(1),
        (_, Some(_)) => bail!("--reflectors needs --bgp-topology reflector"),
        _ => 0,
    };
    if args.tor.is_some() {
        if args.topology != Topology::Flat {
            bail!("--tor needs --topology flat (the router peers over one segment)");
        }
        if which("bird").is_err() || which("birdc").is_err() {
            bail!("--tor bird needs BIRD 2: apt-get install -y bird2");
        }
    }
    // Before anything is built: an agent making the ipip device would load the module.
    state::ipip_kernel(
        &args.mode,
        ipip_mode.is_none() || testkit::vm::kernel_has_link_kind("ipip"),
    )?;
    if args.store != StoreKind::File && which("etcd").is_err() {
        bail!("--store etcd and kubernetes need the etcd server: apt-get install -y etcd-server");
    }
    if args.store == StoreKind::Kubernetes {
        kube::preflight()?;
    }
    let mut lab = Lab {
        name: name.to_owned(),
        mode: args.mode.clone(),
        direct_routing: args.direct_routing,
        ipip_mode,
        bgp_engine,
        bgp_reflectors,
        tor: None,
        pod_network: args
            .pod_network
            .unwrap_or(if args.mode == cnikit::ebpf::TYPE {
                PodNetwork::Ebpf
            } else {
                PodNetwork::Bridge
            }),
        store: args.store,
        topology: args.topology,
        ttl_seconds: args.ttl.max(1),
        resync_seconds: args.resync.max(1),
        pods_per_node: args.pods,
        next_index: 1,
        underlays: Vec::new(),
        router: None,
        etcd: None,
        kube: None,
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
                lab.mode_label(),
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
                if let Err(d) = down::down(name).await {
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

/// The end of every agent's and plugin's log (those not already in `message`), to explain
/// a failure.
pub fn diagnostics(lab: &Lab, message: &str) {
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
    let servers = [
        ("etcd", lab.etcd.as_ref().and_then(|e| e.proc.as_ref())),
        (
            "kube-apiserver",
            lab.kube.as_ref().and_then(|k| k.proc.as_ref()),
        ),
    ];
    for (what, proc) in servers {
        if let Some(proc) = proc {
            let tail = procs::log_tail(&proc.log, 15);
            if !tail.is_empty() {
                eprintln!("--- {what} log ({}):\n{tail}", proc.log.display());
            }
        }
    }
}

async fn build(lab: &mut Lab, bins: &Binaries, args: &UpArgs) -> Result<()> {
    let phase = Instant::now();
    ebpf::check_pod_network(&lab.mode, lab.pod_network)?;
    if lab.pod_network == PodNetwork::Ebpf {
        ebpf::mount(lab)?;
    }
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
    if lab.store != StoreKind::File {
        // The nodes' datastore, or the API server's.
        start_etcd(lab).await?;
    }
    if lab.store == StoreKind::Kubernetes {
        kube::start(lab).await?;
    }
    if args.tor.is_some() {
        lab.tor = Some(tor::plan(lab));
        lab.save()?;
        tor::build(lab).await?;
    }
    println!(
        "underlay ready ({} segment(s){}{}) in {} ms",
        lab.underlays.len(),
        match lab.store {
            StoreKind::File => "",
            StoreKind::Etcd => ", etcd up",
            StoreKind::Kubernetes => ", etcd and kube-apiserver up",
        },
        if lab.tor.is_some() {
            ", top-of-rack router namespace"
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
    tor::sync(lab).await?;
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
    wait_blocks_announced(lab, &names).await?;
    wait_routed(lab, Duration::from_secs(20)).await?;
    tor::wait_learned(lab, Duration::from_secs(20)).await
}

/// Waits until every node's agent knows every other node of the lab and has routed it: the
/// node state lists each other node among its peers (the agent writes it at the end of the
/// reconcile that programmed their routes), and in `bgp` mode its BGP report lists a route
/// to each other node's blocks (learned over sessions that may take a second or more to
/// come up, BIRD's first attempt waits its connect delay of 1 s). A peer the mode reports
/// as unroutable counts as done: `show` and `check` say why. Past `within` it says what is
/// missing and returns: `check` then shows which pods do not answer.
pub async fn wait_routed(lab: &Lab, within: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let missing = unrouted(lab)?;
        if missing.is_empty() {
            return Ok(());
        }
        if started.elapsed() > within {
            println!(
                "warning: not every node routes every other node after {} ms: {}",
                started.elapsed().as_millis(),
                missing.join("; ")
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What [`wait_routed`] still waits for, from the nodes' state files.
fn unrouted(lab: &Lab) -> Result<Vec<String>> {
    let states = lab
        .nodes
        .iter()
        .map(|n| Ok((n.name.as_str(), NodeState::read(&n.data_dir())?)))
        .collect::<Result<Vec<_>>>()?;
    // Without IPIP, BGP routes only to next hops on the node's own underlay subnet (BIRD
    // drops the others without saying so): peers across the router are not waited for.
    let subnet: std::collections::BTreeMap<&str, usize> = lab
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), n.underlay))
        .collect();
    let bgp_reaches =
        |node: &str, peer: &str| lab.ipip_mode.is_some() || subnet.get(node) == subnet.get(peer);
    Ok(missing_routes(&lab.mode, &states, &bgp_reaches))
}

/// What [`wait_routed`] still waits for in the nodes' states (`None`: not written yet), one
/// entry per node and peer; in `bgp` mode a route to a peer's blocks only where
/// `bgp_reaches(node, peer)`. Pure.
fn missing_routes(
    mode: &str,
    states: &[(&str, Option<NodeState>)],
    bgp_reaches: &dyn Fn(&str, &str) -> bool,
) -> Vec<String> {
    let mut missing = Vec::new();
    for (name, state) in states {
        let Some(state) = state else {
            missing.push(format!("{name}: no node state yet"));
            continue;
        };
        let report = crate::bgp::report(state);
        // Every prefix the BGP report lists as installed (`PREFIX via NEXT_HOP`).
        let learned: Vec<&str> = report
            .iter()
            .flat_map(|r| r.installed.values().flatten())
            .filter_map(|route| route.split_whitespace().next())
            .collect();
        for (peer, peer_state) in states {
            let reported_unroutable = report
                .as_ref()
                .is_some_and(|r| r.unroutable.contains_key(*peer));
            if peer == name || state.unroutable.contains_key(*peer) || reported_unroutable {
                continue;
            }
            if !state.peers.iter().any(|p| p == peer) {
                missing.push(format!("{name} does not know {peer} yet"));
            } else if mode == "bgp" && bgp_reaches(name, peer) {
                let blocks = peer_state
                    .as_ref()
                    .map(|s| s.blocks.as_slice())
                    .unwrap_or_default();
                let unlearned: Vec<String> = blocks
                    .iter()
                    .map(ToString::to_string)
                    .filter(|b| !learned.contains(&b.as_str()))
                    .collect();
                if !unlearned.is_empty() {
                    missing.push(format!(
                        "{name} has no BGP route to {peer}'s {}",
                        unlearned.join(", ")
                    ));
                }
            }
        }
    }
    missing
}

/// Waits until the agents of `nodes` announce every block their pods got addresses from.
/// A node whose pods outgrew its first block holds another one, which its agent picks up
/// when it re-reads its own blocks (every second); until then the other nodes have no route
/// to it.
pub async fn wait_blocks_announced(lab: &Lab, nodes: &[String]) -> Result<()> {
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
                 the agents to announce them (they re-read their blocks every second)",
                missing.len()
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

/// `program`'s path on `PATH`.
pub fn which(program: &str) -> Result<std::path::PathBuf> {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(program))
                .find(|c| c.is_file())
        })
        .with_context(|| format!("{program} is not on PATH"))
}

/// Creates node `index`: its namespace on its segment and its configuration list.
pub async fn add_node(lab: &mut Lab, index: u32) -> Result<String> {
    let name = format!("node{index}");
    let underlay = match lab.topology {
        Topology::Flat => 0,
        Topology::TwoSubnets => ((index - 1) % 2) as usize,
    };
    // Reflectors: the first nodes, and a new one while fewer than asked for are left.
    let reflector = lab.nodes.iter().filter(|n| n.reflector).count() < lab.bgp_reflectors as usize;
    let node = Node {
        reflector,
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
pub fn start_agent(lab: &mut Lab, bins: &Binaries, index: u32) -> Result<std::process::Child> {
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
pub async fn wait_ready_all(lab: &Lab, children: Vec<(String, std::process::Child)>) -> Result<()> {
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
pub async fn add_pods(lab: &mut Lab, node: &str, count: u32) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn missing_routes_everywhere(mode: &str, states: &[(&str, Option<NodeState>)]) -> Vec<String> {
        missing_routes(mode, states, &|_, _| true)
    }

    fn state(
        name: &str,
        block: &str,
        peers: &[&str],
        routing: Option<serde_json::Value>,
    ) -> NodeState {
        let mut s = NodeState::new(name, "bgp", 1500, vec![block.parse().unwrap()]);
        s.peers = peers.iter().map(|p| p.to_string()).collect();
        s.routing = routing;
        s
    }

    #[test]
    fn a_node_is_routed_once_it_knows_its_peers() {
        let a = state("a", "10.244.0.0/26", &["b"], None);
        let b = state("b", "10.244.0.64/26", &[], None);
        let missing =
            missing_routes_everywhere("host-gw", &[("a", Some(a.clone())), ("b", Some(b))]);
        assert_eq!(missing, ["b does not know a yet"]);
        let missing = missing_routes_everywhere("host-gw", &[("a", Some(a.clone())), ("b", None)]);
        assert_eq!(missing, ["b: no node state yet"]);
        let b = state("b", "10.244.0.64/26", &["a"], None);
        assert!(missing_routes_everywhere("host-gw", &[("a", Some(a)), ("b", Some(b))]).is_empty());
    }

    #[test]
    fn an_unroutable_peer_counts_as_done() {
        let mut a = state("a", "10.244.0.0/26", &[], None);
        a.unroutable.insert("b".into(), "not on-link".into());
        let b = state("b", "10.244.0.64/26", &["a"], None);
        assert!(missing_routes_everywhere("host-gw", &[("a", Some(a)), ("b", Some(b))]).is_empty());
    }

    #[test]
    fn bgp_waits_for_a_route_to_every_block_of_every_peer() {
        let report_with = |installed: serde_json::Value, unroutable: serde_json::Value| {
            Some(json!({
                "asNumber": 64512,
                "routerId": "172.30.1.11",
                "listen": "172.30.1.11:179",
                "peers": [],
                "installed": installed,
                "unroutable": unroutable,
            }))
        };
        let report = |installed: serde_json::Value| report_with(installed, json!({}));
        // a knows b from the registry, but its session has not brought b's block yet.
        let a = state("a", "10.244.0.0/26", &["b"], report(json!({})));
        let b = state(
            "b",
            "10.244.0.64/26",
            &["a"],
            report(json!({"a": ["10.244.0.0/26 via 172.30.1.11"]})),
        );
        let missing = missing_routes_everywhere("bgp", &[("a", Some(a)), ("b", Some(b.clone()))]);
        assert_eq!(missing, ["a has no BGP route to b's 10.244.0.64/26"]);
        // Learned through a route reflector: any peer of the report will do.
        let a = state(
            "a",
            "10.244.0.0/26",
            &["b"],
            report(json!({"rr": ["10.244.0.64/26 via 172.30.1.12"]})),
        );
        assert!(
            missing_routes_everywhere("bgp", &[("a", Some(a)), ("b", Some(b.clone()))]).is_empty()
        );
        // A peer the BGP report calls unroutable is done too.
        let a = state(
            "a",
            "10.244.0.0/26",
            &["b"],
            report_with(
                json!({}),
                json!({"b": "next hop 172.30.2.12 is not in the underlay subnet"}),
            ),
        );
        assert!(
            missing_routes_everywhere("bgp", &[("a", Some(a)), ("b", Some(b.clone()))]).is_empty()
        );
        // A peer BGP cannot reach (another subnet, no IPIP) is not waited for.
        let a = state("a", "10.244.0.0/26", &["b"], report(json!({})));
        let states = [("a", Some(a)), ("b", Some(b))];
        assert_eq!(missing_routes_everywhere("bgp", &states).len(), 1);
        assert!(missing_routes("bgp", &states, &|node, _| node != "a").is_empty());
    }
}
