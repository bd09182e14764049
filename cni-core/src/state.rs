//! The node state file: what the node agent tells the CNI plugin about its node.
//!
//! The agent writes `<dataDir>/node-state.json` once its routing mode is up and rewrites it
//! when something in it changes; the plugin reads it for the pod MTU and, for networks that
//! use a routing mode, STATUS reports "not ready" (code 50) until the file exists. Writes are
//! atomic (temporary file + rename), so a reader never sees half a file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Contents of the node state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    /// Node name.
    pub node: String,
    /// Routing mode the agent runs (`host-gw`, `vxlan`, …).
    pub mode: String,
    /// Pod MTU: underlay MTU minus the mode's encapsulation overhead.
    pub mtu: u32,
    /// Pod address blocks the node owns.
    pub blocks: Vec<IpNet>,
    /// Peers the agent knows, by name.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Peers the mode cannot route (a host-gw peer that is not on-link), with the reason.
    #[serde(default)]
    pub unroutable: BTreeMap<String, String>,
    /// What the routing mode reports of its own
    /// ([`CrossNodeRouting::report`](crate::routing::CrossNodeRouting::report)): BGP
    /// sessions and learned routes. Absent for modes with nothing to report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<serde_json::Value>,
}

impl NodeState {
    /// A state with no peers known yet.
    pub fn new(
        node: impl Into<String>,
        mode: impl Into<String>,
        mtu: u32,
        blocks: Vec<IpNet>,
    ) -> Self {
        NodeState {
            node: node.into(),
            mode: mode.into(),
            mtu,
            blocks,
            peers: Vec::new(),
            unroutable: BTreeMap::new(),
            routing: None,
        }
    }

    /// File name inside the data directory.
    pub const FILE: &'static str = "node-state.json";

    /// Path of the state file in `data_dir`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(Self::FILE)
    }

    /// Reads the state file; `Ok(None)` when there is none yet.
    /// Errors: 5 when it cannot be read, 6 when it does not decode.
    pub fn read(data_dir: &Path) -> Result<Option<NodeState>> {
        let path = Self::path(data_dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::Io {
                    what: format!("read {}", path.display()),
                    source: e,
                });
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Decode {
                what: "node state file",
                source: e,
            })
    }

    /// Writes the state file atomically (temporary file, then rename).
    pub fn write(&self, data_dir: &Path) -> Result<()> {
        let io = |what: String, source| Error::Io { what, source };
        crate::private_fs::create_dir_all(data_dir)
            .map_err(|e| io(format!("create {}", data_dir.display()), e))?;
        let path = Self::path(data_dir);
        let tmp = data_dir.join(format!(".{}.{}", Self::FILE, std::process::id()));
        // Serializing a struct of strings, numbers and prefixes cannot fail.
        let bytes = serde_json::to_vec_pretty(self).expect("NodeState serializes");
        crate::private_fs::write(&tmp, &bytes)
            .map_err(|e| io(format!("write {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io(format!("rename to {}", path.display()), e))
    }

    /// Removes the state file (on agent shutdown). `Ok` when there is none.
    pub fn remove(data_dir: &Path) -> Result<()> {
        let path = Self::path(data_dir);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::Io {
                what: format!("remove {}", path.display()),
                source: e,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_absent_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(NodeState::read(dir.path()).unwrap(), None);
        let state = NodeState {
            node: "n1".into(),
            mode: "vxlan".into(),
            mtu: 1450,
            blocks: vec!["10.244.1.0/26".parse().unwrap()],
            peers: vec!["n2".into()],
            unroutable: BTreeMap::new(),
            routing: Some(serde_json::json!({"peers": [{"name": "n2"}]})),
        };
        state.write(dir.path()).unwrap();
        assert_eq!(NodeState::read(dir.path()).unwrap(), Some(state));
        NodeState::remove(dir.path()).unwrap();
        NodeState::remove(dir.path()).unwrap();
        assert_eq!(NodeState::read(dir.path()).unwrap(), None);
    }

    #[test]
    fn state_file_and_its_directory_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("data");
        NodeState::new("n1", "host-gw", 1500, vec![])
            .write(&data_dir)
            .unwrap();
        for path in [data_dir.clone(), NodeState::path(&data_dir)] {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", path.display());
        }
    }
}
