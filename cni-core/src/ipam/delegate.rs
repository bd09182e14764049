//! IPAM by delegation: exec the CNI IPAM plugin named by `ipam.type`, as the spec describes.
//!
//! The delegate runs with the plugin's own `CNI_*` parameters (`CNI_COMMAND` set to the
//! operation) and exactly the plugin's stdin configuration, found in `CNI_PATH`:
//!
//! | [`Ipam`] method | delegate command |
//! |---|---|
//! | `allocate` | ADD (its result gives the allocation) |
//! | `release`  | DEL (also the rollback of a failed ADD) |
//! | `check`    | CHECK (0.4.0 and later; the allocation is the `prevResult`'s) |
//! | `gc`       | GC (1.1.0 and later, when the delegate speaks the version; else nothing) |
//!
//! Idempotency is the delegate's: the reference `host-local` refuses a second ADD for the
//! same container and interface ("duplicate allocation is not allowed") and accepts a DEL
//! of what it does not hold.

use async_trait::async_trait;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::exec::{Invocation, find_plugin, plugin_version, refuse_own_executable};
use crate::ipam::{Allocation, Attachment, GcReport, Ipam};
use crate::runner::Request;
use crate::spec::{
    CniResult, Command, GcAttachment, LEGACY_ATTACHMENTS_KEY, VALID_ATTACHMENTS_KEY, Version,
    validate_plugin_type,
};

/// An [`Ipam`] that execs a CNI IPAM plugin (such as `host-local`) found in `CNI_PATH`.
///
/// Built per request with [`DelegatedIpam::new`]; every call execs the plugin once.
#[derive(Debug, Clone)]
pub struct DelegatedIpam {
    plugin: String,
    network: String,
    invocation: Invocation,
    config: Vec<u8>,
    version: Version,
    prev: Option<CniResult>,
}

impl DelegatedIpam {
    /// The delegate of `request`: its `ipam.type`, `CNI_*` parameters and stdin.
    ///
    /// Errors: 7 when the configuration has no `ipam` section, its `type` is not a plugin
    /// name, or it names the plugin itself: the configuration's own `type`, or a name whose
    /// executable in `CNI_PATH` is this process's own. The delegate gets this very
    /// configuration, so it would delegate to itself again, without end. (A delegate missing
    /// from `CNI_PATH` is reported when it is run: 102.)
    pub fn new(request: &Request) -> Result<Self> {
        let ipam = request
            .config
            .ipam
            .as_ref()
            .ok_or_else(|| Error::invalid_config("ipam", "missing: nothing to delegate to"))?;
        validate_plugin_type("ipam.type", &ipam.ipam_type)?;
        if ipam.ipam_type == request.config.plugin_type {
            return Err(Error::invalid_config(
                "ipam.type",
                format!(
                    "{:?} is this plugin's own type: it would exec itself as its IPAM plugin, \
                     recursively (name an IPAM plugin)",
                    ipam.ipam_type
                ),
            ));
        }
        if let Ok(binary) = find_plugin(&ipam.ipam_type, &request.cni_path) {
            refuse_own_executable(&ipam.ipam_type, &binary)
                .map_err(|e| Error::invalid_config("ipam.type", e.to_string()))?;
        }
        Ok(DelegatedIpam {
            plugin: ipam.ipam_type.clone(),
            network: request.config.name.clone(),
            invocation: Invocation::from_request(request, request.command),
            config: request.stdin.clone(),
            version: request.version,
            prev: request.prev_result.clone(),
        })
    }

    /// The delegate's plugin name (`ipam.type`).
    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    /// The invocation for `command` about `attachment`, which must belong to this network.
    fn invocation(&self, command: Command, attachment: &Attachment) -> Result<Invocation> {
        if attachment.network != self.network {
            return Err(Error::invalid_config(
                "name",
                format!(
                    "attachment of network {:?} given to the IPAM of network {:?}",
                    attachment.network, self.network
                ),
            ));
        }
        let mut invocation = self.invocation.with_command(command);
        invocation.container_id = attachment.container_id.clone();
        invocation.ifname = attachment.ifname.clone();
        Ok(invocation)
    }
}

#[async_trait]
impl Ipam for DelegatedIpam {
    async fn allocate(&self, attachment: &Attachment) -> Result<Allocation> {
        let result = self
            .invocation(Command::Add, attachment)?
            .exec(&self.plugin, &self.config)
            .await?
            .ok_or_else(|| Error::DelegateExec {
                plugin: self.plugin.clone(),
                reason: "ADD returned no result".into(),
            })?;
        Ok(result.into())
    }

    async fn release(&self, attachment: &Attachment) -> Result<()> {
        self.invocation(Command::Del, attachment)?
            .exec(&self.plugin, &self.config)
            .await
            .map(drop)
    }

    async fn check(&self, attachment: &Attachment) -> Result<Allocation> {
        Command::Check.require_version(self.version)?;
        let prev = self.prev.as_ref().ok_or_else(|| {
            Error::invalid_config("prevResult", "CHECK needs the result of ADD in prevResult")
        })?;
        self.invocation(Command::Check, attachment)?
            .exec(&self.plugin, &self.config)
            .await?;
        Ok(prev.clone().into())
    }

    async fn gc(&self, valid: &[Attachment]) -> Result<GcReport> {
        if !self.version.supports_gc_status() {
            tracing::debug!(plugin = %self.plugin, version = %self.version, "no GC before 1.1.0");
            return Ok(GcReport::default());
        }
        let info = plugin_version(&self.plugin, &self.invocation.cni_path, self.version).await?;
        if !info.supports(self.version) {
            tracing::info!(
                plugin = %self.plugin,
                version = %self.version,
                supported = ?info.supported_versions,
                "delegated IPAM does not speak this version: no GC"
            );
            return Ok(GcReport::default());
        }
        let mut config: Value =
            serde_json::from_slice(&self.config).map_err(|source| Error::Decode {
                what: "network configuration",
                source,
            })?;
        let valid: Vec<GcAttachment> = valid
            .iter()
            .filter(|a| a.network == self.network)
            .map(|a| GcAttachment {
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
            })
            .collect();
        if let Value::Object(map) = &mut config {
            map.remove(LEGACY_ATTACHMENTS_KEY);
            let list = serde_json::to_value(valid).map_err(|source| Error::Decode {
                what: "valid attachments",
                source,
            })?;
            map.insert(VALID_ATTACHMENTS_KEY.into(), list);
        }
        Invocation::global(Command::Gc, self.invocation.cni_path.clone())
            .exec(&self.plugin, config.to_string().as_bytes())
            .await?;
        // The delegate does not say what it released.
        Ok(GcReport::default())
    }
}
