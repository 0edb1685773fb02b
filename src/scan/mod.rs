//! Content scanning (issue 23): the held body of a retrieved message ([`Spool`]) and the
//! scanners it is sent to ([`Scanners`]: clamd, rspamd), each over its own protocol. A service
//! with I/O: the session driver fills the spool and awaits the reports; the protocol core
//! decides what they mean for the client (`docs/scanning.md`).

mod clamd;
mod rspamd;
mod spool;

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

pub use spool::Spool;

use crate::config::scan::{ScanConfig, ScannerConfig, ScannerKind};
use crate::types::{ScanReport, ScanVerdict};

/// The longest `popgate check` waits for one scanner's answer to its ping (or the
/// scanner's `timeout`, if shorter).
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// What a scanner said about a message, before naming and timing.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Finding {
    pub(crate) verdict: ScanVerdict,
    pub(crate) detail: Option<String>,
    pub(crate) score: Option<(f64, f64)>,
}

impl Finding {
    /// Nothing found.
    pub(crate) fn clean() -> Finding {
        Finding {
            verdict: ScanVerdict::Clean,
            detail: None,
            score: None,
        }
    }
}

/// Why a scan (or a scanner's ping) gave no verdict; its text is the report's `detail`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ScanError {
    /// The scanner could not be reached.
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    /// The connection broke, or the spool could not be read.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// The scanner did not answer within its `timeout` (queueing for a scan slot included).
    #[error("timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The reply was longer than a scanner's reply can be.
    #[error("the reply is longer than {0} octets")]
    ReplyTooLong(usize),
    /// The scanner closed the connection without a reply.
    #[error("closed the connection without a reply")]
    NoReply,
    /// An HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(String),
    /// The scanner said it could not scan the message.
    #[error("{0}")]
    Refused(String),
    /// A reply that is not the scanner's protocol.
    #[error("unexpected reply: {0}")]
    Unexpected(String),
}

/// Text from a scanner, fit for logs, headers and the audit trail: surrounding white space
/// trimmed, bytes that are not printable ASCII replaced with `?`.
pub(crate) fn printable(bytes: &[u8]) -> String {
    bytes
        .trim_ascii()
        .iter()
        .map(|&b| match b {
            0x20..=0x7e => b as char,
            b'\t' => ' ',
            _ => '?',
        })
        .collect()
}

/// A `[[scanner]]` entry that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct ScannerError {
    /// Which: `scanner "clamav"`.
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

/// How to talk to one scanner.
#[derive(Debug)]
enum Backend {
    Clamd(clamd::Address),
    Rspamd(rspamd::Client),
}

/// One `[[scanner]]`.
#[derive(Debug)]
struct Scanner {
    name: Arc<str>,
    timeout: Duration,
    max_size: u64,
    backend: Backend,
}

impl Scanner {
    fn new(c: &ScannerConfig) -> Result<Scanner, ScannerError> {
        let invalid = |reason: String| ScannerError {
            key: format!("scanner {:?}", c.name),
            reason,
        };
        let backend = match c.kind {
            ScannerKind::Clamd => {
                Backend::Clamd(clamd::Address::parse(&c.address).map_err(invalid)?)
            }
            ScannerKind::Rspamd => {
                Backend::Rspamd(rspamd::Client::new(&c.address).map_err(invalid)?)
            }
        };
        Ok(Scanner {
            name: c.name.as_str().into(),
            timeout: c.timeout,
            max_size: c.max_size.0,
            backend,
        })
    }

    async fn scan(&self, spool: &Spool) -> Result<Finding, ScanError> {
        match &self.backend {
            Backend::Clamd(a) => clamd::scan(a, spool).await,
            Backend::Rspamd(c) => c.scan(spool).await,
        }
    }

    async fn ping(&self) -> Result<(), ScanError> {
        match &self.backend {
            Backend::Clamd(a) => clamd::ping(a).await,
            Backend::Rspamd(c) => c.ping().await,
        }
    }
}

/// The `[[scanner]]`s of one config and the `[scan]` settings the spools use; built once per
/// config (a reload builds a new one). Scans of all sessions share `max_concurrent` slots.
#[derive(Debug)]
pub struct Scanners {
    scanners: Vec<Scanner>,
    /// `max_concurrent` scans at once (one slot per scanner and message).
    slots: Semaphore,
    /// `[scan]`, for [`Scanners::spool`].
    config: ScanConfig,
    /// The memory the spools of all sessions share: `spool_memory` times `max_concurrent`.
    budget: Arc<spool::MemoryBudget>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Scanners {
    /// The scanners of a config (validated: names unique, addresses parse). Nothing is
    /// connected or created yet.
    pub fn new(scanners: &[ScannerConfig], scan: &ScanConfig) -> Result<Scanners, ScannerError> {
        Ok(Scanners {
            scanners: scanners
                .iter()
                .map(Scanner::new)
                .collect::<Result<_, _>>()?,
            slots: Semaphore::new(scan.max_concurrent.clamp(1, Semaphore::MAX_PERMITS)),
            config: scan.clone(),
            budget: Arc::new(spool::MemoryBudget::new(
                scan.spool_memory
                    .0
                    .saturating_mul(scan.max_concurrent.max(1) as u64),
            )),
            metrics: None,
        })
    }

    /// The same, recording scans and spooled bytes into `metrics` (their series start at 0).
    pub(crate) fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Scanners {
        metrics.scanners_configured(self.scanners.iter().map(|s| &*s.name));
        self.metrics = Some(metrics);
        self
    }

    /// An empty spool for a message to scan, with the `[scan]` settings (and the metrics).
    pub fn spool(&self) -> Spool {
        Spool::with_metrics(&self.config, self.metrics.clone()).within(self.budget.clone())
    }

    /// Scan the message in `spool` with the scanners `names`, all at once; one report per
    /// name, in the order given. Each scan is bounded by its scanner's `timeout` (waiting for
    /// a slot included): past it, or when the scanner fails, the verdict is `Error`. A message
    /// over a scanner's `max_size` is `TooLarge` without contacting it; a name that is no
    /// `[[scanner]]` is `Error`.
    pub async fn scan(&self, names: &[Arc<str>], spool: &Spool) -> Vec<ScanReport> {
        futures_util::future::join_all(names.iter().map(|n| self.scan_one(n, spool))).await
    }

    async fn scan_one(&self, name: &Arc<str>, spool: &Spool) -> ScanReport {
        let started = Instant::now();
        let Some(scanner) = self.scanners.iter().find(|s| s.name == *name) else {
            return ScanReport {
                scanner: name.clone(),
                verdict: ScanVerdict::Error,
                detail: Some("no [[scanner]] of this name".into()),
                score: None,
                duration: Duration::ZERO,
            };
        };
        let outcome = if spool.len() > scanner.max_size {
            Ok(Finding {
                verdict: ScanVerdict::TooLarge,
                detail: None,
                score: None,
            })
        } else {
            let scan = async {
                let _slot = self.slots.acquire().await;
                scanner.scan(spool).await
            };
            tokio::time::timeout(scanner.timeout, scan)
                .await
                .unwrap_or(Err(ScanError::Timeout(scanner.timeout)))
        };
        let finding = outcome.unwrap_or_else(|e| Finding {
            verdict: ScanVerdict::Error,
            detail: Some(e.to_string()),
            score: None,
        });
        let duration = started.elapsed();
        if let Some(m) = &self.metrics {
            m.scanned(name, finding.verdict.as_str(), duration);
        }
        tracing::debug!(
            scanner = %name,
            verdict = finding.verdict.as_str(),
            detail = finding.detail.as_deref().unwrap_or(""),
            octets = spool.len(),
            ms = duration.as_millis() as u64,
            "scanned"
        );
        ScanReport {
            scanner: scanner.name.clone(),
            verdict: finding.verdict,
            detail: finding.detail,
            score: finding.score,
            duration,
        }
    }

    /// Whether each scanner answers (clamd `PING`, rspamd `GET /ping`), in config order.
    pub async fn check(&self) -> Vec<(Arc<str>, Result<(), String>)> {
        futures_util::future::join_all(
            self.scanners
                .iter()
                .map(|s| async move { (s.name.clone(), s.check().await) }),
        )
        .await
    }
}

impl Scanner {
    /// Its ping, bounded by its `timeout` or [`CHECK_TIMEOUT`], whichever is shorter.
    async fn check(&self) -> Result<(), String> {
        let limit = self.timeout.min(CHECK_TIMEOUT);
        tokio::time::timeout(limit, self.ping())
            .await
            .unwrap_or(Err(ScanError::Timeout(limit)))
            .map_err(|e| e.to_string())
    }
}

/// What `popgate check` asks of the `[[scanner]]`s of a config: whether each answers its ping
/// (in config order); nothing is created or started.
pub async fn check(scanners: &[ScannerConfig]) -> Vec<(Arc<str>, Result<(), String>)> {
    futures_util::future::join_all(scanners.iter().map(|c| async move {
        match Scanner::new(c) {
            Ok(s) => (s.name.clone(), s.check().await),
            Err(e) => (c.name.as_str().into(), Err(e.reason)),
        }
    }))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ByteSize;

    fn metrics() -> Arc<crate::metrics::Metrics> {
        Arc::new(crate::metrics::Metrics::for_tests())
    }

    fn scanner(name: &str, address: &str, max_size: u64) -> ScannerConfig {
        ScannerConfig {
            name: name.into(),
            kind: ScannerKind::Clamd,
            address: address.into(),
            timeout: Duration::from_secs(5),
            max_size: ByteSize(max_size),
        }
    }

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[tokio::test]
    async fn the_spools_of_all_sessions_hold_at_most_spool_memory_times_max_concurrent() {
        let dir = tempfile::tempdir().unwrap();
        let config = ScanConfig {
            spool_memory: ByteSize(1000),
            spool_dir: dir.path().to_owned(),
            max_concurrent: 2,
            ..ScanConfig::default()
        };
        let scanners = Scanners::new(&[], &config).unwrap();
        let mut spools = Vec::new();
        for _ in 0..3 {
            let mut s = scanners.spool();
            s.write(&[b'x'; 900]).await.unwrap();
            spools.push(s);
        }
        let on_disk: Vec<bool> = spools.iter().map(Spool::on_disk).collect();
        assert_eq!(on_disk, [false, false, true]);
    }

    #[tokio::test]
    async fn scans_and_spooled_bytes_are_counted_by_scanner_verdict_and_place() {
        let dir = tempfile::tempdir().unwrap();
        let config = ScanConfig {
            spool_memory: ByteSize(100),
            spool_dir: dir.path().to_owned(),
            ..ScanConfig::default()
        };
        // Nothing listens on port 1 of loopback: connecting is refused at once.
        let m = metrics();
        let scanners = Scanners::new(
            &[
                scanner("small", "127.0.0.1:1", 10),
                scanner("down", "127.0.0.1:1", 1000),
            ],
            &config,
        )
        .unwrap()
        .with_metrics(m.clone());
        let text = m.encode();
        assert_eq!(
            sample(
                &text,
                r#"popgate_scans_total{scanner="down",verdict="infected"}"#
            ),
            Some(0.0)
        );
        {
            let mut small = scanners.spool();
            small.write(b"0123456789ab").await.unwrap();
            let names: Vec<Arc<str>> = vec!["small".into(), "down".into(), "nope".into()];
            let r = scanners.scan(&names, &small).await;
            let verdicts: Vec<_> = r.iter().map(|r| r.verdict).collect();
            assert_eq!(
                verdicts,
                [
                    ScanVerdict::TooLarge,
                    ScanVerdict::Error,
                    ScanVerdict::Error
                ]
            );
            let mut big = scanners.spool();
            big.write(&[b'x'; 150]).await.unwrap();
        }
        let text = m.encode();
        for (series, want) in [
            (
                r#"popgate_scans_total{scanner="small",verdict="too_large"}"#,
                1.0,
            ),
            (
                r#"popgate_scans_total{scanner="down",verdict="error"}"#,
                1.0,
            ),
            (
                r#"popgate_scan_duration_seconds_count{scanner="down"}"#,
                1.0,
            ),
            (r#"popgate_scan_spooled_bytes_total{to="memory"}"#, 12.0),
            (r#"popgate_scan_spooled_bytes_total{to="file"}"#, 150.0),
        ] {
            assert_eq!(sample(&text, series), Some(want), "{series} in\n{text}");
        }
        // An unknown name is no label value.
        assert!(!text.contains("nope"));
    }

    #[test]
    fn scanner_text_is_made_printable_and_trimmed() {
        assert_eq!(
            printable(b"  Eicar\tTest\x07\xc3\xa9 \r\n"),
            "Eicar Test???"
        );
    }
}
