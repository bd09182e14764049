//! Forwarding database entries of a VXLAN device: which underlay address a remote MAC is
//! reached at.

use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::neighbour::{
    NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};

use super::{NetNs, errno, kernel, neigh};
use crate::error::Result;
use crate::spec::HwAddr;

/// One FDB entry of a VXLAN device: frames to `mac` go to the underlay address `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FdbEntry {
    /// The remote MAC address.
    pub mac: [u8; 6],
    /// The remote VTEP's underlay address.
    pub dst: IpAddr,
}

impl std::fmt::Display for FdbEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} dst {}", HwAddr::from(self.mac), self.dst)
    }
}

/// Adds or replaces an entry on the device with index `ifindex`, like
/// `bridge fdb replace MAC dev #IFINDEX dst IP self permanent`. Idempotent; an entry for
/// the same MAC with another destination is changed to this one.
pub async fn replace(ns: &NetNs, ifindex: u32, entry: &FdbEntry) -> Result<()> {
    let mut req = ns
        .handle()
        .neighbours()
        .add_bridge(ifindex, &entry.mac)
        .state(NeighbourState::Permanent)
        .flags(NeighbourFlags::Own)
        .replace();
    req.message_mut()
        .attributes
        .push(NeighbourAttribute::Destination(entry.dst.into()));
    req.execute().await.map_err(|e| {
        kernel(
            format!("bridge fdb replace {entry} dev #{ifindex} self permanent"),
            e,
        )
    })
}

/// Deletes an entry from the device with index `ifindex`, like
/// `bridge fdb del MAC dev #IFINDEX dst IP self`. Returns whether it existed.
pub async fn delete(ns: &NetNs, ifindex: u32, entry: &FdbEntry) -> Result<bool> {
    let mut message = NeighbourMessage::default();
    message.header.family = AddressFamily::Bridge;
    message.header.ifindex = ifindex;
    message.header.flags = NeighbourFlags::Own;
    message.header.state = NeighbourState::Permanent;
    message
        .attributes
        .push(NeighbourAttribute::LinkLayerAddress(entry.mac.to_vec()));
    message
        .attributes
        .push(NeighbourAttribute::Destination(entry.dst.into()));
    match ns.handle().neighbours().del(message).execute().await {
        Ok(()) => Ok(true),
        Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::ESRCH)) => Ok(false),
        Err(e) => Err(kernel(
            format!("bridge fdb del {entry} dev #{ifindex} self"),
            e,
        )),
    }
}

/// Lists the entries with a destination on the device with index `ifindex`, like
/// `bridge fdb show dev #IFINDEX`.
pub async fn list(ns: &NetNs, ifindex: u32) -> Result<Vec<FdbEntry>> {
    let messages: Vec<NeighbourMessage> = ns
        .handle()
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await
        .map_err(|e| kernel(format!("bridge fdb show dev #{ifindex}"), e))?;
    Ok(messages
        .iter()
        .filter(|m| m.header.ifindex == ifindex)
        .filter_map(|m| {
            let mut mac = None;
            let mut dst = None;
            for attr in &m.attributes {
                match attr {
                    NeighbourAttribute::LinkLayerAddress(a) => {
                        mac = <[u8; 6]>::try_from(a.as_slice()).ok();
                    }
                    NeighbourAttribute::Destination(a) => dst = neigh::ip_of(a),
                    _ => {}
                }
            }
            Some(FdbEntry {
                mac: mac?,
                dst: dst?,
            })
        })
        .collect())
}
