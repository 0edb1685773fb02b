//! Dialling the POP3 server behind popgate: plain, STLS (RFC 2595) or implicit TLS, and
//! passing the real client address on (`forward_client`: a PROXY header, or Dovecot's XCLIENT).

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::config::{ForwardClient, TlsMode, UpstreamConfig};
use crate::net::pool::DeadAddresses;
use crate::net::proxy_header;
use crate::net::tls::{Stream, UpstreamTls};
use crate::pop3::capa::offers_xclient;
use crate::pop3::command::line_end;
use crate::pop3::response::{Status, StatusLine};

/// Hops an XCLIENT allows after this one. Dovecot's own proxy starts at 5 and counts down;
/// popgate is one hop, as a Dovecot proxy would be.
const XCLIENT_TTL: u32 = 4;

/// Whom a connection is for, as the upstream is told with `forward_client`.
#[derive(Debug, Clone)]
pub struct ClientOrigin {
    /// The client's address (from the PROXY header behind a balancer).
    pub client: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
    /// popgate's session id, passed as XCLIENT `SESSION` so that the server's log names it.
    pub session: String,
    /// The client's TLS to popgate (implicit, or STLS done before the upstream was dialled):
    /// a PROXY v2 header says so in its SSL TLV, as HAProxy's `send-proxy-v2-ssl` does.
    pub tls: Option<crate::types::TlsInfo>,
}

/// The upstream could not be reached (TCP, STLS or TLS handshake failed, or timed out).
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to upstream {address}: {reason}")]
pub struct ConnectError {
    /// Upstream address.
    pub address: String,
    /// The step that failed.
    pub stage: ConnectStage,
    /// Cause.
    pub reason: String,
}

/// The step of [`connect`] that failed (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectStage {
    /// Resolving the name or the TCP connect.
    Tcp,
    /// POP3 before or after the handshake: the PROXY header, the greeting, `STLS`, `XCLIENT`.
    Setup,
    /// A TLS handshake.
    Tls,
    /// `upstream.connect_timeout` ran out (at whichever step).
    Timeout,
}

impl ConnectStage {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectStage::Tcp => "tcp",
            ConnectStage::Setup => "setup",
            ConnectStage::Tls => "tls",
            ConnectStage::Timeout => "timeout",
        }
    }
}

/// An open upstream connection.
#[derive(Debug)]
pub struct Upstream {
    /// The address (as configured) that answered.
    pub address: String,
    /// The connection, TLS already active for `starttls` and `implicit`.
    pub stream: Stream,
    /// Server bytes already read during setup (the greeting, with `starttls`), to be relayed
    /// first.
    pub preread: Vec<u8>,
}

/// Open a connection to the upstream: its addresses in order, each within the connect
/// timeout (TCP, STLS and handshake, and with `greeting` the greeting: it is then in
/// [`Upstream::preread`]). An address that fails at the TCP stage or times out is marked dead
/// in `dead` for `dead_for` and the next one is tried; dead ones are skipped unless all are. A
/// TLS or protocol failure is returned at once: failing over would hide a misconfiguration
/// (and the next server would most likely refuse the same way).
pub async fn connect(
    cfg: &UpstreamConfig,
    tls: Option<&UpstreamTls>,
    max_line: usize,
    origin: &ClientOrigin,
    dead: &DeadAddresses,
    greeting: bool,
) -> Result<Upstream, ConnectError> {
    let order = dead.order(&cfg.address, std::time::Instant::now());
    let mut last = None;
    for (i, address) in order.iter().enumerate() {
        match connect_one(cfg, address, tls, max_line, origin, greeting).await {
            Ok(u) => {
                dead.mark_alive(address);
                return Ok(u);
            }
            Err(e) if matches!(e.stage, ConnectStage::Tcp | ConnectStage::Timeout) => {
                dead.mark_dead(address, std::time::Instant::now(), cfg.dead_for);
                if i + 1 < order.len() {
                    warn!(upstream = cfg.label(), %address, error = %e.reason, "upstream address failed; trying the next one");
                }
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| ConnectError {
        address: String::new(),
        stage: ConnectStage::Tcp,
        reason: "no address configured".into(),
    }))
}

/// One address within the connect timeout.
async fn connect_one(
    cfg: &UpstreamConfig,
    address: &str,
    tls: Option<&UpstreamTls>,
    max_line: usize,
    origin: &ClientOrigin,
    greeting: bool,
) -> Result<Upstream, ConnectError> {
    let mut stage = ConnectStage::Tcp;
    let dialled = tokio::time::timeout(
        cfg.connect_timeout,
        dial(cfg, address, tls, max_line, origin, greeting, &mut stage),
    )
    .await;
    let fail = |stage, reason| ConnectError {
        address: address.to_owned(),
        stage,
        reason,
    };
    match dialled {
        Ok(Ok(u)) => Ok(u),
        Ok(Err(reason)) => Err(fail(stage, reason)),
        Err(_) => Err(fail(
            ConnectStage::Timeout,
            format!("timed out after {:?}", cfg.connect_timeout),
        )),
    }
}

async fn dial(
    cfg: &UpstreamConfig,
    address: &str,
    tls: Option<&UpstreamTls>,
    max_line: usize,
    origin: &ClientOrigin,
    greeting: bool,
    stage: &mut ConnectStage,
) -> Result<Upstream, String> {
    let mut tcp = TcpStream::connect(address)
        .await
        .map_err(|e| e.to_string())?;
    // Commands and short responses must not wait for Nagle.
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    *stage = ConnectStage::Setup;
    // A PROXY header goes first, before the greeting and before any TLS handshake.
    let version = match cfg.forward_client {
        ForwardClient::ProxyV1 => Some(1),
        ForwardClient::ProxyV2 => Some(2),
        ForwardClient::None | ForwardClient::Xclient => None,
    };
    if let Some(v) = version {
        tcp.write_all(&proxy_header::encode(
            v,
            origin.client,
            origin.local,
            origin.tls.as_ref(),
        ))
        .await
        .map_err(|e| format!("sending the PROXY header: {e}"))?;
    }
    let xclient = cfg.forward_client == ForwardClient::Xclient;
    let need_tls = || tls.ok_or_else(|| "upstream TLS is not configured".to_string());
    let mut buf = Vec::with_capacity(512);
    match cfg.tls {
        TlsMode::None | TlsMode::Implicit => {
            let mut stream = match cfg.tls {
                TlsMode::Implicit => {
                    *stage = ConnectStage::Tls;
                    need_tls()?
                        .connect(tcp, address)
                        .await
                        .map_err(|e| format!("TLS handshake: {e}"))?
                }
                _ => Stream::Plain(tcp),
            };
            *stage = ConnectStage::Setup;
            if !xclient && !greeting {
                // The session reads the greeting itself.
                return Ok(Upstream {
                    address: address.to_owned(),
                    stream,
                    preread: Vec::new(),
                });
            }
            let greeting = read_line(&mut stream, &mut buf, max_line).await?;
            if xclient {
                send_xclient(&mut stream, &mut buf, &greeting, origin, max_line).await?;
            }
            let mut preread = greeting;
            preread.append(&mut buf);
            Ok(Upstream {
                address: address.to_owned(),
                stream,
                preread,
            })
        }
        TlsMode::Starttls => {
            let mut tcp = tcp;
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
                buf.clear();
            }
            *stage = ConnectStage::Tls;
            let mut stream = need_tls()?
                .connect(tcp, address)
                .await
                .map_err(|e| format!("TLS handshake after STLS: {e}"))?;
            *stage = ConnectStage::Setup;
            // As Dovecot's own proxy does: XCLIENT under TLS, if the first greeting offered it.
            if xclient {
                send_xclient(&mut stream, &mut buf, &greeting, origin, max_line).await?;
                if !buf.is_empty() {
                    warn!(
                        octets = buf.len(),
                        "upstream sent data after its XCLIENT reply: discarded"
                    );
                }
            }
            Ok(Upstream {
                address: address.to_owned(),
                stream,
                preread: greeting,
            })
        }
    }
}

/// Tell a Dovecot that offers it (`+OK [XCLIENT] ...` greeting) who the client is, and read
/// its `+OK`. Without the offer (popgate is not in the server's `login_trusted_networks`),
/// nothing is sent and a warning says why the server will see popgate's address.
async fn send_xclient(
    stream: &mut Stream,
    buf: &mut Vec<u8>,
    greeting: &[u8],
    origin: &ClientOrigin,
    max_line: usize,
) -> Result<(), String> {
    if !offers_xclient(greeting) {
        // A refusal greeting (-ERR) says nothing about XCLIENT; a missing offer is a setup
        // mistake worth one warning, not one per session.
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if greeting.starts_with(b"+OK") && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            warn!(
                "forward_client = \"xclient\", but the server's greeting does not offer XCLIENT \
                 (is popgate's address in its login_trusted_networks?): it sees popgate's \
                 address (warned once)"
            );
        }
        return Ok(());
    }
    let line = format!(
        "XCLIENT ADDR={} PORT={} SESSION={} TTL={XCLIENT_TTL}\r\n",
        origin.client.ip().to_canonical(),
        origin.client.port(),
        origin.session,
    );
    stream
        .write_all(line.as_bytes())
        .await
        .map_err(|e| format!("sending XCLIENT: {e}"))?;
    let answer = read_line(stream, buf, max_line).await?;
    if StatusLine::parse(&answer).map(|s| s.status) != Ok(Status::Ok) {
        return Err(format!(
            "server refused XCLIENT: {}",
            String::from_utf8_lossy(&answer).trim_end()
        ));
    }
    info!(client = %origin.client, "client address passed on with XCLIENT");
    Ok(())
}

/// Read one line, leaving any bytes after it in `buf`.
pub(crate) async fn read_line(
    tcp: &mut (impl AsyncRead + Unpin),
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
            return Err("connection closed during connection setup".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
