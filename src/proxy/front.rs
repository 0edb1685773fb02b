//! Routing mode's stand-in server: until the login is known there is no upstream, so the
//! front plays the POP3 server in AUTHORIZATION state for the [`Hop`](super::Hop). The
//! [`Session`](super::Session) hands it what the hop sends upstream and its answers back to the
//! hop as server input,
//! so the hop sees the same conversation as in direct mode. No I/O.
//!
//! It greets (`+OK <text>`, never an APOP timestamp: an APOP digest is bound to one server's
//! timestamp and cannot be replayed to another), answers CAPA with what popgate itself
//! guarantees before login, USER, and the SASL steps of AUTH PLAIN and AUTH LOGIN; APOP and
//! other mechanisms are refused. A complete login (name and secret) becomes a [`Login`]: the
//! session hands it to the driver, which picks the upstream and replays it there, and tells
//! the front how it went.

use crate::pop3::command::{Command, Verb, is_separator, line_end, trim_eol};
use crate::pop3::replies;
use crate::pop3::sasl::{self, Message, Plain};

/// popgate's capability list before login (RFC 2449). TOP, UIDL and EXPIRE are the server's
/// to state: a client asks CAPA again after login and gets the upstream's own list. No
/// AUTH-RESP-CODE (RFC 3206): a refused login is answered with the routed server's own `-ERR`,
/// which has an `[AUTH]` code only if that server uses them.
const CAPA: &[u8] = b"+OK capability list follows\r\n\
USER\r\n\
SASL PLAIN LOGIN\r\n\
RESP-CODES\r\n\
PIPELINING\r\n\
IMPLEMENTATION popgate\r\n\
.\r\n";

/// How the client logged in; the upstream gets the same method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    /// USER then PASS.
    UserPass,
    /// AUTH PLAIN (replayed as `AUTH PLAIN`, then the payload on the continuation line).
    Plain,
    /// AUTH LOGIN (two continuations).
    Login,
}

/// A complete login, ready to be replayed upstream.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Login {
    /// How the client logged in.
    pub(crate) method: Method,
    /// The name routed on, as the server will see it: USER's argument; for AUTH PLAIN the
    /// authorization identity when not empty, else the authentication identity; AUTH LOGIN's
    /// user name.
    pub(crate) user: String,
    /// The password (for bridges that log in upstream with something else; never logged).
    pub(crate) secret: Vec<u8>,
    /// The lines to send upstream in order (CRLF included); every one but the last must be
    /// answered `+OK` (USER) or `+ ` (a SASL challenge).
    pub(crate) lines: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("method", &self.method)
            .field("user", &self.user)
            .field("secret", &"***")
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// AUTHORIZATION; the last USER's line and name, if any.
    Ready { user: Option<(Vec<u8>, String)> },
    /// `AUTH PLAIN` answered `+ `: the payload is due.
    PlainPayload,
    /// `AUTH LOGIN` answered `+ VXNlcm5hbWU6`: the user name is due.
    LoginUser,
    /// The password is due; the user line (base64, CRLF) and name.
    LoginPass { line: Vec<u8>, user: String },
    /// A login is out with the driver.
    Waiting,
    /// QUIT was answered.
    Quit,
}

/// The stand-in server of one routing-mode session until its login succeeds upstream.
#[derive(Debug)]
pub(crate) struct Front {
    state: State,
    /// Bytes from the hop not yet handled (kept while a login is out: they go to the real
    /// upstream if it succeeds).
    input: Vec<u8>,
    /// Answers for the hop, in order.
    output: Vec<u8>,
    login: Option<Login>,
}

impl Front {
    /// A front that greets with `+OK <greeting>`.
    pub(crate) fn new(greeting: &str) -> Front {
        Front {
            state: State::Ready { user: None },
            input: Vec::new(),
            output: format!("+OK {greeting}\r\n").into_bytes(),
            login: None,
        }
    }

    /// Bytes the hop sends upstream.
    pub(crate) fn input(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
        self.run();
    }

    /// Answers for the hop (as server input), in order.
    pub(crate) fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// A complete login the driver must now replay upstream; nothing more is handled until
    /// [`Front::login_failed`] (or the front is replaced by the upstream).
    pub(crate) fn take_login(&mut self) -> Option<Login> {
        self.login.take()
    }

    /// Whether QUIT was answered: the session ends, no upstream was dialled.
    pub(crate) fn quit(&self) -> bool {
        self.state == State::Quit
    }

    /// The login failed with `reply` (a status line with CRLF): it answers the login command,
    /// the front is back in AUTHORIZATION and handles what was kept.
    pub(crate) fn login_failed(&mut self, reply: &[u8]) {
        self.output.extend_from_slice(reply);
        self.state = State::Ready { user: None };
        self.run();
    }

    /// The client's TLS handshake after STLS completed: nothing from before it counts (RFC
    /// 2595), so a USER sent in plaintext is forgotten.
    pub(crate) fn tls_started(&mut self) {
        if matches!(self.state, State::Ready { .. }) {
            self.state = State::Ready { user: None };
        }
    }

    /// The login succeeded upstream: what the hop sent after the login command, for the
    /// upstream.
    pub(crate) fn into_rest(self) -> Vec<u8> {
        self.input
    }

    fn reply(&mut self, line: &str) {
        self.output.extend_from_slice(line.as_bytes());
        self.output.extend_from_slice(b"\r\n");
    }

    fn run(&mut self) {
        while matches!(
            self.state,
            State::Ready { .. } | State::PlainPayload | State::LoginUser | State::LoginPass { .. }
        ) {
            let Some(n) = line_end(&self.input) else {
                return;
            };
            let line: Vec<u8> = self.input.drain(..n).collect();
            self.line(&line);
        }
    }

    fn line(&mut self, line: &[u8]) {
        let state = std::mem::replace(&mut self.state, State::Ready { user: None });
        match state {
            State::Ready { user } => self.command(line, user),
            State::PlainPayload => {
                if let Some(raw) = self.sasl_answer(line) {
                    self.plain(trim_eol(line), &raw);
                }
            }
            State::LoginUser => {
                if let Some(raw) = self.sasl_answer(line) {
                    self.login_user(trim_eol(line), &raw);
                }
            }
            State::LoginPass {
                line: user_line,
                user,
            } => {
                if let Some(secret) = self.sasl_answer(line) {
                    self.ready(Login {
                        method: Method::Login,
                        user,
                        secret,
                        lines: vec![b"AUTH LOGIN\r\n".to_vec(), user_line, crlf(trim_eol(line))],
                    });
                }
            }
            State::Waiting | State::Quit => self.state = state,
        }
    }

    /// A SASL answer decoded, or `None` after answering a cancellation or bad base64 (the
    /// front is then back in AUTHORIZATION).
    fn sasl_answer(&mut self, line: &[u8]) -> Option<Vec<u8>> {
        match sasl::decode(trim_eol(line)) {
            Ok(Message::Data(raw)) => Some(raw),
            Ok(Message::Cancel) => {
                self.reply(replies::AUTH_CANCELLED);
                None
            }
            Err(_) => {
                self.reply(replies::INVALID_BASE64);
                None
            }
        }
    }

    /// An AUTH PLAIN message (`b64` as sent, `raw` decoded).
    fn plain(&mut self, b64: &[u8], raw: &[u8]) {
        let Ok(plain) = Plain::parse(raw) else {
            self.reply(replies::MALFORMED_PLAIN);
            return;
        };
        self.ready(Login {
            method: Method::Plain,
            user: sasl::name_text(plain.user()),
            secret: plain.password.to_vec(),
            lines: vec![b"AUTH PLAIN\r\n".to_vec(), crlf(b64)],
        });
    }

    /// AUTH LOGIN's user name (`b64` as sent, `raw` decoded): the password is asked next.
    fn login_user(&mut self, b64: &[u8], raw: &[u8]) {
        match sasl::login_name(raw) {
            Ok(name) => {
                self.reply("+ UGFzc3dvcmQ6");
                self.state = State::LoginPass {
                    line: crlf(b64),
                    user: sasl::name_text(name),
                };
            }
            Err(_) => self.reply(replies::MALFORMED_LOGIN),
        }
    }

    fn ready(&mut self, login: Login) {
        self.login = Some(login);
        self.state = State::Waiting;
    }

    fn command(&mut self, line: &[u8], user: Option<(Vec<u8>, String)>) {
        // A pending USER stays across other commands (CAPA between USER and PASS).
        self.state = State::Ready { user };
        let Ok(cmd) = Command::parse(line) else {
            self.reply(replies::INVALID_COMMAND);
            return;
        };
        match cmd.verb {
            // White space in the name: servers split it differently (the first word, or
            // the whole rest of the line), so the name routed on would not be the one the
            // server checks. Refused; an earlier USER stays, as a server keeps it.
            Verb::User if cmd.args.iter().any(|&b| is_separator(b)) => {
                self.reply(replies::USER_WITH_WHITE_SPACE)
            }
            Verb::User => {
                let name = sasl::name_text(cmd.args);
                self.reply("+OK");
                self.state = State::Ready {
                    user: Some((line.to_vec(), name)),
                };
            }
            Verb::Pass => match std::mem::replace(&mut self.state, State::Ready { user: None }) {
                State::Ready {
                    user: Some((user_line, user)),
                } => self.ready(Login {
                    method: Method::UserPass,
                    user,
                    secret: cmd.args.to_vec(),
                    lines: vec![user_line, line.to_vec()],
                }),
                _ => self.reply(replies::USER_FIRST),
            },
            Verb::Auth => {
                let mut args = cmd.arg_list();
                let mech = args.next().map(|m| m.to_ascii_uppercase());
                let initial = args.next();
                match (mech.as_deref(), initial) {
                    (None, _) => self
                        .output
                        .extend_from_slice(b"+OK mechanisms follow\r\nPLAIN\r\nLOGIN\r\n.\r\n"),
                    (Some(b"PLAIN"), None) => {
                        self.reply("+ ");
                        self.state = State::PlainPayload;
                    }
                    (Some(b"PLAIN"), Some(ir)) => {
                        if let Some(raw) = self.sasl_answer(ir) {
                            self.plain(ir, &raw);
                        }
                    }
                    (Some(b"LOGIN"), None) => {
                        self.reply("+ VXNlcm5hbWU6");
                        self.state = State::LoginUser;
                    }
                    (Some(b"LOGIN"), Some(ir)) => {
                        if let Some(raw) = self.sasl_answer(ir) {
                            self.login_user(ir, &raw);
                        }
                    }
                    (Some(_), _) => self.reply(replies::ONLY_PLAIN_AND_LOGIN),
                }
            }
            Verb::Apop => self.reply(replies::APOP_NOT_ROUTED),
            Verb::Capa => self.output.extend_from_slice(CAPA),
            Verb::Quit => {
                self.reply("+OK popgate signing off");
                self.state = State::Quit;
                self.input.clear();
            }
            _ => self.reply(replies::NOT_BEFORE_LOGIN),
        }
    }
}

/// `data` with CRLF.
fn crlf(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    v.extend_from_slice(b"\r\n");
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn b64(s: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn out(f: &mut Front) -> String {
        String::from_utf8(f.take_output()).unwrap()
    }

    #[test]
    fn greets_without_apop_and_answers_capa_auth_apop_quit() {
        let mut f = Front::new("popgate ready");
        assert_eq!(out(&mut f), "+OK popgate ready\r\n");
        f.input(b"CAPA\r\nAUTH\r\nAPOP a 0123\r\nAUTH CRAM-MD5\r\nSTAT\r\n");
        let o = out(&mut f);
        assert!(o.starts_with("+OK capability list follows\r\nUSER\r\nSASL PLAIN LOGIN\r\n"));
        assert!(!o.contains("APOP\r\n") && !o.contains("\r\nTOP\r\n"), "{o}");
        assert!(o.contains("PLAIN\r\nLOGIN\r\n.\r\n-ERR [AUTH] APOP cannot be routed"));
        assert!(o.contains("-ERR [AUTH] this proxy routes logins by user"));
        assert!(o.ends_with("-ERR not available before login\r\n"), "{o}");
        f.input(b"QUIT\r\nUSER x\r\n");
        assert_eq!(out(&mut f), "+OK popgate signing off\r\n");
        assert!(f.quit());
        assert!(f.take_login().is_none());
    }

    #[test]
    fn user_pass_routes_on_the_last_user_and_keeps_what_follows() {
        let mut f = Front::new("g");
        out(&mut f);
        f.input(b"USER a\r\nUSER b\r\nUSER c\tx \r\nPASS s e\r\nSTAT\r\n");
        assert_eq!(
            out(&mut f),
            "+OK\r\n+OK\r\n-ERR [AUTH] a user name with white space cannot be routed\r\n"
        );
        let l = f.take_login().unwrap();
        assert_eq!(l.method, Method::UserPass);
        assert_eq!(l.user, "b");
        assert_eq!(l.secret, b"s e");
        assert_eq!(
            l.lines,
            vec![b"USER b\r\n".to_vec(), b"PASS s e\r\n".to_vec()]
        );
        assert!(!format!("{l:?}").contains("s e"));
        // Nothing more is handled while the login is out.
        f.input(b"NOOP\r\n");
        assert_eq!(out(&mut f), "");
        assert_eq!(f.into_rest(), b"STAT\r\nNOOP\r\n");
    }

    #[test]
    fn a_failed_login_answers_and_goes_on() {
        let mut f = Front::new("g");
        out(&mut f);
        f.input(b"PASS x\r\nUSER a\r\nPASS x\r\nUSER b\r\n");
        assert_eq!(out(&mut f), "-ERR USER first\r\n+OK\r\n");
        assert!(f.take_login().is_some());
        f.login_failed(b"-ERR [AUTH] no\r\n");
        assert_eq!(out(&mut f), "-ERR [AUTH] no\r\n+OK\r\n");
        f.input(b"PASS y\r\n");
        assert_eq!(f.take_login().unwrap().user, "b");
    }

    #[test]
    fn auth_plain_with_and_without_initial_response() {
        let msg = b64(b"\0alice\0pw");
        let mut f = Front::new("g");
        out(&mut f);
        f.input(format!("AUTH PLAIN {msg}\r\n").as_bytes());
        let l = f.take_login().unwrap();
        assert_eq!((l.method, l.user.as_str()), (Method::Plain, "alice"));
        // Always replayed as two steps.
        assert_eq!(l.lines[0], b"AUTH PLAIN\r\n");
        assert_eq!(l.lines[1], format!("{msg}\r\n").as_bytes());
        f.login_failed(b"-ERR no\r\n");
        out(&mut f);
        // authzid wins over authcid.
        f.input(b"AUTH plain\r\n");
        assert_eq!(out(&mut f), "+ \r\n");
        f.input(format!("{}\r\n", b64(b"bob\0master\0pw")).as_bytes());
        let l = f.take_login().unwrap();
        assert_eq!(l.user, "bob");
        assert_eq!(l.secret, b"pw");
        f.login_failed(b"-ERR no\r\n");
        out(&mut f);
        // Cancel, bad base64, malformed message.
        f.input(b"AUTH PLAIN\r\n*\r\nAUTH PLAIN\r\n!!\r\n");
        f.input(format!("AUTH PLAIN {}\r\n", b64(b"only-one-part")).as_bytes());
        assert_eq!(
            out(&mut f),
            "+ \r\n-ERR [AUTH] authentication cancelled\r\n+ \r\n-ERR [AUTH] invalid base64\r\n\
             -ERR [AUTH] malformed AUTH PLAIN message\r\n"
        );
        assert!(f.take_login().is_none());
    }

    /// One decoder with the tracker: `=` is the empty message (a PLAIN that names nobody,
    /// not bad base64), a PLAIN with a fourth part or an empty authcid is malformed, an empty
    /// AUTH LOGIN name is refused rather than routed.
    #[test]
    fn messages_that_name_nobody_are_refused() {
        let mut f = Front::new("g");
        out(&mut f);
        f.input(b"AUTH PLAIN =\r\n");
        f.input(format!("AUTH PLAIN {}\r\n", b64(b"a\0b\0c\0d")).as_bytes());
        f.input(format!("AUTH PLAIN {}\r\n", b64(b"a\0\0pw")).as_bytes());
        f.input(b"AUTH LOGIN\r\n\r\nAUTH LOGIN =\r\n");
        assert_eq!(
            out(&mut f),
            "-ERR [AUTH] malformed AUTH PLAIN message\r\n\
             -ERR [AUTH] malformed AUTH PLAIN message\r\n\
             -ERR [AUTH] malformed AUTH PLAIN message\r\n\
             + VXNlcm5hbWU6\r\n-ERR [AUTH] empty AUTH LOGIN user name\r\n\
             -ERR [AUTH] empty AUTH LOGIN user name\r\n"
        );
        assert!(f.take_login().is_none());
    }

    #[test]
    fn auth_login_two_continuations() {
        let mut f = Front::new("g");
        out(&mut f);
        f.input(b"AUTH LOGIN\r\n");
        assert_eq!(out(&mut f), "+ VXNlcm5hbWU6\r\n");
        f.input(format!("{}\r\n", b64(b"carol@example.org")).as_bytes());
        assert_eq!(out(&mut f), "+ UGFzc3dvcmQ6\r\n");
        f.input(format!("{}\r\n", b64(b"pw")).as_bytes());
        let l = f.take_login().unwrap();
        assert_eq!(
            (l.method, l.user.as_str()),
            (Method::Login, "carol@example.org")
        );
        assert_eq!(l.lines.len(), 3);
        assert_eq!(l.lines[0], b"AUTH LOGIN\r\n");
        assert_eq!(l.secret, b"pw");
    }

    #[test]
    fn every_chunk_size_gives_the_same_answers() {
        let script = format!("CAPA\r\nUSER a\r\nAUTH PLAIN\r\n{}\r\n", b64(b"\0u\0p"));
        let mut whole = Front::new("g");
        whole.input(script.as_bytes());
        let expected = (whole.take_output(), whole.take_login().unwrap().user);
        for chunk in 1..script.len() {
            let mut f = Front::new("g");
            for c in script.as_bytes().chunks(chunk) {
                f.input(c);
            }
            assert_eq!((f.take_output(), f.take_login().unwrap().user), expected);
        }
    }
}
