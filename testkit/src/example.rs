//! The example binaries the end-to-end tests and benchmarks run, found next to the running
//! binary, and refused when they are older than the sources they are built from.
//!
//! `cargo test --test NAME` builds only that test and `cargo run --example NAME` only that
//! example: the others keep whatever code they were last built with, and a test of a stale
//! binary tests old code.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// `<target>/<profile>/examples` of the running binary: a test lies in
/// `<target>/<profile>/deps`, an example in `<target>/<profile>/examples`, so both find it
/// one level up.
pub fn examples_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the running binary");
    exe.parent()
        .and_then(Path::parent)
        .expect("the binary lies in <target>/<profile>/<dir>")
        .join("examples")
}

/// The sources the example binary `name` of the root crate is built from: its own file
/// `examples/<name>.rs` or directory `examples/<name>/`, and the `src/` of the workspace root
/// and of every member crate except this one. Each is code cargo rebuilds the binary for when
/// it changes; tests, other examples and manifests are left out, so a change to them never
/// makes a binary look stale when cargo would not rebuild it.
pub fn sources_of(name: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lies in the workspace root")
        .to_path_buf();
    let examples = root.join("examples");
    let mut sources = vec![
        examples.join(format!("{name}.rs")),
        examples.join(name),
        root.join("src"),
    ];
    let crates = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|d| d.join("Cargo.toml").is_file() && !d.ends_with("testkit"));
    sources.extend(crates.map(|d| d.join("src")));
    sources
}

/// The newest modification time of `path`, a file or a directory walked recursively (only
/// files count); `None` when nothing can be read.
fn newest(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .flatten()
        .filter_map(|e| newest(&e.path()))
        .max()
}

/// Whether `binary` is older than the newest of `sources` (files, or directories walked
/// recursively). `false` when the binary cannot be read.
///
/// Source times, not library times: cargo keeps one build of a library per feature set, and
/// a test run of one package can rebuild the library with other features without relinking
/// the examples, which are then still up to date.
pub fn stale(binary: &Path, sources: &[PathBuf]) -> bool {
    let Ok(built) = std::fs::metadata(binary).and_then(|m| m.modified()) else {
        return false;
    };
    sources
        .iter()
        .filter_map(|s| newest(s))
        .max()
        .is_some_and(|source| source > built)
}

/// Panics when the example `binary` is older than the sources it is built from
/// ([`sources_of`]), telling how to rebuild the examples.
pub fn assert_fresh(binary: &Path) {
    let name = binary.file_name().map(|n| n.to_string_lossy().into_owned());
    assert!(
        !stale(binary, &sources_of(name.as_deref().unwrap_or_default())),
        "{} is older than the cnikit sources: build it first with \
         `cargo build -p cnikit --examples --all-features`",
        binary.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_older_than_a_source_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let (bin_dir, src) = (dir.path().join("examples"), dir.path().join("src"));
        std::fs::create_dir_all(&bin_dir).unwrap();
        std::fs::create_dir_all(src.join("deep")).unwrap();
        let binary = bin_dir.join("tool");
        let (shallow, deep) = (src.join("lib.rs"), src.join("deep").join("mod.rs"));
        for f in [&binary, &shallow, &deep] {
            std::fs::write(f, "").unwrap();
        }
        let set = |p: &Path, secs: u64| {
            let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(t)
                .unwrap();
        };
        set(&binary, 2_000);
        set(&shallow, 1_000);
        set(&deep, 1_500);
        let sources = [src.clone(), dir.path().join("no-such-file")];
        assert!(!stale(&binary, &sources), "every source is older");
        set(&deep, 2_500);
        assert!(
            stale(&binary, &sources),
            "a file deep in a source dir is newer"
        );
        assert!(
            !stale(&binary, std::slice::from_ref(&shallow)),
            "only the named sources count"
        );
        assert!(!stale(&bin_dir.join("missing"), &sources));
    }

    #[test]
    fn an_examples_sources_are_its_own_file_and_the_crates() {
        let sources = sources_of("lab");
        let has = |tail: &str| sources.iter().any(|s| s.ends_with(tail));
        assert!(has("examples/lab") && has("examples/lab.rs"));
        assert!(has("cni-core/src") && has("ipam-etcd/src"));
        let root_src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../src");
        assert!(has("src") && root_src.is_dir());
        assert!(!has("testkit/src") && !has("examples/cnikit.rs"));
        assert!(!sources.iter().any(|s| s.ends_with("tests")));
    }
}
