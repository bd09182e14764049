//! Who peers with whom: the same for both engines.

use std::collections::BTreeMap;
use std::net::IpAddr;

use cni_core::registry::NodeRecord;

use crate::backend::ROUTE_REFLECTOR_KEY;
use crate::config::Config;
use crate::speaker::Neighbor;

/// The sessions node `local_name` keeps, by peer name, and the peers it cannot peer with
/// (with why). Pure.
///
/// A full mesh until some node is a route reflector; then nodes peer with the reflectors
/// only, and reflectors with everyone (the others are their clients). Global peers always.
pub(crate) fn neighbors(
    config: &Config,
    local_name: &str,
    peers: &[NodeRecord],
) -> (BTreeMap<String, Neighbor>, BTreeMap<String, String>) {
    let mut wanted = BTreeMap::new();
    let mut unusable = BTreeMap::new();
    let reflector = |p: &NodeRecord| p.backend.contains_key(ROUTE_REFLECTOR_KEY);
    let others = || peers.iter().filter(|p| p.name != local_name);
    let local_reflects = config.route_reflector_cluster_id.is_some();
    let mesh = !local_reflects && !others().any(reflector);
    for peer in others() {
        if !config.node_to_node_mesh || (!mesh && !local_reflects && !reflector(peer)) {
            continue;
        }
        match peer.address {
            IpAddr::V4(address) => {
                let neighbor = Neighbor {
                    address,
                    as_number: config.as_number,
                    client: local_reflects && !reflector(peer),
                };
                wanted.insert(peer.name.clone(), neighbor);
            }
            IpAddr::V6(v6) => {
                unusable.insert(
                    peer.name.clone(),
                    format!("{v6} is IPv6: the speaker peers over IPv4 only"),
                );
            }
        }
    }
    for global in &config.global_peers {
        let neighbor = Neighbor {
            address: global.address,
            as_number: global.as_number,
            client: false,
        };
        wanted.insert(global.name(), neighbor);
    }
    (wanted, unusable)
}
