//! The connect phase, no I/O: what the `connect` rules say about a new session (wait first,
//! refuse with a line, drop silently, or let it in), the wait itself as a deadline
//! ([`Opening`]: the client is read meanwhile, and a hang-up or a shutdown ends it at once),
//! and how the upstream is reached (direct mode: which dialogue plan). The session machine
//! ([`Session::opening`](super::Session::opening)) drives the phase; `session::open` takes the
//! verdict.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info};

use crate::pop3::replies;
use crate::rules::Event;
use crate::types::CloseReason;

use super::output::Marks;
use super::policy::{Policy, Terminal};

/// The most client bytes kept during a connect rule's delay, whatever the limits allow: a
/// tarpitted client is often a hostile one, and what it sends beyond this waits in its socket
/// (as it would in the kernel's buffer) until the delay is over.
const MAX_EARLY_INPUT: usize = 64 * 1024;

/// What the `connect` rules decided for a new session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Admission {
    /// Wait this long before anything else (tarpit rules).
    pub(crate) delay: Option<Duration>,
    /// Refused: the session ends after the delay, with the rule's reply if any.
    pub(crate) refusal: Option<ConnectRefusal>,
    /// The connect event's own tags (for the audit trail's close record of a refusal).
    pub(crate) tags: Vec<Arc<str>>,
}

/// A session the `connect` rules refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnectRefusal {
    /// The refusing rule.
    pub(crate) rule: Arc<str>,
    /// `deny`: the line to write (CRLF included) before closing; `drop`: none.
    pub(crate) reply: Option<Vec<u8>>,
}

/// Evaluate the `connect` event: the rules run (and log, tag, count) once, here.
pub(crate) fn admit(policy: &mut Policy, event: &Event<'_>) -> Admission {
    let verdict = policy.evaluate(event);
    let refusal = match policy.terminal(&verdict) {
        Terminal::Pass => None,
        Terminal::Deny { reply, rule, .. } => {
            info!(%rule, "connection denied by rule");
            Some(ConnectRefusal {
                rule,
                reply: Some(replies::line(&reply)),
            })
        }
        Terminal::Drop { rule } => {
            info!(%rule, "connection dropped by rule");
            Some(ConnectRefusal { rule, reply: None })
        }
    };
    Admission {
        delay: verdict.delay,
        refusal,
        tags: verdict.tags,
    }
}

/// How many client bytes the connect phase keeps before it stops reading:
/// `limits.max_line` x `limits.max_pipeline` (what the relay lets wait for it), at most
/// 64 KiB. The driver may overshoot by one read.
pub(crate) fn early_input_limit(max_line: usize, max_pipeline: usize) -> usize {
    max_line.saturating_mul(max_pipeline).min(MAX_EARLY_INPUT)
}

/// How the connect phase ends: what [`Opening::poll`] tells the driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Opened {
    /// The session goes on: dial the upstream (direct mode) or greet (routing mode). The
    /// client bytes read meanwhile stay in the driver's buffer and go to the relay with it
    /// (the session's), as if read then.
    Proceed,
    /// The session ends here: write `reply` to the client (if any), close it, and record the
    /// `session_close` with `reason` and `marks`. What the client sent meanwhile is dropped.
    Close {
        /// The last line for the client (CRLF included): a `deny` rule's, the shutdown's;
        /// `None` for a `drop` rule and a client that is gone.
        reply: Option<Vec<u8>>,
        /// Why: `RuleDrop` (a refusing rule), `ClientEof`/`Error` (the client hung up or its
        /// connection failed), `Shutdown` (a kick or the drain: the driver tells which).
        reason: CloseReason,
        /// For the close record: a refusal's rule and the connect event's tags.
        marks: Marks,
    },
}

/// The connect phase of one session, from the `connect` rules' verdict to the dial (or the
/// refusal): a rule's delay is a deadline, not a blocking wait, so the client is still read
/// (a hang-up ends the session at once, freeing its slot) and a shutdown or kick still wins.
///
/// # Calling contract
///
/// Its driver is the session machine ([`Session::opening`](super::Session::opening)).
///
/// 1. [`Opening::new`] with the [`Admission`] (from [`admit`]) once the session is recorded
///    as open, the current time and the [`early_input_limit`].
/// 2. [`Opening::poll`]: `Some` says how the phase ends (at once when no rule delays);
///    `None` means wait.
/// 3. While waiting: read the client only while [`Opening::wants_client_input`], appending to
///    the driver's client buffer, then [`Opening::on_client_input`] with its length; at the
///    end of the stream [`Opening::on_client_eof`], on a read error
///    [`Opening::on_client_error`]. At the instant [`Opening::poll_timeout`] returns, call
///    [`Opening::on_timeout`] (nothing happens if called early). A shutdown or kick is
///    always watched: [`Opening::on_shutdown`]. After every call, [`Opening::poll`] again.
#[derive(Debug)]
pub(crate) struct Opening {
    /// The end of the rule's delay, while it runs.
    until: Option<Instant>,
    /// The refusal that follows the delay, if the rules refuse the session.
    refusal: Option<ConnectRefusal>,
    /// The connect event's tags, for a refusal's close record.
    tags: Vec<Arc<str>>,
    /// Client bytes kept so far, and how many may be.
    early: usize,
    max_early: usize,
    /// How the phase ended, until the driver polls it.
    end: Option<Opened>,
    /// Whether [`Opening::poll`] has handed the end out: later events change nothing.
    over: bool,
}

impl Opening {
    /// The connect phase of a session the rules judged with `admission`, starting `now`.
    pub(crate) fn new(admission: Admission, now: Instant, max_early: usize) -> Opening {
        let Admission {
            delay,
            refusal,
            tags,
        } = admission;
        let mut opening = Opening {
            until: delay.filter(|d| !d.is_zero()).map(|d| now + d),
            refusal,
            tags,
            early: 0,
            max_early,
            end: None,
            over: false,
        };
        if opening.until.is_none() {
            opening.decide();
        }
        opening
    }

    /// How the phase ends, once it has (then never again); `None`: wait for input, the
    /// deadline or a shutdown.
    pub(crate) fn poll(&mut self) -> Option<Opened> {
        let end = self.end.take()?;
        self.over = true;
        Some(end)
    }

    /// When [`Opening::on_timeout`] is due: the end of the rule's delay.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.until.filter(|_| self.waiting())
    }

    /// Whether the driver may read from the client now: during the delay, until the kept
    /// bytes reach the limit (the rest waits in the socket).
    pub(crate) fn wants_client_input(&self) -> bool {
        self.waiting() && self.early < self.max_early
    }

    /// Bytes arrived from the client during the delay; `buffered` is how many the driver's
    /// buffer holds now. They are kept for the session, not looked at.
    pub(crate) fn on_client_input(&mut self, buffered: usize) {
        self.early = buffered;
    }

    /// The client closed its side during the delay: the session ends now, as a client that
    /// hangs up in the relay does. Nothing it sent is relayed.
    pub(crate) fn on_client_eof(&mut self) {
        if self.waiting() {
            debug!("client hung up during a connect rule's delay");
            self.end_now(None, CloseReason::ClientEof);
        }
    }

    /// Reading from the client failed during the delay; `disconnect` for an ordinary one
    /// (a reset): the session ends now.
    pub(crate) fn on_client_error(&mut self, disconnect: bool) {
        if self.waiting() {
            let reason = if disconnect {
                CloseReason::ClientEof
            } else {
                CloseReason::Error
            };
            debug!(
                reason = reason.as_str(),
                "client lost during a connect rule's delay"
            );
            self.end_now(None, reason);
        }
    }

    /// popgate is shutting down or the session was kicked: it ends now with the `-ERR` a
    /// session in its relay gets, whatever the rules had decided.
    pub(crate) fn on_shutdown(&mut self) {
        if self.waiting() {
            let line = replies::line(replies::SHUTTING_DOWN);
            self.end_now(Some(line), CloseReason::Shutdown);
        }
    }

    /// The instant [`Opening::poll_timeout`] reported has come (or not yet: then nothing).
    pub(crate) fn on_timeout(&mut self, now: Instant) {
        if self.waiting() && self.until.is_some_and(|t| now >= t) {
            self.decide();
        }
    }

    /// Still in the delay: nothing decided yet.
    fn waiting(&self) -> bool {
        !self.over && self.end.is_none()
    }

    /// The delay is over (or there was none): the rules' verdict stands.
    fn decide(&mut self) {
        self.until = None;
        self.end = Some(match self.refusal.take() {
            None => Opened::Proceed,
            Some(ConnectRefusal { rule, reply }) => Opened::Close {
                reply,
                reason: CloseReason::RuleDrop,
                marks: Marks {
                    tags: std::mem::take(&mut self.tags),
                    dropped_by: Some(rule),
                },
            },
        });
    }

    fn end_now(&mut self, reply: Option<Vec<u8>>, reason: CloseReason) {
        self.until = None;
        self.end = Some(Opened::Close {
            reply,
            reason,
            marks: Marks::default(),
        });
    }
}

/// Direct mode: whether the upstream set-up reads the greeting. With one address the session
/// awaits it itself (`limits.greeting_timeout`); with several it is part of the set-up, so
/// that an address that accepts but never greets is failed over.
pub(crate) fn greeting_in_setup(addresses: usize) -> bool {
    addresses > 1
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::rules::{EventKind, RuleSet};

    fn admission(rules: &str, client: &str) -> Admission {
        let set = Arc::new(RuleSet::parse(rules, Path::new("t.toml")).unwrap());
        let mut policy = Policy::new(set);
        let ip = client.parse().unwrap();
        admit(&mut policy, &Event::new(EventKind::Connect, "pop3", ip))
    }

    const RULES: &str = "[[rule]]\nname = \"slow\"\non = \"connect\"\nclient = \"10.0.0.0/8\"\n\
        action = \"delay\"\ndelay = \"2s\"\n\
        [[rule]]\nname = \"mark\"\non = \"connect\"\naction = \"tag\"\ntags = \"seen\"\n\
        [[rule]]\nname = \"no-lab\"\non = \"connect\"\nclient = \"10.1.0.0/16\"\n\
        action = \"deny\"\ncode = \"SYS/PERM\"\n\
        [[rule]]\nname = \"silent\"\non = \"connect\"\nclient = \"192.0.2.0/24\"\n\
        action = \"drop\"\n";

    #[test]
    fn connect_rules_delay_deny_drop_or_pass_without_sockets() {
        let a = admission(RULES, "10.2.3.4");
        assert_eq!(a.delay, Some(Duration::from_secs(2)));
        assert_eq!(a.refusal, None);
        assert_eq!(a.tags, vec![Arc::<str>::from("seen")]);
        let a = admission(RULES, "10.1.2.3");
        assert_eq!(a.delay, Some(Duration::from_secs(2)));
        assert_eq!(
            a.refusal,
            Some(ConnectRefusal {
                rule: "no-lab".into(),
                reply: Some(b"-ERR [SYS/PERM] connection not allowed by policy\r\n".to_vec()),
            })
        );
        let a = admission(RULES, "192.0.2.7");
        assert_eq!(a.delay, None);
        assert_eq!(
            a.refusal,
            Some(ConnectRefusal {
                rule: "silent".into(),
                reply: None
            })
        );
        assert_eq!(admission(RULES, "203.0.113.1").refusal, None);
    }

    const SHUTTING_DOWN: &[u8] = b"-ERR [SYS/TEMP] proxy shutting down\r\n";

    /// The connect phase of a client at `client` under [`RULES`], started at `t0`.
    fn opening(client: &str, t0: Instant) -> Opening {
        Opening::new(admission(RULES, client), t0, early_input_limit(512, 8))
    }

    fn closed(reason: CloseReason, reply: Option<&[u8]>) -> Option<Opened> {
        Some(Opened::Close {
            reply: reply.map(<[u8]>::to_vec),
            reason,
            marks: Marks::default(),
        })
    }

    #[test]
    fn without_a_delay_the_verdict_comes_at_once_and_nothing_is_read() {
        let t0 = Instant::now();
        let mut o = opening("203.0.113.1", t0);
        assert_eq!(o.poll_timeout(), None);
        assert!(!o.wants_client_input());
        assert_eq!(o.poll(), Some(Opened::Proceed));
        assert_eq!(o.poll(), None, "told once");
        let mut o = opening("192.0.2.7", t0);
        assert!(!o.wants_client_input());
        assert_eq!(
            o.poll(),
            Some(Opened::Close {
                reply: None,
                reason: CloseReason::RuleDrop,
                marks: Marks {
                    tags: vec![Arc::from("seen")],
                    dropped_by: Some(Arc::from("silent")),
                },
            })
        );
    }

    #[test]
    fn a_delay_is_a_deadline_the_client_is_read_meanwhile_and_the_session_goes_on_after_it() {
        let t0 = Instant::now();
        let mut o = opening("10.2.3.4", t0);
        let end = t0 + Duration::from_secs(2);
        assert_eq!(o.poll(), None);
        assert_eq!(o.poll_timeout(), Some(end));
        assert!(o.wants_client_input());
        o.on_client_input(12);
        // Early: nothing happens.
        o.on_timeout(end - Duration::from_millis(1));
        assert_eq!(o.poll(), None);
        assert_eq!(o.poll_timeout(), Some(end));
        o.on_timeout(end);
        assert_eq!(o.poll(), Some(Opened::Proceed));
        assert_eq!(o.poll_timeout(), None);
        assert!(!o.wants_client_input());
        // Over: later events change nothing.
        o.on_client_eof();
        o.on_shutdown();
        assert_eq!(o.poll(), None);
    }

    #[test]
    fn a_refusal_comes_after_the_delay_with_its_rule_and_the_connect_tags() {
        let t0 = Instant::now();
        let mut o = opening("10.1.2.3", t0);
        assert_eq!(o.poll(), None);
        o.on_timeout(t0 + Duration::from_secs(3));
        assert_eq!(
            o.poll(),
            Some(Opened::Close {
                reply: Some(b"-ERR [SYS/PERM] connection not allowed by policy\r\n".to_vec()),
                reason: CloseReason::RuleDrop,
                marks: Marks {
                    tags: vec![Arc::from("seen")],
                    dropped_by: Some(Arc::from("no-lab")),
                },
            })
        );
    }

    #[test]
    fn a_client_that_hangs_up_during_the_delay_ends_the_session_at_once() {
        let t0 = Instant::now();
        // Let in or refused after the delay: a hang-up ends either at once, as in the relay.
        for client in ["10.2.3.4", "10.1.2.3"] {
            let mut o = opening(client, t0);
            o.on_client_input(40);
            o.on_client_eof();
            assert_eq!(o.poll(), closed(CloseReason::ClientEof, None), "{client}");
            assert_eq!(o.poll_timeout(), None);
            assert!(!o.wants_client_input());
            o.on_timeout(t0 + Duration::from_secs(2));
            assert_eq!(o.poll(), None, "{client}: the deadline is gone");
        }
        let mut o = opening("10.2.3.4", t0);
        o.on_client_error(true);
        assert_eq!(o.poll(), closed(CloseReason::ClientEof, None));
        let mut o = opening("10.2.3.4", t0);
        o.on_client_error(false);
        assert_eq!(o.poll(), closed(CloseReason::Error, None));
    }

    #[test]
    fn a_shutdown_or_kick_during_the_delay_wins_with_the_relays_err() {
        let t0 = Instant::now();
        for client in ["10.2.3.4", "10.1.2.3"] {
            let mut o = opening(client, t0);
            o.on_shutdown();
            assert_eq!(
                o.poll(),
                closed(CloseReason::Shutdown, Some(SHUTTING_DOWN)),
                "{client}: not the rule's reply"
            );
            o.on_timeout(t0 + Duration::from_secs(2));
            o.on_client_eof();
            assert_eq!(o.poll(), None);
        }
    }

    #[test]
    fn early_input_is_kept_up_to_the_limit_then_left_in_the_socket() {
        assert_eq!(early_input_limit(512, 8), 4096);
        assert_eq!(early_input_limit(8192, 256), 64 * 1024, "capped");
        assert_eq!(early_input_limit(usize::MAX, 2), 64 * 1024);
        let t0 = Instant::now();
        let mut o = opening("10.2.3.4", t0);
        o.on_client_input(4095);
        assert!(o.wants_client_input());
        o.on_client_input(4096);
        assert!(
            !o.wants_client_input(),
            "full: the rest waits in the socket"
        );
        // Full, the session still ends at its deadline or a shutdown.
        assert_eq!(o.poll_timeout(), Some(t0 + Duration::from_secs(2)));
        o.on_shutdown();
        assert_eq!(o.poll(), closed(CloseReason::Shutdown, Some(SHUTTING_DOWN)));
    }

    /// What can happen during a delay, for the property test.
    #[derive(Debug, Clone)]
    enum Happens {
        /// The client's buffer now holds this many more bytes.
        Input(usize),
        Eof,
        Error(bool),
        Shutdown,
        /// The driver's timer fires this many milliseconds after the start.
        Timer(u64),
    }

    fn happens() -> impl proptest::strategy::Strategy<Value = Happens> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (1usize..3000).prop_map(Happens::Input),
            1 => Just(Happens::Eof),
            1 => any::<bool>().prop_map(Happens::Error),
            1 => Just(Happens::Shutdown),
            3 => (0u64..6000).prop_map(Happens::Timer),
        ]
    }

    proptest::proptest! {
        /// Whatever happens in whatever order, the phase ends once, as the first decisive
        /// event says: the deadline passed (the rules' verdict), a hang-up or read error
        /// (ended at once), a shutdown (the relay's `-ERR`); the client is read only while
        /// it waits and the kept bytes are under the limit; the deadline is reported while
        /// it waits, and an early timer changes nothing.
        #[test]
        fn the_connect_phase_ends_once_as_its_first_decisive_event_says(
            delay_ms in 0u64..5000,
            refusal in 0u8..3,
            events in proptest::collection::vec(happens(), 0..24),
        ) {
            let t0 = Instant::now();
            let refusal = match refusal {
                0 => None,
                1 => Some(ConnectRefusal { rule: "no".into(), reply: Some(b"-ERR no\r\n".to_vec()) }),
                _ => Some(ConnectRefusal { rule: "no".into(), reply: None }),
            };
            let delay = (delay_ms > 0).then(|| Duration::from_millis(delay_ms));
            let admission = Admission { delay, refusal: refusal.clone(), tags: vec![] };
            let limit = early_input_limit(512, 8);
            let mut o = Opening::new(admission, t0, limit);
            let verdict = match refusal {
                None => Opened::Proceed,
                Some(ConnectRefusal { rule, reply }) => Opened::Close {
                    reply,
                    reason: CloseReason::RuleDrop,
                    marks: Marks { tags: vec![], dropped_by: Some(rule) },
                },
            };
            let mut ended = false;
            if delay.is_none() {
                proptest::prop_assert_eq!(o.poll(), Some(verdict.clone()));
                ended = true;
            }
            let mut buffered = 0;
            for ev in events {
                let until = t0 + Duration::from_millis(delay_ms);
                proptest::prop_assert_eq!(o.poll_timeout(), (!ended).then_some(until));
                proptest::prop_assert_eq!(o.wants_client_input(), !ended && buffered < limit);
                let want = if ended {
                    None
                } else {
                    match &ev {
                        Happens::Input(_) => None,
                        Happens::Eof | Happens::Error(true) => {
                            closed(CloseReason::ClientEof, None)
                        }
                        Happens::Error(false) => closed(CloseReason::Error, None),
                        Happens::Shutdown => closed(CloseReason::Shutdown, Some(SHUTTING_DOWN)),
                        Happens::Timer(ms) if *ms >= delay_ms => Some(verdict.clone()),
                        Happens::Timer(_) => None,
                    }
                };
                match ev {
                    Happens::Input(n) if o.wants_client_input() => {
                        buffered += n;
                        o.on_client_input(buffered);
                    }
                    Happens::Input(_) => {}
                    Happens::Eof => o.on_client_eof(),
                    Happens::Error(d) => o.on_client_error(d),
                    Happens::Shutdown => o.on_shutdown(),
                    Happens::Timer(ms) => o.on_timeout(t0 + Duration::from_millis(ms)),
                }
                ended |= want.is_some();
                proptest::prop_assert_eq!(o.poll(), want);
            }
        }
    }

    #[test]
    fn the_greeting_is_part_of_the_setup_only_with_several_addresses() {
        assert!(!greeting_in_setup(1));
        assert!(greeting_in_setup(2));
    }
}
