//! `BodyScanner` on arbitrary bytes in arbitrary chunkings: the end it reports is the same
//! whatever the chunking, and it is the end of the first line that is `.` alone (`.\r\n`, or
//! `.\n` for bare-LF servers) — dot-stuffed lines (`..x`) and `.` inside a line are body.
//!
//! Input: the first byte picks a seed for chunk sizes, the rest is the body stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use popgate::pop3::response::BodyScanner;

/// The reference: the end (exclusive) of the first terminator line, scanning line by line.
fn reference(data: &[u8]) -> Option<usize> {
    let mut start = 0;
    while start < data.len() {
        let rest = &data[start..];
        if rest.starts_with(b".\r\n") {
            return Some(start + 3);
        }
        if rest.starts_with(b".\n") {
            return Some(start + 2);
        }
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => start += i + 1,
            None => return None,
        }
    }
    None
}

/// Feed `data` in chunks whose sizes come from `sizes` (cycled); the absolute end found.
fn scan_chunked(data: &[u8], sizes: &[usize]) -> Option<usize> {
    let mut scanner = BodyScanner::new();
    let mut off = 0;
    let mut k = 0;
    while off < data.len() {
        let n = sizes[k % sizes.len()].clamp(1, data.len() - off);
        k += 1;
        let chunk = &data[off..off + n];
        if let Some(end) = scanner.scan(chunk) {
            assert!(
                end >= 1 && end <= chunk.len(),
                "end {end} outside chunk of {n}"
            );
            return Some(off + end);
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
