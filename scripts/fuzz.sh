#!/usr/bin/env bash
# Coverage-guided fuzzing of every cnikit parser of outside input with AFL++ (cargo-afl,
# stable Rust). The targets are in fuzz/ (see fuzz/src/lib.rs); their seed corpora in
# fuzz/corpus/TARGET, the inputs of crashes found and fixed in fuzz/regressions/TARGET.
#
#   scripts/fuzz.sh build                 # installs cargo-afl if missing, builds the targets
#   scripts/fuzz.sh replay                # seeds and regressions through every target (quick)
#   scripts/fuzz.sh run TARGET [EXECS]    # one campaign: EXECS executions (default 1000000)
#   scripts/fuzz.sh all [EXECS]           # every target, one after the other
#   scripts/fuzz.sh list                  # the target names
#
# Campaigns run at nice 19 with no CPU pinning, write their queue, crashes and hangs to
# fuzz/out/TARGET (not committed), and append `target executions seconds crashes hangs` to
# fuzz/out/summary.tsv. A crash or hang makes `run` exit 1; its input goes into
# fuzz/regressions/TARGET with the fix, where the replay test keeps it fixed.
set -euo pipefail
cd "$(dirname "$0")/.."

AFL_TARGET_DIR=${AFL_TARGET_DIR:-target/afl}
BIN="$AFL_TARGET_DIR/release/cnikit-fuzz"
TARGETS=(netconf conflist env result store_file store_records node_records bgp)

build() {
  if ! cargo afl --version >/dev/null 2>&1; then
    # cargo-afl builds AFL++ from the source it ships (make and a C compiler).
    cargo install cargo-afl --version 0.18.2 --locked
  fi
  CARGO_TARGET_DIR="$AFL_TARGET_DIR" cargo afl build -q -p cnikit-fuzz --release
}

stat_of() { # FILE KEY
  sed -n "s/^$2 *: *//p" "$1"
}

run() { # TARGET EXECS
  local target=$1 execs=${2:-1000000}
  local out="fuzz/out/$target"
  [ -x "$BIN" ] || build
  [ -d "fuzz/corpus/$target" ] || { echo "unknown target $target" >&2; exit 2; }
  mkdir -p fuzz/out
  rm -rf "$out"
  local tmp
  tmp=$(mktemp -d "${FUZZ_TMP:-/dev/shm}/cnikit-fuzz-$target.XXXXXX")
  trap 'rm -rf "$tmp"' RETURN
  # -t: an input that runs longer than 5 s is a hang; -m: more than 1 GiB of address space
  # is an unbounded allocation. Both are findings, like a panic.
  TMPDIR="$tmp" AFL_NO_UI=1 AFL_NO_AFFINITY=1 AFL_SKIP_CPUFREQ=1 \
    AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_SKIP_CRASHES=0 MALLOC_ARENA_MAX=2 \
    nice -n 19 cargo afl fuzz -i "fuzz/corpus/$target" -o "$out" -E "$execs" \
      -t 5000 -m 1024 -- "$BIN" "$target" >"fuzz/out/$target.log" 2>&1 || {
        echo "afl-fuzz failed for $target: see fuzz/out/$target.log" >&2
        tail -20 "fuzz/out/$target.log" >&2
        return 1
      }
  local stats="$out/default/fuzzer_stats"
  local done_execs secs crashes hangs
  done_execs=$(stat_of "$stats" execs_done)
  secs=$(stat_of "$stats" run_time)
  crashes=$(stat_of "$stats" saved_crashes)
  hangs=$(stat_of "$stats" saved_hangs)
  printf '%s\t%s\t%s\t%s\t%s\n' "$target" "$done_execs" "$secs" "$crashes" "$hangs" |
    tee -a fuzz/out/summary.tsv
  [ "$crashes" = 0 ] && [ "$hangs" = 0 ]
}

case "${1:-}" in
  build) build ;;
  replay) cargo test -q -p cnikit-fuzz ;;
  run) [ -n "${2:-}" ] || { echo "usage: $0 run TARGET [EXECS]" >&2; exit 2; }
       run "$2" "${3:-}" ;;
  all) status=0
       for t in "${TARGETS[@]}"; do run "$t" "${2:-}" || status=1; done
       exit $status ;;
  list) printf '%s\n' "${TARGETS[@]}" ;;
  *) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
