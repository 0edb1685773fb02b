//! Connection and login limits through the real binary (`popgate run` in front of the demo
//! upstream, loopback only): the per-IP session cap, `max_sessions` exact across listeners with
//! an immediate `-ERR` over the cap, the failed-login penalty per IP, and `popgate check`
//! refusing what `run` would fail on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::clients::run_bounded;
use common::free_port;
use common::proxy::{Harness, PopgateOpts, PopgateProcess, mailbox, popgate_bin};
use popgate_demo::{DemoServer, ServerOptions};

const USER: &str = "demo";
const PASS: &str = "demo-password";
/// Longest wait for any one line; a refused client must be answered well within it.
const READ_LIMIT: Duration = Duration::from_secs(5);

fn demo(h: &Harness) -> DemoServer {
    h.upstream(ServerOptions::new(vec![mailbox(
        USER,
        PASS,
        vec![b"Subject: x\r\n\r\nhi\r\n".to_vec()],
    )]))
}

/// `popgate run` with logs in `log/` and `tables` appended; waits for `listeners` "listening"
/// lines (a probe connection would be a session and count against the limits).
fn binary(upstream: SocketAddr, opts: PopgateOpts, listeners: usize) -> PopgateProcess {
    let p = PopgateProcess::run(upstream, opts.log_to_dir("info").wait_for_log());
    p.wait_log("listening", listeners);
    p
}

/// A POP3 client connected from the local address `from` (any 127.0.0.0/8 address works on
/// Linux loopback); reads time out after [`READ_LIMIT`].
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(_h: &Harness, from: &str, to: SocketAddr) -> Client {
        let stream = common::clients::connect_from(from.parse().unwrap(), to);
        stream.set_read_timeout(Some(READ_LIMIT)).unwrap();
        Client {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    /// One line without CRLF; empty at EOF. Panics when nothing comes within the limit.
    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("no line within {READ_LIMIT:?}: {e}"));
        line.trim_end().to_owned()
    }

    fn cmd(&mut self, line: &str) -> String {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .unwrap();
        self.line()
    }

    /// USER + PASS; the PASS reply and how long it took.
    fn login(&mut self, pass: &str) -> (String, Duration) {
        assert!(self.cmd(&format!("USER {USER}")).starts_with("+OK"));
        let t = Instant::now();
        let reply = self.cmd(&format!("PASS {pass}"));
        (reply, t.elapsed())
    }
}

/// Connect from `from` until the greeting is `+OK` (a closed session frees its slot a moment
/// after the client's close); bounded.
fn greeted_eventually(h: &Harness, from: &str, to: SocketAddr) -> Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = Client::connect(h, from, to);
        let greeting = c.line();
        if greeting.starts_with("+OK") {
            return c;
        }
        assert!(Instant::now() < deadline, "still refused: {greeting}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn per_ip_cap_refuses_the_extra_connection_and_spares_other_addresses() {
    let h = Harness::new();
    let up = demo(&h);
    let p = binary(
        up.local_addr(),
        PopgateOpts::new().tables("[limits]\nmax_sessions_per_ip = 3\n"),
        1,
    );
    let mut open: Vec<Client> = (0..3)
        .map(|i| {
            let mut c = Client::connect(&h, "127.0.0.1", p.addr);
            let g = c.line();
            assert!(g.starts_with("+OK"), "connection {i}: {g}");
            c
        })
        .collect();
    let t = Instant::now();
    let mut extra = Client::connect(&h, "127.0.0.1", p.addr);
    assert_eq!(
        extra.line(),
        "-ERR [SYS/TEMP] too many connections from your address"
    );
    assert_eq!(extra.line(), "", "closed after the -ERR");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // Another address is not affected.
    let mut other = Client::connect(&h, "127.0.0.2", p.addr);
    assert!(other.line().starts_with("+OK"));
    // The open sessions still work, and a closed one frees its slot.
    assert!(open[0].cmd("USER demo").starts_with("+OK"));
    assert!(open[2].cmd("QUIT").starts_with("+OK"));
    open.pop();
    let mut again = greeted_eventually(&h, "127.0.0.1", p.addr);
    assert!(again.cmd("QUIT").starts_with("+OK"));
    let log = p.wait_log("too many sessions from this address", 1);
    assert!(log.contains("refused_total=1"), "{log}");
}

#[test]
fn max_sessions_is_exact_across_two_listeners_and_refuses_at_once() {
    let h = Harness::new();
    let up = demo(&h);
    let second: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let p = binary(
        up.local_addr(),
        PopgateOpts::new()
            .listener(&format!(
                "[[listener]]\nname = \"second\"\nbind = \"{second}\"\n"
            ))
            .tables("[limits]\nmax_sessions = 2\nmax_sessions_per_ip = 0\n"),
        2,
    );
    let first = p.addr;
    let mut a = Client::connect(&h, "127.0.0.1", first);
    assert!(a.line().starts_with("+OK"));
    let mut b = Client::connect(&h, "127.0.0.1", second);
    assert!(b.line().starts_with("+OK"), "both slots are usable");
    for (i, to) in [first, second, first].into_iter().enumerate() {
        let t = Instant::now();
        let mut c = Client::connect(&h, "127.0.0.1", to);
        assert_eq!(
            c.line(),
            "-ERR [SYS/TEMP] too many connections",
            "extra client {i}"
        );
        assert_eq!(c.line(), "", "closed after the -ERR");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
    assert!(a.cmd("QUIT").starts_with("+OK"));
    drop(a);
    let mut c = greeted_eventually(&h, "127.0.0.1", second);
    assert!(c.cmd("QUIT").starts_with("+OK"));
    assert!(b.cmd("QUIT").starts_with("+OK"));
    p.wait_log("limits.max_sessions reached", 3);
}

#[test]
fn failed_logins_are_delayed_per_ip() {
    let h = Harness::new();
    let up = demo(&h);
    let delay = Duration::from_millis(800);
    let p = binary(
        up.local_addr(),
        PopgateOpts::new()
            .tables("[limits]\nlogin_fail_delay = \"800ms\"\nlogin_fail_delay_max = \"1600ms\"\n"),
        1,
    );
    let mut bad = Client::connect(&h, "127.0.0.1", p.addr);
    assert!(bad.line().starts_with("+OK"));
    let mut took = Vec::new();
    for _ in 0..4 {
        let (reply, t) = bad.login("wrong");
        assert!(reply.starts_with("-ERR"), "{reply}");
        took.push(t);
    }
    // Two free failures, then 800 ms, then doubled.
    assert!(took[2] >= delay, "3rd failure after {:?}", took[2]);
    assert!(took[3] >= 2 * delay, "4th failure after {:?}", took[3]);
    assert!(took[0] < delay && took[1] < delay, "{took:?}");
    // Another address: a good login and a first failure are not delayed.
    let mut good = Client::connect(&h, "127.0.0.2", p.addr);
    assert!(good.line().starts_with("+OK"));
    let (reply, t) = good.login(PASS);
    assert!(reply.starts_with("+OK"), "{reply}");
    assert!(t < delay, "good login from another IP took {t:?}");
    assert!(
        good.cmd("QUIT").starts_with("+OK"),
        "and the maildrop is unlocked"
    );
    let mut other = Client::connect(&h, "127.0.0.3", p.addr);
    assert!(other.line().starts_with("+OK"));
    let (reply, t) = other.login("wrong");
    assert!(
        reply.starts_with("-ERR") && t < delay,
        "{reply} after {t:?}"
    );
    // A successful login is never held back, even from the penalised address (the maildrop
    // lock of the QUIT session above may take a moment to go).
    for _ in 0..20 {
        let (reply, t) = bad.login(PASS);
        if reply.contains("[IN-USE]") {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        assert!(reply.starts_with("+OK") && t < delay, "{reply} after {t:?}");
        return;
    }
    panic!("the maildrop stayed locked");
}

/// `popgate check` on a config made of `text`, in its own dir; (success, stdout + stderr).
fn check(dir: &std::path::Path, name: &str, text: &str) -> (bool, String) {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, text).unwrap();
    let mut cmd = Command::new(popgate_bin());
    cmd.args(["check", "--config"]).arg(&cfg);
    let out = run_bounded(&mut cmd, None, Duration::from_secs(20));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn check_refuses_what_run_would_fail_on() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a-file"), "x").unwrap();
    let base = "[[listener]]\nname = \"p\"\nbind = \"127.0.0.1:1110\"\n\
                [upstream]\naddress = \"127.0.0.1:110\"\n";
    let cases: &[(&str, String, &[&str])] = &[
        (
            "verbose",
            format!("{base}[log]\nlevel = \"verbose\"\n"),
            &["log.level", "verbose"],
        ),
        (
            "warning",
            format!("{base}[log]\nlevel = \"warning\"\n"),
            &["log.level", "warning"],
        ),
        (
            "max-sessions",
            format!("{base}[limits]\nmax_sessions = 4000000000000000000\n"),
            &["limits.max_sessions"],
        ),
        (
            "same-bind",
            format!("{base}[[listener]]\nname = \"q\"\nbind = \"127.0.0.1:1110\"\n"),
            &["listener[1].bind", "127.0.0.1:1110"],
        ),
        (
            "log-dir",
            format!("{base}[log]\ndir = \"a-file/log\"\n"),
            &["log.dir", "not a directory"],
        ),
        (
            "audit-dir",
            format!("{base}[audit]\nenabled = true\ndir = \"a-file\"\n"),
            &["audit.dir", "not a directory"],
        ),
        (
            "transcript-dir",
            format!("{base}[audit.transcript]\ndir = \"/proc/popgate-none/t\"\n"),
            &["audit.transcript.dir", "cannot be created"],
        ),
    ];
    for (name, text, needles) in cases {
        let (ok, out) = check(dir.path(), name, text);
        assert!(!ok, "{name}: check accepted it:\n{out}");
        for n in *needles {
            assert!(out.contains(n), "{name}: no {n:?} in:\n{out}");
        }
    }
    // Directories that do not exist yet but can be created are fine, and check creates none.
    let (ok, out) = check(
        dir.path(),
        "creatable",
        &format!(
            "{base}[log]\nlevel = \"popgate=debug,warn\"\ndir = \"logs/new\"\n\
             [audit]\nenabled = true\ndir = \"audit\"\n"
        ),
    );
    assert!(ok, "{out}");
    assert!(!dir.path().join("logs").exists() && !dir.path().join("audit").exists());
}

#[test]
fn run_refuses_a_log_level_that_would_silence_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[listener]]\nname = \"p\"\nbind = \"127.0.0.1:{}\"\n\
             [upstream]\naddress = \"127.0.0.1:110\"\n[log]\nlevel = \"warning\"\n",
            free_port()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(popgate_bin());
    cmd.args(["run", "--config"]).arg(&cfg);
    let out = run_bounded(&mut cmd, None, Duration::from_secs(20));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("log.level"));
}
