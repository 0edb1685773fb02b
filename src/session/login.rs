//! Routing mode's login: connect to the upstream a login was routed to and log in there, the
//! client's own lines replayed or, with an OAuth2 bridge, a bearer token. The dialogue is the
//! protocol core's (`proxy::dialogue`, the reply timeouts and failover included); this drives
//! it: the bridge's password check and token fetches, the dials, reads and writes, the timer.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::UpstreamConfig;
use crate::net::pool::DeadAddresses;
use crate::net::tls::{Stream, UpstreamTls};
use crate::net::upstream::{self, ClientOrigin, ConnectError, ConnectStage};
use crate::pop3::replies;
use crate::proxy::dialogue::{Bearer, ConnectEnd, ConnectFailure, Connector, Reason, Replay};
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
    let mut connector = upstream::connector(cfg, plan, Some(reply_timeout), dead);
    let mut tokens = BridgeTokens::new(bridge.zip(authorized.as_ref()));
    let mut link: Option<Stream> = None;
    let end = upstream::drive(
        &mut connector,
        &mut link,
        tls,
        Some(dead),
        cfg.label(),
        &mut tokens,
        upstream::READ_CHUNK,
    )
    .await;
    let failure = match (end, link) {
        (
            ConnectEnd::LoggedIn {
                address,
                reply,
                rest,
            },
            Some(stream),
        ) => {
            return Ok(LoggedIn {
                stream,
                address,
                reply,
                rest,
            });
        }
        (ConnectEnd::Failed(f), _) => f,
        // A plan with a login ends logged in or failed.
        (_, _) => ConnectFailure::Unavailable {
            address: String::new(),
            stage: ConnectStage::Setup,
            reason: Reason::Closed,
        },
    };
    Err(match failure {
        ConnectFailure::Unavailable {
            address,
            stage,
            reason,
        } => LoginError::Unavailable(ConnectError {
            address,
            stage,
            reason: reason.to_string(),
        }),
        ConnectFailure::Refused(line) => LoginError::Refused(line),
        other => match tokens.failure(other) {
            Ok(e) => LoginError::Bridge(e),
            Err(reason) => LoginError::Unavailable(ConnectError {
                address: String::new(),
                stage: ConnectStage::Setup,
                reason: reason.to_string(),
            }),
        },
    })
}

/// The OAuth2 bridge as the connector's token source: the token in use, and why a fresh one
/// could not be had.
struct BridgeTokens<'a> {
    bridged: Option<(&'a crate::oauth2::Bridge, &'a crate::oauth2::Authorized)>,
    token: Option<String>,
    error: Option<crate::oauth2::BridgeError>,
}

impl<'a> BridgeTokens<'a> {
    fn new(
        bridged: Option<(&'a crate::oauth2::Bridge, &'a crate::oauth2::Authorized)>,
    ) -> BridgeTokens<'a> {
        BridgeTokens {
            token: bridged.map(|(_, who)| who.token().to_owned()),
            bridged,
            error: None,
        }
    }

    /// The bridge's error for a bearer login's failure; without a bridge (never with a
    /// bearer login) the reason it broke.
    fn failure(&mut self, f: ConnectFailure) -> Result<crate::oauth2::BridgeError, Reason> {
        match (f, self.bridged) {
            (ConnectFailure::TokenRefused(line), Some((b, who))) => Ok(b.refused(who, line)),
            (ConnectFailure::BearerUnexpected(line), Some((b, who))) => Ok(b.unexpected(who, line)),
            (ConnectFailure::NoFreshToken, _) => self.error.take().ok_or(Reason::Closed),
            (ConnectFailure::TokenRefused(line) | ConnectFailure::BearerUnexpected(line), None) => {
                Err(Reason::UnexpectedLoginReply(line))
            }
            (ConnectFailure::Refused(line), _) => Ok(crate::oauth2::BridgeError::Refused(line)),
            (ConnectFailure::Unavailable { reason, .. }, _) => Err(reason),
        }
    }
}

impl upstream::Tokens for BridgeTokens<'_> {
    async fn fresh(&mut self) -> Option<String> {
        let (b, who) = self.bridged?;
        let stale = self.token.as_deref()?;
        match b.fresh_token(who, stale).await {
            Ok(t) => {
                self.token = Some(t.clone());
                Some(t)
            }
            Err(e) => {
                self.error = Some(e);
                None
            }
        }
    }
}

impl crate::oauth2::Bridge {
    /// The bearer login on an upstream connection whose greeting was read: `AUTH` with the
    /// token; if the server refuses it, once more with a fresh one (a token revoked at the
    /// server before its expiry). Returns the server's `+OK` line for the client. Reads byte by
    /// byte, so that nothing after the final status line is taken from the stream (whoever
    /// reads on gets it); a login is a few short lines. The protocol core's connector, as in a
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
        let mut connector =
            Connector::login_only(Replay::Bearer(bearer), usize::MAX, None, upstream::now());
        let mut tokens = BridgeTokens::new(Some((self, who)));
        let mut link = Some(stream);
        let end = upstream::drive(&mut connector, &mut link, None, None, "", &mut tokens, 1).await;
        match end {
            ConnectEnd::LoggedIn { reply, .. } => Ok(reply),
            ConnectEnd::Failed(f) => match tokens.failure(f) {
                Ok(e) => Err(e),
                Err(Reason::Bearer(e)) => {
                    Err(crate::oauth2::BridgeError::Io(std::io::Error::other(e)))
                }
                Err(reason) => Err(crate::oauth2::BridgeError::Io(std::io::Error::other(
                    reason.to_string(),
                ))),
            },
            ConnectEnd::Connected { .. } => Err(crate::oauth2::BridgeError::Io(
                std::io::Error::other(Reason::Closed.to_string()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::net::upstream::NoTokens;

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

    /// The driver's one clock is tokio's: on paused time a login's deadline comes exactly
    /// when the connector says, and the server that never answers is given up on then.
    #[tokio::test(start_paused = true)]
    async fn a_silent_server_is_given_up_on_at_the_connectors_deadline_on_paused_time() {
        let (mut ours, mut theirs) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let n = theirs.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"USER alice\r\n");
            // No answer; the connection stays open.
            let _ = theirs.read(&mut buf).await;
        });
        let lines = Replay::Lines {
            method: crate::proxy::front::Method::UserPass,
            lines: vec![b"USER alice\r\n".to_vec(), b"PASS s3cret\r\n".to_vec()],
        };
        let started = tokio::time::Instant::now();
        let within = Duration::from_secs(30);
        let mut c = Connector::login_only(lines, 512, Some(within), upstream::now());
        let mut link = Some(&mut ours);
        let mut tokens = NoTokens;
        let driven = upstream::drive(&mut c, &mut link, None, None, "", &mut tokens, 512);
        let end = tokio::time::timeout(within * 2, driven)
            .await
            .expect("the driver watched the connector's deadline");
        let took = started.elapsed();
        assert!(
            within <= took && took < within + Duration::from_secs(1),
            "{took:?}"
        );
        assert_eq!(
            end,
            ConnectEnd::Failed(ConnectFailure::Unavailable {
                address: String::new(),
                stage: ConnectStage::Setup,
                reason: Reason::NoReply(within),
            })
        );
        drop(ours);
        server.await.unwrap();
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
        let mut c =
            Connector::login_only(Replay::Bearer(bearer), usize::MAX, None, upstream::now());
        let mut link = Some(&mut ours);
        let end = upstream::drive(&mut c, &mut link, None, None, "", &mut NoTokens, 1).await;
        let ConnectEnd::LoggedIn { reply, rest, .. } = end else {
            panic!("not logged in: {end:?}")
        };
        assert_eq!((reply, rest), (b"+OK in\r\n".to_vec(), Vec::new()));
        let mut next = [0u8; 4];
        ours.read_exact(&mut next).await.unwrap();
        assert_eq!(&next, b"NEXT");
        drop(server.await.unwrap());
    }
}
