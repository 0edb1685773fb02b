//! Fleet state (`[state]`): with `backend = "redis"` the failed-login penalty, the per-address
//! session cap and the OAuth2 tokens are shared by every popgate instance that uses the same
//! Redis (or Valkey) and `key_prefix`; with `local` (the default) each instance keeps its own,
//! as before. The store is one for the process's life (like the limiter): `[state]` changes
//! need a restart.
//!
//! Keys (all under `key_prefix`, see `docs/fleet.md`):
//! - `fail:<address>`: failed logins of a client address (IPv4) or /64 (IPv6), a counter that
//!   expires `limits.login_fail_window` after the last failure;
//! - `sessions:<address>`: live session slots, a sorted set of `<instance>:<slot>` scored by
//!   their expiry (ms); the owning instance refreshes its members every `slot_ttl / 3`, so the
//!   slots of an instance that died expire after `slot_ttl`;
//! - `oauth2:<source>` (a hash: access token, expiry, refresh token, last fence) with its
//!   `:lock` and `:fence` (see `src/state/tokens.rs`).
//!
//! When Redis cannot be reached within `timeout`: a warning (once per outage), the
//! `popgate_state_errors` metric, `/health` degraded, and `on_unavailable` decides the
//! limits; a session in progress is never cut. The heartbeat notices Redis coming back and
//! writes the live slots again, so counts converge without a restart.

pub(crate) mod tokens;

use crate::config::state::redacted;
pub use crate::config::state::{Backend, OnUnavailable, StateConfig};

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

use crate::limits::{Counters, Limiter, penalty};
use crate::metrics::Metrics;

/// A store operation failed; the text names no password.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// No answer within `state.timeout`.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Redis refused or the connection failed.
    #[error("{0}")]
    Redis(String),
}

/// The key part naming a client: the address for IPv4, its /64 for IPv6 (one host's
/// addresses).
pub(crate) fn address_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// After a failed operation, sessions do not ask the store again for this long.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Adds one failure with a fresh expiry; returns the count.
const FAIL_SCRIPT: &str = r"
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return n
";

/// Takes a slot if fewer than ARGV[2] unexpired ones exist: 1 taken, 0 full.
const ACQUIRE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// Refreshes (or writes again, after Redis lost them) this instance's live slots: KEYS[i]
/// holds member ARGV[i + 1]; ARGV[1] is the time to live (ms).
const HEARTBEAT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl)
end
return #KEYS
";

/// The Redis side of the store.
struct Remote {
    conn: ConnectionManager,
    fail: redis::Script,
    acquire: redis::Script,
    heartbeat: redis::Script,
    tokens: tokens::Scripts,
}

/// Fleet state of this process: local, or shared through Redis.
pub(crate) struct Store {
    cfg: StateConfig,
    remote: Option<Remote>,
    limiter: Arc<Limiter>,
    metrics: Arc<Metrics>,
    /// Whether the last store operation succeeded (always true with `local`).
    up: AtomicBool,
    /// When the last operation failed (ms since `epoch`): for [`RETRY_AFTER`] after it,
    /// sessions do not wait for the store again (the heartbeat still tries).
    failed_at: AtomicU64,
    epoch: Instant,
    /// Names this process's slot members: host, pid and start time.
    instance: String,
    /// This process's live fleet slots: id -> (key, member).
    slots: Mutex<HashMap<u64, (String, String)>>,
    next_slot: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.cfg.backend)
            .field("key_prefix", &self.cfg.key_prefix)
            .field("up", &self.up.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The store the process-wide OAuth2 token cache shares tokens through (`None`: local).
static TOKEN_STORE: RwLock<Option<Arc<Store>>> = RwLock::new(None);

/// The store of the OAuth2 token cache, when it is Redis.
pub(crate) fn token_store() -> Option<Arc<Store>> {
    TOKEN_STORE
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// Opens the connection to Redis lazily (nothing is dialled here).
fn connect(cfg: &StateConfig) -> Result<ConnectionManager, StoreError> {
    let url = cfg.url.as_deref().unwrap_or_default();
    let client =
        redis::Client::open(url).map_err(|e| StoreError::Redis(redacted(&e.to_string())))?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(cfg.timeout))
        .set_response_timeout(Some(cfg.timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(1));
    ConnectionManager::new_lazy_with_config(client, config)
        .map_err(|e| StoreError::Redis(redacted(&e.to_string())))
}

impl Store {
    /// The store of `cfg`, recording into `metrics`. Needs a tokio runtime (the connection is opened lazily,
    /// on first use).
    pub(crate) fn new(
        cfg: &StateConfig,
        limiter: Arc<Limiter>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Store>, StoreError> {
        let remote = match cfg.backend {
            Backend::Local => None,
            Backend::Redis => Some(Remote {
                conn: connect(cfg)?,
                fail: redis::Script::new(FAIL_SCRIPT),
                acquire: redis::Script::new(ACQUIRE_SCRIPT),
                heartbeat: redis::Script::new(HEARTBEAT_SCRIPT),
                tokens: tokens::Scripts::new(),
            }),
        };
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let store = Arc::new(Store {
            cfg: cfg.clone(),
            remote,
            limiter,
            metrics,
            up: AtomicBool::new(true),
            failed_at: AtomicU64::new(0),
            epoch: Instant::now(),
            instance: format!(
                "{}/{}/{started}",
                gethostname::gethostname().to_string_lossy(),
                std::process::id()
            ),
            slots: Mutex::new(HashMap::new()),
            next_slot: AtomicU64::new(1),
        });
        store
            .metrics
            .state_configured(store.is_remote().then_some(cfg.on_unavailable));
        Ok(store)
    }

    /// Makes this the store of the process-wide OAuth2 token cache, when it is Redis (the
    /// cache is process-wide, so is its link to the fleet).
    pub(crate) fn share_tokens(self: &Arc<Self>) {
        if self.is_remote() {
            *TOKEN_STORE
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(self.clone());
        }
    }

    /// Whether state is shared through Redis.
    pub(crate) fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    fn key(&self, kind: &str, rest: &str) -> String {
        format!("{}{kind}:{rest}", self.cfg.key_prefix)
    }

    /// Whether the store failed within [`RETRY_AFTER`]: sessions then take the
    /// `on_unavailable` path at once instead of each waiting for a dead store.
    fn recently_down(&self) -> bool {
        if self.up.load(Ordering::Relaxed) {
            return false;
        }
        let at = Duration::from_millis(self.failed_at.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(at) < RETRY_AFTER
    }

    /// Runs one store operation `op` (a metric label) within the timeout, recording its
    /// latency, its failure and the store's state.
    async fn timed<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        if op != "ping" && op != "heartbeat" && self.recently_down() {
            self.metrics.state_error(op);
            return Err(StoreError::Redis("unreachable a moment ago".into()));
        }
        let started = Instant::now();
        let result = match tokio::time::timeout(self.cfg.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Redis(redacted(&e.to_string()))),
            Err(_) => Err(StoreError::Timeout(self.cfg.timeout)),
        };
        self.metrics.state_op(op, started.elapsed(), result.is_ok());
        self.mark(result.as_ref().err());
        result
    }

    /// Records whether the store answered; logs the change.
    fn mark(&self, error: Option<&StoreError>) {
        let up = error.is_none();
        if !up {
            let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.failed_at.store(ms, Ordering::Relaxed);
        }
        if self.up.swap(up, Ordering::Relaxed) != up {
            self.metrics.state_up(up);
            match error {
                Some(e) => tracing::warn!(
                    error = %e,
                    on_unavailable = ?self.cfg.on_unavailable,
                    "state store unreachable: fleet-wide limits and tokens degraded"
                ),
                None => tracing::info!("state store reachable again"),
            }
        }
    }

    fn conn(&self) -> Option<ConnectionManager> {
        self.remote.as_ref().map(|r| r.conn.clone())
    }

    /// A login from `ip` failed: records it (in the instance's table, and with `redis` in the
    /// fleet's) and returns how long to hold the failure reply. With `redis` the delay follows
    /// the fleet's count; while the store is unreachable, `on_unavailable` decides (open: the
    /// instance's own count; closed: the longest delay).
    pub(crate) async fn login_failed(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let local = self.limiter.login_failed(ip, now);
        let (Some(remote), Some(mut conn)) = (&self.remote, self.conn()) else {
            return local;
        };
        let p = self.limiter.logins.params();
        if p.base.is_zero() {
            return None;
        }
        let key = self.key("fail", &address_key(ip));
        let window = u64::try_from(p.window.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut call = remote.fail.key(&key);
        call.arg(window);
        let counted: Result<u32, _> = self
            .timed("login_failed", call.invoke_async(&mut conn))
            .await;
        let delay = match counted {
            Ok(n) => penalty(n, p.base, p.max),
            Err(_) => match self.cfg.on_unavailable {
                OnUnavailable::Open => return local,
                OnUnavailable::Closed => Some(p.max),
            },
        };
        if delay.is_some() && local.is_none() {
            Counters::bump(&self.limiter.counters.logins_delayed);
        }
        delay
    }

    /// A fleet-wide session slot for client `ip` under `limits.max_sessions_per_ip`, taken
    /// after the instance's own slot. `Ok(None)`: nothing to hold (`local`, no cap, or the
    /// store unreachable with `on_unavailable = "open"`); `Err`: why the session is refused.
    pub(crate) async fn acquire_session(
        self: &Arc<Self>,
        ip: IpAddr,
    ) -> Result<Option<FleetSlot>, Refused> {
        let max = self.limiter.sessions.max();
        let (Some(remote), Some(mut conn)) = (&self.remote, self.conn()) else {
            return Ok(None);
        };
        if max == 0 {
            return Ok(None);
        }
        let id = self.next_slot.fetch_add(1, Ordering::Relaxed);
        let key = self.key("sessions", &address_key(ip));
        let member = format!("{}:{id}", self.instance);
        let mut call = remote.acquire.key(&key);
        call.arg(&member).arg(max).arg(self.ttl_ms());
        // Registered first, so that a heartbeat running meanwhile does not miss it.
        lock(&self.slots).insert(id, (key.clone(), member.clone()));
        let slot = FleetSlot {
            store: self.clone(),
            id,
        };
        match self
            .timed("acquire_session", call.invoke_async::<i64>(&mut conn))
            .await
        {
            Ok(1) => Ok(Some(slot)),
            Ok(_) => {
                // Not in Redis: nothing to free.
                lock(&self.slots).remove(&id);
                Err(Refused::Full)
            }
            Err(_) => match self.cfg.on_unavailable {
                // Kept: the heartbeat writes it once the store is back.
                OnUnavailable::Open => Ok(Some(slot)),
                OnUnavailable::Closed => {
                    lock(&self.slots).remove(&id);
                    Err(Refused::Unavailable)
                }
            },
        }
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.cfg.slot_ttl.as_millis()).unwrap_or(u64::MAX)
    }

    /// Frees slot `id` (a session ended).
    fn release(self: &Arc<Self>, id: u64) {
        let Some((key, member)) = lock(&self.slots).remove(&id) else {
            return;
        };
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.clone();
        handle.spawn(async move {
            if let Some(mut conn) = store.conn() {
                let cmd = redis::cmd("ZREM").arg(&key).arg(&member).clone();
                let _ = store
                    .timed("release_session", cmd.query_async::<i64>(&mut conn))
                    .await;
            }
        });
    }

    /// One heartbeat: refreshes (or writes again) every live slot of this instance; without
    /// slots, a PING, so that `/health` follows the store either way.
    pub(crate) async fn heartbeat(&self) -> Result<(), StoreError> {
        let (Some(remote), Some(mut conn)) = (&self.remote, self.conn()) else {
            return Ok(());
        };
        let live: Vec<(String, String)> = lock(&self.slots).values().cloned().collect();
        if live.is_empty() {
            return self
                .timed("ping", redis::cmd("PING").query_async::<String>(&mut conn))
                .await
                .map(drop);
        }
        // In batches, so that one script call stays short however many sessions are live.
        for batch in live.chunks(500) {
            let mut call = remote.heartbeat.prepare_invoke();
            call.arg(self.ttl_ms());
            for (key, member) in batch {
                call.key(key).arg(member);
            }
            self.timed("heartbeat", call.invoke_async::<i64>(&mut conn))
                .await?;
        }
        Ok(())
    }

    /// Runs [`Store::heartbeat`] every third of `slot_ttl` until `stop` turns true.
    pub(crate) async fn run_heartbeat(
        self: Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        if !self.is_remote() {
            return;
        }
        let period = self.cfg.slot_ttl / 3;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => { let _ = self.heartbeat().await; }
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        return;
                    }
                }
            }
        }
    }
}

/// Why [`Store::acquire_session`] refused a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The address has `max_sessions_per_ip` sessions in the fleet.
    Full,
    /// The store does not answer and `on_unavailable = "closed"`.
    Unavailable,
}

/// A fleet-wide session slot; dropping it frees it in Redis (and stops its heartbeat).
#[derive(Debug)]
#[must_use = "the slot is freed when dropped"]
pub(crate) struct FleetSlot {
    store: Arc<Store>,
    id: u64,
}

impl Drop for FleetSlot {
    fn drop(&mut self) {
        self.store.release(self.id);
    }
}

/// What `popgate check` found about `[state]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateCheck {
    /// `backend = "local"`: nothing to check.
    Local,
    /// The store answered a round trip: a line saying so.
    Ok(String),
    /// The store could not be reached but `on_unavailable = "open"`: popgate runs on its
    /// instance's own limits until it can (a warning).
    Unreachable(String),
    /// The store refused (password, ACL, TLS, a read-only replica), or could not be reached
    /// with `on_unavailable = "closed"`: an error.
    Failed(String),
}

/// `popgate check` for `[state]`: connect (with the URL's credentials, and TLS for
/// `rediss://`), write a key of its own, read it back, delete it, each within `timeout`.
/// A refusal is an error (a configuration mistake an admin wants to hear about before the
/// fleet silently counts per instance); a store that is merely down is a warning with
/// `on_unavailable = "open"` (popgate works without it) and an error with `closed`.
pub async fn check(cfg: &StateConfig) -> StateCheck {
    if cfg.backend == Backend::Local {
        return StateCheck::Local;
    }
    let url = redacted(cfg.url.as_deref().unwrap_or_default());
    let started = Instant::now();
    let result = tokio::time::timeout(cfg.timeout.max(Duration::from_secs(2)), async {
        let client = redis::Client::open(cfg.url.as_deref().unwrap_or_default())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let key = format!("{}check:{}", cfg.key_prefix, std::process::id());
        let value = format!(
            "{:x}",
            started.elapsed().as_nanos() ^ u128::from(std::process::id())
        );
        redis::cmd("SET")
            .arg(&key)
            .arg(&value)
            .arg("PX")
            .arg(10_000)
            .query_async::<()>(&mut conn)
            .await?;
        let got: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
        redis::cmd("DEL")
            .arg(&key)
            .query_async::<i64>(&mut conn)
            .await?;
        Ok::<_, redis::RedisError>(got == Some(value))
    })
    .await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let down = |why: String| match cfg.on_unavailable {
        OnUnavailable::Open => StateCheck::Unreachable(format!(
            "state: redis {url} cannot be reached ({why}); with on_unavailable = \"open\" each \
             instance counts for itself until it can"
        )),
        OnUnavailable::Closed => StateCheck::Failed(format!(
            "state: redis {url} cannot be reached ({why}); with on_unavailable = \"closed\" new \
             sessions would be refused"
        )),
    };
    match result {
        Ok(Ok(true)) => StateCheck::Ok(format!(
            "state: redis {url} answered a write, a read and a delete in {ms:.1} ms"
        )),
        Ok(Ok(false)) => StateCheck::Failed(format!(
            "state: redis {url}: a key written was not read back (a read-only replica?)"
        )),
        Ok(Err(e))
            if (e.is_io_error() || e.is_timeout() || e.is_connection_refusal())
                && !e.to_string().to_ascii_lowercase().contains("certificate") =>
        {
            down(redacted(&e.to_string()))
        }
        Ok(Err(e)) => {
            StateCheck::Failed(format!("state: redis {url}: {}", redacted(&e.to_string())))
        }
        Err(_) => down(format!(
            "no answer within {:?}",
            cfg.timeout.max(Duration::from_secs(2))
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ipv6_clients_count_per_64_and_ipv4_per_address() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        assert_eq!(address_key(a), "2001:db8:1:2::/64");
        assert_eq!(address_key("192.0.2.7".parse().unwrap()), "192.0.2.7");
        assert_eq!(
            address_key("::ffff:192.0.2.7".parse().unwrap()),
            "192.0.2.7"
        );
    }

    #[test]
    fn passwords_in_urls_are_not_shown() {
        assert_eq!(
            redacted("redis://:s3cret@10.0.0.1:6379/0"),
            "redis://:***@10.0.0.1:6379/0"
        );
        assert_eq!(
            redacted("cannot open rediss://app:pw@r:1 now"),
            "cannot open rediss://app:***@r:1 now"
        );
        assert_eq!(redacted("redis://r:6379"), "redis://r:6379");
    }
}
