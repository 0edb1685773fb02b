//! popgate: a transparent, logging and filtering POP3 proxy.
//!
//! [`Proxy::bind`] opens the listeners of a [`config::Config`]; [`Proxy::run`] serves until a
//! shutdown future completes. Tests and the demo start the proxy in-process this way.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod audit;
pub(crate) mod cidr;
pub mod cli;
pub mod config;
pub mod daemon;
mod limits;
mod metrics;
mod net;
pub mod pop3;
mod proxy;
pub mod rules;
mod session;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;

pub use config::Config;
use net::listener;
pub use net::tls;
pub use session::Shared;
use tracing::Instrument as _;

/// Starting the proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind.
    #[error(transparent)]
    Bind(#[from] listener::BindError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Certificates or keys could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::net::tls::TlsError),
    /// The audit trail could not be opened.
    #[error("audit: {0}")]
    Audit(#[from] crate::audit::SinkError),
    /// Rule files could not be loaded.
    #[error(transparent)]
    Rules(#[from] crate::rules::RuleError),
    /// The `[metrics]` endpoint could not bind.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::http::BindError),
}

/// How long sessions get to close after shutdown before popgate exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Load everything a config refers to (certificates, keys), as `popgate check` and start-up
/// do; the config itself must already be validated.
pub fn prepare(config: Config) -> Result<Arc<Shared>, StartError> {
    build_shared(config, audit::AuditSink::disabled())
}

fn build_shared(config: Config, audit: audit::AuditSink) -> Result<Arc<Shared>, StartError> {
    let tls = tls::TlsSetup::new(&config)?;
    let rules = rules::RuleSet::load(&config.rules, &config.base_dir)?;
    check_trace_rules(&config, &rules)?;
    let limiter = Arc::new(limits::Limiter::new(&config.limits));
    let metrics = metrics::Metrics::new(
        &config,
        rules.rules().map(|r| r.name.to_owned()),
        audit.clone(),
        limiter.clone(),
    );
    Ok(Arc::new(Shared {
        headers: config.audit.header_set(),
        limiter,
        metrics: Arc::new(metrics),
        config: Arc::new(config),
        tls,
        rules: std::sync::RwLock::new(Arc::new(rules)),
        audit,
    }))
}

/// A `trace` rule needs somewhere to write transcripts.
fn check_trace_rules(config: &Config, rules: &rules::RuleSet) -> Result<(), StartError> {
    if config.audit.transcript.dir.is_none()
        && let Some(r) = rules.rules().find(|r| r.action == rules::Action::Trace)
    {
        return Err(config::ConfigError::Invalid {
            path: r.file.to_owned(),
            key: "audit.transcript.dir".into(),
            reason: format!(
                "rule `{}` starts transcripts, but no transcript dir is set",
                r.name
            ),
        }
        .into());
    }
    Ok(())
}

/// Raise the soft limit on open files to the hard limit, log it, and warn when
/// `max_sessions` sessions (two sockets each, plus headroom) would not fit.
fn raise_fd_limit(max_sessions: usize) {
    let needed = limits::fds_needed(max_sessions);
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(nofile) if nofile < needed => tracing::warn!(
            nofile,
            needed,
            max_sessions,
            "open file limit too low for limits.max_sessions (2 per session): raise the hard \
             limit (ulimit -Hn, LimitNOFILE=) or lower limits.max_sessions"
        ),
        Ok(nofile) => tracing::info!(nofile, needed, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
}

/// A proxy with its listeners bound.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    listeners: Vec<listener::Listener>,
    audit: audit::AuditGuard,
    /// The `[metrics]` endpoint's socket, when configured.
    metrics: Option<tokio::net::TcpListener>,
}

/// Reloads certificates and rules of a running proxy, e.g. on SIGHUP.
#[derive(Debug, Clone)]
pub struct Reloader {
    shared: Arc<Shared>,
    path: Option<std::path::PathBuf>,
}

impl Reloader {
    /// The config file reloads read, if any.
    pub fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }

    /// Re-read the config file and reload what can change without a restart: certificates
    /// and rules. Each is replaced whole or not at all: on an error the running one stays and
    /// the error is returned. Open sessions keep the rule set they started with.
    pub fn reload(&self) -> Result<(), StartError> {
        let fresh = match &self.path {
            Some(p) => Config::load(p)?,
            None => (*self.shared.config).clone(),
        };
        let rules = rules::RuleSet::load(&fresh.rules, &fresh.base_dir);
        let certs = match (&self.shared.tls.server, &fresh.tls) {
            (Some(server), Some(t)) => server.reload(t),
            _ => Ok(()),
        };
        let rules = rules?;
        let count = rules.len();
        match self.shared.rules.write() {
            Ok(mut g) => *g = Arc::new(rules),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(rules),
        }
        tracing::info!(rules = count, "reloaded rules");
        certs?;
        tracing::info!("reloaded certificates");
        Ok(())
    }
}

/// Reopens the audit file and the transcript files of a running proxy (SIGUSR1), so that
/// files logrotate moved away are let go and fresh ones start at the configured paths.
#[derive(Debug, Clone)]
pub struct Reopener {
    shared: Arc<Shared>,
}

impl Reopener {
    /// Reopen the audit file now (after writing what is queued) and make every open
    /// transcript reopen its file before its next line. On an error the old audit file stays
    /// in use.
    pub async fn reopen(&self) -> Result<(), audit::SinkError> {
        audit::transcript::reopen_all();
        self.shared.audit.reopen().await
    }
}

impl Proxy {
    /// A handle that reopens the audit and transcript files (SIGUSR1).
    pub fn reopener(&self) -> Reopener {
        Reopener {
            shared: self.shared.clone(),
        }
    }

    /// Load certificates and rules, start the audit writer, bind every listener.
    pub async fn bind(config: Config) -> Result<Proxy, StartError> {
        let (sink, guard) = audit::AuditSink::start(&config.audit)?;
        let shared = build_shared(config, sink)?;
        let mut listeners = Vec::with_capacity(shared.config.listeners.len());
        for l in &shared.config.listeners {
            listeners.push(listener::Listener::bind(l.clone()).await?);
        }
        let metrics = match &shared.config.metrics {
            Some(m) => Some(metrics::http::bind(m.bind).await?),
            None => None,
        };
        Ok(Proxy {
            shared,
            listeners,
            audit: guard,
            metrics,
        })
    }

    /// The bound address of the `[metrics]` endpoint (`/metrics`, `/health`), if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// A handle that reloads certificates from `path` (or the in-memory config when `None`).
    pub fn reloader(&self, path: Option<std::path::PathBuf>) -> Reloader {
        Reloader {
            shared: self.shared.clone(),
            path,
        }
    }

    /// Bound addresses by listener name, in config order.
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|l| Some((l.config.name.clone(), l.local_addr().ok()?)))
            .collect()
    }

    /// Serve until `shutdown` completes; then stop accepting, tell sessions to close (without
    /// QUIT upstream) and wait for them up to a grace period.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        raise_fd_limit(self.shared.config.limits.max_sessions);
        let (tx, rx) = watch::channel(false);
        let tasks = TaskTracker::new();
        let sessions = Arc::new(Semaphore::new(self.shared.config.limits.max_sessions));
        let ids = Arc::new(AtomicU64::new(1));
        // The endpoint outlives the accept loops: while sessions drain it still answers
        // (`/health` then says 503).
        let (metrics_tx, metrics_rx) = watch::channel(false);
        let metrics_server = self.metrics.map(|socket| {
            if let Ok(addr) = socket.local_addr() {
                tracing::info!(%addr, "metrics listening");
            }
            let shared = self.shared.clone();
            tokio::spawn(metrics::http::serve(
                socket,
                self.shared.metrics.clone(),
                Arc::new(move || shared.config.upstream.clone()),
                metrics_rx,
            ))
        });
        let mut accept_loops = Vec::new();
        for l in self.listeners {
            if let Ok(addr) = l.local_addr() {
                tracing::info!(listener = %l.config.name, %addr, "listening");
            }
            let (shared, tasks, ids, rx2) =
                (self.shared.clone(), tasks.clone(), ids.clone(), rx.clone());
            let on_accept = move |mut a: listener::Accepted| {
                let id = ids.fetch_add(1, Ordering::Relaxed);
                let (shared, shutdown) = (shared.clone(), rx2.clone());
                tasks.spawn(async move {
                    // Behind a balancer: the real client, from its PROXY header, or nothing;
                    // at shutdown a header still awaited is not waited for.
                    let mut stop = shutdown.clone();
                    let proxied = tokio::select! {
                        biased;
                        ok = a.proxied(&shared.limiter) => ok,
                        _ = stop.changed() => false,
                    };
                    if !proxied {
                        return;
                    }
                    let info = session::SessionInfo {
                        id,
                        listener: a.listener.clone(),
                        client: a.client,
                        local: a.local,
                        tls_mode: a.tls,
                        proxy: a.proxy,
                    };
                    let span = tracing::info_span!("session", id, client = %a.client, listener = %info.listener);
                    async move {
                        match a.proxy {
                            Some(proxy) => tracing::info!(%proxy, "session open"),
                            None => tracing::info!("session open"),
                        }
                        session::run(tls::Stream::Plain(a.tcp), info, shared, shutdown).await;
                        drop(a.slots);
                    }
                    .instrument(span)
                    .await
                });
            };
            let name = l.config.name.clone();
            let serve = l.serve(
                self.shared.limiter.clone(),
                sessions.clone(),
                rx.clone(),
                on_accept,
            );
            let metrics = self.shared.metrics.clone();
            // Up from here: the socket is bound and accepted connections wait in its backlog.
            metrics.listener_up(&name, true);
            accept_loops.push(tokio::spawn(async move {
                serve.await;
                metrics.listener_up(&name, false);
            }));
        }
        shutdown.await;
        tracing::info!("shutting down");
        let _ = tx.send(true);
        for a in accept_loops {
            let _ = a.await;
        }
        tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("sessions still open after the grace period");
        }
        let _ = metrics_tx.send(true);
        if let Some(m) = metrics_server {
            let _ = m.await;
        }
        // Everything the sessions queued is written before popgate exits.
        self.audit.close().await;
    }
}
