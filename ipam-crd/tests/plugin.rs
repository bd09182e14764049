//! The `cnikit` plugin binary on the Kubernetes datastore, one process per CNI command as a
//! runtime runs it, against a real kube-apiserver (`testkit::kube`). The processes run in the
//! server's network namespace and reach it with a kubeconfig file. Needs root, the
//! kube-apiserver binary (`scripts/kube-apiserver.sh`) and the plugin built with the
//! `kubernetes` feature: `cargo build --example cnikit --features kubernetes`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cni_core::ipam::{BlockIpam, BlockIpamConfig};
use ipam_crd::{Config, KubeStore};
use ipnet::IpNet;
use serde_json::{Value, json};
use testkit::kube::KubeApi;
use tokio::io::AsyncWriteExt;

const BUILD: &str = "cargo build --example cnikit --features kubernetes";
const POOL: &str = "10.81.0.0/24";

fn plugin_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("examples/cnikit"))
        .expect("target/<profile>/deps");
    assert!(path.is_file(), "{} is missing: {BUILD}", path.display());
    path
}

async fn server(test: &str, tag: &str) -> Option<KubeApi> {
    let api = KubeApi::start(test, tag).await?;
    api.install_crds(&ipam_crd::resources::crds()).await;
    Some(api)
}

/// The network configuration for `node`: a bridge whose IPAM is cnikit's block IPAM on the
/// Kubernetes store; the plugin binary acts as a pure IPAM plugin for it.
fn stdin_with_timeout(
    api: &KubeApi,
    node: &str,
    valid: Option<&[String]>,
    timeout_ms: u64,
) -> Vec<u8> {
    let mut conf = json!({
        "cniVersion": "1.1.0",
        "name": "kube-net",
        "type": "bridge",
        "ipam": {
            "type": "cnikit-ipam",
            "pool": POOL,
            "blockSize": 26,
            "reserve": "none",
            "nodeName": node,
            "dataDir": "/nonexistent/cnikit-kube-tests",
            "store": {"type": "kubernetes", "kubeconfig": api.kubeconfig(), "timeoutMs": timeout_ms},
        },
    });
    if let Some(valid) = valid {
        conf["cni.dev/valid-attachments"] = valid
            .iter()
            .map(|c| json!({"containerID": c, "ifname": "eth0"}))
            .collect();
    }
    serde_json::to_vec(&conf).unwrap()
}

/// Runs one CNI command in its own process; `Ok(stdout JSON)` or `Err((code, message))`.
async fn cni(
    api: &KubeApi,
    command: &str,
    node: &str,
    container: Option<&str>,
    valid: Option<&[String]>,
) -> Result<Value, (u64, String)> {
    cni_full(api, command, node, container, valid, None, 60_000).await
}

async fn cni_killed_after(
    api: &KubeApi,
    command: &str,
    node: &str,
    container: Option<&str>,
    valid: Option<&[String]>,
    kill_after: Option<Duration>,
) -> Result<Value, (u64, String)> {
    cni_full(api, command, node, container, valid, kill_after, 60_000).await
}

/// [`cni`] with a store deadline of `timeout_ms`, killed with SIGKILL after `kill_after`
/// unless it exited before (then the outcome is `Err((0, "killed"))`).
async fn cni_full(
    api: &KubeApi,
    command: &str,
    node: &str,
    container: Option<&str>,
    valid: Option<&[String]>,
    kill_after: Option<Duration>,
    timeout_ms: u64,
) -> Result<Value, (u64, String)> {
    let mut cmd: tokio::process::Command = api.command(plugin_binary()).into();
    cmd.env("CNI_COMMAND", command)
        .env("CNI_PATH", "/nonexistent/cni-bin")
        .env("CNIKIT_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(c) = container {
        cmd.env("CNI_CONTAINERID", c).env("CNI_IFNAME", "eth0");
    }
    if command == "ADD" {
        cmd.env("CNI_NETNS", "/proc/self/ns/net");
    }
    let mut child = cmd.spawn().expect("spawn the plugin");
    let mut pipe = child.stdin.take().unwrap();
    // A plugin killed before it read its stdin breaks the pipe: not an error here.
    let _ = pipe
        .write_all(&stdin_with_timeout(api, node, valid, timeout_ms))
        .await;
    drop(pipe);
    if let Some(after) = kill_after {
        tokio::select! {
            _ = child.wait() => {}
            () = tokio::time::sleep(after) => {
                // By PID, through the child handle (`ip netns exec` execs the plugin).
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err((0, "killed".into()));
            }
        }
    }
    let out = tokio::time::timeout(Duration::from_secs(300), child.wait_with_output())
        .await
        .expect("the plugin hung")
        .unwrap();
    let stdout: Value = if out.stdout.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{command}: stdout is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    };
    if out.status.success() {
        Ok(stdout)
    } else {
        Err((
            stdout["code"].as_u64().unwrap_or(0),
            format!("{stdout} {}", String::from_utf8_lossy(&out.stderr)),
        ))
    }
}

fn address(result: &Value) -> IpNet {
    result["ips"][0]["address"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no address in {result}"))
}

async fn engine(api: &KubeApi, node: &str) -> BlockIpam<KubeStore> {
    let mut c = BlockIpamConfig::new(POOL.parse().unwrap(), node, "kube-net");
    c.block_prefix = 26;
    c.reserve = cni_core::ipam::block::Reserve::None;
    BlockIpam::new(KubeStore::new(api.client().await, &Config::new(None)), c).unwrap()
}

/// 4 nodes × 64 concurrent ADDs, each its own plugin process, on a pool of exactly four
/// blocks: 256 distinct addresses, every block's addresses on one node; DEL of all leaves
/// no allocation and no handle; the same again works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_256_plugin_processes_on_4_nodes_without_a_spare_block() {
    let test = "race_256_plugin_processes_on_4_nodes_without_a_spare_block";
    let Some(api) = server(test, "kprace").await else {
        return;
    };
    plugin_binary();
    for round in 0..2 {
        let mut runs = Vec::new();
        for n in 0..4 {
            for i in 0..64 {
                let api = &api;
                runs.push(async move {
                    let node = format!("node-{n}");
                    let c = format!("r{round}-{n}-{i}");
                    let r = cni(api, "ADD", &node, Some(&c), None).await;
                    (n, c, r)
                });
            }
        }
        let results = futures::future::join_all(runs).await;
        let mut all = BTreeSet::new();
        let mut block_node: BTreeMap<IpNet, u32> = BTreeMap::new();
        for (n, c, r) in &results {
            let a = address(
                r.as_ref()
                    .unwrap_or_else(|e| panic!("ADD {c} on node-{n}: {e:?}")),
            );
            assert!(all.insert(a.addr()), "{a} handed out twice");
            let block = a.trunc();
            assert_eq!(
                *block_node.entry(block).or_insert(*n),
                *n,
                "{block} on two nodes"
            );
        }
        assert_eq!(all.len(), 256);
        assert_eq!(block_node.len(), 4);
        // ADD again for one attachment: the same address.
        let (n, c, r) = &results[7];
        let again = cni(&api, "ADD", &format!("node-{n}"), Some(c), None)
            .await
            .unwrap();
        assert_eq!(address(&again), address(r.as_ref().unwrap()));
        let dels = results.iter().map(|(n, c, _)| {
            let api = &api;
            async move { cni(api, "DEL", &format!("node-{n}"), Some(c), None).await }
        });
        for r in futures::future::join_all(dels).await {
            r.expect("DEL");
        }
        let audit = engine(&api, "node-0").await;
        assert_eq!(audit.audit().await.unwrap(), Vec::<String>::new());
        for n in 0..4 {
            let ipam = engine(&api, &format!("node-{n}")).await;
            assert!(
                ipam.allocations().await.unwrap().is_empty(),
                "node-{n} holds addresses"
            );
            // The agent gives the empty blocks back; then the next round races for them again.
            ipam.leave().await.unwrap();
        }
    }
}

/// 200 ADDs, each killed with SIGKILL at a random moment (20 at a time, on two nodes), then
/// a GC of each node: nothing leaked, nothing doubled; then every ADD gets an address of its
/// own again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_adds_then_gc_leak_nothing() {
    let Some(api) = server("killed_adds_then_gc_leak_nothing", "kkill").await else {
        return;
    };
    plugin_binary();
    let mut completed = 0;
    for batch in 0..10 {
        let runs = (0..20).map(|i| {
            let api = &api;
            async move {
                let node = format!("node-{}", i % 2);
                let c = format!("k{batch}-{i}");
                let after = Duration::from_millis(fastrand::u64(0..=400));
                cni_killed_after(api, "ADD", &node, Some(&c), None, Some(after)).await
            }
        });
        for r in futures::future::join_all(runs).await {
            match r {
                Ok(_) => completed += 1,
                Err((0, _)) => {}
                Err((code, e)) => assert_eq!(code, 11, "an ADD that ran to its end: {e}"),
            }
        }
    }
    eprintln!("{completed} of 200 ADDs completed before their kill");
    assert!(completed < 200, "the kills hit ADDs in flight");
    for n in 0..2 {
        cni(&api, "GC", &format!("node-{n}"), None, Some(&[]))
            .await
            .expect("GC");
    }
    let audit = engine(&api, "node-0").await;
    assert_eq!(audit.audit().await.unwrap(), Vec::<String>::new());
    for n in 0..2 {
        let ipam = engine(&api, &format!("node-{n}")).await;
        assert!(
            ipam.allocations().await.unwrap().is_empty(),
            "node-{n}: leaked"
        );
    }
    // Pending claims left by killed processes are finished or dropped: the pool still
    // hands out distinct addresses to every ADD.
    let runs = (0..64).map(|i| {
        let api = &api;
        async move {
            cni(
                api,
                "ADD",
                &format!("node-{}", i % 2),
                Some(&format!("after-{i}")),
                None,
            )
            .await
        }
    });
    let mut seen = BTreeSet::new();
    for r in futures::future::join_all(runs).await {
        assert!(seen.insert(address(&r.expect("ADD after the kills")).addr()));
    }
    assert_eq!(audit.audit().await.unwrap(), Vec::<String>::new());
}

/// The API server is killed during a burst of 64 ADDs and started again: every ADD gets an
/// address of its own or code 11; after the runtime's DEL of the failed ones, exactly the
/// successful ones hold addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apiserver_restart_during_a_burst_loses_nothing() {
    let Some(api) = server(
        "an_apiserver_restart_during_a_burst_loses_nothing",
        "krestart",
    )
    .await
    else {
        return;
    };
    plugin_binary();
    // Claim the blocks first, so the burst is about allocations.
    for n in 0..2 {
        cni(&api, "ADD", &format!("node-{n}"), Some("warm"), None)
            .await
            .unwrap();
    }
    let burst = futures::future::join_all((0..64).map(|i| {
        let api = &api;
        async move {
            let c = format!("b{i}");
            let node = format!("node-{}", i % 2);
            let r = cni_full(api, "ADD", &node, Some(&c), None, None, 3_000).await;
            (i, c, r)
        }
    }));
    let chaos = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        api.kill_apiserver();
        tokio::time::sleep(Duration::from_millis(700)).await;
        api.start_apiserver()
            .await
            .expect("the API server comes back");
    };
    let (results, ()) = tokio::join!(burst, chaos);
    let mut seen = BTreeSet::new();
    let mut ok = Vec::new();
    let mut failed = 0;
    for (i, c, r) in results {
        match r {
            Ok(v) => {
                assert!(seen.insert(address(&v).addr()), "ADD {i}: address doubled");
                ok.push(c);
            }
            Err((code, e)) => {
                assert_eq!(code, 11, "ADD {c}: {e}");
                failed += 1;
                cni(&api, "DEL", &format!("node-{}", i % 2), Some(&c), None)
                    .await
                    .expect("DEL");
            }
        }
    }
    let mut held = BTreeSet::new();
    for n in 0..2 {
        let ipam = engine(&api, &format!("node-{n}")).await;
        for (a, _) in ipam.allocations().await.unwrap() {
            held.insert(a.container_id);
        }
    }
    eprintln!("{} ADDs got an address, {failed} code 11", ok.len());
    assert!(failed > 0, "the restart hit the burst");
    ok.extend(["warm".to_owned()]);
    let ok: BTreeSet<String> = ok.into_iter().collect();
    assert_eq!(held, ok, "exactly the successful ADDs hold addresses");
    assert_eq!(
        engine(&api, "node-0").await.audit().await.unwrap(),
        Vec::<String>::new()
    );
}

/// The API server freezes (SIGSTOP: it accepts connections and answers nothing) after serving
/// an ADD: the next ADD and a DEL fail with code 11 at the store's deadline, not at the
/// runtime's; once it runs again, ADDs succeed and the first address is still held, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_apiserver_times_out_with_code_11_then_recovers() {
    let Some(api) = server(
        "a_frozen_apiserver_times_out_with_code_11_then_recovers",
        "frozen",
    )
    .await
    else {
        return;
    };
    plugin_binary();
    let first = address(
        &cni(&api, "ADD", "n0", Some("c1"), None)
            .await
            .expect("first ADD"),
    );
    let frozen = api.freeze_apiserver();
    for (command, container) in [("ADD", "c2"), ("DEL", "c1")] {
        let started = Instant::now();
        let (code, msg) = cni_full(&api, command, "n0", Some(container), None, None, 1_500)
            .await
            .expect_err("a command against a frozen API server");
        eprintln!(
            "{command} against a frozen API server: code {code} after {:?}: {msg}",
            started.elapsed()
        );
        assert_eq!(code, 11, "{command}: {msg}");
        // The request's deadline, or the client's connect deadline (the same 1500 ms) when
        // the command opened a new connection to the frozen server.
        assert!(
            msg.contains("timed out after 1500 ms") || msg.contains("deadline has elapsed"),
            "{command}: {msg}"
        );
    }
    drop(frozen);
    let second = address(
        &cni(&api, "ADD", "n0", Some("c2"), None)
            .await
            .expect("ADD once the server runs again"),
    );
    assert_ne!(first.addr(), second.addr());
    assert_eq!(
        address(
            &cni(&api, "ADD", "n0", Some("c1"), None)
                .await
                .expect("repeated ADD")
        ),
        first,
        "ADD is idempotent: the DEL that timed out released nothing"
    );
    let held: BTreeSet<_> = engine(&api, "n0")
        .await
        .allocations()
        .await
        .expect("allocations")
        .into_iter()
        .map(|(attachment, ip)| (attachment.container_id, ip))
        .collect();
    assert_eq!(
        held,
        BTreeSet::from([
            ("c1".to_owned(), first.addr()),
            ("c2".to_owned(), second.addr())
        ])
    );
}
