//! The standard node agent: the composition the example binary `cnikit-agent` runs.
//!
//! The agent reads the same configuration list the runtime gives the plugin, so the two can
//! never disagree: the `cnikit` entry's `name`, `nodeName`, `dataDir`, `routing`, `podNetwork`
//! and `ipam` (pool, block size, store), plus agent-only keys:
//!
//! ```json
//! { "type": "cnikit", "routing": "vxlan",
//!   "agent": { "interface": "eth0", "ttlSeconds": 20, "resyncSeconds": 10,
//!              "metricsAddress": "127.0.0.1:9153" },
//!   "vxlan": { "vni": 1, "port": 4789, "directRouting": false } }
//! ```
//!
//! `"routing": "ipip"` reads its keys from `"ipip": { "mode": "always" | "crossSubnet",
//! "device": "cnikit.ipip", "mtu": … }`; `"routing": "bgp"` from `"bgp": { "asNumber":
//! 64512, "port": 179, "holdTime": 90, "connectRetry": 2, "gracefulRestart": true,
//! "restartTime": 120, "listenAddress": …, "globalPeers": [{"address": …, "asNumber": …}],
//! "routeReflectorClusterId": …, "engine": "native" | "bird", "bird": { "runDir": … } }`
//! (see [`backend_bgp::Config`] when the `bgp` feature is on);
//! `"routing": "ebpf"` (with `"podNetwork": "ebpf"`) from `"ebpf": { "vni": 1, "port": 4789,
//! "device": "cnikit.ebpf", "mtu": … }`, and its maps live under the entry's `bpffs` as the
//! plugin's do.
//!
//! `agent.metricsAddress` (off when absent) is where the agent serves, in its node
//! namespace, `/healthz` (200 while its loop runs), `/readyz` (200 once registered and
//! reconciled, else 503 with the reason) and `/metrics` (Prometheus text format, every
//! metric prefixed `cnikit_agent_`; see [`cni_core::agent::Metrics`]).
//!
//! The node registry lives in the same datastore as the IPAM: the file store (shared by
//! nodes that share a filesystem, such as the lab's namespaces), etcd (records on leases),
//! or the Kubernetes API (`NetworkNode` records, liveness as `coordination.k8s.io` Leases;
//! see `ipam_crd::registry`, feature `kubernetes`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use cni_core::agent::{Agent, AgentConfig};
use cni_core::linux::NetNs;
use cni_core::registry::NodeRegistry;
use cni_core::routing::CrossNodeRouting;
use cni_core::spec::{ConfList, NetConf};
use cni_core::{Error, Result};

use crate::plugin::{self, Config, StoreKind};

/// The agent-only keys of the `cnikit` entry (`agent`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentKeys {
    /// `agent.interface`: the underlay interface. Default: found (see
    /// [`AgentConfig::interface`]).
    #[serde(default)]
    pub interface: Option<String>,
    /// `agent.address`: the underlay address. Default: the interface's first.
    #[serde(default)]
    pub address: Option<std::net::IpAddr>,
    /// `agent.ttlSeconds`: lifetime of the node record without refresh (default 20).
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    /// `agent.resyncSeconds`: full resync interval (default 10).
    #[serde(default)]
    pub resync_seconds: Option<u64>,
    /// `agent.keepOnExit`: leave routes and devices in place on exit (default false).
    #[serde(default)]
    pub keep_on_exit: bool,
    /// `agent.metricsAddress`: where to serve `/healthz`, `/readyz` and `/metrics`
    /// (`"127.0.0.1:9153"`); default: not served.
    #[serde(default)]
    pub metrics_address: Option<std::net::SocketAddr>,
}

/// The `cnikit` entry of a configuration list, with the list's `name` and `cniVersion` as
/// a runtime would pass them to the plugin.
pub fn cnikit_entry(list: &ConfList) -> Result<NetConf> {
    let mut entry = list
        .plugins
        .iter()
        .find(|p| p.plugin_type == plugin::TYPE)
        .cloned()
        .ok_or_else(|| {
            Error::invalid_config("plugins", "no plugin of type \"cnikit\" in the list")
        })?;
    entry.name = list.name.clone();
    entry.cni_version = list.cni_version.clone();
    Ok(entry)
}

/// Reads a configuration list file.
pub fn read_conflist(path: &Path) -> Result<ConfList> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io {
        what: format!("read {}", path.display()),
        source: e,
    })?;
    let list = ConfList::from_slice(&bytes)?;
    list.validate()?;
    Ok(list)
}

/// Builds the agent for the `cnikit` entry `conf` of a configuration list, acting in the
/// network namespace at `netns` (`/proc/self/ns/net`: the agent process's own). Validates
/// everything before touching anything.
///
/// Errors: 7 for a bad or incomplete configuration (no `routing`, a mode this build lacks),
/// 11 when the datastore cannot be reached.
pub async fn build(conf: &NetConf, netns: &Path) -> Result<Agent> {
    let config: Config = conf.plugin_config()?;
    config.validate()?;
    let keys: AgentKeys = match conf.plugin.get("agent") {
        None => AgentKeys::default(),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| Error::invalid_config("agent", e.to_string()))?,
    };
    let mode = config
        .routing
        .clone()
        .ok_or_else(|| Error::invalid_config("routing", "the node agent needs a routing mode"))?;
    let node = config.node_name()?;
    let data_dir = config.data_dir(&conf.name);

    let routing = routing(&mode, conf, netns, &data_dir).await?;
    let ipam = plugin::open_block_ipam(conf, &config, Some(config.pod_network.reserve())).await?;
    let registry = registry(conf, &config, ipam.config().key_prefix.as_str()).await?;

    let mut agent_config = AgentConfig::new(node, data_dir);
    agent_config.interface = keys.interface;
    agent_config.address = keys.address;
    agent_config.mtu = config.mtu;
    if let Some(ttl) = keys.ttl_seconds {
        agent_config.ttl = Duration::from_secs(ttl.max(1));
    }
    if let Some(resync) = keys.resync_seconds {
        agent_config.resync = Duration::from_secs(resync.max(1));
    }
    agent_config.keep_on_exit = keys.keep_on_exit;
    agent_config.metrics_address = keys.metrics_address;
    let ns = NetNs::open(netns).await?;
    Ok(Agent::new(agent_config, ns, ipam, registry, routing))
}

/// The routing mode `mode`, configured from the entry's key of the same name.
///
/// The `bgp` mode's `bird` engine keeps its files in `bgp.bird.runDir`, by default
/// `DATA_DIR/bird`.
async fn routing(
    mode: &str,
    conf: &NetConf,
    netns: &Path,
    data_dir: &Path,
) -> Result<Box<dyn CrossNodeRouting>> {
    let _ = (conf, netns, data_dir);
    match mode {
        #[cfg(feature = "host-gw")]
        backend_hostgw::TYPE => Ok(Box::new(backend_hostgw::HostGw::new(
            NetNs::open(netns).await?,
        ))),
        #[cfg(feature = "vxlan")]
        backend_vxlan::TYPE => Ok(Box::new(backend_vxlan::Vxlan::new(
            mode_config(conf, backend_vxlan::TYPE)?,
            NetNs::open(netns).await?,
        )?)),
        #[cfg(feature = "ipip")]
        backend_ipip::TYPE => Ok(Box::new(backend_ipip::Ipip::new(
            mode_config(conf, backend_ipip::TYPE)?,
            NetNs::open(netns).await?,
        )?)),
        #[cfg(feature = "bgp")]
        backend_bgp::TYPE => {
            let config: backend_bgp::Config = mode_config(conf, backend_bgp::TYPE)?;
            Ok(match config.engine {
                backend_bgp::Engine::Native => {
                    Box::new(backend_bgp::Bgp::open(config, netns).await?)
                }
                backend_bgp::Engine::Bird => {
                    let run_dir = config
                        .bird
                        .run_dir
                        .clone()
                        .unwrap_or_else(|| data_dir.join("bird"));
                    Box::new(backend_bgp::Bird::open(config, netns, &run_dir).await?)
                }
            })
        }
        #[cfg(feature = "ebpf")]
        backend_ebpf::TYPE => {
            // The pins are the plugin's: the same `bpffs` key of the same entry.
            let pods: backend_ebpf::Config = conf.plugin_config()?;
            Ok(Box::new(backend_ebpf::EbpfRouting::new(
                mode_config(conf, backend_ebpf::TYPE)?,
                pods.bpffs,
                &conf.name,
                NetNs::open(netns).await?,
            )?))
        }
        other => Err(Error::invalid_config(
            "routing",
            format!("unknown routing mode {other:?} (or not in this build)"),
        )),
    }
}

/// A mode's configuration from the entry's key named after the mode (its defaults when
/// the key is absent). Errors: 7.
#[cfg(any(feature = "vxlan", feature = "ipip", feature = "bgp", feature = "ebpf"))]
fn mode_config<T>(conf: &NetConf, key: &'static str) -> Result<T>
where
    T: serde::de::DeserializeOwned + Default,
{
    match conf.plugin.get(key) {
        None => Ok(T::default()),
        Some(v) => {
            serde_json::from_value(v.clone()).map_err(|e| Error::invalid_config(key, e.to_string()))
        }
    }
}

/// The node registry on the datastore the IPAM uses: etcd's or Kubernetes' own registry, else a registry
/// on the store [`plugin::open_store`] opens for the IPAM (same directory, same errors).
async fn registry(
    conf: &NetConf,
    config: &Config,
    key_prefix: &str,
) -> Result<Arc<dyn NodeRegistry>> {
    let ipam = conf
        .ipam
        .as_ref()
        .ok_or_else(|| Error::invalid_config("ipam", "missing"))?;
    let kind = StoreKind::from_ipam(&ipam.config)?;
    #[cfg(feature = "etcd")]
    if let StoreKind::Etcd(object) = &kind {
        let etcd = plugin::etcd_config(object)?;
        return Ok(Arc::new(ipam_etcd::EtcdRegistry::connect(&etcd).await?));
    }
    #[cfg(feature = "kubernetes")]
    if let StoreKind::Kubernetes(object) = &kind {
        let config = plugin::kubernetes_config(object)?;
        return Ok(Arc::new(ipam_crd::KubeRegistry::connect(&config).await?));
    }
    let store = plugin::open_store(&kind, &config.data_dir(&conf.name)).await?;
    Ok(Arc::new(cni_core::registry::StoreRegistry::with_prefix(
        store, key_prefix,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(extra: serde_json::Value) -> NetConf {
        let mut conf = serde_json::json!({
            "cniVersion": "1.1.0", "name": "net", "type": "cnikit",
        });
        if let (Some(conf), Some(extra)) = (conf.as_object_mut(), extra.as_object()) {
            conf.extend(extra.clone());
        }
        NetConf::from_slice(conf.to_string().as_bytes()).unwrap()
    }

    /// `agent.metricsAddress` is an address and port; anything else is refused.
    #[test]
    fn metrics_address_is_a_socket_address() {
        let keys: AgentKeys =
            serde_json::from_value(serde_json::json!({"metricsAddress": "127.0.0.1:9153"}))
                .unwrap();
        assert_eq!(
            keys.metrics_address,
            Some("127.0.0.1:9153".parse().unwrap())
        );
        assert_eq!(AgentKeys::default().metrics_address, None);
        for bad in ["127.0.0.1", ":9153", "localhost:9153"] {
            let parsed =
                serde_json::from_value::<AgentKeys>(serde_json::json!({"metricsAddress": bad}));
            assert!(parsed.is_err(), "{bad} was accepted");
        }
    }

    /// A namespace of the test's own (named after `tag`) and its path, so that building a
    /// mode never opens anything in the test process's namespace; `None` (a loud skip)
    /// without root.
    #[cfg(any(feature = "ipip", feature = "bgp", feature = "ebpf"))]
    fn own_namespace(tag: &str) -> Option<(testkit::Namespaces, std::path::PathBuf)> {
        if !testkit::root(&format!("agent {tag} test")) {
            return None;
        }
        let namespaces = testkit::Namespaces::new(tag);
        let path = testkit::netns_path(&namespaces.add("node"));
        Some((namespaces, path))
    }

    /// Building a mode validates its keys and opens a netlink socket in the given
    /// namespace (one of the test's own); it changes nothing there.
    #[cfg(feature = "ipip")]
    #[tokio::test]
    async fn ipip_is_built_from_its_keys() {
        let Some((_namespaces, own)) = own_namespace("agipip") else {
            return;
        };
        let own = own.as_path();
        let conf = entry(serde_json::json!({"ipip": {"mode": "crossSubnet"}}));
        let mode = routing("ipip", &conf, own, Path::new("/nonexistent"))
            .await
            .unwrap();
        assert_eq!(mode.mode(), "ipip");
        assert_eq!(mode.mtu_overhead(), 20);
        assert!(mode.needs_tunnel_address());
        for bad in [
            serde_json::json!({"ipip": {"mode": "never"}}),
            serde_json::json!({"ipip": {"device": "tunl0"}}),
            serde_json::json!({"ipip": "always"}),
        ] {
            let Err(e) = routing("ipip", &entry(bad.clone()), own, Path::new("/nonexistent")).await
            else {
                panic!("{bad} was accepted");
            };
            assert_eq!(e.code().0, 7, "{bad}: {e}");
        }
        let Err(e) = routing("ipipx", &conf, own, Path::new("/nonexistent")).await else {
            panic!("an unknown mode was accepted");
        };
        assert_eq!(e.code().0, 7);
    }

    /// The ebpf mode validates its keys (and the entry's `bpffs`) when it is built; nothing
    /// is made before init.
    #[cfg(feature = "ebpf")]
    #[tokio::test]
    async fn ebpf_is_built_from_its_keys() {
        let Some((_namespaces, own)) = own_namespace("agebpf") else {
            return;
        };
        let own = own.as_path();
        let conf = entry(serde_json::json!({"podNetwork": "ebpf", "ebpf": {"vni": 7}}));
        let mode = routing("ebpf", &conf, own, Path::new("/nonexistent"))
            .await
            .unwrap();
        assert_eq!(mode.mode(), "ebpf");
        assert_eq!(mode.mtu_overhead(), 50);
        assert!(!mode.needs_tunnel_address());
        for bad in [
            serde_json::json!({"ebpf": {"vni": 16777216}}),
            serde_json::json!({"ebpf": {"device": "much-too-long-name"}}),
            serde_json::json!({"ebpf": {"vnid": 7}}),
            serde_json::json!({"ebpf": 7}),
            serde_json::json!({"bpffs": "relative/bpf"}),
        ] {
            let Err(e) = routing("ebpf", &entry(bad.clone()), own, Path::new("/nonexistent")).await
            else {
                panic!("{bad} was accepted");
            };
            assert_eq!(e.code().0, 7, "{bad}: {e}");
        }
    }

    /// The bgp mode validates its keys when it is built; nothing listens before init.
    #[cfg(feature = "bgp")]
    #[tokio::test]
    async fn bgp_is_built_from_its_keys() {
        let Some((_namespaces, own)) = own_namespace("agbgp") else {
            return;
        };
        let own = own.as_path();
        let conf =
            entry(serde_json::json!({"bgp": {"asNumber": 65000, "port": 1179, "holdTime": 9}}));
        let mode = routing("bgp", &conf, own, Path::new("/nonexistent"))
            .await
            .unwrap();
        assert_eq!(mode.mode(), "bgp");
        assert_eq!(mode.mtu_overhead(), 0);
        assert_eq!(mode.report(), None, "nothing to report before init");
        let mode = routing(
            "bgp",
            &entry(serde_json::json!({})),
            own,
            Path::new("/nonexistent"),
        )
        .await
        .unwrap();
        assert_eq!(mode.mode(), "bgp");
        let bird = entry(serde_json::json!({"bgp": {"engine": "bird"}}));
        let mode = routing("bgp", &bird, own, Path::new("/nonexistent"))
            .await
            .unwrap();
        assert_eq!(mode.report(), None, "bird is not started before init");
        for bad in [
            serde_json::json!({"bgp": {"holdTime": 2}}),
            serde_json::json!({"bgp": {"engine": "frr"}}),
            serde_json::json!({"bgp": {"ipip": {"device": "tun\"; }"}}}),
            serde_json::json!({"bgp": {"asNumber": 0}}),
            serde_json::json!({"bgp": {"asnumber": 65000}}),
            serde_json::json!({"bgp": 179}),
        ] {
            let Err(e) = routing("bgp", &entry(bad.clone()), own, Path::new("/nonexistent")).await
            else {
                panic!("{bad} was accepted");
            };
            assert_eq!(e.code().0, 7, "{bad}: {e}");
        }
    }
}
