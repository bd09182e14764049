//! # ipam-etcd
//!
//! cnikit's datastore and node registry on etcd v3: [`EtcdStore`] implements
//! [`Store`](cni_core::store::Store) (the versioned key/value store under the block IPAM
//! engine), [`EtcdRegistry`] implements [`NodeRegistry`](cni_core::registry::NodeRegistry)
//! (node records on leases, and a watch of the peers).
//!
//! ## Modules
//! - [`config`]: the `ipam.store` object of `type` [`TYPE`] (`"etcd"`).
//! - [`connection`]: the shared client: TLS, credentials, deadlines, round-trip counter.
//! - [`store`]: the [`EtcdStore`].
//! - [`registry`]: the [`EtcdRegistry`].
//! - [`error`]: [`Error`] and its CNI codes.
//!
//! ## Configuration
//! The `store` object of the block IPAM's `ipam` section (`"type": "cnikit-ipam"`, served
//! in-process by the `cnikit` plugin; its own type, `cnikit`, is refused there: the plugin
//! would exec itself as its IPAM plugin):
//! ```json
//! "ipam": {
//!   "type": "cnikit-ipam",
//!   "pool": "10.244.0.0/16",
//!   "store": {
//!     "type": "etcd",
//!     "endpoints": ["https://10.0.0.1:2379"],
//!     "prefix": "/cnikit",
//!     "caFile": "/etc/cnikit/etcd/ca.crt",
//!     "certFile": "/etc/cnikit/etcd/client.crt",
//!     "keyFile": "/etc/cnikit/etcd/client.key",
//!     "timeoutMs": 5000
//!   }
//! }
//! ```
//! | key | default | meaning |
//! |---|---|---|
//! | `endpoints` | required | etcd client URLs, all `http://` or all `https://`, with a port |
//! | `prefix` | `/cnikit` | prefix of every key |
//! | `caFile` | system roots | CA of the etcd server certificates (https only) |
//! | `certFile`, `keyFile` | none | client certificate and key, together (`--client-cert-auth`) |
//! | `username`, `passwordFile` | none | etcd user and a file with its password, together |
//! | `timeoutMs` | 5000 | deadline of every request |
//! | `dialTimeoutMs` | 2000 | deadline of a connection, TLS handshake included |
//!
//! Messages and `Debug` output name endpoints and file paths, never key material or passwords.
//!
//! ## Key layout
//! Keys arrive at the store already prefixed: the block IPAM engine owns this layout (with
//! `<prefix>` the configured prefix, and `<block>` written `10.244.0.64-26`); the registry
//! owns `registry/`.
//! ```text
//! <prefix>/pool                                            the pool configuration
//! <prefix>/blocks/<block>                                  a block and its owner (affinity)
//! <prefix>/nodes/<node>/claim                              rewritten by each block claim of
//!                                                          the node: two racing claims of
//!                                                          one node conflict on it
//! <prefix>/nodes/<node>/blocks/<block>                     the blocks a node holds
//! <prefix>/nodes/<node>/used/<ip>                          an allocated address
//! <prefix>/nodes/<node>/free/<ip>                          a released address of the node
//! <prefix>/nodes/<node>/handles/<network>/<containerID>/<ifname>   an attachment's addresses
//! <prefix>/registry/nodes/<name>                           a node record (JSON, on a lease)
//! ```
//!
//! ## Round trips and deadlines
//! `get` is one request, `list` one per 2000 keys, `commit` one transaction whose failure
//! branch reads the compared keys. [`EtcdStore::round_trips`] counts the requests, for
//! benchmarks. Every request has the `timeoutMs` deadline; a dead or unreachable etcd gives
//! code 11 ([`Error::Unavailable`] or [`Error::Timeout`]) naming the endpoints.
//!
//! ## Quick start
//! ```no_run
//! use cni_core::store::{Compare, Store, Txn, TxnOutcome};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ipam_etcd::Config::new(["http://127.0.0.1:2379"]);
//! let store = ipam_etcd::EtcdStore::connect(&config).await?;
//! let key = format!("{}/pool", store.prefix());
//! let txn = Txn::new().when(Compare::Absent(key.clone())).put(key, b"{}".to_vec());
//! match store.commit(txn).await? {
//!     TxnOutcome::Committed(rev) => println!("written at revision {rev}"),
//!     TxnOutcome::Failed(current) => println!("already there: {current:?}"),
//! }
//! # Ok(()) }
//! ```
//!
//! ## Needs
//! Building needs `protoc` (Debian `protobuf-compiler`). The tests need the `etcd` binary
//! (Debian `etcd-server`, 3.4 or later) on `PATH`: each starts a private etcd on 127.0.0.1
//! with free ports and a temp data dir, so no service has to run. Without the binary they
//! print `SKIPPED:` and pass, or fail when `CNIKIT_REQUIRE_ALL=1`.
//! `scripts/ensure-etcd.sh` installs both packages when missing.
//!
//! The tests in `tests/plugin/` also run the `cnikit` plugin binary, one process per CNI
//! command, as a runtime does: build it first in the same target directory with
//! `cargo build --example cnikit --features etcd` (`scripts/test.sh` does); without it they
//! fail with that command.
//!
//! ## Benchmark
//! `cargo run --release -p ipam-etcd --example etcd_bench` starts its own etcd and prints
//! allocations per second and etcd round trips per allocation for 1, 8 and 32 concurrent
//! allocators, next to a plain put baseline measured in the same run.
#![warn(missing_docs)]

pub mod config;
pub mod connection;
pub mod error;
pub mod registry;
pub mod store;

pub use config::{Config, TYPE};
pub use connection::Connection;
pub use error::{Error, Result};
pub use registry::EtcdRegistry;
pub use store::EtcdStore;
