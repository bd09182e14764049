//! CNI specification versions and version negotiation.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A CNI specification version this crate speaks.
///
/// Only released spec versions exist here: there is no 1.2.0 or later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    /// Spec 0.3.0: rich results, chaining.
    V0_3_0,
    /// Spec 0.3.1: typo fixes only.
    V0_3_1,
    /// Spec 0.4.0: CHECK, `prevResult` on DEL.
    V0_4_0,
    /// Spec 1.0.0: `ips[].version` gone, `interface` index kept.
    V1_0_0,
    /// Spec 1.1.0: GC, STATUS, `cniVersions`, route and interface fields.
    V1_1_0,
}

impl Version {
    /// Every version, oldest first: what VERSION advertises.
    pub const ALL: [Version; 5] = [
        Version::V0_3_0,
        Version::V0_3_1,
        Version::V0_4_0,
        Version::V1_0_0,
        Version::V1_1_0,
    ];

    /// The newest version.
    pub const LATEST: Version = Version::V1_1_0;

    /// The version as written in JSON, for example `"1.0.0"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V0_3_0 => "0.3.0",
            Version::V0_3_1 => "0.3.1",
            Version::V0_4_0 => "0.4.0",
            Version::V1_0_0 => "1.0.0",
            Version::V1_1_0 => "1.1.0",
        }
    }

    /// Whether results in this version carry `ips[].version` (before 1.0.0).
    pub fn has_ip_version_field(self) -> bool {
        self < Version::V1_0_0
    }

    /// Whether this version knows the CHECK command (0.4.0 and later).
    pub fn supports_check(self) -> bool {
        self >= Version::V0_4_0
    }

    /// Whether this version knows the GC and STATUS commands (1.1.0 and later).
    pub fn supports_gc_status(self) -> bool {
        self >= Version::V1_1_0
    }

    /// Picks the newest version of `offered` that this crate supports, as a runtime does with a
    /// configuration list's `cniVersions`.
    pub fn negotiate<'a>(offered: impl IntoIterator<Item = &'a str>) -> Option<Version> {
        offered.into_iter().filter_map(|v| v.parse().ok()).max()
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A version string that is not one of [`Version::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported CNI version {0:?}")]
pub struct UnknownVersion(pub String);

impl FromStr for Version {
    type Err = UnknownVersion;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Version::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnknownVersion(s.to_owned()))
    }
}

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_and_rejects_unreleased() {
        assert_eq!("0.4.0".parse::<Version>(), Ok(Version::V0_4_0));
        assert!("1.2.0".parse::<Version>().is_err());
        assert!("0.2.0".parse::<Version>().is_err());
    }

    #[test]
    fn negotiates_newest_known() {
        assert_eq!(
            Version::negotiate(["1.0.0", "1.1.0", "1.3.0"]),
            Some(Version::V1_1_0)
        );
        assert_eq!(Version::negotiate(["9.9.9"]), None);
    }
}
