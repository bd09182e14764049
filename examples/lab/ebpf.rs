//! The `ebpf` pod network and routing mode in the lab: a BPF filesystem of the lab's own,
//! and what `show`, `node-del` and `down` read from it.
//!
//! The lab mounts a bpffs instance at `<state dir>/bpffs` and gives it to the plugin and the
//! agents as `bpffs`: the nodes' maps and program links are pinned there
//! (`cnikit/<network>/<node>/…`), apart from everything else on the machine's
//! `/sys/fs/bpf`. `down` removes every pin and unmounts it: no map and no program of the lab
//! survives it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cnikit::core::linux::NetNs;
use cnikit::ebpf::program::{self, FROM_TUNNEL, PROGRAM, TO_TUNNEL};
use cnikit::ebpf::{Counter, Pins};

use crate::net;
use crate::show::{Cluster, NodeView};
use crate::state::{self, Lab, Node};

/// The lab's BPF filesystem, under the state directory of lab `name`.
pub fn bpffs(name: &str) -> PathBuf {
    state::state_dir(name).join("bpffs")
}

/// Whether `path` is a mounted BPF filesystem.
fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Mounts the lab's BPF filesystem (like `mount -t bpf bpf DIR`).
pub fn mount(lab: &Lab) -> Result<()> {
    let dir = bpffs(&lab.name);
    std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    if !is_bpffs(&dir) {
        nix::mount::mount(
            Some("bpf"),
            &dir,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mount -t bpf bpf {}", dir.display()))?;
    }
    Ok(())
}

/// The pins of `node` of lab `name`.
pub fn pins(name: &str, node: &str) -> Result<Pins> {
    Ok(Pins::new(&bpffs(name), state::NETWORK, node)?)
}

/// What `down` found on the lab's BPF filesystem once every pod was DEL'd and every agent
/// stopped: `problems` (entries or links left) and what it removed.
pub fn unmount(name: &str, problems: &mut Vec<String>) {
    let dir = bpffs(name);
    if !is_bpffs(&dir) {
        return;
    }
    let network = dir.join("cnikit").join(state::NETWORK);
    let nodes: Vec<String> = std::fs::read_dir(&network)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    let mut maps = 0;
    for node in &nodes {
        let Ok(pins) = Pins::new(&dir, state::NETWORK, node) else {
            continue;
        };
        match leftovers(&pins) {
            Ok(left) => problems.extend(left.into_iter().map(|l| format!("{node}: {l}"))),
            Err(e) => problems.push(format!("{node}: reading its maps: {e:#}")),
        }
        maps += std::fs::read_dir(pins.dir())
            .map(|d| {
                d.filter(|e| e.as_ref().is_ok_and(|e| e.path().is_file()))
                    .count()
            })
            .unwrap_or(0);
        if let Err(e) = pins.remove_all() {
            problems.push(format!("{node}: {e:#}"));
        }
    }
    match nix::mount::umount(&dir) {
        Ok(()) => println!(
            "bpffs {}: {maps} pinned maps of {} nodes removed, unmounted",
            dir.display(),
            nodes.len()
        ),
        Err(e) => problems.push(format!("umount {}: {e}", dir.display())),
    }
}

/// Entries and links a node's pins still hold (none once its pods are DEL'd and its agent
/// is stopped).
fn leftovers(pins: &Pins) -> Result<Vec<String>> {
    let mut left = Vec::new();
    if let Some(endpoints) = pins.open_endpoints()? {
        for (ip, e) in endpoints.list()? {
            left.push(format!("endpoint entry {ip} -> ifindex {}", e.ifindex));
        }
    }
    if let Some(remotes) = pins.open_remotes()? {
        for (block, via) in remotes.list()? {
            left.push(format!("remote entry {block} -> {via}"));
        }
    }
    for sub in ["links", "tunnel-links"] {
        for e in std::fs::read_dir(pins.dir().join(sub))
            .into_iter()
            .flatten()
            .flatten()
        {
            left.push(format!(
                "pinned link {sub}/{}",
                e.file_name().to_string_lossy()
            ));
        }
    }
    Ok(left)
}

/// The programs on each device of `node` (TCX, else tc clsact): `(device, hook, id, name)`.
async fn attached(
    node: &Node,
    devices: Vec<String>,
) -> Result<Vec<(String, &'static str, u32, String)>> {
    if !program::has_tcx() {
        let mut found = Vec::new();
        for dev in devices {
            for hook in ["ingress", "egress"] {
                let out = tc(&node.ns, &["filter", "show", "dev", &dev, hook]).await?;
                for (id, name) in tc_programs(&out) {
                    found.push((dev.clone(), hook, id, name));
                }
            }
        }
        return Ok(found);
    }
    let ns = NetNs::named(&node.ns).await?;
    let found = ns
        .run(move || {
            use program::TcAttachType::{Egress, Ingress};
            let mut found = Vec::new();
            for dev in devices {
                for (hook, t) in [("ingress", Ingress), ("egress", Egress)] {
                    for (id, name) in program::tcx_programs_on(&dev, t)?.unwrap_or_default() {
                        found.push((dev.clone(), hook, id, name));
                    }
                }
            }
            Ok::<_, cnikit::ebpf::Error>(found)
        })
        .await??;
    Ok(found)
}

/// Runs `tc -n NS ARGS…` and returns its stdout.
async fn tc(ns: &str, args: &[&str]) -> Result<String> {
    net::guard(ns)?;
    let out = tokio::process::Command::new("tc")
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .await
        .context("run tc (iproute2)")?;
    if !out.status.success() {
        bail!(
            "tc -n {ns} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `(id, name)` of the bpf filters in `tc filter show` output.
fn tc_programs(out: &str) -> Vec<(u32, String)> {
    out.lines()
        .filter(|l| l.contains(" bpf "))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let after = |key: &str| {
                words
                    .iter()
                    .position(|w| *w == key)
                    .and_then(|i| words.get(i + 1))
            };
            let id = after("id")?.parse().ok()?;
            let name = after("name").map_or("?", |n| n).to_owned();
            Some((id, name))
        })
        .collect()
}

fn item(line: &str, why: &str) {
    println!("  {line}\n      -> {why}");
}

/// `show`'s eBPF part for one node: each attached program with its id, then every entry of
/// the maps with what it does.
pub async fn show_node(
    c: &Cluster,
    node: &Node,
    me: &NodeView,
    devices: Vec<String>,
) -> Result<()> {
    let pins = pins(&c.lab, &node.name)?;
    println!("eBPF programs (pins under {}):", pins.dir().display());
    let programs = attached(node, devices).await?;
    if programs.is_empty() {
        println!("  (none)");
    }
    for (dev, hook, id, name) in &programs {
        let why = match name.as_str() {
            PROGRAM => match me.pods.iter().find(|p| p.host_veth == *dev) {
                Some(pod) => format!(
                    "every packet pod {} sends: to a pod of this node straight into it \
                     (bpf_redirect_peer), to another node's block into the tunnel with that \
                     node's address as tunnel key, anything else on to the node's stack",
                    pod.name
                ),
                None => "from_pod on a veth that belongs to no pod of the lab".into(),
            },
            FROM_TUNNEL => "every packet other nodes send through the tunnel: of VNI \
                            1 to a pod of this node straight into it (bpf_redirect_peer), \
                            anything else to the node's stack"
                .into(),
            TO_TUNNEL => "what the node's own stack routes into the tunnel (the node \
                          talking to a remote pod, or answering one): sets the tunnel key \
                          of the destination's block from `remotes`"
                .into(),
            other => format!("program {other}: not cnikit's"),
        };
        item(&format!("{dev} {hook}: prog id {id} {name}"), &why);
    }
    println!("eBPF maps:");
    match pins.open_endpoints()? {
        None => println!("  endpoints: not pinned (no pod was added yet)"),
        Some(endpoints) => {
            let entries = endpoints.list()?;
            println!(
                "  endpoints ({} entries, written by the plugin on ADD):",
                entries.len()
            );
            for (ip, e) in entries {
                let pod = me.pods.iter().find(|p| p.ip == Some(ip.into()));
                let veth =
                    pod.map_or_else(|| format!("ifindex {}", e.ifindex), |p| p.host_veth.clone());
                item(
                    &format!(
                        "{ip} -> ifindex {} pod MAC {} host MAC {}",
                        e.ifindex,
                        mac(e.pod_mac),
                        mac(e.host_mac)
                    ),
                    &format!(
                        "packets to {ip} ({}) are delivered into the veth peer of {veth} by \
                         bpf_redirect_peer, TTL minus one",
                        pod.map_or("no pod of the lab", |p| p.name.as_str())
                    ),
                );
            }
        }
    }
    let tunnel = pins.read_tunnel()?.unwrap_or_default();
    if tunnel.ifindex == 0 {
        println!("  tunnel: no VXLAN device (the agent is not up, or not in ebpf mode)");
    } else {
        item(
            &format!("tunnel[0] = ifindex {} VNI {}", tunnel.ifindex, tunnel.vni),
            "the VXLAN device from_pod redirects remote traffic to, and the VNI it and \
             from_tunnel use (written by the agent)",
        );
    }
    if let Some(remotes) = pins.open_remotes()? {
        let entries = remotes.list()?;
        println!(
            "  remotes ({} entries, written by the agent's reconcile):",
            entries.len()
        );
        for (block, via) in entries {
            let owner = c
                .nodes
                .iter()
                .find(|n| n.address == std::net::IpAddr::V4(via))
                .map_or("an unknown node", |n| n.name.as_str());
            item(
                &format!("{block} -> {via}"),
                &format!(
                    "block {block} goes to {owner} through VNI {}: tunnel key remote {via}, \
                     out through the VXLAN device (UDP 4789)",
                    tunnel.vni
                ),
            );
        }
    }
    if let Some(counters) = pins.read_counters()? {
        println!("  counters (packets since the maps were made, all CPUs):");
        for c in Counter::ALL {
            let n = counters.get(c);
            if n > 0 {
                println!("    {n:>8}  {}", c.describe());
            }
        }
    }
    Ok(())
}

fn mac(m: [u8; 6]) -> String {
    cnikit::core::spec::HwAddr::from(m).to_string()
}

/// The `remotes` entries of `on` that send a block to `address` (a node that left).
pub fn traces(c: &Cluster, on: &Node, address: std::net::Ipv4Addr) -> Result<Vec<String>> {
    let Some(remotes) = pins(&c.lab, &on.name)?.open_remotes()? else {
        return Ok(Vec::new());
    };
    Ok(remotes
        .list()?
        .into_iter()
        .filter(|(_, via)| *via == address)
        .map(|(block, via)| format!("remotes entry {block} -> {via}"))
        .collect())
}

/// Removes the pins of a node that left the lab (its agent and pods are gone).
pub fn forget_node(lab: &Lab, node: &str) -> Result<()> {
    if lab.pod_network != state::PodNetwork::Ebpf {
        return Ok(());
    }
    pins(&lab.name, node)?.remove_all()?;
    Ok(())
}

/// Refuses a pod network other than `ebpf` with the `ebpf` mode.
pub fn check_pod_network(mode: &str, pod_network: state::PodNetwork) -> Result<()> {
    if mode == cnikit::ebpf::TYPE && pod_network != state::PodNetwork::Ebpf {
        bail!("--mode ebpf needs --pod-network ebpf (the default for it)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tc_filter_lines_give_ids_and_names() {
        let out = "filter protocol all pref 49152 bpf chain 0 \n\
                   filter protocol all pref 49152 bpf chain 0 handle 0x1 from_tunnel direct-action not_in_hw id 42 name from_tunnel tag 0123 jited\n";
        assert_eq!(tc_programs(out), vec![(42, "from_tunnel".to_owned())]);
    }
}
