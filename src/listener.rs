//! Listening sockets: bind, accept, cap concurrent sessions, spawn a task per client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info_span, warn};

use crate::config::ListenerConfig;
use crate::error::StartError;
use crate::session::{self, SessionInfo, Shared};
use crate::tls::Stream;

/// Listen backlog. tokio (mio) and std use 128, which a burst of new clients overflows: their
/// handshakes then stall for seconds of SYN-ACK retransmits. The kernel caps it at somaxconn.
pub const BACKLOG: u32 = 1024;

/// Bind a TCP listener with [`BACKLOG`] (and `SO_REUSEADDR`, as `TcpListener::bind` sets).
pub fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
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
    pub async fn bind(config: ListenerConfig) -> Result<Listener, StartError> {
        let socket = bind_tcp(config.bind).map_err(|source| StartError::Bind {
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

    /// Accept clients until `shutdown` turns true; sessions are spawned on `tasks`.
    pub async fn serve(
        self,
        shared: Arc<Shared>,
        sessions: Arc<Semaphore>,
        ids: Arc<AtomicU64>,
        tasks: TaskTracker,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let name: Arc<str> = Arc::from(self.config.name.as_str());
        loop {
            // Take a session slot before accepting: over the cap, clients wait in the backlog.
            let permit = tokio::select! {
                p = sessions.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = shutdown.changed() => return,
            };
            let (tcp, client) = tokio::select! {
                r = self.socket.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(listener = %name, error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let local = tcp.local_addr().unwrap_or(self.config.bind);
            let id = ids.fetch_add(1, Ordering::Relaxed);
            let info = SessionInfo {
                id,
                listener: name.clone(),
                client,
                local,
                tls_mode: self.config.tls,
            };
            let span = info_span!("session", id, client = %client, listener = %name);
            let shared = shared.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(
                async move {
                    tracing::info!("session open");
                    session::run(Stream::Plain(tcp), info, shared, shutdown).await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
    }
}
