//! The per-session side of the audit trail and traffic transcripts.
//!
//! The relay calls it at each protocol step; it turns what the tracker says into audit events
//! (queued, then emitted by [`Observer::flush`] so the relay decides where to await) and
//! transcript lines. With audit off and no transcript, every call returns at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::audit::{
    AuditEvent, AuditSink, CloseReason, DeleteMarked, Deleted, Denied, HeaderExtractor, HeaderSet,
    Login, Reset, Retrieve, RetrieveVerb, SessionClose, SessionOpen, TlsEvent, TlsInfo, TlsSide,
    Transcript, TranscriptConfig, Update, UpdateOutcome,
};
use crate::pop3::command::{Verb, trim_eol};
use crate::pop3::response::{Status, StatusLine};

use crate::pop3::tracker::{ResponseMeta, State};

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
}

/// Audit and transcript state of one session.
#[derive(Debug)]
pub struct Observer {
    sink: AuditSink,
    headers: Arc<HeaderSet>,
    session: u64,
    queue: Vec<AuditEvent>,
    tags: Vec<String>,
    retrieval: Option<Retrieval>,
    /// Partial line of a UIDL listing being relayed.
    uidl_listing: Option<Vec<u8>>,
    uidls: HashMap<u32, String>,
    marked: Vec<u32>,
    transcript: Transcript,
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
            marked: Vec::new(),
            transcript,
        }
    }

    fn auditing(&self) -> bool {
        self.sink.is_enabled()
    }

    fn push(&mut self, kind: impl Into<crate::audit::EventKind>) {
        let ev = AuditEvent::new(self.session, kind).with_tags(self.tags.iter().cloned());
        self.queue.push(ev);
    }

    /// Rule tags so far; they appear on every event from now on.
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

    /// `session_open`.
    pub fn open(
        &mut self,
        listener: &str,
        client: SocketAddr,
        local: SocketAddr,
        proxy: Option<SocketAddr>,
        tls: Option<&TlsInfo>,
    ) {
        if let Some(p) = proxy {
            self.transcript
                .note(&format!("client {client} via proxy {p}"));
        }
        if self.auditing() {
            self.push(SessionOpen {
                listener: listener.to_owned(),
                client,
                local,
                proxy,
                client_tls: tls.cloned(),
            });
        }
    }

    /// `tls`: a handshake completed on one side.
    pub fn tls(&mut self, side: TlsSide, tls: &TlsInfo) {
        self.transcript.note(&format!(
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
    }

    /// A SASL answer: never its content.
    pub fn client_sasl(&mut self) {
        self.transcript.client_sasl();
    }

    /// A reply popgate gave itself.
    pub fn local_reply(&mut self, reply: &[u8]) {
        self.transcript.note("local reply follows");
        self.transcript.server_line(reply);
    }

    /// `denied`.
    pub fn denied(&mut self, rule: &str, verb: Verb, user: Option<&str>) {
        if self.auditing() {
            self.push(Denied::new(rule, verb, user));
        }
    }

    /// A status line from the server with what the tracker made of it. `state` is the
    /// tracker's state after the line.
    pub fn status(&mut self, meta: &ResponseMeta, line: &[u8], user: Option<&str>, state: State) {
        self.transcript.server_line(line);
        if !self.auditing() {
            return;
        }
        let user_s = || user.map(str::to_owned);
        if let Some(login) = &meta.login {
            let code = StatusLine::parse(line).ok().and_then(|s| s.code);
            self.push(Login::new(
                login.user.as_deref(),
                &login.method,
                meta.status,
                code,
            ));
        }
        let ok = meta.status == Status::Ok;
        match meta.verb {
            Some(v @ (Verb::Retr | Verb::Top)) if meta.multiline => {
                if let (Some(verb), Some(msg)) = (RetrieveVerb::from_verb(v), meta.msg) {
                    self.retrieval = Some(Retrieval {
                        verb,
                        msg,
                        lines: meta.lines,
                        octets: 0,
                        headers: HeaderExtractor::new(self.headers.clone()),
                    });
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
                    self.push(DeleteMarked {
                        user: user_s(),
                        msg: u64::from(msg),
                        uidl,
                    });
                }
            }
            Some(Verb::Rset) if ok => {
                self.marked.clear();
                self.push(Reset { user: user_s() });
            }
            // QUIT in TRANSACTION: +OK moved the tracker to UPDATE, -ERR left it there.
            Some(Verb::Quit) if state == State::Update || state == State::Transaction => {
                let deleted = self
                    .marked
                    .iter()
                    .map(|m| Deleted {
                        msg: u64::from(*m),
                        uidl: self.uidls.get(m).cloned(),
                    })
                    .collect();
                self.push(Update {
                    user: user_s(),
                    deleted,
                    outcome: UpdateOutcome::from_status(meta.status),
                });
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

    /// Body bytes as relayed; `end` when they finish the body.
    pub fn body(&mut self, chunk: &[u8], end: bool, user: Option<&str>) {
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
            self.push(Retrieve {
                user: user.map(str::to_owned),
                verb: r.verb,
                msg: u64::from(r.msg),
                lines: r.lines.map(u64::from),
                octets: r.octets,
                uidl,
                complete,
                headers: r.headers.finish(),
            });
        }
    }

    /// `session_close` (and a `retrieve` with `complete: false` if a body was cut off).
    pub fn close(
        &mut self,
        reason: CloseReason,
        user: Option<&str>,
        from_client: u64,
        to_client: u64,
        duration_ms: u64,
    ) {
        if self.retrieval.is_some() {
            self.transcript.server_body_end(false);
        }
        self.transcript
            .note(&format!("session closed: {}", reason.as_str()));
        self.transcript.flush();
        if !self.auditing() {
            return;
        }
        self.finish_retrieval(false, user);
        self.push(SessionClose {
            user: user.map(str::to_owned),
            reason,
            bytes_from_client: from_client,
            bytes_to_client: to_client,
            duration_ms,
        });
    }

    /// Emit the queued events (awaits only in `on_overflow = "block"` mode when full).
    pub async fn flush(&mut self) {
        self.transcript.flush();
        for ev in self.queue.drain(..) {
            self.sink.emit(ev).await;
        }
    }
}
