//! Runs the `cnikit` plugin binary as a container runtime does: one process per CNI command,
//! the network configuration on stdin, the `CNI_*` variables in the environment, the result
//! or the error object on stdout.
//!
//! The binary is the facade package's example. Build it first, with the etcd store:
//! `cargo build --example cnikit --features etcd` (`scripts/test.sh` does this before the
//! tests). It is looked up next to the test executable (`target/<profile>/examples/cnikit`,
//! the test running from `target/<profile>/deps/`), then under `$CARGO_TARGET_DIR/debug/`.
//! A missing binary, or one built without the `etcd` feature, fails the test with the command
//! that builds it.

use std::net::IpAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use ipnet::IpNet;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// The command that builds the binary these tests run.
pub const BUILD: &str = "cargo build --example cnikit --features etcd";

/// A process that has not exited after this long is hung: it is killed and the test fails.
/// Every etcd request of the plugin has a deadline of a few seconds, so this is far beyond
/// anything a working plugin takes, even on a loaded machine.
pub const HUNG_AFTER: Duration = Duration::from_secs(120);

/// Where the plugin binary is; panics with the build command when it is missing.
pub fn plugin_binary() -> PathBuf {
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(profile_dir) = exe.parent().and_then(|deps| deps.parent())
    {
        candidates.push(profile_dir.join("examples").join("cnikit"));
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(dir).join("debug/examples/cnikit"));
    }
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => p.clone(),
        None => panic!(
            "the cnikit plugin binary is missing (looked at {candidates:?}): build it first with \
             `{BUILD}` in the same target directory (scripts/test.sh does)"
        ),
    }
}

/// One network configuration the plugin is called with: a `bridge` configuration whose
/// `ipam` is cnikit's block IPAM on etcd, so the binary acts as a pure IPAM plugin.
#[derive(Debug, Clone)]
pub struct Net {
    /// The network `name`.
    pub name: String,
    /// The `ipam` object, `type` included.
    pub ipam: Value,
}

impl Net {
    /// A network `name` whose addresses come from `pool` cut in `/block_size` blocks, kept in
    /// the etcd at `endpoint` under `prefix`, for node `node`.
    pub fn new(
        name: &str,
        pool: &str,
        block_size: u8,
        node: &str,
        endpoint: &str,
        prefix: &str,
        timeout_ms: u64,
    ) -> Net {
        Net {
            name: name.to_owned(),
            ipam: json!({
                "type": "cnikit-ipam",
                "pool": pool,
                "blockSize": block_size,
                "nodeName": node,
                // Never written by the IPAM role on etcd; any absolute path does.
                "dataDir": "/nonexistent/cnikit-etcd-tests",
                "store": {
                    "type": "etcd",
                    "endpoints": [endpoint],
                    "prefix": prefix,
                    "timeoutMs": timeout_ms,
                    "dialTimeoutMs": timeout_ms.min(2_000),
                },
            }),
        }
    }

    /// The same network seen from node `node`.
    pub fn on(&self, node: &str) -> Net {
        let mut net = self.clone();
        net.ipam["nodeName"] = json!(node);
        net
    }

    /// The stdin of a command; GC gets the valid attachments `(containerID, ifname)`.
    fn stdin(&self, valid: Option<&[(String, String)]>) -> Vec<u8> {
        let mut conf = json!({
            "cniVersion": "1.1.0",
            "name": self.name,
            "type": "bridge",
            "ipam": self.ipam,
        });
        if let Some(valid) = valid {
            conf["cni.dev/valid-attachments"] = valid
                .iter()
                .map(|(c, i)| json!({"containerID": c, "ifname": i}))
                .collect();
        }
        serde_json::to_vec(&conf).expect("a JSON value serializes")
    }

    /// ADD for container `container` (interface eth0).
    pub async fn add(&self, container: &str) -> Outcome {
        self.run("ADD", Some(container), None, None).await
    }

    /// ADD, killed with SIGKILL after `kill_after` unless it exited before.
    pub async fn add_killed_after(&self, container: &str, kill_after: Duration) -> Outcome {
        self.run("ADD", Some(container), None, Some(kill_after))
            .await
    }

    /// DEL for container `container` (interface eth0).
    pub async fn del(&self, container: &str) -> Outcome {
        self.run("DEL", Some(container), None, None).await
    }

    /// DEL, killed with SIGKILL after `kill_after` unless it exited before.
    pub async fn del_killed_after(&self, container: &str, kill_after: Duration) -> Outcome {
        self.run("DEL", Some(container), None, Some(kill_after))
            .await
    }

    /// GC keeping the attachments of `containers` (interface eth0).
    pub async fn gc(&self, containers: &[String]) -> Outcome {
        let valid: Vec<(String, String)> = containers
            .iter()
            .map(|c| (c.clone(), "eth0".to_owned()))
            .collect();
        self.run("GC", None, Some(&valid), None).await
    }

    async fn run(
        &self,
        command: &str,
        container: Option<&str>,
        valid: Option<&[(String, String)]>,
        kill_after: Option<Duration>,
    ) -> Outcome {
        let mut cmd = Command::new(plugin_binary());
        cmd.env("CNI_COMMAND", command)
            .env("CNI_PATH", "/nonexistent/cni-bin")
            // Warnings only unless the network asks for more (`ipam.logLevel`), and never
            // the test runner's own log settings.
            .env(
                "CNIKIT_LOG",
                self.ipam["logLevel"].as_str().unwrap_or("warn"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(c) = container {
            cmd.env("CNI_CONTAINERID", c).env("CNI_IFNAME", "eth0");
        }
        if command == "ADD" {
            // The IPAM role never enters the namespace; it only has to exist.
            cmd.env("CNI_NETNS", "/proc/self/ns/net");
        }
        let mut child = cmd.spawn().expect("spawn the cnikit plugin");
        let stdin = self.stdin(valid);
        let mut pipe = child.stdin.take().expect("stdin is piped");
        // A plugin killed before it read its stdin breaks the pipe: that is not an error here.
        let _ = pipe.write_all(&stdin).await;
        drop(pipe);
        let mut out = child.stdout.take().expect("stdout is piped");
        let mut err = child.stderr.take().expect("stderr is piped");
        let read_out = tokio::spawn(async move {
            let mut buf = Vec::new();
            let _ = out.read_to_end(&mut buf).await;
            buf
        });
        let read_err = tokio::spawn(async move {
            let mut buf = Vec::new();
            let _ = err.read_to_end(&mut buf).await;
            buf
        });
        let kill_at = kill_after.unwrap_or(HUNG_AFTER).min(HUNG_AFTER);
        let (status, hung) = tokio::select! {
            status = child.wait() => (status.expect("wait for the plugin"), false),
            () = tokio::time::sleep(kill_at) => {
                // By PID, through the child handle; a no-op if it has just exited.
                let _ = child.start_kill();
                (child.wait().await.expect("wait for the plugin"), kill_after.is_none())
            }
        };
        let stdout = read_out.await.expect("stdout reader");
        let stderr = String::from_utf8_lossy(&read_err.await.expect("stderr reader")).into_owned();
        let what = format!("{command} {}", container.unwrap_or(""));
        assert!(
            !hung,
            "{what} did not exit within {HUNG_AFTER:?}: the plugin hangs; stderr: {stderr}"
        );
        Outcome::parse(what, status, &stdout, stderr)
    }
}

/// How one plugin process ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Exit 0: the result (ADD: the address; other commands: `None`).
    Ok(Option<IpNet>),
    /// Exit 1 with the CNI error object.
    Err(CniError),
    /// Killed by SIGKILL before it finished.
    Killed,
}

/// The error object a plugin prints.
#[derive(Debug, Clone)]
pub struct CniError {
    /// `code`.
    pub code: u64,
    /// `msg`.
    pub msg: String,
    /// `details`, empty when absent.
    pub details: String,
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "code {}: {} ({})", self.code, self.msg, self.details)
    }
}

impl Outcome {
    fn parse(what: String, status: ExitStatus, stdout: &[u8], stderr: String) -> Outcome {
        if status.signal() == Some(libc_sigkill()) {
            return Outcome::Killed;
        }
        let text = String::from_utf8_lossy(stdout);
        let value: Option<Value> = serde_json::from_slice(stdout).ok();
        match (status.code(), value) {
            (Some(0), None) if stdout.is_empty() => Outcome::Ok(None),
            (Some(0), Some(v)) => {
                let address = v["ips"][0]["address"].as_str().map(|a| {
                    a.parse::<IpNet>()
                        .unwrap_or_else(|e| panic!("{what}: bad address {a:?} ({e}): {text}"))
                });
                Outcome::Ok(address)
            }
            (Some(1), Some(v)) if v["code"].is_u64() => {
                let error = CniError {
                    code: v["code"].as_u64().unwrap_or_default(),
                    msg: v["msg"].as_str().unwrap_or_default().to_owned(),
                    details: v["details"].as_str().unwrap_or_default().to_owned(),
                };
                assert!(
                    !(error.code == 7 && error.msg.contains("no `etcd` feature")),
                    "the cnikit plugin binary was built without the etcd store: rebuild it with \
                     `{BUILD}`"
                );
                Outcome::Err(error)
            }
            (code, _) => panic!(
                "{what}: the plugin exited with {code:?} ({status}) and printed {text:?}; \
                 stderr: {stderr}"
            ),
        }
    }

    /// The ADD address; panics on anything else.
    pub fn address(&self, what: &str) -> IpNet {
        match self {
            Outcome::Ok(Some(a)) => *a,
            other => panic!("{what}: expected an address, got {other:?}"),
        }
    }

    /// Panics unless the command succeeded.
    pub fn expect_ok(&self, what: &str) {
        assert!(
            matches!(self, Outcome::Ok(_)),
            "{what}: expected success, got {self:?}"
        );
    }

    /// The error object; panics on anything else.
    pub fn error(&self, what: &str) -> &CniError {
        match self {
            Outcome::Err(e) => e,
            other => panic!("{what}: expected a CNI error, got {other:?}"),
        }
    }

    /// The address an ADD printed, as an IP.
    pub fn ip(&self, what: &str) -> IpAddr {
        self.address(what).addr()
    }
}

/// SIGKILL's number, without a dependency on libc for one constant.
fn libc_sigkill() -> i32 {
    nix::sys::signal::Signal::SIGKILL as i32
}
