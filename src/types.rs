//! Value types shared by the protocol core, the config, the network drivers and the audit
//! trail: what a session decides ([`CloseReason`]), what a TLS handshake negotiated
//! ([`TlsInfo`]), an IP network of the config ([`Network`]), the `audit.message_ids` mode
//! ([`MessageIds`]) and who a login is for ([`UserName`], [`Identity`], with the one folding
//! rule for user names).
//!
//! A leaf: plain data with serde forms, no I/O, and nothing of the crate but `cidr`. It lets
//! `pop3`, `proxy`, `config` and `net` name these values without depending on `audit` (which
//! owns a writer thread and files).

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::cidr::Cidr;

/// What was negotiated on a TLS connection (client or upstream side), for logs and audit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsInfo {
    /// Protocol version, e.g. `TLSv1_3`.
    pub version: String,
    /// Cipher suite, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
    /// Server name the client asked for (client side only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
}

/// Why a session ended: what the session decides and the audit trail records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// The client sent QUIT and got the answer.
    Quit,
    /// The client closed without QUIT.
    ClientEof,
    /// The server closed.
    UpstreamEof,
    /// Inactivity timeout.
    IdleTimeout,
    /// No login within `limits.login_timeout`.
    LoginTimeout,
    /// The upstream sent no greeting within `limits.greeting_timeout`.
    GreetingTimeout,
    /// A rule dropped the connection.
    RuleDrop,
    /// popgate shut down.
    Shutdown,
    /// An administrator ended it (`popgate kick`); `kicked_by` says who.
    Kick,
    /// An error on either side.
    Error,
}

impl CloseReason {
    /// Every reason: the serialised names must match [`CloseReason::as_str`].
    #[cfg(test)]
    pub(crate) const ALL: [CloseReason; 10] = [
        CloseReason::Quit,
        CloseReason::ClientEof,
        CloseReason::UpstreamEof,
        CloseReason::IdleTimeout,
        CloseReason::LoginTimeout,
        CloseReason::GreetingTimeout,
        CloseReason::RuleDrop,
        CloseReason::Shutdown,
        CloseReason::Kick,
        CloseReason::Error,
    ];

    /// The snake_case name (`"client_eof"`, ...).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CloseReason::Quit => "quit",
            CloseReason::ClientEof => "client_eof",
            CloseReason::UpstreamEof => "upstream_eof",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::LoginTimeout => "login_timeout",
            CloseReason::GreetingTimeout => "greeting_timeout",
            CloseReason::RuleDrop => "rule_drop",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Kick => "kick",
            CloseReason::Error => "error",
        }
    }
}

/// `audit.message_ids`: how popgate learns the Message-ID of a deleted message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageIds {
    /// Only from a RETR/TOP of the message the client made in the same session.
    #[default]
    Seen,
    /// Also by asking the server itself (`TOP n 0`) before a `DELE` of a message the session
    /// has not retrieved.
    Always,
}

/// An IP network in CIDR notation (`192.0.2.0/24`, `2001:db8::/32`; a bare address is a
/// single host). Host bits below the prefix are cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network(Cidr);

/// A string that is not CIDR notation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP network (expected e.g. 192.0.2.0/24 or 2001:db8::/32)")]
pub struct NetworkError(String);

impl Network {
    /// Whether `ip` lies in this network. IPv4-mapped IPv6 clients (`::ffff:192.0.2.1`) match
    /// IPv4 networks.
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(ip)
    }
}

impl FromStr for Network {
    type Err = NetworkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Cidr::parse_masked(s)
            .map(Network)
            .map_err(|_| NetworkError(s.to_owned()))
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Network {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_serialise_as_their_names() {
        for r in CloseReason::ALL {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
        }
    }

    #[test]
    fn networks() {
        let n: Network = "192.0.2.77/24".parse().unwrap();
        assert_eq!(n.to_string(), "192.0.2.0/24");
        assert!(n.contains("192.0.2.1".parse().unwrap()));
        assert!(!n.contains("192.0.3.1".parse().unwrap()));
        assert!(!n.contains("::1".parse().unwrap()));
        let all: Network = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let all6: Network = "::/0".parse().unwrap();
        assert!(all6.contains("::1".parse().unwrap()));
        for bad in [
            "",
            "x",
            "1.2.3.4/",
            "1.2.3.4/33",
            "::/129",
            "1.2.3.4/+8",
            "1.2.3/8",
        ] {
            assert!(bad.parse::<Network>().is_err(), "{bad}");
        }
    }

    #[test]
    fn folding_lowers_ascii_letters_only_and_keeps_the_typed_name_when_it_changes() {
        assert!(matches!(fold_user_name("alice"), Cow::Borrowed("alice")));
        assert_eq!(fold_user_name("ALICE@Example.ORG"), "alice@example.org");
        // Non-ASCII letters never fold (Dovecot's %L): É stays, é is another name.
        assert_eq!(fold_user_name("\u{c9}VE"), "\u{c9}ve");
        for (a, b) in [
            ("Alice", "aLICE"),
            ("\u{c9}ve", "\u{c9}VE"),
            ("\u{c9}", "\u{e9}"),
            ("a", "b"),
        ] {
            assert_eq!(
                same_user_folded(a, b),
                fold_user_name(a) == fold_user_name(b),
                "{a} {b}"
            );
        }
        let id = Identity::new("ALICE".into(), true);
        assert_eq!(id.user().as_str(), "alice");
        assert_eq!(id.as_typed().map(UserName::as_str), Some("ALICE"));
        assert_eq!(id.typed().as_str(), "ALICE");
        // Folding that changes nothing, or no folding: no typed name beside.
        for (typed, fold) in [("alice", true), ("ALICE", false), ("\u{c9}", true)] {
            let id = Identity::new(typed.into(), fold);
            assert_eq!((id.user().as_str(), id.as_typed()), (typed, None));
            assert_eq!(id.typed().as_str(), typed);
        }
    }

    #[test]
    fn a_user_name_is_a_plain_json_string() {
        let n = UserName::from("\u{c9}ve \"x\"");
        let json = serde_json::to_string(&n).unwrap();
        assert_eq!(json, "\"\u{c9}ve \\\"x\\\"\"");
        assert_eq!(serde_json::from_str::<UserName>(&json).unwrap(), n);
        assert_eq!(n.to_string(), n.as_str());
    }

    #[test]
    fn byte_sizes_and_their_errors() {
        let p = |s| ByteSize::parse(s).unwrap();
        assert_eq!(p("10MB"), ByteSize(10 << 20));
        assert_eq!(p(" 512k "), ByteSize(512 << 10));
        assert_eq!(p("1 GiB"), ByteSize(1 << 30));
        assert_eq!(p("1048576"), ByteSize(1 << 20));
        for (bad, why) in [
            ("", "a whole number of octets is expected"),
            ("MB", "a whole number of octets is expected"),
            ("1.5M", "unknown unit `.5M`"),
            ("99999999999999999999", "the number is too large"),
            ("99999999999G", "the number is too large"),
        ] {
            let e = ByteSize::parse(bad).unwrap_err();
            assert!(
                e.starts_with(&format!("`{bad}`: ")) && e.contains(why),
                "{bad:?}: {e}"
            );
        }
        // Inside a rule's comparison the whole text is named.
        let e = ByteSize::parse_within(" x", "> x").unwrap_err();
        assert!(e.starts_with("`> x`: a whole number"), "{e}");
    }
}

/// A number of octets in the config: `"10MB"`, `"512k"`, `"1048576"`. Units are binary and
/// case-insensitive, as in mail server settings and the rules' `size` matcher: `k` = 1024,
/// `M` = 1024², `G` = 1024³, each optionally followed by `B` or `iB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parse `"10MB"` and friends; the error says what is expected.
    pub(crate) fn parse(text: &str) -> Result<ByteSize, String> {
        ByteSize::parse_within(text, text)
    }

    /// Parse the size `part` of the larger `text` (the rules' `"> 10MB"`), naming `text` in
    /// the error: one grammar and one set of error texts for config sizes and rule sizes.
    pub(crate) fn parse_within(part: &str, text: &str) -> Result<ByteSize, String> {
        let t = part.trim();
        let digits = t.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "`{text}`: a whole number of octets is expected, e.g. \"10MB\" or \"512k\""
            ));
        }
        let n: u64 = t[..digits]
            .parse()
            .map_err(|_| format!("`{text}`: the number is too large"))?;
        let unit = t[digits..].trim();
        let factor: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            _ => {
                return Err(format!(
                    "`{text}`: unknown unit `{unit}` (k, M or G, binary: 1k = 1024 octets)"
                ));
            }
        };
        n.checked_mul(factor)
            .map(ByteSize)
            .ok_or_else(|| format!("`{text}`: the number is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, factor) in [("GB", 1u64 << 30), ("MB", 1 << 20), ("kB", 1 << 10)] {
            if n >= factor && n.is_multiple_of(factor) {
                return write!(f, "{}{unit}", n / factor);
            }
        }
        write!(f, "{n}")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"10MB\" or a number of octets")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// What one content scanner (`[[scanner]]`) said about one retrieved message.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanReport {
    /// The scanner's `name` in the config.
    pub scanner: std::sync::Arc<str>,
    /// Its verdict.
    pub verdict: ScanVerdict,
    /// The virus name (clamd), the rspamd action (`"add header"`, `"reject"`, ...), or what
    /// went wrong (`Error`); `None` for a plain clean verdict.
    pub detail: Option<String>,
    /// rspamd's score and the score its `reject`/`add header` action needs: `(score,
    /// required)`; `None` for clamd.
    pub score: Option<(f64, f64)>,
    /// How long the scan took (queueing for a scan slot included).
    pub duration: std::time::Duration,
}

/// A scanner's verdict on one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanVerdict {
    /// Nothing found (rspamd: action `no action` or `greylist`).
    Clean,
    /// Malware found (clamd `FOUND`).
    Infected,
    /// rspamd says spam (action `add header`, `rewrite subject`, `soft reject` or `reject`).
    Spam,
    /// The message was larger than the scanner's `max_size`: not sent to it.
    TooLarge,
    /// The scanner could not be reached, timed out or answered nonsense.
    Error,
}

impl ScanVerdict {
    /// The lower-case name used in the audit trail, headers and metrics.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ScanVerdict::Clean => "clean",
            ScanVerdict::Infected => "infected",
            ScanVerdict::Spam => "spam",
            ScanVerdict::TooLarge => "too_large",
            ScanVerdict::Error => "error",
        }
    }
}

/// A user name as rules, logs and the audit trail see it: shared (a clone is a reference
/// count, never a copy of the text), compared byte for byte, serialised as a plain string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserName(Arc<str>);

impl UserName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for UserName {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for UserName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for UserName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for UserName {
    fn from(name: &str) -> UserName {
        UserName(Arc::from(name))
    }
}

impl From<String> for UserName {
    fn from(name: String) -> UserName {
        UserName(Arc::from(name))
    }
}

impl Serialize for UserName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for UserName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(UserName::from)
    }
}

/// `name` as a server that folds user names sees it (`upstream.user_names = "fold"`, Dovecot's
/// default `%Lu`): ASCII `A`-`Z` become `a`-`z` and every other character is kept (Dovecot's
/// `%L` does not fold non-ASCII letters either). Borrowed when nothing changes. popgate's one
/// folding rule: logins ([`Identity::new`]), the routing map and route rules use it.
pub(crate) fn fold_user_name(name: &str) -> Cow<'_, str> {
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

/// Whether `a` and `b` name the same user at a server that folds names: equal once both are
/// folded by [`fold_user_name`] (compared without folding copies).
pub(crate) fn same_user_folded(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Who a login is for: the name the server logs in ([`Identity::user`]) and, when the server
/// folds names and folding changed it, the name as the client typed it
/// ([`Identity::as_typed`]: `ALICE` for `alice`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    user: UserName,
    as_typed: Option<UserName>,
}

impl Identity {
    /// The identity of a login as `typed` at a server that folds user names (`fold`, see
    /// [`fold_user_name`]) or compares them byte for byte.
    pub(crate) fn new(typed: UserName, fold: bool) -> Identity {
        match fold.then(|| fold_user_name(&typed)) {
            Some(Cow::Owned(folded)) => Identity {
                user: folded.into(),
                as_typed: Some(typed),
            },
            _ => Identity {
                user: typed,
                as_typed: None,
            },
        }
    }

    /// The name the server logs in (folded when it folds): what rules, logs and the audit
    /// trail's `user` see.
    pub fn user(&self) -> &UserName {
        &self.user
    }

    /// The name as the client typed it, when folding changed it (the audit trail's
    /// `user_as_typed`).
    pub fn as_typed(&self) -> Option<&UserName> {
        self.as_typed.as_ref()
    }

    /// The name as the client typed it, folded or not.
    pub(crate) fn typed(&self) -> &UserName {
        self.as_typed.as_ref().unwrap_or(&self.user)
    }
}
