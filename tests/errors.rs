//! Malformed invocations against the real `cnikit` binary: each one must fail with the
//! right CNI error code on stdout and a non-zero exit, and create nothing: no link, address
//! or forwarding change in the node or the pod namespace, and no file in the data
//! directory (so no block claimed and no address held).
//!
//! Every case starts from a valid ADD (bridge pod network, block IPAM in a fresh data
//! directory) and breaks one thing; the message must say what is wrong, in the terms of the
//! input (which key, which value, which part of it), not in the words of the code behind
//! it. A plugin still running after a minute is killed with what it started, and fails:
//!
//! | input | code |
//! |---|---|
//! | `CNI_COMMAND` missing, unknown (`FROB`), lowercase (`add`) | 4 |
//! | `CNI_CONTAINERID` missing, with `/`, starting with `-` | 4 |
//! | `CNI_NETNS` missing on ADD, a regular file, a missing path, a mount namespace | 4 |
//! | `CNI_IFNAME` missing, 16 bytes long, with `/` | 4 |
//! | `CNI_ARGS` malformed, or an unknown key without `IgnoreUnknown` | 4 |
//! | `CNI_PATH` missing | 4 |
//! | stdin empty, blank, truncated JSON, a JSON array | 6 |
//! | `cniVersion` a number; `ipam` a string; `runtimeConfig.portMappings` a string | 6 |
//! | a port mapping whose `hostPort` and `HostPort` disagree | 6 |
//! | CHECK with a `prevResult` that is not a result | 6 |
//! | `cniVersion` `1.2.0`, absent, `0.2.0` | 1 |
//! | CHECK on 0.3.1, STATUS on 1.0.0, GC on 1.0.0 | 1 |
//! | `name` missing or invalid, `type` missing, `ipam` missing or without `type`, `ipam.type` a path or the plugin itself | 7 |
//! | CHECK without `prevResult`; GC (1.1.0) without `cni.dev/valid-attachments`, or with `cni.dev/attachments` listing others | 7 |
//! | `podNetwork` unknown; `mtu` 10, 70000, a string; `bridge` too long, `cnk…`, with `/` | 7 |
//! | `routing` `ebpf` with `podNetwork` `bridge` | 7 |
//! | `dataDir` relative; `nodeName` with `/`; `logLevel` unknown | 7 |
//! | `ipam.pool` missing, `/33`, `300.1.1.0/24`, without a prefix length, host bits set | 7 |
//! | `ipam.blockSize` larger than the pool, longer than an address, no room for a gateway | 7 |
//! | `ipam.maxBlocksPerNode` 0; `ipam.keyPrefix` without `/`; `ipam.store` unknown or not an object | 7 |
//! | DEL and STATUS with a pool with host bits | 7 |
//! | IPv6 pool with `mtu` 1000 (below the IPv6 minimum) | 7 |
//! | `ipam.store` etcd with an unknown key, or no endpoints | 7 |
//! | `ipam.store` etcd where no etcd listens | 11 |
//! | `ipam.type` a plugin missing from `CNI_PATH` | 102 |
#![cfg(all(feature = "bridge", feature = "routed"))]

mod common;

use std::path::Path;

use common::*;
use serde_json::{Value, json};

/// What the plugin gets on stdin.
enum Stdin {
    /// Exactly these bytes.
    Raw(&'static str),
    /// The valid base configuration, edited.
    Conf(fn(&mut Value)),
}

struct Case {
    what: &'static str,
    /// What the error message must say (it names the problem, in the configuration's terms).
    says: &'static str,
    /// `CNI_COMMAND` (before `env` edits).
    command: &'static str,
    /// Changes to the valid environment: `None` unsets. `{missing}` stands for a netns
    /// path that does not exist.
    env: &'static [(&'static str, Option<&'static str>)],
    stdin: Stdin,
    code: u64,
}

const fn case(
    what: &'static str,
    command: &'static str,
    env: &'static [(&'static str, Option<&'static str>)],
    stdin: Stdin,
    code: u64,
    says: &'static str,
) -> Case {
    Case {
        what,
        says,
        command,
        env,
        stdin,
        code,
    }
}

fn keep(_: &mut Value) {}

#[rustfmt::skip]
const CASES: &[Case] = &[
    // The environment (code 4).
    case("CNI_COMMAND missing", "ADD", &[("CNI_COMMAND", None)], Stdin::Conf(keep), 4, "CNI_COMMAND: missing"),
    case("unknown command", "FROB", &[], Stdin::Conf(keep), 4, "unknown command \"FROB\""),
    case("lowercase command", "add", &[], Stdin::Conf(keep), 4, "unknown command \"add\""),
    case("CNI_CONTAINERID missing", "ADD", &[("CNI_CONTAINERID", None)], Stdin::Conf(keep), 4, "CNI_CONTAINERID: required for ADD"),
    case("container ID with '/'", "ADD", &[("CNI_CONTAINERID", Some("ctr/1"))], Stdin::Conf(keep), 4, "\"ctr/1\" may only contain"),
    case("container ID starting with '-'", "ADD", &[("CNI_CONTAINERID", Some("-ctr"))], Stdin::Conf(keep), 4, "must start with a letter or a digit"),
    case("CNI_NETNS missing on ADD", "ADD", &[("CNI_NETNS", None)], Stdin::Conf(keep), 4, "CNI_NETNS: required for ADD"),
    case("netns a regular file", "ADD", &[("CNI_NETNS", Some("/etc/hostname"))], Stdin::Conf(keep), 4, "/etc/hostname is not a network namespace: not a namespace file"),
    case("netns missing", "ADD", &[("CNI_NETNS", Some("{missing}"))], Stdin::Conf(keep), 4, "no-such-netns is not a network namespace: no such file"),
    case("netns a mount namespace", "ADD", &[("CNI_NETNS", Some("/proc/self/ns/mnt"))], Stdin::Conf(keep), 4, "a namespace, but not a network namespace"),
    case("CNI_IFNAME missing", "ADD", &[("CNI_IFNAME", None)], Stdin::Conf(keep), 4, "CNI_IFNAME: required for ADD"),
    case("ifname of 16 bytes", "ADD", &[("CNI_IFNAME", Some("eth0123456789abc"))], Stdin::Conf(keep), 4, "is 16 bytes long, at most 15"),
    case("ifname with '/'", "ADD", &[("CNI_IFNAME", Some("eth/0"))], Stdin::Conf(keep), 4, "\"eth/0\" contains"),
    case("CNI_ARGS malformed", "ADD", &[("CNI_ARGS", Some("novalue"))], Stdin::Conf(keep), 4, "malformed pair \"novalue\""),
    case("CNI_ARGS unknown key", "ADD", &[("CNI_ARGS", Some("FOO=bar"))], Stdin::Conf(keep), 4, "unknown keys [\"FOO\"]"),
    case("CNI_PATH missing", "ADD", &[("CNI_PATH", None)], Stdin::Conf(keep), 4, "CNI_PATH: required for ADD"),
    // Decoding (code 6).
    case("empty stdin", "ADD", &[], Stdin::Raw(""), 6, "input is empty"),
    case("blank stdin", "ADD", &[], Stdin::Raw(" \n\t"), 6, "input is empty"),
    case("truncated JSON", "ADD", &[], Stdin::Raw(r#"{"cniVersion": "1.0.0", "name": "errs", "type": "cnik"#), 6, "EOF while parsing"),
    case("JSON array", "ADD", &[], Stdin::Raw(r#"[{"cniVersion": "1.0.0"}]"#), 6, "expected a JSON object"),
    case("cniVersion a number", "ADD", &[], Stdin::Conf(|c| c["cniVersion"] = json!(1.0)), 6, "cniVersion: expected a string"),
    case("ipam a string", "ADD", &[], Stdin::Conf(|c| c["ipam"] = json!("cnikit-ipam")), 6, "ipam: invalid type: string \"cnikit-ipam\", expected a JSON object"),
    case("port mapping whose hostPort and HostPort disagree", "ADD", &[], Stdin::Conf(|c| {
        c["runtimeConfig"] = json!({"portMappings": [{"hostPort": 80, "HostPort": 81, "containerPort": 80}]})
    }), 6, "runtimeConfig.portMappings[0]: hostPort 80 and HostPort 81 disagree"),
    case("portMappings a string", "ADD", &[], Stdin::Conf(|c| c["runtimeConfig"] = json!({"portMappings": "80:80"})), 6, "runtimeConfig.portMappings: invalid type: string \"80:80\", expected a JSON array"),
    case("CHECK with a prevResult that is no result", "CHECK", &[], Stdin::Conf(|c| c["prevResult"] = json!("nonsense")), 6, "cannot decode prevResult"),
    // Versions (code 1).
    case("cniVersion 1.2.0", "ADD", &[], Stdin::Conf(|c| c["cniVersion"] = json!("1.2.0")), 1, "incompatible CNI version \"1.2.0\""),
    case("cniVersion absent", "ADD", &[], Stdin::Conf(|c| drop(c.as_object_mut().unwrap().remove("cniVersion"))), 1, "none (0.1.0 implied)"),
    case("cniVersion 0.2.0", "ADD", &[], Stdin::Conf(|c| c["cniVersion"] = json!("0.2.0")), 1, "incompatible CNI version \"0.2.0\""),
    case("CHECK on 0.3.1", "CHECK", &[], Stdin::Conf(|c| c["cniVersion"] = json!("0.3.1")), 1, "CHECK needs CNI version 0.4.0"),
    case("STATUS on 1.0.0", "STATUS", &[], Stdin::Conf(keep), 1, "STATUS needs CNI version 1.1.0"),
    case("GC on 1.0.0", "GC", &[], Stdin::Conf(|c| c["cni.dev/valid-attachments"] = json!([])), 1, "GC needs CNI version 1.1.0"),
    // The configuration (code 7).
    case("name missing", "ADD", &[], Stdin::Conf(|c| drop(c.as_object_mut().unwrap().remove("name"))), 7, "name: missing network name"),
    case("name with a space", "ADD", &[], Stdin::Conf(|c| c["name"] = json!("bad name")), 7, "\"bad name\" must match"),
    case("type missing", "ADD", &[], Stdin::Conf(|c| drop(c.as_object_mut().unwrap().remove("type"))), 7, "type: missing plugin type"),
    case("ipam missing", "ADD", &[], Stdin::Conf(|c| drop(c.as_object_mut().unwrap().remove("ipam"))), 7, "ipam: missing"),
    case("ipam without type", "ADD", &[], Stdin::Conf(|c| drop(c["ipam"].as_object_mut().unwrap().remove("type"))), 7, "ipam.type: missing plugin type"),
    case("ipam.type a path", "ADD", &[], Stdin::Conf(|c| c["ipam"]["type"] = json!("../cnikit")), 7, "\"../cnikit\" is not a plugin name"),
    case("ipam.type the plugin itself", "ADD", &[], Stdin::Conf(|c| c["ipam"] = json!({"type": "cnikit"})), 7, "ipam.type: \"cnikit\" is this plugin's own type"),
    case("CHECK without prevResult", "CHECK", &[], Stdin::Conf(keep), 7, "CHECK needs the result of ADD"),
    case("GC without valid-attachments", "GC", &[], Stdin::Conf(|c| c["cniVersion"] = json!("1.1.0")), 7, "GC needs the list of valid attachments"),
    case("GC whose two attachment keys disagree", "GC", &[], Stdin::Conf(|c| {
        c["cniVersion"] = json!("1.1.0");
        c["cni.dev/valid-attachments"] = json!([{"containerID": "a", "ifname": "eth0"}]);
        c["cni.dev/attachments"] = json!([{"containerID": "b", "ifname": "eth0"}]);
    }), 7, "cni.dev/attachments: lists [b/eth0] but cni.dev/valid-attachments lists [a/eth0]"),
    case("podNetwork unknown", "ADD", &[], Stdin::Conf(|c| c["podNetwork"] = json!("ovs")), 7, "unknown variant `ovs`"),
    case("routing ebpf without the ebpf pod network", "ADD", &[], Stdin::Conf(|c| c["routing"] = json!("ebpf")), 7, "\"routing\": \"ebpf\" needs \"podNetwork\": \"ebpf\""),
    case("mtu 10", "ADD", &[], Stdin::Conf(|c| c["mtu"] = json!(10)), 7, "mtu: 10 is outside 68..=65535"),
    case("mtu 70000", "ADD", &[], Stdin::Conf(|c| c["mtu"] = json!(70000)), 7, "mtu: 70000 is outside 68..=65535"),
    case("mtu a string", "ADD", &[], Stdin::Conf(|c| c["mtu"] = json!("1500")), 7, "mtu: invalid type: string \"1500\", expected a whole number"),
    case("bridge name too long", "ADD", &[], Stdin::Conf(|c| c["bridge"] = json!("a-bridge-too-long")), 7, "is longer than 15 bytes"),
    case("bridge named like a host veth", "ADD", &[], Stdin::Conf(|c| c["bridge"] = json!("cnkbr")), 7, "names starting with \"cnk\""),
    case("bridge name with '/'", "ADD", &[], Stdin::Conf(|c| c["bridge"] = json!("br/0")), 7, "\"br/0\" contains"),
    case("dataDir relative", "ADD", &[], Stdin::Conf(|c| c["dataDir"] = json!("state/cnikit")), 7, "dataDir: state/cnikit is not an absolute path"),
    case("nodeName with '/'", "ADD", &[], Stdin::Conf(|c| c["nodeName"] = json!("node/1")), 7, "\"node/1\" is not a node name"),
    case("logLevel unknown", "ADD", &[], Stdin::Conf(|c| c["logLevel"] = json!("loud")), 7, "unknown level \"loud\""),
    case("pool missing", "ADD", &[], Stdin::Conf(|c| drop(c["ipam"].as_object_mut().unwrap().remove("pool"))), 7, "missing field `pool`"),
    case("pool /33", "ADD", &[], Stdin::Conf(|c| c["ipam"]["pool"] = json!("10.0.0.0/33")), 7, "prefix length /33 is not valid for an IPv4 address (0 to 32)"),
    case("pool 300.1.1.0/24", "ADD", &[], Stdin::Conf(|c| c["ipam"]["pool"] = json!("300.1.1.0/24")), 7, "\"300.1.1.0\" is not an IPv4 or IPv6 address"),
    case("pool without a prefix length", "ADD", &[], Stdin::Conf(|c| c["ipam"]["pool"] = json!("10.250.0.0")), 7, "ipam.pool: \"10.250.0.0\" has no prefix length"),
    case("pool with host bits", "ADD", &[], Stdin::Conf(|c| c["ipam"]["pool"] = json!("10.250.0.1/24")), 7, "has host bits set"),
    case("block larger than the pool", "ADD", &[], Stdin::Conf(|c| c["ipam"]["blockSize"] = json!(16)), 7, "a /16 block is larger than the pool"),
    case("blockSize longer than an address", "ADD", &[], Stdin::Conf(|c| c["ipam"]["blockSize"] = json!(33)), 7, "/33 is longer than an address"),
    case("block with no room for a gateway", "ADD", &[], Stdin::Conf(|c| c["ipam"]["blockSize"] = json!(31)), 7, "a /31 block has no address left"),
    case("maxBlocksPerNode 0", "ADD", &[], Stdin::Conf(|c| c["ipam"]["maxBlocksPerNode"] = json!(0)), 7, "must be at least 1"),
    case("keyPrefix without '/'", "ADD", &[], Stdin::Conf(|c| c["ipam"]["keyPrefix"] = json!("cnikit")), 7, "must start with '/'"),
    case("unknown store type", "ADD", &[], Stdin::Conf(|c| c["ipam"]["store"] = json!({"type": "redis"})), 7, "unknown store \"redis\""),
    case("store not an object", "ADD", &[], Stdin::Conf(|c| c["ipam"]["store"] = json!("file")), 7, "ipam.store: must be an object"),
    case("DEL with a pool with host bits", "DEL", &[], Stdin::Conf(|c| c["ipam"]["pool"] = json!("10.250.0.1/24")), 7, "has host bits set"),
    case("STATUS with a pool with host bits", "STATUS", &[], Stdin::Conf(|c| {
        c["cniVersion"] = json!("1.1.0");
        c["ipam"]["pool"] = json!("10.250.0.1/24");
    }), 7, "has host bits set"),
    case("IPv6 pool with mtu 1000", "ADD", &[], Stdin::Conf(|c| {
        c["mtu"] = json!(1000);
        c["ipam"]["pool"] = json!("fd00:250::/120");
        c["ipam"]["blockSize"] = json!(124);
    }), 7, "is below 1280"),
    case("etcd store with an unknown key", "ADD", &[], Stdin::Conf(|c| {
        c["ipam"]["store"] = json!({"type": "etcd", "endpoints": ["http://127.0.0.1:9"], "cafile": "/x"})
    }), 7, "unknown field `cafile`"),
    case("etcd store without endpoints", "ADD", &[], Stdin::Conf(|c| {
        c["ipam"]["store"] = json!({"type": "etcd", "endpoints": []})
    }), 7, "needs at least one etcd client URL"),
    // The datastore is unreachable: try again later (code 11), not a configuration error
    // (a build without the `etcd` feature refuses the store type: 7).
    case("etcd store where no etcd listens", "ADD", &[], Stdin::Conf(|c| {
        c["ipam"]["store"] = json!({
            "type": "etcd", "endpoints": ["http://127.0.0.1:9"], "dialTimeoutMs": 500, "timeoutMs": 500
        })
    }), if cfg!(feature = "etcd") { 11 } else { 7 },
       if cfg!(feature = "etcd") { "datastore http://127.0.0.1:9 is unavailable" } else { "no `etcd` feature" }),
    // Delegation (code 102).
    case("delegated IPAM not in CNI_PATH", "ADD", &[], Stdin::Conf(|c| c["ipam"] = json!({"type": "no-such-ipam"})), 102, "cannot run plugin no-such-ipam: not found in CNI_PATH"),
];

/// The valid configuration every case starts from.
fn base(data_dir: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "errs",
        "type": "cnikit",
        "podNetwork": "bridge",
        "bridge": "cnikit0",
        "dataDir": data_dir,
        "nodeName": "node-e",
        "ipam": {"type": "cnikit-ipam", "pool": "10.250.0.0/24", "blockSize": 28}
    })
}

/// What must not change in a namespace.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    links: std::collections::BTreeSet<String>,
    addresses: std::collections::BTreeSet<String>,
    forwarding: String,
}

fn snapshot(ns: &Ns) -> Snapshot {
    Snapshot {
        links: links(&ns.name),
        addresses: addresses(&ns.name),
        forwarding: sysctl(&ns.path, "net.ipv4.ip_forward"),
    }
}

#[test]
fn malformed_input_fails_with_its_code_and_creates_nothing() {
    let Some(env) = Env::get("malformed_input_fails_with_its_code_and_creates_nothing") else {
        return;
    };
    assert!(CASES.len() >= 30);
    let lab = Lab::new("err");
    let node = lab.node();
    let pod = lab.pod("pod");
    let cwd = lab.dir("cwd");
    let missing = lab.path("no-such-netns");
    let cni_path = env.cni_path_var();
    let node_before = snapshot(&node);
    let pod_before = snapshot(&pod);

    let mut failures = Vec::new();
    for (i, c) in CASES.iter().enumerate() {
        let data = lab.path(&format!("data-{i}"));
        let stdin = match &c.stdin {
            Stdin::Raw(text) => text.to_string(),
            Stdin::Conf(edit) => {
                let mut conf = base(&data);
                if c.command == "CHECK" && !c.what.contains("prevResult") {
                    conf["prevResult"] = json!({"cniVersion": "1.0.0", "ips": []});
                }
                edit(&mut conf);
                conf.to_string()
            }
        };
        let pod_path = pod.path.display().to_string();
        let mut vars: Vec<(&str, String)> = vec![
            ("CNI_COMMAND", c.command.to_owned()),
            ("CNI_CONTAINERID", "ctr-err".to_owned()),
            ("CNI_NETNS", pod_path),
            ("CNI_IFNAME", "eth0".to_owned()),
            ("CNI_PATH", cni_path.clone()),
        ];
        for (key, value) in c.env {
            vars.retain(|(k, _)| k != key);
            if let Some(v) = value {
                let v = v.replace("{missing}", &missing.display().to_string());
                vars.push((key, v));
            }
        }
        let env_refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let limit = std::time::Duration::from_secs(60);
        let Some(out) = run_bounded(
            &env.plugin,
            &node.path,
            &env_refs,
            stdin.as_bytes(),
            &cwd,
            limit,
        ) else {
            failures.push(format!("{}: still running after {limit:?}", c.what));
            continue;
        };
        let code = out.error_code(c.what);
        let msg = out
            .json()
            .and_then(|j| j["msg"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let left = files_under(&data);
        let cwd_left = files_under(&cwd);
        let (node_now, pod_now) = (snapshot(&node), snapshot(&pod));
        let ok = code == c.code
            && msg.contains(c.says)
            && left.is_empty()
            && cwd_left.is_empty()
            && node_now == node_before
            && pod_now == pod_before;
        println!(
            "{:<45} -> {code:>3} (want {:>3}) {:?}{} {msg}",
            c.what,
            c.code,
            out.elapsed,
            if ok { "" } else { "  <-- WRONG" },
        );
        if !ok {
            failures.push(format!(
                "{}: code {code} (want {}); says {:?} (want {:?}); data dir: {left:?}; cwd: \
                 {cwd_left:?}; node changed: {}; pod changed: {}; stdout: {}",
                c.what,
                c.code,
                msg,
                c.says,
                node_now != node_before,
                pod_now != pod_before,
                out.brief()
            ));
        }
    }

    // The control: the unbroken input works (so the failures above are the edits').
    let data = lab.path("data-control");
    let runtime = Runtime::new(&env, &lab, &node);
    let result = runtime.add("ctr-err", &pod, &base(&data));
    assert!(ipv4_of(&pod.name, "eth0").contains(&result_ip(&result)));
    runtime.del("ctr-err", Some(&pod.path), &base(&data));
    assert!(StoreView::read(&data).holds_nothing());

    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}
