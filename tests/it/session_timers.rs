//! A session's timers on tokio's paused clock: popgate and the demo upstream run in-process in
//! the test's own runtime, so minutes of idle, login, tarpit and penalty time pass in no time
//! and the assertions hold on the virtual clock exactly (no sleeps, no timing slack). Covers the
//! idle, login and greeting timeouts, a rule's tarpit and the failed-login penalty as holds: the client is
//! still read during a hold, the session's deadlines still run, and a shutdown ends it at once.

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use popgate_demo::{DemoServer, Mailbox, ServerOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const USER: &str = "demo";
const PASS: &str = "demo-password";
/// Longest (virtual) wait for a line: a session that never answers fails the test, at once.
const LINE_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// popgate in front of the demo server, both on this runtime.
struct Running {
    addr: SocketAddr,
    up: DemoServer,
    stop: Option<oneshot::Sender<()>>,
    done: JoinHandle<()>,
    _rules: Option<tempfile::TempDir>,
    audit: tempfile::TempDir,
}

/// Start the demo upstream and popgate with `tables` (and a rule file holding `rules`, if any).
async fn start(tables: &str, rules: Option<&str>) -> Running {
    start_with(tables, rules, None).await
}

/// [`start`], popgate's upstream at `upstream` if given (else the demo server).
async fn start_with(tables: &str, rules: Option<&str>, upstream: Option<SocketAddr>) -> Running {
    let up = DemoServer::start(
        "127.0.0.1:0".parse().unwrap(),
        ServerOptions::new(vec![Mailbox::new(
            USER,
            PASS,
            vec![b"Subject: x\r\n\r\nhi\r\n".to_vec()],
        )]),
    )
    .await
    .unwrap();
    let dir = rules.map(|text| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("r.toml"), text).unwrap();
        dir
    });
    let rules_line = dir.as_ref().map_or(String::new(), |d| {
        format!("rules = [{:?}]\n", d.path().join("r.toml"))
    });
    let audit = tempfile::tempdir().unwrap();
    let toml = format!(
        "shutdown_grace = \"0s\"\n{rules_line}\
         [[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n\
         [upstream]\naddress = \"{}\"\n{tables}\n\
         [audit]\nenabled = true\ndir = {:?}\n",
        upstream.unwrap_or(up.local_addr()),
        audit.path()
    );
    let path = Path::new("<test>");
    let config = popgate::Config::parse(&toml, path).unwrap();
    config.validate(path).unwrap();
    let mut proxy = popgate::Proxy::bind(config).await.unwrap();
    // The control socket, if `tables` has `[control]`.
    proxy.start_control(None).unwrap();
    let addr = proxy.local_addrs()[0].1;
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(proxy.run(async {
        let _ = stopped.await;
    }));
    Running {
        addr,
        up,
        stop: Some(stop),
        done,
        _rules: dir,
        audit,
    }
}

impl Running {
    /// The first `session_close` record in the audit trail.
    fn first_close(&self) -> serde_json::Value {
        let events = common::audit_events(self.audit.path());
        let close = events.iter().find(|e| e["event"] == "session_close");
        close.expect("a close record").clone()
    }

    /// Shut popgate down and wait until it has (its sessions closed).
    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // popgate's last step waits for the audit writer, a thread: meanwhile the paused clock
        // must not run ahead to the time limit. Tokio does not advance it while a blocking
        // task runs: one holds it, for 30 s of real time at most.
        let (finished, wait) = std::sync::mpsc::channel::<()>();
        let hold = tokio::task::spawn_blocking(move || {
            let _ = wait.recv_timeout(Duration::from_secs(30));
        });
        let stopped = tokio::time::timeout(LINE_LIMIT, &mut self.done).await;
        let _ = finished.send(());
        hold.await.unwrap();
        stopped.expect("popgate stopped").unwrap();
    }

    /// Shut popgate down (its audit trail then complete) and return the reasons of the
    /// sessions' `session_close` records; every `session_open` has its `session_close`.
    async fn close_reasons(&mut self) -> Vec<String> {
        self.shutdown().await;
        let events = common::audit_events(self.audit.path());
        let opens = events
            .iter()
            .filter(|e| e["event"] == "session_open")
            .count();
        let closes: Vec<String> = events
            .iter()
            .filter(|e| e["event"] == "session_close")
            .map(|e| e["reason"].as_str().unwrap_or("-").to_owned())
            .collect();
        assert_eq!(opens, closes.len(), "{events:?}");
        closes
    }
}

/// `[control]` with its socket in `dir`, for [`start`]'s tables.
fn control_table(dir: &Path) -> String {
    format!("[control]\nsocket = {:?}\n", dir.join("control.sock"))
}

/// The sessions `popgate sessions` lists, asked on the control socket in `dir`.
async fn listed(dir: &Path) -> Vec<serde_json::Value> {
    let mut s = tokio::net::UnixStream::connect(dir.join("control.sock"))
        .await
        .unwrap();
    s.write_all(b"{\"v\":1,\"cmd\":\"sessions\"}\n")
        .await
        .unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).await.unwrap();
    let answer: serde_json::Value = serde_json::from_str(&line).unwrap();
    answer["sessions"].as_array().expect("rows").clone()
}

struct Client {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

/// One line from `r` without CRLF; empty at EOF (or a reset).
async fn line_of(r: &mut BufReader<OwnedReadHalf>) -> String {
    let mut line = String::new();
    tokio::time::timeout(LINE_LIMIT, r.read_line(&mut line))
        .await
        .expect("a line (or EOF) comes")
        .unwrap_or(0);
    line.trim_end().to_owned()
}

/// `bytes` written on `w` in a task of their own (popgate may stop reading: the write then
/// waits for room that never comes); abort the task to end it.
fn write_behind(mut w: OwnedWriteHalf, bytes: Vec<u8>) -> JoinHandle<OwnedWriteHalf> {
    tokio::spawn(async move {
        let _ = w.write_all(&bytes).await;
        w
    })
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        // As popgate and the demo server do: with Nagle a small write could wait for a
        // delayed ACK in real time while the paused clock runs ahead to the next timer.
        stream.set_nodelay(true).unwrap();
        let (r, w) = stream.into_split();
        Client {
            r: BufReader::new(r),
            w,
        }
    }

    /// One line without CRLF; empty at EOF.
    async fn line(&mut self) -> String {
        line_of(&mut self.r).await
    }

    async fn send(&mut self, line: &str) {
        self.w
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.send(line).await;
        self.line().await
    }

    /// USER and PASS sent, no answer read.
    async fn send_login(&mut self) {
        self.send(&format!("USER {USER}")).await;
        self.send(&format!("PASS {PASS}")).await;
    }

    /// Greeting, USER, PASS: the PASS reply.
    async fn login(&mut self, pass: &str) -> String {
        assert!(self.cmd(&format!("USER {USER}")).await.starts_with("+OK"));
        self.cmd(&format!("PASS {pass}")).await
    }

    async fn greeted(addr: SocketAddr) -> Client {
        let mut c = Client::connect(addr).await;
        assert!(c.line().await.starts_with("+OK"));
        c
    }
}

/// `elapsed` is `want` on the virtual clock (within the odd millisecond of real work).
fn took(elapsed: Duration, want: Duration) {
    assert!(
        elapsed >= want && elapsed < want + Duration::from_millis(100),
        "took {elapsed:?}, want {want:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_ends_a_quiet_session_and_sends_no_quit() {
    let mut p = start("[limits]\nidle_timeout = \"10m\"\n", None).await;
    let mut c = Client::greeted(p.addr).await;
    assert!(c.login(PASS).await.starts_with("+OK"));
    let t = Instant::now();
    assert_eq!(c.line().await, "-ERR autologout: idle for too long");
    took(t.elapsed(), Duration::from_secs(600));
    assert_eq!(c.line().await, "", "closed");
    assert_eq!(p.up.quit_count(), 0);
    assert_eq!(p.close_reasons().await, ["idle_timeout"]);
}

/// Moved from `faults.rs` (a 1 s timeout waited in real time there): one byte every 10 s,
/// never a line end, and the login timeout still ends the session; nothing is forwarded.
#[tokio::test(start_paused = true)]
async fn client_slow_loris() {
    let mut p = start("[limits]\nlogin_timeout = \"1m\"\n", None).await;
    let t = Instant::now();
    let c = Client::greeted(p.addr).await;
    let Client { mut r, mut w } = c;
    // One byte every 10 s: never a line, always some activity.
    let trickle = tokio::spawn(async move {
        for b in b"USER ".iter().chain(std::iter::repeat(&b'a')).take(50) {
            if w.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    });
    // Everything until the end: the timeout's answer, then a plain close (no reset).
    let mut got = Vec::new();
    let end = tokio::io::AsyncReadExt::read_to_end(&mut r, &mut got).await;
    took(t.elapsed(), Duration::from_secs(60));
    assert_eq!(
        String::from_utf8_lossy(&got),
        "-ERR disconnected: no login in time\r\n"
    );
    assert!(end.is_ok(), "{end:?}");
    trickle.abort();
    assert!(
        p.up.received().is_empty(),
        "no partial line forwarded: {:?}",
        p.up.received()
    );
    assert_eq!(p.up.quit_count(), 0);
    assert_eq!(p.close_reasons().await, ["login_timeout"]);
}

#[tokio::test(start_paused = true)]
async fn greeting_timeout_answers_for_an_upstream_that_never_greets() {
    // An upstream that accepts and says nothing, on this runtime too.
    let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mute_addr = mute.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = mute.accept().await {
            conns.push(c);
        }
    });
    let p = start_with(
        "[limits]\ngreeting_timeout = \"30s\"\n",
        None,
        Some(mute_addr),
    )
    .await;
    let t = Instant::now();
    let mut c = Client::connect(p.addr).await;
    assert_eq!(
        c.line().await,
        "-ERR [SYS/TEMP] upstream server did not answer, try again later"
    );
    took(t.elapsed(), Duration::from_secs(30));
    assert_eq!(c.line().await, "", "closed");
    held.abort();
}

/// An upstream on this runtime that greets, takes any login, gives message 1 the UIDL `u1`,
/// and answers RETR with `retr`, then nothing more.
async fn stalling_upstream(retr: &'static [u8]) -> (SocketAddr, JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        s.set_nodelay(true).unwrap();
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"+OK ready\r\n").await.unwrap();
        let mut line = String::new();
        while r.read_line(&mut line).await.unwrap_or(0) > 0 {
            let answer: &[u8] = if line.starts_with("RETR") {
                retr
            } else if line.starts_with("UIDL") {
                b"+OK 1 u1\r\n"
            } else {
                b"+OK\r\n"
            };
            let _ = w.write_all(answer).await;
            line.clear();
        }
    });
    (addr, task)
}

/// Moved from `faults.rs` (a 1 s timeout waited in real time there): a body that stops
/// coming is cut by the idle timeout, with a reset and no terminator.
#[tokio::test(start_paused = true)]
async fn upstream_stalls_mid_body() {
    let (up, _server) = stalling_upstream(b"+OK 40 octets\r\nline one\r\nline t").await;
    let mut p = start_with("[limits]\nidle_timeout = \"10m\"\n", None, Some(up)).await;
    let mut c = Client::greeted(p.addr).await;
    assert!(c.login(PASS).await.starts_with("+OK"));
    let t = Instant::now();
    c.send("RETR 1").await;
    let mut got = Vec::new();
    let end = tokio::io::AsyncReadExt::read_to_end(&mut c.r, &mut got).await;
    took(t.elapsed(), Duration::from_secs(600));
    assert!(got.starts_with(b"+OK 40 octets\r\nline one\r\n"), "{got:?}");
    let after = &got[b"+OK 40 octets\r\n".len()..];
    assert!(!after.windows(5).any(|w| w == b"\r\n.\r\n"), "{got:?}");
    assert!(
        !after.ends_with(b"\n.") && !after.ends_with(b"\n.\r"),
        "{got:?}"
    );
    assert_eq!(
        end.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionReset),
        "the client connection must end with a reset"
    );
    assert_eq!(p.close_reasons().await, ["idle_timeout"]);
}

const SLOW_STAT: &str = "[[rule]]\nname = \"slow-stat\"\non = \"command\"\nverbs = [\"STAT\"]\n\
                         action = \"delay\"\ndelay = \"5m\"\n";

#[tokio::test(start_paused = true)]
async fn a_tarpit_holds_the_reply_while_the_client_is_still_read() {
    // Idle after 4 minutes: only the NOOP sent during the 5-minute hold keeps the session.
    let p = start("[limits]\nidle_timeout = \"4m\"\n", Some(SLOW_STAT)).await;
    let mut c = Client::greeted(p.addr).await;
    assert!(c.login(PASS).await.starts_with("+OK"));
    let t = Instant::now();
    c.send("STAT").await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    c.send("NOOP").await;
    let stat = c.line().await;
    assert!(stat.starts_with("+OK 1 "), "{stat}");
    took(t.elapsed(), Duration::from_secs(300));
    assert!(c.line().await.starts_with("+OK"));
    took(t.elapsed(), Duration::from_secs(300));
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    assert_eq!(p.up.quit_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_idle_timeout_still_runs_during_a_tarpit() {
    let p = start("[limits]\nidle_timeout = \"4m\"\n", Some(SLOW_STAT)).await;
    let mut c = Client::greeted(p.addr).await;
    assert!(c.login(PASS).await.starts_with("+OK"));
    let t = Instant::now();
    // The held STAT never goes out: the session ends idle after 4 minutes, not 5; the
    // client gets the timeout's answer in place of the held one.
    assert_eq!(c.cmd("STAT").await, "-ERR autologout: idle for too long");
    took(t.elapsed(), Duration::from_secs(240));
    assert_eq!(c.line().await, "", "closed");
    assert_eq!(p.up.quit_count(), 0);
}

const PENALTY: &str = "[limits]\nlogin_fail_delay = \"30s\"\nlogin_fail_delay_max = \"30s\"\n";

/// Two free failures, then the third: its `-ERR` is held 30 s.
async fn third_failure(c: &mut Client) {
    for _ in 0..2 {
        assert!(c.login("wrong").await.starts_with("-ERR"));
    }
    assert!(c.cmd(&format!("USER {USER}")).await.starts_with("+OK"));
    c.send("PASS wrong").await;
}

#[tokio::test(start_paused = true)]
async fn a_login_penalty_holds_the_reply_and_reads_on() {
    let mut p = start(PENALTY, None).await;
    let mut c = Client::greeted(p.addr).await;
    third_failure(&mut c).await;
    let t = Instant::now();
    // Sent during the hold, answered after the held `-ERR`, in order.
    tokio::time::sleep(Duration::from_secs(10)).await;
    c.send(&format!("USER {USER}")).await;
    assert!(c.line().await.starts_with("-ERR"));
    took(t.elapsed(), Duration::from_secs(30));
    assert!(c.line().await.starts_with("+OK"));
    took(t.elapsed(), Duration::from_secs(30));
    // A good login from the penalised address is not held.
    let t = Instant::now();
    assert!(c.cmd(&format!("PASS {PASS}")).await.starts_with("+OK"));
    took(t.elapsed(), Duration::ZERO);
    p.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_login_timeout_still_runs_during_a_login_penalty() {
    let p = start(&format!("{PENALTY}login_timeout = \"20s\"\n"), None).await;
    let t = Instant::now();
    let mut c = Client::greeted(p.addr).await;
    third_failure(&mut c).await;
    // The hold is cut short: the held `-ERR` and the timeout's at 20 s, not 30.
    assert!(c.line().await.starts_with("-ERR [AUTH]"));
    took(t.elapsed(), Duration::from_secs(20));
    assert_eq!(c.line().await, "-ERR disconnected: no login in time");
    assert_eq!(c.line().await, "", "closed");
    assert_eq!(p.up.quit_count(), 0);
}

/// Moved from `limits.rs` (it waited in real time there): a failure reply held by the login
/// penalty does not hold up a shutdown; the session ends at once, the client still gets its
/// `-ERR`, and nothing waits the full delay.
#[tokio::test(start_paused = true)]
async fn shutdown_cuts_a_login_penalty_short() {
    let mut p = start(PENALTY, None).await;
    let mut c = Client::greeted(p.addr).await;
    third_failure(&mut c).await;
    // The third failure is held for 30 s; shut down while it is, with a command read
    // during the hold that must never reach the server.
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.send(&format!("USER {USER}")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    p.shutdown().await;
    took(started.elapsed(), Duration::ZERO);
    let rest = c.line().await;
    assert!(rest.starts_with("-ERR"), "{rest:?}");
    // The USER read during the hold is answered by the shutdown.
    assert_eq!(c.line().await, "-ERR [SYS/TEMP] proxy shutting down");
    assert_eq!(c.line().await, "", "closed");
    let users =
        p.up.received()
            .iter()
            .filter(|l| l.starts_with(b"USER"))
            .count();
    assert_eq!(users, 3, "the USER sent during the hold stayed there");
    assert_eq!(p.up.quit_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn shutdown_cuts_a_tarpit_short_without_quit() {
    let mut p = start("", Some(SLOW_STAT)).await;
    let mut c = Client::greeted(p.addr).await;
    assert!(c.login(PASS).await.starts_with("+OK"));
    c.send("STAT").await;
    c.send("QUIT").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    p.shutdown().await;
    took(started.elapsed(), Duration::ZERO);
    assert_eq!(c.line().await, "-ERR [SYS/TEMP] proxy shutting down");
    assert_eq!(c.line().await, "", "closed");
    assert_eq!(p.up.quit_count(), 0, "the held QUIT never went out");
    assert!(!p.up.received().iter().any(|l| l.starts_with(b"STAT")));
}

#[tokio::test(start_paused = true)]
async fn shutdown_cuts_a_connect_rule_delay_short() {
    let rule = "[[rule]]\nname = \"slow-connect\"\non = \"connect\"\naction = \"delay\"\n\
                delay = \"10m\"\n";
    let mut p = start("", Some(rule)).await;
    let mut c = Client::connect(p.addr).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let started = Instant::now();
    p.shutdown().await;
    took(started.elapsed(), Duration::ZERO);
    assert_eq!(c.line().await, "-ERR [SYS/TEMP] proxy shutting down");
    assert_eq!(c.line().await, "", "closed");
    assert_eq!(p.up.connections(), 0, "never dialled");
    // Recorded at the connect, closed by the shutdown.
    let events = common::audit_events(p.audit.path());
    let kinds: Vec<&serde_json::Value> = events.iter().map(|e| &e["event"]).collect();
    assert_eq!(kinds, ["session_open", "session_close"], "{events:?}");
    assert_eq!(events[1]["reason"], "shutdown");
}

const SLOW_CONNECT: &str = "[[rule]]\nname = \"slow-connect\"\non = \"connect\"\n\
                            action = \"delay\"\ndelay = \"60s\"\n";
/// The login timeout counts from the connect, the delay included: longer than the delay here.
const LOGIN_AFTER_DELAY: &str = "[limits]\nlogin_timeout = \"5m\"\n";

/// [`start`] with [`SLOW_CONNECT`], [`LOGIN_AFTER_DELAY`] and `tables` after it (in `[limits]`
/// unless they open a table).
async fn start_delayed(tables: &str) -> Running {
    start(&format!("{LOGIN_AFTER_DELAY}{tables}"), Some(SLOW_CONNECT)).await
}

/// A client that hangs up during a connect rule's delay ends its session then, not 60 s
/// later: `popgate sessions` no longer lists it, its address's one place under
/// `max_sessions_per_ip` is free for the next connection, and its `session_close` says
/// `client_eof` at once.
#[tokio::test(start_paused = true)]
async fn a_client_that_hangs_up_during_a_connect_delay_frees_its_session_at_once() {
    let ctl = tempfile::tempdir().unwrap();
    let tables = format!("max_sessions_per_ip = 1\n{}", control_table(ctl.path()));
    let mut p = start_delayed(&tables).await;
    let c = Client::connect(p.addr).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rows = listed(ctl.path()).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["state"], "CONNECTING");
    let t = Instant::now();
    drop(c);
    while !listed(ctl.path()).await.is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "still listed {:?} after the hang-up",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let in (greeted after its own delay), not refused as a second session from the address.
    let t = Instant::now();
    let mut c = Client::connect(p.addr).await;
    let greeting = c.line().await;
    assert!(greeting.starts_with("+OK"), "{greeting}");
    took(t.elapsed(), Duration::from_secs(60));
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    assert_eq!(p.close_reasons().await, ["client_eof", "quit"]);
    let first = p.first_close();
    // Connected 1 s before the hang-up, closed at it.
    let ms = first["duration_ms"].as_u64().unwrap();
    assert!((1000..2000).contains(&ms), "{first}");
}

/// Commands a client pipelines before its greeting, during a connect rule's delay, are read
/// meanwhile and relayed after the delay in order, as if they had waited in the socket.
#[tokio::test(start_paused = true)]
async fn commands_sent_during_a_connect_delay_are_relayed_after_it() {
    let ctl = tempfile::tempdir().unwrap();
    let mut p = start_delayed(&control_table(ctl.path())).await;
    let t = Instant::now();
    let mut c = Client::connect(p.addr).await;
    let sent = format!("USER {USER}\r\nPASS {PASS}\r\nSTAT\r\nQUIT\r\n");
    c.w.write_all(sent.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(p.up.received().is_empty(), "relayed during the delay");
    // Read meanwhile: `popgate sessions` counts it.
    let rows = listed(ctl.path()).await;
    assert_eq!(rows[0]["bytes_from_client"], sent.len(), "{rows:?}");
    let greeting = c.line().await;
    assert!(greeting.starts_with("+OK"), "the greeting: {greeting:?}");
    took(t.elapsed(), Duration::from_secs(60));
    assert!(c.line().await.starts_with("+OK"), "USER");
    assert!(c.line().await.starts_with("+OK"), "PASS");
    assert!(c.line().await.starts_with("+OK 1 "), "STAT");
    assert!(c.line().await.starts_with("+OK"), "QUIT");
    assert_eq!(c.line().await, "", "closed");
    took(t.elapsed(), Duration::from_secs(60));
    assert_eq!(p.up.quit_count(), 1);
    assert_eq!(p.close_reasons().await, ["quit"]);
    let close = p.first_close();
    assert_eq!(close["bytes_from_client"], sent.len(), "{close}");
}

/// Rules that hold every connection 60 s, then refuse it with `deny` or `drop`.
fn slow_refusal(action: &str) -> String {
    format!(
        "{SLOW_CONNECT}[[rule]]\nname = \"no-entry\"\non = \"connect\"\naction = \"{action}\"\n"
    )
}

/// A client held by a connect rule that then refuses it (`deny`: its `-ERR` line; `drop`:
/// silence) pipelines a login during the delay: none of it reaches the server, which is never
/// even dialled, and the audit trail has the session's open and its `rule_drop` close.
#[tokio::test(start_paused = true)]
async fn a_refusal_after_a_connect_delay_sends_nothing_of_the_early_input_upstream() {
    for (action, reply) in [
        ("deny", Some("-ERR connection not allowed by policy")),
        ("drop", None),
    ] {
        let mut p = start(LOGIN_AFTER_DELAY, Some(&slow_refusal(action))).await;
        let t = Instant::now();
        let mut c = Client::connect(p.addr).await;
        c.send_login().await;
        c.send("QUIT").await;
        let first = c.line().await;
        took(t.elapsed(), Duration::from_secs(60));
        match reply {
            Some(reply) => {
                assert_eq!(first, reply, "{action}");
                assert_eq!(c.line().await, "", "{action}: closed");
            }
            None => assert_eq!(first, "", "{action}: closed without a word"),
        }
        assert_eq!(p.up.connections(), 0, "{action}: never dialled");
        assert!(p.up.received().is_empty(), "{action}");
        assert_eq!(p.close_reasons().await, ["rule_drop"], "{action}");
    }
}

/// A client that hangs up during a connect rule's delay, after pipelining a login, leaves no
/// trace upstream: the server is never dialled.
#[tokio::test(start_paused = true)]
async fn a_client_that_hangs_up_during_a_connect_delay_is_never_dialled_for() {
    let mut p = start_delayed("").await;
    let mut c = Client::connect(p.addr).await;
    c.send_login().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(c);
    // Well past the delay: nothing was kept to be relayed after it.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(p.up.connections(), 0, "never dialled");
    assert_eq!(p.close_reasons().await, ["client_eof"]);
}

/// One endless line sent during a connect rule's delay (a megabyte, no CRLF): popgate keeps a
/// bounded part of it meanwhile; after the delay the session ends as the relay ends endless
/// junk (`error`): at once, none of it relayed, no QUIT sent upstream on the client's behalf.
/// (The junk comes before the server's greeting, so the `-ERR` queued behind it is not sent:
/// the client sees the connection close.)
#[tokio::test(start_paused = true)]
async fn an_endless_line_sent_during_a_connect_delay_ends_the_session_after_it_unrelayed() {
    let mut p = start_delayed("").await;
    let t = Instant::now();
    let Client { mut r, w } = Client::connect(p.addr).await;
    // popgate stops reading at its limit: the rest waits in the socket, or is refused.
    let writer = write_behind(w, vec![b'A'; 1 << 20]);
    let mut got = Vec::new();
    loop {
        let line = line_of(&mut r).await;
        if line.is_empty() {
            break;
        }
        got.push(line);
    }
    took(t.elapsed(), Duration::from_secs(60));
    assert!(
        got.iter()
            .all(|l| l.starts_with("+OK") || l.contains("too long")),
        "{got:?}"
    );
    writer.abort();
    assert!(
        !p.up.received().iter().any(|l| l.starts_with(b"AAAA")),
        "junk relayed"
    );
    assert_eq!(p.up.quit_count(), 0);
    assert_eq!(p.close_reasons().await, ["error"]);
}

/// A megabyte of pipelined commands sent during a connect rule's delay: popgate keeps a
/// bounded part of it (`limits.max_line` x `limits.max_pipeline`, at most 64 KiB, plus one
/// read), the rest waits in the client's socket. A shutdown meanwhile still gets the client
/// its `-ERR`, and the close record counts what was kept; the server was never dialled.
#[tokio::test(start_paused = true)]
async fn a_flood_during_a_connect_delay_is_kept_within_its_limit() {
    let mut p = start_delayed("").await;
    let Client { mut r, w } = Client::connect(p.addr).await;
    // popgate stops reading at its limit: this write waits for room that never comes.
    let writer = write_behind(w, b"NOOP\r\n".repeat((1 << 20) / 6));
    tokio::time::sleep(Duration::from_secs(30)).await;
    p.shutdown().await;
    assert_eq!(line_of(&mut r).await, "-ERR [SYS/TEMP] proxy shutting down");
    writer.abort();
    assert_eq!(p.up.connections(), 0, "never dialled");
    let close = p.first_close();
    assert_eq!(close["reason"], "shutdown", "{close}");
    let kept = close["bytes_from_client"].as_u64().unwrap();
    assert!(
        kept > 0 && kept <= (64 + 16) * 1024,
        "kept {kept} bytes: {close}"
    );
}
