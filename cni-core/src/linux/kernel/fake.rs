//! An in-memory kernel that records every write, for unit tests of routing backends.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use ipnet::IpNet;

use super::{
    Device, Fdb, FdbEntry, GatewayRoute, LinkKind, LinkSpec, Links, Neighbour, Neighbours, Routes,
};
use crate::error::{Error, Result};
use crate::linux::link::Link;
use crate::spec::HwAddr;

/// One write request made to a [`Recording`] kernel (failed ones included).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Write {
    /// [`Links::add_link`].
    AddLink(LinkSpec),
    /// [`Links::set_mtu`].
    SetMtu {
        /// Link index.
        ifindex: u32,
        /// New MTU.
        mtu: u32,
    },
    /// [`Links::set_up`].
    SetUp {
        /// Link index.
        ifindex: u32,
    },
    /// [`Links::delete_link`].
    DeleteLink {
        /// Link name.
        name: String,
    },
    /// [`Links::add_address`].
    AddAddress {
        /// Link index.
        ifindex: u32,
        /// Address.
        addr: IpNet,
    },
    /// [`Links::delete_address`].
    DeleteAddress {
        /// Link index.
        ifindex: u32,
        /// Address.
        addr: IpNet,
    },
    /// [`Routes::add_route`].
    AddRoute(GatewayRoute),
    /// [`Routes::replace_route`].
    ReplaceRoute(GatewayRoute),
    /// [`Routes::delete_route`].
    DeleteRoute(GatewayRoute),
    /// [`Neighbours::replace_neighbour`].
    ReplaceNeighbour {
        /// Link index.
        ifindex: u32,
        /// The entry.
        entry: Neighbour,
    },
    /// [`Neighbours::delete_neighbour`].
    DeleteNeighbour {
        /// Link index.
        ifindex: u32,
        /// Its address.
        ip: IpAddr,
    },
    /// [`Fdb::replace_fdb`].
    ReplaceFdb {
        /// Link index.
        ifindex: u32,
        /// The entry.
        entry: FdbEntry,
    },
    /// [`Fdb::delete_fdb`].
    DeleteFdb {
        /// Link index.
        ifindex: u32,
        /// The entry.
        entry: FdbEntry,
    },
}

type FailPredicate = Box<dyn Fn(&Write) -> bool + Send + Sync>;

#[derive(Default)]
struct State {
    next_index: u32,
    links: BTreeMap<String, Device>,
    addresses: BTreeMap<u32, Vec<IpNet>>,
    /// By destination: the route and whether it carries our protocol.
    routes: BTreeMap<IpNet, (GatewayRoute, bool)>,
    neighbours: BTreeMap<(u32, IpAddr), [u8; 6]>,
    fdb: BTreeMap<(u32, [u8; 6]), IpAddr>,
    writes: Vec<Write>,
    fail: Option<FailPredicate>,
}

impl State {
    fn index_exists(&self, ifindex: u32) -> bool {
        self.links.values().any(|d| d.link.index == ifindex)
    }

    fn device_by_index(&self, ifindex: u32) -> Option<&Device> {
        self.links.values().find(|d| d.link.index == ifindex)
    }

    fn link_mut(&mut self, ifindex: u32) -> Option<&mut Link> {
        self.links
            .values_mut()
            .map(|d| &mut d.link)
            .find(|l| l.index == ifindex)
    }

    /// Records `write` and says whether the test asked it to fail.
    fn record(&mut self, write: Write) -> Result<()> {
        let fail = self.fail.as_ref().is_some_and(|f| f(&write));
        let what = format!("{write:?}");
        self.writes.push(write);
        if fail {
            return Err(os_error(what, libc::EIO));
        }
        Ok(())
    }

    fn check_route(&self, what: &str, r: &GatewayRoute) -> Result<()> {
        if r.dst != r.dst.trunc() || r.dst.addr().is_ipv4() != r.via.is_ipv4() {
            return Err(os_error(what, libc::EINVAL));
        }
        if !self.index_exists(r.oif) {
            return Err(os_error(what, libc::ENODEV));
        }
        let connected = self
            .addresses
            .get(&r.oif)
            .is_some_and(|addrs| addrs.iter().any(|a| a.trunc().contains(&r.via)));
        if !r.onlink && !connected {
            return Err(os_error(what, libc::ENETUNREACH));
        }
        Ok(())
    }
}

fn os_error(what: impl Into<String>, errno: i32) -> Error {
    Error::kernel(what, std::io::Error::from_raw_os_error(errno))
}

/// An in-memory kernel for unit tests: links, addresses, routes, neighbour and FDB entries
/// in maps, every write request recorded in order ([`Recording::writes`]).
///
/// It checks what the real kernel checks where a backend could get it wrong: a route's
/// device must exist, its gateway must be in a subnet of the device's addresses unless the
/// route is on-link, adding a route where one exists fails with `EEXIST`, deleting
/// matches only routes with our protocol, deleting a link removes its addresses, routes,
/// neighbour and FDB entries. Clones share the same state, so a test keeps one to look
/// inside while the backend owns another.
#[derive(Clone, Default)]
pub struct Recording {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Recording {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("Recording")
            .field("links", &s.links.keys().collect::<Vec<_>>())
            .field("routes", &s.routes.len())
            .field("neighbours", &s.neighbours.len())
            .field("fdb", &s.fdb.len())
            .field("writes", &s.writes.len())
            .finish()
    }
}

impl Recording {
    /// An empty kernel with `lo` (index 1).
    pub fn new() -> Self {
        let k = Recording::default();
        k.add_plain_link("lo", 65536, &[]);
        k
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a failed test already; keep the state readable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a plain, up device with addresses (an underlay interface) and returns its
    /// index. Not recorded as a write.
    pub fn add_plain_link(&self, name: &str, mtu: u32, addresses: &[IpNet]) -> u32 {
        let mut s = self.lock();
        s.next_index += 1;
        let index = s.next_index;
        let mac = [0x02, 0, 0, 0, (index >> 8) as u8, index as u8];
        s.links.insert(
            name.to_owned(),
            Device {
                link: Link {
                    index,
                    name: name.to_owned(),
                    mac: Some(HwAddr::from(mac)),
                    mtu: Some(mtu),
                    up: true,
                    controller: None,
                    peer_index: None,
                    kind: None,
                },
                kind: None,
            },
        );
        s.addresses.insert(index, addresses.to_vec());
        index
    }

    /// Puts a route that is not ours in the main table (as an administrator or another
    /// program would). Not recorded as a write.
    pub fn add_foreign_route(&self, route: GatewayRoute) {
        self.lock().routes.insert(route.dst, (route, false));
    }

    /// Makes every later write for which `fail` returns true fail with `EIO` (it is still
    /// recorded).
    pub fn fail_writes(&self, fail: impl Fn(&Write) -> bool + Send + Sync + 'static) {
        self.lock().fail = Some(Box::new(fail));
    }

    /// Lets every write succeed again.
    pub fn heal(&self) {
        self.lock().fail = None;
    }

    /// The writes so far, in order.
    pub fn writes(&self) -> Vec<Write> {
        self.lock().writes.clone()
    }

    /// The writes so far, forgetting them.
    pub fn take_writes(&self) -> Vec<Write> {
        std::mem::take(&mut self.lock().writes)
    }

    /// Our routes, sorted by destination.
    pub fn routes(&self) -> Vec<GatewayRoute> {
        self.lock()
            .routes
            .values()
            .filter(|(_, ours)| *ours)
            .map(|(r, _)| *r)
            .collect()
    }

    /// Routes that are not ours, sorted by destination.
    pub fn foreign_routes(&self) -> Vec<GatewayRoute> {
        self.lock()
            .routes
            .values()
            .filter(|(_, ours)| !*ours)
            .map(|(r, _)| *r)
            .collect()
    }

    /// The neighbour entries of a device, sorted by address.
    pub fn neighbours(&self, ifindex: u32) -> Vec<Neighbour> {
        self.lock()
            .neighbours
            .iter()
            .filter(|((i, _), _)| *i == ifindex)
            .map(|((_, ip), mac)| Neighbour { ip: *ip, mac: *mac })
            .collect()
    }

    /// The FDB entries of a device, sorted by MAC.
    pub fn fdb(&self, ifindex: u32) -> Vec<FdbEntry> {
        self.lock()
            .fdb
            .iter()
            .filter(|((i, _), _)| *i == ifindex)
            .map(|((_, mac), dst)| FdbEntry {
                mac: *mac,
                dst: *dst,
            })
            .collect()
    }

    /// A device by name.
    pub fn link(&self, name: &str) -> Option<Device> {
        self.lock().links.get(name).cloned()
    }

    /// The addresses of a device.
    pub fn link_addresses(&self, ifindex: u32) -> Vec<IpNet> {
        self.lock()
            .addresses
            .get(&ifindex)
            .cloned()
            .unwrap_or_default()
    }
}

#[async_trait]
impl Links for Recording {
    async fn device(&self, name: &str) -> Result<Option<Device>> {
        Ok(self.link(name))
    }

    async fn devices(&self) -> Result<Vec<Device>> {
        Ok(self.lock().links.values().cloned().collect())
    }

    async fn add_link(&self, spec: &LinkSpec) -> Result<()> {
        let mut s = self.lock();
        s.record(Write::AddLink(spec.clone()))?;
        spec.validate()?;
        let what = spec.describe();
        if s.links.contains_key(&spec.name) {
            return Err(os_error(what, libc::EEXIST));
        }
        let underlay = match spec.kind {
            LinkKind::Vxlan(p) => p.underlay,
            LinkKind::Ipip(p) => p.underlay,
        };
        if let Some(u) = underlay
            && !s.index_exists(u)
        {
            return Err(os_error(what, libc::ENODEV));
        }
        s.next_index += 1;
        let index = s.next_index;
        let mac = match spec.kind {
            LinkKind::Vxlan(p) => {
                // The kernel keys VXLAN devices by VNI and UDP port.
                let key = |q: &crate::linux::vxlan::VxlanParams| (q.vni, q.port);
                if s.links
                    .values()
                    .any(|d| d.vxlan().map(key) == Some(key(&p)))
                {
                    return Err(os_error(what, libc::EEXIST));
                }
                spec.mac
                    .unwrap_or([0x02, 0xff, 0, 0, (index >> 8) as u8, index as u8])
                    .to_vec()
            }
            LinkKind::Ipip(p) => {
                // The kernel keys IPIP devices by local address and device.
                let key = |q: &crate::linux::ipip::IpipParams| (q.local, q.underlay);
                if s.links.values().any(|d| d.ipip().map(key) == Some(key(&p))) {
                    return Err(os_error(what, libc::EEXIST));
                }
                p.local
                    .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED)
                    .octets()
                    .to_vec()
            }
        };
        s.links.insert(
            spec.name.clone(),
            Device {
                link: Link {
                    index,
                    name: spec.name.clone(),
                    mac: Some(HwAddr::new(mac)),
                    mtu: Some(spec.mtu),
                    up: false,
                    controller: None,
                    peer_index: None,
                    kind: Some(spec.kind.name().into()),
                },
                kind: Some(spec.kind),
            },
        );
        s.addresses.insert(index, Vec::new());
        Ok(())
    }

    async fn set_mtu(&self, ifindex: u32, mtu: u32) -> Result<()> {
        let mut s = self.lock();
        s.record(Write::SetMtu { ifindex, mtu })?;
        let link = s
            .link_mut(ifindex)
            .ok_or_else(|| os_error("set mtu", libc::ENODEV))?;
        link.mtu = Some(mtu);
        Ok(())
    }

    async fn set_up(&self, ifindex: u32) -> Result<()> {
        let mut s = self.lock();
        s.record(Write::SetUp { ifindex })?;
        let link = s
            .link_mut(ifindex)
            .ok_or_else(|| os_error("set up", libc::ENODEV))?;
        link.up = true;
        Ok(())
    }

    async fn delete_link(&self, name: &str) -> Result<bool> {
        let mut s = self.lock();
        s.record(Write::DeleteLink {
            name: name.to_owned(),
        })?;
        let Some(device) = s.links.remove(name) else {
            return Ok(false);
        };
        let index = device.link.index;
        s.addresses.remove(&index);
        s.routes.retain(|_, (r, _)| r.oif != index);
        s.neighbours.retain(|(i, _), _| *i != index);
        s.fdb.retain(|(i, _), _| *i != index);
        Ok(true)
    }

    async fn addresses(&self, ifindex: u32) -> Result<Vec<IpNet>> {
        let s = self.lock();
        if !s.index_exists(ifindex) {
            return Err(os_error("ip addr show", libc::ENODEV));
        }
        Ok(s.addresses.get(&ifindex).cloned().unwrap_or_default())
    }

    async fn add_address(&self, ifindex: u32, addr: IpNet) -> Result<()> {
        let mut s = self.lock();
        s.record(Write::AddAddress { ifindex, addr })?;
        if !s.index_exists(ifindex) {
            return Err(os_error("ip addr replace", libc::ENODEV));
        }
        let addrs = s.addresses.entry(ifindex).or_default();
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
        Ok(())
    }

    async fn delete_address(&self, ifindex: u32, addr: IpNet) -> Result<bool> {
        let mut s = self.lock();
        s.record(Write::DeleteAddress { ifindex, addr })?;
        let addrs = s.addresses.entry(ifindex).or_default();
        let before = addrs.len();
        addrs.retain(|a| *a != addr);
        Ok(addrs.len() != before)
    }
}

#[async_trait]
impl Routes for Recording {
    async fn owned_routes(&self) -> Result<Vec<GatewayRoute>> {
        Ok(self.routes())
    }

    async fn add_route(&self, r: &GatewayRoute) -> Result<()> {
        let mut s = self.lock();
        s.record(Write::AddRoute(*r))?;
        let what = format!("ip route add {r}");
        s.check_route(&what, r)?;
        if s.routes.contains_key(&r.dst) {
            return Err(os_error(what, libc::EEXIST));
        }
        s.routes.insert(r.dst, (*r, true));
        Ok(())
    }

    async fn replace_route(&self, r: &GatewayRoute) -> Result<()> {
        let mut s = self.lock();
        s.record(Write::ReplaceRoute(*r))?;
        s.check_route(&format!("ip route replace {r}"), r)?;
        s.routes.insert(r.dst, (*r, true));
        Ok(())
    }

    async fn delete_route(&self, r: &GatewayRoute) -> Result<bool> {
        let mut s = self.lock();
        s.record(Write::DeleteRoute(*r))?;
        let matches = s
            .routes
            .get(&r.dst)
            .is_some_and(|(have, ours)| *ours && have.via == r.via && have.oif == r.oif);
        if matches {
            s.routes.remove(&r.dst);
        }
        Ok(matches)
    }
}

#[async_trait]
impl Neighbours for Recording {
    async fn permanent_neighbours(&self, ifindex: u32) -> Result<Vec<Neighbour>> {
        Ok(self.neighbours(ifindex))
    }

    async fn replace_neighbour(&self, ifindex: u32, entry: &Neighbour) -> Result<()> {
        let mut s = self.lock();
        s.record(Write::ReplaceNeighbour {
            ifindex,
            entry: *entry,
        })?;
        if !s.index_exists(ifindex) {
            return Err(os_error("ip neigh replace", libc::ENODEV));
        }
        s.neighbours.insert((ifindex, entry.ip), entry.mac);
        Ok(())
    }

    async fn delete_neighbour(&self, ifindex: u32, ip: IpAddr) -> Result<bool> {
        let mut s = self.lock();
        s.record(Write::DeleteNeighbour { ifindex, ip })?;
        Ok(s.neighbours.remove(&(ifindex, ip)).is_some())
    }
}

#[async_trait]
impl Fdb for Recording {
    async fn fdb_entries(&self, ifindex: u32) -> Result<Vec<FdbEntry>> {
        Ok(self.fdb(ifindex))
    }

    async fn replace_fdb(&self, ifindex: u32, entry: &FdbEntry) -> Result<()> {
        let mut s = self.lock();
        s.record(Write::ReplaceFdb {
            ifindex,
            entry: *entry,
        })?;
        match s.device_by_index(ifindex) {
            None => return Err(os_error("bridge fdb replace", libc::ENODEV)),
            Some(d) if d.vxlan().is_none() => {
                return Err(os_error("bridge fdb replace", libc::EOPNOTSUPP));
            }
            Some(_) => {}
        }
        s.fdb.insert((ifindex, entry.mac), entry.dst);
        Ok(())
    }

    async fn delete_fdb(&self, ifindex: u32, entry: &FdbEntry) -> Result<bool> {
        let mut s = self.lock();
        s.record(Write::DeleteFdb {
            ifindex,
            entry: *entry,
        })?;
        if s.fdb.get(&(ifindex, entry.mac)) == Some(&entry.dst) {
            s.fdb.remove(&(ifindex, entry.mac));
            return Ok(true);
        }
        Ok(false)
    }
}
