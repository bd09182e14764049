#!/usr/bin/env bash
# Builds the eBPF programs of backend-ebpf (bpf/NAME.c -> bpf/NAME.bpf.o) with clang.
# The objects are committed, so building cnikit needs no clang; run this after changing a
# program. With --check, builds into a scratch directory and fails when any committed object
# differs from what its source builds to (scripts/test.sh runs that).
#
# The build is reproducible: the source is compiled under a fixed name (-fdebug-prefix-map,
# relative path, no timestamps in ELF), and the DWARF sections are stripped; the BTF the
# loader needs stays.
set -euo pipefail
cd "$(dirname "$0")/../backend-ebpf"

check=0
if [ "${1:-}" = "--check" ]; then
  check=1
fi

for tool in clang llvm-strip; do
  command -v "$tool" >/dev/null || { echo "scripts/bpf.sh: $tool missing (scripts/deps.sh installs clang and llvm)" >&2; exit 1; }
done
multiarch=$(clang -print-multiarch)  # where Debian keeps <asm/types.h>

out=bpf
scratch=""
if [ "$check" = 1 ]; then
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  out=$scratch
fi

status=0
for src in bpf/*.c; do
  name=$(basename "$src" .c)
  obj="$out/$name.bpf.o"
  clang -O2 -g -target bpf -Wall -Werror \
    -I"/usr/include/$multiarch" \
    -fdebug-prefix-map="$PWD"=. -fdebug-compilation-dir=. \
    -c "$src" -o "$obj"
  llvm-strip --strip-debug "$obj"
  if [ "$check" = 1 ]; then
    if ! cmp -s "$obj" "bpf/$name.bpf.o"; then
      echo "scripts/bpf.sh: backend-ebpf/bpf/$name.bpf.o is not what $src builds to; run scripts/bpf.sh and commit it" >&2
      status=1
    fi
  fi
done
exit $status
