//! A legacy server without CAPA (issue 18.9): popa3d and the demo server's `no_capa` mode
//! answer `CAPA` with `-ERR`. Relayed, that hides STLS, and curl `--ssl-reqd` (exit 64), Python
//! poplib's `stls()` and fetchmail (`server refused CAPA`) cannot start TLS. popgate answers
//! such a server's refusal with its own list (USER, STLS where the listener offers it), so
//! each of them upgrades with STLS and fetches the same bytes as a plain fetch direct from
//! the server.
//!
//! The popa3d tests need root and popa3d unpacked by `.ci/run` (see tests/it/common/popa3d.rs);
//! the fetchmail ones need fetchmail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::net::SocketAddr;

use common::certs::TestPki;
use common::clients::{
    RawPop, b64, curl_ok, curl_retr, fetchmail, fetchmail_run, poplib, poplib_spec, url,
};
use common::popa3d::Popa3d;
use common::proxy::{Harness, ProxyHandle, mailbox, tricky_messages};
use popgate_demo::{DemoServer, ServerOptions};
use serde_json::json;

const USER: &str = "pgnocapa";
const PASS: &str = "no-capa-pw-7";

/// popgate with one `starttls` listener (certificate for localhost/127.0.0.1 from `pki`) in
/// front of `upstream`.
fn popgate(h: &Harness, pki: &TestPki, upstream: SocketAddr) -> ProxyHandle {
    popgate_with(h, pki, upstream, "")
}

/// [`popgate`] with top-level keys first (`rules = [...]`).
fn popgate_with(h: &Harness, pki: &TestPki, upstream: SocketAddr, top: &str) -> ProxyHandle {
    let (cert, key) = pki.issue(&["localhost", "127.0.0.1", "::1"]);
    h.proxy_toml(&format!(
        "{top}[[listener]]\nname = \"stls\"\nbind = \"127.0.0.1:0\"\ntls = \"starttls\"\n\
         [upstream]\naddress = \"{upstream}\"\nconnect_timeout = \"3s\"\nuser_names = \"exact\"\n\
         [tls]\ncert = {cert:?}\nkey = {key:?}\n"
    ))
}

fn demo_no_capa(h: &Harness, messages: Vec<Vec<u8>>) -> DemoServer {
    h.upstream(ServerOptions {
        no_capa: true,
        ..ServerOptions::new(vec![mailbox(USER, PASS, messages)])
    })
}

/// The upstream refuses CAPA; through popgate CAPA lists STLS, and after STLS no longer.
fn assert_capa_shows_stls(server: SocketAddr, proxy: SocketAddr) {
    let mut direct = RawPop::connect(server);
    assert!(
        direct.cmd("CAPA").starts_with("-ERR"),
        "the server has no CAPA"
    );
    direct.cmd("QUIT");
    let mut c = RawPop::connect(proxy);
    let (status, body) = c.cmd_multi("CAPA");
    assert!(status.starts_with("+OK"), "{status}");
    let body = String::from_utf8(body.unwrap()).unwrap();
    assert_eq!(body, "USER\r\nSTLS\r\n", "{body}");
    c.cmd("QUIT");
}

/// curl `--ssl-reqd` through popgate: every message byte-identical to plain curl direct.
fn curl_through(server: SocketAddr, proxy: SocketAddr, ca: &str, count: usize) {
    let up = format!("{USER}:{PASS}");
    for n in 1..=count {
        let direct = curl_retr(server, USER, PASS, n);
        let via = curl_ok(&[
            "-u",
            &up,
            "--ssl-reqd",
            "--cacert",
            ca,
            &url("pop3", proxy, &n.to_string()),
        ]);
        assert!(!direct.is_empty());
        assert!(via == direct, "curl: message {n} differs");
    }
}

/// poplib `stls()` through popgate: the same messages as poplib in plaintext direct.
fn poplib_through(server: SocketAddr, proxy: SocketAddr, ca: &str, count: usize) {
    let retrs: Vec<_> = (1..=count).map(|n| json!(["retr", n])).collect();
    let mut direct = poplib_spec(server, USER, PASS);
    direct["actions"] = json!(retrs);
    let direct = poplib(direct);
    let mut via = poplib_spec(proxy, USER, PASS);
    via["mode"] = json!("stls");
    via["cafile"] = json!(ca);
    via["server_hostname"] = json!("localhost");
    via["actions"] = json!(retrs);
    let via = poplib(via);
    assert_eq!(via["tls"], json!("stls"), "{via}");
    assert_eq!(via["login"]["ok"], json!(true), "{via}");
    for n in 0..count {
        let (d, v) = (&direct["results"][n], &via["results"][n]);
        assert_eq!(v["ok"], json!(true), "poplib retr {}: {v}", n + 1);
        assert!(
            b64(&d["data_b64"]) == b64(&v["data_b64"]),
            "poplib message {} differs",
            n + 1
        );
    }
}

/// fetchmail `--sslproto tls1.2+` (STLS required) through popgate, `--keep`: the same messages
/// as a plaintext fetchmail direct.
fn fetchmail_through(server: SocketAddr, proxy: SocketAddr, ca: &str, count: usize) {
    let direct = fetchmail(server, USER, PASS, true, &[]);
    assert_eq!(direct.len(), count);
    let r = fetchmail_run(
        proxy,
        USER,
        PASS,
        true,
        &[
            "--sslproto",
            "tls1.2+",
            "--sslcertck",
            "--sslcertfile",
            ca,
            "--sslcommonname",
            "localhost",
        ],
    );
    assert_eq!(r.status, 0, "{r:?}");
    let out = r.output();
    assert!(out.contains("POP3> STLS"), "no STLS sent: {r:?}");
    assert!(out.contains("upgrade to TLS succeeded"), "{r:?}");
    assert_eq!(r.messages.len(), count, "{r:?}");
    for (i, (got, want)) in r.messages.iter().zip(&direct).enumerate() {
        assert!(got == want, "fetchmail: message {} differs", i + 1);
    }
}

#[test]
fn demo_without_capa_curl_and_poplib_start_tls_through_popgate() {
    let h = Harness::new();
    let pki = TestPki::new();
    let msgs = tricky_messages(1 << 20);
    let up = demo_no_capa(&h, msgs.clone());
    let p = popgate(&h, &pki, up.local_addr());
    let ca = pki.ca_path().to_str().unwrap().to_owned();
    assert_capa_shows_stls(up.local_addr(), p.addr);
    curl_through(up.local_addr(), p.addr, &ca, msgs.len());
    poplib_through(up.local_addr(), p.addr, &ca, msgs.len());
    // STLS is popgate's: the server never saw one.
    assert!(
        !up.received()
            .iter()
            .any(|l| l.to_ascii_uppercase().starts_with(b"STLS")),
    );
}

/// With the shipped `require-tls.toml` (as in the example config): popgate's own list hides
/// USER before TLS as it does a server's, still shows STLS, and curl upgrades and fetches.
#[test]
fn require_tls_rules_apply_to_popgates_own_list() {
    let h = Harness::new();
    let pki = TestPki::new();
    let msgs = tricky_messages(0);
    let up = demo_no_capa(&h, msgs.clone());
    let rules = common::shipped_rules("require-tls.toml");
    let p = popgate_with(&h, &pki, up.local_addr(), &format!("rules = [{rules:?}]\n"));
    let mut c = RawPop::connect(p.addr);
    let (status, body) = c.cmd_multi("CAPA");
    assert!(status.starts_with("+OK"), "{status}");
    assert_eq!(String::from_utf8(body.unwrap()).unwrap(), "STLS\r\n");
    assert!(
        c.cmd(&format!("USER {USER}"))
            .starts_with("-ERR [AUTH] Encryption required")
    );
    c.cmd("QUIT");
    let ca = pki.ca_path().to_str().unwrap().to_owned();
    curl_through(up.local_addr(), p.addr, &ca, msgs.len());
}

#[test]
#[ignore = "needs fetchmail (run .ci/run)"]
fn demo_without_capa_fetchmail_tls12_starts_tls_through_popgate() {
    let h = Harness::new();
    let pki = TestPki::new();
    let msgs = tricky_messages(1 << 20);
    let up = demo_no_capa(&h, msgs.clone());
    let p = popgate(&h, &pki, up.local_addr());
    let ca = pki.ca_path().to_str().unwrap().to_owned();
    fetchmail_through(up.local_addr(), p.addr, &ca, msgs.len());
}

/// Messages for an mbox: LF line ends, dot lines, 8-bit bytes, one of 1 MB.
fn mbox_messages() -> Vec<Vec<u8>> {
    tricky_messages(1 << 20)
        .into_iter()
        .map(|m| {
            let mut lf = Vec::with_capacity(m.len());
            let mut i = 0;
            while i < m.len() {
                if m[i..].starts_with(b"\r\n") {
                    lf.push(b'\n');
                    i += 2;
                } else {
                    // popa3d serves an mbox line by line: no NUL inside one.
                    lf.push(if m[i] == 0 { b'0' } else { m[i] });
                    i += 1;
                }
            }
            lf
        })
        .collect()
}

#[test]
#[ignore = "needs popa3d and root (run .ci/run)"]
fn popa3d_curl_poplib_and_fetchmail_start_tls_through_popgate() {
    let msgs = mbox_messages();
    let server = Popa3d::start(&[(USER, PASS, msgs.clone())]);
    let h = Harness::new();
    let pki = TestPki::new();
    let p = popgate(&h, &pki, server.addr);
    let ca = pki.ca_path().to_str().unwrap().to_owned();
    let before = server.mbox(USER);
    assert_capa_shows_stls(server.addr, p.addr);
    curl_through(server.addr, p.addr, &ca, msgs.len());
    poplib_through(server.addr, p.addr, &ca, msgs.len());
    fetchmail_through(server.addr, p.addr, &ca, msgs.len());
    // Every client kept the mail.
    assert!(server.mbox(USER) == before, "the mailbox changed");
}
