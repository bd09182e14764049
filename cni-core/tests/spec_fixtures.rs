//! Spec fixtures: results of every version (as the reference plugins print them),
//! configurations, configuration lists and error objects, read and written back.

use std::path::PathBuf;

use cni_core::spec::{
    CniResult, ConfList, ErrorOutput, NetConf, PortMapping, Protocol, Version, VersionInfo,
};
use cni_core::{Error, ErrorCode};
use serde::Deserialize;
use serde_json::{Map, Value, json};

fn fixture_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn fixture(rel: &str) -> Value {
    let bytes = std::fs::read(fixture_path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn version_of(v: &Value) -> Version {
    v["cniVersion"].as_str().unwrap().parse().unwrap()
}

#[test]
fn every_result_round_trips_in_its_version() {
    let dir = fixture_path("results");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.starts_with("legacy-") {
            continue;
        }
        let raw = fixture(&format!("results/{name}"));
        let version = version_of(&raw);
        let result = CniResult::from_json(&raw).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!result.ips.is_empty(), "{name}: no ips read");
        assert_eq!(result.to_json(version), raw, "{name} does not round-trip");
        // Through the newest shape and back again.
        let newest = result.to_json(Version::LATEST);
        assert_eq!(CniResult::from_json(&newest).unwrap(), result, "{name}");
        seen.push(version);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen, Version::ALL, "a version has no result fixture");
}

#[test]
fn newest_result_asked_for_in_older_versions() {
    let raw = fixture("results/routed-1.1.0.json");
    let result = CniResult::from_json(&raw).unwrap();
    assert_eq!(result.interfaces[0].mtu, Some(1450));
    assert_eq!(result.interfaces[2].pci_id.as_deref(), Some("0000:3b:02.1"));
    assert_eq!(
        result.interfaces[3].socket_path.as_deref(),
        Some("/var/lib/vhost_sockets/7c1e/vhu7c1e.sock")
    );
    assert_eq!(result.routes[0].scope, Some(253));
    assert_eq!(result.routes[1].advmss, Some(1410));
    assert_eq!(result.routes[3].table, Some(101));

    for version in [
        Version::V0_3_0,
        Version::V0_3_1,
        Version::V0_4_0,
        Version::V1_0_0,
    ] {
        let expected = fixture(&format!("conversions/routed-1.1.0-as-{version}.json"));
        let got = result.to_json(version);
        assert_eq!(got, expected, "as {version}");

        // Spelled out, independent of the fixture.
        assert_eq!(got["cniVersion"], version.as_str());
        for ip in got["ips"].as_array().unwrap() {
            let is_v4 = ip["address"].as_str().unwrap().contains('.');
            if version < Version::V1_0_0 {
                assert_eq!(ip["version"], if is_v4 { "4" } else { "6" });
            } else {
                assert!(ip.get("version").is_none());
            }
        }
        let indexes: Vec<_> = got["ips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|ip| ip["interface"].as_u64())
            .collect();
        assert_eq!(indexes, [Some(1), Some(1), Some(2)], "as {version}");
        for iface in got["interfaces"].as_array().unwrap() {
            for key in ["mtu", "socketPath", "pciID"] {
                assert!(iface.get(key).is_none(), "{key} as {version}");
            }
        }
        for route in got["routes"].as_array().unwrap() {
            for key in ["mtu", "advmss", "priority", "table", "scope"] {
                assert!(route.get(key).is_none(), "{key} as {version}");
            }
        }
    }
    assert_eq!(result.to_json(Version::V1_1_0), raw);
}

#[test]
fn older_results_read_into_the_newest_shape() {
    let raw = fixture("results/bridge-0.4.0.json");
    let result = CniResult::from_json(&raw).unwrap();
    assert_eq!(result.ips[0].interface, Some(2));
    assert_eq!(result.interfaces[2].name, "eth0");
    assert!(result.interfaces[2].sandbox.is_some());
    let v1 = result.to_json(Version::V1_1_0);
    assert!(v1["ips"][0].get("version").is_none());
    assert_eq!(v1["ips"][0]["interface"], 2);
    assert_eq!(v1["cniVersion"], "1.1.0");
}

#[test]
fn legacy_0_2_0_results_are_read() {
    let result = CniResult::from_json(&fixture("results/legacy-0.2.0.json")).unwrap();
    let addresses: Vec<String> = result.ips.iter().map(|i| i.address.to_string()).collect();
    assert_eq!(addresses, ["10.1.0.5/16", "fd00:1::5/64"]);
    assert_eq!(result.ips[0].gateway, Some("10.1.0.1".parse().unwrap()));
    assert_eq!(result.routes.len(), 1);
    assert_eq!(result.dns.nameservers, ["10.1.0.1"]);
    let as_030 = result.to_json(Version::V0_3_0);
    assert_eq!(as_030["ips"][1]["version"], "6");
}

#[test]
fn empty_and_null_fields_mean_absent() {
    let result = CniResult::from_json(&json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "", "sandbox": null}],
        "ips": [{"address": "10.0.0.3/24", "gateway": "", "interface": 0}],
        "routes": [{"dst": "0.0.0.0/0", "gw": null}],
        "dns": null
    }))
    .unwrap();
    assert_eq!(result.interfaces[0].mac, None);
    assert_eq!(result.interfaces[0].sandbox, None);
    assert_eq!(result.ips[0].gateway, None);
    assert_eq!(result.routes[0].gw, None);
    assert!(result.dns.is_empty());
}

#[test]
fn malformed_results_are_decode_errors_with_a_path() {
    let cases = [
        json!([]),
        json!("x"),
        json!({"ips": [{"address": "10.0.0.300/24"}]}),
        json!({"ips": [{"address": "10.0.0.3/24", "interface": "eth0"}]}),
        json!({"interfaces": [{"name": "eth0", "mac": "zz"}]}),
        json!({"routes": [{"gw": "10.0.0.1"}]}),
    ];
    for case in cases {
        let e = CniResult::from_json(&case).unwrap_err();
        assert_eq!(e.code(), ErrorCode::DECODE_FAILURE, "{case}");
    }
    let e = CniResult::from_json(&json!({"ips": [{"address": "10.0.0.3/24"}, {"address": 5}]}))
        .unwrap_err();
    assert!(e.to_string().contains("ips[1].address"), "{e}");
}

#[test]
fn version_answer_lists_exactly_the_released_versions() {
    let info = VersionInfo::ours(Version::V1_1_0);
    assert_eq!(
        serde_json::to_value(&info).unwrap(),
        json!({
            "cniVersion": "1.1.0",
            "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        })
    );
    assert_eq!(VersionInfo::ours(Version::V0_3_1).cni_version, "0.3.1");
    // What the reference plugins answer reads too.
    let theirs: VersionInfo = serde_json::from_value(json!({
        "cniVersion": "1.0.0",
        "supportedVersions": ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"]
    }))
    .unwrap();
    assert!(theirs.supports(Version::V1_0_0));
    assert!(!theirs.supports(Version::V1_1_0));
    assert_eq!(theirs.newest_common(), Some(Version::V1_0_0));
}

#[test]
fn bridge_configuration_keeps_every_key() {
    let raw = fixture("configs/bridge-1.0.0.json");
    let conf = NetConf::from_value(raw.clone()).unwrap();
    conf.validate().unwrap();
    assert_eq!(conf.version().unwrap(), Version::V1_0_0);
    assert_eq!(conf.name, "k8s-pod-network");
    assert_eq!(conf.plugin_type, "bridge");
    let ipam = conf.ipam.as_ref().unwrap();
    assert_eq!(ipam.ipam_type, "host-local");
    assert_eq!(ipam.config["dataDir"], "/var/lib/cni/networks");
    assert_eq!(conf.dns.as_ref().unwrap().options, ["ndots:5"]);
    assert_eq!(conf.to_value(), raw);

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Bridge {
        bridge: String,
        is_gateway: bool,
        ip_masq: bool,
        hairpin_mode: bool,
        mtu: u32,
    }
    let own: Bridge = conf.plugin_config().unwrap();
    assert_eq!(own.bridge, "cni0");
    assert!(own.is_gateway && own.ip_masq && own.hairpin_mode);
    assert_eq!(own.mtu, 1450);

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct HostLocal {
        ranges: Vec<Vec<Range>>,
    }
    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Range {
        subnet: ipnet::IpNet,
    }
    let hl: HostLocal = ipam.config().unwrap();
    assert_eq!(hl.ranges.len(), 2);

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Strict {
        mtu: String,
    }
    match conf.plugin_config::<Strict>().unwrap_err() {
        Error::InvalidConfig { field, .. } => assert_eq!(field, "mtu"),
        other => panic!("unexpected {other:?}"),
    }
    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct BadIpam {
        ranges: Vec<Vec<u32>>,
    }
    match ipam.config::<BadIpam>().unwrap_err() {
        Error::InvalidConfig { field, .. } => assert_eq!(field, "ipam.ranges[0][0]"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn chained_configuration_with_prev_result_and_port_mappings() {
    let conf = NetConf::from_value(fixture("configs/portmap-chained-0.4.0.json")).unwrap();
    assert!(conf.has_capability("portMappings"));
    let prev = conf.prev_result().unwrap().unwrap();
    assert_eq!(prev.ips[0].address.to_string(), "10.88.0.3/16");
    assert_eq!(prev.ips[0].interface, Some(2));
    let rc = conf.runtime_config.as_ref().unwrap();
    assert_eq!(
        rc.port_mappings,
        [
            PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: Protocol::Tcp,
                host_ip: None
            },
            PortMapping {
                host_port: 5353,
                container_port: 53,
                protocol: Protocol::Udp,
                host_ip: Some("127.0.0.1".parse().unwrap())
            }
        ]
    );
}

#[test]
fn containerd_capitalised_port_mappings() {
    let conf = NetConf::from_value(fixture("configs/portmap-containerd-1.0.0.json")).unwrap();
    let rc = conf.runtime_config.as_ref().unwrap();
    assert_eq!(rc.port_mappings.len(), 3);
    assert_eq!(rc.port_mappings[0].host_port, 30080);
    assert_eq!(rc.port_mappings[0].container_port, 8080);
    assert_eq!(rc.port_mappings[0].host_ip, None, "empty HostIP is none");
    assert_eq!(rc.port_mappings[1].protocol, Protocol::Udp);
    assert_eq!(
        rc.port_mappings[2].host_ip,
        Some("fd00::10".parse().unwrap())
    );
    assert_eq!(rc.port_mappings[2].protocol, Protocol::Sctp);
    assert_eq!(rc.get("bandwidth").unwrap()["ingressRate"], 1_000_000);
    assert_eq!(rc.get("mac").unwrap(), "c2:11:22:33:44:55");
    assert_eq!(rc.get("ips").unwrap()[0], "10.244.1.50/24");
    // Written back with the camelCase keys of the conventions.
    let back = conf.to_value();
    assert_eq!(back["runtimeConfig"]["portMappings"][1]["hostPort"], 30053);
    assert_eq!(back["runtimeConfig"]["portMappings"][1]["protocol"], "udp");
}

#[test]
fn bad_port_mappings_name_the_key() {
    let e = NetConf::from_value(json!({
        "cniVersion": "1.0.0", "name": "n", "type": "portmap",
        "runtimeConfig": {"portMappings": [{"hostPort": 80, "containerPort": 80},
                                           {"HostPort": 70000, "ContainerPort": 80}]}
    }))
    .unwrap_err();
    assert_eq!(e.code(), ErrorCode::DECODE_FAILURE);
    assert!(
        e.to_string()
            .contains("runtimeConfig.portMappings[1].HostPort"),
        "{e}"
    );
}

#[test]
fn newest_prev_result_and_gc_attachments() {
    let check = NetConf::from_value(fixture("configs/check-1.1.0.json")).unwrap();
    let prev = check.prev_result().unwrap().unwrap();
    assert_eq!(prev.interfaces[1].mtu, Some(1450));
    assert_eq!(prev.routes[0].scope, Some(253));

    let gc = NetConf::from_value(fixture("configs/gc-1.1.0.json")).unwrap();
    let valid = gc.gc_attachments().unwrap().unwrap();
    assert_eq!(valid.len(), 3);
    assert_eq!(valid[2].ifname, "net1");
    let legacy = NetConf::from_value(fixture("configs/gc-legacy-key-1.1.0.json")).unwrap();
    assert_eq!(
        legacy.gc_attachments().unwrap().unwrap()[0].container_id,
        "3f1c0a9b2e7d4c58a6b1f0e9d8c7b6a5"
    );
    // As libcni 1.2.3 and later write it: both keys, the same list, Go's key order.
    let both = NetConf::from_value(fixture("configs/gc-libcni-1.2.3.json")).unwrap();
    let valid = both.gc_attachments().unwrap().unwrap();
    assert_eq!(valid.len(), 2);
    assert_eq!(valid[1].ifname, "net1");
}

fn conflist(rel: &str) -> cni_core::Result<ConfList> {
    ConfList::from_slice(&std::fs::read(fixture_path(rel)).unwrap())
}

#[test]
fn conflists_negotiate_their_version() {
    let k8s = conflist("conflists/k8s-1.1.0.conflist").unwrap();
    assert_eq!(k8s.negotiate().unwrap(), Version::V1_1_0);
    assert!(!k8s.disable_gc);
    let podman = conflist("conflists/podman-0.4.0.conflist").unwrap();
    assert!(podman.disable_check, "\"true\" as a string is read");
    assert_eq!(podman.negotiate().unwrap(), Version::V0_4_0);
    let future = conflist("conflists/future-only.conflist").unwrap();
    assert_eq!(
        future.negotiate().unwrap_err().code(),
        ErrorCode::INCOMPATIBLE_VERSION
    );
}

#[test]
fn invalid_conflists_are_refused() {
    let cases: [(&str, u32); 7] = [
        ("", 6),
        ("{\"name\": \"n\", \"plugins\": [", 6),
        ("[]", 6),
        (r#"{"name": "n", "plugins": []}"#, 7),
        (r#"{"name": "", "plugins": [{"type": "x"}]}"#, 7),
        (r#"{"name": "n", "plugins": [{"type": "../x"}]}"#, 7),
        (
            r#"{"name": "n", "disableCheck": "maybe", "plugins": [{"type": "x"}]}"#,
            6,
        ),
    ];
    for (text, code) in cases {
        let e = ConfList::from_slice(text.as_bytes()).unwrap_err();
        assert_eq!(e.code().0, code, "{text}: {e}");
    }
}

#[test]
fn plugin_configs_are_built_as_libcni_does() {
    let list = conflist("conflists/k8s-1.1.0.conflist").unwrap();
    let version = list.negotiate().unwrap();
    let mut rc = Map::new();
    rc.insert(
        "portMappings".into(),
        json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]),
    );
    rc.insert("bandwidth".into(), json!({"ingressRate": 1000}));
    rc.insert("mac".into(), json!("c2:11:22:33:44:55"));
    let prev = CniResult::from_json(&fixture("results/routed-1.1.0.json")).unwrap();

    let first = list.plugin_config(0, version, None, &rc).unwrap();
    assert_eq!(first["name"], "k8s-pod-network");
    assert_eq!(first["cniVersion"], "1.1.0");
    assert_eq!(first["type"], "cnikit");
    assert_eq!(first["mode"], "vxlan");
    assert_eq!(first["ipam"]["blockSize"], 26);
    assert!(
        first.get("runtimeConfig").is_none(),
        "no capability declared"
    );
    assert!(first.get("prevResult").is_none());

    let second = list.plugin_config(1, version, Some(&prev), &rc).unwrap();
    assert_eq!(
        second["runtimeConfig"],
        json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
    );
    assert_eq!(second["prevResult"], prev.to_json(Version::V1_1_0));
    let third = list.plugin_config(2, version, Some(&prev), &rc).unwrap();
    assert_eq!(
        third["runtimeConfig"],
        json!({"bandwidth": {"ingressRate": 1000}})
    );

    // A plugin gets the previous result in the list's version.
    let old = conflist("conflists/podman-0.4.0.conflist").unwrap();
    let cfg = old
        .plugin_config(1, Version::V0_4_0, Some(&prev), &rc)
        .unwrap();
    assert_eq!(cfg["prevResult"]["cniVersion"], "0.4.0");
    assert_eq!(cfg["prevResult"]["ips"][0]["version"], "4");
    // What a plugin decodes from it is the same configuration.
    let decoded = NetConf::from_value(cfg).unwrap();
    decoded.validate().unwrap();
    assert_eq!(decoded.version().unwrap(), Version::V0_4_0);

    assert_eq!(
        list.plugin_config(3, version, None, &rc)
            .unwrap_err()
            .code(),
        ErrorCode::INVALID_CONFIG
    );
}

#[test]
fn single_configuration_becomes_a_list_of_one() {
    let conf = NetConf::from_value(fixture("configs/bridge-1.0.0.json")).unwrap();
    let list = ConfList::from_conf(conf.clone());
    list.validate().unwrap();
    assert_eq!(list.negotiate().unwrap(), Version::V1_0_0);
    let built = list
        .plugin_config(0, Version::V1_0_0, None, &Map::new())
        .unwrap();
    assert_eq!(built, conf.to_value());
}

#[test]
fn error_objects_read_and_write() {
    for (rel, code) in [
        ("errors/bridge-decode.json", 6),
        ("errors/bridge-incompatible.json", 1),
        ("errors/bridge-check-0.3.1.json", 1),
        ("errors/spec-example-1.1.0.json", 7),
        ("errors/status-not-ready-1.1.0.json", 50),
    ] {
        let raw = fixture(rel);
        let out: ErrorOutput = serde_json::from_value(raw.clone()).unwrap();
        assert_eq!(out.code, code, "{rel}");
        assert!(!out.msg.is_empty(), "{rel}");
        assert_eq!(serde_json::to_value(&out).unwrap(), raw, "{rel}");
    }
    let ours = ErrorOutput::from_error(
        &Error::invalid_config("ipam.ranges", "10.0.0.0/31 too small"),
        Version::V1_1_0,
    );
    let written = serde_json::to_value(&ours).unwrap();
    assert_eq!(written["cniVersion"], "1.1.0");
    assert_eq!(written["code"], 7);
    assert!(
        written["msg"]
            .as_str()
            .unwrap()
            .contains("ipam.ranges: 10.0.0.0/31 too small")
    );
    assert!(written.get("details").is_none());
}
