//! Reconciling: the entries a backend wants, diffed against what it owns in the kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;

use futures::StreamExt;
use ipnet::IpNet;

use super::{FdbEntry, GatewayRoute, Kernel, Neighbour};
use crate::error::{Error, Result};
use crate::registry::NodeRecord;
use crate::routing::{Programmed, ReconcileReport};

/// How many netlink requests are in flight at once: enough to hide the round trips,
/// few enough to stay far from the socket's receive buffer.
const IN_FLIGHT: usize = 32;

/// What a backend owns besides its routes (which it owns by protocol): the permanent
/// neighbour and FDB entries of these devices. Stale entries are deleted only there;
/// wanted entries on other devices are written, and never anything else there deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ownership {
    /// Devices whose permanent neighbour entries are the backend's.
    pub neighbour_devices: Vec<u32>,
    /// Devices whose FDB entries are the backend's.
    pub fdb_devices: Vec<u32>,
}

/// The entries a backend wants for its peers, each with the peer it is for, and the
/// peers it cannot route. [`Desired::apply`] makes the kernel match.
///
/// Each key (route destination, neighbour address on a device, FDB MAC on a device) can be
/// wanted for one peer only; the adders return `false`, add nothing and do not count the
/// peer when the key is taken (the caller marks the peer [`unroutable`](Desired::unroutable)
/// with its reason).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    peers: BTreeSet<String>,
    routes: BTreeMap<IpNet, (GatewayRoute, String)>,
    neighbours: BTreeMap<(u32, IpAddr), (Neighbour, String)>,
    fdb: BTreeMap<(u32, [u8; 6]), (FdbEntry, String)>,
    unroutable: BTreeMap<String, String>,
}

impl Desired {
    /// Nothing wanted.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts `peer` as one the reconcile pass is about (routed unless marked unroutable).
    pub fn peer(&mut self, peer: &str) {
        self.peers.insert(peer.to_owned());
    }

    /// Marks `peer` as not (fully) routable, with why. Reasons add up.
    pub fn unroutable(&mut self, peer: &str, reason: impl Into<String>) {
        self.peer(peer);
        let reason = reason.into();
        self.unroutable
            .entry(peer.to_owned())
            .and_modify(|r| {
                r.push_str("; ");
                r.push_str(&reason);
            })
            .or_insert(reason);
    }

    /// Whether `peer` was marked unroutable.
    pub fn is_unroutable(&self, peer: &str) -> bool {
        self.unroutable.contains_key(peer)
    }

    /// The peer a route to `dst` is wanted for.
    pub fn route_owner(&self, dst: &IpNet) -> Option<&str> {
        self.routes.get(dst).map(|(_, p)| p.as_str())
    }

    /// The peer a neighbour entry for `ip` on `ifindex` is wanted for.
    pub fn neighbour_owner(&self, ifindex: u32, ip: IpAddr) -> Option<&str> {
        self.neighbours.get(&(ifindex, ip)).map(|(_, p)| p.as_str())
    }

    /// The peer an FDB entry for `mac` on `ifindex` is wanted for.
    pub fn fdb_owner(&self, ifindex: u32, mac: [u8; 6]) -> Option<&str> {
        self.fdb.get(&(ifindex, mac)).map(|(_, p)| p.as_str())
    }

    /// Wants `route` for `peer`. `false` if its destination is wanted already.
    pub fn route(&mut self, peer: &str, route: GatewayRoute) -> bool {
        let route = GatewayRoute {
            dst: route.dst.trunc(),
            ..route
        };
        if self.routes.contains_key(&route.dst) {
            return false;
        }
        self.peer(peer);
        self.routes.insert(route.dst, (route, peer.to_owned()));
        true
    }

    /// Wants a permanent neighbour entry on `ifindex` for `peer`. `false` if its address
    /// is wanted already on that device.
    pub fn neighbour(&mut self, peer: &str, ifindex: u32, entry: Neighbour) -> bool {
        if self.neighbours.contains_key(&(ifindex, entry.ip)) {
            return false;
        }
        self.peer(peer);
        self.neighbours
            .insert((ifindex, entry.ip), (entry, peer.to_owned()));
        true
    }

    /// Wants an FDB entry on `ifindex` for `peer`. `false` if its MAC is wanted already on
    /// that device.
    pub fn fdb(&mut self, peer: &str, ifindex: u32, entry: FdbEntry) -> bool {
        if self.fdb.contains_key(&(ifindex, entry.mac)) {
            return false;
        }
        self.peer(peer);
        self.fdb
            .insert((ifindex, entry.mac), (entry, peer.to_owned()));
        true
    }

    /// Wants `BLOCK via VIA dev OIF [onlink]` for each block of `peer`, and returns how
    /// many. Blocks that cannot be routed are skipped and make the peer unroutable: a block
    /// of the other address family than `via`, one that overlaps a block of this node
    /// (`local_blocks`), one wanted for another peer already.
    pub fn blocks(
        &mut self,
        peer: &NodeRecord,
        local_blocks: &[IpNet],
        via: IpAddr,
        oif: u32,
        onlink: bool,
    ) -> usize {
        self.peer(&peer.name);
        let mut wanted = 0;
        for block in peer.blocks.iter().map(IpNet::trunc) {
            if block.addr().is_ipv4() != via.is_ipv4() {
                self.unroutable(
                    &peer.name,
                    format!("block {block} is not of the address family of next hop {via}"),
                );
                continue;
            }
            if let Some(own) = local_blocks
                .iter()
                .find(|b| b.contains(&block) || block.contains(*b))
            {
                self.unroutable(
                    &peer.name,
                    format!("block {block} overlaps this node's block {own}"),
                );
                continue;
            }
            match self.route_owner(&block) {
                Some(owner) if owner == peer.name => continue,
                Some(owner) => {
                    let reason = format!("block {block} is claimed by node {owner} too");
                    self.unroutable(&peer.name, reason);
                    continue;
                }
                None => {}
            }
            self.route(
                &peer.name,
                GatewayRoute {
                    dst: block,
                    via,
                    oif,
                    onlink,
                },
            );
            wanted += 1;
        }
        wanted
    }

    /// The wanted routes.
    pub fn routes(&self) -> impl Iterator<Item = &GatewayRoute> {
        self.routes.values().map(|(r, _)| r)
    }

    /// Makes the kernel match: lists what is ours (routes with our protocol, the permanent
    /// neighbour and FDB entries of the devices in `owned`), adds what is missing, replaces
    /// what differs, deletes what is ours and not wanted, and leaves everything else alone.
    /// Nothing is written when the kernel matches already.
    ///
    /// Order: neighbour and FDB entries first, so that a new route works from its first
    /// packet; then routes; then deletions, routes before the entries they used.
    ///
    /// A failed write for a wanted entry marks its peer unroutable with the error and the
    /// pass goes on (the entry is not counted in the report's
    /// [`programmed`](ReconcileReport::programmed)); a failed deletion is returned as an error once everything else is
    /// done. Errors: 101 when listing or deleting fails.
    pub async fn apply<K: Kernel + ?Sized>(
        mut self,
        kernel: &K,
        owned: &Ownership,
    ) -> Result<ReconcileReport> {
        let plan = self.plan(kernel, owned).await?;
        let writes = plan.len();

        let Plan {
            neighbour_upserts,
            fdb_upserts,
            route_writes,
            route_deletes,
            neighbour_deletes,
            fdb_deletes,
        } = plan;

        // Owned items and `move` closures: futures that borrow from the closure's argument
        // would not be provably `Send` for the boxed trait futures of the backends.
        let mut failures = Vec::new();
        let upserts = neighbour_upserts
            .into_iter()
            .map(move |(i, n, peer)| async move { (peer, kernel.replace_neighbour(i, &n).await) });
        let failed = run(upserts).await;
        let mut programmed = Programmed {
            routes: self.routes.len(),
            neighbours: self.neighbours.len().saturating_sub(failed.len()),
            fdb: self.fdb.len(),
        };
        failures.extend(failed);
        let upserts = fdb_upserts
            .into_iter()
            .map(move |(i, e, peer)| async move { (peer, kernel.replace_fdb(i, &e).await) });
        let failed = run(upserts).await;
        programmed.fdb = programmed.fdb.saturating_sub(failed.len());
        failures.extend(failed);
        let routes = route_writes
            .into_iter()
            .map(move |(r, replace, peer)| async move {
                let result = if replace {
                    kernel.replace_route(&r).await
                } else {
                    kernel.add_route(&r).await
                };
                (peer, result)
            });
        let failed = run(routes).await;
        programmed.routes = programmed.routes.saturating_sub(failed.len());
        failures.extend(failed);
        for (peer, e) in failures {
            tracing::warn!(peer = %peer, error = %e, "cannot program an entry for a peer");
            self.unroutable(&peer, e.to_string());
        }

        let mut errors = Vec::new();
        let deletes = route_deletes
            .into_iter()
            .map(move |r| async move { ((), kernel.delete_route(&r).await.map(drop)) });
        errors.extend(run(deletes).await);
        let deletes = neighbour_deletes
            .into_iter()
            .map(
                move |(i, ip)| async move { ((), kernel.delete_neighbour(i, ip).await.map(drop)) },
            );
        errors.extend(run(deletes).await);
        let deletes = fdb_deletes
            .into_iter()
            .map(move |(i, e)| async move { ((), kernel.delete_fdb(i, &e).await.map(drop)) });
        errors.extend(run(deletes).await);
        Error::collect(errors.into_iter().map(|((), e)| e).collect())?;

        let routed = self
            .peers
            .iter()
            .filter(|p| !self.unroutable.contains_key(*p))
            .count();
        Ok(ReconcileReport {
            writes,
            routed,
            unroutable: self.unroutable,
            programmed,
        })
    }

    async fn plan<K: Kernel + ?Sized>(&self, kernel: &K, owned: &Ownership) -> Result<Plan> {
        let mut plan = Plan::default();

        let mut actual: BTreeMap<IpNet, Vec<GatewayRoute>> = BTreeMap::new();
        for r in kernel.owned_routes().await? {
            actual.entry(r.dst).or_default().push(r);
        }
        for (dst, (want, peer)) in &self.routes {
            match actual.remove(dst) {
                None => plan.route_writes.push((*want, false, peer.clone())),
                Some(have) => {
                    let mut stale = have.iter().filter(|r| *r != want);
                    if !have.contains(want) {
                        plan.route_writes.push((*want, true, peer.clone()));
                        // The replace rewrites the route at our metric.
                        stale.next();
                    }
                    // Leftovers at other metrics; one with the wanted next hop would match
                    // the wanted route too when deleted, so it stays.
                    plan.route_deletes.extend(
                        stale
                            .filter(|r| (r.via, r.oif) != (want.via, want.oif))
                            .copied(),
                    );
                }
            }
        }
        plan.route_deletes.extend(actual.into_values().flatten());

        // Devices with wanted entries are read too, so that an entry there is written only
        // when missing or different; stale entries are deleted on owned devices only.
        let devices = |owned: &[u32], wanted: Vec<u32>| -> BTreeSet<u32> {
            owned.iter().copied().chain(wanted).collect()
        };

        let wanted = self.neighbours.keys().map(|(i, _)| *i).collect();
        for ifindex in devices(&owned.neighbour_devices, wanted) {
            let mut actual: BTreeMap<IpAddr, [u8; 6]> = kernel
                .permanent_neighbours(ifindex)
                .await?
                .into_iter()
                .map(|n| (n.ip, n.mac))
                .collect();
            for ((_, ip), (want, peer)) in self
                .neighbours
                .range((ifindex, ip_min())..)
                .take_while(|((i, _), _)| *i == ifindex)
            {
                if actual.remove(ip) != Some(want.mac) {
                    plan.neighbour_upserts.push((ifindex, *want, peer.clone()));
                }
            }
            if owned.neighbour_devices.contains(&ifindex) {
                plan.neighbour_deletes
                    .extend(actual.into_keys().map(|ip| (ifindex, ip)));
            }
        }

        let wanted = self.fdb.keys().map(|(i, _)| *i).collect();
        for ifindex in devices(&owned.fdb_devices, wanted) {
            let mut actual: BTreeMap<[u8; 6], Vec<IpAddr>> = BTreeMap::new();
            for e in kernel.fdb_entries(ifindex).await? {
                actual.entry(e.mac).or_default().push(e.dst);
            }
            for ((_, mac), (want, peer)) in self
                .fdb
                .range((ifindex, [0u8; 6])..)
                .take_while(|((i, _), _)| *i == ifindex)
            {
                let have = actual.remove(mac).unwrap_or_default();
                let mut stale = have.iter().filter(|d| **d != want.dst);
                if !have.contains(&want.dst) {
                    plan.fdb_upserts.push((ifindex, *want, peer.clone()));
                    // The replace rewrites the MAC's first destination.
                    stale.next();
                }
                plan.fdb_deletes
                    .extend(stale.map(|&dst| (ifindex, FdbEntry { mac: *mac, dst })));
            }
            if owned.fdb_devices.contains(&ifindex) {
                plan.fdb_deletes
                    .extend(actual.into_iter().flat_map(|(mac, dsts)| {
                        dsts.into_iter()
                            .map(move |dst| (ifindex, FdbEntry { mac, dst }))
                    }));
            }
        }

        Ok(plan)
    }
}

fn ip_min() -> IpAddr {
    IpAddr::from([0u8; 4])
}

/// The writes one reconcile pass makes.
#[derive(Debug, Default)]
struct Plan {
    neighbour_upserts: Vec<(u32, Neighbour, String)>,
    fdb_upserts: Vec<(u32, FdbEntry, String)>,
    /// Route, whether to replace (else add), peer.
    route_writes: Vec<(GatewayRoute, bool, String)>,
    route_deletes: Vec<GatewayRoute>,
    neighbour_deletes: Vec<(u32, IpAddr)>,
    fdb_deletes: Vec<(u32, FdbEntry)>,
}

impl Plan {
    fn len(&self) -> usize {
        self.neighbour_upserts.len()
            + self.fdb_upserts.len()
            + self.route_writes.len()
            + self.route_deletes.len()
            + self.neighbour_deletes.len()
            + self.fdb_deletes.len()
    }
}

/// Runs writes with up to [`IN_FLIGHT`] in flight and returns the failures with their tag.
async fn run<T, F>(writes: impl Iterator<Item = F>) -> Vec<(T, Error)>
where
    F: Future<Output = (T, Result<()>)>,
{
    futures::stream::iter(writes)
        .buffer_unordered(IN_FLIGHT)
        .filter_map(|(tag, result)| async move { result.err().map(|e| (tag, e)) })
        .collect()
        .await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::linux::kernel::{Neighbours, Recording};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn entries_on_devices_not_owned_are_written_but_nothing_there_is_deleted() {
        let k = Recording::new();
        let eth0 = k.add_plain_link("eth0", 1500, &[net("192.0.2.1/24")]);
        let theirs = Neighbour {
            ip: ip("192.0.2.9"),
            mac: [2, 0, 0, 0, 0, 9],
        };
        k.replace_neighbour(eth0, &theirs).await.unwrap();
        k.take_writes();

        let ours = Neighbour {
            ip: ip("192.0.2.5"),
            mac: [2, 0, 0, 0, 0, 5],
        };
        let mut d = Desired::new();
        assert!(d.neighbour("p", eth0, ours));
        assert!(!d.neighbour("q", eth0, ours), "one owner per key");
        let report = d.clone().apply(&k, &Ownership::default()).await.unwrap();
        assert_eq!(report.writes, 1);
        assert_eq!(report.routed, 1);
        assert_eq!(
            report.programmed,
            Programmed {
                routes: 0,
                neighbours: 1,
                fdb: 0
            }
        );
        assert_eq!(k.neighbours(eth0), vec![ours, theirs]);
        let again = d.apply(&k, &Ownership::default()).await.unwrap();
        assert_eq!(again.writes, 0);
        assert_eq!(again.programmed.neighbours, 1, "an entry in place counts");
        // Owning the device makes its other permanent entries stale.
        let owned = Ownership {
            neighbour_devices: vec![eth0],
            fdb_devices: vec![],
        };
        let mut d = Desired::new();
        d.neighbour("p", eth0, ours);
        assert_eq!(d.apply(&k, &owned).await.unwrap().writes, 1);
        assert_eq!(k.neighbours(eth0), vec![ours]);
    }

    #[tokio::test]
    async fn entries_that_failed_are_not_counted_as_programmed() {
        use crate::linux::kernel::Write;
        let k = Recording::new();
        let eth0 = k.add_plain_link("eth0", 1500, &[net("192.0.2.1/24")]);
        let blocked = net("10.2.0.0/24");
        k.fail_writes(move |w| matches!(w, Write::AddRoute(r) if r.dst == blocked));
        let mut d = Desired::new();
        for (peer, dst) in [("a", "10.1.0.0/24"), ("b", "10.2.0.0/24")] {
            d.route(
                peer,
                GatewayRoute {
                    dst: net(dst),
                    via: ip("192.0.2.2"),
                    oif: eth0,
                    onlink: false,
                },
            );
        }
        let report = d.apply(&k, &Ownership::default()).await.unwrap();
        assert_eq!(report.programmed.routes, 1);
        assert_eq!(report.routed, 1);
        assert!(report.unroutable.contains_key("b"));
    }

    #[test]
    fn blocks_skip_what_cannot_be_routed() {
        let peer = |name: &str, blocks: &[&str]| NodeRecord {
            name: name.into(),
            address: ip("192.0.2.2"),
            prefix_len: 24,
            blocks: blocks.iter().map(|b| net(b)).collect(),
            backend: BTreeMap::new(),
        };
        let local = [net("10.0.0.0/24")];
        let mut d = Desired::new();
        let n = d.blocks(
            &peer("a", &["10.1.0.7/24", "10.1.0.0/24", "fd00::/64"]),
            &local,
            ip("192.0.2.2"),
            2,
            false,
        );
        assert_eq!(
            n, 1,
            "host bits dropped, duplicate and other family skipped"
        );
        assert_eq!(
            d.routes().map(|r| r.dst).collect::<Vec<_>>(),
            vec![net("10.1.0.0/24")]
        );
        assert!(d.is_unroutable("a"));
        let n = d.blocks(
            &peer(
                "b",
                &["10.1.0.0/24", "10.0.0.128/25", "10.0.0.0/16", "10.2.0.0/24"],
            ),
            &local,
            ip("192.0.2.3"),
            2,
            false,
        );
        assert_eq!(n, 1);
        assert_eq!(d.route_owner(&net("10.2.0.0/24")), Some("b"));
        assert_eq!(d.route_owner(&net("10.1.0.0/24")), Some("a"));
    }
}
