//! Named network namespaces of one test, and the `ip`/`bridge` commands run inside them.
//!
//! Everything goes through iproute2 (`ip netns add`, `ip -n NS …`) rather than cni-core, so
//! that the crates under test never meet a second copy of themselves in their tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

/// Where `ip netns` keeps the namespaces it names.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// `/run/netns/<name>`, the path of the named namespace `name`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// The network namespaces of one test, named `<prefix>-<suffix>` and deleted when this is
/// dropped, also when the test panics.
///
/// The prefix holds the test's tag and the process id, so tests running in parallel (and
/// several test binaries at once) never share a namespace: give every test its own tag.
#[derive(Debug)]
pub struct Namespaces {
    prefix: String,
    names: Mutex<Vec<String>>,
}

impl Namespaces {
    /// Namespaces named `cnkt-<tag>-<pid>-<suffix>` (keep `tag` short and unique).
    pub fn new(tag: &str) -> Self {
        Self::with_prefix(format!("cnkt-{tag}-{}", std::process::id()))
    }

    /// Namespaces named `<prefix>-<suffix>`; `prefix` must already be unique.
    pub fn with_prefix(prefix: impl Into<String>) -> Self {
        Namespaces {
            prefix: prefix.into(),
            names: Mutex::new(Vec::new()),
        }
    }

    /// The full name of the namespace `suffix` (whether or not it exists).
    pub fn name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.prefix)
    }

    /// Creates the namespace `suffix` (`ip netns add <prefix>-<suffix>`) and returns its
    /// full name; panics with `ip`'s error when it cannot. Nothing else is set up in it (`lo`
    /// stays down).
    pub fn add(&self, suffix: &str) -> String {
        let name = self.name(suffix);
        ip_netns(&["add", &name]).unwrap_or_else(|e| panic!("{e}"));
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.clone());
        name
    }

    /// Deletes the namespace `name` (a full name) now instead of on drop; panics when it
    /// cannot.
    pub fn remove(&self, name: &str) {
        delete(name).unwrap_or_else(|e| panic!("{e}"));
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|n| n != name);
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let names = std::mem::take(self.names.get_mut().unwrap_or_else(|e| e.into_inner()));
        // The last made first: a namespace made later may hang off an earlier one.
        for name in names.into_iter().rev() {
            if let Err(e) = delete(&name) {
                eprintln!("cannot delete netns {name}: {e}");
            }
        }
    }
}

/// `ip netns delete NAME`; `Ok` when the namespace is already gone (a test may delete one of
/// its namespaces itself).
fn delete(name: &str) -> Result<(), String> {
    if !netns_path(name).exists() {
        return Ok(());
    }
    ip_netns(&["delete", name]).map(drop)
}

/// Runs `ip netns ARGS…` and returns its stdout, or an error naming the command with its
/// stderr.
fn ip_netns(args: &[&str]) -> Result<String, String> {
    output("ip", &[&["netns"], args].concat())
}

/// Runs `PROGRAM ARGS…` and returns its stdout, or an error naming the command with its
/// stderr.
fn output(program: &str, args: &[&str]) -> Result<String, String> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("run {command}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{command}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Runs `ip netns exec NS ARGS…` (a program inside `ns`) and returns its stdout; panics with
/// its stderr when it fails.
pub fn exec_in(ns: &str, args: &[&str]) -> String {
    ip_netns(&[&["exec", ns], args].concat()).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `TOOL -n NS ARGS…` (`ip`, `bridge`, `tc`) and returns its stdout; panics with its
/// stderr when it fails.
pub fn run_in(tool: &str, ns: &str, args: &[&str]) -> String {
    output(tool, &[&["-n", ns], args].concat()).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `ip -n NS ARGS…` and returns its stdout; panics with its stderr when it fails.
pub fn ip(ns: &str, args: &[&str]) -> String {
    run_in("ip", ns, args)
}

/// Runs `bridge -n NS ARGS…` and returns its stdout; panics with its stderr when it fails.
pub fn bridge(ns: &str, args: &[&str]) -> String {
    run_in("bridge", ns, args)
}

/// `ip -j -n NS ARGS…`, parsed: the objects it lists (an empty output is an empty list).
pub fn ip_json(ns: &str, args: &[&str]) -> Vec<Value> {
    list(&ip(ns, &[&["-j"], args].concat()))
}

/// `bridge -j -n NS ARGS…`, parsed: the objects it lists (an empty output is an empty list).
pub fn bridge_json(ns: &str, args: &[&str]) -> Vec<Value> {
    list(&bridge(ns, &[&["-j"], args].concat()))
}

/// The JSON array iproute2 prints with `-j`; panics on anything else.
fn list(out: &str) -> Vec<Value> {
    if out.trim().is_empty() {
        return Vec::new();
    }
    match serde_json::from_str(out).expect("iproute2 -j prints JSON") {
        Value::Array(items) => items,
        other => panic!("expected a JSON array from iproute2 -j, got {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_reads_empty_output_as_no_objects() {
        assert!(list("").is_empty());
        assert!(list(" \n").is_empty());
        assert_eq!(list(r#"[{"ifname":"lo"}]"#)[0]["ifname"], "lo");
    }

    #[test]
    #[should_panic(expected = "expected a JSON array")]
    fn list_refuses_what_is_not_an_array() {
        list(r#"{"ifname":"lo"}"#);
    }

    #[test]
    fn names_hold_the_tag_and_the_pid() {
        let ns = Namespaces::new("tk");
        assert_eq!(
            ns.name("node"),
            format!("cnkt-tk-{}-node", std::process::id())
        );
        assert_eq!(netns_path("x"), Path::new("/run/netns/x"));
    }

    #[test]
    fn namespaces_are_deleted_on_drop_also_after_a_panic() {
        if !crate::root("testkit namespaces") {
            return;
        }
        let ns = Namespaces::new("tk-drop");
        let kept = ns.add("a");
        let gone = ns.add("b");
        assert!(netns_path(&kept).exists() && netns_path(&gone).exists());
        assert!(
            ip_json(&kept, &["link", "show"])
                .iter()
                .any(|l| l["ifname"] == "lo")
        );
        ns.remove(&gone);
        assert!(!netns_path(&gone).exists());
        let panicked = std::thread::spawn(move || {
            let _ns = ns;
            panic!("a failing test");
        })
        .join();
        assert!(panicked.is_err());
        assert!(!netns_path(&kept).exists(), "{kept} left behind");
    }
}
