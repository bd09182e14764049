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
    // What the probe says about ipip is what adding one by hand says.
    let ns = testkit::Namespaces::new("vm-probe");
    let n = ns.add("a");
    let by_hand = std::process::Command::new("ip")
        .args(["-n", &n, "link", "add", "cnkt-ipip", "type", "ipip"])
        .args(["remote", "192.0.2.1", "local", "192.0.2.2"])
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run ip")
        .success();
    assert_eq!(vm::kernel_has_link_kind("ipip"), by_hand);
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
