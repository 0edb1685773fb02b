//! Adversarial review of the PROXY protocol listeners and client forwarding (issue 10), loopback
//! only, popgate in-process in front of the recording demo upstream: headers of every shape
//! (TLVs, LOCAL, UNKNOWN, unix and UDP addresses, one byte at a time, with the first command or
//! the TLS ClientHello in the same segment, a second header later), IPv4-mapped addresses, the
//! limits while a header is awaited, and the login penalty keyed on the header's client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::certs::TestPki;
use common::clients::{RawPop, connect_from};
use common::dovecot::{Dovecot, DovecotOpts, bob_msgs};
use common::proxy::{Harness, ProxyHandle, mailbox};
use common::proxy_header::{ip, sa, v1, v2};
use common::{audit_events, wait_until};
use popgate_demo::{DemoServer, ServerOptions};

const USER: &str = "bob";
const PASS: &str = "bob-secret";

fn demo(h: &Harness) -> DemoServer {
    h.upstream(ServerOptions::new(vec![mailbox(
        USER,
        PASS,
        vec![b"Subject: s\r\n\r\nhello\r\n".to_vec()],
    )]))
}

/// A v2 header by hand: `ver_cmd` (0x21 PROXY, 0x20 LOCAL), `fam` (family << 4 | transport)
/// and the address block.
fn v2_raw(ver_cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
    let mut h = ppp::v2::PROTOCOL_PREFIX.to_vec();
    h.push(ver_cmd);
    h.push(fam);
    h.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
    h.extend_from_slice(body);
    h
}

/// popgate with one `proxy_protocol` listener trusting 127.0.0.1 (plus `listener` keys),
/// auditing to `audit`, with `rest` (tables) appended.
fn balanced(
    h: &Harness,
    up: SocketAddr,
    listener: &str,
    audit: &std::path::Path,
    rest: &str,
) -> ProxyHandle {
    h.proxy_toml(&format!(
        "[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:0\"\nproxy_protocol = true\n\
         trusted_proxies = [\"127.0.0.1\"]\n{listener}\n\
         [upstream]\naddress = \"{up}\"\nconnect_timeout = \"3s\"\n\
         [audit]\nenabled = true\ndir = {audit:?}\n{rest}"
    ))
}

fn clients(audit: &std::path::Path) -> Vec<String> {
    audit_events(audit)
        .into_iter()
        .filter(|e| e["event"] == "session_open")
        .map(|e| e["client"].as_str().unwrap().to_owned())
        .collect()
}

fn behind(to: SocketAddr, header: &[u8]) -> RawPop {
    let mut s = connect_from(ip("127.0.0.1"), to);
    s.write_all(header).unwrap();
    let mut c = RawPop::over(s);
    c.greeting = c.line();
    c
}

/// Wait until the peer closes (bounded): what it sent before.
fn closed(s: TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s);
    let mut out = Vec::new();
    loop {
        let mut l = Vec::new();
        match r.read_until(b'\n', &mut l) {
            Ok(0) => return out,
            Ok(_) => out.extend_from_slice(&l),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(e) => panic!("not closed: {e}; got {out:?}"),
        }
    }
}

fn received(up: &DemoServer) -> Vec<String> {
    up.received()
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect()
}

#[test]
fn headers_of_every_shape_from_a_trusted_balancer() {
    let h = Harness::new();
    let up = demo(&h);
    let audit = tempfile::tempdir().unwrap();
    let p = balanced(&h, up.local_addr(), "", audit.path(), "");

    // v2 with TLVs (HAProxy's unique id, authority, a NOOP pad): the client is the header's.
    let tlv = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (sa("192.0.2.21:4001"), sa("198.51.100.1:110")),
    )
    .write_tlv(ppp::v2::Type::UniqueId, b"0123456789abcdef")
    .unwrap()
    .write_tlv(ppp::v2::Type::Authority, b"pop.example.org")
    .unwrap()
    .write_tlv(ppp::v2::Type::NoOp, &[0u8; 700])
    .unwrap()
    .build()
    .unwrap();
    assert!(tlv.len() > 512, "longer than one peek");
    let mut c = behind(p.addr, &tlv);
    assert!(c.greeting.starts_with("+OK"), "{}", c.greeting);
    assert!(c.cmd("QUIT").starts_with("+OK"));

    // v2 LOCAL (a health check) and v1 UNKNOWN: served as the balancer itself.
    for header in [v2_raw(0x20, 0x00, b""), b"PROXY UNKNOWN\r\n".to_vec()] {
        let mut c = behind(p.addr, &header);
        assert!(c.greeting.starts_with("+OK"), "{}", c.greeting);
        assert!(c.cmd("QUIT").starts_with("+OK"));
    }

    // v2 PROXY for a unix socket or a UDP datagram: no TCP client, refused before the upstream.
    let before = up.connections();
    let mut udp = vec![192, 0, 2, 22, 198, 51, 100, 1];
    udp.extend_from_slice(&[0x0f, 0xa1, 0, 110]);
    for header in [v2_raw(0x21, 0x31, &[0u8; 216]), v2_raw(0x21, 0x12, &udp)] {
        let mut s = connect_from(ip("127.0.0.1"), p.addr);
        s.write_all(&header).unwrap();
        let _ = s.write_all(b"USER bob\r\n");
        assert_eq!(closed(s), b"", "{header:?}");
    }
    assert_eq!(up.connections(), before);

    // One byte per write, the header and the first commands: nothing lost, nothing doubled.
    let mut s = connect_from(ip("127.0.0.1"), p.addr);
    s.set_nodelay(true).unwrap();
    let mut bytes = v1("192.0.2.23:4003", "198.51.100.1:110");
    bytes.extend_from_slice(format!("USER {USER}\r\nPASS {PASS}\r\n").as_bytes());
    for b in bytes {
        s.write_all(&[b]).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut c = RawPop::over(s);
    assert!(c.line().starts_with("+OK"), "greeting");
    assert!(c.line().starts_with("+OK"), "USER");
    assert!(c.line().starts_with("+OK"), "PASS");
    assert!(c.cmd("QUIT").starts_with("+OK"));

    // The header and the first commands in one segment (v2, then v1).
    for header in [
        v2("192.0.2.24:4004", "198.51.100.1:110"),
        v1("192.0.2.25:4005", "198.51.100.1:110"),
    ] {
        let mut first = header.clone();
        first.extend_from_slice(format!("CAPA\r\nUSER {USER}\r\nPASS {PASS}\r\n").as_bytes());
        let mut c = behind(p.addr, &first);
        assert!(c.greeting.starts_with("+OK"), "{}", c.greeting);
        let (capa, _) = (c.line(), c.body());
        assert!(capa.starts_with("+OK"), "{capa}");
        assert!(c.line().starts_with("+OK"), "USER");
        assert!(c.line().starts_with("+OK"), "PASS");
        // A second header later is a line like any other: refused, it changes nothing and
        // never reaches the upstream.
        let reply = c.cmd("PROXY TCP4 6.6.6.6 198.51.100.1 1 110");
        assert!(reply.starts_with("-ERR"), "{reply}");
        assert!(c.cmd("NOOP").starts_with("+OK"));
        // A v2 signature is `\r\n\r\n\0\r\nQUIT\n`: as POP3, two empty lines, a NUL and a
        // QUIT (the client's own, ending its own session).
        c.send_raw(&v2("6.6.6.7:1", "198.51.100.1:110"));
        let rest = String::from_utf8_lossy(&c.read_to_end()).into_owned();
        assert!(
            rest.trim_end().ends_with("+OK") || rest.contains("\r\n+OK"),
            "{rest:?}"
        );
    }
    let got = received(&up);
    assert_eq!(
        got.iter().filter(|l| l.starts_with("USER")).count(),
        3,
        "{got:?}"
    );
    assert_eq!(
        got.iter().filter(|l| l.starts_with("CAPA")).count(),
        2,
        "{got:?}"
    );
    assert!(
        !got.iter()
            .any(|l| l.contains("PROXY") || l.contains("6.6.6")),
        "{got:?}"
    );

    wait_until("sessions audited", || clients(audit.path()).len() >= 6);
    let seen = clients(audit.path());
    for want in [
        "192.0.2.21:4001",
        "192.0.2.23:4003",
        "192.0.2.24:4004",
        "192.0.2.25:4005",
    ] {
        assert!(seen.iter().any(|c| c == want), "{want} in {seen:?}");
    }
    assert!(!seen.iter().any(|c| c.contains("6.6.6")), "{seen:?}");
}

#[test]
fn an_ipv4_mapped_client_is_the_same_client_as_its_ipv4_form() {
    // A balancer on a dual-stack socket writes IPv4 clients as `TCP6 ::ffff:a.b.c.d`; another
    // frontend (or HAProxy's own v4 bind) writes the same client as `TCP4 a.b.c.d`. One
    // client, one per-IP count, one address in the audit trail.
    let h = Harness::new();
    let up = demo(&h);
    let audit = tempfile::tempdir().unwrap();
    let p = balanced(
        &h,
        up.local_addr(),
        "",
        audit.path(),
        "[limits]\nmax_sessions_per_ip = 1\n",
    );
    let mut first = behind(
        p.addr,
        &v1("[::ffff:192.0.2.7]:40000", "[::ffff:198.51.100.1]:110"),
    );
    assert!(first.greeting.starts_with("+OK"), "{}", first.greeting);
    let again = behind(p.addr, &v2("192.0.2.7:40001", "198.51.100.1:110"));
    assert_eq!(
        again.greeting, "-ERR [SYS/TEMP] too many connections from your address",
        "the same client in its IPv4 form"
    );
    assert!(first.cmd("QUIT").starts_with("+OK"));
    drop(again);
    wait_until("session audited", || !clients(audit.path()).is_empty());
    assert_eq!(clients(audit.path())[0], "192.0.2.7:40000");
}

#[test]
fn a_dual_stack_listener_counts_ipv4_clients_with_the_ipv4_listeners() {
    // pop3 on 127.0.0.1, pop3s-like second listener on [::] (dual stack): a client from
    // 127.0.0.5 is one client for max_sessions_per_ip, whichever listener it uses.
    let h = Harness::new();
    let up = demo(&h);
    let p = h.proxy_toml(&format!(
        "[[listener]]\nname = \"v4\"\nbind = \"127.0.0.1:0\"\n\
         [[listener]]\nname = \"any\"\nbind = \"[::]:0\"\n\
         [upstream]\naddress = \"{}\"\n[limits]\nmax_sessions_per_ip = 1\n",
        up.local_addr()
    ));
    let dual = SocketAddr::new(ip("127.0.0.1"), p.addrs[1].port());
    let mut first = RawPop::over(connect_from(ip("127.0.0.5"), p.addrs[0]));
    first.greeting = first.line();
    assert!(first.greeting.starts_with("+OK"), "{}", first.greeting);
    let mut second = RawPop::over(connect_from(ip("127.0.0.5"), dual));
    second.greeting = second.line();
    assert_eq!(
        second.greeting,
        "-ERR [SYS/TEMP] too many connections from your address"
    );
    assert!(first.cmd("QUIT").starts_with("+OK"));
}

#[test]
fn a_dual_stack_proxy_listener_trusts_ipv4_balancers() {
    let h = Harness::new();
    let up = demo(&h);
    let audit = tempfile::tempdir().unwrap();
    let p = h.proxy_toml(&format!(
        "[[listener]]\nname = \"lb\"\nbind = \"[::]:0\"\nproxy_protocol = true\n\
         trusted_proxies = [\"127.0.0.1\"]\n\
         [upstream]\naddress = \"{}\"\n[audit]\nenabled = true\ndir = {:?}\n",
        up.local_addr(),
        audit.path()
    ));
    let to = SocketAddr::new(ip("127.0.0.1"), p.addr.port());
    // The balancer arrives as ::ffff:127.0.0.1: trusted.
    let mut c = behind(to, &v2("192.0.2.31:1", "198.51.100.1:110"));
    assert!(c.greeting.starts_with("+OK"), "{}", c.greeting);
    assert!(c.cmd("QUIT").starts_with("+OK"));
    // Anyone else (::ffff:127.0.0.9) is closed, header or not.
    let mut s = connect_from(ip("127.0.0.9"), to);
    let _ = s.write_all(&v2("192.0.2.32:1", "198.51.100.1:110"));
    assert_eq!(closed(s), b"");
    assert_eq!(up.connections(), 1);
    wait_until("session audited", || !clients(audit.path()).is_empty());
    let open = audit_events(audit.path())
        .into_iter()
        .find(|e| e["event"] == "session_open")
        .unwrap();
    assert_eq!(open["client"], "192.0.2.31:1");
    let proxy: SocketAddr = open["proxy"].as_str().unwrap().parse().unwrap();
    assert_eq!(proxy.ip(), ip("127.0.0.1"), "{open}");
}

#[test]
fn silent_balancer_connections_hold_no_more_than_max_sessions_and_never_stall_accept() {
    let h = Harness::new();
    let up = demo(&h);
    let audit = tempfile::tempdir().unwrap();
    let p = balanced(
        &h,
        up.local_addr(),
        "proxy_timeout = \"20s\"",
        audit.path(),
        "[limits]\nmax_sessions = 3\n",
    );
    // Two connections from the trusted balancer that never send their header (one sends half).
    let silent = connect_from(ip("127.0.0.1"), p.addr);
    let mut half = connect_from(ip("127.0.0.1"), p.addr);
    half.write_all(&v2("192.0.2.41:1", "198.51.100.1:110")[..10])
        .unwrap();
    // A good one is served at once: waiting headers do not block the accept loop.
    let mut good = behind(p.addr, &v1("192.0.2.42:1", "198.51.100.1:110"));
    assert!(good.greeting.starts_with("+OK"), "{}", good.greeting);
    // The two waiting connections hold sessions: a fourth is over max_sessions.
    let mut over = behind(p.addr, &v1("192.0.2.43:1", "198.51.100.1:110"));
    assert_eq!(over.greeting, "-ERR [SYS/TEMP] too many connections");
    assert!(over.read_to_end().is_empty());
    assert!(good.cmd("QUIT").starts_with("+OK"));
    drop((silent, half));
    // Their slots come back when they go.
    wait_until("slots freed", || {
        let mut c = behind(p.addr, &v1("192.0.2.44:1", "198.51.100.1:110"));
        c.greeting.starts_with("+OK") && c.cmd("QUIT").starts_with("+OK")
    });
}

#[test]
fn the_login_penalty_follows_the_headers_client_not_the_balancer() {
    let h = Harness::new();
    let up = demo(&h);
    let audit = tempfile::tempdir().unwrap();
    let delay = Duration::from_millis(800);
    let p = balanced(
        &h,
        up.local_addr(),
        "",
        audit.path(),
        "[limits]\nlogin_fail_delay = \"800ms\"\nlogin_fail_delay_max = \"1600ms\"\n",
    );
    let fail = |c: &mut RawPop| {
        assert!(c.cmd(&format!("USER {USER}")).starts_with("+OK"));
        let t = Instant::now();
        let r = c.cmd("PASS wrong");
        assert!(r.starts_with("-ERR"), "{r}");
        t.elapsed()
    };
    let mut bad = behind(p.addr, &v1("192.0.2.51:1", "198.51.100.1:110"));
    let took: Vec<Duration> = (0..3).map(|_| fail(&mut bad)).collect();
    assert!(took[2] >= delay, "3rd failure of 192.0.2.51 after {took:?}");
    // Another client behind the same balancer is not penalised.
    let mut other = behind(p.addr, &v2("192.0.2.52:1", "198.51.100.1:110"));
    let t = fail(&mut other);
    assert!(t < delay, "first failure of 192.0.2.52 after {t:?}");
}

#[test]
fn the_header_and_the_client_hello_in_one_segment_on_an_implicit_tls_listener() {
    let h = Harness::new();
    let up = demo(&h);
    let pki = TestPki::new();
    let (cert, key) = pki.issue(&["localhost"]);
    let audit = tempfile::tempdir().unwrap();
    let p = balanced(
        &h,
        up.local_addr(),
        "tls = \"implicit\"",
        audit.path(),
        &format!("[tls]\ncert = {cert:?}\nkey = {key:?}\n"),
    );
    let cfg = common::certs::rustls_client(pki.ca_path());
    let mut tls = rustls::ClientConnection::new(cfg, "localhost".try_into().unwrap()).unwrap();
    let mut first = v2("192.0.2.61:6100", "198.51.100.1:995");
    tls.write_tls(&mut first).unwrap();
    let mut tcp = connect_from(ip("127.0.0.1"), p.addr);
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(&first).unwrap();
    let mut r = BufReader::new(rustls::StreamOwned::new(tls, tcp));
    let mut greeting = String::new();
    r.read_line(&mut greeting).unwrap();
    assert!(greeting.starts_with("+OK"), "{greeting}");
    r.get_mut().write_all(b"QUIT\r\n").unwrap();
    let mut bye = String::new();
    r.read_line(&mut bye).unwrap();
    assert!(bye.starts_with("+OK"), "{bye}");
    wait_until("session audited", || !clients(audit.path()).is_empty());
    assert_eq!(clients(audit.path())[0], "192.0.2.61:6100");
}

/// A scripted upstream on 127.0.0.1 for XCLIENT edge cases (a real Dovecot cannot be made to
/// split its greeting or refuse a well-formed XCLIENT): for each accepted connection in turn,
/// `script` gets the stream and returns the lines it read. Runs in a thread; the lines of all
/// connections come back through the handle.
fn scripted(
    scripts: Vec<fn(&mut TcpStream) -> Vec<String>>,
) -> (SocketAddr, std::thread::JoinHandle<Vec<Vec<String>>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        scripts
            .into_iter()
            .map(|script| {
                let (mut s, _) = l.accept().unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                script(&mut s)
            })
            .collect()
    });
    (addr, t)
}

/// Every line until the peer closes.
fn lines_until_eof(s: &mut TcpStream) -> Vec<String> {
    BufReader::new(s).lines().map_while(Result::ok).collect()
}

#[test]
fn xclient_upstream_edge_cases_split_greeting_refusal_and_close() {
    let (up, server) = scripted(vec![
        // The greeting in three writes; XCLIENT accepted; then a normal session.
        |s| {
            for part in [&b"+OK [XCL"[..], b"IENT] fake", b" ready.\r\n"] {
                s.write_all(part).unwrap();
                std::thread::sleep(Duration::from_millis(50));
            }
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut got = Vec::new();
            let mut line = String::new();
            while r.read_line(&mut line).unwrap() > 0 {
                got.push(line.trim_end().to_owned());
                let reply: &[u8] = if line.starts_with("QUIT") {
                    b"+OK bye\r\n"
                } else {
                    b"+OK\r\n"
                };
                s.write_all(reply).unwrap();
                if line.starts_with("QUIT") {
                    break;
                }
                line.clear();
            }
            got
        },
        // XCLIENT refused.
        |s| {
            s.write_all(b"+OK [XCLIENT] fake ready.\r\n").unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            s.write_all(b"-ERR not now\r\n").unwrap();
            let mut got = vec![line.trim_end().to_owned()];
            got.extend(lines_until_eof(s));
            got
        },
        // The server closes instead of answering XCLIENT.
        |s| {
            s.write_all(b"+OK [XCLIENT] fake ready.\r\n").unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            vec![line.trim_end().to_owned()]
        },
    ]);
    let h = Harness::new();
    let p = h.proxy(
        up,
        "forward_client = \"xclient\"\n[limits]\nunknown_commands = \"single-line\"\n",
    );
    let mut c = RawPop::over(connect_from(ip("127.0.0.5"), p.addr));
    assert_eq!(c.line(), "+OK fake ready.");
    assert_eq!(
        c.cmd("XCLIENT ADDR=192.0.2.66"),
        "-ERR XCLIENT is not allowed"
    );
    assert!(c.cmd("QUIT").starts_with("+OK"));
    for _ in 0..2 {
        let mut c = RawPop::over(connect_from(ip("127.0.0.5"), p.addr));
        let refused = c.line();
        assert!(refused.starts_with("-ERR [SYS/TEMP]"), "{refused}");
        assert!(c.read_to_end().is_empty());
    }
    drop(p);
    let seen = server.join().unwrap();
    let xclient = |l: &String| {
        l.starts_with("XCLIENT ADDR=127.0.0.5 PORT=")
            && l.contains(" SESSION=popgate-")
            && l.ends_with(" TTL=4")
    };
    // Only popgate's own XCLIENT, then the client's QUIT; never a QUIT of popgate's own.
    assert_eq!(seen[0].len(), 2, "{seen:?}");
    assert!(xclient(&seen[0][0]) && seen[0][1] == "QUIT", "{seen:?}");
    for refused in &seen[1..] {
        assert_eq!(refused.len(), 1, "{seen:?}");
        assert!(xclient(&refused[0]), "{seen:?}");
    }
}

#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn a_client_cannot_smuggle_xclient_or_a_proxy_header_to_a_trusting_dovecot() {
    // Dovecot trusts popgate (login_trusted_networks, haproxy_trusted_networks): any XCLIENT
    // reaching it from popgate would be believed. popgate forwards unknown commands here
    // (single-line), in every forward mode, and every attempt comes pipelined in one write with
    // a real login after it.
    let dv = Dovecot::start(DovecotOpts::trusting_popgate().user(USER, "bob-pass", bob_msgs()));
    let h = Harness::new();
    let spoof = "192.0.2.66";
    let attempts: &[&[u8]] = &[
        b"CAPA\r\nXCLIENT ADDR=192.0.2.66 PORT=1\r\n",
        b"XCLIENT ADDR=192.0.2.66\n",
        b"\tXcLiEnT ADDR=192.0.2.66\r\n",
        b"XCLIENT\0 ADDR=192.0.2.66\r\n",
        b"NOOP\nXCLIENT ADDR=192.0.2.66\r\n",
        // Unknown mechanism: refused by popgate; the next line is not a command.
        b"AUTH BOGUS\r\nXCLIENT ADDR=192.0.2.66\r\n",
        // Inside a SASL exchange the line is an answer (Dovecot refuses it as base64).
        b"AUTH PLAIN\r\nXCLIENT ADDR=192.0.2.66\r\n",
        // After a cancelled exchange.
        b"AUTH PLAIN\r\n*\r\nXCLIENT ADDR=192.0.2.66\r\n",
        b"USER bob\r\nXCLIENT ADDR=192.0.2.66\r\n",
        // A second PROXY header is a POP3 line: Dovecot's haproxy listener reads only the first.
        b"PROXY TCP4 192.0.2.66 127.0.0.1 1 110\r\n",
    ];
    let modes = [
        ("none", dv.pop3, "127.0.0.1"),
        ("xclient", dv.pop3, "127.0.0.5"),
        ("proxy-v1", dv.pop3_haproxy.unwrap(), "127.0.0.5"),
        ("proxy-v2", dv.pop3_haproxy.unwrap(), "127.0.0.5"),
    ];
    for (mode, upstream, rip) in modes {
        let p = h.proxy(
            upstream,
            &format!(
                "forward_client = \"{mode}\"\n[limits]\nunknown_commands = \"single-line\"\n\
                 login_fail_delay = \"0s\"\n"
            ),
        );
        let before = dv.login_rips().len();
        for attempt in attempts {
            let mut c = RawPop::over(connect_from(ip("127.0.0.5"), p.addr));
            let greeting = c.line();
            assert!(
                greeting.starts_with("+OK") && !greeting.contains("XCLIENT"),
                "{greeting}"
            );
            c.send_raw(attempt);
            // Then a real login, and the maildrop is left as it was.
            c.send_raw(b"USER bob\r\nPASS bob-pass\r\nCAPA\r\nQUIT\r\n");
            let rest = String::from_utf8_lossy(&c.read_to_end()).into_owned();
            // Not in either CAPA list.
            assert!(!rest.lines().any(|l| l.starts_with("XCLIENT")), "{rest}");
            assert!(rest.contains("-ERR"), "{attempt:?}: {rest}");
            assert!(
                rest.trim_end().ends_with("+OK Logging out."),
                "{attempt:?}: {rest}"
            );
        }
        wait_until("Dovecot logged the logins", || {
            dv.login_rips().len() >= before + attempts.len()
        });
        let rips = dv.login_rips();
        assert!(rips[before..].iter().all(|r| r == rip), "{mode}: {rips:?}");
    }
    assert!(!dv.log().contains(spoof), "{}", dv.log());
}

#[test]
fn a_balancer_that_hangs_up_after_the_header_costs_the_upstream_no_quit() {
    // HAProxy health checks (`check` with send-proxy-v2) send a LOCAL header and close; a
    // client may close right after its first command. popgate never QUITs for them.
    let h = Harness::new();
    let up = demo(&h);
    let audit = tempfile::tempdir().unwrap();
    let p = balanced(&h, up.local_addr(), "", audit.path(), "");
    let mut first_command = v1("192.0.2.71:1", "198.51.100.1:110");
    first_command.extend_from_slice(format!("USER {USER}\r\nPASS {PASS}\r\n").as_bytes());
    for bytes in [
        v2_raw(0x20, 0x00, b""),
        v2("192.0.2.72:1", "198.51.100.1:110"),
        first_command,
    ] {
        let mut s = connect_from(ip("127.0.0.1"), p.addr);
        s.write_all(&bytes).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let _ = closed(s);
    }
    wait_until("sessions closed", || {
        audit_events(audit.path())
            .iter()
            .filter(|e| e["event"] == "session_close")
            .count()
            == 3
    });
    assert_eq!(up.quit_count(), 0, "{:?}", received(&up));
}

#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn an_ipv6_client_behind_the_balancer_reaches_dovecot_in_every_forward_mode() {
    let dv = Dovecot::start(DovecotOpts::trusting_popgate().user(USER, "bob-pass", bob_msgs()));
    let h = Harness::new();
    let modes = [
        ("xclient", dv.pop3, "2001:db8::7"),
        ("proxy-v1", dv.pop3_haproxy.unwrap(), "2001:db8::8"),
        ("proxy-v2", dv.pop3_haproxy.unwrap(), "2001:db8::9"),
    ];
    for (mode, upstream, client) in modes {
        let p = h.proxy_toml(&format!(
            "[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:0\"\nproxy_protocol = true\n\
             trusted_proxies = [\"127.0.0.1\"]\n\
             [upstream]\naddress = \"{upstream}\"\nforward_client = \"{mode}\"\n"
        ));
        let before = dv.login_rips().len();
        let mut c = behind(
            p.addr,
            &v2(&format!("[{client}]:40000"), "[2001:db8::1]:110"),
        );
        assert!(c.greeting.starts_with("+OK"), "{mode}: {}", c.greeting);
        assert!(c.cmd(&format!("USER {USER}")).starts_with("+OK"));
        assert!(c.cmd("PASS bob-pass").starts_with("+OK"), "{mode}");
        assert!(c.cmd("QUIT").starts_with("+OK"));
        wait_until("Dovecot logged the login", || {
            dv.login_rips().len() > before
        });
        assert_eq!(dv.login_rips()[before], client, "{mode}: {}", dv.log());
    }
}

#[test]
fn shutdown_does_not_wait_for_a_header_that_is_not_coming() {
    let h = Harness::new();
    let up = demo(&h);
    let audit = tempfile::tempdir().unwrap();
    let mut p = balanced(
        &h,
        up.local_addr(),
        "proxy_timeout = \"60s\"",
        audit.path(),
        "",
    );
    let silent = connect_from(ip("127.0.0.1"), p.addr);
    std::thread::sleep(Duration::from_millis(300));
    p.shutdown_within(&h, Duration::from_secs(5), "a PROXY header");
    assert_eq!(closed(silent), b"");
    assert_eq!(up.connections(), 0);
}

#[test]
fn transcript_networks_and_file_names_use_the_headers_client() {
    let h = Harness::new();
    let up = demo(&h);
    let audit = tempfile::tempdir().unwrap();
    let transcripts = tempfile::tempdir().unwrap();
    let p = balanced(
        &h,
        up.local_addr(),
        "",
        audit.path(),
        &format!(
            "[audit.transcript]\ndir = {:?}\nnetworks = [\"192.0.2.0/24\"]\n",
            transcripts.path()
        ),
    );
    for client in ["192.0.2.81:4081", "198.51.100.9:4082"] {
        let mut c = behind(p.addr, &v1(client, "198.51.100.1:110"));
        assert!(c.greeting.starts_with("+OK"), "{}", c.greeting);
        assert!(c.cmd("QUIT").starts_with("+OK"));
    }
    wait_until("both sessions closed", || {
        audit_events(audit.path())
            .iter()
            .filter(|e| e["event"] == "session_close")
            .count()
            == 2
    });
    drop(p);
    let files: Vec<std::path::PathBuf> = std::fs::read_dir(transcripts.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.contains("-192.0.2.81-4081"), "{name}");
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert!(
        text.contains("192.0.2.81:4081") && text.contains("via proxy 127.0.0.1:"),
        "{text}"
    );
}
