//! IP-in-IP (IPIP) tunnel devices: their parameters, the request that makes one and what a
//! dump says. [`link::add`](super::link::add) and [`link::device`](super::link::device)
//! use them for a [`LinkKind::Ipip`](super::link::LinkKind::Ipip).
//!
//! An IPIP device without a `remote` address is a point-to-multipoint tunnel: the outer
//! destination of each packet is the gateway of the route that sent it there (`ip route
//! add BLOCK via PEER dev DEV onlink`), and it receives every IPIP packet addressed to its
//! `local` address. The kernel keys such devices by `local`, `remote` and `dev`: a second
//! device with the same three fails with `EEXIST`. So does one with none of them set, for
//! that is the key of `tunl0`, the fallback device the ipip module makes in every
//! namespace (whose parameters cannot be changed, and which `ip link del` leaves in place).

use std::net::{IpAddr, Ipv4Addr};

use rtnetlink::LinkIpIp;
use rtnetlink::packet_route::link::{InfoIpTunnel, LinkMessage};

use super::link::LinkSpec;

/// Bytes IPIP adds to each packet: the outer IPv4 header.
pub const OVERHEAD: u32 = 20;

/// The parameters of an IPIP device that decide where its packets go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpipParams {
    /// Source address of the outer packets, and the address it receives on (`local`).
    pub local: Option<Ipv4Addr>,
    /// Index of the underlay device the outer packets leave by (`dev`).
    pub underlay: Option<u32>,
    /// TTL of the outer packets, 0 to copy the inner packet's (`ttl`, `inherit`).
    pub ttl: u8,
    /// Path MTU discovery: the outer packets carry don't-fragment (`[no]pmtudisc`).
    pub pmtudisc: bool,
}

impl IpipParams {
    /// The `type ipip …` part of an `ip link add` command.
    pub fn describe(&self) -> String {
        let mut s = "type ipip".to_owned();
        if let Some(local) = self.local {
            s.push_str(&format!(" local {local}"));
        }
        if let Some(dev) = self.underlay {
            s.push_str(&format!(" dev #{dev}"));
        }
        match self.ttl {
            0 => s.push_str(" ttl inherit"),
            ttl => s.push_str(&format!(" ttl {ttl}")),
        }
        s.push_str(if self.pmtudisc {
            " pmtudisc"
        } else {
            " nopmtudisc"
        });
        s
    }
}

/// The request that creates the IPIP device of `spec`, like
/// `ip link add NAME mtu MTU type ipip local IP dev DEV ttl TTL [no]pmtudisc`.
pub(super) fn message(spec: &LinkSpec, p: &IpipParams) -> LinkMessage {
    let mut builder = LinkIpIp::new(&spec.name)
        .mtu(spec.mtu)
        .ttl(p.ttl)
        .pmtudisc(p.pmtudisc);
    if let Some(local) = p.local {
        builder = builder.local(local);
    }
    if let Some(dev) = p.underlay {
        builder = builder.dev(dev);
    }
    // No `spec.mac`: `LinkSpec::validate` refuses one for IPIP.
    builder.build()
}

/// What the kernel assumes for attributes a dump leaves out (those of `tunl0`).
const KERNEL_DEFAULTS: IpipParams = IpipParams {
    local: None,
    underlay: None,
    ttl: 0,
    pmtudisc: false,
};

/// The parameters in an IPIP device's `IFLA_INFO_DATA`. The unset address (`0.0.0.0`,
/// "any") and device index 0 read as `None`.
pub(super) fn parse(data: &[InfoIpTunnel]) -> IpipParams {
    let mut params = KERNEL_DEFAULTS;
    for d in data {
        match *d {
            InfoIpTunnel::Local(IpAddr::V4(v)) => {
                params.local = (!v.is_unspecified()).then_some(v);
            }
            InfoIpTunnel::Link(v) => params.underlay = (v != 0).then_some(v),
            InfoIpTunnel::Ttl(v) => params.ttl = v,
            InfoIpTunnel::PMtuDisc(v) => params.pmtudisc = v,
            _ => {}
        }
    }
    params
}

#[cfg(test)]
mod tests {
    use super::super::link::LinkKind;
    use super::*;

    #[test]
    fn describe_reads_like_ip_link_add() {
        let spec = LinkSpec {
            name: "cnikit.ipip".into(),
            mtu: 1480,
            mac: None,
            kind: LinkKind::Ipip(IpipParams {
                local: Some(Ipv4Addr::new(192, 168, 1, 2)),
                underlay: Some(2),
                ttl: 0,
                pmtudisc: true,
            }),
        };
        assert_eq!(
            spec.describe(),
            "ip link add cnikit.ipip mtu 1480 type ipip local 192.168.1.2 dev #2 ttl inherit \
             pmtudisc"
        );
        spec.validate().unwrap();
        let with_mac = LinkSpec {
            mac: Some([2, 0, 0, 0, 0, 1]),
            ..spec
        };
        assert_eq!(with_mac.validate().unwrap_err().code().0, 7);
    }

    #[test]
    fn a_dump_reads_back_and_any_is_none() {
        let params = parse(&[
            InfoIpTunnel::Link(0),
            InfoIpTunnel::Local(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            InfoIpTunnel::Remote(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            InfoIpTunnel::Ttl(64),
            InfoIpTunnel::PMtuDisc(true),
        ]);
        assert_eq!(
            params,
            IpipParams {
                local: None,
                underlay: None,
                ttl: 64,
                pmtudisc: true
            }
        );
        let params = parse(&[
            InfoIpTunnel::Link(3),
            InfoIpTunnel::Local(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
        ]);
        assert_eq!(params.local, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(params.underlay, Some(3));
    }
}
