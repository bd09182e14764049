#!/usr/bin/env bash
# Runs a command inside a small user-mode-linux VM (Debian's `user-mode-linux`, kernel 6.1 with
# ipip, veth, bridge and vxlan) for what the host's kernel lacks. The VM is an ordinary process:
# no /dev/kvm, and no network device at all, so it can never touch the host's network.
#
#   scripts/vm.sh [--mem SIZE] [--env NAME=VALUE]... [--] CMD [ARGS...]
#
# The guest's root is the host's root, read-only (through hostfs), under a throw-away writable
# layer (overlayfs on a tmpfs): writes outside /tmp are lost when the VM halts. /tmp is the
# host's /tmp, shared read-write. /run, /dev/shm are fresh tmpfs (so `ip netns add` works),
# /dev/fd, /sys/fs/bpf and the kernel's modules (/lib/modules/VERSION) are there, `lo` is up.
# CMD runs as root in the current directory with the caller's PATH, HOME, locale, RUST_*,
# CARGO_*, CNIKIT_*, LAB_* variables, the --env ones and CNIKIT_IN_VM=1, stdin from /dev/null;
# its stdout and stderr come out on ours. vm.sh exits with CMD's exit status, or 125 with a
# message when the VM could not run CMD (no user-mode-linux, the guest crashed, ...).
#
# --mem SIZE: the guest's memory (default 1G; only what it touches is used). Each run has its
# own umid and scratch directory (/tmp/cnikit-vm.*), removed afterwards, also on failure or
# ctrl-c; the UML process is ended by its PID, and ends itself when vm.sh is killed.
# Boots in about 2.5 s.
set -euo pipefail

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "scripts/vm.sh: $*" >&2; exit 125; }

mem=1G
extra_env=()
while [ $# -gt 0 ]; do
  case "$1" in
    --mem) [ $# -ge 2 ] || die "--mem needs a size"; mem="$2"; shift 2 ;;
    --env)
      [ $# -ge 2 ] && [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env needs NAME=VALUE"
      extra_env+=("$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { usage >&2; exit 125; }

kernel=$(command -v linux.uml || command -v linux || true)
[ -n "$kernel" ] || die "user-mode-linux is not installed (apt-get install user-mode-linux kmod)"
command -v modprobe >/dev/null || die "modprobe is missing in the guest (apt-get install kmod)"

scratch=$(mktemp -d /tmp/cnikit-vm.XXXXXXXX)
uml_pid=
cleanup() {
  local rc=$?
  if [ -n "$uml_pid" ]; then
    # Our own child, not yet reaped: the PID cannot have been reused.
    kill -TERM "$uml_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$uml_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$uml_pid" 2>/dev/null || true
    wait "$uml_pid" 2>/dev/null || true
  fi
  rm -rf "$scratch"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# CMD, its directory and its environment, as a script the guest runs with `env -i`.
{
  echo '#!/bin/bash'
  while IFS='=' read -r -d '' name value; do
    case "$name" in
      PATH|HOME|USER|LOGNAME|LANG|LANGUAGE|LC_*|TERM|TZ|TMPDIR|NO_COLOR) ;;
      RUST_*|CARGO_*|CNIKIT_*|LAB_*) ;;
      *) continue ;;
    esac
    printf 'export %s=%q\n' "$name" "$value"
  done < <(env -0)
  for kv in "${extra_env[@]}"; do
    printf 'export %s=%q\n' "${kv%%=*}" "${kv#*=}"
  done
  echo 'export CNIKIT_IN_VM=1'
  printf 'cd -- %q || exit 126\n' "$(pwd -P)"
  printf 'exec'
  printf ' %q' "$@"
  echo
} >"$scratch/cmd"

# Stage 1, PID 1 on the read-only hostfs root: builds the writable root and enters it.
cat >"$scratch/init" <<EOF
#!/bin/bash
S=$scratch
fail() { echo "vm init: \$*" >"\$S/init-error"; sync; poweroff -f; }
mount -t proc proc /proc || fail "mount /proc"
kver=\$(uname -r)
mods=/usr/lib/uml/modules/\$kver
insmod "\$mods/kernel/fs/overlayfs/overlay.ko" || fail "load overlayfs from \$mods"
B=/dev/.cnikit-vm
mkdir -p \$B && mount -t tmpfs -o mode=0755 cnikit-vm \$B || fail "tmpfs for the writable layer"
mkdir \$B/upper \$B/work \$B/root
mount -t overlay -o lowerdir=/,upperdir=\$B/upper,workdir=\$B/work cnikit-root \$B/root \\
  || fail "overlay root"
R=\$B/root
mount -t proc proc \$R/proc && mount -t sysfs sysfs \$R/sys && mount -t devtmpfs devtmpfs \$R/dev \\
  && mount -t tmpfs -o mode=0755 run \$R/run && mount -t hostfs -o /tmp hostfs \$R/tmp \\
  || fail "mount /proc /sys /dev /run /tmp"
mkdir -p \$R/dev/shm \$R/dev/pts
mount -t tmpfs -o mode=1777 shm \$R/dev/shm
mount -t devpts -o ptmxmode=0666 devpts \$R/dev/pts
ln -sfn /proc/self/fd \$R/dev/fd
ln -sfn /proc/self/fd/0 \$R/dev/stdin
ln -sfn /proc/self/fd/1 \$R/dev/stdout
ln -sfn /proc/self/fd/2 \$R/dev/stderr
mount -t bpf bpf \$R/sys/fs/bpf 2>/dev/null
mount -t cgroup2 cgroup2 \$R/sys/fs/cgroup 2>/dev/null
mkdir -p \$R/usr/lib/modules && ln -sfn \$mods \$R/usr/lib/modules/\$kver
exec chroot \$R /bin/bash \$S/stage2
fail "chroot"
EOF

# Stage 2, PID 1 inside the writable root: runs CMD, records its status, halts.
cat >"$scratch/stage2" <<EOF
#!/bin/bash
S=$scratch
hostname $(printf %q "$(hostname)")
ip link set lo up
stty -F /dev/ttyS1 raw -echo
stty -F /dev/ttyS2 raw -echo
env -i /bin/bash \$S/cmd </dev/null >/dev/ttyS1 2>/dev/ttyS2
echo \$? >\$S/status.new && mv \$S/status.new \$S/status
# Wait until both serial lines have written everything out, then flush hostfs.
stty -F /dev/ttyS1 raw -echo
stty -F /dev/ttyS2 raw -echo
sync
poweroff -f
EOF
chmod +x "$scratch/init" "$scratch/stage2" "$scratch/cmd"

# UML 6.1 saves each guest thread's FPU state in a buffer sized for AVX (832 bytes); a host
# with a larger XSAVE area (AVX-512, AMX) refuses to restore it from there and the guest's
# init dies at once. The shim keeps a full-size copy beside each buffer (see its comment).
cc -O2 -shared -fPIC -o "$scratch/uml-xstate.so" "$(dirname "$0")/uml-xstate.c" -ldl \
  || die "cannot build scripts/uml-xstate.c (apt-get install gcc libc6-dev)"

# The guest's memory is a file in TMPDIR: keep it on a tmpfs.
uml_tmp=/dev/shm
[ -d "$uml_tmp" ] && [ -w "$uml_tmp" ] || uml_tmp=$scratch
# No eth/vec device: the guest has no network beyond its own. Its console and the kernel's
# messages go to console.log; serial lines 1 and 2 carry CMD's stdout and stderr.
# The VM runs in a session of its own (a ctrl-c reaches vm.sh only, whose cleanup then ends
# the VM), and gets SIGTERM when vm.sh dies, also of SIGKILL, where no cleanup runs: the
# parent-death signal (setpriv, util-linux), kept across the exec of the kernel. SIGTERM,
# not SIGKILL: the UML kernel then ends the host processes it made before it exits.
LD_PRELOAD="$scratch/uml-xstate.so" TMPDIR=$uml_tmp setsid setpriv --pdeathsig TERM "$kernel" \
  mem="$mem" umid="${scratch##*/}" uml_dir="$scratch" \
  root=/dev/root rootfstype=hostfs rootflags=/ ro init="$scratch/init" \
  con=null ssl=null con0=null,fd:3 ssl1=null,fd:4 ssl2=null,fd:5 ssl-non-raw \
  quiet panic=1 noreboot cnikit.vm=1 \
  3>"$scratch/console.log" 4>&1 5>&2 </dev/null >>"$scratch/console.log" 2>&1 &
uml_pid=$!
uml_rc=0
wait "$uml_pid" 2>/dev/null || uml_rc=$?
uml_pid=

if [ -s "$scratch/init-error" ]; then
  die "the guest could not start: $(cat "$scratch/init-error")"
fi
if ! [ -f "$scratch/status" ]; then
  {
    echo "scripts/vm.sh: the guest ended (exit $uml_rc) without reporting CMD's exit status;"
    echo "its console said:"
    grep -vE '^(SELinux|mmapper_init|Failed to initialize ubd)' "$scratch/console.log" \
      | tail -n 40 | sed 's/^/  | /'
  } >&2
  exit 125
fi
status=$(cat "$scratch/status")
[[ "$status" =~ ^[0-9]+$ ]] || die "the guest reported a bad exit status: $status"
exit "$status"
