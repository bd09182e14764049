//! The bridge pod network: each pod's veth on one Linux bridge that holds the gateways.
//!
//! ADD, in the node namespace: make sure the bridge exists and is up (created with
//! netfilter calls off unless asked), put each gateway of the allocation on it with the
//! subnet's prefix, make sure the node forwards (`net.ipv4.ip_forward=1`, and
//! `net.ipv6.conf.all.forwarding=1` for IPv6 pods: the bridge is the pods' router to the
//! rest of the cluster), create the veth with its pod end directly in the pod's namespace
//! and its host end enslaved and up. In the pod: the addresses with their subnet prefix,
//! `lo` up, a default route via the gateway of each family and the allocation's routes
//! (through that gateway when they name none).
//!
//! The bridge and its gateway addresses are shared by every pod of the node and are never
//! removed by DEL or by a failed ADD.

use async_trait::async_trait;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::link::{self, BridgeSpec};
use super::pod::{self, PodPlan, mismatch};
use super::{NetNs, addr, sysctl, veth};
use crate::error::{Error, Result};
use crate::ipam::Allocation;
use crate::network::{Pod, PodNetwork};
use crate::spec::{CniResult, IpConfig, Route};

/// The configuration `type` of this pod network.
pub const TYPE: &str = "bridge";

/// Configuration of [`BridgeNetwork`]. Every field has a default; unknown keys are ignored
/// so that it can be read from a whole network configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BridgeConfig {
    /// `bridge`: name of the bridge device. Default `cnikit0`.
    pub bridge: String,
    /// `mtu`: MTU of the bridge (when cnikit creates it) and of both ends of each veth.
    /// Default 1500.
    pub mtu: u32,
    /// `hairpinMode`: let a pod reach itself through the bridge (needed for a pod reaching
    /// its own service address). Default false.
    pub hairpin_mode: bool,
    /// `bridgeNetfilter`: pass bridged frames through iptables, ip6tables and arptables
    /// (`nf_call_*` on the bridge when cnikit creates it). Costs ~10 % throughput even with
    /// no rules. Default false.
    pub bridge_netfilter: bool,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            bridge: "cnikit0".into(),
            mtu: 1500,
            hairpin_mode: false,
            bridge_netfilter: false,
        }
    }
}

impl BridgeConfig {
    /// Checks the configuration without touching the system. Errors: code 7.
    pub fn validate(&self) -> Result<()> {
        link::valid_device_name(&self.bridge).map_err(|r| Error::invalid_config("bridge", r))?;
        pod::validate_mtu(self.mtu)
    }
}

/// Pods on a Linux bridge (see the [module docs](self)).
///
/// Holds the node namespace it acts in: a CNI plugin passes [`NetNs::current`], tests and
/// the lab pass a namespace of their own.
#[derive(Debug)]
pub struct BridgeNetwork {
    config: BridgeConfig,
    host: NetNs,
}

impl BridgeNetwork {
    /// Validates `config` (code 7) and builds the network acting in the node namespace
    /// `host`. Touches nothing.
    pub fn new(config: BridgeConfig, host: NetNs) -> Result<Self> {
        config.validate()?;
        Ok(BridgeNetwork { config, host })
    }

    /// The configuration.
    pub fn config(&self) -> &BridgeConfig {
        &self.config
    }

    /// The node namespace this network acts in.
    pub fn host(&self) -> &NetNs {
        &self.host
    }
}

/// The bridge's addresses and the pod's side of one ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    gateways: Vec<IpNet>,
    pod: PodPlan,
}

fn plan(allocation: &Allocation) -> Result<Plan> {
    if allocation.ips.is_empty() {
        return Err(Error::invalid_config(
            "ipam",
            "the IPAM returned no address",
        ));
    }
    let mut gateways: Vec<IpNet> = Vec::new();
    let mut default_gw = [None, None];
    for (i, ip) in allocation.ips.iter().enumerate() {
        let Some(gw) = ip.gateway else { continue };
        let field = format!("ipam.ips[{i}].gateway");
        if gw.is_ipv4() != ip.address.addr().is_ipv4() {
            return Err(Error::invalid_config(
                field,
                format!("{gw} is not of the family of {}", ip.address),
            ));
        }
        if gw == ip.address.addr() || !ip.address.contains(&gw) {
            return Err(Error::invalid_config(
                field,
                format!(
                    "{gw} must be another address of the subnet {}",
                    ip.address.trunc()
                ),
            ));
        }
        let on_bridge = IpNet::new(gw, ip.address.prefix_len())
            .map_err(|e| Error::invalid_config("ipam.ips", e.to_string()))?;
        if !gateways.contains(&on_bridge) {
            gateways.push(on_bridge);
        }
        default_gw[usize::from(gw.is_ipv6())].get_or_insert(gw);
    }

    let mut routes = Vec::new();
    for (ipv6, gw) in [false, true].into_iter().zip(default_gw) {
        let Some(gw) = gw else { continue };
        let has_default = allocation
            .routes
            .iter()
            .any(|r| r.dst.prefix_len() == 0 && r.dst.addr().is_ipv6() == ipv6);
        if !has_default {
            // The default networks, 0.0.0.0/0 and ::/0.
            let any = if ipv6 {
                IpNet::V6(Default::default())
            } else {
                IpNet::V4(Default::default())
            };
            routes.push(Route::new(any, Some(gw)));
        }
    }
    for (i, r) in allocation.routes.iter().enumerate() {
        let ipv6 = r.dst.addr().is_ipv6();
        let gw = r.gw.or(default_gw[usize::from(ipv6)]);
        if let Some(gw) = gw
            && gw.is_ipv6() != ipv6
        {
            return Err(Error::invalid_config(
                format!("ipam.routes[{i}].gw"),
                format!("{gw} is not of the family of {}", r.dst),
            ));
        }
        routes.push(Route { gw, ..r.clone() });
    }

    let pod = PodPlan {
        addresses: allocation.ips.iter().map(|ip| ip.address).collect(),
        neighbours: Vec::new(),
        result_routes: routes.clone(),
        routes,
        ips: allocation
            .ips
            .iter()
            .map(|ip| IpConfig {
                address: ip.address,
                gateway: ip.gateway,
                interface: None,
            })
            .collect(),
        dns: allocation.dns.clone(),
    };
    Ok(Plan { gateways, pod })
}

#[async_trait]
impl PodNetwork for BridgeNetwork {
    fn kind(&self) -> &'static str {
        TYPE
    }

    async fn add(&self, pod: &Pod, allocation: &Allocation) -> Result<CniResult> {
        let ifname = pod::ifname(pod)?;
        let plan = plan(allocation)?;
        let (ipv4, ipv6) = plan.pod.families();
        pod::check_mtu(self.config.mtu, ipv6)?;
        let host = &self.host;
        let spec = BridgeSpec {
            name: &self.config.bridge,
            mtu: self.config.mtu,
            netfilter: self.config.bridge_netfilter,
        };
        // The pod's namespace first: a bad CNI_NETNS must leave the node untouched.
        let pod_ns = pod::open_netns(pod, "ADD").await?;
        // The node's sysctls and the bridge are independent: overlap the sysctl thread
        // with the netlink round trips.
        let prepare_bridge = async {
            let bridge = link::ensure_bridge(host, &spec).await?;
            for gw in &plan.gateways {
                addr::replace(host, &bridge, *gw).await?;
            }
            Ok::<_, Error>(bridge)
        };
        let (bridge, ()) = tokio::try_join!(
            prepare_bridge,
            sysctl::ensure(host, pod::node_forwarding(ipv4, ipv6)),
        )?;

        let host_name = veth::host_name(&pod.attachment.container_id, ifname);
        let spec = veth::VethSpec {
            host_name: &host_name,
            pod_name: ifname,
            mtu: self.config.mtu,
            host_mac: None,
            host_controller: Some(bridge.index),
            host_up: true,
        };
        let host_side = async {
            let host_link = pod::host_veth(host, &host_name).await?;
            if self.config.hairpin_mode {
                link::set_hairpin(host, &host_link, true).await?;
            }
            Ok::<_, Error>(host_link)
        };
        pod::add(host, &pod_ns, pod, &spec, &plan.pod, host_side).await
    }

    async fn del(&self, pod: &Pod, _prev: Option<&CniResult>) -> Result<()> {
        pod::del(&self.host, pod).await
    }

    async fn check(&self, pod: &Pod, prev: &CniResult) -> Result<()> {
        let checked = pod::check(&self.host, pod, prev, self.config.mtu).await?;
        let name = &self.config.bridge;
        let bridge = link::get(&self.host, name)
            .await?
            .ok_or_else(|| mismatch("bridge", format!("bridge {name}"), "no such device"))?;
        if checked.host.controller != Some(bridge.index) {
            return Err(mismatch(
                format!("bridge port {}", checked.host.name),
                format!("enslaved to {name} (index {})", bridge.index),
                format!("controller {:?}", checked.host.controller),
            ));
        }
        if !checked.host.up || !bridge.up {
            return Err(mismatch(
                format!("{} and {name}", checked.host.name),
                "both up",
                format!(
                    "{} up: {}, {name} up: {}",
                    checked.host.name, checked.host.up, bridge.up
                ),
            ));
        }
        let on_bridge = addr::list(&self.host, &bridge).await?;
        for ip in &checked.ips {
            let Some(gw) = ip.gateway else { continue };
            let want = IpNet::new(gw, ip.address.prefix_len())
                .map_err(|e| Error::invalid_config("prevResult.ips", e.to_string()))?;
            if !on_bridge.contains(&want) {
                return Err(mismatch(
                    format!("gateway on {name}"),
                    want.to_string(),
                    format!("{on_bridge:?}"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::IpConfig;

    fn ip(address: &str, gateway: Option<&str>) -> IpConfig {
        IpConfig {
            address: address.parse().unwrap(),
            gateway: gateway.map(|g| g.parse().unwrap()),
            interface: None,
        }
    }

    #[test]
    fn config_defaults_and_serde_names() {
        let c: BridgeConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, BridgeConfig::default());
        assert_eq!(c.bridge, "cnikit0");
        assert_eq!(c.mtu, 1500);
        let c: BridgeConfig = serde_json::from_str(
            r#"{"type":"bridge","bridge":"br9","mtu":9000,"hairpinMode":true,"bridgeNetfilter":true}"#,
        )
        .unwrap();
        assert_eq!(
            c,
            BridgeConfig {
                bridge: "br9".into(),
                mtu: 9000,
                hairpin_mode: true,
                bridge_netfilter: true
            }
        );
        c.validate().unwrap();
    }

    #[test]
    fn validate_refuses_bad_names_and_mtus() {
        for (bridge, mtu) in [
            ("a-name-too-long-x", 1500),
            ("", 1500),
            ("br/0", 1500),
            ("cnk0", 1500),
            ("br0", 67),
            ("br0", 65536),
        ] {
            let c = BridgeConfig {
                bridge: bridge.into(),
                mtu,
                ..BridgeConfig::default()
            };
            let err = c.validate().unwrap_err();
            assert_eq!(err.code().0, 7, "{bridge} {mtu}: {err}");
        }
    }

    #[test]
    fn plan_puts_gateways_on_the_bridge_and_routes_via_them() {
        let mut a = Allocation {
            ips: vec![
                ip("10.244.0.5/26", Some("10.244.0.1")),
                ip("fd00:0:0:1::5/64", Some("fd00:0:0:1::1")),
            ],
            ..Allocation::default()
        };
        a.routes
            .push(Route::new("10.96.0.0/12".parse().unwrap(), None));
        let p = plan(&a).unwrap();
        assert_eq!(
            p.gateways,
            vec![
                "10.244.0.1/26".parse().unwrap(),
                "fd00:0:0:1::1/64".parse::<IpNet>().unwrap()
            ]
        );
        let routes: Vec<String> = p
            .pod
            .routes
            .iter()
            .map(|r| format!("{} {:?}", r.dst, r.gw.map(|g| g.to_string())))
            .collect();
        assert_eq!(
            routes,
            [
                "0.0.0.0/0 Some(\"10.244.0.1\")",
                "::/0 Some(\"fd00:0:0:1::1\")",
                "10.96.0.0/12 Some(\"10.244.0.1\")",
            ]
        );
        assert_eq!(p.pod.addresses, vec![a.ips[0].address, a.ips[1].address]);
    }

    #[test]
    fn plan_keeps_the_ipams_default_route() {
        let a = Allocation {
            ips: vec![ip("10.244.0.5/26", Some("10.244.0.1"))],
            routes: vec![Route::new(
                "0.0.0.0/0".parse().unwrap(),
                Some("10.244.0.2".parse().unwrap()),
            )],
            ..Allocation::default()
        };
        let p = plan(&a).unwrap();
        assert_eq!(p.pod.routes, a.routes);
    }

    #[test]
    fn plan_refuses_bad_gateways() {
        for (address, gw) in [
            ("10.244.0.5/26", "10.245.0.1"),
            ("10.244.0.5/26", "10.244.0.5"),
            ("10.244.0.5/26", "fd00::1"),
        ] {
            let a = Allocation {
                ips: vec![ip(address, Some(gw))],
                ..Allocation::default()
            };
            assert_eq!(plan(&a).unwrap_err().code().0, 7, "{address} via {gw}");
        }
        assert_eq!(plan(&Allocation::default()).unwrap_err().code().0, 7);
    }
}
