//! The per-session POP3 state machine, free of I/O.
//!
//! The tracker sees every client line before it is forwarded and every server byte before it is
//! relayed. It keeps the RFC 1939 state, the user name once known, and a FIFO of outstanding
//! commands (pipelining), so that it can say for each server response which command it answers,
//! whether it is multi-line and exactly where it ends. Locally answered commands (rejections,
//! rule denials) sit in the same FIFO, so their replies go out in the right position.

use std::collections::VecDeque;

use base64::Engine as _;

use crate::pop3::command::{Command, CommandError, Verb, line_end};
use crate::pop3::replies;
use crate::pop3::response::{BodyScanner, Scan, Status, StatusLine};
use crate::pop3::sasl::{self, Message, Plain};
use crate::types::{Identity, UserName, fold_user_name};

/// RFC 1939 session states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Before a successful login.
    Authorization,
    /// Logged in.
    Transaction,
    /// QUIT accepted in TRANSACTION: the server commits deletions.
    Update,
}

impl State {
    /// Lower-case name, as used in config, rules and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Authorization => "authorization",
            State::Transaction => "transaction",
            State::Update => "update",
        }
    }
}

/// How a forwarded command's response is shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// One status line.
    SingleLine,
    /// A status line, and on `+OK` a dot-terminated body.
    MultiLineOnOk,
    /// A SASL exchange: `+ ` continuations until a final `+OK`/`-ERR`.
    Sasl,
}

impl Shape {
    /// The shape of the response to `cmd` as actually sent upstream.
    pub fn of(cmd: &Command<'_>) -> Shape {
        match cmd.verb {
            Verb::Capa | Verb::Retr | Verb::Top => Shape::MultiLineOnOk,
            Verb::List | Verb::Uidl | Verb::Lang if !cmd.has_args() => Shape::MultiLineOnOk,
            // `AUTH` alone lists mechanisms (non-standard, but Dovecot and others do it).
            Verb::Auth if !cmd.has_args() => Shape::MultiLineOnOk,
            Verb::Auth => Shape::Sasl,
            _ => Shape::SingleLine,
        }
    }
}

/// What to do once a locally answered reply has been written to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterReply {
    /// Carry on.
    Continue,
    /// Start the TLS handshake with the client (STLS answered by the proxy).
    StartTls,
    /// Close the session (upstream without QUIT).
    Close,
}

/// An entry in the FIFO of outstanding commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// The server greeting, due first.
    Greeting,
    /// A command sent upstream.
    Upstream(Outstanding),
    /// A command answered by the proxy itself.
    Local {
        /// Verb of the command answered.
        verb: Verb,
        /// Reply bytes, CRLF included.
        reply: Vec<u8>,
        /// What happens after the reply is written.
        then: AfterReply,
    },
}

/// A command sent upstream whose response is still due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outstanding {
    /// Its verb.
    pub verb: Verb,
    /// Response shape derived from the command as sent.
    pub shape: Shape,
    /// Message number argument (RETR, TOP, DELE, LIST n, UIDL n).
    pub msg: Option<u32>,
    /// TOP's line count.
    pub lines: Option<u32>,
    /// Who a USER or APOP command names (an attempt until the server accepts it), folded as
    /// the server folds names when it was sent.
    name: Option<Identity>,
    /// Sent by popgate itself (see [`Tracker::inject`]): its response is never relayed.
    pub internal: bool,
}

impl Outstanding {
    /// The entry for `cmd` as sent: no login name, not popgate's own.
    fn of(cmd: &Command<'_>) -> Outstanding {
        Outstanding {
            verb: cmd.verb,
            shape: Shape::of(cmd),
            msg: cmd.msg_number(),
            lines: match cmd.verb {
                Verb::Top => cmd.arg_str(1).and_then(|s| s.parse().ok()),
                _ => None,
            },
            name: None,
            internal: false,
        }
    }
}

/// A reply the proxy itself owes the client, now due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    /// Verb of the command answered.
    pub verb: Verb,
    /// Reply bytes.
    pub reply: Vec<u8>,
    /// Follow-up action.
    pub then: AfterReply,
}

/// What a complete client line is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientLine<'a> {
    /// A command.
    Command(Command<'a>),
    /// A client answer inside a SASL exchange (secret; never parsed as a command).
    SaslResponse(&'a [u8]),
    /// A line after an AUTH that was refused (locally or by the server) that is no command:
    /// most likely the client's SASL answer sent without waiting. Secret: answered locally,
    /// never forwarded, never logged.
    StraySasl,
    /// A line that is no valid command.
    Invalid(CommandError),
}

/// How the user authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginMethod {
    /// USER/PASS.
    UserPass,
    /// APOP.
    Apop,
    /// SASL AUTH with the given mechanism (upper case).
    Sasl(String),
}

impl LoginMethod {
    /// Name for logs and audit (`USER`, `APOP`, `AUTH PLAIN`, ...).
    pub fn label(&self) -> String {
        match self {
            LoginMethod::UserPass => "USER".into(),
            LoginMethod::Apop => "APOP".into(),
            LoginMethod::Sasl(m) => format!("AUTH {m}"),
        }
    }
}

/// A login attempt's outcome, reported with the response that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginOutcome {
    /// Who: on success the identity the session is now fixed to, on failure the one that
    /// was tried, when known. Its user is folded (ASCII lowercase) when the server folds
    /// names ([`Tracker::set_fold_names`]): the name the server logs in; the name as typed
    /// is beside it when folding changed it (`ALICE` for `alice`).
    pub identity: Option<Identity>,
    /// How.
    pub method: LoginMethod,
    /// Whether the server accepted it.
    pub success: bool,
}

/// Facts about one server response, handed to the session with its status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseMeta {
    /// Verb of the command answered (`None` for the greeting).
    pub verb: Option<Verb>,
    /// Message number of that command.
    pub msg: Option<u32>,
    /// TOP's line count.
    pub lines: Option<u32>,
    /// Status.
    pub status: Status,
    /// Whether a body follows.
    pub multiline: bool,
    /// Set when this response decided a login.
    pub login: Option<LoginOutcome>,
    /// The message size in octets the `+OK` line states: `+OK 1200 octets` to RETR or TOP,
    /// `+OK 3 1200` to `LIST 3`; `None` when it states none (`+OK message follows`).
    pub size: Option<u64>,
    /// The response answers a command popgate sent itself ([`Tracker::inject`]): it and its
    /// body are for popgate, never for the client.
    pub internal: bool,
}

/// A prefix of the server buffer and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// No complete unit yet: read more.
    NeedMore,
    /// A status line of `len` bytes. If `meta.multiline`, body pieces follow.
    Status {
        /// Bytes of the line, line ending included.
        len: usize,
        /// What the response answers.
        meta: ResponseMeta,
    },
    /// `len` bytes of body; the terminator is still to come. Bytes that may start the
    /// terminator (`.` or `.\r` at the start of a line) are held back in the buffer until the
    /// next bytes show what they are, so a cut body never ends in what looks like one.
    Body {
        /// Bytes.
        len: usize,
    },
    /// The last `len` bytes of a body, terminator included: the response is complete.
    BodyEnd {
        /// Bytes.
        len: usize,
    },
}

/// Server behaviour that breaks the protocol: the session must close (upstream without QUIT).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Bytes arrived while no response was due.
    #[error("unsolicited data from server")]
    Unsolicited,
    /// A line that is not `+OK`/`-ERR` (or `+ ` during AUTH).
    #[error("server sent an invalid status line")]
    BadStatus,
    /// A status line longer than the configured limit.
    #[error("server status line exceeds {0} octets")]
    LineTooLong(usize),
    /// A body line `.` ended by a bare LF: some clients take it as the end of the message and
    /// others do not, so relaying it would let them disagree about where the message ends.
    #[error("server ended a body line '.' with a bare LF")]
    BareLfTerminator,
}

/// SASL mechanisms whose exchange tells popgate who logs in. Others are refused: a login
/// under a name popgate cannot know would escape every user-scoped rule and the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SaslMech {
    /// `authzid NUL authcid NUL password` (RFC 4616).
    Plain,
    /// User name, then password, each answering a challenge (or the name as initial response).
    Login,
    /// `user hex-digest`, answering the server's challenge (RFC 2195).
    CramMd5,
    /// SCRAM-SHA-* (RFC 5802): `n,[a=authzid],n=user,r=nonce` in the client-first message.
    Scram,
    /// `user=NAME\x01auth=Bearer TOKEN\x01\x01` (Google, Microsoft).
    XOAuth2,
    /// `n,a=NAME,\x01...` (RFC 7628); the name is optional.
    OAuthBearer,
}

impl SaslMech {
    fn from_name(name: &str) -> Option<SaslMech> {
        let up = name.to_ascii_uppercase();
        Some(match up.as_str() {
            "PLAIN" => SaslMech::Plain,
            "LOGIN" => SaslMech::Login,
            "CRAM-MD5" => SaslMech::CramMd5,
            // Channel binding (-PLUS) cannot cross a proxy that terminates TLS.
            "SCRAM-SHA-1" | "SCRAM-SHA-256" | "SCRAM-SHA-512" => SaslMech::Scram,
            "XOAUTH2" => SaslMech::XOAuth2,
            "OAUTHBEARER" => SaslMech::OAuthBearer,
            _ => return None,
        })
    }
}

/// Whether popgate relays the SASL mechanism `name` (it can learn the user from it).
pub fn sasl_mechanism_supported(name: &str) -> bool {
    SaslMech::from_name(name).is_some()
}

/// One SASL exchange in progress.
#[derive(Debug, Clone)]
struct SaslExchange {
    mech: SaslMech,
    /// Upper-case mechanism name, for the login method.
    name: String,
    /// The user name learned so far from what the server was actually sent.
    user: Option<String>,
    /// The last challenge asked for a user name (LOGIN's `Username:`).
    asks_user: bool,
    /// Challenges (`+ `) the server has sent.
    challenges: u32,
}

impl SaslExchange {
    /// Learn from one client message of the exchange (the initial response, `answer == false`,
    /// or an answer to a challenge). `=` is an empty message, `*` a cancellation.
    fn learn(&mut self, b64: &[u8], answer: bool) {
        let Ok(Message::Data(raw)) = sasl::decode(b64) else {
            return;
        };
        let name: Option<Vec<u8>> = match self.mech {
            // The server authenticates the last complete message it gets; a malformed one
            // (which it refuses) names nobody.
            SaslMech::Plain => Plain::parse(&raw).ok().map(|p| p.user().to_vec()),
            // The user name answers `Username:`; failing such a prompt, it is the first
            // non-empty message (an empty initial response is no user name: the server asks).
            SaslMech::Login if self.asks_user => sasl::login_name(&raw).ok().map(<[u8]>::to_vec),
            SaslMech::Login if self.user.is_none() && self.challenges <= 1 => {
                sasl::login_name(&raw).ok().map(<[u8]>::to_vec)
            }
            SaslMech::Login => None,
            // Only the answer to the server's challenge counts; servers ignore anything sent
            // before it.
            SaslMech::CramMd5 if answer => Some(
                raw.split(|&b| b == b' ')
                    .next()
                    .unwrap_or_default()
                    .to_vec(),
            ),
            SaslMech::CramMd5 => None,
            SaslMech::Scram | SaslMech::OAuthBearer => gs2_identity(&raw, self.mech),
            SaslMech::XOAuth2 => raw
                .split(|&b| b == 1)
                .find_map(|kv| kv.strip_prefix(b"user="))
                .map(<[u8]>::to_vec),
        };
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            self.user = Some(sasl::name_text(&name));
        }
    }
}

/// The first argument of `cmd` as text, bytes that are not UTF-8 as U+FFFD.
fn first_arg_lossy(cmd: &Command<'_>) -> Option<String> {
    cmd.arg_list()
        .next()
        .map(|a| String::from_utf8_lossy(a).into_owned())
}

/// The identity in a GS2 header (`n,a=authzid,` ...; SCRAM then has `n=user`). Returns `None`
/// for a message that is not a client-first message.
fn gs2_identity(raw: &[u8], mech: SaslMech) -> Option<Vec<u8>> {
    if !matches!(raw.first(), Some(b'n' | b'y' | b'p')) || raw.get(1).is_none() {
        return None;
    }
    let mut fields = raw.split(|&b| b == b',');
    let _cb = fields.next();
    let authz = fields
        .next()
        .and_then(|f| f.strip_prefix(b"a="))
        .filter(|a| !a.is_empty());
    let user = match mech {
        SaslMech::Scram => fields
            .next()
            .and_then(|f| f.strip_prefix(b"n="))
            .filter(|a| !a.is_empty()),
        _ => None,
    };
    // SASLprep escapes `,` and `=` as =2C / =3D in names.
    authz.or(user).map(|n| {
        String::from_utf8_lossy(n)
            .replace("=2C", ",")
            .replace("=3D", "=")
            .into_bytes()
    })
}

/// The session tracker.
#[derive(Debug)]
pub struct Tracker {
    state: State,
    /// The user the server accepted: set once, at the `+OK` of the login, never changed.
    user: Option<Identity>,
    /// Who the login being attempted names (USER the server took, APOP, SASL), folded as
    /// the server folds names.
    attempt: Option<Identity>,
    /// The name of the last `USER` the server took, as typed: the one it logs in at `PASS`,
    /// whatever APOP or AUTH attempts failed in between (Dovecot keeps it across them).
    user_given: Option<UserName>,
    /// Whether the server lowercases user names (Dovecot's default): the user rules and audit
    /// see is then the folded name.
    fold_names: bool,
    pending: VecDeque<Pending>,
    /// Set while relaying a multi-line body.
    body: Option<BodyScanner>,
    /// The body being scanned answers an injected command (never relayed).
    body_internal: bool,
    /// Set after the server sent `+ ` for the AUTH at the head: client lines are SASL answers.
    sasl_waiting_for_client: bool,
    sasl: Option<SaslExchange>,
    /// An AUTH was refused: lines that are no command are its stray SASL answers.
    stray_sasl: bool,
    quit_sent: bool,
    max_line: usize,
}

impl Tracker {
    /// A tracker for a new session whose greeting is still due.
    pub fn new(max_line: usize) -> Tracker {
        let mut pending = VecDeque::with_capacity(2);
        pending.push_back(Pending::Greeting);
        Tracker {
            state: State::Authorization,
            user: None,
            attempt: None,
            user_given: None,
            fold_names: false,
            pending,
            body: None,
            body_internal: false,
            sasl_waiting_for_client: false,
            sasl: None,
            stray_sasl: false,
            quit_sent: false,
            max_line,
        }
    }

    /// Let go of the queue's memory while nothing is outstanding (a waiting session keeps
    /// no room it does not use).
    pub fn trim(&mut self) {
        if self.pending.is_empty() && self.pending.capacity() > 0 {
            self.pending = VecDeque::new();
        }
    }

    /// Whether the server folds user names to lower case (ASCII `A`-`Z` only, as Dovecot's
    /// `%L`): from now on the user rules and audit see is the folded name. Set before the
    /// login is decided (routing mode learns the server only when the login is complete).
    pub fn set_fold_names(&mut self, fold: bool) {
        self.fold_names = fold;
        let typed = self.attempt.take().map(|a| a.typed().clone());
        self.set_attempt(typed);
    }

    /// The attempt is now a login as `typed`.
    fn set_attempt(&mut self, typed: Option<UserName>) {
        self.attempt = typed.map(|t| Identity::new(t, self.fold_names));
    }

    /// `name` as the server sees it: folded when it folds names.
    fn fold(&self, name: String) -> UserName {
        match self.fold_names.then(|| fold_user_name(&name)) {
            Some(std::borrow::Cow::Owned(folded)) => folded.into(),
            _ => name.into(),
        }
    }

    /// Current RFC 1939 state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The user rules and audit see: after login the name the server accepted (fixed for the
    /// rest of the session); before it, the name of the attempt in progress, if any: the
    /// latest `USER` still awaiting its answer, else the one the server took. So a `PASS`
    /// pipelined right behind `USER eve` is judged as eve's, as it is when the client waits.
    pub fn user(&self) -> Option<&str> {
        self.user_name().map(UserName::as_str)
    }

    /// [`Tracker::user`], shared.
    pub(crate) fn user_name(&self) -> Option<&UserName> {
        match self.state {
            State::Authorization => self
                .outstanding_user()
                .or(self.attempt.as_ref().map(Identity::user)),
            State::Transaction | State::Update => self.user.as_ref().map(Identity::user),
        }
    }

    /// The user a login command names itself, before login: `APOP name digest`, or an
    /// `AUTH` whose initial response names the user (PLAIN, LOGIN, SCRAM, XOAUTH2,
    /// OAUTHBEARER); folded as [`Tracker::user`]. Rules judge such a command as that user's,
    /// not as the user of an earlier `USER`: `APOP eve` after `USER bob` is eve's login.
    pub fn name_in(&self, cmd: &Command<'_>) -> Option<UserName> {
        if self.state != State::Authorization {
            return None;
        }
        let name = match cmd.verb {
            Verb::Apop => first_arg_lossy(cmd)?,
            Verb::Auth => {
                let mech = cmd.arg_str(0)?.to_ascii_uppercase();
                let mut ex = SaslExchange {
                    mech: SaslMech::from_name(&mech)?,
                    name: mech,
                    user: None,
                    asks_user: false,
                    challenges: 0,
                };
                ex.learn(cmd.arg_list().nth(1)?, false);
                ex.user?
            }
            _ => return None,
        };
        Some(self.fold(name))
    }

    /// The user a SASL answer line names, with what the exchange learned before it (LOGIN's
    /// answer to `Username:`, PLAIN sent after an empty challenge); folded as
    /// [`Tracker::user`]. `None` outside an exchange or when no name is known.
    pub fn name_in_sasl_answer(&self, line: &[u8]) -> Option<UserName> {
        if self.state != State::Authorization {
            return None;
        }
        let mut ex = self.sasl.clone()?;
        ex.learn(crate::pop3::command::trim_eol(line), true);
        let name = ex.user?;
        Some(self.fold(name))
    }

    /// Whether a `USER` sent upstream still awaits its answer.
    pub fn user_outstanding(&self) -> bool {
        self.pending
            .iter()
            .any(|p| matches!(p, Pending::Upstream(o) if o.verb == Verb::User))
    }

    /// The name of the latest `USER` sent upstream and not yet answered (folded as `user`).
    fn outstanding_user(&self) -> Option<&UserName> {
        self.pending.iter().rev().find_map(|p| match p {
            Pending::Upstream(o) if o.verb == Verb::User => o.name.as_ref().map(Identity::user),
            _ => None,
        })
    }

    /// Outstanding entries (upstream and local).
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Whether the client has sent QUIT (it was forwarded upstream).
    pub fn quit_sent(&self) -> bool {
        self.quit_sent
    }

    /// Whether a multi-line body is being relayed to the client right now (the body of an
    /// injected command's response is not relayed: it does not count).
    pub fn in_body(&self) -> bool {
        self.body.is_some() && !self.body_internal
    }

    /// Whether the body being scanned answers a command popgate injected (consumed, not
    /// relayed).
    pub fn in_internal_body(&self) -> bool {
        self.body.is_some() && self.body_internal
    }

    /// Whether a command popgate injected still awaits its response.
    pub fn internal_pending(&self) -> bool {
        self.pending
            .iter()
            .any(|p| matches!(p, Pending::Upstream(Outstanding { internal: true, .. })))
    }

    /// Whether a command sent upstream (the client's or popgate's) still awaits its final
    /// answer.
    pub fn awaiting_upstream(&self) -> bool {
        self.pending
            .iter()
            .any(|p| matches!(p, Pending::Upstream(_) | Pending::Greeting))
    }

    /// Whether the server greeting is still due.
    pub fn greeting_due(&self) -> bool {
        matches!(self.pending.front(), Some(Pending::Greeting))
    }

    /// Whether nothing is due from the server or locally.
    pub fn idle(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether the server waits for the client's answer to a SASL challenge.
    pub fn awaiting_sasl_answer(&self) -> bool {
        self.sasl_waiting_for_client
    }

    /// Whether the next client line must wait:
    /// - an AUTH exchange is open and the server has not yet said whether it wants a client
    ///   answer (reading on would misclassify SASL data);
    /// - a login (PASS, APOP) is outstanding: which commands are valid next, and as whom,
    ///   depends on its outcome.
    pub fn client_must_wait(&self) -> bool {
        !self.sasl_waiting_for_client
            && self.pending.iter().any(|p| {
                matches!(
                    p,
                    Pending::Upstream(Outstanding {
                        shape: Shape::Sasl,
                        ..
                    }) | Pending::Upstream(Outstanding {
                        verb: Verb::Pass | Verb::Apop,
                        ..
                    })
                )
            })
    }

    /// Classify a complete client line.
    pub fn classify<'a>(&mut self, line: &'a [u8]) -> ClientLine<'a> {
        if self.sasl_waiting_for_client {
            return ClientLine::SaslResponse(line);
        }
        match Command::parse(line) {
            Ok(c) if c.verb != Verb::Unknown => {
                self.stray_sasl = false;
                ClientLine::Command(c)
            }
            _ if self.stray_sasl => ClientLine::StraySasl,
            Ok(c) => ClientLine::Command(c),
            Err(e) => ClientLine::Invalid(e),
        }
    }

    /// Why `cmd` may not be sent in the current state, if it may not: the reply text
    /// (without CRLF). RFC 1939 states: credentials only before login, mailbox commands only
    /// after it; SASL only with a mechanism popgate can read the user name from.
    pub fn refusal(&self, cmd: &Command<'_>) -> Option<&'static str> {
        let before_login = self.state == State::Authorization;
        match cmd.verb {
            Verb::User | Verb::Pass | Verb::Apop | Verb::Auth | Verb::Utf8 if !before_login => {
                Some(replies::ALREADY_LOGGED_IN)
            }
            Verb::Stat
            | Verb::List
            | Verb::Uidl
            | Verb::Retr
            | Verb::Top
            | Verb::Dele
            | Verb::Noop
            | Verb::Rset
                if before_login =>
            {
                Some(replies::NOT_LOGGED_IN)
            }
            Verb::Auth => match cmd.arg_str(0) {
                Some(mech) if !sasl_mechanism_supported(mech) => {
                    Some(replies::SASL_MECHANISM_NOT_SUPPORTED)
                }
                // A PLAIN initial response that names nobody never reaches the server (as
                // routing mode's front refuses it): a login must name its user.
                Some(mech) if mech.eq_ignore_ascii_case("PLAIN") => {
                    let ir = cmd.arg_list().nth(1)?;
                    match sasl::decode(ir) {
                        Ok(Message::Cancel) => None,
                        Ok(Message::Data(raw)) => {
                            Plain::parse(&raw).err().map(|_| replies::MALFORMED_PLAIN)
                        }
                        Err(_) => Some(replies::INVALID_BASE64),
                    }
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// Record that `cmd` was sent upstream (possibly rewritten: pass what was actually sent).
    pub fn forwarded(&mut self, cmd: &Command<'_>) {
        let shape = Shape::of(cmd);
        let mut name = None;
        match cmd.verb {
            // A name that is not UTF-8 is still a name the server may log in: kept (invalid
            // bytes as U+FFFD, as routing mode's front does), never dropped, so the session
            // does not lose its user.
            Verb::User | Verb::Apop => name = first_arg_lossy(cmd),
            Verb::Quit => self.quit_sent = true,
            Verb::Auth if shape == Shape::Sasl => {
                let mech = cmd.arg_str(0).unwrap_or("").to_ascii_uppercase();
                self.sasl = SaslMech::from_name(&mech).map(|kind| SaslExchange {
                    mech: kind,
                    name: mech,
                    user: None,
                    asks_user: false,
                    challenges: 0,
                });
                if let (Some(ex), Some(ir)) = (self.sasl.as_mut(), cmd.arg_list().nth(1)) {
                    ex.learn(ir, false);
                }
            }
            _ => {}
        }
        self.pending.push_back(Pending::Upstream(Outstanding {
            name: name.map(|n| Identity::new(n.into(), self.fold_names)),
            ..Outstanding::of(cmd)
        }));
    }

    /// Record that popgate itself sent `cmd` upstream (a `UIDL n` or `TOP n 0` the audit
    /// trail needs, in the TRANSACTION state only): its response takes its place in the FIFO
    /// like any other, but is reported with [`ResponseMeta::internal`] set so that it is
    /// consumed, never relayed. Only commands without side effects on the mailbox or the
    /// session state are allowed (UIDL, TOP, LIST, STAT, NOOP); others are ignored.
    pub fn inject(&mut self, cmd: &Command<'_>) -> bool {
        if self.state != State::Transaction
            || !matches!(
                cmd.verb,
                Verb::Uidl | Verb::Top | Verb::List | Verb::Stat | Verb::Noop
            )
        {
            return false;
        }
        self.pending.push_back(Pending::Upstream(Outstanding {
            internal: true,
            ..Outstanding::of(cmd)
        }));
        true
    }

    /// Record that a SASL answer line was sent upstream.
    pub fn forwarded_sasl(&mut self, line: &[u8]) {
        self.sasl_waiting_for_client = false;
        let data = crate::pop3::command::trim_eol(line);
        if let Some(ex) = self.sasl.as_mut() {
            ex.learn(data, true);
        }
    }

    /// Queue a reply the proxy gives itself, in order behind what is already due.
    pub fn answer_locally(&mut self, verb: Verb, reply: Vec<u8>, then: AfterReply) {
        if verb == Verb::Auth {
            // The client may have sent its SASL answer without waiting for a challenge.
            self.stray_sasl = true;
        }
        self.pending.push_back(Pending::Local { verb, reply, then });
    }

    /// Whether a local reply is due now.
    pub fn local_due(&self) -> bool {
        self.body.is_none() && matches!(self.pending.front(), Some(Pending::Local { .. }))
    }

    /// The next local reply, if it is due now (nothing owed by the server before it).
    pub fn next_local(&mut self) -> Option<LocalReply> {
        if self.body.is_some() {
            return None;
        }
        if matches!(self.pending.front(), Some(Pending::Local { .. }))
            && let Some(Pending::Local { verb, reply, then }) = self.pending.pop_front()
        {
            return Some(LocalReply { verb, reply, then });
        }
        None
    }

    /// Look at the server bytes in `buf` and say what its first piece is.
    ///
    /// The caller relays (or rewrites) `buf[..len]` and drops it from the buffer before calling
    /// again. Status pieces need a complete line; body pieces are handed out as they come,
    /// except a possible start of the terminator, which stays in `buf` until it is known.
    pub fn on_server_bytes(&mut self, buf: &[u8]) -> Result<Piece, ProtocolError> {
        if let Some(scanner) = self.body.as_mut() {
            if buf.is_empty() {
                return Ok(Piece::NeedMore);
            }
            let mut probe = *scanner;
            return match probe.scan(buf) {
                Scan::End(len) => {
                    self.body = None;
                    self.body_internal = false;
                    Ok(Piece::BodyEnd { len })
                }
                // The body before the bad line is relayed first, whatever the chunking.
                Scan::BareLfEnd { at } if at > 0 => {
                    *scanner = BodyScanner::new();
                    Ok(Piece::Body { len: at })
                }
                Scan::BareLfEnd { .. } => Err(ProtocolError::BareLfTerminator),
                Scan::More { held } => {
                    let len = buf.len() - held;
                    if len == 0 {
                        return Ok(Piece::NeedMore);
                    }
                    // The held bytes are scanned again with what follows them.
                    *scanner = if held > 0 { BodyScanner::new() } else { probe };
                    Ok(Piece::Body { len })
                }
            };
        }
        let Some(len) = line_end(buf) else {
            if buf.len() > self.max_line {
                return Err(ProtocolError::LineTooLong(self.max_line));
            }
            return Ok(Piece::NeedMore);
        };
        if len > self.max_line + 2 {
            return Err(ProtocolError::LineTooLong(self.max_line));
        }
        let line = StatusLine::parse(&buf[..len]).map_err(|_| ProtocolError::BadStatus)?;
        let meta = self.on_status(&line)?;
        Ok(Piece::Status { len, meta })
    }

    fn on_status(&mut self, line: &StatusLine<'_>) -> Result<ResponseMeta, ProtocolError> {
        let head = match self.pending.front() {
            Some(Pending::Greeting) => None,
            Some(Pending::Upstream(o)) => Some(o.clone()),
            // A local reply at the head would have been written already: the server spoke
            // out of turn.
            Some(Pending::Local { .. }) | None => return Err(ProtocolError::Unsolicited),
        };
        let Some(out) = head else {
            if line.status == Status::Continue {
                return Err(ProtocolError::BadStatus);
            }
            self.pending.pop_front();
            return Ok(ResponseMeta {
                verb: None,
                msg: None,
                lines: None,
                status: line.status,
                multiline: false,
                login: None,
                size: None,
                internal: false,
            });
        };
        if line.status == Status::Continue {
            if out.shape != Shape::Sasl {
                return Err(ProtocolError::BadStatus);
            }
            self.sasl_waiting_for_client = true;
            if let Some(ex) = self.sasl.as_mut() {
                ex.challenges += 1;
                let prompt = base64::engine::general_purpose::STANDARD
                    .decode(line.text)
                    .unwrap_or_default();
                ex.asks_user = prompt.len() >= 4 && prompt[..4].eq_ignore_ascii_case(b"user");
            }
            return Ok(ResponseMeta {
                verb: Some(out.verb),
                msg: out.msg,
                lines: out.lines,
                status: line.status,
                multiline: false,
                login: None,
                size: None,
                internal: false,
            });
        }
        self.pending.pop_front();
        if out.internal {
            let ok = line.status == Status::Ok;
            let multiline = ok && out.shape == Shape::MultiLineOnOk;
            if multiline {
                self.body = Some(BodyScanner::new());
                self.body_internal = true;
            }
            return Ok(ResponseMeta {
                verb: Some(out.verb),
                msg: out.msg,
                lines: out.lines,
                status: line.status,
                multiline,
                login: None,
                size: None,
                internal: true,
            });
        }
        let ok = line.status == Status::Ok;
        let multiline = ok && out.shape == Shape::MultiLineOnOk;
        if multiline {
            self.body = Some(BodyScanner::new());
        }
        let before_login = self.state == State::Authorization;
        let mut login = None;
        match out.verb {
            // A refused USER leaves the earlier name: a server that keeps it logs that user
            // in at the next PASS.
            Verb::User if before_login && ok => {
                self.user_given = out.name.map(|n| n.typed().clone());
                self.set_attempt(self.user_given.clone());
            }
            Verb::Pass if before_login => {
                self.set_attempt(self.user_given.clone());
                login = Some(LoginMethod::UserPass);
            }
            Verb::Apop if before_login => {
                self.set_attempt(out.name.map(|n| n.typed().clone()));
                login = Some(LoginMethod::Apop);
            }
            Verb::Auth if out.shape == Shape::Sasl => {
                self.sasl_waiting_for_client = false;
                let ex = self.sasl.take();
                if !ok {
                    // Its answer may still be on the way: never a command.
                    self.stray_sasl = true;
                }
                if before_login {
                    let method = LoginMethod::Sasl(match &ex {
                        Some(ex) => ex.name.clone(),
                        None => "UNKNOWN".into(),
                    });
                    self.set_attempt(ex.and_then(|ex| ex.user).map(UserName::from));
                    login = Some(method);
                }
            }
            Verb::Quit if ok && self.state == State::Transaction => self.state = State::Update,
            _ => {}
        }
        let login = login.map(|method| {
            let identity = self.attempt.clone();
            if ok {
                // The identity is fixed here, once: nothing later in the session changes it.
                self.user = identity.clone();
                self.state = State::Transaction;
            } else {
                // A failed APOP or AUTH leaves the server with the name USER gave: a PASS
                // now logs that user in, not the one the failed attempt named.
                self.set_attempt(self.user_given.clone());
            }
            LoginOutcome {
                identity,
                method,
                success: ok,
            }
        });
        Ok(ResponseMeta {
            verb: Some(out.verb),
            msg: out.msg,
            lines: out.lines,
            status: line.status,
            multiline,
            login,
            size: if ok {
                stated_size(out.verb, multiline, line.text)
            } else {
                None
            },
            internal: false,
        })
    }
}

/// The size an `+OK` line's text states: its first word for RETR/TOP (`1200 octets`), the
/// second of exactly `n size` for a one-line LIST. A multi-line LIST's line gives totals only.
fn stated_size(verb: Verb, multiline: bool, text: &[u8]) -> Option<u64> {
    let number = |w: &[u8]| -> Option<u64> {
        if w.is_empty() || !w.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(w).ok()?.parse().ok()
    };
    let mut words = text.split(|&b| b == b' ').filter(|w| !w.is_empty());
    match verb {
        Verb::Retr | Verb::Top => number(words.next()?),
        Verb::List if !multiline => {
            let (_n, size) = (number(words.next()?)?, number(words.next()?)?);
            Some(size)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the session would observe: a normalised event list.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Ev {
        Status(Option<Verb>, Status, bool, Option<bool>),
        BodyBytes(Vec<u8>),
        Local(Vec<u8>),
    }

    /// Drive a tracker with client lines (all sent first: pipelined) and server bytes cut into
    /// chunks of `chunk` bytes; returns the events with body bytes merged per response.
    fn drive(client: &[&[u8]], server: &[u8], chunk: usize) -> (Vec<Ev>, Tracker) {
        let mut t = Tracker::new(512);
        let mut evs = Vec::new();
        let mut pending_client: VecDeque<&[u8]> = client.iter().copied().collect();
        let mut buf: Vec<u8> = Vec::new();
        let mut fed = 0;
        let push_body = |evs: &mut Vec<Ev>, bytes: &[u8]| {
            if let Some(Ev::BodyBytes(b)) = evs.last_mut() {
                b.extend_from_slice(bytes);
            } else {
                evs.push(Ev::BodyBytes(bytes.to_vec()));
            }
        };
        loop {
            while !t.client_must_wait()
                && let Some(line) = pending_client.pop_front()
            {
                match t.classify(line) {
                    ClientLine::Command(c) if c.verb == Verb::Unknown => {
                        t.answer_locally(c.verb, b"-ERR unknown\r\n".to_vec(), AfterReply::Continue)
                    }
                    ClientLine::Command(c) => t.forwarded(&c),
                    ClientLine::SaslResponse(l) => t.forwarded_sasl(l),
                    ClientLine::StraySasl => t.answer_locally(
                        Verb::Unknown,
                        b"-ERR stray\r\n".to_vec(),
                        AfterReply::Continue,
                    ),
                    ClientLine::Invalid(_) => t.answer_locally(
                        Verb::Unknown,
                        b"-ERR bad\r\n".to_vec(),
                        AfterReply::Continue,
                    ),
                }
                // A SASL answer may only follow a continuation: stop after AUTH.
                if t.client_must_wait() {
                    break;
                }
            }
            while let Some(l) = t.next_local() {
                evs.push(Ev::Local(l.reply));
            }
            match t.on_server_bytes(&buf).unwrap() {
                Piece::NeedMore => {
                    if fed >= server.len() {
                        break;
                    }
                    let end = (fed + chunk).min(server.len());
                    buf.extend_from_slice(&server[fed..end]);
                    fed = end;
                }
                Piece::Status { len, meta } => {
                    evs.push(Ev::Status(
                        meta.verb,
                        meta.status,
                        meta.multiline,
                        meta.login.map(|l| l.success),
                    ));
                    buf.drain(..len);
                }
                Piece::Body { len } | Piece::BodyEnd { len } => {
                    push_body(&mut evs, &buf[..len]);
                    buf.drain(..len);
                }
            }
        }
        (evs, t)
    }

    const CLIENT: &[&[u8]] = &[
        b"CAPA\r\n",
        b"USER alice\r\n",
        b"PASS secret\r\n",
        b"XYZZY\r\n",
        b"STAT\r\n",
        b"LIST\r\n",
        b"LIST 1\r\n",
        b"RETR 1\r\n",
        b"RETR 9\r\n",
        b"TOP 1 0\r\n",
        b"DELE 1\r\n",
        b"UIDL\r\n",
        b"RETR\r\n",
        b"QUIT\r\n",
    ];
    const SERVER: &[u8] = b"+OK ready <1.2@x>\r\n\
        +OK caps\r\nUSER\r\nPIPELINING\r\n.\r\n\
        +OK\r\n\
        +OK logged in\r\n\
        +OK 2 30\r\n\
        +OK list\r\n1 10\r\n2 20\r\n.\r\n\
        +OK 1 10\r\n\
        +OK 10 octets\r\nSubject: x\r\n\r\n..dot\r\n.\r\n\
        -ERR no such message\r\n\
        +OK top\r\nSubject: x\r\n\r\n.\r\n\
        +OK deleted\r\n\
        +OK\r\n2 bbb\r\n.\r\n\
        +OK bye\r\n";

    #[test]
    fn pipelined_dialogue_same_at_every_chunk_size() {
        let (want, t) = drive(CLIENT, SERVER, SERVER.len());
        assert_eq!(t.state(), State::Update);
        assert_eq!(t.user(), Some("alice"));
        assert!(t.idle());
        let statuses: Vec<_> = want
            .iter()
            .filter_map(|e| match e {
                Ev::Status(v, s, m, _) => Some((*v, *s, *m)),
                Ev::Local(_) => Some((Some(Verb::Unknown), Status::Err, false)),
                _ => None,
            })
            .collect();
        assert_eq!(statuses.len(), CLIENT.len() + 1);
        assert_eq!(statuses[1], (Some(Verb::Capa), Status::Ok, true));
        assert_eq!(statuses[4], (Some(Verb::Unknown), Status::Err, false));
        assert_eq!(statuses[7], (Some(Verb::List), Status::Ok, false));
        assert_eq!(statuses[9], (Some(Verb::Retr), Status::Err, false));
        assert_eq!(statuses[13], (Some(Verb::Unknown), Status::Err, false));
        assert!(want.contains(&Ev::BodyBytes(b"Subject: x\r\n\r\n..dot\r\n.\r\n".to_vec())));
        assert!(want.contains(&Ev::Status(Some(Verb::Pass), Status::Ok, false, Some(true))));
        for chunk in 1..=64 {
            let (got, _) = drive(CLIENT, SERVER, chunk);
            assert_eq!(got, want, "chunk size {chunk}");
        }
    }

    #[test]
    fn sasl_plain_with_continuation_learns_user() {
        let client: &[&[u8]] = &[b"AUTH PLAIN\r\n", b"AGJvYgBzM2NyZXQ=\r\n", b"STAT\r\n"];
        let server = b"+OK hi\r\n+ \r\n+OK welcome\r\n+OK 0 0\r\n";
        let (evs, t) = drive(client, server, 3);
        assert_eq!(t.user(), Some("bob"));
        assert_eq!(t.state(), State::Transaction);
        assert!(evs.contains(&Ev::Status(Some(Verb::Auth), Status::Continue, false, None)));
        assert!(evs.contains(&Ev::Status(Some(Verb::Stat), Status::Ok, false, None)));
    }

    #[test]
    fn sasl_login_and_failure() {
        let client: &[&[u8]] = &[b"AUTH LOGIN\r\n", b"Ym9i\r\n", b"cGFzcw==\r\n"];
        let server = b"+OK hi\r\n+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n-ERR [AUTH] no\r\n";
        let (evs, t) = drive(client, server, 5);
        // The failed attempt was bob's (its login outcome says so), but it leaves no name
        // with the server: no USER was given, a PASS now would log nobody in.
        assert_eq!(t.user(), None);
        assert_eq!(t.state(), State::Authorization);
        assert!(evs.contains(&Ev::Status(
            Some(Verb::Auth),
            Status::Err,
            false,
            Some(false)
        )));
    }

    /// A login reports who it is for as the server sees the name: a tracker that learns only
    /// after USER was taken that the server folds names (routing mode) reports the folded
    /// name, with the typed one beside it, and keeps the folded one as the session's user.
    #[test]
    fn a_login_reports_its_identity_folded_as_the_server_folds_names() {
        let answer = |t: &mut Tracker, line: &[u8]| match t.on_server_bytes(line).unwrap() {
            Piece::Status { meta, .. } => meta.login,
            other => panic!("{other:?}"),
        };
        let mut t = Tracker::new(512);
        assert_eq!(answer(&mut t, b"+OK hi\r\n"), None);
        t.forwarded(&Command::parse(b"USER ALICE\r\n").unwrap());
        assert_eq!(t.user(), Some("ALICE"));
        assert_eq!(answer(&mut t, b"+OK\r\n"), None);
        t.set_fold_names(true);
        assert_eq!(t.user(), Some("alice"));
        t.forwarded(&Command::parse(b"PASS secret\r\n").unwrap());
        let login = answer(&mut t, b"+OK in\r\n").unwrap();
        assert!(login.success);
        let id = login.identity.unwrap();
        assert_eq!(id.user().as_str(), "alice");
        assert_eq!(id.as_typed().map(UserName::as_str), Some("ALICE"));
        assert_eq!(t.user(), Some("alice"));
    }

    /// The front's decoder: a PLAIN message with a fourth part or an empty authcid names
    /// nobody (the tracker used to name its first part), and an empty AUTH LOGIN message is
    /// no name.
    #[test]
    fn malformed_sasl_messages_name_nobody() {
        for msg in [b64(b"eve\0bob\0pw\0x"), b64(b"eve\0\0pw"), b64(b"eve")] {
            let t = Tracker::new(512);
            let cmd = format!("AUTH PLAIN {msg}\r\n");
            let cmd = Command::parse(cmd.as_bytes()).unwrap();
            assert_eq!(t.name_in(&cmd), None, "{msg}");
            assert_eq!(t.refusal(&cmd), Some(replies::MALFORMED_PLAIN), "{msg}");
        }
        let mut t = Tracker::new(512);
        let auth = Command::parse(b"AUTH PLAIN\r\n").unwrap();
        assert_eq!(t.refusal(&auth), None);
        t.forwarded(&auth);
        let odd = format!("{}\r\n", b64(b"eve\0bob\0pw\0x"));
        assert_eq!(t.name_in_sasl_answer(odd.as_bytes()), None);
        let good = format!("{}\r\n", b64(b"\0bob\0pw"));
        assert_eq!(
            t.name_in_sasl_answer(good.as_bytes()).as_deref(),
            Some("bob")
        );
        let bad = Command::parse(b"AUTH PLAIN !!\r\n").unwrap();
        assert_eq!(t.refusal(&bad), Some(replies::INVALID_BASE64));
        let cancel = Command::parse(b"AUTH PLAIN *\r\n").unwrap();
        assert_eq!(t.refusal(&cancel), None);
        let mut t = Tracker::new(512);
        let login = Command::parse(b"AUTH LOGIN =\r\n").unwrap();
        assert_eq!(t.name_in(&login), None);
        t.forwarded(&Command::parse(b"AUTH LOGIN\r\n").unwrap());
        assert_eq!(t.name_in_sasl_answer(b"\r\n"), None);
    }

    #[test]
    fn cram_md5_names_the_user() {
        // base64("dave 0123456789abcdef0123456789abcdef")
        let client: &[&[u8]] = &[
            b"AUTH CRAM-MD5\r\n",
            b"ZGF2ZSAwMTIzNDU2Nzg5YWJjZGVmMDEyMzQ1Njc4OWFiY2RlZg==\r\n",
        ];
        let server = b"+OK hi\r\n+ PDEyMzRAaG9zdD4=\r\n+OK in\r\n";
        let (_, t) = drive(client, server, 4);
        assert_eq!(t.user(), Some("dave"));
        assert_eq!(t.state(), State::Transaction);
    }

    #[test]
    fn auth_initial_response_and_mechanism_list() {
        let client: &[&[u8]] = &[b"AUTH\r\n", b"AUTH PLAIN AGNhcm9sAHg=\r\n"];
        let server = b"+OK hi\r\n+OK\r\nPLAIN\r\n.\r\n+OK in\r\n";
        let (_, t) = drive(client, server, 2);
        assert_eq!(t.user(), Some("carol"));
        assert_eq!(t.state(), State::Transaction);
    }

    #[test]
    fn server_protocol_errors() {
        let mut t = Tracker::new(512);
        assert_eq!(
            t.on_server_bytes(b"HELLO\r\n"),
            Err(ProtocolError::BadStatus)
        );
        let mut t = Tracker::new(512);
        assert!(matches!(
            t.on_server_bytes(b"+OK\r\n"),
            Ok(Piece::Status { .. })
        ));
        assert_eq!(
            t.on_server_bytes(b"+OK\r\n"),
            Err(ProtocolError::Unsolicited)
        );
        let mut t = Tracker::new(8);
        assert_eq!(
            t.on_server_bytes(b"+OK 12345678"),
            Err(ProtocolError::LineTooLong(8))
        );
        // A continuation for a non-AUTH command is invalid.
        let mut t = Tracker::new(512);
        let _ = t.on_server_bytes(b"+OK\r\n");
        t.forwarded(&Command::parse(b"STAT\r\n").unwrap());
        assert_eq!(t.on_server_bytes(b"+ x\r\n"), Err(ProtocolError::BadStatus));
    }

    #[test]
    fn local_reply_waits_for_earlier_responses() {
        let mut t = Tracker::new(512);
        assert!(matches!(
            t.on_server_bytes(b"+OK\r\n"),
            Ok(Piece::Status { .. })
        ));
        t.forwarded(&Command::parse(b"RETR 1\r\n").unwrap());
        t.answer_locally(
            Verb::Dele,
            b"-ERR denied\r\n".to_vec(),
            AfterReply::Continue,
        );
        assert_eq!(t.next_local(), None);
        assert!(matches!(
            t.on_server_bytes(b"+OK\r\nbody\r\n"),
            Ok(Piece::Status { .. })
        ));
        assert_eq!(t.next_local(), None, "not while the body is relayed");
        assert_eq!(
            t.on_server_bytes(b"body\r\n.\r\n"),
            Ok(Piece::BodyEnd { len: 9 })
        );
        assert_eq!(
            t.next_local().map(|l| l.reply),
            Some(b"-ERR denied\r\n".to_vec())
        );
    }

    #[test]
    fn quit_in_authorization_is_not_update() {
        let (_, t) = drive(&[b"QUIT\r\n"], b"+OK hi\r\n+OK bye\r\n", 1);
        assert_eq!(t.state(), State::Authorization);
        assert!(t.quit_sent());
    }

    fn b64(s: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    /// A tracker logged in as `archive` with USER/PASS.
    fn logged_in() -> Tracker {
        let (_, t) = drive(
            &[b"USER archive\r\n", b"PASS pw\r\n"],
            b"+OK hi\r\n+OK\r\n+OK in\r\n",
            7,
        );
        assert_eq!(t.state(), State::Transaction);
        assert_eq!(t.user(), Some("archive"));
        t
    }

    #[test]
    fn identity_cannot_change_after_login() {
        let t = logged_in();
        for line in [
            &b"USER nobody\r\n"[..],
            b"PASS x\r\n",
            b"APOP nobody c4c9334bac560ecc979e58001b3e22fb\r\n",
            b"AUTH PLAIN AG5vYm9keQB4\r\n",
            b"auth cram-md5 bm9ib2R5IDAw\r\n",
            b"\tUSER\tnobody\r\n",
        ] {
            let cmd = Command::parse(line).unwrap();
            assert_eq!(
                t.refusal(&cmd),
                Some(replies::ALREADY_LOGGED_IN),
                "{line:?}"
            );
        }
        for line in [&b"DELE 1\r\n"[..], b"STAT\r\n", b"QUIT\r\n", b"CAPA\r\n"] {
            assert_eq!(t.refusal(&Command::parse(line).unwrap()), None);
        }
        // Even if a server accepted a second login, the user stays the first one.
        let mut t = logged_in();
        t.forwarded(&Command::parse(b"USER nobody\r\n").unwrap());
        t.forwarded(&Command::parse(b"PASS x\r\n").unwrap());
        assert!(matches!(
            t.on_server_bytes(b"+OK\r\n"),
            Ok(Piece::Status { .. })
        ));
        let Ok(Piece::Status { meta, .. }) = t.on_server_bytes(b"+OK\r\n") else {
            panic!("no status");
        };
        assert_eq!(meta.login, None);
        assert_eq!(t.user(), Some("archive"));
    }

    #[test]
    fn mailbox_commands_refused_before_login() {
        let t = Tracker::new(512);
        for line in [
            &b"STAT\r\n"[..],
            b"RETR 1\r\n",
            b"DELE 1\r\n",
            b"LIST\r\n",
            b"NOOP\r\n",
        ] {
            assert_eq!(
                t.refusal(&Command::parse(line).unwrap()),
                Some("-ERR not logged in")
            );
        }
        for line in [
            &b"USER a\r\n"[..],
            b"CAPA\r\n",
            b"AUTH PLAIN\r\n",
            b"QUIT\r\n",
        ] {
            assert_eq!(t.refusal(&Command::parse(line).unwrap()), None);
        }
        assert!(
            t.refusal(&Command::parse(b"AUTH GSSAPI\r\n").unwrap())
                .is_some()
        );
    }

    #[test]
    fn failed_login_keeps_the_attempted_name_but_fixes_nothing() {
        let (evs, t) = drive(
            &[b"USER archive\r\n", b"PASS bad\r\n"],
            b"+OK hi\r\n+OK\r\n-ERR [AUTH] no\r\n",
            3,
        );
        assert_eq!(t.state(), State::Authorization);
        assert!(evs.contains(&Ev::Status(
            Some(Verb::Pass),
            Status::Err,
            false,
            Some(false)
        )));
        assert_eq!(t.user(), Some("archive"));
        assert_eq!(t.user, None);
    }

    /// A name that is not UTF-8 (Latin-1 `\xe9ve`) logs a user in all the same: the session
    /// keeps a user (invalid bytes shown as U+FFFD), by USER/PASS, APOP or SASL, rather than
    /// none, which no user rule and no audit query would ever find.
    #[test]
    fn a_user_name_that_is_not_utf8_still_names_the_session() {
        use base64::Engine as _;
        let plain = format!(
            "AUTH PLAIN {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(b"\0\xe9ve\0pw")
        );
        for client in [
            &[&b"USER \xe9ve\r\n"[..], b"PASS pw\r\n"][..],
            &[b"APOP \xe9ve 0123\r\n"],
            &[plain.as_bytes()],
        ] {
            let replies = if client.len() == 2 {
                &b"+OK hi\r\n+OK\r\n+OK in\r\n"[..]
            } else {
                &b"+OK hi\r\n+OK in\r\n"[..]
            };
            let (_, t) = drive(client, replies, 3);
            assert_eq!(t.state(), State::Transaction);
            assert_eq!(t.user(), Some("\u{fffd}ve"), "{client:?}");
        }
    }

    #[test]
    fn a_refused_user_keeps_the_earlier_name() {
        let (evs, t) = drive(
            &[b"USER archive\r\n", b"USER nobody\r\n", b"PASS pw\r\n"],
            b"+OK hi\r\n+OK\r\n-ERR no such user\r\n+OK in\r\n",
            4,
        );
        assert!(evs.contains(&Ev::Status(Some(Verb::Pass), Status::Ok, false, Some(true))));
        assert_eq!(t.user(), Some("archive"));
    }

    #[test]
    fn cram_md5_initial_response_is_ignored() {
        let fake = b64(b"nobody 00");
        let real = b64(b"archive 0123456789abcdef0123456789abcdef");
        let auth = format!("AUTH CRAM-MD5 {fake}\r\n");
        let answer = format!("{real}\r\n");
        let client: &[&[u8]] = &[auth.as_bytes(), answer.as_bytes()];
        let (_, t) = drive(client, b"+OK hi\r\n+ PDEyMzRAaG9zdD4=\r\n+OK in\r\n", 4);
        assert_eq!(t.state(), State::Transaction);
        assert_eq!(t.user(), Some("archive"));
    }

    #[test]
    fn empty_initial_response_is_no_user_name() {
        // AUTH LOGIN = : the server asks for the user name, the answer names the user.
        let user = format!("{}\r\n", b64(b"archive"));
        let pass = format!("{}\r\n", b64(b"pw"));
        let client: &[&[u8]] = &[b"AUTH LOGIN =\r\n", user.as_bytes(), pass.as_bytes()];
        let server = b"+OK hi\r\n+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n+OK in\r\n";
        for chunk in 1..8 {
            let (_, t) = drive(client, server, chunk);
            assert_eq!(t.user(), Some("archive"), "chunk {chunk}");
        }
        // A LOGIN initial response that the server ignores (it asks for the name again).
        let ir = format!("AUTH LOGIN {}\r\n", b64(b"nobody"));
        let client: &[&[u8]] = &[ir.as_bytes(), user.as_bytes(), pass.as_bytes()];
        let (_, t) = drive(client, server, 5);
        assert_eq!(t.user(), Some("archive"));
        // AUTH CRAM-MD5 =
        let real = format!("{}\r\n", b64(b"archive 0123456789abcdef0123456789abcdef"));
        let client: &[&[u8]] = &[b"AUTH CRAM-MD5 =\r\n", real.as_bytes()];
        let (_, t) = drive(client, b"+OK hi\r\n+ PDEyMzRAaG9zdD4=\r\n+OK in\r\n", 3);
        assert_eq!(t.user(), Some("archive"));
        // AUTH PLAIN = then the credentials on the continuation line.
        let creds = format!("{}\r\n", b64(b"\0archive\0pw"));
        let client: &[&[u8]] = &[b"AUTH PLAIN =\r\n", creds.as_bytes()];
        let (_, t) = drive(client, b"+OK hi\r\n+ \r\n+OK in\r\n", 3);
        assert_eq!(t.user(), Some("archive"));
    }

    #[test]
    fn other_mechanisms_name_the_user() {
        let cases: [(&str, Vec<u8>); 3] = [
            ("SCRAM-SHA-256", b"n,,n=archive,r=abcdef".to_vec()),
            (
                "XOAUTH2",
                b"user=archive\x01auth=Bearer tok\x01\x01".to_vec(),
            ),
            (
                "OAUTHBEARER",
                b"n,a=archive,\x01auth=Bearer tok\x01\x01".to_vec(),
            ),
        ];
        for (mech, msg) in cases {
            let auth = format!("AUTH {mech}\r\n");
            let answer = format!("{}\r\n", b64(&msg));
            let client: &[&[u8]] = &[auth.as_bytes(), answer.as_bytes()];
            let (_, t) = drive(client, b"+OK hi\r\n+ \r\n+OK in\r\n", 6);
            assert_eq!(t.user(), Some("archive"), "{mech}");
        }
    }

    #[test]
    fn lines_after_a_refused_auth_are_stray_sasl() {
        let mut t = Tracker::new(512);
        let _ = t.on_server_bytes(b"+OK hi\r\n");
        t.answer_locally(Verb::Auth, b"-ERR no\r\n".to_vec(), AfterReply::Continue);
        assert_eq!(
            t.classify(b"AGFsaWNlAHNlY3JldA==\r\n"),
            ClientLine::StraySasl
        );
        assert_eq!(t.classify(b"PASSsecret\r\n"), ClientLine::StraySasl);
        assert!(matches!(
            t.classify(b"USER bob\r\n"),
            ClientLine::Command(_)
        ));
        assert!(matches!(t.classify(b"XYZ 1\r\n"), ClientLine::Command(_)));
        // The same after the server refused the AUTH.
        let (evs, _) = drive(
            &[b"AUTH PLAIN\r\n", b"AGFsaWNlAHNlY3JldA==\r\n"],
            b"+OK hi\r\n-ERR [AUTH] no\r\n",
            2,
        );
        assert_eq!(evs.last(), Some(&Ev::Local(b"-ERR stray\r\n".to_vec())));
    }

    #[test]
    fn a_login_in_flight_holds_the_next_command() {
        let mut t = Tracker::new(512);
        let _ = t.on_server_bytes(b"+OK hi\r\n");
        t.forwarded(&Command::parse(b"USER a\r\n").unwrap());
        assert!(!t.client_must_wait(), "PASS may follow USER at once");
        t.forwarded(&Command::parse(b"PASS x\r\n").unwrap());
        assert!(t.client_must_wait());
        let _ = t.on_server_bytes(b"+OK\r\n");
        assert!(t.client_must_wait());
        let _ = t.on_server_bytes(b"+OK in\r\n");
        assert!(!t.client_must_wait());
        assert_eq!(t.state(), State::Transaction);
    }

    #[test]
    fn cut_body_holds_back_a_terminator_prefix() {
        let mut t = Tracker::new(512);
        let _ = t.on_server_bytes(b"+OK hi\r\n");
        t.forwarded(&Command::parse(b"RETR 1\r\n").unwrap());
        let mut buf = b"+OK\r\nabc\r\n.\r".to_vec();
        let Ok(Piece::Status { len, .. }) = t.on_server_bytes(&buf) else {
            panic!("status")
        };
        buf.drain(..len);
        assert_eq!(t.on_server_bytes(&buf), Ok(Piece::Body { len: 5 }));
        buf.drain(..5);
        assert_eq!(t.on_server_bytes(&buf), Ok(Piece::NeedMore));
        assert!(t.in_body());
        buf.extend_from_slice(b"x\r\n.\r\n");
        assert_eq!(t.on_server_bytes(&buf), Ok(Piece::BodyEnd { len: 8 }));
        // A bare-LF terminator is refused.
        t.forwarded(&Command::parse(b"RETR 2\r\n").unwrap());
        assert!(matches!(
            t.on_server_bytes(b"+OK\r\n"),
            Ok(Piece::Status { .. })
        ));
        assert_eq!(
            t.on_server_bytes(b"a\n.\n-ERR x\r\n"),
            Ok(Piece::Body { len: 2 })
        );
        assert_eq!(
            t.on_server_bytes(b".\n-ERR x\r\n"),
            Err(ProtocolError::BareLfTerminator)
        );
    }

    #[test]
    fn an_injected_answer_keeps_its_place_and_is_marked_internal() {
        // Never before login.
        let mut t = Tracker::new(512);
        let _ = t.on_server_bytes(b"+OK hi\r\n");
        assert!(!t.inject(&Command::parse(b"UIDL 1\r\n").unwrap()));
        let mut t = logged_in();
        // Nothing with a side effect.
        assert!(!t.inject(&Command::parse(b"DELE 1\r\n").unwrap()));
        t.forwarded(&Command::parse(b"RETR 1\r\n").unwrap());
        assert!(t.inject(&Command::parse(b"TOP 2 0\r\n").unwrap()));
        t.forwarded(&Command::parse(b"DELE 2\r\n").unwrap());
        assert!(t.internal_pending());
        let mut buf = b"+OK\r\nx\r\n.\r\n+OK\r\nMessage-ID: <m>\r\n.\r\n+OK\r\n".to_vec();
        let mut got = Vec::new();
        loop {
            let (client, internal) = (t.in_body(), t.in_internal_body());
            let Ok(p) = t.on_server_bytes(&buf) else {
                break;
            };
            let (len, what) = match p {
                Piece::NeedMore => break,
                Piece::Status { len, meta } => (len, format!("{:?} {}", meta.verb, meta.internal)),
                Piece::Body { len } | Piece::BodyEnd { len } => {
                    (len, format!("body client={client} internal={internal}"))
                }
            };
            got.push(what);
            buf.drain(..len);
        }
        assert_eq!(
            got,
            [
                "Some(Retr) false",
                "body client=true internal=false",
                "Some(Top) true",
                "body client=false internal=true",
                "Some(Dele) false"
            ]
        );
        assert!(!t.internal_pending() && t.idle());
    }

    proptest! {
        #[test]
        fn arbitrary_server_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut t = Tracker::new(64);
            t.forwarded(&Command::parse(b"RETR 1\r\n").unwrap());
            t.forwarded(&Command::parse(b"AUTH PLAIN\r\n").unwrap());
            let mut buf = &data[..];
            for _ in 0..400 {
                match t.on_server_bytes(buf) {
                    Ok(Piece::NeedMore) | Err(_) => break,
                    Ok(Piece::Status { len, .. } | Piece::Body { len } | Piece::BodyEnd { len }) => {
                        prop_assert!(len > 0 && len <= buf.len());
                        buf = &buf[len..];
                    }
                }
            }
        }

        #[test]
        fn random_chunking_same_events(seed_chunks in proptest::collection::vec(1usize..40, 1..8)) {
            let (want, _) = drive(CLIENT, SERVER, SERVER.len());
            for c in seed_chunks {
                let (got, _) = drive(CLIENT, SERVER, c);
                prop_assert_eq!(&got, &want);
            }
        }
    }

    #[test]
    fn stated_sizes() {
        let s = |verb, multiline, text: &[u8]| stated_size(verb, multiline, text);
        assert_eq!(s(Verb::Retr, true, b"1200 octets"), Some(1200));
        assert_eq!(s(Verb::Retr, true, b"1200"), Some(1200));
        assert_eq!(s(Verb::Top, true, b"77 octets follow."), Some(77));
        assert_eq!(s(Verb::Retr, true, b"message follows"), None);
        assert_eq!(s(Verb::Top, true, b""), None);
        assert_eq!(s(Verb::Retr, true, b"-12 octets"), None);
        assert_eq!(s(Verb::Retr, true, b"99999999999999999999999 octets"), None);
        assert_eq!(s(Verb::List, false, b"3 1200"), Some(1200));
        assert_eq!(s(Verb::List, false, b"3"), None);
        // A multi-line LIST states totals, not a message's size.
        assert_eq!(s(Verb::List, true, b"2 320"), None);
        assert_eq!(s(Verb::List, true, b"2 messages (320 octets)"), None);
        assert_eq!(s(Verb::Stat, false, b"2 320"), None);
    }
}
