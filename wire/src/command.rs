//! Client command lines: framing and parsing (RFC 1939, 2449, 2595, 5034, 6856).
//!
//! Pure functions over byte slices. A parsed [`Command`] borrows the original line, so the relay
//! forwards the exact bytes the client sent unless a rule rewrote them.

use std::fmt;

/// A POP3 command keyword, case-insensitively recognised.
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
    /// `UTF8` (RFC 6856)
    Utf8,
    /// `LANG [tag]` (RFC 6856)
    Lang,
    /// Anything else: its response shape is unknown.
    Unknown,
}

impl Verb {
    /// Every known verb, for indexes and tests.
    pub const ALL: [Verb; 17] = [
        Verb::User,
        Verb::Pass,
        Verb::Apop,
        Verb::Auth,
        Verb::Stls,
        Verb::Capa,
        Verb::Stat,
        Verb::List,
        Verb::Uidl,
        Verb::Retr,
        Verb::Top,
        Verb::Dele,
        Verb::Noop,
        Verb::Rset,
        Verb::Quit,
        Verb::Utf8,
        Verb::Lang,
    ];

    /// Recognise a keyword (case-insensitive).
    pub fn from_keyword(kw: &[u8]) -> Verb {
        let mut up = [0u8; 4];
        if kw.is_empty() || kw.len() > 4 {
            return Verb::Unknown;
        }
        for (d, s) in up.iter_mut().zip(kw) {
            *d = s.to_ascii_uppercase();
        }
        match &up[..kw.len()] {
            b"USER" => Verb::User,
            b"PASS" => Verb::Pass,
            b"APOP" => Verb::Apop,
            b"AUTH" => Verb::Auth,
            b"STLS" => Verb::Stls,
            b"CAPA" => Verb::Capa,
            b"STAT" => Verb::Stat,
            b"LIST" => Verb::List,
            b"UIDL" => Verb::Uidl,
            b"RETR" => Verb::Retr,
            b"TOP" => Verb::Top,
            b"DELE" => Verb::Dele,
            b"NOOP" => Verb::Noop,
            b"RSET" => Verb::Rset,
            b"QUIT" => Verb::Quit,
            b"UTF8" => Verb::Utf8,
            b"LANG" => Verb::Lang,
            _ => Verb::Unknown,
        }
    }

    /// The canonical upper-case keyword (`"UNKNOWN"` for [`Verb::Unknown`]).
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::User => "USER",
            Verb::Pass => "PASS",
            Verb::Apop => "APOP",
            Verb::Auth => "AUTH",
            Verb::Stls => "STLS",
            Verb::Capa => "CAPA",
            Verb::Stat => "STAT",
            Verb::List => "LIST",
            Verb::Uidl => "UIDL",
            Verb::Retr => "RETR",
            Verb::Top => "TOP",
            Verb::Dele => "DELE",
            Verb::Noop => "NOOP",
            Verb::Rset => "RSET",
            Verb::Quit => "QUIT",
            Verb::Utf8 => "UTF8",
            Verb::Lang => "LANG",
            Verb::Unknown => "UNKNOWN",
        }
    }

    /// Whether this verb's arguments may be secret and must never be logged. Unknown commands
    /// count: an X-command may carry credentials, and a SASL answer sent out of turn looks like
    /// an unknown command.
    pub fn has_secret_args(self) -> bool {
        matches!(self, Verb::Pass | Verb::Apop | Verb::Auth | Verb::Unknown)
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a complete command line could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The line was empty (only CRLF).
    #[error("empty command")]
    Empty,
    /// The line contains a NUL or another control byte that no POP3 command carries.
    #[error("control character in command")]
    ControlByte,
    /// A known verb with arguments it cannot have (e.g. `RETR` without a number).
    #[error("invalid arguments for {0}")]
    BadArguments(Verb),
}

/// A parsed command line, borrowing the client's original bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command<'a> {
    /// The recognised verb.
    pub verb: Verb,
    /// The keyword exactly as sent.
    pub keyword: &'a [u8],
    /// Everything after the keyword and its separating space, without the line ending.
    pub args: &'a [u8],
    /// The whole line including its line ending.
    pub raw: &'a [u8],
}

/// Strip a trailing `\n` or `\r\n`.
pub fn trim_eol(line: &[u8]) -> &[u8] {
    let l = line.strip_suffix(b"\n").unwrap_or(line);
    l.strip_suffix(b"\r").unwrap_or(l)
}

/// Find the end of the first complete line in `buf` (index just past its `\n`).
pub fn line_end(buf: &[u8]) -> Option<usize> {
    memchr::memchr(b'\n', buf).map(|i| i + 1)
}

/// Whether `b` separates a keyword from its arguments. Servers differ (Dovecot splits on a
/// space, others on any white space), so popgate accepts both space and TAB: a verb hidden behind
/// a TAB is still recognised, and rules see it.
pub fn is_separator(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Whether `b` may not appear in a command line: C0 controls other than TAB, and DEL. No POP3
/// command carries them, and servers disagree on how they split around them.
fn is_forbidden(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

impl<'a> Command<'a> {
    /// Parse one complete line (including its line ending) as a command.
    ///
    /// Leading spaces and TABs are skipped, and the keyword ends at the first space or TAB, so
    /// `\tPASS secret` and `PASS\tsecret` are PASS commands.
    pub fn parse(raw: &'a [u8]) -> Result<Command<'a>, CommandError> {
        let line = trim_eol(raw);
        if line.iter().any(|&b| is_forbidden(b)) {
            return Err(CommandError::ControlByte);
        }
        let start = line
            .iter()
            .position(|&b| !is_separator(b))
            .unwrap_or(line.len());
        let line = &line[start..];
        if line.is_empty() {
            return Err(CommandError::Empty);
        }
        let (keyword, args) = match line.iter().position(|&b| is_separator(b)) {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &line[line.len()..]),
        };
        let verb = Verb::from_keyword(keyword);
        let cmd = Command {
            verb,
            keyword,
            args,
            raw,
        };
        cmd.check_args()?;
        Ok(cmd)
    }

    /// Arguments split on spaces and TABs (empty pieces skipped).
    pub fn arg_list(&self) -> impl Iterator<Item = &'a [u8]> {
        self.args
            .split(|&b| is_separator(b))
            .filter(|a| !a.is_empty())
    }

    /// The `n`th argument as text, if present and UTF-8.
    pub fn arg_str(&self, n: usize) -> Option<&'a str> {
        self.arg_list()
            .nth(n)
            .and_then(|a| std::str::from_utf8(a).ok())
    }

    /// The first argument as a message number, if it is one.
    pub fn msg_number(&self) -> Option<u32> {
        self.arg_str(0).and_then(|s| s.parse().ok())
    }

    /// Whether the command has any argument.
    pub fn has_args(&self) -> bool {
        self.arg_list().next().is_some()
    }

    fn check_args(&self) -> Result<(), CommandError> {
        let n = self.arg_list().count();
        let numeric = |i: usize| {
            self.arg_str(i)
                .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        };
        let ok = match self.verb {
            Verb::Stls | Verb::Capa | Verb::Stat | Verb::Noop | Verb::Rset | Verb::Quit => n == 0,
            Verb::Utf8 => n == 0,
            Verb::Retr | Verb::Dele => n == 1 && numeric(0),
            Verb::Top => n == 2 && numeric(0) && numeric(1),
            Verb::List | Verb::Uidl => n == 0 || (n == 1 && numeric(0)),
            Verb::User | Verb::Pass => n >= 1,
            Verb::Apop => n == 2,
            Verb::Auth => n <= 2,
            Verb::Lang => n <= 1,
            Verb::Unknown => true,
        };
        if ok {
            Ok(())
        } else {
            Err(CommandError::BadArguments(self.verb))
        }
    }

    /// The line with secret arguments replaced by `***` and control characters escaped, for
    /// logs.
    pub fn redacted(&self) -> String {
        let kw = crate::printable(self.keyword);
        match self.verb {
            Verb::Pass => format!("{kw} ***"),
            Verb::Apop => match self.arg_str(0) {
                Some(user) => format!("{kw} {user} ***"),
                None => format!("{kw} ***"),
            },
            Verb::Auth => match (self.arg_str(0), self.arg_list().nth(1)) {
                (Some(mech), Some(_)) => format!("{kw} {mech} ***"),
                (Some(mech), None) => format!("{kw} {mech}"),
                _ => kw,
            },
            // A keyword that cannot be one (not 3-4 letters) may itself be a secret, e.g. a
            // base64 SASL answer sent after the exchange ended.
            Verb::Unknown
                if !(3..=4).contains(&self.keyword.len())
                    || !self.keyword.iter().all(u8::is_ascii_alphabetic) =>
            {
                "***".into()
            }
            Verb::Unknown if self.has_args() => format!("{kw} ***"),
            _ => crate::printable(trim_eol(self.raw)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_verbs_case_insensitively() {
        let c = Command::parse(b"retr 12\r\n").unwrap();
        assert_eq!(c.verb, Verb::Retr);
        assert_eq!(c.msg_number(), Some(12));
        assert_eq!(c.raw, b"retr 12\r\n");
        assert_eq!(Command::parse(b"Top 1 0\n").unwrap().verb, Verb::Top);
        assert_eq!(Command::parse(b"XTND X\r\n").unwrap().verb, Verb::Unknown);
        for v in Verb::ALL {
            let line = format!("{}\r\n", v.as_str().to_lowercase());
            assert_eq!(Verb::from_keyword(trim_eol(line.as_bytes())), v);
        }
    }

    #[test]
    fn rejects_bad_arguments() {
        assert_eq!(
            Command::parse(b"RETR\r\n"),
            Err(CommandError::BadArguments(Verb::Retr))
        );
        assert_eq!(
            Command::parse(b"RETR x\r\n"),
            Err(CommandError::BadArguments(Verb::Retr))
        );
        assert_eq!(
            Command::parse(b"TOP 1\r\n"),
            Err(CommandError::BadArguments(Verb::Top))
        );
        assert_eq!(
            Command::parse(b"STAT 1\r\n"),
            Err(CommandError::BadArguments(Verb::Stat))
        );
        assert_eq!(Command::parse(b"\r\n"), Err(CommandError::Empty));
        assert_eq!(
            Command::parse(b"US\0ER x\r\n"),
            Err(CommandError::ControlByte)
        );
        assert_eq!(
            Command::parse(b"NOOP\rX\r\n"),
            Err(CommandError::ControlByte)
        );
    }

    #[test]
    fn list_and_uidl_optional_number() {
        assert!(!Command::parse(b"LIST\r\n").unwrap().has_args());
        assert!(Command::parse(b"UIDL 3\r\n").unwrap().has_args());
    }

    #[test]
    fn redacts_secrets() {
        assert_eq!(
            Command::parse(b"PASS hunter2\r\n").unwrap().redacted(),
            "PASS ***"
        );
        assert_eq!(
            Command::parse(b"APOP bob c4c9334bac560ecc979e58001b3e22fb\r\n")
                .unwrap()
                .redacted(),
            "APOP bob ***"
        );
        assert_eq!(
            Command::parse(b"AUTH PLAIN AGJvYgBzZWNyZXQ=\r\n")
                .unwrap()
                .redacted(),
            "AUTH PLAIN ***"
        );
        assert_eq!(
            Command::parse(b"USER bob\r\n").unwrap().redacted(),
            "USER bob"
        );
        let b64 = Command::parse(b"AGJvYgBzM2NyZXQ=\r\n").unwrap();
        assert_eq!(b64.verb, Verb::Unknown);
        assert_eq!(b64.redacted(), "***");
        assert_eq!(Command::parse(b"PASSword\r\n").unwrap().redacted(), "***");
        assert_eq!(
            Command::parse(b"XAUT tok\r\n").unwrap().redacted(),
            "XAUT ***"
        );
        assert_eq!(Command::parse(b"XYZ\r\n").unwrap().redacted(), "XYZ");
    }
}
