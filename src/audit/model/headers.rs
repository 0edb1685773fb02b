//! Header extraction from a streamed RETR/TOP body, for `retrieve` audit events.
//!
//! Pure and resumable: [`HeaderExtractor::feed`] takes the body's wire bytes in whatever chunks
//! they arrive (still dot-stuffed, CRLF or bare LF, the terminating `.` line may be included)
//! and collects the configured header fields until the header block ends: at the blank line,
//! at the body's end, at the first line that cannot be a header field, or after
//! `max_header_bytes` octets. After that every `feed` returns at once, so a 50 MB message costs
//! nothing beyond its header block.
//!
//! Memory: nothing is allocated until a wanted header is found; the stored values never add
//! up to more than the octets scanned, which is at most `max_header_bytes`. The body is never
//! stored.
//!
//! Values are unfolded (a line break followed by white space becomes one space), trimmed, with
//! control characters turned into spaces and 8-bit bytes decoded lossily as UTF-8. The first
//! occurrence of a field wins; names match case-insensitively.

use std::sync::Arc;

use super::event::Headers;

/// The configured header names, compiled once and shared by every session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderSet {
    names: Box<[String]>,
    longest: usize,
    max_bytes: usize,
}

impl HeaderSet {
    /// Headers to collect (spelt as they should appear in events) and the scan limit in
    /// octets (at least 1).
    pub(crate) fn new(names: &[String], max_bytes: usize) -> HeaderSet {
        HeaderSet {
            longest: names.iter().map(String::len).max().unwrap_or(0),
            names: names.into(),
            max_bytes: max_bytes.max(1),
        }
    }

    /// How far a header block is scanned, in octets.
    pub(crate) fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    fn slot(&self, name: &[u8]) -> Option<usize> {
        self.names
            .iter()
            .position(|n| n.as_bytes().eq_ignore_ascii_case(name))
    }
}

/// Where the extractor stands within the current line (after dot-unstuffing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pos {
    /// Nothing of this line seen yet.
    Start,
    /// The line began with `.`, which was removed; nothing else seen yet.
    AfterDot,
    /// Inside a field name.
    Name,
    /// After a field name and white space, before the colon (obsolete syntax).
    NameWsp,
    /// After the colon: the value.
    Value,
    /// In the leading white space of a continuation line.
    Fold,
    /// A line ignored to its end (a leading mbox `From ` line).
    Skip,
}

/// Collects configured header fields from a streamed multi-line body. See the module docs.
#[derive(Debug, Clone)]
pub(crate) struct HeaderExtractor {
    set: Arc<HeaderSet>,
    pos: Pos,
    /// A `\r` seen but not yet known to be part of a line ending.
    pending_cr: bool,
    /// No line ending seen yet.
    first_line: bool,
    done: bool,
    truncated: bool,
    /// Wire octets consumed so far.
    scanned: usize,
    /// The current field name, kept only up to the longest wanted name plus one.
    name: Vec<u8>,
    /// The slot of the field whose value (and continuation lines) is being collected.
    current: Option<usize>,
    /// Collected values by slot; empty until the first wanted field is found.
    values: Vec<Option<Vec<u8>>>,
}

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// RFC 5322 `ftext`: printable US-ASCII except the colon.
fn is_ftext(b: u8) -> bool {
    (33..=126).contains(&b) && b != b':'
}

/// Control characters (including tab) become spaces so that values are one clean line.
fn clean(b: u8) -> u8 {
    if b < 0x20 || b == 0x7f { b' ' } else { b }
}

fn trim_trailing_spaces(v: &mut Vec<u8>) {
    while v.last() == Some(&b' ') {
        v.pop();
    }
}

impl HeaderExtractor {
    /// An extractor at the start of a body. Allocates nothing.
    pub(crate) fn new(set: Arc<HeaderSet>) -> HeaderExtractor {
        HeaderExtractor {
            done: set.names.is_empty(),
            set,
            pos: Pos::Start,
            pending_cr: false,
            first_line: true,
            truncated: false,
            scanned: 0,
            name: Vec::new(),
            current: None,
            values: Vec::new(),
        }
    }

    /// Whether the header block is over: further `feed`s are ignored.
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    /// Whether scanning stopped at `max_header_bytes` before the header block ended.
    #[cfg(test)] // chunk-size tests; events do not report it
    pub(crate) fn truncated(&self) -> bool {
        self.truncated
    }

    /// Octets of body scanned so far (at most `max_header_bytes`).
    #[cfg(test)] // chunk-size tests check the bound
    pub(crate) fn scanned(&self) -> usize {
        self.scanned
    }

    /// Octets held for collected values and the current name (bounded by `scanned`).
    #[cfg(test)] // chunk-size tests check memory stays bounded
    pub(crate) fn held(&self) -> usize {
        self.name.len() + self.values.iter().flatten().map(Vec::len).sum::<usize>()
    }

    /// Scan the next chunk of the body's wire bytes.
    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        let mut i = 0;
        while i < chunk.len() {
            if self.done {
                return;
            }
            if self.scanned >= self.set.max_bytes {
                self.truncated = true;
                self.done = true;
                return;
            }
            if self.ignoring() && !self.pending_cr {
                // Most of a header block is values nobody asked for (Received, DKIM, ...):
                // jump to the next line ending instead of stepping through them.
                let limit = (chunk.len() - i).min(self.set.max_bytes - self.scanned);
                let n = memchr::memchr2(b'\r', b'\n', &chunk[i..i + limit]).unwrap_or(limit);
                self.scanned += n;
                i += n;
                if n > 0 {
                    continue;
                }
            }
            let b = chunk[i];
            i += 1;
            self.scanned += 1;
            if self.pending_cr {
                self.pending_cr = false;
                if b == b'\n' {
                    self.end_of_line();
                    continue;
                }
                self.byte(b'\r');
                if self.done {
                    return;
                }
            }
            match b {
                b'\r' => self.pending_cr = true,
                b'\n' => self.end_of_line(),
                _ => self.byte(b),
            }
        }
    }

    /// Whether content bytes of the current line are thrown away.
    fn ignoring(&self) -> bool {
        self.pos == Pos::Skip || (self.pos == Pos::Value && self.current.is_none())
    }

    /// The body ended (or the caller stops scanning): return the fields found, in configured
    /// order. An unterminated last line counts as a line.
    pub(crate) fn finish(mut self) -> Headers {
        if self.pending_cr && !self.done {
            self.pending_cr = false;
            self.byte(b'\r');
        }
        let names = &self.set.names;
        Headers(
            self.values
                .into_iter()
                .enumerate()
                .filter_map(|(i, v)| {
                    let v = v?;
                    let value = String::from_utf8_lossy(&v).trim_ascii().to_owned();
                    Some((names.get(i)?.clone(), value))
                })
                .collect(),
        )
    }

    fn end_of_line(&mut self) {
        match self.pos {
            // A blank line ends the header block; a lone "." ends the body.
            Pos::Start | Pos::AfterDot => self.finish_block(),
            Pos::Name | Pos::NameWsp => self.invalid_line(true),
            Pos::Value | Pos::Fold | Pos::Skip => {}
        }
        if !self.done {
            self.pos = Pos::Start;
            self.first_line = false;
        }
    }

    fn finish_block(&mut self) {
        self.done = true;
        self.current = None;
        self.name = Vec::new();
    }

    /// A line that cannot be a header field ends the block, except a leading mbox
    /// `From sender date` line, which is skipped.
    fn invalid_line(&mut self, at_eol: bool) {
        if self.first_line && self.pos == Pos::NameWsp && self.name == b"From" {
            self.pos = Pos::Skip;
            if at_eol {
                self.pos = Pos::Start;
            }
        } else {
            self.finish_block();
        }
    }

    /// One content byte (not part of a line ending).
    fn byte(&mut self, b: u8) {
        match self.pos {
            Pos::Start if b == b'.' => self.pos = Pos::AfterDot,
            Pos::Start | Pos::AfterDot => self.line_start(b),
            Pos::Name => {
                if is_ftext(b) {
                    self.push_name(b);
                } else if b == b':' {
                    self.field_found();
                } else if is_wsp(b) {
                    self.pos = Pos::NameWsp;
                } else {
                    self.invalid_line(false);
                }
            }
            Pos::NameWsp => {
                if b == b':' {
                    self.field_found();
                } else if !is_wsp(b) {
                    self.invalid_line(false);
                }
            }
            Pos::Value => {
                if let Some(v) = self.current_value()
                    && !(v.is_empty() && is_wsp(b))
                {
                    v.push(clean(b));
                }
            }
            Pos::Fold => {
                if !is_wsp(b) {
                    if let Some(v) = self.current_value() {
                        trim_trailing_spaces(v);
                        if !v.is_empty() {
                            v.push(b' ');
                        }
                        v.push(clean(b));
                    }
                    self.pos = Pos::Value;
                }
            }
            Pos::Skip => {}
        }
    }

    /// The first byte of a line (after unstuffing).
    fn line_start(&mut self, b: u8) {
        if is_wsp(b) {
            if self.first_line {
                // A continuation with nothing to continue: not a header block.
                self.finish_block();
            } else {
                self.pos = Pos::Fold;
            }
        } else if is_ftext(b) {
            self.current = None;
            self.name.clear();
            self.pos = Pos::Name;
            self.push_name(b);
        } else {
            self.finish_block();
        }
    }

    fn push_name(&mut self, b: u8) {
        // Longer than every wanted name (and than "From"): it cannot match, so stop keeping it.
        if self.name.len() <= self.set.longest.max(4) {
            self.name.push(b);
        }
    }

    fn field_found(&mut self) {
        self.pos = Pos::Value;
        self.current = None;
        if self.name.len() > self.set.longest {
            return;
        }
        if let Some(slot) = self.set.slot(&self.name) {
            if self.values.is_empty() {
                self.values = vec![None; self.set.names.len()];
            }
            if let Some(v @ None) = self.values.get_mut(slot) {
                *v = Some(Vec::new());
                self.current = Some(slot);
            }
        }
    }

    fn current_value(&mut self) -> Option<&mut Vec<u8>> {
        self.values.get_mut(self.current?)?.as_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(names: &[&str], max: usize) -> Arc<HeaderSet> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        Arc::new(HeaderSet::new(&names, max))
    }

    fn default_set() -> Arc<HeaderSet> {
        set(&["Message-ID", "From", "To", "Subject", "Date"], 16384)
    }

    fn extract_chunked(set: &Arc<HeaderSet>, input: &[u8], size: usize) -> (Headers, bool) {
        let mut h = HeaderExtractor::new(set.clone());
        for c in input.chunks(size.max(1)) {
            h.feed(c);
            assert!(h.held() <= h.scanned(), "held more than scanned");
            assert!(h.scanned() <= set.max_bytes());
        }
        let t = h.truncated();
        (h.finish(), t)
    }

    /// Same result at every chunk size from 1 to the whole input.
    fn extract_all_sizes(set: &Arc<HeaderSet>, input: &[u8]) -> Headers {
        let (whole, t) = extract_chunked(set, input, input.len());
        for size in 1..input.len() {
            let (h, t2) = extract_chunked(set, input, size);
            assert_eq!(h, whole, "chunk size {size}");
            assert_eq!(t, t2, "chunk size {size}");
        }
        whole
    }

    fn pairs(h: &Headers) -> Vec<(&str, &str)> {
        h.iter().collect()
    }

    /// A plain line-based implementation of the same rules over the whole input, as the
    /// oracle for the streaming one.
    fn reference(set: &HeaderSet, input: &[u8]) -> Headers {
        let input = &input[..input.len().min(set.max_bytes)];
        let mut values: Vec<Option<Vec<u8>>> = vec![None; set.names.len()];
        let mut current: Option<usize> = None;
        let mut rest = input;
        let mut first = true;
        while !rest.is_empty() {
            let (mut line, next) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &rest[rest.len()..]),
            };
            let terminated = next.len() < rest.len() - line.len();
            rest = next;
            if terminated && line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            if let Some(l) = line.strip_prefix(b".") {
                if l.is_empty() {
                    break;
                }
                line = l;
            }
            if line.is_empty() {
                break;
            }
            if is_wsp(line[0]) {
                if first {
                    break;
                }
                let content: Vec<u8> = line.iter().copied().skip_while(|&b| is_wsp(b)).collect();
                if let Some(v) = current.and_then(|c| values[c].as_mut())
                    && !content.is_empty()
                {
                    trim_trailing_spaces(v);
                    if !v.is_empty() {
                        v.push(b' ');
                    }
                    v.extend(content.iter().map(|&b| clean(b)));
                }
                first = false;
                continue;
            }
            let name_len = line.iter().take_while(|&&b| is_ftext(b)).count();
            let name = &line[..name_len];
            let after: &[u8] = &line[name_len..];
            let wsp = after.iter().take_while(|&&b| is_wsp(b)).count();
            if name.is_empty() || after.get(wsp) != Some(&b':') {
                if first && name == b"From" && wsp > 0 {
                    first = false;
                    continue;
                }
                break;
            }
            current = None;
            if let Some(slot) = set.slot(name)
                && values[slot].is_none()
            {
                let v: Vec<u8> = after[wsp + 1..]
                    .iter()
                    .copied()
                    .skip_while(|&b| is_wsp(b))
                    .map(clean)
                    .collect();
                values[slot] = Some(v);
                current = Some(slot);
            }
            first = false;
        }
        Headers(
            values
                .into_iter()
                .enumerate()
                .filter_map(|(i, v)| {
                    Some((
                        set.names[i].clone(),
                        String::from_utf8_lossy(&v?).trim_ascii().to_owned(),
                    ))
                })
                .collect(),
        )
    }

    const SIMPLE: &[u8] = b"Return-Path: <a@example.org>\r\n\
        Message-ID: <1@example.org>\r\n\
        From: Alice <alice@example.org>\r\n\
        To: bob@example.org\r\n\
        Subject: Hello\r\n\
        Date: Sun, 1 Mar 2026 08:15:00 +0000\r\n\
        \r\n\
        Body line\r\n\
        Subject: not a header\r\n\
        .\r\n";

    #[test]
    fn simple_message_at_every_chunk_size() {
        let h = extract_all_sizes(&default_set(), SIMPLE);
        assert_eq!(
            pairs(&h),
            [
                ("Message-ID", "<1@example.org>"),
                ("From", "Alice <alice@example.org>"),
                ("To", "bob@example.org"),
                ("Subject", "Hello"),
                ("Date", "Sun, 1 Mar 2026 08:15:00 +0000"),
            ]
        );
        assert_eq!(reference(&default_set(), SIMPLE), h);
    }

    #[test]
    fn lf_only_and_mixed_line_endings() {
        let lf = String::from_utf8(SIMPLE.to_vec())
            .unwrap()
            .replace("\r\n", "\n");
        assert_eq!(
            extract_all_sizes(&default_set(), lf.as_bytes()),
            extract_all_sizes(&default_set(), SIMPLE)
        );
        let mixed = b"Subject: a\nFrom: b\r\nTo: c\n\nbody\r\n";
        let h = extract_all_sizes(&default_set(), mixed);
        assert_eq!(pairs(&h), [("From", "b"), ("To", "c"), ("Subject", "a")]);
    }

    #[test]
    fn folded_headers_are_unfolded() {
        let msg = b"Subject: a long\r\n  subject\r\n\tline  \r\nTo: x,\r\n y\r\n\r\nbody\r\n";
        let h = extract_all_sizes(&default_set(), msg);
        assert_eq!(
            pairs(&h),
            [("To", "x, y"), ("Subject", "a long subject line")]
        );
        // An empty first line of a folded value.
        let msg = b"Subject:\r\n \r\n   hello\r\n\r\n";
        let h = extract_all_sizes(&default_set(), msg);
        assert_eq!(pairs(&h), [("Subject", "hello")]);
        // A continuation of an unwanted header stays out of the wanted one before it.
        let msg = b"Subject: s\r\nX-Long: a\r\n b\r\n\r\n";
        assert_eq!(
            pairs(&extract_all_sizes(&default_set(), msg)),
            [("Subject", "s")]
        );
    }

    #[test]
    fn dot_stuffed_lines_are_unstuffed() {
        let msg = b"..Subject: dotted\r\nSubject: plain\r\nFrom: ..me\r\n\r\n";
        let h = extract_all_sizes(&set(&[".Subject", "Subject", "From"], 1000), msg);
        assert_eq!(
            pairs(&h),
            [
                (".Subject", "dotted"),
                ("Subject", "plain"),
                ("From", "..me")
            ]
        );
        // A stuffed continuation line.
        let msg = b"Subject: a\r\n..b\r\n\r\n";
        // "..b" unstuffs to ".b": not white space, so not a continuation, and not a header:
        // the block ends there.
        assert_eq!(
            pairs(&extract_all_sizes(&default_set(), msg)),
            [("Subject", "a")]
        );
        let msg = b"Subject: a\r\n. b\r\nTo: t\r\n\r\n";
        // ". b" is a stuffed " b": a continuation.
        assert_eq!(
            pairs(&extract_all_sizes(&default_set(), msg)),
            [("To", "t"), ("Subject", "a b")]
        );
    }

    #[test]
    fn terminator_ends_a_message_without_blank_line() {
        let msg = b"Subject: only headers\r\nFrom: f\r\n.\r\n";
        let h = extract_all_sizes(&default_set(), msg);
        assert_eq!(pairs(&h), [("From", "f"), ("Subject", "only headers")]);
        // Nothing after the terminator is read.
        let mut h = HeaderExtractor::new(default_set());
        h.feed(b"Subject: x\r\n.\r\nTo: later\r\n");
        assert!(h.is_done());
        assert_eq!(pairs(&h.finish()), [("Subject", "x")]);
        // Body end without terminator and without final line ending.
        let h = extract_all_sizes(&default_set(), b"Subject: cut");
        assert_eq!(pairs(&h), [("Subject", "cut")]);
    }

    #[test]
    fn message_without_headers() {
        let h = extract_all_sizes(&default_set(), b"Hello there\r\nSubject: no\r\n.\r\n");
        assert!(h.is_empty());
        let h = extract_all_sizes(&default_set(), b"\r\nSubject: no\r\n");
        assert!(h.is_empty());
        let h = extract_all_sizes(&default_set(), b".\r\n");
        assert!(h.is_empty());
        let h = extract_all_sizes(&default_set(), b"");
        assert!(h.is_empty());
        let h = extract_all_sizes(&default_set(), b" leading space: x\r\nSubject: no\r\n");
        assert!(h.is_empty());
    }

    #[test]
    fn mbox_from_line_is_skipped() {
        let msg =
            b"From alice@example.org Sun Mar  1 08:15:00 2026\r\nSubject: s\r\nFrom: a\r\n\r\n";
        let h = extract_all_sizes(&default_set(), msg);
        assert_eq!(pairs(&h), [("From", "a"), ("Subject", "s")]);
        // Only on the first line.
        let msg = b"Subject: s\r\nFrom alice\r\nFrom: a\r\n\r\n";
        let h = extract_all_sizes(&default_set(), msg);
        assert_eq!(pairs(&h), [("Subject", "s")]);
    }

    #[test]
    fn case_first_occurrence_trim_and_obsolete_syntax() {
        let msg = b"SUBJECT:   first  \r\nsubject: second\r\nmessage-id :<x@y>\r\n\r\n";
        let h = extract_all_sizes(&default_set(), msg);
        assert_eq!(pairs(&h), [("Message-ID", "<x@y>"), ("Subject", "first")]);
        let msg = b"Subject:\r\nTo: t\r\n\r\n";
        let h = extract_all_sizes(&default_set(), msg);
        assert_eq!(pairs(&h), [("To", "t"), ("Subject", "")]);
    }

    #[test]
    fn eight_bit_and_control_bytes() {
        let msg = b"Subject: caf\xc3\xa9 \xff end\x01x\tz\r\n\r\n";
        let h = extract_all_sizes(&default_set(), msg);
        assert_eq!(pairs(&h), [("Subject", "caf\u{e9} \u{fffd} end x z")]);
        // A bare CR inside a value is not a line ending.
        let h = extract_all_sizes(&default_set(), b"Subject: a\rb\r\n\r\n");
        assert_eq!(pairs(&h), [("Subject", "a b")]);
        // An 8-bit field name ends the block.
        let h = extract_all_sizes(&default_set(), b"X-\xe9: v\r\nSubject: s\r\n\r\n");
        assert!(h.is_empty());
    }

    #[test]
    fn header_block_larger_than_a_chunk_and_the_limit() {
        let mut msg = Vec::new();
        for i in 0..200 {
            msg.extend_from_slice(format!("Received: from host{i} by relay; x\r\n").as_bytes());
        }
        msg.extend_from_slice(b"Subject: deep\r\n\r\nbody\r\n.\r\n");
        let big = set(&["Subject"], 64 * 1024);
        let mut h = HeaderExtractor::new(big.clone());
        for c in msg.chunks(4096) {
            h.feed(c);
        }
        assert!(!h.truncated());
        assert_eq!(pairs(&h.finish()), [("Subject", "deep")]);
        // With a limit before the Subject line, it is not found.
        let small = set(&["Subject"], 1024);
        let (h, truncated) = extract_chunked(&small, &msg, 100);
        assert!(truncated);
        assert!(h.is_empty());
    }

    #[test]
    fn limit_cuts_a_value_and_bounds_memory() {
        let msg = b"Subject: 0123456789abcdef\r\n\r\n";
        let s = set(&["Subject"], 15);
        let mut h = HeaderExtractor::new(s.clone());
        h.feed(msg);
        assert!(h.truncated());
        assert_eq!(h.scanned(), 15);
        assert_eq!(pairs(&h.finish()), [("Subject", "012345")]);
        // A huge body after a small header block is not scanned at all.
        let mut h = HeaderExtractor::new(default_set());
        h.feed(b"Subject: s\r\n\r\n");
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..50 {
            h.feed(&chunk);
        }
        assert_eq!(h.scanned(), 14);
        // An endless header line stops at the limit.
        let mut h = HeaderExtractor::new(set(&["Subject"], 4096));
        h.feed(b"Subject: ");
        for _ in 0..100 {
            h.feed(&chunk);
        }
        assert!(h.truncated() && h.held() <= 4096);
    }

    #[test]
    fn no_allocation_until_a_wanted_header() {
        let mut h = HeaderExtractor::new(default_set());
        assert_eq!(h.values.capacity(), 0);
        h.feed(b"Received: x\r\nX-Spam: y\r\n");
        assert_eq!(h.values.capacity(), 0);
        assert!(h.name.capacity() <= 64);
        let empty = HeaderExtractor::new(set(&[], 100));
        assert!(empty.is_done());
    }

    #[test]
    fn long_unwanted_names_are_not_kept() {
        let mut h = HeaderExtractor::new(default_set());
        let long = format!("X-{}: v\r\nTo: t\r\n\r\n", "a".repeat(5000));
        h.feed(long.as_bytes());
        assert!(h.name.capacity() < 64);
        assert_eq!(pairs(&h.finish()), [("To", "t")]);
    }

    fn chunked_by(input: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        points.sort_unstable();
        let mut out = Vec::new();
        let mut last = 0;
        for p in points {
            out.push(input[last..p].to_vec());
            last = p;
        }
        out.push(input[last..].to_vec());
        out
    }

    fn header_line() -> impl Strategy<Value = Vec<u8>> {
        let name = prop_oneof![
            Just("Subject".to_string()),
            Just("subject".to_string()),
            Just("FROM".to_string()),
            Just("From".to_string()),
            Just("To".to_string()),
            Just("Message-Id".to_string()),
            Just("X-Other".to_string()),
            Just(".Dot".to_string()),
            "[A-Za-z-]{1,12}",
        ];
        let value = prop::collection::vec(
            prop_oneof![
                8 => prop::char::range('a', 'z').prop_map(|c| c as u8),
                2 => Just(b' '),
                1 => Just(b'\t'),
                1 => Just(b':'),
                1 => Just(b'.'),
                1 => Just(0xe9u8),
                1 => Just(b'\r'),
            ],
            0..20,
        );
        let fold = prop_oneof![
            Just(&b"\r\n "[..]),
            Just(&b"\n\t"[..]),
            Just(&b"\r\n  "[..])
        ];
        (
            name,
            prop::option::of(Just(b" ")),
            value,
            prop::collection::vec((fold, "[a-z .]{0,8}"), 0..3),
        )
            .prop_map(|(name, sp, value, folds)| {
                let mut l = name.into_bytes();
                if let Some(s) = sp {
                    l.extend_from_slice(s);
                }
                l.push(b':');
                l.extend(value);
                for (f, cont) in folds {
                    l.extend_from_slice(f);
                    l.extend_from_slice(cont.as_bytes());
                }
                l
            })
    }

    /// Dot-stuff a message and give every line a CRLF or LF ending.
    fn to_wire(lines: &[Vec<u8>], crlf: bool, terminator: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for l in lines {
            for (i, part) in l.split(|&b| b == b'\n').enumerate() {
                if i > 0 {
                    out.push(b'\n');
                }
                if part.first() == Some(&b'.') {
                    out.push(b'.');
                }
                out.extend_from_slice(part);
            }
            out.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
        }
        if terminator {
            out.extend_from_slice(b".\r\n");
        }
        out
    }

    proptest! {
        #[test]
        fn streaming_matches_reference_on_messages(
            headers in prop::collection::vec(header_line(), 0..8),
            blank in any::<bool>(),
            body in prop::collection::vec("[.a-zA-Z: ]{0,10}", 0..4),
            crlf in any::<bool>(),
            terminator in any::<bool>(),
            max in 1usize..400,
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let mut lines = headers;
            if blank {
                lines.push(Vec::new());
            }
            lines.extend(body.into_iter().map(String::into_bytes));
            let wire = to_wire(&lines, crlf, terminator);
            let s = set(&["Message-ID", "From", "To", "Subject", ".Dot"], max);
            let expected = reference(&s, &wire);
            let mut h = HeaderExtractor::new(s.clone());
            for c in chunked_by(&wire, &cuts) {
                h.feed(&c);
                prop_assert!(h.held() <= h.scanned());
            }
            prop_assert_eq!(h.finish(), expected);
        }

        #[test]
        fn streaming_matches_reference_on_noise(
            input in prop::collection::vec(
                prop_oneof![
                    Just(b'\r'), Just(b'\n'), Just(b' '), Just(b'\t'), Just(b':'), Just(b'.'),
                    Just(b'S'), Just(b'u'), Just(b'T'), Just(b'o'), Just(0x80u8), Just(0u8),
                ],
                0..200,
            ),
            max in 1usize..250,
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let s = set(&["To", "Su", "T"], max);
            let expected = reference(&s, &input);
            let mut h = HeaderExtractor::new(s.clone());
            for c in chunked_by(&input, &cuts) {
                h.feed(&c);
            }
            prop_assert_eq!(h.finish(), expected);
        }
    }
}
