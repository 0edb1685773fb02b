//! Listening sockets: bind, accept, cap concurrent sessions (in all and per client IP), and
//! hand each accepted client on (the caller starts its session).

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::warn;

use crate::config::{ListenerConfig, TlsMode};
use crate::limits::{AcceptBackoff, Counters, IpSlot, Limiter};

/// Listen backlog. tokio (mio) and std use 128, which a burst of new clients overflows: their
/// handshakes then stall for seconds of SYN-ACK retransmits. The kernel caps it at somaxconn.
const BACKLOG: u32 = 1024;

/// Bind a TCP listener with [`BACKLOG`] (and `SO_REUSEADDR`, as `TcpListener::bind` sets).
fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// A client accepted and counted, ready for its session.
#[derive(Debug)]
pub(crate) struct Accepted {
    /// The connection.
    pub(crate) tcp: TcpStream,
    /// Client address.
    pub(crate) client: SocketAddr,
    /// Local address the client connected to.
    pub(crate) local: SocketAddr,
    /// Listener name.
    pub(crate) listener: Arc<str>,
    /// The listener's client-side TLS mode.
    pub(crate) tls: TlsMode,
    /// The session's slots (in all and for its IP): freed when dropped, at the session's end.
    pub(crate) slots: (OwnedSemaphorePermit, IpSlot),
}

/// A listener could not bind its address.
#[derive(Debug, thiserror::Error)]
#[error("listener {name}: cannot bind {addr}: {source}")]
pub struct BindError {
    /// Listener name.
    pub name: String,
    /// Address.
    pub addr: SocketAddr,
    /// Cause.
    pub source: std::io::Error,
}

/// A bound listener, ready to accept.
#[derive(Debug)]
pub struct Listener {
    /// Its configuration.
    pub config: ListenerConfig,
    socket: TcpListener,
}

impl Listener {
    /// Bind the configured address.
    pub async fn bind(config: ListenerConfig) -> Result<Listener, BindError> {
        let socket = bind_tcp(config.bind).map_err(|source| BindError {
            name: config.name.clone(),
            addr: config.bind,
            source,
        })?;
        Ok(Listener { config, socket })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Accept clients until `shutdown` turns true, handing each to `on_accept`.
    ///
    /// A client is accepted first and then counted: over `limits.max_sessions` (the permits of
    /// `sessions`, shared by every listener) or `limits.max_sessions_per_ip` it gets a
    /// `-ERR [SYS/TEMP]` line and is closed at once, instead of waiting in the backlog.
    pub(crate) async fn serve(
        self,
        limiter: Arc<Limiter>,
        sessions: Arc<Semaphore>,
        mut shutdown: watch::Receiver<bool>,
        mut on_accept: impl FnMut(Accepted),
    ) {
        let name: Arc<str> = Arc::from(self.config.name.as_str());
        let mut backoff = AcceptBackoff::default();
        loop {
            let (tcp, client) = tokio::select! {
                r = self.socket.accept() => match r {
                    Ok(x) => {
                        backoff.succeeded();
                        x
                    }
                    Err(e) => {
                        // EMFILE, ENFILE and friends: back off instead of spinning, and do not
                        // flood the log while the condition lasts.
                        let pause = backoff.failed(Instant::now());
                        if let Some(unlogged) = pause.log {
                            warn!(
                                listener = %name,
                                error = %e,
                                retry_in_ms = pause.wait.as_millis() as u64,
                                not_logged_since = unlogged,
                                "accept failed"
                            );
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(pause.wait) => {}
                            _ = shutdown.changed() => return,
                        }
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            let counters = &limiter.counters;
            let Some(ip_slot) = limiter.sessions.try_acquire(client.ip()) else {
                let total = Counters::bump(&counters.per_ip_refused);
                warn!(listener = %name, %client, refused_total = total,
                    "too many sessions from this address: connection refused");
                refuse(
                    tcp,
                    b"-ERR [SYS/TEMP] too many connections from your address\r\n",
                );
                continue;
            };
            let Ok(permit) = sessions.clone().try_acquire_owned() else {
                let total = Counters::bump(&counters.full_refused);
                warn!(listener = %name, %client, refused_total = total,
                    "limits.max_sessions reached: connection refused");
                refuse(tcp, b"-ERR [SYS/TEMP] too many connections\r\n");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let local = tcp.local_addr().unwrap_or(self.config.bind);
            on_accept(Accepted {
                tcp,
                client,
                local,
                listener: name.clone(),
                tls: self.config.tls,
                slots: (permit, ip_slot),
            });
        }
    }
}

/// Send `line` to a client popgate will not serve, and close. Never waits: the write goes
/// straight to the fresh socket's empty send buffer, so a client that does not read cannot
/// stall the accept loop (nor hold a task or a descriptor).
fn refuse(tcp: TcpStream, line: &[u8]) {
    if let Ok(std) = tcp.into_std() {
        let _ = (&std).write(line);
    }
}
