//! Redaction and display of POP3 lines for transcripts and the live tap: one rule for both.

/// A line for display: line ending removed (` [LF]` marks a bare LF), control characters as
/// `\xNN`, invalid UTF-8 replaced.
pub(crate) fn display(line: &[u8]) -> String {
    let (body, bare_lf) = if let Some(l) = line.strip_suffix(b"\r\n") {
        (l, false)
    } else if let Some(l) = line.strip_suffix(b"\n") {
        (l, true)
    } else {
        (line, false)
    };
    let mut s = display_raw(body);
    if bare_lf {
        s.push_str(" [LF]");
    }
    s
}

pub(crate) fn display_raw(bytes: &[u8]) -> String {
    crate::pop3::printable(bytes)
}

/// A client command line for logs and transcripts, with secrets replaced by `***`:
/// `PASS` arguments, the APOP digest (`APOP name ***`) and an AUTH initial response
/// (`AUTH PLAIN ***`). Verbs match case-insensitively, also with leading white space or glued
/// to their argument; other lines come back unchanged (as transcripts display them).
///
/// SASL continuation lines are not commands and cannot be recognised here: a caller in a SASL
/// exchange must not pass them (use `***`).
/// A parsed command for the transcript: as sent, or with secrets as `***`.
pub(crate) fn redact_command(cmd: &crate::pop3::command::Command<'_>) -> String {
    if cmd.verb.has_secret_args() {
        display_raw(cmd.redacted().as_bytes())
    } else {
        display(cmd.raw)
    }
}
