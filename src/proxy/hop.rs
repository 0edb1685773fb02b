//! [`Hop`]: one session's protocol core. The driver reads into two buffers it owns, hands them
//! in with the event that filled them, and carries out the [`Output`]s that come out, in order.
//!
//! Forwarding keeps the original bytes: server data leaves as slices split off the server
//! buffer (no copy), client commands as the lines the client sent, unless a rule rewrote them.
//! Local replies (refusals, rule denials, STLS answers) sit in the tracker's FIFO and go out in
//! their place. The upstream never receives a QUIT the client did not send: every other way out
//! is an [`Output::Close`], and the driver closes the upstream socket without a word.
//!
//! Time is an input: a rule's tarpit or the failed-login penalty holds the outputs after it
//! until a deadline the hop reports ([`Hop::poll_timeout`]); meanwhile the client is still read
//! (as far as the pipeline allows), the session's own deadlines still run, and a shutdown
//! still ends the session at once.

use std::collections::{HashSet, VecDeque};
use std::net::IpAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tracing::{debug, info, warn};

use crate::config::UnknownCommands;
use crate::pop3::capa;
use crate::pop3::command::{Command, Verb, line_end, trim_eol};
use crate::pop3::replies;
use crate::pop3::tracker::{
    AfterReply, ClientLine, Piece, ProtocolError, ResponseMeta, State, Tracker,
    sasl_mechanism_supported,
};
use crate::rules::{Event, EventKind, command_line};
use crate::types::{CloseReason, MessageIds, ScanReport, UserName};

use super::output::{CommandLine, Marks, Output, Outputs, SessionEvent};
use super::policy::{Policy, Terminal};
use super::scan::{self as scanning, ScanPolicy, Scanning};

/// An overlong line is discarded up to its end; past this many lengths of junk, close.
const MAX_DISCARD_FACTOR: usize = 16;
/// A CAPA body is buffered for rewriting; a longer one is a protocol error.
const MAX_CAPA: usize = 64 * 1024;
/// Messages popgate asks about in one session, at most (each costs the session a few octets
/// of memory and the server a round trip): past this, commands go unidentified.
const MAX_LOOKUPS: usize = 100_000;

fn add_tags(to: &mut Vec<Arc<str>>, from: &[Arc<str>]) {
    for t in from {
        if !to.contains(t) {
            to.push(t.clone());
        }
    }
}

/// Whether a failed login's `-ERR` carries a response code (RFC 2449, RFC 3206) saying the
/// credentials were not the problem: `IN-USE`, `LOGIN-DELAY`, `SYS/TEMP`, `SYS/PERM`.
fn not_a_credential_failure(line: &[u8]) -> bool {
    crate::pop3::response::StatusLine::parse(line)
        .ok()
        .and_then(|s| s.code)
        .is_some_and(|c| {
            [&b"IN-USE"[..], b"LOGIN-DELAY", b"SYS/TEMP", b"SYS/PERM"]
                .iter()
                .any(|k| c.eq_ignore_ascii_case(k))
        })
}

/// The settings a hop works with.
#[derive(Debug, Clone)]
pub(crate) struct HopConfig {
    /// Listener name, for rules.
    pub(crate) listener: Arc<str>,
    /// Client address, for rules and the login penalty.
    pub(crate) client_ip: IpAddr,
    /// The original destination (transparent interception), for rules.
    pub(crate) destination: Option<IpAddr>,
    /// Whether the client connection is under TLS from the start (implicit TLS).
    pub(crate) client_tls: bool,
    /// Whether this listener can offer STLS (a `starttls` listener with a certificate).
    pub(crate) stls_available: bool,
    /// Whether the server folds user names to lower case (`upstream.user_names = "fold"`):
    /// rules and audit then see the folded name, the one the server logs in.
    pub(crate) fold_user_names: bool,
    /// `limits.max_line`.
    pub(crate) max_line: usize,
    /// `limits.max_pipeline`.
    pub(crate) max_pipeline: usize,
    /// `limits.unknown_commands`.
    pub(crate) unknown_commands: UnknownCommands,
    /// `limits.idle_timeout`.
    pub(crate) idle_timeout: Duration,
    /// `limits.login_timeout`, counted from `started`.
    pub(crate) login_timeout: Duration,
    /// `limits.greeting_timeout`, counted from the hop's creation (the upstream is connected).
    pub(crate) greeting_timeout: Duration,
    /// With the audit trail on: `audit.message_ids`. popgate then asks the server for the
    /// UIDL (and with `always` the Message-ID) of a message the client retrieves or deletes
    /// before the session has seen it. `None`: nothing is ever injected.
    pub(crate) lookups: Option<MessageIds>,
    /// Content scanning (`[[scanner]]`, `[scan]`): `None` when no scanner is configured,
    /// then `scan` rules have no effect.
    pub(crate) scan: Option<Arc<ScanPolicy>>,
}

/// What the hop knows about the messages' unique ids, to ask the server only what it must.
#[derive(Debug, Default)]
struct Known {
    /// A whole `UIDL` listing was asked for (by the client): every id is known.
    all: bool,
    /// Messages whose id was asked for (by the client or by popgate).
    uidl: HashSet<u32>,
    /// Messages whose headers were retrieved or asked for (for `message_ids = "always"`).
    headers: HashSet<u32>,
    /// The server refused popgate's `UIDL n`: if it accepts the client's command on `n`, the
    /// message exists, so the server has no UIDL.
    refused: Option<u32>,
    /// The server has no UIDL: never asked again.
    no_uidl: bool,
    /// The server refused popgate's `TOP n 0` (TOP is optional in RFC 1939): not asked again.
    no_top: bool,
}

/// Where the client side of a session stands: what is read and handled. One value, so that
/// no two of these can hold at once (a session cannot be both closed and waiting for a TLS
/// handshake).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Client lines are handled as they come. `discarding`: the octets of an overlong line
    /// thrown away so far (the rest of it is thrown away too).
    Reading { discarding: Option<usize> },
    /// A buffered line (STLS, or a PASS after USERs) waits, unparsed, until every earlier
    /// command is answered (what it means depends on those answers).
    Barrier,
    /// STLS was accepted: nothing more is read from the client until the handshake.
    StartingTls,
    /// A reply that ends the session is queued (a `deny` rule reached `close_after`):
    /// nothing the client sent after that command is read or forwarded, not even a QUIT.
    Closing,
    /// The client closed its sending side: the responses it is owed still go out.
    ClientEof,
    /// The session is over: an [`Output::Close`] with this reason is queued.
    Closed(CloseReason),
}

/// One session's protocol core, without I/O: bytes, timer expiries and a few facts go in;
/// [`Output`]s, [`SessionEvent`]s and a deadline come out.
///
/// # Calling contract
///
/// 1. [`Hop::new`] once the upstream is connected (or the routing front stands in for it).
/// 2. Feed what happens, each call with the current time where it takes one:
///    [`Hop::on_server_input`] after appending to the server buffer (also with the greeting
///    read during the set-up), [`Hop::on_client_input`] after appending to the client buffer,
///    [`Hop::on_client_eof`], [`Hop::on_upstream_eof`], [`Hop::on_upstream_error`],
///    [`Hop::on_shutdown_dropping`], [`Hop::on_timeout`], and [`Hop::client_tls_started`] after the
///    handshake an [`Output::StartClientTls`] asked for.
/// 3. After every such call: drain [`Hop::poll_event`] and dispatch the events (audit,
///    transcript, metrics). A [`SessionEvent::LoginFailed`] must be answered with
///    [`Hop::penalty`] (the failed login's `-ERR` is held until then; the answer may come
///    later, e.g. from an async store, as long as it comes).
/// 4. Then drain [`Hop::poll_output`] and carry the outputs out in order: write
///    [`Output::ToClient`] / [`Output::ToUpstream`] (flushed), run the handshake for
///    [`Output::StartClientTls`], and stop at [`Output::Close`]. `None` while outputs are held
///    behind a deadline: they come out after the [`Hop::on_timeout`] that passes it.
/// 5. Wait for the next input: read the client only while [`Hop::wants_client_input`], the
///    upstream only while [`Hop::wants_server_input`], and call [`Hop::on_timeout`] when the
///    instant [`Hop::poll_timeout`] returns has come (asking again after every call: any call
///    may move it). A shutdown is always watched.
/// 6. At the end: [`Hop::finish`], then [`Hop::close_marks`], [`Hop::user`], [`Hop::tags`]
///    for the close record.
#[derive(Debug)]
pub(crate) struct Hop {
    cfg: HopConfig,
    tracker: Tracker,
    policy: Policy,
    client_tls: bool,
    phase: Phase,
    /// Commands to send upstream in one write.
    up_out: Vec<u8>,
    /// A CAPA response being collected for rewriting (server side: the client may go on).
    capa: Option<Vec<u8>>,
    outputs: Outputs,
    events: VecDeque<SessionEvent>,
    /// Events whose bytes are server bytes not yet split off: (index in `events`, range in
    /// the server buffer). Filled in when the bytes are split off to be relayed.
    pending_bytes: Vec<(usize, Range<usize>)>,
    /// The time of the call being handled.
    now: Instant,
    idle_deadline: Instant,
    login_deadline: Instant,
    greeting_deadline: Instant,
    /// How many session tags the last [`SessionEvent::Tags`] carried.
    tags_reported: usize,
    /// Event tags of the commands sent upstream whose final response is still due, in order.
    cmd_tags: VecDeque<Vec<Arc<str>>>,
    /// For the `session_close` record: event tags of what closed the session and of the
    /// `close` rules, and the rule that dropped it. Boxed when there are any: most sessions
    /// have none, and the hop lives as long as the session.
    close_marks: Option<Box<Marks>>,
    /// For the audit lookups (see [`HopConfig::lookups`]).
    known: Known,
    /// Capabilities the server has shown by answering `+OK` (TOP, UIDL), for the list popgate
    /// gives in place of a server that has no CAPA.
    learned: Learned,
    /// The retrieval a `scan` rule selected, from its command to its verdict. One at a time:
    /// while it is outstanding no later client command is read.
    scan: Option<Box<Scanning>>,
    /// The scanners the rules chose for the command being decided.
    selected: Option<Arc<[Arc<str>]>>,
    /// What scanning remembers across retrievals; allocated on first use (most sessions
    /// never need it).
    memo: Option<Box<ScanMemo>>,
    /// A body held for scanning was given up as the session ends: the client saw nothing of
    /// it, so it is no cut response.
    unseen_body_dropped: bool,
}

/// What scanning remembers across the retrievals of a session.
#[derive(Debug, Default)]
struct ScanMemo {
    /// Messages whose retrieval was tempfailed in this session: a DELE of one is answered
    /// locally (the client has not seen it).
    tempfailed: HashSet<u32>,
    /// The last few unique ids seen in `UIDL n` answers (the client's or popgate's own), for
    /// a notice.
    uidls: VecDeque<(u32, Box<str>)>,
}

/// What a server without CAPA has shown it can do.
#[derive(Debug, Clone, Copy, Default)]
struct Learned {
    top: bool,
    uidl: bool,
}

impl Hop {
    /// A hop for a session that connected at `started`, whose upstream is connected now
    /// (`now`) and whose greeting is due.
    pub(crate) fn new(cfg: HopConfig, policy: Policy, started: Instant, now: Instant) -> Hop {
        let mut tracker = Tracker::new(cfg.max_line);
        tracker.set_fold_names(cfg.fold_user_names);
        Hop {
            tracker,
            policy,
            client_tls: cfg.client_tls,
            phase: Phase::Reading { discarding: None },
            up_out: Vec::new(),
            capa: None,
            outputs: Outputs::default(),
            events: VecDeque::new(),
            pending_bytes: Vec::new(),
            now,
            idle_deadline: now + cfg.idle_timeout,
            login_deadline: started + cfg.login_timeout,
            greeting_deadline: now + cfg.greeting_timeout,
            tags_reported: 0,
            cmd_tags: VecDeque::new(),
            close_marks: None,
            known: Known::default(),
            learned: Learned::default(),
            scan: None,
            selected: None,
            memo: None,
            unseen_body_dropped: false,
            cfg,
        }
    }

    /// The next output to carry out; `None` when there is none or the next ones are held
    /// (until [`Hop::poll_timeout`]).
    pub(crate) fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop()
    }

    /// The next event to dispatch (audit, transcript, metrics), in the order they happened.
    pub(crate) fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// When [`Hop::on_timeout`] is due: the end of a hold, or a session deadline (greeting,
    /// login, idle). `None` when nothing is timed (the session is closed and nothing held).
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let hold = self.outputs.deadline();
        if self.closed() {
            return hold;
        }
        if self.scan.as_ref().is_some_and(|s| s.waiting) {
            // The client waits for popgate, not the other way round; the scanners' own
            // timeouts bound the wait.
            return hold;
        }
        let mut at = self.idle_deadline;
        if self.tracker.state() == State::Authorization {
            at = at.min(self.login_deadline);
        }
        if self.tracker.greeting_due() {
            at = at.min(self.greeting_deadline);
        }
        Some(hold.map_or(at, |h| h.min(at)))
    }

    /// The driver's answer to a [`SessionEvent::LoginFailed`]: how long the failed login's
    /// `-ERR` is held (the per-IP penalty), if at all, counted from `now`.
    pub(crate) fn penalty(&mut self, now: Instant, penalty: Option<Duration>) {
        self.now = now;
        self.outputs.answer_penalty(penalty, now);
    }

    /// Let go of the memory of empty queues, when nothing is outstanding: a session that
    /// waits for its client holds only what it must remember.
    pub(crate) fn trim(&mut self) {
        if !self.tracker.idle() || !self.outputs.is_empty() || !self.events.is_empty() {
            return;
        }
        self.tracker.trim();
        self.outputs.trim();
        if self.events.capacity() > 0 {
            self.events = VecDeque::new();
        }
        if self.pending_bytes.capacity() > 0 {
            self.pending_bytes = Vec::new();
        }
        if self.cmd_tags.is_empty() && self.cmd_tags.capacity() > 0 {
            self.cmd_tags = VecDeque::new();
        }
        if self.up_out.is_empty() && self.up_out.capacity() > 0 {
            self.up_out = Vec::new();
        }
    }

    fn closed(&self) -> bool {
        matches!(self.phase, Phase::Closed(_))
    }

    /// Whether the driver may read from the client now. The one place this is decided.
    /// While outputs are held the client is still read: what it sends is handled and queued
    /// behind the hold, within the pipeline limit.
    pub(crate) fn wants_client_input(&self) -> bool {
        matches!(self.phase, Phase::Reading { .. })
            && self.scan.is_none()
            && !self.tracker.quit_sent()
            && !self.tracker.client_must_wait()
            && !self.tracker.internal_pending()
            && self.tracker.pending_len() < self.cfg.max_pipeline
    }

    /// Whether outputs wait behind a hold (a tarpit, the login penalty).
    #[cfg(test)]
    pub(crate) fn holding(&self) -> bool {
        self.outputs.holding()
    }

    /// Whether the driver may read from the upstream now: not while outputs are held (what
    /// the server sends waits in the socket, as a body would otherwise pile up in memory).
    pub(crate) fn wants_server_input(&self) -> bool {
        !self.closed() && !self.outputs.holding()
    }

    /// Routing mode: the `route` rule (name, upstream) for a login as `user`, if one holds.
    /// Route rules see a `command` event with verb USER and both `args` and `user` set to
    /// the routed name, whatever the login method (the name is only complete at the end).
    pub(crate) fn route(&self, user: &str) -> Option<(Arc<str>, Arc<str>)> {
        self.policy.route(&Event {
            verb: Some(Verb::User),
            args: Some(user.as_bytes()),
            user: Some(user),
            ..event(
                &self.cfg,
                &self.tracker,
                self.client_tls,
                EventKind::Command,
            )
        })
    }

    /// Routing mode: the login went to a server that folds user names (or not); rules and
    /// audit see the name as that server does.
    pub(crate) fn set_fold_user_names(&mut self, fold: bool) {
        self.cfg.fold_user_names = fold;
        self.tracker.set_fold_names(fold);
    }

    /// The session's RFC 1939 state (`popgate sessions`).
    pub(crate) fn state(&self) -> State {
        self.tracker.state()
    }

    /// The user rules and audit see (see [`Tracker::user`]).
    pub(crate) fn user(&self) -> Option<&str> {
        self.tracker.user()
    }

    /// Session-scoped rule tags attached so far.
    pub(crate) fn tags(&self) -> &[Arc<str>] {
        &self.policy.tags
    }

    /// Rule activity since the last call, for metrics.
    pub(crate) fn take_rule_tally(&mut self) -> super::policy::RuleTally {
        self.policy.take_tally()
    }

    /// Whether a `trace` rule asked for a transcript.
    pub(crate) fn trace(&self) -> bool {
        self.policy.trace
    }

    /// Whether a multi-line response is cut if the session ends now (a body held for
    /// scanning is not: the client has not seen its status line).
    pub(crate) fn mid_response(&self) -> bool {
        (self.tracker.in_body() && !self.holding_status() && !self.unseen_body_dropped)
            || self.capa.is_some()
    }

    /// Whether the status line of a retrieval is held for scanning (the client has seen
    /// nothing of the response).
    fn holding_status(&self) -> bool {
        self.scan.as_ref().is_some_and(|s| s.status.is_some())
    }

    /// The `close` rule event, at the end of the session.
    pub(crate) fn finish(&mut self) {
        let ev = event(&self.cfg, &self.tracker, self.client_tls, EventKind::Close);
        let v = self.policy.evaluate(&ev);
        if !v.tags.is_empty() {
            add_tags(&mut self.close_marks_mut().tags, &v.tags);
        }
    }

    /// What rules said about the `session_close` record (after [`Hop::finish`]).
    pub(crate) fn close_marks(&self) -> &Marks {
        static NONE: Marks = Marks {
            tags: Vec::new(),
            dropped_by: None,
        };
        self.close_marks.as_deref().unwrap_or(&NONE)
    }

    fn close_marks_mut(&mut self) -> &mut Marks {
        self.close_marks.get_or_insert_default()
    }

    /// A rule ends the session: its name and the event's tags go on `session_close`.
    fn dropped_by(&mut self, rule: Arc<str>, tags: &[Arc<str>]) {
        let marks = self.close_marks_mut();
        add_tags(&mut marks.tags, tags);
        marks.dropped_by.get_or_insert(rule);
    }

    fn close(&mut self, reason: CloseReason) {
        if self.closed() {
            return;
        }
        self.flush_upstream();
        self.phase = Phase::Closed(reason);
        self.outputs.push(Output::Close(reason));
    }

    /// The session ends now, whatever is held: held replies go out at once, held commands
    /// never reach the server. Whether a command was dropped (its answer is owed).
    fn cut_hold(&mut self) -> bool {
        self.outputs.cut_holds().unwrap_or(false)
    }

    /// Whether the client is owed a last answer when the session ends now without a response
    /// cut: nothing outstanding, or a command was held and never sent (`dropped`).
    fn owed_a_last_word(&self, dropped: bool) -> bool {
        self.holding_status() || (!self.tracker.in_body() && (dropped || self.tracker.idle()))
    }

    /// Hold what is queued after this point for `delay` (and, with `penalty`, until the
    /// driver's [`Hop::penalty`]).
    fn hold(&mut self, delay: Duration, penalty: bool) {
        self.flush_upstream();
        self.outputs.hold(delay, penalty, self.now);
    }

    fn send_client(&mut self, bytes: impl Into<Bytes>) {
        self.outputs.push(Output::ToClient(bytes.into()));
    }

    fn flush_upstream(&mut self) {
        if !self.up_out.is_empty() {
            let out = std::mem::take(&mut self.up_out);
            self.outputs.push(Output::ToUpstream(out.into()));
        }
    }

    fn event(&mut self, ev: SessionEvent) {
        self.events.push_back(ev);
    }

    /// An event whose bytes are `sin[range]`, not yet split off: they are filled in when they
    /// are (see [`Hop::flush_server`]).
    fn event_on_server_bytes(&mut self, ev: SessionEvent, range: Range<usize>) {
        self.pending_bytes.push((self.events.len(), range));
        self.events.push_back(ev);
    }

    /// Give the events waiting for `chunk`'s bytes (split off the front of the server buffer,
    /// where their ranges count from) their slice of it. Every split of the server buffer is
    /// preceded by one of these, so the ranges always fall within the chunk.
    fn fill_pending(&mut self, chunk: &Bytes) {
        for (i, range) in self.pending_bytes.drain(..) {
            let bytes = if range.end <= chunk.len() {
                chunk.slice(range)
            } else {
                debug_assert!(
                    false,
                    "pending bytes {range:?} past the chunk split off ({})",
                    chunk.len()
                );
                Bytes::new()
            };
            match self.events.get_mut(i) {
                Some(
                    SessionEvent::Status { line: b, .. } | SessionEvent::Body { chunk: b, .. },
                ) => *b = bytes,
                _ => debug_assert!(false, "pending bytes for an event without bytes"),
            }
        }
    }

    /// The session tags, if they changed since the last report.
    fn report_tags(&mut self) {
        if self.policy.tags.len() != self.tags_reported {
            self.tags_reported = self.policy.tags.len();
            self.event(SessionEvent::Tags(self.policy.tags.clone()));
        }
    }

    /// The user rules and audit see, shared with the tracker (never copied).
    fn user_shared(&self) -> Option<UserName> {
        self.tracker.user_name().cloned()
    }

    /// Relay `sin[..fwd]` to the client (split off the buffer, no copy).
    fn flush_server(&mut self, sin: &mut BytesMut, fwd: &mut usize) {
        if *fwd > 0 {
            let chunk = sin.split_to(*fwd).freeze();
            if !self.pending_bytes.is_empty() {
                self.fill_pending(&chunk);
            }
            self.send_client(chunk);
            *fwd = 0;
        }
    }

    /// Bytes arrived from the server (appended to `sin`); `cin` holds client bytes not yet
    /// handled (a response may unblock them).
    pub(crate) fn on_server_input(&mut self, now: Instant, sin: &mut BytesMut, cin: &mut BytesMut) {
        if self.closed() {
            return;
        }
        self.now = now;
        self.idle_deadline = now + self.cfg.idle_timeout;
        self.server_data(sin);
        if !self.pending_bytes.is_empty() {
            // Not reached: every path out of `server_data` splits off what it relayed.
            let copy = Bytes::copy_from_slice(sin);
            self.fill_pending(&copy);
        }
        if self.closed() {
            return;
        }
        self.client_data(cin);
        if !self.closed() && self.phase == Phase::ClientEof && self.tracker.idle() {
            self.close(CloseReason::ClientEof);
        }
    }

    /// Bytes arrived from the client (appended to `cin`).
    pub(crate) fn on_client_input(&mut self, now: Instant, cin: &mut BytesMut) {
        if self.closed() {
            return;
        }
        self.now = now;
        self.idle_deadline = now + self.cfg.idle_timeout;
        self.client_data(cin);
    }

    /// The client closed its sending side.
    pub(crate) fn on_client_eof(&mut self) {
        if self.closed() {
            return;
        }
        if matches!(self.phase, Phase::Reading { .. } | Phase::Barrier) {
            self.phase = Phase::ClientEof;
        }
        debug!("client closed its side");
        // Responses it is owed still go out (half-close).
        if self.tracker.idle() && !self.tracker.quit_sent() {
            self.close(CloseReason::ClientEof);
        }
    }

    /// The upstream closed its connection.
    pub(crate) fn on_upstream_eof(&mut self) {
        if self.mid_response() {
            warn!("upstream closed in the middle of a multi-line response");
            self.close(CloseReason::UpstreamEof);
            return;
        }
        if self.tracker.quit_sent() {
            self.close(CloseReason::Quit);
            return;
        }
        self.answer_upstream_lost();
        info!("upstream closed the connection");
        self.close(CloseReason::UpstreamEof);
    }

    /// Reading from the upstream failed (reset, TLS alert); `disconnect` for an ordinary one.
    pub(crate) fn on_upstream_error(&mut self, disconnect: bool) {
        self.answer_upstream_lost();
        self.close(if disconnect {
            CloseReason::UpstreamEof
        } else {
            CloseReason::Error
        });
    }

    /// The driver could not spool the body held for scanning (the disk is full, `spool_dir`
    /// is unusable): the message cannot be delivered from it. The client, which saw nothing
    /// of the retrieval, gets `-ERR [SYS/TEMP]` (never a cut message) and the session ends,
    /// as the rest of the body is still on its way; nothing reaches the server after it.
    pub(crate) fn on_spool_error(&mut self) {
        let owed = self.drop_scan();
        if self.closed() {
            return;
        }
        if owed {
            self.send_client(replies::line(replies::SCAN_TEMPFAIL));
        }
        self.close(CloseReason::Error);
    }

    /// [`Hop::on_shutdown_dropping`] with nothing held back outside the hop.
    #[cfg(test)]
    pub(crate) fn on_shutdown(&mut self) {
        self.on_shutdown_dropping(false);
    }

    /// popgate is shutting down (or the session was kicked): the session ends now, even
    /// during a hold (held replies go out at once; nothing held reaches the server).
    /// `dropped`: the session held back a command the hop had let go of (it never reached
    /// the server, so its answer is owed, as for one a hold kept back).
    pub(crate) fn on_shutdown_dropping(&mut self, dropped: bool) {
        let cut = self.cut_hold() || dropped;
        if self.closed() {
            self.drop_scan();
            return;
        }
        let owed = self.owed_a_last_word(cut);
        self.drop_scan();
        if owed {
            self.send_client(replies::line(replies::SHUTTING_DOWN));
        }
        self.close(CloseReason::Shutdown);
    }

    /// The instant [`Hop::poll_timeout`] reported has come (the driver may call early;
    /// nothing is due then): a hold that ends lets its outputs go; a session deadline that
    /// passed ends the session, during a hold too (as a shutdown does).
    pub(crate) fn on_timeout(&mut self, now: Instant) {
        self.now = now;
        self.outputs.settle(now);
        if self.closed() {
            return;
        }
        let (reply, reason) = if self.tracker.greeting_due() && now >= self.greeting_deadline {
            warn!(timeout = ?self.cfg.greeting_timeout, "upstream sent no greeting");
            self.cut_hold();
            self.send_client(replies::line(replies::UPSTREAM_NO_ANSWER));
            self.close(CloseReason::GreetingTimeout);
            return;
        } else if self.tracker.state() == State::Authorization && now >= self.login_deadline {
            info!(timeout = ?self.cfg.login_timeout, "no login in time");
            (replies::NO_LOGIN_IN_TIME, CloseReason::LoginTimeout)
        } else if now >= self.idle_deadline {
            info!(timeout = ?self.cfg.idle_timeout, "idle timeout");
            (replies::IDLE_TOO_LONG, CloseReason::IdleTimeout)
        } else {
            return;
        };
        let cut = self.cut_hold();
        let owed = self.owed_a_last_word(cut);
        self.drop_scan();
        if owed {
            self.send_client(replies::line(reply));
        }
        self.close(reason);
    }

    /// The client TLS handshake that [`Output::StartClientTls`] asked for completed.
    /// `cin` holds whatever plaintext the client sent after STLS: it is thrown away.
    pub(crate) fn client_tls_started(&mut self, cin: &mut BytesMut) {
        if !cin.is_empty() {
            // CVE-2011-0411 class: bytes sent before the handshake must not count as
            // commands sent under TLS.
            warn!(
                octets = cin.len(),
                "STARTTLS injection attempt: plaintext after STLS discarded"
            );
            cin.clear();
        }
        self.client_tls = true;
        if self.phase == Phase::StartingTls {
            self.phase = Phase::Reading { discarding: None };
        }
    }

    /// The upstream is gone: answer `-ERR [SYS/TEMP]` if a response is due and none has
    /// started (a partly relayed body is left incomplete on purpose).
    fn answer_upstream_lost(&mut self) {
        let owed = !self.mid_response() && !self.tracker.idle();
        // A retrieval held for scanning: the client has seen nothing of it.
        if self.drop_scan() || owed {
            self.send_client(replies::line(replies::UPSTREAM_CLOSED));
        }
    }

    /// Queue the local replies that are due.
    fn write_due_locals(&mut self) {
        while !self.closed()
            && let Some(local) = self.tracker.next_local()
        {
            debug!(verb = %local.verb, reply = %crate::pop3::printable(&local.reply).trim_end(), "answered locally");
            let reply = Bytes::from(local.reply);
            self.event(SessionEvent::LocalReply(reply.clone()));
            self.send_client(reply);
            match local.then {
                AfterReply::Continue => {}
                AfterReply::Close => self.close(CloseReason::RuleDrop),
                AfterReply::StartTls => {
                    self.flush_upstream();
                    self.outputs.push(Output::StartClientTls);
                }
            }
        }
    }

    /// Handle every complete piece of server data in `sin`.
    fn server_data(&mut self, sin: &mut BytesMut) {
        let mut fwd = 0;
        loop {
            // Known before the call: a body's last piece ends it.
            let internal_body = self.tracker.in_internal_body();
            let piece = match self.tracker.on_server_bytes(&sin[fwd..]) {
                Ok(p) => p,
                Err(e) => {
                    warn!(error = %e, "upstream broke the protocol");
                    let in_body = self.tracker.in_body();
                    self.flush_server(sin, &mut fwd);
                    // A body held for scanning is not cut: the client gets an answer.
                    if self.drop_scan() || !in_body {
                        self.send_client(replies::line(replies::UPSTREAM_PROTOCOL_ERROR));
                    }
                    self.close(CloseReason::Error);
                    return;
                }
            };
            match piece {
                Piece::NeedMore => break,
                Piece::Status { len, meta } if meta.internal => {
                    self.injected_status(sin, &mut fwd, len, meta);
                }
                Piece::Status { len, meta } => {
                    self.status(sin, &mut fwd, len, meta);
                    if self.closed() {
                        return;
                    }
                }
                Piece::Body { len } | Piece::BodyEnd { len } if internal_body => {
                    self.flush_server(sin, &mut fwd);
                    let chunk = sin.split_to(len).freeze();
                    let end = matches!(piece, Piece::BodyEnd { .. });
                    self.event(SessionEvent::InjectedBody { chunk, end });
                }
                Piece::Body { len } | Piece::BodyEnd { len } if self.capa.is_some() => {
                    self.flush_server(sin, &mut fwd);
                    let chunk = sin.split_to(len);
                    let done = matches!(piece, Piece::BodyEnd { .. });
                    let Some(buf) = self.capa.as_mut() else { break };
                    buf.extend_from_slice(&chunk);
                    if buf.len() > MAX_CAPA {
                        warn!(error = %ProtocolError::LineTooLong(MAX_CAPA), "CAPA response too long");
                        self.close(CloseReason::Error);
                        return;
                    }
                    if done && let Some(buf) = self.capa.take() {
                        let out = Bytes::from(self.rewrite_capa(&buf));
                        // The transcript shows the list as the client got it.
                        let status_len = line_end(&out).unwrap_or(0);
                        self.event(SessionEvent::Body {
                            chunk: out.slice(status_len..),
                            end: true,
                            user: None,
                        });
                        self.send_client(out);
                    }
                }
                Piece::Body { len } | Piece::BodyEnd { len } if self.holding_status() => {
                    self.flush_server(sin, &mut fwd);
                    let chunk = sin.split_to(len).freeze();
                    let end = matches!(piece, Piece::BodyEnd { .. });
                    let user = if end { self.user_shared() } else { None };
                    self.event(SessionEvent::Body {
                        chunk: chunk.clone(),
                        end,
                        user,
                    });
                    let data = if end {
                        // The terminator line, `.` CRLF, is the hop's to write.
                        chunk.slice(..chunk.len().saturating_sub(3))
                    } else {
                        chunk
                    };
                    self.spool(data, end);
                }
                Piece::Body { len } | Piece::BodyEnd { len } => {
                    let end = matches!(piece, Piece::BodyEnd { .. });
                    // Named on the last chunk only (the retrieval record): no shared-pointer
                    // traffic per chunk of a body.
                    let user = if end { self.user_shared() } else { None };
                    let body = SessionEvent::Body {
                        chunk: Bytes::new(),
                        end,
                        user,
                    };
                    self.event_on_server_bytes(body, fwd..fwd + len);
                    fwd += len;
                }
            }
            if self.tracker.local_due() {
                self.flush_server(sin, &mut fwd);
                self.write_due_locals();
                if self.closed() {
                    return;
                }
            }
        }
        self.flush_server(sin, &mut fwd);
    }

    /// A status line of `len` bytes at `sin[fwd..]`: rules, audit, CAPA capture, relay.
    fn status(&mut self, sin: &mut BytesMut, fwd: &mut usize, len: usize, meta: ResponseMeta) {
        let at = *fwd;
        // The answer to the retrieval a scan rule selected: the last command sent (no later
        // one is read until its verdict), so the final answer after which the server owes
        // nothing more.
        let last_answer = meta.status != crate::pop3::response::Status::Continue
            && meta.verb.is_some()
            && !self.tracker.awaiting_upstream();
        let sent = self.scan.as_ref().filter(|s| s.status.is_none());
        let answers_scan = last_answer
            && sent.is_some_and(|s| meta.verb == Some(s.verb) && meta.msg == Some(s.msg));
        if last_answer && sent.is_some() && !answers_scan {
            // Not reached: the selected command was the last one sent. Never wait for an
            // answer that cannot come.
            warn!("the answer to a retrieval selected for scanning was not recognised");
            self.scan = None;
        }
        let stated = meta.size;
        if let Some(login) = &meta.login {
            info!(
                user = login.identity.as_ref().map_or("-", |i| i.user().as_str()),
                method = %login.method.label(),
                success = login.success,
                "login"
            );
        }
        debug!(
            verb = meta.verb.map(|v| v.as_str()).unwrap_or("greeting"),
            status = meta.status.as_str(),
            line = %crate::pop3::printable(&sin[at..at + len]).trim_end(),
            "response"
        );
        // A Dovecot that trusts popgate offers XCLIENT in its greeting; clients never see it.
        // Hidden before the rules: a greeting rewrite could move it out of its place.
        let hidden = meta
            .verb
            .is_none()
            .then(|| capa::hide_xclient(&sin[at..at + len]))
            .flatten();
        let (rewritten, delay, drop, response_tags) =
            self.response_rules(&meta, hidden.as_deref().unwrap_or(&sin[at..at + len]));
        let rewritten = rewritten.or(hidden);
        // The event tags of the command this answers (its final answer) and of the response.
        let mut tags = match meta.verb {
            Some(_) if meta.status != crate::pop3::response::Status::Continue => {
                self.cmd_tags.pop_front().unwrap_or_default()
            }
            Some(_) => {
                // A SASL challenge: its tags wait with the AUTH for the login's answer.
                if let Some(t) = self.cmd_tags.front_mut() {
                    add_tags(t, &response_tags);
                }
                Vec::new()
            }
            None => Vec::new(),
        };
        add_tags(&mut tags, &response_tags);
        // Failed-login penalty per client IP, on top of any rule's delay: not for a refusal
        // that says the credentials were fine or were never checked (a locked maildrop, the
        // server or popgate's token endpoint out of order). The driver looks it up and
        // answers with `penalty`; the `-ERR` is held until then.
        let penalty = meta.login.as_ref().is_some_and(|l| !l.success)
            && !not_a_credential_failure(&sin[at..at + len]);
        if penalty {
            self.event(SessionEvent::LoginFailed(self.cfg.client_ip));
        }
        self.learn_from_response(&meta, &sin[at..at + len]);
        // After the rules, so that a login event carries the tags they attached.
        self.report_tags();
        let (verb, status, multiline) = (meta.verb, meta.status, meta.multiline);
        let user = self.user_shared();
        let state = self.tracker.state();
        let status_event = self.events.len();
        let drop_tags = drop.as_ref().map(|_| tags.clone());
        self.event(SessionEvent::Status {
            meta,
            line: Bytes::new(),
            user,
            state,
            marks: Marks {
                tags,
                dropped_by: drop.clone(),
            },
        });
        if let Some(rule) = drop {
            info!(%rule, "session dropped by rule");
            self.dropped_by(rule, &drop_tags.unwrap_or_default());
            self.flush_server(sin, fwd);
            self.status_bytes(status_event, Bytes::copy_from_slice(&sin[..len]));
            self.close(CloseReason::RuleDrop);
            return;
        }
        if delay.is_some() || penalty {
            self.flush_server(sin, fwd);
            self.hold(delay.unwrap_or_default(), penalty);
        }
        if status == crate::pop3::response::Status::Ok {
            match verb {
                Some(Verb::Top) => self.learned.top = true,
                Some(Verb::Uidl) => self.learned.uidl = true,
                _ => {}
            }
        }
        if answers_scan {
            if status == crate::pop3::response::Status::Ok && multiline {
                // Held, with the body, until the verdict.
                self.flush_server(sin, fwd);
                let original = sin.split_to(len).freeze();
                self.status_bytes(status_event, original.clone());
                let line = rewritten.map_or(original, Bytes::from);
                self.hold_status(line, stated);
                return;
            }
            // Nothing to scan.
            self.scan = None;
        }
        // A server without CAPA (popa3d, RFC 1939 only) refuses it: popgate answers with its
        // own list, so that clients see STLS where this listener offers it (curl, poplib and
        // fetchmail start TLS only when CAPA shows STLS).
        let own_capa = (verb == Some(Verb::Capa) && status == crate::pop3::response::Status::Err)
            .then(|| self.own_capa());
        let capture = multiline && verb == Some(Verb::Capa);
        if capture || rewritten.is_some() || own_capa.is_some() {
            self.flush_server(sin, fwd);
            let original = sin.split_to(len).freeze();
            self.status_bytes(status_event, original.clone());
            if let Some(list) = own_capa {
                debug!("upstream refused CAPA: answered with popgate's own list");
                let list = Bytes::from(list);
                self.event(SessionEvent::LocalReply(list.clone()));
                self.send_client(list);
                return;
            }
            let line = rewritten.unwrap_or_else(|| original.to_vec());
            if capture {
                // Collected and rewritten: clients must see this hop's truth.
                self.capa = Some(line);
            } else {
                self.send_client(line);
            }
        } else {
            // Relayed in place: the event gets its slice of the chunk split off for the
            // client.
            // (`at` is stale if a hold split off what came before.)
            self.pending_bytes.push((status_event, *fwd..*fwd + len));
            *fwd += len;
        }
    }

    /// The line of the status event at `index` in the queue.
    fn status_bytes(&mut self, index: usize, bytes: Bytes) {
        if let Some(SessionEvent::Status { line, .. }) = self.events.get_mut(index) {
            *line = bytes;
        }
    }

    /// Rules on a status line (greeting or response) and on the login it decides.
    /// Returns a rewritten line (CRLF included), a tarpit delay, the rule that drops the
    /// session (if one does) and the event tags.
    #[allow(clippy::type_complexity)]
    fn response_rules(
        &mut self,
        meta: &ResponseMeta,
        raw: &[u8],
    ) -> (
        Option<Vec<u8>>,
        Option<Duration>,
        Option<Arc<str>>,
        Vec<Arc<str>>,
    ) {
        let kind = if meta.verb.is_none() {
            EventKind::Greeting
        } else {
            EventKind::Response
        };
        let line = trim_eol(raw);
        let ev = Event {
            verb: meta.verb,
            status: Some(meta.status),
            text: Some(line),
            size: meta.size,
            ..event(&self.cfg, &self.tracker, self.client_tls, kind)
        };
        let v = self.policy.evaluate(&ev);
        let mut delay = v.delay;
        let mut tags = v.tags.clone();
        let mut drop = match self.policy.terminal(&v) {
            Terminal::Drop { rule } => Some(rule),
            _ => None,
        };
        if meta.login.is_some() {
            let ev = Event {
                verb: meta.verb,
                status: Some(meta.status),
                ..event(&self.cfg, &self.tracker, self.client_tls, EventKind::Login)
            };
            let lv = self.policy.evaluate(&ev);
            delay = match (delay, lv.delay) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            };
            add_tags(&mut tags, &lv.tags);
            if let (None, Terminal::Drop { rule }) = (&drop, self.policy.terminal(&lv)) {
                drop = Some(rule);
            }
        }
        let rewritten = v.rewritten.map(|mut l| {
            l.extend_from_slice(b"\r\n");
            l
        });
        (rewritten, delay, drop, tags)
    }

    /// Rewrite a complete CAPA response (status line + body + terminator) for this hop:
    /// the upstream's STLS is never shown; STLS is offered when this listener can do it;
    /// SASL lists only the mechanisms popgate relays.
    fn rewrite_capa(&mut self, response: &[u8]) -> Vec<u8> {
        let status_len = line_end(response).unwrap_or(response.len());
        let (status, body) = response.split_at(status_len);
        let mut items: Vec<Vec<u8>> = Vec::new();
        let with_rules = self.policy.wants(EventKind::Capa);
        for item in capa::items(body) {
            if !with_rules {
                items.push(item.to_vec());
                continue;
            }
            let ev = Event {
                text: Some(item),
                ..event(&self.cfg, &self.tracker, self.client_tls, EventKind::Capa)
            };
            let v = self.policy.evaluate(&ev);
            if v.remove {
                continue;
            }
            match v.rewritten {
                Some(new) if new.iter().all(u8::is_ascii_whitespace) => {}
                Some(new) => items.push(new),
                None => items.push(item.to_vec()),
            }
        }
        if with_rules {
            let ev = event(&self.cfg, &self.tracker, self.client_tls, EventKind::Capa);
            let v = self.policy.evaluate(&ev);
            items.extend(v.add_capa.into_iter().map(String::into_bytes));
        }
        // After the rules, so that no rule can advertise STLS where this hop cannot do it.
        items.retain(|i| capa::keyword(i) != "STLS");
        let mut items: Vec<Vec<u8>> = items
            .into_iter()
            .filter_map(|i| capa::retain_sasl(i, sasl_mechanism_supported))
            .collect();
        if self.stls_offered() {
            items.push(b"STLS".to_vec());
        }
        capa::build(status, items.iter().map(Vec::as_slice))
    }

    /// popgate's own CAPA response for a server that refused CAPA: USER (every RFC 1939
    /// server has it), TOP and UIDL once the server has answered them, STLS where this
    /// listener offers it; CAPA rules apply as to a server's list.
    fn own_capa(&mut self) -> Vec<u8> {
        let mut response = b"+OK capability list follows\r\nUSER\r\n".to_vec();
        if self.learned.top {
            response.extend_from_slice(b"TOP\r\n");
        }
        if self.learned.uidl {
            response.extend_from_slice(b"UIDL\r\n");
        }
        response.extend_from_slice(b".\r\n");
        self.rewrite_capa(&response)
    }

    /// Whether this hop offers STLS right now.
    fn stls_offered(&self) -> bool {
        self.cfg.stls_available && !self.client_tls && self.tracker.state() == State::Authorization
    }

    /// Handle every complete client line in `cin` that may be handled now.
    fn client_data(&mut self, cin: &mut BytesMut) {
        let max_line = self.cfg.max_line;
        if self.phase == Phase::Barrier {
            self.phase = Phase::Reading { discarding: None };
        }
        loop {
            if self.closed() {
                return;
            }
            if self.phase == Phase::Closing {
                // The session ends once the closing reply is out: what follows is dropped.
                cin.clear();
                break;
            }
            if self.tracker.quit_sent() {
                // Nothing after QUIT is forwarded: the server is about to close.
                cin.clear();
                break;
            }
            if self.phase == Phase::StartingTls
                || self.scan.is_some()
                || self.tracker.client_must_wait()
                || self.tracker.internal_pending()
                || self.tracker.pending_len() >= self.cfg.max_pipeline
            {
                break;
            }
            if let Phase::Reading {
                discarding: Some(dropped),
            } = self.phase
            {
                match line_end(cin) {
                    Some(n) => {
                        cin.advance(n);
                        self.phase = Phase::Reading { discarding: None };
                        continue;
                    }
                    None => {
                        let total = dropped + cin.len();
                        cin.clear();
                        if total > MAX_DISCARD_FACTOR * max_line {
                            warn!(octets = total, "endless line from client, closing");
                            // The `-ERR line too long` queued for this line still goes out,
                            // whether the junk came in one read or in many.
                            self.write_due_locals();
                            self.close(CloseReason::Error);
                            return;
                        }
                        self.phase = Phase::Reading {
                            discarding: Some(total),
                        };
                        break;
                    }
                }
            }
            let Some(len) = line_end(cin) else {
                if cin.len() > max_line {
                    self.line_too_long();
                    if let Phase::Reading { discarding } = &mut self.phase {
                        *discarding = Some(cin.len());
                    }
                    cin.clear();
                    // At client EOF nothing more comes: the rest of the line is moot.
                    if self.phase == Phase::ClientEof {
                        break;
                    }
                    continue;
                }
                break;
            };
            if len > max_line + 2 {
                cin.advance(len);
                self.line_too_long();
                continue;
            }
            if !self.tracker.idle()
                && matches!(Command::parse(&cin[..len]), Ok(c) if c.verb == Verb::Stls)
            {
                // Whether STLS is allowed depends on the outcome of the commands before it:
                // it waits (unparsed) until they are answered.
                self.barrier();
                break;
            }
            if self.tracker.user_outstanding()
                && matches!(Command::parse(&cin[..len]), Ok(c) if c.verb == Verb::Pass)
            {
                // Whose password this is depends on the USERs before it: a server may refuse
                // the latest (popa3d takes one USER per session) and log the earlier name in.
                // The PASS waits (unparsed) until they are answered, so rules judge it as
                // the user the server will log in.
                self.barrier();
                break;
            }
            if self.lookup(&cin[..len]) {
                // The client's command waits (unread) for the answer, which only popgate
                // sees: the server never gets two commands at once on popgate's account.
                break;
            }
            let line = cin.split_to(len).freeze();
            self.client_line(line);
            if self.phase == Phase::StartingTls {
                break;
            }
            // Commands go upstream in one write at the end; a local reply that is due
            // (nothing owed before it) goes out now.
            if self.tracker.local_due() {
                self.flush_upstream();
                self.write_due_locals();
            }
        }
        self.flush_upstream();
        self.write_due_locals();
    }

    /// A complete line waits for the answers before it (while the client is read).
    fn barrier(&mut self) {
        if let Phase::Reading { .. } = self.phase {
            self.phase = Phase::Barrier;
        }
    }

    /// Before the client's `line` is handled: if it retrieves or deletes a message whose
    /// UIDL (or, with `message_ids = "always"`, for a DELE, Message-ID) the session has not
    /// seen, send the server the question (`UIDL n`, `TOP n 0`) and say so: the line then
    /// waits until the answer is in. Only in the TRANSACTION state, with the audit trail on.
    fn lookup(&mut self, line: &[u8]) -> bool {
        let Some(mode) = self.cfg.lookups else {
            return false;
        };
        if self.tracker.state() != State::Transaction || self.phase == Phase::Closing {
            return false;
        }
        let Ok(cmd) = Command::parse(line) else {
            return false;
        };
        // Parsing checked the arguments (one number; TOP two).
        if !matches!(cmd.verb, Verb::Retr | Verb::Top | Verb::Dele) {
            return false;
        }
        let Some(n) = cmd.msg_number().filter(|&n| n > 0) else {
            return false;
        };
        let k = &mut self.known;
        if k.uidl.len() + k.headers.len() >= MAX_LOOKUPS {
            return false;
        }
        let question = if !k.no_uidl && !k.all && k.uidl.insert(n) {
            format!("UIDL {n}\r\n")
        } else if mode == MessageIds::Always
            && cmd.verb == Verb::Dele
            && !k.no_top
            && k.headers.insert(n)
        {
            format!("TOP {n} 0\r\n")
        } else {
            return false;
        };
        let question = Bytes::from(question);
        let Ok(ask) = Command::parse(&question) else {
            return false;
        };
        if !self.tracker.inject(&ask) {
            return false;
        }
        debug!(command = %ask.redacted(), "asking the server for the audit trail");
        self.up_out.extend_from_slice(&question);
        let injected = CommandLine::new(question.clone(), &ask);
        self.event(SessionEvent::Injected(injected));
        self.flush_upstream();
        true
    }

    /// The answer to a command popgate injected: handed to the audit observer, consumed.
    fn injected_status(
        &mut self,
        sin: &mut BytesMut,
        fwd: &mut usize,
        len: usize,
        meta: ResponseMeta,
    ) {
        self.flush_server(sin, fwd);
        let line = sin.split_to(len).freeze();
        debug!(
            verb = meta.verb.map(|v| v.as_str()).unwrap_or("-"),
            line = %crate::pop3::printable(&line).trim_end(),
            "answer to popgate's own question"
        );
        self.learn_uidl(&meta, &line);
        if meta.status != crate::pop3::response::Status::Ok {
            match meta.verb {
                Some(Verb::Uidl) => self.known.refused = meta.msg,
                Some(Verb::Top) => self.known.no_top = true,
                _ => {}
            }
        }
        self.event(SessionEvent::InjectedStatus { meta, line });
    }

    /// With scanning: the unique id a `+OK n uid` answer to `UIDL n` gives, for a notice.
    fn learn_uidl(&mut self, meta: &ResponseMeta, line: &[u8]) {
        const KEEP: usize = 8;
        if self.cfg.scan.is_none()
            || meta.verb != Some(Verb::Uidl)
            || meta.status != crate::pop3::response::Status::Ok
            || meta.multiline
        {
            return;
        }
        let (Some(n), Ok(text)) = (meta.msg, std::str::from_utf8(trim_eol(line))) else {
            return;
        };
        // RFC 1939: the id is 1 to 70 characters 0x21 to 0x7E.
        if let Some(uid) = text.split(' ').nth(2).filter(|u| u.len() <= 70)
            && !uid.is_empty()
        {
            let uidls = &mut self.memo.get_or_insert_with(Box::default).uidls;
            if uidls.len() >= KEEP {
                uidls.pop_front();
            }
            uidls.push_back((n, uid.into()));
        }
    }

    /// What the client's own responses teach about UIDL support, before the observer sees them.
    fn learn_from_response(&mut self, meta: &ResponseMeta, line: &[u8]) {
        self.learn_uidl(meta, line);
        let ok = meta.status == crate::pop3::response::Status::Ok;
        let k = &mut self.known;
        match meta.verb {
            Some(Verb::Uidl) if meta.msg.is_none() && !ok && !k.no_uidl => {
                k.no_uidl = true;
                self.events.push_back(SessionEvent::NoUidl);
            }
            Some(Verb::Retr | Verb::Top | Verb::Dele)
                if ok && meta.msg.is_some() && k.refused == meta.msg && !k.no_uidl =>
            {
                // The message exists, yet `UIDL n` was refused.
                k.no_uidl = true;
                self.events.push_back(SessionEvent::NoUidl);
            }
            _ => {}
        }
    }

    /// One complete client line (within `max_line`).
    fn client_line(&mut self, line: Bytes) {
        match self.tracker.classify(&line) {
            ClientLine::SaslResponse(data) => {
                debug!(line = "***", "SASL answer");
                self.events.push_back(SessionEvent::ClientSasl);
                // Rules see SASL lines (to log, drop or deny) but never their content; the
                // user is the one the exchange names once this line is in (AUTH LOGIN's
                // answer to `Username:`, AUTH PLAIN after an empty challenge).
                let named = self.tracker.name_in_sasl_answer(data);
                let user = named.as_ref().or(self.tracker.user_name());
                let ev = Event {
                    verb: Some(Verb::Auth),
                    user: user.map(UserName::as_str),
                    ..event(
                        &self.cfg,
                        &self.tracker,
                        self.client_tls,
                        EventKind::Command,
                    )
                };
                let v = self.policy.evaluate(&ev);
                match self.policy.terminal(&v) {
                    Terminal::Drop { rule } => {
                        info!(%rule, "session dropped by rule");
                        self.dropped_by(rule, &v.tags);
                        self.close(CloseReason::RuleDrop);
                        return;
                    }
                    Terminal::Deny { rule, .. } => {
                        // The server waits for an answer: the exchange is cancelled (`*`,
                        // RFC 5034) instead, and the server's `-ERR` ends the login. The
                        // credentials never reach the server.
                        info!(%rule, verb = "AUTH", "SASL login denied by rule: cancelled");
                        let user = user.cloned();
                        self.report_tags();
                        self.event(SessionEvent::Denied {
                            rule,
                            verb: Verb::Auth,
                            user,
                            tags: v.tags,
                        });
                        self.up_out.extend_from_slice(b"*\r\n");
                        self.tracker.forwarded_sasl(b"*\r\n");
                        return;
                    }
                    Terminal::Pass => {}
                }
                // The AUTH's answer (the login) carries them.
                if let Some(t) = self.cmd_tags.back_mut() {
                    add_tags(t, &v.tags);
                }
                self.up_out.extend_from_slice(data);
                self.tracker.forwarded_sasl(data);
            }
            ClientLine::StraySasl => {
                debug!(line = "***", "line after a refused AUTH discarded");
                self.event(SessionEvent::ClientSasl);
                self.tracker.answer_locally(
                    Verb::Unknown,
                    replies::line(replies::NO_SASL_EXCHANGE),
                    AfterReply::Continue,
                );
            }
            ClientLine::Invalid(e) => {
                debug!(error = %e, "invalid command");
                self.tracker.answer_locally(
                    Verb::Unknown,
                    replies::invalid_command(&e),
                    AfterReply::Continue,
                );
            }
            ClientLine::Command(cmd) => {
                debug!(command = %cmd.redacted(), "command");
                self.events
                    .push_back(SessionEvent::ClientCommand(CommandLine::new(
                        line.clone(),
                        &cmd,
                    )));
                let (decision, delay, tags) = self.decide(&cmd);
                if let Some(d) = delay {
                    // Tarpit: what was decided before goes out first; what comes after waits.
                    self.flush_upstream();
                    self.write_due_locals();
                    self.hold(d, false);
                }
                match decision {
                    Decision::Forward(None) => {
                        self.up_out.extend_from_slice(cmd.raw);
                        self.tracker.forwarded(&cmd);
                        self.note_uidl(&cmd);
                        self.cmd_tags.push_back(tags);
                        self.select_scan(&cmd);
                    }
                    Decision::Forward(Some(line)) => self.forward_rewritten(cmd.verb, line, tags),
                    Decision::Drop(rule) => {
                        self.dropped_by(rule, &tags);
                        self.close(CloseReason::RuleDrop);
                    }
                    Decision::Reply(text, then) => {
                        let mut reply = text.into_bytes();
                        reply.extend_from_slice(b"\r\n");
                        self.tracker.answer_locally(cmd.verb, reply, then);
                        if then == AfterReply::Close && !self.closed() {
                            self.phase = Phase::Closing;
                        }
                        if then == AfterReply::StartTls {
                            // Whatever else is buffered is plaintext sent before the
                            // handshake: it is discarded (at the handshake), never parsed.
                            self.phase = Phase::StartingTls;
                            self.flush_upstream();
                            self.write_due_locals();
                        }
                    }
                }
            }
        }
    }

    /// What the client asks for itself popgate need not ask: UIDLs, and the headers of what
    /// it retrieves.
    fn note_uidl(&mut self, cmd: &Command<'_>) {
        if self.tracker.state() != State::Transaction {
            return;
        }
        match (cmd.verb, cmd.msg_number()) {
            (Verb::Uidl, None) if !cmd.has_args() => self.known.all = true,
            (Verb::Uidl, Some(n)) => {
                self.known.uidl.insert(n);
            }
            (Verb::Retr | Verb::Top, Some(n)) => {
                self.known.headers.insert(n);
            }
            _ => {}
        }
    }

    /// Forward a command a rule rewrote; the tracker learns the shape from what is sent.
    fn forward_rewritten(&mut self, verb: Verb, line: Vec<u8>, tags: Vec<Arc<str>>) {
        match Command::parse(&line) {
            Ok(new) if let Some(why) = self.tracker.refusal(&new) => {
                warn!(command = %new.redacted(), "rule rewrite produced a command not valid now");
                self.tracker.answer_locally(
                    verb,
                    format!("{why}\r\n").into_bytes(),
                    AfterReply::Continue,
                );
            }
            Ok(new) => {
                debug!(command = %new.redacted(), "command rewritten by rule");
                self.up_out.extend_from_slice(&line);
                self.tracker.forwarded(&new);
                self.note_uidl(&new);
                self.cmd_tags.push_back(tags);
                self.select_scan(&new);
            }
            Err(e) => {
                warn!(error = %e, "rule rewrite produced an invalid command");
                self.tracker.answer_locally(
                    verb,
                    replies::line(replies::COMMAND_REJECTED),
                    AfterReply::Continue,
                );
            }
        }
    }

    /// Decide what to do with a command: rules first, then popgate's own protocol checks
    /// (which no rule can override: STLS is never relayed, the state is respected, unknown
    /// shapes are not guessed). Returns the decision, a tarpit delay to apply first, and the
    /// command's event tags.
    fn decide(&mut self, cmd: &Command<'_>) -> (Decision, Option<Duration>, Vec<Arc<str>>) {
        // APOP and AUTH with an initial response name their user themselves.
        let named = self.tracker.name_in(cmd);
        let user = named.as_ref().or(self.tracker.user_name());
        let ev = Event {
            verb: Some(cmd.verb),
            args: Some(cmd.args),
            user: user.map(UserName::as_str),
            ..event(
                &self.cfg,
                &self.tracker,
                self.client_tls,
                EventKind::Command,
            )
        };
        let mut verdict = self.policy.evaluate(&ev);
        let delay = verdict.delay;
        let tags = verdict.tags.clone();
        self.selected =
            (!verdict.scan.is_empty()).then(|| Arc::from(std::mem::take(&mut verdict.scan)));
        match self.policy.terminal(&verdict) {
            Terminal::Pass => {}
            Terminal::Deny { reply, rule, close } => {
                info!(%rule, verb = %cmd.verb, "command denied by rule");
                // The denial carries the tags its own evaluation attached.
                let user = user.cloned();
                self.report_tags();
                self.event(SessionEvent::Denied {
                    rule: rule.clone(),
                    verb: cmd.verb,
                    user,
                    tags,
                });
                let then = if close {
                    self.close_marks_mut().dropped_by.get_or_insert(rule);
                    AfterReply::Close
                } else {
                    AfterReply::Continue
                };
                return (Decision::Reply(reply, then), delay, Vec::new());
            }
            Terminal::Drop { rule } => {
                info!(%rule, verb = %cmd.verb, "session dropped by rule");
                return (Decision::Drop(rule), delay, tags);
            }
        }
        let reply = |text: &str| Decision::Reply(text.into(), AfterReply::Continue);
        if let Some(why) = self.tracker.refusal(cmd) {
            debug!(verb = %cmd.verb, state = self.tracker.state().as_str(), "command refused: {why}");
            return (reply(why), delay, tags);
        }
        let decision = match cmd.verb {
            // Dovecot believes XCLIENT from popgate's address: a client's own would replace
            // its address (and session id) in the server's logs and penalties. Never relayed.
            Verb::Unknown if cmd.keyword.eq_ignore_ascii_case(b"XCLIENT") => {
                info!("XCLIENT from the client refused");
                reply(replies::XCLIENT_NOT_ALLOWED)
            }
            Verb::Unknown if self.cfg.unknown_commands == UnknownCommands::Reject => {
                reply(replies::UNKNOWN_COMMAND)
            }
            // An unknown command may carry a credential (`PASSsecret`, `XLOGIN user pw`): it
            // is never forwarded where a rule would refuse a password.
            Verb::Unknown if self.credentials_denied() => {
                info!("unknown command refused: credentials are denied here");
                reply(replies::UNKNOWN_COMMAND)
            }
            // The one other free-form argument a client may send before login.
            Verb::Lang if cmd.has_args() && self.credentials_denied() => {
                info!("LANG with an argument refused: credentials are denied here");
                reply(replies::NOT_BEFORE_ENCRYPTION)
            }
            // STLS is between the client and this hop; it is never relayed upstream.
            Verb::Stls if self.client_tls => reply(replies::ALREADY_UNDER_TLS),
            Verb::Stls if self.tracker.state() != State::Authorization => {
                reply(replies::STLS_ONLY_BEFORE_LOGIN)
            }
            Verb::Stls if !self.stls_offered() => reply(replies::STLS_NOT_AVAILABLE),
            Verb::Stls => Decision::Reply("+OK begin TLS negotiation".into(), AfterReply::StartTls),
            // With scanning on, a message number past u32 is not relayed: a server that reads
            // it modulo 2^32 (or clamps it) would retrieve a message unscanned, or delete one
            // whose retrieval was tempfailed, under a number popgate cannot name.
            Verb::Retr | Verb::Top | Verb::Dele
                if self.cfg.scan.is_some() && cmd.msg_number().is_none() =>
            {
                info!(verb = %cmd.verb, "message number out of range refused");
                reply(replies::NO_SUCH_MESSAGE)
            }
            // The client has not seen this message (its retrieval was tempfailed): it is not
            // deleted on its behalf.
            Verb::Dele
                if cmd.msg_number().is_some_and(|n| {
                    self.memo
                        .as_ref()
                        .is_some_and(|m| m.tempfailed.contains(&n))
                }) =>
            {
                info!(msg = ?cmd.msg_number(), "DELE of a message not yet scanned refused");
                reply(replies::SCAN_DELE_TEMPFAILED)
            }
            _ => Decision::Forward(
                verdict
                    .rewritten
                    .map(|args| command_line(cmd.keyword, &args)),
            ),
        };
        (decision, delay, tags)
    }

    /// Whether a rule would refuse a password now (e.g. `require-tls` on plaintext). Asked
    /// without side effects (no logs, tags or denial counts).
    fn credentials_denied(&self) -> bool {
        self.policy.would_stop(&Event {
            verb: Some(Verb::Pass),
            // Some (empty) arguments: an event without them is a SASL line to the engine.
            args: Some(b""),
            ..event(
                &self.cfg,
                &self.tracker,
                self.client_tls,
                EventKind::Command,
            )
        })
    }

    /// A client line longer than `limits.max_line`. Inside a SASL exchange the server waits
    /// for an answer: the exchange is cancelled (`*`), so the server's `-ERR` answers the AUTH
    /// and later replies stay on their commands. Otherwise popgate answers `-ERR` itself.
    fn line_too_long(&mut self) {
        if self.tracker.awaiting_sasl_answer() {
            warn!("SASL answer longer than limits.max_line: exchange cancelled");
            self.up_out.extend_from_slice(b"*\r\n");
            self.tracker.forwarded_sasl(b"*\r\n");
            return;
        }
        self.tracker.answer_locally(
            Verb::Unknown,
            replies::line(replies::LINE_TOO_LONG),
            AfterReply::Continue,
        );
    }
}

/// Content scanning: a retrieval a `scan` rule selected (see [`Scanning`]).
impl Hop {
    /// The driver's answer to an [`Output::Scan`]: one report per scanner asked, in the order
    /// asked; `date` is now as an RFC 5322 date (for a notice when the original has none);
    /// `cin` holds client bytes not yet handled (commands read before the scan wait there).
    /// What the client gets for the message comes out in the hold's place, by `[scan]`
    /// policy; a late answer (the session ended meanwhile) is ignored.
    pub(crate) fn scan_done(
        &mut self,
        now: Instant,
        date: &str,
        reports: Vec<ScanReport>,
        cin: &mut BytesMut,
    ) {
        self.now = now;
        self.idle_deadline = now + self.cfg.idle_timeout;
        let Some(s) = self.scan.take_if(|s| s.waiting) else {
            return;
        };
        let Some(policy) = self.cfg.scan.clone() else {
            return;
        };
        let status = s.status.clone().unwrap_or_default();
        let judgement = scanning::judge(&policy, &reports);
        let mut outs = Vec::with_capacity(3);
        let mut local = None;
        match judgement.outcome {
            scanning::Outcome::Deliver => {
                let mut first = status.to_vec();
                first.extend_from_slice(&judgement.headers);
                outs.push(Output::ToClient(first.into()));
                if s.spooled > 0 {
                    outs.push(Output::Unspool);
                }
                outs.push(Output::ToClient(Bytes::from_static(b".\r\n")));
            }
            scanning::Outcome::Replace => {
                let uidl = self.memo.as_ref().and_then(|m| {
                    m.uidls
                        .iter()
                        .rev()
                        .find(|(n, _)| *n == s.msg)
                        .map(|(_, u)| &**u)
                });
                let notice = scanning::notice(&policy, &s, &reports, &judgement, date, uidl);
                let mut reply = format!("+OK {} octets\r\n", notice.len()).into_bytes();
                reply.extend_from_slice(&notice);
                reply.extend_from_slice(b".\r\n");
                local = Some(Bytes::from(reply));
            }
            scanning::Outcome::Deny => local = Some(replies::line(replies::SCAN_DENIED).into()),
            scanning::Outcome::Tempfail => {
                local = Some(replies::line(replies::SCAN_TEMPFAIL).into());
            }
        }
        if let Some(reply) = local {
            if s.spooled > 0 {
                outs.push(Output::DropSpool);
            }
            outs.push(Output::ToClient(reply));
        }
        if judgement.action == crate::proxy::ScanAction::Tempfailed {
            let memo = self.memo.get_or_insert_with(Box::default);
            memo.tempfailed.insert(s.msg);
        } else if let Some(memo) = self.memo.as_mut() {
            memo.tempfailed.remove(&s.msg);
        }
        info!(
            msg = s.msg,
            verb = %s.verb,
            action = judgement.action.as_str(),
            "message scanned"
        );
        let user = self.user_shared();
        let added = if judgement.outcome == scanning::Outcome::Deliver {
            Bytes::from(judgement.headers)
        } else {
            Bytes::new()
        };
        self.event(SessionEvent::Scanned {
            msg: s.msg,
            verb: s.verb,
            reports,
            action: judgement.action,
            added,
            user,
        });
        if let Some(Output::ToClient(reply)) = outs.last()
            && judgement.outcome != scanning::Outcome::Deliver
        {
            self.event(SessionEvent::LocalReply(reply.clone()));
        }
        self.outputs.answer_scan(outs, now);
        if self.closed() {
            return;
        }
        self.client_data(cin);
        if !self.closed() && self.phase == Phase::ClientEof && self.tracker.idle() {
            self.close(CloseReason::ClientEof);
        }
    }

    /// A command was forwarded: if the rules chose scanners for it and it retrieves a
    /// message, its body is to be held for them.
    fn select_scan(&mut self, cmd: &Command<'_>) {
        let Some(names) = self.selected.take() else {
            return;
        };
        if self.cfg.scan.is_none()
            || !matches!(cmd.verb, Verb::Retr | Verb::Top)
            || self.tracker.state() != State::Transaction
        {
            return;
        }
        let Some(msg) = cmd.msg_number() else {
            return;
        };
        debug!(msg, verb = %cmd.verb, "retrieval selected for scanning");
        self.scan = Some(Box::new(Scanning::new(names, msg, cmd.verb)));
    }

    /// The `+OK` of a selected retrieval (`line`, as the client is to get it; `stated`: the
    /// size it states): held with the body, unless a RETR states a size larger than any of
    /// the scanners takes (then it goes at once, tagged unscanned).
    fn hold_status(&mut self, line: Bytes, stated: Option<u64>) {
        let (Some(policy), Some(s)) = (self.cfg.scan.clone(), self.scan.as_mut()) else {
            self.scan = None;
            self.send_client(line);
            return;
        };
        s.cap = policy.cap(&s.scanners);
        if s.verb == Verb::Retr && stated.is_some_and(|n| n > s.cap) {
            debug!(msg = s.msg, size = ?stated, cap = s.cap, "too large to scan: relayed unscanned");
            let mut first = line.to_vec();
            first.extend_from_slice(scanning::UNSCANNED_TOO_LARGE);
            self.send_client(first);
            self.unscanned();
            return;
        }
        s.status = Some(line);
    }

    /// Body bytes of a held retrieval (`end`: the last, without the terminator line).
    fn spool(&mut self, data: Bytes, end: bool) {
        let Some(s) = self.scan.as_mut() else {
            return;
        };
        s.keep_head(&data);
        if s.spooled + data.len() as u64 > s.cap {
            // Larger than any of its scanners takes: what was held goes now, the rest as it
            // comes, tagged unscanned.
            debug!(
                msg = s.msg,
                cap = s.cap,
                "body passed the scan size cap: relayed unscanned"
            );
            let spooled = s.spooled;
            let mut first = s.status.take().unwrap_or_default().to_vec();
            first.extend_from_slice(scanning::UNSCANNED_TOO_LARGE);
            self.send_client(first);
            if spooled > 0 {
                self.outputs.push(Output::Unspool);
            }
            if !data.is_empty() {
                self.send_client(data);
            }
            if end {
                self.send_client(Bytes::from_static(b".\r\n"));
            }
            self.unscanned();
            return;
        }
        if !data.is_empty() {
            s.spooled += data.len() as u64;
            self.outputs.push(Output::Spool(data));
        }
        if end {
            s.waiting = true;
            let req = crate::proxy::ScanRequest {
                scanners: s.scanners.clone(),
                msg: s.msg,
            };
            self.outputs.push(Output::Scan(req));
            self.outputs.hold_for_scan();
        }
    }

    /// The selected retrieval goes to the client unscanned (too large): its audit events
    /// say so, one `too_large` report per scanner.
    fn unscanned(&mut self) {
        let Some(s) = self.scan.take() else {
            return;
        };
        let reports = s
            .scanners
            .iter()
            .map(|name| ScanReport {
                scanner: name.clone(),
                verdict: crate::types::ScanVerdict::TooLarge,
                detail: None,
                score: None,
                duration: Duration::ZERO,
            })
            .collect();
        let user = self.user_shared();
        self.event(SessionEvent::Scanned {
            msg: s.msg,
            verb: s.verb,
            reports,
            action: crate::proxy::ScanAction::Unscanned,
            added: Bytes::from_static(scanning::UNSCANNED_TOO_LARGE),
            user,
        });
    }

    /// The session ends (or the response breaks) before a held retrieval's verdict: the
    /// spool goes, and the hold waiting for the verdict. Whether the client was owed the
    /// retrieval's status line (it saw nothing of the response).
    fn drop_scan(&mut self) -> bool {
        let Some(s) = self.scan.take() else {
            return false;
        };
        self.outputs.answer_scan(Vec::new(), self.now);
        if s.spooled > 0 {
            self.outputs.push(Output::DropSpool);
        }
        self.unseen_body_dropped |= s.status.is_some();
        s.status.is_some()
    }
}

/// A rule event with the session's context filled in.
fn event<'a>(cfg: &'a HopConfig, tracker: &'a Tracker, tls: bool, kind: EventKind) -> Event<'a> {
    Event {
        tls,
        state: tracker.state(),
        user: tracker.user(),
        destination: cfg.destination,
        ..Event::new(kind, &cfg.listener, cfg.client_ip)
    }
}

/// What the hop does with a client command (the rule engine's hook point).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    /// Send upstream: unchanged, or this rewritten line (CRLF included).
    Forward(Option<Vec<u8>>),
    /// Answer locally with this line (CRLF added), never reaching the upstream.
    Reply(String, AfterReply),
    /// Close both sides now, upstream without QUIT (this rule said so).
    Drop(Arc<str>),
}
