//! The server's own command-line parser: just what an RFC 1939 server needs to dispatch.
//!
//! Deliberately independent of popgate's parser (this crate must not depend on the proxy): a real
//! server has its own, so the proxy is tested against a second reading of the RFC.

use std::fmt;

/// A POP3 command keyword the server knows, case-insensitively recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    /// `USER name`
    User,
    /// `PASS secret`
    Pass,
    /// `APOP name digest`
    Apop,
    /// `AUTH [mechanism [initial-response]]` (RFC 5034)
    Auth,
    /// `STLS` (RFC 2595)
    Stls,
    /// `CAPA` (RFC 2449)
    Capa,
    /// `STAT`
    Stat,
    /// `LIST [n]`
    List,
    /// `UIDL [n]`
    Uidl,
    /// `RETR n`
    Retr,
    /// `TOP n lines`
    Top,
    /// `DELE n`
    Dele,
    /// `NOOP`
    Noop,
    /// `RSET`
    Rset,
    /// `QUIT`
    Quit,
    /// Anything else (answered `-ERR unknown command`).
    Unknown,
}

impl Verb {
    /// Recognise a keyword (case-insensitive).
    pub fn from_keyword(kw: &[u8]) -> Verb {
        const VERBS: [(&str, Verb); 15] = [
            ("USER", Verb::User),
            ("PASS", Verb::Pass),
            ("APOP", Verb::Apop),
            ("AUTH", Verb::Auth),
            ("STLS", Verb::Stls),
            ("CAPA", Verb::Capa),
            ("STAT", Verb::Stat),
            ("LIST", Verb::List),
            ("UIDL", Verb::Uidl),
            ("RETR", Verb::Retr),
            ("TOP", Verb::Top),
            ("DELE", Verb::Dele),
            ("NOOP", Verb::Noop),
            ("RSET", Verb::Rset),
            ("QUIT", Verb::Quit),
        ];
        VERBS
            .iter()
            .find(|(name, _)| name.as_bytes().eq_ignore_ascii_case(kw))
            .map_or(Verb::Unknown, |&(_, verb)| verb)
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = format!("{self:?}").to_ascii_uppercase();
        f.write_str(&name)
    }
}

/// Why a command line was refused (the text goes after `-ERR `).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CommandError {
    #[error("empty command")]
    Empty,
    #[error("control character in command")]
    ControlByte,
    #[error("invalid arguments for {0}")]
    BadArguments(Verb),
}

/// A parsed command line, borrowing the client's bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Command<'a> {
    pub(crate) verb: Verb,
    /// Everything after the keyword and its separator, without the line end.
    pub(crate) args: &'a [u8],
}

/// Strip a trailing `\n` or `\r\n`.
pub(crate) fn trim_eol(line: &[u8]) -> &[u8] {
    let l = line.strip_suffix(b"\n").unwrap_or(line);
    l.strip_suffix(b"\r").unwrap_or(l)
}

/// The index just past the first `\n` in `buf`, if there is one.
pub(crate) fn line_end(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n').map(|i| i + 1)
}

/// Space and TAB both separate words (servers differ; accepting both is the lenient choice).
fn is_separator(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

impl<'a> Command<'a> {
    /// Parse one complete line (line end included or not).
    pub(crate) fn parse(raw: &'a [u8]) -> Result<Command<'a>, CommandError> {
        let line = trim_eol(raw);
        if line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(CommandError::ControlByte);
        }
        let start = line
            .iter()
            .position(|&b| !is_separator(b))
            .ok_or(CommandError::Empty)?;
        let line = &line[start..];
        let (keyword, args) = match line.iter().position(|&b| is_separator(b)) {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &line[line.len()..]),
        };
        let cmd = Command {
            verb: Verb::from_keyword(keyword),
            args,
        };
        if cmd.args_fit() {
            Ok(cmd)
        } else {
            Err(CommandError::BadArguments(cmd.verb))
        }
    }

    /// Arguments split on spaces and TABs (empty pieces skipped).
    pub(crate) fn arg_list(&self) -> impl Iterator<Item = &'a [u8]> {
        self.args
            .split(|&b| is_separator(b))
            .filter(|a| !a.is_empty())
    }

    /// The `n`th argument as text, if present and UTF-8.
    pub(crate) fn arg_str(&self, n: usize) -> Option<&'a str> {
        self.arg_list()
            .nth(n)
            .and_then(|a| std::str::from_utf8(a).ok())
    }

    /// The first argument as a message number, if it is one.
    pub(crate) fn msg_number(&self) -> Option<u32> {
        self.arg_str(0).and_then(|s| s.parse().ok())
    }

    /// Whether the command has any argument.
    pub(crate) fn has_args(&self) -> bool {
        self.arg_list().next().is_some()
    }

    /// Whether the argument count (and numeric arguments) suit the verb.
    fn args_fit(&self) -> bool {
        let n = self.arg_list().count();
        let numeric = |i: usize| {
            self.arg_str(i)
                .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        };
        match self.verb {
            Verb::Stls | Verb::Capa | Verb::Stat | Verb::Noop | Verb::Rset | Verb::Quit => n == 0,
            Verb::Retr | Verb::Dele => n == 1 && numeric(0),
            Verb::Top => n == 2 && numeric(0) && numeric(1),
            Verb::List | Verb::Uidl => n == 0 || (n == 1 && numeric(0)),
            Verb::User | Verb::Pass => n >= 1,
            Verb::Apop => n == 2,
            Verb::Auth => n <= 2,
            Verb::Unknown => true,
        }
    }
}

/// `body` with a `.` added before every line that starts with one (RFC 1939 byte-stuffing).
pub(crate) fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 1);
    let mut at_line_start = true;
    for &b in body {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_the_rfc() {
        let c = Command::parse(b"\tretr 12\r\n").unwrap();
        assert_eq!((c.verb, c.msg_number()), (Verb::Retr, Some(12)));
        let c = Command::parse(b"TOP\t1 5\n").unwrap();
        assert_eq!((c.verb, c.arg_str(1)), (Verb::Top, Some("5")));
        assert_eq!(Command::parse(b"UTF8\r\n").unwrap().verb, Verb::Unknown);
        assert_eq!(Command::parse(b" \r\n").unwrap_err(), CommandError::Empty);
        assert_eq!(
            Command::parse(b"USER a\0b\r\n").unwrap_err(),
            CommandError::ControlByte
        );
        assert_eq!(
            Command::parse(b"RETR x\r\n").unwrap_err().to_string(),
            "invalid arguments for RETR"
        );
        assert!(!Command::parse(b"LIST\r\n").unwrap().has_args());
        assert_eq!(dot_stuff(b".a\r\nb.\r\n.\r\n"), b"..a\r\nb.\r\n..\r\n");
    }
}
