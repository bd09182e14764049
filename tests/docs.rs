//! The documentation keeps up with the code: the README's layout table has a row for every
//! crate of the workspace, and the key layout in the ipam-etcd crate docs lists every key
//! the block IPAM engine writes (the engine's own table, in `cni-core/src/ipam/block.rs`,
//! is the reference).

use std::path::Path;

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The `members` of `[workspace]` in the root `Cargo.toml`.
fn workspace_members() -> Vec<String> {
    let manifest = read("Cargo.toml");
    let start = manifest
        .find("\nmembers")
        .expect("a members list in [workspace]");
    let list = manifest[start..]
        .split_once('[')
        .and_then(|(_, rest)| rest.split_once(']'));
    let (items, _) = list.expect("members = [ … ]");
    items
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_owned())
        .filter(|m| !m.is_empty())
        .collect()
}

#[test]
fn the_readme_layout_has_every_crate() {
    let readme = read("README.md");
    let layout = readme
        .split_once("## Layout")
        .map(|(_, rest)| rest.split("\n## ").next().unwrap_or(rest))
        .expect("a Layout section in the README");
    let members = workspace_members();
    assert!(members.len() >= 4, "{members:?}");
    let missing: Vec<&String> = members
        .iter()
        .filter(|m| !layout.contains(&format!("| `{m}/` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "crates without a row in the README's layout table: {missing:?}"
    );
}

/// The keys of the block IPAM engine's table: `<prefix>/…` in the first column.
fn engine_keys() -> Vec<String> {
    read("cni-core/src/ipam/block.rs")
        .lines()
        .filter_map(|l| l.strip_prefix("//! | `<prefix>/"))
        .filter_map(|rest| {
            rest.split_once('`')
                .map(|(key, _)| format!("<prefix>/{key}"))
        })
        .collect()
}

#[test]
fn the_ipam_etcd_key_layout_has_every_engine_key() {
    let keys = engine_keys();
    assert!(
        keys.len() >= 7,
        "the engine's key table was not found: {keys:?}"
    );
    let docs = read("ipam-etcd/src/lib.rs");
    let layout = docs
        .split_once("## Key layout")
        .map(|(_, rest)| rest.split("\n//! ## ").next().unwrap_or(rest))
        .expect("a Key layout section in the ipam-etcd docs");
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| !layout.contains(k.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "keys the engine writes that the ipam-etcd key layout does not list: {missing:?}"
    );
}
