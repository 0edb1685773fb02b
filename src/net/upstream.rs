//! Dialling the POP3 server behind popgate: plain, STLS (RFC 2595) or implicit TLS, and
//! passing the real client address on (`forward_client`: a PROXY header, or Dovecot's XCLIENT).
//! The dialogue and the sequence over the addresses are the protocol core's
//! (`proxy::dialogue::Connector`: failover, dead marks, the connect timeout): a session's
//! connectors (direct mode's set-up, the re-dial after STLS, the routed login) are the session
//! machine's, their steps carried out by the session's driver with [`Link`]; [`drive`] carries
//! them out for the OAuth2 bridge's login on a lent connection.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::config::{ForwardClient, UpstreamConfig};
use crate::net::pool::DeadAddresses;
use crate::net::proxy_header;
use crate::net::tls::{Stream, UpstreamTls};
pub use crate::proxy::dialogue::ConnectStage;
use crate::proxy::dialogue::{
    ConnectEnd, ConnectFailure, ConnectStep, ConnectTimeouts, Connector, Notice, Plan, Reason,
    Replay,
};

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

/// The connector's clock: tokio's (paused in tests), the session's own (`session::clock`).
pub(crate) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// The core's [`Connector`] for `cfg` with `plan`, at [`now`]: the addresses in the order
/// `dead` has them, `reply_timeout` for a login.
pub(crate) fn connector(
    cfg: &UpstreamConfig,
    plan: Plan,
    reply_timeout: Option<Duration>,
    dead: &DeadAddresses,
) -> Connector {
    let now = now();
    let order = dead.order(&cfg.address, now);
    let timeouts = ConnectTimeouts {
        connect: cfg.connect_timeout,
        dead_for: cfg.dead_for,
        reply: reply_timeout,
    };
    Connector::new(
        plan,
        order.into_iter().map(str::to_owned).collect(),
        timeouts,
        now,
    )
}

/// Bytes read at once from an upstream during its set-up or a login (a few short lines).
pub(crate) const READ_CHUNK: usize = 512;

/// The connection a [`Connector`]'s driver works on: dialled and upgraded to TLS ([`Stream`]),
/// or lent by the caller (a `&mut` stream: no dial, no TLS, as [`Connector::login_only`]).
pub(crate) trait Link: AsyncRead + AsyncWrite + Unpin + Sized {
    /// TCP to `address`, with `TCP_NODELAY`.
    async fn dial(address: &str) -> std::io::Result<Self>;
    /// The client TLS handshake toward `address`.
    async fn start_tls(self, tls: Option<&UpstreamTls>, address: &str) -> Result<Self, String>;
}

impl Link for Stream {
    async fn dial(address: &str) -> std::io::Result<Stream> {
        let tcp = TcpStream::connect(address).await?;
        // Commands and short responses must not wait for Nagle.
        tcp.set_nodelay(true)?;
        Ok(Stream::Plain(tcp))
    }

    async fn start_tls(self, tls: Option<&UpstreamTls>, address: &str) -> Result<Stream, String> {
        match (tls, self) {
            (Some(tls), Stream::Plain(tcp)) => {
                tls.connect(tcp, address).await.map_err(|e| e.to_string())
            }
            // The plan knows whether TLS is configured; a second handshake is none.
            _ => Err("upstream TLS is not configured".into()),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Link for &mut S {
    async fn dial(_: &str) -> std::io::Result<Self> {
        Err(std::io::Error::other("a lent connection is not dialled"))
    }

    async fn start_tls(self, _: Option<&UpstreamTls>, _: &str) -> Result<Self, String> {
        Err("upstream TLS is not configured".into())
    }
}

/// Where a [`Connector`]'s driver gets a fresh access token (`FetchToken`).
pub(crate) trait Tokens {
    /// A fresh token, or `None` (the implementer keeps why).
    async fn fresh(&mut self) -> Option<String>;
}

/// No token source: a plan without a bearer login.
#[cfg(test)]
pub(crate) struct NoTokens;

#[cfg(test)]
impl Tokens for NoTokens {
    async fn fresh(&mut self) -> Option<String> {
        None
    }
}

/// `work`, unless `deadline` comes first (`None`).
async fn before<T>(
    deadline: Option<std::time::Instant>,
    work: impl Future<Output = T>,
) -> Option<T> {
    match deadline {
        Some(d) => tokio::time::timeout_at(tokio::time::Instant::from_std(d), work)
            .await
            .ok(),
        None => Some(work.await),
    }
}

/// Carry out `connector`'s steps on `link` until its end: dial (replacing `link`), write,
/// run handshakes, fetch tokens from `tokens`, apply dead and alive marks to `dead`, log
/// notices (`label` names the upstream), read at most `chunk` bytes at once (1: nothing after
/// the final line is taken from a lent connection), each raced with the connector's deadline,
/// whose expiry is fed in. On the end `link` holds the connection it ended on, if any.
pub(crate) async fn drive<L: Link>(
    connector: &mut Connector,
    link: &mut Option<L>,
    tls: Option<&UpstreamTls>,
    dead: Option<&DeadAddresses>,
    label: &str,
    tokens: &mut impl Tokens,
    chunk: usize,
) -> ConnectEnd {
    let mut address = String::new();
    let mut buf = [0u8; READ_CHUNK];
    let chunk = chunk.clamp(1, READ_CHUNK);
    loop {
        while let Some(step) = connector.poll() {
            let deadline = connector.poll_timeout();
            match step {
                ConnectStep::Dial(to) => {
                    // The connection to the address failed over is closed without a word.
                    *link = None;
                    address = to;
                    match before(deadline, L::dial(&address)).await {
                        None => connector.on_timeout(now()),
                        Some(Ok(l)) => {
                            *link = Some(l);
                            connector.dialled(now());
                        }
                        Some(Err(e)) => connector.dial_failed(now(), &e),
                    }
                }
                ConnectStep::Write(bytes) => {
                    let Some(l) = link.as_mut() else {
                        connector.write_failed(now(), &"not connected");
                        continue;
                    };
                    match before(deadline, write(l, &bytes)).await {
                        None => connector.on_timeout(now()),
                        Some(Ok(())) => {}
                        Some(Err(e)) => connector.write_failed(now(), &e),
                    }
                }
                ConnectStep::StartTls => {
                    let Some(l) = link.take() else {
                        connector.tls_failed(now(), &"not connected");
                        continue;
                    };
                    match before(deadline, l.start_tls(tls, &address)).await {
                        None => connector.on_timeout(now()),
                        Some(Ok(l)) => {
                            *link = Some(l);
                            connector.tls_done(now());
                        }
                        Some(Err(e)) => connector.tls_failed(now(), &e),
                    }
                }
                ConnectStep::FetchToken => match before(deadline, tokens.fresh()).await {
                    None => connector.on_timeout(now()),
                    Some(Some(token)) => connector.fresh_token(now(), token),
                    Some(None) => connector.token_failed(),
                },
                ConnectStep::Notice(n) => log_notice(label, &n),
                ConnectStep::MarkDead { address, until } => {
                    if let Some(dead) = dead {
                        dead.mark_dead(&address, until);
                    }
                }
                ConnectStep::MarkAlive(address) => {
                    if let Some(dead) = dead {
                        dead.mark_alive(&address);
                    }
                }
                ConnectStep::End(end) => return end,
            }
        }
        let deadline = connector.poll_timeout();
        let Some(l) = link.as_mut() else {
            // Nothing to read from (the connector never waits so): its deadline ends it.
            let Some(d) = deadline else {
                return ConnectEnd::Failed(ConnectFailure::Unavailable {
                    address,
                    stage: ConnectStage::Setup,
                    reason: Reason::Closed,
                });
            };
            tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await;
            connector.on_timeout(now());
            continue;
        };
        match before(deadline, l.read(&mut buf[..chunk])).await {
            None => connector.on_timeout(now()),
            Some(Ok(0)) => connector.on_server_eof(now()),
            Some(Ok(n)) => connector.on_server_bytes(now(), &buf[..n]),
            Some(Err(e)) => connector.read_failed(now(), &e),
        }
    }
}

/// Write and flush `bytes` (under TLS a write can leave records queued in rustls).
async fn write<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// The log line of a [`Notice`] (`label` names the upstream).
pub(crate) fn log_notice(label: &str, notice: &Notice) {
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
        Notice::FailingOver { address, error } => warn!(
            upstream = label,
            %address,
            %error,
            "upstream address failed; trying the next one"
        ),
    }
}
