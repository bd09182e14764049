//! The rtnetlink implementation of the kernel traits.

use std::net::IpAddr;

use async_trait::async_trait;
use ipnet::IpNet;

use super::{
    Device, Fdb, FdbEntry, GatewayRoute, LinkSpec, Links, Neighbour, Neighbours, ROUTE_PROTOCOL,
    Routes,
};
use crate::error::Result;
use crate::linux::{NetNs, addr, fdb, link, neigh, route};

/// The kernel of one network namespace, through its netlink connection.
#[derive(Debug)]
pub struct Netlink {
    ns: NetNs,
    protocol: u8,
}

impl Netlink {
    /// Acts in `ns`, owning routes by [`ROUTE_PROTOCOL`].
    pub fn new(ns: NetNs) -> Self {
        Self::with_protocol(ns, ROUTE_PROTOCOL)
    }

    /// Acts in `ns`, owning routes by `protocol`.
    pub fn with_protocol(ns: NetNs, protocol: u8) -> Self {
        Netlink { ns, protocol }
    }

    /// The namespace.
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// The route protocol number of the routes this handle owns.
    pub fn protocol(&self) -> u8 {
        self.protocol
    }
}

#[async_trait]
impl Links for Netlink {
    async fn device(&self, name: &str) -> Result<Option<Device>> {
        link::device(&self.ns, name).await
    }

    async fn devices(&self) -> Result<Vec<Device>> {
        link::devices(&self.ns).await
    }

    async fn add_link(&self, spec: &LinkSpec) -> Result<()> {
        link::add(&self.ns, spec).await
    }

    async fn set_mtu(&self, ifindex: u32, mtu: u32) -> Result<()> {
        link::set_mtu_by_index(&self.ns, ifindex, mtu).await
    }

    async fn set_up(&self, ifindex: u32) -> Result<()> {
        link::set_up_by_index(&self.ns, ifindex).await
    }

    async fn delete_link(&self, name: &str) -> Result<bool> {
        link::delete(&self.ns, name).await
    }

    async fn addresses(&self, ifindex: u32) -> Result<Vec<IpNet>> {
        addr::list_on(&self.ns, ifindex).await
    }

    async fn add_address(&self, ifindex: u32, address: IpNet) -> Result<()> {
        addr::replace_on(&self.ns, ifindex, address).await
    }

    async fn delete_address(&self, ifindex: u32, address: IpNet) -> Result<bool> {
        addr::delete(&self.ns, ifindex, address).await
    }
}

#[async_trait]
impl Routes for Netlink {
    async fn owned_routes(&self) -> Result<Vec<GatewayRoute>> {
        route::list_gateway(&self.ns, self.protocol).await
    }

    async fn add_route(&self, r: &GatewayRoute) -> Result<()> {
        route::add_gateway(&self.ns, r, self.protocol, false).await
    }

    async fn replace_route(&self, r: &GatewayRoute) -> Result<()> {
        route::add_gateway(&self.ns, r, self.protocol, true).await
    }

    async fn delete_route(&self, r: &GatewayRoute) -> Result<bool> {
        route::delete_gateway(&self.ns, r, self.protocol).await
    }
}

#[async_trait]
impl Neighbours for Netlink {
    async fn permanent_neighbours(&self, ifindex: u32) -> Result<Vec<Neighbour>> {
        neigh::list_permanent(&self.ns, ifindex).await
    }

    async fn replace_neighbour(&self, ifindex: u32, entry: &Neighbour) -> Result<()> {
        neigh::replace_permanent_on(&self.ns, ifindex, entry).await
    }

    async fn delete_neighbour(&self, ifindex: u32, ip: IpAddr) -> Result<bool> {
        neigh::delete(&self.ns, ifindex, ip).await
    }
}

#[async_trait]
impl Fdb for Netlink {
    async fn fdb_entries(&self, ifindex: u32) -> Result<Vec<FdbEntry>> {
        fdb::list(&self.ns, ifindex).await
    }

    async fn replace_fdb(&self, ifindex: u32, entry: &FdbEntry) -> Result<()> {
        fdb::replace(&self.ns, ifindex, entry).await
    }

    async fn delete_fdb(&self, ifindex: u32, entry: &FdbEntry) -> Result<bool> {
        fdb::delete(&self.ns, ifindex, entry).await
    }
}
