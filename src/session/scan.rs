//! The driver's side of content scanning (issue 23): the held body (a [`Spool`]) and the scan
//! in flight, which owns the spool while the scanners read it and hands it back with the
//! reports. The hop decides what is held and what the client gets; this only carries it out.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::proxy::ScanRequest;
use crate::scan::{Scanners, Spool};
use crate::types::{ScanReport, ScanVerdict};

/// A scan in flight: resolves to the spool it was given and one report per scanner asked.
pub(super) type InFlight = Pin<Box<dyn Future<Output = (Spool, Vec<ScanReport>)> + Send>>;

/// The spool of the retrieval being held, and its scan once asked for. Boxed in the driver:
/// a session that scans nothing carries a null pointer.
#[derive(Default)]
pub(super) struct Held {
    /// The body so far (created by the first `Output::Spool`); `None` while a scan has it.
    pub(super) spool: Option<Spool>,
    /// The scan of `spool`, from `Output::Scan` until its verdict.
    pub(super) scan: Option<InFlight>,
    /// Writing the spool failed: the rest of its body is dropped, not spooled again.
    pub(super) failed: bool,
}

/// What the hop does with verdicts under `config` (`[[scanner]]` sizes, `[scan]`): built with
/// each config snapshot, shared by its sessions.
pub(crate) fn scan_policy(config: &crate::config::Config) -> Arc<crate::proxy::scan::ScanPolicy> {
    Arc::new(crate::proxy::scan::ScanPolicy::new(
        &config.scanners,
        &config.scan,
    ))
}

/// Start scanning `spool` as `req` asks. Without scanners (none configured, which config
/// validation and `popgate check` prevent with a `scan` rule in force) every scanner asked is
/// an `error`, so the policy's `on_error` decides, as for a scanner that is down.
pub(super) fn start(scanners: Option<Arc<Scanners>>, req: ScanRequest, spool: Spool) -> InFlight {
    Box::pin(async move {
        let reports = match scanners {
            Some(s) => s.scan(&req.scanners, &spool).await,
            None => req
                .scanners
                .iter()
                .map(|name| ScanReport {
                    scanner: name.clone(),
                    verdict: ScanVerdict::Error,
                    detail: Some("no scanners configured".to_owned()),
                    score: None,
                    duration: Duration::ZERO,
                })
                .collect(),
        };
        (spool, reports)
    })
}

/// The verdict of the scan in flight, if there is one; never resolves otherwise (a branch of
/// the driver's `select!` that stays pending).
pub(super) async fn verdict(held: &mut Option<Box<Held>>) -> (Spool, Vec<ScanReport>) {
    match held.as_mut().and_then(|h| h.scan.as_mut()) {
        Some(scan) => scan.await,
        None => std::future::pending().await,
    }
}
