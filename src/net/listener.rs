//! Listening sockets: bind, accept, cap concurrent sessions (in all and per client IP), and
//! hand each accepted client on (the caller starts its session).

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tracing::warn;

use crate::config::{ListenerConfig, TlsMode};
use crate::limits::{AcceptBackoff, Counters, IpSlot, Limiter, TotalSlot};
use crate::net::proxy_header;
use crate::pop3::replies;
use crate::types::Network;

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

/// Listening sockets passed by the service manager (systemd socket activation: `LISTEN_FDS`,
/// `LISTEN_PID`, `LISTEN_FDNAMES`, e.g. from `popgate.socket`). A listener takes the socket
/// named after it (`FileDescriptorName=`), else the one bound to its exact `bind` address,
/// else one on its port when both addresses are unspecified (`ListenStream=110` binds
/// `[::]:110`, which `bind = "0.0.0.0:110"` takes). The service manager keeps its own copy of
/// each socket: while popgate restarts, new clients wait in the socket's backlog instead of
/// being refused.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Vec<(String, std::net::TcpListener, SocketAddr)>,
    problems: Vec<String>,
}

impl Inherited {
    /// Take the sockets the environment passes (for this process: `LISTEN_PID`); the
    /// variables are removed. Call before any other thread runs (it changes the environment).
    pub fn from_env() -> Inherited {
        let mut out = Inherited::default();
        // sd_listen_fds(3): the sockets are this process's only when LISTEN_PID names it.
        // listenfd also takes them when LISTEN_PID is missing, so a LISTEN_FDS left in the
        // environment by a wrapper would have popgate serve on whatever fds it inherited.
        let for_us = std::env::var("LISTEN_PID")
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            == Some(std::process::id());
        if !for_us {
            if std::env::var_os("LISTEN_FDS").is_some() {
                out.problems.push(
                    "LISTEN_FDS is set but LISTEN_PID does not name this process: no passed \
                     socket is used"
                        .into(),
                );
            }
            return out;
        }
        let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
            .map(|v| v.split(':').map(str::to_owned).collect())
            .unwrap_or_default();
        let mut fds = listenfd::ListenFd::from_env();
        for i in 0..fds.len() {
            let name = names.get(i).cloned().unwrap_or_default();
            match fds.take_tcp_listener(i) {
                Ok(Some(l)) => out.add(i, name, l),
                Ok(None) => {}
                Err(e) => out
                    .problems
                    .push(format!("passed socket #{i} ({name}): {e}: not used")),
            }
        }
        out
    }

    /// Keep passed socket `i` if it is a listening TCP socket. listenfd checks the family and
    /// the type only: a connected socket (a unit with `Accept=yes` passes one per connection)
    /// or one never put in listening state would leave its listener failing every accept,
    /// and the address never bound. Such a socket is not used; the listener binds its own.
    fn add(&mut self, i: usize, name: String, l: std::net::TcpListener) {
        use nix::sys::socket::{getsockopt, sockopt};
        match (getsockopt(&l, sockopt::AcceptConn), l.local_addr()) {
            (Ok(true), Ok(addr)) => self.sockets.push((name, l, addr)),
            (Ok(false), _) => self.problems.push(format!(
                "passed socket #{i} ({name}) is not a listening socket (Accept=yes?): not used"
            )),
            (Err(e), _) => self
                .problems
                .push(format!("passed socket #{i} ({name}): {e}: not used")),
            (_, Err(e)) => self
                .problems
                .push(format!("passed socket #{i} ({name}): {e}: not used")),
        }
    }

    /// How many sockets are left.
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    /// Whether none are left.
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// The socket for `config`, if one was passed.
    fn take(&mut self, config: &ListenerConfig) -> Option<(std::net::TcpListener, SocketAddr)> {
        let by_name = self
            .sockets
            .iter()
            .position(|(n, _, _)| !n.is_empty() && *n == config.name);
        let by_addr = || {
            self.sockets
                .iter()
                .position(|(_, _, a)| *a == config.bind && a.port() != 0)
        };
        let by_port = || {
            self.sockets.iter().position(|(_, _, a)| {
                a.port() == config.bind.port()
                    && a.ip().is_unspecified()
                    && config.bind.ip().is_unspecified()
            })
        };
        let i = by_name.or_else(by_addr).or_else(by_port)?;
        let (_, l, a) = self.sockets.remove(i);
        Some((l, a))
    }

    /// Log what could not be used, and the sockets no listener took (closed here; the
    /// service manager keeps its copies).
    pub(crate) fn report_leftovers(self) {
        for p in self.problems {
            warn!("{p}");
        }
        for (name, _, addr) in self.sockets {
            warn!(%addr, name = %name, "socket passed by the service manager matches no listener: not used");
        }
    }
}

/// A port below 1024 refused to a process that is not root: typically a reload after
/// `[process] user`'s switch, which only a restart can undo.
fn explain_denied(e: std::io::Error, addr: SocketAddr) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::PermissionDenied
        && addr.port() < 1024
        && !nix::unistd::geteuid().is_root()
    {
        std::io::Error::new(
            e.kind(),
            format!(
                "{e}: ports below 1024 need root or CAP_NET_BIND_SERVICE; popgate gave root up \
                 at start ([process] user), so only a restart can bind this listener"
            ),
        )
    } else {
        e
    }
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
    /// The IP slot is taken after the PROXY header on `proxy_protocol` listeners.
    pub(crate) slots: (TotalSlot, Option<IpSlot>),
    /// On `proxy_protocol` listeners: the header is still to be read ([`Accepted::proxied`]).
    proxy_in: Option<Arc<ProxyIn>>,
    /// The peer that sent the PROXY header (the balancer), once it has been read.
    pub(crate) proxy: Option<SocketAddr>,
}

/// A listener's PROXY protocol settings.
#[derive(Debug)]
struct ProxyIn {
    trusted: Vec<Network>,
    timeout: std::time::Duration,
}

impl Accepted {
    /// Whether a PROXY header is still to be read ([`Accepted::proxied`] has work to do).
    pub(crate) fn proxy_header_due(&self) -> bool {
        self.proxy_in.is_some()
    }

    /// On a `proxy_protocol` listener, read the PROXY header (the peer is already known to
    /// be trusted) and take the client and local address from it, then count the session
    /// against the real client's IP. `false`: the connection was refused and closed (logged).
    /// Nothing is sent upstream before this returns `true`.
    pub(crate) async fn proxied(&mut self, limiter: &Limiter) -> bool {
        let Some(p) = self.proxy_in.take() else {
            return true;
        };
        let peer = self.client;
        match proxy_header::read(&mut self.tcp, p.timeout).await {
            Ok(origin) => {
                if let Some(o) = origin {
                    self.client = o.client;
                    self.local = o.local;
                }
                self.proxy = Some(peer);
            }
            Err(e) => {
                let total = Counters::bump(&limiter.counters.proxy_refused);
                warn!(listener = %self.listener, %peer, error = %e, refused_total = total,
                    "PROXY header refused: connection closed");
                return false;
            }
        }
        let Some(slot) = limiter.sessions.try_acquire(self.client.ip()) else {
            let total = Counters::bump(&limiter.counters.per_ip_refused);
            warn!(listener = %self.listener, client = %self.client, proxy = %peer,
                refused_total = total, "too many sessions from this address: connection refused");
            let _ = tokio::io::AsyncWriteExt::write_all(
                &mut self.tcp,
                &replies::line(replies::TOO_MANY_FROM_ADDRESS),
            )
            .await;
            return false;
        };
        self.slots.1 = Some(slot);
        true
    }
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
        let socket = bind_tcp(config.bind).map_err(|e| BindError {
            name: config.name.clone(),
            addr: config.bind,
            source: explain_denied(e, config.bind),
        })?;
        Ok(Listener { config, socket })
    }

    /// The socket `inherited` holds for `config` (socket activation), else [`Listener::bind`].
    pub(crate) async fn bind_or_inherit(
        config: ListenerConfig,
        inherited: &mut Inherited,
    ) -> Result<Listener, BindError> {
        let Some((std, addr)) = inherited.take(&config) else {
            return Listener::bind(config).await;
        };
        let err = |source| BindError {
            name: config.name.clone(),
            addr,
            source,
        };
        std.set_nonblocking(true).map_err(err)?;
        let socket = TcpListener::from_std(std).map_err(err)?;
        tracing::info!(listener = %config.name, %addr, "using the socket passed by the service manager");
        Ok(Listener { config, socket })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Accept clients until `shutdown` changes (or its sender is gone), handing each to
    /// `on_accept`; then give the listener back (a reload may serve it on with a new config).
    ///
    /// A client is accepted first and then counted: over `limits.max_sessions` (shared by every
    /// listener) or `limits.max_sessions_per_ip` it gets a `-ERR [SYS/TEMP]` line and is closed
    /// at once, instead of waiting in the backlog.
    pub(crate) async fn serve(
        self,
        limiter: Arc<Limiter>,
        mut shutdown: watch::Receiver<bool>,
        mut on_accept: impl FnMut(Accepted),
    ) -> Listener {
        let name: Arc<str> = Arc::from(self.config.name.as_str());
        let proxy_in = self.config.proxy_protocol.then(|| {
            Arc::new(ProxyIn {
                trusted: self.config.trusted_proxies.clone(),
                timeout: self.config.proxy_timeout,
            })
        });
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
                            _ = shutdown.changed() => return self,
                        }
                        continue;
                    }
                },
                _ = shutdown.changed() => return self,
            };
            // A dual-stack socket gives IPv4 clients as `::ffff:a.b.c.d`: counted, penalised
            // and logged as the same client as on an IPv4 listener.
            let client = proxy_header::canonical(client);
            let counters = &limiter.counters;
            if let Some(p) = &proxy_in
                && !p.trusted.iter().any(|n| n.contains(client.ip()))
            {
                let total = Counters::bump(&counters.proxy_refused);
                warn!(listener = %name, peer = %client, refused_total = total,
                    "connection from outside trusted_proxies on a proxy_protocol listener: closed");
                drop(tcp);
                continue;
            }
            // Behind a balancer the peer is the balancer: count per IP once the header names
            // the client.
            let ip_slot = if proxy_in.is_some() {
                None
            } else if let Some(slot) = limiter.sessions.try_acquire(client.ip()) {
                Some(slot)
            } else {
                let total = Counters::bump(&counters.per_ip_refused);
                warn!(listener = %name, %client, refused_total = total,
                    "too many sessions from this address: connection refused");
                refuse(tcp, replies::TOO_MANY_FROM_ADDRESS);
                continue;
            };
            let Some(permit) = limiter.total.try_acquire() else {
                let total = Counters::bump(&counters.full_refused);
                warn!(listener = %name, %client, refused_total = total,
                    "limits.max_sessions reached: connection refused");
                refuse(tcp, replies::TOO_MANY_CONNECTIONS);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let local = proxy_header::canonical(tcp.local_addr().unwrap_or(self.config.bind));
            on_accept(Accepted {
                tcp,
                client,
                local,
                listener: name.clone(),
                tls: self.config.tls,
                slots: (permit, ip_slot),
                proxy_in: proxy_in.clone(),
                proxy: None,
            });
        }
    }
}

/// Send `reply` (a [`replies`] text) to a client popgate will not serve, and close. Never waits: the write goes
/// straight to the fresh socket's empty send buffer, so a client that does not read cannot
/// stall the accept loop (nor hold a task or a descriptor).
pub(crate) fn refuse(tcp: TcpStream, reply: &str) {
    if let Ok(std) = tcp.into_std() {
        // One write: the line goes out whole or not at all.
        let _ = (&std).write(&replies::line(reply));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(name: &str, bind: &str) -> ListenerConfig {
        let text = format!(
            "[[listener]]\nname = \"{name}\"\nbind = \"{bind}\"\n\
             [upstream]\naddress = \"127.0.0.1:110\"\n"
        );
        let c = crate::config::Config::parse(&text, std::path::Path::new("t.toml")).unwrap();
        c.listeners[0].clone()
    }

    /// Passed sockets as (name, address); the addresses are claimed, not bound.
    fn passed(entries: &[(&str, &str)]) -> Inherited {
        let mut inherited = Inherited::default();
        for (name, addr) in entries {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            inherited
                .sockets
                .push(((*name).into(), l, addr.parse().unwrap()));
        }
        inherited
    }

    /// A socket passed that does not listen (a connected one, as `Accept=yes` passes, or one
    /// bound but never listening) is not used: the listener would fail every accept and never
    /// bind its own address.
    #[test]
    fn a_passed_socket_that_does_not_listen_is_not_used() {
        let mut inherited = Inherited::default();
        // Bound, never listening.
        let bound =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        bound
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let bound_addr = bound.local_addr().unwrap().as_socket().unwrap();
        inherited.add(0, "pop3".into(), bound.into());
        // Connected (what a unit with Accept=yes hands over).
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let conn = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let fd: std::os::fd::OwnedFd = conn.into();
        inherited.add(1, "pop3s".into(), fd.into());
        assert!(inherited.is_empty());
        assert_eq!(inherited.problems.len(), 2, "{:?}", inherited.problems);
        assert!(inherited.problems[0].contains("not a listening socket"));
        assert!(
            inherited
                .take(&listener("pop3", &bound_addr.to_string()))
                .is_none()
        );
        // A listening one is kept.
        inherited.add(
            2,
            "pop3".into(),
            std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        );
        assert_eq!(inherited.len(), 1);
    }

    #[test]
    fn passed_sockets_go_by_name_then_address_then_unspecified_port() {
        let mut i = passed(&[
            ("popgate.socket", "[::]:110"),
            ("popgate.socket", "192.0.2.1:995"),
            ("imap", "127.0.0.1:143"),
        ]);
        // A name wins over any address.
        let (_, a) = i.take(&listener("imap", "127.0.0.1:9999")).unwrap();
        assert_eq!(a, "127.0.0.1:143".parse().unwrap());
        // The exact address; a different address on the same port is not it.
        assert!(i.take(&listener("pop3s", "192.0.2.2:995")).is_none());
        let (_, a) = i.take(&listener("pop3s", "192.0.2.1:995")).unwrap();
        assert_eq!(a, "192.0.2.1:995".parse().unwrap());
        // `ListenStream=110` ([::]:110) serves `bind = "0.0.0.0:110"`; taken once only.
        let (_, a) = i.take(&listener("pop3", "0.0.0.0:110")).unwrap();
        assert_eq!(a, "[::]:110".parse().unwrap());
        assert!(i.take(&listener("pop3", "0.0.0.0:110")).is_none());
        assert!(i.is_empty());
    }
}
