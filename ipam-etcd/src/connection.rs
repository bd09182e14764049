//! The connection to etcd that the store and the registry share: TLS, credentials, deadlines
//! and the round-trip counter.

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};

use crate::config::{Config, Scheme};
use crate::error::{Error, Result, is_deadline, root_cause};

/// HTTP/2 ping interval on the connection, so a dead member is noticed by long-lived watch
/// and keep-alive streams. etcd refuses pings more often than every 5 s by default.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// A connection to an etcd cluster, cheap to clone; clones share the connection and the
/// round-trip counter.
///
/// Connecting does no network I/O unless `username` is configured (then it authenticates):
/// the TCP and TLS connection is made by the first request, inside that request's deadline.
/// Every request is bounded by `timeoutMs`; connecting to a member by `dialTimeoutMs`.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    endpoints: String,
    prefix: String,
    timeout: Duration,
    round_trips: AtomicU64,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only what is safe to log: the client holds credentials.
        f.debug_struct("Connection")
            .field("endpoints", &self.inner.endpoints)
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .field("round_trips", &self.round_trips())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Validates the configuration, reads its certificate, key and password files, and sets up
    /// the client.
    ///
    /// Errors: 7 for an invalid configuration or an unreadable or malformed file (naming the
    /// field and path, never the contents), 7 when etcd refuses the credentials, 11 when etcd
    /// is unreachable while authenticating.
    pub async fn connect(config: &Config) -> Result<Self> {
        config.validate()?;
        let scheme = config.scheme()?;
        let endpoints = config.describe_endpoints();
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.dial_timeout())
            .with_timeout(config.timeout())
            .with_keep_alive(KEEPALIVE_INTERVAL, config.timeout());
        if scheme == Scheme::Https {
            options = options.with_tls(tls_options(config).await?);
        }
        let mut authenticates = false;
        if let (Some(user), Some(file)) = (&config.username, &config.password_file) {
            options = options.with_user(user.clone(), read_password(file).await?);
            authenticates = true;
        }
        let connecting = Client::connect(&config.endpoints, Some(options));
        let client = match tokio::time::timeout(config.timeout(), connecting).await {
            Err(_) => {
                return Err(Error::Timeout {
                    endpoints,
                    op: "authenticate",
                    millis: duration_millis(config.timeout()),
                });
            }
            // Transport errors come only from building the endpoints, before any I/O: tonic
            // refused the certificates or key (unparsable, or a key not matching the
            // certificate). Failures of the network surface as gRPC statuses.
            Ok(Err(e @ etcd_client::Error::TransportError(_))) => {
                let cause = root_cause(&e);
                return Err(if cause.contains("native certs") {
                    Error::config(
                        "ipam.store.caFile",
                        format!("is not set and the system has no root certificates ({cause})"),
                    )
                } else if config.cert_file.is_some() {
                    Error::config(
                        "ipam.store.certFile",
                        format!(
                            "the TLS files are refused: {cause} (do certFile and keyFile belong together?)"
                        ),
                    )
                } else {
                    Error::config(
                        "ipam.store.caFile",
                        format!("the CA certificate is refused: {cause}"),
                    )
                });
            }
            Ok(Err(e)) => return Err(Error::from_etcd(&endpoints, "authenticate", e)),
            Ok(Ok(client)) => client,
        };
        Ok(Connection {
            inner: Arc::new(Inner {
                client,
                endpoints,
                prefix: config.prefix.clone(),
                timeout: config.timeout(),
                round_trips: AtomicU64::new(u64::from(authenticates)),
            }),
        })
    }

    /// How many requests this connection (and its clones) sent to etcd: unary calls, stream
    /// openings and lease keep-alive pings.
    pub fn round_trips(&self) -> u64 {
        self.inner.round_trips.load(Ordering::Relaxed)
    }

    /// The endpoints, comma-separated, as messages show them.
    pub fn endpoints(&self) -> &str {
        &self.inner.endpoints
    }

    /// The configured key prefix (like `/cnikit`).
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The per-request deadline.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// Asks etcd for a linearizable read of nothing: `Ok` when a member answers and the cluster
    /// has a leader. For CNI STATUS.
    ///
    /// Errors: 11 when etcd is unavailable or times out, 7 when it refuses the credentials.
    pub async fn ping(&self) -> Result<()> {
        let mut kv = self.inner.client.kv_client();
        let options = GetOptions::new().with_count_only();
        self.call("ping", kv.get(self.prefix(), Some(options)))
            .await
            .map(drop)
    }

    /// The underlying client (clones share its channel).
    pub(crate) fn client(&self) -> &Client {
        &self.inner.client
    }

    /// Counts one round trip.
    pub(crate) fn count(&self) {
        self.inner.round_trips.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs one request under the deadline, counting it and classifying its failure.
    pub(crate) async fn call<T, F>(&self, op: &'static str, request: F) -> Result<T>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.count();
        match tokio::time::timeout(self.inner.timeout, request).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if !is_deadline(&e) => Err(Error::from_etcd(&self.inner.endpoints, op, e)),
            // The client's own deadline, equal to ours, may fire first.
            Ok(Err(_)) | Err(_) => Err(Error::Timeout {
                endpoints: self.inner.endpoints.clone(),
                op,
                millis: duration_millis(self.inner.timeout),
            }),
        }
    }
}

/// Milliseconds of a deadline, for messages.
fn duration_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What a PEM file must hold.
#[derive(Clone, Copy)]
enum Pem {
    Certificate,
    PrivateKey,
}

/// Builds the TLS settings from the configured files.
async fn tls_options(config: &Config) -> Result<TlsOptions> {
    let mut tls = TlsOptions::new().timeout(config.dial_timeout());
    tls = match &config.ca_file {
        Some(path) => {
            let ca = read_pem(path, "caFile", Pem::Certificate).await?;
            tls.ca_certificate(Certificate::from_pem(ca))
        }
        None => tls.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
        let cert = read_pem(cert, "certFile", Pem::Certificate).await?;
        let key = read_pem(key, "keyFile", Pem::PrivateKey).await?;
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Ok(tls)
}

/// Reads a PEM file and checks it holds the right kind of block; errors never quote it.
async fn read_pem(path: &Path, name: &str, kind: Pem) -> Result<Vec<u8>> {
    let field = format!("ipam.store.{name}");
    let bytes = read_file(path, &field).await?;
    let text = String::from_utf8_lossy(&bytes);
    let ok = match kind {
        Pem::Certificate => text.contains("-----BEGIN CERTIFICATE-----"),
        Pem::PrivateKey => text
            .lines()
            .any(|l| l.starts_with("-----BEGIN ") && l.ends_with("PRIVATE KEY-----")),
    };
    if !ok {
        let wanted = match kind {
            Pem::Certificate => "a PEM certificate (-----BEGIN CERTIFICATE-----)",
            Pem::PrivateKey => "a PEM private key (-----BEGIN ... PRIVATE KEY-----)",
        };
        return Err(unusable(field, path, format!("does not hold {wanted}")));
    }
    Ok(bytes)
}

/// Reads the password file; a trailing newline is not part of the password.
async fn read_password(path: &Path) -> Result<String> {
    let field = "ipam.store.passwordFile";
    let bytes = read_file(path, field).await?;
    let text =
        String::from_utf8(bytes).map_err(|_| unusable(field.into(), path, "is not UTF-8"))?;
    let password = text.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(unusable(field.into(), path, "is empty"));
    }
    Ok(password.to_owned())
}

/// Reads a file the configuration names in `field`.
async fn read_file(path: &Path, field: &str) -> Result<Vec<u8>> {
    tokio::fs::read(path).await.map_err(|e| Error::File {
        field: field.to_owned(),
        path: path.to_owned(),
        reason: format!("cannot read: {e}"),
        source: Some(e),
    })
}

/// The error of a file named in `field` that reads but cannot be used.
fn unusable(field: String, path: &Path, reason: impl Into<String>) -> Error {
    Error::File {
        field,
        path: path.to_owned(),
        reason: reason.into(),
        source: None,
    }
}
