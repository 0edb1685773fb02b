#!/usr/bin/env bash
# Content scanning (issue 23): RETR of one large message with clamd scanning it on the way,
# against p3scan's design (spool the whole message to disk, then have clamd scan the file),
# side by side in one run, same machine, same clamd, same message:
#   direct        curl straight to Dovecot (the reference)
#   relay         curl through popgate, no scanning
#   scan          curl through popgate with a `scan` rule: popgate holds the body (a file spool
#                 above spool_memory), streams it to clamd (INSTREAM), then relays it
#   p3scan        curl through popgate without scanning into a file, then `clamdscan` of that
#                 file (clamd opens it itself, as p3scan's clamd mode did): the time of both
# Figures: MB/s as the client sees it (median of RUNS), and CPU seconds per GB of popgate and of
# clamd (their utime+stime from /proc before and after the RUNS).
# clamd loads one custom signature only (no download): its scan cost here is a lower bound of a
# production clamd with the full database; both designs pay the same.
# Loopback only, bounded. Needs dovecot, curl, clamav-daemon (clamd, clamdscan); run as root.
# Usage: bash benches/scan.sh [SIZE_MB] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB=${1:-20}
RUNS=${2:-3}
cargo build --release -q
source benches/lib.sh
bench_init
P_PG=$(port); P_PGSCAN=$(port)
bench_message "$SIZE_MB"
bench_dovecot

# clamd in the foreground, a unix socket, one signature, limits above the message size, and no
# cache of clean results (every run here scans the same bytes: with the cache, all runs but the
# first would only hash them).
mkdir -p "$tmp/clamd/db" "$tmp/spool"
printf 'PopgateBench.Sig:0:*:%s\n' "$(printf 'POPGATE-BENCH-NOT-IN-THE-MAIL' | od -An -tx1 | tr -d ' \n')" \
  > "$tmp/clamd/db/bench.ndb"
LIMIT_MB=$((SIZE_MB * 2 + 10))
cat > "$tmp/clamd/clamd.conf" <<CONF
Foreground yes
LocalSocket $tmp/clamd/clamd.sock
DatabaseDirectory $tmp/clamd/db
LogFile $tmp/clamd/clamd.log
StreamMaxLength ${LIMIT_MB}M
MaxScanSize ${LIMIT_MB}M
MaxFileSize ${LIMIT_MB}M
DisableCache yes
CONF
clamd -c "$tmp/clamd/clamd.conf" >/dev/null 2>&1 & pids+=($!)
CLAMD_PID=$!
for _ in $(seq 100); do [ -S "$tmp/clamd/clamd.sock" ] && break; sleep 0.1; done
[ -S "$tmp/clamd/clamd.sock" ] || { echo "clamd did not start"; cat "$tmp/clamd/clamd.log"; exit 1; }

cat > "$tmp/scan.toml" <<CONF
[[rule]]
name = "scan-all"
on = "command"
verbs = ["RETR"]
listener = ["scan"]
action = "scan"
scan = ["clamav"]
CONF
cat > "$tmp/popgate.toml" <<CONF
rules = ["scan.toml"]
[[listener]]
name = "plain"
bind = "127.0.0.1:$P_PG"
[[listener]]
name = "scan"
bind = "127.0.0.1:$P_PGSCAN"
[upstream]
address = "127.0.0.1:$P_DOV"
[[scanner]]
name = "clamav"
kind = "clamd"
address = "unix:$tmp/clamd/clamd.sock"
timeout = "120s"
max_size = "${LIMIT_MB}MB"
[scan]
spool_dir = "$tmp/spool"
[log]
level = "warn"
CONF
bench_popgate "$tmp/popgate.toml"
wait_ports "$P_PG" "$P_PGSCAN"

cpu_of() { # PID: its CPU seconds so far (user + system)
  awk -v hz="$(getconf CLK_TCK)" '{printf "%.3f", ($14 + $15) / hz}' "/proc/$1/stat"
}
mbps() { # SECONDS...: the median of SIZE_MB / each
  median "$(for t in "$@"; do awk -v t="$t" -v mb="$SIZE_MB" 'BEGIN {printf "%.1f\n", mb * 1.048576 / t}'; done)"
}
retr() { # URL [FILE]: seconds one curl RETR took (output to FILE or /dev/null)
  curl -s --max-time 300 -o "${2:-/dev/null}" -w '%{time_total}\n' "$1"
}
declare -A secs pg clam
run() { # NAME COMMAND...: RUNS timed runs of COMMAND (it prints its seconds)
  local name=$1 p0 c0 t=(); shift
  p0=$(cpu_of "$PG_PID"); c0=$(cpu_of "$CLAMD_PID")
  for _ in $(seq "$RUNS"); do t+=("$("$@")"); done
  secs[$name]=$(printf '%s\n' "${t[@]}" | tr '\n' ' ')
  pg[$name]=$(per_gb "$p0" "$(cpu_of "$PG_PID")")
  clam[$name]=$(per_gb "$c0" "$(cpu_of "$CLAMD_PID")")
}
p3scan() { # one p3scan-style retrieval: spool to a file, then clamdscan it; total seconds
  local f="$tmp/spool/p3scan.eml" t0 t1
  t0=$(date +%s.%N)
  retr "pop3://bench:bench@127.0.0.1:$P_PG/1" "$f" >/dev/null
  clamdscan --config-file="$tmp/clamd/clamd.conf" --no-summary "$f" >/dev/null
  t1=$(date +%s.%N)
  rm -f "$f"
  awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.4f\n", b - a}'
}
run direct retr "pop3://bench:bench@127.0.0.1:$P_DOV/1"
run relay retr "pop3://bench:bench@127.0.0.1:$P_PG/1"
run scan retr "pop3://bench:bench@127.0.0.1:$P_PGSCAN/1"
run p3scan p3scan
# The scan listener must have scanned: clamd worked during those runs.
if awk -v c="${clam[scan]}" 'BEGIN {exit !(c < 0.01)}'; then
  echo "clamd did no work while popgate scanned: is the scan rule in force?" >&2; exit 1
fi

echo "RETR of a ${SIZE_MB} MiB message, median of $RUNS runs (clamd: 1 signature, unix socket)"
printf '  %-8s %8s %12s %12s\n' "" "MB/s" "popgate s/GB" "clamd s/GB"
for n in direct relay scan p3scan; do
  # shellcheck disable=SC2086
  printf '  %-8s %8s %12s %12s\n' "$n" "$(mbps ${secs[$n]})" "${pg[$n]}" "${clam[$n]}"
done
# shellcheck disable=SC2086
printf '  scan / p3scan throughput ratio: %s\n' \
  "$(awk -v a="$(mbps ${secs[scan]})" -v b="$(mbps ${secs[p3scan]})" 'BEGIN {printf "%.2f", a/b}')"
