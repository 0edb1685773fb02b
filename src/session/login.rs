//! The OAuth2 bridge's bearer login on a lent connection ([`Bridge::login`]), driven by
//! `net::upstream::drive` over the protocol core's connector. Routing mode's login is the
//! session machine's (`proxy::Session::connect_login`), carried out by the relay loop.
//!
//! [`Bridge::login`]: crate::oauth2::Bridge::login

use tokio::io::{AsyncRead, AsyncWrite};

use crate::net::upstream;
use crate::proxy::dialogue::{Bearer, ConnectEnd, ConnectFailure, Connector, Reason, Replay};

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

    use std::time::Duration;

    use super::*;
    use crate::net::upstream::{ConnectStage, NoTokens};

    #[test]
    fn a_bridge_refusal_is_answered_with_the_bridges_line() {
        // The unavailable and refused replies are the session machine's now
        // (`proxy::session`'s tests).
        assert_eq!(
            crate::oauth2::BridgeError::BadPassword.client_reply(),
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
