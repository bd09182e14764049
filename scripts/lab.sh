#!/usr/bin/env bash
# The cnikit lab on a fresh machine: installs the packages it needs, builds the plugin, the
# node agent and the lab (release), then for each routing mode builds a cluster of 3 nodes
# with 2 pods each out of network namespaces, pings every pod from every pod, shows every
# device, route, neighbour and FDB entry with what it is for, and tears it down. If a step
# fails, the lab is torn down all the same. Needs root; nothing is done in the machine's own
# network namespace.
#
#   sudo scripts/lab.sh                          # vxlan, host-gw, ipip, bgp, then ebpf
#   sudo scripts/lab.sh --mode host-gw           # one mode
#   sudo scripts/lab.sh --mode bgp               # BGP speakers in the agents, full mesh
#   sudo scripts/lab.sh --mode bgp --bgp-engine bird   # BIRD 2 run by each agent instead
#   sudo scripts/lab.sh --mode bgp --ipip-mode always   # BGP's routes through IPIP (VM)
#   sudo scripts/lab.sh --mode bgp --bgp-topology reflector --reflectors 1 --tor bird
#   sudo scripts/lab.sh --mode ipip --ipip-mode cross-subnet --topology two-subnets
#   sudo scripts/lab.sh --store etcd --topology two-subnets --pod-network routed
#   sudo scripts/lab.sh --mode vxlan --store kubernetes   # IPAM and registry in CRDs
#   sudo LAB_NODES=4 LAB_PODS=3 scripts/lab.sh
#
# ipip needs the kernel's ipip module. When it is not loaded, the ipip run (up, check, show,
# down) happens inside the test VM (scripts/vm.sh, one boot for the whole run), so that
# loading it never adds tunl0 to the machine's own namespace; lab.sh says so. --ipip-mode
# (always, cross-subnet) is for ipip only; --direct-routing is vxlan's DirectRouting and,
# for ipip, cross-subnet. bgp runs the agents' own BGP speakers (iBGP full mesh, AS 64512)
# on one segment: `show` lists each node's sessions and the routes they brought;
# --bgp-topology reflector makes the first --reflectors nodes route reflectors, --tor bird
# adds a top-of-rack router (BIRD 2, AS 65000) peering with every node over eBGP. ebpf runs
# pods on tc eBPF programs (its own pod network; --pod-network is for the other modes): `show`
# lists each program with its id and every entry of the maps. --store kubernetes runs a private
# kube-apiserver (built once by scripts/kube-apiserver.sh, several minutes the first time) in
# the underlay namespace and builds the binaries with the kubernetes feature.
set -euo pipefail
cd "$(dirname "$0")/.."

modes=(vxlan host-gw ipip bgp ebpf)
extra=()
pod_extra=()
ipip_extra=()
bgp_extra=()
topology=flat
store=file
while [ $# -gt 0 ]; do
  case "$1" in
    --mode) modes=("$2"); shift 2 ;;
    --topology) topology="$2"; extra+=("$1" "$2"); shift 2 ;;
    --store) store="$2"; extra+=("$1" "$2"); shift 2 ;;
    --pod-network) pod_extra+=("$1" "$2"); shift 2 ;;
    --ipip-mode) ipip_extra+=("$1" "$2"); shift 2 ;;
    --bgp-engine) bgp_extra+=("$1" "$2"); shift 2 ;;
    --direct-routing) extra+=("$1"); shift ;;
    --bgp-topology|--reflectors|--tor) bgp_extra+=("$1" "$2"); shift 2 ;;
    -h|--help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "scripts/lab.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" != 0 ]; then
  echo "scripts/lab.sh: run as root (the lab builds network namespaces)" >&2
  exit 1
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "scripts/lab.sh: cargo is missing: install Rust (https://rustup.rs) first" >&2
  exit 1
fi
if [ ${#ipip_extra[@]} -gt 0 ] && ! [[ " ${modes[*]} " == *" ipip "* || " ${modes[*]} " == *" bgp "* ]]; then
  echo "scripts/lab.sh: --ipip-mode is for --mode ipip or bgp" >&2
  exit 2
fi

# Inside the test VM (the run below re-enters this script there), everything is built and
# installed already: the host's root is the guest's, read-only.
in_vm=0
grep -qw cnikit.vm=1 /proc/cmdline 2>/dev/null && in_vm=1
if [ "$in_vm" = 0 ]; then
  bash scripts/deps.sh
  export CARGO_TERM_COLOR=never
  features=()
  if [ "$store" = kubernetes ]; then
    bash scripts/kube-apiserver.sh >/dev/null
    features=(--features kubernetes)
  fi
  cargo build --release --examples "${features[@]}"
fi
LAB="${CARGO_TARGET_DIR:-target}/release/examples/lab"
NAME="${LAB_NAME:-lab}"
NODES="${LAB_NODES:-3}"
PODS="${LAB_PODS:-2}"

active=0
cleanup() {
  local status=$?
  if [ "$active" = 1 ]; then
    echo "scripts/lab.sh: a step failed; tearing the lab down" >&2
    "$LAB" --name "$NAME" down || true
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A lab of this name left by an interrupted run goes first.
"$LAB" --name "$NAME" down >/dev/null

for mode in "${modes[@]}"; do
  mode_extra=()
  if [ "$mode" != ebpf ]; then
    mode_extra+=("${pod_extra[@]}")
  fi
  [ "$mode" = bgp ] && mode_extra+=("${bgp_extra[@]}" "${ipip_extra[@]}")
  # bgp with --ipip-mode needs the ipip module as much as ipip does.
  if [ "$mode" = ipip ] || { [ "$mode" = bgp ] && [ ${#ipip_extra[@]} -gt 0 ]; }; then
    [ "$mode" = ipip ] && mode_extra+=("${ipip_extra[@]}")
    # The same rule as the tests' (testkit::vm): a loaded (or built-in) ipip module, or the
    # VM. Never load a tunnel module here: it would add tunl0 to the root namespace.
    if [ "$in_vm" = 0 ] && ! [ -d /sys/module/ipip ]; then
      echo
      echo "################ mode $mode, in the test VM ################"
      echo "scripts/lab.sh: this kernel has no ipip module loaded; running the $mode lab"
      echo "inside the user-mode-linux VM (scripts/vm.sh: Linux 6.1 with ipip, one CPU, the"
      echo "host's root read-only): up, check, show and down in one boot"
      started=$(date +%s)
      bash scripts/vm.sh --mem 2G -- bash scripts/lab.sh --mode "$mode" "${extra[@]}" "${mode_extra[@]}"
      echo "scripts/lab.sh: the $mode lab in the VM took $(($(date +%s) - started)) s, boot included"
      continue
    fi
  fi
  echo
  echo "################ mode $mode ################"
  active=1
  "$LAB" --name "$NAME" up --mode "$mode" --nodes "$NODES" --pods "$PODS" "${extra[@]}" \
    "${mode_extra[@]}"
  echo
  if { [ "$mode" = host-gw ] || [ "$mode" = bgp ]; } && [ "$topology" = two-subnets ]; then
    # host-gw (and bgp, whose next hops are the peers' underlay addresses) routes only
    # peers on the same segment: pods across the router cannot answer.
    "$LAB" --name "$NAME" check ||
      echo "(expected: $mode does not route across the router; see UNROUTABLE in show)"
  else
    "$LAB" --name "$NAME" check
  fi
  echo
  "$LAB" --name "$NAME" show
  echo
  "$LAB" --name "$NAME" down
  active=0
done
