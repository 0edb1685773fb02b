#!/usr/bin/env bash
# Soak test: many concurrent POP3 sessions through popgate for a while, several rounds, watching
# popgate's memory. Loopback only; bounded in time (ROUNDS x DURATION s plus start-up and
# SETTLE) and stops by itself.
#
# Builds popgate and the load driver (loadgen/, `popgate-load`) in release mode, starts the
# driver's in-memory upstream (`popgate-load serve`, many users) and `popgate run` in front of
# it, then per round `popgate-load run cycle`: CONCURRENCY workers loop sessions (connect,
# greeting, USER/PASS, STAT, LIST, RETR of a small message, one in five idles 0.2-0.8 s, QUIT)
# for DURATION s; then SETTLE s before popgate's memory is read.
# It prints popgate's RSS (VmRSS) at start, its peak (VmHWM) and RSS after each round, and the
# sessions completed; exits non-zero on any error (unexpected reply, connect failure, timeout)
# or if RSS after the last round exceeds RSS after round 1 by more than TOL_PCT percent and
# TOL_MB MiB.
#
# Usage: bash benches/soak.sh [CONCURRENCY] [DURATION_S] [ROUNDS]     (default 1000 60 2)
#   smoke: bash benches/soak.sh 100 5 2
# Env: LOG_LEVEL (popgate log level, default info; the log goes to a temp file),
#      TOL_PCT (default 10), TOL_MB (default 2), SETTLE (seconds after each round before RSS is
#      read, default 30: allocators hand freed memory back with a delay; jemalloc took ~18 s),
#      POPGATE_ENV (e.g. "MALLOC_ARENA_MAX=2"), NO_BUILD=1 (use the existing target/release
#      binaries), KEEP=1 (keep the temp dir).
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
  cargo build --release -q --bin popgate --bin popgate-load
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
# Users go round by session number (load0, load1, ...): enough of them that the sessions in
# flight at once (paused ones last up to a second) never share a maildrop (the server locks it).
USERS=$((CONCURRENCY * 50))
./target/release/popgate-load serve --bind "127.0.0.1:$P_UP" --users "$USERS" --big-users 0 \
  > "$tmp/upstream.log" 2>&1 & pids+=($!)
cat > "$tmp/popgate.toml" <<CONF
[[listener]]
name = "soak"
bind = "127.0.0.1:$P_PG"
[upstream]
address = "127.0.0.1:$P_UP"
[limits]
# Every soak client comes from 127.0.0.x: the per-address cap would refuse all but 50.
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
rss() { awk '/^VmRSS/ {print $2}' "/proc/$pg_pid/status"; }
hwm() { awk '/^VmHWM/ {print $2}' "/proc/$pg_pid/status"; }
echo "soak: start RSS $(rss) KiB"
status=0
first=""
last=""
for round in $(seq "$ROUNDS"); do
  ./target/release/popgate-load run cycle --addr "127.0.0.1:$P_PG" -c "$CONCURRENCY" \
    -d "$DURATION" --users "$USERS" --pause-every 5 --sources 8 --pid "$pg_pid" \
    --settle "$SETTLE" --label "soak round $round" > "$tmp/round$round.json" || status=$?
  read -r sessions errors first_error < <(python3 - "$tmp/round$round.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
e = r.get("errors", {})
print(r["counts"]["sessions"], e.get("total", 0), json.dumps(e.get("first")))
PY
  )
  now=$(rss)
  echo "soak: round $round: $sessions sessions, $errors errors, peak RSS $(hwm) KiB, RSS after ${SETTLE}s $now KiB"
  if [ "$errors" != 0 ]; then
    echo "soak: first error: $first_error" >&2
    status=1
  fi
  [ -z "$first" ] && first=$now
  last=$now
done
if ! kill -0 "$pg_pid" 2>/dev/null; then
  echo "soak: popgate exited during the run; its log:" >&2
  tail -20 "$tmp/popgate.log" >&2
  status=1
fi
limit=$(( first + first * TOL_PCT / 100 ))
limit_mb=$(( first + TOL_MB * 1024 ))
[ "$limit_mb" -gt "$limit" ] && limit=$limit_mb
if [ "$last" -gt "$limit" ]; then
  echo "soak: RSS grew from $first KiB (round 1) to $last KiB (round $ROUNDS), above $limit KiB" >&2
  status=1
else
  echo "soak: RSS after the last round $last KiB is within the tolerance of round 1's $first KiB"
fi
grep -E ' (WARN|ERROR) ' "$tmp/popgate.log" | sort | uniq -c | sort -rn | head -5 || true
exit "$status"
