#!/usr/bin/env bash
# Login-cycle cost of the fleet state store: popgate with `[state] backend = "local"` against
# `backend = "redis"` (a redis-server of its own on loopback), in front of the in-memory
# upstream (`popgate-load serve`). Each cycle is connect, USER/PASS, RETR 1, QUIT from one of
# 50 loopback addresses, with `max_sessions_per_ip` set so the fleet slot is taken and freed
# in Redis on every session. Prints one line per backend: cycles/s, p50/p99 ms, CPU µs per
# cycle of popgate (and of redis-server).
#
# Env: DURATION (s, default 20), CONC (workers, default 8), NO_BUILD=1 (use target/release).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-20}
CONC=${CONC:-8}
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p popgate -p popgate-load
BIN=target/release/popgate
LOAD=target/release/popgate-load
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

"$LOAD" serve --bind 127.0.0.1:0 --big-mb 1 >"$tmp/mem.out" 2>&1 &
pids+=($!)
for _ in $(seq 100); do UP=$(head -n1 "$tmp/mem.out" | grep -o '127.0.0.1:[0-9]*' || true); [ -n "$UP" ] && break; sleep 0.05; done
RPORT=$(free_port)
redis-server --bind 127.0.0.1 --port "$RPORT" --save "" --appendonly no --dir "$tmp" >"$tmp/redis.log" 2>&1 &
RPID=$!
pids+=($RPID)
for _ in $(seq 100); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.05; done

for backend in local redis; do
  PORT=$(free_port)
  state=""
  [ "$backend" = redis ] && state=$'[state]\nbackend = "redis"\nurl = "redis://127.0.0.1:'"$RPORT"$'/0"\n'
  cat >"$tmp/$backend.toml" <<TOML
[[listener]]
name = "bench"
bind = "127.0.0.1:$PORT"
[upstream]
address = "$UP"
[limits]
max_sessions_per_ip = 1000
[log]
level = "warn"
$state
TOML
  "$BIN" run --config "$tmp/$backend.toml" 2>"$tmp/$backend.err" &
  PID=$!
  pids+=($PID)
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && break; sleep 0.05; done
  r0=$(awk '{print $14+$15}' /proc/$RPID/stat)
  "$LOAD" run cycle --addr 127.0.0.1:"$PORT" --pid "$PID" -c "$CONC" -d "$DURATION" --sources 50 \
    --label "$backend" >"$tmp/$backend.json"
  r1=$(awk '{print $14+$15}' /proc/$RPID/stat)
  python3 - "$tmp/$backend.json" "$backend" "$((r1 - r0))" "$(getconf CLK_TCK)" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
units = r.get("units") or r.get("ok") or 0
lat = r.get("latency_ms") or r.get("latency") or {}
proc = r.get("process") or {}
per = (proc.get("per_unit") or {}) if isinstance(proc, dict) else {}
redis_us = int(sys.argv[3]) / int(sys.argv[4]) * 1e6 / max(units, 1)
print(f"{sys.argv[2]}: {json.dumps({k: r[k] for k in r if k not in ('process',)})}")
print(f"{sys.argv[2]}: process {json.dumps(proc)}; redis-server CPU us/cycle {redis_us:.1f}")
PY
  kill "$PID"; wait "$PID" 2>/dev/null || true
done
