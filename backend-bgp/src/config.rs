//! The `bgp` keys of the configuration.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The private AS number every node uses by default (iBGP full mesh), as Calico does.
pub const DEFAULT_AS: u32 = 64512;
/// The BGP port.
pub const DEFAULT_PORT: u16 = 179;
/// The hold time proposed in OPEN, seconds (RFC 4271 suggests 90).
pub const DEFAULT_HOLD_TIME: u16 = 90;
/// Seconds between connection attempts to a peer with no session.
pub const DEFAULT_CONNECT_RETRY: u16 = 2;
/// The restart time advertised for graceful restart, seconds (as bird's default).
pub const DEFAULT_RESTART_TIME: u16 = 120;

/// How the speaker runs: the configuration list's `"bgp"` object.
///
/// ```json
/// "bgp": { "asNumber": 64512, "port": 179, "holdTime": 90, "connectRetry": 2,
///          "gracefulRestart": true, "restartTime": 120 }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// `asNumber`: the AS of every node (iBGP). Default 64512.
    #[serde(default = "default_as")]
    pub as_number: u32,
    /// `port`: the TCP port the speaker listens on and connects to. Default 179.
    #[serde(default = "default_port")]
    pub port: u16,
    /// `listenAddress`: where the speaker listens. Default: the node's underlay address.
    #[serde(default)]
    pub listen_address: Option<IpAddr>,
    /// `holdTime`: the hold time proposed in OPEN, 0 or at least 3 seconds. Default 90.
    #[serde(default = "default_hold_time")]
    pub hold_time: u16,
    /// `connectRetry`: seconds between connection attempts to a peer. Default 2.
    #[serde(default = "default_connect_retry")]
    pub connect_retry: u16,
    /// `gracefulRestart`: advertise graceful restart (RFC 4724) and keep the routes of a
    /// restarting peer that does it. Default true.
    #[serde(default = "default_true")]
    pub graceful_restart: bool,
    /// `restartTime`: how long peers keep this node's routes while it restarts, seconds
    /// (at most 4095). Default 120.
    #[serde(default = "default_restart_time")]
    pub restart_time: u16,
    /// `globalPeers`: routers outside the cluster every node peers with (a top-of-rack
    /// router), as Calico's global BGPPeer: eBGP when their AS differs from the nodes'.
    #[serde(default)]
    pub global_peers: Vec<GlobalPeer>,
    /// `routeReflectorClusterId`: this node is a route reflector (RFC 4456) of this
    /// cluster. Nodes peer with the reflectors only, once there is one; reflectors peer with
    /// every node and reflect the routes of their clients (the other nodes).
    #[serde(default)]
    pub route_reflector_cluster_id: Option<std::net::Ipv4Addr>,
    /// `nodeToNodeMesh`: nodes peer with each other (a full mesh, or through the route
    /// reflectors among them). False when external route reflectors, configured as
    /// [`global_peers`](Config::global_peers) in the nodes' AS, do it. Default true.
    #[serde(default = "default_true")]
    pub node_to_node_mesh: bool,
    /// `engine`: which BGP speaker runs: `native` (in the agent, the default) or `bird`
    /// (BIRD 2 as a supervised child process).
    #[serde(default)]
    pub engine: Engine,
    /// `bird`: where and how the `bird` engine runs BIRD.
    #[serde(default)]
    pub bird: BirdConfig,
    /// `ipip`: the mode makes this IPIP device (as the `ipip` mode does) and installs the
    /// learned routes through it, on-link: Calico's IPIP with BGP.
    #[serde(default)]
    pub ipip: Option<IpipConfig>,
}

/// The speaker that runs BGP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Engine {
    /// The in-process speaker ([`Speaker`](crate::Speaker)).
    #[default]
    Native,
    /// BIRD 2, run as a supervised child process with a rendered configuration
    /// ([`Bird`](crate::Bird)).
    Bird,
}

/// The `bird` engine's keys: `{"runDir": "/run/cnikit/bird", "binary": "bird", "birdc":
/// "birdc"}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BirdConfig {
    /// `runDir`: where `bird.conf`, the control socket `bird.ctl` and `bird.pid` live (one
    /// directory per node). Default: the agent's data directory's `bird/`.
    #[serde(default)]
    pub run_dir: Option<std::path::PathBuf>,
    /// `binary`: the `bird` executable. Default `bird` (on `PATH`).
    #[serde(default)]
    pub binary: Option<std::path::PathBuf>,
    /// `birdc`: the `birdc` executable. Default `birdc` (on `PATH`).
    #[serde(default)]
    pub birdc: Option<std::path::PathBuf>,
}

/// Learned routes through an IPIP device: `{"device": "cnikit.ipip", "crossSubnet": false}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpipConfig {
    /// `device`: the IPIP device's name.
    pub device: String,
    /// `crossSubnet`: encapsulate only towards next hops outside the node's subnet (the
    /// others get plain routes). Default false: always.
    #[serde(default)]
    pub cross_subnet: bool,
}

/// A router every node peers with: `{"address": "192.168.1.1", "asNumber": 65000}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GlobalPeer {
    /// Its IPv4 address.
    pub address: std::net::Ipv4Addr,
    /// Its AS.
    pub as_number: u32,
    /// The name it is reported under. Default `global-ADDRESS`.
    #[serde(default)]
    pub name: Option<String>,
}

impl GlobalPeer {
    /// The name it is reported under.
    pub fn name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("global-{}", self.address))
    }
}

fn default_true() -> bool {
    true
}
fn default_restart_time() -> u16 {
    DEFAULT_RESTART_TIME
}

fn default_as() -> u32 {
    DEFAULT_AS
}
fn default_port() -> u16 {
    DEFAULT_PORT
}
fn default_hold_time() -> u16 {
    DEFAULT_HOLD_TIME
}
fn default_connect_retry() -> u16 {
    DEFAULT_CONNECT_RETRY
}

impl Default for Config {
    fn default() -> Self {
        Config {
            as_number: DEFAULT_AS,
            port: DEFAULT_PORT,
            listen_address: None,
            hold_time: DEFAULT_HOLD_TIME,
            connect_retry: DEFAULT_CONNECT_RETRY,
            graceful_restart: true,
            restart_time: DEFAULT_RESTART_TIME,
            global_peers: Vec::new(),
            route_reflector_cluster_id: None,
            node_to_node_mesh: true,
            engine: Engine::Native,
            bird: BirdConfig::default(),
            ipip: None,
        }
    }
}

impl Config {
    /// Checks the values; no side effects. Errors: 7.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| Err(Error::Config { field, reason });
        if self.as_number == 0 || self.as_number == 23456 {
            return bad(
                "bgp.asNumber",
                format!("{} is reserved (0, or AS_TRANS 23456)", self.as_number),
            );
        }
        if self.port == 0 {
            return bad("bgp.port", "must not be 0".into());
        }
        if matches!(self.hold_time, 1 | 2) {
            return bad(
                "bgp.holdTime",
                format!("{} s: must be 0 or at least 3 (RFC 4271)", self.hold_time),
            );
        }
        if self.restart_time > 4095 {
            return bad(
                "bgp.restartTime",
                format!("{} s: at most 4095 (12 bits, RFC 4724)", self.restart_time),
            );
        }
        for peer in &self.global_peers {
            if peer.as_number == 0 || peer.as_number == 23456 {
                return bad(
                    "bgp.globalPeers",
                    format!("{}: AS {} is reserved", peer.address, peer.as_number),
                );
            }
        }
        if self.connect_retry == 0 {
            return bad("bgp.connectRetry", "must be at least 1 second".into());
        }
        if let Some(ipip) = &self.ipip {
            let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
            if ipip.device.is_empty() || ipip.device.len() > 15 || !ipip.device.chars().all(ok) {
                return bad(
                    "bgp.ipip.device",
                    format!("{:?} is no interface name", ipip.device),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_camel_case_keys() {
        let c: Config = serde_json::from_str("{}").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!((c.as_number, c.port, c.hold_time), (64512, 179, 90));
        let c: Config = serde_json::from_str(
            r#"{"asNumber": 65001, "port": 1179, "holdTime": 9, "connectRetry": 1,
                "listenAddress": "0.0.0.0",
                "globalPeers": [{"address": "192.168.1.1", "asNumber": 65000}]}"#,
        )
        .unwrap();
        assert_eq!(c.global_peers[0].name(), "global-192.168.1.1");
        c.validate().unwrap();
        assert_eq!((c.as_number, c.port, c.hold_time), (65001, 1179, 9));
        assert!(serde_json::from_str::<Config>(r#"{"asnumber": 1}"#).is_err());
        let c: Config = serde_json::from_str(
            r#"{"engine": "bird", "bird": {"runDir": "/run/x"},
                "ipip": {"device": "tunl0", "crossSubnet": true}}"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.engine, Engine::Bird);
        assert_eq!(c.bird.run_dir.as_deref(), Some("/run/x".as_ref()));
        assert!(serde_json::from_str::<Config>(r#"{"engine": "frr"}"#).is_err());
    }

    #[test]
    fn bad_values_are_code_7() {
        for bad in [
            Config {
                as_number: 0,
                ..Config::default()
            },
            Config {
                as_number: 23456,
                ..Config::default()
            },
            Config {
                port: 0,
                ..Config::default()
            },
            Config {
                hold_time: 2,
                ..Config::default()
            },
            Config {
                connect_retry: 0,
                ..Config::default()
            },
            Config {
                restart_time: 4096,
                ..Config::default()
            },
            Config {
                engine: Engine::Bird,
                ipip: Some(IpipConfig {
                    device: "tun\"; }".into(),
                    cross_subnet: false,
                }),
                ..Config::default()
            },
            Config {
                global_peers: vec![GlobalPeer {
                    address: "192.168.1.1".parse().unwrap(),
                    as_number: 0,
                    name: None,
                }],
                ..Config::default()
            },
        ] {
            assert_eq!(bad.validate().unwrap_err().code().0, 7, "{bad:?}");
        }
        Config {
            hold_time: 0,
            ..Config::default()
        }
        .validate()
        .unwrap();
    }
}
