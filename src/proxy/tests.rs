//! The hop without sockets: scripted client and server bytes fed at every chunk size, the
//! actions checked.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::policy::Policy;
use super::scan::ScanPolicy;
use super::{Hop, HopConfig, Output, ScanRequest, SessionEvent};
use crate::config::UnknownCommands;
use crate::pop3::command::Verb;
use crate::rules::RuleSet;
use crate::types::{CloseReason, ScanReport, ScanVerdict};

/// What the driver would dispatch to the observer, kept for the assertions; failed logins
/// answered with `penalty`.
#[derive(Default)]
struct Rec {
    statuses: Vec<(Option<Verb>, bool)>,
    /// Login outcomes: the user, the name as typed (if it differs), success.
    logins: Vec<(Option<String>, Option<String>, bool)>,
    penalty: Option<Duration>,
    injected: Vec<String>,
    injected_answers: Vec<(Option<Verb>, String)>,
    injected_body: Vec<u8>,
    no_uidl: usize,
    /// Every event, in order.
    events: Vec<SessionEvent>,
}

impl Rec {
    /// Drain the hop's events (as the driver does after every call), at `now`.
    fn take(&mut self, hop: &mut Hop, now: Instant) {
        while let Some(ev) = hop.poll_event() {
            match &ev {
                SessionEvent::Status { meta, .. } => {
                    self.statuses.push((meta.verb, meta.multiline));
                    if let Some(l) = &meta.login {
                        let id = l.identity.as_ref();
                        self.logins.push((
                            id.map(|i| i.user().to_string()),
                            id.and_then(|i| i.as_typed()).map(|t| t.to_string()),
                            l.success,
                        ));
                    }
                }
                SessionEvent::LoginFailed(_) => hop.penalty(now, self.penalty),
                SessionEvent::Injected(line) => self.injected.push(text(line.line())),
                SessionEvent::InjectedStatus { meta, line } => {
                    self.injected_answers.push((meta.verb, text(line)));
                }
                SessionEvent::InjectedBody { chunk, .. } => {
                    self.injected_body.extend_from_slice(chunk);
                }
                SessionEvent::NoUidl => self.no_uidl += 1,
                _ => {}
            }
            self.events.push(ev);
        }
    }
}

fn config() -> HopConfig {
    HopConfig {
        listener: Arc::from("test"),
        client_ip: IpAddr::from([127, 0, 0, 1]),
        destination: None,
        client_tls: false,
        stls_available: false,
        fold_user_names: false,
        max_line: 64,
        max_pipeline: 64,
        unknown_commands: UnknownCommands::Reject,
        idle_timeout: Duration::from_secs(600),
        login_timeout: Duration::from_secs(60),
        greeting_timeout: Duration::from_secs(30),
        lookups: None,
        scan: None,
    }
}

fn rules(text: &str) -> Arc<RuleSet> {
    Arc::new(RuleSet::parse(text, Path::new("t.toml")).expect("rules parse"))
}

/// What came out of a hop, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Out {
    /// Everything written to the client.
    client: Vec<u8>,
    /// Everything written upstream.
    upstream: Vec<u8>,
    /// Holds, each with how many upstream bytes were written before it.
    sleeps: Vec<(Duration, usize)>,
    /// Client TLS handshakes started, with the client bytes written before.
    tls_at: Vec<usize>,
    /// How it closed.
    close: Option<(CloseReason, bool)>,
    /// Login outcomes the observer saw: user, name as typed (if it differs), success.
    logins: Vec<(Option<String>, Option<String>, bool)>,
    /// Commands popgate injected, and the answers only popgate saw (status lines, bodies).
    injected: Vec<String>,
    injected_answers: Vec<(Option<Verb>, String)>,
    injected_body: Vec<u8>,
    /// How often the hop concluded the server has no UIDL.
    no_uidl: usize,
    /// The bytes the status and body events carried, in order.
    event_bytes: Vec<u8>,
    /// Scans asked for, in order.
    scans: Vec<ScanAsked>,
    /// Spools dropped unsent.
    spools_dropped: usize,
    /// Bytes left in the spool at the end (none may be).
    spool_left: usize,
    /// The `Scanned` events: message, action, each scanner's verdict.
    scanned: Vec<(u32, &'static str, Vec<String>)>,
}

/// An [`Output::Scan`] as the harness saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ScanAsked {
    scanners: Vec<String>,
    msg: u32,
    /// What the spool held.
    spool: String,
    /// What had been written upstream and to the client by then.
    upstream: String,
    client: String,
}

impl Out {
    fn with(mut self, rec: Rec) -> Out {
        self.logins = rec.logins;
        self.injected = rec.injected;
        self.injected_answers = rec.injected_answers;
        self.injected_body = rec.injected_body;
        self.no_uidl = rec.no_uidl;
        for ev in &rec.events {
            match ev {
                SessionEvent::Status { line, .. } => self.event_bytes.extend_from_slice(line),
                SessionEvent::Body { chunk, .. } => self.event_bytes.extend_from_slice(chunk),
                SessionEvent::Scanned {
                    msg,
                    reports,
                    action,
                    ..
                } => self.scanned.push((
                    *msg,
                    action.as_str(),
                    reports
                        .iter()
                        .map(|r| format!("{}={}", r.scanner, r.verdict.as_str()))
                        .collect(),
                )),
                _ => {}
            }
        }
        self
    }
}

/// How a scripted run ends once the scripts are used up.
#[derive(Clone, Copy, PartialEq)]
enum End {
    /// Nothing more happens.
    Open,
    /// The upstream closes.
    UpstreamEof,
    /// The client closes its side.
    ClientEof,
}

/// Feed `client` and the server's responses in chunks of `chunk` bytes, the client whenever
/// the hop wants it (as the driver does), and carry out the actions. `server[0]` is the
/// greeting; `server[k]` is released once the upstream has received `k` lines, as a real
/// server answers only what it was sent. Client bytes not yet fed when a TLS handshake starts
/// are dropped: sent in plaintext, they would never be read as commands.
fn run(hop: &mut Hop, client: &[u8], server: &[&[u8]], chunk: usize, end: End) -> Out {
    run_scanning(hop, client, server, chunk, end, &|_| {
        unreachable!("no scanning in these scripts")
    })
}

/// A scanner for the harness: the reports for a scan request.
type Answer<'a> = &'a dyn Fn(&ScanRequest) -> Vec<ScanReport>;

/// [`run`], with the driver's spool and scanners: an [`Output::Scan`] is answered with
/// `answer`'s reports as soon as the outputs before it are out.
fn run_scanning(
    hop: &mut Hop,
    client: &[u8],
    server: &[&[u8]],
    chunk: usize,
    end: End,
    answer: Answer<'_>,
) -> Out {
    let mut out = Out::default();
    let mut spool: Vec<u8> = Vec::new();
    let mut asked: Option<ScanRequest> = None;
    let mut rec = Rec::default();
    let (mut cin, mut sin) = (BytesMut::new(), BytesMut::new());
    let (mut c, mut s) = (0, 0);
    let mut client = client.to_vec();
    let mut now = Instant::now();
    let mut ended = false;
    for _ in 0..100_000 {
        rec.take(hop, now);
        while let Some(a) = hop.poll_output() {
            match a {
                Output::ToClient(b) => out.client.extend_from_slice(&b),
                Output::ToUpstream(b) => out.upstream.extend_from_slice(&b),
                Output::StartClientTls => {
                    out.tls_at.push(out.client.len());
                    client.truncate(c);
                    hop.client_tls_started(&mut cin);
                }
                Output::Close(reason) => out.close = Some((reason, hop.mid_response())),
                Output::Login(_)
                | Output::RedialUpstream
                | Output::Dial(_)
                | Output::StartUpstreamTls
                | Output::FetchToken
                | Output::MarkDead(_)
                | Output::MarkAlive(_)
                | Output::UpstreamNotice(_)
                | Output::LoginEnded(_) => panic!("not an output of the hop"),
                Output::Spool(b) => spool.extend_from_slice(&b),
                Output::Scan(req) => {
                    out.scans.push(ScanAsked {
                        scanners: req.scanners.iter().map(|n| n.to_string()).collect(),
                        msg: req.msg,
                        spool: text(&spool),
                        upstream: text(&out.upstream),
                        client: text(&out.client),
                    });
                    asked = Some(req);
                }
                Output::Unspool => out.client.append(&mut spool),
                Output::DropSpool => {
                    spool.clear();
                    out.spools_dropped += 1;
                }
            }
        }
        out.spool_left = spool.len();
        if let Some(req) = asked.take() {
            assert_eq!(
                hop.poll_timeout(),
                None,
                "no deadline while waiting for a verdict"
            );
            hop.scan_done(now, DATE, answer(&req), &mut cin);
            continue;
        }
        if out.close.is_none() && hop.holding() {
            // As a driver that has nothing else to do: the hold's deadline comes.
            let at = hop.poll_timeout().expect("a hold has a deadline");
            out.sleeps.push((at - now, out.upstream.len()));
            now = at;
            hop.on_timeout(now);
            continue;
        }
        if out.close.is_some() {
            return out.with(rec);
        }
        let answered = count(&out.upstream, b"\n") + 1;
        let available: usize = server.iter().take(answered).map(|r| r.len()).sum();
        let server_bytes: Vec<u8> = server.concat();
        if hop.wants_client_input() && c < client.len() {
            let n = chunk.min(client.len() - c);
            cin.extend_from_slice(&client[c..c + n]);
            c += n;
            hop.on_client_input(now, &mut cin);
        } else if s < available {
            let n = chunk.min(available - s);
            sin.extend_from_slice(&server_bytes[s..s + n]);
            s += n;
            hop.on_server_input(now, &mut sin, &mut cin);
        } else if ended {
            return out.with(rec);
        } else {
            ended = true;
            match end {
                End::Open => {}
                End::UpstreamEof => hop.on_upstream_eof(),
                End::ClientEof => hop.on_client_eof(),
            }
        }
    }
    panic!("hop did not settle");
}

/// The date the harness gives [`Hop::scan_done`].
const DATE: &str = "Mon, 07 Dec 2026 15:04:05 +0000";

fn hop_with(cfg: HopConfig, rule_text: &str) -> Hop {
    let now = Instant::now();
    Hop::new(cfg, Policy::new(rules(rule_text)), now, now)
}

/// The same output at every chunk size from 1 to the longest script.
fn same_at_every_chunk(make: impl Fn() -> Hop, client: &[u8], server: &[&[u8]], end: End) -> Out {
    let longest = client.len().max(server.iter().map(|r| r.len()).sum());
    let want = run(&mut make(), client, server, longest, end);
    for chunk in 1..=longest {
        let got = run(&mut make(), client, server, chunk, end);
        assert_eq!(got, want, "chunk size {chunk}");
    }
    want
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

const LOGIN: &[u8] = b"USER a\r\nPASS b\r\n";
const LOGGED_IN: [&[u8]; 3] = [b"+OK hi\r\n", b"+OK\r\n", b"+OK in\r\n"];

/// The login responses followed by `more`.
fn after_login<'a>(more: &[&'a [u8]]) -> Vec<&'a [u8]> {
    let mut v = LOGGED_IN.to_vec();
    v.extend_from_slice(more);
    v
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn stls_waits_for_earlier_replies_and_plaintext_after_it_is_discarded() {
    let make = || {
        hop_with(
            HopConfig {
                stls_available: true,
                ..config()
            },
            "",
        )
    };
    let client = b"CAPA\r\nSTLS\r\nUSER evil\r\nPASS injected\r\n";
    let server: &[&[u8]] = &[b"+OK hi\r\n", b"+OK caps\r\nUSER\r\nSTLS\r\n.\r\n"];
    let want_client = b"+OK hi\r\n+OK caps\r\nUSER\r\nSTLS\r\n.\r\n+OK begin TLS negotiation\r\n";
    // Fed whole, the plaintext after STLS is in the buffer at the handshake: discarded.
    for chunk in 1..=client.len() {
        let got = run(&mut make(), client, server, chunk, End::Open);
        assert_eq!(got.upstream, b"CAPA\r\n", "chunk {chunk}");
        assert_eq!(text(&got.client), text(want_client), "chunk {chunk}");
        assert_eq!(got.tls_at, vec![want_client.len()], "chunk {chunk}");
    }
    // STLS after a login is refused, never relayed.
    let out = same_at_every_chunk(make, b"USER a\r\nPASS b\r\nSTLS\r\n", &LOGGED_IN, End::Open);
    assert!(
        out.client
            .ends_with(b"-ERR STLS is only allowed before login\r\n"),
        "{}",
        text(&out.client)
    );
    assert_eq!(count(&out.upstream, b"STLS"), 0);
    assert!(out.tls_at.is_empty());
}

#[test]
fn overlong_lines_are_answered_in_place_and_endless_junk_closes() {
    let mut client = LOGIN.to_vec();
    client.extend_from_slice(b"NOOP\r\n");
    client.extend_from_slice(&[b'X'; 200]);
    client.extend_from_slice(b"\r\nQUIT\r\n");
    let server = after_login(&[b"+OK noop\r\n", b"+OK bye\r\n"]);
    let out = same_at_every_chunk(
        || hop_with(config(), ""),
        &client,
        &server,
        End::UpstreamEof,
    );
    assert_eq!(text(&out.upstream), "USER a\r\nPASS b\r\nNOOP\r\nQUIT\r\n");
    assert!(
        out.client
            .ends_with(b"+OK noop\r\n-ERR line too long\r\n+OK bye\r\n"),
        "{}",
        text(&out.client)
    );
    assert_eq!(out.close, Some((CloseReason::Quit, false)));
    // No line end at all: closed once 16 lengths of junk are gone.
    let junk = vec![b'Y'; 64 * 17 + 10];
    let out = run(
        &mut hop_with(config(), ""),
        &junk,
        &[b"+OK hi\r\n"],
        100,
        End::Open,
    );
    assert_eq!(out.close, Some((CloseReason::Error, false)));
    assert!(out.upstream.is_empty());
}

#[test]
fn capa_is_captured_and_rewritten_for_this_hop() {
    let server: &[&[u8]] = &[
        b"+OK hi\r\n",
        b"+OK caps\r\nUSER\r\nSTLS\r\nSASL PLAIN GSSAPI CRAM-MD5\r\nPIPELINING\r\n.\r\n",
    ];
    let out = same_at_every_chunk(|| hop_with(config(), ""), b"CAPA\r\n", server, End::Open);
    assert_eq!(
        text(&out.client),
        "+OK hi\r\n+OK caps\r\nUSER\r\nSASL PLAIN CRAM-MD5\r\nPIPELINING\r\n.\r\n"
    );
    let make = || {
        hop_with(
            HopConfig {
                stls_available: true,
                ..config()
            },
            "[[rule]]\nname = \"no-user\"\non = \"capa\"\ntext = '^USER$'\naction = \"rewrite\"\nremove = true\n",
        )
    };
    let out = same_at_every_chunk(make, b"CAPA\r\n", server, End::Open);
    assert_eq!(
        text(&out.client),
        "+OK hi\r\n+OK caps\r\nSASL PLAIN CRAM-MD5\r\nPIPELINING\r\nSTLS\r\n.\r\n"
    );
}

#[test]
fn pipeline_limit_holds_commands_until_replies_come() {
    let make = || {
        hop_with(
            HopConfig {
                max_pipeline: 2,
                ..config()
            },
            "",
        )
    };
    let mut hop = make();
    let now = Instant::now();
    let (mut cin, mut sin) = (BytesMut::new(), BytesMut::new());
    let mut up = Vec::new();
    let drain = |hop: &mut Hop, up: &mut Vec<u8>| {
        while let Some(a) = hop.poll_output() {
            if let Output::ToUpstream(b) = a {
                up.extend_from_slice(&b);
            }
        }
    };
    let mut step = |hop: &mut Hop, client: &[u8], server: &[u8], up: &mut Vec<u8>| {
        cin.extend_from_slice(client);
        hop.on_client_input(now, &mut cin);
        sin.extend_from_slice(server);
        hop.on_server_input(now, &mut sin, &mut cin);
        drain(hop, up);
    };
    step(&mut hop, b"USER a\r\n", b"+OK hi\r\n+OK\r\n", &mut up);
    step(&mut hop, b"PASS b\r\n", b"+OK in\r\n", &mut up);
    assert_eq!(hop.user(), Some("a"));
    up.clear();
    step(
        &mut hop,
        b"LIST 1\r\nLIST 2\r\nLIST 3\r\nLIST 4\r\nLIST 5\r\n",
        b"",
        &mut up,
    );
    assert_eq!(text(&up), "LIST 1\r\nLIST 2\r\n");
    assert!(!hop.wants_client_input());
    step(&mut hop, b"", b"+OK 1 10\r\n", &mut up);
    assert_eq!(text(&up), "LIST 1\r\nLIST 2\r\nLIST 3\r\n");
    step(&mut hop, b"", b"+OK 2 10\r\n+OK 3 10\r\n", &mut up);
    assert_eq!(
        text(&up),
        "LIST 1\r\nLIST 2\r\nLIST 3\r\nLIST 4\r\nLIST 5\r\n"
    );
    // The same end result through the scripted driver at every chunk size.
    let mut client = LOGIN.to_vec();
    client.extend_from_slice(b"LIST 1\r\nLIST 2\r\nLIST 3\r\nLIST 4\r\nLIST 5\r\n");
    let lists: Vec<Vec<u8>> = (1..=5)
        .map(|i| format!("+OK {i} 10\r\n").into_bytes())
        .collect();
    let more: Vec<&[u8]> = lists.iter().map(Vec::as_slice).collect();
    let out = same_at_every_chunk(make, &client, &after_login(&more), End::Open);
    assert_eq!(count(&out.upstream, b"LIST"), 5);
    assert!(out.client.ends_with(b"+OK 4 10\r\n+OK 5 10\r\n"));
}

#[test]
fn local_replies_keep_their_place_in_the_pipeline() {
    let mut client = LOGIN.to_vec();
    client.extend_from_slice(b"STAT\r\nXYZZY\r\nLIST 1\r\nRETR\r\nUSER x\r\nNOOP\r\n");
    let server = after_login(&[b"+OK 1 10\r\n", b"+OK 1 10\r\n", b"+OK\r\n"]);
    let out = same_at_every_chunk(|| hop_with(config(), ""), &client, &server, End::Open);
    assert!(
        out.client.ends_with(
            b"+OK in\r\n+OK 1 10\r\n-ERR unknown command\r\n+OK 1 10\r\n-ERR invalid arguments for RETR\r\n-ERR already logged in\r\n+OK\r\n"
        ),
        "{}",
        text(&out.client)
    );
    assert_eq!(
        text(&out.upstream),
        "USER a\r\nPASS b\r\nSTAT\r\nLIST 1\r\nNOOP\r\n"
    );
}

#[test]
fn a_rule_delay_comes_after_what_was_decided_before() {
    let rule = "[[rule]]\nname = \"slow-retr\"\non = \"command\"\nverbs = [\"RETR\"]\naction = \"delay\"\ndelay = \"2s\"\n";
    let mut client = LOGIN.to_vec();
    client.extend_from_slice(b"STAT\r\nXYZZY\r\nRETR 1\r\nNOOP\r\n");
    let server = after_login(&[b"+OK 1 3\r\n", b"+OK\r\nx\r\n.\r\n", b"+OK\r\n"]);
    let out = same_at_every_chunk(|| hop_with(config(), rule), &client, &server, End::Open);
    // STAT went upstream before the sleep, RETR after it.
    let before = b"USER a\r\nPASS b\r\nSTAT\r\n".len();
    assert_eq!(out.sleeps, vec![(Duration::from_secs(2), before)]);
    assert_eq!(
        text(&out.upstream),
        "USER a\r\nPASS b\r\nSTAT\r\nRETR 1\r\nNOOP\r\n"
    );
    // A failed login is held by the penalty the observer asks for, after its status line
    // has been decided and before it is relayed.
    let mut hop = hop_with(config(), "");
    let rec = Rec {
        penalty: Some(Duration::from_millis(1500)),
        ..Rec::default()
    };
    let now = Instant::now();
    let (mut cin, mut sin) = (BytesMut::from(LOGIN), BytesMut::new());
    hop.on_client_input(now, &mut cin);
    // The PASS goes out once USER is answered; its answer comes after that.
    sin.extend_from_slice(b"+OK hi\r\n+OK\r\n");
    hop.on_server_input(now, &mut sin, &mut cin);
    sin.extend_from_slice(b"-ERR [AUTH] no\r\n");
    hop.on_server_input(now, &mut sin, &mut cin);
    let mut client_out = Vec::new();
    let drain = |hop: &mut Hop, client_out: &mut Vec<u8>| {
        while let Some(a) = hop.poll_output() {
            if let Output::ToClient(b) = a {
                client_out.extend_from_slice(&b);
            }
        }
    };
    // Until the driver answers the failed login, its `-ERR` is held, with no deadline.
    drain(&mut hop, &mut client_out);
    assert_eq!(text(&client_out), "+OK hi\r\n+OK\r\n");
    assert!(hop.holding());
    assert!(hop.poll_timeout() > Some(now + Duration::from_secs(30)));
    let asked = std::iter::from_fn(|| hop.poll_event())
        .filter(|e| matches!(e, SessionEvent::LoginFailed(_)))
        .count();
    assert_eq!(asked, 1);
    hop.penalty(now, rec.penalty);
    drain(&mut hop, &mut client_out);
    assert_eq!(text(&client_out), "+OK hi\r\n+OK\r\n");
    assert_eq!(hop.poll_timeout(), Some(now + Duration::from_millis(1500)));
    hop.on_timeout(now + Duration::from_millis(1499));
    drain(&mut hop, &mut client_out);
    assert_eq!(client_out.len(), 13);
    hop.on_timeout(now + Duration::from_millis(1500));
    drain(&mut hop, &mut client_out);
    assert_eq!(text(&client_out), "+OK hi\r\n+OK\r\n-ERR [AUTH] no\r\n");
    assert!(!hop.holding());
}

#[test]
fn quit_is_never_generated() {
    let mut client = LOGIN.to_vec();
    client.extend_from_slice(b"DELE 1\r\nRETR 2\r\n");
    let server = after_login(&[b"+OK deleted\r\n", b"+OK\r\npart of a bo"]);
    for end in [End::Open, End::UpstreamEof, End::ClientEof] {
        let out = same_at_every_chunk(|| hop_with(config(), ""), &client, &server, end);
        assert_eq!(count(&out.upstream, b"QUIT"), 0);
    }
    // Timeouts, shutdown, a drop rule: never QUIT either.
    let now = Instant::now();
    let mut timeouts = hop_with(config(), "");
    timeouts.on_timeout(now + Duration::from_secs(3600));
    let mut shutdown = hop_with(config(), "");
    shutdown.on_shutdown();
    let mut dropped = hop_with(
        config(),
        "[[rule]]\nname = \"d\"\non = \"command\"\nverbs = [\"DELE\"]\naction = \"drop\"\n",
    );
    let out = run(&mut dropped, &client, &server, 7, End::Open);
    assert_eq!(out.close, Some((CloseReason::RuleDrop, false)));
    assert_eq!(count(&out.upstream, b"QUIT"), 0);
    for mut hop in [timeouts, shutdown] {
        let mut closed = false;
        while let Some(a) = hop.poll_output() {
            match a {
                Output::ToUpstream(b) => assert_eq!(count(&b, b"QUIT"), 0),
                Output::Close(_) => closed = true,
                _ => {}
            }
        }
        assert!(closed);
    }
}

#[test]
fn a_cut_body_never_gets_its_terminator() {
    let mut client = LOGIN.to_vec();
    client.extend_from_slice(b"RETR 1\r\n");
    for tail in [&b"line\r\n.\r"[..], b"line\r\n.", b"line\r\n", b"li"] {
        let retr = [&b"+OK 9 octets\r\n"[..], tail].concat();
        let server = after_login(&[&retr]);
        let out = same_at_every_chunk(
            || hop_with(config(), ""),
            &client,
            &server,
            End::UpstreamEof,
        );
        let body = &out.client[LOGGED_IN.concat().len() + b"+OK 9 octets\r\n".len()..];
        assert!(
            !body.ends_with(b".") && !body.ends_with(b".\r"),
            "{tail:?}: {body:?}"
        );
        assert_eq!(
            out.close,
            Some((CloseReason::UpstreamEof, true)),
            "{tail:?}"
        );
    }
    // A bare-LF terminator is a protocol error: nothing of it, or after it, is relayed.
    let server = after_login(&[b"+OK\r\nline\n.\n-ERR later\r\n"]);
    let out = same_at_every_chunk(|| hop_with(config(), ""), &client, &server, End::Open);
    assert!(
        out.client.ends_with(b"+OK\r\nline\n"),
        "{}",
        text(&out.client)
    );
    assert_eq!(out.close, Some((CloseReason::Error, true)));
}

#[test]
fn timeouts_answer_and_close() {
    let now = Instant::now();
    let mut hop = Hop::new(config(), Policy::new(rules("")), now, now);
    assert_eq!(hop.poll_timeout(), Some(now + Duration::from_secs(30)));
    hop.on_timeout(now + Duration::from_secs(29));
    assert_eq!(hop.poll_output(), None);
    hop.on_timeout(now + Duration::from_secs(31));
    assert!(
        matches!(hop.poll_output(), Some(Output::ToClient(b)) if b.starts_with(b"-ERR [SYS/TEMP]"))
    );
    assert_eq!(
        hop.poll_output(),
        Some(Output::Close(CloseReason::GreetingTimeout))
    );
    assert_eq!(hop.poll_timeout(), None);
    assert!(!hop.mid_response());
    // Greeted, not logged in: the login deadline, which bytes do not move.
    let mut hop = Hop::new(config(), Policy::new(rules("")), now, now);
    let mut cin = BytesMut::from(&b"USER a\r\n"[..]);
    let mut sin = BytesMut::from(&b"+OK hi\r\n+OK\r\n"[..]);
    hop.on_client_input(now + Duration::from_secs(50), &mut cin);
    hop.on_server_input(now + Duration::from_secs(55), &mut sin, &mut cin);
    assert_eq!(hop.poll_timeout(), Some(now + Duration::from_secs(60)));
    hop.on_timeout(now + Duration::from_secs(61));
    let outputs: Vec<Output> = std::iter::from_fn(|| hop.poll_output()).collect();
    assert_eq!(
        outputs.last(),
        Some(&Output::Close(CloseReason::LoginTimeout))
    );
    assert!(!hop.mid_response());
}

#[test]
fn a_closing_denial_stops_the_pipeline_before_a_quit() {
    let rule = "[[rule]]\nname = \"no-top\"\non = \"command\"\nverbs = [\"TOP\"]\naction = \"deny\"\nmessage = \"no\"\nclose_after = 1\n";
    let mut client = LOGIN.to_vec();
    client.extend_from_slice(b"DELE 1\r\nTOP 2 0\r\nQUIT\r\n");
    let server = after_login(&[b"+OK deleted\r\n", b"+OK bye\r\n"]);
    let out = same_at_every_chunk(|| hop_with(config(), rule), &client, &server, End::Open);
    assert_eq!(text(&out.upstream), "USER a\r\nPASS b\r\nDELE 1\r\n");
    assert!(
        out.client.ends_with(b"+OK deleted\r\n-ERR no\r\n"),
        "{}",
        text(&out.client)
    );
    assert_eq!(out.close, Some((CloseReason::RuleDrop, false)));
}

#[test]
fn xclient_is_hidden_from_the_greeting_and_never_relayed_from_a_client() {
    // The server offers XCLIENT to popgate; the client must neither see the offer nor be able
    // to use it (in both unknown-command modes, plain and pipelined, any case, after login).
    for unknown in [UnknownCommands::Reject, UnknownCommands::SingleLine] {
        let make = || {
            hop_with(
                HopConfig {
                    unknown_commands: unknown,
                    ..config()
                },
                "",
            )
        };
        let client =
            b"XCLIENT ADDR=192.0.2.66 PORT=1\r\nxclient addr=192.0.2.66\r\nUSER a\r\nPASS b\r\n  XClient\tADDR=192.0.2.66\r\nNOOP\r\n";
        let server: &[&[u8]] = &[
            b"+OK [XCLIENT] Dovecot ready. <1.2@h>\r\n",
            b"+OK\r\n",
            b"+OK in\r\n",
            b"+OK noop\r\n",
        ];
        let out = same_at_every_chunk(make, client, server, End::Open);
        assert_eq!(
            text(&out.upstream),
            "USER a\r\nPASS b\r\nNOOP\r\n",
            "{unknown:?}"
        );
        assert_eq!(
            text(&out.client),
            "+OK Dovecot ready. <1.2@h>\r\n-ERR XCLIENT is not allowed\r\n\
             -ERR XCLIENT is not allowed\r\n+OK\r\n+OK in\r\n-ERR XCLIENT is not allowed\r\n+OK noop\r\n",
            "{unknown:?}"
        );
    }
}

/// The hop tallies rule matches, denials and drops for the driver's metrics, and hands each
/// out once.
#[test]
fn rule_activity_is_tallied_once() {
    let rules_text = r#"
[[rule]]
name = "log-all"
on = "command"
action = "log"
message = "x"

[[rule]]
name = "no-dele"
on = "command"
verbs = ["DELE"]
action = "deny"

[[rule]]
name = "no-rset"
on = "command"
verbs = ["RSET"]
action = "drop"
"#;
    let mut hop = hop_with(config(), rules_text);
    let out = run(
        &mut hop,
        b"USER a\r\nPASS b\r\nDELE 1\r\nRSET\r\n",
        &after_login(&[]),
        64,
        End::Open,
    );
    assert_eq!(out.close.map(|c| c.0), Some(CloseReason::RuleDrop));
    let t = hop.take_rule_tally();
    let names = |v: &[Arc<str>]| v.iter().map(|r| r.to_string()).collect::<Vec<_>>();
    assert_eq!(
        names(&t.matched),
        [
            "log-all", "log-all", "log-all", "no-dele", "log-all", "no-rset"
        ]
    );
    assert_eq!(names(&t.denied), ["no-dele"]);
    assert_eq!(names(&t.dropped), ["no-rset"]);
    assert!(hop.take_rule_tally().is_empty());
}

#[test]
fn a_greeting_rewrite_cannot_carry_xclient_to_the_client() {
    // Rules see the greeting without the marker: a rewrite that moves it out of its place
    // (here behind a prefix) cannot show it to the client.
    let rule = "[[rule]]\nname = \"welcome\"\non = \"greeting\"\naction = \"rewrite\"\n\
                replace = '^\\+OK (.*)$'\nwith = '+OK Welcome: ${1}'\n";
    let out = same_at_every_chunk(
        || hop_with(config(), rule),
        b"",
        &[b"+OK [XCLIENT] Dovecot ready. <1.2@h>\r\n"],
        End::Open,
    );
    assert_eq!(text(&out.client), "+OK Welcome: Dovecot ready. <1.2@h>\r\n");
}

fn folding() -> HopConfig {
    HopConfig {
        fold_user_names: true,
        ..config()
    }
}

const NO_EVE: &str = "[[rule]]\nname = \"no-eve\"\non = \"command\"\nuser = '^eve$'\naction = \"deny\"\nmessage = \"eve may not log in here\"\n";

#[test]
fn a_deny_rule_on_a_lowercase_user_holds_for_every_ascii_case_when_the_server_folds() {
    for typed in ["EVE", "Eve", "eVe"] {
        // Pipelined or not (every chunk size), the PASS behind `USER EVE` is judged as eve's:
        // it never reaches the server, so eve is never logged in.
        let client = format!("USER {typed}\r\nPASS pw\r\nRETR 1\r\n");
        let out = same_at_every_chunk(
            || hop_with(folding(), NO_EVE),
            client.as_bytes(),
            &[b"+OK hi\r\n", b"+OK send PASS\r\n"],
            End::Open,
        );
        assert_eq!(text(&out.upstream), format!("USER {typed}\r\n"), "{typed}");
        assert_eq!(
            text(&out.client),
            "+OK hi\r\n+OK send PASS\r\n-ERR eve may not log in here\r\n\
             -ERR eve may not log in here\r\n",
            "{typed}"
        );
        assert!(out.logins.is_empty(), "{typed}: {:?}", out.logins);
    }
    // A server that compares exactly: `EVE` is another user, the rule is not about them.
    let out = run(
        &mut hop_with(config(), NO_EVE),
        b"USER EVE\r\nPASS pw\r\nRETR 1\r\n",
        &after_login(&[b"+OK 5 octets\r\nhi\r\n.\r\n"]),
        64,
        End::Open,
    );
    assert_eq!(text(&out.upstream), "USER EVE\r\nPASS pw\r\nRETR 1\r\n");
    assert_eq!(out.logins, [(Some("EVE".into()), None, true)]);
}

/// A rule on `PASS` for one user holds when the client pipelines `USER` and `PASS` in one
/// segment: the `PASS` is judged as the user of the `USER` still awaiting its answer, the same
/// as when the client waits for it. Other users' logins are untouched.
#[test]
fn a_pass_rule_for_a_user_holds_when_user_and_pass_are_pipelined() {
    const NO_EVE_PASS: &str = "[[rule]]\nname = \"no-eve-pass\"\non = \"command\"\n\
                               verbs = [\"PASS\"]\nuser = '^eve$'\naction = \"deny\"\n\
                               message = \"not here\"\n";
    let out = same_at_every_chunk(
        || hop_with(config(), NO_EVE_PASS),
        b"USER eve\r\nPASS pw\r\n",
        &[b"+OK hi\r\n", b"+OK\r\n"],
        End::Open,
    );
    assert_eq!(text(&out.upstream), "USER eve\r\n");
    assert_eq!(text(&out.client), "+OK hi\r\n+OK\r\n-ERR not here\r\n");
    assert!(out.logins.is_empty(), "{:?}", out.logins);
    // alice, pipelined the same way, logs in; so does a USER that replaces eve before PASS.
    for client in [
        "USER alice\r\nPASS pw\r\n",
        "USER eve\r\nUSER alice\r\nPASS pw\r\n",
    ] {
        let replies: Vec<&[u8]> = if client.matches("USER").count() == 2 {
            vec![b"+OK hi\r\n", b"+OK\r\n", b"+OK\r\n", b"+OK in\r\n"]
        } else {
            LOGGED_IN.to_vec()
        };
        let out = same_at_every_chunk(
            || hop_with(config(), NO_EVE_PASS),
            client.as_bytes(),
            &replies,
            End::Open,
        );
        assert_eq!(text(&out.upstream), client);
        assert_eq!(out.logins, [(Some("alice".into()), None, true)], "{client}");
    }
}

/// A server may refuse a second `USER` (popa3d takes one per session) and log the first name
/// in at `PASS`. A client that pipelines `USER eve`, `USER bob`, `PASS` in one segment must not
/// get eve's `PASS` judged as bob's: the `PASS` waits for the `USER` answers.
#[test]
fn a_pass_rule_for_a_user_holds_when_the_server_refuses_a_second_pipelined_user() {
    const NO_EVE_PASS: &str = "[[rule]]\nname = \"no-eve-pass\"\non = \"command\"\n\
                               verbs = [\"PASS\"]\nuser = '^eve$'\naction = \"deny\"\n\
                               message = \"not here\"\n";
    let out = same_at_every_chunk(
        || hop_with(config(), NO_EVE_PASS),
        b"USER eve\r\nUSER bob\r\nPASS pw\r\n",
        &[b"+OK hi\r\n", b"+OK\r\n", b"-ERR one USER only\r\n"],
        End::Open,
    );
    assert_eq!(text(&out.upstream), "USER eve\r\nUSER bob\r\n");
    assert_eq!(
        text(&out.client),
        "+OK hi\r\n+OK\r\n-ERR one USER only\r\n-ERR not here\r\n"
    );
    assert!(out.logins.is_empty(), "{:?}", out.logins);
}

/// A login command that names its user (APOP, AUTH with an initial response) is judged as
/// that user's, in the case the server folds it to: a rule that keeps eve from logging in
/// (`verbs` on the login commands) holds for `APOP EVE`, for `AUTH PLAIN` naming EVE, and
/// after an earlier `USER bob` (which it used to be judged as).
#[test]
fn a_login_rule_for_a_user_holds_for_apop_and_auth_naming_that_user() {
    use base64::Engine as _;
    const NO_EVE_LOGIN: &str = "[[rule]]\nname = \"no-eve-login\"\non = \"command\"\n\
                                verbs = [\"APOP\", \"AUTH\", \"PASS\"]\nuser = '^eve$'\n\
                                action = \"deny\"\nmessage = \"not here\"\n";
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    for (client, server) in [
        (
            "APOP EVE c4c9334bac560ecc979e58001b3e22fb\r\n".to_owned(),
            vec![&b"+OK hi <1.2@h>\r\n"[..]],
        ),
        (
            format!("AUTH PLAIN {}\r\n", b64("\0EVE\0pw")),
            vec![&b"+OK hi\r\n"[..]],
        ),
        (
            format!("AUTH PLAIN {}\r\n", b64("Eve\0bob\0pw")),
            vec![&b"+OK hi\r\n"[..]],
        ),
        (
            format!("AUTH LOGIN {}\r\n", b64("eVe")),
            vec![&b"+OK hi\r\n"[..]],
        ),
        (
            "USER bob\r\nAPOP eve c4c9334bac560ecc979e58001b3e22fb\r\n".to_owned(),
            vec![&b"+OK hi <1.2@h>\r\n"[..], b"+OK\r\n"],
        ),
    ] {
        let out = same_at_every_chunk(
            || hop_with(folding(), NO_EVE_LOGIN),
            client.as_bytes(),
            &server,
            End::Open,
        );
        assert!(
            !text(&out.upstream).contains("APOP") && !text(&out.upstream).contains("AUTH"),
            "{client}: {}",
            text(&out.upstream)
        );
        assert!(
            text(&out.client).ends_with("-ERR not here\r\n"),
            "{client}: {}",
            text(&out.client)
        );
        assert!(out.logins.is_empty(), "{client}: {:?}", out.logins);
    }
    // bob's own APOP, and AUTH naming bob, go through.
    let out = run(
        &mut hop_with(folding(), NO_EVE_LOGIN),
        format!("APOP Bob x\r\nAUTH PLAIN {}\r\n", b64("\0bob\0pw")).as_bytes(),
        &[b"+OK hi <1.2@h>\r\n", b"-ERR [AUTH] no\r\n", b"+OK in\r\n"],
        64,
        End::Open,
    );
    assert_eq!(
        text(&out.upstream),
        format!("APOP Bob x\r\nAUTH PLAIN {}\r\n", b64("\0bob\0pw"))
    );
}

/// A SASL exchange that names its user only in an answer (AUTH LOGIN's `Username:`, AUTH
/// PLAIN after an empty challenge) is cancelled (`*`) when a rule denies that user: the
/// password never reaches the server and the server's `-ERR` ends the login.
#[test]
fn a_login_rule_for_a_user_cancels_a_sasl_exchange_that_names_that_user() {
    use base64::Engine as _;
    const NO_EVE_LOGIN: &str = "[[rule]]\nname = \"no-eve-login\"\non = \"command\"\n\
                                verbs = [\"AUTH\"]\nuser = '^eve$'\n\
                                action = \"deny\"\nmessage = \"not here\"\n";
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    for (client, challenge) in [
        (
            format!("AUTH LOGIN\r\n{}\r\n", b64("EVE")),
            "+ VXNlcm5hbWU6\r\n",
        ),
        (format!("AUTH PLAIN\r\n{}\r\n", b64("\0eVe\0pw")), "+ \r\n"),
    ] {
        let out = same_at_every_chunk(
            || hop_with(folding(), NO_EVE_LOGIN),
            client.as_bytes(),
            &[b"+OK hi\r\n", challenge.as_bytes(), b"-ERR aborted\r\n"],
            End::Open,
        );
        let verb = client.split("\r\n").next().unwrap();
        assert_eq!(text(&out.upstream), format!("{verb}\r\n*\r\n"), "{client}");
        assert_eq!(
            text(&out.client),
            format!("+OK hi\r\n{challenge}-ERR aborted\r\n"),
            "{client}"
        );
        assert!(
            out.logins.iter().all(|(_, _, ok)| !ok),
            "{client}: {:?}",
            out.logins
        );
    }
    // bob's exchange goes on.
    let client = format!("AUTH LOGIN\r\n{}\r\n{}\r\n", b64("bob"), b64("pw"));
    let out = same_at_every_chunk(
        || hop_with(folding(), NO_EVE_LOGIN),
        client.as_bytes(),
        &[
            b"+OK hi\r\n",
            b"+ VXNlcm5hbWU6\r\n",
            b"+ UGFzc3dvcmQ6\r\n",
            b"+OK in\r\n",
        ],
        End::Open,
    );
    assert_eq!(text(&out.upstream), client);
    assert_eq!(out.logins, [(Some("bob".into()), None, true)]);
}

/// A server keeps the name `USER` gave across a failed APOP or AUTH (Dovecot does): a `PASS`
/// after `USER eve` and an AUTH that failed for bob logs eve in. It must be judged, and the
/// session fixed, as eve's, not as the failed attempt's bob.
#[test]
fn a_failed_auth_or_apop_between_user_and_pass_does_not_rename_the_login() {
    use base64::Engine as _;
    const NO_EVE_PASS: &str = "[[rule]]\nname = \"no-eve-pass\"\non = \"command\"\n\
                               verbs = [\"PASS\"]\nuser = '^eve$'\naction = \"deny\"\n\
                               message = \"not here\"\n";
    let plain = base64::engine::general_purpose::STANDARD.encode("\0bob\0wrong");
    for (client, server) in [
        (
            format!("USER eve\r\nAUTH PLAIN\r\n{plain}\r\nPASS pw\r\n"),
            vec![
                &b"+OK hi\r\n"[..],
                b"+OK\r\n",
                b"+ \r\n",
                b"-ERR [AUTH] failed\r\n",
            ],
        ),
        (
            format!("USER eve\r\nAUTH PLAIN {plain}\r\nPASS pw\r\n"),
            vec![&b"+OK hi\r\n"[..], b"+OK\r\n", b"-ERR [AUTH] failed\r\n"],
        ),
        (
            "USER eve\r\nAPOP bob 0123\r\nPASS pw\r\n".to_owned(),
            vec![
                &b"+OK hi <1.2@h>\r\n"[..],
                b"+OK\r\n",
                b"-ERR [AUTH] failed\r\n",
            ],
        ),
    ] {
        let out = same_at_every_chunk(
            || hop_with(config(), NO_EVE_PASS),
            client.as_bytes(),
            &server,
            End::Open,
        );
        assert!(!text(&out.upstream).contains("PASS"), "{client}");
        assert!(
            text(&out.client).ends_with("-ERR [AUTH] failed\r\n-ERR not here\r\n"),
            "{client}: {}",
            text(&out.client)
        );
    }
    // Without the rule the PASS logs eve in, and the session is eve's.
    let out = run(
        &mut hop_with(config(), ""),
        format!("USER eve\r\nAUTH PLAIN {plain}\r\nPASS pw\r\nSTAT\r\n").as_bytes(),
        &[
            b"+OK hi\r\n",
            b"+OK\r\n",
            b"-ERR [AUTH] failed\r\n",
            b"+OK in\r\n",
            b"+OK 0 0\r\n",
        ],
        1,
        End::Open,
    );
    assert_eq!(
        out.logins,
        [
            (Some("bob".into()), None, false),
            (Some("eve".into()), None, true)
        ]
    );
}

#[test]
fn every_login_method_is_recorded_under_the_folded_name_with_the_typed_one_beside() {
    use base64::Engine as _;
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    let plain_authz = format!("AUTH PLAIN {}\r\n", b64(b"ALICE\0admin\0pw"));
    let plain = format!("AUTH PLAIN {}\r\n", b64(b"\0Alice\0pw"));
    let login = format!("AUTH LOGIN\r\n{}\r\n{}\r\n", b64(b"aLiCe"), b64(b"pw"));
    let cases: Vec<(String, Vec<&[u8]>, &str)> = vec![
        (
            "USER ALICE\r\nPASS pw\r\n".into(),
            after_login(&[]),
            "ALICE",
        ),
        (
            "APOP Alice 0123456789abcdef0123456789abcdef\r\n".into(),
            vec![b"+OK hi <1.2@x>\r\n", b"+OK in\r\n"],
            "Alice",
        ),
        (plain_authz, vec![b"+OK hi\r\n", b"+OK in\r\n"], "ALICE"),
        (plain, vec![b"+OK hi\r\n", b"+OK in\r\n"], "Alice"),
        (
            login,
            vec![
                b"+OK hi\r\n",
                b"+ VXNlcm5hbWU6\r\n",
                b"+ UGFzc3dvcmQ6\r\n",
                b"+OK in\r\n",
            ],
            "aLiCe",
        ),
    ];
    for (client, server, typed) in cases {
        let out = same_at_every_chunk(
            || hop_with(folding(), ""),
            client.as_bytes(),
            &server,
            End::Open,
        );
        assert_eq!(
            out.logins,
            [(Some("alice".into()), Some(typed.into()), true)],
            "{client:?}"
        );
        // What the server gets is what the client sent: the server folds it itself.
        assert_eq!(text(&out.upstream), client);
    }
    // Non-ASCII letters are not folded (Dovecot's %L lowercases ASCII only); the name
    // already in lower case has no second field.
    let out = run(
        &mut hop_with(folding(), ""),
        "USER \u{c9}VE\r\nPASS pw\r\n".as_bytes(),
        &LOGGED_IN,
        64,
        End::Open,
    );
    assert_eq!(
        out.logins,
        [(Some("\u{c9}ve".into()), Some("\u{c9}VE".into()), true)]
    );
    let out = run(
        &mut hop_with(folding(), ""),
        b"USER alice\r\nPASS pw\r\n",
        &LOGGED_IN,
        64,
        End::Open,
    );
    assert_eq!(out.logins, [(Some("alice".into()), None, true)]);
}

#[test]
fn a_server_without_capa_gets_popgates_own_list_with_stls_at_every_chunk_size() {
    let stls = || {
        hop_with(
            HopConfig {
                stls_available: true,
                ..config()
            },
            "",
        )
    };
    let out = same_at_every_chunk(
        stls,
        b"CAPA\r\nSTLS\r\n",
        &[b"+OK\r\n", b"-ERR\r\n"],
        End::Open,
    );
    assert_eq!(
        text(&out.client),
        "+OK\r\n+OK capability list follows\r\nUSER\r\nSTLS\r\n.\r\n+OK begin TLS negotiation\r\n"
    );
    // STLS is this hop's: the upstream got CAPA only.
    assert_eq!(text(&out.upstream), "CAPA\r\n");
    assert_eq!(out.tls_at.len(), 1);
    assert_eq!(out.close, None);
}

#[test]
fn own_capa_after_tls_and_login_lists_what_the_server_has_shown() {
    let tls = || {
        hop_with(
            HopConfig {
                stls_available: true,
                client_tls: true,
                ..config()
            },
            "",
        )
    };
    let out = same_at_every_chunk(
        tls,
        b"CAPA\r\nUSER a\r\nPASS b\r\nUIDL\r\nTOP 1 0\r\nCAPA\r\n",
        &[
            b"+OK\r\n",
            b"-ERR unknown command\r\n",
            b"+OK\r\n",
            b"+OK in\r\n",
            b"+OK\r\n1 x\r\n.\r\n",
            b"+OK\r\nSubject: s\r\n\r\n.\r\n",
            b"-ERR\r\n",
        ],
        End::Open,
    );
    let c = text(&out.client);
    // Under TLS no STLS; before UIDL/TOP were answered, only USER.
    assert!(
        c.starts_with("+OK\r\n+OK capability list follows\r\nUSER\r\n.\r\n+OK\r\n+OK in\r\n"),
        "{c}"
    );
    assert!(
        c.ends_with("+OK capability list follows\r\nUSER\r\nTOP\r\nUIDL\r\n.\r\n"),
        "{c}"
    );
    // A server that has CAPA keeps its own list (rewritten as always), never popgate's.
    let out = run(
        &mut hop_with(config(), ""),
        b"CAPA\r\n",
        &[b"+OK\r\n", b"+OK\r\nTOP\r\nX-SERVER\r\n.\r\n"],
        64,
        End::Open,
    );
    assert_eq!(text(&out.client), "+OK\r\n+OK\r\nTOP\r\nX-SERVER\r\n.\r\n");
}

fn auditing(mode: crate::types::MessageIds) -> impl Fn() -> Hop {
    move || {
        hop_with(
            HopConfig {
                lookups: Some(mode),
                ..config()
            },
            "",
        )
    }
}

#[test]
fn a_pipelined_delete_without_uidl_is_identified_and_the_client_sees_nothing_of_it() {
    use crate::types::MessageIds;
    let mut client = LOGIN.to_vec();
    client.extend_from_slice(b"STAT\r\nRETR 1\r\nDELE 1\r\nDELE 2\r\nQUIT\r\n");
    let body: &[u8] = b"+OK 24 octets\r\nMessage-ID: <a@x>\r\n\r\n..\r\n.\r\n";
    let server = after_login(&[
        b"+OK 2 50\r\n",
        b"+OK 1 uid-one\r\n",
        body,
        b"+OK deleted\r\n",
        b"+OK 2 uid-two\r\n",
        b"+OK deleted\r\n",
        b"+OK bye\r\n",
    ]);
    let out = same_at_every_chunk(auditing(MessageIds::Seen), &client, &server, End::Open);
    assert_eq!(
        text(&out.upstream),
        "USER a\r\nPASS b\r\nSTAT\r\nUIDL 1\r\nRETR 1\r\nDELE 1\r\nUIDL 2\r\nDELE 2\r\nQUIT\r\n"
    );
    let mut seen = LOGGED_IN.concat();
    for r in [
        &b"+OK 2 50\r\n"[..],
        body,
        b"+OK deleted\r\n",
        b"+OK deleted\r\n",
        b"+OK bye\r\n",
    ] {
        seen.extend_from_slice(r);
    }
    assert_eq!(
        text(&out.client),
        text(&seen),
        "the client sees only its own answers"
    );
    assert_eq!(out.injected, ["UIDL 1\r\n", "UIDL 2\r\n"]);
    assert_eq!(
        out.injected_answers,
        [
            (Some(Verb::Uidl), "+OK 1 uid-one\r\n".to_owned()),
            (Some(Verb::Uidl), "+OK 2 uid-two\r\n".to_owned())
        ]
    );
    assert_eq!(out.no_uidl, 0);
}

#[test]
fn always_asks_the_message_id_of_a_deleted_message_never_retrieved() {
    use crate::types::MessageIds;
    let mut client = LOGIN.to_vec();
    client.extend_from_slice(b"DELE 3\r\nQUIT\r\n");
    let top: &[u8] = b"+OK\r\nSubject: x\r\nMessage-ID: <m3@x>\r\n\r\n.\r\n";
    let server = after_login(&[
        b"+OK 3 uid-three\r\n",
        top,
        b"+OK deleted\r\n",
        b"+OK bye\r\n",
    ]);
    let out = same_at_every_chunk(auditing(MessageIds::Always), &client, &server, End::Open);
    assert_eq!(
        text(&out.upstream),
        "USER a\r\nPASS b\r\nUIDL 3\r\nTOP 3 0\r\nDELE 3\r\nQUIT\r\n"
    );
    let mut seen = LOGGED_IN.concat();
    seen.extend_from_slice(b"+OK deleted\r\n+OK bye\r\n");
    assert_eq!(text(&out.client), text(&seen));
    assert_eq!(
        text(&out.injected_body),
        "Subject: x\r\nMessage-ID: <m3@x>\r\n\r\n.\r\n"
    );
    // A server without TOP is not asked again.
    let mut no_top = LOGIN.to_vec();
    no_top.extend_from_slice(b"DELE 1\r\nDELE 2\r\n");
    let server = after_login(&[
        b"+OK 1 u1\r\n",
        b"-ERR unknown command\r\n",
        b"+OK deleted\r\n",
        b"+OK 2 u2\r\n",
        b"+OK deleted\r\n",
    ]);
    let out = same_at_every_chunk(auditing(MessageIds::Always), &no_top, &server, End::Open);
    assert_eq!(
        text(&out.upstream),
        "USER a\r\nPASS b\r\nUIDL 1\r\nTOP 1 0\r\nDELE 1\r\nUIDL 2\r\nDELE 2\r\n"
    );
    assert!(text(&out.client).ends_with("+OK in\r\n+OK deleted\r\n+OK deleted\r\n"));
    // "seen" never probes: the UIDL alone.
    let out = same_at_every_chunk(
        auditing(MessageIds::Seen),
        &client,
        &after_login(&[b"+OK 3 uid-three\r\n", b"+OK deleted\r\n", b"+OK bye\r\n"]),
        End::Open,
    );
    assert_eq!(
        text(&out.upstream),
        "USER a\r\nPASS b\r\nUIDL 3\r\nDELE 3\r\nQUIT\r\n"
    );
}

#[test]
fn a_server_without_uidl_is_recorded_once_and_not_asked_again() {
    use crate::types::MessageIds;
    let mut client = LOGIN.to_vec();
    client.extend_from_slice(b"DELE 9\r\nDELE 1\r\nDELE 2\r\nDELE 3\r\nQUIT\r\n");
    let server = after_login(&[
        // DELE 9: no such message (the -ERR to UIDL 9 proves nothing).
        b"-ERR no such message\r\n",
        b"-ERR no such message\r\n",
        // DELE 1: the message exists, UIDL was refused: no UIDL here.
        b"-ERR unknown command\r\n",
        b"+OK deleted\r\n",
        // Asked while DELE 1's answer was still due (the client pipelines).
        b"-ERR unknown command\r\n",
        b"+OK deleted\r\n",
        b"+OK deleted\r\n",
        b"+OK bye\r\n",
    ]);
    let out = same_at_every_chunk(auditing(MessageIds::Seen), &client, &server, End::Open);
    assert_eq!(
        text(&out.upstream),
        "USER a\r\nPASS b\r\nUIDL 9\r\nDELE 9\r\nUIDL 1\r\nDELE 1\r\nUIDL 2\r\nDELE 2\r\nDELE 3\r\nQUIT\r\n"
    );
    assert_eq!(out.no_uidl, 1);
    let mut seen = LOGGED_IN.concat();
    seen.extend_from_slice(
        b"-ERR no such message\r\n+OK deleted\r\n+OK deleted\r\n+OK deleted\r\n+OK bye\r\n",
    );
    assert_eq!(text(&out.client), text(&seen));
}

#[test]
fn nothing_is_injected_before_login_after_a_uidl_listing_or_with_the_audit_off() {
    use crate::types::MessageIds;
    // Before login: refused locally, nothing reaches the server.
    let out = same_at_every_chunk(
        auditing(MessageIds::Always),
        b"DELE 1\r\nRETR 1\r\n",
        &[b"+OK hi\r\n"],
        End::Open,
    );
    assert!(out.upstream.is_empty(), "{}", text(&out.upstream));
    // The client's own listing names every message.
    let mut client = LOGIN.to_vec();
    client.extend_from_slice(b"UIDL\r\nRETR 1\r\nDELE 1\r\n");
    let server = after_login(&[
        b"+OK\r\n1 uid-one\r\n.\r\n",
        b"+OK 2 octets\r\n\r\n.\r\n",
        b"+OK deleted\r\n",
    ]);
    let out = same_at_every_chunk(auditing(MessageIds::Always), &client, &server, End::Open);
    assert_eq!(
        text(&out.upstream),
        "USER a\r\nPASS b\r\nUIDL\r\nRETR 1\r\nDELE 1\r\n"
    );
    assert!(out.injected.is_empty());
    // The audit trail off: the hop never asks.
    let mut client = LOGIN.to_vec();
    client.extend_from_slice(b"DELE 1\r\n");
    let out = same_at_every_chunk(
        || hop_with(config(), ""),
        &client,
        &after_login(&[b"+OK deleted\r\n"]),
        End::Open,
    );
    assert_eq!(text(&out.upstream), "USER a\r\nPASS b\r\nDELE 1\r\n");
}

#[test]
fn the_upstream_lost_during_a_lookup_answers_the_waiting_command() {
    use crate::types::MessageIds;
    let mut client = LOGIN.to_vec();
    client.extend_from_slice(b"DELE 1\r\n");
    let out = same_at_every_chunk(
        auditing(MessageIds::Seen),
        &client,
        &after_login(&[b"+OK 1 u"]),
        End::UpstreamEof,
    );
    assert!(
        text(&out.client)
            .ends_with("+OK in\r\n-ERR [SYS/TEMP] upstream server closed the connection\r\n"),
        "{}",
        text(&out.client)
    );
    assert!(
        !text(&out.upstream).contains("DELE"),
        "never sent after the loss"
    );
    assert_eq!(out.close, Some((CloseReason::UpstreamEof, false)));
}

/// Feed `client` then `server` at `now` (each if not empty), dispatch the events (answering a
/// failed login with `rec.penalty`) and collect what may go out now.
fn step(
    hop: &mut Hop,
    rec: &mut Rec,
    now: Instant,
    (cin, sin): (&mut BytesMut, &mut BytesMut),
    client: &[u8],
    server: &[u8],
    out: &mut Out,
) {
    if !client.is_empty() {
        cin.extend_from_slice(client);
        hop.on_client_input(now, cin);
    }
    if !server.is_empty() {
        sin.extend_from_slice(server);
        hop.on_server_input(now, sin, cin);
    }
    drain(hop, rec, now, out);
}

fn drain(hop: &mut Hop, rec: &mut Rec, now: Instant, out: &mut Out) {
    rec.take(hop, now);
    while let Some(o) = hop.poll_output() {
        match o {
            Output::ToClient(b) => out.client.extend_from_slice(&b),
            Output::ToUpstream(b) => out.upstream.extend_from_slice(&b),
            Output::StartClientTls => out.tls_at.push(out.client.len()),
            Output::Close(reason) => out.close = Some((reason, hop.mid_response())),
            Output::Login(_)
            | Output::RedialUpstream
            | Output::Dial(_)
            | Output::StartUpstreamTls
            | Output::FetchToken
            | Output::MarkDead(_)
            | Output::MarkAlive(_)
            | Output::UpstreamNotice(_)
            | Output::LoginEnded(_) => panic!("not an output of the hop"),
            Output::Spool(_) | Output::Scan(_) | Output::Unspool | Output::DropSpool => {
                unreachable!("no scanning in these scripts")
            }
        }
    }
}

/// A logged-in hop at `now` with `rules`, and its buffers.
fn logged_in(cfg: HopConfig, rules_text: &str, now: Instant) -> (Hop, Rec, BytesMut, BytesMut) {
    let mut hop = Hop::new(cfg, Policy::new(rules(rules_text)), now, now);
    let (mut cin, mut sin) = (BytesMut::new(), BytesMut::new());
    let mut rec = Rec::default();
    let mut out = Out::default();
    let bufs = (&mut cin, &mut sin);
    step(
        &mut hop,
        &mut rec,
        now,
        bufs,
        LOGIN,
        b"+OK hi\r\n+OK\r\n",
        &mut out,
    );
    step(
        &mut hop,
        &mut rec,
        now,
        (&mut cin, &mut sin),
        b"",
        b"+OK in\r\n",
        &mut out,
    );
    assert_eq!(text(&out.upstream), text(LOGIN));
    assert_eq!(text(&out.client), "+OK hi\r\n+OK\r\n+OK in\r\n");
    (hop, rec, cin, sin)
}

#[test]
fn a_held_reply_does_not_block_reading_further_pipelined_input() {
    let rule = "[[rule]]\nname = \"slow-stat\"\non = \"command\"\nverbs = [\"STAT\"]\naction = \"delay\"\ndelay = \"2s\"\n";
    let t0 = Instant::now();
    let (mut hop, mut rec, mut cin, mut sin) = logged_in(config(), rule, t0);
    let mut out = Out::default();
    step(
        &mut hop,
        &mut rec,
        t0,
        (&mut cin, &mut sin),
        b"STAT\r\n",
        b"",
        &mut out,
    );
    assert!(out.upstream.is_empty(), "{}", text(&out.upstream));
    assert!(hop.holding());
    assert_eq!(hop.poll_timeout(), Some(t0 + Duration::from_secs(2)));
    // The client is still read while the STAT is held, and the server is not.
    assert!(hop.wants_client_input());
    assert!(!hop.wants_server_input());
    let t1 = t0 + Duration::from_secs(1);
    step(
        &mut hop,
        &mut rec,
        t1,
        (&mut cin, &mut sin),
        b"NOOP\r\n",
        b"",
        &mut out,
    );
    assert!(cin.is_empty(), "the pipelined NOOP was read and handled");
    assert!(rec.events.iter().any(
        |e| matches!(e, SessionEvent::ClientCommand(c) if c.line() == b"NOOP\r\n".as_slice())
    ));
    // It waits behind the hold, in its place.
    assert!(out.upstream.is_empty());
    assert_eq!(hop.poll_timeout(), Some(t0 + Duration::from_secs(2)));
    hop.on_timeout(t0 + Duration::from_millis(1999));
    drain(&mut hop, &mut rec, t1, &mut out);
    assert!(out.upstream.is_empty());
    hop.on_timeout(t0 + Duration::from_secs(2));
    drain(&mut hop, &mut rec, t1, &mut out);
    assert_eq!(text(&out.upstream), "STAT\r\nNOOP\r\n");
    assert!(!hop.holding() && hop.wants_server_input());
    let now = t0 + Duration::from_secs(2);
    step(
        &mut hop,
        &mut rec,
        now,
        (&mut cin, &mut sin),
        b"",
        b"+OK 1 3\r\n+OK\r\n",
        &mut out,
    );
    assert_eq!(text(&out.client), "+OK 1 3\r\n+OK\r\n");
    // Read during a hold, but bounded as ever: no more than `max_pipeline` commands wait.
    let (mut hop, mut rec, mut cin, mut sin) = logged_in(
        HopConfig {
            max_pipeline: 2,
            ..config()
        },
        rule,
        t0,
    );
    let mut out = Out::default();
    let bufs = (&mut cin, &mut sin);
    step(
        &mut hop,
        &mut rec,
        t0,
        bufs,
        b"STAT\r\nNOOP\r\nNOOP\r\n",
        b"",
        &mut out,
    );
    assert!(hop.holding());
    assert!(!hop.wants_client_input());
    assert_eq!(text(&cin), "NOOP\r\n");
}

#[test]
fn a_deadline_is_reported_while_holding_and_session_deadlines_still_run() {
    let t0 = Instant::now();
    let failed_login = |penalty: u64| {
        let mut hop = Hop::new(config(), Policy::new(rules("")), t0, t0);
        let (mut cin, mut sin) = (BytesMut::new(), BytesMut::new());
        let mut rec = Rec {
            penalty: Some(Duration::from_secs(penalty)),
            ..Rec::default()
        };
        let mut out = Out::default();
        let bufs = (&mut cin, &mut sin);
        step(
            &mut hop,
            &mut rec,
            t0,
            bufs,
            LOGIN,
            b"+OK hi\r\n+OK\r\n",
            &mut out,
        );
        let t40 = t0 + Duration::from_secs(40);
        let bufs = (&mut cin, &mut sin);
        step(
            &mut hop,
            &mut rec,
            t40,
            bufs,
            b"",
            b"-ERR [AUTH] no\r\n",
            &mut out,
        );
        assert_eq!(text(&out.client), "+OK hi\r\n+OK\r\n");
        (hop, rec, out)
    };
    // The hold ends first (login deadline at 60 s): its end is the deadline reported.
    let (mut hop, mut rec, mut out) = failed_login(10);
    assert_eq!(hop.poll_timeout(), Some(t0 + Duration::from_secs(50)));
    let t50 = t0 + Duration::from_secs(50);
    hop.on_timeout(t50);
    drain(&mut hop, &mut rec, t50, &mut out);
    assert_eq!(text(&out.client), "+OK hi\r\n+OK\r\n-ERR [AUTH] no\r\n");
    assert_eq!(hop.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    assert_eq!(out.close, None);
    // The login deadline comes first: it is reported, and when it passes the session ends
    // at once: the held `-ERR` goes out, then the timeout's.
    let (mut hop, mut rec, mut out) = failed_login(30);
    assert_eq!(hop.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    let t60 = t0 + Duration::from_secs(60);
    hop.on_timeout(t60);
    drain(&mut hop, &mut rec, t60, &mut out);
    assert_eq!(
        text(&out.client),
        "+OK hi\r\n+OK\r\n-ERR [AUTH] no\r\n-ERR disconnected: no login in time\r\n"
    );
    assert_eq!(out.close, Some((CloseReason::LoginTimeout, false)));
    assert_eq!(hop.poll_timeout(), None);
}

#[test]
fn shutdown_during_a_hold_closes_without_quit() {
    // Held commands never reach the server; held replies go out at once.
    // A tarpit holds a RETR and the QUIT pipelined after it: neither reaches the server.
    let rule = "[[rule]]\nname = \"slow-retr\"\non = \"command\"\nverbs = [\"RETR\"]\naction = \"delay\"\ndelay = \"30s\"\n";
    let t0 = Instant::now();
    let (mut hop, mut rec, mut cin, mut sin) = logged_in(config(), rule, t0);
    let mut out = Out::default();
    let bufs = (&mut cin, &mut sin);
    step(
        &mut hop,
        &mut rec,
        t0,
        bufs,
        b"RETR 1\r\nQUIT\r\n",
        b"",
        &mut out,
    );
    assert!(hop.holding());
    hop.on_shutdown();
    drain(&mut hop, &mut rec, t0, &mut out);
    assert!(out.upstream.is_empty(), "{}", text(&out.upstream));
    assert_eq!(text(&out.client), "-ERR [SYS/TEMP] proxy shutting down\r\n");
    assert_eq!(out.close, Some((CloseReason::Shutdown, false)));
    assert_eq!(hop.poll_timeout(), None);
    // A failed login held by the penalty, and a USER read during the hold: the held `-ERR`
    // goes out at once, the USER never reaches the server and the shutdown's `-ERR` answers
    // it.
    let mut hop = hop_with(config(), "");
    let (mut cin, mut sin) = (BytesMut::new(), BytesMut::new());
    let mut rec = Rec {
        penalty: Some(Duration::from_secs(30)),
        ..Rec::default()
    };
    let mut out = Out::default();
    let bufs = (&mut cin, &mut sin);
    step(
        &mut hop,
        &mut rec,
        t0,
        bufs,
        LOGIN,
        b"+OK hi\r\n+OK\r\n",
        &mut out,
    );
    let bufs = (&mut cin, &mut sin);
    step(
        &mut hop,
        &mut rec,
        t0,
        bufs,
        b"USER a\r\n",
        b"-ERR [AUTH] no\r\n",
        &mut out,
    );
    assert!(hop.holding());
    hop.on_shutdown();
    drain(&mut hop, &mut rec, t0, &mut out);
    assert_eq!(
        text(&out.client),
        "+OK hi\r\n+OK\r\n-ERR [AUTH] no\r\n-ERR [SYS/TEMP] proxy shutting down\r\n"
    );
    assert_eq!(text(&out.upstream), text(LOGIN));
    assert_eq!(count(&out.upstream, b"QUIT"), 0);
    assert_eq!(out.close, Some((CloseReason::Shutdown, false)));
    // A response held by a rule, whole: the client gets what the audit trail recorded.
    let rule = "[[rule]]\nname = \"slow-answer\"\non = \"response\"\nanswers = [\"RETR\"]\naction = \"delay\"\ndelay = \"30s\"\n";
    let (mut hop, mut rec, mut cin, mut sin) = logged_in(config(), rule, t0);
    let mut out = Out::default();
    let bufs = (&mut cin, &mut sin);
    step(
        &mut hop,
        &mut rec,
        t0,
        bufs,
        b"RETR 1\r\n",
        b"+OK\r\nx\r\n.\r\n",
        &mut out,
    );
    assert!(hop.holding() && out.client.is_empty());
    hop.on_shutdown();
    drain(&mut hop, &mut rec, t0, &mut out);
    let recorded = std::mem::take(&mut rec.events);
    let relayed = Out::default().with(Rec {
        events: recorded,
        ..Rec::default()
    });
    assert_eq!(
        text(&relayed.event_bytes),
        "+OK hi\r\n+OK\r\n+OK in\r\n+OK\r\nx\r\n.\r\n"
    );
    assert_eq!(
        text(&out.client),
        "+OK\r\nx\r\n.\r\n-ERR [SYS/TEMP] proxy shutting down\r\n"
    );
    assert_eq!(out.close, Some((CloseReason::Shutdown, false)));
}

#[test]
fn events_carry_the_bytes_relayed_at_every_chunk_size() {
    let mut client = LOGIN.to_vec();
    client.extend_from_slice(b"STAT\r\nRETR 1\r\nLIST\r\nQUIT\r\n");
    let server = after_login(&[
        b"+OK 1 12\r\n",
        b"+OK 12 octets\r\nline\r\n..dot\r\n.\r\n",
        b"+OK\r\n1 12\r\n.\r\n",
        b"+OK bye\r\n",
    ]);
    let out = same_at_every_chunk(
        || hop_with(config(), ""),
        &client,
        &server,
        End::UpstreamEof,
    );
    assert_eq!(text(&out.event_bytes), text(&out.client));
    assert_eq!(out.close, Some((CloseReason::Quit, false)));
}

// Content scanning (issue 23): a `scan` rule holds a RETR/TOP body for the scanners.

/// The same output at every chunk size, with `answer` as the scanners.
fn same_at_every_chunk_scanning(
    make: impl Fn() -> Hop,
    client: &[u8],
    server: &[&[u8]],
    end: End,
    answer: Answer<'_>,
) -> Out {
    let longest = client.len().max(server.iter().map(|r| r.len()).sum());
    let want = run_scanning(&mut make(), client, server, longest, end, answer);
    for chunk in 1..=longest {
        let got = run_scanning(&mut make(), client, server, chunk, end, answer);
        assert_eq!(got, want, "chunk size {chunk}");
    }
    assert_eq!(want.spool_left, 0, "a spool was left behind");
    want
}

const SCAN_RULE: &str = "[[rule]]\nname = \"s\"\non = \"command\"\nverbs = [\"RETR\", \"TOP\"]\naction = \"scan\"\nscan = [\"clamav\", \"rspamd\"]\n";

/// What the client gets for [`LOGIN`] against [`LOGGED_IN`].
const LOGIN_REPLIES: &str = "+OK hi\r\n+OK\r\n+OK in\r\n";

fn policy() -> ScanPolicy {
    let mut p = ScanPolicy::new(&[], &crate::config::scan::ScanConfig::default());
    p.max_size = vec![
        (Arc::from("clamav"), 1 << 20),
        (Arc::from("rspamd"), 1 << 20),
    ];
    p.notice_from = "Mail Proxy <postmaster@example.net>".into();
    p.contact = ".postmaster@example.net".into();
    p
}

/// One row of the scanning scenarios: a hop with `policy` and `rule`, logged in as `a`; the
/// client sends `commands`, the server answers `answers` in turn, the scanners `scanners`.
/// [`ScanCase::run`] runs it at every chunk size and checks what the row states.
struct ScanCase<'a> {
    /// The `[scan]` policy; `None`: no scanner configured.
    policy: Option<ScanPolicy>,
    /// The rules.
    rule: &'a str,
    /// What the client sends after the login.
    commands: &'a str,
    /// The server's answers after the login, one per command it is sent.
    answers: &'a [&'a [u8]],
    /// The scanners' reports for a scan request.
    scanners: Answer<'a>,
    /// What the client gets after the login's replies, exactly (unchecked if `None`).
    client: Option<String>,
    /// What the server gets after the login, exactly (unchecked if `None`).
    upstream: Option<&'a str>,
    /// The actions of the `Scanned` events, in order.
    actions: &'a [&'a str],
}

impl<'a> ScanCase<'a> {
    /// [`policy`] and [`SCAN_RULE`]; the client and the server unchecked, no `Scanned` event.
    fn new(commands: &'a str, answers: &'a [&'a [u8]], scanners: Answer<'a>) -> ScanCase<'a> {
        ScanCase {
            policy: Some(policy()),
            rule: SCAN_RULE,
            commands,
            answers,
            scanners,
            client: None,
            upstream: None,
            actions: &[],
        }
    }

    fn make(&self) -> impl Fn() -> Hop + use<'_> {
        let scan = self.policy.clone().map(Arc::new);
        move || {
            hop_with(
                HopConfig {
                    scan: scan.clone(),
                    ..config()
                },
                self.rule,
            )
        }
    }

    fn client_bytes(&self) -> Vec<u8> {
        [LOGIN, self.commands.as_bytes()].concat()
    }

    /// One run with `chunk`-byte pieces.
    fn run_at(&self, chunk: usize) -> Out {
        let server = after_login(self.answers);
        let client = self.client_bytes();
        run_scanning(
            &mut self.make()(),
            &client,
            &server,
            chunk,
            End::Open,
            self.scanners,
        )
    }

    /// Run at every chunk size (the same output at each) and check the row.
    fn run(self) -> Out {
        let out = same_at_every_chunk_scanning(
            self.make(),
            &self.client_bytes(),
            &after_login(self.answers),
            End::Open,
            self.scanners,
        );
        self.check(&out, "at every chunk size");
        out
    }

    /// Check what the row states of `out` (`at`: where, for the messages).
    fn check(&self, out: &Out, at: &str) {
        let client = text(&out.client);
        let after = client
            .strip_prefix(LOGIN_REPLIES)
            .unwrap_or_else(|| panic!("{at}: no login: {client}"));
        if let Some(want) = &self.client {
            assert_eq!(after, want, "{at}: the client");
        }
        if let Some(want) = self.upstream {
            assert_eq!(
                text(&out.upstream),
                format!("{}{want}", text(LOGIN)),
                "{at}: the server"
            );
        }
        let actions: Vec<&str> = out.scanned.iter().map(|s| s.1).collect();
        assert_eq!(actions, self.actions, "{at}: the actions");
    }
}

fn report(name: &str, verdict: ScanVerdict, detail: Option<&str>) -> ScanReport {
    ScanReport {
        scanner: Arc::from(name),
        verdict,
        detail: detail.map(str::to_owned),
        score: None,
        duration: Duration::from_millis(5),
    }
}

/// Every scanner says `verdict`.
fn all(verdict: ScanVerdict) -> impl Fn(&ScanRequest) -> Vec<ScanReport> {
    move |req| {
        req.scanners
            .iter()
            .map(|n| report(n, verdict, None))
            .collect()
    }
}

/// clamav finds malware, rspamd says clean.
fn infected(req: &ScanRequest) -> Vec<ScanReport> {
    req.scanners
        .iter()
        .map(|n| match &**n {
            "clamav" => report(n, ScanVerdict::Infected, Some("Eicar-Test-Signature")),
            _ => report(n, ScanVerdict::Clean, None),
        })
        .collect()
}

/// rspamd says spam (score 12.5 of 6), clamav clean.
fn spam(req: &ScanRequest) -> Vec<ScanReport> {
    req.scanners
        .iter()
        .map(|n| match &**n {
            "rspamd" => ScanReport {
                score: Some((12.5, 6.0)),
                ..report(n, ScanVerdict::Spam, Some("add header"))
            },
            _ => report(n, ScanVerdict::Clean, None),
        })
        .collect()
}

/// A scanner that must not be asked.
fn not_scanned(_: &ScanRequest) -> Vec<ScanReport> {
    unreachable!("not scanned")
}

/// A message with a dot-stuffed line, a folded Subject and a line that is a lone dot.
const MESSAGE: &[u8] = b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: Hello\r\n there\r\nDate: Sun, 06 Dec 2026 10:00:00 +0100\r\nMessage-ID: <m1@example.org>\r\n\r\nHi Bob,\r\n..dot-stuffed\r\n..\r\nbye\r\n";

/// `+OK` with `MESSAGE`'s size, the message, the terminator.
fn retr_answer() -> Vec<u8> {
    let mut v = format!("+OK {} octets\r\n", MESSAGE.len()).into_bytes();
    v.extend_from_slice(MESSAGE);
    v.extend_from_slice(b".\r\n");
    v
}

/// The answer to `RETR 1` with `lines` put between the status line and `MESSAGE`.
fn retr_with(lines: &str) -> String {
    format!(
        "+OK {} octets\r\n{lines}{}.\r\n",
        MESSAGE.len(),
        text(MESSAGE)
    )
}

#[test]
fn a_clean_scanned_message_is_byte_identical_and_the_spool_held_its_wire_bytes() {
    let answer = retr_answer();
    let answers: &[&[u8]] = &[&answer, b"+OK bye\r\n"];
    let clean = all(ScanVerdict::Clean);
    let row = ScanCase::new("RETR 1\r\nQUIT\r\n", answers, &clean);
    let plain = same_at_every_chunk(
        || hop_with(config(), ""),
        &row.client_bytes(),
        &after_login(answers),
        End::Open,
    );
    let out = ScanCase {
        client: Some(text(&plain.client)[LOGIN_REPLIES.len()..].to_owned()),
        actions: &["delivered"],
        ..row
    }
    .run();
    assert_eq!(out.scans.len(), 1);
    let asked = &out.scans[0];
    assert_eq!(asked.scanners, ["clamav", "rspamd"]);
    assert_eq!(asked.msg, 1);
    assert_eq!(
        asked.spool,
        text(MESSAGE),
        "wire bytes, without the terminator"
    );
    assert!(
        !asked.client.contains("octets"),
        "the status line is held: {}",
        asked.client
    );
    assert_eq!(
        out.scanned,
        [(
            1,
            "delivered",
            vec!["clamav=clean".into(), "rspamd=clean".into()]
        )]
    );
    // The events carry what the server sent.
    assert_eq!(text(&out.event_bytes), text(&plain.event_bytes));
}

#[test]
fn header_true_adds_one_line_after_the_status_line() {
    let answer = retr_answer();
    ScanCase {
        policy: Some(ScanPolicy {
            header: true,
            ..policy()
        }),
        client: Some(retr_with(
            "X-Popgate-Scan: clean; clamav=clean, rspamd=clean\r\n",
        )),
        actions: &["delivered"],
        ..ScanCase::new("RETR 1\r\n", &[&answer], &all(ScanVerdict::Clean))
    }
    .run();
}

#[test]
fn spam_is_tagged_with_its_score_and_the_framing_stays() {
    let answer = retr_answer();
    ScanCase {
        client: Some(
            retr_with("X-Spam-Status: Yes, score=12.50 required=6.00\r\nX-Spam-Score: 12.50\r\n")
                + "+OK\r\n",
        ),
        actions: &["tagged"],
        ..ScanCase::new("RETR 1\r\nNOOP\r\n", &[&answer, b"+OK\r\n"], &spam)
    }
    .run();
    // Tagged infected: the verdict is named.
    ScanCase {
        policy: Some(ScanPolicy {
            on_virus: crate::config::scan::OnVirus::Tag,
            ..policy()
        }),
        client: Some(retr_with(
            "X-Popgate-Scan: infected; clamav=infected (Eicar-Test-Signature), rspamd=clean\r\n",
        )),
        actions: &["tagged"],
        ..ScanCase::new("RETR 1\r\n", &[&answer], &infected)
    }
    .run();
}

/// The notice the client got: its status line's size and its lines (un-stuffed).
fn notice_lines(client: &str) -> Vec<String> {
    let start = client.rfind("+OK in\r\n").unwrap() + "+OK in\r\n".len();
    let reply = &client[start..];
    let (status, rest) = reply.split_once("\r\n").unwrap();
    let body = rest.strip_suffix(".\r\n").expect("terminated");
    let octets: usize = status
        .strip_prefix("+OK ")
        .and_then(|s| s.strip_suffix(" octets"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        octets,
        body.len(),
        "the status line states the notice's size"
    );
    assert!(body.ends_with("\r\n"));
    let lines: Vec<String> = body
        .strip_suffix("\r\n")
        .unwrap()
        .split("\r\n")
        .map(|l| {
            assert!(
                !l.contains('\n') && !l.contains('\r'),
                "bare line end: {l:?}"
            );
            assert!(l.len() <= 998, "line too long");
            assert!(
                l.bytes().all(|b| b == b' ' || b.is_ascii_graphic()),
                "{l:?}"
            );
            match l.strip_prefix('.') {
                Some(rest) => {
                    assert!(rest.starts_with('.'), "not dot-stuffed: {l:?}");
                    rest.to_owned()
                }
                None => l.to_owned(),
            }
        })
        .collect();
    lines
}

#[test]
fn an_infected_message_is_replaced_by_a_well_formed_dot_stuffed_notice() {
    let answer = retr_answer();
    let out = ScanCase {
        upstream: Some("UIDL 1\r\nRETR 1\r\nDELE 1\r\n"),
        actions: &["replaced"],
        ..ScanCase::new(
            "UIDL 1\r\nRETR 1\r\nDELE 1\r\n",
            &[b"+OK 1 uid-0001\r\n", &answer, b"+OK marked\r\n"],
            &infected,
        )
    }
    .run();
    let c = text(&out.client);
    assert!(c.ends_with(".\r\n+OK marked\r\n"), "DELE relayed: {c}");
    assert_eq!(out.spools_dropped, 1);
    let c = c.strip_suffix("+OK marked\r\n").unwrap();
    let c = &c[c.find("+OK 1 uid-0001\r\n").unwrap() + 16..];
    let lines = notice_lines(&format!("+OK in\r\n{c}"));
    let blank = lines
        .iter()
        .position(String::is_empty)
        .expect("a header block");
    let (head, body) = lines.split_at(blank);
    let field = |name: &str| {
        head.iter()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name}: {head:?}"))
            .to_owned()
    };
    assert_eq!(field("From"), "Mail Proxy <postmaster@example.net>");
    assert_eq!(field("To"), "bob@example.net");
    assert_eq!(field("Date"), "Sun, 06 Dec 2026 10:00:00 +0100");
    assert_eq!(field("Subject"), "[malware removed] Hello there");
    assert_eq!(field("Message-ID"), "<notice.m1@example.org>");
    assert_eq!(field("MIME-Version"), "1.0");
    assert_eq!(field("Content-Type"), "text/plain; charset=us-ascii");
    for l in head {
        assert!(
            l.split_once(": ")
                .is_some_and(|(n, _)| n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')),
            "{l:?}"
        );
    }
    let body = body.join("\n");
    for want in [
        "clamav: infected (Eicar-Test-Signature)",
        "From:       Alice <alice@example.org>",
        "Subject:    Hello there",
        "Message-ID: <m1@example.org>",
        "UIDL:       uid-0001",
        "stays on the server",
        ".postmaster@example.net.",
    ] {
        assert!(body.contains(want), "{want:?} in {body}");
    }
}

#[test]
fn a_notice_without_date_or_message_id_gets_the_drivers_date_and_a_derived_id() {
    let out = ScanCase {
        policy: Some(ScanPolicy {
            on_spam: crate::config::scan::OnSpam::Replace,
            ..policy()
        }),
        actions: &["replaced"],
        ..ScanCase::new(
            "RETR 2\r\n",
            &[b"+OK\r\nSubject: x\r\n\r\nbody\r\n.\r\n"],
            &spam,
        )
    }
    .run();
    let lines = notice_lines(&text(&out.client));
    assert!(lines.contains(&format!("Date: {DATE}")), "{lines:?}");
    assert!(lines.contains(&"Subject: [spam removed] x".to_owned()));
    let id = lines
        .iter()
        .find_map(|l| l.strip_prefix("Message-ID: "))
        .unwrap();
    assert!(
        id.starts_with("<notice.2.") && id.ends_with("@popgate.invalid>"),
        "{id}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("To:")),
        "no To: invented"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("score 12.50 (required 6.00)"))
    );
}

#[test]
fn deny_answers_err_and_drops_the_spool() {
    let answer = retr_answer();
    let out = ScanCase {
        policy: Some(ScanPolicy {
            on_virus: crate::config::scan::OnVirus::Deny,
            ..policy()
        }),
        client: Some(format!(
            "{}\r\n+OK 1 10\r\n",
            crate::pop3::replies::SCAN_DENIED
        )),
        actions: &["denied"],
        ..ScanCase::new(
            "RETR 1\r\nLIST 1\r\n",
            &[&answer, b"+OK 1 10\r\n"],
            &infected,
        )
    }
    .run();
    assert_eq!(out.spools_dropped, 1);
}

#[test]
fn a_tempfailed_message_is_not_deleted_on_the_clients_behalf() {
    let answer = retr_answer();
    let rspamd_down = |req: &ScanRequest| {
        let mut r = all(ScanVerdict::Clean)(req);
        r[1] = report("rspamd", ScanVerdict::Error, Some("connection refused"));
        r
    };
    // The server answers RETR 1, then QUIT: it never sees DELE 1.
    ScanCase {
        upstream: Some("RETR 1\r\nLIST 2\r\nQUIT\r\n"),
        client: Some(format!(
            "{}\r\n{}\r\n+OK 2 10\r\n+OK bye\r\n",
            crate::pop3::replies::SCAN_TEMPFAIL,
            crate::pop3::replies::SCAN_DELE_TEMPFAILED
        )),
        actions: &["tempfailed"],
        ..ScanCase::new(
            "RETR 1\r\nDELE 1\r\nLIST 2\r\nQUIT\r\n",
            &[&answer, b"+OK 2 10\r\n", b"+OK bye\r\n"],
            &rspamd_down,
        )
    }
    .run();
    // With on_error = "pass" it arrives, tagged unscanned, and the DELE is relayed.
    ScanCase {
        policy: Some(ScanPolicy {
            on_error: crate::config::scan::OnScanError::Pass,
            ..policy()
        }),
        client: Some(
            retr_with("X-Popgate-Scan: unscanned (error); clamav=error, rspamd=error\r\n")
                + "+OK marked\r\n",
        ),
        actions: &["unscanned"],
        ..ScanCase::new(
            "RETR 1\r\nDELE 1\r\n",
            &[&answer, b"+OK marked\r\n"],
            &all(ScanVerdict::Error),
        )
    }
    .run();
}

#[test]
fn a_retrieval_whose_status_states_more_than_the_cap_goes_at_once_unscanned() {
    let out = ScanCase {
        client: Some(
            "+OK 31457280 octets\r\nX-Popgate-Scan: unscanned (too large)\r\nSubject: big\r\n\r\nx\r\n.\r\n"
                .into(),
        ),
        actions: &["unscanned"],
        ..ScanCase::new(
            "RETR 1\r\n",
            &[b"+OK 31457280 octets\r\nSubject: big\r\n\r\nx\r\n.\r\n"],
            &not_scanned,
        )
    }
    .run();
    assert!(out.scans.is_empty());
    assert_eq!(
        out.scanned,
        [(
            1,
            "unscanned",
            vec!["clamav=too_large".into(), "rspamd=too_large".into()]
        )]
    );
}

#[test]
fn a_body_that_passes_the_cap_mid_stream_is_released_unscanned_at_every_chunk_size() {
    let mut p = policy();
    p.max_size = vec![(Arc::from("clamav"), 40), (Arc::from("rspamd"), 20)];
    let answer = retr_answer();
    let answers: &[&[u8]] = &[&answer, b"+OK\r\n"];
    let row = ScanCase {
        policy: Some(p),
        client: Some(retr_with("X-Popgate-Scan: unscanned (too large)\r\n") + "+OK\r\n"),
        actions: &["unscanned"],
        ..ScanCase::new("RETR 1\r\nNOOP\r\n", answers, &not_scanned)
    };
    // What is spooled before the cap is passed depends on the chunks: the client's bytes not.
    for chunk in 1..=after_login(row.answers).iter().map(|r| r.len()).sum() {
        let out = row.run_at(chunk);
        row.check(&out, &format!("chunk size {chunk}"));
        assert_eq!(out.spool_left, 0, "chunk size {chunk}");
    }
}

#[test]
fn pipelined_retrievals_and_a_delete_stay_in_order_and_wait_for_each_verdict() {
    let a1 = retr_answer();
    let commands = "RETR 1\r\nRETR 2\r\nDELE 1\r\nQUIT\r\n";
    let out = ScanCase {
        upstream: Some(commands),
        actions: &["delivered", "replaced"],
        ..ScanCase::new(
            commands,
            &[
                &a1,
                b"+OK 8 octets\r\nSubject: two\r\n\r\n.\r\n",
                b"+OK marked\r\n",
                b"+OK bye\r\n",
            ],
            &|req: &ScanRequest| {
                if req.msg == 2 {
                    infected(req)
                } else {
                    all(ScanVerdict::Clean)(req)
                }
            },
        )
    }
    .run();
    // Nothing after a selected retrieval reached the server before its verdict.
    assert!(out.scans[0].upstream.ends_with("RETR 1\r\n"));
    assert!(out.scans[1].upstream.ends_with("RETR 2\r\n"));
    let c = text(&out.client);
    let one = c.find(&text(MESSAGE)).unwrap();
    let two = c.find("[malware removed] two").unwrap();
    let marked = c.find("+OK marked").unwrap();
    assert!(
        one < two && two < marked && c.ends_with("+OK marked\r\n+OK bye\r\n"),
        "{c}"
    );
}

#[test]
fn top_is_scanned_when_selected_and_retr_not_when_unselected() {
    let top = b"+OK\r\nSubject: t\r\n\r\nline\r\n.\r\n";
    let answer = retr_answer();
    let out = ScanCase {
        rule: "[[rule]]\nname = \"s\"\non = \"command\"\nverbs = \"TOP\"\naction = \"scan\"\nscan = \"clamav\"\n",
        client: Some(text(top) + &text(&answer)),
        actions: &["delivered"],
        ..ScanCase::new(
            "TOP 1 1\r\nRETR 1\r\n",
            &[top, &answer],
            &all(ScanVerdict::Clean),
        )
    }
    .run();
    assert_eq!(out.scans.len(), 1, "only the TOP");
    assert_eq!(out.scans[0].spool, "Subject: t\r\n\r\nline\r\n");
    // Without a scanner configured, scan rules are inert.
    let out = ScanCase {
        policy: None,
        client: Some(text(&answer)),
        ..ScanCase::new("RETR 1\r\n", &[&answer], &not_scanned)
    }
    .run();
    assert!(out.scans.is_empty() && out.scanned.is_empty());
}

#[test]
fn an_err_to_a_selected_retrieval_is_relayed_and_the_next_command_goes_on() {
    ScanCase {
        client: Some("-ERR no such message\r\n+OK 0 0\r\n".into()),
        ..ScanCase::new(
            "RETR 9\r\nSTAT\r\n",
            &[b"-ERR no such message\r\n", b"+OK 0 0\r\n"],
            &not_scanned,
        )
    }
    .run();
}

/// A logged-in hop with the scan rule after the client sent `commands` and the server
/// `answer`: the hop, the client's buffer, what came out and the kinds of [`drain_scanning`].
fn scanning_after(
    now: Instant,
    commands: &[u8],
    answer: &[u8],
) -> (Hop, BytesMut, Out, Vec<&'static str>) {
    let cfg = HopConfig {
        scan: Some(Arc::new(policy())),
        ..config()
    };
    let (mut hop, mut rec, mut cin, mut sin) = logged_in(cfg, SCAN_RULE, now);
    let mut out = Out::default();
    cin.extend_from_slice(commands);
    hop.on_client_input(now, &mut cin);
    sin.extend_from_slice(answer);
    hop.on_server_input(now, &mut sin, &mut cin);
    rec.take(&mut hop, now);
    let kinds = drain_scanning(&mut hop, &mut out);
    (hop, cin, out, kinds)
}

/// A hop holding `RETR 1`'s body for its verdict, and what came out so far.
fn waiting_for_a_verdict(now: Instant) -> (Hop, BytesMut, Out) {
    let (hop, cin, out, kinds) = scanning_after(now, b"RETR 1\r\nDELE 1\r\n", &retr_answer());
    assert_eq!(text(&out.upstream), "RETR 1\r\n", "DELE 1 waits");
    assert_eq!(kinds.last(), Some(&"scan"));
    assert!(hop.holding() && !hop.wants_client_input() && !hop.mid_response());
    assert_eq!(hop.poll_timeout(), None, "no idle deadline while waiting");
    (hop, cin, out)
}

/// Collect what may go out now: the bytes and the close in `out`, the kinds of the scanning
/// outputs returned.
fn drain_scanning(hop: &mut Hop, out: &mut Out) -> Vec<&'static str> {
    let mut kinds = Vec::new();
    while let Some(o) = hop.poll_output() {
        match o {
            Output::ToClient(b) => out.client.extend_from_slice(&b),
            Output::ToUpstream(b) => out.upstream.extend_from_slice(&b),
            Output::Close(reason) => out.close = Some((reason, hop.mid_response())),
            Output::Spool(_) => kinds.push("spool"),
            Output::Scan(_) => kinds.push("scan"),
            Output::DropSpool => kinds.push("drop"),
            Output::Unspool => kinds.push("unspool"),
            other => panic!("{other:?}"),
        }
    }
    kinds
}

#[test]
fn shutdown_during_a_verdict_wait_answers_err_and_drops_the_spool() {
    let t0 = Instant::now();
    let (mut hop, mut cin, mut out) = waiting_for_a_verdict(t0);
    hop.on_shutdown();
    assert_eq!(drain_scanning(&mut hop, &mut out), ["drop"]);
    assert_eq!(
        text(&out.client),
        format!("{}\r\n", crate::pop3::replies::SHUTTING_DOWN)
    );
    assert_eq!(out.close, Some((CloseReason::Shutdown, false)));
    assert_eq!(text(&out.upstream), "RETR 1\r\n", "the DELE never went");
    // A verdict that comes late changes nothing.
    hop.scan_done(
        t0,
        DATE,
        infected(&ScanRequest {
            scanners: vec![Arc::from("clamav")].into(),
            msg: 1,
        }),
        &mut cin,
    );
    assert_eq!(drain_scanning(&mut hop, &mut out), Vec::<&str>::new());
}

#[test]
fn the_upstream_lost_during_a_verdict_wait_answers_err() {
    let t0 = Instant::now();
    let (mut hop, _cin, mut out) = waiting_for_a_verdict(t0);
    hop.on_upstream_eof();
    assert_eq!(drain_scanning(&mut hop, &mut out), ["drop"]);
    assert_eq!(
        text(&out.client),
        format!("{}\r\n", crate::pop3::replies::UPSTREAM_CLOSED)
    );
    assert_eq!(out.close, Some((CloseReason::UpstreamEof, false)));
}

#[test]
fn a_client_that_half_closes_during_a_verdict_wait_still_gets_the_message() {
    let t0 = Instant::now();
    let (mut hop, mut cin, mut out) = waiting_for_a_verdict(t0);
    cin.clear();
    hop.on_client_eof();
    assert_eq!(drain_scanning(&mut hop, &mut out), Vec::<&str>::new());
    let req = ScanRequest {
        scanners: vec![Arc::from("clamav"), Arc::from("rspamd")].into(),
        msg: 1,
    };
    hop.scan_done(t0, DATE, all(ScanVerdict::Clean)(&req), &mut cin);
    assert_eq!(drain_scanning(&mut hop, &mut out), ["unspool"]);
    assert_eq!(
        text(&out.client),
        format!("+OK {} octets\r\n.\r\n", MESSAGE.len())
    );
    assert_eq!(out.close, Some((CloseReason::ClientEof, false)));
}

#[test]
fn shutdown_while_a_selected_body_is_arriving_answers_err_without_a_reset() {
    let t0 = Instant::now();
    let (mut hop, _cin, mut out, kinds) =
        scanning_after(t0, b"RETR 1\r\n", b"+OK 100 octets\r\nSubject: half\r\n");
    assert_eq!(kinds, ["spool"]);
    assert!(
        !hop.mid_response(),
        "the client has seen nothing of the reply"
    );
    hop.on_shutdown();
    assert_eq!(drain_scanning(&mut hop, &mut out), ["drop"]);
    assert_eq!(
        text(&out.client),
        format!("{}\r\n", crate::pop3::replies::SHUTTING_DOWN)
    );
    assert_eq!(out.close, Some((CloseReason::Shutdown, false)));
}

#[test]
fn a_message_number_past_u32_is_refused_not_relayed_unscanned() {
    // A server that reads numbers modulo 2^32 (or clamps them) would answer `RETR
    // 4294967297` with message 1: popgate, which cannot name the message, must not relay it
    // unscanned, nor a DELE it cannot check against the tempfailed messages.
    let no = crate::pop3::replies::NO_SUCH_MESSAGE;
    ScanCase {
        upstream: Some("QUIT\r\n"),
        client: Some(format!("{no}\r\n{no}\r\n{no}\r\n+OK bye\r\n")),
        ..ScanCase::new(
            "RETR 4294967297\r\nTOP 04294967297 5\r\nDELE 99999999999\r\nQUIT\r\n",
            &[b"+OK bye\r\n"],
            &not_scanned,
        )
    }
    .run();
    // Leading zeros name the message all the same: scanned.
    let answer = retr_answer();
    let out = ScanCase {
        actions: &["delivered"],
        ..ScanCase::new("retr\t 001 \r\n", &[&answer], &all(ScanVerdict::Clean))
    }
    .run();
    assert_eq!(out.scans.len(), 1);
    assert_eq!(out.scans[0].msg, 1);
}

#[test]
fn a_spool_that_cannot_be_written_gets_the_client_a_tempfail_not_a_cut_message() {
    // The disk under `spool_dir` fills up mid-body: the driver tells the hop. The client,
    // which saw nothing of the retrieval, gets `-ERR [SYS/TEMP]`; the pipelined DELE never
    // reaches the server.
    let (mut hop, _cin, mut out, kinds) = scanning_after(
        Instant::now(),
        b"RETR 1\r\nDELE 1\r\nQUIT\r\n",
        b"+OK 5000 octets\r\nSubject: x\r\n\r\npart of the body\r\n",
    );
    assert_eq!(kinds, ["spool"], "part of the body was spooled");
    hop.on_spool_error();
    drain_scanning(&mut hop, &mut out);
    assert_eq!(
        text(&out.client),
        format!("{}\r\n", crate::pop3::replies::SCAN_TEMPFAIL)
    );
    assert_eq!(
        out.close,
        Some((CloseReason::Error, false)),
        "no reset: not mid-body"
    );
    assert_eq!(text(&out.upstream), "RETR 1\r\n");
}

#[test]
fn a_tempfailed_message_is_not_deleted_under_any_spelling_of_dele() {
    let answer = retr_answer();
    // RETR 1 tempfails; every DELE of it is answered locally; the server sees RSET and QUIT.
    let refused = crate::pop3::replies::SCAN_DELE_TEMPFAILED;
    ScanCase {
        upstream: Some("retr 1\r\nRSET\r\nQUIT\r\n"),
        client: Some(format!(
            "{}\r\n{refused}\r\n{refused}\r\n{refused}\r\n+OK\r\n{refused}\r\n+OK bye\r\n",
            crate::pop3::replies::SCAN_TEMPFAIL
        )),
        actions: &["tempfailed"],
        ..ScanCase::new(
            "retr 1\r\ndele 1\r\nDELE\t1\r\nDELE  01 \r\nRSET\r\nDele 0001\r\nQUIT\r\n",
            &[&answer, b"+OK\r\n", b"+OK bye\r\n"],
            &all(ScanVerdict::Error),
        )
    }
    .run();
}
