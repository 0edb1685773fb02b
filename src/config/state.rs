//! `[state]`: where fleet-wide state lives (`local`: in this process; `redis`: shared by every
//! popgate instance that names the same Redis and `key_prefix`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[state]` of the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// `local` (each instance counts for itself) or `redis` (the fleet shares its counts and
    /// OAuth2 tokens).
    pub backend: Backend,
    /// `redis://[user:password@]host[:port][/db]`, `rediss://...` (TLS, verified against the
    /// system's roots) or `unix:///path/to/redis.sock`; required with `backend = "redis"`.
    pub url: Option<String>,
    /// Put before every key popgate writes, so that several fleets can share one Redis.
    pub key_prefix: String,
    /// The longest one store operation may take before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// What the fleet-wide limits do while the store cannot be reached.
    pub on_unavailable: OnUnavailable,
    /// A session slot expires this long after its instance last refreshed it (a third of it
    /// is the refresh period): the slots of an instance that died are free again after it.
    #[serde(with = "humantime_serde")]
    pub slot_ttl: Duration,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            backend: Backend::Local,
            url: None,
            key_prefix: "popgate:".to_owned(),
            timeout: Duration::from_millis(500),
            on_unavailable: OnUnavailable::Open,
            slot_ttl: Duration::from_secs(60),
        }
    }
}

/// `state.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// In this process only.
    #[default]
    Local,
    /// In Redis (or Valkey), shared by the fleet.
    Redis,
}

/// `state.on_unavailable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnUnavailable {
    /// The instance's own limits apply (as with `local`), with a log line and a metric.
    #[default]
    Open,
    /// New sessions are refused while `max_sessions_per_ip` is set, and a failed login is held
    /// back `limits.login_fail_delay_max`; sessions already open go on.
    Closed,
}

/// Shortest `state.slot_ttl`: slots are refreshed every third of it.
pub(crate) const MIN_SLOT_TTL: Duration = Duration::from_secs(3);

impl StateConfig {
    /// Checks the values: `Err((key, reason))`.
    pub(crate) fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.timeout.is_zero() {
            return Err(("state.timeout", "must be more than 0".into()));
        }
        if self.slot_ttl < MIN_SLOT_TTL {
            return Err((
                "state.slot_ttl",
                format!(
                    "must be at least {}",
                    humantime::format_duration(MIN_SLOT_TTL)
                ),
            ));
        }
        match (&self.backend, &self.url) {
            (Backend::Redis, None) => Err((
                "state.url",
                "required with backend = \"redis\" (redis://host:6379)".into(),
            )),
            (Backend::Redis, Some(url)) => {
                redis::IntoConnectionInfo::into_connection_info(url.as_str())
                    .map(|_| ())
                    .map_err(|e| {
                        (
                            "state.url",
                            format!(
                                "not a Redis URL (redis://, rediss://, unix://): {}",
                                redacted(&e.to_string())
                            ),
                        )
                    })
            }
            (Backend::Local, _) => Ok(()),
        }
    }
}

/// `text` with the password of any `scheme://user:password@` in it replaced.
pub(crate) fn redacted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let user = authority[..at].split(':').next().unwrap_or_default();
                out.push_str(user);
                out.push_str(":***");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cfg(url: &str) -> StateConfig {
        StateConfig {
            backend: Backend::Redis,
            url: Some(url.to_owned()),
            ..StateConfig::default()
        }
    }

    #[test]
    fn redis_needs_a_redis_url_and_local_needs_nothing() {
        assert!(StateConfig::default().validate().is_ok());
        for ok in [
            "redis://127.0.0.1:6379",
            "rediss://redis.example.org:6380/2",
            "redis://:secret@10.0.0.1/0",
            "unix:///run/redis/redis.sock",
        ] {
            assert!(cfg(ok).validate().is_ok(), "{ok}");
        }
        assert_eq!(
            StateConfig {
                backend: Backend::Redis,
                ..StateConfig::default()
            }
            .validate()
            .unwrap_err()
            .0,
            "state.url"
        );
        let (key, why) = cfg("http://:hunter2@x/").validate().unwrap_err();
        assert_eq!(key, "state.url");
        assert!(!why.contains("hunter2"), "{why}");
    }

    #[test]
    fn a_slot_ttl_below_the_minimum_is_refused() {
        let c = StateConfig {
            slot_ttl: Duration::from_secs(1),
            ..StateConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "state.slot_ttl");
    }
}
