#!/usr/bin/env python3
"""Drive a POP3 session with Python's poplib (standard library only) for popgate's tests.

Input: one JSON object, as argv[1] or on stdin:
  host, port            where to connect (IPv6 literal without brackets is fine)
  user, pass            credentials for the automatic login
  mode                  "plain" (default) | "stls" (STLS before login) | "ssl" (implicit TLS)
  cafile                CA to trust for TLS; without it the system store is used
  insecure              true: no certificate or name check
  server_hostname       name to check the certificate against (default: host)
  login                 "user" (USER/PASS, default) | "apop" | "none" (use actions instead)
  timeout               socket timeout in seconds (default 30)
  maxline               poplib's line length cap (default poplib's 2048)
  actions               list, each one of:
    ["stat"] ["list"] ["list", n] ["uidl"] ["uidl", n] ["retr", n] ["top", n, lines]
    ["dele", n] ["rset"] ["noop"] ["capa"] ["user", name] ["pass", pw]
    ["stls"] (poplib sends CAPA first and gives up unless STLS is listed)
    ["apop", name, pw] ["raw", "LINE"] (single-line answer) ["rawlong", "LINE"] (multi-line)
    ["sleep", seconds]  wait, the session open (for tests that look at it meanwhile)
    ["quit"]   send QUIT and close
    ["abort"]  close the socket without QUIT
  If the actions end without "quit" or "abort", QUIT is sent (recorded as "implicit_quit").

Output: one JSON object on stdout:
  welcome        greeting line
  tls            "stls" / "ssl" when TLS was set up, else null
  login          result of the automatic login (or null)
  results        one per action, in order
  implicit_quit  result of the final QUIT, or null
A result is {"ok": true, "resp": "+OK ..."} plus, for multi-line answers,
  "lines_b64": each line as poplib gives it (CRLF removed, dot-unstuffed), base64
  "data_b64":  the lines joined with CRLF plus a final CRLF (the message as sent, unstuffed)
  "octets":    poplib's octet count
and for stat {"count", "size"}, for capa {"capa": {name: [args]}}; or on failure
{"ok": false, "error": "...", "kind": "error_proto" | "OSError" | ...}.
Text (resp, error) is decoded as latin-1, so every byte maps to one character.
After an OSError (connection lost, timeout) the remaining actions are not tried.
"""

import base64
import json
import poplib
import socket
import ssl
import sys
import time


def b64(data):
    return base64.b64encode(data).decode("ascii")


def text(data):
    if isinstance(data, bytes):
        return data.decode("latin-1")
    return str(data)


def long_result(resp, lines, octets):
    data = b"".join(line + b"\r\n" for line in lines)
    return {
        "ok": True,
        "resp": text(resp),
        "lines_b64": [b64(line) for line in lines],
        "data_b64": b64(data),
        "octets": octets,
    }


def tls_context(spec):
    ctx = ssl.create_default_context(cafile=spec.get("cafile"))
    if spec.get("insecure"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class NamedPOP3_SSL(poplib.POP3_SSL):
    """POP3_SSL that checks the certificate against server_hostname rather than the host."""

    def __init__(self, host, port, server_hostname, **kw):
        self._server_hostname = server_hostname
        super().__init__(host, port, **kw)

    def _create_socket(self, timeout):
        sock = poplib.POP3._create_socket(self, timeout)
        return self.context.wrap_socket(sock, server_hostname=self._server_hostname)


def stls(pop, spec):
    """poplib's stls(): sends CAPA, refuses unless STLS is listed, then STLS and the handshake,
    checking the name pop.host."""
    host = pop.host
    pop.host = spec.get("server_hostname", host)
    try:
        return pop.stls(context=tls_context(spec))
    finally:
        pop.host = host


def abort(pop):
    """Close the connection without QUIT (makefile() keeps the fd open until it is closed too)."""
    try:
        pop.file.close()
    finally:
        pop.sock.close()


def run_action(pop, action, spec):
    name = action[0].lower()
    args = action[1:]
    if name == "sleep":
        time.sleep(float(args[0]))
        return {"ok": True}
    if name == "stat":
        count, size = pop.stat()
        return {"ok": True, "count": count, "size": size}
    if name in ("list", "uidl"):
        fn = pop.list if name == "list" else pop.uidl
        if args:
            return {"ok": True, "resp": text(fn(args[0]))}
        return long_result(*fn())
    if name == "retr":
        return long_result(*pop.retr(args[0]))
    if name == "top":
        return long_result(*pop.top(args[0], args[1]))
    if name == "dele":
        return {"ok": True, "resp": text(pop.dele(args[0]))}
    if name == "rset":
        return {"ok": True, "resp": text(pop.rset())}
    if name == "noop":
        return {"ok": True, "resp": text(pop.noop())}
    if name == "capa":
        caps = pop.capa()
        return {"ok": True, "capa": caps}
    if name == "stls":
        return {"ok": True, "resp": text(stls(pop, spec))}
    if name == "user":
        return {"ok": True, "resp": text(pop.user(args[0]))}
    if name == "pass":
        return {"ok": True, "resp": text(pop.pass_(args[0]))}
    if name == "apop":
        return {"ok": True, "resp": text(pop.apop(args[0], args[1]))}
    if name == "raw":
        return {"ok": True, "resp": text(pop._shortcmd(args[0]))}
    if name == "rawlong":
        return long_result(*pop._longcmd(args[0]))
    raise ValueError("unknown action %r" % (action,))


def main():
    raw = sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read()
    spec = json.loads(raw)
    if "maxline" in spec:
        poplib._MAXLINE = int(spec["maxline"])
    host = spec.get("host", "127.0.0.1")
    port = int(spec["port"])
    timeout = float(spec.get("timeout", 30))
    mode = spec.get("mode", "plain")
    out = {"welcome": None, "tls": None, "login": None, "results": [], "implicit_quit": None}

    try:
        if mode == "ssl":
            ctx = tls_context(spec)
            name = spec.get("server_hostname", host)
            pop = NamedPOP3_SSL(host, port, name, timeout=timeout, context=ctx)
            out["tls"] = "ssl"
        else:
            pop = poplib.POP3(host, port, timeout=timeout)
        out["welcome"] = text(pop.getwelcome())
        if mode == "stls":
            stls(pop, spec)
            out["tls"] = "stls"
    except Exception as e:  # noqa: BLE001 - report any failure as data
        out["connect_error"] = {"error": text(str(e)), "kind": type(e).__name__}
        print(json.dumps(out))
        return

    login = spec.get("login", "user")
    try:
        if login == "user":
            pop.user(spec["user"])
            out["login"] = {"ok": True, "resp": text(pop.pass_(spec["pass"]))}
        elif login == "apop":
            out["login"] = {"ok": True, "resp": text(pop.apop(spec["user"], spec["pass"]))}
    except OSError as e:
        out["login"] = {"ok": False, "error": text(str(e)), "kind": type(e).__name__}
    except poplib.error_proto as e:
        msg = e.args[0] if e.args else b""
        out["login"] = {"ok": False, "error": text(msg), "kind": "error_proto"}

    closed = False
    for action in spec.get("actions", []):
        name = action[0].lower()
        if name == "abort":
            abort(pop)
            out["results"].append({"ok": True})
            closed = True
            break
        if name == "quit":
            try:
                out["results"].append({"ok": True, "resp": text(pop.quit())})
            except (OSError, poplib.error_proto) as e:
                out["results"].append({"ok": False, "error": text(str(e)), "kind": type(e).__name__})
            closed = True
            break
        try:
            out["results"].append(run_action(pop, action, spec))
        except poplib.error_proto as e:
            msg = e.args[0] if e.args else b""
            out["results"].append({"ok": False, "error": text(msg), "kind": "error_proto"})
        except OSError as e:
            out["results"].append({"ok": False, "error": text(str(e)), "kind": type(e).__name__})
            closed = True
            abort(pop)
            break
    if not closed:
        try:
            out["implicit_quit"] = {"ok": True, "resp": text(pop.quit())}
        except (OSError, poplib.error_proto) as e:
            out["implicit_quit"] = {"ok": False, "error": text(str(e)), "kind": type(e).__name__}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
