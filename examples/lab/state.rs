//! The lab's record of what it built: `/run/cnikit-lab/<name>/lab.json`.
//!
//! Written after every step of `up`, `node-add` and `node-del`, atomically, so that `down`
//! always finds what exists, also after a crash halfway.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// Parent of every lab's state directory.
pub const STATE_ROOT: &str = "/run/cnikit-lab";
/// Prefix of every namespace a lab makes: `cnkl-<name>-…`.
pub const NS_PREFIX: &str = "cnkl";
/// Where `ip netns` (and cnikit's `create_named`) keep named namespaces.
pub const NETNS_DIR: &str = cnikit::core::linux::netns::NETNS_RUN_DIR;

/// The pod address pool of every lab.
pub const POOL: &str = "10.244.0.0/16";
/// Block size: 64 addresses per node block.
pub const BLOCK_SIZE: u8 = 26;
/// The CNI network name of every lab.
pub const NETWORK: &str = "cnikit-lab";
/// The interface name pods get.
pub const POD_IFNAME: &str = "eth0";

/// Checks a lab name: 1 to 12 lowercase letters and digits. No `-`, so that the namespace
/// prefix `cnkl-<name>-` of one lab is never a prefix of another lab's.
pub fn valid_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 12
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        bail!("lab name {name:?}: use 1 to 12 lowercase letters and digits");
    }
    Ok(())
}

/// The namespace prefix of lab `name`, with the trailing `-`.
pub fn ns_prefix(name: &str) -> String {
    format!("{NS_PREFIX}-{name}-")
}

/// The state directory of lab `name`.
pub fn state_dir(name: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(name)
}

/// The path of a named namespace.
pub fn netns_path(ns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(ns)
}

/// Which datastore the nodes share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// The file store, one directory in the state dir shared by every node.
    File,
    /// A private etcd inside the underlay namespace.
    Etcd,
    /// A private kube-apiserver (on the lab's etcd) inside the underlay namespace: the IPAM
    /// and the node registry in custom resources and Leases (feature `kubernetes`).
    Kubernetes,
}

/// How the nodes' underlay is wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Topology {
    /// One L2 segment: every node on one bridge.
    Flat,
    /// Two L2 segments (two subnets) joined by a router; nodes alternate between them.
    TwoSubnets,
}

/// The pod network of the plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PodNetwork {
    /// veth on the node's bridge `cnikit0`, gateway on the bridge.
    Bridge,
    /// Calico style: pod /32, gateway 169.254.1.1, host route per pod.
    Routed,
    /// Routed, plus tc eBPF programs on the host veths (the default of `--mode ebpf`).
    Ebpf,
}

impl PodNetwork {
    /// The plugin's `podNetwork` value.
    pub fn as_str(self) -> &'static str {
        match self {
            PodNetwork::Bridge => "bridge",
            PodNetwork::Routed => "routed",
            PodNetwork::Ebpf => "ebpf",
        }
    }
}

/// The values of `--ipip-mode`: `always`, `cross-subnet` (the command-line spelling of the
/// backend's `always` and `crossSubnet`).
pub fn ipip_mode_parser() -> impl clap::builder::TypedValueParser<Value = cnikit::ipip::Mode> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["always", "cross-subnet"]).map(|v| match v.as_str() {
        "cross-subnet" => cnikit::ipip::Mode::CrossSubnet,
        _ => cnikit::ipip::Mode::Always,
    })
}

/// The IPIP mode `up` gives a lab of routing `mode`: `--ipip-mode`, else `cross-subnet`
/// with `--direct-routing` (the same idea: same-subnet peers get plain routes), else
/// `always`; for `bgp`, `--ipip-mode` when given (BGP's routes through an IPIP device);
/// `None` for other modes, which refuse `--ipip-mode`.
pub fn ipip_mode(
    mode: &str,
    ipip_mode: Option<cnikit::ipip::Mode>,
    direct_routing: bool,
) -> Result<Option<cnikit::ipip::Mode>> {
    use cnikit::ipip::Mode;
    if mode == cnikit::bgp::TYPE {
        return Ok(ipip_mode);
    }
    if mode != cnikit::ipip::TYPE {
        if ipip_mode.is_some() {
            bail!("--ipip-mode is for --mode ipip, not {mode}");
        }
        return Ok(None);
    }
    Ok(Some(match (ipip_mode, direct_routing) {
        (Some(Mode::Always), true) => bail!(
            "--direct-routing means --ipip-mode cross-subnet for ipip; it contradicts \
             --ipip-mode always"
        ),
        (Some(m), _) => m,
        (None, true) => Mode::CrossSubnet,
        (None, false) => Mode::Always,
    }))
}

/// Refuses routing `mode` ipip on a kernel that cannot make an ipip device without loading
/// the module (`has_ipip`: `testkit::vm::kernel_has_link_kind("ipip")`, true inside the test
/// VM or with the module loaded or built in). Loading it adds `tunl0` to every namespace,
/// the machine's own included, so the lab never does: it points to the test VM instead.
pub fn ipip_kernel(mode: &str, has_ipip: bool) -> Result<()> {
    if (mode == cnikit::ipip::TYPE || mode == cnikit::bgp::TYPE) && !has_ipip {
        bail!(
            "--mode ipip needs the kernel's ipip module, and this kernel has none loaded: \
             making an ipip device would load it, which adds tunl0 to the machine's own \
             network namespace. Run the lab inside the test VM, every command in one run: \
             sudo scripts/vm.sh --mem 2G -- sh -c 'L=target/release/examples/lab; \
             $L up --mode ipip && $L check && $L show; $L down' (scripts/lab.sh --mode ipip \
             does so)"
        );
    }
    Ok(())
}

/// A process the lab started and must stop: identified by PID *and* start time, so that a
/// recycled PID is never signalled.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Proc {
    /// Process id.
    pub pid: i32,
    /// Start time in clock ticks after boot (`/proc/PID/stat` field 22).
    pub start_ticks: u64,
    /// A string its command line contains (its configuration path), checked too.
    pub marker: String,
    /// Its log file.
    pub log: PathBuf,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The top-of-rack router: a namespace on the first segment running BIRD 2 in an AS of its
/// own, peering with every node over eBGP.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tor {
    /// Namespace name.
    pub ns: String,
    /// Its address on the first segment.
    pub address: Ipv4Addr,
    /// Its AS.
    pub as_number: u32,
    /// BIRD, once started.
    #[serde(default)]
    pub proc: Option<Proc>,
}

/// One L2 segment: a namespace holding a bridge.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Underlay {
    /// Namespace name.
    pub ns: String,
    /// Third octet of the subnet: `172.30.<octet>.0/24`.
    pub octet: u8,
}

impl Underlay {
    /// The subnet, `172.30.<octet>.0/24`.
    pub fn subnet(&self) -> String {
        format!("172.30.{}.0/24", self.octet)
    }

    /// The router's address on this segment (`.1`).
    pub fn router(&self) -> Ipv4Addr {
        Ipv4Addr::new(172, 30, self.octet, 1)
    }

    /// The bridge's own address (`.2`): where the lab's etcd listens.
    pub fn host(&self) -> Ipv4Addr {
        Ipv4Addr::new(172, 30, self.octet, 2)
    }

    /// The top-of-rack router's address (`.254`).
    pub fn tor(&self) -> Ipv4Addr {
        Ipv4Addr::new(172, 30, self.octet, 254)
    }
}

/// A pod: a namespace plugged in by the plugin.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    /// `node1/pod1`.
    pub name: String,
    /// Namespace name.
    pub ns: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// The ADD result (spec 1.1.0 JSON), kept for DEL's `prevResult`; `None` until ADD
    /// succeeded.
    #[serde(default)]
    pub result: Option<serde_json::Value>,
    /// The pod's addresses, from the result.
    #[serde(default)]
    pub ips: Vec<String>,
}

impl Pod {
    /// The first IPv4 address, without prefix length.
    pub fn ip(&self) -> Option<String> {
        self.ips
            .iter()
            .map(|a| a.split('/').next().unwrap_or(a).to_owned())
            .next()
    }
}

/// A node: a namespace on an underlay segment, running an agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    /// Node name (`node1`), also its name in the datastore.
    pub name: String,
    /// 1, 2, …
    pub index: u32,
    /// Namespace name.
    pub ns: String,
    /// Index into [`Lab::underlays`].
    pub underlay: usize,
    /// Underlay address (on `eth0`), /24.
    pub address: Ipv4Addr,
    /// The node's directory in the state dir (conflist, data dir, logs).
    pub dir: PathBuf,
    /// The agent, once started.
    #[serde(default)]
    pub agent: Option<Proc>,
    /// A BGP route reflector (`--bgp-topology reflector`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reflector: bool,
    /// Its pods.
    #[serde(default)]
    pub pods: Vec<Pod>,
}

impl Node {
    /// The network configuration list of this node.
    pub fn conflist(&self) -> PathBuf {
        self.dir.join("cnikit.conflist")
    }

    /// The plugin's `dataDir` (node state file).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The plugin's log file.
    pub fn plugin_log(&self) -> PathBuf {
        self.dir.join("cnikit.log")
    }

    /// The agent's log file.
    pub fn agent_log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }
}

/// A private etcd the lab runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Etcd {
    /// `http://<underlay .2>:2379`.
    pub endpoint: String,
    /// The process, once started.
    #[serde(default)]
    pub proc: Option<Proc>,
}

/// The private kube-apiserver of `--store kubernetes` (files in `<state>/kube`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeApiserver {
    /// `https://<underlay .2>:6443`.
    pub server: String,
    /// The process, once started.
    #[serde(default)]
    pub proc: Option<Proc>,
}

/// Everything a lab is made of.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lab {
    /// Lab name.
    pub name: String,
    /// Routing mode (the conflist's `routing`).
    pub mode: String,
    /// VXLAN DirectRouting (only for `vxlan`).
    #[serde(default)]
    pub direct_routing: bool,
    /// Which peers IPIP tunnels to (only for `ipip`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipip_mode: Option<cnikit::ipip::Mode>,
    /// The BGP engine (only for `bgp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp_engine: Option<cnikit::bgp::Engine>,
    /// How many nodes are BGP route reflectors (`--bgp-topology reflector --reflectors
    /// N`); 0: iBGP full mesh.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bgp_reflectors: u32,
    /// The top-of-rack router every node peers with over eBGP (`--tor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tor: Option<Tor>,
    /// Pod network.
    pub pod_network: PodNetwork,
    /// Datastore.
    pub store: StoreKind,
    /// Underlay wiring.
    pub topology: Topology,
    /// Agent record TTL, seconds.
    pub ttl_seconds: u64,
    /// Agent resync interval, seconds.
    pub resync_seconds: u64,
    /// Pods per node `up` made (the default of `node-add`).
    pub pods_per_node: u32,
    /// Index of the next node: never reused, so a node added after a removal has a new
    /// name, a new address and a new block.
    #[serde(default)]
    pub next_index: u32,
    /// Underlay segments (one, or two for `two-subnets`).
    #[serde(default)]
    pub underlays: Vec<Underlay>,
    /// The router namespace joining the segments.
    #[serde(default)]
    pub router: Option<String>,
    /// etcd, with `--store etcd` (and under the API server with `--store kubernetes`).
    #[serde(default)]
    pub etcd: Option<Etcd>,
    /// The API server, with `--store kubernetes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube: Option<KubeApiserver>,
    /// The nodes.
    #[serde(default)]
    pub nodes: Vec<Node>,
}

impl Lab {
    /// The routing mode as printed: `ipip (crossSubnet)`, `vxlan (DirectRouting)`, `host-gw`.
    /// With BGP route reflectors or a top-of-rack router: `bgp, 1 route reflector, ToR`.
    pub fn mode_label(&self) -> String {
        let mut label = match self.ipip_mode {
            Some(m) => format!("{} ({})", self.mode, m.as_str()),
            None if self.direct_routing && self.mode == cnikit::vxlan::TYPE => {
                format!("{} (DirectRouting)", self.mode)
            }
            None => self.mode.clone(),
        };
        match self.bgp_reflectors {
            0 => {}
            1 => label.push_str(", 1 route reflector"),
            n => label.push_str(&format!(", {n} route reflectors")),
        }
        if self.tor.is_some() {
            label.push_str(", top-of-rack router");
        }
        label
    }

    /// The state directory.
    pub fn dir(&self) -> PathBuf {
        state_dir(&self.name)
    }

    /// `CNI_PATH`: a directory of symlinks to the plugin binary.
    pub fn cni_bin(&self) -> PathBuf {
        self.dir().join("bin")
    }

    /// The shared file store's directory.
    pub fn store_dir(&self) -> PathBuf {
        self.dir().join("store")
    }

    /// The namespace name `cnkl-<lab>-<suffix>`.
    pub fn ns(&self, suffix: &str) -> String {
        format!("{}{suffix}", ns_prefix(&self.name))
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Result<&Node> {
        self.nodes.iter().find(|n| n.name == name).with_context(|| {
            format!(
                "lab {} has no node {name:?} (nodes: {})",
                self.name,
                self.nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }

    /// The node called `name`, to change it.
    pub fn node_mut(&mut self, name: &str) -> Option<&mut Node> {
        self.nodes.iter_mut().find(|n| n.name == name)
    }

    /// Every pod with its node.
    pub fn pods(&self) -> impl Iterator<Item = (&Node, &Pod)> {
        self.nodes
            .iter()
            .flat_map(|n| n.pods.iter().map(move |p| (n, p)))
    }

    /// Path of the state file.
    pub fn file(name: &str) -> PathBuf {
        state_dir(name).join("lab.json")
    }

    /// Reads lab `name`; `None` when it has no state file.
    pub fn load(name: &str) -> Result<Option<Lab>> {
        let path = Lab::file(name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("decode {}", path.display()))
    }

    /// Reads lab `name`, or explains that there is none.
    pub fn require(name: &str) -> Result<Lab> {
        Lab::load(name)?
            .with_context(|| format!("no lab {name:?} is up (no {})", Lab::file(name).display()))
    }

    /// Writes the state file atomically.
    pub fn save(&self) -> Result<()> {
        let dir = self.dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let path = Lab::file(&self.name);
        let tmp = dir.join(".lab.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("rename to {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use clap::builder::TypedValueParser;
    use cnikit::ipip::Mode;

    use super::*;

    #[test]
    fn ipip_needs_the_module_loaded_or_the_vm() {
        let e = ipip_kernel("ipip", false).unwrap_err().to_string();
        assert!(e.contains("tunl0") && e.contains("scripts/vm.sh"), "{e}");
        ipip_kernel("ipip", true).unwrap();
        assert!(ipip_kernel("bgp", false).is_err());
        assert_eq!(ipip_mode("bgp", None, false).unwrap(), None);
        assert_eq!(
            ipip_mode("bgp", Some(Mode::Always), false).unwrap(),
            Some(Mode::Always)
        );
        ipip_kernel("vxlan", false).unwrap();
        ipip_kernel("host-gw", false).unwrap();
    }

    #[test]
    fn ipip_mode_follows_the_flags() {
        assert_eq!(ipip_mode("ipip", None, false).unwrap(), Some(Mode::Always));
        assert_eq!(
            ipip_mode("ipip", None, true).unwrap(),
            Some(Mode::CrossSubnet),
            "--direct-routing means cross-subnet for ipip"
        );
        assert_eq!(
            ipip_mode("ipip", Some(Mode::CrossSubnet), true).unwrap(),
            Some(Mode::CrossSubnet)
        );
        assert_eq!(
            ipip_mode("ipip", Some(Mode::CrossSubnet), false).unwrap(),
            Some(Mode::CrossSubnet)
        );
        let e = ipip_mode("ipip", Some(Mode::Always), true).unwrap_err();
        assert!(e.to_string().contains("contradicts"), "{e}");
        assert_eq!(ipip_mode("vxlan", None, true).unwrap(), None);
        let e = ipip_mode("host-gw", Some(Mode::Always), false).unwrap_err();
        assert!(e.to_string().contains("--mode ipip"), "{e}");
    }

    #[test]
    fn ipip_mode_flag_values() {
        let cmd = clap::Command::new("lab");
        let parse = |v: &str| ipip_mode_parser().parse_ref(&cmd, None, std::ffi::OsStr::new(v));
        assert_eq!(parse("always").unwrap(), Mode::Always);
        assert_eq!(parse("cross-subnet").unwrap(), Mode::CrossSubnet);
        assert!(parse("crossSubnet").is_err());
        assert!(parse("never").is_err());
    }
}
