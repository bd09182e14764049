//! The `cnikit` CNI plugin binary: cnikit's standard composition of parts.
//!
//! Install it where the runtime looks for plugins (`/opt/cni/bin`, or podman's
//! `cni_plugin_dirs`) and reference it with `"type": "cnikit"` in a network configuration; see
//! `examples/conf/` for ready-to-use lists. A copy or symlink named `cnikit-ipam` makes it an
//! IPAM plugin for other plugins (`"ipam": {"type": "cnikit-ipam", ...}`).
//!
//! Needs root at run time (it creates interfaces), like every CNI plugin.
//!
//! ```text
//! cargo build --release --example cnikit
//! install target/release/examples/cnikit /opt/cni/bin/
//! ```

fn main() {
    std::process::exit(cnikit::plugin::main());
}
