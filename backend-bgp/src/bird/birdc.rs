//! What `birdc show protocols all` says, as [`PeerSummary`]s. Pure.

use crate::speaker::PeerSummary;

use super::render::peer_name;

/// The BGP sessions in the output of `birdc show protocols all`, by BIRD's protocol, as the
/// native speaker reports them: the state in RFC 4271's words (`established`, `active`,
/// …), the epoch second it came up (`timeformat protocol "%s"`), the negotiated hold time,
/// prefixes exported and imported, and BIRD's last error. Protocols that are not ours are
/// left out.
pub fn parse_protocols(output: &str) -> Vec<PeerSummary> {
    let mut peers = Vec::new();
    let mut current: Option<(PeerSummary, bool)> = None;
    for line in output.lines() {
        if !line.starts_with(' ') && !line.is_empty() {
            // A protocol's header line: `NAME PROTO TABLE STATE SINCE INFO`.
            peers.extend(current.take().map(|(p, _)| p));
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let [name, "BGP", _table, _state, since, ..] = fields[..]
                && let Some(peer) = peer_name(name)
            {
                current = Some((
                    PeerSummary {
                        name: peer,
                        state: "idle".into(),
                        established_at: since.parse().ok(),
                        ..PeerSummary::default()
                    },
                    false,
                ));
            }
            continue;
        }
        let Some((peer, _)) = current.as_mut() else {
            continue;
        };
        let Some((key, value)) = line.trim().split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "BGP state" => peer.state = rfc_state(value).into(),
            "Neighbor address" => peer.address = value.parse().ok(),
            "Neighbor AS" => peer.as_number = value.parse().unwrap_or_default(),
            "Hold timer" => {
                // `ELAPSED/NEGOTIATED`
                peer.hold_time = value.rsplit('/').next().and_then(|h| h.parse().ok());
            }
            "Last error" => peer.last_error = Some(value.to_owned()),
            "Routes" => {
                // `1 imported, 1 exported, 1 preferred`
                for part in value.split(',') {
                    let mut words = part.split_whitespace();
                    let n = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                    match words.next() {
                        Some("imported") => peer.prefixes_received = n,
                        Some("exported") => peer.prefixes_sent = n,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    peers.extend(current.map(|(p, _)| p));
    for p in &mut peers {
        if p.state != "established" {
            // `Since` is when the protocol last changed state, not an uptime.
            p.established_at = None;
            p.hold_time = None;
        }
    }
    peers
}

/// BIRD's BGP state in the words of RFC 4271 (as [`PeerSummary::state`]).
fn rfc_state(bird: &str) -> &'static str {
    match bird.split_whitespace().next().unwrap_or_default() {
        "Established" => "established",
        "Connect" => "connect",
        "Active" => "active",
        "OpenSent" => "open_sent",
        "OpenConfirm" => "open_confirm",
        _ => "idle",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "\
BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
device1    Device     ---        up     1796454696    
cnikit_blocks Static     master4    up     1796454696    
peer_b     BGP        ---        up     1796454701    Established   
  BGP state:          Established
    Neighbor address: 192.168.70.12
    Neighbor AS:      64512
    Local AS:         64512
    Neighbor ID:      192.168.70.12
    Session:          internal multihop AS4
    Source address:   192.168.70.11
    Hold timer:       7.512/9
    Keepalive timer:  1.337/3
  Channel ipv4
    State:          UP
    Table:          master4
    Preference:     100
    Input filter:   ACCEPT
    Output filter:  cnikit_blocks_only
    Routes:         2 imported, 1 exported, 2 preferred

peer_node_2dc BGP        ---        start  1796454696    Active        Socket: Connection refused
  BGP state:          Active
    Neighbor address: 192.168.70.13
    Neighbor AS:      65000
    Local AS:         64512
    Connect delay:    0.512/1
    Last error:       Socket: Connection refused
  Channel ipv4
    State:          DOWN
    Table:          master4
    Preference:     100
    Input filter:   ACCEPT
    Output filter:  cnikit_blocks_only
";

    #[test]
    fn sessions_are_read_as_the_native_speaker_reports_them() {
        let peers = parse_protocols(OUTPUT);
        assert_eq!(
            peers,
            vec![
                PeerSummary {
                    name: "b".into(),
                    address: Some("192.168.70.12".parse().unwrap()),
                    as_number: 64512,
                    state: "established".into(),
                    established_at: Some(1796454701),
                    hold_time: Some(9),
                    prefixes_sent: 1,
                    prefixes_received: 2,
                    last_error: None,
                },
                PeerSummary {
                    name: "node-c".into(),
                    address: Some("192.168.70.13".parse().unwrap()),
                    as_number: 65000,
                    state: "active".into(),
                    established_at: None,
                    hold_time: None,
                    prefixes_sent: 0,
                    prefixes_received: 0,
                    last_error: Some("Socket: Connection refused".into()),
                },
            ]
        );
        assert_eq!(parse_protocols(""), vec![]);
        assert_eq!(parse_protocols("garbage\n  BGP state: Established"), vec![]);
    }
}
