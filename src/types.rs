//! Value types shared by the protocol core, the config, the network drivers and the audit
//! trail: what a session decides ([`CloseReason`]), what a TLS handshake negotiated
//! ([`TlsInfo`]), an IP network of the config ([`Network`]) and the `audit.message_ids` mode
//! ([`MessageIds`]).
//!
//! A leaf: plain data with serde forms, no I/O, and nothing of the crate but `cidr`. It lets
//! `pop3`, `proxy`, `config` and `net` name these values without depending on `audit` (which
//! owns a writer thread and files).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

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
}
