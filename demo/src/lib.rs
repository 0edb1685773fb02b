//! An in-memory RFC 1939 POP3 server with fault injection.
//!
//! It backs `popgate demo` (the proxy in front of a sample maildrop) and serves integration tests
//! as a scriptable upstream.
//!
//! With the `faults` cargo feature (popgate enables it from its `[dev-dependencies]` only, so it
//! is in neither the proxy library nor the release binary) it can misbehave on request (`Faults`,
//! `ServerOptions::faults`), and tests can probe it: every line it received, `QUIT`s counted,
//! connections, maildrop contents and locks (`DemoServer::received` and its neighbours).
//!
//! The server is meant to be *correct*: AUTHORIZATION / TRANSACTION / UPDATE states, `DELE` that
//! only takes effect on `QUIT` (a lost connection deletes nothing), `RSET`, stable message
//! numbers, a per-user maildrop lock (`-ERR [IN-USE]`), dot-stuffing on `RETR`/`TOP`, `CAPA`,
//! `USER`/`PASS`, `APOP`, `AUTH PLAIN`/`LOGIN`, `STLS` and implicit TLS, and pipelined commands
//! answered in order. Messages are kept in wire form (CRLF line ends, not dot-stuffed); sizes in
//! `LIST`/`STAT` are octets of that form.
//!
//! It is its own crate, independent of the proxy, so the proxy is tested against a server that
//! reads the protocol for itself.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use md5::{Digest as _, Md5};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub use popgate_wire::command::Verb;
use popgate_wire::command::{Command, line_end, trim_eol};
use popgate_wire::response::dot_stuff;

/// Name the server gives itself in its greeting, `CAPA IMPLEMENTATION` and APOP timestamps.
pub const SERVER_NAME: &str = "popgate-demo";

/// Longest command line (including its line end) the server accepts before closing.
pub const MAX_LINE: usize = 8 * 1024;

/// One user's maildrop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mailbox {
    /// Login name.
    pub user: String,
    /// Password for `PASS`, `APOP` and SASL.
    pub password: String,
    /// Messages in wire form: CRLF line ends, not dot-stuffed.
    pub messages: Vec<Vec<u8>>,
}

impl Mailbox {
    /// A mailbox for `user` with `password` holding `messages` (wire form).
    pub fn new(
        user: impl Into<String>,
        password: impl Into<String>,
        messages: Vec<Vec<u8>>,
    ) -> Self {
        Mailbox {
            user: user.into(),
            password: password.into(),
            messages,
        }
    }
}

/// Turn text with `\n` line ends into wire form (CRLF).
fn wire(text: &str) -> Vec<u8> {
    text.replace('\n', "\r\n").into_bytes()
}

/// The demo maildrops: `demo` / `demo-password` with three messages (the second has body lines
/// starting with `.`, one of them a lone `.`), and `alice` / `alice-password` with one message.
pub fn sample_mailboxes() -> Vec<Mailbox> {
    let demo = vec![
        wire(
            "Return-Path: <carol@example.org>\n\
             Date: Mon, 3 Mar 2025 09:12:44 +0100\n\
             From: Carol Jones <carol@example.org>\n\
             To: Demo User <demo@example.com>\n\
             Subject: Welcome to popgate\n\
             Message-ID: <welcome-1@example.org>\n\
             MIME-Version: 1.0\n\
             Content-Type: text/plain; charset=utf-8\n\
             \n\
             Hi,\n\
             \n\
             this maildrop is served by the popgate demo server.\n\
             Try RETR, TOP, DELE and QUIT through the proxy.\n\
             \n\
             Carol\n",
        ),
        wire(
            "Date: Tue, 4 Mar 2025 14:02:10 +0000\n\
             From: Build Bot <ci@example.net>\n\
             To: demo@example.com\n\
             Subject: Nightly build report\n\
             Message-ID: <build-2217@example.net>\n\
             Content-Type: text/plain; charset=us-ascii\n\
             \n\
             Build 2217 passed.\n\
             .hidden files were skipped by the packager\n\
             ..double dot line stays double-dotted plus one\n\
             .\n\
             The line above is a lone dot; POP3 must dot-stuff it.\n",
        ),
        wire(
            "Date: Wed, 5 Mar 2025 18:45:00 -0500\n\
             From: Dave <dave@example.com>\n\
             To: demo@example.com\n\
             Cc: carol@example.org\n\
             Subject: Re: lunch on Friday?\n\
             Message-ID: <lunch-77@example.com>\n\
             In-Reply-To: <lunch-76@example.org>\n\
             Content-Type: text/plain; charset=utf-8\n\
             \n\
             Friday works. Noon at the usual place?\n\
             \n\
             > Are you free for lunch on Friday?\n\
             \n\
             Dave\n",
        ),
    ];
    let alice = vec![wire(
        "Date: Thu, 6 Mar 2025 08:00:00 +0000\n\
         From: Bob <bob@example.org>\n\
         To: Alice <alice@example.com>\n\
         Subject: Quarterly numbers\n\
         Message-ID: <q1-numbers@example.org>\n\
         \n\
         Alice, the figures are in the shared folder.\n\
         Bob\n",
    )];
    vec![
        Mailbox::new("demo", "demo-password", demo),
        Mailbox::new("alice", "alice-password", alice),
    ]
}

/// Misbehaviour to inject (feature `faults`). `Faults::default()` is a well-behaved server.
#[cfg(any(test, feature = "faults"))]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// Accept each connection, then close it at once without a greeting.
    pub refuse: bool,
    /// Wait this long before sending the greeting.
    pub greeting_delay: Option<Duration>,
    /// Wait this long before every response (including SASL challenges).
    pub response_delay: Option<Duration>,
    /// On a successful `RETR`/`TOP`: send the status line and this many body bytes, then close.
    pub die_mid_body: Option<usize>,
    /// Answer this verb with the non-POP3 line `GARBAGE\r\n` (the command is not executed).
    pub garbage_on: Option<Verb>,
    /// Answer this verb with `-ERR unknown command`, as a server without it does (UIDL and
    /// TOP are optional in RFC 1939).
    pub unknown: Option<Verb>,
    /// After `+OK` to `STLS`, in the same write, send these plaintext bytes before the handshake.
    pub stls_inject: Option<Vec<u8>>,
    /// Never answer this verb: the session goes silent (still reading) until the client leaves.
    pub silent_on: Option<Verb>,
}

/// How to run a [`DemoServer`].
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// The maildrops served (a later mailbox with the same user replaces an earlier one).
    pub mailboxes: Vec<Mailbox>,
    /// Faults to inject (feature `faults`).
    #[cfg(any(test, feature = "faults"))]
    pub faults: Faults,
    /// Server TLS configuration, needed for `offer_stls` and `implicit_tls`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Offer and accept `STLS` (only effective when `tls` is set).
    pub offer_stls: bool,
    /// Handshake TLS right after accepting (port-995 style); requires `tls`.
    pub implicit_tls: bool,
    /// Put an APOP timestamp in the greeting and accept `APOP`.
    pub apop: bool,
    /// Fold user names to lower case (ASCII only) before looking them up, as Dovecot does by
    /// default (`auth_username_format = %Lu`): `ALICE` logs in alice.
    pub fold_user_names: bool,
    /// Have no CAPA command (answer it `-ERR`), as RFC 1939-only servers such as popa3d.
    pub no_capa: bool,
    /// Do not keep received lines for [`DemoServer::received`] (which then stays empty): a
    /// long-running server with the probes (soak tests) would otherwise grow without bound.
    /// Without the `faults` feature nothing is kept anyway.
    #[cfg(any(test, feature = "faults"))]
    pub forget_lines: bool,
}

impl ServerOptions {
    /// Options serving `mailboxes` in plaintext, no faults, no APOP.
    pub fn new(mailboxes: Vec<Mailbox>) -> Self {
        ServerOptions {
            mailboxes,
            ..ServerOptions::default()
        }
    }
}

/// The APOP digest for `timestamp` (with its angle brackets) and `password`: lower-case hex MD5.
pub fn apop_digest(timestamp: &str, password: &str) -> String {
    let mut hasher = Md5::new();
    hasher.update(timestamp.as_bytes());
    hasher.update(password.as_bytes());
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[derive(Debug, Clone)]
struct StoredMessage {
    uid: String,
    data: Vec<u8>,
}

#[derive(Debug)]
struct Account {
    password: String,
    messages: Vec<StoredMessage>,
}

/// State shared by the accept loop, the sessions and the [`DemoServer`] handle.
#[derive(Debug, Default)]
struct State {
    accounts: HashMap<String, Account>,
    locked: HashSet<String>,
    #[cfg(any(test, feature = "faults"))]
    received: Vec<Vec<u8>>,
    #[cfg(any(test, feature = "faults"))]
    quits: usize,
    connections: usize,
    /// The address of every client accepted, in order.
    #[cfg(any(test, feature = "faults"))]
    peers: Vec<SocketAddr>,
}

impl State {
    fn new(mailboxes: &[Mailbox]) -> State {
        let mut state = State::default();
        let mut serial = 0usize;
        for mb in mailboxes {
            let messages = mb
                .messages
                .iter()
                .map(|data| {
                    serial += 1;
                    let digest = hex(&Md5::digest(data));
                    StoredMessage {
                        uid: format!("{serial:04}-{}", &digest[..16]),
                        data: data.clone(),
                    }
                })
                .collect();
            state.accounts.insert(
                mb.user.clone(),
                Account {
                    password: mb.password.clone(),
                    messages,
                },
            );
        }
        state
    }
}

type Shared = Arc<Mutex<State>>;

/// Lock the shared state; a poisoned lock still holds usable data (plain counters and lists).
fn lock(shared: &Mutex<State>) -> MutexGuard<'_, State> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Immutable per-server settings handed to every session.
#[derive(Debug)]
struct Config {
    #[cfg(any(test, feature = "faults"))]
    faults: Faults,
    tls: Option<Arc<rustls::ServerConfig>>,
    offer_stls: bool,
    implicit_tls: bool,
    apop: bool,
    fold_user_names: bool,
    no_capa: bool,
    #[cfg(any(test, feature = "faults"))]
    forget_lines: bool,
}

/// Listen backlog: tokio's default of 128 overflows when a soak test opens a thousand
/// sessions at once (their handshakes then stall for seconds of SYN-ACK retransmits).
const BACKLOG: u32 = 1024;

/// Bind a TCP listener with [`BACKLOG`] and `SO_REUSEADDR` (as `TcpListener::bind` sets).
fn bind_tcp(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// A running demo server. Dropping the handle shuts it down (like [`DemoServer::shutdown`]).
#[derive(Debug)]
pub struct DemoServer {
    addr: SocketAddr,
    /// For the probes.
    #[cfg(any(test, feature = "faults"))]
    shared: Shared,
    cancel: CancellationToken,
}

impl DemoServer {
    /// Bind `bind` and spawn the accept loop on the current tokio runtime.
    ///
    /// Fails if binding fails, or with `InvalidInput` if `implicit_tls` is set without `tls`.
    pub async fn start(bind: SocketAddr, opts: ServerOptions) -> io::Result<DemoServer> {
        if opts.implicit_tls && opts.tls.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "implicit TLS needs a TLS configuration",
            ));
        }
        let listener = bind_tcp(bind)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Mutex::new(State::new(&opts.mailboxes)));
        let config = Arc::new(Config {
            #[cfg(any(test, feature = "faults"))]
            faults: opts.faults,
            tls: opts.tls,
            offer_stls: opts.offer_stls,
            implicit_tls: opts.implicit_tls,
            apop: opts.apop,
            fold_user_names: opts.fold_user_names,
            no_capa: opts.no_capa,
            #[cfg(any(test, feature = "faults"))]
            forget_lines: opts.forget_lines,
        });
        let cancel = CancellationToken::new();
        tokio::spawn(accept_loop(
            listener,
            Arc::clone(&shared),
            config,
            cancel.clone(),
        ));
        Ok(DemoServer {
            addr,
            #[cfg(any(test, feature = "faults"))]
            shared,
            cancel,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting and close every session (without UPDATE: nothing is deleted).
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }
}

/// Test probes (feature `faults`).
#[cfg(any(test, feature = "faults"))]
impl DemoServer {
    /// Every raw line received from any client, in arrival order, line ends included: commands,
    /// SASL responses, lines inside TLS, and plaintext found buffered after `STLS` (discarded,
    /// never executed).
    pub fn received(&self) -> Vec<Vec<u8>> {
        lock(&self.shared).received.clone()
    }

    /// The messages now in `user`'s maildrop (after any UPDATE); empty for an unknown user.
    pub fn messages(&self, user: &str) -> Vec<Vec<u8>> {
        lock(&self.shared)
            .accounts
            .get(user)
            .map(|a| a.messages.iter().map(|m| m.data.clone()).collect())
            .unwrap_or_default()
    }

    /// Whether a session currently holds `user`'s maildrop lock.
    pub fn is_locked(&self, user: &str) -> bool {
        lock(&self.shared).locked.contains(user)
    }

    /// How many `QUIT` commands were received (in any state, answered or not).
    pub fn quit_count(&self) -> usize {
        lock(&self.shared).quits
    }

    /// How many connections were accepted so far.
    pub fn connections(&self) -> usize {
        lock(&self.shared).connections
    }

    /// The address of every client accepted so far, in order (whom the server saw).
    pub fn peers(&self) -> Vec<SocketAddr> {
        lock(&self.shared).peers.clone()
    }
}

impl Drop for DemoServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Shared,
    config: Arc<Config>,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Transient (e.g. out of descriptors): back off briefly instead of spinning.
                tracing::debug!(error = %e, "demo server: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let conn_no = {
            let mut st = lock(&shared);
            st.connections += 1;
            #[cfg(any(test, feature = "faults"))]
            st.peers.push(peer);
            st.connections
        };
        let session = Session::new(conn_no, Arc::clone(&shared), Arc::clone(&config));
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                r = session.serve(stream) => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "demo server: session ended with error");
                    }
                }
            }
        });
    }
}

/// Why a session ended abnormally.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("command line longer than {MAX_LINE} octets")]
    LineTooLong,
    #[error("TLS handshake failed: {0}")]
    Handshake(#[source] io::Error),
    #[error("TLS needed but not configured")]
    NoTls,
}

/// Buffered line framing over any stream; keeps pipelined lines for the next call.
#[derive(Debug, Default)]
struct LineReader {
    buf: Vec<u8>,
}

impl LineReader {
    /// The next complete line (with its line end), or `None` at end of stream.
    async fn next_line<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> Result<Option<Vec<u8>>, SessionError> {
        loop {
            if let Some(end) = line_end(&self.buf) {
                if end > MAX_LINE {
                    return Err(SessionError::LineTooLong);
                }
                return Ok(Some(self.buf.drain(..end).collect()));
            }
            if self.buf.len() > MAX_LINE {
                return Err(SessionError::LineTooLong);
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Take whatever is buffered (split into lines, the last possibly partial).
    fn take_lines(&mut self) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        while let Some(end) = line_end(&self.buf) {
            lines.push(self.buf.drain(..end).collect());
        }
        if !self.buf.is_empty() {
            lines.push(std::mem::take(&mut self.buf));
        }
        lines
    }
}

/// What the read loop does after a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Continue,
    Close,
    StartTls,
    /// The `silent_on` fault: read (and record) until the client leaves, answer nothing.
    #[cfg(any(test, feature = "faults"))]
    Hang,
}

/// How a run over one stream ended.
enum Outcome<S> {
    Closed,
    StartTls(S),
}

/// Holds a user's maildrop lock; releases it when dropped (QUIT, disconnect, shutdown).
#[derive(Debug)]
struct MaildropLock {
    shared: Shared,
    user: String,
}

impl Drop for MaildropLock {
    fn drop(&mut self) {
        lock(&self.shared).locked.remove(&self.user);
    }
}

#[derive(Debug)]
struct SessionMessage {
    uid: String,
    data: Vec<u8>,
    deleted: bool,
}

/// The TRANSACTION state: a snapshot of the maildrop taken at login, with deletion marks.
#[derive(Debug)]
struct Transaction {
    user: String,
    messages: Vec<SessionMessage>,
    _lock: MaildropLock,
}

#[derive(Debug)]
enum Phase {
    Authorization { user: Option<String> },
    Transaction(Box<Transaction>),
}

/// A response to a TRANSACTION command; `body_at` marks where a RETR/TOP body starts.
struct Reply {
    bytes: Vec<u8>,
    // Read only by the `die_mid_body` fault.
    #[cfg_attr(not(any(test, feature = "faults")), allow(dead_code))]
    body_at: Option<usize>,
}

impl Reply {
    /// A complete response, line ends included.
    fn raw(text: String) -> Reply {
        Reply {
            bytes: text.into_bytes(),
            body_at: None,
        }
    }

    /// A single-line response; the CRLF is added.
    fn line(text: impl AsRef<str>) -> Reply {
        let mut bytes = text.as_ref().as_bytes().to_vec();
        bytes.extend_from_slice(b"\r\n");
        Reply {
            bytes,
            body_at: None,
        }
    }
}

impl Transaction {
    fn visible(&self) -> impl Iterator<Item = (usize, &SessionMessage)> {
        self.messages
            .iter()
            .enumerate()
            .filter(|(_, m)| !m.deleted)
            .map(|(i, m)| (i + 1, m))
    }

    fn totals(&self) -> (usize, usize) {
        self.visible()
            .fold((0, 0), |(n, octets), (_, m)| (n + 1, octets + m.data.len()))
    }

    /// Look a message up by number; `Err` is the `-ERR` text.
    fn get(&self, cmd: &Command<'_>) -> Result<(usize, &SessionMessage), String> {
        let n = cmd.msg_number().map_or(0, |n| n as usize);
        match n.checked_sub(1).and_then(|i| self.messages.get(i)) {
            None => Err("-ERR no such message".into()),
            Some(m) if m.deleted => Err(format!("-ERR message {n} already deleted")),
            Some(m) => Ok((n, m)),
        }
    }

    fn execute(&mut self, cmd: &Command<'_>) -> Reply {
        match self.try_execute(cmd) {
            Ok(r) => r,
            Err(e) => Reply::line(e),
        }
    }

    fn try_execute(&mut self, cmd: &Command<'_>) -> Result<Reply, String> {
        Ok(match cmd.verb {
            Verb::Stat => {
                let (n, octets) = self.totals();
                Reply::line(format!("+OK {n} {octets}"))
            }
            Verb::List | Verb::Uidl if cmd.has_args() => {
                let (n, m) = self.get(cmd)?;
                if cmd.verb == Verb::List {
                    Reply::line(format!("+OK {n} {}", m.data.len()))
                } else {
                    Reply::line(format!("+OK {n} {}", m.uid))
                }
            }
            Verb::List => {
                let (count, octets) = self.totals();
                let mut s = format!("+OK {count} messages ({octets} octets)\r\n");
                for (n, m) in self.visible() {
                    let _ = write!(s, "{n} {}\r\n", m.data.len());
                }
                s.push_str(".\r\n");
                Reply::raw(s)
            }
            Verb::Uidl => {
                let mut s = String::from("+OK unique-id listing follows\r\n");
                for (n, m) in self.visible() {
                    let _ = write!(s, "{n} {}\r\n", m.uid);
                }
                s.push_str(".\r\n");
                Reply::raw(s)
            }
            Verb::Retr => {
                let (_, m) = self.get(cmd)?;
                let status = format!("+OK {} octets\r\n", m.data.len());
                body_reply(status, &m.data)
            }
            Verb::Top => {
                let (_, m) = self.get(cmd)?;
                let lines = cmd
                    .arg_str(1)
                    .and_then(|s| s.parse::<usize>().ok())
                    .unwrap_or(usize::MAX);
                body_reply(
                    "+OK top of message follows\r\n".into(),
                    top_of(&m.data, lines),
                )
            }
            Verb::Dele => {
                let n = self.get(cmd)?.0;
                if let Some(m) = self.messages.get_mut(n - 1) {
                    m.deleted = true;
                }
                Reply::line(format!("+OK message {n} deleted"))
            }
            Verb::Noop => Reply::line("+OK"),
            Verb::Rset => {
                for m in &mut self.messages {
                    m.deleted = false;
                }
                let (n, octets) = self.totals();
                Reply::line(format!("+OK maildrop has {n} messages ({octets} octets)"))
            }
            _ => Reply::line("-ERR command not valid in this state"),
        })
    }
}

/// Status line followed by the dot-stuffed body and the terminating `.` line.
fn body_reply(status: String, body: &[u8]) -> Reply {
    let mut bytes = status.into_bytes();
    let body_at = bytes.len();
    dot_stuff_into(&mut bytes, body);
    Reply {
        bytes,
        body_at: Some(body_at),
    }
}

/// Append `body` dot-stuffed, then the multi-line terminator (adding a CRLF if the body's last
/// line lacks a line end).
fn dot_stuff_into(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&dot_stuff(body));
    if !body.is_empty() && !body.ends_with(b"\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

/// The header block (with the blank separator line) plus the first `lines` body lines.
fn top_of(data: &[u8], lines: usize) -> &[u8] {
    let header_end = if data.starts_with(b"\r\n") {
        2
    } else {
        match data.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(i) => i + 4,
            None => return data,
        }
    };
    let mut end = header_end;
    for _ in 0..lines {
        match line_end(&data[end..]) {
            Some(len) => end += len,
            None => {
                end = data.len();
                break;
            }
        }
    }
    &data[..end]
}

/// Decode a SASL client response (`=` is the empty response).
fn decode_sasl(line: &[u8]) -> Option<Vec<u8>> {
    let text = trim_eol(line);
    if text == b"=" {
        return Some(Vec::new());
    }
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// Split a decoded PLAIN response into (user, password); `None` if malformed or if it asks to
/// act as another user.
fn parse_plain(payload: &[u8]) -> Option<(String, Vec<u8>)> {
    let mut parts = payload.splitn(3, |&b| b == 0);
    let authzid = parts.next()?;
    let authcid = parts.next()?;
    let password = parts.next()?;
    if !authzid.is_empty() && authzid != authcid {
        return None;
    }
    Some((String::from_utf8(authcid.to_vec()).ok()?, password.to_vec()))
}

/// Why a login attempt failed.
enum LoginFailure {
    BadCredentials,
    InUse,
}

struct Session {
    conn_no: usize,
    shared: Shared,
    config: Arc<Config>,
    phase: Phase,
    tls_active: bool,
    timestamp: Option<String>,
}

impl Session {
    fn new(conn_no: usize, shared: Shared, config: Arc<Config>) -> Session {
        let timestamp = config.apop.then(|| {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            format!("<{}.{conn_no}.{nanos}@{SERVER_NAME}>", std::process::id())
        });
        Session {
            conn_no,
            shared,
            config,
            phase: Phase::Authorization { user: None },
            tls_active: false,
            timestamp,
        }
    }

    /// Run one connection: optional implicit TLS, greeting, commands, optional STLS switch.
    async fn serve(mut self, stream: TcpStream) -> Result<(), SessionError> {
        #[cfg(any(test, feature = "faults"))]
        if self.config.faults.refuse {
            drop(stream);
            return Ok(());
        }
        let _ = stream.set_nodelay(true);
        tracing::debug!(conn = self.conn_no, "demo server: connection");
        if self.config.implicit_tls {
            let tls = self.handshake(stream).await?;
            self.run(tls, true).await?;
            return Ok(());
        }
        if let Outcome::StartTls(stream) = self.run(stream, true).await? {
            let tls = self.handshake(stream).await?;
            self.run(tls, false).await?;
        }
        Ok(())
    }

    async fn handshake(
        &mut self,
        stream: TcpStream,
    ) -> Result<tokio_rustls::server::TlsStream<TcpStream>, SessionError> {
        let config = self.config.tls.clone().ok_or(SessionError::NoTls)?;
        let tls = TlsAcceptor::from(config)
            .accept(stream)
            .await
            .map_err(SessionError::Handshake)?;
        self.tls_active = true;
        Ok(tls)
    }

    /// Keep `line` for [`DemoServer::received`].
    #[cfg(any(test, feature = "faults"))]
    fn record(&self, line: &[u8]) {
        if self.config.forget_lines {
            return;
        }
        lock(&self.shared).received.push(line.to_vec());
    }

    /// Without the probes nothing is kept (a long `popgate demo` run stays flat).
    #[cfg(not(any(test, feature = "faults")))]
    fn record(&self, _line: &[u8]) {}

    /// Write a response (after the configured response delay).
    async fn send<S: AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        bytes: &[u8],
    ) -> Result<(), SessionError> {
        #[cfg(any(test, feature = "faults"))]
        if let Some(d) = self.config.faults.response_delay {
            tokio::time::sleep(d).await;
        }
        stream.write_all(bytes).await?;
        stream.flush().await?;
        Ok(())
    }

    async fn send_line<S: AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        text: &str,
    ) -> Result<(), SessionError> {
        self.send(stream, format!("{text}\r\n").as_bytes()).await
    }

    /// Serve commands on one stream until it closes or `STLS` hands it back for the handshake.
    async fn run<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &mut self,
        mut stream: S,
        greet: bool,
    ) -> Result<Outcome<S>, SessionError> {
        let mut reader = LineReader::default();
        if greet {
            #[cfg(any(test, feature = "faults"))]
            if let Some(d) = self.config.faults.greeting_delay {
                tokio::time::sleep(d).await;
            }
            let greeting = match &self.timestamp {
                Some(ts) => format!("+OK {SERVER_NAME} POP3 server ready {ts}\r\n"),
                None => format!("+OK {SERVER_NAME} POP3 server ready\r\n"),
            };
            stream.write_all(greeting.as_bytes()).await?;
            stream.flush().await?;
        }
        loop {
            let line = match reader.next_line(&mut stream).await {
                Ok(Some(line)) => line,
                Ok(None) => return Ok(Outcome::Closed),
                Err(SessionError::LineTooLong) => {
                    self.send(&mut stream, b"-ERR line too long\r\n").await?;
                    let _ = stream.shutdown().await;
                    return Ok(Outcome::Closed);
                }
                Err(e) => return Err(e),
            };
            self.record(&line);
            match self.handle_line(&line, &mut stream, &mut reader).await? {
                Next::Continue => {}
                Next::Close => {
                    let _ = stream.shutdown().await;
                    return Ok(Outcome::Closed);
                }
                Next::StartTls => {
                    // Plaintext pipelined after STLS must never run inside TLS: record, discard.
                    for line in reader.take_lines() {
                        self.record(&line);
                    }
                    return Ok(Outcome::StartTls(stream));
                }
                #[cfg(any(test, feature = "faults"))]
                Next::Hang => {
                    while let Ok(Some(line)) = reader.next_line(&mut stream).await {
                        self.record(&line);
                    }
                    return Ok(Outcome::Closed);
                }
            }
        }
    }

    async fn handle_line<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &mut self,
        line: &[u8],
        stream: &mut S,
        reader: &mut LineReader,
    ) -> Result<Next, SessionError> {
        let cmd = match Command::parse(line) {
            Ok(cmd) => cmd,
            Err(e) => {
                self.send_line(stream, &format!("-ERR {e}")).await?;
                return Ok(Next::Continue);
            }
        };
        #[cfg(any(test, feature = "faults"))]
        {
            if cmd.verb == Verb::Quit {
                lock(&self.shared).quits += 1;
            }
            let faults = &self.config.faults;
            if faults.silent_on == Some(cmd.verb) {
                return Ok(Next::Hang);
            }
            if faults.garbage_on == Some(cmd.verb) {
                self.send(stream, b"GARBAGE\r\n").await?;
                return Ok(Next::Continue);
            }
            if faults.unknown == Some(cmd.verb) {
                self.send(stream, b"-ERR unknown command\r\n").await?;
                return Ok(Next::Continue);
            }
        }
        match cmd.verb {
            Verb::Capa if self.config.no_capa => {
                self.send_line(stream, "-ERR").await?;
                Ok(Next::Continue)
            }
            Verb::Capa => {
                let capa = self.capa();
                self.send(stream, capa.as_bytes()).await?;
                Ok(Next::Continue)
            }
            Verb::Quit => {
                let text = self.quit();
                self.send_line(stream, &text).await?;
                Ok(Next::Close)
            }
            Verb::Unknown => {
                self.send_line(stream, "-ERR unknown command").await?;
                Ok(Next::Continue)
            }
            _ => match &mut self.phase {
                Phase::Authorization { .. } => self.authorization(&cmd, stream, reader).await,
                Phase::Transaction(txn) => {
                    let reply = txn.execute(&cmd);
                    #[cfg(any(test, feature = "faults"))]
                    if let (Some(at), Some(n)) = (reply.body_at, self.config.faults.die_mid_body) {
                        let end = at.saturating_add(n).min(reply.bytes.len());
                        self.send(stream, &reply.bytes[..end]).await?;
                        return Ok(Next::Close);
                    }
                    self.send(stream, &reply.bytes).await?;
                    Ok(Next::Continue)
                }
            },
        }
    }

    fn capa(&self) -> String {
        let mut s = String::from(
            "+OK Capability list follows\r\nTOP\r\nUIDL\r\nUSER\r\nRESP-CODES\r\n\
             AUTH-RESP-CODE\r\nPIPELINING\r\nSASL PLAIN LOGIN\r\n",
        );
        let in_auth = matches!(self.phase, Phase::Authorization { .. });
        if in_auth && self.stls_available() {
            s.push_str("STLS\r\n");
        }
        let _ = write!(s, "IMPLEMENTATION {SERVER_NAME}\r\n.\r\n");
        s
    }

    fn stls_available(&self) -> bool {
        self.config.offer_stls && self.config.tls.is_some() && !self.tls_active
    }

    /// QUIT: in TRANSACTION, enter UPDATE (remove marked messages) and release the lock.
    fn quit(&mut self) -> String {
        let phase = std::mem::replace(&mut self.phase, Phase::Authorization { user: None });
        let Phase::Transaction(txn) = phase else {
            return format!("+OK {SERVER_NAME} signing off");
        };
        let left = {
            let mut st = lock(&self.shared);
            match st.accounts.get_mut(&txn.user) {
                Some(account) => {
                    let gone: HashSet<&str> = txn
                        .messages
                        .iter()
                        .filter(|m| m.deleted)
                        .map(|m| m.uid.as_str())
                        .collect();
                    account.messages.retain(|m| !gone.contains(m.uid.as_str()));
                    account.messages.len()
                }
                None => 0,
            }
        };
        // Release the lock before answering, so a client that reconnects at once can log in.
        drop(txn);
        format!("+OK {SERVER_NAME} signing off ({left} messages left)")
    }

    /// Check credentials, take the maildrop lock and snapshot the maildrop.
    fn login(
        &self,
        user: &str,
        check: impl FnOnce(&str) -> bool,
    ) -> Result<Transaction, LoginFailure> {
        let folded;
        let user = if self.config.fold_user_names {
            folded = user.to_ascii_lowercase();
            &folded
        } else {
            user
        };
        let messages = {
            let mut st = lock(&self.shared);
            let account = st.accounts.get(user).ok_or(LoginFailure::BadCredentials)?;
            if !check(&account.password) {
                return Err(LoginFailure::BadCredentials);
            }
            let messages = account
                .messages
                .iter()
                .map(|m| SessionMessage {
                    uid: m.uid.clone(),
                    data: m.data.clone(),
                    deleted: false,
                })
                .collect();
            if !st.locked.insert(user.to_owned()) {
                return Err(LoginFailure::InUse);
            }
            messages
        };
        Ok(Transaction {
            user: user.to_owned(),
            messages,
            _lock: MaildropLock {
                shared: Arc::clone(&self.shared),
                user: user.to_owned(),
            },
        })
    }

    /// Attempt a login and answer it; on success enter TRANSACTION.
    async fn finish_login<S: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        user: &str,
        check: impl FnOnce(&str) -> bool,
    ) -> Result<Next, SessionError> {
        let text = match self.login(user, check) {
            Ok(txn) => {
                let (n, octets) = txn.totals();
                let text = format!(
                    "+OK {}'s maildrop has {n} messages ({octets} octets)",
                    txn.user
                );
                self.phase = Phase::Transaction(Box::new(txn));
                text
            }
            Err(failure) => {
                self.phase = Phase::Authorization { user: None };
                match failure {
                    LoginFailure::BadCredentials => "-ERR [AUTH] invalid credentials".into(),
                    LoginFailure::InUse => "-ERR [IN-USE] maildrop already locked".into(),
                }
            }
        };
        self.send_line(stream, &text).await?;
        Ok(Next::Continue)
    }

    async fn authorization<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &mut self,
        cmd: &Command<'_>,
        stream: &mut S,
        reader: &mut LineReader,
    ) -> Result<Next, SessionError> {
        match cmd.verb {
            Verb::User => {
                let user = cmd.arg_str(0).unwrap_or_default().to_owned();
                self.phase = Phase::Authorization { user: Some(user) };
                self.send_line(stream, "+OK send PASS").await?;
                Ok(Next::Continue)
            }
            Verb::Pass => {
                let Phase::Authorization { user: Some(user) } = &self.phase else {
                    self.send_line(stream, "-ERR send USER first").await?;
                    return Ok(Next::Continue);
                };
                let user = user.clone();
                let given = cmd.args;
                self.finish_login(stream, &user, |pw| pw.as_bytes() == given)
                    .await
            }
            Verb::Apop => {
                let Some(ts) = self.timestamp.clone() else {
                    self.send_line(stream, "-ERR APOP not supported").await?;
                    return Ok(Next::Continue);
                };
                let user = cmd.arg_str(0).unwrap_or_default().to_owned();
                let digest = cmd.arg_str(1).unwrap_or_default().to_owned();
                self.finish_login(stream, &user, |pw| {
                    apop_digest(&ts, pw).eq_ignore_ascii_case(&digest)
                })
                .await
            }
            Verb::Auth => self.auth(cmd, stream, reader).await,
            Verb::Stls => {
                if self.tls_active {
                    self.send_line(stream, "-ERR already using TLS").await?;
                    return Ok(Next::Continue);
                }
                if !self.stls_available() {
                    self.send_line(stream, "-ERR STLS not available").await?;
                    return Ok(Next::Continue);
                }
                #[cfg_attr(not(any(test, feature = "faults")), allow(unused_mut))]
                let mut out = b"+OK begin TLS negotiation\r\n".to_vec();
                #[cfg(any(test, feature = "faults"))]
                if let Some(inject) = &self.config.faults.stls_inject {
                    out.extend_from_slice(inject);
                }
                self.send(stream, &out).await?;
                self.phase = Phase::Authorization { user: None };
                Ok(Next::StartTls)
            }
            _ => {
                self.send_line(stream, "-ERR command not valid in this state")
                    .await?;
                Ok(Next::Continue)
            }
        }
    }

    /// Send a SASL challenge and read the client's answer; `None` at end of stream.
    async fn challenge<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        stream: &mut S,
        reader: &mut LineReader,
        prompt: &str,
    ) -> Result<Option<Vec<u8>>, SessionError> {
        self.send_line(stream, prompt).await?;
        let line = reader.next_line(stream).await?;
        if let Some(l) = &line {
            self.record(l);
        }
        Ok(line)
    }

    async fn auth<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &mut self,
        cmd: &Command<'_>,
        stream: &mut S,
        reader: &mut LineReader,
    ) -> Result<Next, SessionError> {
        let Some(mech) = cmd.arg_str(0) else {
            self.send(
                stream,
                b"+OK SASL mechanisms follow\r\nPLAIN\r\nLOGIN\r\n.\r\n",
            )
            .await?;
            return Ok(Next::Continue);
        };
        let initial = cmd.arg_list().nth(1).map(<[u8]>::to_vec);
        let mech = mech.to_ascii_uppercase();
        // Each step yields the client's line, or ends the exchange.
        let mut steps = Vec::new();
        let prompts: &[&str] = match mech.as_str() {
            "PLAIN" => &["+ "],
            "LOGIN" => &["+ VXNlcm5hbWU6", "+ UGFzc3dvcmQ6"],
            _ => {
                self.send_line(stream, "-ERR unsupported SASL mechanism")
                    .await?;
                return Ok(Next::Continue);
            }
        };
        for (i, prompt) in prompts.iter().enumerate() {
            let line = match (i, &initial) {
                (0, Some(first)) => first.clone(),
                _ => match self.challenge(stream, reader, prompt).await? {
                    Some(line) => line,
                    None => return Ok(Next::Close),
                },
            };
            if trim_eol(&line) == b"*" {
                self.phase = Phase::Authorization { user: None };
                self.send_line(stream, "-ERR authentication cancelled")
                    .await?;
                return Ok(Next::Continue);
            }
            match decode_sasl(&line) {
                Some(decoded) => steps.push(decoded),
                None => {
                    self.phase = Phase::Authorization { user: None };
                    self.send_line(stream, "-ERR invalid base64 in SASL response")
                        .await?;
                    return Ok(Next::Continue);
                }
            }
        }
        let creds = match (mech.as_str(), steps.as_slice()) {
            ("PLAIN", [payload]) => parse_plain(payload),
            ("LOGIN", [user, password]) => String::from_utf8(user.clone())
                .ok()
                .map(|u| (u, password.clone())),
            _ => None,
        };
        let Some((user, password)) = creds else {
            self.phase = Phase::Authorization { user: None };
            self.send_line(stream, "-ERR [AUTH] invalid credentials")
                .await?;
            return Ok(Next::Continue);
        };
        self.finish_login(stream, &user, |pw| pw.as_bytes() == password.as_slice())
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::time::timeout;

    const LIMIT: Duration = Duration::from_secs(10);

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    async fn server(opts: ServerOptions) -> DemoServer {
        DemoServer::start(loopback(), opts).await.unwrap()
    }

    async fn sample() -> DemoServer {
        server(ServerOptions::new(sample_mailboxes())).await
    }

    /// A raw line-oriented test client over any stream.
    struct Client<S> {
        r: BufReader<S>,
    }

    impl Client<TcpStream> {
        async fn connect(addr: SocketAddr) -> (Client<TcpStream>, String) {
            let stream = TcpStream::connect(addr).await.unwrap();
            let mut c = Client {
                r: BufReader::new(stream),
            };
            let greeting = c.line().await;
            (c, greeting)
        }
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
        fn over(stream: S) -> Client<S> {
            Client {
                r: BufReader::new(stream),
            }
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.r.get_mut().write_all(bytes).await.unwrap();
        }

        /// One response line with its line end; empty string at EOF.
        async fn line(&mut self) -> String {
            let mut buf = Vec::new();
            self.r.read_until(b'\n', &mut buf).await.unwrap();
            String::from_utf8(buf).unwrap()
        }

        async fn cmd(&mut self, line: &str) -> String {
            self.send(format!("{line}\r\n").as_bytes()).await;
            self.line().await
        }

        /// Lines of a multi-line body up to (not including) the terminator, still stuffed.
        async fn body(&mut self) -> Vec<String> {
            let mut out = Vec::new();
            loop {
                let l = self.line().await;
                assert!(!l.is_empty(), "EOF inside multi-line response");
                if l == ".\r\n" {
                    return out;
                }
                out.push(l);
            }
        }

        async fn login(&mut self, user: &str, pass: &str) -> String {
            assert!(self.cmd(&format!("USER {user}")).await.starts_with("+OK"));
            self.cmd(&format!("PASS {pass}")).await
        }

        async fn at_eof(&mut self) -> bool {
            let mut buf = Vec::new();
            matches!(
                timeout(LIMIT, self.r.read_to_end(&mut buf)).await,
                Ok(Ok(0)) | Ok(Err(_))
            )
        }
    }

    fn b64(s: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn top_and_stuffing_helpers() {
        let msg = b"A: 1\r\nB: 2\r\n\r\nl1\r\n.l2\r\nl3\r\n";
        assert_eq!(top_of(msg, 0), b"A: 1\r\nB: 2\r\n\r\n");
        assert_eq!(top_of(msg, 2), b"A: 1\r\nB: 2\r\n\r\nl1\r\n.l2\r\n");
        assert_eq!(top_of(msg, 99), msg);
        assert_eq!(top_of(b"A: 1\r\n", 3), b"A: 1\r\n");
        let mut out = Vec::new();
        dot_stuff_into(&mut out, b".a\r\nb\r\n.\r\nno-eol");
        assert_eq!(out, b"..a\r\nb\r\n..\r\nno-eol\r\n.\r\n");
        assert_eq!(
            apop_digest("<1896.697170952@dbc.mtview.ca.us>", "tanstaaf"),
            "c4c9334bac560ecc979e58001b3e22fb"
        );
    }

    #[tokio::test]
    async fn user_pass_login_and_state_errors() {
        timeout(LIMIT, async {
            let srv = sample().await;
            let (mut c, greeting) = Client::connect(srv.local_addr()).await;
            assert!(greeting.starts_with("+OK popgate-demo"), "{greeting}");
            assert!(!greeting.contains('<'));
            assert!(c.cmd("STAT").await.starts_with("-ERR"));
            assert!(c.cmd("PASS x").await.starts_with("-ERR"));
            assert_eq!(c.cmd("XYZZY").await, "-ERR unknown command\r\n");
            assert!(c.cmd("RETR").await.starts_with("-ERR"));
            assert_eq!(
                c.login("demo", "wrong").await,
                "-ERR [AUTH] invalid credentials\r\n"
            );
            assert_eq!(
                c.login("nobody", "demo-password").await,
                "-ERR [AUTH] invalid credentials\r\n"
            );
            let ok = c.login("demo", "demo-password").await;
            assert!(ok.starts_with("+OK demo's maildrop has 3 messages"), "{ok}");
            assert!(c.cmd("USER demo").await.starts_with("-ERR"));
            assert_eq!(c.cmd("noop").await, "+OK\r\n");
            assert!(c.cmd("QUIT").await.starts_with("+OK"));
            assert!(c.at_eof().await);
            assert_eq!(srv.quit_count(), 1);
            assert_eq!(srv.connections(), 1);
            assert!(srv.received().contains(&b"PASS demo-password\r\n".to_vec()));
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn apop_login() {
        timeout(LIMIT, async {
            let mut opts = ServerOptions::new(sample_mailboxes());
            opts.apop = true;
            let srv = server(opts).await;
            let (mut c, greeting) = Client::connect(srv.local_addr()).await;
            let start = greeting.find('<').unwrap();
            let end = greeting.find('>').unwrap();
            let ts = &greeting[start..=end];
            assert!(ts.ends_with("@popgate-demo>"), "{ts}");
            let bad = apop_digest(ts, "nope");
            assert_eq!(
                c.cmd(&format!("APOP demo {bad}")).await,
                "-ERR [AUTH] invalid credentials\r\n"
            );
            let good = apop_digest(ts, "demo-password").to_uppercase();
            assert!(c.cmd(&format!("APOP demo {good}")).await.starts_with("+OK"));
            assert!(c.cmd("STAT").await.starts_with("+OK 3 "));

            // Without a timestamp APOP is refused.
            let plain = sample().await;
            let (mut c, _) = Client::connect(plain.local_addr()).await;
            assert_eq!(
                c.cmd(&format!("APOP demo {good}")).await,
                "-ERR APOP not supported\r\n"
            );
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn auth_plain_both_forms_cancel_and_listing() {
        timeout(LIMIT, async {
            let srv = sample().await;
            let (mut c, _) = Client::connect(srv.local_addr()).await;
            assert_eq!(c.cmd("AUTH").await, "+OK SASL mechanisms follow\r\n");
            assert_eq!(c.body().await, vec!["PLAIN\r\n", "LOGIN\r\n"]);
            assert!(c.cmd("AUTH CRAM-MD5").await.starts_with("-ERR"));
            // Cancelled exchange.
            assert_eq!(c.cmd("AUTH PLAIN").await, "+ \r\n");
            assert_eq!(c.cmd("*").await, "-ERR authentication cancelled\r\n");
            // Wrong password, initial response.
            let bad = b64(b"\0demo\0nope");
            assert_eq!(
                c.cmd(&format!("AUTH PLAIN {bad}")).await,
                "-ERR [AUTH] invalid credentials\r\n"
            );
            // Continuation form.
            assert_eq!(c.cmd("AUTH PLAIN").await, "+ \r\n");
            let good = b64(b"\0demo\0demo-password");
            assert!(c.cmd(&good).await.starts_with("+OK demo's maildrop"));
            assert!(c.cmd("QUIT").await.starts_with("+OK"));

            // Initial-response form, with authzid equal to authcid.
            let (mut c, _) = Client::connect(srv.local_addr()).await;
            let good = b64(b"alice\0alice\0alice-password");
            assert!(
                c.cmd(&format!("AUTH PLAIN {good}"))
                    .await
                    .starts_with("+OK alice's maildrop has 1 messages")
            );
            // Acting as someone else is refused.
            let (mut c2, _) = Client::connect(srv.local_addr()).await;
            let other = b64(b"demo\0alice\0alice-password");
            assert!(
                c2.cmd(&format!("AUTH PLAIN {other}"))
                    .await
                    .starts_with("-ERR [AUTH]")
            );
            assert!(c2.cmd("AUTH PLAIN !!!").await.starts_with("-ERR"));
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn auth_login() {
        timeout(LIMIT, async {
            let srv = sample().await;
            let (mut c, _) = Client::connect(srv.local_addr()).await;
            assert_eq!(c.cmd("AUTH LOGIN").await, "+ VXNlcm5hbWU6\r\n");
            assert_eq!(c.cmd(&b64(b"demo")).await, "+ UGFzc3dvcmQ6\r\n");
            assert!(c.cmd(&b64(b"demo-password")).await.starts_with("+OK"));
            assert!(c.cmd("AUTH LOGIN").await.starts_with("-ERR"));
            c.cmd("QUIT").await;

            // Username as initial response; cancel at the password prompt.
            let (mut c, _) = Client::connect(srv.local_addr()).await;
            let first = format!("AUTH LOGIN {}", b64(b"demo"));
            assert_eq!(c.cmd(&first).await, "+ UGFzc3dvcmQ6\r\n");
            assert_eq!(c.cmd("*").await, "-ERR authentication cancelled\r\n");
            assert_eq!(c.cmd(&first).await, "+ UGFzc3dvcmQ6\r\n");
            assert!(c.cmd(&b64(b"demo-password")).await.starts_with("+OK"));
            // SASL lines are recorded too.
            assert!(srv.received().contains(&b"*\r\n".to_vec()));
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn list_uidl_stat_retr_with_dot_stuffing() {
        timeout(LIMIT, async {
            let srv = sample().await;
            let msgs = srv.messages("demo");
            let (mut c, _) = Client::connect(srv.local_addr()).await;
            c.login("demo", "demo-password").await;
            let total: usize = msgs.iter().map(Vec::len).sum();
            assert_eq!(c.cmd("STAT").await, format!("+OK 3 {total}\r\n"));
            assert!(c.cmd("LIST").await.starts_with("+OK 3 messages"));
            let list = c.body().await;
            let want: Vec<String> = msgs
                .iter()
                .enumerate()
                .map(|(i, m)| format!("{} {}\r\n", i + 1, m.len()))
                .collect();
            assert_eq!(list, want);
            assert_eq!(
                c.cmd("LIST 2").await,
                format!("+OK 2 {}\r\n", msgs[1].len())
            );
            assert_eq!(c.cmd("LIST 4").await, "-ERR no such message\r\n");
            assert_eq!(c.cmd("LIST 0").await, "-ERR no such message\r\n");

            assert!(c.cmd("UIDL").await.starts_with("+OK"));
            let uidl = c.body().await;
            assert_eq!(uidl.len(), 3);
            let uid2 = uidl[1].trim_end().split(' ').nth(1).unwrap().to_owned();
            assert!(uid2.bytes().all(|b| (0x21..=0x7e).contains(&b)));
            assert_eq!(c.cmd("UIDL 2").await, format!("+OK 2 {uid2}\r\n"));

            assert_eq!(
                c.cmd("RETR 2").await,
                format!("+OK {} octets\r\n", msgs[1].len())
            );
            let body = c.body().await;
            assert!(body.contains(&"..hidden files were skipped by the packager\r\n".into()));
            assert!(body.contains(&"...double dot line stays double-dotted plus one\r\n".into()));
            assert!(body.contains(&"..\r\n".into()));
            // Unstuffing gives back the wire form exactly.
            let unstuffed: String = body
                .iter()
                .map(|l| l.strip_prefix('.').unwrap_or(l))
                .collect();
            assert_eq!(unstuffed.as_bytes(), msgs[1].as_slice());
            assert_eq!(c.cmd("RETR 9").await, "-ERR no such message\r\n");
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn top_headers_and_lines() {
        timeout(LIMIT, async {
            let srv = sample().await;
            let (mut c, _) = Client::connect(srv.local_addr()).await;
            c.login("demo", "demo-password").await;
            assert!(c.cmd("TOP 2 0").await.starts_with("+OK"));
            let head = c.body().await;
            assert_eq!(head.last().unwrap(), "\r\n");
            assert!(head.iter().any(|l| l.starts_with("Subject: Nightly")));
            assert!(c.cmd("TOP 2 2").await.starts_with("+OK"));
            let two = c.body().await;
            assert_eq!(two.len(), head.len() + 2);
            assert_eq!(two[head.len()], "Build 2217 passed.\r\n");
            assert_eq!(
                two[head.len() + 1],
                "..hidden files were skipped by the packager\r\n"
            );
            assert!(c.cmd("TOP 1 1000").await.starts_with("+OK"));
            let all = c.body().await;
            assert_eq!(all.concat().as_bytes(), srv.messages("demo")[0].as_slice());
            assert!(c.cmd("TOP 1").await.starts_with("-ERR"));
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn dele_and_rset() {
        timeout(LIMIT, async {
            let srv = sample().await;
            let sizes: Vec<usize> = srv.messages("demo").iter().map(Vec::len).collect();
            let (mut c, _) = Client::connect(srv.local_addr()).await;
            c.login("demo", "demo-password").await;
            assert_eq!(c.cmd("DELE 1").await, "+OK message 1 deleted\r\n");
            assert_eq!(c.cmd("DELE 1").await, "-ERR message 1 already deleted\r\n");
            assert_eq!(c.cmd("RETR 1").await, "-ERR message 1 already deleted\r\n");
            assert_eq!(c.cmd("LIST 1").await, "-ERR message 1 already deleted\r\n");
            assert_eq!(
                c.cmd("STAT").await,
                format!("+OK 2 {}\r\n", sizes[1] + sizes[2])
            );
            c.cmd("LIST").await;
            // Numbers stay stable: 2 and 3 remain 2 and 3.
            assert_eq!(
                c.body().await,
                vec![format!("2 {}\r\n", sizes[1]), format!("3 {}\r\n", sizes[2])]
            );
            assert!(
                c.cmd("RSET")
                    .await
                    .starts_with("+OK maildrop has 3 messages")
            );
            assert!(c.cmd("STAT").await.starts_with("+OK 3 "));
            assert!(c.cmd("RETR 1").await.starts_with("+OK"));
            c.body().await;
            assert!(c.cmd("QUIT").await.starts_with("+OK"));
            assert_eq!(srv.messages("demo").len(), 3);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn dele_then_quit_deletes() {
        timeout(LIMIT, async {
            let srv = sample().await;
            let before = srv.messages("demo");
            let (mut c, _) = Client::connect(srv.local_addr()).await;
            c.login("demo", "demo-password").await;
            c.cmd("DELE 2").await;
            assert_eq!(srv.messages("demo").len(), 3, "DELE is deferred to UPDATE");
            assert_eq!(
                c.cmd("QUIT").await,
                "+OK popgate-demo signing off (2 messages left)\r\n"
            );
            assert_eq!(
                srv.messages("demo"),
                vec![before[0].clone(), before[2].clone()]
            );
            // A new session sees the new numbering and can log in straight away.
            let (mut c, _) = Client::connect(srv.local_addr()).await;
            assert!(
                c.login("demo", "demo-password")
                    .await
                    .contains("has 2 messages")
            );
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn dele_then_disconnect_keeps_everything() {
        timeout(LIMIT, async {
            let srv = sample().await;
            let (mut c, _) = Client::connect(srv.local_addr()).await;
            c.login("demo", "demo-password").await;
            c.cmd("DELE 1").await;
            c.cmd("DELE 2").await;
            assert!(srv.is_locked("demo"));
            drop(c);
            while srv.is_locked("demo") {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(srv.messages("demo").len(), 3);
            assert_eq!(srv.quit_count(), 0);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn second_login_gets_in_use() {
        timeout(LIMIT, async {
            let srv = sample().await;
            let (mut a, _) = Client::connect(srv.local_addr()).await;
            assert!(a.login("demo", "demo-password").await.starts_with("+OK"));
            let (mut b, _) = Client::connect(srv.local_addr()).await;
            let refused = b.login("demo", "demo-password").await;
            assert!(refused.starts_with("-ERR [IN-USE]"), "{refused}");
            // Other users are not affected; wrong password still says AUTH.
            assert_eq!(
                b.login("demo", "bad").await,
                "-ERR [AUTH] invalid credentials\r\n"
            );
            assert!(b.login("alice", "alice-password").await.starts_with("+OK"));
            a.cmd("QUIT").await;
            let (mut c, _) = Client::connect(srv.local_addr()).await;
            assert!(c.login("demo", "demo-password").await.starts_with("+OK"));
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn pipelined_batch_answered_in_order() {
        timeout(LIMIT, async {
            let srv = sample().await;
            let (mut c, _) = Client::connect(srv.local_addr()).await;
            c.send(b"CAPA\r\nUSER demo\nPASS demo-password\r\nSTAT\r\nLIST 1\r\nRETR 3\r\nTOP 1 0\r\nDELE 3\r\nNOOP\nBOGUS\r\nQUIT\r\n")
                .await;
            assert!(c.line().await.starts_with("+OK Capability"));
            let capa = c.body().await;
            assert!(capa.contains(&"PIPELINING\r\n".into()));
            assert_eq!(c.line().await, "+OK send PASS\r\n");
            assert!(c.line().await.starts_with("+OK demo's maildrop"));
            assert!(c.line().await.starts_with("+OK 3 "));
            assert!(c.line().await.starts_with("+OK 1 "));
            assert!(c.line().await.ends_with(" octets\r\n"));
            assert!(c.body().await[0].starts_with("Date:"));
            assert_eq!(c.line().await, "+OK top of message follows\r\n");
            assert_eq!(c.body().await.last().unwrap(), "\r\n");
            assert_eq!(c.line().await, "+OK message 3 deleted\r\n");
            assert_eq!(c.line().await, "+OK\r\n");
            assert_eq!(c.line().await, "-ERR unknown command\r\n");
            assert!(c.line().await.contains("signing off (2 messages left)"));
            assert!(c.at_eof().await);
            assert_eq!(srv.received().len(), 11);
            assert_eq!(srv.received()[1], b"USER demo\n");
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn no_capa_mode_refuses_capa_like_popa3d() {
        timeout(LIMIT, async {
            let opts = ServerOptions {
                no_capa: true,
                ..ServerOptions::new(sample_mailboxes())
            };
            let srv = DemoServer::start("127.0.0.1:0".parse().unwrap(), opts)
                .await
                .unwrap();
            let (mut c, _) = Client::connect(srv.local_addr()).await;
            assert_eq!(c.cmd("CAPA").await, "-ERR\r\n");
            assert!(c.login("alice", "alice-password").await.starts_with("+OK"));
            assert_eq!(c.cmd("CAPA").await, "-ERR\r\n");
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn folding_mode_logs_in_every_ascii_case_of_a_name_and_shares_its_lock() {
        timeout(LIMIT, async {
            let opts = ServerOptions {
                fold_user_names: true,
                ..ServerOptions::new(sample_mailboxes())
            };
            let srv = DemoServer::start("127.0.0.1:0".parse().unwrap(), opts)
                .await
                .unwrap();
            let (mut c, _) = Client::connect(srv.local_addr()).await;
            let ok = c.login("ALICE", "alice-password").await;
            assert!(ok.starts_with("+OK alice's maildrop"), "{ok}");
            let (mut d, _) = Client::connect(srv.local_addr()).await;
            assert!(
                d.login("Alice", "alice-password")
                    .await
                    .starts_with("-ERR [IN-USE]")
            );
            // Without folding, ALICE is nobody.
            let exact = DemoServer::start(
                "127.0.0.1:0".parse().unwrap(),
                ServerOptions::new(sample_mailboxes()),
            )
            .await
            .unwrap();
            let (mut e, _) = Client::connect(exact.local_addr()).await;
            assert!(
                e.login("ALICE", "alice-password")
                    .await
                    .starts_with("-ERR [AUTH]")
            );
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn capa_lists_capabilities() {
        timeout(LIMIT, async {
            let srv = sample().await;
            let (mut c, _) = Client::connect(srv.local_addr()).await;
            assert_eq!(c.cmd("CAPA").await, "+OK Capability list follows\r\n");
            let capa = c.body().await;
            for want in [
                "TOP",
                "UIDL",
                "USER",
                "RESP-CODES",
                "AUTH-RESP-CODE",
                "PIPELINING",
                "SASL PLAIN LOGIN",
                "IMPLEMENTATION popgate-demo",
            ] {
                assert!(capa.contains(&format!("{want}\r\n")), "missing {want}");
            }
            assert!(!capa.contains(&"STLS\r\n".into()));
            assert_eq!(c.cmd("STLS").await, "-ERR STLS not available\r\n");
        })
        .await
        .unwrap();
    }

    struct TestTls {
        server: Arc<rustls::ServerConfig>,
        client: tokio_rustls::TlsConnector,
    }

    fn test_tls() -> TestTls {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = ck.cert.der().clone();
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der());
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key.into())
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TestTls {
            server: Arc::new(server),
            client: tokio_rustls::TlsConnector::from(Arc::new(client)),
        }
    }

    fn localhost() -> rustls::pki_types::ServerName<'static> {
        rustls::pki_types::ServerName::try_from("localhost").unwrap()
    }

    #[tokio::test]
    async fn stls_upgrades_and_drops_pipelined_plaintext() {
        timeout(LIMIT, async {
            let tls = test_tls();
            let mut opts = ServerOptions::new(sample_mailboxes());
            opts.tls = Some(Arc::clone(&tls.server));
            opts.offer_stls = true;
            let srv = server(opts).await;
            let (mut c, _) = Client::connect(srv.local_addr()).await;
            c.cmd("CAPA").await;
            assert!(c.body().await.contains(&"STLS\r\n".into()));
            c.send(b"USER demo\r\nSTLS\r\n").await;
            assert_eq!(c.line().await, "+OK send PASS\r\n");
            assert_eq!(c.line().await, "+OK begin TLS negotiation\r\n");
            let stream = c.r.into_inner();
            let tls_stream = tls.client.connect(localhost(), stream).await.unwrap();
            let mut c = Client::over(tls_stream);
            c.cmd("CAPA").await;
            let capa = c.body().await;
            assert!(!capa.contains(&"STLS\r\n".into()));
            assert!(capa.contains(&"USER\r\n".into()));
            // USER from before STLS is forgotten.
            assert!(c.cmd("PASS demo-password").await.starts_with("-ERR"));
            assert!(c.login("demo", "demo-password").await.starts_with("+OK"));
            assert_eq!(
                c.cmd("STLS").await,
                "-ERR command not valid in this state\r\n"
            );
            assert!(c.cmd("QUIT").await.starts_with("+OK"));
            assert!(srv.received().contains(&b"PASS demo-password\r\n".to_vec()));
            assert_eq!(srv.quit_count(), 1);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn implicit_tls() {
        timeout(LIMIT, async {
            let tls = test_tls();
            let mut opts = ServerOptions::new(sample_mailboxes());
            opts.tls = Some(Arc::clone(&tls.server));
            opts.implicit_tls = true;
            opts.offer_stls = true;
            let srv = server(opts).await;
            let stream = TcpStream::connect(srv.local_addr()).await.unwrap();
            let tls_stream = tls.client.connect(localhost(), stream).await.unwrap();
            let mut c = Client::over(tls_stream);
            assert!(c.line().await.starts_with("+OK popgate-demo"));
            c.cmd("CAPA").await;
            assert!(!c.body().await.contains(&"STLS\r\n".into()));
            assert_eq!(c.cmd("STLS").await, "-ERR already using TLS\r\n");
            assert!(c.login("demo", "demo-password").await.starts_with("+OK"));

            let bad = ServerOptions {
                implicit_tls: true,
                ..ServerOptions::default()
            };
            assert!(DemoServer::start(loopback(), bad).await.is_err());
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn fault_refuse() {
        timeout(LIMIT, async {
            let mut opts = ServerOptions::new(sample_mailboxes());
            opts.faults.refuse = true;
            let srv = server(opts).await;
            let (mut c, greeting) = Client::connect(srv.local_addr()).await;
            assert_eq!(greeting, "");
            assert!(c.at_eof().await);
            assert_eq!(srv.connections(), 1);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn fault_delays() {
        timeout(LIMIT, async {
            let mut opts = ServerOptions::new(sample_mailboxes());
            opts.faults.greeting_delay = Some(Duration::from_millis(150));
            opts.faults.response_delay = Some(Duration::from_millis(100));
            let srv = server(opts).await;
            let t0 = tokio::time::Instant::now();
            let (mut c, greeting) = Client::connect(srv.local_addr()).await;
            assert!(greeting.starts_with("+OK"));
            assert!(t0.elapsed() >= Duration::from_millis(150));
            let t1 = tokio::time::Instant::now();
            assert_eq!(
                c.cmd("NOOP").await,
                "-ERR command not valid in this state\r\n"
            );
            assert!(t1.elapsed() >= Duration::from_millis(100));
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn fault_die_mid_body() {
        timeout(LIMIT, async {
            let mut opts = ServerOptions::new(sample_mailboxes());
            opts.faults.die_mid_body = Some(10);
            let srv = server(opts).await;
            let (mut c, _) = Client::connect(srv.local_addr()).await;
            c.login("demo", "demo-password").await;
            c.cmd("DELE 3").await;
            // An error reply is not affected.
            assert!(c.cmd("RETR 3").await.starts_with("-ERR"));
            c.send(b"RETR 1\r\n").await;
            let mut rest = Vec::new();
            c.r.read_to_end(&mut rest).await.unwrap();
            let text = String::from_utf8(rest).unwrap();
            let (status, body) = text.split_once("\r\n").unwrap();
            assert!(status.starts_with("+OK"));
            assert_eq!(body.len(), 10);
            assert_eq!(body.as_bytes(), &srv.messages("demo")[0][..10]);
            // No QUIT: nothing deleted.
            while srv.is_locked("demo") {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(srv.messages("demo").len(), 3);
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn fault_garbage_on_verb() {
        timeout(LIMIT, async {
            let mut opts = ServerOptions::new(sample_mailboxes());
            opts.faults.garbage_on = Some(Verb::Stat);
            let srv = server(opts).await;
            let (mut c, _) = Client::connect(srv.local_addr()).await;
            c.login("demo", "demo-password").await;
            assert_eq!(c.cmd("STAT").await, "GARBAGE\r\n");
            assert!(c.cmd("LIST 1").await.starts_with("+OK 1 "));
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn fault_silent_on_verb() {
        timeout(LIMIT, async {
            let mut opts = ServerOptions::new(sample_mailboxes());
            opts.faults.silent_on = Some(Verb::Retr);
            let srv = server(opts).await;
            let (mut c, _) = Client::connect(srv.local_addr()).await;
            c.login("demo", "demo-password").await;
            c.send(b"RETR 1\r\nNOOP\r\n").await;
            let mut buf = [0u8; 16];
            let waited = timeout(Duration::from_millis(300), c.r.read(&mut buf)).await;
            assert!(waited.is_err(), "server answered a silenced verb");
            while srv.received().len() < 4 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(srv.received()[3], b"NOOP\r\n");
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn fault_stls_inject() {
        timeout(LIMIT, async {
            let tls = test_tls();
            let inject = b"+OK injected plaintext\r\n".to_vec();
            let mut opts = ServerOptions::new(sample_mailboxes());
            opts.tls = Some(Arc::clone(&tls.server));
            opts.offer_stls = true;
            opts.faults.stls_inject = Some(inject.clone());
            let srv = server(opts).await;
            let (mut c, _) = Client::connect(srv.local_addr()).await;
            // The pipelined plaintext CAPA after STLS must not be executed inside TLS.
            c.send(b"STLS\r\nCAPA\r\n").await;
            assert_eq!(c.line().await, "+OK begin TLS negotiation\r\n");
            let mut got = vec![0u8; inject.len()];
            c.r.read_exact(&mut got).await.unwrap();
            assert_eq!(got, inject);
            let tls_stream = tls
                .client
                .connect(localhost(), c.r.into_inner())
                .await
                .unwrap();
            let mut c = Client::over(tls_stream);
            assert_eq!(
                c.cmd("NOOP").await,
                "-ERR command not valid in this state\r\n"
            );
            assert_eq!(
                srv.received(),
                vec![
                    b"STLS\r\n".to_vec(),
                    b"CAPA\r\n".to_vec(),
                    b"NOOP\r\n".to_vec()
                ]
            );
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn shutdown_closes_sessions_without_update() {
        timeout(LIMIT, async {
            let srv = sample().await;
            let (mut c, _) = Client::connect(srv.local_addr()).await;
            c.login("demo", "demo-password").await;
            c.cmd("DELE 1").await;
            srv.shutdown();
            assert!(c.at_eof().await);
            while srv.is_locked("demo") {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(srv.messages("demo").len(), 3);
            // The listener goes away too.
            while TcpStream::connect(srv.local_addr()).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn overlong_line_is_refused() {
        timeout(LIMIT, async {
            let srv = sample().await;
            let (mut c, _) = Client::connect(srv.local_addr()).await;
            let long = vec![b'A'; MAX_LINE + 1]; // all of it is read: no RST on close
            c.send(&long).await;
            assert_eq!(c.line().await, "-ERR line too long\r\n");
            assert!(c.at_eof().await);
        })
        .await
        .unwrap();
    }
}
