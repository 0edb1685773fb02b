//! Reload and drain in the real binary: SIGHUP (and `popgate reload`) applies the whole config
//! or nothing, the log says what changed, open sessions keep what they started with; the PID
//! file; SIGTERM drains within `shutdown_grace`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::certs::TestPki;
use common::clients::{RawPop, served_cert_subject};
use common::proxy::{Harness, PopgateOpts, PopgateProcess, big_message, mailbox, popgate_bin};
use common::{audit_events, free_port, wait_until};
use popgate_demo::{DemoServer, ServerOptions};

fn upstream(h: &Harness, users: &[(&str, &str)]) -> DemoServer {
    h.upstream(ServerOptions::new(
        users
            .iter()
            .map(|(u, p)| mailbox(u, p, vec![b"Subject: x\r\n\r\nhello\r\n".to_vec()]))
            .collect(),
    ))
}

fn login(c: &mut RawPop, user: &str, pass: &str) -> String {
    assert!(c.cmd(&format!("USER {user}")).starts_with("+OK"));
    c.cmd(&format!("PASS {pass}"))
}

fn edit_config(p: &PopgateProcess, f: impl FnOnce(String) -> String) {
    let path = p.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, f(text)).unwrap();
}

/// The log from the `n`-th "reloaded:" or "reload failed" line on.
fn reload_line(p: &PopgateProcess, n: usize) -> String {
    let nth = || {
        p.log()
            .lines()
            .filter(|l| l.contains("reloaded:") || l.contains("reload failed"))
            .nth(n - 1)
            .map(str::to_owned)
    };
    wait_until(&format!("reload line {n}"), || nth().is_some());
    nth().unwrap()
}

fn refused(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err()
}

/// One SIGHUP changes upstream, a limit, the log level, audit settings and the listener set;
/// the log line names each; open sessions (one on the removed listener) finish on the old
/// upstream; new ones get the new config.
#[test]
fn sighup_applies_upstream_limits_log_audit_and_listeners() {
    let h = Harness::new();
    let a = upstream(&h, &[("alice", "a"), ("carol", "c")]);
    let b = upstream(&h, &[("bob", "b")]);
    let (old_port, new_port) = (free_port(), free_port());
    let p = PopgateProcess::run(
        a.local_addr(),
        PopgateOpts::new()
            .tables(&format!(
                "[[listener]]\nname = \"old\"\nbind = \"127.0.0.1:{old_port}\"\n\
                 [limits]\nmax_sessions = 10\n"
            ))
            .log_to_dir("info")
            .wait_for_log(),
    );
    let old_addr: SocketAddr = format!("127.0.0.1:{old_port}").parse().unwrap();
    let new_addr: SocketAddr = format!("127.0.0.1:{new_port}").parse().unwrap();
    let mut s1 = RawPop::connect(p.addr);
    assert!(login(&mut s1, "alice", "a").starts_with("+OK"));
    let mut s_old = RawPop::connect(old_addr);
    assert!(login(&mut s_old, "carol", "c").starts_with("+OK"));

    edit_config(&p, |t| {
        t.replace(&a.local_addr().to_string(), &b.local_addr().to_string())
            .replace(
                &format!("name = \"old\"\nbind = \"127.0.0.1:{old_port}\""),
                &format!("name = \"new\"\nbind = \"127.0.0.1:{new_port}\""),
            )
            .replace("max_sessions = 10", "max_sessions = 2")
            .replace("level = \"info\"", "level = \"debug\"")
            + "[audit]\nenabled = true\ndir = \"audit\"\n"
    });
    p.hup();
    let line = reload_line(&p, 1);
    for key in [
        "upstream.address",
        "limits.max_sessions",
        "log.level",
        "audit.enabled",
        "audit.dir",
        "listener +new -old",
    ] {
        assert!(line.contains(key), "{key} missing: {line}");
    }
    assert!(!line.contains("rules"), "{line}");

    // The removed listener no longer accepts; the added one does, under the new limit (two
    // sessions are still open).
    wait_until("old listener closed", || refused(old_addr));
    let full = RawPop::connect(new_addr);
    assert_eq!(full.greeting, "-ERR [SYS/TEMP] too many connections");
    // Open sessions carry on with the config they started with: upstream A.
    for s in [&mut s1, &mut s_old] {
        assert!(s.cmd("STAT").starts_with("+OK 1 "));
        assert!(s.cmd("QUIT").starts_with("+OK"));
    }
    wait_until("sessions ended", || {
        p.log().matches("session closed").count() >= 2
    });

    // New sessions: upstream B (bob exists only there), debug log, audited.
    for addr in [p.addr, new_addr] {
        let mut c = RawPop::connect(addr);
        assert!(login(&mut c, "bob", "b").starts_with("+OK"), "{addr}");
        assert!(c.cmd("QUIT").starts_with("+OK"));
    }
    let mut c = RawPop::connect(p.addr);
    assert!(login(&mut c, "alice", "a").starts_with("-ERR"), "A is gone");
    drop(c);
    let log = p.log();
    let after = &log[log.find("reloaded:").unwrap()..];
    assert!(after.contains("DEBUG"), "debug lines after the reload");
    assert!(
        !log[..log.find("reloaded:").unwrap()].contains("DEBUG"),
        "no debug lines before"
    );
    wait_until("audit events of the new sessions", || {
        audit_events(&p.path("audit"))
            .iter()
            .any(|e| e["event"] == "login" && e["user"] == "bob")
    });
}

/// A listener renamed on the same address keeps serving (its socket is reused); one moved to
/// another address is rebound (the old address refuses).
#[test]
fn sighup_rebinds_and_renames_listeners() {
    let h = Harness::new();
    let a = upstream(&h, &[("alice", "a")]);
    let p = PopgateProcess::run(a.local_addr(), PopgateOpts::new().wait_for_log());
    let first = p.addr;
    edit_config(&p, |t| t.replace("name = \"bin\"", "name = \"renamed\""));
    p.hup();
    let line = reload_line(&p, 1);
    assert!(line.contains("listener +renamed -bin"), "{line}");
    let mut c = RawPop::connect(first);
    assert!(login(&mut c, "alice", "a").starts_with("+OK"));
    assert!(c.cmd("QUIT").starts_with("+OK"));

    let moved: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    edit_config(&p, |t| t.replace(&first.to_string(), &moved.to_string()));
    p.hup();
    let line = reload_line(&p, 2);
    assert!(line.contains("listener ~renamed"), "{line}");
    wait_until("old address closed", || refused(first));
    let mut c = RawPop::connect(moved);
    assert!(login(&mut c, "alice", "a").starts_with("+OK"));
    assert!(c.cmd("QUIT").starts_with("+OK"));

    // Nothing changed: said so.
    p.hup();
    assert!(reload_line(&p, 3).contains("reloaded: nothing changed"));

    // A new listener whose address is taken refuses the whole reload: the upstream change
    // that came with it is not applied either.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    edit_config(&p, |t| {
        t.replace(&a.local_addr().to_string(), "127.0.0.1:1")
            + &format!("[[listener]]\nname = \"clash\"\nbind = \"{taken_addr}\"\n")
    });
    p.hup();
    let line = reload_line(&p, 4);
    assert!(
        line.contains("reload failed, nothing changed") && line.contains("cannot bind"),
        "{line}"
    );
    let mut c = RawPop::connect(moved);
    assert!(
        login(&mut c, "alice", "a").starts_with("+OK"),
        "old upstream"
    );
    assert!(c.cmd("QUIT").starts_with("+OK"));
}

/// A new certificate and a broken rule file: the reload is refused whole, one log line says
/// why; the old certificate is still served and the old rules still apply. Fixing the rule
/// file then brings both in.
#[test]
fn refused_reload_changes_nothing() {
    let h = Harness::new();
    let a = upstream(&h, &[("alice", "a")]);
    let pki = TestPki::new();
    let (c1, k1) = pki.issue(&["first.test", "localhost"]);
    let (c2, k2) = pki.issue(&["second.test", "localhost"]);
    let rule = |msg: &str| {
        format!(
            "[[rule]]\nname = \"no-noop\"\non = \"command\"\nverbs = \"NOOP\"\n\
             action = \"deny\"\nmessage = \"{msg}\"\n"
        )
    };
    let plain = free_port();
    let p = PopgateProcess::run(
        a.local_addr(),
        PopgateOpts::new()
            .top("rules = [\"policy.toml\"]\n")
            .listener("tls = \"implicit\"\n")
            .tables(&format!(
                "[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:{plain}\"\n\
                 [tls]\ncert = \"server.crt\"\nkey = \"server.key\"\n\
                 [limits]\nmax_sessions = 10\n"
            ))
            .file("server.crt", std::fs::read(&c1).unwrap())
            .file("server.key", std::fs::read(&k1).unwrap())
            .file("policy.toml", rule("v1"))
            .wait_for_log(),
    );
    let plain: SocketAddr = format!("127.0.0.1:{plain}").parse().unwrap();
    let ca = pki.ca_path().to_owned();
    assert!(served_cert_subject(p.addr, "localhost", &ca).contains("first.test"));

    std::fs::copy(&c2, p.path("server.crt")).unwrap();
    std::fs::copy(&k2, p.path("server.key")).unwrap();
    std::fs::write(
        p.path("policy.toml"),
        rule("v2").replace("verbs =", "verb ="),
    )
    .unwrap();
    edit_config(&p, |t| t.replace("max_sessions = 10", "max_sessions = 1"));
    p.hup();
    let line = reload_line(&p, 1);
    assert!(line.contains("reload failed, nothing changed"), "{line}");
    assert!(line.contains("policy.toml"), "names the file: {line}");
    assert!(
        served_cert_subject(p.addr, "localhost", &ca).contains("first.test"),
        "old certificate still served"
    );
    let mut s1 = RawPop::connect(plain);
    let mut s2 = RawPop::connect(plain);
    assert!(
        login(&mut s2, "alice", "a").starts_with("+OK"),
        "max_sessions unchanged"
    );
    assert_eq!(s2.cmd("NOOP"), "-ERR v1", "old rules still apply");
    assert!(s2.cmd("QUIT").starts_with("+OK"));
    drop(s1.cmd("QUIT"));

    std::fs::write(p.path("policy.toml"), rule("v2")).unwrap();
    p.hup();
    let line = reload_line(&p, 2);
    for key in ["certificates", "rules", "limits.max_sessions"] {
        assert!(line.contains(key), "{key}: {line}");
    }
    assert!(served_cert_subject(p.addr, "localhost", &ca).contains("second.test"));
    // max_sessions is 1 now: wait for the certificate probe's session to end.
    let mut s = RawPop::connect(plain);
    while !s.greeting.starts_with("+OK") {
        assert!(
            s.greeting.contains("too many connections"),
            "{}",
            s.greeting
        );
        std::thread::sleep(Duration::from_millis(50));
        s = RawPop::connect(plain);
    }
    assert!(login(&mut s, "alice", "a").starts_with("+OK"));
    assert_eq!(s.cmd("NOOP"), "-ERR v2");
}

/// `pid_file` is written after the bind and removed at exit; `popgate reload --config` and
/// `--pid-file` send SIGHUP to that process.
#[test]
fn pid_file_and_reload_command() {
    let h = Harness::new();
    let a = upstream(&h, &[("alice", "a")]);
    let mut p = PopgateProcess::run(
        a.local_addr(),
        PopgateOpts::new()
            .top("pid_file = \"run/popgate.pid\"\n")
            .log_to_dir("info")
            .wait_for_log(),
    );
    wait_until("pid file", || p.path("run/popgate.pid").exists());
    let pid = p.read("run/popgate.pid");
    assert_eq!(pid.trim(), p.child.id().to_string());

    // Log level and format change with the reload: the line saying so is already JSON.
    edit_config(&p, |t| {
        t.replace("level = \"info\"", "level = \"debug\"\nformat = \"json\"")
    });
    let out = std::process::Command::new(popgate_bin())
        .args(["reload", "--config"])
        .arg(p.config_path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = reload_line(&p, 1);
    assert!(
        line.contains("log.level") && line.contains("log.format"),
        "{line}"
    );
    let json: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(json["level"], "INFO");

    let out = std::process::Command::new(popgate_bin())
        .args(["reload", "--pid-file"])
        .arg(p.path("run/popgate.pid"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(reload_line(&p, 2).contains("nothing changed"));

    p.stop();
    assert!(
        !p.path("run/popgate.pid").exists(),
        "pid file removed at exit"
    );
    let out = std::process::Command::new(popgate_bin())
        .args(["reload", "--pid-file"])
        .arg(p.path("run/popgate.pid"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("popgate.pid"));
}

/// SIGTERM: new connections are refused at once; a session in the middle of a big RETR
/// finishes it and its QUIT; an idle session is closed when `shutdown_grace` is over, with no
/// QUIT sent upstream.
#[test]
fn sigterm_drains_within_the_grace_period() {
    let h = Harness::new();
    let up = h.upstream(ServerOptions::new(vec![
        mailbox("alice", "a", vec![big_message(8 * 1024 * 1024)]),
        mailbox("carol", "c", vec![b"Subject: x\r\n\r\nhi\r\n".to_vec()]),
    ]));
    let mut p = PopgateProcess::run(
        up.local_addr(),
        PopgateOpts::new()
            .top("shutdown_grace = \"3s\"\n")
            .log_to_dir("info")
            .wait_for_log(),
    );
    let mut idle = RawPop::connect(p.addr);
    assert!(login(&mut idle, "carol", "c").starts_with("+OK"));
    let mut busy = RawPop::connect(p.addr);
    assert!(login(&mut busy, "alice", "a").starts_with("+OK"));
    assert!(busy.cmd("RETR 1").starts_with("+OK"));
    // Read a little of the body and stop: the proxy is now blocked mid-response.
    for _ in 0..100 {
        assert!(!busy.line_raw().is_empty());
    }
    p.term();
    p.wait_log("shutting down", 1);
    assert!(
        refused(p.addr),
        "new connections are refused during the drain"
    );
    let body = busy.body();
    assert!(
        body.len() > 1024 * 1024,
        "the RETR finished ({} octets)",
        body.len()
    );
    assert!(busy.cmd("QUIT").starts_with("+OK"), "QUIT answered");
    assert!(busy.read_to_end().is_empty());
    assert_eq!(up.quit_count(), 1, "alice's QUIT reached the upstream");

    // The idle session is closed once the grace period is over, without QUIT upstream.
    let rest = idle.read_to_end();
    assert_eq!(rest, b"-ERR [SYS/TEMP] proxy shutting down\r\n");
    let status = p.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{status}");
    assert_eq!(up.quit_count(), 1, "no QUIT for the idle session");
    let log = p.log();
    assert!(log.contains("shutdown_grace over"), "{log}");
    wait_until("upstream released carol", || !up.is_locked("carol"));
}

/// Metrics live for the process: a reload keeps the counters, and `/health` follows the new
/// listener set (a removed listener is not waited for, an added one is reported up).
#[test]
fn metrics_and_health_follow_a_reload() {
    let h = Harness::new();
    let a = upstream(&h, &[("alice", "a")]);
    let (metrics_port, extra_port) = (free_port(), free_port());
    let p = PopgateProcess::run(
        a.local_addr(),
        PopgateOpts::new()
            .tables(&format!(
                "[[listener]]\nname = \"extra\"\nbind = \"127.0.0.1:{extra_port}\"\n\
                 [metrics]\nbind = \"127.0.0.1:{metrics_port}\"\n"
            ))
            .log_to_dir("info")
            .wait_for_log(),
    );
    let scrape = |path: &str| {
        let out = common::clients::curl(&["-i", &format!("http://127.0.0.1:{metrics_port}{path}")]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut c = RawPop::connect(p.addr);
    assert!(login(&mut c, "alice", "a").starts_with("+OK"));
    assert!(c.cmd("QUIT").starts_with("+OK"));
    wait_until("session counted", || {
        scrape("/metrics").contains("popgate_sessions_total{listener=\"bin\"} 1")
    });

    // Drop "extra", add "fresh".
    let fresh_port = free_port();
    edit_config(&p, |t| {
        t.replace(
            &format!("name = \"extra\"\nbind = \"127.0.0.1:{extra_port}\""),
            &format!("name = \"fresh\"\nbind = \"127.0.0.1:{fresh_port}\""),
        )
    });
    p.hup();
    let line = reload_line(&p, 1);
    assert!(line.contains("listener +fresh -extra"), "{line}");
    let metrics = scrape("/metrics");
    assert!(
        metrics.contains("popgate_sessions_total{listener=\"bin\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("popgate_listener_up{listener=\"fresh\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("popgate_listener_up{listener=\"extra\"} 0"),
        "{metrics}"
    );
    let health = scrape("/health");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("2 listener(s) up"), "{health}");
}

/// The shipped unit's `ExecReload=popgate reload --pid $MAINPID`, with systemd's
/// `RuntimeDirectory=` as `$RUNTIME_DIRECTORY` for the service and the reload command alike
/// (no pid file): a broken config makes the command fail with the reason, so `systemctl
/// reload` fails; a good one succeeds and prints what changed.
#[test]
fn reload_by_pid_waits_for_the_outcome_in_the_runtime_directory() {
    let h = Harness::new();
    let a = upstream(&h, &[("alice", "a")]);
    let rt = tempfile::tempdir().unwrap();
    let rt_dir = rt.path().display().to_string();
    let p = PopgateProcess::run(
        a.local_addr(),
        PopgateOpts::new()
            .env("RUNTIME_DIRECTORY", &rt_dir)
            .log_to_dir("info")
            .wait_for_log(),
    );
    wait_until("status file", || rt.path().join("popgate.reload").exists());
    let pid = p.child.id().to_string();
    let reload = || {
        let out = std::process::Command::new(popgate_bin())
            .args(["reload", "--timeout", "20", "--pid", &pid])
            .env("RUNTIME_DIRECTORY", &rt_dir)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    edit_config(&p, |t| t.replace("rotation", "rotashun"));
    let (ok, out) = reload();
    assert!(!ok, "{out}");
    assert!(
        out.contains("reload failed, nothing changed") && out.contains("rotashun"),
        "{out}"
    );
    edit_config(&p, |t| {
        t.replace("rotashun", "rotation") + "[limits]\nmax_sessions = 9\n"
    });
    let (ok, out) = reload();
    assert!(ok, "{out}");
    assert!(out.contains("reloaded: limits.max_sessions"), "{out}");
    // Twice in a row: each call gets its own outcome.
    let (ok, out) = reload();
    assert!(ok && out.contains("reloaded: nothing changed"), "{out}");
}

/// A SIGHUP, SIGUSR1 or SIGTERM sent the moment the listener answers is handled (reload,
/// reopen, drain with exit 0), never the signal's default action: popgate catches every signal
/// it handles before it binds. Repeated, since the window it closes was short.
#[test]
fn signals_sent_as_soon_as_the_port_answers_are_handled() {
    let h = Harness::new();
    let up = h.upstream(ServerOptions::new(vec![mailbox("u", "p", vec![])]));
    for _ in 0..5 {
        for sig in ["-HUP", "-USR1"] {
            let mut p = PopgateProcess::run(up.local_addr(), PopgateOpts::new());
            p.signal(sig);
            std::thread::sleep(Duration::from_millis(200));
            p.assert_running();
            p.stop();
        }
        let mut p = PopgateProcess::run(up.local_addr(), PopgateOpts::new());
        p.stop();
    }
}
