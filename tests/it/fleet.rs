//! Fleet state on Redis (`[state] backend = "redis"`, src/state/) with real components: a
//! `redis-server` of its own per test (loopback port, temp dir, no persistence), two `popgate
//! run` processes, the demo upstream or Dovecot with the oauth2 passdb and the token server of
//! tests/fixtures/authserver.py (single-use rotating refresh tokens), HAProxy in front.
//!
//! Short settings keep each test quick: `slot_ttl = "3s"` here (production default 1m, so a
//! dead instance's slots are free within a minute), access tokens of 2 s.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::authserver::{AuthServer, CLIENT};
use common::clients::{RawPop, connect_from, curl};
use common::dovecot::{Dovecot, DovecotOpts, msg_dots};
use common::proxy::{Harness, PopgateOpts, PopgateProcess, mailbox};
use common::{find_exe, free_port, wait_until};
use popgate_demo::{DemoServer, ServerOptions};

const USER: &str = "demo";
const PASS: &str = "demo-password";

/// A `redis-server` on a loopback port with its own directory; stopped on drop.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

impl Redis {
    fn start() -> Redis {
        Redis::start_with(&[])
    }

    /// With more `redis-server` arguments (e.g. `--requirepass`).
    fn start_with(args: &[&str]) -> Redis {
        let mut r = Redis {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        };
        r.restart();
        r
    }

    /// Starts the server (again) on its port, empty (no persistence); waits until it answers.
    fn restart(&mut self) {
        let exe = find_exe("redis-server")
            .expect("redis-server not installed: run .ci/run (apt-get install redis-server)");
        let child = Command::new(exe)
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(self.dir.path().join("redis.log")).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        wait_until("redis-server answers", || {
            self.cli(&["PING"]).trim() == "PONG"
        });
    }

    /// Stops the server (SIGKILL: as if the machine went away).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// `redis-cli` against this server: its output.
    fn cli(&self, args: &[&str]) -> String {
        let Some(exe) = find_exe("redis-cli") else {
            return String::new();
        };
        let mut cmd = Command::new(exe);
        cmd.args(["-h", "127.0.0.1", "-p"])
            .arg(self.port.to_string());
        if let Some(i) = self.args.iter().position(|a| a == "--requirepass") {
            cmd.env("REDISCLI_AUTH", &self.args[i + 1]);
        }
        let out = cmd.args(args).stderr(Stdio::null()).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `[state]` for `redis` with short settings.
fn state_toml(redis: &Redis, prefix: &str) -> String {
    format!(
        "[state]\nbackend = \"redis\"\nurl = \"{}\"\nkey_prefix = \"{prefix}\"\n\
         timeout = \"300ms\"\nslot_ttl = \"3s\"\n",
        redis.url()
    )
}

fn demo(h: &Harness) -> DemoServer {
    h.upstream(ServerOptions::new(vec![mailbox(
        USER,
        PASS,
        vec![b"Subject: x\r\n\r\nhi\r\n".to_vec()],
    )]))
}

/// `popgate run` in front of `upstream` with `tables`; logs in `log/`.
fn instance(upstream: SocketAddr, tables: &str) -> PopgateProcess {
    PopgateProcess::run(
        upstream,
        PopgateOpts::new()
            .tables(tables)
            .log_to_dir("info")
            .wait_for_log(),
    )
}

/// A failed login from `from` through `to`: the `-ERR` and how long it took.
fn failed_login(from: &str, to: SocketAddr) -> (String, Duration) {
    let mut c = RawPop::over(connect_from(from.parse().unwrap(), to));
    let greeting = c.line();
    assert!(greeting.starts_with("+OK"), "{greeting}");
    assert!(c.cmd(&format!("USER {USER}")).starts_with("+OK"));
    let t = Instant::now();
    let reply = c.cmd("PASS wrong");
    let took = t.elapsed();
    let _ = c.cmd("QUIT");
    (reply, took)
}

/// Four failed logins from one address, alternating between `a` and `b`: how long each reply
/// was held.
fn alternating_failures(from: &str, a: SocketAddr, b: SocketAddr) -> Vec<Duration> {
    (0..4)
        .map(|i| {
            let (reply, took) = failed_login(from, if i % 2 == 0 { a } else { b });
            assert!(reply.starts_with("-ERR"), "{reply}");
            took
        })
        .collect()
}

const PENALTY: &str = "[limits]\nlogin_fail_delay = \"600ms\"\nlogin_fail_delay_max = \"3s\"\n";

#[test]
#[ignore = "needs redis-server (run .ci/run)"]
fn failed_logins_spread_over_two_instances_hit_the_penalty_at_the_fleet_total() {
    let h = Harness::new();
    let up = demo(&h);
    let redis = Redis::start();
    let tables = format!("{PENALTY}{}", state_toml(&redis, "pen:"));
    let (a, b) = (
        instance(up.local_addr(), &tables),
        instance(up.local_addr(), &tables),
    );
    // Two free failures in the fleet, then 600 ms, then 1.2 s, whichever instance answers.
    let took = alternating_failures("127.0.0.21", a.addr, b.addr);
    eprintln!("redis: {took:?}");
    assert!(took[0] < Duration::from_millis(500), "{took:?}");
    assert!(took[1] < Duration::from_millis(500), "{took:?}");
    assert!(
        took[2] >= Duration::from_millis(550),
        "third in the fleet: {took:?}"
    );
    assert!(
        took[3] >= Duration::from_millis(1150),
        "fourth in the fleet: {took:?}"
    );
    // Another address starts from nothing.
    assert!(failed_login("127.0.0.22", b.addr).1 < Duration::from_millis(500));
    // The count lives in Redis, with its expiry (the failure window).
    let ttl: i64 = redis
        .cli(&["PTTL", "pen:fail:127.0.0.21"])
        .trim()
        .parse()
        .unwrap_or(-3);
    assert!(ttl > 0, "pen:fail:127.0.0.21 has no expiry: {ttl}");

    // The same with `local`: each instance counts only its own two, so no delay at all (the
    // reason the store exists).
    let (la, lb) = (
        instance(up.local_addr(), PENALTY),
        instance(up.local_addr(), PENALTY),
    );
    let took = alternating_failures("127.0.0.23", la.addr, lb.addr);
    eprintln!("local: {took:?}");
    assert!(
        took.iter().all(|t| *t < Duration::from_millis(500)),
        "local instances count apart: {took:?}"
    );
}

/// Connect from `from` to `to`: the first line (greeting or refusal) and the connection.
fn open(from: &str, to: SocketAddr) -> (String, RawPop) {
    let mut c = RawPop::over(connect_from(from.parse().unwrap(), to));
    let first = c.line();
    (first, c)
}

#[test]
#[ignore = "needs redis-server (run .ci/run)"]
fn max_sessions_per_ip_holds_fleet_wide_and_a_killed_instance_frees_its_slots() {
    let h = Harness::new();
    let up = demo(&h);
    let redis = Redis::start();
    let tables = format!(
        "[limits]\nmax_sessions_per_ip = 2\n{}",
        state_toml(&redis, "cap:")
    );
    let (mut a, b) = (
        instance(up.local_addr(), &tables),
        instance(up.local_addr(), &tables),
    );
    let from = "127.0.0.31";
    let (g1, _s1) = open(from, a.addr);
    let (g2, s2) = open(from, b.addr);
    assert!(
        g1.starts_with("+OK") && g2.starts_with("+OK"),
        "{g1} / {g2}"
    );
    // Each instance has one session of the address; the fleet has two: the third is refused
    // on either.
    for to in [a.addr, b.addr] {
        let (g, _) = open(from, to);
        assert!(g.contains("too many connections"), "third session: {g}");
    }
    // Another address is not affected.
    assert!(open("127.0.0.32", a.addr).0.starts_with("+OK"));
    // A session that ends frees its slot. The session let in is kept: one that quits frees
    // its slot a moment after its socket closes, so a probe that quits would race the next.
    drop(s2);
    let mut held_on_b = None;
    wait_until("the ended session's slot is free", || {
        let (g, c) = open(from, b.addr);
        if g.starts_with("+OK") {
            held_on_b = Some(c);
        }
        held_on_b.is_some()
    });
    let _held_on_b = held_on_b;
    // Now a and b hold one each. kill -9 a: its slot is not released by it, and expires.
    a.kill();
    let killed = Instant::now();
    let (g, _) = open(from, b.addr);
    assert!(
        g.contains("too many connections"),
        "a's slot still counts at first: {g}"
    );
    let freed = loop {
        let (g, mut c) = open(from, b.addr);
        if g.starts_with("+OK") {
            let _ = c.cmd("QUIT");
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "a's slot never expired"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("slot of the killed instance free after {freed:?} (slot_ttl 3s)");
    assert!(freed <= Duration::from_secs(5), "{freed:?}");
}

/// `GET path` on the metrics endpoint: status line's code and body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let out = curl(&[
        "-s",
        "-w",
        "\n%{http_code}",
        &format!("http://{addr}{path}"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// A full login and `RETR 1` through `to` from `from`.
fn fetch(from: &str, to: SocketAddr) -> Result<(), String> {
    let mut c = RawPop::over(connect_from(from.parse().unwrap(), to));
    let g = c.line();
    if !g.starts_with("+OK") {
        return Err(g);
    }
    c.cmd(&format!("USER {USER}"));
    let p = c.cmd(&format!("PASS {PASS}"));
    if !p.starts_with("+OK") {
        return Err(p);
    }
    let (r, _) = c.cmd_multi("RETR 1");
    let _ = c.cmd("QUIT");
    r.starts_with("+OK").then_some(()).ok_or(r)
}

#[test]
#[ignore = "needs redis-server and curl (run .ci/run)"]
fn redis_stopped_mid_test_logins_go_on_health_degrades_and_the_fleet_converges() {
    let h = Harness::new();
    let up = demo(&h);
    let mut redis = Redis::start();
    let metrics = |port: u16| format!("[metrics]\nbind = \"127.0.0.1:{port}\"\n");
    let (ma, mb) = (free_port(), free_port());
    let base = format!(
        "[limits]\nmax_sessions_per_ip = 5\nlogin_fail_delay = \"1s\"\n{}",
        state_toml(&redis, "down:")
    );
    let a = instance(up.local_addr(), &format!("{base}{}", metrics(ma)));
    let b = instance(up.local_addr(), &format!("{base}{}", metrics(mb)));
    let ha: SocketAddr = format!("127.0.0.1:{ma}").parse().unwrap();
    for p in [&a, &b] {
        fetch("127.0.0.41", p.addr).unwrap();
    }
    assert_eq!(http_get(ha, "/health").0, 200);

    redis.stop();
    // A session open across the outage is not cut, and new logins work (on_unavailable =
    // open: the instances' own limits).
    let mut held = RawPop::over(connect_from("127.0.0.42".parse().unwrap(), a.addr));
    assert!(held.line().starts_with("+OK"));
    for i in 0..6 {
        let to = if i % 2 == 0 { a.addr } else { b.addr };
        let t = Instant::now();
        fetch("127.0.0.41", to).unwrap_or_else(|e| panic!("login {i} with redis down: {e}"));
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }
    wait_until("/health degraded", || {
        let (code, body) = http_get(ha, "/health");
        code == 200 && body.contains("degraded")
    });
    let (_, text) = http_get(ha, "/metrics");
    assert!(text.contains("popgate_state_up 0"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("popgate_state_errors_total{") && !l.ends_with(" 0")),
        "no state errors counted"
    );
    assert!(a.log().contains("state store unreachable"), "no log line");

    // Redis returns (empty): health recovers and the held session's slot is written again by
    // the heartbeat, without a restart.
    redis.restart();
    wait_until("/health ok again", || {
        let (code, body) = http_get(ha, "/health");
        code == 200 && body.starts_with("ok")
    });
    wait_until("the held session's slot is in Redis again", || {
        redis.cli(&["ZCARD", "down:sessions:127.0.0.42"]).trim() == "1"
    });
    assert!(held.cmd(&format!("USER {USER}")).starts_with("+OK"));
    assert!(held.cmd(&format!("PASS {PASS}")).starts_with("+OK"));
    assert!(held.cmd("QUIT").starts_with("+OK"));
    fetch("127.0.0.41", b.addr).unwrap();
}

#[test]
#[ignore = "needs redis-server (run .ci/run)"]
fn with_on_unavailable_closed_new_sessions_wait_for_the_store_and_open_ones_go_on() {
    let h = Harness::new();
    let up = demo(&h);
    let mut redis = Redis::start();
    let port = free_port();
    let a = instance(
        up.local_addr(),
        &format!(
            "[limits]\nmax_sessions_per_ip = 5\n{}on_unavailable = \"closed\"\n\
             [metrics]\nbind = \"127.0.0.1:{port}\"\n",
            state_toml(&redis, "closed:")
        ),
    );
    let health: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (g, mut held) = open("127.0.0.51", a.addr);
    assert!(g.starts_with("+OK"), "{g}");
    redis.stop();
    let (g, _) = open("127.0.0.52", a.addr);
    assert!(
        g.starts_with("-ERR [SYS/TEMP]"),
        "closed: refused while the store is down: {g}"
    );
    assert_eq!(http_get(health, "/health").0, 503);
    // The session that was open goes on.
    assert!(held.cmd(&format!("USER {USER}")).starts_with("+OK"));
    assert!(held.cmd(&format!("PASS {PASS}")).starts_with("+OK"));
    assert!(held.cmd("QUIT").starts_with("+OK"));
    redis.restart();
    wait_until("sessions accepted again", || {
        open("127.0.0.52", a.addr).0.starts_with("+OK")
    });
}

/// `popgate check` on a config with `state`: success, and its stdout and stderr.
fn check(state: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("popgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[listener]]\nname = \"p\"\nbind = \"127.0.0.1:0\"\n\
             [upstream]\naddress = \"127.0.0.1:110\"\n{state}"
        ),
    )
    .unwrap();
    let out = common::clients::run_bounded(
        Command::new(common::proxy::popgate_bin())
            .args(["check", "--config"])
            .arg(&cfg),
        None,
        Duration::from_secs(20),
    );
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
#[ignore = "needs redis-server (run .ci/run)"]
fn check_verifies_the_store_and_fails_on_a_refusal_but_only_warns_when_it_is_down_and_open() {
    let redis = Redis::start_with(&["--requirepass", "s3cret-pw"]);
    let url = |pw: &str| format!("redis://:{pw}@127.0.0.1:{}/0", redis.port);
    let state =
        |url: &str, extra: &str| format!("[state]\nbackend = \"redis\"\nurl = \"{url}\"\n{extra}");
    let (ok, out) = check(&state(&url("s3cret-pw"), ""));
    assert!(
        ok && out.contains("answered a write, a read and a delete"),
        "{out}"
    );
    // A wrong password is a configuration mistake: an error, without the password.
    let (ok, out) = check(&state(&url("wrong-pw"), ""));
    assert!(!ok, "a refused password must fail check: {out}");
    assert!(
        out.contains("state: redis") && !out.contains("wrong-pw"),
        "{out}"
    );
    // Nobody listening: with `open` popgate runs on per-instance limits (a warning)...
    let down = format!("redis://127.0.0.1:{}/0", free_port());
    let (ok, out) = check(&state(&down, ""));
    assert!(ok && out.contains("warning: state: redis"), "{out}");
    // ... with `closed` it would refuse sessions: an error.
    let (ok, out) = check(&state(&down, "on_unavailable = \"closed\"\n"));
    assert!(!ok && out.contains("cannot be reached"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// The shared OAuth2 token cache

/// The local password of the bridge's user `alice`.
const LOCAL_PW: &str = "local-Pa55word";

/// `credentials.toml` (alice), `secret` and `tokens.toml` (alice = `refresh`) in a new dir.
fn bridge_files(refresh: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let hash = popgate::oauth2::hash_password(LOCAL_PW.as_bytes()).unwrap();
    std::fs::write(
        dir.path().join("credentials.toml"),
        format!("alice = {hash:?}\n"),
    )
    .unwrap();
    for (name, text) in [
        ("secret", format!("{}\n", CLIENT.1)),
        ("tokens.toml", format!("alice = {refresh:?}\n")),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    dir
}

/// A popgate instance behind HAProxy (PROXY v2 in) with the OAuth2 bridge to `dv`, its own
/// copy of the bridge files in `files`, and `state`.
fn bridge_instance(auth: &AuthServer, dv: &Dovecot, files: &Path, state: &str) -> PopgateProcess {
    bridge_process(
        auth,
        dv,
        files,
        state,
        "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1\"]\n",
    )
}

/// [`bridge_instance`] with `listener` keys.
fn bridge_process(
    auth: &AuthServer,
    dv: &Dovecot,
    files: &Path,
    state: &str,
    listener: &str,
) -> PopgateProcess {
    let f = |n: &str| -> PathBuf { files.join(n) };
    PopgateProcess::run(
        dv.addr(),
        PopgateOpts::new()
            .listener(listener)
            .tables(&format!(
                "[upstream.oauth2]\ntoken_url = \"{}\"\nclient_id = \"{}\"\n\
                 client_secret_file = {:?}\ntokens_file = {:?}\ncredentials_file = {:?}\n\
                 [limits]\nlogin_fail_delay = \"0s\"\n{state}",
                auth.url("/token"),
                CLIENT.0,
                f("secret"),
                f("tokens.toml"),
                f("credentials.toml"),
            ))
            .log_to_dir("info")
            .wait_for_log(),
    )
}

/// What 200 logins (`alice`, RETR 1) through HAProxy in front of two bridge instances did:
/// (fetches that worked, refreshes and invalid_grant answers at the token server, seconds).
fn logins_through_two_instances(state: impl Fn(&str) -> String) -> (usize, u64, u64, f64) {
    let auth = AuthServer::start(2);
    let dv = Dovecot::start(DovecotOpts::oauth2(&auth.introspection_url()).user(
        "alice",
        "unused",
        vec![msg_dots()],
    ));
    // Both instances start from the same refresh token, each with its own tokens_file (two
    // machines).
    let refresh = auth.mint("alice");
    let (fa, fb) = (bridge_files(&refresh), bridge_files(&refresh));
    let a = bridge_instance(&auth, &dv, fa.path(), &state("a"));
    let b = bridge_instance(&auth, &dv, fb.path(), &state("b"));
    let dir = tempfile::tempdir().unwrap();
    let front: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _hp = crate::scale_out::Haproxy::start(dir.path(), front, &[a.addr, b.addr]);
    let started = Instant::now();
    let mut ok = 0;
    for i in 0..200 {
        let mut c = RawPop::connect(front);
        c.cmd("USER alice");
        let p = c.cmd(&format!("PASS {LOCAL_PW}"));
        if p.starts_with("+OK") {
            let (r, body) = c.cmd_multi("RETR 1");
            if r.starts_with("+OK") && body.is_some_and(|b| !b.is_empty()) {
                ok += 1;
            }
        } else if i < 3 || i % 50 == 0 {
            eprintln!("login {i}: {p}");
        }
        let _ = c.cmd("QUIT");
    }
    let secs = started.elapsed().as_secs_f64();
    (
        ok,
        auth.counter("refresh_token"),
        auth.counter("invalid_grant"),
        secs,
    )
}

#[test]
#[ignore = "needs redis-server, dovecot, haproxy and python3-authlib (run .ci/run)"]
fn two_instances_share_oauth2_tokens_one_refresh_per_expiry_and_no_invalid_grant() {
    let redis = Redis::start();
    let (ok, refreshes, invalid, secs) =
        logins_through_two_instances(|_| state_toml(&redis, "tok:"));
    eprintln!(
        "redis: {ok}/200 fetched, {refreshes} refreshes, {invalid} invalid_grant in {secs:.1}s"
    );
    assert_eq!(ok, 200, "every login fetches mail");
    assert_eq!(invalid, 0, "no instance used a spent refresh token");
    // Tokens live 2 s and are renewed in their last second (refresh_ahead is capped at half
    // the lifetime): one refresh per expiry is at most one a second, and several expiries
    // passed.
    assert!(refreshes >= 2, "{refreshes} refreshes in {secs:.1}s");
    assert!(
        refreshes as f64 <= secs + 1.0,
        "{refreshes} refreshes in {secs:.1}s: more than one per expiry"
    );
    // The rotated refresh token is in the store.
    let source = redis.cli(&["--scan", "--pattern", "tok:oauth2:*alice"]);
    let source = source.lines().next().unwrap_or_default().to_owned();
    assert!(!source.is_empty(), "no token hash in Redis");
    assert!(!redis.cli(&["HGET", &source, "refresh"]).trim().is_empty());
}

#[test]
#[ignore = "needs dovecot, haproxy and python3-authlib (run .ci/run)"]
fn without_the_store_two_instances_spend_each_others_refresh_tokens() {
    let (ok, refreshes, invalid, secs) = logins_through_two_instances(|_| String::new());
    eprintln!(
        "local: {ok}/200 fetched, {refreshes} refreshes, {invalid} invalid_grant in {secs:.1}s"
    );
    // The failure the store exists for: one instance rotates the refresh token, the other's
    // copy is spent, and its logins fail from then on.
    assert!(invalid >= 1, "expected invalid_grant without the store");
    assert!(ok < 200, "expected failed logins without the store");
}

#[test]
#[ignore = "needs redis-server, dovecot and python3-authlib (run .ci/run)"]
fn a_cached_token_keeps_working_while_the_store_is_down_until_it_expires() {
    let mut redis = Redis::start();
    let auth = AuthServer::start(30);
    let dv = Dovecot::start(DovecotOpts::oauth2(&auth.introspection_url()).user(
        "alice",
        "unused",
        vec![msg_dots()],
    ));
    let files = bridge_files(&auth.mint("alice"));
    let p = bridge_process(&auth, &dv, files.path(), &state_toml(&redis, "cached:"), "");
    let login = || {
        let mut c = RawPop::connect(p.addr);
        c.cmd("USER alice");
        let reply = c.cmd(&format!("PASS {LOCAL_PW}"));
        let _ = c.cmd("QUIT");
        reply
    };
    assert!(login().starts_with("+OK"));
    assert_eq!(auth.counter("refresh_token"), 1);
    redis.stop();
    for _ in 0..3 {
        let reply = login();
        assert!(reply.starts_with("+OK"), "with the store down: {reply}");
    }
    assert_eq!(
        auth.counter("refresh_token"),
        1,
        "no refresh without the store"
    );
    assert_eq!(auth.counter("invalid_grant"), 0);
}
