//! The OAuth2 tokens of the fleet in Redis (`src/oauth2/token.rs` decides when to use them).
//!
//! One hash per token source and mailbox, `oauth2:<source>`: `access`, `expires` (Unix ms),
//! `lifetime` (ms), `refresh` (the current refresh token) and `fence` (the fence of the last
//! write). At most one refresh runs in the fleet: the instance that refreshes holds
//! `oauth2:<source>:lock` (set only if absent, with an expiry of [`LOCK_TTL`]) whose value is
//! its fence, a number from `oauth2:<source>:fence` (INCR). It writes the rotated refresh
//! token and the new access token in one script that refuses a fence not newer than the last
//! write, so a holder whose lock expired cannot overwrite a newer result. The others poll the
//! hash until a fresh token is there or the lock is gone.

use std::time::Duration;

use super::{Store, StoreError};

/// The refresh lock's expiry: longer than one token request may take (15 s) with margin.
pub(crate) const LOCK_TTL: Duration = Duration::from_secs(20);

/// Writes a refreshed token if ARGV[1] (the fence) is newer than the last write's: 1 written,
/// 0 refused (stale fence).
const WRITE_SCRIPT: &str = r"
local last = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
if tonumber(ARGV[1]) <= last then
  return 0
end
redis.call('HSET', KEYS[1], 'fence', ARGV[1], 'access', ARGV[2], 'expires', ARGV[3], 'lifetime', ARGV[4])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'refresh', ARGV[5])
end
return 1
";

/// Deletes the lock if it still holds this fence.
const UNLOCK_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// The token scripts.
pub(crate) struct Scripts {
    write: redis::Script,
    unlock: redis::Script,
}

impl Scripts {
    pub(crate) fn new() -> Scripts {
        Scripts {
            write: redis::Script::new(WRITE_SCRIPT),
            unlock: redis::Script::new(UNLOCK_SCRIPT),
        }
    }
}

/// A token as the fleet holds it.
#[derive(Clone, Default)]
pub(crate) struct SharedToken {
    /// The access token (empty: none yet).
    pub(crate) access: String,
    /// When it expires, Unix ms.
    pub(crate) expires_ms: u64,
    /// Its whole lifetime, ms.
    pub(crate) lifetime_ms: u64,
    /// The current refresh token.
    pub(crate) refresh: Option<String>,
}

impl std::fmt::Debug for SharedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedToken")
            .field("expires_ms", &self.expires_ms)
            .finish_non_exhaustive()
    }
}

/// Now as Unix ms.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Store {
    /// The hash of `source` (its lines joined with `|`: keys stay one line in `redis-cli`).
    fn token_key(&self, source: &str) -> String {
        self.key("oauth2", &source.replace('\n', "|"))
    }

    /// The fleet's token of `source` (token endpoint, client, scope and mailbox).
    pub(crate) async fn token_read(&self, source: &str) -> Result<SharedToken, StoreError> {
        let Some(mut conn) = self.conn() else {
            return Err(StoreError::Redis("no store".into()));
        };
        let cmd = redis::cmd("HGETALL").arg(self.token_key(source)).clone();
        let map: std::collections::HashMap<String, String> =
            self.timed("token_read", cmd.query_async(&mut conn)).await?;
        let num = |k: &str| map.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok(SharedToken {
            access: map.get("access").cloned().unwrap_or_default(),
            expires_ms: num("expires"),
            lifetime_ms: num("lifetime"),
            refresh: map.get("refresh").filter(|r| !r.is_empty()).cloned(),
        })
    }

    /// Tries to take the refresh lock of `source`: its fence, or `None` while another holds
    /// it.
    pub(crate) async fn token_lock(&self, source: &str) -> Result<Option<u64>, StoreError> {
        let Some(mut conn) = self.conn() else {
            return Err(StoreError::Redis("no store".into()));
        };
        let key = self.token_key(source);
        let fence: u64 = self
            .timed(
                "token_lock",
                redis::cmd("INCR")
                    .arg(format!("{key}:fence"))
                    .query_async(&mut conn),
            )
            .await?;
        let ttl = u64::try_from(LOCK_TTL.as_millis()).unwrap_or(u64::MAX);
        let set = redis::cmd("SET")
            .arg(format!("{key}:lock"))
            .arg(fence)
            .arg("NX")
            .arg("PX")
            .arg(ttl)
            .clone();
        let got: Option<String> = self.timed("token_lock", set.query_async(&mut conn)).await?;
        Ok(got.map(|_| fence))
    }

    /// Writes a refreshed token under `fence`: `Ok(false)` when a newer fence wrote first.
    pub(crate) async fn token_write(
        &self,
        source: &str,
        fence: u64,
        token: &SharedToken,
    ) -> Result<bool, StoreError> {
        let (Some(remote), Some(mut conn)) = (&self.remote, self.conn()) else {
            return Err(StoreError::Redis("no store".into()));
        };
        let mut call = remote.tokens.write.key(self.token_key(source));
        call.arg(fence)
            .arg(&token.access)
            .arg(token.expires_ms)
            .arg(token.lifetime_ms)
            .arg(token.refresh.as_deref().unwrap_or_default());
        let n: i64 = self
            .timed("token_write", call.invoke_async(&mut conn))
            .await?;
        Ok(n == 1)
    }

    /// Frees the refresh lock of `source` if it still holds `fence`.
    pub(crate) async fn token_unlock(&self, source: &str, fence: u64) {
        let (Some(remote), Some(mut conn)) = (&self.remote, self.conn()) else {
            return;
        };
        let mut call = remote
            .tokens
            .unlock
            .key(format!("{}:lock", self.token_key(source)));
        call.arg(fence);
        let _ = self
            .timed("token_unlock", call.invoke_async::<i64>(&mut conn))
            .await;
    }
}
