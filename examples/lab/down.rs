//! `down`: remove everything a lab made, also after a failed or interrupted `up`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use crate::state::{self, Lab, StoreKind};
use crate::{STOP_GRACE, cni, net, procs, store};

/// `down`: removes everything lab `name` made; exit 1 when something was left over.
pub async fn down(name: &str) -> Result<ExitCode> {
    let dir = state::state_dir(name);
    let lab = match Lab::load(name) {
        Ok(lab) => lab,
        Err(e) => {
            eprintln!(
                "lab: the state file is unreadable ({e:#}); sweeping namespaces only (the \
                 agents, etcd and kube-apiserver it recorded are not stopped: their PIDs are unknown)"
            );
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
    crate::ebpf::unmount(name, &mut problems);
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

/// DEL every pod, stop every agent and the top-of-rack router, look at the store, stop
/// the API server and etcd.
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
    for node in &lab.nodes {
        bird_left(&node.name, &node.data_dir().join("bird"), problems);
    }
    crate::tor::stop(lab, problems).await;
    let alive = |proc: Option<&state::Proc>| {
        proc.is_some_and(|p| procs::liveness(p) == procs::Liveness::Alive)
    };
    let etcd_alive = alive(lab.etcd.as_ref().and_then(|e| e.proc.as_ref()));
    let readable = match lab.store {
        StoreKind::File => true,
        StoreKind::Etcd => etcd_alive,
        StoreKind::Kubernetes => {
            etcd_alive && alive(lab.kube.as_ref().and_then(|k| k.proc.as_ref()))
        }
    };
    if readable {
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
    } else {
        println!("the store was not checked for leftovers: its server is not running");
    }
    // The API server first: it is etcd's client.
    let servers = [
        (
            "kube-apiserver",
            lab.kube.as_ref().and_then(|k| k.proc.as_ref()),
        ),
        ("etcd", lab.etcd.as_ref().and_then(|e| e.proc.as_ref())),
    ];
    for (what, proc) in servers {
        let Some(proc) = proc else { continue };
        match procs::stop(proc, STOP_GRACE).await {
            Ok(procs::Stopped::Terminated(after)) => {
                println!(
                    "{what} (pid {}) stopped after {} ms",
                    proc.pid,
                    after.as_millis()
                )
            }
            Ok(procs::Stopped::AlreadyGone) => {
                println!("{what} (pid {}) was not running", proc.pid)
            }
            Ok(procs::Stopped::Killed) => println!("{what} (pid {}) killed", proc.pid),
            Err(e) => problems.push(format!("stopping {what}: {e:#}")),
        }
    }
}

/// With the `bird` engine an agent's teardown ends its BIRD and removes its socket: one
/// still running (its agent was killed) is a problem, and is ended by the PID it wrote.
fn bird_left(node: &str, dir: &Path, problems: &mut Vec<String>) {
    let pid = std::fs::read_to_string(dir.join("bird.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok());
    if let Some(pid) = pid {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "bird" {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            problems.push(format!(
                "bird of {node} (pid {pid}) outlived its agent: killed"
            ));
        }
    }
    let socket = dir.join("bird.ctl");
    if socket.exists() {
        problems.push(format!("bird's socket {} left", socket.display()));
    }
}
