//! # backend-bgp
//!
//! cnikit's `bgp` cross-node routing: an in-process BGP-4 speaker on every node announces
//! the node's pod blocks to its peers and installs the blocks the peers announce, `BLOCK
//! via PEER dev UNDERLAY proto 107`, as Calico's BIRD does. By default every node is in AS
//! 64512 and peers with every other node (iBGP full mesh); the peer set comes from the
//! node registry, the routes come over BGP. Routers outside the cluster (a top-of-rack
//! router in its own AS) are configured as [`GlobalPeer`]s: every node peers with them over
//! eBGP, announces its blocks with its AS in the path, and installs what they announce.
//! Past a few dozen nodes a full mesh has too many sessions: a node configured with a
//! `routeReflectorClusterId` becomes a route reflector (RFC 4456), publishes it in its
//! node record ([`ROUTE_REFLECTOR_KEY`]), peers with every node and reflects their routes
//! (ORIGINATOR_ID, CLUSTER_LIST, reflected loops dropped); the other nodes then peer with
//! the reflectors only.
//!
//! Two engines speak BGP for the same desired state (`"engine"`): `native`, the speaker
//! inside the agent (the default, [`Bgp`]), and `bird`, BIRD 2 as a supervised child
//! process with a rendered configuration, as Calico runs it ([`Bird`]). With
//! [`Config::ipip`] either makes an IPIP device (as the `ipip` mode does) and installs the
//! learned routes through it, `BLOCK via PEER dev DEVICE onlink` (crossSubnet: only for
//! next hops outside the node's subnet).
//!
//! ## Modules
//! - [`Bgp`]: the [`CrossNodeRouting`](cni_core::routing::CrossNodeRouting)
//!   implementation: the speaker plus the learned routes in the kernel.
//! - [`Speaker`]: the speaker on its own: a listening socket, a session per peer
//!   (RFC 4271 state machine of `rustbgpd-fsm`, messages of `rustbgpd-wire`: OPEN with the
//!   4-octet AS and IPv4 unicast multiprotocol capabilities, UPDATE with ORIGIN, AS_PATH,
//!   NEXT_HOP and LOCAL_PREF, End-of-RIB, KEEPALIVE, NOTIFICATION, ROUTE-REFRESH answered,
//!   malformed UPDATEs handled as RFC 7606 says), connection
//!   collisions resolved by BGP identifier (RFC 4271 §6.8), [`PeerSummary`] per peer.
//! - [`Bird`]: the `bird` engine: `bird.conf` rendered from the same desired state (router
//!   id, AS, one `protocol bgp` per peer with the route-reflector roles, the node's blocks
//!   as the export filter, a kernel protocol installing what BGP learned, through the IPIP
//!   device on-link when [`Config::ipip`] is set), BIRD supervised (started again when it
//!   dies), reloaded with `birdc configure` when peers change, read back through `birdc
//!   show protocols all` into the same [`Report`].
//! - [`Config`]: the `"bgp"` keys. [`Error`]: what can go wrong, with its CNI code.
//!
//! ## Quick start
//! ```no_run
//! # async fn run(local: cni_core::routing::LocalNode,
//! #     peers: Vec<cni_core::registry::NodeRecord>) -> cni_core::Result<()> {
//! use backend_bgp::{Bgp, Config};
//! use cni_core::routing::CrossNodeRouting;
//!
//! let mut bgp = Bgp::open(Config::default(), "/proc/self/ns/net".as_ref()).await?;
//! bgp.init(&local).await?; // listens on LOCAL_ADDRESS:179, announces local.blocks
//! let report = bgp.reconcile(&peers).await?; // a session per peer; learned routes installed
//! println!("{} routes written, {:?}", report.writes, bgp.report());
//! # Ok(()) }
//! ```
//!
//! ## Failure detection
//! A peer whose node leaves the registry (it deregistered, or its lease expired because
//! it died) has its session closed (Cease / Peer De-configured) and its routes removed in
//! the `reconcile` that no longer lists it, not after the hold time (90 s by default) or
//! a graceful-restart timer: the registry's lease is the liveness signal every mode
//! already trusts, so BGP forgets a dead node as fast as host-gw does (within the
//! registry's TTL, at once on a clean deregistration), with no BFD daemon to run. A peer
//! that closes its session with a NOTIFICATION loses its routes when the connection ends;
//! one whose connection just drops while it stays in the registry (a restarting speaker)
//! keeps them for its graceful-restart time, bounded by its lease all the same.
//!
//! ## Graceful restart (RFC 4724)
//! The speaker advertises graceful restart (`gracefulRestart`, `restartTime`), sends
//! End-of-RIB after its blocks and reads the peers'. A peer that does graceful restart and
//! whose session ends without a NOTIFICATION (its speaker died or restarts) keeps its
//! routes, stale, until its new session's End-of-RIB (then the ones it did not announce
//! again go) or until its restart time ends. The other way round: a [`Bgp`] dropped
//! without `teardown` (an agent restarting with `keepOnExit`) closes its sessions without
//! a NOTIFICATION, so peers keep its routes; the new one keeps the routes of the previous
//! run in the kernel until their peers have sent End-of-RIB (at most the restart time). A
//! `teardown` withdraws the node's blocks before its Cease, so no peer keeps them.
//!
//! ## What it owns
//! The routes with protocol [`ROUTE_PROTOCOL`](cni_core::linux::kernel::ROUTE_PROTOCOL) in
//! the main table (installed as they are learned), the listening socket and the sessions,
//! and with [`Config::ipip`] the IPIP device. The blackhole route of the node's own blocks
//! is the node agent's. The `bird` engine owns BIRD's process and files in its run
//! directory, and the routes BIRD writes: `proto bird` (12), since BIRD 2 marks its routes
//! with its own number and no other.
#![warn(missing_docs)]

mod backend;
pub mod bird;
mod config;
mod connection;
mod error;
mod peer;
mod speaker;
mod topology;
mod tunnel;

pub use backend::{Bgp, ROUTE_REFLECTOR_KEY, Report};
pub use bird::Bird;
pub use config::{
    BirdConfig, Config, DEFAULT_AS, DEFAULT_CONNECT_RETRY, DEFAULT_HOLD_TIME, DEFAULT_PORT,
    DEFAULT_RESTART_TIME, Engine, GlobalPeer, IpipConfig,
};
pub use error::{Error, Result};
pub use speaker::{Neighbor, PeerSummary, Speaker};

/// The mode name and configuration `type`.
pub const TYPE: &str = "bgp";
