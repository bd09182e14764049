//! `status`: what is running.

use anyhow::Result;
use serde_json::json;

use crate::state::Lab;
use crate::{bgp, cni, endpoints, net, procs};

/// `status`: the nodes, their agents and readiness, the pods, etcd, the API server.
pub async fn status(name: &str, as_json: bool) -> Result<()> {
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
            "reflector": node.reflector,
            "agentPid": node.agent.as_ref().map(|p| p.pid),
            "agentAlive": alive,
            "ready": ready.is_ok(),
            "notReady": ready.err().map(|e| format!("{e:#}")),
            "nodeState": node_state,
            "endpoints": endpoints::report(node).await,
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
    let kube = lab.kube.as_ref().map(|k| {
        json!({
            "server": k.server,
            "pid": k.proc.as_ref().map(|p| p.pid),
            "alive": k.proc.as_ref().is_some_and(|p| procs::liveness(p) == procs::Liveness::Alive),
            "kubeconfig": crate::kube::admin_kubeconfig(&lab),
            "nodeKubeconfig": crate::kube::node_kubeconfig(&lab),
            "kubectl": crate::kube::kubectl_hint(&lab),
        })
    });
    let tor = match &lab.tor {
        Some(t) => {
            let sessions = crate::tor::sessions(&lab).await.ok();
            let routes = crate::tor::routes(&lab).await.ok();
            Some(json!({
                "ns": t.ns,
                "address": t.address,
                "asNumber": t.as_number,
                "pid": t.proc.as_ref().map(|p| p.pid),
                "alive": t.proc.as_ref().is_some_and(|p| procs::liveness(p) == procs::Liveness::Alive),
                "socket": crate::tor::socket(&lab),
                "sessions": sessions,
                "routes": routes.map(|r| r.iter().map(|r| json!({
                    "dst": r.dst, "via": r.via, "from": r.from, "best": r.best,
                })).collect::<Vec<_>>()),
            }))
        }
        None => None,
    };
    let report = json!({
        "name": lab.name,
        "mode": lab.mode,
        "ipipMode": lab.ipip_mode,
        "podNetwork": lab.pod_network,
        "store": lab.store,
        "topology": lab.topology,
        "stateDir": lab.dir(),
        "namespaces": net::lab_namespaces(&lab.name),
        "etcd": etcd,
        "kubeApiserver": kube,
        "bgpReflectors": lab.bgp_reflectors,
        "tor": tor,
        "nodes": nodes,
    });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "lab {}: mode {}, {} pod network, {} store, {} topology, state in {}",
        lab.name,
        lab.mode_label(),
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
    if let Some(kube) = report["kubeApiserver"].as_object() {
        println!(
            "kube-apiserver {} pid {} {} (stored in the etcd above; the nodes authenticate as \
             service account kube-system/cnikit-node)",
            kube["server"].as_str().unwrap_or("?"),
            kube["pid"],
            if kube["alive"] == true {
                "running"
            } else {
                "NOT RUNNING"
            }
        );
        println!(
            "  look inside: {} get ippools,ipamblocks,ipamnodes,networknodes; \
             ... -n kube-system get leases",
            kube["kubectl"].as_str().unwrap_or("?")
        );
    }
    if let Some(tor) = report["tor"].as_object() {
        println!(
            "top-of-rack router {} ({}) AS {}: BIRD pid {} {}, {} sessions, {} routes",
            tor["address"].as_str().unwrap_or("?"),
            tor["ns"].as_str().unwrap_or("?"),
            tor["asNumber"],
            tor["pid"],
            if tor["alive"] == true {
                "running"
            } else {
                "NOT RUNNING"
            },
            tor["sessions"].as_array().map_or(0, Vec::len),
            tor["routes"].as_array().map_or(0, Vec::len),
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
        println!("  agent {}", endpoints::line(&n["endpoints"]));
        if let Ok(report) =
            serde_json::from_value::<cnikit::bgp::Report>(n["nodeState"]["routing"].clone())
        {
            for peer in &report.peers {
                println!("  BGP session {}", bgp::session_line(peer));
            }
        }
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
