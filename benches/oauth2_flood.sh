#!/usr/bin/env bash
# issue 18, item 1: the real user's login latency (p50/p99) while 400 wrong OAuth2-bridge logins
# at a time from 20 loopback addresses keep coming, with popgate's peak RSS and threads.
# Needs Dovecot and python3-authlib (as the tests/it/oauth2.rs Dovecot tests). Prints a Markdown
# table for benches/RESULTS.md.
#   bash benches/oauth2_flood.sh                 # release build, 40 real logins each phase
#   PROFILE=debug FLOOD_REAL_LOGINS=20 bash benches/oauth2_flood.sh
set -euo pipefail
cd "$(dirname "$0")/.."
profile=()
[[ "${PROFILE:-release}" == release ]] && profile=(--release)
POPGATE_FLOOD_BENCH=1 FLOOD_REAL_LOGINS="${FLOOD_REAL_LOGINS:-40}" cargo test "${profile[@]}" --test it -- \
  --ignored --exact oauth2::bench_real_login_under_a_flood_of_wrong_passwords --nocapture --test-threads 1
