//! One proxied POP3 session: the task that drives the two sockets around the pure tracker.
//!
//! Bytes are forwarded as they arrived unless a decision rewrote them. Multi-line bodies stream
//! through the server read buffer, so memory does not grow with message size. The upstream never
//! receives a QUIT the client did not send: every other way out just closes the upstream socket,
//! and the server, per RFC 1939, deletes nothing.

mod error;
mod login;
pub mod observer;
mod read;
mod scan;
pub(crate) use scan::scan_policy;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::{Config, TlsMode};
use crate::control::registry::Entry;
use crate::net::tls::{Stream, TlsSetup};
use crate::net::upstream::Link;
use crate::proxy::dialogue::{Bearer, ConnectFailure, ConnectStage, Reason, Replay};
use crate::proxy::policy::Policy;
use crate::proxy::{
    Hop, HopConfig, Output, Session, SessionEvent, SessionStage, UpstreamEnd, UpstreamPurpose,
};
use crate::rules::{Event, EventKind, RuleSet};
use crate::types::{CloseReason, TlsInfo};
pub use error::{SessionError, Side};
use observer::Observer;

/// Write and flush `bytes` (under TLS a write can leave records queued in rustls).
async fn write_flush(stream: &mut Stream, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Why a session told to stop ends: a kick (and who asked) or the drain.
fn stop_reason(stop: &Entry) -> (CloseReason, Option<String>) {
    match stop.kicked_by() {
        Some(who) => (CloseReason::Kick, Some(who)),
        None => (CloseReason::Shutdown, None),
    }
}

/// Everything a session runs with: configuration, TLS material, rules, audit sink. Immutable:
/// a session takes the `Arc` in force at its accept and keeps it to its end; a reload builds a
/// new one and swaps it in whole for later sessions.
#[derive(Debug)]
pub struct Shared {
    /// The configuration in force.
    pub config: Arc<Config>,
    /// Certificates and upstream TLS client.
    pub tls: TlsSetup,
    /// The rule set.
    pub rules: Arc<RuleSet>,
    /// Where audit events go (a no-op sink when auditing is off).
    pub audit: crate::audit::AuditSink,
    /// Headers the audit trail extracts from retrieved messages.
    pub headers: Arc<crate::audit::HeaderSet>,
    /// Session caps and the failed-login penalty (`src/limits.rs`): one for the process's
    /// life, carried into each new snapshot (live counts survive a reload).
    pub limiter: Arc<crate::limits::Limiter>,
    /// The routing map (`[routing] map`), when there is one.
    pub(crate) routes: Option<Arc<crate::routing::RouteMap>>,
    /// Upstream addresses failover skips for now: one for the process's life, carried into
    /// each new snapshot like the limiter.
    pub(crate) dead: Arc<crate::net::pool::DeadAddresses>,
    /// Prometheus metrics and health facts (recorded whether or not `[metrics]` serves them).
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// OAuth2 bridges by upstream (`src/oauth2/`); their token cache outlives reloads.
    pub(crate) oauth2: Arc<crate::oauth2::Bridges>,
    /// Fleet state (`[state]`, `src/state/`): one for the process's life, carried into each
    /// new snapshot like the limiter.
    pub(crate) state: Arc<crate::state::Store>,
    /// The content scanners (`[[scanner]]`), when there are any; built with each snapshot.
    pub(crate) scanners: Option<Arc<crate::scan::Scanners>>,
    /// What the hop does with their verdicts (`[[scanner]]` sizes, `[scan]`), with them.
    pub(crate) scan_policy: Option<Arc<crate::proxy::scan::ScanPolicy>>,
}

/// Who a session is for, known at accept.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// Unique across restarts and sorted by time: see [`first_id`].
    pub id: u64,
    /// Listener name.
    pub listener: Arc<str>,
    /// Client address.
    pub client: SocketAddr,
    /// Local address the client connected to.
    pub local: SocketAddr,
    /// The listener's client-side TLS mode.
    pub tls_mode: TlsMode,
    /// The balancer that sent a PROXY header naming `client` (`proxy_protocol` listeners).
    pub proxy: Option<SocketAddr>,
    /// With `upstream.address = "original-destination"`: the address the client connected
    /// to before a `REDIRECT` sent it to popgate, and where this session connects.
    pub original_dst: Option<SocketAddr>,
}

/// The id of the first session of a popgate started at `start`: that time in microseconds
/// since the epoch; later sessions count up from it. So ids never repeat across restarts (that
/// would take more than one session per microsecond of uptime), sort by time across restarts,
/// and stay below 2^53 until the year 2255, exact in jq and JavaScript. `date -d @${id:0:10}`
/// shows when that popgate started.
pub(crate) fn first_id(start: std::time::SystemTime) -> u64 {
    start
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
        .max(1)
}

/// Byte counters of a session.
#[derive(Debug, Clone, Copy, Default)]
pub struct Traffic {
    /// Octets read from the client.
    pub from_client: u64,
    /// Octets written to the client.
    pub to_client: u64,
}

fn io_err(side: Side) -> impl FnOnce(std::io::Error) -> SessionError {
    move |source| SessionError::Io { side, source }
}

/// Run a session to its end: TLS handshake (implicit listeners), connect upstream, relay,
/// close. Never sends QUIT on its own.
///
/// The set-up (handshake, rules, connect phase) is a boxed future of its own, built here
/// and freed when it ends: the future that lives as long as the session holds only the relay's
/// state, not the set-up's locals nor the arguments moved into it.
///
/// `handle`'s entry carries the session's stop signal: set when the session is kicked (the
/// entry knows by whom) or closed by the drain. Every wait of the set-up races it (client and
/// upstream closed, no QUIT), and so does the relay.
pub(crate) fn run(
    client: Stream,
    info: SessionInfo,
    shared: Arc<Shared>,
    handle: crate::control::registry::SessionHandle,
) -> impl std::future::Future<Output = CloseReason> + Send {
    let started = Instant::now();
    let stop = handle.entry();
    // The driver comes out boxed, so that the set-up's future is freed when it ends and the
    // session's task holds only the relay's state (`size_of` measured in a release build).
    let setup = Box::pin(async move {
        open(client, info, shared, started, handle)
            .await
            .map(Box::new)
    });
    async move {
        let mut driver = match setup.await {
            Ok(d) => d,
            Err(reason) => return reason,
        };
        relay(&mut driver, &stop, started).await
    }
}

/// A session's observer: its audit trail (and `transcript`), with the tap point of its
/// registry entry (`popgate tap`, and who kicked it).
fn session_observer(
    shared: &Shared,
    info: &SessionInfo,
    handle: crate::control::registry::SessionHandle,
    transcript: crate::audit::Transcript,
) -> Observer {
    let mut observer = Observer::new(
        shared.audit.clone(),
        shared.headers.clone(),
        info.id,
        transcript,
    );
    let mut tap = crate::control::tap::TapPoint::new(handle.entry());
    tap.set_handle(handle);
    observer.set_tap(tap);
    observer
}

/// A session told to stop during the client's implicit-TLS handshake: why it ends. A kick
/// is recorded as one in the connect phase is, `session_open` (no TLS yet, no rule has run)
/// then `session_close` naming who asked; the drain only closes it (like a failed handshake,
/// it never became a session in the audit trail).
async fn stopped_in_handshake(
    shared: &Shared,
    info: &SessionInfo,
    handle: crate::control::registry::SessionHandle,
    started: Instant,
) -> CloseReason {
    let (reason, who) = stop_reason(&handle.entry());
    if let Some(who) = who {
        info!(by = %who, "session kicked before its relay began");
        let transcript = crate::audit::Transcript::disabled();
        let mut observer = session_observer(shared, info, handle, transcript);
        observer.open(info, None, &[]);
        let ms = started.elapsed().as_millis() as u64;
        observer.close(reason, None, 0, 0, ms, &crate::proxy::Marks::default());
        observer.flush().await;
    }
    reason
}

/// Everything before the session machine: client TLS handshake (implicit listeners), connect
/// rules and their delay, audit set-up; then the hop, the front (routing mode) or the
/// upstream's connector (direct mode: the session connects it, reading the client
/// meanwhile). `Err` when the session ended there.
async fn open(
    mut client: Stream,
    info: SessionInfo,
    shared: Arc<Shared>,
    started: Instant,
    handle: crate::control::registry::SessionHandle,
) -> Result<Driver, CloseReason> {
    let shared = &shared;
    let stop = handle.entry();
    let config = shared.config.clone();
    let live = shared.metrics.session(&info.listener);
    if info.tls_mode == TlsMode::Implicit {
        let shaken = tokio::select! {
            biased;
            r = client_handshake(client, shared) => Some(r),
            _ = stop.stopped() => None,
        };
        match shaken {
            Some(Ok(c)) => client = c,
            Some(Err(e)) => {
                info!(error = %e, "client TLS handshake failed");
                return Err(CloseReason::Error);
            }
            // No TLS yet, so no `-ERR` the client could read: closed.
            None => return Err(stopped_in_handshake(shared, &info, handle, started).await),
        }
    }
    let client_tls = client.tls_info();
    let mut policy = Policy::new(shared.rules.clone());
    let connect = crate::proxy::connect::admit(
        &mut policy,
        &Event {
            tls: client.is_tls(),
            destination: info.original_dst.map(|d| d.ip()),
            ..Event::new(EventKind::Connect, &info.listener, info.client.ip())
        },
    );
    let transcript_cfg = &config.audit.transcript;
    // A refused connection gets no transcript; the audit trail shows it, with the rule.
    let transcript = if connect.refusal.is_none()
        && (transcript_cfg.wants(&info.listener, info.client.ip()) || policy.trace)
    {
        crate::audit::Transcript::open(transcript_cfg, info.id, &info.listener, info.client)
    } else {
        crate::audit::Transcript::disabled()
    };
    let mut observer = session_observer(shared, &info, handle, transcript);
    observer.set_tags(&policy.tags);
    observer.open(&info, client_tls.as_ref(), &connect.tags);
    observer.flush().await;
    // The connect phase (a rule's delay, the client read meanwhile, then the rules'
    // verdict) is the session machine's first stage.
    let early = crate::proxy::connect::early_input_limit(
        config.limits.max_line,
        config.limits.max_pipeline,
    );
    let opening = crate::proxy::connect::Opening::new(connect, clock(), early);
    // How the server compares user names; in routing mode how the front does until the
    // login's upstream is known.
    let user_names = if config.routing_mode() {
        config.routing_user_names()
    } else {
        config.default_upstream().user_names
    };
    // Routing mode: no upstream until the login is known; the front greets. Direct mode:
    // the session connects the upstream itself, reading the client meanwhile.
    let (connecting, front) = if config.routing_mode() {
        let greeting = config
            .routing
            .as_ref()
            .map_or("popgate ready", |r| &r.greeting);
        let front = crate::proxy::front::Front::new(greeting);
        (None, Some(front))
    } else {
        let index = config.default_index();
        // Interception: the session's own destination (direct mode only, config checks it).
        let (upstream_cfg, upstream_tls) =
            match upstream_target(&config, shared, &info, client_tls.as_ref()) {
                Some(target) => target,
                None => (
                    config.upstreams[index].clone(),
                    shared
                        .tls
                        .upstreams
                        .get(index)
                        .and_then(Option::as_ref)
                        .cloned(),
                ),
            };
        // The connector itself is built when the connect phase lets the session in
        // (`Output::ConnectUpstream`): its addresses in the order the dead marks give then.
        let connecting = Connecting {
            cfg: upstream_cfg,
            tls: upstream_tls,
            dialled: Instant::now(),
            address: String::new(),
            login: None,
        };
        (Some(Box::new(connecting)), None)
    };
    let cfg = HopConfig {
        listener: info.listener.clone(),
        client_ip: info.client.ip(),
        destination: info.original_dst.map(|d| d.ip()),
        client_tls: client.is_tls(),
        stls_available: info.tls_mode == TlsMode::Starttls && shared.tls.server.is_some(),
        fold_user_names: user_names == crate::config::UserNames::Fold,
        max_line: config.limits.max_line,
        max_pipeline: config.limits.max_pipeline,
        unknown_commands: config.limits.unknown_commands,
        idle_timeout: config.limits.idle_timeout,
        login_timeout: config.limits.login_timeout,
        greeting_timeout: config.limits.greeting_timeout,
        lookups: config.audit.enabled.then_some(config.audit.message_ids),
        scan: shared.scan_policy.clone(),
    };
    let hop = Hop::new(cfg, policy, started.into_std(), clock());
    // Direct mode with PROXY v2: the server is told about the client's STLS by a second dial
    // (routing mode dials after the STLS already; interception and PROXY v1 cannot say it).
    let redial = info.original_dst.is_none()
        && config.upstreams[config.default_index()].forward_client
            == crate::config::ForwardClient::ProxyV2;
    let mut session = Session::new(hop, front).redialling_after_stls(redial);
    session.opening(opening);
    Ok(Driver {
        session,
        client,
        upstream: Stream::Detached,
        pending: Stream::Detached,
        shared: shared.clone(),
        info: Box::new(info),
        client_tls: client_tls.map(Box::new),
        upstream_tls: None,
        cin: BytesMut::new(),
        sin: BytesMut::new(),
        observer: SessionObserver { observer },
        traffic: Traffic::default(),
        live,
        held: None,
        connecting,
    })
}

/// Relay until the session ends, then close both sides and log the end.
async fn relay(driver: &mut Driver, stop: &Entry, started: Instant) -> CloseReason {
    let shared = driver.shared.clone();
    let reason = match driver.drive(stop).await {
        Ok(r) => r,
        Err(e) if e.is_disconnect() => {
            debug!(error = %e, "connection lost");
            if e.side() == Side::Client {
                CloseReason::ClientEof
            } else {
                CloseReason::UpstreamEof
            }
        }
        Err(e) => {
            warn!(error = %e, side = ?e.side(), "session failed");
            CloseReason::Error
        }
    };
    if driver.session.stage() != SessionStage::Relaying {
        return closed_before_relay(driver, stop, started, reason).await;
    }
    // A kick ends the session as a shutdown does; the audit trail and log name it and who
    // asked (the observer asks the registry entry).
    let reason = match stop.kicked_by() {
        Some(who) if reason == CloseReason::Shutdown => {
            info!(by = %who, "session kicked");
            CloseReason::Kick
        }
        _ => reason,
    };
    driver.session.hop_mut().finish();
    // A held body and its scan go with the session (a spool file is unlinked already).
    driver.held = None;
    record_rules(&shared, driver.session.hop_mut().take_rule_tally());
    // Upstream: a plain close, never QUIT (unless the client's own QUIT went through).
    if driver.session.hop().mid_response() {
        // A multi-line response was cut: a reset, so that no client takes what it got for a
        // complete message (the terminator was never sent, nor a prefix of it).
        warn!("multi-line response cut; client connection reset");
        std::mem::replace(&mut driver.client, Stream::Detached).abort();
    } else {
        let _ = driver.client.shutdown().await;
    }
    drop(std::mem::replace(&mut driver.upstream, Stream::Detached));
    drop(std::mem::replace(&mut driver.pending, Stream::Detached));
    let obs = &mut driver.observer.observer;
    obs.set_tags(driver.session.hop().tags());
    obs.close(
        reason,
        driver.session.hop().user(),
        driver.traffic.from_client,
        driver.traffic.to_client,
        started.elapsed().as_millis() as u64,
        driver.session.hop().close_marks(),
    );
    obs.flush().await;
    // The tags of the `session_close` record: the session's and the close's own.
    let mut tags = driver.session.hop().tags().to_vec();
    for t in &driver.session.hop().close_marks().tags {
        if !tags.contains(t) {
            tags.push(t.clone());
        }
    }
    info!(
        reason = reason.as_str(),
        user = driver.session.hop().user().unwrap_or("-"),
        // The text of a JSON array: JSON logs turn it into the array (daemon::Logging).
        tags = %tags_json(&tags),
        client_tls = driver.client_tls.as_ref().map_or("-", |t| t.version.as_str()),
        upstream_tls = driver.upstream_tls.as_ref().map_or("-", |t| t.version.as_str()),
        from_client = driver.traffic.from_client,
        to_client = driver.traffic.to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        "session closed"
    );
    reason
}

/// A session that ended before its relay began: in the connect phase (a refusing rule, the
/// client gone during a rule's delay, a kick or the drain) or in direct mode's set-up (the
/// upstream unavailable, a kick or the drain, the client gone). The client and the upstream
/// are closed and the `session_close` recorded, with the log lines of that stage (the relay's
/// "session closed" line is not written: the session never relayed).
async fn closed_before_relay(
    driver: &mut Driver,
    stop: &Entry,
    started: Instant,
    reason: CloseReason,
) -> CloseReason {
    let opening = driver.session.stage() == SessionStage::Opening;
    let reason = match reason {
        CloseReason::Shutdown if opening => {
            info!("stopped during a connect rule's delay");
            let (reason, who) = stop_reason(stop);
            if let Some(who) = who {
                info!(by = %who, "session kicked before its relay began");
            }
            reason
        }
        CloseReason::ClientEof | CloseReason::Error if opening => {
            info!(
                reason = reason.as_str(),
                "client gone during a connect rule's delay"
            );
            reason
        }
        CloseReason::Shutdown => {
            let (reason, who) = stop_reason(stop);
            match &who {
                Some(who) => info!(by = %who, "session kicked while connecting upstream"),
                None => info!("shutdown while connecting upstream"),
            }
            reason
        }
        CloseReason::ClientEof => {
            info!(
                reason = reason.as_str(),
                "client gone while connecting upstream"
            );
            reason
        }
        reason => reason,
    };
    driver.session.hop_mut().finish();
    record_rules(&driver.shared, driver.session.hop_mut().take_rule_tally());
    let _ = driver.client.shutdown().await;
    drop(std::mem::replace(&mut driver.upstream, Stream::Detached));
    let obs = &mut driver.observer.observer;
    obs.set_tags(driver.session.hop().tags());
    obs.close(
        reason,
        None,
        driver.traffic.from_client,
        driver.traffic.to_client,
        started.elapsed().as_millis() as u64,
        driver.session.hop().close_marks(),
    );
    obs.flush().await;
    reason
}

/// With `original-destination`: the upstream settings with the session's original destination
/// as address, and the TLS client verifying the name [`intercept::server_name`] picks (unless
/// `server_name` is set). `None`: the configured upstream.
///
/// [`intercept::server_name`]: crate::net::intercept::server_name
fn upstream_target(
    config: &Config,
    shared: &Shared,
    info: &SessionInfo,
    client_tls: Option<&TlsInfo>,
) -> Option<(
    crate::config::UpstreamConfig,
    Option<crate::net::tls::UpstreamTls>,
)> {
    let dst = info.original_dst?;
    let index = config.default_index();
    let cfg = crate::config::UpstreamConfig {
        address: vec![dst.to_string()],
        ..config.upstreams[index].clone()
    };
    let tls = shared
        .tls
        .upstreams
        .get(index)
        .and_then(Option::as_ref)
        .map(|t| {
            if t.needs_name() {
                let sni = client_tls.and_then(|c| c.sni.as_deref());
                let name = crate::net::intercept::server_name(sni, dst.ip());
                debug!(server_name = ?name, "verifying the original server as");
                t.named(name)
            } else {
                t.clone()
            }
        });
    Some((cfg, tls))
}

/// `["a","b"]`.
fn tags_json(tags: &[Arc<str>]) -> String {
    let tags: Vec<&str> = tags.iter().map(|t| &**t).collect();
    serde_json::to_string(&tags).unwrap_or_default()
}

/// Server side of a client TLS handshake, bounded by `tls.handshake_timeout`.
async fn client_handshake(client: Stream, shared: &Shared) -> Result<Stream, SessionError> {
    let fail = |e: std::io::Error| SessionError::Io {
        side: Side::Client,
        source: e,
    };
    let Some(tls) = shared.tls.server.as_ref() else {
        return Err(fail(std::io::Error::other("no certificate configured")));
    };
    let timeout = shared
        .config
        .tls
        .as_ref()
        .map(|t| t.handshake_timeout)
        .unwrap_or(std::time::Duration::from_secs(30));
    let stream = tokio::time::timeout(timeout, client.accept_tls(tls))
        .await
        .map_err(|_| fail(std::io::ErrorKind::TimedOut.into()))
        .and_then(|r| r.map_err(fail));
    shared.metrics.tls_handshake("client", stream.is_ok());
    let stream = stream?;
    if let Some(t) = stream.tls_info() {
        info!(version = %t.version, cipher = %t.cipher, sni = t.sni.as_deref().unwrap_or("-"), "client TLS established");
    }
    Ok(stream)
}

/// Record a session's rule activity (matches, denials, drops) in the metrics.
fn record_rules(shared: &Shared, tally: crate::proxy::policy::RuleTally) {
    if !tally.is_empty() {
        shared
            .metrics
            .rules(&tally.matched, &tally.denied, &tally.dropped);
    }
}

/// The session's clock, as the hop sees it: tokio's (paused in tests), converted here, at this
/// one boundary.
fn clock() -> std::time::Instant {
    Instant::now().into_std()
}

/// Where the hop's events go: the audit observer (audit trail, transcript, and what it feeds),
/// the metrics, and the shared login penalty the hop asks the driver for. The metrics and the
/// store are the driver's `shared` (passed in, not held twice in every session).
struct SessionObserver {
    observer: Observer,
}

impl SessionObserver {
    /// Hand one event to the observer and the metrics (`listener` is their label). A failed
    /// login is answered by the driver instead (`Driver::pump_events`, with
    /// [`SessionObserver::penalty`]).
    fn dispatch(&mut self, ev: SessionEvent, shared: &Shared, listener: &str) {
        let obs = &mut self.observer;
        match ev {
            SessionEvent::ClientCommand(line) => obs.client_command(&line.command()),
            SessionEvent::ClientSasl => obs.client_sasl(),
            SessionEvent::LocalReply(reply) => obs.local_reply(&reply),
            SessionEvent::Status {
                meta,
                line,
                user,
                state,
                marks,
            } => {
                if let Some(login) = &meta.login {
                    // A login a rule dropped is no success, whatever the server said.
                    let success = login.success && marks.dropped_by.is_none();
                    shared
                        .metrics
                        .login(listener, &login.method.label(), success);
                }
                obs.status(&meta, &line, user.as_deref(), state, &marks);
            }
            SessionEvent::Body { chunk, end, user } => obs.body(&chunk, end, user.as_deref()),
            SessionEvent::Denied {
                rule,
                verb,
                user,
                tags,
            } => obs.denied(&rule, verb, user.as_deref(), &tags),
            SessionEvent::Tags(tags) => obs.set_tags(&tags),
            SessionEvent::Injected(line) => obs.injected(&line.command()),
            SessionEvent::InjectedStatus { meta, line } => obs.injected_status(&meta, &line),
            SessionEvent::InjectedBody { chunk, end } => obs.injected_body(&chunk, end),
            SessionEvent::NoUidl => obs.no_uidl(),
            SessionEvent::Scanned {
                msg,
                verb,
                reports,
                action,
                added,
                user,
            } => {
                use crate::audit::ScanEventAction as A;
                let action = match action {
                    crate::proxy::ScanAction::Delivered => A::Delivered,
                    crate::proxy::ScanAction::Tagged => A::Tagged,
                    crate::proxy::ScanAction::Replaced => A::Replaced,
                    crate::proxy::ScanAction::Denied => A::Denied,
                    crate::proxy::ScanAction::Tempfailed => A::Tempfailed,
                    crate::proxy::ScanAction::Unscanned => A::Unscanned,
                };
                obs.scanned(msg, verb, &reports, action, &added, user.as_deref());
            }
            SessionEvent::LoginFailed(_) => {
                // Not reached: the driver answers it (`Driver::pump_events`).
            }
        }
    }

    /// A login from `ip` failed: how long to hold its `-ERR` (the per-IP penalty), if at all.
    /// Counted by the store: this instance's limiter, or with `[state] backend = "redis"` the
    /// whole fleet's count (bounded by `state.timeout`).
    async fn penalty(
        shared: &Shared,
        ip: IpAddr,
        now: std::time::Instant,
    ) -> Option<std::time::Duration> {
        // Not boxed here: its caller (`Driver::login_penalty`) is.
        let delay = shared.state.login_failed(ip, now).await;
        if let Some(d) = delay {
            shared.metrics.login_penalty(d);
        }
        delay
    }
}

/// The I/O side of one session: reads into two buffers, feeds the hop, carries out its actions.
struct Driver {
    /// The hop, and in routing mode the front until the login is routed.
    session: Session,
    client: Stream,
    /// `Stream::Detached` until a connector of the session connected it (routing mode,
    /// before login: the front stands in for it).
    upstream: Stream,
    /// The re-dial after STLS: the second connection, until it greets `+OK` (then it
    /// becomes `upstream`) or is given up.
    pending: Stream,
    shared: Arc<Shared>,
    /// Boxed: read at a routed login and an STLS re-dial only; inline it would weigh 160
    /// bytes in every session's driver.
    info: Box<SessionInfo>,
    /// Negotiated TLS on each side, for logs (audit events carry them as they happen). Boxed:
    /// a plain session carries two null pointers, not two empty `TlsInfo`s.
    client_tls: Option<Box<TlsInfo>>,
    upstream_tls: Option<Box<TlsInfo>>,
    /// Client bytes not yet handled.
    cin: BytesMut,
    /// Server bytes not yet relayed.
    sin: BytesMut,
    observer: SessionObserver,
    traffic: Traffic,
    /// The session's metrics handles (bytes each way; active until dropped).
    live: crate::metrics::SessionMetrics,
    /// The body held for a scan and the scan in flight (`None` when nothing is held).
    held: Option<Box<scan::Held>>,
    /// While a connector of the session is out: what the driver keeps for it (direct mode:
    /// from the start, the upstream to connect once the connect phase lets the session in).
    connecting: Option<Box<Connecting>>,
}

/// What the driver keeps for a connector the session carries out: the upstream (its settings
/// and TLS client, for the handshakes, the log lines and the metrics), when the connect
/// began and the address dialled last, and for a routed login what it keeps of it.
struct Connecting {
    cfg: crate::config::UpstreamConfig,
    tls: Option<crate::net::tls::UpstreamTls>,
    dialled: Instant,
    address: String,
    login: Option<Box<RoutedLogin>>,
}

/// What the driver keeps for a routed login: why it went where it went and the user as
/// logged (the log lines at its end), and with an OAuth2 bridge the token in use and why a
/// fresh one could not be had.
struct RoutedLogin {
    why: crate::routing::RouteReason,
    shown: String,
    bridged: Option<(Arc<crate::oauth2::Bridge>, crate::oauth2::Authorized)>,
    token: Option<String>,
    token_error: Option<crate::oauth2::BridgeError>,
}

/// An upstream connect ended (direct mode's set-up, a routed login's connection; the re-dial
/// after STLS counts nothing, as before it was the session's): its
/// metrics, the one place they are counted. `Ok`: the address that answered, how long the
/// connect took and whether its connection is TLS; `Err`: where and why it failed. The
/// failover gauge follows the dead marks at the end.
fn record_connect(
    shared: &Shared,
    upstream: &crate::config::UpstreamConfig,
    ended: Result<(&str, std::time::Duration, bool), &crate::net::upstream::ConnectError>,
) {
    let metrics = &shared.metrics;
    match ended {
        Ok((address, took, _)) => metrics.upstream_connected(upstream.label(), address, took),
        Err(e) => {
            metrics.upstream_failed(upstream.label(), &e.address, e.stage.as_str(), &e.reason)
        }
    }
    metrics.failed_over(upstream, |a| shared.dead.is_dead(a, clock()));
    if let Ok((_, _, true)) = ended {
        metrics.tls_handshake("upstream", true);
    }
}

impl Driver {
    /// The relay loop: dispatch the hop's events, carry out its outputs, then wait for the
    /// client, the upstream, the hop's next deadline or a shutdown, whichever comes first.
    async fn drive(&mut self, stop: &Entry) -> Result<CloseReason, SessionError> {
        // The stop is handled once (the hop closes at it).
        let mut stop_seen = false;
        // popgate's own greeting (routing mode), or the server's if it was read already
        // (upstream STLS).
        self.session.start(clock(), &mut self.sin, &mut self.cin);
        loop {
            self.pump_events().await;
            if let Some(reason) = self.execute(stop).await? {
                return Ok(reason);
            }
            self.sync_observer().await;
            let want_client = self.session.wants_client_input();
            // A waiting session holds no read buffer (see `read`); a streaming body is read
            // straight into a large one, kept until the body ends.
            read::release_if_empty(&mut self.cin);
            self.session.hop_mut().trim();
            let in_body = self.session.hop().mid_response();
            if in_body {
                self.sin.reserve(read::BODY_READ);
            } else {
                read::release_if_empty(&mut self.sin);
            }
            let wake = self.session.poll_timeout().map(Instant::from_std);
            // Routing mode reads no upstream until the login is routed; while the hop holds
            // replies (a tarpit, the login penalty) the server's bytes wait in the socket.
            let want_server = self.session.wants_server_input();
            // A connector's dialogue is counted as its reply, at its end; the re-dial's
            // reads are from the pending connection.
            let connecting = self.session.connecting();
            let upstream = match connecting {
                Some(UpstreamPurpose::Redial) => &mut self.pending,
                _ => &mut self.upstream,
            };
            tokio::select! {
                biased;
                // A hold never outlasts a shutdown: the session ends within the grace period
                // like any other.
                _ = stop.stopped(), if !stop_seen => {
                    stop_seen = true;
                    self.session.on_shutdown();
                }
                r = async {
                    if in_body {
                        upstream.read_buf(&mut self.sin).await
                    } else {
                        read::read_lean(upstream, &mut self.sin).await
                    }
                }, if want_server => match r {
                    Ok(0) => self.session.on_upstream_eof(clock()),
                    Ok(n) => {
                        if connecting.is_none() {
                            self.live.from_upstream.inc_by(n as u64);
                        }
                        self.session.on_server_input(clock(), &mut self.sin, &mut self.cin);
                    }
                    Err(e) if connecting.is_some() => {
                        self.session.on_upstream_error(clock(), false, &e);
                    }
                    Err(e) => {
                        // A reset or TLS alert (e.g. a refused client certificate): the
                        // client gets a clear answer for what it is waiting on.
                        let err = io_err(Side::Upstream)(e);
                        self.session.on_upstream_error(clock(), err.is_disconnect(), &err);
                        if !err.is_disconnect() {
                            warn!(error = %err, "upstream failed");
                        }
                    }
                },
                r = read::read_lean(&mut self.client, &mut self.cin), if want_client => {
                    let n = match r.map_err(io_err(Side::Client)) {
                        Ok(n) => n,
                        // In the connect phase the session ends itself (its close record).
                        Err(e) if self.session.on_client_error(e.is_disconnect()) => continue,
                        Err(e) => return Err(e),
                    };
                    if n == 0 {
                        self.session.on_client_eof();
                    } else {
                        self.traffic.from_client += n as u64;
                        self.live.from_client.inc_by(n as u64);
                        self.session.on_client_input(clock(), &mut self.cin);
                    }
                }
                (spool, reports) = scan::verdict(&mut self.held) => {
                    if let Some(held) = self.held.as_mut() {
                        held.scan = None;
                        held.spool = Some(spool);
                    }
                    let date = crate::proxy::scan::rfc5322_date(std::time::SystemTime::now());
                    self.session
                        .scan_done(clock(), &date, reports, &mut self.cin);
                }
                _ = async {
                    match wake {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => self.session.on_timeout(clock()),
            }
        }
    }

    /// Dispatch the hop's events in order; answer a failed login with its penalty. Whether
    /// there were any.
    async fn pump_events(&mut self) -> bool {
        let mut any = false;
        // No event is held across an await: a `SessionEvent` is hundreds of bytes, and this
        // future sits in every session's task (inside `execute`'s and `drive`'s).
        while let Some(ip) = self.dispatch_events(&mut any) {
            // Boxed: a failed login only; the store's future would otherwise be in every
            // session's task.
            Box::pin(self.login_penalty(ip)).await;
        }
        any
    }

    /// Dispatch the hop's events in order up to the first failed login, whose client address
    /// is returned (`None`: the queue is empty). `any` is set when there were events.
    fn dispatch_events(&mut self, any: &mut bool) -> Option<IpAddr> {
        while let Some(ev) = self.session.poll_event() {
            *any = true;
            match ev {
                SessionEvent::LoginFailed(ip) => return Some(ip),
                ev => self
                    .observer
                    .dispatch(ev, &self.shared, &self.info.listener),
            }
        }
        None
    }

    /// A login from `ip` failed: look its penalty up and hand it to the session.
    async fn login_penalty(&mut self, ip: IpAddr) {
        let now = clock();
        let penalty = SessionObserver::penalty(&self.shared, ip, now).await;
        self.session.penalty(now, penalty);
    }

    /// Carry out the outputs the hop lets go of, in order; `Some` when one of them ends the
    /// session.
    async fn execute(&mut self, stop: &Entry) -> Result<Option<CloseReason>, SessionError> {
        loop {
            let Some(output) = self
                .session
                .poll_output(clock(), &mut self.sin, &mut self.cin)
            else {
                // Routing mode: the front's answers may have raised events (a failed
                // login's, whose penalty lets held outputs go): both queues are drained.
                if self.pump_events().await {
                    continue;
                }
                break;
            };
            match output {
                Output::ToClient(bytes) => {
                    // The flush matters under TLS: a write that filled the socket leaves
                    // records queued in rustls, and nothing else would send them (a stall
                    // at the end of a body). A no-op on plain TCP.
                    let written = match self.client.write_all(&bytes).await {
                        Ok(()) => self.client.flush().await,
                        Err(e) => Err(e),
                    };
                    match written {
                        Ok(()) => {
                            self.traffic.to_client += bytes.len() as u64;
                            self.live.to_client.inc_by(bytes.len() as u64);
                        }
                        // Before the relay popgate's last word (a refusal, the shutdown's
                        // `-ERR`, the "unavailable" line) is best effort: the session ends
                        // with its own reason.
                        Err(_) if self.session.stage() != SessionStage::Relaying => {}
                        Err(e) => return Err(io_err(Side::Client)(e)),
                    }
                }
                Output::Login(login) => {
                    // Boxed: routing mode before login only; its future (routing, the OAuth2
                    // bridge) would otherwise sit in every session's task.
                    Box::pin(self.route_login(&login, stop)).await
                }
                Output::ToUpstream(bytes) if self.session.connecting().is_some() => {
                    Box::pin(self.connect_write(&bytes, stop)).await?;
                }
                Output::ToUpstream(bytes) => self.send_upstream(&bytes).await?,
                // Boxed: a connector's steps only (dials, handshakes, token fetches).
                Output::Dial(address) => Box::pin(self.connect_dial(address, stop)).await?,
                Output::StartUpstreamTls => Box::pin(self.connect_tls(stop)).await?,
                Output::FetchToken => Box::pin(self.login_token(stop)).await?,
                Output::MarkDead(mark) => self.shared.dead.mark_dead(&mark.address, mark.until),
                Output::MarkAlive(address) => self.shared.dead.mark_alive(&address),
                Output::UpstreamNotice(notice) => {
                    let label = self.connecting.as_ref().map_or("", |c| c.cfg.label());
                    crate::net::upstream::log_notice(label, &notice);
                }
                Output::UpstreamEnded(purpose, end) => {
                    Box::pin(self.upstream_ended(purpose, *end)).await;
                }
                Output::RedialUpstream => self.redial_after_stls(),
                Output::ConnectUpstream => self.connect_upstream(),
                Output::StartClientTls => {
                    let plain = std::mem::replace(&mut self.client, Stream::Detached);
                    // Boxed: a rare step whose future would otherwise sit in every session.
                    let shaken = tokio::select! {
                        biased;
                        r = Box::pin(client_handshake(plain, &self.shared)) => Some(r),
                        _ = stop.stopped() => None,
                    };
                    let Some(shaken) = shaken else {
                        // A kick or the drain does not wait for the handshake. No TLS yet,
                        // so no `-ERR` the client could read: the connection is closed.
                        info!("stopped during the client's STLS handshake");
                        self.session.on_shutdown();
                        return Ok(Some(CloseReason::Shutdown));
                    };
                    self.client = shaken?;
                    self.session.client_tls_started(&mut self.cin);
                    self.client_tls = self.client.tls_info().map(Box::new);
                    if let Some(t) = &self.client_tls {
                        self.observer.observer.tls(crate::audit::TlsSide::Client, t);
                    }
                }
                // Boxed, as the rest of scanning: the spool's futures would otherwise sit in
                // every session's task.
                Output::Spool(bytes) => Box::pin(self.spool(&bytes)).await,
                Output::Scan(request) => {
                    // The spool moves into the scan and comes back with the verdict.
                    let spool = match self.held.as_mut().and_then(|h| h.spool.take()) {
                        Some(spool) => spool,
                        None => self.new_spool(),
                    };
                    let scan = scan::start(self.shared.scanners.clone(), request, spool);
                    self.held.get_or_insert_with(Box::default).scan = Some(scan);
                }
                Output::Unspool => Box::pin(self.unspool()).await?,
                Output::DropSpool => self.held = None,
                Output::Close(reason) => return Ok(Some(reason)),
            }
        }
        Ok(None)
    }

    /// [`Output::Spool`]: append `bytes` to the held body, creating its spool with the first;
    /// a write that fails (a full disk) drops the body and tells the session.
    async fn spool(&mut self, bytes: &[u8]) {
        if self.held.as_ref().is_some_and(|h| h.failed) {
            // The rest of a body whose spool failed: dropped with it.
            return;
        }
        if self.held.as_ref().is_none_or(|h| h.spool.is_none()) {
            let spool = self.new_spool();
            self.held.get_or_insert_with(Box::default).spool = Some(spool);
        }
        if let Some(spool) = self.held.as_mut().and_then(|h| h.spool.as_mut())
            && let Err(e) = spool.write(bytes).await
        {
            // A full disk: the client gets `-ERR [SYS/TEMP]`, never a cut message (the hop
            // ends the session).
            warn!(error = %SessionError::Spool(e), "spooling a held body failed");
            self.held = Some(Box::new(scan::Held {
                failed: true,
                ..scan::Held::default()
            }));
            self.session.on_spool_error();
        }
    }

    /// [`Output::Unspool`]: write the held body to the client (counted), then drop it.
    async fn unspool(&mut self) -> Result<(), SessionError> {
        if let Some(spool) = self.held.take().and_then(|h| h.spool) {
            let n = spool
                .copy_to(&mut self.client)
                .await
                .map_err(io_err(Side::Client))?;
            self.client.flush().await.map_err(io_err(Side::Client))?;
            self.traffic.to_client += n;
            self.live.to_client.inc_by(n);
        }
        Ok(())
    }

    /// An empty spool for a body held for scanning (`[scan]` settings, spooled bytes counted).
    fn new_spool(&self) -> crate::scan::Spool {
        match &self.shared.scanners {
            Some(scanners) => scanners.spool(),
            None => crate::scan::Spool::new(&self.shared.config.scan),
        }
    }

    /// [`Output::ConnectUpstream`]: the connect phase let the session in; the upstream's
    /// connector (the plan for the session's client, its addresses in the order the dead
    /// marks give now) goes to the session, which connects it.
    fn connect_upstream(&mut self) {
        let shared = self.shared.clone();
        let Some(c) = self.connecting.as_mut() else {
            return;
        };
        let origin = crate::net::upstream::ClientOrigin {
            client: self.info.client,
            local: self.info.local,
            session: format!("popgate-{}", self.info.id),
            tls: self.client_tls.as_deref().cloned(),
        };
        let plan = crate::net::upstream::plan(
            &c.cfg,
            c.tls.as_ref(),
            shared.config.limits.max_line,
            &origin,
            crate::proxy::connect::greeting_in_setup(c.cfg.address.len()),
            None,
        );
        c.dialled = Instant::now();
        let connector = crate::net::upstream::connector(&c.cfg, plan, None, &shared.dead);
        self.session.connect_upstream(connector);
    }

    /// Direct mode with `forward_client = "proxy-v2"`: the upstream was dialled before the
    /// client's STLS, with a header that said "plaintext", and a server such as Dovecot
    /// (`disable_plaintext_auth = yes`) would keep refusing plaintext logins. Called for
    /// [`Output::RedialUpstream`], before the first command after the STLS goes out (not for
    /// APOP nor QUIT: `proxy::Session::redialling_after_stls`): the session gets a connector that
    /// dials again with the client's TLS in the header and takes the new greeting silently,
    /// on the pending slot. The first connection stays until the second greets `+OK`: if the
    /// second cannot be had (the server down meanwhile, or refusing a second connection from
    /// this client while the first is open), the session goes on over the first, as without
    /// the re-dial, rather than ending a client that did nothing wrong; else the first is
    /// closed (without QUIT: nothing was done on it but the capability talk before STLS,
    /// which RFC 2595 makes the client forget anyway). The commands about to go out are the
    /// only ones pending (the STLS waited for every earlier answer).
    fn redial_after_stls(&mut self) {
        if !self.sin.is_empty() {
            // Server bytes nobody asked for: the old connection is in use; keep it.
            warn!("STLS with server data unread: the upstream is not told about TLS");
            return;
        }
        let shared = self.shared.clone();
        let config = &shared.config;
        let index = config.default_index();
        let cfg = &config.upstreams[index];
        let origin = crate::net::upstream::ClientOrigin {
            client: self.info.client,
            local: self.info.local,
            session: format!("popgate-{}", self.info.id),
            tls: self.client_tls.as_deref().cloned(),
        };
        let tls = shared.tls.upstreams.get(index).and_then(Option::as_ref);
        let plan =
            crate::net::upstream::plan(cfg, tls, config.limits.max_line, &origin, true, None);
        let connector = crate::net::upstream::connector(cfg, plan, None, &shared.dead);
        self.connecting = Some(Box::new(Connecting {
            cfg: cfg.clone(),
            tls: tls.cloned(),
            dialled: Instant::now(),
            address: String::new(),
            login: None,
        }));
        self.session.redial_upstream(connector);
    }

    /// Routing mode: route a login the front took (route rule, map, default), let the OAuth2
    /// bridge check it if the upstream has one, and hand the session the upstream's connector
    /// (the session then dials, replays and hands over through its outputs). A login the
    /// bridge refuses is answered at once. A shutdown does not wait for the bridge.
    async fn route_login(&mut self, login: &crate::proxy::front::Login, stop: &Entry) {
        // What the front's answers made happen is recorded before the routing's own records.
        self.pump_events().await;
        let shared = self.shared.clone();
        let config = &shared.config;
        let hop = self.session.hop();
        let crate::routing::Route { index, why, user } = crate::routing::route(
            config,
            &login.user,
            |routed| hop.route(routed),
            shared.routes.as_deref(),
        );
        let upstream = &config.upstreams[index];
        // Rules and audit see the name the chosen server logs in; so does the OAuth2 bridge
        // (its credentials and tokens). The replay upstream is what the client sent.
        self.session
            .hop_mut()
            .set_fold_user_names(upstream.user_names == crate::config::UserNames::Fold);
        self.observer.observer.set_upstream(upstream.label());
        // A SASL name may hold any byte: control characters are escaped in the log line.
        let shown = crate::pop3::printable(user.as_bytes());
        let dialled = Instant::now();
        let bridge = shared.oauth2.get(upstream.label()).cloned();
        let authorized = match &bridge {
            Some(b) => {
                let penalty = shared
                    .limiter
                    .logins
                    .pending(self.info.client.ip(), clock());
                let authorize = b.authorize(&user, &login.secret, self.info.client.ip(), penalty);
                // A shutdown does not wait for the identity provider: the login is abandoned.
                let authorized = tokio::select! {
                    r = authorize => r,
                    _ = stop.stopped() => {
                        self.session.on_shutdown();
                        return;
                    }
                };
                match authorized {
                    Ok(who) => Some(who),
                    Err(e) => {
                        // The bridge logged the details (never a token or password).
                        info!(
                            user = %shown,
                            upstream = upstream.label(),
                            error = %e,
                            "OAuth2 login failed"
                        );
                        let reply = e.client_reply();
                        self.session
                            .login_failed(clock(), &reply, &mut self.sin, &mut self.cin);
                        self.pump_events().await;
                        return;
                    }
                }
            }
            None => None,
        };
        let replay = match (&bridge, &authorized) {
            (Some(b), Some(who)) => {
                let (host, port) = b.host_port();
                Replay::Bearer(Bearer {
                    mechanism: b.mechanism(),
                    mailbox: who.mailbox().to_owned(),
                    host: host.to_owned(),
                    port,
                    token: who.token().to_owned(),
                })
            }
            _ => Replay::Lines {
                method: login.method,
                lines: login.lines.clone(),
            },
        };
        // Who the session is for, as the upstream is told (`forward_client`): rebuilt here
        // rather than kept in every session.
        let origin = crate::net::upstream::ClientOrigin {
            client: self.info.client,
            local: self.info.local,
            session: format!("popgate-{}", self.info.id),
            tls: self.client_tls.as_deref().cloned(),
        };
        let tls = shared.tls.upstreams.get(index).and_then(Option::as_ref);
        let plan = crate::net::upstream::plan(
            upstream,
            tls,
            config.limits.max_line,
            &origin,
            true,
            Some(replay),
        );
        let connector = crate::net::upstream::connector(
            upstream,
            plan,
            Some(config.limits.login_timeout),
            &shared.dead,
        );
        self.connecting = Some(Box::new(Connecting {
            cfg: upstream.clone(),
            tls: tls.cloned(),
            dialled,
            address: String::new(),
            login: Some(Box::new(RoutedLogin {
                why,
                shown,
                token: authorized.as_ref().map(|who| who.token().to_owned()),
                bridged: bridge.zip(authorized),
                token_error: None,
            })),
        }));
        self.session.connect_login(connector);
    }

    /// The connection slot a connector of the session works on: the re-dial's pending one,
    /// else the upstream (asked before a race: the connector may be gone after it).
    fn link(&mut self, redial: bool) -> &mut Stream {
        if redial {
            &mut self.pending
        } else {
            &mut self.upstream
        }
    }

    /// Whether the connector out is the re-dial's.
    fn redialling(&self) -> bool {
        self.session.connecting() == Some(UpstreamPurpose::Redial)
    }

    /// [`Output::Dial`]: the connection there is in the slot (one failed over) is closed
    /// without a word; the dial is raced as [`Driver::connect_race`] says.
    async fn connect_dial(&mut self, address: String, stop: &Entry) -> Result<(), SessionError> {
        let redial = self.redialling();
        *self.link(redial) = Stream::Detached;
        if let Some(c) = self.connecting.as_mut() {
            c.address.clone_from(&address);
        }
        let dial = <Stream as Link>::dial(&address);
        match self.connect_race(dial, stop).await? {
            Some(Ok(stream)) => {
                *self.link(redial) = stream;
                self.session.dialled(clock());
            }
            Some(Err(e)) => self.session.dial_failed(clock(), &e),
            None => {}
        }
        Ok(())
    }

    /// [`Output::ToUpstream`] while a connector is out: its own lines (not the relay's
    /// traffic), the write raced as [`Driver::connect_race`] says.
    async fn connect_write(&mut self, bytes: &[u8], stop: &Entry) -> Result<(), SessionError> {
        let redial = self.redialling();
        let mut link = std::mem::replace(self.link(redial), Stream::Detached);
        let written = self.connect_race(write_flush(&mut link, bytes), stop).await;
        *self.link(redial) = link;
        if let Some(Err(e)) = written? {
            self.session.upstream_write_failed(clock(), &e);
        }
        Ok(())
    }

    /// [`Output::StartUpstreamTls`]: the handshake toward the address dialled last, raced
    /// as [`Driver::connect_race`] says.
    async fn connect_tls(&mut self, stop: &Entry) -> Result<(), SessionError> {
        // Out of the driver while the handshake runs (the race borrows the driver).
        let connecting = self.connecting.take();
        let (tls, address) = match connecting.as_deref() {
            Some(c) => (c.tls.as_ref(), c.address.as_str()),
            None => (None, ""),
        };
        let redial = self.redialling();
        let plain = std::mem::replace(self.link(redial), Stream::Detached);
        let handshake = <Stream as Link>::start_tls(plain, tls, address);
        let shaken = self.connect_race(handshake, stop).await;
        self.connecting = connecting;
        match shaken? {
            Some(Ok(stream)) => {
                *self.link(redial) = stream;
                self.session.upstream_tls_done(clock());
            }
            Some(Err(e)) => self.session.upstream_tls_failed(clock(), &e),
            None => {}
        }
        Ok(())
    }

    /// [`Output::FetchToken`]: a fresh token from the OAuth2 bridge, raced as
    /// [`Driver::connect_race`] says; why there is none is kept for the login's end.
    async fn login_token(&mut self, stop: &Entry) -> Result<(), SessionError> {
        // Out of the driver while the bridge works (the race borrows the driver).
        let mut connecting = self.connecting.take();
        let fetched = match connecting.as_deref().and_then(|c| c.login.as_deref()) {
            Some(RoutedLogin {
                bridged: Some((b, who)),
                token: Some(stale),
                ..
            }) => {
                let fetch = async { b.fresh_token(who, stale).await.map_err(Some) };
                self.connect_race(fetch, stop).await
            }
            _ => Ok(Some(Err(None))),
        };
        let fetched = match fetched {
            Ok(fetched) => fetched,
            Err(e) => {
                self.connecting = connecting;
                return Err(e);
            }
        };
        let login = connecting.as_mut().and_then(|c| c.login.as_mut());
        match fetched {
            Some(Ok(token)) => {
                if let Some(r) = login {
                    r.token = Some(token.clone());
                }
                self.session.fresh_token(clock(), token);
            }
            Some(Err(e)) => {
                if let Some(r) = login {
                    r.token_error = e;
                }
                self.session.token_failed();
            }
            None => {}
        }
        self.connecting = connecting;
        Ok(())
    }

    /// `work` for a connector of the session, unless the session's deadline (fed in as a
    /// timeout) or a shutdown (the connector is abandoned) comes first (`None`). While the
    /// session wants the client (the set-up), it is read meanwhile: its bytes are kept, its
    /// end ends the session at once (`None`), a read error ends it too (`Err`).
    async fn connect_race<T>(
        &mut self,
        work: impl Future<Output = T>,
        stop: &Entry,
    ) -> Result<Option<T>, SessionError> {
        let mut work = std::pin::pin!(work);
        loop {
            let wake = self.session.poll_timeout().map(Instant::from_std);
            let want_client = self.session.wants_client_input();
            tokio::select! {
                r = &mut work => return Ok(Some(r)),
                _ = stop.stopped() => {
                    self.session.on_shutdown();
                    return Ok(None);
                }
                _ = async {
                    match wake {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.session.on_timeout(clock());
                    return Ok(None);
                }
                r = read::read_lean(&mut self.client, &mut self.cin), if want_client => {
                    let n = r.map_err(io_err(Side::Client))?;
                    if n == 0 {
                        self.session.on_client_eof();
                        return Ok(None);
                    }
                    self.traffic.from_client += n as u64;
                    self.live.from_client.inc_by(n as u64);
                    self.session.on_client_input(clock(), &mut self.cin);
                    if let Some(h) = self.observer.observer.tap_mut().handle_mut() {
                        h.progress(self.traffic.from_client, self.traffic.to_client);
                    }
                }
            }
        }
    }

    /// [`Output::UpstreamEnded`]: a connector of the session is over; its records (log
    /// lines, metrics, the tap, the upstream's TLS) and the connection slots.
    async fn upstream_ended(&mut self, purpose: UpstreamPurpose, end: UpstreamEnd) {
        let Some(connecting) = self.connecting.take() else {
            return;
        };
        match purpose {
            UpstreamPurpose::Setup => self.setup_ended(&connecting, end),
            UpstreamPurpose::Redial => self.redial_ended(end),
            UpstreamPurpose::Login => self.login_ended(*connecting, end),
        }
        // In the order they happened, before anything the session does next is recorded.
        self.pump_events().await;
    }

    /// Direct mode's set-up ended: connected (the relay begins) or unavailable (the session
    /// answered the client and closes).
    fn setup_ended(&mut self, c: &Connecting, end: UpstreamEnd) {
        let shared = self.shared.clone();
        match end {
            UpstreamEnd::Connected { address, octets } => {
                let took = c.dialled.elapsed();
                record_connect(
                    &shared,
                    &c.cfg,
                    Ok((&address, took, self.upstream.is_tls())),
                );
                self.live.from_upstream.inc_by(octets as u64);
                if let Some(h) = self.observer.observer.tap_mut().handle_mut() {
                    h.upstream(c.cfg.label(), &address);
                }
                self.upstream_tls = self.upstream.tls_info().map(Box::new);
                if let Some(t) = &self.upstream_tls {
                    debug!(version = %t.version, cipher = %t.cipher, "upstream TLS established");
                    self.observer
                        .observer
                        .tls(crate::audit::TlsSide::Upstream, t);
                }
            }
            UpstreamEnd::Unavailable {
                address,
                stage,
                reason,
            } => {
                self.upstream = Stream::Detached;
                let e = crate::net::upstream::ConnectError {
                    address,
                    stage,
                    reason: reason.to_string(),
                };
                warn!(error = %e, "upstream unavailable");
                record_connect(&shared, &c.cfg, Err(&e));
            }
            _ => self.upstream = Stream::Detached,
        }
    }

    /// The re-dial after STLS ended: the session goes over to the pending connection if it
    /// greeted `+OK`, else on over the first.
    fn redial_ended(&mut self, end: UpstreamEnd) {
        let pending = std::mem::replace(&mut self.pending, Stream::Detached);
        match end {
            UpstreamEnd::Connected { address, .. } => {
                debug!(address = %address, "upstream dialled again to pass the client's TLS on");
                self.upstream_tls = pending.tls_info().map(Box::new);
                self.upstream = pending;
            }
            UpstreamEnd::NotGreeted { address, greeting } => warn!(
                address = %address,
                greeting = %crate::pop3::printable(&greeting).trim_end(),
                "STLS: the upstream dialled again to be told about TLS did not greet +OK; \
                 the session goes on over the first connection"
            ),
            UpstreamEnd::Unavailable {
                address,
                stage,
                reason,
            } => {
                let e = crate::net::upstream::ConnectError {
                    address,
                    stage,
                    reason: reason.to_string(),
                };
                warn!(error = %e, "STLS: the upstream could not be dialled again to be told \
                       about TLS; the session goes on over the first connection");
            }
            UpstreamEnd::Refused | UpstreamEnd::Bridge(_) => {}
        }
    }

    /// The routed login ended: its records (log line, metrics, the tap), the upstream's TLS;
    /// a bearer login's failure answered with the bridge's reply.
    fn login_ended(&mut self, c: Connecting, end: UpstreamEnd) {
        let Some(routed) = c.login else {
            return;
        };
        let shared = self.shared.clone();
        let upstream = &c.cfg;
        let label = upstream.label();
        let shown = &routed.shown;
        let why = &routed.why;
        match end {
            UpstreamEnd::Connected { address, octets } => {
                let took = c.dialled.elapsed();
                record_connect(
                    &shared,
                    upstream,
                    Ok((&address, took, self.upstream.is_tls())),
                );
                info!(
                    user = %shown,
                    upstream = label,
                    address = %address,
                    why = %why,
                    "login routed"
                );
                if let Some(h) = self.observer.observer.tap_mut().handle_mut() {
                    h.upstream(label, &address);
                }
                self.upstream_tls = self.upstream.tls_info().map(Box::new);
                if let Some(t) = &self.upstream_tls {
                    self.observer
                        .observer
                        .tls(crate::audit::TlsSide::Upstream, t);
                }
                self.live.from_upstream.inc_by(octets as u64);
            }
            UpstreamEnd::Refused | UpstreamEnd::NotGreeted { .. } => {
                self.upstream = Stream::Detached;
                info!(
                    user = %shown,
                    upstream = label,
                    why = %why,
                    "routed login refused by the upstream"
                );
            }
            UpstreamEnd::Unavailable {
                address,
                stage,
                reason,
            } => {
                self.upstream = Stream::Detached;
                self.unavailable(upstream, address, stage, reason.to_string());
            }
            UpstreamEnd::Bridge(failure) => {
                self.upstream = Stream::Detached;
                let RoutedLogin {
                    bridged,
                    token_error,
                    ..
                } = *routed;
                let error = match (failure, bridged) {
                    (ConnectFailure::TokenRefused(line), Some((b, who))) => {
                        Ok(b.refused(&who, line))
                    }
                    (ConnectFailure::BearerUnexpected(line), Some((b, who))) => {
                        Ok(b.unexpected(&who, line))
                    }
                    (ConnectFailure::NoFreshToken, _) => token_error.ok_or(Reason::Closed),
                    (
                        ConnectFailure::TokenRefused(line) | ConnectFailure::BearerUnexpected(line),
                        None,
                    ) => Err(Reason::UnexpectedLoginReply(line)),
                    (ConnectFailure::Refused(line), _) => {
                        Ok(crate::oauth2::BridgeError::Refused(line))
                    }
                    (ConnectFailure::Unavailable { reason, .. }, _) => Err(reason),
                };
                let reply = match error {
                    Ok(e) => {
                        // The bridge logged the details (never a token or password).
                        info!(
                            user = %shown,
                            upstream = label,
                            error = %e,
                            "OAuth2 login failed"
                        );
                        e.client_reply()
                    }
                    Err(reason) => {
                        self.unavailable(
                            upstream,
                            String::new(),
                            ConnectStage::Setup,
                            reason.to_string(),
                        );
                        crate::pop3::replies::line(crate::pop3::replies::UPSTREAM_UNAVAILABLE)
                    }
                };
                self.session
                    .login_failed(clock(), &reply, &mut self.sin, &mut self.cin);
            }
        }
    }

    /// The routed login's upstream could not be had: the log line and the metrics.
    fn unavailable(
        &self,
        upstream: &crate::config::UpstreamConfig,
        address: String,
        stage: ConnectStage,
        reason: String,
    ) {
        let u = crate::net::upstream::ConnectError {
            address,
            stage,
            reason,
        };
        warn!(upstream = upstream.label(), error = %u, "upstream unavailable");
        record_connect(&self.shared, upstream, Err(&u));
    }

    /// Write `bytes` to the upstream and flush them (under TLS a write can leave records
    /// queued in rustls), counting them.
    async fn send_upstream(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        self.upstream
            .write_all(bytes)
            .await
            .map_err(io_err(Side::Upstream))?;
        self.upstream
            .flush()
            .await
            .map_err(io_err(Side::Upstream))?;
        self.live.to_upstream.inc_by(bytes.len() as u64);
        Ok(())
    }

    /// Hand rule tags and trace requests to the observer and emit its queued audit events.
    async fn sync_observer(&mut self) {
        record_rules(&self.shared, self.session.hop_mut().take_rule_tally());
        // `popgate sessions`: relaxed stores, a lock only when something changed.
        if let Some(h) = self.observer.observer.tap_mut().handle_mut() {
            h.progress(self.traffic.from_client, self.traffic.to_client);
            // Before the relay the session is `CONNECTING` (the upstream's set-up).
            if self.session.stage() == SessionStage::Relaying {
                h.sync(
                    self.session.hop().user(),
                    self.session.hop().state(),
                    self.session.hop().tags(),
                );
            }
            h.tls(
                self.client_tls.as_deref().map(|t| t.version.as_str()),
                self.upstream_tls.as_deref().map(|t| t.version.as_str()),
            );
        }
        let obs = &mut self.observer.observer;
        obs.set_tags(self.session.hop().tags());
        if self.session.hop().trace() {
            obs.start_transcript(
                &self.shared.config.audit.transcript,
                &self.info.listener,
                self.info.client,
            );
        }
        obs.flush().await;
    }
}
