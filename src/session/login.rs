//! Routing mode's login: connect to the upstream a login was routed to and log in there, the
//! client's own lines replayed or, with an OAuth2 bridge, a bearer token. The dialogue is the
//! protocol core's (`proxy::dialogue`); this drives it: the bridge's password check and token
//! fetches, the reads and writes, the reply timeouts.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::config::UpstreamConfig;
use crate::net::pool::DeadAddresses;
use crate::net::tls::{Stream, UpstreamTls};
use crate::net::upstream::{ClientOrigin, ConnectError, ConnectStage};
use crate::pop3::replies;
use crate::proxy::dialogue::{Bearer, Dialogue, Failure, Reason, Replay, Step};
use crate::proxy::front::Login;

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

impl LoginError {
    /// The line that answers the client's login command (CRLF included).
    pub(crate) fn client_reply(&self) -> Vec<u8> {
        match self {
            LoginError::Unavailable(_) => replies::line(replies::UPSTREAM_UNAVAILABLE),
            LoginError::Refused(line) => line.clone(),
            LoginError::Bridge(e) => e.client_reply(),
        }
    }
}

/// Connect to `cfg` and log `login` in; the final status line is the login's reply. The
/// greeting is part of the connection setup (`connect_timeout`, failover: a server that
/// accepts but does not greet, e.g. a Dovecot at its login process limit, is one that does not
/// answer); each answer to the login is awaited `reply_timeout`. On any failure the upstream
/// socket is closed without QUIT. With an OAuth2 `bridge` the password is checked locally and
/// a token obtained first (a wrong password dials nothing), and the upstream gets
/// `AUTH XOAUTH2`/`OAUTHBEARER` with the token instead of the replay (all of it within
/// `reply_timeout`), after `penalty` (the delay the client's address is under for failed
/// logins).
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
    let replay = match (bridge, &authorized) {
        (Some(b), Some(who)) => {
            let (host, port) = b.host_port();
            Replay::Bearer(Bearer {
                mechanism: b.mechanism(),
                mailbox: who.mailbox().to_owned(),
                host: host.to_owned(),
                port,
                token: who.token().to_owned(),
            })
        }
        _ => Replay::Lines {
            method: login.method,
            lines: login.lines.clone(),
        },
    };
    let plan = crate::net::upstream::plan(cfg, tls, max_line, origin, true, Some(replay));
    let up = crate::net::upstream::connect(cfg, tls, &plan, dead)
        .await
        .map_err(LoginError::Unavailable)?;
    let address = up.address;
    let mut stream = up.stream;
    let mut dialogue = up.dialogue;
    let bridged = bridge.zip(authorized.as_ref());
    let limit = Some(reply_timeout);
    match drive(&mut stream, &mut dialogue, bridged, limit, READ_CHUNK).await {
        Ok((reply, rest)) => Ok(LoggedIn {
            stream,
            address,
            reply,
            rest,
        }),
        Err(Ended::Broken(reason)) => Err(LoginError::Unavailable(ConnectError {
            address,
            stage: ConnectStage::Setup,
            reason: reason.to_string(),
        })),
        Err(Ended::Refused(line)) => Err(LoginError::Refused(line)),
        Err(Ended::Bridge(e)) => Err(LoginError::Bridge(e)),
    }
}

/// Bytes read at once during a login (a few short lines).
const READ_CHUNK: usize = 512;

/// How a login driven by [`drive`] ended, if not logged in.
enum Ended {
    Broken(Reason),
    Refused(Vec<u8>),
    Bridge(crate::oauth2::BridgeError),
}

/// Drive a connected `dialogue` on `stream` to its end: the login's `+OK` line and the bytes
/// read after it. With `reply_timeout`, each replayed line's answer (or the whole bearer login,
/// token fetch included) is awaited that long. Reads `chunk` bytes at most at once (1: nothing
/// after the final line is taken from the stream).
async fn drive<S>(
    stream: &mut S,
    dialogue: &mut Dialogue,
    bridged: Option<(&crate::oauth2::Bridge, &crate::oauth2::Authorized)>,
    reply_timeout: Option<Duration>,
    chunk: usize,
) -> Result<(Vec<u8>, Vec<u8>), Ended>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // The bearer login is bounded as a whole (token fetch included), a replayed line each.
    let bearer = bridged.is_some();
    // Far enough to never fire: a login without a timeout (the caller's own bounds it).
    let never = Duration::from_secs(86_400 * 365);
    let within = reply_timeout.unwrap_or(never);
    let timed_out = || {
        Ended::Broken(if bearer {
            Reason::BearerTimeout(within)
        } else {
            Reason::NoReply(within)
        })
    };
    let mut deadline = Instant::now() + within;
    let mut token = bridged.map(|(_, who)| who.token().to_owned());
    let mut buf = vec![0u8; chunk.max(1)];
    loop {
        while let Some(step) = dialogue.poll() {
            match step {
                Step::Write(bytes) => {
                    if !bearer {
                        deadline = Instant::now() + within;
                    }
                    let written = tokio::time::timeout_at(deadline, async {
                        stream.write_all(&bytes).await?;
                        stream.flush().await
                    })
                    .await;
                    match written {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => dialogue.write_failed(&e),
                        Err(_) => return Err(timed_out()),
                    }
                }
                Step::FetchToken => {
                    let (Some((b, who)), Some(stale)) = (bridged, &token) else {
                        return Err(Ended::Broken(Reason::Closed));
                    };
                    let fresh = tokio::time::timeout_at(deadline, b.fresh_token(who, stale)).await;
                    match fresh {
                        Ok(Ok(t)) => {
                            token = Some(t.clone());
                            dialogue.fresh_token(t);
                        }
                        Ok(Err(e)) => return Err(Ended::Bridge(e)),
                        Err(_) => return Err(timed_out()),
                    }
                }
                Step::Notice(n) => crate::net::upstream::log_notice(&n),
                Step::LoggedIn { reply, rest } => return Ok((reply, rest)),
                Step::Failed(f) => {
                    return Err(match (f, bridged) {
                        (Failure::Broken { reason, .. }, _) => Ended::Broken(reason),
                        (Failure::Refused(line), _) => Ended::Refused(line),
                        (Failure::TokenRefused(line), Some((b, who))) => {
                            Ended::Bridge(b.refused(who, line))
                        }
                        (Failure::BearerUnexpected(line), Some((b, who))) => {
                            Ended::Bridge(b.unexpected(who, line))
                        }
                        (Failure::TokenRefused(line) | Failure::BearerUnexpected(line), None) => {
                            Ended::Broken(Reason::UnexpectedLoginReply(line))
                        }
                    });
                }
                // The set-up is over: neither comes again.
                Step::StartTls | Step::Connected => {}
            }
        }
        if dialogue.finished() {
            return Err(Ended::Broken(Reason::Closed));
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return Err(timed_out()),
            Ok(Ok(0)) => dialogue.on_server_eof(),
            Ok(Ok(n)) => dialogue.on_server_bytes(&buf[..n]),
            Ok(Err(e)) => dialogue.read_failed(&e),
        }
    }
}

impl crate::oauth2::Bridge {
    /// The bearer login on an upstream connection whose greeting was read: `AUTH` with the
    /// token; if the server refuses it, once more with a fresh one (a token revoked at the
    /// server before its expiry). Returns the server's `+OK` line for the client. Reads byte by
    /// byte, so that nothing after the final status line is taken from the stream (whoever
    /// reads on gets it); a login is a few short lines. The protocol core's dialogue, as in a
    /// routed session (defined here, by its driver, because the bridge itself does no POP3).
    pub async fn login<S>(
        &self,
        stream: &mut S,
        who: &crate::oauth2::Authorized,
    ) -> Result<Vec<u8>, crate::oauth2::BridgeError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (host, port) = self.host_port();
        let bearer = Bearer {
            mechanism: self.mechanism(),
            mailbox: who.mailbox().to_owned(),
            host: host.to_owned(),
            port,
            token: who.token().to_owned(),
        };
        let mut dialogue = Dialogue::login_only(Replay::Bearer(bearer), usize::MAX);
        match drive(stream, &mut dialogue, Some((self, who)), None, 1).await {
            Ok((reply, _)) => Ok(reply),
            Err(Ended::Bridge(e)) => Err(e),
            Err(Ended::Broken(Reason::Bearer(e))) => {
                Err(crate::oauth2::BridgeError::Io(std::io::Error::other(e)))
            }
            Err(Ended::Broken(reason)) => Err(crate::oauth2::BridgeError::Io(
                std::io::Error::other(reason.to_string()),
            )),
            Err(Ended::Refused(line)) => Err(crate::oauth2::BridgeError::Refused(line)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_told_the_server_line_or_that_the_upstream_is_unavailable() {
        let unavailable = LoginError::Unavailable(ConnectError {
            address: "a:110".into(),
            stage: ConnectStage::Setup,
            reason: "x".into(),
        });
        assert_eq!(
            unavailable.client_reply(),
            b"-ERR [SYS/TEMP] upstream server unavailable, try again later\r\n"
        );
        let refused = LoginError::Refused(b"-ERR [AUTH] no\r\n".to_vec());
        assert_eq!(refused.client_reply(), b"-ERR [AUTH] no\r\n");
        let bridge = LoginError::Bridge(crate::oauth2::BridgeError::BadPassword);
        assert_eq!(
            bridge.client_reply(),
            b"-ERR [AUTH] Authentication failed.\r\n"
        );
    }

    /// The bridge's login (byte by byte) leaves what follows its final line on the stream.
    #[tokio::test]
    async fn driver_reads_no_further_than_the_status_line() {
        let (mut ours, mut theirs) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let n = theirs.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"AUTH XOAUTH2\r\n");
            theirs.write_all(b"+ \r\n").await.unwrap();
            let n = theirs.read(&mut buf).await.unwrap();
            assert!(buf[..n].ends_with(b"\r\n"));
            theirs.write_all(b"+OK in\r\nNEXT").await.unwrap();
            theirs
        });
        let bearer = Bearer {
            mechanism: crate::config::Oauth2Mechanism::Xoauth2,
            mailbox: "alice@example.com".into(),
            host: "pop.example.com".into(),
            port: 995,
            token: "tok".into(),
        };
        let mut d = Dialogue::login_only(Replay::Bearer(bearer), usize::MAX);
        let Ok((reply, rest)) = drive(&mut ours, &mut d, None, None, 1).await else {
            panic!("not logged in")
        };
        assert_eq!((reply, rest), (b"+OK in\r\n".to_vec(), Vec::new()));
        let mut next = [0u8; 4];
        ours.read_exact(&mut next).await.unwrap();
        assert_eq!(&next, b"NEXT");
        drop(server.await.unwrap());
    }
}
