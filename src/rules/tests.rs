//! Engine tests through the public API: matchers, actions, order, rewrites, errors.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tracing::Level;

use super::*;
use crate::pop3::command::Verb;
use crate::pop3::response::Status;
use crate::pop3::tracker::State;

fn set(text: &str) -> RuleSet {
    match RuleSet::parse(text, Path::new("t.toml")) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

/// The error message for `text`, checked to name the file.
fn err(text: &str) -> String {
    let e = RuleSet::parse(text, Path::new("dir/t.toml")).unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with("dir/t.toml: "), "{msg}");
    msg
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn base(kind: EventKind) -> Event<'static> {
    Event::new(kind, "pop3", ip("192.0.2.10"))
}

fn cmd(verb: Verb, args: &'static [u8]) -> Event<'static> {
    Event {
        verb: Some(verb),
        args: Some(args),
        ..base(EventKind::Command)
    }
}

fn resp(verb: Verb, line: &'static [u8]) -> Event<'static> {
    let status = crate::pop3::response::StatusLine::parse(line)
        .unwrap()
        .status;
    Event {
        verb: Some(verb),
        status: Some(status),
        text: Some(line),
        state: State::Transaction,
        ..base(EventKind::Response)
    }
}

fn greeting(line: &'static [u8]) -> Event<'static> {
    Event {
        status: Some(Status::Ok),
        text: Some(line),
        ..base(EventKind::Greeting)
    }
}

fn capa(item: Option<&'static [u8]>) -> Event<'static> {
    Event {
        text: item,
        ..base(EventKind::Capa)
    }
}

fn names(v: &Verdict) -> Vec<&str> {
    v.matched.iter().map(|n| &**n).collect()
}

/// Levels and messages of a verdict's log lines.
fn logs(v: &Verdict) -> Vec<(Level, String)> {
    v.logs
        .iter()
        .map(|l| (l.level, l.message.clone()))
        .collect()
}

fn one(rule: &str) -> String {
    format!("[[rule]]\nname = \"r\"\n{rule}\n")
}

// ---------------------------------------------------------------- matchers

#[test]
fn empty_set_is_transparent() {
    let s = RuleSet::empty();
    assert!(s.is_empty());
    assert_eq!(s.len(), 0);
    assert_eq!(s.evaluate(&cmd(Verb::Pass, b"x")), Verdict::default());
    assert!(Verdict::default().passes());
}

#[test]
fn matcher_listener() {
    let s = set(&one(
        "on = \"command\"\nlistener = [\"a\", \"b\"]\naction = \"tag\"\ntags = [\"t\"]",
    ));
    let hit = |l: &'static str| {
        !s.evaluate(&Event {
            listener: l,
            ..cmd(Verb::Noop, b"")
        })
        .matched
        .is_empty()
    };
    assert!(hit("a") && hit("b"));
    assert!(!hit("pop3"));
    // A single string works as well as a list.
    let s = set(&one(
        "on = \"connect\"\nlistener = \"pop3\"\naction = \"trace\"",
    ));
    assert!(s.evaluate(&base(EventKind::Connect)).trace);
}

#[test]
fn matcher_destination() {
    let s = set(&one(
        "on = \"command\"\ndestination = [\"192.0.2.0/24\", \"2001:db8::/32\"]\naction = \"deny\"",
    ));
    let to = |a: Option<&str>| {
        s.evaluate(&Event {
            destination: a.map(ip),
            ..cmd(Verb::User, b"bob")
        })
        .passes()
    };
    assert!(!to(Some("192.0.2.9")));
    assert!(!to(Some("2001:db8::110")));
    assert!(to(Some("198.51.100.1")));
    // No original destination (not intercepting): never holds.
    assert!(to(None));
    let e = err(&one(
        "on = \"connect\"\ndestination = \"10.0.0.1/8\"\naction = \"drop\"",
    ));
    assert!(e.contains("10.0.0.1/8"), "{e}");
}

#[test]
fn matcher_client() {
    let s = set(&one(
        "on = \"connect\"\nclient = [\"10.0.0.0/8\", \"2001:db8::/32\", \"192.0.2.1\"]\naction = \"drop\"",
    ));
    let from = |a: &str| {
        s.evaluate(&Event {
            client: ip(a),
            ..base(EventKind::Connect)
        })
        .outcome
    };
    let dropped = RuleOutcome::Drop {
        rule: Arc::from("r"),
    };
    assert_eq!(from("10.1.2.3"), dropped);
    assert_eq!(from("::ffff:10.1.2.3"), dropped);
    assert_eq!(from("2001:db8:5::1"), dropped);
    assert_eq!(from("192.0.2.1"), dropped);
    assert_eq!(from("192.0.2.2"), RuleOutcome::Continue);
    assert_eq!(from("11.0.0.1"), RuleOutcome::Continue);
    assert_eq!(from("::1"), RuleOutcome::Continue);
}

#[test]
fn matcher_tls() {
    let s = set(&one("on = \"command\"\ntls = false\naction = \"deny\""));
    assert!(!s.evaluate(&cmd(Verb::User, b"bob")).passes());
    assert!(
        s.evaluate(&Event {
            tls: true,
            ..cmd(Verb::User, b"bob")
        })
        .passes()
    );
}

#[test]
fn matcher_state() {
    let s = set(&one(
        "on = \"command\"\nstate = [\"transaction\", \"Update\"]\naction = \"trace\"",
    ));
    let at = |st| {
        s.evaluate(&Event {
            state: st,
            ..cmd(Verb::Noop, b"")
        })
        .trace
    };
    assert!(!at(State::Authorization));
    assert!(at(State::Transaction));
    assert!(at(State::Update));
}

#[test]
fn matcher_user() {
    let s = set(&one(
        "on = \"command\"\nuser = '^archive@'\naction = \"trace\"",
    ));
    let as_user = |u| {
        s.evaluate(&Event {
            user: u,
            ..cmd(Verb::Dele, b"1")
        })
        .trace
    };
    assert!(as_user(Some("archive@example.org")));
    assert!(!as_user(Some("bob@example.org")));
    // Unknown user: a user matcher never holds.
    assert!(!as_user(None));
}

#[test]
fn matcher_verbs_and_index() {
    let s = set(
        "[[rule]]\nname = \"dele\"\non = \"command\"\nverbs = [\"dele\", \"RETR\"]\naction = \"tag\"\ntags = [\"a\"]\n\
         [[rule]]\nname = \"any\"\non = \"command\"\naction = \"tag\"\ntags = [\"b\"]\n\
         [[rule]]\nname = \"unknown\"\non = \"command\"\nverbs = \"UNKNOWN\"\naction = \"deny\"\n",
    );
    assert_eq!(names(&s.evaluate(&cmd(Verb::Dele, b"1"))), ["dele", "any"]);
    assert_eq!(names(&s.evaluate(&cmd(Verb::Retr, b"1"))), ["dele", "any"]);
    assert_eq!(names(&s.evaluate(&cmd(Verb::Noop, b""))), ["any"]);
    assert_eq!(
        names(&s.evaluate(&cmd(Verb::Unknown, b""))),
        ["any", "unknown"]
    );
    // Verb-less command events (should not happen) only see verb-less rules.
    let none = Event {
        verb: None,
        ..cmd(Verb::Noop, b"")
    };
    assert_eq!(names(&s.evaluate(&none)), ["any"]);
}

#[test]
fn verb_slots_are_distinct() {
    let mut seen = std::collections::HashSet::new();
    for v in Verb::ALL.iter().copied().chain([Verb::Unknown]) {
        let slot = v as usize;
        assert!(slot < Verb::ALL.len() + 1, "{v}");
        assert!(seen.insert(slot), "{v}");
    }
}

#[test]
fn matcher_args() {
    let s = set(&one(
        "on = \"command\"\nverbs = [\"TOP\"]\nargs = '^\\d+ 0$'\naction = \"deny\"",
    ));
    assert!(!s.evaluate(&cmd(Verb::Top, b"1 0")).passes());
    assert!(s.evaluate(&cmd(Verb::Top, b"1 10")).passes());
    // Bytes, not UTF-8: arguments need not be valid text.
    let s = set(&one(
        "on = \"command\"\nargs = '(?-u)\\xff'\naction = \"deny\"",
    ));
    assert!(!s.evaluate(&cmd(Verb::User, b"a\xffb")).passes());
}

#[test]
fn matcher_status_text_answers() {
    let s = set(&one(
        "on = \"response\"\nanswers = [\"RETR\"]\nstatus = \"err\"\ntext = '(?i)no such message'\naction = \"log\"\nmessage = \"{verb} failed: {text}\"",
    ));
    let v = s.evaluate(&resp(Verb::Retr, b"-ERR no such message"));
    assert_eq!(
        logs(&v),
        vec![(Level::INFO, "RETR failed: -ERR no such message".to_string())]
    );
    assert_eq!(&*v.logs[0].rule, "r", "the line names its rule");
    assert!(
        s.evaluate(&resp(Verb::Retr, b"+OK no such message"))
            .logs
            .is_empty()
    );
    assert!(
        s.evaluate(&resp(Verb::Dele, b"-ERR no such message"))
            .logs
            .is_empty()
    );
    assert!(
        s.evaluate(&resp(Verb::Retr, b"-ERR locked"))
            .logs
            .is_empty()
    );
    let s = set(&one(
        "on = \"response\"\nstatus = \"continue\"\naction = \"trace\"",
    ));
    assert!(s.evaluate(&resp(Verb::Auth, b"+ ")).trace);
    assert!(!s.evaluate(&resp(Verb::Auth, b"+OK")).trace);
}

#[test]
fn matcher_login() {
    let s = set(&one(
        "on = \"login\"\nstatus = \"err\"\nverbs = [\"PASS\"]\nuser = \"^admin$\"\naction = \"delay\"\ndelay = \"3s\"",
    ));
    let login = |status, user| Event {
        status: Some(status),
        user,
        verb: Some(Verb::Pass),
        ..base(EventKind::Login)
    };
    assert_eq!(
        s.evaluate(&login(Status::Err, Some("admin"))).delay,
        Some(Duration::from_secs(3))
    );
    assert_eq!(s.evaluate(&login(Status::Ok, Some("admin"))).delay, None);
    assert_eq!(s.evaluate(&login(Status::Err, Some("bob"))).delay, None);
}

// ---------------------------------------------------------------- actions

#[test]
fn action_allow_stops() {
    let s = set(
        "[[rule]]\nname = \"ok-lan\"\non = \"command\"\nclient = \"192.0.2.0/24\"\naction = \"allow\"\n\
         [[rule]]\nname = \"no\"\non = \"command\"\naction = \"deny\"\n",
    );
    let v = s.evaluate(&cmd(Verb::Pass, b"x"));
    assert_eq!(
        v.outcome,
        RuleOutcome::Allow {
            rule: Arc::from("ok-lan")
        }
    );
    assert_eq!(names(&v), ["ok-lan"]);
    assert!(v.passes());
    let v = s.evaluate(&Event {
        client: ip("198.51.100.1"),
        ..cmd(Verb::Pass, b"x")
    });
    assert!(!v.passes());
}

#[test]
fn action_deny_reply() {
    let s = set(&one(
        "on = \"command\"\nverbs = \"DELE\"\naction = \"deny\"\nmessage = \"read-only\"\ncode = \"SYS/PERM\"\nclose_after = 3",
    ));
    assert_eq!(
        s.evaluate(&cmd(Verb::Dele, b"1")).outcome,
        RuleOutcome::Deny {
            reply: "-ERR [SYS/PERM] read-only".into(),
            rule: Arc::from("r"),
            close_after: Some(3)
        }
    );
    let s = set(&one("on = \"command\"\naction = \"deny\""));
    let RuleOutcome::Deny {
        reply, close_after, ..
    } = s.evaluate(&cmd(Verb::Noop, b"")).outcome
    else {
        panic!()
    };
    assert_eq!(reply, "-ERR command not allowed by policy");
    assert_eq!(close_after, None);
    let s = set(&one(
        "on = \"connect\"\naction = \"deny\"\ncode = \"SYS/PERM\"",
    ));
    let RuleOutcome::Deny { reply, .. } = s.evaluate(&base(EventKind::Connect)).outcome else {
        panic!()
    };
    assert_eq!(reply, "-ERR [SYS/PERM] connection not allowed by policy");
}

#[test]
fn action_drop_and_trace_and_delay() {
    let s = set(
        "[[rule]]\nname = \"slow\"\non = \"command\"\naction = \"delay\"\ndelay = \"1s\"\n\
         [[rule]]\nname = \"slower\"\non = \"command\"\naction = \"delay\"\ndelay = \"500ms\"\n\
         [[rule]]\nname = \"watch\"\non = \"command\"\naction = \"trace\"\n\
         [[rule]]\nname = \"bye\"\non = \"command\"\nverbs = \"QUIT\"\naction = \"drop\"\n",
    );
    let v = s.evaluate(&cmd(Verb::Noop, b""));
    assert_eq!(v.delay, Some(Duration::from_millis(1500)));
    assert!(v.trace);
    assert_eq!(v.outcome, RuleOutcome::Continue);
    let v = s.evaluate(&cmd(Verb::Quit, b""));
    assert_eq!(
        v.outcome,
        RuleOutcome::Drop {
            rule: Arc::from("bye")
        }
    );
    assert!(!v.passes());
    assert_eq!(names(&v), ["slow", "slower", "watch", "bye"]);
}

#[test]
fn action_log_levels_and_tags() {
    let s = set(
        "[[rule]]\nname = \"l1\"\non = \"command\"\naction = \"log\"\nlevel = \"warn\"\nmessage = \"{user} did {command} via {listener} from {client} [{rule}]\"\n\
         [[rule]]\nname = \"t1\"\non = \"command\"\naction = \"tag\"\ntags = [\"audit\", \"vip\"]\n\
         [[rule]]\nname = \"t2\"\non = \"command\"\naction = \"tag\"\ntags = \"audit\"\n\
         [[rule]]\nname = \"l2\"\non = \"command\"\naction = \"log\"\nlevel = \"DEBUG\"\nmessage = \"second\"\n",
    );
    let v = s.evaluate(&Event {
        user: Some("bob"),
        ..cmd(Verb::Retr, b"4")
    });
    assert_eq!(
        logs(&v),
        vec![
            (
                Level::WARN,
                "bob did RETR 4 via pop3 from 192.0.2.10 [l1]".to_string()
            ),
            (Level::DEBUG, "second".to_string())
        ]
    );
    assert_eq!(v.tags, vec![Arc::<str>::from("audit"), Arc::from("vip")]);
    // Secrets never reach a log line.
    let v = s.evaluate(&cmd(Verb::Pass, b"hunter2"));
    assert_eq!(
        v.logs[0].message,
        "- did PASS *** via pop3 from 192.0.2.10 [l1]"
    );
}

#[test]
fn terminal_and_non_terminal_order() {
    let s = set(
        "[[rule]]\nname = \"before\"\non = \"command\"\naction = \"log\"\nmessage = \"b\"\n\
         [[rule]]\nname = \"deny\"\non = \"command\"\nverbs = \"DELE\"\naction = \"deny\"\n\
         [[rule]]\nname = \"after\"\non = \"command\"\naction = \"log\"\nmessage = \"a\"\n",
    );
    let v = s.evaluate(&cmd(Verb::Dele, b"1"));
    assert_eq!(names(&v), ["before", "deny"]);
    assert_eq!(v.logs.len(), 1);
    let v = s.evaluate(&cmd(Verb::Retr, b"1"));
    assert_eq!(names(&v), ["before", "after"]);
    assert_eq!(v.logs.len(), 2);
}

// ---------------------------------------------------------------- rewrites

#[test]
fn rewrite_command_args_chain_on_original_matchers() {
    let s = set(
        "[[rule]]\nname = \"lower\"\non = \"command\"\nverbs = \"USER\"\naction = \"rewrite\"\nreplace = '@EXAMPLE\\.ORG$'\nwith = \"@example.org\"\n\
         [[rule]]\nname = \"domain\"\non = \"command\"\nverbs = \"USER\"\nargs = '@EXAMPLE\\.ORG$'\naction = \"rewrite\"\nreplace = '@example\\.org$'\nwith = \"@mail.example.org\"\n\
         [[rule]]\nname = \"never\"\non = \"command\"\nverbs = \"USER\"\nargs = '@example\\.org$'\naction = \"rewrite\"\nwith = \"nobody\"\n",
    );
    // `domain` matches the original args and rewrites the output of `lower`; `never` matches
    // the original (upper-case) args only, so it does not fire although the chain now ends
    // in "@example.org".
    let v = s.evaluate(&cmd(Verb::User, b"bob@EXAMPLE.ORG"));
    assert_eq!(names(&v), ["lower", "domain"]);
    assert_eq!(v.rewritten.as_deref(), Some(&b"bob@mail.example.org"[..]));
    assert_eq!(
        command_line(b"user", v.rewritten.as_deref().unwrap()),
        b"user bob@mail.example.org\r\n"
    );
    assert_eq!(command_line(b"STAT", b""), b"STAT\r\n");
    // A rewrite to the same bytes is no rewrite.
    let v = s.evaluate(&cmd(Verb::User, b"carol"));
    assert_eq!(v.rewritten, None);
}

#[test]
fn rewrite_response_keeps_status() {
    let s = set(
        "[[rule]]\nname = \"hide\"\non = \"response\"\nanswers = \"RETR\"\naction = \"rewrite\"\nreplace = '^\\+OK.*$'\nwith = \"+OK message follows\"\n\
         [[rule]]\nname = \"flip\"\non = \"response\"\naction = \"rewrite\"\nwith = \"-ERR nope\"\n",
    );
    let v = s.evaluate(&resp(Verb::Retr, b"+OK 1200 octets"));
    assert_eq!(v.rewritten.as_deref(), Some(&b"+OK message follows"[..]));
    // The second rewrite would turn +OK into -ERR and so change whether a body follows.
    assert_eq!(v.logs.len(), 1);
    assert_eq!(v.logs[0].level, Level::WARN);
    assert!(
        v.logs[0].message.contains("rule `flip`: rewrite ignored"),
        "{:?}",
        v.logs
    );
    // On a -ERR line the same rewrite is fine.
    let v = s.evaluate(&resp(Verb::Dele, b"-ERR no such message"));
    assert_eq!(v.rewritten.as_deref(), Some(&b"-ERR nope"[..]));
}

#[test]
fn rewrite_greeting_keeps_apop_timestamp() {
    let s = set(&one(
        "on = \"greeting\"\naction = \"rewrite\"\nwith = \"+OK ready\"",
    ));
    let v = s.evaluate(&greeting(b"+OK Dovecot (Debian) ready. <123.456@host>"));
    assert_eq!(
        v.rewritten.as_deref(),
        Some(&b"+OK ready <123.456@host>"[..])
    );
    let v = s.evaluate(&greeting(b"+OK Dovecot ready."));
    assert_eq!(v.rewritten.as_deref(), Some(&b"+OK ready"[..]));
    let s = set(&one(
        "on = \"greeting\"\naction = \"rewrite\"\nwith = \"+OK ready\"\nkeep_apop = false",
    ));
    let v = s.evaluate(&greeting(b"+OK Dovecot ready. <123.456@host>"));
    assert_eq!(v.rewritten.as_deref(), Some(&b"+OK ready"[..]));
}

#[test]
fn rewrite_capa_items() {
    let s = set(
        "[[rule]]\nname = \"sasl\"\non = \"capa\"\ntext = '(?i)^SASL '\naction = \"rewrite\"\nreplace = '(?i) (PLAIN|LOGIN)\\b'\nwith = \"\"\n\
         [[rule]]\nname = \"sasl-empty\"\non = \"capa\"\ntext = '(?i)^SASL '\naction = \"rewrite\"\nreplace = '(?i)^SASL\\s*$'\nwith = \"\"\n\
         [[rule]]\nname = \"user\"\non = \"capa\"\ntext = '(?i)^USER$'\naction = \"rewrite\"\nremove = true\n\
         [[rule]]\nname = \"add\"\non = \"capa\"\naction = \"rewrite\"\nadd = [\"X-POPGATE\", \"ID\"]\n\
         [[rule]]\nname = \"add2\"\non = \"capa\"\naction = \"rewrite\"\nadd = \"X-POPGATE\"\n\
         [[rule]]\nname = \"log\"\non = \"capa\"\naction = \"log\"\nmessage = \"{text}\"\n",
    );
    let v = s.evaluate(&capa(Some(b"SASL PLAIN LOGIN CRAM-MD5")));
    assert_eq!(v.rewritten.as_deref(), Some(&b"SASL CRAM-MD5"[..]));
    assert!(!v.remove);
    let v = s.evaluate(&capa(Some(b"SASL PLAIN LOGIN")));
    assert!(v.remove);
    assert_eq!(v.rewritten, None);
    let v = s.evaluate(&capa(Some(b"USER")));
    assert!(v.remove);
    let v = s.evaluate(&capa(Some(b"TOP")));
    assert!(!v.remove);
    assert_eq!(v.rewritten, None);
    assert_eq!(names(&v), ["log"]);
    // `add` rules run only at the end of the list; item rules only on items.
    let v = s.evaluate(&capa(None));
    assert_eq!(names(&v), ["add", "add2"]);
    assert_eq!(v.add_capa, vec!["X-POPGATE".to_string(), "ID".to_string()]);
    assert!(v.logs.is_empty());
}

#[test]
fn rewrite_with_captures() {
    let s = set(&one(
        "on = \"command\"\nverbs = \"USER\"\naction = \"rewrite\"\nreplace = '^([^@]+)@old\\.example$'\nwith = '${1}@new.example'",
    ));
    let v = s.evaluate(&cmd(Verb::User, b"bob@old.example"));
    assert_eq!(v.rewritten.as_deref(), Some(&b"bob@new.example"[..]));
}

#[test]
fn deny_and_drop_discard_rewrites() {
    let s = set(
        "[[rule]]\nname = \"rw\"\non = \"command\"\naction = \"rewrite\"\nwith = \"x\"\n\
         [[rule]]\nname = \"no\"\non = \"command\"\nverbs = \"DELE\"\naction = \"deny\"\n",
    );
    let v = s.evaluate(&cmd(Verb::Dele, b"1"));
    assert!(!v.passes());
    assert_eq!(v.rewritten, None);
    assert_eq!(
        s.evaluate(&cmd(Verb::Retr, b"1")).rewritten.as_deref(),
        Some(&b"x"[..])
    );
}

#[test]
fn sasl_continuation_lines_are_never_denied_or_rewritten() {
    let s = set(
        "[[rule]]\nname = \"log\"\non = \"command\"\nverbs = \"AUTH\"\naction = \"log\"\nmessage = \"{command}\"\n\
         [[rule]]\nname = \"args\"\non = \"command\"\nargs = '.*'\naction = \"tag\"\ntags = \"t\"\n\
         [[rule]]\nname = \"rw\"\non = \"command\"\naction = \"rewrite\"\nwith = \"x\"\n\
         [[rule]]\nname = \"deny\"\non = \"command\"\naction = \"deny\"\n",
    );
    let line = Event {
        args: None,
        ..cmd(Verb::Auth, b"")
    };
    let v = s.evaluate(&line);
    assert_eq!(names(&v), ["log"]);
    assert_eq!(v.logs[0].message, "AUTH ***");
    assert!(v.passes());
    assert_eq!(v.rewritten, None);
}

// ---------------------------------------------------------------- errors

#[track_caller]
fn assert_err(text: &str, parts: &[&str]) {
    let msg = err(text);
    for p in parts {
        assert!(msg.contains(p), "`{p}` not in: {msg}");
    }
}

#[test]
fn errors_name_file_rule_and_reason() {
    let r = "rule `r` (#1)";
    assert_err(
        &one("on = \"command\"\naction = \"deny\"\nverb = \"DELE\""),
        &[r, "unknown key `verb`", "did you mean `verbs`"],
    );
    assert_err(
        "[[rule]]\non = \"command\"\naction = \"deny\"",
        &["rule #1", "missing key `name`"],
    );
    assert_err(&one("action = \"deny\""), &[r, "missing key `on`"]);
    assert_err(&one("on = \"command\""), &[r, "missing key `action`"]);
    assert_err(&one("on = \"comand\"\naction = \"deny\""), &[r, "comand"]);
    assert_err(
        &one("on = \"command\"\naction = \"rewite\""),
        &[r, "rewite"],
    );
    assert_err(
        &one("on = \"command\"\ntls = \"no\"\naction = \"deny\""),
        &[r, "invalid type"],
    );
    assert_err(
        &one("on = \"command\"\nargs = '(unclosed'\naction = \"deny\""),
        &[r, "bad regex in `args`", "unclosed group"],
    );
    assert_err(
        &one("on = \"command\"\nuser = '['\naction = \"deny\""),
        &[r, "bad regex in `user`"],
    );
    assert_err(
        &one("on = \"response\"\ntext = '*'\naction = \"trace\""),
        &[r, "bad regex in `text`"],
    );
    assert_err(
        &one("on = \"command\"\naction = \"rewrite\"\nreplace = '('\nwith = \"\""),
        &[r, "bad regex in `replace`"],
    );
    assert_err(
        &one("on = \"connect\"\nclient = [\"10.0.0.1/8\"]\naction = \"drop\""),
        &[r, "bad CIDR `10.0.0.1/8`", "host bits"],
    );
    assert_err(
        &one("on = \"connect\"\nclient = \"300.0.0.0/8\"\naction = \"drop\""),
        &[r, "bad CIDR", "not an IP address"],
    );
    assert_err(
        &one("on = \"connect\"\naction = \"rewrite\"\nwith = \"x\""),
        &[r, "action `rewrite` is not possible on `connect` events"],
    );
    assert_err(
        &one("on = \"close\"\naction = \"deny\""),
        &[r, "action `deny` is not possible on `close` events"],
    );
    assert_err(
        &one("on = \"close\"\naction = \"drop\""),
        &[r, "`drop` is not possible on `close`"],
    );
    assert_err(
        &one("on = \"response\"\naction = \"deny\""),
        &[
            r,
            "`deny` is not possible on `response`",
            "rewrite the line",
        ],
    );
    assert_err(
        &one("on = \"login\"\naction = \"deny\""),
        &[r, "`deny` is not possible on `login`"],
    );
    assert_err(
        &one("on = \"greeting\"\naction = \"deny\""),
        &[r, "`deny` is not possible on `greeting`"],
    );
    assert_err(
        &one("on = \"login\"\naction = \"rewrite\"\nwith = \"x\""),
        &[r, "`rewrite` is not possible on `login`"],
    );
    assert_err(
        &one("on = \"response\"\nargs = 'x'\naction = \"trace\""),
        &[r, "matcher `args` cannot be used on `response`"],
    );
    assert_err(
        &one("on = \"connect\"\nuser = 'x'\naction = \"drop\""),
        &[r, "matcher `user` cannot be used on `connect`"],
    );
    assert_err(
        &one("on = \"response\"\nverbs = \"RETR\"\naction = \"trace\""),
        &[r, "matcher `verbs`", "use `answers`"],
    );
    assert_err(
        &one("on = \"command\"\nanswers = \"RETR\"\naction = \"trace\""),
        &[r, "matcher `answers`", "use `verbs`"],
    );
    assert_err(
        &one("on = \"command\"\ntext = 'x'\naction = \"trace\""),
        &[r, "matcher `text`", "use `args`"],
    );
    assert_err(
        &one("on = \"capa\"\nstatus = \"ok\"\naction = \"trace\""),
        &[r, "matcher `status`"],
    );
    assert_err(
        &one("on = \"command\"\naction = \"tag\"\ntags = \"x\"\nmessage = \"m\""),
        &[r, "key `message` has no meaning for action `tag`"],
    );
    assert_err(
        &one("on = \"command\"\naction = \"log\"\nmessage = \"m\"\ncode = \"AUTH\""),
        &[r, "key `code` has no meaning for action `log`"],
    );
    assert_err(
        &one("on = \"command\"\naction = \"log\""),
        &[r, "missing key `message`"],
    );
    assert_err(
        &one("on = \"command\"\naction = \"log\"\nmessage = \"{password}\""),
        &[r, "bad `message` template", "unknown field `{password}`"],
    );
    assert_err(
        &one("on = \"command\"\naction = \"log\"\nmessage = \"m\"\nlevel = \"loud\""),
        &[r, "unknown level `loud`"],
    );
    assert_err(
        &one("on = \"command\"\naction = \"deny\"\ncode = \"[AUTH]\""),
        &[r, "`code`", "without brackets"],
    );
    assert_err(
        &one("on = \"command\"\naction = \"deny\"\nmessage = \"a\\r\\nb\""),
        &[r, "`message`", "line breaks"],
    );
    assert_err(
        &one("on = \"command\"\naction = \"deny\"\nclose_after = 0"),
        &[r, "`close_after`", "at least 1"],
    );
    assert_err(
        &one("on = \"connect\"\naction = \"deny\"\nclose_after = 2"),
        &[r, "`close_after`", "only for deny on command"],
    );
    assert_err(
        &one("on = \"command\"\naction = \"delay\""),
        &[r, "missing key `delay`"],
    );
    assert_err(
        &one("on = \"command\"\naction = \"delay\"\ndelay = \"1h\""),
        &[r, "`delay`", "at most 10m"],
    );
    assert_err(
        &one("on = \"command\"\naction = \"delay\"\ndelay = \"soon\""),
        &[r, "soon"],
    );
    assert_err(
        &one("on = \"command\"\naction = \"tag\""),
        &[r, "missing key `tags`"],
    );
    assert_err(
        &one("on = \"command\"\naction = \"tag\"\ntags = [\"a b\"]"),
        &[r, "`tags`"],
    );
    assert_err(
        &one("on = \"command\"\nverbs = [\"DEL\"]\naction = \"deny\""),
        &[r, "unknown verb `DEL`"],
    );
    assert_err(
        &one("on = \"command\"\nverbs = []\naction = \"deny\""),
        &[r, "`verbs`", "empty list"],
    );
    assert_err(
        &one("on = \"login\"\nverbs = \"RETR\"\naction = \"trace\""),
        &[r, "PASS, APOP or AUTH"],
    );
    assert_err(
        &one("on = \"command\"\nstate = \"logged-in\"\naction = \"deny\""),
        &[r, "unknown state `logged-in`"],
    );
    assert_err(
        &one("on = \"response\"\nstatus = \"fine\"\naction = \"trace\""),
        &[r, "unknown status `fine`"],
    );
    assert_err(
        &one("on = \"login\"\nstatus = \"continue\"\naction = \"trace\""),
        &[r, "`continue`"],
    );
    assert_err(
        &one("on = \"command\"\naction = \"rewrite\""),
        &[r, "needs `with`"],
    );
    assert_err(
        &one("on = \"command\"\naction = \"rewrite\"\nreplace = 'x'"),
        &[r, "missing key `with`"],
    );
    assert_err(
        &one("on = \"command\"\naction = \"rewrite\"\nwith = \"a\\nb\""),
        &[r, "`with`", "line breaks"],
    );
    assert_err(
        &one("on = \"response\"\naction = \"rewrite\"\nremove = true"),
        &[r, "only CAPA items can be removed"],
    );
    assert_err(
        &one("on = \"capa\"\naction = \"rewrite\"\nremove = false"),
        &[r, "does nothing"],
    );
    assert_err(
        &one("on = \"capa\"\naction = \"rewrite\"\nremove = true\nwith = \"x\""),
        &[r, "does one thing"],
    );
    assert_err(
        &one("on = \"capa\"\ntext = 'x'\naction = \"rewrite\"\nadd = \"X\""),
        &[r, "`add`", "end of the CAPA list"],
    );
    assert_err(
        &one("on = \"command\"\naction = \"rewrite\"\nadd = \"X\""),
        &[r, "`add`"],
    );
    assert_err(
        &one("on = \"response\"\naction = \"rewrite\"\nwith = \"+OK\"\nkeep_apop = true"),
        &[r, "`keep_apop`"],
    );
    assert_err(
        "[[rule]]\nname = \" \"\non = \"command\"\naction = \"deny\"",
        &["`name`", "must not be empty"],
    );
    assert_err(
        "[[rule]]\nname = \"a\"\non = \"close\"\naction = \"tag\"\ntags = \"x\"\n[[rule]]\nname = \"a\"\non = \"close\"\naction = \"tag\"\ntags = \"x\"\n",
        &["rule `a` (#2)", "duplicate rule name"],
    );
}

#[test]
fn file_level_errors() {
    assert_err("[[rule]\nname = 1", &["TOML parse error", "line 1"]);
    assert_err("[rule]\nname = \"x\"", &["[[rule]] tables"]);
    assert_err("rules = []", &["unknown top-level key `rules`"]);
    assert_err("rule = [1]", &["[[rule]] tables"]);
}

#[test]
fn duplicate_names_across_files() {
    let tmp = tempfile::tempdir().unwrap();
    let r = "[[rule]]\nname = \"same\"\non = \"close\"\naction = \"tag\"\ntags = \"x\"\n";
    std::fs::write(tmp.path().join("a.toml"), r).unwrap();
    std::fs::write(tmp.path().join("b.toml"), r).unwrap();
    let e = RuleSet::load(&["*.toml".into()], tmp.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("b.toml: rule `same` (#1): duplicate rule name (also used in"),
        "{e}"
    );
    assert!(e.contains("a.toml)"), "{e}");
}

#[test]
fn load_order_and_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rules");
    std::fs::create_dir(&dir).unwrap();
    let rule = |n: &str| {
        format!("[[rule]]\nname = \"{n}\"\non = \"command\"\naction = \"tag\"\ntags = \"{n}\"\n")
    };
    std::fs::write(dir.join("20-b.toml"), rule("b")).unwrap();
    std::fs::write(dir.join("10-a.toml"), rule("a")).unwrap();
    std::fs::write(tmp.path().join("first.toml"), rule("first")).unwrap();
    std::fs::write(dir.join("empty.toml"), "# nothing\n").unwrap();
    let s = RuleSet::load(&["first.toml".into(), "rules/*.toml".into()], tmp.path()).unwrap();
    assert_eq!(s.len(), 3);
    assert_eq!(s.files().len(), 4);
    assert_eq!(s.files()[1], dir.join("10-a.toml"));
    let v = s.evaluate(&cmd(Verb::Noop, b""));
    assert_eq!(names(&v), ["first", "a", "b"]);
    let infos: Vec<_> = s.rules().map(|r| (r.name, r.on, r.action)).collect();
    assert_eq!(infos[0], ("first", EventKind::Command, RuleAction::Tag));
    assert!(s.has_rules_for(EventKind::Command));
    assert!(!s.has_rules_for(EventKind::Capa));
    assert!(format!("{s:?}").contains("first (command → tag)"));
    // An unreadable file names itself.
    std::fs::write(dir.join("bad.toml"), [0xff, 0xfe]).unwrap();
    let e = RuleSet::load(&["rules/*.toml".into()], tmp.path()).unwrap_err();
    assert!(matches!(e, RuleError::Io { .. }), "{e}");
    assert!(e.to_string().contains("bad.toml"), "{e}");
}

#[test]
fn rule_set_is_shareable() {
    fn check<T: Send + Sync + 'static>() {}
    check::<RuleSet>();
    check::<Verdict>();
}

#[test]
fn regex_sets_agree_with_single_regexes() {
    let patterns = [
        "^bob$",
        "(?i)^BOB@",
        "example\\.org$",
        "^a",
        "ü",
        "(?-u)\\xff",
        "^(ceo|cfo)@",
        "",
        "x{3}",
        "^$",
    ];
    let mut text = String::new();
    for (i, p) in patterns.iter().enumerate() {
        text.push_str(&format!(
            "[[rule]]\nname = \"u{i}\"\non = \"command\"\nuser = '{p}'\naction = \"tag\"\ntags = \"u{i}\"\n\
             [[rule]]\nname = \"a{i}\"\non = \"command\"\nverbs = \"USER\"\nargs = '{p}'\naction = \"tag\"\ntags = \"a{i}\"\n"
        ));
    }
    let s = set(&text);
    let users: [&[u8]; 8] = [
        b"bob",
        b"BOB@x",
        b"ceo@example.org",
        b"alice",
        "jürgen".as_bytes(),
        b"\xff",
        b"xxx",
        b"",
    ];
    for value in users {
        let user = std::str::from_utf8(value).ok();
        let ev = Event {
            user,
            ..cmd(Verb::User, value)
        };
        let v = s.evaluate(&ev);
        let mut want = Vec::new();
        for (i, p) in patterns.iter().enumerate() {
            let re = regex::bytes::Regex::new(p).unwrap();
            if user.is_some_and(|u| re.is_match(u.as_bytes())) {
                want.push(format!("u{i}"));
            }
        }
        for (i, p) in patterns.iter().enumerate() {
            if regex::bytes::Regex::new(p).unwrap().is_match(value) {
                want.push(format!("a{i}"));
            }
        }
        let mut got: Vec<String> = v.tags.iter().map(|t| t.to_string()).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{:?}", String::from_utf8_lossy(value));
    }
}

mod props {
    use super::*;
    use proptest::prelude::*;

    const RULES: &str = r#"
[[rule]]
name = "args"
on = "command"
action = "rewrite"
replace = '(?-u)(.)'
with = '${1}$1'
[[rule]]
name = "args2"
on = "command"
args = 'a'
action = "rewrite"
with = "zz"
[[rule]]
name = "line"
on = "response"
action = "rewrite"
replace = '(?-u)^.{0,4}'
with = "-ERR "
[[rule]]
name = "line2"
on = "response"
action = "rewrite"
replace = '(?-u)[a-z]+'
with = "x"
[[rule]]
name = "greet"
on = "greeting"
action = "rewrite"
replace = '(?-u).*'
with = "+OK hi"
[[rule]]
name = "item"
on = "capa"
action = "rewrite"
replace = '(?-u)\s'
with = ""
[[rule]]
name = "log"
on = "command"
action = "log"
message = "{command} {user} {text}"
"#;

    proptest! {
        /// Whatever the bytes, a verdict never injects a line and never flips a status line.
        #[test]
        fn rewrites_never_break_framing(
            bytes in proptest::collection::vec(any::<u8>(), 0..40),
            kind in 0usize..4,
        ) {
            let s = set(RULES);
            let clean: Vec<u8> = bytes.iter().copied().filter(|b| !b"\r\n".contains(b)).collect();
            let mut line = b"+OK ".to_vec();
            line.extend_from_slice(&clean);
            let ev = match kind {
                0 => cmd(Verb::Retr, &[]),
                1 => base(EventKind::Response),
                2 => base(EventKind::Greeting),
                _ => base(EventKind::Capa),
            };
            let ev = match kind {
                0 => Event { args: Some(&clean), ..ev },
                1 | 2 => Event { text: Some(&line), status: Some(Status::Ok), ..ev },
                _ => Event { text: Some(&clean), ..ev },
            };
            let v = s.evaluate(&ev);
            if let Some(new) = &v.rewritten {
                prop_assert!(!new.contains(&b'\r') && !new.contains(&b'\n') && !new.contains(&0));
                if kind == 1 || kind == 2 {
                    prop_assert!(new.starts_with(b"+OK"), "{:?}", String::from_utf8_lossy(new));
                }
            }
            for log in &v.logs {
                prop_assert!(!log.message.contains('\r') && !log.message.contains('\n'));
            }
        }
    }
}

#[test]
fn size_matcher_compares_the_stated_size() {
    let s = set(
        "[[rule]]\nname = \"big\"\non = \"response\"\nsize = \"> 10k\"\naction = \"tag\"\ntags = \"big\"\n\
         [[rule]]\nname = \"small-list\"\non = \"response\"\nanswers = \"LIST\"\nsize = \"<= 100\"\naction = \"tag\"\ntags = \"small\"\n",
    );
    let sized = |verb, line, size| Event {
        size,
        ..resp(verb, line)
    };
    let tags = |ev: &Event<'_>| s.evaluate(ev).tags;
    let big: Vec<Arc<str>> = vec![Arc::from("big")];
    assert_eq!(
        tags(&sized(Verb::Retr, b"+OK 20000 octets", Some(20_000))),
        big
    );
    assert_eq!(
        tags(&sized(Verb::Top, b"+OK 10241 octets", Some(10_241))),
        big
    );
    assert!(tags(&sized(Verb::Retr, b"+OK 10240 octets", Some(10_240))).is_empty());
    // No size stated: no match, whatever the line says.
    assert!(tags(&sized(Verb::Retr, b"+OK message follows", None)).is_empty());
    assert!(tags(&sized(Verb::Retr, b"-ERR no such message", None)).is_empty());
    // Only RETR, TOP and LIST responses are candidates.
    assert!(tags(&sized(Verb::Stat, b"+OK 2 20000", Some(20_000))).is_empty());
    assert_eq!(
        tags(&sized(Verb::List, b"+OK 1 50", Some(50))),
        vec![Arc::<str>::from("small")]
    );
}

#[test]
fn tag_scope() {
    let s = set(
        "[[rule]]\nname = \"e\"\non = \"command\"\naction = \"tag\"\ntags = \"ev\"\n\
         [[rule]]\nname = \"x\"\non = \"command\"\naction = \"tag\"\ntags = \"ex\"\nscope = \"event\"\n\
         [[rule]]\nname = \"s\"\non = \"command\"\naction = \"tag\"\ntags = [\"se\", \"ev\"]\nscope = \"session\"\n\
         [[rule]]\nname = \"g\"\non = \"greeting\"\naction = \"tag\"\ntags = \"hello\"\nscope = \"session\"\n",
    );
    let v = s.evaluate(&cmd(Verb::Retr, b"1"));
    assert_eq!(v.tags, vec![Arc::<str>::from("ev"), Arc::from("ex")]);
    assert_eq!(
        v.session_tags,
        vec![Arc::<str>::from("se"), Arc::from("ev")]
    );
    let v = s.evaluate(&greeting(b"+OK hi"));
    assert!(v.tags.is_empty());
    assert_eq!(v.session_tags, vec![Arc::<str>::from("hello")]);
}

#[test]
fn size_and_scope_errors() {
    let r = "rule `r` (#1)";
    assert_err(
        &one("on = \"command\"\nsize = \"> 1\"\naction = \"trace\""),
        &[r, "matcher `size`", "RETR, TOP or LIST response"],
    );
    assert_err(
        &one(
            "on = \"response\"\nanswers = [\"RETR\", \"DELE\"]\nsize = \"> 1\"\naction = \"trace\"",
        ),
        &[r, "`size`", "limit `answers`"],
    );
    for (bad, why) in [
        ("10MB", "start with"),
        ("> ", "whole number"),
        ("> 5 parsecs", "unknown unit"),
        ("> 99999999999999999999", "too large"),
    ] {
        assert_err(
            &one(&format!(
                "on = \"response\"\nsize = \"{bad}\"\naction = \"trace\""
            )),
            &[r, "`size`", why],
        );
    }
    assert_err(
        &one("on = \"command\"\naction = \"log\"\nmessage = \"m\"\nscope = \"session\""),
        &[r, "key `scope` has no meaning for action `log`"],
    );
    assert_err(
        &one("on = \"command\"\naction = \"tag\"\ntags = \"t\"\nscope = \"forever\""),
        &[r, "unknown scope `forever`"],
    );
    for on in ["greeting", "capa"] {
        assert_err(
            &one(&format!("on = \"{on}\"\naction = \"tag\"\ntags = \"t\"")),
            &[r, "`scope`", "no audit record of their own"],
        );
    }
}

#[test]
fn route_rules_are_chosen_apart_and_the_first_that_holds_wins() {
    let s = set(r#"
        [[rule]]
        name = "staff"
        on = "command"
        user = "@staff\\.example$"
        action = "route"
        upstream = "new"
        [[rule]]
        name = "lan"
        on = "command"
        client = "192.0.2.0/24"
        action = "route"
        upstream = "old"
        [[rule]]
        name = "log-user"
        on = "command"
        verbs = "USER"
        action = "log"
        message = "user"
    "#);
    let login = |user: &'static str| Event {
        user: Some(user),
        ..cmd(Verb::User, user.as_bytes())
    };
    let pick = |user| {
        s.route(&login(user))
            .map(|(r, u)| (r.to_string(), u.to_string()))
    };
    assert_eq!(
        pick("a@staff.example"),
        Some(("staff".into(), "new".into()))
    );
    assert_eq!(pick("b@example.org"), Some(("lan".into(), "old".into())));
    let far = Event {
        client: ip("203.0.113.9"),
        ..login("b@example.org")
    };
    assert_eq!(s.route(&far), None);
    // The ordinary evaluation never applies (or counts) a route rule.
    let v = s.evaluate(&login("a@staff.example"));
    assert_eq!(v.matched, vec![Arc::<str>::from("log-user")]);
    assert_eq!(
        s.routes().collect::<Vec<_>>(),
        [("staff", "new"), ("lan", "old")]
    );
    // Errors: no upstream, a bad name, another event.
    let rule = |extra: &str| format!("[[rule]]\nname = \"r\"\naction = \"route\"\n{extra}");
    assert!(err(&rule("on = \"command\"\n")).contains("upstream"));
    assert!(err(&rule("on = \"command\"\nupstream = \"a b\"\n")).contains("upstream"));
    assert!(err(&rule("on = \"login\"\nupstream = \"x\"\n")).contains("route"));
    assert!(
        err(&rule(
            "on = \"command\"\nupstream = \"x\"\nmessage = \"m\"\n"
        ))
        .contains("message")
    );
}

#[test]
fn scan_rules_union_their_scanners_in_rule_order_and_do_not_end_evaluation() {
    let s = set(r#"
        [[rule]]
        name = "all"
        on = "command"
        verbs = ["RETR", "TOP"]
        action = "scan"
        scan = ["clamav"]
        [[rule]]
        name = "spam"
        on = "command"
        verbs = "RETR"
        action = "scan"
        scan = ["rspamd", "clamav"]
        [[rule]]
        name = "tag"
        on = "command"
        action = "tag"
        tags = "t"
    "#);
    let names = |v: &Verdict| v.scan.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let retr = s.evaluate(&cmd(Verb::Retr, b"1"));
    assert_eq!(names(&retr), ["clamav", "rspamd"]);
    assert_eq!(retr.tags, vec![Arc::<str>::from("t")]);
    assert_eq!(names(&s.evaluate(&cmd(Verb::Top, b"1 0"))), ["clamav"]);
    assert!(s.evaluate(&cmd(Verb::Dele, b"1")).scan.is_empty());
    assert_eq!(
        s.scanners_in_files()
            .map(|(_, r, n)| format!("{r}:{n}"))
            .collect::<Vec<_>>(),
        ["all:clamav", "spam:rspamd", "spam:clamav"]
    );
    // A deny after a scan: nothing is retrieved, nothing scanned.
    let denied = set(r#"
        [[rule]]
        name = "s"
        on = "command"
        action = "scan"
        scan = "clamav"
        [[rule]]
        name = "d"
        on = "command"
        action = "deny"
    "#);
    assert!(denied.evaluate(&cmd(Verb::Retr, b"1")).scan.is_empty());
    // Errors: no scanners, an empty list or name, another event, `scan` on another action.
    let rule = |extra: &str| format!("[[rule]]\nname = \"r\"\naction = \"scan\"\n{extra}");
    assert!(err(&rule("on = \"command\"\n")).contains("scan"));
    assert!(err(&rule("on = \"command\"\nscan = []\n")).contains("empty list"));
    assert!(err(&rule("on = \"command\"\nscan = [\"a b\"]\n")).contains("without spaces"));
    assert!(err(&rule("on = \"response\"\nscan = \"x\"\n")).contains("RETR or TOP"));
    assert!(
        err("[[rule]]\nname = \"r\"\non = \"command\"\naction = \"log\"\nmessage = \"m\"\nscan = \"x\"\n")
            .contains("scan")
    );
}
