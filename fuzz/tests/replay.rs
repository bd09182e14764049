//! Replays the seed corpora (`corpus/TARGET/`) and every input a campaign found a crash
//! or hang with (`regressions/TARGET/`) through their targets: a plain, quick `cargo test`
//! that keeps every fixed crash fixed. The campaigns themselves run with `scripts/fuzz.sh`.

use std::path::Path;

fn replay(target: &str, run: cnikit_fuzz::Target) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seeds = 0;
    for kind in ["corpus", "regressions"] {
        let dir = root.join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<_> = entries.map(|e| e.expect("dir entry").path()).collect();
        paths.sort();
        for path in paths {
            let data = std::fs::read(&path).expect("readable input");
            eprintln!("{target}: {}", path.display());
            run(&data);
            if kind == "corpus" {
                seeds += 1;
            }
        }
    }
    assert!(
        seeds > 0,
        "no seed corpus for {target}: run `cargo run -p cnikit-fuzz --example seeds`"
    );
}

#[test]
fn netconf() {
    replay("netconf", cnikit_fuzz::netconf);
}

#[test]
fn conflist() {
    replay("conflist", cnikit_fuzz::conflist);
}

#[test]
fn env() {
    replay("env", cnikit_fuzz::env);
}

#[test]
fn result() {
    replay("result", cnikit_fuzz::result);
}

#[test]
fn store_file() {
    replay("store_file", cnikit_fuzz::store_file);
}

#[test]
fn store_records() {
    replay("store_records", cnikit_fuzz::store_records);
}

#[test]
fn node_records() {
    replay("node_records", cnikit_fuzz::node_records);
}

#[test]
fn bgp() {
    replay("bgp", cnikit_fuzz::bgp);
}
