#!/usr/bin/env bash
# RETR throughput of one large message, side by side in one run: curl direct to Dovecot and
# through popgate, plain and TLS (popgate terminating TLS on an implicit listener; Dovecot's own
# pop3s for the direct TLS figure). Loopback only, bounded: RUNS downloads of SIZE_MB each.
# Needs: dovecot (dovecot-pop3d), curl, openssl; run as root (Dovecot as in the tests).
# Usage: bash benches/retr_throughput.sh [SIZE_MB] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB=${1:-50}
RUNS=${2:-3}
cargo build --release -q
source benches/lib.sh
bench_init
P_PG=$(port); P_PGS=$(port)
bench_message "$SIZE_MB"
bench_dovecot
cat > "$tmp/popgate.toml" <<CONF
[[listener]]
name = "plain"
bind = "127.0.0.1:$P_PG"
[[listener]]
name = "tls"
bind = "127.0.0.1:$P_PGS"
tls = "implicit"
[upstream]
address = "127.0.0.1:$P_DOV"
[tls]
cert = "$PWD/certs/localhost.crt"
key = "$PWD/certs/localhost.key"
[log]
level = "warn"
CONF
bench_popgate "$tmp/popgate.toml"
wait_ports "$P_PG" "$P_PGS"
speed() { # url [curl args]: median MB/s of RUNS downloads
  local url=$1; shift
  for _ in $(seq "$RUNS"); do
    curl -s -o /dev/null --max-time 120 --cacert certs/dev-ca.crt "$@" -w '%{speed_download}\n' "$url"
  done | sort -n | awk '{a[NR]=$1} END {printf "%.1f", a[int((NR+1)/2)]/1e6}'
}
d=$(speed "pop3://bench:bench@127.0.0.1:$P_DOV/1")
c0=$(cpu)
v=$(speed "pop3://bench:bench@127.0.0.1:$P_PG/1")
c1=$(cpu)
ds=$(speed "pop3s://bench:bench@localhost:$P_DOVS/1")
c2=$(cpu)
vs=$(speed "pop3s://bench:bench@localhost:$P_PGS/1")
c3=$(cpu)
echo "RETR of a ${SIZE_MB} MB message, median of $RUNS curl downloads, MB/s"
printf '  plain: direct %s, via popgate %s, ratio %s\n' "$d" "$v" "$(awk -v a="$v" -v b="$d" 'BEGIN {printf "%.2f", a/b}')"
printf '  TLS:   direct (Dovecot pop3s) %s, via popgate (TLS terminated by popgate) %s, ratio %s\n' "$ds" "$vs" "$(awk -v a="$vs" -v b="$ds" 'BEGIN {printf "%.2f", a/b}')"
printf '  popgate CPU seconds per GB relayed: plain %s, TLS %s\n' "$(per_gb "$c0" "$c1")" "$(per_gb "$c2" "$c3")"
