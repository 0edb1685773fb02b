//! `BodyScanner` on arbitrary bytes in arbitrary chunkings: the end it reports is the same
//! whatever the chunking, and it is the end of the first line that is `.` alone: `.\r\n` ends
//! the body, `.\n` is reported as a bare-LF end at the start of that line (popgate refuses it).
//! Dot-stuffed lines (`..x`) and `.` inside a line are body. The bytes it holds back as a
//! possible terminator start are always a `.` or `.\r` at the start of a line.
//!
//! Input: the first byte picks a seed for chunk sizes, the rest is the body stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use popgate::pop3::response::{BodyScanner, Scan};

/// What the scan of a whole stream found.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// The terminator ends here (exclusive).
    End(usize),
    /// A bare-LF `.` line starts here.
    BareLf(usize),
}

/// The reference, scanning line by line.
fn reference(data: &[u8]) -> Option<Found> {
    let mut start = 0;
    while start < data.len() {
        let rest = &data[start..];
        if rest.starts_with(b".\r\n") {
            return Some(Found::End(start + 3));
        }
        if rest.starts_with(b".\n") {
            return Some(Found::BareLf(start));
        }
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => start += i + 1,
            None => return None,
        }
    }
    None
}

/// Feed `data` in chunks whose sizes come from `sizes` (cycled); the absolute end found.
fn scan_chunked(data: &[u8], sizes: &[usize]) -> Option<Found> {
    let mut scanner = BodyScanner::new();
    let mut off = 0;
    let mut k = 0;
    // Where the last bare-LF-capable `.` line started (for a bare-LF end begun earlier).
    while off < data.len() {
        let n = sizes[k % sizes.len()].clamp(1, data.len() - off);
        k += 1;
        let chunk = &data[off..off + n];
        match scanner.scan(chunk) {
            Scan::End(end) => {
                assert!(end >= 1 && end <= chunk.len(), "end {end} outside chunk of {n}");
                return Some(Found::End(off + end));
            }
            Scan::BareLfEnd { at } => {
                assert!(at < chunk.len(), "bare-LF start {at} outside chunk of {n}");
                // Begun in an earlier chunk (`at` 0 then): find the line start before.
                let abs = off + at;
                let line_start = data[..abs.max(1) - 1 + 1]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |p| p + 1);
                let start = if data.get(abs) == Some(&b'.') { abs } else { line_start };
                return Some(Found::BareLf(start));
            }
            Scan::More { held } => {
                assert!(held <= 2 && held <= n, "held {held} of a chunk of {n}");
                let tail = &data[off + n - held..off + n];
                assert!(tail.is_empty() || tail == b"." || tail == b".\r" || tail == b"\r",
                    "held {tail:?}");
            }
        }
        off += n;
    }
    None
}

fuzz_target!(|input: &[u8]| {
    let Some((&seed, data)) = input.split_first() else {
        return;
    };
    let want = reference(data);
    // Whole, byte by byte, and a chunking derived from the data and the seed.
    assert_eq!(scan_chunked(data, &[usize::MAX]), want, "whole");
    assert_eq!(scan_chunked(data, &[1]), want, "byte by byte");
    let sizes: Vec<usize> = data
        .iter()
        .take(16)
        .map(|&b| 1 + (b ^ seed) as usize % 7)
        .chain(std::iter::once(1 + seed as usize))
        .collect();
    assert_eq!(scan_chunked(data, &sizes), want, "chunks {sizes:?}");
});
