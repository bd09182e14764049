//! The crate's error type.

use cni_core::ErrorCode;

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in host-gw.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `reconcile` was called before `init` succeeded.
    #[error("host-gw is not initialized: init must succeed before reconcile")]
    NotInitialized,
    /// The node description is wrong or the kernel failed.
    #[error(transparent)]
    Core(#[from] cni_core::Error),
}

impl Error {
    /// The CNI error code: 50 (not available) before init, else the code of the cause
    /// (7 for a bad node description, 101 for kernel failures).
    pub fn code(&self) -> ErrorCode {
        match self {
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
