# Shared pieces of the Dovecot-backed benchmarks (retr_throughput.sh, tap_cost.sh, scan.sh).
# Source it from a script in benches/ after `set -euo pipefail` and `cd` to the repository:
#   cd "$(dirname "$0")/.." && source benches/lib.sh && bench_init
# Loopback only; every process whose pid is added to `pids` is killed at exit, and the
# temporary directory `$tmp` is removed then (KEEP=1 keeps both).

# bench_init: $tmp (a private directory readable by Dovecot's unprivileged processes), the
# `pids` array and the exit trap; sbin directories on PATH (dovecot lives there).
bench_init() {
  export PATH="$PATH:/usr/sbin:/sbin"
  tmp=$(mktemp -d /tmp/pgbench.XXXXXX)
  chmod 755 "$tmp"   # Dovecot's auth and mail processes run unprivileged
  pids=()
  if [ -z "${KEEP:-}" ]; then trap bench_cleanup EXIT; fi
}

bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}

# port: a free loopback TCP port.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# bench_message SIZE_MB: user `bench` (password `bench`) gets one message of SIZE_MB MiB in
# $tmp/mail, message 1 of its maildrop (dot-stuffed lines every 50 lines).
bench_message() {
  mkdir -p "$tmp/run" "$tmp/mail/bench/Maildir/"{cur,new,tmp}
  python3 - "$tmp/mail/bench/Maildir/cur/1.M1P1.bench:2,S" "$1" <<'PY'
import sys
path, mb = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    f.write(b"From: bench@example.org\nSubject: bench\n\n")
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.........\n"
    for i in range(mb * 1024 * 1024 // len(line)):
        f.write(b"." + line if i % 50 == 0 else line)
PY
  chown -R 65534:65534 "$tmp/mail"
}

# bench_dovecot: starts Dovecot on $P_DOV (plain) and $P_DOVS (pop3s, certs/localhost.*),
# serving $tmp/mail (bench_message first); waits until the plain port answers.
bench_dovecot() {
  P_DOV=$(port); P_DOVS=$(port)
  mkdir -p "$tmp/run"
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
  wait_ports "$P_DOV"
}

# bench_popgate CONFIG: starts ./target/release/popgate with CONFIG; its pid in PG_PID.
bench_popgate() {
  ./target/release/popgate run --config "$1" & pids+=($!)
  PG_PID=$!
}

# wait_ports PORT...: waits (5 s at most each) until every loopback PORT accepts.
wait_ports() {
  local p
  for p in "$@"; do
    for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/"$p") 2>/dev/null && break; sleep 0.1; done
  done
}

# cpu: popgate's CPU seconds so far (user + system).
cpu() {
  awk -v hz="$(getconf CLK_TCK)" '{printf "%.3f", ($14 + $15) / hz}' "/proc/$PG_PID/stat"
}

# per_gb CPU_BEFORE CPU_AFTER: popgate CPU seconds per GB relayed by RUNS downloads of SIZE_MB.
per_gb() {
  awk -v a="$1" -v b="$2" -v mb="$SIZE_MB" -v n="$RUNS" 'BEGIN {printf "%.2f", (b - a) / (mb * n / 1024)}'
}

# median N...: the median of the numbers given.
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
