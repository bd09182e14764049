//! The custom resources (group [`GROUP`], version `v1alpha1`, all cluster-scoped) and their
//! CRD manifests.
//!
//! Each resource is one *object* of the block engine (see
//! [`cni_core::store::object_of`]): the engine's compare-and-swap on a few records of one
//! object is one `replace` of one resource, guarded by its `resourceVersion`.
//!
//! | kind | name | holds |
//! |---|---|---|
//! | [`IPPool`] | `<pool>` | the pool record (CIDR and block size the pool was set up with) |
//! | [`IPAMBlock`] | `<pool>.<block>` (`10.244.0.64-26`, `:` written `x`) | which node owns the block |
//! | [`IPAMNode`] | `<pool>.<node>` | the node's block affinities (pending → confirmed, draining), its used and released addresses, its handles (one per attachment) and its claim record |
//! | [`NetworkNode`] | `<pool>.<node>` | the node registry's record of the node: underlay address, blocks, the routing mode's data (the agent's [`NodeRecord`](cni_core::registry::NodeRecord)) |
//!
//! A [`NetworkNode`] is live while its node's `coordination.k8s.io/v1` Lease of the same
//! name (see [`crate::registry`]) is renewed.
//!
//! `<pool>` is the store prefix without its leading `/`, `/` written `.` (`cnikit` for the
//! default prefix `/cnikit`); every object carries the label [`PREFIX_LABEL`] with it.
//! Records are kept as the engine writes them (a JSON text each) with the revision of the
//! object's [`RecordsSpec::revision`] counter at which they were written; an object whose
//! records are all deleted stays, empty, so its counter never restarts.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of the resources.
pub const GROUP: &str = "ipam.cnikit.io";

/// The label that names the store prefix an object belongs to.
pub const PREFIX_LABEL: &str = "ipam.cnikit.io/prefix";

/// One record of an object: a value the engine wrote and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Record {
    /// The record as the block engine encodes it (JSON text).
    pub value: String,
    /// The revision of the object when the record was last written.
    pub revision: i64,
}

/// The records of one object, by key (the full datastore key).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RecordsSpec {
    /// Bumped by every write of the object; the revision of the records it writes.
    #[serde(default)]
    pub revision: i64,
    /// The records by datastore key, each a Record (value: the record as the block engine
    /// encodes it, JSON text; revision: the object's revision when it was last written). One
    /// atomic value to the API server.
    #[serde(default)]
    #[schemars(schema_with = "records_schema")]
    pub records: BTreeMap<String, Record>,
}

/// The schema of [`RecordsSpec::records`]: a map the API server keeps as one value.
///
/// The API server's work on an update grows with the fields it has to track: with a schema
/// for every entry and per-key field ownership (`managedFields`), replacing a node's object
/// of 400 records took it about 40 ms here, one of 6 records 4 ms. An atomic map without an
/// entry schema (`x-kubernetes-map-type: atomic`, `x-kubernetes-preserve-unknown-fields`)
/// took about 12 ms at 400 records. The entries are checked where they are read: the store
/// decodes every record as a [`Record`] and refuses the object (a corrupt store, code 5,
/// naming it) when one does not decode.
fn records_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "default": {},
        "x-kubernetes-preserve-unknown-fields": true,
        "x-kubernetes-map-type": "atomic"
    })
}

/// The pool record of one IPAM pool.
#[derive(
    CustomResource, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "ipam.cnikit.io",
    version = "v1alpha1",
    kind = "IPPool",
    plural = "ippools",
    shortname = "cnkpool",
    printcolumn = r#"{"name":"Revision","type":"integer","jsonPath":".spec.revision"}"#
)]
pub struct IPPoolSpec {
    /// The pool's records.
    #[serde(flatten)]
    pub records: RecordsSpec,
}

/// The ownership record of one block of a pool.
#[derive(
    CustomResource, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "ipam.cnikit.io",
    version = "v1alpha1",
    kind = "IPAMBlock",
    plural = "ipamblocks",
    shortname = "cnkblock",
    printcolumn = r#"{"name":"Revision","type":"integer","jsonPath":".spec.revision"}"#
)]
pub struct IPAMBlockSpec {
    /// The block's records.
    #[serde(flatten)]
    pub records: RecordsSpec,
}

/// One node's affinities, allocations and handles in a pool.
#[derive(
    CustomResource, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "ipam.cnikit.io",
    version = "v1alpha1",
    kind = "IPAMNode",
    plural = "ipamnodes",
    shortname = "cnknode",
    printcolumn = r#"{"name":"Revision","type":"integer","jsonPath":".spec.revision"}"#
)]
pub struct IPAMNodeSpec {
    /// The node's records.
    #[serde(flatten)]
    pub records: RecordsSpec,
}

/// The node registry's record of one node: what its agent publishes to its peers.
///
/// The same content as [`cni_core::registry::NodeRecord`] (and the etcd registry's record);
/// the node is a live peer only while its Lease is renewed (see [`crate::registry`]).
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ipam.cnikit.io",
    version = "v1alpha1",
    kind = "NetworkNode",
    plural = "networknodes",
    shortname = "cnknet",
    printcolumn = r#"{"name":"Address","type":"string","jsonPath":".spec.address"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NetworkNodeSpec {
    /// The node's name (as in `nodeName`).
    pub name: String,
    /// The underlay address other nodes reach this node at.
    pub address: String,
    /// The prefix length of the underlay subnet.
    pub prefix_len: u8,
    /// The pod address blocks the node owns (CIDRs).
    #[serde(default)]
    pub blocks: Vec<String>,
    /// What the routing mode publishes (VTEP MAC, AS number…), by key.
    #[serde(default)]
    pub backend: BTreeMap<String, String>,
}

impl From<&cni_core::registry::NodeRecord> for NetworkNodeSpec {
    fn from(r: &cni_core::registry::NodeRecord) -> Self {
        NetworkNodeSpec {
            name: r.name.clone(),
            address: r.address.to_string(),
            prefix_len: r.prefix_len,
            blocks: r.blocks.iter().map(ToString::to_string).collect(),
            backend: r.backend.clone(),
        }
    }
}

impl TryFrom<&NetworkNodeSpec> for cni_core::registry::NodeRecord {
    type Error = String;

    fn try_from(s: &NetworkNodeSpec) -> Result<Self, String> {
        Ok(cni_core::registry::NodeRecord {
            name: s.name.clone(),
            address: s
                .address
                .parse()
                .map_err(|e| format!("address {:?}: {e}", s.address))?,
            prefix_len: s.prefix_len,
            blocks: s
                .blocks
                .iter()
                .map(|b| b.parse().map_err(|e| format!("block {b:?}: {e}")))
                .collect::<Result<_, _>>()?,
            backend: s.backend.clone(),
        })
    }
}

/// The CRDs of every resource of this crate.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt;
    vec![
        IPPool::crd(),
        IPAMBlock::crd(),
        IPAMNode::crd(),
        NetworkNode::crd(),
    ]
}

/// The CRD manifest checked in as `deploy/crds/ipam.cnikit.io.yaml`: every CRD, as YAML
/// documents separated by `---`.
pub fn crds_yaml() -> String {
    let mut out = String::from(
        "# Generated from ipam-crd/src/resources.rs by `cargo run -p ipam-crd --example crds`;\n\
         # a test checks that it is current.\n",
    );
    for crd in crds() {
        out.push_str("---\n");
        // A CRD is plain data: it always serializes.
        out.push_str(&serde_yaml::to_string(&crd).unwrap_or_default());
    }
    out
}
