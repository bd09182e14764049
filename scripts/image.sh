#!/usr/bin/env bash
# Builds cnikit's container image without a registry or a base image: a root filesystem of the
# plugin, the agent, the installer and bird2 (for the BGP `bird` engine), each with exactly
# the shared libraries it links, packed as a tarball and (with --import) imported into podman.
#
#   scripts/image.sh [--profile release|debug] [--bin-dir DIR] [--out DIR] [--tag NAME:TAG] [--import]
#
# Writes DIR/cnikit-image.tar (default DIR: target/image). With --import the image is in
# podman as NAME:TAG (default localhost/cnikit:<crate version>); `podman save` it for
# containerd (`ctr -n k8s.io images import`). The binaries must be built first, for the
# release profile with `cargo build --release --examples --all-features` (--bin-dir: take
# them from DIR instead of target/<profile>/examples).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
bins=
out=target/image
import=0
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
tag="localhost/cnikit:${version}"
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=$2; shift 2 ;;
    --bin-dir) bins=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --import) import=1; shift ;;
    *) echo "scripts/image.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$profile" in
  release | debug) ;;
  *) echo "scripts/image.sh: --profile is release or debug" >&2; exit 2 ;;
esac

bins=${bins:-target/${profile}/examples}
for b in cnikit cnikit-agent cnikit-install; do
  if [ ! -x "$bins/$b" ]; then
    echo "scripts/image.sh: $bins/$b is missing: cargo build $([ "$profile" = release ] && echo --release) --examples --all-features" >&2
    exit 1
  fi
done

mkdir -p "$out"
rootfs=$(mktemp -d "${TMPDIR:-/tmp}/cnikit-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
chmod 755 "$rootfs"
mkdir -p "$rootfs"/{usr/local/bin,usr/sbin,etc/cnikit,tmp,run,var/lib/cni,var/log}
chmod 1777 "$rootfs/tmp"

# Copies a file with its path, following symlinks.
copy_path() {
  local src=$1
  mkdir -p "$rootfs$(dirname "$src")"
  cp -L "$src" "$rootfs$src"
}

# Copies every shared library (and the loader) that a binary links.
copy_libraries() {
  local lib
  for lib in $(ldd "$1" | grep -oE '/[^ ]+\.so[^ ]*'); do
    [ -e "$rootfs$lib" ] || copy_path "$lib"
  done
}

for b in cnikit cnikit-agent cnikit-install; do
  # Without debug info: a debug build's symbols are most of its size.
  strip --strip-debug -o "$rootfs/usr/local/bin/$b" "$bins/$b"
  copy_libraries "$rootfs/usr/local/bin/$b"
done
for b in bird birdc; do
  if command -v "$b" > /dev/null; then
    cp -L "$(command -v "$b")" "$rootfs/usr/sbin/$b"
    copy_libraries "$rootfs/usr/sbin/$b"
  else
    echo "scripts/image.sh: $b not installed (apt-get install bird2): the bird engine will not run" >&2
  fi
done
# Name resolution for the etcd and API server endpoints given by name.
printf 'hosts: files dns\n' > "$rootfs/etc/nsswitch.conf"
printf 'root:x:0:0:root:/root:/usr/sbin/nologin\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\n' > "$rootfs/etc/group"

tarball="$out/cnikit-image.tar"
tar --numeric-owner --owner=0 --group=0 -C "$rootfs" -cf "$tarball" .
echo "scripts/image.sh: $tarball ($(du -h "$tarball" | cut -f1))"

if [ "$import" = 1 ]; then
  podman import \
    --change 'ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/bin' \
    --change 'ENTRYPOINT ["/usr/local/bin/cnikit-agent"]' \
    "$tarball" "$tag" > /dev/null
  echo "scripts/image.sh: imported as $tag"
fi
