//! VXLAN devices: their parameters, the request that makes one and what a dump says.
//! [`link::add`](super::link::add) and [`link::device`](super::link::device) use them
//! for a [`LinkKind::Vxlan`](super::link::LinkKind::Vxlan).

use std::net::IpAddr;

use rtnetlink::packet_route::link::{InfoVxlan, LinkMessage};
use rtnetlink::{LinkMessageBuilder, LinkVxlan};

use super::link::LinkSpec;

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
    /// Whether the device is in `external` (collect_md) mode: no VNI and no remote of its
    /// own, the tunnel key (remote, VNI) of each packet set by an eBPF program and each
    /// received packet's key kept for one. `vni` is then 0.
    pub external: bool,
}

impl VxlanParams {
    /// The `type vxlan …` part of an `ip link add` command.
    pub fn describe(&self) -> String {
        let mut s = if self.external {
            format!("type vxlan external dstport {}", self.port)
        } else {
            format!("type vxlan id {} dstport {}", self.vni, self.port)
        };
        if let Some(local) = self.local {
            s.push_str(&format!(" local {local}"));
        }
        if let Some(dev) = self.underlay {
            s.push_str(&format!(" dev #{dev}"));
        }
        s.push_str(if self.learning {
            " learning"
        } else {
            " nolearning"
        });
        s
    }
}

/// The request that creates the VXLAN device of `spec`, like
/// `ip link add NAME [address MAC] mtu MTU type vxlan id VNI dstport PORT local IP dev DEV
/// nolearning` (`external` instead of `id VNI` for a collect_md device).
pub(super) fn message(spec: &LinkSpec, p: &VxlanParams) -> LinkMessage {
    let builder = if p.external {
        // The kernel refuses a VNI next to `external`.
        LinkMessageBuilder::<LinkVxlan>::new(&spec.name).collect_metadata(true)
    } else {
        LinkVxlan::new(&spec.name, p.vni)
    };
    let mut builder = builder.port(p.port).learning(p.learning).mtu(spec.mtu);
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
    builder.build()
}

/// What the kernel assumes for attributes a dump leaves out.
const KERNEL_DEFAULTS: VxlanParams = VxlanParams {
    vni: 0,
    port: DEFAULT_PORT,
    local: None,
    underlay: None,
    learning: true,
    external: false,
};

/// The parameters in a VXLAN device's `IFLA_INFO_DATA`.
pub(super) fn parse(data: &[InfoVxlan]) -> VxlanParams {
    let mut params = KERNEL_DEFAULTS;
    for d in data {
        match *d {
            InfoVxlan::Id(v) => params.vni = v,
            InfoVxlan::Port(v) => params.port = v,
            InfoVxlan::Local(v) => params.local = Some(IpAddr::V4(v)),
            InfoVxlan::Local6(v) => params.local = Some(IpAddr::V6(v)),
            InfoVxlan::Link(v) => params.underlay = Some(v),
            InfoVxlan::Learning(v) => params.learning = v,
            InfoVxlan::CollectMetadata(v) => params.external = v,
            _ => {}
        }
    }
    params
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
        let spec = LinkSpec {
            name: "cnikit.vxlan".into(),
            kind: super::super::link::LinkKind::Vxlan(VxlanParams {
                vni: 1,
                port: 4789,
                local: Some("192.168.1.2".parse().unwrap()),
                underlay: Some(2),
                learning: false,
                external: false,
            }),
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
    fn external_has_no_vni() {
        let p = VxlanParams {
            vni: 0,
            port: 4789,
            local: None,
            underlay: None,
            learning: false,
            external: true,
        };
        assert_eq!(p.describe(), "type vxlan external dstport 4789 nolearning");
    }

    #[test]
    fn vni_has_24_bits() {
        assert!(valid_vni(0).is_ok());
        assert!(valid_vni(MAX_VNI).is_ok());
        assert!(valid_vni(MAX_VNI + 1).is_err());
    }
}
