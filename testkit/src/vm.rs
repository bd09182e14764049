//! Kernel tests in a VM, for what the running kernel lacks.
//!
//! `scripts/vm.sh` boots Debian's `user-mode-linux` (a Linux 6.1 kernel with ipip, veth, bridge
//! and vxlan, run as an ordinary process) with the host's root as its read-only root and the
//! host's `/tmp` shared, runs one command in it and returns its exit status. This module is the
//! tests' side of it:
//!
//! - [`kernel_has_link_kind`] probes whether the running kernel can create a link of a kind;
//! - [`run`] runs a program inside the VM;
//! - [`here_or_in_vm`] is the one call a test makes when it needs a link kind: on a kernel
//!   that has it (or inside the VM) the test runs here; otherwise the same test runs again
//!   inside the VM and its result there is the test's result. A test never skips silently
//!   because of the kernel;
//! - [`in_vm_only`] likewise for a test of the VM's older kernel itself (eBPF attached the
//!   pre-6.6 way).
//!
//! ```no_run
//! #[test]
//! fn ipip_pods_ping() {
//!     if !testkit::root("ipip_pods_ping") || !testkit::vm::here_or_in_vm("ipip_pods_ping", "ipip")
//!     {
//!         return;
//!     }
//!     // … the test's body, on a kernel with ipip …
//! }
//! ```
//!
//! What the guest lacks: nf_tables' `ip`/`inet`/`ip6` families (iptables-legacy works), more
//! than one CPU, an eBPF JIT (programs run interpreted), any network device towards the host
//! (services such as etcd must be started inside it), and persistence: writes outside `/tmp`
//! are lost when it halts.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::Namespaces;

/// The variable `scripts/vm.sh` sets to `1` for the command it runs in the guest.
pub const IN_VM_ENV: &str = "CNIKIT_IN_VM";

/// The word `scripts/vm.sh` adds to the guest kernel's command line; [`in_vm`] looks for it.
const CMDLINE_MARK: &str = "cnikit.vm=1";

/// `scripts/vm.sh` of this source tree.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/vm.sh")
}

/// Whether the VM can run on this machine: the user-mode-linux kernel (`linux.uml` or
/// `linux`, Debian `user-mode-linux`) and `modprobe` (Debian `kmod`) are on `PATH`.
pub fn available() -> bool {
    (crate::on_path("linux.uml") || crate::on_path("linux")) && crate::on_path("modprobe")
}

/// Whether this process runs inside the cnikit test VM (the guest kernel's command line
/// carries the runner's mark; an environment variable alone could be inherited by mistake).
pub fn in_vm() -> bool {
    std::fs::read_to_string("/proc/cmdline")
        .is_ok_and(|line| line.split_whitespace().any(|w| w == CMDLINE_MARK))
}

/// Whether the running kernel can create a link of this kind (e.g. "ipip"), probed once per
/// kind and process in a scratch network namespace that is removed afterwards (never the root
/// namespace). `false` also when the probe cannot run at all (not root, no `ip`).
///
/// The probe is `ip -n SCRATCH link add cnkt-probe type KIND …` with the few parameters the
/// kind needs; "File exists" counts as present (the ipip module makes `tunl0` in every
/// namespace). Creating a link makes the kernel load the kind's module, and some modules add
/// devices to the root namespace when they load: the tunnel modules their fallback device in
/// every namespace (`tunl0`, `gre0`, `ip_vti0`, …), `dummy`, `ifb` and `bonding` theirs
/// (`dummy0`, `ifb0`, `bond0`) in the root one. So outside the VM only the kinds whose
/// modules add nothing are probed freely (veth, bridge, vxlan, macvlan, …); any
/// other kind counts as present only when its module is already loaded (or built in), and
/// an unknown kind never: the probe never makes the host load such a module, the test runs
/// in the VM instead.
pub fn kernel_has_link_kind(kind: &str) -> bool {
    static PROBED: OnceLock<Mutex<HashMap<String, bool>>> = OnceLock::new();
    let probed = PROBED.get_or_init(Default::default);
    // Held during the probe: one probe per kind even when tests ask at the same time.
    let mut probed = probed.lock().unwrap_or_else(|e| e.into_inner());
    *probed
        .entry(kind.to_owned())
        .or_insert_with(|| probe_link_kind(kind))
}

/// One probe of [`kernel_has_link_kind`], in a namespace of its own.
fn probe_link_kind(kind: &str) -> bool {
    static PROBES: AtomicUsize = AtomicUsize::new(0);
    if !nix::unistd::geteuid().is_root() {
        return false;
    }
    if !probe_here(kind, in_vm(), |module| {
        Path::new("/sys/module").join(module).exists()
    }) {
        return false;
    }
    let namespaces = Namespaces::new("probe");
    // Deleted when `namespaces` drops, at the end of this function.
    let ns = namespaces.add(&PROBES.fetch_add(1, Ordering::Relaxed).to_string());
    let mut args = vec!["-n", ns.as_str(), "link", "add"];
    if needs_parent(kind) {
        let parent = [
            "cnkt-parent",
            "type",
            "veth",
            "peer",
            "name",
            "cnkt-parent-p",
        ];
        let ok = Command::new("ip")
            .args(["-n", ns.as_str(), "link", "add"])
            .args(parent)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return false;
        }
        args.extend(["link", "cnkt-parent"]);
    }
    args.extend(["cnkt-probe", "type", kind]);
    args.extend(kind_params(kind));
    match Command::new("ip").args(&args).output() {
        Ok(out) if out.status.success() => true,
        Ok(out) => String::from_utf8_lossy(&out.stderr).contains("File exists"),
        Err(_) => false,
    }
}

/// Whether the probe of `kind` may run here: always inside the VM; outside it, for the kinds
/// whose modules add no device anywhere when they load, and for the others only when their
/// module is loaded already (`module_loaded`, given a module name). Unknown kinds are never
/// probed outside the VM: their module might add a device to the root namespace.
fn probe_here(kind: &str, in_vm: bool, module_loaded: impl Fn(&str) -> bool) -> bool {
    if in_vm {
        return true;
    }
    match kind {
        // Loading these modules adds no device.
        "veth" | "bridge" | "vxlan" | "geneve" | "macvlan" | "macvtap" | "ipvlan" | "ipvtap"
        | "vlan" | "vrf" | "wireguard" => true,
        _ => module_of(kind).is_some_and(module_loaded),
    }
}

/// The module of a kind whose loading adds a device to the root namespace (a tunnel's
/// fallback device in every namespace; `dummy0`, `ifb0`, `bond0` in the root one).
fn module_of(kind: &str) -> Option<&'static str> {
    match kind {
        "ipip" => Some("ipip"),
        "sit" => Some("sit"),
        "gre" | "gretap" | "erspan" => Some("ip_gre"),
        "ip6tnl" => Some("ip6_tunnel"),
        "ip6gre" | "ip6gretap" | "ip6erspan" => Some("ip6_gre"),
        "vti" => Some("ip_vti"),
        "vti6" => Some("ip6_vti"),
        "dummy" => Some("dummy"),
        "ifb" => Some("ifb"),
        "bond" => Some("bonding"),
        _ => None,
    }
}

/// Whether links of `kind` sit on a parent device (`ip link add link PARENT …`).
fn needs_parent(kind: &str) -> bool {
    matches!(kind, "vlan" | "macvlan" | "macvtap" | "ipvlan" | "ipvtap")
}

/// The parameters `ip link add … type KIND` needs for `kind` (documentation addresses).
fn kind_params(kind: &str) -> &'static [&'static str] {
    match kind {
        "ipip" | "sit" | "gre" | "gretap" | "erspan" => {
            &["remote", "192.0.2.1", "local", "192.0.2.2"]
        }
        "ip6tnl" | "ip6gre" | "ip6gretap" => &["remote", "2001:db8::1", "local", "2001:db8::2"],
        "vxlan" => &["id", "42", "dstport", "4789"],
        "geneve" => &["id", "42", "remote", "192.0.2.1"],
        "vlan" => &["id", "42"],
        "veth" => &["peer", "name", "cnkt-probe-p"],
        _ => &[],
    }
}

/// Output of a command run in the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmOutput {
    /// The command's exit status; 125 when the VM could not run it (see `output`), 128 + N
    /// when the runner was killed by signal N.
    pub status: i32,
    /// The command's stdout and stderr as they came (the runner's own messages included).
    pub output: String,
}

/// Runs `program args` inside the VM (through `scripts/vm.sh`), with `env` added, and
/// returns its exit status and combined output.
///
/// The command runs as root in the current directory, with this process's `PATH`, `HOME`,
/// locale, `RUST_*`, `CARGO_*`, `CNIKIT_*` and `LAB_*` variables (see `scripts/vm.sh`). An
/// `Err` means the runner itself could not be started.
pub fn run(program: &Path, args: &[&str], env: &[(&str, &str)]) -> io::Result<VmOutput> {
    let mut command = Command::new("bash");
    command.arg(script());
    for (name, value) in env {
        command.arg("--env").arg(format!("{name}={value}"));
    }
    command.arg("--").arg(program).args(args);
    // One pipe for both streams keeps their order as the guest wrote them.
    let (mut reader, writer) = io::pipe()?;
    command
        .stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer);
    let mut child = command.spawn()?;
    // Drop the parent's copies of the write end (held by `command`) so the read ends.
    drop(command);
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes)?;
    let status = child.wait()?;
    let status = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => -1,
    };
    Ok(VmOutput {
        status,
        output: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

/// For a test that needs a link kind this kernel may lack: returns `true` when the caller
/// should run its body here (this kernel has `kind`, or this process already is in the VM).
/// Otherwise re-runs the calling test (libtest name `test`, run with `--exact --nocapture`
/// from the current test binary, std::env::current_exe) inside the VM, echoes its output,
/// panics if it failed or did not run exactly that one test there, and returns `false`: the
/// caller returns right after. When the VM cannot run here (user-mode-linux missing), calls
/// `testkit::skip` (a failure under CNIKIT_REQUIRE_ALL) and returns false.
///
/// `test` is the test's libtest name, with its module path for a test inside a module
/// (`tests::ipip_pods_ping`). When the current thread's name (libtest names each test's
/// thread after the test) is `test` or ends with `::test`, that full name is used, so a test
/// may pass its bare function name.
pub fn here_or_in_vm(test: &str, kind: &str) -> bool {
    if in_vm() || kernel_has_link_kind(kind) {
        return true;
    }
    rerun_in_vm(test, &format!("this kernel has no {kind} links"))
}

/// For a test of the VM's own kernel (Linux 6.1, for what older kernels do differently):
/// `true` inside the VM, where the caller runs its body; elsewhere re-runs the calling test
/// inside the VM as [`here_or_in_vm`] does (its result there is the test's result) and
/// returns `false`. `why` says in messages why the test needs the VM.
pub fn in_vm_only(test: &str, why: &str) -> bool {
    in_vm() || rerun_in_vm(test, why)
}

/// Re-runs the calling test `test` inside the VM (see [`here_or_in_vm`]); `false` always.
fn rerun_in_vm(test: &str, why: &str) -> bool {
    if !available() {
        crate::skip(
            test,
            format_args!(
                "{why} and the VM cannot run here: install user-mode-linux and kmod \
                 (scripts/deps.sh)"
            ),
        );
        return false;
    }
    let name = libtest_name(test, std::thread::current().name());
    let exe = std::env::current_exe().expect("the path of the running test binary");
    let out = run(
        &exe,
        &[&name, "--exact", "--nocapture", "--include-ignored"],
        &[],
    )
    .unwrap_or_else(|e| {
        panic!(
            "{name}: cannot start the VM runner {}: {e}",
            script().display()
        )
    });
    // Through print!: libtest captures it with the test's output and shows it on failure.
    print!("{}", out.output);
    let _ = io::stdout().flush();
    // A skip inside the VM stays as loud as one here, also when the test passes.
    for line in out.output.lines().filter(|l| l.starts_with("SKIPPED: ")) {
        let _ = writeln!(io::stderr(), "{line} (in the VM)");
    }
    let summary = libtest_summary(&out.output);
    if out.status != 0 || summary != Some((1, 0)) {
        panic!(
            "{name} failed in the VM ({why}): exit status {}, libtest counted {}",
            out.status,
            match summary {
                Some((passed, failed)) => format!("{passed} passed, {failed} failed"),
                None => "no result".to_owned(),
            }
        );
    }
    false
}

/// The libtest name to run: the current thread's name when it is `test` itself or `test`
/// inside a module, else `test`.
fn libtest_name(test: &str, thread: Option<&str>) -> String {
    match thread {
        Some(t) if t == test || t.ends_with(&format!("::{test}")) => t.to_owned(),
        _ => test.to_owned(),
    }
}

/// `(passed, failed)` from libtest's one `test result: …` line, `None` when there is not
/// exactly one.
fn libtest_summary(output: &str) -> Option<(u32, u32)> {
    let mut results = output
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("test result: "));
    let line = results.next()?;
    if results.next().is_some() {
        return None;
    }
    let count = |what: &str| {
        line.split(';').map(str::trim).find_map(|part| {
            let part = part.split_once(". ").map_or(part, |(_, rest)| rest);
            part.strip_suffix(what)?.trim().parse().ok()
        })
    };
    Some((count("passed")?, count("failed")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_name_prefers_the_module_path_of_the_test_thread() {
        assert_eq!(libtest_name("t", Some("vm::tests::t")), "vm::tests::t");
        assert_eq!(libtest_name("t", Some("t")), "t");
        assert_eq!(libtest_name("t", Some("main")), "t");
        assert_eq!(libtest_name("t", Some("x::not_t")), "t");
        assert_eq!(libtest_name("a::t", None), "a::t");
        // What the rule relies on: libtest names a test's thread after the test.
        let me = "libtest_name_prefers_the_module_path_of_the_test_thread";
        assert_eq!(
            libtest_name(me, std::thread::current().name()),
            format!("vm::tests::{me}")
        );
    }

    #[test]
    fn libtest_summary_reads_the_counts() {
        let ok = "running 1 test\ntest a ... ok\n\ntest result: ok. 1 passed; 0 failed; 0 \
                  ignored; 0 measured; 12 filtered out; finished in 0.01s\n";
        assert_eq!(libtest_summary(ok), Some((1, 0)));
        let failed = "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured";
        assert_eq!(libtest_summary(failed), Some((0, 1)));
        let none = "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 3 filtered out";
        assert_eq!(libtest_summary(none), Some((0, 0)));
        assert_eq!(libtest_summary("no tests here"), None);
        assert_eq!(libtest_summary(&format!("{ok}{ok}")), None);
    }

    /// Outside the VM, a kind whose module adds a device to the root namespace when it loads
    /// is probed only with its module loaded; an unknown kind never; the VM probes anything.
    #[test]
    fn the_probe_never_loads_a_module_that_adds_devices_on_the_host() {
        let none_loaded = |_: &str| false;
        for kind in ["veth", "bridge", "vxlan", "macvlan"] {
            assert!(probe_here(kind, false, none_loaded), "{kind}");
        }
        for kind in [
            "ipip",
            "gre",
            "vti",
            "vti6",
            "ip6erspan",
            "dummy",
            "ifb",
            "bond",
            "cnkt-unknown",
        ] {
            assert!(
                !probe_here(kind, false, none_loaded),
                "{kind} probed on the host"
            );
            assert!(
                probe_here(kind, true, none_loaded),
                "{kind} not probed in the VM"
            );
        }
        assert!(probe_here("dummy", false, |m| m == "dummy"));
        assert!(probe_here("vti", false, |m| m == "ip_vti"));
        assert!(!probe_here("vti", false, |m| m == "vti"));
        assert!(!probe_here("cnkt-unknown", false, |_| true));
    }

    #[test]
    fn the_script_is_next_to_the_crate() {
        assert!(script().is_file(), "{} is missing", script().display());
    }
}
