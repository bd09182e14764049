//! Links: look up, bring up, delete, the bridge device, and tunnel devices made from a
//! [`LinkSpec`] (its [`LinkKind`] says which: VXLAN, IPIP).

use std::hash::{BuildHasher, Hasher};

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::{LinkBridge, LinkBridgePort, LinkUnspec};

use super::ipip::IpipParams;
use super::vxlan::VxlanParams;
use super::{Mismatch, NetNs, errno, ipip, kernel, vxlan};
use crate::error::{Error, Result};
use crate::spec::HwAddr;

/// The longest interface name the kernel accepts (`IFNAMSIZ - 1`).
pub const MAX_NAME_LEN: usize = 15;

/// A link as the helpers report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index in its namespace.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Hardware address.
    pub mac: Option<HwAddr>,
    /// MTU.
    pub mtu: Option<u32>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Index of the bridge (or other controller) this link is enslaved to.
    pub controller: Option<u32>,
    /// `IFLA_LINK`: for a veth, the index of its peer (in the peer's namespace).
    pub peer_index: Option<u32>,
    /// The link kind (`bridge`, `veth`, …), absent for plain devices such as `lo`.
    pub kind: Option<String>,
}

impl Link {
    pub(super) fn from_message(m: LinkMessage) -> Self {
        let mut link = Link {
            index: m.header.index,
            name: String::new(),
            mac: None,
            mtu: None,
            up: m.header.flags.contains(LinkFlags::Up),
            controller: None,
            peer_index: None,
            kind: None,
        };
        for attr in m.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n,
                LinkAttribute::Address(a) => link.mac = Some(HwAddr::new(a)),
                LinkAttribute::Mtu(v) => link.mtu = Some(v),
                LinkAttribute::Controller(c) => link.controller = Some(c),
                LinkAttribute::Link(l) => link.peer_index = Some(l),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(k) = info {
                            link.kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// The kind of a device a [`LinkSpec`] makes, with the parameters of that kind: the
/// ones that decide where its packets go, which [`device`] reads back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkKind {
    /// A VXLAN device (`type vxlan`).
    Vxlan(VxlanParams),
    /// An IP-in-IP tunnel device (`type ipip`).
    Ipip(IpipParams),
}

impl LinkKind {
    /// The kernel's name of the kind (`IFLA_INFO_KIND`), as `ip -d link` shows it.
    pub fn name(&self) -> &'static str {
        match self {
            LinkKind::Vxlan(_) => "vxlan",
            LinkKind::Ipip(_) => "ipip",
        }
    }

    /// The `type …` part of an `ip link add` command.
    pub fn describe(&self) -> String {
        match self {
            LinkKind::Vxlan(p) => p.describe(),
            LinkKind::Ipip(p) => p.describe(),
        }
    }
}

/// How [`add`] makes a device: its name, MTU, hardware address and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSpec {
    /// Device name.
    pub name: String,
    /// MTU.
    pub mtu: u32,
    /// Hardware address; the kernel's choice when `None`. Only for kinds with an Ethernet
    /// address (VXLAN); an IPIP device's link-layer address is its `local` address.
    pub mac: Option<[u8; 6]>,
    /// Kind and its parameters.
    pub kind: LinkKind,
}

impl LinkSpec {
    /// Checks what the kernel would not say itself: a hardware address on a kind without
    /// an Ethernet address (IPIP), which the kernel takes and ignores. Errors: 7.
    pub fn validate(&self) -> Result<()> {
        match (&self.kind, self.mac) {
            (LinkKind::Ipip(_), Some(mac)) => Err(Error::invalid_config(
                "mac",
                format!(
                    "{}: an ipip device has no Ethernet address (its link-layer address is \
                     its local address)",
                    HwAddr::from(mac)
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The `ip link add` command this spec equals, for messages.
    pub fn describe(&self) -> String {
        let mut s = format!("ip link add {}", self.name);
        if let Some(mac) = self.mac {
            s.push_str(&format!(" address {}", HwAddr::from(mac)));
        }
        s.push_str(&format!(" mtu {} {}", self.mtu, self.kind.describe()));
        s
    }
}

/// A link with, if it is of a kind cnikit makes, the parameters of that kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The link.
    pub link: Link,
    /// The kind's parameters, when the link is of a [`LinkKind`] (`None` for a veth, a
    /// bridge, a plain device).
    pub kind: Option<LinkKind>,
}

impl Device {
    /// The VXLAN parameters, when the link is a VXLAN device.
    pub fn vxlan(&self) -> Option<&VxlanParams> {
        match &self.kind {
            Some(LinkKind::Vxlan(p)) => Some(p),
            _ => None,
        }
    }

    /// The IPIP parameters, when the link is an IPIP device.
    pub fn ipip(&self) -> Option<&IpipParams> {
        match &self.kind {
            Some(LinkKind::Ipip(p)) => Some(p),
            _ => None,
        }
    }

    fn from_message(m: LinkMessage) -> Self {
        let data = m
            .attributes
            .iter()
            .filter_map(|attr| match attr {
                LinkAttribute::LinkInfo(infos) => Some(infos),
                _ => None,
            })
            .flatten()
            .find_map(|info| match info {
                LinkInfo::Data(data) => Some(data.clone()),
                _ => None,
            });
        let link = Link::from_message(m);
        let kind = match (link.kind.as_deref(), data) {
            (Some("vxlan"), data) => Some(LinkKind::Vxlan(vxlan::parse(match &data {
                Some(InfoData::Vxlan(d)) => d,
                _ => &[],
            }))),
            (Some("ipip"), data) => Some(LinkKind::Ipip(ipip::parse(match &data {
                Some(InfoData::IpTunnel(d)) => d,
                _ => &[],
            }))),
            _ => None,
        };
        Device { link, kind }
    }
}

/// Creates a device (down), like `ip link add NAME [address MAC] mtu MTU type KIND …`.
/// Fails with `EEXIST` (code 101) if the name is taken, or, for an IPIP device, if another
/// IPIP device has the same `local`, `remote` and `dev` (the kernel keys tunnels by them);
/// with code 7 when [`LinkSpec::validate`] refuses the spec.
pub async fn add(ns: &NetNs, spec: &LinkSpec) -> Result<()> {
    spec.validate()?;
    let message = match &spec.kind {
        LinkKind::Vxlan(p) => vxlan::message(spec, p),
        LinkKind::Ipip(p) => ipip::message(spec, p),
    };
    ns.handle()
        .link()
        .add(message)
        .execute()
        .await
        .map_err(|e| kernel(spec.describe(), e))
}

/// Looks a link up by name with the parameters of its kind, like
/// `ip -d link show dev NAME`. `Ok(None)` if there is none.
pub async fn device(ns: &NetNs, name: &str) -> Result<Option<Device>> {
    let reply = get_message(ns, name, "ip -d link show").await?;
    Ok(reply.map(Device::from_message))
}

/// Checks that `name` is usable as an interface name: 1 to 15 bytes, no `/`, `:` or
/// whitespace, not `.` or `..` (the kernel's `dev_valid_name`, plus `:` for aliases).
pub fn valid_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("empty interface name".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "interface name {name:?} is longer than {MAX_NAME_LEN} bytes"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not an interface name"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(format!(
            "interface name {name:?} contains '/', ':' or whitespace"
        ));
    }
    Ok(())
}

/// Checks the name of a device cnikit makes (a bridge, a tunnel device): usable as an
/// interface name ([`valid_name`]) and not in the namespace of cnikit's host veths
/// ([`veth::HOST_PREFIX`](super::veth::HOST_PREFIX)).
pub fn valid_device_name(name: &str) -> std::result::Result<(), String> {
    valid_name(name)?;
    let prefix = super::veth::HOST_PREFIX;
    if name.starts_with(prefix) {
        return Err(format!(
            "names starting with {prefix:?} are cnikit's host veths"
        ));
    }
    Ok(())
}

/// Looks a link up by name, like `ip link show dev NAME`. `Ok(None)` if there is none.
pub async fn get(ns: &NetNs, name: &str) -> Result<Option<Link>> {
    let reply = get_message(ns, name, "ip link show").await?;
    Ok(reply.map(Link::from_message))
}

/// The kernel's message of the link `name`, `Ok(None)` if there is none; `command` (the
/// `ip … link show` the caller equals) names it in errors.
pub(super) async fn get_message(
    ns: &NetNs,
    name: &str,
    command: &str,
) -> Result<Option<LinkMessage>> {
    let reply = ns
        .handle()
        .link()
        .get()
        .match_name(name)
        .execute()
        .try_next()
        .await;
    match reply {
        Ok(m) => Ok(m),
        Err(e) if matches!(errno(&e), Some(libc::ENODEV)) => Ok(None),
        Err(e) => Err(kernel(format!("{command} dev {name}"), e)),
    }
}

/// Lists every link of the namespace with the parameters of its kind, like
/// `ip -d link show`.
pub async fn devices(ns: &NetNs) -> Result<Vec<Device>> {
    let messages = dump(ns, "ip -d link show").await?;
    Ok(messages.into_iter().map(Device::from_message).collect())
}

/// Lists every link of the namespace, like `ip link show`.
pub async fn list(ns: &NetNs) -> Result<Vec<Link>> {
    let messages = dump(ns, "ip link show").await?;
    Ok(messages.into_iter().map(Link::from_message).collect())
}

/// The kernel's messages of every link; `command` (the `ip … link show` the caller
/// equals) names it in errors.
async fn dump(ns: &NetNs, command: &str) -> Result<Vec<LinkMessage>> {
    ns.handle()
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| kernel(command, e))
}

/// Sets a link up, like `ip link set dev NAME up`.
pub async fn set_up(ns: &NetNs, name: &str) -> Result<()> {
    ns.handle()
        .link()
        .set(LinkUnspec::new_with_name(name).up().build())
        .execute()
        .await
        .map_err(|e| kernel(format!("ip link set dev {name} up"), e))
}

/// Deletes a link by name, like `ip link del dev NAME`. Returns whether it existed: a
/// missing link is success, so that DEL stays idempotent. Deleting one end of a veth pair
/// deletes the other end too, in whichever namespace it is.
pub async fn delete(ns: &NetNs, name: &str) -> Result<bool> {
    let message = LinkUnspec::new_with_name(name).build();
    match ns.handle().link().del_with_message(message).execute().await {
        Ok(()) => Ok(true),
        Err(e) if matches!(errno(&e), Some(libc::ENODEV | libc::ENOENT)) => Ok(false),
        Err(e) => Err(kernel(format!("ip link del dev {name}"), e)),
    }
}

/// Turns hairpin mode on or off on a bridge port, like
/// `ip link set dev NAME type bridge_slave hairpin on|off`.
pub async fn set_hairpin(ns: &NetNs, port: &Link, on: bool) -> Result<()> {
    let onoff = if on { "on" } else { "off" };
    ns.handle()
        .link()
        .set_port(LinkBridgePort::new(port.index).hairpin(on).build())
        .execute()
        .await
        .map_err(|e| {
            kernel(
                format!(
                    "ip link set dev {} type bridge_slave hairpin {onoff}",
                    port.name
                ),
                e,
            )
        })
}

/// Sets the MTU of a link, like `ip link set dev #INDEX mtu MTU`.
pub async fn set_mtu_by_index(ns: &NetNs, index: u32, mtu: u32) -> Result<()> {
    ns.handle()
        .link()
        .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
        .execute()
        .await
        .map_err(|e| kernel(format!("ip link set dev #{index} mtu {mtu}"), e))
}

/// Sets a link up by index, like `ip link set dev #INDEX up`.
pub async fn set_up_by_index(ns: &NetNs, index: u32) -> Result<()> {
    ns.handle()
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| kernel(format!("ip link set dev #{index} up"), e))
}

/// How a bridge is created when it does not exist yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeSpec<'a> {
    /// Device name.
    pub name: &'a str,
    /// MTU.
    pub mtu: u32,
    /// Whether bridged frames go through iptables, ip6tables and arptables.
    pub netfilter: bool,
}

/// Makes sure a bridge exists and is up, like
/// `ip link add NAME address MAC mtu MTU type bridge nf_call_iptables 0 nf_call_ip6tables 0
/// nf_call_arptables 0; ip link set NAME up`, and returns it.
///
/// Idempotent, and safe against concurrent callers (plugins run in parallel processes): if
/// another process creates it first, that bridge is used. An existing bridge is left as it
/// is apart from being set up; a device of that name that is not a bridge is an error.
///
/// A new bridge gets a random, locally administered MAC address set explicitly, so that
/// the kernel never changes it as ports come and go (pods cache the gateway's MAC).
pub async fn ensure_bridge(ns: &NetNs, spec: &BridgeSpec<'_>) -> Result<Link> {
    let name = spec.name;
    let existing = match get(ns, name).await? {
        Some(link) => link,
        None => {
            let message = LinkBridge::new(name)
                .mtu(spec.mtu)
                .address(random_mac().to_vec())
                .nf_call_iptables(spec.netfilter)
                .nf_call_ip6tables(spec.netfilter)
                .nf_call_arptables(spec.netfilter)
                .build();
            match ns.handle().link().add(message).execute().await {
                Ok(()) => {}
                // Another plugin process won the race; use its bridge.
                Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                Err(e) => return Err(kernel(format!("ip link add {name} type bridge"), e)),
            }
            get(ns, name).await?.ok_or_else(|| {
                Error::kernel(
                    format!("ip link add {name} type bridge"),
                    Mismatch::new("the new bridge", "no such device (deleted concurrently?)"),
                )
            })?
        }
    };
    if existing.kind.as_deref() != Some("bridge") {
        return Err(Error::kernel(
            format!("use {name} as the pods' bridge"),
            Mismatch::new(
                "a bridge",
                format!("a {} device", existing.kind.as_deref().unwrap_or("plain")),
            ),
        ));
    }
    if !existing.up {
        set_up(ns, name).await?;
    }
    Ok(Link {
        up: true,
        ..existing
    })
}

/// A random unicast, locally administered MAC address.
pub fn random_mac() -> [u8; 6] {
    // RandomState is seeded from the OS's randomness per instance: enough for a MAC.
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        .to_be_bytes();
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&bits[..6]);
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_like_the_kernel_does() {
        assert!(valid_name("eth0").is_ok());
        assert!(valid_name("cnk0123456789ab").is_ok());
        assert!(valid_name("").is_err());
        assert!(valid_name("0123456789abcdef").is_err());
        assert!(valid_name("a/b").is_err());
        assert!(valid_name("a b").is_err());
        assert!(valid_name("a:1").is_err());
        assert!(valid_name("..").is_err());
    }

    #[test]
    fn random_macs_are_local_unicast() {
        for _ in 0..64 {
            let mac = random_mac();
            assert_eq!(mac[0] & 0x01, 0, "multicast bit set in {mac:?}");
            assert_eq!(mac[0] & 0x02, 0x02, "not locally administered: {mac:?}");
        }
        assert_ne!(random_mac(), random_mac());
    }
}
