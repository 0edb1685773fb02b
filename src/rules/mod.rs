//! The rule engine: admin policy from `rules/*.toml`, compiled once, asked at every hook.
//!
//! This module is pure: besides reading rule files in [`RuleSet::load`] it does no I/O. The
//! session builds an [`Event`] at each hook point (connect, greeting, command, response, CAPA
//! item, login, close), calls [`RuleSet::evaluate`] and carries out the returned [`Verdict`].
//! The rule file format and the evaluation order are documented in `rules/README.md`.
//!
//! Evaluation in one paragraph: the rules that can apply to an event (same event kind, and for
//! commands/responses a verb matcher that includes the event's verb or none at all) are visited
//! in load order. A rule whose matchers all hold is *matched*; `log`, `tag`, `delay`, `trace`,
//! `rewrite` and `scan` add to the verdict and evaluation goes on, `allow`, `deny` and `drop`
//! end it.
//! Matchers always see the original event; rewrites chain on each other's output.

mod compile;
mod error;
mod eval;
mod glob;
pub(crate) mod model;
mod size;
mod template;
#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::pop3::command::Verb;
use crate::pop3::response::Status;
use crate::pop3::tracker::State;

pub use compile::RuleSet;
pub use error::{Problem, RuleError, RuleRef};
pub use model::RuleAction;

/// The hook point an [`Event`] comes from; a rule's `on` key names one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A client connected; nothing has been sent yet (before the greeting).
    Connect,
    /// The upstream greeting, about to be relayed.
    Greeting,
    /// A client command line, before it is forwarded (SASL continuation lines included, with
    /// `args: None`).
    Command,
    /// An upstream status line (`+OK`, `-ERR`, `+ ` challenge), before it is relayed.
    Response,
    /// One item of a CAPA list (`text: Some`), or the end of the list (`text: None`) where
    /// items may be added.
    Capa,
    /// A login attempt completed (`status` says whether it succeeded).
    Login,
    /// The session ended.
    Close,
}

impl EventKind {
    /// Every kind, in declaration order.
    pub(crate) const ALL: [EventKind; 7] = [
        EventKind::Connect,
        EventKind::Greeting,
        EventKind::Command,
        EventKind::Response,
        EventKind::Capa,
        EventKind::Login,
        EventKind::Close,
    ];

    /// The lower-case name used in rule files and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Connect => "connect",
            EventKind::Greeting => "greeting",
            EventKind::Command => "command",
            EventKind::Response => "response",
            EventKind::Capa => "capa",
            EventKind::Login => "login",
            EventKind::Close => "close",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened, as the session sees it; borrowed, so building one costs nothing.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    /// The hook point.
    pub kind: EventKind,
    /// Name of the listener the client came in on.
    pub listener: &'a str,
    /// The client's address (an IPv4-mapped IPv6 address matches IPv4 networks).
    pub client: IpAddr,
    /// With `upstream.address = "original-destination"`: the address the client connected to
    /// before it was redirected to popgate (where the session connects).
    pub destination: Option<IpAddr>,
    /// Whether the client side runs TLS (implicit, or after STLS).
    pub tls: bool,
    /// The RFC 1939 state.
    pub state: State,
    /// The user name, once known (USER, APOP, AUTH PLAIN/LOGIN).
    pub user: Option<&'a str>,
    /// Command: its verb. Response: the verb it answers (`None` for the greeting). Login: the
    /// verb that completed it (`PASS`, `APOP` or `AUTH`).
    pub verb: Option<Verb>,
    /// Command: its arguments without the line ending; `None` for SASL continuation lines,
    /// which `args` matchers, `deny` and `rewrite` never act on.
    pub args: Option<&'a [u8]>,
    /// Greeting, response and login: `+OK`/`-ERR` (`+ ` challenges are `Continue`).
    pub status: Option<Status>,
    /// Greeting/response: the whole status line without CRLF. Capa: one item (e.g.
    /// `SASL PLAIN LOGIN`), or `None` at the end of the list.
    pub text: Option<&'a [u8]>,
    /// Response to RETR, TOP or LIST n: the message size in octets the `+OK` line states,
    /// when it states one (`size` matchers never hold without it).
    pub size: Option<u64>,
}

impl<'a> Event<'a> {
    /// An event of `kind` in AUTHORIZATION state without TLS, user, verb, args, status or text;
    /// set the other fields with struct update syntax.
    pub fn new(kind: EventKind, listener: &'a str, client: IpAddr) -> Event<'a> {
        Event {
            kind,
            listener,
            client,
            destination: None,
            tls: false,
            state: State::Authorization,
            user: None,
            verb: None,
            args: None,
            status: None,
            text: None,
            size: None,
        }
    }
}

/// How evaluation ended.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum RuleOutcome {
    /// No terminal rule matched: go on as usual.
    #[default]
    Continue,
    /// An `allow` rule matched: go on as usual, later rules were not consulted.
    Allow {
        /// The `allow` rule.
        rule: Arc<str>,
    },
    /// Answer locally instead of forwarding. Command: the command never reaches the upstream;
    /// `reply` takes its place in the response stream. Connect: `reply` is sent instead of a
    /// greeting and the session closes (no upstream connection is needed).
    Deny {
        /// The full `-ERR [CODE] text` line, without CRLF.
        reply: String,
        /// The `deny` rule.
        rule: Arc<str>,
        /// Close the session after the reply once this rule has denied this many commands in
        /// the session (the session counts; `Some(1)` closes at the first denial).
        close_after: Option<u32>,
    },
    /// Close both sides now: the upstream without QUIT, the client without a reply.
    Drop {
        /// The `drop` rule.
        rule: Arc<str>,
    },
}

/// What the session must do about an [`Event`]: the sum of every matched rule.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Names of the rules whose matchers held, in evaluation order (the terminal one last).
    pub matched: Vec<Arc<str>>,
    /// Terminal decision, if any.
    pub outcome: RuleOutcome,
    /// The rewritten value, only when it differs from the original and the outcome forwards:
    /// Command: the new *arguments* (rebuild with `command_line`); Greeting/Response: the
    /// new status line without CRLF (same status indicator guaranteed); Capa: the new item.
    pub rewritten: Option<Vec<u8>>,
    /// Capa item events: leave this item out of the list.
    pub remove: bool,
    /// Capa end-of-list event (`text: None`): items to append, in order, without duplicates.
    pub add_capa: Vec<String>,
    /// Rendered `log` messages (and ignored rewrites), in order.
    pub logs: Vec<RuleLog>,
    /// Labels for this event's audit record (`scope = "event"`, the default), in order,
    /// without duplicates.
    pub tags: Vec<Arc<str>>,
    /// Labels for this event's record and every later one of the session (`scope =
    /// "session"`), in order, without duplicates.
    pub session_tags: Vec<Arc<str>>,
    /// Tarpit: wait this long (the sum of all matched `delay` rules) before acting.
    pub delay: Option<Duration>,
    /// A `trace` rule matched: start a traffic transcript for this session.
    pub trace: bool,
    /// Command: the scanners of every matched `scan` rule, in rule order, without
    /// duplicates (the body a RETR/TOP retrieves is held for them).
    pub scan: Vec<Arc<str>>,
}

/// A line a rule asks to log: the `log` action's message, or a warning about the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleLog {
    /// Level of the line.
    pub level: tracing::Level,
    /// The rule's name (a `rule` field on the line).
    pub rule: Arc<str>,
    /// The rendered message.
    pub message: String,
}

impl Verdict {
    /// Whether the event proceeds as usual (possibly rewritten): no `deny` and no `drop`.
    pub fn passes(&self) -> bool {
        matches!(
            self.outcome,
            RuleOutcome::Continue | RuleOutcome::Allow { .. }
        )
    }
}

/// A command line (`keyword`, a space and `args` unless they are empty, CRLF) as forwarded
/// after a rewrite of its arguments; `keyword` is best passed exactly as the client sent it.
pub(crate) fn command_line(keyword: &[u8], args: &[u8]) -> Vec<u8> {
    let mut line = Vec::with_capacity(keyword.len() + args.len() + 3);
    line.extend_from_slice(keyword);
    if !args.is_empty() {
        line.push(b' ');
        line.extend_from_slice(args);
    }
    line.extend_from_slice(b"\r\n");
    line
}
