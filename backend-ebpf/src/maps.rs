//! The pinned maps and where they live on the BPF filesystem.
//!
//! One directory per network and node (bpffs is one per machine, not per network
//! namespace, and the lab's nodes share it):
//!
//! ```text
//! <bpffs>/cnikit/<network>/<node>/endpoints      hash: pod IPv4 -> Endpoint
//! <bpffs>/cnikit/<network>/<node>/remotes        LPM trie: block of another node -> its underlay IPv4
//! <bpffs>/cnikit/<network>/<node>/tunnel         array of one: the node's VXLAN device and VNI
//! <bpffs>/cnikit/<network>/<node>/counters       per-CPU array: Counter -> packets
//! <bpffs>/cnikit/<network>/<node>/links/<veth>   the TCX link of a pod's program
//! <bpffs>/cnikit/<network>/<node>/tunnel-links/{ingress,egress}
//!                                                the TCX links of the VXLAN device's programs
//! ```
//!
//! The plugin writes `endpoints`; the node agent's `ebpf` routing mode writes `remotes` and
//! `tunnel`.
//!
//! The layouts are those of `bpf/pod.c`.

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use ipnet::Ipv4Net;

use crate::error::{Error, Result};

/// Where a pod is plugged in: the value of the `endpoints` map (`struct endpoint`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// Index of the pod's host-side veth in the node namespace.
    pub ifindex: u32,
    /// MAC of the pod's interface.
    pub pod_mac: [u8; 6],
    /// MAC of the pod's host-side veth.
    pub host_mac: [u8; 6],
}

// SAFETY: `Endpoint` is `repr(C)`, 16 bytes without padding (4 + 6 + 6), every bit
// pattern is valid.
unsafe impl aya::Pod for Endpoint {}

/// The indexes of the `counters` map (`enum counter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// Delivered into a local pod by `bpf_redirect_peer`.
    RedirectPeer = 0,
    /// IPv4, but not to a local pod: passed to the node's stack.
    PassNotLocal = 1,
    /// Not IPv4 (ARP, IPv6) or too short: passed to the node's stack.
    PassNotIpv4 = 2,
    /// To a local pod with a TTL that would expire: passed to the stack (ICMP).
    PassTtl = 3,
    /// To a block of another node: tunnel key set, redirected to the VXLAN device.
    RedirectTunnel = 4,
    /// To a block of another node while no VXLAN device is set up: passed to the stack.
    PassNoTunnel = 5,
    /// From the tunnel, delivered into a local pod by `bpf_redirect_peer`.
    TunnelRedirectPeer = 6,
    /// From the tunnel, not to a local pod: passed to the node's stack.
    TunnelPass = 7,
    /// From the tunnel with another VNI: dropped.
    TunnelDropVni = 8,
    /// Sent by the node's stack into the tunnel: tunnel key set from `remotes`.
    StackToTunnel = 9,
    /// Sent by the node's stack into the tunnel towards no known block, or not IPv4 (the
    /// device's own IPv6 link-local traffic): dropped.
    StackDropNoRemote = 10,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 11] = [
        Counter::RedirectPeer,
        Counter::PassNotLocal,
        Counter::PassNotIpv4,
        Counter::PassTtl,
        Counter::RedirectTunnel,
        Counter::PassNoTunnel,
        Counter::TunnelRedirectPeer,
        Counter::TunnelPass,
        Counter::TunnelDropVni,
        Counter::StackToTunnel,
        Counter::StackDropNoRemote,
    ];

    /// What the counter counts, in a few words.
    pub fn describe(self) -> &'static str {
        match self {
            Counter::RedirectPeer => "pod to pod of this node, by bpf_redirect_peer",
            Counter::PassNotLocal => "from a pod to neither a pod nor a remote block: to the stack",
            Counter::PassNotIpv4 => "from a pod, not IPv4: to the stack",
            Counter::PassTtl => "TTL would expire: to the stack",
            Counter::RedirectTunnel => "pod to a remote block, into the VXLAN device",
            Counter::PassNoTunnel => "pod to a remote block without a VXLAN device: to the stack",
            Counter::TunnelRedirectPeer => "from the tunnel into a pod, by bpf_redirect_peer",
            Counter::TunnelPass => "from the tunnel, not to a pod: to the stack",
            Counter::TunnelDropVni => "from the tunnel with a foreign VNI: dropped",
            Counter::StackToTunnel => "node's stack into the tunnel, key set",
            Counter::StackDropNoRemote => {
                "node's stack into the tunnel, no remote block (or not IPv4: the device's own \
                 IPv6 link-local chatter): dropped"
            }
        }
    }
}

/// The value of the `tunnel` map (`struct tunnel`): the node's VXLAN device.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tunnel {
    /// Index of the VXLAN device in the node namespace; 0 while there is none.
    pub ifindex: u32,
    /// The VNI of the network.
    pub vni: u32,
}

// SAFETY: `repr(C)`, two u32 without padding; every bit pattern is valid.
unsafe impl aya::Pod for Tunnel {}

/// The `endpoints` key of a pod address: its octets in network byte order, as the program
/// reads `iphdr.daddr`.
fn key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn address(key: u32) -> Ipv4Addr {
    Ipv4Addr::from(key.to_ne_bytes())
}

/// A network's and node's directory on the BPF filesystem (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pins {
    dir: PathBuf,
}

/// Checks the `bpffs` key: an absolute path (code 7). Touches nothing.
pub(crate) fn check_bpffs(bpffs: &Path) -> Result<()> {
    if !bpffs.is_absolute() {
        return Err(Error::InvalidConfig {
            field: "bpffs",
            reason: format!("{} is not an absolute path", bpffs.display()),
        });
    }
    Ok(())
}

impl Pins {
    /// The directory of `network` on `node` under the BPF filesystem mounted at `bpffs`.
    /// Checks the names as network and node names (code 7), which makes each one path
    /// segment; touches nothing.
    pub fn new(bpffs: &Path, network: &str, node: &str) -> Result<Self> {
        cni_core::spec::validate_network_name(network)?;
        cni_core::registry::validate_node_name(node)?;
        check_bpffs(bpffs)?;
        Ok(Pins {
            dir: bpffs.join("cnikit").join(network).join(node),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pinned endpoint map.
    pub fn endpoints(&self) -> PathBuf {
        self.dir.join("endpoints")
    }

    /// The pinned counters map.
    pub fn counters(&self) -> PathBuf {
        self.dir.join("counters")
    }

    /// The pinned LPM map of remote blocks.
    pub fn remotes(&self) -> PathBuf {
        self.dir.join("remotes")
    }

    /// The pinned map of the node's VXLAN device.
    pub fn tunnel(&self) -> PathBuf {
        self.dir.join("tunnel")
    }

    /// The pinned TCX link of the VXLAN device's program in `direction` (`ingress`,
    /// `egress`).
    pub fn tunnel_link(&self, direction: &str) -> PathBuf {
        self.dir.join("tunnel-links").join(direction)
    }

    /// The pinned TCX link of the program on host veth `veth`.
    pub fn link(&self, veth: &str) -> PathBuf {
        self.dir.join("links").join(veth)
    }

    /// Makes the directories (like `mkdir -p DIR/links`).
    pub(crate) fn create(&self) -> Result<()> {
        for sub in ["links", "tunnel-links"] {
            let dir = self.dir.join(sub);
            fs::create_dir_all(&dir).map_err(|source| Error::Pin {
                what: "mkdir -p",
                path: dir,
                source,
            })?;
        }
        Ok(())
    }

    /// Removes a pinned file (a link: which detaches its program); `Ok(false)` when there
    /// is none.
    pub(crate) fn unpin(path: PathBuf) -> Result<bool> {
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(Error::Pin {
                what: "rm",
                path,
                source,
            }),
        }
    }

    /// Removes the pinned link of `veth` (which detaches its program); `Ok(false)` when
    /// there is none.
    pub fn unpin_link(&self, veth: &str) -> Result<bool> {
        Self::unpin(self.link(veth))
    }

    /// Removes every pin of this network and node and the directories up to `cnikit/`
    /// where they are left empty, like `rm -r DIR` then `rmdir -p`. `Ok` when already gone.
    pub fn remove_all(&self) -> Result<()> {
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::Pin {
                    what: "rm -r",
                    path: self.dir.clone(),
                    source,
                });
            }
        }
        // The network's and cnikit's directories go when nothing else is in them.
        let mut parent = self.dir.parent();
        for _ in 0..2 {
            let Some(dir) = parent else { break };
            if fs::remove_dir(dir).is_err() {
                break;
            }
            parent = dir.parent();
        }
        Ok(())
    }

    /// Opens the pinned endpoint map, `None` when it is not pinned (yet, or any more).
    pub fn open_endpoints(&self) -> Result<Option<Endpoints>> {
        let path = self.endpoints();
        let Some(map) = open(&path)? else {
            return Ok(None);
        };
        let map =
            HashMap::try_from(Map::from_map_data(map).map_err(|e| map_err(&path, "open", e))?)
                .map_err(|e| map_err(&path, "open as a hash of u32 to endpoint", e))?;
        Ok(Some(Endpoints { map, path }))
    }

    /// Opens the pinned LPM map of remote blocks, `None` when it is not pinned.
    pub fn open_remotes(&self) -> Result<Option<Remotes>> {
        let path = self.remotes();
        let Some(map) = open(&path)? else {
            return Ok(None);
        };
        let map =
            LpmTrie::try_from(Map::from_map_data(map).map_err(|e| map_err(&path, "open", e))?)
                .map_err(|e| map_err(&path, "open as an LPM trie of IPv4 to u32", e))?;
        Ok(Some(Remotes { map, path }))
    }

    /// Reads the node's VXLAN device from the pinned `tunnel` map, `None` when the map is
    /// not pinned.
    pub fn read_tunnel(&self) -> Result<Option<Tunnel>> {
        let path = self.tunnel();
        let Some(map) = open(&path)? else {
            return Ok(None);
        };
        let map: Array<MapData, Tunnel> =
            Array::try_from(Map::from_map_data(map).map_err(|e| map_err(&path, "open", e))?)
                .map_err(|e| map_err(&path, "open as an array of tunnel", e))?;
        map.get(&0, 0)
            .map(Some)
            .map_err(|e| map_err(&path, "read entry 0", e))
    }

    /// Writes the node's VXLAN device into the pinned `tunnel` map (which must be pinned).
    pub fn write_tunnel(&self, tunnel: Tunnel) -> Result<()> {
        let path = self.tunnel();
        let map = open(&path)?.ok_or_else(|| {
            Error::mismatch(
                "tunnel map",
                format!("pinned at {}", path.display()),
                "none",
            )
        })?;
        let mut map: Array<MapData, Tunnel> =
            Array::try_from(Map::from_map_data(map).map_err(|e| map_err(&path, "open", e))?)
                .map_err(|e| map_err(&path, "open as an array of tunnel", e))?;
        map.set(0, tunnel, 0)
            .map_err(|e| map_err(&path, "write entry 0", e))
    }

    /// The kernel's id of the pinned endpoint map, `None` when it is not pinned.
    pub fn endpoints_id(&self) -> Result<Option<u32>> {
        let path = self.endpoints();
        let Some(map) = open(&path)? else {
            return Ok(None);
        };
        let info = map.info().map_err(|e| map_err(&path, "read info", e))?;
        Ok(Some(info.id()))
    }

    /// Reads the counters, summed over the CPUs, in the order of [`Counter::ALL`]; `None`
    /// when the map is not pinned.
    pub fn read_counters(&self) -> Result<Option<Counters>> {
        let path = self.counters();
        let Some(map) = open(&path)? else {
            return Ok(None);
        };
        let map: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(Map::from_map_data(map).map_err(|e| map_err(&path, "open", e))?)
                .map_err(|e| map_err(&path, "open as a per-CPU array of u64", e))?;
        let mut counts = [0u64; Counter::ALL.len()];
        for c in Counter::ALL {
            let values = map
                .get(&(c as u32), 0)
                .map_err(|e| map_err(&path, format!("read counter {c:?}"), e))?;
            counts[c as usize] = values.iter().sum();
        }
        Ok(Some(Counters(counts)))
    }
}

/// The counters of a network on a node, summed over the CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters([u64; Counter::ALL.len()]);

impl Counters {
    /// The packets counted as `c`.
    pub fn get(&self, c: Counter) -> u64 {
        self.0[c as usize]
    }
}

fn map_err(path: &Path, what: impl Into<String>, e: aya::maps::MapError) -> Error {
    Error::Map {
        path: path.to_path_buf(),
        what: what.into(),
        source: Box::new(e),
    }
}

/// Opens a pinned map, `None` when nothing is pinned at `path`.
fn open(path: &Path) -> Result<Option<MapData>> {
    if !path.exists() {
        return Ok(None);
    }
    MapData::from_pin(path)
        .map(Some)
        .map_err(|e| map_err(path, "open pin", e))
}

/// The pinned endpoint map, open.
pub struct Endpoints {
    map: HashMap<MapData, u32, Endpoint>,
    path: PathBuf,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints")
            .field("path", &self.path)
            .finish()
    }
}

impl Endpoints {
    /// The entry of `ip`, if any.
    pub fn get(&self, ip: Ipv4Addr) -> Result<Option<Endpoint>> {
        match self.map.get(&key(ip), 0) {
            Ok(e) => Ok(Some(e)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(&self.path, format!("lookup {ip}"), e)),
        }
    }

    /// Writes the entry of `ip` (created or replaced).
    pub fn insert(&mut self, ip: Ipv4Addr, endpoint: Endpoint) -> Result<()> {
        self.map
            .insert(key(ip), endpoint, 0)
            .map_err(|e| map_err(&self.path, format!("update {ip}"), e))
    }

    /// Removes the entry of `ip`; `Ok(false)` when there is none.
    pub fn remove(&mut self, ip: Ipv4Addr) -> Result<bool> {
        match self.map.remove(&key(ip)) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(false)
            }
            Err(e) => Err(map_err(&self.path, format!("delete {ip}"), e)),
        }
    }

    /// Every entry.
    pub fn list(&self) -> Result<Vec<(Ipv4Addr, Endpoint)>> {
        self.map
            .iter()
            .map(|r| {
                r.map(|(k, v)| (address(k), v))
                    .map_err(|e| map_err(&self.path, "iterate", e))
            })
            .collect()
    }
}

/// The pinned LPM map of remote blocks, open.
pub struct Remotes {
    map: LpmTrie<MapData, u32, u32>,
    path: PathBuf,
}

impl std::fmt::Debug for Remotes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remotes").field("path", &self.path).finish()
    }
}

fn block_key(block: Ipv4Net) -> Key<u32> {
    Key::new(u32::from(block.prefix_len()), key(block.network()))
}

impl Remotes {
    /// Every entry: a block of another node and that node's underlay address.
    pub fn list(&self) -> Result<Vec<(Ipv4Net, Ipv4Addr)>> {
        self.map
            .iter()
            .map(|r| {
                let (k, v) = r.map_err(|e| map_err(&self.path, "iterate", e))?;
                let prefix = u8::try_from(k.prefix_len()).unwrap_or(u8::MAX);
                let block = Ipv4Net::new(address(k.data()), prefix).map_err(|_| {
                    Error::mismatch(
                        format!("an entry of {}", self.path.display()),
                        "a prefix length of at most 32",
                        prefix.to_string(),
                    )
                })?;
                Ok((block, address(v)))
            })
            .collect()
    }

    /// The node address the longest block holding `ip` goes to, as the program looks it up.
    pub fn lookup(&self, ip: Ipv4Addr) -> Result<Option<Ipv4Addr>> {
        match self.map.get(&Key::new(32, key(ip)), 0) {
            Ok(v) => Ok(Some(address(v))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(&self.path, format!("lookup {ip}"), e)),
        }
    }

    /// Sends `block` to the node at `underlay` (created or replaced).
    pub fn insert(&mut self, block: Ipv4Net, underlay: Ipv4Addr) -> Result<()> {
        self.map
            .insert(&block_key(block), key(underlay), 0)
            .map_err(|e| map_err(&self.path, format!("update {block}"), e))
    }

    /// Removes the entry of `block`; `Ok(false)` when there is none.
    pub fn remove(&mut self, block: Ipv4Net) -> Result<bool> {
        match self.map.remove(&block_key(block)) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(false)
            }
            Err(e) => Err(map_err(&self.path, format!("delete {block}"), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_has_the_c_layout() {
        assert_eq!(std::mem::size_of::<Endpoint>(), 16);
        assert_eq!(std::mem::align_of::<Endpoint>(), 4);
    }

    #[test]
    fn keys_are_in_network_byte_order() {
        let ip = Ipv4Addr::new(10, 244, 1, 7);
        assert_eq!(key(ip).to_ne_bytes(), [10, 244, 1, 7]);
        assert_eq!(address(key(ip)), ip);
    }

    #[test]
    fn pins_are_per_network_and_node() {
        let p = Pins::new(Path::new("/sys/fs/bpf"), "k8s-pod-network", "node-1").unwrap();
        assert_eq!(
            p.dir(),
            Path::new("/sys/fs/bpf/cnikit/k8s-pod-network/node-1")
        );
        assert_eq!(
            p.link("cnk0123456789a"),
            Path::new("/sys/fs/bpf/cnikit/k8s-pod-network/node-1/links/cnk0123456789a")
        );
        for (net, node) in [("a/b", "n"), ("..", "n"), ("net", ""), ("net", "x/../y")] {
            let e = Pins::new(Path::new("/sys/fs/bpf"), net, node).unwrap_err();
            assert_eq!(e.code().0, 7, "{net:?} {node:?}");
        }
        assert_eq!(
            Pins::new(Path::new("bpf"), "n", "m").unwrap_err().code().0,
            7
        );
    }
}
