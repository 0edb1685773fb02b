#!/usr/bin/env bash
# What a tap costs the relay (issue 21): popgate's CPU seconds per GB relayed for a plain RETR
# of one large message through popgate to Dovecot, in one run, three ways: no tap attached;
# one idle tap attached (`popgate tap --user nobody-here`: attached, matching no session); and
# one tap on the very session (`--user bench`, bodies as a size line). Loopback only, bounded:
# RUNS downloads of SIZE_MB for each. Needs dovecot (dovecot-pop3d) and curl; run as root.
# Usage: bash benches/tap_cost.sh [SIZE_MB] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB=${1:-50}
RUNS=${2:-3}
cargo build --release -q -p popgate --bin popgate
source benches/lib.sh
bench_init
P_PG=$(port)
bench_message "$SIZE_MB"
bench_dovecot
cat > "$tmp/popgate.toml" <<CONF
[[listener]]
name = "plain"
bind = "127.0.0.1:$P_PG"
[upstream]
address = "127.0.0.1:$P_DOV"
[log]
level = "warn"
[control]
socket = "$tmp/control.sock"
CONF
bench_popgate "$tmp/popgate.toml"
wait_ports "$P_PG"
for _ in $(seq 50); do [ -S "$tmp/control.sock" ] && break; sleep 0.1; done
run() { # RUNS downloads; prints popgate CPU seconds per GB relayed
  local a b
  a=$(cpu)
  for _ in $(seq "$RUNS"); do
    curl -s -o /dev/null --max-time 300 "pop3://bench:bench@127.0.0.1:$P_PG/1"
  done
  b=$(cpu)
  per_gb "$a" "$b"
}
run >/dev/null   # warm-up (page cache, Dovecot's index)
# No tap and one idle tap, alternating ROUNDS times (the machine's load drifts): medians.
ROUNDS=${ROUNDS:-3}
nones=(); idles=()
for _ in $(seq "$ROUNDS"); do
  nones+=("$(run)")
  ./target/release/popgate tap --user nobody-here --socket "$tmp/control.sock" >/dev/null 2>&1 & pids+=($!)
  TAP=$!
  sleep 0.5
  idles+=("$(run)")
  kill "$TAP"; wait "$TAP" 2>/dev/null || true
  sleep 0.2
done
./target/release/popgate tap --user bench --socket "$tmp/control.sock" >"$tmp/tap.out" 2>&1 & pids+=($!)
sleep 0.5
on=$(run)
echo "popgate CPU seconds per GB relayed (plain RETR of ${SIZE_MB} MB, $RUNS runs per figure):"
printf '  no tap:                median %s of %s\n' "$(median "${nones[@]}")" "${nones[*]}"
printf '  one idle tap attached: median %s of %s\n' "$(median "${idles[@]}")" "${idles[*]}"
printf '  one tap on the session (size lines): %s\n' "$on"
printf '  lines the session tap printed: %s\n' "$(grep -c ' s[0-9]* ' "$tmp/tap.out" || true)"
