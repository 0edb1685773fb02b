//! The running proxy: the snapshot new sessions start with, the accept loops of the listeners,
//! reload and drain.
//!
//! A snapshot ([`Shared`]) holds the whole config and everything loaded from it. A session takes
//! the `Arc` in force at its accept and keeps it to its end. A reload builds a complete new
//! snapshot first (the same checks as `popgate check`, new listeners bound, a new audit writer
//! started if `[audit]` changed, new log settings applied) and only when all of that succeeded
//! swaps it in and starts, stops or restarts accept loops; on any error nothing changes.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::audit::{AuditGuard, AuditSink};
use crate::check::{FileHashes, Prepared, StartError};
use crate::config::{Config, ListenerConfig, LogConfig};
use crate::control::registry::Registry;
use crate::limits::{Counters, Limiter};
use crate::metrics::Metrics;
use crate::net::intercept;
use crate::net::listener::{self, Listener};
use crate::net::pool::DeadAddresses;
use crate::net::tls;
use crate::session::{self, Shared};

/// Applies new `[log]` settings in the binary (which owns the subscriber); an `Err` refuses the
/// reload.
pub type LogHook = Box<dyn Fn(&LogConfig) -> Result<(), String> + Send + Sync>;

/// How long sessions still open after `shutdown_grace` get to close once told to.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// A listener's accept loop.
struct Running {
    config: ListenerConfig,
    addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Listener>,
}

/// The proxy's state while it runs; shared by the run loop and the reloaders.
pub(crate) struct Runtime {
    current: RwLock<Arc<Shared>>,
    files: Mutex<FileHashes>,
    tasks: TaskTracker,
    /// Every live session (`[control]`); its `close_all` closes the open sessions after the
    /// grace period.
    registry: Arc<Registry>,
    /// The last reload's outcome (`popgate status`).
    last_reload: Mutex<Option<crate::control::protocol::ReloadInfo>>,
    /// Turns true when the drain starts: connections still waiting for their PROXY header are
    /// not sessions yet and are not waited for.
    draining: watch::Sender<bool>,
    /// Counters for the process's life (a reload keeps them).
    metrics: Arc<Metrics>,
    ids: AtomicU64,
    /// The accept loops; the lock also serializes reloads.
    listeners: tokio::sync::Mutex<Vec<Running>>,
    /// The audit writer in force, and those replaced by reloads (closed at exit, after the
    /// sessions that still write to them).
    audit: Mutex<(AuditGuard, Vec<AuditGuard>)>,
    log_hook: Mutex<Option<Arc<LogHook>>>,
    /// The addresses the listeners are bound to (`original-destination` never dials them).
    bound: Mutex<Arc<[SocketAddr]>>,
    /// The config at start: what the keys a reload cannot apply ([`needs_restart`]) are in
    /// force with until the next start.
    started: Arc<Config>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("current", &self.current())
            .finish_non_exhaustive()
    }
}

/// Raise the soft limit on open files to the hard limit, log it, and warn when
/// `max_sessions` sessions (two sockets each, plus headroom) would not fit.
pub(crate) fn raise_fd_limit(max_sessions: usize) {
    let needed = crate::limits::fds_needed(max_sessions);
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn snapshot(
    p: Prepared,
    audit: AuditSink,
    limiter: Arc<Limiter>,
    metrics: Arc<Metrics>,
    dead: Arc<DeadAddresses>,
    state: Arc<crate::state::Store>,
) -> Shared {
    // Built with every snapshot: a reload's `[[scanner]]`/`[scan]` take effect for later
    // sessions; open ones keep theirs.
    let scan_policy = p
        .scanners
        .as_ref()
        .map(|_| crate::session::scan_policy(&p.config));
    let scanners = p
        .scanners
        .map(|s| Arc::new(s.with_metrics(metrics.clone())));
    Shared {
        state,
        scanners,
        scan_policy,
        headers: p.config.audit.header_set(),
        oauth2: Arc::new(p.oauth2),
        routes: p.routes.map(Arc::new),
        dead,
        config: Arc::new(p.config),
        tls: p.tls,
        rules: Arc::new(p.rules),
        audit,
        limiter,
        metrics,
    }
}

impl Runtime {
    /// Start the audit writer and build the first snapshot of `p`.
    pub(crate) fn new(p: Prepared) -> Result<Arc<Runtime>, StartError> {
        for w in &p.warnings {
            tracing::warn!("{w}");
        }
        let (sink, guard) = AuditSink::start(&p.config.audit)?;
        let limiter = Arc::new(Limiter::new(&p.config.limits));
        let metrics = Arc::new(Metrics::new(
            &p.config,
            p.rules.rules().map(|r| r.name.to_owned()),
            sink.clone(),
            limiter.clone(),
        ));
        // `[state]` is read at start only: one store for the process's life, like the limiter.
        let state = crate::state::Store::new(&p.config.state, limiter.clone(), metrics.clone())?;
        state.share_tokens();
        let files = p.files;
        let started = Arc::new(p.config.clone());
        Ok(Arc::new(Runtime {
            started,
            current: RwLock::new(Arc::new(snapshot(
                p,
                sink,
                limiter,
                metrics.clone(),
                Arc::new(DeadAddresses::new()),
                state,
            ))),
            files: Mutex::new(files),
            tasks: TaskTracker::new(),
            registry: Arc::new(Registry::new()),
            last_reload: Mutex::new(None),
            draining: watch::channel(false).0,
            metrics,
            // Unique across restarts: see `session::first_id`.
            ids: AtomicU64::new(session::first_id(std::time::SystemTime::now())),
            listeners: tokio::sync::Mutex::new(Vec::new()),
            audit: Mutex::new((guard, Vec::new())),
            log_hook: Mutex::new(None),
            bound: Mutex::new(Arc::from([])),
        }))
    }

    /// The snapshot in force.
    pub(crate) fn current(&self) -> Arc<Shared> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The process's metrics (served by `[metrics]`).
    pub(crate) fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The session registry (`[control]`).
    pub(crate) fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Record a reload's outcome for `popgate status`.
    pub(crate) fn record_reload(&self, ok: bool, line: &str) {
        *lock(&self.last_reload) = Some(crate::control::protocol::ReloadInfo {
            at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            ok,
            line: line.to_owned(),
        });
    }

    /// The last reload's outcome.
    pub(crate) fn last_reload(&self) -> Option<crate::control::protocol::ReloadInfo> {
        lock(&self.last_reload).clone()
    }

    /// A digest of the config in force and the files it names (certificates, rules, routing
    /// map, OAuth2 credentials): changes when any of them does.
    pub(crate) fn config_digest(&self) -> String {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        toml::to_string(&*self.current().config)
            .unwrap_or_default()
            .hash(&mut h);
        let f = *lock(&self.files);
        (f.certs, f.rules, f.map, f.credentials).hash(&mut h);
        format!("{:016x}", h.finish())
    }

    pub(crate) fn set_log_hook(&self, hook: LogHook) {
        *lock(&self.log_hook) = Some(Arc::new(hook));
    }

    /// Start accepting on `l` (its config decides name and TLS mode of its sessions).
    fn start(self: &Arc<Self>, l: Listener) -> Running {
        let addr = l.local_addr().ok();
        if let Some(addr) = addr {
            tracing::info!(listener = %l.config.name, %addr, "listening");
        }
        let config = l.config.clone();
        let (stop, stop_rx) = watch::channel(false);
        let rt = self.clone();
        let on_accept = move |a: listener::Accepted| rt.spawn_session(a);
        let limiter = self.current().limiter.clone();
        let serve = l.serve(limiter, stop_rx, on_accept);
        // Up from here: the socket is bound and accepted connections wait in its backlog.
        let (metrics, name) = (self.metrics.clone(), config.name.clone());
        metrics.listener_up(&name, true);
        let task = tokio::spawn(async move {
            let l = serve.await;
            metrics.listener_up(&name, false);
            l
        });
        Running {
            config,
            addr,
            stop,
            task,
        }
    }

    /// Record the addresses of the accept loops in `running`.
    fn set_bound(&self, running: &[Running]) {
        *lock(&self.bound) = running.iter().filter_map(|r| r.addr).collect();
    }

    fn spawn_session(&self, mut a: listener::Accepted) {
        let shared = self.current();
        let bound = lock(&self.bound).clone();
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let registry = self.registry.clone();
        let mut draining = self.draining.subscribe();
        // The steps before the session proper (PROXY header, session info, span) run in a
        // boxed future of their own, freed when they end: the spawned task keeps only the
        // session's future, its slots and its span, not the accepted connection's fields.
        let prelude = Box::pin(async move {
            // Behind a balancer: the real client, from its PROXY header, or nothing; once the
            // drain starts, a header still awaited is not waited for.
            let proxied = !a.proxy_header_due()
                || tokio::select! {
                    biased;
                    ok = a.proxied(&shared.limiter) => ok,
                    _ = draining.wait_for(|d| *d) => false,
                };
            if !proxied {
                return None;
            }
            // With `[state] backend = "redis"`: the address's slot across the fleet too.
            // Boxed: the store's future would otherwise size every session's task.
            let fleet_slot = match Box::pin(shared.state.acquire_session(a.client.ip())).await {
                Ok(slot) => slot,
                Err(why) => {
                    let total = Counters::bump(&shared.limiter.counters.per_ip_refused);
                    let (line, reply) = match why {
                        crate::state::Refused::Full => (
                            "too many sessions from this address in the fleet",
                            crate::pop3::replies::TOO_MANY_FROM_ADDRESS,
                        ),
                        crate::state::Refused::Unavailable => (
                            "state store unreachable and on_unavailable = \"closed\"",
                            crate::pop3::replies::SERVICE_UNAVAILABLE,
                        ),
                    };
                    tracing::warn!(listener = %a.listener, client = %a.client,
                        refused_total = total, "{line}: connection refused");
                    listener::refuse(a.tcp, reply);
                    return None;
                }
            };
            // Transparent interception: the server the client meant (refused when unknown or
            // popgate itself; `popgate check` refuses it on `proxy_protocol` listeners).
            let original_dst = if shared.config.default_upstream().original_destination() {
                match intercept::original_destination(&a.tcp, a.local, &bound) {
                    Ok(dst) => Some(dst),
                    Err(e) => {
                        let total = Counters::bump(&shared.limiter.counters.intercept_refused);
                        tracing::warn!(listener = %a.listener, client = %a.client,
                            local = %a.local, refused_total = total, "connection refused: {e}");
                        listener::refuse(a.tcp, crate::pop3::replies::NO_ORIGINAL_DESTINATION);
                        return None;
                    }
                }
            } else {
                None
            };
            let info = session::SessionInfo {
                id,
                listener: a.listener.clone(),
                client: a.client,
                local: a.local,
                tls_mode: a.tls,
                proxy: a.proxy,
                original_dst,
            };
            let span =
                tracing::info_span!("session", id, client = %a.client, listener = %info.listener);
            span.in_scope(|| match (a.proxy, original_dst) {
                (Some(proxy), _) => tracing::info!(%proxy, "session open"),
                (None, Some(dst)) => tracing::info!(original_dst = %dst, "session open"),
                (None, None) => tracing::info!("session open"),
            });
            // Registered (and so listed, kickable, tappable) from here to the session's end;
            // its stop signal is the kick's and the drain's.
            let handle = registry.register(id, info.listener.clone(), info.client, info.proxy);
            let session = session::run(tls::Stream::Plain(a.tcp), info, shared, handle);
            Some((session, (a.slots, fleet_slot), span))
        });
        self.tasks.spawn(async move {
            let Some((session, slots, span)) = prelude.await else {
                return;
            };
            session.instrument(span).await;
            drop(slots);
        });
    }

    /// Serve `listeners` until `shutdown` completes; then drain: stop accepting at once, give
    /// open sessions `shutdown_grace` to finish, then tell the rest to close (without QUIT
    /// upstream) and wait a little for them; last, flush the audit trail.
    pub(crate) async fn run(
        self: Arc<Self>,
        listeners: Vec<Listener>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::spawn(
            self.current()
                .state
                .clone()
                .run_heartbeat(self.draining.subscribe()),
        );
        {
            let mut running = self.listeners.lock().await;
            for l in listeners {
                running.push(self.start(l));
            }
            self.set_bound(&running);
        }
        shutdown.await;
        self.draining.send_replace(true);
        let grace = self.current().config.shutdown_grace;
        let mut running = self.listeners.lock().await;
        for r in running.drain(..) {
            let _ = r.stop.send(true);
            // Dropping the listener closes the socket: new clients are refused from now on.
            drop(r.task.await);
        }
        self.tasks.close();
        let open = self.tasks.len();
        tracing::info!(
            sessions = open,
            grace_s = grace.as_secs_f64(),
            "shutting down: no longer accepting; open sessions may finish"
        );
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                sessions = self.tasks.len(),
                "shutdown_grace over: closing the sessions still open"
            );
            self.registry.close_all();
            if tokio::time::timeout(CLOSE_WAIT, self.tasks.wait())
                .await
                .is_err()
            {
                tracing::warn!("sessions still open after closing; exiting anyway");
            }
        }
        drop(running);
        // Everything the sessions queued is written before popgate exits.
        let (current, retired) =
            std::mem::replace(&mut *lock(&self.audit), (AuditGuard::inert(), Vec::new()));
        for g in retired {
            g.close().await;
        }
        current.close().await;
    }

    /// Load `config` and apply it whole, or change nothing. Returns what changed (the log line).
    pub(crate) async fn reload(
        self: &Arc<Self>,
        config: Config,
        path: &Path,
    ) -> Result<String, StartError> {
        let mut running = self.listeners.lock().await;
        let prepared = crate::check::prepare(config, path)?;
        let old = self.current();
        let (new_cfg, old_cfg) = (&prepared.config, &*old.config);
        let mut changed = changed_keys(old_cfg, new_cfg);
        changed.retain(|k| !needs_restart(k));
        // Against the config at start: they stay unapplied over any number of reloads.
        let mut restart = changed_keys(&self.started, new_cfg);
        restart.retain(|k| needs_restart(k));
        let old_files = *lock(&self.files);
        if prepared.files.certs != old_files.certs {
            changed.insert("certificates".into());
        }
        if prepared.files.rules != old_files.rules {
            changed.insert("rules".into());
        }
        if prepared.files.map != old_files.map {
            changed.insert("routing map".into());
        }
        if prepared.files.credentials != old_files.credentials {
            changed.insert("oauth2 credentials".into());
        }

        // Listeners: keep unchanged ones, reuse a socket whose address stays, bind the rest now
        // (a bind error refuses the reload before anything changed).
        enum Plan {
            Keep(usize),
            Reuse(usize, ListenerConfig),
            Fresh(Listener),
        }
        let mut claimed = vec![false; running.len()];
        let mut plans = Vec::new();
        let mut listener_changes = Vec::new();
        for l in &new_cfg.listeners {
            let same = running
                .iter()
                .position(|r| r.config.name == l.name && same_value(&r.config, l));
            if let Some(i) = same {
                claimed[i] = true;
                plans.push(Plan::Keep(i));
                continue;
            }
            let existed = running.iter().any(|r| r.config.name == l.name);
            listener_changes.push(if existed {
                format!("~{}", l.name)
            } else {
                format!("+{}", l.name)
            });
            let reusable = (0..running.len())
                .find(|&i| !claimed[i] && l.bind.port() != 0 && running[i].config.bind == l.bind);
            match reusable {
                Some(i) => {
                    claimed[i] = true;
                    plans.push(Plan::Reuse(i, l.clone()));
                }
                None => plans.push(Plan::Fresh(Listener::bind(l.clone()).await?)),
            }
        }
        for r in running.iter() {
            if !new_cfg.listeners.iter().any(|l| l.name == r.config.name) {
                listener_changes.push(format!("-{}", r.config.name));
            }
        }

        // The audit writer: a new one when `[audit]` changed (transcripts are opened per
        // session from the snapshot's config, the writer does not need them).
        let writer_cfg = |a: &crate::audit::AuditConfig| crate::audit::AuditConfig {
            transcript: Default::default(),
            ..a.clone()
        };
        let new_audit = if writer_cfg(&new_cfg.audit) != writer_cfg(&old_cfg.audit) {
            Some(AuditSink::start(&new_cfg.audit)?)
        } else {
            None
        };
        // Log settings last: they are the one step that changes something outside.
        if !same_value(&new_cfg.log, &old_cfg.log) {
            let hook = lock(&self.log_hook).clone();
            if let Some(hook) = hook {
                hook(&new_cfg.log).map_err(StartError::Log)?;
            }
        }

        // Nothing can fail from here on: swap.
        for w in &prepared.warnings {
            tracing::warn!("{w}");
        }
        old.limiter.update(&new_cfg.limits);
        if new_cfg.limits.max_sessions > old_cfg.limits.max_sessions {
            raise_fd_limit(new_cfg.limits.max_sessions);
        }
        let sink = match new_audit {
            Some((sink, guard)) => {
                let mut audit = lock(&self.audit);
                let previous = std::mem::replace(&mut audit.0, guard);
                audit.1.push(previous);
                sink
            }
            None => old.audit.clone(),
        };
        *lock(&self.files) = prepared.files;
        self.metrics.set_audit(sink.clone());
        self.metrics
            .set_listeners(prepared.config.listeners.iter().map(|l| l.name.clone()));
        let fresh = Arc::new(snapshot(
            prepared,
            sink,
            old.limiter.clone(),
            self.metrics.clone(),
            old.dead.clone(),
            old.state.clone(),
        ));
        if fresh.config.metrics.is_some() {
            self.metrics.watch_upstreams(&fresh.config.upstreams);
        }
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = fresh;

        let mut old_running: Vec<Option<Running>> = running.drain(..).map(Some).collect();
        for plan in plans {
            match plan {
                Plan::Keep(i) => running.extend(old_running[i].take()),
                Plan::Reuse(i, config) => {
                    let Some(r) = old_running[i].take() else {
                        continue;
                    };
                    let _ = r.stop.send(true);
                    match r.task.await {
                        Ok(mut l) => {
                            l.config = config;
                            running.push(self.start(l));
                        }
                        Err(e) => tracing::error!(error = %e, "accept loop failed"),
                    }
                }
                Plan::Fresh(l) => running.push(self.start(l)),
            }
        }
        for r in old_running.into_iter().flatten() {
            let _ = r.stop.send(true);
            drop(r.task.await);
            tracing::info!(listener = %r.config.name, addr = ?r.addr, "listener closed");
        }

        self.set_bound(&running);
        if !listener_changes.is_empty() {
            changed.insert(format!("listener {}", listener_changes.join(" ")));
        }
        let mut line = if changed.is_empty() {
            "reloaded: nothing changed".to_owned()
        } else {
            format!(
                "reloaded: {}",
                changed.into_iter().collect::<Vec<_>>().join(", ")
            )
        };
        if !restart.is_empty() {
            line.push_str("; need a restart: ");
            line.push_str(&restart.into_iter().collect::<Vec<_>>().join(", "));
        }
        Ok(line)
    }
}

/// Keys a reload cannot apply: the `[metrics]` endpoint (bound once, its settings read at
/// start), `pid_file` (written once), `[process]` (the privilege drop happens once),
/// `[control]` (the socket is bound once) and `[state]` (one store for the process's life). A
/// reload reports them as `need a restart: …` while the file differs from the running
/// process.
fn needs_restart(key: &str) -> bool {
    let top = key.split(['.', '[']).next().unwrap_or(key);
    matches!(
        top,
        "metrics" | "pid_file" | "process" | "control" | "state"
    )
}

/// Whether two values serialize alike (config types have no `PartialEq`; this also covers
/// keys added later without touching this code).
fn same_value<T: serde::Serialize>(a: &T, b: &T) -> bool {
    toml::Value::try_from(a).ok() == toml::Value::try_from(b).ok()
}

/// The dotted keys whose values differ between `old` and `new`, listeners left out (they are
/// reported by name).
fn changed_keys(old: &Config, new: &Config) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let (Ok(a), Ok(b)) = (toml::Value::try_from(old), toml::Value::try_from(new)) else {
        out.insert("config".into());
        return out;
    };
    diff("", &a, &b, &mut out);
    out.retain(|k| k != "listener" && !k.starts_with("listener.") && !k.starts_with("listener["));
    out
}

fn diff(prefix: &str, a: &toml::Value, b: &toml::Value, out: &mut BTreeSet<String>) {
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_owned()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match (a, b) {
        (toml::Value::Table(x), toml::Value::Table(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => diff(&key(k), va, vb, out),
                    _ => {
                        out.insert(key(k));
                    }
                }
            }
        }
        // Named `[[upstream]]` entries, the same names in the same order: per entry and key
        // (`upstream[old].address`).
        (toml::Value::Array(x), toml::Value::Array(y)) if x.len() == y.len() => {
            let name = |v: &toml::Value| v.get("name").and_then(|n| n.as_str()).map(str::to_owned);
            if x.iter()
                .zip(y)
                .all(|(va, vb)| name(va).is_some() && name(va) == name(vb))
            {
                for (va, vb) in x.iter().zip(y) {
                    let label = name(va).unwrap_or_default();
                    diff(&format!("{prefix}[{label}]"), va, vb, out);
                }
            } else if a != b {
                out.insert(prefix.to_owned());
            }
        }
        _ if a == b => {}
        _ => {
            out.insert(prefix.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        let p = Path::new("t.toml");
        let c = Config::parse(text, p).unwrap();
        c.validate(p).unwrap();
        c
    }

    const BASE: &str = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1110\"\n\
                        [upstream]\naddress = \"127.0.0.1:110\"\n";

    #[test]
    fn changed_keys_are_dotted_leaves() {
        let a = parse(BASE);
        let b = parse(
            &(BASE.replace("127.0.0.1:110", "127.0.0.1:111")
                + "[limits]\nmax_sessions = 5\n[log]\nlevel = \"debug\"\n"),
        );
        let keys: Vec<_> = changed_keys(&a, &b).into_iter().collect();
        assert_eq!(
            keys,
            ["limits.max_sessions", "log.level", "upstream.address"]
        );
        assert!(changed_keys(&a, &a.clone()).is_empty());
        let c = parse(&BASE.replace("1110", "1111"));
        assert!(
            changed_keys(&a, &c).is_empty(),
            "listeners are reported apart"
        );
    }

    #[test]
    fn keys_a_reload_cannot_apply_need_a_restart() {
        for k in [
            "metrics",
            "metrics.bind",
            "metrics.health_window",
            "pid_file",
            "process",
            "process.user",
            "control",
            "control.socket",
            "state",
            "state.url",
        ] {
            assert!(needs_restart(k), "{k}");
        }
        for k in [
            "limits.max_sessions",
            "log.level",
            "upstream[a].address",
            "rules",
        ] {
            assert!(!needs_restart(k), "{k}");
        }
    }

    #[test]
    fn named_upstreams_are_diffed_per_entry() {
        let routed = |old: &str, new_tls: &str| {
            parse(&format!(
                "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1110\"\n\
                 [[upstream]]\nname = \"old\"\naddress = {old}\n\
                 [[upstream]]\nname = \"new\"\naddress = \"n:1\"\ntls = \"{new_tls}\"\n\
                 [routing]\ndefault = \"new\"\n"
            ))
        };
        let a = routed("\"o:1\"", "implicit");
        let b = routed("[\"o:1\", \"o:2\"]", "starttls");
        let keys: Vec<_> = changed_keys(&a, &b).into_iter().collect();
        assert_eq!(keys, ["upstream[new].tls", "upstream[old].address"]);
        // Entries renamed, added or reordered: the whole key.
        let c = parse(BASE);
        assert!(changed_keys(&a, &c).contains("upstream"));
    }
}
