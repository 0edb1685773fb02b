#!/usr/bin/env bash
# Side-by-side comparison of popgate with nginx mail, HAProxy, stunnel and Perdition, and with
# the server reached directly, in one run on loopback (see benches/README.md).
#
# Upstreams: `popgate-load serve` (the demo server, in memory: the session rate measures the
# proxy) and a real Dovecot (forks per login: its figures measure Dovecot too). In front of
# each: popgate (plain, STLS, implicit TLS), nginx mail (plain+STLS, implicit; auth_http answered
# by nginx itself), HAProxy (TCP, TLS termination), stunnel (implicit TLS), Perdition (plain,
# implicit TLS). Scenarios (popgate-load): cycle, bulk, noop, idle, handshake (full and resumed);
# each against each target where it applies. Every report is kept as JSON; the end prints one
# markdown table (benches/compare_table.py): proxy CPU per unit of work first, then absolute
# figures, and the ratios popgate/direct and popgate/best peer.
#
# Loopback only; every process started here is stopped by pid on exit; each run is bounded by
# a count or a duration. Peers missing from the machine are installed with apt-get when running
# as root (NO_INSTALL=1 to skip), otherwise named and left out of the table. Perdition is not
# installed: its .debs are fetched with `apt-get download` and unpacked into target/bench-peers.
#
# Usage: bash benches/compare.sh [smoke|full]           (default smoke: seconds per run)
# Env:   UPSTREAMS="mem dovecot"  PEERS="popgate nginx haproxy stunnel perdition"
#        DURATION CONC BULK_MB BULK_N IDLE_N IDLE_TLS_N NOOP_N HS_N IDLE_SETTLE SOURCES
#        (override the scale)
#        SCENARIOS="cycle bulk noop idle handshake" (a subset runs only those)
#        OUT=dir (keep the JSON reports there), NO_BUILD=1, NO_INSTALL=1, KEEP=1 (keep temp dir),
#        PROFILE=debug (use target/debug binaries: smoke checks of the script only)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SCALE=${1:-smoke}
case "$SCALE" in
  smoke) d=(2 4 4 2 40 20 200 20 2) ;;
  full) d=(20 16 50 5 2000 1000 20000 2000 25) ;;
  *) echo "usage: $0 [smoke|full]" >&2; exit 2 ;;
esac
DURATION=${DURATION:-${d[0]}}  # seconds of cycle load per target
CONC=${CONC:-${d[1]}}          # closed-loop workers for cycle
BULK_MB=${BULK_MB:-${d[2]}}    # size of the big message, MiB
BULK_N=${BULK_N:-${d[3]}}      # RETRs of it per target
IDLE_N=${IDLE_N:-${d[4]}}      # plain sessions held by idle
IDLE_TLS_N=${IDLE_TLS_N:-${d[5]}}
NOOP_N=${NOOP_N:-${d[6]}}      # NOOP round trips (one session)
HS_N=${HS_N:-${d[7]}}          # TLS handshakes per variant
IDLE_SETTLE=${IDLE_SETTLE:-${d[8]}}  # s after the idle sessions closed before RSS is read again
                                     # (jemalloc gives memory back after ~18 s, benches/SOAK.md)
SOURCES=${SOURCES:-8}          # client addresses 127.0.0.1..N
UPSTREAMS=${UPSTREAMS:-mem dovecot}
PEERS=${PEERS:-popgate nginx haproxy stunnel perdition}
export PATH="$PATH:/usr/sbin:/sbin"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

log() { printf 'compare: %s\n' "$*" >&2; }

# ---- peers: install or name what is missing ---------------------------------------------------
declare -A PKGS=([dovecot]="dovecot-core dovecot-pop3d" [nginx]="nginx libnginx-mod-mail"
                 [haproxy]="haproxy" [stunnel]="stunnel4")
missing_pkgs() { for p in "$@"; do
  [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" = "install ok installed" ] || echo "$p"; done; }
PERD_DIR=$ROOT/target/bench-peers/perdition
want=()
for peer in dovecot $PEERS; do
  if [ -n "${PKGS[$peer]:-}" ]; then
    # shellcheck disable=SC2086 # a list of package names
    mapfile -t -O "${#want[@]}" want < <(missing_pkgs ${PKGS[$peer]})
  fi
done
if [ "${#want[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && [ -z "${NO_INSTALL:-}" ]; then
    log "installing ${want[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
  else
    log "missing packages (not installing): ${want[*]}"
  fi
fi
if [[ " $PEERS " == *" perdition "* ]] && [ ! -x "$PERD_DIR/usr/sbin/perdition.pop3" ] \
   && [ -z "${NO_INSTALL:-}" ]; then
  log "fetching Perdition (apt-get download, unpacked into $PERD_DIR)"
  mkdir -p "$PERD_DIR/debs"
  (cd "$PERD_DIR/debs" && apt-get download -qq perdition libvanessa-adt1 libvanessa-logger0 \
     libvanessa-socket2 libidn12 libpopt0 2>/dev/null) || log "apt-get download perdition failed"
  for f in "$PERD_DIR"/debs/*.deb; do [ -e "$f" ] && dpkg -x "$f" "$PERD_DIR"; done
fi
have() { case $1 in
  popgate) return 0 ;;
  dovecot) command -v dovecot >/dev/null ;;
  nginx) command -v nginx >/dev/null && [ -e /usr/lib/nginx/modules/ngx_mail_module.so ] ;;
  haproxy) command -v haproxy >/dev/null ;;
  stunnel) command -v stunnel4 >/dev/null || command -v stunnel >/dev/null ;;
  perdition) [ -x "$PERD_DIR/usr/sbin/perdition.pop3" ] ;;
esac; }
active=()
for peer in $PEERS; do
  if have "$peer"; then active+=("$peer"); else log "$peer not available: left out"; fi
done
if [[ " $UPSTREAMS " == *" dovecot "* ]] && ! have dovecot; then
  log "dovecot not available: mem upstream only"; UPSTREAMS=${UPSTREAMS//dovecot/}
fi

# ---- build --------------------------------------------------------------------------------------
PROFILE=${PROFILE:-release}
if [ -z "${NO_BUILD:-}" ]; then
  if [ "$PROFILE" = release ]; then flag=--release; else flag=; fi
  cargo build $flag -q --bin popgate --bin popgate-load
fi
LOAD=$ROOT/target/$PROFILE/popgate-load
POPGATE=$ROOT/target/$PROFILE/popgate
CERT=$ROOT/certs/localhost.crt
KEY=$ROOT/certs/localhost.key
CA=$ROOT/certs/dev-ca.crt

# ---- processes ----------------------------------------------------------------------------------
tmp=$(mktemp -d /tmp/pgcompare.XXXXXX)
chmod 755 "$tmp"   # Dovecot's and nginx's unprivileged processes read below it
OUT=${OUT:-$tmp/results}
mkdir -p "$OUT"
pids=()
stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  pids=()
}
cleanup() { stop_all; if [ -n "${KEEP:-}" ]; then log "kept $tmp"; else rm -rf "$tmp"; fi; }
trap cleanup EXIT
trap 'exit 130' INT TERM
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  log "nothing listens on port $1 ($2)"; return 1
}
cat "$CERT" "$KEY" > "$tmp/combined.pem"

# ---- upstreams ----------------------------------------------------------------------------------
# Both serve message 1 (small) to every user and message 2 (BULK_MB MiB) to users load0, load1;
# every user's password is `pass`.
USERS=$(( IDLE_N > 10000 ? IDLE_N : 10000 ))
start_mem() {
  "$LOAD" serve --bind 127.0.0.1:0 --users "$USERS" --big-users 2 --big-mb "$BULK_MB" \
    > "$tmp/mem.out" 2>&1 & pids+=($!); UP_PID=$!
  for _ in $(seq 600); do grep -q '^listening on' "$tmp/mem.out" 2>/dev/null && break; sleep 0.1; done
  UP_PORT=$(sed -n 's/^listening on 127.0.0.1://p' "$tmp/mem.out")
  UP_TLS_PORT=""
  [ -n "$UP_PORT" ] || { log "popgate-load serve did not start"; cat "$tmp/mem.out" >&2; exit 1; }
}
start_dovecot() {
  local d=$tmp/dovecot
  mkdir -p "$d/run" "$d/mail/Maildir/"{cur,new,tmp}
  python3 - "$d/mail/Maildir/cur" "$BULK_MB" <<'PY'
import sys
cur, mb = sys.argv[1], int(sys.argv[2])
with open(cur + "/1.M1P1.bench:2,S", "wb") as f:
    f.write(b"From: carol@example.org\nSubject: small\n\nHi,\nthis is a small message.\n")
with open(cur + "/2.M2P1.bench:2,S", "wb") as f:
    f.write(b"From: bench@example.org\nSubject: bench\n\n")
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ........\n"
    for i in range(mb * 1024 * 1024 // len(line)):
        f.write(b"." + line if i % 50 == 0 else line)
PY
  chown -R 65534:65534 "$d/mail"
  UP_PORT=$(port); UP_TLS_PORT=$(port)
  # One maildir for every user (home without %u); limits raised so that idle and concurrent
  # logins are not refused by Dovecot's defaults (100 processes, 10 connections per user+IP).
  cat > "$d/dovecot.conf" <<CONF
protocols = pop3
listen = 127.0.0.1
base_dir = $d/run
state_dir = $d/run
log_path = $d/dovecot.log
ssl = yes
ssl_cert = <$CERT
ssl_key = <$KEY
disable_plaintext_auth = no
auth_mechanisms = plain login
passdb {
  driver = static
  args = password=pass
}
userdb {
  driver = static
  args = uid=65534 gid=65534 home=$d/mail
}
first_valid_uid = 1000
last_valid_uid = 0
mail_location = maildir:~/Maildir
default_process_limit = 3000
default_client_limit = 20000
mail_max_userip_connections = 10000
service pop3-login {
  inet_listener pop3 {
    address = 127.0.0.1
    port = $UP_PORT
  }
  inet_listener pop3s {
    address = 127.0.0.1
    port = $UP_TLS_PORT
    ssl = yes
  }
}
CONF
  dovecot -F -c "$d/dovecot.conf" & pids+=($!); UP_PID=$!
  wait_port "$UP_PORT" dovecot
}

# ---- proxies in front of UP_PORT; each adds "peer mode port pid" lines to TARGETS --------------
TARGETS=()
start_popgate() {
  local p=$(port) s=$(port) t=$(port)
  cat > "$tmp/popgate.toml" <<CONF
[[listener]]
name = "plain"
bind = "127.0.0.1:$p"
[[listener]]
name = "stls"
bind = "127.0.0.1:$s"
tls = "starttls"
[[listener]]
name = "tls"
bind = "127.0.0.1:$t"
tls = "implicit"
[upstream]
address = "127.0.0.1:$UP_PORT"
[tls]
cert = "$CERT"
key = "$KEY"
[limits]
max_sessions = 20000
max_sessions_per_ip = 0
[log]
level = "warn"
CONF
  "$POPGATE" run --config "$tmp/popgate.toml" 2> "$tmp/popgate.log" & pids+=($!)
  wait_port "$t" popgate
  TARGETS+=("popgate none $p $!" "popgate stls $s $!" "popgate implicit $t $!")
}
start_nginx() {
  local h=$(port) p=$(port) t=$(port) n=$tmp/nginx
  mkdir -p "$n"
  cat > "$n/nginx.conf" <<CONF
load_module /usr/lib/nginx/modules/ngx_mail_module.so;
pid $n/nginx.pid;
error_log $n/error.log warn;
worker_processes auto;
worker_rlimit_nofile 40000;
events { worker_connections 20000; }
http {
  access_log off;
  client_body_temp_path $n/body; proxy_temp_path $n/proxy; fastcgi_temp_path $n/fastcgi;
  uwsgi_temp_path $n/uwsgi; scgi_temp_path $n/scgi;
  server { listen 127.0.0.1:$h;
    location = /auth { add_header Auth-Status OK; add_header Auth-Server 127.0.0.1;
                       add_header Auth-Port $UP_PORT; return 204; } } }
mail { auth_http 127.0.0.1:$h/auth; pop3_auth plain; proxy_pass_error_message on;
  server { listen 127.0.0.1:$p; protocol pop3; starttls on;
           ssl_certificate $CERT; ssl_certificate_key $KEY; }
  server { listen 127.0.0.1:$t ssl; protocol pop3;
           ssl_certificate $CERT; ssl_certificate_key $KEY; } }
CONF
  nginx -e "$n/error.log" -c "$n/nginx.conf" -g 'daemon off;' & pids+=($!)
  wait_port "$t" nginx
  TARGETS+=("nginx none $p $!" "nginx stls $p $!" "nginx implicit $t $!")
}
start_haproxy() {
  local p=$(port) t=$(port)
  cat > "$tmp/haproxy.cfg" <<CONF
global
  maxconn 9000
defaults
  mode tcp
  timeout connect 5s
  timeout client 10m
  timeout server 10m
frontend p
  bind 127.0.0.1:$p
  bind 127.0.0.1:$t ssl crt $tmp/combined.pem
  default_backend d
backend d
  server d1 127.0.0.1:$UP_PORT
CONF
  haproxy -db -f "$tmp/haproxy.cfg" > "$tmp/haproxy.log" 2>&1 & pids+=($!)
  wait_port "$t" haproxy
  TARGETS+=("haproxy none $p $!" "haproxy implicit $t $!")
}
start_stunnel() {
  local t=$(port) bin
  bin=$(command -v stunnel4 || command -v stunnel)
  cat > "$tmp/stunnel.conf" <<CONF
foreground = yes
pid =
[pop3s]
accept = 127.0.0.1:$t
connect = 127.0.0.1:$UP_PORT
cert = $CERT
key = $KEY
CONF
  "$bin" "$tmp/stunnel.conf" > "$tmp/stunnel.log" 2>&1 & pids+=($!)
  wait_port "$t" stunnel
  TARGETS+=("stunnel implicit $t $!")
}
start_perdition() {
  local p=$(port) t=$(port) bin=$PERD_DIR/usr/sbin/perdition.pop3
  local lib=$PERD_DIR/usr/lib/x86_64-linux-gnu:$PERD_DIR/usr/lib
  LD_LIBRARY_PATH=$lib "$bin" -f '' -M '' --no_daemon --pid_file '' -b 127.0.0.1 -l "$p" \
    -s 127.0.0.1 -p "$UP_PORT" > "$tmp/perdition.log" 2>&1 & pids+=($!)
  TARGETS+=("perdition none $p $!")
  LD_LIBRARY_PATH=$lib "$bin" -f '' -M '' --no_daemon --pid_file '' -b 127.0.0.1 -l "$t" \
    -s 127.0.0.1 -p "$UP_PORT" --ssl_mode ssl_listen --ssl_cert_file "$CERT" \
    --ssl_key_file "$KEY" >> "$tmp/perdition.log" 2>&1 & pids+=($!)
  TARGETS+=("perdition implicit $t $!")
  wait_port "$p" perdition && wait_port "$t" perdition
}

# ---- runs ---------------------------------------------------------------------------------------
# load UPSTREAM SCENARIO VARIANT PEER MODE PORT PID [popgate-load args]: one report as JSON.
load() {
  local up=$1 sc=$2 var=$3 peer=$4 mode=$5 p=$6 pid=$7; shift 7
  local f="$OUT/$up.$sc.$var.$peer.json"
  if ! "$LOAD" run "$sc" --addr "127.0.0.1:$p" --tls "$mode" --ca "$CA" --pid "$pid" \
       --sources "$SOURCES" --op-timeout 20 --label "$peer" "$@" > "$f" 2> "$f.err"; then
    log "$up $sc $var $peer: popgate-load failed: $(head -c 300 "$f.err")"
    return 0
  fi
  local errs
  errs=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["errors"]["total"], r["errors"]["first"] or "")' "$f" 2>&1) || errs="no report: $errs"
  log "$up $sc $var $peer: errors ${errs}"
  [ -s "$f.err" ] || rm -f "$f.err"
}
SCENARIOS=${SCENARIOS:-cycle bulk noop idle handshake}
wants() { [[ " $SCENARIOS " == *" $1 "* ]]; }
run_target() { # UPSTREAM PEER MODE PORT PID
  local up=$1 peer=$2 mode=$3 p=$4 pid=$5
  case $mode in
    none|implicit)
      local var=plain; [ "$mode" = implicit ] && var=tls
      if wants cycle; then load "$up" cycle "$var" "$peer" "$mode" "$p" "$pid" -c "$CONC" -d "$DURATION"; fi
      if wants bulk; then load "$up" bulk "$var" "$peer" "$mode" "$p" "$pid" --users 2 -n "$BULK_N"; fi
      if wants noop; then load "$up" noop "$var" "$peer" "$mode" "$p" "$pid" -n "$NOOP_N"; fi
      if [ "$up" = mem ] && wants idle; then  # Dovecot would fork a process per held session
        local n=$IDLE_N; [ "$mode" = implicit ] && n=$IDLE_TLS_N
        # One user per held session: the server locks a maildrop per session.
        load "$up" idle "$var" "$peer" "$mode" "$p" "$pid" --sessions "$n" --users "$n" -c 32 \
          --hold 1 --settle "$IDLE_SETTLE"
      fi
      if [ "$mode" = implicit ] && wants handshake; then
        load "$up" handshake tls-full "$peer" "$mode" "$p" "$pid" -c 2 -n "$HS_N" --no-resume
        load "$up" handshake tls-resumed "$peer" "$mode" "$p" "$pid" -c 2 -n "$HS_N"
      fi ;;
    stls)
      if wants handshake; then
        load "$up" handshake stls-full "$peer" "$mode" "$p" "$pid" -c 2 -n "$HS_N" --no-resume
      fi ;;
  esac
}

for up in $UPSTREAMS; do
  log "upstream $up"
  TARGETS=()
  "start_$up"
  if [ "$up" = mem ]; then
    TARGETS+=("direct none $UP_PORT $UP_PID")
  else
    TARGETS+=("direct none $UP_PORT $UP_PID" "direct implicit $UP_TLS_PORT $UP_PID"
              "direct stls $UP_PORT $UP_PID")
  fi
  for peer in "${active[@]}"; do "start_$peer"; done
  for t in "${TARGETS[@]}"; do
    # shellcheck disable=SC2086 # "peer mode port pid"
    run_target "$up" $t
  done
  stop_all
done

python3 "$ROOT/benches/compare_table.py" "$OUT" "$SCALE"
