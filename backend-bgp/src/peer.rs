//! One peer: its connections (ours and theirs), collisions, retries, and what it taught us.
//!
//! A peer task owns every connection to one neighbour. With no connection it connects
//! every [`connect_retry`](crate::Config::connect_retry) seconds; a connection the
//! neighbour opens is handed over by the listener. Both sides of a full mesh connect, so
//! two connections often race: when an OPEN tells the neighbour's BGP identifier, the
//! connection opened by the side with the higher identifier stays and the other is closed
//! with Cease / Connection Collision Resolution (RFC 4271 §6.8); a new connection while one
//! is Established is the one closed. The routes of the Established connection are the
//! peer's routes in the speaker's table; they go when it goes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::Ipv4Net;
use rustbgpd_fsm::{PeerConfig, SessionState};
use rustbgpd_wire::notification::cease_subcode;
use rustbgpd_wire::{Afi, Safi};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::connection::{self, ConnEvent, ConnParams, Ctl};
use crate::speaker::{Neighbor, Shared};

/// How long a stopping peer waits for its connections to send their NOTIFICATION.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// Orders to a peer task.
#[derive(Debug)]
pub(crate) enum PeerCmd {
    /// The neighbour connected to us.
    Incoming(TcpStream),
    /// Close every connection (Cease / Administrative Shutdown) and end.
    Stop,
    /// The peer left the peer set: close every connection (Cease / Peer De-configured)
    /// and end.
    Remove,
}

/// A running peer task.
#[derive(Debug)]
pub(crate) struct PeerHandle {
    pub cmds: mpsc::UnboundedSender<PeerCmd>,
    pub task: JoinHandle<()>,
}

impl PeerHandle {
    /// Starts the task of the peer `name` at `address`.
    pub fn spawn(shared: Arc<Shared>, name: String, neighbor: Neighbor) -> Self {
        let (cmds, rx) = mpsc::unbounded_channel();
        let (events, events_rx) = mpsc::unbounded_channel();
        let task = Peer {
            shared,
            name,
            address: neighbor.address,
            as_number: neighbor.as_number,
            conns: BTreeMap::new(),
            next_id: 1,
            live: None,
            restart_time: None,
            stale: BTreeSet::new(),
            stale_until: None,
            events,
        };
        PeerHandle {
            cmds,
            task: tokio::spawn(task.run(rx, events_rx)),
        }
    }
}

struct Slot {
    outgoing: bool,
    /// The neighbour's BGP identifier, from its OPEN.
    remote_id: Option<Ipv4Addr>,
    state: SessionState,
    ctl: mpsc::UnboundedSender<Ctl>,
    closing: bool,
    task: JoinHandle<()>,
}

struct Peer {
    shared: Arc<Shared>,
    name: String,
    address: Ipv4Addr,
    as_number: u32,
    conns: BTreeMap<u64, Slot>,
    next_id: u64,
    /// The Established connection.
    live: Option<u64>,
    /// The peer's restart time, when the live session does graceful restart.
    restart_time: Option<u16>,
    /// Routes kept from a session that dropped (RFC 4724): removed when the peer's new
    /// session ends its routes with End-of-RIB without them, or at the deadline.
    stale: BTreeSet<Ipv4Net>,
    stale_until: Option<Instant>,
    events: connection::Events,
}

impl Drop for Peer {
    /// A peer task that is aborted (the speaker dropped without a teardown: a restart)
    /// drops its connections without a NOTIFICATION, so that peers doing graceful restart
    /// keep this node's routes until it is back.
    fn drop(&mut self) {
        for slot in self.conns.values() {
            slot.task.abort();
        }
    }
}

impl Peer {
    async fn run(
        mut self,
        mut cmds: mpsc::UnboundedReceiver<PeerCmd>,
        mut events: mpsc::UnboundedReceiver<(u64, ConnEvent)>,
    ) {
        let retry = Duration::from_secs(u64::from(self.shared.config.connect_retry));
        let mut retry_at = Some(Instant::now());
        let how = loop {
            let idle = self.conns.is_empty();
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(PeerCmd::Incoming(stream)) => self.spawn_conn(Some(stream)),
                    Some(PeerCmd::Stop) | None => break Ctl::Stop,
                    Some(PeerCmd::Remove) => {
                        break Ctl::Cease(cease_subcode::PEER_DECONFIGURED);
                    }
                },
                Some((id, event)) = events.recv() => {
                    let had = !self.conns.is_empty();
                    self.on_event(id, event);
                    if had && self.conns.is_empty() {
                        // The last connection ended: the next attempt after a pause, also
                        // when the first one never ran (the neighbour connected first).
                        retry_at = Some(Instant::now() + retry);
                    }
                }
                () = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)),
                    if idle && retry_at.is_some() =>
                {
                    retry_at = None;
                    self.spawn_conn(None);
                }
                () = tokio::time::sleep_until(self.stale_until.unwrap_or_else(Instant::now)),
                    if self.stale_until.is_some() =>
                {
                    tracing::info!(peer = %self.name, "graceful restart timer expired");
                    self.drop_stale();
                }
            }
        };
        self.stop(how, &mut events).await;
    }

    /// Closes every connection (`how`: a Cease) and waits (briefly) for them to end.
    async fn stop(&mut self, how: Ctl, events: &mut mpsc::UnboundedReceiver<(u64, ConnEvent)>) {
        for slot in self.conns.values() {
            let _ = slot.ctl.send(how);
        }
        let _ = tokio::time::timeout(STOP_GRACE, async {
            while !self.conns.is_empty() {
                match events.recv().await {
                    Some((id, event)) => self.on_event(id, event),
                    None => break,
                }
            }
        })
        .await;
        for slot in self.conns.values() {
            slot.task.abort();
        }
    }

    /// A connection: the neighbour's `stream`, or (`None`) one we open.
    fn spawn_conn(&mut self, stream: Option<TcpStream>) {
        let id = self.next_id;
        self.next_id += 1;
        let outgoing = stream.is_none();
        let config = &self.shared.config;
        let mut peer = PeerConfig::new(config.as_number, self.as_number, self.shared.router_id);
        peer.hold_time = config.hold_time;
        peer.families = vec![(Afi::Ipv4, Safi::Unicast)];
        peer.connect_retry_secs = u32::from(config.connect_retry);
        peer.graceful_restart = config.graceful_restart;
        peer.gr_restart_time = config.restart_time;
        let params = ConnParams {
            id,
            peer,
            next_hop: self.shared.router_id,
            outgoing,
            cluster_id: config.route_reflector_cluster_id,
        };
        let (ctl, ctl_rx) = mpsc::unbounded_channel();
        let events = self.events.clone();
        let Some(out) = self.shared.subscribe_out(&self.name) else {
            return;
        };
        let shared = self.shared.clone();
        let remote = SocketAddr::from((self.address, config.port));
        let task = tokio::spawn(async move {
            let stream = match stream {
                Some(s) => s,
                None => match shared.connect(remote).await {
                    Ok(s) => s,
                    Err(e) => {
                        let down = ConnEvent::Down {
                            why: Some(e),
                            notified: false,
                        };
                        let _ = events.send((id, down));
                        return;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            connection::run(stream, params, ctl_rx, out, events).await;
        });
        self.conns.insert(
            id,
            Slot {
                outgoing,
                state: if outgoing {
                    SessionState::Connect
                } else {
                    SessionState::Active
                },
                ctl,
                remote_id: None,
                closing: false,
                task,
            },
        );
        self.publish_state();
    }

    fn on_event(&mut self, id: u64, event: ConnEvent) {
        match event {
            ConnEvent::State(state) => {
                if let Some(slot) = self.conns.get_mut(&id) {
                    slot.state = state;
                }
                self.publish_state();
            }
            ConnEvent::OpenReceived(remote_id) => {
                if let Some(slot) = self.conns.get_mut(&id) {
                    slot.remote_id = Some(remote_id);
                }
                self.collision(id, remote_id);
            }
            ConnEvent::Established {
                hold_time,
                restart_time,
            } => {
                if self.conns.get(&id).is_none_or(|s| s.closing) {
                    return;
                }
                self.live = Some(id);
                self.restart_time = restart_time;
                if restart_time.is_none() {
                    // No graceful restart on the new session: nothing will confirm the
                    // kept routes.
                    self.drop_stale();
                }
                let (peer, address) = (&self.name, self.address);
                tracing::info!(%peer, %address, hold_time, "BGP session established");
                let since = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let remote_id = self.conns.get(&id).and_then(|s| s.remote_id);
                self.shared.update_peer(&self.name, |p| {
                    p.router_id = remote_id;
                    p.summary.established_at = Some(since);
                    p.summary.hold_time = Some(hold_time);
                    // Without graceful restart no End-of-RIB is promised.
                    p.synced |= restart_time.is_none();
                });
                self.publish_state();
            }
            ConnEvent::Routes {
                announced,
                withdrawn,
                attributes,
            } if self.live == Some(id) => {
                for (prefix, _) in &announced {
                    self.stale.remove(prefix);
                }
                self.shared.update_peer(&self.name, |p| {
                    for prefix in withdrawn {
                        p.routes.remove(&prefix);
                        p.paths.remove(&prefix);
                    }
                    for (prefix, next_hop) in announced {
                        p.routes.insert(prefix, next_hop);
                        p.paths.insert(prefix, attributes.clone());
                    }
                });
                self.shared.routes_changed();
            }
            ConnEvent::Sent(n) if self.live == Some(id) => {
                self.shared
                    .update_peer(&self.name, |p| p.summary.prefixes_sent = n);
            }
            ConnEvent::EndOfRib if self.live == Some(id) => {
                self.shared.update_peer(&self.name, |p| p.synced = true);
                self.drop_stale();
                self.shared.routes_changed();
            }
            ConnEvent::Routes { .. } | ConnEvent::Sent(_) | ConnEvent::EndOfRib => {}
            ConnEvent::Down { why, notified } => {
                self.conns.remove(&id);
                if let Some(why) = &why {
                    let (peer, address) = (&self.name, self.address);
                    tracing::info!(%peer, %address, why, "BGP connection down");
                }
                let was_live = self.live == Some(id);
                if was_live {
                    self.live = None;
                }
                // RFC 4724: a session of a peer that does graceful restart ending without a
                // NOTIFICATION keeps its routes, stale, for the peer's restart time.
                let keep = match self.restart_time.take() {
                    Some(secs) if was_live && !notified && secs > 0 => Some(secs),
                    _ => None,
                };
                let mut kept = BTreeSet::new();
                self.shared.update_peer(&self.name, |p| {
                    if let Some(why) = why {
                        p.summary.last_error = Some(why);
                    }
                    if was_live {
                        p.summary.established_at = None;
                        p.summary.hold_time = None;
                        p.summary.prefixes_sent = 0;
                        if keep.is_some() {
                            kept = p.routes.keys().copied().collect();
                        } else {
                            p.routes.clear();
                            p.paths.clear();
                        }
                    }
                });
                if let Some(secs) = keep {
                    let (peer, routes) = (&self.name, kept.len());
                    tracing::info!(%peer, routes, secs, "peer restarting: its routes are kept");
                    self.stale = kept;
                    self.stale_until = Some(Instant::now() + Duration::from_secs(u64::from(secs)));
                } else if was_live {
                    self.stale.clear();
                    self.stale_until = None;
                    self.shared.routes_changed();
                }
                self.publish_state();
            }
        }
    }

    /// Removes the routes kept across a restart that the peer did not announce again.
    fn drop_stale(&mut self) {
        self.stale_until = None;
        if self.stale.is_empty() {
            return;
        }
        let stale = std::mem::take(&mut self.stale);
        self.shared.update_peer(&self.name, |p| {
            p.routes.retain(|prefix, _| !stale.contains(prefix));
            p.paths.retain(|prefix, _| !stale.contains(prefix));
        });
        self.shared.routes_changed();
    }

    /// RFC 4271 §6.8: of two connections to the same neighbour, the one opened by the
    /// side with the higher BGP identifier stays.
    fn collision(&mut self, id: u64, remote_id: Ipv4Addr) {
        let Some(this) = self.conns.get(&id) else {
            return;
        };
        let this_outgoing = this.outgoing;
        let keep_outgoing = self.shared.router_id > remote_id;
        let others: Vec<(u64, bool, SessionState)> = self
            .conns
            .iter()
            .filter(|(other, s)| **other != id && !s.closing)
            .map(|(other, s)| (*other, s.outgoing, s.state))
            .collect();
        for (other, other_outgoing, state) in others {
            let loser = if state == SessionState::Established {
                id
            } else if this_outgoing == other_outgoing {
                // The same direction twice (the neighbour restarted): the newer stays.
                other.min(id)
            } else if this_outgoing == keep_outgoing {
                other
            } else {
                id
            };
            tracing::debug!(peer = %self.name, loser, "BGP connection collision");
            if let Some(slot) = self.conns.get_mut(&loser) {
                slot.closing = true;
                let _ = slot
                    .ctl
                    .send(Ctl::Cease(cease_subcode::CONNECTION_COLLISION_RESOLUTION));
            }
            if loser == id {
                return;
            }
        }
    }

    /// The most advanced state of the connections, into the summary.
    fn publish_state(&self) {
        let state = self
            .conns
            .values()
            .filter(|s| !s.closing)
            .map(|s| s.state)
            .max_by_key(|s| rank(*s))
            .unwrap_or(SessionState::Idle);
        self.shared
            .update_peer(&self.name, |p| p.summary.state = state.as_str().to_owned());
    }
}

fn rank(state: SessionState) -> u8 {
    match state {
        SessionState::Idle => 0,
        SessionState::Active => 1,
        SessionState::Connect => 2,
        SessionState::OpenSent => 3,
        SessionState::OpenConfirm => 4,
        SessionState::Established => 5,
    }
}
