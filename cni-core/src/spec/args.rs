//! The CNI commands and the parsing of `CNI_ARGS` and of the other `CNI_*` variables.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::spec::Version;

/// A CNI command (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Command {
    /// Attach a container to a network.
    Add,
    /// Detach a container from a network.
    Del,
    /// Check that an attachment is as ADD made it (spec 0.4.0 and later).
    Check,
    /// Release whatever belongs to attachments that are no longer valid (spec 1.1.0).
    Gc,
    /// Tell whether the plugin is ready to ADD (spec 1.1.0).
    Status,
    /// Report the spec versions the plugin speaks.
    Version,
}

impl Command {
    /// Every command.
    pub const ALL: [Command; 6] = [
        Command::Add,
        Command::Del,
        Command::Check,
        Command::Gc,
        Command::Status,
        Command::Version,
    ];

    /// The command as written in `CNI_COMMAND`.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Gc => "GC",
            Command::Status => "STATUS",
            Command::Version => "VERSION",
        }
    }

    /// The oldest spec version that has this command.
    pub fn since(self) -> Version {
        match self {
            Command::Add | Command::Del | Command::Version => Version::V0_3_0,
            Command::Check => Version::V0_4_0,
            Command::Gc | Command::Status => Version::V1_1_0,
        }
    }

    /// `Ok` when a configuration of `version` has this command (see [`since`](Self::since)).
    /// Errors: 1.
    pub(crate) fn require_version(self, version: Version) -> Result<()> {
        if version < self.since() {
            return Err(Error::CommandNeedsVersion {
                command: self.as_str(),
                needs: self.since(),
                has: version,
            });
        }
        Ok(())
    }

    /// Whether the spec asks for `CNI_CONTAINERID` and `CNI_IFNAME` (ADD, DEL, CHECK).
    pub fn needs_attachment(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }

    /// Whether the spec asks for `CNI_NETNS` (ADD, CHECK; optional on DEL).
    pub fn needs_netns(self) -> bool {
        matches!(self, Command::Add | Command::Check)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Command {
    type Err = Error;

    /// Parses `CNI_COMMAND`; case-sensitive, as the spec writes the commands. Unknown: code 4.
    fn from_str(s: &str) -> Result<Self> {
        Command::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| Error::InvalidEnv {
                name: "CNI_COMMAND",
                reason: format!(
                    "unknown command {s:?} (expected one of {})",
                    Command::ALL.map(Command::as_str).join(", ")
                ),
            })
    }
}

/// Whether `s` matches `^[a-zA-Z0-9][a-zA-Z0-9_.-]*$`, the spec's rule for container IDs
/// and network names.
pub(crate) fn is_spec_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Checks `CNI_CONTAINERID`: `^[a-zA-Z0-9][a-zA-Z0-9_.-]*$`, as the spec requires.
/// Errors: 4.
pub fn validate_container_id(id: &str) -> Result<()> {
    if is_spec_name(id) {
        return Ok(());
    }
    let reason = if id.is_empty() {
        "is empty"
    } else if !id.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        "must start with a letter or a digit"
    } else {
        "may only contain letters, digits, '_', '.' and '-' (^[a-zA-Z0-9][a-zA-Z0-9_.-]*$)"
    };
    Err(Error::InvalidEnv {
        name: "CNI_CONTAINERID",
        reason: format!("{id:?} {reason}"),
    })
}

/// Longest Linux interface name, in bytes (`IFNAMSIZ` − 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// Checks `CNI_IFNAME` against the Linux interface-name rules: non-empty, at most 15 bytes,
/// not `.` or `..`, no `/`, `:` or whitespace. Errors: 4.
pub fn validate_ifname(name: &str) -> Result<()> {
    let bad = |reason: String| Error::InvalidEnv {
        name: "CNI_IFNAME",
        reason,
    };
    if name.is_empty() {
        return Err(bad("interface name is empty".into()));
    }
    if name.len() > MAX_IFNAME_LEN {
        return Err(bad(format!(
            "interface name {name:?} is {} bytes long, at most {MAX_IFNAME_LEN} are allowed",
            name.len()
        )));
    }
    if name == "." || name == ".." {
        return Err(bad(format!("interface name {name:?} is not allowed")));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(bad(format!(
            "interface name {name:?} contains '/', ':' or whitespace"
        )));
    }
    Ok(())
}

/// The parsed `CNI_ARGS`: `K=V` pairs separated by `;`.
///
/// The Kubernetes keys that kubelet and containerd send are typed; every pair is also kept in
/// [`pairs`](CniArgs::pairs), in order, so that the variable can be passed on unchanged to a
/// delegated plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    /// `IgnoreUnknown=1|true`: unknown keys are accepted.
    pub ignore_unknown: bool,
    /// `K8S_POD_NAMESPACE`.
    pub k8s_pod_namespace: Option<String>,
    /// `K8S_POD_NAME`.
    pub k8s_pod_name: Option<String>,
    /// `K8S_POD_INFRA_CONTAINER_ID`.
    pub k8s_pod_infra_container_id: Option<String>,
    /// `K8S_POD_UID`.
    pub k8s_pod_uid: Option<String>,
    /// Every pair as given, in order (including the typed ones).
    pub pairs: Vec<(String, String)>,
}

impl CniArgs {
    /// The keys every cnikit plugin understands.
    pub const KNOWN: [&'static str; 5] = [
        "IgnoreUnknown",
        "K8S_POD_NAMESPACE",
        "K8S_POD_NAME",
        "K8S_POD_INFRA_CONTAINER_ID",
        "K8S_POD_UID",
    ];

    /// Parses `CNI_ARGS` as the reference `skel` does.
    ///
    /// `extra_known` lists plugin-specific keys that are accepted besides [`CniArgs::KNOWN`].
    /// An empty string has no pairs. A pair without `=`, with an empty key or an empty
    /// segment (`a=b;;c=d`, a trailing `;`) is malformed; a key that is not known is refused
    /// unless `IgnoreUnknown` is `1` or `true` (anywhere in the list). A later duplicate key
    /// wins. Errors: 4.
    pub fn parse(raw: &str, extra_known: &[&str]) -> Result<CniArgs> {
        let bad = |reason: String| Error::InvalidEnv {
            name: "CNI_ARGS",
            reason,
        };
        let mut args = CniArgs::default();
        if raw.is_empty() {
            return Ok(args);
        }
        let mut unknown = Vec::new();
        let mut ignore_unknown = None;
        for pair in raw.split(';') {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(bad(format!("malformed pair {pair:?}: expected KEY=VALUE")));
            };
            if key.is_empty() {
                return Err(bad(format!("malformed pair {pair:?}: empty key")));
            }
            match key {
                "IgnoreUnknown" => {
                    ignore_unknown = Some(parse_bool(value).ok_or_else(|| {
                        bad(format!(
                            "IgnoreUnknown={value:?}: expected 1, 0, true or false"
                        ))
                    })?)
                }
                "K8S_POD_NAMESPACE" => args.k8s_pod_namespace = Some(value.to_owned()),
                "K8S_POD_NAME" => args.k8s_pod_name = Some(value.to_owned()),
                "K8S_POD_INFRA_CONTAINER_ID" => {
                    args.k8s_pod_infra_container_id = Some(value.to_owned())
                }
                "K8S_POD_UID" => args.k8s_pod_uid = Some(value.to_owned()),
                k if extra_known.contains(&k) => {}
                k => unknown.push(k.to_owned()),
            }
            args.pairs.push((key.to_owned(), value.to_owned()));
        }
        args.ignore_unknown = ignore_unknown.unwrap_or(false);
        if !unknown.is_empty() && !args.ignore_unknown {
            return Err(bad(format!(
                "unknown keys {unknown:?} (set IgnoreUnknown=1 to accept them)"
            )));
        }
        Ok(args)
    }

    /// The last value given for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The pairs written back as `CNI_ARGS` (`K=V;K=V`), exactly as they were parsed.
    pub fn to_env_value(&self) -> String {
        self.pairs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    }
}

/// Go's `UnmarshallableBool`: `1`/`true` and `0`/`false`, case-insensitive.
fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubernetes_args() {
        let raw = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
                   K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=u-1;Other=x=y";
        let args = CniArgs::parse(raw, &[]).unwrap();
        assert!(args.ignore_unknown);
        assert_eq!(args.k8s_pod_namespace.as_deref(), Some("default"));
        assert_eq!(args.k8s_pod_name.as_deref(), Some("web-0"));
        assert_eq!(args.k8s_pod_infra_container_id.as_deref(), Some("abc123"));
        assert_eq!(args.k8s_pod_uid.as_deref(), Some("u-1"));
        assert_eq!(args.get("Other"), Some("x=y"));
        assert_eq!(args.to_env_value(), raw);
    }

    #[test]
    fn unknown_keys_need_ignore_unknown() {
        assert!(CniArgs::parse("FOO=1", &[]).is_err());
        assert!(CniArgs::parse("FOO=1;IgnoreUnknown=true", &[]).is_ok());
        assert!(CniArgs::parse("FOO=1;IgnoreUnknown=0", &[]).is_err());
        assert!(CniArgs::parse("FOO=1", &["FOO"]).is_ok());
        let e = CniArgs::parse("IgnoreUnknown=maybe", &[]).unwrap_err();
        assert_eq!(e.code().0, 4);
    }

    #[test]
    fn malformed_pairs_are_refused() {
        for raw in [
            "K8S_POD_NAME",
            "=x",
            "K8S_POD_NAME=a;",
            ";K8S_POD_NAME=a",
            "a=b;;c=d",
        ] {
            let e = CniArgs::parse(raw, &["a", "c"]).unwrap_err();
            assert_eq!(e.code().0, 4, "{raw}");
        }
    }

    #[test]
    fn container_ids_and_ifnames() {
        for ok in ["a", "0abc", "abc_def.1-2"] {
            validate_container_id(ok).unwrap();
        }
        for bad in ["", "-a", "_a", ".a", "a b", "a/b", "ä"] {
            assert!(validate_container_id(bad).is_err(), "{bad}");
        }
        for ok in ["eth0", "a", "net1.100", "x23456789012345"] {
            validate_ifname(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "x234567890123456",
        ] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn commands_round_trip() {
        for c in Command::ALL {
            assert_eq!(c.as_str().parse::<Command>().unwrap(), c);
        }
        assert_eq!("add".parse::<Command>().unwrap_err().code().0, 4);
    }
}
