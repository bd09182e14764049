//! Neighbour (ARP / NDP) entries.

use std::net::IpAddr;

use super::link::Link;
use super::{NetNs, kernel};
use crate::error::Result;

/// Sets a permanent neighbour entry, like
/// `ip neigh replace IP lladdr MAC dev DEV nud permanent`. Idempotent.
pub async fn replace_permanent(ns: &NetNs, link: &Link, ip: IpAddr, mac: [u8; 6]) -> Result<()> {
    // `add` builds a permanent entry; `replace` makes it idempotent.
    ns.handle()
        .neighbours()
        .add(link.index, ip)
        .link_layer_address(&mac)
        .replace()
        .execute()
        .await
        .map_err(|e| {
            kernel(
                format!(
                    "ip neigh replace {ip} lladdr {} dev {} nud permanent",
                    crate::spec::HwAddr::from(mac),
                    link.name
                ),
                e,
            )
        })
}
