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
export PATH="$PATH:/usr/sbin:/sbin"
cargo build --release -q -p popgate --bin popgate
tmp=$(mktemp -d /tmp/pgbench.XXXXXX)
chmod 755 "$tmp"   # Dovecot's auth and mail processes run unprivileged
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
[ -n "${KEEP:-}" ] && trap - EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
P_DOV=$(port); P_DOVS=$(port); P_PG=$(port)
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
[upstream]
address = "127.0.0.1:$P_DOV"
[log]
level = "warn"
[control]
socket = "$tmp/control.sock"
CONF
./target/release/popgate run --config "$tmp/popgate.toml" & pids+=($!)
PG_PID=$!
for p in $P_DOV $P_PG; do
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done
for _ in $(seq 50); do [ -S "$tmp/control.sock" ] && break; sleep 0.1; done
cpu() { # popgate's CPU seconds so far (user + system)
  awk -v hz="$(getconf CLK_TCK)" '{printf "%.3f", ($14 + $15) / hz}' "/proc/$PG_PID/stat"
}
run() { # RUNS downloads; prints popgate CPU seconds per GB relayed
  local a b
  a=$(cpu)
  for _ in $(seq "$RUNS"); do
    curl -s -o /dev/null --max-time 300 "pop3://bench:bench@127.0.0.1:$P_PG/1"
  done
  b=$(cpu)
  awk -v a="$a" -v b="$b" -v mb="$SIZE_MB" -v n="$RUNS" 'BEGIN {printf "%.2f", (b - a) / (mb * n / 1024)}'
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
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
./target/release/popgate tap --user bench --socket "$tmp/control.sock" >"$tmp/tap.out" 2>&1 & pids+=($!)
sleep 0.5
on=$(run)
echo "popgate CPU seconds per GB relayed (plain RETR of ${SIZE_MB} MB, $RUNS runs per figure):"
printf '  no tap:                median %s of %s\n' "$(median "${nones[@]}")" "${nones[*]}"
printf '  one idle tap attached: median %s of %s\n' "$(median "${idles[@]}")" "${idles[*]}"
printf '  one tap on the session (size lines): %s\n' "$on"
printf '  lines the session tap printed: %s\n' "$(grep -c ' s[0-9]* ' "$tmp/tap.out" || true)"
