//! Server responses: status lines (`+OK`, `-ERR`, SASL `+ `) and the multi-line body scanner.
//!
//! Pure code over byte slices. The [`BodyScanner`] finds the `CRLF.CRLF` terminator across
//! arbitrary chunk boundaries without buffering the body, so bodies can be streamed.

use crate::command::trim_eol;

/// The status indicator of a response line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// `+OK`
    Ok,
    /// `-ERR`
    Err,
    /// `+ ` SASL continuation (RFC 5034), only valid during an AUTH exchange.
    Continue,
}

impl Status {
    /// `"+OK"`, `"-ERR"` or `"+"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "+OK",
            Status::Err => "-ERR",
            Status::Continue => "+",
        }
    }
}

/// Why a server line is not a POP3 status line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// Neither `+OK`, `-ERR` nor `+ `.
    #[error("not a POP3 status line")]
    NotStatus,
}

/// A parsed status line, borrowing the server's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusLine<'a> {
    /// `+OK`, `-ERR` or continuation.
    pub status: Status,
    /// Response code inside the brackets (`SYS/TEMP`, `AUTH`, `IN-USE`, ...), if any.
    pub code: Option<&'a [u8]>,
    /// Text after the status indicator (and after the response code), without line ending.
    pub text: &'a [u8],
    /// The whole line including the line ending.
    pub raw: &'a [u8],
}

fn starts_with_ci(line: &[u8], prefix: &[u8]) -> bool {
    line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix)
}

impl<'a> StatusLine<'a> {
    /// Parse one complete line (including its line ending).
    pub fn parse(raw: &'a [u8]) -> Result<StatusLine<'a>, ResponseError> {
        let line = trim_eol(raw);
        let (status, rest) = if starts_with_ci(line, b"+OK") {
            (Status::Ok, &line[3..])
        } else if starts_with_ci(line, b"-ERR") {
            (Status::Err, &line[4..])
        } else if line.first() == Some(&b'+') {
            (Status::Continue, &line[1..])
        } else {
            return Err(ResponseError::NotStatus);
        };
        // The indicator must stand alone: "+OKAY" or "-ERROR" are not status lines.
        let rest = match rest.first() {
            None => rest,
            Some(b' ') => &rest[1..],
            Some(_) if status != Status::Continue => return Err(ResponseError::NotStatus),
            Some(_) => rest,
        };
        let (code, text) = match rest.strip_prefix(b"[") {
            Some(inner) => match memchr::memchr(b']', inner) {
                Some(end) => {
                    let text = &inner[end + 1..];
                    (Some(&inner[..end]), text.strip_prefix(b" ").unwrap_or(text))
                }
                None => (None, rest),
            },
            None => (None, rest),
        };
        Ok(StatusLine {
            status,
            code,
            text,
            raw,
        })
    }
}

/// Where the scanner stands relative to the current body line.
/// The start of a line that begins with a dot: the only place a terminator (or stuffing) can be.
static LF_DOT: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\n."));

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScanState {
    LineStart,
    MidLine,
    Dot,
    DotCr,
}

/// What a [`BodyScanner`] found in a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// The terminator ends at `chunk[..n]`.
    End(usize),
    /// The whole chunk is body. Its last `held` bytes (`.` or `.\r` at the start of a line)
    /// may be the start of the terminator: what follows decides.
    More {
        /// Bytes at the end of this chunk that could start the terminator.
        held: usize,
    },
    /// A `.` line ended by a bare LF, starting at `chunk[at..]` (`at` is 0 when it began in
    /// an earlier chunk): no terminator for a strict client (curl waits for `CRLF.CRLF`), the
    /// end for a lenient one (poplib). The body cannot be relayed safely past `at`.
    BareLfEnd {
        /// Where the `.` line starts in this chunk.
        at: usize,
    },
}

/// Finds the end of a multi-line body (`.` alone on a line, ended by CRLF) in a stream of
/// chunks.
///
/// Starts positioned at the beginning of the first body line (just after the status line).
/// Dot-stuffed lines (`..text`) are body, not terminators. A `.` line ended by a bare LF is
/// reported as [`Scan::BareLfEnd`]: clients disagree about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyScanner {
    state: ScanState,
}

impl Default for BodyScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl BodyScanner {
    /// A scanner at the start of a body.
    pub fn new() -> Self {
        BodyScanner {
            state: ScanState::LineStart,
        }
    }

    /// Scan the next chunk.
    pub fn scan(&mut self, chunk: &[u8]) -> Scan {
        let mut i = 0;
        // Where a possible terminator started in this chunk.
        let mut dot_at: Option<usize> = None;
        let more = |state: ScanState, dot_at: Option<usize>| Scan::More {
            held: match (state, dot_at) {
                (ScanState::Dot | ScanState::DotCr, Some(at)) => chunk.len() - at,
                // Begun in an earlier chunk: all of this one belongs to it.
                (ScanState::Dot | ScanState::DotCr, None) => chunk.len(),
                _ => 0,
            },
        };
        loop {
            match self.state {
                // Only lines that start with `.` matter: jump from one `\n.` to the next
                // instead of visiting every line (one SIMD search per chunk in a plain body).
                ScanState::MidLine => match LF_DOT.find(&chunk[i..]) {
                    Some(p) => {
                        i += p + 1;
                        self.state = ScanState::LineStart;
                    }
                    None => {
                        if chunk[i..].last() == Some(&b'\n') {
                            self.state = ScanState::LineStart;
                        }
                        return more(self.state, dot_at);
                    }
                },
                ScanState::LineStart => {
                    let Some(&b) = chunk.get(i) else {
                        return more(self.state, dot_at);
                    };
                    if b == b'.' {
                        dot_at = Some(i);
                        i += 1;
                        self.state = ScanState::Dot;
                    } else {
                        self.state = ScanState::MidLine;
                    }
                }
                ScanState::Dot => {
                    let Some(&b) = chunk.get(i) else {
                        return more(self.state, dot_at);
                    };
                    match b {
                        b'\r' => {
                            i += 1;
                            self.state = ScanState::DotCr;
                        }
                        b'\n' => {
                            self.state = ScanState::LineStart;
                            return Scan::BareLfEnd {
                                at: dot_at.unwrap_or(0),
                            };
                        }
                        _ => self.state = ScanState::MidLine,
                    }
                }
                ScanState::DotCr => {
                    let Some(&b) = chunk.get(i) else {
                        return more(self.state, dot_at);
                    };
                    if b == b'\n' {
                        self.state = ScanState::LineStart;
                        return Scan::End(i + 1);
                    }
                    self.state = ScanState::MidLine;
                }
            }
        }
    }
}

/// One complete line of a multi-line body (line end included or not) as the message has it:
/// `None` for the terminator (`.` alone), otherwise the line without its line end and without
/// the stuffing `.` (RFC 1939: a line that starts with `.` has one removed). The framing itself
/// (where a streamed body ends) is [`BodyScanner`]'s; this is for consumers that look into
/// bodies line by line (CAPA items, UIDL listings, transcripts).
pub fn body_line(line: &[u8]) -> Option<&[u8]> {
    let content = trim_eol(line);
    match content.strip_prefix(b".") {
        Some(b"") => None,
        Some(rest) => Some(rest),
        None => Some(content),
    }
}

/// `body` with a `.` put before every line that starts with `.` (RFC 1939 byte-stuffing): the
/// bytes of a multi-line body between the status line and the terminator. Line ends are kept
/// as they are; no terminator is added.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
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
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn status_lines() {
        let s = StatusLine::parse(b"+OK 2 320\r\n").unwrap();
        assert_eq!(
            (s.status, s.text, s.code),
            (Status::Ok, &b"2 320"[..], None)
        );
        let s = StatusLine::parse(b"-ERR [SYS/TEMP] try later\r\n").unwrap();
        assert_eq!(s.status, Status::Err);
        assert_eq!(s.code, Some(&b"SYS/TEMP"[..]));
        assert_eq!(s.text, b"try later");
        assert_eq!(StatusLine::parse(b"+OK\r\n").unwrap().text, b"");
        assert_eq!(StatusLine::parse(b"+ok\n").unwrap().status, Status::Ok);
        let c = StatusLine::parse(b"+ VXNlcm5hbWU6\r\n").unwrap();
        assert_eq!((c.status, c.text), (Status::Continue, &b"VXNlcm5hbWU6"[..]));
        assert_eq!(
            StatusLine::parse(b"+\r\n").unwrap().status,
            Status::Continue
        );
        assert!(StatusLine::parse(b"GARBAGE\r\n").is_err());
        assert!(StatusLine::parse(b"-ERROR x\r\n").is_err());
        assert!(StatusLine::parse(b"+OKAY\r\n").is_err());
        assert!(StatusLine::parse(b"\r\n").is_err());
    }

    #[test]
    fn body_lines_are_unstuffed() {
        assert_eq!(body_line(b".\r\n"), None);
        assert_eq!(body_line(b".\n"), None);
        assert_eq!(body_line(b"..\r\n"), Some(&b"."[..]));
        assert_eq!(body_line(b"..x\r\n"), Some(&b".x"[..]));
        assert_eq!(body_line(b"x.\r\n"), Some(&b"x."[..]));
        assert_eq!(body_line(b"\r\n"), Some(&b""[..]));
        // Every stuffed line comes back as it was.
        for line in [&b"."[..], b"..", b".x", b"x", b""] {
            let mut wire = dot_stuff(line);
            wire.extend_from_slice(b"\r\n");
            assert_eq!(body_line(&wire), Some(line));
        }
    }

    #[test]
    fn dot_stuffing() {
        assert_eq!(dot_stuff(b""), b"");
        assert_eq!(
            dot_stuff(b".a\r\nb\r\n.\r\n..c\r\nd.e\r\n.no-eol"),
            b"..a\r\nb\r\n..\r\n...c\r\nd.e\r\n..no-eol"
        );
        // Bare LF line ends count as line ends too.
        assert_eq!(dot_stuff(b"x\n.y\n"), b"x\n..y\n");
        // The stuffed body plus the terminator scans to its very end.
        let body = b".\r\n.\r\nx\r\n";
        let mut wire = dot_stuff(body);
        wire.extend_from_slice(b".\r\n");
        assert_eq!(BodyScanner::new().scan(&wire), Scan::End(wire.len()));
    }

    /// The end found scanning `body` cut at `splits`; `Some(usize::MAX)` for a bare-LF end.
    fn scan_all(body: &[u8], splits: &[usize]) -> Option<usize> {
        let mut sc = BodyScanner::new();
        let mut start = 0;
        let mut cuts: Vec<usize> = splits.iter().map(|s| s % (body.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.push(body.len());
        for cut in cuts {
            if cut < start {
                continue;
            }
            match sc.scan(&body[start..cut]) {
                Scan::End(n) => return Some(start + n),
                Scan::BareLfEnd { .. } => return Some(usize::MAX),
                Scan::More { held } => assert!(held <= cut - start && held <= 2),
            }
            start = cut;
        }
        None
    }

    #[test]
    fn finds_terminator() {
        let body = b"line 1\r\n..stuffed\r\n.\r\nNEXT";
        assert_eq!(scan_all(body, &[]), Some(body.len() - 4));
        assert_eq!(scan_all(b".\r\n", &[]), Some(3));
        assert_eq!(scan_all(b"a\r\n.x\r\n.\r", &[]), None);
        assert_eq!(scan_all(b"a\n.\n", &[]), Some(usize::MAX));
        assert_eq!(scan_all(b"a\r\n.\r\n", &[1, 4]), Some(6));
        assert_eq!(scan_all(b"a\r\n.\rb\r\n.\r\n", &[]), Some(11));
    }

    #[test]
    fn every_split_position_agrees() {
        let body = b"From: a\r\n\r\n.. dot\r\n.\r\r\n..\r\nx.\r\n.\r\n+OK next\r\n";
        let want = scan_all(body, &[]);
        assert_eq!(want, Some(body.len() - 10));
        for size in 1..=body.len() {
            let cuts: Vec<usize> = (1..body.len() / size + 1).map(|k| k * size).collect();
            assert_eq!(scan_all(body, &cuts), want, "chunk size {size}");
        }
    }

    #[test]
    fn holds_back_a_possible_terminator() {
        let mut sc = BodyScanner::new();
        assert_eq!(sc.scan(b"abc\r\n."), Scan::More { held: 1 });
        let mut sc = BodyScanner::new();
        assert_eq!(sc.scan(b"abc\r\n.\r"), Scan::More { held: 2 });
        let mut sc = BodyScanner::new();
        assert_eq!(sc.scan(b"abc\r\n..x"), Scan::More { held: 0 });
        assert_eq!(sc.scan(b"\r"), Scan::More { held: 0 });
        // A prefix begun in an earlier chunk is not this chunk's to hold.
        let mut sc = BodyScanner::new();
        assert_eq!(sc.scan(b"x\r\n."), Scan::More { held: 1 });
        assert_eq!(sc.scan(b"\r"), Scan::More { held: 1 });
        assert_eq!(sc.scan(b"\n"), Scan::End(1));
    }

    proptest! {
        #[test]
        fn random_splits_agree(lines in proptest::collection::vec("[.a-c\r]{0,6}", 0..20),
                               splits in proptest::collection::vec(0usize..400, 0..10)) {
            let mut body = Vec::new();
            for l in &lines {
                // dot-stuff like a server would
                let l = l.replace('\r', "");
                if l.starts_with('.') { body.push(b'.'); }
                body.extend_from_slice(l.as_bytes());
                body.extend_from_slice(b"\r\n");
            }
            let end = body.len() + 3;
            body.extend_from_slice(b".\r\ntrailing");
            prop_assert_eq!(scan_all(&body, &[]), Some(end));
            prop_assert_eq!(scan_all(&body, &splits), Some(end));
        }
    }
}
