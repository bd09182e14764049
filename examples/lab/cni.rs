//! The lab as a container runtime: each node's configuration list, and the `cnikit` plugin
//! exec'd for ADD, DEL and STATUS with the plugin process inside the node's namespace,
//! exactly as a runtime on that node would run it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use cnikit::core::ErrorCode;
use cnikit::core::exec::{self, Invocation};
use cnikit::core::spec::{CniResult, Command, ConfList, Version};
use serde_json::{Map, Value, json};

use crate::modes;
use crate::net::NODE_NIC;
use crate::state::{self, Lab, Node, Pod, StoreKind};

/// The configuration list of `node`.
pub fn conflist(lab: &Lab, node: &Node) -> Value {
    let store = match lab.store {
        StoreKind::File => json!({"type": "file", "path": lab.store_dir()}),
        StoreKind::Etcd => json!({
            "type": "etcd",
            "endpoints": [lab.etcd.as_ref().map(|e| e.endpoint.clone()).unwrap_or_default()],
            "prefix": crate::store::PREFIX,
        }),
        StoreKind::Kubernetes => json!({
            "type": "kubernetes",
            "kubeconfig": crate::kube::node_kubeconfig(lab),
            "prefix": crate::store::PREFIX,
        }),
    };
    let mut entry = json!({
        "type": "cnikit",
        "podNetwork": lab.pod_network.as_str(),
        "bridge": "cnikit0",
        "dataDir": node.data_dir(),
        "nodeName": node.name,
        "routing": lab.mode,
        "logFile": node.plugin_log(),
        "logLevel": "info",
        "agent": {
            "interface": NODE_NIC,
            "ttlSeconds": lab.ttl_seconds,
            "resyncSeconds": lab.resync_seconds,
            "metricsAddress": crate::endpoints::address(node),
        },
        "ipam": {
            "type": "cnikit-ipam",
            "pool": state::POOL,
            "blockSize": state::BLOCK_SIZE,
            "store": store,
        },
    });
    if lab.pod_network == state::PodNetwork::Ebpf
        && let Value::Object(obj) = &mut entry
    {
        obj.insert("bpffs".into(), json!(crate::ebpf::bpffs(&lab.name)));
    }
    if let (Some(mode), Value::Object(obj)) = (modes::find(&lab.mode), &mut entry) {
        obj.extend((mode.keys)(lab));
        if node.reflector
            && let Some(Value::Object(bgp)) = obj.get_mut("bgp")
        {
            bgp.insert(
                "routeReflectorClusterId".into(),
                json!(modes::BGP_CLUSTER_ID),
            );
        }
    }
    json!({
        "cniVersion": "1.1.0",
        "name": state::NETWORK,
        "plugins": [entry],
    })
}

/// Writes `node`'s configuration list to its directory.
pub fn write_conflist(lab: &Lab, node: &Node) -> Result<()> {
    std::fs::create_dir_all(&node.dir)?;
    let path = node.conflist();
    std::fs::write(&path, serde_json::to_vec_pretty(&conflist(lab, node))?)
        .with_context(|| format!("write {}", path.display()))
}

fn read_conflist(node: &Node) -> Result<ConfList> {
    let path = node.conflist();
    let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    Ok(ConfList::from_slice(&bytes)?)
}

fn invocation(lab: &Lab, node: &Node, pod: Option<&Pod>) -> Invocation {
    let cni_path = vec![lab.cni_bin()];
    let invocation = match pod {
        Some(pod) => Invocation::new(
            Command::Add,
            &pod.container_id,
            Some(state::netns_path(&pod.ns)),
            state::POD_IFNAME,
            cni_path,
        ),
        None => Invocation::global(Command::Status, cni_path),
    };
    invocation.in_netns(state::netns_path(&node.ns))
}

/// How many times the lab runs an ADD that keeps failing with code 11 ("try again later"),
/// as a runtime sets a pod sandbox up again when its network setup failed.
const ADD_TRIES: u32 = 3;

/// ADD of `pod` on `node`; returns the result (spec 1.1.0 JSON) and the pod's addresses.
///
/// An ADD that fails with code 11 (the datastore unreachable or slow) is followed by a DEL
/// and tried again after a pause, up to [`ADD_TRIES`] times in all, as a runtime would.
pub async fn add(lab: &Lab, node: &Node, pod: &Pod) -> Result<(Value, Vec<String>)> {
    let list = read_conflist(node)?;
    let invocation = invocation(lab, node, Some(pod));
    let mut tries = 1;
    let result = loop {
        match exec::add_list(&list, &invocation, &Map::new()).await {
            Err(e) if e.code() == ErrorCode::TRY_AGAIN_LATER && tries < ADD_TRIES => {
                eprintln!(
                    "lab: ADD {} on {} failed with code 11 ({e}); DEL, then ADD again in {tries} s",
                    pod.name, node.name
                );
                if let Err(e) = exec::del_list(&list, &invocation, &Map::new(), None).await {
                    eprintln!(
                        "lab: DEL {} on {} before the next ADD: {e}",
                        pod.name, node.name
                    );
                }
                tokio::time::sleep(Duration::from_secs(tries.into())).await;
                tries += 1;
            }
            result => break result,
        }
    }
    .with_context(|| format!("ADD {} on {}", pod.name, node.name))?;
    let ips = result.ips.iter().map(|ip| ip.address.to_string()).collect();
    Ok((result.to_json(Version::V1_1_0), ips))
}

/// DEL of `pod` on `node`, with the ADD result as `prevResult` when there is one. Works
/// when the pod's namespace is already gone.
pub async fn del(lab: &Lab, node: &Node, pod: &Pod) -> Result<()> {
    let list = read_conflist(node)?;
    let prev = match &pod.result {
        Some(v) => Some(CniResult::from_json(v).context("decode the stored ADD result")?),
        None => None,
    };
    exec::del_list(
        &list,
        &invocation(lab, node, Some(pod)),
        &Map::new(),
        prev.as_ref(),
    )
    .await
    .with_context(|| format!("DEL {} on {}", pod.name, node.name))
}

/// STATUS of the network on `node` (`Ok` = ready).
pub async fn status(lab: &Lab, node: &Node) -> Result<()> {
    let list = read_conflist(node)?;
    Ok(exec::status_list_with(&list, &invocation(lab, node, None)).await?)
}

/// The plugin and agent binaries: siblings of the lab binary.
pub struct Binaries {
    /// The `cnikit` plugin.
    pub plugin: PathBuf,
    /// The `cnikit-agent` node agent.
    pub agent: PathBuf,
}

impl Binaries {
    /// Finds them next to this executable, or says how to build them.
    pub fn find() -> Result<Binaries> {
        let exe = std::env::current_exe().context("where is the lab binary")?;
        let dir = exe
            .parent()
            .context("the lab binary has no directory")?
            .to_path_buf();
        let plugin = dir.join("cnikit");
        let agent = dir.join("cnikit-agent");
        let missing: Vec<String> = [&plugin, &agent]
            .iter()
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        if !missing.is_empty() {
            let release = dir
                .parent()
                .and_then(|p| p.file_name())
                .is_some_and(|n| n == "release");
            anyhow::bail!(
                "missing {}: build them with `cargo build{} --examples`",
                missing.join(" and "),
                if release { " --release" } else { "" }
            );
        }
        Ok(Binaries { plugin, agent })
    }
}
