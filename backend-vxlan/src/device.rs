//! The VXLAN device's parameters and MAC (made, adopted and configured by
//! [`ensure_device`](cni_core::linux::kernel::ensure_device) and
//! [`configure_device`](cni_core::linux::kernel::configure_device)).

use std::net::IpAddr;

use cni_core::linux::kernel::{Device, VxlanParams};
use cni_core::linux::veth::fnv1a64;
use cni_core::spec::HwAddr;

use crate::error::{Error, Result};

/// The MAC a new VXLAN device gets: locally administered unicast, derived from the node
/// name and the VNI, so that a device made again after a reboot keeps the MAC its peers
/// have in their neighbour tables.
pub(crate) fn vtep_mac(node: &str, vni: u32) -> [u8; 6] {
    let mut key = b"cnikit-vxlan\0".to_vec();
    key.extend_from_slice(node.as_bytes());
    key.push(0);
    key.extend_from_slice(&vni.to_be_bytes());
    let bits = fnv1a64(&key).to_be_bytes();
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&bits[..6]);
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// The device's MAC as six bytes.
pub(crate) fn mac_of(device: &Device) -> Result<[u8; 6]> {
    device
        .link
        .mac
        .as_ref()
        .and_then(|m| <[u8; 6]>::try_from(m.as_bytes()).ok())
        .ok_or_else(|| {
            Error::Core(cni_core::Error::kernel(
                format!("ip link show dev {}", device.link.name),
                cni_core::linux::Mismatch::new(
                    "a 6-byte MAC address",
                    device
                        .link
                        .mac
                        .as_ref()
                        .map_or_else(|| "none".to_owned(), HwAddr::to_string),
                ),
            ))
        })
}

/// The parameters the device must have.
pub(crate) fn params(vni: u32, port: u16, local: IpAddr, underlay: u32) -> VxlanParams {
    VxlanParams {
        vni,
        port,
        local: Some(local),
        underlay: Some(underlay),
        learning: false,
        external: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_macs_are_stable_local_unicast_and_distinct() {
        let a = vtep_mac("node-a", 1);
        assert_eq!(a, vtep_mac("node-a", 1));
        assert_eq!(a[0] & 0x03, 0x02);
        assert_ne!(a, vtep_mac("node-b", 1));
        assert_ne!(a, vtep_mac("node-a", 2));
    }
}
