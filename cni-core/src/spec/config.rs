//! Network configurations: what a plugin reads on stdin ([`NetConf`]) and what a runtime
//! reads from `/etc/cni/net.d` ([`ConfList`]).
//!
//! Decoding follows one rule for error codes: input that is not JSON, or whose standard keys
//! have the wrong JSON type, is a decoding failure (6); JSON that decodes but asks for
//! something invalid (a missing `name` or `type`, a bad network name, plugin keys the plugin
//! refuses) is an invalid configuration (7); a `cniVersion` this crate does not speak is an
//! incompatible version (1). Every message names the key path (`ipam.ranges[0][0].subnet`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::spec::args::is_spec_name;
use crate::spec::{CniResult, Dns, Version};

/// The key under which a GC request lists the attachments that are still valid.
pub const VALID_ATTACHMENTS_KEY: &str = "cni.dev/valid-attachments";
/// The key the text of spec 1.1.0 first named instead of [`VALID_ATTACHMENTS_KEY`]. libcni
/// 1.2.3 and later send both keys with the same list; see [`NetConf::gc_attachments`].
pub const LEGACY_ATTACHMENTS_KEY: &str = "cni.dev/attachments";

/// How a configuration without `cniVersion` is reported: libcni takes it as 0.1.0.
const IMPLIED_VERSION: &str = "none (0.1.0 implied)";

/// The network configuration a plugin receives on stdin.
///
/// Every key is kept: the standard ones in typed fields, the plugin's own keys in
/// [`plugin`](NetConf::plugin) (decode them with [`NetConf::plugin_config`]). Serializing a
/// `NetConf` gives back an equivalent JSON object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// `cniVersion` as written, so that an unknown version can be reported as such (code 1)
    /// instead of as a decoding failure. Empty when absent. See [`NetConf::version`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cni_version: String,
    /// Network name (absent in the plugin entries of a configuration list).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The plugin (binary) name.
    #[serde(default, rename = "type")]
    pub plugin_type: String,
    /// Capabilities the plugin declares in a configuration list (`portMappings: true`…).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub capabilities: BTreeMap<String, bool>,
    /// IPAM section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<IpamConf>,
    /// DNS settings the plugin should return.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    /// The previous plugin's result, raw: see [`NetConf::prev_result`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_result: Option<Value>,
    /// Capability arguments the runtime injected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_config: Option<RuntimeConfig>,
    /// The `args` convention (`args.cni.ips`…), raw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// GC: the attachments that are still valid, under [`VALID_ATTACHMENTS_KEY`]. `None`
    /// when the key is absent; JSON `null` reads as an empty list. Read the list a GC
    /// request carries with [`NetConf::gc_attachments`], which also looks at
    /// [`legacy_attachments`](NetConf::legacy_attachments).
    #[serde(
        default,
        rename = "cni.dev/valid-attachments",
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Option::is_none"
    )]
    pub valid_attachments: Option<Vec<GcAttachment>>,
    /// GC: the same list under [`LEGACY_ATTACHMENTS_KEY`]; libcni 1.2.3 and later set it
    /// next to [`VALID_ATTACHMENTS_KEY`]. Kept apart, so that a request carrying both keys
    /// decodes and serializes back with both.
    #[serde(
        default,
        rename = "cni.dev/attachments",
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Option::is_none"
    )]
    pub legacy_attachments: Option<Vec<GcAttachment>>,
    /// Every other key: the plugin's own configuration.
    #[serde(flatten)]
    pub plugin: Map<String, Value>,
}

/// The `ipam` section: its `type` and every other key as given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IpamConf {
    /// The IPAM plugin (or built-in IPAM) name; empty when absent.
    #[serde(default, rename = "type")]
    pub ipam_type: String,
    /// Every other key.
    #[serde(flatten)]
    pub config: Map<String, Value>,
}

impl IpamConf {
    /// Decodes the IPAM's own keys (everything but `type`) into `T`.
    /// Errors: 7, naming the key path under `ipam.`.
    pub fn config<T: DeserializeOwned>(&self) -> Result<T> {
        decode_config(&self.config, "ipam.")
    }
}

/// One entry of `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GcAttachment {
    /// `CNI_CONTAINERID` of the attachment.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// `CNI_IFNAME` of the attachment.
    pub ifname: String,
}

/// The `runtimeConfig` object: capability arguments injected by the runtime.
///
/// `portMappings` is typed; every other capability (`bandwidth`, `ips`, `mac`, `dns`,
/// `ipRanges`, `aliases`, `cgroupPath`, `deviceID`, …) is kept as JSON in
/// [`other`](RuntimeConfig::other).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    /// `portMappings`.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub port_mappings: Vec<PortMapping>,
    /// Every other capability argument.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl RuntimeConfig {
    /// A capability argument other than `portMappings`.
    pub fn get(&self, capability: &str) -> Option<&Value> {
        self.other.get(capability)
    }
}

/// A host port forwarded to a container port (`portMappings` capability).
///
/// Reads both the camelCase keys of the CNI conventions (`hostPort`) and the capitalised keys
/// containerd sends (`HostPort`). A mapping may carry both spellings of a key when they
/// agree; when they disagree it does not decode (code 6, naming both keys). An empty
/// `hostIP` means "every address".
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "WirePortMapping")]
pub struct PortMapping {
    /// Port on the host.
    pub host_port: u16,
    /// Port in the container.
    pub container_port: u16,
    /// Transport protocol; `tcp` when absent.
    pub protocol: Protocol,
    /// Host address to bind, if any.
    #[serde(rename = "hostIP", skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
}

/// A port mapping as runtimes write it: every key in both spellings, each optional, so that
/// a mapping carrying both decodes (serde's `alias` refuses that as a duplicate field).
#[derive(Deserialize)]
struct WirePortMapping {
    #[serde(rename = "hostPort")]
    host_port: Option<u16>,
    #[serde(rename = "HostPort")]
    host_port_capitalised: Option<u16>,
    #[serde(rename = "containerPort")]
    container_port: Option<u16>,
    #[serde(rename = "ContainerPort")]
    container_port_capitalised: Option<u16>,
    #[serde(rename = "protocol")]
    protocol: Option<Protocol>,
    #[serde(rename = "Protocol")]
    protocol_capitalised: Option<Protocol>,
    #[serde(rename = "hostIP", default, deserialize_with = "present_ip")]
    host_ip: Option<Option<IpAddr>>,
    #[serde(rename = "HostIP", default, deserialize_with = "present_ip")]
    host_ip_capitalised: Option<Option<IpAddr>>,
}

/// The value of a key a port mapping may spell two ways: either spelling, or both when they
/// agree.
fn either_spelling<T: PartialEq + std::fmt::Debug>(
    (key, value): (&str, Option<T>),
    (other_key, other): (&str, Option<T>),
) -> std::result::Result<Option<T>, String> {
    match (value, other) {
        (Some(a), Some(b)) if a != b => Err(format!(
            "{key} {a:?} and {other_key} {b:?} disagree (both spellings may be given only \
             with the same value)"
        )),
        (a, b) => Ok(a.or(b)),
    }
}

impl TryFrom<WirePortMapping> for PortMapping {
    type Error = String;

    fn try_from(wire: WirePortMapping) -> std::result::Result<Self, String> {
        let port = |key: &str, a, other: &str, b| {
            either_spelling((key, a), (other, b))?.ok_or_else(|| format!("missing field `{key}`"))
        };
        Ok(PortMapping {
            host_port: port(
                "hostPort",
                wire.host_port,
                "HostPort",
                wire.host_port_capitalised,
            )?,
            container_port: port(
                "containerPort",
                wire.container_port,
                "ContainerPort",
                wire.container_port_capitalised,
            )?,
            protocol: either_spelling(
                ("protocol", wire.protocol),
                ("Protocol", wire.protocol_capitalised),
            )?
            .unwrap_or_default(),
            host_ip: either_spelling(
                ("hostIP", wire.host_ip),
                ("HostIP", wire.host_ip_capitalised),
            )?
            .flatten(),
        })
    }
}

/// A port mapping's protocol, read case-insensitively.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.to_ascii_lowercase().as_str() {
            "tcp" | "" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "sctp" => Ok(Protocol::Sctp),
            _ => Err(serde::de::Error::custom(format!(
                "unknown protocol {s:?} (expected tcp, udp or sctp)"
            ))),
        }
    }
}

fn null_as_empty<'de, D, T>(d: D) -> std::result::Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Some(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default()))
}

fn null_as_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A present `hostIP`: `Some(None)` for `null` or `""` (every address), `Some(Some(ip))`
/// for an address. An absent key is `None` through `#[serde(default)]`.
fn present_ip<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Option<IpAddr>>, D::Error> {
    match Option::<String>::deserialize(d)?.as_deref() {
        None | Some("") => Ok(Some(None)),
        Some(s) => s
            .parse()
            .map(|ip| Some(Some(ip)))
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not an IP address"))),
    }
}

/// Reads a JSON object (a configuration), mapping empty input, syntax errors and other JSON
/// values to code 6.
pub(crate) fn parse_object(bytes: &[u8], what: &'static str) -> Result<Value> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::Decode {
            what,
            source: serde::de::Error::custom("input is empty"),
        });
    }
    let value: Value =
        serde_json::from_slice(bytes).map_err(|source| Error::Decode { what, source })?;
    if !value.is_object() {
        return Err(not_an_object(what));
    }
    Ok(value)
}

fn not_an_object(what: &'static str) -> Error {
    Error::Decode {
        what,
        source: serde::de::Error::custom("expected a JSON object"),
    }
}

/// Decodes `value` into `T`, mapping errors to code 6 with the key path in the message.
pub(crate) fn decode_value<T: DeserializeOwned>(value: Value, what: &'static str) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| Error::Decode {
        what,
        source: with_path(e),
    })
}

/// serde's words for what it expected, in the words of a JSON configuration: the Rust types
/// it names (`u32`, `struct IpamConf`) mean nothing to whoever wrote the JSON.
fn in_json_words(message: &str) -> String {
    const INTEGERS: [(&str, &str); 8] = [
        ("u8", "0 to 255"),
        ("u16", "0 to 65535"),
        ("u32", "0 to 4294967295"),
        ("u64", "0 to 18446744073709551615"),
        ("i8", "-128 to 127"),
        ("i16", "-32768 to 32767"),
        ("i32", "-2147483648 to 2147483647"),
        ("i64", "-9223372036854775808 to 9223372036854775807"),
    ];
    let Some((head, expected)) = message.rsplit_once(", expected ") else {
        return message.to_owned();
    };
    let words = if let Some((_, range)) = INTEGERS.iter().find(|(ty, _)| *ty == expected) {
        format!("a whole number from {range}")
    } else if expected.starts_with("struct ") || expected.starts_with("a map") {
        "a JSON object".to_owned()
    } else if expected == "a sequence" {
        "a JSON array".to_owned()
    } else if expected == "f32" || expected == "f64" {
        "a number".to_owned()
    } else {
        return message.to_owned();
    };
    format!("{head}, expected {words}")
}

/// Decodes a plugin's own keys into `T`, mapping errors to code 7 with the key path.
fn decode_config<T: DeserializeOwned>(keys: &Map<String, Value>, prefix: &str) -> Result<T> {
    serde_path_to_error::deserialize(keys).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            prefix.trim_end_matches('.').to_owned()
        } else {
            format!("{prefix}{path}")
        };
        Error::InvalidConfig {
            field: if field.is_empty() {
                "(plugin keys)".into()
            } else {
                field
            },
            reason: in_json_words(&e.into_inner().to_string()),
        }
    })
}

/// Folds the path of a `serde_path_to_error` failure into the error's message.
pub(crate) fn with_path(e: serde_path_to_error::Error<serde_json::Error>) -> serde_json::Error {
    let path = e.path().to_string();
    let inner = in_json_words(&e.into_inner().to_string());
    if path == "." {
        serde::de::Error::custom(inner)
    } else {
        serde::de::Error::custom(format!("{path}: {inner}"))
    }
}

/// The `cniVersion` of a configuration object, parsed. Absent means `0.1.0` (libcni's rule).
/// Errors: 6 when it is not a string, 1 when it is not a version this crate speaks.
pub(crate) fn version_of(value: &Value) -> Result<Version> {
    match value.get("cniVersion") {
        None | Some(Value::Null) => Err(Error::IncompatibleVersion {
            requested: IMPLIED_VERSION.into(),
        }),
        Some(Value::String(s)) => s.parse().map_err(|_| Error::IncompatibleVersion {
            requested: s.clone(),
        }),
        Some(other) => Err(Error::Decode {
            what: "network configuration",
            source: serde::de::Error::custom(format!(
                "cniVersion: expected a string, found {other}"
            )),
        }),
    }
}

/// Checks a network name (`name`, code 7): `^[a-zA-Z0-9][a-zA-Z0-9_.-]*$`, as the spec
/// requires.
pub fn validate_network_name(name: &str) -> Result<()> {
    validate_name("name", name)
}

/// Checks a network name: `^[a-zA-Z0-9][a-zA-Z0-9_.-]*$`, as the spec requires.
fn validate_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid_config(field, "missing network name"));
    }
    if is_spec_name(name) {
        Ok(())
    } else {
        Err(Error::invalid_config(
            field,
            format!("network name {name:?} must match ^[a-zA-Z0-9][a-zA-Z0-9_.-]*$"),
        ))
    }
}

/// Whether `name` can name a plugin executable in `CNI_PATH`: non-empty, no path separator
/// or NUL, not `.` or `..`.
pub(crate) fn is_plugin_name(name: &str) -> bool {
    !(name.is_empty() || name.contains(['/', '\0']) || name == "." || name == "..")
}

/// Checks a plugin name (see [`is_plugin_name`]). Errors: 7.
pub(crate) fn validate_plugin_type(field: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid_config(field, "missing plugin type"));
    }
    if !is_plugin_name(name) {
        return Err(Error::invalid_config(
            field,
            format!("{name:?} is not a plugin name"),
        ));
    }
    Ok(())
}

impl NetConf {
    /// Decodes a configuration from stdin bytes. Only the shape is checked here; call
    /// [`version`](NetConf::version) and [`validate`](NetConf::validate) for the rest.
    /// Errors: 6.
    pub fn from_slice(bytes: &[u8]) -> Result<NetConf> {
        NetConf::from_value(parse_object(bytes, "network configuration")?)
    }

    /// Decodes a configuration from a JSON value. Errors: 6.
    pub fn from_value(value: Value) -> Result<NetConf> {
        if !value.is_object() {
            return Err(not_an_object("network configuration"));
        }
        decode_value(value, "network configuration")
    }

    /// The configuration as a JSON object.
    pub fn to_value(&self) -> Value {
        // NetConf serializes only strings, numbers, maps with string keys and values that are
        // already JSON: serde_json cannot fail on it.
        serde_json::to_value(self).unwrap_or_else(|_| Value::Object(Map::new()))
    }

    /// The spec version of the configuration. Absent means `0.1.0`, as libcni decides.
    /// Errors: 1 when it is not one of [`Version::ALL`].
    pub fn version(&self) -> Result<Version> {
        if self.cni_version.is_empty() {
            return Err(Error::IncompatibleVersion {
                requested: IMPLIED_VERSION.into(),
            });
        }
        self.cni_version
            .parse()
            .map_err(|_| Error::IncompatibleVersion {
                requested: self.cni_version.clone(),
            })
    }

    /// Checks what a plugin needs of every configuration: a valid `name`
    /// (`^[a-zA-Z0-9][a-zA-Z0-9_.-]*$`) and a `type`; an `ipam` section, when present, needs
    /// a `type` too. Errors: 7.
    pub fn validate(&self) -> Result<()> {
        validate_name("name", &self.name)?;
        validate_plugin_type("type", &self.plugin_type)?;
        if let Some(ipam) = &self.ipam {
            validate_plugin_type("ipam.type", &ipam.ipam_type)?;
        }
        Ok(())
    }

    /// The previous result, read from any spec version. `None` when absent or `null`.
    /// Errors: 6 when it is not a CNI result.
    pub fn prev_result(&self) -> Result<Option<CniResult>> {
        self.prev_result
            .as_ref()
            .map(|v| {
                CniResult::from_json(v).map_err(|e| match e {
                    Error::Decode { source, .. } => Error::Decode {
                        what: "prevResult",
                        source,
                    },
                    other => other,
                })
            })
            .transpose()
    }

    /// Decodes the plugin's own keys (everything that is not a standard key) into `T`.
    /// Errors: 7, naming the key path.
    pub fn plugin_config<T: DeserializeOwned>(&self) -> Result<T> {
        decode_config(&self.plugin, "")
    }

    /// The attachments a GC request lists as still valid: [`valid_attachments`]
    /// (`cni.dev/valid-attachments`) or [`legacy_attachments`] (`cni.dev/attachments`),
    /// whichever is present. libcni 1.2.3 and later send both with the same list: the same
    /// attachments, in any order, are that list. `None` when neither key is present.
    ///
    /// Errors: 7 when both keys are present with different lists. A request that
    /// contradicts itself is refused rather than merged: nothing is released on the strength
    /// of a list that another part of the same request contradicts.
    ///
    /// [`valid_attachments`]: NetConf::valid_attachments
    /// [`legacy_attachments`]: NetConf::legacy_attachments
    pub fn gc_attachments(&self) -> Result<Option<Vec<GcAttachment>>> {
        match (&self.valid_attachments, &self.legacy_attachments) {
            (Some(valid), Some(legacy)) => {
                let as_set = |list: &[GcAttachment]| {
                    list.iter()
                        .cloned()
                        .collect::<std::collections::BTreeSet<_>>()
                };
                if as_set(valid) != as_set(legacy) {
                    let show = |list: &[GcAttachment]| {
                        list.iter()
                            .map(|a| format!("{}/{}", a.container_id, a.ifname))
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    return Err(Error::invalid_config(
                        LEGACY_ATTACHMENTS_KEY,
                        format!(
                            "lists [{}] but {VALID_ATTACHMENTS_KEY} lists [{}]: a GC request \
                             may carry both keys only with the same attachments",
                            show(legacy),
                            show(valid)
                        ),
                    ));
                }
                Ok(Some(valid.clone()))
            }
            (Some(list), None) | (None, Some(list)) => Ok(Some(list.clone())),
            (None, None) => Ok(None),
        }
    }

    /// Whether the plugin declares `capability` (`"capabilities": {"portMappings": true}`).
    pub fn has_capability(&self, capability: &str) -> bool {
        self.capabilities.get(capability).copied().unwrap_or(false)
    }
}

/// A network configuration list (`.conflist`), as a runtime reads it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfList {
    /// `cniVersion` as written (empty when absent).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cni_version: String,
    /// `cniVersions` (spec 1.1.0): the runtime picks the newest it supports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cni_versions: Vec<String>,
    /// Network name.
    #[serde(default)]
    pub name: String,
    /// Skip CHECK for this network.
    #[serde(default, deserialize_with = "bool_or_string")]
    pub disable_check: bool,
    /// Skip GC for this network (spec 1.1.0).
    #[serde(default, rename = "disableGC", deserialize_with = "bool_or_string")]
    pub disable_gc: bool,
    /// The plugins, run in order on ADD and in reverse on DEL.
    #[serde(default)]
    pub plugins: Vec<NetConf>,
}

/// libcni reads `disableCheck` and `disableGC` as a boolean or a `"true"`/`"false"` string.
fn bool_or_string<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Flag {
        Bool(bool),
        Str(String),
    }
    match Flag::deserialize(d)? {
        Flag::Bool(b) => Ok(b),
        Flag::Str(s) => match s.to_ascii_lowercase().as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(serde::de::Error::custom(format!(
                "expected true or false, found {s:?}"
            ))),
        },
    }
}

impl ConfList {
    /// Decodes and validates a configuration list.
    /// Errors: 6 when it does not decode, 7 when it has no valid name, no plugins, or a
    /// plugin without a valid `type`.
    pub fn from_slice(bytes: &[u8]) -> Result<ConfList> {
        let value = parse_object(bytes, "network configuration list")?;
        let list: ConfList = decode_value(value, "network configuration list")?;
        list.validate()?;
        Ok(list)
    }

    /// Wraps a single network configuration (`.conf`) into a list of one, as libcni does.
    pub fn from_conf(conf: NetConf) -> ConfList {
        let mut plugin = conf.clone();
        plugin.cni_version.clear();
        plugin.name.clear();
        ConfList {
            cni_version: conf.cni_version,
            cni_versions: Vec::new(),
            name: conf.name,
            disable_check: false,
            disable_gc: false,
            plugins: vec![plugin],
        }
    }

    /// Checks the name and every plugin's `type`. Errors: 7.
    pub fn validate(&self) -> Result<()> {
        validate_name("name", &self.name)?;
        if self.plugins.is_empty() {
            return Err(Error::invalid_config("plugins", "no plugins in the list"));
        }
        for (i, p) in self.plugins.iter().enumerate() {
            validate_plugin_type(&format!("plugins[{i}].type"), &p.plugin_type)?;
        }
        Ok(())
    }

    /// The spec version to run this list with: the newest of `cniVersions` and `cniVersion`
    /// that this crate speaks (versions it does not know, newer or older, are skipped).
    /// Errors: 1 when none is left.
    pub fn negotiate(&self) -> Result<Version> {
        let offered: Vec<&str> = self
            .cni_versions
            .iter()
            .map(String::as_str)
            .chain((!self.cni_version.is_empty()).then_some(self.cni_version.as_str()))
            .collect();
        Version::negotiate(offered.iter().copied()).ok_or_else(|| Error::IncompatibleVersion {
            requested: if offered.is_empty() {
                IMPLIED_VERSION.into()
            } else {
                offered.join(", ")
            },
        })
    }

    /// Builds the configuration the runtime sends to plugin `index`, as libcni does: the
    /// plugin's entry with the list's `name` and the negotiated `cniVersion` injected,
    /// `prevResult` (written in `version`) when given, and `runtimeConfig` holding those
    /// entries of `runtime_config` whose capability the plugin declares (replacing any
    /// `runtimeConfig` of the entry; left as is when none applies).
    /// Errors: 7 when there is no plugin `index`.
    pub fn plugin_config(
        &self,
        index: usize,
        version: Version,
        prev: Option<&CniResult>,
        runtime_config: &Map<String, Value>,
    ) -> Result<Value> {
        let plugin = self.plugins.get(index).ok_or_else(|| {
            Error::invalid_config(
                format!("plugins[{index}]"),
                format!("the list has {} plugins", self.plugins.len()),
            )
        })?;
        let mut conf = match plugin.to_value() {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        conf.insert("name".into(), Value::String(self.name.clone()));
        conf.insert("cniVersion".into(), Value::String(version.to_string()));
        if let Some(prev) = prev {
            conf.insert("prevResult".into(), prev.to_json(version));
        }
        let injected: Map<String, Value> = runtime_config
            .iter()
            .filter(|(capability, _)| plugin.has_capability(capability))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !injected.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(injected));
        }
        Ok(Value::Object(conf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keeps_every_key() {
        let raw = json!({
            "cniVersion": "1.0.0", "name": "n", "type": "bridge", "bridge": "cni0",
            "isGateway": true, "ipam": {"type": "host-local", "subnet": "10.1.0.0/16"},
            "cni.dev/extra": 1
        });
        let conf = NetConf::from_value(raw.clone()).unwrap();
        assert_eq!(conf.plugin["bridge"], "cni0");
        assert_eq!(conf.ipam.as_ref().unwrap().config["subnet"], "10.1.0.0/16");
        assert_eq!(conf.to_value(), raw);
    }

    /// Messages name JSON types, never the Rust types behind them.
    #[test]
    fn decode_errors_speak_json() {
        let e = NetConf::from_value(json!({
            "cniVersion": "1.0.0", "name": "n", "type": "x", "ipam": "cnikit-ipam"
        }))
        .unwrap_err();
        assert_eq!(e.code().0, 6);
        assert!(e.to_string().ends_with("expected a JSON object"), "{e}");
        let e = NetConf::from_value(json!({
            "cniVersion": "1.0.0", "name": "n", "type": "x",
            "runtimeConfig": {"portMappings": ["80:80"]}
        }))
        .unwrap_err();
        assert!(e.to_string().ends_with("expected a JSON object"), "{e}");
        let e = NetConf::from_value(json!({
            "cniVersion": "1.0.0", "name": "n", "type": "x",
            "runtimeConfig": {"portMappings": "80:80"}
        }))
        .unwrap_err();
        assert!(e.to_string().ends_with("expected a JSON array"), "{e}");

        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Own {
            mtu: u32,
            port: u16,
        }
        let conf = |mtu: Value, port: Value| {
            NetConf::from_value(json!({
                "cniVersion": "1.0.0", "name": "n", "type": "x", "mtu": mtu, "port": port
            }))
            .unwrap()
        };
        let e = conf(json!("1500"), json!(1))
            .plugin_config::<Own>()
            .unwrap_err();
        assert!(
            e.to_string().ends_with(
                "mtu: invalid type: string \"1500\", expected a whole number from 0 to 4294967295"
            ),
            "{e}"
        );
        let e = conf(json!(1500), json!(70000))
            .plugin_config::<Own>()
            .unwrap_err();
        assert!(
            e.to_string()
                .ends_with("expected a whole number from 0 to 65535"),
            "{e}"
        );
    }

    #[test]
    fn plugin_config_errors_name_the_key() {
        #[derive(Debug, Deserialize)]
        #[serde(rename_all = "camelCase")]
        #[allow(dead_code)]
        struct Own {
            mtu: u32,
            routes: Vec<Inner>,
        }
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Inner {
            dst: ipnet::IpNet,
        }
        let conf = NetConf::from_value(json!({
            "cniVersion": "1.0.0", "name": "n", "type": "x", "mtu": 1500,
            "routes": [{"dst": "10.0.0.0/8"}, {"dst": "nope"}]
        }))
        .unwrap();
        let e = conf.plugin_config::<Own>().unwrap_err();
        assert_eq!(e.code().0, 7);
        match e {
            Error::InvalidConfig { field, .. } => assert_eq!(field, "routes[1].dst"),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn attachment(container_id: &str) -> GcAttachment {
        GcAttachment {
            container_id: container_id.into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn attachments_under_either_key() {
        for key in [VALID_ATTACHMENTS_KEY, LEGACY_ATTACHMENTS_KEY] {
            let conf = NetConf::from_value(json!({
                "cniVersion": "1.1.0", "name": "n", "type": "x",
                key: [{"containerID": "c1", "ifname": "eth0"}]
            }))
            .unwrap();
            assert_eq!(conf.gc_attachments().unwrap(), Some(vec![attachment("c1")]));
        }
        let null = NetConf::from_value(json!({
            "cniVersion": "1.1.0", "name": "n", "type": "x", VALID_ATTACHMENTS_KEY: null
        }))
        .unwrap();
        assert_eq!(null.gc_attachments().unwrap(), Some(vec![]));
        let none = NetConf::from_value(json!({"cniVersion": "1.1.0", "name": "n", "type": "x"}));
        assert_eq!(none.unwrap().gc_attachments().unwrap(), None);
    }

    /// libcni 1.2.3 and later set both keys with the same list: it decodes, reads as that
    /// list (in either order), and serializes back with both keys.
    #[test]
    fn attachments_under_both_keys() {
        let list = json!([
            {"containerID": "c1", "ifname": "eth0"},
            {"containerID": "c2", "ifname": "eth0"}
        ]);
        let reversed = json!([
            {"containerID": "c2", "ifname": "eth0"},
            {"containerID": "c1", "ifname": "eth0"}
        ]);
        for legacy in [&list, &reversed] {
            let raw = json!({
                "cniVersion": "1.1.0", "name": "n", "type": "x",
                LEGACY_ATTACHMENTS_KEY: legacy, VALID_ATTACHMENTS_KEY: list
            });
            let conf = NetConf::from_value(raw.clone()).unwrap();
            assert_eq!(
                conf.gc_attachments().unwrap(),
                Some(vec![attachment("c1"), attachment("c2")])
            );
            assert_eq!(conf.to_value(), raw);
        }
    }

    #[test]
    fn attachments_that_disagree_are_code_7() {
        let conf = NetConf::from_value(json!({
            "cniVersion": "1.1.0", "name": "n", "type": "x",
            LEGACY_ATTACHMENTS_KEY: [{"containerID": "c1", "ifname": "eth0"}],
            VALID_ATTACHMENTS_KEY: [{"containerID": "c2", "ifname": "eth0"}]
        }))
        .unwrap();
        let e = conf.gc_attachments().unwrap_err();
        assert_eq!(e.code().0, 7);
        let text = e.to_string();
        assert!(
            text.contains(LEGACY_ATTACHMENTS_KEY) && text.contains(VALID_ATTACHMENTS_KEY),
            "{text}"
        );
        assert!(
            text.contains("c1/eth0") && text.contains("c2/eth0"),
            "{text}"
        );
    }

    /// Every key of a port mapping may come in both spellings when the values agree.
    #[test]
    fn port_mappings_with_both_spellings() {
        let conf = NetConf::from_value(json!({
            "cniVersion": "1.0.0", "name": "n", "type": "portmap",
            "runtimeConfig": {"portMappings": [{
                "hostPort": 8080, "HostPort": 8080,
                "containerPort": 80, "ContainerPort": 80,
                "protocol": "udp", "Protocol": "UDP",
                "hostIP": "192.0.2.1", "HostIP": "192.0.2.1"
            }, {"HostPort": 53, "ContainerPort": 53, "HostIP": ""}]}
        }))
        .unwrap();
        let mappings = conf.runtime_config.unwrap().port_mappings;
        assert_eq!(
            mappings,
            [
                PortMapping {
                    host_port: 8080,
                    container_port: 80,
                    protocol: Protocol::Udp,
                    host_ip: Some("192.0.2.1".parse().unwrap()),
                },
                PortMapping {
                    host_port: 53,
                    container_port: 53,
                    protocol: Protocol::Tcp,
                    host_ip: None,
                }
            ]
        );
    }

    #[test]
    fn port_mappings_whose_spellings_disagree_name_both_keys() {
        for (mapping, keys) in [
            (
                json!({"hostPort": 80, "HostPort": 81, "containerPort": 80}),
                ["hostPort", "HostPort"],
            ),
            (
                json!({"hostPort": 80, "containerPort": 80, "ContainerPort": 8080}),
                ["containerPort", "ContainerPort"],
            ),
            (
                json!({"hostPort": 80, "containerPort": 80, "protocol": "tcp", "Protocol": "udp"}),
                ["protocol", "Protocol"],
            ),
            (
                json!({"hostPort": 80, "containerPort": 80, "hostIP": "", "HostIP": "192.0.2.1"}),
                ["hostIP", "HostIP"],
            ),
        ] {
            let e = NetConf::from_value(json!({
                "cniVersion": "1.0.0", "name": "n", "type": "portmap",
                "runtimeConfig": {"portMappings": [mapping]}
            }))
            .unwrap_err();
            assert_eq!(e.code().0, 6);
            let text = e.to_string();
            assert!(text.contains("runtimeConfig.portMappings[0]"), "{text}");
            assert!(keys.iter().all(|k| text.contains(k)), "{text}");
        }
        let e = NetConf::from_value(json!({
            "cniVersion": "1.0.0", "name": "n", "type": "portmap",
            "runtimeConfig": {"portMappings": [{"containerPort": 80}]}
        }))
        .unwrap_err();
        assert!(e.to_string().contains("missing field `hostPort`"), "{e}");
    }

    #[test]
    fn negotiation_picks_newest_known() {
        let list: ConfList = serde_json::from_value(json!({
            "cniVersion": "0.4.0", "cniVersions": ["1.0.0", "1.1.0", "1.2.0"],
            "name": "n", "plugins": [{"type": "x"}]
        }))
        .unwrap();
        assert_eq!(list.negotiate().unwrap(), Version::V1_1_0);
        let old: ConfList = serde_json::from_value(json!({
            "cniVersion": "0.2.0", "name": "n", "plugins": [{"type": "x"}]
        }))
        .unwrap();
        assert_eq!(old.negotiate().unwrap_err().code().0, 1);
    }
}
