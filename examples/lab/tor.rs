//! `--tor`: a top-of-rack router outside the cluster. A namespace `cnkl-<lab>-tor` on the
//! first segment (`172.30.1.254`) runs BIRD 2 in AS [`TOR_AS`]; the lab renders its
//! configuration with one eBGP session per node (the nodes have it as their global peer)
//! and reloads it (`birdc configure`) when nodes come and go. It learns every node's blocks
//! and installs them in its own kernel; it announces nothing back, so the nodes' routes
//! between themselves stay the ones iBGP brought.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cnikit::bgp::PeerSummary;
use tokio::process::Command;

use crate::net::{self, NODE_NIC, UNDERLAY_BRIDGE};
use crate::state::{Lab, Tor};
use crate::up::which;
use crate::{STOP_GRACE, procs};

/// The AS of the top-of-rack router (the nodes are in [`crate::modes::BGP_AS`]).
pub const TOR_AS: u32 = 65000;
/// The name the nodes report their session with the router under.
pub const TOR_PEER: &str = "tor";

/// How long BIRD may take to answer on its socket.
const PATIENCE: Duration = Duration::from_secs(10);

/// The router's files: `<state dir>/tor/`.
fn dir(lab: &Lab) -> PathBuf {
    lab.dir().join("tor")
}

/// BIRD's control socket.
pub fn socket(lab: &Lab) -> PathBuf {
    dir(lab).join("bird.ctl")
}

fn conf(lab: &Lab) -> PathBuf {
    dir(lab).join("bird.conf")
}

/// The router's record for `lab`: namespace and address on the first segment.
pub fn plan(lab: &Lab) -> Tor {
    Tor {
        ns: lab.ns("tor"),
        address: lab.underlays[0].tor(),
        as_number: TOR_AS,
        proc: None,
    }
}

/// Builds the router's namespace, plugged into the first segment's bridge (`tor` there,
/// `eth0` inside).
pub async fn build(lab: &Lab) -> Result<()> {
    let tor = lab
        .tor
        .as_ref()
        .context("the lab has no top-of-rack router")?;
    let underlay = &lab.underlays[0].ns;
    net::create_ns(&tor.ns).await?;
    net::ip(
        underlay,
        &[
            "link", "add", "tor", "type", "veth", "peer", "name", NODE_NIC, "netns", &tor.ns,
        ],
    )
    .await?;
    net::ip(underlay, &["link", "set", "tor", "master", UNDERLAY_BRIDGE]).await?;
    net::ip(underlay, &["link", "set", "tor", "up"]).await?;
    let addr = format!("{}/24", tor.address);
    net::ip(&tor.ns, &["addr", "add", &addr, "dev", NODE_NIC]).await?;
    net::ip(&tor.ns, &["link", "set", NODE_NIC, "up"]).await?;
    std::fs::create_dir_all(dir(lab))?;
    Ok(())
}

/// The router's `bird.conf`: one eBGP session per node, import everything, export nothing;
/// what it learns goes into its kernel.
pub fn render(lab: &Lab, tor: &Tor) -> String {
    let mut c = format!(
        "# cnikit lab {}: the top-of-rack router, rendered by the lab (one session per node).\n\
         router id {rid};\n\
         log stderr {{ warning, error, bug }};\n\
         timeformat protocol \"%s\";\n\
         \n\
         protocol device {{ scan time 2; }}\n\
         protocol kernel {{ ipv4 {{ import none; export all; }}; }}\n\
         \n\
         template bgp lab_node {{\n    \
             local {rid} as {asn};\n    \
             connect delay time 1;\n    \
             connect retry time 1;\n    \
             error wait time 1, 8;\n    \
             ipv4 {{ import all; export none; }};\n\
         }}\n",
        lab.name,
        rid = tor.address,
        asn = tor.as_number,
    );
    for node in &lab.nodes {
        c.push_str(&format!(
            "\nprotocol bgp {} from lab_node {{ neighbor {} as {}; }}\n",
            cnikit::bgp::bird::protocol_name(&node.name),
            node.address,
            crate::modes::BGP_AS
        ));
    }
    c
}

/// Writes the configuration for the nodes the lab has now; starts BIRD the first time,
/// else has it reload (`birdc configure`: sessions of nodes still there stay up).
pub async fn sync(lab: &mut Lab) -> Result<()> {
    let Some(tor) = lab.tor.clone() else {
        return Ok(());
    };
    let path = conf(lab);
    std::fs::write(&path, render(lab, &tor))
        .with_context(|| format!("write {}", path.display()))?;
    if tor.proc.is_some() {
        let out = birdc(lab, &["configure"]).await?;
        if !out.contains("Reconfigured") && !out.contains("Reconfiguration in progress") {
            bail!(
                "the top-of-rack BIRD refused its new configuration: {}",
                out.trim()
            );
        }
        return Ok(());
    }
    let bird = which("bird")?;
    let path_arg = path.display().to_string();
    let socket = socket(lab).display().to_string();
    let pid = dir(lab).join("bird.pid").display().to_string();
    let log = dir(lab).join("bird.log");
    let (proc, mut child) = procs::spawn_in_netns(
        &tor.ns,
        &bird,
        ["-f", "-c", &path_arg, "-s", &socket, "-P", &pid],
        &log,
        &path_arg,
    )?;
    if let Some(t) = lab.tor.as_mut() {
        t.proc = Some(proc);
    }
    lab.save()?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the top-of-rack BIRD exited ({status}): {}",
                procs::log_tail(&log, 10)
            );
        }
        if birdc(lab, &["show", "status"])
            .await
            .is_ok_and(|o| o.contains("Daemon is up and running"))
        {
            return Ok(());
        }
        if started.elapsed() > PATIENCE {
            bail!("the top-of-rack BIRD does not answer on {socket}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops the router's BIRD (SIGTERM: it closes its sessions) and checks that its socket
/// went with it.
pub async fn stop(lab: &Lab, problems: &mut Vec<String>) {
    let Some(proc) = lab.tor.as_ref().and_then(|t| t.proc.as_ref()) else {
        return;
    };
    match procs::stop(proc, STOP_GRACE).await {
        Ok(procs::Stopped::Terminated(after)) => println!(
            "top-of-rack BIRD (pid {}) stopped after {} ms",
            proc.pid,
            after.as_millis()
        ),
        Ok(procs::Stopped::AlreadyGone) => {
            println!("top-of-rack BIRD (pid {}) was not running", proc.pid)
        }
        Ok(procs::Stopped::Killed) => problems.push(format!(
            "top-of-rack BIRD (pid {}) ignored SIGTERM: killed",
            proc.pid
        )),
        Err(e) => problems.push(format!("stopping the top-of-rack BIRD: {e:#}")),
    }
    let _ = std::fs::remove_file(socket(lab));
}

/// Runs `birdc -s SOCKET ARGS…` (inside no namespace: the socket is a file).
async fn birdc(lab: &Lab, args: &[&str]) -> Result<String> {
    let out = tokio::time::timeout(
        PATIENCE,
        Command::new(which("birdc")?)
            .arg("-s")
            .arg(socket(lab))
            .args(args)
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .context("birdc: no answer")?
    .context("run birdc")?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(text)
}

/// The router's sessions, one per node, as the nodes' own are reported.
pub async fn sessions(lab: &Lab) -> Result<Vec<PeerSummary>> {
    Ok(cnikit::bgp::bird::parse_protocols(
        &birdc(lab, &["show", "protocols", "all"]).await?,
    ))
}

/// A route in the router's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The prefix.
    pub dst: String,
    /// The node whose session brought it.
    pub from: String,
    /// Its next hop.
    pub via: String,
    /// The AS path, as BIRD prints it (`[AS64512i]`).
    pub path: String,
    /// BIRD's best route for the prefix (the one in the kernel).
    pub best: bool,
}

/// The router's table (`birdc show route`).
pub async fn routes(lab: &Lab) -> Result<Vec<Route>> {
    Ok(parse_routes(&birdc(lab, &["show", "route"]).await?))
}

/// The routes of `birdc show route` (BIRD 2): `PREFIX unicast [PROTO SINCE] * (PREF)
/// [ASPATH]` lines, each followed by `\tvia GW on DEV`; a further route of the same prefix
/// starts with blanks. Routes of protocols that are not a node's are left out.
pub fn parse_routes(output: &str) -> Vec<Route> {
    let mut routes: Vec<Route> = Vec::new();
    let mut prefix = String::new();
    for line in output.lines() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("via ") {
            if let Some(last) = routes.last_mut()
                && last.via.is_empty()
            {
                last.via = rest.split_whitespace().next().unwrap_or("").to_owned();
            }
            continue;
        }
        let Some(open) = trimmed.find('[') else {
            continue;
        };
        if !line.starts_with(char::is_whitespace) {
            prefix = trimmed.split_whitespace().next().unwrap_or("").to_owned();
        }
        let inside = &trimmed[open + 1..];
        let proto = inside.split_whitespace().next().unwrap_or("");
        let Some(from) = cnikit::bgp::bird::peer_name(proto) else {
            continue;
        };
        let path = inside
            .rfind('[')
            .map(|i| inside[i..].trim().to_owned())
            .unwrap_or_default();
        routes.push(Route {
            dst: prefix.clone(),
            from,
            via: String::new(),
            path,
            best: inside.contains(" * "),
        });
    }
    routes
}

/// `show`'s section: each session and each learned route in one line, with what it means.
pub async fn print(lab: &Lab) {
    let Some(tor) = &lab.tor else {
        return;
    };
    println!(
        "== top-of-rack router ({}, {} on the first segment, BIRD 2, AS {}) ==",
        tor.ns, tor.address, tor.as_number
    );
    println!(
        "  outside the cluster: every node has it as a global peer (eBGP, AS {} -> AS {}); \
         it learns every block and announces nothing back",
        crate::modes::BGP_AS,
        tor.as_number
    );
    match sessions(lab).await {
        Ok(peers) => {
            println!("  sessions ({}):", peers.len());
            for p in &peers {
                let why = if p.state == "established" {
                    format!(
                        "eBGP: {} told the router about its {} block(s); it sends nothing back",
                        p.name, p.prefixes_received
                    )
                } else {
                    format!(
                        "NOT established (state {}): the router knows none of {}'s blocks{}",
                        p.state,
                        p.name,
                        p.last_error
                            .as_ref()
                            .map(|e| format!("; last error: {e}"))
                            .unwrap_or_default()
                    )
                };
                println!("    {}  -> {why}", crate::bgp::session_line(p));
            }
        }
        Err(e) => println!("  sessions: cannot ask its BIRD: {e:#}"),
    }
    match routes(lab).await {
        Ok(routes) => {
            println!("  table ({} routes):", routes.len());
            for r in &routes {
                println!(
                    "    {} via {}  -> {}'s block, learned over eBGP from {} (AS path {}){}",
                    r.dst,
                    r.via,
                    r.from,
                    r.from,
                    r.path,
                    if r.best {
                        "; best, so in the router's kernel (proto bird)"
                    } else {
                        "; not the best of its prefix"
                    }
                );
            }
        }
        Err(e) => println!("  table: cannot ask its BIRD: {e:#}"),
    }
}

/// Waits until the router has every block of every node (the blocks the agents wrote into
/// their node state) via that node: its sessions are up and carried them.
pub async fn wait_learned(lab: &Lab, within: Duration) -> Result<()> {
    if lab.tor.is_none() {
        return Ok(());
    }
    let started = Instant::now();
    loop {
        let table = routes(lab).await?;
        let mut missing = Vec::new();
        for node in &lab.nodes {
            let blocks = cnikit::core::state::NodeState::read(&node.data_dir())?
                .map(|s| s.blocks)
                .unwrap_or_default();
            let via = node.address.to_string();
            for block in blocks {
                let dst = block.to_string();
                if !table.iter().any(|r| r.dst == dst && r.via == via) {
                    missing.push(format!("{dst} of {}", node.name));
                }
            }
        }
        if missing.is_empty() {
            println!(
                "the top-of-rack router learned every block in {} ms",
                started.elapsed().as_millis()
            );
            return Ok(());
        }
        if started.elapsed() > within {
            bail!(
                "the top-of-rack router lacks {} after {within:?}",
                missing.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the router holds no route via `address` (a removed node); how long it took.
pub async fn forgotten(lab: &Lab, address: &str, within: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let left: Vec<String> = routes(lab)
            .await?
            .into_iter()
            .filter(|r| r.via == address)
            .map(|r| format!("{} via {}", r.dst, r.via))
            .collect();
        if left.is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            bail!(
                "the top-of-rack router still has {} after {within:?}",
                left.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_read_from_birdc() {
        let out = "BIRD 2.0.12 ready.\nTable master4:\n\
            10.244.0.0/26        unicast [peer_node1 1733390000] * (100) [AS64512i]\n\
            \tvia 172.30.1.11 on eth0\n\
            10.244.0.64/26       unicast [peer_node2 1733390000] * (100) [AS64512i]\n\
            \tvia 172.30.1.12 on eth0\n\
            \x20                    unicast [peer_node3 1733390001] (100) [AS64512i]\n\
            \tvia 172.30.1.13 on eth0\n";
        let routes = parse_routes(out);
        assert_eq!(routes.len(), 3);
        assert_eq!(
            routes[0],
            Route {
                dst: "10.244.0.0/26".into(),
                from: "node1".into(),
                via: "172.30.1.11".into(),
                path: "[AS64512i]".into(),
                best: true,
            }
        );
        assert_eq!(routes[2].dst, "10.244.0.64/26");
        assert_eq!(routes[2].from, "node3");
        assert!(!routes[2].best);
    }
}
