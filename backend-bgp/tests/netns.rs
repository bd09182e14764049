//! cnikit's own speakers against each other and against bad peers, in private namespaces
//! (needs root; skips loudly).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cni_core::linux::NetNs;
use cni_core::routing::CrossNodeRouting;
use common::*;
use rustbgpd_wire::{
    Afi, Capability, Message, OpenMessage, Safi, decode_message, encode_message,
    peek_message_length,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const SECS: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_speakers_mesh_and_a_removed_node_vanishes_at_once() {
    if !root("bgp full mesh") {
        return;
    }
    let net = Net::new("bgpm");
    let nodes = [
        ("a", "192.168.70.11/24", "10.244.1.0/26"),
        ("b", "192.168.70.12/24", "10.244.2.0/26"),
        ("c", "192.168.70.13/24", "10.244.3.0/26"),
    ];
    let mut speakers = Vec::new();
    let mut namespaces = Vec::new();
    for (name, cidr, block) in nodes {
        let ns = net.node(name, cidr);
        speakers.push(speaker(&ns, config(10179), &local(name, cidr, &[block])).await);
        namespaces.push(ns);
    }
    let records: Vec<_> = nodes
        .iter()
        .map(|(n, cidr, _)| record(n, &addr(cidr).to_string()))
        .collect();
    for s in &mut speakers {
        s.reconcile(&records).await.expect("reconcile");
    }
    let all = |me: usize| {
        nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != me)
            .map(|(_, (_, cidr, block))| r(block, &addr(cidr).to_string()))
            .collect::<Vec<_>>()
    };
    for (i, ns) in namespaces.iter().enumerate() {
        let want = all(i);
        wait_routes(ns, "107", SECS, |now| now == want).await;
    }
    for (i, s) in speakers.iter().enumerate() {
        let summary = s.summary();
        assert_eq!(summary.len(), 2, "{summary:?}");
        for p in &summary {
            assert_eq!(p.state, "established", "{} on {i}: {p:?}", p.name);
            assert_eq!((p.prefixes_sent, p.prefixes_received), (1, 1), "{p:?}");
            assert_eq!(p.hold_time, Some(9));
            assert!(p.established_at.is_some());
        }
        let report = s.report().expect("bgp reports");
        assert_eq!(report["asNumber"], 64512);
        assert_eq!(report["peers"].as_array().map(Vec::len), Some(2));
        assert_eq!(report["installed"].as_object().map(|o| o.len()), Some(2));
    }
    let report = speakers[0].report().unwrap();
    assert_eq!(
        report["installed"]["b"],
        serde_json::json!(["10.244.2.0/26 via 192.168.70.12"])
    );
    assert_eq!(report["routerId"], "192.168.70.11");

    // c leaves the registry (its lease expired): on a and b its session closes and its
    // route is gone when reconcile returns, not a hold time later.
    for s in &mut speakers[..2] {
        s.reconcile(&records[..2]).await.expect("reconcile");
    }
    assert_eq!(
        routes(&namespaces[0], "107"),
        vec![r("10.244.2.0/26", "192.168.70.12")]
    );
    assert_eq!(
        routes(&namespaces[1], "107"),
        vec![r("10.244.1.0/26", "192.168.70.11")]
    );
    assert!(speakers[0].summary().iter().all(|p| p.name != "c"));
    // c sees a and b close their sessions (Cease / Peer De-configured), and forgets
    // their routes.
    wait_routes(&namespaces[2], "107", SECS, |now| now.is_empty()).await;
    for p in speakers[2].summary() {
        assert_eq!(
            p.last_error.as_deref(),
            Some("peer sent NOTIFICATION 6/3"),
            "{p:?}"
        );
    }

    // a's blocks change: b follows (withdraw + announce).
    speakers[0]
        .init(&local(
            "a",
            "192.168.70.11/24",
            &["10.244.1.64/26", "10.244.11.0/26"],
        ))
        .await
        .expect("init with new blocks");
    wait_routes(&namespaces[1], "107", SECS, |now| {
        now == [
            r("10.244.1.64/26", "192.168.70.11"),
            r("10.244.11.0/26", "192.168.70.11"),
        ]
    })
    .await;

    // a stops cleanly: b drops its routes on the Cease, not after the hold time; a
    // removes what it installed.
    speakers[0].teardown().await.expect("teardown");
    assert!(routes(&namespaces[0], "107").is_empty());
    wait_routes(&namespaces[1], "107", Duration::from_secs(3), |now| {
        now.is_empty()
    })
    .await;
    speakers[0].teardown().await.expect("teardown again");
    // And comes back: a new speaker, the sessions again, the routes again.
    speakers[0]
        .init(&local("a", "192.168.70.11/24", &["10.244.1.0/26"]))
        .await
        .expect("init after teardown");
    speakers[0]
        .reconcile(&records[..2])
        .await
        .expect("reconcile");
    wait_routes(&namespaces[1], "107", SECS, |now| {
        now == [r("10.244.1.0/26", "192.168.70.11")]
    })
    .await;
    wait_routes(&namespaces[0], "107", SECS, |now| {
        now == [r("10.244.2.0/26", "192.168.70.12")]
    })
    .await;
    speakers[0].teardown().await.expect("teardown");
    for s in &mut speakers[1..] {
        s.teardown().await.expect("teardown");
    }
}

/// A raw TCP connection to `to`, from a socket made in the namespace `ns`.
async fn connect_from(ns: &str, to: SocketAddr) -> TcpStream {
    let socket = NetNs::named(ns)
        .await
        .expect("netns")
        .run(TcpSocket::new_v4)
        .await
        .expect("run in netns")
        .expect("socket");
    socket.connect(to).await.expect("connect")
}

/// Reads messages until a NOTIFICATION, then until the speaker closes the connection
/// (the session resets); the NOTIFICATION's (code, subcode). Panics if the stream ends
/// before a NOTIFICATION or stays open after it.
async fn notification(stream: &mut TcpStream) -> (u8, u8) {
    let mut buf = BytesMut::new();
    loop {
        if let Some(len) = peek_message_length(&buf, 4096).expect("well-formed")
            && buf.len() >= usize::from(len)
        {
            let mut bytes: Bytes = buf.split_to(usize::from(len)).freeze();
            if let Message::Notification(n) = decode_message(&mut bytes, 4096).expect("decode") {
                let mut rest = Vec::new();
                tokio::time::timeout(SECS, stream.read_to_end(&mut rest))
                    .await
                    .expect("the connection closed after the NOTIFICATION")
                    .expect("read to the end");
                return (n.code.as_u8(), n.subcode);
            }
            continue;
        }
        let read = tokio::time::timeout(SECS, stream.read_buf(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(read > 0, "closed without a NOTIFICATION");
    }
}

fn open(asn: u32, hold: u16) -> Vec<u8> {
    open_as(asn, hold, "192.168.71.13")
}

fn open_as(asn: u32, hold: u16, id: &str) -> Vec<u8> {
    encode_message(&Message::Open(OpenMessage {
        version: 4,
        my_as: u16::try_from(asn).unwrap_or(23456),
        hold_time: hold,
        bgp_identifier: id.parse().unwrap(),
        capabilities: vec![
            Capability::MultiProtocol {
                afi: Afi::Ipv4,
                safi: Safi::Unicast,
            },
            Capability::FourOctetAs { asn },
        ],
    }))
    .unwrap()
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_get_the_right_notification_and_good_sessions_stay() {
    if !root("bgp bad peers") {
        return;
    }
    let net = Net::new("bgpx");
    let ours = net.node("ours", "192.168.71.11/24");
    let good = net.node("good", "192.168.71.12/24");
    let bad = net.node("bad", "192.168.71.13/24");
    let stranger = net.node("stranger", "192.168.71.14/24");
    let mut a = speaker(
        &ours,
        config(179),
        &local("ours", "192.168.71.11/24", &["10.244.1.0/26"]),
    )
    .await;
    let mut b = speaker(
        &good,
        config(179),
        &local("good", "192.168.71.12/24", &["10.244.2.0/26"]),
    )
    .await;
    let peers = [
        record("ours", "192.168.71.11"),
        record("good", "192.168.71.12"),
        record("bad", "192.168.71.13"),
    ];
    a.reconcile(&peers).await.unwrap();
    b.reconcile(&peers[..2]).await.unwrap();
    wait_routes(&ours, "107", SECS, |now| {
        now == [r("10.244.2.0/26", "192.168.71.12")]
    })
    .await;
    let since = a
        .summary()
        .into_iter()
        .find(|p| p.name == "good")
        .and_then(|p| p.established_at);
    assert!(since.is_some());

    let to: SocketAddr = "192.168.71.11:179".parse().unwrap();
    // Garbage: Message Header Error / Connection Not Synchronized.
    let mut s = connect_from(&bad, to).await;
    s.write_all(&[0x55; 64]).await.unwrap();
    assert_eq!(notification(&mut s).await, (1, 1));
    // A wrong AS: OPEN Message Error / Bad Peer AS.
    let mut s = connect_from(&bad, to).await;
    s.write_all(&open(65001, 90)).await.unwrap();
    assert_eq!(notification(&mut s).await, (2, 2));
    // A hold time of 1 or 2: OPEN Message Error / Unacceptable Hold Time.
    for hold in [1, 2] {
        let mut s = connect_from(&bad, to).await;
        s.write_all(&open(64512, hold)).await.unwrap();
        assert_eq!(notification(&mut s).await, (2, 6), "hold time {hold}");
    }
    // A bad BGP identifier (zero, or ours on an iBGP session): Bad BGP Identifier.
    for id in ["0.0.0.0", "192.168.71.11"] {
        let mut s = connect_from(&bad, to).await;
        s.write_all(&open_as(64512, 90, id)).await.unwrap();
        assert_eq!(notification(&mut s).await, (2, 3), "identifier {id}");
    }
    // A message longer than 4096 bytes: Message Header Error / Bad Message Length.
    let mut s = connect_from(&bad, to).await;
    let mut oversized = vec![0xff; 16];
    oversized.extend_from_slice(&5000u16.to_be_bytes());
    oversized.push(2);
    s.write_all(&oversized).await.unwrap();
    assert_eq!(notification(&mut s).await, (1, 2));
    // An UPDATE whose NLRI cannot be parsed, on an Established session: UPDATE Message
    // Error / Invalid Network Field.
    let mut s = connect_from(&bad, to).await;
    s.write_all(&open(64512, 90)).await.unwrap();
    s.write_all(&encode_message(&Message::Keepalive).unwrap())
        .await
        .unwrap();
    // A valid UPDATE: the block lands in our kernel.
    let good_attrs: &[u8] = &[
        0x40, 1, 1, 0, // ORIGIN IGP
        0x40, 2, 0, // AS_PATH empty (iBGP)
        0x40, 3, 4, 192, 168, 71, 13, // NEXT_HOP
        0x40, 5, 4, 0, 0, 0, 100, // LOCAL_PREF
    ];
    let block_9 = Bytes::from_static(&[26, 10, 244, 9, 0]);
    let announce = |attrs: Vec<u8>| {
        encode_message(&Message::Update(rustbgpd_wire::UpdateMessage {
            withdrawn_routes: Bytes::new(),
            path_attributes: Bytes::from(attrs),
            nlri: block_9.clone(),
        }))
        .unwrap()
    };
    let both = [
        r("10.244.2.0/26", "192.168.71.12"),
        r("10.244.9.0/26", "192.168.71.13"),
    ];
    let only_good = [r("10.244.2.0/26", "192.168.71.12")];
    s.write_all(&announce(good_attrs.to_vec())).await.unwrap();
    wait_routes(&ours, "107", SECS, |now| now == both).await;
    // RFC 7606 treat-as-withdraw: the same block with an invalid ORIGIN (7), then with an
    // AS_PATH whose segment claims more ASes than it holds: the block leaves the kernel
    // and the session stays up.
    let mut bad_origin = good_attrs.to_vec();
    bad_origin[3] = 7;
    let mut bad_path = good_attrs.to_vec();
    bad_path.splice(4..7, [0x40, 2, 4, 2, 5, 0, 0]);
    for (what, attrs) in [("ORIGIN 7", bad_origin), ("a short AS_PATH", bad_path)] {
        s.write_all(&announce(attrs)).await.unwrap();
        wait_routes(&ours, "107", SECS, |now| now == only_good).await;
        let bad_peer = a.summary().into_iter().find(|p| p.name == "bad").unwrap();
        assert_eq!(bad_peer.state, "established", "after {what}: {bad_peer:?}");
        s.write_all(&announce(good_attrs.to_vec())).await.unwrap();
        wait_routes(&ours, "107", SECS, |now| now == both).await;
    }
    let nlri_33 = rustbgpd_wire::UpdateMessage {
        withdrawn_routes: Bytes::new(),
        path_attributes: Bytes::new(),
        nlri: Bytes::from_static(&[33, 10, 244, 9, 0, 0]),
    };
    s.write_all(&encode_message(&Message::Update(nlri_33)).unwrap())
        .await
        .unwrap();
    assert_eq!(notification(&mut s).await, (3, 10));
    // The reset session's block goes with it.
    wait_routes(&ours, "107", SECS, |now| now == only_good).await;
    // An address that is no peer: Cease / Connection Rejected.
    let mut s = connect_from(&stranger, to).await;
    assert_eq!(notification(&mut s).await, (6, 5));

    let bad_peer = a.summary().into_iter().find(|p| p.name == "bad").unwrap();
    assert_ne!(bad_peer.state, "established");
    assert!(bad_peer.last_error.is_some(), "{bad_peer:?}");
    // The good session never noticed.
    let good_peer = a.summary().into_iter().find(|p| p.name == "good").unwrap();
    assert_eq!(good_peer.state, "established");
    assert_eq!(good_peer.established_at, since);
    assert_eq!(
        routes(&ours, "107"),
        vec![r("10.244.2.0/26", "192.168.71.12")]
    );
    a.teardown().await.unwrap();
    b.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_peer_with_the_route_reflector_only_and_learn_every_block() {
    if !root("bgp route reflector topology") {
        return;
    }
    let net = Net::new("bgpt");
    let nodes = [
        ("a", "192.168.78.11/24", "10.244.1.0/26"),
        ("b", "192.168.78.12/24", "10.244.2.0/26"),
        ("c", "192.168.78.13/24", "10.244.3.0/26"),
    ];
    let mut speakers = Vec::new();
    let mut namespaces = Vec::new();
    let mut records = Vec::new();
    for (i, (name, cidr, block)) in nodes.into_iter().enumerate() {
        let ns = net.node(name, cidr);
        let mut config = config(10179);
        if i == 0 {
            config.route_reflector_cluster_id = Some("10.0.0.1".parse().unwrap());
        }
        let bgp = speaker(&ns, config, &local(name, cidr, &[block])).await;
        let mut rec = record(name, &addr(cidr).to_string());
        rec.backend = bgp.node_data();
        records.push(rec);
        speakers.push(bgp);
        namespaces.push(ns);
    }
    for s in &mut speakers {
        s.reconcile(&records).await.unwrap();
    }
    // b and c peer with a only, and still have each other's block, via each other.
    wait_routes(&namespaces[1], "107", SECS, |now| {
        now == [
            r("10.244.1.0/26", "192.168.78.11"),
            r("10.244.3.0/26", "192.168.78.13"),
        ]
    })
    .await;
    wait_routes(&namespaces[2], "107", SECS, |now| {
        now == [
            r("10.244.1.0/26", "192.168.78.11"),
            r("10.244.2.0/26", "192.168.78.12"),
        ]
    })
    .await;
    wait_routes(&namespaces[0], "107", SECS, |now| now.len() == 2).await;
    let names =
        |i: usize| -> Vec<String> { speakers[i].summary().into_iter().map(|p| p.name).collect() };
    assert_eq!(names(0), ["b", "c"]);
    assert_eq!(names(1), ["a"]);
    assert_eq!(names(2), ["a"]);
    // c leaves: b loses its block through the reflector.
    for s in &mut speakers[..2] {
        s.reconcile(&records[..2]).await.unwrap();
    }
    wait_routes(&namespaces[1], "107", SECS, |now| {
        now == [r("10.244.1.0/26", "192.168.78.11")]
    })
    .await;
    for s in &mut speakers {
        s.teardown().await.unwrap();
    }
}

/// `bgp.ipip` on the native speaker: the mode makes the IPIP device and the learned routes
/// go through it on-link (`BLOCK via PEER dev cnikit.ipip onlink proto 107`); the tunnel
/// addresses ping each other through it; teardown removes device and routes. In the VM
/// when this kernel has no ipip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ipip_learned_routes_go_through_the_tunnel() {
    let test = "with_ipip_learned_routes_go_through_the_tunnel";
    if !root(test) || !testkit::vm::here_or_in_vm(test, "ipip") {
        return;
    }
    let net = Net::new("bgpi");
    let config = backend_bgp::Config {
        ipip: Some(backend_bgp::IpipConfig {
            device: "cnikit.ipip".into(),
            cross_subnet: false,
        }),
        ..config(10179)
    };
    let nodes = [
        ("a", "192.168.83.11/24", "10.244.1.0/26", "10.244.1.1"),
        ("b", "192.168.83.12/24", "10.244.2.0/26", "10.244.2.1"),
    ];
    let records: Vec<_> = nodes
        .iter()
        .map(|(n, cidr, _, _)| record(n, &addr(cidr).to_string()))
        .collect();
    let mut speakers = Vec::new();
    let mut namespaces = Vec::new();
    for (name, cidr, block, tunnel) in nodes {
        let ns = net.node(name, cidr);
        let mut local = local(name, cidr, &[block]);
        local.tunnel_address = Some(tunnel.parse().unwrap());
        let mut bgp = speaker(&ns, config.clone(), &local).await;
        assert_eq!(bgp.mtu_overhead(), 20);
        assert!(bgp.needs_tunnel_address());
        bgp.reconcile(&records).await.expect("reconcile");
        speakers.push(bgp);
        namespaces.push(ns);
    }
    for (i, ns) in namespaces.iter().enumerate() {
        let (_, peer_cidr, peer_block, _) = nodes[1 - i];
        let via = addr(peer_cidr).to_string();
        wait_routes(ns, "107", SECS, |now| now == [r(peer_block, &via)]).await;
        let route = &testkit::ip_json(ns, &["route", "show", "proto", "107"])[0];
        assert_eq!(route["dev"], "cnikit.ipip", "{route}");
        assert!(
            route["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "onlink")),
            "{route}"
        );
    }
    let ping = std::process::Command::new("ip")
        .args(["netns", "exec", &namespaces[0]])
        .args(["ping", "-c1", "-W2", "-I", "10.244.1.1", "10.244.2.1"])
        .output()
        .expect("ping");
    assert!(
        ping.status.success(),
        "a's tunnel address reaches b's through the tunnel: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    for (bgp, ns) in speakers.iter_mut().zip(&namespaces) {
        bgp.teardown().await.expect("teardown");
        assert!(routes(ns, "107").is_empty());
        assert!(
            testkit::ip_json(ns, &["link", "show"])
                .iter()
                .all(|l| l["ifname"] != "cnikit.ipip"),
            "the device is gone from {ns}"
        );
    }
}
