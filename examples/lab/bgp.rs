//! What `show` and `status` say about a `bgp` node: its sessions and the routes they
//! brought, read from the `routing` report the agent writes into the node state file.

use std::time::Duration;

use cnikit::bgp::{Engine, PeerSummary, Report};
use cnikit::core::state::NodeState;

/// The BGP report in a node state, if the node runs the `bgp` mode and its speaker is up.
pub fn report(state: &NodeState) -> Option<Report> {
    serde_json::from_value(state.routing.clone()?).ok()
}

/// One session as `birdc show protocols` would sum it up: `node2 172.30.1.12 AS 64512
/// established 12s, hold 90 s, prefixes sent 1 received 1`.
pub fn session_line(p: &PeerSummary) -> String {
    let address = p
        .address
        .map(|a| a.to_string())
        .unwrap_or_else(|| "?".into());
    let since = match p.uptime() {
        Some(up) if p.state == "established" => format!(" for {}", uptime(up)),
        _ => String::new(),
    };
    let hold = p
        .hold_time
        .map(|h| format!(", hold {h} s"))
        .unwrap_or_default();
    format!(
        "{} {address} AS {} {}{since}{hold}, prefixes sent {} received {}",
        p.name, p.as_number, p.state, p.prefixes_sent, p.prefixes_received
    )
}

/// Which side of a lab's iBGP topology each end of a session is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Full mesh: no route reflectors.
    Mesh,
    /// This node is a route reflector; `peer_reflects`: so is the peer.
    Reflector {
        /// The peer is a route reflector too.
        peer_reflects: bool,
    },
    /// This node is a route-reflector client (the peer is a reflector).
    Client,
}

/// What a session means for this node (`role`: in the lab's iBGP topology).
pub fn session_why(
    p: &PeerSummary,
    engine: Engine,
    local_as: u32,
    connect_retry: u16,
    role: Role,
) -> String {
    let (proto, speaker) = match engine {
        Engine::Bird => ("bird", "BIRD"),
        _ => ("107", "the speaker"),
    };
    let kind = match (p.as_number == local_as, role) {
        (false, _) => {
            "eBGP (another AS: a router outside the cluster; it gets this node's \
                       blocks, and what it announces would be installed)"
        }
        (true, Role::Mesh) => {
            "iBGP (same AS; full mesh, so every node has a session with every other)"
        }
        (
            true,
            Role::Reflector {
                peer_reflects: false,
            },
        ) => {
            "iBGP to a route-reflector client (this node is a route reflector, cluster id \
             244.0.0.1: it reflects every block the client announces to its other peers, and \
             the others' blocks to the client, NEXT_HOP unchanged)"
        }
        (
            true,
            Role::Reflector {
                peer_reflects: true,
            },
        ) => {
            "iBGP between two route reflectors (non-clients of each other: each hears the \
             other's own blocks; what one reflects carries their shared cluster id and the \
             other drops it, it has those clients itself)"
        }
        (true, Role::Client) => {
            "iBGP to a route reflector (a client peers with the reflectors only, not with \
             every node: through them come the blocks of every other node, NEXT_HOP still \
             the node that owns the block)"
        }
    };
    if p.state == "established" {
        let address = p
            .address
            .map(|a| a.to_string())
            .unwrap_or_else(|| "PEER".into());
        let (heard, via) = if p.as_number == local_as && role != Role::Mesh {
            (
                format!("heard of {} block(s) through it", p.prefixes_received),
                "NEXT_HOP".to_owned(),
            )
        } else {
            (
                format!("heard of {} of {}'s", p.prefixes_received, p.name),
                address,
            )
        };
        let told = match role {
            Role::Reflector { .. } if p.as_number == local_as => format!(
                "told {} of {} block(s), its own and the ones it reflects,",
                p.name, p.prefixes_sent
            ),
            _ => format!("told {} about its {} block(s)", p.name, p.prefixes_sent),
        };
        return format!(
            "{kind}: this node {told} and {heard}; each block heard is a route below `BLOCK \
             via {via} dev eth0 proto {proto}`, there as long as this session carries it"
        );
    }
    format!(
        "{kind}, NOT established (state {}): no route to {}'s pods until it is; {speaker} \
         tries again every {connect_retry} s{}",
        p.state,
        p.name,
        p.last_error
            .as_ref()
            .map(|e| format!("; last error: {e}"))
            .unwrap_or_default()
    )
}

/// The peer that brought `dst via gw` into the kernel, according to the report.
pub fn learned_from<'r>(report: &'r Report, dst: &str, gw: &str) -> Option<&'r str> {
    let route = format!("{dst} via {gw}");
    report
        .installed
        .iter()
        .find(|(_, routes)| routes.contains(&route))
        .map(|(peer, _)| peer.as_str())
}

/// `1h02m`, `3m05s`, `12s`.
fn uptime(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(state: &str) -> PeerSummary {
        PeerSummary {
            name: "node2".into(),
            address: Some("172.30.1.12".parse().unwrap()),
            as_number: 64512,
            state: state.into(),
            established_at: Some(0),
            hold_time: Some(90),
            prefixes_sent: 1,
            prefixes_received: 2,
            last_error: Some("connection refused".into()),
        }
    }

    #[test]
    fn a_session_is_one_line_with_its_counts() {
        let line = session_line(&peer("established"));
        assert!(
            line.starts_with("node2 172.30.1.12 AS 64512 established for "),
            "{line}"
        );
        assert!(
            line.ends_with(", hold 90 s, prefixes sent 1 received 2"),
            "{line}"
        );
        let why = session_why(&peer("established"), Engine::Native, 64512, 1, Role::Mesh);
        assert!(why.starts_with("iBGP (same AS; full mesh"), "{why}");
        assert!(why.contains("via 172.30.1.12 dev eth0 proto 107"), "{why}");
        assert!(why.contains("heard of 2 of node2's"), "{why}");
        let why = session_why(&peer("established"), Engine::Bird, 64512, 1, Role::Mesh);
        assert!(why.contains("via 172.30.1.12 dev eth0 proto bird"), "{why}");
        let why = session_why(&peer("established"), Engine::Native, 64512, 1, Role::Client);
        assert!(why.starts_with("iBGP to a route reflector"), "{why}");
        assert!(why.contains("heard of 2 block(s) through it"), "{why}");
        assert!(why.contains("via NEXT_HOP dev eth0"), "{why}");
        let why = session_why(
            &peer("established"),
            Engine::Native,
            64512,
            1,
            Role::Reflector {
                peer_reflects: false,
            },
        );
        assert!(why.starts_with("iBGP to a route-reflector client"), "{why}");
        assert!(why.contains("told node2 of 1 block(s), its own and the ones it reflects"));
        let why = session_why(&peer("established"), Engine::Native, 65000, 1, Role::Client);
        assert!(why.starts_with("eBGP"), "{why}");
        let down = session_why(&peer("active"), Engine::Bird, 64512, 1, Role::Mesh);
        assert!(down.contains("BIRD tries again every 1 s"), "{down}");
        let down = session_why(&peer("active"), Engine::Native, 64512, 1, Role::Mesh);
        assert!(down.contains("NOT established (state active)"), "{down}");
        assert!(down.contains("last error: connection refused"), "{down}");
        assert!(!session_line(&peer("active")).contains(" for "));
    }

    #[test]
    fn uptime_is_short() {
        assert_eq!(uptime(Duration::from_secs(12)), "12s");
        assert_eq!(uptime(Duration::from_secs(185)), "3m05s");
        assert_eq!(uptime(Duration::from_secs(3720)), "1h02m");
    }

    #[test]
    fn a_route_is_traced_to_its_peer() {
        let report = Report {
            engine: Default::default(),
            as_number: 64512,
            router_id: "172.30.1.11".parse().unwrap(),
            listen: "172.30.1.11:179".into(),
            peers: vec![peer("established")],
            installed: [(
                "node2".to_owned(),
                vec!["10.244.0.64/26 via 172.30.1.12".to_owned()],
            )]
            .into(),
            unroutable: Default::default(),
        };
        assert_eq!(
            learned_from(&report, "10.244.0.64/26", "172.30.1.12"),
            Some("node2")
        );
        assert_eq!(learned_from(&report, "10.244.0.64/26", "172.30.1.13"), None);
    }
}
