//! VXLAN devices: create one, and read back what an existing one is.

use std::net::IpAddr;

use rtnetlink::LinkVxlan;
use rtnetlink::packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};

use super::link::{self, Link};
use super::{NetNs, kernel};
use crate::error::Result;
use crate::spec::HwAddr;

/// The largest VXLAN network identifier (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// The IANA VXLAN UDP port.
pub const DEFAULT_PORT: u16 = 4789;

/// The parameters of a VXLAN device that decide where its packets go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanParams {
    /// VXLAN network identifier (`id`).
    pub vni: u32,
    /// UDP destination port (`dstport`).
    pub port: u16,
    /// Source address of the outer packets (`local`).
    pub local: Option<IpAddr>,
    /// Index of the underlay device (`dev`).
    pub underlay: Option<u32>,
    /// Whether the device learns remote MACs from received packets (`[no]learning`).
    pub learning: bool,
}

/// How [`create`] makes a VXLAN device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    /// Device name.
    pub name: String,
    /// VNI, port, local address, underlay device, learning.
    pub params: VxlanParams,
    /// MTU.
    pub mtu: u32,
    /// Hardware address; random when `None`.
    pub mac: Option<[u8; 6]>,
}

impl VxlanSpec {
    /// The `ip link add` command this spec equals, for messages.
    pub fn describe(&self) -> String {
        let p = &self.params;
        let mut s = format!("ip link add {}", self.name);
        if let Some(mac) = self.mac {
            s.push_str(&format!(" address {}", HwAddr::from(mac)));
        }
        s.push_str(&format!(
            " mtu {} type vxlan id {} dstport {}",
            self.mtu, p.vni, p.port
        ));
        if let Some(local) = p.local {
            s.push_str(&format!(" local {local}"));
        }
        if let Some(dev) = p.underlay {
            s.push_str(&format!(" dev #{dev}"));
        }
        s.push_str(if p.learning {
            " learning"
        } else {
            " nolearning"
        });
        s
    }
}

/// Creates a VXLAN device (down), like
/// `ip link add NAME [address MAC] mtu MTU type vxlan id VNI dstport PORT local IP dev DEV
/// nolearning`. Fails with `EEXIST` (code 101) if the name is taken.
pub async fn create(ns: &NetNs, spec: &VxlanSpec) -> Result<()> {
    let p = &spec.params;
    let mut builder = LinkVxlan::new(&spec.name, p.vni)
        .port(p.port)
        .learning(p.learning)
        .mtu(spec.mtu);
    if let Some(dev) = p.underlay {
        builder = builder.dev(dev);
    }
    match p.local {
        Some(IpAddr::V4(v4)) => builder = builder.local(v4),
        Some(IpAddr::V6(v6)) => builder = builder.local6(v6),
        None => {}
    }
    if let Some(mac) = spec.mac {
        builder = builder.address(mac.to_vec());
    }
    ns.handle()
        .link()
        .add(builder.build())
        .execute()
        .await
        .map_err(|e| kernel(spec.describe(), e))
}

/// A link with, if it is a VXLAN device, its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The link.
    pub link: Link,
    /// The VXLAN parameters, when the link is of kind `vxlan`.
    pub vxlan: Option<VxlanParams>,
}

/// Looks a link up by name with its VXLAN parameters, like `ip -d link show dev NAME`.
/// `Ok(None)` if there is none.
pub async fn get(ns: &NetNs, name: &str) -> Result<Option<Device>> {
    let reply = link::get_message(ns, name, "ip -d link show").await?;
    Ok(reply.map(parse))
}

/// What the kernel assumes for attributes a dump leaves out.
const KERNEL_DEFAULTS: VxlanParams = VxlanParams {
    vni: 0,
    port: DEFAULT_PORT,
    local: None,
    underlay: None,
    learning: true,
};

fn parse(m: LinkMessage) -> Device {
    let mut params = KERNEL_DEFAULTS;
    let infos = m.attributes.iter().filter_map(|attr| match attr {
        LinkAttribute::LinkInfo(infos) => Some(infos),
        _ => None,
    });
    for info in infos.flatten() {
        let LinkInfo::Data(InfoData::Vxlan(data)) = info else {
            continue;
        };
        for d in data {
            match *d {
                InfoVxlan::Id(v) => params.vni = v,
                InfoVxlan::Port(v) => params.port = v,
                InfoVxlan::Local(v) => params.local = Some(IpAddr::V4(v)),
                InfoVxlan::Local6(v) => params.local = Some(IpAddr::V6(v)),
                InfoVxlan::Link(v) => params.underlay = Some(v),
                InfoVxlan::Learning(v) => params.learning = v,
                _ => {}
            }
        }
    }
    let link = Link::from_message(m);
    let vxlan = (link.kind.as_deref() == Some("vxlan")).then_some(params);
    Device { link, vxlan }
}

/// Checks a VNI: 24 bits.
pub fn valid_vni(vni: u32) -> std::result::Result<(), String> {
    if vni > MAX_VNI {
        return Err(format!("VNI {vni} does not fit in 24 bits (max {MAX_VNI})"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_reads_like_ip_link_add() {
        let spec = VxlanSpec {
            name: "cnikit.vxlan".into(),
            params: VxlanParams {
                vni: 1,
                port: 4789,
                local: Some("192.168.1.2".parse().unwrap()),
                underlay: Some(2),
                learning: false,
            },
            mtu: 1450,
            mac: Some([2, 0, 0, 0, 0, 1]),
        };
        assert_eq!(
            spec.describe(),
            "ip link add cnikit.vxlan address 02:00:00:00:00:01 mtu 1450 type vxlan id 1 \
             dstport 4789 local 192.168.1.2 dev #2 nolearning"
        );
    }

    #[test]
    fn vni_has_24_bits() {
        assert!(valid_vni(0).is_ok());
        assert!(valid_vni(MAX_VNI).is_ok());
        assert!(valid_vni(MAX_VNI + 1).is_err());
    }
}
