//! The netlink implementation of the routing backends' kernel traits against the real
//! kernel, in private namespaces (needs root; skips loudly without it).

use std::net::IpAddr;

use cni_core::linux::NetNs;
use cni_core::linux::kernel::{
    Fdb, FdbEntry, GatewayRoute, IpipParams, LinkKind, LinkSpec, Links, Neighbour, Neighbours,
    Netlink, ROUTE_PROTOCOL, Routes, VxlanParams, ensure_device,
};
use testkit::{Namespaces, bridge, ip, ip_json};

fn root() -> bool {
    testkit::root("kernel trait tests")
}

fn a(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A node namespace with `eth0` (192.0.2.1/24, fd00:2::1/64) whose peer is in a second
/// namespace; returns the node's name and eth0's index.
fn node(lab: &Namespaces) -> (String, u32) {
    let node = lab.add("node");
    let far = lab.add("far");
    ip(
        &far,
        &[
            "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", &node,
        ],
    );
    ip(&far, &["link", "set", "up0", "up"]);
    ip(&node, &["addr", "add", "192.0.2.1/24", "dev", "eth0"]);
    ip(
        &node,
        &["addr", "add", "fd00:2::1/64", "dev", "eth0", "nodad"],
    );
    ip(&node, &["link", "set", "eth0", "up"]);
    let v = ip_json(&node, &["link", "show", "dev", "eth0"]);
    (node, v[0]["ifindex"].as_u64().unwrap() as u32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_are_owned_by_protocol() {
    if !root() {
        return;
    }
    let lab = Namespaces::new("krt");
    let (node, eth0) = node(&lab);
    let k = Netlink::new(NetNs::named(&node).await.unwrap());
    assert_eq!(k.protocol(), ROUTE_PROTOCOL);
    // Someone else's routes: a static one to a destination we will want too, another.
    ip(
        &node,
        &["route", "add", "10.1.0.0/24", "via", "192.0.2.254"],
    );
    ip(
        &node,
        &["route", "add", "10.9.0.0/16", "via", "192.0.2.253"],
    );

    let v4 = GatewayRoute {
        dst: "10.2.0.0/24".parse().unwrap(),
        via: a("192.0.2.2"),
        oif: eth0,
        onlink: false,
    };
    let v6 = GatewayRoute {
        dst: "fd00:20::/64".parse().unwrap(),
        via: a("fd00:2::2"),
        oif: eth0,
        onlink: false,
    };
    let onlink = GatewayRoute {
        dst: "10.3.0.0/24".parse().unwrap(),
        via: a("10.3.0.0"),
        oif: eth0,
        onlink: true,
    };
    for r in [&v4, &v6, &onlink] {
        k.add_route(r)
            .await
            .unwrap_or_else(|e| panic!("add {r}: {e}"));
    }
    let mut owned = k.owned_routes().await.unwrap();
    owned.sort();
    let mut want = vec![v4, v6, onlink];
    want.sort();
    assert_eq!(owned, want, "only ours, read back as written");
    let shown = ip(
        &node,
        &["route", "show", "proto", &ROUTE_PROTOCOL.to_string()],
    );
    assert_eq!(shown.lines().count(), 2, "{shown}");

    // Adding where a foreign route is fails and leaves it.
    let clash = GatewayRoute {
        dst: "10.1.0.0/24".parse().unwrap(),
        ..v4
    };
    let e = k.add_route(&clash).await.unwrap_err();
    assert_eq!(e.code().0, 101);
    assert!(e.to_string().contains("File exists"), "{e}");
    assert!(ip(&node, &["route", "show", "10.1.0.0/24"]).contains("192.0.2.254"));
    // Deleting by protocol never matches it.
    let foreign = GatewayRoute {
        via: a("192.0.2.254"),
        ..clash
    };
    assert!(!k.delete_route(&foreign).await.unwrap());
    assert!(ip(&node, &["route", "show", "10.1.0.0/24"]).contains("192.0.2.254"));

    // Replace changes our routes in place, both families.
    let v4b = GatewayRoute {
        via: a("192.0.2.3"),
        ..v4
    };
    let v6b = GatewayRoute {
        via: a("fd00:2::3"),
        ..v6
    };
    k.replace_route(&v4b).await.unwrap();
    k.replace_route(&v6b).await.unwrap();
    let mut owned = k.owned_routes().await.unwrap();
    owned.sort();
    let mut want = vec![v4b, v6b, onlink];
    want.sort();
    assert_eq!(owned, want);

    for r in &want {
        assert!(k.delete_route(r).await.unwrap(), "delete {r}");
        assert!(!k.delete_route(r).await.unwrap(), "delete {r} again");
    }
    assert!(k.owned_routes().await.unwrap().is_empty());
    let left = ip(&node, &["route", "show"]);
    assert!(
        left.contains("10.1.0.0/24") && left.contains("10.9.0.0/16"),
        "{left}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_device_neighbours_and_fdb() {
    if !root() {
        return;
    }
    let lab = Namespaces::new("kvx");
    let (node, eth0) = node(&lab);
    let k = Netlink::new(NetNs::named(&node).await.unwrap());
    let params = VxlanParams {
        vni: 77,
        port: 4789,
        local: Some(a("192.0.2.1")),
        underlay: Some(eth0),
        learning: false,
        external: false,
    };
    let spec = LinkSpec {
        name: "cnkt.vx".into(),
        kind: LinkKind::Vxlan(params),
        mtu: 1450,
        mac: Some([0x02, 0, 0, 0, 0x77, 1]),
    };
    assert!(k.device("cnkt.vx").await.unwrap().is_none());
    k.add_link(&spec).await.unwrap();
    let dev = k.device("cnkt.vx").await.unwrap().expect("made");
    assert_eq!(dev.kind, Some(spec.kind), "parameters read back as made");
    assert_eq!(dev.vxlan(), Some(&params));
    assert_eq!(dev.link.mtu, Some(1450));
    assert_eq!(dev.link.kind.as_deref(), Some("vxlan"));
    assert_eq!(dev.link.mac.unwrap().as_bytes(), &[0x02, 0, 0, 0, 0x77, 1]);
    assert!(!dev.link.up);
    assert_eq!(k.add_link(&spec).await.unwrap_err().code().0, 101);
    assert!(k.device("eth0").await.unwrap().unwrap().kind.is_none());

    let vx = dev.link.index;
    k.set_mtu(vx, 1400).await.unwrap();
    k.set_up(vx).await.unwrap();
    k.add_address(vx, "10.5.0.0/32".parse().unwrap())
        .await
        .unwrap();
    k.add_address(vx, "10.5.0.0/32".parse().unwrap())
        .await
        .unwrap();
    let dev = k.device("cnkt.vx").await.unwrap().unwrap();
    assert!(dev.link.up);
    assert_eq!(dev.link.mtu, Some(1400));
    assert!(
        k.addresses(vx)
            .await
            .unwrap()
            .contains(&"10.5.0.0/32".parse().unwrap())
    );

    let n1 = Neighbour {
        ip: a("10.6.0.0"),
        mac: [0x0a, 0, 0, 0, 0, 1],
    };
    let n2 = Neighbour {
        ip: a("10.7.0.0"),
        mac: [0x0a, 0, 0, 0, 0, 2],
    };
    k.replace_neighbour(vx, &n1).await.unwrap();
    k.replace_neighbour(vx, &n2).await.unwrap();
    k.replace_neighbour(vx, &n2).await.unwrap();
    // Not permanent: not listed.
    ip(
        &node,
        &[
            "neigh",
            "add",
            "10.8.0.0",
            "lladdr",
            "0a:00:00:00:00:03",
            "dev",
            "cnkt.vx",
            "nud",
            "reachable",
        ],
    );
    let mut listed = k.permanent_neighbours(vx).await.unwrap();
    listed.sort();
    assert_eq!(listed, vec![n1, n2]);
    assert!(k.permanent_neighbours(eth0).await.unwrap().is_empty());

    let f1 = FdbEntry {
        mac: n1.mac,
        dst: a("192.0.2.11"),
    };
    let f2 = FdbEntry {
        mac: n2.mac,
        dst: a("192.0.2.12"),
    };
    k.replace_fdb(vx, &f1).await.unwrap();
    k.replace_fdb(vx, &f2).await.unwrap();
    let moved = FdbEntry {
        dst: a("192.0.2.99"),
        ..f2
    };
    k.replace_fdb(vx, &moved).await.unwrap();
    let mut listed = k.fdb_entries(vx).await.unwrap();
    listed.sort();
    assert_eq!(listed, vec![f1, moved], "replace changes the destination");
    let shown = bridge(&node, &["fdb", "show", "dev", "cnkt.vx"]);
    assert!(
        shown.contains("0a:00:00:00:00:02 dst 192.0.2.99 self permanent"),
        "{shown}"
    );

    assert!(k.delete_fdb(vx, &f1).await.unwrap());
    assert!(!k.delete_fdb(vx, &f1).await.unwrap());
    assert!(k.delete_neighbour(vx, n1.ip).await.unwrap());
    assert!(!k.delete_neighbour(vx, n1.ip).await.unwrap());
    assert_eq!(k.fdb_entries(vx).await.unwrap(), vec![moved]);
    assert_eq!(k.permanent_neighbours(vx).await.unwrap(), vec![n2]);

    assert!(
        k.delete_address(vx, "10.5.0.0/32".parse().unwrap())
            .await
            .unwrap()
    );
    assert!(
        !k.delete_address(vx, "10.5.0.0/32".parse().unwrap())
            .await
            .unwrap()
    );
    assert!(k.delete_link("cnkt.vx").await.unwrap());
    assert!(!k.delete_link("cnkt.vx").await.unwrap());
    assert!(k.device("cnkt.vx").await.unwrap().is_none());
}

/// An IPIP device made from a spec reads back as made, so a backend adopts it instead of
/// making it again; the kernel's own rules on IPIP devices show as errors (needs a kernel
/// with ipip: runs in the test VM when this one has none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipip_device_reads_back_as_made() {
    const NAME: &str = "ipip_device_reads_back_as_made";
    if !testkit::root(NAME) || !testkit::vm::here_or_in_vm(NAME, "ipip") {
        return;
    }
    let lab = Namespaces::new("kip");
    let node = lab.add("node");
    // IPv4 only: the VM's kernel has no IPv6.
    ip(
        &node,
        &["link", "add", "eth0", "type", "veth", "peer", "name", "up0"],
    );
    ip(&node, &["addr", "add", "192.0.2.1/24", "dev", "eth0"]);
    ip(&node, &["link", "set", "eth0", "up"]);
    let eth0 = ip_json(&node, &["link", "show", "dev", "eth0"])[0]["ifindex"]
        .as_u64()
        .unwrap() as u32;
    let k = Netlink::new(NetNs::named(&node).await.unwrap());
    let params = IpipParams {
        local: Some("192.0.2.1".parse().unwrap()),
        underlay: Some(eth0),
        ttl: 0,
        pmtudisc: true,
    };
    let spec = LinkSpec {
        name: "cnkt.ipip".into(),
        mtu: 1480,
        mac: None,
        kind: LinkKind::Ipip(params),
    };
    k.add_link(&spec).await.unwrap();
    let dev = k.device("cnkt.ipip").await.unwrap().expect("made");
    assert_eq!(dev.kind, Some(spec.kind), "parameters read back as made");
    assert_eq!(dev.ipip(), Some(&params));
    assert_eq!(dev.link.kind.as_deref(), Some("ipip"));
    assert_eq!(dev.link.mtu, Some(1480));
    assert!(!dev.link.up);
    // The fallback device the module made: kind ipip, nothing set.
    let tunl0 = k.device("tunl0").await.unwrap().expect("tunl0");
    assert_eq!(
        tunl0.ipip(),
        Some(&IpipParams {
            local: None,
            underlay: None,
            ttl: 0,
            pmtudisc: false
        })
    );

    // The kernel keys IPIP devices by local, remote and dev: a second one with the same
    // parameters, or one with tunl0's (none), is refused.
    let twin = LinkSpec {
        name: "cnkt.twin".into(),
        ..spec.clone()
    };
    assert_eq!(k.add_link(&twin).await.unwrap_err().code().0, 101);
    let bare = LinkSpec {
        name: "cnkt.bare".into(),
        kind: LinkKind::Ipip(IpipParams {
            local: None,
            underlay: None,
            ..params
        }),
        ..spec.clone()
    };
    let e = k.add_link(&bare).await.unwrap_err();
    assert!(e.to_string().contains("File exists"), "{e}");
    // No Ethernet address on an IPIP device (the kernel would take and ignore it).
    let with_mac = LinkSpec {
        name: "cnkt.mac".into(),
        mac: Some([2, 0, 0, 0, 0, 1]),
        kind: LinkKind::Ipip(IpipParams {
            local: Some("192.0.2.9".parse().unwrap()),
            ..params
        }),
        ..spec.clone()
    };
    assert_eq!(k.add_link(&with_mac).await.unwrap_err().code().0, 7);
    assert!(k.device("cnkt.mac").await.unwrap().is_none());

    assert!(k.delete_link("cnkt.ipip").await.unwrap());
    assert!(k.device("cnkt.ipip").await.unwrap().is_none());
}

/// A VXLAN device in external (collect_md) mode is made without a VNI, read back as made
/// (so `ensure_device` adopts it), and `ip -d` shows it `external`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_vxlan_device_is_made_and_adopted() {
    if !root() {
        return;
    }
    let lab = Namespaces::new("kvxe");
    let (node, _) = node(&lab);
    let k = Netlink::new(NetNs::named(&node).await.unwrap());
    let spec = LinkSpec {
        name: "cnkt.vxe".into(),
        kind: LinkKind::Vxlan(VxlanParams {
            vni: 0,
            port: 4789,
            local: None,
            underlay: None,
            learning: false,
            external: true,
        }),
        mtu: 1450,
        mac: Some([0x02, 0, 0, 0, 0x77, 2]),
    };
    let made = ensure_device(&k, &spec).await.unwrap();
    assert_eq!(made.kind, Some(spec.kind), "parameters read back as made");
    let dev = &ip_json(&node, &["-d", "link", "show", "dev", "cnkt.vxe"])[0];
    assert_eq!(dev["linkinfo"]["info_data"]["external"], true, "{dev}");
    let adopted = ensure_device(&k, &spec).await.unwrap();
    assert_eq!(
        adopted.link.index, made.link.index,
        "adopted, not made again"
    );
}
