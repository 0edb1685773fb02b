//! One proxied POP3 session: the pure [`tracker`] and the task that drives the two sockets.
//!
//! Bytes are forwarded as they arrived unless a decision rewrote them. Multi-line bodies stream
//! through the server read buffer, so memory does not grow with message size. The upstream never
//! receives a QUIT the client did not send: every other way out just closes the upstream socket,
//! and the server, per RFC 1939, deletes nothing.

mod error;
pub mod observer;
pub mod policy;
pub mod tracker;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::{Config, TlsMode, UnknownCommands};
use crate::pop3::capa;
use crate::pop3::command::{Command, Verb, line_end};
use crate::rules::{Event, EventKind, RuleSet, command_line};
use crate::tls::{Stream, TlsInfo, TlsSetup};
pub use error::{SessionError, Side};
use observer::Observer;
use policy::{Policy, Terminal};
use tracker::{AfterReply, ClientLine, Piece, ResponseMeta, State, Tracker};

/// Initial read sizes. Server reads are larger because bodies stream through them.
const CLIENT_READ: usize = 1024;
const SERVER_READ: usize = 16 * 1024;
/// An overlong line is discarded up to its end; past this many lengths of junk, close.
const MAX_DISCARD_FACTOR: usize = 16;
/// A CAPA body is buffered for rewriting; a longer one is a protocol error.
const MAX_CAPA: usize = 64 * 1024;

/// What every session of a proxy shares: configuration and TLS material.
#[derive(Debug)]
pub struct Shared {
    /// The configuration in force.
    pub config: Arc<Config>,
    /// Certificates and upstream TLS client.
    pub tls: TlsSetup,
    /// The rule set new sessions start with (swapped whole on reload).
    pub rules: RwLock<Arc<RuleSet>>,
    /// Where audit events go (a no-op sink when auditing is off).
    pub audit: crate::audit::AuditSink,
    /// Headers the audit trail extracts from retrieved messages.
    pub headers: Arc<crate::audit::HeaderSet>,
    /// Per-IP session caps and the failed-login penalty (`src/limits.rs`).
    pub limiter: crate::limits::Limiter,
}

impl Shared {
    /// The rule set in force now.
    pub fn current_rules(&self) -> Arc<RuleSet> {
        match self.rules.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// Who a session is for, known at accept.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// Unique within this process.
    pub id: u64,
    /// Listener name.
    pub listener: Arc<str>,
    /// Client address.
    pub client: SocketAddr,
    /// Local address the client connected to.
    pub local: SocketAddr,
    /// The listener's client-side TLS mode.
    pub tls_mode: TlsMode,
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent QUIT and the exchange completed.
    Quit,
    /// The client closed its connection without QUIT.
    ClientEof,
    /// The server closed its connection.
    UpstreamEof,
    /// Nothing happened for `limits.idle_timeout`.
    IdleTimeout,
    /// No login within `limits.login_timeout` of connecting.
    LoginTimeout,
    /// The upstream sent no greeting within `limits.greeting_timeout`.
    GreetingTimeout,
    /// popgate is shutting down.
    Shutdown,
    /// A `drop` rule ended the session.
    RuleDrop,
    /// An error on either side.
    Error,
}

impl CloseReason {
    /// snake_case name for logs and audit.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Quit => "quit",
            CloseReason::ClientEof => "client_eof",
            CloseReason::UpstreamEof => "upstream_eof",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::LoginTimeout => "login_timeout",
            CloseReason::GreetingTimeout => "greeting_timeout",
            CloseReason::Shutdown => "shutdown",
            CloseReason::RuleDrop => "rule_drop",
            CloseReason::Error => "error",
        }
    }
}

/// What the proxy does with a client command (the rule engine's hook point).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send upstream: unchanged, or this rewritten line (CRLF included).
    Forward(Option<Vec<u8>>),
    /// Answer locally with this line (CRLF added), never reaching the upstream.
    Reply(String, AfterReply),
    /// Close both sides now, upstream without QUIT.
    Drop,
}

/// Byte counters of a session.
#[derive(Debug, Clone, Copy, Default)]
pub struct Traffic {
    /// Octets read from the client.
    pub from_client: u64,
    /// Octets written to the client.
    pub to_client: u64,
}

fn io_err(side: Side) -> impl FnOnce(std::io::Error) -> SessionError {
    move |source| SessionError::Io { side, source }
}

/// Run a session to its end: TLS handshake (implicit listeners), connect upstream, relay,
/// close. Never sends QUIT on its own.
pub async fn run(
    mut client: Stream,
    info: SessionInfo,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) -> CloseReason {
    let started = Instant::now();
    let config = shared.config.clone();
    if info.tls_mode == TlsMode::Implicit {
        match client_handshake(client, &shared).await {
            Ok(c) => client = c,
            Err(e) => {
                info!(error = %e, "client TLS handshake failed");
                return CloseReason::Error;
            }
        }
    }
    let client_tls = client.tls_info();
    let mut policy = Policy::new(shared.current_rules());
    let connect = policy.evaluate(&Event {
        tls: client.is_tls(),
        ..Event::new(EventKind::Connect, &info.listener, info.client.ip())
    });
    if let Some(d) = connect.delay {
        tokio::time::sleep(d).await;
    }
    match policy.terminal(&connect) {
        Terminal::Pass => {}
        Terminal::Deny { reply, rule, .. } => {
            info!(%rule, "connection denied by rule");
            let _ = client.write_all(format!("{reply}\r\n").as_bytes()).await;
            let _ = client.shutdown().await;
            return CloseReason::RuleDrop;
        }
        Terminal::Drop { rule } => {
            info!(%rule, "connection dropped by rule");
            return CloseReason::RuleDrop;
        }
    }
    let transcript_cfg = &config.audit.transcript;
    let transcript = if transcript_cfg.wants(&info.listener, info.client.ip()) || policy.trace {
        crate::audit::Transcript::open(transcript_cfg, info.id, &info.listener, info.client)
    } else {
        crate::audit::Transcript::disabled()
    };
    let mut observer = Observer::new(
        shared.audit.clone(),
        shared.headers.clone(),
        info.id,
        transcript,
    );
    observer.set_tags(&policy.tags);
    observer.open(&info.listener, info.client, info.local, client_tls.as_ref());
    observer.flush().await;
    let upstream = match crate::upstream::connect(
        &config.upstream,
        shared.tls.upstream.as_ref(),
        config.limits.max_line,
    )
    .await
    {
        Ok(u) => u,
        Err(e) => {
            warn!(error = %e, "upstream unavailable");
            const UNAVAILABLE: &[u8] =
                b"-ERR [SYS/TEMP] upstream server unavailable, try again later\r\n";
            let sent = match client.write_all(UNAVAILABLE).await {
                Ok(()) => UNAVAILABLE.len() as u64,
                Err(_) => 0,
            };
            let _ = client.shutdown().await;
            observer.close(
                CloseReason::Error.as_str(),
                None,
                0,
                sent,
                started.elapsed().as_millis() as u64,
            );
            observer.flush().await;
            return CloseReason::Error;
        }
    };
    let upstream_tls = upstream.stream.tls_info();
    if let Some(t) = &upstream_tls {
        debug!(version = %t.version, cipher = %t.cipher, "upstream TLS established");
        observer.tls(crate::audit::TlsSide::Upstream, t);
    }
    let mut relay = Relay {
        tracker: Tracker::new(config.limits.max_line),
        client,
        upstream: upstream.stream,
        shared,
        config,
        info,
        client_tls,
        upstream_tls,
        cin: BytesMut::new(),
        sin: BytesMut::from(&upstream.preread[..]),
        up_out: Vec::new(),
        discarding: None,
        client_eof: false,
        stls_pending: false,
        capa: None,
        barrier: false,
        policy,
        observer,
        traffic: Traffic::default(),
    };
    let result = relay.relay(shutdown, started).await;
    let reason = match &result {
        Ok(r) => *r,
        Err(e) if e.is_disconnect() => {
            debug!(error = %e, "connection lost");
            if e.side() == Side::Client {
                CloseReason::ClientEof
            } else {
                CloseReason::UpstreamEof
            }
        }
        Err(e) => {
            warn!(error = %e, side = ?e.side(), "session failed");
            CloseReason::Error
        }
    };
    relay.policy.evaluate(&make_event(
        &relay.info,
        &relay.tracker,
        relay.client.is_tls(),
        EventKind::Close,
    ));
    // Upstream: a plain close, never QUIT (unless the client's own QUIT went through).
    if relay.tracker.in_body() || relay.capa.is_some() {
        // A multi-line response was cut: a reset, so that no client takes what it got for a
        // complete message (the terminator was never sent, nor a prefix of it).
        warn!("multi-line response cut; client connection reset");
        std::mem::replace(&mut relay.client, Stream::Detached).abort();
    } else {
        let _ = relay.client.shutdown().await;
    }
    drop(std::mem::replace(&mut relay.upstream, Stream::Detached));
    relay.observer.set_tags(&relay.policy.tags);
    relay.observer.close(
        reason.as_str(),
        relay.tracker.user(),
        relay.traffic.from_client,
        relay.traffic.to_client,
        started.elapsed().as_millis() as u64,
    );
    relay.observer.flush().await;
    info!(
        reason = reason.as_str(),
        user = relay.tracker.user().unwrap_or("-"),
        tags = ?relay.policy.tags,
        client_tls = relay.client_tls.as_ref().map_or("-", |t| t.version.as_str()),
        upstream_tls = relay.upstream_tls.as_ref().map_or("-", |t| t.version.as_str()),
        from_client = relay.traffic.from_client,
        to_client = relay.traffic.to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        "session closed"
    );
    reason
}

/// A rule event with the session's context filled in.
fn make_event<'a>(
    info: &'a SessionInfo,
    tracker: &'a Tracker,
    tls: bool,
    kind: EventKind,
) -> Event<'a> {
    Event {
        tls,
        state: tracker.state(),
        user: tracker.user(),
        ..Event::new(kind, &info.listener, info.client.ip())
    }
}

/// Server side of a client TLS handshake, bounded by `tls.handshake_timeout`.
async fn client_handshake(client: Stream, shared: &Shared) -> Result<Stream, SessionError> {
    let fail = |e: std::io::Error| SessionError::Io {
        side: Side::Client,
        source: e,
    };
    let Some(tls) = shared.tls.server.as_ref() else {
        return Err(fail(std::io::Error::other("no certificate configured")));
    };
    let timeout = shared
        .config
        .tls
        .as_ref()
        .map(|t| t.handshake_timeout)
        .unwrap_or(std::time::Duration::from_secs(30));
    let stream = tokio::time::timeout(timeout, client.accept_tls(tls))
        .await
        .map_err(|_| fail(std::io::ErrorKind::TimedOut.into()))?
        .map_err(fail)?;
    if let Some(t) = stream.tls_info() {
        info!(version = %t.version, cipher = %t.cipher, sni = t.sni.as_deref().unwrap_or("-"), "client TLS established");
    }
    Ok(stream)
}

struct Relay {
    tracker: Tracker,
    client: Stream,
    upstream: Stream,
    shared: Arc<Shared>,
    config: Arc<Config>,
    info: SessionInfo,
    /// Negotiated TLS on each side, for logs (audit events carry them as they happen).
    client_tls: Option<TlsInfo>,
    upstream_tls: Option<TlsInfo>,
    /// Client bytes not yet a complete line.
    cin: BytesMut,
    /// Server bytes not yet relayed.
    sin: BytesMut,
    /// Commands to send upstream in one write.
    up_out: Vec<u8>,
    /// Octets of an overlong client line thrown away so far.
    discarding: Option<usize>,
    client_eof: bool,
    /// STLS was accepted: read nothing more from the client until the handshake.
    stls_pending: bool,
    /// A CAPA response being collected for rewriting.
    capa: Option<Vec<u8>>,
    /// A buffered STLS waits until every earlier response is in (its answer depends on them).
    barrier: bool,
    policy: Policy,
    observer: Observer,
    traffic: Traffic,
}

impl Relay {
    async fn relay(
        &mut self,
        mut shutdown: watch::Receiver<bool>,
        started: Instant,
    ) -> Result<CloseReason, SessionError> {
        let idle = self.config.limits.idle_timeout;
        let mut deadline = Instant::now() + idle;
        // Bytes do not move these two: only a login or a greeting does.
        let login_deadline = started + self.config.limits.login_timeout;
        let greeting_deadline = Instant::now() + self.config.limits.greeting_timeout;
        // The greeting may have been read already (upstream STLS).
        if !self.sin.is_empty()
            && let Some(close) = self.on_server_data().await?
        {
            return Ok(close);
        }
        loop {
            let want_client = !self.client_eof
                && !self.stls_pending
                && !self.barrier
                && !self.tracker.quit_sent()
                && !self.tracker.client_must_wait()
                && self.tracker.pending_len() < self.config.limits.max_pipeline;
            if want_client {
                self.cin.reserve(CLIENT_READ);
            }
            self.sin.reserve(SERVER_READ);
            let mut wake = deadline;
            if self.tracker.state() == State::Authorization {
                wake = wake.min(login_deadline);
            }
            if self.tracker.greeting_due() {
                wake = wake.min(greeting_deadline);
            }
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    if !self.tracker.in_body() && self.tracker.idle() {
                        self.write_client(b"-ERR [SYS/TEMP] proxy shutting down\r\n").await?;
                    }
                    return Ok(CloseReason::Shutdown);
                }
                r = self.upstream.read_buf(&mut self.sin) => {
                    let n = match r {
                        Ok(n) => n,
                        Err(e) => {
                            // A reset or TLS alert (e.g. a refused client certificate): the
                            // client gets a clear answer for what it is waiting on.
                            self.answer_upstream_lost().await;
                            return Err(io_err(Side::Upstream)(e));
                        }
                    };
                    deadline = Instant::now() + idle;
                    if n == 0 {
                        return self.upstream_eof().await;
                    }
                    let closed = self.on_server_data().await?;
                    self.sync_observer().await;
                    if let Some(close) = closed {
                        return Ok(close);
                    }
                    let closed = self.on_client_data().await?;
                    self.sync_observer().await;
                    if let Some(close) = closed {
                        return Ok(close);
                    }
                    if self.client_eof && self.tracker.idle() {
                        return Ok(CloseReason::ClientEof);
                    }
                }
                r = self.client.read_buf(&mut self.cin), if want_client => {
                    let n = r.map_err(io_err(Side::Client))?;
                    deadline = Instant::now() + idle;
                    if n == 0 {
                        self.client_eof = true;
                        debug!("client closed its side");
                        if self.tracker.idle() && !self.tracker.quit_sent() {
                            return Ok(CloseReason::ClientEof);
                        }
                        continue;
                    }
                    self.traffic.from_client += n as u64;
                    let closed = self.on_client_data().await?;
                    self.sync_observer().await;
                    if let Some(close) = closed {
                        return Ok(close);
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    let now = Instant::now();
                    if self.tracker.greeting_due() && now >= greeting_deadline {
                        warn!(timeout = ?self.config.limits.greeting_timeout, "upstream sent no greeting");
                        self.write_client(b"-ERR [SYS/TEMP] upstream server did not answer, try again later\r\n").await?;
                        return Ok(CloseReason::GreetingTimeout);
                    }
                    if self.tracker.state() == State::Authorization && now >= login_deadline {
                        info!(timeout = ?self.config.limits.login_timeout, "no login in time");
                        if !self.tracker.in_body() && self.tracker.idle() {
                            self.write_client(b"-ERR disconnected: no login in time\r\n").await?;
                        }
                        return Ok(CloseReason::LoginTimeout);
                    }
                    if now < deadline {
                        continue;
                    }
                    info!(timeout = ?idle, "idle timeout");
                    if !self.tracker.in_body() && self.tracker.idle() {
                        self.write_client(b"-ERR autologout: idle for too long\r\n").await?;
                    }
                    return Ok(CloseReason::IdleTimeout);
                }
            }
        }
    }

    /// Hand rule tags and trace requests to the observer and emit its queued audit events.
    async fn sync_observer(&mut self) {
        self.observer.set_tags(&self.policy.tags);
        if self.policy.trace {
            self.observer.start_transcript(
                &self.config.audit.transcript,
                &self.info.listener,
                self.info.client,
            );
        }
        self.observer.flush().await;
    }

    async fn write_client(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        self.client
            .write_all(bytes)
            .await
            .map_err(io_err(Side::Client))?;
        self.traffic.to_client += bytes.len() as u64;
        Ok(())
    }

    /// Write the local replies that are due; `Some` if one of them ends the session.
    async fn write_due_locals(&mut self) -> Result<Option<CloseReason>, SessionError> {
        while let Some(local) = self.tracker.next_local() {
            debug!(verb = %local.verb, reply = %crate::pop3::printable(&local.reply).trim_end(), "answered locally");
            self.observer.local_reply(&local.reply);
            self.write_client(&local.reply).await?;
            match local.then {
                AfterReply::Continue => {}
                AfterReply::Close => return Ok(Some(CloseReason::RuleDrop)),
                AfterReply::StartTls => self.start_client_tls().await?,
            }
        }
        Ok(None)
    }

    /// Whether this hop offers STLS right now.
    fn stls_offered(&self) -> bool {
        self.info.tls_mode == TlsMode::Starttls
            && self.shared.tls.server.is_some()
            && !self.client.is_tls()
            && self.tracker.state() == State::Authorization
    }

    /// Decide what to do with a command: rules first, then popgate's own protocol checks
    /// (which no rule can override: STLS is never relayed, unknown shapes are not guessed).
    /// Returns the decision and a tarpit delay to apply first.
    fn decide(&mut self, cmd: &Command<'_>) -> (Decision, Option<std::time::Duration>) {
        let verdict = self.policy.evaluate(&Event {
            verb: Some(cmd.verb),
            args: Some(cmd.args),
            ..make_event(
                &self.info,
                &self.tracker,
                self.client.is_tls(),
                EventKind::Command,
            )
        });
        let delay = verdict.delay;
        match self.policy.terminal(&verdict) {
            Terminal::Pass => {}
            Terminal::Deny { reply, rule, close } => {
                info!(%rule, verb = %cmd.verb, "command denied by rule");
                // The denial carries the tags its own evaluation attached.
                self.observer.set_tags(&self.policy.tags);
                self.observer.denied(&rule, cmd.verb, self.tracker.user());
                let then = if close {
                    AfterReply::Close
                } else {
                    AfterReply::Continue
                };
                return (Decision::Reply(reply, then), delay);
            }
            Terminal::Drop { rule } => {
                info!(%rule, verb = %cmd.verb, "session dropped by rule");
                return (Decision::Drop, delay);
            }
        }
        let reply = |text: &str| Decision::Reply(text.into(), AfterReply::Continue);
        if let Some(why) = self.tracker.refusal(cmd) {
            debug!(verb = %cmd.verb, state = self.tracker.state().as_str(), "command refused: {why}");
            return (reply(why), delay);
        }
        let decision = match cmd.verb {
            Verb::Unknown if self.config.limits.unknown_commands == UnknownCommands::Reject => {
                reply("-ERR unknown command")
            }
            // An unknown command may carry a credential (`PASSsecret`, `XLOGIN user pw`): it
            // is never forwarded where a rule would refuse a password.
            Verb::Unknown if self.credentials_denied() => {
                info!("unknown command refused: credentials are denied here");
                reply("-ERR unknown command")
            }
            // STLS is between the client and this hop; it is never relayed upstream.
            Verb::Stls if self.client.is_tls() => reply("-ERR already under TLS"),
            Verb::Stls if self.tracker.state() != State::Authorization => {
                reply("-ERR STLS is only allowed before login")
            }
            Verb::Stls if !self.stls_offered() => reply("-ERR STLS not available on this listener"),
            Verb::Stls => Decision::Reply("+OK begin TLS negotiation".into(), AfterReply::StartTls),
            _ => Decision::Forward(
                verdict
                    .rewritten
                    .map(|args| command_line(cmd.keyword, &args)),
            ),
        };
        (decision, delay)
    }

    /// Whether a rule would refuse a password now (e.g. `require-tls` on plaintext). Asked
    /// without side effects (no logs, tags or denial counts).
    fn credentials_denied(&self) -> bool {
        self.policy.would_stop(&Event {
            verb: Some(Verb::Pass),
            // Some (empty) arguments: an event without them is a SASL line to the engine.
            args: Some(b""),
            ..make_event(
                &self.info,
                &self.tracker,
                self.client.is_tls(),
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
            b"-ERR line too long\r\n".to_vec(),
            AfterReply::Continue,
        );
    }

    /// The client's STLS was answered `+OK`: drop plaintext that followed it, then handshake.
    async fn start_client_tls(&mut self) -> Result<(), SessionError> {
        if !self.cin.is_empty() {
            // CVE-2011-0411 class: bytes sent before the handshake must not count as commands
            // sent under TLS.
            warn!(
                octets = self.cin.len(),
                "STARTTLS injection attempt: plaintext after STLS discarded"
            );
            self.cin.clear();
        }
        self.discarding = None;
        let plain = std::mem::replace(&mut self.client, Stream::Detached);
        self.client = client_handshake(plain, &self.shared).await?;
        self.client_tls = self.client.tls_info();
        if let Some(t) = &self.client_tls {
            self.observer.tls(crate::audit::TlsSide::Client, t);
        }
        self.stls_pending = false;
        Ok(())
    }

    /// Handle every complete client line in `cin` that may be handled now.
    async fn on_client_data(&mut self) -> Result<Option<CloseReason>, SessionError> {
        let max_line = self.config.limits.max_line;
        self.barrier = false;
        loop {
            if self.tracker.quit_sent() {
                // Nothing after QUIT is forwarded: the server is about to close.
                self.cin.clear();
                break;
            }
            if self.stls_pending
                || self.tracker.client_must_wait()
                || self.tracker.pending_len() >= self.config.limits.max_pipeline
            {
                break;
            }
            if let Some(dropped) = self.discarding {
                match line_end(&self.cin) {
                    Some(n) => {
                        self.cin.advance(n);
                        self.discarding = None;
                        continue;
                    }
                    None => {
                        let total = dropped + self.cin.len();
                        self.cin.clear();
                        if total > MAX_DISCARD_FACTOR * max_line {
                            warn!(octets = total, "endless line from client, closing");
                            return Ok(Some(CloseReason::Error));
                        }
                        self.discarding = Some(total);
                        break;
                    }
                }
            }
            let Some(len) = line_end(&self.cin) else {
                if self.cin.len() > max_line {
                    self.line_too_long();
                    self.discarding = Some(self.cin.len());
                    self.cin.clear();
                    continue;
                }
                break;
            };
            if !self.tracker.idle()
                && matches!(Command::parse(&self.cin[..len]), Ok(c) if c.verb == Verb::Stls)
            {
                // Whether STLS is allowed depends on the outcome of the commands before it.
                self.barrier = true;
                break;
            }
            let line = self.cin.split_to(len);
            if len > max_line + 2 {
                self.line_too_long();
                continue;
            }
            match self.tracker.classify(&line) {
                ClientLine::SaslResponse(data) => {
                    debug!(line = "***", "SASL answer");
                    self.observer.client_sasl();
                    // Rules see SASL lines (to log or drop) but never their content.
                    let v = self.policy.evaluate(&Event {
                        verb: Some(Verb::Auth),
                        ..make_event(
                            &self.info,
                            &self.tracker,
                            self.client.is_tls(),
                            EventKind::Command,
                        )
                    });
                    if let Terminal::Drop { rule } = self.policy.terminal(&v) {
                        info!(%rule, "session dropped by rule");
                        return Ok(Some(CloseReason::RuleDrop));
                    }
                    self.up_out.extend_from_slice(data);
                    self.tracker.forwarded_sasl(data);
                }
                ClientLine::StraySasl => {
                    debug!(line = "***", "line after a refused AUTH discarded");
                    self.observer.client_sasl();
                    self.tracker.answer_locally(
                        Verb::Unknown,
                        b"-ERR no SASL exchange in progress\r\n".to_vec(),
                        AfterReply::Continue,
                    );
                }
                ClientLine::Invalid(e) => {
                    debug!(error = %e, "invalid command");
                    self.tracker.answer_locally(
                        Verb::Unknown,
                        format!("-ERR {e}\r\n").into_bytes(),
                        AfterReply::Continue,
                    );
                }
                ClientLine::Command(cmd) => {
                    debug!(command = %cmd.redacted(), "command");
                    self.observer.client_line(cmd.raw);
                    let (decision, delay) = self.decide(&cmd);
                    if let Some(d) = delay {
                        // Tarpit: what was decided before goes out first.
                        if let Some(close) = self.flush_upstream_and_locals().await? {
                            return Ok(Some(close));
                        }
                        tokio::time::sleep(d).await;
                    }
                    match decision {
                        Decision::Forward(None) => {
                            self.up_out.extend_from_slice(cmd.raw);
                            self.tracker.forwarded(&cmd);
                        }
                        Decision::Forward(Some(line)) => match Command::parse(&line) {
                            Ok(new) if let Some(why) = self.tracker.refusal(&new) => {
                                warn!(command = %new.redacted(), "rule rewrite produced a command not valid now");
                                self.tracker.answer_locally(
                                    cmd.verb,
                                    format!("{why}\r\n").into_bytes(),
                                    AfterReply::Continue,
                                );
                            }
                            // The tracker learns the shape from the command actually sent.
                            Ok(new) => {
                                debug!(command = %new.redacted(), "command rewritten by rule");
                                self.up_out.extend_from_slice(&line);
                                self.tracker.forwarded(&new);
                            }
                            Err(e) => {
                                warn!(error = %e, "rule rewrite produced an invalid command");
                                self.tracker.answer_locally(
                                    cmd.verb,
                                    b"-ERR command rejected\r\n".to_vec(),
                                    AfterReply::Continue,
                                );
                            }
                        },
                        Decision::Drop => return Ok(Some(CloseReason::RuleDrop)),
                        Decision::Reply(text, then) => {
                            let mut reply = text.into_bytes();
                            reply.extend_from_slice(b"\r\n");
                            self.tracker.answer_locally(cmd.verb, reply, then);
                            if then == AfterReply::StartTls {
                                // Whatever else is buffered is plaintext sent before the
                                // handshake: it is discarded, never parsed.
                                self.stls_pending = true;
                                if let Some(close) = self.flush_upstream_and_locals().await? {
                                    return Ok(Some(close));
                                }
                                break;
                            }
                        }
                    }
                }
            }
            // Commands go upstream in one write at the end; a local reply that is due (nothing
            // owed before it) goes out now.
            if self.tracker.local_due()
                && let Some(close) = self.write_due_locals().await?
            {
                return Ok(Some(close));
            }
        }
        self.flush_upstream_and_locals().await
    }

    async fn flush_upstream_and_locals(&mut self) -> Result<Option<CloseReason>, SessionError> {
        if !self.up_out.is_empty() {
            self.upstream
                .write_all(&self.up_out)
                .await
                .map_err(io_err(Side::Upstream))?;
            self.up_out.clear();
        }
        self.write_due_locals().await
    }

    /// Relay every complete piece of server data in `sin`.
    async fn on_server_data(&mut self) -> Result<Option<CloseReason>, SessionError> {
        let mut fwd = 0;
        loop {
            let piece = match self.tracker.on_server_bytes(&self.sin[fwd..]) {
                Ok(p) => p,
                Err(e) => {
                    warn!(error = %e, "upstream broke the protocol");
                    let was_in_body = self.tracker.in_body();
                    self.flush_server(fwd).await?;
                    if !was_in_body {
                        let _ = self
                            .write_client(b"-ERR [SYS/TEMP] upstream protocol error\r\n")
                            .await;
                    }
                    return Err(e.into());
                }
            };
            match piece {
                Piece::NeedMore => break,
                Piece::Status { len, meta } => {
                    self.on_response(&meta, &self.sin[fwd..fwd + len]);
                    let (rewritten, mut delay, drop) = self.response_rules(&meta, fwd, len);
                    // Failed-login penalty per client IP, on top of any rule's delay.
                    if meta.login.as_ref().is_some_and(|l| !l.success)
                        && let Some(p) = self.shared.limiter.login_failed(self.info.client.ip())
                    {
                        delay = Some(delay.unwrap_or_default() + p);
                    }
                    // After the rules, so that a login event carries the tags they attached.
                    self.observer.set_tags(&self.policy.tags);
                    self.observer.status(
                        &meta,
                        &self.sin[fwd..fwd + len],
                        self.tracker.user(),
                        self.tracker.state(),
                    );
                    if drop {
                        self.flush_server(fwd).await?;
                        return Ok(Some(CloseReason::RuleDrop));
                    }
                    if let Some(d) = delay {
                        self.flush_server(fwd).await?;
                        fwd = 0;
                        tokio::time::sleep(d).await;
                    }
                    let capture = meta.multiline && meta.verb == Some(Verb::Capa);
                    if capture || rewritten.is_some() {
                        self.flush_server(fwd).await?;
                        fwd = 0;
                        let original = self.sin.split_to(len);
                        let line = rewritten.unwrap_or_else(|| original.to_vec());
                        if capture {
                            // Collected and rewritten: clients must see this hop's truth.
                            self.capa = Some(line);
                        } else {
                            self.write_client(&line).await?;
                        }
                    } else {
                        fwd += len;
                    }
                }
                Piece::Body { len } | Piece::BodyEnd { len } if self.capa.is_some() => {
                    self.flush_server(fwd).await?;
                    fwd = 0;
                    let chunk = self.sin.split_to(len);
                    let done = matches!(piece, Piece::BodyEnd { .. });
                    if let Some(buf) = self.capa.as_mut() {
                        buf.extend_from_slice(&chunk);
                        if buf.len() > MAX_CAPA {
                            warn!("CAPA response too long");
                            return Err(SessionError::Protocol(
                                tracker::ProtocolError::LineTooLong(MAX_CAPA),
                            ));
                        }
                    }
                    if done && let Some(buf) = self.capa.take() {
                        let out = self.rewrite_capa(&buf);
                        // The transcript shows the list as the client got it.
                        let status_len = line_end(&out).unwrap_or(0);
                        self.observer.body(&out[status_len..], true, None);
                        self.write_client(&out).await?;
                    }
                }
                Piece::Body { len } | Piece::BodyEnd { len } => {
                    let end = matches!(piece, Piece::BodyEnd { .. });
                    self.observer
                        .body(&self.sin[fwd..fwd + len], end, self.tracker.user());
                    fwd += len;
                }
            }
            if self.tracker.local_due() {
                self.flush_server(fwd).await?;
                fwd = 0;
                if let Some(close) = self.write_due_locals().await? {
                    return Ok(Some(close));
                }
            }
        }
        self.flush_server(fwd).await?;
        Ok(None)
    }

    /// Rules on a status line (greeting or response) and on the login it decides.
    /// Returns a rewritten line (CRLF included), a tarpit delay, and whether to drop.
    fn response_rules(
        &mut self,
        meta: &ResponseMeta,
        at: usize,
        len: usize,
    ) -> (Option<Vec<u8>>, Option<std::time::Duration>, bool) {
        let kind = if meta.verb.is_none() {
            EventKind::Greeting
        } else {
            EventKind::Response
        };
        let tls = self.client.is_tls();
        let line = crate::pop3::command::trim_eol(&self.sin[at..at + len]);
        let v = self.policy.evaluate(&Event {
            verb: meta.verb,
            status: Some(meta.status),
            text: Some(line),
            ..make_event(&self.info, &self.tracker, tls, kind)
        });
        let mut delay = v.delay;
        let mut drop = matches!(self.policy.terminal(&v), Terminal::Drop { .. });
        if meta.login.is_some() {
            let lv = self.policy.evaluate(&Event {
                verb: meta.verb,
                status: Some(meta.status),
                ..make_event(&self.info, &self.tracker, tls, EventKind::Login)
            });
            delay = match (delay, lv.delay) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            };
            drop |= matches!(self.policy.terminal(&lv), Terminal::Drop { .. });
        }
        let rewritten = v.rewritten.map(|mut l| {
            l.extend_from_slice(b"\r\n");
            l
        });
        (rewritten, delay, drop)
    }

    /// Rewrite a complete CAPA response (status line + body + terminator) for this hop:
    /// the upstream's STLS is never shown; STLS is offered when this listener can do it.
    fn rewrite_capa(&mut self, response: &[u8]) -> Vec<u8> {
        let status_len = line_end(response).unwrap_or(response.len());
        let (status, body) = response.split_at(status_len);
        let mut items: Vec<Vec<u8>> = Vec::new();
        let tls = self.client.is_tls();
        let with_rules = self.policy.wants(EventKind::Capa);
        for item in capa::items(body) {
            if !with_rules {
                items.push(item.to_vec());
                continue;
            }
            let v = self.policy.evaluate(&Event {
                text: Some(item),
                ..make_event(&self.info, &self.tracker, tls, EventKind::Capa)
            });
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
            let v =
                self.policy
                    .evaluate(&make_event(&self.info, &self.tracker, tls, EventKind::Capa));
            items.extend(v.add_capa.into_iter().map(String::into_bytes));
        }
        // After the rules, so that no rule can advertise STLS where this hop cannot do it.
        items.retain(|i| capa::keyword(i) != "STLS");
        // Only the SASL mechanisms popgate relays (it must learn who logs in).
        let mut items: Vec<Vec<u8>> = items
            .into_iter()
            .filter_map(|i| capa::retain_sasl(i, tracker::sasl_mechanism_supported))
            .collect();
        if self.stls_offered() {
            items.push(b"STLS".to_vec());
        }
        capa::build(status, items.iter().map(Vec::as_slice))
    }

    async fn flush_server(&mut self, n: usize) -> Result<(), SessionError> {
        if n > 0 {
            self.client
                .write_all(&self.sin[..n])
                .await
                .map_err(io_err(Side::Client))?;
            self.traffic.to_client += n as u64;
            self.sin.advance(n);
        }
        Ok(())
    }

    /// The response hook: logging now, rules and audit later.
    fn on_response(&self, meta: &ResponseMeta, line: &[u8]) {
        if let Some(login) = &meta.login {
            info!(
                user = login.user.as_deref().unwrap_or("-"),
                method = %login.method.label(),
                success = login.success,
                "login"
            );
        }
        debug!(
            verb = meta.verb.map(|v| v.as_str()).unwrap_or("greeting"),
            status = meta.status.as_str(),
            line = %crate::pop3::printable(line).trim_end(),
            "response"
        );
    }

    async fn upstream_eof(&mut self) -> Result<CloseReason, SessionError> {
        if self.tracker.in_body() || self.capa.is_some() {
            // Never complete a truncated message: close without the terminating dot.
            warn!("upstream closed in the middle of a multi-line response; closing client");
            return Ok(CloseReason::UpstreamEof);
        }
        if self.tracker.quit_sent() {
            return Ok(CloseReason::Quit);
        }
        self.answer_upstream_lost().await;
        info!("upstream closed the connection");
        Ok(CloseReason::UpstreamEof)
    }

    /// The upstream is gone: answer `-ERR [SYS/TEMP]` if a response is due and none has
    /// started (a partly relayed body is left incomplete on purpose).
    async fn answer_upstream_lost(&mut self) {
        if !self.tracker.in_body() && self.capa.is_none() && !self.tracker.idle() {
            let _ = self
                .write_client(b"-ERR [SYS/TEMP] upstream server closed the connection\r\n")
                .await;
        }
    }
}
