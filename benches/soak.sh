#!/usr/bin/env bash
# Soak test: many concurrent POP3 sessions through popgate for a while, twice, watching popgate's
# memory. Loopback only; bounded in time (ROUNDS x DURATION s plus start-up) and stops by itself.
#
# Builds popgate and the driver (examples/soak.rs) in release mode, starts the driver's upstream
# (the demo POP3 server with many users) and `popgate run` in front of it, then the driver's
# client: CONCURRENCY workers each loop sessions (connect, greeting, USER/PASS, STAT, LIST,
# RETR of a small message, one in five idles 0.2-0.8 s, QUIT) until the round is over; workers
# start spread over the first second.
# It prints popgate's RSS (/proc/PID/status VmRSS, VmHWM) at start, peak, end of each round, and
# the sessions completed; exits non-zero on any error (unexpected reply, connect failure,
# timeout) or if RSS after the last round exceeds RSS after round 1 by more than TOL_PCT percent
# and TOL_MB MiB.
#
# Usage: bash benches/soak.sh [CONCURRENCY] [DURATION_S] [ROUNDS]     (default 1000 60 2)
#   smoke: bash benches/soak.sh 100 5 2
# Env: LOG_LEVEL (popgate log level, default info; the log goes to a temp file),
#      TOL_PCT (default 10), TOL_MB (default 2), SETTLE (seconds after each round before RSS is
#      read, default 30: allocators hand freed memory back with a delay; jemalloc took ~18 s), POPGATE_ENV (e.g. "MALLOC_ARENA_MAX=2"),
#      NO_BUILD=1 (use the existing target/release binaries), KEEP=1 (keep the temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
CONCURRENCY=${1:-1000}
DURATION=${2:-60}
ROUNDS=${3:-2}
LOG_LEVEL=${LOG_LEVEL:-info}
TOL_PCT=${TOL_PCT:-10}
TOL_MB=${TOL_MB:-2}
SETTLE=${SETTLE:-30}
# Each session holds one fd in the client and two in popgate; raise the soft limit as far as allowed.
ulimit -n "$(ulimit -Hn)"
need=$((CONCURRENCY * 2 + 100))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need" ]; then
  echo "soak: open-file limit $(ulimit -n) is below the $need needed for $CONCURRENCY sessions" >&2
  exit 2
fi
if [ -z "${NO_BUILD:-}" ]; then
  cargo build --release -q --bin popgate --example soak
fi
tmp=$(mktemp -d /tmp/pgsoak.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ -n "${KEEP:-}" ]; then echo "soak: kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
P_UP=$(port); P_PG=$(port)
./target/release/examples/soak upstream --bind "127.0.0.1:$P_UP" --users $((CONCURRENCY * 4)) \
  > "$tmp/upstream.log" 2>&1 & pids+=($!)
cat > "$tmp/popgate.toml" <<CONF
[[listener]]
name = "soak"
bind = "127.0.0.1:$P_PG"
[upstream]
address = "127.0.0.1:$P_UP"
[limits]
# Every soak client comes from 127.0.0.1: the per-address cap would refuse all but 50.
max_sessions_per_ip = 0
[log]
level = "$LOG_LEVEL"
CONF
# shellcheck disable=SC2086 # POPGATE_ENV is a list of VAR=value words
env ${POPGATE_ENV:-} ./target/release/popgate run --config "$tmp/popgate.toml" 2> "$tmp/popgate.log" & pids+=($!)
pg_pid=${pids[1]}
for p in $P_UP $P_PG; do
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && break; sleep 0.1; done
done
echo "soak: popgate pid $pg_pid on 127.0.0.1:$P_PG${POPGATE_ENV:+ (env $POPGATE_ENV)}, log level $LOG_LEVEL"
status=0
./target/release/examples/soak client --addr "127.0.0.1:$P_PG" --pid "$pg_pid" \
  --concurrency "$CONCURRENCY" --duration "$DURATION" --rounds "$ROUNDS" --settle "$SETTLE" \
  --tolerance-pct "$TOL_PCT" --tolerance-mb "$TOL_MB" || status=$?
if ! kill -0 "$pg_pid" 2>/dev/null; then
  echo "soak: popgate exited during the run; its log:" >&2
  tail -20 "$tmp/popgate.log" >&2
  status=1
fi
grep -E ' (WARN|ERROR) ' "$tmp/popgate.log" | sort | uniq -c | sort -rn | head -5 || true
exit "$status"
