//! popgate in front of a real Dovecot (`dovecot-pop3d`): real clients through popgate get the
//! same bytes as the same clients direct to Dovecot; DELE is committed only by the client's
//! QUIT; SASL; TLS toward Dovecot (STLS and implicit, verified with the test CA, also against
//! an `ssl = required` Dovecot) and TLS toward the clients.
//!
//! Every test starts its own Dovecot (see tests/it/common/dovecot.rs) and popgate in-process.
//! Needs dovecot, curl, fetchmail and python3: `cargo test -- --include-ignored` after `.ci/run`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::certs::TestPki;
use common::clients::{
    RawPop, b64, brief, curl, curl_dele, curl_list, curl_ok, curl_retr, fetchmail, fetchmail_run,
    mpop_run, pop_raw, poplib, poplib_spec, url,
};
use common::dovecot::{Dovecot, DovecotOpts, alice_msgs, bob_msgs, dot_stuffed, msg_dots, served};
use common::proxy::{Harness, ProxyHandle};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Mail

const ALICE: (&str, &str) = ("alice", "alice-secret");
const BOB: (&str, &str) = ("bob", "bob-secret");

/// Dovecot with alice (the tricky messages), carol (the same messages again, for fetches that
/// delete) and bob (twelve small ones).
fn start_dovecot() -> Dovecot {
    Dovecot::start(opts())
}

fn opts() -> DovecotOpts {
    DovecotOpts::default()
        .user(ALICE.0, ALICE.1, alice_msgs())
        .user("carol", "carol-secret", alice_msgs())
        .user(BOB.0, BOB.1, bob_msgs())
}

// ---------------------------------------------------------------------------------------------
// popgate

/// popgate with one plain listener in front of `upstream`; `extra` goes into `[upstream]`.
fn plain_proxy(h: &Harness, upstream: SocketAddr, extra: &str) -> ProxyHandle {
    h.proxy(upstream, extra)
}

/// `[upstream]` keys for TLS toward Dovecot, verified with `ca` and the name `name`.
fn upstream_tls(mode: &str, ca: &Path, name: &str) -> String {
    format!("tls = \"{mode}\"\nca_file = {ca:?}\nserver_name = \"{name}\"\n")
}

/// popgate with three listeners (tls none, starttls, implicit, in that order in `addrs`) using
/// a certificate from `pki`, in front of `upstream` with `upstream_extra` in `[upstream]`.
fn three_listener_proxy(
    h: &Harness,
    pki: &TestPki,
    upstream: SocketAddr,
    upstream_extra: &str,
) -> ProxyHandle {
    let (cert, key) = pki.issue(&["localhost", "127.0.0.1", "::1"]);
    h.proxy_toml(&format!(
        "[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\ntls = \"none\"\n\
         [[listener]]\nname = \"stls\"\nbind = \"127.0.0.1:0\"\ntls = \"starttls\"\n\
         [[listener]]\nname = \"pop3s\"\nbind = \"127.0.0.1:0\"\ntls = \"implicit\"\n\
         [upstream]\naddress = \"{upstream}\"\nconnect_timeout = \"3s\"\n{upstream_extra}\n\
         [tls]\ncert = {cert:?}\nkey = {key:?}\n"
    ))
}

// ---------------------------------------------------------------------------------------------
// Dovecot's log

/// Lines of Dovecot's log containing `needle`.
fn log_lines(dv: &Dovecot, needle: &str) -> Vec<String> {
    dv.log()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// `Login: user=<user>` lines (one per successful login).
fn logins(dv: &Dovecot, user: &str) -> Vec<String> {
    log_lines(dv, &format!("Login: user=<{user}>"))
}

/// Session-end lines of `user`'s mail processes (`pop3(user)...: Disconnected: ...`).
fn disconnects(dv: &Dovecot, user: &str) -> Vec<String> {
    dv.log()
        .lines()
        .filter(|l| l.contains(&format!("pop3({user})")) && l.contains("Disconnected"))
        .map(str::to_string)
        .collect()
}

/// Waits (at most 10 s) until `f` holds; panics with `what` and Dovecot's log otherwise.
fn wait_for(dv: &Dovecot, what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}\n--- dovecot log ---\n{}",
            dv.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Byte-identical retrieval with curl, poplib and fetchmail

#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn curl_through_popgate_is_byte_identical() {
    let dv = start_dovecot();
    let h = Harness::new();
    let p = plain_proxy(&h, dv.pop3, "");
    let msgs = alice_msgs();
    let (u, pw) = ALICE;

    let via = curl_list(p.addr, u, pw);
    let direct = curl_list(dv.pop3, u, pw);
    assert_eq!(via, direct, "LIST");
    assert_eq!(via.lines().count(), 3);

    for (i, m) in msgs.iter().enumerate() {
        let via = curl_retr(p.addr, u, pw, i + 1);
        let direct = curl_retr(dv.pop3, u, pw, i + 1);
        assert_eq!(via.len(), direct.len(), "RETR {} length", i + 1);
        assert!(via == direct, "RETR {} differs through popgate", i + 1);
        assert!(via == served(m), "RETR {} is not the stored message", i + 1);
    }
    assert!(served(&msgs[2]).len() >= 3_000_000);

    // UIDL and TOP as custom commands: curl prints the listing lines.
    let up = format!("{u}:{pw}");
    for cmd in ["UIDL", "TOP 3 5"] {
        let args = ["-u", &up, "-X", cmd, &url("pop3", p.addr, "")];
        let via = curl_ok(&args);
        let args = ["-u", &up, "-X", cmd, &url("pop3", dv.pop3, "")];
        let direct = curl_ok(&args);
        assert!(!via.is_empty());
        assert!(via == direct, "{cmd} differs through popgate");
    }
    // curl logged in with CRAM-MD5 (the best mechanism Dovecot lists) through popgate too.
    assert!(
        logins(&dv, u).iter().all(|l| l.contains("method=CRAM-MD5")),
        "{:#?}",
        logins(&dv, u)
    );
    assert_eq!(dv.message_count(u), 3);
}

#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn poplib_user_and_apop_through_popgate_are_byte_identical() {
    let dv = start_dovecot();
    let h = Harness::new();
    let p = plain_proxy(&h, dv.pop3, "");
    let msgs = alice_msgs();
    let (u, pw) = ALICE;

    for login in ["user", "apop"] {
        let mut spec_via = poplib_spec(p.addr, u, pw);
        spec_via["login"] = json!(login);
        spec_via["actions"] = json!([
            ["stat"],
            ["list"],
            ["uidl"],
            ["retr", 1],
            ["retr", 2],
            ["retr", 3],
            ["top", 1, 0],
            ["top", 3, 10],
            ["list", 2],
            ["uidl", 3],
            ["retr", 9],
            ["noop"],
            ["quit"]
        ]);
        let mut spec_direct = spec_via.clone();
        spec_direct["port"] = json!(dv.pop3.port());
        let via = poplib(spec_via);
        let direct = poplib(spec_direct);
        assert_eq!(via["login"]["ok"], true, "{login}: {}", brief(&via));
        assert_eq!(via["login"], direct["login"], "{login}");
        assert_eq!(
            via["results"],
            direct["results"],
            "{login}: via {} direct {}",
            brief(&via),
            brief(&direct)
        );
        for (i, m) in msgs.iter().enumerate() {
            let got = b64(&via["results"][3 + i]["data_b64"]);
            assert!(got == served(m), "poplib {login}: RETR {} differs", i + 1);
        }
        assert_eq!(via["results"][10]["ok"], false, "RETR 9 is -ERR");
        // The APOP timestamp reached the client unchanged (else the digest could not match).
        let welcome = via["welcome"].as_str().unwrap();
        assert!(
            welcome.starts_with("+OK") && welcome.contains('<'),
            "{welcome}"
        );
    }
    // Dovecot's log process may write a moment after the client is done.
    wait_for(&dv, "two APOP logins in Dovecot's log", || {
        log_lines(&dv, "method=APOP").len() >= 2
    });
    assert_eq!(log_lines(&dv, "method=APOP").len(), 2, "{}", dv.log());
    assert_eq!(dv.message_count(u), 3);

    // A wrong APOP digest through popgate is refused the same way.
    let mut spec = poplib_spec(p.addr, u, "wrong");
    spec["login"] = json!("apop");
    let r = poplib(spec);
    assert_eq!(r["login"]["ok"], false, "{}", brief(&r));
    assert!(
        r["login"]["error"].as_str().unwrap().starts_with("-ERR"),
        "{}",
        brief(&r)
    );
}

#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn fetchmail_keep_then_delete_through_popgate_is_byte_identical() {
    let dv = start_dovecot();
    let h = Harness::new();
    let p = plain_proxy(&h, dv.pop3, "");
    let msgs = alice_msgs();

    // --keep: direct and through popgate deliver the same bytes; nothing is deleted.
    let direct = fetchmail(dv.pop3, ALICE.0, ALICE.1, true, &[]);
    let via = fetchmail(p.addr, ALICE.0, ALICE.1, true, &[]);
    assert_eq!(via.len(), 3);
    assert!(via == direct, "fetchmail --keep through popgate differs");
    assert!(via == msgs, "fetchmail did not deliver the stored messages");
    assert_eq!(dv.message_count(ALICE.0), 3);

    // Without --keep: carol direct, alice through popgate (same messages); both are emptied.
    let direct = fetchmail_run(dv.pop3, "carol", "carol-secret", false, &[]);
    let via = fetchmail_run(p.addr, ALICE.0, ALICE.1, false, &[]);
    assert_eq!(via.status, 0, "{via:?}");
    assert_eq!(direct.status, 0, "{direct:?}");
    assert!(
        via.messages == direct.messages,
        "fetchmail --nokeep differs"
    );
    assert!(via.messages == msgs);
    assert!(via.stdout.contains("POP3> QUIT"), "{via:?}");
    assert_eq!(dv.message_count(ALICE.0), 0, "DELE + QUIT through popgate");
    assert_eq!(dv.message_count("carol"), 0);

    // Nothing left: exit 1 through popgate as direct.
    let via = fetchmail_run(p.addr, ALICE.0, ALICE.1, false, &[]);
    assert_eq!(via.status, 1, "{via:?}");
    assert!(via.messages.is_empty());

    // Wrong password: exit 3 (authentication failed), as direct.
    let via = fetchmail_run(p.addr, BOB.0, "nope", true, &[]);
    assert_eq!(via.status, 3, "{via:?}");
    assert_eq!(dv.message_count(BOB.0), 12);
}

/// mpop (pipelining, USER/PASS): with `keep on` the same bytes through popgate as direct,
/// nothing deleted; with `keep off` everything delivered and deleted.
#[test]
#[ignore = "needs dovecot and mpop (run .ci/run)"]
fn mpop_keep_then_delete_through_popgate_is_byte_identical() {
    let dv = start_dovecot();
    let h = Harness::new();
    let p = plain_proxy(&h, dv.pop3, "");
    let msgs = alice_msgs();

    let direct = mpop_run(dv.pop3, ALICE.0, ALICE.1, true, &[]);
    let via = mpop_run(p.addr, ALICE.0, ALICE.1, true, &[]);
    assert_eq!(direct.status, 0, "{direct:?}");
    assert_eq!(via.status, 0, "{via:?}");
    assert!(
        via.messages == direct.messages,
        "mpop keep on through popgate differs"
    );
    assert!(
        via.messages == msgs,
        "mpop did not deliver the stored messages: {via:?}"
    );
    assert_eq!(dv.message_count(ALICE.0), 3);

    let via = mpop_run(p.addr, ALICE.0, ALICE.1, false, &[]);
    assert_eq!(via.status, 0, "{via:?}");
    assert!(via.messages == msgs);
    assert!(via.stdout.contains("--> DELE 3"), "{via:?}");
    assert_eq!(dv.message_count(ALICE.0), 0, "DELE + QUIT through popgate");
}

// ---------------------------------------------------------------------------------------------
// 2. Pipelining

#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn pipelined_session_is_byte_identical() {
    let dv = start_dovecot();
    let h = Harness::new();
    let p = plain_proxy(&h, dv.pop3, "");
    let script = [
        "USER alice",
        "PASS alice-secret",
        "STAT",
        "LIST",
        "UIDL",
        "RETR 1",
        "TOP 2 0",
        "RETR 3",
        "DELE 1",
        "LIST 1",
        "RETR 9",
        "RSET",
        "LIST 1",
        "NOOP",
        "QUIT",
    ];
    let direct = pop_raw(dv.pop3, &script);
    let via = pop_raw(p.addr, &script);

    // Dovecot's greeting carries a per-connection APOP timestamp; everything else must match.
    let split = |b: &[u8]| {
        let nl = b.iter().position(|&c| c == b'\n').expect("greeting line");
        (b[..=nl].to_vec(), b[nl + 1..].to_vec())
    };
    let (g_direct, rest_direct) = split(&direct);
    let (g_via, rest_via) = split(&via);
    let shape = |g: &[u8]| {
        let s = String::from_utf8_lossy(g).into_owned();
        s.split('<').next().unwrap_or_default().to_string()
    };
    assert_eq!(shape(&g_via), shape(&g_direct), "greeting text");
    assert!(
        g_via.ends_with(b">\r\n"),
        "{}",
        String::from_utf8_lossy(&g_via)
    );
    assert_eq!(
        rest_via.len(),
        rest_direct.len(),
        "pipelined answers length"
    );
    assert!(rest_via == rest_direct, "pipelined answers differ");

    // And they are what they should be: the dot-stuffed message in full, RETR 9 refused.
    let m1 = served(&msg_dots());
    let mut want = format!("+OK {} octets\r\n", m1.len()).into_bytes();
    want.extend_from_slice(&dot_stuffed(&m1));
    want.extend_from_slice(b".\r\n");
    assert!(rest_via.windows(want.len()).any(|w| w == want.as_slice()));
    let text = String::from_utf8_lossy(&rest_via);
    assert!(
        text.contains("+OK Marked to be deleted.\r\n"),
        "{}",
        tail(&text)
    );
    assert!(
        text.contains("-ERR Message is deleted.\r\n"),
        "{}",
        tail(&text)
    );
    assert!(
        text.contains("-ERR There's no message 9.\r\n"),
        "{}",
        tail(&text)
    );
    assert!(text.ends_with("+OK Logging out.\r\n"), "{}", tail(&text));
    assert_eq!(dv.message_count(ALICE.0), 3, "RSET undid the DELE");
}

fn tail(s: &str) -> &str {
    common::clients::tail(s, 2000)
}

// ---------------------------------------------------------------------------------------------
// 3. Data safety: DELE is committed only by the client's QUIT

/// A python3 client that logs in to `addr`, marks messages 1 and 2 deleted and waits to be
/// killed. With `unread`, it sends a NOOP whose answer it never reads, so that the kernel
/// resets the connection (RST) when the process dies, rather than closing it (FIN).
fn spawn_dele_client(addr: SocketAddr, unread: bool) -> std::process::Child {
    const SCRIPT: &str = r#"
import socket, sys, time
host, port, unread = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
s = socket.create_connection((host, port), timeout=20)
f = s.makefile("rb")
print(f.readline().decode("latin-1").rstrip(), flush=True)
for c in [b"USER bob", b"PASS bob-secret", b"DELE 1", b"DELE 2", b"STAT"]:
    s.sendall(c + b"\r\n")
    print(f.readline().decode("latin-1").rstrip(), flush=True)
if unread:
    s.sendall(b"NOOP\r\n")
    time.sleep(0.5)
print("READY", flush=True)
time.sleep(60)
"#;
    Command::new("python3")
        .args([
            "-c",
            SCRIPT,
            &addr.ip().to_string(),
            &addr.port().to_string(),
        ])
        .arg(if unread { "1" } else { "0" })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn python3 client")
}

/// Runs [`spawn_dele_client`] until it is READY, checks what it saw, and SIGKILLs it.
fn kill_client_after_dele(addr: SocketAddr, unread: bool) {
    let mut child = spawn_dele_client(addr, unread);
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line == "READY" => break,
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("dele client not ready in time; it saw {seen:#?}");
            }
        }
    }
    assert_eq!(seen.len(), 6, "{seen:#?}");
    assert!(seen[0].starts_with("+OK"), "{seen:#?}");
    assert!(seen[1..].iter().all(|l| l.starts_with("+OK")), "{seen:#?}");
    assert!(seen[3].contains("Marked to be deleted"), "{seen:#?}");
    assert!(
        seen[5].starts_with("+OK 10 "),
        "STAT hides the two: {seen:#?}"
    );
    child.kill().expect("SIGKILL the client");
    let _ = child.wait();
}

#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn killed_client_after_dele_deletes_nothing() {
    let dv = start_dovecot();
    let h = Harness::new();
    let p = plain_proxy(&h, dv.pop3, "");
    let (u, pw) = BOB;
    let mut sessions = 0;
    let ended = |n: usize| {
        let dv = &dv;
        move || disconnects(dv, u).len() >= n
    };

    // The client process is SIGKILLed after DELE 1, DELE 2: once with a clean FIN, once with
    // unread data so that the kernel sends RST.
    for unread in [false, true] {
        kill_client_after_dele(p.addr, unread);
        sessions += 1;
        wait_for(&dv, "dovecot ends the killed session", ended(sessions));
        assert_eq!(dv.message_count(u), 12, "killed client (unread {unread})");
    }

    // The client closes its socket without QUIT (poplib's abort after DELE).
    let mut spec = poplib_spec(p.addr, u, pw);
    spec["actions"] = json!([["dele", 1], ["dele", 2], ["stat"], ["abort"]]);
    let r = poplib(spec);
    assert_eq!(r["results"][2]["count"], 10, "{}", brief(&r));
    sessions += 1;
    wait_for(&dv, "dovecot ends the aborted session", ended(sessions));
    assert_eq!(dv.message_count(u), 12, "aborted client");

    // Half-close (FIN from the client, still reading): no QUIT either.
    let mut c = RawPop::connect(p.addr);
    assert!(c.cmd("USER bob").starts_with("+OK"));
    assert!(c.cmd("PASS bob-secret").starts_with("+OK"));
    assert!(c.cmd("DELE 3").starts_with("+OK"));
    c.abort();
    sessions += 1;
    wait_for(&dv, "dovecot ends the half-closed session", ended(sessions));
    assert_eq!(dv.message_count(u), 12, "half-closed client");

    // None of these sessions reached UPDATE: Dovecot logged no "Logged out" for bob, only
    // "Disconnected: Connection closed ... del=0/12" (its count of messages really deleted).
    let ends = disconnects(&dv, u);
    assert_eq!(ends.len(), sessions, "{ends:#?}");
    for l in &ends {
        assert!(
            !l.contains("Logged out"),
            "a session without QUIT entered UPDATE: {l}"
        );
        assert!(l.contains("Disconnected: Connection closed"), "{l}");
        // Dovecot counts only the deletions it carried out: none.
        assert!(l.contains(" del=0/12,"), "{l}");
    }

    // DELE + QUIT through popgate really deletes (bob 1 and bob 2).
    let mut spec = poplib_spec(p.addr, u, pw);
    spec["actions"] = json!([["dele", 1], ["dele", 2], ["quit"]]);
    let r = poplib(spec);
    assert!(
        r["results"][2]["resp"].as_str().unwrap().starts_with("+OK"),
        "{}",
        brief(&r)
    );
    assert_eq!(dv.message_count(u), 10);
    sessions += 1;
    wait_for(&dv, "dovecot logs the QUIT session", ended(sessions));
    let last = disconnects(&dv, u).pop().unwrap();
    assert!(last.contains("Logged out"), "{last}");
    assert!(last.contains("del=2/12"), "{last}");

    // curl's DELE (then QUIT) through popgate: bob 3 goes; message 1 is bob 4 now.
    curl_dele(p.addr, u, pw, 1);
    assert_eq!(dv.message_count(u), 9);
    assert_eq!(
        curl_retr(p.addr, u, pw, 1),
        b"Subject: bob 4\r\n\r\nmessage number 4\r\n.line 4\r\n".to_vec()
    );
}

/// popgate's own reasons to end a session (its idle timeout, its shutdown) close the upstream
/// connection without QUIT: Dovecot deletes nothing.
#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn popgate_idle_timeout_and_shutdown_delete_nothing() {
    let dv = start_dovecot();
    let h = Harness::new();
    let (u, pw) = BOB;

    // Idle timeout after DELE.
    let p = h.proxy(dv.pop3, "[limits]\nidle_timeout = \"2s\"\n");
    let mut c = RawPop::connect(p.addr);
    assert!(c.cmd(&format!("USER {u}")).starts_with("+OK"));
    assert!(c.cmd(&format!("PASS {pw}")).starts_with("+OK"));
    assert!(c.cmd("DELE 1").starts_with("+OK"));
    assert!(c.cmd("DELE 2").starts_with("+OK"));
    let started = Instant::now();
    let rest = c.read_to_end();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "idle timeout did not close the session"
    );
    wait_for(&dv, "dovecot ends the idle session", || {
        disconnects(&dv, u).len() == 1
    });
    assert_eq!(
        dv.message_count(u),
        12,
        "after idle timeout; client got {rest:?}"
    );
    drop(p);

    // Proxy shutdown after DELE.
    let mut p = plain_proxy(&h, dv.pop3, "");
    let mut c = RawPop::connect(p.addr);
    assert!(c.cmd(&format!("USER {u}")).starts_with("+OK"));
    assert!(c.cmd(&format!("PASS {pw}")).starts_with("+OK"));
    assert!(c.cmd("DELE 1").starts_with("+OK"));
    p.shutdown(&h);
    let _ = c.read_to_end();
    wait_for(&dv, "dovecot ends the session cut by shutdown", || {
        disconnects(&dv, u).len() == 2
    });
    assert_eq!(dv.message_count(u), 12, "after proxy shutdown");
    for l in disconnects(&dv, u) {
        assert!(l.contains(" del=0/12,"), "{l}");
        assert!(
            !l.contains("Logged out"),
            "UPDATE without the client's QUIT: {l}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. SASL

#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn sasl_plain_and_login_through_popgate() {
    let dv = start_dovecot();
    let h = Harness::new();
    let p = plain_proxy(&h, dv.pop3, "");
    let msgs = alice_msgs();
    let up = format!("{}:{}", ALICE.0, ALICE.1);

    // curl: AUTH PLAIN as continuation (curl's default) and with an initial response
    // (--sasl-ir), AUTH LOGIN both ways, CRAM-MD5 (challenge from Dovecot through popgate).
    let cases: [(&str, &[&str], &str, &str); 5] = [
        ("AUTH=PLAIN", &[], "> AUTH PLAIN\r", "PLAIN"),
        ("AUTH=PLAIN", &["--sasl-ir"], "> AUTH PLAIN A", "PLAIN"),
        ("AUTH=LOGIN", &[], "> AUTH LOGIN\r", "LOGIN"),
        ("AUTH=LOGIN", &["--sasl-ir"], "> AUTH LOGIN ", "LOGIN"),
        ("AUTH=CRAM-MD5", &[], "> AUTH CRAM-MD5\r", "CRAM-MD5"),
    ];
    for (opt, extra, sent, method) in cases {
        let before = log_lines(&dv, &format!("method={method},")).len();
        for (addr, label) in [(dv.pop3, "direct"), (p.addr, "via popgate")] {
            let target = url("pop3", addr, "2");
            let mut args = vec!["-v", "-u", &up, "--login-options", opt];
            args.extend_from_slice(extra);
            args.push(&target);
            let out = curl(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "{label} {opt} {extra:?}: {}\n{stderr}",
                out.status
            );
            assert!(
                stderr.contains(sent),
                "{label}: curl did not send {sent:?}\n{stderr}"
            );
            assert!(out.stdout == served(&msgs[1]), "{label} {opt} {extra:?}");
        }
        let count = || log_lines(&dv, &format!("method={method},")).len();
        wait_for(&dv, &format!("two {method} logins logged"), || {
            count() >= before + 2
        });
        assert_eq!(count(), before + 2, "Dovecot logged two {method} logins");
    }

    // Raw SASL dialogues, step by step; the answers through popgate equal the direct ones.
    let enc = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    let plain = enc(b"\0alice\0alice-secret");
    let wrong = enc(b"\0alice\0wrong");
    let dialogue = |addr: SocketAddr| -> Vec<String> {
        let mut out = Vec::new();
        // PLAIN without initial response: "+ " continuation, then the credentials.
        let mut c = RawPop::connect(addr);
        out.push(c.cmd("AUTH PLAIN"));
        out.push(c.cmd(&plain));
        out.push(c.cmd("STAT"));
        out.push(c.cmd("QUIT"));
        // PLAIN with initial response.
        let mut c = RawPop::connect(addr);
        out.push(c.cmd(&format!("AUTH PLAIN {plain}")));
        out.push(c.cmd("LIST 3"));
        out.push(c.cmd("QUIT"));
        // LOGIN: user and password as continuations.
        let mut c = RawPop::connect(addr);
        out.push(c.cmd("AUTH LOGIN"));
        out.push(c.cmd(&enc(b"alice")));
        out.push(c.cmd(&enc(b"alice-secret")));
        out.push(c.cmd("STAT"));
        out.push(c.cmd("QUIT"));
        // Cancelled with "*", then USER/PASS on the same connection.
        let mut c = RawPop::connect(addr);
        out.push(c.cmd("AUTH PLAIN"));
        out.push(c.cmd("*"));
        out.push(c.cmd("USER alice"));
        out.push(c.cmd("PASS alice-secret"));
        out.push(c.cmd("STAT"));
        out.push(c.cmd("QUIT"));
        out
    };
    let direct = dialogue(dv.pop3);
    let via = dialogue(p.addr);
    assert_eq!(via, direct);
    let total: usize = msgs.iter().map(|m| served(m).len()).sum();
    let stat = format!("+OK 3 {total}");
    assert_eq!(via[0], "+ ", "{via:#?}");
    assert!(via[1].starts_with("+OK"), "{via:#?}");
    assert_eq!(via[2], stat);
    assert!(via[4].starts_with("+OK"), "{via:#?}");
    assert_eq!(via[5], format!("+OK 3 {}", served(&msgs[2]).len()));
    assert_eq!(via[7], "+ VXNlcm5hbWU6", "Username: challenge");
    assert_eq!(via[8], "+ UGFzc3dvcmQ6", "Password: challenge");
    assert!(via[9].starts_with("+OK"), "{via:#?}");
    assert_eq!(via[10], stat);
    assert_eq!(via[12], "+ ");
    assert!(via[13].starts_with("-ERR"), "cancel: {via:#?}");
    assert!(via[15].starts_with("+OK"), "{via:#?}");
    assert_eq!(via[16], stat);

    // A wrong password as a continuation gets Dovecot's -ERR [AUTH] through popgate (only
    // once, through popgate: after a failure Dovecot delays further logins from the same
    // address for seconds, its auth penalty).
    let mut c = RawPop::connect(p.addr);
    assert_eq!(c.cmd("AUTH PLAIN"), "+ ");
    assert_eq!(c.cmd(&wrong), "-ERR [AUTH] Authentication failed.");
    assert!(c.cmd("QUIT").starts_with("+OK"));
}

// ---------------------------------------------------------------------------------------------
// 5. Upstream TLS toward Dovecot

/// Retrieves alice's mail with curl and poplib (USER and APOP) through `p` and compares it
/// with the same clients direct to Dovecot at `direct` (plaintext); `None` for an
/// `ssl = required` Dovecot, which refuses that: then it compares with the stored messages.
/// Returns how many logins went through popgate (6).
fn assert_retrieval_identical(p: &ProxyHandle, direct: Option<SocketAddr>, label: &str) -> usize {
    let msgs = alice_msgs();
    let (u, pw) = ALICE;
    let want_list = match direct {
        Some(d) => curl_list(d, u, pw),
        None => msgs
            .iter()
            .enumerate()
            .map(|(i, m)| format!("{} {}\r\n", i + 1, served(m).len()))
            .collect(),
    };
    assert_eq!(curl_list(p.addr, u, pw), want_list, "{label}: LIST");
    for (i, m) in msgs.iter().enumerate() {
        let via = curl_retr(p.addr, u, pw, i + 1);
        assert!(via == served(m), "{label}: curl RETR {} differs", i + 1);
    }
    for login in ["user", "apop"] {
        let mut spec = poplib_spec(p.addr, u, pw);
        spec["login"] = json!(login);
        spec["actions"] = json!([["stat"], ["uidl"], ["retr", 1], ["retr", 3], ["quit"]]);
        let via = poplib(spec.clone());
        assert_eq!(via["login"]["ok"], true, "{label} {login}: {}", brief(&via));
        assert!(b64(&via["results"][2]["data_b64"]) == served(&msgs[0]));
        assert!(b64(&via["results"][3]["data_b64"]) == served(&msgs[2]));
        if let Some(d) = direct {
            spec["port"] = json!(d.port());
            spec["host"] = json!(d.ip().to_string());
            let direct = poplib(spec);
            assert_eq!(via["results"], direct["results"], "{label} {login}");
        }
    }
    6
}

/// Login lines of `user` that say the session was under TLS.
fn tls_logins(dv: &Dovecot, user: &str) -> usize {
    logins(dv, user)
        .iter()
        .filter(|l| l.contains(", TLS"))
        .count()
}

#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn upstream_starttls_and_implicit_tls_to_dovecot() {
    let dv = start_dovecot();
    let h = Harness::new();
    for (mode, addr) in [("starttls", dv.pop3), ("implicit", dv.pop3s)] {
        let p = plain_proxy(&h, addr, &upstream_tls(mode, dv.ca_path(), "localhost"));
        let before = tls_logins(&dv, ALICE.0);
        let via = assert_retrieval_identical(&p, Some(dv.pop3), mode);
        // Every login through popgate went over TLS (Dovecot says "TLS" in the login line;
        // the direct plaintext ones say "secured", as loopback counts as secure).
        wait_for(&dv, "the TLS logins logged", || {
            tls_logins(&dv, ALICE.0) >= before + via
        });
        assert_eq!(tls_logins(&dv, ALICE.0), before + via, "{}", dv.log());
        // fetchmail through it, too.
        let got = fetchmail(p.addr, ALICE.0, ALICE.1, true, &[]);
        assert!(got == alice_msgs(), "{mode}: fetchmail differs");
    }
    assert_eq!(dv.message_count(ALICE.0), 3);
}

#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn ssl_required_dovecot_works_through_upstream_tls() {
    let dv = Dovecot::start(DovecotOpts {
        ssl_required: true,
        ..opts()
    });
    let h = Harness::new();
    let ca = dv.ca_path().to_str().unwrap().to_string();
    let (u, pw) = ALICE;
    let msgs = alice_msgs();

    // Direct plaintext logins are refused.
    let r = poplib(poplib_spec(dv.pop3, u, pw));
    assert_eq!(r["login"]["ok"], false, "{}", brief(&r));
    assert!(
        r["login"]["error"]
            .as_str()
            .unwrap()
            .contains("Plaintext authentication disallowed"),
        "{}",
        brief(&r)
    );
    let out = curl(&["-u", "alice:alice-secret", &url("pop3", dv.pop3, "1")]);
    assert_eq!(out.status.code(), Some(67), "{out:?}");
    // ... and so they are through popgate with a plaintext upstream hop.
    let p = plain_proxy(&h, dv.pop3, "");
    let r = poplib(poplib_spec(p.addr, u, pw));
    assert_eq!(r["login"]["ok"], false, "{}", brief(&r));
    drop(p);
    assert!(logins(&dv, u).is_empty(), "{}", dv.log());

    // popgate's upstream TLS makes the same plaintext clients work.
    for (mode, addr) in [("starttls", dv.pop3), ("implicit", dv.pop3s)] {
        let p = plain_proxy(&h, addr, &upstream_tls(mode, dv.ca_path(), "localhost"));
        assert_retrieval_identical(&p, None, mode);
        // Byte-identical to a direct fetch that does its own TLS.
        for (i, m) in msgs.iter().enumerate() {
            let n = (i + 1).to_string();
            let direct = curl_ok(&[
                "--ssl-reqd",
                "--cacert",
                &ca,
                "-u",
                "alice:alice-secret",
                &url("pop3", dv.pop3, &n),
            ]);
            let via = curl_retr(p.addr, u, pw, i + 1);
            assert!(via == direct && via == served(m), "{mode}: RETR {n}");
        }
        let got = fetchmail(p.addr, u, pw, true, &[]);
        assert!(got == msgs, "{mode}: fetchmail");
    }
    let all = logins(&dv, u);
    assert!(!all.is_empty());
    assert!(all.iter().all(|l| l.contains(", TLS")), "{all:#?}");
}

#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn upstream_wrong_name_or_unknown_ca_is_refused() {
    let dv = start_dovecot();
    let h = Harness::new();
    let other = TestPki::new();
    for (mode, addr) in [("starttls", dv.pop3), ("implicit", dv.pop3s)] {
        for (label, ca, name) in [
            ("wrong name", dv.ca_path(), "wrong.invalid"),
            ("unknown CA", other.ca_path(), "localhost"),
        ] {
            let p = plain_proxy(&h, addr, &upstream_tls(mode, ca, name));
            let out = pop_raw(p.addr, &["USER alice", "PASS alice-secret", "STAT", "QUIT"]);
            let text = String::from_utf8_lossy(&out);
            assert!(
                text.starts_with("-ERR [SYS/TEMP]"),
                "{mode}, {label}: client got {text:?}"
            );
            assert_eq!(
                text.lines().count(),
                1,
                "{mode}, {label}: then a close: {text:?}"
            );
            let out = curl(&["-u", "alice:alice-secret", &url("pop3", p.addr, "1")]);
            assert!(!out.status.success(), "{mode}, {label}: curl got {out:?}");
            assert!(out.stdout.is_empty());
        }
    }
    // Give Dovecot's log a moment, then: no login happened at all.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        log_lines(&dv, "Login:").is_empty(),
        "credentials reached an unverified server:\n{}",
        dv.log()
    );
    assert!(log_lines(&dv, "method=").is_empty(), "{}", dv.log());
}

// ---------------------------------------------------------------------------------------------
// 6. Client-side TLS in front of Dovecot

/// curl arguments for `mode` ("none" | "starttls" | "implicit") to `addr`, trusting `ca`.
fn curl_tls_args(mode: &str, addr: SocketAddr, ca: &Path, path: &str) -> Vec<String> {
    let mut a = vec!["-u".to_string(), format!("{}:{}", ALICE.0, ALICE.1)];
    let ca = ca.display().to_string();
    match mode {
        "none" => a.push(url("pop3", addr, path)),
        "starttls" => a.extend([
            "--ssl-reqd".into(),
            "--cacert".into(),
            ca,
            url("pop3", addr, path),
        ]),
        _ => a.extend(["--cacert".into(), ca, url("pop3s", addr, path)]),
    }
    a
}

fn curl_tls(mode: &str, addr: SocketAddr, ca: &Path, path: &str) -> Vec<u8> {
    let args = curl_tls_args(mode, addr, ca, path);
    curl_ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Every client mode (plain, STLS, implicit TLS) × every upstream mode toward Dovecot, with
/// curl: the same bytes as curl direct to Dovecot in the same client mode.
#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn client_tls_modes_times_upstream_modes_with_dovecot() {
    let dv = start_dovecot();
    let h = Harness::new();
    let pki = TestPki::new();
    let msgs = alice_msgs();
    let modes = ["none", "starttls", "implicit"];

    // Direct, in each client mode.
    let direct_addr = |mode: &str| {
        if mode == "implicit" {
            dv.pop3s
        } else {
            dv.pop3
        }
    };
    let mut direct = Vec::new();
    for mode in modes {
        let a = direct_addr(mode);
        let list = curl_tls(mode, a, dv.ca_path(), "");
        let bodies: Vec<Vec<u8>> = (1..=msgs.len())
            .map(|n| curl_tls(mode, a, dv.ca_path(), &n.to_string()))
            .collect();
        for (i, m) in msgs.iter().enumerate() {
            assert!(bodies[i] == served(m), "direct {mode}: RETR {}", i + 1);
        }
        direct.push((list, bodies));
    }

    for up_mode in modes {
        let extra = if up_mode == "none" {
            String::new()
        } else {
            upstream_tls(up_mode, dv.ca_path(), "localhost")
        };
        let p = three_listener_proxy(&h, &pki, direct_addr(up_mode), &extra);
        for (k, mode) in modes.iter().enumerate() {
            let addr = p.addrs[k];
            let label = format!("client {mode} -> upstream {up_mode}");
            let list = curl_tls(mode, addr, pki.ca_path(), "");
            assert_eq!(list, direct[k].0, "{label}: LIST");
            for n in 1..=msgs.len() {
                let got = curl_tls(mode, addr, pki.ca_path(), &n.to_string());
                assert!(got == direct[k].1[n - 1], "{label}: RETR {n} differs");
            }
        }
        // curl refuses popgate's certificate without the test CA (TLS really is popgate's).
        let out = curl(&[
            "-u",
            "alice:alice-secret",
            "--ssl-reqd",
            &url("pop3", p.addrs[1], "1"),
        ]);
        assert_eq!(out.status.code(), Some(60), "STLS without CA: {out:?}");
        let out = curl(&["-u", "alice:alice-secret", &url("pop3s", p.addrs[2], "1")]);
        assert_eq!(out.status.code(), Some(60), "pop3s without CA: {out:?}");
    }
    assert_eq!(dv.message_count(ALICE.0), 3);
}

/// poplib's `stls()` and `POP3_SSL` and fetchmail (STLS and implicit TLS) through popgate to
/// Dovecot: the same messages as direct to Dovecot with the same kind of TLS.
#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn poplib_and_fetchmail_tls_clients_in_front_of_dovecot() {
    let dv = start_dovecot();
    let h = Harness::new();
    let pki = TestPki::new();
    let p = three_listener_proxy(&h, &pki, dv.pop3, "");
    let msgs = alice_msgs();
    let (u, pw) = ALICE;

    let run = |addr: SocketAddr, mode: &str, ca: &Path| -> Value {
        let mut spec = poplib_spec(addr, u, pw);
        spec["mode"] = json!(mode);
        spec["cafile"] = json!(ca);
        spec["server_hostname"] = json!("localhost");
        spec["actions"] = json!([
            ["capa"],
            ["stat"],
            ["retr", 1],
            ["retr", 2],
            ["retr", 3],
            ["quit"]
        ]);
        poplib(spec)
    };
    for (mode, k, direct_addr) in [("stls", 1, dv.pop3), ("ssl", 2, dv.pop3s)] {
        let via = run(p.addrs[k], mode, pki.ca_path());
        let direct = run(direct_addr, mode, dv.ca_path());
        assert_eq!(via["tls"], mode, "{}", brief(&via));
        assert_eq!(via["login"]["ok"], true, "{}", brief(&via));
        assert!(
            via["results"][0]["capa"].get("STLS").is_none(),
            "{}",
            brief(&via)
        );
        assert_eq!(via["results"][1], direct["results"][1], "{mode}: STAT");
        for i in 0..3 {
            let got = b64(&via["results"][2 + i]["data_b64"]);
            assert!(
                got == b64(&direct["results"][2 + i]["data_b64"]),
                "{mode}: RETR {}",
                i + 1
            );
            assert!(got == served(&msgs[i]));
        }
    }

    let ca = pki.ca_path().to_str().unwrap();
    let dca = dv.ca_path().to_str().unwrap();
    // STLS: fetchmail upgrades on its own when CAPA lists STLS.
    let via = fetchmail_run(
        p.addrs[1],
        u,
        pw,
        true,
        &[
            "--sslcertck",
            "--sslcertfile",
            ca,
            "--sslcommonname",
            "localhost",
        ],
    );
    let direct = fetchmail(
        dv.pop3,
        u,
        pw,
        true,
        &[
            "--sslcertck",
            "--sslcertfile",
            dca,
            "--sslcommonname",
            "localhost",
        ],
    );
    assert_eq!(via.status, 0, "{via:?}");
    assert!(via.stdout.contains("POP3> STLS"), "{via:?}");
    assert!(
        via.messages == direct && via.messages == msgs,
        "fetchmail STLS"
    );
    // Implicit TLS.
    let via = fetchmail_run(
        p.addrs[2],
        u,
        pw,
        true,
        &[
            "--ssl",
            "--sslcertck",
            "--sslcertfile",
            ca,
            "--sslcommonname",
            "localhost",
        ],
    );
    assert_eq!(via.status, 0, "{via:?}");
    assert!(via.messages == msgs, "fetchmail implicit TLS");
    assert_eq!(dv.message_count(u), 3);
}
