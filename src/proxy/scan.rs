//! Content scanning as the hop applies it (issue 23): what a `scan` rule asks the driver for
//! ([`ScanRequest`]), the settings the hop judges verdicts by ([`ScanPolicy`], plain data built
//! by the driver from the config) and what the client got ([`ScanAction`]). The scanners
//! themselves (sockets, the spool) are the driver's and `scan`'s; see `docs/scanning.md`.

use std::sync::Arc;

use bytes::Bytes;

use crate::config::scan::{OnScanError, OnSpam, OnVirus, ScanConfig, ScannerConfig};
use crate::pop3::command::Verb;
use crate::pop3::response::dot_stuff;
use crate::types::{ScanReport, ScanVerdict};

/// What [`Output::Scan`](super::Output::Scan) asks the driver to scan: the spool, by these
/// scanners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScanRequest {
    /// The scanners' names (`[[scanner]]` entries), in the order the rules named them: one
    /// report each, in this order, is the answer ([`Hop::scan_done`](super::Hop::scan_done)).
    pub(crate) scanners: Arc<[Arc<str>]>,
    /// The message number the body belongs to.
    pub(crate) msg: u32,
}

/// What the client got for a message a `scan` rule selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScanAction {
    /// Relayed as the server sent it (an `X-Popgate-Scan:` header added with `header = true`).
    Delivered,
    /// Relayed with headers that say what was found (spam, or infected with `on_virus =
    /// "tag"`, or unscanned after a scanner error with `on_error = "pass"`).
    Tagged,
    /// A notice in its place; the original stays on the server.
    Replaced,
    /// `-ERR` for it (`on_virus = "deny"`).
    Denied,
    /// `-ERR [SYS/TEMP]` for it (`on_error = "tempfail"`): the client retries later.
    Tempfailed,
    /// Relayed unscanned (larger than every scanner's `max_size`), tagged as such.
    Unscanned,
}

impl ScanAction {
    /// The lower-case name used in the audit trail.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ScanAction::Delivered => "delivered",
            ScanAction::Tagged => "tagged",
            ScanAction::Replaced => "replaced",
            ScanAction::Denied => "denied",
            ScanAction::Tempfailed => "tempfailed",
            ScanAction::Unscanned => "unscanned",
        }
    }
}

/// The scan settings of a session (`[[scanner]]` sizes and `[scan]`), as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScanPolicy {
    /// Each scanner's `max_size`, by name.
    pub(crate) max_size: Vec<(Arc<str>, u64)>,
    /// `scan.on_virus`.
    pub(crate) on_virus: OnVirus,
    /// `scan.on_spam`.
    pub(crate) on_spam: OnSpam,
    /// `scan.on_error`.
    pub(crate) on_error: OnScanError,
    /// `scan.header`: an `X-Popgate-Scan:` line on every scanned message.
    pub(crate) header: bool,
    /// The notice's `From:`.
    pub(crate) notice_from: String,
    /// Whom the notice's reader should ask for the original.
    pub(crate) contact: String,
}

impl ScanPolicy {
    /// The policy the config gives.
    pub(crate) fn new(scanners: &[ScannerConfig], scan: &ScanConfig) -> ScanPolicy {
        ScanPolicy {
            max_size: scanners
                .iter()
                .map(|s| (Arc::from(s.name.as_str()), s.max_size.0))
                .collect(),
            on_virus: scan.on_virus,
            on_spam: scan.on_spam,
            on_error: scan.on_error,
            header: scan.header,
            notice_from: scan.notice_from.clone(),
            contact: scan.contact.clone(),
        }
    }

    /// The most a body is held for `scanners`: the largest `max_size` among them (a name
    /// that is no scanner counts 0: `popgate check` refuses such rules).
    pub(crate) fn cap(&self, scanners: &[Arc<str>]) -> u64 {
        scanners
            .iter()
            .filter_map(|n| self.max_size.iter().find(|(m, _)| m == n).map(|(_, s)| *s))
            .max()
            .unwrap_or(0)
    }
}

/// How much of a held message's header block the hop keeps, for the notice.
pub(crate) const MAX_HEAD: usize = 32 * 1024;

/// The header line added to a message relayed unscanned because it is too large.
pub(crate) const UNSCANNED_TOO_LARGE: &[u8] = b"X-Popgate-Scan: unscanned (too large)\r\n";

/// A retrieval a `scan` rule selected, from its command to its verdict.
#[derive(Debug)]
pub(crate) struct Scanning {
    /// The scanners to ask.
    pub(super) scanners: Arc<[Arc<str>]>,
    /// The message.
    pub(super) msg: u32,
    /// `RETR` or `TOP`.
    pub(super) verb: Verb,
    /// The `+OK` line, held (as the client is to get it); `None` until it came.
    pub(super) status: Option<Bytes>,
    /// The most body octets held (the largest `max_size` of the scanners).
    pub(super) cap: u64,
    /// Body octets handed to the spool so far.
    pub(super) spooled: u64,
    /// The body is complete and the scan asked for: waiting for the verdict.
    pub(super) waiting: bool,
    /// The start of the body (its header block), at most [`MAX_HEAD`] octets, for a notice.
    head: Vec<u8>,
    /// The header block is complete in `head` (or `head` is full).
    head_done: bool,
}

impl Scanning {
    pub(super) fn new(scanners: Arc<[Arc<str>]>, msg: u32, verb: Verb) -> Scanning {
        Scanning {
            scanners,
            msg,
            verb,
            status: None,
            cap: 0,
            spooled: 0,
            waiting: false,
            head: Vec::new(),
            head_done: false,
        }
    }

    /// Keep what of `data` (the body's next wire bytes) belongs to the header block.
    pub(super) fn keep_head(&mut self, data: &[u8]) {
        if self.head_done {
            return;
        }
        let room = MAX_HEAD - self.head.len();
        let take = data.len().min(room);
        // Look for the blank line from a little before the new bytes (it may straddle).
        let from = self.head.len().saturating_sub(3);
        self.head.extend_from_slice(&data[..take]);
        if let Some(end) = blank_line(&self.head[from..]) {
            self.head.truncate(from + end);
            self.head_done = true;
        } else if self.head.len() >= MAX_HEAD {
            self.head_done = true;
        }
    }

    /// The header block kept (wire bytes, possibly cut at [`MAX_HEAD`]).
    pub(super) fn head(&self) -> &[u8] {
        &self.head
    }
}

/// Where the header block of `b` ends: the offset just past its blank line's line end.
fn blank_line(b: &[u8]) -> Option<usize> {
    let crlf = memchr::memmem::find(b, b"\r\n\r\n").map(|i| i + 4);
    let lf = memchr::memmem::find(b, b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What the client gets for a judged message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The status line, added header lines, the message, the terminator.
    Deliver,
    /// A notice in its place.
    Replace,
    /// `-ERR`.
    Deny,
    /// `-ERR [SYS/TEMP]`.
    Tempfail,
}

/// The policy applied to a set of reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Judgement {
    /// For the audit trail.
    pub(crate) action: ScanAction,
    /// For the client.
    pub(crate) outcome: Outcome,
    /// Header lines (CRLF each) to add before the message's own (with [`Outcome::Deliver`]).
    pub(crate) headers: Vec<u8>,
    /// The report that decided (infected, error or spam), if one did.
    pub(crate) decisive: Option<usize>,
}

/// Judge a message by its reports: the worst verdict decides (infected, then error, then
/// spam, then too large, then clean; no report at all counts as an error).
pub(crate) fn judge(p: &ScanPolicy, reports: &[ScanReport]) -> Judgement {
    let first = |v: ScanVerdict| reports.iter().position(|r| r.verdict == v);
    let summary = summary(reports);
    let line = |overall: &str| {
        let mut h = format!("X-Popgate-Scan: {overall}");
        if !summary.is_empty() {
            h.push_str("; ");
            h.push_str(&summary);
        }
        h.push_str("\r\n");
        h.into_bytes()
    };
    let j = |action, outcome, headers, decisive| Judgement {
        action,
        outcome,
        headers,
        decisive,
    };
    if let Some(i) = first(ScanVerdict::Infected) {
        return match p.on_virus {
            OnVirus::Replace => j(ScanAction::Replaced, Outcome::Replace, Vec::new(), Some(i)),
            OnVirus::Deny => j(ScanAction::Denied, Outcome::Deny, Vec::new(), Some(i)),
            OnVirus::Tag => j(
                ScanAction::Tagged,
                Outcome::Deliver,
                line("infected"),
                Some(i),
            ),
        };
    }
    let error = first(ScanVerdict::Error).or(reports.is_empty().then_some(0));
    if let Some(i) = error {
        let i = (!reports.is_empty()).then_some(i);
        return match p.on_error {
            OnScanError::Tempfail => j(ScanAction::Tempfailed, Outcome::Tempfail, Vec::new(), i),
            OnScanError::Pass => j(
                ScanAction::Unscanned,
                Outcome::Deliver,
                line("unscanned (error)"),
                i,
            ),
        };
    }
    if let Some(i) = first(ScanVerdict::Spam) {
        if p.on_spam == OnSpam::Replace {
            return j(ScanAction::Replaced, Outcome::Replace, Vec::new(), Some(i));
        }
        let mut headers = if p.header { line("spam") } else { Vec::new() };
        match reports[i].score {
            Some((score, required)) => headers.extend_from_slice(
                format!(
                    "X-Spam-Status: Yes, score={score:.2} required={required:.2}\r\n\
                     X-Spam-Score: {score:.2}\r\n"
                )
                .as_bytes(),
            ),
            None => headers.extend_from_slice(b"X-Spam-Status: Yes\r\n"),
        }
        return j(ScanAction::Tagged, Outcome::Deliver, headers, Some(i));
    }
    if first(ScanVerdict::TooLarge).is_some() {
        return j(
            ScanAction::Unscanned,
            Outcome::Deliver,
            line("unscanned (too large)"),
            None,
        );
    }
    let headers = if p.header { line("clean") } else { Vec::new() };
    j(ScanAction::Delivered, Outcome::Deliver, headers, None)
}

/// `name=verdict (detail)` per report, for the `X-Popgate-Scan:` line: printable ASCII,
/// bounded.
fn summary(reports: &[ScanReport]) -> String {
    let mut out = String::new();
    for r in reports {
        if out.len() > 800 {
            out.push_str(", ...");
            break;
        }
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(&clean(&r.scanner, 64));
        out.push('=');
        out.push_str(r.verdict.as_str());
        let detail = match (r.verdict, r.score, &r.detail) {
            (ScanVerdict::Spam, Some((s, req)), _) => Some(format!("{s:.2}/{req:.2}")),
            (ScanVerdict::Clean | ScanVerdict::TooLarge, _, _) => None,
            (_, _, Some(d)) => Some(clean(d, 64)),
            _ => None,
        };
        if let Some(d) = detail.filter(|d| !d.is_empty()) {
            out.push_str(" (");
            out.push_str(&d);
            out.push(')');
        }
    }
    out
}

/// `s` as one line of printable ASCII without `(`, `)`, `,` and `;` (they structure the
/// header), white space collapsed, at most `max` characters.
pub(crate) fn clean(s: &str, max: usize) -> String {
    one_line(s, max, &['(', ')', ',', ';'])
}

/// The longest header value a notice repeats from the original.
const MAX_VALUE: usize = 200;

/// The fields of a header block a notice names: the first of each, unfolded, as printable
/// ASCII, at most [`MAX_VALUE`] characters each.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Original {
    pub(crate) from: Option<String>,
    pub(crate) to: Option<String>,
    pub(crate) subject: Option<String>,
    pub(crate) date: Option<String>,
    pub(crate) message_id: Option<String>,
}

impl Original {
    /// Read `head` (a header block as on the wire: dot-stuffed, CRLF or LF, possibly cut).
    pub(crate) fn parse(head: &[u8]) -> Original {
        let mut o = Original::default();
        let mut field: Option<(String, String)> = None;
        let take = |o: &mut Original, f: Option<(String, String)>| {
            let Some((name, value)) = f else { return };
            let slot = match name.to_ascii_lowercase().as_str() {
                "from" => &mut o.from,
                "to" => &mut o.to,
                "subject" => &mut o.subject,
                "date" => &mut o.date,
                "message-id" => &mut o.message_id,
                _ => return,
            };
            if slot.is_none() {
                let v = printable(&value, MAX_VALUE);
                if !v.is_empty() {
                    *slot = Some(v);
                }
            }
        };
        for raw in head.split(|&b| b == b'\n') {
            let line = raw.strip_suffix(b"\r").unwrap_or(raw);
            let line = line.strip_prefix(b".").unwrap_or(line);
            if line.is_empty() {
                break;
            }
            if line[0] == b' ' || line[0] == b'\t' {
                if let Some((_, v)) = field.as_mut()
                    && v.len() < 4 * MAX_VALUE
                {
                    v.push(' ');
                    v.push_str(&String::from_utf8_lossy(line));
                }
                continue;
            }
            take(&mut o, field.take());
            if let Some(colon) = line.iter().position(|&b| b == b':') {
                let name = String::from_utf8_lossy(&line[..colon]).trim().to_owned();
                let value = String::from_utf8_lossy(&line[colon + 1..]).into_owned();
                field = Some((name, value));
            }
        }
        take(&mut o, field);
        o
    }
}

/// `s` as one line of printable ASCII (other characters become `?`, white space collapsed),
/// at most `max` characters.
fn printable(s: &str, max: usize) -> String {
    one_line(s, max, &[])
}

/// `s` as one line of printable ASCII: white space, control characters and `blank` become
/// one space (collapsed, none at either end), other non-ASCII characters `?`; at most `max`
/// characters.
fn one_line(s: &str, max: usize, blank: &[char]) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        let c = match c {
            c if blank.contains(&c) => ' ',
            c if c.is_ascii_graphic() => c,
            c if c.is_whitespace() || c.is_control() => ' ',
            _ => '?',
        };
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        if out.len() >= max {
            break;
        }
        out.push(c);
    }
    out.trim_end().to_owned()
}

/// The notice a replaced message becomes: an RFC 5322 message (CRLF line ends, dot-stuffed,
/// without the terminator line) that says what was found and how to get the original.
pub(crate) fn notice(
    p: &ScanPolicy,
    s: &Scanning,
    reports: &[ScanReport],
    j: &Judgement,
    date: &str,
    uidl: Option<&str>,
) -> Vec<u8> {
    let o = Original::parse(s.head());
    let spam = j
        .decisive
        .and_then(|i| reports.get(i))
        .is_some_and(|r| r.verdict == ScanVerdict::Spam);
    let what = if spam { "spam" } else { "malware" };
    let mut m = String::new();
    let mut h = |name: &str, value: &str| {
        m.push_str(name);
        m.push_str(": ");
        m.push_str(value);
        m.push_str("\r\n");
    };
    h("From", &printable(&p.notice_from, MAX_VALUE));
    if let Some(to) = &o.to {
        h("To", to);
    }
    h("Date", o.date.as_deref().unwrap_or(date));
    let subject = match &o.subject {
        Some(sub) => format!("[{what} removed] {sub}"),
        None => format!("[{what} removed] (no subject)"),
    };
    h("Subject", &subject);
    h("Message-ID", &notice_id(&o, uidl, s));
    h("MIME-Version", "1.0");
    h("Content-Type", "text/plain; charset=us-ascii");
    h("Content-Transfer-Encoding", "7bit");
    h("Auto-Submitted", "auto-generated");
    let found = summary(reports);
    h(
        "X-Popgate-Scan",
        &format!("{}; {found}", if spam { "spam" } else { "infected" }),
    );
    m.push_str("\r\n");
    let mut line = |text: &str| {
        m.push_str(text);
        m.push_str("\r\n");
    };
    line("A message in your mailbox was held back by the mail proxy: a content scanner found");
    line(&format!(
        "{what} in it. This notice was delivered in its place."
    ));
    line("");
    for r in reports {
        let mut l = format!("  {}: {}", printable(&r.scanner, 64), r.verdict.as_str());
        if let Some((score, required)) = r.score {
            l.push_str(&format!(", score {score:.2} (required {required:.2})"));
        }
        if let Some(d) = r
            .detail
            .as_deref()
            .filter(|_| r.verdict != ScanVerdict::Clean)
        {
            l.push_str(&format!(" ({})", printable(d, 100)));
        }
        line(&l);
    }
    line("");
    line("The original message:");
    let none = "(none)";
    line(&format!(
        "  From:       {}",
        o.from.as_deref().unwrap_or(none)
    ));
    line(&format!(
        "  Subject:    {}",
        o.subject.as_deref().unwrap_or(none)
    ));
    line(&format!(
        "  Date:       {}",
        o.date.as_deref().unwrap_or(none)
    ));
    line(&format!(
        "  Message-ID: {}",
        o.message_id.as_deref().unwrap_or(none)
    ));
    if let Some(u) = uidl {
        line(&format!("  UIDL:       {}", printable(u, 70)));
    }
    line("");
    line("It has not been deleted: it stays on the server. To get it, contact");
    line(&format!("{}.", printable(&p.contact, MAX_VALUE)));
    dot_stuff(m.as_bytes())
}

/// A Message-ID for the notice, derived from the original's (or the UIDL, or the message
/// number and the header block), so that the same message always gets the same one.
fn notice_id(o: &Original, uidl: Option<&str>, s: &Scanning) -> String {
    let keep = |v: &str| -> String {
        v.chars()
            .filter(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.@".contains(*c))
            .take(MAX_VALUE)
            .collect()
    };
    if let Some(id) = &o.message_id {
        let inner = keep(id.trim_start_matches('<').trim_end_matches('>'));
        if !inner.is_empty() {
            let inner = if inner.contains('@') {
                inner
            } else {
                format!("{inner}@popgate.invalid")
            };
            return format!("<notice.{inner}>");
        }
    }
    if let Some(u) = uidl.map(keep).filter(|u| !u.is_empty() && !u.contains('@')) {
        return format!("<notice.uidl.{u}@popgate.invalid>");
    }
    // FNV-1a of the header block: stable across retrievals of the same message.
    let hash = s.head().iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("<notice.{}.{hash:016x}@popgate.invalid>", s.msg)
}

/// `time` as an RFC 5322 date in UTC (`Mon, 07 Dec 2026 15:04:05 +0000`): the driver passes
/// it to [`Hop::scan_done`](super::Hop::scan_done) for a notice when the original has none.
pub(crate) fn rfc5322_date(time: std::time::SystemTime) -> String {
    let secs = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {d:02} {} {y} {:02}:{:02}:{:02} +0000",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[(m - 1) as usize],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Year, month (1-12) and day of the month of a day count since 1970-01-01 (the proleptic
/// Gregorian calendar, as in `date -u`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shifted to start on 0000-03-01, so that leap days end a year; eras of 400 years.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn dates_are_rfc5322_in_utc() {
        let at = |s: u64| rfc5322_date(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        // `date -u -d @951782400`: the leap day of a century divisible by 400.
        assert_eq!(at(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(at(1_796_656_282), "Mon, 07 Dec 2026 15:11:22 +0000");
        // 2100 is no leap year.
        assert_eq!(at(4_107_542_399), "Sun, 28 Feb 2100 23:59:59 +0000");
    }

    #[test]
    fn a_header_block_is_read_unfolded_first_field_wins_and_printable() {
        let head = b"From mbox line\r\nSubject: caf\xc3\xa9\r\n\tfolded\r\n..Odd: x\r\nsubject: second\r\nTo: a@b\r\n\r\nFrom: body@x\r\n";
        let o = Original::parse(head);
        assert_eq!(o.subject.as_deref(), Some("caf? folded"));
        assert_eq!(o.to.as_deref(), Some("a@b"));
        assert_eq!(o.from, None, "the body is not the header block");
        let long = format!("Subject: {}\n\n", "x".repeat(1000));
        assert_eq!(
            Original::parse(long.as_bytes()).subject.map(|s| s.len()),
            Some(MAX_VALUE)
        );
        // Kept only as far as the blank line, across chunks.
        let mut s = Scanning::new(vec![].into(), 1, Verb::Retr);
        for chunk in [&b"Subject: a\r"[..], b"\n\r", b"\nbody\r\n"] {
            s.keep_head(chunk);
        }
        assert_eq!(s.head(), b"Subject: a\r\n\r\n");
    }

    #[test]
    fn dot_stuffing_doubles_a_leading_dot_only() {
        assert_eq!(dot_stuff(b".a\r\nb.c\r\n..\r\n"), b"..a\r\nb.c\r\n...\r\n");
    }

    #[test]
    fn the_cap_is_the_largest_max_size_of_the_scanners_asked() {
        let mut p = ScanPolicy::new(&[], &ScanConfig::default());
        p.max_size = vec![(Arc::from("a"), 10), (Arc::from("b"), 30)];
        let names = |n: &[&str]| n.iter().map(|s| Arc::from(*s)).collect::<Vec<Arc<str>>>();
        assert_eq!(p.cap(&names(&["a"])), 10);
        assert_eq!(p.cap(&names(&["a", "b"])), 30);
        assert_eq!(p.cap(&names(&["x"])), 0);
    }
}

#[cfg(test)]
mod injection_tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_notice_cannot_be_given_headers_through_the_originals_fields() {
        let head: &[u8] = b"Subject: hi\rBcc: victim@example.net\r\n\
            From: a@b\x00\r\nBcc: second@example.net\r\n\
            To: \xff\xfe\x1b[31m <x@y>\r\n\
            Date: Mon\r\n \r\n\
            Message-ID: <a b>c@d\r\n\r\nbody\r\n";
        let mut long = b"Subject: ".to_vec();
        long.extend(std::iter::repeat_n(b'x', 5000));
        long.extend_from_slice(b"\r\n\r\n");
        let p = ScanPolicy::new(&[], &ScanConfig::default());
        let reports = [ScanReport {
            scanner: Arc::from("clamav\r\nBcc: z"),
            verdict: ScanVerdict::Infected,
            detail: Some("Eicar\r\n.\r\nBcc: z".into()),
            score: None,
            duration: Duration::ZERO,
        }];
        let j = judge(&p, &reports);
        for head in [head, &long[..]] {
            let mut s = Scanning::new(vec![].into(), 1, Verb::Retr);
            s.keep_head(head);
            let n = notice(
                &p,
                &s,
                &reports,
                &j,
                "Mon, 07 Dec 2026 15:04:05 +0000",
                None,
            );
            let text = String::from_utf8(n.clone()).expect("ASCII");
            let header_block = &text[..text.find("\r\n\r\n").unwrap()];
            for line in text.split("\r\n") {
                assert!(line.len() <= 998, "a line of {} octets", line.len());
                assert!(
                    line.bytes().all(|b| b == b' ' || b.is_ascii_graphic()),
                    "{line:?}"
                );
                assert_ne!(line, ".", "a terminator inside the notice");
            }
            assert!(!text.replace("\r\n", "").contains(['\r', '\n']));
            for line in header_block.split("\r\n") {
                let name = line.split(':').next().unwrap();
                assert!(
                    [
                        "From",
                        "To",
                        "Date",
                        "Subject",
                        "Message-ID",
                        "MIME-Version",
                        "Content-Type",
                        "Content-Transfer-Encoding",
                        "Auto-Submitted",
                        "X-Popgate-Scan"
                    ]
                    .contains(&name),
                    "{line:?}"
                );
            }
            let id = header_block
                .lines()
                .find_map(|l| l.strip_prefix("Message-ID: "))
                .unwrap();
            assert!(
                id.starts_with('<')
                    && id.ends_with('>')
                    && !id[1..id.len() - 1].contains(['<', '>', ' ']),
                "{id}"
            );
        }
    }
}
