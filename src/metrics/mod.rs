//! Prometheus metrics and health: the counters the session driver, the listeners and the
//! upstream dialler record into, and what `/health` decides from. The HTTP endpoint that serves
//! them is in [`http`]. The protocol core records nothing itself: the driver takes its rule
//! tally and the observer's login facts and records them here.
//!
//! Label values are bounded: listener and rule names come from the config, login methods from
//! the SASL mechanisms popgate relays, the rest are fixed words.

pub(crate) mod http;
mod process;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::audit::AuditSink;
use crate::config::{Config, UpstreamConfig};
use crate::limits::Limiter;

/// Label pairs of one series.
type Labels = Vec<(&'static str, String)>;

/// Connect latency buckets: 0.5 ms doubling up to ~8 s (loopback to a slow remote TLS server).
const CONNECT_BUCKETS: (f64, f64, u16) = (0.0005, 2.0, 15);

/// Scan duration buckets: 1 ms doubling up to ~65 s (a scanner's `timeout` is 30 s by default).
fn scan_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Longest an active `/health` probe of the upstream may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Every metric of a running proxy, and the facts `/health` needs.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    sessions_active: Family<Labels, Gauge>,
    sessions: Family<Labels, Counter>,
    logins: Family<Labels, Counter>,
    tls_handshakes: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    rule_hits: Family<Labels, Counter>,
    denials: Family<Labels, Counter>,
    upstream_errors: Family<Labels, Counter>,
    upstream_latency: Histogram,
    penalty_seconds: Counter<f64, AtomicU64>,
    listener_up: Family<Labels, Gauge>,
    reload_success: Gauge,
    reload_success_time: Gauge<f64, AtomicU64>,
    /// Content scans by scanner and verdict (`src/scan`).
    scans: Family<Labels, Counter>,
    /// How long each scanner took (queueing for a scan slot included).
    scan_duration: Family<Labels, Histogram, fn() -> Histogram>,
    /// Octets of held messages, by where they were held (`memory`, `file`).
    scan_spooled: Family<Labels, Counter>,
    /// The listeners `/health` expects up (the config's, replaced by a reload).
    listeners: Mutex<Vec<String>>,
    health_window: Duration,
    upstreams: Arc<Mutex<Seen>>,
    /// The audit sink in force (shared with the scrape-time collector).
    audit: Arc<Mutex<AuditSink>>,
    /// Fleet state store (`[state]`, `src/state/`), shared with the scrape-time collector.
    state: Arc<StateMetrics>,
}

/// The fleet state store's metrics: exported only with `[state] backend = "redis"`.
#[derive(Debug)]
struct StateMetrics {
    /// `Some(on_unavailable)` with `backend = "redis"`: the metrics are exported and `/health`
    /// follows the store.
    mode: Mutex<Option<crate::config::state::OnUnavailable>>,
    latency: Histogram,
    errors: Family<Labels, Counter>,
    up: Gauge,
}

impl StateMetrics {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if lock(&self.mode).is_none() {
            return Ok(());
        }
        self.latency.encode(encoder.encode_descriptor(
            "popgate_state_operation_duration_seconds",
            "Time fleet state store operations (Redis round trips) took",
            None,
            self.latency.metric_type(),
        )?)?;
        self.errors.encode(encoder.encode_descriptor(
            "popgate_state_errors",
            "Fleet state store operations that failed or timed out, by operation",
            None,
            self.errors.metric_type(),
        )?)?;
        self.up.encode(encoder.encode_descriptor(
            "popgate_state_up",
            "1 while the fleet state store answers",
            None,
            self.up.metric_type(),
        )?)
    }
}

/// What connects to each upstream address told, by (upstream label, address as configured):
/// sessions' and probes'. Only the addresses of the config in force are kept.
type Seen = HashMap<(String, String), AddressSeen>;

/// The last connects to one upstream address that succeeded and failed.
#[derive(Debug, Default, Clone)]
struct AddressSeen {
    ok: Option<Instant>,
    failed: Option<(Instant, String)>,
}

impl AddressSeen {
    /// Whether the last connect succeeded.
    fn up(&self) -> bool {
        match (self.ok, &self.failed) {
            (Some(ok), Some((failed, _))) => ok >= *failed,
            (ok, _) => ok.is_some(),
        }
    }
}

/// What `/health` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Health {
    /// 200 when true, 503 otherwise.
    pub(crate) ok: bool,
    /// One line saying why.
    pub(crate) reason: String,
}

/// Counts kept elsewhere, read at each scrape: the audit sink's lost events and the limits'
/// refusals and login penalties.
#[derive(Debug)]
struct Polled {
    /// The audit sink in force (a reload may start another writer).
    audit: Arc<Mutex<AuditSink>>,
    limiter: Arc<Limiter>,
    upstreams: Arc<Mutex<Seen>>,
    /// `process_start_time_seconds`, read once.
    started: Option<f64>,
    /// The fleet state store's metrics.
    state: Arc<StateMetrics>,
}

/// A gauge sample without labels.
fn const_gauge<N>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), std::fmt::Error>
where
    ConstGauge<N>: EncodeMetric,
{
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Polled {
    /// The `process_*` metrics Prometheus client libraries export, where readable.
    fn encode_process(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let p = process::Process::read();
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                p.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                p.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                p.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                p.max_fds,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value.and_then(|v| i64::try_from(v).ok()) {
                const_gauge(encoder, name, help, v)?;
            }
        }
        if let Some(cpu) = p.cpu_seconds {
            let c = ConstCounter::new(cpu);
            c.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                c.metric_type(),
            )?)?;
        }
        if let Some(started) = self.started {
            const_gauge(
                encoder,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                started,
            )?;
        }
        Ok(())
    }
}

impl Collector for Polled {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.limiter.counters;
        let audit = lock(&self.audit).clone();
        let dropped = ConstCounter::new(audit.dropped());
        dropped.encode(encoder.encode_descriptor(
            "popgate_audit_events_dropped",
            "Audit events lost: queue full (on_overflow = \"drop\") or writer closed.",
            None,
            dropped.metric_type(),
        )?)?;
        let mut refused = encoder.encode_descriptor(
            "popgate_sessions_refused",
            "Connections refused by limits.max_sessions_per_ip (per_ip), limits.max_sessions \
             (max_sessions), on a proxy_protocol listener (proxy_header: untrusted peer, \
             missing, malformed or late header), or without a usable original destination \
             (original_destination: not redirected, or redirected to popgate itself).",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (reason, n) in [
            ("per_ip", c.per_ip_refused.load(Relaxed)),
            ("max_sessions", c.full_refused.load(Relaxed)),
            ("proxy_header", c.proxy_refused.load(Relaxed)),
            ("original_destination", c.intercept_refused.load(Relaxed)),
        ] {
            ConstCounter::new(n).encode(refused.encode_family(&[("reason", reason)])?)?;
        }
        let delayed = ConstCounter::new(c.logins_delayed.load(Relaxed));
        delayed.encode(encoder.encode_descriptor(
            "popgate_login_penalty_delays",
            "Failed-login replies held back by the per-IP penalty.",
            None,
            delayed.metric_type(),
        )?)?;
        let (queued, capacity) = audit.queue();
        const_gauge(
            &mut encoder,
            "popgate_audit_queue_depth",
            "Audit events waiting for the writer now (popgate_audit_queue_capacity at most).",
            queued as i64,
        )?;
        const_gauge(
            &mut encoder,
            "popgate_audit_queue_capacity",
            "Audit events the queue holds (audit.queue; 0 when audit is off).",
            capacity as i64,
        )?;
        self.encode_process(&mut encoder)?;
        self.state.encode(&mut encoder)?;
        let mut up = encoder.encode_descriptor(
            "popgate_upstream_up",
            "1 if the last connect to this upstream address (a session's, or a probe's: at \
             start, after a reload that names it, at /health) succeeded, 0 if it failed",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        let mut seen: Vec<_> = lock(&self.upstreams)
            .iter()
            .map(|((u, a), s)| (u.clone(), a.clone(), s.up()))
            .collect();
        seen.sort();
        for (upstream, address, ok) in seen {
            let g = prometheus_client::metrics::gauge::ConstGauge::new(i64::from(ok));
            g.encode(up.encode_family(&[
                ("upstream", upstream.as_str()),
                ("address", address.as_str()),
            ])?)?;
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn label(key: &'static str, value: &str) -> Labels {
    vec![(key, value.to_owned())]
}

impl Metrics {
    /// The metrics of a proxy running `config`, with the series known up front at 0 (so that
    /// dashboards and `rate()` see them before the first event).
    pub(crate) fn new(
        config: &Config,
        rule_names: impl Iterator<Item = String>,
        audit: AuditSink,
        limiter: Arc<Limiter>,
    ) -> Metrics {
        let (start, factor, n) = CONNECT_BUCKETS;
        let m = Metrics {
            registry: Registry::default(),
            sessions_active: Family::default(),
            sessions: Family::default(),
            logins: Family::default(),
            tls_handshakes: Family::default(),
            bytes: Family::default(),
            rule_hits: Family::default(),
            denials: Family::default(),
            upstream_errors: Family::default(),
            upstream_latency: Histogram::new(exponential_buckets(start, factor, n)),
            penalty_seconds: Counter::default(),
            listener_up: Family::default(),
            reload_success: Gauge::default(),
            reload_success_time: Gauge::default(),
            scans: Family::default(),
            scan_duration: Family::new_with_constructor(scan_histogram as fn() -> Histogram),
            scan_spooled: Family::default(),
            listeners: Mutex::new(config.listeners.iter().map(|l| l.name.clone()).collect()),
            health_window: config
                .metrics
                .as_ref()
                .map_or(Duration::from_secs(30), |m| m.health_window),
            upstreams: Arc::default(),
            audit: Arc::new(Mutex::new(AuditSink::disabled())),
            state: Arc::new(StateMetrics {
                mode: Mutex::new(None),
                latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
                errors: Family::default(),
                up: Gauge::default(),
            }),
        };
        m.state.up.set(1);
        for l in lock(&m.listeners).clone().iter() {
            let _ = m.sessions_active.get_or_create(&label("listener", l));
            let _ = m.sessions.get_or_create(&label("listener", l));
            let _ = m.listener_up.get_or_create(&label("listener", l));
            for d in ["from_client", "to_client", "from_upstream", "to_upstream"] {
                let _ = m.bytes.get_or_create(&bytes_labels(l, d));
            }
        }
        for side in ["client", "upstream"] {
            for result in ["ok", "failed"] {
                let _ = m
                    .tls_handshakes
                    .get_or_create(&vec![("side", side.into()), ("result", result.into())]);
            }
        }
        for stage in ["tcp", "setup", "tls", "timeout"] {
            let _ = m.upstream_errors.get_or_create(&label("stage", stage));
        }
        for rule in rule_names {
            let _ = m.rule_hits.get_or_create(&vec![("rule", rule)]);
        }
        // The config in force was loaded (and checked) at start, as Prometheus counts it.
        m.config_reloaded(true);
        let upstreams = m.upstreams.clone();
        let state = m.state.clone();
        m.register(Polled {
            audit: Arc::new(Mutex::new(audit)),
            limiter,
            upstreams,
            started: process::start_time_seconds(),
            state,
        })
    }

    fn register(mut self, polled: Polled) -> Metrics {
        self.audit = polled.audit.clone();
        let r = &mut self.registry;
        let build: Family<Labels, Gauge> = Family::default();
        build
            .get_or_create(&vec![
                ("version", env!("CARGO_PKG_VERSION").to_owned()),
                ("revision", env!("POPGATE_GIT_COMMIT").to_owned()),
                ("target", env!("POPGATE_TARGET").to_owned()),
                ("profile", env!("POPGATE_PROFILE").to_owned()),
            ])
            .set(1);
        r.register(
            "popgate_build_info",
            "Always 1; the labels say which popgate runs (version, git revision, target, \
             build profile)",
            build,
        );
        r.register(
            "popgate_config_last_reload_success",
            "1 if the last reload (SIGHUP) applied the config file, 0 if it failed and the \
             previous config stayed; 1 at start",
            self.reload_success.clone(),
        );
        r.register(
            "popgate_config_last_reload_success_timestamp_seconds",
            "When the config in force was loaded: the last successful reload, or the start \
             (seconds since the Unix epoch)",
            self.reload_success_time.clone(),
        );
        r.register(
            "popgate_sessions_active",
            "Sessions open now, per listener",
            self.sessions_active.clone(),
        );
        r.register(
            "popgate_sessions",
            "Sessions accepted (past the limits), per listener",
            self.sessions.clone(),
        );
        r.register(
            "popgate_logins",
            "Completed login attempts by listener, method (USER, APOP, AUTH <mechanism>) and \
             outcome (success, failure)",
            self.logins.clone(),
        );
        r.register(
            "popgate_tls_handshakes",
            "TLS handshakes by side (client, upstream) and result (ok, failed)",
            self.tls_handshakes.clone(),
        );
        r.register(
            "popgate_bytes",
            "Octets relayed, per listener and direction (from_client, to_client, from_upstream, \
             to_upstream)",
            self.bytes.clone(),
        );
        r.register(
            "popgate_rule_hits",
            "Rule evaluations whose matchers held, per rule",
            self.rule_hits.clone(),
        );
        r.register(
            "popgate_denials",
            "Events a rule refused, per rule and action (deny: answered -ERR, drop: session \
             closed)",
            self.denials.clone(),
        );
        r.register(
            "popgate_upstream_connect_errors",
            "Upstream connects that failed, by stage (tcp; setup: PROXY header, greeting, STLS, XCLIENT; tls; timeout)",
            self.upstream_errors.clone(),
        );
        r.register(
            "popgate_upstream_connect_duration_seconds",
            "Time to a usable upstream connection (TCP, and STLS/TLS when configured)",
            self.upstream_latency.clone(),
        );
        r.register(
            "popgate_login_penalty_seconds",
            "Total time failed-login replies were held back by the per-IP penalty",
            self.penalty_seconds.clone(),
        );
        r.register(
            "popgate_listener_up",
            "1 while the listener accepts clients",
            self.listener_up.clone(),
        );
        r.register(
            "popgate_scans",
            "Content scans by scanner and verdict (clean, infected, spam, too_large, error)",
            self.scans.clone(),
        );
        r.register(
            "popgate_scan_duration_seconds",
            "Time one scanner took for one message, waiting for a scan slot included",
            self.scan_duration.clone(),
        );
        r.register(
            "popgate_scan_spooled_bytes",
            "Octets of messages held for scanning, by where they were held (memory, or a file \
             in scan.spool_dir: a message is counted where it ended up)",
            self.scan_spooled.clone(),
        );
        r.register_collector(Box::new(polled));
        self
    }

    /// The fleet state store in use: `Some(on_unavailable)` for Redis, `None` for local.
    pub(crate) fn state_configured(&self, mode: Option<crate::config::state::OnUnavailable>) {
        *lock(&self.state.mode) = mode;
    }

    /// A store operation `op` took `took` and succeeded (`ok`) or not.
    pub(crate) fn state_op(&self, op: &'static str, took: Duration, ok: bool) {
        self.state.latency.observe(took.as_secs_f64());
        if !ok {
            self.state_error(op);
        }
    }

    /// A store operation `op` failed without a round trip (the store was down a moment ago).
    pub(crate) fn state_error(&self, op: &'static str) {
        self.state.errors.get_or_create(&label("op", op)).inc();
    }

    /// The store answers again (`up`) or stopped answering.
    pub(crate) fn state_up(&self, up: bool) {
        self.state.up.set(i64::from(up));
    }

    /// `/health` while the store does not answer: degraded (200 with `on_unavailable =
    /// "open"`, as sessions still work; 503 with `closed`, as new ones may be refused).
    fn state_health(&self) -> Option<Health> {
        let mode = (*lock(&self.state.mode))?;
        if self.state.up.get() == 1 {
            return None;
        }
        Some(Health {
            ok: mode == crate::config::state::OnUnavailable::Open,
            reason: format!(
                "degraded: the state store does not answer (on_unavailable = {})",
                match mode {
                    crate::config::state::OnUnavailable::Open => "open: per-instance limits",
                    crate::config::state::OnUnavailable::Closed => "closed",
                }
            ),
        })
    }

    /// A reload (SIGHUP) applied the config file (`ok`) or failed and changed nothing.
    pub(crate) fn config_reloaded(&self, ok: bool) {
        self.reload_success.set(i64::from(ok));
        if ok {
            self.reload_success_time.set(process::unix_now());
        }
    }

    /// The audit sink a reload put in force (its queue and losses are reported from now on).
    pub(crate) fn set_audit(&self, sink: AuditSink) {
        *lock(&self.audit) = sink;
    }

    /// The Prometheus text of every metric.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// A session started on `listener`: counts it, and returns its live handles (the session is
    /// counted active until they are dropped).
    pub(crate) fn session(&self, listener: &str) -> SessionMetrics {
        let l = label("listener", listener);
        self.sessions.get_or_create(&l).inc();
        let active = self.sessions_active.get_or_create_owned(&l);
        active.inc();
        let bytes = |d| self.bytes.get_or_create_owned(&bytes_labels(listener, d));
        SessionMetrics {
            from_client: bytes("from_client"),
            to_client: bytes("to_client"),
            from_upstream: bytes("from_upstream"),
            to_upstream: bytes("to_upstream"),
            active,
        }
    }

    /// A login completed.
    pub(crate) fn login(&self, listener: &str, method: &str, success: bool) {
        let outcome = if success { "success" } else { "failure" };
        self.logins
            .get_or_create(&vec![
                ("listener", listener.to_owned()),
                ("method", method.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
    }

    /// A TLS handshake on `side` (`client` or `upstream`) finished or failed.
    pub(crate) fn tls_handshake(&self, side: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.tls_handshakes
            .get_or_create(&vec![("side", side.into()), ("result", result.into())])
            .inc();
    }

    /// Rule matches, denials and drops a session's rules reported (rule names).
    pub(crate) fn rules(&self, matched: &[Arc<str>], denied: &[Arc<str>], dropped: &[Arc<str>]) {
        for r in matched {
            self.rule_hits.get_or_create(&label("rule", r)).inc();
        }
        for (rules, action) in [(denied, "deny"), (dropped, "drop")] {
            for r in rules {
                self.denials
                    .get_or_create(&vec![("rule", r.to_string()), ("action", action.into())])
                    .inc();
            }
        }
    }

    /// Metrics of a minimal config, for other modules' unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Metrics {
        let text = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\n\
                    [upstream]\naddress = \"127.0.0.1:110\"\n";
        let config = Config::parse(text, std::path::Path::new("t")).expect("parses");
        let limiter = Arc::new(Limiter::new(&config.limits));
        Metrics::new(&config, std::iter::empty(), AuditSink::disabled(), limiter)
    }

    /// The scanners of the config in force (at start, after a reload): their series, and the
    /// spooled bytes', start at 0.
    pub(crate) fn scanners_configured<'a>(&self, names: impl Iterator<Item = &'a str>) {
        // Exported only once scanners are configured (as the fleet state's with Redis).
        for to in ["memory", "file"] {
            let _ = self.scan_spooled.get_or_create(&label("to", to));
        }
        for name in names {
            let _ = self.scan_duration.get_or_create(&label("scanner", name));
            for verdict in ["clean", "infected", "spam", "too_large", "error"] {
                let _ = self.scans.get_or_create(&vec![
                    ("scanner", name.to_owned()),
                    ("verdict", verdict.to_owned()),
                ]);
            }
        }
    }

    /// `scanner` (a configured name) gave `verdict` after `took`.
    pub(crate) fn scanned(&self, scanner: &str, verdict: &str, took: Duration) {
        self.scans
            .get_or_create(&vec![
                ("scanner", scanner.to_owned()),
                ("verdict", verdict.to_owned()),
            ])
            .inc();
        self.scan_duration
            .get_or_create(&label("scanner", scanner))
            .observe(took.as_secs_f64());
    }

    /// `n` octets of a held message were spooled `to` `memory` or a `file`.
    pub(crate) fn scan_spooled(&self, to: &'static str, n: u64) {
        self.scan_spooled.get_or_create(&label("to", to)).inc_by(n);
    }

    /// A failed login's reply was held back `d`.
    pub(crate) fn login_penalty(&self, d: Duration) {
        self.penalty_seconds.inc_by(d.as_secs_f64());
    }

    /// A connect to `address` of `upstream` (its label) succeeded after `took`.
    pub(crate) fn upstream_connected(&self, upstream: &str, address: &str, took: Duration) {
        self.upstream_latency.observe(took.as_secs_f64());
        seen_ok(&self.upstreams, upstream, address);
    }

    /// A connect to `address` of `upstream` failed at `stage` (`tcp`, `setup`, `tls`,
    /// `timeout`).
    pub(crate) fn upstream_failed(
        &self,
        upstream: &str,
        address: &str,
        stage: &'static str,
        why: &str,
    ) {
        self.upstream_errors
            .get_or_create(&label("stage", stage))
            .inc();
        if stage == "tls" {
            self.tls_handshake("upstream", false);
        }
        seen_failed(&self.upstreams, upstream, address, why);
    }

    /// After a connect to `upstream`: its addresses that the failover table marks dead now
    /// (`is_dead`: a session failed over them, or they failed with the rest) are recorded as
    /// failed, unless a failure after their last success already is. A session that reached
    /// the second address reports only that one itself.
    pub(crate) fn failed_over(&self, upstream: &UpstreamConfig, is_dead: impl Fn(&str) -> bool) {
        let now = Instant::now();
        let mut seen = lock(&self.upstreams);
        for address in &upstream.address {
            if !is_dead(address) {
                continue;
            }
            let s = seen
                .entry((upstream.label().to_owned(), address.clone()))
                .or_default();
            if s.up() || s.failed.is_none() {
                s.failed = Some((now, "failed over: the last connect failed".into()));
            }
        }
    }

    /// The upstreams of the config in force (at start, after each reload): what was seen of
    /// addresses no longer configured is forgotten, and each address not seen yet is probed
    /// at once in the background (so that `/health` and `popgate_upstream_up` know a dead
    /// address before any client or balancer asks). Needs a tokio runtime.
    pub(crate) fn watch_upstreams(&self, upstreams: &[UpstreamConfig]) {
        let configured: Vec<(&UpstreamConfig, (String, String))> = upstreams
            .iter()
            .filter(|u| !u.original_destination())
            .flat_map(|u| {
                u.address
                    .iter()
                    .map(move |a| (u, (u.label().to_owned(), a.clone())))
            })
            .collect();
        let mut seen = lock(&self.upstreams);
        seen.retain(|k, _| configured.iter().any(|(_, c)| c == k));
        for (u, key) in configured {
            if seen.contains_key(&key) {
                continue;
            }
            let limit = u.connect_timeout.min(PROBE_TIMEOUT);
            let table = self.upstreams.clone();
            tokio::spawn(async move {
                let (upstream, address) = (&key.0, &key.1);
                match probe(address, limit).await {
                    Ok(()) => seen_ok(&table, upstream, address),
                    Err(e) => {
                        tracing::warn!(upstream = %upstream, %address, error = %e, "upstream address does not accept connections");
                        seen_failed(&table, upstream, address, &e);
                    }
                }
            });
        }
    }

    /// The listeners of a reloaded config: `/health` expects these up from now on.
    pub(crate) fn set_listeners(&self, names: impl Iterator<Item = String>) {
        let names: Vec<String> = names.collect();
        for l in &names {
            let _ = self.sessions_active.get_or_create(&label("listener", l));
            let _ = self.sessions.get_or_create(&label("listener", l));
        }
        *lock(&self.listeners) = names;
    }

    /// Mark `listener` as accepting (or not any more).
    pub(crate) fn listener_up(&self, listener: &str, up: bool) {
        self.listener_up
            .get_or_create(&label("listener", listener))
            .set(i64::from(up));
    }

    /// `/health`: every listener accepts, and an address of the upstream accepted a
    /// connection within the health window with no failure since (a session's or a probe's);
    /// otherwise its addresses are probed now, in order, until one accepts. Only connects to
    /// the addresses configured now count: an address a reload put in place is probed, never
    /// vouched for by its predecessor's sessions.
    pub(crate) async fn health(&self, upstream: &UpstreamConfig) -> Health {
        let h = self.health_of_proxy(upstream).await;
        match self.state_health() {
            Some(degraded) if h.ok => degraded,
            _ => h,
        }
    }

    /// `/health` without the state store (see [`Metrics::health`]).
    async fn health_of_proxy(&self, upstream: &UpstreamConfig) -> Health {
        let listeners = lock(&self.listeners).clone();
        for l in &listeners {
            let up = self
                .listener_up
                .get(&label("listener", l))
                .is_some_and(|g| g.get() == 1);
            if !up {
                return Health {
                    ok: false,
                    reason: format!("listener {l} is not accepting clients"),
                };
            }
        }
        if upstream.original_destination() {
            // Each session has its own upstream: there is no one server to probe.
            return Health {
                ok: true,
                reason: format!(
                    "ok: {} listener(s) up, upstream is each connection's original destination",
                    listeners.len()
                ),
            };
        }
        let name = upstream.label();
        let recent = {
            let seen = lock(&self.upstreams);
            upstream
                .address
                .iter()
                .find(|a| {
                    seen.get(&(name.to_owned(), (*a).clone())).is_some_and(|s| {
                        s.up() && s.ok.is_some_and(|ok| ok.elapsed() <= self.health_window)
                    })
                })
                .cloned()
        };
        if let Some(address) = recent {
            return Health {
                ok: true,
                reason: format!(
                    "ok: {} listener(s) up, upstream {address} connected within {:?}",
                    listeners.len(),
                    self.health_window
                ),
            };
        }
        let limit = upstream.connect_timeout.min(PROBE_TIMEOUT);
        let mut last = String::from("no address");
        for address in &upstream.address {
            match probe(address, limit).await {
                Ok(()) => {
                    seen_ok(&self.upstreams, name, address);
                    return Health {
                        ok: true,
                        reason: format!(
                            "ok: {} listener(s) up, upstream {address} accepted a probe",
                            listeners.len(),
                        ),
                    };
                }
                Err(e) => {
                    seen_failed(&self.upstreams, name, address, &e);
                    last = format!("{address}: {e}");
                }
            }
        }
        Health {
            ok: false,
            reason: format!(
                "upstream {} unreachable: {last}",
                upstream.address.join(",")
            ),
        }
    }
}

/// Record a successful connect to `address` of `upstream`.
fn seen_ok(table: &Mutex<Seen>, upstream: &str, address: &str) {
    lock(table)
        .entry((upstream.to_owned(), address.to_owned()))
        .or_default()
        .ok = Some(Instant::now());
}

/// Record a failed connect to `address` of `upstream`.
fn seen_failed(table: &Mutex<Seen>, upstream: &str, address: &str, why: &str) {
    lock(table)
        .entry((upstream.to_owned(), address.to_owned()))
        .or_default()
        .failed = Some((Instant::now(), why.to_owned()));
}

fn bytes_labels(listener: &str, direction: &str) -> Labels {
    vec![
        ("listener", listener.to_owned()),
        ("direction", direction.to_owned()),
    ]
}

/// A TCP connect to `address` (no POP3, no TLS) within `limit`, closed at once.
async fn probe(address: &str, limit: Duration) -> Result<(), String> {
    match tokio::time::timeout(limit, tokio::net::TcpStream::connect(address)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("TCP connect timed out after {limit:?}")),
    }
}

/// One session's handles: byte counters without a label lookup per read, and its place in
/// `popgate_sessions_active` (given back on drop).
#[derive(Debug)]
pub(crate) struct SessionMetrics {
    /// Octets read from the client.
    pub(crate) from_client: Counter,
    /// Octets written to the client.
    pub(crate) to_client: Counter,
    /// Octets read from the upstream.
    pub(crate) from_upstream: Counter,
    /// Octets written to the upstream.
    pub(crate) to_upstream: Counter,
    active: Gauge,
}

impl Drop for SessionMetrics {
    fn drop(&mut self) {
        self.active.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An address nothing listens on (bound a moment ago, then freed).
    fn closed_port() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    fn metrics(upstream: &str) -> (Metrics, Config) {
        let text = format!(
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\n\
             [upstream]\naddress = \"{upstream}\"\nconnect_timeout = \"1s\"\n\
             [metrics]\nbind = \"127.0.0.1:0\"\nhealth_window = \"1h\"\n"
        );
        let config = Config::parse(&text, std::path::Path::new("t")).unwrap();
        let limiter = Arc::new(Limiter::new(&config.limits));
        let m = Metrics::new(
            &config,
            ["r1".to_owned()].into_iter(),
            AuditSink::disabled(),
            limiter,
        );
        (m, config)
    }

    fn sample(text: &str, series: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(str::to_owned)
    }

    #[test]
    fn a_session_is_active_until_its_handles_drop() {
        let (m, _) = metrics("127.0.0.1:1");
        let s = m.session("a");
        s.to_client.inc_by(10);
        let text = m.encode();
        assert_eq!(
            sample(&text, "popgate_sessions_active{listener=\"a\"}").as_deref(),
            Some("1")
        );
        assert_eq!(
            sample(
                &text,
                "popgate_bytes_total{listener=\"a\",direction=\"to_client\"}"
            )
            .as_deref(),
            Some("10")
        );
        drop(s);
        let text = m.encode();
        assert_eq!(
            sample(&text, "popgate_sessions_active{listener=\"a\"}").as_deref(),
            Some("0")
        );
        assert_eq!(
            sample(&text, "popgate_sessions_total{listener=\"a\"}").as_deref(),
            Some("1")
        );
        // Known rules are there before their first hit.
        assert_eq!(
            sample(&text, "popgate_rule_hits_total{rule=\"r1\"}").as_deref(),
            Some("0")
        );
    }

    #[tokio::test]
    async fn health_needs_listeners_and_a_recent_upstream_connect() {
        let gone = closed_port();
        let (m, config) = metrics(&gone);
        let h = m.health(config.default_upstream()).await;
        assert!(!h.ok && h.reason.contains("listener a"), "{h:?}");
        m.listener_up("a", true);
        // Nothing connected yet: the probe finds nobody.
        let h = m.health(config.default_upstream()).await;
        assert!(!h.ok && h.reason.contains("unreachable"), "{h:?}");
        // A session's connect within the window is trusted without a probe.
        m.upstream_connected("default", &gone, Duration::from_millis(1));
        let h = m.health(config.default_upstream()).await;
        assert!(h.ok && h.reason.contains("connected within"), "{h:?}");
        // A later failure makes it look again (and the probe fails).
        m.upstream_failed("default", &gone, "tcp", "refused");
        let h = m.health(config.default_upstream()).await;
        assert!(!h.ok, "{h:?}");
        // A success at another address (the one before a reload) vouches for nothing.
        m.upstream_connected("default", "127.0.0.1:1", Duration::from_millis(1));
        let h = m.health(config.default_upstream()).await;
        assert!(!h.ok && h.reason.contains("unreachable"), "{h:?}");
        assert!(m.encode().contains(&format!(
            "popgate_upstream_up{{upstream=\"default\",address=\"{gone}\"}} 0"
        )));
        m.listener_up("a", false);
        assert!(!m.health(config.default_upstream()).await.ok);
    }
}
