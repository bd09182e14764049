//! Running CNI plugin executables as a runtime does.
//!
//! Used by [`DelegatedIpam`](crate::ipam::DelegatedIpam) to run an IPAM plugin, and by tools
//! and tests that play the runtime: [`Invocation`] holds the `CNI_*` parameters and execs one
//! plugin; [`add_list`], [`check_list`], [`del_list`], [`gc_list`] and [`status_list`] (or
//! [`status_list_with`], to pick the node namespace) run a whole configuration list the way
//! libcni does.
//!
//! Errors: a plugin that is not in `CNI_PATH`, cannot be started, or prints something that is
//! neither a result nor an error object gives [`Error::DelegateExec`] (code 102); a plugin
//! that fails with an error object gives [`Error::Delegate`] carrying its code. A plugin
//! whose executable is this process's own is never started: [`Error::ExecSelf`] (code 7),
//! since a plugin that runs itself with its own configuration recurses without end.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Result};
use crate::linux::netns::open_netns_file;
use crate::runner::Request;
use crate::spec::{
    CniResult, Command, ConfList, ErrorOutput, GcAttachment, LEGACY_ATTACHMENTS_KEY,
    VALID_ATTACHMENTS_KEY, Version, VersionInfo, is_plugin_name,
};

/// How often a start that fails with `ETXTBSY` (the executable was just written, and another
/// thread's fork still holds it open for writing) is tried, as libcni does.
const SPAWN_ATTEMPTS: u32 = 5;

/// How much of a misbehaving plugin's output goes into an error message.
const OUTPUT_EXCERPT: usize = 512;

/// The `CNI_*` parameters of one plugin invocation, as a runtime sets them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID` (empty for GC, STATUS and VERSION).
    pub container_id: String,
    /// `CNI_NETNS` (`None`: set to the empty string).
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME` (empty for GC, STATUS and VERSION).
    pub ifname: String,
    /// `CNI_ARGS` pairs, written `K=V;K=V`.
    pub args: Vec<(String, String)>,
    /// `CNI_PATH`: where plugins are looked up, joined with `:`.
    pub cni_path: Vec<PathBuf>,
    /// The network namespace the plugin process is started in: the node's. `None`: the
    /// caller's own. A runtime runs plugins in its node namespace; a lab that simulates
    /// several nodes on one machine starts each node's plugins in that node's namespace.
    pub runtime_netns: Option<PathBuf>,
}

impl Invocation {
    /// An invocation about one attachment, without `CNI_ARGS`.
    pub fn new(
        command: Command,
        container_id: impl Into<String>,
        netns: Option<PathBuf>,
        ifname: impl Into<String>,
        cni_path: Vec<PathBuf>,
    ) -> Self {
        Invocation {
            command,
            container_id: container_id.into(),
            netns,
            ifname: ifname.into(),
            args: Vec::new(),
            cni_path,
            runtime_netns: None,
        }
    }

    /// An invocation that is about no attachment (GC, STATUS, VERSION).
    pub fn global(command: Command, cni_path: Vec<PathBuf>) -> Self {
        Invocation::new(command, "", None, "", cni_path)
    }

    /// The invocation a plugin received, with `command`: what a plugin passes to the plugin
    /// it delegates to (same container, netns, interface, `CNI_ARGS`, `CNI_PATH`).
    pub fn from_request(request: &Request, command: Command) -> Self {
        Invocation {
            command,
            container_id: request.container_id.clone(),
            netns: request.netns.clone(),
            ifname: request.ifname.clone(),
            args: request.args.pairs.clone(),
            cni_path: request.cni_path.clone(),
            runtime_netns: None,
        }
    }

    /// A copy whose plugin process runs in the network namespace at `netns`.
    pub fn in_netns(mut self, netns: impl Into<PathBuf>) -> Self {
        self.runtime_netns = Some(netns.into());
        self
    }

    /// A copy with another command.
    pub fn with_command(&self, command: Command) -> Self {
        Invocation {
            command,
            ..self.clone()
        }
    }

    /// Adds a `CNI_ARGS` pair.
    pub fn arg(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.args.push((key.into(), value.into()));
        self
    }

    /// The six `CNI_*` variables, every one set (empty when not applicable), as libcni does.
    pub fn env(&self) -> Vec<(String, String)> {
        let path = std::env::join_paths(&self.cni_path)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| {
                // A directory containing ':' cannot be expressed; keep what can.
                self.cni_path
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(":")
            });
        let args = self
            .args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";");
        let netns = self
            .netns
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        vec![
            ("CNI_COMMAND".into(), self.command.as_str().into()),
            ("CNI_CONTAINERID".into(), self.container_id.clone()),
            ("CNI_NETNS".into(), netns),
            ("CNI_IFNAME".into(), self.ifname.clone()),
            ("CNI_ARGS".into(), args),
            ("CNI_PATH".into(), path),
        ]
    }

    /// Finds `plugin_type` in `CNI_PATH` and runs it with this invocation and `config` on
    /// stdin. Returns the plugin's result (read from any spec version) for ADD, `None` for
    /// every other command (their output is not a result).
    ///
    /// Errors: 102 when the plugin is missing, cannot run, or prints nonsense; the plugin's
    /// own code when it fails with an error object.
    pub async fn exec(&self, plugin_type: &str, config: &[u8]) -> Result<Option<CniResult>> {
        let binary = find_plugin(plugin_type, &self.cni_path)?;
        tracing::debug!(
            plugin = plugin_type,
            command = %self.command,
            container_id = %self.container_id,
            ifname = %self.ifname,
            "exec CNI plugin"
        );
        let stdout =
            exec_plugin_in(&binary, &self.env(), config, self.runtime_netns.as_deref()).await?;
        if self.command != Command::Add {
            return Ok(None);
        }
        let nonsense = |reason: String| Error::DelegateExec {
            plugin: plugin_type.to_owned(),
            reason: format!("ADD printed no valid result: {reason}"),
        };
        let value: Value = serde_json::from_slice(&stdout)
            .map_err(|e| nonsense(format!("{e}; stdout: {}", excerpt(&stdout))))?;
        CniResult::from_json(&value)
            .map(Some)
            .map_err(|e| nonsense(e.to_string()))
    }
}

/// Finds the executable of `plugin_type` in the `cni_path` directories (first match wins).
///
/// Errors: 102 when the name is not a plain file name or no directory has it.
pub fn find_plugin(plugin_type: &str, cni_path: &[PathBuf]) -> Result<PathBuf> {
    let fail = |reason: String| Error::DelegateExec {
        plugin: plugin_type.to_owned(),
        reason,
    };
    if !is_plugin_name(plugin_type) {
        return Err(fail(format!("{plugin_type:?} is not a plugin name")));
    }
    if cni_path.is_empty() {
        return Err(fail("CNI_PATH is empty".into()));
    }
    cni_path
        .iter()
        .map(|dir| dir.join(plugin_type))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            fail(format!(
                "not found in CNI_PATH {}",
                cni_path
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":")
            ))
        })
}

/// Whether `binary` is the executable this process runs: the same file as `/proc/self/exe`
/// by device and inode (both looked up through symlinks, so a symlink or a hard link to it
/// counts). `false` when either cannot be looked at.
pub fn is_own_executable(binary: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    const OWN: &str = "/proc/self/exe";
    match (std::fs::metadata(OWN), std::fs::metadata(binary)) {
        (Ok(own), Ok(other)) => own.dev() == other.dev() && own.ino() == other.ino(),
        _ => false,
    }
}

/// Refuses `binary` when it is this process's own executable (see [`is_own_executable`]).
/// Errors: 7.
pub fn refuse_own_executable(plugin: &str, binary: &Path) -> Result<()> {
    if is_own_executable(binary) {
        return Err(Error::ExecSelf {
            plugin: plugin.to_owned(),
            path: binary.to_path_buf(),
        });
    }
    Ok(())
}

/// Runs `binary` with `env` added to this process's environment and `stdin` as its input,
/// and returns its stdout when it exits with 0.
///
/// A non-zero exit with an error object on stdout gives [`Error::Delegate`] with the
/// plugin's code (its stderr stands in for an empty `msg`); any other failure gives
/// [`Error::DelegateExec`] (102) with excerpts of stdout and stderr. The plugin's stderr is
/// logged at debug level. The child is killed if the returned future is dropped, so callers
/// can put a timeout around it.
pub async fn exec_plugin(binary: &Path, env: &[(String, String)], stdin: &[u8]) -> Result<Vec<u8>> {
    exec_plugin_in(binary, env, stdin, None).await
}

/// [`exec_plugin`], with the plugin process started in the network namespace at `netns`
/// (`None`: the caller's). Errors as [`exec_plugin`]; a `netns` that cannot be opened or is
/// not a network namespace gives [`Error::NotANetns`] (code 4), and no process is started.
/// Every exec of this module goes through here, so none starts this process's own
/// executable ([`Error::ExecSelf`], code 7).
pub async fn exec_plugin_in(
    binary: &Path,
    env: &[(String, String)],
    stdin: &[u8],
    netns: Option<&Path>,
) -> Result<Vec<u8>> {
    let plugin = binary
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| binary.display().to_string());
    refuse_own_executable(&plugin, binary)?;
    let netns_file = netns.map(open_netns_file).transpose()?;
    let fail = |reason: String| Error::DelegateExec {
        plugin: plugin.clone(),
        reason,
    };

    let mut attempt = 1;
    let mut child = loop {
        let mut command = tokio::process::Command::new(binary);
        command
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(ns) = &netns_file {
            let fd = std::os::fd::AsRawFd::as_raw_fd(ns);
            // SAFETY: runs in the forked child before exec; setns is a plain system call
            // (async-signal-safe) on an fd inherited from the parent.
            unsafe {
                command.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let spawned = command.spawn();
        match spawned {
            Ok(child) => break child,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < SPAWN_ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
                attempt += 1;
            }
            Err(e) => return Err(fail(format!("cannot start {}: {e}", binary.display()))),
        }
    };

    let input = child.stdin.take();
    // Owns the pipe, so that it is closed (EOF for the plugin) once written; borrows stdin.
    let feed = async {
        if let Some(mut pipe) = input {
            // A plugin may exit without reading everything (a usage error): not our failure.
            if let Err(e) = pipe.write_all(stdin).await {
                tracing::debug!(error = %e, "plugin did not read all of its stdin");
            }
        }
    };
    let ((), output) = tokio::join!(feed, child.wait_with_output());
    let output =
        output.map_err(|e| fail(format!("waiting for {} failed: {e}", binary.display())))?;

    if !output.stderr.is_empty() {
        tracing::debug!(
            plugin = %plugin,
            stderr = %String::from_utf8_lossy(&output.stderr).trim_end(),
            "plugin stderr"
        );
    }
    if output.status.success() {
        return Ok(output.stdout);
    }
    match serde_json::from_slice::<ErrorOutput>(&output.stdout) {
        Ok(err) if err.code != 0 => {
            let msg = if err.msg.is_empty() {
                String::from_utf8_lossy(&output.stderr).trim().to_owned()
            } else {
                err.msg
            };
            Err(Error::Delegate {
                plugin,
                code: err.code,
                msg,
                details: err.details.filter(|d| !d.is_empty()),
            })
        }
        _ => Err(fail(format!(
            "{}; stdout: {}; stderr: {}",
            output.status,
            excerpt(&output.stdout),
            excerpt(&output.stderr)
        ))),
    }
}

/// The start of some output, for error messages.
fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    if text.is_empty() {
        return "(empty)".into();
    }
    match text.char_indices().nth(OUTPUT_EXCERPT) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// Asks a plugin which spec versions it speaks (VERSION, with `{"cniVersion": version}` on
/// stdin, as libcni does).
///
/// Errors: 102 when it cannot be run or does not answer with a version object.
pub async fn plugin_version(
    plugin_type: &str,
    cni_path: &[PathBuf],
    version: Version,
) -> Result<VersionInfo> {
    let binary = find_plugin(plugin_type, cni_path)?;
    let invocation = Invocation::global(Command::Version, cni_path.to_vec());
    let stdin = serde_json::json!({ "cniVersion": version.as_str() }).to_string();
    let stdout = exec_plugin(&binary, &invocation.env(), stdin.as_bytes()).await?;
    serde_json::from_slice(&stdout).map_err(|e| Error::DelegateExec {
        plugin: plugin_type.to_owned(),
        reason: format!(
            "VERSION printed no version object: {e}; stdout: {}",
            excerpt(&stdout)
        ),
    })
}

fn config_bytes(config: &Value) -> Vec<u8> {
    config.to_string().into_bytes()
}

/// ADD for a whole list: runs each plugin in order, passing each one's result to the next as
/// `prevResult`, and returns the last result. The configuration of each plugin is built by
/// [`ConfList::plugin_config`] with the negotiated version and `runtime_config` (capability
/// arguments by capability name). The command of `invocation` is ignored.
///
/// Stops at the first failure and returns it; as with libcni, cleaning up (DEL) is then the
/// caller's decision. Errors: 1 when no version can be negotiated, 7 for an invalid list,
/// and whatever a plugin fails with.
pub async fn add_list(
    list: &ConfList,
    invocation: &Invocation,
    runtime_config: &Map<String, Value>,
) -> Result<CniResult> {
    list.validate()?;
    let version = list.negotiate()?;
    let invocation = invocation.with_command(Command::Add);
    let mut prev: Option<CniResult> = None;
    for (i, plugin) in list.plugins.iter().enumerate() {
        let config = list.plugin_config(i, version, prev.as_ref(), runtime_config)?;
        let result = invocation
            .exec(&plugin.plugin_type, &config_bytes(&config))
            .await?
            .ok_or_else(|| Error::DelegateExec {
                plugin: plugin.plugin_type.clone(),
                reason: "ADD returned no result".into(),
            })?;
        prev = Some(result);
    }
    prev.ok_or_else(|| Error::invalid_config("plugins", "no plugins in the list"))
}

/// CHECK for a whole list, in order, each plugin getting `prev` (the list's ADD result) as
/// `prevResult`. Does nothing when the list sets `disableCheck`. The command of
/// `invocation` is ignored.
///
/// Errors: 1 when the list's version is before 0.4.0 (CHECK does not exist there), and the
/// first plugin failure.
pub async fn check_list(
    list: &ConfList,
    invocation: &Invocation,
    runtime_config: &Map<String, Value>,
    prev: &CniResult,
) -> Result<()> {
    list.validate()?;
    let version = list.negotiate()?;
    Command::Check.require_version(version)?;
    if list.disable_check {
        tracing::debug!(network = %list.name, "CHECK disabled by the configuration list");
        return Ok(());
    }
    let invocation = invocation.with_command(Command::Check);
    for (i, plugin) in list.plugins.iter().enumerate() {
        let config = list.plugin_config(i, version, Some(prev), runtime_config)?;
        invocation
            .exec(&plugin.plugin_type, &config_bytes(&config))
            .await?;
    }
    Ok(())
}

/// DEL for a whole list, in reverse order. From 0.4.0 on each plugin gets `prev` (the list's
/// ADD result, when the caller kept it) as `prevResult`. Every plugin is run even when one
/// fails; the failures are returned together. The command of `invocation` is ignored.
pub async fn del_list(
    list: &ConfList,
    invocation: &Invocation,
    runtime_config: &Map<String, Value>,
    prev: Option<&CniResult>,
) -> Result<()> {
    list.validate()?;
    let version = list.negotiate()?;
    let prev = prev.filter(|_| version >= Version::V0_4_0);
    let invocation = invocation.with_command(Command::Del);
    let mut errors = Vec::new();
    for (i, plugin) in list.plugins.iter().enumerate().rev() {
        let outcome = match list.plugin_config(i, version, prev, runtime_config) {
            Ok(config) => invocation
                .exec(&plugin.plugin_type, &config_bytes(&config))
                .await
                .map(drop),
            Err(e) => Err(e),
        };
        if let Err(e) = outcome {
            tracing::warn!(plugin = %plugin.plugin_type, error = %e, "DEL failed");
            errors.push(e);
        }
    }
    Error::collect(errors)
}

/// GC for a whole list: every plugin gets the list's configuration with `valid` under both
/// `cni.dev/valid-attachments` and `cni.dev/attachments` (as libcni 1.2.3 and later send
/// it), and no container, netns or interface. Does nothing when the list sets `disableGC`
/// or its version is before 1.1.0 (as libcni). Every plugin is run; the failures are
/// returned together.
pub async fn gc_list(list: &ConfList, cni_path: &[PathBuf], valid: &[GcAttachment]) -> Result<()> {
    list.validate()?;
    let version = list.negotiate()?;
    if list.disable_gc || !version.supports_gc_status() {
        return Ok(());
    }
    let invocation = Invocation::global(Command::Gc, cni_path.to_vec());
    let valid = serde_json::to_value(valid).map_err(|source| Error::Decode {
        what: "valid attachments",
        source,
    })?;
    let mut errors = Vec::new();
    for (i, plugin) in list.plugins.iter().enumerate() {
        let mut config = list.plugin_config(i, version, None, &Map::new())?;
        if let Value::Object(map) = &mut config {
            map.insert(VALID_ATTACHMENTS_KEY.into(), valid.clone());
            map.insert(LEGACY_ATTACHMENTS_KEY.into(), valid.clone());
        }
        if let Err(e) = invocation
            .exec(&plugin.plugin_type, &config_bytes(&config))
            .await
        {
            tracing::warn!(plugin = %plugin.plugin_type, error = %e, "GC failed");
            errors.push(e);
        }
    }
    Error::collect(errors)
}

/// STATUS for a whole list, in order; the first plugin that is not ready ends it with its
/// error (50/51 from a plugin that follows the spec). Does nothing before 1.1.0.
pub async fn status_list(list: &ConfList, cni_path: &[PathBuf]) -> Result<()> {
    status_list_with(
        list,
        &Invocation::global(Command::Status, cni_path.to_vec()),
    )
    .await
}

/// [`status_list`] with the plugin processes run as `invocation` says: its `CNI_PATH` and
/// [`runtime_netns`](Invocation::runtime_netns) (the node whose readiness is asked, when one
/// machine plays several nodes). Its command, container, netns, interface and `CNI_ARGS` are
/// ignored: STATUS is about no attachment. Errors as [`status_list`].
pub async fn status_list_with(list: &ConfList, invocation: &Invocation) -> Result<()> {
    list.validate()?;
    let version = list.negotiate()?;
    if !version.supports_gc_status() {
        return Ok(());
    }
    let invocation = Invocation {
        runtime_netns: invocation.runtime_netns.clone(),
        ..Invocation::global(Command::Status, invocation.cni_path.clone())
    };
    for (i, plugin) in list.plugins.iter().enumerate() {
        let config = list.plugin_config(i, version, None, &Map::new())?;
        invocation
            .exec(&plugin.plugin_type, &config_bytes(&config))
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runtime namespace that opens but is no network namespace is refused with code 4,
    /// before any process is started, as compose refuses such a `CNI_NETNS`.
    #[tokio::test]
    async fn a_runtime_netns_that_is_no_network_namespace_is_code_4() {
        let binary = Path::new("/bin/true");
        if !binary.is_file() {
            eprintln!("SKIPPED: /bin/true is missing");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone");
        for netns in [
            Path::new("/etc/hostname"),
            Path::new("/proc/self/ns/mnt"),
            missing.as_path(),
        ] {
            let err = exec_plugin_in(binary, &[], b"{}", Some(netns))
                .await
                .unwrap_err();
            assert!(matches!(err, Error::NotANetns { .. }), "{netns:?}: {err:?}");
            assert_eq!(err.code().0, 4, "{netns:?}");
        }
        exec_plugin_in(binary, &[], b"{}", Some(Path::new("/proc/self/ns/net")))
            .await
            .unwrap();
    }
}
