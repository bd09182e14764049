//! Blackhole routes for the node's own blocks.
//!
//! Like Calico, each block a node owns gets `blackhole BLOCK proto 108 metric 1024`: a packet
//! to an address of the block that no pod holds (yet, or any more) dies on this node instead
//! of following the default route out of it. More specific routes win over it: the /32 host
//! route of a routed pod, and the connected route of a bridge that holds the block's gateway
//! (metric 0 beats the blackhole's metric).

use std::net::IpAddr;

use ipnet::IpNet;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};

use crate::error::{Error, Result};
use crate::linux::{NetNs, errno, kernel, route};

/// Route protocol number (`rtm_protocol`) of the agent's blackhole routes: 108, next to the
/// routing backends' [`ROUTE_PROTOCOL`](crate::linux::kernel::ROUTE_PROTOCOL) (107) and
/// distinct from it, so a backend's reconcile never sees them as its own.
pub const BLACKHOLE_PROTOCOL: u8 = 108;

/// Metric of the blackhole routes: above the connected route of a bridge (0).
pub const BLACKHOLE_METRIC: u32 = 1024;

/// Makes the blackhole routes of `ns` exactly `blocks`: adds the missing ones, deletes the
/// ones of blocks the node no longer owns, touches nothing else. Returns the netlink writes
/// made. Like `ip route replace blackhole BLOCK proto 108 metric 1024` per block.
pub async fn sync(ns: &NetNs, blocks: &[IpNet]) -> Result<usize> {
    let current = list(ns).await?;
    let mut writes = 0;
    for block in blocks {
        if !current.contains(block) {
            replace(ns, *block).await?;
            writes += 1;
        }
    }
    for block in current.iter().filter(|b| !blocks.contains(b)) {
        delete(ns, *block).await?;
        writes += 1;
    }
    Ok(writes)
}

/// The blackhole routes the agent made, like `ip route show type blackhole proto 108`.
pub async fn list(ns: &NetNs) -> Result<Vec<IpNet>> {
    let mut found = Vec::new();
    for ipv6 in [false, true] {
        let messages = route::dump(ns, ipv6)
            .await
            .map_err(|e| kernel("ip route show type blackhole proto 108", e))?;
        found.extend(messages.iter().filter_map(parse));
    }
    Ok(found)
}

fn parse(m: &RouteMessage) -> Option<IpNet> {
    if m.header.kind != RouteType::BlackHole
        || u8::from(m.header.protocol) != BLACKHOLE_PROTOCOL
        || m.header.table != RouteHeader::RT_TABLE_MAIN
    {
        return None;
    }
    let dst = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(d) => route::ip_of(d),
        _ => None,
    })?;
    IpNet::new(dst, m.header.destination_prefix_length).ok()
}

fn message(block: IpNet) -> Result<RouteMessage> {
    let builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(block.addr(), block.prefix_len())
        .map_err(|e| Error::kernel(format!("blackhole route {block}"), e))?;
    Ok(builder
        .kind(RouteType::BlackHole)
        .protocol(RouteProtocol::Other(BLACKHOLE_PROTOCOL))
        .priority(BLACKHOLE_METRIC)
        .build())
}

/// Adds or replaces one blackhole route.
pub async fn replace(ns: &NetNs, block: IpNet) -> Result<()> {
    ns.handle()
        .route()
        .add(message(block)?)
        .replace()
        .execute()
        .await
        .map_err(|e| {
            kernel(
                format!("ip route replace blackhole {block} proto 108 metric 1024"),
                e,
            )
        })
}

/// Deletes one blackhole route; `Ok` if it is already gone.
pub async fn delete(ns: &NetNs, block: IpNet) -> Result<()> {
    match ns.handle().route().del(message(block)?).execute().await {
        Ok(()) => Ok(()),
        Err(e) if matches!(errno(&e), Some(libc::ESRCH | libc::ENOENT)) => Ok(()),
        Err(e) => Err(kernel(
            format!("ip route del blackhole {block} proto 108 metric 1024"),
            e,
        )),
    }
}
