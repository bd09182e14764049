//! Linux plumbing: namespaces, netlink helpers and the built-in pod networks.

pub mod netns;

pub use netns::NetNs;
