//! The OAuth2 bearer login (`AUTH XOAUTH2` / `AUTH OAUTHBEARER`): the messages. The
//! exchange's steps are the dialogue's ([`super::Dialogue`]).
//!
//! Always `AUTH <MECH>\r\n` first and the token on the continuation line, never an initial
//! response on the command line: RFC 5034 limits that to 255 octets, which real tokens exceed.
//! A server that refuses the token answers `+ <base64 JSON>` first (Google's and Microsoft's
//! XOAUTH2, RFC 7628 OAUTHBEARER); the client must answer that with a dummy response (an empty
//! line for XOAUTH2, `\x01` for OAUTHBEARER) and then gets the `-ERR`.

use base64::Engine as _;

use crate::config::Oauth2Mechanism;

/// Longest server line read during the exchange (Dovecot's error JSON is far shorter).
pub(crate) const MAX_LINE: usize = 8192;

/// Whom to log in upstream with a bearer token, and the token. Its `Debug` never shows the
/// token.
#[derive(Clone)]
pub(crate) struct Bearer {
    /// The mechanism.
    pub(crate) mechanism: Oauth2Mechanism,
    /// The upstream mailbox (authorization identity).
    pub(crate) mailbox: String,
    /// The upstream host and port (OAUTHBEARER's `host=` and `port=`).
    pub(crate) host: String,
    /// See `host`.
    pub(crate) port: u16,
    /// The access token.
    pub(crate) token: String,
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bearer")
            .field("mechanism", &self.mechanism)
            .field("mailbox", &self.mailbox)
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Bearer {
    /// `AUTH <MECH>\r\n`.
    pub(crate) fn command(&self) -> &'static [u8] {
        match self.mechanism {
            Oauth2Mechanism::Xoauth2 => b"AUTH XOAUTH2\r\n",
            Oauth2Mechanism::Oauthbearer => b"AUTH OAUTHBEARER\r\n",
        }
    }

    /// The client's response with the token, base64-encoded, with CRLF.
    pub(crate) fn response(&self) -> Vec<u8> {
        let raw = match self.mechanism {
            Oauth2Mechanism::Xoauth2 => {
                format!(
                    "user={}\x01auth=Bearer {}\x01\x01",
                    self.mailbox, self.token
                )
            }
            Oauth2Mechanism::Oauthbearer => format!(
                "n,a={},\x01host={}\x01port={}\x01auth=Bearer {}\x01\x01",
                gs2_escape(&self.mailbox),
                self.host,
                self.port,
                self.token
            ),
        };
        let mut line = base64::engine::general_purpose::STANDARD
            .encode(raw)
            .into_bytes();
        line.extend_from_slice(b"\r\n");
        line
    }

    /// The answer to an error challenge: the server's `-ERR` follows it.
    pub(crate) fn dummy(&self) -> &'static [u8] {
        match self.mechanism {
            Oauth2Mechanism::Xoauth2 => b"\r\n",
            Oauth2Mechanism::Oauthbearer => b"AQ==\r\n",
        }
    }
}

/// RFC 5801 saslname: `,` and `=` escaped.
fn gs2_escape(name: &str) -> String {
    name.replace('=', "=3D").replace(',', "=2C")
}
