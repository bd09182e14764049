//! The crate's error type.

use std::net::{IpAddr, SocketAddr};

use cni_core::ErrorCode;

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the BGP mode.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `reconcile` was called before `init` succeeded.
    #[error("bgp is not initialized: init must succeed before reconcile")]
    NotInitialized,
    /// A configuration value is wrong.
    #[error("invalid {field}: {reason}")]
    Config {
        /// The key.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The node's address is not IPv4: the speaker needs one as its BGP identifier.
    #[error("the node address {address} is not IPv4: the BGP speaker needs an IPv4 router id")]
    NotIpv4 {
        /// The node address.
        address: IpAddr,
    },
    /// The listening socket could not be opened.
    #[error("cannot listen on {address}")]
    Listen {
        /// Where.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// BIRD could not be started, or its files written.
    #[error("bird engine: {what}")]
    Bird {
        /// What failed (which file or command).
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// BIRD refused its configuration, or did not answer on its control socket.
    #[error("bird engine: {what}: {output}")]
    BirdSaid {
        /// What was asked.
        what: &'static str,
        /// What `birdc` printed.
        output: String,
    },
    /// The node description is wrong or the kernel failed.
    #[error(transparent)]
    Core(#[from] cni_core::Error),
}

impl Error {
    /// The CNI error code: 50 before init, 7 for a bad configuration or node address, 101
    /// when the listening socket cannot be opened or BIRD fails, else the code of the
    /// cause.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::NotInitialized => ErrorCode::NOT_AVAILABLE,
            Error::Config { .. } | Error::NotIpv4 { .. } => ErrorCode::INVALID_CONFIG,
            Error::Listen { .. } | Error::Bird { .. } | Error::BirdSaid { .. } => ErrorCode::KERNEL,
            Error::Core(e) => e.code(),
        }
    }
}

impl From<Error> for cni_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Core(e) => e,
            other => cni_core::Error::External {
                what: crate::TYPE,
                code: other.code(),
                source: Box::new(other),
            },
        }
    }
}
