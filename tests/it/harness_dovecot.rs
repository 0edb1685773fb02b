//! The test harness against Dovecot directly (no proxy): proves that the Dovecot fixture and
//! the real-client drivers work, and pins down what each client really returns.
//!
//! Needs dovecot, curl, fetchmail, python3 and openssl: `cargo test -- --include-ignored`
//! after `.ci/run` (or apt-get) installed them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::clients::{
    RawPop, b64, b64_lines, brief, curl, curl_dele, curl_list, curl_ok, curl_retr, fetchmail,
    fetchmail_run, pop_raw, pop_raw_bytes, poplib, poplib_spec, url,
};
use common::dovecot::{Dovecot, DovecotOpts, alice_msgs, bob_msgs, dot_stuffed, msg_dots, served};
use serde_json::json;
use std::time::Duration;

fn start() -> Dovecot {
    Dovecot::start(
        DovecotOpts::default()
            .user("alice", "alice-secret", alice_msgs())
            .user("bob", "bob-secret", bob_msgs()),
    )
}

fn lines_crlf(body: &[u8]) -> Vec<&[u8]> {
    let mut v: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
    assert_eq!(v.pop(), Some(&b""[..]), "body must end with a line end");
    v.into_iter()
        .map(|l| l.strip_suffix(b"\r").expect("CRLF line"))
        .collect()
}

#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn curl_gets_crlf_unstuffed_bodies() {
    let dv = start();
    let msgs = alice_msgs();

    // LIST: "n size\r\n" lines only; sizes are of the CRLF form.
    let list = curl_list(dv.pop3, "alice", "alice-secret");
    let expect: String = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| format!("{} {}\r\n", i + 1, served(m).len()))
        .collect();
    assert_eq!(list, expect);

    // RETR: CRLF, dot-unstuffed, no +OK line, no final ".".
    for (i, m) in msgs.iter().enumerate() {
        let got = curl_retr(dv.pop3, "alice", "alice-secret", i + 1);
        assert!(got == served(m), "curl RETR {} differs", i + 1);
    }

    // Order of bob's twelve messages is the order given.
    for n in [1usize, 2, 10, 12] {
        let got = curl_retr(dv.pop3, "bob", "bob-secret", n);
        assert_eq!(
            got,
            format!("Subject: bob {n}\r\n\r\nmessage number {n}\r\n.line {n}\r\n").into_bytes()
        );
    }

    // A custom command with a multi-line answer prints the answer's lines (no +OK, no ".").
    let uidl = curl_ok(&[
        "-u",
        "alice:alice-secret",
        "-X",
        "UIDL",
        &url("pop3", dv.pop3, ""),
    ]);
    let uidl = String::from_utf8(uidl).unwrap();
    assert_eq!(uidl.lines().count(), 3, "{uidl}");
    assert!(uidl.starts_with("1 00000001"), "UIDL is %08Xu%08Xv: {uidl}");

    // Wrong password: curl exits 67 (login denied).
    let out = curl(&["-u", "alice:wrong", &url("pop3", dv.pop3, "1")]);
    assert_eq!(out.status.code(), Some(67), "{out:?}");

    assert_eq!(dv.message_count("alice"), 3);
    assert_eq!(dv.message_count("bob"), 12);

    // A message delivered while Dovecot runs comes after the others.
    dv.deliver(
        "alice",
        b"Subject: late

late arrival
",
    );
    assert_eq!(dv.message_count("alice"), 4);
    assert_eq!(
        curl_retr(dv.pop3, "alice", "alice-secret", 4),
        b"Subject: late\r\n\r\nlate arrival\r\n".to_vec()
    );
}

#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn poplib_user_and_apop() {
    let dv = start();
    let msgs = alice_msgs();

    let mut spec = poplib_spec(dv.pop3, "alice", "alice-secret");
    spec["actions"] = json!([
        ["stat"],
        ["list"],
        ["uidl"],
        ["retr", 1],
        ["retr", 2],
        ["retr", 3],
        ["top", 1, 0],
        ["list", 2],
        ["retr", 9],
        ["noop"],
        ["quit"]
    ]);
    let r = poplib(spec);
    assert!(
        r["welcome"].as_str().unwrap().starts_with("+OK"),
        "{}",
        brief(&r)
    );
    assert_eq!(r["login"]["ok"], true, "{}", brief(&r));
    let res = r["results"].as_array().unwrap();
    assert_eq!(res.len(), 11);
    let total: usize = msgs.iter().map(|m| served(m).len()).sum();
    assert_eq!(res[0]["count"], 3);
    assert_eq!(res[0]["size"], total);
    let list: Vec<Vec<u8>> = b64_lines(&res[1]);
    assert_eq!(
        list[1],
        format!("2 {}", served(&msgs[1]).len()).into_bytes()
    );
    assert_eq!(b64_lines(&res[2]).len(), 3);

    // RETR: lines without CRLF, dot-unstuffed; joined with CRLF they are the served message.
    for (i, m) in msgs.iter().enumerate() {
        let got = b64(&res[3 + i]["data_b64"]);
        assert!(got == served(m), "poplib RETR {} differs", i + 1);
    }
    let lines = b64_lines(&res[3]);
    let served0 = served(&msgs[0]);
    let want: Vec<&[u8]> = lines_crlf(&served0);
    assert_eq!(lines, want);
    assert!(lines.contains(&b".dot line".to_vec()));
    assert!(lines.contains(&b".".to_vec()));

    // TOP 1 0: the header and the blank line.
    let top = b64(&res[6]["data_b64"]);
    let head_len = served(&msgs[0])
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap()
        + 4;
    assert_eq!(top, served(&msgs[0])[..head_len].to_vec());
    assert!(res[7]["resp"].as_str().unwrap().starts_with("+OK 2 "));
    assert_eq!(res[8]["ok"], false);
    assert_eq!(res[8]["kind"], "error_proto");
    assert!(res[8]["error"].as_str().unwrap().starts_with("-ERR"));
    assert!(res[10]["resp"].as_str().unwrap().starts_with("+OK"));

    // APOP with the greeting's timestamp.
    let mut spec = poplib_spec(dv.pop3, "alice", "alice-secret");
    spec["login"] = json!("apop");
    spec["actions"] = json!([["retr", 2], ["quit"]]);
    let r = poplib(spec);
    assert_eq!(r["login"]["ok"], true, "{}", brief(&r));
    assert_eq!(b64(&r["results"][0]["data_b64"]), served(&msgs[1]));

    // Bad APOP digest: -ERR [AUTH].
    let mut spec = poplib_spec(dv.pop3, "alice", "wrong");
    spec["login"] = json!("apop");
    let r = poplib(spec);
    assert_eq!(r["login"]["ok"], false, "{}", brief(&r));
    assert!(r["login"]["error"].as_str().unwrap().starts_with("-ERR"));
    assert_eq!(dv.message_count("alice"), 3);
}

#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn fetchmail_keep_then_fetch_and_delete() {
    let dv = start();
    let msgs = alice_msgs();

    // --keep: everything delivered as stored (LF, unstuffed, no Received header), nothing deleted.
    let got = fetchmail(dv.pop3, "alice", "alice-secret", true, &[]);
    assert_eq!(got.len(), 3);
    for (i, m) in msgs.iter().enumerate() {
        assert!(got[i] == *m, "fetchmail message {} differs", i + 1);
    }
    assert_eq!(dv.message_count("alice"), 3);

    // Without --keep: delivered, then DELE + QUIT removes them.
    let run = fetchmail_run(dv.pop3, "bob", "bob-secret", false, &[]);
    assert_eq!(run.status, 0, "{run:?}");
    assert_eq!(run.messages, bob_msgs());
    assert!(run.stdout.contains("POP3> QUIT"), "{run:?}");
    assert_eq!(dv.message_count("bob"), 0);

    // Nothing left: exit 1, no messages.
    let run = fetchmail_run(dv.pop3, "bob", "bob-secret", false, &[]);
    assert_eq!(run.status, 1, "{run:?}");
    assert!(run.messages.is_empty());

    // Wrong password: exit 3 (authentication failed).
    let run = fetchmail_run(dv.pop3, "alice", "nope", true, &[]);
    assert_eq!(run.status, 3, "{run:?}");
}

#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn dele_counts_only_after_quit() {
    let dv = start();

    // DELE then close without QUIT: nothing deleted.
    let mut spec = poplib_spec(dv.pop3, "bob", "bob-secret");
    spec["actions"] = json!([["dele", 1], ["dele", 2], ["stat"], ["abort"]]);
    let r = poplib(spec);
    assert_eq!(r["results"][2]["count"], 10, "{}", brief(&r));
    assert!(r["implicit_quit"].is_null());
    wait_until(|| dv.message_count("bob") == 12);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(dv.message_count("bob"), 12);

    // DELE, RSET, QUIT: nothing deleted either.
    let mut spec = poplib_spec(dv.pop3, "bob", "bob-secret");
    spec["actions"] = json!([["dele", 1], ["rset"], ["quit"]]);
    poplib(spec);
    assert_eq!(dv.message_count("bob"), 12);

    // DELE then QUIT: gone.
    let mut spec = poplib_spec(dv.pop3, "bob", "bob-secret");
    spec["actions"] = json!([["dele", 1], ["quit"]]);
    let r = poplib(spec);
    assert!(r["results"][1]["resp"].as_str().unwrap().starts_with("+OK"));
    assert_eq!(dv.message_count("bob"), 11);

    // Raw pipelined DELE without QUIT, the client just goes away: nothing deleted.
    let out = pop_raw_bytes(
        dv.pop3,
        b"USER bob\r\nPASS bob-secret\r\nDELE 1\r\n",
        Duration::from_millis(500),
    );
    assert!(
        String::from_utf8_lossy(&out).contains("+OK Marked to be deleted."),
        "{}",
        String::from_utf8_lossy(&out)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(dv.message_count("bob"), 11);

    // curl's DELE sends QUIT after it.
    curl_dele(dv.pop3, "bob", "bob-secret", 1);
    assert_eq!(dv.message_count("bob"), 10);
    // What is message 1 now was message 3 at the start.
    assert_eq!(
        curl_retr(dv.pop3, "bob", "bob-secret", 1),
        b"Subject: bob 3\r\n\r\nmessage number 3\r\n.line 3\r\n".to_vec()
    );
}

#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn raw_pipelined_session_shows_dot_stuffing() {
    let dv = start();
    let m = msg_dots();
    let out = pop_raw(
        dv.pop3,
        &[
            "USER alice",
            "PASS alice-secret",
            "STAT",
            "RETR 1",
            "LIST 1",
            "QUIT",
        ],
    );
    let mut want = Vec::new();
    want.extend_from_slice(format!("+OK {} octets\r\n", served(&m).len()).as_bytes());
    want.extend_from_slice(&dot_stuffed(&served(&m)));
    want.extend_from_slice(b".\r\n");
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(
        out.windows(want.len()).any(|w| w == want.as_slice()),
        "{text}"
    );
    assert!(text.contains("\r\n..dot line\r\n...two dots\r\n..\r\n.. space\r\nend\r\n.\r\n"));
    assert!(text.ends_with("+OK Logging out.\r\n"), "{text}");

    // Step by step, with RawPop.
    let mut p = RawPop::connect(dv.pop3);
    assert!(p.greeting.starts_with("+OK"), "{}", p.greeting);
    assert!(p.greeting.contains('<'), "APOP timestamp in {}", p.greeting);
    let (st, capa) = p.cmd_multi("CAPA");
    assert_eq!(st, "+OK");
    let capa = String::from_utf8(capa.unwrap()).unwrap();
    assert!(capa.contains("STLS\r\n") && capa.contains("SASL PLAIN LOGIN CRAM-MD5\r\n"));
    assert!(p.cmd("USER alice").starts_with("+OK"));
    assert!(p.cmd("PASS alice-secret").starts_with("+OK"));
    let (st, body) = p.cmd_multi("RETR 1");
    assert!(st.starts_with("+OK"));
    assert_eq!(body.unwrap(), dot_stuffed(&served(&m)));
    p.abort();
}

#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn tls_pop3s_and_stls() {
    let dv = start();
    let msgs = alice_msgs();
    let ca = dv.ca_path().to_str().unwrap().to_string();

    // Implicit TLS (the 995-style port), poplib POP3_SSL trusting the test CA.
    let mut spec = poplib_spec(dv.pop3s, "alice", "alice-secret");
    spec["mode"] = json!("ssl");
    spec["cafile"] = json!(ca);
    spec["actions"] = json!([["retr", 1], ["quit"]]);
    let r = poplib(spec);
    assert_eq!(r["tls"], "ssl", "{}", brief(&r));
    assert_eq!(r["login"]["ok"], true, "{}", brief(&r));
    assert_eq!(b64(&r["results"][0]["data_b64"]), served(&msgs[0]));

    // Name checked against "localhost" too.
    let mut spec = poplib_spec(dv.pop3s, "alice", "alice-secret");
    spec["mode"] = json!("ssl");
    spec["cafile"] = json!(ca);
    spec["server_hostname"] = json!("localhost");
    spec["actions"] = json!([["stat"], ["quit"]]);
    assert_eq!(poplib(spec)["results"][0]["count"], 3);

    // Without the CA: the handshake fails.
    let mut spec = poplib_spec(dv.pop3s, "alice", "alice-secret");
    spec["mode"] = json!("ssl");
    let r = poplib(spec);
    let err = r["connect_error"]["error"].as_str().unwrap_or_default();
    assert!(err.contains("CERTIFICATE_VERIFY_FAILED"), "{}", brief(&r));

    // STLS on the plain port; afterwards CAPA no longer lists STLS.
    let mut spec = poplib_spec(dv.pop3, "alice", "alice-secret");
    spec["mode"] = json!("stls");
    spec["cafile"] = json!(ca);
    spec["actions"] = json!([["capa"], ["retr", 3], ["quit"]]);
    let r = poplib(spec);
    assert_eq!(r["tls"], "stls", "{}", brief(&r));
    assert!(
        r["results"][0]["capa"].get("STLS").is_none(),
        "{}",
        brief(&r)
    );
    assert!(b64(&r["results"][1]["data_b64"]) == served(&msgs[2]));

    // STLS by hand before login (login "none").
    let mut spec = poplib_spec(dv.pop3, "alice", "alice-secret");
    spec["login"] = json!("none");
    spec["cafile"] = json!(ca);
    spec["actions"] = json!([
        ["stls"],
        ["user", "alice"],
        ["pass", "alice-secret"],
        ["stat"],
        ["stls"],
        ["quit"]
    ]);
    let r = poplib(spec);
    assert_eq!(r["results"][3]["count"], 3, "{}", brief(&r));
    assert_eq!(
        r["results"][4]["ok"],
        false,
        "second STLS refused: {}",
        brief(&r)
    );

    // curl: STLS required and verified, and pop3s://.
    let up = "alice:alice-secret";
    let got = curl_ok(&[
        "--ssl-reqd",
        "--cacert",
        &ca,
        "-u",
        up,
        &url("pop3", dv.pop3, "2"),
    ]);
    assert_eq!(got, served(&msgs[1]));
    let got = curl_ok(&["--cacert", &ca, "-u", up, &url("pop3s", dv.pop3s, "1")]);
    assert_eq!(got, served(&msgs[0]));
    let out = curl(&["-u", up, &url("pop3s", dv.pop3s, "1")]);
    assert_eq!(out.status.code(), Some(60), "untrusted CA: {out:?}");

    // fetchmail: opportunistic STLS with the CA, and implicit TLS.
    // fetchmail matches the certificate against DNS names only (its CN / DNS SAN check
    // and OpenSSL's host check), never IP SANs: tell it the name to expect.
    let tls = ["--sslcertfile", ca.as_str(), "--sslcommonname", "localhost"];
    let got = fetchmail(dv.pop3, "alice", "alice-secret", true, &tls);
    assert!(got == msgs, "fetchmail over STLS: {} messages", got.len());
    let run = fetchmail_run(
        dv.pop3s,
        "alice",
        "alice-secret",
        true,
        &[
            "--ssl",
            "--sslcertfile",
            &ca,
            "--sslcommonname",
            "localhost",
        ],
    );
    assert_eq!(run.status, 0, "{run:?}");
    assert!(run.messages == msgs, "fetchmail over TLS: {run:?}");
    // Default (no --ssl* option) is plaintext: fetchmail says it skips the offered STLS.
    let run = fetchmail_run(dv.pop3, "alice", "alice-secret", true, &[]);
    assert!(run.output().contains("server offered STLS"), "{run:?}");
}

#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn ssl_required_refuses_plaintext_login() {
    let dv = Dovecot::start(DovecotOpts {
        ssl_required: true,
        ..DovecotOpts::default().user("alice", "alice-secret", alice_msgs())
    });
    assert_eq!(dv.pop3.ip().to_string(), "127.0.0.2");
    let ca = dv.ca_path().to_str().unwrap().to_string();

    let r = poplib(poplib_spec(dv.pop3, "alice", "alice-secret"));
    assert_eq!(r["login"]["ok"], false, "{}", brief(&r));
    assert!(
        r["login"]["error"]
            .as_str()
            .unwrap()
            .starts_with("-ERR [AUTH] Plaintext authentication disallowed"),
        "{}",
        brief(&r)
    );
    let mut spec = poplib_spec(dv.pop3, "alice", "alice-secret");
    spec["login"] = json!("apop");
    assert_eq!(poplib(spec)["login"]["ok"], false);

    let mut spec = poplib_spec(dv.pop3, "alice", "alice-secret");
    spec["mode"] = json!("stls");
    spec["cafile"] = json!(ca);
    spec["actions"] = json!([["stat"], ["quit"]]);
    let r = poplib(spec);
    assert_eq!(r["login"]["ok"], true, "{}", brief(&r));
    assert_eq!(r["results"][0]["count"], 3);

    let out = curl(&["-u", "alice:alice-secret", &url("pop3", dv.pop3, "")]);
    assert_eq!(out.status.code(), Some(67), "{out:?}");
    let got = curl_ok(&[
        "--ssl-reqd",
        "--cacert",
        &ca,
        "-u",
        "alice:alice-secret",
        &url("pop3", dv.pop3, "1"),
    ]);
    assert_eq!(got, served(&msg_dots()));
}

#[test]
#[ignore = "needs openssl"]
fn test_pki_issues_what_it_says() {
    use common::certs::TestPki;
    let pki = TestPki::new();
    let verify = |cert: &std::path::Path, extra: &[&str]| {
        let mut cmd = std::process::Command::new("openssl");
        cmd.arg("verify")
            .arg("-CAfile")
            .arg(&pki.ca_path)
            .args(extra)
            .arg(cert);
        common::clients::run_bounded(&mut cmd, None, Duration::from_secs(20))
            .status
            .success()
    };
    let (good, key) = pki.issue(&["localhost", "127.0.0.1", "::1"]);
    assert!(
        std::fs::read_to_string(key)
            .unwrap()
            .contains("PRIVATE KEY")
    );
    assert!(verify(&good, &[]));
    assert!(verify(&good, &["-verify_hostname", "localhost"]));
    assert!(verify(&good, &["-verify_ip", "127.0.0.1"]));
    assert!(verify(&good, &["-verify_ip", "::1"]));
    assert!(!verify(&good, &["-verify_hostname", "example.com"]));
    let (wrong, _) = pki.issue_wrong_name();
    assert!(verify(&wrong, &[]));
    assert!(!verify(&wrong, &["-verify_hostname", "localhost"]));
    let (expired, _) = pki.issue_expired(&["localhost"]);
    assert!(!verify(&expired, &[]));
    let (untrusted, _) = pki.issue_untrusted(&["localhost"]);
    assert!(!verify(&untrusted, &[]));
}

fn wait_until(f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !f() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}
