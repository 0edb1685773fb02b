//! `Tracker` driven by a byte script of client lines and server bytes, as the session drives it.
//!
//! Invariants: no panic; every piece length is within the buffer offered; a `BodyEnd` ends
//! exactly at the first terminator line of the body (checked against an independent scan of
//! all body bytes relayed); and once a login succeeded, the user name stays what it was while
//! the session is in TRANSACTION (a later `USER`/`APOP`/`AUTH` must not change who is logged in).
//!
//! Script: a sequence of ops; the first byte of each picks the op, the next ones its data.
//!
//! The harness forwards what the hop would forward: commands the tracker refuses in the
//! current state (`Tracker::refusal`) are answered locally, as are STLS and invalid lines; but
//! the user invariant must hold even for commands forwarded anyway, so 1 in 4 refused commands
//! is forwarded regardless (a rule rewrite, a future bug in the hop).
#![no_main]

use libfuzzer_sys::fuzz_target;
use popgate::pop3::command::Verb;
use popgate::pop3::tracker::{AfterReply, ClientLine, Piece, State, Tracker};

/// Frequent client lines, so the fuzzer reaches logins, SASL and bodies quickly.
const CLIENT: &[&[u8]] = &[
    b"USER alice\r\n",
    b"USER bob\r\n",
    b"PASS secret\r\n",
    b"APOP carol 0123456789abcdef0123456789abcdef\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH PLAIN AGRhdmUAcHc=\r\n",
    b"AUTH LOGIN\r\n",
    b"ZXZl\r\n",
    b"AUTH\r\n",
    b"*\r\n",
    b"STAT\r\n",
    b"LIST\r\n",
    b"LIST 1\r\n",
    b"RETR 1\r\n",
    b"TOP 1 0\r\n",
    b"UIDL\r\n",
    b"CAPA\r\n",
    b"DELE 1\r\n",
    b"NOOP\r\n",
    b"RSET\r\n",
    b"QUIT\r\n",
    b"STLS\r\n",
];

/// Frequent server bytes.
const SERVER: &[&[u8]] = &[
    b"+OK\r\n",
    b"-ERR no\r\n",
    b"+ \r\n",
    b"+OK 1 100\r\n",
    b"line\r\n",
    b".\r\n",
    b"..stuffed\r\n",
    b".\n",
    b"\r\n",
    b"+OK body\r\nx\r\n.\r\n",
    b"+OK\r\n.\r\n",
];

/// The end (exclusive) of the first line of a body that is `.` alone, as RFC 1939 defines the
/// terminator (`.` CRLF), or a `.` line ended by a bare LF (which popgate must never relay:
/// clients disagree on it). A partial such line at the very end counts too (`.` or `.\r`):
/// it must not have been relayed before the next bytes decide.
fn first_dot_line(body: &[u8]) -> Option<usize> {
    let mut start = 0;
    while start < body.len() {
        let rest = &body[start..];
        if rest.starts_with(b".\r\n") {
            return Some(start + 3);
        }
        if rest.starts_with(b".\n") || rest == b"." || rest == b".\r" {
            return Some(start + rest.len().min(2));
        }
        start += rest.iter().position(|&b| b == b'\n')? + 1;
    }
    None
}

struct Harness {
    t: Tracker,
    /// Server bytes not yet consumed by the tracker.
    sin: Vec<u8>,
    /// Body bytes relayed for the current multi-line response.
    body: Option<Vec<u8>>,
    /// The user of the last successful login, while in TRANSACTION.
    logged_in: Option<Option<String>>,
    dead: bool,
}

impl Harness {
    fn client_line(&mut self, line: &[u8]) {
        // The session does not read client lines while an AUTH exchange awaits the server.
        if self.t.client_must_wait() {
            return;
        }
        match self.t.classify(line) {
            ClientLine::Command(cmd) if self.t.refusal(&cmd).is_some() && line.len() % 4 != 0 => {
                self.t.answer_locally(cmd.verb, b"-ERR no\r\n".to_vec(), AfterReply::Continue);
            }
            ClientLine::Command(cmd) => {
                // The session answers STLS itself on STLS listeners; model a local `-ERR` for it
                // and forward everything else, as the default policy does.
                if cmd.verb == Verb::Stls {
                    self.t
                        .answer_locally(cmd.verb, b"-ERR no\r\n".to_vec(), AfterReply::Continue);
                } else {
                    self.t.forwarded(&cmd);
                }
            }
            ClientLine::SaslResponse(l) => self.t.forwarded_sasl(l),
            ClientLine::StraySasl | ClientLine::Invalid(_) => self.t.answer_locally(
                Verb::Unknown,
                b"-ERR bad\r\n".to_vec(),
                AfterReply::Continue,
            ),
        }
        self.drain_local();
        self.check_user();
    }

    fn drain_local(&mut self) {
        while let Some(l) = self.t.next_local() {
            assert!(!l.reply.is_empty());
        }
    }

    fn server_bytes(&mut self, bytes: &[u8]) {
        self.sin.extend_from_slice(bytes);
        loop {
            let piece = match self.t.on_server_bytes(&self.sin) {
                Ok(p) => p,
                Err(_) => {
                    // The session closes here (upstream without QUIT).
                    self.dead = true;
                    return;
                }
            };
            let len = match piece {
                Piece::NeedMore => break,
                Piece::Status { len, meta } => {
                    assert!(len > 0 && len <= self.sin.len(), "status len {len}");
                    assert_eq!(self.sin[len - 1], b'\n', "status piece ends mid-line");
                    assert!(self.body.is_none(), "status while in a body");
                    if meta.multiline {
                        self.body = Some(Vec::new());
                    }
                    if let Some(login) = &meta.login
                        && login.success
                    {
                        assert_eq!(self.t.state(), State::Transaction);
                        self.logged_in = Some(self.t.user().map(str::to_owned));
                    }
                    len
                }
                Piece::Body { len } => {
                    assert!(len > 0 && len <= self.sin.len(), "body len {len}");
                    let body = self.body.as_mut().expect("body piece outside a body");
                    body.extend_from_slice(&self.sin[..len]);
                    assert_eq!(first_dot_line(body), None, "terminator (or its start) passed as body");
                    len
                }
                Piece::BodyEnd { len } => {
                    assert!(len > 0 && len <= self.sin.len(), "body end len {len}");
                    let mut body = self.body.take().expect("body end outside a body");
                    body.extend_from_slice(&self.sin[..len]);
                    assert_eq!(
                        first_dot_line(&body),
                        Some(body.len()),
                        "BodyEnd not at the first terminator"
                    );
                    assert!(body.ends_with(b"\n.\r\n") || body == b".\r\n");
                    len
                }
            };
            self.sin.drain(..len);
            self.drain_local();
            self.check_user();
        }
        self.check_user();
    }

    fn check_user(&self) {
        if self.t.state() == State::Transaction
            && let Some(user) = &self.logged_in
        {
            assert_eq!(
                self.t.user(),
                user.as_deref(),
                "user changed after a successful login, in TRANSACTION"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut h = Harness {
        t: Tracker::new(512),
        sin: Vec::new(),
        body: None,
        logged_in: None,
        dead: false,
    };
    let mut i = 0;
    while i < data.len() && !h.dead {
        let op = data[i];
        i += 1;
        let arg = data.get(i).copied().unwrap_or(0);
        match op % 4 {
            0 => {
                h.client_line(CLIENT[arg as usize % CLIENT.len()]);
                i += 1;
            }
            1 => {
                h.server_bytes(SERVER[arg as usize % SERVER.len()]);
                i += 1;
            }
            2 => {
                // A raw client line: up to the next `\n` (added when missing).
                let rest = &data[i..];
                let n = rest
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(rest.len(), |p| p + 1);
                let mut line = rest[..n].to_vec();
                if !line.ends_with(b"\n") {
                    line.extend_from_slice(b"\r\n");
                }
                i += n;
                h.client_line(&line);
            }
            _ => {
                // Raw server bytes: a length byte, then that many bytes.
                let n = (arg as usize).min(data.len().saturating_sub(i + 1));
                let start = (i + 1).min(data.len());
                let bytes = data[start..start + n].to_vec();
                i = start + n;
                h.server_bytes(&bytes);
            }
        }
    }
});
