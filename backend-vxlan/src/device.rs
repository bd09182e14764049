//! The VXLAN device: made once, adopted when it is there already.

use std::net::IpAddr;

use cni_core::linux::kernel::{Device, Kernel, VxlanParams, VxlanSpec};
use cni_core::linux::veth::fnv1a64;
use cni_core::spec::HwAddr;
use ipnet::IpNet;

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

/// Makes sure the device of `spec` exists with its parameters, and returns it (down if
/// new). A VXLAN device of that name with other parameters is deleted and made again;
/// anything else of that name is left alone and refused.
pub(crate) async fn ensure<K: Kernel + ?Sized>(kernel: &K, spec: &VxlanSpec) -> Result<Device> {
    match kernel.device(&spec.name).await? {
        Some(d) if d.vxlan == Some(spec.params) => {
            tracing::debug!(device = %spec.name, "vxlan: adopting the existing device");
            return Ok(d);
        }
        Some(Device {
            vxlan: Some(old), ..
        }) => {
            tracing::info!(
                device = %spec.name,
                have = ?old,
                want = ?spec.params,
                "vxlan: the device has other parameters, making it again"
            );
            kernel.delete_link(&spec.name).await?;
        }
        Some(d) => {
            return Err(Error::DeviceConflict {
                name: spec.name.clone(),
                found: match d.link.kind {
                    Some(kind) => format!("a {kind} device"),
                    None => "a plain device".into(),
                },
            });
        }
        None => {}
    }
    kernel.add_vxlan(spec).await?;
    let made = kernel.device(&spec.name).await?.ok_or_else(|| {
        cni_core::Error::kernel(
            spec.describe(),
            cni_core::linux::Mismatch::new("the new device", "no such device"),
        )
    })?;
    tracing::info!(device = %spec.name, "vxlan: created {}", spec.describe());
    Ok(made)
}

/// Sets the device's MTU, its one IPv4 address (the VTEP address) and brings it up,
/// writing only what differs. IPv6 addresses (the kernel's link-local one) are left.
pub(crate) async fn configure<K: Kernel + ?Sized>(
    kernel: &K,
    device: &Device,
    mtu: u32,
    vtep: IpAddr,
) -> Result<()> {
    let index = device.link.index;
    if device.link.mtu != Some(mtu) {
        kernel.set_mtu(index, mtu).await?;
    }
    let want = IpNet::from(vtep);
    let have = kernel.addresses(index).await?;
    for stale in have.iter().filter(|a| a.addr().is_ipv4() && **a != want) {
        kernel.delete_address(index, *stale).await?;
    }
    if !have.contains(&want) {
        kernel.add_address(index, want).await?;
    }
    if !device.link.up {
        kernel.set_up(index).await?;
    }
    Ok(())
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
