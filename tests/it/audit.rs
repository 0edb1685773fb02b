//! The audit trail end to end: real clients (poplib, curl, fetchmail) through popgate in front
//! of the demo upstream and of Dovecot, checked event by event and field by field; header
//! extraction on awkward messages; memory with auditing on; a full queue; transcripts started by
//! a `trace` rule; and `popgate audit` on files written by a real run.
//!
//! Events are compared as JSON after [`norm`] has checked and removed what varies between runs
//! (`ts`, `session`, `duration_ms`, the client port, byte counts). Every proxy is shut down (or
//! the session's `session_close` awaited) before the files are read, so nothing is in flight.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

use common::certs::{TestPki, rustls_server};
use common::clients::{self, RawPop, b64, b64_lines, brief, poplib, poplib_spec};
use common::dovecot::{Dovecot, DovecotOpts, dot_stuffed, lf_only, served};
use common::proxy::{
    Harness, PopgateOpts, PopgateProcess, ProxyHandle, big_message, mailbox, popgate_bin, rule_file,
};
use popgate_demo::{DemoServer, Faults, ServerOptions};
use serde_json::{Value, json};

const USER: &str = "alice";
const PASS: &str = "audit-pass-42";

// ---------------------------------------------------------------------------------------------
// Messages and their wire forms

/// A message with the five default audit headers, a header that is not audited, dot lines in
/// the body and a body line that looks like a header. Wire form (CRLF), not dot-stuffed.
fn message(n: usize) -> Vec<u8> {
    format!(
        "Return-Path: <s{n}@example.org>\r\n\
         Message-ID: <{n}.audit@example.org>\r\n\
         From: Sender {n} <s{n}@example.org>\r\n\
         To: Alice <alice@example.com>\r\n\
         Subject: Audit test {n}\r\n\
         Date: Mon, 2 Mar 2026 10:0{n}:00 +0000\r\n\
         X-Mailer: not audited\r\n\
         \r\n\
         Hello {n}.\r\n\
         .a line starting with a dot\r\n\
         .\r\n\
         Subject: not a header\r\n"
    )
    .into_bytes()
}

/// The `headers` of a `retrieve` event for [`message`]`(n)`.
fn headers_of(n: usize) -> Value {
    json!({
        "Message-ID": format!("<{n}.audit@example.org>"),
        "From": format!("Sender {n} <s{n}@example.org>"),
        "To": "Alice <alice@example.com>",
        "Subject": format!("Audit test {n}"),
        "Date": format!("Mon, 2 Mar 2026 10:0{n}:00 +0000"),
    })
}

fn messages() -> Vec<Vec<u8>> {
    (1..=3).map(message).collect()
}

/// What follows the `+OK` line of a RETR of `msg` on the wire: dot-stuffed, a CRLF added when
/// the last line lacks one, then `.\r\n`. Its length is what `octets` must say.
fn wire_body(msg: &[u8]) -> Vec<u8> {
    let mut out = dot_stuffed(msg);
    if !out.is_empty() && !out.ends_with(b"\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// `TOP n 0` of a CRLF message: the header block with its blank line (all of it without one).
fn top0(msg: &[u8]) -> &[u8] {
    match msg.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => &msg[..i + 4],
        None => msg,
    }
}

fn demo(h: &Harness, messages: Vec<Vec<u8>>) -> DemoServer {
    h.upstream(ServerOptions {
        apop: true,
        ..ServerOptions::new(vec![mailbox(USER, PASS, messages)])
    })
}

// ---------------------------------------------------------------------------------------------
// Audit files

/// A temp directory for `audit.*.jsonl` files.
struct AuditDir {
    dir: tempfile::TempDir,
}

impl AuditDir {
    fn new() -> AuditDir {
        AuditDir {
            dir: tempfile::Builder::new().prefix("audit").tempdir().unwrap(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The `[audit]` table writing to this directory, plus `extra` keys.
    fn toml(&self, extra: &str) -> String {
        format!(
            "[audit]\nenabled = true\ndir = {:?}\n{extra}\n",
            self.dir.path()
        )
    }

    fn files(&self) -> Vec<PathBuf> {
        audit_files(self.path())
    }

    fn events(&self) -> Vec<Value> {
        events_in(self.path())
    }

    /// Wait (bounded) until `n` sessions have closed; returns all events.
    fn wait_closed(&self, n: usize) -> Vec<Value> {
        wait_closed_in(self.path(), n)
    }
}

/// The UIDLs an upstream gives its messages, asked directly (not through popgate).
fn upstream_uidls(addr: SocketAddr) -> Vec<String> {
    let mut spec = poplib_spec(addr, USER, PASS);
    spec["actions"] = json!([["uidl"], ["quit"]]);
    parse_uidl_listing(&b64_lines(&poplib(spec)["results"][0]))
}

/// The audit files of `dir` in name (= time) order.
fn audit_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.retain(|f| {
        let name = f.file_name().unwrap().to_string_lossy();
        name.starts_with("audit.") && name.ends_with(".jsonl")
    });
    files.sort();
    files
}

/// Every complete line of the audit files of `dir`, parsed (a line that is not JSON fails).
fn events_in(dir: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    for f in audit_files(dir) {
        let text = std::fs::read_to_string(&f).unwrap();
        for line in text.split_inclusive('\n') {
            // A line without its newline is still being written.
            let Some(line) = line.strip_suffix('\n') else {
                continue;
            };
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", f.display()));
            out.push(v);
        }
    }
    out
}

fn wait_closed_in(dir: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let evs = events_in(dir);
        if count(&evs, "session_close") >= n {
            return evs;
        }
        assert!(
            Instant::now() < deadline,
            "{n} session_close events not written in time; have:\n{}",
            lines(&evs)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn count(evs: &[Value], name: &str) -> usize {
    evs.iter().filter(|e| e["event"] == name).count()
}

fn names(evs: &[Value]) -> Vec<String> {
    evs.iter()
        .map(|e| e["event"].as_str().unwrap_or("?").to_owned())
        .collect()
}

fn lines(evs: &[Value]) -> String {
    evs.iter().map(|e| format!("{e}\n")).collect()
}

/// Events grouped by session id, sessions in order of their first event.
fn sessions(evs: &[Value]) -> Vec<Vec<Value>> {
    let mut order: Vec<u64> = Vec::new();
    let mut by: HashMap<u64, Vec<Value>> = HashMap::new();
    for e in evs {
        let id = e["session"]
            .as_u64()
            .unwrap_or_else(|| panic!("no session id: {e}"));
        if !by.contains_key(&id) {
            order.push(id);
        }
        by.entry(id).or_default().push(e.clone());
    }
    order
        .into_iter()
        .map(|id| by.remove(&id).unwrap())
        .collect()
}

/// The fields every event has: `schema` 1, `ts` RFC 3339 UTC with milliseconds near now,
/// a numeric `session`, a known `event` name, and `tags` only when there are some.
fn check_envelope(ev: &Value) {
    assert_eq!(ev["schema"], json!(1), "{ev}");
    let ts = ev["ts"].as_str().unwrap_or_else(|| panic!("no ts: {ev}"));
    assert!(
        ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[19] == b'.',
        "ts is not RFC 3339 UTC with milliseconds: {ts}"
    );
    let t = humantime::parse_rfc3339(ts).unwrap_or_else(|e| panic!("bad ts {ts}: {e}"));
    let now = SystemTime::now();
    let age = now
        .duration_since(t)
        .unwrap_or_else(|e| panic!("ts {ts} is in the future by {:?}", e.duration()));
    assert!(age < Duration::from_secs(600), "ts {ts} is too old");
    assert!(ev["session"].as_u64().is_some_and(|s| s > 0), "{ev}");
    assert!(
        ev["instance"].as_str().is_some_and(|i| !i.is_empty()),
        "every event names its instance: {ev}"
    );
    let known = [
        "session_open",
        "tls",
        "login",
        "denied",
        "retrieve",
        "delete_marked",
        "reset",
        "update",
        "session_close",
    ];
    assert!(
        known.contains(&ev["event"].as_str().unwrap_or("")),
        "unknown event: {ev}"
    );
    if let Some(tags) = ev.get("tags") {
        assert!(
            tags.as_array().is_some_and(|t| !t.is_empty()),
            "tags must be omitted when empty: {ev}"
        );
    }
}

/// `ev` without what varies between runs, after checking it: the envelope goes, `client`
/// (a loopback address) becomes `"*"`, byte counts (numbers) become `"*"`, `duration_ms`
/// (a number) goes.
fn norm(ev: &Value) -> Value {
    check_envelope(ev);
    let mut m = ev.as_object().unwrap().clone();
    for k in ["schema", "ts", "session", "instance"] {
        m.remove(k);
    }
    if let Some(d) = m.remove("duration_ms") {
        assert!(d.as_u64().is_some(), "duration_ms: {ev}");
    }
    if let Some(c) = m.get_mut("client") {
        let a: SocketAddr = c.as_str().unwrap().parse().unwrap();
        assert!(a.ip().is_loopback(), "{ev}");
        *c = json!("*");
    }
    for k in ["bytes_from_client", "bytes_to_client"] {
        if let Some(v) = m.get_mut(k) {
            assert!(v.as_u64().is_some(), "{k}: {ev}");
            *v = json!("*");
        }
    }
    Value::Object(m)
}

fn norm_all(evs: &[Value]) -> Vec<Value> {
    evs.iter().map(norm).collect()
}

/// Assert two event lists are equal, printing both in full when not.
fn assert_events(got: &[Value], want: &[Value], what: &str) {
    assert!(
        got == want,
        "{what}: events differ\n--- got ---\n{}--- want ---\n{}",
        lines(got),
        lines(want)
    );
}

/// The events of the one session in `evs` (panics if there are more).
fn only_session(evs: &[Value]) -> Vec<Value> {
    let s = sessions(evs);
    assert_eq!(s.len(), 1, "expected one session:\n{}", lines(evs));
    s.into_iter().next().unwrap()
}

fn session_open(local: SocketAddr, listener: &str) -> Value {
    json!({"event": "session_open", "listener": listener, "client": "*", "local": local.to_string()})
}

fn session_close(user: Option<&str>, reason: &str) -> Value {
    let mut v = json!({"event": "session_close", "reason": reason,
        "bytes_from_client": "*", "bytes_to_client": "*"});
    if let Some(u) = user {
        v["user"] = json!(u);
    }
    v
}

fn login(method: &str) -> Value {
    json!({"event": "login", "user": USER, "method": method, "outcome": "success"})
}

/// The events of the standard dialogue: login, UIDL, RETR 1, TOP 2 0, DELE 1, QUIT.
fn standard_events(
    local: SocketAddr,
    method: &str,
    msgs: &[Vec<u8>],
    uidls: &[String],
) -> Vec<Value> {
    vec![
        session_open(local, "test"),
        login(method),
        json!({"event": "retrieve", "user": USER, "verb": "RETR", "msg": 1,
            "octets": wire_body(&msgs[0]).len(), "uidl": uidls[0], "complete": true,
            "headers": headers_of(1)}),
        json!({"event": "retrieve", "user": USER, "verb": "TOP", "msg": 2, "lines": 0,
            "octets": wire_body(top0(&msgs[1])).len(), "uidl": uidls[1], "complete": true,
            "headers": headers_of(2)}),
        // Retrieved in the session: its Message-ID goes with the deletion.
        json!({"event": "delete_marked", "user": USER, "msg": 1, "uidl": uidls[0],
            "message_id": headers_of(1)["Message-ID"]}),
        json!({"event": "update", "user": USER, "deleted": [{"msg": 1, "uidl": uidls[0],
            "message_id": headers_of(1)["Message-ID"]}], "outcome": "confirmed"}),
        session_close(Some(USER), "quit"),
    ]
}

/// UIDs from a UIDL listing (`"1 uid"` lines) in message order.
fn parse_uidl_listing(lines: &[Vec<u8>]) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            let l = String::from_utf8(l.clone()).unwrap();
            l.trim_end()
                .split_once(' ')
                .unwrap_or_else(|| panic!("bad UIDL line {l:?}"))
                .1
                .to_owned()
        })
        .collect()
}

fn session_close_of(evs: &[Value]) -> &Value {
    evs.iter()
        .find(|e| e["event"] == "session_close")
        .unwrap_or_else(|| panic!("no session_close:\n{}", lines(evs)))
}

// ---------------------------------------------------------------------------------------------
// Proxies

/// A client at `addr` logged in as [`USER`] with USER/PASS.
fn logged_in(addr: SocketAddr) -> RawPop {
    let mut c = RawPop::connect(addr);
    assert!(c.cmd(&format!("USER {USER}")).starts_with("+OK"));
    assert!(c.cmd(&format!("PASS {PASS}")).starts_with("+OK"));
    c
}

/// popgate with `rules` (paths), one listener `test` (`listener_extra` in its table), in
/// front of `upstream` (`upstream_extra` in its table), then `rest` (more tables).
fn proxy_with(
    h: &Harness,
    rules: &[&str],
    listener_extra: &str,
    upstream: SocketAddr,
    upstream_extra: &str,
    rest: &str,
) -> ProxyHandle {
    h.proxy_with_rules(
        rules,
        listener_extra,
        upstream,
        &format!("connect_timeout = \"3s\"\n{upstream_extra}"),
        rest,
    )
}

// ---------------------------------------------------------------------------------------------
// curl: one session of several transfers

/// One curl invocation whose transfers share one connection (so one POP3 session): each step is
/// `(custom command or "", url path, single-line answer)`. Returns each transfer's output.
fn curl_session(
    addr: SocketAddr,
    login_opts: &[&str],
    steps: &[(&str, &str, bool)],
) -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let up = format!("{USER}:{PASS}");
    let mut args: Vec<String> = Vec::new();
    for (i, (cmd, path, single)) in steps.iter().enumerate() {
        if i > 0 {
            args.push("--next".into());
        }
        args.extend(["-u".into(), up.clone()]);
        args.extend(login_opts.iter().map(|s| s.to_string()));
        if !cmd.is_empty() {
            args.extend(["-X".into(), cmd.to_string()]);
        }
        if *single {
            args.push("-I".into());
        }
        args.extend([
            "-o".into(),
            dir.path().join(i.to_string()).display().to_string(),
        ]);
        args.push(clients::url("pop3", addr, path));
    }
    let out = clients::curl(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "curl failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (0..steps.len())
        .map(|i| std::fs::read(dir.path().join(i.to_string())).unwrap_or_default())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The standard dialogue with real clients against the demo upstream

/// poplib, USER/PASS: UIDL, RETR 1, TOP 2 0, DELE 1, QUIT gives exactly session_open, login,
/// retrieve (RETR, exact wire octets, the UIDL's uid, the five headers), retrieve (TOP),
/// delete_marked, update (message 1 confirmed deleted), session_close (quit).
#[test]
fn poplib_user_pass_dialogue_gives_exact_events() {
    let h = Harness::new();
    let msgs = messages();
    let up = demo(&h, msgs.clone());
    let audit = AuditDir::new();
    let mut p = h.proxy(up.local_addr(), &audit.toml(""));
    let mut spec = poplib_spec(p.addr, USER, PASS);
    spec["actions"] = json!([["uidl"], ["retr", 1], ["top", 2, 0], ["dele", 1], ["quit"]]);
    let r = poplib(spec);
    assert_eq!(r["results"][4]["ok"], json!(true), "{}", brief(&r));
    assert!(b64(&r["results"][1]["data_b64"]) == msgs[0]);
    let uidls = parse_uidl_listing(&b64_lines(&r["results"][0]));
    assert_eq!(uidls.len(), 3);
    p.shutdown(&h);

    let evs = audit.events();
    let s = only_session(&evs);
    assert_events(
        &norm_all(&s),
        &standard_events(p.addr, "USER", &msgs, &uidls),
        "poplib USER/PASS",
    );
    // Exact client-side byte counts: poplib sent exactly these commands.
    let sent =
        format!("USER {USER}\r\nPASS {PASS}\r\nUIDL\r\nRETR 1\r\nTOP 2 0\r\nDELE 1\r\nQUIT\r\n");
    let close = session_close_of(&s);
    assert_eq!(close["bytes_from_client"], json!(sent.len()), "{close}");
    let relayed = wire_body(&msgs[0]).len() + wire_body(top0(&msgs[1])).len();
    assert!(
        close["bytes_to_client"].as_u64().unwrap() > relayed as u64,
        "{close}"
    );
    // The headers are in configured order on the line itself.
    let raw = std::fs::read_to_string(&audit.files()[0]).unwrap();
    let retr = raw.lines().find(|l| l.contains("\"RETR\"")).unwrap();
    let pos: Vec<usize> = [
        "\"Message-ID\"",
        "\"From\"",
        "\"To\"",
        "\"Subject\"",
        "\"Date\"",
    ]
    .iter()
    .map(|k| {
        retr.find(k)
            .unwrap_or_else(|| panic!("{k} missing: {retr}"))
    })
    .collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "header order: {retr}");
    // The body line that looks like a header stays out, and so does the body itself.
    assert!(
        !raw.contains("not a header") && !raw.contains("Hello 1"),
        "{raw}"
    );
    assert_eq!(up.messages(USER).len(), 2, "message 1 was deleted");
}

/// curl, AUTH PLAIN (continuation, then initial response with --sasl-ir), transfers sharing
/// one connection: the same events with method `AUTH PLAIN`.
#[test]
fn curl_auth_plain_dialogue_gives_exact_events() {
    for ir in [false, true] {
        let h = Harness::new();
        let msgs = messages();
        let up = demo(&h, msgs.clone());
        let audit = AuditDir::new();
        let mut p = h.proxy(up.local_addr(), &audit.toml(""));
        let mut opts = vec!["--login-options", "AUTH=PLAIN"];
        if ir {
            opts.push("--sasl-ir");
        }
        let out = curl_session(
            p.addr,
            &opts,
            &[
                ("UIDL", "", false),
                ("", "1", false),
                ("TOP 2 0", "", false),
                ("DELE", "1", true),
            ],
        );
        assert!(out[1] == msgs[0], "curl RETR 1 differs");
        let listing: Vec<Vec<u8>> = out[0]
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| l.to_vec())
            .collect();
        let uidls = parse_uidl_listing(&listing);
        p.shutdown(&h);

        let evs = audit.events();
        assert_events(
            &norm_all(&only_session(&evs)),
            &standard_events(p.addr, "AUTH PLAIN", &msgs, &uidls),
            &format!("curl AUTH PLAIN (sasl-ir {ir})"),
        );
        assert_eq!(up.messages(USER).len(), 2);
        // The SASL exchange went through popgate as sent.
        let sent = up.received();
        let auth = sent.iter().find(|l| l.starts_with(b"AUTH")).unwrap();
        assert_eq!(
            auth.len() > b"AUTH PLAIN\r\n".len(),
            ir,
            "{:?}",
            String::from_utf8_lossy(auth)
        );
    }
}

/// fetchmail (--uidl, --nokeep): RETR and DELE of every message, then one update naming all
/// of them with their uids.
#[test]
#[ignore = "needs fetchmail (run .ci/run)"]
fn fetchmail_dialogue_gives_exact_events() {
    let h = Harness::new();
    let msgs = messages();
    let up = demo(&h, msgs.clone());
    let audit = AuditDir::new();
    let mut p = h.proxy(up.local_addr(), &audit.toml(""));
    // The uids, as the server lists them.
    let mut spec = poplib_spec(up.local_addr(), USER, PASS);
    spec["actions"] = json!([["uidl"], ["quit"]]);
    let uidls = parse_uidl_listing(&b64_lines(&poplib(spec)["results"][0]));
    let got = clients::fetchmail(p.addr, USER, PASS, false, &["--uidl"]);
    assert_eq!(got.len(), 3);
    assert!(up.messages(USER).is_empty());
    p.shutdown(&h);

    let evs = audit.events();
    let s = only_session(&evs);
    let mut want = vec![session_open(p.addr, "test"), login("USER")];
    for (i, m) in msgs.iter().enumerate() {
        want.push(
            json!({"event": "retrieve", "user": USER, "verb": "RETR", "msg": i + 1,
            "octets": wire_body(m).len(), "uidl": uidls[i], "complete": true,
            "headers": headers_of(i + 1)}),
        );
        want.push(
            json!({"event": "delete_marked", "user": USER, "msg": i + 1, "uidl": uidls[i],
            "message_id": headers_of(i + 1)["Message-ID"]}),
        );
    }
    let deleted: Vec<Value> = (0..3)
        .map(|i| json!({"msg": i + 1, "uidl": uidls[i], "message_id": headers_of(i + 1)["Message-ID"]}))
        .collect();
    want.push(json!({"event": "update", "user": USER, "deleted": deleted, "outcome": "confirmed"}));
    want.push(session_close(Some(USER), "quit"));
    assert_events(&norm_all(&s), &want, "fetchmail --nokeep");
}

/// APOP and AUTH LOGIN (poplib, curl, by hand) are recorded with their method; failed logins
/// with outcome `failure` and the server's response code.
#[test]
fn every_login_method_and_failures_are_recorded() {
    let h = Harness::new();
    let up = demo(&h, messages());
    let audit = AuditDir::new();
    let mut p = h.proxy(up.local_addr(), &audit.toml(""));
    let mut spec = poplib_spec(p.addr, USER, PASS);
    spec["login"] = json!("apop");
    spec["actions"] = json!([["quit"]]);
    assert_eq!(poplib(spec)["login"]["ok"], json!(true));
    curl_session(
        p.addr,
        &["--login-options", "AUTH=LOGIN"],
        &[("NOOP", "", true)],
    );
    curl_session(
        p.addr,
        &["--login-options", "AUTH=+APOP"],
        &[("NOOP", "", true)],
    );
    let mut c = RawPop::connect(p.addr);
    assert!(c.cmd(&format!("USER {USER}")).starts_with("+OK"));
    assert!(c.cmd("PASS wrong").starts_with("-ERR"));
    assert!(c.cmd("AUTH PLAIN AGFsaWNlAHdyb25n").starts_with("-ERR"));
    assert!(
        c.cmd("APOP alice 0123456789abcdef0123456789abcdef")
            .starts_with("-ERR")
    );
    assert!(c.cmd("AUTH LOGIN").starts_with("+ "));
    assert!(c.cmd("*").starts_with("-ERR"));
    assert!(c.cmd("QUIT").starts_with("+OK"));
    let _ = c.read_to_end();
    let evs = audit.wait_closed(4);
    p.shutdown(&h);
    let mut logins: Vec<Value> = evs
        .iter()
        .filter(|e| e["event"] == "login")
        .map(norm)
        .collect();
    // A cancelled AUTH LOGIN named no user; popgate reports the session's last one (alice,
    // from the APOP attempt before it). Not asserted either way.
    if let Some(last) = logins.last_mut() {
        last.as_object_mut().unwrap().remove("user");
    }
    let fail = |method: &str, code: Option<&str>| {
        let mut v = json!({"event": "login", "user": USER, "method": method, "outcome": "failure"});
        if let Some(c) = code {
            v["code"] = json!(c);
        }
        v
    };
    let mut cancelled = fail("AUTH LOGIN", None);
    cancelled.as_object_mut().unwrap().remove("user");
    assert_events(
        &logins,
        &[
            login("APOP"),
            login("AUTH LOGIN"),
            login("APOP"),
            fail("USER", Some("AUTH")),
            fail("AUTH PLAIN", Some("AUTH")),
            fail("APOP", Some("AUTH")),
            cancelled,
        ],
        "login methods",
    );
}

// ---------------------------------------------------------------------------------------------
// Session endings, RSET, rules, TLS, cut bodies

/// DELE, then the client vanishes: no `update` event, `session_close` says `client_eof`, and
/// indeed nothing was deleted.
#[test]
fn client_vanishing_after_dele_gives_no_update() {
    let h = Harness::new();
    let msgs = messages();
    let up = demo(&h, msgs.clone());
    let audit = AuditDir::new();
    let mut p = h.proxy(up.local_addr(), &audit.toml(""));
    let mut spec = poplib_spec(p.addr, USER, PASS);
    spec["actions"] = json!([["uidl"], ["dele", 1], ["abort"]]);
    let r = poplib(spec);
    assert_eq!(r["results"][1]["ok"], json!(true), "{}", brief(&r));
    let uidls = parse_uidl_listing(&b64_lines(&r["results"][0]));
    let evs = audit.wait_closed(1);
    p.shutdown(&h);
    assert_events(
        &norm_all(&only_session(&evs)),
        &[
            session_open(p.addr, "test"),
            login("USER"),
            json!({"event": "delete_marked", "user": USER, "msg": 1, "uidl": uidls[0]}),
            session_close(Some(USER), "client_eof"),
        ],
        "vanished after DELE",
    );
    assert_eq!(up.messages(USER).len(), 3, "nothing deleted");
    assert_eq!(up.quit_count(), 0);
    let close = session_close_of(&evs);
    assert!(close["bytes_from_client"].as_u64().unwrap() > 0, "{close}");
    assert!(close["bytes_to_client"].as_u64().unwrap() > 0, "{close}");
}

/// The other ways a session ends: idle timeout, a `drop` rule, an unreachable upstream, and
/// popgate shutting down; none of them has an `update`.
#[test]
fn other_close_reasons() {
    let rules = rule_file(
        r#"
[[rule]]
name = "drop-dele"
on = "command"
verbs = "DELE"
action = "drop"
"#,
    );
    let h = Harness::new();
    let up = demo(&h, messages());
    let audit = AuditDir::new();
    let mut p = proxy_with(
        &h,
        &[&rules.path],
        "",
        up.local_addr(),
        "",
        &format!("[limits]\nidle_timeout = \"400ms\"\n{}", audit.toml("")),
    );
    // Idle: logged in, then silent.
    let mut c = logged_in(p.addr);
    let rest = String::from_utf8_lossy(&c.read_to_end()).into_owned();
    assert!(rest.contains("autologout"), "{rest}");
    audit.wait_closed(1);
    // Dropped by a rule at DELE.
    let mut c = logged_in(p.addr);
    c.send("DELE 1");
    let _ = c.read_to_end();
    audit.wait_closed(2);
    // Shutdown while a session is open.
    let mut c = RawPop::connect(p.addr);
    assert!(c.cmd(&format!("USER {USER}")).starts_with("+OK"));
    p.shutdown(&h);
    let _ = c.read_to_end();
    // Unreachable upstream (a port nobody listens on).
    let dead: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let audit2 = AuditDir::new();
    let mut p2 = h.proxy(dead, &audit2.toml(""));
    let c = RawPop::connect(p2.addr);
    assert!(c.greeting.starts_with("-ERR"), "{}", c.greeting);
    let evs2 = audit2.wait_closed(1);
    p2.shutdown(&h);
    let evs = audit.events();
    let mut all: Vec<Vec<Value>> = sessions(&evs).iter().map(|s| norm_all(s)).collect();
    assert_eq!(all.len(), 3, "{}", lines(&evs));
    all.push(norm_all(&only_session(&evs2)));
    let open = |addr| session_open(addr, "test");
    assert_events(
        &all[0],
        &[
            open(p.addr),
            login("USER"),
            session_close(Some(USER), "idle_timeout"),
        ],
        "idle",
    );
    assert_events(
        &all[1],
        &[open(p.addr), login("USER"), {
            let mut c = session_close(Some(USER), "rule_drop");
            c["rule"] = json!("drop-dele");
            c
        }],
        "drop rule",
    );
    assert_events(
        &all[2],
        &[open(p.addr), session_close(Some(USER), "shutdown")],
        "shutdown",
    );
    assert_events(
        &all[3],
        &[open(p2.addr), session_close(None, "error")],
        "unreachable upstream",
    );
    assert_eq!(up.messages(USER).len(), 3);
}

/// RSET after DELEs gives `reset`, and the update lists only what was marked after it. A uid
/// learnt from the single-line `UIDL n` appears; an unknown one is left out.
#[test]
fn rset_gives_reset_and_clears_the_marks() {
    let h = Harness::new();
    let msgs = messages();
    let up = demo(&h, msgs.clone());
    let audit = AuditDir::new();
    let mut p = h.proxy(up.local_addr(), &audit.toml(""));
    let uid1 = upstream_uidls(up.local_addr())[0].clone();
    let mut c = logged_in(p.addr);
    let uidl2 = c.cmd("UIDL 2");
    let uid2 = uidl2.split_whitespace().nth(2).unwrap().to_owned();
    assert!(c.cmd("DELE 1").starts_with("+OK"));
    assert!(c.cmd("DELE 2").starts_with("+OK"));
    assert!(c.cmd("RSET").starts_with("+OK"));
    assert!(c.cmd("DELE 2").starts_with("+OK"));
    assert!(c.cmd("QUIT").starts_with("+OK"));
    let _ = c.read_to_end();
    let evs = audit.wait_closed(1);
    p.shutdown(&h);
    assert_events(
        &norm_all(&only_session(&evs)),
        &[
            session_open(p.addr, "test"),
            login("USER"),
            // The client never asked message 1's UIDL: popgate did.
            json!({"event": "delete_marked", "user": USER, "msg": 1, "uidl": uid1}),
            json!({"event": "delete_marked", "user": USER, "msg": 2, "uidl": uid2}),
            json!({"event": "reset", "user": USER}),
            json!({"event": "delete_marked", "user": USER, "msg": 2, "uidl": uid2}),
            json!({"event": "update", "user": USER, "deleted": [{"msg": 2, "uidl": uid2}],
                "outcome": "confirmed"}),
            session_close(Some(USER), "quit"),
        ],
        "RSET",
    );
    assert_eq!(up.messages(USER), vec![msgs[0].clone(), msgs[2].clone()]);
}

/// A `deny` rule gives a `denied` event with the rule's name and the verb. A `tag` rule's tags
/// go on the record of the event it matched (the RETR's `retrieve`, the DELE's `denied`);
/// with `scope = "session"` also on every later record, never on earlier ones.
#[test]
fn denied_command_names_the_rule_and_tags_follow() {
    let rules = rule_file(
        r#"
[[rule]]
name = "watch-retr"
on = "command"
verbs = "RETR"
action = "tag"
tags = ["watched"]

[[rule]]
name = "tag-login"
on = "login"
action = "tag"
tags = ["login-tag"]
scope = "session"

[[rule]]
name = "tag-dele"
on = "command"
verbs = "DELE"
action = "tag"
tags = ["dele-tag"]

[[rule]]
name = "no-dele"
on = "command"
verbs = "DELE"
action = "deny"
code = "SYS/PERM"
message = "this mailbox is read-only"
"#,
    );
    let h = Harness::new();
    let msgs = messages();
    let up = demo(&h, msgs.clone());
    let audit = AuditDir::new();
    let mut p = proxy_with(&h, &[&rules.path], "", up.local_addr(), "", &audit.toml(""));
    let mut spec = poplib_spec(p.addr, USER, PASS);
    spec["actions"] = json!([["uidl"], ["retr", 1], ["dele", 1], ["quit"]]);
    let r = poplib(spec);
    assert_eq!(r["results"][2]["ok"], json!(false), "{}", brief(&r));
    assert!(
        r["results"][2]["error"]
            .as_str()
            .unwrap()
            .contains("[SYS/PERM] this mailbox is read-only"),
        "{}",
        brief(&r)
    );
    let uidls = parse_uidl_listing(&b64_lines(&r["results"][0]));
    p.shutdown(&h);
    // Session tags from the login on; event tags on their own record only.
    let mut tagged_login = login("USER");
    tagged_login["tags"] = json!(["login-tag"]);
    let retr_tags = json!(["login-tag", "watched"]);
    let dele_tags = json!(["login-tag", "dele-tag"]);
    let tags = json!(["login-tag"]);
    assert_events(
        &norm_all(&only_session(&audit.events())),
        &[
            session_open(p.addr, "test"),
            tagged_login,
            json!({"event": "retrieve", "user": USER, "verb": "RETR", "msg": 1,
                "octets": wire_body(&msgs[0]).len(), "uidl": uidls[0], "complete": true,
                "headers": headers_of(1), "tags": retr_tags}),
            json!({"event": "denied", "rule": "no-dele", "verb": "DELE", "user": USER,
                "tags": dele_tags}),
            json!({"event": "update", "user": USER, "deleted": [], "outcome": "confirmed",
                "tags": tags}),
            json!({"event": "session_close", "user": USER, "reason": "quit",
                "bytes_from_client": "*", "bytes_to_client": "*", "tags": tags}),
        ],
        "deny + tag",
    );
    assert_eq!(up.messages(USER).len(), 3, "DELE never reached the server");
}

/// STLS on the client side gives a `tls` event (side client, version, cipher, SNI); an
/// implicit-TLS listener puts the same into `session_open.client_tls`.
#[test]
fn client_tls_is_recorded() {
    let h = Harness::new();
    let pki = TestPki::new();
    let (cert, key) = pki.issue(&["localhost", "127.0.0.1"]);
    let msgs = messages();
    let up = demo(&h, msgs.clone());
    let audit = AuditDir::new();
    let mut p = h.proxy_toml(&format!(
        "[[listener]]\nname = \"stls\"\nbind = \"127.0.0.1:0\"\ntls = \"starttls\"\n\
         [[listener]]\nname = \"pop3s\"\nbind = \"127.0.0.1:0\"\ntls = \"implicit\"\n\
         [upstream]\naddress = \"{}\"\n[tls]\ncert = {cert:?}\nkey = {key:?}\n{}",
        up.local_addr(),
        audit.toml("")
    ));
    for (mode, addr) in [("stls", p.addrs[0]), ("ssl", p.addrs[1])] {
        let mut spec = poplib_spec(addr, USER, PASS);
        spec["mode"] = json!(mode);
        spec["cafile"] = json!(pki.ca_path());
        spec["server_hostname"] = json!("localhost");
        spec["actions"] = json!([["retr", 1], ["quit"]]);
        let r = poplib(spec);
        assert_eq!(r["results"][1]["ok"], json!(true), "{}", brief(&r));
        assert!(b64(&r["results"][0]["data_b64"]) == msgs[0]);
        audit.wait_closed(if mode == "stls" { 1 } else { 2 });
    }
    p.shutdown(&h);
    let all = sessions(&audit.events());
    assert_eq!(all.len(), 2, "{}", lines(&audit.events()));
    let check_tls = |t: &Value| {
        assert!(t["version"].as_str().unwrap().starts_with("TLSv1_"), "{t}");
        assert!(!t["cipher"].as_str().unwrap().is_empty(), "{t}");
        assert_eq!(t["sni"], json!("localhost"), "{t}");
    };
    let retrieve = json!({"event": "retrieve", "user": USER, "verb": "RETR", "msg": 1,
        "octets": wire_body(&msgs[0]).len(), "uidl": upstream_uidls(up.local_addr())[0],
        "complete": true, "headers": headers_of(1)});
    let update = json!({"event": "update", "user": USER, "deleted": [], "outcome": "confirmed"});
    // STLS: session_open without client_tls, then the tls event, then the rest.
    let stls = &all[0];
    assert_eq!(
        names(stls),
        [
            "session_open",
            "tls",
            "login",
            "retrieve",
            "update",
            "session_close"
        ],
        "{}",
        lines(stls)
    );
    assert_eq!(norm(&stls[0]), session_open(p.addrs[0], "stls"));
    let tls = norm(&stls[1]);
    assert_eq!(tls["side"], json!("client"), "{tls}");
    check_tls(&tls);
    assert_eq!(
        tls.as_object().unwrap().len(),
        5,
        "event, side, version, cipher, sni: {tls}"
    );
    assert_eq!(norm(&stls[2]), login("USER"));
    assert_eq!(norm(&stls[3]), retrieve);
    assert_eq!(norm(&stls[4]), update);
    assert_eq!(norm(&stls[5]), session_close(Some(USER), "quit"));
    // Implicit TLS: client_tls in session_open, no tls event.
    let implicit = &all[1];
    assert_eq!(
        names(implicit),
        [
            "session_open",
            "login",
            "retrieve",
            "update",
            "session_close"
        ],
        "{}",
        lines(implicit)
    );
    let mut open = norm(&implicit[0]);
    check_tls(&open["client_tls"]);
    open.as_object_mut().unwrap().remove("client_tls");
    assert_eq!(open, session_open(p.addrs[1], "pop3s"));
}

/// TLS toward the upstream (implicit and STLS) gives a `tls` event with side upstream and no
/// SNI, right after session_open.
#[test]
fn upstream_tls_is_recorded() {
    for up_mode in ["implicit", "starttls"] {
        let h = Harness::new();
        let pki = TestPki::new();
        let (cert, key) = pki.issue(&["localhost", "127.0.0.1"]);
        let msgs = messages();
        let up = h.upstream(ServerOptions {
            tls: Some(rustls_server(&cert, &key)),
            offer_stls: up_mode == "starttls",
            implicit_tls: up_mode == "implicit",
            ..ServerOptions::new(vec![mailbox(USER, PASS, msgs.clone())])
        });
        let audit = AuditDir::new();
        let mut p = proxy_with(
            &h,
            &[],
            "",
            up.local_addr(),
            &format!(
                "tls = \"{up_mode}\"\nca_file = {:?}\nserver_name = \"localhost\"",
                pki.ca_path()
            ),
            &audit.toml(""),
        );
        let mut spec = poplib_spec(p.addr, USER, PASS);
        spec["actions"] = json!([["retr", 2], ["quit"]]);
        let r = poplib(spec);
        assert_eq!(r["results"][1]["ok"], json!(true), "{}", brief(&r));
        p.shutdown(&h);
        let s = only_session(&audit.events());
        assert_eq!(
            names(&s),
            [
                "session_open",
                "tls",
                "login",
                "retrieve",
                "update",
                "session_close"
            ],
            "{up_mode}: {}",
            lines(&s)
        );
        let tls = norm(&s[1]);
        assert_eq!(tls["side"], json!("upstream"), "{tls}");
        assert!(
            tls["version"].as_str().unwrap().starts_with("TLSv1_"),
            "{tls}"
        );
        assert!(!tls["cipher"].as_str().unwrap().is_empty(), "{tls}");
        assert!(
            tls.get("sni").is_none(),
            "no SNI on the upstream side: {tls}"
        );
        assert_eq!(norm(&s[3])["headers"], headers_of(2));
    }
}

/// The upstream dies in the middle of a body: `retrieve` with `complete: false` and the octets
/// the client actually got; the session closes with `upstream_eof`.
#[test]
fn body_cut_off_by_the_upstream_is_incomplete() {
    let h = Harness::new();
    let msgs = messages();
    let cut = top0(&msgs[0]).len() + 12;
    let up = h.upstream(ServerOptions {
        faults: Faults {
            die_mid_body: Some(cut),
            ..Faults::default()
        },
        ..ServerOptions::new(vec![mailbox(USER, PASS, msgs.clone())])
    });
    let audit = AuditDir::new();
    let mut p = h.proxy(up.local_addr(), &audit.toml(""));
    let mut c = logged_in(p.addr);
    assert!(c.cmd("RETR 1").starts_with("+OK"));
    let got = c.read_to_end();
    assert!(got.len() <= cut && wire_body(&msgs[0]).starts_with(&got));
    let evs = audit.wait_closed(1);
    p.shutdown(&h);
    assert_events(
        &norm_all(&only_session(&evs)),
        &[
            session_open(p.addr, "test"),
            login("USER"),
            json!({"event": "retrieve", "user": USER, "verb": "RETR", "msg": 1,
                "octets": got.len(), "uidl": upstream_uidls(up.local_addr())[0],
                "complete": false, "headers": headers_of(1)}),
            session_close(Some(USER), "upstream_eof"),
        ],
        "cut body",
    );
}

/// A `trace` rule starts a transcript for the sessions it matches (here: one user), in the
/// transcript directory, with the password redacted; other sessions get none.
#[test]
fn trace_rule_starts_a_transcript_for_one_user() {
    let rules = rule_file(
        r#"
[[rule]]
name = "trace-alice"
on = "login"
user = '^alice$'
action = "trace"
"#,
    );
    let h = Harness::new();
    let up = h.upstream(ServerOptions::new(vec![
        mailbox(USER, PASS, messages()),
        mailbox("bob", "bob-pass-7", messages()),
    ]));
    let audit = AuditDir::new();
    let transcripts = tempfile::tempdir().unwrap();
    let mut p = proxy_with(
        &h,
        &[&rules.path],
        "",
        up.local_addr(),
        "",
        &audit.toml(&format!(
            "[audit.transcript]\ndir = {:?}\n",
            transcripts.path()
        )),
    );
    for (user, pass) in [("bob", "bob-pass-7"), (USER, PASS)] {
        let mut spec = poplib_spec(p.addr, user, pass);
        spec["actions"] = json!([["retr", 3], ["quit"]]);
        let r = poplib(spec);
        assert_eq!(r["results"][1]["ok"], json!(true), "{}", brief(&r));
    }
    audit.wait_closed(2);
    p.shutdown(&h);
    let files: Vec<PathBuf> = std::fs::read_dir(transcripts.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "one transcript (alice's): {files:?}");
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert!(
        text.contains("transcript started by a trace rule"),
        "{text}"
    );
    assert!(
        text.contains("C: RETR 3") && text.contains("C: QUIT"),
        "{text}"
    );
    assert!(text.contains("S: Subject: Audit test 3"), "{text}");
    assert!(!text.contains(PASS) && !text.contains("bob"), "{text}");
    // popgate asked the message's UIDL itself: a note, not a line of the client's dialogue.
    assert!(
        text.contains("*: popgate asks the server (not relayed): UIDL 3")
            && text.contains("*: server answers popgate (not relayed): +OK 3 "),
        "{text}"
    );
    assert!(
        !text.contains("C: UIDL") && !text.contains("S: +OK 3 "),
        "{text}"
    );
    // The session id in the file name is alice's (the second session).
    let alice_session = sessions(&audit.events())[1][0]["session"].as_u64().unwrap();
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.contains(&format!("-s{alice_session}-")), "{name}");
}

// ---------------------------------------------------------------------------------------------
// Header extraction end to end

/// Messages with awkward header blocks and the headers their `retrieve` events must show.
fn awkward_messages() -> Vec<(Vec<u8>, Value)> {
    let big_addrs: Vec<String> = (0..2000)
        .map(|i| format!("user{i:04}@example.org"))
        .collect();
    // One 40 KB line, and the same list folded over 2000 lines.
    let single = big_addrs.join(", ");
    assert!(single.len() > 40_000);
    let folded = big_addrs.join(",\r\n ");
    vec![
        // Folded headers (spaces, tabs, an empty first line) are unfolded.
        (
            b"Message-ID:\r\n <folded.1@example.org>\r\n\
              From: \"A rather long display name\"\r\n\t<long@example.org>\r\n\
              To: one@example.org,\r\n  two@example.org,\r\n\tthree@example.org\r\n\
              Subject: a folded\r\n   subject line   \r\n\
              Date: Mon, 2 Mar 2026\r\n 10:00:00 +0000\r\n\
              \r\n\
              body\r\n"
                .to_vec(),
            json!({
                "Message-ID": "<folded.1@example.org>",
                "From": "\"A rather long display name\" <long@example.org>",
                "To": "one@example.org, two@example.org, three@example.org",
                "Subject": "a folded subject line",
                "Date": "Mon, 2 Mar 2026 10:00:00 +0000",
            }),
        ),
        // Dot-stuffed header lines: a header whose name starts with '.', values starting with
        // '.', a continuation line whose value starts with '.'.
        (
            b".X-Dot: leading dot header\r\n\
              Subject: .after a dotted line\r\n\
              To: first@example.org,\r\n .second@example.org\r\n\
              From: .dot@example.org\r\n\
              Message-ID: <dots.2@example.org>\r\n\
              \r\n\
              .body\r\n\
              ..\r\n"
                .to_vec(),
            json!({
                "Message-ID": "<dots.2@example.org>",
                "From": ".dot@example.org",
                "To": "first@example.org, .second@example.org",
                "Subject": ".after a dotted line",
                ".X-Dot": "leading dot header",
            }),
        ),
        // No blank line, no body.
        (
            b"Message-ID: <noblank.3@example.org>\r\nSubject: only headers\r\nFrom: f@example.org\r\n"
                .to_vec(),
            json!({
                "Message-ID": "<noblank.3@example.org>",
                "From": "f@example.org",
                "Subject": "only headers",
            }),
        ),
        // No blank line and no final line end (the server adds one).
        (
            b"Subject: no line end\r\nTo: t@example.org".to_vec(),
            json!({"To": "t@example.org", "Subject": "no line end"}),
        ),
        // A 40 KB header on one line, more than one read of the relay, then more headers.
        (
            format!(
                "Message-ID: <big.5@example.org>\r\nTo: {single}\r\nSubject: after the big one\r\n\
                 From: big@example.org\r\n\r\nbody\r\n"
            )
            .into_bytes(),
            json!({
                "Message-ID": "<big.5@example.org>",
                "From": "big@example.org",
                "To": single,
                "Subject": "after the big one",
            }),
        ),
        // The same list folded over 2000 lines.
        (
            format!(
                "Message-ID: <big.6@example.org>\r\nTo: {folded}\r\nSubject: after the folded one\r\n\
                 From: big@example.org\r\n\r\nbody\r\n"
            )
            .into_bytes(),
            json!({
                "Message-ID": "<big.6@example.org>",
                "From": "big@example.org",
                "To": single,
                "Subject": "after the folded one",
            }),
        ),
    ]
}

fn retrieve_headers_via_poplib(addr: SocketAddr, n: usize, top_of: &[usize]) {
    let mut actions: Vec<Value> = (1..=n).map(|i| json!(["retr", i])).collect();
    actions.extend(top_of.iter().map(|i| json!(["top", i, 0])));
    actions.push(json!(["quit"]));
    let mut spec = poplib_spec(addr, USER, PASS);
    spec["maxline"] = json!(200_000);
    spec["actions"] = json!(actions);
    let r = poplib(spec);
    for (i, res) in r["results"].as_array().unwrap().iter().enumerate() {
        assert_eq!(res["ok"], json!(true), "action {i}: {}", brief(&r));
    }
}

/// Folded headers, dot-stuffed lines, a message without a blank line, and 40 KB headers (one
/// line, or folded) larger than a relay read: the `retrieve` events have the right headers, for
/// RETR and for TOP n 0.
#[test]
fn header_extraction_on_awkward_messages() {
    let h = Harness::new();
    let cases = awkward_messages();
    let msgs: Vec<Vec<u8>> = cases.iter().map(|(m, _)| m.clone()).collect();
    let up = demo(&h, msgs.clone());
    let audit = AuditDir::new();
    let mut p = h.proxy(
        up.local_addr(),
        &audit.toml(
            "max_header_bytes = 65536\n\
             headers = [\"Message-ID\", \"From\", \"To\", \"Subject\", \"Date\", \".X-Dot\"]",
        ),
    );
    retrieve_headers_via_poplib(p.addr, msgs.len(), &[1, 2, 3, 5]);
    p.shutdown(&h);
    let evs = audit.events();
    let retrieves: Vec<&Value> = evs.iter().filter(|e| e["event"] == "retrieve").collect();
    assert_eq!(retrieves.len(), msgs.len() + 4, "{}", lines(&evs));
    for (i, (m, want)) in cases.iter().enumerate() {
        let ev = retrieves[i];
        assert_eq!(ev["msg"], json!(i + 1));
        assert_eq!(ev["complete"], json!(true), "message {}", i + 1);
        assert_eq!(ev["octets"], json!(wire_body(m).len()), "message {}", i + 1);
        assert!(
            ev["headers"] == *want,
            "message {}: headers\n got {}\nwant {}",
            i + 1,
            ev["headers"],
            want
        );
    }
    for (k, i) in [1usize, 2, 3, 5].iter().enumerate() {
        let ev = retrieves[msgs.len() + k];
        assert_eq!(ev["verb"], json!("TOP"));
        assert_eq!(ev["msg"], json!(i));
        assert_eq!(
            ev["octets"],
            json!(wire_body(top0(&msgs[i - 1])).len()),
            "TOP {i}"
        );
        assert!(
            ev["headers"] == cases[i - 1].1,
            "TOP {i}: {}",
            ev["headers"]
        );
    }
}

/// With the default 16 KB limit, a 40 KB header is cut: what is kept is a prefix of it, the
/// headers before it are there, the ones after it are not (the scan stopped).
#[test]
fn header_extraction_stops_at_max_header_bytes() {
    let h = Harness::new();
    let cases = awkward_messages();
    let msgs: Vec<Vec<u8>> = cases[4..].iter().map(|(m, _)| m.clone()).collect();
    let up = demo(&h, msgs.clone());
    let audit = AuditDir::new();
    let mut p = h.proxy(up.local_addr(), &audit.toml(""));
    retrieve_headers_via_poplib(p.addr, msgs.len(), &[]);
    p.shutdown(&h);
    let evs = audit.events();
    let retrieves: Vec<&Value> = evs.iter().filter(|e| e["event"] == "retrieve").collect();
    assert_eq!(retrieves.len(), 2);
    for (ev, (m, full)) in retrieves.iter().zip(&cases[4..]) {
        assert_eq!(ev["complete"], json!(true));
        assert_eq!(
            ev["octets"],
            json!(wire_body(m).len()),
            "octets still count the whole body"
        );
        let hd = ev["headers"].as_object().unwrap();
        assert_eq!(hd["Message-ID"], full["Message-ID"]);
        let to = hd["To"].as_str().unwrap();
        let full_to = full["To"].as_str().unwrap();
        assert!(
            !to.is_empty() && to.len() < 16 * 1024 && full_to.starts_with(to),
            "To must be a prefix of the full value, cut at the limit ({} chars)",
            to.len()
        );
        assert!(
            !hd.contains_key("Subject") && !hd.contains_key("From"),
            "headers after the limit: {hd:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The real binary

/// `popgate run` in front of `upstream` with logs in `log/`, `rest` (tables) appended. Waits
/// for the "listening" log line rather than probing the port: a probe would be a session.
fn binary(upstream: SocketAddr, rest: &str) -> PopgateProcess {
    PopgateProcess::run(
        upstream,
        PopgateOpts::new()
            .log_to_dir("info")
            .tables(rest)
            .wait_for_log(),
    )
}

/// A 50 MB RETR through the real binary with auditing to a file: popgate's peak RSS stays
/// flat, and the `retrieve` event has the exact wire octets, `complete: true` and the headers.
#[test]
fn fifty_megabyte_retr_with_audit_keeps_memory_flat() {
    let h = Harness::new();
    let mut big = message(2)[..top0(&message(2)).len()].to_vec();
    big.extend_from_slice(&big_message(50 << 20));
    let msgs = vec![message(1), big.clone()];
    let up = demo(&h, msgs.clone());
    let mut proc = PopgateProcess::start(
        up.local_addr(),
        "[audit]\nenabled = true\ndir = \"audit\"\n",
    );
    // Warm up with the small message, then measure around the big one.
    let mut c = logged_in(proc.addr);
    let (_, small) = c.cmd_multi("RETR 1");
    assert_eq!(small.unwrap().len() + 3, wire_body(&msgs[0]).len());
    let (before, _) = proc.memory_kib();
    let (status, body) = c.cmd_multi("RETR 2");
    assert!(status.starts_with("+OK"), "{status}");
    let body = body.unwrap();
    let (peak, _) = proc.memory_kib();
    assert!(c.cmd("QUIT").starts_with("+OK"));
    let want = wire_body(&big);
    assert_eq!(body.len() + 3, want.len());
    assert!(body[..] == want[..want.len() - 3], "50 MB message differs");
    eprintln!("popgate VmHWM before {before} KiB, after 50 MB RETR {peak} KiB");
    assert!(
        peak < before + 8 * 1024,
        "peak RSS grew by {} KiB",
        peak - before
    );
    proc.stop();
    let evs = events_in(&proc.dir.path().join("audit"));
    let r: Vec<&Value> = evs.iter().filter(|e| e["event"] == "retrieve").collect();
    assert_eq!(r.len(), 2, "{}", lines(&evs));
    assert_eq!(
        norm(r[1]),
        json!({"event": "retrieve", "user": USER, "verb": "RETR", "msg": 2,
            "octets": want.len(), "uidl": upstream_uidls(up.local_addr())[1],
            "complete": true, "headers": headers_of(2)})
    );
    assert!(r[1]["octets"].as_u64().unwrap() > 50 << 20);
}

/// `on_overflow = "drop"` with `queue = 1` and an audit writer that cannot write (a FIFO
/// nobody reads): a burst of sessions all finish, events are dropped, and the error log says
/// so with a counter. Deterministic: the burst's events are far more than the pipe buffer plus
/// one writer batch (64 KiB each) can hold.
#[test]
fn full_audit_queue_in_drop_mode_never_stalls_the_relay() {
    let h = Harness::new();
    // Each retrieve event carries a ~4 KB Subject. One mailbox per session: the demo server
    // locks a maildrop per user.
    let long = "s".repeat(4000);
    let msg = format!("Subject: {long}\r\nFrom: f@example.org\r\n\r\nbody\r\n").into_bytes();
    let sessions_n = 200;
    let up = h.upstream(ServerOptions::new(
        (0..sessions_n)
            .map(|i| mailbox(&format!("user{i}"), PASS, vec![msg.clone()]))
            .collect(),
    ));
    let audit = AuditDir::new();
    // Today's file (UTC) is a FIFO. (A run across midnight UTC would write a new, regular
    // file and could see no overflow.)
    let day = &humantime::format_rfc3339(SystemTime::now()).to_string()[..10];
    let fifo = audit.path().join(format!("audit.{day}.jsonl"));
    let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(st.success());
    // The reader opens the FIFO (so that popgate's open for writing completes), then reads
    // nothing until told to.
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let fifo_r = fifo.clone();
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::open(&fifo_r).unwrap();
        let _ = go_rx.recv();
        let mut all = Vec::new();
        let _ = f.read_to_end(&mut all);
        all
    });
    let mut bin = binary(
        up.local_addr(),
        &format!(
            "[audit]\nenabled = true\ndir = {:?}\nqueue = 1\non_overflow = \"drop\"\n",
            audit.path()
        ),
    );
    let started = Instant::now();
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let addr = bin.addr;
            std::thread::spawn(move || {
                for i in (w..sessions_n).step_by(8) {
                    let mut c = RawPop::connect(addr);
                    assert!(c.cmd(&format!("USER user{i}")).starts_with("+OK"));
                    assert!(c.cmd(&format!("PASS {PASS}")).starts_with("+OK"));
                    let (st, body) = c.cmd_multi("RETR 1");
                    assert!(st.starts_with("+OK"), "{st}");
                    assert!(body.is_some());
                    assert!(c.cmd("QUIT").starts_with("+OK"));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a session stalled or failed");
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(60), "burst took {took:?}");
    // Overflow is reported in the error log, with the running count.
    bin.wait_log("audit queue full", 1);
    let log = bin.log();
    assert!(
        log.contains("ERROR") && log.contains("dropped_total"),
        "{log}"
    );
    // Let the writer drain, stop popgate: what was written is whole JSON lines, fewer than the
    // sessions produced (each makes 5 events).
    go_tx.send(()).unwrap();
    bin.stop();
    let written = reader.join().unwrap();
    let text = String::from_utf8(written).unwrap();
    let evs: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(text.is_empty() || text.ends_with('\n'));
    assert!(
        evs.len() < sessions_n * 5,
        "{} events written, none dropped?",
        evs.len()
    );
    for e in &evs {
        check_envelope(e);
    }
}

/// `on_overflow = "block"` with `queue = 1`: concurrent sessions all finish and no event is
/// lost: every session has its complete sequence.
#[test]
fn full_audit_queue_in_block_mode_loses_nothing() {
    let h = Harness::new();
    let n = 40;
    let up = h.upstream(ServerOptions::new(
        (0..n)
            .map(|i| mailbox(&format!("user{i}"), PASS, messages()))
            .collect(),
    ));
    let audit = AuditDir::new();
    let mut p = h.proxy(
        up.local_addr(),
        &audit.toml("queue = 1\non_overflow = \"block\""),
    );
    let workers: Vec<_> = (0..n)
        .map(|i| {
            let addr = p.addr;
            std::thread::spawn(move || {
                let mut c = RawPop::connect(addr);
                assert!(c.cmd(&format!("USER user{i}")).starts_with("+OK"));
                assert!(c.cmd(&format!("PASS {PASS}")).starts_with("+OK"));
                let (st, body) = c.cmd_multi("RETR 1");
                assert!(st.starts_with("+OK") && body.is_some(), "{st}");
                assert!(c.cmd("QUIT").starts_with("+OK"));
                let _ = c.read_to_end();
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a session stalled or failed");
    }
    let evs = audit.wait_closed(n);
    p.shutdown(&h);
    let all = sessions(&evs);
    assert_eq!(all.len(), n);
    for s in &all {
        assert_eq!(
            names(s),
            [
                "session_open",
                "login",
                "retrieve",
                "update",
                "session_close"
            ],
            "{}",
            lines(s)
        );
    }
}
/// Runs `popgate audit ARGS...` (bounded); returns its output.
fn popgate_audit(files: &[PathBuf], args: &[&str]) -> Output {
    let mut cmd = Command::new(popgate_bin());
    cmd.arg("audit").args(files).args(args);
    clients::run_bounded(&mut cmd, None, Duration::from_secs(30))
}

/// The table rows of `popgate audit` output (header checked and left out), split into
/// `[time, event, session, user, details]`.
fn table_rows(out: &Output) -> Vec<Vec<String>> {
    assert!(
        out.status.success(),
        "popgate audit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    let mut it = text.lines();
    let header: Vec<&str> = it.next().unwrap_or("").split_whitespace().collect();
    assert_eq!(
        header,
        ["TIME", "EVENT", "SESSION", "USER", "DETAILS"],
        "{text}"
    );
    it.map(|l| {
        // Columns are padded with spaces; only DETAILS may hold more words.
        let mut parts: Vec<String> = l.split_whitespace().map(str::to_owned).collect();
        let details = parts.split_off(4.min(parts.len())).join(" ");
        parts.push(details);
        parts
    })
    .collect()
}

/// `popgate audit` on the files of a real `popgate run`: `--user`, `--event` (repeated and
/// comma-separated: "who deleted message 1"), `--since`, `--json`, and a helpful error.
#[test]
fn popgate_audit_reads_the_files_of_a_real_run() {
    let h = Harness::new();
    let up = h.upstream(ServerOptions::new(vec![
        mailbox(USER, PASS, messages()),
        mailbox("bob", "bob-pass-7", messages()),
    ]));
    let mut bin = binary(
        up.local_addr(),
        "[audit]\nenabled = true\ndir = \"audit\"\n",
    );
    let mut spec = poplib_spec(bin.addr, USER, PASS);
    spec["actions"] = json!([["uidl"], ["retr", 1], ["dele", 1], ["quit"]]);
    let r = poplib(spec);
    assert_eq!(r["results"][3]["ok"], json!(true), "{}", brief(&r));
    let uid1 = parse_uidl_listing(&b64_lines(&r["results"][0]))[0].clone();
    let mut spec = poplib_spec(bin.addr, "bob", "bob-pass-7");
    spec["actions"] = json!([["retr", 2], ["quit"]]);
    poplib(spec);
    let mut spec = poplib_spec(bin.addr, "carol", "wrong");
    spec["actions"] = json!([["quit"]]);
    let r = poplib(spec);
    assert_eq!(r["login"]["ok"], json!(false));
    let dir = bin.dir.path().join("audit");
    wait_closed_in(&dir, 3);
    bin.stop();
    let files = audit_files(&dir);
    assert!(!files.is_empty());
    let all = events_in(&dir);
    assert_eq!(all.len(), 6 + 5 + 3, "{}", lines(&all));

    // Everything, in order.
    let rows = table_rows(&popgate_audit(&files, &[]));
    assert_eq!(rows.len(), all.len());
    for (row, ev) in rows.iter().zip(&all) {
        assert_eq!(row[1], ev["event"].as_str().unwrap(), "{row:?}");
        assert_eq!(row[2], ev["session"].to_string(), "{row:?}");
        assert_eq!(row[0], ev["ts"].as_str().unwrap(), "{row:?}");
    }

    // --user: alice's events and her session_open (which names no user), nothing of bob's.
    let rows = table_rows(&popgate_audit(&files, &["--user", USER]));
    let alice: Vec<&Value> = all
        .iter()
        .filter(|e| e["session"] == all[0]["session"])
        .collect();
    assert_eq!(rows.len(), alice.len(), "{rows:?}");
    for row in &rows {
        assert!(
            row[3] == USER || (row[3] == "-" && row[1] == "session_open"),
            "{row:?}"
        );
    }

    // Who deleted message 1? The delete_marked and the update that confirmed it.
    let rows = table_rows(&popgate_audit(&files, &["--event", "delete_marked"]));
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0][1], "delete_marked");
    assert_eq!(rows[0][3], USER);
    assert_eq!(
        rows[0][4],
        format!(
            "msg=1 uidl={uid1} message_id={}",
            headers_of(1)["Message-ID"].as_str().unwrap()
        )
    );
    for args in [
        &["--event", "delete_marked,update"][..],
        &["--event", "delete_marked", "--event", "update"][..],
    ] {
        let rows = table_rows(&popgate_audit(&files, args));
        let evs: Vec<&str> = rows.iter().map(|r| r[1].as_str()).collect();
        assert_eq!(evs, ["delete_marked", "update", "update"], "{rows:?}");
        assert_eq!(rows[1][3], USER);
        assert!(
            rows[1][4].contains(&format!("deleted=1({uid1}|<1.audit@example.org>)")),
            "{rows:?}"
        );
        assert!(rows[1][4].contains("outcome=confirmed"), "{rows:?}");
        assert_eq!(rows[2][3], "bob");
        assert!(rows[2][4].contains("deleted=none"), "{rows:?}");
    }
    let rows = table_rows(&popgate_audit(&files, &["--event", "login"]));
    let outcomes: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r[3].as_str(), r[4].as_str()))
        .collect();
    assert_eq!(
        outcomes,
        [
            (USER, "method=USER outcome=success"),
            ("bob", "method=USER outcome=success"),
            ("carol", "method=USER outcome=failure code=AUTH"),
        ]
    );

    // --since: an age that covers the run keeps everything, a future date nothing.
    assert_eq!(
        table_rows(&popgate_audit(&files, &["--since", "1h"])).len(),
        all.len()
    );
    assert_eq!(
        table_rows(&popgate_audit(&files, &["--since", "2999-01-01"])).len(),
        0
    );
    let first_close = all.iter().find(|e| e["event"] == "session_close").unwrap();
    let rows = table_rows(&popgate_audit(
        &files,
        &[
            "--since",
            first_close["ts"].as_str().unwrap(),
            "--user",
            "bob",
        ],
    ));
    assert!(
        rows.iter().all(|r| r[3] == "bob" || r[3] == "-"),
        "{rows:?}"
    );

    // --json: the original lines, each a JSON object; filters apply.
    let out = popgate_audit(&files, &["--json"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let parsed: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(parsed, all);
    let out = popgate_audit(&files, &["--json", "--user", "bob", "--event", "retrieve"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let bob: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(bob.len(), 1, "{text}");
    assert_eq!(bob[0]["user"], json!("bob"));
    assert_eq!(bob[0]["msg"], json!(2));
    assert_eq!(bob[0]["headers"], headers_of(2));

    // A misspelt event is an error that lists the known ones.
    let out = popgate_audit(&files, &["--event", "retreive"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("retreive") && err.contains("delete_marked"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Dovecot

/// Dovecot with alice holding [`messages`] (stored with LF line ends).
fn dovecot() -> Dovecot {
    Dovecot::start(DovecotOpts::default().user(USER, PASS, messages()))
}

/// poplib and curl through popgate to Dovecot: retrieve events with the headers and Dovecot's
/// uids (`%08Xu%08Xv`), `update` after QUIT (and the message really gone).
#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn dovecot_retrieve_and_update_events() {
    let dv = dovecot();
    let h = Harness::new();
    let audit = AuditDir::new();
    let mut p = h.proxy(dv.addr(), &audit.toml(""));
    let served_msgs: Vec<Vec<u8>> = messages().iter().map(|m| served(m)).collect();

    let mut spec = poplib_spec(p.addr, USER, PASS);
    spec["actions"] = json!([["uidl"], ["retr", 1], ["top", 2, 0], ["dele", 1], ["quit"]]);
    let r = poplib(spec);
    assert_eq!(r["results"][4]["ok"], json!(true), "{}", brief(&r));
    let uidls = parse_uidl_listing(&b64_lines(&r["results"][0]));
    for u in &uidls {
        assert!(
            u.len() == 16 && u.bytes().all(|b| b.is_ascii_hexdigit()),
            "not a Dovecot uid: {u}"
        );
    }
    assert_eq!(dv.message_count(USER), 2);
    let evs = audit.wait_closed(1);
    assert_events(
        &norm_all(&only_session(&evs)),
        &standard_events(p.addr, "USER", &served_msgs, &uidls),
        "poplib via popgate to Dovecot",
    );

    // curl, AUTH PLAIN: RETR 1 (message 2 now) and QUIT.
    let got = curl_session(
        p.addr,
        &["--login-options", "AUTH=PLAIN"],
        &[("", "1", false)],
    );
    assert!(got[0] == served_msgs[1]);
    let evs = audit.wait_closed(2);
    assert_events(
        &norm_all(&sessions(&evs)[1]),
        &[
            session_open(p.addr, "test"),
            login("AUTH PLAIN"),
            json!({"event": "retrieve", "user": USER, "verb": "RETR", "msg": 1,
                "octets": wire_body(&served_msgs[1]).len(), "uidl": uidls[1],
                "complete": true, "headers": headers_of(2)}),
            json!({"event": "update", "user": USER, "deleted": [], "outcome": "confirmed"}),
            session_close(Some(USER), "quit"),
        ],
        "curl via popgate to Dovecot",
    );

    // curl's default login against Dovecot is CRAM-MD5: the method is recorded, and the user
    // name, which CRAM-MD5 sends in the clear with the digest.
    let got = curl_session(p.addr, &[], &[("", "1", false)]);
    assert!(got[0] == served_msgs[1]);
    let evs = audit.wait_closed(3);
    p.shutdown(&h);
    let s = norm_all(&sessions(&evs)[2]);
    assert_eq!(
        names(&s),
        [
            "session_open",
            "login",
            "retrieve",
            "update",
            "session_close"
        ],
        "{}",
        lines(&s)
    );
    assert_eq!(s[1]["method"], json!("AUTH CRAM-MD5"), "{}", s[1]);
    assert_eq!(s[1]["outcome"], json!("success"), "{}", s[1]);
    assert_eq!(s[1]["user"], s[2]["user"], "{}", s[1]);
    assert!(s[1]["user"].is_string(), "{}", s[1]);
    assert_eq!(s[2]["headers"], headers_of(2));
    assert_eq!(s[2]["octets"], json!(wire_body(&served_msgs[1]).len()));
    assert_eq!(s[4]["reason"], json!("quit"));
}

/// Through popgate to Dovecot, DELE then the client vanishes: no update, `client_eof`, and
/// Dovecot still has the message.
#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn dovecot_vanished_client_gives_no_update() {
    let dv = dovecot();
    let h = Harness::new();
    let audit = AuditDir::new();
    let mut p = h.proxy(dv.addr(), &audit.toml(""));
    let mut spec = poplib_spec(p.addr, USER, PASS);
    spec["actions"] = json!([["uidl"], ["retr", 2], ["dele", 2], ["abort"]]);
    let r = poplib(spec);
    assert_eq!(r["results"][2]["ok"], json!(true), "{}", brief(&r));
    let uidls = parse_uidl_listing(&b64_lines(&r["results"][0]));
    let evs = audit.wait_closed(1);
    p.shutdown(&h);
    let m2 = served(&messages()[1]);
    assert_events(
        &norm_all(&only_session(&evs)),
        &[
            session_open(p.addr, "test"),
            login("USER"),
            json!({"event": "retrieve", "user": USER, "verb": "RETR", "msg": 2,
                "octets": wire_body(&m2).len(), "uidl": uidls[1], "complete": true,
                "headers": headers_of(2)}),
            json!({"event": "delete_marked", "user": USER, "msg": 2, "uidl": uidls[1],
                "message_id": headers_of(2)["Message-ID"]}),
            session_close(Some(USER), "client_eof"),
        ],
        "vanished client, Dovecot",
    );
    assert_eq!(dv.message_count(USER), 3, "Dovecot deleted nothing");
}

/// fetchmail (--uidl) through popgate to Dovecot. fetchmail logs in with CRAM-MD5, the best
/// mechanism Dovecot offers; popgate takes the user from the response. With `--keep`: a
/// retrieve event for every message (headers, Dovecot's uid, complete) and an update that
/// deleted nothing, Dovecot keeping everything. Without: RETR and DELE of every message, then one update naming all of
/// them, confirmed, and Dovecot's maildir empty.
#[test]
#[ignore = "needs dovecot and fetchmail (run .ci/run)"]
fn dovecot_fetchmail_keep_then_nokeep_events() {
    let dv = dovecot();
    let h = Harness::new();
    let audit = AuditDir::new();
    let mut p = h.proxy(dv.addr(), &audit.toml(""));
    let msgs = messages();
    let served_msgs: Vec<Vec<u8>> = msgs.iter().map(|m| served(m)).collect();
    // The uids, as Dovecot lists them (asked directly, not through popgate).
    let mut spec = poplib_spec(dv.addr(), USER, PASS);
    spec["actions"] = json!([["uidl"], ["quit"]]);
    let uidls = parse_uidl_listing(&b64_lines(&poplib(spec)["results"][0]));
    assert_eq!(uidls.len(), 3);

    let retrieves = || -> Vec<Value> {
        (0..3)
            .map(|i| {
                json!({"event": "retrieve", "user": USER, "verb": "RETR", "msg": i + 1,
                    "octets": wire_body(&served_msgs[i]).len(), "uidl": uidls[i],
                    "complete": true, "headers": headers_of(i + 1)})
            })
            .collect()
    };

    // --keep: everything retrieved, nothing deleted.
    let run = clients::fetchmail_run(p.addr, USER, PASS, true, &["--uidl"]);
    assert_eq!(run.status, 0, "{run:?}");
    assert!(
        run.stdout.contains("POP3> UIDL"),
        "fetchmail --uidl sent no UIDL: {run:?}"
    );
    assert_eq!(run.messages.len(), 3, "{run:?}");
    for (i, m) in msgs.iter().enumerate() {
        assert!(
            run.messages[i] == lf_only(m),
            "fetchmail message {} differs",
            i + 1
        );
    }
    assert_eq!(dv.message_count(USER), 3, "--keep deleted something");
    let evs = audit.wait_closed(1);
    let mut want = vec![session_open(p.addr, "test"), login("AUTH CRAM-MD5")];
    want.extend(retrieves());
    want.push(json!({"event": "update", "user": USER, "deleted": [], "outcome": "confirmed"}));
    want.push(session_close(Some(USER), "quit"));
    assert_events(
        &norm_all(&only_session(&evs)),
        &want,
        "fetchmail --keep via popgate to Dovecot",
    );

    // --nokeep: every message retrieved and deleted, one update for all of them.
    let got = clients::fetchmail(p.addr, USER, PASS, false, &["--uidl"]);
    assert!(
        got == msgs.iter().map(|m| lf_only(m)).collect::<Vec<_>>(),
        "fetchmail --nokeep: {} messages",
        got.len()
    );
    let evs = audit.wait_closed(2);
    p.shutdown(&h);
    let mut want = vec![session_open(p.addr, "test"), login("AUTH CRAM-MD5")];
    for (i, r) in retrieves().into_iter().enumerate() {
        want.push(r);
        want.push(
            json!({"event": "delete_marked", "user": USER, "msg": i + 1, "uidl": uidls[i],
            "message_id": headers_of(i + 1)["Message-ID"]}),
        );
    }
    let deleted: Vec<Value> = (0..3)
        .map(|i| json!({"msg": i + 1, "uidl": uidls[i], "message_id": headers_of(i + 1)["Message-ID"]}))
        .collect();
    want.push(json!({"event": "update", "user": USER, "deleted": deleted, "outcome": "confirmed"}));
    want.push(session_close(Some(USER), "quit"));
    let s = sessions(&evs);
    assert_eq!(s.len(), 2, "{}", lines(&evs));
    assert_events(
        &norm_all(&s[1]),
        &want,
        "fetchmail --nokeep via popgate to Dovecot",
    );
    assert_eq!(dv.message_count(USER), 0, "Dovecot kept messages");
}

/// The UIDLs Dovecot gives its messages, asked directly (not through popgate).
fn dovecot_uidls(dv: &Dovecot) -> Vec<String> {
    let mut spec = poplib_spec(dv.addr(), USER, PASS);
    spec["actions"] = json!([["uidl"], ["quit"]]);
    parse_uidl_listing(&b64_lines(&poplib(spec)["results"][0]))
}

/// `popgate audit --uidl` answers who deleted a message, when and from where, when the client
/// never asked for a UIDL: poplib `DELE 1`, QUIT, and curl `-X DELE`, through popgate to Dovecot.
/// popgate asked Dovecot `UIDL n` itself; the clients got exactly Dovecot's answers.
#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn a_delete_without_uidl_is_found_by_its_uidl_with_user_time_and_client() {
    let dv = dovecot();
    let uidls = dovecot_uidls(&dv);
    assert_eq!(uidls.len(), 3);
    let h = Harness::new();
    let audit = AuditDir::new();
    let mut p = h.proxy(dv.addr(), &audit.toml(""));

    let mut spec = poplib_spec(p.addr, USER, PASS);
    spec["actions"] = json!([["dele", 1], ["quit"]]);
    let r = poplib(spec);
    assert_eq!(r["results"][0]["ok"], json!(true), "{}", brief(&r));
    assert_eq!(r["results"][1]["ok"], json!(true), "{}", brief(&r));
    assert_eq!(dv.message_count(USER), 2);
    let evs = audit.wait_closed(1);
    let s = norm_all(&only_session(&evs));
    assert_eq!(
        s[2],
        json!({"event": "delete_marked", "user": USER, "msg": 1, "uidl": uidls[0]}),
        "{}",
        lines(&s)
    );
    assert_eq!(
        s[3],
        json!({"event": "update", "user": USER, "deleted": [{"msg": 1, "uidl": uidls[0]}],
            "outcome": "confirmed"}),
        "{}",
        lines(&s)
    );

    // curl: DELE through -X (message 1 of the session is Dovecot's second message now).
    curl_session(
        p.addr,
        &["--login-options", "AUTH=PLAIN"],
        &[("DELE", "1", true)],
    );
    assert_eq!(dv.message_count(USER), 1);
    let evs = audit.wait_closed(2);
    p.shutdown(&h);
    let s = norm_all(&sessions(&evs)[1]);
    assert!(
        s.iter().any(|e| e["event"] == json!("update")
            && e["deleted"] == json!([{"msg": 1, "uidl": uidls[1]}])),
        "{}",
        lines(&s)
    );

    // One command: who deleted it, when, from where.
    let before = SystemTime::now();
    for (uidl, session) in [(&uidls[0], 0), (&uidls[1], 1)] {
        let out = popgate_audit(&audit.files(), &["--uidl", uidl, "--since", "today"]);
        let rows = table_rows(&out);
        let events: Vec<&str> = rows.iter().map(|r| r[1].as_str()).collect();
        assert_eq!(
            events,
            ["session_open", "delete_marked", "update"],
            "{rows:?}"
        );
        let update = &rows[2];
        assert_eq!(update[3], USER, "{update:?}");
        let ts = humantime::parse_rfc3339(&update[0]).expect("a time");
        assert!(ts <= before, "{update:?}");
        assert!(update[4].contains("outcome=confirmed"), "{update:?}");
        assert!(update[4].contains("client=127.0.0.1:"), "{update:?}");
        let open = &sessions(&evs)[session][0];
        assert!(
            update[4].contains(&format!("client={}", open["client"].as_str().unwrap())),
            "{update:?} {open}"
        );
    }
    // --until yesterday: nothing of today.
    let out = popgate_audit(
        &audit.files(),
        &["--uidl", &uidls[0], "--until", "yesterday"],
    );
    assert_eq!(table_rows(&out).len(), 0);
}

/// `audit.message_ids = "always"`: the Message-ID of a message deleted without being retrieved
/// is asked with `TOP n 0`, and `popgate audit --message-id` finds the deletion; with the
/// default, nothing is asked beyond the UIDL.
#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn always_records_the_message_id_of_a_message_deleted_unread() {
    let dv = dovecot();
    let uidls = dovecot_uidls(&dv);
    let h = Harness::new();
    let audit = AuditDir::new();
    let mut p = h.proxy(dv.addr(), &audit.toml("message_ids = \"always\"\n"));
    let mut spec = poplib_spec(p.addr, USER, PASS);
    spec["actions"] = json!([["dele", 2], ["quit"]]);
    let r = poplib(spec);
    assert_eq!(r["results"][1]["ok"], json!(true), "{}", brief(&r));
    let evs = audit.wait_closed(1);
    p.shutdown(&h);
    let id = headers_of(2)["Message-ID"].clone();
    let s = norm_all(&only_session(&evs));
    assert_eq!(
        s[2],
        json!({"event": "delete_marked", "user": USER, "msg": 2, "uidl": uidls[1],
            "message_id": id}),
        "{}",
        lines(&s)
    );
    let out = popgate_audit(&audit.files(), &["--message-id", id.as_str().unwrap()]);
    let rows = table_rows(&out);
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows[2][4].contains("outcome=confirmed"), "{rows:?}");
}

/// A server without UIDL (`-ERR` to it): poplib `DELE 1`, `DELE 2`, QUIT. popgate asks once,
/// learns from the accepted `DELE 1` that the message exists, asks no more, and the records say
/// `no_uidl`; the client saw only the server's answers to its own commands.
#[test]
fn a_server_without_uidl_is_recorded_as_such_and_asked_once() {
    let h = Harness::new();
    let up = h.upstream(ServerOptions {
        faults: Faults {
            unknown: Some(popgate::pop3::command::Verb::Uidl),
            ..Faults::default()
        },
        ..ServerOptions::new(vec![mailbox(USER, PASS, messages())])
    });
    let audit = AuditDir::new();
    let mut p = h.proxy(up.local_addr(), &audit.toml(""));
    let mut spec = poplib_spec(p.addr, USER, PASS);
    spec["actions"] = json!([["dele", 1], ["dele", 2], ["quit"]]);
    let r = poplib(spec);
    for i in 0..3 {
        assert_eq!(r["results"][i]["ok"], json!(true), "{}", brief(&r));
    }
    let evs = audit.wait_closed(1);
    p.shutdown(&h);
    let s = norm_all(&only_session(&evs));
    assert_eq!(
        &s[2..5],
        &[
            json!({"event": "delete_marked", "user": USER, "msg": 1, "no_uidl": true}),
            json!({"event": "delete_marked", "user": USER, "msg": 2, "no_uidl": true}),
            json!({"event": "update", "user": USER, "deleted": [{"msg": 1, "no_uidl": true},
                {"msg": 2, "no_uidl": true}], "outcome": "confirmed"}),
        ],
        "{}",
        lines(&s)
    );
    let uidls = up
        .received()
        .iter()
        .filter(|l| l.starts_with(b"UIDL"))
        .count();
    assert_eq!(uidls, 1, "asked once");
    assert_eq!(up.messages(USER).len(), 1);
}
