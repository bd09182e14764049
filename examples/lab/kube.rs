//! `--store kubernetes`: a private kube-apiserver inside the underlay namespace, stored in
//! the lab's etcd, holding the IPAM and the node registry in custom resources.
//!
//! `up` writes a CA, a serving certificate for the underlay address, two bearer tokens and
//! two kubeconfigs into `<state>/kube/` (`testkit::apiserver`), starts the server as
//! `https://<underlay .2>:6443` and applies `deploy/crds/` with `kubectl` as an operator
//! would: the CRDs, then the RBAC rules bound to the service account
//! `kube-system/cnikit-node`. The nodes' plugins and agents authenticate as that service
//! account (its user name in the token file), so they run with exactly the rights the
//! manifest grants; the lab itself uses the admin token.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cnikit::core::store::KeyValue;

use crate::procs;
use crate::state::{KubeApiserver, Lab};

/// The port the API server serves on.
pub const PORT: u16 = 6443;

/// How long a fresh server may take to be ready and serve the CRDs.
const READY_WITHIN: Duration = Duration::from_secs(90);

/// The service account of the cnikit DaemonSet that `deploy/crds/rbac.yaml` binds.
const NODE_USER: &str = "system:serviceaccount:kube-system:cnikit-node";

/// The CRDs and the RBAC rules, as an operator applies them.
const MANIFESTS: [(&str, &str); 2] = [
    (
        "deploy/crds/ipam.cnikit.io.yaml",
        include_str!("../../deploy/crds/ipam.cnikit.io.yaml"),
    ),
    (
        "deploy/crds/rbac.yaml",
        include_str!("../../deploy/crds/rbac.yaml"),
    ),
];

/// The lab's API server files: `<state>/kube`.
pub fn dir(lab: &Lab) -> PathBuf {
    lab.dir().join("kube")
}

/// The kubeconfig of the lab's administrator (valid inside the lab's namespaces).
pub fn admin_kubeconfig(lab: &Lab) -> PathBuf {
    dir(lab).join("admin.kubeconfig")
}

/// The kubeconfig the nodes' plugins and agents use: service account
/// `kube-system/cnikit-node`.
pub fn node_kubeconfig(lab: &Lab) -> PathBuf {
    dir(lab).join("node.kubeconfig")
}

/// The command line to run `kubectl` against the lab's server by hand.
pub fn kubectl_hint(lab: &Lab) -> String {
    format!(
        "ip netns exec {} kubectl --kubeconfig {}",
        lab.underlays.first().map_or("?", |u| u.ns.as_str()),
        admin_kubeconfig(lab).display()
    )
}

/// Whether everything `--store kubernetes` needs is here; an error naming what is missing.
pub fn preflight() -> Result<()> {
    if !cfg!(feature = "kubernetes") {
        bail!(
            "--store kubernetes needs the lab, plugin and agent built with the kubernetes \
             feature: cargo build --release --examples --features kubernetes"
        );
    }
    let binary = testkit::apiserver::kube_apiserver_binary();
    if !binary.is_file() {
        bail!(
            "--store kubernetes needs kube-apiserver at {} (build it once: \
             scripts/kube-apiserver.sh; or set {})",
            binary.display(),
            testkit::apiserver::KUBE_APISERVER_ENV
        );
    }
    if crate::up::which("kubectl").is_err() {
        bail!("--store kubernetes needs kubectl: apt-get install -y kubernetes-client");
    }
    Ok(())
}

/// Starts the API server on the lab's etcd (already running), waits until it is ready,
/// applies the CRDs and RBAC rules and waits until they are served.
pub async fn start(lab: &mut Lab) -> Result<()> {
    let underlay = lab.underlays[0].clone();
    let host = underlay.host().to_string();
    let etcd = lab
        .etcd
        .as_ref()
        .map(|e| e.endpoint.clone())
        .context("the API server needs the lab's etcd")?;
    let dir = dir(lab);
    let admin = token()?;
    let node = token()?;
    testkit::apiserver::write_files(
        &dir,
        &[&host],
        &[
            testkit::apiserver::Token {
                token: &admin,
                user: "lab-admin",
                groups: &["system:masters"],
            },
            testkit::apiserver::Token {
                token: &node,
                user: NODE_USER,
                groups: &[
                    "system:serviceaccounts",
                    "system:serviceaccounts:kube-system",
                ],
            },
        ],
    )
    .map_err(|e| anyhow::anyhow!("write the API server's files into {}: {e}", dir.display()))?;
    let server = format!("https://{host}:{PORT}");
    let ca = dir.join("ca.crt");
    for (path, token) in [
        (admin_kubeconfig(lab), &admin),
        (node_kubeconfig(lab), &node),
    ] {
        // Only root may read it: it holds a bearer token.
        let text = testkit::apiserver::kubeconfig(&server, &ca, token);
        cnikit::core::private_fs::write(&path, text.as_bytes())
            .with_context(|| format!("write {}", path.display()))?;
    }
    lab.kube = Some(KubeApiserver {
        server: server.clone(),
        proc: None,
    });
    lab.save()?;
    let binary = testkit::apiserver::kube_apiserver_binary();
    let args = testkit::apiserver::args(&dir, &etcd, &host, PORT);
    let marker = dir.join("certs").display().to_string();
    let (proc, mut child) = procs::spawn_in_netns(
        &underlay.ns,
        &binary,
        &args,
        &dir.join("kube-apiserver.log"),
        &marker,
    )?;
    if let Some(k) = lab.kube.as_mut() {
        k.proc = Some(proc);
    }
    lab.save()?;

    let started = Instant::now();
    let exited = |child: &mut std::process::Child| -> Result<()> {
        if let Some(status) = child.try_wait()? {
            bail!("kube-apiserver exited with {status}");
        }
        Ok(())
    };
    loop {
        exited(&mut child)?;
        let out = kubectl(lab, &["get", "--raw", "/readyz"], None)?;
        if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok" {
            break;
        }
        if started.elapsed() > READY_WITHIN {
            bail!(
                "kube-apiserver not ready within {READY_WITHIN:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ready = started.elapsed();
    // The server makes kube-system (where the Role and the Leases live) shortly after it is
    // ready.
    loop {
        exited(&mut child)?;
        if kubectl(lab, &["get", "namespace", "kube-system"], None)?
            .status
            .success()
        {
            break;
        }
        if started.elapsed() > READY_WITHIN {
            bail!("the API server made no kube-system namespace within {READY_WITHIN:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (name, manifest) in MANIFESTS {
        let out = kubectl(lab, &["apply", "-f", "-"], Some(manifest))?;
        if !out.status.success() {
            bail!(
                "kubectl apply -f {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        print!(
            "  kubectl apply -f {name}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let out = kubectl(
        lab,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/ippools.ipam.cnikit.io",
            "crd/ipamblocks.ipam.cnikit.io",
            "crd/ipamnodes.ipam.cnikit.io",
            "crd/networknodes.ipam.cnikit.io",
        ],
        None,
    )?;
    if !out.status.success() {
        bail!(
            "the CRDs are not established: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    println!(
        "kube-apiserver {server} ready in {} ms (CRDs and RBAC applied in {} ms more); \
         the nodes use service account {NODE_USER}",
        ready.as_millis(),
        (started.elapsed() - ready).as_millis()
    );
    Ok(())
}

/// Runs `kubectl ARGS` as the lab's administrator inside the underlay namespace, with
/// `stdin` on its standard input.
fn kubectl(lab: &Lab, args: &[&str], stdin: Option<&str>) -> Result<std::process::Output> {
    let underlay = lab.underlays.first().context("the lab has no underlay")?;
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &underlay.ns, "kubectl", "--kubeconfig"])
        .arg(admin_kubeconfig(lab))
        // kubectl's discovery cache stays in the lab's state dir.
        .arg("--cache-dir")
        .arg(dir(lab).join("kubectl-cache"))
        .args(["--request-timeout", "10s"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = command.spawn().context("run kubectl")?;
    let written = match (stdin, child.stdin.take()) {
        (Some(text), Some(mut pipe)) => {
            use std::io::Write;
            pipe.write_all(text.as_bytes())
        }
        _ => Ok(()),
    };
    // Reaped in any case; a kubectl that quit before reading all of its input says why on
    // stderr, which the caller shows with the exit status.
    let out = child.wait_with_output().context("wait for kubectl")?;
    match written {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe || out.status.success() => {
            Err(e).context("write to kubectl")
        }
        _ => Ok(out),
    }
}

/// A random bearer token (128 bits, hex).
fn token() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("read /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Every IPAM key of the lab's custom resources (read with the store the plugin uses, from
/// a thread that entered the underlay namespace), then the node registry's objects as
/// `<prefix>/registry/nodes/<node>` (a NetworkNode) and `<prefix>/registry/leases/<node>`
/// (its Lease), listed with `kubectl`.
pub async fn keys(lab: &Lab) -> Result<Vec<KeyValue>> {
    let mut keys = ipam_keys(lab).await?;
    let pool = crate::store::PREFIX.trim_start_matches('/');
    let selector = format!("ipam.cnikit.io/prefix={pool}");
    for (kind, args) in [
        ("nodes", ["get", "networknodes"]),
        ("leases", ["get", "leases"]),
    ] {
        let out = kubectl(
            lab,
            &[
                args[0],
                args[1],
                "-n",
                "kube-system",
                "-l",
                &selector,
                "-o",
                "name",
            ],
            None,
        )?;
        if !out.status.success() {
            bail!(
                "kubectl get {}: {}",
                args[1],
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // `networknode.ipam.cnikit.io/cnikit.node1`
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.rsplit('/').next().unwrap_or(line);
            let node = name.strip_prefix(&format!("{pool}.")).unwrap_or(name);
            keys.push(KeyValue {
                key: format!("{}/registry/{kind}/{node}", crate::store::PREFIX),
                value: Vec::new(),
                mod_revision: 0,
            });
        }
    }
    Ok(keys)
}

#[cfg(feature = "kubernetes")]
async fn ipam_keys(lab: &Lab) -> Result<Vec<KeyValue>> {
    use cnikit::core::linux::NetNs;
    use cnikit::core::store::Store;

    let underlay = lab.underlays.first().context("the lab has no underlay")?;
    let ns = NetNs::open(crate::state::netns_path(&underlay.ns)).await?;
    let mut config = cnikit::kubernetes::Config::new(Some(admin_kubeconfig(lab)));
    config.prefix = crate::store::PREFIX.to_owned();
    ns.run(move || -> Result<Vec<KeyValue>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let store = cnikit::kubernetes::KubeStore::connect(&config).await?;
            Ok(store.list("/").await?)
        })
    })
    .await?
}

/// Without the `kubernetes` feature the lab cannot read the custom resources.
#[cfg(not(feature = "kubernetes"))]
async fn ipam_keys(_lab: &Lab) -> Result<Vec<KeyValue>> {
    bail!("this lab was built without the kubernetes feature")
}
