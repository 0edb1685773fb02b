//! The client's address end to end, against a real Dovecot (loopback only): popgate passes it
//! on with a PROXY v1/v2 header (Dovecot `haproxy = yes`) or with XCLIENT (Dovecot
//! `login_trusted_networks`), so Dovecot's log (`rip=`) and its per-IP auth penalty see the
//! client, not popgate; a client cannot send XCLIENT itself; and HAProxy (`send-proxy-v2`,
//! round robin) in front of two popgate instances serves clients from several addresses with
//! each address in popgate's audit trail and Dovecot's log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::clients::{RawPop, connect_from, curl, curl_retr};
use common::dovecot::{Dovecot, DovecotOpts, bob_msgs, dot_stuffed, msg_big, served};
use common::proxy::{Harness, PopgateOpts, PopgateProcess, ProxyHandle};
use common::proxy_header::ip;
use common::{audit_events, find_exe, free_port, wait_until};

const USER: &str = "bob";
const PASS: &str = "bob-pass";

/// Dovecot with a `haproxy = yes` listener, trusting popgate (127.0.0.1) for XCLIENT.
fn dovecot() -> Dovecot {
    let mut msgs = bob_msgs();
    msgs.push(msg_big());
    Dovecot::start(DovecotOpts::trusting_popgate().user(USER, PASS, msgs))
}

/// popgate (in-process) in front of `upstream` with `upstream_keys` in `[upstream]`.
fn popgate(h: &Harness, upstream: SocketAddr, upstream_keys: &str, limits: &str) -> ProxyHandle {
    h.proxy_toml(&format!(
        "[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\n\
         [upstream]\naddress = \"{upstream}\"\n{upstream_keys}\n[limits]\n{limits}\n"
    ))
}

/// Log in as `from` through `to`; the greeting, and the PASS reply with how long it took.
fn login_from(from: &str, to: SocketAddr, pass: &str) -> (String, String, Duration) {
    let mut c = RawPop::over(connect_from(ip(from), to));
    let greeting = c.line();
    assert!(c.cmd(&format!("USER {USER}")).starts_with("+OK"));
    let t = Instant::now();
    let reply = c.cmd(&format!("PASS {pass}"));
    let took = t.elapsed();
    let _ = c.cmd("QUIT");
    (greeting, reply, took)
}

#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn every_forward_mode_gives_dovecot_the_clients_address() {
    let dv = dovecot();
    let h = Harness::new();
    let direct = curl_retr(dv.pop3, USER, PASS, 1);
    let haproxy = dv.pop3_haproxy.unwrap();
    let ca = dv.ca_path().display().to_string();
    let cases = [
        ("proxy-v1", haproxy, String::new(), "127.0.0.5"),
        ("proxy-v2", haproxy, String::new(), "127.0.0.6"),
        ("xclient", dv.pop3, String::new(), "127.0.0.7"),
        (
            "xclient",
            dv.pop3,
            format!("tls = \"starttls\"\nca_file = {ca:?}\nserver_name = \"localhost\"\n"),
            "127.0.0.8",
        ),
        (
            "proxy-v2",
            dv.pop3s_haproxy.unwrap(),
            format!("tls = \"implicit\"\nca_file = {ca:?}\nserver_name = \"localhost\"\n"),
            "127.0.0.9",
        ),
        (
            "proxy-v1",
            dv.pop3s_haproxy.unwrap(),
            format!("tls = \"implicit\"\nca_file = {ca:?}\nserver_name = \"localhost\"\n"),
            "127.0.0.10",
        ),
    ];
    for (mode, upstream, tls, from) in &cases {
        let p = popgate(
            &h,
            *upstream,
            &format!("forward_client = \"{mode}\"\n{tls}"),
            "",
        );
        let before = dv.login_rips().len();
        let mut c = RawPop::over(connect_from(ip(from), p.addr));
        c.greeting = c.line();
        // Dovecot offers XCLIENT to popgate; the client never sees it.
        assert!(c.greeting.starts_with("+OK"), "{mode}: {}", c.greeting);
        assert!(!c.greeting.contains("XCLIENT"), "{mode}: {}", c.greeting);
        assert!(c.cmd(&format!("USER {USER}")).starts_with("+OK"));
        assert!(c.cmd(&format!("PASS {PASS}")).starts_with("+OK"), "{mode}");
        let (status, body) = c.cmd_multi("RETR 1");
        assert!(status.starts_with("+OK"), "{mode}: {status}");
        let body = body.unwrap();
        assert!(
            body == dot_stuffed(&served(&bob_msgs()[0])),
            "{mode}: body differs"
        );
        assert!(c.cmd("QUIT").starts_with("+OK"));
        wait_until("Dovecot logged the login", || {
            dv.login_rips().len() > before
        });
        assert_eq!(dv.login_rips()[before], *from, "{mode} {tls}: {}", dv.log());
    }
    // Byte-identical to direct retrieval through a forwarding popgate, with curl.
    let p = popgate(&h, haproxy, "forward_client = \"proxy-v2\"", "");
    assert_eq!(curl_retr(p.addr, USER, PASS, 1), direct);
    // XCLIENT carries popgate's session id into Dovecot's log.
    assert!(dv.log().contains("session=<popgate-"), "{}", dv.log());
}

#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn a_client_cannot_send_xclient_through_popgate() {
    // popgate forwards unknown commands here (single-line) and does not forward the client
    // itself: Dovecot would believe an XCLIENT arriving from popgate's trusted address.
    let dv = dovecot();
    let h = Harness::new();
    let p = popgate(&h, dv.pop3, "", "unknown_commands = \"single-line\"");
    let addr = p.addr;
    for attempt in [
        "XCLIENT ADDR=192.0.2.66 PORT=1 TTL=4",
        "xclient addr=192.0.2.66",
        " XCLIENT\tADDR=192.0.2.66",
    ] {
        let mut c = RawPop::over(connect_from(ip("127.0.0.5"), addr));
        c.greeting = c.line();
        assert!(!c.greeting.contains("XCLIENT"), "{}", c.greeting);
        assert_eq!(c.cmd(attempt), "-ERR XCLIENT is not allowed");
        assert!(c.cmd(&format!("USER {USER}")).starts_with("+OK"));
        assert!(c.cmd(&format!("PASS {PASS}")).starts_with("+OK"));
        // After login too.
        assert_eq!(c.cmd(attempt), "-ERR XCLIENT is not allowed");
        assert!(c.cmd("QUIT").starts_with("+OK"));
    }
    let rips = dv.login_rips();
    assert_eq!(rips.len(), 3, "{}", dv.log());
    assert!(rips.iter().all(|r| r == "127.0.0.1"), "{rips:?}");
    assert!(!dv.log().contains("192.0.2.66"), "{}", dv.log());
}

#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn dovecots_login_penalty_stays_with_the_failing_address() {
    // popgate's own penalty off, so that every delay measured here is Dovecot's.
    let limits = "login_fail_delay = \"0s\"";
    let h = Harness::new();

    // Forwarding on: failures from .5 are Dovecot's business with .5 only.
    let dv = dovecot();
    let p = popgate(
        &h,
        dv.pop3_haproxy.unwrap(),
        "forward_client = \"proxy-v2\"",
        limits,
    );
    let addr = p.addr;
    for _ in 0..2 {
        let (_, reply, _) = login_from("127.0.0.5", addr, "wrong");
        assert!(reply.starts_with("-ERR"), "{reply}");
    }
    let (greeting, reply, good) = login_from("127.0.0.6", addr, PASS);
    assert!(greeting.starts_with("+OK"), "{greeting}");
    assert!(reply.starts_with("+OK"), "{reply}");
    let (_, reply, bad_again) = login_from("127.0.0.5", addr, "wrong");
    assert!(reply.starts_with("-ERR"), "{reply}");
    eprintln!("forwarding on: good login from .6 {good:?}; next failure from .5 {bad_again:?}");
    assert!(good < Duration::from_secs(1), "good login took {good:?}");
    assert!(
        bad_again >= Duration::from_millis(1500),
        "the failing address was not slowed down: {bad_again:?}"
    );

    // Forwarding off: Dovecot sees popgate's address for everyone, so .6 pays for .5.
    let dv = dovecot();
    let p = popgate(&h, dv.pop3, "", limits);
    let addr = p.addr;
    for _ in 0..2 {
        let (_, reply, _) = login_from("127.0.0.5", addr, "wrong");
        assert!(reply.starts_with("-ERR"), "{reply}");
    }
    let (_, reply, good_off) = login_from("127.0.0.6", addr, PASS);
    assert!(reply.starts_with("+OK"), "{reply}");
    eprintln!("forwarding off: good login from .6 {good_off:?}");
    assert!(
        good_off >= Duration::from_millis(1500),
        "without forwarding the penalty should hit everyone: {good_off:?}"
    );
}

/// `haproxy -db -f CFG` in the foreground; killed on drop.
pub(crate) struct Haproxy {
    child: Child,
}

impl Haproxy {
    pub(crate) fn start(dir: &Path, frontend: SocketAddr, backends: &[SocketAddr]) -> Haproxy {
        let exe = find_exe("haproxy").expect("haproxy not installed: run .ci/run");
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, b)| format!("  server popgate{i} {b} send-proxy-v2\n"))
            .collect();
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 200\n\
                 defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  \
                 timeout server 30s\n\
                 frontend pop3\n  bind {frontend}\n  default_backend popgates\n\
                 backend popgates\n  balance roundrobin\n{servers}"
            ),
        )
        .unwrap();
        let child = Command::new(exe)
            .args(["-db", "-q", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("haproxy.err")).unwrap())
            .spawn()
            .expect("spawn haproxy");
        let mut hp = Haproxy { child };
        // Listening once its port cannot be bound; no probe connection (it would be a session).
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpListener::bind(frontend).is_ok() {
            if let Ok(Some(status)) = hp.child.try_wait() {
                panic!(
                    "haproxy exited: {status}: {}",
                    std::fs::read_to_string(dir.join("haproxy.err")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen on {frontend}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        hp
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
#[ignore = "needs dovecot and haproxy (run .ci/run)"]
fn haproxy_in_front_of_two_popgates_in_front_of_dovecot() {
    let dv = dovecot();
    let direct_small = curl_retr(dv.pop3, USER, PASS, 1);
    let direct_big = curl_retr(dv.pop3, USER, PASS, 13);
    assert_eq!(direct_big, served(&msg_big()));
    let instance = |upstream: SocketAddr, forward: &str| {
        PopgateProcess::run(
            upstream,
            PopgateOpts::new()
                .listener("proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1\"]\n")
                .tables(&format!(
                    "forward_client = \"{forward}\"\n\
                     [audit]\nenabled = true\ndir = \"audit\"\n"
                ))
                .log_to_dir("info")
                .wait_for_log(),
        )
    };
    // One instance tells Dovecot with PROXY v2, the other with XCLIENT.
    let a = instance(dv.pop3_haproxy.unwrap(), "proxy-v2");
    let b = instance(dv.pop3, "xclient");
    let dir = tempfile::tempdir().unwrap();
    let front: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _hp = Haproxy::start(dir.path(), front, &[a.addr, b.addr]);

    let clients = [
        "127.0.0.5",
        "127.0.0.6",
        "127.0.0.7",
        "127.0.0.8",
        "127.0.0.9",
        "127.0.0.10",
    ];
    let url_small = format!("pop3://{front}/1");
    let url_big = format!("pop3://{front}/13");
    let up = format!("{USER}:{PASS}");
    for (i, from) in clients.iter().enumerate() {
        let url = if i % 3 == 2 { &url_big } else { &url_small };
        let out = curl(&["--interface", from, "-u", &up, url]);
        assert!(
            out.status.success(),
            "{from}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want = if i % 3 == 2 {
            &direct_big
        } else {
            &direct_small
        };
        assert!(out.stdout == *want, "{from}: retrieval differs from direct");
    }

    // Popgate's audit trail: each client's own address, and both instances served.
    let opens = |p: &PopgateProcess| -> Vec<IpAddr> {
        audit_events(&p.dir.path().join("audit"))
            .into_iter()
            .filter(|e| e["event"] == "session_open")
            .map(|e| {
                let c: SocketAddr = e["client"].as_str().unwrap().parse().unwrap();
                c.ip()
            })
            .collect()
    };
    wait_until("every session audited", || {
        opens(&a).len() + opens(&b).len() >= clients.len()
    });
    let (seen_a, seen_b) = (opens(&a), opens(&b));
    eprintln!("instance a served {seen_a:?}, instance b served {seen_b:?}");
    assert!(!seen_a.is_empty() && !seen_b.is_empty(), "round robin");
    let mut audited: Vec<IpAddr> = seen_a.iter().chain(&seen_b).copied().collect();
    audited.sort();
    let mut want: Vec<IpAddr> = clients.iter().map(|c| ip(c)).collect();
    want.sort();
    assert_eq!(audited, want);
    // Dovecot's log: each client's own address, whichever instance it came through.
    let mut rips: Vec<IpAddr> = dv
        .login_rips()
        .iter()
        .filter_map(|r| r.parse().ok())
        .filter(|r| *r != ip("127.0.0.1")) // the direct retrievals above
        .collect();
    rips.sort();
    assert_eq!(rips, want, "{}", dv.log());
}
