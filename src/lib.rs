//! popgate: a transparent, logging and filtering POP3 proxy.
//!
//! [`Proxy::bind`] opens the listeners of a [`config::Config`]; [`Proxy::run`] serves until a
//! shutdown future completes, then drains. [`Reloader`] applies a changed config file to the
//! running proxy whole or not at all. Tests and the demo start the proxy in-process this way.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod audit;
mod check;
pub(crate) mod cidr;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
mod limits;
mod metrics;
mod net;
pub mod oauth2;
pub mod pidfile;
pub mod pop3;
mod proxy;
pub mod reference;
pub mod routing;
pub mod rules;
mod runtime;
pub mod scan;
mod session;
pub mod state;
pub mod types;

/// The whole-session simulator for the fuzz target `session` (feature `fuzzing`): not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::proxy::sim::{Summary, run};
}

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use check::{EXPIRY_WARNING, StartError, effective_toml};
pub use config::Config;
use net::listener;
pub use net::listener::Inherited;
pub use net::tls;
pub use runtime::LogHook;
pub use session::Shared;

/// What `popgate check` found: the config as `run` would use it, and warnings.
#[derive(Debug)]
pub struct Checked {
    /// The config, validated, with everything it names loaded once.
    pub config: Config,
    /// Problems that do not stop popgate (expiring certificates, empty rule globs).
    pub warnings: Vec<String>,
}

/// Check a loaded config as `popgate run` (and every reload) would: directories, certificates
/// and keys (expiry, pairs), rule files. `path` is the config file, named in messages.
pub fn check(config: Config, path: &Path) -> Result<Checked, StartError> {
    check::check_pid_dir(&config, path)?;
    let mut p = check::prepare(config, path)?;
    // Run as root with `[process] user`: files the user could not read at a reload.
    let files = check::reread_files(&p.config, path, p.rules.files());
    p.warnings
        .extend(daemon::unreadable_for_user(&p.config.process, &files));
    Ok(Checked {
        config: p.config,
        warnings: p.warnings,
    })
}

/// A proxy with its listeners bound.
#[derive(Debug)]
pub struct Proxy {
    runtime: Arc<runtime::Runtime>,
    listeners: Vec<listener::Listener>,
    /// The `[metrics]` endpoint's socket, when configured.
    metrics: Option<tokio::net::TcpListener>,
    /// The control socket's server (`[control]`), once started.
    control: Option<tokio::task::JoinHandle<()>>,
    /// Stops the control socket's server when the proxy has drained.
    control_stop: tokio::sync::watch::Sender<bool>,
}

/// Applies a changed config file to a running proxy, e.g. on SIGHUP: whole or not at all.
#[derive(Debug, Clone)]
pub struct Reloader {
    runtime: Arc<runtime::Runtime>,
    path: Option<PathBuf>,
}

impl Reloader {
    /// Re-read the config file and everything it names, check it as `popgate check` does,
    /// and apply all of it: rules, certificates, limits, log and audit settings, upstream,
    /// listeners added, removed or rebound. On any error nothing changes and the error is
    /// returned. Open sessions keep the config they started with. Returns the line to log,
    /// naming what changed (`reloaded: upstream.address, listener +imaps`).
    pub async fn reload(&self) -> Result<String, StartError> {
        let outcome = self.load_and_apply().await;
        self.runtime.metrics().config_reloaded(outcome.is_ok());
        match &outcome {
            Ok(line) => self.runtime.record_reload(true, line),
            Err(e) => self
                .runtime
                .record_reload(false, &format!("reload failed, nothing changed: {e}")),
        }
        outcome
    }

    async fn load_and_apply(&self) -> Result<String, StartError> {
        let (fresh, path) = match &self.path {
            Some(p) => (Config::load(p)?, p.as_path()),
            None => (
                (*self.runtime.current().config).clone(),
                Path::new("<config>"),
            ),
        };
        self.runtime.reload(fresh, path).await
    }

    /// Have `hook` apply changed `[log]` settings (the binary owns the log subscriber); an
    /// error from it refuses the reload.
    pub fn set_log_hook(&self, hook: LogHook) {
        self.runtime.set_log_hook(hook);
    }
}

/// Reopens the audit file and the transcript files of a running proxy (SIGUSR1), so that
/// files logrotate moved away are let go and fresh ones start at the configured paths.
#[derive(Debug, Clone)]
pub struct Reopener {
    runtime: Arc<runtime::Runtime>,
}

impl Reopener {
    /// Reopen the audit file now (after writing what is queued) and make every open
    /// transcript reopen its file before its next line. On an error the old audit file stays
    /// in use.
    pub async fn reopen(&self) -> Result<(), audit::SinkError> {
        audit::writer::transcript::reopen_all();
        self.runtime.current().audit.reopen().await
    }
}

impl Proxy {
    /// A handle that reopens the audit and transcript files (SIGUSR1).
    pub fn reopener(&self) -> Reopener {
        Reopener {
            runtime: self.runtime.clone(),
        }
    }

    /// Check and load everything the config names, start the audit writer, bind every
    /// listener. Messages name the config as `<config>`; see [`Proxy::bind_file`].
    pub async fn bind(config: Config) -> Result<Proxy, StartError> {
        Proxy::bind_file(config, Path::new("<config>")).await
    }

    /// [`Proxy::bind`] for a config loaded from `path` (named in messages).
    pub async fn bind_file(config: Config, path: &Path) -> Result<Proxy, StartError> {
        Proxy::bind_inherited(config, path, Inherited::default()).await
    }

    /// [`Proxy::bind_file`], the listeners taking the sockets in `inherited` that match them
    /// (systemd socket activation) and binding the others.
    pub async fn bind_inherited(
        config: Config,
        path: &Path,
        mut inherited: Inherited,
    ) -> Result<Proxy, StartError> {
        check::check_pid_dir(&config, path)?;
        let prepared = check::prepare(config, path)?;
        let mut listeners = Vec::with_capacity(prepared.config.listeners.len());
        for l in &prepared.config.listeners {
            listeners.push(listener::Listener::bind_or_inherit(l.clone(), &mut inherited).await?);
        }
        inherited.report_leftovers();
        let metrics = match &prepared.config.metrics {
            Some(m) => Some(metrics::http::bind(m.bind).await?),
            None => None,
        };
        let runtime = runtime::Runtime::new(prepared)?;
        Ok(Proxy {
            runtime,
            listeners,
            metrics,
            control: None,
            control_stop: tokio::sync::watch::channel(false).0,
        })
    }

    /// Bind the `[control]` socket, if the config has one, and serve it until the proxy has
    /// drained (its file is removed then). Call it as the user popgate runs as (after the
    /// privilege drop): the socket is that user's, mode 0660. `reloader` serves the `reload`
    /// command (logged and told to systemd as a SIGHUP reload is). Returns the socket's path.
    pub fn start_control(
        &mut self,
        reloader: Option<Reloader>,
    ) -> Result<Option<PathBuf>, control::ControlError> {
        let config = self.runtime.current().config.clone();
        let Some(c) = &config.control else {
            return Ok(None);
        };
        let path = control::socket_path(c)?;
        let socket = control::server::bind(&path, c.group.as_deref())?;
        let (rt, rt2) = (self.runtime.clone(), self.runtime.clone());
        let reload: Option<control::ReloadFn> = reloader.map(|r| {
            Box::new(move || {
                let r = r.clone();
                Box::pin(async move {
                    // As a SIGHUP reload: systemd hears RELOADING=1, then the outcome.
                    daemon::notify::reloading();
                    let outcome = match r.reload().await {
                        Ok(line) => {
                            tracing::info!("control: {line}");
                            Ok(line)
                        }
                        Err(e) => {
                            let line = format!("reload failed, nothing changed: {e}");
                            tracing::error!("control: {line}");
                            Err(line)
                        }
                    };
                    daemon::notify::reloaded(match &outcome {
                        Ok(l) | Err(l) => l,
                    });
                    outcome
                })
                    as std::pin::Pin<Box<dyn Future<Output = Result<String, String>> + Send>>
            }) as control::ReloadFn
        });
        let host = Arc::new(control::Host {
            registry: self.runtime.registry(),
            digest: Box::new(move || rt.config_digest()),
            last_reload: Box::new(move || rt2.last_reload()),
            reload,
        });
        self.control = Some(tokio::spawn(control::server::serve(
            socket,
            host,
            self.control_stop.subscribe(),
        )));
        Ok(Some(path))
    }

    /// The bound address of the `[metrics]` endpoint (`/metrics`, `/health`), if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// A handle that reloads from the config file `path` (or re-applies the in-memory config
    /// when `None`).
    pub fn reloader(&self, path: Option<PathBuf>) -> Reloader {
        Reloader {
            runtime: self.runtime.clone(),
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

    /// Serve until `shutdown` completes; then stop accepting at once, let open sessions finish
    /// for up to `shutdown_grace`, close the rest (without QUIT upstream) and flush the audit
    /// trail.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        runtime::raise_fd_limit(self.runtime.current().config.limits.max_sessions);
        // The endpoint outlives the accept loops: while sessions drain it still answers
        // (`/health` then says 503). It is bound once: a reload does not move it.
        let (metrics_tx, metrics_rx) = tokio::sync::watch::channel(false);
        let metrics_server = self.metrics.map(|socket| {
            if let Ok(addr) = socket.local_addr() {
                tracing::info!(%addr, "metrics listening");
            }
            let rt = self.runtime.clone();
            // Every upstream address is probed once now, before a balancer asks.
            rt.metrics().watch_upstreams(&rt.current().config.upstreams);
            tokio::spawn(metrics::http::serve(
                socket,
                self.runtime.metrics(),
                Arc::new(move || rt.current().config.default_upstream().clone()),
                metrics_rx,
            ))
        });
        self.runtime.run(self.listeners, shutdown).await;
        let _ = self.control_stop.send(true);
        if let Some(c) = self.control {
            let _ = c.await;
        }
        let _ = metrics_tx.send(true);
        if let Some(m) = metrics_server {
            let _ = m.await;
        }
    }
}
