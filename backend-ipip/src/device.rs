//! The IPIP device's parameters (made, adopted and configured by
//! [`ensure_device`](cni_core::linux::kernel::ensure_device) and
//! [`configure_device`](cni_core::linux::kernel::configure_device)).

use std::net::Ipv4Addr;

use cni_core::linux::kernel::{IpipParams, LinkKind, LinkSpec};

/// The device `name` over the underlay `underlay` with address `local`: no `remote` (the
/// route's gateway is the outer destination), the inner packet's TTL, don't-fragment on
/// the outer packets. No MAC: an IPIP device's link-layer address is its `local`.
pub fn spec(name: &str, mtu: u32, local: Ipv4Addr, underlay: u32) -> LinkSpec {
    LinkSpec {
        name: name.to_owned(),
        mtu,
        mac: None,
        kind: LinkKind::Ipip(IpipParams {
            local: Some(local),
            underlay: Some(underlay),
            ttl: 0,
            pmtudisc: true,
        }),
    }
}
