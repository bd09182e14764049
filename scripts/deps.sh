#!/usr/bin/env bash
# Installs the Debian packages cnikit's tests, lab and benchmarks use, if any is missing.
# Sourced by scripts/test.sh and scripts/lab.sh; safe to run again.
set -euo pipefail

CNIKIT_DEBS=(
  iproute2 iputils-ping iptables iperf3 jq curl   # namespaces, ping matrix, portmap, throughput
  etcd-server                                      # real etcd for the etcd store tests
  containernetworking-plugins                      # reference CNI plugins in /usr/lib/cni
  podman runc busybox-static                       # a real CNI client and a local image
  protobuf-compiler libprotobuf-dev                # etcd-client build
  user-mode-linux kmod util-linux gcc libc6-dev    # scripts/vm.sh: kernel tests needing ipip
  tcpdump                                          # what the ipip tests see on the underlay
  clang llvm libbpf-dev                            # scripts/bpf.sh: the eBPF objects (--check)
  bird2 gobgpd                                     # BGP peers of the bgp interop tests
  containerd                                       # a real CRI runtime (tests/cri.rs)
  binutils                                         # scripts/image.sh strip
)
# kubectl for the manifests' server-side validation: Debian's, unless one is installed already.
command -v kubectl >/dev/null || CNIKIT_DEBS+=(kubernetes-client)

missing=()
for p in "${CNIKIT_DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "cnikit: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # Daemons installed for the tests (bird2, gobgpd, containerd) run only inside test namespaces: their
  # packaged services must not start in the machine's own network namespace.
  # policy-rc.d 101: maintainer scripts start no service at all (deb-systemd-invoke and
  # invoke-rc.d ask it), so containerd never runs outside a test, not even for a moment.
  policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy"
  fi
  installed=0
  RUNLEVEL=1 apt-get install -y -q --no-install-recommends "${missing[@]}" || installed=$?
  [ -z "$policy" ] || rm -f "$policy"
  [ "$installed" = 0 ] || exit "$installed"
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now bird.service gobgpd.service containerd.service 2>/dev/null || true
  fi
fi
