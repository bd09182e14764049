//! The crate's error type and its mapping to CNI error codes.

use std::path::PathBuf;

use cni_core::{ErrorCode, StoreError};

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to etcd.
///
/// Messages name the endpoints and the configuration field at fault; they never contain
/// secrets (key material, passwords), only file paths.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration field is missing or invalid.
    #[error("invalid etcd store configuration: {field}: {reason}")]
    InvalidConfig {
        /// The offending key (dotted path, like `ipam.store.endpoints`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A file named by the configuration (certificate, key, password) cannot be used.
    #[error("invalid etcd store configuration: {field} {}: {reason}", path.display())]
    File {
        /// The configuration key naming the file (like `ipam.store.keyFile`).
        field: String,
        /// The file.
        path: PathBuf,
        /// What is wrong with it (never its contents).
        reason: String,
        /// The I/O failure, if that is what it was.
        #[source]
        source: Option<std::io::Error>,
    },
    /// etcd cannot be reached, the connection broke, or the TLS handshake failed.
    #[error("etcd {endpoints} is unavailable ({op}): {reason}")]
    Unavailable {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// What was being done.
        op: &'static str,
        /// The root cause, in words (like `Connection refused` or `invalid peer certificate`).
        reason: String,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },
    /// etcd did not answer in time.
    #[error("etcd {endpoints} timed out after {millis} ms ({op})")]
    Timeout {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// What was being done.
        op: &'static str,
        /// The deadline that passed.
        millis: u64,
    },
    /// etcd refused the credentials or the operation (authentication, permissions).
    #[error("etcd {endpoints} denied {op}: {reason}")]
    Denied {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// What was being done.
        op: &'static str,
        /// etcd's reason.
        reason: String,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },
    /// etcd answered the request with an error (too many operations, no space, no leader).
    #[error("etcd {endpoints} rejected {op}: {reason}")]
    Rejected {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// What was being done.
        op: &'static str,
        /// etcd's reason.
        reason: String,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },
    /// A node record stored in etcd does not decode.
    #[error("node record at {key} is corrupt")]
    CorruptRecord {
        /// The key.
        key: String,
        /// The decoding failure.
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// The CNI error code: the one place where this crate's errors map to codes.
    ///
    /// 7 for configuration (including refused credentials), 11 for anything retrying later may
    /// fix (unreachable, timed out, rejected by the server), 5 for corrupt data.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidConfig { .. } | Error::File { .. } | Error::Denied { .. } => {
                ErrorCode::INVALID_CONFIG
            }
            Error::Unavailable { .. } | Error::Timeout { .. } | Error::Rejected { .. } => {
                ErrorCode::TRY_AGAIN_LATER
            }
            Error::CorruptRecord { .. } => ErrorCode::IO_FAILURE,
        }
    }

    /// Shorthand for [`Error::InvalidConfig`].
    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Classifies a failed etcd request.
    pub(crate) fn from_etcd(endpoints: &str, op: &'static str, source: etcd_client::Error) -> Self {
        let endpoints = endpoints.to_owned();
        let reason = root_cause(&source);
        match classify(&source) {
            Class::Unavailable => Error::Unavailable {
                endpoints,
                op,
                reason,
                source,
            },
            Class::Denied => Error::Denied {
                endpoints,
                op,
                reason,
                source,
            },
            Class::Rejected => Error::Rejected {
                endpoints,
                op,
                reason,
                source,
            },
        }
    }

    /// Whether etcd said the lease does not exist (expired, revoked, or lost with its data).
    pub(crate) fn is_lease_not_found(&self) -> bool {
        match self {
            Error::Rejected { reason, .. } => reason.contains("requested lease not found"),
            _ => false,
        }
    }
}

/// How a failed request is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Unavailable,
    Denied,
    Rejected,
}

/// Sorts a client error by what the caller can do about it.
fn classify(e: &etcd_client::Error) -> Class {
    use etcd_client::Error as E;
    use tonic::Code;
    match e {
        // Only the status code is stable; etcd's messages are for people.
        E::GRpcStatus(status) => match status.code() {
            Code::Unauthenticated | Code::PermissionDenied => Class::Denied,
            // etcd answers a wrong password, or none where one is needed, with InvalidArgument.
            Code::InvalidArgument
                if ["authentication failed", "user name is empty"]
                    .iter()
                    .any(|m| status.message().contains(m)) =>
            {
                Class::Denied
            }
            // Transport failures surface as Unknown or Unavailable.
            Code::Unknown | Code::Cancelled | Code::DeadlineExceeded | Code::Unavailable => {
                Class::Unavailable
            }
            _ => Class::Rejected,
        },
        E::TransportError(_)
        | E::IoError(_)
        | E::WatchError(_)
        | E::LeaseKeepAliveError(_)
        | E::EndpointError(_) => Class::Unavailable,
        _ => Class::Rejected,
    }
}

/// Whether the client gave up on a request because its deadline passed: the client's own
/// deadline (configured equal to `timeoutMs`) fires as a cancelled status, etcd's as
/// `DeadlineExceeded`. Such failures are reported as [`Error::Timeout`].
pub(crate) fn is_deadline(e: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(status) = e else {
        return false;
    };
    match status.code() {
        tonic::Code::DeadlineExceeded => return true,
        tonic::Code::Cancelled if status.message() == "Timeout expired" => return true,
        _ => {}
    }
    let mut next = std::error::Error::source(status);
    while let Some(err) = next {
        if err.downcast_ref::<tonic::TimeoutExpired>().is_some() {
            return true;
        }
        next = err.source();
    }
    false
}

/// The chain of causes of a client error, in words, without repeats: what a person needs to
/// see (like `tcp connect error: Connection refused (os error 111)`).
pub(crate) fn root_cause(e: &etcd_client::Error) -> String {
    use etcd_client::Error as E;
    use std::error::Error as _;
    // The client's error has no `source()`: open its variants by hand.
    let (first, mut next): (String, Option<&(dyn std::error::Error + 'static)>) = match e {
        E::GRpcStatus(s) => (s.message().to_owned(), s.source()),
        E::TransportError(t) => (String::new(), t.source()),
        E::IoError(io) => (io.to_string(), io.source()),
        other => (other.to_string(), None),
    };
    let mut parts: Vec<String> = Vec::new();
    let mut push = |text: String| {
        let text = text.trim().to_owned();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    };
    push(first);
    while let Some(err) = next {
        let text = err.to_string();
        // tonic's wrapper says only "transport error"; the interesting part is below it.
        if text != "transport error" {
            push(text);
        }
        next = err.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

impl From<Error> for StoreError {
    fn from(e: Error) -> Self {
        match e {
            Error::Timeout {
                endpoints,
                op,
                millis,
            } => StoreError::Timeout {
                endpoint: endpoints,
                op,
                millis,
            },
            Error::InvalidConfig { .. } | Error::File { .. } | Error::Denied { .. } => {
                StoreError::Config {
                    reason: e.to_string(),
                    source: Some(Box::new(e)),
                }
            }
            Error::Unavailable { ref endpoints, .. } | Error::Rejected { ref endpoints, .. } => {
                StoreError::Unavailable {
                    endpoint: endpoints.clone(),
                    source: Box::new(e),
                }
            }
            Error::CorruptRecord { key, source } => StoreError::Corrupt { key, source },
        }
    }
}

impl From<Error> for cni_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidConfig { field, reason } => {
                cni_core::Error::InvalidConfig { field, reason }
            }
            other => cni_core::Error::Store(other.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(
            Error::config("ipam.store.endpoints", "empty").code(),
            ErrorCode(7)
        );
        assert_eq!(
            Error::Timeout {
                endpoints: "http://127.0.0.1:1".into(),
                op: "get",
                millis: 10
            }
            .code(),
            ErrorCode(11)
        );
        let denied = Error::from_etcd(
            "e",
            "get",
            status(
                tonic::Code::Unauthenticated,
                "etcdserver: invalid auth token",
            ),
        );
        assert_eq!(denied.code(), ErrorCode(7));
        let gone = Error::from_etcd(
            "e",
            "get",
            status(tonic::Code::Unavailable, "connection refused"),
        );
        assert_eq!(gone.code(), ErrorCode(11));
        let rejected = Error::from_etcd(
            "e",
            "lease keep-alive",
            status(
                tonic::Code::NotFound,
                "etcdserver: requested lease not found",
            ),
        );
        assert!(rejected.is_lease_not_found());
        assert_eq!(rejected.code(), ErrorCode(11));
    }

    #[test]
    fn conversions_keep_codes() {
        let e = Error::Timeout {
            endpoints: "http://127.0.0.1:1".into(),
            op: "txn",
            millis: 10,
        };
        let s: StoreError = e.into();
        assert_eq!(s.code(), ErrorCode(11));
        assert!(s.to_string().contains("http://127.0.0.1:1"), "{s}");
        let c: cni_core::Error = Error::config("ipam.store.prefix", "must start with /").into();
        assert_eq!(c.code(), ErrorCode(7));
        assert!(c.to_string().contains("ipam.store.prefix"), "{c}");
        let c: cni_core::Error = Error::File {
            field: "ipam.store.keyFile".into(),
            path: "/nonexistent/key.pem".into(),
            reason: "cannot read".into(),
            source: None,
        }
        .into();
        assert_eq!(c.code(), ErrorCode(7));
    }

    #[test]
    fn client_deadlines_are_timeouts() {
        let expired = etcd_client::Error::GRpcStatus(tonic::Status::from_error(Box::new(
            tonic::TimeoutExpired(()),
        )));
        assert!(is_deadline(&expired), "{expired:?}");
        assert!(is_deadline(&status(
            tonic::Code::DeadlineExceeded,
            "context deadline exceeded"
        )));
        assert!(!is_deadline(&status(
            tonic::Code::Cancelled,
            "the client went away"
        )));
        assert!(!is_deadline(&status(
            tonic::Code::Unavailable,
            "connection refused"
        )));
    }

    fn status(code: tonic::Code, msg: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg))
    }
}
