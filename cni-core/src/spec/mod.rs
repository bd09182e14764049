//! The CNI specification, versions 0.3.0 to 1.1.0: configurations, results, errors.
//!
//! - [`NetConf`]: the configuration a plugin reads on stdin; [`ConfList`]: a `.conflist` as a
//!   runtime reads it, with version negotiation and the per-plugin configuration builder.
//! - [`CniResult`]: the result in its newest shape, written in any version with
//!   [`CniResult::to_json`] and read from any version with [`CniResult::from_json`].
//! - [`ErrorOutput`] and [`VersionInfo`]: the error object and the VERSION answer.
//! - [`Command`], [`CniArgs`] and the `CNI_CONTAINERID` / `CNI_IFNAME` rules.
//! - [`cidr`]: `address/prefix` strings read with messages that say which part is wrong.

mod args;
pub mod cidr;
mod config;
mod output;
mod result;
mod version;

pub use args::{CniArgs, Command, MAX_IFNAME_LEN, validate_container_id, validate_ifname};
pub use config::{
    ConfList, GcAttachment, IpamConf, LEGACY_ATTACHMENTS_KEY, NetConf, PortMapping, Protocol,
    RuntimeConfig, VALID_ATTACHMENTS_KEY, validate_network_name,
};
pub(crate) use config::{is_plugin_name, parse_object, validate_plugin_type, version_of};
pub use output::{ErrorOutput, VersionInfo};
pub use result::{CniResult, Dns, HwAddr, Interface, InvalidHwAddr, IpConfig, Route};
pub use version::{UnknownVersion, Version};
