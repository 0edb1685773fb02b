#!/usr/bin/env python3
"""Markdown table of a benches/compare.sh run: reads the popgate-load JSON reports in DIR
(named UPSTREAM.SCENARIO.VARIANT.PEER.json) and prints one table, proxy cost per unit of work
first. Usage: compare_table.py DIR [SCALE]"""

import glob
import json
import os
import sys

PEERS = ["nginx", "haproxy", "stunnel", "perdition"]
COLUMNS = ["direct", "popgate"] + PEERS


def load(d):
    out = {}
    for f in glob.glob(os.path.join(d, "*.json")):
        up, sc, var, peer = os.path.basename(f)[: -len(".json")].split(".", 3)
        try:
            with open(f) as fh:
                out[(up, sc, var, peer)] = json.load(fh)
        except (OSError, ValueError):
            pass
    return out


def get(r, *path):
    for k in path:
        if not isinstance(r, dict):
            return None
        r = r.get(k)
    return r


def per_unit(key):
    return lambda r: get(r, "proc", "per_unit", key)


def throughput(key):
    return lambda r: get(r, "throughput", key)


def latency(key):
    return lambda r: get(r, "latency_us", key)


def resumed_share(r):
    n = get(r, "counts", "sessions")
    return get(r, "counts", "resumed") / n if n else None


# (figure, scenario, variant, value, lower is better, format)
FIGURES = [
    ("bulk plain: proxy CPU s/GB", "bulk", "plain", per_unit("cpu_s_per_gb"), True, "{:.2f}"),
    ("bulk TLS: proxy CPU s/GB", "bulk", "tls", per_unit("cpu_s_per_gb"), True, "{:.2f}"),
    ("cycle plain: CPU ms/1000 sessions", "cycle", "plain", per_unit("cpu_ms_per_1000_sessions"), True, "{:.0f}"),
    ("cycle TLS: CPU ms/1000 sessions", "cycle", "tls", per_unit("cpu_ms_per_1000_sessions"), True, "{:.0f}"),
    ("TLS handshake, full: CPU ms/1000", "handshake", "tls-full", per_unit("cpu_ms_per_1000_sessions"), True, "{:.0f}"),
    ("TLS handshake, resumption offered: CPU ms/1000", "handshake", "tls-resumed", per_unit("cpu_ms_per_1000_sessions"), True, "{:.0f}"),
    ("STLS handshake, full: CPU ms/1000", "handshake", "stls-full", per_unit("cpu_ms_per_1000_sessions"), True, "{:.0f}"),
    ("idle plain: RSS KiB/session", "idle", "plain", lambda r: get(r, "idle", "rss_kib_per_session"), True, "{:.1f}"),
    ("idle TLS: RSS KiB/session", "idle", "tls", lambda r: get(r, "idle", "rss_kib_per_session"), True, "{:.1f}"),
    ("idle plain: share of RSS growth returned after close", "idle", "plain", lambda r: get(r, "idle", "growth_returned"), False, "{:.2f}"),
    ("bulk plain: MB/s", "bulk", "plain", throughput("mb_per_s"), False, "{:.0f}"),
    ("bulk TLS: MB/s", "bulk", "tls", throughput("mb_per_s"), False, "{:.0f}"),
    ("cycle plain: sessions/s", "cycle", "plain", throughput("units_per_s"), False, "{:.0f}"),
    ("cycle TLS: sessions/s", "cycle", "tls", throughput("units_per_s"), False, "{:.0f}"),
    ("cycle plain: p99 ms", "cycle", "plain", lambda r: (latency("p99")(r) or 0) / 1000 or None, True, "{:.1f}"),
    ("noop plain: p50 µs", "noop", "plain", latency("p50"), True, "{:.0f}"),
    ("noop plain: p99 µs", "noop", "plain", latency("p99"), True, "{:.0f}"),
    ("noop TLS: p50 µs", "noop", "tls", latency("p50"), True, "{:.0f}"),
    ("TLS handshakes/s, full", "handshake", "tls-full", throughput("units_per_s"), False, "{:.0f}"),
    ("TLS handshakes/s, resumption offered", "handshake", "tls-resumed", throughput("units_per_s"), False, "{:.0f}"),
    ("TLS handshakes resumed (share)", "handshake", "tls-resumed", resumed_share, False, "{:.2f}"),
]


def main():
    d = sys.argv[1]
    scale = sys.argv[2] if len(sys.argv) > 2 else "?"
    reports = load(d)
    ups = [u for u in ("mem", "dovecot") if any(k[0] == u for k in reports)]
    print(f"### popgate side by side ({scale} run)\n")
    print("Upstream `mem`: popgate-load serve (in memory); `dovecot`: Dovecot 2.3. "
          "CPU and RSS are the proxy's process tree (for `direct`: the server's own). "
          "`n err` marks a cell whose run had errors.\n")
    print("| figure | upstream | " + " | ".join(COLUMNS) + " | popgate/direct | popgate/best peer |")
    print("|---" * (len(COLUMNS) + 4) + "|")
    notes = []
    for name, sc, var, value, low, fmt in FIGURES:
        for up in ups:
            cells, vals = [], {}
            for col in COLUMNS:
                r = reports.get((up, sc, var, col))
                v = value(r) if r else None
                errs = get(r, "errors", "total") or 0
                if v is None:
                    cells.append("–")
                    continue
                vals[col] = v
                cells.append(fmt.format(v) + (f" ({errs} err)" if errs else ""))
                if errs:
                    notes.append(f"{up} {sc} {var} {col}: {get(r, 'errors', 'first')}")
            if not vals:
                continue
            pg = vals.get("popgate")
            direct = vals.get("direct")
            peers = [vals[p] for p in PEERS if p in vals]
            best = (min(peers) if low else max(peers)) if peers else None
            ratio = lambda a, b: f"{a / b:.2f}" if a is not None and b else "–"
            print(f"| {name} | {up} | " + " | ".join(cells)
                  + f" | {ratio(pg, direct)} | {ratio(pg, best)} |")
    if notes:
        print("\nErrors (first of each run):")
        for n in sorted(set(notes)):
            print(f"- {n}")


if __name__ == "__main__":
    main()
