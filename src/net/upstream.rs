//! Dialling the POP3 server behind popgate: plain, STLS (RFC 2595) or implicit TLS, and
//! passing the real client address on (`forward_client`: a PROXY header, or Dovecot's XCLIENT).
//! The dialogue itself is the protocol core's (`proxy::dialogue`); this is its driver: TCP,
//! TLS handshakes, failover over the addresses, the connect timeout.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::config::{ForwardClient, UpstreamConfig};
use crate::net::pool::DeadAddresses;
use crate::net::proxy_header;
use crate::net::tls::{Stream, UpstreamTls};
pub use crate::proxy::dialogue::ConnectStage;
use crate::proxy::dialogue::{Dialogue, Failure, Notice, Plan, Reason, Replay, Step};

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

/// An open upstream connection.
#[derive(Debug)]
pub struct Upstream {
    /// The address (as configured) that answered.
    pub address: String,
    /// The connection, TLS already active for `starttls` and `implicit`.
    pub stream: Stream,
    /// Server bytes already read during setup (the greeting, with `starttls`), to be relayed
    /// first. Empty when a login follows (the dialogue keeps them).
    pub preread: Vec<u8>,
    /// The dialogue, connected: with a login in its plan, the login is next.
    pub(crate) dialogue: Dialogue,
}

/// The dialogue's plan for `cfg`: the PROXY header and XCLIENT line for `origin`, the greeting
/// read during the set-up when `greeting`, then `login` if any.
pub(crate) fn plan(
    cfg: &UpstreamConfig,
    tls: Option<&UpstreamTls>,
    max_line: usize,
    origin: &ClientOrigin,
    greeting: bool,
    login: Option<Replay>,
) -> Plan {
    let version = match cfg.forward_client {
        ForwardClient::ProxyV1 => Some(1),
        ForwardClient::ProxyV2 => Some(2),
        ForwardClient::None | ForwardClient::Xclient => None,
    };
    let xclient = (cfg.forward_client == ForwardClient::Xclient).then(|| {
        format!(
            "XCLIENT ADDR={} PORT={} SESSION={} TTL={XCLIENT_TTL}\r\n",
            origin.client.ip().to_canonical(),
            origin.client.port(),
            origin.session,
        )
        .into_bytes()
    });
    Plan {
        tls: cfg.tls,
        tls_configured: tls.is_some(),
        proxy_header: version
            .map(|v| proxy_header::encode(v, origin.client, origin.local, origin.tls.as_ref())),
        xclient,
        read_greeting: greeting,
        max_line,
        login,
    }
}

/// Open a connection to the upstream: its addresses in order, each within the connect
/// timeout (TCP, STLS and handshake, and with `plan.read_greeting` the greeting: it is then in
/// [`Upstream::preread`]). An address that fails at a stage that fails over (TCP, timeout) is
/// marked dead in `dead` for `dead_for` and the next one is tried; dead ones are skipped unless
/// all are. A TLS or protocol failure is returned at once.
pub(crate) async fn connect(
    cfg: &UpstreamConfig,
    tls: Option<&UpstreamTls>,
    plan: &Plan,
    dead: &DeadAddresses,
) -> Result<Upstream, ConnectError> {
    let order = dead.order(&cfg.address, std::time::Instant::now());
    let mut last = None;
    for (i, address) in order.iter().enumerate() {
        match connect_one(cfg, address, tls, plan).await {
            Ok(u) => {
                dead.mark_alive(address);
                return Ok(u);
            }
            Err(e) if e.stage.fails_over() => {
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
    plan: &Plan,
) -> Result<Upstream, ConnectError> {
    let dialled = tokio::time::timeout(cfg.connect_timeout, dial(address, tls, plan)).await;
    let (stage, reason) = match dialled {
        Ok(Ok(u)) => return Ok(u),
        Ok(Err((stage, reason))) => (stage, reason),
        Err(_) => (ConnectStage::Timeout, Reason::Timeout(cfg.connect_timeout)),
    };
    Err(ConnectError {
        address: address.to_owned(),
        stage,
        reason: reason.to_string(),
    })
}

/// TCP, then the dialogue up to [`Step::Connected`].
async fn dial(
    address: &str,
    tls: Option<&UpstreamTls>,
    plan: &Plan,
) -> Result<Upstream, (ConnectStage, Reason)> {
    let tcp_failed = |e: std::io::Error| (ConnectStage::Tcp, Reason::Tcp(e.to_string()));
    let tcp = TcpStream::connect(address).await.map_err(tcp_failed)?;
    // Commands and short responses must not wait for Nagle.
    tcp.set_nodelay(true).map_err(tcp_failed)?;
    let mut stream = Stream::Plain(tcp);
    let mut dialogue = Dialogue::new(plan.clone());
    loop {
        while let Some(step) = dialogue.poll() {
            match step {
                Step::Write(bytes) => {
                    if let Err(e) = write(&mut stream, &bytes).await {
                        dialogue.write_failed(&e);
                    }
                }
                Step::StartTls => match (tls, std::mem::replace(&mut stream, Stream::Detached)) {
                    (Some(tls), Stream::Plain(tcp)) => match tls.connect(tcp, address).await {
                        Ok(s) => {
                            stream = s;
                            dialogue.tls_done();
                        }
                        Err(e) => dialogue.tls_failed(&e),
                    },
                    // The plan knows whether TLS is configured; a second handshake is none.
                    _ => dialogue.tls_failed(&"upstream TLS is not configured"),
                },
                Step::Notice(n) => log_notice(&n),
                Step::Connected => {
                    let preread = dialogue.take_preread();
                    return Ok(Upstream {
                        address: address.to_owned(),
                        stream,
                        preread,
                        dialogue,
                    });
                }
                Step::Failed(Failure::Broken { stage, reason }) => return Err((stage, reason)),
                // Only a login ends otherwise, and it starts after `Connected`.
                Step::Failed(_) | Step::LoggedIn { .. } | Step::FetchToken => {
                    return Err((ConnectStage::Setup, Reason::Closed));
                }
            }
        }
        read(&mut stream, &mut dialogue).await;
    }
}

/// Write and flush `bytes` (under TLS a write can leave records queued in rustls).
pub(crate) async fn write(stream: &mut Stream, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// One read from the server into the dialogue.
pub(crate) async fn read(stream: &mut Stream, dialogue: &mut Dialogue) {
    let mut chunk = [0u8; 512];
    match stream.read(&mut chunk).await {
        Ok(0) => dialogue.on_server_eof(),
        Ok(n) => dialogue.on_server_bytes(&chunk[..n]),
        Err(e) => dialogue.read_failed(&e),
    }
}

/// The log line of a [`Notice`].
pub(crate) fn log_notice(notice: &Notice) {
    match notice {
        Notice::StlsInjection { octets } => warn!(
            octets,
            "STARTTLS injection from upstream: plaintext after +OK to STLS discarded"
        ),
        Notice::XclientTrailing { octets } => warn!(
            octets,
            "upstream sent data after its XCLIENT reply: discarded"
        ),
        Notice::XclientNotOffered { greeting_ok } => {
            // A refusal greeting (-ERR) says nothing about XCLIENT; a missing offer is a setup
            // mistake worth one warning, not one per session.
            static WARNED: std::sync::atomic::AtomicBool =
                std::sync::atomic::AtomicBool::new(false);
            if *greeting_ok && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                warn!(
                    "forward_client = \"xclient\", but the server's greeting does not offer XCLIENT \
                     (is popgate's address in its login_trusted_networks?): it sees popgate's \
                     address (warned once)"
                );
            }
        }
        Notice::XclientPassed => info!("client address passed on with XCLIENT"),
    }
}
