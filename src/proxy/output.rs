//! What a [`Hop`](super::Hop) hands its driver: [`Output`]s to carry out in order, some of them
//! held behind a deadline (a rule's tarpit, the failed-login penalty), and [`SessionEvent`]s
//! for the audit trail, transcripts and metrics.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::dialogue::{ConnectFailure, ConnectStage, Notice, Reason};
use super::front::Login;
use crate::pop3::command::{Command, Verb};
use crate::pop3::tracker::{ResponseMeta, State};
use crate::types::{CloseReason, ScanReport, UserName};

use super::scan::{ScanAction, ScanRequest};

/// What the driver must do next, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Output {
    /// Write these bytes to the client.
    ToClient(Bytes),
    /// Write these bytes to the upstream.
    ToUpstream(Bytes),
    /// Run the server side of a TLS handshake with the client, then call
    /// [`Hop::client_tls_started`](super::Hop::client_tls_started).
    StartClientTls,
    /// Routing mode (from [`Session`](super::Session), never from the hop): route this
    /// login and hand the chosen upstream's connector to
    /// [`Session::connect_login`](super::Session::connect_login), which carries it out (or
    /// answer it with [`Session::login_failed`](super::Session::login_failed) when the
    /// OAuth2 bridge refuses it).
    Login(Box<Login>),
    /// Direct mode with `forward_client = "proxy-v2"`, after the client's STLS, before the
    /// first command goes upstream (from [`Session`](super::Session), never from the hop):
    /// dial the server again with the client's TLS in the PROXY header and take its greeting
    /// silently; go on over the new connection, or over the old one if that fails.
    RedialUpstream,
    /// Append these body bytes (wire bytes of a RETR/TOP body a `scan` rule selected,
    /// dot-stuffed, without the terminator line) to the session's spool, creating it with the
    /// first chunk. The client gets none of it until an [`Output::Unspool`].
    Spool(Bytes),
    /// Start a scan of the spool by these scanners; outputs after this one are held until
    /// the driver answers with [`Hop::scan_done`](super::Hop::scan_done) (the client is
    /// still watched, a shutdown still ends the session). The spool stays the driver's.
    Scan(ScanRequest),
    /// Write the spool's bytes to the client (counted as traffic to the client), then drop
    /// the spool.
    Unspool,
    /// Drop the spool unsent (the message was replaced, denied or tempfailed).
    DropSpool,
    /// Routing mode's login (from [`Session`](super::Session), after
    /// [`Session::connect_login`](super::Session::connect_login)): close the upstream
    /// connection there is, if any (without a word), and open a TCP connection to this address
    /// (`host:port`, as configured) with `TCP_NODELAY`; then
    /// [`Session::dialled`](super::Session::dialled) or
    /// [`Session::dial_failed`](super::Session::dial_failed). Raced with the session's
    /// deadline and a shutdown, as every step of the login.
    Dial(String),
    /// Routing mode's login: run the client side of a TLS handshake on the upstream
    /// connection (toward the address dialled last); then
    /// [`Session::upstream_tls_done`](super::Session::upstream_tls_done) or
    /// [`Session::upstream_tls_failed`](super::Session::upstream_tls_failed).
    StartUpstreamTls,
    /// Routing mode's bearer login: the server refused the access token once; get a fresh
    /// one from the OAuth2 bridge, then [`Session::fresh_token`](super::Session::fresh_token)
    /// or [`Session::token_failed`](super::Session::token_failed).
    FetchToken,
    /// Routing mode's login: skip this address until then (the shared dead addresses).
    MarkDead(Box<DeadMark>),
    /// Routing mode's login: this address answered, it is alive again.
    MarkAlive(String),
    /// Routing mode's login: something about the upstream worth a log line.
    UpstreamNotice(Box<Notice>),
    /// Routing mode's login is over (the upstream connection is dropped unless it
    /// succeeded): record it (logs, metrics). For [`LoginEnd::Bridge`] the driver answers
    /// with [`Session::login_failed`](super::Session::login_failed) and the OAuth2 bridge's
    /// reply; otherwise the session has already gone over to the upstream or answered the
    /// client.
    LoginEnded(Box<LoginEnd>),
    /// The session is over, for this reason: close the client (with a TCP reset when
    /// [`Hop::mid_response`](super::Hop::mid_response): a cut multi-line response must not
    /// look complete) and the upstream, without QUIT.
    Close(CloseReason),
}

/// An address to skip ([`Output::MarkDead`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeadMark {
    /// The address, as configured.
    pub(crate) address: String,
    /// Until when.
    pub(crate) until: Instant,
}

/// How routing mode's login ended ([`Output::LoginEnded`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LoginEnd {
    /// The upstream took the login: the session relays over the connection dialled last.
    LoggedIn {
        /// The address that answered.
        address: String,
        /// The server's octets the session took as the login's reply (and what followed it).
        octets: usize,
    },
    /// The upstream could not be had; the client was told it is unavailable.
    Unavailable {
        /// The last address tried (empty when none is configured).
        address: String,
        /// Where it failed.
        stage: ConnectStage,
        /// Why.
        reason: Reason,
    },
    /// The server answered a login step `-ERR`, which answered the client.
    Refused,
    /// The bearer login failed in a way only the OAuth2 bridge can judge (a refused fresh
    /// token, an unexpected reply, no fresh token): the driver answers with its reply.
    Bridge(ConnectFailure),
}

/// What rules said about the audit record(s) of one event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Marks {
    /// Event-scoped tags (`tag` rules without `scope = "session"`) of the command and of its
    /// response (and login), or of what closed the session.
    pub(crate) tags: Vec<Arc<str>>,
    /// The rule that dropped the session here, if one did.
    pub(crate) dropped_by: Option<Arc<str>>,
}

/// A command line as the hop parsed it: the line as sent, its verb, and where its keyword and
/// arguments lie, so that the observer builds the [`Command`] without parsing it again. 56
/// bytes: no larger than the [`SessionEvent`]s that carry a status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CommandLine {
    line: Bytes,
    verb: Verb,
    /// Offsets into `line` (a line is bounded by `limits.max_line`, far below 4 GiB).
    keyword: (u32, u32),
    args: (u32, u32),
}

impl CommandLine {
    /// `cmd`, parsed from `line` (it borrows `line`'s bytes), kept with it.
    pub(crate) fn new(line: Bytes, cmd: &Command<'_>) -> CommandLine {
        let base = line.as_ptr() as usize;
        let span = |part: &[u8]| {
            let start = (part.as_ptr() as usize).wrapping_sub(base);
            debug_assert!(start + part.len() <= line.len(), "not a part of the line");
            let start = start.min(line.len());
            let end = (start + part.len()).min(line.len());
            (
                u32::try_from(start).unwrap_or(u32::MAX),
                u32::try_from(end).unwrap_or(u32::MAX),
            )
        };
        let (keyword, args) = (span(cmd.keyword), span(cmd.args));
        CommandLine {
            verb: cmd.verb,
            keyword,
            args,
            line,
        }
    }

    /// The line as sent, line ending included (the observer takes the [`Command`]).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn line(&self) -> &Bytes {
        &self.line
    }

    /// The command, as the hop parsed it.
    pub(crate) fn command(&self) -> Command<'_> {
        let part = |(start, end): (u32, u32)| self.line.get(start as usize..end as usize);
        Command {
            verb: self.verb,
            keyword: part(self.keyword).unwrap_or_default(),
            args: part(self.args).unwrap_or_default(),
            raw: &self.line,
        }
    }
}

/// What happened in a session, for the audit trail, transcripts and metrics, in the order it
/// happened. Bytes are shared with what was relayed (no copy of bodies). The driver polls them
/// with [`Hop::poll_event`](super::Hop::poll_event) after every call that feeds the hop.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SessionEvent {
    /// A command the client sent (the transcript redacts it).
    ClientCommand(CommandLine),
    /// A SASL answer, or a line taken for one: never its content.
    ClientSasl,
    /// A reply popgate gave itself.
    LocalReply(Bytes),
    /// A server status line with what the tracker made of it (`state` after the line) and
    /// what rules said about it.
    Status {
        /// What the line answers.
        meta: ResponseMeta,
        /// The line as the server sent it.
        line: Bytes,
        /// The user rules and audit see.
        user: Option<UserName>,
        /// The session state after the line.
        state: State,
        /// Rule tags and drops.
        marks: Marks,
    },
    /// Bytes of a multi-line body as relayed; `end` when they include the terminator.
    Body {
        /// The bytes.
        chunk: Bytes,
        /// Whether the terminator is in `chunk`.
        end: bool,
        /// The user rules and audit see, on the chunk with the terminator (`None` before).
        user: Option<UserName>,
    },
    /// A command a rule denied, with the command's event tags.
    Denied {
        /// The rule.
        rule: Arc<str>,
        /// The command's verb.
        verb: Verb,
        /// The user rules and audit see.
        user: Option<UserName>,
        /// The command's event tags.
        tags: Vec<Arc<str>>,
    },
    /// The session-scoped rule tags so far (they go on every later event); sent when they
    /// change.
    Tags(Vec<Arc<str>>),
    /// A login from this address failed on its credentials. Its `-ERR` (and everything after
    /// it) is held until the driver answers with [`Hop::penalty`](super::Hop::penalty).
    LoginFailed(IpAddr),
    /// popgate sent this command upstream itself, for the audit trail (the client never
    /// sees it).
    Injected(CommandLine),
    /// The status line answering an injected command (consumed, not relayed).
    InjectedStatus {
        /// What the line answers.
        meta: ResponseMeta,
        /// The line.
        line: Bytes,
    },
    /// Body bytes answering an injected command (consumed, not relayed).
    InjectedBody {
        /// The bytes.
        chunk: Bytes,
        /// Whether the terminator is in `chunk`.
        end: bool,
    },
    /// The server has no UIDL command: the audit records say so from now on.
    NoUidl,
    /// A retrieved message held for scanning was judged (or let through unscanned): one audit
    /// `scan` event per report. Comes after the body's last [`SessionEvent::Body`] (the
    /// `retrieve` record, as the server sent it) and before what the client got.
    Scanned {
        /// The message number.
        msg: u32,
        /// `RETR` or `TOP`.
        verb: Verb,
        /// One per scanner, in the order the rules named them.
        reports: Vec<ScanReport>,
        /// What the client got.
        action: ScanAction,
        /// Header lines added for the client after the status line (CRLF each), if any.
        added: Bytes,
        /// The user rules and audit see.
        user: Option<UserName>,
    },
}

/// A point in the output queue that nothing after passes before its time.
#[derive(Debug)]
struct Hold {
    /// How long, from when it is armed.
    delay: Duration,
    /// When it ends, once armed (it is armed when no hold is before it).
    until: Option<Instant>,
    /// The driver has not yet answered the [`SessionEvent::LoginFailed`] that asked for it.
    awaiting_penalty: bool,
    /// The driver has not yet answered the [`Output::Scan`] before it: the verdict's outputs
    /// take this hold's place ([`Outputs::answer_scan`]).
    awaiting_scan: bool,
}

#[derive(Debug)]
enum Slot {
    Out(Output),
    Hold(Hold),
}

/// The outputs of a hop in order, with the holds between them.
#[derive(Debug, Default)]
pub(super) struct Outputs {
    slots: VecDeque<Slot>,
    /// How many [`Slot::Hold`]s are queued.
    holds: usize,
}

impl Outputs {
    pub(super) fn push(&mut self, out: Output) {
        self.slots.push_back(Slot::Out(out));
    }

    /// Nothing queued after this point goes out before `delay` has passed (counted from
    /// `now` if no hold is before it, else from when the one before it ends), nor, with
    /// `awaiting_penalty`, before the driver's [`Outputs::answer_penalty`].
    pub(super) fn hold(&mut self, delay: Duration, awaiting_penalty: bool, now: Instant) {
        self.slots.push_back(Slot::Hold(Hold {
            delay,
            until: None,
            awaiting_penalty,
            awaiting_scan: false,
        }));
        self.holds += 1;
        self.settle(now);
    }

    /// Nothing queued after this point goes out before [`Outputs::answer_scan`].
    pub(super) fn hold_for_scan(&mut self) {
        self.slots.push_back(Slot::Hold(Hold {
            delay: Duration::ZERO,
            until: None,
            awaiting_penalty: false,
            awaiting_scan: true,
        }));
        self.holds += 1;
    }

    /// The verdict of the scan a hold waits for: `outs` take the hold's place, in order.
    /// `false` if no hold waits for one.
    pub(super) fn answer_scan(&mut self, outs: Vec<Output>, now: Instant) -> bool {
        let Some(i) = self
            .slots
            .iter()
            .position(|s| matches!(s, Slot::Hold(h) if h.awaiting_scan))
        else {
            return false;
        };
        self.slots.remove(i);
        self.holds -= 1;
        for (k, out) in outs.into_iter().enumerate() {
            self.slots.insert(i + k, Slot::Out(out));
        }
        self.settle(now);
        true
    }

    /// The next output that may go out now.
    pub(super) fn pop(&mut self) -> Option<Output> {
        match self.slots.front() {
            Some(Slot::Out(_)) => match self.slots.pop_front() {
                Some(Slot::Out(o)) => Some(o),
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether some outputs wait behind a hold.
    pub(super) fn holding(&self) -> bool {
        self.holds > 0
    }

    pub(super) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Let go of the memory of an empty queue.
    pub(super) fn trim(&mut self) {
        if self.slots.is_empty() && self.slots.capacity() > 0 {
            self.slots = VecDeque::new();
        }
    }

    fn first_hold(&mut self) -> Option<(usize, &mut Hold)> {
        if self.holds == 0 {
            return None;
        }
        self.slots
            .iter_mut()
            .enumerate()
            .find_map(|(i, s)| match s {
                Slot::Hold(h) => Some((i, h)),
                Slot::Out(_) => None,
            })
    }

    /// Arm the first hold, and let go of the holds whose time has come at `now`.
    pub(super) fn settle(&mut self, now: Instant) {
        while let Some((i, h)) = self.first_hold() {
            if h.awaiting_penalty || h.awaiting_scan {
                return;
            }
            let until = *h.until.get_or_insert(now + h.delay);
            if until > now {
                return;
            }
            self.slots.remove(i);
            self.holds -= 1;
        }
    }

    /// When the first hold ends, if it is armed.
    pub(super) fn deadline(&self) -> Option<Instant> {
        if self.holds == 0 {
            return None;
        }
        self.slots.iter().find_map(|s| match s {
            Slot::Hold(h) => Some(h.until),
            Slot::Out(_) => None,
        })?
    }

    /// The driver's answer to the first unanswered [`SessionEvent::LoginFailed`]: its hold
    /// lasts `penalty` longer (on top of a rule's delay).
    pub(super) fn answer_penalty(&mut self, penalty: Option<Duration>, now: Instant) {
        if let Some(h) = self.slots.iter_mut().find_map(|s| match s {
            Slot::Hold(h) if h.awaiting_penalty => Some(h),
            _ => None,
        }) {
            h.awaiting_penalty = false;
            h.delay += penalty.unwrap_or_default();
        }
        self.settle(now);
    }

    /// The session ends without waiting: the holds go, and with them what was to reach the
    /// server (commands, a TLS handshake); what was for the client stays, in order (what the
    /// audit trail saw go out does go out). `None` if nothing was held; else whether something
    /// for the server was dropped.
    pub(super) fn cut_holds(&mut self) -> Option<bool> {
        let (i, _) = self.first_hold()?;
        self.holds = 0;
        let held: Vec<Slot> = self.slots.drain(i..).collect();
        let mut dropped = false;
        for slot in held {
            match slot {
                Slot::Out(Output::ToUpstream(_) | Output::StartClientTls) => dropped = true,
                Slot::Out(out) => self.slots.push_back(Slot::Out(out)),
                Slot::Hold(_) => {}
            }
        }
        Some(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command the observer gets back is the one the hop parsed, part for part, whatever
    /// the spacing; and carrying it does not make the events larger than a status line does.
    #[test]
    fn a_command_line_gives_back_the_parsed_command_without_growing_the_events() {
        for line in [
            &b"NOOP\r\n"[..],
            b"USER alice\r\n",
            b"  \tRETR 1\n",
            b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
            b"APOP alice 0123456789abcdef\r\n",
            b"TOP 1 0\r\n",
            b"xyzzy \xc3\xa9t\xc3\xa9\r\n",
            b"LIST\t\t3 \r\n",
        ] {
            let line = Bytes::copy_from_slice(line);
            let parsed = Command::parse(&line).unwrap();
            let carried = CommandLine::new(line.clone(), &parsed);
            assert_eq!(carried.command(), parsed, "{line:?}");
            assert_eq!(carried.line(), &line);
        }
        assert!(std::mem::size_of::<CommandLine>() <= 56);
        assert!(std::mem::size_of::<SessionEvent>() <= 216);
        assert!(
            std::mem::size_of::<Output>() <= 40,
            "{}",
            std::mem::size_of::<Output>()
        );
    }
}
