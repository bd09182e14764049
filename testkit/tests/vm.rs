//! The VM runner itself (`scripts/vm.sh`, `testkit::vm`): exit status and output come back,
//! the guest has the link kinds the host may lack, and a test that needs one runs in the VM
//! with its result there as its own. Needs root and user-mode-linux; each test boots the VM
//! once at most (about 2.5–4 s), so they are few.

use std::path::Path;

use testkit::vm;

/// `true` when the VM can run here; otherwise skips `test` loudly.
fn vm_here(test: &str) -> bool {
    if !vm::available() {
        testkit::skip(test, "user-mode-linux or kmod is missing (scripts/deps.sh)");
        return false;
    }
    true
}

#[test]
fn status_and_output_come_back_from_the_guest() {
    if !testkit::root("status_and_output_come_back_from_the_guest")
        || !vm_here("status_and_output_come_back_from_the_guest")
    {
        return;
    }
    let out = vm::run(
        Path::new("/bin/sh"),
        &[
            "-c",
            "echo \"out $WHO $CNIKIT_IN_VM $(pwd)\"; echo err >&2; exit 7",
        ],
        &[("WHO", "a value with  spaces")],
    )
    .expect("run the VM");
    assert_eq!(out.status, 7, "{}", out.output);
    let cwd = std::env::current_dir().unwrap();
    assert!(
        out.output
            .contains(&format!("out a value with  spaces 1 {}\n", cwd.display())),
        "{}",
        out.output
    );
    assert!(out.output.contains("err\n"), "{}", out.output);
}

#[test]
fn the_probe_finds_veth_and_not_a_made_up_kind_and_leaves_no_namespace() {
    if !testkit::root("the_probe_finds_veth_and_not_a_made_up_kind_and_leaves_no_namespace") {
        return;
    }
    assert!(vm::kernel_has_link_kind("veth"));
    assert!(!vm::kernel_has_link_kind("cnkt-no-such-kind"));
    // A tunnel module is never loaded by the probe on the host (loading ipip adds `tunl0` to
    // the root namespace): with the module loaded, the probe agrees with adding a link by
    // hand; without it, the probe says no and the module stays unloaded.
    let loaded = std::path::Path::new("/sys/module/ipip").exists();
    let probed = vm::kernel_has_link_kind("ipip");
    if loaded {
        let ns = testkit::Namespaces::new("vm-probe");
        let n = ns.add("a");
        let by_hand = std::process::Command::new("ip")
            .args(["-n", &n, "link", "add", "cnkt-ipip", "type", "ipip"])
            .args(["remote", "192.0.2.1", "local", "192.0.2.2"])
            .stderr(std::process::Stdio::null())
            .status()
            .expect("run ip")
            .success();
        assert_eq!(probed, by_hand);
    } else {
        assert!(
            !probed,
            "ipip counted as present though its module is not loaded"
        );
        assert!(
            !std::path::Path::new("/sys/module/ipip").exists(),
            "the probe loaded the ipip module on the host"
        );
    }
    let prefix = format!("cnkt-probe-{}-", std::process::id());
    let left: Vec<_> = std::fs::read_dir(testkit::NETNS_RUN_DIR)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "probe namespaces left behind: {left:?}");
}

/// Run by `a_test_needing_ipip_runs_in_the_vm_when_the_kernel_lacks_it` as a child process:
/// prints where it ran, proves the kernel has ipip there, and fails when asked to.
#[test]
#[ignore = "a child of a_test_needing_ipip_runs_in_the_vm_when_the_kernel_lacks_it"]
fn ipip_body() {
    if !testkit::root("ipip_body") || !vm::here_or_in_vm("ipip_body", "ipip") {
        return;
    }
    let release = nix::sys::utsname::uname().unwrap();
    let release = release.release().to_string_lossy();
    println!("RAN in_vm={} kernel={release}", vm::in_vm());
    assert!(vm::kernel_has_link_kind("ipip"), "the probe misses ipip");
    if vm::in_vm() {
        // The guest's kernel is the user-mode-linux one, whose modules it uses.
        assert!(Path::new("/usr/lib/uml/modules").join(&*release).is_dir());
    }
    let ns = testkit::Namespaces::new("vm-ipip");
    let n = ns.add("a");
    testkit::ip(
        &n,
        &[
            "link",
            "add",
            "cnkt-ipip",
            "type",
            "ipip",
            "remote",
            "192.0.2.1",
        ],
    );
    let links = testkit::ip_json(&n, &["-d", "link", "show"]);
    let kind = |name: &str| {
        links
            .iter()
            .find(|l| l["ifname"] == name)
            .map(|l| l["linkinfo"]["info_kind"].clone())
    };
    assert_eq!(kind("cnkt-ipip"), Some("ipip".into()), "{links:?}");
    // The module's fallback device, in every namespace once it is loaded.
    assert_eq!(kind("tunl0"), Some("ipip".into()), "{links:?}");
    assert!(
        std::env::var("CNIKIT_VMTEST_FAIL").is_err(),
        "failing as asked (CNIKIT_VMTEST_FAIL)"
    );
}

/// Runs `ipip_body` from this test binary as a child process, with `env`.
fn run_ipip_body(env: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["ipip_body", "--exact", "--include-ignored", "--nocapture"])
        .envs(env.iter().copied())
        .output()
        .expect("run this test binary")
}

#[test]
fn a_test_needing_ipip_runs_in_the_vm_when_the_kernel_lacks_it() {
    let test = "a_test_needing_ipip_runs_in_the_vm_when_the_kernel_lacks_it";
    if !testkit::root(test) {
        return;
    }
    let native = vm::kernel_has_link_kind("ipip");
    if !native && !vm_here(test) {
        return;
    }
    let out = run_ipip_body(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let host = nix::sys::utsname::uname().unwrap();
    let host = host.release().to_string_lossy().into_owned();
    let ran = stdout
        .lines()
        .find_map(|l| Some(l.split_once("RAN ")?.1))
        .unwrap_or_else(|| panic!("the body did not run:\n{stdout}\n{stderr}"));
    if native {
        assert_eq!(ran, format!("in_vm=false kernel={host}"));
    } else {
        assert!(ran.starts_with("in_vm=true kernel="), "{ran}");
        assert_ne!(ran, format!("in_vm=true kernel={host}"));
        // The body's namespaces lived in the guest's kernel and /run, never here.
        let here: Vec<_> = std::fs::read_dir(testkit::NETNS_RUN_DIR)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|name| name.starts_with("cnkt-vm-ipip-"))
            .collect();
        assert!(
            here.is_empty(),
            "namespaces of the body on the host: {here:?}"
        );
        // A body that fails in the VM fails the test that sent it there.
        let out = run_ipip_body(&[("CNIKIT_VMTEST_FAIL", "1")]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{stdout}");
        assert!(stdout.contains("failing as asked"), "{stdout}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("ipip_body failed in the VM"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The children of process `pid` (from `/proc/PID/task/*/children`).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The command line of process `pid`, `None` when it is gone or a zombie.
fn live_cmdline(pid: u32) -> Option<Vec<u8>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the parenthesised command name.
    let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    std::fs::read(format!("/proc/{pid}/cmdline")).ok()
}

/// `pid` and every process below it that still runs, each with its command line.
fn tree(pid: u32) -> Vec<(u32, Vec<u8>)> {
    let mut found = Vec::new();
    let mut next = vec![pid];
    while let Some(p) = next.pop() {
        if let Some(cmdline) = live_cmdline(p) {
            next.extend(children(p));
            found.push((p, cmdline));
        }
    }
    found
}

/// The processes of a VM (its kernel and the host processes it makes): on drop, ends those
/// still running with the command line they had (so never another process that got a PID
/// of theirs) and removes the run's scratch directory.
struct Orphans {
    processes: Vec<(u32, Vec<u8>)>,
    scratch: Option<std::path::PathBuf>,
}

impl Orphans {
    /// Those still running.
    fn alive(&self) -> Vec<u32> {
        self.processes
            .iter()
            .filter(|(pid, cmdline)| live_cmdline(*pid).as_ref() == Some(cmdline))
            .map(|(pid, _)| *pid)
            .collect()
    }
}

impl Drop for Orphans {
    fn drop(&mut self) {
        for pid in self.alive() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        if let Some(dir) = &self.scratch {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[test]
fn the_vm_dies_with_a_killed_runner() {
    let test = "the_vm_dies_with_a_killed_runner";
    if !testkit::root(test) || !vm_here(test) {
        return;
    }
    let marker = std::env::temp_dir().join(format!("cnkt-vm-kill-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let mut runner = std::process::Command::new(vm::script())
        .args(["--", "/bin/sh", "-c"])
        .arg(format!("touch {}; exec sleep 60", marker.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start scripts/vm.sh");
    // The guest runs its command once the marker (in the shared /tmp) is there. (The bounds
    // in this test only keep a broken runner from hanging it.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !marker.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest never ran its command"
        );
        assert!(runner.try_wait().unwrap().is_none(), "vm.sh ended early");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(&marker);
    let vm = children(runner.id())
        .into_iter()
        .find_map(|pid| {
            let text = String::from_utf8_lossy(&live_cmdline(pid)?).into_owned();
            text.contains("cnikit.vm=1").then(|| Orphans {
                processes: tree(pid),
                scratch: text
                    .split('\0')
                    .find_map(|a| a.strip_prefix("uml_dir="))
                    .map(std::path::PathBuf::from),
            })
        })
        .expect("the VM kernel is a child of vm.sh");
    assert!(
        vm.processes.len() > 1,
        "the VM kernel and the host processes it runs: {:?}",
        vm.processes.iter().map(|p| p.0).collect::<Vec<_>>()
    );

    runner.kill().expect("SIGKILL vm.sh");
    runner.wait().expect("reap vm.sh");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let alive = vm.alive();
        if alive.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "VM processes {alive:?} outlive the SIGKILLed vm.sh"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
