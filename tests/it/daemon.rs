//! Daemon conventions, against the real binary: SIGUSR1 reopens moved log, audit and
//! transcript files; `[process] user` drops root after binding a privileged port; systemd's
//! READY/RELOADING/STOPPING (and WATCHDOG when asked) arrive on a test `NOTIFY_SOCKET`;
//! `[log] output` reaches stderr without colours, syslog on a test socket, JSON with
//! structured fields; journald falls back to stderr with a clear error when absent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::clients::{RawPop, run_bounded, tail};
use common::proxy::{Harness, PopgateOpts, PopgateProcess, mailbox, popgate_bin};
use common::{audit_events, wait_until};
use popgate_demo::{DemoServer, ServerOptions};

/// alice and bob (password `pass`), one message each.
fn upstream(h: &Harness) -> DemoServer {
    let msg = || vec![b"Subject: one\r\n\r\nbody one\r\n".to_vec()];
    h.upstream(ServerOptions::new(vec![
        mailbox("alice", "pass", msg()),
        mailbox("bob", "pass", msg()),
    ]))
}

fn login(c: &mut RawPop, user: &str) {
    assert!(c.cmd(&format!("USER {user}")).starts_with("+OK"));
    assert!(c.cmd("PASS pass").starts_with("+OK"));
}

/// One whole session of alice: login, STAT, QUIT.
fn session(addr: SocketAddr) {
    let mut c = RawPop::connect(addr);
    login(&mut c, "alice");
    assert!(c.cmd("STAT").starts_with("+OK 1 "));
    assert!(c.cmd("QUIT").starts_with("+OK"));
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn read(p: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
}

/// logrotate with `postrotate kill -USR1`: the files are moved away, popgate lets go of them
/// and starts fresh ones at the configured paths, the moved ones keep the old lines, the
/// process lives on and an open session's transcript continues in a fresh file.
#[test]
fn usr1_reopens_moved_log_audit_and_transcript_files() {
    let h = Harness::new();
    let up = upstream(&h);
    let mut bin = PopgateProcess::run(
        up.local_addr(),
        PopgateOpts::new()
            .log_to_dir("info")
            .tables(
                "[audit]\nenabled = true\ndir = \"audit\"\n\
                 [audit.transcript]\ndir = \"tr\"\nlisteners = [\"bin\"]\n",
            )
            .wait_for_log(),
    );
    let (log_dir, audit_dir, tr_dir) = (bin.path("log"), bin.path("audit"), bin.path("tr"));
    // A session (bob's) that stays open across the rotation.
    let mut open = RawPop::connect(bin.addr);
    login(&mut open, "bob");
    assert!(open.cmd("STAT").starts_with("+OK"));
    session(bin.addr);
    bin.wait_log("session closed", 1);
    wait_until("audit of the first session", || {
        audit_events(&audit_dir)
            .iter()
            .any(|e| e["event"] == "session_close")
    });

    let log_file = log_dir.join("popgate.log");
    let [audit_file] = files_in(&audit_dir).try_into().unwrap();
    let transcripts = files_in(&tr_dir);
    assert_eq!(transcripts.len(), 2, "{transcripts:?}");
    let moved = |p: &Path| p.with_file_name(format!("{}.1", p.file_name().unwrap().display()));
    for f in [&log_file, &audit_file]
        .into_iter()
        .chain(transcripts.iter())
    {
        std::fs::rename(f, moved(f)).unwrap();
    }
    bin.signal("-USR1");
    wait_until("the fresh log file", || {
        read(&log_file).contains("SIGUSR1: log, audit and transcript files reopened")
    });

    // The open session goes on, a new one starts: both land in fresh files.
    assert!(open.cmd("LIST").starts_with("+OK"));
    let _ = open.body();
    assert!(open.cmd("QUIT").starts_with("+OK"));
    session(bin.addr);
    wait_until("two more closed sessions in the fresh log", || {
        read(&log_file).matches("session closed").count() == 2
    });
    bin.assert_running();

    let old_log = read(&moved(&log_file));
    assert!(
        old_log.contains("listening") && old_log.matches("session closed").count() == 1,
        "{}",
        tail(&old_log, 3000)
    );
    assert!(!old_log.contains("reopened"), "{}", tail(&old_log, 2000));
    wait_until("fresh audit file", || audit_file.exists());
    wait_until("both closes in the fresh audit file", || {
        read(&audit_file).matches("\"session_close\"").count() == 2
    });
    assert_eq!(
        read(&moved(&audit_file))
            .matches("\"session_close\"")
            .count(),
        1
    );
    // The open session's transcript: STAT before the move, LIST after it in a fresh file at
    // the same path.
    let open_tr = transcripts
        .iter()
        .find(|t| read(&moved(t)).contains("C: STAT") && !read(&moved(t)).contains("QUIT"))
        .unwrap_or_else(|| panic!("no transcript of the open session: {transcripts:?}"));
    wait_until("transcript continued", || read(open_tr).contains("C: QUIT"));
    let fresh = read(open_tr);
    assert!(
        fresh.contains("C: LIST") && !fresh.contains("C: STAT"),
        "{fresh}"
    );
    assert!(!read(&moved(open_tr)).contains("C: LIST"));
    bin.stop();
}

/// Ids of every thread of `pid`: the `Uid:` and `Gid:` lines (real, effective, saved, fs)
/// and `Groups:` (supplementary groups).
fn thread_ids(pid: u32) -> Vec<(String, String, String)> {
    files_in(Path::new(&format!("/proc/{pid}/task")))
        .iter()
        .map(|t| {
            let status = read(&t.join("status"));
            let line = |k: &str| {
                status
                    .lines()
                    .find(|l| l.starts_with(k))
                    .unwrap()
                    .split_whitespace()
                    .skip(1)
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            (line("Uid:"), line("Gid:"), line("Groups:"))
        })
        .collect()
}

/// A free port below 1024 on 127.0.0.1 (only root can bind it).
fn privileged_port() -> u16 {
    let start = 600 + (std::process::id() % 300) as u16;
    (start..1024)
        .chain(600..start)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below 1024")
}

/// `[process] user = "nobody"`: the privileged port is bound as root, then every thread runs
/// as nobody/nogroup for good; sessions work. The log and audit directories popgate created
/// as root, and the files it opened, belong to nobody, so SIGUSR1 after a move starts fresh
/// files as nobody.
#[test]
fn privilege_drop_after_binding_a_privileged_port() {
    if !is_root() {
        println!("skipped: privilege drop needs root (CI runs as root)");
        return;
    }
    let nobody = nix_ids("nobody");
    let h = Harness::new();
    let up = upstream(&h);
    // A directory of nobody's, reachable through a searchable parent; the log and audit
    // directories below it do not exist yet.
    let outer = tempfile::tempdir().unwrap();
    std::fs::set_permissions(outer.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = outer.path().join("home");
    std::fs::create_dir(&home).unwrap();
    chown(&home, nobody);
    let (log_dir, audit_dir) = (home.join("log"), home.join("audit/sub"));
    let port = privileged_port();
    let mut bin = PopgateProcess::run(
        up.local_addr(),
        PopgateOpts::new()
            .top("[process]\nuser = \"nobody\"\n")
            .tables(&format!(
                "[[listener]]\nname = \"low\"\nbind = \"127.0.0.1:{port}\"\n\
                 [log]\ndir = {log_dir:?}\nrotation = \"never\"\n\
                 [audit]\nenabled = true\ndir = {audit_dir:?}\n"
            )),
    );
    let log_file = log_dir.join("popgate.log");
    wait_until("the switch is logged", || {
        read(&log_file).contains("switched to process.user/group")
    });
    let pid = bin.child.id();
    // Supplementary groups: only the target group.
    let want = (
        format!("{0} {0} {0} {0}", nobody.0),
        format!("{0} {0} {0} {0}", nobody.1),
        nobody.1.to_string(),
    );
    let threads = thread_ids(pid);
    assert!(threads.len() > 1, "{threads:?}");
    for ids in &threads {
        assert_eq!(ids, &want, "every thread: {threads:?}");
    }

    session(format!("127.0.0.1:{port}").parse().unwrap());
    let closed = |dir: &Path| {
        audit_events(dir)
            .iter()
            .filter(|e| e["event"] == "session_close")
            .count()
    };
    wait_until("audit of the session", || closed(&audit_dir) >= 2);
    let owner = |p: &Path| std::fs::metadata(p).unwrap().uid();
    for p in [&log_dir, &log_file, &home.join("audit"), &audit_dir] {
        assert_eq!(owner(p), nobody.0, "{p:?}");
    }
    // Rotation as nobody: move both files away, SIGUSR1, fresh files of nobody's.
    let [audit_file] = files_in(&audit_dir).try_into().unwrap();
    std::fs::rename(&log_file, log_dir.join("old")).unwrap();
    std::fs::rename(&audit_file, home.join("audit-old")).unwrap();
    bin.signal("-USR1");
    wait_until("fresh log file", || read(&log_file).contains("reopened"));
    session(bin.addr);
    wait_until("fresh audit file", || closed(&audit_dir) == 1);
    for p in [&log_file, &audit_file] {
        assert_eq!(owner(p), nobody.0, "{p:?}");
    }
    bin.assert_running();
    bin.stop();
}

/// uid and gid of `user`, from `id`.
fn nix_ids(user: &str) -> (u32, u32) {
    let id = |flag: &str| {
        let out = Command::new("id").args([flag, user]).output().unwrap();
        assert!(out.status.success(), "id {flag} {user}");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    (id("-u"), id("-g"))
}

fn chown(p: &Path, (uid, gid): (u32, u32)) {
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
}

fn write_config(dir: &Path, upstream: SocketAddr, port: u16, extra: &str) -> PathBuf {
    let cfg = dir.join("popgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "{extra}[[listener]]\nname = \"bin\"\nbind = \"127.0.0.1:{port}\"\n\
             [upstream]\naddress = \"{upstream}\"\n"
        ),
    )
    .unwrap();
    cfg
}

fn check(cfg: &Path) -> std::process::Output {
    run_bounded(
        Command::new(popgate_bin())
            .args(["check", "--config"])
            .arg(cfg),
        None,
        Duration::from_secs(20),
    )
}

/// `check` and `run` refuse a user that does not exist, and directories the user could not
/// write in after the switch (rotation, SIGUSR1 and transcripts create files there).
#[test]
fn check_and_run_refuse_what_the_dropped_user_could_not_do() {
    let dir = tempfile::tempdir().unwrap();
    let e = check(&write_config(
        dir.path(),
        "127.0.0.1:110".parse().unwrap(),
        1110,
        "[process]\nuser = \"no-such-user-popgate\"\n",
    ));
    assert!(!e.status.success());
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(
        err.contains("process.user") && err.contains("no-such-user-popgate"),
        "{err}"
    );
    if !is_root() {
        println!("skipped the directory part: it needs root to create a root-owned directory");
        return;
    }
    let audit = dir.path().join("audit");
    std::fs::create_dir(&audit).unwrap();
    std::fs::set_permissions(&audit, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = write_config(
        dir.path(),
        "127.0.0.1:110".parse().unwrap(),
        common::free_port(),
        &format!("[process]\nuser = \"nobody\"\n[audit]\nenabled = true\ndir = {audit:?}\n"),
    );
    for args in [["check", "--config"], ["run", "--config"]] {
        let out = run_bounded(
            Command::new(popgate_bin()).args(args).arg(&cfg),
            None,
            Duration::from_secs(20),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(
            err.contains("audit.dir") && err.contains("not writable for nobody"),
            "{args:?}: {err}"
        );
    }
    chown(&audit, nix_ids("nobody"));
    let out = check(&cfg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A pid file in a root-owned directory (as `/run` itself): nobody could not rewrite the
    // reload status beside it nor remove either at exit.
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("pid_file = {:?}\n{text}", run.join("popgate.pid")),
    )
    .unwrap();
    let out = check(&cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("pid_file") && err.contains("not writable for nobody"),
        "{err}"
    );
}

/// A `NOTIFY_SOCKET` of our own, as systemd gives a `Type=notify` service.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        NotifySocket {
            sock,
            path,
            _dir: dir,
        }
    }

    fn recv(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self
            .sock
            .recv(&mut buf)
            .expect("a notification within 10 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

/// READY=1 once the listener accepts (a connect right after it succeeds at once),
/// RELOADING=1 with MONOTONIC_USEC then READY=1 around SIGHUP, STOPPING=1 at SIGTERM.
#[test]
fn sd_notify_ready_reloading_stopping() {
    let h = Harness::new();
    let up = upstream(&h);
    let notify = NotifySocket::new();
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let cfg = write_config(dir.path(), up.local_addr(), port, "");
    let mut child = Command::new(popgate_bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify.path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let guard = KillOnDrop(&mut child);
    let ready = notify.recv();
    assert_eq!(ready.trim(), "READY=1");
    session(format!("127.0.0.1:{port}").parse().unwrap());

    kill(guard.0.id(), "-HUP");
    let reloading = notify.recv();
    let lines: Vec<&str> = reloading.lines().collect();
    assert_eq!(lines[0], "RELOADING=1", "{reloading}");
    let usec: u64 = lines[1]
        .strip_prefix("MONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("{reloading}"))
        .parse()
        .unwrap();
    assert!(usec > 0);
    let reloaded = notify.recv();
    assert!(
        reloaded.starts_with("READY=1\nSTATUS=reloaded"),
        "{reloaded}"
    );

    kill(guard.0.id(), "-TERM");
    assert_eq!(notify.recv().trim(), "STOPPING=1");
    let deadline = Instant::now() + Duration::from_secs(15);
    while guard.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 19.5: with `WatchdogSec=` systemd sets `WATCHDOG_USEC` (and `WATCHDOG_PID`); popgate
/// then sends `WATCHDOG=1` every half of it, from READY=1 until it exits. When the variables
/// are meant for another process (`WATCHDOG_PID` differs) it sends none.
#[test]
fn sd_notify_watchdog_pings_when_systemd_asks_for_them() {
    let h = Harness::new();
    let up = upstream(&h);
    let run = |pid: Option<&str>| {
        let notify = NotifySocket::new();
        let dir = tempfile::tempdir().unwrap();
        let port = common::free_port();
        let cfg = write_config(dir.path(), up.local_addr(), port, "");
        let mut cmd = Command::new(popgate_bin());
        cmd.args(["run", "--config"])
            .arg(&cfg)
            .env("NOTIFY_SOCKET", &notify.path)
            .env("WATCHDOG_USEC", "200000")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap());
        if let Some(pid) = pid {
            cmd.env("WATCHDOG_PID", pid);
        }
        let guard = Killed(cmd.spawn().unwrap());
        assert_eq!(notify.recv().trim(), "READY=1");
        (notify, guard, dir, port)
    };
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    // Asked: pings keep coming (every 100 ms), while sessions are served.
    let (notify, guard, _dir, port) = run(None);
    for _ in 0..5 {
        assert_eq!(notify.recv().trim(), "WATCHDOG=1");
    }
    session(format!("127.0.0.1:{port}").parse().unwrap());
    assert_eq!(notify.recv().trim(), "WATCHDOG=1");
    drop(guard);

    // Meant for another process: nothing but READY=1 and, at the end, STOPPING=1, although
    // a ping would be due every 100 ms over the half second watched.
    let (notify, guard, _dir, port) = run(Some("1"));
    session(format!("127.0.0.1:{port}").parse().unwrap());
    std::thread::sleep(Duration::from_millis(500));
    kill(guard.0.id(), "-TERM");
    assert_eq!(notify.recv().trim(), "STOPPING=1");
}

struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kill(pid: u32, sig: &str) {
    assert!(
        Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

/// stderr is a file here, not a terminal: no colour codes.
#[test]
fn no_colours_when_stderr_is_not_a_terminal() {
    let h = Harness::new();
    let up = upstream(&h);
    let bin = PopgateProcess::run(up.local_addr(), PopgateOpts::new().wait_for_log());
    session(bin.addr);
    let log = bin.wait_log("session closed", 1);
    assert!(!log.contains('\x1b'), "{}", tail(&log, 2000));
}

/// JSON logs: `tags` is an array, a `log` rule's line names the rule, and a SIGHUP that
/// switches the format back to text takes effect.
#[test]
fn json_logs_have_structured_fields_and_the_format_follows_a_reload() {
    let h = Harness::new();
    let up = upstream(&h);
    let rules = r#"
[[rule]]
name = "log-stat"
on = "command"
verbs = "STAT"
action = "log"
message = "daemon-test: {user} asked for STAT"

[[rule]]
name = "tag-stat"
on = "command"
verbs = "STAT"
action = "tag"
tags = ["counted", "stat"]
scope = "session"
"#;
    let bin = PopgateProcess::run(
        up.local_addr(),
        PopgateOpts::new()
            .top("rules = [\"policy.toml\"]\n")
            .file("policy.toml", rules)
            .tables("[log]\nformat = \"json\"\n")
            .wait_for_log(),
    );
    session(bin.addr);
    let log = bin.wait_log("session closed", 1);
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let closed = lines
        .iter()
        .find(|l| l["fields"]["message"] == "session closed")
        .unwrap();
    assert_eq!(
        closed["fields"]["tags"],
        serde_json::json!(["counted", "stat"])
    );
    let ruled = lines
        .iter()
        .find(|l| l["fields"]["message"] == "daemon-test: alice asked for STAT")
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(ruled["fields"]["rule"], "log-stat");
    assert_eq!(ruled["target"], "popgate::rules");

    // Back to text by SIGHUP.
    let cfg = bin.path("popgate.toml");
    let text = read(&cfg).replace("format = \"json\"", "format = \"text\"");
    std::fs::write(&cfg, text).unwrap();
    bin.hup();
    session(bin.addr);
    let log = bin.wait_log("session closed", 2);
    let last = log.lines().rfind(|l| l.contains("session closed")).unwrap();
    assert!(
        serde_json::from_str::<serde_json::Value>(last).is_err()
            && last.contains(r#"tags=["counted","stat"]"#),
        "{last}"
    );
}

/// `output = "syslog"` to a Unix datagram socket of our own: RFC 3164 lines with facility
/// daemon, the level as severity, tagged `popgate[pid]`, without a second time stamp.
#[test]
fn syslog_output_reaches_a_syslog_socket() {
    let h = Harness::new();
    let up = upstream(&h);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let bin = PopgateProcess::run(
        up.local_addr(),
        PopgateOpts::new().tables(&format!(
            "[log]\noutput = \"syslog\"\nsyslog_address = {path:?}\n"
        )),
    );
    session(bin.addr);
    let tag = format!("popgate[{}]:", bin.child.id());
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !got.iter().any(|l: &String| l.contains("session closed")) {
        assert!(Instant::now() < deadline, "{got:#?}");
        let mut buf = [0u8; 8192];
        let n = sock.recv(&mut buf).expect("a syslog datagram");
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let listening = got.iter().find(|l| l.contains("listening")).unwrap();
    // <30> = facility daemon (3) * 8 + severity info (6).
    assert!(
        listening.starts_with("<30>") && listening.contains(&tag),
        "{listening}"
    );
    let after_tag = listening.split(&tag).nth(1).unwrap();
    assert!(
        after_tag.trim_start().starts_with("INFO"),
        "no second time stamp: {listening}"
    );
    assert!(!bin.stderr().contains("listening"), "{}", bin.stderr());
}

/// `output = "journald"`: `check` accepts it; where there is no journald, `run` says so
/// clearly and logs to stderr instead.
#[test]
fn journald_output_is_accepted_and_falls_back_when_absent() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "127.0.0.1:110".parse().unwrap(),
        1110,
        "[log]\noutput = \"journald\"\n",
    );
    let out = check(&cfg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if Path::new("/run/systemd/journal/socket").exists() {
        println!("skipped the fallback part: journald is running here");
        return;
    }
    let h = Harness::new();
    let up = upstream(&h);
    let bin = PopgateProcess::run(
        up.local_addr(),
        PopgateOpts::new()
            .tables("[log]\noutput = \"journald\"\n")
            .wait_for_log(),
    );
    let log = bin.stderr();
    assert!(
        log.contains("journald is not reachable") && log.contains("logging to stderr instead"),
        "{log}"
    );
    session(bin.addr);
    bin.wait_log("session closed", 1);
}

/// The `[process]` example in docs/operations.md's "Reload and running as a daemon" is a valid
/// config table, and the signals table names every signal popgate handles.
#[test]
fn operations_daemon_section_is_valid() {
    let doc = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"));
    let section = doc
        .split("## Reload and running as a daemon")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("docs/operations.md has a Reload and running as a daemon section");
    for sig in ["`SIGHUP`", "`SIGUSR1`", "`SIGTERM`", "`SIGINT`"] {
        assert!(section.contains(sig), "{sig} missing");
    }
    let block = section
        .split("```toml")
        .filter_map(|b| b.split("```").next())
        .find(|b| b.contains("[process]"))
        .expect("a [process] example");
    let text = format!(
        "{block}[[listener]]\nname = \"p\"\nbind = \"127.0.0.1:110\"\n\
         [upstream]\naddress = \"127.0.0.1:1110\"\n"
    );
    let config = popgate::Config::parse(&text, Path::new("docs/operations.md")).unwrap();
    config.validate(Path::new("docs/operations.md")).unwrap();
    assert_eq!(config.process.user.as_deref(), Some("popgate"));
}

/// `popgate reload` (and `check`) with `args`; the output.
fn popgate_cmd(args: &[&str], cfg: &Path) -> (bool, String) {
    let out = run_bounded(
        Command::new(popgate_bin()).args(args).arg(cfg),
        None,
        Duration::from_secs(90),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A mail admin's set-up: popgate started as root with `[process] user = "nobody"`, a
/// `pid_file` and a `log.dir` in directories that do not exist yet under root-owned parents
/// (`/run`, `/var/log` alike), and a TLS key that only root can read. `check` warns about the
/// key; the start creates the directories and hands them to nobody; `popgate reload` fails
/// with the key named as unreadable (not as "does not go with the certificate") and exits
/// non-zero, succeeds once the key is readable for the group, reports a `[metrics]` table as
/// needing a restart (not as reloaded), explains why a new listener on a port below 1024
/// cannot be bound; at exit the pid and status files are gone.
#[test]
fn reload_under_privilege_drop_with_pid_file_is_trustworthy() {
    if !is_root() {
        println!("skipped: privilege drop needs root (CI runs as root)");
        return;
    }
    let nobody = nix_ids("nobody");
    let h = Harness::new();
    let up = upstream(&h);
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let etc = root.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    let pki = common::certs::TestPki::new();
    let (cert, key) = pki.issue(&["localhost"]);
    let (cert_to, key_to) = (etc.join("pop.crt"), etc.join("pop.key"));
    std::fs::copy(cert, &cert_to).unwrap();
    std::fs::copy(key, &key_to).unwrap();
    std::fs::set_permissions(&key_to, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&cert_to, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (run_dir, log_dir) = (
        root.path().join("run/popgate"),
        root.path().join("log/popgate"),
    );
    std::fs::create_dir(root.path().join("run")).unwrap();
    std::fs::create_dir(root.path().join("log")).unwrap();
    let pid_file = run_dir.join("popgate.pid");
    let port = common::free_port();
    let cfg = etc.join("popgate.toml");
    let text = format!(
        "pid_file = {pid_file:?}\nshutdown_grace = \"1s\"\n\
         [[listener]]\nname = \"pop3\"\nbind = \"127.0.0.1:{port}\"\ntls = \"starttls\"\n\
         [upstream]\naddress = \"{}\"\n\
         [tls]\ncert = {cert_to:?}\nkey = {key_to:?}\n\
         [process]\nuser = \"nobody\"\n\
         [log]\ndir = {log_dir:?}\nrotation = \"never\"\n",
        up.local_addr()
    );
    std::fs::write(&cfg, &text).unwrap();

    let (ok, out) = popgate_cmd(&["check", "--config"], &cfg);
    assert!(ok, "{out}");
    assert!(
        out.contains("warning: tls.key") && out.contains("not readable for nobody"),
        "{out}"
    );

    let mut child = Command::new(popgate_bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(root.path().join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let log_file = log_dir.join("popgate.log");
    wait_until("started and switched", || {
        child.try_wait().unwrap().is_none()
            && read(&log_file).contains("switched to process.user/group")
            && pid_file.exists()
    });
    for d in [&run_dir, &log_dir] {
        assert_eq!(std::fs::metadata(d).unwrap().uid(), nobody.0, "{d:?}");
    }
    session(format!("127.0.0.1:{port}").parse().unwrap());

    // The key is readable for root only: the reload, run as nobody, fails and says why.
    let (ok, out) = popgate_cmd(&["reload", "--pid-file"], &pid_file);
    assert!(!ok, "{out}");
    assert!(
        out.contains("reload failed")
            && out.contains("tls.key")
            && out.contains("cannot read it")
            && out.contains("Permission denied")
            && !out.contains("does not go with"),
        "{out}"
    );
    // Readable for the group: the same reload works, also through the config's pid_file.
    std::os::unix::fs::chown(&key_to, None, Some(nobody.1)).unwrap();
    std::fs::set_permissions(&key_to, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (ok, out) = popgate_cmd(&["reload", "--config"], &cfg);
    assert!(ok, "{out}");
    assert!(out.contains("reloaded: nothing changed"), "{out}");
    // A key a reload cannot apply: reported as such, the rest applied.
    std::fs::write(
        &cfg,
        format!(
            "{}[limits]\nmax_sessions = 77\n[metrics]\nbind = \"127.0.0.1:0\"\n",
            text.replace(
                "user = \"nobody\"",
                "user = \"nobody\"\ngroup = \"nogroup\""
            )
        ),
    )
    .unwrap();
    let (ok, out) = popgate_cmd(&["reload", "--config"], &cfg);
    assert!(ok, "{out}");
    assert!(
        out.contains("reloaded: limits.max_sessions; need a restart: metrics, process.group"),
        "{out}"
    );
    let (ok, out) = popgate_cmd(&["reload", "--config"], &cfg);
    assert!(ok, "{out}");
    assert!(
        out.contains("reloaded: nothing changed; need a restart: metrics, process.group"),
        "still not applied: {out}"
    );
    // A new listener on a port below 1024: the user cannot bind it; the reason says so.
    let low = privileged_port();
    let before = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        before.replace(
            "[upstream]",
            &format!("[[listener]]\nname = \"low\"\nbind = \"127.0.0.1:{low}\"\n[upstream]"),
        ),
    )
    .unwrap();
    let (ok, out) = popgate_cmd(&["reload", "--config"], &cfg);
    assert!(!ok, "{out}");
    assert!(
        out.contains("listener low") && out.contains("only a restart can bind"),
        "{out}"
    );
    std::fs::write(&cfg, before).unwrap();
    session(format!("127.0.0.1:{port}").parse().unwrap());

    kill(child.id(), "-TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "popgate did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{}", read(&root.path().join("stderr")));
    assert!(
        files_in(&run_dir).is_empty(),
        "pid and status files removed at exit: {:?}",
        files_in(&run_dir)
    );
}

/// A restart that refuses no client: popgate runs on a listening socket held by a stand-in
/// for systemd's `popgate.socket` (tests/clients/socket_holder.py passes it as fd 3 with
/// `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`, as systemd does). Four curl clients retrieve a
/// message from Dovecot in a loop while popgate is restarted as `systemctl restart` does
/// (SIGTERM, drain, exit, then a new process) and then replaced with an overlap (a new process
/// first, then SIGTERM to the old one): no curl fails (no refused connection, no error), every
/// message arrives whole, nothing is deleted.
#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn restart_on_a_held_socket_refuses_no_client_and_loses_no_mail() {
    use common::clients::{curl, url};
    use common::dovecot::{Dovecot, DovecotOpts, bob_msgs, served};
    use std::io::{BufRead as _, BufReader, Write as _};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let dv = Dovecot::start(DovecotOpts::default().user("bob", "bob-pass", bob_msgs()));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("popgate.toml");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/socket_holder.py");
    let mut holder = Command::new("python3")
        .arg(&script)
        .arg("pop3")
        .arg(popgate_bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let mut to_holder = holder.stdin.take().unwrap();
    let mut from_holder = BufReader::new(holder.stdout.take().unwrap());
    let mut first_line = String::new();
    from_holder.read_line(&mut first_line).unwrap();
    let port: u16 = first_line.trim().parse().unwrap_or(0);
    assert!(port > 0, "{}", read(&dir.path().join("stderr")));
    let mut say = |word: &str| {
        writeln!(to_holder, "{word}").unwrap();
        let mut line = String::new();
        from_holder.read_line(&mut line).unwrap();
        line.trim().to_owned()
    };
    std::fs::write(
        &cfg,
        format!(
            "shutdown_grace = \"10s\"\n\
             [[listener]]\nname = \"pop3\"\nbind = \"127.0.0.1:{port}\"\n\
             [upstream]\naddress = \"{}\"\n\
             [log]\ndir = \"{}\"\nrotation = \"never\"\n",
            dv.pop3,
            dir.path().join("log").display()
        ),
    )
    .unwrap();
    let log = dir.path().join("log/popgate.log");
    let taken = || read(&log).matches("using the socket passed").count();
    let first = say("start");
    wait_until("first popgate on the socket", || taken() == 1);

    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let want = served(&bob_msgs()[0]);
    let done = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (done, ok, want) = (done.clone(), ok.clone(), want.clone());
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                while !done.load(Ordering::Relaxed) {
                    let out = curl(&["-u", "bob:bob-pass", &url("pop3", addr, "1")]);
                    if out.status.success() && out.stdout == want {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failures.push(format!(
                            "{:?}: {}",
                            out.status.code(),
                            String::from_utf8_lossy(&out.stderr)
                        ));
                    }
                }
                failures
            })
        })
        .collect();
    let served_more = |n: usize| {
        let from = ok.load(Ordering::Relaxed);
        wait_until(&format!("{n} more retrievals"), || {
            ok.load(Ordering::Relaxed) >= from + n
        });
    };
    served_more(20);
    // `systemctl restart`: stop (drain, exit), then start.
    assert_eq!(say("stop"), "0", "first popgate ({first}) exit status");
    let second = say("start");
    wait_until("second popgate on the socket", || taken() == 2);
    served_more(20);
    // An overlap: the new process first, then the old one drains and exits.
    let third = say("start");
    wait_until("third popgate on the socket", || taken() == 3);
    assert_eq!(say("stop"), "0", "second popgate ({second}) exit status");
    served_more(20);
    done.store(true, Ordering::Relaxed);
    let failures: Vec<String> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert_eq!(say("stop"), "0", "third popgate ({third}) exit status");
    drop(to_holder);
    let _ = holder.wait();
    assert!(
        failures.is_empty(),
        "{} of {} retrievals failed: {failures:?}",
        failures.len(),
        failures.len() + ok.load(Ordering::Relaxed)
    );
    assert_eq!(dv.message_count("bob"), bob_msgs().len(), "nothing deleted");
    println!(
        "{} retrievals over two restarts, none failed",
        ok.load(Ordering::Relaxed)
    );
}

/// systemd's own socket passing, by its `systemd-socket-activate` tool: two sockets, named
/// `pop3` and `other`; the listener `pop3` takes its socket by name (its `bind` is elsewhere),
/// the listener `second` the other by address. Sessions on both work.
#[test]
fn listeners_take_sockets_passed_by_systemd_socket_activate() {
    let Some(tool) = common::find_exe("systemd-socket-activate") else {
        println!("skipped: systemd-socket-activate not installed");
        return;
    };
    let h = Harness::new();
    let up = upstream(&h);
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2) = (common::free_port(), common::free_port());
    let cfg = dir.path().join("popgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "shutdown_grace = \"1s\"\n\
             [[listener]]\nname = \"pop3\"\nbind = \"127.0.0.1:1\"\n\
             [[listener]]\nname = \"second\"\nbind = \"127.0.0.1:{p2}\"\n\
             [upstream]\naddress = \"{}\"\n",
            up.local_addr()
        ),
    )
    .unwrap();
    let stderr = dir.path().join("stderr");
    let mut child = Command::new(tool)
        .args([
            "-l",
            &format!("127.0.0.1:{p1}"),
            "-l",
            &format!("127.0.0.1:{p2}"),
        ])
        .arg("--fdname=pop3:other")
        .arg(popgate_bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    wait_until("the sockets are bound", || {
        read(&stderr).matches("Listening on").count() == 2
    });
    // The first connection starts popgate (the tool execs it with the sockets).
    session(format!("127.0.0.1:{p1}").parse().unwrap());
    session(format!("127.0.0.1:{p2}").parse().unwrap());
    let log = read(&stderr);
    assert!(
        log.contains("using the socket passed by the service manager listener=pop3")
            && log.contains(&format!("listener=second addr=127.0.0.1:{p2}")),
        "{log}"
    );
    assert!(!log.contains("matches no listener"), "{log}");
    kill(child.id(), "-TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "popgate did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `LISTEN_FDS` without a `LISTEN_PID` naming popgate (a wrapper that passed the variables on,
/// or dropped only LISTEN_PID) is not socket activation (sd_listen_fds(3)): the inherited fd
/// is not served on, the listener binds its own address, and the log says why.
#[test]
fn listen_fds_without_listen_pid_naming_popgate_is_not_used() {
    let h = Harness::new();
    let up = upstream(&h);
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let cfg = dir.path().join("popgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "shutdown_grace = \"1s\"\n\
             [[listener]]\nname = \"pop3\"\nbind = \"127.0.0.1:{port}\"\n\
             [upstream]\naddress = \"{}\"\n",
            up.local_addr()
        ),
    )
    .unwrap();
    let stderr = dir.path().join("stderr");
    // fd 3: a listening socket named like the listener, passed with LISTEN_FDS and
    // LISTEN_FDNAMES but no LISTEN_PID.
    let script = "import os, socket, sys\n\
                  s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(8)\n\
                  s.fileno() == 3 or os.dup2(s.fileno(), 3)\n\
                  os.set_inheritable(3, True)\n\
                  env = {k: v for k, v in os.environ.items() if k != 'LISTEN_PID'}\n\
                  env.update(LISTEN_FDS='1', LISTEN_FDNAMES='pop3')\n\
                  os.execve(sys.argv[1], sys.argv[1:], env)\n";
    /// Killed however the test ends: a failing assertion leaves no popgate behind.
    struct Reaped(std::process::Child);
    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Reaped(
        Command::new("python3")
            .args(["-c", script])
            .arg(popgate_bin())
            .args(["run", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_until("popgate listening on its own address", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            || child.0.try_wait().unwrap().is_some()
    });
    session(format!("127.0.0.1:{port}").parse().unwrap());
    let log = read(&stderr);
    assert!(!log.contains("using the socket passed"), "{log}");
    assert!(
        log.contains("LISTEN_FDS is set but LISTEN_PID does not name this process"),
        "{log}"
    );
    kill(child.0.id(), "-TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "popgate did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}
