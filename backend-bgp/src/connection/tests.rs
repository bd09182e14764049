//! The connection over an in-memory pipe, with the test playing the peer; time paused.

use std::time::Duration;

use bytes::Bytes;
use rustbgpd_fsm::PeerConfig;
use rustbgpd_wire::{Afi, Capability, OpenMessage, Safi, encode_message};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;

const US: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const THEM: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

struct Harness {
    peer: DuplexStream,
    buf: BytesMut,
    events: mpsc::UnboundedReceiver<(u64, ConnEvent)>,
    ctl: mpsc::UnboundedSender<Ctl>,
    out: watch::Sender<Out>,
}

fn start(outgoing: bool) -> Harness {
    start_with(outgoing, 64512)
}

/// A connection to a peer in AS `remote_as` (eBGP when it is not 64512).
fn start_with(outgoing: bool, remote_as: u32) -> Harness {
    let (ours, peer) = tokio::io::duplex(64 * 1024);
    let mut config = PeerConfig::new(64512, remote_as, US);
    config.hold_time = 90;
    config.families = vec![(Afi::Ipv4, Safi::Unicast)];
    let params = ConnParams {
        id: 7,
        peer: config,
        next_hop: US,
        outgoing,
        cluster_id: None,
    };
    let (ctl, ctl_rx) = mpsc::unbounded_channel();
    let (events_tx, events) = mpsc::unbounded_channel();
    let (out, out_rx) = watch::channel(own(&["10.244.1.0/26"]));
    tokio::spawn(run(ours, params, ctl_rx, out_rx, events_tx));
    Harness {
        peer,
        buf: BytesMut::new(),
        events,
        ctl,
        out,
    }
}

/// The node's own blocks as an Adj-RIB-Out.
fn own(blocks: &[&str]) -> Out {
    blocks.iter().map(|b| (net(b), None)).collect()
}

fn open(asn: u32, hold: u16) -> Message {
    Message::Open(OpenMessage {
        version: 4,
        my_as: u16::try_from(asn).unwrap_or(23456),
        hold_time: hold,
        bgp_identifier: THEM,
        capabilities: vec![
            Capability::MultiProtocol {
                afi: Afi::Ipv4,
                safi: Safi::Unicast,
            },
            Capability::FourOctetAs { asn },
        ],
    })
}

fn update(announced: &[&str], withdrawn: &[&str], nh: Ipv4Addr) -> Message {
    let entries = |list: &[&str]| list.iter().map(|s| entry(net(s))).collect::<Vec<_>>();
    let attributes = if announced.is_empty() {
        vec![]
    } else {
        vec![
            PathAttribute::Origin(Origin::Igp),
            PathAttribute::AsPath(AsPath { segments: vec![] }),
            PathAttribute::NextHop(nh),
            PathAttribute::LocalPref(100),
        ]
    };
    Message::Update(UpdateMessage::build(
        &entries(announced),
        &entries(withdrawn),
        &attributes,
        true,
        false,
        Ipv4UnicastMode::Body,
    ))
}

impl Harness {
    async fn send(&mut self, m: &Message) {
        self.peer
            .write_all(&encode_message(m).unwrap())
            .await
            .unwrap();
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.peer.write_all(bytes).await.unwrap();
    }

    /// The next message from the speaker; `None` when it closed the stream.
    async fn recv(&mut self) -> Option<Message> {
        loop {
            if let Some(len) = peek_message_length(&self.buf, u16::MAX).unwrap()
                && self.buf.len() >= usize::from(len)
            {
                let mut bytes = self.buf.split_to(usize::from(len)).freeze();
                return Some(decode_message(&mut bytes, u16::MAX).unwrap());
            }
            if self.peer.read_buf(&mut self.buf).await.unwrap() == 0 {
                return None;
            }
        }
    }

    /// The next routes the connection reports: (announced, withdrawn).
    async fn routes(&mut self) -> (Vec<(Ipv4Net, Ipv4Addr)>, Vec<Ipv4Net>) {
        match self
            .event_where(|e| matches!(e, ConnEvent::Routes { .. }))
            .await
        {
            ConnEvent::Routes {
                announced,
                withdrawn,
                ..
            } => (announced, withdrawn),
            _ => unreachable!("only routes are taken"),
        }
    }

    async fn event(&mut self) -> ConnEvent {
        self.events.recv().await.expect("an event").1
    }

    /// Events until `pred` matches one, which it returns.
    async fn event_where(&mut self, pred: impl Fn(&ConnEvent) -> bool) -> ConnEvent {
        loop {
            let e = self.event().await;
            if pred(&e) {
                return e;
            }
        }
    }

    async fn notification(&mut self) -> (u8, u8) {
        loop {
            match self.recv().await {
                Some(Message::Notification(n)) => return (n.code.as_u8(), n.subcode),
                Some(_) => continue,
                None => panic!("closed without a NOTIFICATION"),
            }
        }
    }

    /// Drives the session to Established with a hold time of `hold`; returns the
    /// UPDATE the speaker sends first.
    async fn establish(&mut self, hold: u16) -> UpdateMessage {
        let Some(Message::Open(ours)) = self.recv().await else {
            panic!("expected our OPEN first");
        };
        assert_eq!(ours.bgp_identifier, US);
        assert_eq!(ours.four_byte_as(), 64512);
        assert_eq!(ours.hold_time, 90);
        assert!(ours.capabilities.contains(&Capability::MultiProtocol {
            afi: Afi::Ipv4,
            safi: Safi::Unicast
        }));
        self.send(&open(64512, hold)).await;
        self.send(&Message::Keepalive).await;
        assert_eq!(self.recv().await, Some(Message::Keepalive));
        assert_eq!(
            self.event_where(|e| matches!(e, ConnEvent::OpenReceived(_)))
                .await,
            ConnEvent::OpenReceived(THEM)
        );
        assert_eq!(
            self.event_where(|e| matches!(e, ConnEvent::Established { .. }))
                .await,
            ConnEvent::Established {
                hold_time: hold,
                restart_time: None
            }
        );
        let first = loop {
            match self.recv().await {
                Some(Message::Update(u)) => break u,
                Some(Message::Keepalive) => continue,
                other => panic!("expected an UPDATE, got {other:?}"),
            }
        };
        // Then End-of-RIB: an empty UPDATE.
        match self.recv().await {
            Some(Message::Update(eor)) => {
                assert!(eor.withdrawn_routes.is_empty() && eor.path_attributes.is_empty());
                assert!(eor.nlri.is_empty());
            }
            other => panic!("expected End-of-RIB, got {other:?}"),
        }
        first
    }
}

fn announced(u: &UpdateMessage) -> (Vec<Ipv4Net>, Vec<Ipv4Net>, Vec<PathAttribute>) {
    let p = u.parse(true, false, &[]).unwrap();
    (
        p.announced.iter().map(|e| super::net(e.prefix)).collect(),
        p.withdrawn.iter().map(|e| super::net(e.prefix)).collect(),
        p.attributes,
    )
}

#[tokio::test(start_paused = true)]
async fn establishes_announces_and_learns() {
    let mut h = start(true);
    let first = h.establish(9).await;
    let (ann, wd, attrs) = announced(&first);
    assert_eq!(ann, vec![net("10.244.1.0/26")]);
    assert!(wd.is_empty());
    assert!(attrs.contains(&PathAttribute::NextHop(US)));
    assert!(attrs.contains(&PathAttribute::LocalPref(100)));
    assert!(attrs.contains(&PathAttribute::Origin(Origin::Igp)));
    assert!(attrs.contains(&PathAttribute::AsPath(AsPath { segments: vec![] })));
    assert_eq!(
        h.event_where(|e| matches!(e, ConnEvent::Sent(_))).await,
        ConnEvent::Sent(1)
    );

    h.send(&update(&["10.244.2.0/26", "10.244.3.0/26"], &[], THEM))
        .await;
    assert_eq!(
        h.routes().await,
        (
            vec![(net("10.244.2.0/26"), THEM), (net("10.244.3.0/26"), THEM)],
            vec![]
        )
    );
    h.send(&Message::Update(UpdateMessage {
        withdrawn_routes: Bytes::new(),
        path_attributes: Bytes::new(),
        nlri: Bytes::new(),
    }))
    .await;
    assert_eq!(h.event().await, ConnEvent::EndOfRib);
    h.send(&update(&[], &["10.244.3.0/26"], THEM)).await;
    assert_eq!(h.routes().await, (vec![], vec![net("10.244.3.0/26")]));

    // The node's blocks change: one withdrawal, one announcement.
    h.out.send(own(&["10.244.9.0/26"])).unwrap();
    let (_, wd, _) = announced(&match h.recv().await {
        Some(Message::Update(u)) => u,
        other => panic!("{other:?}"),
    });
    assert_eq!(wd, vec![net("10.244.1.0/26")]);
    let (ann, _, _) = announced(&match h.recv().await {
        Some(Message::Update(u)) => u,
        other => panic!("{other:?}"),
    });
    assert_eq!(ann, vec![net("10.244.9.0/26")]);

    // Administrative stop: every block withdrawn (a peer keeping routes across a
    // NOTIFICATION must not keep these), Cease / Administrative Shutdown, then the stream
    // closes.
    h.ctl.send(Ctl::Stop).unwrap();
    let (ann, wd, _) = announced(&match h.recv().await {
        Some(Message::Update(u)) => u,
        other => panic!("{other:?}"),
    });
    assert!(ann.is_empty());
    assert_eq!(wd, vec![net("10.244.9.0/26")]);
    assert_eq!(h.notification().await, (6, 2));
    assert_eq!(h.recv().await, None);
    assert_eq!(
        h.event_where(|e| matches!(e, ConnEvent::Down { .. })).await,
        ConnEvent::Down {
            why: Some("sent NOTIFICATION 6/2".into()),
            notified: true
        }
    );
}

#[tokio::test(start_paused = true)]
async fn keepalives_flow_and_a_silent_peer_expires() {
    let mut h = start(false);
    h.establish(9).await;
    // Keepalive every hold/3 = 3 s, and nothing else while the peer answers.
    for _ in 0..4 {
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(h.recv().await, Some(Message::Keepalive));
        h.send(&Message::Keepalive).await;
    }
    // Then silence: the hold timer (9 s) fires: NOTIFICATION Hold Timer Expired.
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(h.notification().await, (4, 0));
    assert_eq!(
        h.event_where(|e| matches!(e, ConnEvent::Down { .. })).await,
        ConnEvent::Down {
            why: Some("hold timer expired".into()),
            notified: true
        }
    );
}

#[tokio::test(start_paused = true)]
async fn garbage_is_a_header_error() {
    let mut h = start(false);
    assert!(matches!(h.recv().await, Some(Message::Open(_))));
    h.send_raw(&[0x42; 40]).await;
    assert_eq!(
        h.notification().await,
        (1, 1),
        "Connection Not Synchronized"
    );
    assert_eq!(h.recv().await, None);
    assert!(matches!(
        h.event_where(|e| matches!(e, ConnEvent::Down { .. })).await,
        ConnEvent::Down { why: Some(why), notified: true } if why.contains("marker")
    ));
}

#[tokio::test(start_paused = true)]
async fn a_wrong_as_or_hold_time_is_an_open_error() {
    for (asn, hold, subcode) in [(65001, 90, 2), (64512, 1, 6), (64512, 2, 6)] {
        let mut h = start(false);
        assert!(matches!(h.recv().await, Some(Message::Open(_))));
        h.send(&open(asn, hold)).await;
        assert_eq!(h.notification().await, (2, subcode), "AS {asn} hold {hold}");
        assert_eq!(h.recv().await, None);
        assert!(
            !std::iter::from_fn(|| h.events.try_recv().ok())
                .any(|(_, e)| matches!(e, ConnEvent::Established { .. }))
        );
    }
}

#[tokio::test(start_paused = true)]
async fn malformed_updates_withdraw_or_reset_as_rfc_7606_says() {
    let mut h = start(true);
    h.establish(90).await;
    h.send(&update(&["10.244.2.0/26"], &[], THEM)).await;
    h.event_where(|e| matches!(e, ConnEvent::Routes { .. }))
        .await;
    // ORIGIN 7 (invalid): RFC 7606 treat-as-withdraw, the session stays.
    let mut attrs = Vec::new();
    attrs.extend_from_slice(&[0x40, 1, 1, 7]); // ORIGIN 7
    attrs.extend_from_slice(&[0x40, 2, 0]); // AS_PATH empty
    attrs.extend_from_slice(&[0x40, 3, 4, 10, 0, 0, 2]); // NEXT_HOP
    attrs.extend_from_slice(&[0x40, 5, 4, 0, 0, 0, 100]); // LOCAL_PREF
    let bad = UpdateMessage {
        withdrawn_routes: Bytes::new(),
        path_attributes: Bytes::from(attrs),
        nlri: Bytes::from_static(&[26, 10, 244, 2, 0]),
    };
    h.send(&Message::Update(bad)).await;
    assert_eq!(h.routes().await, (vec![], vec![net("10.244.2.0/26")]));
    // No NEXT_HOP with NLRI: a missing well-known attribute, treat-as-withdraw too.
    h.send(&update(&["10.244.4.0/26"], &[], THEM)).await;
    h.event_where(|e| matches!(e, ConnEvent::Routes { .. }))
        .await;
    let mut attrs = Vec::new();
    attrs.extend_from_slice(&[0x40, 1, 1, 0]);
    attrs.extend_from_slice(&[0x40, 2, 0]);
    let bad = UpdateMessage {
        withdrawn_routes: Bytes::new(),
        path_attributes: Bytes::from(attrs),
        nlri: Bytes::from_static(&[26, 10, 244, 4, 0]),
    };
    h.send(&Message::Update(bad)).await;
    assert_eq!(h.routes().await, (vec![], vec![net("10.244.4.0/26")]));
    // An NLRI that cannot be parsed (prefix length 33): Invalid Network Field, reset.
    let bad = UpdateMessage {
        withdrawn_routes: Bytes::new(),
        path_attributes: Bytes::new(),
        nlri: Bytes::from_static(&[33, 10, 244, 4, 0, 0]),
    };
    h.send(&Message::Update(bad)).await;
    assert_eq!(h.notification().await, (3, 10), "Invalid Network Field");
    assert!(matches!(
        h.event_where(|e| matches!(e, ConnEvent::Down { .. })).await,
        ConnEvent::Down {
            why: Some(_),
            notified: true
        }
    ));
}

#[tokio::test(start_paused = true)]
async fn a_lost_collision_sends_cease_7() {
    let mut h = start(true);
    assert!(matches!(h.recv().await, Some(Message::Open(_))));
    h.send(&open(64512, 90)).await;
    assert_eq!(h.recv().await, Some(Message::Keepalive));
    h.ctl
        .send(Ctl::Cease(
            rustbgpd_wire::notification::cease_subcode::CONNECTION_COLLISION_RESOLUTION,
        ))
        .unwrap();
    assert_eq!(h.notification().await, (6, 7));
    assert_eq!(h.recv().await, None);
}

#[tokio::test(start_paused = true)]
async fn the_peer_closing_ends_the_connection() {
    let mut h = start(true);
    h.establish(90).await;
    h.send(&update(&["10.244.2.0/26"], &[], THEM)).await;
    h.event_where(|e| matches!(e, ConnEvent::Routes { .. }))
        .await;
    h.peer.shutdown().await.unwrap();
    let (_, stub) = tokio::io::duplex(1);
    drop(std::mem::replace(&mut h.peer, stub));
    assert_eq!(
        h.event_where(|e| matches!(e, ConnEvent::Down { .. })).await,
        ConnEvent::Down {
            why: Some("connection closed by the peer".into()),
            notified: false
        }
    );
}

#[tokio::test(start_paused = true)]
async fn ebgp_prepends_our_as_and_ignores_paths_through_it() {
    let mut h = start_with(true, 65000);
    let Some(Message::Open(_)) = h.recv().await else {
        panic!("expected our OPEN");
    };
    h.send(&open(65000, 90)).await;
    h.send(&Message::Keepalive).await;
    let first = loop {
        match h.recv().await {
            Some(Message::Update(u)) => break u,
            Some(_) => continue,
            None => panic!("closed"),
        }
    };
    let (ann, _, attrs) = announced(&first);
    assert_eq!(ann, vec![net("10.244.1.0/26")]);
    assert!(attrs.contains(&PathAttribute::AsPath(AsPath {
        segments: vec![AsPathSegment::AsSequence(vec![64512])]
    })));
    assert!(
        !attrs
            .iter()
            .any(|a| matches!(a, PathAttribute::LocalPref(_)))
    );

    let ebgp_update = |prefix: &str, path: Vec<u32>| {
        Message::Update(UpdateMessage::build(
            &[entry(net(prefix))],
            &[],
            &[
                PathAttribute::Origin(Origin::Igp),
                PathAttribute::AsPath(AsPath {
                    segments: vec![AsPathSegment::AsSequence(path)],
                }),
                PathAttribute::NextHop(THEM),
            ],
            true,
            false,
            Ipv4UnicastMode::Body,
        ))
    };
    h.send(&ebgp_update("10.99.0.0/16", vec![65000])).await;
    assert_eq!(
        h.routes().await,
        (vec![(net("10.99.0.0/16"), THEM)], vec![])
    );
    // Our own AS in the path: a loop, never installed.
    h.send(&ebgp_update("10.244.7.0/26", vec![65000, 64512]))
        .await;
    assert_eq!(h.routes().await, (vec![], vec![net("10.244.7.0/26")]));
}
