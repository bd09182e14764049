//! The crate's error type and its CNI codes.

use std::path::PathBuf;

use cni_core::ErrorCode;

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the eBPF pod network.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is not valid.
    #[error("invalid ebpf configuration: {field}: {reason}")]
    InvalidConfig {
        /// The key (`bpffs`, the network name, the node name).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The pin directory's root is not a mounted BPF filesystem.
    #[error("{} is not a BPF filesystem (mount -t bpf bpf {0})", .path.display())]
    NotBpffs {
        /// The configured `bpffs`.
        path: PathBuf,
    },
    /// The programs' object could not be loaded (or the verifier refused a program).
    #[error("cannot load the eBPF object {object}")]
    Load {
        /// Which object.
        object: &'static str,
        /// aya's error, with the verifier log when the verifier refused.
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// A program could not be loaded, attached, detached or queried.
    #[error("eBPF program {program} on {device}: {what}")]
    Program {
        /// The program name.
        program: &'static str,
        /// The device (host veth) it goes on.
        device: String,
        /// What was being done.
        what: &'static str,
        /// aya's error (a program or a link error).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A pinned map could not be opened, read or written.
    #[error("eBPF map {}: {what}", .path.display())]
    Map {
        /// The pinned map.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// aya's error.
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// A pin (file on the BPF filesystem) could not be made, read or removed.
    #[error("bpffs {what} {}", .path.display())]
    Pin {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// What CHECK found differs from what ADD made.
    #[error("check {what}: expected {expected}, found {found}")]
    Mismatch {
        /// What was checked.
        what: String,
        /// What ADD made.
        expected: String,
        /// What is there.
        found: String,
    },
    /// The `ebpf` routing mode's `reconcile` was called before `init` succeeded.
    #[error("ebpf routing is not initialized: init must succeed before reconcile")]
    NotInitialized,
    /// The routed plumbing underneath (veth, addresses, routes) or the kernel failed.
    #[error(transparent)]
    Core(#[from] cni_core::Error),
}

impl Error {
    /// The CNI error code: 7 for configuration problems, 101 for kernel and eBPF failures
    /// (and what CHECK finds changed), 50 for a routing mode used before its init, else
    /// the code of the cause.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidConfig { .. } | Error::NotBpffs { .. } => ErrorCode::INVALID_CONFIG,
            Error::Load { .. }
            | Error::Program { .. }
            | Error::Map { .. }
            | Error::Pin { .. }
            | Error::Mismatch { .. } => ErrorCode::KERNEL,
            Error::NotInitialized => ErrorCode::NOT_AVAILABLE,
            Error::Core(e) => e.code(),
        }
    }

    pub(crate) fn mismatch(
        what: impl Into<String>,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Self {
        Error::Mismatch {
            what: what.into(),
            expected: expected.into(),
            found: found.into(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let bad = Error::InvalidConfig {
            field: "bpffs",
            reason: "x".into(),
        };
        assert_eq!(bad.code().0, 7);
        assert_eq!(cni_core::Error::from(bad).code().0, 7);
        let gone = Error::mismatch("endpoint of 10.0.0.1", "an entry", "none");
        assert_eq!(cni_core::Error::from(gone).code().0, 101);
        let core = Error::Core(cni_core::Error::NotReady { reason: "x".into() });
        assert_eq!(cni_core::Error::from(core).code().0, 50);
    }
}
