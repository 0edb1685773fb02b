//! Transparency: with no rules, a client gets through popgate exactly the bytes it gets from the
//! server directly.
//!
//! Property test: random maildrops (dot lines, lone CR, bare LF, 8-bit bytes, empty messages,
//! messages without a final line end, lines of tens of kilobytes) and random command sequences
//! after a login (valid and invalid message numbers, DELE/RSET, TOP with line counts, any case),
//! sent pipelined in one write. Two identical demo servers run side by side, one reached
//! directly, one through popgate; the byte streams the client reads until the server closes
//! after QUIT must be identical.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::proxy::{Harness, mailbox};
use popgate_demo::ServerOptions;
use proptest::prelude::*;

/// One body line's content (line end added separately).
fn line() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        Just(b".".to_vec()),
        Just(b"..".to_vec()),
        Just(b".x".to_vec()),
        Just(b"From: someone@example.org".to_vec()),
        Just(b"lone\rCR".to_vec()),
        Just(b"\r".to_vec()),
        Just(b". \t".to_vec()),
        Just(b"8-bit \xe9\xff\x80 bytes".to_vec()),
        Just(b"+OK looks like a status".to_vec()),
        (1usize..70_000).prop_map(|n| vec![b'a'; n]),
        proptest::collection::vec(any::<u8>().prop_filter("no LF", |b| *b != b'\n'), 0..40),
    ]
}

/// A message: lines with CRLF or bare LF ends, maybe without a final line end.
fn message() -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::collection::vec((line(), any::<bool>()), 0..12),
        any::<bool>(),
    )
        .prop_map(|(lines, last_open)| {
            let mut m = Vec::new();
            let n = lines.len();
            for (i, (l, crlf)) in lines.into_iter().enumerate() {
                m.extend_from_slice(&l);
                if i + 1 == n && last_open {
                    break;
                }
                m.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
            }
            m
        })
}

/// One command after login; `n` is the number of messages.
fn command(n: usize) -> impl Strategy<Value = String> {
    let msg = 0..=n as u32 + 1;
    prop_oneof![
        Just("STAT".to_string()),
        Just("LIST".to_string()),
        Just("uidl".to_string()),
        Just("NOOP".to_string()),
        Just("RSET".to_string()),
        msg.clone().prop_map(|k| format!("LIST {k}")),
        msg.clone().prop_map(|k| format!("UIDL {k}")),
        msg.clone().prop_map(|k| format!("RETR {k}")),
        msg.clone().prop_map(|k| format!("retr {k}")),
        msg.clone().prop_map(|k| format!("DELE {k}")),
        (msg, 0u32..4).prop_map(|(k, l)| format!("TOP {k} {l}")),
    ]
}

fn case() -> impl Strategy<Value = (Vec<Vec<u8>>, Vec<String>)> {
    proptest::collection::vec(message(), 0..5).prop_flat_map(|msgs| {
        let n = msgs.len();
        (Just(msgs), proptest::collection::vec(command(n), 0..14))
    })
}

/// Everything the client reads after sending `script` in one write, until the server closes.
fn dialogue(addr: SocketAddr, script: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(script).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("reading from {addr}: {e}; got {} bytes", out.len()));
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn client_bytes_through_popgate_equal_direct((msgs, cmds) in case()) {
        let h = Harness::new();
        let opts = || ServerOptions::new(vec![mailbox("t", "pw", msgs.clone())]);
        let direct = h.upstream(opts());
        let behind = h.upstream(opts());
        let proxy = h.proxy(behind.local_addr(), "");
        let mut script = b"USER t\r\nPASS pw\r\n".to_vec();
        for c in &cmds {
            script.extend_from_slice(c.as_bytes());
            script.extend_from_slice(b"\r\n");
        }
        script.extend_from_slice(b"QUIT\r\n");
        let want = dialogue(direct.local_addr(), &script);
        let got = dialogue(proxy.addr, &script);
        prop_assert!(want.ends_with(b"\r\n"), "direct dialogue incomplete");
        prop_assert!(
            got == want,
            "through popgate: {} bytes, direct: {} bytes; first difference at {:?}",
            got.len(),
            want.len(),
            got.iter().zip(&want).position(|(a, b)| a != b)
        );
        // And the maildrops end up the same.
        prop_assert_eq!(direct.messages("t"), behind.messages("t"));
    }
}
