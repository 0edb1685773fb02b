#!/usr/bin/env bash
# Run every fuzz target for DURATION_SECS each, two at a time (the CI machines have 2 cores),
# then print execs and findings per target. Bounded: each run stops after DURATION_SECS.
# Needs cargo-fuzz (`cargo install cargo-fuzz`); stable toolchains work with RUSTC_BOOTSTRAP=1.
# Usage: fuzz/run-all.sh DURATION_SECS [TARGET...]
set -uo pipefail
cd "$(dirname "$0")"
DURATION=${1:?usage: fuzz/run-all.sh DURATION_SECS [TARGET...]}
shift
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(command body tracker session)
export RUSTC_BOOTSTRAP=1
logs=$(mktemp -d /tmp/popgate-fuzz.XXXXXX)
for t in "${TARGETS[@]}"; do cargo fuzz build -O "$t" || exit 2; done
stamp="$logs/start"
touch "$stamp"
run() { # target
  mkdir -p "corpus/$1" "artifacts/$1"
  cargo fuzz run -O "$1" "corpus/$1" -- -max_total_time="$DURATION" -timeout=10 \
    -print_final_stats=1 > "$logs/$1.log" 2>&1
  echo $? > "$logs/$1.rc"
}
pids=()
for t in "${TARGETS[@]}"; do
  run "$t" & pids+=($!)
  if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p"; done
status=0
printf '%-10s %8s %12s %10s  %s\n' target secs execs exec/s findings
for t in "${TARGETS[@]}"; do
  log="$logs/$t.log"
  execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)
  rate=$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)
  found=$(find "artifacts/$t" -type f -newer "$stamp" 2>/dev/null | wc -l)
  printf '%-10s %8s %12s %10s  %s\n' "$t" "$DURATION" "${execs:-?}" "${rate:-?}" "$found new artifact(s), exit $(cat "$logs/$t.rc")"
  if [ "$found" -gt 0 ] || [ "$(cat "$logs/$t.rc")" != 0 ]; then
    status=1
    grep -m1 -E 'panicked at|ERROR: libFuzzer' -A2 "$log" | sed 's/^/    /'
    find "artifacts/$t" -type f -newer "$stamp" | sed 's/^/    /'
  fi
done
echo "logs: $logs"
exit "$status"
