//! The backend's configuration.

use cni_core::linux::{link, veth};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default device name.
pub const DEFAULT_DEVICE: &str = "cnikit.ipip";

/// The name of the ipip module's fallback device, which cnikit does not use (see the
/// [crate docs](crate#the-device)).
pub const FALLBACK_DEVICE: &str = "tunl0";

/// Which peers go through the tunnel (Calico's `ipipMode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    /// `always`: every peer, on the same subnet or not.
    #[default]
    #[serde(alias = "Always")]
    Always,
    /// `crossSubnet`: only peers outside the node's underlay subnet; the others get plain
    /// host-gw routes (`BLOCK via PEER dev UNDERLAY`), without encapsulation.
    #[serde(alias = "CrossSubnet")]
    CrossSubnet,
}

impl Mode {
    /// The configuration string (`always`, `crossSubnet`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Always => "always",
            Mode::CrossSubnet => "crossSubnet",
        }
    }
}

/// Configuration of [`Ipip`](crate::Ipip). Every field has a default; unknown keys are
/// ignored so that it can be read from a larger document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Config {
    /// `mode`: `always` (default) or `crossSubnet` (`Always` and `CrossSubnet`, Calico's
    /// spelling, are accepted too).
    pub mode: Mode,
    /// `device`: name of the IPIP device. Default `cnikit.ipip`; never `tunl0`.
    pub device: String,
    /// `mtu`: MTU of the IPIP device; at most the underlay MTU minus the 20 bytes of the
    /// outer IPv4 header, which is the default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::default(),
            device: DEFAULT_DEVICE.into(),
            mtu: None,
        }
    }
}

impl Config {
    /// Checks the configuration without touching the system. Errors: code 7.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field, reason: String| Error::InvalidConfig { field, reason };
        link::valid_device_name(&self.device).map_err(|r| invalid("device", r))?;
        if self.device == FALLBACK_DEVICE {
            return Err(invalid(
                "device",
                format!(
                    "{FALLBACK_DEVICE} is the ipip module's fallback device: its parameters \
                     cannot be set and it cannot be deleted; choose another name"
                ),
            ));
        }
        if let Some(mtu) = self.mtu {
            veth::valid_mtu(mtu).map_err(|r| invalid("mtu", r))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_serde_names() {
        let c: Config = serde_json::from_str("{}").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.mode, Mode::Always);
        assert_eq!(c.device, "cnikit.ipip");
        c.validate().unwrap();

        let c: Config = serde_json::from_str(
            r#"{"type": "ipip", "mode": "crossSubnet", "device": "ipip9", "mtu": 1400}"#,
        )
        .unwrap();
        assert_eq!(
            c,
            Config {
                mode: Mode::CrossSubnet,
                device: "ipip9".into(),
                mtu: Some(1400),
            }
        );
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({"mode": "crossSubnet", "device": "ipip9", "mtu": 1400})
        );
        for (raw, mode) in [
            ("always", Mode::Always),
            ("Always", Mode::Always),
            ("CrossSubnet", Mode::CrossSubnet),
        ] {
            let c: Config = serde_json::from_value(serde_json::json!({ "mode": raw })).unwrap();
            assert_eq!(c.mode, mode);
        }
        assert_eq!(Mode::CrossSubnet.as_str(), "crossSubnet");
        assert!(serde_json::from_str::<Config>(r#"{"mode": "never"}"#).is_err());
    }

    #[test]
    fn bad_values_are_code_7() {
        let bad = [
            ("much-too-long-name", None),
            ("tunl0", None),
            ("cnk0", None),
            ("ipip0", Some(40)),
        ];
        for (device, mtu) in bad {
            let c = Config {
                device: device.into(),
                mtu,
                ..Config::default()
            };
            let e = c.validate().unwrap_err();
            assert_eq!(e.code().0, 7, "{e}");
        }
    }
}
