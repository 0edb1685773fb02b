//! Audit hygiene and per-event tags, through the real proxy in front of the demo upstream:
//! file and directory modes, the `instance` field, session ids across restarts, the rule on
//! rule-dropped logins and connections, tags per event (`scope`), the `size` matcher, and
//! `popgate audit` reporting lines it cannot read.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::clients::RawPop;
use common::proxy::{
    Harness, PopgateOpts, PopgateProcess, ProxyHandle, mailbox, popgate_bin, rule_file,
};
use common::{audit_events, wait_until};
use popgate_demo::{DemoServer, ServerOptions};
use serde_json::{Value, json};

const USER: &str = "alice";
const PASS: &str = "hygiene-pass-1";

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// A message of exactly `size` octets on the wire (CRLF lines, no dot lines).
fn message(size: usize, subject: &str) -> Vec<u8> {
    let mut m = format!("Subject: {subject}\r\n\r\n").into_bytes();
    while m.len() + 2 < size {
        let n = (size - m.len() - 2).min(70);
        m.extend(std::iter::repeat_n(b'x', n));
        m.extend_from_slice(b"\r\n");
    }
    m
}

/// Message 1 is 20 000 octets, 2 and 3 are small.
fn demo(h: &Harness) -> DemoServer {
    h.upstream(ServerOptions::new(vec![mailbox(
        USER,
        PASS,
        vec![
            message(20_000, "large"),
            message(300, "small"),
            message(200, "tiny"),
        ],
    )]))
}

fn proxy(
    h: &Harness,
    up: &DemoServer,
    rules: &[&str],
    audit_dir: &Path,
    extra: &str,
) -> ProxyHandle {
    h.proxy_with_rules(
        rules,
        "",
        up.local_addr(),
        "",
        &format!("[audit]\nenabled = true\ndir = {audit_dir:?}\n{extra}"),
    )
}

fn login(c: &mut RawPop) {
    assert!(c.cmd(&format!("USER {USER}")).starts_with("+OK"));
    assert!(c.cmd(&format!("PASS {PASS}")).starts_with("+OK"));
}

/// Wait until `n` sessions have closed in `dir`; returns every event.
fn closed(dir: &Path, n: usize) -> Vec<Value> {
    wait_until("session_close events", || {
        audit_events(dir)
            .iter()
            .filter(|e| e["event"] == "session_close")
            .count()
            >= n
    });
    audit_events(dir)
}

fn tags(ev: &Value) -> Vec<String> {
    ev["tags"]
        .as_array()
        .map(|a| a.iter().map(|t| t.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

fn find<'a>(evs: &'a [Value], event: &str, msg: u64, verb: &str) -> &'a Value {
    evs.iter()
        .find(|e| e["event"] == event && e["msg"] == msg && e["verb"] == verb)
        .unwrap_or_else(|| panic!("no {event} {verb} {msg} in {evs:#?}"))
}

/// Audit files are 0640; a directory popgate creates is 0750; an existing directory keeps its
/// mode; transcripts are 0600 in a 0700 directory.
#[test]
fn audit_files_and_directories_are_not_world_readable() {
    let h = Harness::new();
    let up = demo(&h);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("new/audit");
    let transcripts = tmp.path().join("new/transcripts");
    let mut p = proxy(
        &h,
        &up,
        &[],
        &dir,
        &format!("[audit.transcript]\ndir = {transcripts:?}\nlisteners = [\"test\"]\n"),
    );
    let mut c = RawPop::connect(p.addr);
    login(&mut c);
    assert!(c.cmd("QUIT").starts_with("+OK"));
    closed(&dir, 1);
    p.shutdown(&h);
    assert_eq!(mode(&dir), 0o750, "audit dir created by popgate");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!files.is_empty());
    for f in &files {
        assert_eq!(mode(f), 0o640, "{}", f.display());
    }
    assert_eq!(mode(&transcripts), 0o700);
    for f in std::fs::read_dir(&transcripts).unwrap() {
        assert_eq!(mode(&f.unwrap().path()), 0o600);
    }

    // An existing (admin-made) directory keeps its mode; the files are 0640 all the same.
    let existing = tmp.path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut p = proxy(&h, &up, &[], &existing, "");
    let mut c = RawPop::connect(p.addr);
    assert!(c.cmd("QUIT").starts_with("+OK"));
    closed(&existing, 1);
    p.shutdown(&h);
    assert_eq!(mode(&existing), 0o755);
    for f in std::fs::read_dir(&existing).unwrap() {
        assert_eq!(mode(&f.unwrap().path()), 0o640);
    }
}

/// Every event names its instance: `audit.instance`, or by default the host name.
#[test]
fn every_event_names_the_instance() {
    let h = Harness::new();
    let up = demo(&h);
    let tmp = tempfile::tempdir().unwrap();
    let named = tmp.path().join("named");
    let mut p = proxy(&h, &up, &[], &named, "instance = \"mx-test-1\"\n");
    let mut c = RawPop::connect(p.addr);
    login(&mut c);
    assert!(c.cmd("QUIT").starts_with("+OK"));
    let evs = closed(&named, 1);
    p.shutdown(&h);
    assert!(evs.len() >= 3);
    for e in &evs {
        assert_eq!(e["instance"], "mx-test-1", "{e}");
    }

    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let default = tmp.path().join("default");
    let mut p = proxy(&h, &up, &[], &default, "");
    let mut c = RawPop::connect(p.addr);
    assert!(c.cmd("QUIT").starts_with("+OK"));
    let evs = closed(&default, 1);
    p.shutdown(&h);
    for e in &evs {
        assert_eq!(e["instance"], host.trim(), "{e}");
    }
}

/// Session ids do not start again at 1 on a restart: ids of two runs into one directory are
/// all different, and they increase from one run to the next.
#[test]
fn session_ids_are_unique_and_increase_across_restarts() {
    let h = Harness::new();
    let up = demo(&h);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    let mut ids_per_run = Vec::new();
    for run in 1..=2 {
        let mut p = proxy(&h, &up, &[], &dir, "");
        for _ in 0..2 {
            let mut c = RawPop::connect(p.addr);
            assert!(c.cmd("QUIT").starts_with("+OK"));
        }
        let evs = closed(&dir, 2 * run);
        p.shutdown(&h);
        let mut ids: Vec<u64> = evs
            .iter()
            .filter(|e| e["event"] == "session_open")
            .map(|e| e["session"].as_u64().unwrap())
            .collect();
        ids.sort();
        ids_per_run.push(ids);
    }
    let (first, second) = (&ids_per_run[0], &ids_per_run[1]);
    assert_eq!(first.len(), 2);
    assert_eq!(second.len(), 4, "{second:?}");
    let mut all = second.clone();
    all.dedup();
    assert_eq!(all.len(), 4, "an id was used twice: {second:?}");
    let new: Vec<u64> = second
        .iter()
        .filter(|i| !first.contains(i))
        .copied()
        .collect();
    assert!(
        new.iter().all(|n| first.iter().all(|f| n > f)),
        "{first:?} then {new:?}"
    );
    // Below 2^53: exact in jq and JavaScript.
    assert!(all.iter().all(|&i| i < 1 << 53), "{all:?}");
}

/// A login a rule drops is not a `success` without a rule: it is `dropped` (the server said
/// +OK, the client never got it) with the rule, and `session_close` names the rule too. A
/// connection refused by a `connect` rule and a command dropped by a rule are recorded the same.
#[test]
fn rule_dropped_logins_and_sessions_name_the_rule() {
    let rules = rule_file(
        r#"
[[rule]]
name = "refuse-net"
on = "connect"
listener = "other"
action = "drop"

[[rule]]
name = "no-alice-here"
on = "login"
user = "^alice$"
status = "ok"
action = "drop"

[[rule]]
name = "never-bob"
on = "command"
verbs = "PASS"
user = "^bob$"
action = "drop"
"#,
    );
    let h = Harness::new();
    let up = demo(&h);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    let toml = format!(
        "rules = [{:?}]\n\
         [[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n\
         [[listener]]\nname = \"other\"\nbind = \"127.0.0.1:0\"\n\
         [upstream]\naddress = \"{}\"\n\
         [audit]\nenabled = true\ndir = {dir:?}\n",
        rules.path,
        up.local_addr()
    );
    let mut p = h.proxy_toml(&toml);
    // alice: the server accepts, the rule drops.
    let mut c = RawPop::connect(p.addr);
    assert!(c.cmd(&format!("USER {USER}")).starts_with("+OK"));
    c.send(&format!("PASS {PASS}"));
    assert_eq!(c.read_to_end(), b"", "the client never sees the +OK");
    closed(&dir, 1);
    // bob: PASS is dropped before it reaches the server.
    let mut c = RawPop::connect(p.addr);
    assert!(c.cmd("USER bob").starts_with("+OK"));
    c.send("PASS whatever");
    assert_eq!(c.read_to_end(), b"");
    closed(&dir, 2);
    // A connection on the other listener is dropped before the greeting.
    let s = std::net::TcpStream::connect(p.addrs[1]).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut buf = Vec::new();
    let _ = std::io::Read::read_to_end(&mut &s, &mut buf);
    assert!(buf.is_empty());
    let evs = closed(&dir, 3);
    p.shutdown(&h);

    let login = evs.iter().find(|e| e["event"] == "login").unwrap();
    assert_eq!(login["user"], USER);
    assert_eq!(login["outcome"], "dropped", "{login}");
    assert_eq!(login["rule"], "no-alice-here", "{login}");
    assert!(
        !evs.iter()
            .any(|e| e["event"] == "login" && e["outcome"] == "success"),
        "{evs:#?}"
    );
    let closes: Vec<&Value> = evs
        .iter()
        .filter(|e| e["event"] == "session_close")
        .collect();
    let rules_named: Vec<(&str, &str)> = closes
        .iter()
        .map(|e| {
            (
                e["reason"].as_str().unwrap(),
                e["rule"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        rules_named,
        [
            ("rule_drop", "no-alice-here"),
            ("rule_drop", "never-bob"),
            ("rule_drop", "refuse-net")
        ]
    );
    let opened = evs
        .iter()
        .filter(|e| e["event"] == "session_open" && e["listener"] == "other")
        .count();
    assert_eq!(
        opened, 1,
        "a refused connection is in the audit trail: {evs:#?}"
    );
}

const SIZE_RULE: &str = r#"
[[rule]]
name = "large"
on = "response"
answers = ["RETR", "TOP"]
size = "> 10k"
action = "tag"
tags = ["large-message"]
"#;

/// popgate with the rule file holding `rules` and an audit trail in front of the demo server;
/// one session logs in and goes on with `session` (QUIT included). Its audit records.
fn audited_session(rules: &str, session: impl FnOnce(&mut RawPop)) -> Vec<Value> {
    let rules = rule_file(rules);
    let h = Harness::new();
    let up = demo(&h);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    let mut p = proxy(&h, &up, &[&rules.path], &dir, "");
    let mut c = RawPop::connect(p.addr);
    login(&mut c);
    session(&mut c);
    let evs = closed(&dir, 1);
    p.shutdown(&h);
    evs
}

/// After the login: RETR 1 (20 000 octets), RETR 2 (300), TOP 1 0 (the demo's TOP line states
/// no size), LIST 1, QUIT.
fn fetch(c: &mut RawPop) {
    for cmd in ["RETR 1", "RETR 2", "TOP 1 0"] {
        let (status, body) = c.cmd_multi(cmd);
        assert!(
            status.starts_with("+OK") && body.is_some(),
            "{cmd}: {status}"
        );
    }
    assert!(c.cmd("LIST 1").starts_with("+OK 1 20000"));
    assert!(c.cmd("QUIT").starts_with("+OK"));
}

/// A tag rule with `size > N` on the RETR response tags that RETR's `retrieve` record only:
/// not the later, small RETR, nor a TOP whose `+OK` states no size, nor the session's other
/// records.
#[test]
fn size_tag_marks_only_the_large_retrieve() {
    let evs = audited_session(SIZE_RULE, fetch);
    assert_eq!(tags(find(&evs, "retrieve", 1, "RETR")), ["large-message"]);
    assert!(tags(find(&evs, "retrieve", 2, "RETR")).is_empty());
    assert!(tags(find(&evs, "retrieve", 1, "TOP")).is_empty());
    for e in evs.iter().filter(|e| e["event"] != "retrieve") {
        assert!(tags(e).is_empty(), "{e}");
    }
}

/// The same rule with `scope = "session"` tags the large RETR and everything after it (the
/// small RETR, the TOP, the close), never what came before (the login).
#[test]
fn size_tag_with_session_scope_marks_the_rest_of_the_session() {
    let evs = audited_session(&format!("{SIZE_RULE}scope = \"session\"\n"), fetch);
    let large = json!(["large-message"]);
    assert_eq!(find(&evs, "retrieve", 1, "RETR")["tags"], large);
    assert_eq!(find(&evs, "retrieve", 2, "RETR")["tags"], large);
    assert_eq!(find(&evs, "retrieve", 1, "TOP")["tags"], large);
    let close = evs.iter().find(|e| e["event"] == "session_close").unwrap();
    assert_eq!(close["tags"], large);
    let login = evs.iter().find(|e| e["event"] == "login").unwrap();
    assert!(login.get("tags").is_none(), "{login}");
}

/// `popgate audit` shows every readable event, lists each line it could not read on stderr
/// (file and line number) and exits non-zero; a last line still being written is reported but
/// is no failure.
#[test]
fn popgate_audit_reports_unreadable_and_truncated_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let good = |n: u64| {
        format!(
            "{{\"schema\":1,\"ts\":\"2026-03-01T09:00:0{n}.000Z\",\"instance\":\"mx\",\"session\":{n},\"event\":\"reset\",\"user\":\"bob\"}}\n"
        )
    };
    let damaged = tmp.path().join("audit.2026-03-01.jsonl");
    std::fs::write(
        &damaged,
        format!(
            "{}not json at all\n{}{{\"schema\":1,\"ts\":\"2026-03-01T09:00:05.000Z\",\"sess",
            good(1),
            good(2)
        ),
    )
    .unwrap();
    let out = Command::new(popgate_bin())
        .arg("audit")
        .arg(&damaged)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(
        stdout.lines().filter(|l| l.contains("reset")).count(),
        2,
        "{stdout}"
    );
    let name = damaged.display().to_string();
    assert!(
        stderr.contains(&format!("{name}:2: not an audit event")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{name}:4: last line incomplete")),
        "{stderr}"
    );
    assert!(stderr.contains("1 unreadable line"), "{stderr}");

    // Only a last line being written: reported, and the command succeeds.
    let live = tmp.path().join("audit.2026-03-02.jsonl");
    std::fs::write(&live, format!("{}{{\"schema\":1,", good(3))).unwrap();
    let out = Command::new(popgate_bin())
        .args(["audit", "--json"])
        .arg(&live)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), good(3));
    assert!(
        stderr.contains(&format!("{}:2: last line incomplete", live.display())),
        "{stderr}"
    );
}

/// `popgate run` with an admin-made, world-readable audit directory: it is left as it is and
/// the log says so; a transcript directory that does not exist is made 0700 at start.
#[test]
fn popgate_run_warns_about_a_world_readable_audit_dir() {
    let h = Harness::new();
    let up = demo(&h);
    let tmp = tempfile::tempdir().unwrap();
    let audit = tmp.path().join("audit");
    std::fs::create_dir(&audit).unwrap();
    std::fs::set_permissions(&audit, std::fs::Permissions::from_mode(0o755)).unwrap();
    let transcripts = tmp.path().join("transcripts");
    let mut bin = PopgateProcess::run(
        up.local_addr(),
        PopgateOpts::new().tables(&format!(
            "[audit]\nenabled = true\ndir = {audit:?}\n[audit.transcript]\ndir = {transcripts:?}\n"
        )),
    );
    let log = bin.wait_log("audit directory is accessible to every local user", 1);
    assert!(log.contains("0755"), "{log}");
    assert!(!log.contains("transcript directory is accessible"), "{log}");
    bin.stop();
    assert_eq!(mode(&audit), 0o755);
    assert_eq!(mode(&transcripts), 0o700);
}

/// Event-scoped tags of each rule event land on that event's own record: `connect` on
/// `session_open`, `login` on `login`, a DELE command on its `delete_marked`, `close` on
/// `session_close`; a LIST command makes no record, so its tag appears nowhere.
#[test]
fn event_tags_land_on_their_own_record() {
    let rules = r#"
[[rule]]
name = "t-connect"
on = "connect"
action = "tag"
tags = ["conn"]

[[rule]]
name = "t-login"
on = "login"
status = "ok"
action = "tag"
tags = ["login-seen"]

[[rule]]
name = "t-list"
on = "command"
verbs = "LIST"
action = "tag"
tags = ["list"]

[[rule]]
name = "t-dele"
on = "command"
verbs = "DELE"
action = "tag"
tags = ["dele"]

[[rule]]
name = "t-close"
on = "close"
action = "tag"
tags = ["bye"]
"#;
    let evs = audited_session(rules, |c| {
        assert!(c.cmd("LIST 1").starts_with("+OK"));
        assert!(c.cmd("DELE 3").starts_with("+OK"));
        assert!(c.cmd("QUIT").starts_with("+OK"));
    });
    let got: Vec<(String, Vec<String>)> = evs
        .iter()
        .map(|e| (e["event"].as_str().unwrap().to_owned(), tags(e)))
        .collect();
    let want: Vec<(String, Vec<String>)> = [
        ("session_open", vec!["conn"]),
        ("login", vec!["login-seen"]),
        ("delete_marked", vec!["dele"]),
        ("update", vec![]),
        ("session_close", vec!["bye"]),
    ]
    .iter()
    .map(|(e, t)| (e.to_string(), t.iter().map(|s| s.to_string()).collect()))
    .collect();
    assert_eq!(got, want);
}

/// The date (`YYYY-MM-DD`, UTC) `days` days before now.
fn day(days_back: u64) -> String {
    let t = std::time::SystemTime::now() - std::time::Duration::from_secs(86_400 * days_back);
    humantime::format_rfc3339_seconds(t).to_string()[..10].to_owned()
}

/// A file with an old modification time, as a restore or a copy leaves it.
fn plant(path: &Path, old: bool) {
    std::fs::write(path, "{}\n").unwrap();
    if old {
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(humantime::parse_rfc3339("2001-01-01T00:00:00Z").unwrap())
            .unwrap();
    }
}

/// `keep_days = 2` keeps today's and yesterday's files and deletes older ones, by the date in
/// their name: yesterday's file with a 2001 mtime stays, a freshly restored
/// `audit.2020-01-01.jsonl` goes, at start. A reopen (SIGUSR1, logrotate's) deletes nothing.
/// The same for the dated operational logs with `[log] keep_days`, whose files are 0640.
#[test]
fn retention_goes_by_the_date_in_the_file_name_never_on_reopen() {
    let h = Harness::new();
    let up = demo(&h);
    let tmp = tempfile::tempdir().unwrap();
    let (audit, log) = (tmp.path().join("audit"), tmp.path().join("log"));
    std::fs::create_dir(&audit).unwrap();
    std::fs::create_dir(&log).unwrap();
    let a = |d: &str| audit.join(format!("audit.{d}.jsonl"));
    let l = |d: &str| log.join(format!("popgate.{d}.log"));
    plant(&a("2020-01-01"), false);
    plant(&a(&day(1)), true);
    plant(&a(&day(2)), false);
    plant(&l("2020-01-01"), false);
    plant(&l(&day(1)), true);
    plant(&l(&day(2)), true);
    let mut p = PopgateProcess::run(
        up.local_addr(),
        PopgateOpts::new()
            .tables(&format!(
                "[audit]\nenabled = true\ndir = {audit:?}\nkeep_days = 2\n\
                 [log]\nlevel = \"info\"\ndir = {log:?}\nrotation = \"daily\"\nkeep_days = 2\n"
            ))
            .log_dir(log.to_str().unwrap())
            .wait_for_log(),
    );
    for (path, kept) in [
        (a("2020-01-01"), false),
        (a(&day(2)), false),
        (a(&day(1)), true),
        (a(&day(0)), true),
        (l("2020-01-01"), false),
        (l(&day(2)), false),
        (l(&day(1)), true),
        (l(&day(0)), true),
    ] {
        assert_eq!(path.exists(), kept, "{}", path.display());
    }
    assert_eq!(mode(&l(&day(0))), 0o640, "log files are not for every user");
    assert_eq!(mode(&a(&day(0))), 0o640);

    // A reopen after logrotate's move: nothing is deleted, not even a file that has expired.
    plant(&a("2020-01-01"), false);
    plant(&l("2020-01-01"), false);
    let mut c = RawPop::connect(p.addr);
    login(&mut c);
    assert!(c.cmd("QUIT").starts_with("+OK"));
    closed(&audit, 1);
    p.signal("-USR1");
    p.wait_log("reopened", 1);
    for path in [a("2020-01-01"), a(&day(1)), l("2020-01-01"), l(&day(1))] {
        assert!(path.exists(), "{} deleted on reopen", path.display());
    }
    p.stop();
}
