//! The IPIP device of `bgp.ipip`, the same for both engines.

use std::net::IpAddr;

use cni_core::linux::kernel::{Kernel, Underlay, configure_device, ensure_device};
use cni_core::routing::LocalNode;

use crate::config::IpipConfig;
use crate::error::{Error, Result};

/// The outer IPv4 header.
pub(crate) const OVERHEAD: u32 = 20;

/// The device the learned routes go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tunnel {
    /// Its interface index.
    pub ifindex: u32,
    /// Only towards next hops outside the underlay subnet.
    pub cross_subnet: bool,
}

/// Makes (or adopts) the IPIP device over the underlay, as the `ipip` mode does: `local`
/// = the node's address, MTU 20 under the underlay's, the node's tunnel address, up.
/// Errors: 7 without a tunnel address or with an IPv6 underlay; 101 for the kernel.
pub(crate) async fn ensure<K: Kernel + ?Sized>(
    kernel: &K,
    ipip: &IpipConfig,
    underlay: &Underlay,
    local: &LocalNode,
) -> Result<Tunnel> {
    let IpAddr::V4(underlay_v4) = underlay.address else {
        return Err(Error::NotIpv4 {
            address: underlay.address,
        });
    };
    let address = local.tunnel_ipv4().ok_or_else(|| Error::Config {
        field: "bgp.ipip",
        reason: format!(
            "node {} has no tunnel address for {}",
            local.name, ipip.device
        ),
    })?;
    let mtu = underlay.mtu.saturating_sub(OVERHEAD);
    let spec = backend_ipip::device_spec(&ipip.device, mtu, underlay_v4, underlay.ifindex);
    let dev = ensure_device(kernel, &spec).await?;
    configure_device(kernel, &dev, mtu, IpAddr::V4(address)).await?;
    Ok(Tunnel {
        ifindex: dev.link.index,
        cross_subnet: ipip.cross_subnet,
    })
}
