//! The CNI result: what ADD prints and what chained plugins receive as `prevResult`.
//!
//! [`CniResult`] holds the newest (1.1.0) shape; older versions are produced and read by
//! [`CniResult::to_json`] and [`CniResult::from_json`].

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::spec::Version;
use crate::spec::config::with_path;

/// A link-layer (hardware) address, written `aa:bb:cc:dd:ee:ff` in CNI JSON.
///
/// Usually 6 bytes (Ethernet); other lengths (InfiniBand: 20) are accepted so that any
/// plugin's `prevResult` can be read.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct HwAddr(Vec<u8>);

impl HwAddr {
    /// Wraps raw bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        HwAddr(bytes.into())
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<[u8; 6]> for HwAddr {
    fn from(b: [u8; 6]) -> Self {
        HwAddr(b.to_vec())
    }
}

impl fmt::Display for HwAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for HwAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HwAddr({self})")
    }
}

/// A string that is not a colon-separated hexadecimal hardware address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid hardware address {0:?}")]
pub struct InvalidHwAddr(pub String);

impl FromStr for HwAddr {
    type Err = InvalidHwAddr;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidHwAddr(s.to_owned());
        let bytes = s
            .split(':')
            .map(|p| {
                if p.len() == 2 {
                    u8::from_str_radix(p, 16).map_err(|_| bad())
                } else {
                    Err(bad())
                }
            })
            .collect::<Result<Vec<u8>, _>>()?;
        if bytes.len() < 6 || bytes.len() > 20 {
            return Err(bad());
        }
        Ok(HwAddr(bytes))
    }
}

impl Serialize for HwAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HwAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An interface created or used by a plugin (`interfaces[]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    /// Interface name (in the sandbox for container interfaces).
    pub name: String,
    /// Hardware address, where L2 addresses are meaningful.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<HwAddr>,
    /// MTU (spec 1.1.0 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Netns path of a container interface; absent for host interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// Socket path of a vhost-user style interface (spec 1.1.0 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<String>,
    /// PCI address of a device interface (spec 1.1.0 and later).
    #[serde(default, rename = "pciID", skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

/// One assigned address (`ips[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpConfig {
    /// Address with its prefix length, for example `10.244.0.5/26`.
    #[serde(deserialize_with = "crate::spec::cidr::deserialize")]
    pub address: IpNet,
    /// Gateway of the subnet, if there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces[]` of the interface holding the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// One route (`routes[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Destination.
    #[serde(deserialize_with = "crate::spec::cidr::deserialize")]
    pub dst: IpNet,
    /// Next hop; absent means the plugin's default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// Route MTU (spec 1.1.0 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Advertised MSS (spec 1.1.0 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    /// Priority / metric (spec 1.1.0 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// Routing table (spec 1.1.0 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    /// Route scope (spec 1.1.0 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u8>,
}

impl Route {
    /// A plain route `dst via gw`.
    pub fn new(dst: IpNet, gw: Option<IpAddr>) -> Self {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

/// DNS settings (`dns`), in results and in network configurations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    /// Name servers, in priority order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// Local domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Search domains, in priority order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// Resolver options.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    /// Whether no field is set (then `dns` is left out of JSON).
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

/// A CNI result in its newest shape, independent of the version it is written in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    /// Interfaces (omitted by IPAM plugins).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    /// Addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    /// Routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// DNS settings.
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

impl Interface {
    /// The interface as written in a result of `version`.
    fn to_json(&self, version: Version) -> Value {
        let mut o = Map::new();
        o.insert("name".into(), self.name.clone().into());
        if let Some(mac) = &self.mac {
            o.insert("mac".into(), mac.to_string().into());
        }
        if let Some(sandbox) = &self.sandbox {
            o.insert("sandbox".into(), sandbox.clone().into());
        }
        if version >= Version::V1_1_0 {
            if let Some(mtu) = self.mtu {
                o.insert("mtu".into(), mtu.into());
            }
            if let Some(path) = &self.socket_path {
                o.insert("socketPath".into(), path.clone().into());
            }
            if let Some(pci) = &self.pci_id {
                o.insert("pciID".into(), pci.clone().into());
            }
        }
        Value::Object(o)
    }
}

impl IpConfig {
    /// The address as written in a result of `version`.
    fn to_json(&self, version: Version) -> Value {
        let mut o = Map::new();
        if version.has_ip_version_field() {
            let family = if self.address.addr().is_ipv4() {
                "4"
            } else {
                "6"
            };
            o.insert("version".into(), family.into());
        }
        if let Some(index) = self.interface {
            o.insert("interface".into(), index.into());
        }
        o.insert("address".into(), self.address.to_string().into());
        if let Some(gw) = self.gateway {
            o.insert("gateway".into(), gw.to_string().into());
        }
        Value::Object(o)
    }
}

impl Route {
    /// The route as written in a result of `version`.
    fn to_json(&self, version: Version) -> Value {
        let mut o = Map::new();
        o.insert("dst".into(), self.dst.to_string().into());
        if let Some(gw) = self.gw {
            o.insert("gw".into(), gw.to_string().into());
        }
        if version >= Version::V1_1_0 {
            let extra = [
                ("mtu", self.mtu),
                ("advmss", self.advmss),
                ("priority", self.priority),
                ("table", self.table),
                ("scope", self.scope.map(u32::from)),
            ];
            for (key, value) in extra {
                if let Some(v) = value {
                    o.insert(key.into(), v.into());
                }
            }
        }
        Value::Object(o)
    }
}

impl Dns {
    fn to_json(&self) -> Value {
        let mut o = Map::new();
        let lists = [
            ("nameservers", &self.nameservers),
            ("search", &self.search),
            ("options", &self.options),
        ];
        for (key, list) in lists {
            if !list.is_empty() {
                o.insert(key.into(), list.clone().into());
            }
        }
        if let Some(domain) = &self.domain {
            o.insert("domain".into(), domain.clone().into());
        }
        Value::Object(o)
    }
}

/// A result of spec 0.1.0 / 0.2.0: one `ip4` and one `ip6` section.
#[derive(Deserialize)]
struct LegacyResult {
    #[serde(default)]
    ip4: Option<LegacyIp>,
    #[serde(default)]
    ip6: Option<LegacyIp>,
    #[serde(default)]
    dns: Option<Dns>,
}

#[derive(Deserialize)]
struct LegacyIp {
    #[serde(deserialize_with = "crate::spec::cidr::deserialize")]
    ip: IpNet,
    #[serde(default)]
    gateway: Option<IpAddr>,
    #[serde(default)]
    routes: Vec<Route>,
}

impl CniResult {
    /// The result as printed for a configuration of `version`: with `cniVersion`, with
    /// `ips[].version` (`"4"`/`"6"`) before 1.0.0, and without the fields 1.1.0 added
    /// (interface `mtu`, `socketPath`, `pciID`; route `mtu`, `advmss`, `priority`, `table`,
    /// `scope`) before 1.1.0. Interface indexes are kept in every version. `dns` is always
    /// present, as the reference plugins print it.
    pub fn to_json(&self, version: Version) -> Value {
        let mut o = Map::new();
        o.insert("cniVersion".into(), version.as_str().into());
        if !self.interfaces.is_empty() {
            let list = self.interfaces.iter().map(|i| i.to_json(version));
            o.insert("interfaces".into(), Value::Array(list.collect()));
        }
        if !self.ips.is_empty() {
            let list = self.ips.iter().map(|i| i.to_json(version));
            o.insert("ips".into(), Value::Array(list.collect()));
        }
        if !self.routes.is_empty() {
            let list = self.routes.iter().map(|r| r.to_json(version));
            o.insert("routes".into(), Value::Array(list.collect()));
        }
        o.insert("dns".into(), self.dns.to_json());
        Value::Object(o)
    }

    /// Reads a result of any spec version (0.1.0 … 1.1.0): a `prevResult`, or what a
    /// delegated plugin printed. `cniVersion` and `ips[].version` are not needed and not
    /// checked; unknown keys are ignored. Errors: 6, naming the key path.
    pub fn from_json(value: &Value) -> crate::Result<CniResult> {
        let decode = |e| crate::Error::Decode {
            what: "CNI result",
            source: with_path(e),
        };
        let Some(object) = value.as_object() else {
            return Err(crate::Error::Decode {
                what: "CNI result",
                source: serde::de::Error::custom(format!("expected a JSON object, found {value}")),
            });
        };
        let legacy = !object.contains_key("ips")
            && !object.contains_key("interfaces")
            && (object.contains_key("ip4") || object.contains_key("ip6"));
        if legacy {
            let old: LegacyResult = serde_path_to_error::deserialize(value).map_err(decode)?;
            let mut result = CniResult {
                dns: old.dns.unwrap_or_default(),
                ..CniResult::default()
            };
            for ip in [old.ip4, old.ip6].into_iter().flatten() {
                result.ips.push(IpConfig {
                    address: ip.ip,
                    gateway: ip.gateway,
                    interface: None,
                });
                result.routes.extend(ip.routes);
            }
            return Ok(result);
        }
        // Some writers print absent sections and fields as `null` or `""` (Go without
        // `omitempty`); both mean "absent".
        let mut object = object.clone();
        object.retain(|_, v| !v.is_null());
        for list in ["interfaces", "ips", "routes"] {
            if let Some(Value::Array(entries)) = object.get_mut(list) {
                for entry in entries.iter_mut().filter_map(Value::as_object_mut) {
                    entry.retain(|_, v| !(v.is_null() || v.as_str() == Some("")));
                }
            }
        }
        serde_path_to_error::deserialize(Value::Object(object)).map_err(decode)
    }
}
