//! The per-session side of the audit trail and traffic transcripts.
//!
//! The relay calls it at each protocol step; it turns what the tracker says into audit events
//! (queued, then emitted by [`Observer::flush`] so the relay decides where to await) and
//! transcript lines. With audit off and no transcript, every call returns at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::audit::{
    AuditEvent, AuditSink, DeleteMarked, Deleted, Denied, HeaderExtractor, HeaderSet, LoginEvent,
    Reset, Retrieve, RetrieveVerb, ScanEvent, ScanEventAction, SessionClose, SessionOpen, TlsEvent,
    TlsSide, Transcript, TranscriptConfig, Update, UpdateOutcome,
};
use crate::control::tap::TapPoint;
use crate::pop3::command::{Verb, trim_eol};
use crate::pop3::response::{Status, StatusLine};

use crate::pop3::tracker::{ResponseMeta, State};
use crate::types::{CloseReason, ScanReport, TlsInfo, UserName};

pub(crate) use crate::proxy::Marks;

fn strings(tags: &[Arc<str>]) -> Vec<String> {
    tags.iter().map(|t| t.to_string()).collect()
}

/// What a scanner said (a virus name, an action, an error) is kept to this many octets.
const MAX_SCAN_DETAIL: usize = 200;

/// `s` cut to [`MAX_SCAN_DETAIL`] octets at a character boundary.
fn bounded(s: &str) -> &str {
    if s.len() <= MAX_SCAN_DETAIL {
        return s;
    }
    let mut end = MAX_SCAN_DETAIL;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A UIDL listing line is `n uid`; longer partial lines than this are ignored.
const MAX_UIDL_LINE: usize = 128;

/// A RETR or TOP body being relayed.
#[derive(Debug)]
struct Retrieval {
    verb: RetrieveVerb,
    msg: u32,
    lines: Option<u32>,
    octets: u64,
    headers: HeaderExtractor,
    /// Event tags of the RETR/TOP and its response, for the `retrieve` record.
    tags: Vec<String>,
    /// `scan` events decided before the body ended (a message relayed unscanned): written
    /// after the `retrieve` record, with what it learnt (the Message-ID).
    scans: Vec<ScanEvent>,
}

/// Audit and transcript state of one session.
#[derive(Debug)]
pub struct Observer {
    sink: AuditSink,
    headers: Arc<HeaderSet>,
    session: u64,
    queue: Vec<AuditEvent>,
    tags: Vec<String>,
    retrieval: Option<Box<Retrieval>>,
    /// Partial line of a UIDL listing being relayed.
    uidl_listing: Option<Vec<u8>>,
    uidls: HashMap<u32, String>,
    /// Message-IDs of the messages retrieved (or probed with `TOP n 0`) in the session.
    message_ids: HashMap<u32, String>,
    /// The server has no UIDL command.
    no_uidl: bool,
    /// The header block of a `TOP n 0` popgate sent, being read for its Message-ID (boxed:
    /// rare, and large).
    probe: Option<Box<(u32, HeaderExtractor)>>,
    marked: Vec<u32>,
    transcript: Transcript,
    /// Routing mode: the upstream the login in progress was routed to.
    upstream: Option<String>,
    /// Live taps (`popgate tap`): the transcript's lines, redacted alike; through it the
    /// registry entry, which knows who kicked the session (for its `session_close`).
    tap: TapPoint,
}

impl Observer {
    /// An observer writing to `sink`, extracting `headers`; `transcript` may be disabled.
    pub fn new(
        sink: AuditSink,
        headers: Arc<HeaderSet>,
        session: u64,
        transcript: Transcript,
    ) -> Observer {
        Observer {
            sink,
            headers,
            session,
            queue: Vec::new(),
            tags: Vec::new(),
            retrieval: None,
            uidl_listing: None,
            uidls: HashMap::new(),
            message_ids: HashMap::new(),
            no_uidl: false,
            probe: None,
            marked: Vec::new(),
            transcript,
            upstream: None,
            tap: TapPoint::default(),
        }
    }

    /// Feed live taps from now on (see [`TapPoint`]).
    pub(crate) fn set_tap(&mut self, tap: TapPoint) {
        self.tap = tap;
    }

    /// The tap point (and through it the session's registry handle).
    pub(crate) fn tap_mut(&mut self) -> &mut TapPoint {
        &mut self.tap
    }

    /// A note (`*:`) for the transcript and the taps.
    fn note(&mut self, text: &str) {
        self.transcript.note(text);
        self.tap.line("*", || text.to_owned());
    }

    /// Routing mode: the upstream the next login answer comes from (its `login` event names it).
    pub fn set_upstream(&mut self, name: &str) {
        self.upstream = Some(name.to_owned());
    }

    fn auditing(&self) -> bool {
        self.sink.is_enabled()
    }

    fn push(&mut self, kind: impl Into<crate::audit::AuditEventKind>) {
        self.push_tagged(kind, &[]);
    }

    /// An event with the session's tags and `extra` (the event's own).
    fn push_tagged(&mut self, kind: impl Into<crate::audit::AuditEventKind>, extra: &[String]) {
        let mut tags = self.tags.clone();
        for t in extra {
            if !tags.contains(t) {
                tags.push(t.clone());
            }
        }
        let ev = AuditEvent::new(self.session, kind).with_tags(tags);
        self.queue.push(ev);
    }

    /// Session-scoped rule tags so far; they appear on every event from now on.
    pub fn set_tags(&mut self, tags: &[Arc<str>]) {
        if tags.len() != self.tags.len() {
            self.tags = tags.iter().map(|t| t.to_string()).collect();
        }
    }

    /// Start a transcript mid-session (a `trace` rule), unless one is running.
    pub fn start_transcript(
        &mut self,
        config: &TranscriptConfig,
        listener: &str,
        client: SocketAddr,
    ) {
        if !self.transcript.is_active() {
            self.transcript = Transcript::open(config, self.session, listener, client);
            self.transcript.note("transcript started by a trace rule");
        }
    }

    /// `session_open` of the session `info` describes, with the event tags of the `connect`
    /// rules.
    pub fn open(&mut self, info: &super::SessionInfo, tls: Option<&TlsInfo>, tags: &[Arc<str>]) {
        let super::SessionInfo {
            client,
            local,
            proxy,
            original_dst,
            ..
        } = *info;
        if let Some(p) = proxy {
            self.note(&format!("client {client} via proxy {p}"));
        }
        if let Some(d) = original_dst {
            self.note(&format!(
                "client {client} redirected, original destination {d}"
            ));
        }
        if self.auditing() {
            self.push_tagged(
                SessionOpen {
                    listener: info.listener.to_string(),
                    client,
                    local,
                    proxy,
                    original_dst,
                    client_tls: tls.cloned(),
                },
                &strings(tags),
            );
        }
    }

    /// `tls`: a handshake completed on one side.
    pub fn tls(&mut self, side: TlsSide, tls: &TlsInfo) {
        self.note(&format!(
            "{} TLS {} {}",
            side.as_str(),
            tls.version,
            tls.cipher
        ));
        if self.auditing() {
            self.push(TlsEvent::new(side, tls.clone()));
        }
    }

    /// A command line the client sent (redacted by the transcript).
    pub fn client_command(&mut self, cmd: &crate::pop3::command::Command<'_>) {
        self.transcript.client_command(cmd);
        self.tap
            .line("C", || crate::audit::model::redact::redact_command(cmd));
    }

    /// A SASL answer: never its content.
    pub fn client_sasl(&mut self) {
        self.transcript.client_sasl();
        self.tap.line("C", || "***".to_owned());
    }

    /// A reply popgate gave itself.
    pub fn local_reply(&mut self, reply: &[u8]) {
        self.note("local reply follows");
        self.transcript.server_line(reply);
        self.tap
            .line("S", || crate::audit::model::redact::display(reply));
    }

    /// `denied`, with the command's event tags.
    pub fn denied(&mut self, rule: &str, verb: Verb, user: Option<&str>, tags: &[Arc<str>]) {
        if self.auditing() {
            self.push_tagged(Denied::new(rule, verb, user), &strings(tags));
        }
    }

    /// A status line from the server with what the tracker made of it. `state` is the
    /// tracker's state after the line; `marks` what rules said about it (event tags of the
    /// command and the response, the rule that dropped the session here).
    pub fn status(
        &mut self,
        meta: &ResponseMeta,
        line: &[u8],
        user: Option<&str>,
        state: State,
        marks: &Marks,
    ) {
        self.transcript.server_line(line);
        self.tap
            .line("S", || crate::audit::model::redact::display(line));
        if !self.auditing() {
            return;
        }
        let tags = strings(&marks.tags);
        let user_s = || user.map(UserName::from);
        if let Some(login) = &meta.login {
            let code = StatusLine::parse(line).ok().and_then(|s| s.code);
            let mut l = LoginEvent::new(login.identity.as_ref(), &login.method, meta.status, code);
            l.upstream = self.upstream.clone();
            if let Some(rule) = &marks.dropped_by {
                // The client never saw this answer: a `+OK` did not log it in.
                if l.outcome == crate::audit::LoginEventOutcome::Success {
                    l.outcome = crate::audit::LoginEventOutcome::Dropped;
                }
                l.rule = Some(rule.to_string());
            }
            self.push_tagged(l, &tags);
        }
        let ok = meta.status == Status::Ok;
        match meta.verb {
            Some(v @ (Verb::Retr | Verb::Top)) if meta.multiline => {
                if let (Some(verb), Some(msg)) = (RetrieveVerb::from_verb(v), meta.msg) {
                    self.retrieval = Some(Box::new(Retrieval {
                        verb,
                        msg,
                        lines: meta.lines,
                        octets: 0,
                        headers: HeaderExtractor::new(self.headers.clone()),
                        tags: tags.clone(),
                        scans: Vec::new(),
                    }));
                }
            }
            Some(Verb::Uidl) if meta.multiline => self.uidl_listing = Some(Vec::new()),
            Some(Verb::Uidl) if ok => {
                // "+OK n uid"
                let text = trim_eol(line);
                let mut parts = text.split(|&b| b == b' ').skip(1);
                if let (Some(n), Some(uid)) = (parts.next(), parts.next()) {
                    self.learn_uidl(n, uid);
                }
            }
            Some(Verb::Dele) if ok => {
                if let Some(msg) = meta.msg {
                    if !self.marked.contains(&msg) {
                        self.marked.push(msg);
                    }
                    let uidl = self.uidls.get(&msg).cloned();
                    self.push_tagged(
                        DeleteMarked {
                            user: user_s(),
                            msg: u64::from(msg),
                            no_uidl: self.no_uidl && uidl.is_none(),
                            uidl,
                            message_id: self.message_ids.get(&msg).cloned(),
                        },
                        &tags,
                    );
                }
            }
            Some(Verb::Rset) if ok => {
                self.marked.clear();
                self.push_tagged(Reset { user: user_s() }, &tags);
            }
            // QUIT in TRANSACTION: +OK moved the tracker to UPDATE, -ERR left it there.
            Some(Verb::Quit) if state == State::Update || state == State::Transaction => {
                let deleted = self
                    .marked
                    .iter()
                    .map(|m| {
                        let uidl = self.uidls.get(m).cloned();
                        Deleted {
                            msg: u64::from(*m),
                            no_uidl: self.no_uidl && uidl.is_none(),
                            uidl,
                            message_id: self.message_ids.get(m).cloned(),
                        }
                    })
                    .collect();
                self.push_tagged(
                    Update {
                        user: user_s(),
                        deleted,
                        outcome: UpdateOutcome::from_status(meta.status),
                    },
                    &tags,
                );
            }
            _ => {}
        }
    }

    fn learn_uidl(&mut self, n: &[u8], uid: &[u8]) {
        if let (Some(n), Ok(uid)) = (
            std::str::from_utf8(n).ok().and_then(|s| s.parse().ok()),
            std::str::from_utf8(uid),
        ) {
            self.uidls.insert(n, uid.to_owned());
        }
    }

    /// popgate asked the server `cmd` itself, for the audit trail. The transcript notes it
    /// (the client never sees it, so it is no `C:` line).
    pub fn injected(&mut self, cmd: &crate::pop3::command::Command<'_>) {
        self.note(&format!(
            "popgate asks the server (not relayed): {}",
            cmd.redacted()
        ));
    }

    /// The status line answering a command popgate sent (not relayed).
    pub fn injected_status(&mut self, meta: &ResponseMeta, line: &[u8]) {
        self.note(&format!(
            "server answers popgate (not relayed): {}",
            crate::pop3::printable(line).trim_end()
        ));
        if meta.status != Status::Ok {
            return;
        }
        match (meta.verb, meta.msg) {
            (Some(Verb::Uidl), Some(_)) => {
                let text = trim_eol(line);
                let mut parts = text.split(|&b| b == b' ').skip(1);
                if let (Some(n), Some(uid)) = (parts.next(), parts.next()) {
                    self.learn_uidl(n, uid);
                }
            }
            (Some(Verb::Top), Some(n)) if meta.multiline => {
                let set = HeaderSet::new(&["Message-ID".to_owned()], self.headers.max_bytes());
                self.probe = Some(Box::new((n, HeaderExtractor::new(Arc::new(set)))));
            }
            _ => {}
        }
    }

    /// Body bytes answering a command popgate sent (a `TOP n 0`): read for the Message-ID.
    pub fn injected_body(&mut self, chunk: &[u8], end: bool) {
        if let Some((_, h)) = self.probe.as_deref_mut()
            && !h.is_done()
        {
            h.feed(chunk);
        }
        if end && let Some((n, h)) = self.probe.take().map(|b| *b) {
            let headers = h.finish();
            if let Some((_, id)) = headers.iter().next() {
                self.message_ids.insert(n, id.to_owned());
            }
        }
    }

    /// The server has no UIDL command: records without a `uidl` say so from now on.
    pub fn no_uidl(&mut self) {
        self.note("the server has no UIDL command");
        self.no_uidl = true;
    }

    /// Body bytes as relayed; `end` when they finish the body.
    pub fn body(&mut self, chunk: &[u8], end: bool, user: Option<&str>) {
        self.tap.body(chunk, end);
        self.transcript.server_body(chunk);
        if end {
            self.transcript.server_body_end(true);
        }
        if let Some(r) = self.retrieval.as_mut() {
            r.octets += chunk.len() as u64;
            if !r.headers.is_done() {
                r.headers.feed(chunk);
            }
            if end {
                self.finish_retrieval(true, user);
            }
        } else if let Some(mut partial) = self.uidl_listing.take() {
            for piece in chunk.split_inclusive(|&b| b == b'\n') {
                if partial.len() + piece.len() <= MAX_UIDL_LINE {
                    partial.extend_from_slice(piece);
                } else {
                    partial.clear();
                }
                if piece.ends_with(b"\n") {
                    if let Some(line) = crate::pop3::response::body_line(&partial) {
                        let line = line.to_vec();
                        let mut parts = line.split(|&b| b == b' ');
                        if let (Some(n), Some(uid)) = (parts.next(), parts.next()) {
                            self.learn_uidl(n, uid);
                        }
                    }
                    partial.clear();
                }
            }
            if !end {
                self.uidl_listing = Some(partial);
            }
        }
    }

    fn finish_retrieval(&mut self, complete: bool, user: Option<&str>) {
        if let Some(r) = self.retrieval.take() {
            let uidl = self.uidls.get(&r.msg).cloned();
            let headers = r.headers.finish();
            if let Some((_, id)) = headers
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case("Message-ID"))
            {
                self.message_ids.insert(r.msg, id.to_owned());
            }
            self.push_tagged(
                Retrieve {
                    user: user.map(UserName::from),
                    verb: r.verb,
                    msg: u64::from(r.msg),
                    lines: r.lines.map(u64::from),
                    octets: r.octets,
                    no_uidl: self.no_uidl && uidl.is_none(),
                    uidl,
                    complete,
                    headers,
                },
                &r.tags,
            );
            for mut scan in r.scans {
                scan.uidl = self.uidls.get(&r.msg).cloned();
                scan.no_uidl = self.no_uidl && scan.uidl.is_none();
                scan.message_id = self.message_ids.get(&r.msg).cloned();
                self.push_tagged(scan, &r.tags);
            }
        }
    }

    /// A retrieved message a `scan` rule selected was judged (or let through unscanned):
    /// a transcript note with what the client got, and one `scan` event per report (after
    /// the `retrieve` record of the message).
    pub fn scanned(
        &mut self,
        msg: u32,
        verb: Verb,
        reports: &[ScanReport],
        action: ScanEventAction,
        added: &[u8],
        user: Option<&str>,
    ) {
        let verdicts: Vec<String> = reports
            .iter()
            .map(|r| {
                let mut v = format!("{}={}", r.scanner, r.verdict.as_str());
                if let Some(d) = &r.detail {
                    let d = bounded(d);
                    v.push_str(&format!(" ({})", crate::pop3::printable(d.as_bytes())));
                }
                v
            })
            .collect();
        self.note(&format!(
            "{verb} {msg} scanned: {}; the client got: {}",
            verdicts.join(", "),
            action.as_str()
        ));
        for line in added.split_inclusive(|&b| b == b'\n') {
            self.note(&format!(
                "header line added for the client: {}",
                crate::pop3::printable(line).trim_end()
            ));
        }
        if !self.auditing() {
            return;
        }
        let Some(verb) = RetrieveVerb::from_verb(verb) else {
            return;
        };
        let events = reports.iter().map(|r| ScanEvent {
            user: user.map(UserName::from),
            verb,
            msg: u64::from(msg),
            uidl: None,
            no_uidl: false,
            message_id: None,
            scanner: r.scanner.to_string(),
            verdict: r.verdict,
            name: r.detail.as_deref().map(|d| bounded(d).to_owned()),
            score: r.score.map(|s| s.0),
            required: r.score.map(|s| s.1),
            action,
            duration_ms: u64::try_from(r.duration.as_millis()).unwrap_or(u64::MAX),
        });
        match self.retrieval.as_mut() {
            // Still being relayed: after its `retrieve` record.
            Some(r) if r.msg == msg => r.scans.extend(events),
            _ => {
                let events: Vec<ScanEvent> = events.collect();
                let uidl = self.uidls.get(&msg).cloned();
                let no_uidl = self.no_uidl && uidl.is_none();
                let message_id = self.message_ids.get(&msg).cloned();
                for mut e in events {
                    e.uidl.clone_from(&uidl);
                    e.no_uidl = no_uidl;
                    e.message_id.clone_from(&message_id);
                    self.push(e);
                }
            }
        }
    }

    /// `session_close` (and a `retrieve` with `complete: false` if a body was cut off), with
    /// `marks`: the event tags of what closed it and of the `close` rules, and the rule that
    /// dropped the session, if one did.
    pub fn close(
        &mut self,
        reason: CloseReason,
        user: Option<&str>,
        from_client: u64,
        to_client: u64,
        duration_ms: u64,
        marks: &Marks,
    ) {
        if self.retrieval.is_some() {
            self.transcript.server_body_end(false);
        }
        // A kick's close names who asked (the registry entry knows).
        let kicked_by = if reason == CloseReason::Kick {
            self.tap.kicked_by()
        } else {
            None
        };
        match &kicked_by {
            Some(who) => self.note(&format!("session closed: kicked by {who}")),
            None => self.note(&format!("session closed: {}", reason.as_str())),
        }
        self.transcript.flush();
        if !self.auditing() {
            return;
        }
        self.finish_retrieval(false, user);
        self.push_tagged(
            SessionClose {
                user: user.map(UserName::from),
                reason,
                bytes_from_client: from_client,
                bytes_to_client: to_client,
                duration_ms,
                rule: marks.dropped_by.as_deref().map(str::to_owned),
                kicked_by,
            },
            &strings(&marks.tags),
        );
    }

    /// Emit the queued events (awaits only in `on_overflow = "block"` mode when full).
    pub async fn flush(&mut self) {
        self.transcript.flush();
        if !self.queue.is_empty() {
            // Boxed: the emit future is large and every relay loop awaits `flush`; this way
            // a session only carries it while it has events to emit.
            Box::pin(self.emit_queued()).await;
        }
    }

    async fn emit_queued(&mut self) {
        for ev in self.queue.drain(..) {
            self.sink.emit(ev).await;
        }
        // Events are rare: a session that waits keeps no room for them.
        self.queue = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::audit::{AuditEventKind, Overflow};
    use crate::types::ScanVerdict;

    fn meta(verb: Verb, msg: u32, multiline: bool) -> ResponseMeta {
        ResponseMeta {
            verb: Some(verb),
            msg: Some(msg),
            lines: None,
            status: Status::Ok,
            multiline,
            login: None,
            size: None,
            internal: false,
        }
    }

    fn report(scanner: &str, verdict: ScanVerdict) -> ScanReport {
        ScanReport {
            scanner: Arc::from(scanner),
            verdict,
            detail: Some("Eicar".into()),
            score: Some((9.5, 6.0)),
            duration: Duration::from_millis(12),
        }
    }

    #[test]
    fn scan_events_follow_the_retrieve_record_with_its_uidl_and_message_id() {
        let (sink, _guard) =
            AuditSink::start_with_writer(Box::new(std::io::sink()), 16, Overflow::Drop).unwrap();
        let headers = Arc::new(HeaderSet::new(&["Message-ID".to_owned()], 4096));
        let mut o = Observer::new(sink, headers, 7, Transcript::disabled());
        let m = Marks::default();
        let trx = State::Transaction;
        o.status(&meta(Verb::Uidl, 3, false), b"+OK 3 u-3\r\n", None, trx, &m);
        // Judged after the body (a held message).
        o.status(&meta(Verb::Retr, 3, true), b"+OK\r\n", None, trx, &m);
        o.body(b"Message-ID: <a@b>\r\n\r\nx\r\n.\r\n", true, Some("bob"));
        let reports = [
            report("clamav", ScanVerdict::Infected),
            report("rspamd", ScanVerdict::Spam),
        ];
        o.scanned(
            3,
            Verb::Retr,
            &reports,
            ScanEventAction::Replaced,
            b"",
            Some("bob"),
        );
        // Judged before the body ended (relayed unscanned): written after its record too.
        o.status(&meta(Verb::Retr, 4, true), b"+OK\r\n", None, trx, &m);
        o.scanned(
            4,
            Verb::Retr,
            &[report("clamav", ScanVerdict::TooLarge)],
            ScanEventAction::Unscanned,
            b"X-Popgate-Scan: unscanned (too large)\r\n",
            Some("bob"),
        );
        o.body(b"Message-ID: <c@d>\r\n\r\n", false, None);
        o.body(b"y\r\n.\r\n", true, Some("bob"));
        let kinds: Vec<String> = o
            .queue
            .iter()
            .map(|e| match &e.kind {
                AuditEventKind::Retrieve(r) => format!("retrieve {}", r.msg),
                AuditEventKind::Scan(s) => format!(
                    "scan {} {} {} {} {:?} {:?} {:?} {:?} {}",
                    s.msg,
                    s.scanner,
                    s.verdict.as_str(),
                    s.action.as_str(),
                    s.uidl,
                    s.message_id,
                    s.score,
                    s.required,
                    s.duration_ms
                ),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "retrieve 3",
                "scan 3 clamav infected replaced Some(\"u-3\") Some(\"<a@b>\") Some(9.5) Some(6.0) 12",
                "scan 3 rspamd spam replaced Some(\"u-3\") Some(\"<a@b>\") Some(9.5) Some(6.0) 12",
                "retrieve 4",
                "scan 4 clamav too_large unscanned None Some(\"<c@d>\") Some(9.5) Some(6.0) 12",
            ]
        );
        assert!(o.queue.iter().all(|e| e.user() == Some("bob")));
    }

    #[test]
    fn what_a_scanner_said_is_bounded_at_a_character_boundary() {
        let long = "é".repeat(300);
        let b = bounded(&long);
        assert!(b.len() <= MAX_SCAN_DETAIL && b.len() >= MAX_SCAN_DETAIL - 1);
        assert_eq!(bounded("Eicar"), "Eicar");
    }
}
