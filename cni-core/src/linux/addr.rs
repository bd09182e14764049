//! Interface addresses.
//!
//! IPv6 addresses are added with `nodad`: cnikit's addresses are unique by construction
//! (the IPAM hands each out once), and duplicate address detection would only keep them
//! unusable for a second after ADD returns.

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};

use super::link::Link;
use super::{NetNs, kernel};
use crate::error::Result;

/// Adds an address, like `ip addr add ADDR/PLEN dev DEV [nodad]`.
/// Fails with `EEXIST` (code 101) if the link has it already.
pub async fn add(ns: &NetNs, link: &Link, addr: IpNet) -> Result<()> {
    request(ns, link, addr, false).await
}

/// Adds an address or refreshes it if present, like `ip addr replace ADDR/PLEN dev DEV
/// [nodad]`. Idempotent.
pub async fn replace(ns: &NetNs, link: &Link, addr: IpNet) -> Result<()> {
    request(ns, link, addr, true).await
}

async fn request(ns: &NetNs, link: &Link, addr: IpNet, replace: bool) -> Result<()> {
    let mut req = ns
        .handle()
        .address()
        .add(link.index, addr.addr(), addr.prefix_len());
    if addr.addr().is_ipv6() {
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    let req = if replace { req.replace() } else { req };
    req.execute().await.map_err(|e| {
        let verb = if replace { "replace" } else { "add" };
        kernel(format!("ip addr {verb} {addr} dev {}", link.name), e)
    })
}

/// Lists the addresses of one link, like `ip addr show dev DEV`.
pub async fn list(ns: &NetNs, link: &Link) -> Result<Vec<IpNet>> {
    let messages: Vec<_> = ns
        .handle()
        .address()
        .get()
        .set_link_index_filter(link.index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| kernel(format!("ip addr show dev {}", link.name), e))?;
    Ok(messages
        .into_iter()
        .filter_map(|m| {
            let prefix = m.header.prefix_len;
            // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's on
            // point-to-point links); IPv6 sends only IFA_ADDRESS.
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let address = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            IpNet::new(local.or(address)?, prefix).ok()
        })
        .collect())
}

/// Deletes an address from the link with index `ifindex`, like
/// `ip addr del ADDR/PLEN dev #IFINDEX`. Returns whether it was there.
pub async fn delete(ns: &NetNs, ifindex: u32, addr: IpNet) -> Result<bool> {
    let what = || format!("ip addr del {addr} dev #{ifindex}");
    let messages: Vec<_> = ns
        .handle()
        .address()
        .get()
        .set_link_index_filter(ifindex)
        .set_address_filter(addr.addr())
        .set_prefix_length_filter(addr.prefix_len())
        .execute()
        .try_collect()
        .await
        .map_err(|e| kernel(what(), e))?;
    let Some(message) = messages.into_iter().next() else {
        return Ok(false);
    };
    match ns.handle().address().del(message).execute().await {
        Ok(()) => Ok(true),
        Err(e) if matches!(super::errno(&e), Some(libc::EADDRNOTAVAIL | libc::ENOENT)) => Ok(false),
        Err(e) => Err(kernel(what(), e)),
    }
}

/// Lists the addresses of the link with index `ifindex`, like `ip addr show dev #IFINDEX`.
pub async fn list_on(ns: &NetNs, ifindex: u32) -> Result<Vec<IpNet>> {
    list(ns, &by_index(ifindex)).await
}

/// Adds an address to the link with index `ifindex`, like
/// `ip addr replace ADDR/PLEN dev #IFINDEX`. Idempotent.
pub async fn replace_on(ns: &NetNs, ifindex: u32, addr: IpNet) -> Result<()> {
    replace(ns, &by_index(ifindex), addr).await
}

/// The link with index `ifindex` as far as the requests need it, named `#IFINDEX` in
/// messages.
fn by_index(ifindex: u32) -> Link {
    Link {
        index: ifindex,
        name: format!("#{ifindex}"),
        mac: None,
        mtu: None,
        up: false,
        controller: None,
        peer_index: None,
        kind: None,
    }
}
