//! One session's machine, no I/O: the [`Hop`] (the relay) and, in routing mode until the login
//! succeeded upstream, the [`Front`] that stands in for the server. The machine does the
//! sequencing between them that the driver used to do: what the hop sends "upstream" goes to
//! the front, the front's answers come back to the hop as server input, a complete login comes
//! out as [`Output::Login`] for the driver to route. Every upstream connector is the session's
//! own: direct mode's set-up ([`Session::connect_upstream`], before the relay), the re-dial
//! after the client's STLS ([`Session::redial_upstream`]) and the routed login
//! ([`Session::connect_login`]). Their dials, writes, handshakes and token fetches come out as
//! outputs, the server's bytes and the timer come in as events, and at the end the session
//! starts the relay (or goes over to the new connection), answers the client (the
//! "unavailable" reply, a login's `-ERR`), or stays where it was. A QUIT the front answered
//! ends the session as a server's close would.
//!
//! The calling contract is on [`Session`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tracing::debug;

use super::connect::{Opened, Opening};
use super::dialogue::{ConnectEnd, ConnectFailure, ConnectStage, ConnectStep, Connector, Reason};
use super::front::Front;
use super::{DeadMark, Hop, Output, SessionEvent, UpstreamEnd, UpstreamPurpose};
use crate::pop3::replies;
use crate::types::CloseReason;

/// One session: the hop, and in routing mode the front until the login is routed.
///
/// # Calling contract
///
/// The hop's contract (see [`Hop`]), with the session in its place:
/// 1. [`Session::new`] with the hop and, in routing mode, the front; [`Session::opening`]
///    with the connect phase (the `connect` rules' verdict: [`SessionStage::Opening`], the
///    client read meanwhile, bounded; a read error goes to [`Session::on_client_error`]);
///    then [`Session::start`] (`sin` and `cin` empty: the buffers the driver reads into). When
///    the phase lets the session in, routing mode greets and direct mode asks for its
///    upstream ([`Output::ConnectUpstream`], answered with [`Session::connect_upstream`]:
///    [`SessionStage::SettingUp`]); the relay ([`SessionStage::Relaying`]) starts with the
///    greeting and the client bytes kept. Without the opening: [`Session::connect_upstream`]
///    (direct mode) before [`Session::start`], whose `sin` holds server bytes already read
///    and `cin` client bytes kept, as if read just after.
/// 2. Feed what happens: [`Session::on_client_input`], [`Session::on_server_input`] (never
///    while [`Session::wants_server_input`] is false: in routing mode before the login there
///    is no upstream to read), [`Session::on_client_eof`], [`Session::on_upstream_eof`],
///    [`Session::on_upstream_error`], [`Session::on_shutdown`], [`Session::on_timeout`],
///    [`Session::client_tls_started`] after the handshake an [`Output::StartClientTls`]
///    asked for.
/// 3. After every call drain [`Session::poll_event`] (answering a
///    [`SessionEvent::LoginFailed`] with [`Session::penalty`]), then
///    [`Session::poll_output`] (it takes the clock and the buffers: in routing mode the
///    front's answers go to the hop from there), carrying the outputs out in order.
///    [`Output::Login`]: route the login and build the chosen upstream's [`Connector`] (with
///    the login's replay, or the OAuth2 bridge's bearer login, in its plan), then
///    [`Session::connect_login`]; if it cannot be routed (the bridge refused the password),
///    [`Session::login_failed`] with the line that answers the client's login command.
///    [`Output::RedialUpstream`]: build the connector for a second connection (the client's
///    TLS in its PROXY header) and hand it over with [`Session::redial_upstream`] (or not:
///    the session stays on the first connection).
/// 4. While a connector is out ([`Session::connecting`]: the set-up, the re-dial, the routed
///    login) the session talks to the upstream through its outputs: [`Output::Dial`]
///    (answered with [`Session::dialled`] or [`Session::dial_failed`]), [`Output::ToUpstream`]
///    (on an error [`Session::upstream_write_failed`]), [`Output::StartUpstreamTls`]
///    ([`Session::upstream_tls_done`]/[`Session::upstream_tls_failed`]),
///    [`Output::FetchToken`] ([`Session::fresh_token`]/[`Session::token_failed`]),
///    [`Output::MarkDead`], [`Output::MarkAlive`], [`Output::UpstreamNotice`]; the server's
///    bytes, its end and read errors come in as in the relay (from the re-dial's pending
///    connection while it is out). Whatever the driver waits for meanwhile (a dial, a
///    handshake, a token) is raced with [`Session::poll_timeout`], shutdown, and the client
///    while [`Session::wants_client_input`] (the set-up only: its bytes are kept, bounded as
///    the connect phase bounds them, for the relay; its end ends the session at once, or
///    after the relay has answered those bytes when there are some: a half-close). At the
///    end [`Output::UpstreamEnded`] says how it went, for the driver's records (logs,
///    metrics) and its connection slots: the set-up starts the relay or answers the client
///    with the "unavailable" line and closes; the re-dial goes over to the new connection
///    or stays on the first; the login goes over to the upstream or answers the client (the
///    server's `-ERR`, the "unavailable" line; for [`UpstreamEnd::Bridge`] the driver
///    answers with [`Session::login_failed`] and the bridge's reply). A shutdown while a
///    connector is out: [`Session::on_shutdown`] (it is abandoned, the upstream closed
///    without QUIT; in the set-up the client gets the shutdown's `-ERR`).
/// 5. Wait for the client while [`Session::wants_client_input`], the upstream while
///    [`Session::wants_server_input`], the instant [`Session::poll_timeout`], and shutdown.
///    While a connector is out the deadline is the connector's alone (the connect and reply
///    timeouts); the hop's own timeouts resume with the relay. During the re-dial and the
///    routed login the client is not read: it waits for popgate.
/// 6. At the end, [`Session::hop`] for the close record ([`Hop::finish`] and the rest).
#[derive(Debug)]
pub(crate) struct Session {
    hop: Hop,
    /// Routing mode until the login succeeded upstream: the stand-in server.
    front: Option<Box<Front>>,
    /// Outputs of the session's own, ahead of the hop's: a login to route, the client bytes
    /// the front kept for the real upstream.
    out: VecDeque<Output>,
    /// Direct mode with `forward_client = "proxy-v2"`: the server is dialled again after the
    /// client's STLS ([`Output::RedialUpstream`]).
    redial_after_stls: bool,
    /// The client's TLS is up and no command went upstream since.
    redial_due: bool,
    /// The command held back for the connection dialled again after STLS (it goes out on
    /// whichever connection the session ends up on).
    redial_held: Option<Bytes>,
    /// From the hand-over of a connector to its end: the connector (whose steps come out as
    /// the session's outputs) and what it is for.
    upstream: Option<Box<(UpstreamPurpose, Connector)>>,
    /// Direct mode's set-up: [`Session::start`] was called (the relay starts at its end).
    started: bool,
    /// The connect phase ([`Session::opening`]): a `connect` rule's delay and verdict, until
    /// it ends.
    opening: Option<Box<Opening>>,
    /// Where the session is on its way to the relay.
    stage: SessionStage,
    /// Client bytes kept during the set-up (the driver's buffer), and the bound on them.
    early: (usize, usize),
    /// The client closed its side during the set-up after sending commands (a half-close, as
    /// `printf ... | nc -N` does): they are relayed, then the relay is told of the close.
    early_eof: bool,
    /// What the front was sent and what it answered (for the session simulator's checks).
    #[cfg(any(test, feature = "fuzzing"))]
    front_traffic: (Vec<u8>, Vec<u8>),
}

impl Session {
    /// A session around `hop`; in routing mode with the `front` that greets the client.
    pub(crate) fn new(hop: Hop, front: Option<Front>) -> Session {
        let limit = hop.early_input_limit();
        Session {
            hop,
            front: front.map(Box::new),
            out: VecDeque::new(),
            redial_after_stls: false,
            redial_due: false,
            redial_held: None,
            upstream: None,
            started: false,
            opening: None,
            stage: SessionStage::Relaying,
            early: (0, limit),
            early_eof: false,
            #[cfg(any(test, feature = "fuzzing"))]
            front_traffic: (Vec::new(), Vec::new()),
        }
    }

    /// Direct mode with `forward_client = "proxy-v2"` (and not intercepting): the upstream
    /// was dialled before the client's STLS with a header that said "plaintext", and a server
    /// such as Dovecot (`disable_plaintext_auth = yes`) would keep refusing plaintext logins.
    /// So after the STLS, before the first command goes upstream, [`Output::RedialUpstream`]
    /// comes out: unless that command is APOP, whose digest hashes the first connection's
    /// greeting (the server is then not told about TLS), or QUIT (nothing is dialled only to
    /// carry it). The commands about to go out are
    /// the only ones pending (the STLS waited for every earlier answer).
    pub(crate) fn redialling_after_stls(mut self, on: bool) -> Session {
        self.redial_after_stls = on && self.front.is_none();
        self
    }

    /// The session starts with the connect phase: `opening` (the `connect` rules' verdict,
    /// with a rule's delay as a deadline) runs first, the client read meanwhile (bounded),
    /// a hang-up or a shutdown ending it at once. When it lets the session in, routing mode
    /// greets with the front's line, direct mode asks for the upstream's connector
    /// ([`Output::ConnectUpstream`]); when it refuses, the rule's reply (if any) and the
    /// close come out. Before [`Session::start`].
    pub(crate) fn opening(&mut self, opening: Opening) {
        if !self.started {
            self.opening = Some(Box::new(opening));
            self.stage = SessionStage::Opening;
        }
    }

    /// Where the session is on its way to the relay (for the driver's records of a session
    /// that ends before it).
    pub(crate) fn stage(&self) -> SessionStage {
        self.stage
    }

    /// Direct mode: the session starts by connecting the upstream with `connector` (its plan
    /// without a login, its addresses in the order the dead marks give): its steps come out
    /// of [`Session::poll_output`] once [`Session::start`] was called, the client is read
    /// meanwhile (bounded), and the relay starts at its end with the greeting if it was read.
    ///
    /// After the connect phase, the answer to [`Output::ConnectUpstream`].
    pub(crate) fn connect_upstream(&mut self, connector: Connector) {
        let due =
            !self.started || (self.stage == SessionStage::SettingUp && self.opening.is_none());
        if self.front.is_none() && self.upstream.is_none() && due {
            self.upstream = Some(Box::new((UpstreamPurpose::Setup, connector)));
            self.stage = SessionStage::SettingUp;
        }
    }

    /// The session starts: the front's greeting (routing mode) or what was read from the
    /// server during the set-up (`sin`) goes to the hop, then what the client sent during
    /// the connect phase (`cin`, kept by [`Opening`](super::connect::Opening)), as if it had
    /// been read just after. With [`Session::connect_upstream`], the set-up comes first:
    /// the client's bytes stay in `cin` until its end.
    pub(crate) fn start(&mut self, now: Instant, sin: &mut BytesMut, cin: &mut BytesMut) {
        self.started = true;
        if let Some(opening) = self.opening.as_mut() {
            opening.on_client_input(cin.len());
            return;
        }
        if self.connecting() == Some(UpstreamPurpose::Setup) {
            self.early.0 = cin.len();
            return;
        }
        self.greet(now, sin, cin);
    }

    /// Routing mode greets with the front's line; the relay starts.
    fn greet(&mut self, now: Instant, sin: &mut BytesMut, cin: &mut BytesMut) {
        if let Some(front) = self.front.as_mut() {
            let greeting = front.take_output();
            #[cfg(any(test, feature = "fuzzing"))]
            self.front_traffic.1.extend_from_slice(&greeting);
            sin.extend_from_slice(&greeting);
        }
        self.relay_starts(now, sin, cin);
    }

    fn relay_starts(&mut self, now: Instant, sin: &mut BytesMut, cin: &mut BytesMut) {
        if !sin.is_empty() {
            self.hop.on_server_input(now, sin, cin);
        }
        if !cin.is_empty() && self.hop.wants_client_input() {
            self.hop.on_client_input(now, cin);
        }
        if std::mem::take(&mut self.early_eof) {
            self.hop.on_client_eof();
        }
    }

    /// The relay, for what the session does not change (its state, user, tags, the close
    /// record).
    pub(crate) fn hop(&self) -> &Hop {
        &self.hop
    }

    /// The relay, to be told what the driver decided (e.g. how the routed server compares
    /// user names) and to finish.
    pub(crate) fn hop_mut(&mut self) -> &mut Hop {
        &mut self.hop
    }

    /// Whether the front still stands in for the server (routing mode before the login).
    #[cfg(test)]
    pub(crate) fn routing(&self) -> bool {
        self.front.is_some()
    }

    /// Bytes arrived from the client (appended to `cin`). During the set-up they are kept
    /// there for the relay.
    pub(crate) fn on_client_input(&mut self, now: Instant, cin: &mut BytesMut) {
        if let Some(opening) = self.opening.as_mut() {
            opening.on_client_input(cin.len());
            return;
        }
        if self.connecting() == Some(UpstreamPurpose::Setup) {
            self.early.0 = cin.len();
            return;
        }
        self.hop.on_client_input(now, cin);
    }

    /// Bytes arrived from the upstream (appended to `sin`). While a connector is out they
    /// are its own (it keeps what it has not used; `sin` is emptied).
    pub(crate) fn on_server_input(&mut self, now: Instant, sin: &mut BytesMut, cin: &mut BytesMut) {
        if let Some(c) = self.connector() {
            c.on_server_bytes(now, sin);
            sin.clear();
            return;
        }
        self.hop.on_server_input(now, sin, cin);
    }

    /// The client closed its sending side. During the set-up the session ends at once:
    /// nothing more is dialled, nothing was sent.
    pub(crate) fn on_client_eof(&mut self) {
        if let Some(opening) = self.opening.as_mut() {
            opening.on_client_eof();
            return;
        }
        if self.connecting() == Some(UpstreamPurpose::Setup) {
            if self.early.0 > 0 {
                // Commands, then the client's FIN: TCP cannot tell a half-close from a
                // hang-up, and the relay answers a half-closed client; so does the set-up.
                debug!("the client closed its side after sending commands; the set-up goes on");
                self.early_eof = true;
                return;
            }
            self.upstream = None;
            debug!("the client hung up while the upstream was being connected");
            self.hop.close_before_relay(None, CloseReason::ClientEof);
            return;
        }
        self.hop.on_client_eof();
    }

    /// Reading from the client failed before the relay (in the connect phase);
    /// `disconnect` for an ordinary one. `false`: the session is past it, and the driver ends
    /// the session as a failed read in the relay does.
    pub(crate) fn on_client_error(&mut self, disconnect: bool) -> bool {
        match self.opening.as_mut() {
            Some(opening) => {
                opening.on_client_error(disconnect);
                true
            }
            None => false,
        }
    }

    /// The upstream closed its connection.
    pub(crate) fn on_upstream_eof(&mut self, now: Instant) {
        if let Some(c) = self.connector() {
            c.on_server_eof(now);
            return;
        }
        self.hop.on_upstream_eof();
    }

    /// Reading from the upstream failed (`error`); `disconnect` for an ordinary one.
    pub(crate) fn on_upstream_error(
        &mut self,
        now: Instant,
        disconnect: bool,
        error: &dyn std::fmt::Display,
    ) {
        if let Some(c) = self.connector() {
            c.read_failed(now, error);
            return;
        }
        self.hop.on_upstream_error(disconnect);
    }

    /// Routing mode: the login of [`Output::Login`] was routed and `connector` (its plan
    /// holding the login to replay, its addresses in the order the dead marks give at `now`)
    /// is to carry it out. Its steps come out of [`Session::poll_output`]; at its end the
    /// session goes over to the upstream or answers the client.
    pub(crate) fn connect_login(&mut self, connector: Connector) {
        if self.front.is_some() && self.upstream.is_none() {
            self.upstream = Some(Box::new((UpstreamPurpose::Login, connector)));
        }
    }

    /// The answer to [`Output::RedialUpstream`]: `connector` dials the server again (with
    /// the client's TLS in the header, the greeting read); its steps work on a second,
    /// pending connection, and the command held back goes out once it ended.
    pub(crate) fn redial_upstream(&mut self, connector: Connector) {
        if self.redial_held.is_some() && self.upstream.is_none() {
            self.upstream = Some(Box::new((UpstreamPurpose::Redial, connector)));
        }
    }

    /// What the connector out is for, if one is (from its hand-over to its end).
    pub(crate) fn connecting(&self) -> Option<UpstreamPurpose> {
        self.upstream.as_ref().map(|u| u.0)
    }

    fn connector(&mut self) -> Option<&mut Connector> {
        self.upstream.as_mut().map(|u| &mut u.1)
    }

    /// The [`Output::Dial`] succeeded.
    pub(crate) fn dialled(&mut self, now: Instant) {
        if let Some(c) = self.connector() {
            c.dialled(now);
        }
    }

    /// The [`Output::Dial`] failed (the TCP connect or a socket option).
    pub(crate) fn dial_failed(&mut self, now: Instant, error: &dyn std::fmt::Display) {
        if let Some(c) = self.connector() {
            c.dial_failed(now, error);
        }
    }

    /// Writing an [`Output::ToUpstream`] of a connector failed.
    pub(crate) fn upstream_write_failed(&mut self, now: Instant, error: &dyn std::fmt::Display) {
        if let Some(c) = self.connector() {
            c.write_failed(now, error);
        }
    }

    /// The handshake of [`Output::StartUpstreamTls`] completed.
    pub(crate) fn upstream_tls_done(&mut self, now: Instant) {
        if let Some(c) = self.connector() {
            c.tls_done(now);
        }
    }

    /// The handshake of [`Output::StartUpstreamTls`] failed.
    pub(crate) fn upstream_tls_failed(&mut self, now: Instant, error: &dyn std::fmt::Display) {
        if let Some(c) = self.connector() {
            c.tls_failed(now, error);
        }
    }

    /// A fresh access token for [`Output::FetchToken`].
    pub(crate) fn fresh_token(&mut self, now: Instant, token: String) {
        if let Some(c) = self.connector() {
            c.fresh_token(now, token);
        }
    }

    /// No fresh token for [`Output::FetchToken`]: the login ends with
    /// [`UpstreamEnd::Bridge`] (the driver knows why).
    pub(crate) fn token_failed(&mut self) {
        if let Some(c) = self.connector() {
            c.token_failed();
        }
    }

    /// popgate is shutting down (or the session was kicked): it ends now, a connector that
    /// is out with the driver included.
    ///
    /// What the session itself still held goes nowhere: the command held for the upstream
    /// dialled again after STLS ([`Output::RedialUpstream`]) was never sent, so the client
    /// is owed popgate's `-ERR` for it, as for a command a hold kept back. In the set-up the
    /// client, which nothing answered yet, gets that `-ERR` too.
    pub(crate) fn on_shutdown(&mut self) {
        if let Some(opening) = self.opening.as_mut() {
            opening.on_shutdown();
            return;
        }
        let setup = self.connecting() == Some(UpstreamPurpose::Setup);
        self.upstream = None;
        let dropped = self.redial_held.take().is_some()
            || self.out.iter().any(|o| matches!(o, Output::ToUpstream(_)));
        self.out.clear();
        self.redial_due = false;
        if setup {
            let reply = replies::line(replies::SHUTTING_DOWN);
            self.hop
                .close_before_relay(Some(reply.into()), CloseReason::Shutdown);
            return;
        }
        self.hop.on_shutdown_dropping(dropped);
    }

    /// The instant [`Session::poll_timeout`] reported has come.
    pub(crate) fn on_timeout(&mut self, now: Instant) {
        if let Some(opening) = self.opening.as_mut() {
            opening.on_timeout(now);
            return;
        }
        if let Some(c) = self.connector() {
            c.on_timeout(now);
            return;
        }
        self.hop.on_timeout(now);
    }

    /// The client TLS handshake of [`Output::StartClientTls`] completed; `cin` holds the
    /// plaintext sent after STLS (thrown away). The front forgets a USER from before.
    pub(crate) fn client_tls_started(&mut self, cin: &mut BytesMut) {
        self.hop.client_tls_started(cin);
        if let Some(front) = self.front.as_mut() {
            front.tls_started();
        }
        self.redial_due = self.redial_after_stls;
    }

    /// The body held for scanning could not be spooled (see [`Hop::on_spool_error`]).
    pub(crate) fn on_spool_error(&mut self) {
        self.hop.on_spool_error();
    }

    /// The verdict on the scan an [`Output::Scan`] asked for (see [`Hop::scan_done`]).
    pub(crate) fn scan_done(
        &mut self,
        now: Instant,
        date: &str,
        reports: Vec<crate::types::ScanReport>,
        cin: &mut BytesMut,
    ) {
        self.hop.scan_done(now, date, reports, cin);
    }

    /// The answer to a [`SessionEvent::LoginFailed`]: the penalty, counted from `now`.
    pub(crate) fn penalty(&mut self, now: Instant, penalty: Option<Duration>) {
        self.hop.penalty(now, penalty);
    }

    /// The next event to dispatch, in order.
    pub(crate) fn poll_event(&mut self) -> Option<SessionEvent> {
        self.hop.poll_event()
    }

    /// When [`Session::on_timeout`] is due: while a connector is out its deadline, else the
    /// hop's.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        if let Some(opening) = &self.opening {
            return opening.poll_timeout();
        }
        match &self.upstream {
            Some(u) => u.1.poll_timeout(),
            None => self.hop.poll_timeout(),
        }
    }

    /// Whether the driver may read from the client now: in the set-up up to the connect
    /// phase's bound (the bytes are kept for the relay), not during the re-dial or the
    /// routed login.
    pub(crate) fn wants_client_input(&self) -> bool {
        if let Some(opening) = &self.opening {
            return opening.wants_client_input();
        }
        match self.connecting() {
            Some(UpstreamPurpose::Setup) => self.early.0 < self.early.1 && !self.early_eof,
            Some(_) => false,
            None => self.hop.wants_client_input(),
        }
    }

    /// Whether the driver may read from the upstream now: while a connector is out when it
    /// waits for the server (the re-dial's pending connection then), never while the front
    /// stands in for it otherwise.
    pub(crate) fn wants_server_input(&self) -> bool {
        if self.opening.is_some() {
            return false;
        }
        match &self.upstream {
            Some(u) => u.1.reading(),
            None => self.front.is_none() && self.hop.wants_server_input(),
        }
    }

    /// The next output to carry out, `None` when there is none (or the next ones are held).
    /// In routing mode before the login, what the hop sends upstream goes to the front here
    /// (`now`, and the buffers the hop is fed from: the front's answers are its server
    /// input).
    pub(crate) fn poll_output(
        &mut self,
        now: Instant,
        sin: &mut BytesMut,
        cin: &mut BytesMut,
    ) -> Option<Output> {
        loop {
            if let Some(output) = self.out.pop_front() {
                if self.out.is_empty() {
                    // Used only around the set-up and a login: its buffer is not kept for the
                    // rest of the session (an idle session would hold it for hours).
                    self.out = VecDeque::new();
                }
                return Some(output);
            }
            if self.opening.is_some() {
                if !self.started {
                    return None;
                }
                let opened = self.opening.as_mut().and_then(|o| o.poll())?;
                self.opening = None;
                self.opened(now, opened, sin, cin);
                continue;
            }
            if let Some(u) = self.upstream.as_mut() {
                // The set-up starts with the session.
                if u.0 == UpstreamPurpose::Setup && !self.started {
                    return None;
                }
                if let Some(step) = u.1.poll() {
                    let purpose = u.0;
                    if let Some(output) = self.connect_step(now, purpose, step, sin, cin) {
                        return Some(output);
                    }
                    continue;
                }
                // The relay waits for the connector (the hop's outputs with it).
                return None;
            }
            if self.upstream.is_none()
                && let Some(held) = self.redial_held.take()
            {
                return Some(Output::ToUpstream(held));
            }
            match self.hop.poll_output()? {
                Output::ToUpstream(bytes) if self.front.is_some() => {
                    #[cfg(any(test, feature = "fuzzing"))]
                    self.front_traffic.0.extend_from_slice(&bytes);
                    if let Some(front) = self.front.as_mut() {
                        front.input(&bytes);
                    }
                    self.front_turn(now, sin, cin);
                }
                Output::ToUpstream(bytes) if std::mem::take(&mut self.redial_due) => {
                    if bytes.len() >= 5 && bytes[..5].eq_ignore_ascii_case(b"APOP ") {
                        debug!(
                            "APOP after STLS: the session stays on the connection whose \
                             greeting it hashed (the server is not told about TLS)"
                        );
                        return Some(Output::ToUpstream(bytes));
                    }
                    if is_quit(&bytes) {
                        // Nothing is dialled (and waited for) only to carry the goodbye.
                        return Some(Output::ToUpstream(bytes));
                    }
                    self.redial_held = Some(bytes);
                    return Some(Output::RedialUpstream);
                }
                output => return Some(output),
            }
        }
    }

    /// The connect phase ended: routing mode greets, direct mode asks for the upstream's
    /// connector; a refusal, a hang-up or a shutdown ends the session (what the client sent
    /// meanwhile is dropped).
    fn opened(&mut self, now: Instant, opened: Opened, sin: &mut BytesMut, cin: &mut BytesMut) {
        match opened {
            Opened::Proceed if self.front.is_some() => {
                self.stage = SessionStage::Relaying;
                self.hop.upstream_connected(now);
                self.greet(now, sin, cin);
            }
            Opened::Proceed => {
                self.stage = SessionStage::SettingUp;
                self.early.0 = cin.len();
                self.out.push_back(Output::ConnectUpstream);
            }
            Opened::Close {
                reply,
                reason,
                marks,
            } => {
                cin.clear();
                self.hop
                    .close_before_relay_marked(reply.map(Bytes::from), reason, marks);
            }
        }
    }

    /// One step of a connector as the session's output; its end starts the relay, goes over
    /// to the new connection, or answers the client.
    fn connect_step(
        &mut self,
        now: Instant,
        purpose: UpstreamPurpose,
        step: ConnectStep,
        sin: &mut BytesMut,
        cin: &mut BytesMut,
    ) -> Option<Output> {
        let end = match step {
            ConnectStep::Dial(address) => return Some(Output::Dial(address)),
            ConnectStep::Write(bytes) => return Some(Output::ToUpstream(Bytes::from(bytes))),
            ConnectStep::StartTls => return Some(Output::StartUpstreamTls),
            ConnectStep::FetchToken => return Some(Output::FetchToken),
            ConnectStep::Notice(n) => return Some(Output::UpstreamNotice(Box::new(n))),
            ConnectStep::MarkDead { address, until } => {
                return Some(Output::MarkDead(Box::new(DeadMark { address, until })));
            }
            ConnectStep::MarkAlive(address) => return Some(Output::MarkAlive(address)),
            ConnectStep::End(end) => end,
        };
        self.upstream = None;
        let ended = match purpose {
            UpstreamPurpose::Setup => self.set_up(now, end, sin, cin),
            UpstreamPurpose::Redial => redialled(end),
            UpstreamPurpose::Login => self.login_end(now, end, sin, cin),
        };
        // Ahead of what the start, the hand-over or the answer queued.
        self.out
            .push_front(Output::UpstreamEnded(purpose, Box::new(ended)));
        None
    }

    /// Direct mode's set-up ended: the relay starts with the greeting read (if any) and the
    /// client bytes kept meanwhile, or the client is told the upstream is unavailable.
    fn set_up(
        &mut self,
        now: Instant,
        end: ConnectEnd,
        sin: &mut BytesMut,
        cin: &mut BytesMut,
    ) -> UpstreamEnd {
        let (address, stage, reason) = match end {
            ConnectEnd::Connected { address, preread } => {
                self.stage = SessionStage::Relaying;
                self.hop.upstream_connected(now);
                sin.extend_from_slice(&preread);
                self.relay_starts(now, sin, cin);
                return UpstreamEnd::Connected {
                    address,
                    octets: preread.len(),
                };
            }
            ConnectEnd::Failed(ConnectFailure::Unavailable {
                address,
                stage,
                reason,
            }) => (address, stage, reason),
            // A plan without a login ends connected or unavailable.
            _ => (String::new(), ConnectStage::Setup, Reason::Closed),
        };
        cin.clear();
        let reply = replies::line(replies::UPSTREAM_UNAVAILABLE);
        self.hop
            .close_before_relay(Some(reply.into()), CloseReason::Error);
        UpstreamEnd::Unavailable {
            address,
            stage,
            reason,
        }
    }

    /// One step of the routed login's connector ended: the session is handed over or the
    /// client's login command answered.
    fn login_end(
        &mut self,
        now: Instant,
        end: ConnectEnd,
        sin: &mut BytesMut,
        cin: &mut BytesMut,
    ) -> UpstreamEnd {
        match end {
            ConnectEnd::LoggedIn {
                address,
                mut reply,
                rest,
            } => {
                reply.extend_from_slice(&rest);
                self.logged_in(now, &reply, sin, cin);
                UpstreamEnd::Connected {
                    address,
                    octets: reply.len(),
                }
            }
            ConnectEnd::Failed(ConnectFailure::Refused(line)) => {
                self.login_failed(now, &line, sin, cin);
                UpstreamEnd::Refused
            }
            ConnectEnd::Failed(ConnectFailure::Unavailable {
                address,
                stage,
                reason,
            }) => self.unavailable(now, address, stage, reason, sin, cin),
            ConnectEnd::Failed(bridge) => UpstreamEnd::Bridge(bridge),
            // A plan with a login ends logged in or failed.
            ConnectEnd::Connected { address, .. } => {
                self.unavailable(now, address, ConnectStage::Setup, Reason::Closed, sin, cin)
            }
        }
    }

    /// The routed login's upstream could not be had: the client is told so.
    fn unavailable(
        &mut self,
        now: Instant,
        address: String,
        stage: ConnectStage,
        reason: Reason,
        sin: &mut BytesMut,
        cin: &mut BytesMut,
    ) -> UpstreamEnd {
        let reply = replies::line(replies::UPSTREAM_UNAVAILABLE);
        self.login_failed(now, &reply, sin, cin);
        UpstreamEnd::Unavailable {
            address,
            stage,
            reason,
        }
    }

    /// The login of [`Output::Login`] succeeded upstream with `reply` (the server's final
    /// line, and whatever it sent after it): the session goes over to the upstream. The
    /// client bytes the front kept come out first ([`Output::ToUpstream`]), then the reply
    /// goes to the hop.
    fn logged_in(&mut self, now: Instant, reply: &[u8], sin: &mut BytesMut, cin: &mut BytesMut) {
        let Some(front) = self.front.take() else {
            return;
        };
        let rest = front.into_rest();
        if !rest.is_empty() {
            self.out.push_back(Output::ToUpstream(Bytes::from(rest)));
        }
        self.server_input(now, reply, sin, cin);
    }

    /// The login of [`Output::Login`] failed before it reached a server (the OAuth2 bridge
    /// refused it), or ended as [`UpstreamEnd::Bridge`]: `reply` (a status line, CRLF
    /// included) answers the client's login command, and the front goes on with what it kept.
    pub(crate) fn login_failed(
        &mut self,
        now: Instant,
        reply: &[u8],
        sin: &mut BytesMut,
        cin: &mut BytesMut,
    ) {
        if self.connecting() == Some(UpstreamPurpose::Login) {
            self.upstream = None;
        }
        let Some(front) = self.front.as_mut() else {
            return;
        };
        front.login_failed(reply);
        self.front_turn(now, sin, cin);
    }

    /// What the hop sent the front and what the front answered since the last call (the
    /// session simulator checks them as upstream-bound bytes and popgate's own replies).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn take_front_traffic(&mut self) -> (Vec<u8>, Vec<u8>) {
        std::mem::take(&mut self.front_traffic)
    }

    /// The front's answers go to the hop; a complete login comes out for the driver; a QUIT
    /// it answered ends the session as a server's close does (nothing was dialled).
    fn front_turn(&mut self, now: Instant, sin: &mut BytesMut, cin: &mut BytesMut) {
        let Some(front) = self.front.as_mut() else {
            return;
        };
        let answers = front.take_output();
        let login = front.take_login();
        let quit = front.quit();
        #[cfg(any(test, feature = "fuzzing"))]
        self.front_traffic.1.extend_from_slice(&answers);
        self.server_input(now, &answers, sin, cin);
        match login {
            Some(login) => self.out.push_back(Output::Login(Box::new(login))),
            None if quit => self.hop.on_upstream_eof(),
            None => {}
        }
    }

    fn server_input(&mut self, now: Instant, bytes: &[u8], sin: &mut BytesMut, cin: &mut BytesMut) {
        if bytes.is_empty() {
            return;
        }
        sin.extend_from_slice(bytes);
        self.hop.on_server_input(now, sin, cin);
    }
}

/// Where a session is on its way to the relay ([`Session::stage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionStage {
    /// The connect phase ([`Session::opening`]): a `connect` rule's delay and verdict.
    Opening,
    /// Direct mode's set-up: the upstream being connected.
    SettingUp,
    /// The relay (routing mode: with the front standing in for the server until the login).
    Relaying,
}

/// Whether `line` (a command as it goes upstream) is QUIT.
fn is_quit(line: &[u8]) -> bool {
    let verb = line.split(|&b| matches!(b, b' ' | b'\r' | b'\n')).next();
    verb.is_some_and(|v| v.eq_ignore_ascii_case(b"QUIT"))
}

/// The re-dial after STLS ended: the session goes over to the new connection if it greeted
/// `+OK` (its greeting is taken silently), else stays on the first.
fn redialled(end: ConnectEnd) -> UpstreamEnd {
    match end {
        ConnectEnd::Connected { address, preread } => {
            if preread.starts_with(b"+OK") && preread.ends_with(b"\r\n") {
                UpstreamEnd::Connected {
                    address,
                    octets: preread.len(),
                }
            } else {
                UpstreamEnd::NotGreeted {
                    address,
                    greeting: preread,
                }
            }
        }
        ConnectEnd::Failed(ConnectFailure::Unavailable {
            address,
            stage,
            reason,
        }) => UpstreamEnd::Unavailable {
            address,
            stage,
            reason,
        },
        // A plan without a login ends connected or unavailable.
        _ => UpstreamEnd::Unavailable {
            address: String::new(),
            stage: ConnectStage::Setup,
            reason: Reason::Closed,
        },
    }
}

#[cfg(test)]
mod tests {
    //! Routing mode's hand-over without sockets: the front greets and answers, a login comes
    //! out, its outcome is fed back, at every chunk size.

    use std::net::IpAddr;
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::config::UnknownCommands;
    use crate::proxy::HopConfig;
    use crate::proxy::connect::Opening;
    use crate::proxy::front::Method;
    use crate::proxy::policy::Policy;
    use crate::rules::RuleSet;
    use crate::types::CloseReason;

    fn cfg(stls: bool) -> HopConfig {
        HopConfig {
            listener: Arc::from("test"),
            client_ip: IpAddr::from([192, 0, 2, 1]),
            destination: None,
            client_tls: false,
            stls_available: stls,
            fold_user_names: false,
            max_line: 512,
            max_pipeline: 8,
            unknown_commands: UnknownCommands::Reject,
            idle_timeout: Duration::from_secs(600),
            login_timeout: Duration::from_secs(60),
            greeting_timeout: Duration::from_secs(30),
            lookups: None,
            scan: None,
        }
    }

    /// What a routed session did, as its driver saw it.
    #[derive(Debug, Default, PartialEq, Eq)]
    struct Trace {
        client: Vec<u8>,
        upstream: Vec<u8>,
        /// Each login the driver was asked to route: user, method, lines.
        logins: Vec<(String, Method, Vec<Vec<u8>>)>,
        tls: usize,
        close: Option<CloseReason>,
        /// Body octets held for scanning, and the messages scans were asked for.
        spooled: usize,
        scans: Vec<u32>,
        /// A routed login's talk toward the upstream (`<dial address>` for each dial).
        replay: Vec<u8>,
        /// Addresses the session marked dead.
        dead: Vec<String>,
        /// How the routed logins (and the set-up, the re-dial) ended, and what each was for.
        ends: Vec<UpstreamEnd>,
        purposes: Vec<UpstreamPurpose>,
        /// Fresh tokens the session asked for.
        fetched: usize,
    }

    /// A scripted driver: the client's bytes in chunks of `n`, each login answered with the
    /// next of `outcomes` (`Ok`: the server's final reply; `Err`: the client's answer; none
    /// left: the login stays out), then the server's bytes after the login in chunks of `n`.
    struct Driver {
        session: Session,
        cin: BytesMut,
        sin: BytesMut,
        now: Instant,
        outcomes: VecDeque<Result<&'static [u8], &'static [u8]>>,
        trace: Trace,
        /// Client bytes not yet read.
        socket: Vec<u8>,
        /// The answer to a failed login.
        penalty: Option<Duration>,
        /// Routing mode through the session: each login's connector dials these addresses
        /// (every dial connects; the server's bytes are the test's).
        addresses: Option<Vec<String>>,
        /// A bearer login (the OAuth2 bridge's, token `stale`) instead of the replay; the
        /// answers to `FetchToken` (`None`: the bridge has none).
        bearer: Option<VecDeque<Option<String>>>,
        /// The answers to dials (`Some(true)`: connected, `Some(false)`: refused, `None` or
        /// none left: the dial stays out); no queue: every dial connects at once.
        dials: Option<VecDeque<Option<bool>>>,
        /// Direct mode with PROXY v2: the re-dial after STLS is handed a connector over
        /// these addresses (none: the driver does not re-dial).
        redial: Option<Vec<String>>,
    }

    impl Driver {
        fn new(stls: bool, outcomes: Vec<Result<&'static [u8], &'static [u8]>>) -> Driver {
            Driver::with(
                stls,
                Some(Front::new("popgate ready")),
                outcomes,
                |s| s,
                b"",
            )
        }

        /// Direct mode: the upstream greeted `+OK hi` during the set-up.
        fn direct(redial: bool) -> Driver {
            let redialling = move |s: Session| s.redialling_after_stls(redial);
            Driver::with(true, None, vec![], redialling, b"+OK hi\r\n")
        }

        fn with(
            stls: bool,
            front: Option<Front>,
            outcomes: Vec<Result<&'static [u8], &'static [u8]>>,
            build: impl FnOnce(Session) -> Session,
            preread: &[u8],
        ) -> Driver {
            let now = Instant::now();
            let rules = Arc::new(RuleSet::parse("", Path::new("none.toml")).unwrap());
            let hop = Hop::new(cfg(stls), Policy::new(rules), now, now);
            Driver::around(hop, now, front, outcomes, build, preread, b"")
        }

        /// A routed session with a `scan` rule on every RETR and TOP.
        fn scanning(outcomes: Vec<Result<&'static [u8], &'static [u8]>>) -> Driver {
            let now = Instant::now();
            let rules = RuleSet::parse(
                "[[rule]]\nname = \"s\"\non = \"command\"\nverbs = [\"RETR\", \"TOP\"]\n\
                 action = \"scan\"\nscan = [\"clamav\"]\n",
                Path::new("scan.toml"),
            )
            .unwrap();
            let mut policy = crate::proxy::scan::ScanPolicy::new(
                &[],
                &crate::config::scan::ScanConfig::default(),
            );
            policy.max_size = vec![(Arc::from("clamav"), 1 << 20)];
            let cfg = HopConfig {
                scan: Some(Arc::new(policy)),
                ..cfg(false)
            };
            let hop = Hop::new(cfg, Policy::new(Arc::new(rules)), now, now);
            let front = Some(Front::new("popgate ready"));
            Driver::around(hop, now, front, outcomes, |s| s, b"", b"")
        }

        /// A session whose client sent `early` during the connect phase (a rule's delay):
        /// routing mode or direct mode with the greeting `preread` (or none read yet).
        fn early(routing: bool, preread: &[u8], early: &[u8]) -> Driver {
            let now = Instant::now();
            let rules = Arc::new(RuleSet::parse("", Path::new("none.toml")).unwrap());
            let hop = Hop::new(cfg(false), Policy::new(rules), now, now);
            let front = routing.then(|| Front::new("popgate ready"));
            Driver::around(hop, now, front, vec![Ok(LOGGED_IN)], |s| s, preread, early)
        }

        fn around(
            hop: Hop,
            now: Instant,
            front: Option<Front>,
            outcomes: Vec<Result<&'static [u8], &'static [u8]>>,
            build: impl FnOnce(Session) -> Session,
            preread: &[u8],
            early: &[u8],
        ) -> Driver {
            let mut d = Driver {
                session: build(Session::new(hop, front)),
                cin: BytesMut::from(early),
                sin: BytesMut::from(preread),
                now,
                outcomes: outcomes.into(),
                trace: Trace::default(),
                socket: Vec::new(),
                penalty: None,
                addresses: None,
                bearer: None,
                dials: None,
                redial: None,
            };
            d.session.start(now, &mut d.sin, &mut d.cin);
            d.drain();
            d
        }

        /// Whether there were events.
        fn events(&mut self) -> bool {
            let mut any = false;
            while let Some(ev) = self.session.poll_event() {
                any = true;
                if let SessionEvent::LoginFailed(_) = ev {
                    self.session.penalty(self.now, self.penalty);
                }
            }
            any
        }

        fn drain(&mut self) {
            loop {
                self.events();
                let Some(o) = self
                    .session
                    .poll_output(self.now, &mut self.sin, &mut self.cin)
                else {
                    if self.events() {
                        continue;
                    }
                    return;
                };
                match o {
                    Output::ToClient(b) => self.trace.client.extend_from_slice(&b),
                    Output::ToUpstream(b) if self.session.connecting().is_some() => {
                        self.trace.replay.extend_from_slice(&b);
                    }
                    Output::Dial(a) => {
                        self.trace.replay.extend(format!("<dial {a}>").bytes());
                        let answer = match self.dials.as_mut() {
                            Some(q) => q.pop_front().flatten(),
                            None => Some(true),
                        };
                        match answer {
                            Some(true) => self.session.dialled(self.now),
                            Some(false) => self.session.dial_failed(self.now, &"refused"),
                            None => {}
                        }
                    }
                    Output::StartUpstreamTls => self.session.upstream_tls_done(self.now),
                    Output::FetchToken => {
                        self.trace.fetched += 1;
                        match self.bearer.as_mut().and_then(VecDeque::pop_front).flatten() {
                            Some(token) => self.session.fresh_token(self.now, token),
                            None => self.session.token_failed(),
                        }
                    }
                    Output::MarkDead(m) => self.trace.dead.push(m.address.clone()),
                    Output::MarkAlive(_) | Output::UpstreamNotice(_) => {}
                    Output::UpstreamEnded(purpose, end) => {
                        self.trace.purposes.push(purpose);
                        if let UpstreamEnd::Bridge(_) = *end {
                            // The bridge's judgement, as the driver asks it.
                            let (now, sin, cin) = (self.now, &mut self.sin, &mut self.cin);
                            self.session.login_failed(now, BRIDGE_SAYS_NO, sin, cin);
                        }
                        self.trace.ends.push(*end);
                    }
                    Output::ToUpstream(b) => {
                        assert!(!self.session.routing(), "bytes upstream before the login");
                        self.trace.upstream.extend_from_slice(&b);
                    }
                    Output::StartClientTls => {
                        self.trace.tls += 1;
                        self.session.client_tls_started(&mut self.cin);
                    }
                    Output::Close(r) => self.trace.close = Some(r),
                    Output::ConnectUpstream => {
                        let addresses = self.addresses.clone().unwrap_or_default();
                        let greeting = crate::proxy::connect::greeting_in_setup(addresses.len());
                        let c = setup_connector(addresses, greeting, None, self.now);
                        self.session.connect_upstream(c);
                    }
                    Output::RedialUpstream => {
                        self.trace.upstream.extend_from_slice(b"<redial>");
                        if let Some(addresses) = self.redial.clone() {
                            let c = setup_connector(addresses, true, Some(b"<v2>"), self.now);
                            self.session.redial_upstream(c);
                        }
                    }
                    Output::Spool(b) => self.trace.spooled += b.len(),
                    Output::Scan(req) => self.trace.scans.push(req.msg),
                    Output::Unspool | Output::DropSpool => {}
                    Output::Login(l) => {
                        self.trace
                            .logins
                            .push((l.user.clone(), l.method, l.lines.clone()));
                        if let Some(addresses) = &self.addresses {
                            let bearer = self.bearer.is_some();
                            let c = connector(&l, addresses.clone(), self.now, bearer);
                            self.session.connect_login(c);
                            continue;
                        }
                        let (now, sin, cin) = (self.now, &mut self.sin, &mut self.cin);
                        match self.outcomes.pop_front() {
                            Some(Ok(reply)) => self.session.logged_in(now, reply, sin, cin),
                            Some(Err(reply)) => self.session.login_failed(now, reply, sin, cin),
                            None => {}
                        }
                    }
                }
            }
        }

        /// The client sends `bytes`; the driver reads them `n` at a time while the session
        /// wants them (what it does not want waits in the socket).
        fn client(&mut self, bytes: &[u8], n: usize) {
            self.socket.extend_from_slice(bytes);
            while !self.socket.is_empty() && self.session.wants_client_input() {
                let k = n.min(self.socket.len());
                self.cin.extend_from_slice(&self.socket[..k]);
                self.socket.drain(..k);
                self.session.on_client_input(self.now, &mut self.cin);
                self.drain();
            }
        }

        /// The session's timer fires at the instant it reported.
        fn fire(&mut self) {
            let at = self.session.poll_timeout().expect("a deadline");
            self.now = self.now.max(at);
            self.session.on_timeout(self.now);
            self.drain();
        }

        fn server(&mut self, bytes: &[u8], n: usize) {
            for chunk in bytes.chunks(n) {
                assert!(self.session.wants_server_input(), "the server is not read");
                self.sin.extend_from_slice(chunk);
                self.session
                    .on_server_input(self.now, &mut self.sin, &mut self.cin);
                self.drain();
            }
        }
    }

    #[test]
    fn a_routed_session_holds_a_selected_retrieval_for_its_scanners() {
        let mut d = Driver::scanning(vec![Ok(LOGGED_IN)]);
        d.client(b"USER alice\r\nPASS pw\r\nRETR 1\r\nDELE 1\r\n", 64);
        assert_eq!(
            d.trace.upstream, b"RETR 1\r\n",
            "the DELE waits for the verdict"
        );
        d.server(b"+OK 9 octets\r\nSubject\r\n.\r\n", 64);
        assert_eq!(d.trace.scans, [1]);
        assert_eq!(d.trace.spooled, 9);
        let client = String::from_utf8_lossy(&d.trace.client).into_owned();
        assert!(client.ends_with("+OK logged in\r\n"), "held: {client}");
    }

    const REFUSED: &[u8] = b"-ERR [AUTH] no\r\n";
    const LOGGED_IN: &[u8] = b"+OK logged in\r\n";

    fn session(
        client: &[u8],
        server: &[u8],
        outcomes: Vec<Result<&'static [u8], &'static [u8]>>,
        n: usize,
    ) -> Trace {
        let mut d = Driver::new(false, outcomes);
        d.client(client, n);
        if !d.session.routing() {
            d.server(server, n);
            d.session.on_upstream_eof(d.now);
            d.drain();
        }
        d.trace
    }

    #[test]
    fn a_refused_login_is_answered_and_the_next_one_hands_the_session_over() {
        let client =
            b"CAPA\r\nUSER alice\r\nPASS wrong\r\nUSER alice\r\nPASS right\r\nSTAT\r\nQUIT\r\n";
        let server = b"+OK 2 320\r\n+OK bye\r\n";
        let outcomes = || vec![Err(REFUSED), Ok(LOGGED_IN)];
        let whole = session(client, server, outcomes(), client.len());
        let text = String::from_utf8_lossy(&whole.client).into_owned();
        assert!(text.starts_with("+OK popgate ready\r\n+OK capability list follows\r\n"));
        assert!(
            text.ends_with(
                "+OK\r\n-ERR [AUTH] no\r\n+OK\r\n+OK logged in\r\n+OK 2 320\r\n+OK bye\r\n"
            ),
            "{text}"
        );
        // The replayed lines are the driver's; only what followed the login goes upstream,
        // once, after the hand-over.
        assert_eq!(whole.upstream, b"STAT\r\nQUIT\r\n");
        let lines = |pass: &str| {
            vec![
                b"USER alice\r\n".to_vec(),
                format!("PASS {pass}\r\n").into_bytes(),
            ]
        };
        assert_eq!(
            whole.logins,
            vec![
                ("alice".into(), Method::UserPass, lines("wrong")),
                ("alice".into(), Method::UserPass, lines("right")),
            ]
        );
        assert_eq!(whole.close, Some(CloseReason::Quit));
        for n in 1..client.len() {
            assert_eq!(
                session(client, server, outcomes(), n),
                whole,
                "chunks of {n}"
            );
        }
    }

    #[test]
    fn a_sasl_login_is_routed_with_its_lines_and_the_reply_is_the_servers() {
        // AUTH PLAIN with the payload on the continuation line: \0bob\0pw.
        let client = b"AUTH PLAIN\r\nAGJvYgBwdw==\r\nNOOP\r\n";
        let server = b"+OK\r\n";
        let whole = session(
            client,
            server,
            vec![Ok(b"+OK welcome bob\r\n")],
            client.len(),
        );
        assert_eq!(
            whole.logins,
            vec![(
                "bob".into(),
                Method::Plain,
                vec![b"AUTH PLAIN\r\n".to_vec(), b"AGJvYgBwdw==\r\n".to_vec()]
            )]
        );
        assert!(whole.client.ends_with(b"+ \r\n+OK welcome bob\r\n+OK\r\n"));
        assert_eq!(whole.upstream, b"NOOP\r\n");
        for n in 1..client.len() {
            assert_eq!(
                session(client, server, vec![Ok(b"+OK welcome bob\r\n")], n),
                whole
            );
        }
    }

    #[test]
    fn a_quit_before_any_login_ends_the_session_with_nothing_dialled() {
        let client = b"USER alice\r\nQUIT\r\n";
        for n in 1..=client.len() {
            let t = session(client, b"", vec![], n);
            assert_eq!(
                t.client,
                b"+OK popgate ready\r\n+OK\r\n+OK popgate signing off\r\n"
            );
            assert!(t.logins.is_empty() && t.upstream.is_empty());
            assert_eq!(t.close, Some(CloseReason::Quit));
        }
    }

    #[test]
    fn a_shutdown_while_the_login_is_out_ends_the_session_and_nothing_goes_upstream() {
        let client = b"USER alice\r\nPASS pw\r\nSTAT\r\n";
        for n in 1..=client.len() {
            let mut d = Driver::new(false, vec![]);
            d.client(client, n);
            assert_eq!(d.trace.logins.len(), 1);
            assert!(d.session.routing());
            d.session.on_shutdown();
            d.drain();
            assert_eq!(d.trace.close, Some(CloseReason::Shutdown));
            assert!(d.trace.upstream.is_empty());
            // PASS is owed no answer of popgate's: no server took it.
            assert_eq!(d.trace.client, b"+OK popgate ready\r\n+OK\r\n");
        }
    }

    #[test]
    fn client_bytes_kept_during_the_connect_phase_are_handled_as_if_read_after_the_start() {
        let client = b"CAPA\r\nUSER alice\r\nPASS pw\r\nSTAT\r\nQUIT\r\n";
        let server = b"+OK 2 320\r\n+OK bye\r\n";
        // Routing mode; direct mode with the greeting read in the set-up, or not yet.
        for (routing, preread) in [(true, &b""[..]), (false, b"+OK hi\r\n"), (false, b"")] {
            let run = |early: &[u8], rest: &[u8], n: usize| {
                let mut d = Driver::early(routing, preread, early);
                d.client(rest, n);
                if d.session.wants_server_input() {
                    d.server(server, n);
                }
                d.trace
            };
            // The reference: nothing early, the same bytes read once the session started.
            let want = run(b"", client, client.len());
            assert!(!want.client.is_empty() && !want.upstream.is_empty());
            // Cut anywhere: the first part kept during the delay (all of it too), the rest
            // read after, in chunks of any size.
            for cut in 0..=client.len() {
                for n in [1, 7, client.len()] {
                    let got = run(&client[..cut], &client[cut..], n);
                    assert_eq!(
                        got, want,
                        "routing {routing}, {cut} octets early, chunks {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_server_is_not_read_until_the_login_is_routed() {
        let mut d = Driver::new(false, vec![Ok(LOGGED_IN)]);
        assert!(!d.session.wants_server_input());
        d.client(b"USER alice\r\n", 64);
        assert!(!d.session.wants_server_input());
        d.client(b"PASS pw\r\n", 64);
        assert!(d.session.wants_server_input());
        assert!(!d.session.routing());
    }

    #[test]
    fn after_stls_the_front_forgets_a_user_sent_in_plaintext() {
        for n in [1, 3, 64] {
            let mut d = Driver::new(true, vec![Ok(LOGGED_IN)]);
            d.client(b"USER alice\r\nSTLS\r\n", n);
            assert_eq!(d.trace.tls, 1);
            d.client(b"PASS pw\r\n", n);
            assert!(d.trace.logins.is_empty(), "a login from a plaintext USER");
            let text = String::from_utf8_lossy(&d.trace.client).into_owned();
            assert!(text.ends_with("-ERR USER first\r\n"), "{text}");
            d.client(b"USER bob\r\nPASS pw\r\n", n);
            assert_eq!(d.trace.logins.len(), 1);
            assert_eq!(d.trace.logins[0].0, "bob");
        }
    }

    #[test]
    fn after_the_clients_stls_a_proxy_v2_upstream_is_dialled_again_before_the_next_command() {
        let client = b"CAPA\r\nSTLS\r\nUSER alice\r\nPASS pw\r\n";
        for n in 1..=client.len() {
            let mut d = Driver::direct(true);
            d.client(b"CAPA\r\n", n);
            d.server(b"+OK\r\nUSER\r\n.\r\n", n);
            d.client(b"STLS\r\n", n);
            assert_eq!(d.trace.tls, 1);
            d.client(b"USER alice\r\n", n);
            d.server(b"+OK\r\n", n);
            d.client(b"PASS pw\r\n", n);
            // Once, before the first command after the handshake; CAPA went out before.
            assert_eq!(
                d.trace.upstream, b"CAPA\r\n<redial>USER alice\r\nPASS pw\r\n",
                "chunks of {n} ({client:?})"
            );
        }
    }

    /// A shutdown (or kick) while the driver dials the upstream again after the client's
    /// STLS: the command held for the new connection never goes out (on either), and the
    /// client, whose command no server took, gets popgate's `-ERR` before the close.
    #[test]
    fn a_shutdown_during_the_redial_after_stls_sends_the_held_command_nowhere() {
        let mut d = Driver::direct(true);
        d.client(b"STLS\r\n", 6);
        assert_eq!(d.trace.tls, 1);
        d.cin.extend_from_slice(b"USER alice\r\n");
        d.session.on_client_input(d.now, &mut d.cin);
        // The driver carries out the outputs up to the redial, then the shutdown comes.
        loop {
            match d.session.poll_output(d.now, &mut d.sin, &mut d.cin) {
                Some(Output::RedialUpstream) => break,
                Some(Output::ToClient(b)) => d.trace.client.extend_from_slice(&b),
                Some(Output::ToUpstream(b)) => d.trace.upstream.extend_from_slice(&b),
                other => panic!("before the redial: {other:?}"),
            }
        }
        d.session.on_shutdown();
        d.drain();
        assert_eq!(d.trace.close, Some(CloseReason::Shutdown));
        assert!(
            !d.trace.upstream.windows(4).any(|w| w == b"USER"),
            "{:?}",
            String::from_utf8_lossy(&d.trace.upstream)
        );
        assert!(
            d.trace
                .client
                .ends_with(b"+OK begin TLS negotiation\r\n-ERR [SYS/TEMP] proxy shutting down\r\n"),
            "{:?}",
            String::from_utf8_lossy(&d.trace.client)
        );
    }

    #[test]
    fn apop_after_stls_stays_on_the_connection_whose_greeting_it_hashed() {
        let apop = b"APOP alice c0ffee5ec2e7c0ffee5ec2e7c0ffee5e\r\n";
        for n in 1..=apop.len() {
            let mut d = Driver::direct(true);
            d.client(b"STLS\r\n", n);
            d.client(apop, n);
            assert_eq!(d.trace.upstream, apop, "chunks of {n}");
            d.server(b"-ERR no\r\n", n);
            // Not on the next command either: the session is bound to the first connection.
            d.client(b"USER alice\r\n", n);
            assert!(!d.trace.upstream.windows(8).any(|w| w == b"<redial>"));
        }
    }

    /// A QUIT as the first command after STLS ends the session: no connection is dialled
    /// (and waited for, up to `connect_timeout`) only to carry it; it goes out on the first.
    #[test]
    fn a_quit_after_stls_goes_out_on_the_first_connection_with_nothing_dialled_again() {
        for quit in [&b"QUIT\r\n"[..], b"quit\r\n", b"QUIT\n"] {
            for n in 1..=quit.len() {
                let mut d = Driver::direct(true);
                d.client(b"STLS\r\n", n);
                d.client(quit, n);
                assert_eq!(d.trace.upstream, quit, "chunks of {n}");
            }
        }
    }

    #[test]
    fn without_proxy_v2_or_in_routing_mode_nothing_is_dialled_again() {
        let mut d = Driver::direct(false);
        d.client(b"STLS\r\n", 64);
        d.client(b"USER alice\r\n", 64);
        assert_eq!(d.trace.upstream, b"USER alice\r\n");
        let mut d = Driver::with(
            true,
            Some(Front::new("popgate ready")),
            vec![Ok(LOGGED_IN)],
            |s| s.redialling_after_stls(true),
            b"",
        );
        d.client(b"STLS\r\n", 64);
        d.client(b"USER alice\r\nPASS pw\r\nNOOP\r\n", 64);
        assert_eq!(d.trace.logins.len(), 1);
        assert_eq!(d.trace.upstream, b"NOOP\r\n");
    }

    #[test]
    fn a_refused_routed_login_waits_out_the_penalty_and_the_client_is_read_meanwhile() {
        for n in [1, 5, 64] {
            let mut d = Driver::new(false, vec![Err(REFUSED), Ok(LOGGED_IN)]);
            d.penalty = Some(Duration::from_secs(3));
            d.client(b"USER alice\r\nPASS wrong\r\n", n);
            assert_eq!(d.trace.logins.len(), 1);
            assert_eq!(d.trace.client, b"+OK popgate ready\r\n+OK\r\n", "held");
            let at = d.session.poll_timeout().expect("the hold's end");
            assert_eq!(at, d.now + Duration::from_secs(3));
            // The client is still read: its next login waits behind the hold.
            d.client(b"USER bob\r\nPASS pw\r\n", n);
            assert_eq!(d.trace.logins.len(), 1, "a login went out during the hold");
            d.now = at;
            d.session.on_timeout(at);
            d.drain();
            assert_eq!(d.trace.logins.len(), 2);
            assert_eq!(d.trace.logins[1].0, "bob");
            assert_eq!(
                d.trace.client,
                b"+OK popgate ready\r\n+OK\r\n-ERR [AUTH] no\r\n+OK\r\n+OK logged in\r\n"
            );
        }
    }

    /// A routed login's connector as the driver builds it: the greeting read, the login's
    /// lines replayed (or with `bearer` the OAuth2 bridge's XOAUTH2 login with the token
    /// `stale`), 5 s to connect, 10 s per reply.
    fn connector(
        login: &crate::proxy::front::Login,
        addresses: Vec<String>,
        now: Instant,
        bearer: bool,
    ) -> Connector {
        let replay = if bearer {
            crate::proxy::dialogue::Replay::Bearer(crate::proxy::dialogue::Bearer {
                mechanism: crate::config::Oauth2Mechanism::Xoauth2,
                mailbox: "alice@example.com".into(),
                host: "pop.example.com".into(),
                port: 995,
                token: "stale".into(),
            })
        } else {
            crate::proxy::dialogue::Replay::Lines {
                method: login.method,
                lines: login.lines.clone(),
            }
        };
        let plan = crate::proxy::dialogue::Plan {
            tls: crate::config::TlsMode::None,
            tls_configured: false,
            proxy_header: None,
            xclient: None,
            read_greeting: true,
            max_line: 512,
            login: Some(replay),
        };
        let timeouts = crate::proxy::dialogue::ConnectTimeouts {
            connect: Duration::from_secs(5),
            dead_for: Duration::from_secs(60),
            reply: Some(Duration::from_secs(10)),
        };
        Connector::new(plan, addresses, timeouts, now)
    }

    /// A routed session whose logins the session carries out over `addresses`.
    fn routed(addresses: &[&str]) -> Driver {
        let mut d = Driver::new(false, vec![]);
        d.addresses = Some(addresses.iter().map(|a| (*a).to_owned()).collect());
        d
    }

    const BRIDGE_SAYS_NO: &[u8] = b"-ERR [SYS/TEMP] the bridge says no\r\n";

    #[test]
    fn a_bearer_login_gets_a_fresh_token_through_the_session_and_a_bridge_failure_is_answered_by_the_driver()
     {
        let json = &b"+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=\r\n"[..];
        let refused = &b"-ERR [AUTH] Authentication failed.\r\n"[..];
        let run = |fresh: Option<&str>, n: usize| {
            let mut d = routed(&["a:110"]);
            d.bearer = Some(VecDeque::from([fresh.map(str::to_owned)]));
            d.client(b"USER alice\r\nPASS local\r\n", n);
            d.server(b"+OK hi\r\n", n);
            d.server(b"+ \r\n", n);
            d.server(json, n);
            d.server(refused, n);
            if d.session.connecting().is_some() {
                d.server(b"+ \r\n", n);
                d.server(b"+OK in\r\n", n);
            }
            d.trace
        };
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        for n in [1, 2, 5, 64] {
            let t = run(Some("fresh"), n);
            assert_eq!(t.fetched, 1);
            assert_eq!(
                t.ends,
                [UpstreamEnd::Connected {
                    address: "a:110".into(),
                    octets: 8
                }]
            );
            assert_eq!(
                text(&t.replay).matches("AUTH XOAUTH2\r\n").count(),
                2,
                "chunks of {n}"
            );
            assert!(t.client.ends_with(b"+OK in\r\n"), "{}", text(&t.client));
            // No fresh token: the bridge's failure, answered with the driver's line.
            let t = run(None, n);
            assert_eq!(t.ends, [UpstreamEnd::Bridge(ConnectFailure::NoFreshToken)]);
            assert!(t.client.ends_with(BRIDGE_SAYS_NO), "{}", text(&t.client));
        }
    }

    const UNAVAILABLE: &[u8] = b"-ERR [SYS/TEMP] upstream server unavailable, try again later\r\n";

    #[test]
    fn a_routed_login_is_replayed_by_the_session_and_the_relay_follows() {
        let run = |n: usize| {
            let mut d = routed(&["a:110"]);
            d.client(b"USER alice\r\nPASS pw\r\nSTAT\r\n", n);
            assert!(d.session.connecting().is_some());
            assert!(
                !d.session.wants_client_input(),
                "the client waits for the login"
            );
            d.server(b"+OK hi\r\n", n);
            d.server(b"+OK\r\n", n);
            d.server(b"+OK logged in\r\n", n);
            assert!(d.session.connecting().is_none() && !d.session.routing());
            // What the client sent after PASS waited in its socket during the login.
            d.client(b"", n);
            d.server(b"+OK 2 320\r\n", n);
            d.trace
        };
        let whole = run(64);
        assert_eq!(whole.replay, b"<dial a:110>USER alice\r\nPASS pw\r\n");
        assert_eq!(
            whole.ends,
            [UpstreamEnd::Connected {
                address: "a:110".into(),
                octets: 15
            }]
        );
        // Only what followed the login goes upstream, after the hand-over.
        assert_eq!(whole.upstream, b"STAT\r\n");
        assert_eq!(
            whole.client,
            b"+OK popgate ready\r\n+OK\r\n+OK logged in\r\n+OK 2 320\r\n"
        );
        for n in 1..64 {
            assert_eq!(run(n), whole, "chunks of {n}");
        }
    }

    #[test]
    fn a_silent_first_address_is_failed_over_at_the_connect_timeout() {
        let run = |n: usize| {
            let mut d = routed(&["a:110", "b:110"]);
            let start = d.now;
            d.client(b"USER alice\r\nPASS pw\r\n", n);
            assert_eq!(
                d.session.poll_timeout(),
                Some(start + Duration::from_secs(5))
            );
            // a accepted but never greets.
            d.fire();
            d.server(b"+OK hi\r\n", n);
            d.server(b"+OK\r\n", n);
            d.server(b"+OK in\r\n", n);
            d.trace
        };
        let whole = run(64);
        assert_eq!(whole.dead, ["a:110"]);
        assert_eq!(
            whole.replay,
            b"<dial a:110><dial b:110>USER alice\r\nPASS pw\r\n"
        );
        assert_eq!(
            whole.ends,
            [UpstreamEnd::Connected {
                address: "b:110".into(),
                octets: 8
            }]
        );
        assert!(whole.client.ends_with(b"+OK in\r\n"));
        for n in 1..16 {
            assert_eq!(run(n), whole, "chunks of {n}");
        }
    }

    #[test]
    fn a_refusal_from_the_server_answers_the_client_and_the_next_login_is_routed_again() {
        let run = |n: usize| {
            let mut d = routed(&["a:110"]);
            d.client(b"USER alice\r\nPASS wrong\r\n", n);
            d.server(b"+OK hi\r\n", n);
            d.server(b"+OK\r\n", n);
            d.server(REFUSED, n);
            assert!(d.session.connecting().is_none() && d.session.routing());
            assert!(
                d.trace.client.ends_with(REFUSED),
                "the server's line answers"
            );
            d.client(b"USER alice\r\nPASS right\r\nNOOP\r\n", n);
            assert!(d.session.connecting().is_some());
            d.server(b"+OK hi\r\n", n);
            d.server(b"+OK\r\n", n);
            d.server(LOGGED_IN, n);
            d.client(b"", n);
            d.trace
        };
        let whole = run(64);
        assert_eq!(
            whole.ends,
            [
                UpstreamEnd::Refused,
                UpstreamEnd::Connected {
                    address: "a:110".into(),
                    octets: LOGGED_IN.len()
                }
            ]
        );
        assert_eq!(
            whole.replay,
            b"<dial a:110>USER alice\r\nPASS wrong\r\n<dial a:110>USER alice\r\nPASS right\r\n"
        );
        assert_eq!(
            whole.client,
            b"+OK popgate ready\r\n+OK\r\n-ERR [AUTH] no\r\n+OK\r\n+OK logged in\r\n"
        );
        assert_eq!(whole.upstream, b"NOOP\r\n");
        for n in 1..32 {
            assert_eq!(run(n), whole, "chunks of {n}");
        }
    }

    #[test]
    fn a_server_that_stops_answering_the_login_makes_it_unavailable_at_the_reply_timeout() {
        let run = |n: usize| {
            let mut d = routed(&["a:110"]);
            d.client(b"USER alice\r\nPASS pw\r\n", n);
            d.server(b"+OK hi\r\n", n);
            let at = d.session.poll_timeout().expect("the reply timeout");
            assert_eq!(at, d.now + Duration::from_secs(10));
            d.fire();
            assert!(d.session.connecting().is_none() && d.session.routing());
            d.trace
        };
        let whole = run(64);
        assert_eq!(
            whole.ends,
            [UpstreamEnd::Unavailable {
                address: "a:110".into(),
                stage: ConnectStage::Setup,
                reason: Reason::NoReply(Duration::from_secs(10)),
            }]
        );
        // No failover after the set-up: the address is not marked dead.
        assert!(whole.dead.is_empty());
        assert_eq!(whole.replay, b"<dial a:110>USER alice\r\n");
        assert_eq!(
            whole.client,
            [&b"+OK popgate ready\r\n+OK\r\n"[..], UNAVAILABLE].concat()
        );
        for n in 1..16 {
            assert_eq!(run(n), whole, "chunks of {n}");
        }
    }

    #[test]
    fn a_shutdown_during_the_routed_login_ends_it_with_nothing_more_upstream() {
        for n in [1, 3, 64] {
            let mut d = routed(&["a:110"]);
            d.client(b"USER alice\r\nPASS pw\r\nSTAT\r\n", n);
            d.server(b"+OK hi\r\n", n);
            assert!(d.session.connecting().is_some());
            d.session.on_shutdown();
            d.drain();
            assert!(d.session.connecting().is_none());
            assert_eq!(
                d.session.poll_timeout(),
                None,
                "the login's deadline is gone"
            );
            assert_eq!(d.trace.close, Some(CloseReason::Shutdown));
            // No QUIT, nothing after the line already replayed; no login end recorded.
            assert_eq!(d.trace.replay, b"<dial a:110>USER alice\r\n");
            assert!(d.trace.upstream.is_empty() && d.trace.ends.is_empty());
            // PASS is owed no answer of popgate's (the driver says it is shutting down).
            assert_eq!(d.trace.client, b"+OK popgate ready\r\n+OK\r\n");
        }
    }

    /// A direct-mode connector without a login, as the driver builds it: the greeting read
    /// in the set-up when `read_greeting`, the PROXY `header` first if any, 5 s to connect.
    fn setup_connector(
        addresses: Vec<String>,
        read_greeting: bool,
        header: Option<&[u8]>,
        now: Instant,
    ) -> Connector {
        let plan = crate::proxy::dialogue::Plan {
            tls: crate::config::TlsMode::None,
            tls_configured: false,
            proxy_header: header.map(<[u8]>::to_vec),
            xclient: None,
            read_greeting,
            max_line: 512,
            login: None,
        };
        let timeouts = crate::proxy::dialogue::ConnectTimeouts {
            connect: Duration::from_secs(5),
            dead_for: Duration::from_secs(60),
            reply: None,
        };
        Connector::new(plan, addresses, timeouts, now)
    }

    impl Driver {
        /// Direct mode: the session connects `addresses` itself (the greeting read in the
        /// set-up when there are two, as `greeting_in_setup` says), each dial answered as
        /// `dials` says; the client sent `early` during the connect phase.
        fn setup(addresses: &[&str], dials: Vec<Option<bool>>, early: &[u8]) -> Driver {
            let now = Instant::now();
            let rules = Arc::new(RuleSet::parse("", Path::new("none.toml")).unwrap());
            let hop = Hop::new(cfg(false), Policy::new(rules), now, now);
            let addresses: Vec<String> = addresses.iter().map(|a| (*a).to_owned()).collect();
            let greeting = crate::proxy::connect::greeting_in_setup(addresses.len());
            let c = setup_connector(addresses, greeting, None, now);
            let mut session = Session::new(hop, None);
            session.connect_upstream(c);
            let mut d = Driver {
                session,
                cin: BytesMut::from(early),
                sin: BytesMut::new(),
                now,
                outcomes: VecDeque::new(),
                trace: Trace::default(),
                socket: Vec::new(),
                penalty: None,
                addresses: None,
                bearer: None,
                dials: Some(dials.into()),
                redial: None,
            };
            d.session.start(now, &mut d.sin, &mut d.cin);
            d.drain();
            d
        }

        fn client_eof(&mut self) {
            self.session.on_client_eof();
            self.drain();
        }
    }

    const SHUTTING_DOWN: &[u8] = b"-ERR [SYS/TEMP] proxy shutting down\r\n";

    #[test]
    fn a_client_that_hangs_up_during_a_slow_dial_ends_the_session_at_once_with_nothing_more_dialled()
     {
        // a's dial never completes (it would take the connect timeout, then b's turn).
        let mut d = Driver::setup(&["a:110", "b:110"], vec![None], b"");
        assert!(
            d.session.wants_client_input(),
            "the client is read during the dial"
        );
        d.client_eof();
        assert_eq!(d.trace.close, Some(CloseReason::ClientEof));
        // Nothing more dialled, nothing upstream (no QUIT), nothing said to the client,
        // no connect end recorded (the connector was abandoned, not failed).
        assert_eq!(d.trace.replay, b"<dial a:110>");
        assert!(d.trace.upstream.is_empty() && d.trace.client.is_empty());
        assert!(d.trace.ends.is_empty() && d.trace.dead.is_empty());
        assert_eq!(d.session.connecting(), None);
        assert!(!d.session.wants_client_input() && !d.session.wants_server_input());
    }

    #[test]
    fn commands_then_a_half_close_during_the_dial_are_relayed_and_answered() {
        // `printf 'USER ...\r\n...QUIT\r\n' | nc -N`: the whole session, then the client's
        // FIN, all during the dial. TCP cannot tell that from a hang-up; like the relay, the
        // set-up takes it as a half-close: the commands go out after the greeting, in turn,
        // and their answers come back.
        let client = b"CAPA\r\nUSER alice\r\nQUIT\r\n";
        let server = b"+OK hi\r\n";
        for one_address in [true, false] {
            for n in 1..=client.len() {
                let addresses: &[&str] = if one_address {
                    &["a:110"]
                } else {
                    &["a:110", "b:110"]
                };
                // The dial is answered by hand, after the FIN.
                let mut d = Driver::setup(addresses, vec![None], b"");
                assert_eq!(d.session.connecting(), Some(UpstreamPurpose::Setup));
                d.client(client, n);
                d.client_eof();
                assert_eq!(d.trace.close, None, "chunks of {n}");
                assert!(
                    !d.session.wants_client_input(),
                    "nothing more is read after the FIN"
                );
                d.session.dialled(d.now);
                d.drain();
                d.server(server, n);
                for answer in [&b"+OK\r\nUSER\r\n.\r\n"[..], b"+OK\r\n", b"+OK bye\r\n"] {
                    d.server(answer, n);
                }
                assert_eq!(d.trace.upstream, client, "chunks of {n}");
                assert_eq!(
                    d.trace.client, b"+OK hi\r\n+OK\r\nUSER\r\n.\r\n+OK\r\n+OK bye\r\n",
                    "chunks of {n}"
                );
                assert_eq!(d.trace.replay, b"<dial a:110>");
            }
        }
    }

    #[test]
    fn client_bytes_sent_during_the_set_up_are_kept_and_relayed_after_the_greeting() {
        let client = b"CAPA\r\nUSER alice\r\nPASS pw\r\n";
        let server = b"+OK hi\r\n";
        let answers = b"+OK\r\nUSER\r\n.\r\n+OK\r\n+OK in\r\n";
        // a refuses, b connects and greets (read in the set-up: two addresses).
        let run = |early: &[u8], during: &[u8], after: &[u8], n: usize| {
            let mut d = Driver::setup(&["a:110", "b:110"], vec![Some(false), Some(true)], early);
            assert_eq!(d.session.connecting(), Some(UpstreamPurpose::Setup));
            d.client(during, n);
            assert!(
                d.trace.upstream.is_empty(),
                "nothing relayed before the greeting"
            );
            d.server(server, n);
            assert_eq!(d.session.connecting(), None);
            d.client(after, n);
            // Each answer lets the next command go (no PIPELINING announced).
            for answer in [&b"+OK\r\nUSER\r\n.\r\n"[..], b"+OK\r\n", b"+OK in\r\n"] {
                d.server(answer, n);
                d.client(b"", n);
            }
            d.trace
        };
        let want = run(b"", b"", client, client.len());
        assert_eq!(want.upstream, client);
        assert_eq!(
            want.client,
            [&server[..], &answers[..]].concat(),
            "the greeting, then the answers"
        );
        assert_eq!(want.dead, ["a:110"]);
        assert_eq!(want.replay, b"<dial a:110><dial b:110>");
        assert_eq!(want.purposes, [UpstreamPurpose::Setup]);
        assert_eq!(
            want.ends,
            [UpstreamEnd::Connected {
                address: "b:110".into(),
                octets: server.len()
            }]
        );
        // Kept during the connect phase (a rule's delay), during the set-up, or read after:
        // the same session, cut anywhere, at every chunk size.
        for cut in 0..=client.len() {
            for n in [1, 2, 5, client.len()] {
                let got = run(&client[..cut], &client[cut..], b"", n);
                assert_eq!(got, want, "{cut} octets before the dial, chunks of {n}");
                let got = run(b"", &client[..cut], &client[cut..], n);
                assert_eq!(got, want, "{cut} octets during the set-up, chunks of {n}");
            }
        }
    }

    #[test]
    fn a_session_in_its_relay_keeps_no_buffer_of_the_set_ups_outputs() {
        // An idle session lives for hours: what the set-up queued is not kept for it.
        let mut d = Driver::setup(&["a:110", "b:110"], vec![Some(true)], b"CAPA\r\n");
        d.server(b"+OK hi\r\n", 8);
        assert_eq!(d.session.connecting(), None);
        assert_eq!(d.trace.purposes, [UpstreamPurpose::Setup]);
        assert_eq!(d.session.out.capacity(), 0);
    }

    #[test]
    fn the_set_up_reads_the_client_only_up_to_the_early_input_limit() {
        let limit = crate::proxy::connect::early_input_limit(512, 8);
        let line = b"NOOP\r\n".repeat(2 * limit / 6);
        for n in [1000, 4096] {
            let mut d = Driver::setup(&["a:110"], vec![None], b"");
            d.client(&line, n);
            assert!(!d.session.wants_client_input());
            assert!(
                d.cin.len() >= limit && d.cin.len() < limit + n,
                "{}",
                d.cin.len()
            );
            assert!(!d.socket.is_empty(), "the rest waits in the socket");
        }
    }

    #[test]
    fn an_upstream_that_cannot_be_had_is_answered_unavailable_and_the_session_closes() {
        let client = b"USER alice\r\n";
        for n in 1..=client.len() {
            let mut d = Driver::setup(&["a:110", "b:110"], vec![None], b"CAPA\r\n");
            d.client(client, n);
            // a never answers: the connect timeout fails it over; b refuses.
            d.dials = Some(VecDeque::from([Some(false)]));
            d.fire();
            assert_eq!(d.trace.close, Some(CloseReason::Error));
            assert_eq!(d.trace.client, UNAVAILABLE);
            assert!(d.trace.upstream.is_empty(), "nothing relayed");
            assert_eq!(d.trace.dead, ["a:110", "b:110"]);
            assert_eq!(d.trace.purposes, [UpstreamPurpose::Setup]);
            assert_eq!(
                d.trace.ends,
                [UpstreamEnd::Unavailable {
                    address: "b:110".into(),
                    stage: ConnectStage::Tcp,
                    reason: Reason::Tcp("refused".into()),
                }]
            );
        }
    }

    #[test]
    fn the_hops_greeting_timeout_counts_from_the_connect_not_from_the_dial() {
        // One address: the greeting is the relay's to read.
        let mut d = Driver::setup(&["a:110"], vec![None], b"");
        let dial = d.now;
        assert_eq!(
            d.session.poll_timeout(),
            Some(dial + Duration::from_secs(5))
        );
        d.now += Duration::from_secs(4);
        d.session.dialled(d.now);
        d.drain();
        assert_eq!(d.session.connecting(), None);
        assert_eq!(
            d.session.poll_timeout(),
            Some(d.now + Duration::from_secs(30)),
            "the greeting timeout, from the connect"
        );
        assert!(d.session.wants_server_input());
    }

    #[test]
    fn a_shutdown_during_the_set_up_answers_shutting_down_and_dials_nothing_more() {
        for early in [&b""[..], b"USER alice\r\n"] {
            let mut d = Driver::setup(&["a:110", "b:110"], vec![None], early);
            d.session.on_shutdown();
            d.drain();
            assert_eq!(d.trace.close, Some(CloseReason::Shutdown));
            assert_eq!(d.trace.client, SHUTTING_DOWN);
            assert_eq!(d.trace.replay, b"<dial a:110>");
            assert!(d.trace.upstream.is_empty() && d.trace.ends.is_empty());
            assert_eq!(
                d.session.poll_timeout(),
                None,
                "the connect timeout is gone"
            );
        }
    }

    /// Direct mode with PROXY v2 whose re-dial after STLS the session carries out over `b`.
    fn redialling() -> Driver {
        let mut d = Driver::direct(true);
        d.redial = Some(vec!["b:110".into()]);
        d
    }

    #[test]
    fn a_redial_that_greets_ok_takes_over_and_the_held_command_goes_out_after_it() {
        for n in 1..=8 {
            let mut d = redialling();
            d.client(b"STLS\r\n", n);
            d.client(b"USER alice\r\n", n);
            assert_eq!(d.session.connecting(), Some(UpstreamPurpose::Redial));
            assert!(
                !d.session.wants_client_input(),
                "the client waits for the re-dial"
            );
            // The header went to the new connection; the command waits for its greeting.
            assert_eq!(d.trace.replay, b"<dial b:110><v2>");
            assert_eq!(d.trace.upstream, b"<redial>");
            d.server(b"+OK new\r\n", n);
            assert_eq!(d.trace.upstream, b"<redial>USER alice\r\n");
            assert_eq!(
                d.trace.ends,
                [UpstreamEnd::Connected {
                    address: "b:110".into(),
                    octets: 9
                }]
            );
            assert_eq!(d.trace.purposes, [UpstreamPurpose::Redial]);
            // The new greeting is taken silently.
            assert!(!d.trace.client.windows(3).any(|w| w == b"new"));
            d.server(b"+OK\r\n", n);
            assert!(d.trace.client.ends_with(b"+OK\r\n"));
        }
    }

    #[test]
    fn a_redial_that_fails_or_is_not_greeted_ok_keeps_the_first_connection() {
        for n in 1..=8 {
            // b greets -ERR: the session stays on the first connection.
            let mut d = redialling();
            d.client(b"STLS\r\n", n);
            d.client(b"USER alice\r\n", n);
            d.server(b"-ERR busy\r\n", n);
            assert_eq!(
                d.trace.ends,
                [UpstreamEnd::NotGreeted {
                    address: "b:110".into(),
                    greeting: b"-ERR busy\r\n".to_vec()
                }]
            );
            assert_eq!(d.trace.upstream, b"<redial>USER alice\r\n");
            assert!(!d.trace.client.windows(4).any(|w| w == b"busy"));
            // b refuses the dial.
            let mut d = redialling();
            d.dials = Some(VecDeque::from([Some(false)]));
            d.client(b"STLS\r\n", n);
            d.client(b"USER alice\r\n", n);
            assert!(matches!(
                d.trace.ends[..],
                [UpstreamEnd::Unavailable { .. }]
            ));
            assert_eq!(d.trace.upstream, b"<redial>USER alice\r\n");
            assert_eq!(
                d.trace.client, b"+OK hi\r\n+OK begin TLS negotiation\r\n",
                "no unavailable line"
            );
            assert_eq!(d.trace.close, None);
            // b never answers: the connect timeout, then the first connection.
            let mut d = redialling();
            d.dials = Some(VecDeque::from([None]));
            d.client(b"STLS\r\n", n);
            d.client(b"USER alice\r\n", n);
            assert_eq!(d.session.connecting(), Some(UpstreamPurpose::Redial));
            d.fire();
            assert_eq!(d.trace.upstream, b"<redial>USER alice\r\n");
        }
    }

    #[test]
    fn a_shutdown_while_the_redial_dials_sends_the_held_command_nowhere() {
        let mut d = redialling();
        d.dials = Some(VecDeque::from([None]));
        d.client(b"STLS\r\n", 64);
        d.client(b"USER alice\r\n", 64);
        assert_eq!(d.session.connecting(), Some(UpstreamPurpose::Redial));
        d.session.on_shutdown();
        d.drain();
        assert_eq!(d.trace.close, Some(CloseReason::Shutdown));
        assert_eq!(d.trace.upstream, b"<redial>");
        assert!(d.trace.ends.is_empty());
        assert!(d.trace.client.ends_with(SHUTTING_DOWN));
    }

    impl Driver {
        /// A session whose connect phase is the session's own: a `connect` rule's delay of
        /// 3 s (and with `refusal` that rule's line after it); routing mode, or direct mode
        /// whose upstream is `a:110`.
        fn delayed(routing: bool, refusal: Option<&[u8]>) -> Driver {
            let now = Instant::now();
            let rules = Arc::new(RuleSet::parse("", Path::new("none.toml")).unwrap());
            let hop = Hop::new(cfg(false), Policy::new(rules), now, now);
            let admission = crate::proxy::connect::Admission {
                delay: Some(Duration::from_secs(3)),
                refusal: refusal.map(|r| crate::proxy::connect::ConnectRefusal {
                    rule: Arc::from("slow-no"),
                    reply: Some(r.to_vec()),
                }),
                tags: Vec::new(),
            };
            let limit = hop.early_input_limit();
            let mut session = Session::new(hop, routing.then(|| Front::new("popgate ready")));
            session.opening(Opening::new(admission, now, limit));
            let mut d = Driver {
                session,
                cin: BytesMut::new(),
                sin: BytesMut::new(),
                now,
                outcomes: VecDeque::from([Ok(LOGGED_IN)]),
                trace: Trace::default(),
                socket: Vec::new(),
                penalty: None,
                addresses: (!routing).then(|| vec!["a:110".to_owned()]),
                bearer: None,
                dials: None,
                redial: None,
            };
            d.session.start(now, &mut d.sin, &mut d.cin);
            d.drain();
            d
        }
    }

    #[test]
    fn the_connect_phase_is_the_sessions_and_what_the_client_sent_in_it_is_relayed_after_it() {
        let client = b"CAPA\r\nUSER alice\r\nPASS pw\r\n";
        for routing in [false, true] {
            let run = |during: &[u8], n: usize| {
                let mut d = Driver::delayed(routing, None);
                assert_eq!(d.session.stage(), SessionStage::Opening);
                assert!(!d.session.wants_server_input());
                let at = d.session.poll_timeout().expect("the delay's end");
                assert_eq!(at, d.now + Duration::from_secs(3));
                d.client(during, n);
                assert!(
                    d.trace.client.is_empty() && d.trace.replay.is_empty(),
                    "in the delay"
                );
                d.fire();
                // Direct mode: the connector is asked for and dialled (the greeting is the
                // relay's to read, one address); routing mode: the front greets.
                assert_eq!(d.session.stage(), SessionStage::Relaying);
                d.client(&client[during.len()..], n);
                if !routing {
                    assert_eq!(d.trace.replay, b"<dial a:110>");
                    d.server(b"+OK hi\r\n", n);
                    for answer in [&b"+OK\r\nUSER\r\n.\r\n"[..], b"+OK\r\n", b"+OK in\r\n"] {
                        d.client(b"", n);
                        d.server(answer, n);
                    }
                }
                d.client(b"", n);
                d.trace
            };
            let want = run(b"", client.len());
            assert!(
                want.client.ends_with(b"+OK logged in\r\n") || want.client.ends_with(b"+OK in\r\n")
            );
            for cut in 0..=client.len() {
                for n in [1, 3, client.len()] {
                    let got = run(&client[..cut], n);
                    assert_eq!(
                        got, want,
                        "routing {routing}, {cut} octets in the delay, chunks of {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_client_that_hangs_up_in_the_connect_phase_ends_the_session_with_nothing_dialled() {
        for routing in [false, true] {
            for n in [1, 4, 64] {
                let mut d = Driver::delayed(routing, None);
                d.client(b"USER alice\r\n", n);
                d.client_eof();
                assert_eq!(d.trace.close, Some(CloseReason::ClientEof));
                assert_eq!(d.session.stage(), SessionStage::Opening, "never let in");
                assert!(d.trace.client.is_empty() && d.trace.replay.is_empty());
                assert!(d.trace.logins.is_empty() && d.trace.upstream.is_empty());
            }
        }
    }

    #[test]
    fn a_refusal_after_the_delay_answers_with_the_rules_line_and_a_shutdown_with_its_own() {
        let deny = b"-ERR [SYS/PERM] not here\r\n";
        for routing in [false, true] {
            let mut d = Driver::delayed(routing, Some(deny));
            d.client(b"USER alice\r\n", 5);
            assert_eq!(d.trace.close, None, "not before the delay's end");
            d.fire();
            assert_eq!(d.trace.close, Some(CloseReason::RuleDrop));
            assert_eq!(d.trace.client, deny);
            assert_eq!(
                d.session.hop().close_marks().dropped_by.as_deref(),
                Some("slow-no")
            );
            assert!(d.trace.replay.is_empty() && d.trace.logins.is_empty());
            // A shutdown (or kick) during the delay: popgate's -ERR, nothing dialled.
            let mut d = Driver::delayed(routing, Some(deny));
            d.session.on_shutdown();
            d.drain();
            assert_eq!(d.trace.close, Some(CloseReason::Shutdown));
            assert_eq!(d.trace.client, SHUTTING_DOWN);
            assert!(d.trace.replay.is_empty());
        }
    }

    #[test]
    fn a_client_read_error_in_the_connect_phase_is_the_sessions_to_end() {
        for (disconnect, reason) in [(true, CloseReason::ClientEof), (false, CloseReason::Error)] {
            let mut d = Driver::delayed(false, None);
            assert!(d.session.on_client_error(disconnect));
            d.drain();
            assert_eq!(d.trace.close, Some(reason));
            // Past the connect phase a read error is the driver's to end the session with.
            let mut d = Driver::delayed(false, None);
            d.fire();
            assert!(!d.session.on_client_error(disconnect));
        }
    }
}
