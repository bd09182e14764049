//! The Kubernetes manifests of `deploy/` against a real kube-apiserver: every object passes
//! the server's validation and admission (`kubectl apply --dry-run=server`), a broken one is
//! refused, and the network configuration each ConfigMap carries is one the installer takes.
//!
//! The API server (built from Debian's `kubernetes` source package, see `ipam-crd`) runs with
//! its own etcd in a network namespace of the test, on loopback there; `kubectl` (Debian's
//! `kubernetes-client`) talks to it from inside that namespace.
//!
//! Needs root, etcd-server, kubernetes-client and the kube-apiserver binary
//! (`CNIKIT_KUBE_APISERVER`, else the cached build); skips loudly without them. The server's
//! certificates, token file and arguments are the tests' usual ones (`testkit::apiserver`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::*;
use serde_json::Value;
use testkit::apiserver::{self, Token};

/// The administrator's bearer token (a static token file: test-only credentials).
const TOKEN: &str = "cnikit-manifests-admin";

/// An etcd and a kube-apiserver in a namespace of `lab`.
struct Apiserver {
    ns: Ns,
    /// The administrator's kubeconfig (the server's CA, [`TOKEN`]).
    kubeconfig: PathBuf,
    /// kubectl's discovery cache (not the machine's `~/.kube`).
    cache: PathBuf,
}

impl Apiserver {
    fn start(lab: &Lab, binary: &Path) -> Result<Apiserver> {
        let ns = lab.netns("api");
        let dir = lab.dir("apiserver");
        apiserver::write_files(
            &dir,
            &[],
            &[Token {
                token: TOKEN,
                user: "admin",
                groups: &["system:masters"],
            }],
        )
        .map_err(|e| anyhow::anyhow!("the API server's files: {e}"))?;
        let kubeconfig = dir.join("admin.kubeconfig");
        std::fs::write(
            &kubeconfig,
            apiserver::kubeconfig("https://127.0.0.1:6443", &dir.join("ca.crt"), TOKEN),
        )?;

        let spawn = |program: &Path, args: Vec<String>, log: &str| -> Result<()> {
            let log = std::fs::File::create(dir.join(log))?;
            let child = Command::new("ip")
                .args(["netns", "exec", &ns.name])
                .arg(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("start {}", program.display()))?;
            lab.adopt(child);
            Ok(())
        };
        spawn(
            Path::new("etcd"),
            [
                "--name=api",
                &format!("--data-dir={}", dir.join("etcd").display()),
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=api=http://127.0.0.1:2380",
                "--unsafe-no-fsync",
            ]
            .map(String::from)
            .to_vec(),
            "etcd.log",
        )?;
        // The tests' server, with the default admission chain: the manifests must pass it.
        let args = apiserver::args(&dir, "http://127.0.0.1:2379", "127.0.0.1", 6443)
            .into_iter()
            .filter(|a| !a.starts_with("--disable-admission-plugins="))
            .collect();
        spawn(binary, args, "kube-apiserver.log")?;
        let server = Apiserver {
            ns,
            kubeconfig,
            cache: dir.join("kubectl-cache"),
        };
        // Ready means the bootstrap objects the manifests rely on exist too: the kube-system
        // namespace and the system-node-critical priority class.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let ready = server.kubectl(&["get", "--raw", "/readyz"])?;
            let class = server.kubectl(&["get", "priorityclass", "system-node-critical"])?;
            if ready.status.success() && class.status.success() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.join("kube-apiserver.log"))?;
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                bail!(
                    "kube-apiserver is not ready: {}\n{}",
                    String::from_utf8_lossy(&ready.stderr),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `kubectl` as the administrator, inside the server's namespace.
    fn kubectl(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new("ip")
            .args(["netns", "exec", &self.ns.name, "kubectl"])
            // Not the machine's kubeconfig: the test's own.
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--cache-dir={}", self.cache.display()))
            .args(args)
            .output()?)
    }

    /// `kubectl apply --dry-run=server` of `file`: the objects as the server would store them.
    fn dry_run(&self, file: &Path) -> Result<Result<Vec<Value>, String>> {
        let out = self.kubectl(&[
            "apply",
            "--dry-run=server",
            "--validate=true",
            "-o",
            "json",
            "-f",
            path(file),
        ])?;
        if !out.status.success() {
            return Ok(Err(String::from_utf8_lossy(&out.stderr).into_owned()));
        }
        let doc: Value = serde_json::from_slice(&out.stdout)?;
        Ok(Ok(match doc["kind"].as_str() {
            Some("List") => doc["items"].as_array().cloned().unwrap_or_default(),
            _ => vec![doc],
        }))
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// `kind/name` of each object.
fn names(objects: &[Value]) -> Vec<String> {
    objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or("?"),
                o["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

/// The installer takes the ConfigMap's conflist as its template: one `cnikit` entry, a valid
/// list, the node name set.
fn installs(objects: &[Value], dir: &Path) -> Result<Value> {
    let config = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap")
        .context("no ConfigMap")?;
    let list = config["data"]["cni.conflist"]
        .as_str()
        .context("the ConfigMap has no cni.conflist")?;
    std::fs::create_dir_all(dir)?;
    let template = dir.join("cni.conflist");
    std::fs::write(&template, list)?;
    let plugin = dir.join("plugin");
    std::fs::write(&plugin, b"plugin")?;
    // What a pod's service account mount holds (the installer reads it for a `kubernetes`
    // store).
    let account = dir.join("serviceaccount");
    std::fs::create_dir_all(&account)?;
    std::fs::write(account.join("token"), "token")?;
    std::fs::write(account.join("ca.crt"), "ca")?;
    let done = cnikit::install::install(&cnikit::install::Install {
        plugin,
        plugin_name: "cnikit".into(),
        bin_dir: dir.join("bin"),
        conf_dir: dir.join("net.d"),
        host_conf_dir: None,
        template,
        file_name: "10-cnikit.conflist".into(),
        node_name: Some("node-1".into()),
        service_account: Some(cnikit::install::ServiceAccount {
            dir: account,
            server: "https://10.96.0.1:443".into(),
        }),
        copy_etcd_credentials: false,
    })?;
    let installed: Value = serde_json::from_slice(&std::fs::read(done.conflist)?)?;
    Ok(installed)
}

/// The DaemonSet's container named `name`.
fn container<'a>(objects: &'a [Value], name: &str) -> Result<&'a Value> {
    let daemonset = objects
        .iter()
        .find(|o| o["kind"] == "DaemonSet")
        .context("no DaemonSet")?;
    let spec = &daemonset["spec"]["template"]["spec"];
    spec["containers"]
        .as_array()
        .into_iter()
        .chain(spec["initContainers"].as_array())
        .flatten()
        .find(|c| c["name"] == name)
        .with_context(|| format!("no container {name}"))
}

#[test]
fn the_manifests_pass_the_api_servers_validation() -> Result<()> {
    let test = "the_manifests_pass_the_api_servers_validation";
    if !testkit::root(test) {
        return Ok(());
    }
    let binary = apiserver::kube_apiserver_binary();
    for (file, what) in [
        (
            binary.as_path(),
            "kube-apiserver (ipam-crd's scripts/kube-apiserver.sh builds it)",
        ),
        (Path::new("/usr/bin/etcd"), "etcd-server"),
        (Path::new("/usr/bin/kubectl"), "kubernetes-client"),
    ] {
        if !file.exists() {
            testkit::skip(test, format!("{} is missing: {what}", file.display()));
            return Ok(());
        }
    }
    let lab = Lab::new("kman");
    let server = Apiserver::start(&lab, &binary)?;

    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.retain(|f| f.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    ensure!(
        files.len() >= 2,
        "expected a manifest per datastore: {files:?}"
    );
    for file in &files {
        let objects = match server.dry_run(file)? {
            Ok(objects) => objects,
            Err(e) => bail!("the API server refused {}: {e}", file.display()),
        };
        println!("{}: {}", file.display(), names(&objects).join(", "));
        for kind in ["ServiceAccount", "ConfigMap", "DaemonSet"] {
            ensure!(
                objects.iter().any(|o| o["kind"] == kind),
                "{} has no {kind}",
                file.display()
            );
        }
        let stem = file.file_stem().unwrap().to_string_lossy().into_owned();
        let installed = installs(&objects, &lab.dir(&stem))?;
        ensure!(installed["plugins"][0]["nodeName"] == "node-1");
        // Only the Kubernetes datastore needs the API: the others run without a token.
        let daemonset = objects
            .iter()
            .find(|o| o["kind"] == "DaemonSet")
            .context("no DaemonSet")?;
        let automount = &daemonset["spec"]["template"]["spec"]["automountServiceAccountToken"];
        let api = installed["plugins"][0]["ipam"]["store"]["type"] == "kubernetes";
        ensure!(
            !api || installed["plugins"][0]["ipam"]["store"]["kubeconfig"].is_string(),
            "{}: the installed list does not point the plugin at a kubeconfig",
            file.display()
        );
        ensure!(
            api || automount == false,
            "{}: a token is mounted into pods that do not use the API",
            file.display()
        );
        // The agent has the capabilities it needs and no others, and no way to gain more.
        let agent = container(&objects, "agent")?;
        let security = &agent["securityContext"];
        ensure!(
            security["capabilities"]["drop"] == serde_json::json!(["ALL"])
                && security["allowPrivilegeEscalation"] == false
                && security["privileged"].is_null(),
            "{}: agent securityContext {security}",
            file.display()
        );
        let install = container(&objects, "install-cni")?;
        ensure!(
            install["securityContext"]["capabilities"]["add"].is_null(),
            "{}: the installer needs no capability: {}",
            file.display(),
            install["securityContext"]
        );
    }

    // deploy/crds/ and cnikit-kubernetes.yaml are one install: the roles deploy/crds/ defines
    // (the custom resources, the node registry's Leases) are bound there to the service
    // account the Kubernetes variant's DaemonSet runs as, and grant the registry's verbs.
    let crds = deploy_dir().join("crds");
    let objects = match server.dry_run(&crds)? {
        Ok(objects) => objects,
        Err(e) => bail!("the API server refused {}: {e}", crds.display()),
    };
    let found = names(&objects);
    for want in [
        "ClusterRole/cnikit-node",
        "ClusterRoleBinding/cnikit-node",
        "Role/cnikit-node",
        "RoleBinding/cnikit-node",
    ] {
        ensure!(
            found.contains(&want.to_owned()),
            "deploy/crds/ defines no {want}: {}",
            found.join(", ")
        );
    }
    let kubernetes = match server.dry_run(&deploy_dir().join("cnikit-kubernetes.yaml"))? {
        Ok(objects) => objects,
        Err(e) => bail!("the API server refused cnikit-kubernetes.yaml: {e}"),
    };
    let daemonset = kubernetes
        .iter()
        .find(|o| o["kind"] == "DaemonSet")
        .context("no DaemonSet in cnikit-kubernetes.yaml")?;
    let account = serde_json::json!({
        "kind": "ServiceAccount",
        "name": daemonset["spec"]["template"]["spec"]["serviceAccountName"],
        "namespace": daemonset["metadata"]["namespace"],
    });
    ensure!(
        kubernetes
            .iter()
            .any(|o| o["kind"] == "ServiceAccount" && o["metadata"]["name"] == account["name"]),
        "cnikit-kubernetes.yaml does not define its DaemonSet's service account {account}"
    );
    for binding in objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRoleBinding" || o["kind"] == "RoleBinding")
    {
        let subjects = binding["subjects"].as_array().cloned().unwrap_or_default();
        ensure!(
            subjects.iter().any(|s| s["kind"] == account["kind"]
                && s["name"] == account["name"]
                && s["namespace"] == account["namespace"]),
            "{} {} does not bind the DaemonSet's service account {account}",
            binding["kind"],
            binding["metadata"]["name"]
        );
    }
    let grants = |kind: &str, resource: &str, verb: &str| {
        objects.iter().filter(|o| o["kind"] == kind).any(|role| {
            role["rules"].as_array().into_iter().flatten().any(|rule| {
                rule["resources"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|r| r == resource)
                    && rule["verbs"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|v| v == verb)
            })
        })
    };
    for verb in ["get", "list", "watch", "create", "update", "delete"] {
        ensure!(
            grants("ClusterRole", "networknodes", verb),
            "the ClusterRole does not grant {verb} on networknodes (the node registry's records)"
        );
        ensure!(
            grants("Role", "leases", verb),
            "the Role does not grant {verb} on leases (the node registry's liveness)"
        );
    }
    ensure!(
        !grants("ClusterRole", "leases", "update"),
        "Leases are granted cluster-wide: only the Role's namespace needs them"
    );

    // The validation is real: a DaemonSet whose selector does not match its pods (the
    // server's validation) and one with a misspelt field (the schema the server publishes)
    // are refused.
    let original = std::fs::read_to_string(&files[0])?;
    for (what, from, to, expected) in [
        (
            "a mismatched selector",
            "matchLabels:\n      k8s-app: cnikit-node\n",
            "matchLabels:\n      k8s-app: something-else\n",
            "selector",
        ),
        (
            "a misspelt field",
            "hostNetwork: true",
            "hostNetwrok: true",
            "hostNetwrok",
        ),
    ] {
        let broken = original.replacen(from, to, 1);
        ensure!(broken != original, "{what}: {from:?} not found");
        let broken_file = lab.dir("broken").join("broken.yaml");
        std::fs::write(&broken_file, broken)?;
        match server.dry_run(&broken_file)? {
            Ok(objects) => bail!(
                "a DaemonSet with {what} passed: {}",
                names(&objects).join(", ")
            ),
            Err(e) => ensure!(
                e.contains(expected),
                "{what}: refused for another reason: {e}"
            ),
        }
    }
    Ok(())
}
