//! The standard cnikit plugin: the composition the example binary `cnikit` runs.
//!
//! One binary, two roles, chosen by the configuration it receives:
//! - **main plugin** (`"type": "cnikit"`): plugs the pod in with the pod network named by
//!   `podNetwork` (bridge, routed or ebpf) and addresses from the IPAM named by `ipam.type`:
//!   [`IPAM_TYPE`] for the built-in block IPAM, anything else is exec'd from `CNI_PATH` as
//!   the spec describes (e.g. the reference `host-local`);
//! - **IPAM plugin** (another plugin's config whose `ipam.type` is [`IPAM_TYPE`], with this
//!   binary installed as `cnikit-ipam`): only allocates and releases addresses, so the
//!   reference `bridge` or `ptp` plugins can use cnikit's block IPAM.
//!
//! The block IPAM stores its state in the local file store (`<dataDir>/ipam`) unless
//! `ipam.store` names another datastore.

mod config;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use cni_core::compose::{Composed, Parts};
use cni_core::ipam::block::Reserve;
use cni_core::ipam::{BlockIpam, BlockIpamConfig, DelegatedIpam, Ipam};
use cni_core::network::PodNetwork;
use cni_core::runner::{self, Plugin, Request};
use cni_core::spec::{CniResult, Command, NetConf};
use cni_core::state::NodeState;
use cni_core::store::{FileStore, Store};
use cni_core::{Error, Result};

pub use config::{Config, DEFAULT_DATA_ROOT, PodNetworkKind, StoreKind};

/// The `type` of the main plugin.
pub const TYPE: &str = "cnikit";
/// The `ipam.type` of the built-in block IPAM.
pub const IPAM_TYPE: &str = "cnikit-ipam";
/// Pod MTU when neither the configuration nor the node agent gives one.
pub const DEFAULT_MTU: u32 = 1500;
/// The smallest MTU an IPv6 link may have.
const IPV6_MIN_MTU: u32 = 1280;

/// The parts factory of the main plugin: reads [`Config`] and builds the IPAM and the pod
/// network for each request.
#[derive(Debug, Clone, Default)]
pub struct CnikitParts;

impl CnikitParts {
    fn config(request: &Request) -> Result<Config> {
        let config: Config = request.config.plugin_config()?;
        config.validate()?;
        Ok(config)
    }

    /// The pod MTU: the configured one, else the agent's (node state file), else 1500. DEL
    /// sets no MTU, so for DEL an unreadable state file is logged and passed over: it must
    /// not keep the pod's interface and address from being released.
    fn mtu(request: &Request, config: &Config, data_dir: &std::path::Path) -> Result<u32> {
        if let Some(mtu) = config.mtu {
            return Ok(mtu);
        }
        match NodeState::read(data_dir) {
            Ok(state) => Ok(state.map_or(DEFAULT_MTU, |s| s.mtu)),
            Err(e) if request.command == Command::Del => {
                tracing::warn!(error = %e, "node state file unreadable; DEL goes on without it");
                Ok(DEFAULT_MTU)
            }
            Err(e) => Err(e),
        }
    }

    /// Refuses an MTU below the IPv6 minimum for a block IPAM pool of IPv6 addresses. The
    /// pod network would refuse it too, but only after the IPAM allocated; checked here, a
    /// bad MTU leaves the datastore untouched. (A delegated IPAM's family is known only
    /// from its result; its allocation is released when the pod network refuses.)
    fn check_mtu_for_pool(request: &Request, mtu: u32) -> Result<()> {
        let Some(ipam) = request.config.ipam.as_ref() else {
            return Ok(());
        };
        if mtu >= IPV6_MIN_MTU || ipam.ipam_type != IPAM_TYPE {
            return Ok(());
        }
        // A configuration that does not decode is reported by the IPAM.
        let Ok(block) = ipam.config::<BlockIpamConfig>() else {
            return Ok(());
        };
        if block.pool.addr().is_ipv6() {
            return Err(Error::invalid_config(
                "mtu",
                format!(
                    "{mtu} is below {IPV6_MIN_MTU}, the IPv6 minimum, and pool {} is IPv6",
                    block.pool
                ),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Parts for CnikitParts {
    async fn ipam(&self, request: &Request) -> Result<Box<dyn Ipam>> {
        let config = Self::config(request)?;
        block_ipam(request, &config, Some(config.pod_network.reserve())).await
    }

    async fn network(&self, request: &Request) -> Result<Box<dyn PodNetwork>> {
        let config = Self::config(request)?;
        let data_dir = config.data_dir(&request.config.name);
        let mtu = Self::mtu(request, &config, &data_dir)?;
        Self::check_mtu_for_pool(request, mtu)?;
        let host = cni_core::linux::NetNs::current().await?;
        match config.pod_network {
            PodNetworkKind::Bridge => bridge(request, mtu, host),
            PodNetworkKind::Routed => routed(request, mtu, host),
            PodNetworkKind::Ebpf => ebpf(request, &config, mtu, host),
        }
    }

    async fn status(&self, request: &Request) -> Result<()> {
        let config = Self::config(request)?;
        let data_dir = config.data_dir(&request.config.name);
        if let Some(mode) = &config.routing
            && NodeState::read(&data_dir)?.is_none()
        {
            return Err(Error::NotReady {
                reason: format!(
                    "routing mode {mode}: the node agent has not written {} yet",
                    NodeState::path(&data_dir).display()
                ),
            });
        }
        // The IPAM must be buildable and its datastore reachable.
        ipam_ready(self.ipam(request).await?.as_ref()).await
    }
}

#[cfg(feature = "bridge")]
fn bridge(
    request: &Request,
    mtu: u32,
    host: cni_core::linux::NetNs,
) -> Result<Box<dyn PodNetwork>> {
    let mut bridge: cni_core::linux::BridgeConfig = request.config.plugin_config()?;
    bridge.mtu = mtu;
    Ok(Box::new(cni_core::linux::BridgeNetwork::new(bridge, host)?))
}

#[cfg(not(feature = "bridge"))]
fn bridge(_: &Request, _: u32, _: cni_core::linux::NetNs) -> Result<Box<dyn PodNetwork>> {
    Err(Error::invalid_config(
        "podNetwork",
        "this build has no `bridge` feature",
    ))
}

#[cfg(feature = "routed")]
fn routed(
    request: &Request,
    mtu: u32,
    host: cni_core::linux::NetNs,
) -> Result<Box<dyn PodNetwork>> {
    let mut routed: cni_core::linux::RoutedConfig = request.config.plugin_config()?;
    routed.mtu = mtu;
    Ok(Box::new(cni_core::linux::RoutedNetwork::new(routed, host)?))
}

#[cfg(not(feature = "routed"))]
fn routed(_: &Request, _: u32, _: cni_core::linux::NetNs) -> Result<Box<dyn PodNetwork>> {
    Err(Error::invalid_config(
        "podNetwork",
        "this build has no `routed` feature",
    ))
}

#[cfg(feature = "ebpf")]
fn ebpf(
    request: &Request,
    config: &Config,
    mtu: u32,
    host: cni_core::linux::NetNs,
) -> Result<Box<dyn PodNetwork>> {
    let mut ebpf: backend_ebpf::Config = request.config.plugin_config()?;
    ebpf.mtu = mtu;
    let node = config.node_name()?;
    Ok(Box::new(backend_ebpf::EbpfNetwork::new(
        ebpf,
        &request.config.name,
        &node,
        host,
    )?))
}

#[cfg(not(feature = "ebpf"))]
fn ebpf(_: &Request, _: &Config, _: u32, _: cni_core::linux::NetNs) -> Result<Box<dyn PodNetwork>> {
    Err(Error::invalid_config(
        "podNetwork",
        "this build has no `ebpf` feature",
    ))
}

/// Builds the IPAM the configuration names: the block IPAM for [`IPAM_TYPE`] (with
/// `reserve` forced when the pod network needs it), else a delegated plugin.
async fn block_ipam(
    request: &Request,
    config: &Config,
    reserve: Option<Reserve>,
) -> Result<Box<dyn Ipam>> {
    let ipam = request
        .config
        .ipam
        .as_ref()
        .ok_or_else(|| Error::invalid_config("ipam", "missing"))?;
    if ipam.ipam_type != IPAM_TYPE {
        return Ok(Box::new(DelegatedIpam::new(request)?));
    }
    Ok(Box::new(
        open_block_ipam(&request.config, config, reserve).await?,
    ))
}

/// The block IPAM of a network configuration whose `ipam.type` is [`IPAM_TYPE`], on the
/// datastore `ipam.store` names. `reserve` overrides `ipam.reserve` (the pod network decides).
///
/// Errors: 7 for a bad `ipam` section, 11 when the datastore cannot be reached.
pub async fn open_block_ipam(
    conf: &NetConf,
    config: &Config,
    reserve: Option<Reserve>,
) -> Result<BlockIpam<Arc<dyn Store>>> {
    let ipam = conf
        .ipam
        .as_ref()
        .ok_or_else(|| Error::invalid_config("ipam", "missing"))?;
    let mut block: BlockIpamConfig = ipam.config()?;
    block.network = conf.name.clone();
    if block.node.is_empty() {
        block.node = config.node_name()?;
    }
    if let Some(reserve) = reserve {
        block.reserve = reserve;
    }
    let kind = StoreKind::from_ipam(&ipam.config)?;
    if let StoreKind::Etcd(object) = &kind {
        // etcd is shared by many pools: its `prefix` is where this pool's keys live.
        let prefix = etcd_prefix(object)?;
        if ipam.config.contains_key("keyPrefix") && block.key_prefix != prefix {
            return Err(Error::invalid_config(
                "ipam.keyPrefix",
                format!(
                    "{:?} differs from ipam.store.prefix {prefix:?}; with etcd, set only \
                     ipam.store.prefix",
                    block.key_prefix
                ),
            ));
        }
        block.key_prefix = prefix;
    }
    if let StoreKind::Kubernetes(object) = &kind {
        // The prefix names the pool's objects; the store and the engine must agree on it.
        let prefix = kubernetes_config(object)?.prefix;
        if ipam.config.contains_key("keyPrefix") && block.key_prefix != prefix {
            return Err(Error::invalid_config(
                "ipam.keyPrefix",
                format!(
                    "{:?} differs from ipam.store.prefix {prefix:?}; with kubernetes, set \
                     only ipam.store.prefix",
                    block.key_prefix
                ),
            ));
        }
        block.key_prefix = prefix;
    }
    block.validate()?;
    let store = open_store(&kind, &config.data_dir(&conf.name)).await?;
    BlockIpam::new(store, block)
}

/// Opens the datastore `kind`; the file store lives in its `path`, else `<data_dir>/ipam`.
/// Opening etcd does no I/O (the first request connects, within its deadline).
///
/// Errors: 7 for a bad store configuration or a store this build lacks.
pub async fn open_store(kind: &StoreKind, data_dir: &std::path::Path) -> Result<Arc<dyn Store>> {
    match kind {
        StoreKind::File { path } => Ok(Arc::new(FileStore::new(
            path.clone().unwrap_or_else(|| data_dir.join("ipam")),
        ))),
        #[cfg(feature = "etcd")]
        StoreKind::Etcd(object) => Ok(Arc::new(
            ipam_etcd::EtcdStore::connect(&etcd_config(object)?).await?,
        )),
        #[cfg(not(feature = "etcd"))]
        StoreKind::Etcd(_) => Err(no_etcd()),
        #[cfg(feature = "kubernetes")]
        StoreKind::Kubernetes(object) => Ok(Arc::new(
            ipam_crd::KubeStore::connect(&kubernetes_config(object)?).await?,
        )),
        #[cfg(not(feature = "kubernetes"))]
        StoreKind::Kubernetes(_) => Err(no_kubernetes()),
    }
}

/// The `ipam.store` object of type `kubernetes`, validated. Errors: code 7.
#[cfg(feature = "kubernetes")]
pub(crate) fn kubernetes_config(
    object: &serde_json::Map<String, serde_json::Value>,
) -> Result<ipam_crd::Config> {
    ipam_crd::Config::from_value(&serde_json::Value::Object(object.clone()))
}

/// Without the `kubernetes` feature: code 7.
#[cfg(not(feature = "kubernetes"))]
fn kubernetes_config(
    _object: &serde_json::Map<String, serde_json::Value>,
) -> Result<KubernetesConfigUnavailable> {
    Err(no_kubernetes())
}

/// Stands in for `ipam_crd::Config` in builds without the `kubernetes` feature.
#[cfg(not(feature = "kubernetes"))]
struct KubernetesConfigUnavailable {
    prefix: String,
}

#[cfg(not(feature = "kubernetes"))]
fn no_kubernetes() -> Error {
    Error::invalid_config("ipam.store.type", "this build has no `kubernetes` feature")
}

/// The key prefix an `ipam.store` object of type `etcd` names. Errors: code 7.
fn etcd_prefix(object: &serde_json::Map<String, serde_json::Value>) -> Result<String> {
    #[cfg(feature = "etcd")]
    return Ok(etcd_config(object)?.prefix);
    #[cfg(not(feature = "etcd"))]
    {
        let _ = object;
        Err(no_etcd())
    }
}

/// The `ipam.store` object of type `etcd`, validated. Errors: code 7.
#[cfg(feature = "etcd")]
pub(crate) fn etcd_config(
    object: &serde_json::Map<String, serde_json::Value>,
) -> Result<ipam_etcd::Config> {
    let config = ipam_etcd::Config::from_value(&serde_json::Value::Object(object.clone()))?;
    config.validate()?;
    Ok(config)
}

#[cfg(not(feature = "etcd"))]
fn no_etcd() -> Error {
    Error::invalid_config("ipam.store.type", "this build has no `etcd` feature")
}

/// STATUS of an IPAM: its datastore must answer; anything else is "not ready" (code 50).
async fn ipam_ready(ipam: &dyn Ipam) -> Result<()> {
    ipam.ready().await.map_err(|e| Error::NotReady {
        reason: format!("IPAM datastore: {e}"),
    })
}

/// The IPAM-only role: answers for another plugin whose `ipam.type` is [`IPAM_TYPE`].
#[derive(Debug, Clone, Default)]
pub struct CnikitIpam;

impl CnikitIpam {
    async fn ipam(request: &Request) -> Result<Box<dyn Ipam>> {
        // The calling plugin's own keys are not ours; only `ipam` is read, plus `dataDir`
        // and `nodeName` from inside it.
        let ipam = request
            .config
            .ipam
            .as_ref()
            .ok_or_else(|| Error::invalid_config("ipam", "missing"))?;
        let config: Config = ipam.config()?;
        config.validate()?;
        block_ipam(request, &config, None).await
    }
}

#[async_trait]
impl Plugin for CnikitIpam {
    async fn add(&self, request: &Request) -> Result<CniResult> {
        let allocation = Self::ipam(request)
            .await?
            .allocate(&request.attachment())
            .await?;
        Ok(CniResult {
            interfaces: Vec::new(),
            ips: allocation.ips,
            routes: allocation.routes,
            dns: allocation.dns,
        })
    }

    async fn del(&self, request: &Request) -> Result<()> {
        Self::ipam(request)
            .await?
            .release(&request.attachment())
            .await
    }

    async fn check(&self, request: &Request) -> Result<()> {
        Self::ipam(request)
            .await?
            .check(&request.attachment())
            .await
            .map(drop)
    }

    async fn gc(&self, request: &Request, valid: &[cni_core::ipam::Attachment]) -> Result<()> {
        Self::ipam(request).await?.gc(valid).await.map(drop)
    }

    async fn status(&self, request: &Request) -> Result<()> {
        ipam_ready(Self::ipam(request).await?.as_ref()).await
    }
}

/// The `cnikit` binary's plugin: the main plugin or the IPAM-only role, by configuration.
#[derive(Debug, Default)]
pub struct Cnikit {
    main: Composed<CnikitParts>,
    ipam: CnikitIpam,
}

impl Cnikit {
    fn role(&self, request: &Request) -> &dyn Plugin {
        let is_ipam_call = request.config.plugin_type != TYPE
            && request
                .config
                .ipam
                .as_ref()
                .is_some_and(|i| i.ipam_type == IPAM_TYPE);
        if is_ipam_call { &self.ipam } else { &self.main }
    }
}

#[async_trait]
impl Plugin for Cnikit {
    async fn add(&self, request: &Request) -> Result<CniResult> {
        self.role(request).add(request).await
    }
    async fn del(&self, request: &Request) -> Result<()> {
        self.role(request).del(request).await
    }
    async fn check(&self, request: &Request) -> Result<()> {
        self.role(request).check(request).await
    }
    async fn gc(&self, request: &Request, valid: &[cni_core::ipam::Attachment]) -> Result<()> {
        self.role(request).gc(request, valid).await
    }
    async fn status(&self, request: &Request) -> Result<()> {
        self.role(request).status(request).await
    }
}

/// Runs the `cnikit` plugin as a process: reads the environment and stdin, logs to the
/// configured `logFile` (or stderr), prints the result or error on stdout, and returns the
/// exit code for `std::process::exit`.
pub fn main() -> i32 {
    let mut stdin = Vec::new();
    // An unreadable stdin is reported by the runner as an empty (undecodable) one.
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut stdin);
    init_logging(&stdin);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cnikit: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let plugin = Cnikit::default();
    runtime.block_on(runner::run(
        &plugin,
        std::env::vars(),
        &stdin,
        &mut std::io::stdout(),
    ))
}

/// Logs go to `logFile` from the configuration (the main plugin's or its `ipam` object's),
/// else to stderr; never to stdout, which belongs to the CNI result.
fn init_logging(stdin: &[u8]) {
    #[derive(serde::Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    struct Logging {
        log_file: Option<PathBuf>,
        log_level: Option<String>,
        ipam: Option<Box<Logging>>,
    }
    let cfg: Logging = serde_json::from_slice(stdin).unwrap_or_default();
    let (file, level) = match (&cfg.log_file, &cfg.ipam) {
        (None, Some(ipam)) if ipam.log_file.is_some() => {
            (ipam.log_file.clone(), ipam.log_level.clone())
        }
        _ => (cfg.log_file.clone(), cfg.log_level.clone()),
    };
    let filter = std::env::var("CNIKIT_LOG")
        .ok()
        .or(level)
        .unwrap_or_else(|| "warn".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    let opened = file.and_then(|path| {
        // The log names pods, addresses and paths: for root's eyes only.
        cni_core::private_fs::open_options()
            .create(true)
            .append(true)
            .open(path)
            .ok()
    });
    let _ = match opened {
        Some(f) => builder.with_writer(std::sync::Mutex::new(f)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}
