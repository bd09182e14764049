//! What the plugin writes on a node is not readable by other users: the data directory, the
//! block IPAM's file store and the log file, created by an ADD through the binary.
//!
//! Needs root (the plugin runs in a node namespace of the test).
#![cfg(feature = "bridge")]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use serde_json::json;

/// Every file and directory under `root` (itself included) whose mode lets group or others
/// in, with its mode.
fn open_to_others(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(path) = todo.pop() {
        let meta = std::fs::symlink_metadata(&path).expect("stat");
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            found.push(format!("{} {mode:o}", path.display()));
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).expect("list") {
                todo.push(entry.expect("entry").path());
            }
        }
    }
    found
}

#[test]
fn data_dir_store_and_log_are_private() {
    let Some(env) = Env::get("data_dir_store_and_log_are_private") else {
        return;
    };
    let lab = Lab::new("perm");
    let node = lab.node();
    let pod = lab.pod("p1");
    let rt = Runtime::new(&env, &lab, &node);
    // Directories the plugin has to create itself, under a directory the test made.
    let data = lab.path("var/lib/cni/cnikit/perm");
    let log = lab.dir("log").join("cnikit.log");
    let conf = json!({
        "cniVersion": "1.1.0",
        "name": "perm",
        "type": "cnikit",
        "podNetwork": "bridge",
        "bridge": "permbr0",
        "dataDir": data,
        "nodeName": "node-p",
        "logFile": log,
        "logLevel": "debug",
        "ipam": {"type": "cnikit-ipam", "pool": "10.244.160.0/24", "blockSize": 26}
    });
    rt.add("c1", &pod, &conf);
    assert!(log.is_file(), "the plugin wrote its log");
    assert!(
        data.join("ipam").is_dir(),
        "the store is under the data directory"
    );
    let mut open = open_to_others(&lab.path("var/lib/cni/cnikit"));
    open.extend(open_to_others(&log));
    rt.del("c1", Some(&pod.path), &conf);
    assert!(open.is_empty(), "readable by other users: {open:#?}");
}
