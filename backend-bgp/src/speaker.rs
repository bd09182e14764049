//! The speaker: a listening socket, one task per peer, and the routes the peers taught.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cni_core::linux::NetNs;
use ipnet::Ipv4Net;
use rustbgpd_wire::notification::{NotificationCode, cease_subcode};
use rustbgpd_wire::{Message, NotificationMessage, PathAttribute, encode_message};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::connection::Out;
use crate::error::{Error, Result};
use crate::peer::{PeerCmd, PeerHandle};

/// A neighbour to keep a session with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Neighbor {
    /// Its address.
    pub address: Ipv4Addr,
    /// Its AS: the node's own for iBGP (the other nodes), another for eBGP (a top-of-rack
    /// router).
    pub as_number: u32,
    /// This node reflects routes to it (RFC 4456): it is a route-reflector client.
    #[serde(default)]
    pub client: bool,
}

/// One peer as the speaker reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerSummary {
    /// The peer's node name.
    pub name: String,
    /// Its address.
    pub address: Option<Ipv4Addr>,
    /// Its AS.
    pub as_number: u32,
    /// The most advanced RFC 4271 state of its connections (`idle`, `connect`, `active`,
    /// `open_sent`, `open_confirm`, `established`).
    pub state: String,
    /// When the session was established, seconds since the Unix epoch (the uptime is now
    /// minus this).
    pub established_at: Option<u64>,
    /// The negotiated hold time, seconds.
    pub hold_time: Option<u16>,
    /// The node's prefixes the peer has from us.
    pub prefixes_sent: usize,
    /// Prefixes the peer announced to us.
    pub prefixes_received: usize,
    /// Why the last connection ended, when it ended on an error.
    pub last_error: Option<String>,
}

impl PeerSummary {
    /// How long the session has been Established.
    pub fn uptime(&self) -> Option<Duration> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        Some(now.saturating_sub(Duration::from_secs(self.established_at?)))
    }
}

/// A peer's entry in the speaker's table.
#[derive(Debug)]
pub(crate) struct PeerView {
    pub summary: PeerSummary,
    /// What the speaker knows of the neighbour.
    pub neighbor: Neighbor,
    /// Its BGP identifier, once a session came up.
    pub router_id: Option<Ipv4Addr>,
    /// Prefix → next hop, from the Established connection (Adj-RIB-In).
    pub routes: BTreeMap<Ipv4Net, Ipv4Addr>,
    /// Prefix → path attributes as received (for reflection).
    pub paths: BTreeMap<Ipv4Net, Arc<Vec<PathAttribute>>>,
    /// What the peer is to have from this node (Adj-RIB-Out).
    pub out: watch::Sender<Out>,
    /// The peer has sent all its routes once (End-of-RIB, or a session without graceful
    /// restart came up).
    pub synced: bool,
}

/// What the listener, the peer tasks and the installer share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: Config,
    /// The BGP identifier: the node's IPv4 address, also the NEXT_HOP of its blocks.
    pub router_id: Ipv4Addr,
    /// Sockets are made in this namespace.
    ns: NetNs,
    /// The node's own blocks.
    pub blocks: watch::Sender<Vec<Ipv4Net>>,
    /// The peers by name.
    table: Mutex<BTreeMap<String, (PeerView, PeerHandle)>>,
    /// Woken when a peer's routes change.
    pub changed: Notify,
}

impl Shared {
    fn table(&self) -> MutexGuard<'_, BTreeMap<String, (PeerView, PeerHandle)>> {
        // A panic while holding the lock leaves plain data behind: still usable.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the peer `name` is to have, to follow: `None` when it is no longer configured.
    pub fn subscribe_out(&self, name: &str) -> Option<watch::Receiver<Out>> {
        self.table().get(name).map(|(v, _)| v.out.subscribe())
    }

    /// A peer's routes changed: recomputes what every peer is to have and wakes the
    /// installer.
    pub fn routes_changed(&self) {
        self.refresh_out();
        self.changed.notify_one();
    }

    /// Recomputes what every peer is to have: the node's blocks and, on a route reflector
    /// (RFC 4456), the iBGP routes of the other peers: a client's to every iBGP peer, a
    /// non-client's to the clients; with ORIGINATOR_ID and this cluster in CLUSTER_LIST.
    pub fn refresh_out(&self) {
        let table = self.table();
        let own: Out = self.blocks.borrow().iter().map(|b| (*b, None)).collect();
        let local_as = self.config.as_number;
        for (name, (view, _)) in table.iter() {
            let mut out = own.clone();
            if let Some(cluster) = self.config.route_reflector_cluster_id
                && view.neighbor.as_number == local_as
            {
                for (other_name, (other, _)) in table.iter() {
                    if other_name == name
                        || other.neighbor.as_number != local_as
                        || !(other.neighbor.client || view.neighbor.client)
                    {
                        continue;
                    }
                    let originator = other.router_id.unwrap_or(other.neighbor.address);
                    for (prefix, attrs) in &other.paths {
                        if out.contains_key(prefix) {
                            continue;
                        }
                        let reflected = reflect(attrs, originator, cluster);
                        out.insert(*prefix, Some(Arc::new(reflected)));
                    }
                }
            }
            view.out.send_if_modified(|o| {
                let changed = *o != out;
                *o = out;
                changed
            });
        }
    }

    /// Changes the entry of the peer `name`, if it is still configured.
    pub fn update_peer(&self, name: &str, f: impl FnOnce(&mut PeerView)) {
        if let Some((view, _)) = self.table().get_mut(name) {
            f(view);
        }
    }

    /// Opens a TCP connection from the node's address, with a socket made in the node's
    /// namespace; gives up after [`Config::connect_retry`].
    pub async fn connect(&self, remote: SocketAddr) -> std::result::Result<TcpStream, String> {
        let local = SocketAddr::from((self.router_id, 0));
        let socket = self
            .ns
            .run(move || -> std::io::Result<TcpSocket> {
                let s = TcpSocket::new_v4()?;
                s.bind(local)?;
                Ok(s)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("socket: {e}"))?;
        let timeout = Duration::from_secs(u64::from(self.config.connect_retry));
        match tokio::time::timeout(timeout, socket.connect(remote)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(format!("connect to {remote}: {e}")),
            Err(_) => Err(format!("connect to {remote}: timed out")),
        }
    }

    fn peer_of(&self, ip: IpAddr) -> Option<tokio::sync::mpsc::UnboundedSender<PeerCmd>> {
        self.table()
            .values()
            .find(|(view, _)| view.summary.address.map(IpAddr::V4) == Some(ip))
            .map(|(_, handle)| handle.cmds.clone())
    }
}

/// A route as a reflector passes it on: ORIGINATOR_ID kept or set to the peer it came
/// from, this cluster first in CLUSTER_LIST.
fn reflect(attrs: &[PathAttribute], originator: Ipv4Addr, cluster: Ipv4Addr) -> Vec<PathAttribute> {
    let mut originator_id = originator;
    let mut clusters = Vec::new();
    let mut out = Vec::with_capacity(attrs.len() + 2);
    for a in attrs {
        match a {
            PathAttribute::OriginatorId(id) => originator_id = *id,
            PathAttribute::ClusterList(list) => clusters.clone_from(list),
            other => out.push(other.clone()),
        }
    }
    clusters.insert(0, cluster);
    out.push(PathAttribute::OriginatorId(originator_id));
    out.push(PathAttribute::ClusterList(clusters));
    out
}

/// The peers that have not sent all their routes yet since the speaker started: address →
/// name.
pub(crate) fn unsynced(shared: &Shared) -> BTreeMap<Ipv4Addr, String> {
    shared
        .table()
        .iter()
        .filter(|(_, (v, _))| !v.synced)
        .filter_map(|(name, (v, _))| Some((v.summary.address?, name.clone())))
        .collect()
}

/// The routes learned, by peer name (sorted): prefix → next hop.
pub(crate) fn routes_of(shared: &Shared) -> Vec<(String, BTreeMap<Ipv4Net, Ipv4Addr>)> {
    shared
        .table()
        .iter()
        .map(|(name, (v, _))| (name.clone(), v.routes.clone()))
        .collect()
}

/// The BGP speaker of one node: listens, keeps a session per peer, announces the node's
/// blocks and collects what the peers announce.
#[derive(Debug)]
pub struct Speaker {
    shared: Arc<Shared>,
    listen: SocketAddr,
    listener: JoinHandle<()>,
}

impl Speaker {
    /// Starts a speaker with the BGP identifier (and next hop) `router_id`, listening on
    /// `config.listen_address` (default `router_id`) and `config.port` with a socket made
    /// in `ns`. No peers yet. Errors: 7 for a bad configuration, 101 when it cannot listen.
    pub async fn start(config: Config, ns: NetNs, router_id: Ipv4Addr) -> Result<Self> {
        config.validate()?;
        let ip = config.listen_address.unwrap_or(IpAddr::V4(router_id));
        let address = SocketAddr::new(ip, config.port);
        // A speaker of this node that was just dropped (a restart) may still hold the
        // port for a moment: try again for up to a second.
        let mut attempts = 0;
        let listener = loop {
            let bound = ns
                .run(move || {
                    let l = std::net::TcpListener::bind(address)?;
                    l.set_nonblocking(true)?;
                    Ok(l)
                })
                .await?
                .and_then(TcpListener::from_std);
            match bound {
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempts < 20 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => break other.map_err(|source| Error::Listen { address, source })?,
            }
        };
        let listen = listener
            .local_addr()
            .map_err(|source| Error::Listen { address, source })?;
        let (blocks, _) = watch::channel(Vec::new());
        let shared = Arc::new(Shared {
            config,
            router_id,
            ns,
            blocks,
            table: Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
        });
        tracing::info!(%listen, %router_id, "BGP speaker listening");
        let listener = tokio::spawn(accept(listener, shared.clone()));
        Ok(Speaker {
            shared,
            listen,
            listener,
        })
    }

    /// Where it listens.
    pub fn listen_address(&self) -> SocketAddr {
        self.listen
    }

    /// The BGP identifier.
    pub fn router_id(&self) -> Ipv4Addr {
        self.shared.router_id
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Announces exactly `blocks` to every peer (withdrawing what is no longer there).
    pub fn set_blocks(&self, blocks: Vec<Ipv4Net>) {
        let changed = self.shared.blocks.send_if_modified(|b| {
            let changed = *b != blocks;
            *b = blocks;
            changed
        });
        if changed {
            self.shared.refresh_out();
        }
    }

    /// Makes the peer set `peers` (name → address): new peers get a session, peers gone
    /// or moved lose theirs, with their routes removed from the table right away (the
    /// Cease / Peer De-configured NOTIFICATION goes out in the background).
    pub fn set_peers(&self, peers: &BTreeMap<String, Neighbor>) {
        let mut table = self.shared.table();
        let stale: Vec<String> = table
            .iter()
            .filter(|(name, (view, _))| peers.get(*name) != Some(&view.neighbor))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some((_, handle)) = table.remove(&name) {
                let _ = handle.cmds.send(PeerCmd::Remove);
                tracing::info!(peer = %name, "BGP peer removed");
            }
        }
        for (name, neighbor) in peers {
            if table.contains_key(name) {
                continue;
            }
            let view = PeerView {
                summary: PeerSummary {
                    name: name.clone(),
                    address: Some(neighbor.address),
                    as_number: neighbor.as_number,
                    state: "idle".into(),
                    ..PeerSummary::default()
                },
                neighbor: *neighbor,
                router_id: None,
                routes: BTreeMap::new(),
                paths: BTreeMap::new(),
                out: watch::channel(Out::new()).0,
                synced: false,
            };
            let handle = PeerHandle::spawn(self.shared.clone(), name.clone(), *neighbor);
            table.insert(name.clone(), (view, handle));
        }
        drop(table);
        self.shared.refresh_out();
    }

    /// Every peer's summary, by name.
    pub fn summary(&self) -> Vec<PeerSummary> {
        self.shared
            .table()
            .values()
            .map(|(v, _)| PeerSummary {
                prefixes_received: v.routes.len(),
                ..v.summary.clone()
            })
            .collect()
    }

    /// The routes learned, by peer name: prefix → next hop.
    pub fn routes(&self) -> BTreeMap<String, BTreeMap<Ipv4Net, Ipv4Addr>> {
        routes_of(&self.shared).into_iter().collect()
    }

    /// Closes every session with a Cease (Administrative Shutdown), waits up to a second
    /// for the NOTIFICATIONs to go out, and stops listening.
    pub async fn stop(self) {
        self.listener.abort();
        let handles: Vec<PeerHandle> = std::mem::take(&mut *self.shared.table())
            .into_values()
            .map(|(_, h)| h)
            .collect();
        for h in &handles {
            let _ = h.cmds.send(PeerCmd::Stop);
        }
        for h in handles {
            let _ = h.task.await;
        }
    }
}

impl Drop for Speaker {
    /// A speaker dropped without [`stop`](Speaker::stop) is restarting (an agent that
    /// keeps its routes on exit): its connections close without a NOTIFICATION, so that
    /// peers doing graceful restart keep its routes until it is back.
    fn drop(&mut self) {
        self.listener.abort();
        for (_, h) in self.shared.table().values() {
            h.task.abort();
        }
    }
}

/// Hands each connection to the task of the peer it comes from; refuses strangers with
/// Cease / Connection Rejected.
async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (mut stream, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "BGP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match shared.peer_of(from.ip()) {
            Some(peer) => {
                let _ = peer.send(PeerCmd::Incoming(stream));
            }
            None => {
                tracing::info!(%from, "BGP connection from an unknown address refused");
                let n = NotificationMessage::new(
                    NotificationCode::Cease,
                    cease_subcode::CONNECTION_REJECTED,
                    bytes::Bytes::new(),
                );
                if let Ok(bytes) = encode_message(&Message::Notification(n)) {
                    tokio::spawn(async move {
                        let _ = stream.write_all(&bytes).await;
                        let _ = stream.shutdown().await;
                    });
                }
            }
        }
    }
}
