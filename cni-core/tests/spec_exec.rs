//! Running plugin executables as a runtime does: lookup, environment, result and error
//! parsing, and whole configuration lists (ADD chained, DEL reversed, CHECK, GC, STATUS).
//!
//! The plugins are small shell scripts written to a temporary `CNI_PATH`; they log every
//! call and save their stdin, so the tests see exactly what a plugin received. They need
//! `/bin/sh` and `jq`; without them the tests say SKIPPED.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cni_core::exec::{
    self, Invocation, add_list, check_list, del_list, find_plugin, gc_list, status_list,
};
use cni_core::spec::{CniResult, Command, ConfList, GcAttachment};
use cni_core::{Error, ErrorCode};
use serde_json::{Map, Value, json};

fn have_tools() -> bool {
    if !testkit::on_path("jq") || !Path::new("/bin/sh").exists() {
        testkit::skip("exec tests", "need /bin/sh and jq (apt-get install jq)");
        return false;
    }
    true
}

/// A temporary `CNI_PATH` with script plugins that log to `dir/log`.
struct Bin {
    dir: tempfile::TempDir,
}

impl Bin {
    fn new() -> Self {
        let bin = Bin {
            dir: tempfile::tempdir().unwrap(),
        };
        // Adds an interface and an address, in the version it was asked.
        bin.script(
            "step1",
            r#"[ "$CNI_COMMAND" = ADD ] && jq -c --arg ifn "$CNI_IFNAME" --arg ns "$CNI_NETNS" \
  '{cniVersion, interfaces: [{name: "veth1", mac: "0a:58:0a:09:00:01"}, {name: $ifn, sandbox: $ns}],
    ips: [{address: "10.9.0.2/24", gateway: "10.9.0.1", interface: 1}]}
   | if (.cniVersion | startswith("0.")) then .ips[0].version = "4" else . end'
exit 0"#,
        );
        // A chained plugin: passes prevResult on with one more route.
        bin.script(
            "step2",
            r#"[ "$CNI_COMMAND" = ADD ] && jq -c '.prevResult + {routes: [{dst: "0.0.0.0/0", gw: "10.9.0.1"}]}'
exit 0"#,
        );
        bin.script(
            "busy",
            r#"echo '{"cniVersion":"1.0.0","code":11,"msg":"datastore busy","details":"etcd timed out"}'
exit 1"#,
        );
        bin.script(
            "notready",
            r#"echo '{"cniVersion":"1.1.0","code":50,"msg":"agent not ready"}'
exit 1"#,
        );
        bin.script("crash", "echo 'panic: runtime error' >&2\nexit 2");
        bin.script(
            "quiet-error",
            "echo '{\"code\": 7}'\necho 'range 10.0.0.0/31 too small' >&2\nexit 1",
        );
        bin.script("nonsense", "echo 'all good!'\nexit 0");
        std::fs::write(bin.path().join("noexec"), "#!/bin/sh\nexit 0\n").unwrap();
        bin
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn cni_path(&self) -> Vec<PathBuf> {
        vec![PathBuf::from("/nonexistent-cnikit-dir"), self.path().into()]
    }

    /// Writes plugin `name`; every call appends one line to `log` and saves stdin.
    fn script(&self, name: &str, body: &str) {
        let dir = self.path().display().to_string();
        let text = format!(
            "#!/bin/sh\nset -u\nstdin=$(cat)\n\
             n=$(wc -l < '{dir}/log' 2>/dev/null || echo 0)\n\
             printf '%s\\n' \"$stdin\" > '{dir}/stdin.'$n\n\
             echo \"{name} $CNI_COMMAND id=$CNI_CONTAINERID if=$CNI_IFNAME ns=$CNI_NETNS args=$CNI_ARGS\" >> '{dir}/log'\n\
             printf '%s' \"$stdin\" | {{\n{body}\n}}\n"
        );
        let path = self.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// The calls so far, one line each.
    fn log(&self) -> Vec<String> {
        std::fs::read_to_string(self.path().join("log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The stdin of call `n` (0-based).
    fn stdin(&self, n: usize) -> Value {
        let text = std::fs::read_to_string(self.path().join(format!("stdin.{n}"))).unwrap();
        serde_json::from_str(&text).unwrap()
    }
}

fn invocation(bin: &Bin) -> Invocation {
    Invocation::new(
        Command::Add,
        "ctr-1",
        Some("/var/run/netns/cni-test".into()),
        "eth0",
        bin.cni_path(),
    )
    .arg("K8S_POD_NAMESPACE", "default")
    .arg("K8S_POD_NAME", "web-0")
}

fn list(version: &str, types: &[&str]) -> ConfList {
    let plugins: Vec<Value> = types
        .iter()
        .map(|t| {
            if *t == "step2" {
                json!({"type": t, "capabilities": {"portMappings": true}})
            } else {
                json!({"type": t, "mtu": 1400})
            }
        })
        .collect();
    let text = json!({"cniVersion": version, "name": "testnet", "plugins": plugins}).to_string();
    ConfList::from_slice(text.as_bytes()).unwrap()
}

fn runtime_config() -> Map<String, Value> {
    let mut rc = Map::new();
    rc.insert(
        "portMappings".into(),
        json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]),
    );
    rc.insert("bandwidth".into(), json!({"ingressRate": 1000}));
    rc
}

#[test]
fn plugins_are_found_in_cni_path() {
    let bin = Bin::new();
    assert_eq!(
        find_plugin("step1", &bin.cni_path()).unwrap(),
        bin.path().join("step1")
    );
    for name in ["missing", "", "../step1", "a/b", ".."] {
        let e = find_plugin(name, &bin.cni_path()).unwrap_err();
        assert_eq!(e.code(), ErrorCode::DELEGATE, "{name}");
    }
    let e = find_plugin("missing", &bin.cni_path()).unwrap_err();
    assert!(e.to_string().contains("not found in CNI_PATH"), "{e}");
    assert_eq!(
        find_plugin("step1", &[]).unwrap_err().code(),
        ErrorCode::DELEGATE
    );
}

#[test]
fn the_environment_is_the_runtimes() {
    let bin = Bin::new();
    let env = invocation(&bin).env();
    let get = |k: &str| {
        env.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("CNI_COMMAND"), Some("ADD"));
    assert_eq!(get("CNI_CONTAINERID"), Some("ctr-1"));
    assert_eq!(get("CNI_NETNS"), Some("/var/run/netns/cni-test"));
    assert_eq!(get("CNI_IFNAME"), Some("eth0"));
    assert_eq!(
        get("CNI_ARGS"),
        Some("K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0")
    );
    assert_eq!(
        get("CNI_PATH"),
        Some(format!("/nonexistent-cnikit-dir:{}", bin.path().display()).as_str())
    );
    let gc = Invocation::global(Command::Gc, bin.cni_path()).env();
    assert!(gc.contains(&("CNI_CONTAINERID".into(), String::new())));
    assert!(gc.contains(&("CNI_NETNS".into(), String::new())));
    assert_eq!(gc.len(), 6);
}

#[tokio::test]
async fn exec_passes_results_and_errors_on() {
    if !have_tools() {
        return;
    }
    let bin = Bin::new();
    let inv = invocation(&bin);
    let conf = br#"{"cniVersion": "0.4.0", "name": "testnet", "type": "step1"}"#;
    let result = inv.exec("step1", conf).await.unwrap().unwrap();
    assert_eq!(result.ips[0].address.to_string(), "10.9.0.2/24");
    assert_eq!(result.interfaces[1].name, "eth0");
    assert_eq!(
        result.interfaces[1].sandbox.as_deref(),
        Some("/var/run/netns/cni-test")
    );
    assert_eq!(
        bin.log(),
        ["step1 ADD id=ctr-1 if=eth0 ns=/var/run/netns/cni-test \
          args=K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0"]
    );
    assert_eq!(bin.stdin(0)["name"], "testnet");

    // Other commands return no result.
    assert!(
        inv.with_command(Command::Del)
            .exec("step1", conf)
            .await
            .unwrap()
            .is_none()
    );

    // The plugin's code is passed on, with its details.
    match inv.exec("busy", conf).await.unwrap_err() {
        Error::Delegate {
            plugin,
            code,
            msg,
            details,
        } => {
            assert_eq!(plugin, "busy");
            assert_eq!(code, 11);
            assert_eq!(msg, "datastore busy");
            assert_eq!(details.as_deref(), Some("etcd timed out"));
        }
        other => panic!("unexpected {other:?}"),
    }
    // An error object without a message: stderr stands in.
    match inv.exec("quiet-error", conf).await.unwrap_err() {
        Error::Delegate { code, msg, .. } => {
            assert_eq!(code, 7);
            assert_eq!(msg, "range 10.0.0.0/31 too small");
        }
        other => panic!("unexpected {other:?}"),
    }
    // Crashes, nonsense and unrunnable files are 102, with what the plugin printed.
    let crash = inv.exec("crash", conf).await.unwrap_err();
    assert_eq!(crash.code(), ErrorCode::DELEGATE);
    assert!(
        crash.to_string().contains("panic: runtime error"),
        "{crash}"
    );
    let nonsense = inv.exec("nonsense", conf).await.unwrap_err();
    assert_eq!(nonsense.code(), ErrorCode::DELEGATE);
    assert!(nonsense.to_string().contains("all good!"), "{nonsense}");
    let noexec = inv.exec("noexec", conf).await.unwrap_err();
    assert_eq!(noexec.code(), ErrorCode::DELEGATE);
    assert_eq!(
        inv.exec("missing", conf).await.unwrap_err().code(),
        ErrorCode::DELEGATE
    );
}

#[tokio::test]
async fn add_list_chains_results() {
    if !have_tools() {
        return;
    }
    let bin = Bin::new();
    let list = list("1.0.0", &["step1", "step2"]);
    let result = add_list(&list, &invocation(&bin), &runtime_config())
        .await
        .unwrap();
    assert_eq!(result.interfaces.len(), 2, "step1's interfaces");
    assert_eq!(
        result.routes[0].dst.to_string(),
        "0.0.0.0/0",
        "step2's route"
    );
    assert_eq!(result.ips[0].interface, Some(1));

    let log = bin.log();
    assert_eq!(log.len(), 2);
    assert!(log[0].starts_with("step1 ADD id=ctr-1 if=eth0"), "{log:?}");
    assert!(log[1].starts_with("step2 ADD id=ctr-1 if=eth0"), "{log:?}");

    let first = bin.stdin(0);
    assert_eq!(first["name"], "testnet");
    assert_eq!(first["cniVersion"], "1.0.0");
    assert_eq!(first["mtu"], 1400);
    assert!(first.get("prevResult").is_none());
    assert!(
        first.get("runtimeConfig").is_none(),
        "step1 has no capability"
    );

    let second = bin.stdin(1);
    assert_eq!(second["cniVersion"], "1.0.0");
    let step1_result = CniResult::from_json(&second["prevResult"]).unwrap();
    assert_eq!(step1_result.ips, result.ips);
    assert_eq!(second["prevResult"]["cniVersion"], "1.0.0");
    assert_eq!(
        second["runtimeConfig"],
        json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}),
        "only the declared capability"
    );
}

#[tokio::test]
async fn add_list_stops_at_the_first_failure() {
    if !have_tools() {
        return;
    }
    let bin = Bin::new();
    let list = list("0.4.0", &["step1", "busy", "step2"]);
    let e = add_list(&list, &invocation(&bin), &Map::new())
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::TRY_AGAIN_LATER);
    let log = bin.log();
    assert_eq!(log.len(), 2, "step2 must not run: {log:?}");
    // The 0.4.0 result of step1 reached `busy` in 0.4.0.
    assert_eq!(bin.stdin(1)["prevResult"]["ips"][0]["version"], "4");
}

#[tokio::test]
async fn del_list_runs_in_reverse_and_runs_every_plugin() {
    if !have_tools() {
        return;
    }
    let bin = Bin::new();
    let prev = CniResult::from_json(&json!({
        "cniVersion": "1.0.0", "ips": [{"address": "10.9.0.2/24"}]
    }))
    .unwrap();
    let inv = invocation(&bin).with_command(Command::Add);
    del_list(
        &list("1.0.0", &["step1", "step2"]),
        &inv,
        &Map::new(),
        Some(&prev),
    )
    .await
    .unwrap();
    let log = bin.log();
    assert!(log[0].starts_with("step2 DEL"), "{log:?}");
    assert!(log[1].starts_with("step1 DEL"), "{log:?}");
    assert_eq!(
        bin.stdin(0)["prevResult"]["ips"][0]["address"],
        "10.9.0.2/24"
    );
    assert_eq!(
        bin.stdin(1)["prevResult"]["ips"][0]["address"],
        "10.9.0.2/24"
    );

    // Before 0.4.0, DEL gets no prevResult.
    let bin = Bin::new();
    del_list(
        &list("0.3.1", &["step1"]),
        &invocation(&bin),
        &Map::new(),
        Some(&prev),
    )
    .await
    .unwrap();
    assert!(bin.stdin(0).get("prevResult").is_none());

    // A failing plugin does not stop the others.
    let bin = Bin::new();
    let e = del_list(
        &list("1.0.0", &["step1", "busy"]),
        &invocation(&bin),
        &Map::new(),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), ErrorCode::TRY_AGAIN_LATER);
    let log = bin.log();
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(log[1].starts_with("step1 DEL"), "{log:?}");
}

#[tokio::test]
async fn check_list_follows_version_and_disable_check() {
    if !have_tools() {
        return;
    }
    let prev = CniResult::from_json(&json!({"ips": [{"address": "10.9.0.2/24"}]})).unwrap();
    let bin = Bin::new();
    check_list(
        &list("0.4.0", &["step1", "step2"]),
        &invocation(&bin),
        &Map::new(),
        &prev,
    )
    .await
    .unwrap();
    let log = bin.log();
    assert!(
        log[0].starts_with("step1 CHECK") && log[1].starts_with("step2 CHECK"),
        "{log:?}"
    );
    assert_eq!(bin.stdin(1)["prevResult"]["ips"][0]["version"], "4");

    let bin = Bin::new();
    let e = check_list(
        &list("0.3.1", &["step1"]),
        &invocation(&bin),
        &Map::new(),
        &prev,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), ErrorCode::INCOMPATIBLE_VERSION);
    assert!(bin.log().is_empty());

    let bin = Bin::new();
    let mut disabled = list("1.0.0", &["step1"]);
    disabled.disable_check = true;
    check_list(&disabled, &invocation(&bin), &Map::new(), &prev)
        .await
        .unwrap();
    assert!(bin.log().is_empty());
}

#[tokio::test]
async fn gc_and_status_lists() {
    if !have_tools() {
        return;
    }
    let valid = [GcAttachment {
        container_id: "ctr-1".into(),
        ifname: "eth0".into(),
    }];
    let bin = Bin::new();
    gc_list(&list("1.1.0", &["step1", "step2"]), &bin.cni_path(), &valid)
        .await
        .unwrap();
    let log = bin.log();
    assert_eq!(log.len(), 2);
    assert!(log[0].starts_with("step1 GC id= if= ns= args="), "{log:?}");
    // Under both keys, as libcni 1.2.3 and later send it.
    for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
        assert_eq!(
            bin.stdin(0)[key],
            json!([{"containerID": "ctr-1", "ifname": "eth0"}]),
            "{key}"
        );
    }
    assert_eq!(bin.stdin(1)["cniVersion"], "1.1.0");

    // Nothing to do before 1.1.0 or with disableGC.
    let bin = Bin::new();
    gc_list(&list("1.0.0", &["step1"]), &bin.cni_path(), &valid)
        .await
        .unwrap();
    let mut disabled = list("1.1.0", &["step1"]);
    disabled.disable_gc = true;
    gc_list(&disabled, &bin.cni_path(), &valid).await.unwrap();
    assert!(bin.log().is_empty());

    let bin = Bin::new();
    status_list(&list("1.1.0", &["step1", "step2"]), &bin.cni_path())
        .await
        .unwrap();
    assert_eq!(bin.log().len(), 2);
    assert!(bin.log()[0].starts_with("step1 STATUS id= if="));
    let e = status_list(&list("1.1.0", &["notready", "step1"]), &bin.cni_path())
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::NOT_AVAILABLE);
    assert_eq!(bin.log().len(), 3, "stops at the first plugin not ready");
}

#[tokio::test]
async fn version_of_the_reference_plugins() {
    let dir = Path::new("/usr/lib/cni");
    if !testkit::files(
        "version_of_the_reference_plugins",
        &[&dir.join("host-local")],
        "containernetworking-plugins",
    ) {
        return;
    }
    let info = exec::plugin_version("host-local", &[dir.into()], cni_core::spec::Version::V1_1_0)
        .await
        .unwrap();
    assert!(info.supports(cni_core::spec::Version::V1_0_0), "{info:?}");
    assert!(info.newest_common().is_some());
}
