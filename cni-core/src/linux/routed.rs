//! The routed pod network, Calico style: no bridge, the node routes every pod address.
//!
//! The pod gets its addresses as /32 (/128) on `CNI_IFNAME` and reaches everything through
//! a gateway that exists on no wire: `169.254.1.1 dev eth0 scope link` and `default via
//! 169.254.1.1 dev eth0`; for IPv6, `default via fe80::ecee:eeff:feee:eeee dev eth0`, the
//! link-local address of the host veth. Permanent neighbour entries map both to the host
//! veth's fixed MAC `ee:ee:ee:ee:ee:ee`, so the pod never has to resolve them.
//!
//! The node side, in the node namespace: the host veth answers ARP for anything it routes
//! (`net.ipv4.conf.<veth>.proxy_arp=1`, as in Calico, for pods whose neighbour entry was
//! flushed), forwards (`net.ipv4.conf.<veth>.forwarding=1`), and has a host route
//! `podIP/32 dev <veth> scope link` per address.
//!
//! # Forwarding
//! Same-node traffic goes pod → host veth → host route → other veth, and traffic between
//! nodes enters through the node's uplink: the node must forward. ADD makes sure of it in
//! the node namespace (`net.ipv4.ip_forward=1`, and `net.ipv6.conf.all.forwarding=1` for
//! IPv6 pods), read first and written only when off, on the same thread as the veth's
//! sysctls. Note that IPv6 forwarding makes the node ignore router advertisements unless
//! its uplink has `accept_ra=2`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use async_trait::async_trait;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::pod::{self, PodPlan, mismatch};
use super::{NetNs, link, route, sysctl, veth};
use crate::error::{Error, Result};
use crate::ipam::Allocation;
use crate::network::{Pod, PodNetwork};
use crate::spec::{CniResult, HwAddr, IpConfig, Route};

/// The configuration `type` of this pod network.
pub const TYPE: &str = "routed";

/// The pods' IPv4 gateway: link-local, never on any wire.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pods' IPv6 gateway: the link-local address the kernel derives from [`HOST_MAC`].
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);
/// The MAC address of every host veth (the pods' gateway MAC).
pub const HOST_MAC: [u8; 6] = [0xee; 6];

/// Configuration of [`RoutedNetwork`]. Every field has a default; unknown keys are ignored
/// so that it can be read from a whole network configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RoutedConfig {
    /// `mtu`: MTU of both ends of each veth. Default 1500.
    pub mtu: u32,
}

impl Default for RoutedConfig {
    fn default() -> Self {
        RoutedConfig { mtu: 1500 }
    }
}

impl RoutedConfig {
    /// Checks the configuration without touching the system. Errors: code 7.
    pub fn validate(&self) -> Result<()> {
        pod::validate_mtu(self.mtu)
    }
}

/// Pods routed by the node (see the [module docs](self)).
///
/// Holds the node namespace it acts in: a CNI plugin passes [`NetNs::current`], tests and
/// the lab pass a namespace of their own.
#[derive(Debug)]
pub struct RoutedNetwork {
    config: RoutedConfig,
    host: NetNs,
}

impl RoutedNetwork {
    /// Validates `config` (code 7) and builds the network acting in the node namespace
    /// `host`. Touches nothing.
    pub fn new(config: RoutedConfig, host: NetNs) -> Result<Self> {
        config.validate()?;
        Ok(RoutedNetwork { config, host })
    }

    /// The configuration.
    pub fn config(&self) -> &RoutedConfig {
        &self.config
    }

    /// The node namespace this network acts in.
    pub fn host(&self) -> &NetNs {
        &self.host
    }
}

/// The node's host routes and the pod's side of one ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    host_routes: Vec<Route>,
    pod: PodPlan,
}

fn host_prefix(ip: IpAddr) -> IpNet {
    let len = if ip.is_ipv4() { 32 } else { 128 };
    // Invariant: 32 and 128 are the full lengths of their families.
    IpNet::new(ip, len).expect("full-length prefix")
}

fn plan(allocation: &Allocation) -> Result<Plan> {
    if allocation.ips.is_empty() {
        return Err(Error::invalid_config(
            "ipam",
            "the IPAM returned no address",
        ));
    }
    let addresses: Vec<IpNet> = allocation
        .ips
        .iter()
        .map(|ip| host_prefix(ip.address.addr()))
        .collect();
    let ipv4 = addresses.iter().any(|a| a.addr().is_ipv4());
    let ipv6 = addresses.iter().any(|a| a.addr().is_ipv6());

    let mut routes = Vec::new();
    let mut result_routes = Vec::new();
    let mut neighbours = Vec::new();
    if ipv4 {
        let gw = IpAddr::V4(GATEWAY_V4);
        routes.push(Route::new(host_prefix(gw), None));
        result_routes.push(Route::new(IpNet::V4(Default::default()), Some(gw)));
        neighbours.push((gw, HOST_MAC));
    }
    if ipv6 {
        let gw = IpAddr::V6(GATEWAY_V6);
        result_routes.push(Route::new(IpNet::V6(Default::default()), Some(gw)));
        neighbours.push((gw, HOST_MAC));
    }
    for (i, r) in allocation.routes.iter().enumerate() {
        let v6 = r.dst.addr().is_ipv6();
        if r.dst.prefix_len() == 0 {
            // The default route is ours already; the IPAM's gateway is not reachable here.
            continue;
        }
        if (v6 && !ipv6) || (!v6 && !ipv4) {
            return Err(Error::invalid_config(
                format!("ipam.routes[{i}]"),
                format!("{} has no address of its family in the pod", r.dst),
            ));
        }
        // Everything leaves through the host veth: the IPAM's next hop means nothing here.
        let gw = if v6 {
            IpAddr::V6(GATEWAY_V6)
        } else {
            IpAddr::V4(GATEWAY_V4)
        };
        result_routes.push(Route {
            gw: Some(gw),
            ..r.clone()
        });
    }
    routes.extend(result_routes.iter().cloned());

    let ips = addresses
        .iter()
        .map(|a| IpConfig {
            address: *a,
            gateway: Some(if a.addr().is_ipv4() {
                IpAddr::V4(GATEWAY_V4)
            } else {
                IpAddr::V6(GATEWAY_V6)
            }),
            interface: None,
        })
        .collect();
    let host_routes = addresses.iter().map(|a| Route::new(*a, None)).collect();
    Ok(Plan {
        host_routes,
        pod: PodPlan {
            addresses,
            neighbours,
            routes,
            result_routes,
            ips,
            dns: allocation.dns.clone(),
        },
    })
}

/// The host veth's sysctls (and the node's forwarding), written on one thread.
fn host_sysctls(veth: &str, ipv4: bool, ipv6: bool) -> Vec<(String, String)> {
    let mut settings = pod::node_forwarding(ipv4, ipv6);
    if ipv4 {
        settings.push((format!("net/ipv4/conf/{veth}/forwarding"), "1".into()));
        settings.push((format!("net/ipv4/conf/{veth}/proxy_arp"), "1".into()));
    }
    if ipv6 {
        // The pods' gateway fe80::ecee:eeff:feee:eeee must answer at once, not after DAD.
        settings.push((format!("net/ipv6/conf/{veth}/accept_dad"), "0".into()));
    }
    settings
}

#[async_trait]
impl PodNetwork for RoutedNetwork {
    fn kind(&self) -> &'static str {
        TYPE
    }

    async fn add(&self, pod: &Pod, allocation: &Allocation) -> Result<CniResult> {
        let ifname = pod::ifname(pod)?;
        let plan = plan(allocation)?;
        let (ipv4, ipv6) = plan.pod.families();
        pod::check_mtu(self.config.mtu, ipv6)?;
        let host = &self.host;
        let pod_ns = pod::open_netns(pod, "ADD").await?;

        let host_name = veth::host_name(&pod.attachment.container_id, ifname);
        // The host end starts down: its sysctls (accept_dad) must be in place before it
        // comes up.
        let spec = veth::VethSpec {
            host_name: &host_name,
            pod_name: ifname,
            mtu: self.config.mtu,
            host_mac: Some(HOST_MAC),
            host_controller: None,
            host_up: false,
        };
        let host_side = async {
            sysctl::ensure(host, host_sysctls(&host_name, ipv4, ipv6)).await?;
            link::set_up(host, &host_name).await?;
            let host_link = pod::host_veth(host, &host_name).await?;
            for r in &plan.host_routes {
                route::replace(host, &host_link, r).await?;
            }
            Ok::<_, Error>(host_link)
        };
        pod::add(host, &pod_ns, pod, &spec, &plan.pod, host_side).await
    }

    async fn del(&self, pod: &Pod, _prev: Option<&CniResult>) -> Result<()> {
        // The host routes go with the host veth.
        pod::del(&self.host, pod).await
    }

    async fn check(&self, pod: &Pod, prev: &CniResult) -> Result<()> {
        let checked = pod::check(&self.host, pod, prev, self.config.mtu).await?;
        let host = &checked.host;
        if host.mac != Some(HwAddr::from(HOST_MAC)) || !host.up {
            return Err(mismatch(
                format!("host veth {}", host.name),
                format!("up with MAC {}", HwAddr::from(HOST_MAC)),
                format!("up: {}, MAC {:?}", host.up, host.mac),
            ));
        }
        for ip in &checked.ips {
            let dst = ip.address.addr();
            let oif = route::lookup(&self.host, dst).await?;
            if oif != Some(host.index) {
                return Err(mismatch(
                    format!("host route to {dst}"),
                    format!("{dst} dev {} (index {})", host.name, host.index),
                    format!("output interface {oif:?}"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(ips: &[&str]) -> Allocation {
        Allocation {
            ips: ips
                .iter()
                .map(|a| IpConfig {
                    address: a.parse().unwrap(),
                    gateway: None,
                    interface: None,
                })
                .collect(),
            ..Allocation::default()
        }
    }

    #[test]
    fn the_gateway_v6_is_the_eui64_link_local_of_the_host_mac() {
        let mut eui = [0u8; 8];
        eui[..3].copy_from_slice(&HOST_MAC[..3]);
        eui[3..5].copy_from_slice(&[0xff, 0xfe]);
        eui[5..].copy_from_slice(&HOST_MAC[3..]);
        eui[0] ^= 0x02;
        let mut octets = [0u8; 16];
        octets[..2].copy_from_slice(&[0xfe, 0x80]);
        octets[8..].copy_from_slice(&eui);
        assert_eq!(Ipv6Addr::from(octets), GATEWAY_V6);
    }

    #[test]
    fn plan_uses_host_prefixes_and_the_link_local_gateways() {
        let mut a = alloc(&["10.244.1.7/26", "fd00:1::7/64"]);
        a.routes.push(Route::new(
            "0.0.0.0/0".parse().unwrap(),
            Some("10.244.1.1".parse().unwrap()),
        ));
        a.routes.push(Route::new(
            "10.96.0.0/12".parse().unwrap(),
            Some("10.244.1.1".parse().unwrap()),
        ));
        let p = plan(&a).unwrap();
        assert_eq!(
            p.pod.addresses,
            vec![
                "10.244.1.7/32".parse::<IpNet>().unwrap(),
                "fd00:1::7/128".parse().unwrap()
            ]
        );
        assert_eq!(
            p.host_routes
                .iter()
                .map(|r| r.dst.to_string())
                .collect::<Vec<_>>(),
            ["10.244.1.7/32", "fd00:1::7/128"]
        );
        let show = |rs: &[Route]| {
            rs.iter()
                .map(|r| {
                    format!(
                        "{} {}",
                        r.dst,
                        r.gw.map(|g| g.to_string()).unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            show(&p.pod.routes),
            [
                "169.254.1.1/32 ",
                "0.0.0.0/0 169.254.1.1",
                "::/0 fe80::ecee:eeff:feee:eeee",
                "10.96.0.0/12 169.254.1.1",
            ]
        );
        assert_eq!(show(&p.pod.result_routes), show(&p.pod.routes[1..]));
        assert_eq!(p.pod.neighbours.len(), 2);
        assert_eq!(p.pod.ips[0].gateway, Some(IpAddr::V4(GATEWAY_V4)));
    }

    #[test]
    fn plan_refuses_routes_of_a_missing_family() {
        let mut a = alloc(&["10.244.1.7/26"]);
        a.routes.push(Route::new("fd00::/8".parse().unwrap(), None));
        assert_eq!(plan(&a).unwrap_err().code().0, 7);
        assert_eq!(plan(&Allocation::default()).unwrap_err().code().0, 7);
    }

    #[test]
    fn config_defaults_and_validation() {
        let c: RoutedConfig = serde_json::from_str(r#"{"type":"routed"}"#).unwrap();
        assert_eq!(c.mtu, 1500);
        let c: RoutedConfig = serde_json::from_str(r#"{"mtu":1450}"#).unwrap();
        assert_eq!(c.mtu, 1450);
        assert!(RoutedConfig { mtu: 10 }.validate().is_err());
        assert_eq!(
            RoutedConfig { mtu: 70000 }.validate().unwrap_err().code().0,
            7
        );
    }

    #[test]
    fn host_sysctls_cover_the_families() {
        let s = host_sysctls("cnkabc", true, false);
        assert!(s.contains(&("net.ipv4.ip_forward".into(), "1".into())));
        assert!(s.contains(&("net/ipv4/conf/cnkabc/proxy_arp".into(), "1".into())));
        assert!(!s.iter().any(|(k, _)| k.contains("ipv6")));
        let s = host_sysctls("cnkabc", false, true);
        assert!(s.contains(&("net/ipv6/conf/cnkabc/accept_dad".into(), "0".into())));
    }
}
