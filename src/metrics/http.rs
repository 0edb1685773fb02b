//! The `[metrics]` HTTP endpoint: `GET /metrics` (Prometheus text format 0.0.4) and
//! `GET /health` (200 or 503 with a one-line reason). hyper parses and writes the HTTP;
//! connections are few (a scraper, a load balancer), capped and bounded in time.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tracing::{debug, warn};

use super::Metrics;
use crate::config::UpstreamConfig;

/// Most HTTP connections at once. A new one past this evicts the oldest connection that has
/// no request in progress (a half-sent head, an idle keep-alive), taken from the peer holding
/// the most connections: a scraper or a balancer's health check is never locked out by
/// connections that only hold a slot.
const MAX_CONNECTIONS: usize = 64;
/// Most connections of one peer at once (an IPv4 address, or an IPv6 /64: one host can hold a
/// whole /64); a new one past this evicts that peer's oldest connection without a request in
/// progress (or is closed when all are busy).
const MAX_PER_PEER: usize = 8;
/// A client must send each request head within this (hyper's `header_read_timeout`, which
/// also bounds an idle keep-alive connection). Scrapers and health checks send theirs at once.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request head (start line and headers; hyper answers 431 past it): a GET needs a few
/// hundred octets.
const MAX_HEAD: usize = 8192;
/// Most header fields in one request head.
const MAX_HEADERS: usize = 32;
/// Longest life of one connection (keep-alive included).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);

/// The upstream as configured now (read at each `/health`).
pub(crate) type UpstreamOf = Arc<dyn Fn() -> UpstreamConfig + Send + Sync>;

/// The endpoint could not bind its address.
#[derive(Debug, thiserror::Error)]
#[error("metrics.bind: cannot bind {addr}: {source}")]
pub struct MetricsBindError {
    /// Address.
    pub addr: SocketAddr,
    /// Cause.
    pub source: std::io::Error,
}

/// Bind the endpoint's address.
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsBindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsBindError { addr, source })
}

/// The peer a connection counts against: its IPv4 address (also when IPv4-mapped), or the /64
/// of its IPv6 address.
fn peer_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::from(octets)
            }
        },
    }
}

/// One open connection in the [`Table`].
#[derive(Debug)]
struct Conn {
    peer: IpAddr,
    /// Accept order: the lowest is the oldest.
    seq: u64,
    /// Requests being answered now; 0 while waiting for a request head.
    busy: Arc<AtomicUsize>,
    /// Dropped to close the connection (its task ends when the receiver sees it).
    _kill: oneshot::Sender<()>,
}

/// The open connections: who holds them, which are waiting for a request.
#[derive(Debug, Default)]
struct Table {
    conns: HashMap<u64, Conn>,
    next: u64,
}

/// A connection let in: its id in the table, its busy count and its kill switch.
struct Admitted {
    id: u64,
    busy: Arc<AtomicUsize>,
    killed: oneshot::Receiver<()>,
}

impl Table {
    /// Make room for a connection from `peer` (evicting one waiting connection if a cap is
    /// reached) and enter it; `None` when every connection in the way is busy.
    fn admit(&mut self, peer: IpAddr) -> Option<Admitted> {
        let of_peer = self.conns.values().filter(|c| c.peer == peer).count();
        let victim = if of_peer >= MAX_PER_PEER {
            Some(self.oldest_waiting(|c| c.peer == peer, |_| 0)?)
        } else if self.conns.len() >= MAX_CONNECTIONS {
            let mut held: HashMap<IpAddr, usize> = HashMap::new();
            for c in self.conns.values() {
                *held.entry(c.peer).or_default() += 1;
            }
            Some(self.oldest_waiting(|_| true, |c| held.get(&c.peer).copied().unwrap_or(0))?)
        } else {
            None
        };
        if let Some(v) = victim {
            // Dropping its kill switch ends its task, which closes the socket.
            if let Some(c) = self.conns.remove(&v) {
                debug!(peer = %c.peer, "metrics: connection without a request evicted");
            }
        }
        let (kill, killed) = oneshot::channel();
        let busy = Arc::new(AtomicUsize::new(0));
        let id = self.next;
        self.next += 1;
        self.conns.insert(
            id,
            Conn {
                peer,
                seq: id,
                busy: busy.clone(),
                _kill: kill,
            },
        );
        Some(Admitted { id, busy, killed })
    }

    /// Among the connections `which` selects that wait for a request: the one whose peer
    /// `weight`s most, the oldest first.
    fn oldest_waiting(
        &self,
        which: impl Fn(&Conn) -> bool,
        weight: impl Fn(&Conn) -> usize,
    ) -> Option<u64> {
        self.conns
            .iter()
            .filter(|(_, c)| which(c) && c.busy.load(Ordering::Acquire) == 0)
            .max_by_key(|(_, c)| (weight(c), std::cmp::Reverse(c.seq)))
            .map(|(id, _)| *id)
    }
}

fn lock(t: &Mutex<Table>) -> MutexGuard<'_, Table> {
    t.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Takes a connection out of the table when its task ends (however it ends).
struct Leave(Arc<Mutex<Table>>, u64);

impl Drop for Leave {
    fn drop(&mut self) {
        lock(&self.0).conns.remove(&self.1);
    }
}

/// Counts a request in progress on its connection while alive.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn enter(count: &Arc<AtomicUsize>) -> Busy {
        count.fetch_add(1, Ordering::AcqRel);
        Busy(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serve `/metrics` and `/health` on `listener` until `shutdown` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    upstream: UpstreamOf,
    mut shutdown: watch::Receiver<bool>,
) {
    let table = Arc::new(Mutex::new(Table::default()));
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Some(Admitted { id, busy, killed }) = lock(&table).admit(peer_of(peer.ip())) else {
            debug!(%peer, "metrics: every connection in the way is answering; this one closed");
            continue;
        };
        let leave = Leave(table.clone(), id);
        let (metrics, upstream, mut stop) = (metrics.clone(), upstream.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _leave = leave;
            let svc = service_fn(move |req| {
                let (metrics, upstream) = (metrics.clone(), upstream.clone());
                let busy = Busy::enter(&busy);
                async move {
                    let r = respond(&metrics, &upstream, &req).await;
                    drop(busy);
                    Ok::<_, Infallible>(r)
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_header_size(MAX_HEAD)
                .max_headers(MAX_HEADERS)
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                r = tokio::time::timeout(CONNECTION_LIFETIME, conn) => {
                    if let Ok(Err(e)) = r {
                        debug!(error = %e, "metrics: connection failed");
                    }
                }
                _ = stop.changed() => {}
                _ = killed => {}
            }
        });
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn respond(
    metrics: &Metrics,
    upstream: &UpstreamOf,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = text(StatusCode::OK, metrics.encode());
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                ),
            );
            r
        }
        "/health" => {
            let h = metrics.health(&upstream()).await;
            let status = if h.ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, format!("{}\n", h.reason))
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: popgate serves /metrics and /health\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn ipv6_peers_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(peer_of(a), peer_of(b));
        assert_ne!(peer_of(a), peer_of(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(peer_of(mapped), ip_from("192.0.2.7"));
        assert_eq!(peer_of(ip_from("192.0.2.7")), ip_from("192.0.2.7"));
    }

    fn ip_from(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_peer_at_its_cap_evicts_its_own_oldest_waiting_connection() {
        let mut t = Table::default();
        let first: Vec<Admitted> = (0..MAX_PER_PEER).map(|_| t.admit(ip(2)).unwrap()).collect();
        let other = t.admit(ip(3)).unwrap();
        // The oldest one is answering a request: the second oldest goes.
        first[0].busy.fetch_add(1, Ordering::AcqRel);
        let mut new = t.admit(ip(2)).unwrap();
        assert!(!t.conns.contains_key(&first[1].id));
        assert!(t.conns.contains_key(&first[0].id) && t.conns.contains_key(&other.id));
        assert_eq!(t.conns.len(), MAX_PER_PEER + 1);
        // The evicted connection's task hears it.
        let mut killed = first.into_iter().nth(1).unwrap().killed;
        assert!(
            killed
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Closed)
        );
        assert_eq!(
            new.killed.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        );
    }

    #[test]
    fn a_full_table_evicts_from_the_peer_holding_most_and_never_a_busy_one() {
        let mut t = Table::default();
        let probe = t.admit(ip(1)).unwrap();
        let mut held = Vec::new();
        let mut n = 2;
        while t.conns.len() < MAX_CONNECTIONS {
            held.push(t.admit(ip(n)).unwrap());
            if held.len() % MAX_PER_PEER == 0 {
                n += 1;
            }
        }
        // The probe is the oldest connection of all, yet a heavier peer's oldest goes.
        let _newcomer = t.admit(ip(200)).unwrap();
        assert!(t.conns.contains_key(&probe.id));
        assert!(!t.conns.contains_key(&held[0].id));
        assert_eq!(t.conns.len(), MAX_CONNECTIONS);
        // When every connection is answering a request, a new one is refused.
        for c in t.conns.values() {
            c.busy.fetch_add(1, Ordering::AcqRel);
        }
        assert!(t.admit(ip(201)).is_none());
        assert!(t.admit(ip(1)).is_none());
    }
}
