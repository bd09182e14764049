//! The CNI specification, versions 0.3.0 to 1.1.0: configurations, results, errors.

mod result;
mod version;

pub use result::{CniResult, Dns, HwAddr, Interface, InvalidHwAddr, IpConfig, Route};
pub use version::{UnknownVersion, Version};
