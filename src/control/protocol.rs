//! The control protocol, version 1: one JSON object per line each way (docs/control.md).
//!
//! A request is `{"v":1,"cmd":"sessions","filter":{"user":"alice"}}`; every answer is one
//! [`Response`] line, `{"v":1,"ok":true,...}` or `{"v":1,"ok":false,"error":"..."}`. A `tap`
//! answers once (`"tap_attached"`), then streams `{"v":1,"ok":true,"tap":{...}}` lines until the
//! client closes. Request lines are bounded ([`MAX_REQUEST`]); a longer or unparsable line gets
//! an error line, and the connection stays usable (an overlong line is skipped to its end).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::tap::TapLine;

/// The protocol version this popgate speaks.
pub const VERSION: u32 = 1;

/// The longest request line accepted, newline included.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Which sessions a command is about; every criterion given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSelector {
    /// The session id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<u64>,
    /// The user, as the audit trail names it (exact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The client address or network (`192.0.2.7`, `10.0.0.0/8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// The listener name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener: Option<String>,
}

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Command {
    /// One row per live session matching the filter.
    Sessions {
        /// Which sessions.
        #[serde(default)]
        filter: SessionSelector,
    },
    /// Version, uptime, config digest, last reload, session counts.
    Status,
    /// End the matching sessions as a shutdown does (a filter is required).
    Kick {
        /// Which sessions.
        filter: SessionSelector,
    },
    /// Stream the matching sessions' conversation, present and future ones.
    Tap {
        /// Which sessions.
        #[serde(default)]
        filter: SessionSelector,
        /// Show message bodies instead of a size line.
        #[serde(default)]
        bodies: bool,
    },
    /// Reload the config file, as SIGHUP does, and answer with the outcome.
    Reload,
}

/// A request line: the version and the command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Protocol version; must be [`VERSION`].
    pub v: u32,
    /// The command.
    #[serde(flatten)]
    pub command: Command,
}

/// One live session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRow {
    /// Session id (as in logs and the audit trail).
    pub id: u64,
    /// Client address (from the PROXY header where the balancer is trusted).
    pub client: String,
    /// The balancer that sent the PROXY header, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    /// Listener name.
    pub listener: String,
    /// The user, once named.
    pub user: Option<String>,
    /// `CONNECTING` (before the relay), `AUTHORIZATION`, `TRANSACTION` or `UPDATE`.
    pub state: String,
    /// The upstream's name, once connected.
    pub upstream: Option<String>,
    /// The upstream address connected to.
    pub upstream_address: Option<String>,
    /// TLS version on the client side, if any.
    pub client_tls: Option<String>,
    /// TLS version on the upstream side, if any.
    pub upstream_tls: Option<String>,
    /// Octets read from the client.
    pub bytes_from_client: u64,
    /// Octets written to the client.
    pub bytes_to_client: u64,
    /// When the session started (RFC 3339).
    pub started: String,
    /// Seconds since it started.
    pub age_s: u64,
    /// Seconds since its last traffic.
    pub idle_s: u64,
    /// Rule tags.
    pub tags: Vec<String>,
}

/// The last reload's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadInfo {
    /// When (RFC 3339).
    pub at: String,
    /// Whether the new config is in force.
    pub ok: bool,
    /// The log line (what changed, or the error).
    pub line: String,
}

/// `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// popgate's version.
    pub version: String,
    /// Process id.
    pub pid: u32,
    /// When it started (RFC 3339).
    pub started: String,
    /// Seconds since.
    pub uptime_s: u64,
    /// A digest of the config in force and the files it names (changes when they do).
    pub config_digest: String,
    /// The last reload, if any.
    pub last_reload: Option<ReloadInfo>,
    /// Live sessions.
    pub sessions: u64,
    /// Live sessions per listener and state.
    pub by_listener: BTreeMap<String, BTreeMap<String, u64>>,
    /// Taps attached.
    pub taps: u64,
}

/// An answer line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Protocol version.
    pub v: u32,
    /// Whether the command succeeded.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `sessions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<Vec<SessionRow>>,
    /// `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// `kick`: the sessions kicked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kicked: Option<Vec<u64>>,
    /// `reload`: the outcome line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<String>,
    /// `tap`: the sessions attached at once (later ones attach as they match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_attached: Option<Vec<u64>>,
    /// `tap`: one line of a tapped session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<TapLine>,
}

impl Response {
    /// A success with nothing filled in yet.
    pub fn ok() -> Response {
        Response {
            v: VERSION,
            ok: true,
            ..Response::default()
        }
    }

    /// A failure.
    pub fn error(message: impl Into<String>) -> Response {
        Response {
            v: VERSION,
            ok: false,
            error: Some(message.into()),
            ..Response::default()
        }
    }

    /// The JSON line, newline included.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self)
            .unwrap_or_else(|_| r#"{"v":1,"ok":false,"error":"unencodable answer"}"#.into());
        s.push('\n');
        s
    }
}

/// Parse a request line (without its newline): the command, or the error line's text.
pub fn parse_request(line: &[u8]) -> Result<Command, String> {
    let text = std::str::from_utf8(line).map_err(|_| "request is not UTF-8".to_owned())?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("request is not JSON: {e}"))?;
    match value.get("v").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => {
            return Err(format!(
                "protocol version {v} not supported (this popgate speaks {VERSION})"
            ));
        }
        None => return Err("request has no protocol version (\"v\":1)".into()),
    }
    serde_json::from_value::<Request>(value)
        .map(|r| r.command)
        .map_err(|e| format!("bad request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_say_why() {
        let r = Request {
            v: 1,
            command: Command::Tap {
                filter: SessionSelector {
                    user: Some("alice".into()),
                    ..SessionSelector::default()
                },
                bodies: true,
            },
        };
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(
            line,
            r#"{"v":1,"cmd":"tap","filter":{"user":"alice"},"bodies":true}"#
        );
        assert_eq!(parse_request(line.as_bytes()).unwrap(), r.command);
        assert_eq!(
            parse_request(br#"{"v":1,"cmd":"status"}"#).unwrap(),
            Command::Status
        );
        assert!(parse_request(b"hello").unwrap_err().contains("not JSON"));
        assert!(
            parse_request(br#"{"cmd":"status"}"#)
                .unwrap_err()
                .contains("version")
        );
        assert!(
            parse_request(br#"{"v":2,"cmd":"status"}"#)
                .unwrap_err()
                .contains("version 2")
        );
        assert!(
            parse_request(br#"{"v":1,"cmd":"rm"}"#)
                .unwrap_err()
                .contains("bad request")
        );
        assert!(
            parse_request(br#"{"v":1,"cmd":"kick","filter":{"usr":"x"}}"#)
                .unwrap_err()
                .contains("usr")
        );
    }
}
