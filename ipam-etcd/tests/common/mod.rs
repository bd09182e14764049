//! Test harness: a private etcd per test, on 127.0.0.1 with free ports and a temp data dir.
//!
//! [`Etcd::start`] returns `None` (after a loud `SKIPPED:` line on stderr) when the `etcd`
//! binary is not on `PATH`; install it with `apt-get install -y etcd-server` (or run
//! `scripts/ensure-etcd.sh`). With `CNIKIT_REQUIRE_ALL=1` a missing binary fails the test
//! instead, as in `scripts/test.sh`. The server can be
//! stopped with SIGTERM and restarted on the same data dir and ports; it is killed (by PID)
//! when the handle drops, also when the test fails.
#![allow(dead_code)]

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ipam_etcd::{Config, Connection};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

/// How long a fresh or restarted etcd may take to serve.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// Certificates made for one TLS test, as PEM files in the server's temp dir.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signed the server and client certificates.
    pub ca: PathBuf,
    /// Server certificate and key (SANs 127.0.0.1 and localhost).
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Client certificate and key, signed by `ca`.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// An unrelated CA, for "wrong CA" tests.
    pub other_ca: PathBuf,
    /// A client certificate and key signed by `other_ca`.
    pub stranger_cert: PathBuf,
    pub stranger_key: PathBuf,
}

/// A running private etcd.
pub struct Etcd {
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    tls: Option<TlsFiles>,
    child: Option<Child>,
    /// Unique per server in this process, for names and prefixes.
    id: String,
}

static SERVERS: AtomicU32 = AtomicU32::new(0);

/// Whether `etcd` is on PATH; prints the loud skip line if not.
pub fn etcd_available(test: &str) -> bool {
    let found = testkit::on_path("etcd");
    if !found {
        testkit::skip(
            test,
            "the etcd binary is not on PATH (install it: apt-get install -y etcd-server)",
        );
    }
    found
}

/// A port nothing listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Etcd {
    /// Starts a plain-http etcd, or returns `None` after printing `SKIPPED:`.
    pub async fn start(test: &str) -> Option<Etcd> {
        if !etcd_available(test) {
            return None;
        }
        Some(Self::launch(test, false).await.expect("start etcd"))
    }

    /// Starts an etcd serving https that requires client certificates (`--client-cert-auth`).
    pub async fn start_tls(test: &str) -> Option<Etcd> {
        if !etcd_available(test) {
            return None;
        }
        Some(Self::launch(test, true).await.expect("start etcd with TLS"))
    }

    async fn launch(test: &str, tls: bool) -> anyhow::Result<Etcd> {
        let mut last = None;
        // A port picked free can be taken by a parallel test before etcd binds it: retry.
        for _ in 0..3 {
            let n = SERVERS.fetch_add(1, Ordering::Relaxed);
            let dir = tempfile::Builder::new()
                .prefix(&format!("cnkt-etcd-{}-", std::process::id()))
                .tempdir()?;
            let tls = if tls {
                Some(make_certs(dir.path())?)
            } else {
                None
            };
            let mut etcd = Etcd {
                dir,
                client_port: free_port()?,
                peer_port: free_port()?,
                tls,
                child: None,
                id: format!("{test}-{}-{n}", std::process::id()),
            };
            match etcd.spawn().await {
                Ok(()) => return Ok(etcd),
                Err(e) => {
                    eprintln!("etcd did not start ({e:#}); trying other ports");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("etcd did not start")))
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.client_port)
    }

    /// The TLS files, for a TLS server.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// A per-server prefix, so even tests sharing an etcd would not collide.
    pub fn prefix(&self) -> String {
        format!("/cnkt-{}", self.id.replace(['/', ' '], "-"))
    }

    /// A working configuration: endpoint, prefix, short timeouts, TLS files if any.
    pub fn config(&self) -> Config {
        let mut c = Config::new([self.endpoint()]);
        c.prefix = self.prefix();
        c.timeout_ms = 3_000;
        c.dial_timeout_ms = 1_000;
        if let Some(t) = &self.tls {
            c.ca_file = Some(t.ca.clone());
            c.cert_file = Some(t.client_cert.clone());
            c.key_file = Some(t.client_key.clone());
        }
        c
    }

    /// The temp dir (data, log, certificates).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// The end of the server log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let client = self.endpoint();
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg("cnkt")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("cnkt={peer}"))
            .arg("--initial-cluster-token")
            .arg(&self.id)
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            .arg("--log-level")
            .arg("warn");
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        // If the test process dies without running destructors (SIGKILL), take etcd along.
        // SAFETY: between fork and exec only the async-signal-safe prctl(2) runs.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("spawn etcd")?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        let mut config = self.config();
        config.timeout_ms = 1_000;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!("etcd exited with {status}:\n{}", self.log_tail());
            }
            if let Ok(conn) = Connection::connect(&config).await
                && conn.ping().await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd not ready after {READY_WITHIN:?}:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the server with SIGTERM (by PID) and waits for it to exit.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the server again on the same data dir and ports, and waits until it serves.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        self.spawn().await
    }

    /// Restarts the server on the same data dir with another client port: clients of the old
    /// endpoint cannot reach it until it moves back.
    pub async fn move_to(&mut self, client_port: u16) -> anyhow::Result<()> {
        self.stop().await;
        self.client_port = client_port;
        self.spawn().await
    }

    /// The client port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// Starts the stopped server again.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "etcd is running");
        self.spawn().await
    }

    /// A raw etcd client, for what the crate does not offer (compaction).
    pub async fn raw_client(&self) -> anyhow::Result<etcd_client::Client> {
        let mut options = etcd_client::ConnectOptions::new()
            .with_timeout(Duration::from_secs(5))
            .with_connect_timeout(Duration::from_secs(2));
        if let Some(t) = &self.tls {
            let tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(&t.ca)?))
                .identity(etcd_client::Identity::from_pem(
                    std::fs::read(&t.client_cert)?,
                    std::fs::read(&t.client_key)?,
                ));
            options = options.with_tls(tls);
        }
        Ok(etcd_client::Client::connect([self.endpoint()], Some(options)).await?)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // By PID, through our own Child handle.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Makes a CA, a server and a client certificate signed by it, and an unrelated CA with its
/// own client certificate.
fn make_certs(dir: &Path) -> anyhow::Result<TlsFiles> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };

    fn ca(name: &str) -> anyhow::Result<(String, Issuer<'static, KeyPair>)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key)?;
        Ok((cert.pem(), Issuer::new(params, key)))
    }

    fn leaf(
        issuer: &Issuer<'static, KeyPair>,
        name: &str,
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    let (ca_pem, ca_issuer) = ca("cnikit test CA")?;
    let (other_pem, other_issuer) = ca("unrelated CA")?;
    let (server_cert, server_key) = leaf(
        &ca_issuer,
        "etcd",
        &["127.0.0.1", "localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_cert, client_key) = leaf(
        &ca_issuer,
        "cnikit",
        &[],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let (stranger_cert, stranger_key) = leaf(
        &other_issuer,
        "stranger",
        &[],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    };
    Ok(TlsFiles {
        ca: write("ca.pem", &ca_pem)?,
        server_cert: write("server.pem", &server_cert)?,
        server_key: write("server-key.pem", &server_key)?,
        client_cert: write("client.pem", &client_cert)?,
        client_key: write("client-key.pem", &client_key)?,
        other_ca: write("other-ca.pem", &other_pem)?,
        stranger_cert: write("stranger.pem", &stranger_cert)?,
        stranger_key: write("stranger-key.pem", &stranger_key)?,
    })
}
