//! ClamAV's daemon: `zINSTREAM` over a Unix or TCP socket. The codec (request framing, reply
//! parsing with a bounded reply) is sans-I/O; [`scan`] and [`ping`] drive it over a socket.
//!
//! The request is `zINSTREAM\0`, then chunks `<u32 big-endian length><bytes>`, then a zero
//! length. The reply is one NUL-terminated line: `stream: OK`, `stream: <name> FOUND`, or
//! `<reason> ERROR` (e.g. `INSTREAM size limit exceeded. ERROR` past clamd's
//! `StreamMaxLength`, sent as soon as the limit is passed, and the connection is closed).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::spool::Spool;
use super::{Finding, ScanError, printable};
use crate::types::ScanVerdict;

/// The command that starts a scan of a stream (`z`: NUL-terminated, as the reply).
pub(crate) const INSTREAM: &[u8] = b"zINSTREAM\0";
/// The liveness probe; the answer is `PONG`.
pub(crate) const PING: &[u8] = b"zPING\0";
/// The largest chunk sent (clamd reads chunks of any size up to its `StreamMaxLength`; small
/// ones keep its buffers small).
pub(crate) const MAX_CHUNK: usize = 64 << 10;
/// The end of the stream: a chunk of length 0.
pub(crate) const END: [u8; 4] = [0; 4];
/// A reply longer than this is not clamd's (the longest is a virus name and a few words).
pub(crate) const MAX_REPLY: usize = 1024;

/// Append `data` to `out` as INSTREAM chunks of at most [`MAX_CHUNK`] bytes.
pub(crate) fn frame_into(data: &[u8], out: &mut Vec<u8>) {
    for chunk in data.chunks(MAX_CHUNK) {
        // A chunk is at most MAX_CHUNK long, so its length fits in a u32.
        out.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
        out.extend_from_slice(chunk);
    }
}

/// Collects one NUL-terminated reply from the bytes read, bounded by [`MAX_REPLY`].
#[derive(Debug, Default)]
pub(crate) struct ReplyReader {
    buf: Vec<u8>,
}

impl ReplyReader {
    /// Feed bytes read; returns the reply (without its NUL) once it is complete. Bytes after
    /// the NUL are ignored.
    pub(crate) fn feed(&mut self, data: &[u8]) -> Result<Option<String>, ScanError> {
        let (part, done) = match memchr::memchr(0, data) {
            Some(i) => (&data[..i], true),
            None => (data, false),
        };
        if self.buf.len() + part.len() > MAX_REPLY {
            return Err(ScanError::ReplyTooLong(MAX_REPLY));
        }
        self.buf.extend_from_slice(part);
        Ok(done.then(|| printable(&self.buf)))
    }

    /// The connection ended: a reply without its NUL is still taken (clamd's `n`-commands end
    /// with a newline instead), none is an error.
    pub(crate) fn finish(self) -> Result<String, ScanError> {
        if self.buf.is_empty() {
            return Err(ScanError::NoReply);
        }
        Ok(printable(&self.buf))
    }
}

/// What an INSTREAM reply says.
pub(crate) fn parse_reply(reply: &str) -> Result<Finding, ScanError> {
    let reply = reply.trim();
    if let Some(rest) = reply.strip_prefix("stream: ")
        && !reply.ends_with(" ERROR")
    {
        if rest == "OK" {
            return Ok(Finding::clean());
        }
        if let Some(name) = rest.strip_suffix(" FOUND")
            && !name.trim().is_empty()
        {
            return Ok(Finding {
                verdict: ScanVerdict::Infected,
                detail: Some(name.trim().to_owned()),
                score: None,
            });
        }
    }
    if let Some(reason) = reply.strip_suffix(" ERROR") {
        let reason = reason.strip_prefix("stream: ").unwrap_or(reason);
        return Err(ScanError::Refused(format!("clamd: {}", reason.trim())));
    }
    Err(ScanError::Unexpected(reply.to_owned()))
}

pub(crate) use crate::config::scan::ClamdAddress as Address;

/// A connection to clamd, over either socket kind.
enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

async fn connect(address: &Address) -> io::Result<Conn> {
    Ok(match address {
        Address::Unix(path) => Conn::Unix(tokio::net::UnixStream::connect(path).await?),
        Address::Tcp(addr) => {
            let s = tokio::net::TcpStream::connect(addr.as_str()).await?;
            // The last chunk and the end marker are small writes: do not let Nagle hold them.
            s.set_nodelay(true)?;
            Conn::Tcp(s)
        }
    })
}

/// Scan the message in `spool` (un-stuffed). clamd's own errors (`... ERROR`) and broken
/// connections are errors; the caller bounds the time.
pub(crate) async fn scan(address: &Address, spool: &Spool) -> Result<Finding, ScanError> {
    match connect(address).await.map_err(ScanError::Connect)? {
        Conn::Unix(s) => instream(s, spool).await,
        Conn::Tcp(s) => instream(s, spool).await,
    }
}

/// `PING` -> `PONG`.
pub(crate) async fn ping(address: &Address) -> Result<(), ScanError> {
    let reply = match connect(address).await.map_err(ScanError::Connect)? {
        Conn::Unix(s) => command(s, PING).await?,
        Conn::Tcp(s) => command(s, PING).await?,
    };
    if reply.trim() == "PONG" {
        Ok(())
    } else {
        Err(ScanError::Unexpected(reply))
    }
}

async fn command<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    cmd: &[u8],
) -> Result<String, ScanError> {
    s.write_all(cmd).await?;
    read_reply(&mut s).await
}

/// Read one reply (bounded).
async fn read_reply<R: AsyncRead + Unpin>(r: &mut R) -> Result<String, ScanError> {
    let mut reader = ReplyReader::default();
    let mut buf = [0u8; 256];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return reader.finish();
        }
        if let Some(reply) = reader.feed(&buf[..n])? {
            return Ok(reply);
        }
    }
}

/// Send the message and read the verdict at the same time: clamd answers early (and closes)
/// when the stream passes its `StreamMaxLength`.
async fn instream<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    spool: &Spool,
) -> Result<Finding, ScanError> {
    let (mut r, mut w) = tokio::io::split(stream);
    // Ok(Err(_)): the spool could not be read; Err(_): the connection broke.
    let send = async {
        w.write_all(INSTREAM).await?;
        let mut body = spool.unstuffed();
        let (mut buf, mut frame) = (Vec::new(), Vec::with_capacity(MAX_CHUNK + 4));
        loop {
            let piece = match body.next(buf).await {
                Ok(Some(piece)) => piece,
                Ok(None) => break,
                Err(e) => return Ok(Err(e)),
            };
            frame.clear();
            frame_into(&piece, &mut frame);
            w.write_all(&frame).await?;
            buf = piece;
        }
        w.write_all(&END).await?;
        w.flush().await.map(Ok)
    };
    let receive = read_reply(&mut r);
    tokio::pin!(send, receive);
    let reply = tokio::select! {
        reply = &mut receive => reply?,
        sent = &mut send => match sent {
            Ok(Ok(())) => receive.await?,
            // clamd waits for the rest: do not wait for its reply.
            Ok(Err(e)) => return Err(ScanError::Io(io::Error::other(format!("spool: {e}")))),
            // clamd may have answered before it closed (its size limit): that reply says more.
            Err(e) => receive.await.map_err(|_| ScanError::Io(e))?,
        },
    };
    parse_reply(&reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Split INSTREAM chunks back into the data; `None` if malformed or unterminated.
    fn unframe(mut wire: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let (len, rest) = wire.split_first_chunk::<4>()?;
            let len = u32::from_be_bytes(*len) as usize;
            if len == 0 {
                return rest.is_empty().then_some(out);
            }
            if len > MAX_CHUNK || rest.len() < len {
                return None;
            }
            out.extend_from_slice(&rest[..len]);
            wire = &rest[len..];
        }
    }

    #[test]
    fn framing_round_trips_a_message_fed_at_every_piece_size() {
        let msg: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        for size in (1..=300).chain([4095, 65_535, 65_536, 65_537, 131_072, 200_000]) {
            let mut wire = Vec::new();
            for piece in msg.chunks(size) {
                frame_into(piece, &mut wire);
            }
            wire.extend_from_slice(&END);
            assert!(unframe(&wire) == Some(msg.clone()), "piece size {size}");
        }
    }

    #[test]
    fn an_empty_piece_adds_no_chunk() {
        let mut wire = Vec::new();
        frame_into(b"", &mut wire);
        assert!(wire.is_empty(), "a zero-length chunk would end the stream");
    }

    fn read_in_pieces(wire: &[u8], size: usize) -> Result<String, ScanError> {
        let mut r = ReplyReader::default();
        for piece in wire.chunks(size) {
            if let Some(reply) = r.feed(piece)? {
                return Ok(reply);
            }
        }
        r.finish()
    }

    #[test]
    fn replies_parse_at_every_piece_size() {
        let cases: [(&[u8], Result<Finding, &str>); 5] = [
            (b"stream: OK\0", Ok(Finding::clean())),
            (
                b"stream: Popgate.Test.Signature.UNOFFICIAL FOUND\0trailing",
                Ok(Finding {
                    verdict: ScanVerdict::Infected,
                    detail: Some("Popgate.Test.Signature.UNOFFICIAL".into()),
                    score: None,
                }),
            ),
            (
                b"INSTREAM size limit exceeded. ERROR\0",
                Err("clamd: INSTREAM size limit exceeded."),
            ),
            (
                b"stream: lstat() failed ERROR\0",
                Err("clamd: lstat() failed"),
            ),
            (
                b"UNKNOWN COMMAND\0",
                Err("unexpected reply: UNKNOWN COMMAND"),
            ),
        ];
        for (wire, want) in cases {
            for size in 1..=wire.len() {
                let got = read_in_pieces(wire, size).and_then(|r| parse_reply(&r));
                match (&got, &want) {
                    (Ok(g), Ok(w)) => assert_eq!(g, w, "{size}"),
                    (Err(g), Err(w)) => assert_eq!(g.to_string(), *w, "{size}"),
                    _ => panic!("{wire:?} at {size}: {got:?}"),
                }
            }
        }
    }

    #[test]
    fn a_reply_is_bounded_and_made_printable() {
        let long = vec![b'x'; MAX_REPLY + 1];
        for size in [1, 100, MAX_REPLY + 1] {
            assert!(matches!(
                read_in_pieces(&long, size),
                Err(ScanError::ReplyTooLong(_))
            ));
        }
        let odd = b"stream: Bad\x1b[31mName\xff FOUND\0";
        let f = parse_reply(&read_in_pieces(odd, 3).unwrap()).unwrap();
        assert_eq!(f.detail.as_deref(), Some("Bad?[31mName?"));
    }

    #[test]
    fn no_reply_before_the_close_is_an_error_and_a_reply_without_nul_is_taken() {
        assert!(matches!(read_in_pieces(b"", 1), Err(ScanError::NoReply)));
        assert_eq!(read_in_pieces(b"PONG\n", 2).unwrap(), "PONG");
    }

    #[tokio::test]
    async fn a_spool_that_cannot_be_read_ends_the_scan_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::scan::ScanConfig {
            spool_memory: crate::types::ByteSize(10),
            spool_dir: dir.path().to_owned(),
            ..Default::default()
        };
        let mut spool = Spool::new(&config);
        spool.write(&[b'x'; 200_000]).await.unwrap();
        spool.break_file();
        // A clamd that reads everything and never answers.
        let socket = dir.path().join("clamd.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let sink = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 65536];
            while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        });
        let address = Address::Unix(socket);
        let scan = scan(&address, &spool);
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(5), scan)
            .await
            .expect("no wait for a reply that cannot come");
        let e = outcome.unwrap_err().to_string();
        assert!(e.starts_with("I/O: spool: "), "{e}");
        sink.abort();
    }
}
