//! Routes, described with the CNI result's [`Route`] type.
//!
//! A route without a gateway gets scope `link` (as `ip route add` gives it) unless its
//! `scope` says otherwise; a route with one gets scope `universe`.

use std::fmt::Write as _;
use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteMetric,
    RouteProtocol, RouteScope,
};

use super::link::Link;
use super::{NetNs, errno, kernel};
use crate::error::{Error, Result};
use crate::spec::Route;

/// A route found in a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The route.
    pub route: Route,
    /// Output interface index, if the route has one.
    pub oif: Option<u32>,
}

/// Adds a route through `link`, like
/// `ip route add DST [via GW] dev DEV [scope S] [metric P] [table T] [mtu M] [advmss A]`.
/// Fails with `EEXIST` (code 101) if the same route is there already.
pub async fn add(ns: &NetNs, link: &Link, route: &Route) -> Result<()> {
    request(ns, link, route, false).await
}

/// Adds or replaces a route through `link`, like `ip route replace DST … dev DEV`.
/// Idempotent; takes over a route to the same destination through another device.
pub async fn replace(ns: &NetNs, link: &Link, route: &Route) -> Result<()> {
    request(ns, link, route, true).await
}

async fn request(ns: &NetNs, link: &Link, route: &Route, replace: bool) -> Result<()> {
    let verb = if replace { "replace" } else { "add" };
    let what = || format!("ip route {verb} {}", describe(route, &link.name));
    let message = build(route, link.index).map_err(|e| Error::kernel(what(), e))?;
    let req = ns.handle().route().add(message);
    let req = if replace { req.replace() } else { req };
    req.execute().await.map_err(|e| kernel(what(), e))
}

/// The `ip route` arguments of `route`, for messages.
fn describe(route: &Route, dev: &str) -> String {
    let mut s = route.dst.to_string();
    if let Some(gw) = route.gw {
        let _ = write!(s, " via {gw}");
    }
    let _ = write!(s, " dev {dev}");
    if let Some(scope) = route.scope {
        let _ = write!(s, " scope {scope}");
    }
    if let Some(p) = route.priority {
        let _ = write!(s, " metric {p}");
    }
    if let Some(t) = route.table {
        let _ = write!(s, " table {t}");
    }
    s
}

fn build(
    route: &Route,
    oif: u32,
) -> std::result::Result<RouteMessage, Box<dyn std::error::Error + Send + Sync>> {
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(route.dst.addr(), route.dst.prefix_len())?
        .output_interface(oif);
    if let Some(gw) = route.gw {
        b = b.gateway(gw)?;
    }
    let scope = match (route.scope, route.gw, route.dst) {
        (Some(s), _, _) => RouteScope::from(s),
        (None, None, IpNet::V4(_)) => RouteScope::Link,
        _ => RouteScope::Universe,
    };
    b = b.scope(scope);
    if let Some(p) = route.priority {
        b = b.priority(p);
    }
    if let Some(t) = route.table {
        b = b.table_id(t);
    }
    let mut metrics = Vec::new();
    if let Some(mtu) = route.mtu {
        metrics.push(RouteMetric::Mtu(mtu));
    }
    if let Some(advmss) = route.advmss {
        metrics.push(RouteMetric::Advmss(advmss));
    }
    if !metrics.is_empty() {
        b.get_mut()
            .attributes
            .push(RouteAttribute::Metrics(metrics));
    }
    Ok(b.build())
}

/// Lists the routes of one address family in every table, like
/// `ip [-6] route show table all`.
pub async fn list(ns: &NetNs, ipv6: bool) -> Result<Vec<Entry>> {
    let messages = dump(ns, ipv6)
        .await
        .map_err(|e| kernel(format!("ip {} route show table all", flag(ipv6)), e))?;
    Ok(messages.into_iter().filter_map(parse).collect())
}

/// Every route of one address family in every table, as the kernel's messages: the dump
/// behind `ip [-6] route show …`, whose filters the callers apply. The caller names the
/// command in its error.
pub(crate) async fn dump(
    ns: &NetNs,
    ipv6: bool,
) -> std::result::Result<Vec<RouteMessage>, rtnetlink::Error> {
    let family = if ipv6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let mut query = RouteMessage::default();
    query.header.address_family = family;
    let messages: Vec<RouteMessage> = ns
        .handle()
        .route()
        .get(query)
        .execute()
        .try_collect()
        .await?;
    // A kernel without IPv6 has no AF_INET6 dump and answers it as AF_UNSPEC, with the
    // routes of every family: keep the asked one only, or the IPv4 routes come twice.
    Ok(messages
        .into_iter()
        .filter(|m| m.header.address_family == family)
        .collect())
}

/// The `ip` flag of an address family.
fn flag(ipv6: bool) -> &'static str {
    if ipv6 { "-6" } else { "-4" }
}

fn table_of(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

/// The IP address of a route attribute (destination, gateway…).
pub(crate) fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn parse(m: RouteMessage) -> Option<Entry> {
    let unspecified = match m.header.address_family {
        AddressFamily::Inet => IpAddr::from([0u8; 4]),
        AddressFamily::Inet6 => IpAddr::from([0u16; 8]),
        _ => return None,
    };
    let mut dst = unspecified;
    let mut route = Route::new(IpNet::new(unspecified, 0).ok()?, None);
    let mut oif = None;
    for attr in &m.attributes {
        match attr {
            RouteAttribute::Destination(a) => dst = ip_of(a)?,
            RouteAttribute::Gateway(a) => route.gw = ip_of(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => route.priority = Some(*p),
            RouteAttribute::Metrics(ms) => {
                for metric in ms {
                    match metric {
                        RouteMetric::Mtu(v) => route.mtu = Some(*v),
                        RouteMetric::Advmss(v) => route.advmss = Some(*v),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    route.dst = IpNet::new(dst, m.header.destination_prefix_length).ok()?;
    route.scope = Some(u8::from(m.header.scope));
    route.table = Some(table_of(&m));
    Some(Entry { route, oif })
}

/// Asks the kernel which interface it would send a packet to `dst` through, like
/// `ip route get DST`. `Ok(None)` when `dst` is unreachable.
pub async fn lookup(ns: &NetNs, dst: IpAddr) -> Result<Option<u32>> {
    let what = || format!("ip route get {dst}");
    let prefix = if dst.is_ipv4() { 32 } else { 128 };
    let query = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst, prefix)
        .map_err(|e| Error::kernel(what(), e))?
        .build();
    match ns.handle().route().get(query).execute().try_next().await {
        Ok(Some(m)) => Ok(m.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        })),
        Ok(None) => Ok(None),
        Err(e)
            if matches!(
                errno(&e),
                Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ESRCH)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(kernel(what(), e)),
    }
}

/// A unicast route through a gateway in the main table, as the cross-node routing
/// backends write them: `DST via GW dev DEV [onlink]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GatewayRoute {
    /// Destination.
    pub dst: IpNet,
    /// Next hop.
    pub via: IpAddr,
    /// Output interface index.
    pub oif: u32,
    /// Whether the next hop is taken as on-link without a connected route to it.
    pub onlink: bool,
}

impl std::fmt::Display for GatewayRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} via {} dev #{}", self.dst, self.via, self.oif)?;
        if self.onlink {
            f.write_str(" onlink")?;
        }
        Ok(())
    }
}

impl GatewayRoute {
    fn message(
        &self,
        protocol: u8,
    ) -> std::result::Result<RouteMessage, Box<dyn std::error::Error + Send + Sync>> {
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(self.dst.addr(), self.dst.prefix_len())?
            .gateway(self.via)?
            .output_interface(self.oif)
            .protocol(RouteProtocol::from(protocol));
        if self.onlink {
            b = b.onlink();
        }
        Ok(b.build())
    }
}

/// Adds a gateway route marked with `protocol`, like
/// `ip route add DST via GW dev DEV [onlink] proto PROTOCOL` (or `ip route replace …` when
/// `replace`). Without `replace` it fails with `EEXIST` (code 101) when the main table has
/// a route to DST at metric 0 already, whoever made it.
pub async fn add_gateway(
    ns: &NetNs,
    route: &GatewayRoute,
    protocol: u8,
    replace: bool,
) -> Result<()> {
    let verb = if replace { "replace" } else { "add" };
    let what = || format!("ip route {verb} {route} proto {protocol}");
    let message = route
        .message(protocol)
        .map_err(|e| Error::kernel(what(), e))?;
    let req = ns.handle().route().add(message);
    let req = if replace { req.replace() } else { req };
    req.execute().await.map_err(|e| kernel(what(), e))
}

/// Deletes a gateway route marked with `protocol`, like
/// `ip route del DST via GW dev DEV proto PROTOCOL`: a route made by anyone else is never
/// matched. Returns whether it existed.
pub async fn delete_gateway(ns: &NetNs, route: &GatewayRoute, protocol: u8) -> Result<bool> {
    let what = || format!("ip route del {route} proto {protocol}");
    let message = route
        .message(protocol)
        .map_err(|e| Error::kernel(what(), e))?;
    match ns.handle().route().del(message).execute().await {
        Ok(()) => Ok(true),
        Err(e) if matches!(errno(&e), Some(libc::ESRCH | libc::ENOENT)) => Ok(false),
        Err(e) => Err(kernel(what(), e)),
    }
}

/// Lists the single-next-hop gateway routes of the main table marked with `protocol`, IPv4
/// and IPv6, like `ip route show table main proto PROTOCOL; ip -6 route show table main
/// proto PROTOCOL`.
pub async fn list_gateway(ns: &NetNs, protocol: u8) -> Result<Vec<GatewayRoute>> {
    let mut routes = Vec::new();
    for ipv6 in [false, true] {
        let messages = dump(ns, ipv6).await.map_err(|e| {
            kernel(
                format!("ip {} route show table main proto {protocol}", flag(ipv6)),
                e,
            )
        })?;
        routes.extend(
            messages
                .iter()
                .filter(|m| u8::from(m.header.protocol) == protocol && table_of(m) == MAIN_TABLE)
                .filter_map(parse_gateway),
        );
    }
    Ok(routes)
}

/// The main routing table's id (`RT_TABLE_MAIN`).
pub(crate) const MAIN_TABLE: u32 = RouteHeader::RT_TABLE_MAIN as u32;

fn parse_gateway(m: &RouteMessage) -> Option<GatewayRoute> {
    let mut dst = None;
    let mut via = None;
    let mut oif = None;
    for attr in &m.attributes {
        match attr {
            RouteAttribute::Destination(a) => dst = ip_of(a),
            RouteAttribute::Gateway(a) => via = ip_of(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let dst = match (dst, m.header.address_family) {
        (Some(d), _) => d,
        (None, AddressFamily::Inet) => IpAddr::from([0u8; 4]),
        (None, AddressFamily::Inet6) => IpAddr::from([0u16; 8]),
        _ => return None,
    };
    Some(GatewayRoute {
        dst: IpNet::new(dst, m.header.destination_prefix_length).ok()?,
        via: via?,
        oif: oif?,
        onlink: m.header.flags.contains(RouteFlags::Onlink),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_without_gateway_are_link_scoped_on_ipv4_only() {
        let link_route = Route::new("169.254.1.1/32".parse().unwrap(), None);
        let m = build(&link_route, 7).unwrap();
        assert_eq!(m.header.scope, RouteScope::Link);
        let via = Route::new(
            "0.0.0.0/0".parse().unwrap(),
            Some("169.254.1.1".parse().unwrap()),
        );
        assert_eq!(build(&via, 7).unwrap().header.scope, RouteScope::Universe);
        let v6 = Route::new("fd00::5/128".parse().unwrap(), None);
        assert_eq!(build(&v6, 7).unwrap().header.scope, RouteScope::Universe);
    }

    #[test]
    fn describe_reads_like_ip_route() {
        let mut r = Route::new(
            "10.1.0.0/16".parse().unwrap(),
            Some("10.0.0.1".parse().unwrap()),
        );
        r.priority = Some(100);
        assert_eq!(
            describe(&r, "eth0"),
            "10.1.0.0/16 via 10.0.0.1 dev eth0 metric 100"
        );
    }
}
