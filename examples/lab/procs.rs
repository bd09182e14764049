//! Long-running processes of the lab (node agents, etcd): started inside a namespace, in a
//! session of their own so they outlive the lab command, and stopped by recorded PID only
//! after checking that the PID still is that process.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::state::{self, Proc};

/// Starts `program ARGS…` inside namespace `ns`, in a new session, with stdin from
/// `/dev/null` and stdout and stderr appended to `log`. `marker` must appear in its
/// command line (it is how `stop` recognises it later).
pub fn spawn_in_netns<I, S>(
    ns: &str,
    program: &Path,
    args: I,
    log: &Path,
    marker: &str,
) -> Result<(Proc, Child)>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let netns = File::open(state::netns_path(ns)).with_context(|| format!("open netns {ns}"))?;
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    let fd = netns.as_raw_fd();
    let mut command = Command::new(program);
    command.args(args);
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // An error exit should end the log with its message, not a stack trace.
        command.env("RUST_LIB_BACKTRACE", "0");
    }
    command
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: runs in the forked child before exec; setns and setsid are plain system calls
    // (async-signal-safe) on an fd inherited from the parent.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .with_context(|| format!("start {} in {ns}", program.display()))?;
    drop(netns);
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    let start_ticks = start_ticks(pid).context("read the new process's start time")?;
    Ok((
        Proc {
            pid,
            start_ticks,
            marker: marker.to_owned(),
            log: log.to_path_buf(),
        },
        child,
    ))
}

/// Field 22 of `/proc/PID/stat`: start time in clock ticks after boot. `None` when the
/// process is gone.
fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    // `rest` starts at field 3; field 22 is its 20th item.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Field 3 of `/proc/PID/stat`: `R`, `S`, `Z`…
fn state_char(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

/// What a recorded process is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Running, and still the process that was started.
    Alive,
    /// Exited (gone, a zombie, or the PID now belongs to another process).
    Gone,
}

/// Whether `proc` still runs (a zombie counts as gone; a PID reused by another process
/// too). Reaps it when it is a child of this process.
pub fn liveness(proc: &Proc) -> Liveness {
    // Reap it if it is our child (during `up`); ECHILD otherwise, which is fine.
    let _ = nix::sys::wait::waitpid(
        Pid::from_raw(proc.pid),
        Some(nix::sys::wait::WaitPidFlag::WNOHANG),
    );
    if start_ticks(proc.pid) != Some(proc.start_ticks) || state_char(proc.pid) == Some('Z') {
        return Liveness::Gone;
    }
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", proc.pid)).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    if cmdline.contains(&proc.marker) {
        Liveness::Alive
    } else {
        Liveness::Gone
    }
}

/// How stopping went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It was not running any more.
    AlreadyGone,
    /// It exited after SIGTERM, after this long.
    Terminated(Duration),
    /// It ignored SIGTERM and was killed.
    Killed,
}

/// Stops `proc`: SIGTERM, then SIGKILL after `grace`. Signals nothing unless the PID still
/// is the recorded process (same start time, marker in its command line).
pub async fn stop(proc: &Proc, grace: Duration) -> Result<Stopped> {
    if liveness(proc) == Liveness::Gone {
        return Ok(Stopped::AlreadyGone);
    }
    let pid = Pid::from_raw(proc.pid);
    let started = Instant::now();
    kill(pid, Signal::SIGTERM).with_context(|| format!("kill -TERM {}", proc.pid))?;
    while started.elapsed() < grace {
        if liveness(proc) == Liveness::Gone {
            return Ok(Stopped::Terminated(started.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if liveness(proc) == Liveness::Alive {
        kill(pid, Signal::SIGKILL).with_context(|| format!("kill -KILL {}", proc.pid))?;
        let killed = Instant::now();
        while liveness(proc) == Liveness::Alive && killed.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        return Ok(Stopped::Killed);
    }
    Ok(Stopped::Terminated(started.elapsed()))
}

/// The last `lines` lines of a log file, for error messages; from the last `Error:` line
/// (a process that failed) when there is one.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let start = all
        .iter()
        .rposition(|l| l.starts_with("Error:"))
        .unwrap_or(all.len().saturating_sub(lines));
    all[start..all.len().min(start + lines)].join("\n")
}
