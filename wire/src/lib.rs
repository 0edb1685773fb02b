//! The POP3 wire format, shared by popgate and its demo server: command lines (parsing and
//! the redaction every log and transcript uses), status lines, and multi-line body framing
//! (the streaming terminator scanner and dot-stuffing). Pure code over byte slices, no I/O.

pub mod command;
pub mod response;

use std::fmt::Write as _;

/// `bytes` as text safe for a terminal or a log: invalid UTF-8 replaced, and control characters
/// (C0 other than TAB, DEL, C1) written as `\xNN`, so a client cannot send escape sequences to
/// whoever reads the log.
pub fn printable(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            // Writing to a String cannot fail.
            let _ = write!(out, "\\x{:02x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    #[test]
    fn printable_escapes_controls() {
        assert_eq!(
            super::printable(b"a\x1b[31mb\x07\x7f\tc"),
            "a\\x1b[31mb\\x07\\x7f\tc"
        );
        assert_eq!(super::printable("x\u{9b}y".as_bytes()), "x\\x9by");
        assert_eq!(super::printable(b"\xff"), "\u{fffd}");
    }
}
