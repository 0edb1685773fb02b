//! The sequence over an upstream's addresses, with no I/O and no clock: which address to dial
//! next, when to fail over, which address is dead or alive again, the connect timeout per
//! address, and a routed login's deadlines (the reply timeout per replayed line, or the
//! bearer login bounded as a whole, token fetches included). One [`Dialogue`] per address
//! does the talking.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{ConnectStage, Dialogue, Failure, Notice, Plan, Reason, Replay, Step};

/// The time limits of a [`Connector`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectTimeouts {
    /// `upstream.connect_timeout`: per address, from the dial to the end of the set-up.
    pub(crate) connect: Duration,
    /// `upstream.dead_for`: how long an address that failed over is skipped.
    pub(crate) dead_for: Duration,
    /// A login's reply timeout: per replayed line, or for the whole bearer login (token
    /// fetches included). `None`: no limit (the caller bounds the login).
    pub(crate) reply: Option<Duration>,
}

/// What the driver does next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ConnectStep {
    /// Close the connection there is, if any (without a word), open a TCP connection to this
    /// address (`host:port`, as configured) with `TCP_NODELAY`; then
    /// [`Connector::dialled`] or [`Connector::dial_failed`].
    Dial(String),
    /// Write (and flush) these bytes to the server; on an error [`Connector::write_failed`].
    Write(Vec<u8>),
    /// Run the client TLS handshake on the connection (for the address dialled last); then
    /// [`Connector::tls_done`] or [`Connector::tls_failed`].
    StartTls,
    /// The server refused the bearer token once: get a fresh one, then
    /// [`Connector::fresh_token`] or [`Connector::token_failed`].
    FetchToken,
    /// Something worth a log line.
    Notice(Notice),
    /// Skip this address until then (the shared `DeadAddresses`).
    MarkDead {
        /// The address, as configured.
        address: String,
        /// Until when.
        until: Instant,
    },
    /// This address answered: it is alive again.
    MarkAlive(String),
    /// The end: the last step.
    End(ConnectEnd),
}

/// How a [`Connector`] ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ConnectEnd {
    /// Set up, no login in the plan: relay over the connection.
    Connected {
        /// The address that answered.
        address: String,
        /// The server bytes read during the set-up, to be relayed first.
        preread: Vec<u8>,
    },
    /// The plan's login succeeded.
    LoggedIn {
        /// The address that answered.
        address: String,
        /// The server's final `+OK` line (CRLF included): the reply to the client's login.
        reply: Vec<u8>,
        /// Bytes the server sent after it (normally none).
        rest: Vec<u8>,
    },
    /// It failed; the connection is closed without QUIT.
    Failed(ConnectFailure),
}

/// Why a [`Connector`] failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ConnectFailure {
    /// The upstream could not be had: the last address tried, where it failed and why (the
    /// client is told the upstream is unavailable).
    Unavailable {
        /// The address (empty when none is configured).
        address: String,
        /// Where: a login's failure after the set-up is [`ConnectStage::Setup`].
        stage: ConnectStage,
        /// Why.
        reason: Reason,
    },
    /// The server answered a login step `-ERR`: that line (CRLF included) is the reply.
    Refused(Vec<u8>),
    /// The server refused a fresh bearer token too: its `-ERR` line.
    TokenRefused(Vec<u8>),
    /// The server answered the bearer login with something unexpected: its line.
    BearerUnexpected(Vec<u8>),
    /// The driver could not get a fresh token ([`Connector::token_failed`]; it knows why).
    NoFreshToken,
}

#[derive(Debug)]
enum Phase {
    /// `Dial` is out.
    Dialling,
    /// The address's set-up: within the connect timeout, failing over.
    Setup(Dialogue),
    /// The plan's login, after the set-up: within the reply timeout, no failover.
    Login(Dialogue),
    /// Over.
    Done,
}

/// One upstream connection's way from the first dial to the relay: its addresses in order,
/// each with a fresh [`Dialogue`] within the connect timeout, failing over where
/// [`ConnectStage::fails_over`] says, then the plan's login (if any) within its reply timeout.
///
/// # Calling contract
///
/// 1. [`Connector::new`] with the plan, the addresses in the order `DeadAddresses::order`
///    gave at `now`, the timeouts and `now` (or [`Connector::login_only`] on a connection
///    whose greeting was read: no dial, no set-up).
/// 2. Call [`Connector::poll`] until it returns `None`, carrying out each [`ConnectStep`] in
///    order, each answered with the event its doc names, with the time it happened:
///    `Dial` (`dialled`/`dial_failed`), `Write` (`write_failed` on an error), `StartTls`
///    (`tls_done`/`tls_failed`), `FetchToken` (`fresh_token`/`token_failed`), `Notice` (log
///    it), `MarkDead`/`MarkAlive` (apply them to `DeadAddresses`), `End` (the last step).
/// 3. When `poll` returns `None` before the end, read from the connection:
///    [`Connector::on_server_bytes`], [`Connector::on_server_eof`] or
///    [`Connector::read_failed`]; then poll again.
/// 4. Throughout, race whatever the driver waits for (a dial, a write, a handshake, a token,
///    a read) with the instant [`Connector::poll_timeout`] reports (asked again after every
///    call); when it comes, abandon that and call [`Connector::on_timeout`] (which does
///    nothing when called early), then poll. A timeout during an address's set-up fails over
///    as a TCP failure does: the address is marked dead, the next one dialled.
///
/// No credential byte is written before the set-up is over (with STLS: before `tls_done`).
/// Events that do not fit the state (late, or after the end) change nothing.
#[derive(Debug)]
pub(crate) struct Connector {
    plan: Plan,
    addresses: Vec<String>,
    /// The address being tried (index into `addresses`).
    at: usize,
    timeouts: ConnectTimeouts,
    phase: Phase,
    deadline: Option<Instant>,
    out: VecDeque<ConnectStep>,
}

impl Connector {
    /// Dial `addresses` in this order (the live ones first, as `DeadAddresses::order` has
    /// them) and run `plan` on the first that answers; the first `Dial` is due at `now`.
    pub(crate) fn new(
        plan: Plan,
        addresses: Vec<String>,
        timeouts: ConnectTimeouts,
        now: Instant,
    ) -> Connector {
        let mut c = Connector {
            plan,
            addresses,
            at: 0,
            timeouts,
            phase: Phase::Done,
            deadline: None,
            out: VecDeque::new(),
        };
        if c.addresses.is_empty() {
            c.end(ConnectEnd::Failed(ConnectFailure::Unavailable {
                address: String::new(),
                stage: ConnectStage::Tcp,
                reason: Reason::NoAddress,
            }));
        } else {
            c.dial(now);
        }
        c
    }

    /// The login alone, on a connection whose greeting was read (and was `+OK`): no dial, no
    /// set-up, no failover; `reply` bounds it as [`ConnectTimeouts::reply`] says, from `now`.
    pub(crate) fn login_only(
        login: Replay,
        max_line: usize,
        reply: Option<Duration>,
        now: Instant,
    ) -> Connector {
        let dialogue = Dialogue::login_only(login.clone(), max_line);
        let mut c = Connector {
            plan: Plan::login_only(login, max_line),
            addresses: vec![String::new()],
            at: 0,
            timeouts: ConnectTimeouts {
                connect: Duration::ZERO,
                dead_for: Duration::ZERO,
                reply,
            },
            phase: Phase::Login(dialogue),
            deadline: None,
            out: VecDeque::new(),
        };
        c.deadline = reply.map(|r| now + r);
        c.pump(now);
        c
    }

    /// The next thing to do, `None` when the connector waits for an event.
    pub(crate) fn poll(&mut self) -> Option<ConnectStep> {
        self.out.pop_front()
    }

    /// When [`Connector::on_timeout`] is due, if ever.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Done => None,
            _ => self.deadline,
        }
    }

    /// Whether it waits for the server (a connection is up, its set-up or login under way):
    /// the driver reads while it does.
    pub(crate) fn reading(&self) -> bool {
        matches!(self.phase, Phase::Setup(_) | Phase::Login(_))
    }

    /// Whether it is over (the `End` step is out or queued).
    #[cfg(test)]
    pub(crate) fn finished(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// The instant [`Connector::poll_timeout`] reported came: the set-up of the current
    /// address timed out (fail over), or the login did (no failover). Early: nothing.
    pub(crate) fn on_timeout(&mut self, now: Instant) {
        if self.deadline.is_none_or(|d| now < d) {
            return;
        }
        match self.phase {
            Phase::Dialling | Phase::Setup(_) => {
                let reason = Reason::Timeout(self.timeouts.connect);
                self.broke(now, ConnectStage::Timeout, reason);
            }
            Phase::Login(_) => {
                let within = self.timeouts.reply.unwrap_or_default();
                let reason = if self.bearer() {
                    Reason::BearerTimeout(within)
                } else {
                    Reason::NoReply(within)
                };
                self.unavailable(ConnectStage::Setup, reason);
            }
            Phase::Done => {}
        }
    }

    /// The `Dial` succeeded: the set-up starts.
    pub(crate) fn dialled(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Dialling) {
            self.phase = Phase::Setup(Dialogue::new(self.plan.clone()));
            self.pump(now);
        }
    }

    /// The `Dial` failed (the TCP connect or a socket option): fail over.
    pub(crate) fn dial_failed(&mut self, now: Instant, error: &dyn std::fmt::Display) {
        if matches!(self.phase, Phase::Dialling) {
            self.broke(now, ConnectStage::Tcp, Reason::Tcp(error.to_string()));
        }
    }

    /// The last `Write` failed.
    pub(crate) fn write_failed(&mut self, now: Instant, error: &dyn std::fmt::Display) {
        self.feed(now, |d| d.write_failed(error));
    }

    /// The handshake of `StartTls` completed.
    pub(crate) fn tls_done(&mut self, now: Instant) {
        self.feed(now, Dialogue::tls_done);
    }

    /// The handshake of `StartTls` failed (no failover: a misconfiguration is not hidden).
    pub(crate) fn tls_failed(&mut self, now: Instant, error: &dyn std::fmt::Display) {
        self.feed(now, |d| d.tls_failed(error));
    }

    /// A fresh access token for `FetchToken`: the bearer login starts over with it.
    pub(crate) fn fresh_token(&mut self, now: Instant, token: String) {
        self.feed(now, |d| d.fresh_token(token));
    }

    /// No fresh token for `FetchToken`: the login fails ([`ConnectFailure::NoFreshToken`]).
    pub(crate) fn token_failed(&mut self) {
        if matches!(self.phase, Phase::Login(_)) {
            self.end(ConnectEnd::Failed(ConnectFailure::NoFreshToken));
        }
    }

    /// Bytes from the server.
    pub(crate) fn on_server_bytes(&mut self, now: Instant, bytes: &[u8]) {
        self.feed(now, |d| d.on_server_bytes(bytes));
    }

    /// The server closed the connection.
    pub(crate) fn on_server_eof(&mut self, now: Instant) {
        self.feed(now, Dialogue::on_server_eof);
    }

    /// Reading from the server failed.
    pub(crate) fn read_failed(&mut self, now: Instant, error: &dyn std::fmt::Display) {
        self.feed(now, |d| d.read_failed(error));
    }

    fn bearer(&self) -> bool {
        matches!(self.plan.login, Some(Replay::Bearer(_)))
    }

    fn address(&self) -> String {
        self.addresses.get(self.at).cloned().unwrap_or_default()
    }

    /// Hand an event to the current address's dialogue, then take its steps.
    fn feed(&mut self, now: Instant, event: impl FnOnce(&mut Dialogue)) {
        match &mut self.phase {
            Phase::Setup(d) | Phase::Login(d) => event(d),
            Phase::Dialling | Phase::Done => return,
        }
        self.pump(now);
    }

    /// Dial the current address within the connect timeout.
    fn dial(&mut self, now: Instant) {
        self.phase = Phase::Dialling;
        self.deadline = Some(now + self.timeouts.connect);
        self.out.push_back(ConnectStep::Dial(self.address()));
    }

    /// The dialogue's steps, in order, as the connector's.
    fn pump(&mut self, now: Instant) {
        loop {
            let step = match &mut self.phase {
                Phase::Setup(d) | Phase::Login(d) => d.poll(),
                Phase::Dialling | Phase::Done => None,
            };
            let Some(step) = step else { return };
            match step {
                Step::Write(bytes) => {
                    // A replayed line's answer is awaited the reply timeout from its write.
                    if matches!(self.phase, Phase::Login(_)) && !self.bearer() {
                        self.deadline = self.timeouts.reply.map(|r| now + r);
                    }
                    self.out.push_back(ConnectStep::Write(bytes));
                }
                Step::StartTls => self.out.push_back(ConnectStep::StartTls),
                Step::FetchToken => self.out.push_back(ConnectStep::FetchToken),
                Step::Notice(n) => self.out.push_back(ConnectStep::Notice(n)),
                Step::Connected => self.connected(now),
                Step::LoggedIn { reply, rest } => {
                    let address = self.address();
                    self.end(ConnectEnd::LoggedIn {
                        address,
                        reply,
                        rest,
                    });
                }
                Step::Failed(failure) => self.failed(now, failure),
            }
        }
    }

    /// The set-up is over: the address is alive; the relay or the login is next.
    fn connected(&mut self, now: Instant) {
        let phase = std::mem::replace(&mut self.phase, Phase::Done);
        let Phase::Setup(mut d) = phase else {
            self.phase = phase;
            return;
        };
        self.out.push_back(ConnectStep::MarkAlive(self.address()));
        if self.plan.login.is_none() {
            let preread = d.take_preread();
            let address = self.address();
            self.end(ConnectEnd::Connected { address, preread });
            return;
        }
        // The login's own clock: the whole bearer login, or the first replayed line.
        self.deadline = self.timeouts.reply.map(|r| now + r);
        self.phase = Phase::Login(d);
    }

    fn failed(&mut self, now: Instant, failure: Failure) {
        let setup = !matches!(self.phase, Phase::Login(_));
        match failure {
            Failure::Broken { stage, reason } if setup => self.broke(now, stage, reason),
            // After the set-up the connection is the login's: no stage of its own.
            Failure::Broken { reason, .. } => self.unavailable(ConnectStage::Setup, reason),
            Failure::Refused(line) => self.end(ConnectEnd::Failed(ConnectFailure::Refused(line))),
            Failure::TokenRefused(line) => {
                self.end(ConnectEnd::Failed(ConnectFailure::TokenRefused(line)));
            }
            Failure::BearerUnexpected(line) => {
                self.end(ConnectEnd::Failed(ConnectFailure::BearerUnexpected(line)));
            }
        }
    }

    /// The current address failed during its set-up: fail over (marking it dead) if the
    /// stage says so and another address is left, else that is the end.
    fn broke(&mut self, now: Instant, stage: ConnectStage, reason: Reason) {
        self.abandon();
        if !stage.fails_over() {
            self.unavailable(stage, reason);
            return;
        }
        let address = self.address();
        self.out.push_back(ConnectStep::MarkDead {
            address: address.clone(),
            until: now + self.timeouts.dead_for,
        });
        if self.at + 1 >= self.addresses.len() {
            self.unavailable(stage, reason);
            return;
        }
        self.out.push_back(ConnectStep::Notice(Notice::FailingOver {
            address,
            error: reason.to_string(),
        }));
        self.at += 1;
        self.dial(now);
    }

    fn unavailable(&mut self, stage: ConnectStage, reason: Reason) {
        let address = self.address();
        self.end(ConnectEnd::Failed(ConnectFailure::Unavailable {
            address,
            stage,
            reason,
        }));
    }

    /// The connection is given up: what was still to be done on it is not (a handshake or a
    /// write queued behind the one that timed out).
    fn abandon(&mut self) {
        self.out.retain(|s| {
            !matches!(
                s,
                ConnectStep::Write(_) | ConnectStep::StartTls | ConnectStep::FetchToken
            )
        });
    }

    fn end(&mut self, end: ConnectEnd) {
        // Connected: the PROXY header queued before it still goes out.
        if matches!(end, ConnectEnd::Failed(_)) {
            self.abandon();
        }
        self.phase = Phase::Done;
        self.deadline = None;
        self.out.push_back(ConnectStep::End(end));
    }
}
