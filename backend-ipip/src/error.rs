//! The crate's error type.

use std::net::IpAddr;

use cni_core::ErrorCode;

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the IPIP backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is not valid.
    #[error("invalid ipip configuration: {field}: {reason}")]
    InvalidConfig {
        /// The key (`mode`, `device`, `mtu`).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The node's underlay address is not IPv4: IPIP carries IPv4 in IPv4.
    #[error("node underlay address {address} is not IPv4: ipip tunnels IPv4 in IPv4")]
    NotIpv4 {
        /// The underlay address.
        address: IpAddr,
    },
    /// The node has no IPv4 pod block, so no address for its tunnel device.
    #[error("node {node} has no IPv4 pod block to take its tunnel address from")]
    NoTunnelAddress {
        /// The node.
        node: String,
    },
    /// `reconcile` was called before `init` succeeded.
    #[error("ipip is not initialized: init must succeed before reconcile")]
    NotInitialized,
    /// The node description is wrong or the kernel failed.
    #[error(transparent)]
    Core(#[from] cni_core::Error),
}

impl Error {
    /// The CNI error code: 7 for configuration problems, 50 (not available) before init,
    /// else the code of the cause (101 for kernel failures).
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidConfig { .. } | Error::NotIpv4 { .. } | Error::NoTunnelAddress { .. } => {
                ErrorCode::INVALID_CONFIG
            }
            Error::NotInitialized => ErrorCode::NOT_AVAILABLE,
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
