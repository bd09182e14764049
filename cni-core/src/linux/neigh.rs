//! Neighbour (ARP / NDP) entries.

use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};

use super::link::Link;
use super::{NetNs, errno, kernel};
use crate::error::Result;
use crate::spec::HwAddr;

/// Sets a permanent neighbour entry, like
/// `ip neigh replace IP lladdr MAC dev DEV nud permanent`. Idempotent.
pub async fn replace_permanent(ns: &NetNs, link: &Link, ip: IpAddr, mac: [u8; 6]) -> Result<()> {
    replace(ns, link.index, &link.name, ip, mac).await
}

/// [`replace_permanent`] on the link with index `ifindex`, named `dev` in errors.
async fn replace(ns: &NetNs, ifindex: u32, dev: &str, ip: IpAddr, mac: [u8; 6]) -> Result<()> {
    // `add` builds a permanent entry; `replace` makes it idempotent.
    ns.handle()
        .neighbours()
        .add(ifindex, ip)
        .link_layer_address(&mac)
        .replace()
        .execute()
        .await
        .map_err(|e| {
            kernel(
                format!(
                    "ip neigh replace {ip} lladdr {} dev {dev} nud permanent",
                    HwAddr::from(mac),
                ),
                e,
            )
        })
}

/// A neighbour entry: an IP address and the hardware address it resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Neighbour {
    /// Protocol address.
    pub ip: IpAddr,
    /// Hardware address.
    pub mac: [u8; 6],
}

/// Sets a permanent neighbour entry on the link with index `ifindex`, like
/// `ip neigh replace IP lladdr MAC dev #IFINDEX nud permanent`. Idempotent.
pub async fn replace_permanent_on(ns: &NetNs, ifindex: u32, entry: &Neighbour) -> Result<()> {
    let dev = format!("#{ifindex}");
    replace(ns, ifindex, &dev, entry.ip, entry.mac).await
}

/// Deletes the neighbour entry of `ip` on the link with index `ifindex`, like
/// `ip neigh del IP dev #IFINDEX`. Returns whether it existed.
pub async fn delete(ns: &NetNs, ifindex: u32, ip: IpAddr) -> Result<bool> {
    let mut message = NeighbourMessage::default();
    message.header.family = AddressFamily::from(ip);
    message.header.ifindex = ifindex;
    message
        .attributes
        .push(NeighbourAttribute::Destination(ip.into()));
    match ns.handle().neighbours().del(message).execute().await {
        Ok(()) => Ok(true),
        Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::ESRCH)) => Ok(false),
        Err(e) => Err(kernel(format!("ip neigh del {ip} dev #{ifindex}"), e)),
    }
}

/// Lists the permanent IPv4 and IPv6 neighbour entries with a 6-byte hardware address on
/// the link with index `ifindex`, like `ip neigh show dev #IFINDEX nud permanent`.
pub async fn list_permanent(ns: &NetNs, ifindex: u32) -> Result<Vec<Neighbour>> {
    let mut entries = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let messages: Vec<NeighbourMessage> = ns
            .handle()
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(|e| kernel(format!("ip neigh show dev #{ifindex} nud permanent"), e))?;
        entries.extend(
            messages
                .iter()
                .filter(|m| {
                    m.header.ifindex == ifindex && m.header.state == NeighbourState::Permanent
                })
                .filter_map(|m| {
                    let mut ip = None;
                    let mut mac = None;
                    for attr in &m.attributes {
                        match attr {
                            NeighbourAttribute::Destination(a) => ip = ip_of(a),
                            NeighbourAttribute::LinkLayerAddress(a) => {
                                mac = <[u8; 6]>::try_from(a.as_slice()).ok();
                            }
                            _ => {}
                        }
                    }
                    Some(Neighbour { ip: ip?, mac: mac? })
                }),
        );
    }
    Ok(entries)
}

/// The IP address of an `NDA_DST`. Bridge-family (FDB) messages carry it as raw bytes: the
/// decoder only knows the address family of the message, not of the attribute.
pub(super) fn ip_of(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        NeighbourAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        NeighbourAddress::Other(bytes) => match bytes.len() {
            4 => <[u8; 4]>::try_from(bytes.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(bytes.as_slice())
                .ok()
                .map(IpAddr::from),
            _ => None,
        },
        _ => None,
    }
}
