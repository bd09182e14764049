//! Kernel access for the cross-node routing backends, through small traits.
//!
//! A backend programs four kinds of objects: links ([`Links`]: the underlay device, a
//! tunnel device described by a [`LinkSpec`], its address), gateway routes ([`Routes`]), permanent neighbour entries
//! ([`Neighbours`]) and VXLAN forwarding entries ([`Fdb`]). [`Kernel`] is all four.
//! [`Netlink`] implements them over a [`NetNs`](super::NetNs) with rtnetlink;
//! [`Recording`] is an in-memory fake that records every write, for unit tests.
//! [`Underlay`] checks the node's underlay interface; [`ensure_device`] and
//! [`configure_device`] keep a backend's tunnel device as its [`LinkSpec`] says;
//! [`Desired`] turns a backend's wanted entries into the fewest writes.
//!
//! ## Which entries are whose
//! Reconciling must never touch what cnikit did not make. Routes carry a protocol number
//! (`rtm_protocol`, [`ROUTE_PROTOCOL`] by default) and are listed and deleted by it; other
//! routes, even to the same destination, are left alone (adding a route where one of
//! someone else's is already fails with `EEXIST` instead of replacing it). Neighbour and
//! FDB entries are owned through their device: only the permanent entries on a device the
//! backend made are listed as its own.

use std::net::IpAddr;

use async_trait::async_trait;
use ipnet::IpNet;

use crate::error::Result;

mod device;
mod fake;
mod netlink;
mod sync;
mod underlay;

pub use super::fdb::FdbEntry;
pub use super::ipip::IpipParams;
pub use super::link::{Device, LinkKind, LinkSpec};
pub use super::neigh::Neighbour;
pub use super::route::GatewayRoute;
pub use super::vxlan::VxlanParams;
pub use device::{configure_device, delete_device, ensure_device, remove_owned};
pub use fake::{Recording, Write};
pub use netlink::Netlink;
pub use sync::{Desired, Ownership};
pub use underlay::Underlay;

/// The route protocol number (`rtm_protocol`) cnikit's routes carry: 0x6b (107).
///
/// It is not in iproute2's `rt_protos` list (0–18, 42 babel, 99 openr, 186–192) nor among
/// the numbers other network plugins are known to use (Calico's 80), so `ip route show
/// proto 107` lists exactly cnikit's routes. To see a name, add `107 cnikit` to
/// `/etc/iproute2/rt_protos.d/cnikit.conf`.
pub const ROUTE_PROTOCOL: u8 = 0x6b;

/// Links: look up, create a device of a [`LinkKind`], set MTU and up, addresses, delete.
#[async_trait]
pub trait Links: Send + Sync {
    /// Looks a link up by name with the parameters of its kind, like
    /// `ip -d link show dev NAME`. `Ok(None)` if there is none.
    async fn device(&self, name: &str) -> Result<Option<Device>>;

    /// Lists every link with the parameters of its kind, like `ip -d link show`.
    async fn devices(&self) -> Result<Vec<Device>>;

    /// Creates the device of `spec` (down), like `ip link add NAME mtu MTU type KIND …`.
    /// Fails with `EEXIST` if the name is taken (for IPIP also when another IPIP device
    /// has the same `local` and `dev`, for VXLAN when another has the same VNI and port); with code 7 when [`LinkSpec::validate`] refuses
    /// the spec (a MAC for a kind without one). Not idempotent: callers look first.
    async fn add_link(&self, spec: &LinkSpec) -> Result<()>;

    /// Sets the MTU, like `ip link set dev DEV mtu MTU`.
    async fn set_mtu(&self, ifindex: u32, mtu: u32) -> Result<()>;

    /// Sets the link up, like `ip link set dev DEV up`.
    async fn set_up(&self, ifindex: u32) -> Result<()>;

    /// Deletes a link by name, like `ip link del dev NAME`; its routes, neighbour and FDB
    /// entries go with it. Returns whether it existed.
    async fn delete_link(&self, name: &str) -> Result<bool>;

    /// The addresses of a link, like `ip addr show dev DEV`.
    async fn addresses(&self, ifindex: u32) -> Result<Vec<IpNet>>;

    /// Adds an address, like `ip addr replace ADDR dev DEV`. Idempotent.
    async fn add_address(&self, ifindex: u32, addr: IpNet) -> Result<()>;

    /// Removes an address, like `ip addr del ADDR dev DEV`. Returns whether it was there.
    async fn delete_address(&self, ifindex: u32, addr: IpNet) -> Result<bool>;
}

/// Gateway routes in the main table that carry this handle's route protocol.
#[async_trait]
pub trait Routes: Send + Sync {
    /// Lists the routes that carry our protocol, IPv4 and IPv6, like
    /// `ip route show table main proto P`.
    async fn owned_routes(&self) -> Result<Vec<GatewayRoute>>;

    /// Adds a route with our protocol, like `ip route add … proto P`. Fails with `EEXIST`
    /// when a route to the destination exists, ours or not: nothing is replaced.
    async fn add_route(&self, route: &GatewayRoute) -> Result<()>;

    /// Replaces one of our routes, like `ip route replace … proto P`.
    async fn replace_route(&self, route: &GatewayRoute) -> Result<()>;

    /// Deletes one of our routes, like `ip route del … proto P`; never matches a route with
    /// another protocol. Returns whether it existed.
    async fn delete_route(&self, route: &GatewayRoute) -> Result<bool>;
}

/// Permanent neighbour entries of one device.
#[async_trait]
pub trait Neighbours: Send + Sync {
    /// Lists the permanent entries of a device, like `ip neigh show dev DEV nud permanent`.
    async fn permanent_neighbours(&self, ifindex: u32) -> Result<Vec<Neighbour>>;

    /// Sets a permanent entry, like `ip neigh replace IP lladdr MAC dev DEV nud permanent`.
    async fn replace_neighbour(&self, ifindex: u32, entry: &Neighbour) -> Result<()>;

    /// Deletes an entry, like `ip neigh del IP dev DEV`. Returns whether it existed.
    async fn delete_neighbour(&self, ifindex: u32, ip: IpAddr) -> Result<bool>;
}

/// Forwarding entries of a VXLAN device.
#[async_trait]
pub trait Fdb: Send + Sync {
    /// Lists the entries with a destination, like `bridge fdb show dev DEV`.
    async fn fdb_entries(&self, ifindex: u32) -> Result<Vec<FdbEntry>>;

    /// Sets an entry, like `bridge fdb replace MAC dev DEV dst IP self permanent`.
    async fn replace_fdb(&self, ifindex: u32, entry: &FdbEntry) -> Result<()>;

    /// Deletes an entry, like `bridge fdb del MAC dev DEV dst IP self`. Returns whether it
    /// existed.
    async fn delete_fdb(&self, ifindex: u32, entry: &FdbEntry) -> Result<bool>;
}

/// Everything a routing backend needs from the kernel.
pub trait Kernel: Links + Routes + Neighbours + Fdb {}

impl<T: Links + Routes + Neighbours + Fdb> Kernel for T {}
