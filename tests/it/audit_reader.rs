//! The audit reader (`popgate audit`): filters, table and JSON output over JSONL files
//! written through the event types.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use popgate::audit::{
    AuditEvent, AuditEventKind, AuditFilter, AuditRecord, DeleteMarked, Deleted, Denied, Headers,
    LoginEvent, LoginEventOutcome, ReaderError, Reset, Retrieve, RetrieveVerb, SessionClose,
    SessionOpen, TlsEvent, TlsSide, Update, UpdateOutcome, format_json, format_table, read_audit,
    read_events,
};
use popgate::types::{CloseReason, TlsInfo};

fn at(s: &str) -> SystemTime {
    humantime::parse_rfc3339(s).unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn user(u: &str) -> Option<popgate::types::UserName> {
    Some(u.into())
}

/// Day one: bob fetches and deletes message 3 (session 1), eve fails to log in (session 2).
fn day_one() -> Vec<AuditEvent> {
    vec![
        AuditEvent::at(
            at("2026-03-01T09:00:00.000Z"),
            1,
            SessionOpen {
                listener: "pop3s".into(),
                client: addr("198.51.100.7:51544"),
                local: addr("192.0.2.10:995"),
                proxy: None,
                original_dst: None,
                client_tls: Some(TlsInfo {
                    version: "TLSv1_3".into(),
                    cipher: "TLS13_AES_256_GCM_SHA384".into(),
                    sni: Some("mail.example.org".into()),
                }),
            },
        ),
        AuditEvent::at(
            at("2026-03-01T09:00:00.500Z"),
            1,
            LoginEvent {
                user: user("bob"),
                user_as_typed: None,
                method: "USER".into(),
                outcome: LoginEventOutcome::Success,
                code: None,
                rule: None,
                upstream: None,
            },
        ),
        AuditEvent::at(
            at("2026-03-01T09:00:01.000Z"),
            2,
            SessionOpen {
                listener: "pop3".into(),
                client: addr("203.0.113.9:40000"),
                local: addr("192.0.2.10:110"),
                proxy: None,
                original_dst: None,
                client_tls: None,
            },
        ),
        AuditEvent::at(
            at("2026-03-01T09:00:01.200Z"),
            2,
            TlsEvent::new(
                TlsSide::Client,
                TlsInfo {
                    version: "TLSv1_2".into(),
                    cipher: "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".into(),
                    sni: None,
                },
            ),
        ),
        AuditEvent::at(
            at("2026-03-01T09:00:01.500Z"),
            2,
            LoginEvent {
                user: user("eve"),
                user_as_typed: None,
                method: "AUTH PLAIN".into(),
                outcome: LoginEventOutcome::Failure,
                code: Some("AUTH".into()),
                rule: None,
                upstream: None,
            },
        ),
        AuditEvent::at(
            at("2026-03-01T09:00:02.000Z"),
            1,
            Retrieve {
                user: user("bob"),
                verb: RetrieveVerb::Retr,
                msg: 3,
                lines: None,
                octets: 48213,
                uidl: Some("uid-0003".into()),
                no_uidl: false,
                complete: true,
                headers: Headers(vec![
                    ("Message-ID".into(), "<m3@example.org>".into()),
                    ("From".into(), "Alice <alice@example.org>".into()),
                    ("Subject".into(), "Quarterly report\u{1b}[2J".into()),
                ]),
            },
        ),
        AuditEvent::at(
            at("2026-03-01T09:00:02.100Z"),
            1,
            Denied {
                rule: "keep-invoices".into(),
                verb: "DELE".into(),
                user: user("bob"),
            },
        )
        .with_tags(["compliance"]),
        AuditEvent::at(
            at("2026-03-01T09:00:02.200Z"),
            1,
            DeleteMarked {
                user: user("bob"),
                msg: 3,
                uidl: Some("uid-0003".into()),
                message_id: Some("<m3@example.org>".into()),
                no_uidl: false,
            },
        ),
        AuditEvent::at(
            at("2026-03-01T09:00:02.300Z"),
            1,
            Update {
                user: user("bob"),
                deleted: vec![Deleted {
                    msg: 3,
                    uidl: Some("uid-0003".into()),
                    message_id: Some("<m3@example.org>".into()),
                    no_uidl: false,
                }],
                outcome: UpdateOutcome::Confirmed,
            },
        ),
        AuditEvent::at(
            at("2026-03-01T09:00:02.400Z"),
            1,
            SessionClose {
                user: user("bob"),
                reason: CloseReason::Quit,
                bytes_from_client: 87,
                bytes_to_client: 50311,
                duration_ms: 2400,
                rule: None,
                kicked_by: None,
            },
        ),
        AuditEvent::at(
            at("2026-03-01T09:00:05.000Z"),
            2,
            SessionClose {
                user: None,
                reason: CloseReason::ClientEof,
                bytes_from_client: 61,
                bytes_to_client: 210,
                duration_ms: 4000,
                rule: None,
                kicked_by: None,
            },
        ),
    ]
}

/// Day two, after a restart: session ids begin again at 1 — this time it is carol's session.
fn day_two() -> Vec<AuditEvent> {
    vec![
        AuditEvent::at(
            at("2026-03-02T10:00:00.000Z"),
            1,
            SessionOpen {
                listener: "pop3".into(),
                client: addr("[2001:db8::7]:50000"),
                local: addr("[2001:db8::10]:110"),
                proxy: None,
                original_dst: None,
                client_tls: None,
            },
        ),
        AuditEvent::at(
            at("2026-03-02T10:00:00.400Z"),
            1,
            LoginEvent {
                user: user("carol"),
                user_as_typed: None,
                method: "APOP".into(),
                outcome: LoginEventOutcome::Success,
                code: None,
                rule: None,
                upstream: None,
            },
        ),
        AuditEvent::at(
            at("2026-03-02T10:00:01.000Z"),
            1,
            Retrieve {
                user: user("carol"),
                verb: RetrieveVerb::Top,
                msg: 1,
                lines: Some(0),
                octets: 512,
                uidl: None,
                no_uidl: false,
                complete: false,
                headers: Headers::default(),
            },
        ),
        AuditEvent::at(
            at("2026-03-02T10:00:01.500Z"),
            1,
            Reset {
                user: user("carol"),
            },
        ),
    ]
}

fn write_jsonl(path: &Path, events: &[AuditEvent], trailing_partial: bool) {
    let mut f = std::fs::File::create(path).unwrap();
    for e in events {
        let line = serde_json::to_string(e).unwrap();
        writeln!(f, "{line}").unwrap();
    }
    if trailing_partial {
        // A writer caught mid-line (or a crash): the reader skips it.
        write!(f, "{{\"schema\":1,\"ts\":\"2026-03-0").unwrap();
    }
}

struct Files {
    _dir: tempfile::TempDir,
    paths: Vec<PathBuf>,
}

fn files() -> Files {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("audit.2026-03-01.jsonl");
    let b = dir.path().join("audit.2026-03-02.jsonl");
    write_jsonl(&a, &day_one(), false);
    write_jsonl(&b, &day_two(), true);
    Files {
        _dir: dir,
        paths: vec![a, b],
    }
}

fn summary(records: &[AuditRecord]) -> Vec<(u64, String)> {
    records
        .iter()
        .map(|r| (r.event.session, r.name.clone()))
        .collect()
}

fn s(id: u64, name: &str) -> (u64, String) {
    (id, name.to_owned())
}

#[test]
fn everything_round_trips_in_time_order() {
    let f = files();
    // Files given out of order still come back by time.
    let reversed: Vec<PathBuf> = f.paths.iter().rev().cloned().collect();
    let records = read_events(&reversed, &AuditFilter::default()).unwrap();
    assert_eq!(records.len(), 15);
    let expected: Vec<AuditEvent> = day_one().into_iter().chain(day_two()).collect();
    let got: Vec<AuditEvent> = records.iter().map(|r| r.event.clone()).collect();
    assert_eq!(got, expected);
}

/// A session that spans two files (open before midnight, close after) keeps its user-less
/// close in a user's answer whatever order the files are given in: `popgate audit` reads
/// popgate's files in the order of the dates in their names (a shell glob puts an hourly file
/// before the same day's daily one, and a user may list them backwards).
#[test]
fn a_session_across_files_is_whole_whatever_order_the_files_are_given_in() {
    let dir = tempfile::tempdir().unwrap();
    let open = AuditEvent::at(
        at("2026-03-01T23:59:59.000Z"),
        9,
        SessionOpen {
            listener: "pop3".into(),
            client: addr("203.0.113.9:40000"),
            local: addr("192.0.2.10:110"),
            proxy: None,
            original_dst: None,
            client_tls: None,
        },
    );
    let failed = AuditEvent::at(
        at("2026-03-01T23:59:59.500Z"),
        9,
        LoginEvent {
            user: user("eve"),
            user_as_typed: None,
            method: "USER".into(),
            outcome: LoginEventOutcome::Failure,
            code: None,
            rule: None,
            upstream: None,
        },
    );
    let close = AuditEvent::at(
        at("2026-03-02T00:00:03.000Z"),
        9,
        SessionClose {
            user: None,
            reason: CloseReason::ClientEof,
            bytes_from_client: 30,
            bytes_to_client: 60,
            duration_ms: 4000,
            rule: None,
            kicked_by: None,
        },
    );
    // Day one daily, day two hourly (the rotation was changed at midnight).
    let one = dir.path().join("audit.2026-03-01.jsonl");
    let two = dir.path().join("audit.2026-03-02-00.jsonl");
    write_jsonl(&one, &[open, failed], false);
    write_jsonl(&two, &[close], false);
    let eve = AuditFilter {
        user: Some("eve".into()),
        ..AuditFilter::default()
    };
    for order in [vec![one.clone(), two.clone()], vec![two, one]] {
        assert_eq!(
            summary(&read_events(&order, &eve).unwrap()),
            [s(9, "session_open"), s(9, "login"), s(9, "session_close")],
            "{order:?}"
        );
    }
}

#[test]
fn user_filter_includes_the_users_sessions_but_not_reused_ids() {
    let f = files();
    let bob = AuditFilter {
        user: Some("BOB".into()),
        ..AuditFilter::default()
    };
    let records = read_events(&f.paths, &bob).unwrap();
    assert_eq!(
        summary(&records),
        [
            s(1, "session_open"),
            s(1, "login"),
            s(1, "retrieve"),
            s(1, "denied"),
            s(1, "delete_marked"),
            s(1, "update"),
            s(1, "session_close"),
        ]
    );
    // Day two's session 1 is carol's: its session_open is hers, not bob's.
    let carol = AuditFilter {
        user: Some("carol".into()),
        ..AuditFilter::default()
    };
    let records = read_events(&f.paths, &carol).unwrap();
    assert_eq!(records.len(), 4);
    assert!(
        matches!(records[0].event.kind, AuditEventKind::SessionOpen(ref o) if o.listener == "pop3")
    );
    assert_eq!(
        records[0].event.ts,
        at("2026-03-02T10:00:00.000Z"),
        "carol's session_open, not bob's"
    );
    // eve's session: its user-less events (open, tls, a close before any login succeeded)
    // come along with her failed login.
    let eve = AuditFilter {
        user: Some("eve".into()),
        ..AuditFilter::default()
    };
    assert_eq!(
        summary(&read_events(&f.paths, &eve).unwrap()),
        [
            s(2, "session_open"),
            s(2, "tls"),
            s(2, "login"),
            s(2, "session_close")
        ]
    );
    let nobody = AuditFilter {
        user: Some("mallory".into()),
        ..AuditFilter::default()
    };
    assert!(read_events(&f.paths, &nobody).unwrap().is_empty());
}

#[test]
fn since_and_event_filters() {
    let f = files();
    let since = AuditFilter {
        since: Some(at("2026-03-01T09:00:02.300Z")),
        ..AuditFilter::default()
    };
    assert_eq!(
        summary(&read_events(&f.paths, &since).unwrap()),
        [
            s(1, "update"),
            s(1, "session_close"),
            s(2, "session_close"),
            s(1, "session_open"),
            s(1, "login"),
            s(1, "retrieve"),
            s(1, "reset"),
        ]
    );
    // "Who deleted message uid-0003?"
    let deletes = AuditFilter::from_args(None, None, &["delete_marked,update".into()]).unwrap();
    let records = read_events(&f.paths, &deletes).unwrap();
    assert_eq!(summary(&records), [s(1, "delete_marked"), s(1, "update")]);
    assert!(records.iter().all(|r| r.event.user() == Some("bob")));
    // Relative times: everything is long ago.
    let recent = AuditFilter::from_args(None, Some("2h"), &[]).unwrap();
    assert!(read_events(&f.paths, &recent).unwrap().is_empty());
    let all = AuditFilter::from_args(None, Some("2026-03-01"), &[]).unwrap();
    assert_eq!(read_events(&f.paths, &all).unwrap().len(), 15);
    // Combined: bob's session_open only.
    let combined =
        AuditFilter::from_args(Some("bob".into()), None, &["session_open".into()]).unwrap();
    let records = read_events(&f.paths, &combined).unwrap();
    assert_eq!(summary(&records), [s(1, "session_open")]);
    assert_eq!(records[0].event.ts, at("2026-03-01T09:00:00.000Z"));
}

#[test]
fn table_is_aligned_and_readable() {
    let f = files();
    let records = read_events(&f.paths, &AuditFilter::default()).unwrap();
    let table = format_table(&records);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 16, "{table}");
    assert!(lines[0].starts_with("TIME"), "{table}");
    // Columns line up: EVENT, SESSION, USER and DETAILS start at the same offset everywhere.
    let col = |name: &str| lines[0].find(name).unwrap();
    for l in &lines[1..] {
        let event_col = col("EVENT");
        assert_eq!(&l[event_col - 2..event_col], "  ", "{l}");
        assert_ne!(&l[event_col..event_col + 1], " ", "{l}");
        let session_col = col("SESSION");
        assert!(
            l[session_col..].starts_with(|c: char| c.is_ascii_digit()),
            "{l}"
        );
    }
    let find = |needle: &str| {
        *lines
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle}:\n{table}"))
    };
    let open = find("session_open");
    assert!(open.starts_with("2026-03-01T09:00:00.000Z"), "{open}");
    assert!(
        open.contains("listener=pop3s client=198.51.100.7:51544 local=192.0.2.10:995 tls=TLSv1_3"),
        "{open}"
    );
    let retrieve = find("retrieve  ");
    assert!(
        retrieve.contains(
            "verb=RETR msg=3 octets=48213 uidl=uid-0003 message-id=<m3@example.org> \
             from=\"Alice <alice@example.org>\" subject=\"Quarterly report\\u{1b}[2J\""
        ),
        "{retrieve}"
    );
    assert!(
        !table.contains('\u{1b}'),
        "no raw escape sequences reach the terminal"
    );
    let top = find("verb=TOP");
    assert!(
        top.contains("msg=1 lines=0 octets=512 complete=false"),
        "{top}"
    );
    assert!(top.contains("carol"), "{top}");
    let denied = find("denied");
    assert!(
        denied.contains("rule=keep-invoices verb=DELE tags=compliance"),
        "{denied}"
    );
    let update = find("update");
    assert!(
        update.contains(
            "outcome=confirmed deleted=3(uid-0003|<m3@example.org>) client=198.51.100.7:51544"
        ),
        "{update}"
    );
    let login = find("AUTH");
    assert!(
        login.contains("method=\"AUTH PLAIN\" outcome=failure code=AUTH"),
        "{login}"
    );
    assert!(login.contains(" eve "), "{login}");
    let close = find("reason=client_eof");
    assert!(close.contains("in=61 out=210 duration=4s"), "{close}");
    // A user-less event shows "-" in the user column.
    let user_col = lines[0].find("USER").unwrap();
    assert_eq!(&open[user_col..user_col + 1], "-", "{open}");
    // Empty input: just the header.
    assert_eq!(format_table(&[]).lines().count(), 1);
}

#[test]
fn json_passthrough_keeps_the_original_lines() {
    let f = files();
    let filter = AuditFilter::from_args(None, None, &["retrieve".into()]).unwrap();
    let records = read_events(&f.paths, &filter).unwrap();
    let json = format_json(&records);
    let original = std::fs::read_to_string(&f.paths[0]).unwrap();
    let first = json.lines().next().unwrap();
    assert!(original.lines().any(|l| l == first));
    assert_eq!(json.lines().count(), 2);
    for line in json.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["event"], "retrieve");
        assert_eq!(v["schema"], 1);
    }
}

#[test]
fn unknown_events_pass_through_and_bad_lines_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("audit.jsonl");
    std::fs::write(
        &p,
        "{\"schema\":1,\"ts\":\"2026-03-01T09:00:00.000Z\",\"session\":5,\"event\":\"quota_warning\",\"user\":\"bob\"}\n\n",
    )
    .unwrap();
    let records = read_events(std::slice::from_ref(&p), &AuditFilter::default()).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].name, "quota_warning");
    assert!(format_table(&records).contains("quota_warning"));

    std::fs::write(&p, "{\"schema\":1}\nnot json\n").unwrap();
    let err = read_events(std::slice::from_ref(&p), &AuditFilter::default()).unwrap_err();
    assert!(matches!(err, ReaderError::Parse { line: 1, .. }), "{err}");
    assert!(err.to_string().contains("audit.jsonl:1"), "{err}");

    let missing = dir.path().join("nope.jsonl");
    let err = read_events(&[missing], &AuditFilter::default()).unwrap_err();
    assert!(matches!(err, ReaderError::Io { .. }), "{err}");
}

#[test]
fn events_written_now_are_found_by_relative_since() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("audit.jsonl");
    let old = AuditEvent::at(
        SystemTime::now() - Duration::from_secs(3 * 3600),
        1,
        Reset { user: user("bob") },
    );
    let new = AuditEvent::new(2, Reset { user: user("bob") });
    write_jsonl(&p, &[old, new], false);
    let filter = AuditFilter::from_args(None, Some("2h"), &[]).unwrap();
    let records = read_events(&[p], &filter).unwrap();
    assert_eq!(summary(&records), [s(2, "reset")]);
}

/// `read_audit` reads past lines that are not events and reports each (file, line, reason);
/// a last line without newline is marked incomplete. `read_events` fails on a damaged line
/// but not on an incomplete last one.
#[test]
fn read_audit_reports_bad_lines_and_keeps_reading() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("audit.jsonl");
    let ev = |n: u64| {
        AuditEvent::at(
            at("2026-03-01T09:00:00.000Z"),
            n,
            Reset { user: user("bob") },
        )
    };
    let line = |n| serde_json::to_string(&ev(n)).unwrap();
    // An event, JSON that is no event, bytes that are not UTF-8, an event, a cut line.
    let mut data = format!("{}\n{{\"schema\":1}}\n", line(1)).into_bytes();
    data.extend_from_slice(b"\xff\xfe\n");
    data.extend_from_slice(format!("{}\n{}", line(2), &line(3)[..20]).as_bytes());
    std::fs::write(&p, data).unwrap();
    let read = read_audit(std::slice::from_ref(&p), &AuditFilter::default()).unwrap();
    assert_eq!(read.records.len(), 2);
    let bad: Vec<(usize, bool)> = read.bad.iter().map(|b| (b.line, b.incomplete)).collect();
    assert_eq!(bad, [(2, false), (3, false), (5, true)]);
    assert!(
        read.bad[0]
            .to_string()
            .contains("audit.jsonl:2: not an audit event")
    );
    assert!(
        read.bad[2]
            .to_string()
            .contains("audit.jsonl:5: last line incomplete")
    );
    let err = read_events(std::slice::from_ref(&p), &AuditFilter::default()).unwrap_err();
    assert!(matches!(err, ReaderError::Parse { line: 2, .. }), "{err}");
    // Only an incomplete last line: the strict reader leaves it out.
    std::fs::write(&p, format!("{}\n{}", line(1), &line(2)[..10])).unwrap();
    assert_eq!(
        read_events(std::slice::from_ref(&p), &AuditFilter::default())
            .unwrap()
            .len(),
        1
    );
}

/// Records of several instances read together: the session column says `instance/id`; records
/// of one instance keep the plain id.
#[test]
fn table_names_the_instance_when_there_are_several() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("audit.jsonl");
    let ev = |instance: &str, n: u64| {
        let mut e = AuditEvent::at(
            at("2026-03-01T09:00:00.000Z"),
            n,
            Reset { user: user("bob") },
        );
        e.instance = Some(instance.to_owned());
        e
    };
    write_jsonl(&p, &[ev("mx1", 7), ev("mx2", 7)], false);
    let records = read_events(std::slice::from_ref(&p), &AuditFilter::default()).unwrap();
    let table = format_table(&records);
    assert!(
        table.contains(" mx1/7 ") && table.contains(" mx2/7 "),
        "{table}"
    );
    let one = format_table(&records[..1]);
    assert!(one.contains(" 7 ") && !one.contains("mx1"), "{one}");

    // --user keeps the user-less events of the user's session on its own instance only.
    let open = |instance: &str| {
        let mut e = AuditEvent::at(
            at("2026-03-01T08:59:00.000Z"),
            7,
            SessionOpen {
                listener: "pop3".into(),
                client: addr("198.51.100.7:51544"),
                local: addr("192.0.2.10:110"),
                proxy: None,
                original_dst: None,
                client_tls: None,
            },
        );
        e.instance = Some(instance.to_owned());
        e
    };
    write_jsonl(&p, &[open("mx1"), open("mx2"), ev("mx1", 7)], false);
    let filter = AuditFilter::from_args(Some("bob".into()), None, &[]).unwrap();
    let records = read_events(std::slice::from_ref(&p), &filter).unwrap();
    let got: Vec<(&str, &str)> = records
        .iter()
        .map(|r| (r.event.instance.as_deref().unwrap(), r.name.as_str()))
        .collect();
    assert_eq!(got, [("mx1", "session_open"), ("mx1", "reset")]);
}

#[test]
fn message_filters_answer_who_retrieved_or_deleted_a_message_and_from_where() {
    let f = files();
    let by_uidl = AuditFilter {
        uidl: Some("uid-0003".into()),
        ..AuditFilter::default()
    };
    let records = read_events(&f.paths, &by_uidl).unwrap();
    assert_eq!(
        summary(&records),
        [
            s(1, "session_open"),
            s(1, "retrieve"),
            s(1, "delete_marked"),
            s(1, "update"),
        ]
    );
    let table = format_table(&records);
    let update = table.lines().find(|l| l.contains("update")).unwrap();
    assert!(update.contains("bob"), "{update}");
    assert!(update.starts_with("2026-03-01T09:00:02.300Z"), "{update}");
    assert!(update.contains("outcome=confirmed"), "{update}");
    assert!(update.contains("client=198.51.100.7:51544"), "{update}");
    // By Message-ID, with or without brackets: the same events.
    for id in ["<m3@example.org>", "m3@example.org"] {
        let by_id = AuditFilter {
            message_id: Some(id.into()),
            ..AuditFilter::default()
        };
        assert_eq!(
            summary(&read_events(&f.paths, &by_id).unwrap()),
            summary(&records)
        );
    }
    // The mailbox owner: carol's message events only (and her session's open).
    let carol = AuditFilter {
        msg_user: Some("CAROL".into()),
        ..AuditFilter::default()
    };
    assert_eq!(
        summary(&read_events(&f.paths, &carol).unwrap()),
        [s(1, "session_open"), s(1, "retrieve")]
    );
    let none = AuditFilter {
        uidl: Some("uid-0003".into()),
        msg_user: Some("carol".into()),
        ..AuditFilter::default()
    };
    assert!(read_events(&f.paths, &none).unwrap().is_empty());
    // --until a date includes that day, not the next.
    let day_one_only = AuditFilter::from_args(None, None, &[])
        .unwrap()
        .until(Some("2026-03-01"))
        .unwrap();
    let got = read_events(&f.paths, &day_one_only).unwrap();
    assert!(!got.is_empty());
    assert!(got.iter().all(|r| r.event.ts < at("2026-03-02T00:00:00Z")));
    assert_eq!(got.len(), day_one().len());
}
