//! The one tunnel device of a routing backend: made once, adopted when it is there already,
//! made again when its parameters differ, configured by writing only what differs.

use std::net::IpAddr;

use ipnet::IpNet;

use super::{Desired, Device, Kernel, LinkKind, LinkSpec, Links, Ownership};
use crate::error::{Error, Result};
use crate::linux::Mismatch;

/// Makes sure the device of `spec` exists with its kind and parameters, and returns it
/// (down if new). A device of that name and kind with other parameters is deleted and
/// made again (its routes and entries go with it); anything else of that name is left
/// alone and refused with code 7. The MTU and MAC are not compared: [`configure_device`]
/// sets the MTU, and an adopted device keeps its MAC.
///
/// Before making it, a device of the same kind under another name that the kernel would
/// not let live next to the new one (an IPIP device with the same `local` and `dev`, a
/// VXLAN device with the same VNI and port) is deleted, with its routes and entries, when
/// it is ours: the one this spec made under the name the configuration had before (same
/// source address and underlay, and for VXLAN same VNI and port). One that is not is left
/// alone and refused with code 7.
///
/// Idempotent. Errors: 7 for a name taken by another kind of device or a clashing device
/// that is not ours, 101 for kernel failures.
pub async fn ensure_device<K: Links + ?Sized>(kernel: &K, spec: &LinkSpec) -> Result<Device> {
    let kind = spec.kind.name();
    match kernel.device(&spec.name).await? {
        Some(d) if d.kind == Some(spec.kind) => {
            tracing::debug!(device = %spec.name, "{kind}: adopting the existing device");
            return Ok(d);
        }
        Some(d) if d.link.kind.as_deref() == Some(kind) => {
            tracing::info!(
                device = %spec.name,
                have = ?d.kind,
                want = ?spec.kind,
                "{kind}: the device has other parameters, making it again"
            );
            kernel.delete_link(&spec.name).await?;
        }
        Some(d) => {
            let found = match d.link.kind {
                Some(other) => format!("a {other} device"),
                None => "a plain device".into(),
            };
            return Err(Error::invalid_config(
                "device",
                format!(
                    "device {} exists and is {found}, not a {kind} device: choose another name",
                    spec.name
                ),
            ));
        }
        None => {}
    }
    remove_renamed(kernel, spec).await?;
    kernel.add_link(spec).await?;
    let made = kernel.device(&spec.name).await?.ok_or_else(|| {
        Error::kernel(
            spec.describe(),
            Mismatch::new("the new device", "no such device"),
        )
    })?;
    tracing::info!(device = %spec.name, "{kind}: created {}", spec.describe());
    Ok(made)
}

/// Deletes the device a renamed `spec` made under its old name, so that the kernel takes
/// the new one; refuses (code 7) a device that would block it but is not that one.
async fn remove_renamed<K: Links + ?Sized>(kernel: &K, spec: &LinkSpec) -> Result<()> {
    for d in kernel.devices().await? {
        let Some(have) = d.kind.filter(|_| d.link.name != spec.name) else {
            continue;
        };
        match (have, spec.kind) {
            (LinkKind::Ipip(h), LinkKind::Ipip(w))
                if (h.local, h.underlay) == (w.local, w.underlay) =>
            {
                // The kernel's own fallback device (`tunl0`) has neither, and ours always
                // have a `local`: it is never taken for ours.
                if w.local.is_none() {
                    return Err(blocked(spec, &d.link.name));
                }
            }
            (LinkKind::Vxlan(h), LinkKind::Vxlan(w)) if (h.vni, h.port) == (w.vni, w.port) => {
                if (h.local, h.underlay) != (w.local, w.underlay) {
                    return Err(blocked(spec, &d.link.name));
                }
            }
            _ => continue,
        }
        tracing::info!(
            old = %d.link.name,
            new = %spec.name,
            "{}: the device was renamed, deleting the old one",
            spec.kind.name()
        );
        kernel.delete_link(&d.link.name).await?;
    }
    Ok(())
}

/// The code 7 error for `spec` clashing with the device `other`, which is not ours.
fn blocked(spec: &LinkSpec, other: &str) -> Error {
    Error::invalid_config(
        "device",
        format!(
            "device {other} has the parameters the kernel keys {} devices by ({}): \
             it is not cnikit's device, remove it or change the configuration",
            spec.kind.name(),
            spec.kind.describe()
        ),
    )
}

/// Sets the device's MTU, its one IPv4 address (`address`/32, the tunnel address) and
/// brings it up, writing only what differs; other IPv4 addresses are removed, IPv6 ones
/// (the kernel's link-local one) left. Errors: 101.
pub async fn configure_device<K: Links + ?Sized>(
    kernel: &K,
    device: &Device,
    mtu: u32,
    address: IpAddr,
) -> Result<()> {
    let index = device.link.index;
    if device.link.mtu != Some(mtu) {
        kernel.set_mtu(index, mtu).await?;
    }
    let want = IpNet::from(address);
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

/// Deletes the device `name` if it is of `kind` (`"vxlan"`, `"ipip"`), with every route
/// and entry through it, like `ip link del dev NAME`; a device of another kind is not
/// the backend's and stays. Returns whether one was deleted. Idempotent. Errors: 101.
pub async fn delete_device<K: Links + ?Sized>(kernel: &K, name: &str, kind: &str) -> Result<bool> {
    match kernel.device(name).await? {
        Some(d) if d.link.kind.as_deref() == Some(kind) => kernel.delete_link(name).await,
        _ => Ok(false),
    }
}

/// Removes everything a routing backend made: its device `name` if it is of `kind` (with
/// every route and entry through it, see [`delete_device`]), then every route with our
/// protocol left (those through the underlay, and any a failed deletion left behind).
/// Both steps run; their errors come back together. Idempotent. Errors: 101.
pub async fn remove_owned<K: Kernel + ?Sized>(
    kernel: &K,
    device: Option<(&str, &str)>,
) -> Result<()> {
    let mut errors = Vec::new();
    if let Some((name, kind)) = device
        && let Err(e) = delete_device(kernel, name, kind).await
    {
        errors.push(e);
    }
    // Wanting nothing deletes every route with our protocol, and nothing else.
    if let Err(e) = Desired::new().apply(kernel, &Ownership::default()).await {
        errors.push(e);
    }
    Error::collect(errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linux::ipip::IpipParams;
    use crate::linux::kernel::{Recording, Routes, Write};

    fn spec(local: [u8; 4]) -> LinkSpec {
        LinkSpec {
            name: "tun".into(),
            mtu: 1480,
            mac: None,
            kind: LinkKind::Ipip(IpipParams {
                local: Some(local.into()),
                underlay: None,
                ttl: 0,
                pmtudisc: true,
            }),
        }
    }

    #[tokio::test]
    async fn made_adopted_remade_refused() {
        let k = Recording::new();
        let made = ensure_device(&k, &spec([10, 0, 0, 1])).await.unwrap();
        assert_eq!(k.take_writes(), vec![Write::AddLink(spec([10, 0, 0, 1]))]);
        let adopted = ensure_device(&k, &spec([10, 0, 0, 1])).await.unwrap();
        assert_eq!(adopted, made);
        assert!(k.take_writes().is_empty());
        ensure_device(&k, &spec([10, 0, 0, 2])).await.unwrap();
        assert_eq!(
            k.take_writes(),
            vec![
                Write::DeleteLink { name: "tun".into() },
                Write::AddLink(spec([10, 0, 0, 2]))
            ]
        );
        k.add_plain_link("eth9", 1500, &[]);
        let e = ensure_device(
            &k,
            &LinkSpec {
                name: "eth9".into(),
                ..spec([10, 0, 0, 3])
            },
        )
        .await
        .unwrap_err();
        assert_eq!(e.code().0, 7, "{e}");
        assert!(k.writes().is_empty());
        assert!(!delete_device(&k, "eth9", "ipip").await.unwrap());
        assert!(delete_device(&k, "tun", "ipip").await.unwrap());
        assert!(!delete_device(&k, "tun", "ipip").await.unwrap());
    }

    fn vxlan(name: &str, vni: u32, local: [u8; 4]) -> LinkSpec {
        LinkSpec {
            name: name.into(),
            mtu: 1450,
            mac: None,
            kind: LinkKind::Vxlan(crate::linux::vxlan::VxlanParams {
                vni,
                port: 4789,
                local: Some(IpAddr::from(local)),
                underlay: None,
                learning: false,
                external: false,
            }),
        }
    }

    /// Makes `spec`'s device with one route through it, and forgets the writes.
    async fn made_with_a_route(k: &Recording, spec: &LinkSpec) -> u32 {
        let d = ensure_device(k, spec).await.unwrap();
        k.add_route(&crate::linux::kernel::GatewayRoute {
            dst: "10.244.1.0/26".parse().unwrap(),
            via: "10.244.1.0".parse().unwrap(),
            oif: d.link.index,
            onlink: true,
        })
        .await
        .unwrap();
        k.take_writes();
        d.link.index
    }

    #[tokio::test]
    async fn a_renamed_device_replaces_ours_under_the_old_name() {
        let k = Recording::new();
        made_with_a_route(&k, &spec([10, 0, 0, 1])).await;
        let renamed = LinkSpec {
            name: "tun2".into(),
            ..spec([10, 0, 0, 1])
        };
        ensure_device(&k, &renamed).await.unwrap();
        assert_eq!(
            k.take_writes(),
            vec![
                Write::DeleteLink { name: "tun".into() },
                Write::AddLink(renamed)
            ]
        );
        assert!(k.link("tun").is_none());
        assert!(k.routes().is_empty(), "{:?}", k.routes());

        let k = Recording::new();
        made_with_a_route(&k, &vxlan("vx", 7, [10, 0, 0, 1])).await;
        ensure_device(&k, &vxlan("vx2", 7, [10, 0, 0, 1]))
            .await
            .unwrap();
        assert_eq!(
            k.take_writes(),
            vec![
                Write::DeleteLink { name: "vx".into() },
                Write::AddLink(vxlan("vx2", 7, [10, 0, 0, 1]))
            ]
        );
        assert!(k.routes().is_empty(), "{:?}", k.routes());
    }

    #[tokio::test]
    async fn a_blocking_device_that_is_not_ours_is_refused_and_kept() {
        let k = Recording::new();
        // Same VNI and port (what the kernel refuses) but another source address.
        made_with_a_route(&k, &vxlan("other", 7, [10, 0, 0, 9])).await;
        let e = ensure_device(&k, &vxlan("vx", 7, [10, 0, 0, 1]))
            .await
            .unwrap_err();
        assert_eq!(e.code().0, 7, "{e}");
        assert!(e.to_string().contains("other"), "{e}");
        assert!(k.writes().is_empty());
        assert_eq!(k.routes().len(), 1);
        // Another VNI does not block: both stay.
        ensure_device(&k, &vxlan("vx", 8, [10, 0, 0, 1]))
            .await
            .unwrap();
        assert!(k.link("other").is_some() && k.link("vx").is_some());
    }
}
