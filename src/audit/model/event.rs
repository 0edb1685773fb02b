//! Audit event types: one JSON object per line, schema version [`SCHEMA_VERSION`].
//!
//! Every event carries `schema`, `ts` (RFC 3339 UTC, milliseconds), `session`, `event` (the
//! name) and, when a rule tagged it, `tags`; the other fields depend on the event. Optional
//! fields are omitted when unknown. `src/audit/SCHEMA.md` has an example of each event;
//! a unit test keeps those examples exact.
//!
//! The same types deserialize, for the reader. Unknown fields are ignored and unknown event
//! names become [`AuditEventKind::Unknown`], so an older reader survives a newer writer.
//!
//! Nothing secret is representable here: there is no field for a password, an APOP digest or
//! a SASL payload.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::pop3::command::Verb;
use crate::pop3::response::Status;
use crate::pop3::tracker::LoginMethod;
use crate::types::{CloseReason, Identity, ScanVerdict, TlsInfo, UserName};

/// The `schema` value written in every event. Raised only for incompatible changes; new
/// optional fields and new events do not change it.
pub(crate) const SCHEMA_VERSION: u32 = 1;

/// Every event name of this schema version, in the order of a session's life.
pub(crate) const EVENT_NAMES: [&str; 10] = [
    "session_open",
    "tls",
    "login",
    "denied",
    "retrieve",
    "scan",
    "delete_marked",
    "reset",
    "update",
    "session_close",
];

/// One audit record: the common envelope and the event-specific fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Schema version (`SCHEMA_VERSION` when written by this popgate).
    pub schema: u32,
    /// When it happened (serialized as RFC 3339 UTC with milliseconds).
    #[serde(with = "rfc3339_millis")]
    pub ts: SystemTime,
    /// The popgate that wrote it (`audit.instance`, by default the host name); set by the
    /// sink when the event is written. Absent in files of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Session id: unique across restarts of one instance, increasing with time.
    pub session: u64,
    /// `event` name and the event's own fields.
    #[serde(flatten)]
    pub kind: AuditEventKind,
    /// Tags of the rules that touched this event (omitted when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

impl AuditEvent {
    /// An event of `session` happening now, without tags.
    pub fn new(session: u64, kind: impl Into<AuditEventKind>) -> AuditEvent {
        AuditEvent::at(SystemTime::now(), session, kind)
    }

    /// An event at a given time (truncated to milliseconds, as it will be written).
    pub fn at(ts: SystemTime, session: u64, kind: impl Into<AuditEventKind>) -> AuditEvent {
        AuditEvent {
            schema: SCHEMA_VERSION,
            ts: truncate_millis(ts),
            instance: None,
            session,
            kind: kind.into(),
            tags: Vec::new(),
        }
    }

    /// The same event with these rule tags.
    pub fn with_tags(mut self, tags: impl IntoIterator<Item = impl Into<String>>) -> AuditEvent {
        self.tags = tags.into_iter().map(Into::into).collect();
        self
    }

    /// The event name, e.g. `"retrieve"`.
    #[cfg(test)] // only the SCHEMA.md round-trip test needs it
    pub(crate) fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// The user the event is about, if it names one.
    pub fn user(&self) -> Option<&str> {
        self.kind.user()
    }

    /// One JSON line (without the newline).
    #[cfg(test)] // the sink serializes itself; tests compare lines
    pub(crate) fn to_json(&self) -> String {
        // Serializing these types cannot fail: every map key is a string.
        serde_json::to_string(self).unwrap_or_default()
    }
}

fn truncate_millis(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => UNIX_EPOCH + Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(0)),
        Err(_) => UNIX_EPOCH,
    }
}

/// The event name (`event` field) and its fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEventKind {
    /// A client connected.
    SessionOpen(SessionOpen),
    /// A TLS handshake completed after the session opened (STLS, either side).
    Tls(TlsEvent),
    /// A login attempt got its final answer.
    Login(LoginEvent),
    /// A rule refused a command.
    Denied(Denied),
    /// A RETR or TOP response was relayed (or cut short).
    Retrieve(Retrieve),
    /// A content scanner judged a retrieved message (one event per scanner).
    Scan(ScanEvent),
    /// The server accepted a DELE.
    DeleteMarked(DeleteMarked),
    /// The server accepted an RSET: the marks are gone.
    Reset(Reset),
    /// The answer to QUIT in the TRANSACTION state: deletions committed or refused.
    Update(Update),
    /// The session ended.
    SessionClose(SessionClose),
    /// Reader only: an event name this version does not know.
    #[serde(other)]
    Unknown,
}

impl AuditEventKind {
    /// The `event` name (`"unknown"` for [`AuditEventKind::Unknown`]).
    pub(crate) fn name(&self) -> &'static str {
        match self {
            AuditEventKind::SessionOpen(_) => "session_open",
            AuditEventKind::Tls(_) => "tls",
            AuditEventKind::Login(_) => "login",
            AuditEventKind::Denied(_) => "denied",
            AuditEventKind::Retrieve(_) => "retrieve",
            AuditEventKind::Scan(_) => "scan",
            AuditEventKind::DeleteMarked(_) => "delete_marked",
            AuditEventKind::Reset(_) => "reset",
            AuditEventKind::Update(_) => "update",
            AuditEventKind::SessionClose(_) => "session_close",
            AuditEventKind::Unknown => "unknown",
        }
    }

    /// The user the event is about, if it names one.
    pub(crate) fn user(&self) -> Option<&str> {
        match self {
            AuditEventKind::Login(e) => e.user.as_deref(),
            AuditEventKind::Denied(e) => e.user.as_deref(),
            AuditEventKind::Retrieve(e) => e.user.as_deref(),
            AuditEventKind::Scan(e) => e.user.as_deref(),
            AuditEventKind::DeleteMarked(e) => e.user.as_deref(),
            AuditEventKind::Reset(e) => e.user.as_deref(),
            AuditEventKind::Update(e) => e.user.as_deref(),
            AuditEventKind::SessionClose(e) => e.user.as_deref(),
            AuditEventKind::SessionOpen(_) | AuditEventKind::Tls(_) | AuditEventKind::Unknown => {
                None
            }
        }
    }
}

macro_rules! into_kind {
    ($($t:ident => $v:ident),* $(,)?) => {
        $(impl From<$t> for AuditEventKind {
            fn from(e: $t) -> AuditEventKind {
                AuditEventKind::$v(e)
            }
        })*
    };
}

into_kind!(
    SessionOpen => SessionOpen,
    TlsEvent => Tls,
    LoginEvent => Login,
    Denied => Denied,
    Retrieve => Retrieve,
    ScanEvent => Scan,
    DeleteMarked => DeleteMarked,
    Reset => Reset,
    Update => Update,
    SessionClose => SessionClose,
);

/// `session_open`: a client connected to a listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionOpen {
    /// Listener name.
    pub listener: String,
    /// Client address (`ip:port`).
    pub client: SocketAddr,
    /// Local address the client connected to (behind a balancer: the balancer's address the
    /// client connected to, from the PROXY header).
    pub local: SocketAddr,
    /// The balancer that passed the connection on with a PROXY header (`proxy_protocol`
    /// listeners); `client` is then the address from that header. Omitted otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<SocketAddr>,
    /// With `upstream.address = "original-destination"`: the address the client connected to
    /// before a `REDIRECT` sent the connection to popgate, and where popgate connects for it.
    /// Omitted otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_dst: Option<SocketAddr>,
    /// TLS with the client, when the listener is implicit TLS (omitted otherwise; a later
    /// STLS upgrade is a `tls` event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_tls: Option<TlsInfo>,
}

/// Which connection a `tls` event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsSide {
    /// Client ↔ popgate.
    Client,
    /// popgate ↔ POP3 server.
    Upstream,
}

impl TlsSide {
    /// `"client"` or `"upstream"`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TlsSide::Client => "client",
            TlsSide::Upstream => "upstream",
        }
    }
}

/// `tls`: a TLS handshake completed on one side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsEvent {
    /// Which connection.
    pub side: TlsSide,
    /// Protocol version.
    pub version: String,
    /// Cipher suite.
    pub cipher: String,
    /// Server name indication (client side only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
}

impl TlsEvent {
    /// A `tls` event for `side` from negotiated parameters.
    pub fn new(side: TlsSide, tls: TlsInfo) -> TlsEvent {
        TlsEvent {
            side,
            version: tls.version,
            cipher: tls.cipher,
            sni: tls.sni,
        }
    }
}

/// Success or failure of a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoginEventOutcome {
    /// The server said `+OK`.
    Success,
    /// The server said `-ERR` (or the exchange was cancelled).
    Failure,
    /// The server said `+OK`, but a rule (`rule`) closed the session before the client got
    /// the answer: the client is not logged in.
    Dropped,
}

impl LoginEventOutcome {
    /// `Success` for `+OK`, `Failure` otherwise.
    pub(crate) fn from_status(status: Status) -> LoginEventOutcome {
        match status {
            Status::Ok => LoginEventOutcome::Success,
            Status::Err | Status::Continue => LoginEventOutcome::Failure,
        }
    }

    /// `"success"` or `"failure"`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LoginEventOutcome::Success => "success",
            LoginEventOutcome::Failure => "failure",
            LoginEventOutcome::Dropped => "dropped",
        }
    }
}

/// `login`: the final answer to USER/PASS, APOP or AUTH.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginEvent {
    /// The user name, when known (never a password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserName>,
    /// The name as the client typed it, when it differs from `user` (`ALICE`: the server
    /// folds names to lower case, `upstream.user_names = "fold"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_as_typed: Option<UserName>,
    /// `USER`, `APOP` or `AUTH <MECHANISM>`.
    pub method: String,
    /// Whether the server accepted it.
    pub outcome: LoginEventOutcome,
    /// The response code of the answer (`AUTH`, `SYS/TEMP`, `IN-USE`, ...), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The rule that closed the session on this answer (`drop` on the `login` or `response`
    /// event), if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Routing mode: the name of the upstream the login was routed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
}

impl LoginEvent {
    /// A `login` event from the tracker's view of the attempt (who, how) and the deciding
    /// status line.
    pub(crate) fn new(
        identity: Option<&Identity>,
        method: &LoginMethod,
        status: Status,
        code: Option<&[u8]>,
    ) -> LoginEvent {
        LoginEvent {
            user: identity.map(|i| i.user().clone()),
            user_as_typed: identity.and_then(|i| i.as_typed().cloned()),
            method: method.label(),
            outcome: LoginEventOutcome::from_status(status),
            code: code.map(|c| String::from_utf8_lossy(c).into_owned()),
            rule: None,
            upstream: None,
        }
    }
}

/// `denied`: a rule refused a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denied {
    /// The rule's name.
    pub rule: String,
    /// The command's verb (`DELE`, `RETR`, ...; `UNKNOWN` for others).
    pub verb: String,
    /// The user, when logged in or named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserName>,
}

impl Denied {
    /// A `denied` event.
    pub(crate) fn new(rule: &str, verb: Verb, user: Option<&str>) -> Denied {
        Denied {
            rule: rule.to_owned(),
            verb: verb.as_str().to_owned(),
            user: user.map(UserName::from),
        }
    }
}

/// The command behind a `retrieve` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum RetrieveVerb {
    /// `RETR n`
    Retr,
    /// `TOP n lines`
    Top,
}

impl RetrieveVerb {
    /// `RETR` or `TOP` from a verb; `None` for every other verb.
    pub(crate) fn from_verb(verb: Verb) -> Option<RetrieveVerb> {
        match verb {
            Verb::Retr => Some(RetrieveVerb::Retr),
            Verb::Top => Some(RetrieveVerb::Top),
            _ => None,
        }
    }

    /// `"RETR"` or `"TOP"`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RetrieveVerb::Retr => "RETR",
            RetrieveVerb::Top => "TOP",
        }
    }
}

/// `retrieve`: a message (or its top) went to the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retrieve {
    /// The logged-in user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserName>,
    /// `RETR` or `TOP`.
    pub verb: RetrieveVerb,
    /// Message number.
    pub msg: u64,
    /// For TOP: the number of body lines asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<u64>,
    /// Octets of the multi-line body relayed to the client (wire bytes, terminator included).
    pub octets: u64,
    /// The message's unique id: seen in the session, or asked for by popgate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uidl: Option<String>,
    /// The server has no UIDL command (it refused popgate's `UIDL`): no `uidl` can be known.
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_uidl: bool,
    /// Whether the body reached its terminator (false: a side closed mid-body).
    pub complete: bool,
    /// The configured headers found in the header block, in configured order.
    #[serde(default)]
    pub headers: Headers,
}

/// `scan`: one content scanner's verdict on a retrieved message a `scan` rule selected, and
/// what the client got for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanEvent {
    /// The logged-in user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserName>,
    /// `RETR` or `TOP`.
    pub verb: RetrieveVerb,
    /// Message number.
    pub msg: u64,
    /// The message's unique id, as the `retrieve` record has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uidl: Option<String>,
    /// The server has no UIDL command.
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_uidl: bool,
    /// Its Message-ID header, as the `retrieve` record has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// The scanner's `name` (`[[scanner]]`).
    pub scanner: String,
    /// Its verdict.
    pub verdict: ScanVerdict,
    /// What it found: the virus name (clamd), the rspamd action, or what went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// rspamd's score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    /// The score rspamd's spam action needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required: Option<f64>,
    /// What the client got (the same on every scanner's event of one retrieval).
    pub action: ScanEventAction,
    /// How long the scan took, queueing included (0 when the message was not sent to it).
    pub duration_ms: u64,
}

/// What the client got for a scanned message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanEventAction {
    /// The message as the server sent it (an `X-Popgate-Scan:` line added with `header`).
    Delivered,
    /// The message with headers saying what was found (spam, or infected with `tag`).
    Tagged,
    /// A notice in its place; the original stays on the server.
    Replaced,
    /// `-ERR`.
    Denied,
    /// `-ERR [SYS/TEMP]`: the client retries later.
    Tempfailed,
    /// The message without a verdict (too large, or a scanner error with `on_error = "pass"`),
    /// tagged as such.
    Unscanned,
}

impl ScanEventAction {
    /// The name used in events.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ScanEventAction::Delivered => "delivered",
            ScanEventAction::Tagged => "tagged",
            ScanEventAction::Replaced => "replaced",
            ScanEventAction::Denied => "denied",
            ScanEventAction::Tempfailed => "tempfailed",
            ScanEventAction::Unscanned => "unscanned",
        }
    }
}

/// `delete_marked`: the server accepted `DELE n`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteMarked {
    /// The logged-in user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserName>,
    /// Message number.
    pub msg: u64,
    /// The message's unique id: seen in the session, or asked for by popgate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uidl: Option<String>,
    /// Its Message-ID header: retrieved in the session, or (`audit.message_ids = "always"`)
    /// asked for by popgate with `TOP n 0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// The server has no UIDL command (it refused popgate's `UIDL`): no `uidl` can be known.
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_uidl: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `reset`: the server accepted RSET; no message is marked any more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reset {
    /// The logged-in user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserName>,
}

/// A message named in an `update` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    /// Message number.
    pub msg: u64,
    /// Its unique id, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uidl: Option<String>,
    /// Its Message-ID header, if known (see [`DeleteMarked::message_id`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// The server has no UIDL command.
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_uidl: bool,
}

/// The server's answer to QUIT in the TRANSACTION state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateOutcome {
    /// `+OK`: the marked messages are deleted.
    Confirmed,
    /// `-ERR`: the server could not remove them (RFC 1939: some may be gone).
    Refused,
}

impl UpdateOutcome {
    /// `Confirmed` for `+OK`, `Refused` otherwise.
    pub(crate) fn from_status(status: Status) -> UpdateOutcome {
        match status {
            Status::Ok => UpdateOutcome::Confirmed,
            Status::Err | Status::Continue => UpdateOutcome::Refused,
        }
    }

    /// `"confirmed"` or `"refused"`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            UpdateOutcome::Confirmed => "confirmed",
            UpdateOutcome::Refused => "refused",
        }
    }
}

/// `update`: QUIT in TRANSACTION got its answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    /// The logged-in user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserName>,
    /// The messages marked for deletion at QUIT (possibly none).
    pub deleted: Vec<Deleted>,
    /// Whether the server confirmed.
    pub outcome: UpdateOutcome,
}

/// `session_close`: the session ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionClose {
    /// The logged-in user, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserName>,
    /// How it ended.
    pub reason: CloseReason,
    /// Octets read from the client.
    pub bytes_from_client: u64,
    /// Octets written to the client.
    pub bytes_to_client: u64,
    /// From accept to close.
    pub duration_ms: u64,
    /// With reason `rule_drop`: the rule that closed the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// With reason `kick`: who asked, as the control socket's peer credentials
    /// (`uid 0 pid 4242`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kicked_by: Option<String>,
}

/// Header fields of a retrieved message, in configured order: a JSON object `{name: value}`.
///
/// Names are spelt as configured; values are unfolded, trimmed and lossily decoded (MIME
/// encoded-words are left as sent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// No header was found.
    #[cfg(test)] // header extraction tests
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `(name, value)` pairs in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }
}

impl Serialize for Headers {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (n, v) in &self.0 {
            m.serialize_entry(n, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Headers;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of header names to values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Headers, A::Error> {
                let mut v = Vec::new();
                while let Some((n, val)) = map.next_entry::<String, String>()? {
                    v.push((n, val));
                }
                Ok(Headers(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// `ts` as RFC 3339 UTC with milliseconds (`2026-03-01T12:00:00.123Z`).
mod rfc3339_millis {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        // humantime panics before the epoch; no audit event happens then.
        let t = (*t).max(UNIX_EPOCH);
        s.collect_str(&humantime::format_rfc3339_millis(t))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts() -> SystemTime {
        humantime::parse_rfc3339("2026-03-01T12:00:00.123Z").unwrap()
    }

    #[test]
    fn envelope_and_field_order() {
        let ev = AuditEvent::at(
            ts(),
            7,
            Reset {
                user: Some("bob".into()),
            },
        )
        .with_tags(["watch"]);
        assert_eq!(
            ev.to_json(),
            r#"{"schema":1,"ts":"2026-03-01T12:00:00.123Z","session":7,"event":"reset","user":"bob","tags":["watch"]}"#
        );
        let mut named = ev.clone();
        named.instance = Some("mx1".into());
        assert_eq!(
            named.to_json(),
            r#"{"schema":1,"ts":"2026-03-01T12:00:00.123Z","instance":"mx1","session":7,"event":"reset","user":"bob","tags":["watch"]}"#
        );
        let untagged = AuditEvent::at(ts(), 7, Reset { user: None });
        assert_eq!(
            untagged.to_json(),
            r#"{"schema":1,"ts":"2026-03-01T12:00:00.123Z","session":7,"event":"reset"}"#
        );
    }

    #[test]
    fn ts_is_truncated_to_millis() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        let ev = AuditEvent::at(t, 1, Reset { user: None });
        assert!(ev.to_json().contains(r#""ts":"2023-11-14T22:13:20.123Z""#));
        let back: AuditEvent = serde_json::from_str(&ev.to_json()).unwrap();
        assert_eq!(back, ev);
        // Before the epoch: clamped, never a panic.
        let mut early = ev.clone();
        early.ts = UNIX_EPOCH - Duration::from_secs(5);
        assert!(early.to_json().contains("1970-01-01T00:00:00.000Z"));
    }

    #[test]
    fn unknown_events_and_fields_are_tolerated() {
        let line =
            r#"{"schema":2,"ts":"2026-03-01T12:00:00.123Z","session":3,"event":"quota","x":1}"#;
        let ev: AuditEvent = serde_json::from_str(line).unwrap();
        assert_eq!(ev.kind, AuditEventKind::Unknown);
        assert_eq!(ev.schema, 2);
        let line = r#"{"schema":1,"ts":"2026-03-01T12:00:00.123Z","session":3,"event":"reset","user":"a","new_field":[1]}"#;
        let ev: AuditEvent = serde_json::from_str(line).unwrap();
        assert_eq!(ev.user(), Some("a"));
    }

    #[test]
    fn constructors() {
        let l = LoginEvent::new(
            Some(&Identity::new("bob".into(), true)),
            &LoginMethod::Sasl("PLAIN".into()),
            Status::Err,
            Some(b"AUTH"),
        );
        assert_eq!((l.user.as_deref(), l.user_as_typed), (Some("bob"), None));
        assert_eq!(l.method, "AUTH PLAIN");
        assert_eq!(l.outcome, LoginEventOutcome::Failure);
        assert_eq!(l.code.as_deref(), Some("AUTH"));
        // A folded name keeps the typed one beside it.
        let l = LoginEvent::new(
            Some(&Identity::new("EVE".into(), true)),
            &LoginMethod::UserPass,
            Status::Ok,
            None,
        );
        let json = serde_json::to_string(&l).unwrap();
        assert!(
            json.starts_with(r#"{"user":"eve","user_as_typed":"EVE","method":"USER""#),
            "{json}"
        );
        let d = Denied::new("no-delete", Verb::Dele, None);
        assert_eq!(d.verb, "DELE");
        assert_eq!(RetrieveVerb::from_verb(Verb::Top), Some(RetrieveVerb::Top));
        assert_eq!(RetrieveVerb::from_verb(Verb::Dele), None);
        assert_eq!(
            UpdateOutcome::from_status(Status::Ok),
            UpdateOutcome::Confirmed
        );
        for (i, name) in EVENT_NAMES.iter().enumerate() {
            assert!(EVENT_NAMES[..i].iter().all(|n| n != name));
        }
    }

    /// Every example in SCHEMA.md parses into these types and serializes back byte for byte,
    /// so the documentation cannot drift from the code; and every event has an example.
    #[test]
    fn schema_examples_are_exact() {
        let doc = include_str!("../SCHEMA.md");
        let mut seen = Vec::new();
        let mut in_json = false;
        for line in doc.lines() {
            if line.starts_with("```json") {
                in_json = true;
                continue;
            }
            if line.starts_with("```") {
                in_json = false;
                continue;
            }
            if !in_json || line.trim().is_empty() {
                continue;
            }
            let ev: AuditEvent = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("SCHEMA.md example does not parse: {e}\n{line}"));
            assert_ne!(ev.kind, AuditEventKind::Unknown, "{line}");
            assert_eq!(ev.to_json(), line, "SCHEMA.md example is not canonical");
            seen.push(ev.name());
        }
        for name in EVENT_NAMES {
            assert!(seen.contains(&name), "SCHEMA.md has no example of {name}");
        }
    }
}
