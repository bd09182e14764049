//! Helpers shared by the tests of the cnikit crates; a dev-dependency only, never shipped.
//!
//! A test that cannot run on this machine (not root, a tool or package missing) says so with
//! [`skip`]: one `SKIPPED: <test>: <reason>` line written straight to the process's stderr,
//! so it shows even when libtest captures the output of passing tests. When the environment
//! variable [`REQUIRE_ALL`] is set (the project's test script sets it after installing every
//! prerequisite), a skip is a failure instead: a test that silently stops running cannot hide
//! behind a green run.
//!
//! The rest is the harness the namespace tests share: [`Namespaces`] (named network
//! namespaces deleted on drop, also on panic), [`ip`]/[`ip_json`] and [`bridge`]/
//! [`bridge_json`] inside them, [`Segment`] (an L2 switch that namespaces plug into), the
//! example binaries of the end-to-end tests ([`examples_dir`], [`assert_fresh`]), and a
//! BPF filesystem of a test's own ([`Bpffs`]).
//!
//! [`kube`] (feature `kube`) runs a private etcd + kube-apiserver in a namespace of the
//! test's own; [`apiserver`] (feature `apiserver`) writes the certificates, tokens and
//! command line such a server needs, without a client.
//!
//! [`vm`] runs kernel tests inside a user-mode-linux VM when the running kernel lacks a link
//! kind they need (ipip here): [`vm::here_or_in_vm`].

#![warn(missing_docs)]

mod agent;
#[cfg(feature = "apiserver")]
pub mod apiserver;
mod bpffs;
mod example;
#[cfg(feature = "kube")]
pub mod kube;
mod netns;
mod segment;
pub mod vm;

use std::io::Write;
use std::path::Path;

pub use agent::{AgentProcess, agent_binary};
pub use bpffs::Bpffs;
pub use example::{assert_fresh, examples_dir, sources_of, stale};
pub use netns::{
    NETNS_RUN_DIR, Namespaces, bridge, bridge_json, exec_in, ip, ip_json, netns_path, run_in,
};
pub use segment::Segment;

/// Set to a non-empty value other than `0` to turn every [`skip`] into a test failure.
pub const REQUIRE_ALL: &str = "CNIKIT_REQUIRE_ALL";

/// Whether [`REQUIRE_ALL`] is set.
pub fn skips_fail() -> bool {
    std::env::var(REQUIRE_ALL).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Reports that `test` cannot run here because of `why`: a loud `SKIPPED:` line, or a panic
/// when [`REQUIRE_ALL`] is set. The caller returns right after.
pub fn skip(test: &str, why: impl std::fmt::Display) {
    if skips_fail() {
        panic!("{test}: cannot run: {why} ({REQUIRE_ALL} is set, so a skip is a failure)");
    }
    // Straight to the stderr handle: libtest captures `eprintln!` of passing tests.
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
}

/// `true` when running as root; otherwise [`skip`]s `test` (network namespaces, netlink
/// writes and BPF need `CAP_SYS_ADMIN` and `CAP_NET_ADMIN`).
pub fn root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    skip(
        test,
        "needs root (network namespaces, CAP_SYS_ADMIN, CAP_NET_ADMIN)",
    );
    false
}

/// Whether an executable named `name` is in one of the directories of `PATH`.
pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
}

/// `true` when every one of `files` exists; otherwise [`skip`]s `test`, naming the first
/// missing file and the Debian package (`package`) that provides it.
pub fn files(test: &str, files: &[&Path], package: &str) -> bool {
    match files.iter().find(|f| !f.exists()) {
        None => true,
        Some(missing) => {
            skip(
                test,
                format_args!("{} is missing ({package})", missing.display()),
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_path_finds_sh_and_not_a_made_up_name() {
        assert!(on_path("sh"), "sh is on the PATH of every test machine");
        assert!(!on_path("cnikit-no-such-command-4f2a"));
    }

    #[test]
    fn files_reports_the_first_missing_one() {
        let present = Path::new("/");
        assert!(files("t", &[present], "base-files"));
        if !skips_fail() {
            assert!(!files("t", &[present, Path::new("/nonexistent/x")], "none"));
        }
    }
}
