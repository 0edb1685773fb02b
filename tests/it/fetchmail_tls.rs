//! fetchmail with TLS toward popgate (implicit TLS and STLS listeners, certificate checked
//! against a throw-away test CA) in front of the in-process demo upstream: the same messages as
//! a plain fetchmail fetch direct from the upstream; without the CA fetchmail refuses.
//!
//! Needs fetchmail: `cargo test -- --include-ignored` after `.ci/run`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::certs::TestPki;
use common::clients::{MdaRun, fetchmail, fetchmail_run};
use common::proxy::{Harness, ProxyHandle, mailbox, tricky_messages};
use popgate_demo::{DemoServer, ServerOptions};

const USER: &str = "fmuser";
const PASS: &str = "fm-pass-5150";

struct Setup {
    /// Keeps the runtime (and with it upstream and proxy) alive.
    _h: Harness,
    pki: TestPki,
    up: DemoServer,
    /// popgate: `addrs[0]` is a `starttls` listener, `addrs[1]` an `implicit` one.
    p: ProxyHandle,
    msgs: Vec<Vec<u8>>,
}

/// A plain demo upstream with dot lines, 8-bit bytes and a 3 MB message, and popgate in front
/// of it with an STLS and an implicit-TLS listener (certificate for localhost from a test CA).
fn setup() -> Setup {
    let h = Harness::new();
    let pki = TestPki::new();
    let msgs = tricky_messages(3 << 20);
    let up = h.upstream(ServerOptions::new(vec![mailbox(USER, PASS, msgs.clone())]));
    let (cert, key) = pki.issue(&["localhost", "127.0.0.1", "::1"]);
    let p = h.proxy_toml(&format!(
        "[[listener]]\nname = \"stls\"\nbind = \"127.0.0.1:0\"\ntls = \"starttls\"\n\
         [[listener]]\nname = \"pop3s\"\nbind = \"127.0.0.1:0\"\ntls = \"implicit\"\n\
         [upstream]\naddress = \"{}\"\nconnect_timeout = \"3s\"\n\
         [tls]\ncert = {cert:?}\nkey = {key:?}\n",
        up.local_addr()
    ));
    Setup {
        _h: h,
        pki,
        up,
        p,
        msgs,
    }
}

/// fetchmail's TLS options: check the certificate against `ca` (if given) and the name
/// `localhost` (fetchmail matches DNS names only, never IP SANs); `--ssl` for implicit TLS.
fn tls_args(implicit: bool, ca: Option<&str>) -> Vec<String> {
    let mut a = Vec::new();
    if implicit {
        a.push("--ssl".to_string());
    }
    a.push("--sslcertck".to_string());
    if let Some(ca) = ca {
        a.extend(["--sslcertfile".to_string(), ca.to_string()]);
    }
    a.extend(["--sslcommonname".to_string(), "localhost".to_string()]);
    a
}

fn run(s: &Setup, implicit: bool, ca: Option<&str>, keep: bool) -> MdaRun {
    let addr = s.p.addrs[usize::from(implicit)];
    let args = tls_args(implicit, ca);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fetchmail_run(addr, USER, PASS, keep, &args)
}

fn pass_lines(up: &DemoServer) -> usize {
    up.received()
        .iter()
        .filter(|l| l.to_ascii_uppercase().starts_with(b"PASS"))
        .count()
}

/// Implicit TLS (`--ssl`) and STLS (fetchmail upgrades on its own when CAPA lists STLS):
/// byte-identical to plain fetchmail direct from the upstream; then `--nokeep` over TLS empties
/// the maildrop.
#[test]
#[ignore = "needs fetchmail (run .ci/run)"]
fn fetchmail_over_tls_listeners_matches_plain_direct() {
    let s = setup();
    let ca = s.pki.ca_path().to_str().unwrap().to_string();
    let direct = fetchmail(s.up.local_addr(), USER, PASS, true, &[]);
    assert_eq!(direct.len(), s.msgs.len());
    assert!(
        direct.iter().any(|m| m.len() >= 3_000_000),
        "a multi-megabyte message"
    );

    for (implicit, label) in [(true, "implicit TLS"), (false, "STLS")] {
        let r = run(&s, implicit, Some(&ca), true);
        assert_eq!(r.status, 0, "{label}: {r:?}");
        assert_eq!(r.messages.len(), direct.len(), "{label}: {r:?}");
        for (i, (got, want)) in r.messages.iter().zip(&direct).enumerate() {
            assert_eq!(got.len(), want.len(), "{label}: message {} length", i + 1);
            assert!(got == want, "{label}: message {} differs", i + 1);
        }
        let out = r.output();
        if implicit {
            assert!(!out.contains("POP3> STLS"), "{label}: {r:?}");
        } else {
            assert!(out.contains("POP3> STLS"), "{label}: no STLS sent: {r:?}");
            assert!(out.contains("upgrade to TLS succeeded"), "{label}: {r:?}");
        }
        // The certificate chain was checked, the session was encrypted.
        assert!(
            out.contains("SSL/TLS: using protocol TLSv1."),
            "{label}: {r:?}"
        );
        assert!(!out.contains("certificate verification failed"), "{r:?}");
        assert_eq!(s.up.messages(USER).len(), s.msgs.len(), "--keep keeps");
    }

    // Without --keep over implicit TLS: delivered, then DELE + QUIT empties the maildrop.
    let r = run(&s, true, Some(&ca), false);
    assert_eq!(r.status, 0, "{r:?}");
    assert!(r.messages == direct, "--nokeep over TLS differs");
    assert!(r.output().contains("POP3> QUIT"), "{r:?}");
    assert!(
        s.up.messages(USER).is_empty(),
        "messages deleted after QUIT"
    );
}

/// `--sslcertck` without the test CA: fetchmail refuses popgate's certificate, exits non-zero,
/// delivers nothing and never sends the password (no plaintext fall-back either).
#[test]
#[ignore = "needs fetchmail (run .ci/run)"]
fn fetchmail_without_the_ca_refuses() {
    let s = setup();
    for (implicit, label) in [(true, "implicit TLS"), (false, "STLS")] {
        let r = run(&s, implicit, None, true);
        assert_ne!(r.status, 0, "{label}: {r:?}");
        assert_ne!(
            r.status, 1,
            "{label}: 1 means 'no mail', not a refusal: {r:?}"
        );
        assert!(r.messages.is_empty(), "{label}: {r:?}");
        let out = r.output();
        assert!(
            out.contains("certificate verification failed")
                || out.contains("unable to get local issuer certificate"),
            "{label}: {r:?}"
        );
        assert!(!out.contains("POP3> PASS"), "{label}: {r:?}");
        assert_eq!(
            pass_lines(&s.up),
            0,
            "{label}: a password reached the upstream"
        );
    }
    assert_eq!(s.up.messages(USER).len(), s.msgs.len());

    // The same runs with the CA succeed (the refusal was about the CA only).
    let ca = s.pki.ca_path().to_str().unwrap().to_string();
    let r = run(&s, false, Some(&ca), true);
    assert_eq!(r.status, 0, "{r:?}");
    assert_eq!(r.messages.len(), s.msgs.len());
}
