//! The session registry: one entry per live session, for `popgate sessions`, `kick` and `tap`.
//!
//! A session registers when its id, listener and client are known (after the PROXY
//! header) and holds a [`SessionHandle`]; dropping the handle (any way out of the session task,
//! a panic included) removes the entry. The hot path stays cheap: byte counters and the
//! last-activity time are relaxed atomic stores once per relay step; user, state, upstream,
//! TLS and tags take the entry's lock only when they changed.
//!
//! Every session's stop signal is a flag in its entry: a kick and the drain after
//! `shutdown_grace` both set it; a kick records who asked first, so the session can tell the
//! two apart. One `Notify` of the registry wakes the sessions waiting for their flag (each
//! looks at its own): a stop is rare, and a flag costs a session one byte where a channel of
//! its own cost a few hundred.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime};

use tokio::sync::Notify;

use super::protocol::SessionRow;
use super::tap::{Subscriber, TapLine};
use crate::pop3::tracker::State;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What to match sessions on: every criterion given must hold.
#[derive(Debug, Clone, Default)]
pub(crate) struct Matcher {
    pub(crate) session: Option<u64>,
    pub(crate) user: Option<String>,
    pub(crate) client: Option<crate::cidr::Cidr>,
    pub(crate) listener: Option<String>,
}

impl Matcher {
    /// Whether no criterion is given (matches every session).
    pub(crate) fn is_empty(&self) -> bool {
        self.session.is_none()
            && self.user.is_none()
            && self.client.is_none()
            && self.listener.is_none()
    }

    /// Whether `e` matches (a user criterion needs the user known).
    fn matches(&self, e: &Entry, user: Option<&str>) -> bool {
        self.session.is_none_or(|s| s == e.id)
            && self.client.is_none_or(|c| c.contains(e.client.ip()))
            && self.listener.as_deref().is_none_or(|l| l == &*e.listener)
            && self
                .user
                .as_deref()
                .is_none_or(|u| user.is_some_and(|have| have == u))
    }

    /// Whether the criteria other than the user already hold (the user may match later).
    fn may_match(&self, e: &Entry) -> bool {
        self.session.is_none_or(|s| s == e.id)
            && self.client.is_none_or(|c| c.contains(e.client.ip()))
            && self.listener.as_deref().is_none_or(|l| l == &*e.listener)
    }
}

/// The fields of a session that change rarely. Boxed strings and slices (no spare capacity,
/// two words each): an entry lives as long as its session, and with them it fits 320 bytes.
#[derive(Debug, Default)]
struct Details {
    /// Shared with the session's handle (one allocation for both).
    user: Option<Arc<str>>,
    state: Option<State>,
    upstream: Option<Box<str>>,
    upstream_address: Option<Box<str>>,
    client_tls: Option<Box<str>>,
    upstream_tls: Option<Box<str>>,
    /// The session's own tags (shared with it, not copied).
    tags: Box<[Arc<str>]>,
    /// Who kicked the session (`uid 0 pid 123`), set before its stop flag.
    kicked_by: Option<Box<str>>,
}

/// One live session.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) id: u64,
    listener: Arc<str>,
    client: SocketAddr,
    /// The balancer that sent the PROXY header (boxed: most sessions have none).
    proxy: Option<Box<SocketAddr>>,
    opened: Instant,
    from_client: AtomicU64,
    to_client: AtomicU64,
    /// Milliseconds after `opened` of the last relay step.
    active_ms: AtomicU64,
    details: Mutex<Details>,
    /// Set by a kick or the drain; the registry's `stopped` wakes the sessions waiting for it.
    stop: AtomicBool,
    registry: std::sync::Weak<Registry>,
    /// Taps attached to this session; `tap_count` is their number, the one thing the relay
    /// reads when nobody taps.
    taps: Mutex<Vec<Arc<Subscriber>>>,
    tap_count: AtomicUsize,
    /// How many of them show bodies (read per body chunk while tapped).
    bodies_count: AtomicUsize,
}

impl Entry {
    /// Whether a tap is attached: one relaxed atomic load.
    #[inline]
    pub(crate) fn tapped(&self) -> bool {
        self.tap_count.load(Ordering::Relaxed) != 0
    }

    /// Deliver `line` to every attached tap (`body_line`: only to those showing bodies).
    pub(crate) fn emit(&self, line: &TapLine, body_line: bool) {
        for s in lock(&self.taps).iter() {
            if !body_line || s.bodies {
                s.deliver(line);
            }
        }
    }

    /// Deliver `line` to the attached taps that do not show bodies.
    pub(crate) fn emit_summary(&self, line: &TapLine) {
        for s in lock(&self.taps).iter() {
            if !s.bodies {
                s.deliver(line);
            }
        }
    }

    /// Whether some attached tap shows bodies.
    #[inline]
    pub(crate) fn wants_bodies(&self) -> bool {
        self.bodies_count.load(Ordering::Relaxed) != 0
    }

    /// Who kicked the session, if it was kicked.
    pub(crate) fn kicked_by(&self) -> Option<String> {
        lock(&self.details).kicked_by.as_deref().map(str::to_owned)
    }

    /// Whether the session was told to stop (kicked, or closed by the drain).
    #[inline]
    pub(crate) fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Resolves once the session is told to stop (at once if it was already); the flag is
    /// checked again at every stop in the registry.
    pub(crate) async fn stopped(&self) {
        let Some(registry) = self.registry.upgrade() else {
            return std::future::pending().await;
        };
        loop {
            // Registered before the check: a stop between the check and the wait still wakes.
            let woken = registry.stopped.notified();
            if self.stop_requested() {
                return;
            }
            woken.await;
        }
    }

    /// Set the stop flag (the caller wakes the waiters).
    fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    fn attach(&self, s: &Arc<Subscriber>) -> bool {
        let mut taps = lock(&self.taps);
        if taps.iter().any(|t| Arc::ptr_eq(t, s)) {
            return false;
        }
        taps.push(s.clone());
        self.counts(&taps);
        true
    }

    fn detach(&self, s: &Arc<Subscriber>) {
        let mut taps = lock(&self.taps);
        taps.retain(|t| !Arc::ptr_eq(t, s));
        self.counts(&taps);
    }

    /// Publish the tap counts (under the `taps` lock).
    fn counts(&self, taps: &[Arc<Subscriber>]) {
        self.tap_count.store(taps.len(), Ordering::Relaxed);
        let bodies = taps.iter().filter(|t| t.bodies).count();
        self.bodies_count.store(bodies, Ordering::Relaxed);
    }

    fn row(&self, now: Instant, registry: &Registry) -> SessionRow {
        let d = lock(&self.details);
        let age = now.saturating_duration_since(self.opened);
        let active = self.active_ms.load(Ordering::Relaxed);
        SessionRow {
            id: self.id,
            client: self.client.to_string(),
            proxy: self.proxy.as_deref().map(|p| p.to_string()),
            listener: self.listener.to_string(),
            user: d.user.as_deref().map(str::to_owned),
            state: d.state.map(state_name).unwrap_or("CONNECTING").to_owned(),
            upstream: d.upstream.as_deref().map(str::to_owned),
            upstream_address: d.upstream_address.as_deref().map(str::to_owned),
            client_tls: d.client_tls.as_deref().map(str::to_owned),
            upstream_tls: d.upstream_tls.as_deref().map(str::to_owned),
            bytes_from_client: self.from_client.load(Ordering::Relaxed),
            bytes_to_client: self.to_client.load(Ordering::Relaxed),
            started: humantime::format_rfc3339_seconds(registry.wall_time(self.opened)).to_string(),
            age_s: age.as_secs(),
            idle_s: (age.as_millis() as u64).saturating_sub(active) / 1000,
            tags: d.tags.iter().map(|t| t.to_string()).collect(),
        }
    }
}

/// RFC 1939's name of a state, as `popgate sessions` shows it.
pub(crate) fn state_name(s: State) -> &'static str {
    match s {
        State::Authorization => "AUTHORIZATION",
        State::Transaction => "TRANSACTION",
        State::Update => "UPDATE",
    }
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<u64, Arc<Entry>>,
    /// The drain closed every session: later registrations start closed.
    closing: bool,
    subscribers: Vec<Arc<Subscriber>>,
}

/// Every live session of the process (one for its life, across reloads).
#[derive(Debug)]
pub(crate) struct Registry {
    inner: Mutex<Inner>,
    /// Number of attached taps (subscribers), read before any per-session tap work.
    subscribers: AtomicUsize,
    /// Wakes every session waiting for its stop flag when one is set.
    stopped: Notify,
    started: Instant,
    started_at: SystemTime,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl Registry {
    /// An empty registry; its start time is the process's uptime origin.
    pub(crate) fn new() -> Registry {
        Registry {
            inner: Mutex::new(Inner::default()),
            subscribers: AtomicUsize::new(0),
            stopped: Notify::new(),
            started: Instant::now(),
            started_at: SystemTime::now(),
        }
    }

    /// Since when the registry (the proxy) runs.
    pub(crate) fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// When the proxy started.
    pub(crate) fn started_at(&self) -> SystemTime {
        self.started_at
    }

    /// The wall-clock time of `at` (a session's opening), from the registry's start.
    fn wall_time(&self, at: Instant) -> SystemTime {
        self.started_at + at.saturating_duration_since(self.started)
    }

    /// Register a session: its handle (deregisters on drop), whose entry carries its stop
    /// signal (set once kicked or closed by the drain; a session registered after the drain
    /// starts stopped).
    pub(crate) fn register(
        self: &Arc<Self>,
        id: u64,
        listener: Arc<str>,
        client: SocketAddr,
        proxy: Option<SocketAddr>,
    ) -> SessionHandle {
        let mut inner = lock(&self.inner);
        let entry = Arc::new(Entry {
            id,
            listener,
            client,
            proxy: proxy.map(Box::new),
            opened: Instant::now(),
            from_client: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            active_ms: AtomicU64::new(0),
            details: Mutex::new(Details::default()),
            stop: AtomicBool::new(inner.closing),
            registry: Arc::downgrade(self),
            taps: Mutex::new(Vec::new()),
            tap_count: AtomicUsize::new(0),
            bodies_count: AtomicUsize::new(0),
        });
        for s in &inner.subscribers {
            if s.matcher.matches(&entry, None) {
                entry.attach(s);
            }
        }
        inner.entries.insert(id, entry.clone());
        drop(inner);
        SessionHandle {
            entry,
            registry: self.clone(),
            user: None,
            state: None,
            tags: 0,
            tls_published: (false, false),
            backlog: Vec::new(),
        }
    }

    /// The drain: stop every session, now and registered later.
    pub(crate) fn close_all(&self) {
        let mut inner = lock(&self.inner);
        inner.closing = true;
        for e in inner.entries.values() {
            e.request_stop();
        }
        drop(inner);
        self.stopped.notify_waiters();
    }

    /// The entries matching `m`, oldest first.
    fn matching(&self, m: &Matcher) -> Vec<Arc<Entry>> {
        let inner = lock(&self.inner);
        let mut out: Vec<Arc<Entry>> = inner
            .entries
            .values()
            .filter(|e| {
                let user = lock(&e.details).user.clone();
                m.matches(e, user.as_deref())
            })
            .cloned()
            .collect();
        out.sort_by_key(|e| e.id);
        out
    }

    /// One row per session matching `m`, oldest first.
    pub(crate) fn rows(&self, m: &Matcher) -> Vec<SessionRow> {
        let now = Instant::now();
        self.matching(m).iter().map(|e| e.row(now, self)).collect()
    }

    /// Kick every session matching `m` (`who` goes to the audit trail): the ids kicked.
    pub(crate) fn kick(&self, m: &Matcher, who: &str) -> Vec<u64> {
        let mut ids = Vec::new();
        for e in self.matching(m) {
            lock(&e.details).kicked_by = Some(who.into());
            e.request_stop();
            ids.push(e.id);
        }
        if !ids.is_empty() {
            self.stopped.notify_waiters();
        }
        ids
    }

    /// Attach a tap to every present session it matches and to matching later ones: the ids
    /// attached now.
    pub(crate) fn subscribe(&self, s: &Arc<Subscriber>) -> Vec<u64> {
        let mut inner = lock(&self.inner);
        inner.subscribers.push(s.clone());
        self.subscribers
            .store(inner.subscribers.len(), Ordering::Relaxed);
        let mut ids = Vec::new();
        for e in inner.entries.values() {
            let user = lock(&e.details).user.clone();
            if s.matcher.matches(e, user.as_deref()) && e.attach(s) {
                ids.push(e.id);
            }
        }
        ids.sort_unstable();
        ids
    }

    /// Detach a tap from every session; it attaches to no later one.
    pub(crate) fn unsubscribe(&self, s: &Arc<Subscriber>) {
        let mut inner = lock(&self.inner);
        inner.subscribers.retain(|t| !Arc::ptr_eq(t, s));
        self.subscribers
            .store(inner.subscribers.len(), Ordering::Relaxed);
        for e in inner.entries.values() {
            e.detach(s);
        }
    }

    /// Sessions per listener and state.
    pub(crate) fn counts(
        &self,
    ) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>> {
        let mut out: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>> =
            Default::default();
        for e in lock(&self.inner).entries.values() {
            let state = lock(&e.details)
                .state
                .map(state_name)
                .unwrap_or("CONNECTING");
            *out.entry(e.listener.to_string())
                .or_default()
                .entry(state.to_owned())
                .or_default() += 1;
        }
        out
    }

    /// Taps attached (for tests and `status`).
    pub(crate) fn taps(&self) -> usize {
        self.subscribers.load(Ordering::Relaxed)
    }

    /// Once the user is known: attach the taps whose user criterion it meets.
    fn user_known(&self, e: &Arc<Entry>, user: &str) -> bool {
        if self.subscribers.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let inner = lock(&self.inner);
        let mut attached = false;
        for s in &inner.subscribers {
            if s.matcher.user.is_some() && s.matcher.matches(e, Some(user)) {
                attached |= e.attach(s);
            }
        }
        attached
    }

    fn remove(&self, id: u64) {
        lock(&self.inner).entries.remove(&id);
    }
}

/// Lines kept before a user-filtered tap can tell whether the session is its user's.
const BACKLOG_LINES: usize = 64;

/// A session's hold on its registry entry: updates it, and removes it when dropped.
#[derive(Debug)]
pub(crate) struct SessionHandle {
    entry: Arc<Entry>,
    registry: Arc<Registry>,
    /// What was published last (so unchanged values take no lock).
    user: Option<Arc<str>>,
    state: Option<State>,
    tags: usize,
    /// Whether each side's TLS was published.
    tls_published: (bool, bool),
    /// Tap lines of the AUTHORIZATION phase while a user-filtered tap exists that this session
    /// may match once its user is known: replayed to it on attach, so `tap --user alice` shows
    /// her USER and PASS lines (redacted) too.
    backlog: Vec<(TapLine, bool)>,
}

impl SessionHandle {
    /// The registry entry (the tap point of the session's observer).
    pub(crate) fn entry(&self) -> Arc<Entry> {
        self.entry.clone()
    }

    /// Byte counts and activity, once per relay step: relaxed stores only.
    #[inline]
    pub(crate) fn progress(&self, from_client: u64, to_client: u64) {
        let e = &self.entry;
        e.from_client.store(from_client, Ordering::Relaxed);
        e.to_client.store(to_client, Ordering::Relaxed);
        e.active_ms
            .store(e.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// User, state and tags as the relay knows them; locks only on a change. A newly known
    /// user attaches the taps waiting for it (and replays the backlog to them).
    pub(crate) fn sync(&mut self, user: Option<&str>, state: State, tags: &[Arc<str>]) {
        if self.tags != tags.len() {
            self.tags = tags.len();
            lock(&self.entry.details).tags = tags.into();
        }
        if self.user.as_deref() != user {
            self.user = user.map(Arc::from);
            lock(&self.entry.details).user = self.user.clone();
            if let Some(u) = user {
                let before = self.entry.tap_count.load(Ordering::Relaxed);
                if self.registry.user_known(&self.entry, u) {
                    // The newly attached taps get what they missed; the others saw it.
                    let fresh: Vec<Arc<Subscriber>> = lock(&self.entry.taps)[before..].to_vec();
                    for (line, body) in &self.backlog {
                        for s in &fresh {
                            if !body || s.bodies {
                                s.deliver(line);
                            }
                        }
                    }
                }
            }
        }
        // After the user: a login that names its user only on success still gets its backlog.
        if self.state != Some(state) {
            self.state = Some(state);
            lock(&self.entry.details).state = Some(state);
            if state != State::Authorization {
                self.backlog = Vec::new();
            }
        }
    }

    /// Whether any tap is attached anywhere in the process: one relaxed atomic load, the
    /// whole per-call cost of the tap feed while nobody taps.
    #[inline]
    pub(crate) fn taps_anywhere(&self) -> bool {
        self.registry.subscribers.load(Ordering::Relaxed) != 0
    }

    /// Whether the session is before its login (its lines may go to the backlog).
    #[inline]
    pub(crate) fn before_login(&self) -> bool {
        self.state.is_none_or(|s| s == State::Authorization)
    }

    /// Whether lines should be kept for a tap that may attach once the user is known.
    #[inline]
    pub(crate) fn keeps_backlog(&self) -> bool {
        self.taps_anywhere() && self.before_login()
    }

    /// Keep `line` for a user-filtered tap that may attach later (bounded).
    pub(crate) fn remember(&mut self, line: TapLine, body_line: bool) {
        let waiting = {
            let inner = lock(&self.registry.inner);
            inner
                .subscribers
                .iter()
                .any(|s| s.matcher.user.is_some() && s.matcher.may_match(&self.entry))
        };
        if waiting && self.backlog.len() < BACKLOG_LINES {
            self.backlog.push((line, body_line));
        }
    }

    /// The upstream a session connected to (name and address).
    pub(crate) fn upstream(&self, name: &str, address: &str) {
        let mut d = lock(&self.entry.details);
        d.upstream = Some(name.into());
        d.upstream_address = Some(address.into());
    }

    /// The TLS versions of each side, once negotiated; locks only when one is new.
    #[inline]
    pub(crate) fn tls(&mut self, client: Option<&str>, upstream: Option<&str>) {
        let now = (client.is_some(), upstream.is_some());
        if now == self.tls_published {
            return;
        }
        self.tls_published = now;
        let mut d = lock(&self.entry.details);
        d.client_tls = client.map(Box::from);
        d.upstream_tls = upstream.map(Box::from);
    }
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        self.registry.remove(self.entry.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(r: &Arc<Registry>, id: u64, ip: &str) -> SessionHandle {
        r.register(
            id,
            Arc::from("pop3"),
            format!("{ip}:1000").parse().unwrap(),
            None,
        )
    }

    fn user(u: &str) -> Matcher {
        Matcher {
            user: Some(u.into()),
            ..Matcher::default()
        }
    }

    /// An entry lives exactly as long as its handle.
    #[test]
    fn dropping_the_handle_deregisters() {
        let r = Arc::new(Registry::new());
        let a = register(&r, 1, "192.0.2.1");
        let b = register(&r, 2, "192.0.2.2");
        assert_eq!(r.rows(&Matcher::default()).len(), 2);
        drop(a);
        let rows = r.rows(&Matcher::default());
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].id, 2);
        drop(b);
        assert!(r.rows(&Matcher::default()).is_empty());
    }

    /// A kick stops exactly the matching sessions and records who asked; the drain stops the
    /// rest without a kicker, and a session registered after it starts stopped.
    #[test]
    fn kick_stops_the_matching_sessions_and_names_who_asked() {
        let r = Arc::new(Registry::new());
        let mut a = register(&r, 1, "192.0.2.1");
        let mut b = register(&r, 2, "198.51.100.7");
        let (ra, rb) = (a.entry(), b.entry());
        a.sync(Some("bob"), State::Transaction, &[]);
        b.sync(Some("alice"), State::Transaction, &[]);
        assert!(r.kick(&user("carol"), "uid 0 pid 1").is_empty());
        assert_eq!(r.kick(&user("bob"), "uid 0 pid 1"), [1]);
        assert!(ra.stop_requested() && !rb.stop_requested());
        assert_eq!(ra.kicked_by().as_deref(), Some("uid 0 pid 1"));
        assert_eq!(rb.kicked_by(), None);
        let net = Matcher {
            client: Some(crate::cidr::Cidr::parse("198.51.100.0/24").unwrap()),
            ..Matcher::default()
        };
        assert_eq!(r.rows(&net).len(), 1);
        r.close_all();
        assert!(rb.stop_requested());
        assert_eq!(rb.kicked_by(), None);
        let c = register(&r, 3, "192.0.2.3");
        assert!(c.entry().stop_requested());
    }

    /// A session waiting for its stop wakes at its own kick and at the drain, not at another
    /// session's kick; a session that is already stopped does not wait.
    #[tokio::test]
    async fn a_waiting_session_wakes_at_its_kick_and_at_the_drain_only() {
        use std::time::Duration;
        let r = Arc::new(Registry::new());
        let a = register(&r, 1, "192.0.2.1");
        let b = register(&r, 2, "192.0.2.2");
        let (ea, eb) = (a.entry(), b.entry());
        let wait_a = tokio::spawn(async move { ea.stopped().await });
        let wait_b = tokio::spawn(async move { eb.stopped().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let by_id = Matcher {
            session: Some(1),
            ..Matcher::default()
        };
        assert_eq!(r.kick(&by_id, "uid 0 pid 1"), [1]);
        tokio::time::timeout(Duration::from_secs(5), wait_a)
            .await
            .expect("the kicked session did not wake")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!wait_b.is_finished(), "another session's kick stopped it");
        r.close_all();
        tokio::time::timeout(Duration::from_secs(5), wait_b)
            .await
            .expect("the drain did not wake the session")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), a.entry().stopped())
            .await
            .expect("a stopped session waited");
    }

    /// A user tap attaches when the session names its user and gets the lines it missed; it
    /// never attaches to another user's session; detaching leaves no tap behind.
    #[test]
    fn a_user_tap_attaches_when_the_user_is_known_and_replays_the_login() {
        let r = Arc::new(Registry::new());
        let (sub, mut rx) = Subscriber::new(user("alice"), false);
        assert!(r.subscribe(&sub).is_empty());
        let alice = register(&r, 1, "192.0.2.1");
        let bob = register(&r, 2, "192.0.2.2");
        let mut ta = super::super::tap::TapPoint::new(alice.entry());
        ta.set_handle(alice);
        let mut tb = super::super::tap::TapPoint::new(bob.entry());
        tb.set_handle(bob);
        for t in [&mut ta, &mut tb] {
            assert!(t.active(), "a backlog is kept while a user tap waits");
            t.line("S", || "+OK hello".into());
        }
        ta.line("C", || "USER alice".into());
        tb.line("C", || "USER bob".into());
        tb.handle_mut()
            .unwrap()
            .sync(Some("bob"), State::Authorization, &[]);
        assert!(rx.try_recv().is_err(), "bob's session was shown");
        ta.handle_mut()
            .unwrap()
            .sync(Some("alice"), State::Authorization, &[]);
        ta.line("S", || "+OK send PASS".into());
        let got: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok().map(|l| l.text)).collect();
        assert_eq!(got, ["+OK hello", "USER alice", "+OK send PASS"]);
        r.unsubscribe(&sub);
        assert_eq!(r.taps(), 0);
        ta.handle_mut()
            .unwrap()
            .sync(Some("alice"), State::Transaction, &[]);
        assert!(!ta.active(), "a tap point stays active after the detach");
    }
}
