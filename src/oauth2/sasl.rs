//! Upstream SASL with a bearer token: a sans-I/O state machine ([`Exchange`]) and the small
//! async loop that runs it on a connected stream whose greeting was already read.
//!
//! Always `AUTH <MECH>\r\n` first and the token on the continuation line, never an initial
//! response on the command line: RFC 5034 limits that to 255 octets, which real tokens exceed.
//! A server that refuses the token answers `+ <base64 JSON>` first (Google's and Microsoft's
//! XOAUTH2, RFC 7628 OAUTHBEARER); the client must answer that with a dummy response (an empty
//! line for XOAUTH2, `\x01` for OAUTHBEARER) and then gets the `-ERR`.

use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::config::Oauth2Mechanism;

/// Longest server line read during the exchange (Dovecot's error JSON is far shorter).
const MAX_LINE: usize = 8192;

/// What the mechanism needs besides the token.
#[derive(Debug, Clone)]
pub(crate) struct Target<'a> {
    /// The mechanism.
    pub(crate) mechanism: Oauth2Mechanism,
    /// The upstream mailbox (authorization identity).
    pub(crate) mailbox: &'a str,
    /// The upstream host and port (OAUTHBEARER's `host=` and `port=`).
    pub(crate) host: &'a str,
    /// See `host`.
    pub(crate) port: u16,
}

/// The client's first response for `target` with `token`, base64-encoded, without CRLF.
pub(crate) fn initial_response(target: &Target<'_>, token: &str) -> String {
    let raw = match target.mechanism {
        Oauth2Mechanism::Xoauth2 => {
            format!("user={}\x01auth=Bearer {token}\x01\x01", target.mailbox)
        }
        Oauth2Mechanism::Oauthbearer => format!(
            "n,a={},\x01host={}\x01port={}\x01auth=Bearer {token}\x01\x01",
            gs2_escape(target.mailbox),
            target.host,
            target.port
        ),
    };
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// RFC 5801 saslname: `,` and `=` escaped.
fn gs2_escape(name: &str) -> String {
    name.replace('=', "=3D").replace(',', "=2C")
}

fn command(m: Oauth2Mechanism) -> &'static [u8] {
    match m {
        Oauth2Mechanism::Xoauth2 => b"AUTH XOAUTH2\r\n",
        Oauth2Mechanism::Oauthbearer => b"AUTH OAUTHBEARER\r\n",
    }
}

/// How an exchange ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// `+OK ...`: logged in; the server's status line (with CRLF), for the client.
    LoggedIn(Vec<u8>),
    /// `-ERR ...` after the token was sent: the token was refused. The server's line.
    Refused(Vec<u8>),
    /// The server refused `AUTH <mech>` itself, or said something that makes no sense here.
    Unexpected(Vec<u8>),
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Write these bytes, then read one line and feed it to [`Exchange::on_line`].
    Send(Vec<u8>),
    /// Done.
    Done(Outcome),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// `AUTH <MECH>` is out.
    Auth,
    /// The token is out.
    Token,
    /// The dummy answer to an error challenge is out.
    Dummy,
}

/// One `AUTH` exchange (sans-I/O): [`Exchange::start`] gives the command, every server line
/// goes to [`Exchange::on_line`].
#[derive(Debug)]
pub(crate) struct Exchange {
    mechanism: Oauth2Mechanism,
    response: String,
    state: State,
}

impl Exchange {
    /// A new exchange and the first bytes to send (`AUTH <MECH>\r\n`).
    pub(crate) fn start(target: &Target<'_>, token: &str) -> (Exchange, Vec<u8>) {
        let ex = Exchange {
            mechanism: target.mechanism,
            response: initial_response(target, token),
            state: State::Auth,
        };
        (ex, command(target.mechanism).to_vec())
    }

    /// Feeds one complete server line (with its line end).
    pub(crate) fn on_line(&mut self, line: &[u8]) -> Step {
        let ok = line.starts_with(b"+OK");
        let err = line.starts_with(b"-ERR");
        let cont = line.starts_with(b"+") && !ok;
        match self.state {
            State::Auth if cont => {
                self.state = State::Token;
                let mut out = std::mem::take(&mut self.response).into_bytes();
                out.extend_from_slice(b"\r\n");
                Step::Send(out)
            }
            State::Auth => Step::Done(Outcome::Unexpected(line.to_vec())),
            State::Token | State::Dummy if ok => Step::Done(Outcome::LoggedIn(line.to_vec())),
            State::Token | State::Dummy if err => Step::Done(Outcome::Refused(line.to_vec())),
            State::Token if cont => {
                // The error challenge (base64 JSON): answer it, the -ERR follows.
                self.state = State::Dummy;
                Step::Send(match self.mechanism {
                    Oauth2Mechanism::Xoauth2 => b"\r\n".to_vec(),
                    Oauth2Mechanism::Oauthbearer => b"AQ==\r\n".to_vec(),
                })
            }
            State::Token | State::Dummy => Step::Done(Outcome::Unexpected(line.to_vec())),
        }
    }
}

/// Runs one exchange on `stream`. Reads byte by byte, so that nothing after the final status
/// line is taken from the stream (the relay reads on from there); a login is a few short lines.
pub(crate) async fn authenticate<S>(
    stream: &mut S,
    target: &Target<'_>,
    token: &str,
) -> std::io::Result<Outcome>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ex, first) = Exchange::start(target, token);
    let mut out = first;
    loop {
        stream.write_all(&out).await?;
        stream.flush().await?;
        let line = read_line(stream).await?;
        match ex.on_line(&line) {
            Step::Send(next) => out = next,
            Step::Done(outcome) => return Ok(outcome),
        }
    }
}

async fn read_line<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::with_capacity(128);
    loop {
        let b = stream.read_u8().await?;
        line.push(b);
        if b == b'\n' {
            return Ok(line);
        }
        if line.len() > MAX_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "upstream line too long during AUTH",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn t(m: Oauth2Mechanism) -> Target<'static> {
        Target {
            mechanism: m,
            mailbox: "alice@example.com",
            host: "pop.example.com",
            port: 995,
        }
    }

    fn decode(s: &[u8]) -> Vec<u8> {
        let s = std::str::from_utf8(s).unwrap().trim_end();
        base64::engine::general_purpose::STANDARD.decode(s).unwrap()
    }

    #[test]
    fn xoauth2_token_goes_on_the_continuation_line() {
        let long = "x".repeat(2000);
        let (mut ex, first) = Exchange::start(&t(Oauth2Mechanism::Xoauth2), &long);
        assert_eq!(first, b"AUTH XOAUTH2\r\n");
        let Step::Send(resp) = ex.on_line(b"+ \r\n") else {
            panic!("no response")
        };
        assert!(resp.ends_with(b"\r\n"));
        assert_eq!(
            decode(&resp),
            format!("user=alice@example.com\x01auth=Bearer {long}\x01\x01").into_bytes()
        );
        assert_eq!(
            ex.on_line(b"+OK Logged in.\r\n"),
            Step::Done(Outcome::LoggedIn(b"+OK Logged in.\r\n".to_vec()))
        );
    }

    #[test]
    fn oauthbearer_gs2_header_and_host_port() {
        let target = Target {
            mailbox: "a,b=c",
            ..t(Oauth2Mechanism::Oauthbearer)
        };
        let (mut ex, first) = Exchange::start(&target, "tok");
        assert_eq!(first, b"AUTH OAUTHBEARER\r\n");
        let Step::Send(resp) = ex.on_line(b"+\r\n") else {
            panic!()
        };
        assert_eq!(
            decode(&resp),
            b"n,a=a=2Cb=3Dc,\x01host=pop.example.com\x01port=995\x01auth=Bearer tok\x01\x01"
        );
    }

    #[test]
    fn refusal_challenge_is_answered_then_err() {
        for (m, dummy) in [
            (Oauth2Mechanism::Xoauth2, &b"\r\n"[..]),
            (Oauth2Mechanism::Oauthbearer, &b"AQ==\r\n"[..]),
        ] {
            let (mut ex, _) = Exchange::start(&t(m), "tok");
            assert!(matches!(ex.on_line(b"+ \r\n"), Step::Send(_)));
            assert_eq!(
                ex.on_line(b"+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=\r\n"),
                Step::Send(dummy.to_vec())
            );
            assert_eq!(
                ex.on_line(b"-ERR [AUTH] Authentication failed.\r\n"),
                Step::Done(Outcome::Refused(
                    b"-ERR [AUTH] Authentication failed.\r\n".to_vec()
                ))
            );
        }
    }

    #[test]
    fn mechanism_not_offered() {
        let (mut ex, _) = Exchange::start(&t(Oauth2Mechanism::Xoauth2), "tok");
        assert!(matches!(
            ex.on_line(b"-ERR Unsupported authentication mechanism.\r\n"),
            Step::Done(Outcome::Unexpected(_))
        ));
    }

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
        let out = authenticate(&mut ours, &t(Oauth2Mechanism::Xoauth2), "tok")
            .await
            .unwrap();
        assert_eq!(out, Outcome::LoggedIn(b"+OK in\r\n".to_vec()));
        let mut rest = [0u8; 4];
        ours.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"NEXT");
        drop(server.await.unwrap());
    }
}
