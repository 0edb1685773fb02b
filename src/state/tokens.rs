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

/// Against a real `redis-server` (started here on a free loopback port; `#[ignore]`d like
/// the other tests that need a peer: `cargo test -- --include-ignored` after `.ci/run`).
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::sync::Arc;

    use super::*;
    use crate::config::Config;
    use crate::limits::Limiter;
    use crate::metrics::Metrics;
    use crate::state::StateConfig;

    struct Server(std::process::Child, u16);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn server() -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--port",
            ])
            .arg(port.to_string())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        // Killed and reaped on drop, also when it never answers.
        let server = Server(child, port);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start");
    }

    fn store(port: u16) -> Arc<Store> {
        let text = format!(
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\n\
             [upstream]\naddress = \"127.0.0.1:110\"\n\
             [state]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:{port}\"\n"
        );
        let config = Config::parse(&text, std::path::Path::new("t")).unwrap();
        let limiter = Arc::new(Limiter::new(&config.limits));
        let metrics = Arc::new(Metrics::new(
            &config,
            std::iter::empty(),
            crate::audit::AuditSink::disabled(),
            limiter.clone(),
        ));
        let cfg: &StateConfig = &config.state;
        Store::new(cfg, limiter, metrics).unwrap()
    }

    fn token(access: &str, refresh: &str) -> SharedToken {
        SharedToken {
            access: access.into(),
            expires_ms: unix_ms() + 60_000,
            lifetime_ms: 60_000,
            refresh: Some(refresh.into()),
        }
    }

    #[tokio::test]
    #[ignore = "needs redis-server (run .ci/run)"]
    async fn one_lock_holder_at_a_time_and_a_stale_fence_cannot_overwrite_a_newer_write() {
        let redis = server();
        let (a, b) = (store(redis.1), store(redis.1));
        let src = "https://idp/token\nclient\n\nRefreshToken\nalice";
        let fa = a.token_lock(src).await.unwrap().expect("a gets the lock");
        assert_eq!(b.token_lock(src).await.unwrap(), None, "b waits");
        // a's lock is treated as expired: b takes the lock by force and writes first.
        b.token_unlock(src, fa).await;
        let fb = b.token_lock(src).await.unwrap().expect("b gets the lock");
        assert!(fb > fa, "fences grow");
        assert!(b.token_write(src, fb, &token("B", "R-b")).await.unwrap());
        // a, late, with its older fence: refused, b's rotated token stays.
        assert!(!a.token_write(src, fa, &token("A", "R-a")).await.unwrap());
        let t = a.token_read(src).await.unwrap();
        assert_eq!(
            (t.access.as_str(), t.refresh.as_deref()),
            ("B", Some("R-b"))
        );
        // Unlocking with a fence that no longer holds the lock leaves it.
        a.token_unlock(src, fa).await;
        assert_eq!(a.token_lock(src).await.unwrap(), None, "b still holds it");
        b.token_unlock(src, fb).await;
        assert!(a.token_lock(src).await.unwrap().is_some());
    }
}
