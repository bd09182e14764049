#!/usr/bin/env bash
# Builds kube-apiserver once, from Debian's `kubernetes` source package, into a cache outside
# the checkout, and prints the binary's path. A no-op (just the path) when it is cached.
#
# No Debian package ships kube-apiserver, but the source package holds the whole Kubernetes
# tree with its Go modules vendored, so it builds offline with Debian's golang-go. Its vendored
# github.com/modern-go/reflect2 1.0.1 crashes under Go >= 1.18 (SIGSEGV in map iteration as
# soon as a CRD is created): it is replaced by Debian's 1.0.2 before the build.
#
#   scripts/kube-apiserver.sh            # build if needed; stdout: the binary's path
#   CNIKIT_CACHE=/some/dir scripts/kube-apiserver.sh
#
# Needs root the first time (apt). Takes ~6-8 minutes on 2 cores, then nothing.
set -euo pipefail

version=1.20.2
cache="${CNIKIT_CACHE:-/var/cache/cnikit}/kube-apiserver-$version"
bin="$cache/kube-apiserver"

if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi

echo "kube-apiserver.sh: building kube-apiserver $version into $cache (takes several minutes)" >&2
export DEBIAN_FRONTEND=noninteractive

# The source package comes from a deb-src entry for bookworm.
src_list=/etc/apt/sources.list.d/cnikit-deb-src.sources
if ! apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Package: kubernetes'; then
  cat > "$src_list" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  apt-get update -q >&2
fi
missing=()
for p in golang-go rsync dpkg-dev golang-github-modern-go-reflect2-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

mkdir -p "$cache"
# One build at a time: a second caller waits for the first and then finds the binary.
exec 9>"$cache/.lock"
flock 9
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi

work="$(mktemp -d "$cache/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
(
  cd "$work"
  # apt-get source drops root to _apt where it can; the work dir is root's.
  apt-get source -q kubernetes >&2
)
tree="$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)"
case "$tree" in
  *"$version"*) ;;
  *) echo "kube-apiserver.sh: the source package is $tree, not $version" >&2; exit 1 ;;
esac

reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
rm -rf "$tree/vendor/github.com/modern-go/reflect2"
cp -a "$reflect2" "$tree/vendor/github.com/modern-go/reflect2"

# GOPATH laid out as the package's debian/rules does: the tree is k8s.io/kubernetes.
(
  cd "$tree"
  export GOPATH="$tree/.go" GOCACHE="$work/gocache" HOME="$work/home" CGO_ENABLED=0
  export PATH="/usr/lib/go/bin:$PATH"
  mkdir -p .go/src/k8s.io "$HOME"
  ln -sfn ../../.. .go/src/k8s.io/kubernetes
  make WHAT=cmd/kube-apiserver >&2
)
install -m 0755 "$tree/_output/bin/kube-apiserver" "$bin.tmp"
mv "$bin.tmp" "$bin"
"$bin" --version >&2
echo "$bin"
