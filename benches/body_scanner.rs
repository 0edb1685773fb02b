//! Throughput of the multi-line body scanner (`BodyScanner`), the only per-byte work popgate
//! does on a relayed message: 8 MiB bodies of 72-octet lines, one line in seven dot-stuffed
//! (worst case for the `\n.` jumps) and none, scanned in 16 KiB reads as the relay does.
//! Target (issue 12): at least 2 GB/s. Run: `cargo bench --bench body_scanner`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use popgate::pop3::response::{BodyScanner, Scan};

/// A dot-stuffed body of about `size` octets plus the terminator; every `dot_every`-th line
/// starts with a (stuffed) dot, none when 0.
fn body(size: usize, dot_every: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(size + 80);
    let mut n = 0;
    while b.len() < size {
        if dot_every != 0 && n % dot_every == 0 {
            b.extend_from_slice(b"..");
        }
        b.extend_from_slice(&[b'x'; 68]);
        b.extend_from_slice(b"\r\n");
        n += 1;
    }
    b.extend_from_slice(b".\r\n");
    b
}

/// Scan `body` in `read`-sized chunks, carrying held bytes as the tracker does; returns where
/// the terminator ended.
fn scan_all(body: &[u8], read: usize) -> usize {
    let mut scanner = BodyScanner::new();
    let mut at = 0;
    while at < body.len() {
        let end = (at + read).min(body.len());
        match scanner.scan(&body[at..end]) {
            Scan::End(n) => return at + n,
            Scan::More { held } => {
                if held > 0 {
                    scanner = BodyScanner::new();
                }
                if held > 0 && end == body.len() {
                    break; // the body ends inside a possible terminator
                }
                at = end - held;
            }
            Scan::BareLfEnd { .. } => break,
        }
    }
    at
}

fn scanner(c: &mut Criterion) {
    let mut g = c.benchmark_group("body_scanner");
    for (name, dot_every) in [("no dot lines", 0), ("every 7th line dotted", 7)] {
        let b = body(8 << 20, dot_every);
        assert_eq!(
            scan_all(&b, 16 * 1024),
            b.len(),
            "terminator found at the end"
        );
        g.throughput(Throughput::Bytes(b.len() as u64));
        g.bench_function(name, |bench| {
            bench.iter(|| scan_all(black_box(&b), 16 * 1024))
        });
    }
    g.finish();
}

criterion_group!(benches, scanner);
criterion_main!(benches);
