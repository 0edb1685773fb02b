//! Counts, errors and latencies of a run, merged from the workers at the end.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::client::ClientError;

/// What one worker (or the whole run, after merging) saw.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Units of work that completed (sessions, or round trips for `noop`).
    pub ok: u64,
    /// Sessions opened (logged in or not).
    pub sessions: u64,
    /// Body octets read (RETR, LIST).
    pub bytes: u64,
    /// TLS handshakes that resumed an earlier session.
    pub resumed: u64,
    /// Unit latencies in microseconds.
    latencies_us: Vec<u64>,
    /// Errors by kind.
    pub errors: BTreeMap<&'static str, u64>,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
}

/// Percentiles of the recorded latencies, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
    /// Arithmetic mean.
    pub mean: u64,
}

impl Stats {
    /// Record a completed unit and how long it took.
    pub fn record(&mut self, took: Duration) {
        self.ok += 1;
        self.latencies_us
            .push(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }

    /// Count an error.
    pub fn error(&mut self, e: &ClientError) {
        *self.errors.entry(e.kind()).or_default() += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }

    /// All errors.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Add another worker's figures.
    pub fn merge(&mut self, other: Stats) {
        self.ok += other.ok;
        self.sessions += other.sessions;
        self.bytes += other.bytes;
        self.resumed += other.resumed;
        self.latencies_us.extend(other.latencies_us);
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    /// Nearest-rank percentiles (None without samples).
    pub fn percentiles(&mut self) -> Option<Percentiles> {
        let v = &mut self.latencies_us;
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let rank = |p: f64| {
            // Nearest rank: the smallest value with at least p of the samples at or below it.
            let r = (p * v.len() as f64).ceil() as usize;
            v[r.clamp(1, v.len()) - 1]
        };
        let sum: u128 = v.iter().map(|&x| u128::from(x)).sum();
        Some(Percentiles {
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: v[v.len() - 1],
            mean: (sum / v.len() as u128) as u64,
        })
    }

    /// The `latency_us` object of the report.
    pub fn latency_json(&mut self) -> Value {
        match self.percentiles() {
            Some(p) => json!({"p50": p.p50, "p90": p.p90, "p99": p.p99, "max": p.max,
                              "mean": p.mean, "samples": self.latencies_us.len()}),
            None => json!({"samples": 0}),
        }
    }

    /// The `errors` object of the report.
    pub fn errors_json(&self) -> Value {
        json!({"total": self.error_count(), "by_kind": self.errors,
               "first": self.first_error})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let mut s = Stats::default();
        for us in (1..=100).rev() {
            s.record(Duration::from_micros(us));
        }
        let p = s.percentiles();
        assert_eq!(
            p,
            Some(Percentiles {
                p50: 50,
                p90: 90,
                p99: 99,
                max: 100,
                mean: 50
            })
        );
    }

    #[test]
    fn one_sample_is_every_percentile() {
        let mut s = Stats::default();
        s.record(Duration::from_micros(7));
        let p = s.percentiles().map(|p| (p.p50, p.p99, p.max));
        assert_eq!(p, Some((7, 7, 7)));
    }

    #[test]
    fn no_samples_no_percentiles() {
        let mut s = Stats::default();
        assert_eq!(s.percentiles(), None);
        assert_eq!(s.latency_json(), json!({"samples": 0}));
    }

    #[test]
    fn merge_adds_counts_and_errors() {
        let mut a = Stats::default();
        a.record(Duration::from_micros(1));
        a.bytes = 10;
        a.error(&ClientError::Timeout("greeting"));
        let mut b = Stats::default();
        b.record(Duration::from_micros(3));
        b.bytes = 5;
        b.sessions = 2;
        b.error(&ClientError::Timeout("PASS"));
        b.error(&ClientError::Protocol("x".into()));
        a.merge(b);
        assert_eq!((a.ok, a.bytes, a.sessions, a.error_count()), (2, 15, 2, 3));
        assert_eq!(a.errors.get("timeout"), Some(&2));
        assert_eq!(a.first_error.as_deref(), Some("timeout: greeting"));
        assert_eq!(a.percentiles().map(|p| p.max), Some(3));
    }
}
