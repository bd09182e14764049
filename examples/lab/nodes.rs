//! `node-add` and `node-del`: grow and shrink a running lab.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::cni::{self, Binaries};
use crate::state::Lab;
use crate::{STOP_GRACE, net, procs, show, unix_ms, up};

/// `node-add`: a new node (never a reused name, address or index), its agent and pods. On
/// failure the new node is removed again.
pub async fn node_add(name: &str, pods: Option<u32>) -> Result<()> {
    let bins = Binaries::find()?;
    let mut lab = Lab::require(name)?;
    let index = lab
        .next_index
        .max(lab.nodes.iter().map(|n| n.index + 1).max().unwrap_or(1));
    let started = Instant::now();
    let result = async {
        let node = up::add_node(&mut lab, index).await?;
        let child = up::start_agent(&mut lab, &bins, index)?;
        crate::tor::sync(&mut lab).await?;
        up::wait_ready_all(&lab, vec![(node.clone(), child)]).await?;
        let count = pods.unwrap_or(lab.pods_per_node);
        up::add_pods(&mut lab, &node, count).await?;
        up::wait_blocks_announced(&lab, std::slice::from_ref(&node)).await?;
        up::wait_routed(&lab, Duration::from_secs(20)).await?;
        crate::tor::wait_learned(&lab, Duration::from_secs(20)).await?;
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
            up::diagnostics(&lab, &message);
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

/// `node-del`: removes `node` and reports how soon the others forgot it.
pub async fn node_del(name: &str, node: &str) -> Result<()> {
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

/// How soon after a removed node's SIGTERM the other nodes (and the top-of-rack router) must
/// hold nothing towards it. It counts the agent's own stop too; the peers usually forget the
/// node within milliseconds (its agent deregisters first), the rest is slack for a loaded
/// machine.
const FORGET_WITHIN: Duration = Duration::from_secs(10);

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
            match procs::stop(proc, STOP_GRACE).await {
                Err(e) => {
                    errors.push(format!("stopping the agent: {e:#}"));
                    format!("pid {} could not be stopped", proc.pid)
                }
                Ok(procs::Stopped::AlreadyGone) => {
                    format!("pid {} had already exited", proc.pid)
                }
                Ok(procs::Stopped::Terminated(after)) => format!(
                    "pid {} got SIGTERM at unix_ms {signalled}, exited after {} ms",
                    proc.pid,
                    after.as_millis()
                ),
                Ok(procs::Stopped::Killed) => {
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
            // A failed look is reported, not returned: the node's namespaces still go below.
            let traces = match show::traces_of(cluster, other, node).await {
                Ok(traces) => traces,
                Err(e) => {
                    errors.push(format!(
                        "reading {}'s entries towards {node}: {e:#}",
                        other.name
                    ));
                    break;
                }
            };
            if traces.is_empty() {
                forgotten.push(format!(
                    "{}: no route, neighbour or FDB entry towards {node} left {} ms after \
                     the SIGTERM",
                    other.name,
                    signalled.elapsed().as_millis()
                ));
                break;
            }
            if signalled.elapsed() > FORGET_WITHIN {
                errors.push(format!(
                    "{} still holds entries towards {node} {FORGET_WITHIN:?} after the SIGTERM: {}",
                    other.name,
                    traces.join("; ")
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    if watch.is_some() && lab.tor.is_some() {
        let address = gone.address.to_string();
        match crate::tor::forgotten(lab, &address, FORGET_WITHIN).await {
            Ok(_) => forgotten.push(format!(
                "top-of-rack router: no route via {node} ({address}) left {} ms after the \
                 SIGTERM",
                signalled.elapsed().as_millis()
            )),
            Err(e) => errors.push(format!("{e:#}")),
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
    if let Err(e) = crate::ebpf::forget_node(lab, node) {
        errors.push(format!("{e:#}"));
    }
    lab.nodes.retain(|n| n.name != node);
    lab.save()?;
    // The router's session with the node goes from its configuration.
    if let Err(e) = crate::tor::sync(lab).await {
        errors.push(format!("{e:#}"));
    }
    if gone.dir.starts_with(lab.dir()) {
        let _ = std::fs::remove_dir_all(&gone.dir);
    }
    if !errors.is_empty() {
        bail!("removing {node}: {}", errors.join("; "));
    }
    Ok(Removal { agent, forgotten })
}
