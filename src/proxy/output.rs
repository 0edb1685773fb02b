//! What a [`Hop`](super::Hop) hands its driver: [`Output`]s to carry out in order, some of them
//! held behind a deadline (a rule's tarpit, the failed-login penalty), and [`SessionEvent`]s
//! for the audit trail, transcripts and metrics.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::front::Login;
use crate::pop3::command::{Command, Verb};
use crate::pop3::tracker::{ResponseMeta, State};
use crate::types::CloseReason;

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
    /// login, connect to the chosen upstream and replay it there, then tell the session
    /// how it went.
    Login(Box<Login>),
    /// Direct mode with `forward_client = "proxy-v2"`, after the client's STLS, before the
    /// first command goes upstream (from [`Session`](super::Session), never from the hop):
    /// dial the server again with the client's TLS in the PROXY header and take its greeting
    /// silently; go on over the new connection, or over the old one if that fails.
    RedialUpstream,
    /// The session is over, for this reason: close the client (with a TCP reset when
    /// [`Hop::mid_response`](super::Hop::mid_response): a cut multi-line response must not
    /// look complete) and the upstream, without QUIT.
    Close(CloseReason),
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

/// What happened in a session, for the audit trail, transcripts and metrics, in the order it
/// happened. Bytes are shared with what was relayed (no copy of bodies). The driver polls them
/// with [`Hop::poll_event`](super::Hop::poll_event) after every call that feeds the hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SessionEvent {
    /// A command the client sent (the line as sent; [`SessionEvent::command`] parses it; the
    /// transcript redacts it).
    ClientCommand(Bytes),
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
        user: Option<Arc<str>>,
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
        user: Option<Arc<str>>,
    },
    /// A command a rule denied, with the command's event tags.
    Denied {
        /// The rule.
        rule: Arc<str>,
        /// The command's verb.
        verb: Verb,
        /// The user rules and audit see.
        user: Option<Arc<str>>,
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
    Injected(Bytes),
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
}

impl SessionEvent {
    /// The command of a [`SessionEvent::ClientCommand`] or [`SessionEvent::Injected`], parsed
    /// again from its line (the hop parsed it the same way).
    pub(crate) fn command(line: &[u8]) -> Option<Command<'_>> {
        Command::parse(line).ok()
    }
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
        }));
        self.holds += 1;
        self.settle(now);
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
            if h.awaiting_penalty {
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
