//! Failover state shared by all sessions: upstream addresses that failed at the TCP stage
//! (refused, unreachable, timed out) and until when they are skipped. One for the process's
//! life, carried into each new snapshot like the limiter.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Addresses marked dead, by their configured text (`host:port`).
#[derive(Debug, Default)]
pub struct DeadAddresses {
    until: Mutex<HashMap<String, Instant>>,
}

impl DeadAddresses {
    /// An empty set.
    pub fn new() -> DeadAddresses {
        DeadAddresses::default()
    }

    /// The order to try `addresses` in at `now`: the live ones in configured order, then
    /// (only when every one is dead) all of them in configured order anyway.
    pub fn order<'a>(&self, addresses: &'a [String], now: Instant) -> Vec<&'a str> {
        let mut map = self.until.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, until| *until > now);
        let live: Vec<&str> = addresses
            .iter()
            .filter(|a| !map.contains_key(*a))
            .map(String::as_str)
            .collect();
        if live.is_empty() {
            addresses.iter().map(String::as_str).collect()
        } else {
            live
        }
    }

    /// `address` failed at a stage that fails over: skip it until `until` (the connector's
    /// `MarkDead`).
    pub fn mark_dead(&self, address: &str, until: Instant) {
        let mut map = self.until.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(address.to_owned(), until);
    }

    /// Whether `address` is skipped at `now` (it failed at the TCP stage within its
    /// `dead_for`).
    pub fn is_dead(&self, address: &str, now: Instant) -> bool {
        let map = self.until.lock().unwrap_or_else(|e| e.into_inner());
        map.get(address).is_some_and(|until| *until > now)
    }

    /// `address` accepted a connection: it is alive again.
    pub fn mark_alive(&self, address: &str) {
        let mut map = self.until.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(address);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn dead_addresses_are_skipped_until_all_are_dead_or_the_time_is_up() {
        let d = DeadAddresses::new();
        let addrs = vec!["a:1".to_owned(), "b:2".to_owned(), "c:3".to_owned()];
        let t = Instant::now();
        assert_eq!(d.order(&addrs, t), ["a:1", "b:2", "c:3"]);
        d.mark_dead("a:1", t + Duration::from_secs(10));
        assert_eq!(d.order(&addrs, t), ["b:2", "c:3"]);
        d.mark_dead("b:2", t + Duration::from_secs(10));
        d.mark_dead("c:3", t + Duration::from_secs(10));
        // All dead: tried in order anyway.
        assert_eq!(d.order(&addrs, t), ["a:1", "b:2", "c:3"]);
        d.mark_alive("b:2");
        assert_eq!(d.order(&addrs, t), ["b:2"]);
        // Back-off over.
        assert_eq!(
            d.order(&addrs, t + Duration::from_secs(11)),
            ["a:1", "b:2", "c:3"]
        );
    }
}
