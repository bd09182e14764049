//! The backend's configuration.

use cni_core::linux::{link, veth, vxlan};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default VXLAN network identifier.
pub const DEFAULT_VNI: u32 = 1;
/// Default UDP port (IANA's VXLAN port).
pub const DEFAULT_PORT: u16 = vxlan::DEFAULT_PORT;
/// Default device name.
pub const DEFAULT_DEVICE: &str = "cnikit.vxlan";

/// Configuration of [`Vxlan`](crate::Vxlan). Every field has a default; unknown keys are
/// ignored so that it can be read from a larger document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Config {
    /// `vni`: VXLAN network identifier, 0 to 2²⁴−1, the same on every node. Default 1.
    pub vni: u32,
    /// `port`: UDP destination port, the same on every node. Default 4789.
    pub port: u16,
    /// `device`: name of the VXLAN device. Default `cnikit.vxlan`.
    pub device: String,
    /// `mtu`: MTU of the VXLAN device; at most the underlay MTU minus the encapsulation
    /// overhead, which is the default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// `directRouting`: route peers in the same underlay subnet directly (host-gw routes,
    /// no encapsulation) and tunnel only to the others. Default false.
    pub direct_routing: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            vni: DEFAULT_VNI,
            port: DEFAULT_PORT,
            device: DEFAULT_DEVICE.into(),
            mtu: None,
            direct_routing: false,
        }
    }
}

impl Config {
    /// Checks the configuration without touching the system. Errors: code 7.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field, reason: String| Error::InvalidConfig { field, reason };
        vxlan::valid_vni(self.vni).map_err(|r| invalid("vni", r))?;
        if self.port == 0 {
            return Err(invalid("port", "UDP port 0 cannot be used".into()));
        }
        link::valid_device_name(&self.device).map_err(|r| invalid("device", r))?;
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
        assert_eq!(c.vni, 1);
        assert_eq!(c.port, 4789);
        assert!(c.device.len() <= link::MAX_NAME_LEN);
        c.validate().unwrap();

        let c: Config = serde_json::from_str(
            r#"{"type": "vxlan", "vni": 42, "port": 8472, "device": "vx42", "mtu": 1400,
                "directRouting": true}"#,
        )
        .unwrap();
        assert_eq!(
            c,
            Config {
                vni: 42,
                port: 8472,
                device: "vx42".into(),
                mtu: Some(1400),
                direct_routing: true,
            }
        );
        let back: serde_json::Value = serde_json::to_value(&c).unwrap();
        assert_eq!(
            back,
            serde_json::json!({"vni": 42, "port": 8472, "device": "vx42", "mtu": 1400,
                               "directRouting": true})
        );
    }

    #[test]
    fn bad_values_are_code_7() {
        let bad = [
            Config {
                vni: 1 << 24,
                ..Config::default()
            },
            Config {
                port: 0,
                ..Config::default()
            },
            Config {
                device: "much-too-long-name".into(),
                ..Config::default()
            },
            Config {
                device: "cnk0".into(),
                ..Config::default()
            },
            Config {
                mtu: Some(40),
                ..Config::default()
            },
        ];
        for c in bad {
            let e = c.validate().unwrap_err();
            assert_eq!(e.code().0, 7, "{e}");
        }
    }
}
