#!/usr/bin/env bash
# Runs every cnikit test on a fresh machine: installs what is missing, then format, lint,
# unit, netns, real-service and end-to-end tests. Needs root (network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh: run as root (tests build network namespaces)" >&2
  exit 1
fi
bash scripts/deps.sh
# The ipam-crd tests run a real kube-apiserver: built once into /var/cache/cnikit.
bash scripts/kube-apiserver.sh >/dev/null

export CARGO_TERM_COLOR=never
cargo fmt --all --check
# The committed eBPF objects are what their C sources build to.
bash scripts/bpf.sh --check
cargo clippy --workspace --all-targets --all-features -- -D warnings
# The API docs build without a broken or redundant link.
RUSTDOCFLAGS="-D warnings" cargo doc -q --no-deps --workspace --all-features
# Every feature of the facade on its own, and none, must build.
for f in $(sed -n '/^\[features\]/,/^\[/p' Cargo.toml | grep -oE '^[a-z0-9-]+ =' | cut -d' ' -f1 | grep -v '^default$'); do
  cargo check -q -p cnikit --no-default-features --features "$f"
done
cargo check -q -p cnikit --no-default-features
# The end-to-end tests run the example binaries (plugin, agent, lab): build them all first
# (`cargo test` builds the lab only as its own unit-test harness).
cargo build -q --workspace --examples --all-features
# Every prerequisite is installed now: a test that would skip is a failure here.
export CNIKIT_REQUIRE_ALL=1
cargo test --workspace --all-features --no-fail-fast
