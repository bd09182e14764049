//! veth pairs, created with the pod end directly in the pod's namespace.
//!
//! Creating the peer in its final namespace (`IFLA_NET_NS_FD` on the peer at creation)
//! avoids the slow move of a device between namespaces.

use std::os::fd::AsRawFd;

use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth};

use super::{NetNs, errno, kernel, link};
use crate::error::{Error, Result};

/// Prefix of the host-side veth names cnikit creates.
pub const HOST_PREFIX: &str = "cnk";

/// The smallest MTU cnikit gives a veth (the IPv4 minimum; IPv6 needs 1280).
pub const MIN_MTU: u32 = 68;
/// The largest MTU a veth takes.
pub const MAX_MTU: u32 = 65535;

/// Checks a configured MTU: from [`MIN_MTU`] (the IPv4 minimum) to [`MAX_MTU`] (the veth
/// maximum).
pub fn valid_mtu(mtu: u32) -> std::result::Result<(), String> {
    if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
        return Err(format!("{mtu} is outside {MIN_MTU}..={MAX_MTU}"));
    }
    Ok(())
}

/// FNV-1a, 64 bits: a small, stable hash for deterministic device names.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(PRIME)
    })
}

/// The host-side veth name of an attachment: `cnk` and 11 hex digits (the top 44 bits of
/// the FNV-1a hash of container id and interface name), 14 bytes in all.
///
/// Deterministic, so that DEL finds the device without the pod's namespace.
pub fn host_name(container_id: &str, ifname: &str) -> String {
    let mut key = Vec::with_capacity(container_id.len() + 1 + ifname.len());
    key.extend_from_slice(container_id.as_bytes());
    // A separator that can appear in neither part keeps ("ab", "c") apart from ("a", "bc").
    key.push(0);
    key.extend_from_slice(ifname.as_bytes());
    format!("{HOST_PREFIX}{:011x}", fnv1a64(&key) >> 20)
}

/// What [`create`] makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethSpec<'a> {
    /// Name of the end in the host namespace.
    pub host_name: &'a str,
    /// Name of the end in the pod namespace.
    pub pod_name: &'a str,
    /// MTU of both ends.
    pub mtu: u32,
    /// Hardware address of the host end; random when `None`.
    pub host_mac: Option<[u8; 6]>,
    /// Index of a bridge to enslave the host end to.
    pub host_controller: Option<u32>,
    /// Whether the host end starts up. (The pod end always starts down: the kernel cannot
    /// open a veth end before its pair is complete, and refuses with `ENOTCONN`.)
    pub host_up: bool,
}

/// Creates a veth pair with one end in `host` and the other in `pod`, in one request, like
/// `ip link add HOST [address MAC] mtu MTU [master BRIDGE] [up] type veth peer name POD
/// mtu MTU netns PODNS` run in `host`.
///
/// Fails with [`Error::LinkExists`] (code 101) naming the interface and its namespace if
/// either name is taken in its namespace; then nothing was created.
pub async fn create(host: &NetNs, pod: &NetNs, spec: &VethSpec<'_>) -> Result<()> {
    let peer = LinkUnspec::new_with_name(spec.pod_name)
        .mtu(spec.mtu)
        .setns_by_fd(pod.fd().as_raw_fd());
    let mut builder = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(spec.host_name)
        .mtu(spec.mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())));
    if let Some(mac) = spec.host_mac {
        builder = builder.address(mac.to_vec());
    }
    if let Some(controller) = spec.host_controller {
        builder = builder.controller(controller);
    }
    if spec.host_up {
        builder = builder.up();
    }
    // The fd in IFLA_NET_NS_FD is resolved by the kernel while the request is sent; `pod`
    // is borrowed until the reply, so the fd stays open.
    let added = host.handle().link().add(builder.build()).execute().await;
    let what = || {
        format!(
            "ip link add {} type veth peer name {} netns {}",
            spec.host_name,
            spec.pod_name,
            pod.path().display()
        )
    };
    match added {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(libc::EEXIST) => Err(taken(host, pod, spec)
            .await
            .unwrap_or_else(|| kernel(what(), e))),
        Err(e) => Err(kernel(what(), e)),
    }
}

/// After `EEXIST`: which of the two names is taken, as an [`Error::LinkExists`]. `None`
/// when neither is (any more), or the lookup fails.
async fn taken(host: &NetNs, pod: &NetNs, spec: &VethSpec<'_>) -> Option<Error> {
    if let Ok(Some(_)) = link::get(pod, spec.pod_name).await {
        return Some(Error::LinkExists {
            name: spec.pod_name.to_owned(),
            place: format!("the pod's network namespace {}", pod.path().display()),
        });
    }
    if let Ok(Some(_)) = link::get(host, spec.host_name).await {
        return Some(Error::LinkExists {
            name: spec.host_name.to_owned(),
            place: "the node's network namespace (the host end of a pod's veth)".to_owned(),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        // From the FNV reference test suite.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn host_names_are_short_stable_and_distinct() {
        let a = host_name("0123456789abcdef", "eth0");
        assert_eq!(a, host_name("0123456789abcdef", "eth0"));
        assert_eq!(a.len(), 14);
        assert!(a.starts_with(HOST_PREFIX));
        assert!(a[3..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, host_name("0123456789abcdef", "eth1"));
        assert_ne!(a, host_name("0123456789abcdee", "eth0"));
        assert_ne!(host_name("ab", "c"), host_name("a", "bc"));
        assert!(super::super::link::valid_name(&a).is_ok());
    }
}
