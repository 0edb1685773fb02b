//! TLS on both sides: every client mode × upstream mode with real clients (curl, poplib,
//! openssl s_client), STARTTLS injection on both sides, CAPA truth, verification, SNI, reload.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::certs::{TestPki, roots, rustls_server, tls_connect};
use common::clients::{self, curl, poplib, poplib_spec};
use common::proxy::{Harness, PopgateOpts, PopgateProcess, ProxyHandle, mailbox, tricky_messages};
use popgate_demo::{DemoServer, Faults, ServerOptions};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const USER: &str = "tlsuser";
const PASS: &str = "tls-pass-77";

struct Setup {
    h: Harness,
    pki: TestPki,
    up: DemoServer,
    msgs: Vec<Vec<u8>>,
}

/// A demo upstream speaking `up_mode` with a certificate from a fresh test CA.
fn setup(up_mode: &str, faults: Faults) -> Setup {
    let h = Harness::new();
    let pki = TestPki::new();
    let (cert, key) = pki.issue(&["localhost", "127.0.0.1"]);
    let msgs = tricky_messages(300_000);
    let up = h.upstream(ServerOptions {
        tls: Some(rustls_server(&cert, &key)),
        offer_stls: up_mode == "starttls",
        implicit_tls: up_mode == "implicit",
        faults,
        ..ServerOptions::new(vec![mailbox(USER, PASS, msgs.clone())])
    });
    Setup { h, pki, up, msgs }
}

fn proxy(s: &Setup, client_mode: &str, up_mode: &str, upstream_extra: &str) -> ProxyHandle {
    proxy_config(s, "", client_mode, up_mode, upstream_extra, "")
}

/// [`proxy`] with `top` before the listener (a `rules` line) and `tables` after the others.
fn proxy_config(
    s: &Setup,
    top: &str,
    client_mode: &str,
    up_mode: &str,
    upstream_extra: &str,
    tables: &str,
) -> ProxyHandle {
    let (cert, key) = s.pki.issue(&["localhost", "127.0.0.1", "::1"]);
    s.h.proxy_toml(&format!(
        "{top}[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\ntls = \"{client_mode}\"\n\
         [upstream]\naddress = \"{}\"\ntls = \"{up_mode}\"\nconnect_timeout = \"3s\"\n{}\n\
         [tls]\ncert = {cert:?}\nkey = {key:?}\n{tables}",
        s.up.local_addr(),
        if up_mode == "none" {
            upstream_extra.to_string()
        } else {
            format!(
                "ca_file = {:?}\nserver_name = \"localhost\"\n{upstream_extra}",
                s.pki.ca_path()
            )
        }
    ))
}

/// curl arguments that reach `addr` in `client_mode`, trusting the test CA.
fn curl_args(client_mode: &str, addr: SocketAddr, ca: &Path, path: &str) -> Vec<String> {
    let mut a = vec!["-u".to_string(), format!("{USER}:{PASS}")];
    match client_mode {
        "none" => a.push(clients::url("pop3", addr, path)),
        "starttls" => {
            a.extend([
                "--ssl-reqd".into(),
                "--cacert".into(),
                ca.display().to_string(),
            ]);
            a.push(clients::url("pop3", addr, path));
        }
        _ => {
            a.extend(["--cacert".into(), ca.display().to_string()]);
            a.push(clients::url("pop3s", addr, path));
        }
    }
    a
}

fn curl_fetch(client_mode: &str, addr: SocketAddr, ca: &Path, n: usize) -> Vec<u8> {
    let args = curl_args(client_mode, addr, ca, &n.to_string());
    clients::curl_ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn mode_pair(client_mode: &str, up_mode: &str) {
    let s = setup(up_mode, Faults::default());
    let p = proxy(&s, client_mode, up_mode, "");
    for (i, m) in s.msgs.iter().enumerate() {
        let got = curl_fetch(client_mode, p.addr, s.pki.ca_path(), i + 1);
        assert!(
            got == *m,
            "{client_mode}->{up_mode}: message {} differs",
            i + 1
        );
    }
    // Python's poplib too: POP3 / POP3.stls() / POP3_SSL.
    let mut spec = poplib_spec(p.addr, USER, PASS);
    spec["mode"] = json!(match client_mode {
        "none" => "plain",
        "starttls" => "stls",
        _ => "ssl",
    });
    spec["cafile"] = json!(s.pki.ca_path());
    spec["actions"] = json!([["retr", 1], ["retr", 2], ["quit"]]);
    let r = poplib(spec);
    assert_eq!(r["login"]["ok"], json!(true), "{r}");
    assert!(clients::b64(&r["results"][0]["data_b64"]) == s.msgs[0]);
    assert!(clients::b64(&r["results"][1]["data_b64"]) == s.msgs[1]);
    if client_mode != "none" {
        assert!(r["tls"].is_string(), "poplib did not use TLS: {r}");
    }
}

macro_rules! pairs {
    ($($name:ident: $c:literal, $u:literal;)*) => { $(
        #[test]
        fn $name() { mode_pair($c, $u); }
    )* };
}

pairs! {
    client_none_upstream_none: "none", "none";
    client_none_upstream_starttls: "none", "starttls";
    client_none_upstream_implicit: "none", "implicit";
    client_starttls_upstream_none: "starttls", "none";
    client_starttls_upstream_starttls: "starttls", "starttls";
    client_starttls_upstream_implicit: "starttls", "implicit";
    client_implicit_upstream_none: "implicit", "none";
    client_implicit_upstream_starttls: "implicit", "starttls";
    client_implicit_upstream_implicit: "implicit", "implicit";
}

/// `openssl s_client` with `-starttls pop3` and on the implicit port.
#[test]
fn openssl_s_client_both_modes() {
    let s = setup("none", Faults::default());
    for mode in ["starttls", "implicit"] {
        let p = proxy(&s, mode, "none", "");
        let mut cmd = Command::new("openssl");
        cmd.args(["s_client", "-connect", &p.addr.to_string(), "-CAfile"])
            .arg(s.pki.ca_path())
            .args([
                "-verify_return_error",
                "-quiet",
                "-verify_hostname",
                "localhost",
            ]);
        if mode == "starttls" {
            cmd.args(["-starttls", "pop3"]);
        }
        let input = format!("USER {USER}\r\nPASS {PASS}\r\nSTAT\r\nQUIT\r\n");
        let out = clients::run_bounded(&mut cmd, Some(input.as_bytes()), Duration::from_secs(20));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("+OK 3 "),
            "{mode}: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

async fn line<R: AsyncBufReadExt + Unpin>(r: &mut R) -> String {
    let mut l = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut l))
        .await
        .expect("line in time")
        .unwrap();
    l
}

/// A TLS session after STLS with a login injected behind it in the same write (`early`: sent
/// before the greeting is read): the greeting, STLS's `+OK` and nothing after it, then TLS.
async fn stls_with_an_injected_login(
    addr: SocketAddr,
    ca: &Path,
    early: bool,
) -> BufReader<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut r = BufReader::new(tcp);
    if !early {
        assert!(line(&mut r).await.starts_with("+OK"), "the greeting");
    }
    r.get_mut()
        .write_all(b"STLS\r\nUSER injected\r\nPASS injected\r\n")
        .await
        .unwrap();
    if early {
        assert!(line(&mut r).await.starts_with("+OK"), "the greeting");
    }
    assert!(line(&mut r).await.starts_with("+OK begin TLS"));
    assert!(r.buffer().is_empty(), "nothing answered after STLS");
    BufReader::new(tls_connect(r.into_inner(), ca).await)
}

/// The login under TLS on `r`, `then` pipelined behind it: USER and PASS answered `+OK`.
async fn log_in_under_tls(
    r: &mut BufReader<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    then: &str,
) {
    r.get_mut()
        .write_all(format!("USER {USER}\r\nPASS {PASS}\r\n{then}").as_bytes())
        .await
        .unwrap();
    assert!(line(r).await.starts_with("+OK"));
    assert!(line(r).await.starts_with("+OK"), "login under TLS");
}

/// Neither the injected plaintext nor the client's STLS reached the upstream.
fn assert_injection_not_relayed(up: &DemoServer) {
    let received = up.received();
    assert!(
        received.iter().all(|l| !l.ends_with(b"injected\r\n")),
        "injected plaintext reached the upstream: {received:?}"
    );
    assert!(
        received.iter().all(|l| !l.starts_with(b"STLS")),
        "STLS must never be relayed"
    );
}

/// A rule file holding `text` (kept as long as the handle) and the `rules` line naming it.
fn rules_file(text: &str) -> (common::proxy::RuleFile, String) {
    let file = common::proxy::rule_file(text);
    let line = format!("rules = [{:?}]\n", file.path);
    (file, line)
}

/// A connect rule that holds every connection 300 ms.
const SLOW_CONNECT: &str =
    "[[rule]]\nname = \"slow\"\non = \"connect\"\naction = \"delay\"\ndelay = \"300ms\"\n";

/// `STLS\r\nUSER x\r\n` in one write: the USER is discarded, never reaches the upstream.
#[test]
fn client_side_starttls_injection_is_discarded() {
    let s = setup("none", Faults::default());
    let p = proxy(&s, "starttls", "none", "");
    let ca = s.pki.ca_path().to_owned();
    let addr = p.addr;
    s.h.rt.block_on(async move {
        let mut r = stls_with_an_injected_login(addr, &ca, false).await;
        r.get_mut().write_all(b"CAPA\r\n").await.unwrap();
        let mut capa = String::new();
        loop {
            let l = line(&mut r).await;
            capa.push_str(&l);
            if l == ".\r\n" {
                break;
            }
        }
        assert!(!capa.contains("STLS"), "STLS offered after TLS: {capa}");
        log_in_under_tls(&mut r, "STLS\r\nQUIT\r\n").await;
        assert_eq!(line(&mut r).await, "-ERR already under TLS\r\n");
        assert!(line(&mut r).await.starts_with("+OK"));
    });
    assert_injection_not_relayed(&s.up);
}

/// The same injection sent before the greeting, during a connect rule's delay (kept by the
/// connect phase and handed to the session after it), under the shipped require-tls rules:
/// the greeting, then STLS's `+OK`; the plaintext USER/PASS after it is discarded (RFC 2595),
/// not answered and not relayed; the login under TLS works.
#[test]
fn starttls_injection_pipelined_during_a_connect_delay_is_discarded() {
    let s = setup("none", Faults::default());
    let require_tls = std::fs::read_to_string(common::shipped_rules("require-tls.toml")).unwrap();
    let (_dir, rules) = rules_file(&format!("{SLOW_CONNECT}{require_tls}"));
    let p = proxy_config(&s, &rules, "starttls", "none", "", "");
    let ca = s.pki.ca_path().to_owned();
    let addr = p.addr;
    s.h.rt.block_on(async move {
        // Before the greeting: during the rule's delay.
        let mut r = stls_with_an_injected_login(addr, &ca, true).await;
        log_in_under_tls(&mut r, "QUIT\r\n").await;
        assert!(line(&mut r).await.starts_with("+OK"));
    });
    assert_injection_not_relayed(&s.up);
}

/// The same injection sent while direct mode dials the upstream (a server slow to greet:
/// the client is read during the set-up, its bytes kept and relayed after the greeting),
/// under the shipped require-tls rules: the plaintext USER/PASS after STLS never reaches the
/// server, nor the STLS; the login under TLS works.
#[test]
fn starttls_injection_pipelined_during_the_upstream_dial_is_discarded() {
    let s = setup(
        "none",
        Faults {
            greeting_delay: Some(std::time::Duration::from_millis(300)),
            ..Faults::default()
        },
    );
    let require_tls = std::fs::read_to_string(common::shipped_rules("require-tls.toml")).unwrap();
    let (_dir, rules) = rules_file(&require_tls);
    let p = proxy_config(&s, &rules, "starttls", "none", "", "");
    let ca = s.pki.ca_path().to_owned();
    let addr = p.addr;
    s.h.rt.block_on(async move {
        // Before the greeting: during the dial.
        let mut r = stls_with_an_injected_login(addr, &ca, true).await;
        log_in_under_tls(&mut r, "QUIT\r\n").await;
        assert!(line(&mut r).await.starts_with("+OK"));
    });
    assert_injection_not_relayed(&s.up);
}

/// A shutdown while a client's STLS handshake is under way (the client answered `+OK` and
/// stalls): popgate does not wait for the handshake (`tls.handshake_timeout`, 30 s) nor give
/// the session up unrecorded after its close wait; the session ends at once, closed without a
/// word (there is no TLS to carry one), and its `session_close` says `shutdown`.
#[test]
fn a_shutdown_during_a_clients_stls_handshake_closes_it_at_once_and_audited() {
    let s = setup("none", Faults::default());
    let audit = tempfile::tempdir().unwrap();
    let tables = format!("[audit]\nenabled = true\ndir = {:?}\n", audit.path());
    let mut p = proxy_config(&s, "", "starttls", "none", "", &tables);
    let addr = p.addr;
    let mut r = s.h.rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut r = BufReader::new(tcp);
        assert!(line(&mut r).await.starts_with("+OK"));
        r.get_mut().write_all(b"STLS\r\n").await.unwrap();
        assert!(line(&mut r).await.starts_with("+OK begin TLS"));
        // No ClientHello: popgate waits in its handshake.
        r
    });
    std::thread::sleep(Duration::from_millis(200));
    p.shutdown_within(&s.h, Duration::from_secs(3), "a client's STLS handshake");
    let rest = s.h.rt.block_on(async move {
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), r.read_to_end(&mut rest)).await;
        rest
    });
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    let events = common::audit_events(audit.path());
    let kinds: Vec<&serde_json::Value> = events.iter().map(|e| &e["event"]).collect();
    assert_eq!(kinds, ["session_open", "session_close"], "{events:?}");
    assert_eq!(events[1]["reason"], "shutdown", "{events:?}");
    assert_eq!(s.up.quit_count(), 0);
}

/// On an implicit-TLS listener the connect rules run after the handshake: a client that
/// pipelines its login and QUIT under TLS during a connect rule's delay gets its greeting and
/// every answer after the delay, in order (the bytes kept were the TLS plaintext).
#[test]
fn commands_pipelined_under_implicit_tls_during_a_connect_delay_are_answered_after_it() {
    let s = setup("none", Faults::default());
    let (_dir, rules) = rules_file(SLOW_CONNECT);
    let p = proxy_config(&s, &rules, "implicit", "none", "", "");
    let ca = s.pki.ca_path().to_owned();
    let addr = p.addr;
    s.h.rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let t = std::time::Instant::now();
        let mut tls = tls_connect(tcp, &ca).await;
        tls.write_all(format!("USER {USER}\r\nPASS {PASS}\r\nSTAT\r\nQUIT\r\n").as_bytes())
            .await
            .unwrap();
        let mut r = BufReader::new(tls);
        assert!(line(&mut r).await.starts_with("+OK"), "the greeting");
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        assert!(line(&mut r).await.starts_with("+OK"), "USER");
        assert!(line(&mut r).await.starts_with("+OK"), "PASS");
        assert!(line(&mut r).await.starts_with("+OK "), "STAT");
        assert!(line(&mut r).await.starts_with("+OK"), "QUIT");
    });
    assert_eq!(s.up.quit_count(), 1);
}

/// The upstream sends plaintext right after its `+OK` to STLS: never relayed as a response.
#[test]
fn upstream_side_starttls_injection_is_discarded() {
    let s = setup(
        "starttls",
        Faults {
            stls_inject: Some(b"+OK INJECTED 1 1\r\n".to_vec()),
            ..Faults::default()
        },
    );
    let p = proxy(&s, "none", "starttls", "");
    let out = clients::pop_raw(
        p.addr,
        &[
            &format!("USER {USER}"),
            &format!("PASS {PASS}"),
            "STAT",
            "QUIT",
        ],
    );
    let text = String::from_utf8_lossy(&out);
    assert!(!text.contains("INJECTED"), "{text}");
    // Either the session works (injection discarded) or fails cleanly; here it must work,
    // since the injected bytes arrive with the +OK and are dropped before the handshake.
    assert!(text.contains("+OK 3 "), "{text}");
}

/// CAPA shows the truth about this hop.
#[test]
fn capa_is_rewritten_for_this_hop() {
    // Upstream offers STLS; a plain listener must not show it.
    let s = setup("starttls", Faults::default());
    let p = proxy(&s, "none", "none", "");
    let out = String::from_utf8_lossy(&clients::pop_raw(p.addr, &["CAPA", "QUIT"])).into_owned();
    assert!(
        out.contains("\r\nTOP\r\n") && !out.contains("STLS"),
        "{out}"
    );
    // A starttls listener in front of an upstream without STLS offers it before TLS.
    let s = setup("none", Faults::default());
    let p = proxy(&s, "starttls", "none", "");
    let out = String::from_utf8_lossy(&clients::pop_raw(p.addr, &["CAPA", "QUIT"])).into_owned();
    assert!(out.contains("\r\nSTLS\r\n.\r\n"), "{out}");
    // STLS after login is refused.
    let out = String::from_utf8_lossy(&clients::pop_raw(
        p.addr,
        &[
            &format!("USER {USER}"),
            &format!("PASS {PASS}"),
            "CAPA",
            "STLS",
            "QUIT",
        ],
    ))
    .into_owned();
    assert!(
        out.contains("-ERR STLS is only allowed before login"),
        "{out}"
    );
    let capa_after_login = out.split("\r\n.\r\n").next().unwrap();
    assert!(!capa_after_login.contains("STLS"), "{out}");
    // Implicit listener: STLS refused, not offered.
    let p = proxy(&s, "implicit", "none", "");
    let args = curl_args("implicit", p.addr, s.pki.ca_path(), "");
    let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
    a.extend(["-X", "STLS"]);
    let r = curl(&a);
    assert!(!r.status.success());
    assert!(s.up.received().iter().all(|l| !l.starts_with(b"STLS")));
}

/// The upstream's certificate is verified: wrong name and unknown CA are refused with
/// `-ERR [SYS/TEMP]`; `verify = false` accepts them.
#[test]
fn upstream_certificate_verification() {
    let h = Harness::new();
    let pki = TestPki::new();
    for (label, (cert, key), verify) in [
        ("wrong name", pki.issue_wrong_name(), true),
        ("unknown CA", pki.issue_untrusted(&["localhost"]), true),
        ("unverified", pki.issue_untrusted(&["localhost"]), false),
    ] {
        let up = h.upstream(ServerOptions {
            tls: Some(rustls_server(&cert, &key)),
            implicit_tls: true,
            ..ServerOptions::new(vec![mailbox(USER, PASS, tricky_messages(0))])
        });
        let p = h.proxy(
            up.local_addr(),
            &format!(
                "tls = \"implicit\"\nca_file = {:?}\nserver_name = \"localhost\"\nverify = {verify}\n",
                pki.ca_path()
            ),
        );
        let out = clients::pop_raw(p.addr, &[&format!("USER {USER}"), &format!("PASS {PASS}")]);
        let text = String::from_utf8_lossy(&out);
        if verify {
            assert!(text.starts_with("-ERR [SYS/TEMP]"), "{label}: {text}");
            assert!(
                up.received().is_empty(),
                "{label}: nothing may be sent to an unverified server"
            );
        } else {
            assert!(text.contains("+OK tlsuser"), "{label}: {text}");
        }
    }
}

/// `tls = "starttls"` upstream without STLS: an error, never a plaintext fall-back.
#[test]
fn upstream_without_stls_is_an_error_not_a_fallback() {
    let s = setup("none", Faults::default());
    let p = proxy(&s, "none", "starttls", "");
    let out = clients::pop_raw(p.addr, &[&format!("USER {USER}"), &format!("PASS {PASS}")]);
    assert!(
        out.starts_with(b"-ERR [SYS/TEMP]"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let received = s.up.received();
    assert_eq!(
        received,
        vec![b"STLS\r\n".to_vec()],
        "only STLS may have been sent"
    );
}

/// Several certificates chosen by SNI, plus the default.
#[test]
fn sni_selects_the_certificate() {
    let s = setup("none", Faults::default());
    let (c1, k1) = s.pki.issue(&["default.test"]);
    let (c2, k2) = s.pki.issue(&["mail.example.test"]);
    let (c3, k3) = s.pki.issue(&["wild.example.org"]);
    let p = s.h.proxy_toml(&format!(
        "[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\ntls = \"implicit\"\n\
         [upstream]\naddress = \"{}\"\n\
         [tls]\ncert = {c1:?}\nkey = {k1:?}\n\
         [[tls.certificate]]\nserver_names = [\"mail.example.test\"]\ncert = {c2:?}\nkey = {k2:?}\n\
         [[tls.certificate]]\nserver_names = [\"*.example.org\"]\ncert = {c3:?}\nkey = {k3:?}\n",
        s.up.local_addr()
    ));
    let ca = s.pki.ca_path();
    assert!(
        clients::served_cert_subject(p.addr, "mail.example.test", ca).contains("mail.example.test")
    );
    assert!(
        clients::served_cert_subject(p.addr, "imap.example.org", ca).contains("wild.example.org")
    );
    assert!(clients::served_cert_subject(p.addr, "other.test", ca).contains("default.test"));
}

/// RSA, ECDSA and Ed25519 keys (made by openssl) all serve.
#[test]
fn rsa_ecdsa_ed25519_keys() {
    let s = setup("none", Faults::default());
    let dir = tempfile::tempdir().unwrap();
    for (kind, args) in [
        ("rsa", vec!["-newkey", "rsa:2048"]),
        (
            "ecdsa",
            vec!["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
        ),
        ("ed25519", vec!["-newkey", "ed25519"]),
    ] {
        let cert = dir.path().join(format!("{kind}.crt"));
        let key = dir.path().join(format!("{kind}.key"));
        let st = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={kind}.test"),
            ])
            .args(&args)
            .args(["-addext", &format!("subjectAltName=DNS:{kind}.test")])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        let p = s.h.proxy_toml(&format!(
            "[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\ntls = \"implicit\"\n\
             [upstream]\naddress = \"{}\"\n[tls]\ncert = {cert:?}\nkey = {key:?}\n",
            s.up.local_addr()
        ));
        let subject = clients::served_cert_subject(p.addr, &format!("{kind}.test"), &cert);
        assert!(
            subject.contains(&format!("{kind}.test")),
            "{kind}: {subject}"
        );
    }
}

/// A renewed certificate + SIGHUP: new connections get it, an open session carries on.
#[test]
fn sighup_reloads_certificate_without_dropping_sessions() {
    let s = setup("none", Faults::default());
    let (c1, k1) = s.pki.issue(&["localhost", "first.test"]);
    let (c2, k2) = s.pki.issue(&["localhost", "second.test"]);
    let mut p = PopgateProcess::run(
        s.up.local_addr(),
        PopgateOpts::new()
            .listener("tls = \"implicit\"\n")
            .tables("[tls]\ncert = \"server.crt\"\nkey = \"server.key\"\n")
            .file("server.crt", std::fs::read(&c1).unwrap())
            .file("server.key", std::fs::read(&k1).unwrap()),
    );
    let (cert, key) = (p.path("server.crt"), p.path("server.key"));
    let addr = p.addr;
    let ca = s.pki.ca_path().to_owned();
    assert!(clients::served_cert_subject(addr, "localhost", &ca).contains("localhost"));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (tx_done, rx_done) = std::sync::mpsc::channel::<Vec<u8>>();
    let ca2 = ca.clone();
    // An open session, logged in before the reload, retrieving after it.
    let session = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut r = BufReader::new(tls_connect(tcp, &ca2).await);
            line(&mut r).await;
            r.get_mut()
                .write_all(format!("USER {USER}\r\nPASS {PASS}\r\n").as_bytes())
                .await
                .unwrap();
            line(&mut r).await;
            assert!(line(&mut r).await.starts_with("+OK"));
            rx.recv().unwrap();
            r.get_mut().write_all(b"RETR 1\r\nQUIT\r\n").await.unwrap();
            let mut all = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut all)).await;
            tx_done.send(all).unwrap();
        });
    });
    std::thread::sleep(Duration::from_millis(300));
    // A broken file first: the old certificate stays.
    std::fs::write(&cert, "garbage").unwrap();
    p.hup();
    std::thread::sleep(Duration::from_millis(300));
    let subject = clients::served_cert_subject(addr, "localhost", &ca);
    assert!(
        subject.contains("localhost"),
        "still served after a failed reload: {subject}"
    );
    std::fs::copy(&c2, &cert).unwrap();
    std::fs::copy(&k2, &key).unwrap();
    p.hup();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = openssl_san(addr, &ca);
        if text.contains("second.test") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "new certificate not served: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    tx.send(()).unwrap();
    let all = rx_done.recv_timeout(Duration::from_secs(20)).unwrap();
    session.join().unwrap();
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("+OK "), "{text}");
    assert!(
        text.contains("\r\n.\r\n+OK popgate-demo signing off"),
        "{text}"
    );
    p.kill();
    let err = p.stderr();
    assert!(
        err.contains("reload failed"),
        "broken file must be reported: {err}"
    );
    assert!(
        all.windows(5).any(|w| w == b"\r\n.\r\n"),
        "RETR after reload completed"
    );
    let _ = std::io::stdout().flush();
}

/// Subject alternative names of the certificate served at `addr`.
fn openssl_san(addr: SocketAddr, ca: &Path) -> String {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "openssl s_client -connect {addr} -servername localhost -CAfile {} </dev/null 2>/dev/null | openssl x509 -noout -ext subjectAltName",
        ca.display()
    ));
    let out = clients::run_bounded(&mut cmd, None, Duration::from_secs(20));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `client_cert`/`client_key`: popgate authenticates itself to an upstream that demands it;
/// without them the upstream refuses and the client gets `-ERR [SYS/TEMP]`.
#[test]
fn upstream_client_certificate() {
    let h = Harness::new();
    let pki = TestPki::new();
    let (cert, key) = pki.issue(&["localhost"]);
    let (client_cert, client_key) = pki.issue(&["popgate-client"]);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(pki.ca_path())),
        popgate::tls::provider(),
    )
    .build()
    .unwrap();
    let server = Arc::new(
        rustls::ServerConfig::builder_with_provider(popgate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                popgate::tls::load_certs(&cert).unwrap(),
                popgate::tls::load_key(&key).unwrap(),
            )
            .unwrap(),
    );
    let up = h.upstream(ServerOptions {
        tls: Some(server),
        implicit_tls: true,
        ..ServerOptions::new(vec![mailbox(USER, PASS, tricky_messages(0))])
    });
    let base = format!(
        "tls = \"implicit\"\nca_file = {:?}\nserver_name = \"localhost\"\n",
        pki.ca_path()
    );
    let without = h.proxy(up.local_addr(), &base);
    let out = clients::pop_raw(without.addr, &[&format!("USER {USER}")]);
    assert!(
        out.starts_with(b"-ERR [SYS/TEMP]"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert!(up.received().is_empty());
    let with = h.proxy(
        up.local_addr(),
        &format!("{base}client_cert = {client_cert:?}\nclient_key = {client_key:?}\n"),
    );
    let out = clients::pop_raw(
        with.addr,
        &[
            &format!("USER {USER}"),
            &format!("PASS {PASS}"),
            "STAT",
            "QUIT",
        ],
    );
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("+OK 2 "), "{text}");
}
