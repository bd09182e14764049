//! # cnikit-fuzz
//!
//! One function per parser of outside input, each taking the raw bytes an attacker (or a
//! broken peer, runtime or disk) controls and running them through the same code cnikit
//! runs on them. Each must return for every input: no panic, no hang, no unbounded
//! allocation. The functions are driven two ways:
//!
//! - by AFL++ through `cargo-afl`: the binary `cnikit-fuzz TARGET` (`src/main.rs`), built
//!   with `cargo afl build`; `scripts/fuzz.sh` builds it and runs the campaigns;
//! - by the replay tests (`tests/replay.rs`), which feed every file of the seed corpora
//!   (`corpus/TARGET/`) and of the crashes found so far (`regressions/TARGET/`) to its
//!   target on a plain `cargo test -p cnikit-fuzz`.
//!
//! | target | what the bytes are | the code they go through |
//! |---|---|---|
//! | [`netconf`] | a plugin's stdin | the runner's checks for every command, `prevResult`, the `cnikit` plugin's keys, the block IPAM, store, etcd, pod network and routing mode sections |
//! | [`conflist`] | a `.conflist` file | decoding, version negotiation, the per-plugin configuration a runtime builds, the agent's `cnikit` entry |
//! | [`env()`] | the process environment (`KEY=VALUE` lines) | `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_IFNAME`, `CNI_ARGS`, `CNI_PATH`… |
//! | [`result`] | a result, error or VERSION answer a delegated plugin prints | results of every version and their conversions |
//! | [`store_file`] | the file store's `store.json` | the file store, the block IPAM engine and the node registry over it |
//! | [`store_records`] | the keys and values of any datastore (file, etcd) | the block IPAM engine's and the node registry's record decoding and repairs |
//! | [`node_records`] | a node record (etcd registry) or a node state file | their decoding and checks |
//! | [`bgp`] | bytes from a BGP peer's TCP stream | framing, message decoding and UPDATE checks, as `backend-bgp` reads them |
#![warn(missing_docs)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cni_core::ipam::{Attachment, BlockIpam, BlockIpamConfig, Ipam};
use cni_core::registry::{NodeRecord, NodeRegistry, StoreRegistry, validate_node_name};
use cni_core::runner::{self, Plugin, Request};
use cni_core::spec::{CniArgs, CniResult, ConfList, ErrorOutput, NetConf, Version, VersionInfo};
use cni_core::state::NodeState;
use cni_core::store::{FileStore, MemoryStore, Store, Txn};
use serde_json::{Map, Value};

/// A fuzz target: runs one input; returns for every input (a panic is a finding).
pub type Target = fn(&[u8]);

/// Every target, by the name `cnikit-fuzz`, the corpus directories and `scripts/fuzz.sh`
/// use.
pub const TARGETS: &[(&str, Target)] = &[
    ("netconf", netconf),
    ("conflist", conflist),
    ("env", env),
    ("result", result),
    ("store_file", store_file),
    ("store_records", store_records),
    ("node_records", node_records),
    ("bgp", bgp),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// A runtime for the targets that go through async code: one per thread, built once.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds");
    }
    RT.with(|rt| rt.block_on(f))
}

/// A valid environment for `command`, as a runtime sets it.
fn runtime_env(command: &str) -> Vec<(String, String)> {
    [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "fuzz-container"),
        ("CNI_NETNS", "/var/run/netns/fuzz"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=p"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// A plugin that reads every section of its configuration as the `cnikit` plugin and the
/// agent do, and acts on nothing.
struct Reader;

#[async_trait::async_trait]
impl Plugin for Reader {
    async fn add(&self, request: &Request) -> cni_core::Result<CniResult> {
        read_sections(&request.config)?;
        Err(cni_core::Error::invalid_config("fuzz", "nothing is done"))
    }
    async fn del(&self, request: &Request) -> cni_core::Result<()> {
        read_sections(&request.config)
    }
    async fn check(&self, request: &Request) -> cni_core::Result<()> {
        read_sections(&request.config)
    }
    async fn status(&self, request: &Request) -> cni_core::Result<()> {
        read_sections(&request.config)
    }
}

/// Decodes and validates every section of a `cnikit` network configuration that the plugin
/// and the agent read before acting: the plugin's keys, `ipam` (block IPAM, store, etcd),
/// the pod network's and the routing mode's keys.
fn read_sections(conf: &NetConf) -> cni_core::Result<()> {
    let config: cnikit::plugin::Config = conf.plugin_config()?;
    let valid = config.validate();
    let _ = config.node_name();
    let _ = config.data_dir(&conf.name);
    if let Ok(bridge) = conf.plugin_config::<cni_core::linux::BridgeConfig>() {
        let _ = bridge.validate();
    }
    if let Ok(routed) = conf.plugin_config::<cni_core::linux::RoutedConfig>() {
        let _ = routed.validate();
    }
    if let Ok(ebpf) = conf.plugin_config::<cnikit::ebpf::Config>() {
        let _ = ebpf.validate();
    }
    if let Some(v) = conf.plugin.get("agent") {
        let _ = serde_json::from_value::<cnikit::agent::AgentKeys>(v.clone());
    }
    if let Some(v) = conf.plugin.get(backend_vxlan::TYPE)
        && let Ok(c) = serde_json::from_value::<backend_vxlan::Config>(v.clone())
    {
        let _ = c.validate();
    }
    if let Some(v) = conf.plugin.get(backend_ipip::TYPE)
        && let Ok(c) = serde_json::from_value::<backend_ipip::Config>(v.clone())
    {
        let _ = c.validate();
    }
    if let Some(v) = conf.plugin.get(backend_bgp::TYPE)
        && let Ok(c) = serde_json::from_value::<backend_bgp::Config>(v.clone())
    {
        let _ = c.validate();
    }
    if let Some(ipam) = &conf.ipam {
        if let Ok(cnikit::plugin::StoreKind::Etcd(object)) =
            cnikit::plugin::StoreKind::from_ipam(&ipam.config)
            && let Ok(etcd) = ipam_etcd::Config::from_value(&Value::Object(object))
        {
            let _ = etcd.validate();
            let _ = etcd.describe_endpoints();
            let _ = (etcd.timeout(), etcd.dial_timeout());
            let _ = format!("{etcd:?}");
        }
        if let Ok(block) = ipam.config::<BlockIpamConfig>() {
            // Validates the pool, block size and limits; does no I/O.
            let _ = BlockIpam::new(MemoryStore::new(), block);
        }
    }
    valid
}

/// A plugin's stdin: fed to the runner for every command (with a valid environment), and
/// each section of a configuration that passes the runner's checks decoded as the `cnikit`
/// plugin decodes it.
pub fn netconf(data: &[u8]) {
    for command in ["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"] {
        let mut out = Vec::new();
        let code = block_on(runner::run(&Reader, runtime_env(command), data, &mut out));
        // Whatever happened, the runner prints one JSON document, or nothing on success.
        assert!(
            (code == 0 && out.is_empty()) || serde_json::from_slice::<Value>(&out).is_ok(),
            "{command} exited {code} and printed no JSON"
        );
    }
    if let Ok(conf) = NetConf::from_slice(data) {
        let _ = conf.version();
        let _ = conf.validate();
        let _ = conf.gc_attachments();
        let _ = conf.has_capability("portMappings");
        if let Ok(Some(prev)) = conf.prev_result() {
            round_trip(&prev);
        }
        let _ = read_sections(&conf);
    }
}

/// A configuration list file: decoded, its version negotiated, and the configuration of
/// each plugin built as a runtime builds it and decoded as the plugin decodes it.
pub fn conflist(data: &[u8]) {
    let Ok(list) = ConfList::from_slice(data) else {
        return;
    };
    let Ok(version) = list.negotiate() else {
        return;
    };
    let mut runtime = Map::new();
    runtime.insert(
        "portMappings".into(),
        serde_json::json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]),
    );
    for index in 0..list.plugins.len() {
        let Ok(value) = list.plugin_config(index, version, None, &runtime) else {
            continue;
        };
        if let Ok(conf) = NetConf::from_value(value)
            && conf.validate().is_ok()
        {
            let _ = read_sections(&conf);
        }
    }
    if let Ok(entry) = cnikit::agent::cnikit_entry(&list) {
        let _ = read_sections(&entry);
    }
}

/// The process environment, as `KEY=VALUE` lines: the runner's checks of every variable
/// (on a valid configuration), and `CNI_ARGS` on its own, which must survive a round trip.
pub fn env(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let vars: Vec<(String, String)> = text
        .split(['\n', '\0'])
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let stdin = br#"{"cniVersion":"1.1.0","name":"fuzz","type":"cnikit","ipam":{"type":"cnikit-ipam","pool":"10.244.0.0/16"},"prevResult":{"cniVersion":"1.1.0","ips":[{"address":"10.244.0.2/26"}]},"cni.dev/valid-attachments":[]}"#;
    let mut out = Vec::new();
    let code = block_on(runner::run(&Reader, vars.clone(), stdin, &mut out));
    assert!((code == 0 && out.is_empty()) || serde_json::from_slice::<Value>(&out).is_ok());
    let _ = Request::from_env(vars.clone(), stdin, &["K8S_POD_NAME"]);

    let map: HashMap<String, String> = vars.into_iter().collect();
    if let Some(raw) = map.get("CNI_ARGS")
        && let Ok(args) = CniArgs::parse(raw, &[])
    {
        let again = CniArgs::parse(&args.to_env_value(), &[])
            .expect("CNI_ARGS written by to_env_value parse again");
        assert_eq!(again, args, "CNI_ARGS round trip");
    }
}

/// Writes a result in every version and reads each back, as chaining and delegation do.
fn round_trip(result: &CniResult) {
    for version in Version::ALL {
        let written = result.to_json(version);
        let text = serde_json::to_vec(&written).expect("a Value serializes");
        let read = serde_json::from_slice::<Value>(&text).expect("its own output parses");
        CniResult::from_json(&read).expect("a result written by cnikit reads back");
    }
}

/// What a delegated plugin prints: a result of any version, an error object, a VERSION
/// answer. A result that decodes must convert to every version and read back.
pub fn result(data: &[u8]) {
    if let Ok(value) = serde_json::from_slice::<Value>(data)
        && let Ok(result) = CniResult::from_json(&value)
    {
        round_trip(&result);
    }
    if let Ok(error) = serde_json::from_slice::<ErrorOutput>(data) {
        let _ = serde_json::to_vec(&error);
    }
    if let Ok(info) = serde_json::from_slice::<VersionInfo>(data) {
        let _ = info.newest_common();
        let _ = info.supports(Version::V1_0_0);
    }
}

/// The block IPAM configuration the store targets run the engine with: a small pool so
/// that the records found in fuzzed stores overlap its blocks.
fn engine_config(node: &str) -> BlockIpamConfig {
    let mut config = BlockIpamConfig::new("10.244.0.0/24".parse().expect("a pool"), node, "fuzz");
    config.block_prefix = 28;
    config
}

/// What the node agent and the plugin do with a datastore's contents: list, allocate,
/// check, release, garbage-collect, audit, release empty blocks, read and prune the node
/// registry.
async fn exercise<S: Store + Clone + 'static>(store: S) {
    for node in ["node-1", "node-2"] {
        // A fixed seed: the same input takes the same path (AFL++'s stability).
        let Ok(ipam) = BlockIpam::new(store.clone(), engine_config(node)) else {
            return;
        };
        let ipam = ipam.with_seed(1);
        let a = Attachment::new("fuzz", "c1", "eth0");
        let b = Attachment::new("fuzz", "c2", "eth0");
        let _ = ipam.node_blocks().await;
        let _ = ipam.allocations().await;
        let _ = ipam.allocate(&a).await;
        let _ = ipam.check(&a).await;
        let _ = ipam.allocate(&b).await;
        let _ = ipam.release(&a).await;
        let _ = ipam.gc(std::slice::from_ref(&b)).await;
        let _ = ipam.audit().await;
        let _ = ipam.release_empty_blocks().await;
        let _ = ipam.leave().await;
    }
    let registry = StoreRegistry::with_prefix(store, cni_core::ipam::block::DEFAULT_KEY_PREFIX);
    let _ = registry.list().await;
    let _ = registry.prune_expired().await;
}

/// The file store's data file: written as `store.json` of a fresh store directory, then
/// read, committed to and repaired as a node does.
pub fn store_file(data: &[u8]) {
    // A fresh directory per input, in `TMPDIR` (`scripts/fuzz.sh` points it at a tmpfs
    // directory of the campaign's own).
    let tmp = tempfile::Builder::new()
        .prefix("cnikit-fuzz-store-")
        .tempdir()
        .expect("a temporary directory");
    let dir = tmp.path();
    std::fs::write(dir.join(cni_core::store::file::DATA_FILE), data).expect("data file");
    let store = FileStore::new(dir).with_lock_timeout(Duration::from_secs(5));
    block_on(async {
        let _ = store.list("").await;
        exercise(Arc::new(store) as Arc<dyn Store>).await;
    });
}

/// Keys and values of a datastore, as pairs of NUL-terminated strings (`key\0value\0`…),
/// put into a store (etcd and the file store hold the same records), then read, committed
/// to and repaired as in [`store_file`].
pub fn store_records(data: &[u8]) {
    let mut parts = data.split(|b| *b == 0);
    let mut txn = Txn::new();
    let mut n = 0;
    while let (Some(key), Some(value)) = (parts.next(), parts.next()) {
        let key = String::from_utf8_lossy(key);
        // Records live under the engine's key prefix: put short keys there.
        let key = if key.starts_with('/') {
            key.into_owned()
        } else {
            format!("{}/{key}", cni_core::ipam::block::DEFAULT_KEY_PREFIX)
        };
        txn = txn.put(key, value.to_vec());
        n += 1;
        if n == 64 {
            break;
        }
    }
    let store = MemoryStore::new();
    block_on(async {
        if store.commit(txn).await.is_ok() {
            exercise(Arc::new(store)).await;
        }
    });
}

/// A node record as the etcd registry reads it, and a node state file as the plugin reads
/// it (both are decoded from bytes another process wrote).
pub fn node_records(data: &[u8]) {
    if let Ok(record) = serde_json::from_slice::<NodeRecord>(data) {
        let _ = validate_node_name(&record.name);
        let text = serde_json::to_vec(&record).expect("a record serializes");
        let back: NodeRecord = serde_json::from_slice(&text).expect("and reads back");
        assert_eq!(back, record);
    }
    if let Ok(state) = serde_json::from_slice::<NodeState>(data) {
        let text = serde_json::to_vec(&state).expect("a state serializes");
        let back: NodeState = serde_json::from_slice(&text).expect("and reads back");
        assert_eq!(back, state);
    }
}

/// Bytes from a BGP peer: framed and decoded as `backend-bgp`'s connection reads its TCP
/// stream (messages up to 4096 bytes before Extended Messages), each UPDATE parsed with
/// RFC 7606 revised error handling and its attributes checked, for iBGP and eBGP, two- and
/// four-octet AS numbers.
pub fn bgp(data: &[u8]) {
    use rustbgpd_wire::validate::validate_update_attributes;
    use rustbgpd_wire::{Message, decode_message, peek_message_length};
    const MAX_LEN: u16 = 4096;

    let mut buf = bytes::BytesMut::from(data);
    loop {
        match peek_message_length(&buf, MAX_LEN) {
            Ok(Some(len)) if buf.len() >= usize::from(len) => {
                let mut message = buf.split_to(usize::from(len)).freeze();
                match decode_message(&mut message, MAX_LEN) {
                    Ok(Message::Update(update)) => {
                        for (four_octet_as, ibgp) in
                            [(true, true), (true, false), (false, true), (false, false)]
                        {
                            let Ok(revised) = update.parse_revised(four_octet_as, ibgp, false, &[])
                            else {
                                continue;
                            };
                            for m in &revised.malformed {
                                let _ = m.error.to_notification();
                            }
                            let has_nlri = !revised.update.announced.is_empty();
                            let _ = validate_update_attributes(
                                &revised.update.attributes,
                                has_nlri,
                                has_nlri,
                                !ibgp,
                            );
                        }
                    }
                    Ok(Message::RouteRefresh(rr)) => {
                        let _ = (rr.afi(), rr.safi());
                    }
                    Ok(Message::Notification(n)) => {
                        let _ = (n.code.as_u8(), n.subcode);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = e.to_string();
                    }
                }
            }
            // Incomplete, or a header that cannot be resynchronised: the connection stops.
            _ => return,
        }
    }
}
