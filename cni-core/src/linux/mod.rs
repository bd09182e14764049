//! Linux plumbing: namespaces, netlink helpers and the built-in pod networks.
//!
//! Every helper takes the [`NetNs`] it acts in; none depends on the namespace of the calling
//! thread. Each one names the `ip` command it equals and maps failures to
//! [`Error::Kernel`] (CNI code 101) with the command as `what`.
//!
//! - [`netns`]: namespace handles.
//! - [`link`], [`veth`], [`vxlan`], [`ipip`], [`addr`], [`route`], [`neigh`], [`fdb`],
//!   [`sysctl`]: one kernel object each.
//! - [`kernel`]: the kernel traits of the cross-node routing backends, their netlink
//!   implementation, a recording fake for unit tests, and the diff that reconciles.
//! - [`bridge`] (feature `bridge`) and [`routed`] (feature `routed`): the built-in
//!   [`PodNetwork`](crate::network::PodNetwork)s.

use std::fmt;

use crate::error::Error;

pub mod addr;
#[cfg(feature = "bridge")]
pub mod bridge;
pub mod fdb;
pub mod ipip;
pub mod kernel;
pub mod link;
pub mod neigh;
pub mod netns;
#[cfg(any(feature = "bridge", feature = "routed"))]
mod pod;
pub mod route;
#[cfg(feature = "routed")]
pub mod routed;
pub mod sysctl;
pub mod veth;
pub mod vxlan;

#[cfg(feature = "bridge")]
pub use bridge::{BridgeConfig, BridgeNetwork};
pub use netns::NetNs;
#[cfg(feature = "routed")]
pub use routed::{RoutedConfig, RoutedNetwork};

/// The kernel state differs from what it should be (the source of an
/// [`Error::Kernel`] raised by CHECK or by a helper that found a
/// conflicting object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// What was expected.
    pub expected: String,
    /// What was found.
    pub found: String,
}

impl Mismatch {
    /// Builds a mismatch.
    pub fn new(expected: impl Into<String>, found: impl Into<String>) -> Self {
        Mismatch {
            expected: expected.into(),
            found: found.into(),
        }
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "expected {}, found {}", self.expected, self.found)
    }
}

impl std::error::Error for Mismatch {}

/// The positive errno of a netlink error reply, if `e` is one.
pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

/// Wraps a netlink failure as [`Error::Kernel`], turning errno replies into
/// [`std::io::Error`]s so that the message reads like `File exists (os error 17)`.
pub(crate) fn kernel(what: impl Into<String>, e: rtnetlink::Error) -> Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => Error::kernel(what, m.to_io()),
        other => Error::kernel(what, other),
    }
}
