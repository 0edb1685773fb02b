//! `popgate tap`: live, redacted transcript lines of the sessions a tap matches.
//!
//! A `Subscriber` is one attached `popgate tap`: its filter, whether it shows bodies, and a
//! bounded queue to its control connection. Sessions deliver with `try_send` only: a slow
//! reader never slows a session; what does not fit is counted and announced as
//! `[tap: N lines dropped]` once there is room again.
//!
//! The session side (`TapPoint`) lives in the session's observer, fed at the points where
//! the transcript is written and with the transcript's own redaction. While no tap is attached
//! anywhere its cost is one relaxed atomic load per call; with taps elsewhere, two (and, before
//! login, the lines a user tap may still want are kept, at most 64).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::registry::{Entry, Matcher, SessionHandle};

/// Lines a tap's queue holds before it drops.
pub(crate) const QUEUE: usize = 1024;

/// Body lines longer than this are shown in pieces.
const BODY_PIECE: usize = 8 * 1024;

/// One line of a tapped session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapLine {
    /// RFC 3339 time with milliseconds.
    pub ts: String,
    /// The session id.
    pub session: u64,
    /// `C` (client), `S` (server), `S+` (continued body line) or `*` (popgate's note).
    pub dir: String,
    /// The line, redacted as transcripts are, line ending removed.
    pub text: String,
}

impl TapLine {
    fn new(session: u64, dir: &str, text: String) -> TapLine {
        TapLine {
            ts: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            session,
            dir: dir.to_owned(),
            text,
        }
    }
}

/// One attached `popgate tap`.
#[derive(Debug)]
pub(crate) struct Subscriber {
    pub(crate) matcher: Matcher,
    pub(crate) bodies: bool,
    tx: mpsc::Sender<TapLine>,
    dropped: AtomicU64,
}

impl Subscriber {
    /// A subscriber and the receiving end of its queue.
    pub(crate) fn new(
        matcher: Matcher,
        bodies: bool,
    ) -> (Arc<Subscriber>, mpsc::Receiver<TapLine>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Arc::new(Subscriber {
                matcher,
                bodies,
                tx,
                dropped: AtomicU64::new(0),
            }),
            rx,
        )
    }

    /// Queue `line` without waiting; a full queue counts it as dropped.
    pub(crate) fn deliver(&self, line: &TapLine) {
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            let note = TapLine {
                dir: "*".into(),
                text: format!("[tap: {dropped} lines dropped]"),
                ..line.clone()
            };
            if self.tx.try_send(note).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            self.dropped.fetch_sub(dropped, Ordering::Relaxed);
        }
        if self.tx.try_send(line.clone()).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The tap side of one session's observer: emits lines when a tap is attached.
#[derive(Debug, Default)]
pub(crate) struct TapPoint {
    handle: Option<SessionHandle>,
    entry: Option<Arc<Entry>>,
    /// Octets of the body being relayed (for the size line).
    body_octets: u64,
    /// The partial body line, for taps showing bodies.
    partial: Vec<u8>,
    continued: bool,
}

impl TapPoint {
    /// A tap point feeding `entry`'s taps; lines of the AUTHORIZATION phase are kept in
    /// `handle`'s backlog for taps waiting for the user.
    pub(crate) fn new(entry: Arc<Entry>) -> TapPoint {
        TapPoint {
            entry: Some(entry),
            ..TapPoint::default()
        }
    }

    /// Hand the session's registry handle over (it keeps the backlog).
    pub(crate) fn set_handle(&mut self, handle: SessionHandle) {
        self.handle = Some(handle);
    }

    /// Who kicked the session, if it was kicked (the registry entry knows).
    pub(crate) fn kicked_by(&self) -> Option<String> {
        self.entry.as_ref().and_then(|e| e.kicked_by())
    }

    /// The session's registry handle.
    pub(crate) fn handle_mut(&mut self) -> Option<&mut SessionHandle> {
        self.handle.as_mut()
    }

    /// Whether any tap is attached in the process (without a handle: to this session).
    #[inline]
    fn any_tap(&self) -> bool {
        match &self.handle {
            Some(h) => h.taps_anywhere(),
            None => self.entry.as_ref().is_some_and(|e| e.tapped()),
        }
    }

    /// Whether a line would go anywhere: one atomic load while no tap is attached anywhere.
    #[inline]
    pub(crate) fn active(&self) -> bool {
        self.any_tap()
            && (self.entry.as_ref().is_some_and(|e| e.tapped())
                || self.handle.as_ref().is_some_and(|h| h.before_login()))
    }

    /// A line (`dir` `C`, `S` or `*`) built by `text` only when it goes somewhere.
    pub(crate) fn line(&mut self, dir: &str, text: impl FnOnce() -> String) {
        if !self.active() {
            return;
        }
        self.send(dir, text(), false);
    }

    fn send(&mut self, dir: &str, text: String, body_line: bool) {
        let Some(entry) = &self.entry else {
            return;
        };
        let line = TapLine::new(entry.id, dir, text);
        if entry.tapped() {
            entry.emit(&line, body_line);
        }
        if let Some(h) = self.handle.as_mut()
            && h.keeps_backlog()
        {
            h.remember(line, body_line);
        }
    }

    /// A chunk of a multi-line body as relayed; `end` when it finishes the body.
    pub(crate) fn body(&mut self, chunk: &[u8], end: bool) {
        let Some(entry) = self.entry.as_ref() else {
            return;
        };
        if !self.any_tap() {
            // The relay's per-chunk cost while nobody taps: this load and two compares.
            if self.body_octets != 0 || !self.partial.is_empty() {
                self.body_octets = 0;
                self.partial.clear();
            }
            return;
        }
        if !entry.tapped() {
            // Before login, a user tap may attach later: its backlog gets the size line.
            if self.handle.as_ref().is_some_and(|h| h.keeps_backlog()) {
                self.body_octets += chunk.len() as u64;
                if end {
                    let octets = std::mem::take(&mut self.body_octets);
                    self.send("S", format!("[body {octets} octets]"), false);
                }
                return;
            }
            if self.body_octets != 0 || !self.partial.is_empty() {
                self.body_octets = 0;
                self.partial.clear();
            }
            return;
        }
        let entry = entry.clone();
        self.body_octets += chunk.len() as u64;
        if entry.wants_bodies() {
            let mut rest = chunk;
            while !rest.is_empty() {
                match memchr::memchr(b'\n', rest) {
                    Some(i) => {
                        self.partial.extend_from_slice(&rest[..=i]);
                        rest = &rest[i + 1..];
                        let line = std::mem::take(&mut self.partial);
                        let dir = if self.continued { "S+" } else { "S" };
                        self.continued = false;
                        self.send(dir, crate::audit::model::redact::display(&line), true);
                    }
                    None => {
                        self.partial.extend_from_slice(rest);
                        rest = &[];
                        if self.partial.len() >= BODY_PIECE {
                            let piece = std::mem::take(&mut self.partial);
                            let dir = if self.continued { "S+" } else { "S" };
                            self.continued = true;
                            self.send(dir, crate::pop3::printable(&piece), true);
                        }
                    }
                }
            }
        }
        if end {
            let octets = std::mem::take(&mut self.body_octets);
            let line = TapLine::new(entry.id, "S", format!("[body {octets} octets]"));
            entry.emit_summary(&line);
            self.partial.clear();
            self.continued = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: usize) -> TapLine {
        TapLine::new(1, "S", format!("line {n}"))
    }

    /// A full queue drops without waiting, and the reader learns how many lines it missed as
    /// soon as there is room again.
    #[test]
    fn a_full_queue_drops_and_says_how_many() {
        let (sub, mut rx) = Subscriber::new(Matcher::default(), false);
        for n in 0..QUEUE + 5 {
            sub.deliver(&line(n));
        }
        let mut got = Vec::new();
        while let Ok(l) = rx.try_recv() {
            got.push(l.text);
        }
        assert_eq!(got.len(), QUEUE);
        assert_eq!(got[QUEUE - 1], format!("line {}", QUEUE - 1));
        sub.deliver(&line(9999));
        assert_eq!(rx.try_recv().unwrap().text, "[tap: 5 lines dropped]");
        assert_eq!(rx.try_recv().unwrap().text, "line 9999");
        assert!(rx.try_recv().is_err());
    }
}
