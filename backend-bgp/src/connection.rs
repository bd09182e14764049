//! One BGP connection: the RFC 4271 state machine of `rustbgpd-fsm` driven over one byte
//! stream (a TCP connection, or an in-memory pipe in unit tests).
//!
//! The state machine is pure: it turns events (messages, timer expiries) into actions
//! (send this, start that timer, close). This module reads and frames messages, runs the
//! hold and keepalive timers, executes the actions, turns received UPDATEs into routes and
//! keeps the peer's view of the node's own blocks up to date (Adj-RIB-Out). It reports to
//! the peer task (see [`peer`](crate::peer)) through [`ConnEvent`]s; connection attempts,
//! retries and collisions are the peer task's business.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use bytes::BytesMut;
use ipnet::Ipv4Net;
use rustbgpd_fsm::{Action, Event, PeerConfig, Session, SessionState, TimerType};
use rustbgpd_wire::notification::NotificationCode;
use rustbgpd_wire::validate::validate_update_attributes;
use rustbgpd_wire::{
    AsPath, AsPathSegment, ErrorDisposition, Ipv4NlriEntry, Ipv4Prefix, Ipv4UnicastMode, Message,
    NotificationMessage, Origin, PathAttribute, UpdateMessage, decode_message,
    encode_message_with_limit, peek_message_length,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// LOCAL_PREF of the node's own blocks (the usual default).
const LOCAL_PREF: u32 = 100;
/// Prefixes per UPDATE: 4 attributes take < 40 bytes, a /26 takes 5: far below 4096.
const PREFIXES_PER_UPDATE: usize = 500;
/// The largest message before Extended Messages (RFC 8654) is negotiated.
const MAX_LEN: u16 = 4096;

/// What one connection needs to know.
#[derive(Debug, Clone)]
pub(crate) struct ConnParams {
    /// Identifies the connection in its events.
    pub id: u64,
    /// The session parameters the state machine checks the peer's OPEN against.
    pub peer: PeerConfig,
    /// NEXT_HOP of the node's own blocks: the node's address.
    pub next_hop: Ipv4Addr,
    /// Whether this side opened the TCP connection.
    pub outgoing: bool,
    /// The cluster of this node when it reflects routes (RFC 4456): routes that went
    /// through it already are loops.
    pub cluster_id: Option<Ipv4Addr>,
}

/// Orders from the peer task.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ctl {
    /// Close administratively (Cease / Administrative Shutdown, RFC 4271 ManualStop).
    Stop,
    /// Close with a Cease of this subcode: Connection Collision Resolution (a lost
    /// collision), Peer De-configured (the peer left the peer set).
    Cease(u8),
}

/// What a connection reports to its peer task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ConnEvent {
    /// The state machine moved.
    State(SessionState),
    /// The peer's OPEN was accepted; its BGP identifier (for collision detection).
    OpenReceived(Ipv4Addr),
    /// Both OPENs and the first KEEPALIVE went through.
    Established {
        /// The negotiated hold time, seconds.
        hold_time: u16,
        /// The peer's restart time when it does graceful restart (RFC 4724) for IPv4
        /// unicast: how long its routes are kept when the session drops.
        restart_time: Option<u16>,
    },
    /// The peer sent all its routes (End-of-RIB: an empty UPDATE, RFC 4724).
    EndOfRib,
    /// Routes the peer announced (prefix, next hop) and withdrew.
    Routes {
        /// Announced or replaced.
        announced: Vec<(Ipv4Net, Ipv4Addr)>,
        /// Withdrawn.
        withdrawn: Vec<Ipv4Net>,
        /// The path attributes of the announced ones.
        attributes: Arc<Vec<PathAttribute>>,
    },
    /// How many of the node's prefixes the peer now has from this connection.
    Sent(usize),
    /// The connection is over; why, when it ended on an error.
    Down {
        /// Why, when it ended on an error.
        why: Option<String>,
        /// Whether a NOTIFICATION was sent or received: a session that ends without one
        /// (the TCP connection dropped, the hold timer expired) is a restart the peer's
        /// routes are kept for, when it does graceful restart.
        notified: bool,
    },
}

/// What a peer is to have from this node (Adj-RIB-Out): prefix → the attributes of a
/// reflected route, or `None` for one of the node's own blocks (whose attributes depend on
/// the session: iBGP or eBGP).
pub(crate) type Out = BTreeMap<Ipv4Net, Option<Arc<Vec<PathAttribute>>>>;

/// Events of a connection, tagged with its id.
pub(crate) type Events = mpsc::UnboundedSender<(u64, ConnEvent)>;

/// Runs one connection until it closes, then reports [`ConnEvent::Down`].
///
/// `out` is what the peer is to have: advertised once Established, and again as it
/// changes.
pub(crate) async fn run<S>(
    stream: S,
    params: ConnParams,
    mut ctl: mpsc::UnboundedReceiver<Ctl>,
    mut out: watch::Receiver<Out>,
    events: Events,
) where
    S: AsyncRead + AsyncWrite + Send,
{
    let (reader, writer) = tokio::io::split(stream);
    let mut reader = reader;
    let local_as = params.peer.local_asn;
    let router_id = params.peer.local_router_id;
    let cluster_id = params.cluster_id;
    let ebgp = params.peer.remote_asn != local_as;
    let mut conn = Conn {
        id: params.id,
        local_as,
        ebgp,
        router_id,
        cluster_id,
        fsm: Session::new(params.peer.clone()),
        writer,
        next_hop: params.next_hop,
        timers: [None; 3],
        advertised: Out::new(),
        max_len: MAX_LEN,
        four_octet_as: true,
        events: events.clone(),
        closed: false,
        why: None,
        notified: false,
        sent_all: false,
    };
    conn.handle(Event::ManualStart).await;
    conn.handle(if params.outgoing {
        Event::TcpConnectionConfirmed
    } else {
        Event::TcpConnectionAcknowledged
    })
    .await;
    let mut buf = BytesMut::with_capacity(4096);
    let mut out_open = true;
    while !conn.closed {
        let deadline = conn.timers.iter().flatten().min().copied();
        let established = conn.fsm.state() == SessionState::Established;
        tokio::select! {
            read = reader.read_buf(&mut buf) => match read {
                Ok(0) => conn.lost("connection closed by the peer".into()).await,
                Err(e) => conn.lost(format!("read: {e}")).await,
                Ok(_) => conn.take_messages(&mut buf).await,
            },
            order = ctl.recv() => match order {
                Some(Ctl::Stop) | None => {
                    if conn.fsm.state() == SessionState::Established {
                        // Withdraw first: a peer that keeps routes across a NOTIFICATION
                        // (graceful restart, RFC 8538) must not keep these.
                        conn.advertise(&Out::new()).await;
                    }
                    conn.handle(Event::ManualStop { reason: None }).await;
                    // ManualStop in Connect/Active closes without a NOTIFICATION.
                    conn.closed = true;
                }
                Some(Ctl::Cease(subcode)) => {
                    let n = NotificationMessage::new(
                        NotificationCode::Cease,
                        subcode,
                        bytes::Bytes::new(),
                    );
                    conn.send(&Message::Notification(n)).await;
                    conn.notified = true;
                    conn.closed = true;
                }
            },
            () = sleep_until(deadline), if deadline.is_some() => conn.fire_timer().await,
            changed = out.changed(), if established && out_open => {
                if changed.is_err() {
                    // The peer left the table: its task closes this connection with the
                    // right Cease.
                    out_open = false;
                } else {
                    let want = out.borrow_and_update().clone();
                    conn.advertise(&want).await;
                }
            }
        }
        if conn.fsm.state() == SessionState::Established && !conn.sent_all {
            // Just established: everything the node has, then End-of-RIB.
            conn.sent_all = true;
            let want = out.borrow_and_update().clone();
            conn.advertise(&want).await;
            conn.send_update(&[], &[], &[]).await;
        }
    }
    let _ = conn.writer.shutdown().await;
    let down = ConnEvent::Down {
        why: conn.why,
        notified: conn.notified,
    };
    let _ = events.send((params.id, down));
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn timer_index(t: TimerType) -> Option<usize> {
    match t {
        TimerType::Hold => Some(0),
        TimerType::Keepalive => Some(1),
        // Connection attempts and their retries are the peer task's: a connection exists
        // only once TCP is up.
        _ => None,
    }
}

struct Conn<W> {
    id: u64,
    /// The node's AS.
    local_as: u32,
    /// The peer is in another AS.
    ebgp: bool,
    router_id: Ipv4Addr,
    cluster_id: Option<Ipv4Addr>,
    fsm: Session,
    writer: WriteHalf<W>,
    next_hop: Ipv4Addr,
    /// Deadlines of the hold and keepalive timers.
    timers: [Option<Instant>; 3],
    /// What the peer has from us (Adj-RIB-Out).
    advertised: Out,
    max_len: u16,
    four_octet_as: bool,
    events: Events,
    closed: bool,
    why: Option<String>,
    /// A NOTIFICATION went either way.
    notified: bool,
    /// The first full advertisement and End-of-RIB went out.
    sent_all: bool,
}

impl<W: AsyncRead + AsyncWrite> Conn<W> {
    fn emit(&self, event: ConnEvent) {
        let _ = self.events.send((self.id, event));
    }

    /// Feeds the state machine one event and carries out what it asks for.
    async fn handle(&mut self, event: Event) {
        for action in self.fsm.handle_event(event) {
            match action {
                Action::SendOpen(open) => self.send(&Message::Open(open)).await,
                Action::SendKeepalive => self.send(&Message::Keepalive).await,
                Action::SendNotification(n) => {
                    self.notified = true;
                    self.why.get_or_insert_with(|| {
                        format!("sent NOTIFICATION {}/{}", n.code.as_u8(), n.subcode)
                    });
                    self.send(&Message::Notification(n)).await;
                }
                Action::StartTimer(t, secs) => {
                    if let Some(i) = timer_index(t) {
                        self.timers[i] = (secs > 0).then(|| {
                            Instant::now() + std::time::Duration::from_secs(u64::from(secs))
                        });
                    }
                }
                Action::StopTimer(t) => {
                    if let Some(i) = timer_index(t) {
                        self.timers[i] = None;
                    }
                }
                Action::CloseTcpConnection => self.closed = true,
                Action::StateChanged { new, .. } => {
                    self.emit(ConnEvent::State(new));
                    if new == SessionState::Idle {
                        self.closed = true;
                    }
                }
                Action::SessionEstablished(negotiated) => {
                    self.four_octet_as = negotiated.four_octet_as;
                    if negotiated.peer_extended_message {
                        self.max_len = u16::MAX;
                    }
                    let restart_time = negotiated
                        .peer_gr_capable
                        .then_some(negotiated.peer_restart_time);
                    self.emit(ConnEvent::Established {
                        hold_time: negotiated.hold_time,
                        restart_time,
                    });
                }
                // Connection attempts are the peer task's; the rest is telemetry.
                _ => {}
            }
        }
    }

    /// Sends one message; a failed write is a lost connection.
    async fn send(&mut self, message: &Message) {
        let bytes = match encode_message_with_limit(message, self.max_len) {
            Ok(b) => b,
            Err(e) => {
                // Only locally built messages get here, and they are kept small.
                tracing::error!(error = %e, "cannot encode a BGP message");
                return;
            }
        };
        if let Err(e) = self.writer.write_all(&bytes).await {
            self.why.get_or_insert_with(|| format!("write: {e}"));
            self.closed = true;
        }
    }

    async fn lost(&mut self, why: String) {
        self.why.get_or_insert(why);
        self.handle(Event::TcpConnectionFails).await;
        self.closed = true;
    }

    async fn fire_timer(&mut self) {
        let now = Instant::now();
        if self.timers[0].is_some_and(|d| d <= now) {
            self.timers[0] = None;
            self.why.get_or_insert_with(|| "hold timer expired".into());
            self.handle(Event::HoldTimerExpires).await;
        } else if self.timers[1].is_some_and(|d| d <= now) {
            self.timers[1] = None;
            self.handle(Event::KeepaliveTimerExpires).await;
        }
    }

    /// Decodes every complete message in `buf`.
    async fn take_messages(&mut self, buf: &mut BytesMut) {
        while !self.closed {
            match peek_message_length(buf, self.max_len) {
                Ok(None) => return,
                Ok(Some(len)) if buf.len() < usize::from(len) => return,
                Ok(Some(len)) => {
                    let mut bytes = buf.split_to(usize::from(len)).freeze();
                    match decode_message(&mut bytes, self.max_len) {
                        Ok(message) => self.received(message).await,
                        Err(e) => {
                            self.why.get_or_insert_with(|| format!("bad message: {e}"));
                            self.handle(Event::DecodeError(e)).await;
                        }
                    }
                }
                Err(e) => {
                    self.why.get_or_insert_with(|| format!("bad message: {e}"));
                    self.handle(Event::DecodeError(e)).await;
                    // The stream cannot be resynchronised.
                    self.closed = true;
                }
            }
        }
    }

    async fn received(&mut self, message: Message) {
        match message {
            Message::Open(open) => {
                let id = open.bgp_identifier;
                self.handle(Event::OpenReceived(open)).await;
                if self.fsm.state() == SessionState::OpenConfirm {
                    self.emit(ConnEvent::OpenReceived(id));
                }
            }
            Message::Keepalive => self.handle(Event::KeepaliveReceived).await,
            Message::Notification(n) => {
                self.notified = true;
                self.why.get_or_insert_with(|| {
                    format!("peer sent NOTIFICATION {}/{}", n.code.as_u8(), n.subcode)
                });
                self.handle(Event::NotificationReceived(n)).await;
            }
            Message::Update(update) => self.update(&update).await,
            Message::RouteRefresh(rr) => {
                match (rr.afi(), rr.safi()) {
                    (Some(afi), Some(safi)) => {
                        self.handle(Event::RouteRefreshReceived { afi, safi }).await;
                        // Everything again (RFC 2918).
                        let all = std::mem::take(&mut self.advertised);
                        self.advertise(&all).await;
                    }
                    // A family we never negotiated: ignored (RFC 2918 §4).
                    _ => self.handle(Event::KeepaliveReceived).await,
                }
            }
            _ => {}
        }
    }

    async fn update(&mut self, update: &UpdateMessage) {
        if self.fsm.state() != SessionState::Established {
            // An UPDATE before Established: the state machine's FSM error.
            self.handle(Event::UpdateReceived).await;
            return;
        }
        if update.withdrawn_routes.is_empty()
            && update.path_attributes.is_empty()
            && update.nlri.is_empty()
        {
            self.handle(Event::UpdateReceived).await;
            self.emit(ConnEvent::EndOfRib);
            return;
        }
        // RFC 7606 revised error handling: a malformed attribute withdraws the routes of
        // its UPDATE (or is dropped) and the session stays, unless the NLRI itself cannot
        // be trusted.
        let revised = match update.parse_revised(self.four_octet_as, !self.ebgp, false, &[]) {
            Ok(r) => r,
            Err(e) => {
                self.why
                    .get_or_insert_with(|| format!("malformed UPDATE: {e}"));
                self.handle(Event::DecodeError(e)).await;
                return;
            }
        };
        let parsed = revised.update;
        let mut withdrawn: Vec<Ipv4Net> = parsed.withdrawn.iter().map(|e| net(e.prefix)).collect();
        let has_nlri = !parsed.announced.is_empty();
        let disposition = match revised
            .malformed
            .iter()
            .max_by_key(|m| severity(m.disposition))
        {
            Some(m) if m.disposition == ErrorDisposition::SessionReset => {
                let (code, subcode, data) = m.error.to_notification();
                self.why
                    .get_or_insert_with(|| format!("malformed UPDATE: {}", m.error));
                self.handle(Event::UpdateValidationError(NotificationMessage::new(
                    code, subcode, data,
                )))
                .await;
                return;
            }
            Some(m) => Some(m.disposition),
            None => {
                match validate_update_attributes(&parsed.attributes, has_nlri, has_nlri, self.ebgp)
                {
                    Ok(()) => None,
                    Err(e) if e.disposition == ErrorDisposition::SessionReset => {
                        self.why.get_or_insert_with(|| {
                            format!("invalid UPDATE, subcode {}", e.subcode)
                        });
                        let n = NotificationMessage::new(
                            NotificationCode::UpdateMessage,
                            e.subcode,
                            bytes::Bytes::from(e.data),
                        );
                        self.handle(Event::UpdateValidationError(n)).await;
                        return;
                    }
                    Err(e) => Some(e.disposition),
                }
            }
        };
        let next_hop = parsed.attributes.iter().find_map(|a| match a {
            PathAttribute::NextHop(nh) => Some(*nh),
            _ => None,
        });
        // A path that went through this AS already is a loop (RFC 4271 §9.1.2).
        let looped = parsed.attributes.iter().any(|a| match a {
            PathAttribute::AsPath(path) => path.segments.iter().any(|seg| match seg {
                AsPathSegment::AsSequence(list) | AsPathSegment::AsSet(list) => {
                    list.contains(&self.local_as)
                }
            }),
            // RFC 4456: a reflected route that comes back.
            PathAttribute::OriginatorId(id) => *id == self.router_id,
            PathAttribute::ClusterList(list) => self.cluster_id.is_some_and(|c| list.contains(&c)),
            _ => false,
        });
        let mut announced = Vec::new();
        match next_hop {
            // NEXT_HOP is mandatory with NLRI, on iBGP sessions too (RFC 4271 §5.1.3);
            // a missing one is a missing well-known attribute: treat-as-withdraw.
            Some(nh) if disposition != Some(ErrorDisposition::TreatAsWithdraw) && !looped => {
                announced = parsed
                    .announced
                    .iter()
                    .map(|e| (net(e.prefix), nh))
                    .collect();
            }
            _ => {
                if has_nlri {
                    tracing::warn!("malformed UPDATE from a peer treated as withdraw");
                }
                withdrawn.extend(parsed.announced.iter().map(|e| net(e.prefix)));
            }
        }
        self.handle(Event::UpdateReceived).await;
        if !announced.is_empty() || !withdrawn.is_empty() {
            self.emit(ConnEvent::Routes {
                announced,
                withdrawn,
                attributes: Arc::new(parsed.attributes),
            });
        }
    }

    /// Makes the peer's copy of what it is to have `want`: withdraws what went,
    /// announces what came or changed, one UPDATE per set of attributes.
    async fn advertise(&mut self, want: &Out) {
        let gone: Vec<Ipv4NlriEntry> = self
            .advertised
            .keys()
            .filter(|p| !want.contains_key(p))
            .map(|n| entry(*n))
            .collect();
        for chunk in gone.chunks(PREFIXES_PER_UPDATE) {
            self.send_update(&[], chunk, &[]).await;
        }
        let own = Arc::new(self.own_attributes());
        let mut groups: Vec<(Arc<Vec<PathAttribute>>, Vec<Ipv4NlriEntry>)> = Vec::new();
        for (prefix, attrs) in want {
            if self.advertised.get(prefix) == Some(attrs) {
                continue;
            }
            let attrs = attrs.clone().unwrap_or_else(|| own.clone());
            match groups.iter_mut().find(|(a, _)| **a == *attrs) {
                Some((_, list)) => list.push(entry(*prefix)),
                None => groups.push((attrs, vec![entry(*prefix)])),
            }
        }
        for (attrs, list) in &groups {
            for chunk in list.chunks(PREFIXES_PER_UPDATE) {
                self.send_update(chunk, &[], attrs).await;
            }
        }
        if !gone.is_empty() || !groups.is_empty() {
            self.advertised = want.clone();
            self.emit(ConnEvent::Sent(self.advertised.len()));
        }
    }

    /// The attributes of the node's own blocks on this session.
    fn own_attributes(&self) -> Vec<PathAttribute> {
        if self.ebgp {
            // To another AS: this AS in the path, no LOCAL_PREF (RFC 4271 §5.1.5).
            vec![
                PathAttribute::Origin(Origin::Igp),
                PathAttribute::AsPath(AsPath {
                    segments: vec![AsPathSegment::AsSequence(vec![self.local_as])],
                }),
                PathAttribute::NextHop(self.next_hop),
            ]
        } else {
            vec![
                PathAttribute::Origin(Origin::Igp),
                // Originated here, iBGP: an empty AS_PATH.
                PathAttribute::AsPath(AsPath { segments: vec![] }),
                PathAttribute::NextHop(self.next_hop),
                PathAttribute::LocalPref(LOCAL_PREF),
            ]
        }
    }

    async fn send_update(
        &mut self,
        announced: &[Ipv4NlriEntry],
        withdrawn: &[Ipv4NlriEntry],
        attributes: &[PathAttribute],
    ) {
        match UpdateMessage::try_build(
            announced,
            withdrawn,
            attributes,
            self.four_octet_as,
            false,
            Ipv4UnicastMode::Body,
        ) {
            Ok(update) => self.send(&Message::Update(update)).await,
            Err(e) => tracing::error!(error = %e, "cannot build an UPDATE"),
        }
    }
}

fn severity(d: ErrorDisposition) -> u8 {
    match d {
        ErrorDisposition::AttributeDiscard => 0,
        ErrorDisposition::TreatAsWithdraw => 1,
        ErrorDisposition::SessionReset => 2,
    }
}

fn net(p: Ipv4Prefix) -> Ipv4Net {
    // `Ipv4Prefix` keeps its length within 0..=32.
    Ipv4Net::new(p.addr, p.len).expect("prefix length <= 32")
}

fn entry(n: Ipv4Net) -> Ipv4NlriEntry {
    Ipv4NlriEntry {
        path_id: 0,
        prefix: Ipv4Prefix::new(n.network(), n.prefix_len()),
    }
}

#[cfg(test)]
mod tests;
