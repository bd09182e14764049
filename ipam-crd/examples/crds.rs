//! Prints the CRDs of ipam-crd as YAML: the content of `deploy/crds/ipam.cnikit.io.yaml`.
//! No root, no cluster needed:
//! `cargo run -p ipam-crd --example crds > deploy/crds/ipam.cnikit.io.yaml`.

fn main() {
    print!("{}", ipam_crd::resources::crds_yaml());
}
