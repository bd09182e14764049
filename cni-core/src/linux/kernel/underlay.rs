//! The node's underlay interface as the routing backends use it.

use std::net::IpAddr;

use ipnet::IpNet;

use super::Links;
use crate::error::{Error, Result};
use crate::linux::link;
use crate::routing::LocalNode;

/// The underlay interface of the local node, checked against the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    /// Interface index.
    pub ifindex: u32,
    /// Interface name.
    pub name: String,
    /// The node's underlay address (on this interface).
    pub address: IpAddr,
    /// The underlay subnet: peers inside it are on-link.
    pub subnet: IpNet,
    /// MTU the node reported for the interface.
    pub mtu: u32,
}

impl Underlay {
    /// Checks `local` and finds its underlay interface: a valid prefix length, an
    /// interface that exists and holds `local.address`. Reads only.
    /// Errors: 7 when the node description is wrong, 101 when the kernel cannot be read.
    pub async fn resolve<K: Links + ?Sized>(kernel: &K, local: &LocalNode) -> Result<Self> {
        let max = if local.address.is_ipv4() { 32 } else { 128 };
        let subnet = IpNet::new(local.address, local.prefix_len)
            .map_err(|_| {
                Error::invalid_config(
                    "node.prefixLen",
                    format!("{} is longer than {max} bits", local.prefix_len),
                )
            })?
            .trunc();
        if local.address.is_unspecified() || local.address.is_multicast() {
            return Err(Error::invalid_config(
                "node.address",
                format!("{} is not a unicast address", local.address),
            ));
        }
        link::valid_name(&local.interface)
            .map_err(|r| Error::invalid_config("node.interface", r))?;
        let device = kernel.device(&local.interface).await?.ok_or_else(|| {
            Error::invalid_config(
                "node.interface",
                format!("there is no interface {:?}", local.interface),
            )
        })?;
        let ifindex = device.link.index;
        let addresses = kernel.addresses(ifindex).await?;
        if !addresses.iter().any(|a| a.addr() == local.address) {
            return Err(Error::invalid_config(
                "node.address",
                format!(
                    "{} is not an address of {} (it has {})",
                    local.address,
                    local.interface,
                    if addresses.is_empty() {
                        "none".to_owned()
                    } else {
                        addresses
                            .iter()
                            .map(|a| a.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ),
            ));
        }
        Ok(Underlay {
            ifindex,
            name: local.interface.clone(),
            address: local.address,
            subnet,
            mtu: local.underlay_mtu,
        })
    }

    /// The MTU of a tunnel device over this underlay that adds `overhead` bytes of
    /// encapsulation (`what`, for messages): `wanted`, else the most that fits, the
    /// underlay MTU minus the overhead. `Err(reason)` when `wanted` does not fit or the
    /// underlay leaves less than the smallest MTU.
    pub fn tunnel_mtu(
        &self,
        wanted: Option<u32>,
        overhead: u32,
        what: &str,
    ) -> std::result::Result<u32, String> {
        let max = self.mtu.saturating_sub(overhead);
        let mtu = wanted.unwrap_or(max);
        if mtu > max {
            return Err(format!(
                "{mtu} is more than the underlay MTU {} minus {overhead} bytes of {what} \
                 encapsulation",
                self.mtu
            ));
        }
        if mtu < crate::linux::veth::MIN_MTU {
            return Err(format!(
                "the underlay MTU {} leaves {mtu} bytes after encapsulation",
                self.mtu
            ));
        }
        Ok(mtu)
    }

    /// Whether `ip` is in the underlay subnet (reachable without a router).
    pub fn on_link(&self, ip: IpAddr) -> bool {
        self.subnet.contains(&ip)
    }
}
