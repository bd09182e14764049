//! What the built-in pod networks share: the pod's namespace and interface, the CNI
//! result, undoing a failed ADD, DEL and the pod half of CHECK.

use std::net::IpAddr;

use ipnet::IpNet;

use super::link::{self, Link};
use super::veth::{self, VethSpec};
use super::{Mismatch, NetNs, addr, neigh, route};
use crate::error::{Error, Result};
use crate::network::Pod;
use crate::spec::{CniResult, Dns, Interface, IpConfig, Route};

/// Index of the pod's interface in the result's `interfaces` (the host veth is 0).
pub(crate) const POD_INTERFACE: usize = 1;

/// What goes into the pod's namespace and its CNI result, computed before anything is
/// touched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PodPlan {
    /// Addresses of the pod interface.
    pub addresses: Vec<IpNet>,
    /// Permanent neighbour entries on the pod interface.
    pub neighbours: Vec<(IpAddr, [u8; 6])>,
    /// Routes through the pod interface, in the order they are added.
    pub routes: Vec<Route>,
    /// Routes reported in the result (without helper routes such as a gateway's link route).
    pub result_routes: Vec<Route>,
    /// Addresses reported in the result.
    pub ips: Vec<IpConfig>,
    /// DNS settings reported in the result (the IPAM's).
    pub dns: Dns,
}

impl PodPlan {
    /// Whether any address is IPv4 / IPv6.
    pub fn families(&self) -> (bool, bool) {
        (
            self.addresses.iter().any(|a| a.addr().is_ipv4()),
            self.addresses.iter().any(|a| a.addr().is_ipv6()),
        )
    }
}

/// The sysctls the node needs to forward pod traffic, like `sysctl -w
/// net.ipv4.ip_forward=1` (and `net.ipv6.conf.all.forwarding=1` for IPv6 pods).
pub(crate) fn node_forwarding(ipv4: bool, ipv6: bool) -> Vec<(String, String)> {
    let mut settings = Vec::new();
    if ipv4 {
        settings.push(("net.ipv4.ip_forward".into(), "1".into()));
    }
    if ipv6 {
        settings.push(("net.ipv6.conf.all.forwarding".into(), "1".into()));
    }
    settings
}

/// The pod's interface name, checked (`CNI_IFNAME`, code 4 when unusable).
pub(crate) fn ifname(pod: &Pod) -> Result<&str> {
    let name = pod.attachment.ifname.as_str();
    link::valid_name(name).map_err(|reason| Error::InvalidEnv {
        name: "CNI_IFNAME",
        reason,
    })?;
    Ok(name)
}

/// Opens the pod's namespace (`CNI_NETNS`, code 4 when missing or not a netns).
pub(crate) async fn open_netns(pod: &Pod, command: &str) -> Result<NetNs> {
    let path = pod.netns.as_ref().ok_or_else(|| Error::InvalidEnv {
        name: "CNI_NETNS",
        reason: format!("{command} needs the pod's network namespace"),
    })?;
    NetNs::open(path).await
}

/// Checks a configured MTU (code 7): from 68 (the IPv4 minimum) to 65535 (the veth
/// maximum).
pub(crate) fn validate_mtu(mtu: u32) -> Result<()> {
    veth::valid_mtu(mtu).map_err(|r| Error::invalid_config("mtu", r))
}

/// Checks the MTU against what the addresses need.
pub(crate) fn check_mtu(mtu: u32, has_ipv6: bool) -> Result<()> {
    if has_ipv6 && mtu < 1280 {
        return Err(Error::invalid_config(
            "mtu",
            format!("{mtu} is below 1280, the IPv6 minimum, and the pod has an IPv6 address"),
        ));
    }
    Ok(())
}

/// ADD from the veth on, the part both networks share: creates the veth `spec` (its pod end
/// directly in `pod_ns`), then runs the network's host-side step `host_side`, which returns
/// the host veth (see [`host_veth`]), alongside the configuration of the pod end (see
/// [`configure`]), and returns the CNI result. When the host-side step or the pod's
/// configuration fails, the veth is deleted again (see [`undo_on_error`]).
pub(crate) async fn add(
    host: &NetNs,
    pod_ns: &NetNs,
    pod: &Pod,
    spec: &VethSpec<'_>,
    plan: &PodPlan,
    host_side: impl Future<Output = Result<Link>>,
) -> Result<CniResult> {
    veth::create(host, pod_ns, spec).await?;
    let plumb = async {
        let (host_link, pod_link) =
            tokio::try_join!(host_side, configure(pod_ns, spec.pod_name, plan))?;
        Ok(result(pod, &host_link, &pod_link, spec.mtu, plan.clone()))
    };
    undo_on_error(host, spec.host_name, plumb.await).await
}

/// Looks up the host veth `name` that ADD has just created, like `ip link show dev NAME`;
/// its absence is a kernel error.
pub(crate) async fn host_veth(host: &NetNs, name: &str) -> Result<Link> {
    link::get(host, name).await?.ok_or_else(|| {
        Error::kernel(
            format!("ip link show dev {name}"),
            Mismatch::new("the new host veth", "no such device"),
        )
    })
}

/// The error of a CHECK that found `found` where it expected `expected`.
pub(crate) fn mismatch(
    what: impl std::fmt::Display,
    expected: impl Into<String>,
    found: impl Into<String>,
) -> Error {
    Error::kernel(format!("check {what}"), Mismatch::new(expected, found))
}

/// Configures the pod end of the veth: up (with `lo`), its addresses, neighbours, routes.
/// Returns the pod interface.
async fn configure(ns: &NetNs, ifname: &str, plan: &PodPlan) -> Result<Link> {
    let link = link::get(ns, ifname).await?.ok_or_else(|| {
        Error::kernel(
            format!("ip link show dev {ifname}"),
            Mismatch::new("the new veth end in the pod", "no such device"),
        )
    })?;
    link::set_up(ns, ifname).await?;
    link::set_up(ns, "lo").await?;
    for address in &plan.addresses {
        addr::add(ns, &link, *address).await?;
    }
    for (ip, mac) in &plan.neighbours {
        neigh::replace_permanent(ns, &link, *ip, *mac).await?;
    }
    for r in &plan.routes {
        route::add(ns, &link, r).await?;
    }
    Ok(link)
}

/// The CNI result: the host veth, the pod interface, the addresses on the pod interface.
fn result(pod: &Pod, host: &Link, pod_link: &Link, mtu: u32, plan: PodPlan) -> CniResult {
    CniResult {
        interfaces: vec![
            Interface {
                name: host.name.clone(),
                mac: host.mac.clone(),
                ..Interface::default()
            },
            Interface {
                name: pod_link.name.clone(),
                mac: pod_link.mac.clone(),
                mtu: Some(mtu),
                sandbox: pod.netns.as_ref().map(|p| p.display().to_string()),
                ..Interface::default()
            },
        ],
        ips: plan
            .ips
            .into_iter()
            .map(|ip| IpConfig {
                interface: Some(POD_INTERFACE),
                ..ip
            })
            .collect(),
        routes: plan.result_routes,
        dns: plan.dns,
    }
}

/// Returns `outcome`; on error, first deletes the host veth `host_name` (its pod end and
/// every route through it go with it), so that a failed ADD leaves nothing behind.
async fn undo_on_error<T>(host: &NetNs, host_name: &str, outcome: Result<T>) -> Result<T> {
    let err = match outcome {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    if let Err(cleanup) = link::delete(host, host_name).await {
        tracing::warn!(error = %cleanup, veth = host_name, "cannot undo a failed ADD");
        return Err(Error::Multiple(vec![err, cleanup]));
    }
    Err(err)
}

/// DEL for a veth-based pod network: deletes the host veth by its deterministic name (the
/// pod end dies with it). If the host end is already gone, a veth named `CNI_IFNAME` left in
/// the pod's namespace (if that still exists) is deleted too. Idempotent; every step runs
/// and all failures are returned together.
pub(crate) async fn del(host: &NetNs, pod: &Pod) -> Result<()> {
    let ifname = pod.attachment.ifname.as_str();
    let host_name = veth::host_name(&pod.attachment.container_id, ifname);
    let mut errors = Vec::new();
    match link::delete(host, &host_name).await {
        Ok(true) => {}
        Ok(false) => {
            if let Err(e) = del_pod_end(pod, ifname).await {
                errors.push(e);
            }
        }
        Err(e) => errors.push(e),
    }
    Error::collect(errors)
}

async fn del_pod_end(pod: &Pod, ifname: &str) -> Result<()> {
    let Some(path) = pod.netns.as_ref() else {
        return Ok(());
    };
    if link::valid_name(ifname).is_err() || !path.exists() {
        return Ok(());
    }
    // A path that no longer holds a network namespace cannot hold our interface either.
    let Ok(ns) = NetNs::open(path).await else {
        return Ok(());
    };
    match link::get(&ns, ifname).await? {
        Some(l) if l.kind.as_deref() == Some("veth") => link::delete(&ns, ifname).await.map(drop),
        _ => Ok(()),
    }
}

/// What the pod half of CHECK found, for the network's host-side checks.
pub(crate) struct Checked {
    /// The host veth.
    pub host: Link,
    /// Addresses of `prev` on the pod interface.
    pub ips: Vec<IpConfig>,
}

/// CHECK, the part both networks share: the pod interface exists (else code 3), is the
/// peer of the host veth, has the MAC and MTU of `prev`, the addresses of `prev` and the
/// routes of `prev`.
pub(crate) async fn check(host: &NetNs, pod: &Pod, prev: &CniResult, mtu: u32) -> Result<Checked> {
    let ifname = ifname(pod)?;
    let ns = open_netns(pod, "CHECK").await?;
    let unknown = || Error::UnknownContainer {
        container_id: pod.attachment.container_id.clone(),
        ifname: ifname.to_owned(),
    };
    let pod_link = link::get(&ns, ifname).await?.ok_or_else(unknown)?;
    let host_name = veth::host_name(&pod.attachment.container_id, ifname);
    let host_link = link::get(host, &host_name).await?.ok_or_else(|| {
        mismatch(
            format!("host veth of {ifname}"),
            format!("{host_name} in the node namespace"),
            "no such device",
        )
    })?;
    if pod_link.peer_index != Some(host_link.index) || host_link.peer_index != Some(pod_link.index)
    {
        return Err(mismatch(
            format!("veth pair {host_name} / {ifname}"),
            "the two ends of one veth pair",
            format!(
                "{host_name} (index {}, peer {:?}) and {ifname} (index {}, peer {:?})",
                host_link.index, host_link.peer_index, pod_link.index, pod_link.peer_index
            ),
        ));
    }

    let listed = prev
        .interfaces
        .iter()
        .position(|i| i.name == ifname && i.sandbox.is_some());
    if let Some(mac) = listed.and_then(|i| prev.interfaces[i].mac.as_ref())
        && pod_link.mac.as_ref() != Some(mac)
    {
        return Err(mismatch(
            format!("MAC of {ifname}"),
            mac.to_string(),
            format!("{:?}", pod_link.mac),
        ));
    }
    let want_mtu = listed.and_then(|i| prev.interfaces[i].mtu).unwrap_or(mtu);
    if pod_link.mtu != Some(want_mtu) {
        return Err(mismatch(
            format!("MTU of {ifname}"),
            want_mtu.to_string(),
            format!("{:?}", pod_link.mtu),
        ));
    }

    let ips: Vec<IpConfig> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface.is_none() || ip.interface == listed)
        .cloned()
        .collect();
    let have = addr::list(&ns, &pod_link).await?;
    for ip in &ips {
        if !have.contains(&ip.address) {
            return Err(mismatch(
                format!("addresses of {ifname}"),
                ip.address.to_string(),
                format!("{have:?}"),
            ));
        }
    }

    let (want4, want6): (Vec<&Route>, Vec<&Route>) =
        prev.routes.iter().partition(|r| r.dst.addr().is_ipv4());
    for (want, ipv6) in [(want4, false), (want6, true)] {
        if want.is_empty() {
            continue;
        }
        let have = route::list(&ns, ipv6).await?;
        for r in want {
            let found = have.iter().any(|e| {
                e.oif == Some(pod_link.index)
                    && e.route.dst == r.dst
                    && e.route.table == Some(r.table.unwrap_or(route::MAIN_TABLE))
                    && (r.gw.is_none() || e.route.gw == r.gw)
            });
            if !found {
                return Err(mismatch(
                    format!("routes of {ifname}"),
                    format!("{} via {:?} dev {ifname}", r.dst, r.gw),
                    "no such route",
                ));
            }
        }
    }
    Ok(Checked {
        host: host_link,
        ips,
    })
}
