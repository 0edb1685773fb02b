//! The subcommands' side of the control socket: send a request, read the answer (or the tap
//! stream), and format it for a terminal or a pipe.

use std::io::{BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::protocol::{Command, Request, Response, SessionRow, Status, VERSION};
use super::tap::TapLine;

/// Why a control command failed on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached (not running, no permission, wrong path).
    #[error("cannot connect to the control socket {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Reading or writing failed.
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    /// popgate answered something that is not a protocol line, or nothing.
    #[error("control socket: {0}")]
    Protocol(String),
    /// popgate refused the command.
    #[error("{0}")]
    Refused(String),
}

fn connect(socket: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_owned(),
        source,
    })
}

fn send(stream: &mut UnixStream, command: Command) -> Result<(), ClientError> {
    let mut line = serde_json::to_string(&Request {
        v: VERSION,
        command,
    })
    .map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    Ok(())
}

fn read(reader: &mut impl std::io::BufRead) -> Result<Option<Response>, ClientError> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    serde_json::from_str(&line)
        .map(Some)
        .map_err(|e| ClientError::Protocol(format!("unreadable answer ({e}): {}", line.trim_end())))
}

/// Send one command and return popgate's answer (`Err(Refused)` when it says `ok: false`).
pub fn request(socket: &Path, command: Command) -> Result<Response, ClientError> {
    let mut stream = connect(socket)?;
    send(&mut stream, command)?;
    let mut reader = BufReader::new(stream);
    let answer = read(&mut reader)?
        .ok_or_else(|| ClientError::Protocol("popgate closed without an answer".into()))?;
    if !answer.ok {
        return Err(ClientError::Refused(
            answer.error.unwrap_or_else(|| "refused".into()),
        ));
    }
    Ok(answer)
}

/// Attach a tap and hand each line to `on_line` until popgate closes the connection (or
/// `on_line` returns `false`); `on_attached` gets the sessions attached at once.
pub fn tap(
    socket: &Path,
    command: Command,
    on_attached: impl FnOnce(&[u64]),
    mut on_line: impl FnMut(&TapLine) -> bool,
) -> Result<(), ClientError> {
    let mut stream = connect(socket)?;
    send(&mut stream, command)?;
    let mut reader = BufReader::new(stream);
    let first = read(&mut reader)?
        .ok_or_else(|| ClientError::Protocol("popgate closed without an answer".into()))?;
    if !first.ok {
        return Err(ClientError::Refused(
            first.error.unwrap_or_else(|| "refused".into()),
        ));
    }
    on_attached(first.tap_attached.as_deref().unwrap_or_default());
    while let Some(r) = read(&mut reader)? {
        if let Some(line) = &r.tap
            && !on_line(line)
        {
            break;
        }
    }
    Ok(())
}

const RESET: &str = "\x1b[0m";

fn paint(color: bool, code: &str, text: &str) -> String {
    if color {
        format!("\x1b[{code}m{text}{RESET}")
    } else {
        text.to_owned()
    }
}

/// A tap line for people: `TIME sSESSION C: text`, coloured by direction when `color`.
pub fn format_tap_line(line: &TapLine, color: bool) -> String {
    let code = match line.dir.as_str() {
        "C" => "36",
        "S" | "S+" => "32",
        _ => "33",
    };
    let head = format!("{} s{} {}:", line.ts, line.session, line.dir);
    format!("{} {}", paint(color, code, &head), line.text)
}

fn dash(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("-")
}

fn duration(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// `popgate sessions` as a table, one row per session.
pub fn format_sessions(rows: &[SessionRow], color: bool) -> String {
    let header = [
        "ID", "CLIENT", "LISTENER", "USER", "STATE", "UPSTREAM", "ADDRESS", "TLS C/U", "IN", "OUT",
        "AGE", "IDLE", "TAGS",
    ];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    for r in rows {
        table.push(vec![
            r.id.to_string(),
            r.client.clone(),
            r.listener.clone(),
            dash(&r.user).to_owned(),
            r.state.clone(),
            dash(&r.upstream).to_owned(),
            dash(&r.upstream_address).to_owned(),
            format!("{}/{}", dash(&r.client_tls), dash(&r.upstream_tls)),
            r.bytes_from_client.to_string(),
            r.bytes_to_client.to_string(),
            duration(r.age_s),
            duration(r.idle_s),
            if r.tags.is_empty() {
                "-".into()
            } else {
                r.tags.join(",")
            },
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            table
                .iter()
                .map(|row| row[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, row) in table.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let line = cells.join("  ").trim_end().to_owned();
        if i == 0 {
            out.push_str(&paint(color, "1", &line));
        } else {
            out.push_str(&line);
        }
        out.push('\n');
    }
    out
}

/// `popgate status` for people.
pub fn format_status(s: &Status) -> String {
    let mut out = format!(
        "popgate {} (pid {}), up {} since {}\nconfig digest {}\n",
        s.version,
        s.pid,
        duration(s.uptime_s),
        s.started,
        s.config_digest
    );
    match &s.last_reload {
        Some(r) => out.push_str(&format!(
            "last reload {}: {} ({})\n",
            r.at,
            if r.ok { "ok" } else { "FAILED" },
            r.line
        )),
        None => out.push_str("last reload: none since the start\n"),
    }
    out.push_str(&format!("sessions {}, taps {}\n", s.sessions, s.taps));
    for (listener, states) in &s.by_listener {
        let parts: Vec<String> = states.iter().map(|(st, n)| format!("{st} {n}")).collect();
        out.push_str(&format!("  {listener}: {}\n", parts.join(", ")));
    }
    out
}
