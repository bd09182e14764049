#!/usr/bin/env bash
# Makes sure what the ipam-etcd crate needs is installed: `protoc` to build etcd-client, and
# the `etcd` server binary its tests start (each test runs a private etcd on 127.0.0.1 with
# free ports and a temp data dir; nothing else is needed: no running service, no root).
# Run it, or source it from a test script; safe to run again. Debian/Ubuntu packages.
set -euo pipefail

cnikit_etcd_missing=()
command -v etcd >/dev/null 2>&1 || cnikit_etcd_missing+=(etcd-server)
command -v protoc >/dev/null 2>&1 || cnikit_etcd_missing+=(protobuf-compiler libprotobuf-dev)
if [ ${#cnikit_etcd_missing[@]} -gt 0 ]; then
  echo "ensure-etcd: installing ${cnikit_etcd_missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${cnikit_etcd_missing[@]}"
fi
command -v etcd >/dev/null && etcd --version | head -1 >&2
