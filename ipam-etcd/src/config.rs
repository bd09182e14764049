//! The `ipam.store` configuration object of type [`TYPE`].

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The `type` of the store configuration object this crate reads.
pub const TYPE: &str = "etcd";

/// The key prefix used when the configuration names none.
pub const DEFAULT_PREFIX: &str = "/cnikit";

/// Per-request deadline used when the configuration names none, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;

/// Connect (TCP + TLS handshake) deadline used when the configuration names none, in
/// milliseconds.
pub const DEFAULT_DIAL_TIMEOUT_MS: u64 = 2_000;

/// Where the configuration object sits in a CNI network configuration; errors name fields
/// under it.
const FIELD: &str = "ipam.store";

/// How to reach etcd: the `ipam.store` object of a network configuration.
///
/// ```json
/// {
///   "type": "etcd",
///   "endpoints": ["https://10.0.0.1:2379", "https://10.0.0.2:2379"],
///   "prefix": "/cnikit",
///   "caFile": "/etc/cnikit/etcd/ca.crt",
///   "certFile": "/etc/cnikit/etcd/client.crt",
///   "keyFile": "/etc/cnikit/etcd/client.key",
///   "timeoutMs": 5000,
///   "dialTimeoutMs": 2000
/// }
/// ```
///
/// `type` is read by whoever picks the store (a `#[serde(tag = "type")]` enum, or
/// [`Config::from_value`]); the struct itself holds the rest. Unknown keys are refused, so a
/// misspelt `cafile` is an error instead of a silently plain connection.
///
/// Files are read only when connecting ([`Connection::connect`](crate::Connection::connect));
/// [`validate`](Config::validate) has no side effects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Client URLs of the etcd members: all `http://` or all `https://`.
    pub endpoints: Vec<String>,
    /// Prefix of every cnikit key (default `/cnikit`): several clusters or networks can share
    /// one etcd.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// PEM file of the CA that signed the etcd server certificates. Without it, `https`
    /// endpoints are verified against the system's root certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for etcd run with `--client-cert-auth`. Needs `keyFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate. Needs `certFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// User name, for etcd with authentication enabled. Needs `passwordFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// File holding the user's password (trailing newline ignored). Needs `username`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Deadline of every request, in milliseconds (default 5000).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Deadline of connecting to a member, TLS handshake included, in milliseconds
    /// (default 2000).
    #[serde(default = "default_dial_timeout_ms")]
    pub dial_timeout_ms: u64,
}

fn default_prefix() -> String {
    DEFAULT_PREFIX.to_owned()
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

fn default_dial_timeout_ms() -> u64 {
    DEFAULT_DIAL_TIMEOUT_MS
}

/// The scheme all endpoints share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    Http,
    Https,
}

impl Config {
    /// A plain configuration for these endpoints, with the default prefix and timeouts.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Config {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: default_prefix(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password_file: None,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            dial_timeout_ms: DEFAULT_DIAL_TIMEOUT_MS,
        }
    }

    /// Reads the `ipam.store` object, `type` included (it must be [`TYPE`] if present).
    ///
    /// Errors: 7 naming the field that does not decode. Does not [`validate`](Self::validate).
    pub fn from_value(value: &serde_json::Value) -> Result<Self> {
        let mut object = match value {
            serde_json::Value::Object(map) => map.clone(),
            _ => return Err(Error::config(FIELD, "must be a JSON object")),
        };
        match object.remove("type") {
            None => {}
            Some(serde_json::Value::String(t)) if t == TYPE => {}
            Some(other) => {
                return Err(Error::config(
                    format!("{FIELD}.type"),
                    format!("is {other}, this store is {TYPE:?}"),
                ));
            }
        }
        serde_json::from_value(serde_json::Value::Object(object))
            .map_err(|e| Error::config(FIELD, e.to_string()))
    }

    /// Checks the configuration without touching the network or the file system.
    ///
    /// Errors: 7 naming the field: no endpoints, an endpoint that is not an `http(s)://host:port`
    /// URL (or carries credentials), `http` mixed with `https`, TLS files with `http`, `certFile`
    /// without `keyFile` or the other way round, `username` without `passwordFile` or the
    /// other way round, a prefix that is not `/`-led, or a zero timeout.
    pub fn validate(&self) -> Result<()> {
        self.scheme()?;
        let p = &self.prefix;
        if !p.starts_with('/') || p.len() < 2 || p.ends_with('/') || p.contains("//") {
            return Err(Error::config(
                format!("{FIELD}.prefix"),
                format!("{p:?} must look like /name or /name/sub (leading /, no trailing /)"),
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            let (given, missing) = if self.cert_file.is_some() {
                ("certFile", "keyFile")
            } else {
                ("keyFile", "certFile")
            };
            return Err(Error::config(
                format!("{FIELD}.{missing}"),
                format!("is required when {given} is given"),
            ));
        }
        if self.username.is_some() != self.password_file.is_some() {
            let (given, missing) = if self.username.is_some() {
                ("username", "passwordFile")
            } else {
                ("passwordFile", "username")
            };
            return Err(Error::config(
                format!("{FIELD}.{missing}"),
                format!("is required when {given} is given"),
            ));
        }
        if self.username.as_deref() == Some("") {
            return Err(Error::config(format!("{FIELD}.username"), "is empty"));
        }
        if self.timeout_ms == 0 {
            return Err(Error::config(format!("{FIELD}.timeoutMs"), "must be > 0"));
        }
        if self.dial_timeout_ms == 0 {
            return Err(Error::config(
                format!("{FIELD}.dialTimeoutMs"),
                "must be > 0",
            ));
        }
        Ok(())
    }

    /// The scheme of the endpoints, after checking each of them and the TLS files against it.
    pub(crate) fn scheme(&self) -> Result<Scheme> {
        let field = format!("{FIELD}.endpoints");
        if self.endpoints.is_empty() {
            return Err(Error::config(field, "needs at least one etcd client URL"));
        }
        let mut scheme = None;
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            let this = check_endpoint(endpoint).map_err(|reason| {
                Error::config(
                    format!("{field}[{i}]"),
                    format!("{:?}: {reason}", redact(endpoint)),
                )
            })?;
            match scheme {
                None => scheme = Some(this),
                Some(s) if s != this => {
                    return Err(Error::config(
                        field,
                        "mixes http:// and https:// endpoints; use one scheme for all",
                    ));
                }
                Some(_) => {}
            }
        }
        let scheme = scheme.unwrap_or(Scheme::Http);
        if scheme == Scheme::Http {
            for (name, file) in [
                ("caFile", &self.ca_file),
                ("certFile", &self.cert_file),
                ("keyFile", &self.key_file),
            ] {
                if file.is_some() {
                    return Err(Error::config(
                        format!("{FIELD}.{name}"),
                        "is a TLS setting but the endpoints are http://; use https:// endpoints",
                    ));
                }
            }
        }
        Ok(scheme)
    }

    /// Per-request deadline.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Connect deadline.
    pub fn dial_timeout(&self) -> Duration {
        Duration::from_millis(self.dial_timeout_ms)
    }

    /// The endpoints as one string for messages: `http://a:2379,http://b:2379`.
    pub fn describe_endpoints(&self) -> String {
        self.endpoints.join(",")
    }
}

/// The endpoint with any `user:password@` replaced, fit for a message.
fn redact(endpoint: &str) -> String {
    if let Some((scheme, rest)) = endpoint.split_once("://") {
        let authority_end = rest.find('/').unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            return format!("{scheme}://***@{}", &rest[at + 1..]);
        }
    } else if let Some(at) = endpoint.rfind('@') {
        return format!("***@{}", &endpoint[at + 1..]);
    }
    endpoint.to_owned()
}

/// Checks one endpoint URL; the reason is for a person.
fn check_endpoint(endpoint: &str) -> Result<Scheme, String> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e: http::uri::InvalidUri| format!("not a URL ({e})"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::Http,
        Some("https") => Scheme::Https,
        Some(other) => return Err(format!("scheme {other} is not http or https")),
        None => return Err("needs a scheme: http://host:port or https://host:port".into()),
    };
    let Some(authority) = uri.authority() else {
        return Err("has no host".into());
    };
    if authority.as_str().contains('@') {
        // Credentials in a URL end up in logs; the password belongs in passwordFile.
        return Err("must not carry credentials; use username and passwordFile".into());
    }
    if authority.host().is_empty() {
        return Err("has no host".into());
    }
    if authority.port().is_none() {
        return Err("has no port (etcd listens on 2379 by default)".into());
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("must not have a path or query".into());
    }
    Ok(scheme)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field_of(e: Error) -> String {
        assert_eq!(e.code().0, 7, "{e}");
        match e {
            Error::InvalidConfig { field, .. } => field,
            other => panic!("not a config error: {other}"),
        }
    }

    #[test]
    fn full_object_decodes() {
        let c = Config::from_value(&json!({
            "type": "etcd",
            "endpoints": ["https://127.0.0.1:2379", "https://[::1]:2379"],
            "prefix": "/k8s/cnikit",
            "caFile": "/etc/ca.pem",
            "certFile": "/etc/c.pem",
            "keyFile": "/etc/k.pem",
            "timeoutMs": 1500
        }))
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.prefix, "/k8s/cnikit");
        assert_eq!(c.timeout(), Duration::from_millis(1500));
        assert_eq!(c.dial_timeout_ms, DEFAULT_DIAL_TIMEOUT_MS);
        assert_eq!(c.scheme().unwrap(), Scheme::Https);
    }

    #[test]
    fn defaults() {
        let c = Config::from_value(&json!({"endpoints": ["http://127.0.0.1:2379"]})).unwrap();
        c.validate().unwrap();
        assert_eq!(c, Config::new(["http://127.0.0.1:2379"]));
        assert_eq!(c.prefix, "/cnikit");
        assert_eq!(c.timeout_ms, 5000);
    }

    #[test]
    fn wrong_type_and_unknown_fields_are_refused() {
        let e = Config::from_value(&json!({"type": "file", "endpoints": []})).unwrap_err();
        assert_eq!(field_of(e), "ipam.store.type");
        let e =
            Config::from_value(&json!({"endpoints": ["http://a:1"], "cafile": "/x"})).unwrap_err();
        assert!(e.to_string().contains("cafile"), "{e}");
        let e = Config::from_value(&json!(["http://a:1"])).unwrap_err();
        assert_eq!(field_of(e), "ipam.store");
    }

    #[test]
    fn bad_endpoints_are_named() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "ipam.store.endpoints"),
            (&["127.0.0.1:2379"], "ipam.store.endpoints[0]"),
            (
                &["http://127.0.0.1:2379", "ftp://x:1"],
                "ipam.store.endpoints[1]",
            ),
            (&["http://127.0.0.1"], "ipam.store.endpoints[0]"),
            (
                &["http://user:secret@127.0.0.1:2379"],
                "ipam.store.endpoints[0]",
            ),
            (&["http://127.0.0.1:2379/v3"], "ipam.store.endpoints[0]"),
            (&["http:// bad"], "ipam.store.endpoints[0]"),
            (&["http://a:1", "https://b:1"], "ipam.store.endpoints"),
        ];
        for (endpoints, field) in cases {
            let e = Config::new(endpoints.iter().copied())
                .validate()
                .unwrap_err();
            let msg = e.to_string();
            assert_eq!(field_of(e), *field, "{endpoints:?}: {msg}");
            assert!(!msg.contains("secret"), "{msg}");
        }
    }

    #[test]
    fn credentials_in_urls_are_refused_without_echoing_them_elsewhere() {
        for endpoint in [
            "http://user:hunter2@127.0.0.1:2379",
            "user:hunter2@127.0.0.1:2379",
        ] {
            let e = Config::new([endpoint]).validate().unwrap_err();
            let msg = e.to_string();
            assert!(!msg.contains("hunter2"), "{msg}");
            assert!(!format!("{e:?}").contains("hunter2"), "{e:?}");
        }
        let e = Config::new(["http://user:hunter2@127.0.0.1:2379"])
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("passwordFile"), "{e}");
    }

    #[test]
    fn tls_pairs_and_schemes() {
        let mut c = Config::new(["https://127.0.0.1:2379"]);
        c.cert_file = Some("/c.pem".into());
        assert_eq!(field_of(c.validate().unwrap_err()), "ipam.store.keyFile");
        c.cert_file = None;
        c.key_file = Some("/k.pem".into());
        assert_eq!(field_of(c.validate().unwrap_err()), "ipam.store.certFile");
        c.cert_file = Some("/c.pem".into());
        c.validate().unwrap();
        // https without caFile: system roots.
        assert!(c.ca_file.is_none());

        let mut c = Config::new(["http://127.0.0.1:2379"]);
        c.ca_file = Some("/ca.pem".into());
        assert_eq!(field_of(c.validate().unwrap_err()), "ipam.store.caFile");
    }

    #[test]
    fn auth_pairs() {
        let mut c = Config::new(["http://127.0.0.1:2379"]);
        c.username = Some("root".into());
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "ipam.store.passwordFile"
        );
        c.username = None;
        c.password_file = Some("/pw".into());
        assert_eq!(field_of(c.validate().unwrap_err()), "ipam.store.username");
    }

    #[test]
    fn prefix_and_timeouts() {
        for bad in ["", "/", "cnikit", "/cnikit/", "/a//b"] {
            let mut c = Config::new(["http://127.0.0.1:2379"]);
            c.prefix = bad.into();
            assert_eq!(
                field_of(c.validate().unwrap_err()),
                "ipam.store.prefix",
                "{bad:?}"
            );
        }
        let mut c = Config::new(["http://127.0.0.1:2379"]);
        c.timeout_ms = 0;
        assert_eq!(field_of(c.validate().unwrap_err()), "ipam.store.timeoutMs");
        c.timeout_ms = 1;
        c.dial_timeout_ms = 0;
        assert_eq!(
            field_of(c.validate().unwrap_err()),
            "ipam.store.dialTimeoutMs"
        );
    }

    #[test]
    fn validate_touches_no_files() {
        let mut c = Config::new(["https://127.0.0.1:2379"]);
        c.ca_file = Some("/nonexistent/ca.pem".into());
        c.cert_file = Some("/nonexistent/c.pem".into());
        c.key_file = Some("/nonexistent/k.pem".into());
        c.validate().unwrap();
    }
}
