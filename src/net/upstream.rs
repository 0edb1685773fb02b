//! Dialling the POP3 server behind popgate: plain, STLS (RFC 2595) or implicit TLS.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::warn;

use crate::config::{TlsMode, UpstreamConfig};
use crate::net::tls::{Stream, UpstreamTls};
use crate::pop3::command::line_end;
use crate::pop3::response::{Status, StatusLine};

/// The upstream could not be reached (TCP, STLS or TLS handshake failed, or timed out).
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to upstream {address}: {reason}")]
pub struct ConnectError {
    /// Upstream address.
    pub address: String,
    /// Cause.
    pub reason: String,
}

/// An open upstream connection.
#[derive(Debug)]
pub struct Upstream {
    /// The connection, TLS already active for `starttls` and `implicit`.
    pub stream: Stream,
    /// Server bytes already read during setup (the greeting, with `starttls`), to be relayed
    /// first.
    pub preread: Vec<u8>,
}

/// Open a connection to the upstream within its connect timeout (TCP, STLS and handshake).
pub async fn connect(
    cfg: &UpstreamConfig,
    tls: Option<&UpstreamTls>,
    max_line: usize,
) -> Result<Upstream, ConnectError> {
    let fail = |reason: String| ConnectError {
        address: cfg.address.clone(),
        reason,
    };
    tokio::time::timeout(cfg.connect_timeout, dial(cfg, tls, max_line))
        .await
        .map_err(|_| fail(format!("timed out after {:?}", cfg.connect_timeout)))?
        .map_err(fail)
}

async fn dial(
    cfg: &UpstreamConfig,
    tls: Option<&UpstreamTls>,
    max_line: usize,
) -> Result<Upstream, String> {
    let tcp = TcpStream::connect(&cfg.address)
        .await
        .map_err(|e| e.to_string())?;
    // Commands and short responses must not wait for Nagle.
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let need_tls = || tls.ok_or_else(|| "upstream TLS is not configured".to_string());
    match cfg.tls {
        TlsMode::None => Ok(Upstream {
            stream: Stream::Plain(tcp),
            preread: Vec::new(),
        }),
        TlsMode::Implicit => {
            let stream = need_tls()?
                .connect(tcp)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            Ok(Upstream {
                stream,
                preread: Vec::new(),
            })
        }
        TlsMode::Starttls => {
            let mut tcp = tcp;
            let mut buf = Vec::with_capacity(512);
            let greeting = read_line(&mut tcp, &mut buf, max_line).await?;
            if StatusLine::parse(&greeting).map(|s| s.status) != Ok(Status::Ok) {
                return Err(format!(
                    "greeting is not +OK: {}",
                    String::from_utf8_lossy(&greeting).trim_end()
                ));
            }
            tcp.write_all(b"STLS\r\n")
                .await
                .map_err(|e| e.to_string())?;
            let answer = read_line(&mut tcp, &mut buf, max_line).await?;
            if StatusLine::parse(&answer).map(|s| s.status) != Ok(Status::Ok) {
                // Never fall back to plaintext.
                return Err(format!(
                    "server refused STLS: {}",
                    String::from_utf8_lossy(&answer).trim_end()
                ));
            }
            if !buf.is_empty() {
                // Plaintext after "+OK" to STLS would be taken as TLS-protected: drop it.
                warn!(
                    octets = buf.len(),
                    "STARTTLS injection from upstream: plaintext after +OK to STLS discarded"
                );
            }
            let stream = need_tls()?
                .connect(tcp)
                .await
                .map_err(|e| format!("TLS handshake after STLS: {e}"))?;
            Ok(Upstream {
                stream,
                preread: greeting,
            })
        }
    }
}

/// Read one line, leaving any bytes after it in `buf`.
async fn read_line(
    tcp: &mut TcpStream,
    buf: &mut Vec<u8>,
    max_line: usize,
) -> Result<Vec<u8>, String> {
    loop {
        if let Some(n) = line_end(buf) {
            let rest = buf.split_off(n);
            return Ok(std::mem::replace(buf, rest));
        }
        if buf.len() > max_line {
            return Err("overlong line from upstream".into());
        }
        let mut chunk = [0u8; 512];
        let n = tcp.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed during STLS negotiation".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
