//! Connection and login limits: per-IP session counts, the failed-login penalty, the accept
//! back-off and the [`WorkGate`] in front of password hashing. Bookkeeping without I/O; every
//! time-dependent call of the tables takes `now`, so they are unit-tested with a fake clock
//! (the gate waits on tokio's clock, and is tested on paused time).
//!
//! Both tables are bounded: [`IpSessions`] holds only IPs with a live session (so at most
//! `limits.max_sessions` entries), [`LoginThrottle`] is a fixed-capacity LRU of
//! [`THROTTLE_CAPACITY`] IPs, so a flood of source addresses evicts old entries instead of
//! growing memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::config::Limits;

/// How many client IPs the failed-login table remembers; the least recently failing one is
/// forgotten first. 65536 entries are a few MiB at most.
pub const THROTTLE_CAPACITY: usize = 65_536;

/// Failed logins from one IP (within `limits.login_fail_window`) that cost no delay.
pub const FREE_LOGIN_FAILURES: u32 = 2;

/// File descriptors popgate needs besides two per session (listeners, log and audit files,
/// transcripts, the runtime's own).
pub const FD_HEADROOM: u64 = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The tables stay consistent across a panic (every update is a single map operation).
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Every limit a running proxy keeps, shared by listeners and sessions.
#[derive(Debug)]
pub struct Limiter {
    /// Live sessions in all, capped at `limits.max_sessions`.
    pub total: Arc<TotalSessions>,
    /// Live sessions per client IP.
    pub sessions: Arc<IpSessions>,
    /// The failed-login penalty per client IP.
    pub logins: LoginThrottle,
    /// How often each limit was hit.
    pub counters: Counters,
}

/// How often each limit was hit since the start.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections refused by `limits.max_sessions_per_ip`.
    pub per_ip_refused: AtomicU64,
    /// Connections refused by `limits.max_sessions`.
    pub full_refused: AtomicU64,
    /// Failed-login replies that were held back.
    pub logins_delayed: AtomicU64,
    /// Connections closed on `proxy_protocol` listeners: untrusted peer, or a missing,
    /// malformed or late PROXY header.
    pub proxy_refused: AtomicU64,
    /// Connections refused with `upstream.address = "original-destination"`: no original
    /// destination, or popgate's own address.
    pub intercept_refused: AtomicU64,
}

impl Counters {
    /// Add one to `counter` and return the new total.
    pub fn bump(counter: &AtomicU64) -> u64 {
        counter.fetch_add(1, Ordering::Relaxed) + 1
    }
}

impl Limiter {
    /// The limits of `config`.
    pub fn new(config: &Limits) -> Limiter {
        Limiter {
            total: TotalSessions::new(config.max_sessions),
            sessions: IpSessions::new(config.max_sessions_per_ip),
            logins: LoginThrottle::new(
                config.login_fail_delay,
                config.login_fail_delay_max,
                config.login_fail_window,
                THROTTLE_CAPACITY,
            ),
            counters: Counters::default(),
        }
    }

    /// Take the limits of a reloaded config: live sessions and remembered failures are kept
    /// (a lowered cap refuses new sessions until enough old ones have ended).
    pub fn update(&self, config: &Limits) {
        self.total.max.store(config.max_sessions, Ordering::Relaxed);
        self.sessions
            .max
            .store(config.max_sessions_per_ip, Ordering::Relaxed);
        *lock(&self.logins.params) = ThrottleParams {
            base: config.login_fail_delay,
            max: config.login_fail_delay_max,
            window: config.login_fail_window,
        };
    }

    /// A login from `ip` failed at `now` (the session driver's clock): record it and return
    /// how long to hold the failure reply.
    pub fn login_failed(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let delay = self.logins.failed(ip, now);
        if delay.is_some() {
            Counters::bump(&self.counters.logins_delayed);
        }
        delay
    }
}

/// Live sessions in all, capped at `max` (`limits.max_sessions`, changeable by a reload).
#[derive(Debug)]
pub struct TotalSessions {
    max: AtomicUsize,
    live: AtomicUsize,
}

/// One live session; dropping it frees the slot.
#[derive(Debug)]
#[must_use = "the slot is freed when dropped"]
pub struct TotalSlot(Arc<TotalSessions>);

impl TotalSessions {
    /// A counter allowing `max` sessions at once.
    pub fn new(max: usize) -> Arc<TotalSessions> {
        Arc::new(TotalSessions {
            max: AtomicUsize::new(max),
            live: AtomicUsize::new(0),
        })
    }

    /// A slot for a new session, or `None` when `max` sessions are live.
    pub fn try_acquire(self: &Arc<Self>) -> Option<TotalSlot> {
        let max = self.max.load(Ordering::Relaxed);
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| TotalSlot(self.clone()))
    }

    /// Live sessions now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
}

impl Drop for TotalSlot {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Live sessions per client IP, capped at `max` each (0: no cap, nothing is tracked).
#[derive(Debug)]
pub struct IpSessions {
    max: AtomicUsize,
    live: Mutex<HashMap<IpAddr, usize>>,
}

/// One live session of an IP; dropping it frees the slot (and the IP's entry with its last
/// slot).
#[derive(Debug)]
#[must_use = "the slot is freed when dropped"]
pub struct IpSlot {
    table: Option<(Arc<IpSessions>, IpAddr)>,
}

impl IpSessions {
    /// A table allowing `max` sessions per IP (0: unlimited).
    pub fn new(max: usize) -> Arc<IpSessions> {
        Arc::new(IpSessions {
            max: AtomicUsize::new(max),
            live: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a new session from `ip`, or `None` when `ip` already has `max` sessions.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let max = self.max.load(Ordering::Relaxed);
        if max == 0 {
            return Some(IpSlot { table: None });
        }
        let mut live = lock(&self.live);
        let n = live.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            table: Some((self.clone(), ip)),
        })
    }

    /// The cap per IP in force (0: none).
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// Live sessions of `ip`.
    pub fn count(&self, ip: IpAddr) -> usize {
        lock(&self.live).get(&ip).copied().unwrap_or(0)
    }

    /// How many IPs have live sessions (the table's size).
    pub fn ips(&self) -> usize {
        lock(&self.live).len()
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Some((table, ip)) = self.table.take() {
            let mut live = lock(&table.live);
            if let Some(n) = live.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    live.remove(&ip);
                }
            }
        }
    }
}

/// Recent failed logins per client IP, in a fixed-capacity LRU.
///
/// The first [`FREE_LOGIN_FAILURES`] failures cost nothing; each later one is held back
/// `base`, then twice as long, up to `max`. An IP's record is forgotten `window` after its
/// last failure. A successful login clears nothing: otherwise one valid account would reset the
/// penalty between guesses at others.
#[derive(Debug)]
pub struct LoginThrottle {
    params: Mutex<ThrottleParams>,
    table: Mutex<LruCache<IpAddr, Failures>>,
}

/// The penalty's settings, replaced on reload.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ThrottleParams {
    /// `limits.login_fail_delay` (zero: no penalty).
    pub(crate) base: Duration,
    /// `limits.login_fail_delay_max`.
    pub(crate) max: Duration,
    /// `limits.login_fail_window`.
    pub(crate) window: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

impl LoginThrottle {
    /// A table of at most `capacity` IPs (at least 1); `base` zero disables the penalty.
    pub fn new(base: Duration, max: Duration, window: Duration, capacity: usize) -> Self {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        LoginThrottle {
            params: Mutex::new(ThrottleParams { base, max, window }),
            table: Mutex::new(LruCache::new(capacity)),
        }
    }

    /// The settings in force (the fleet store counts with them too).
    pub(crate) fn params(&self) -> ThrottleParams {
        *lock(&self.params)
    }

    /// Record a failed login from `ip` at `now`; the delay for its reply, if any.
    pub fn failed(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let p = *lock(&self.params);
        if p.base.is_zero() {
            return None;
        }
        let mut table = lock(&self.table);
        let count = match table.get_mut(&ip) {
            Some(f) if now.saturating_duration_since(f.last) < p.window => {
                f.count = f.count.saturating_add(1);
                f.last = now;
                f.count
            }
            Some(f) => {
                *f = Failures {
                    count: 1,
                    last: now,
                };
                1
            }
            None => {
                // Evicts the least recently failing IP when full.
                table.push(
                    ip,
                    Failures {
                        count: 1,
                        last: now,
                    },
                );
                1
            }
        };
        penalty(count, p.base, p.max)
    }

    /// The delay the last failure of `ip` earned, while its failures still count at `now`:
    /// what an address under penalty waits *before* more costly work is done for it.
    pub fn pending(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let p = *lock(&self.params);
        if p.base.is_zero() {
            return None;
        }
        penalty(self.failures(ip, now), p.base, p.max)
    }

    /// Failures of `ip` that still count at `now`.
    pub fn failures(&self, ip: IpAddr, now: Instant) -> u32 {
        let window = lock(&self.params).window;
        match lock(&self.table).peek(&ip) {
            Some(f) if now.saturating_duration_since(f.last) < window => f.count,
            _ => 0,
        }
    }

    /// How many IPs the table holds.
    pub fn len(&self) -> usize {
        lock(&self.table).len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The delay for the `count`-th failure in a row: none for the first
/// [`FREE_LOGIN_FAILURES`], then `base`, doubling, at most `max`.
pub fn penalty(count: u32, base: Duration, max: Duration) -> Option<Duration> {
    let extra = count.checked_sub(FREE_LOGIN_FAILURES + 1)?;
    let factor = 1u32.checked_shl(extra.min(31)).unwrap_or(u32::MAX);
    Some(base.saturating_mul(factor).min(max))
}

/// Bounds costly pre-login work (the OAuth2 bridge's Argon2 checks, ~19 MiB and tens of ms
/// each): at most `running` at once; the rest wait in a line of at most `queue`, each client
/// address with at most one place in it (more logins from one address wait behind their own
/// first); whoever cannot get in within `wait` of asking, or finds the line full, is turned
/// away ([`Busy`]). Memory held by the work is then bounded by `running` whatever the number of
/// sessions, and one address cannot push the others out of the line.
#[derive(Debug)]
pub struct WorkGate {
    running: Arc<tokio::sync::Semaphore>,
    queue: usize,
    queued: AtomicUsize,
    wait: Duration,
    turns: Arc<Mutex<HashMap<IpAddr, Arc<tokio::sync::Semaphore>>>>,
}

/// Why [`WorkGate::enter`] turned a caller away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Busy {
    /// The waiting line was full.
    #[error("too many checks waiting")]
    Full,
    /// No turn came within the gate's wait.
    #[error("no turn within the wait")]
    Timeout,
}

/// A place to run, from [`WorkGate::enter`]; the next waiter gets it when this drops. Move it
/// into the work (e.g. the `spawn_blocking` closure) so that a cancelled caller does not free
/// it before the work ends.
#[derive(Debug)]
pub struct WorkPermit {
    _run: tokio::sync::OwnedSemaphorePermit,
    _turn: IpTurn,
}

/// An address's one place in line; the address's entry goes when its last holder or waiter
/// does.
#[derive(Debug)]
struct IpTurn {
    ip: IpAddr,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    sem: Option<Arc<tokio::sync::Semaphore>>,
    turns: Arc<Mutex<HashMap<IpAddr, Arc<tokio::sync::Semaphore>>>>,
}

impl Drop for IpTurn {
    fn drop(&mut self) {
        let mut turns = lock(&self.turns);
        drop(self.permit.take());
        if let Some(sem) = self.sem.take() {
            // The map's reference and this one: nobody else waits for this address.
            if Arc::strong_count(&sem) <= 2 {
                turns.remove(&self.ip);
            }
        }
    }
}

/// Takes the waiting-line place back when dropped (also when the waiter is cancelled).
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl WorkGate {
    /// A gate for `running` concurrent jobs (at least 1), `queue` waiters, `wait` at most.
    pub fn new(running: usize, queue: usize, wait: Duration) -> WorkGate {
        WorkGate {
            running: Arc::new(tokio::sync::Semaphore::new(running.max(1))),
            queue,
            queued: AtomicUsize::new(0),
            wait,
            turns: Arc::default(),
        }
    }

    /// Waits for a place to run the work of client `ip` (see the type's docs).
    pub async fn enter(&self, ip: IpAddr) -> Result<WorkPermit, Busy> {
        let deadline = tokio::time::Instant::now() + self.wait;
        let mut turn = IpTurn {
            ip,
            permit: None,
            sem: None,
            turns: self.turns.clone(),
        };
        let sem = {
            let mut turns = lock(&self.turns);
            turns
                .entry(ip)
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(1)))
                .clone()
        };
        turn.sem = Some(sem.clone());
        let permit = tokio::time::timeout_at(deadline, sem.acquire_owned())
            .await
            .map_err(|_| Busy::Timeout)?
            .map_err(|_| Busy::Timeout)?;
        turn.permit = Some(permit);
        if let Ok(run) = self.running.clone().try_acquire_owned() {
            return Ok(WorkPermit {
                _run: run,
                _turn: turn,
            });
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.queue {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(Busy::Full);
        }
        let _queued = Queued(&self.queued);
        let run = tokio::time::timeout_at(deadline, self.running.clone().acquire_owned())
            .await
            .map_err(|_| Busy::Timeout)?
            .map_err(|_| Busy::Timeout)?;
        Ok(WorkPermit {
            _run: run,
            _turn: turn,
        })
    }

    /// How many addresses hold or wait for a place (a bound test's view).
    #[cfg(test)]
    fn addresses(&self) -> usize {
        lock(&self.turns).len()
    }
}

/// Back-off for failing `accept` calls (EMFILE, ENFILE…): wait 100 ms, doubling up to 1 s, and
/// log at most once a second, with the number of errors not logged since.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    delay: Option<Duration>,
    last_log: Option<Instant>,
    unlogged: u64,
}

/// First wait after a failed `accept`.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait after failed `accept`s in a row.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What to do after a failed `accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptPause {
    /// Sleep this long before accepting again.
    pub wait: Duration,
    /// Log now, mentioning this many earlier errors that were not logged; `None`: stay quiet.
    pub log: Option<u64>,
}

impl AcceptBackoff {
    /// An `accept` failed at `now`.
    pub fn failed(&mut self, now: Instant) -> AcceptPause {
        let wait = match self.delay {
            None => ACCEPT_BACKOFF_MIN,
            Some(d) => (d * 2).min(ACCEPT_BACKOFF_MAX),
        };
        self.delay = Some(wait);
        let due = self
            .last_log
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1));
        let log = if due {
            self.last_log = Some(now);
            Some(std::mem::take(&mut self.unlogged))
        } else {
            self.unlogged += 1;
            None
        };
        AcceptPause { wait, log }
    }

    /// An `accept` succeeded: the next failure starts again at the shortest wait.
    pub fn succeeded(&mut self) {
        self.delay = None;
    }
}

/// Descriptors `max_sessions` sessions need: a client and an upstream socket each, plus
/// [`FD_HEADROOM`].
pub fn fds_needed(max_sessions: usize) -> u64 {
    (max_sessions as u64)
        .saturating_mul(2)
        .saturating_add(FD_HEADROOM)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn per_ip_cap_counts_live_sessions_only() {
        let t = IpSessions::new(2);
        let a = t.try_acquire(ip(1)).unwrap();
        let b = t.try_acquire(ip(1)).unwrap();
        assert!(t.try_acquire(ip(1)).is_none(), "third session of one IP");
        let other = t.try_acquire(ip(2)).unwrap();
        assert_eq!(t.count(ip(1)), 2);
        drop(a);
        assert_eq!(t.count(ip(1)), 1);
        let c = t.try_acquire(ip(1)).unwrap();
        drop((b, c, other));
        assert_eq!(t.ips(), 0, "IPs without sessions leave the table");
    }

    #[test]
    fn per_ip_zero_is_unlimited_and_tracks_nothing() {
        let t = IpSessions::new(0);
        let slots: Vec<_> = (0..1000).map(|_| t.try_acquire(ip(1)).unwrap()).collect();
        assert_eq!(t.ips(), 0);
        drop(slots);
    }

    #[test]
    fn per_ip_table_is_bounded_by_live_sessions() {
        let t = IpSessions::new(20);
        for n in 0..10_000 {
            let slot = t.try_acquire(ip(n)).unwrap();
            assert!(t.ips() <= 1);
            drop(slot);
        }
        assert_eq!(t.ips(), 0);
    }

    #[test]
    fn total_cap_follows_an_update() {
        let mut limits = Limits {
            max_sessions: 2,
            ..Limits::default()
        };
        let l = Limiter::new(&limits);
        let a = l.total.try_acquire().unwrap();
        let b = l.total.try_acquire().unwrap();
        assert!(l.total.try_acquire().is_none());
        limits.max_sessions = 1;
        limits.max_sessions_per_ip = 1;
        l.update(&limits);
        drop(a);
        assert!(l.total.try_acquire().is_none(), "still 1 live, cap now 1");
        drop(b);
        let c = l.total.try_acquire().unwrap();
        assert_eq!(l.total.live(), 1);
        drop(c);
        let x = l.sessions.try_acquire(ip(1)).unwrap();
        assert!(
            l.sessions.try_acquire(ip(1)).is_none(),
            "per-IP cap updated"
        );
        drop(x);
    }

    #[test]
    fn delay_schedule() {
        let (base, max) = (S, 15 * S);
        let got: Vec<_> = (1..=9).map(|n| penalty(n, base, max)).collect();
        let want = [0, 0, 1, 2, 4, 8, 15, 15, 15].map(|s| (s > 0).then(|| s * S));
        assert_eq!(got, want);
        assert_eq!(penalty(u32::MAX, base, max), Some(max));
        assert_eq!(penalty(0, base, max), None);
    }

    #[test]
    fn failures_grow_per_ip_and_not_across_ips() {
        let t = LoginThrottle::new(S, 15 * S, 600 * S, 16);
        let now = Instant::now();
        assert_eq!(t.failed(ip(1), now), None);
        assert_eq!(t.failed(ip(1), now), None);
        assert_eq!(t.failed(ip(1), now), Some(S));
        assert_eq!(t.failed(ip(1), now), Some(2 * S));
        // Another IP starts from nothing.
        assert_eq!(t.failed(ip(2), now), None);
        assert_eq!(t.failures(ip(1), now), 4);
        assert_eq!(t.failures(ip(2), now), 1);
    }

    #[test]
    fn failures_are_forgotten_after_the_window() {
        let window = 600 * S;
        let t = LoginThrottle::new(S, 15 * S, window, 16);
        let t0 = Instant::now();
        for _ in 0..5 {
            t.failed(ip(1), t0);
        }
        assert_eq!(
            t.failed(ip(1), t0 + window - S),
            Some(8 * S),
            "inside the window"
        );
        // The window counts from the last failure.
        let later = t0 + 2 * window - 2 * S;
        assert_eq!(t.failures(ip(1), later), 6);
        let after = t0 + 2 * window;
        assert_eq!(t.failures(ip(1), after), 0);
        assert_eq!(t.failed(ip(1), after), None, "a fresh start");
        assert_eq!(t.failures(ip(1), after), 1);
    }

    #[test]
    fn zero_base_disables_the_penalty() {
        let t = LoginThrottle::new(Duration::ZERO, 15 * S, 600 * S, 16);
        let now = Instant::now();
        for _ in 0..10 {
            assert_eq!(t.failed(ip(1), now), None);
        }
        assert!(t.is_empty());
    }

    #[test]
    fn throttle_table_never_exceeds_its_capacity() {
        let t = LoginThrottle::new(S, 15 * S, 600 * S, 100);
        let now = Instant::now();
        // A repeat offender stays while a flood of new addresses passes by, as long as it keeps
        // failing; the flood's oldest addresses are evicted.
        for n in 0..100_000 {
            t.failed(ip(1_000_000 + n), now);
            if n % 50 == 0 {
                t.failed(ip(1), now);
            }
            assert!(t.len() <= 100, "table grew to {}", t.len());
        }
        assert_eq!(t.len(), 100);
        assert!(t.failures(ip(1), now) > 2, "the active offender was kept");
        assert_eq!(t.failures(ip(1_000_000), now), 0, "the oldest was evicted");
    }

    #[test]
    fn accept_backoff_doubles_and_logs_once_a_second() {
        let mut b = AcceptBackoff::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let p = b.failed(t0);
        assert_eq!(
            p,
            AcceptPause {
                wait: ms(100),
                log: Some(0)
            }
        );
        let waits: Vec<_> = (1..=5).map(|i| b.failed(t0 + ms(i * 10)).wait).collect();
        assert_eq!(waits, [ms(200), ms(400), ms(800), ms(1000), ms(1000)]);
        // 20 errors within the same second: none logged.
        for i in 0..20 {
            assert_eq!(b.failed(t0 + ms(100 + i)).log, None);
        }
        // A second later: one line, counting the 25 unlogged ones.
        assert_eq!(b.failed(t0 + ms(1000)).log, Some(25));
        b.succeeded();
        assert_eq!(b.failed(t0 + ms(1001)).wait, ms(100));
    }

    #[test]
    fn fd_budget() {
        assert_eq!(fds_needed(10_000), 20_064);
        assert_eq!(fds_needed(usize::MAX), u64::MAX);
    }

    fn gate_rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    }

    #[test]
    fn gate_runs_at_most_n_and_turns_away_a_full_line_or_a_long_wait() {
        gate_rt().block_on(async {
            let gate = WorkGate::new(2, 1, Duration::from_secs(3));
            let a = gate.enter(ip(1)).await.unwrap();
            let _b = gate.enter(ip(2)).await.unwrap();
            // Third address: waits in line (the only place); fourth finds the line full.
            let waiter = gate.enter(ip(3));
            tokio::pin!(waiter);
            assert!(
                futures_poll_once(waiter.as_mut()).await.is_none(),
                "the third must wait"
            );
            assert_eq!(gate.enter(ip(4)).await.unwrap_err(), Busy::Full);
            // A place frees: the waiter runs.
            drop(a);
            let c = waiter.await.unwrap();
            // Nothing frees within the wait: timed out.
            let started = tokio::time::Instant::now();
            assert_eq!(gate.enter(ip(5)).await.unwrap_err(), Busy::Timeout);
            assert_eq!(started.elapsed(), Duration::from_secs(3));
            drop(c);
        });
    }

    #[test]
    fn gate_gives_one_address_one_place_and_forgets_it_after() {
        gate_rt().block_on(async {
            let gate = WorkGate::new(4, 8, Duration::from_secs(2));
            let first = gate.enter(ip(1)).await.unwrap();
            // A second job of the same address waits for the first, although places are free,
            // and gives up after the wait.
            assert_eq!(gate.enter(ip(1)).await.unwrap_err(), Busy::Timeout);
            let other = gate.enter(ip(2)).await.unwrap();
            assert_eq!(gate.addresses(), 2);
            drop(first);
            let again = gate.enter(ip(1)).await.unwrap();
            drop((again, other));
            assert_eq!(gate.addresses(), 0, "entries go with their last holder");
        });
    }

    /// Polls `f` once: its output if it is ready.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }

    #[test]
    fn pending_is_the_delay_of_the_last_failure() {
        let t = LoginThrottle::new(
            Duration::from_secs(1),
            Duration::from_secs(8),
            Duration::from_secs(60),
            16,
        );
        let now = Instant::now();
        assert_eq!(t.pending(ip(1), now), None);
        for _ in 0..FREE_LOGIN_FAILURES {
            t.failed(ip(1), now);
        }
        assert_eq!(t.pending(ip(1), now), None, "free failures earn nothing");
        let d = t.failed(ip(1), now);
        assert_eq!(t.pending(ip(1), now), d);
        assert_eq!(t.pending(ip(1), now + Duration::from_secs(61)), None);
        assert_eq!(t.pending(ip(2), now), None);
    }
}
