//! Namespaces and the underlay: everything the lab wires with `ip`, always inside one of its
//! own namespaces (`ip -n cnkl-<lab>-…`), never in the root namespace.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail, ensure};
use cnikit::core::linux::{NetNs, netns};
use serde_json::Value;
use tokio::process::Command;

use crate::state::{self, Lab, Node, Underlay};

/// The underlay bridge in each underlay namespace.
pub const UNDERLAY_BRIDGE: &str = "br0";
/// The node's underlay interface.
pub const NODE_NIC: &str = "eth0";

/// Refuses a namespace name that is not one of a lab's: the guard that keeps every `ip`
/// command of the lab out of the root namespace and out of other labs.
pub fn guard(ns: &str) -> Result<()> {
    ensure!(
        ns.starts_with(&format!("{}-", state::NS_PREFIX)) && !ns.contains('/'),
        "refusing to touch namespace {ns:?}: not a lab namespace"
    );
    Ok(())
}

/// Runs `ip -n NS ARGS…` and returns its stdout.
pub async fn ip(ns: &str, args: &[&str]) -> Result<String> {
    guard(ns)?;
    let out = Command::new("ip")
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .await
        .context("run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip -n {ns} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip -n NS -j ARGS…` and parses the JSON array it prints.
pub async fn ip_json(ns: &str, args: &[&str]) -> Result<Vec<Value>> {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    parse_array(&ip(ns, &full).await?)
}

/// Runs `bridge -n NS -j ARGS…` and parses the JSON array it prints.
pub async fn bridge_json(ns: &str, args: &[&str]) -> Result<Vec<Value>> {
    guard(ns)?;
    let out = Command::new("bridge")
        .arg("-n")
        .arg(ns)
        .arg("-j")
        .args(args)
        .output()
        .await
        .context("run bridge (iproute2)")?;
    if !out.status.success() {
        bail!(
            "bridge -n {ns} -j {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_array(&String::from_utf8_lossy(&out.stdout))
}

fn parse_array(text: &str) -> Result<Vec<Value>> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    match serde_json::from_str(text).context("parse iproute2 JSON")? {
        Value::Array(items) => Ok(items),
        other => bail!("iproute2 printed {other}, not a list"),
    }
}

/// Creates namespace `ns` with `lo` up.
pub async fn create_ns(ns: &str) -> Result<()> {
    guard(ns)?;
    netns::create_named(ns).with_context(|| format!("ip netns add {ns}"))?;
    ip(ns, &["link", "set", "lo", "up"]).await?;
    Ok(())
}

/// Deletes namespace `ns`; `Ok` when it does not exist.
pub fn delete_ns(ns: &str) -> Result<()> {
    guard(ns)?;
    netns::delete_named(ns).with_context(|| format!("ip netns del {ns}"))
}

/// Whether namespace `ns` exists.
pub fn ns_exists(ns: &str) -> bool {
    state::netns_path(ns).exists()
}

/// The namespaces named `cnkl-<lab>-…` that exist now.
pub fn lab_namespaces(lab: &str) -> Vec<String> {
    let prefix = state::ns_prefix(lab);
    let mut names: Vec<String> = std::fs::read_dir(state::NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    names.sort();
    names
}

/// Writes a sysctl inside `ns`.
pub async fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    guard(ns)?;
    let handle = NetNs::open(state::netns_path(ns)).await?;
    handle.set_sysctl(key, value).await?;
    Ok(())
}

/// Builds an underlay segment: namespace, bridge `br0` with the segment's `.2` address.
pub async fn build_underlay(underlay: &Underlay) -> Result<()> {
    let ns = &underlay.ns;
    create_ns(ns).await?;
    ip(ns, &["link", "add", UNDERLAY_BRIDGE, "type", "bridge"]).await?;
    ip(ns, &["link", "set", UNDERLAY_BRIDGE, "up"]).await?;
    let host = format!("{}/24", underlay.host());
    ip(ns, &["addr", "add", &host, "dev", UNDERLAY_BRIDGE]).await?;
    Ok(())
}

/// Builds the router joining the segments: one leg (`eth<i>`, the segment's `.1`) per
/// segment, forwarding on; each segment's own namespace routes the other segments via it
/// (so that the lab's etcd answers nodes of every segment).
pub async fn build_router(router: &str, underlays: &[Underlay]) -> Result<()> {
    create_ns(router).await?;
    sysctl(router, "net.ipv4.ip_forward", "1").await?;
    for (i, u) in underlays.iter().enumerate() {
        let leg = format!("eth{i}");
        ip(
            &u.ns,
            &[
                "link", "add", "router", "type", "veth", "peer", "name", &leg, "netns", router,
            ],
        )
        .await?;
        ip(&u.ns, &["link", "set", "router", "master", UNDERLAY_BRIDGE]).await?;
        ip(&u.ns, &["link", "set", "router", "up"]).await?;
        let addr = format!("{}/24", u.router());
        ip(router, &["addr", "add", &addr, "dev", &leg]).await?;
        ip(router, &["link", "set", &leg, "up"]).await?;
    }
    for u in underlays {
        for other in underlays.iter().filter(|o| o.octet != u.octet) {
            let via = u.router().to_string();
            ip(&u.ns, &["route", "add", &other.subnet(), "via", &via]).await?;
        }
    }
    Ok(())
}

/// Builds a node: its namespace, `eth0` plugged into its segment's bridge with the node's
/// address, and routes to the other segments via the router.
pub async fn build_node(lab: &Lab, node: &Node) -> Result<()> {
    let underlay = &lab.underlays[node.underlay];
    create_ns(&node.ns).await?;
    ip(
        &underlay.ns,
        &[
            "link", "add", &node.name, "type", "veth", "peer", "name", NODE_NIC, "netns", &node.ns,
        ],
    )
    .await?;
    ip(
        &underlay.ns,
        &["link", "set", &node.name, "master", UNDERLAY_BRIDGE],
    )
    .await?;
    ip(&underlay.ns, &["link", "set", &node.name, "up"]).await?;
    let addr = format!("{}/24", node.address);
    ip(&node.ns, &["addr", "add", &addr, "dev", NODE_NIC]).await?;
    ip(&node.ns, &["link", "set", NODE_NIC, "up"]).await?;
    if lab.router.is_some() {
        let via = underlay.router().to_string();
        for other in lab.underlays.iter().filter(|o| o.octet != underlay.octet) {
            ip(&node.ns, &["route", "add", &other.subnet(), "via", &via]).await?;
        }
    }
    Ok(())
}

/// The address of node `index` on `underlay`: `172.30.<octet>.<10 + index>` (`.254` is the
/// top-of-rack router's).
pub fn node_address(underlay: &Underlay, index: u32) -> Result<Ipv4Addr> {
    let host = u8::try_from(10 + index)
        .ok()
        .filter(|h| *h < 254)
        .with_context(|| format!("node index {index} does not fit the /24 underlay"))?;
    Ok(Ipv4Addr::new(172, 30, underlay.octet, host))
}
