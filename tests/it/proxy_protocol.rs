//! PROXY protocol on listeners (`proxy_protocol = true`, `trusted_proxies`), through the real
//! binary in front of the recording demo upstream, loopback only: the client address from a
//! trusted balancer's header is what rules, per-IP limits, logs and the audit trail see; untrusted peers, missing, malformed and slow headers are closed before
//! anything reaches the upstream. curl's `--haproxy-protocol` covers STLS and implicit TLS
//! (header before the handshake).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::certs::TestPki;
use common::clients::{RawPop, connect_from, curl};
use common::proxy::{Harness, PopgateOpts, PopgateProcess, mailbox};
use common::proxy_header::{ip, v1, v2};
use common::{audit_events, wait_until};
use popgate_demo::{DemoServer, ServerOptions};

const USER: &str = "bob";
const PASS: &str = "bob-secret";
const MESSAGE: &[u8] = b"Subject: via a balancer\r\n\r\nhello\r\n";

fn demo(h: &Harness) -> DemoServer {
    h.upstream(ServerOptions::new(vec![mailbox(
        USER,
        PASS,
        vec![MESSAGE.to_vec()],
    )]))
}

/// A POP3 client that connects from `from`, sends `header` and reads the greeting.
fn behind(from: &str, to: SocketAddr, header: &[u8]) -> RawPop {
    let mut s = connect_from(ip(from), to);
    s.write_all(header).unwrap();
    let mut c = RawPop::over(s);
    c.greeting = c.line();
    c
}

/// What a refused connection gets: everything the server sent before closing, within 5 s.
fn until_closed(mut s: TcpStream) -> (Vec<u8>, Duration) {
    let t = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("connection not closed within 5 s ({e}); got {got:?}"),
        }
    }
    (got, t.elapsed())
}

fn session_opens(dir: &std::path::Path) -> Vec<serde_json::Value> {
    audit_events(dir)
        .into_iter()
        .filter(|e| e["event"] == "session_open")
        .collect()
}

/// A connect rule that denies the client 192.0.2.66.
const NO_DOC_NET: &str = "[[rule]]\nname = \"no-doc-net\"\non = \"connect\"\n\
                          client = \"192.0.2.66\"\naction = \"deny\"\n\
                          message = \"not from there\"\n";

/// A listener that takes PROXY headers from 127.0.0.1, with `rules` in a rule file.
fn balanced_with_rules(rules: &str) -> PopgateOpts {
    PopgateOpts::new()
        .top("rules = [\"r.toml\"]\n")
        .file("r.toml", rules)
        .listener("proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1\"]\n")
}

#[test]
fn the_balancers_client_is_what_rules_limits_audit_and_the_upstream_see() {
    let h = Harness::new();
    let up = demo(&h);
    let p = PopgateProcess::run(
        up.local_addr(),
        balanced_with_rules(NO_DOC_NET)
            .tables(
                "[limits]\nmax_sessions_per_ip = 1\n\
                 [audit]\nenabled = true\ndir = \"audit\"\n",
            )
            .log_to_dir("info")
            .wait_for_log(),
    );
    // Session 1 (v1 header): logged in and held open.
    let mut first = behind(
        "127.0.0.1",
        p.addr,
        &v1("192.0.2.7:40000", "198.51.100.1:110"),
    );
    assert!(first.greeting.starts_with("+OK"), "{}", first.greeting);
    assert!(first.cmd(&format!("USER {USER}")).starts_with("+OK"));
    assert!(first.cmd(&format!("PASS {PASS}")).starts_with("+OK"));
    // The same client through the same balancer again: its own per-IP cap (1) is full ...
    let mut again = behind(
        "127.0.0.1",
        p.addr,
        &v2("192.0.2.7:40001", "198.51.100.1:110"),
    );
    assert_eq!(
        again.greeting,
        "-ERR [SYS/TEMP] too many connections from your address"
    );
    assert!(again.read_to_end().is_empty());
    // ... while another client behind the same balancer (the same peer address) is served.
    let mut other = behind(
        "127.0.0.1",
        p.addr,
        &v2("[2001:db8::8]:40002", "[2001:db8::1]:110"),
    );
    assert!(other.greeting.starts_with("+OK"), "{}", other.greeting);
    assert!(other.cmd("QUIT").starts_with("+OK"));
    // A `client` rule matches the address from the header, not the balancer's.
    let denied = behind("127.0.0.1", p.addr, &v1("192.0.2.66:5", "198.51.100.1:110"));
    assert!(
        denied.greeting.starts_with("-ERR") && denied.greeting.contains("not from there"),
        "{}",
        denied.greeting
    );
    assert!(first.cmd("QUIT").starts_with("+OK"));

    let dir = p.dir.path().join("audit");
    wait_until("two sessions audited", || session_opens(&dir).len() >= 2);
    let opens = session_opens(&dir);
    let clients: Vec<&str> = opens
        .iter()
        .map(|e| e["client"].as_str().unwrap())
        .collect();
    assert!(clients.contains(&"192.0.2.7:40000"), "{clients:?}");
    assert!(clients.contains(&"[2001:db8::8]:40002"), "{clients:?}");
    for e in &opens {
        let proxy: SocketAddr = e["proxy"].as_str().expect("proxy field").parse().unwrap();
        assert_eq!(proxy.ip(), ip("127.0.0.1"), "{e}");
        assert!(e["local"] == "198.51.100.1:110" || e["local"] == "[2001:db8::1]:110");
    }
    let log = p.log();
    assert!(
        log.contains("client=192.0.2.7:40000") && log.contains("proxy=127.0.0.1:"),
        "{log}"
    );
    // Only the two served clients reached the upstream.
    assert_eq!(up.connections(), 2);
}

#[test]
fn untrusted_missing_garbage_and_slow_headers_never_reach_the_upstream() {
    let h = Harness::new();
    let up = demo(&h);
    let metrics = format!("127.0.0.1:{}", common::free_port());
    let p = PopgateProcess::run(
        up.local_addr(),
        PopgateOpts::new()
            .listener(
                "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1\"]\n\
                 proxy_timeout = \"300ms\"\n",
            )
            .tables(&format!("[metrics]\nbind = \"{metrics}\"\n"))
            .log_to_dir("info")
            .wait_for_log(),
    );
    // With `[metrics]`, popgate dials the upstream once at start (a TCP probe, no bytes).
    wait_until("the start probe", || up.connections() == 1);
    let header = v2("192.0.2.7:40000", "198.51.100.1:110");
    // A valid header from a peer that is not a trusted balancer: a client spoofing its address.
    let mut s = connect_from(ip("127.0.0.9"), p.addr);
    // (Writes may fail: popgate closes at once.)
    let _ = s.write_all(&header);
    let _ = s.write_all(b"USER bob\r\n");
    assert_eq!(until_closed(s).0, b"");
    // A trusted peer that sends no header, but POP3 ...
    let mut s = connect_from(ip("127.0.0.1"), p.addr);
    let _ = s.write_all(b"USER bob\r\nPASS bob-secret\r\n");
    assert_eq!(until_closed(s).0, b"");
    // ... or a TLS ClientHello, or garbage after a v1 start, or a header with a bad address.
    for junk in [
        &b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"[..],
        b"PROXY TCP4 192.0.2.7 999.0.0.1 1 110\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 1\r\n",
        b"PROXY UDP4 192.0.2.7 198.51.100.1 1 110\r\n",
    ] {
        let mut s = connect_from(ip("127.0.0.1"), p.addr);
        let _ = s.write_all(junk);
        assert_eq!(until_closed(s).0, b"", "{junk:?}");
    }
    // Slow: half a header, then nothing; and a header announcing more than it sends.
    for part in [&header[..20], &header[..16], b"PROXY TCP4 192.0."] {
        let mut s = connect_from(ip("127.0.0.1"), p.addr);
        s.write_all(part).unwrap();
        let (got, took) = until_closed(s);
        assert_eq!(got, b"");
        assert!(took >= Duration::from_millis(250), "closed after {took:?}");
    }
    // Silence: nothing at all.
    let (got, took) = until_closed(connect_from(ip("127.0.0.1"), p.addr));
    assert_eq!(got, b"");
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");

    // Nothing of it reached the upstream: not a connection (but the probe), not a byte.
    assert_eq!(up.connections(), 1);
    assert!(up.received().is_empty());
    let log = p.wait_log("PROXY header refused", 9);
    assert!(
        log.contains("outside trusted_proxies") && log.contains("peer=127.0.0.9:"),
        "{log}"
    );
    let scrape = curl(&[&format!("http://{metrics}/metrics")]);
    let scrape = String::from_utf8_lossy(&scrape.stdout);
    assert!(
        scrape.contains("popgate_sessions_refused_total{reason=\"proxy_header\"} 10"),
        "{scrape}"
    );
    // The listener still serves a good header afterwards.
    let mut ok = behind("127.0.0.1", p.addr, &header);
    assert!(ok.greeting.starts_with("+OK"), "{}", ok.greeting);
    assert!(ok.cmd("QUIT").starts_with("+OK"));
    assert_eq!(up.connections(), 2);
}

#[test]
fn the_header_comes_before_stls_and_before_an_implicit_tls_handshake() {
    let h = Harness::new();
    let up = demo(&h);
    let pki = TestPki::new();
    let (cert, key) = pki.issue(&["localhost", "127.0.0.1"]);
    let audit = tempfile::tempdir().unwrap();
    for (mode, scheme, extra) in [
        ("starttls", "pop3", vec!["--ssl-reqd"]),
        ("implicit", "pop3s", vec![]),
    ] {
        let p = PopgateProcess::run(
            up.local_addr(),
            PopgateOpts::new()
                .listener(&format!(
                    "tls = \"{mode}\"\nproxy_protocol = true\n\
                     trusted_proxies = [\"127.0.0.0/8\"]\n"
                ))
                .tables(&format!(
                    "[tls]\ncert = {cert:?}\nkey = {key:?}\n\
                     [audit]\nenabled = true\ndir = {:?}\n",
                    audit.path().join(mode)
                ))
                .wait_for_log()
                .log_to_dir("info"),
        );
        let url = format!("{scheme}://127.0.0.1:{}/1", p.addr.port());
        let ca = pki.ca_path().to_str().unwrap().to_owned();
        let mut args = vec![
            "-sS",
            "--haproxy-protocol",
            "--interface",
            "127.0.0.5",
            "--cacert",
            &ca,
            "--user",
            "bob:bob-secret",
        ];
        args.extend(extra.iter().copied());
        args.push(&url);
        let out = curl(&args);
        assert!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, MESSAGE, "{mode}");
        let dir = audit.path().join(mode);
        wait_until("session audited", || !session_opens(&dir).is_empty());
        let open = &session_opens(&dir)[0];
        let client: SocketAddr = open["client"].as_str().unwrap().parse().unwrap();
        assert_eq!(client.ip(), ip("127.0.0.5"), "{mode}: {open}");
        assert!(open["proxy"].is_string(), "{mode}: {open}");
    }
}

#[test]
fn the_deployment_load_balancer_example_is_a_valid_config() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/deployment.md"))
        .unwrap();
    let blocks: Vec<&str> = doc
        .split("```toml\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .filter(|b| b.contains("proxy_protocol"))
        .collect();
    assert_eq!(blocks.len(), 1, "the load balancer example");
    let path = std::path::Path::new("docs/deployment.md");
    let config = popgate::Config::parse(blocks[0], path).expect("parses");
    config.validate(path).expect("valid");
    assert!(config.listeners[0].proxy_protocol);
    assert_eq!(
        config.upstreams[0].forward_client,
        popgate::config::ForwardClient::ProxyV2
    );
}

// ---------------------------------------------------------------------------------------------
// `forward_client = "proxy-v2"` toward Dovecot with `disable_plaintext_auth = yes`

/// The deployment guide's balancer recipe against Dovecot's default plaintext policy: popgate forwards
/// the client with PROXY v2 to a `haproxy = yes` listener (on 127.0.0.2, so that Dovecot does
/// not count the loopback connection as secured). TLS clients (implicit TLS and STLS, with
/// SASL PLAIN and LOGIN, and with USER/PASS) log in, because the header's SSL TLV says they
/// used TLS; a plaintext client is refused by Dovecot, as it would be if it connected directly.
/// In direct mode (dialled at connect, again after STLS) and in routing mode (at the login).
/// HAProxy against the same listener is the reference: `send-proxy-v2-ssl` logs in,
/// `send-proxy-v2` does not.
#[test]
#[ignore = "needs dovecot and haproxy (run .ci/run)"]
fn dovecot_lets_tls_clients_log_in_with_plain_through_proxy_v2_and_refuses_plaintext_ones() {
    use common::clients::url;
    use common::dovecot::{Dovecot, DovecotOpts, bob_msgs, served};
    let dv = Dovecot::start(
        DovecotOpts {
            listen: Some("127.0.0.2".parse().unwrap()),
            haproxy_listener: true,
            extra_conf: "disable_plaintext_auth = yes\n".into(),
            ..DovecotOpts::default()
        }
        .user("bob", "bob-pass", bob_msgs()),
    );
    let h = Harness::new();
    let pki = TestPki::new();
    let (cert, key) = pki.issue(&["localhost", "127.0.0.1"]);
    let listeners = format!(
        "[[listener]]\nname = \"stls\"\nbind = \"127.0.0.1:0\"\ntls = \"starttls\"\n\
         [[listener]]\nname = \"pop3s\"\nbind = \"127.0.0.1:0\"\ntls = \"implicit\"\n\
         [tls]\ncert = {cert:?}\nkey = {key:?}\n"
    );
    let haproxy = dv.pop3_haproxy.unwrap();
    let ca = pki.ca_path().display().to_string();
    let want = served(&bob_msgs()[0]);
    // Direct mode (the server dialled at connect, again after STLS) and routing mode (dialled
    // at the login).
    for (mode, upstreams) in [
        (
            "direct",
            format!("[upstream]\naddress = \"{haproxy}\"\nforward_client = \"proxy-v2\"\n"),
        ),
        (
            "routing",
            format!(
                "[[upstream]]\nname = \"dovecot\"\naddress = \"{haproxy}\"\n\
                 forward_client = \"proxy-v2\"\n[routing]\ndefault = \"dovecot\"\n"
            ),
        ),
    ] {
        let p = h.proxy_toml(&format!("{listeners}{upstreams}"));
        let (stls, pop3s) = (p.addrs[0], p.addrs[1]);
        // The plaintext mechanisms only (curl would pick CRAM-MD5, which Dovecot allows anyway).
        for mech in ["AUTH=PLAIN", "AUTH=LOGIN"] {
            for (label, tls_args, u) in [
                ("pop3s", vec!["--cacert", &ca], url("pop3s", pop3s, "1")),
                (
                    "STLS",
                    vec!["--ssl-reqd", "--cacert", &ca],
                    url("pop3", stls, "1"),
                ),
            ] {
                let mut a = vec!["-u", "bob:bob-pass", "--login-options", mech];
                a.extend(tls_args);
                a.push(&u);
                let out = curl(&a);
                assert!(
                    out.status.success() && out.stdout == want,
                    "{mode}: {label} {mech}: {out:?}\n{}",
                    dv.log()
                );
                // Without TLS (the STLS listener, STLS not used): Dovecot refuses it.
                let out = curl(&[
                    "-u",
                    "bob:bob-pass",
                    "--login-options",
                    mech,
                    &url("pop3", stls, "1"),
                ]);
                assert!(!out.status.success(), "{mode}: plaintext {mech}: {out:?}");
            }
        }
        // USER/PASS: over STLS accepted, in plaintext refused with Dovecot's own reason.
        let mut c = RawPop::over(TcpStream::connect(stls).unwrap());
        c.greeting = c.line();
        let reply = match c.cmd("USER bob") {
            r if r.starts_with("+OK") => c.cmd("PASS bob-pass"),
            r => r,
        };
        assert!(
            reply.starts_with("-ERR") && reply.contains("Plaintext authentication disallowed"),
            "{mode}: {reply}"
        );
        let out = std::process::Command::new("python3")
            .args(["-c", POPLIB_STLS_USER])
            .arg(stls.port().to_string())
            .arg(&ca)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{mode}: poplib stls() then USER/PASS: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The reference the issue names: HAProxy terminating TLS toward the same Dovecot
    // listener. With `send-proxy-v2-ssl` the PLAIN login works; with `send-proxy-v2` (no SSL
    // TLV, what popgate sent before) Dovecot refuses it, as it refused popgate's TLS clients.
    let (hp_cert, hp_key) = pki.issue(&["localhost", "127.0.0.1"]);
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("haproxy.pem");
    let mut both = std::fs::read(hp_cert).unwrap();
    both.extend(std::fs::read(hp_key).unwrap());
    std::fs::write(&pem, both).unwrap();
    for (send, logs_in) in [("send-proxy-v2-ssl", true), ("send-proxy-v2", false)] {
        let front: SocketAddr = format!("127.0.0.1:{}", common::free_port())
            .parse()
            .unwrap();
        let _hp = start_haproxy(
            dir.path(),
            &format!(
                "frontend pop3s\n  bind {front} ssl crt {}\n  default_backend dovecot\n\
                 backend dovecot\n  server dv {haproxy} {send}\n",
                pem.display()
            ),
            front,
        );
        let out = curl(&[
            "-u",
            "bob:bob-pass",
            "--login-options",
            "AUTH=PLAIN",
            "--cacert",
            &ca,
            &url("pop3s", front, "1"),
        ]);
        assert_eq!(
            out.status.success() && out.stdout == want,
            logs_in,
            "HAProxy {send}: {out:?}"
        );
    }
    assert_eq!(dv.message_count("bob"), bob_msgs().len());
}

/// `haproxy -db` with `defaults` (mode tcp) and `sections`, listening on `front`; killed on
/// drop.
fn start_haproxy(dir: &std::path::Path, sections: &str, front: SocketAddr) -> KillOnDrop {
    let exe = common::find_exe("haproxy").expect("haproxy not installed: run .ci/run");
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 100\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  \
             timeout server 30s\n{sections}"
        ),
    )
    .unwrap();
    let child = std::process::Command::new(exe)
        .args(["-db", "-q", "-f"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("haproxy.err")).unwrap())
        .spawn()
        .expect("spawn haproxy");
    let mut hp = KillOnDrop(child);
    // Listening once its port cannot be bound (no probe connection).
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpListener::bind(front).is_ok() {
        if let Ok(Some(status)) = hp.0.try_wait() {
            panic!(
                "haproxy exited: {status}: {}",
                std::fs::read_to_string(dir.join("haproxy.err")).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "haproxy did not listen on {front}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    hp
}

/// A child process killed (and reaped) when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// poplib: STLS, then USER/PASS and STAT; argv: port, CA file.
const POPLIB_STLS_USER: &str = "import poplib, ssl, sys\n\
ctx = ssl.create_default_context(cafile=sys.argv[2])\n\
p = poplib.POP3('127.0.0.1', int(sys.argv[1]), timeout=20)\n\
p.stls(context=ctx)\n\
p.user('bob')\n\
p.pass_('bob-pass')\n\
print(p.stat())\n\
p.quit()\n";

/// popgate with a STLS listener (certificate from `pki`) and `forward_client = "proxy-v2"` to
/// the upstream at `addr`, `upstream_extra` added to its `[upstream]` table.
fn stls_proxy_v2_to(
    h: &Harness,
    pki: &TestPki,
    addr: SocketAddr,
    upstream_extra: &str,
) -> common::proxy::ProxyHandle {
    let (cert, key) = pki.issue(&["localhost", "127.0.0.1"]);
    h.proxy_toml(&format!(
        "[[listener]]\nname = \"stls\"\nbind = \"127.0.0.1:0\"\ntls = \"starttls\"\n\
         [tls]\ncert = {cert:?}\nkey = {key:?}\n\
         [upstream]\naddress = \"{addr}\"\nforward_client = \"proxy-v2\"\n{upstream_extra}"
    ))
}

/// popgate (a STLS listener, `forward_client = "proxy-v2"` to the stub server at `addr`) and
/// poplib through it: STLS, a login as bob with `pass` (`login`: "user" or "apop"), STAT; each
/// must work.
fn poplib_stat_over_stls_with_proxy_v2_to(addr: SocketAddr, pass: &str, login: &str) {
    let h = Harness::new();
    let pki = TestPki::new();
    let p = stls_proxy_v2_to(&h, &pki, addr, "");
    let mut spec = common::clients::poplib_spec(p.addrs[0], "bob", pass);
    spec["mode"] = "stls".into();
    spec["login"] = login.into();
    spec["cafile"] = pki.ca_path().display().to_string().into();
    spec["actions"] = serde_json::json!([["stat"]]);
    let out = common::clients::poplib(spec);
    assert_eq!(out["tls"], "stls", "{out}");
    assert_eq!(
        out["login"]["ok"], true,
        "{login} after STLS refused: {out}"
    );
    assert_eq!(out["results"][0]["ok"], true, "{out}");
}

/// What a [`Stub`] does with a line.
enum Answer {
    /// Writes this.
    Say(&'static str),
    /// Writes this and hangs up.
    SayAndClose(&'static str),
    /// Nothing.
    Nothing,
}

/// A stub POP3 server behind `forward_client = "proxy-v2"` on loopback. It accepts up to
/// `max` connections, numbered from 1, each served on its own thread until the peer closes,
/// the stub hangs up or 20 s pass without a line: it reads the PROXY v2 header, greets with
/// `greeting(n)` (none: never) and answers each line with `answer(n, line)`.
struct Stub {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// Every line received (without its CRLF), with its connection's number.
    lines: Arc<Mutex<Vec<(usize, String)>>>,
}

impl Stub {
    fn start(
        max: usize,
        greeting: fn(usize) -> Option<String>,
        answer: fn(usize, &str) -> Answer,
    ) -> Stub {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let stub = Stub {
            addr,
            accepted: Arc::default(),
            lines: Arc::default(),
        };
        let (count, seen) = (stub.accepted.clone(), stub.lines.clone());
        std::thread::spawn(move || {
            for stream in server.incoming().take(max) {
                let Ok(stream) = stream else { return };
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                let seen = seen.clone();
                std::thread::spawn(move || Stub::serve(stream, n, greeting, answer, &seen));
            }
        });
        stub
    }

    fn serve(
        mut stream: TcpStream,
        n: usize,
        greeting: fn(usize) -> Option<String>,
        answer: fn(usize, &str) -> Answer,
        seen: &Mutex<Vec<(usize, String)>>,
    ) {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut head = [0u8; 16];
        if stream.read_exact(&mut head).is_err() {
            return;
        }
        let mut rest = vec![0u8; u16::from_be_bytes([head[14], head[15]]) as usize];
        if stream.read_exact(&mut rest).is_err() {
            return;
        }
        if let Some(greeting) = greeting(n) {
            let _ = stream.write_all(greeting.as_bytes());
        }
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            let l = line.trim_end().to_owned();
            seen.lock().unwrap().push((n, l.clone()));
            match answer(n, &l) {
                Answer::Say(reply) => {
                    if stream.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
                Answer::SayAndClose(reply) => {
                    let _ = stream.write_all(reply.as_bytes());
                    return;
                }
                Answer::Nothing => {}
            }
            line.clear();
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn lines(&self) -> Vec<(usize, String)> {
        self.lines.lock().unwrap().clone()
    }
}

/// The first word of `line`, in upper case.
fn verb(line: &str) -> String {
    line.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase()
}

/// What the POP3 stubs answer alike: CAPA (USER, UIDL), STAT of an empty maildrop, QUIT;
/// `-ERR unknown` to anything else.
fn stub_pop3(line: &str) -> Answer {
    match verb(line).as_str() {
        "CAPA" => Answer::Say("+OK\r\nUSER\r\nUIDL\r\n.\r\n"),
        "STAT" => Answer::Say("+OK 0 0\r\n"),
        "QUIT" => Answer::SayAndClose("+OK bye\r\n"),
        _ => Answer::Say("-ERR unknown\r\n"),
    }
}

/// A server behind `forward_client = "proxy-v2"` that greets with an APOP timestamp keeps its
/// connection across the client's STLS: dialling it again (to say "TLS" in a new header) would
/// bring a new timestamp, and the APOP digest the client made from the first one would fail.
/// The stub server greets each connection with its own timestamp and checks the digest.
#[test]
fn apop_after_stls_stays_on_the_connection_whose_timestamp_the_client_hashed() {
    fn stamp(n: usize) -> String {
        format!("<{n}.4242@stub>")
    }
    // A greeting with connection `n`'s own timestamp, CAPA, APOP (checked against that
    // timestamp), STAT, QUIT.
    let stub = Stub::start(
        4,
        |n| Some(format!("+OK stub ready {}\r\n", stamp(n))),
        |n, line| {
            let digest = popgate_demo::apop_digest(&stamp(n), "bob-apop");
            match verb(line).as_str() {
                "APOP" if line.split_whitespace().nth(2) == Some(digest.as_str()) => {
                    Answer::Say("+OK maildrop locked\r\n")
                }
                "APOP" => Answer::Say("-ERR [AUTH] bad digest\r\n"),
                _ => stub_pop3(line),
            }
        },
    );
    poplib_stat_over_stls_with_proxy_v2_to(stub.addr, "bob-apop", "apop");
    assert_eq!(stub.accepted(), 1, "the upstream was dialled again");
}

/// After the client's STLS in direct mode popgate dials the upstream again to say "TLS" in a
/// new PROXY v2 header. A server that refuses that second connection (a per-address limit, the
/// first connection being still open) must not cost the client its session: it goes on over
/// the first connection, and nothing is sent there on the client's behalf (no QUIT).
#[test]
fn a_second_connection_refused_after_stls_leaves_the_session_on_the_first() {
    // The first connection is a tiny POP3 server, the second is refused in its greeting.
    let stub = Stub::start(
        4,
        |n| {
            Some(if n > 1 {
                "-ERR [SYS/TEMP] one connection per address\r\n".into()
            } else {
                "+OK stub ready\r\n".into()
            })
        },
        |n, line| match verb(line).as_str() {
            _ if n > 1 => Answer::Say("-ERR go away\r\n"),
            "USER" => Answer::Say("+OK\r\n"),
            "PASS" => Answer::Say("+OK maildrop locked\r\n"),
            _ => stub_pop3(line),
        },
    );
    poplib_stat_over_stls_with_proxy_v2_to(stub.addr, "bob-pass", "user");
    assert_eq!(stub.accepted(), 2, "no second dial was tried");
    common::wait_until("the first connection's QUIT", || {
        stub.lines().iter().any(|(_, l)| l == "QUIT")
    });
    let lines = stub.lines();
    // Everything went over the first connection; the refused one got nothing.
    assert!(lines.iter().all(|(n, _)| *n == 1), "{lines:?}");
    let verbs: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    assert!(
        verbs.contains(&"USER bob") && verbs.contains(&"STAT"),
        "{verbs:?}"
    );
}

mod header_shapes;

/// A shutdown while popgate dials the upstream again after the client's STLS (direct mode,
/// `forward_client = "proxy-v2"`) to a server that accepts the second connection and never
/// greets: it does not wait out `connect_timeout`. The client gets the `-ERR` a session in its
/// relay gets, at once, and its command never reaches the server.
#[test]
fn a_shutdown_does_not_wait_for_the_redial_after_stls() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    // Two connections; the second (the redial) never greets.
    let stub = Stub::start(
        2,
        |n| (n == 1).then(|| "+OK stub ready\r\n".to_owned()),
        |_, line| match verb(line).as_str() {
            "CAPA" => Answer::Say("+OK\r\nUSER\r\n.\r\n"),
            _ => Answer::Nothing,
        },
    );
    let h = Harness::new();
    let pki = TestPki::new();
    let mut p = stls_proxy_v2_to(&h, &pki, stub.addr, "connect_timeout = \"30s\"\n");
    let ca = pki.ca_path().to_owned();
    let proxy = p.addr;
    let mut client = h.rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let mut r = tokio::io::BufReader::new(tcp);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("+OK"), "{line}");
        r.get_mut().write_all(b"STLS\r\n").await.unwrap();
        line.clear();
        r.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("+OK"), "{line}");
        let mut tls = common::certs::tls_connect(r.into_inner(), &ca).await;
        // The first command after STLS: popgate dials again before it goes upstream.
        tls.write_all(format!("USER {USER}\r\n").as_bytes())
            .await
            .unwrap();
        tokio::io::BufReader::new(tls)
    });
    wait_until("the redial", || stub.accepted() == 2);
    p.shutdown_within(&h, Duration::from_secs(5), "the redial");
    let line = h.rt.block_on(async {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_line(&mut line))
            .await
            .expect("a line or EOF in time")
            .unwrap_or(0);
        line
    });
    assert_eq!(line, "-ERR [SYS/TEMP] proxy shutting down\r\n");
    let heard: Vec<String> = stub.lines().into_iter().map(|(_, l)| l).collect();
    assert!(!heard.iter().any(|l| l.starts_with("USER")), "{heard:?}");
    assert!(!heard.iter().any(|l| l.starts_with("QUIT")), "{heard:?}");
}

/// A balancer's PROXY header and the client's whole session in one write, before the
/// greeting, on a listener whose `connect` rules delay the balancer's client and deny another:
/// the header is consumed exactly (the commands after it are the client's, kept during the
/// delay and answered after it, in order), and the rules judge the header's client, not the
/// balancer: the delayed one is served, the denied one refused with nothing dialled for it.
#[test]
fn commands_sent_with_the_proxy_header_during_a_connect_delay_are_the_clients() {
    let h = Harness::new();
    let up = demo(&h);
    let slow = "[[rule]]\nname = \"slow\"\non = \"connect\"\nclient = \"192.0.2.0/24\"\n\
                action = \"delay\"\ndelay = \"300ms\"\n";
    let p = PopgateProcess::run(
        up.local_addr(),
        balanced_with_rules(&format!("{slow}{NO_DOC_NET}")).wait_for_log(),
    );
    let session = format!("USER {USER}\r\nPASS {PASS}\r\nSTAT\r\nQUIT\r\n");
    let mut bytes = v2("192.0.2.7:40000", "198.51.100.1:110");
    bytes.extend_from_slice(session.as_bytes());
    let mut s = connect_from(ip("127.0.0.1"), p.addr);
    let t = Instant::now();
    s.write_all(&bytes).unwrap();
    let (got, _) = until_closed(s);
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    let got = String::from_utf8_lossy(&got);
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines.len(), 5, "{got}");
    assert!(lines.iter().all(|l| l.starts_with("+OK")), "{got}");
    assert!(lines[3].starts_with("+OK 1 "), "STAT: {got}");
    assert_eq!(up.connections(), 1);
    // The denied client, its login in the same write: refused after the delay, not dialled.
    let mut bytes = v1("192.0.2.66:40001", "198.51.100.1:110");
    bytes.extend_from_slice(session.as_bytes());
    let mut s = connect_from(ip("127.0.0.1"), p.addr);
    s.write_all(&bytes).unwrap();
    let (got, _) = until_closed(s);
    assert_eq!(String::from_utf8_lossy(&got), "-ERR not from there\r\n");
    assert_eq!(up.connections(), 1, "nothing dialled for the denied client");
    assert_eq!(up.quit_count(), 1);
}

/// After the client's STLS popgate dials the upstream again (direct mode, `forward_client =
/// "proxy-v2"`); a second connection that is accepted and never greets is given up at
/// `connect_timeout` and the session goes on over the first: the client's login and STAT
/// are answered there, the silent one got nothing, and nobody sent a QUIT but the client.
#[test]
fn a_silent_second_connection_after_stls_leaves_the_session_on_the_first() {
    let stub = Stub::start(
        3,
        |n| (n == 1).then(|| "+OK stub ready\r\n".to_owned()),
        |n, line| match verb(line).as_str() {
            _ if n > 1 => Answer::Nothing,
            "USER" => Answer::Say("+OK\r\n"),
            "PASS" => Answer::Say("+OK maildrop locked\r\n"),
            _ => stub_pop3(line),
        },
    );
    let t0 = Instant::now();
    let got = pipelined_login_after_stls(stub.addr);
    let took = t0.elapsed();
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines.len(), 4, "{got}");
    assert!(lines.iter().all(|l| l.starts_with("+OK")), "{got}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(6),
        "{took:?}"
    );
    assert_eq!(stub.accepted(), 2);
    let heard = stub.lines();
    assert!(heard.iter().all(|(n, _)| *n == 1), "{heard:?}");
    let quits = heard.iter().filter(|(_, l)| l == "QUIT").count();
    assert_eq!(quits, 1, "{heard:?}");
}

/// popgate (STLS listener, `forward_client = "proxy-v2"`, `connect_timeout` 1 s) in front of
/// `addr`: a client's STLS, then its whole session pipelined in one write after the
/// handshake (USER, PASS, STAT, QUIT as bob); what it read until the close (8 s at most).
fn pipelined_login_after_stls(addr: SocketAddr) -> String {
    pipelined_after_stls(addr, b"USER bob\r\nPASS bob-pass\r\nSTAT\r\nQUIT\r\n")
}

/// [`pipelined_login_after_stls`] with `session` written after the handshake.
fn pipelined_after_stls(addr: SocketAddr, session: &'static [u8]) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let h = Harness::new();
    let pki = TestPki::new();
    let p = stls_proxy_v2_to(&h, &pki, addr, "connect_timeout = \"1s\"\n");
    let ca = pki.ca_path().to_owned();
    let proxy = p.addr;
    h.rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let mut r = tokio::io::BufReader::new(tcp);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("+OK"), "{line}");
        r.get_mut().write_all(b"STLS\r\n").await.unwrap();
        line.clear();
        r.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("+OK"), "{line}");
        let mut tls = common::certs::tls_connect(r.into_inner(), &ca).await;
        tls.write_all(session).await.unwrap();
        let mut r = tokio::io::BufReader::new(tls);
        let mut got = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(8), async {
            loop {
                let mut l = String::new();
                match r.read_line(&mut l).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => got.push_str(&l),
                }
            }
        })
        .await;
        got
    })
}

/// The second connection after STLS greets `+OK`: the session goes over to it and a login
/// the client pipelined after its handshake goes there whole, in order; the first connection
/// gets nothing after its capability talk (no QUIT on the client's behalf).
#[test]
fn a_login_pipelined_after_stls_goes_whole_to_the_connection_dialled_again() {
    let stub = Stub::start(
        3,
        |n| Some(format!("+OK stub {n} ready\r\n")),
        |_, line| match verb(line).as_str() {
            "USER" => Answer::Say("+OK\r\n"),
            "PASS" => Answer::Say("+OK maildrop locked\r\n"),
            _ => stub_pop3(line),
        },
    );
    let got = pipelined_login_after_stls(stub.addr);
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines.len(), 4, "{got}");
    assert!(lines.iter().all(|l| l.starts_with("+OK")), "{got}");
    assert_eq!(stub.accepted(), 2);
    common::wait_until("the QUIT", || stub.lines().iter().any(|(_, l)| l == "QUIT"));
    let on = |n: usize| -> Vec<String> {
        let lines = stub.lines().into_iter();
        lines.filter(|(c, _)| *c == n).map(|(_, l)| l).collect()
    };
    assert_eq!(on(2), ["USER bob", "PASS bob-pass", "STAT", "QUIT"]);
    assert!(
        on(1).iter().all(|l| l != "QUIT" && !l.starts_with("USER")),
        "{:?}",
        on(1)
    );
}

/// The second connection after STLS greets `+OK`, then hangs up at the first line (a server
/// that resets the new connection): the session is on it by then; the client gets an `-ERR`
/// for what it was waiting on and the close, within the bound, and nothing went to the
/// first connection after the STLS (no QUIT on the client's behalf).
#[test]
fn a_connection_dialled_again_that_hangs_up_after_greeting_ends_the_session_with_an_err() {
    let stub = Stub::start(
        3,
        |n| Some(format!("+OK stub {n} ready\r\n")),
        |n, line| match verb(line).as_str() {
            _ if n > 1 => Answer::SayAndClose(""),
            _ => stub_pop3(line),
        },
    );
    let t0 = Instant::now();
    let got = pipelined_login_after_stls(stub.addr);
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
    assert_eq!(
        got,
        "-ERR [SYS/TEMP] upstream server closed the connection\r\n"
    );
    assert_eq!(stub.accepted(), 2);
    let heard = stub.lines();
    assert!(
        heard.iter().all(|(n, l)| *n == 2 || l == "CAPA"),
        "{heard:?}"
    );
}

/// A QUIT as the first command after STLS: nothing is dialled (and waited for) only to carry
/// it; it goes out on the first connection and is answered at once, even when a second
/// connection would never greet.
#[test]
fn a_quit_right_after_stls_dials_nothing_again() {
    let stub = Stub::start(
        3,
        |n| (n == 1).then(|| "+OK stub ready\r\n".to_owned()),
        |_, line| stub_pop3(line),
    );
    let t0 = Instant::now();
    let got = pipelined_after_stls(stub.addr, b"QUIT\r\n");
    assert_eq!(got, "+OK bye\r\n");
    assert!(
        t0.elapsed() < Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(stub.accepted(), 1, "dialled again for the QUIT");
    assert_eq!(stub.lines(), [(1, "QUIT".to_owned())]);
}
