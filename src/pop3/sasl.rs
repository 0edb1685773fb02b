//! The one decoder of the client's SASL PLAIN and LOGIN messages (RFC 4616, the LOGIN draft),
//! shared by the session tracker (which learns who logs in from what the server is sent) and
//! routing mode's front (which routes on it), so that both read a message the same way. Strict:
//! a message a conforming server would refuse names nobody.

use base64::Engine as _;

/// A client message of a SASL exchange, as sent on its line (without the line end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `*`: the client cancels the exchange (RFC 5034).
    Cancel,
    /// The decoded octets (`=`, an empty initial response, or an empty line: none).
    Data(Vec<u8>),
}

/// Why a SASL message names nobody.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    /// Not base64.
    #[error("invalid base64")]
    Base64,
    /// PLAIN: not `authzid NUL authcid NUL password` with a non-empty authcid.
    #[error("malformed AUTH PLAIN message")]
    MalformedPlain,
    /// LOGIN: an empty user name.
    #[error("empty AUTH LOGIN user name")]
    EmptyLoginName,
}

/// Decode one client message: `*` cancels, `=` or nothing is the empty message, anything
/// else must be standard base64.
pub fn decode(b64: &[u8]) -> Result<Message, SaslError> {
    match b64 {
        b"*" => Ok(Message::Cancel),
        b"" | b"=" => Ok(Message::Data(Vec::new())),
        _ => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map(Message::Data)
            .map_err(|_| SaslError::Base64),
    }
}

/// An AUTH PLAIN message (RFC 4616), borrowing the decoded octets.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Plain<'a> {
    /// The authorization identity (may be empty).
    pub authz: &'a [u8],
    /// The authentication identity (never empty).
    pub authc: &'a [u8],
    /// The password.
    pub password: &'a [u8],
}

impl std::fmt::Debug for Plain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plain")
            .field("authz", &String::from_utf8_lossy(self.authz))
            .field("authc", &String::from_utf8_lossy(self.authc))
            .finish_non_exhaustive()
    }
}

impl<'a> Plain<'a> {
    /// Exactly three NUL-separated parts, the authentication identity not empty.
    pub fn parse(raw: &'a [u8]) -> Result<Plain<'a>, SaslError> {
        let mut parts = raw.split(|&b| b == 0);
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(authz), Some(authc), Some(password), None) if !authc.is_empty() => Ok(Plain {
                authz,
                authc,
                password,
            }),
            _ => Err(SaslError::MalformedPlain),
        }
    }

    /// The user the server logs in: the authorization identity when given, else the
    /// authentication identity.
    pub fn user(&self) -> &'a [u8] {
        if self.authz.is_empty() {
            self.authc
        } else {
            self.authz
        }
    }
}

/// AUTH LOGIN's user name message: any octets but none.
pub fn login_name(raw: &[u8]) -> Result<&[u8], SaslError> {
    if raw.is_empty() {
        Err(SaslError::EmptyLoginName)
    } else {
        Ok(raw)
    }
}

/// A name as text: octets that are not UTF-8 become U+FFFD (the name still names the
/// session, for rules and the audit).
pub fn name_text(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_cancel_empty_and_base64() {
        assert_eq!(decode(b"*"), Ok(Message::Cancel));
        assert_eq!(decode(b"="), Ok(Message::Data(Vec::new())));
        assert_eq!(decode(b""), Ok(Message::Data(Vec::new())));
        assert_eq!(decode(b"YWI="), Ok(Message::Data(b"ab".to_vec())));
        assert_eq!(decode(b"!!"), Err(SaslError::Base64));
    }

    #[test]
    fn plain_takes_authz_over_authc() {
        let p = Plain::parse(b"\0alice\0pw").unwrap();
        assert_eq!((p.user(), p.password), (&b"alice"[..], &b"pw"[..]));
        assert_eq!(Plain::parse(b"bob\0master\0pw").unwrap().user(), b"bob");
        assert!(!format!("{p:?}").contains("pw"));
    }

    /// Where the tracker and the front used to differ: the tracker named `a` in all of
    /// these (its first two parts, whatever followed), the front refused them. A server
    /// refuses them too, so they name nobody.
    #[test]
    fn plain_refuses_what_the_front_refused() {
        for raw in [
            &b"only-one-part"[..],
            b"a\0b",
            b"a\0b\0c\0d",
            b"a\0\0pw",
            b"\0\0pw",
            b"",
        ] {
            assert_eq!(Plain::parse(raw), Err(SaslError::MalformedPlain), "{raw:?}");
        }
    }

    /// The front routed an empty AUTH LOGIN name; the tracker learned none from it.
    #[test]
    fn login_name_is_never_empty() {
        assert_eq!(login_name(b""), Err(SaslError::EmptyLoginName));
        assert_eq!(login_name(b"carol"), Ok(&b"carol"[..]));
        assert_eq!(name_text(b"a\xffb"), "a\u{fffd}b");
    }
}
