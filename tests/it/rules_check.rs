//! The shipped rule sets in `rules/`: all load together, and each does what its header says.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use popgate::pop3::command::Verb;
use popgate::pop3::response::{Status, StatusLine};
use popgate::pop3::tracker::State;
use popgate::rules::{Event, EventKind, RuleOutcome, RuleSet, Verdict};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn load(file: &str) -> RuleSet {
    RuleSet::load(&[format!("rules/{file}")], root()).unwrap_or_else(|e| panic!("{e}"))
}

fn client() -> IpAddr {
    "127.0.0.1".parse().unwrap()
}

fn command<'a>(verb: Verb, args: &'a [u8], tls: bool, user: Option<&'a str>) -> Event<'a> {
    Event {
        verb: Some(verb),
        args: Some(args),
        tls,
        user,
        state: if user.is_some() {
            State::Transaction
        } else {
            State::Authorization
        },
        ..Event::new(EventKind::Command, "pop3", client())
    }
}

/// Apply a verdict to one CAPA list the way the session is meant to.
fn capa_list(rules: &RuleSet, items: &[&str], tls: bool) -> Vec<String> {
    let base = Event {
        tls,
        ..Event::new(EventKind::Capa, "pop3", client())
    };
    let mut out = Vec::new();
    for item in items {
        let v = rules.evaluate(&Event {
            text: Some(item.as_bytes()),
            ..base
        });
        if v.remove {
            continue;
        }
        let item = v.rewritten.unwrap_or_else(|| item.as_bytes().to_vec());
        out.push(String::from_utf8(item).unwrap());
    }
    out.extend(rules.evaluate(&base).add_capa);
    out
}

#[test]
fn every_shipped_file_loads() {
    let on_disk = std::fs::read_dir(root().join("rules"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.ends_with(".toml") && !name.starts_with('.')
        })
        .count();
    let all =
        RuleSet::load(&["rules/*.toml".to_string()], root()).unwrap_or_else(|e| panic!("{e}"));
    assert!(on_disk > 0);
    assert_eq!(all.files().len(), on_disk);
    assert!(all.len() >= on_disk, "every shipped file holds rules");
    for f in all.files() {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(
            text.starts_with("# "),
            "{}: starts with a comment header",
            f.display()
        );
        assert!(
            text.contains("Enable:"),
            "{}: says how to enable it",
            f.display()
        );
    }
}

#[test]
fn require_tls_denies_plaintext_logins() {
    let r = load("require-tls.toml");
    for (verb, args) in [
        (Verb::User, &b"bob"[..]),
        (Verb::Pass, b"secret"),
        (Verb::Apop, b"bob c4c9334bac560ecc979e58001b3e22fb"),
        (Verb::Auth, b"PLAIN"),
    ] {
        let v = r.evaluate(&command(verb, args, false, None));
        let RuleOutcome::Deny {
            reply, close_after, ..
        } = &v.outcome
        else {
            panic!("{verb} not denied: {v:?}");
        };
        assert_eq!(
            reply,
            "-ERR [AUTH] Encryption required: use STLS or port 995"
        );
        assert_eq!(*close_after, Some(4));
        assert_eq!(v.logs.len(), 1);
        assert!(!v.logs[0].message.contains("secret"), "{:?}", v.logs);
        // Under TLS the same commands pass untouched.
        let v = r.evaluate(&command(verb, args, true, None));
        assert_eq!(v, Verdict::default(), "{verb} under TLS");
    }
    // Everything else passes without TLS too.
    for verb in [Verb::Capa, Verb::Stls, Verb::Quit, Verb::Noop] {
        assert!(r.evaluate(&command(verb, b"", false, None)).passes());
    }
}

#[test]
fn require_tls_hides_plaintext_methods_in_capa() {
    let r = load("require-tls.toml");
    let items = [
        "TOP",
        "USER",
        "SASL PLAIN LOGIN CRAM-MD5",
        "RESP-CODES",
        "STLS",
    ];
    assert_eq!(
        capa_list(&r, &items, false),
        ["TOP", "SASL CRAM-MD5", "RESP-CODES", "STLS"]
    );
    assert_eq!(
        capa_list(&r, &["USER", "SASL PLAIN LOGIN", "PIPELINING"], false),
        ["PIPELINING"]
    );
    assert_eq!(
        capa_list(&r, &["SASL LOGIN XLOGIN PLAIN-CLIENTTOKEN PLAIN"], false),
        ["SASL XLOGIN PLAIN-CLIENTTOKEN"]
    );
    assert_eq!(capa_list(&r, &["sasl plain"], false), Vec::<String>::new());
    // Under TLS the list is left alone.
    assert_eq!(capa_list(&r, &items, true), items);
}

fn greeting(line: &[u8]) -> Event<'_> {
    Event {
        status: Some(StatusLine::parse(line).unwrap().status),
        text: Some(line),
        ..Event::new(EventKind::Greeting, "pop3", client())
    }
}

#[test]
fn hide_banner_keeps_the_apop_timestamp() {
    let r = load("hide-banner.toml");
    let cases: [(&[u8], &[u8]); 5] = [
        (
            b"+OK Dovecot (Debian) ready. <123.456@host>",
            b"+OK POP3 server ready <123.456@host>",
        ),
        (b"+OK Dovecot ready.", b"+OK POP3 server ready"),
        (b"+OK", b"+OK POP3 server ready"),
        (
            b"+OK <1896.697170952@dbc.mtview.ca.us> POP3 server v1.2 ready",
            b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>",
        ),
        (
            b"+ok qpopper \xff\xfe ready <9.9@x.example>",
            b"+OK POP3 server ready <9.9@x.example>",
        ),
    ];
    for (from, to) in cases {
        let v = r.evaluate(&greeting(from));
        assert_eq!(
            v.rewritten.as_deref(),
            Some(to),
            "{}",
            String::from_utf8_lossy(from)
        );
    }
    // An -ERR greeting keeps its reason.
    let v = r.evaluate(&greeting(b"-ERR [SYS/TEMP] maintenance"));
    assert_eq!(v.rewritten, None);
    assert_eq!(
        r.evaluate(&greeting(b"+OK POP3 server ready")).rewritten,
        None
    );
}

#[test]
fn read_only_denies_dele_for_archive_users() {
    let r = load("read-only.toml");
    let v = r.evaluate(&command(
        Verb::Dele,
        b"1",
        true,
        Some("archive@example.org"),
    ));
    assert_eq!(
        v.outcome,
        RuleOutcome::Deny {
            reply: "-ERR [SYS/PERM] this mailbox is read-only".into(),
            rule: Arc::from("read-only-dele"),
            close_after: None,
        }
    );
    assert_eq!(v.logs.len(), 1);
    assert!(
        !r.evaluate(&command(
            Verb::Dele,
            b"1",
            true,
            Some("Legal-Hold@example.org")
        ))
        .passes()
    );
    assert!(
        !r.evaluate(&command(
            Verb::Dele,
            b"1",
            true,
            Some("archive-2019@example.org")
        ))
        .passes()
    );
    for user in [
        "bob@example.org",
        "archive@example.org.evil",
        "xarchive@example.org",
    ] {
        assert!(
            r.evaluate(&command(Verb::Dele, b"1", true, Some(user)))
                .passes()
        );
    }
    for verb in [Verb::Retr, Verb::Top, Verb::List, Verb::Quit] {
        let v = r.evaluate(&command(verb, b"1", true, Some("archive@example.org")));
        assert_eq!(v, Verdict::default());
    }
}

#[test]
fn audit_users_logs_and_tags() {
    let r = load("audit-users.toml");
    let v = r.evaluate(&command(Verb::Retr, b"3", true, Some("cfo@example.org")));
    assert!(v.passes());
    assert_eq!(v.logs.len(), 1);
    assert_eq!(v.logs[0].level, tracing::Level::INFO);
    assert_eq!(&*v.logs[0].rule, "audit-users-log", "{:?}", v.logs);
    assert_eq!(
        v.logs[0].message,
        "audit: cfo@example.org from 127.0.0.1 on pop3: RETR 3"
    );
    assert_eq!(v.tags, [Arc::<str>::from("audit")]);
    let v = r.evaluate(&command(
        Verb::Dele,
        b"3",
        true,
        Some("payroll@example.org"),
    ));
    assert_eq!(v.tags.len(), 1);
    assert_eq!(
        r.evaluate(&command(Verb::Retr, b"3", true, Some("bob@example.org"))),
        Verdict::default()
    );
    assert_eq!(
        r.evaluate(&command(Verb::Stat, b"", true, Some("cfo@example.org"))),
        Verdict::default()
    );
    let login = Event {
        user: Some("ceo@example.org"),
        verb: Some(Verb::Pass),
        status: Some(Status::Err),
        ..Event::new(EventKind::Login, "pop3s", client())
    };
    let v = r.evaluate(&login);
    assert_eq!(
        v.logs[0].message,
        "audit: login -ERR for ceo@example.org from 127.0.0.1 on pop3s (tls: no)"
    );
}

#[test]
fn block_networks_drops_documentation_ranges_only() {
    let r = load("block-networks.toml");
    let connect =
        |ip: &str| r.evaluate(&Event::new(EventKind::Connect, "pop3", ip.parse().unwrap()));
    for ip in [
        "192.0.2.1",
        "198.51.100.200",
        "203.0.113.255",
        "2001:db8::25",
        "::ffff:203.0.113.9",
    ] {
        let v = connect(ip);
        assert_eq!(
            v.outcome,
            RuleOutcome::Drop {
                rule: Arc::from("block-networks-drop")
            },
            "{ip}"
        );
        assert_eq!(v.logs.len(), 1, "{ip}");
    }
    for ip in ["127.0.0.1", "::1", "10.0.0.1", "192.0.3.1", "203.0.114.1"] {
        assert_eq!(connect(ip), Verdict::default(), "{ip}");
    }
}

#[test]
fn readme_examples_are_valid() {
    let readme = std::fs::read_to_string(root().join("rules/README.md")).unwrap();
    let mut checked = 0;
    for (i, block) in readme.split("```toml").skip(1).enumerate() {
        let block = block.split("```").next().unwrap();
        if !block.contains("[[rule]]") {
            continue; // the config snippet
        }
        let file = format!("README block {}", i + 1);
        if let Err(e) = RuleSet::parse(block, Path::new(&file)) {
            panic!("{e}");
        }
        checked += 1;
    }
    assert!(checked >= 4, "{checked}");
}
