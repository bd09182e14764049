//! The plugin entry point: parse and validate a CNI invocation, call the [`Plugin`], print
//! the outcome.
//!
//! [`run`] takes the environment, stdin and stdout as values, so only `main()` touches the
//! process: it reads the environment and stdin, calls [`run`], and exits with its code.
//!
//! ```no_run
//! # use cni_core::runner::{self, Plugin};
//! # async fn example(plugin: &dyn Plugin) {
//! let mut stdin = Vec::new();
//! std::io::Read::read_to_end(&mut std::io::stdin(), &mut stdin).ok();
//! let code = runner::run(plugin, std::env::vars(), &stdin, &mut std::io::stdout()).await;
//! std::process::exit(code);
//! # }
//! ```
//!
//! # What is checked, in order, before the plugin is called
//! Every failure prints one error object (in the configuration's `cniVersion` when it is
//! known, else the newest) and exits with 1; the plugin is not called.
//!
//! | check | code |
//! |---|---|
//! | `CNI_COMMAND` missing or not one of ADD, DEL, CHECK, GC, STATUS, VERSION | 4 |
//! | VERSION: answered at once (see below) | – |
//! | `CNI_CONTAINERID` missing (ADD, DEL, CHECK) or not `^[a-zA-Z0-9][a-zA-Z0-9_.-]*$` | 4 |
//! | `CNI_NETNS` missing (ADD, CHECK; optional on DEL) | 4 |
//! | `CNI_IFNAME` missing (ADD, DEL, CHECK) or not a Linux interface name | 4 |
//! | `CNI_ARGS` malformed, or an unknown key without `IgnoreUnknown` (ADD, DEL, CHECK) | 4 |
//! | `CNI_PATH` missing (every command but VERSION, as the reference `skel`) | 4 |
//! | stdin empty, not JSON, not an object | 6 |
//! | `cniVersion` not a string | 6 |
//! | `cniVersion` absent (means 0.1.0) or not one of 0.3.0 … 1.1.0 | 1 |
//! | CHECK with a version before 0.4.0, GC or STATUS before 1.1.0 | 1 |
//! | a standard key of the wrong JSON type (`ipam`, `runtimeConfig.portMappings`…) | 6 |
//! | `name` missing or invalid, `type` missing, `ipam` without `type` | 7 |
//! | `prevResult` present but not a CNI result of any version | 6 |
//! | CHECK without `prevResult` | 7 |
//! | GC without `cni.dev/valid-attachments` (JSON `null` or `[]` means "none valid") | 7 |
//!
//! GC and STATUS ignore `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME` and `CNI_ARGS`: the spec
//! gives them only `CNI_COMMAND` and `CNI_PATH`.
//!
//! VERSION needs no other variable. It answers in the `cniVersion` of its stdin when that is
//! a version cnikit speaks, else (stdin empty, not JSON, unknown version) in the newest; it
//! never fails, since it is how a runtime finds out what to send.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use async_trait::async_trait;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::ipam::Attachment;
use crate::spec::{
    CniArgs, CniResult, Command, ErrorOutput, NetConf, VALID_ATTACHMENTS_KEY, Version, VersionInfo,
    parse_object, validate_container_id, validate_ifname, version_of,
};

/// A CNI plugin: one method per CNI verb. VERSION is answered by [`run`].
///
/// Every method runs in the network namespace the plugin was started in (the node's); none
/// may print to stdout (log with `tracing`). The request has been validated as the
/// [module docs](self) describe.
#[async_trait]
pub trait Plugin: Send + Sync {
    /// ADD: attaches the container and returns the result, printed by [`run`] in the
    /// configuration's version.
    async fn add(&self, request: &Request) -> Result<CniResult>;

    /// DEL: detaches the container. Must succeed when the attachment is already gone.
    async fn del(&self, request: &Request) -> Result<()>;

    /// CHECK: verifies the attachment against `request.prev_result` (always present).
    async fn check(&self, request: &Request) -> Result<()>;

    /// GC: releases what belongs to attachments of this network that are not in `valid`.
    /// The default does nothing, which is right for a plugin that keeps no state.
    async fn gc(&self, request: &Request, valid: &[Attachment]) -> Result<()> {
        let _ = (request, valid);
        Ok(())
    }

    /// STATUS: `Ok` when the plugin is ready to ADD; [`Error::NotReady`] (code 50) when it is
    /// not. The default is always ready.
    async fn status(&self, request: &Request) -> Result<()> {
        let _ = request;
        Ok(())
    }

    /// `CNI_ARGS` keys the plugin understands besides [`CniArgs::KNOWN`]; other unknown keys
    /// are refused (code 4) unless `IgnoreUnknown=1`.
    fn extra_args(&self) -> &'static [&'static str] {
        &[]
    }
}

/// One validated CNI invocation (any command but VERSION).
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID`; empty for GC and STATUS.
    pub container_id: String,
    /// `CNI_NETNS`; always set for ADD and CHECK, optional for DEL, `None` for GC and STATUS.
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`; empty for GC and STATUS.
    pub ifname: String,
    /// `CNI_ARGS`, parsed (empty for GC and STATUS).
    pub args: CniArgs,
    /// `CNI_PATH`, split on `:` (empty entries dropped).
    pub cni_path: Vec<PathBuf>,
    /// The configuration from stdin, decoded and validated.
    pub config: NetConf,
    /// `prevResult`, decoded (always present for CHECK).
    pub prev_result: Option<CniResult>,
    /// The exact stdin bytes, to hand to a delegated plugin.
    pub stdin: Vec<u8>,
    /// The configuration's `cniVersion`: the version results and errors are printed in.
    pub version: Version,
}

impl Request {
    /// Parses and validates an invocation as [`run`] does (see the [module docs](self)),
    /// with `extra_args` as the plugin's [`Plugin::extra_args`].
    ///
    /// Errors: the codes in the table of the module docs; VERSION has no request and is
    /// refused with code 4.
    pub fn from_env(
        env: impl IntoIterator<Item = (String, String)>,
        stdin: &[u8],
        extra_args: &[&str],
    ) -> Result<Request> {
        let env: HashMap<String, String> = env.into_iter().collect();
        let command = command_from(&env)?;
        if command == Command::Version {
            return Err(Error::InvalidEnv {
                name: "CNI_COMMAND",
                reason: "VERSION is answered by the runner and has no request".into(),
            });
        }
        Request::parse(command, &env, stdin, extra_args)
    }

    fn parse(
        command: Command,
        env: &HashMap<String, String>,
        stdin: &[u8],
        extra_args: &[&str],
    ) -> Result<Request> {
        let mut container_id = String::new();
        let mut netns = None;
        let mut ifname = String::new();
        let mut args = CniArgs::default();
        if command.needs_attachment() {
            container_id = required(env, "CNI_CONTAINERID", command)?.to_owned();
            validate_container_id(&container_id)?;
            netns = match var(env, "CNI_NETNS") {
                Some(path) => Some(PathBuf::from(path)),
                None if command.needs_netns() => {
                    return Err(missing("CNI_NETNS", command));
                }
                None => None,
            };
            ifname = required(env, "CNI_IFNAME", command)?.to_owned();
            validate_ifname(&ifname)?;
            args = CniArgs::parse(var(env, "CNI_ARGS").unwrap_or(""), extra_args)?;
        }
        let cni_path = std::env::split_paths(required(env, "CNI_PATH", command)?)
            .filter(|p| !p.as_os_str().is_empty())
            .collect();

        let value = parse_object(stdin, "network configuration")?;
        let version = version_of(&value)?;
        command.require_version(version)?;
        let mut config = NetConf::from_value(value)?;
        config.validate()?;
        let prev_result = config.prev_result()?;
        if command == Command::Check && prev_result.is_none() {
            return Err(Error::invalid_config(
                "prevResult",
                "CHECK needs the result of ADD in prevResult",
            ));
        }
        if command == Command::Gc {
            // Either key, or both with the same list (libcni 1.2.3 and later): from here on
            // the list is `valid_attachments`.
            let valid = config.gc_attachments()?.ok_or_else(|| {
                Error::invalid_config(
                    VALID_ATTACHMENTS_KEY,
                    "GC needs the list of valid attachments (an empty list if none is valid)",
                )
            })?;
            config.valid_attachments = Some(valid);
        }
        Ok(Request {
            command,
            container_id,
            netns,
            ifname,
            args,
            cni_path,
            config,
            prev_result,
            stdin: stdin.to_vec(),
            version,
        })
    }

    /// The attachment this request is about: `(name, CNI_CONTAINERID, CNI_IFNAME)`.
    pub fn attachment(&self) -> Attachment {
        Attachment::new(&self.config.name, &self.container_id, &self.ifname)
    }

    /// GC: the attachments still valid, as attachments of this network (either key of the
    /// request; [`Request::from_env`] refuses a GC whose two keys disagree).
    pub fn valid_attachments(&self) -> Vec<Attachment> {
        self.config
            .valid_attachments
            .as_ref()
            .or(self.config.legacy_attachments.as_ref())
            .into_iter()
            .flatten()
            .map(|a| Attachment::new(&self.config.name, &a.container_id, &a.ifname))
            .collect()
    }
}

/// A variable, `None` when absent or empty (the reference `skel` treats both alike).
fn var<'a>(env: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    env.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

fn missing(name: &'static str, command: Command) -> Error {
    Error::InvalidEnv {
        name,
        reason: format!("required for {command} but missing or empty"),
    }
}

fn required<'a>(
    env: &'a HashMap<String, String>,
    name: &'static str,
    command: Command,
) -> Result<&'a str> {
    var(env, name).ok_or_else(|| missing(name, command))
}

fn command_from(env: &HashMap<String, String>) -> Result<Command> {
    match var(env, "CNI_COMMAND") {
        None => Err(Error::InvalidEnv {
            name: "CNI_COMMAND",
            reason: "missing or empty".into(),
        }),
        Some(c) => c.parse(),
    }
}

/// The version to print an answer in: the stdin's `cniVersion` if cnikit speaks it, else the
/// newest.
fn answer_version(stdin: &[u8]) -> Version {
    parse_object(stdin, "network configuration")
        .ok()
        .and_then(|v| version_of(&v).ok())
        .unwrap_or(Version::LATEST)
}

/// Runs one CNI invocation: validates `env` and `stdin`, calls `plugin`, writes the result
/// (ADD, in the configuration's `cniVersion`), the VERSION answer, or the error object to
/// `stdout`, and returns the process exit code: 0 on success, 1 on error.
///
/// Nothing but that one JSON document is written to `stdout`; logs go through `tracing`.
pub async fn run(
    plugin: &dyn Plugin,
    env: impl IntoIterator<Item = (String, String)>,
    stdin: &[u8],
    stdout: &mut dyn Write,
) -> i32 {
    let env: HashMap<String, String> = env.into_iter().collect();
    let outcome = match command_from(&env) {
        Ok(Command::Version) => {
            let info = VersionInfo::ours(answer_version(stdin));
            return finish(stdout, &info, 0);
        }
        Ok(command) => match Request::parse(command, &env, stdin, plugin.extra_args()) {
            Ok(request) => dispatch(plugin, &request)
                .await
                .map_err(|e| (e, request.version)),
            Err(e) => Err((e, answer_version(stdin))),
        },
        Err(e) => Err((e, answer_version(stdin))),
    };
    match outcome {
        Ok(None) => 0,
        Ok(Some(result)) => finish(stdout, &result, 0),
        Err((error, version)) => {
            tracing::warn!(code = error.code().0, %error, "CNI request failed");
            finish(stdout, &ErrorOutput::from_error(&error, version), 1)
        }
    }
}

/// Calls the plugin; returns the result JSON to print, if any.
async fn dispatch(plugin: &dyn Plugin, request: &Request) -> Result<Option<serde_json::Value>> {
    tracing::info!(
        command = %request.command,
        container_id = %request.container_id,
        ifname = %request.ifname,
        network = %request.config.name,
        version = %request.version,
        "CNI request"
    );
    match request.command {
        Command::Add => {
            let result = plugin.add(request).await?;
            Ok(Some(result.to_json(request.version)))
        }
        Command::Del => plugin.del(request).await.map(|()| None),
        Command::Check => plugin.check(request).await.map(|()| None),
        Command::Gc => {
            let valid = request.valid_attachments();
            plugin.gc(request, &valid).await.map(|()| None)
        }
        Command::Status => plugin.status(request).await.map(|()| None),
        Command::Version => Err(Error::InvalidEnv {
            name: "CNI_COMMAND",
            reason: "VERSION is answered by the runner and has no request".into(),
        }),
    }
}

/// Writes `doc` as one JSON document and returns `code`, or 1 if writing failed.
fn finish<T: Serialize>(stdout: &mut dyn Write, doc: &T, code: i32) -> i32 {
    let written = serde_json::to_writer_pretty(&mut *stdout, doc)
        .map_err(std::io::Error::from)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => code,
        Err(error) => {
            tracing::error!(%error, "cannot write to stdout");
            1
        }
    }
}
