//! # cni-core
//!
//! The foundation of cnikit: the CNI specification and its runner, the traits every part
//! implements, the block IPAM engine with its datastores, and the Linux plumbing of the
//! built-in pod networks.
//!
//! ## The parts
//! - [`spec`]: CNI configurations, results and errors in versions 0.3.0 … 1.1.0.
//! - [`runner`]: the plugin entry point: a [`Plugin`](runner::Plugin) per CNI verb and
//!   [`run`](runner::run), which validates the invocation and prints the outcome.
//! - [`agent`]: the node agent: registers the node, claims its block, keeps the routes to
//!   the peers' blocks in line.
//! - [`compose`]: a [`Plugin`](runner::Plugin) made of an IPAM and a pod network.
//! - [`exec`]: running CNI plugin executables as a runtime does (delegation, whole lists).
//! - [`Ipam`](ipam::Ipam), [`PodNetwork`](network::PodNetwork),
//!   [`CrossNodeRouting`](routing::CrossNodeRouting), [`NodeRegistry`](registry::NodeRegistry):
//!   the swappable parts, object-safe, so a configuration can pick them at run time.
//! - [`store`]: the versioned key/value [`Store`](store::Store) the block IPAM and the node
//!   registry are written against, with an in-memory and a local file implementation.
//! - [`state`]: the node state file the agent writes and the plugin reads (pod MTU,
//!   readiness for STATUS).
//! - [`linux`]: network namespace handles and the netlink helpers.
//! - [`private_fs`]: the node's files and directories, readable by their owner only.
#![warn(missing_docs)]

pub mod agent;
pub mod compose;
pub mod error;
pub mod exec;
pub mod ipam;
pub mod linux;
pub mod network;
pub mod private_fs;
pub mod registry;
pub mod routing;
pub mod runner;
pub mod spec;
pub mod state;
pub mod store;

pub use error::{Error, ErrorCode, Result, StoreError};
