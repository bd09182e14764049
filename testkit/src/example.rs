//! The example binaries the end-to-end tests and benchmarks run, found next to the running
//! binary, and refused when they are older than the libraries they are built from.
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

/// Whether `binary` (in `<target>/<profile>/examples`) is older than the newest library in
/// `<target>/<profile>/deps` whose file name starts with one of `libs` (`libcnikit-`).
/// `false` when either cannot be read.
pub fn stale(binary: &Path, libs: &[&str]) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let Some(built) = modified(binary) else {
        return false;
    };
    let deps = binary
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("deps"));
    let newest_lib: Option<SystemTime> = deps
        .and_then(|d| std::fs::read_dir(d).ok())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            libs.iter().any(|l| name.starts_with(l)) && name.ends_with(".rlib")
        })
        .filter_map(|e| modified(&e.path()))
        .max();
    newest_lib.is_some_and(|lib| lib > built)
}

/// Panics when `binary` is older than the newest build of the `cnikit` library, telling how
/// to rebuild the examples.
pub fn assert_fresh(binary: &Path) {
    assert!(
        !stale(binary, &["libcnikit-"]),
        "{} is older than the cnikit library: build it first with \
         `cargo build -p cnikit --examples --all-features`",
        binary.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_older_than_a_library_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path();
        let (examples, deps) = (target.join("examples"), target.join("deps"));
        std::fs::create_dir_all(&examples).unwrap();
        std::fs::create_dir_all(&deps).unwrap();
        let binary = examples.join("tool");
        let lib = deps.join("libcnikit-0123.rlib");
        let other = deps.join("libother-0123.rlib");

        std::fs::write(&binary, "").unwrap();
        assert!(!stale(&binary, &["libcnikit-"]), "no library yet");
        let set = |p: &Path, secs: u64| {
            let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(t)
                .unwrap();
        };
        std::fs::write(&lib, "").unwrap();
        std::fs::write(&other, "").unwrap();
        set(&binary, 2_000);
        set(&lib, 1_000);
        set(&other, 3_000);
        assert!(
            !stale(&binary, &["libcnikit-"]),
            "only the named libraries count"
        );
        assert!(stale(&binary, &["libcnikit-", "libother-"]));
        set(&lib, 2_500);
        assert!(stale(&binary, &["libcnikit-"]));
        assert!(!stale(&examples.join("missing"), &["libcnikit-"]));
    }
}
