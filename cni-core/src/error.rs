//! The crate's error type and its mapping to CNI error codes.

use std::path::PathBuf;

use crate::spec::Version;

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A CNI error code, as printed in the error JSON.
///
/// Codes 0–99 are the spec's well-known codes; 100 and above are cnikit's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// 1: incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: ErrorCode = ErrorCode(1);
    /// 2: unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: ErrorCode = ErrorCode(2);
    /// 3: container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: ErrorCode = ErrorCode(3);
    /// 4: invalid necessary environment variables.
    pub const INVALID_ENV: ErrorCode = ErrorCode(4);
    /// 5: I/O failure.
    pub const IO_FAILURE: ErrorCode = ErrorCode(5);
    /// 6: failed to decode content.
    pub const DECODE_FAILURE: ErrorCode = ErrorCode(6);
    /// 7: invalid network configuration.
    pub const INVALID_CONFIG: ErrorCode = ErrorCode(7);
    /// 11: try again later (datastore unavailable, timeouts, conflicts beyond retries).
    pub const TRY_AGAIN_LATER: ErrorCode = ErrorCode(11);
    /// 50: the plugin is not available (STATUS: not ready for ADD).
    pub const NOT_AVAILABLE: ErrorCode = ErrorCode(50);
    /// 51: not available, and existing containers may be disrupted.
    pub const NOT_AVAILABLE_DISRUPTED: ErrorCode = ErrorCode(51);
    /// 100: no free address (pool or node block limit exhausted).
    pub const NO_ADDRESS: ErrorCode = ErrorCode(100);
    /// 101: a kernel (netlink, sysctl, namespace) operation failed.
    pub const KERNEL: ErrorCode = ErrorCode(101);
    /// 102: a delegated plugin could not be run or printed nonsense.
    pub const DELEGATE: ErrorCode = ErrorCode(102);
}

/// A datastore failure, from any [`Store`](crate::store::Store) implementation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The datastore cannot be reached or answered with a transport error.
    #[error("datastore {endpoint} is unavailable")]
    Unavailable {
        /// Which datastore (endpoint list or file path), never with credentials.
        endpoint: String,
        /// The underlying failure.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The datastore did not answer in time.
    #[error("datastore {endpoint} timed out after {millis} ms during {op}")]
    Timeout {
        /// Which datastore.
        endpoint: String,
        /// What was being done.
        op: &'static str,
        /// The deadline.
        millis: u64,
    },
    /// Optimistic concurrency lost too often.
    #[error("datastore conflict on {what}: gave up after {attempts} attempts")]
    Conflict {
        /// What was contended (a key or a block).
        what: String,
        /// How many transactions were tried.
        attempts: u32,
    },
    /// A stored value does not decode.
    #[error("datastore value at {key} is corrupt")]
    Corrupt {
        /// The key.
        key: String,
        /// The decoding failure.
        #[source]
        source: serde_json::Error,
    },
    /// Local I/O failed (file store).
    #[error("datastore file {path} I/O failed")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The datastore configuration is wrong (bad endpoint, unreadable certificate).
    #[error("datastore configuration: {reason}")]
    Config {
        /// What is wrong, never with secrets.
        reason: String,
        /// The underlying failure, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl StoreError {
    /// The CNI error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::Unavailable { .. }
            | StoreError::Timeout { .. }
            | StoreError::Conflict { .. } => ErrorCode::TRY_AGAIN_LATER,
            StoreError::Corrupt { .. } | StoreError::Io { .. } => ErrorCode::IO_FAILURE,
            StoreError::Config { .. } => ErrorCode::INVALID_CONFIG,
        }
    }
}

/// Everything that can go wrong in cni-core.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration asks for a CNI version this plugin does not speak.
    #[error("incompatible CNI version {requested:?} (supported: {})", Version::ALL.map(|v| v.as_str()).join(", "))]
    IncompatibleVersion {
        /// The version asked for.
        requested: String,
    },
    /// A command exists only in newer spec versions than the configuration's.
    #[error("command {command} needs CNI version {needs} or later, the configuration has {has}")]
    CommandNeedsVersion {
        /// The command.
        command: &'static str,
        /// The oldest version that has it.
        needs: Version,
        /// The configuration's version.
        has: Version,
    },
    /// The configuration has a field this plugin does not support.
    #[error("unsupported field {field:?} in the network configuration: {reason}")]
    UnsupportedField {
        /// The key.
        field: String,
        /// Why it is not supported.
        reason: String,
    },
    /// The container (or its attachment) is unknown.
    #[error("unknown container {container_id} interface {ifname}")]
    UnknownContainer {
        /// `CNI_CONTAINERID`.
        container_id: String,
        /// `CNI_IFNAME`.
        ifname: String,
    },
    /// A `CNI_*` environment variable is missing or invalid.
    #[error("invalid environment variable {name}: {reason}")]
    InvalidEnv {
        /// The variable.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading or writing failed.
    #[error("I/O failure: {what}")]
    Io {
        /// What was being read or written.
        what: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// Input JSON does not decode.
    #[error("cannot decode {what}: {source}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// The failure.
        #[source]
        source: serde_json::Error,
    },
    /// The network configuration decodes but is not valid.
    #[error("invalid network configuration: {field}: {reason}")]
    InvalidConfig {
        /// The offending key (dotted path).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No address is left for this node.
    #[error("no free address in pool {pool}: {reason}")]
    NoAddress {
        /// The pool.
        pool: String,
        /// Why (every block taken, node block limit reached).
        reason: String,
    },
    /// A kernel operation failed.
    #[error("{what} failed: {source}")]
    Kernel {
        /// The operation, like the `ip` command it equals.
        what: String,
        /// The failure.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// ADD was to create an interface whose name is taken where it goes.
    #[error("interface {name} already exists in {place}")]
    LinkExists {
        /// The interface name.
        name: String,
        /// Where: the pod's network namespace (with its path) or the node's.
        place: String,
    },
    /// ADD of an attachment that already holds its addresses and whose interface exists: it
    /// is set up already (a repeated ADD). Its addresses stay allocated.
    #[error(
        "container {container_id} interface {ifname} is already set up (it holds \
         {addresses}): {source}; DEL it before adding it again"
    )]
    AlreadySetUp {
        /// `CNI_CONTAINERID`.
        container_id: String,
        /// `CNI_IFNAME`.
        ifname: String,
        /// The addresses the attachment holds, comma-separated.
        addresses: String,
        /// What the pod network found (an [`Error::LinkExists`]).
        #[source]
        source: Box<Error>,
    },
    /// `CNI_NETNS` does not name a network namespace.
    #[error("{path} is not a network namespace: {reason}")]
    NotANetns {
        /// The path given.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// A delegated plugin (IPAM) returned a CNI error; its code is passed on.
    #[error("plugin {plugin} failed with code {code}: {msg}")]
    Delegate {
        /// The plugin type.
        plugin: String,
        /// Its error code.
        code: u32,
        /// Its message.
        msg: String,
        /// Its details.
        details: Option<String>,
    },
    /// A delegated plugin could not be found, run, or understood.
    #[error("cannot run plugin {plugin}: {reason}")]
    DelegateExec {
        /// The plugin type.
        plugin: String,
        /// What went wrong.
        reason: String,
    },
    /// A plugin to exec is this process's own executable: running it with the same
    /// configuration would make it exec itself again, without end.
    #[error(
        "plugin {plugin} is {}, this plugin's own executable: it would exec itself \
         recursively (name another plugin)",
        .path.display()
    )]
    ExecSelf {
        /// The plugin type asked for.
        plugin: String,
        /// Where it was found in `CNI_PATH`.
        path: PathBuf,
    },
    /// STATUS: the plugin cannot take ADDs yet.
    #[error("not ready: {reason}")]
    NotReady {
        /// Why.
        reason: String,
    },
    /// An error from another cnikit crate (a backend, a store), with its own code.
    #[error("{what}: {source}")]
    External {
        /// Which part failed.
        what: &'static str,
        /// The CNI code the part chose.
        code: ErrorCode,
        /// The part's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Several failures at once (DEL runs every step and reports all).
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Multiple(Vec<Error>),
}

impl Error {
    /// The CNI error code: the one place where errors map to codes.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::IncompatibleVersion { .. } | Error::CommandNeedsVersion { .. } => {
                ErrorCode::INCOMPATIBLE_VERSION
            }
            Error::UnsupportedField { .. } => ErrorCode::UNSUPPORTED_FIELD,
            Error::UnknownContainer { .. } => ErrorCode::UNKNOWN_CONTAINER,
            Error::InvalidEnv { .. } | Error::NotANetns { .. } => ErrorCode::INVALID_ENV,
            Error::Io { .. } => ErrorCode::IO_FAILURE,
            Error::Decode { .. } => ErrorCode::DECODE_FAILURE,
            Error::InvalidConfig { .. } | Error::ExecSelf { .. } => ErrorCode::INVALID_CONFIG,
            Error::Store(e) => e.code(),
            Error::NoAddress { .. } => ErrorCode::NO_ADDRESS,
            Error::Kernel { .. } | Error::LinkExists { .. } | Error::AlreadySetUp { .. } => {
                ErrorCode::KERNEL
            }
            Error::Delegate { code, .. } => ErrorCode(*code),
            Error::DelegateExec { .. } => ErrorCode::DELEGATE,
            Error::NotReady { .. } => ErrorCode::NOT_AVAILABLE,
            Error::External { code, .. } => *code,
            Error::Multiple(errors) => errors
                .first()
                .map(Error::code)
                .unwrap_or(ErrorCode::IO_FAILURE),
        }
    }

    /// Shorthand for [`Error::InvalidConfig`].
    pub fn invalid_config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Kernel`].
    pub fn kernel(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Kernel {
            what: what.into(),
            source: source.into(),
        }
    }

    /// Folds the errors of a multi-step operation: `Ok` if there are none.
    pub fn collect(mut errors: Vec<Error>) -> Result<()> {
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(Error::Multiple(errors)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_spec() {
        let io = std::io::Error::other("x");
        assert_eq!(
            Error::IncompatibleVersion {
                requested: "9".into()
            }
            .code(),
            ErrorCode(1)
        );
        assert_eq!(
            Error::Io {
                what: "stdin".into(),
                source: io
            }
            .code(),
            ErrorCode(5)
        );
        assert_eq!(
            Error::invalid_config("ipam.pool", "bad").code(),
            ErrorCode(7)
        );
        assert_eq!(
            Error::Store(StoreError::Conflict {
                what: "k".into(),
                attempts: 3
            })
            .code(),
            ErrorCode(11)
        );
        assert_eq!(Error::NotReady { reason: "x".into() }.code(), ErrorCode(50));
    }
}
