//! The plugin runner: environment and stdin validation, dispatch, output.
//!
//! A recording plugin stands in for a real one: every malformed invocation must print one
//! error object with the right code, exit non-zero, and never reach the plugin.

use std::sync::Mutex;

use async_trait::async_trait;
use cni_core::ipam::Attachment;
use cni_core::runner::{self, Plugin, Request};
use cni_core::spec::{CniResult, Command, Interface, IpConfig, Route, Version};
use cni_core::{Error, Result};
use serde_json::{Value, json};

/// Records every call; answers ADD with a fixed 1.1.0-shaped result.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<(Command, Request, Vec<Attachment>)>>,
    fail: Option<fn() -> Error>,
}

impl Recorder {
    fn failing(fail: fn() -> Error) -> Self {
        Recorder {
            fail: Some(fail),
            ..Recorder::default()
        }
    }

    fn record(&self, request: &Request, valid: &[Attachment]) -> Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push((request.command, request.clone(), valid.to_vec()));
        match self.fail {
            Some(f) => Err(f()),
            None => Ok(()),
        }
    }

    fn calls(&self) -> Vec<(Command, Request, Vec<Attachment>)> {
        self.calls.lock().unwrap().clone()
    }
}

fn canned_result() -> CniResult {
    CniResult {
        interfaces: vec![
            Interface {
                name: "calia1b2c3".into(),
                mac: Some("ee:ee:ee:ee:ee:ee".parse().unwrap()),
                mtu: Some(1450),
                ..Interface::default()
            },
            Interface {
                name: "eth0".into(),
                mac: Some("5a:1e:83:c4:2d:07".parse().unwrap()),
                mtu: Some(1450),
                sandbox: Some("/var/run/netns/pod".into()),
                ..Interface::default()
            },
        ],
        ips: vec![
            IpConfig {
                address: "10.244.1.7/32".parse().unwrap(),
                gateway: Some("169.254.1.1".parse().unwrap()),
                interface: Some(1),
            },
            IpConfig {
                address: "fd00::7/128".parse().unwrap(),
                gateway: None,
                interface: Some(1),
            },
        ],
        routes: vec![Route {
            scope: Some(253),
            ..Route::new("169.254.1.1/32".parse().unwrap(), None)
        }],
        ..CniResult::default()
    }
}

#[async_trait]
impl Plugin for Recorder {
    async fn add(&self, request: &Request) -> Result<CniResult> {
        self.record(request, &[])?;
        Ok(canned_result())
    }
    async fn del(&self, request: &Request) -> Result<()> {
        self.record(request, &[])
    }
    async fn check(&self, request: &Request) -> Result<()> {
        self.record(request, &[])
    }
    async fn gc(&self, request: &Request, valid: &[Attachment]) -> Result<()> {
        self.record(request, valid)
    }
    async fn status(&self, request: &Request) -> Result<()> {
        self.record(request, &[])
    }
}

/// A plugin with its own `CNI_ARGS` key and the default GC/STATUS.
struct WithArgs(Recorder);

#[async_trait]
impl Plugin for WithArgs {
    async fn add(&self, request: &Request) -> Result<CniResult> {
        self.0.add(request).await
    }
    async fn del(&self, request: &Request) -> Result<()> {
        self.0.del(request).await
    }
    async fn check(&self, request: &Request) -> Result<()> {
        self.0.check(request).await
    }
    fn extra_args(&self) -> &'static [&'static str] {
        &["IP"]
    }
}

const CONF: &str = r#"{"cniVersion": "1.1.0", "name": "cnikit", "type": "cnikit",
    "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]]}}"#;

fn conf(version: &str) -> String {
    CONF.replace("1.1.0", version)
}

fn with_prev(version: &str) -> String {
    let mut v: Value = serde_json::from_str(&conf(version)).unwrap();
    v["prevResult"] = canned_result().to_json(version.parse().unwrap());
    v.to_string()
}

fn env_for(command: &str) -> Vec<(String, String)> {
    [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "3f1c0a9b2e7d4c58"),
        ("CNI_NETNS", "/var/run/netns/cni-1234"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=3f1c0a9b2e7d4c58;K8S_POD_UID=0d1e2f",
        ),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ("PATH", "/usr/bin"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// `(key, Some(value))` sets, `(key, None)` removes.
fn edit(mut env: Vec<(String, String)>, changes: &[(&str, Option<&str>)]) -> Vec<(String, String)> {
    for (key, value) in changes {
        env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            env.push(((*key).to_owned(), (*v).to_owned()));
        }
    }
    env
}

async fn invoke(plugin: &dyn Plugin, env: Vec<(String, String)>, stdin: &str) -> (i32, Vec<u8>) {
    let mut out = Vec::new();
    let code = runner::run(plugin, env, stdin.as_bytes(), &mut out).await;
    (code, out)
}

/// Asserts that `out` is exactly one error object with `code` and a message.
fn assert_error_object(case: &str, out: &[u8], code: u32) -> Value {
    let v: Value = serde_json::from_slice(out).unwrap_or_else(|e| {
        panic!(
            "{case}: stdout is not one JSON document ({e}): {:?}",
            String::from_utf8_lossy(out)
        )
    });
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{case}: not an object"));
    assert_eq!(v["code"], code, "{case}: {v}");
    assert!(
        v["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "{case}: no msg: {v}"
    );
    assert!(v["cniVersion"].is_string(), "{case}: no cniVersion: {v}");
    for key in obj.keys() {
        assert!(
            ["cniVersion", "code", "msg", "details"].contains(&key.as_str()),
            "{case}: unexpected key {key}"
        );
    }
    v
}

struct Case {
    name: &'static str,
    command: &'static str,
    env: Vec<(&'static str, Option<&'static str>)>,
    stdin: String,
    code: u32,
}

fn case(
    name: &'static str,
    command: &'static str,
    env: &[(&'static str, Option<&'static str>)],
    stdin: impl Into<String>,
    code: u32,
) -> Case {
    Case {
        name,
        command,
        env: env.to_vec(),
        stdin: stdin.into(),
        code,
    }
}

fn malformed_cases() -> Vec<Case> {
    let ok = || conf("1.1.0");
    let set = |v: &'static str| Some(v);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v: Value = serde_json::from_str(&ok()).unwrap();
        f(&mut v);
        v.to_string()
    };
    vec![
        // CNI_COMMAND
        case("no command", "ADD", &[("CNI_COMMAND", None)], ok(), 4),
        case("empty command", "", &[], ok(), 4),
        case("unknown command", "ATTACH", &[], ok(), 4),
        case("lowercase command", "add", &[], ok(), 4),
        // CNI_CONTAINERID
        case(
            "ADD without container id",
            "ADD",
            &[("CNI_CONTAINERID", None)],
            ok(),
            4,
        ),
        case(
            "ADD with empty container id",
            "ADD",
            &[("CNI_CONTAINERID", set(""))],
            ok(),
            4,
        ),
        case(
            "container id starts with -",
            "ADD",
            &[("CNI_CONTAINERID", set("-abc"))],
            ok(),
            4,
        ),
        case(
            "container id with /",
            "ADD",
            &[("CNI_CONTAINERID", set("abc/../x"))],
            ok(),
            4,
        ),
        case(
            "container id with space",
            "DEL",
            &[("CNI_CONTAINERID", set("abc def"))],
            ok(),
            4,
        ),
        case(
            "DEL without container id",
            "DEL",
            &[("CNI_CONTAINERID", None)],
            ok(),
            4,
        ),
        // CNI_NETNS
        case("ADD without netns", "ADD", &[("CNI_NETNS", None)], ok(), 4),
        case(
            "ADD with empty netns",
            "ADD",
            &[("CNI_NETNS", set(""))],
            ok(),
            4,
        ),
        case(
            "CHECK without netns",
            "CHECK",
            &[("CNI_NETNS", None)],
            with_prev("1.1.0"),
            4,
        ),
        // CNI_IFNAME
        case(
            "ADD without ifname",
            "ADD",
            &[("CNI_IFNAME", None)],
            ok(),
            4,
        ),
        case(
            "DEL without ifname",
            "DEL",
            &[("CNI_IFNAME", None)],
            ok(),
            4,
        ),
        case(
            "ifname of 16 bytes",
            "ADD",
            &[("CNI_IFNAME", set("eth0123456789abc"))],
            ok(),
            4,
        ),
        case("ifname .", "ADD", &[("CNI_IFNAME", set("."))], ok(), 4),
        case("ifname ..", "ADD", &[("CNI_IFNAME", set(".."))], ok(), 4),
        case(
            "ifname with /",
            "ADD",
            &[("CNI_IFNAME", set("eth/0"))],
            ok(),
            4,
        ),
        case(
            "ifname with :",
            "ADD",
            &[("CNI_IFNAME", set("eth0:1"))],
            ok(),
            4,
        ),
        case(
            "ifname with space",
            "ADD",
            &[("CNI_IFNAME", set("eth 0"))],
            ok(),
            4,
        ),
        // CNI_ARGS
        case(
            "unknown arg",
            "ADD",
            &[("CNI_ARGS", set("K8S_POD_NAME=a;FOO=bar"))],
            ok(),
            4,
        ),
        case(
            "malformed arg",
            "ADD",
            &[("CNI_ARGS", set("IgnoreUnknown=1;K8S_POD_NAME"))],
            ok(),
            4,
        ),
        case(
            "bad IgnoreUnknown",
            "ADD",
            &[("CNI_ARGS", set("IgnoreUnknown=yes;FOO=1"))],
            ok(),
            4,
        ),
        case(
            "empty arg pair",
            "DEL",
            &[("CNI_ARGS", set("K8S_POD_NAME=a;;K8S_POD_UID=b"))],
            ok(),
            4,
        ),
        case(
            "arg with empty key",
            "ADD",
            &[("CNI_ARGS", set("IgnoreUnknown=1;=x"))],
            ok(),
            4,
        ),
        // CNI_PATH
        case(
            "ADD without CNI_PATH",
            "ADD",
            &[("CNI_PATH", None)],
            ok(),
            4,
        ),
        case("GC without CNI_PATH", "GC", &[("CNI_PATH", None)], ok(), 4),
        // stdin
        case("empty stdin", "ADD", &[], "", 6),
        case("blank stdin", "ADD", &[], " \n\t", 6),
        case("truncated JSON", "ADD", &[], &ok()[..40], 6),
        case("not JSON", "ADD", &[], "cniVersion=1.0.0", 6),
        case("JSON array", "ADD", &[], "[1, 2]", 6),
        case("two documents", "ADD", &[], format!("{}{}", ok(), ok()), 6),
        case(
            "cniVersion is a number",
            "ADD",
            &[],
            with(&|v| v["cniVersion"] = json!(1.0)),
            6,
        ),
        case(
            "ipam is a string",
            "ADD",
            &[],
            with(&|v| v["ipam"] = json!("host-local")),
            6,
        ),
        case(
            "capabilities not a map",
            "ADD",
            &[],
            with(&|v| v["capabilities"] = json!(["x"])),
            6,
        ),
        case(
            "dns nameservers not a list",
            "ADD",
            &[],
            with(&|v| v["dns"] = json!({"nameservers": "10.0.0.10"})),
            6,
        ),
        case(
            "bad port mapping",
            "ADD",
            &[],
            with(&|v| {
                v["runtimeConfig"] =
                    json!({"portMappings": [{"hostPort": "x", "containerPort": 80}]})
            }),
            6,
        ),
        case(
            "prevResult undecodable",
            "ADD",
            &[],
            with(&|v| {
                v["prevResult"] = json!({"cniVersion": "1.1.0", "ips": [{"address": "bogus"}]})
            }),
            6,
        ),
        case(
            "prevResult a string",
            "DEL",
            &[],
            with(&|v| v["prevResult"] = json!("ok")),
            6,
        ),
        // versions
        case("unknown cniVersion", "ADD", &[], conf("9.9.9"), 1),
        case("unreleased cniVersion", "ADD", &[], conf("1.2.0"), 1),
        case("pre-chaining cniVersion", "ADD", &[], conf("0.2.0"), 1),
        case(
            "no cniVersion",
            "ADD",
            &[],
            with(&|v| {
                v.as_object_mut().unwrap().remove("cniVersion");
            }),
            1,
        ),
        case("CHECK on 0.3.1", "CHECK", &[], with_prev("0.3.1"), 1),
        case("CHECK on 0.3.0", "CHECK", &[], with_prev("0.3.0"), 1),
        case("GC on 1.0.0", "GC", &[], conf("1.0.0"), 1),
        case("STATUS on 0.4.0", "STATUS", &[], conf("0.4.0"), 1),
        // configuration
        case(
            "no name",
            "ADD",
            &[],
            with(&|v| {
                v.as_object_mut().unwrap().remove("name");
            }),
            7,
        ),
        case(
            "invalid name",
            "ADD",
            &[],
            with(&|v| v["name"] = json!("my net")),
            7,
        ),
        case(
            "name with /",
            "DEL",
            &[],
            with(&|v| v["name"] = json!("../etc")),
            7,
        ),
        case(
            "no type",
            "ADD",
            &[],
            with(&|v| {
                v.as_object_mut().unwrap().remove("type");
            }),
            7,
        ),
        case(
            "ipam without type",
            "ADD",
            &[],
            with(&|v| v["ipam"] = json!({"subnet": "10.0.0.0/24"})),
            7,
        ),
        case(
            "ipam type is a path",
            "ADD",
            &[],
            with(&|v| v["ipam"]["type"] = json!("../../bin/sh")),
            7,
        ),
        case("CHECK without prevResult", "CHECK", &[], ok(), 7),
        case("GC without valid attachments", "GC", &[], ok(), 7),
        case(
            "GC attachments malformed",
            "GC",
            &[],
            with(&|v| v["cni.dev/valid-attachments"] = json!(["3f1c0a9b2e7d4c58/eth0"])),
            6,
        ),
    ]
}

#[tokio::test]
async fn malformed_invocations_never_reach_the_plugin() {
    let cases = malformed_cases();
    assert!(cases.len() >= 30);
    for c in cases {
        let plugin = Recorder::default();
        let env = edit(env_for(c.command), &c.env);
        let (exit, out) = invoke(&plugin, env, &c.stdin).await;
        assert_eq!(exit, 1, "{}: exit code", c.name);
        assert_error_object(c.name, &out, c.code);
        assert!(
            plugin.calls().is_empty(),
            "{}: the plugin was called",
            c.name
        );
    }
}

#[tokio::test]
async fn errors_are_printed_in_the_configuration_version() {
    let plugin = Recorder::default();
    let (_, out) = invoke(&plugin, env_for("CHECK"), &with_prev("0.3.1")).await;
    let v = assert_error_object("CHECK on 0.3.1", &out, 1);
    assert_eq!(v["cniVersion"], "0.3.1");
    assert!(v["msg"].as_str().unwrap().contains("0.4.0"), "{v}");

    let (_, out) = invoke(&plugin, env_for("ADD"), &conf("9.9.9")).await;
    let v = assert_error_object("unknown version", &out, 1);
    assert_eq!(
        v["cniVersion"], "1.1.0",
        "unknown version: answered in the newest"
    );
    assert!(v["msg"].as_str().unwrap().contains("9.9.9"), "{v}");

    let plugin = Recorder::failing(|| Error::NoAddress {
        pool: "10.244.0.0/16".into(),
        reason: "every block is taken".into(),
    });
    let (exit, out) = invoke(&plugin, env_for("ADD"), &conf("0.4.0")).await;
    assert_eq!(exit, 1);
    let v = assert_error_object("plugin error", &out, 100);
    assert_eq!(v["cniVersion"], "0.4.0");
    assert_eq!(plugin.calls().len(), 1);
}

#[tokio::test]
async fn add_prints_the_result_in_the_configuration_version() {
    for version in Version::ALL {
        let plugin = Recorder::default();
        let stdin = conf(version.as_str());
        let (exit, out) = invoke(&plugin, env_for("ADD"), &stdin).await;
        assert_eq!(exit, 0, "{version}: {}", String::from_utf8_lossy(&out));
        let printed: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(printed, canned_result().to_json(version), "{version}");
        assert_eq!(printed["cniVersion"], version.as_str());
        assert_eq!(printed["ips"][0]["interface"], 1);
        if version < Version::V1_0_0 {
            assert_eq!(printed["ips"][1]["version"], "6");
        }
        if version < Version::V1_1_0 {
            assert!(printed["interfaces"][0].get("mtu").is_none());
            assert!(printed["routes"][0].get("scope").is_none());
        } else {
            assert_eq!(printed["interfaces"][0]["mtu"], 1450);
            assert_eq!(printed["routes"][0]["scope"], 253);
        }

        let calls = plugin.calls();
        assert_eq!(calls.len(), 1);
        let (command, req, _) = &calls[0];
        assert_eq!(*command, Command::Add);
        assert_eq!(req.version, version);
        assert_eq!(req.container_id, "3f1c0a9b2e7d4c58");
        assert_eq!(
            req.netns.as_deref(),
            Some(std::path::Path::new("/var/run/netns/cni-1234"))
        );
        assert_eq!(req.ifname, "eth0");
        assert!(req.args.ignore_unknown);
        assert_eq!(req.args.k8s_pod_namespace.as_deref(), Some("default"));
        assert_eq!(req.args.k8s_pod_name.as_deref(), Some("web-0"));
        assert_eq!(
            req.args.k8s_pod_infra_container_id.as_deref(),
            Some("3f1c0a9b2e7d4c58")
        );
        assert_eq!(req.args.k8s_pod_uid.as_deref(), Some("0d1e2f"));
        assert_eq!(
            req.cni_path,
            [
                std::path::PathBuf::from("/opt/cni/bin"),
                "/usr/lib/cni".into()
            ]
        );
        assert_eq!(req.stdin, stdin.as_bytes());
        assert_eq!(req.config.ipam.as_ref().unwrap().ipam_type, "host-local");
        assert_eq!(
            req.attachment(),
            Attachment::new("cnikit", "3f1c0a9b2e7d4c58", "eth0")
        );
    }
}

#[tokio::test]
async fn del_check_gc_status_print_nothing() {
    // DEL without a netns (it may be gone) and with a 0.4.0 prevResult.
    let plugin = Recorder::default();
    let env = edit(env_for("DEL"), &[("CNI_NETNS", None)]);
    let (exit, out) = invoke(&plugin, env, &with_prev("0.4.0")).await;
    assert_eq!((exit, out.as_slice()), (0, &b""[..]));
    let calls = plugin.calls();
    assert_eq!(calls[0].0, Command::Del);
    assert_eq!(calls[0].1.netns, None);
    assert_eq!(calls[0].1.prev_result, Some(canned_result_in("0.4.0")));

    // CHECK gets the decoded prevResult.
    let plugin = Recorder::default();
    let (exit, out) = invoke(&plugin, env_for("CHECK"), &with_prev("1.0.0")).await;
    assert_eq!((exit, out.as_slice()), (0, &b""[..]));
    assert_eq!(
        plugin.calls()[0].1.prev_result,
        Some(canned_result_in("1.0.0"))
    );

    // GC ignores attachment variables, even invalid ones, and gets the valid attachments.
    let plugin = Recorder::default();
    let env = edit(
        env_for("GC"),
        &[
            ("CNI_CONTAINERID", Some("not valid!")),
            ("CNI_IFNAME", Some("..")),
            ("CNI_ARGS", Some("garbage")),
        ],
    );
    let mut gc: Value = serde_json::from_str(&conf("1.1.0")).unwrap();
    gc["cni.dev/valid-attachments"] = json!([
        {"containerID": "c1", "ifname": "eth0"},
        {"containerID": "c2", "ifname": "net1"}
    ]);
    let (exit, out) = invoke(&plugin, env, &gc.to_string()).await;
    assert_eq!((exit, out.as_slice()), (0, &b""[..]));
    let calls = plugin.calls();
    assert_eq!(calls[0].0, Command::Gc);
    assert_eq!(calls[0].1.container_id, "");
    assert_eq!(calls[0].1.netns, None);
    assert_eq!(
        calls[0].2,
        [
            Attachment::new("cnikit", "c1", "eth0"),
            Attachment::new("cnikit", "c2", "net1")
        ]
    );

    // GC with an explicit empty list: nothing is valid.
    let plugin = Recorder::default();
    gc["cni.dev/valid-attachments"] = Value::Null;
    let (exit, _) = invoke(&plugin, env_for("GC"), &gc.to_string()).await;
    assert_eq!(exit, 0);
    assert!(plugin.calls()[0].2.is_empty());

    // STATUS needs only CNI_COMMAND and CNI_PATH.
    let plugin = Recorder::default();
    let env = vec![
        ("CNI_COMMAND".to_owned(), "STATUS".to_owned()),
        ("CNI_PATH".to_owned(), "/opt/cni/bin".to_owned()),
    ];
    let (exit, out) = invoke(&plugin, env, &conf("1.1.0")).await;
    assert_eq!((exit, out.as_slice()), (0, &b""[..]));
    assert_eq!(plugin.calls()[0].0, Command::Status);
}

fn canned_result_in(version: &str) -> CniResult {
    CniResult::from_json(&canned_result().to_json(version.parse().unwrap())).unwrap()
}

#[tokio::test]
async fn status_not_ready_is_code_50() {
    let plugin = Recorder::failing(|| Error::NotReady {
        reason: "node agent has not written its node state yet".into(),
    });
    let (exit, out) = invoke(&plugin, env_for("STATUS"), &conf("1.1.0")).await;
    assert_eq!(exit, 1);
    let v = assert_error_object("STATUS", &out, 50);
    assert!(v["msg"].as_str().unwrap().contains("node state"));
}

#[tokio::test]
async fn version_needs_nothing_and_lists_exactly_the_released_versions() {
    let expected = json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]);
    let env = || vec![("CNI_COMMAND".to_owned(), "VERSION".to_owned())];
    for (stdin, answered_in) in [
        ("", "1.1.0"),
        ("{\"cniVersion\": \"0.4.0\"}", "0.4.0"),
        ("{\"cniVersion\": \"0.3.1\", \"name\": \"x\"}", "0.3.1"),
        ("{\"cniVersion\": \"9.9.9\"}", "1.1.0"),
        ("not json", "1.1.0"),
    ] {
        let plugin = Recorder::default();
        let (exit, out) = invoke(&plugin, env(), stdin).await;
        assert_eq!(exit, 0, "{stdin}");
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            json!({"cniVersion": answered_in, "supportedVersions": expected}),
            "{stdin}"
        );
        assert!(plugin.calls().is_empty());
    }
}

#[tokio::test]
async fn plugin_specific_args_are_accepted() {
    let plugin = WithArgs(Recorder::default());
    let env = edit(
        env_for("ADD"),
        &[("CNI_ARGS", Some("K8S_POD_NAME=web-0;IP=10.244.1.50"))],
    );
    let (exit, out) = invoke(&plugin, env, &conf("1.0.0")).await;
    assert_eq!(exit, 0, "{}", String::from_utf8_lossy(&out));
    let calls = plugin.0.calls();
    assert_eq!(calls[0].1.args.get("IP"), Some("10.244.1.50"));
    assert!(!calls[0].1.args.ignore_unknown);

    // The default GC and STATUS succeed and print nothing.
    let mut gc: Value = serde_json::from_str(&conf("1.1.0")).unwrap();
    gc["cni.dev/valid-attachments"] = json!([]);
    let (exit, out) = invoke(&plugin, env_for("GC"), &gc.to_string()).await;
    assert_eq!((exit, out.as_slice()), (0, &b""[..]));
    let (exit, out) = invoke(&plugin, env_for("STATUS"), &conf("1.1.0")).await;
    assert_eq!((exit, out.as_slice()), (0, &b""[..]));
}

/// A stdout that refuses every write.
struct Broken;

impl std::io::Write for Broken {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn an_unwritable_stdout_fails_the_invocation() {
    let plugin = Recorder::default();
    let code = runner::run(
        &plugin,
        env_for("ADD"),
        conf("1.0.0").as_bytes(),
        &mut Broken,
    )
    .await;
    assert_eq!(code, 1);
}

#[test]
fn requests_parse_without_the_runner() {
    let req = Request::from_env(env_for("ADD"), conf("1.0.0").as_bytes(), &[]).unwrap();
    assert_eq!(req.command, Command::Add);
    assert_eq!(req.version, Version::V1_0_0);
    let e = Request::from_env(env_for("VERSION"), b"", &[]).unwrap_err();
    assert_eq!(e.code().0, 4);
    let e = Request::from_env(env_for("ADD"), b"{", &[]).unwrap_err();
    assert_eq!(e.code().0, 6);
}

/// What the runtime half ([`cni_core::exec`], [`cni_core::spec::ConfList`]) produces, the
/// plugin half accepts, in every version and for every command the version has.
#[tokio::test]
async fn runtime_side_output_is_accepted_by_the_runner() {
    use cni_core::exec::Invocation;
    use cni_core::spec::ConfList;

    for version in Version::ALL {
        let list = ConfList::from_slice(
            json!({
                "cniVersion": version.as_str(), "name": "cnikit",
                "plugins": [{"type": "cnikit", "capabilities": {"portMappings": true},
                             "ipam": {"type": "host-local"}}]
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let mut rc = serde_json::Map::new();
        rc.insert(
            "portMappings".into(),
            json!([{"HostPort": 8080, "ContainerPort": 80, "Protocol": "TCP", "HostIP": ""}]),
        );
        let prev = canned_result();
        let inv = Invocation::new(
            Command::Add,
            "3f1c0a9b2e7d4c58",
            Some("/var/run/netns/cni-1".into()),
            "eth0",
            vec!["/opt/cni/bin".into()],
        )
        .arg("IgnoreUnknown", "1")
        .arg("K8S_POD_NAME", "web-0");

        for command in [
            Command::Add,
            Command::Check,
            Command::Del,
            Command::Gc,
            Command::Status,
        ] {
            if version < command.since() {
                continue;
            }
            let with_prev = matches!(command, Command::Check | Command::Del);
            let mut conf = list
                .plugin_config(0, version, with_prev.then_some(&prev), &rc)
                .unwrap();
            let inv = match command {
                Command::Gc | Command::Status => Invocation::global(command, inv.cni_path.clone()),
                _ => inv.with_command(command),
            };
            if command == Command::Gc {
                conf["cni.dev/valid-attachments"] =
                    json!([{"containerID": "3f1c0a9b2e7d4c58", "ifname": "eth0"}]);
            }
            let plugin = Recorder::default();
            let (exit, out) = invoke(&plugin, inv.env(), &conf.to_string()).await;
            assert_eq!(
                exit,
                0,
                "{version} {command}: {}",
                String::from_utf8_lossy(&out)
            );
            let calls = plugin.calls();
            let req = &calls[0].1;
            assert_eq!(req.version, version);
            if with_prev {
                let expected = CniResult::from_json(&prev.to_json(version)).unwrap();
                assert_eq!(
                    req.prev_result.as_ref(),
                    Some(&expected),
                    "{version} {command}"
                );
            }
            let mapping = &req.config.runtime_config.as_ref().unwrap().port_mappings[0];
            assert_eq!((mapping.host_port, mapping.container_port), (8080, 80));
            if command == Command::Gc {
                assert_eq!(
                    calls[0].2,
                    [Attachment::new("cnikit", "3f1c0a9b2e7d4c58", "eth0")]
                );
            }
        }
    }
}
