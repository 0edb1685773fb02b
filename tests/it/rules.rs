//! The rule engine end to end: the shipped rule sets (`require-tls`, `read-only`,
//! `hide-banner`) with real clients, every action (allow, deny, rewrite, log, tag, drop, delay)
//! through a running proxy, protocol safety of denials and rewrites in pipelined batches, and
//! reloading rules on SIGHUP in the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::certs::TestPki;
use common::clients::{self, RawPop, curl, poplib, poplib_spec};
use common::proxy::{
    Harness, PopgateOpts, PopgateProcess, ProxyHandle, RuleFile, mailbox, popgate_bin, rule_file,
    tricky_messages,
};
use common::shipped_rules;
use popgate_demo::{DemoServer, ServerOptions};
use serde_json::{Value, json};

/// A shipped rule file, by absolute path (tests do not depend on the working directory).
/// popgate in front of `up` with `rules`. With `pki`, the listener is `starttls` with a
/// certificate for localhost / 127.0.0.1.
fn proxy(h: &Harness, up: &DemoServer, rules: &[&str], pki: Option<&TestPki>) -> ProxyHandle {
    let (listener, tls) = match pki {
        Some(pki) => {
            let (cert, key) = pki.issue(&["localhost", "127.0.0.1"]);
            (
                "tls = \"starttls\"\n",
                format!("[tls]\ncert = {cert:?}\nkey = {key:?}\n"),
            )
        }
        None => ("", String::new()),
    };
    h.proxy_with_rules(
        rules,
        listener,
        up.local_addr(),
        "connect_timeout = \"2s\"\n",
        &tls,
    )
}

/// A demo upstream with `mailboxes` (plaintext, APOP on).
fn upstream(h: &Harness, mailboxes: Vec<popgate_demo::Mailbox>) -> DemoServer {
    h.upstream(ServerOptions {
        apop: true,
        ..ServerOptions::new(mailboxes)
    })
}

/// The usual setup: alice (`alice-pass`, [`tricky_messages`]`(0)`) on a demo upstream and
/// popgate in front with one rule file holding `rules`. Bind all four (drop order: proxy first).
fn alice_with_rules(rules: &str) -> (Harness, DemoServer, RuleFile, ProxyHandle) {
    let h = Harness::new();
    let up = upstream(&h, vec![mailbox("alice", "alice-pass", tricky_messages(0))]);
    let rules = rule_file(rules);
    let p = proxy(&h, &up, &[&rules.path], None);
    (h, up, rules, p)
}

/// USER + PASS, both expected to succeed.
fn login(c: &mut RawPop, user: &str, pass: &str) {
    let r = c.cmd(&format!("USER {user}"));
    assert!(r.starts_with("+OK"), "USER {user}: {r}");
    let r = c.cmd(&format!("PASS {pass}"));
    assert!(r.starts_with("+OK"), "PASS for {user}: {r}");
}

/// A raw multi-line body (as `RawPop::body` returns it) without dot-stuffing.
fn unstuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    for line in body.split_inclusive(|b| *b == b'\n') {
        out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
    }
    out
}

/// The lines the upstream received, as text.
fn received(up: &DemoServer) -> Vec<String> {
    up.received()
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect()
}

/// Received lines whose verb is one of `verbs` (case-insensitive).
fn received_verbs(up: &DemoServer, verbs: &[&str]) -> Vec<String> {
    received(up)
        .into_iter()
        .filter(|l| {
            let verb = l
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            verbs.contains(&verb.as_str())
        })
        .collect()
}

/// Wait (bounded) until no upstream session holds `user`'s maildrop: whatever the proxy sent
/// for it has been processed.
fn wait_unlocked(up: &DemoServer, user: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.is_locked(user) {
        assert!(
            Instant::now() < deadline,
            "upstream session of {user} never ended"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// Acceptance: require-tls.toml

const TLS_USER: &str = "tlsuser";
const TLS_PASS: &str = "tls-secret-42";
const CREDENTIAL_VERBS: &[&str] = &["USER", "PASS", "APOP", "AUTH"];

/// Plaintext curl and poplib cannot log in and no credential reaches the upstream; over STLS
/// both log in and get byte-identical messages.
#[test]
fn require_tls_refuses_plaintext_logins_and_allows_stls() {
    let h = Harness::new();
    let pki = TestPki::new();
    let msgs = tricky_messages(200_000);
    let up = upstream(&h, vec![mailbox(TLS_USER, TLS_PASS, msgs.clone())]);
    let p = proxy(&h, &up, &[&shipped_rules("require-tls.toml")], Some(&pki));
    let creds = format!("{TLS_USER}:{TLS_PASS}");

    // curl in plaintext: whatever method it picks, it cannot log in.
    for extra in [&[][..], &["--login-options", "AUTH=PLAIN"][..]] {
        let url = clients::url("pop3", p.addr, "1");
        let mut args = vec!["-u", &creds];
        args.extend_from_slice(extra);
        args.push(&url);
        let out = curl(&args);
        assert!(
            !out.status.success(),
            "plaintext curl {extra:?} logged in: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(out.stdout.is_empty(), "plaintext curl got a message");
    }
    // poplib in plaintext: USER is refused with the rule's text.
    let mut spec = poplib_spec(p.addr, TLS_USER, TLS_PASS);
    spec["actions"] = json!([["retr", 1]]);
    let r = poplib(spec);
    assert_eq!(r["login"]["ok"], json!(false), "{}", clients::brief(&r));
    let err = r["login"]["error"].as_str().unwrap();
    assert!(
        err.starts_with("-ERR [AUTH] Encryption required"),
        "poplib login error: {err}"
    );
    assert_eq!(r["results"][0]["ok"], json!(false));
    // poplib APOP in plaintext too.
    let mut spec = poplib_spec(p.addr, TLS_USER, TLS_PASS);
    spec["login"] = json!("apop");
    let r = poplib(spec);
    assert_eq!(r["login"]["ok"], json!(false), "{}", clients::brief(&r));
    assert!(
        received_verbs(&up, CREDENTIAL_VERBS).is_empty(),
        "credentials reached the upstream: {:?}",
        received(&up)
    );
    assert!(up.connections() > 0, "the upstream was never dialled");

    // Over STLS: curl and poplib log in and fetch byte-identical messages.
    for (i, m) in msgs.iter().enumerate() {
        let url = clients::url("pop3", p.addr, &(i + 1).to_string());
        let ca = pki.ca_path().to_str().unwrap();
        let got = clients::curl_ok(&["-u", &creds, "--ssl-reqd", "--cacert", ca, &url]);
        assert!(got == *m, "curl over STLS: message {} differs", i + 1);
    }
    let mut spec = poplib_spec(p.addr, TLS_USER, TLS_PASS);
    spec["mode"] = json!("stls");
    spec["cafile"] = json!(pki.ca_path());
    spec["actions"] = json!([["retr", 1], ["retr", 2], ["quit"]]);
    let r = poplib(spec);
    assert_eq!(r["tls"], json!("stls"), "{}", clients::brief(&r));
    assert_eq!(r["login"]["ok"], json!(true), "{}", clients::brief(&r));
    assert!(clients::b64(&r["results"][0]["data_b64"]) == msgs[0]);
    assert!(clients::b64(&r["results"][1]["data_b64"]) == msgs[1]);
    assert!(
        received_verbs(&up, &["PASS"])
            .iter()
            .any(|l| l.contains(TLS_PASS)),
        "no login over TLS reached the upstream: {:?}",
        received(&up)
    );
}

fn capa_names(result: &Value) -> Vec<String> {
    result["capa"]
        .as_object()
        .unwrap_or_else(|| panic!("no capa in {result}"))
        .keys()
        .cloned()
        .collect()
}

/// CAPA before TLS hides USER and SASL PLAIN/LOGIN (and offers STLS); after STLS they are back.
#[test]
fn require_tls_capa_hides_plaintext_methods_until_stls() {
    let h = Harness::new();
    let pki = TestPki::new();
    let up = upstream(&h, vec![mailbox(TLS_USER, TLS_PASS, tricky_messages(0))]);
    let p = proxy(&h, &up, &[&shipped_rules("require-tls.toml")], Some(&pki));

    let mut spec = poplib_spec(p.addr, TLS_USER, TLS_PASS);
    spec["login"] = json!("none");
    spec["actions"] = json!([["capa"]]);
    let r = poplib(spec.clone());
    let before = capa_names(&r["results"][0]);
    assert!(!before.contains(&"USER".into()), "{before:?}");
    assert!(!before.contains(&"SASL".into()), "{before:?}");
    for keep in ["TOP", "UIDL", "PIPELINING", "STLS"] {
        assert!(before.contains(&keep.into()), "{keep} missing: {before:?}");
    }

    spec["mode"] = json!("stls");
    spec["cafile"] = json!(pki.ca_path());
    let r = poplib(spec);
    assert_eq!(r["tls"], json!("stls"), "{}", clients::brief(&r));
    let after = &r["results"][0]["capa"];
    assert!(after.get("USER").is_some(), "{after}");
    assert_eq!(after["SASL"], json!(["PLAIN", "LOGIN"]), "{after}");
    assert!(
        after.get("STLS").is_none(),
        "STLS offered under TLS: {after}"
    );
}

/// After `close_after = 4` denials the session is closed; the QUIT pipelined behind them never
/// reaches the upstream, and neither does any credential.
#[test]
fn require_tls_closes_after_four_denials() {
    let h = Harness::new();
    let pki = TestPki::new();
    let up = upstream(&h, vec![mailbox(TLS_USER, TLS_PASS, tricky_messages(0))]);
    let p = proxy(&h, &up, &[&shipped_rules("require-tls.toml")], Some(&pki));
    let mut c = RawPop::connect(p.addr);
    assert!(c.greeting.starts_with("+OK"), "{}", c.greeting);
    c.send_raw(
        format!(
            "USER {TLS_USER}\r\nPASS {TLS_PASS}\r\nAPOP {TLS_USER} 0123456789abcdef0123456789abcdef\r\n\
             AUTH PLAIN AHRsc3VzZXIAdGxzLXNlY3JldC00Mg==\r\nQUIT\r\n"
        )
        .as_bytes(),
    );
    for verb in CREDENTIAL_VERBS {
        assert_eq!(
            c.line(),
            "-ERR [AUTH] Encryption required: use STLS or port 995",
            "answer to {verb}"
        );
    }
    let rest = c.read_to_end();
    assert!(
        rest.is_empty(),
        "session went on after 4 denials: {:?}",
        String::from_utf8_lossy(&rest)
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(up.quit_count(), 0);
    assert!(
        received_verbs(&up, &["USER", "PASS", "APOP", "AUTH", "QUIT"]).is_empty(),
        "{:?}",
        received(&up)
    );
}

// ---------------------------------------------------------------------------------------------
// Acceptance: read-only.toml

/// `RETR 1 / DELE 1 / RETR 2 / QUIT` in one write: four responses in order, the DELE one the
/// local `-ERR [SYS/PERM]`, DELE never upstream, and the message stays.
#[test]
fn read_only_pipelined_batch_keeps_the_message() {
    let h = Harness::new();
    let msgs = tricky_messages(0);
    let archive = "archive@example.org";
    let other = "alice@example.org";
    let up = upstream(
        &h,
        vec![
            mailbox(archive, "arch-pass", msgs.clone()),
            mailbox(other, "alice-pass", msgs.clone()),
        ],
    );
    let p = proxy(&h, &up, &[&shipped_rules("read-only.toml")], None);

    let mut c = RawPop::connect(p.addr);
    login(&mut c, archive, "arch-pass");
    c.send_raw(b"RETR 1\r\nDELE 1\r\nRETR 2\r\nQUIT\r\n");
    let first = c.line();
    assert!(first.starts_with("+OK"), "RETR 1: {first}");
    assert!(unstuff(&c.body()) == msgs[0], "RETR 1 body");
    assert_eq!(c.line(), "-ERR [SYS/PERM] this mailbox is read-only");
    let third = c.line();
    assert!(third.starts_with("+OK"), "RETR 2: {third}");
    assert!(unstuff(&c.body()) == msgs[1], "RETR 2 body");
    let quit = c.line();
    assert!(quit.starts_with("+OK"), "QUIT: {quit}");
    let rest = c.read_to_end();
    assert!(
        rest.is_empty(),
        "more than four responses: {:?}",
        String::from_utf8_lossy(&rest)
    );
    wait_unlocked(&up, archive);
    assert_eq!(up.quit_count(), 1);
    assert!(up.messages(archive) == msgs, "the archive lost a message");
    assert!(
        received_verbs(&up, &["DELE"]).is_empty(),
        "{:?}",
        received(&up)
    );

    // A user the regex does not match deletes as usual.
    let mut c = RawPop::connect(p.addr);
    login(&mut c, other, "alice-pass");
    assert!(c.cmd("DELE 1").starts_with("+OK"));
    assert!(c.cmd("QUIT").starts_with("+OK"));
    wait_unlocked(&up, other);
    assert_eq!(up.messages(other), msgs[1..].to_vec());
}

// ---------------------------------------------------------------------------------------------
// Each action end to end

/// `allow` ends evaluation: the deny after it does not apply to alice; `deny` answers locally
/// with the code in brackets and the text, and the command never reaches the upstream.
#[test]
fn allow_stops_a_later_deny_and_deny_answers_locally() {
    let h = Harness::new();
    let up = upstream(
        &h,
        vec![
            mailbox("alice", "alice-pass", tricky_messages(0)),
            mailbox("bob", "bob-pass", tricky_messages(0)),
        ],
    );
    let rules = rule_file(
        r#"
[[rule]]
name = "alice-may-noop"
on = "command"
verbs = "NOOP"
user = '^alice$'
action = "allow"

[[rule]]
name = "no-noop"
on = "command"
verbs = "NOOP"
action = "deny"
code = "SYS/PERM"
message = "NOOP is not allowed here"
"#,
    );
    let p = proxy(&h, &up, &[&rules.path], None);

    let mut a = RawPop::connect(p.addr);
    login(&mut a, "alice", "alice-pass");
    assert_eq!(a.cmd("NOOP"), "+OK");
    let mut b = RawPop::connect(p.addr);
    login(&mut b, "bob", "bob-pass");
    assert_eq!(b.cmd("NOOP"), "-ERR [SYS/PERM] NOOP is not allowed here");
    // The session goes on after a denial.
    assert!(b.cmd("STAT").starts_with("+OK 2 "));
    assert!(a.cmd("QUIT").starts_with("+OK"));
    assert!(b.cmd("QUIT").starts_with("+OK"));
    assert_eq!(
        received_verbs(&up, &["NOOP"]).len(),
        1,
        "{:?}",
        received(&up)
    );
}

/// `rewrite` of a command's arguments: the upstream receives the rewritten line.
#[test]
fn rewrite_command_argument() {
    let (_h, up, _rules, p) = alice_with_rules(
        r#"
[[rule]]
name = "strip-domain"
on = "command"
verbs = "USER"
args = '@example\.org$'
action = "rewrite"
replace = '@example\.org$'
with = ""
"#,
    );
    let mut c = RawPop::connect(p.addr);
    login(&mut c, "alice@example.org", "alice-pass");
    assert!(c.cmd("STAT").starts_with("+OK 2 "));
    assert!(c.cmd("QUIT").starts_with("+OK"));
    let users = received_verbs(&up, &["USER"]);
    assert_eq!(users, vec!["USER alice\r\n".to_string()]);
}

/// `rewrite` of a response line (same status indicator), and a rewrite that would change the
/// indicator is ignored.
#[test]
fn rewrite_response_line() {
    let (_h, _up, _rules, p) = alice_with_rules(
        r#"
[[rule]]
name = "friendly-noop"
on = "response"
answers = "NOOP"
status = "ok"
action = "rewrite"
replace = '^\+OK.*$'
with = "+OK still here"

[[rule]]
name = "bad-stat"
on = "response"
answers = "STAT"
action = "rewrite"
with = "-ERR flipped"
"#,
    );
    let mut c = RawPop::connect(p.addr);
    login(&mut c, "alice", "alice-pass");
    assert_eq!(c.cmd("NOOP"), "+OK still here");
    assert!(c.cmd("STAT").starts_with("+OK 2 "), "indicator changed");
    // A multi-line answer after the rewritten lines is still framed right.
    let (status, body) = c.cmd_multi("LIST");
    assert!(status.starts_with("+OK"), "{status}");
    assert_eq!(body.unwrap().split(|b| *b == b'\n').count(), 3);
    assert!(c.cmd("QUIT").starts_with("+OK"));
}

/// hide-banner.toml: the greeting loses the server name but keeps the APOP timestamp, and an
/// APOP login by poplib through it works.
#[test]
fn hide_banner_rewrites_greeting_and_apop_still_works() {
    let h = Harness::new();
    let msgs = tricky_messages(0);
    let up = upstream(&h, vec![mailbox("alice", "alice-pass", msgs.clone())]);
    let direct = RawPop::connect(up.local_addr()).greeting;
    let banner = format!("+OK {} POP3 server ready <", popgate_demo::SERVER_NAME);
    assert!(direct.starts_with(&banner), "{direct}");
    let p = proxy(&h, &up, &[&shipped_rules("hide-banner.toml")], None);

    let mut spec = poplib_spec(p.addr, "alice", "alice-pass");
    spec["login"] = json!("apop");
    spec["actions"] = json!([["retr", 1], ["quit"]]);
    let r = poplib(spec);
    let welcome = r["welcome"].as_str().unwrap();
    // The banner is gone, the timestamp (<pid.n.clock@host>) is still there.
    let (text, stamp) = welcome.split_once('<').unwrap_or((welcome, ""));
    assert_eq!(text, "+OK POP3 server ready ", "greeting: {welcome}");
    assert!(
        stamp.ends_with('>') && stamp.contains('@'),
        "APOP timestamp lost: {welcome}"
    );
    assert_eq!(r["login"]["ok"], json!(true), "{}", clients::brief(&r));
    assert!(clients::b64(&r["results"][0]["data_b64"]) == msgs[0]);
    assert_eq!(received_verbs(&up, &["APOP"]).len(), 1);
}

/// CAPA `remove` drops an item, `add` appends one; the rest of the list is intact.
#[test]
fn capa_remove_and_add() {
    let (_h, _up, _rules, p) = alice_with_rules(
        r#"
[[rule]]
name = "no-top"
on = "capa"
text = '^TOP$'
action = "rewrite"
remove = true

[[rule]]
name = "advertise"
on = "capa"
action = "rewrite"
add = ["X-POLICY popgate"]
"#,
    );
    let mut c = RawPop::connect(p.addr);
    let (status, body) = c.cmd_multi("CAPA");
    assert!(status.starts_with("+OK"), "{status}");
    let body = String::from_utf8(body.unwrap()).unwrap();
    let items: Vec<&str> = body.lines().collect();
    assert!(!items.contains(&"TOP"), "{items:?}");
    assert!(items.contains(&"X-POLICY popgate"), "{items:?}");
    for keep in ["UIDL", "USER", "PIPELINING", "SASL PLAIN LOGIN"] {
        assert!(items.contains(&keep), "{keep} missing: {items:?}");
    }
    // The session is still in step after the rebuilt list.
    login(&mut c, "alice", "alice-pass");
    assert!(c.cmd("STAT").starts_with("+OK 2 "));
}

/// `drop` on connect: a client from a blocked /32 is closed without a greeting and the
/// upstream is never dialled.
#[test]
fn drop_on_connect() {
    let (_h, up, _rules, p) = alice_with_rules(
        r#"
[[rule]]
name = "block-loopback"
on = "connect"
client = ["127.0.0.1/32"]
action = "drop"
"#,
    );
    let mut c = RawPop::connect(p.addr);
    assert_eq!(c.greeting, "", "a dropped client got a greeting");
    assert!(c.read_to_end().is_empty());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(up.connections(), 0);
}

/// `drop` on a command: the connection closes without a reply, the upstream gets no QUIT and
/// nothing is deleted (not even what was marked before).
#[test]
fn drop_on_command() {
    let msgs = tricky_messages(0);
    let (_h, up, _rules, p) = alice_with_rules(
        r#"
[[rule]]
name = "drop-rset"
on = "command"
verbs = "RSET"
action = "drop"
"#,
    );
    let mut c = RawPop::connect(p.addr);
    login(&mut c, "alice", "alice-pass");
    assert!(c.cmd("DELE 1").starts_with("+OK"));
    c.send_raw(b"RSET\r\nQUIT\r\n");
    let rest = c.read_to_end();
    assert!(
        rest.is_empty(),
        "a dropped session answered: {:?}",
        String::from_utf8_lossy(&rest)
    );
    wait_unlocked(&up, "alice");
    assert_eq!(up.quit_count(), 0);
    assert!(
        received_verbs(&up, &["RSET", "QUIT"]).is_empty(),
        "{:?}",
        received(&up)
    );
    assert!(up.messages("alice") == msgs, "a message was deleted");
}

/// `delay` on a failed login: the `-ERR` comes after the tarpit; a good login is not delayed.
/// On tokio's paused clock: both durations asserted exactly, in no real time.
#[tokio::test(start_paused = true)]
async fn delay_tarpits_failed_logins() {
    use common::paused::{self, Pop, Popgate};
    use tokio::time::Instant;
    let up = paused::demo(ServerOptions {
        apop: true,
        ..ServerOptions::new(vec![mailbox("alice", "alice-pass", tricky_messages(0))])
    })
    .await;
    let rules = rule_file(
        r#"
[[rule]]
name = "tarpit"
on = "login"
status = "err"
action = "delay"
delay = "700ms"
"#,
    );
    let p = Popgate::start(&format!(
        "rules = [{:?}]\n[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n\
         [upstream]\naddress = \"{}\"\nconnect_timeout = \"2s\"\n",
        rules.path,
        up.local_addr()
    ))
    .await;
    let mut c = Pop::connect(p.addr).await;
    assert!(c.cmd("USER alice").await.starts_with("+OK"));
    let t0 = Instant::now();
    let r = c.cmd("PASS wrong").await;
    assert!(r.starts_with("-ERR"), "{r}");
    common::took(t0.elapsed(), Duration::from_millis(700));
    assert!(c.cmd("USER alice").await.starts_with("+OK"));
    let t0 = Instant::now();
    assert!(c.cmd("PASS alice-pass").await.starts_with("+OK"));
    common::took(t0.elapsed(), Duration::ZERO);
}

// ---------------------------------------------------------------------------------------------
// Safety

/// `LIST` rewritten to `LIST 1` gets a single-line answer and `UIDL 2` rewritten to `UIDL` a
/// listing: the proxy frames each by the command actually sent. Bytes are relayed as they
/// come, so a misframing would show in what the proxy itself does with the stream: the local
/// `-ERR` of the denied NOOP behind the rewritten command would come out of place, and the
/// STAT answer (rewritten by a response rule) would be taken for body and left alone.
#[test]
fn rewrite_changes_the_tracked_response_shape() {
    let msgs = tricky_messages(0);
    let (_h, up, _rules, p) = alice_with_rules(
        r#"
[[rule]]
name = "list-one"
on = "command"
verbs = "LIST"
args = '^$'
action = "rewrite"
with = "1"

[[rule]]
name = "uidl-all"
on = "command"
verbs = "UIDL"
args = '^2$'
action = "rewrite"
with = ""

[[rule]]
name = "no-noop"
on = "command"
verbs = "NOOP"
action = "deny"
message = "no NOOP"

[[rule]]
name = "mark-stat"
on = "response"
answers = "STAT"
action = "rewrite"
replace = '^\+OK '
with = "+OK stat: "
"#,
    );
    let size0 = msgs[0].len();
    let total: usize = msgs.iter().map(Vec::len).sum();

    // Multi-line turned single-line.
    let mut c = RawPop::connect(p.addr);
    login(&mut c, "alice", "alice-pass");
    c.send_raw(b"LIST\r\nNOOP\r\nSTAT\r\nQUIT\r\n");
    assert_eq!(c.line(), format!("+OK 1 {size0}"));
    assert_eq!(c.line(), "-ERR no NOOP");
    assert_eq!(c.line(), format!("+OK stat: 2 {total}"));
    assert!(c.line().starts_with("+OK"), "QUIT");
    let rest = c.read_to_end();
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    wait_unlocked(&up, "alice");

    // Single-line turned multi-line.
    let mut c = RawPop::connect(p.addr);
    login(&mut c, "alice", "alice-pass");
    c.send_raw(b"UIDL 2\r\nNOOP\r\nSTAT\r\nQUIT\r\n");
    let uidl = c.line();
    assert!(uidl.starts_with("+OK"), "{uidl}");
    let listing = String::from_utf8(c.body()).unwrap();
    assert_eq!(listing.lines().count(), 2, "{listing}");
    assert_eq!(c.line(), "-ERR no NOOP");
    assert_eq!(c.line(), format!("+OK stat: 2 {total}"));
    assert!(c.line().starts_with("+OK"), "QUIT");
    let rest = c.read_to_end();
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));

    let sent = received(&up);
    assert!(sent.contains(&"LIST 1\r\n".to_string()), "{sent:?}");
    assert!(sent.contains(&"UIDL\r\n".to_string()), "{sent:?}");
    assert!(received_verbs(&up, &["NOOP"]).is_empty(), "{sent:?}");
}

/// A greeting rewrite that loses the APOP timestamp gets it back (APOP logins keep working);
/// only `keep_apop = false` really drops it.
#[test]
fn greeting_rewrite_keeps_the_apop_timestamp_unless_told() {
    let h = Harness::new();
    let msgs = tricky_messages(0);
    let up = upstream(&h, vec![mailbox("alice", "alice-pass", msgs.clone())]);
    let rules = |keep: &str| {
        rule_file(&format!(
            "[[rule]]\nname = \"plain-greeting\"\non = \"greeting\"\naction = \"rewrite\"\n\
             with = \"+OK hello\"\n{keep}"
        ))
    };
    let kept = rules("");
    let p = proxy(&h, &up, &[&kept.path], None);
    let mut spec = poplib_spec(p.addr, "alice", "alice-pass");
    spec["login"] = json!("apop");
    spec["actions"] = json!([["retr", 1], ["quit"]]);
    let r = poplib(spec);
    let welcome = r["welcome"].as_str().unwrap();
    assert!(
        welcome.starts_with("+OK hello <") && welcome.ends_with('>'),
        "{welcome}"
    );
    assert_eq!(r["login"]["ok"], json!(true), "{}", clients::brief(&r));
    assert!(clients::b64(&r["results"][0]["data_b64"]) == msgs[0]);

    let dropped = rules("keep_apop = false\n");
    let p = proxy(&h, &up, &[&dropped.path], None);
    assert_eq!(RawPop::connect(p.addr).greeting, "+OK hello");
}

/// A denied command in the middle of a pipelined batch is answered in its position.
#[test]
fn denied_command_answers_in_position() {
    let msgs = tricky_messages(0);
    let (_h, up, _rules, p) = alice_with_rules(
        r#"
[[rule]]
name = "no-top"
on = "command"
verbs = "TOP"
action = "deny"
message = "TOP is off"
"#,
    );
    let mut c = RawPop::connect(p.addr);
    login(&mut c, "alice", "alice-pass");
    c.send_raw(b"STAT\r\nRETR 1\r\nTOP 1 0\r\nNOOP\r\nTOP 2 1\r\nLIST 2\r\nQUIT\r\n");
    assert!(c.line().starts_with("+OK 2 "), "STAT");
    assert!(c.line().starts_with("+OK"), "RETR");
    assert!(unstuff(&c.body()) == msgs[0]);
    assert_eq!(c.line(), "-ERR TOP is off");
    assert_eq!(c.line(), "+OK");
    assert_eq!(c.line(), "-ERR TOP is off");
    assert_eq!(c.line(), format!("+OK 2 {}", msgs[1].len()));
    assert!(c.line().starts_with("+OK"), "QUIT");
    assert!(c.read_to_end().is_empty());
    assert!(received_verbs(&up, &["TOP"]).is_empty());
}

// ---------------------------------------------------------------------------------------------
// The real binary: log, tag, reload

/// `popgate run` with `rules = ["policy.toml"]` (holding `policy`) next to its config and logs
/// in `log/`. Waits for the "listening" log line rather than probing the port: a probe would
/// be a session.
fn binary(upstream: SocketAddr, policy: &str) -> PopgateProcess {
    PopgateProcess::run(
        upstream,
        PopgateOpts::new()
            .top("rules = [\"policy.toml\"]\n")
            .file("policy.toml", policy)
            .log_to_dir("info")
            .wait_for_log(),
    )
}

/// `log` renders its template with {user} and {command} (PASS arguments as ***, the password
/// nowhere in the log); `tag` labels show in the "session closed" line.
#[test]
fn log_and_tag_in_the_real_binary() {
    let h = Harness::new();
    let secret = "Pa55-w0rd-not-for-logs";
    let up = upstream(&h, vec![mailbox("alice", secret, tricky_messages(0))]);
    let bin = binary(
        up.local_addr(),
        r#"
[[rule]]
name = "log-retr"
on = "command"
verbs = "RETR"
action = "log"
message = "rules-test: {user} fetched {command} from {client} on {listener}"

[[rule]]
name = "log-pass"
on = "command"
verbs = "PASS"
action = "log"
level = "warn"
message = "rules-test: login attempt {command} by {user}"

[[rule]]
name = "tag-retr"
on = "command"
verbs = "RETR"
action = "tag"
tags = ["rules-test", "fetched"]
scope = "session"

[[rule]]
name = "tag-close"
on = "close"
action = "tag"
tags = ["closing"]
"#,
    );
    let mut c = RawPop::connect(bin.addr);
    login(&mut c, "alice", secret);
    let (status, _) = c.cmd_multi("RETR 1");
    assert!(status.starts_with("+OK"), "{status}");
    assert!(c.cmd("QUIT").starts_with("+OK"));
    let log = bin.wait_log(r#"["rules-test","fetched","closing"]"#, 1);
    assert!(
        log.contains("rules-test: alice fetched RETR 1 from 127.0.0.1 on bin"),
        "{}",
        clients::tail(&log, 4000)
    );
    assert!(
        log.contains("rules-test: login attempt PASS *** by alice"),
        "{}",
        clients::tail(&log, 4000)
    );
    assert!(!log.contains(secret), "the password was logged");
    let closed = log
        .lines()
        .find(|l| l.contains("session closed") && l.contains("tags=["))
        .filter(|l| l.contains("\"rules-test\""))
        .unwrap_or_else(|| panic!("no tagged session closed line:\n{log}"));
    assert!(
        closed.contains(r#"tags=["rules-test","fetched","closing"]"#),
        "{closed}"
    );
}

const NOOP_DENY: &str = r#"
[[rule]]
name = "deny-noop"
on = "command"
verbs = "NOOP"
action = "deny"
message = "no NOOP (v2)"
"#;

/// SIGHUP swaps the rule set for new sessions only; a broken set is refused, logged, and the
/// last good one stays.
#[test]
fn sighup_reloads_rules_for_new_sessions_only() {
    let h = Harness::new();
    let up = upstream(
        &h,
        vec![
            mailbox("alice", "a-pass", tricky_messages(0)),
            mailbox("bob", "b-pass", tricky_messages(0)),
            mailbox("carol", "c-pass", tricky_messages(0)),
        ],
    );
    let bin = binary(
        up.local_addr(),
        r#"
[[rule]]
name = "deny-rset"
on = "command"
verbs = "RSET"
action = "deny"
message = "no RSET (v1)"
"#,
    );
    let mut a = RawPop::connect(bin.addr);
    login(&mut a, "alice", "a-pass");
    assert_eq!(a.cmd("NOOP"), "+OK");

    std::fs::write(bin.path("policy.toml"), NOOP_DENY).unwrap();
    bin.hup();
    bin.wait_log("reloaded: rules", 1);

    let mut b = RawPop::connect(bin.addr);
    login(&mut b, "bob", "b-pass");
    assert_eq!(b.cmd("NOOP"), "-ERR no NOOP (v2)");
    assert!(b.cmd("RSET").starts_with("+OK"), "v1 rule still applies");
    // Session A keeps the set it started with.
    assert_eq!(a.cmd("NOOP"), "+OK");
    assert_eq!(a.cmd("RSET"), "-ERR no RSET (v1)");

    // An invalid set is refused with a reason; the last good set stays in force.
    std::fs::write(
        bin.path("policy.toml"),
        "[[rule]]\nname = \"typo\"\non = \"command\"\nverb = \"NOOP\"\naction = \"deny\"\n",
    )
    .unwrap();
    bin.hup();
    let log = bin.wait_log("reload failed", 1);
    let failure = log.lines().find(|l| l.contains("reload failed")).unwrap();
    assert!(
        failure.contains("policy.toml") && failure.contains("verb"),
        "{failure}"
    );
    let mut c = RawPop::connect(bin.addr);
    login(&mut c, "carol", "c-pass");
    assert_eq!(c.cmd("NOOP"), "-ERR no NOOP (v2)");
    assert!(c.cmd("RSET").starts_with("+OK"));
    for s in [&mut a, &mut b, &mut c] {
        assert!(s.cmd("QUIT").starts_with("+OK"));
    }
    assert_eq!(
        bin.log().matches("reloaded: ").count(),
        1,
        "the broken set was loaded"
    );
}

/// The example config enables require-tls and passes `popgate check` (run from the repo root,
/// where its relative certificate and rule paths point).
#[test]
fn example_config_enables_require_tls() {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("popgate.toml"))
        .unwrap();
    let config = popgate::Config::parse(&text, Path::new("popgate.toml")).unwrap();
    assert_eq!(config.rules, vec!["rules/require-tls.toml".to_string()]);
    let mut cmd = Command::new(popgate_bin());
    cmd.args(["check", "--config", "popgate.toml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    let out = clients::run_bounded(&mut cmd, None, Duration::from_secs(20));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
