//! cnikit's speaker against Debian's bird2 and gobgpd, each in its own test namespace
//! (needs root and the `bird2` and `gobgpd` packages; skips loudly).
//!
//! The daemons run with a configuration file and control socket in a temporary directory
//! and are ended by PID.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use backend_bgp::Config;
use cni_core::routing::CrossNodeRouting;
use common::*;

const SECS: Duration = Duration::from_secs(20);

fn tools(test: &str, tools: &[(&str, &str)]) -> bool {
    if !root(test) {
        return false;
    }
    for (tool, package) in tools {
        if !testkit::on_path(tool) {
            testkit::skip(
                test,
                format_args!("needs {tool} (Debian package {package})"),
            );
            return false;
        }
    }
    true
}

/// Runs `args` in `ns`; its stdout, or `None` when it fails.
fn try_in(ns: &str, args: &[String]) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `args` in `ns` until its output satisfies `want`; panics with the last output.
async fn wait_output(ns: &str, args: &[String], within: Duration, want: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let out = try_in(ns, args).unwrap_or_default();
        if want(&out) {
            return;
        }
        if Instant::now() > deadline {
            panic!("{args:?} in {ns} never matched; last output:\n{out}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `birdc -s SOCK ARGS…`.
/// The bird engine with `config` in `ns` (BIRD's files under `run_dir`), started for `local`.
async fn bird_engine(
    ns: &str,
    run_dir: &Path,
    config: Config,
    local: &cni_core::routing::LocalNode,
) -> backend_bgp::Bird {
    let mut bird = backend_bgp::Bird::open(
        Config {
            engine: backend_bgp::Engine::Bird,
            ..config
        },
        &testkit::netns_path(ns),
        run_dir,
    )
    .await
    .expect("open the bird engine");
    bird.init(local).await.expect("bird starts");
    bird
}

fn birdc(sock: &str, args: &[&str]) -> Vec<String> {
    ["birdc", "-s", sock]
        .iter()
        .chain(args)
        .map(|s| s.to_string())
        .collect()
}

/// `gobgp ARGS…` against the gobgpd of the namespace it runs in.
fn gobgp(args: &[&str]) -> Vec<String> {
    ["gobgp", "-u", "127.0.0.1", "-p", "50051"]
        .iter()
        .chain(args)
        .map(|s| s.to_string())
        .collect()
}

/// Starts gobgpd in `ns` with the configuration `toml` (written to `dir`), and has it
/// announce `prefix` (with `next_hop` when given) once its API answers.
async fn gobgpd(ns: &str, dir: &Path, toml: &str, prefix: &str, next_hop: Option<&str>) -> Daemon {
    let conf = dir.join("gobgpd.toml");
    std::fs::write(&conf, toml).expect("write gobgpd.toml");
    let daemon = Daemon::spawn(
        "gobgpd",
        ns,
        &[
            "gobgpd",
            "-f",
            conf.to_str().unwrap(),
            "-t",
            "toml",
            "-p",
            "--api-hosts",
            "127.0.0.1:50051",
            "--pprof-disable",
        ],
        &dir.join("gobgpd.log"),
    );
    let mut add = vec!["global", "rib", "add", "-a", "ipv4", prefix];
    if let Some(nh) = next_hop {
        add.extend(["nexthop", nh]);
    }
    let add = gobgp(&add);
    let deadline = Instant::now() + SECS;
    while try_in(ns, &add).is_none() {
        assert!(Instant::now() < deadline, "gobgpd never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon
}

/// bird's configuration: router `bird` peering with `ours` over iBGP, announcing
/// 10.244.20.0/26 (protocol `pods`), learned routes into its kernel (proto bird).
fn bird_conf(dir: &Path, ours: &str, bird: &str, graceful: &str) -> std::path::PathBuf {
    let conf = dir.join("bird.conf");
    std::fs::write(
        &conf,
        format!(
            r#"
router id {bird};
protocol device {{ scan time 1; }}
protocol kernel {{
    ipv4 {{ import none; export where source = RTS_BGP; }};
}}
protocol static pods {{
    ipv4;
    route 10.244.20.0/26 blackhole;
}}
protocol bgp ours {{
    local {bird} as 64512;
    neighbor {ours} as 64512;
    # iBGP next hops on the shared segment: on-link (DESIGN.md).
    direct;
    hold time 9;
    connect delay time 1;
    connect retry time 1;
    error wait time 1, 2;
    {graceful}
    ipv4 {{ gateway direct; import all; export where proto = "pods"; next hop self; }};
}}
"#
        ),
    )
    .expect("write bird.conf");
    conf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_bird2_routes_go_both_ways_and_are_withdrawn() {
    if !tools(
        "bgp interop with bird2",
        &[("bird", "bird2"), ("birdc", "bird2")],
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::new("bgpb");
    let ours = net.node("ours", "192.168.72.11/24");
    let peer = net.node("bird", "192.168.72.12/24");
    let conf = bird_conf(dir.path(), "192.168.72.11", "192.168.72.12", "");
    let sock = dir.path().join("bird.ctl");
    let (conf, sock) = (conf.to_str().unwrap(), sock.to_str().unwrap());
    let _bird = Daemon::spawn(
        "bird",
        &peer,
        &["bird", "-f", "-c", conf, "-s", sock],
        &dir.path().join("bird.log"),
    );

    let mut bgp = speaker(
        &ours,
        config(179),
        &local("ours", "192.168.72.11/24", &["10.244.1.0/26"]),
    )
    .await;
    bgp.reconcile(&[record("bird", "192.168.72.12")])
        .await
        .unwrap();

    // Established; bird's block in our kernel, ours in bird's.
    wait_routes(&ours, "107", SECS, |now| {
        now == [r("10.244.20.0/26", "192.168.72.12")]
    })
    .await;
    wait_routes(&peer, "bird", SECS, |now| {
        now == [r("10.244.1.0/26", "192.168.72.11")]
    })
    .await;
    wait_output(
        &peer,
        &birdc(sock, &["show", "protocols", "ours"]),
        SECS,
        |o| o.contains("Established"),
    )
    .await;
    let summary = bgp.summary();
    assert_eq!(summary[0].state, "established", "{summary:?}");
    assert_eq!(
        (summary[0].prefixes_sent, summary[0].prefixes_received),
        (1, 1)
    );

    // Our block changes: bird follows.
    bgp.init(&local("ours", "192.168.72.11/24", &["10.244.1.64/26"]))
        .await
        .unwrap();
    wait_routes(&peer, "bird", SECS, |now| {
        now == [r("10.244.1.64/26", "192.168.72.11")]
    })
    .await;

    // bird withdraws its block: it leaves our kernel; and comes back.
    try_in(&peer, &birdc(sock, &["disable", "pods"])).expect("birdc disable");
    wait_routes(&ours, "107", SECS, |now| now.is_empty()).await;
    try_in(&peer, &birdc(sock, &["enable", "pods"])).expect("birdc enable");
    wait_routes(&ours, "107", SECS, |now| {
        now == [r("10.244.20.0/26", "192.168.72.12")]
    })
    .await;

    // We stop cleanly: bird drops our route at once (Cease), long before its hold time.
    bgp.teardown().await.unwrap();
    assert!(routes(&ours, "107").is_empty());
    wait_routes(&peer, "bird", Duration::from_secs(3), |now| now.is_empty()).await;
    wait_output(
        &peer,
        &birdc(sock, &["show", "protocols", "ours"]),
        SECS,
        |o| o.contains("ours") && !o.contains("Established"),
    )
    .await;
}

/// gobgpd's configuration: router `router_id` in AS `asn`, one neighbour per
/// `neighbors` entry (address, whether it is a route-reflector client of this router),
/// all in AS 64512, with short timers.
fn gobgp_conf(asn: u32, router_id: &str, neighbors: &[(&str, bool)]) -> String {
    let mut toml = format!(
        r#"
[global.config]
  as = {asn}
  router-id = "{router_id}"
  port = 179
  local-address-list = ["{router_id}"]
"#
    );
    for (address, client) in neighbors {
        toml.push_str(&format!(
            r#"
[[neighbors]]
  [neighbors.config]
    neighbor-address = "{address}"
    peer-as = 64512
  [neighbors.timers.config]
    connect-retry = 1
    hold-time = 9
    keepalive-interval = 3
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
"#
        ));
        if *client {
            toml.push_str(&format!(
                r#"  [neighbors.route-reflector.config]
    route-reflector-client = true
    route-reflector-cluster-id = "{router_id}"
"#
            ));
        }
    }
    toml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_gobgpd_routes_go_both_ways_and_are_withdrawn() {
    if !tools(
        "bgp interop with gobgpd",
        &[("gobgpd", "gobgpd"), ("gobgp", "gobgpd")],
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::new("bgpg");
    let ours = net.node("ours", "192.168.73.11/24");
    let peer = net.node("gobgp", "192.168.73.12/24");
    // A route injected into gobgpd (it has no kernel of its own to take it from).
    let _gobgpd = gobgpd(
        &peer,
        dir.path(),
        &gobgp_conf(64512, "192.168.73.12", &[("192.168.73.11", false)]),
        "10.244.30.0/26",
        Some("192.168.73.12"),
    )
    .await;

    let mut bgp = speaker(
        &ours,
        config(179),
        &local("ours", "192.168.73.11/24", &["10.244.1.0/26"]),
    )
    .await;
    bgp.reconcile(&[record("gobgp", "192.168.73.12")])
        .await
        .unwrap();

    let rib = gobgp(&["global", "rib", "-a", "ipv4"]);
    wait_routes(&ours, "107", SECS, |now| {
        now == [r("10.244.30.0/26", "192.168.73.12")]
    })
    .await;
    wait_output(&peer, &gobgp(&["neighbor"]), SECS, |o| o.contains("Establ")).await;
    wait_output(&peer, &rib, SECS, |o| {
        o.lines()
            .any(|l| l.contains("10.244.1.0/26") && l.contains("192.168.73.11"))
    })
    .await;
    assert!(established(&bgp, "gobgp"));

    // Our block changes: gobgpd follows.
    bgp.init(&local("ours", "192.168.73.11/24", &["10.244.1.64/26"]))
        .await
        .unwrap();
    wait_output(&peer, &rib, SECS, |o| {
        o.contains("10.244.1.64/26") && !o.contains("10.244.1.0/26")
    })
    .await;

    // gobgpd withdraws its route: it leaves our kernel.
    try_in(
        &peer,
        &gobgp(&["global", "rib", "del", "-a", "ipv4", "10.244.30.0/26"]),
    )
    .expect("gobgp del");
    wait_routes(&ours, "107", SECS, |now| now.is_empty()).await;
    assert_eq!(bgp.summary()[0].prefixes_received, 0);

    // We stop cleanly: gobgpd drops our route at once.
    bgp.teardown().await.unwrap();
    wait_output(&peer, &rib, Duration::from_secs(3), |o| {
        !o.contains("10.244.1.64/26")
    })
    .await;
    wait_output(&peer, &gobgp(&["neighbor"]), SECS, |o| {
        o.contains("192.168.73.11") && !o.contains("Establ")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_with_bird2_both_ways() {
    if !tools(
        "bgp graceful restart with bird2",
        &[("bird", "bird2"), ("birdc", "bird2")],
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::new("bgpr");
    let ours = net.node("ours", "192.168.75.11/24");
    let peer = net.node("bird", "192.168.75.12/24");
    let graceful = "graceful restart on; graceful restart time 30;";
    let conf = bird_conf(dir.path(), "192.168.75.11", "192.168.75.12", graceful);
    let sock = dir.path().join("bird.ctl");
    let (conf, sock) = (conf.to_str().unwrap(), sock.to_str().unwrap());
    let bird_args = ["bird", "-f", "-c", conf, "-s", sock];
    let mut bird = Some(Daemon::spawn(
        "bird",
        &peer,
        &bird_args,
        &dir.path().join("bird.log"),
    ));
    let config = || Config {
        restart_time: 30,
        ..config(179)
    };
    let node = local("ours", "192.168.75.11/24", &["10.244.1.0/26"]);
    let peers = [record("bird", "192.168.75.12")];
    let mut bgp = speaker(&ours, config(), &node).await;
    bgp.reconcile(&peers).await.unwrap();
    let birds_route = [r("10.244.20.0/26", "192.168.75.12")];
    let our_route = [r("10.244.1.0/26", "192.168.75.11")];
    wait_routes(&ours, "107", SECS, |now| now == birds_route).await;
    wait_routes(&peer, "bird", SECS, |now| now == our_route).await;

    // bird dies (no NOTIFICATION): its route stays in our kernel while it restarts, and
    // is confirmed by its new session.
    drop(bird.take());
    wait_for("the session to drop", SECS, || !established(&bgp, "bird")).await;
    assert_eq!(
        routes(&ours, "107"),
        birds_route,
        "kept while bird restarts"
    );
    assert_eq!(bgp.summary()[0].prefixes_received, 1);
    bird = Some(Daemon::spawn(
        "bird",
        &peer,
        &bird_args,
        &dir.path().join("bird2.log"),
    ));
    wait_for("the session back", SECS, || established(&bgp, "bird")).await;
    assert_eq!(routes(&ours, "107"), birds_route);

    // Our speaker restarts (dropped without teardown, as an agent that keeps its routes on
    // exit): bird keeps our route meanwhile, we keep bird's, and both stay once we are
    // back.
    wait_routes(&peer, "bird", SECS, |now| now == our_route).await;
    drop(bgp);
    wait_output(
        &peer,
        &birdc(sock, &["show", "protocols", "ours"]),
        SECS,
        |o| !o.contains("Established"),
    )
    .await;
    assert_eq!(
        routes(&peer, "bird"),
        our_route,
        "bird keeps our route while we restart"
    );
    assert_eq!(routes(&ours, "107"), birds_route, "we keep bird's");
    // Back with another block: the new session's End-of-RIB makes bird drop the old one.
    let moved = local("ours", "192.168.75.11/24", &["10.244.1.64/26"]);
    let mut bgp = speaker(&ours, config(), &moved).await;
    bgp.reconcile(&peers).await.unwrap();
    assert_eq!(
        routes(&ours, "107"),
        birds_route,
        "kept until bird has spoken"
    );
    wait_for("the session back", SECS, || established(&bgp, "bird")).await;
    wait_routes(&peer, "bird", SECS, |now| {
        now == [r("10.244.1.64/26", "192.168.75.11")]
    })
    .await;
    assert_eq!(routes(&ours, "107"), birds_route);

    bgp.teardown().await.unwrap();
    wait_routes(&peer, "bird", Duration::from_secs(3), |now| now.is_empty()).await;
    drop(bird);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gobgpd_top_of_rack_router_peers_over_ebgp() {
    if !tools(
        "bgp eBGP with gobgpd",
        &[("gobgpd", "gobgpd"), ("gobgp", "gobgpd")],
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::new("bgpe");
    let tor = net.node("tor", "192.168.76.1/24");
    let toml = gobgp_conf(
        65000,
        "192.168.76.1",
        &[("192.168.76.11", false), ("192.168.76.12", false)],
    );
    // The rack's own prefix, announced by the router.
    let _gobgpd = gobgpd(&tor, dir.path(), &toml, "10.99.0.0/16", None).await;

    let config = || backend_bgp::Config {
        global_peers: vec![backend_bgp::GlobalPeer {
            address: "192.168.76.1".parse().unwrap(),
            as_number: 65000,
            name: Some("tor".into()),
        }],
        ..config(179)
    };
    let nodes = [
        ("a", "192.168.76.11/24", "10.244.1.0/26"),
        ("b", "192.168.76.12/24", "10.244.2.0/26"),
    ];
    let records = [record("a", "192.168.76.11"), record("b", "192.168.76.12")];
    let mut speakers = Vec::new();
    let mut namespaces = Vec::new();
    for (name, cidr, block) in nodes {
        let ns = net.node(name, cidr);
        let mut bgp = speaker(&ns, config(), &local(name, cidr, &[block])).await;
        bgp.reconcile(&records).await.unwrap();
        speakers.push(bgp);
        namespaces.push(ns);
    }
    // Each node: the rack's prefix via the router (eBGP), the other node's block straight
    // to it (iBGP); the copy of its own or the other's block the router sends back carries
    // AS 64512 in its path and is ignored.
    wait_routes(&namespaces[0], "107", SECS, |now| {
        now == [
            r("10.244.2.0/26", "192.168.76.12"),
            r("10.99.0.0/16", "192.168.76.1"),
        ]
    })
    .await;
    wait_routes(&namespaces[1], "107", SECS, |now| {
        now == [
            r("10.244.1.0/26", "192.168.76.11"),
            r("10.99.0.0/16", "192.168.76.1"),
        ]
    })
    .await;
    // The router learns every block, each from its node, with AS path 64512.
    let rib = gobgp(&["global", "rib", "-a", "ipv4"]);
    wait_output(&tor, &rib, SECS, |o| {
        let line = |block: &str, via: &str| {
            o.lines()
                .any(|l| l.contains(block) && l.contains(via) && l.contains("64512"))
        };
        line("10.244.1.0/26", "192.168.76.11") && line("10.244.2.0/26", "192.168.76.12")
    })
    .await;
    for bgp in &speakers {
        let tor = bgp.summary().into_iter().find(|p| p.name == "tor").unwrap();
        assert_eq!((tor.state.as_str(), tor.as_number), ("established", 65000));
        assert_eq!(
            (tor.prefixes_sent, tor.prefixes_received),
            (1, 1),
            "{tor:?}"
        );
        let report = bgp.typed_report().unwrap();
        assert!(report.unroutable.is_empty(), "{report:?}");
    }

    // A node stops: the router forgets its block.
    speakers[0].teardown().await.unwrap();
    wait_output(&tor, &rib, Duration::from_secs(3), |o| {
        !o.contains("10.244.1.0/26")
    })
    .await;
    speakers[1].teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_route_reflector_serves_three_bird2_clients() {
    if !tools(
        "bgp route reflection for bird2",
        &[("bird", "bird2"), ("birdc", "bird2")],
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::new("bgprr");
    let ours = net.node("rr", "192.168.77.11/24");
    let mut birds = Vec::new();
    for i in 1..=3u8 {
        let address = format!("192.168.77.1{}", i + 1);
        let ns = net.node(&format!("bird{i}"), &format!("{address}/24"));
        let sub = dir.path().join(format!("bird{i}"));
        std::fs::create_dir(&sub).unwrap();
        let conf = bird_conf(&sub, "192.168.77.11", &address, "");
        // Each client announces its own block.
        let text = std::fs::read_to_string(&conf)
            .unwrap()
            .replace("10.244.20.0/26", &format!("10.244.2{i}.0/26"));
        std::fs::write(&conf, text).unwrap();
        let sock = sub.join("bird.ctl").to_str().unwrap().to_owned();
        let daemon = Daemon::spawn(
            "bird",
            &ns,
            &["bird", "-f", "-c", conf.to_str().unwrap(), "-s", &sock],
            &sub.join("bird.log"),
        );
        birds.push((ns, address, sock, daemon));
    }
    let config = backend_bgp::Config {
        route_reflector_cluster_id: Some("10.0.0.1".parse().unwrap()),
        ..config(179)
    };
    let mut bgp = speaker(
        &ours,
        config,
        &local("rr", "192.168.77.11/24", &["10.244.1.0/26"]),
    )
    .await;
    let records: Vec<_> = (1..=3)
        .map(|i| record(&format!("bird{i}"), &format!("192.168.77.1{}", i + 1)))
        .collect();
    bgp.reconcile(&records).await.unwrap();
    assert_eq!(
        bgp.node_data()
            .get(backend_bgp::ROUTE_REFLECTOR_KEY)
            .map(String::as_str),
        Some("10.0.0.1"),
        "the other nodes learn from the registry that this one reflects"
    );

    // Every block everywhere: the clients' blocks reflected with their own next hops.
    let block = |i: usize| format!("10.244.2{i}.0/26");
    let all: Vec<(String, String)> = (1..=3)
        .map(|i| r(&block(i), &format!("192.168.77.1{}", i + 1)))
        .collect();
    wait_routes(&ours, "107", SECS, |now| now == all).await;
    for (i, (ns, _, _, _)) in birds.iter().enumerate() {
        let mut want: Vec<_> = all
            .iter()
            .filter(|(b, _)| *b != block(i + 1))
            .cloned()
            .collect();
        want.push(r("10.244.1.0/26", "192.168.77.11"));
        want.sort();
        wait_routes(ns, "bird", SECS, |now| now == want).await;
    }
    // As RFC 4456 says: the originator and this cluster on the reflected route.
    let (ns, _, sock, _) = &birds[0];
    let shown = try_in(ns, &birdc(sock, &["show", "route", "all", &block(3)])).unwrap();
    assert!(
        shown.contains("BGP.originator_id: 192.168.77.14"),
        "{shown}"
    );
    assert!(shown.contains("BGP.cluster_list: 10.0.0.1"), "{shown}");
    for p in bgp.summary() {
        assert_eq!((p.prefixes_sent, p.prefixes_received), (3, 1), "{p:?}");
    }

    // A client withdraws its block: it goes from the other clients too.
    let (ns2, _, sock2, _) = &birds[1];
    try_in(ns2, &birdc(sock2, &["disable", "pods"])).expect("birdc disable");
    for (ns, _, _, _) in [&birds[0], &birds[2]] {
        wait_routes(ns, "bird", SECS, |now| {
            now.iter().all(|(b, _)| *b != block(2))
        })
        .await;
    }
    wait_routes(&ours, "107", SECS, |now| {
        now.iter().all(|(b, _)| *b != block(2)) && now.len() == 2
    })
    .await;
    bgp.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gobgpd_route_reflector_serves_three_of_ours() {
    if !tools(
        "bgp gobgpd route reflector",
        &[("gobgpd", "gobgpd"), ("gobgp", "gobgpd")],
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::new("bgpgr");
    let rr = net.node("rr", "192.168.79.1/24");
    let nodes = [
        ("a", "192.168.79.11/24", "10.244.1.0/26"),
        ("b", "192.168.79.12/24", "10.244.2.0/26"),
        ("c", "192.168.79.13/24", "10.244.3.0/26"),
    ];
    let clients: Vec<String> = nodes.iter().map(|(_, c, _)| addr(c).to_string()).collect();
    let clients: Vec<(&str, bool)> = clients.iter().map(|c| (c.as_str(), true)).collect();
    let toml = gobgp_conf(64512, "192.168.79.1", &clients);
    let _gobgpd = gobgpd(&rr, dir.path(), &toml, "10.98.0.0/16", Some("192.168.79.1")).await;

    let config = || backend_bgp::Config {
        global_peers: vec![backend_bgp::GlobalPeer {
            address: "192.168.79.1".parse().unwrap(),
            as_number: 64512,
            name: Some("rr".into()),
        }],
        node_to_node_mesh: false,
        ..config(179)
    };
    let records: Vec<_> = nodes
        .iter()
        .map(|(n, cidr, _)| record(n, &addr(cidr).to_string()))
        .collect();
    let mut speakers = Vec::new();
    let mut namespaces = Vec::new();
    for (name, cidr, block) in nodes {
        let ns = net.node(name, cidr);
        let mut bgp = speaker(&ns, config(), &local(name, cidr, &[block])).await;
        bgp.reconcile(&records).await.unwrap();
        speakers.push(bgp);
        namespaces.push(ns);
    }
    // Each node peers with the reflector only and has every other block via its node.
    for (i, ns) in namespaces.iter().enumerate() {
        let mut want: Vec<_> = nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, (_, cidr, block))| r(block, &addr(cidr).to_string()))
            .collect();
        want.push(r("10.98.0.0/16", "192.168.79.1"));
        want.sort();
        wait_routes(ns, "107", SECS, |now| now == want).await;
    }
    for bgp in &speakers {
        let summary = bgp.summary();
        assert_eq!(summary.len(), 1, "{summary:?}");
        assert_eq!(summary[0].name, "rr");
        assert_eq!(summary[0].prefixes_received, 3, "{summary:?}");
    }
    // What the reflector sends node a for node b's block carries, as RFC 4456 says, b
    // as ORIGINATOR_ID and the reflector's cluster in CLUSTER_LIST.
    let sent = try_in(&rr, &gobgp(&["neighbor", "192.168.79.11", "adj-out", "-j"]))
        .expect("gobgp adj-out");
    let sent: serde_json::Value = serde_json::from_str(&sent).expect("adj-out JSON");
    let path = &sent["10.244.2.0/26"][0];
    let attrs = path["attrs"].as_array().expect("attrs");
    let originator = attrs
        .iter()
        .find(|a| a["type"] == 9)
        .expect("ORIGINATOR_ID");
    assert_eq!(originator["value"], "192.168.79.12", "{path}");
    let clusters = attrs
        .iter()
        .find(|a| a["type"] == 10)
        .expect("CLUSTER_LIST");
    assert_eq!(
        clusters["value"],
        serde_json::json!(["192.168.79.1"]),
        "{path}"
    );
    // One node stops: the others lose its block through the reflector.
    speakers[2].teardown().await.unwrap();
    for ns in &namespaces[..2] {
        wait_routes(ns, "107", SECS, |now| {
            now.iter().all(|(b, _)| b != "10.244.3.0/26")
        })
        .await;
    }
    for bgp in &mut speakers[..2] {
        bgp.teardown().await.unwrap();
    }
}

/// The `bird` engine on node a, the native speaker on node b, gobgpd on node g: a full
/// mesh, every block in every kernel; a peer removed is reconfigured away without a BIRD
/// restart; a killed BIRD is started again and its routes come back; teardown leaves no
/// process, socket or route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bird_engine_meshes_with_the_native_speaker_and_gobgpd() {
    if !tools(
        "bgp bird engine",
        &[
            ("bird", "bird2"),
            ("birdc", "bird2"),
            ("gobgpd", "gobgpd"),
            ("gobgp", "gobgpd"),
        ],
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::new("bgpe");
    let (a_cidr, b_cidr, g_ip) = ("192.168.81.11/24", "192.168.81.12/24", "192.168.81.13");
    let a_ns = net.node("a", a_cidr);
    let b_ns = net.node("b", b_cidr);
    let g_ns = net.node("g", &format!("{g_ip}/24"));
    let toml = gobgp_conf(
        64512,
        g_ip,
        &[("192.168.81.11", false), ("192.168.81.12", false)],
    );
    let gobgpd = gobgpd(&g_ns, dir.path(), &toml, "10.244.30.0/26", Some(g_ip)).await;

    let records = [
        record("a", "192.168.81.11"),
        record("b", "192.168.81.12"),
        record("g", g_ip),
    ];
    let run_dir = dir.path().join("a-bird");
    let mut a = bird_engine(
        &a_ns,
        &run_dir,
        config(179),
        &local("a", a_cidr, &["10.244.1.0/26"]),
    )
    .await;
    let pid = a.pid().expect("bird runs");
    let report = a.reconcile(&records).await.expect("reconcile");
    assert_eq!(report.writes, 1, "two sessions added: {report:?}");
    assert_eq!(
        a.reconcile(&records).await.unwrap().writes,
        0,
        "nothing changed, nothing reloaded"
    );
    let mut b = speaker(&b_ns, config(179), &local("b", b_cidr, &["10.244.2.0/26"])).await;
    b.reconcile(&records).await.unwrap();

    // Every block in every kernel: bird's are `proto bird`, the native speaker's 107.
    let a_routes = [
        r("10.244.2.0/26", "192.168.81.12"),
        r("10.244.30.0/26", g_ip),
    ];
    wait_routes(&a_ns, "bird", SECS, |now| now == a_routes).await;
    wait_routes(&b_ns, "107", SECS, |now| {
        now == [
            r("10.244.1.0/26", "192.168.81.11"),
            r("10.244.30.0/26", g_ip),
        ]
    })
    .await;
    let rib = gobgp(&["global", "rib", "-a", "ipv4"]);
    wait_output(&g_ns, &rib, SECS, |o| {
        o.lines()
            .any(|l| l.contains("10.244.1.0/26") && l.contains("192.168.81.11"))
            && o.contains("10.244.2.0/26")
    })
    .await;
    assert!(established(&b, "a"), "{:?}", b.summary());
    wait_for("bird reports both sessions established", SECS, || {
        let s = a.summary();
        s.len() == 2 && s.iter().all(|p| p.state == "established")
    })
    .await;
    let report = a.refresh().await.expect("report");
    let bp = report.peers.iter().find(|p| p.name == "b").unwrap();
    assert_eq!(bp.address, Some("192.168.81.12".parse().unwrap()));
    assert_eq!((bp.prefixes_sent, bp.prefixes_received), (1, 1), "{bp:?}");
    assert_eq!(bp.hold_time, Some(9));
    assert!(bp.established_at.is_some());
    assert_eq!(
        report.installed["b"],
        ["10.244.2.0/26 via 192.168.81.12".to_owned()]
    );
    assert_eq!(
        report.installed["g"],
        [format!("10.244.30.0/26 via {g_ip}")]
    );
    assert_eq!(a.report().unwrap()["routerId"], "192.168.81.11");
    assert!(
        std::fs::read_to_string(run_dir.join("bird.conf"))
            .unwrap()
            .contains("protocol bgp peer_g from cnikit_peer")
    );

    // g leaves the registry: reconfigured, not restarted; its route goes from a.
    let report = a.reconcile(&records[..2]).await.unwrap();
    assert_eq!(report.writes, 1);
    assert_eq!(a.pid(), Some(pid), "a peer change never restarts bird");
    wait_routes(&a_ns, "bird", SECS, |now| {
        now == [r("10.244.2.0/26", "192.168.81.12")]
    })
    .await;
    wait_for("g's session gone from the report", SECS, || {
        a.summary().iter().all(|p| p.name != "g")
    })
    .await;
    assert_eq!(a.restarts(), 0);
    drop(gobgpd);

    // bird dies: it is started again, and its routes are back.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill bird");
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    wait_for("bird started again", SECS, || {
        a.restarts() == 1 && a.pid().is_some_and(|p| p != pid)
    })
    .await;
    // The dead BIRD's route stays in the kernel (graceful restart): take it away, so that
    // only the new BIRD, once it has relearned it, can put it back.
    testkit::ip(&a_ns, &["route", "del", "10.244.2.0/26", "proto", "bird"]);
    wait_routes(&a_ns, "bird", SECS, |now| {
        now == [r("10.244.2.0/26", "192.168.81.12")]
    })
    .await;
    let deadline = Instant::now() + SECS;
    loop {
        let report = a.refresh().await.expect("report");
        let again = report.peers.iter().any(|p| {
            p.name == "b"
                && p.state == "established"
                && p.established_at.is_some_and(|t| t >= killed_at)
                && p.prefixes_received == 1
        });
        if again {
            break;
        }
        assert!(Instant::now() < deadline, "no new session to b: {report:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for("the session to b back up", SECS, || established(&b, "a")).await;
    wait_routes(&b_ns, "107", SECS, |now| {
        now == [r("10.244.1.0/26", "192.168.81.11")]
    })
    .await;

    // teardown: no bird, no socket, no route; b loses a's block at once (Cease).
    let last = a.pid().unwrap();
    a.teardown().await.unwrap();
    assert!(!std::path::Path::new(&format!("/proc/{last}")).exists());
    assert!(!run_dir.join("bird.ctl").exists());
    assert!(!run_dir.join("bird.pid").exists());
    assert_eq!(routes(&a_ns, "bird"), vec![]);
    wait_routes(&b_ns, "107", SECS, |now| now.is_empty()).await;
    a.teardown().await.expect("teardown again");
    b.teardown().await.unwrap();
}

/// The `bird` engine as a route reflector (RFC 4456) for two native speakers: they peer
/// with it only and learn each other's block through it, with the originator's next hop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bird_engine_reflects_for_native_clients() {
    if !tools(
        "bgp bird engine route reflector",
        &[("bird", "bird2"), ("birdc", "bird2")],
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::new("bgpbr");
    let rr_ns = net.node("rr", "192.168.82.1/24");
    let mut rr_record = record("rr", "192.168.82.1");
    rr_record
        .backend
        .insert(backend_bgp::ROUTE_REFLECTOR_KEY.into(), "10.0.0.7".into());
    let nodes = [
        ("c1", "192.168.82.11/24", "10.244.1.0/26"),
        ("c2", "192.168.82.12/24", "10.244.2.0/26"),
    ];
    let mut records = vec![rr_record];
    records.extend(
        nodes
            .iter()
            .map(|(n, cidr, _)| record(n, &addr(cidr).to_string())),
    );
    let mut rr = bird_engine(
        &rr_ns,
        &dir.path().join("rr"),
        Config {
            route_reflector_cluster_id: Some("10.0.0.7".parse().unwrap()),
            ..config(179)
        },
        &local("rr", "192.168.82.1/24", &["10.244.9.0/26"]),
    )
    .await;
    rr.reconcile(&records).await.unwrap();
    let conf = std::fs::read_to_string(dir.path().join("rr/bird.conf")).unwrap();
    assert_eq!(conf.matches("rr client;").count(), 2, "{conf}");

    let mut clients = Vec::new();
    let mut namespaces = Vec::new();
    for (name, cidr, block) in nodes {
        let ns = net.node(name, cidr);
        let mut bgp = speaker(&ns, config(179), &local(name, cidr, &[block])).await;
        bgp.reconcile(&records).await.unwrap();
        clients.push(bgp);
        namespaces.push(ns);
    }
    wait_routes(&namespaces[0], "107", SECS, |now| {
        now == [
            r("10.244.2.0/26", "192.168.82.12"),
            r("10.244.9.0/26", "192.168.82.1"),
        ]
    })
    .await;
    wait_routes(&namespaces[1], "107", SECS, |now| {
        now == [
            r("10.244.1.0/26", "192.168.82.11"),
            r("10.244.9.0/26", "192.168.82.1"),
        ]
    })
    .await;
    wait_routes(&rr_ns, "bird", SECS, |now| {
        now == [
            r("10.244.1.0/26", "192.168.82.11"),
            r("10.244.2.0/26", "192.168.82.12"),
        ]
    })
    .await;
    for c in &clients {
        let summary = c.summary();
        assert_eq!(summary.len(), 1, "clients peer with the reflector only");
        assert_eq!(summary[0].name, "rr");
        assert_eq!(summary[0].prefixes_received, 2, "{summary:?}");
    }
    let report = rr.refresh().await.unwrap();
    for p in &report.peers {
        assert_eq!(
            (p.state.as_str(), p.prefixes_sent, p.prefixes_received),
            ("established", 2, 1),
            "{p:?}"
        );
    }
    for c in &mut clients {
        c.teardown().await.unwrap();
    }
    rr.teardown().await.unwrap();
}

/// `bgp.ipip` with the bird engine beside a native speaker: BIRD's kernel protocol puts
/// the learned block through the IPIP device on-link (`proto bird`), the native speaker
/// through its own; the tunnel addresses ping each other. In the VM when this kernel has
/// no ipip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bird_engine_routes_through_ipip() {
    let test = "the_bird_engine_routes_through_ipip";
    if !tools(test, &[("bird", "bird2"), ("birdc", "bird2")])
        || !testkit::vm::here_or_in_vm(test, "ipip")
    {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::new("bgpbi");
    let ipip = Some(backend_bgp::IpipConfig {
        device: "cnikit.ipip".into(),
        cross_subnet: false,
    });
    let (a_cidr, b_cidr) = ("192.168.84.11/24", "192.168.84.12/24");
    let a_ns = net.node("a", a_cidr);
    let b_ns = net.node("b", b_cidr);
    let records = [record("a", "192.168.84.11"), record("b", "192.168.84.12")];
    let mut a_local = local("a", a_cidr, &["10.244.1.0/26"]);
    a_local.tunnel_address = Some("10.244.1.1".parse().unwrap());
    let mut b_local = local("b", b_cidr, &["10.244.2.0/26"]);
    b_local.tunnel_address = Some("10.244.2.1".parse().unwrap());
    let mut a = bird_engine(
        &a_ns,
        &dir.path().join("a"),
        Config {
            ipip: ipip.clone(),
            ..config(179)
        },
        &a_local,
    )
    .await;
    a.reconcile(&records).await.unwrap();
    let mut b = speaker(
        &b_ns,
        Config {
            ipip,
            ..config(179)
        },
        &b_local,
    )
    .await;
    b.reconcile(&records).await.unwrap();
    wait_routes(&a_ns, "bird", SECS, |now| {
        now == [r("10.244.2.0/26", "192.168.84.12")]
    })
    .await;
    wait_routes(&b_ns, "107", SECS, |now| {
        now == [r("10.244.1.0/26", "192.168.84.11")]
    })
    .await;
    for (ns, proto) in [(&a_ns, "bird"), (&b_ns, "107")] {
        let route = &testkit::ip_json(ns, &["route", "show", "proto", proto])[0];
        assert_eq!(route["dev"], "cnikit.ipip", "{route}");
        assert!(
            route["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "onlink")),
            "{route}"
        );
    }
    let ping = try_in(
        &a_ns,
        &["ping", "-c1", "-W2", "-I", "10.244.1.1", "10.244.2.1"].map(String::from),
    );
    assert!(
        ping.is_some(),
        "a's tunnel address reaches b's through the tunnel"
    );
    a.teardown().await.unwrap();
    assert!(
        testkit::ip_json(&a_ns, &["link", "show"])
            .iter()
            .all(|l| l["ifname"] != "cnikit.ipip"),
        "the device is gone"
    );
    b.teardown().await.unwrap();
}

/// The bird engine with `crossSubnet` IPIP, its peers on two subnets joined by a router (as
/// Calico's CrossSubnet is meant for): node a (BIRD) on 192.168.87.0/24 with c (native) on the
/// same segment, b (native) behind the router on 192.168.88.0/24. a's session with b crosses
/// the router (a multihop iBGP session), b's block is installed through the tunnel on-link
/// via b's underlay address, c's plainly via c on eth0; a's tunnel address reaches b's. In
/// the VM when this kernel has no ipip module.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bird_engine_tunnels_cross_subnet_peers_only() {
    let test = "the_bird_engine_tunnels_cross_subnet_peers_only";
    if !tools(test, &[("bird", "bird2"), ("birdc", "bird2")])
        || !testkit::vm::here_or_in_vm(test, "ipip")
    {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let namespaces = testkit::Namespaces::new("bgpxs");
    let left = testkit::Segment::new(&namespaces, "sw1");
    let right = testkit::Segment::new(&namespaces, "sw2");
    let router = namespaces.add("r");
    left.plug(&router, "eth1", "192.168.87.1/24");
    right.plug(&router, "eth2", "192.168.88.1/24");
    testkit::ip(&router, &["link", "set", "lo", "up"]);
    let forward = Command::new("ip")
        .args([
            "netns",
            "exec",
            &router,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])
        .status()
        .expect("sysctl");
    assert!(forward.success(), "forwarding on in the router");
    let (a_cidr, b_cidr, c_cidr) = ("192.168.87.11/24", "192.168.88.12/24", "192.168.87.13/24");
    let a_ns = namespaces.add("a");
    left.plug(&a_ns, "eth0", a_cidr);
    let c_ns = namespaces.add("c");
    left.plug(&c_ns, "eth0", c_cidr);
    let b_ns = namespaces.add("b");
    right.plug(&b_ns, "eth0", b_cidr);
    for ns in [&a_ns, &c_ns] {
        testkit::ip(
            ns,
            &["route", "add", "192.168.88.0/24", "via", "192.168.87.1"],
        );
    }
    testkit::ip(
        &b_ns,
        &["route", "add", "192.168.87.0/24", "via", "192.168.88.1"],
    );
    let ipip = Some(backend_bgp::IpipConfig {
        device: "cnikit.ipip".into(),
        cross_subnet: true,
    });
    let records = [
        record("a", "192.168.87.11"),
        record("b", "192.168.88.12"),
        record("c", "192.168.87.13"),
    ];
    let mut a_local = local("a", a_cidr, &["10.244.1.0/26"]);
    a_local.tunnel_address = Some("10.244.1.1".parse().unwrap());
    let mut b_local = local("b", b_cidr, &["10.244.2.0/26"]);
    b_local.tunnel_address = Some("10.244.2.1".parse().unwrap());
    let mut c_local = local("c", c_cidr, &["10.244.3.0/26"]);
    c_local.tunnel_address = Some("10.244.3.1".parse().unwrap());
    let mut a = bird_engine(
        &a_ns,
        &dir.path().join("a"),
        Config {
            ipip: ipip.clone(),
            ..config(179)
        },
        &a_local,
    )
    .await;
    a.reconcile(&records).await.unwrap();
    let native = Config {
        ipip,
        ..config(179)
    };
    let mut b = speaker(&b_ns, native.clone(), &b_local).await;
    b.reconcile(&records).await.unwrap();
    let mut c = speaker(&c_ns, native, &c_local).await;
    c.reconcile(&records).await.unwrap();
    wait_routes(&a_ns, "bird", SECS, |now| {
        now == [
            r("10.244.2.0/26", "192.168.88.12"),
            r("10.244.3.0/26", "192.168.87.13"),
        ]
    })
    .await;
    wait_routes(&b_ns, "107", SECS, |now| {
        now.contains(&r("10.244.1.0/26", "192.168.87.11"))
    })
    .await;
    let routes = testkit::ip_json(&a_ns, &["route", "show", "proto", "bird"]);
    let onlink = |route: &serde_json::Value| {
        route["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "onlink"))
    };
    for route in &routes {
        if route["dst"] == "10.244.2.0/26" {
            assert_eq!(route["dev"], "cnikit.ipip", "across the router: {route}");
            assert!(onlink(route), "{route}");
        } else {
            assert_eq!(route["dev"], "eth0", "same subnet, no tunnel: {route}");
            assert!(!onlink(route), "{route}");
        }
    }
    let ping = try_in(
        &a_ns,
        &["ping", "-c1", "-W2", "-I", "10.244.1.1", "10.244.2.1"].map(String::from),
    );
    assert!(
        ping.is_some(),
        "a's tunnel address reaches b's through the tunnel, across the router"
    );
    a.teardown().await.unwrap();
    b.teardown().await.unwrap();
    c.teardown().await.unwrap();
}

/// The agent restarts without a teardown (`keepOnExit`): the dropped bird engine kills its
/// BIRD as a crash, the next run's BIRD starts in graceful-restart recovery on the previous
/// configuration; the routes stay in both kernels the whole time, and the session comes
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bird_engine_restarts_gracefully() {
    if !tools(
        "bgp bird engine graceful restart",
        &[("bird", "bird2"), ("birdc", "bird2")],
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::new("bgpbg");
    let (a_cidr, b_cidr) = ("192.168.85.11/24", "192.168.85.12/24");
    let a_ns = net.node("a", a_cidr);
    let b_ns = net.node("b", b_cidr);
    let records = [record("a", "192.168.85.11"), record("b", "192.168.85.12")];
    let a_local = local("a", a_cidr, &["10.244.1.0/26"]);
    let run_dir = dir.path().join("a");
    let open = || async { bird_engine(&a_ns, &run_dir, config(179), &a_local).await };
    let mut a = open().await;
    a.reconcile(&records).await.unwrap();
    let mut b = speaker(&b_ns, config(179), &local("b", b_cidr, &["10.244.2.0/26"])).await;
    b.reconcile(&records).await.unwrap();
    let in_a = [r("10.244.2.0/26", "192.168.85.12")];
    let in_b = [r("10.244.1.0/26", "192.168.85.11")];
    wait_routes(&a_ns, "bird", SECS, |now| now == in_a).await;
    wait_routes(&b_ns, "107", SECS, |now| now == in_b).await;
    let old = a.pid().unwrap();
    let restarted = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    drop(a);
    let mut a = open().await;
    assert_ne!(a.pid(), Some(old));
    assert_eq!(routes(&a_ns, "bird"), in_a, "a keeps b's block at start");
    a.reconcile(&records).await.unwrap();
    let deadline = Instant::now() + SECS;
    loop {
        assert_eq!(routes(&a_ns, "bird"), in_a, "a keeps b's block");
        assert_eq!(routes(&b_ns, "107"), in_b, "b keeps a's block");
        let back = a.refresh().await.unwrap().peers.iter().any(|p| {
            p.name == "b"
                && p.state == "established"
                && p.established_at.is_some_and(|t| t >= restarted)
                && p.prefixes_received == 1
        });
        if back {
            break;
        }
        assert!(Instant::now() < deadline, "the session never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.teardown().await.unwrap();
    b.teardown().await.unwrap();
}
