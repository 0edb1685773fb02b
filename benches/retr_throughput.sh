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
export PATH="$PATH:/usr/sbin:/sbin"
cargo build --release -q
tmp=$(mktemp -d /tmp/pgbench.XXXXXX)
chmod 755 "$tmp"   # Dovecot's auth and mail processes run unprivileged
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
[ -n "${KEEP:-}" ] && trap - EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
P_DOV=$(port); P_DOVS=$(port); P_PG=$(port); P_PGS=$(port)
mkdir -p "$tmp/run" "$tmp/mail/bench/Maildir/"{cur,new,tmp}
python3 - "$tmp/mail/bench/Maildir/cur/1.M1P1.bench:2,S" "$SIZE_MB" <<'PY'
import sys
path, mb = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    f.write(b"From: bench@example.org\nSubject: bench\n\n")
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.........\n"
    for i in range(mb * 1024 * 1024 // len(line)):
        f.write(b"." + line if i % 50 == 0 else line)
PY
chown -R 65534:65534 "$tmp/mail"
echo 'bench:{PLAIN}bench' > "$tmp/passwd"
cat > "$tmp/dovecot.conf" <<CONF
protocols = pop3
listen = 127.0.0.1
base_dir = $tmp/run
state_dir = $tmp/run
log_path = $tmp/dovecot.log
ssl = yes
ssl_cert = <$PWD/certs/localhost.crt
ssl_key = <$PWD/certs/localhost.key
disable_plaintext_auth = no
auth_mechanisms = plain login
passdb {
  driver = passwd-file
  args = scheme=PLAIN $tmp/passwd
}
userdb {
  driver = static
  args = uid=65534 gid=65534 home=$tmp/mail/%u
}
first_valid_uid = 1000
last_valid_uid = 0
mail_location = maildir:~/Maildir
service pop3-login {
  inet_listener pop3 {
    address = 127.0.0.1
    port = $P_DOV
  }
  inet_listener pop3s {
    address = 127.0.0.1
    port = $P_DOVS
    ssl = yes
  }
}
CONF
dovecot -F -c "$tmp/dovecot.conf" & pids+=($!)
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
./target/release/popgate run --config "$tmp/popgate.toml" & pids+=($!)
PG_PID=$!
for p in $P_DOV $P_PG $P_PGS; do
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done
speed() { # url [curl args]: median MB/s of RUNS downloads
  local url=$1; shift
  for _ in $(seq "$RUNS"); do
    curl -s -o /dev/null --max-time 120 --cacert certs/dev-ca.crt "$@" -w '%{speed_download}\n' "$url"
  done | sort -n | awk '{a[NR]=$1} END {printf "%.1f", a[int((NR+1)/2)]/1e6}'
}
cpu() { # popgate's CPU seconds so far (user + system)
  awk -v hz="$(getconf CLK_TCK)" '{printf "%.3f", ($14 + $15) / hz}' "/proc/$PG_PID/stat"
}
per_gb() { # cpu_before cpu_after: popgate CPU seconds per GB relayed
  awk -v a="$1" -v b="$2" -v mb="$SIZE_MB" -v n="$RUNS" 'BEGIN {printf "%.2f", (b - a) / (mb * n / 1024)}'
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
