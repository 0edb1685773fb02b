//! A whole session without sockets, decoded from one byte string, with its invariants checked
//! on every run: the fuzz target `session` (feature `fuzzing`) and a unit test drive it.
//!
//! The simulator plays the driver (`session::Driver`) exactly as its calling contract says
//! (see [`Session`]): outputs carried out in order, events drained after every call (both
//! queues until empty), failed logins answered with a penalty, `StartClientTls` completed or
//! failed, timers fired at the instant [`Session::poll_timeout`] reports, the client read only
//! while the session wants it, the upstream only while the session wants it. Around it: a scripted client (frequent POP3 lines, every login
//! method with a marked secret, SASL answers, raw bytes, pipelined batches) and a model server
//! that answers each line it receives, in order, with a *tagged* reply (`+OK #n`, `-ERR #n`,
//! multi-line bodies with dot-stuffed lines) or, as the input says, with garbage, a cut body, a
//! close or a delay. In routing mode the [`Front`] (inside the [`Session`]) stands in for the
//! server until a login; an [`Output::Login`] is routed as the driver does: the upstream
//! [`Connector`] over two addresses goes to [`Session::connect_login`], and the session's
//! login outputs are carried out (`Dial` reaching the model server or failing, as the input
//! says; the greeting, STLS to the server as the input says, the login replayed line by line,
//! failover), the server's bytes and the session's timer expiries fed back, until the session
//! says how it ended ([`Output::UpstreamEnded`]) and goes over or answers the client itself.
//! In direct mode the session connects the upstream itself the same way
//! ([`Session::connect_upstream`]: one or two addresses, STLS to the server as the input
//! says), the client written, read within the early-input limit, hanging up, or a shutdown
//! coming meanwhile; the relay starts with the greeting read and the client bytes kept. Half
//! of the direct sessions re-dial after the client's STLS (PROXY v2, without the header): the
//! model server is dialled again on a pending slot, and the session goes over to it when it
//! greets `+OK`.
//!
//! The [`Checker`] sees every byte each way and panics with a clear message when an invariant
//! breaks:
//! - under `require-tls` on a plaintext client side, no credential goes upstream before the
//!   client's TLS handshake (no PASS/APOP/AUTH line, no SASL answer, no byte string of the
//!   marked secrets, raw or base64);
//! - no body terminator reaches the client that the server did not send (a cut body never
//!   arrives complete; popgate's own multi-line replies are accounted for);
//! - server replies reach the client in command order (tags strictly increasing), and none
//!   of them answers a command popgate injected itself;
//! - nothing panics, and the session ends within a bounded number of steps once the input is
//!   used up and the timers have fired; a routed login ends within a bounded number of
//!   steps and the session reports a deadline whenever the login waits;
//! - with a `connect` rule's delay (some inputs start with one: the connect phase's
//!   [`Opening`], the client written, read, closing or failing and a shutdown coming during
//!   it), the client is read only within the early-input limit, the phase ends once, the
//!   session is let in only after the deadline and unrefused, and what the client sent
//!   meanwhile reaches the session at its start (the checks above then hold for it too).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::BytesMut;

use super::connect::{Admission, ConnectRefusal, Opening, early_input_limit};
use super::dialogue::{ConnectTimeouts, Connector, Plan, Replay};
use super::front::{Front, Login};
use super::policy::Policy;
use super::{
    Hop, HopConfig, Output, Session, SessionEvent, SessionStage, UpstreamEnd, UpstreamPurpose,
};
use crate::config::{TlsMode, UnknownCommands};
use crate::rules::RuleSet;
use crate::types::{CloseReason, MessageIds};

/// The user name every login names.
const USER: &str = "alice";
/// The marked password: never upstream before TLS under require-tls, in any form.
const SECRET: &str = "Zq9sekrit";
/// The marked APOP digest.
const DIGEST: &str = "c0ffee5ec2e7c0ffee5ec2e7c0ffee5e";
/// Steps the session may take to end once the input is used up.
const FINISH_STEPS: usize = 10_000;

/// A mixed rule set: a tarpit, a deny that closes, a command rewrite, a response delay, a
/// CAPA rewrite, a drop and a scan (inert unless the run configures scanners).
const MIXED_RULES: &str = r#"
[[rule]]
name = "sim-tarpit"
on = "command"
verbs = ["DELE", "RETR"]
action = "delay"
delay = "2s"

[[rule]]
name = "sim-deny-top"
on = "command"
verbs = ["TOP"]
action = "deny"
message = "no TOP here"
close_after = 3

[[rule]]
name = "sim-rewrite-user"
on = "command"
verbs = ["USER"]
action = "rewrite"
replace = '(?i)^alice$'
with = "alice2"

[[rule]]
name = "sim-delay-list"
on = "response"
answers = ["LIST"]
action = "delay"
delay = "1s"

[[rule]]
name = "sim-capa-no-top"
on = "capa"
text = '(?i)^TOP$'
action = "rewrite"
remove = true

[[rule]]
name = "sim-drop-rset"
on = "command"
verbs = ["RSET"]
action = "drop"

[[rule]]
name = "sim-scan"
on = "command"
verbs = ["RETR", "TOP"]
action = "scan"
scan = ["clamav", "rspamd"]
"#;

/// The rule sets a run picks from: none, `rules/require-tls.toml`, [`MIXED_RULES`]. Parsed once
/// (regexes are costly to build).
fn rule_sets() -> &'static [Arc<RuleSet>; 3] {
    static SETS: OnceLock<[Arc<RuleSet>; 3]> = OnceLock::new();
    SETS.get_or_init(|| {
        let parse = |text: &str, name: &str| {
            Arc::new(
                RuleSet::parse(text, Path::new(name))
                    .unwrap_or_else(|e| panic!("simulator rules {name}: {e}")),
            )
        };
        [
            parse("", "none.toml"),
            parse(
                include_str!("../../rules/require-tls.toml"),
                "require-tls.toml",
            ),
            parse(MIXED_RULES, "mixed.toml"),
        ]
    })
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// The secret byte strings that must not go upstream before TLS under require-tls.
fn needles() -> Vec<Vec<u8>> {
    let plain = format!("\0{USER}\0{SECRET}");
    vec![
        SECRET.as_bytes().to_vec(),
        DIGEST.as_bytes().to_vec(),
        b64(SECRET.as_bytes()).into_bytes(),
        b64(plain.as_bytes()).into_bytes(),
    ]
}

/// The scripted client's SASL answers still due, so that a secret only ever leaves the
/// client as a well-behaved one sends it: in PASS, APOP or AUTH, or as the answer to an
/// exchange it started (sent at once, pipelined, or later).
#[derive(Debug, Default)]
struct ClientSasl {
    due: VecDeque<String>,
}

impl ClientSasl {
    /// The client's frequent lines, CRLF included.
    fn line(&mut self, i: u8) -> Vec<u8> {
        let plain = b64(format!("\0{USER}\0{SECRET}").as_bytes());
        let (user, pass) = (b64(USER.as_bytes()), b64(SECRET.as_bytes()));
        let lines: Vec<String> = match i % 32 {
            0 => vec![format!("USER {USER}")],
            1 => vec![format!("PASS {SECRET}")],
            2 => vec![format!("APOP {USER} {DIGEST}")],
            3 => vec![format!("AUTH PLAIN {plain}")],
            4 => {
                self.due = VecDeque::from([plain]);
                vec!["AUTH PLAIN".into()]
            }
            5 => {
                // The next answer due (after the server's `+ `), or a stray line.
                vec![self.due.pop_front().unwrap_or_else(|| b64(b"stray"))]
            }
            6 => {
                self.due = VecDeque::from([user, pass]);
                vec!["AUTH LOGIN".into()]
            }
            // Pipelined exchanges: the answers right behind the AUTH.
            7 => {
                self.due.clear();
                vec!["AUTH PLAIN".into(), plain]
            }
            8 => {
                self.due.clear();
                vec!["AUTH LOGIN".into(), user, pass]
            }
            9 => {
                self.due.clear();
                vec!["*".into()]
            }
            10 => vec!["AUTH".into()],
            11 => vec!["AUTH CRAM-MD5".into()],
            12 => vec!["CAPA".into()],
            13 => vec!["STLS".into()],
            14 => vec!["STAT".into()],
            15 => vec!["LIST".into()],
            16 => vec!["LIST 1".into()],
            17 => vec!["UIDL".into()],
            18 => vec!["UIDL 1".into()],
            19 => vec!["RETR 1".into()],
            20 => vec!["RETR 2".into()],
            21 => vec!["TOP 1 0".into()],
            22 => vec!["DELE 1".into()],
            23 => vec!["DELE 2".into()],
            24 => vec!["NOOP".into()],
            25 => vec!["RSET".into()],
            26 => vec!["QUIT".into()],
            27 => vec!["XYZZY 1".into()],
            28 => vec!["USER bob".into()],
            29 => {
                self.due = VecDeque::from([pass]);
                vec![format!("AUTH LOGIN {user}")]
            }
            30 => vec!["user ALICE".into()],
            _ => vec!["retr 1".into()],
        };
        let mut v = Vec::new();
        for l in lines {
            v.extend_from_slice(l.as_bytes());
            v.extend_from_slice(b"\r\n");
        }
        v
    }
}

/// The input, read front to back; past its end every read is 0 (the benign choice), so a
/// used-up input drains the session calmly.
struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }

    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
}

/// What the checker knows about the server's reply to one tagged line.
#[derive(Debug, Clone, Default)]
struct Reply {
    /// A multi-line `+OK` was sent for it.
    multi: bool,
    /// Its body's terminator was sent.
    terminated: bool,
    /// The line was popgate's own (an audit lookup): the client must never see the reply.
    injected: bool,
    /// The line was part of a routed login's replay (the client sent it in another form).
    replayed: bool,
    /// The line the server answered (none for a greeting).
    line: Option<Vec<u8>>,
}

/// The invariants, fed with everything that crosses either side of the hop.
#[derive(Debug, Default)]
pub(crate) struct Checker {
    /// require-tls on a plaintext client side: credentials must wait for TLS.
    guard_credentials: bool,
    client_tls: bool,
    /// Upstream-bound bytes before the client's TLS, whole (a needle may span writes).
    pre_tls_upstream: Vec<u8>,
    /// Tags handed out so far (greetings and lines of every upstream connection).
    tags: u64,
    replies: Vec<Reply>,
    /// Lines popgate injected whose tag is not yet known, in order.
    injected: VecDeque<Vec<u8>>,
    /// `.` CRLF lines in popgate's own replies and the front's answers, and in server garbage.
    local_terminators: usize,
    /// The client stream: the line being assembled, the tagged body being relayed.
    line: Vec<u8>,
    in_body: Option<u64>,
    last_tag: Option<u64>,
    /// `.` CRLF lines the client saw outside a tagged body.
    loose_terminators: usize,
    /// Server bodies the client saw complete.
    bodies: usize,
    /// The lines the hop read from the client, in order, and the one being read.
    client_lines: Vec<Vec<u8>>,
    client_partial: Vec<u8>,
    /// Status lines (and SASL challenges) the client saw: the greeting, then one per line.
    statuses: usize,
    /// A server line that popgate may take for a status was garbage: which reply answers
    /// which command is then the server's confusion, not popgate's.
    desync: bool,
    /// A routed login is being replayed.
    replaying: bool,
}

impl Checker {
    fn new(guard_credentials: bool, client_tls: bool) -> Checker {
        Checker {
            guard_credentials,
            client_tls,
            ..Checker::default()
        }
    }

    fn guarding(&self) -> bool {
        self.guard_credentials && !self.client_tls
    }

    /// A new tag for a server reply (the greeting, or the answer to one line).
    fn new_tag(&mut self) -> u64 {
        self.tags += 1;
        self.replies.push(Reply::default());
        self.tags - 1
    }

    fn reply(&mut self, tag: u64) -> &mut Reply {
        &mut self.replies[usize::try_from(tag).unwrap_or(usize::MAX)]
    }

    /// The client's TLS handshake completed.
    fn tls_started(&mut self) {
        self.client_tls = true;
    }

    /// Bytes that leave the hop toward the server (the front in routing mode, or a replay).
    fn upstream_bytes(&mut self, bytes: &[u8]) {
        if !self.guarding() {
            return;
        }
        let from = self.pre_tls_upstream.len();
        self.pre_tls_upstream.extend_from_slice(bytes);
        for needle in needles() {
            let start = from.saturating_sub(needle.len());
            assert!(
                !self.pre_tls_upstream[start..]
                    .windows(needle.len())
                    .any(|w| w == &needle[..]),
                "require-tls: a credential ({}) went upstream before the client's TLS handshake",
                String::from_utf8_lossy(&needle)
            );
        }
        // Every line that started in this write or the one before.
        let mut line_start = self.pre_tls_upstream[..from]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        while line_start < self.pre_tls_upstream.len() {
            let rest = &self.pre_tls_upstream[line_start..];
            let word: Vec<u8> = rest
                .iter()
                .take_while(|b| !b" \r\n".contains(b))
                .map(u8::to_ascii_uppercase)
                .collect();
            assert!(
                !matches!(&word[..], b"PASS" | b"APOP" | b"AUTH") || !rest.contains(&b'\n'),
                "require-tls: a {} line went upstream before the client's TLS handshake",
                String::from_utf8_lossy(&word)
            );
            match rest.iter().position(|&b| b == b'\n') {
                Some(i) => line_start += i + 1,
                None => break,
            }
        }
    }

    /// The server took a line for a SASL answer.
    fn sasl_answer_upstream(&mut self) {
        assert!(
            !self.guarding(),
            "require-tls: a SASL answer went upstream before the client's TLS handshake"
        );
    }

    /// popgate injected this line (an audit lookup).
    fn injected(&mut self, line: &[u8]) {
        self.injected.push_back(line.to_vec());
    }

    /// The server received `line` and answers it under `tag`.
    fn server_line(&mut self, tag: u64, line: &[u8]) {
        let replaying = self.replaying;
        let reply = self.reply(tag);
        reply.line = Some(line.to_vec());
        reply.replayed = replaying;
        if self.injected.front().is_some_and(|l| l == line) {
            self.injected.pop_front();
            self.reply(tag).injected = true;
        }
    }

    /// Bytes the driver handed the hop from the client.
    fn client_read(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.client_partial.push(b);
            if b == b'\n' {
                let line = std::mem::take(&mut self.client_partial);
                self.client_lines.push(line);
            }
        }
    }

    /// The last `n` bytes the hop was handed were thrown away unread (plaintext after STLS).
    fn client_unread(&mut self, mut n: usize) {
        while n > 0 {
            if self.client_partial.is_empty() {
                match self.client_lines.pop() {
                    Some(l) => self.client_partial = l,
                    None => return,
                }
            }
            let k = n.min(self.client_partial.len());
            self.client_partial.truncate(self.client_partial.len() - k);
            n -= k;
        }
    }

    /// Server garbage popgate may take for a status line.
    fn server_garbage(&mut self, line: &[u8]) {
        self.local_terminators += terminators(line);
        if line.starts_with(b"+") || line.starts_with(b"-") {
            self.desync = true;
        }
    }

    /// A reply popgate gave itself, or answers of the routing front: its terminators.
    fn local_reply(&mut self, bytes: &[u8]) {
        self.local_terminators += terminators(bytes);
    }

    /// Bytes written to the client.
    fn client_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.line.push(b);
            if b == b'\n' {
                let line = std::mem::take(&mut self.line);
                self.client_line(&line);
            }
        }
    }

    fn client_line(&mut self, line: &[u8]) {
        let terminator = line == b".\r\n";
        if let Some(tag) = self.in_body {
            if terminator {
                assert!(
                    self.reply(tag).terminated,
                    "a body terminator reached the client for reply #{tag}, whose body the \
                     server never finished"
                );
                self.in_body = None;
                self.bodies += 1;
            }
            return;
        }
        if terminator {
            self.loose_terminators += 1;
            assert!(
                self.loose_terminators <= self.local_terminators,
                "a body terminator reached the client that neither the server nor popgate \
                 sent ({} seen outside server bodies, {} sent)",
                self.loose_terminators,
                self.local_terminators
            );
            return;
        }
        let status = line.starts_with(b"+") || line.starts_with(b"-");
        if status {
            self.statuses += 1;
        }
        let Some((ok, tag)) = tagged(line) else {
            return;
        };
        if let Some(last) = self.last_tag {
            assert!(
                tag > last,
                "replies out of command order: the client got #{tag} after #{last}"
            );
        }
        self.last_tag = Some(tag);
        let reply = self.replies.get(usize::try_from(tag).unwrap_or(usize::MAX));
        let reply = reply.cloned().unwrap_or_else(|| {
            panic!("the client got a reply tagged #{tag} that the server never sent")
        });
        assert!(
            !reply.injected,
            "the client got reply #{tag}, which answers a command popgate injected"
        );
        if ok && reply.multi {
            self.in_body = Some(tag);
        }
        self.check_position(tag, &reply);
    }

    /// The `statuses`-th status line the client saw (the greeting first) is server reply
    /// `tag`: it must answer the client's line at that position, so every reply, popgate's
    /// own ones included, sits where its command was.
    fn check_position(&self, tag: u64, reply: &Reply) {
        let Some(server_line) = &reply.line else {
            return; // a greeting
        };
        if self.desync || reply.replayed || server_line == b"*\r\n" {
            return;
        }
        let Some(client_line) = self
            .statuses
            .checked_sub(2)
            .and_then(|j| self.client_lines.get(j))
        else {
            panic!(
                "reply #{tag} reached the client as status line {} but the client sent only {} \
                 lines: a reply out of its command's place",
                self.statuses,
                self.client_lines.len()
            );
        };
        let word = |l: &[u8]| -> Vec<u8> {
            l.iter()
                .skip_while(|b| b" \t".contains(b))
                .take_while(|b| !b" \t\r\n".contains(b))
                .map(u8::to_ascii_uppercase)
                .collect()
        };
        assert!(
            word(client_line) == word(server_line),
            "reply #{tag} (to {:?}) reached the client where the reply to its line {} ({:?}) \
             belongs: a reply out of its command's place",
            String::from_utf8_lossy(server_line),
            self.statuses - 1,
            String::from_utf8_lossy(client_line),
        );
    }
}

/// `.` CRLF lines in `bytes` (a whole reply or answers, starting at a line start).
fn terminators(bytes: &[u8]) -> usize {
    bytes
        .split_inclusive(|&b| b == b'\n')
        .filter(|l| *l == b".\r\n")
        .count()
}

/// `+OK #n...` or `-ERR #n...`: whether `+OK`, and `n`.
fn tagged(line: &[u8]) -> Option<(bool, u64)> {
    let (ok, rest) = if let Some(r) = line.strip_prefix(b"+OK #") {
        (true, r)
    } else {
        (false, line.strip_prefix(b"-ERR #")?)
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let n = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    Some((ok, n))
}

/// Where the model server is in a SASL exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sasl {
    None,
    /// `+ ` sent after AUTH PLAIN: the message is due.
    Plain,
    /// `+ VXNlcm5hbWU6` sent: the user name is due.
    LoginUser,
    /// `+ UGFzc3dvcmQ6` sent: the password is due.
    LoginPass,
}

/// The model POP3 server of one upstream connection: it answers every line it receives, in
/// order, as the input says.
#[derive(Debug)]
struct Server {
    /// Written, not yet read by the driver.
    out: VecDeque<u8>,
    /// Replies delayed (and everything after them), until released.
    held: Vec<u8>,
    /// It closes once `out` is read (after a QUIT, a cut body, or as the input says).
    closing: bool,
    /// The driver saw the close.
    eof_seen: bool,
    /// A line being received.
    rx: Vec<u8>,
    sasl: Sasl,
}

impl Server {
    /// Connected: the greeting, as the input says.
    fn connect(input: &mut Input<'_>, check: &mut Checker) -> Server {
        let mut s = Server {
            out: VecDeque::new(),
            held: Vec::new(),
            closing: false,
            eof_seen: false,
            rx: Vec::new(),
            sasl: Sasl::None,
        };
        let tag = check.new_tag();
        let b = input.byte();
        match b % 16 {
            13 => s.garbage(input, check),
            // Silent: the greeting timeout will do, or the first reply is taken for it.
            14 => check.desync = true,
            15 => s.closing = true,
            b => s.send(
                format!("+OK #{tag} POP3 ready <1896.697170952@sim>\r\n").as_bytes(),
                b == 12,
            ),
        }
        s
    }

    fn send(&mut self, bytes: &[u8], delay: bool) {
        if delay || !self.held.is_empty() {
            self.held.extend_from_slice(bytes);
        } else {
            self.out.extend(bytes);
        }
    }

    fn release(&mut self) {
        let held = std::mem::take(&mut self.held);
        self.out.extend(held);
    }

    /// Up to `n` bytes for the driver.
    fn read(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.out.len());
        self.out.drain(..n).collect()
    }

    /// Whether the driver reads end of stream now.
    fn at_eof(&self) -> bool {
        self.closing && self.out.is_empty() && !self.eof_seen
    }

    /// One garbage line (no `#`, so never a tag; no LF inside).
    fn garbage(&mut self, input: &mut Input<'_>, check: &mut Checker) {
        let n = usize::from(input.byte() % 24);
        let mut g: Vec<u8> = input
            .bytes(n)
            .into_iter()
            .map(|b| if b == b'\n' || b == b'#' { b' ' } else { b })
            .collect();
        g.extend_from_slice(b"\r\n");
        check.server_garbage(&g);
        self.send(&g, false);
    }

    /// Bytes from the driver; every complete line is answered.
    fn receive(&mut self, bytes: &[u8], input: &mut Input<'_>, check: &mut Checker) {
        for &b in bytes {
            self.rx.push(b);
            if b == b'\n' {
                let line = std::mem::take(&mut self.rx);
                self.line(&line, input, check);
            }
        }
    }

    fn line(&mut self, line: &[u8], input: &mut Input<'_>, check: &mut Checker) {
        if self.closing {
            return;
        }
        let tag = check.new_tag();
        check.server_line(tag, line);
        let b = input.byte();
        let delay = matches!(b % 16, 9 | 11);
        let (ok, garbage, cut, close) = match b % 16 {
            10 | 11 => (false, false, false, false),
            12 => (true, true, false, false),
            13 => (true, false, true, false),
            14 => (true, false, false, true),
            _ => (true, false, false, false),
        };
        let body_lines = usize::from(b >> 4);
        if close {
            self.closing = true;
            return;
        }
        if garbage {
            self.garbage(input, check);
            return;
        }
        let text = crate::pop3::command::trim_eol(line);
        if self.sasl != Sasl::None {
            check.sasl_answer_upstream();
            let status = if text == b"*" || !ok {
                self.sasl = Sasl::None;
                format!("-ERR #{tag} [AUTH] no\r\n")
            } else if self.sasl == Sasl::LoginUser {
                self.sasl = Sasl::LoginPass;
                "+ UGFzc3dvcmQ6\r\n".into()
            } else {
                self.sasl = Sasl::None;
                format!("+OK #{tag} logged in\r\n")
            };
            self.send(status.as_bytes(), delay);
            return;
        }
        // Words as popgate's parser takes them (space or TAB, leading white space skipped): a
        // server that read `\tRETR 1` otherwise than popgate would answer a RETR with one line.
        let mut words = text
            .split(|&b| b == b' ' || b == b'\t')
            .filter(|w| !w.is_empty());
        let verb = words.next().unwrap_or_default().to_ascii_uppercase();
        let args: Vec<&[u8]> = words.collect();
        let multi = match &verb[..] {
            b"CAPA" | b"RETR" | b"TOP" => true,
            b"LIST" | b"UIDL" | b"AUTH" => args.is_empty(),
            _ => false,
        };
        if ok && verb == b"AUTH" && !args.is_empty() {
            let mech = args[0].to_ascii_uppercase();
            let reply: String = match (&mech[..], args.len()) {
                (b"PLAIN", 1) => {
                    self.sasl = Sasl::Plain;
                    "+ \r\n".into()
                }
                (b"LOGIN", 1) => {
                    self.sasl = Sasl::LoginUser;
                    "+ VXNlcm5hbWU6\r\n".into()
                }
                (b"LOGIN", _) => {
                    self.sasl = Sasl::LoginPass;
                    "+ UGFzc3dvcmQ6\r\n".into()
                }
                (b"PLAIN", _) => format!("+OK #{tag} logged in\r\n"),
                _ => format!("-ERR #{tag} unsupported mechanism\r\n"),
            };
            self.send(reply.as_bytes(), delay);
            return;
        }
        if !ok {
            self.send(format!("-ERR #{tag} no\r\n").as_bytes(), delay);
            return;
        }
        if verb == b"QUIT" {
            self.send(format!("+OK #{tag} bye\r\n").as_bytes(), delay);
            self.closing = true;
            return;
        }
        if !multi {
            self.send(format!("+OK #{tag} done\r\n").as_bytes(), delay);
            return;
        }
        let mut reply = format!("+OK #{tag} follows\r\n").into_bytes();
        if verb == b"CAPA" {
            reply.extend_from_slice(b"TOP\r\nUIDL\r\nUSER\r\nSASL PLAIN LOGIN\r\nPIPELINING\r\n");
        } else if verb == b"AUTH" {
            reply.extend_from_slice(b"PLAIN\r\nLOGIN\r\n");
        }
        for k in 0..body_lines {
            let l = if k % 3 == 1 {
                format!("..#{tag}.{k} dot-stuffed\r\n")
            } else {
                format!("#{tag}.{k} body line\r\n")
            };
            reply.extend_from_slice(l.as_bytes());
        }
        check.reply(tag).multi = true;
        if cut {
            // Part of the body, then the connection closes: never complete.
            let keep = usize::from(input.byte()) % reply.len().max(1);
            reply.truncate(keep.max(1));
            self.closing = true;
        } else {
            reply.extend_from_slice(b".\r\n");
            check.reply(tag).terminated = true;
        }
        self.send(&reply, delay);
    }
}

/// A summary of one run, for tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// How the session closed, if it did (a failed client TLS handshake ends it without).
    pub close: Option<String>,
    /// Bytes the client received.
    pub to_client: usize,
    /// Tagged server replies the client saw.
    pub tagged_replies: usize,
    /// Server bodies the client saw complete.
    pub bodies: usize,
    /// The client's TLS handshake after STLS completed.
    pub stls: bool,
    /// Routed logins that succeeded upstream.
    pub routed: usize,
    /// Routed logins whose upstream dialogue went through STLS to the server.
    pub upstream_stls: usize,
    /// Addresses failed over (marked dead) during routed logins.
    pub failed_over: usize,
    /// Scans the hop asked for (and got a verdict on).
    pub scans: usize,
    /// The session went through a `connect` rule's delay ...
    pub delayed: bool,
    /// ... and how many client bytes it kept there for the session's start (let in) ...
    pub early: usize,
    /// ... or whether it ended there (refused, the client gone, a shutdown).
    pub ended_in_delay: bool,
    /// Direct mode with PROXY v2: re-dials after STLS the session went over to.
    pub redialled: usize,
    /// Direct mode: the client was read while the session connected the upstream ...
    pub read_in_setup: bool,
    /// ... and the session ended before the set-up did (the client gone, a shutdown).
    pub ended_in_setup: bool,
}

/// One simulated session: the driver's part, the client, the server and the checker.
struct Sim<'a> {
    input: Input<'a>,
    session: Session,
    server: Option<Server>,
    /// The re-dial after STLS: the second connection, until it greets `+OK` (or not).
    pending: Option<Server>,
    check: Checker,
    now: Instant,
    cin: BytesMut,
    sin: BytesMut,
    /// Written by the client, not yet read by the driver.
    client_out: Vec<u8>,
    client_sasl: ClientSasl,
    /// Everything the client wrote.
    written: Vec<u8>,
    /// The client closes its side once its bytes are read.
    client_closing: bool,
    client_eof_seen: bool,
    max_chunk: usize,
    penalty: Option<Duration>,
    /// The driver stopped (a `Close`, or a failed client handshake).
    ended: bool,
    close: Option<CloseReason>,
    to_client: usize,
    tagged: usize,
    stls: bool,
    routed: usize,
    upstream_stls: usize,
    failed_over: usize,
    /// Steps of the routed login under way (bounded by [`FINISH_STEPS`]).
    login_steps: usize,
    /// The driver's spool (`Output::Spool`), and the reports for a scan it was asked for.
    spool: Vec<u8>,
    scan_answer: Option<Vec<crate::types::ScanReport>>,
    scans: usize,
    /// The connect phase's bound on client bytes kept before the relay.
    early_limit: usize,
    /// The client was read during direct mode's set-up; the set-up is over.
    read_in_setup: bool,
    setup_over: bool,
    /// Re-dials after STLS the session went over to.
    redialled: usize,
    /// Client bytes kept during a connect rule's delay, for the relay's start.
    early_kept: usize,
}

/// Run one session decoded from `data`, checking the invariants (a violation panics with
/// its description).
pub fn run(data: &[u8]) -> Summary {
    let mut input = Input { data, pos: 0 };
    let setup = input.byte();
    let sizes = input.byte();
    let listener = setup % 3; // plain with STLS, implicit TLS, plain without STLS
    let rules = usize::from((setup / 3) % 3);
    let lookups = match (setup / 9) % 3 {
        0 => None,
        1 => Some(MessageIds::Seen),
        _ => Some(MessageIds::Always),
    };
    let routing = (setup / 27) % 2 == 1;
    let unknown = if (setup / 54) % 2 == 1 {
        UnknownCommands::SingleLine
    } else {
        UnknownCommands::Reject
    };
    let max_chunk = 1 + usize::from(sizes % 64);
    let max_line = [48, 100, 512, 512][usize::from((sizes >> 6) % 4)];
    let more = input.byte();
    let max_pipeline = [1, 2, 8, 64][usize::from(more % 4)];
    let penalty = match (more >> 2) % 4 {
        0 => None,
        1 => Some(Duration::ZERO),
        2 => Some(Duration::from_millis(300)),
        _ => Some(Duration::from_secs(3)),
    };
    let client_tls = listener == 1;
    // Scanning (issue 23): the scanners answer each scan at once, with verdicts from the input.
    let scan_bits = more >> 5;
    let scan = (scan_bits & 1 == 1).then(|| {
        use crate::config::scan::{OnScanError, OnSpam, OnVirus, ScanConfig};
        let mut p = super::scan::ScanPolicy::new(&[], &ScanConfig::default());
        let small = scan_bits & 2 != 0;
        p.max_size = vec![
            (Arc::from("clamav"), 40),
            (Arc::from("rspamd"), if small { 100 } else { 1 << 20 }),
        ];
        p.on_virus = [
            OnVirus::Replace,
            OnVirus::Tag,
            OnVirus::Deny,
            OnVirus::Replace,
        ][usize::from(scan_bits >> 1)];
        p.on_spam = if scan_bits >> 1 == 3 {
            OnSpam::Replace
        } else {
            OnSpam::Tag
        };
        p.on_error = if scan_bits & 4 != 0 {
            OnScanError::Pass
        } else {
            OnScanError::Tempfail
        };
        p.header = scan_bits & 2 != 0;
        Arc::new(p)
    });
    let cfg = HopConfig {
        listener: Arc::from("sim"),
        client_ip: IpAddr::from([192, 0, 2, 7]),
        destination: None,
        client_tls,
        stls_available: listener == 0,
        fold_user_names: more & 0x10 != 0,
        max_line,
        max_pipeline,
        unknown_commands: unknown,
        idle_timeout: Duration::from_secs(600),
        login_timeout: Duration::from_secs(60),
        greeting_timeout: Duration::from_secs(30),
        lookups,
        scan,
    };
    // Direct mode: half of the sessions with PROXY v2, dialled again after the client's STLS.
    let redial = !routing && input.byte() % 2 == 1;
    let now = Instant::now();
    let policy = Policy::new(rule_sets()[rules].clone());
    let check = Checker::new(rules == 1, client_tls);
    let mut sim = Sim {
        input,
        session: Session::new(
            Hop::new(cfg, policy, now, now),
            routing.then(|| Front::new("popgate ready")),
        )
        .redialling_after_stls(redial),
        server: None,
        pending: None,
        check,
        now,
        cin: BytesMut::new(),
        sin: BytesMut::new(),
        client_out: Vec::new(),
        client_sasl: ClientSasl::default(),
        written: Vec::new(),
        client_closing: false,
        client_eof_seen: false,
        max_chunk,
        penalty,
        ended: false,
        close: None,
        to_client: 0,
        tagged: 0,
        stls: false,
        routed: 0,
        upstream_stls: 0,
        failed_over: 0,
        login_steps: 0,
        spool: Vec::new(),
        scan_answer: None,
        scans: 0,
        early_limit: early_input_limit(max_line, max_pipeline),
        read_in_setup: false,
        redialled: 0,
        early_kept: 0,
        setup_over: routing,
    };
    // A `connect` rule's delay before the session starts, for some inputs (and a refusal
    // after it for half of those): the connect phase.
    let delayed = setup >= 216;
    let limit = early_input_limit(max_line, max_pipeline);
    let ended_in_delay = !sim.opening(delayed, setup % 2 == 1, limit);
    let early = sim.early_kept;
    if !ended_in_delay {
        sim.script();
        sim.finish();
    }
    Summary {
        close: sim.close.map(|r| format!("{r:?}")),
        to_client: sim.to_client,
        tagged_replies: sim.tagged,
        bodies: sim.check.bodies,
        stls: sim.stls,
        routed: sim.routed,
        upstream_stls: sim.upstream_stls,
        failed_over: sim.failed_over,
        scans: sim.scans,
        delayed,
        early,
        read_in_setup: sim.read_in_setup,
        redialled: sim.redialled,
        ended_in_setup: !sim.setup_over && !ended_in_delay && sim.close.is_some(),
        ended_in_delay: delayed && ended_in_delay,
    }
}

impl Sim<'_> {
    /// The connect phase, inside the session ([`Session::opening`]), driven as
    /// `session::Driver` does: without a rule's delay it lets the session in at once (direct
    /// mode: the upstream's connector goes to the session on [`Output::ConnectUpstream`];
    /// routing mode: the front greets). With one (`delayed`, and with `refused` a refusal
    /// after it), the client writes, is read while the session wants (into the buffer the
    /// relay starts with), closes its side or fails; a shutdown may come; the timer fires
    /// early or on time. `false`: the session ended in it (the relay never starts).
    fn opening(&mut self, delayed: bool, refused: bool, limit: usize) -> bool {
        let t0 = self.now;
        let delay = if delayed {
            Duration::from_millis(1 + u64::from(self.input.byte()) * 40)
        } else {
            Duration::ZERO
        };
        let refusal = (delayed && refused).then(|| ConnectRefusal {
            rule: Arc::from("slow-no"),
            reply: Some(b"-ERR [SYS/PERM] not here\r\n".to_vec()),
        });
        let admission = Admission {
            delay: delayed.then_some(delay),
            refusal,
            tags: Vec::new(),
        };
        self.session
            .opening(Opening::new(admission, self.now, limit));
        self.session.start(self.now, &mut self.sin, &mut self.cin);
        self.settle_opening();
        while self.session.stage() == SessionStage::Opening && !self.ended {
            assert!(
                self.cin.len() < limit + self.max_chunk,
                "{} client bytes kept during the delay, the limit is {limit}",
                self.cin.len()
            );
            let Some(at) = self.session.poll_timeout() else {
                panic!("the connect phase waits without a deadline");
            };
            assert_eq!(at, t0 + delay, "the deadline moved");
            if self.input.done() {
                // Nothing more happens: the delay runs out.
                self.now = self.now.max(at);
                self.session.on_timeout(self.now);
                self.settle_opening();
                continue;
            }
            let op = self.input.byte();
            match op % 8 {
                0..=2 => {
                    for _ in 0..=(op >> 4) % 4 {
                        let i = self.input.byte();
                        let line = self.client_sasl.line(i);
                        self.written.extend_from_slice(&line);
                        self.client_out.extend(line);
                    }
                }
                3 | 4 => {
                    if !self.session.wants_client_input() {
                        continue;
                    }
                    if !self.client_out.is_empty() {
                        let n = self.chunk().min(self.client_out.len());
                        let bytes: Vec<u8> = self.client_out.drain(..n).collect();
                        self.check.client_read(&bytes);
                        self.cin.extend_from_slice(&bytes);
                        self.session.on_client_input(self.now, &mut self.cin);
                    } else if self.client_closing {
                        self.client_eof_seen = true;
                        self.session.on_client_eof();
                    }
                }
                5 => {
                    if op & 0x10 == 0 {
                        self.now = self.now.max(at);
                    } else {
                        // Early (or on time by chance).
                        self.now += Duration::from_millis(u64::from(self.input.byte()) * 20);
                    }
                    self.session.on_timeout(self.now);
                }
                6 => self.client_closing = true,
                _ => match self.input.byte() % 8 {
                    1 => self.session.on_shutdown(),
                    2 => {
                        assert!(self.session.on_client_error(op & 0x10 != 0));
                    }
                    _ => {}
                },
            }
            self.settle_opening();
        }
        if self.session.stage() != SessionStage::Opening {
            assert!(!refused || !delayed, "a refused session was let in");
            assert!(self.now >= t0 + delay, "let in before the delay was over");
            return true;
        }
        if self.close == Some(CloseReason::RuleDrop) {
            assert!(refused && self.now >= t0 + delay, "refused early");
            let marks = self.session.hop().close_marks();
            assert_eq!(marks.dropped_by.as_deref(), Some("slow-no"));
        }
        false
    }

    /// Carry out the outputs after an event of the connect phase; what the client sent
    /// meanwhile is counted when the phase lets the session in.
    fn settle_opening(&mut self) {
        let kept = self.cin.len();
        self.settle();
        if self.session.stage() != SessionStage::Opening {
            self.early_kept = kept;
        }
    }

    /// The input's script, one action a step.
    fn script(&mut self) {
        while !self.input.done() && !self.ended {
            let op = self.input.byte();
            match op % 16 {
                0..=4 => {
                    // A pipelined batch of 1 to 4 lines.
                    for _ in 0..=(op >> 4) % 4 {
                        let i = self.input.byte();
                        let line = self.client_sasl.line(i);
                        self.written.extend_from_slice(&line);
                        self.client_out.extend(line);
                    }
                }
                5 => {
                    let n = usize::from(self.input.byte() % 32);
                    let raw = self.input.bytes(n);
                    self.write_raw(&raw);
                }
                6..=8 => {
                    let n = self.chunk();
                    self.feed_client(n);
                }
                9..=11 => {
                    let n = self.chunk();
                    self.feed_server(n);
                }
                12 => {
                    if let Some(s) = self.server.as_mut() {
                        s.release();
                    }
                }
                13 => {
                    if op & 0x30 == 0 {
                        self.fire_timer();
                    } else {
                        // Early: nothing may be due.
                        let ms = u64::from(self.input.byte()) * 20;
                        self.now += Duration::from_millis(ms);
                        self.session.on_timeout(self.now);
                    }
                }
                14 => self.client_closing = true,
                _ => match self.input.byte() % 32 {
                    1 => self.session.on_shutdown(),
                    2 => self
                        .session
                        .on_upstream_error(self.now, op & 0x10 != 0, &"sim: reset"),
                    _ => {}
                },
            }
            self.settle();
        }
    }

    /// Raw bytes from the client; a marked secret they happen to spell (alone or with what
    /// came before) is spoiled: a secret the client sends outside a login is not one popgate
    /// can recognise.
    fn write_raw(&mut self, raw: &[u8]) {
        let from = self.written.len();
        self.written.extend_from_slice(raw);
        self.client_out.extend_from_slice(raw);
        for needle in needles() {
            let start = from.saturating_sub(needle.len());
            while let Some(p) = self.written[start..]
                .windows(needle.len())
                .position(|w| w == &needle[..])
            {
                // The occurrence's last byte is among the new ones, not yet read.
                let from_end = self.written.len() - (start + p + needle.len() - 1);
                let wl = self.written.len();
                let cl = self.client_out.len();
                self.written[wl - from_end] = b'_';
                self.client_out[cl - from_end] = b'_';
            }
        }
    }

    fn chunk(&mut self) -> usize {
        1 + usize::from(self.input.byte()) % self.max_chunk
    }

    /// The driver reads up to `n` client bytes (or the end of the stream), if the hop wants.
    fn feed_client(&mut self, n: usize) -> bool {
        if !self.session.wants_client_input() {
            return false;
        }
        if !self.client_out.is_empty() {
            let n = n.min(self.client_out.len());
            let bytes: Vec<u8> = self.client_out.drain(..n).collect();
            self.check.client_read(&bytes);
            self.cin.extend_from_slice(&bytes);
            self.read_in_setup |= self.session.connecting() == Some(UpstreamPurpose::Setup);
            self.session.on_client_input(self.now, &mut self.cin);
            return true;
        }
        if self.client_closing && !self.client_eof_seen {
            self.client_eof_seen = true;
            self.session.on_client_eof();
            return true;
        }
        false
    }

    /// The driver reads up to `n` server bytes (or the end of the stream), if the hop wants
    /// and an upstream is connected.
    fn feed_server(&mut self, n: usize) -> bool {
        if !self.session.wants_server_input() {
            return false;
        }
        let Some(server) = self.link().as_mut() else {
            return false;
        };
        let bytes = server.read(n);
        if !bytes.is_empty() {
            self.server_input(&bytes);
            return true;
        }
        if server.at_eof() {
            server.eof_seen = true;
            self.session.on_upstream_eof(self.now);
            return true;
        }
        false
    }

    /// Fire the hop's timer at the instant it reported.
    fn fire_timer(&mut self) -> bool {
        let Some(at) = self.session.poll_timeout() else {
            return false;
        };
        self.now = self.now.max(at);
        self.session.on_timeout(self.now);
        true
    }

    fn server_input(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.sin.extend_from_slice(bytes);
        self.session
            .on_server_input(self.now, &mut self.sin, &mut self.cin);
        self.pump_events();
    }

    /// Dispatch the hop's events; answer a failed login with the penalty. Whether there were
    /// any.
    fn pump_events(&mut self) -> bool {
        let mut any = false;
        while let Some(ev) = self.session.poll_event() {
            any = true;
            match ev {
                SessionEvent::LoginFailed(_) => self.session.penalty(self.now, self.penalty),
                SessionEvent::LocalReply(bytes) => self.check.local_reply(&bytes),
                SessionEvent::Injected(line) => self.check.injected(line.line()),
                _ => {}
            }
        }
        any
    }

    /// Carry out the outputs in order, as the driver does after every call.
    fn settle(&mut self) {
        while !self.ended {
            self.pump_events();
            let output = self
                .session
                .poll_output(self.now, &mut self.sin, &mut self.cin);
            self.front_traffic();
            let Some(output) = output else {
                if self.session.connecting().is_some() {
                    // The routed login waits for the server (or its deadline).
                    self.login_read();
                    continue;
                }
                if let Some(reports) = self.scan_answer.take() {
                    self.session.scan_done(
                        self.now,
                        "Mon, 07 Dec 2026 15:04:05 +0000",
                        reports,
                        &mut self.cin,
                    );
                    continue;
                }
                // The front's answers may have raised events (a failed login's, whose
                // penalty lets held outputs go): both queues are drained.
                if self.pump_events() {
                    continue;
                }
                return;
            };
            match output {
                Output::ToClient(bytes) => {
                    self.to_client += bytes.len();
                    let before = self.check.last_tag;
                    self.check.client_bytes(&bytes);
                    if self.check.last_tag != before {
                        self.tagged += 1;
                    }
                }
                Output::ToUpstream(bytes) if self.session.connecting().is_some() => {
                    // A connector's own lines (the routed login's replay, an STLS).
                    self.check.upstream_bytes(&bytes);
                    let redial = self.session.connecting() == Some(UpstreamPurpose::Redial);
                    let slot = if redial {
                        &mut self.pending
                    } else {
                        &mut self.server
                    };
                    let Some(s) = slot.as_mut() else {
                        self.session
                            .upstream_write_failed(self.now, &"sim: not connected");
                        continue;
                    };
                    self.check.replaying = true;
                    s.receive(&bytes, &mut self.input, &mut self.check);
                    self.check.replaying = false;
                }
                Output::ToUpstream(bytes) => {
                    self.check.upstream_bytes(&bytes);
                    if let Some(server) = self.server.as_mut() {
                        server.receive(&bytes, &mut self.input, &mut self.check);
                    }
                }
                Output::StartClientTls => {
                    if self.input.byte() % 8 == 7 {
                        // The handshake failed: the driver ends the session.
                        self.ended = true;
                        return;
                    }
                    // What the client sent in plaintext after STLS is never read as commands.
                    self.client_out.clear();
                    self.check.client_unread(self.cin.len());
                    self.session.client_tls_started(&mut self.cin);
                    self.check.tls_started();
                    self.stls = true;
                }
                Output::Close(reason) => {
                    self.close = Some(reason);
                    self.ended = true;
                }
                Output::Spool(bytes) => self.spool.extend_from_slice(&bytes),
                Output::Scan(req) => {
                    use crate::types::{ScanReport, ScanVerdict};
                    self.scans += 1;
                    let reports = req
                        .scanners
                        .iter()
                        .map(|name| {
                            let v = self.input.byte();
                            let verdict = [
                                ScanVerdict::Clean,
                                ScanVerdict::Clean,
                                ScanVerdict::Infected,
                                ScanVerdict::Spam,
                                ScanVerdict::TooLarge,
                                ScanVerdict::Error,
                            ][usize::from(v % 6)];
                            ScanReport {
                                scanner: name.clone(),
                                verdict,
                                detail: (verdict != ScanVerdict::Clean)
                                    .then(|| format!("found .\r\n+OK #{v}")),
                                score: (verdict == ScanVerdict::Spam)
                                    .then_some((f64::from(v), 5.0)),
                                duration: Duration::from_millis(u64::from(v)),
                            }
                        })
                        .collect();
                    self.scan_answer = Some(reports);
                }
                Output::Unspool => {
                    let bytes = std::mem::take(&mut self.spool);
                    self.to_client += bytes.len();
                    self.check.client_bytes(&bytes);
                }
                Output::DropSpool => self.spool.clear(),
                // PROXY v2 (without the header: the model server would answer it as a
                // line): the server dialled again after STLS, unless server bytes are unread.
                // Direct mode, let in by the connect phase.
                Output::ConnectUpstream => {
                    let connector = self.setup_connector();
                    self.login_steps = 0;
                    self.session.connect_upstream(connector);
                }
                Output::RedialUpstream => {
                    if self.sin.is_empty() {
                        let connector = self.redial_connector();
                        self.login_steps = 0;
                        self.session.redial_upstream(connector);
                    }
                }
                Output::Login(login) => {
                    // What the front's answers made happen is seen before the routing.
                    self.pump_events();
                    let connector = self.login_connector(&login);
                    self.login_steps = 0;
                    self.session.connect_login(connector);
                }
                Output::Dial(_) => {
                    // The connection failed over is closed without a word.
                    *self.link() = None;
                    // Rarer in the set-up, which every direct session has.
                    let b = self.input.byte();
                    let b = match self.session.connecting() {
                        Some(UpstreamPurpose::Setup) if b < 224 => 0,
                        _ => b,
                    };
                    match b % 16 {
                        14 => self
                            .session
                            .dial_failed(self.now, &"sim: connection refused"),
                        // The TCP connect never completes.
                        15 => self.fire_login_timer(),
                        _ => {
                            let server = Server::connect(&mut self.input, &mut self.check);
                            *self.link() = Some(server);
                            self.session.dialled(self.now);
                        }
                    }
                }
                Output::StartUpstreamTls => match self.input.byte() % 8 {
                    7 => self
                        .session
                        .upstream_tls_failed(self.now, &"sim: the server's handshake failed"),
                    // The handshake outlasts the connect timeout.
                    6 => self.fire_login_timer(),
                    _ => {
                        self.upstream_stls += 1;
                        self.session.upstream_tls_done(self.now);
                    }
                },
                // No bearer login in the simulator.
                Output::FetchToken => self.session.token_failed(),
                Output::MarkDead(_) => self.failed_over += 1,
                Output::MarkAlive(_) | Output::UpstreamNotice(_) => {}
                Output::UpstreamEnded(purpose, end) => match (purpose, *end) {
                    (UpstreamPurpose::Login, UpstreamEnd::Connected { .. }) => self.routed += 1,
                    (UpstreamPurpose::Setup, UpstreamEnd::Connected { .. }) => {
                        self.setup_over = true;
                    }
                    (_, UpstreamEnd::Bridge(_)) => unreachable!("no bearer login in the simulator"),
                    (UpstreamPurpose::Redial, UpstreamEnd::Connected { .. }) => {
                        // The first connection is dropped without QUIT.
                        self.server = self.pending.take();
                        self.redialled += 1;
                    }
                    (UpstreamPurpose::Redial, _) => self.pending = None,
                    // The upstream is closed without QUIT.
                    (
                        purpose,
                        UpstreamEnd::Refused
                        | UpstreamEnd::Unavailable { .. }
                        | UpstreamEnd::NotGreeted { .. },
                    ) => {
                        self.setup_over |= purpose == UpstreamPurpose::Setup;
                        self.server = None;
                    }
                },
            }
        }
    }

    /// Routing mode: what went between the hop and the front, as it would between the hop
    /// and a server: the hop's bytes are checked as upstream-bound, the front's answers are
    /// popgate's own replies.
    fn front_traffic(&mut self) {
        let (heard, said) = self.session.take_front_traffic();
        self.check.upstream_bytes(&heard);
        self.check.local_reply(&said);
    }

    /// Routing mode's upstream for a routed login, as the driver builds it: two addresses,
    /// each dialled as the input says (refused, never answering, or the model server, which
    /// greets, takes STLS and answers the replayed lines as the input says).
    fn login_connector(&mut self, login: &Login) -> Connector {
        let stls = self.input.byte() % 2 == 1;
        let plan = Plan {
            tls: if stls {
                TlsMode::Starttls
            } else {
                TlsMode::None
            },
            tls_configured: true,
            proxy_header: None,
            xclient: None,
            read_greeting: true,
            max_line: 512,
            login: Some(Replay::Lines {
                method: login.method,
                lines: login.lines.clone(),
            }),
        };
        let timeouts = ConnectTimeouts {
            connect: Duration::from_secs(5),
            dead_for: Duration::from_secs(60),
            reply: Some(Duration::from_secs(10)),
        };
        let addresses = vec!["sim-a:110".to_owned(), "sim-b:110".to_owned()];
        Connector::new(plan, addresses, timeouts, self.now)
    }

    /// The model server a connector works on: the re-dial's pending one, else the upstream.
    fn link(&mut self) -> &mut Option<Server> {
        if self.session.connecting() == Some(UpstreamPurpose::Redial) {
            &mut self.pending
        } else {
            &mut self.server
        }
    }

    /// The re-dial after STLS, as the driver builds it: one address, the greeting read.
    fn redial_connector(&mut self) -> Connector {
        let plan = Plan {
            tls: TlsMode::None,
            tls_configured: true,
            proxy_header: None,
            xclient: None,
            read_greeting: true,
            max_line: 512,
            login: None,
        };
        let timeouts = ConnectTimeouts {
            connect: Duration::from_secs(5),
            dead_for: Duration::from_secs(60),
            reply: None,
        };
        Connector::new(plan, vec!["sim-r:110".to_owned()], timeouts, self.now)
    }

    /// Direct mode's upstream, as the driver builds it: one or two addresses (the greeting
    /// read in the set-up with two), STLS to the server as the input says; each dialled as
    /// the input says (refused, never answering, or the model server).
    fn setup_connector(&mut self) -> Connector {
        let two = self.input.byte() % 2 == 1;
        let stls = self.input.byte() % 8 == 7;
        let plan = Plan {
            tls: if stls {
                TlsMode::Starttls
            } else {
                TlsMode::None
            },
            tls_configured: true,
            proxy_header: None,
            xclient: None,
            read_greeting: super::connect::greeting_in_setup(if two { 2 } else { 1 }),
            max_line: 512,
            login: None,
        };
        let timeouts = ConnectTimeouts {
            connect: Duration::from_secs(5),
            dead_for: Duration::from_secs(60),
            reply: None,
        };
        let mut addresses = vec!["sim-a:110".to_owned()];
        if two {
            addresses.push("sim-b:110".to_owned());
        }
        Connector::new(plan, addresses, timeouts, self.now)
    }

    /// A connector waits (the set-up, or the routed login): the server's bytes come in
    /// chunks, or its end, or, when it is silent or (as the input says) slower than the
    /// deadline, the session's timer fires (the connect timeout failing over, or the
    /// login's reply timeout). During the set-up the client writes, is read (within the
    /// early-input limit: its bytes are kept for the relay) or hangs up meanwhile, and a
    /// shutdown may come.
    fn login_read(&mut self) {
        self.login_steps += 1;
        assert!(
            self.login_steps <= FINISH_STEPS,
            "the connector did not end within {FINISH_STEPS} steps"
        );
        if self.session.connecting() == Some(UpstreamPurpose::Setup) && !self.input.done() {
            assert!(
                self.cin.len() < self.early_limit + self.max_chunk,
                "{} client bytes kept during the set-up, the limit is {}",
                self.cin.len(),
                self.early_limit
            );
            match self.input.byte() % 8 {
                0 => {
                    let i = self.input.byte();
                    let line = self.client_sasl.line(i);
                    self.written.extend_from_slice(&line);
                    self.client_out.extend(line);
                    return;
                }
                1 => {
                    let n = self.chunk();
                    if self.feed_client(n) {
                        return;
                    }
                }
                2 if self.input.byte().is_multiple_of(4) => self.client_closing = true,
                3 if self.input.byte().is_multiple_of(32) => {
                    self.session.on_shutdown();
                    return;
                }
                _ => {}
            }
        }
        // Slower than the deadline: rarer in the set-up, which every direct session has.
        let slow = match self.session.connecting() {
            Some(UpstreamPurpose::Setup) => 63,
            _ => 15,
        };
        if self.link().is_none() || self.input.byte() % (slow + 1) == slow {
            self.fire_login_timer();
            return;
        }
        let n = self.chunk();
        let Some(s) = self.link().as_mut() else {
            return;
        };
        // Held replies come within the deadline.
        s.release();
        let bytes = s.read(n);
        if !bytes.is_empty() {
            assert!(self.session.wants_server_input(), "the login does not read");
            self.server_input(&bytes);
        } else if s.at_eof() {
            s.eof_seen = true;
            self.session.on_upstream_eof(self.now);
        } else {
            self.fire_login_timer();
        }
    }

    /// The session's timer fires at the instant it reported (which the login must report
    /// while it waits).
    fn fire_login_timer(&mut self) {
        let Some(at) = self.session.poll_timeout() else {
            panic!("the routed login waits with no deadline");
        };
        self.now = self.now.max(at);
        self.session.on_timeout(self.now);
    }

    /// The input is used up: the server answers, the client says what it has and closes,
    /// timers fire. The session must end within [`FINISH_STEPS`].
    fn finish(&mut self) {
        self.client_closing = true;
        for _ in 0..FINISH_STEPS {
            self.settle();
            if self.ended {
                return;
            }
            if let Some(s) = self.server.as_mut() {
                s.release();
            }
            if self.feed_server(usize::MAX) || self.feed_client(usize::MAX) {
                continue;
            }
            assert!(
                self.fire_timer(),
                "the session is open but the hop reports no deadline"
            );
        }
        panic!("the session did not end within {FINISH_STEPS} steps after the input ran out");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic inputs without a dependency.
    fn inputs(count: usize, seed: u64) -> impl Iterator<Item = Vec<u8>> {
        let mut x = seed;
        let mut next = move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        (0..count).map(move |_| {
            let len = (next() % 400) as usize;
            (0..len).map(|_| next() as u8).collect()
        })
    }

    #[test]
    fn thousands_of_random_sessions_keep_the_invariants() {
        let mut closed = 0;
        let mut tagged = 0;
        let mut reasons = std::collections::BTreeMap::new();
        let (mut bodies, mut stls, mut routed, mut upstream_stls) = (0, 0, 0, 0);
        let mut failed_over = 0;
        let mut scans = 0;
        let (mut delayed, mut early, mut ended_delayed) = (0, 0, 0);
        let (mut read_in_setup, mut ended_in_setup, mut redialled) = (0, 0, 0);
        for data in inputs(3000, 0x5eed_0f5e_5511) {
            let s = run(&data);
            delayed += usize::from(s.delayed);
            early += usize::from(s.early > 0);
            ended_delayed += usize::from(s.ended_in_delay);
            read_in_setup += usize::from(s.read_in_setup);
            ended_in_setup += usize::from(s.ended_in_setup);
            redialled += s.redialled;
            closed += usize::from(s.close.is_some());
            tagged += s.tagged_replies;
            *reasons.entry(s.close).or_insert(0) += 1;
            bodies += s.bodies;
            stls += usize::from(s.stls);
            routed += s.routed;
            upstream_stls += s.upstream_stls;
            failed_over += s.failed_over;
            scans += s.scans;
        }
        eprintln!(
            "{closed} closed, {tagged} tagged, {bodies} bodies, {stls} STLS, {routed} routed \
             ({upstream_stls} over STLS upstream, {failed_over} failed over), {scans} scans: \
             {reasons:?}"
        );
        eprintln!(
            "{delayed} delayed by a connect rule, {early} with bytes kept for the start, \
             {ended_delayed} ended there"
        );
        eprintln!(
            "{read_in_setup} read the client while connecting the upstream, \
             {ended_in_setup} ended there; {redialled} went over to a re-dial after STLS"
        );
        // Direct mode's set-up: the client read meanwhile, sessions ended in it; re-dials
        // after STLS taken over.
        assert!(
            read_in_setup > 50 && ended_in_setup > 10 && redialled > 0,
            "{read_in_setup} {ended_in_setup} {redialled}"
        );
        // Connect delays: sessions let in with early input, and sessions ended in the delay.
        assert!(
            delayed > 300 && early > 20 && ended_delayed > 20,
            "{delayed} {early} {ended_delayed}"
        );
        // The runs do reach the server and end: not a simulator that does nothing.
        assert!(closed > 2500, "{closed} sessions closed");
        assert!(tagged > 3000, "{tagged} tagged replies");
        // And they reach what the invariants are about: bodies, TLS upgrades, routed logins.
        assert!(
            bodies > 100
                && stls > 20
                && routed > 5
                && upstream_stls > 0
                && failed_over > 0
                && scans > 10,
            "{bodies} {stls} {routed} {upstream_stls} {failed_over} {scans}"
        );
    }

    #[test]
    fn every_session_regression_replays_clean() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
        for entry in std::fs::read_dir(dir).expect("fuzz/regressions") {
            let path = entry.expect("entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with("session-") {
                run(&std::fs::read(&path).expect("read"));
            }
        }
    }

    #[test]
    fn a_logged_in_session_relays_tagged_replies_and_bodies() {
        // Direct, no rules, chunks of up to 64: greeting, USER/PASS, RETR, QUIT, all answered.
        // Setup, the upstream connected, greeting `+OK`, the greeting read; then per line: written, read by the
        // driver, answered `+OK` (with 4 body lines) by the server, its answer read.
        // No re-dial; the set-up: one address, no STLS, the dial connects, the server greets.
        let mut data = vec![0, 63, 3, 0, 0, 0, 0, 0, 9, 63];
        for i in [0u8, 1, 19, 26] {
            data.extend([0, i, 6, 63, 0x40, 9, 63]);
        }
        let s = run(&data);
        assert_eq!(s.close.as_deref(), Some("Quit"), "{s:?}");
        assert!(s.tagged_replies >= 4, "{s:?}");
    }

    #[test]
    #[should_panic(expected = "require-tls: a credential")]
    fn the_checker_catches_a_secret_upstream_before_tls() {
        let mut c = Checker::new(true, false);
        c.upstream_bytes(b"XYZZY Zq9se");
        c.upstream_bytes(b"krit\r\n");
    }

    #[test]
    #[should_panic(expected = "require-tls: a PASS line")]
    fn the_checker_catches_a_pass_line_upstream_before_tls() {
        let mut c = Checker::new(true, false);
        c.upstream_bytes(b"NOOP\r\npass x\r\n");
    }

    #[test]
    #[should_panic(expected = "require-tls: a SASL answer")]
    fn the_checker_catches_a_sasl_answer_upstream_before_tls() {
        Checker::new(true, false).sasl_answer_upstream();
    }

    #[test]
    fn the_checker_lets_credentials_through_after_tls() {
        let mut c = Checker::new(true, false);
        c.upstream_bytes(b"CAPA\r\n");
        c.tls_started();
        c.upstream_bytes(b"PASS Zq9sekrit\r\n");
        c.sasl_answer_upstream();
    }

    #[test]
    #[should_panic(expected = "whose body the server never finished")]
    fn the_checker_catches_a_completed_cut_body() {
        let mut c = Checker::new(false, false);
        let tag = c.new_tag();
        c.reply(tag).multi = true;
        c.client_bytes(b"+OK #0 follows\r\n#0.0 body\r\n.\r\n");
    }

    #[test]
    #[should_panic(expected = "neither the server nor popgate sent")]
    fn the_checker_catches_an_invented_terminator() {
        let mut c = Checker::new(false, false);
        c.local_reply(b"+OK list\r\nTOP\r\n.\r\n");
        c.client_bytes(b"+OK list\r\nTOP\r\n.\r\n-ERR x\r\n.\r\n");
    }

    #[test]
    #[should_panic(expected = "replies out of command order")]
    fn the_checker_catches_replies_out_of_order() {
        let mut c = Checker::new(false, false);
        c.new_tag();
        c.new_tag();
        c.client_bytes(b"+OK #1 done\r\n+OK #0 done\r\n");
    }

    #[test]
    #[should_panic(expected = "which answers a command popgate injected")]
    fn the_checker_catches_an_injected_reply_relayed() {
        let mut c = Checker::new(false, false);
        c.injected(b"UIDL 3\r\n");
        let tag = c.new_tag();
        c.server_line(tag, b"UIDL 3\r\n");
        c.client_bytes(b"+OK #0 3 abc\r\n");
    }

    #[test]
    #[should_panic(expected = "a reply out of its command's place")]
    fn the_checker_catches_a_local_reply_out_of_place() {
        let mut c = Checker::new(false, false);
        c.new_tag();
        c.client_read(b"XYZZY\r\nSTAT\r\n");
        let stat = c.new_tag();
        c.server_line(stat, b"STAT\r\n");
        // The local refusal of XYZZY after STAT's reply.
        c.client_bytes(b"+OK #0 hi\r\n+OK #1 1 100\r\n-ERR unknown\r\n");
    }

    #[test]
    fn the_checker_accepts_a_well_formed_trace() {
        let mut c = Checker::new(false, false);
        let (g, r) = (c.new_tag(), c.new_tag());
        assert_eq!((g, r), (0, 1));
        c.reply(r).multi = true;
        c.reply(r).terminated = true;
        c.client_read(b"XYZZY\r\nRETR 1\r\n");
        c.server_line(r, b"RETR 1\r\n");
        c.local_reply(b"-ERR local\r\n");
        c.client_bytes(b"+OK #0 hi\r\n-ERR local\r\n+OK #1 follows\r\n..x\r\n.\r\n");
        assert_eq!(c.last_tag, Some(1));
    }
}
