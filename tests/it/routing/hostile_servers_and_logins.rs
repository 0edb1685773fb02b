//! Adversarial review of routing mode (issue 13, part 1): attempts to route a login somewhere
//! other than where docs/deployment.md says, upstreams that misbehave during the replayed login, and
//! the SASL and pre-login corner cases of popgate's own front.
//!
//! The scripted upstreams here are the demo server (with its faults) and, for what the demo
//! server cannot do (speak out of turn, greet with `-ERR`, hang up after USER), a one-thread
//! TCP script that plays one connection's lines.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use common::base64;
use common::clients::RawPop;
use common::paused::{self, Pop, Popgate};
use common::proxy::{Harness, ProxyHandle, mailbox};
use popgate_demo::{DemoServer, Faults, ServerOptions, Verb};

const PW: &str = "pw";
const UNAVAILABLE: &str = "-ERR [SYS/TEMP] upstream server unavailable, try again later";

/// A demo server holding `users` (password `pw`, one message naming the server).
fn server(h: &Harness, name: &str, users: &[&str], faults: Faults) -> DemoServer {
    h.upstream(ServerOptions {
        faults,
        ..ServerOptions::new(
            users
                .iter()
                .map(|u| {
                    mailbox(
                        u,
                        PW,
                        vec![format!("Subject: {u} on {name}\r\n\r\nhi\r\n").into_bytes()],
                    )
                })
                .collect(),
        )
    })
}

/// Routing mode: upstreams `old` (address list `old`) and `new` (default), a map file, and
/// `extra` (more tables) appended.
/// A server for alice whose greeting comes `delay` after the connection.
fn slow_server(h: &Harness, name: &str, delay: Duration) -> DemoServer {
    let faults = Faults {
        greeting_delay: Some(delay),
        ..Faults::default()
    };
    server(h, name, &["alice"], faults)
}

fn routing_proxy(h: &Harness, old: &str, new: &str, map: &str, extra: &str) -> Routed {
    let (toml, dir) = routing_toml(old, new, map, extra);
    let proxy = h.proxy_toml(&toml);
    Routed { proxy, _dir: dir }
}

/// [`routing_proxy`]'s config text, and the directory of its map file.
fn routing_toml(old: &str, new: &str, map: &str, extra: &str) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.map");
    std::fs::write(&path, map).unwrap();
    let toml = format!(
        "[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n\
         [[upstream]]\nname = \"old\"\naddress = {old}\nconnect_timeout = \"2s\"\n\
         [[upstream]]\nname = \"new\"\naddress = {new}\nconnect_timeout = \"2s\"\n\
         [routing]\ndefault = \"new\"\nmap = {path:?}\n{extra}"
    );
    (toml, dir)
}

/// [`routing_proxy`] on the test's runtime (tokio's paused clock), with its map's directory.
async fn routing_paused(
    old: &str,
    new: &str,
    map: &str,
    extra: &str,
) -> (Popgate, tempfile::TempDir) {
    let (toml, dir) = routing_toml(old, new, map, extra);
    (Popgate::start(&toml).await, dir)
}

/// [`server`] on the test's runtime (tokio's paused clock), its greeting `delay` late if any.
async fn server_paused(name: &str, users: &[&str], delay: Option<Duration>) -> DemoServer {
    paused::demo(ServerOptions {
        faults: Faults {
            greeting_delay: delay,
            ..Faults::default()
        },
        ..ServerOptions::new(
            users
                .iter()
                .map(|u| {
                    mailbox(
                        u,
                        PW,
                        vec![format!("Subject: {u} on {name}\r\n\r\nhi\r\n").into_bytes()],
                    )
                })
                .collect(),
        )
    })
    .await
}

struct Routed {
    proxy: ProxyHandle,
    _dir: tempfile::TempDir,
}

fn quoted(a: SocketAddr) -> String {
    format!("\"{a}\"")
}

/// One scripted upstream connection: sends `first` on connect, then for each line it receives
/// the next of `replies` (`None`: hang up instead). Records the lines it received.
struct Script {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<String>>>,
}

fn script(first: &'static [u8], replies: Vec<Option<&'static [u8]>>) -> Script {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let rec = received.clone();
    std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut w = s.try_clone().unwrap();
        w.write_all(first).unwrap();
        let mut r = BufReader::new(s);
        for reply in replies {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            rec.lock().unwrap().push(line);
            match reply {
                Some(bytes) => w.write_all(bytes).unwrap(),
                None => return,
            }
        }
        // Then wait for the client to leave.
        let mut rest = String::new();
        while r.read_line(&mut rest).unwrap_or(0) > 0 {
            rec.lock().unwrap().push(std::mem::take(&mut rest));
        }
    });
    Script { addr, received }
}

/// USER with white space in its argument: POP3 servers split it differently (the demo server
/// and others take the first word, Dovecot the whole rest of the line), so the name popgate
/// routes on would not be the name the server checks. `USER alice x` would be routed as
/// "alice x" (the default) and log in alice there, past the map's `alice old`.
#[test]
fn a_user_name_with_white_space_is_refused_not_routed_as_another_name() {
    let h = Harness::new();
    let old = server(&h, "old", &["alice"], Faults::default());
    let new = server(&h, "new", &["alice", "carol"], Faults::default());
    let r = routing_proxy(
        &h,
        &quoted(old.local_addr()),
        &quoted(new.local_addr()),
        "alice old\n@legacy.example old\n",
        "",
    );
    for variant in [
        "USER alice x",
        "USER alice ",
        "USER alice\t",
        "USER  alice",
        "USER\t\talice",
        "USER carol x@legacy.example",
    ] {
        let mut c = RawPop::connect(r.proxy.addr);
        let reply = c.cmd(variant);
        assert!(reply.starts_with("-ERR [AUTH]"), "{variant:?}: {reply}");
        // The client may go on with a proper name.
        assert_eq!(c.cmd("USER alice"), "+OK");
        assert!(c.cmd("PASS pw").starts_with("+OK"), "{variant:?}");
        let (_, body) = c.cmd_multi("RETR 1");
        assert!(
            String::from_utf8(body.unwrap())
                .unwrap()
                .contains("alice on old"),
            "{variant:?}"
        );
        c.cmd("QUIT");
    }
    // Nothing is left pending by a refused name.
    let mut c = RawPop::connect(r.proxy.addr);
    assert!(c.cmd("USER alice x").starts_with("-ERR"));
    assert_eq!(c.cmd("PASS pw"), "-ERR USER first");
    assert_eq!(
        new.connections(),
        0,
        "no variant reached the default server"
    );
    assert!(
        old.received()
            .iter()
            .all(|l| l == b"USER alice\r\n" || !l.starts_with(b"USER")),
        "{:?}",
        old.received()
    );
}

/// An upstream that sends a line before it is asked (here right after its greeting): the
/// replay must not take that line for the answer to USER, and then USER's `+OK` for the
/// answer to PASS, logging the client in on a password the server refused.
#[test]
fn an_upstream_that_speaks_out_of_turn_never_logs_the_client_in() {
    let h = Harness::new();
    let new = server(&h, "new", &["carol"], Faults::default());
    let s = script(
        b"+OK ready\r\n+OK stray line\r\n",
        vec![
            Some(b"+OK send PASS\r\n"),
            Some(b"-ERR [AUTH] wrong password\r\n"),
        ],
    );
    let r = routing_proxy(
        &h,
        &quoted(s.addr),
        &quoted(new.local_addr()),
        "alice old\n",
        "",
    );
    let mut c = RawPop::connect(r.proxy.addr);
    assert_eq!(c.cmd("USER alice"), "+OK");
    let reply = c.cmd("PASS wrong");
    assert!(reply.starts_with("-ERR"), "logged in: {reply}");
    // Still before login: STAT is refused, not relayed.
    assert!(c.cmd("STAT").starts_with("-ERR"));
    // The client can still log in elsewhere.
    assert_eq!(c.cmd("USER carol"), "+OK");
    assert!(c.cmd("PASS pw").starts_with("+OK"));
    assert!(c.cmd("STAT").starts_with("+OK 1 "));
}

/// A routed address that accepts connections but never greets (a Dovecot at its login
/// process limit, a stopped server whose socket still queues connections) is failed over and
/// skipped for `dead_for`, like one that refuses: the greeting is part of `connect_timeout`.
/// Alone, it gives `-ERR [SYS/TEMP]` within `connect_timeout`, not the login timeout.
#[tokio::test(start_paused = true)]
async fn a_routed_address_that_never_greets_is_failed_over() {
    // Listening, never accepting: the kernel completes the handshakes, nobody speaks.
    let hung = TcpListener::bind("127.0.0.1:0").unwrap();
    let slow = server_paused("slow", &["alice"], Some(Duration::from_secs(8))).await;
    let old = server_paused("old", &["alice"], None).await;
    let new = server_paused("new", &["carol"], None).await;
    let (p, _map) = routing_paused(
        &format!(
            "[\"{}\", \"{}\", \"{}\"]",
            hung.local_addr().unwrap(),
            slow.local_addr(),
            old.local_addr()
        ),
        &quoted(new.local_addr()),
        "alice old\n",
        "[limits]\nlogin_timeout = \"60s\"\n",
    )
    .await;
    // The first login waits connect_timeout (2 s) for each silent address; the second skips
    // both (dead for dead_for, 10 s).
    for wait in [4, 0] {
        let mut c = Pop::connect(p.addr).await;
        assert_eq!(c.cmd("USER alice").await, "+OK");
        let t = Instant::now();
        assert!(c.cmd("PASS pw").await.starts_with("+OK"));
        common::took(t.elapsed(), Duration::from_secs(wait));
        c.cmd("QUIT").await;
    }
    assert_eq!(old.connections(), 2);
    assert_eq!(slow.connections(), 1, "skipped once dead");
    assert_eq!(slow.quit_count(), 0, "given up without QUIT");
    // Only the silent ones: SYS/TEMP after connect_timeout (2 s each), and the client may go
    // on elsewhere.
    let (p, _map) = routing_paused(
        &format!("[\"{}\"]", hung.local_addr().unwrap()),
        &quoted(new.local_addr()),
        "alice old\n",
        "[limits]\nlogin_timeout = \"60s\"\n",
    )
    .await;
    let mut c = Pop::connect(p.addr).await;
    assert_eq!(c.cmd("USER alice").await, "+OK");
    let t = Instant::now();
    assert_eq!(c.cmd("PASS pw").await, UNAVAILABLE);
    common::took(t.elapsed(), Duration::from_secs(2));
    assert_eq!(c.cmd("USER carol").await, "+OK");
    assert!(c.cmd("PASS pw").await.starts_with("+OK"));
}

/// The client leaves while its routed login is being replayed: no QUIT reaches the server
/// (nothing is deleted) and the upstream connection is closed (the maildrop lock is freed).
#[test]
fn a_client_that_leaves_during_the_routed_login_leaves_nothing_behind() {
    let h = Harness::new();
    let old = slow_server(&h, "old", Duration::from_millis(500));
    let new = server(&h, "new", &["carol"], Faults::default());
    let r = routing_proxy(
        &h,
        &quoted(old.local_addr()),
        &quoted(new.local_addr()),
        "alice old\n",
        "",
    );
    let mut c = RawPop::connect(r.proxy.addr);
    c.send_raw(b"USER alice\r\nPASS pw\r\nDELE 1\r\nQUIT\r\n");
    std::thread::sleep(Duration::from_millis(100));
    c.abort();
    common::wait_until("the login reaches old", || {
        old.received().iter().any(|l| l.starts_with(b"PASS"))
    });
    common::wait_until("the maildrop is unlocked", || !old.is_locked("alice"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(old.quit_count(), 0);
    assert_eq!(old.messages("alice").len(), 1);
}

/// Upstreams that break the replayed login: a `-ERR` greeting, a hang-up after USER's `+OK`,
/// a non-POP3 answer. Each gives `-ERR [SYS/TEMP]`, the client stays in AUTHORIZATION, and the
/// server's words are not the reply.
#[test]
fn broken_routed_logins_answer_sys_temp_and_the_client_may_retry() {
    let h = Harness::new();
    let new = server(&h, "new", &["carol"], Faults::default());
    let garbage = server(
        &h,
        "old",
        &["alice"],
        Faults {
            garbage_on: Some(Verb::Pass),
            ..Faults::default()
        },
    );
    let cases = [
        script(b"-ERR [SYS/TEMP] too busy\r\n", vec![]),
        script(b"+OK hi\r\n", vec![Some(b"+OK send PASS\r\n"), None]),
        script(b"+OK hi\r\n", vec![None]),
    ];
    let mut addrs: Vec<SocketAddr> = cases.iter().map(|s| s.addr).collect();
    addrs.push(garbage.local_addr());
    for (i, addr) in addrs.into_iter().enumerate() {
        let r = routing_proxy(
            &h,
            &quoted(addr),
            &quoted(new.local_addr()),
            "alice old\n",
            "",
        );
        let mut c = RawPop::connect(r.proxy.addr);
        assert_eq!(c.cmd("USER alice"), "+OK");
        assert_eq!(c.cmd("PASS pw"), UNAVAILABLE, "case {i}");
        assert!(c.cmd("STAT").starts_with("-ERR"), "case {i}");
        assert_eq!(c.cmd("USER carol"), "+OK");
        assert!(c.cmd("PASS pw").starts_with("+OK"), "case {i}");
        c.cmd("QUIT");
    }
    // The hang-up came after the password was sent; nothing else was.
    let got = cases[1].received.lock().unwrap().clone();
    assert_eq!(got, ["USER alice\r\n", "PASS pw\r\n"]);
}

/// SASL and pre-login corner cases the front answers itself, without dialling anything.
#[test]
fn sasl_forms_and_pre_login_commands_are_answered_by_the_front() {
    let h = Harness::new();
    let old = server(&h, "old", &["alice"], Faults::default());
    let new = server(&h, "new", &["carol"], Faults::default());
    let r = routing_proxy(
        &h,
        &quoted(old.local_addr()),
        &quoted(new.local_addr()),
        "alice old\n",
        "",
    );
    let mut c = RawPop::connect(r.proxy.addr);
    // AUTH without argument: the mechanisms.
    assert!(c.cmd("AUTH").starts_with("+OK"));
    assert_eq!(c.line(), "PLAIN");
    assert_eq!(c.line(), "LOGIN");
    assert_eq!(c.line(), ".");
    // RFC 5034's `=` (empty initial response) is no PLAIN message.
    assert!(c.cmd("AUTH PLAIN =").starts_with("-ERR"));
    // Base64 with white space inside, or without its padding: refused, not guessed.
    let plain = base64(b"\0alice\0pw1");
    let (a, b) = plain.split_at(4);
    assert!(c.cmd(&format!("AUTH PLAIN {a} {b}")).starts_with("-ERR"));
    assert!(
        c.cmd(&format!("AUTH PLAIN {}", plain.trim_end_matches('=')))
            .starts_with("-ERR")
    );
    // CAPA in the middle of an exchange is a SASL answer (valid base64, as a server takes
    // it), never a command; `*` then cancels.
    assert_eq!(c.cmd("AUTH LOGIN"), "+ VXNlcm5hbWU6");
    assert_eq!(c.cmd("CAPA"), "+ UGFzc3dvcmQ6");
    assert!(c.cmd("*").starts_with("-ERR"));
    // AUTH LOGIN cancelled after the user name: no user is pending.
    assert_eq!(c.cmd("AUTH LOGIN"), "+ VXNlcm5hbWU6");
    assert_eq!(c.cmd(&base64(b"alice")), "+ UGFzc3dvcmQ6");
    assert!(c.cmd("*").starts_with("-ERR"));
    assert_eq!(c.cmd("PASS pw"), "-ERR USER first");
    // Transaction commands before login.
    for cmd in [
        "STAT", "RETR 1", "DELE 1", "LIST", "UIDL", "TOP 1 0", "RSET",
    ] {
        assert!(c.cmd(cmd).starts_with("-ERR"), "{cmd}");
    }
    // A line over limits.max_line, a bare LF, a line in pieces.
    let long = format!("USER {}", "a".repeat(9000));
    assert!(c.cmd(&long).starts_with("-ERR"));
    c.send_raw(b"NOOP\n");
    assert!(c.line().starts_with("-ERR"));
    assert_eq!((old.connections(), new.connections()), (0, 0));
    c.send_raw(b"USE");
    std::thread::sleep(Duration::from_millis(50));
    c.send_raw(b"R ali");
    std::thread::sleep(Duration::from_millis(50));
    c.send_raw(b"ce\r\nPA");
    std::thread::sleep(Duration::from_millis(50));
    c.send_raw(b"SS pw\r\nSTAT\r\n");
    assert_eq!(c.line(), "+OK");
    assert!(c.line().starts_with("+OK"));
    assert!(c.line().starts_with("+OK 1 "));
    assert_eq!(new.connections(), 0);
}

/// A dead address comes back after `dead_for`; all addresses dead gives SYS/TEMP. On tokio's
/// paused clock: `dead_for` passes exactly, and not a moment of it before.
#[tokio::test(start_paused = true)]
async fn a_dead_address_is_tried_again_after_dead_for() {
    let new = server_paused("new", &["carol"], None).await;
    let port_a = common::free_port();
    let port_b = common::free_port();
    let a: SocketAddr = format!("127.0.0.1:{port_a}").parse().unwrap();
    let b: SocketAddr = format!("127.0.0.1:{port_b}").parse().unwrap();
    let (p, _map) = routing_paused(
        &format!("[\"{a}\", \"{b}\"]\ndead_for = \"1s\""),
        &quoted(new.local_addr()),
        "alice old\n",
        "",
    )
    .await;
    let addr = p.addr;
    let login = move |expect: &'static str| async move {
        let mut c = Pop::connect(addr).await;
        c.cmd("USER alice").await;
        let reply = c.cmd("PASS pw").await;
        assert!(reply.starts_with(expect), "{reply}");
    };
    // The next login may reach the same server only once this one's maildrop lock is gone
    // (the server lets go when popgate closes the upstream after the client left).
    let unlocked = "the maildrop lock is released";
    // Both dead.
    let marked = Instant::now();
    login(UNAVAILABLE).await;
    // b comes up: a is still skipped (and b answers); a comes up later, after dead_for.
    let opts = |name: &str| {
        ServerOptions::new(vec![mailbox(
            "alice",
            PW,
            vec![format!("Subject: {name}\r\n\r\nx\r\n").into_bytes()],
        )])
    };
    let sb = DemoServer::start(b, opts("b")).await.unwrap();
    login("+OK").await;
    assert_eq!(sb.connections(), 1);
    paused::settle(unlocked, || !sb.is_locked("alice")).await;
    let sa = DemoServer::start(a, opts("a")).await.unwrap();
    // No virtual time has passed: a's last dead mark (it was tried again when all were dead,
    // in the second login) is at `marked`. A millisecond before dead_for ends, a is skipped.
    common::took(marked.elapsed(), Duration::ZERO);
    tokio::time::sleep_until(marked + Duration::from_millis(999)).await;
    login("+OK").await;
    assert_eq!((sa.connections(), sb.connections()), (0, 2), "a still dead");
    paused::settle(unlocked, || !sb.is_locked("alice")).await;
    tokio::time::sleep_until(marked + Duration::from_secs(1)).await;
    login("+OK").await;
    assert_eq!(sa.connections(), 1, "a tried again after dead_for");
}

/// `forward_client` is per upstream: the PROXY header goes to the upstream that asks for it,
/// naming the real client, and never to the other one.
#[test]
fn forward_client_is_per_upstream_in_routing_mode() {
    let h = Harness::new();
    let new = server(&h, "new", &["carol"], Faults::default());
    let old = script(
        b"+OK hi\r\n",
        vec![
            Some(b""),
            Some(b"+OK send PASS\r\n"),
            Some(b"+OK logged in\r\n"),
            Some(b"+OK bye\r\n"),
        ],
    );
    let r = routing_proxy(
        &h,
        &format!("\"{}\"\nforward_client = \"proxy-v1\"", old.addr),
        &quoted(new.local_addr()),
        "alice old\n",
        "",
    );
    for user in ["carol", "alice"] {
        let mut c = RawPop::connect(r.proxy.addr);
        assert_eq!(c.cmd(&format!("USER {user}")), "+OK");
        assert!(c.cmd("PASS pw").starts_with("+OK"), "{user}");
        assert!(c.cmd("QUIT").starts_with("+OK"));
        if user == "alice" {
            common::wait_until("QUIT reaches old", || {
                old.received.lock().unwrap().len() == 4
            });
            let got = old.received.lock().unwrap().clone();
            let header: Vec<&str> = got[0].split_whitespace().collect();
            assert_eq!(header[..4], ["PROXY", "TCP4", "127.0.0.1", "127.0.0.1"]);
            assert_eq!(header[5], r.proxy.addr.port().to_string(), "{header:?}");
            assert_eq!(got[1..], ["USER alice\r\n", "PASS pw\r\n", "QUIT\r\n"]);
        }
    }
    assert!(
        new.received().iter().all(|l| !l.starts_with(b"PROXY")),
        "{:?}",
        new.received()
    );
}

/// A USER sent in plaintext does not survive STLS: under TLS the client starts afresh (RFC
/// 2595: nothing learned before the handshake counts after it), so PASS alone under TLS is not
/// a login as the plaintext (possibly injected) name.
#[test]
fn a_plaintext_user_does_not_survive_stls() {
    let h = Harness::new();
    let old = server(&h, "old", &["alice", "mallory"], Faults::default());
    let new = server(&h, "new", &["carol"], Faults::default());
    let pki = common::certs::TestPki::new();
    let (cert, key) = pki.issue(&["localhost", "127.0.0.1"]);
    let toml_listener = format!(
        "[[listener]]\nname = \"stls\"\nbind = \"127.0.0.1:0\"\ntls = \"starttls\"\n\
         [tls]\ncert = {cert:?}\nkey = {key:?}\n\
         [[upstream]]\nname = \"old\"\naddress = \"{}\"\n\
         [[upstream]]\nname = \"new\"\naddress = \"{}\"\n[routing]\ndefault = \"old\"\n",
        old.local_addr(),
        new.local_addr()
    );
    let p = h.proxy_toml(&toml_listener);
    let tcp = std::net::TcpStream::connect(p.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut plain = BufReader::new(tcp);
    let mut line = String::new();
    plain.read_line(&mut line).unwrap();
    assert!(line.starts_with("+OK"), "{line}");
    let ask = |r: &mut BufReader<std::net::TcpStream>, cmd: &str| {
        r.get_mut()
            .write_all(format!("{cmd}\r\n").as_bytes())
            .unwrap();
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        l
    };
    assert_eq!(ask(&mut plain, "USER mallory"), "+OK\r\n");
    assert!(ask(&mut plain, "STLS").starts_with("+OK"));
    let cfg = common::certs::rustls_client(pki.ca_path());
    let conn = rustls::ClientConnection::new(cfg, "localhost".try_into().unwrap()).unwrap();
    let mut tls = BufReader::new(rustls::StreamOwned::new(conn, plain.into_inner()));
    let mut ask_tls = |cmd: &str| {
        tls.get_mut()
            .write_all(format!("{cmd}\r\n").as_bytes())
            .unwrap();
        let mut l = String::new();
        tls.read_line(&mut l).unwrap();
        l
    };
    assert_eq!(ask_tls("PASS pw"), "-ERR USER first\r\n");
    assert_eq!(
        old.connections(),
        0,
        "nothing dialled for the plaintext name"
    );
    assert_eq!(ask_tls("USER alice"), "+OK\r\n");
    assert!(ask_tls("PASS pw").starts_with("+OK"));
}

/// popgate shuts down while a routed login waits for a slow server: the session ends with the
/// shutdown, it does not wait for the server (nor log the client in afterwards).
#[test]
fn a_shutdown_does_not_wait_for_a_routed_login() {
    let h = Harness::new();
    let slow = slow_server(&h, "old", Duration::from_secs(20));
    let new = server(&h, "new", &["carol"], Faults::default());
    let mut r = routing_proxy(
        &h,
        &quoted(slow.local_addr()),
        &quoted(new.local_addr()),
        "alice old\n",
        "[limits]\ngreeting_timeout = \"60s\"\n",
    );
    let mut c = RawPop::connect(r.proxy.addr);
    assert_eq!(c.cmd("USER alice"), "+OK");
    c.send("PASS pw");
    common::wait_until("the routed server is dialled", || slow.connections() == 1);
    r.proxy.shutdown(&h);
    let rest = String::from_utf8_lossy(&c.read_to_end()).into_owned();
    assert!(!rest.contains("+OK"), "{rest}");
    assert!(slow.received().is_empty(), "{:?}", slow.received());
}

/// Every file of a routing-mode run (trace logs, audit, full transcripts, `log` rules
/// rendering commands) is free of the passwords and SASL payloads of routed logins: ones that
/// succeed, ones the server refuses, and ones whose server is unreachable.
#[test]
fn routed_logins_leave_no_secret_in_logs_audit_or_transcripts() {
    use common::proxy::{PopgateOpts, PopgateProcess};
    let h = Harness::new();
    let pass = format!("Rv-{}-pw", std::process::id() as u64 * 7919 + 12345);
    let wrong = format!("Wr-{}-pw", std::process::id() as u64 * 104_729 + 777);
    let old = h.upstream(ServerOptions::new(vec![mailbox(
        "alice",
        &pass,
        vec![b"Subject: x\r\n\r\nbody\r\n".to_vec()],
    )]));
    let dead = format!("127.0.0.1:{}", common::free_port());
    let rules = "[[rule]]\nname = \"log-commands\"\non = \"command\"\naction = \"log\"\n\
                 message = \"rule-log {command} args={args} user={user}\"\n\
                 [[rule]]\nname = \"log-responses\"\non = \"response\"\naction = \"log\"\n\
                 message = \"rule-log response={text}\"\n";
    let p = PopgateProcess::run(
        "127.0.0.1:1".parse().unwrap(),
        PopgateOpts::new()
            .top("rules = [\"rules.toml\"]\n")
            .file("rules.toml", rules)
            .upstreams(&format!(
                "[[upstream]]\nname = \"old\"\naddress = \"{}\"\n\
                 [[upstream]]\nname = \"gone\"\naddress = \"{dead}\"\nconnect_timeout = \"1s\"\n\
                 [routing]\ndefault = \"gone\"\nmap = \"routes.map\"\n",
                old.local_addr()
            ))
            .file("routes.map", "alice old\n")
            .log_to_dir("trace")
            .tables(
                "[audit]\nenabled = true\ndir = \"audit\"\n\
                 [audit.transcript]\ndir = \"transcripts\"\nlisteners = [\"bin\"]\n\
                 full_bodies = true\n",
            )
            .wait_for_log(),
    );
    let plain = |u: &str, pw: &str| base64(format!("\0{u}\0{pw}").as_bytes());
    let mut c = RawPop::connect(p.addr);
    c.cmd("USER alice");
    assert!(c.cmd(&format!("PASS {wrong}")).starts_with("-ERR"));
    assert!(
        c.cmd(&format!("AUTH PLAIN {}", plain("alice", &wrong)))
            .starts_with("-ERR")
    );
    // Unreachable (the default).
    c.cmd("USER bob");
    assert_eq!(c.cmd(&format!("PASS {wrong}")), UNAVAILABLE);
    assert_eq!(c.cmd("AUTH PLAIN"), "+ ");
    assert_eq!(c.cmd(&plain("bob", &wrong)), UNAVAILABLE);
    assert_eq!(c.cmd("AUTH LOGIN"), "+ VXNlcm5hbWU6");
    c.cmd(&base64(b"alice"));
    assert!(c.cmd(&base64(pass.as_bytes())).starts_with("+OK"));
    assert!(c.cmd_multi("RETR 1").1.is_some());
    c.cmd("QUIT");
    let mut c = RawPop::connect(p.addr);
    assert!(
        c.cmd(&format!("AUTH PLAIN {}", plain("alice", &pass)))
            .starts_with("+OK")
    );
    c.cmd("QUIT");
    let log = p.wait_log("login routed", 2);
    assert!(log.contains("rule-log"), "the rules logged");
    let mut p = p;
    p.stop();
    let needles = [
        pass.clone(),
        wrong.clone(),
        base64(pass.as_bytes()),
        base64(wrong.as_bytes()),
        plain("alice", &pass),
        plain("alice", &wrong),
        plain("bob", &wrong),
    ];
    let mut files = vec![p.dir.path().to_owned()];
    let mut seen = 0;
    while let Some(f) = files.pop() {
        if f.is_dir() {
            files.extend(std::fs::read_dir(&f).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        if f.ends_with("rules.toml") || f.ends_with("popgate.toml") {
            continue;
        }
        let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned();
        seen += usize::from(text.contains("alice"));
        for n in &needles {
            assert!(
                !text.contains(n.as_str()),
                "{n} in {}:\n{text}",
                f.display()
            );
        }
    }
    assert!(seen >= 3, "logs, audit and transcripts name the user");
}

/// CAPA before login claims nothing the routed server may not honour: no APOP, no TOP/UIDL,
/// and no AUTH-RESP-CODE, since a refused login is answered with the server's own `-ERR`
/// (here one without `[AUTH]`), relayed as it is.
#[test]
fn capa_before_login_claims_nothing_the_server_may_not_honour() {
    let h = Harness::new();
    let new = server(&h, "new", &["carol"], Faults::default());
    let old = script(
        b"+OK hi\r\n",
        vec![Some(b"+OK send PASS\r\n"), Some(b"-ERR bad password\r\n")],
    );
    let r = routing_proxy(
        &h,
        &quoted(old.addr),
        &quoted(new.local_addr()),
        "alice old\n",
        "",
    );
    let mut c = RawPop::connect(r.proxy.addr);
    let (_, body) = c.cmd_multi("CAPA");
    let capa = String::from_utf8(body.unwrap()).unwrap();
    let items: Vec<&str> = capa.lines().collect();
    for absent in ["AUTH-RESP-CODE", "TOP", "UIDL", "APOP", "STLS", "UTF8"] {
        assert!(
            !items.iter().any(|i| i.split(' ').next() == Some(absent)),
            "{absent}: {capa}"
        );
    }
    assert!(items.contains(&"SASL PLAIN LOGIN"), "{capa}");
    c.cmd("USER alice");
    assert_eq!(c.cmd("PASS pw"), "-ERR bad password");
}

/// A SASL user name may hold any byte (it is base64 on the wire), unlike a USER argument:
/// control characters in it are escaped in the text log, so a client cannot forge log lines
/// (or terminal escapes) through the routed-login lines.
#[test]
fn a_sasl_user_name_cannot_forge_log_lines() {
    use common::proxy::{PopgateOpts, PopgateProcess};
    let h = Harness::new();
    let old = server(&h, "old", &["alice"], Faults::default());
    let p = PopgateProcess::run(
        "127.0.0.1:1".parse().unwrap(),
        PopgateOpts::new()
            .upstreams(&format!(
                "[[upstream]]\nname = \"old\"\naddress = \"{}\"\n\
                 [[upstream]]\nname = \"new\"\naddress = \"{}\"\n\
                 [routing]\ndefault = \"old\"\n",
                old.local_addr(),
                old.local_addr()
            ))
            .log_to_dir("info")
            .wait_for_log(),
    );
    let forged = "FORGED popgate: login routed user=root upstream=new";
    let mut c = RawPop::connect(p.addr);
    let name = format!("eve\n{forged}\r\x1b[2K");
    let r = c.cmd(&format!(
        "AUTH PLAIN {}",
        base64(format!("\0{name}\0pw").as_bytes())
    ));
    assert!(r.starts_with("-ERR"), "{r}");
    c.cmd("AUTH LOGIN");
    c.cmd(&base64(name.as_bytes()));
    assert!(c.cmd(&base64(b"pw")).starts_with("-ERR"));
    c.cmd("QUIT");
    let log = p.wait_log("routed login refused", 2);
    for line in log.lines() {
        assert!(!line.starts_with("FORGED"), "forged line:\n{log}");
    }
    assert!(!log.contains('\x1b'), "terminal escape in the log:\n{log}");
}

/// A reload keeps what failover learned: an address marked dead stays skipped for the rest of
/// its `dead_for` under the new configuration (here: it came back, but is not tried yet).
#[test]
fn a_reload_keeps_an_address_dead() {
    use common::proxy::{PopgateOpts, PopgateProcess};
    let h = Harness::new();
    let b = server(&h, "b", &["alice"], Faults::default());
    let a: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let tables = |map: &str| {
        format!(
            "[[upstream]]\nname = \"old\"\naddress = [\"{a}\", \"{}\"]\ndead_for = \"60s\"\n\
             connect_timeout = \"2s\"\n\
             [[upstream]]\nname = \"new\"\naddress = \"{}\"\n\
             [routing]\ndefault = \"new\"\nmap = \"{map}\"\n",
            b.local_addr(),
            b.local_addr()
        )
    };
    let p = PopgateProcess::run(
        "127.0.0.1:1".parse().unwrap(),
        PopgateOpts::new()
            .upstreams(&tables("routes.map"))
            .file("routes.map", "alice old\n")
            .file("routes2.map", "alice old\ncarol old\n")
            .log_to_dir("info")
            .wait_for_log(),
    );
    let login = || {
        let mut c = RawPop::connect(p.addr);
        c.cmd("USER alice");
        assert!(c.cmd("PASS pw").starts_with("+OK"));
        c.cmd("QUIT");
    };
    login();
    // a comes back; the configuration is reloaded with another map.
    let sa =
        h.rt.block_on(DemoServer::start(
            a,
            ServerOptions::new(vec![mailbox("alice", PW, vec![])]),
        ))
        .unwrap();
    let cfg = p.config_path();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("\"routes.map\"", "\"routes2.map\"")).unwrap();
    p.hup();
    p.wait_log("reloaded", 1);
    login();
    assert_eq!(sa.connections(), 0, "still dead after the reload");
    assert_eq!(b.connections(), 2);
}

/// A `deny` rule on a USER name: the denied name is never pending, so a PASS after it routes
/// nothing; QUIT pipelined behind a failed login is popgate's to answer, behind a good one the
/// server's.
#[test]
fn a_denied_user_routes_nothing_and_pipelined_quit_goes_where_the_session_is() {
    let h = Harness::new();
    let old = server(&h, "old", &["alice", "mallory"], Faults::default());
    let new = server(&h, "new", &["carol"], Faults::default());
    let rules = common::proxy::rule_file(
        "[[rule]]\nname = \"no-mallory\"\non = \"command\"\nverbs = \"USER\"\n\
         args = '^mallory$'\naction = \"deny\"\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("routes.map");
    std::fs::write(&map, "alice old\nmallory old\n").unwrap();
    let proxy = h.proxy_toml(&format!(
        "rules = [{:?}]\n[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n\
         [[upstream]]\nname = \"old\"\naddress = \"{}\"\n\
         [[upstream]]\nname = \"new\"\naddress = \"{}\"\n\
         [routing]\ndefault = \"new\"\nmap = {map:?}\n",
        rules.path,
        old.local_addr(),
        new.local_addr()
    ));
    let mut c = RawPop::connect(proxy.addr);
    assert!(c.cmd("USER mallory").starts_with("-ERR"));
    assert_eq!(c.cmd("PASS pw"), "-ERR USER first");
    assert_eq!(old.connections(), 0);
    // A failed login, QUIT behind it: answered by popgate; the server gets no QUIT.
    c.send_raw(b"USER alice\r\nPASS bad\r\nQUIT\r\n");
    assert_eq!(c.line(), "+OK");
    assert!(c.line().starts_with("-ERR"));
    assert!(c.line().starts_with("+OK"));
    assert!(c.read_to_end().is_empty());
    // A good one: the QUIT reaches the server.
    let mut c = RawPop::connect(proxy.addr);
    c.send_raw(b"USER alice\r\nPASS pw\r\nQUIT\r\n");
    assert_eq!(c.line(), "+OK");
    assert!(c.line().starts_with("+OK"));
    assert!(c.line().starts_with("+OK"));
    assert!(c.read_to_end().is_empty());
    common::wait_until("QUIT reaches old", || old.quit_count() == 1);
    assert_eq!(old.connections(), 2);
}

/// Against a real Dovecot that trusts popgate: a routed login replayed with each method
/// (USER/PASS, AUTH PLAIN, AUTH LOGIN) after an XCLIENT naming the real client, which Dovecot
/// logs as the login's address; the other upstream (no `forward_client`) gets no XCLIENT.
#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn xclient_goes_to_the_routed_dovecot_only_and_every_method_replays() {
    use common::clients::connect_from;
    use common::dovecot::{Dovecot, DovecotOpts, alice_msgs};
    let dv =
        Dovecot::start(DovecotOpts::trusting_popgate().user("alice", "alice-secret", alice_msgs()));
    let h = Harness::new();
    let new = server(&h, "new", &["carol"], Faults::default());
    let r = routing_proxy(
        &h,
        &format!("\"{}\"\nforward_client = \"xclient\"", dv.pop3),
        &quoted(new.local_addr()),
        "alice old\n",
        "[limits]\nlogin_fail_delay = \"0s\"\n",
    );
    let client = common::proxy_header::ip("127.0.0.9");
    let logins: [&[String]; 3] = [
        &["USER alice".into(), "PASS alice-secret".into()],
        &[format!("AUTH PLAIN {}", base64(b"\0alice\0alice-secret"))],
        &[
            "AUTH LOGIN".into(),
            base64(b"alice"),
            base64(b"alice-secret"),
        ],
    ];
    for steps in logins {
        let mut c = RawPop::over(connect_from(client, r.proxy.addr));
        assert!(c.line().starts_with("+OK"));
        let mut last = String::new();
        for s in steps {
            last = c.cmd(s);
        }
        assert!(last.starts_with("+OK"), "{steps:?}: {last}");
        assert!(c.cmd("STAT").starts_with("+OK 3 "), "{steps:?}");
        assert!(c.cmd("QUIT").starts_with("+OK"));
    }
    let mut c = RawPop::over(connect_from(client, r.proxy.addr));
    c.line();
    c.cmd("USER carol");
    assert!(c.cmd("PASS pw").starts_with("+OK"));
    c.cmd("QUIT");
    common::wait_until("Dovecot logged three logins", || dv.login_rips().len() >= 3);
    let rips = dv.login_rips();
    assert!(rips.iter().all(|r| r == "127.0.0.9"), "{rips:?}");
    assert!(
        !new.received().iter().any(|l| l.starts_with(b"XCLIENT")),
        "{:?}",
        new.received()
    );
}

/// Direct mode too: of an upstream's several addresses, one that accepts but never greets is
/// failed over (and skipped next time), not waited on until `greeting_timeout` every session.
#[tokio::test(start_paused = true)]
async fn direct_mode_fails_over_an_address_that_never_greets() {
    let hung = TcpListener::bind("127.0.0.1:0").unwrap();
    let up = server_paused("up", &["alice"], None).await;
    let p = Popgate::start(&format!(
        "[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n\
         [upstream]\naddress = [\"{}\", \"{}\"]\nconnect_timeout = \"1s\"\n\
         [limits]\ngreeting_timeout = \"60s\"\n",
        hung.local_addr().unwrap(),
        up.local_addr()
    ))
    .await;
    // The first session's greeting waits connect_timeout (1 s) for the silent address, not
    // greeting_timeout; the next skips it.
    for wait in [1, 0] {
        let t = Instant::now();
        let mut c = Pop::connect(p.addr).await;
        common::took(t.elapsed(), Duration::from_secs(wait));
        assert!(c.greeting.starts_with("+OK"), "{}", c.greeting);
        c.cmd("USER alice").await;
        assert!(c.cmd("PASS pw").await.starts_with("+OK"));
        c.cmd("QUIT").await;
    }
    assert_eq!(up.connections(), 2);
}
