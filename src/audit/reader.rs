//! Reading audit files back: filters and a readable table, for `popgate audit`.
//!
//! [`read_events`] streams JSON-lines files (as written by the sink) and keeps the events that
//! pass an [`AuditFilter`]; [`format_table`] prints them as aligned columns and [`format_json`]
//! passes the original lines through. [`read_audit`] keeps reading past lines that are not
//! audit events and reports each ([`BadLine`]: file, line number, reason), a last line without
//! its newline (a file being written, or cut by a crash) included; [`read_events`] is the
//! strict form, for which such a line (other than an incomplete last one) is an error.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::model::event::{AuditEvent, AuditEventKind, EVENT_NAMES};
use crate::types::same_user_folded;

/// Header values longer than this are cut in the table.
const MAX_VALUE_CHARS: usize = 80;

/// Reading or filtering audit events failed.
#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A line is not an audit event.
    #[error("{path}:{line}: not an audit event: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What the JSON parser said.
        message: String,
    },
    /// `--since` or `--until` is neither a time, a date nor a duration.
    #[error(
        "invalid time {0:?}: use RFC 3339 (2026-03-01T09:00:00Z, +02:00 offsets allowed), \
         a date (2026-03-01), today, yesterday or a duration back from now (2h, 30m, 7days)"
    )]
    Since(String),
    /// `--event` names an event that does not exist.
    #[error("unknown event {0:?}; known events: {known}", known = EVENT_NAMES.join(", "))]
    UnknownEvent(String),
}

/// Which events to keep. The default keeps everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Keep events of this user (ASCII case-insensitive), together with the user-less events
    /// (`session_open`, `tls`) of the sessions in which the user appears.
    pub user: Option<String>,
    /// Keep events at or after this time.
    pub since: Option<SystemTime>,
    /// Keep events before this time (exclusive; see [`AuditFilter::until`]).
    pub until: Option<SystemTime>,
    /// Keep only these event names (empty: all).
    pub events: Vec<String>,
    /// Keep only the events about this message (by its UIDL): `retrieve`, `delete_marked`,
    /// an `update` that deleted it, with the `session_open` of their sessions (the client's
    /// address).
    pub uidl: Option<String>,
    /// The same, by the message's Message-ID (with or without the angle brackets).
    pub message_id: Option<String>,
    /// Keep only the message events (`retrieve`, `delete_marked`, `update`) of this mailbox
    /// user (ASCII case-insensitive), with the `session_open` of their sessions.
    pub msg_user: Option<String>,
}

impl AuditFilter {
    /// A filter from command-line strings: `since` as for `parse_since` relative to now,
    /// `events` may repeat or hold comma-separated names; unknown names are an error.
    pub fn from_args(
        user: Option<String>,
        since: Option<&str>,
        events: &[String],
    ) -> Result<AuditFilter, ReaderError> {
        let since = since
            .map(|s| parse_time(s, SystemTime::now(), false))
            .transpose()?;
        let mut names = Vec::new();
        for name in events.iter().flat_map(|e| e.split(',')) {
            let name = name.trim();
            if name.is_empty() {
                continue;
            }
            if !EVENT_NAMES.contains(&name) {
                return Err(ReaderError::UnknownEvent(name.to_owned()));
            }
            names.push(name.to_owned());
        }
        Ok(AuditFilter {
            user,
            since,
            events: names,
            ..AuditFilter::default()
        })
    }

    /// Set the end of the time range: `--until` as for `--since` (a time, a date, `today`,
    /// `yesterday` or an age). A date (or `today`/`yesterday`) includes that whole day; a time
    /// includes its millisecond.
    pub fn until(mut self, until: Option<&str>) -> Result<AuditFilter, ReaderError> {
        self.until = until
            .map(|u| parse_time(u, SystemTime::now(), true))
            .transpose()?;
        Ok(self)
    }

    /// Whether message conditions (`uidl`, `message_id`, `msg_user`) are set.
    fn by_message(&self) -> bool {
        self.uidl.is_some() || self.message_id.is_some() || self.msg_user.is_some()
    }

    /// Whether `r` is a message event that passes the message conditions.
    fn message_matches(&self, r: &AuditRecord) -> bool {
        let id = |have: Option<&str>| match (&self.message_id, have) {
            (None, _) => true,
            (Some(want), Some(have)) => {
                let bare = |s: &str| {
                    s.trim()
                        .trim_start_matches('<')
                        .trim_end_matches('>')
                        .to_owned()
                };
                bare(want) == bare(have)
            }
            (Some(_), None) => false,
        };
        let uidl = |have: Option<&str>| match (&self.uidl, have) {
            (None, _) => true,
            (Some(want), Some(have)) => want == have,
            (Some(_), None) => false,
        };
        let user = |have: Option<&str>| match (&self.msg_user, have) {
            (None, _) => true,
            (Some(want), Some(have)) => same_user_folded(want, have),
            (Some(_), None) => false,
        };
        match &r.event.kind {
            AuditEventKind::Retrieve(e) => {
                let mid = e
                    .headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case("Message-ID"))
                    .map(|(_, v)| v);
                user(e.user.as_deref()) && uidl(e.uidl.as_deref()) && id(mid)
            }
            AuditEventKind::DeleteMarked(e) => {
                user(e.user.as_deref()) && uidl(e.uidl.as_deref()) && id(e.message_id.as_deref())
            }
            AuditEventKind::Scan(e) => {
                user(e.user.as_deref()) && uidl(e.uidl.as_deref()) && id(e.message_id.as_deref())
            }
            AuditEventKind::Update(e) => {
                user(e.user.as_deref())
                    && (self.uidl.is_none() && self.message_id.is_none()
                        || e.deleted
                            .iter()
                            .any(|d| uidl(d.uidl.as_deref()) && id(d.message_id.as_deref())))
            }
            _ => false,
        }
    }

    fn user_matches(&self, user: Option<&str>) -> bool {
        match (&self.user, user) {
            (None, _) => true,
            (Some(want), Some(u)) => same_user_folded(want, u),
            (Some(_), None) => false,
        }
    }

    /// Whether the time and event-name conditions hold (the user condition needs the
    /// session context, see [`read_events`]).
    fn time_and_name_match(&self, r: &AuditRecord) -> bool {
        self.since.is_none_or(|s| r.event.ts >= s)
            && self.until.is_none_or(|u| r.event.ts < u)
            && (self.events.is_empty() || self.events.contains(&r.name))
    }
}

/// A time for `--since`: RFC 3339 (`2026-03-01T09:00:00Z`, `2026-03-01T11:00:00+02:00`,
/// fractional seconds allowed), `2026-03-01 09:00[:00]` (UTC), a date (`2026-03-01`, midnight
/// UTC), `today` or `yesterday` (midnight UTC), or a duration back from `now` (`2h`, `90m`,
/// `7days`, `1h 30m`).
#[cfg(test)]
pub(crate) fn parse_since(text: &str, now: SystemTime) -> Result<SystemTime, ReaderError> {
    parse_time(text, now, false)
}

/// [`parse_since`]; with `end`, the exclusive end of what the text names: the midnight after
/// a date (or `today`, `yesterday`), a millisecond after a time.
pub(crate) fn parse_time(
    text: &str,
    now: SystemTime,
    end: bool,
) -> Result<SystemTime, ReaderError> {
    const DAY: Duration = Duration::from_secs(86_400);
    let t = text.trim();
    let err = || ReaderError::Since(text.to_owned());
    if t.is_empty() {
        return Err(err());
    }
    let midnight = |back: u32| {
        let secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let day = UNIX_EPOCH + Duration::from_secs(secs - secs % 86_400);
        day.checked_sub(DAY * back).unwrap_or(UNIX_EPOCH)
    };
    let day_end = |start: SystemTime| if end { start + DAY } else { start };
    match t.to_ascii_lowercase().as_str() {
        "today" => return Ok(day_end(midnight(0))),
        "yesterday" => return Ok(day_end(midnight(1))),
        _ => {}
    }
    if t.as_bytes()[0].is_ascii_digit() && t.len() >= 10 && t.as_bytes().get(4) == Some(&b'-') {
        let at = parse_timestamp(t).ok_or_else(err)?;
        return Ok(match (end, t.len()) {
            (false, _) => at,
            (true, 10) => at + DAY,
            (true, 16) => at + Duration::from_secs(60),
            (true, _) => at + Duration::from_millis(1),
        });
    }
    let d = humantime::parse_duration(t).map_err(|_| err())?;
    Ok(now.checked_sub(d).unwrap_or(UNIX_EPOCH).max(UNIX_EPOCH))
}

fn parse_timestamp(t: &str) -> Option<SystemTime> {
    if t.len() == 10 {
        return humantime::parse_rfc3339_weak(&format!("{t}T00:00:00")).ok();
    }
    if t.len() == 16 {
        // "2026-03-01 09:00": no seconds.
        return humantime::parse_rfc3339_weak(&format!("{t}:00")).ok();
    }
    // A numeric offset: parse the local time as UTC, then shift.
    let b = t.as_bytes();
    if t.len() >= 25 {
        let n = t.len();
        if (b[n - 6] == b'+' || b[n - 6] == b'-') && b[n - 3] == b':' {
            let hours: u64 = t[n - 5..n - 3].parse().ok()?;
            let minutes: u64 = t[n - 2..].parse().ok()?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            let offset = Duration::from_secs(hours * 3600 + minutes * 60);
            let local = humantime::parse_rfc3339_weak(&t[..n - 6]).ok()?;
            return if b[n - 6] == b'+' {
                local.checked_sub(offset)
            } else {
                local.checked_add(offset)
            };
        }
    }
    humantime::parse_rfc3339_weak(t).ok()
}

/// One event read from a file.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    /// The parsed event.
    pub event: AuditEvent,
    /// The `event` name as written (also for events this version does not know).
    pub name: String,
    /// The original JSON line, for `--json`.
    pub raw: String,
}

impl AuditRecord {
    /// Parse one JSON line.
    pub(crate) fn parse(line: &str) -> Result<AuditRecord, serde_json::Error> {
        #[derive(serde::Deserialize)]
        struct Name {
            event: String,
        }
        let event: AuditEvent = serde_json::from_str(line)?;
        let name = match event.kind {
            AuditEventKind::Unknown => serde_json::from_str::<Name>(line)?.event,
            ref k => k.name().to_owned(),
        };
        Ok(AuditRecord {
            event,
            name,
            raw: line.to_owned(),
        })
    }
}

/// A line of an audit file that is not an audit event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    /// The file.
    pub path: PathBuf,
    /// 1-based line number.
    pub line: usize,
    /// Why it was not read (not UTF-8, not JSON, not an audit event).
    pub reason: String,
    /// The file's last line, without its newline: still being written, or cut by a crash.
    pub incomplete: bool,
}

impl std::fmt::Display for BadLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.incomplete {
            write!(
                f,
                "{}:{}: last line incomplete (being written, or cut off): {}",
                self.path.display(),
                self.line,
                self.reason
            )
        } else {
            write!(
                f,
                "{}:{}: not an audit event: {}",
                self.path.display(),
                self.line,
                self.reason
            )
        }
    }
}

/// What [`read_audit`] found: the events that pass the filter and every line it could not read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditRead {
    /// The events kept, ordered by time.
    pub records: Vec<AuditRecord>,
    /// Lines that are not audit events, in reading order.
    pub bad: Vec<BadLine>,
}

/// Like [`read_audit`], but a line that is not an audit event is an error ([`ReaderError::Parse`]),
/// except an incomplete last line, which is left out.
pub fn read_events(
    files: &[PathBuf],
    filter: &AuditFilter,
) -> Result<Vec<AuditRecord>, ReaderError> {
    let read = read_audit(files, filter)?;
    if let Some(b) = read.bad.into_iter().find(|b| !b.incomplete) {
        return Err(ReaderError::Parse {
            path: b.path,
            line: b.line,
            message: b.reason,
        });
    }
    Ok(read.records)
}

/// `(date, hour)` of a file named `audit.YYYY-MM-DD.jsonl` (hour 0) or
/// `audit.YYYY-MM-DD-HH.jsonl` (hour HH + 1, after the day's daily file), else `None`.
fn dated_name_key(path: &Path) -> Option<(String, u8)> {
    let name = path.file_name()?.to_str()?;
    let stamp = name
        .strip_prefix("audit.")?
        .strip_suffix(".jsonl")
        .filter(|s| s.is_ascii())?;
    let (date, hour) = match stamp.len() {
        10 => (stamp, 0),
        13 if stamp.as_bytes()[10] == b'-' => {
            let h: u8 = stamp[11..].parse().ok().filter(|h| *h < 24)?;
            (&stamp[..10], h + 1)
        }
        _ => return None,
    };
    let digits = |r: std::ops::Range<usize>| date[r].bytes().all(|b| b.is_ascii_digit());
    let shaped = digits(0..4) && &date[4..5] == "-" && digits(5..7) && &date[7..8] == "-";
    (shaped && digits(8..10)).then(|| (date.to_owned(), hour))
}

/// Read `files` and return the events that pass `filter`, ordered by time (ties keep reading
/// order), and the lines that are not audit events. Only a file that cannot be opened or read
/// is an error. Files named as popgate names them (`audit.YYYY-MM-DD[-HH].jsonl`) are read
/// in the order of the date in their name, whatever order they are given in (a glob puts
/// `audit.2026-03-01-09.jsonl` before `audit.2026-03-01.jsonl`); others first, as given.
///
/// With a user filter, an event is kept when it names the user, or when it names no user
/// (`session_open`, `tls`) and belongs to a session in which the user appears. Sessions are
/// told apart by instance, id and `session_open` (ids of older versions restarted with
/// popgate).
pub fn read_audit(files: &[PathBuf], filter: &AuditFilter) -> Result<AuditRead, ReaderError> {
    // (reading order, record): the order breaks ties between equal times.
    let mut kept: Vec<(usize, AuditRecord)> = Vec::new();
    // User-less events waiting to learn whether their session is the user's.
    type Key = (Option<String>, u64, u32);
    let mut pending: Vec<(Key, usize, AuditRecord)> = Vec::new();
    let mut seq = 0usize;
    let mut opens: HashMap<(Option<String>, u64), u32> = HashMap::new();
    let mut matched: HashSet<Key> = HashSet::new();
    let mut bad = Vec::new();
    let mut files: Vec<&PathBuf> = files.iter().collect();
    files.sort_by_key(|p| dated_name_key(p));
    for path in files {
        read_file(path, &mut bad, |record| {
            seq += 1;
            let id = (record.event.instance.clone(), record.event.session);
            if matches!(record.event.kind, AuditEventKind::SessionOpen(_)) {
                *opens.entry(id.clone()).or_default() += 1;
            }
            let n = opens.get(&id).copied().unwrap_or(0);
            let instance = (id.0, id.1, n);
            let user = record.event.user();
            let mut user_match = filter.user_matches(user);
            if filter.by_message() {
                // Only the events about the message (and the user-less events, the
                // `session_open` with the client's address, of their sessions).
                user_match = user.is_some() && user_match && filter.message_matches(&record);
            }
            if (filter.user.is_some() || filter.by_message()) && user_match {
                matched.insert(instance.clone());
            }
            if !filter.time_and_name_match(&record) {
                return;
            }
            if user_match {
                kept.push((seq, record));
            } else if user.is_none() {
                pending.push((instance, seq, record));
            }
        })?;
    }
    kept.extend(
        pending
            .into_iter()
            .filter(|(i, _, _)| matched.contains(i))
            .map(|(_, seq, r)| (seq, r)),
    );
    kept.sort_by_key(|(seq, r)| (r.event.ts, *seq));
    Ok(AuditRead {
        records: kept.into_iter().map(|(_, r)| r).collect(),
        bad,
    })
}

fn read_file(
    path: &Path,
    bad: &mut Vec<BadLine>,
    mut each: impl FnMut(AuditRecord),
) -> Result<(), ReaderError> {
    let io = |source| ReaderError::Io {
        path: path.to_owned(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(io)?);
    let mut buf = Vec::new();
    let mut number = 0;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(io)? == 0 {
            return Ok(());
        }
        number += 1;
        let complete = buf.last() == Some(&b'\n');
        let parsed = std::str::from_utf8(&buf)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                let text = text.trim_end_matches(['\r', '\n']);
                if text.trim().is_empty() {
                    Ok(None)
                } else {
                    AuditRecord::parse(text)
                        .map(Some)
                        .map_err(|e| e.to_string())
                }
            });
        match parsed {
            Ok(Some(r)) => each(r),
            Ok(None) => {}
            // Reported, never skipped silently; reading goes on with the next line.
            Err(reason) => bad.push(BadLine {
                path: path.to_owned(),
                line: number,
                reason,
                incomplete: !complete,
            }),
        }
    }
}

/// The original JSON lines, one per line.
pub fn format_json(records: &[AuditRecord]) -> String {
    let mut out = String::new();
    for r in records {
        out.push_str(&r.raw);
        out.push('\n');
    }
    out
}

/// An aligned table: `TIME EVENT SESSION USER DETAILS`, one event per row (`SESSION` is
/// `instance/id` when the records come from several instances). Values that could disturb a
/// terminal (control characters, white space, quotes) are quoted and escaped.
pub fn format_table(records: &[AuditRecord]) -> String {
    // Files of several popgates read together: a session is `instance/id`.
    let instances: HashSet<Option<&str>> = records
        .iter()
        .map(|r| r.event.instance.as_deref())
        .collect();
    let session = |r: &AuditRecord| match (instances.len() > 1, &r.event.instance) {
        (true, Some(i)) => format!("{}/{}", cell(i), r.event.session),
        (true, None) => format!("-/{}", r.event.session),
        (false, _) => r.event.session.to_string(),
    };
    // Where each session's client came from (the latest `session_open` of its id before it,
    // when among the records: ids of older versions restart): message events say it too, so
    // that one row answers who, when and from where.
    let mut clients: HashMap<(Option<&str>, u64), std::net::SocketAddr> = HashMap::new();
    let rows: Vec<[String; 5]> = records
        .iter()
        .map(|r| {
            let key = (r.event.instance.as_deref(), r.event.session);
            let mut d = details(r);
            match &r.event.kind {
                AuditEventKind::SessionOpen(o) => {
                    clients.insert(key, o.client);
                }
                AuditEventKind::Retrieve(_)
                | AuditEventKind::Scan(_)
                | AuditEventKind::DeleteMarked(_)
                | AuditEventKind::Update(_) => {
                    if let Some(c) = clients.get(&key) {
                        d.push_str(&format!(" client={c}"));
                    }
                }
                _ => {}
            }
            [
                humantime::format_rfc3339_millis(r.event.ts).to_string(),
                cell(&r.name),
                session(r),
                r.event.user().map_or_else(|| "-".to_owned(), cell),
                d,
            ]
        })
        .collect();
    let header = ["TIME", "EVENT", "SESSION", "USER", "DETAILS"].map(String::from);
    let mut widths = [0usize; 4];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, c) in row.iter().enumerate() {
            if i < 4 {
                let pad = widths[i] - c.chars().count();
                line.push_str(c);
                line.extend(std::iter::repeat_n(' ', pad + 2));
            } else {
                line.push_str(c);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A value as-is when it is a plain word, otherwise quoted with escapes.
fn cell(s: &str) -> String {
    let plain = !s.is_empty()
        && !s
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '"' || c == '\\');
    if plain {
        s.to_owned()
    } else {
        format!("{s:?}")
    }
}

fn shorten(s: &str) -> String {
    if s.chars().count() > MAX_VALUE_CHARS {
        let mut t: String = s.chars().take(MAX_VALUE_CHARS).collect();
        t.push('…');
        t
    } else {
        s.to_owned()
    }
}

struct Details(String);

impl Details {
    fn kv(&mut self, key: &str, value: impl std::fmt::Display) -> &mut Self {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        // Writing to a String cannot fail.
        let _ = write!(self.0, "{key}={}", cell(&value.to_string()));
        self
    }

    fn opt(&mut self, key: &str, value: Option<impl std::fmt::Display>) -> &mut Self {
        if let Some(v) = value {
            self.kv(key, v);
        }
        self
    }
}

fn details(r: &AuditRecord) -> String {
    let mut d = Details(String::new());
    match &r.event.kind {
        AuditEventKind::SessionOpen(e) => {
            d.kv("listener", &e.listener)
                .kv("client", e.client)
                .kv("local", e.local)
                .opt("original_dst", e.original_dst.as_ref());
            if let Some(t) = &e.client_tls {
                d.kv("tls", &t.version)
                    .kv("cipher", &t.cipher)
                    .opt("sni", t.sni.as_ref());
            }
        }
        AuditEventKind::Tls(e) => {
            d.kv("side", e.side.as_str())
                .kv("version", &e.version)
                .kv("cipher", &e.cipher)
                .opt("sni", e.sni.as_ref());
        }
        AuditEventKind::Login(e) => {
            d.kv("method", &e.method)
                .kv("outcome", e.outcome.as_str())
                .opt("code", e.code.as_ref())
                .opt("rule", e.rule.as_ref());
        }
        AuditEventKind::Denied(e) => {
            d.kv("rule", &e.rule).kv("verb", &e.verb);
        }
        AuditEventKind::Retrieve(e) => {
            d.kv("verb", e.verb.as_str())
                .kv("msg", e.msg)
                .opt("lines", e.lines)
                .kv("octets", e.octets)
                .opt("uidl", e.uidl.as_ref());
            if e.no_uidl {
                d.kv("no_uidl", true);
            }
            if !e.complete {
                d.kv("complete", false);
            }
            for (name, value) in e.headers.iter() {
                d.kv(&cell(&name.to_ascii_lowercase()), shorten(value));
            }
        }
        AuditEventKind::Scan(e) => {
            d.kv("verb", e.verb.as_str())
                .kv("msg", e.msg)
                .kv("scanner", &e.scanner)
                .kv("verdict", e.verdict.as_str())
                .opt("name", e.name.as_ref())
                .opt("score", e.score)
                .opt("required", e.required)
                .kv("action", e.action.as_str())
                .kv("duration_ms", e.duration_ms)
                .opt("uidl", e.uidl.as_ref())
                .opt("message_id", e.message_id.as_ref());
            if e.no_uidl {
                d.kv("no_uidl", true);
            }
        }
        AuditEventKind::DeleteMarked(e) => {
            d.kv("msg", e.msg)
                .opt("uidl", e.uidl.as_ref())
                .opt("message_id", e.message_id.as_ref());
            if e.no_uidl {
                d.kv("no_uidl", true);
            }
        }
        AuditEventKind::Reset(_) => {}
        AuditEventKind::Update(e) => {
            let deleted: Vec<String> = e
                .deleted
                .iter()
                .map(|m| match (&m.uidl, &m.message_id) {
                    (Some(u), Some(id)) => format!("{}({u}|{id})", m.msg),
                    (Some(u), None) => format!("{}({u})", m.msg),
                    (None, Some(id)) => format!("{}({id})", m.msg),
                    (None, None) => m.msg.to_string(),
                })
                .collect();
            d.kv("outcome", e.outcome.as_str());
            if deleted.is_empty() {
                d.kv("deleted", "none");
            } else {
                d.kv("deleted", deleted.join(","));
            }
        }
        AuditEventKind::SessionClose(e) => {
            d.kv("reason", e.reason.as_str())
                .kv("in", e.bytes_from_client)
                .kv("out", e.bytes_to_client)
                .kv(
                    "duration",
                    // "1h5m3s400ms": exact, and one word in the table.
                    humantime::format_duration(Duration::from_millis(e.duration_ms))
                        .to_string()
                        .replace(' ', ""),
                )
                .opt("rule", e.rule.as_ref());
        }
        AuditEventKind::Unknown => {
            d.kv("schema", r.event.schema);
        }
    }
    if !r.event.tags.is_empty() {
        d.kv("tags", r.event.tags.join(","));
    }
    d.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> SystemTime {
        humantime::parse_rfc3339(s).unwrap()
    }

    #[test]
    fn since_forms() {
        let now = t("2026-03-01T12:00:00Z");
        assert_eq!(parse_since("2h", now).unwrap(), t("2026-03-01T10:00:00Z"));
        assert_eq!(
            parse_since("1h 30m", now).unwrap(),
            t("2026-03-01T10:30:00Z")
        );
        assert_eq!(
            parse_since("7days", now).unwrap(),
            t("2026-02-22T12:00:00Z")
        );
        assert_eq!(
            parse_since("2026-03-01T09:00:00Z", now).unwrap(),
            t("2026-03-01T09:00:00Z")
        );
        assert_eq!(
            parse_since("2026-03-01T09:00:00.250Z", now).unwrap(),
            t("2026-03-01T09:00:00.250Z")
        );
        assert_eq!(
            parse_since("2026-03-01T11:00:00+02:00", now).unwrap(),
            t("2026-03-01T09:00:00Z")
        );
        assert_eq!(
            parse_since("2026-03-01T04:30:00-04:30", now).unwrap(),
            t("2026-03-01T09:00:00Z")
        );
        assert_eq!(
            parse_since("2026-03-01T09:00:00+00:00", now).unwrap(),
            t("2026-03-01T09:00:00Z")
        );
        assert_eq!(
            parse_since("2026-03-01", now).unwrap(),
            t("2026-03-01T00:00:00Z")
        );
        assert_eq!(
            parse_since("2026-03-01 09:15", now).unwrap(),
            t("2026-03-01T09:15:00Z")
        );
        assert_eq!(
            parse_since("yesterday", now).unwrap(),
            t("2026-02-28T00:00:00Z")
        );
        assert_eq!(
            parse_since("Today", now).unwrap(),
            t("2026-03-01T00:00:00Z")
        );
        let until = |s| parse_time(s, now, true).unwrap();
        assert_eq!(until("today"), t("2026-03-02T00:00:00Z"));
        assert_eq!(until("yesterday"), t("2026-03-01T00:00:00Z"));
        assert_eq!(until("2026-02-27"), t("2026-02-28T00:00:00Z"));
        assert_eq!(until("2026-02-27 10:00"), t("2026-02-27T10:01:00Z"));
        assert_eq!(until("2026-02-27T10:00:00Z"), t("2026-02-27T10:00:00.001Z"));
        for bad in [
            "",
            "tomorrow",
            "2026-13-01",
            "2026-03-01T25:00:00Z",
            "2h ago",
            "-2h",
        ] {
            assert!(parse_since(bad, now).is_err(), "{bad}");
        }
        assert_eq!(parse_since("100000days", now).unwrap(), UNIX_EPOCH);
    }

    #[test]
    fn filter_from_args() {
        let f = AuditFilter::from_args(
            Some("bob".into()),
            Some("1h"),
            &["retrieve,delete_marked".into(), "update".into()],
        )
        .unwrap();
        assert_eq!(f.events, ["retrieve", "delete_marked", "update"]);
        assert!(f.since.is_some());
        let e = AuditFilter::from_args(None, None, &["retreive".into()]).unwrap_err();
        assert!(e.to_string().contains("retreive") && e.to_string().contains("retrieve"));
        assert!(AuditFilter::from_args(None, Some("soon"), &[]).is_err());
    }

    #[test]
    fn cells_are_terminal_safe() {
        assert_eq!(cell("bob"), "bob");
        assert_eq!(cell("a b"), "\"a b\"");
        assert_eq!(cell("\u{1b}[31mred"), "\"\\u{1b}[31mred\"");
        assert_eq!(cell("\u{9b}2J"), "\"\\u{9b}2J\"");
        assert_eq!(cell(""), "\"\"");
        assert_eq!(
            shorten(&"é".repeat(100)).chars().count(),
            MAX_VALUE_CHARS + 1
        );
    }
}
