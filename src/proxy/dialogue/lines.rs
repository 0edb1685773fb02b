//! The one line reader of the upstream dialogue: server bytes in, complete lines out (CRLF or
//! a bare LF ends a line), every line bounded whether or not its end has arrived, so that the
//! answer is the same however the bytes were cut.

use crate::pop3::command::line_end;

/// A line longer than the reader's bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Overlong;

/// Buffered server bytes, split into lines of at most `max` octets before the line end.
#[derive(Debug, Default)]
pub(crate) struct Lines {
    buf: Vec<u8>,
    max: usize,
}

impl Lines {
    /// A reader of lines of at most `max` octets (line end not counted).
    pub(crate) fn new(max: usize) -> Lines {
        Lines {
            buf: Vec::new(),
            max,
        }
    }

    /// Change the bound (for the lines still to come).
    pub(crate) fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// Bytes from the server.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete line (line end included), `None` until one is complete. A line of
    /// more than `max` octets before its CRLF is [`Overlong`] as soon as that is known.
    pub(crate) fn next_line(&mut self) -> Result<Option<Vec<u8>>, Overlong> {
        match line_end(&self.buf) {
            // `max` octets, then CR LF.
            Some(n) if n > self.max.saturating_add(2) => Err(Overlong),
            Some(n) => {
                let rest = self.buf.split_off(n);
                Ok(Some(std::mem::replace(&mut self.buf, rest)))
            }
            // `max` octets and a CR may still be waiting for their LF.
            None if self.buf.len() > self.max.saturating_add(1) => Err(Overlong),
            None => Ok(None),
        }
    }

    /// Whether no byte is waiting.
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Take every byte waiting.
    pub(crate) fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// Put `bytes` back in front of what is waiting.
    pub(crate) fn unread(&mut self, mut bytes: Vec<u8>) {
        bytes.append(&mut self.buf);
        self.buf = bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_and_bare_lf_end_lines_and_the_rest_waits() {
        let mut l = Lines::new(10);
        l.push(b"+OK a\r\n+OK b\n+O");
        assert_eq!(l.next_line(), Ok(Some(b"+OK a\r\n".to_vec())));
        assert_eq!(l.next_line(), Ok(Some(b"+OK b\n".to_vec())));
        assert_eq!(l.next_line(), Ok(None));
        assert_eq!(l.take(), b"+O");
    }

    #[test]
    fn the_bound_holds_at_every_chunk_size() {
        let fits = [b"x".repeat(10), b"\r\n".to_vec()].concat();
        let over = [b"x".repeat(11), b"\r\n".to_vec()].concat();
        for (line, ok) in [(fits, true), (over, false)] {
            for chunk in 1..=line.len() {
                let mut l = Lines::new(10);
                let mut got = Ok(None);
                for c in line.chunks(chunk) {
                    l.push(c);
                    got = l.next_line();
                    if got != Ok(None) {
                        break;
                    }
                }
                assert_eq!(got.is_ok(), ok, "chunk {chunk}");
            }
        }
    }
}
