//! Reads that hold no buffer while a session waits.
//!
//! A session spends nearly all its life waiting for the next command or response. Reading
//! with `read_buf` into its own `BytesMut` means reserving room *before* the wait, so every
//! idle session would keep a read buffer. Here the wait holds nothing: each poll borrows a
//! per-worker-thread scratch buffer for the duration of that one (synchronous) poll, and only
//! the bytes actually read are copied into the session's buffer, which the driver lets go of
//! again once it is empty ([`release_if_empty`]).
//!
//! Inside a multi-line body the bytes keep coming, so the copy would be waste: there the
//! driver reads straight into a large session buffer ([`BODY_READ`]) that it keeps until the
//! body ends.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::Poll;

use bytes::BytesMut;
use tokio::io::{AsyncRead, ReadBuf};

use crate::net::tls::Stream;

/// The per-thread scratch buffer: one TLS record's plaintext fits; a command or status line
/// is far smaller.
const SCRATCH: usize = 16 * 1024;

/// Room reserved for each read while a body streams through: large reads mean few syscalls
/// and one write to the client per read.
pub(super) const BODY_READ: usize = 256 * 1024;

thread_local! {
    static BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// Wait until `stream` has bytes (holding no buffer), read them through the thread's scratch
/// buffer and append them to `into`. `Ok(0)` is the end of the stream.
pub(super) async fn read_lean(stream: &mut Stream, into: &mut BytesMut) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        BUF.with_borrow_mut(|scratch| {
            let mut rb = ReadBuf::new(scratch);
            match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let got = rb.filled();
                    into.extend_from_slice(got);
                    Poll::Ready(Ok(got.len()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
    })
    .await
}

/// Give an empty buffer's memory back (a waiting session holds no capacity).
pub(super) fn release_if_empty(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > 0 {
        *buf = BytesMut::new();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A read keeps only the bytes that came (not a reserved read buffer), and an empty
    /// buffer gives its memory back: what an idle session holds.
    #[tokio::test]
    async fn keeps_only_what_came_and_lets_go() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let mut server = Stream::Plain(l.accept().await.unwrap().0);
        client.write_all(b"USER alice\r\n").await.unwrap();
        let mut buf = BytesMut::new();
        let n = read_lean(&mut server, &mut buf).await.unwrap();
        assert_eq!(&buf[..], b"USER alice\r\n");
        assert!(buf.capacity() < 1024, "capacity {}", buf.capacity());
        let line = buf.split_to(n);
        assert_eq!(line.len(), 12);
        release_if_empty(&mut buf);
        assert_eq!(buf.capacity(), 0);
        // The end of the stream reads as 0.
        drop(client);
        assert_eq!(read_lean(&mut server, &mut buf).await.unwrap(), 0);
    }
}
