//! The upstream dialogue driven without sockets, every path at every chunk size: a scripted
//! server answers each write, its bytes are fed `chunk` at a time whenever the dialogue waits,
//! and a server that has nothing more to say closes.

use base64::Engine as _;

use super::*;
use crate::config::Oauth2Mechanism;
use crate::proxy::front::Front;

/// Marks the end of a TLS handshake among the writes.
const TLS: &[u8] = b"<TLS>";

/// What one run did.
#[derive(Debug, PartialEq, Eq)]
struct Trace {
    /// Every write, in order, with [`TLS`] where a handshake completed.
    wrote: Vec<Vec<u8>>,
    notices: Vec<Notice>,
    connected: bool,
    tokens_fetched: usize,
    /// `LoggedIn` or `Failed`, or `None` when the dialogue ended at `Connected`.
    end: Option<Step>,
    preread: Vec<u8>,
}

/// A server: its greeting, then per write (after the PROXY header) the expected start of the
/// write and the answer.
struct Script<'a> {
    greeting: &'a [u8],
    turns: Vec<(&'a [u8], &'a [u8])>,
}

fn run(plan: &Plan, script: &Script<'_>, chunk: usize, tls_ok: bool) -> Trace {
    let mut d = Dialogue::new(plan.clone());
    let mut pending: Vec<u8> = script.greeting.to_vec();
    let mut turns = script.turns.iter();
    let mut t = Trace {
        wrote: Vec::new(),
        notices: Vec::new(),
        connected: false,
        tokens_fetched: 0,
        end: None,
        preread: Vec::new(),
    };
    let mut first = true;
    for _ in 0..100_000 {
        while let Some(step) = d.poll() {
            match step {
                Step::Write(bytes) => {
                    let header = first && plan.proxy_header.as_deref() == Some(&bytes[..]);
                    first = false;
                    if !header {
                        let (expect, answer) =
                            turns.next().expect("a write the script has no turn for");
                        assert!(
                            bytes.starts_with(expect),
                            "wrote {:?}, expected {:?}",
                            String::from_utf8_lossy(&bytes),
                            String::from_utf8_lossy(expect)
                        );
                        pending.extend_from_slice(answer);
                    }
                    t.wrote.push(bytes);
                }
                Step::StartTls => {
                    if tls_ok {
                        t.wrote.push(TLS.to_vec());
                        d.tls_done();
                    } else {
                        d.tls_failed(&"bad certificate");
                    }
                }
                Step::FetchToken => {
                    t.tokens_fetched += 1;
                    d.fresh_token("fresh".into());
                }
                Step::Notice(n) => t.notices.push(n),
                Step::Connected => {
                    t.connected = true;
                    if plan.login.is_none() {
                        t.preread = d.take_preread();
                    }
                }
                end @ (Step::LoggedIn { .. } | Step::Failed(_)) => {
                    assert!(d.finished());
                    assert_eq!(d.poll(), None, "nothing after the end");
                    t.end = Some(end);
                    return t;
                }
            }
        }
        if d.finished() {
            return t;
        }
        if pending.is_empty() {
            d.on_server_eof();
        } else {
            let n = chunk.min(pending.len());
            let bytes: Vec<u8> = pending.drain(..n).collect();
            d.on_server_bytes(&bytes);
        }
    }
    panic!("the dialogue never ended");
}

/// [`every_chunk`] with a server that greets with `greeting` and answers from `turns`.
fn served(plan: &Plan, greeting: &[u8], turns: Vec<(&[u8], &[u8])>) -> Trace {
    every_chunk(plan, &Script { greeting, turns })
}

/// [`served`] by a server that greets with `+OK hi`.
fn served_hi(plan: &Plan, turns: Vec<(&[u8], &[u8])>) -> Trace {
    served(plan, b"+OK hi\r\n", turns)
}

/// [`run`] at every chunk size from 1 to all the server's bytes: the same trace each time.
fn every_chunk(plan: &Plan, script: &Script<'_>) -> Trace {
    let total = script.greeting.len() + script.turns.iter().map(|(_, a)| a.len()).sum::<usize>();
    let whole = run(plan, script, total.max(1), true);
    for chunk in 1..=total {
        assert_eq!(run(plan, script, chunk, true), whole, "chunk size {chunk}");
    }
    whole
}

fn plan(tls: TlsMode, login: Option<Replay>) -> Plan {
    Plan {
        tls,
        tls_configured: true,
        proxy_header: None,
        xclient: None,
        read_greeting: true,
        max_line: 512,
        login,
    }
}

fn broken(stage: ConnectStage, reason: Reason) -> Option<Step> {
    Some(Step::Failed(Failure::Broken { stage, reason }))
}

fn logged_in(reply: &[u8]) -> Option<Step> {
    Some(Step::LoggedIn {
        reply: reply.to_vec(),
        rest: Vec::new(),
    })
}

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The replay routing mode's front makes of what the client sent.
fn replay_of(client: &[u8]) -> Replay {
    let mut f = Front::new("g");
    f.input(client);
    let login = f.take_login().expect("a complete login");
    Replay::Lines {
        method: login.method,
        lines: login.lines,
    }
}

fn user_pass() -> Replay {
    replay_of(b"USER alice\r\nPASS s3cret\r\n")
}

fn bearer(mechanism: Oauth2Mechanism, token: &str) -> Replay {
    Replay::Bearer(Bearer {
        mechanism,
        mailbox: "alice@example.com".into(),
        host: "pop.example.com".into(),
        port: 995,
        token: token.into(),
    })
}

fn decode(line: &[u8]) -> Vec<u8> {
    let s = std::str::from_utf8(line).unwrap().trim_end();
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

// The greeting.

#[test]
fn greeting_read_during_setup_is_relayed_first() {
    let t = served_hi(&plan(TlsMode::None, None), vec![]);
    assert!(t.connected);
    assert_eq!((t.end, t.preread), (None, b"+OK hi\r\n".to_vec()));
    assert!(t.wrote.is_empty());
}

#[test]
fn without_reading_the_greeting_nothing_is_read() {
    let mut p = plan(TlsMode::None, None);
    p.read_greeting = false;
    let mut d = Dialogue::new(p);
    assert_eq!(d.poll(), Some(Step::Connected));
    assert_eq!(d.poll(), None);
    assert!(d.finished());
    assert!(d.take_preread().is_empty());
}

#[test]
fn a_refusing_greeting_is_relayed_in_direct_mode_and_fails_a_login_or_stls() {
    let err = Script {
        greeting: b"-ERR [SYS/TEMP] busy\r\n",
        turns: vec![],
    };
    let t = every_chunk(&plan(TlsMode::None, None), &err);
    assert_eq!(t.preread, b"-ERR [SYS/TEMP] busy\r\n");
    let not_ok = broken(
        ConnectStage::Setup,
        Reason::GreetingNotOk(b"-ERR [SYS/TEMP] busy\r\n".to_vec()),
    );
    let t = every_chunk(&plan(TlsMode::None, Some(user_pass())), &err);
    assert_eq!(t.end, not_ok);
    assert!(
        t.wrote.is_empty(),
        "no login line after a refusing greeting"
    );
    let t = every_chunk(&plan(TlsMode::Starttls, None), &err);
    assert_eq!(t.end, not_ok);
    assert!(t.wrote.is_empty());
}

#[test]
fn a_garbage_greeting_fails_a_login_and_stls() {
    let garbage = Script {
        greeting: b"SSH-2.0-OpenSSH\r\n",
        turns: vec![],
    };
    for p in [
        plan(TlsMode::Starttls, None),
        plan(TlsMode::None, Some(user_pass())),
    ] {
        let t = every_chunk(&p, &garbage);
        assert_eq!(
            t.end,
            broken(
                ConnectStage::Setup,
                Reason::GreetingNotOk(b"SSH-2.0-OpenSSH\r\n".to_vec())
            )
        );
    }
}

#[test]
fn an_overlong_greeting_fails_at_every_chunk_size() {
    let long = [b"+OK ".to_vec(), vec![b'x'; 600], b"\r\n".to_vec()].concat();
    let t = served(&plan(TlsMode::None, None), &long, vec![]);
    assert_eq!(t.end, broken(ConnectStage::Setup, Reason::Overlong));
    assert!(!t.connected);
}

#[test]
fn a_server_that_closes_before_greeting_breaks_the_setup() {
    let t = served(&plan(TlsMode::None, None), b"+OK h", vec![]);
    assert_eq!(t.end, broken(ConnectStage::Setup, Reason::Closed));
}

// STLS and TLS.

#[test]
fn stls_then_the_handshake_and_the_first_greeting_is_relayed() {
    let t = served_hi(
        &plan(TlsMode::Starttls, None),
        vec![(b"STLS\r\n", b"+OK begin\r\n")],
    );
    assert_eq!(t.wrote, vec![b"STLS\r\n".to_vec(), TLS.to_vec()]);
    assert_eq!((t.end, t.preread), (None, b"+OK hi\r\n".to_vec()));
}

#[test]
fn stls_refused_never_falls_back_to_plaintext() {
    let t = served_hi(
        &plan(TlsMode::Starttls, Some(user_pass())),
        vec![(b"STLS\r\n", b"-ERR no TLS here\r\n")],
    );
    assert_eq!(
        t.end,
        broken(
            ConnectStage::Setup,
            Reason::StlsRefused(b"-ERR no TLS here\r\n".to_vec())
        )
    );
    assert_eq!(t.wrote, vec![b"STLS\r\n".to_vec()]);
}

#[test]
fn plaintext_after_the_stls_answer_is_discarded() {
    let p = plan(TlsMode::Starttls, None);
    let script = Script {
        greeting: b"+OK hi\r\n",
        turns: vec![(b"STLS\r\n", b"+OK begin\r\n+OK injected\r\n")],
    };
    let t = run(&p, &script, 1000, true);
    assert_eq!(t.notices, vec![Notice::StlsInjection { octets: 14 }]);
    assert_eq!(t.preread, b"+OK hi\r\n");
}

#[test]
fn tls_handshake_failures_and_missing_tls_name_their_stage() {
    let hi = Script {
        greeting: b"+OK hi\r\n",
        turns: vec![(b"STLS\r\n", b"+OK\r\n")],
    };
    let t = run(&plan(TlsMode::Starttls, None), &hi, 100, false);
    assert_eq!(
        t.end.as_ref().map(|e| match e {
            Step::Failed(Failure::Broken { stage, reason }) => (*stage, reason.to_string()),
            _ => panic!("{e:?}"),
        }),
        Some((
            ConnectStage::Tls,
            "TLS handshake after STLS: bad certificate".into()
        ))
    );
    let t = run(&plan(TlsMode::Implicit, None), &hi, 100, false);
    let Some(Step::Failed(Failure::Broken { stage, reason })) = t.end else {
        panic!("{t:?}")
    };
    assert_eq!(
        (stage, reason.to_string()),
        (ConnectStage::Tls, "TLS handshake: bad certificate".into())
    );
    let mut p = plan(TlsMode::Implicit, None);
    p.tls_configured = false;
    let t = run(&p, &hi, 100, true);
    assert_eq!(t.end, broken(ConnectStage::Tls, Reason::TlsNotConfigured));
}

#[test]
fn the_proxy_header_goes_first_even_before_implicit_tls() {
    let mut p = plan(TlsMode::Implicit, Some(user_pass()));
    p.proxy_header = Some(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec());
    let t = served_hi(
        &p,
        vec![(b"USER alice", b"+OK\r\n"), (b"PASS s3cret", b"+OK in\r\n")],
    );
    assert_eq!(t.wrote[0], b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n");
    assert_eq!(t.wrote[1], TLS);
    assert_eq!(t.end, logged_in(b"+OK in\r\n"));
}

/// With STLS configured, nothing of the login (USER, PASS, SASL, a token) is written before
/// the handshake completed, whatever the server says and however its bytes are cut.
#[test]
fn no_credential_byte_goes_out_before_stls_completes() {
    let replays = [
        (
            user_pass(),
            vec![(&b"USER"[..], &b"+OK\r\n"[..]), (b"PASS", b"+OK in\r\n")],
        ),
        (
            replay_of(format!("AUTH PLAIN {}\r\n", b64(b"\0alice\0s3cret")).as_bytes()),
            vec![(b"AUTH PLAIN", b"+ \r\n"), (b"", b"+OK in\r\n")],
        ),
        (
            bearer(Oauth2Mechanism::Xoauth2, "tok"),
            vec![(b"AUTH XOAUTH2", b"+ \r\n"), (b"", b"+OK in\r\n")],
        ),
    ];
    for (replay, login_turns) in replays {
        let p = plan(TlsMode::Starttls, Some(replay));
        for stls_answer in [&b"+OK begin\r\n"[..], b"-ERR no\r\n", b"+OK"] {
            let mut turns = vec![(&b"STLS\r\n"[..], stls_answer)];
            turns.extend(login_turns.iter().copied());
            let script = Script {
                greeting: b"+OK hi\r\n",
                turns,
            };
            let total = 8 + stls_answer.len() + 20;
            for chunk in 1..=total {
                for tls_ok in [true, false] {
                    let t = run(&p, &script, chunk, tls_ok);
                    let before_tls: Vec<_> = t.wrote.iter().take_while(|w| *w != TLS).collect();
                    assert_eq!(before_tls, vec![b"STLS\r\n"], "{t:?}");
                }
            }
        }
    }
}

// XCLIENT.

fn xclient_plan(tls: TlsMode) -> Plan {
    let mut p = plan(tls, None);
    p.xclient = Some(b"XCLIENT ADDR=192.0.2.1 PORT=4000 SESSION=popgate-1 TTL=4\r\n".to_vec());
    p
}

#[test]
fn xclient_when_offered_and_its_answer_is_not_relayed() {
    let t = served(
        &xclient_plan(TlsMode::None),
        b"+OK [XCLIENT] Dovecot ready.\r\n",
        vec![(b"XCLIENT ADDR=192.0.2.1 PORT=4000", b"+OK\r\n")],
    );
    assert_eq!(t.notices, vec![Notice::XclientPassed]);
    assert_eq!(t.preread, b"+OK [XCLIENT] Dovecot ready.\r\n");
    // Under STLS: after the handshake, offered by the first greeting.
    let t = served(
        &xclient_plan(TlsMode::Starttls),
        b"+OK [XCLIENT] Dovecot ready.\r\n",
        vec![(b"STLS", b"+OK\r\n"), (b"XCLIENT", b"+OK\r\n")],
    );
    assert_eq!(t.wrote[1], TLS);
    assert!(t.wrote[2].starts_with(b"XCLIENT"));
    assert_eq!(t.end, None);
}

#[test]
fn xclient_refused_breaks_the_setup() {
    let t = served(
        &xclient_plan(TlsMode::None),
        b"+OK [XCLIENT] Dovecot ready.\r\n",
        vec![(b"XCLIENT", b"-ERR not trusted\r\n")],
    );
    assert_eq!(
        t.end,
        broken(
            ConnectStage::Setup,
            Reason::XclientRefused(b"-ERR not trusted\r\n".to_vec())
        )
    );
}

#[test]
fn xclient_not_offered_is_not_sent() {
    let t = served(
        &xclient_plan(TlsMode::None),
        b"+OK Dovecot ready.\r\n",
        vec![],
    );
    assert!(t.wrote.is_empty());
    assert_eq!(
        t.notices,
        vec![Notice::XclientNotOffered { greeting_ok: true }]
    );
    assert_eq!(t.preread, b"+OK Dovecot ready.\r\n");
}

// Routing mode's replay.

#[test]
fn user_pass_replayed_and_accepted() {
    let t = served_hi(
        &plan(TlsMode::None, Some(user_pass())),
        vec![
            (b"USER alice\r\n", b"+OK\r\n"),
            (b"PASS s3cret\r\n", b"+OK Logged in.\r\n"),
        ],
    );
    assert!(t.connected);
    assert_eq!(t.end, logged_in(b"+OK Logged in.\r\n"));
}

#[test]
fn user_pass_refused_is_the_servers_line() {
    let t = served_hi(
        &plan(TlsMode::None, Some(user_pass())),
        vec![(b"USER", b"+OK\r\n"), (b"PASS", b"-ERR [AUTH] no\r\n")],
    );
    assert_eq!(
        t.end,
        Some(Step::Failed(Failure::Refused(
            b"-ERR [AUTH] no\r\n".to_vec()
        )))
    );
}

#[test]
fn auth_plain_with_and_without_initial_response_is_replayed_in_two_steps() {
    let msg = b64(b"\0alice\0s3cret");
    for client in [
        format!("AUTH PLAIN {msg}\r\n"),
        format!("AUTH PLAIN\r\n{msg}\r\n"),
    ] {
        let payload = format!("{msg}\r\n");
        let t = served_hi(
            &plan(TlsMode::None, Some(replay_of(client.as_bytes()))),
            vec![
                (b"AUTH PLAIN\r\n", b"+ \r\n"),
                (payload.as_bytes(), b"+OK in\r\n"),
            ],
        );
        assert_eq!(t.end, logged_in(b"+OK in\r\n"), "{client}");
    }
}

#[test]
fn auth_login_answers_two_challenges() {
    let client = format!("AUTH LOGIN\r\n{}\r\n{}\r\n", b64(b"carol"), b64(b"pw"));
    let t = served_hi(
        &plan(TlsMode::None, Some(replay_of(client.as_bytes()))),
        vec![
            (b"AUTH LOGIN\r\n", b"+ VXNlcm5hbWU6\r\n"),
            (b"Y2Fyb2w=\r\n", b"+ UGFzc3dvcmQ6\r\n"),
            (b"cHc=\r\n", b"+OK in\r\n"),
        ],
    );
    assert_eq!(t.end, logged_in(b"+OK in\r\n"));
    // A server that skips a challenge, or answers garbage, breaks the dialogue.
    let t = served_hi(
        &plan(TlsMode::None, Some(replay_of(client.as_bytes()))),
        vec![(b"AUTH LOGIN\r\n", b"what?\r\n")],
    );
    assert_eq!(
        t.end,
        broken(
            ConnectStage::Setup,
            Reason::UnexpectedLoginReply(b"what?\r\n".to_vec())
        )
    );
}

#[test]
fn a_server_speaking_out_of_turn_is_not_taken_for_an_answer() {
    let t = run(
        &plan(TlsMode::None, Some(user_pass())),
        &Script {
            greeting: b"+OK hi\r\n+OK\r\n",
            turns: vec![],
        },
        100,
        true,
    );
    assert_eq!(
        t.end,
        broken(ConnectStage::Setup, Reason::OutOfTurn(b"+OK\r\n".to_vec()))
    );
    assert!(t.wrote.is_empty());
}

#[test]
fn a_server_that_closes_mid_login_breaks_it_at_every_point() {
    let answers: &[u8] = b"+OK\r\n+OK in\r\n";
    for cut in 0..answers.len() {
        let got = &answers[..cut];
        let mut turns: Vec<(&[u8], &[u8])> = vec![(b"USER", &got[..cut.min(5)])];
        if cut >= 5 {
            turns.push((b"PASS", &got[5..]));
        }
        let t = served_hi(&plan(TlsMode::None, Some(user_pass())), turns);
        assert_eq!(
            t.end,
            broken(ConnectStage::Setup, Reason::Closed),
            "cut {cut}"
        );
    }
    let t = served_hi(
        &plan(TlsMode::None, Some(bearer(Oauth2Mechanism::Xoauth2, "tok"))),
        vec![(b"AUTH XOAUTH2", b"+ \r\n"), (b"", b"+O")],
    );
    assert_eq!(
        t.end,
        broken(ConnectStage::Setup, Reason::Bearer("early eof".into()))
    );
}

// The OAuth2 bearer login (was `oauth2::sasl`'s exchange).

#[test]
fn xoauth2_token_goes_on_the_continuation_line() {
    let long = "x".repeat(2000);
    let t = served_hi(
        &plan(TlsMode::None, Some(bearer(Oauth2Mechanism::Xoauth2, &long))),
        vec![
            (b"AUTH XOAUTH2\r\n", b"+ \r\n"),
            (b"", b"+OK Logged in.\r\n"),
        ],
    );
    assert_eq!(t.wrote[0], b"AUTH XOAUTH2\r\n");
    assert!(t.wrote[1].ends_with(b"\r\n"));
    assert_eq!(
        decode(&t.wrote[1]),
        format!("user=alice@example.com\x01auth=Bearer {long}\x01\x01").into_bytes()
    );
    assert_eq!(t.end, logged_in(b"+OK Logged in.\r\n"));
}

#[test]
fn oauthbearer_gs2_header_and_host_port() {
    let Replay::Bearer(mut b) = bearer(Oauth2Mechanism::Oauthbearer, "tok") else {
        unreachable!()
    };
    b.mailbox = "a,b=c".into();
    let t = served_hi(
        &plan(TlsMode::None, Some(Replay::Bearer(b))),
        vec![(b"AUTH OAUTHBEARER\r\n", b"+\r\n"), (b"", b"+OK\r\n")],
    );
    assert_eq!(
        decode(&t.wrote[1]),
        b"n,a=a=2Cb=3Dc,\x01host=pop.example.com\x01port=995\x01auth=Bearer tok\x01\x01"
    );
}

#[test]
fn the_error_json_challenge_is_answered_then_a_fresh_token_is_tried_once() {
    for (m, command, dummy) in [
        (
            Oauth2Mechanism::Xoauth2,
            &b"AUTH XOAUTH2\r\n"[..],
            &b"\r\n"[..],
        ),
        (
            Oauth2Mechanism::Oauthbearer,
            b"AUTH OAUTHBEARER\r\n",
            b"AQ==\r\n",
        ),
    ] {
        let json = &b"+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=\r\n"[..];
        let refused = &b"-ERR [AUTH] Authentication failed.\r\n"[..];
        // Refused, then the fresh token logs in.
        let t = served_hi(
            &plan(TlsMode::None, Some(bearer(m, "stale"))),
            vec![
                (command, b"+ \r\n"),
                (b"", json),
                (dummy, refused),
                (command, b"+ \r\n"),
                (b"", b"+OK in\r\n"),
            ],
        );
        assert_eq!(t.tokens_fetched, 1);
        assert!(String::from_utf8_lossy(&decode(&t.wrote[1])).contains("Bearer stale"));
        assert_eq!(t.wrote[2], dummy);
        assert!(String::from_utf8_lossy(&decode(&t.wrote[4])).contains("Bearer fresh"));
        assert_eq!(t.end, logged_in(b"+OK in\r\n"));
        // Refused twice: the second refusal ends it.
        let t = served_hi(
            &plan(TlsMode::None, Some(bearer(m, "stale"))),
            vec![
                (command, b"+ \r\n"),
                (b"", json),
                (dummy, refused),
                (command, b"+ \r\n"),
                (b"", refused),
            ],
        );
        assert_eq!(t.tokens_fetched, 1);
        assert_eq!(
            t.end,
            Some(Step::Failed(Failure::TokenRefused(refused.to_vec())))
        );
    }
}

/// A server that answers the refused token's `-ERR` and, in the same breath, the steps of a
/// login not yet made (`+ ` and `+OK`): those lines were sent before the fresh token was, so
/// they answer nothing of it; the login fails as a server speaking out of turn does, rather
/// than taking a `+OK` written before the fresh token for its acceptance.
#[test]
fn lines_sent_ahead_of_the_fresh_token_are_not_taken_for_its_answers() {
    let refused_and_ahead = &b"-ERR [AUTH] Authentication failed.\r\n+ \r\n+OK in\r\n"[..];
    let t = run(
        &plan(
            TlsMode::None,
            Some(bearer(Oauth2Mechanism::Xoauth2, "stale")),
        ),
        &Script {
            greeting: b"+OK hi\r\n",
            turns: vec![
                (b"AUTH XOAUTH2\r\n", b"+ \r\n"),
                (b"", refused_and_ahead),
                // Were the fresh token sent, this server would say nothing more.
                (b"AUTH XOAUTH2\r\n", b""),
                (b"", b""),
            ],
        },
        usize::MAX,
        true,
    );
    assert_eq!(t.tokens_fetched, 1);
    assert_eq!(
        t.end,
        broken(
            ConnectStage::Setup,
            Reason::OutOfTurn(b"+ \r\n+OK in\r\n".to_vec())
        )
    );
    assert!(
        !t.wrote
            .iter()
            .any(|w| String::from_utf8_lossy(&decode_or_empty(w)).contains("fresh")),
        "the fresh token went out to a server that had answered ahead"
    );
}

/// The base64 a line holds, decoded; empty when it is not base64.
fn decode_or_empty(line: &[u8]) -> Vec<u8> {
    let s = String::from_utf8_lossy(line);
    base64::engine::general_purpose::STANDARD
        .decode(s.trim_end())
        .unwrap_or_default()
}

#[test]
fn mechanism_not_offered_is_unexpected() {
    let t = served_hi(
        &plan(TlsMode::None, Some(bearer(Oauth2Mechanism::Xoauth2, "tok"))),
        vec![(
            b"AUTH XOAUTH2",
            b"-ERR Unsupported authentication mechanism.\r\n",
        )],
    );
    assert_eq!(
        t.end,
        Some(Step::Failed(Failure::BearerUnexpected(
            b"-ERR Unsupported authentication mechanism.\r\n".to_vec()
        )))
    );
}

/// The status line is read as everywhere else (`StatusLine`), no longer by its first bytes:
/// `+OKAY` is no `+OK`, and `+ok` is one (it was taken for a challenge).
#[test]
fn bearer_answers_are_parsed_as_status_lines() {
    let t = served_hi(
        &plan(TlsMode::None, Some(bearer(Oauth2Mechanism::Xoauth2, "tok"))),
        vec![(b"AUTH", b"+ \r\n"), (b"", b"+OKAY\r\n")],
    );
    assert_eq!(
        t.end,
        Some(Step::Failed(Failure::BearerUnexpected(
            b"+OKAY\r\n".to_vec()
        )))
    );
    let t = served_hi(
        &plan(TlsMode::None, Some(bearer(Oauth2Mechanism::Xoauth2, "tok"))),
        vec![(b"AUTH", b"+ \r\n"), (b"", b"+ok in\r\n")],
    );
    assert_eq!(t.end, logged_in(b"+ok in\r\n"));
}

#[test]
fn bytes_after_the_login_are_handed_over_not_consumed() {
    let t = run(
        &plan(TlsMode::None, Some(bearer(Oauth2Mechanism::Xoauth2, "tok"))),
        &Script {
            greeting: b"+OK hi\r\n",
            turns: vec![(b"AUTH XOAUTH2\r\n", b"+ \r\n"), (b"", b"+OK in\r\nNEXT")],
        },
        100,
        true,
    );
    assert_eq!(
        t.end,
        Some(Step::LoggedIn {
            reply: b"+OK in\r\n".to_vec(),
            rest: b"NEXT".to_vec()
        })
    );
    let t = run(
        &plan(TlsMode::None, Some(bearer(Oauth2Mechanism::Xoauth2, "tok"))),
        &Script {
            greeting: b"+OK hi\r\nX",
            turns: vec![],
        },
        100,
        true,
    );
    assert_eq!(
        t.end,
        broken(ConnectStage::Setup, Reason::BytesAfterGreeting)
    );
}

#[test]
fn the_bearer_token_is_never_in_debug_output() {
    let p = plan(
        TlsMode::None,
        Some(bearer(Oauth2Mechanism::Xoauth2, "s3cr3t-token")),
    );
    let d = Dialogue::new(p.clone());
    assert!(!format!("{p:?}{d:?}").contains("s3cr3t-token"));
    let p = plan(TlsMode::None, Some(user_pass()));
    assert!(!format!("{p:?}").contains("s3cret"));
}

/// The texts in logs and metrics are today's, word for word.
#[test]
fn failure_texts_are_unchanged() {
    use std::time::Duration;
    let s = Duration::from_secs(3);
    for (reason, text) in [
        (Reason::Timeout(s), "timed out after 3s"),
        (Reason::NoReply(s), "no reply within 3s"),
        (Reason::BearerTimeout(s), "no OAuth2 login within 3s"),
        (
            Reason::SendProxyHeader("x".into()),
            "sending the PROXY header: x",
        ),
        (Reason::SendXclient("x".into()), "sending XCLIENT: x"),
        (Reason::SendLogin("x".into()), "sending the login: x"),
        (Reason::Closed, "connection closed during connection setup"),
        (Reason::Overlong, "overlong line from upstream"),
        (Reason::TlsNotConfigured, "upstream TLS is not configured"),
        (
            Reason::GreetingNotOk(b"-ERR x\r\n".to_vec()),
            "greeting is not +OK: -ERR x",
        ),
        (
            Reason::StlsRefused(b"-ERR x\r\n".to_vec()),
            "server refused STLS: -ERR x",
        ),
        (
            Reason::XclientRefused(b"-ERR x\r\n".to_vec()),
            "server refused XCLIENT: -ERR x",
        ),
        (
            Reason::BytesAfterGreeting,
            "unexpected bytes after the greeting",
        ),
        (
            Reason::OutOfTurn(b"+OK\r\n".to_vec()),
            "the server spoke out of turn: +OK",
        ),
        (
            Reason::UnexpectedLoginReply(b"x\r\n".to_vec()),
            "unexpected reply to the login: x",
        ),
        (
            Reason::Bearer("early eof".into()),
            "during the OAuth2 login: early eof",
        ),
    ] {
        assert_eq!(reason.to_string(), text);
    }
    assert!(ConnectStage::Tcp.fails_over() && ConnectStage::Timeout.fails_over());
    assert!(!ConnectStage::Setup.fails_over() && !ConnectStage::Tls.fails_over());
}

// Arbitrary servers: the invariants the fuzz target checks on the whole session machine.

/// Drive `plan` against `server` bytes fed in `chunks` whatever was written, TLS succeeding
/// or not, then an end of file. Returns the writes (with [`TLS`] marks) and whether the
/// dialogue ended.
fn arbitrary(plan: &Plan, server: &[u8], chunks: &[usize], tls_ok: bool) -> (Vec<Vec<u8>>, bool) {
    let mut d = Dialogue::new(plan.clone());
    let mut wrote = Vec::new();
    let mut rest = server;
    let mut sizes = chunks.iter().cycle();
    let mut ended = false;
    for _ in 0..(server.len() + 16) {
        while let Some(step) = d.poll() {
            assert!(!ended, "a step after the end: {step:?}");
            match step {
                Step::Write(b) => wrote.push(b),
                Step::StartTls if tls_ok => {
                    wrote.push(TLS.to_vec());
                    d.tls_done();
                }
                Step::StartTls => d.tls_failed(&"no"),
                Step::FetchToken => d.fresh_token("fresh".into()),
                Step::Connected if plan.login.is_none() => ended = true,
                Step::LoggedIn { .. } | Step::Failed(_) => ended = true,
                Step::Notice(_) | Step::Connected => {}
            }
        }
        if d.finished() {
            return (wrote, true);
        }
        if rest.is_empty() {
            d.on_server_eof();
        } else {
            let n = (*sizes.next().unwrap_or(&1)).clamp(1, rest.len());
            d.on_server_bytes(&rest[..n]);
            rest = &rest[n..];
        }
    }
    (wrote, d.finished())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Whatever the server sends: no panic, an end once it closes, and under STLS nothing
    /// but STLS before the handshake.
    #[test]
    fn arbitrary_servers_end_and_credentials_wait_for_tls(
        server in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::prelude::Just(b"+OK hi\r\n".to_vec()),
                proptest::prelude::Just(b"+OK [XCLIENT] hi\r\n".to_vec()),
                proptest::prelude::Just(b"+ \r\n".to_vec()),
                proptest::prelude::Just(b"-ERR no\r\n".to_vec()),
                proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
            ],
            0..8,
        ),
        chunks in proptest::collection::vec(1usize..64, 1..8),
        tls in 0u8..3,
        login in 0u8..4,
        xclient in proptest::prelude::any::<bool>(),
        tls_ok in proptest::prelude::any::<bool>(),
    ) {
        let server = server.concat();
        let tls = [TlsMode::None, TlsMode::Starttls, TlsMode::Implicit][usize::from(tls)];
        let login = match login {
            0 => None,
            1 => Some(user_pass()),
            2 => Some(replay_of(format!("AUTH LOGIN\r\n{}\r\n{}\r\n", b64(b"u"), b64(b"s3cret")).as_bytes())),
            _ => Some(bearer(Oauth2Mechanism::Xoauth2, "s3cret-token")),
        };
        let mut p = plan(tls, login);
        p.max_line = 64;
        if xclient {
            p.xclient = Some(b"XCLIENT ADDR=192.0.2.1\r\n".to_vec());
        }
        let (wrote, ended) = arbitrary(&p, &server, &chunks, tls_ok);
        proptest::prop_assert!(ended, "no end after the server closed");
        if tls == TlsMode::Starttls {
            let before: Vec<_> = wrote.iter().take_while(|w| *w != TLS).collect();
            proptest::prop_assert!(before.iter().all(|w| *w == b"STLS\r\n"), "{before:?}");
        }
        if tls != TlsMode::None && !tls_ok {
            proptest::prop_assert!(
                wrote.iter().all(|w| !w.starts_with(b"USER") && !w.starts_with(b"AUTH")),
                "a login without TLS: {wrote:?}"
            );
        }
    }
}

/// The [`Connector`]: the sequence over an upstream's addresses and a login's deadlines, driven
/// without sockets on a simulated clock, every path at every chunk size.
mod connector {
    use std::collections::VecDeque;
    use std::time::{Duration, Instant};

    use super::*;

    const CONNECT: Duration = Duration::from_secs(5);
    const DEAD_FOR: Duration = Duration::from_secs(60);
    const REPLY: Duration = Duration::from_secs(10);
    const SECRET: &[u8] = b"s3cret";

    /// One address as the network and its server behave.
    #[derive(Clone)]
    enum Addr<'a> {
        /// The TCP connect fails at once.
        Refused,
        /// The TCP connect never completes.
        Hangs,
        /// A server.
        Serves(Server<'a>),
    }

    /// A server: its greeting after `greeting_after`, then per write (after the PROXY header)
    /// the expected start of the write, the answer, and how long it takes. With no turn left
    /// it says nothing more (or closes, with `closes`).
    #[derive(Clone)]
    struct Server<'a> {
        greeting: &'a [u8],
        greeting_after: Duration,
        turns: Vec<(&'a [u8], &'a [u8], Duration)>,
        /// How a TLS handshake goes: whether it succeeds, how long it takes.
        tls: (bool, Duration),
        closes: bool,
    }

    fn server<'a>(greeting: &'a [u8], turns: Vec<(&'a [u8], &'a [u8])>) -> Addr<'a> {
        Addr::Serves(Server {
            greeting,
            greeting_after: Duration::ZERO,
            turns: turns
                .into_iter()
                .map(|(w, a)| (w, a, Duration::ZERO))
                .collect(),
            tls: (true, Duration::ZERO),
            closes: false,
        })
    }

    /// A server greeting `+OK hi` at once whose answers take their time.
    fn timed(turns: Vec<(&'static [u8], &'static [u8], Duration)>) -> Addr<'static> {
        match server(b"+OK hi\r\n", vec![]) {
            Addr::Serves(s) => Addr::Serves(Server { turns, ..s }),
            _ => unreachable!(),
        }
    }

    impl Addr<'_> {
        /// This server, changed by `f`.
        fn with(self, f: impl FnOnce(&mut Server<'_>)) -> Self {
            match self {
                Addr::Serves(mut s) => {
                    f(&mut s);
                    Addr::Serves(s)
                }
                _ => unreachable!("only a server can be changed"),
            }
        }
    }

    /// The token source: how long a fetch takes, and whether it gives a token.
    #[derive(Clone, Copy)]
    struct TokenSource {
        after: Duration,
        gives: bool,
    }

    const TOKENS: TokenSource = TokenSource {
        after: Duration::ZERO,
        gives: true,
    };

    /// What one run did: every step (times in ms from the start) and the end.
    #[derive(Debug, PartialEq, Eq)]
    struct Run {
        log: Vec<String>,
        end: ConnectEnd,
    }

    /// Server bytes on their way: when they arrive, and what.
    type Pending = VecDeque<(Instant, Vec<u8>)>;

    fn ms(t0: Instant, t: Instant) -> u128 {
        (t - t0).as_millis()
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).trim_end().to_owned()
    }

    /// The connector's timeouts: [`CONNECT`], [`DEAD_FOR`] and `reply` for each replayed line.
    fn timeouts(reply: Option<Duration>) -> ConnectTimeouts {
        ConnectTimeouts {
            connect: CONNECT,
            dead_for: DEAD_FOR,
            reply,
        }
    }

    /// One row of the connector's table: the plan, the addresses in order (named `a0`, `a1`,
    /// ...), the reply timeout of a replayed login and the token source.
    struct Case<'a> {
        plan: Plan,
        addrs: Vec<Addr<'a>>,
        reply: Option<Duration>,
        tokens: TokenSource,
    }

    impl<'a> Case<'a> {
        /// `addrs` under `plan`: no reply timeout, a token at once when one is fetched.
        fn new(plan: Plan, addrs: impl Into<Vec<Addr<'a>>>) -> Self {
            Case {
                plan,
                addrs: addrs.into(),
                reply: None,
                tokens: TOKENS,
            }
        }

        /// With [`REPLY`] as the reply timeout of a replayed login.
        fn replying(self) -> Self {
            Case {
                reply: Some(REPLY),
                ..self
            }
        }

        /// With `tokens` as the token source.
        fn tokens(self, tokens: TokenSource) -> Self {
            Case { tokens, ..self }
        }

        /// The runner: [`drive`] at every chunk size from 1 to all the servers' bytes, the
        /// same run each time.
        fn run(&self) -> Run {
            let total: usize = self
                .addrs
                .iter()
                .map(|a| match a {
                    Addr::Serves(s) => {
                        s.greeting.len() + s.turns.iter().map(|t| t.1.len()).sum::<usize>()
                    }
                    _ => 0,
                })
                .sum();
            let whole = drive(self, total.max(1));
            for chunk in 1..=total {
                assert_eq!(drive(self, chunk), whole, "chunk size {chunk}");
            }
            whole
        }
    }

    /// Drive a connector over the case's addresses as the driver does, the clock moving only
    /// when something takes time; server bytes fed `chunk` at a time.
    fn drive(case: &Case<'_>, chunk: usize) -> Run {
        let Case {
            plan,
            addrs,
            reply,
            tokens,
        } = case;
        let t0 = Instant::now();
        let mut now = t0;
        let names: Vec<String> = (0..addrs.len()).map(|i| format!("a{i}")).collect();
        let mut c = Connector::new(plan.clone(), names.clone(), timeouts(*reply), now);
        let mut log = Vec::new();
        // The connection: its server, and the bytes on their way (ready at, bytes).
        let mut conn: Option<(Server<'_>, Pending)> = None;
        let mut first_write = true;
        // Wait for `at` unless the connector's deadline comes first (then it fires).
        let wait =
            |c: &mut Connector, now: &mut Instant, log: &mut Vec<String>, at: Instant| match c
                .poll_timeout()
            {
                Some(d) if d <= at => {
                    *now = (*now).max(d);
                    log.push(format!("timeout @{}", ms(t0, *now)));
                    c.on_timeout(*now);
                    false
                }
                _ => {
                    *now = (*now).max(at);
                    true
                }
            };
        for _ in 0..10_000 {
            while let Some(step) = c.poll() {
                match step {
                    ConnectStep::Dial(name) => {
                        log.push(format!("dial {name} @{}", ms(t0, now)));
                        conn = None;
                        first_write = true;
                        let current = names
                            .iter()
                            .position(|n| *n == name)
                            .expect("a known address");
                        match &addrs[current] {
                            Addr::Refused => c.dial_failed(now, &format!("{name} refused")),
                            Addr::Hangs => {
                                let never = now + Duration::from_secs(86_400);
                                assert!(!wait(&mut c, &mut now, &mut log, never), "no deadline");
                            }
                            Addr::Serves(s) => {
                                let greeting = (now + s.greeting_after, s.greeting.to_vec());
                                conn = Some((s.clone(), VecDeque::from([greeting])));
                                c.dialled(now);
                            }
                        }
                    }
                    ConnectStep::Write(bytes) => {
                        log.push(format!("write {}", text(&bytes)));
                        let (s, pending) = conn.as_mut().expect("a write without a connection");
                        let header =
                            first_write && plan.proxy_header.as_deref() == Some(&bytes[..]);
                        first_write = false;
                        if !header {
                            assert!(!s.turns.is_empty(), "a write the script has no turn for");
                            let (expect, answer, after) = s.turns.remove(0);
                            assert!(bytes.starts_with(expect), "wrote {}", text(&bytes));
                            pending.push_back((now + after, answer.to_vec()));
                        }
                    }
                    ConnectStep::StartTls => {
                        let (s, _) = conn.as_ref().expect("TLS without a connection");
                        let (ok, after) = s.tls;
                        let at = now + after;
                        if wait(&mut c, &mut now, &mut log, at) {
                            if ok {
                                log.push(format!("tls @{}", ms(t0, now)));
                                c.tls_done(now);
                            } else {
                                log.push(format!("tls failed @{}", ms(t0, now)));
                                c.tls_failed(now, &"bad certificate");
                            }
                        }
                    }
                    ConnectStep::FetchToken => {
                        log.push(format!("fetch token @{}", ms(t0, now)));
                        let at = now + tokens.after;
                        if wait(&mut c, &mut now, &mut log, at) {
                            if tokens.gives {
                                c.fresh_token(now, "fresh".into());
                            } else {
                                c.token_failed();
                            }
                        }
                    }
                    ConnectStep::Notice(n) => log.push(format!("notice {n:?}")),
                    ConnectStep::MarkDead { address, until } => {
                        log.push(format!("dead {address} until {}", ms(t0, until)));
                    }
                    ConnectStep::MarkAlive(address) => log.push(format!("alive {address}")),
                    ConnectStep::End(end) => {
                        assert!(c.finished());
                        assert_eq!(c.poll(), None, "nothing after the end");
                        assert_eq!(c.poll_timeout(), None, "no deadline after the end");
                        return Run { log, end };
                    }
                }
            }
            // It waits for the server.
            let (s, pending) = conn.as_mut().expect("waiting without a connection");
            match pending.front_mut() {
                Some((at, bytes)) => {
                    let at = *at;
                    if wait(&mut c, &mut now, &mut log, at) {
                        let n = chunk.min(bytes.len());
                        let part: Vec<u8> = bytes.drain(..n).collect();
                        if bytes.is_empty() {
                            pending.pop_front();
                        }
                        c.on_server_bytes(now, &part);
                    }
                }
                None if s.closes => c.on_server_eof(now),
                None => {
                    let never = now + Duration::from_secs(86_400);
                    assert!(
                        !wait(&mut c, &mut now, &mut log, never),
                        "waits with no deadline"
                    );
                }
            }
        }
        panic!("the connector never ended");
    }

    fn unavailable(address: &str, stage: ConnectStage, reason: Reason) -> ConnectEnd {
        ConnectEnd::Failed(ConnectFailure::Unavailable {
            address: address.into(),
            stage,
            reason,
        })
    }

    fn failing_over(address: &str, error: &str) -> String {
        let n = Notice::FailingOver {
            address: address.into(),
            error: error.into(),
        };
        format!("notice {n:?}")
    }

    fn position(log: &[String], entry: &str) -> usize {
        log.iter()
            .position(|l| l == entry)
            .unwrap_or_else(|| panic!("{entry:?} not in {log:#?}"))
    }

    fn greets() -> Addr<'static> {
        server(b"+OK hi\r\n", vec![])
    }

    /// A server that greets and answers STLS with `+OK go`.
    fn offers_stls() -> Addr<'static> {
        server(b"+OK hi\r\n", vec![(b"STLS", b"+OK go\r\n")])
    }

    /// The log of a failover from `a0`, dialled at 0, whose `failure` (log entries) came at
    /// `at` ms and said `error`, to `a1`, dialled then.
    fn failover(failure: &[&str], at: u128, error: &str) -> Vec<String> {
        let mut log = vec!["dial a0 @0".to_owned()];
        log.extend(failure.iter().map(|l| l.to_string()));
        log.push(format!("dead a0 until {}", at + DEAD_FOR.as_millis()));
        log.push(failing_over("a0", error));
        log.push(format!("dial a1 @{at}"));
        log
    }

    #[test]
    fn a_tcp_failure_fails_over_marking_the_address_dead() {
        let r = Case::new(plan(TlsMode::None, None), [Addr::Refused, greets()]).run();
        let mut log = failover(&[], 0, "a0 refused");
        log.push("alive a1".into());
        assert_eq!(r.log, log);
        assert_eq!(
            r.end,
            ConnectEnd::Connected {
                address: "a1".into(),
                preread: b"+OK hi\r\n".to_vec(),
            }
        );
    }

    #[test]
    fn a_timeout_while_dialling_fails_over_and_the_next_address_gets_its_own_time() {
        let r = Case::new(plan(TlsMode::None, None), [Addr::Hangs, greets()]).run();
        let mut log = failover(&["timeout @5000"], 5000, "timed out after 5s");
        log.push("alive a1".into());
        assert_eq!(r.log, log);
        assert!(matches!(r.end, ConnectEnd::Connected { ref address, .. } if address == "a1"));
    }

    /// After `r`'s first address timed out at 5 s it was marked dead then, and `a1` dialled.
    fn timed_out_and_failed_over(r: &Run) {
        let dead = position(&r.log, "dead a0 until 65000");
        assert_eq!(r.log[dead - 1], "timeout @5000");
        assert_eq!(r.log[dead + 2], "dial a1 @5000");
    }

    #[test]
    fn a_timeout_in_the_greeting_fails_over() {
        let silent = server(b"", vec![]);
        let slow = greets().with(|s| s.greeting_after = Duration::from_secs(6));
        let logs_in = server(
            b"+OK hi\r\n",
            vec![(b"USER", b"+OK\r\n"), (b"PASS", b"+OK in\r\n")],
        );
        for first in [silent, slow] {
            let addrs = [first, logs_in.clone()];
            let r = Case::new(plan(TlsMode::None, Some(user_pass())), addrs)
                .replying()
                .run();
            timed_out_and_failed_over(&r);
            assert!(!r.log.contains(&"alive a0".to_owned()));
            assert_eq!(
                r.end,
                ConnectEnd::LoggedIn {
                    address: "a1".into(),
                    reply: b"+OK in\r\n".to_vec(),
                    rest: Vec::new(),
                }
            );
        }
    }

    #[test]
    fn a_timeout_in_stls_or_its_handshake_fails_over() {
        let no_answer = server(b"+OK hi\r\n", vec![(b"STLS", b"")]);
        let slow_handshake = offers_stls().with(|s| s.tls = (true, Duration::from_secs(7)));
        for first in [no_answer, slow_handshake] {
            let r = Case::new(plan(TlsMode::Starttls, None), [first, offers_stls()]).run();
            timed_out_and_failed_over(&r);
            assert_eq!(r.log.last().unwrap(), "alive a1");
            assert!(matches!(r.end, ConnectEnd::Connected { ref address, .. } if address == "a1"));
        }
    }

    #[test]
    fn a_tls_failure_or_a_refused_stls_does_not_fail_over() {
        let bad_tls = offers_stls().with(|s| s.tls = (false, Duration::ZERO));
        let refused = server(b"+OK hi\r\n", vec![(b"STLS", b"-ERR no\r\n")]);
        let handshake = Reason::Handshake {
            after_stls: true,
            error: "bad certificate".into(),
        };
        let rows = [
            (bad_tls, unavailable("a0", ConnectStage::Tls, handshake)),
            (
                refused,
                unavailable(
                    "a0",
                    ConnectStage::Setup,
                    Reason::StlsRefused(b"-ERR no\r\n".to_vec()),
                ),
            ),
        ];
        for (first, end) in rows {
            let r = Case::new(plan(TlsMode::Starttls, None), [first, greets()]).run();
            assert_eq!(r.end, end);
            assert!(
                r.log
                    .iter()
                    .all(|l| !l.starts_with("dead") && !l.contains("a1")),
                "{r:?}"
            );
        }
        // Implicit TLS alike.
        let bad = greets().with(|s| s.tls = (false, Duration::ZERO));
        let r = Case::new(plan(TlsMode::Implicit, None), [bad, greets()]).run();
        assert!(matches!(
            r.end,
            ConnectEnd::Failed(ConnectFailure::Unavailable {
                stage: ConnectStage::Tls,
                ..
            })
        ));
        assert_eq!(r.log, ["dial a0 @0", "tls failed @0"]);
    }

    #[test]
    fn with_every_address_dead_all_are_tried_in_order_and_the_last_failure_is_reported() {
        // `DeadAddresses::order` gives every address when all are dead.
        let addrs = [Addr::Refused, Addr::Hangs, Addr::Refused];
        let r = Case::new(plan(TlsMode::None, None), addrs).run();
        let mut log = failover(&[], 0, "a0 refused");
        log.extend(
            [
                "timeout @5000",
                "dead a1 until 65000",
                &failing_over("a1", "timed out after 5s"),
                "dial a2 @5000",
                "dead a2 until 65000",
            ]
            .map(String::from),
        );
        assert_eq!(r.log, log);
        assert_eq!(
            r.end,
            unavailable("a2", ConnectStage::Tcp, Reason::Tcp("a2 refused".into()))
        );
        // The last one timing out is reported as a timeout.
        let r = Case::new(plan(TlsMode::None, None), [Addr::Refused, Addr::Hangs]).run();
        assert_eq!(
            r.end,
            unavailable("a1", ConnectStage::Timeout, Reason::Timeout(CONNECT))
        );
        // None configured.
        let mut c = Connector::new(
            plan(TlsMode::None, None),
            Vec::new(),
            timeouts(None),
            Instant::now(),
        );
        assert_eq!(
            c.poll(),
            Some(ConnectStep::End(unavailable(
                "",
                ConnectStage::Tcp,
                Reason::NoAddress
            )))
        );
        assert_eq!(Reason::NoAddress.to_string(), "no address configured");
    }

    fn user_pass_server(pass_after: Duration) -> Addr<'static> {
        timed(vec![
            (b"USER", b"+OK\r\n", Duration::from_secs(8)),
            (b"PASS", b"+OK in\r\n", pass_after),
        ])
    }

    #[test]
    fn a_replayed_login_line_gets_its_reply_timeout_and_a_login_timeout_does_not_fail_over() {
        let login = |pass_after: u64| {
            let addrs = [user_pass_server(Duration::from_secs(pass_after)), greets()];
            Case::new(plan(TlsMode::None, Some(user_pass())), addrs)
                .replying()
                .run()
        };
        // 8 s for USER, 8 s for PASS: each within its 10 s.
        let r = login(8);
        assert!(matches!(r.end, ConnectEnd::LoggedIn { ref address, .. } if address == "a0"));
        // PASS unanswered: 10 s after its write (8 s in), no failover, the address was alive.
        let r = login(11);
        assert_eq!(
            r.log,
            [
                "dial a0 @0",
                "alive a0",
                "write USER alice",
                "write PASS s3cret",
                "timeout @18000"
            ]
        );
        assert_eq!(
            r.end,
            unavailable("a0", ConnectStage::Setup, Reason::NoReply(REPLY))
        );
    }

    const JSON: &[u8] = b"+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=\r\n";
    const REFUSED: &[u8] = b"-ERR [AUTH] Authentication failed.\r\n";

    /// An XOAUTH2 login with a stale token to `server`, the token source `tokens`.
    fn xoauth2_login(server: Addr<'static>, tokens: TokenSource) -> Run {
        let login = Some(bearer(Oauth2Mechanism::Xoauth2, "stale"));
        Case::new(plan(TlsMode::None, login), [server])
            .replying()
            .tokens(tokens)
            .run()
    }

    /// A server that refuses the first bearer token (a JSON challenge, then the `-ERR`) and
    /// answers the second with `second`, each answer after `after`.
    fn refuses_first_token(second: &'static [u8], after: Duration) -> Addr<'static> {
        timed(vec![
            (b"AUTH XOAUTH2", b"+ \r\n", after),
            (b"", JSON, after),
            (b"\r\n", REFUSED, after),
            (b"AUTH XOAUTH2", b"+ \r\n", after),
            (b"", second, after),
        ])
    }

    #[test]
    fn the_bearer_login_is_bounded_as_a_whole_token_fetch_included() {
        let s = Duration::from_secs;
        // Each answer within 10 s, but not the login: 4 + 4 + 4 s.
        let slow_server = timed(vec![
            (b"AUTH XOAUTH2", b"+ \r\n", s(4)),
            (b"", JSON, s(4)),
            (b"\r\n", b"+OK in\r\n", s(4)),
        ]);
        let r = xoauth2_login(slow_server, TOKENS);
        assert_eq!(r.log.last().unwrap(), "timeout @10000");
        assert_eq!(
            r.end,
            unavailable("a0", ConnectStage::Setup, Reason::BearerTimeout(REPLY))
        );
        // A slow token fetch counts: refused at 3 s, the fetch would take 8 s.
        let refusing = || refuses_first_token(b"+OK in\r\n", s(1));
        let slow = TokenSource {
            after: s(8),
            gives: true,
        };
        let r = xoauth2_login(refusing(), slow);
        assert_eq!(
            r.log[r.log.len() - 2..],
            ["fetch token @3000".to_owned(), "timeout @10000".to_owned()]
        );
        assert_eq!(
            r.end,
            unavailable("a0", ConnectStage::Setup, Reason::BearerTimeout(REPLY))
        );
        // A quick one: logged in at 5 s.
        let quick = TokenSource {
            after: s(0),
            gives: true,
        };
        let r = xoauth2_login(refusing(), quick);
        assert!(matches!(r.end, ConnectEnd::LoggedIn { .. }), "{r:?}");
    }

    #[test]
    fn a_refused_token_is_fetched_again_and_the_fresh_one_accepted_or_refused() {
        let z = Duration::ZERO;
        let r = xoauth2_login(refuses_first_token(b"+OK in\r\n", z), TOKENS);
        assert_eq!(
            r.log
                .iter()
                .filter(|l| l.starts_with("fetch token"))
                .count(),
            1
        );
        let token = position(&r.log, "fetch token @0");
        let fresh = &r.log[token + 2];
        let sent = decode(fresh.strip_prefix("write ").unwrap().as_bytes());
        assert!(
            String::from_utf8_lossy(&sent).contains("Bearer fresh"),
            "{fresh}"
        );
        assert_eq!(
            r.end,
            ConnectEnd::LoggedIn {
                address: "a0".into(),
                reply: b"+OK in\r\n".to_vec(),
                rest: Vec::new(),
            }
        );
        let r = xoauth2_login(refuses_first_token(REFUSED, z), TOKENS);
        assert_eq!(
            r.end,
            ConnectEnd::Failed(ConnectFailure::TokenRefused(REFUSED.to_vec()))
        );
        // No fresh token to be had: the driver knows why.
        let none = TokenSource {
            after: z,
            gives: false,
        };
        let r = xoauth2_login(refuses_first_token(REFUSED, z), none);
        assert_eq!(r.end, ConnectEnd::Failed(ConnectFailure::NoFreshToken));
    }

    #[test]
    fn no_credential_byte_is_written_before_the_handshake_of_the_address_it_goes_to() {
        let stls_login = |stls_answer: &'static [u8]| {
            server(
                b"+OK hi\r\n",
                vec![
                    (b"STLS", stls_answer),
                    (b"USER", b"+OK\r\n"),
                    (b"PASS", b"+OK in\r\n"),
                ],
            )
        };
        let sasl = replay_of(format!("AUTH PLAIN {}\r\n", b64(b"\0alice\0s3cret")).as_bytes());
        let sasl_server = server(
            b"+OK hi\r\n",
            vec![
                (b"STLS", b"+OK go\r\n"),
                (b"AUTH PLAIN", b"+ \r\n"),
                (b"", b"+OK in\r\n"),
            ],
        );
        for (login, second) in [
            (user_pass(), stls_login(b"+OK go\r\n")),
            (sasl, sasl_server),
        ] {
            // The first address never answers STLS (fails over), the second logs in.
            let addrs = [stls_login(b""), second];
            let r = Case::new(plan(TlsMode::Starttls, Some(login)), addrs)
                .replying()
                .run();
            assert!(matches!(r.end, ConnectEnd::LoggedIn { ref address, .. } if address == "a1"));
            let mut tls = false;
            for l in &r.log {
                if l.starts_with("dial") {
                    tls = false;
                } else if l.starts_with("tls @") {
                    tls = true;
                } else if let Some(w) = l.strip_prefix("write ") {
                    let last_word = w.rsplit(' ').next().unwrap_or_default();
                    let shown = [w.as_bytes().to_vec(), decode_or_empty(last_word.as_bytes())];
                    let secret = shown
                        .iter()
                        .any(|s| s.windows(SECRET.len()).any(|x| x == SECRET));
                    assert!(tls || !secret, "credential before TLS: {r:#?}");
                    assert!(tls || w == "STLS", "{w} before TLS");
                }
            }
            assert!(tls);
        }
    }

    #[test]
    fn the_proxy_header_goes_out_before_the_end_when_the_session_reads_the_greeting() {
        let header = b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n".to_vec();
        for tls in [TlsMode::None, TlsMode::Implicit] {
            let p = Plan {
                proxy_header: Some(header.clone()),
                read_greeting: false,
                ..plan(tls, None)
            };
            let r = Case::new(p, [Addr::Refused, greets()]).run();
            let wrote = position(&r.log, &format!("write {}", text(&header)));
            assert!(wrote > position(&r.log, "dial a1 @0"));
            assert!(wrote < position(&r.log, "alive a1"));
            assert_eq!(
                r.end,
                ConnectEnd::Connected {
                    address: "a1".into(),
                    preread: Vec::new(),
                }
            );
        }
    }

    /// A connector for implicit TLS behind the PROXY `header` over `addrs`, dialled to its
    /// first address at `t0`, its header written: the handshake is queued behind it.
    fn header_written(header: &[u8], addrs: &[&str], t0: Instant) -> Connector {
        let behind_header = Plan {
            proxy_header: Some(header.to_vec()),
            ..plan(TlsMode::Implicit, None)
        };
        let names = addrs.iter().map(|a| a.to_string()).collect();
        let mut c = Connector::new(behind_header, names, timeouts(None), t0);
        assert_eq!(c.poll(), Some(ConnectStep::Dial("a0".into())));
        c.dialled(t0);
        assert!(matches!(c.poll(), Some(ConnectStep::Write(_))));
        c
    }

    #[test]
    fn nothing_queued_for_a_connection_given_up_is_done_on_it() {
        // Implicit TLS behind a PROXY header: the header's write hangs past the connect
        // timeout; the handshake queued behind it is not run on that connection.
        let t0 = Instant::now();
        let header = b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n";
        let mut c = header_written(header, &["a0", "a1"], t0);
        c.on_timeout(t0 + CONNECT);
        let steps: Vec<ConnectStep> = std::iter::from_fn(|| c.poll()).collect();
        assert!(matches!(steps[0], ConnectStep::MarkDead { ref address, .. } if address == "a0"));
        assert!(matches!(
            steps[1],
            ConnectStep::Notice(Notice::FailingOver { .. })
        ));
        assert_eq!(steps[2..], [ConnectStep::Dial("a1".into())]);
        // A write that fails with more queued behind it: the end comes, nothing else.
        let mut c = header_written(b"PROXY UNKNOWN\r\n", &["a0"], t0);
        c.write_failed(t0, &"broken pipe");
        assert!(matches!(
            c.poll(),
            Some(ConnectStep::End(ConnectEnd::Failed(
                ConnectFailure::Unavailable {
                    stage: ConnectStage::Setup,
                    ..
                }
            )))
        ));
        assert_eq!(c.poll(), None);
    }

    #[test]
    fn late_and_early_events_change_nothing() {
        let t0 = Instant::now();
        let mut c = Connector::new(
            plan(TlsMode::None, None),
            vec!["a0".into()],
            timeouts(None),
            t0,
        );
        assert_eq!(c.poll(), Some(ConnectStep::Dial("a0".into())));
        assert_eq!(c.poll_timeout(), Some(t0 + CONNECT));
        // Early: nothing; bytes before the dial completed: nothing.
        c.on_timeout(t0 + CONNECT - Duration::from_millis(1));
        c.on_server_bytes(t0, b"+OK\r\n");
        c.tls_done(t0);
        assert_eq!(c.poll(), None);
        c.dialled(t0);
        c.dialled(t0);
        c.on_server_bytes(t0, b"+OK hi\r\n");
        assert_eq!(c.poll(), Some(ConnectStep::MarkAlive("a0".into())));
        assert!(matches!(
            c.poll(),
            Some(ConnectStep::End(ConnectEnd::Connected { .. }))
        ));
        c.on_timeout(t0 + CONNECT);
        c.dial_failed(t0, &"late");
        assert_eq!((c.poll(), c.poll_timeout()), (None, None));
    }
}
