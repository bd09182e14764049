//! Configuration of the `cnikit` plugin: the keys of its entry in a network configuration.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use cni_core::{Error, Result};

/// Default parent of the data directories: `<this>/<network name>`.
pub const DEFAULT_DATA_ROOT: &str = "/var/lib/cni/cnikit";

/// The `routing` mode that needs the `ebpf` pod network.
const EBPF_ROUTING: &str = "ebpf";

/// The pod network the plugin plugs pods into (`podNetwork`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodNetworkKind {
    /// veth on a Linux bridge, the gateway on the bridge.
    #[default]
    Bridge,
    /// Calico style: /32 pod address, gateway 169.254.1.1, host route per pod.
    Routed,
    /// Routed, plus a tc eBPF program on each host veth that delivers traffic between the
    /// node's pods by `bpf_redirect_peer` (feature `ebpf`).
    Ebpf,
}

impl PodNetworkKind {
    /// Which block addresses the pod network needs kept back: a bridge's block is a subnet
    /// (network, gateway and broadcast addresses); a routed pod's is a /32.
    pub fn reserve(self) -> cni_core::ipam::block::Reserve {
        match self {
            PodNetworkKind::Bridge => cni_core::ipam::block::Reserve::Gateway,
            PodNetworkKind::Routed | PodNetworkKind::Ebpf => cni_core::ipam::block::Reserve::None,
        }
    }
}

/// The `cnikit` plugin's own keys. The pod network reads its keys (`bridge`, `mtu`,
/// `hairpinMode`, `bridgeNetfilter`) from the same object.
///
/// ```json
/// { "type": "cnikit", "podNetwork": "bridge", "bridge": "cnikit0",
///   "dataDir": "/var/lib/cni/cnikit/net", "nodeName": "node-1", "routing": "vxlan",
///   "ipam": { "type": "cnikit-ipam", "pool": "10.244.0.0/16", "blockSize": 26 } }
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// `podNetwork`: `bridge` (default), `routed` or `ebpf`.
    #[serde(default)]
    pub pod_network: PodNetworkKind,
    /// `dataDir`: where local state lives (the file store, the node state file).
    /// Default `/var/lib/cni/cnikit/<network name>`.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// `nodeName`: this node's name in the datastore. Default: the host name.
    #[serde(default)]
    pub node_name: Option<String>,
    /// `routing`: the cross-node routing mode a `cnikit-agent` runs for this network
    /// (`host-gw`, `vxlan`…). When set, STATUS is "not ready" until the agent has written
    /// its node state file. Absent: a single-node network, no agent needed.
    #[serde(default)]
    pub routing: Option<String>,
    /// `mtu`: pod MTU. Default: the agent's (underlay minus encapsulation), else 1500.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// `logFile`: append logs here instead of stderr.
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    /// `logLevel`: `error`, `warn` (default), `info`, `debug`, `trace`.
    #[serde(default)]
    pub log_level: Option<String>,
}

impl Config {
    /// The data directory for network `network`.
    pub fn data_dir(&self, network: &str) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| Path::new(DEFAULT_DATA_ROOT).join(network))
    }

    /// The node name: `nodeName`, else the host name.
    pub fn node_name(&self) -> Result<String> {
        if let Some(name) = &self.node_name {
            return cni_core::registry::validate_node_name(name).map(|()| name.clone());
        }
        let host = nix::unistd::gethostname().map_err(|e| Error::Io {
            what: "gethostname".into(),
            source: e.into(),
        })?;
        let host = host.to_string_lossy().into_owned();
        cni_core::registry::validate_node_name(&host).map_err(|_| {
            Error::invalid_config(
                "nodeName",
                format!("host name {host:?} is not usable; set nodeName"),
            )
        })?;
        Ok(host)
    }

    /// Checks the keys without side effects. Errors: code 7 naming the key.
    pub fn validate(&self) -> Result<()> {
        if let Some(name) = &self.node_name {
            cni_core::registry::validate_node_name(name)?;
        }
        if let Some(mtu) = self.mtu
            && !(68..=65535).contains(&mtu)
        {
            return Err(Error::invalid_config(
                "mtu",
                format!("{mtu} is outside 68..=65535"),
            ));
        }
        if self.routing.as_deref() == Some(EBPF_ROUTING) && self.pod_network != PodNetworkKind::Ebpf
        {
            return Err(Error::invalid_config(
                "podNetwork",
                "\"routing\": \"ebpf\" needs \"podNetwork\": \"ebpf\": its programs sit on                  the pods' host veths",
            ));
        }
        if let Some(dir) = &self.data_dir
            && !dir.is_absolute()
        {
            return Err(Error::invalid_config(
                "dataDir",
                format!("{} is not an absolute path", dir.display()),
            ));
        }
        if let Some(level) = &self.log_level
            && !["error", "warn", "info", "debug", "trace"].contains(&level.as_str())
        {
            return Err(Error::invalid_config(
                "logLevel",
                format!("unknown level {level:?}"),
            ));
        }
        Ok(())
    }
}

/// `ipam.store`: which datastore the block IPAM (and the node agent's registry) uses.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreKind {
    /// The local file store (default), in `path` or else `<dataDir>/ipam`. Nodes that share a
    /// filesystem (the lab's namespaces) share one pool by pointing `path` at one directory.
    File {
        /// `ipam.store.path`: the store's directory.
        path: Option<PathBuf>,
    },
    /// etcd v3; the object's other keys configure it.
    Etcd(Map<String, Value>),
    /// Kubernetes custom resources (`ipam-crd`); the object's other keys configure it.
    Kubernetes(Map<String, Value>),
}

impl StoreKind {
    /// Reads `ipam.store` (absent: the file store). Errors: code 7.
    pub fn from_ipam(ipam: &Map<String, Value>) -> Result<StoreKind> {
        let Some(store) = ipam.get("store") else {
            return Ok(StoreKind::File { path: None });
        };
        let Some(obj) = store.as_object() else {
            return Err(Error::invalid_config("ipam.store", "must be an object"));
        };
        match obj.get("type").and_then(Value::as_str) {
            None | Some("file") => {
                let path = match obj.get("path") {
                    None => None,
                    Some(Value::String(p)) if Path::new(p).is_absolute() => Some(PathBuf::from(p)),
                    Some(other) => {
                        return Err(Error::invalid_config(
                            "ipam.store.path",
                            format!("{other} is not an absolute path"),
                        ));
                    }
                };
                Ok(StoreKind::File { path })
            }
            Some("etcd") => Ok(StoreKind::Etcd(obj.clone())),
            Some("kubernetes") => Ok(StoreKind::Kubernetes(obj.clone())),
            Some(other) => Err(Error::invalid_config(
                "ipam.store.type",
                format!("unknown store {other:?} (file, etcd, kubernetes)"),
            )),
        }
    }
}
