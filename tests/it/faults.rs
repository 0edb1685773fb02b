//! The fault matrix: every way an upstream or a client can misbehave, one test each, with the
//! same invariants checked after every scenario ([`Fix::invariants`]):
//!
//! - no panic anywhere in popgate (a process-wide panic hook counts panics on tokio's worker
//!   threads, where the in-process proxy runs its sessions);
//! - no QUIT reaches the upstream unless the client sent one;
//! - every `session_open` in the audit trail gets its `session_close` (so the session count is
//!   back to zero), and the demo upstream's maildrop lock is released;
//! - for a cut multi-line response ([`assert_cut`]): the client never sees a terminator after the
//!   status line, and its connection ends with a TCP reset.
//!
//! The table "Faults and what the client sees" in docs/protocol.md lists these tests row by row.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use common::clients::{self, poplib, poplib_spec};
use common::proxy::{Harness, ProxyHandle, big_message, mailbox};
use common::{audit_events, wait_until};
use popgate_demo::{DemoServer, Faults, ServerOptions, Verb};
use serde_json::{Value, json};

const USER: &str = "alice";
const PASS: &str = "fault-pass-7";
/// The longest any one read of a test client waits.
const READ_LIMIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Panics

static PANICS: AtomicUsize = AtomicUsize::new(0);
static HOOK: Once = Once::new();

/// Count panics on tokio's threads (the proxy's sessions and the demo upstream run there; a
/// panic in a spawned task is caught by tokio, but the hook still sees it). Panics on the test
/// threads themselves are failing assertions and are left to libtest.
fn watch_panics() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            if thread.name().is_some_and(|n| n.starts_with("tokio")) {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

// ---------------------------------------------------------------------------------------------
// The fixture: a runtime, an audit directory, popgate

struct Fix {
    h: Harness,
    audit: tempfile::TempDir,
}

/// Which upstream a scenario ran against, for the QUIT check.
enum Up<'a> {
    Demo(&'a DemoServer),
    Script(&'a Scripted),
    /// Nothing that records commands (a closed port, a listener that never accepts).
    Mute,
}

impl Fix {
    fn new() -> Fix {
        watch_panics();
        Fix {
            h: Harness::new(),
            audit: tempfile::Builder::new().prefix("faults").tempdir().unwrap(),
        }
    }

    fn demo(&self, faults: Faults, messages: Vec<Vec<u8>>) -> DemoServer {
        self.h.upstream(ServerOptions {
            faults,
            ..ServerOptions::new(vec![mailbox(USER, PASS, messages)])
        })
    }

    /// popgate in front of `upstream` with `upstream_extra` keys in `[upstream]` (a
    /// `connect_timeout` of 2 s unless given) and `limits` keys in `[limits]`, auditing on.
    fn proxy(&self, upstream: SocketAddr, upstream_extra: &str, limits: &str) -> ProxyHandle {
        let timeout = if upstream_extra.contains("connect_timeout") {
            ""
        } else {
            "connect_timeout = \"2s\"\n"
        };
        self.h.proxy_toml(&format!(
            "[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n\
             [upstream]\naddress = \"{upstream}\"\n{timeout}{upstream_extra}\n\
             [limits]\n{limits}\n\
             [audit]\nenabled = true\ndir = {:?}\n",
            self.audit.path()
        ))
    }

    /// The invariants of every row, checked after the scenario: `sessions` sessions were
    /// opened and all closed, the client sent `client_quits` QUITs and the upstream got exactly
    /// those, the maildrop is unlocked, and nothing panicked. Returns the audit events.
    fn invariants(&self, up: Up<'_>, sessions: usize, client_quits: usize) -> Vec<Value> {
        let evs = wait_sessions_closed(self.audit.path(), sessions);
        match up {
            Up::Demo(d) => {
                wait_until("maildrop unlocked", || !d.is_locked(USER));
                assert_eq!(d.quit_count(), client_quits, "QUITs the upstream received");
                let quits = d.received().iter().filter(|l| is_quit(l)).count();
                assert_eq!(quits, client_quits, "QUIT lines the upstream received");
            }
            Up::Script(s) => {
                let quits = s.lines().iter().filter(|l| is_quit(l)).count();
                assert_eq!(quits, client_quits, "QUIT lines the upstream received");
            }
            Up::Mute => assert_eq!(client_quits, 0),
        }
        assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a panic in popgate");
        evs
    }
}

fn is_quit(line: &[u8]) -> bool {
    let l = String::from_utf8_lossy(line);
    l.trim().eq_ignore_ascii_case("quit")
}

/// Wait (bounded) until exactly `n` sessions were opened and each of them closed.
fn wait_sessions_closed(dir: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let evs = audit_events(dir);
        let ids = |name: &str| {
            let mut v: Vec<u64> = evs
                .iter()
                .filter(|e| e["event"] == name)
                .map(|e| e["session"].as_u64().unwrap())
                .collect();
            v.sort_unstable();
            v
        };
        let (open, close) = (ids("session_open"), ids("session_close"));
        if open.len() == n && open == close {
            return evs;
        }
        assert!(
            Instant::now() < deadline && open.len() <= n,
            "expected {n} sessions opened and closed; open {open:?}, closed {close:?}:\n{}",
            evs.iter().map(|e| format!("{e}\n")).collect::<String>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `reason` of the (only) `session_close`.
fn close_reason(evs: &[Value]) -> String {
    let closes: Vec<&Value> = evs
        .iter()
        .filter(|e| e["event"] == "session_close")
        .collect();
    assert_eq!(closes.len(), 1, "{closes:?}");
    closes[0]["reason"].as_str().unwrap().to_owned()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A cut multi-line response: the status line `status` was relayed, nothing after it is a
/// terminator (or a prefix of one at the end), and the connection ended with a reset.
fn assert_cut(got: &[u8], end: Option<ErrorKind>, status: &[u8]) {
    let shown = || String::from_utf8_lossy(&got[got.len().saturating_sub(300)..]).into_owned();
    let at = find(got, status).unwrap_or_else(|| panic!("status line not relayed: {}", shown()));
    let after = &got[at..];
    assert!(
        find(after, b"\r\n.\r\n").is_none(),
        "a terminator after a cut: {}",
        shown()
    );
    assert!(
        !after.ends_with(b"\n.") && !after.ends_with(b"\n.\r"),
        "a terminator prefix at the end: {}",
        shown()
    );
    assert_eq!(
        end,
        Some(ErrorKind::ConnectionReset),
        "the client connection must end with a reset: {}",
        shown()
    );
}

// ---------------------------------------------------------------------------------------------
// A raw client that sees how its connection ended

struct Conn {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Conn {
    /// Connects without reading anything.
    fn open(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(READ_LIMIT)).unwrap();
        let w = s.try_clone().unwrap();
        Conn {
            r: BufReader::new(s),
            w,
        }
    }

    /// Connects and reads a `+OK` greeting.
    fn connect(addr: SocketAddr) -> Conn {
        let mut c = Conn::open(addr);
        let g = c.line();
        assert!(g.starts_with("+OK"), "greeting: {g:?}");
        c
    }

    fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).unwrap();
    }

    fn line(&mut self) -> String {
        let mut l = Vec::new();
        self.r.read_until(b'\n', &mut l).unwrap();
        String::from_utf8_lossy(&l)
            .trim_end_matches(['\r', '\n'])
            .to_owned()
    }

    fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.line()
    }

    fn login(&mut self) {
        assert!(self.cmd(&format!("USER {USER}")).starts_with("+OK"));
        let r = self.cmd(&format!("PASS {PASS}"));
        assert!(r.starts_with("+OK"), "login: {r}");
    }

    /// Everything until the connection ends, and how it ended: `None` for an orderly close,
    /// else the error (a reset, or `WouldBlock`/`TimedOut` if it did not end in time).
    fn finish(mut self) -> (Vec<u8>, Option<ErrorKind>) {
        let mut out = Vec::new();
        let end = self.r.read_to_end(&mut out).err().map(|e| e.kind());
        (out, end)
    }
}

// ---------------------------------------------------------------------------------------------
// A scripted upstream

/// What the scripted upstream does after an answer.
#[derive(Clone, Copy, PartialEq)]
enum Then {
    Stay,
    Close,
    /// Answer nothing more; keep reading (and recording) until the peer leaves.
    Silent,
}

type Script = Arc<dyn Fn(&str) -> (Vec<u8>, Then) + Send + Sync>;

/// A plain-std POP3 upstream that answers from a script and records every line it receives.
/// Its threads end when the peer closes or after 20 s.
struct Scripted {
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// The answers every script shares: a login that always works, no CAPA, QUIT.
fn basic(cmd: &str) -> (Vec<u8>, Then) {
    let verb = cmd.split_whitespace().next().unwrap_or("").to_uppercase();
    match verb.as_str() {
        "USER" | "PASS" | "NOOP" => (b"+OK\r\n".to_vec(), Then::Stay),
        "QUIT" => (b"+OK bye\r\n".to_vec(), Then::Close),
        _ => (b"-ERR not scripted\r\n".to_vec(), Then::Stay),
    }
}

/// `body` as the answer to RETR (then `then`), [`basic`] otherwise.
fn on_retr(body: &'static [u8], then: Then) -> Script {
    on_verb("RETR", body.to_vec(), then)
}

fn on_verb(verb: &'static str, answer: Vec<u8>, then: Then) -> Script {
    Arc::new(move |cmd: &str| {
        if cmd.to_uppercase().starts_with(verb) {
            (answer.clone(), then)
        } else {
            basic(cmd)
        }
    })
}

impl Scripted {
    /// Serve every connection: `greeting` (none: stay silent), then answers from `script`.
    fn start(greeting: Option<&'static [u8]>, script: Script) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let rec = lines.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                match listener.accept() {
                    Ok((s, _)) => {
                        let (rec, script) = (rec.clone(), script.clone());
                        std::thread::spawn(move || serve(s, greeting, &script, &rec, deadline));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Scripted { addr, lines }
    }

    fn lines(&self) -> Vec<Vec<u8>> {
        self.lines.lock().unwrap().clone()
    }
}

fn serve(
    mut s: TcpStream,
    greeting: Option<&[u8]>,
    script: &Script,
    rec: &Mutex<Vec<Vec<u8>>>,
    deadline: Instant,
) {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut silent = greeting.is_none();
    if let Some(g) = greeting {
        let _ = s.write_all(g);
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while Instant::now() < deadline {
        let n = match s.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return,
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            rec.lock().unwrap().push(line.clone());
            if silent {
                continue;
            }
            let (answer, then) = script(String::from_utf8_lossy(&line).trim_end());
            let _ = s.write_all(&answer);
            match then {
                Then::Stay => {}
                Then::Close => return,
                Then::Silent => silent = true,
            }
        }
    }
}

const GREETING: &[u8] = b"+OK scripted ready\r\n";

// =============================================================================================
// Upstream side

#[test]
fn upstream_refused() {
    let f = Fix::new();
    let port = common::free_port();
    let p = f.proxy(format!("127.0.0.1:{port}").parse().unwrap(), "", "");
    let (got, end) = Conn::open(p.addr).finish();
    assert_eq!(
        got,
        b"-ERR [SYS/TEMP] upstream server unavailable, try again later\r\n"
    );
    assert_eq!(end, None, "an orderly close");
    let evs = f.invariants(Up::Mute, 1, 0);
    assert_eq!(close_reason(&evs), "error");
}

#[test]
fn upstream_closes_at_once() {
    let f = Fix::new();
    let up = f.demo(
        Faults {
            refuse: true,
            ..Faults::default()
        },
        vec![],
    );
    let p = f.proxy(up.local_addr(), "", "");
    let (got, end) = Conn::open(p.addr).finish();
    assert_eq!(
        got,
        b"-ERR [SYS/TEMP] upstream server closed the connection\r\n"
    );
    assert_eq!(end, None);
    let evs = f.invariants(Up::Demo(&up), 1, 0);
    assert_eq!(close_reason(&evs), "upstream_eof");
}

#[test]
fn upstream_slow_connect() {
    let f = Fix::new();
    // Never accepted: the kernel completes the TCP handshake into the backlog, and the TLS
    // handshake then waits for an answer that never comes.
    let stalled = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = f.proxy(
        stalled.local_addr().unwrap(),
        "tls = \"implicit\"\nverify = false\nconnect_timeout = \"1s\"\n",
        "",
    );
    let t0 = Instant::now();
    let (got, end) = Conn::open(p.addr).finish();
    let took = t0.elapsed();
    assert_eq!(
        got,
        b"-ERR [SYS/TEMP] upstream server unavailable, try again later\r\n"
    );
    assert_eq!(end, None);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    let evs = f.invariants(Up::Mute, 1, 0);
    assert_eq!(close_reason(&evs), "error");
    drop(stalled);
}

#[test]
fn upstream_tls_failure() {
    let f = Fix::new();
    let up = f.demo(Faults::default(), vec![b"Subject: x\r\n\r\nx\r\n".to_vec()]);
    let p = f.proxy(up.local_addr(), "tls = \"implicit\"\nverify = false\n", "");
    let (got, end) = Conn::open(p.addr).finish();
    assert_eq!(
        got,
        b"-ERR [SYS/TEMP] upstream server unavailable, try again later\r\n"
    );
    assert_eq!(end, None);
    let evs = f.invariants(Up::Demo(&up), 1, 0);
    assert_eq!(close_reason(&evs), "error");
}

#[test]
fn upstream_no_greeting() {
    let f = Fix::new();
    let up = Scripted::start(None, Arc::new(basic));
    let p = f.proxy(up.addr, "", "greeting_timeout = \"500ms\"\n");
    let t0 = Instant::now();
    let mut c = Conn::open(p.addr);
    // A client that speaks first: its command waits in the pipeline behind the greeting.
    c.send(b"USER alice\r\n");
    let (got, end) = c.finish();
    assert_eq!(
        got,
        b"-ERR [SYS/TEMP] upstream server did not answer, try again later\r\n"
    );
    assert_eq!(end, None);
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    let evs = f.invariants(Up::Script(&up), 1, 0);
    assert_eq!(close_reason(&evs), "greeting_timeout");
    // Commands sent before the greeting are pipelined behind it, as any other.
    assert_eq!(up.lines(), vec![b"USER alice\r\n".to_vec()]);
}

#[test]
fn upstream_eof_mid_body() {
    let f = Fix::new();
    let up = f.demo(
        Faults {
            die_mid_body: Some(100_000),
            ..Faults::default()
        },
        vec![big_message(500_000), b"Subject: x\r\n\r\nx\r\n".to_vec()],
    );
    let p = f.proxy(up.local_addr(), "", "");
    let mut c = Conn::connect(p.addr);
    c.login();
    c.send(b"DELE 2\r\nRETR 1\r\nNOOP\r\n");
    let (got, end) = c.finish();
    assert!(got.starts_with(b"+OK"), "DELE answered");
    assert!(got.len() > 1000, "some of the body was relayed");
    assert_cut(&got, end, b"octets\r\n");
    assert!(
        find(&got[10..], b"-ERR").is_none(),
        "no status after the cut"
    );
    let evs = f.invariants(Up::Demo(&up), 1, 0);
    assert_eq!(close_reason(&evs), "upstream_eof");
    assert_eq!(up.messages(USER).len(), 2, "nothing deleted");
}

#[test]
fn upstream_cut_after_dot_cr() {
    let f = Fix::new();
    let up = Scripted::start(
        Some(GREETING),
        on_retr(b"+OK 6 octets\r\nline\r\n.\r", Then::Close),
    );
    let p = f.proxy(up.addr, "", "");
    let mut c = Conn::connect(p.addr);
    c.login();
    c.send(b"RETR 1\r\n");
    let (got, end) = c.finish();
    assert_cut(&got, end, b"+OK 6 octets\r\n");
    assert!(
        got.ends_with(b"line\r\n"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    let evs = f.invariants(Up::Script(&up), 1, 0);
    assert_eq!(close_reason(&evs), "upstream_eof");
}

#[test]
fn upstream_bare_lf_terminator() {
    let f = Fix::new();
    let up = Scripted::start(
        Some(GREETING),
        on_retr(b"+OK\r\nline\n.\n-ERR x\r\n", Then::Silent),
    );
    let p = f.proxy(up.addr, "", "");
    let mut c = Conn::connect(p.addr);
    c.login();
    c.send(b"RETR 1\r\n");
    let (got, end) = c.finish();
    assert_cut(&got, end, b"+OK\r\n");
    assert!(find(&got, b"\n.\n").is_none() && find(&got, b"-ERR x").is_none());
    let evs = f.invariants(Up::Script(&up), 1, 0);
    assert_eq!(close_reason(&evs), "error");
}

#[test]
fn upstream_garbage() {
    let f = Fix::new();
    let up = f.demo(
        Faults {
            garbage_on: Some(Verb::Retr),
            ..Faults::default()
        },
        vec![b"Subject: x\r\n\r\nx\r\n".to_vec()],
    );
    let p = f.proxy(up.local_addr(), "", "");
    let mut c = Conn::connect(p.addr);
    c.login();
    assert!(c.cmd("DELE 1").starts_with("+OK"));
    assert_eq!(c.cmd("RETR 1"), "-ERR [SYS/TEMP] upstream protocol error");
    let (rest, end) = c.finish();
    assert!(rest.is_empty() && end.is_none(), "{rest:?} {end:?}");
    let evs = f.invariants(Up::Demo(&up), 1, 0);
    assert_eq!(close_reason(&evs), "error");
    assert_eq!(up.messages(USER).len(), 1, "nothing deleted");
}

#[test]
fn upstream_endless_line() {
    let f = Fix::new();
    let mut endless = b"+OK ".to_vec();
    endless.extend(std::iter::repeat_n(b'x', 100_000));
    let up = Scripted::start(Some(GREETING), on_verb("STAT", endless, Then::Silent));
    let p = f.proxy(up.addr, "", "max_line = 1000\n");
    let mut c = Conn::connect(p.addr);
    c.login();
    assert_eq!(c.cmd("STAT"), "-ERR [SYS/TEMP] upstream protocol error");
    let (rest, end) = c.finish();
    assert!(rest.is_empty() && end.is_none(), "{rest:?} {end:?}");
    let evs = f.invariants(Up::Script(&up), 1, 0);
    assert_eq!(close_reason(&evs), "error");
}

/// Real clients on a cut body (upstream EOF mid-body, and a cut right after `\r\n.\r`):
/// poplib raises, curl exits non-zero, and neither gets the message as complete.
#[test]
fn cut_body_real_clients() {
    let f = Fix::new();
    let full = big_message(300_000);
    let demo = f.demo(
        Faults {
            die_mid_body: Some(100_000),
            ..Faults::default()
        },
        vec![full.clone()],
    );
    let script = Scripted::start(
        Some(GREETING),
        on_retr(b"+OK 6 octets\r\nline\r\n.\r", Then::Close),
    );
    let p_demo = f.proxy(demo.local_addr(), "", "");
    let p_script = f.proxy(script.addr, "", "");
    for p in [&p_demo, &p_script] {
        let mut spec = poplib_spec(p.addr, USER, PASS);
        spec["actions"] = json!([["retr", 1]]);
        let r = poplib(spec);
        eprintln!("poplib on a cut body: {}", clients::brief(&r["results"][0]));
        assert_eq!(
            r["results"][0]["ok"],
            json!(false),
            "{}",
            clients::brief(&r)
        );
        let out = clients::curl(&[&format!("pop3://{USER}:{PASS}@{}/1", p.addr)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!(
            "curl on a cut body: {:?} {}",
            out.status.code(),
            stderr.trim()
        );
        assert!(!out.status.success(), "curl accepted a cut body");
        assert_eq!(out.status.code(), Some(56), "{stderr}");
        assert!(stderr.contains("Connection reset by peer"), "{stderr}");
        assert!(out.stdout.len() < full.len() && !out.stdout.ends_with(b"\r\n.\r\n"));
    }
    // Two clients per upstream, no QUIT ever reached either (curl and poplib did not get to
    // send theirs: popgate reset the connection first).
    let evs = wait_sessions_closed(f.audit.path(), 4);
    assert_eq!(
        evs.iter().filter(|e| e["event"] == "session_close").count(),
        4
    );
    wait_until("maildrop unlocked", || !demo.is_locked(USER));
    assert_eq!(demo.quit_count(), 0);
    assert_eq!(script.lines().iter().filter(|l| is_quit(l)).count(), 0);
    assert_eq!(PANICS.load(Ordering::SeqCst), 0);
}

// =============================================================================================
// Client side

fn two_messages() -> Vec<Vec<u8>> {
    vec![
        b"Subject: one\r\n\r\nfirst\r\n".to_vec(),
        b"Subject: two\r\n\r\n.dot\r\nsecond\r\n".to_vec(),
    ]
}

#[test]
fn client_eof_in_authorization() {
    let f = Fix::new();
    let up = f.demo(Faults::default(), two_messages());
    let p = f.proxy(up.local_addr(), "", "");
    let mut c = Conn::connect(p.addr);
    assert!(c.cmd(&format!("USER {USER}")).starts_with("+OK"));
    c.w.shutdown(Shutdown::Both).unwrap();
    let evs = f.invariants(Up::Demo(&up), 1, 0);
    assert_eq!(close_reason(&evs), "client_eof");
}

#[test]
fn client_eof_in_transaction() {
    let f = Fix::new();
    let up = f.demo(Faults::default(), two_messages());
    let p = f.proxy(up.local_addr(), "", "");
    let mut c = Conn::connect(p.addr);
    c.login();
    assert!(c.cmd("DELE 1").starts_with("+OK"));
    c.w.shutdown(Shutdown::Both).unwrap();
    let evs = f.invariants(Up::Demo(&up), 1, 0);
    assert_eq!(close_reason(&evs), "client_eof");
    assert_eq!(up.messages(USER).len(), 2, "nothing deleted");
}

#[test]
fn client_eof_mid_pipeline() {
    let f = Fix::new();
    let up = f.demo(Faults::default(), two_messages());
    let p = f.proxy(up.local_addr(), "", "");
    let mut c = Conn::connect(p.addr);
    c.login();
    c.send(b"DELE 1\r\nRETR 1\r\nRETR 2\r\nLIST\r\n");
    c.w.shutdown(Shutdown::Both).unwrap();
    f.invariants(Up::Demo(&up), 1, 0);
    assert_eq!(up.messages(USER).len(), 2, "nothing deleted");
}

#[test]
fn client_eof_during_big_body() {
    let f = Fix::new();
    let up = f.demo(
        Faults::default(),
        vec![big_message(5 << 20), b"Subject: x\r\n\r\nx\r\n".to_vec()],
    );
    let p = f.proxy(up.local_addr(), "", "");
    let mut c = Conn::connect(p.addr);
    c.login();
    c.send(b"DELE 2\r\nRETR 1\r\n");
    assert!(c.line().starts_with("+OK"));
    assert!(c.line().starts_with("+OK"));
    c.line();
    c.w.shutdown(Shutdown::Both).unwrap();
    drop(c);
    let evs = f.invariants(Up::Demo(&up), 1, 0);
    assert_eq!(close_reason(&evs), "client_eof");
    assert_eq!(up.messages(USER).len(), 2, "nothing deleted");
}

#[test]
fn client_overlong_line() {
    let f = Fix::new();
    let up = f.demo(Faults::default(), two_messages());
    let p = f.proxy(up.local_addr(), "", "max_line = 100\n");
    let mut c = Conn::connect(p.addr);
    c.send(format!("USER {}\r\n", "x".repeat(300)).as_bytes());
    assert_eq!(c.line(), "-ERR line too long");
    c.login();
    assert!(c.cmd("STAT").starts_with("+OK 2 "));
    c.w.shutdown(Shutdown::Both).unwrap();
    f.invariants(Up::Demo(&up), 1, 0);
    assert!(
        up.received().iter().all(|l| l.len() < 100),
        "the long line was not forwarded"
    );
}

#[test]
fn client_endless_junk() {
    let f = Fix::new();
    let up = f.demo(Faults::default(), two_messages());
    let p = f.proxy(up.local_addr(), "", "max_line = 100\n");
    let mut c = Conn::connect(p.addr);
    c.login();
    // More than 16 lengths of junk without a line end: closed.
    c.send(&[b'j'; 100 * 20]);
    let (got, end) = c.finish();
    assert_eq!(got, b"-ERR line too long\r\n");
    assert_eq!(end, None);
    let evs = f.invariants(Up::Demo(&up), 1, 0);
    assert_eq!(close_reason(&evs), "error");
}

#[test]
fn client_nul_in_command() {
    let f = Fix::new();
    let up = f.demo(Faults::default(), two_messages());
    let p = f.proxy(up.local_addr(), "", "");
    let mut c = Conn::connect(p.addr);
    c.send(b"USER ali\0ce\r\n");
    assert_eq!(c.line(), "-ERR control character in command");
    c.login();
    c.send(b"DELE 1\0\r\n");
    assert_eq!(c.line(), "-ERR control character in command");
    assert!(c.cmd("STAT").starts_with("+OK 2 "));
    c.w.shutdown(Shutdown::Both).unwrap();
    f.invariants(Up::Demo(&up), 1, 0);
    assert!(
        up.received().iter().all(|l| !l.contains(&0)),
        "a NUL was forwarded"
    );
}

#[test]
fn client_8bit_in_command() {
    let f = Fix::new();
    let up = f.demo(Faults::default(), two_messages());
    let p = f.proxy(up.local_addr(), "", "");
    let mut c = Conn::connect(p.addr);
    let line = b"USER \xe9t\xe9-r\xc3\xa9sum\xc3\xa9\r\n";
    c.send(line);
    assert!(c.line().starts_with("+OK"));
    c.w.shutdown(Shutdown::Both).unwrap();
    f.invariants(Up::Demo(&up), 1, 0);
    assert_eq!(up.received(), vec![line.to_vec()], "forwarded unchanged");
}

#[test]
fn client_bare_lf() {
    let f = Fix::new();
    let msgs = two_messages();
    let up = f.demo(Faults::default(), msgs.clone());
    let p = f.proxy(up.local_addr(), "", "");
    let mut c = Conn::connect(p.addr);
    c.send(format!("USER {USER}\nPASS {PASS}\nSTAT\nRETR 2\nQUIT\n").as_bytes());
    let (got, end) = c.finish();
    assert_eq!(end, None);
    let text = String::from_utf8_lossy(&got);
    let lines: Vec<&str> = text.split("\r\n").collect();
    assert!(
        lines[0].starts_with("+OK") && lines[1].starts_with("+OK"),
        "{text}"
    );
    assert!(lines[2].starts_with("+OK 2 "), "{text}");
    let retr = find(&got, b"Subject: two").expect("RETR body");
    assert!(got[retr..].starts_with(b"Subject: two\r\n\r\n..dot\r\nsecond\r\n.\r\n"));
    assert!(lines.last() == Some(&"") && lines[lines.len() - 2].starts_with("+OK"));
    let evs = f.invariants(Up::Demo(&up), 1, 1);
    assert_eq!(close_reason(&evs), "quit");
}

#[test]
fn client_half_close() {
    let f = Fix::new();
    let msgs = two_messages();
    let up = f.demo(Faults::default(), msgs.clone());
    let p = f.proxy(up.local_addr(), "", "");
    let mut c = Conn::connect(p.addr);
    c.login();
    c.send(b"RETR 1\r\nQUIT\r\n");
    c.w.shutdown(Shutdown::Write).unwrap();
    let (got, end) = c.finish();
    assert_eq!(end, None);
    let text = String::from_utf8_lossy(&got);
    let body = &got[find(&got, b"\r\n").unwrap() + 2..];
    assert!(text.starts_with("+OK"), "{text}");
    assert!(body.starts_with(&msgs[0]), "{text}");
    let rest = &body[msgs[0].len()..];
    assert!(
        rest.starts_with(b".\r\n+OK") && rest.ends_with(b"\r\n"),
        "{text}"
    );
    let evs = f.invariants(Up::Demo(&up), 1, 1);
    assert_eq!(close_reason(&evs), "quit");
}

// =============================================================================================
// The client during direct mode's dial (the set-up reads it, bounded)

/// The `bytes_from_client` of the one `session_close` in `evs`.
fn bytes_from_client(evs: &[Value]) -> u64 {
    let close = evs.iter().find(|e| e["event"] == "session_close").unwrap();
    close["bytes_from_client"].as_u64().unwrap()
}

/// Writes 8 MB of one endless line (no line end) to `w` until the peer stops it; how much.
fn flood(mut w: TcpStream) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let chunk = vec![b'j'; 64 * 1024];
        let mut sent = 0usize;
        while sent < 8 << 20 && w.write_all(&chunk).is_ok() {
            sent += chunk.len();
        }
        sent
    })
}

/// A client that floods an endless line (8 MB, no line end) while direct mode's set-up
/// fails over from a refused address to one slow to greet: popgate reads the client only up
/// to the set-up's bound meanwhile (the rest waits in TCP), then relays the greeting, answers
/// `-ERR line too long` and closes once the junk passes its bound; nothing of the line reaches
/// the server. With one address (the greeting not read in the set-up) the junk reaches the
/// relay before the greeting: closed as fast, as bounded, the `-ERR` dropped with the greeting
/// it would have followed.
#[test]
fn a_flood_during_the_upstream_dial_is_read_only_up_to_the_bound() {
    let f = Fix::new();
    let up = f.demo(
        Faults {
            greeting_delay: Some(Duration::from_millis(500)),
            ..Faults::default()
        },
        two_messages(),
    );
    let refused = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let p = f.h.proxy_toml(&format!(
        "[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n\
         [upstream]\naddress = [\"{refused}\", \"{}\"]\nconnect_timeout = \"2s\"\n\
         [limits]\nmax_line = 100\n\
         [audit]\nenabled = true\ndir = {:?}\n",
        up.local_addr(),
        f.audit.path()
    ));
    let c = Conn::open(p.addr);
    let sent = flood(c.w.try_clone().unwrap());
    let (got, end) = c.finish();
    let got = String::from_utf8_lossy(&got);
    let sent = sent.join().unwrap();
    let evs = f.invariants(Up::Demo(&up), 1, 0);
    assert_eq!(
        got, "+OK popgate-demo POP3 server ready\r\n-ERR line too long\r\n",
        "{end:?}"
    );
    assert_eq!(close_reason(&evs), "error");
    let read = bytes_from_client(&evs);
    assert!(
        read < 128 * 1024,
        "popgate read {read} of {sent} flooded octets"
    );
    assert!(up.received().is_empty(), "{:?}", up.received());

    let f = Fix::new();
    let p = f.proxy(up.local_addr(), "", "max_line = 100\n");
    let c = Conn::open(p.addr);
    let sent = flood(c.w.try_clone().unwrap());
    let (got, end) = c.finish();
    let sent = sent.join().unwrap();
    let evs = f.invariants(Up::Demo(&up), 1, 0);
    assert!(
        got.is_empty(),
        "{:?} {end:?}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(close_reason(&evs), "error");
    let read = bytes_from_client(&evs);
    assert!(
        read < 128 * 1024,
        "popgate read {read} of {sent} flooded octets"
    );
    assert!(up.received().is_empty(), "{:?}", up.received());
}

/// A client that hangs up while the first of two upstream addresses accepts and never
/// greets: a reset after `USER`, or a FIN before any command. The session ends at once
/// (client_eof), the second address is never dialled, and no byte reaches either server.
#[test]
fn a_client_leaving_during_the_dial_gets_nothing_dialled_or_sent_after() {
    for reset in [false, true] {
        let f = Fix::new();
        let silent = Scripted::start(None, Arc::new(basic));
        let second = f.demo(Faults::default(), two_messages());
        let p = f.h.proxy_toml(&format!(
            "[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n\
             [upstream]\naddress = [\"{}\", \"{}\"]\nconnect_timeout = \"5s\"\n\
             [audit]\nenabled = true\ndir = {:?}\n",
            silent.addr,
            second.local_addr(),
            f.audit.path()
        ));
        let t0 = Instant::now();
        let mut c = Conn::open(p.addr);
        if reset {
            c.send(b"USER alice\r\n");
            std::thread::sleep(Duration::from_millis(100));
            socket2::SockRef::from(&c.w)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(c);
        } else {
            std::thread::sleep(Duration::from_millis(100));
            c.w.shutdown(Shutdown::Write).unwrap();
            let (got, _) = c.finish();
            assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
        }
        let evs = f.invariants(Up::Script(&silent), 1, 0);
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
        assert_eq!(close_reason(&evs), "client_eof", "reset {reset}");
        std::thread::sleep(Duration::from_millis(300));
        assert!(silent.lines().is_empty(), "{:?}", silent.lines());
        assert_eq!(second.connections(), 0, "the second address was dialled");
    }
}

/// `printf 'USER ...\r\nPASS ...\r\nSTAT\r\nQUIT\r\n' | nc -N`: a whole session, then the
/// client's FIN, all while the first address never greets. TCP cannot tell that half-close
/// from a hang-up; as in the relay, popgate answers it: after the failover the commands go to
/// the second address in order, the client reads every answer, and the only QUIT the server
/// gets is the client's.
#[test]
fn commands_then_a_half_close_during_the_dial_are_answered_after_the_failover() {
    let f = Fix::new();
    let silent = Scripted::start(None, Arc::new(basic));
    let second = f.demo(Faults::default(), two_messages());
    let p = f.h.proxy_toml(&format!(
        "[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n\
         [upstream]\naddress = [\"{}\", \"{}\"]\nconnect_timeout = \"1s\"\n\
         [audit]\nenabled = true\ndir = {:?}\n",
        silent.addr,
        second.local_addr(),
        f.audit.path()
    ));
    let mut c = Conn::open(p.addr);
    c.send(format!("USER {USER}\r\nPASS {PASS}\r\nSTAT\r\nQUIT\r\n").as_bytes());
    c.w.shutdown(Shutdown::Write).unwrap();
    let (got, _) = c.finish();
    let got = String::from_utf8_lossy(&got).into_owned();
    let lines: Vec<&str> = got.split_terminator("\r\n").collect();
    assert_eq!(lines.len(), 5, "greeting and four answers: {got:?}");
    assert!(lines.iter().all(|l| l.starts_with("+OK")), "{got:?}");
    assert!(lines[3].starts_with("+OK 2 "), "STAT: {got:?}");
    let sent: Vec<String> = second
        .received()
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    assert_eq!(
        sent,
        [
            format!("USER {USER}\r\n"),
            format!("PASS {PASS}\r\n"),
            "STAT\r\n".to_owned(),
            "QUIT\r\n".to_owned()
        ]
    );
    assert_eq!(second.quit_count(), 1);
    assert!(silent.lines().is_empty(), "{:?}", silent.lines());
}

/// A client flooding an endless line while the upstream cannot be had (the first address
/// silent until `connect_timeout`, the second refused): popgate reads it only up to the
/// set-up's bound, and the client still reads the "unavailable" `-ERR` before the close.
#[test]
fn a_flood_during_a_failing_dial_still_gets_the_unavailable_err() {
    let f = Fix::new();
    let silent = Scripted::start(None, Arc::new(basic));
    let refused = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let p = f.h.proxy_toml(&format!(
        "[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n\
         [upstream]\naddress = [\"{}\", \"{refused}\"]\nconnect_timeout = \"1s\"\n\
         [limits]\nmax_line = 100\n\
         [audit]\nenabled = true\ndir = {:?}\n",
        silent.addr,
        f.audit.path()
    ));
    let t0 = Instant::now();
    let c = Conn::open(p.addr);
    let sent = flood(c.w.try_clone().unwrap());
    let (got, end) = c.finish();
    let sent = sent.join().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        "-ERR [SYS/TEMP] upstream server unavailable, try again later\r\n",
        "{end:?}"
    );
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let evs = f.invariants(Up::Script(&silent), 1, 0);
    assert_eq!(close_reason(&evs), "error");
    let read = bytes_from_client(&evs);
    assert!(
        read < 128 * 1024,
        "popgate read {read} of {sent} flooded octets"
    );
    assert!(silent.lines().is_empty(), "{:?}", silent.lines());
}

/// A client that says QUIT before its greeting, while direct mode fails over from a refused
/// address to one slow to greet: its QUIT is kept and relayed after the greeting, exactly
/// once (the server gets the client's QUIT and no other), and the session ends `quit`.
#[test]
fn a_quit_sent_during_the_dial_reaches_the_server_once_after_the_greeting() {
    let f = Fix::new();
    let up = f.demo(
        Faults {
            greeting_delay: Some(Duration::from_millis(300)),
            ..Faults::default()
        },
        two_messages(),
    );
    let refused = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let p = f.h.proxy_toml(&format!(
        "[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n\
         [upstream]\naddress = [\"{refused}\", \"{}\"]\nconnect_timeout = \"2s\"\n\
         [audit]\nenabled = true\ndir = {:?}\n",
        up.local_addr(),
        f.audit.path()
    ));
    let mut c = Conn::open(p.addr);
    c.send(b"QUIT\r\n");
    let (got, end) = c.finish();
    let got = String::from_utf8_lossy(&got);
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines.len(), 2, "{got:?} {end:?}");
    assert!(
        lines[0].starts_with("+OK") && lines[1].starts_with("+OK"),
        "{got:?}"
    );
    let evs = f.invariants(Up::Demo(&up), 1, 1);
    assert_eq!(close_reason(&evs), "quit");
}
