//! Attacks on popgate's policy, tried the way an attacker would.
//!
//! 1. Identity: once logged in as a read-only user, no second login (USER, APOP, AUTH PLAIN,
//!    AUTH CRAM-MD5 with a fake initial response) changes who the rules and the audit trail
//!    think the session belongs to, and SASL tricks before the login (`AUTH LOGIN =`,
//!    `AUTH CRAM-MD5 =`, a CRAM-MD5 initial response the server ignores) do not hide the user.
//!    Tried against a real Dovecot: DELE stays refused and the message stays.
//! 2. Credentials under `require-tls`: no spelling of a credential line (TAB, leading white
//!    space, glued, lower case, SASL answers after a refused AUTH, unknown X-commands) reaches
//!    a recording upstream from a plaintext client, in both `unknown_commands` modes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::path::Path;

use base64::Engine as _;
use common::clients::RawPop;
use common::dovecot::{Dovecot, DovecotOpts};
use common::proxy::{Harness, ProxyHandle, mailbox};
use common::{audit_events, base64, shipped_rules, wait_until};
use md5::{Digest, Md5};
use popgate_demo::ServerOptions;
use serde_json::Value;

/// HMAC-MD5 (RFC 2104) as lower-case hex: the CRAM-MD5 digest of `challenge` under `key`.
fn hmac_md5_hex(key: &[u8], challenge: &[u8]) -> String {
    let mut k = [0u8; 64];
    k[..key.len()].copy_from_slice(key);
    let mut inner = Md5::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(challenge);
    let mut outer = Md5::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Identity after login, against Dovecot with rules/read-only.toml

const ARCHIVE: &str = "archive@example.org";
const ARCHIVE_PASS: &str = "arch-secret";

fn message(n: usize) -> Vec<u8> {
    format!("From: a@example.org\r\nSubject: kept {n}\r\n\r\nbody {n}\r\n").into_bytes()
}

/// Dovecot with the archive mailbox (3 messages) and popgate with read-only.toml and an audit
/// trail in front of it.
struct ReadOnlySetup {
    dv: Dovecot,
    _h: Harness,
    proxy: ProxyHandle,
    audit: tempfile::TempDir,
}

impl ReadOnlySetup {
    fn start() -> ReadOnlySetup {
        let dv = Dovecot::start(DovecotOpts::default().user(
            ARCHIVE,
            ARCHIVE_PASS,
            (1..=3).map(message).collect(),
        ));
        let h = Harness::new();
        let audit = tempfile::Builder::new().prefix("audit").tempdir().unwrap();
        let proxy = h.proxy_with_rules(
            &[&shipped_rules("read-only.toml")],
            "",
            dv.addr(),
            "connect_timeout = \"3s\"",
            &format!("[audit]\nenabled = true\ndir = {:?}\n", audit.path()),
        );
        ReadOnlySetup {
            dv,
            _h: h,
            proxy,
            audit,
        }
    }

    fn login(&self) -> RawPop {
        let mut c = RawPop::connect(self.proxy.addr);
        assert!(c.greeting.starts_with("+OK"), "{}", c.greeting);
        let r = c.cmd(&format!("USER {ARCHIVE}"));
        assert!(r.starts_with("+OK"), "USER: {r}");
        let r = c.cmd(&format!("PASS {ARCHIVE_PASS}"));
        assert!(r.starts_with("+OK"), "PASS: {r}");
        c
    }

    /// DELE 1 is refused, QUIT commits nothing, and the audit trail of the session names only
    /// the archive user.
    fn assert_read_only_holds(&self, mut c: RawPop, what: &str, sessions: usize) {
        let r = c.cmd("DELE 1");
        assert_eq!(
            r, "-ERR [SYS/PERM] this mailbox is read-only",
            "{what}: DELE"
        );
        let r = c.cmd("QUIT");
        assert!(r.starts_with("+OK"), "{what}: QUIT: {r}");
        assert!(c.read_to_end().is_empty());
        wait_until(what, || {
            self.dv.log().matches("Disconnected: Logged out").count() >= sessions
        });
        assert_eq!(
            self.dv.message_count(ARCHIVE),
            3,
            "{what}: a message was deleted"
        );
        let evs = audit_after(self.audit.path(), sessions);
        let users: Vec<&str> = evs
            .iter()
            .filter(|e| e["event"] != "login" || e["outcome"] == "success")
            .filter_map(|e| e["user"].as_str())
            .collect();
        assert!(!users.is_empty(), "{what}: no user in the audit trail");
        assert!(
            users.iter().all(|u| *u == ARCHIVE),
            "{what}: audit users {users:?}"
        );
        let denied = evs.iter().filter(|e| e["event"] == "denied").count();
        assert!(denied >= 1, "{what}: no denied event");
    }
}

/// All audit events once `sessions` sessions have closed.
fn audit_after(dir: &Path, sessions: usize) -> Vec<Value> {
    let closed = |evs: &[Value]| evs.iter().filter(|e| e["event"] == "session_close").count();
    wait_until(&format!("audit: {sessions} sessions closed"), || {
        closed(&audit_events(dir)) >= sessions
    });
    audit_events(dir)
}

/// After the login as the read-only user, every way of naming another user is refused by
/// popgate itself (never reaches Dovecot) and DELE stays refused.
#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn second_login_after_login_changes_nothing() {
    let s = ReadOnlySetup::start();
    let plain = base64(b"\0nobody\0x");
    let cram = base64(b"nobody 00");
    let attempts: Vec<(&str, Vec<String>)> = vec![
        ("USER", vec!["USER nobody".into()]),
        ("USER with TAB", vec!["USER\tnobody".into()]),
        ("USER/PASS", vec!["USER nobody".into(), "PASS x".into()]),
        ("AUTH PLAIN", vec![format!("AUTH PLAIN {plain}")]),
        (
            "APOP",
            vec!["APOP nobody c4c9334bac560ecc979e58001b3e22fb".into()],
        ),
        ("AUTH CRAM-MD5 IR", vec![format!("AUTH CRAM-MD5 {cram}")]),
        (
            "AUTH LOGIN then answers",
            vec!["AUTH LOGIN".into(), base64(b"nobody"), base64(b"x")],
        ),
    ];
    for (n, (what, lines)) in attempts.iter().enumerate() {
        let mut c = s.login();
        for line in lines {
            let r = c.cmd(line);
            assert!(r.starts_with("-ERR"), "{what}: {line:?} answered {r}");
        }
        s.assert_read_only_holds(c, what, n + 1);
    }
}

/// SASL logins that hid the user from popgate before: each logs in as the archive user, and
/// popgate knows it (DELE refused, audit says so).
#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn sasl_tricks_before_login_do_not_hide_the_user() {
    let s = ReadOnlySetup::start();
    let cram_answer = |c: &mut RawPop, first: &str| {
        let r = c.cmd(first);
        let challenge = r
            .strip_prefix("+ ")
            .unwrap_or_else(|| panic!("{first}: {r}"));
        let challenge = base64::engine::general_purpose::STANDARD
            .decode(challenge)
            .unwrap();
        let digest = hmac_md5_hex(ARCHIVE_PASS.as_bytes(), &challenge);
        let r = c.cmd(&base64(format!("{ARCHIVE} {digest}").as_bytes()));
        assert!(r.starts_with("+OK"), "{first}: {r}");
    };
    let login_answers = |c: &mut RawPop, first: &str| {
        let r = c.cmd(first);
        assert_eq!(r, "+ VXNlcm5hbWU6", "{first}");
        let r = c.cmd(&base64(ARCHIVE.as_bytes()));
        assert_eq!(r, "+ UGFzc3dvcmQ6", "{first}");
        let r = c.cmd(&base64(ARCHIVE_PASS.as_bytes()));
        assert!(r.starts_with("+OK"), "{first}: {r}");
    };
    type Trick = Box<dyn Fn(&mut RawPop)>;
    let tricks: Vec<(&str, Trick)> = vec![
        (
            "AUTH CRAM-MD5 =",
            Box::new(move |c| cram_answer(c, "AUTH CRAM-MD5 =")),
        ),
        (
            "AUTH CRAM-MD5 with a fake initial response",
            Box::new(move |c| cram_answer(c, &format!("AUTH CRAM-MD5 {}", base64(b"nobody 00")))),
        ),
        (
            "AUTH LOGIN =",
            Box::new(move |c| login_answers(c, "AUTH LOGIN =")),
        ),
        (
            "auth login = in lower case",
            Box::new(move |c| login_answers(c, "auth login =")),
        ),
    ];
    for (n, (what, trick)) in tricks.iter().enumerate() {
        let mut c = RawPop::connect(s.proxy.addr);
        trick(&mut c);
        s.assert_read_only_holds(c, what, n + 1);
        let evs = audit_after(s.audit.path(), n + 1);
        let logins: Vec<&Value> = evs
            .iter()
            .filter(|e| e["event"] == "login" && e["outcome"] == "success")
            .collect();
        assert_eq!(logins.len(), n + 1, "{what}");
        assert_eq!(logins[n]["user"], ARCHIVE, "{what}: {}", logins[n]);
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Credentials under require-tls, against the recording demo upstream

const SECRET: &str = "S3cr3tPw-9z";

/// Every line a plaintext client could use to smuggle a credential past require-tls.
fn smuggling_lines() -> Vec<Vec<u8>> {
    let plain = base64(format!("\0alice\0{SECRET}").as_bytes());
    let lines: Vec<String> = vec![
        format!("PASS\t{SECRET}"),
        format!("\tPASS {SECRET}"),
        format!(" PASS {SECRET}"),
        format!("pass {SECRET}"),
        format!("PaSs\t\t{SECRET}"),
        format!("PASS{SECRET}"),
        format!("XPASS {SECRET}"),
        format!("LOGIN alice {SECRET}"),
        format!("APOP\talice {SECRET}"),
        format!("AUTH\tPLAIN {plain}"),
        // A refused AUTH, then its answer sent without waiting for a challenge.
        "AUTH PLAIN".into(),
        plain.clone(),
        "AUTH PLAIN =".into(),
        plain.clone(),
        "AUTH LOGIN".into(),
        base64(b"alice"),
        base64(SECRET.as_bytes()),
        "auth x-unknown-mech".into(),
        base64(SECRET.as_bytes()),
        format!("USER alice\tPASS {SECRET}"),
    ];
    lines
        .into_iter()
        .map(|l| format!("{l}\r\n").into_bytes())
        .collect()
}

fn require_tls_leaks_nothing(mode: &str) {
    let h = Harness::new();
    let up = h.upstream(ServerOptions::new(vec![mailbox(
        "alice",
        SECRET,
        vec![message(1)],
    )]));
    let proxy = h.proxy_with_rules(
        &[&shipped_rules("require-tls.toml")],
        "",
        up.local_addr(),
        "connect_timeout = \"3s\"",
        &format!("[limits]\nunknown_commands = \"{mode}\"\n"),
    );
    let lines = smuggling_lines();
    // One line at a time, each answered `-ERR` (require-tls closes the session after a few
    // denials: then a new one takes over).
    let mut c = RawPop::connect(proxy.addr);
    for (i, line) in lines.iter().enumerate() {
        c.send_raw(line);
        let mut r = c.line();
        if r.is_empty() {
            c = RawPop::connect(proxy.addr);
            c.send_raw(line);
            r = c.line();
        }
        assert!(
            r.starts_with("-ERR"),
            "{mode}: line {i} {:?} answered {r:?}",
            String::from_utf8_lossy(line)
        );
    }
    drop(c);
    // Pipelined: every window of three lines in one write.
    for start in 0..lines.len() {
        let mut c = RawPop::connect(proxy.addr);
        let end = (start + 3).min(lines.len());
        c.send_raw(&lines[start..end].concat());
        c.send_raw(b"QUIT\r\n");
        let rest = String::from_utf8_lossy(&c.read_to_end()).into_owned();
        assert!(
            rest.lines()
                .all(|l| l.starts_with("-ERR") || l.starts_with("+OK")),
            "{mode}: {rest}"
        );
    }
    let received: Vec<String> = up
        .received()
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    let plain = base64(format!("\0alice\0{SECRET}").as_bytes());
    let secret_b64 = base64(SECRET.as_bytes());
    for l in &received {
        assert!(
            !l.contains(SECRET) && !l.contains(&plain) && !l.contains(&secret_b64),
            "{mode}: upstream received a credential: {l:?} (all: {received:?})"
        );
        let verb = l.trim_start().get(..4).unwrap_or("").to_ascii_uppercase();
        assert!(
            !["USER", "PASS", "APOP", "AUTH"].contains(&verb.as_str()),
            "{mode}: upstream received {l:?}"
        );
    }
}

#[test]
fn require_tls_leaks_no_credential_with_unknown_commands_rejected() {
    require_tls_leaks_nothing("reject");
}

#[test]
fn require_tls_leaks_no_credential_with_unknown_commands_forwarded() {
    require_tls_leaks_nothing("single-line");
}

/// With `single-line`, an unknown command still reaches the server where credentials are
/// allowed (over TLS, or without require-tls): the refusal above is the rule's doing.
#[test]
fn unknown_commands_are_forwarded_where_credentials_are_allowed() {
    let h = Harness::new();
    let up = h.upstream(ServerOptions::new(vec![mailbox(
        "alice",
        "pw",
        vec![message(1)],
    )]));
    let proxy = h.proxy_with_rules(
        &[],
        "",
        up.local_addr(),
        "connect_timeout = \"3s\"",
        "[limits]\nunknown_commands = \"single-line\"\n",
    );
    let mut c = RawPop::connect(proxy.addr);
    let r = c.cmd("XPASS hello");
    assert!(r.starts_with("-ERR"), "{r}");
    let _ = c.cmd("QUIT");
    let got: Vec<Vec<u8>> = up.received();
    assert!(got.iter().any(|l| l == b"XPASS hello\r\n"), "{got:?}");
}

/// A SASL answer longer than `max_line` cancels the exchange upstream (`*`): the server's
/// `-ERR` answers the AUTH, the long line is never forwarded, and the replies to later
/// (pipelined) commands stay on their commands.
#[test]
fn overlong_sasl_answer_does_not_shift_replies() {
    let h = Harness::new();
    let up = h.upstream(ServerOptions::new(vec![mailbox(
        "alice",
        "pw",
        vec![message(1)],
    )]));
    let proxy = h.proxy(up.local_addr(), "[limits]\nmax_line = 128\n");
    for complete in [true, false] {
        let mut c = RawPop::connect(proxy.addr);
        assert_eq!(c.cmd("AUTH PLAIN"), "+ ");
        let long = "A".repeat(2000);
        if complete {
            c.send_raw(format!("{long}\r\nUSER alice\r\nPASS pw\r\nSTAT\r\n").as_bytes());
        } else {
            // No line end yet: the exchange is cancelled as soon as the line is too long.
            c.send_raw(long.as_bytes());
            let r = c.line();
            assert!(r.starts_with("-ERR"), "AUTH after an endless answer: {r}");
            c.send_raw(b"\r\nUSER alice\r\nPASS pw\r\nSTAT\r\n");
        }
        if complete {
            let r = c.line();
            assert!(r.starts_with("-ERR"), "AUTH: {r}");
        }
        assert!(c.line().starts_with("+OK"), "USER");
        let r = c.line();
        assert!(r.starts_with("+OK"), "PASS: {r}");
        let r = c.line();
        assert!(r.starts_with("+OK 1 "), "STAT: {r}");
        assert!(c.cmd("QUIT").starts_with("+OK"));
        let got = up.received();
        assert!(got.iter().all(|l| l.len() < 200), "long line forwarded");
        assert!(got.iter().any(|l| l == b"*\r\n"), "{got:?}");
    }
}

mod require_tls_bypass;
