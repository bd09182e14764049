//! The `cnikit-agent` example binary run as a process in a node namespace, as the agent tests
//! run it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long [`AgentProcess::stop`] waits for a clean exit.
const STOP_WITHIN: Duration = Duration::from_secs(30);

/// The `cnikit-agent` example binary, checked to be newer than its sources; `None` after a
/// loud skip when not root or when it is not built (`build` says how to build it).
pub fn agent_binary(test: &str, build: &str) -> Option<PathBuf> {
    if !crate::root(test) {
        return None;
    }
    let bin = crate::examples_dir().join("cnikit-agent");
    if !bin.is_file() {
        crate::skip(
            test,
            format_args!("{} is not built (run `{build}` first)", bin.display()),
        );
        return None;
    }
    crate::assert_fresh(&bin);
    Some(bin)
}

/// A `cnikit-agent` process in a network namespace; stopped (SIGTERM, then SIGKILL) on drop
/// if it still runs.
#[derive(Debug)]
pub struct AgentProcess(Child);

impl AgentProcess {
    /// Starts `bin --conflist CONFLIST` in namespace `ns`, its stderr appended to `log`.
    pub fn start(bin: &Path, ns: &str, conflist: &Path, log: &Path) -> AgentProcess {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        // `ip netns exec` execs the agent: the child's PID is the agent's.
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin)
            .arg("--conflist")
            .arg(conflist)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start cnikit-agent");
        AgentProcess(child)
    }

    /// The agent's PID.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.0.id()).expect("a pid"))
    }

    /// SIGTERM, and waits for a clean exit; whether it exited with 0 in time (if not, it is
    /// killed).
    pub fn stop(&mut self) -> bool {
        let _ = kill(self.pid(), Signal::SIGTERM);
        let deadline = Instant::now() + STOP_WITHIN;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        false
    }

    /// SIGKILL, as a crash, and reaps it.
    pub fn kill(&mut self) {
        kill(self.pid(), Signal::SIGKILL).expect("SIGKILL the agent");
        self.0.wait().expect("reap the agent");
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}
