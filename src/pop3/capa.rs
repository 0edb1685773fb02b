//! Capability lists (RFC 2449 CAPA): split into items and rebuild after rewriting.

/// The items of a CAPA body (bytes after the status line, terminator included or not), each
/// without its line ending. Dot-stuffed items are unstuffed.
pub fn items(body: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    for line in body.split_inclusive(|&b| b == b'\n') {
        let Some(item) = crate::pop3::response::body_line(line) else {
            break;
        };
        if !item.is_empty() {
            out.push(item);
        }
    }
    out
}

/// The capability keyword of an item (`SASL` in `SASL PLAIN LOGIN`), upper-cased.
pub fn keyword(item: &[u8]) -> String {
    let kw = item.split(|&b| b == b' ').next().unwrap_or_default();
    String::from_utf8_lossy(kw).to_ascii_uppercase()
}

/// `item` with only the SASL mechanisms `keep` accepts, if it is a `SASL` item; `None` when
/// none is left. Other items come back unchanged.
pub fn retain_sasl(item: Vec<u8>, keep: impl Fn(&str) -> bool) -> Option<Vec<u8>> {
    if keyword(&item) != "SASL" {
        return Some(item);
    }
    let mechs: Vec<&[u8]> = item
        .split(u8::is_ascii_whitespace)
        .skip(1)
        .filter(|m| !m.is_empty() && std::str::from_utf8(m).is_ok_and(&keep))
        .collect();
    if mechs.is_empty() {
        return None;
    }
    Some([&b"SASL "[..], &mechs.join(&b' ')].concat())
}

/// A complete CAPA response: `status` (with its line ending), the items, and the terminator.
pub fn build<'a>(status: &[u8], items: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = status.to_vec();
    for item in items {
        if item.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(item);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// What a greeting starts with when Dovecot trusts the connecting address to pass on the real
/// client's (`login_trusted_networks`): `+OK [XCLIENT] Dovecot ready.`
const XCLIENT_GREETING: &[u8] = b"+OK [XCLIENT]";

/// Whether a greeting offers Dovecot's `XCLIENT` command.
pub(crate) fn offers_xclient(greeting: &[u8]) -> bool {
    greeting.starts_with(XCLIENT_GREETING)
}

/// The greeting without its `[XCLIENT]` marker, if it has one: clients never see a command they
/// may not use (`+OK [XCLIENT] Dovecot ready.` becomes `+OK Dovecot ready.`).
pub(crate) fn hide_xclient(greeting: &[u8]) -> Option<Vec<u8>> {
    let rest = greeting.strip_prefix(XCLIENT_GREETING)?;
    let mut out = b"+OK".to_vec();
    out.extend_from_slice(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn xclient_marker_is_hidden_from_the_greeting() {
        let g = b"+OK [XCLIENT] Dovecot ready. <1.2@host>\r\n";
        assert!(super::offers_xclient(g));
        assert_eq!(
            super::hide_xclient(g).unwrap(),
            b"+OK Dovecot ready. <1.2@host>\r\n"
        );
        assert_eq!(
            super::hide_xclient(b"+OK [XCLIENT]\r\n").unwrap(),
            b"+OK\r\n"
        );
        assert!(super::hide_xclient(b"+OK Dovecot ready.\r\n").is_none());
        assert!(!super::offers_xclient(b"-ERR [XCLIENT]\r\n"));
    }
    #[test]
    fn retain_sasl_keeps_only_accepted_mechanisms() {
        let keep = |m: &str| m == "PLAIN" || m == "CRAM-MD5";
        assert_eq!(
            super::retain_sasl(b"SASL PLAIN GSSAPI CRAM-MD5".to_vec(), keep),
            Some(b"SASL PLAIN CRAM-MD5".to_vec())
        );
        assert_eq!(super::retain_sasl(b"sasl GSSAPI".to_vec(), keep), None);
        assert_eq!(
            super::retain_sasl(b"USER".to_vec(), keep),
            Some(b"USER".to_vec())
        );
    }

    use super::*;

    #[test]
    fn split_and_rebuild() {
        let body = b"TOP\r\nUSER\r\nSASL PLAIN LOGIN\r\nSTLS\r\n.\r\n";
        let it = items(body);
        assert_eq!(it, vec![&b"TOP"[..], b"USER", b"SASL PLAIN LOGIN", b"STLS"]);
        assert_eq!(keyword(it[2]), "SASL");
        assert_eq!(keyword(b"stls"), "STLS");
        let kept: Vec<&[u8]> = it.into_iter().filter(|i| keyword(i) != "STLS").collect();
        assert_eq!(
            build(b"+OK\r\n", kept),
            b"+OK\r\nTOP\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"
        );
        assert_eq!(build(b"+OK\r\n", [&b".X"[..]]), b"+OK\r\n..X\r\n.\r\n");
        assert_eq!(items(b"..X\n.\n"), vec![&b".X"[..]]);
    }
}
