//! The `ebpf` pod network: the routed pod network's plumbing, plus the program on each
//! host veth and the pod's entry in the endpoint map.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use cni_core::ipam::Allocation;
use cni_core::linux::routed::HOST_MAC;
use cni_core::linux::{NetNs, RoutedConfig, RoutedNetwork, link, veth};
use cni_core::network::{Pod, PodNetwork};
use cni_core::spec::CniResult;
use serde::{Deserialize, Serialize};

use crate::TYPE;
use crate::error::{Error, Result};
use crate::maps::{Endpoint, Pins};
use crate::program::{self, PROGRAM};

/// Where the BPF filesystem is mounted unless the configuration says otherwise.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// Configuration of [`EbpfNetwork`]. Every field has a default; unknown keys are ignored so
/// that it can be read from a whole network configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Config {
    /// `mtu`: MTU of both ends of each veth. Default 1500.
    pub mtu: u32,
    /// `bpffs`: where the BPF filesystem is mounted; the pins go under
    /// `<bpffs>/cnikit/<network>/<node>/`. Default `/sys/fs/bpf` (mounted by ADD when it is
    /// not yet, as Cilium's agent does).
    pub bpffs: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mtu: 1500,
            bpffs: PathBuf::from(DEFAULT_BPFFS),
        }
    }
}

impl Config {
    /// Checks the configuration without touching the system. Errors: code 7.
    pub fn validate(&self) -> Result<()> {
        RoutedConfig { mtu: self.mtu }.validate()?;
        crate::maps::check_bpffs(&self.bpffs)
    }
}

/// Pods on tc eBPF (see the [crate docs](crate)).
///
/// Holds the node namespace it acts in: a CNI plugin passes [`NetNs::current`], tests and
/// the lab pass a namespace of their own.
#[derive(Debug)]
pub struct EbpfNetwork {
    routed: RoutedNetwork,
    bpffs: PathBuf,
    pins: Pins,
}

impl EbpfNetwork {
    /// Validates `config` and the names (code 7) and builds the network `network` of node
    /// `node`, acting in the node namespace `host`. Touches nothing.
    pub fn new(config: Config, network: &str, node: &str, host: NetNs) -> Result<Self> {
        config.validate()?;
        let pins = Pins::new(&config.bpffs, network, node)?;
        let routed = RoutedNetwork::new(RoutedConfig { mtu: config.mtu }, host)?;
        Ok(EbpfNetwork {
            routed,
            bpffs: config.bpffs,
            pins,
        })
    }

    /// Where this network's maps and links are pinned.
    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    fn host(&self) -> &NetNs {
        self.routed.host()
    }

    /// The part of ADD after the routed plumbing: the program on the host veth, then the
    /// pod's entries.
    async fn attach(&self, result: &CniResult) -> Result<()> {
        let (host_name, pod_mac) = interfaces(result)?;
        let host_link = link::get(self.host(), &host_name).await?.ok_or_else(|| {
            Error::mismatch(
                format!("host veth {host_name}"),
                "the new host veth",
                "no such device",
            )
        })?;
        let pins = self.pins.clone();
        let device = host_name.clone();
        let attached = self
            .host()
            .run(move || program::attach(&pins, &device))
            .await??;
        tracing::debug!(?attached, device = %host_name, "program attached");
        let mut endpoints = self.pins.open_endpoints()?.ok_or_else(|| {
            Error::mismatch(
                "endpoint map",
                format!("pinned at {}", self.pins.endpoints().display()),
                "not pinned after loading",
            )
        })?;
        let endpoint = Endpoint {
            ifindex: host_link.index,
            pod_mac,
            host_mac: HOST_MAC,
        };
        for ip in ipv4s(result) {
            endpoints.insert(ip, endpoint)?;
        }
        Ok(())
    }

    /// Removes the entries of this pod, those pointing at its host veth (index `ours`, when
    /// it still exists), and every stale entry: one pointing at no device of the node (a pod
    /// whose veth went with its namespace, DEL'd without `prevResult`, or not at all).
    /// Returns the addresses whose entries it removed.
    ///
    /// ADD writes an entry only after its veth exists, and the entries are read before the
    /// devices: an entry written by an ADD running meanwhile is never taken for stale.
    async fn remove_entries(&self, ours: Option<u32>) -> Result<Vec<Ipv4Addr>> {
        let Some(mut endpoints) = self.pins.open_endpoints()? else {
            return Ok(Vec::new());
        };
        let entries = endpoints.list()?;
        let indexes: Vec<u32> = link::list(self.host())
            .await?
            .iter()
            .map(|l| l.index)
            .collect();
        let mut removed = Vec::new();
        for (ip, entry) in entries {
            if Some(entry.ifindex) == ours || !indexes.contains(&entry.ifindex) {
                tracing::debug!(%ip, ifindex = entry.ifindex, "removing endpoint entry");
                if endpoints.remove(ip)? {
                    removed.push(ip);
                }
            }
        }
        Ok(removed)
    }

    /// Removes what pods left behind without a DEL (their namespace and veth gone): the
    /// endpoint entries pointing at no device of the node, and the pinned links of host
    /// veths that no longer exist. For the node agent's periodic cleanup; idempotent. Pins
    /// are read before the devices, so what an ADD running meanwhile makes is never taken
    /// for stale.
    pub async fn remove_stale(&self) -> Result<Stale> {
        let pinned: Vec<String> = match std::fs::read_dir(self.pins.dir().join("links")) {
            Ok(dir) => dir
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(Error::Pin {
                    what: "ls",
                    path: self.pins.dir().join("links"),
                    source,
                });
            }
        };
        let entries = self.remove_entries(None).await?;
        let devices: Vec<String> = link::list(self.host())
            .await?
            .into_iter()
            .map(|l| l.name)
            .collect();
        let mut links = Vec::new();
        for name in pinned {
            if !devices.contains(&name) && self.pins.unpin_link(&name)? {
                links.push(name);
            }
        }
        Ok(Stale { entries, links })
    }

    async fn del_all(&self, pod: &Pod, prev: Option<&CniResult>) -> Result<()> {
        let host_name = veth::host_name(&pod.attachment.container_id, &pod.attachment.ifname);
        let mut errors: Vec<cni_core::Error> = Vec::new();
        let ours = match link::get(self.host(), &host_name).await {
            Ok(l) => l.map(|l| l.index),
            Err(e) => {
                errors.push(e);
                None
            }
        };
        if let Err(e) = self.remove_entries(ours).await.map(drop) {
            errors.push(e.into());
        }
        if let Err(e) = self.pins.unpin_link(&host_name) {
            errors.push(e.into());
        }
        if let Err(e) = self.routed.del(pod, prev).await {
            errors.push(e);
        }
        cni_core::Error::collect(errors).map_err(Error::Core)
    }

    async fn check_all(&self, pod: &Pod, prev: &CniResult) -> Result<()> {
        self.routed.check(pod, prev).await?;
        let (host_name, pod_mac) = interfaces(prev)?;
        let host_link = link::get(self.host(), &host_name).await?.ok_or_else(|| {
            Error::mismatch(
                format!("host veth {host_name}"),
                "present",
                "no such device",
            )
        })?;
        let want = Endpoint {
            ifindex: host_link.index,
            pod_mac,
            host_mac: HOST_MAC,
        };
        let endpoints = self.pins.open_endpoints()?.ok_or_else(|| {
            Error::mismatch(
                "endpoint map",
                format!("pinned at {}", self.pins.endpoints().display()),
                "not pinned",
            )
        })?;
        for ip in ipv4s(prev) {
            let found = endpoints.get(ip)?;
            if found != Some(want) {
                return Err(Error::mismatch(
                    format!("endpoint of {ip}"),
                    format!("{want:?}"),
                    format!("{found:?}"),
                ));
            }
        }
        let device = host_name.clone();
        let pins = self.pins.clone();
        let (tcx, pinned) = self
            .host()
            .run(move || {
                Ok::<_, Error>((
                    program::tcx_programs(&device)?,
                    program::pinned_link_program(&pins, &device)?,
                ))
            })
            .await??;
        // The programs on the host veth's ingress: TCX, else tc filters on clsact.
        let has_tcx = tcx.is_some();
        let attached: Vec<u32> = match tcx {
            Some(programs) => programs.into_iter().map(|(id, _)| id).collect(),
            None => tc_ingress_programs(self.host(), host_link.index).await?,
        };
        // Ours is the one that uses this network's endpoint map (and, with TCX, the program
        // of the pinned link).
        let map = self.pins.endpoints_id()?;
        let mut ours = None;
        for id in attached.iter().copied() {
            let uses_map = program::program_maps(id)?
                .is_some_and(|maps| map.is_some_and(|m| maps.contains(&m)));
            if uses_map && pinned.is_none_or(|p| p == id) {
                ours = Some(id);
            }
        }
        let linked = pinned.is_some() || !has_tcx;
        if ours.is_none() || !linked {
            return Err(Error::mismatch(
                format!("ingress of {host_name}"),
                format!(
                    "{PROGRAM} using the endpoint map {map:?}{}",
                    if has_tcx { ", its TCX link pinned" } else { "" }
                ),
                format!("programs {attached:?}, pinned link to program {pinned:?}"),
            ));
        }
        Ok(())
    }
}

/// The ids of the programs of the `bpf` filters on the `clsact` ingress of device `index`,
/// like `tc filter show dev DEV ingress`.
async fn tc_ingress_programs(host: &NetNs, index: u32) -> Result<Vec<u32>> {
    use futures::TryStreamExt;
    use netlink_packet_route::tc::{TcAttribute, TcFilterBpfOption, TcOption};

    let what = || format!("tc filter show dev (index {index}) ingress");
    let index = i32::try_from(index).map_err(|e| cni_core::Error::kernel(what(), e))?;
    let mut dump = host
        .handle()
        .traffic_filter(index)
        .get()
        .ingress()
        .execute();
    let mut ids = Vec::new();
    while let Some(message) = dump
        .try_next()
        .await
        .map_err(|e| cni_core::Error::kernel(what(), e))?
    {
        for attribute in &message.attributes {
            if let TcAttribute::Options(options) = attribute {
                ids.extend(options.iter().filter_map(|o| match o {
                    TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => Some(*id),
                    _ => None,
                }));
            }
        }
    }
    Ok(ids)
}

/// What [`EbpfNetwork::remove_stale`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stale {
    /// Addresses whose endpoint entries pointed at no device.
    pub entries: Vec<Ipv4Addr>,
    /// Host veths whose pinned links outlived them.
    pub links: Vec<String>,
}

/// Makes sure the BPF filesystem is there: the default mount point is mounted when it is
/// not (like `mount -t bpf bpf /sys/fs/bpf`); any other path must be one already.
pub(crate) fn ensure_bpffs(bpffs: &Path) -> Result<()> {
    if is_bpffs(bpffs) {
        return Ok(());
    }
    if bpffs != Path::new(DEFAULT_BPFFS) {
        return Err(Error::NotBpffs {
            path: bpffs.to_path_buf(),
        });
    }
    nix::mount::mount(
        Some("bpf"),
        bpffs,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| Error::Pin {
        what: "mount -t bpf bpf",
        path: bpffs.to_path_buf(),
        source: e.into(),
    })
}

/// Whether `path` is the root of a mounted BPF filesystem.
fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// The host veth's name and the pod interface's MAC from a result of this network.
fn interfaces(result: &CniResult) -> Result<(String, [u8; 6])> {
    let host = result
        .interfaces
        .iter()
        .find(|i| i.sandbox.is_none())
        .map(|i| i.name.clone());
    let pod_mac = result
        .interfaces
        .iter()
        .find(|i| i.sandbox.is_some())
        .and_then(|i| i.mac.as_ref())
        .and_then(|m| <[u8; 6]>::try_from(m.as_bytes()).ok());
    match (host, pod_mac) {
        (Some(h), Some(m)) => Ok((h, m)),
        _ => Err(Error::mismatch(
            "result interfaces",
            "a host veth and a pod interface with a MAC",
            format!("{:?}", result.interfaces),
        )),
    }
}

/// The IPv4 addresses of a result (IPv6 goes through the node's stack).
fn ipv4s(result: &CniResult) -> Vec<Ipv4Addr> {
    result
        .ips
        .iter()
        .filter_map(|ip| match ip.address.addr() {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        })
        .collect()
}

#[async_trait]
impl PodNetwork for EbpfNetwork {
    fn kind(&self) -> &'static str {
        TYPE
    }

    /// The routed pod network's ADD, then the program on the host veth's ingress and the
    /// pod's entries in the endpoint map. Atomic: on failure the entries, the pinned link
    /// and the veth go again. Errors: 4 (netns), 7 (`bpffs` not a BPF filesystem), 101.
    async fn add(&self, pod: &Pod, allocation: &Allocation) -> cni_core::Result<CniResult> {
        ensure_bpffs(&self.bpffs)?;
        let result = self.routed.add(pod, allocation).await?;
        match self.attach(&result).await {
            Ok(()) => Ok(result),
            Err(err) => {
                if let Err(cleanup) = self.del_all(pod, Some(&result)).await {
                    tracing::warn!(error = %cleanup, "cannot undo a failed ADD");
                    return Err(cni_core::Error::Multiple(vec![err.into(), cleanup.into()]));
                }
                Err(err.into())
            }
        }
    }

    /// Removes the pod's entries (and any stale one), its pinned link (detaching the
    /// program) and its veth. Idempotent, also when the netns, the veth or the maps are gone
    /// and without `prevResult`; runs every step.
    async fn del(&self, pod: &Pod, prev: Option<&CniResult>) -> cni_core::Result<()> {
        Ok(self.del_all(pod, prev).await?)
    }

    /// The routed pod network's CHECK, then the pod's entries (host veth index, MACs) and
    /// that a program using this network's endpoint map is on the host veth's ingress (with
    /// TCX: the pinned link's). Errors: 3, 101.
    async fn check(&self, pod: &Pod, prev: &CniResult) -> cni_core::Result<()> {
        Ok(self.check_all(pod, prev).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let c: Config = serde_json::from_str(r#"{"type":"cnikit","podNetwork":"ebpf"}"#).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.bpffs, Path::new("/sys/fs/bpf"));
        let c: Config = serde_json::from_str(r#"{"mtu":1400,"bpffs":"/run/bpf"}"#).unwrap();
        assert_eq!((c.mtu, c.bpffs.as_path()), (1400, Path::new("/run/bpf")));
        let relative = Config {
            bpffs: "bpf".into(),
            ..Config::default()
        };
        assert_eq!(relative.validate().unwrap_err().code().0, 7);
        let tiny = Config {
            mtu: 10,
            ..Config::default()
        };
        assert_eq!(tiny.validate().unwrap_err().code().0, 7);
    }
}
