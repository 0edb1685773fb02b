//! Routing mode's login: connect to the upstream a login was routed to and replay the login
//! there with the same method. The one place of that I/O (a bridge that logs in upstream with
//! something other than the client's password adds its branch here).

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::config::UpstreamConfig;
use crate::net::pool::DeadAddresses;
use crate::net::tls::{Stream, UpstreamTls};
use crate::net::upstream::{ClientOrigin, ConnectError, ConnectStage, read_line};
use crate::pop3::response::{Status, StatusLine};
use crate::proxy::front::{Login, Method};

/// A login the upstream accepted.
#[derive(Debug)]
pub(crate) struct LoggedIn {
    /// The upstream connection, in TRANSACTION state.
    pub(crate) stream: Stream,
    /// The address that answered.
    pub(crate) address: String,
    /// The upstream's final `+OK` line (CRLF included): the reply to the client's login.
    pub(crate) reply: Vec<u8>,
    /// Bytes the upstream sent after it (normally none).
    pub(crate) rest: Vec<u8>,
}

/// Why a routed login did not succeed.
#[derive(Debug)]
pub(crate) enum LoginError {
    /// The upstream could not be reached or set up (connect, greeting, a broken dialogue).
    Unavailable(ConnectError),
    /// The upstream answered a step with `-ERR`: that line (CRLF included) is the reply.
    Refused(Vec<u8>),
    /// The OAuth2 bridge refused the login or could not log in upstream (a wrong local
    /// password, no token, a refused token); `client_reply` is the reply.
    Bridge(crate::oauth2::BridgeError),
}

/// Connect to `cfg` and replay `login`; the final status line is the login's reply. The
/// greeting is part of the connection setup (`connect_timeout`, failover: a server that
/// accepts but does not greet, e.g. a Dovecot at its login process limit, is one that does not
/// answer); each answer to the login is awaited `reply_timeout`. On any failure the upstream
/// socket is closed without QUIT. With an OAuth2 `bridge` the password is checked locally and
/// a token obtained first (a wrong password dials nothing), and the upstream gets
/// `AUTH XOAUTH2`/`OAUTHBEARER` with the token instead of the replay, after `penalty` (the
/// delay the client's address is under for failed logins).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn login_upstream(
    cfg: &UpstreamConfig,
    bridge: Option<&crate::oauth2::Bridge>,
    tls: Option<&UpstreamTls>,
    max_line: usize,
    reply_timeout: Duration,
    origin: &ClientOrigin,
    dead: &DeadAddresses,
    login: &Login,
    penalty: Option<Duration>,
) -> Result<LoggedIn, LoginError> {
    let authorized = match bridge {
        Some(b) => Some(
            b.authorize(&login.user, &login.secret, origin.client.ip(), penalty)
                .await
                .map_err(LoginError::Bridge)?,
        ),
        None => None,
    };
    let up = crate::net::upstream::connect(cfg, tls, max_line, origin, dead, true)
        .await
        .map_err(LoginError::Unavailable)?;
    let address = up.address.clone();
    let broken = |reason: String| {
        LoginError::Unavailable(ConnectError {
            address: address.clone(),
            stage: ConnectStage::Setup,
            reason,
        })
    };
    let mut stream = up.stream;
    let mut buf = up.preread;
    let next_line = async |stream: &mut Stream, buf: &mut Vec<u8>| match tokio::time::timeout(
        reply_timeout,
        read_line(stream, buf, max_line),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(format!("no reply within {reply_timeout:?}")),
    };
    // Read during the setup (in `buf` already).
    let greeting = next_line(&mut stream, &mut buf).await.map_err(broken)?;
    if status(&greeting) != Some(Status::Ok) {
        return Err(broken(format!(
            "greeting is not +OK: {}",
            String::from_utf8_lossy(&greeting).trim_end()
        )));
    }
    if let (Some(b), Some(who)) = (bridge, &authorized) {
        // The bridge reads the stream itself, line by line; nothing may wait in `buf`.
        if !buf.is_empty() {
            return Err(broken("unexpected bytes after the greeting".into()));
        }
        let reply = match tokio::time::timeout(reply_timeout, b.login(&mut stream, who)).await {
            Err(_) => return Err(broken(format!("no OAuth2 login within {reply_timeout:?}"))),
            Ok(Err(crate::oauth2::BridgeError::Io(e))) => {
                return Err(broken(format!("during the OAuth2 login: {e}")));
            }
            Ok(Err(e)) => return Err(LoginError::Bridge(e)),
            Ok(Ok(reply)) => reply,
        };
        return Ok(LoggedIn {
            stream,
            address,
            reply,
            rest: buf,
        });
    }
    let mut last = Vec::new();
    for (i, line) in login.lines.iter().enumerate() {
        if !buf.is_empty() {
            // A line nobody asked for would be taken for the answer to this step (USER's
            // `+OK` for PASS's, logging the client in on a refused password).
            return Err(broken(format!(
                "the server spoke out of turn: {}",
                String::from_utf8_lossy(&buf).trim_end()
            )));
        }
        stream
            .write_all(line)
            .await
            .map_err(|e| broken(format!("sending the login: {e}")))?;
        last = next_line(&mut stream, &mut buf).await.map_err(broken)?;
        let more = i + 1 < login.lines.len();
        match status(&last) {
            // USER's +OK, or a SASL challenge: the next step.
            Some(Status::Ok) if more && login.method == Method::UserPass => {}
            Some(Status::Continue) if more && login.method != Method::UserPass => {}
            Some(Status::Ok) => break,
            Some(Status::Err) => return Err(LoginError::Refused(last)),
            Some(Status::Continue) | None => {
                return Err(broken(format!(
                    "unexpected reply to the login: {}",
                    String::from_utf8_lossy(&last).trim_end()
                )));
            }
        }
    }
    Ok(LoggedIn {
        stream,
        address,
        reply: last,
        rest: buf,
    })
}

fn status(line: &[u8]) -> Option<Status> {
    StatusLine::parse(line).ok().map(|s| s.status)
}
