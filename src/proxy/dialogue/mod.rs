//! The upstream dialogue, with no I/O and no clock: everything popgate says to a POP3 server
//! before the relay starts. The PROXY header, the greeting, STLS (RFC 2595), Dovecot's XCLIENT,
//! and in routing mode the login: the client's USER/PASS or SASL lines replayed, or the OAuth2
//! bridge's `AUTH XOAUTH2`/`OAUTHBEARER` with a bearer token. Server bytes and the outcome of
//! what the driver did (a write, a TLS handshake, a token fetch) go in as events; what to do
//! next comes out as [`Step`]s. Around it, the [`Connector`]: the sequence over an upstream's
//! addresses (which next, failover, dead and alive marks, the connect timeout) and a routed
//! login's deadlines and token fetches, with time as an input. Its drivers
//! (`net::upstream::drive` for the set-up and the OAuth2 bridge's own login, and for routing
//! mode's login the session machine, [`Session::connect_login`], whose outputs the relay loop
//! and the session simulator carry out) only dial, move bytes, run handshakes, fetch tokens
//! and feed timer expiries.
//!
//! [`Session::connect_login`]: crate::proxy::Session::connect_login
//!
//! The calling contracts are on [`Connector`] and [`Dialogue`].

mod bearer;
mod connector;
mod lines;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::time::Duration;

pub(crate) use bearer::Bearer;
pub(crate) use connector::{ConnectEnd, ConnectFailure, ConnectStep, ConnectTimeouts, Connector};
use lines::Lines;

use crate::config::TlsMode;
use crate::pop3::capa::offers_xclient;
use crate::pop3::response::{Status, StatusLine};
use crate::proxy::front::Method;

/// The step of the upstream set-up that failed (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectStage {
    /// Resolving the name or the TCP connect.
    Tcp,
    /// POP3 before or after the handshake: the PROXY header, the greeting, `STLS`, `XCLIENT`.
    Setup,
    /// A TLS handshake.
    Tls,
    /// `upstream.connect_timeout` ran out (at whichever step).
    Timeout,
}

impl ConnectStage {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectStage::Tcp => "tcp",
            ConnectStage::Setup => "setup",
            ConnectStage::Tls => "tls",
            ConnectStage::Timeout => "timeout",
        }
    }

    /// Whether a failure at this stage fails over to the upstream's next address (and marks
    /// this one dead). A TLS or protocol failure does not: failing over would hide a
    /// misconfiguration, and the next server would most likely refuse the same way.
    pub fn fails_over(self) -> bool {
        matches!(self, ConnectStage::Tcp | ConnectStage::Timeout)
    }
}

/// What to do on a new upstream connection: the same for every address of a session's upstream.
#[derive(Clone)]
pub(crate) struct Plan {
    /// Plain, STLS or implicit TLS.
    pub(crate) tls: TlsMode,
    /// Whether upstream TLS is configured (without it a plan that needs TLS fails there).
    pub(crate) tls_configured: bool,
    /// A PROXY header to send first.
    pub(crate) proxy_header: Option<Vec<u8>>,
    /// The XCLIENT line to send if the greeting offers XCLIENT.
    pub(crate) xclient: Option<Vec<u8>>,
    /// Read the greeting during the set-up (always with STLS, XCLIENT or a login).
    pub(crate) read_greeting: bool,
    /// Longest server line.
    pub(crate) max_line: usize,
    /// The login to run after the set-up (routing mode).
    pub(crate) login: Option<Replay>,
}

impl Plan {
    /// The plan of a login alone on a connection already set up (greeting read): no TLS, no
    /// PROXY header or XCLIENT, nothing read first.
    pub(crate) fn login_only(login: Replay, max_line: usize) -> Plan {
        Plan {
            tls: TlsMode::None,
            tls_configured: false,
            proxy_header: None,
            xclient: None,
            read_greeting: false,
            max_line,
            login: Some(login),
        }
    }
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("tls", &self.tls)
            .field("proxy_header", &self.proxy_header.is_some())
            .field("xclient", &self.xclient.is_some())
            .field("read_greeting", &self.read_greeting)
            .field("login", &self.login)
            .finish_non_exhaustive()
    }
}

/// A login run upstream.
#[derive(Clone)]
pub(crate) enum Replay {
    /// The client's own login lines (CRLF included), in order: every one but the last must be
    /// answered `+OK` (USER/PASS) or `+ ` (a SASL step).
    Lines {
        /// How the client logged in.
        method: Method,
        /// The lines.
        lines: Vec<Vec<u8>>,
    },
    /// The OAuth2 bridge's bearer login.
    Bearer(Bearer),
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Replay::Lines { method, lines } => f
                .debug_struct("Lines")
                .field("method", method)
                .field("lines", &lines.len())
                .finish(),
            Replay::Bearer(b) => b.fmt(f),
        }
    }
}

/// What the driver does next.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Write (and flush) these bytes to the server.
    Write(Vec<u8>),
    /// Start TLS on the connection (client side).
    StartTls,
    /// The server refused the bearer token once: get a fresh one.
    FetchToken,
    /// Something worth a log line.
    Notice(Notice),
    /// The set-up is done.
    Connected,
    /// The login succeeded.
    LoggedIn {
        /// The server's final `+OK` line (CRLF included): the reply to the client's login.
        reply: Vec<u8>,
        /// Bytes the server sent after it (normally none).
        rest: Vec<u8>,
    },
    /// The dialogue failed; the connection is closed without QUIT.
    Failed(Failure),
}

/// Things the driver logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Notice {
    /// Plaintext after `+OK` to STLS: discarded (it would be taken as TLS-protected).
    StlsInjection {
        /// How many bytes.
        octets: usize,
    },
    /// The server sent data after its XCLIENT reply under TLS: discarded.
    XclientTrailing {
        /// How many bytes.
        octets: usize,
    },
    /// `forward_client = "xclient"` but the greeting does not offer it.
    XclientNotOffered {
        /// Whether the greeting was `+OK` (a refusal says nothing about XCLIENT).
        greeting_ok: bool,
    },
    /// The server took the XCLIENT.
    XclientPassed,
    /// An address failed at a stage that fails over (marked dead): the next one is tried.
    FailingOver {
        /// The address, as configured.
        address: String,
        /// Why it failed (the [`Reason`]'s text).
        error: String,
    },
}

/// How the dialogue failed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// The connection or the dialogue broke (the client is told the upstream is unavailable).
    Broken {
        /// Where.
        stage: ConnectStage,
        /// Why.
        reason: Reason,
    },
    /// The server answered a login step `-ERR`: that line (CRLF included) is the reply.
    Refused(Vec<u8>),
    /// The server refused a fresh bearer token too: its `-ERR` line.
    TokenRefused(Vec<u8>),
    /// The server answered the bearer login with something unexpected (the mechanism is not
    /// offered?): its line.
    BearerUnexpected(Vec<u8>),
}

/// Why the connection or the dialogue broke. `Display` is the log and metrics text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Reason {
    /// The TCP connect (or a socket option) failed.
    #[error("{0}")]
    Tcp(String),
    /// The upstream has no address to dial.
    #[error("no address configured")]
    NoAddress,
    /// The set-up timed out.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// A login answer did not come in time.
    #[error("no reply within {0:?}")]
    NoReply(Duration),
    /// The bearer login did not end in time.
    #[error("no OAuth2 login within {0:?}")]
    BearerTimeout(Duration),
    /// Writing the PROXY header failed.
    #[error("sending the PROXY header: {0}")]
    SendProxyHeader(String),
    /// Writing STLS failed.
    #[error("{0}")]
    SendStls(String),
    /// Writing XCLIENT failed.
    #[error("sending XCLIENT: {0}")]
    SendXclient(String),
    /// Writing a login line failed.
    #[error("sending the login: {0}")]
    SendLogin(String),
    /// Reading failed.
    #[error("{0}")]
    Read(String),
    /// The server closed.
    #[error("connection closed during connection setup")]
    Closed,
    /// A server line longer than `limits.max_line`.
    #[error("overlong line from upstream")]
    Overlong,
    /// Upstream TLS is needed but not configured.
    #[error("upstream TLS is not configured")]
    TlsNotConfigured,
    /// A TLS handshake failed.
    #[error("TLS handshake{}: {error}", if *.after_stls { " after STLS" } else { "" })]
    Handshake {
        /// After STLS (else implicit TLS).
        after_stls: bool,
        /// The handshake's error.
        error: String,
    },
    /// The greeting is not `+OK` (where the dialogue goes on after it).
    #[error("greeting is not +OK: {}", shown(.0))]
    GreetingNotOk(Vec<u8>),
    /// The server refused STLS (never a fall back to plaintext).
    #[error("server refused STLS: {}", shown(.0))]
    StlsRefused(Vec<u8>),
    /// The server refused XCLIENT.
    #[error("server refused XCLIENT: {}", shown(.0))]
    XclientRefused(Vec<u8>),
    /// Bytes after the greeting before the bearer login.
    #[error("unexpected bytes after the greeting")]
    BytesAfterGreeting,
    /// Bytes nobody asked for before a login line: they would be taken for its answer.
    #[error("the server spoke out of turn: {}", shown(.0))]
    OutOfTurn(Vec<u8>),
    /// An answer to a login line that is neither the next step nor an end.
    #[error("unexpected reply to the login: {}", shown(.0))]
    UnexpectedLoginReply(Vec<u8>),
    /// The bearer login's connection broke.
    #[error("during the OAuth2 login: {0}")]
    Bearer(String),
}

/// A server line for a log: lossy UTF-8, without its line end.
fn shown(line: &[u8]) -> String {
    String::from_utf8_lossy(line).trim_end().to_owned()
}

/// What was written last (names a write failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writing {
    ProxyHeader,
    Stls,
    Xclient,
    Login,
    Bearer,
}

/// Where the bearer login is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BearerState {
    /// `AUTH <MECH>` is out.
    Auth,
    /// The token is out.
    Token,
    /// The dummy answer to an error challenge is out.
    Dummy,
    /// Waiting for a fresh token.
    FetchingToken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A TLS handshake is running (implicit, or after STLS).
    Handshake { after_stls: bool },
    /// The greeting is due.
    Greeting,
    /// STLS is out.
    Stls,
    /// XCLIENT is out.
    Xclient { after_stls: bool },
    /// Set-up done; the login reads the greeting again from what was read.
    LoginGreeting,
    /// Login line `sent` is out.
    Replay { sent: usize },
    /// The bearer login.
    Bearer(BearerState),
    /// Over (connected without a login, logged in, or failed).
    Finished,
}

/// One upstream connection's dialogue, from the TCP connect to the relay (or, with
/// [`Dialogue::login_only`], a login on a connection whose greeting was read). Its driver is
/// the [`Connector`], one dialogue per address it dials.
///
/// # Calling contract
///
/// 1. Dial TCP, then [`Dialogue::new`] with the session's [`Plan`].
/// 2. Call [`Dialogue::poll`] until it returns `None`, carrying out each [`Step`] in order:
///    - [`Step::Write`]: write and flush the bytes; on an error call [`Dialogue::write_failed`]
///      and poll on (the failure comes out);
///    - [`Step::StartTls`]: run the client TLS handshake on the connection, then
///      [`Dialogue::tls_done`] or [`Dialogue::tls_failed`];
///    - [`Step::FetchToken`]: get a fresh access token, then [`Dialogue::fresh_token`] (or give
///      up: the driver's own error);
///    - [`Step::Notice`]: log it;
///    - [`Step::Connected`]: the set-up is done (the connect timeout stops here; an address
///      that got this far counts as alive). Without a login in the plan the dialogue is over:
///      [`Dialogue::take_preread`] has the server bytes read so far, to be relayed first;
///    - [`Step::LoggedIn`] and [`Step::Failed`] end the dialogue.
/// 3. When `poll` returns `None` and the dialogue is not over ([`Dialogue::finished`]), read
///    from the server: [`Dialogue::on_server_bytes`], [`Dialogue::on_server_eof`] or
///    [`Dialogue::read_failed`]; then poll again.
///
/// Timeouts are the driver's (the [`Connector`]'s): it ends the dialogue itself. No event
/// after the end changes anything. Nothing the plan holds for the login is written before
/// [`Step::Connected`], so with STLS no credential byte goes out before the handshake.
#[derive(Debug)]
struct Dialogue {
    plan: Plan,
    state: State,
    lines: Lines,
    /// The first greeting (XCLIENT's offer; with STLS the bytes relayed first).
    greeting: Vec<u8>,
    /// With no login: the server bytes to relay first, once connected.
    preread: Vec<u8>,
    out: VecDeque<Step>,
    writing: Writing,
    /// The bearer token was refused once already.
    retried: bool,
}

impl Dialogue {
    /// The dialogue on a fresh TCP connection.
    pub(crate) fn new(plan: Plan) -> Dialogue {
        let mut d = Dialogue {
            lines: Lines::new(plan.max_line),
            plan,
            state: State::Greeting,
            greeting: Vec::new(),
            preread: Vec::new(),
            out: VecDeque::new(),
            writing: Writing::ProxyHeader,
            retried: false,
        };
        // A PROXY header goes first, before the greeting and before any TLS handshake.
        if let Some(header) = d.plan.proxy_header.clone() {
            d.write(Writing::ProxyHeader, header);
        }
        match d.plan.tls {
            TlsMode::Implicit => d.start_tls(false),
            TlsMode::Starttls => {}
            TlsMode::None => d.after_tls(false),
        }
        d
    }

    /// The login alone, on a connection whose greeting was read (and was `+OK`): the
    /// dialogue starts at the login's first write, as after [`Step::Connected`].
    pub(crate) fn login_only(login: Replay, max_line: usize) -> Dialogue {
        let mut d = Dialogue {
            lines: Lines::new(max_line),
            plan: Plan::login_only(login, max_line),
            state: State::LoginGreeting,
            greeting: Vec::new(),
            preread: Vec::new(),
            out: VecDeque::new(),
            writing: Writing::Login,
            retried: false,
        };
        d.start_login();
        d
    }

    /// The next thing to do, `None` when the dialogue waits for an event.
    pub(crate) fn poll(&mut self) -> Option<Step> {
        self.out.pop_front()
    }

    /// Whether the dialogue is over (nothing more to read).
    pub(crate) fn finished(&self) -> bool {
        self.state == State::Finished
    }

    /// After [`Step::Connected`] without a login: the server bytes read so far (the greeting
    /// and what followed, or with STLS the first greeting), to be relayed first.
    pub(crate) fn take_preread(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.preread)
    }

    /// Bytes from the server.
    pub(crate) fn on_server_bytes(&mut self, bytes: &[u8]) {
        if self.finished() {
            return;
        }
        self.lines.push(bytes);
        self.advance();
    }

    /// The server closed the connection.
    pub(crate) fn on_server_eof(&mut self) {
        if self.finished() {
            return;
        }
        let reason = match self.state {
            State::Bearer(_) => Reason::Bearer("early eof".into()),
            _ => Reason::Closed,
        };
        self.fail(ConnectStage::Setup, reason);
    }

    /// Reading from the server failed.
    pub(crate) fn read_failed(&mut self, error: &dyn std::fmt::Display) {
        if self.finished() {
            return;
        }
        let reason = match self.state {
            State::Bearer(_) => Reason::Bearer(error.to_string()),
            _ => Reason::Read(error.to_string()),
        };
        self.fail(ConnectStage::Setup, reason);
    }

    /// The last [`Step::Write`] failed.
    pub(crate) fn write_failed(&mut self, error: &dyn std::fmt::Display) {
        if self.finished() {
            return;
        }
        let e = error.to_string();
        let reason = match self.writing {
            Writing::ProxyHeader => Reason::SendProxyHeader(e),
            Writing::Stls => Reason::SendStls(e),
            Writing::Xclient => Reason::SendXclient(e),
            Writing::Login => Reason::SendLogin(e),
            Writing::Bearer => Reason::Bearer(e),
        };
        self.fail(ConnectStage::Setup, reason);
    }

    /// The TLS handshake of [`Step::StartTls`] completed.
    pub(crate) fn tls_done(&mut self) {
        if let State::Handshake { after_stls } = self.state {
            self.after_tls(after_stls);
            self.advance();
        }
    }

    /// The TLS handshake of [`Step::StartTls`] failed.
    pub(crate) fn tls_failed(&mut self, error: &dyn std::fmt::Display) {
        if let State::Handshake { after_stls } = self.state {
            let reason = Reason::Handshake {
                after_stls,
                error: error.to_string(),
            };
            self.fail(ConnectStage::Tls, reason);
        }
    }

    /// A fresh access token for [`Step::FetchToken`]: the bearer login starts over with it.
    pub(crate) fn fresh_token(&mut self, token: String) {
        if self.state != State::Bearer(BearerState::FetchingToken) {
            return;
        }
        if !self.lines.is_empty() {
            // Sent before the fresh token was: they would be taken for its answers (a `+OK`
            // logging the client in on a token the server never saw).
            let early = self.lines.take();
            self.fail(ConnectStage::Setup, Reason::OutOfTurn(early));
            return;
        }
        let Some(Replay::Bearer(b)) = &mut self.plan.login else {
            return;
        };
        b.token = token;
        let command = b.command().to_vec();
        self.write(Writing::Bearer, command);
        self.state = State::Bearer(BearerState::Auth);
        self.advance();
    }

    fn write(&mut self, what: Writing, bytes: Vec<u8>) {
        self.writing = what;
        self.out.push_back(Step::Write(bytes));
    }

    fn fail(&mut self, stage: ConnectStage, reason: Reason) {
        self.end(Step::Failed(Failure::Broken { stage, reason }));
    }

    fn end(&mut self, step: Step) {
        self.state = State::Finished;
        self.out.push_back(step);
    }

    fn start_tls(&mut self, after_stls: bool) {
        if !self.plan.tls_configured {
            self.fail(ConnectStage::Tls, Reason::TlsNotConfigured);
            return;
        }
        self.out.push_back(Step::StartTls);
        self.state = State::Handshake { after_stls };
    }

    /// Plain TCP, or TLS up: what comes next.
    fn after_tls(&mut self, after_stls: bool) {
        if after_stls {
            // As Dovecot's own proxy does: XCLIENT under TLS, if the first greeting offered it.
            if self.plan.xclient.is_some() {
                self.xclient(true);
            } else {
                self.connected();
            }
        } else if self.plan.xclient.is_none()
            && !self.plan.read_greeting
            && self.plan.login.is_none()
        {
            // The session reads the greeting itself.
            self.connected();
        } else {
            self.state = State::Greeting;
        }
    }

    /// Handle every complete line the state can take.
    fn advance(&mut self) {
        while matches!(
            self.state,
            State::Greeting
                | State::Stls
                | State::Xclient { .. }
                | State::LoginGreeting
                | State::Replay { .. }
                | State::Bearer(BearerState::Auth | BearerState::Token | BearerState::Dummy)
        ) {
            let line = match self.lines.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => return,
                Err(_) => {
                    let reason = match self.state {
                        State::Bearer(_) => {
                            Reason::Bearer("upstream line too long during AUTH".into())
                        }
                        _ => Reason::Overlong,
                    };
                    self.fail(ConnectStage::Setup, reason);
                    return;
                }
            };
            self.line(line);
        }
    }

    fn line(&mut self, line: Vec<u8>) {
        let status = StatusLine::parse(&line).ok().map(|s| s.status);
        match self.state {
            State::Greeting if self.plan.tls == TlsMode::Starttls => {
                if status != Some(Status::Ok) {
                    self.fail(ConnectStage::Setup, Reason::GreetingNotOk(line));
                    return;
                }
                self.greeting = line;
                self.write(Writing::Stls, b"STLS\r\n".to_vec());
                self.state = State::Stls;
            }
            State::Greeting => {
                self.greeting = line;
                if self.plan.xclient.is_some() {
                    self.xclient(false);
                } else {
                    self.connected();
                }
            }
            State::Stls => {
                if status != Some(Status::Ok) {
                    self.fail(ConnectStage::Setup, Reason::StlsRefused(line));
                    return;
                }
                if !self.lines.is_empty() {
                    let octets = self.lines.take().len();
                    self.out
                        .push_back(Step::Notice(Notice::StlsInjection { octets }));
                }
                self.start_tls(true);
            }
            State::Xclient { after_stls } => {
                if status != Some(Status::Ok) {
                    self.fail(ConnectStage::Setup, Reason::XclientRefused(line));
                    return;
                }
                self.out.push_back(Step::Notice(Notice::XclientPassed));
                if after_stls && !self.lines.is_empty() {
                    let octets = self.lines.take().len();
                    self.out
                        .push_back(Step::Notice(Notice::XclientTrailing { octets }));
                }
                self.connected();
            }
            State::LoginGreeting => self.login_greeting(line, status),
            State::Replay { sent } => self.replay_answer(sent, line, status),
            State::Bearer(b) => self.bearer_answer(b, line, status),
            State::Handshake { .. } | State::Finished => {}
        }
    }

    /// Send XCLIENT if the first greeting offers it.
    fn xclient(&mut self, after_stls: bool) {
        match &self.plan.xclient {
            Some(line) if offers_xclient(&self.greeting) => {
                let line = line.clone();
                self.write(Writing::Xclient, line);
                self.state = State::Xclient { after_stls };
            }
            _ => {
                let greeting_ok = self.greeting.starts_with(b"+OK");
                self.out
                    .push_back(Step::Notice(Notice::XclientNotOffered { greeting_ok }));
                self.connected();
            }
        }
    }

    /// The set-up is done: relay (no login) or log in.
    fn connected(&mut self) {
        self.out.push_back(Step::Connected);
        // With STLS the first greeting is relayed; what came after the handshake (nothing
        // asked for) is not. Else the greeting and whatever followed it.
        let mut preread = std::mem::take(&mut self.greeting);
        if self.plan.tls == TlsMode::Starttls {
            self.lines.take();
        } else {
            preread.extend_from_slice(&self.lines.take());
        }
        if self.plan.login.is_none() {
            self.preread = preread;
            self.state = State::Finished;
            return;
        }
        // The login reads the greeting from there.
        self.lines.unread(preread);
        self.state = State::LoginGreeting;
    }

    fn login_greeting(&mut self, line: Vec<u8>, status: Option<Status>) {
        if status != Some(Status::Ok) {
            self.fail(ConnectStage::Setup, Reason::GreetingNotOk(line));
            return;
        }
        self.start_login();
    }

    /// After an `+OK` greeting: the login's first write.
    fn start_login(&mut self) {
        match &self.plan.login {
            Some(Replay::Bearer(b)) => {
                if !self.lines.is_empty() {
                    self.fail(ConnectStage::Setup, Reason::BytesAfterGreeting);
                    return;
                }
                let command = b.command().to_vec();
                self.lines.set_max(bearer::MAX_LINE);
                self.write(Writing::Bearer, command);
                self.state = State::Bearer(BearerState::Auth);
            }
            Some(Replay::Lines { .. }) => self.send_login_line(0),
            None => self.state = State::Finished,
        }
    }

    fn send_login_line(&mut self, i: usize) {
        let Some(Replay::Lines { lines, .. }) = &self.plan.login else {
            return;
        };
        let Some(line) = lines.get(i).cloned() else {
            // No login line at all: nothing to log in with.
            self.fail(
                ConnectStage::Setup,
                Reason::UnexpectedLoginReply(Vec::new()),
            );
            return;
        };
        if !self.lines.is_empty() {
            // A line nobody asked for would be taken for the answer to this step (USER's
            // `+OK` for PASS's, logging the client in on a refused password).
            let early = self.lines.take();
            self.fail(ConnectStage::Setup, Reason::OutOfTurn(early));
            return;
        }
        self.write(Writing::Login, line);
        self.state = State::Replay { sent: i };
    }

    fn replay_answer(&mut self, sent: usize, line: Vec<u8>, status: Option<Status>) {
        let Some(Replay::Lines { method, lines }) = &self.plan.login else {
            return;
        };
        let more = sent + 1 < lines.len();
        let sasl = *method != Method::UserPass;
        match status {
            // USER's +OK, or a SASL challenge: the next step.
            Some(Status::Ok) if more && !sasl => self.send_login_line(sent + 1),
            Some(Status::Continue) if more && sasl => self.send_login_line(sent + 1),
            Some(Status::Ok) => self.logged_in(line),
            Some(Status::Err) => self.end(Step::Failed(Failure::Refused(line))),
            Some(Status::Continue) | None => {
                self.fail(ConnectStage::Setup, Reason::UnexpectedLoginReply(line));
            }
        }
    }

    fn logged_in(&mut self, reply: Vec<u8>) {
        let rest = self.lines.take();
        self.end(Step::LoggedIn { reply, rest });
    }

    fn bearer_answer(&mut self, state: BearerState, line: Vec<u8>, status: Option<Status>) {
        let Some(Replay::Bearer(b)) = &self.plan.login else {
            return;
        };
        match (state, status) {
            (BearerState::Auth, Some(Status::Continue)) => {
                let response = b.response();
                self.write(Writing::Bearer, response);
                self.state = State::Bearer(BearerState::Token);
            }
            (BearerState::Token | BearerState::Dummy, Some(Status::Ok)) => self.logged_in(line),
            (BearerState::Token | BearerState::Dummy, Some(Status::Err)) if !self.retried => {
                // A token revoked at the server before its expiry: once more with a fresh one.
                self.retried = true;
                self.out.push_back(Step::FetchToken);
                self.state = State::Bearer(BearerState::FetchingToken);
            }
            (BearerState::Token | BearerState::Dummy, Some(Status::Err)) => {
                self.end(Step::Failed(Failure::TokenRefused(line)));
            }
            (BearerState::Token, Some(Status::Continue)) => {
                // The error challenge (base64 JSON): answer it, the -ERR follows.
                let dummy = b.dummy().to_vec();
                self.write(Writing::Bearer, dummy);
                self.state = State::Bearer(BearerState::Dummy);
            }
            _ => self.end(Step::Failed(Failure::BearerUnexpected(line))),
        }
    }
}
