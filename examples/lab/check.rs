//! `check`: every pod pings every other pod (and each node pings each pod, and each pod each
//! node's underlay address), all at once, with `ip netns exec <ns> ping -c1 -W1 <ip>`; a probe
//! that fails is tried once more with `-W2` before it counts as unreachable. With `--tor`
//! the top-of-rack router pings every pod too.

use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt;
use serde::Serialize;
use tokio::process::Command;

use crate::state::Lab;

/// How many pings run at the same time, per CPU. More only makes them wait for a CPU, and a
/// ping that is not scheduled within its one second counts as lost.
const PARALLEL_PER_CPU: usize = 8;

fn parallel() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) * PARALLEL_PER_CPU
}

/// One ping.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    /// Source: a pod (`node1/pod1`) or a node (`node1`).
    pub from: String,
    /// Destination: a pod or a node.
    pub to: String,
    /// Destination address.
    pub ip: String,
    /// Whether a reply came back.
    pub ok: bool,
    /// Whether it answered only when tried again (the first ping was lost, or not scheduled
    /// in time on a busy machine).
    pub retried: bool,
    /// Round trip of the whole `ping` process, milliseconds.
    pub ms: u64,
}

/// The whole result.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Pods: name and address.
    pub pods: Vec<(String, String)>,
    /// Nodes: name and underlay address.
    pub nodes: Vec<(String, String)>,
    /// Pod to pod, every ordered pair of distinct pods.
    pub pod_to_pod: Vec<Probe>,
    /// Node to pod, every node to every pod.
    pub node_to_pod: Vec<Probe>,
    /// Pod to node: every pod to every node's underlay address.
    pub pod_to_node: Vec<Probe>,
    /// The top-of-rack router (`--tor`) to every pod, over the routes it learned by eBGP.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tor_to_pod: Vec<Probe>,
    /// Whether every probe succeeded.
    pub ok: bool,
    /// Wall time of the check, milliseconds.
    pub elapsed_ms: u64,
}

struct Job {
    ns: String,
    from: String,
    to: String,
    ip: String,
    kind: usize,
}

/// Runs every probe.
pub async fn run(lab: &Lab) -> Result<Report> {
    let started = Instant::now();
    let pods: Vec<(String, String, String)> = lab
        .pods()
        .filter_map(|(_, p)| p.ip().map(|ip| (p.name.clone(), p.ns.clone(), ip)))
        .collect();
    let mut jobs = Vec::new();
    for (from, ns, _) in &pods {
        for (to, _, ip) in &pods {
            if from != to {
                jobs.push(Job {
                    ns: ns.clone(),
                    from: from.clone(),
                    to: to.clone(),
                    ip: ip.clone(),
                    kind: 0,
                });
            }
        }
    }
    for node in &lab.nodes {
        for (to, _, ip) in &pods {
            jobs.push(Job {
                ns: node.ns.clone(),
                from: node.name.clone(),
                to: to.clone(),
                ip: ip.clone(),
                kind: 1,
            });
        }
    }
    for (from, ns, _) in &pods {
        for node in &lab.nodes {
            jobs.push(Job {
                ns: ns.clone(),
                from: from.clone(),
                to: node.name.clone(),
                ip: node.address.to_string(),
                kind: 2,
            });
        }
    }
    if let Some(tor) = &lab.tor {
        for (to, _, ip) in &pods {
            jobs.push(Job {
                ns: tor.ns.clone(),
                from: crate::tor::TOR_PEER.to_owned(),
                to: to.clone(),
                ip: ip.clone(),
                kind: 3,
            });
        }
    }
    let first: Vec<(usize, usize, (Probe, String))> =
        futures::stream::iter(jobs.into_iter().enumerate())
            .map(|(i, job)| async move {
                let started = Instant::now();
                let ok = ping(&job.ns, &job.ip, 1).await;
                let probe = Probe {
                    from: job.from,
                    to: job.to,
                    ip: job.ip,
                    ok,
                    retried: false,
                    ms: started.elapsed().as_millis() as u64,
                };
                (i, job.kind, (probe, job.ns))
            })
            .buffer_unordered(parallel())
            .collect()
            .await;
    // Every failure is tried once more, with more time: what fails twice is unreachable.
    let mut results: Vec<(usize, usize, Probe)> = futures::stream::iter(first)
        .map(|(i, kind, (mut probe, ns))| async move {
            if !probe.ok {
                let started = Instant::now();
                probe.ok = ping(&ns, &probe.ip, 2).await;
                probe.retried = probe.ok;
                probe.ms = started.elapsed().as_millis() as u64;
            }
            (i, kind, probe)
        })
        .buffer_unordered(parallel())
        .collect()
        .await;
    results.sort_by_key(|(i, _, _)| *i);
    let mut sets: [Vec<Probe>; 4] = Default::default();
    for (_, kind, probe) in results {
        sets[kind].push(probe);
    }
    let [pod_to_pod, node_to_pod, pod_to_node, tor_to_pod] = sets;
    let ok = pod_to_pod
        .iter()
        .chain(&node_to_pod)
        .chain(&pod_to_node)
        .chain(&tor_to_pod)
        .all(|p| p.ok);
    Ok(Report {
        pods: pods.into_iter().map(|(n, _, ip)| (n, ip)).collect(),
        nodes: lab
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.address.to_string()))
            .collect(),
        pod_to_pod,
        node_to_pod,
        pod_to_node,
        tor_to_pod,
        ok,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

/// `ip netns exec NS ping -c1 -W<wait> IP`: whether a reply came.
async fn ping(ns: &str, ip: &str, wait: u32) -> bool {
    if crate::net::guard(ns).is_err() {
        return false;
    }
    let wait = format!("-W{wait}");
    let run = Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-n", "-q", "-c1", &wait, ip])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    matches!(
        tokio::time::timeout(Duration::from_secs(5), run).await,
        Ok(Ok(status)) if status.success()
    )
}

/// Short column tag of a pod: `node1/pod2` → `1.2`.
fn tag(name: &str) -> String {
    name.replace("node", "").replace("/pod", ".")
}

/// The matrix cell of the probe from `from` to `to`.
fn verdict(probes: &[Probe], from: &str, to: &str) -> &'static str {
    match probes.iter().find(|p| p.from == from && p.to == to) {
        Some(p) if p.ok => "ok",
        Some(_) => "FAIL",
        None => "?",
    }
}

/// Prints the matrices.
pub fn print(report: &Report) {
    let pods: Vec<&str> = report.pods.iter().map(|(n, _)| n.as_str()).collect();
    let width = pods.iter().map(|p| p.len()).max().unwrap_or(4).max(10);
    let count = |probes: &[Probe]| (probes.iter().filter(|p| p.ok).count(), probes.len());

    let (ok, total) = count(&report.pod_to_pod);
    println!("pod -> pod: {ok}/{total} pairs answer (row: from, column: to; tag node.pod)");
    print!("{:width$}", "");
    for p in &pods {
        print!(" {:>5}", tag(p));
    }
    println!();
    for from in &pods {
        print!("{from:width$}");
        for to in &pods {
            let cell = if from == to {
                "-"
            } else {
                verdict(&report.pod_to_pod, from, to)
            };
            print!(" {cell:>5}");
        }
        println!();
    }
    let nodes: Vec<&str> = report.nodes.iter().map(|(n, _)| n.as_str()).collect();
    let (ok, total) = count(&report.node_to_pod);
    println!("\nnode -> pod: {ok}/{total} answer");
    for node in &nodes {
        print!("{node:width$}");
        for to in &pods {
            let cell = verdict(&report.node_to_pod, node, to);
            print!(" {cell:>5}");
        }
        println!();
    }
    let (ok, total) = count(&report.pod_to_node);
    println!("\npod -> node (underlay address): {ok}/{total} answer");
    print!("{:width$}", "");
    for node in &nodes {
        print!(" {node:>6}");
    }
    println!();
    for from in &pods {
        print!("{from:width$}");
        for node in &nodes {
            let cell = verdict(&report.pod_to_node, from, node);
            print!(" {cell:>6}");
        }
        println!();
    }
    if !report.tor_to_pod.is_empty() {
        let (ok, total) = count(&report.tor_to_pod);
        println!(
            "\ntop-of-rack router -> pod (over the routes it learned by eBGP): {ok}/{total} \
             answer"
        );
        print!("{:width$}", crate::tor::TOR_PEER);
        for to in &pods {
            print!(
                " {:>5}",
                verdict(&report.tor_to_pod, crate::tor::TOR_PEER, to)
            );
        }
        println!();
    }
    println!("\npods:");
    for (name, ip) in &report.pods {
        println!("  {:>5}  {name:width$} {ip}", tag(name));
    }
    let retried = report
        .pod_to_pod
        .iter()
        .chain(&report.node_to_pod)
        .chain(&report.pod_to_node)
        .chain(&report.tor_to_pod)
        .filter(|p| p.retried)
        .count();
    if retried > 0 {
        println!("({retried} probes answered only when tried again)");
    }
    println!(
        "\n{} in {} ms",
        if report.ok {
            "all probes answered"
        } else {
            "SOME PROBES FAILED"
        },
        report.elapsed_ms
    );
}
