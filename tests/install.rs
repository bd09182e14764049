//! The installer (`cnikit-install`, the DaemonSet's init container) run the way the init
//! container runs it, into a temporary root standing for the host's `/opt/cni/bin` and
//! `/etc/cni/net.d`; then a pod is run with exactly what it installed (ADD, CHECK, DEL), as a
//! runtime would.
//!
//! Needs root for the pod; the file checks run everywhere.
#![cfg(feature = "routed")]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use cnikit::core::exec::{Invocation, add_list, check_list, del_list};
use cnikit::core::spec::{Command, ConfList};
use cnikit::install::{Error, Install, ServiceAccount, install};
use common::*;
use serde_json::{Value, json};

/// The sample routed list with its data directory and log file in `dir`.
fn template(dir: &Path, store: Option<Value>) -> PathBuf {
    let sample =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/conf/10-cnikit-routed.conflist");
    let mut list: Value =
        serde_json::from_slice(&std::fs::read(sample).expect("read the sample")).unwrap();
    let entry = &mut list["plugins"][0];
    entry["dataDir"] = json!(dir.join("data"));
    entry["logFile"] = json!(dir.join("cnikit.log"));
    if let Some(store) = store {
        entry["ipam"]["store"] = store;
    }
    let path = dir.join("template.conflist");
    std::fs::write(&path, serde_json::to_vec_pretty(&list).unwrap()).unwrap();
    path
}

/// The host's directories, inside a temporary root.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new() -> Root {
        Root {
            dir: tempfile::tempdir().expect("temporary root"),
        }
    }
    fn bin(&self) -> PathBuf {
        self.dir.path().join("opt/cni/bin")
    }
    fn conf(&self) -> PathBuf {
        self.dir.path().join("etc/cni/net.d")
    }
    fn spec(&self, plugin: &Path, template: &Path) -> Install {
        Install {
            plugin: plugin.to_owned(),
            plugin_name: "cnikit".into(),
            bin_dir: self.bin(),
            conf_dir: self.conf(),
            host_conf_dir: None,
            template: template.to_owned(),
            file_name: "10-cnikit.conflist".into(),
            node_name: Some("node-a".into()),
            service_account: None,
            copy_etcd_credentials: false,
        }
    }
    /// Every file under the root, relative to it, with its mode.
    fn files(&self) -> Vec<(String, u32)> {
        let mut files: Vec<(String, u32)> = files_under(self.dir.path())
            .into_iter()
            .filter_map(|rel| {
                let meta = std::fs::metadata(self.dir.path().join(&rel)).unwrap();
                let mode = meta.permissions().mode() & 0o7777;
                meta.is_file().then(|| (rel.display().to_string(), mode))
            })
            .collect();
        files.sort();
        files
    }
}

fn mtime(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

/// Runs the `cnikit-install` binary.
fn run_installer(args: &[&str], env: &[(&str, &str)]) -> Output {
    let binary = testkit::examples_dir().join("cnikit-install");
    testkit::assert_fresh(&binary);
    let mut cmd = std::process::Command::new(&binary);
    cmd.args(args).env_remove("NODE_NAME");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("run {}: {e}", binary.display()))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_installed_plugin_and_conflist_run_a_pod() {
    let test = "install then run a pod";
    let Some(env) = Env::with_reference(test, &["portmap", "tuning"]) else {
        return;
    };
    let lab = Lab::new("ins");
    let root = Root::new();
    let template = template(&lab.dir("tmpl"), None);
    // Another network's file that sorts first: the installer warns that it wins.
    std::fs::create_dir_all(root.conf()).unwrap();
    std::fs::write(root.conf().join("05-other.conflist"), b"{}").unwrap();

    let args = |root: &Root| {
        vec![
            "--plugin".to_owned(),
            env.plugin.display().to_string(),
            "--template".into(),
            template.display().to_string(),
            "--bin-dir".into(),
            root.bin().display().to_string(),
            "--conf-dir".into(),
            root.conf().display().to_string(),
        ]
    };
    let args = args(&root);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_installer(&args, &[("NODE_NAME", "node-a")]);
    assert!(
        out.status.success(),
        "installer failed: {}",
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "installed {}",
            root.bin().join("cnikit").display()
        )),
        "{stdout}"
    );
    assert!(
        text(&out.stderr).contains("05-other.conflist sorts before"),
        "no warning about the shadowing file: {}",
        text(&out.stderr)
    );
    assert_eq!(
        root.files(),
        [
            ("etc/cni/net.d/05-other.conflist".to_owned(), 0o644),
            ("etc/cni/net.d/10-cnikit.conflist".to_owned(), 0o600),
            ("opt/cni/bin/cnikit".to_owned(), 0o755),
        ],
        "exactly the binary and the conflist, with their modes, and no temporary file"
    );
    assert_eq!(
        std::fs::read(root.bin().join("cnikit")).unwrap(),
        std::fs::read(&env.plugin).unwrap(),
        "the installed binary is the plugin"
    );
    let conflist = root.conf().join("10-cnikit.conflist");
    let installed: Value = serde_json::from_slice(&std::fs::read(&conflist).unwrap()).unwrap();
    assert_eq!(installed["plugins"][0]["nodeName"], "node-a");

    // Again: nothing changes, nothing is rewritten (a runtime watching the directory does not
    // reload).
    let (bin_time, conf_time) = (mtime(&root.bin().join("cnikit")), mtime(&conflist));
    let out = run_installer(&args, &[("NODE_NAME", "node-a")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).matches("unchanged").count(),
        2,
        "{}",
        text(&out.stdout)
    );
    assert_eq!(mtime(&root.bin().join("cnikit")), bin_time);
    assert_eq!(mtime(&conflist), conf_time);

    // A pod, run the way a runtime runs it: the installed list, CNI_PATH = the installed
    // binary's directory, then the reference plugins the list chains.
    let list = ConfList::from_slice(&std::fs::read(&conflist).unwrap()).unwrap();
    let node = lab.node();
    let pod = lab.pod("pod");
    let cni_path = vec![root.bin(), PathBuf::from(REFERENCE_DIR)];
    let invocation = Invocation::new(
        Command::Add,
        "ins-ctr",
        Some(pod.path.clone()),
        "eth0",
        cni_path,
    )
    .in_netns(&node.path);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let no_args = serde_json::Map::new();
    let result = runtime
        .block_on(add_list(&list, &invocation, &no_args))
        .unwrap_or_else(|e| panic!("ADD with the installed list: {e}"));
    let pod_ip = result.ips[0].address.addr();
    assert!(
        "10.245.0.0/16"
            .parse::<ipnet::IpNet>()
            .unwrap()
            .contains(&pod_ip),
        "{pod_ip} is not from the list's pool"
    );
    assert_eq!(ipv4_of(&pod.name, "eth0"), vec![pod_ip]);
    assert!(ping(&node.name, pod_ip), "the node cannot ping the pod");
    runtime
        .block_on(check_list(&list, &invocation, &no_args, &result))
        .unwrap_or_else(|e| panic!("CHECK with the installed list: {e}"));
    // CHECK looks at the pod for real: without its address it fails.
    ip(
        &pod.name,
        &["addr", "del", &format!("{pod_ip}/32"), "dev", "eth0"],
    );
    let broken = runtime.block_on(check_list(&list, &invocation, &no_args, &result));
    assert!(broken.is_err(), "CHECK passed on a pod without its address");
    runtime
        .block_on(del_list(&list, &invocation, &no_args, Some(&result)))
        .unwrap_or_else(|e| panic!("DEL: {e}"));
    assert!(host_veths(&node.name).is_empty(), "a veth is left");
    let store = StoreView::read(&lab.dir("tmpl").join("data"));
    assert!(store.holds_nothing(), "allocations left: {store:?}");
}

#[test]
fn a_bad_template_installs_nothing() {
    let plugin = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(plugin.path(), b"#!/bin/sh\n").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[u8], &str); 4] = [
        ("not JSON", b"{ plugins: ", "template.conflist"),
        (
            "no cnikit entry",
            br#"{"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "bridge"}]}"#,
            "exactly one plugin of type \"cnikit\", has 0",
        ),
        (
            "two cnikit entries",
            br#"{"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "cnikit"}, {"type": "cnikit"}]}"#,
            "has 2",
        ),
        (
            "no name",
            br#"{"cniVersion": "1.0.0", "plugins": [{"type": "cnikit"}]}"#,
            "name",
        ),
    ];
    for (what, bytes, expected) in cases {
        let root = Root::new();
        let template = dir.path().join("template.conflist");
        std::fs::write(&template, bytes).unwrap();
        let err = install(&root.spec(plugin.path(), &template))
            .expect_err(what)
            .to_string();
        assert!(err.contains(expected), "{what}: {err:?} lacks {expected:?}");
        assert!(
            root.files().is_empty(),
            "{what}: files written: {:?}",
            root.files()
        );
    }
    // A node name that is not one.
    let root = Root::new();
    let template = template(dir.path(), None);
    let mut spec = root.spec(plugin.path(), &template);
    spec.node_name = Some("Not A Name".into());
    let err = install(&spec).expect_err("bad node name").to_string();
    assert!(err.contains("node name"), "{err}");
    assert!(root.files().is_empty(), "files written: {:?}", root.files());
    // A missing plugin binary.
    let mut spec = root.spec(&dir.path().join("absent"), &template);
    spec.node_name = None;
    assert!(matches!(install(&spec), Err(Error::Io { .. })));
    assert!(root.files().is_empty());
}

#[test]
fn a_kubernetes_store_gets_a_kubeconfig_from_the_service_account() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("plugin");
    std::fs::write(&plugin, b"binary").unwrap();
    let account = dir.path().join("serviceaccount");
    std::fs::create_dir(&account).unwrap();
    let token = "eyJhbGciOiJSUzI1NiJ9.secret-token-value";
    std::fs::write(account.join("token"), token).unwrap();
    std::fs::write(
        account.join("ca.crt"),
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let template = template(dir.path(), Some(json!({"type": "kubernetes"})));
    let root = Root::new();

    // The binary, as the init container runs it: the API server from the pod's environment.
    let out = run_installer(
        &[
            "--plugin",
            plugin.to_str().unwrap(),
            "--template",
            template.to_str().unwrap(),
            "--bin-dir",
            root.bin().to_str().unwrap(),
            "--conf-dir",
            root.conf().to_str().unwrap(),
            "--host-conf-dir",
            "/etc/cni/net.d",
            "--service-account-dir",
            account.to_str().unwrap(),
        ],
        &[
            ("NODE_NAME", "node-b"),
            ("KUBERNETES_SERVICE_HOST", "fd00::1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    for stream in [&out.stdout, &out.stderr] {
        assert!(
            !text(stream).contains("secret-token"),
            "the token was printed"
        );
    }
    assert_eq!(
        root.files(),
        [
            ("etc/cni/net.d/10-cnikit.conflist".to_owned(), 0o600),
            ("etc/cni/net.d/cnikit-kubeconfig".to_owned(), 0o600),
            ("opt/cni/bin/cnikit".to_owned(), 0o755),
        ]
    );
    let list: Value =
        serde_json::from_slice(&std::fs::read(root.conf().join("10-cnikit.conflist")).unwrap())
            .unwrap();
    assert_eq!(list["plugins"][0]["nodeName"], "node-b");
    assert_eq!(
        list["plugins"][0]["ipam"]["store"],
        json!({"type": "kubernetes", "kubeconfig": "/etc/cni/net.d/cnikit-kubeconfig"}),
        "the plugin is pointed at the kubeconfig by its path on the host"
    );
    let config: Value =
        serde_json::from_slice(&std::fs::read(root.conf().join("cnikit-kubeconfig")).unwrap())
            .unwrap();
    assert_eq!(
        config["clusters"][0]["cluster"]["server"],
        "https://[fd00::1]:443"
    );
    assert_eq!(config["users"][0]["user"]["token"], token);
    assert_eq!(
        config["clusters"][0]["cluster"]["certificate-authority-data"],
        "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUIKLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo="
    );

    // A store that names its own kubeconfig keeps it; no file is written for it.
    let template = template_with_store(
        dir.path(),
        json!({"type": "kubernetes", "kubeconfig": "/etc/kube/admin.conf"}),
    );
    let root = Root::new();
    let mut spec = root.spec(&plugin, &template);
    spec.service_account = Some(ServiceAccount {
        dir: account.clone(),
        server: "https://10.96.0.1:443".into(),
    });
    let done = install(&spec).unwrap();
    assert_eq!(done.kubeconfig, None);
    assert!(!root.conf().join("cnikit-kubeconfig").exists());

    // An empty token is an error, and nothing is written.
    std::fs::write(account.join("token"), "\n").unwrap();
    let template = template_with_store(dir.path(), json!({"type": "kubernetes"}));
    let root = Root::new();
    let mut spec = root.spec(&plugin, &template);
    spec.service_account = Some(ServiceAccount {
        dir: account,
        server: "https://10.96.0.1:443".into(),
    });
    let err = install(&spec).expect_err("empty token").to_string();
    assert!(err.contains("token is empty"), "{err}");
    assert!(root.files().is_empty(), "{:?}", root.files());
}

#[test]
fn etcd_credentials_from_a_secret_are_copied_for_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("plugin");
    std::fs::write(&plugin, b"binary").unwrap();
    let secret = dir.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    for (file, content) in [("ca.crt", "CA"), ("tls.crt", "CERT"), ("tls.key", "KEY")] {
        std::fs::write(secret.join(file), content).unwrap();
    }
    let store = |ca: &Path| {
        json!({"type": "etcd", "endpoints": ["https://10.0.0.1:2379"],
               "caFile": ca, "certFile": secret.join("tls.crt"), "keyFile": secret.join("tls.key")})
    };
    let template = template_with_store(dir.path(), store(&secret.join("ca.crt")));
    let root = Root::new();
    let mut spec = root.spec(&plugin, &template);
    spec.copy_etcd_credentials = true;
    spec.host_conf_dir = Some("/etc/cni/net.d".into());
    let done = install(&spec).unwrap();
    assert_eq!(done.credentials.len(), 3);
    assert_eq!(
        root.files(),
        [
            ("etc/cni/net.d/10-cnikit.conflist".to_owned(), 0o600),
            ("etc/cni/net.d/cnikit-etcd/caFile".to_owned(), 0o600),
            ("etc/cni/net.d/cnikit-etcd/certFile".to_owned(), 0o600),
            ("etc/cni/net.d/cnikit-etcd/keyFile".to_owned(), 0o600),
            ("opt/cni/bin/cnikit".to_owned(), 0o755),
        ]
    );
    let mode = std::fs::metadata(root.conf().join("cnikit-etcd"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o700,
        "the credentials directory is root's only"
    );
    assert_eq!(
        std::fs::read_to_string(root.conf().join("cnikit-etcd/keyFile")).unwrap(),
        "KEY"
    );
    let list: Value =
        serde_json::from_slice(&std::fs::read(root.conf().join("10-cnikit.conflist")).unwrap())
            .unwrap();
    let store_keys = &list["plugins"][0]["ipam"]["store"];
    assert_eq!(store_keys["caFile"], "/etc/cni/net.d/cnikit-etcd/caFile");
    assert_eq!(store_keys["keyFile"], "/etc/cni/net.d/cnikit-etcd/keyFile");
    assert_eq!(store_keys["endpoints"], json!(["https://10.0.0.1:2379"]));

    // A credential that is not there: an error naming the key, and nothing written.
    let template = template_with_store(dir.path(), store(&secret.join("absent.crt")));
    let root = Root::new();
    let mut spec = root.spec(&plugin, &template);
    spec.copy_etcd_credentials = true;
    let err = install(&spec).expect_err("missing CA").to_string();
    assert!(err.contains("ipam.store.caFile"), "{err}");
    assert!(root.files().is_empty(), "{:?}", root.files());
}

fn template_with_store(dir: &Path, store: Value) -> PathBuf {
    template(dir, Some(store))
}

/// A reader that opens the conflist while it is being replaced sees a whole old or a whole
/// new file, never a truncated one: it is replaced by a rename.
#[test]
fn a_reader_never_sees_half_a_conflist() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("plugin");
    std::fs::write(&plugin, vec![7u8; 1 << 20]).unwrap();
    let root = Root::new();
    let templates: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|t| {
            let sub = dir.path().join(t);
            std::fs::create_dir(&sub).unwrap();
            template(&sub, None)
        })
        .collect();
    install(&root.spec(&plugin, &templates[0])).unwrap();
    let conflist = root.conf().join("10-cnikit.conflist");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let conflist = conflist.clone();
        std::thread::spawn(move || {
            let mut reads = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let bytes = std::fs::read(&conflist).expect("the conflist is always there");
                ConfList::from_slice(&bytes).unwrap_or_else(|e| {
                    panic!("read {} bytes that are no conflist: {e}", bytes.len())
                });
                reads += 1;
            }
            reads
        })
    };
    for round in 0..200 {
        let done = install(&root.spec(&plugin, &templates[(round + 1) % 2])).unwrap();
        assert!(done.conflist_written, "round {round}: the template changed");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().expect("every read was a whole conflist");
    assert!(reads > 0);
    println!("{reads} reads during 200 replacements, each a whole conflist");
}

/// `--watch` (the DaemonSet's `cni-refresh` container): a token that kubelet rotated reaches
/// the plugin's kubeconfig, a removed conflist comes back, and SIGTERM ends it cleanly.
#[test]
fn the_watching_installer_keeps_the_node_current() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("plugin");
    std::fs::write(&plugin, b"binary").unwrap();
    let account = dir.path().join("serviceaccount");
    std::fs::create_dir(&account).unwrap();
    std::fs::write(account.join("token"), "first-token").unwrap();
    std::fs::write(account.join("ca.crt"), "CA").unwrap();
    let template = template_with_store(dir.path(), json!({"type": "kubernetes"}));
    let root = Root::new();
    let binary = testkit::examples_dir().join("cnikit-install");
    testkit::assert_fresh(&binary);
    let mut child = std::process::Command::new(&binary)
        .args(["--watch", "1", "--plugin"])
        .arg(&plugin)
        .arg("--template")
        .arg(&template)
        .arg("--bin-dir")
        .arg(root.bin())
        .arg("--conf-dir")
        .arg(root.conf())
        .arg("--service-account-dir")
        .arg(&account)
        .env("NODE_NAME", "node-w")
        .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        .env("KUBERNETES_SERVICE_PORT", "443")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the installer");
    let kubeconfig = root.conf().join("cnikit-kubeconfig");
    let conflist = root.conf().join("10-cnikit.conflist");
    let token = || -> Option<String> {
        let config: Value = serde_json::from_slice(&std::fs::read(&kubeconfig).ok()?).ok()?;
        config["users"][0]["user"]["token"]
            .as_str()
            .map(str::to_owned)
    };
    // Waits up to 20 s (the installer looks every second) for `done`.
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "never: {what}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    wait_for("the first install", &|| {
        token().as_deref() == Some("first-token") && conflist.exists()
    });
    let binary_time = mtime(&root.bin().join("cnikit"));

    // kubelet writes the rotated token.
    std::fs::write(account.join("token"), "second-token").unwrap();
    wait_for("the rotated token in the kubeconfig", &|| {
        token().as_deref() == Some("second-token")
    });
    // Someone removes the conflist.
    std::fs::remove_file(&conflist).unwrap();
    wait_for("the conflist back", &|| conflist.exists());
    assert_eq!(
        mtime(&root.bin().join("cnikit")),
        binary_time,
        "the unchanged binary was rewritten"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the installer did not end on SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    assert!(status.success(), "exit {status}: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout.matches(&*kubeconfig.display().to_string()).count(),
        2,
        "the kubeconfig is written once per token: {stdout}"
    );
    for output in [&stdout, &text(&out.stderr)] {
        assert!(
            !output.contains("first-token") && !output.contains("second-token"),
            "a token was printed: {output}"
        );
    }
    assert!(
        root.files()
            .iter()
            .all(|(f, _)| !f.contains(".cnikit-install.")),
        "a temporary file is left: {:?}",
        root.files()
    );
}
