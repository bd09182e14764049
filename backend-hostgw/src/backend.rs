//! The host-gw backend.

use std::collections::BTreeMap;

use async_trait::async_trait;
use cni_core::linux::NetNs;
use cni_core::linux::kernel::{Desired, Kernel, Netlink, Ownership, Underlay, remove_owned};
use cni_core::registry::NodeRecord;
use cni_core::routing::{CrossNodeRouting, LocalNode, ReconcileReport};

use crate::error::{Error, Result};

/// host-gw cross-node routing (see the [crate docs](crate)).
///
/// `K` is the kernel it programs: [`Netlink`] in a network namespace, or
/// [`Recording`](cni_core::linux::kernel::Recording) in unit tests.
#[derive(Debug)]
pub struct HostGw<K = Netlink> {
    kernel: K,
    node: Option<Node>,
}

#[derive(Debug)]
struct Node {
    local: LocalNode,
    underlay: Underlay,
}

impl HostGw<Netlink> {
    /// host-gw acting in the node namespace `ns` (for a node agent:
    /// [`NetNs::current`]). Touches nothing until [`init`](CrossNodeRouting::init).
    pub fn new(ns: NetNs) -> Self {
        Self::with_kernel(Netlink::new(ns))
    }
}

impl<K: Kernel> HostGw<K> {
    /// host-gw programming `kernel`. Touches nothing.
    pub fn with_kernel(kernel: K) -> Self {
        HostGw { kernel, node: None }
    }

    /// The kernel it programs.
    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    /// The underlay interface found by `init`.
    pub fn underlay(&self) -> Option<&Underlay> {
        self.node.as_ref().map(|n| &n.underlay)
    }

    /// The routes and unroutable peers `peers` call for. Pure.
    fn desired(node: &Node, peers: &[NodeRecord]) -> Desired {
        let mut desired = Desired::new();
        let mut peers: Vec<&NodeRecord> =
            peers.iter().filter(|p| p.name != node.local.name).collect();
        // Conflicts (two peers claiming one block) go to the first by name, every time.
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        let underlay = &node.underlay;
        for peer in peers {
            desired.peer(&peer.name);
            if peer.address == underlay.address {
                desired.unroutable(
                    &peer.name,
                    format!("it has this node's underlay address {}", peer.address),
                );
            } else if !underlay.on_link(peer.address) {
                desired.unroutable(
                    &peer.name,
                    format!(
                        "{} is not in the underlay subnet {} of {}: host-gw routes only peers \
                         on the same L2 segment (vxlan routes across subnets)",
                        peer.address, underlay.subnet, underlay.name
                    ),
                );
            } else {
                desired.blocks(
                    peer,
                    &node.local.blocks,
                    peer.address,
                    underlay.ifindex,
                    false,
                );
            }
        }
        desired
    }

    async fn reconcile_inner(&mut self, peers: &[NodeRecord]) -> Result<ReconcileReport> {
        let node = self.node.as_ref().ok_or(Error::NotInitialized)?;
        let report = Self::desired(node, peers)
            .apply(&self.kernel, &Ownership::default())
            .await?;
        tracing::debug!(
            writes = report.writes,
            routed = report.routed,
            unroutable = report.unroutable.len(),
            "host-gw: reconciled"
        );
        Ok(report)
    }

    async fn teardown_inner(&mut self) -> Result<()> {
        remove_owned(&self.kernel, None).await?;
        self.node = None;
        Ok(())
    }
}

#[async_trait]
impl<K: Kernel> CrossNodeRouting for HostGw<K> {
    fn mode(&self) -> &'static str {
        crate::TYPE
    }

    /// Finds the underlay interface and checks the node description; creates nothing.
    /// Idempotent. Errors: 7 when the interface is missing or lacks the node's address.
    async fn init(&mut self, local: &LocalNode) -> cni_core::Result<()> {
        let underlay = Underlay::resolve(&self.kernel, local).await?;
        tracing::info!(
            node = %local.name,
            interface = %underlay.name,
            subnet = %underlay.subnet,
            "host-gw: ready"
        );
        self.node = Some(Node {
            local: local.clone(),
            underlay,
        });
        Ok(())
    }

    /// Nothing: peers need only the node's address and blocks.
    fn node_data(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    fn mtu_overhead(&self) -> u32 {
        0
    }

    /// Routes each block of each on-link peer `via` the peer's address on the underlay
    /// interface; reports off-link peers. Errors: 50 before init, 101 when the routes
    /// cannot be listed or a stale one cannot be deleted.
    async fn reconcile(&mut self, peers: &[NodeRecord]) -> cni_core::Result<ReconcileReport> {
        Ok(self.reconcile_inner(peers).await?)
    }

    /// Deletes every route host-gw owns. Idempotent; works without init (an agent that
    /// restarts only to clean up). Errors: 101.
    async fn teardown(&mut self) -> cni_core::Result<()> {
        Ok(self.teardown_inner().await?)
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use cni_core::linux::kernel::{GatewayRoute, Recording, Write};
    use ipnet::IpNet;

    use super::*;

    const ETH0: u32 = 2;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn kernel() -> Recording {
        let k = Recording::new();
        assert_eq!(
            k.add_plain_link("eth0", 1500, &[net("192.168.1.2/24")]),
            ETH0
        );
        k
    }

    fn local() -> LocalNode {
        LocalNode {
            name: "a".into(),
            address: ip("192.168.1.2"),
            prefix_len: 24,
            interface: "eth0".into(),
            underlay_mtu: 1500,
            blocks: vec![net("10.244.0.0/24")],
            tunnel_address: None,
        }
    }

    fn peer(name: &str, address: &str, blocks: &[&str]) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            address: ip(address),
            prefix_len: 24,
            blocks: blocks.iter().map(|b| net(b)).collect(),
            backend: BTreeMap::new(),
        }
    }

    fn route(dst: &str, via: &str) -> GatewayRoute {
        GatewayRoute {
            dst: net(dst),
            via: ip(via),
            oif: ETH0,
            onlink: false,
        }
    }

    async fn ready(k: &Recording) -> HostGw<Recording> {
        let mut h = HostGw::with_kernel(k.clone());
        h.init(&local()).await.expect("init");
        h
    }

    fn three_peers() -> Vec<NodeRecord> {
        vec![
            peer("a", "192.168.1.2", &["10.244.0.0/24"]),
            peer("b", "192.168.1.3", &["10.244.1.0/24"]),
            peer("c", "192.168.1.4", &["10.244.2.0/24", "10.244.12.0/24"]),
        ]
    }

    #[tokio::test]
    async fn routes_each_peer_block_via_the_peer() {
        let k = kernel();
        let mut h = ready(&k).await;
        let report = h.reconcile(&three_peers()).await.unwrap();
        assert_eq!(
            k.routes(),
            vec![
                route("10.244.1.0/24", "192.168.1.3"),
                route("10.244.2.0/24", "192.168.1.4"),
                route("10.244.12.0/24", "192.168.1.4"),
            ]
        );
        assert_eq!(report.writes, 3);
        assert_eq!(report.routed, 2, "the local node is skipped");
        assert!(report.unroutable.is_empty());
        let writes = k.take_writes();
        assert_eq!(writes.len(), 3);
        assert!(writes.iter().all(|w| matches!(w, Write::AddRoute(_))));
        assert_eq!(h.mtu_overhead(), 0);
        assert!(h.node_data().is_empty());
        assert_eq!(h.mode(), crate::TYPE);
    }

    #[tokio::test]
    async fn nothing_changed_means_no_writes() {
        let k = kernel();
        let mut h = ready(&k).await;
        h.reconcile(&three_peers()).await.unwrap();
        k.take_writes();
        let report = h.reconcile(&three_peers()).await.unwrap();
        assert_eq!(report.writes, 0);
        assert_eq!(report.routed, 2);
        assert!(k.writes().is_empty());
        // A restarted agent (new backend, same kernel) adopts the routes as they are.
        let mut again = ready(&k).await;
        assert_eq!(again.reconcile(&three_peers()).await.unwrap().writes, 0);
        assert!(k.writes().is_empty());
    }

    #[tokio::test]
    async fn a_changed_peer_rewrites_only_its_routes() {
        let k = kernel();
        let mut h = ready(&k).await;
        let mut peers = three_peers();
        h.reconcile(&peers).await.unwrap();
        k.take_writes();

        // New address: its two routes are replaced, nothing else is written.
        peers[2].address = ip("192.168.1.40");
        let report = h.reconcile(&peers).await.unwrap();
        assert_eq!(report.writes, 2);
        let mut writes = k.take_writes();
        writes.sort_by_key(|w| format!("{w:?}"));
        assert_eq!(
            writes,
            vec![
                Write::ReplaceRoute(route("10.244.12.0/24", "192.168.1.40")),
                Write::ReplaceRoute(route("10.244.2.0/24", "192.168.1.40")),
            ]
        );

        // New block for b: the new one added, the old one deleted.
        peers[1].blocks = vec![net("10.244.3.0/24")];
        let report = h.reconcile(&peers).await.unwrap();
        assert_eq!(report.writes, 2);
        let writes = k.take_writes();
        assert!(writes.contains(&Write::AddRoute(route("10.244.3.0/24", "192.168.1.3"))));
        assert!(writes.contains(&Write::DeleteRoute(route("10.244.1.0/24", "192.168.1.3"))));

        // Removed peer: exactly its routes go.
        peers.remove(2);
        let report = h.reconcile(&peers).await.unwrap();
        assert_eq!(report.writes, 2);
        let writes = k.take_writes();
        assert!(writes.iter().all(|w| matches!(
            w,
            Write::DeleteRoute(r) if r.via == ip("192.168.1.40")
        )));
        assert_eq!(k.routes(), vec![route("10.244.3.0/24", "192.168.1.3")]);
    }

    #[tokio::test]
    async fn off_link_peers_are_reported_not_routed() {
        let k = kernel();
        let mut h = ready(&k).await;
        let mut peers = three_peers();
        peers.push(peer("far", "192.168.2.9", &["10.244.9.0/24"]));
        peers.push(peer("v6", "fd00::9", &["10.244.10.0/24"]));
        let report = h.reconcile(&peers).await.unwrap();
        assert_eq!(report.routed, 2);
        assert_eq!(
            report.unroutable.keys().collect::<Vec<_>>(),
            vec!["far", "v6"]
        );
        let reason = &report.unroutable["far"];
        assert!(
            reason.contains("192.168.2.9") && reason.contains("192.168.1.0/24"),
            "{reason}"
        );
        assert!(k.routes().iter().all(|r| r.dst != net("10.244.9.0/24")));
        assert!(k.routes().iter().all(|r| r.dst != net("10.244.10.0/24")));
        assert_eq!(k.routes().len(), 3);
    }

    #[tokio::test]
    async fn conflicting_blocks_are_reported() {
        let k = kernel();
        let mut h = ready(&k).await;
        let peers = vec![
            peer("b", "192.168.1.3", &["10.244.1.0/24", "fd00:1::/64"]),
            // Claims b's block, and one inside this node's block.
            peer("c", "192.168.1.4", &["10.244.1.0/24", "10.244.0.64/26"]),
            // Has this node's address.
            peer("d", "192.168.1.2", &["10.244.4.0/24"]),
        ];
        let report = h.reconcile(&peers).await.unwrap();
        assert_eq!(k.routes(), vec![route("10.244.1.0/24", "192.168.1.3")]);
        assert_eq!(report.routed, 0);
        assert!(report.unroutable["b"].contains("fd00:1::/64"));
        assert!(report.unroutable["c"].contains("claimed by node b"));
        assert!(report.unroutable["c"].contains("overlaps this node's block"));
        assert!(report.unroutable["d"].contains("this node's underlay address"));
    }

    #[tokio::test]
    async fn routes_that_are_not_ours_are_never_touched() {
        let k = kernel();
        let foreign = route("10.244.1.0/24", "192.168.1.254");
        let other = route("10.99.0.0/16", "192.168.1.1");
        k.add_foreign_route(foreign);
        k.add_foreign_route(other);
        let mut h = ready(&k).await;
        let report = h.reconcile(&three_peers()).await.unwrap();
        // b's block is taken by someone else's route: reported, not replaced.
        assert!(
            report.unroutable["b"].contains("File exists"),
            "{:?}",
            report.unroutable
        );
        assert_eq!(report.routed, 1);
        assert_eq!(k.foreign_routes(), vec![other, foreign]);
        h.teardown().await.unwrap();
        assert_eq!(k.foreign_routes(), vec![other, foreign]);
        assert!(k.routes().is_empty());
    }

    #[tokio::test]
    async fn stale_routes_of_a_previous_run_are_removed() {
        let k = kernel();
        let mut old = ready(&k).await;
        old.reconcile(&three_peers()).await.unwrap();
        drop(old);
        k.take_writes();
        // The agent restarts and c is gone meanwhile.
        let mut h = ready(&k).await;
        let report = h.reconcile(&three_peers()[..2]).await.unwrap();
        assert_eq!(report.writes, 2);
        assert_eq!(k.routes(), vec![route("10.244.1.0/24", "192.168.1.3")]);
    }

    #[tokio::test]
    async fn a_failed_write_marks_the_peer_and_the_rest_goes_on() {
        let k = kernel();
        let mut h = ready(&k).await;
        k.fail_writes(|w| matches!(w, Write::AddRoute(r) if r.via.to_string() == "192.168.1.3"));
        let report = h.reconcile(&three_peers()).await.unwrap();
        assert_eq!(report.routed, 1);
        assert!(report.unroutable["b"].contains("Input/output error"));
        assert_eq!(k.routes().len(), 2);
        k.heal();
        let report = h.reconcile(&three_peers()).await.unwrap();
        assert_eq!(report.writes, 1);
        assert_eq!(report.routed, 2);
        assert_eq!(k.routes().len(), 3);
    }

    #[tokio::test]
    async fn teardown_is_idempotent_and_needs_no_init() {
        let k = kernel();
        let mut h = ready(&k).await;
        h.reconcile(&three_peers()).await.unwrap();
        let mut fresh = HostGw::with_kernel(k.clone());
        fresh.teardown().await.unwrap();
        assert!(k.routes().is_empty());
        k.take_writes();
        fresh.teardown().await.unwrap();
        assert!(k.writes().is_empty());
        // After teardown the backend needs init again.
        h.teardown().await.unwrap();
        assert_eq!(h.reconcile(&[]).await.unwrap_err().code().0, 50);
    }

    #[tokio::test]
    async fn init_checks_the_node() {
        let k = kernel();
        let mut h = HostGw::with_kernel(k.clone());
        assert_eq!(h.reconcile(&[]).await.unwrap_err().code().0, 50);
        for bad in [
            LocalNode {
                interface: "eth9".into(),
                ..local()
            },
            LocalNode {
                address: ip("192.168.1.99"),
                ..local()
            },
            LocalNode {
                prefix_len: 33,
                ..local()
            },
            LocalNode {
                interface: "a/b".into(),
                ..local()
            },
        ] {
            let e = h.init(&bad).await.unwrap_err();
            assert_eq!(e.code().0, 7, "{e}");
        }
        assert!(k.writes().is_empty(), "init writes nothing");
        h.init(&local()).await.unwrap();
        h.init(&local()).await.unwrap();
        assert_eq!(h.underlay().map(|u| u.subnet), Some(net("192.168.1.0/24")));
    }
}
