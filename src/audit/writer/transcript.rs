//! Per-session traffic transcripts: the dialogue as `C:`/`S:` lines with timestamps.
//!
//! A debugging aid, enabled per listener or client network (`[audit.transcript]`) or by a
//! rule. Each transcribed session gets its own file; a session without a transcript pays one
//! pointer. Writes are buffered std I/O on the session's thread (transcripts are for
//! debugging, not for production volume); an I/O error is logged once and switches the
//! transcript off, never a panic.
//!
//! [`reopen_all`] (SIGUSR1) makes every open transcript continue in a file opened again at its
//! path before its next line.
//!
//! Line format: `2026-03-01T09:15:02.118Z C: USER bob`. Line endings are not shown; a line
//! that ended in a bare LF gets ` [LF]`; control characters appear as `\xNN`; 8-bit bytes are
//! decoded lossily. `*:` lines are popgate's own notes; `S+` continues an overlong body line.
//!
//! Secrets: [`Transcript::client_line`] runs every command line through
//! [`redact_command_line`], so `PASS`, `APOP` and `AUTH` initial responses never reach the
//! file. SASL continuation lines are not commands: the caller writes them with
//! [`Transcript::client_sasl`] (`C: ***`).
//!
//! Bodies: in summary mode the first `summary_lines` lines are written, then
//! `S: [... N octets]` for the octets not shown, then `S: .`; with `full_bodies` every line is
//! written as sent (still dot-stuffed).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use crate::audit::model::config::TranscriptConfig;
use crate::audit::model::redact::{display, display_raw, redact_command};

/// Body lines longer than this are written in pieces (`S+` lines) in full mode.
const FULL_LINE_PIECE: usize = 8 * 1024;
/// Body lines shown in summary mode are cut here.
const SUMMARY_LINE_MAX: usize = 200;

/// Bumped by [`reopen_all`]; each transcript compares it with the value it opened its file
/// at before writing a line.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Make every open transcript reopen its file at its path before its next line (SIGUSR1: a
/// file moved away by logrotate is let go and a fresh one started). Process-wide.
pub(crate) fn reopen_all() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// A transcript file of one session, or nothing (disabled or failed).
#[derive(Debug, Default)]
pub struct Transcript {
    inner: Option<Box<Inner>>,
}

#[derive(Debug)]
struct Inner {
    out: BufWriter<File>,
    path: PathBuf,
    /// [`GENERATION`] when `out` was opened.
    generation: u64,
    full_bodies: bool,
    summary_lines: usize,
    body: Option<Body>,
}

/// Where a streamed body stands.
#[derive(Debug, Default)]
struct Body {
    /// The current line so far: kept while it is being shown, otherwise only its first
    /// three octets (enough to recognise the terminator).
    line: Vec<u8>,
    /// Octets of the current line so far.
    line_len: usize,
    /// Whether part of the current (overlong) line has been written already.
    continued: bool,
    /// Lines written so far.
    shown: usize,
    /// Octets not shown.
    omitted: u64,
}

impl Transcript {
    /// No transcript: every method is a no-op.
    pub(crate) fn disabled() -> Transcript {
        Transcript { inner: None }
    }

    /// Open `{dir}/{time}-s{session}-{client ip}-{port}.log` (mode 0600) and write a header
    /// note. Any failure is logged and yields a disabled transcript; so does a config without
    /// `dir`.
    pub(crate) fn open(
        config: &TranscriptConfig,
        session: u64,
        listener: &str,
        client: SocketAddr,
    ) -> Transcript {
        let Some(dir) = &config.dir else {
            return Transcript::disabled();
        };
        let now = SystemTime::now();
        let generation = GENERATION.load(Ordering::Relaxed);
        let path = dir.join(file_name(now, session, client));
        let file = match create(dir, &path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot open transcript");
                return Transcript::disabled();
            }
        };
        let mut t = Transcript {
            inner: Some(Box::new(Inner {
                out: BufWriter::new(file),
                path,
                generation,
                full_bodies: config.full_bodies,
                summary_lines: config.summary_lines,
                body: None,
            })),
        };
        t.note(&format!(
            "session {session} on listener {listener} from {client}"
        ));
        t
    }

    /// Whether lines are being written.
    pub(crate) fn is_active(&self) -> bool {
        self.inner.is_some()
    }

    /// The file, while active.
    #[cfg(test)] // transcript tests read the file back
    pub(crate) fn path(&self) -> Option<&Path> {
        self.inner.as_ref().map(|i| i.path.as_path())
    }

    /// A command line from the client, redacted by [`redact_command_line`].
    #[cfg(test)] // sessions hand over the parsed command (`client_command`)
    pub(crate) fn client_line(&mut self, line: &[u8]) {
        if self.inner.is_some() {
            let text = redact_command_line(line);
            self.write_line("C:", &text, true);
        }
    }

    /// A command the client sent, as parsed once by the proxy, redacted.
    pub(crate) fn client_command(&mut self, cmd: &crate::pop3::command::Command<'_>) {
        if self.inner.is_some() {
            let text = redact_command(cmd);
            self.write_line("C:", &text, true);
        }
    }

    /// A command whose arguments are secret: `C: PASS ***`.
    #[cfg(test)] // sessions redact through `client_line`
    pub(crate) fn client_secret(&mut self, verb: crate::pop3::command::Verb) {
        if self.inner.is_some() {
            self.write_line("C:", &format!("{} ***", verb.as_str()), true);
        }
    }

    /// A SASL client response (a bare base64 line, or `*`): `C: ***`.
    pub(crate) fn client_sasl(&mut self) {
        self.write_line("C:", "***", true);
    }

    /// A server status line (or SASL challenge).
    pub(crate) fn server_line(&mut self, line: &[u8]) {
        if self.inner.is_some() {
            let text = display(line);
            self.write_line("S:", &text, true);
        }
    }

    /// popgate's own remark (`*: ...`), e.g. a rule decision or a TLS upgrade.
    pub(crate) fn note(&mut self, text: &str) {
        let text = display(text.as_bytes());
        self.write_line("*:", &text, true);
    }

    /// The next chunk of a multi-line body as it went to the client (wire bytes, the
    /// terminating `.` line may be included: it ends the body).
    pub(crate) fn server_body(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while !rest.is_empty() && self.inner.is_some() {
            match memchr::memchr(b'\n', rest) {
                Some(i) => {
                    self.body_piece(&rest[..=i], true);
                    rest = &rest[i + 1..];
                }
                None => {
                    self.body_piece(rest, false);
                    rest = &[];
                }
            }
        }
    }

    /// The body is over: `complete` when its terminator was relayed (writes the summary and
    /// `S: .` unless the terminator was already fed), otherwise it was cut short.
    pub(crate) fn server_body_end(&mut self, complete: bool) {
        let Some(inner) = self.inner.as_mut() else {
            return;
        };
        let Some(mut body) = inner.body.take() else {
            return;
        };
        if body.line_len > 0 {
            if body.shown < inner.summary_lines() {
                let line = std::mem::take(&mut body.line);
                if !(body.continued && line.is_empty()) {
                    self.show_body_line(&mut body, &line);
                }
            } else {
                body.omitted += body.line_len as u64;
            }
        }
        self.write_summary(&body);
        if complete {
            self.write_line("S:", ".", true);
        } else {
            self.write_line("*:", "body cut short", true);
        }
    }

    /// Flush buffered lines to the file.
    pub(crate) fn flush(&mut self) {
        if let Some(inner) = self.inner.as_mut()
            && let Err(e) = inner.out.flush()
        {
            self.fail(&e);
        }
    }

    /// Flush and close the file.
    #[cfg(test)] // sessions flush, then drop it (the BufWriter flushes on drop)
    pub(crate) fn close(mut self) {
        self.flush();
    }

    fn body_piece(&mut self, piece: &[u8], eol: bool) {
        let Some(inner) = self.inner.as_mut() else {
            return;
        };
        let full = inner.full_bodies;
        let showing_limit = inner.summary_lines();
        let mut body = inner.body.take().unwrap_or_default();
        let showing = full || body.shown < showing_limit;
        body.line_len += piece.len();
        if showing {
            body.line.extend_from_slice(piece);
        } else if body.line.len() < 3 {
            let room = 3 - body.line.len();
            body.line.extend_from_slice(&piece[..piece.len().min(room)]);
        }
        if eol {
            let line = std::mem::take(&mut body.line);
            if body.line_len <= 3 && crate::pop3::response::body_line(&line).is_none() {
                // The terminator: the body is complete.
                self.write_summary(&body);
                self.write_line("S:", ".", true);
                return;
            }
            if showing {
                self.show_body_line(&mut body, &line);
            } else {
                body.omitted += body.line_len as u64;
            }
            body.line_len = 0;
            body.continued = false;
            body.line = line;
            body.line.clear();
        } else if full && body.line.len() >= FULL_LINE_PIECE {
            // An overlong line in full mode: write what there is, keep streaming.
            let piece = std::mem::take(&mut body.line);
            let tag = if body.continued { "S+" } else { "S:" };
            let text = display_raw(&piece);
            self.write_line(tag, &text, false);
            body.continued = true;
        } else if !full && showing && body.line.len() > SUMMARY_LINE_MAX + 2 {
            body.line.truncate(SUMMARY_LINE_MAX);
        }
        if let Some(inner) = self.inner.as_mut() {
            inner.body = Some(body);
        }
    }

    fn show_body_line(&mut self, body: &mut Body, line: &[u8]) {
        let mut text = display(line);
        if body.line_len > line.len() && !body.continued {
            text.push('…');
        }
        let tag = if body.continued { "S+" } else { "S:" };
        self.write_line(tag, &text, false);
        body.shown += 1;
    }

    fn write_summary(&mut self, body: &Body) {
        if body.omitted > 0 {
            let text = format!("[... {} octets]", body.omitted);
            self.write_line("S:", &text, false);
        }
    }

    fn write_line(&mut self, tag: &str, text: &str, flush: bool) {
        let Some(inner) = self.inner.as_mut() else {
            return;
        };
        let generation = GENERATION.load(Ordering::Relaxed);
        if inner.generation != generation {
            inner.generation = generation;
            if let Err(e) = inner.reopen() {
                self.fail(&e);
                return;
            }
        }
        let Some(inner) = self.inner.as_mut() else {
            return;
        };
        let ts = humantime::format_rfc3339_millis(SystemTime::now());
        let mut result = writeln!(inner.out, "{ts} {tag} {text}");
        if flush && result.is_ok() {
            result = inner.out.flush();
        }
        if let Err(e) = result {
            self.fail(&e);
        }
    }

    fn fail(&mut self, e: &std::io::Error) {
        if let Some(inner) = self.inner.take() {
            tracing::warn!(
                path = %inner.path.display(),
                error = %e,
                "transcript write failed; transcript disabled for this session"
            );
            // Dropping the BufWriter would retry the failed write; discard its buffer.
            let (_file, _lost) = inner.out.into_parts();
        }
    }
}

impl Inner {
    /// Flush to the old file, then continue in a file opened (or created) at `path`.
    fn reopen(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        self.out = BufWriter::new(create(dir, &self.path)?);
        Ok(())
    }

    fn summary_lines(&self) -> usize {
        if self.full_bodies {
            usize::MAX
        } else {
            self.summary_lines
        }
    }
}

fn file_name(now: SystemTime, session: u64, client: SocketAddr) -> String {
    let stamp: String = humantime::format_rfc3339_seconds(now)
        .to_string()
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect();
    let ip = client.ip().to_string().replace(':', "_");
    format!("{stamp}-s{session}-{ip}-{}.log", client.port())
}

fn create(dir: &Path, path: &Path) -> std::io::Result<File> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        builder.mode(0o700);
        options.mode(0o600);
    }
    builder.create(dir)?;
    options.open(path)
}

#[cfg(test)] // the redaction tests: sessions pass the parsed command
pub(crate) fn redact_command_line(line: &[u8]) -> String {
    // One redaction rule for logs, rules and transcripts: the command parser's.
    use crate::pop3::command::{Command, Verb, trim_eol};
    match Command::parse(line) {
        Ok(cmd) => redact_command(&cmd),
        Err(_) => {
            // Not a valid command: show a known keyword, never unknown text.
            let content = trim_eol(line);
            let content = &content[content.iter().take_while(|&&b| is_wsp(b)).count()..];
            let kw_len = content.iter().take_while(|&&b| !is_wsp(b)).count();
            let (kw, rest) = content.split_at(kw_len);
            let verb = Verb::from_keyword(kw);
            if verb == Verb::Unknown {
                "***".into()
            } else if !verb.has_secret_args() {
                display(line)
            } else if rest.iter().all(|&b| is_wsp(b)) {
                display_raw(kw)
            } else {
                format!("{} ***", display_raw(kw))
            }
        }
    }
}

#[cfg(test)]
fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction() {
        let cases: &[(&[u8], &str)] = &[
            (b"PASS hunter2\r\n", "PASS ***"),
            (b"pass  hunter2 with spaces\r\n", "pass ***"),
            (b"PASS\r\n", "PASS"),
            (b"PASShunter2\r\n", "***"),
            (b"  PASS hunter2\r\n", "PASS ***"),
            (b"PASS\thunter2\n", "PASS ***"),
            (b"AGJvYgBodW50ZXIy\r\n", "***"),
            (b"XAUTH bob hunter2\r\n", "***"),
            (
                b"APOP bob c4c9334bac560ecc979e58001b3e22fb\r\n",
                "APOP bob ***",
            ),
            (b"APOP c4c9334bac560ecc979e58001b3e22fb\r\n", "APOP ***"),
            (b"AUTH\r\n", "AUTH"),
            (b"AUTH PLAIN\r\n", "AUTH PLAIN"),
            (b"auth plain AGJvYgBodW50ZXIy\r\n", "auth plain ***"),
            (b"AUTH LOGIN Ym9i\r\n", "AUTH LOGIN ***"),
            (b"AUTHPLAIN AGJvYgBodW50ZXIy\r\n", "***"),
            (b"USER bob\r\n", "USER bob"),
            (b"RETR 1\r\n", "RETR 1"),
            (b"LIST\n", "LIST [LF]"),
            (b"NOOP \x1b[31m\r\n", "NOOP \\x1b[31m"),
        ];
        for (line, want) in cases {
            assert_eq!(
                redact_command_line(line),
                *want,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    /// Every login method with a unique password: neither the password nor its base64 forms
    /// reach the file.
    #[test]
    fn no_secret_reaches_the_file() {
        let secret = "Zq7-unique-pw-81f3";
        let b64 = |s: &str| {
            // Minimal base64 for the test (standard alphabet, padded).
            const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut out = String::new();
            for c in s.as_bytes().chunks(3) {
                let n = c.iter().fold(0u32, |n, &b| n << 8 | u32::from(b)) << (8 * (3 - c.len()));
                for i in 0..4 {
                    if i <= c.len() {
                        out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
                    } else {
                        out.push('=');
                    }
                }
            }
            out
        };
        let plain = b64(&format!("\0bob\0{secret}"));
        let dir = tempfile::tempdir().unwrap();
        let mut t = Transcript::open(&config(dir.path(), true), 1, "pop3", client());
        let path = t.path().unwrap().to_owned();
        t.client_line(b"USER bob\r\n");
        t.client_line(format!("PASS {secret}\r\n").as_bytes());
        t.client_line(format!("APOP bob {secret}\r\n").as_bytes());
        t.client_line(format!("AUTH PLAIN {plain}\r\n").as_bytes());
        t.client_line(b"AUTH PLAIN\r\n");
        t.server_line(b"+ \r\n");
        t.client_sasl();
        t.client_line(b"AUTH LOGIN\r\n");
        t.server_line(b"+ VXNlcm5hbWU6\r\n");
        t.client_sasl();
        t.server_line(b"+ UGFzc3dvcmQ6\r\n");
        t.client_sasl();
        t.client_secret(crate::pop3::command::Verb::Pass);
        t.close();
        let text = std::fs::read_to_string(&path).unwrap();
        for needle in [secret.to_owned(), plain.clone(), b64(secret)] {
            assert!(!text.contains(&needle), "{needle} leaked:\n{text}");
        }
        assert_eq!(text.matches("***").count(), 7, "{text}");
    }

    fn config(dir: &Path, full: bool) -> TranscriptConfig {
        TranscriptConfig {
            dir: Some(dir.to_owned()),
            full_bodies: full,
            ..TranscriptConfig::default()
        }
    }

    fn client() -> SocketAddr {
        "198.51.100.7:51544".parse().unwrap()
    }

    /// The transcript's lines without timestamps.
    fn lines_of(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                let (ts, rest) = l.split_once(' ').unwrap();
                assert!(ts.ends_with('Z') && ts.len() == 24, "{ts}");
                rest.to_owned()
            })
            .collect()
    }

    fn body(n: usize) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"Subject: hi\r\n\r\n");
        for i in 0..n {
            b.extend_from_slice(format!("line {i}\r\n").as_bytes());
        }
        b.extend_from_slice(b"..dotted\r\n.\r\n");
        b
    }

    fn session(t: &mut Transcript, body_bytes: &[u8], chunk: usize) {
        t.server_line(b"+OK POP3 ready\r\n");
        t.client_line(b"USER bob\r\n");
        t.server_line(b"+OK\r\n");
        t.client_line(b"PASS s3cr3t-pw\r\n");
        t.server_line(b"+OK logged in\r\n");
        t.client_line(b"AUTH PLAIN\r\n");
        t.server_line(b"+ \r\n");
        t.client_sasl();
        t.client_line(b"RETR 1\r\n");
        t.server_line(b"+OK 120 octets\r\n");
        for c in body_bytes.chunks(chunk) {
            t.server_body(c);
        }
        t.server_body_end(true);
        t.client_line(b"QUIT\r\n");
    }

    #[test]
    fn summary_mode_at_every_chunk_size() {
        let dir = tempfile::tempdir().unwrap();
        let b = body(10);
        let mut expected: Option<Vec<String>> = None;
        for chunk in 1..=b.len() {
            let mut t =
                Transcript::open(&config(dir.path(), false), chunk as u64, "pop3", client());
            let path = t.path().unwrap().to_owned();
            session(&mut t, &b, chunk);
            t.close();
            let lines = lines_of(&path);
            match &expected {
                None => {
                    let omitted: usize = (3..10)
                        .map(|i| format!("line {i}\r\n").len())
                        .sum::<usize>()
                        + b"..dotted\r\n".len();
                    assert_eq!(
                        lines,
                        [
                            format!("*: session 1 on listener pop3 from {}", client()),
                            "S: +OK POP3 ready".into(),
                            "C: USER bob".into(),
                            "S: +OK".into(),
                            "C: PASS ***".into(),
                            "S: +OK logged in".into(),
                            "C: AUTH PLAIN".into(),
                            "S: + ".into(),
                            "C: ***".into(),
                            "C: RETR 1".into(),
                            "S: +OK 120 octets".into(),
                            "S: Subject: hi".into(),
                            "S: ".into(),
                            "S: line 0".into(),
                            "S: line 1".into(),
                            "S: line 2".into(),
                            format!("S: [... {omitted} octets]"),
                            "S: .".into(),
                            "C: QUIT".into(),
                        ]
                    );
                    expected = Some(lines);
                }
                Some(e) => assert_eq!(&lines[1..], &e[1..], "chunk {chunk}"),
            }
        }
    }

    #[test]
    fn full_mode_writes_every_line() {
        let dir = tempfile::tempdir().unwrap();
        let b = body(10);
        for chunk in [1, 2, 7, b.len()] {
            let mut t = Transcript::open(&config(dir.path(), true), chunk as u64, "pop3", client());
            let path = t.path().unwrap().to_owned();
            session(&mut t, &b, chunk);
            drop(t);
            let lines = lines_of(&path);
            let start = lines.iter().position(|l| l == "S: Subject: hi").unwrap();
            assert_eq!(lines[start + 2], "S: line 0");
            assert_eq!(lines[start + 11], "S: line 9");
            assert_eq!(lines[start + 12], "S: ..dotted");
            assert_eq!(lines[start + 13], "S: .");
            assert_eq!(lines[start + 14], "C: QUIT");
        }
    }

    #[test]
    fn body_end_without_terminator_and_overlong_lines() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Transcript::open(&config(dir.path(), false), 1, "pop3", client());
        let path = t.path().unwrap().to_owned();
        let long = vec![b'x'; 1000];
        t.server_body(&long);
        t.server_body(b"\r\nshort\r\npartial");
        t.server_body_end(false);
        // A second body starts afresh, its terminator fed separately.
        t.server_body(b"a\r\n");
        t.server_body(b".\r");
        t.server_body(b"\n");
        t.server_body_end(true);
        t.close();
        let lines = lines_of(&path);
        assert_eq!(lines[1], format!("S: {}…", "x".repeat(SUMMARY_LINE_MAX)));
        assert_eq!(lines[2], "S: short");
        assert_eq!(lines[3], "S: partial");
        assert_eq!(lines[4], "*: body cut short");
        assert_eq!(lines[5], "S: a");
        assert_eq!(lines[6], "S: .");
        assert_eq!(lines.len(), 7);

        let mut t = Transcript::open(&config(dir.path(), true), 2, "pop3", client());
        let path = t.path().unwrap().to_owned();
        let long = vec![b'y'; FULL_LINE_PIECE * 2 + 10];
        for c in long.chunks(1000) {
            t.server_body(c);
        }
        t.server_body(b"\r\n.\r\n");
        t.close();
        let lines = lines_of(&path);
        let total: usize = lines[1..]
            .iter()
            .filter(|l| l.starts_with("S"))
            .map(|l| l.len() - 3)
            .sum();
        assert_eq!(
            total,
            long.len() + 1,
            "{:?}",
            lines.iter().map(|l| &l[..4]).collect::<Vec<_>>()
        );
        assert!(lines[1].starts_with("S: y"));
        assert!(lines[2].starts_with("S+ y"));
        assert_eq!(lines.last().unwrap(), "S: .");
    }

    #[test]
    fn disabled_and_unopenable() {
        let mut t = Transcript::disabled();
        t.client_line(b"PASS x\r\n");
        t.server_body(b"abc\r\n");
        t.server_body_end(true);
        assert!(!t.is_active());
        let none = Transcript::open(&TranscriptConfig::default(), 1, "pop3", client());
        assert!(!none.is_active());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let bad = Transcript::open(&config(&file, false), 1, "pop3", client());
        assert!(!bad.is_active());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn write_errors_disable_without_panic() {
        // /dev/full accepts the open and fails every write.
        let out = std::fs::OpenOptions::new().append(true).open("/dev/full");
        let Ok(file) = out else { return };
        let mut t = Transcript {
            inner: Some(Box::new(Inner {
                out: BufWriter::new(file),
                path: "/dev/full".into(),
                generation: GENERATION.load(Ordering::Relaxed),
                full_bodies: false,
                summary_lines: 5,
                body: None,
            })),
        };
        t.client_line(b"USER bob\r\n");
        assert!(!t.is_active());
        t.server_line(b"+OK\r\n");
        t.close();
    }

    #[test]
    fn file_names_and_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let v6: SocketAddr = "[2001:db8::7]:110".parse().unwrap();
        let t = Transcript::open(&config(&dir.path().join("new"), false), 9, "pop3", v6);
        let path = t.path().unwrap().to_owned();
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(name.ends_with("-s9-2001_db8__7-110.log"), "{name}");
        assert_eq!(name.find('T'), Some(8), "{name}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(
                mode & 0o077,
                0,
                "transcripts must not be group/world readable"
            );
        }
    }
}
