//! The BGP routing mode: the speaker, and the learned routes in the kernel.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use cni_core::linux::NetNs;
use cni_core::linux::kernel::{Desired, Kernel, Netlink, Ownership, Underlay, remove_owned};
use cni_core::registry::NodeRecord;
use cni_core::routing::{CrossNodeRouting, LocalNode, ReconcileReport};
use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tokio::time::{Duration, Instant};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::speaker::{PeerSummary, Shared, Speaker};

/// The key of a node record's backend data that makes the node a route reflector (its
/// cluster id).
pub const ROUTE_REFLECTOR_KEY: &str = "bgpRouteReflector";

/// What the mode reports to the agent (the node state file's `routing`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The engine that speaks BGP (`native`, or `bird`: then the installed routes are
    /// `proto bird`).
    #[serde(default)]
    pub engine: crate::config::Engine,
    /// The AS of the node.
    pub as_number: u32,
    /// The BGP identifier.
    pub router_id: Ipv4Addr,
    /// Where the speaker listens.
    pub listen: String,
    /// One entry per peer.
    pub peers: Vec<PeerSummary>,
    /// Learned routes put in the kernel, `PREFIX via NEXT_HOP`, by peer (a write that
    /// failed lists its peer in `unroutable` with the error).
    pub installed: BTreeMap<String, Vec<String>>,
    /// Peers or routes that are not installed, with why.
    pub unroutable: BTreeMap<String, String>,
}

/// BGP cross-node routing (see the [crate docs](crate)).
///
/// `K` is the kernel the learned routes go into: [`Netlink`] in a network namespace, or
/// [`Recording`](cni_core::linux::kernel::Recording) in unit tests.
#[derive(Debug)]
pub struct Bgp<K = Netlink> {
    config: Config,
    kernel: Arc<K>,
    /// The namespace the speaker's sockets are made in, until the speaker starts (then
    /// opened again from its path for a speaker started after a teardown).
    sockets: Option<NetNs>,
    sockets_path: std::path::PathBuf,
    running: Option<Running>,
    /// The last install pass (reported by [`CrossNodeRouting::report`]).
    last: Arc<std::sync::Mutex<Installed>>,
}

#[derive(Debug)]
struct Running {
    speaker: Speaker,
    node: watch::Sender<Node>,
    /// Serialises install passes (the installer task's and reconcile's).
    install: Arc<Mutex<()>>,
    installer: JoinHandle<()>,
    /// End of the restart deferral (see [`install`]).
    defer_until: Instant,
}

/// What an install pass did: its report, and the routes it wanted, by peer.
#[derive(Debug, Clone, Default)]
struct Installed {
    report: ReconcileReport,
    routes: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone)]
struct Node {
    local: LocalNode,
    underlay: Underlay,
    /// Peers the speaker cannot talk to (not IPv4), with why.
    unusable: BTreeMap<String, String>,
    /// The IPIP device the learned routes go through (`bgp.ipip`).
    tunnel: Option<crate::tunnel::Tunnel>,
}

impl Bgp<Netlink> {
    /// The BGP mode acting in the network namespace at `netns` (for a node agent:
    /// `/proc/self/ns/net`). Checks the configuration; touches nothing until
    /// [`init`](CrossNodeRouting::init). Errors: 7 for a bad configuration, 4 when `netns`
    /// is no network namespace.
    pub async fn open(config: Config, netns: &Path) -> Result<Self> {
        config.validate()?;
        let kernel = Netlink::new(NetNs::open(netns).await?);
        Ok(Self::with_kernel(config, kernel, NetNs::open(netns).await?))
    }
}

impl<K: Kernel + 'static> Bgp<K> {
    /// The BGP mode installing routes through `kernel`, with its sockets made in `sockets`.
    /// Touches nothing.
    pub fn with_kernel(config: Config, kernel: K, sockets: NetNs) -> Self {
        Bgp {
            config,
            kernel: Arc::new(kernel),
            sockets_path: sockets.path().to_path_buf(),
            sockets: Some(sockets),
            running: None,
            last: Arc::default(),
        }
    }

    /// The kernel it programs.
    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    /// The speaker, once initialised.
    pub fn speaker(&self) -> Option<&Speaker> {
        self.running.as_ref().map(|r| &r.speaker)
    }

    /// Every peer's summary (empty before init).
    pub fn summary(&self) -> Vec<PeerSummary> {
        self.speaker().map(Speaker::summary).unwrap_or_default()
    }

    /// The report of [`CrossNodeRouting::report`], typed.
    pub fn typed_report(&self) -> Option<Report> {
        let running = self.running.as_ref()?;
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Some(Report {
            engine: crate::config::Engine::Native,
            as_number: self.config.as_number,
            router_id: running.speaker.router_id(),
            listen: running.speaker.listen_address().to_string(),
            peers: running.speaker.summary(),
            installed: last.routes,
            unroutable: last.report.unroutable,
        })
    }

    async fn init_inner(&mut self, local: &LocalNode) -> Result<()> {
        let IpAddr::V4(router_id) = local.address else {
            return Err(Error::NotIpv4 {
                address: local.address,
            });
        };
        let underlay = Underlay::resolve(&*self.kernel, local).await?;
        let tunnel = match &self.config.ipip {
            Some(ipip) => Some(crate::tunnel::ensure(&*self.kernel, ipip, &underlay, local).await?),
            None => None,
        };
        let blocks: Vec<Ipv4Net> = local
            .blocks
            .iter()
            .filter_map(|b| match b {
                IpNet::V4(v4) => Some(v4.trunc()),
                IpNet::V6(_) => None,
            })
            .collect();
        if let Some(running) = &self.running {
            running.node.send_modify(|n| {
                n.local = local.clone();
                n.underlay = underlay;
                n.tunnel = tunnel;
            });
            running.speaker.set_blocks(blocks);
            return Ok(());
        }
        let sockets = match self.sockets.take() {
            Some(ns) => ns,
            None => NetNs::open(&self.sockets_path).await?,
        };
        let speaker = Speaker::start(self.config.clone(), sockets, router_id).await?;
        speaker.set_blocks(blocks);
        let (node, node_rx) = watch::channel(Node {
            local: local.clone(),
            underlay,
            unusable: BTreeMap::new(),
            tunnel,
        });
        let install = Arc::new(Mutex::new(()));
        let defer_until = Instant::now()
            + if self.config.graceful_restart {
                Duration::from_secs(u64::from(self.config.restart_time))
            } else {
                Duration::ZERO
            };
        let installer = tokio::spawn(installer(
            speaker.shared().clone(),
            self.kernel.clone(),
            node_rx,
            install.clone(),
            self.last.clone(),
            defer_until,
        ));
        let as_number = self.config.as_number;
        tracing::info!(node = %local.name, %router_id, as_number, "bgp: ready");
        self.running = Some(Running {
            speaker,
            node,
            install,
            installer,
            defer_until,
        });
        Ok(())
    }

    async fn reconcile_inner(&mut self, peers: &[NodeRecord]) -> Result<ReconcileReport> {
        let running = self.running.as_ref().ok_or(Error::NotInitialized)?;
        let local_name = running.node.borrow().local.name.clone();
        let (wanted, unusable) = crate::topology::neighbors(&self.config, &local_name, peers);
        running.node.send_modify(|n| n.unusable = unusable);
        // A peer gone from the registry (its lease expired: the node died) loses its
        // session and its routes now, not after a hold time.
        running.speaker.set_peers(&wanted);
        let _guard = running.install.lock().await;
        let node = running.node.borrow().clone();
        let installed = install(
            &*self.kernel,
            running.speaker.shared(),
            &node,
            running.defer_until,
        )
        .await?;
        let report = installed.report.clone();
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = installed;
        Ok(report)
    }

    async fn teardown_inner(&mut self) -> Result<()> {
        if let Some(running) = self.running.take() {
            running.installer.abort();
            running.speaker.stop().await;
        }
        let device = self
            .config
            .ipip
            .as_ref()
            .map(|i| (i.device.as_str(), "ipip"));
        remove_owned(&*self.kernel, device).await?;
        Ok(())
    }
}

/// Installs the routes again whenever a peer's routes change.
async fn installer<K: Kernel>(
    shared: Arc<Shared>,
    kernel: Arc<K>,
    node: watch::Receiver<Node>,
    lock: Arc<Mutex<()>>,
    last: Arc<std::sync::Mutex<Installed>>,
    defer_until: Instant,
) {
    let mut deferral = Some(defer_until);
    loop {
        tokio::select! {
            () = shared.changed.notified() => {}
            () = tokio::time::sleep_until(deferral.unwrap_or_else(Instant::now)),
                if deferral.is_some() =>
            {
                deferral = None;
            }
        }
        let _guard = lock.lock().await;
        let current = node.borrow().clone();
        match install(&*kernel, &shared, &current, defer_until).await {
            Ok(installed) => *last.lock().unwrap_or_else(|e| e.into_inner()) = installed,
            Err(e) => tracing::warn!(error = %e, "bgp: installing learned routes failed"),
        }
    }
}

/// Makes the kernel hold exactly the learned routes: `PREFIX via NEXT_HOP dev UNDERLAY`
/// (with `bgp.ipip`: `dev TUNNEL onlink`).
///
/// Until `defer_until`, a route already in the kernel via a peer that has not sent all its
/// routes yet stays (RFC 4724's deferral, for a node whose agent restarted: the routes of
/// the previous run keep forwarding until the peers have told again what they have).
async fn install<K: Kernel + ?Sized>(
    kernel: &K,
    shared: &Shared,
    node: &Node,
    defer_until: Instant,
) -> Result<Installed> {
    let mut desired = desired(node, &crate::speaker::routes_of(shared));
    if Instant::now() < defer_until {
        let unsynced = crate::speaker::unsynced(shared);
        if !unsynced.is_empty() {
            for route in kernel.owned_routes().await? {
                let IpAddr::V4(via) = route.via else { continue };
                if let Some(peer) = unsynced.get(&via)
                    && desired.route_owner(&route.dst).is_none()
                {
                    desired.route(peer, route);
                }
            }
        }
    }
    let mut routes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for route in desired.routes() {
        if let Some(peer) = desired.route_owner(&route.dst) {
            routes
                .entry(peer.to_owned())
                .or_default()
                .push(format!("{} via {}", route.dst, route.via));
        }
    }
    let report = desired.apply(kernel, &Ownership::default()).await?;
    tracing::debug!(
        writes = report.writes,
        routed = report.routed,
        "bgp: routes installed"
    );
    Ok(Installed { report, routes })
}

/// The routes the table calls for. Pure. Peers sorted by name: a prefix two peers announce
/// goes to the first, every time.
fn desired(node: &Node, peers: &[(String, BTreeMap<Ipv4Net, Ipv4Addr>)]) -> Desired {
    let mut desired = Desired::new();
    for (name, why) in &node.unusable {
        desired.unroutable(name, why.clone());
    }
    let underlay = &node.underlay;
    for (name, routes) in peers {
        desired.peer(name);
        let mut by_next_hop: BTreeMap<Ipv4Addr, Vec<IpNet>> = BTreeMap::new();
        for (prefix, nh) in routes {
            by_next_hop.entry(*nh).or_default().push(IpNet::V4(*prefix));
        }
        for (nh, blocks) in by_next_hop {
            let via = IpAddr::V4(nh);
            // Through the IPIP device: every next hop, or (crossSubnet) those off the subnet.
            let tunnel = node
                .tunnel
                .filter(|t| !t.cross_subnet || !underlay.on_link(via));
            if via == underlay.address {
                desired.unroutable(name, format!("next hop {nh} is this node"));
            } else if let Some(tunnel) = tunnel {
                let record = NodeRecord {
                    name: name.clone(),
                    address: via,
                    prefix_len: 32,
                    blocks,
                    backend: BTreeMap::new(),
                };
                desired.blocks(&record, &node.local.blocks, via, tunnel.ifindex, true);
            } else if !underlay.on_link(via) {
                desired.unroutable(
                    name,
                    format!(
                        "next hop {nh} is not in the underlay subnet {} of {}",
                        underlay.subnet, underlay.name
                    ),
                );
            } else {
                let record = NodeRecord {
                    name: name.clone(),
                    address: via,
                    prefix_len: 32,
                    blocks,
                    backend: BTreeMap::new(),
                };
                desired.blocks(&record, &node.local.blocks, via, underlay.ifindex, false);
            }
        }
    }
    desired
}

#[async_trait]
impl<K: Kernel + 'static> CrossNodeRouting for Bgp<K> {
    fn mode(&self) -> &'static str {
        crate::TYPE
    }

    /// Starts the speaker on the first call (listening socket, no peers yet); later calls
    /// announce the node's new blocks. Errors: 7 when the underlay interface is missing,
    /// lacks the node's address, or the address is not IPv4; 101 when the speaker cannot
    /// listen.
    async fn init(&mut self, local: &LocalNode) -> cni_core::Result<()> {
        Ok(self.init_inner(local).await?)
    }

    /// The cluster id when this node is a route reflector, so the other nodes peer with it
    /// (and only with the reflectors); else nothing.
    fn node_data(&self) -> BTreeMap<String, String> {
        self.config
            .route_reflector_cluster_id
            .map(|c| (ROUTE_REFLECTOR_KEY.to_owned(), c.to_string()))
            .into_iter()
            .collect()
    }

    /// 20 bytes with `bgp.ipip` (the outer IPv4 header), else 0.
    fn mtu_overhead(&self) -> u32 {
        if self.config.ipip.is_some() {
            crate::tunnel::OVERHEAD
        } else {
            0
        }
    }

    /// With `bgp.ipip`: the IPIP device needs an address of the node's block.
    fn needs_tunnel_address(&self) -> bool {
        self.config.ipip.is_some()
    }

    /// Makes the sessions match `peers` (one iBGP session per peer, by address; the
    /// routes come over BGP), drops the sessions and routes of peers no longer listed at
    /// once, and installs the learned routes. Errors: 50 before init, 101 when the
    /// routes cannot be listed or a stale one cannot be deleted.
    async fn reconcile(&mut self, peers: &[NodeRecord]) -> cni_core::Result<ReconcileReport> {
        Ok(self.reconcile_inner(peers).await?)
    }

    /// Closes every session (Cease, so peers withdraw our blocks at once) and deletes
    /// every route this mode installed. Idempotent; works without init.
    async fn teardown(&mut self) -> cni_core::Result<()> {
        Ok(self.teardown_inner().await?)
    }

    /// Sessions, installed routes and what is not installed (a [`Report`]).
    fn report(&self) -> Option<serde_json::Value> {
        self.typed_report()
            .and_then(|r| serde_json::to_value(r).ok())
    }
}

impl<K> Drop for Bgp<K> {
    fn drop(&mut self) {
        if let Some(running) = &self.running {
            running.installer.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use cni_core::linux::kernel::{GatewayRoute, Recording};

    use super::*;

    const ETH0: u32 = 2;

    fn node() -> Node {
        Node {
            local: LocalNode {
                name: "a".into(),
                address: "192.168.1.2".parse().unwrap(),
                prefix_len: 24,
                interface: "eth0".into(),
                underlay_mtu: 1500,
                blocks: vec!["10.244.0.0/26".parse().unwrap()],
                tunnel_address: None,
            },
            underlay: Underlay {
                ifindex: ETH0,
                name: "eth0".into(),
                address: "192.168.1.2".parse().unwrap(),
                subnet: "192.168.1.0/24".parse().unwrap(),
                mtu: 1500,
            },
            unusable: BTreeMap::new(),
            tunnel: None,
        }
    }

    fn learned(name: &str, routes: &[(&str, &str)]) -> (String, BTreeMap<Ipv4Net, Ipv4Addr>) {
        (
            name.into(),
            routes
                .iter()
                .map(|(p, nh)| (p.parse().unwrap(), nh.parse().unwrap()))
                .collect(),
        )
    }

    fn route(dst: &str, via: &str) -> GatewayRoute {
        GatewayRoute {
            dst: dst.parse().unwrap(),
            via: via.parse().unwrap(),
            oif: ETH0,
            onlink: false,
        }
    }

    #[tokio::test]
    async fn with_ipip_learned_routes_go_through_the_tunnel_on_link() {
        let k = Recording::new();
        assert_eq!(
            k.add_plain_link("eth0", 1500, &["192.168.1.2/24".parse().unwrap()]),
            ETH0
        );
        let tunl = k.add_plain_link("cnikit.ipip", 1480, &[]);
        let mut node = node();
        node.tunnel = Some(crate::tunnel::Tunnel {
            ifindex: tunl,
            cross_subnet: false,
        });
        let peers = [
            learned("b", &[("10.244.1.0/26", "192.168.1.3")]),
            learned("c", &[("10.244.3.0/26", "192.168.7.4")]),
        ];
        let tunnelled = |dst: &str, via: &str| GatewayRoute {
            oif: tunl,
            onlink: true,
            ..route(dst, via)
        };
        desired(&node, &peers)
            .apply(&k, &Ownership::default())
            .await
            .unwrap();
        assert_eq!(
            k.routes(),
            vec![
                tunnelled("10.244.1.0/26", "192.168.1.3"),
                tunnelled("10.244.3.0/26", "192.168.7.4"),
            ]
        );
        // crossSubnet: the peer on the subnet gets a plain route.
        node.tunnel = Some(crate::tunnel::Tunnel {
            ifindex: tunl,
            cross_subnet: true,
        });
        let report = desired(&node, &peers)
            .apply(&k, &Ownership::default())
            .await
            .unwrap();
        assert!(report.unroutable.is_empty(), "{report:?}");
        assert_eq!(
            k.routes(),
            vec![
                route("10.244.1.0/26", "192.168.1.3"),
                tunnelled("10.244.3.0/26", "192.168.7.4"),
            ]
        );
    }

    #[tokio::test]
    async fn learned_routes_are_installed_via_their_next_hop_and_bad_ones_reported() {
        let k = Recording::new();
        assert_eq!(
            k.add_plain_link("eth0", 1500, &["192.168.1.2/24".parse().unwrap()]),
            ETH0
        );
        let mut node = node();
        node.unusable.insert("v6".into(), "fd00::9 is IPv6".into());
        let peers = [
            learned(
                "b",
                &[
                    ("10.244.1.0/26", "192.168.1.3"),
                    ("10.244.9.0/26", "192.168.1.3"),
                ],
            ),
            // Claims b's prefix, one inside this node's block, and one via a far next hop.
            learned(
                "c",
                &[
                    ("10.244.1.0/26", "192.168.1.4"),
                    ("10.244.0.0/27", "192.168.1.4"),
                    ("10.244.2.0/26", "192.168.1.4"),
                    ("10.244.3.0/26", "192.168.7.4"),
                ],
            ),
            // Points at this node.
            learned("d", &[("10.244.4.0/26", "192.168.1.2")]),
            // Established, nothing announced.
            learned("e", &[]),
        ];
        let report = desired(&node, &peers)
            .apply(&k, &Ownership::default())
            .await
            .unwrap();
        assert_eq!(
            k.routes(),
            vec![
                route("10.244.1.0/26", "192.168.1.3"),
                route("10.244.2.0/26", "192.168.1.4"),
                route("10.244.9.0/26", "192.168.1.3"),
            ]
        );
        assert_eq!(report.writes, 3);
        assert_eq!(report.routed, 2, "b and e: {report:?}");
        let why = &report.unroutable;
        assert!(why["c"].contains("claimed by node b"), "{why:?}");
        assert!(why["c"].contains("overlaps this node's block"), "{why:?}");
        assert!(
            why["c"].contains("192.168.7.4 is not in the underlay subnet"),
            "{why:?}"
        );
        assert!(why["d"].contains("is this node"), "{why:?}");
        assert!(why["v6"].contains("IPv6"), "{why:?}");

        // b withdraws one prefix, c's session drops: exactly their routes go.
        let peers = [learned("b", &[("10.244.1.0/26", "192.168.1.3")])];
        k.take_writes();
        let report = desired(&node, &peers)
            .apply(&k, &Ownership::default())
            .await
            .unwrap();
        assert_eq!(report.writes, 2);
        assert_eq!(k.routes(), vec![route("10.244.1.0/26", "192.168.1.3")]);
    }
}
