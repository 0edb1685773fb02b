//! Every `-ERR` line popgate writes itself (not the ones it relays from the server, nor a
//! rule's own `reply`), in one place: what a client can be told, and how, is read here. The
//! constants hold the line without its CRLF; [`line`] adds it.

/// `text` with CRLF: the bytes to write.
pub fn line(text: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(text.len() + 2);
    v.extend_from_slice(text.as_bytes());
    v.extend_from_slice(b"\r\n");
    v
}

// Accepting connections (`net::listener`, the runtime).

/// `limits.max_sessions_per_ip` reached for the client's address.
pub const TOO_MANY_FROM_ADDRESS: &str = "-ERR [SYS/TEMP] too many connections from your address";
/// `limits.max_sessions` reached.
pub const TOO_MANY_CONNECTIONS: &str = "-ERR [SYS/TEMP] too many connections";
/// `[state] on_unavailable = "closed"` while the fleet's store cannot be reached.
pub const SERVICE_UNAVAILABLE: &str = "-ERR [SYS/TEMP] service unavailable, try again later";
/// Interception: the connection's original destination cannot be read.
pub const NO_ORIGINAL_DESTINATION: &str = "-ERR [SYS/TEMP] no original destination to connect to";

// The upstream.

/// No upstream could be reached or set up (connect, greeting, STLS, XCLIENT, a broken login
/// dialogue in routing mode).
pub const UPSTREAM_UNAVAILABLE: &str =
    "-ERR [SYS/TEMP] upstream server unavailable, try again later";
/// The upstream accepted but sent no greeting within `limits.greeting_timeout`.
pub const UPSTREAM_NO_ANSWER: &str =
    "-ERR [SYS/TEMP] upstream server did not answer, try again later";
/// The upstream closed while a response was due.
pub const UPSTREAM_CLOSED: &str = "-ERR [SYS/TEMP] upstream server closed the connection";
/// The upstream broke the protocol while a response was due.
pub const UPSTREAM_PROTOCOL_ERROR: &str = "-ERR [SYS/TEMP] upstream protocol error";

// The session's own ends.

/// popgate is shutting down.
pub const SHUTTING_DOWN: &str = "-ERR [SYS/TEMP] proxy shutting down";
/// `limits.login_timeout` ran out.
pub const NO_LOGIN_IN_TIME: &str = "-ERR disconnected: no login in time";
/// `limits.idle_timeout` ran out.
pub const IDLE_TOO_LONG: &str = "-ERR autologout: idle for too long";

// Commands popgate answers itself (direct and routing mode).

/// A client line longer than `limits.max_line`.
pub const LINE_TOO_LONG: &str = "-ERR line too long";
/// A line after a refused AUTH that is no command (its stray SASL answer).
pub const NO_SASL_EXCHANGE: &str = "-ERR no SASL exchange in progress";
/// A rule's rewrite produced a command that does not parse.
pub const COMMAND_REJECTED: &str = "-ERR command rejected";
/// XCLIENT from a client (only popgate may send it).
pub const XCLIENT_NOT_ALLOWED: &str = "-ERR XCLIENT is not allowed";
/// An unknown command refused (`limits.unknown_commands = "reject"`, or credentials denied).
pub const UNKNOWN_COMMAND: &str = "-ERR unknown command";
/// A free-form argument before encryption where credentials are denied.
pub const NOT_BEFORE_ENCRYPTION: &str = "-ERR [AUTH] not before encryption";
/// STLS under TLS.
pub const ALREADY_UNDER_TLS: &str = "-ERR already under TLS";
/// STLS after login.
pub const STLS_ONLY_BEFORE_LOGIN: &str = "-ERR STLS is only allowed before login";
/// STLS on a listener without it.
pub const STLS_NOT_AVAILABLE: &str = "-ERR STLS not available on this listener";
/// A login command after login.
pub const ALREADY_LOGGED_IN: &str = "-ERR already logged in";
/// A TRANSACTION command before login.
pub const NOT_LOGGED_IN: &str = "-ERR not logged in";
/// AUTH with a mechanism popgate cannot read the user name from.
pub const SASL_MECHANISM_NOT_SUPPORTED: &str =
    "-ERR [AUTH] SASL mechanism not supported by this proxy";

// SASL answers (routing mode's front; direct mode for a malformed AUTH PLAIN).

/// `*`: the client cancelled the exchange.
pub const AUTH_CANCELLED: &str = "-ERR [AUTH] authentication cancelled";
/// A SASL message that is not base64.
pub const INVALID_BASE64: &str = "-ERR [AUTH] invalid base64";
/// An AUTH PLAIN message that is not `authzid NUL authcid NUL password` with an authcid.
pub const MALFORMED_PLAIN: &str = "-ERR [AUTH] malformed AUTH PLAIN message";
/// An AUTH LOGIN user name that is empty.
pub const MALFORMED_LOGIN: &str = "-ERR [AUTH] empty AUTH LOGIN user name";

// Routing mode's front (before the login's upstream is known).

/// A line that is no command.
pub const INVALID_COMMAND: &str = "-ERR invalid command";
/// USER with white space in the name.
pub const USER_WITH_WHITE_SPACE: &str = "-ERR [AUTH] a user name with white space cannot be routed";
/// PASS without USER.
pub const USER_FIRST: &str = "-ERR USER first";
/// AUTH with a mechanism the front cannot route.
pub const ONLY_PLAIN_AND_LOGIN: &str =
    "-ERR [AUTH] this proxy routes logins by user: only PLAIN and LOGIN can be routed";
/// APOP (its digest is bound to one server's greeting).
pub const APOP_NOT_ROUTED: &str =
    "-ERR [AUTH] APOP cannot be routed by this proxy: use USER/PASS or AUTH PLAIN";
/// Any other command before login.
pub const NOT_BEFORE_LOGIN: &str = "-ERR not available before login";

// Content scanning (`scan` rules, `[scan]`).

/// A retrieved message a scanner found malware in, with `on_virus = "deny"`.
pub const SCAN_DENIED: &str =
    "-ERR message withheld: malware found (it stays on the server; ask your mail administrator)";
/// A retrieved message no scanner could judge, with `on_error = "tempfail"`.
pub const SCAN_TEMPFAIL: &str = "-ERR [SYS/TEMP] message could not be scanned, try again later";
/// RETR, TOP or DELE of a message number popgate cannot represent (past 2^32 - 1), with
/// scanning on: never relayed, as popgate could not tell which message the server takes it for.
pub const NO_SUCH_MESSAGE: &str = "-ERR no such message";
/// DELE of a message whose retrieval was tempfailed in this session: not relayed.
pub const SCAN_DELE_TEMPFAILED: &str =
    "-ERR [SYS/TEMP] message not yet delivered (scan pending): not deleted, try again later";

// The OAuth2 bridge.

/// Unknown user or wrong local password.
pub const OAUTH2_BAD_PASSWORD: &str = "-ERR [AUTH] Authentication failed.";
/// Too many password checks at once.
pub const OAUTH2_BUSY: &str = "-ERR [SYS/TEMP] Too many logins at once, try later.";
/// No access token.
pub const OAUTH2_NO_TOKEN: &str =
    "-ERR [SYS/TEMP] Cannot get an OAuth2 token for this mailbox now, try later.";
/// The upstream refused the token (twice) or answered AUTH unexpectedly.
pub const OAUTH2_REFUSED: &str =
    "-ERR [SYS/TEMP] The server refused popgate's OAuth2 login, try later.";
/// The upstream connection broke during the exchange.
pub const OAUTH2_LOST_CONNECTION: &str = "-ERR [SYS/TEMP] Lost the connection to the server.";

// A rule's `deny` (`action = "deny"`, with the rule's own `message` and `code` if set).

/// The message of a connect rule's `deny` without one.
pub const DENY_CONNECTION_MESSAGE: &str = "connection not allowed by policy";
/// The message of a command rule's `deny` without one.
pub const DENY_COMMAND_MESSAGE: &str = "command not allowed by policy";

/// A rule's `deny` reply: `-ERR [code] message` (no CRLF).
pub fn deny(code: Option<&str>, message: &str) -> String {
    match code {
        Some(code) => format!("-ERR [{code}] {message}"),
        None => format!("-ERR {message}"),
    }
}

/// A client line that does not parse as a command (`-ERR <why>`).
pub fn invalid_command(why: &dyn std::fmt::Display) -> Vec<u8> {
    format!("-ERR {why}\r\n").into_bytes()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::pop3::response::{Status, StatusLine};

    #[test]
    fn every_reply_is_an_err_status_line_without_line_end() {
        for text in [
            TOO_MANY_FROM_ADDRESS,
            TOO_MANY_CONNECTIONS,
            SERVICE_UNAVAILABLE,
            NO_ORIGINAL_DESTINATION,
            UPSTREAM_UNAVAILABLE,
            UPSTREAM_NO_ANSWER,
            UPSTREAM_CLOSED,
            UPSTREAM_PROTOCOL_ERROR,
            SHUTTING_DOWN,
            NO_LOGIN_IN_TIME,
            IDLE_TOO_LONG,
            LINE_TOO_LONG,
            NO_SASL_EXCHANGE,
            COMMAND_REJECTED,
            XCLIENT_NOT_ALLOWED,
            UNKNOWN_COMMAND,
            NOT_BEFORE_ENCRYPTION,
            ALREADY_UNDER_TLS,
            STLS_ONLY_BEFORE_LOGIN,
            STLS_NOT_AVAILABLE,
            ALREADY_LOGGED_IN,
            NOT_LOGGED_IN,
            SASL_MECHANISM_NOT_SUPPORTED,
            AUTH_CANCELLED,
            INVALID_BASE64,
            MALFORMED_PLAIN,
            MALFORMED_LOGIN,
            INVALID_COMMAND,
            USER_WITH_WHITE_SPACE,
            USER_FIRST,
            ONLY_PLAIN_AND_LOGIN,
            APOP_NOT_ROUTED,
            NOT_BEFORE_LOGIN,
            OAUTH2_BAD_PASSWORD,
            OAUTH2_BUSY,
            OAUTH2_NO_TOKEN,
            OAUTH2_REFUSED,
            OAUTH2_LOST_CONNECTION,
        ] {
            assert!(!text.contains(['\r', '\n']), "{text}");
            let l = line(text);
            let s = StatusLine::parse(&l).unwrap();
            assert_eq!(s.status, Status::Err, "{text}");
        }
        for text in [
            deny(None, DENY_COMMAND_MESSAGE),
            deny(Some("SYS/PERM"), DENY_CONNECTION_MESSAGE),
        ] {
            assert_eq!(StatusLine::parse(&line(&text)).unwrap().status, Status::Err);
        }
    }
}
