//! The audit sink: a cloneable handle that queues events for a writer thread.
//!
//! Sessions call [`AuditSink::emit`]. The event goes into a bounded queue; a dedicated thread
//! (`popgate-audit`) serializes queued events in batches, writes each batch with one write call
//! to stdout or to the rotating `audit.*.jsonl` files, and flushes whenever the queue runs
//! empty. File I/O thus never runs on a tokio worker.
//!
//! When the queue is full, `on_overflow = "drop"` drops the event, counts it
//! ([`AuditSink::dropped`]) and logs an error (the first time and every 1000th); `"block"` makes
//! `emit` wait for space instead. [`AuditSink::disabled`] costs one branch per call.
//!
//! [`AuditSink::start`] returns the handle and an [`AuditGuard`]; awaiting
//! [`AuditGuard::close`] writes and flushes everything queued and stops the thread.
//! [`AuditSink::reopen`] (SIGUSR1) has the thread write what is queued and then open the file
//! at its configured path again, so a file logrotate moved away is let go.

use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};
use tracing_appender::rolling::{RollingFileAppender, Rotation};

use super::files;
use crate::audit::model::config::{AuditConfig, AuditOutput, AuditRotation, Overflow};
use crate::audit::model::event::AuditEvent;

/// A batch is written once it reaches this size, even if more events are queued.
const BATCH_BYTES: usize = 64 * 1024;
/// Error logs about lost events are rate-limited to the first and every this-many-th.
const LOG_EVERY: u64 = 1000;

/// Starting the audit writer failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The audit directory could not be created or opened.
    #[error("audit directory {dir}: {source}")]
    Open {
        /// `audit.dir`.
        dir: PathBuf,
        /// Cause.
        source: tracing_appender::rolling::InitError,
    },
    /// The audit directory could not be created.
    #[error("audit directory {dir}: {source}")]
    Dir {
        /// `audit.dir`.
        dir: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// `audit.output = "file"` without `audit.dir` (rejected by validation too).
    #[error("audit.dir is not set")]
    NoDir,
    /// The audit file could not be reopened (SIGUSR1); the old one stays in use.
    #[error("reopening audit files in {dir}: {source}")]
    Reopen {
        /// `audit.dir`.
        dir: PathBuf,
        /// Cause.
        source: tracing_appender::rolling::InitError,
    },
    /// The writer has stopped (popgate is shutting down).
    #[error("the audit writer is not running")]
    Closed,
    /// The writer thread could not be started.
    #[error("cannot start the audit writer thread: {0}")]
    Spawn(#[source] std::io::Error),
}

enum Msg {
    // Boxed: keeps every queue slot small (an event is ~200 bytes, the others a pointer).
    Event(Box<AuditEvent>),
    Flush(oneshot::Sender<()>),
    /// Write what is queued, then reopen the output (SIGUSR1) and say how it went.
    Reopen(oneshot::Sender<Result<(), SinkError>>),
    Close,
}

/// Opens the output again at its configured path (files only).
type Reopen = Box<dyn FnMut() -> Result<Box<dyn Write + Send>, SinkError> + Send>;

#[derive(Debug, Default)]
struct Stats {
    dropped: AtomicU64,
    write_errors: AtomicU64,
}

struct Inner {
    /// Written into every event (`instance`).
    instance: Option<String>,
    tx: mpsc::Sender<Msg>,
    overflow: Overflow,
    stats: Arc<Stats>,
}

/// A cloneable, cheap handle to the audit writer (or to nothing, when audit is off).
#[derive(Clone)]
pub struct AuditSink {
    inner: Option<Arc<Inner>>,
}

impl fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            None => f.write_str("AuditSink(disabled)"),
            Some(i) => f
                .debug_struct("AuditSink")
                .field("overflow", &i.overflow)
                .field("dropped", &i.stats.dropped.load(Ordering::Relaxed))
                .finish(),
        }
    }
}

impl AuditSink {
    /// A sink that discards everything at no cost (audit off).
    pub(crate) fn disabled() -> AuditSink {
        AuditSink { inner: None }
    }

    /// Start the writer for `config`: stdout or rotating files in `config.dir`. When audit is
    /// disabled, returns [`AuditSink::disabled`] and an inert guard. Call outside or inside a
    /// tokio runtime; the writer is a plain thread.
    pub(crate) fn start(config: &AuditConfig) -> Result<(AuditSink, AuditGuard), SinkError> {
        // Transcripts are independent of `enabled`: their directory is made (0700) or checked
        // once here, so that a world-readable one is reported at start, not per session.
        if let Some(dir) = &config.transcript.dir
            && let Err(e) = files::prepare_dir(dir, 0o700, "transcript")
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot create the transcript directory");
        }
        if !config.enabled {
            return Ok((AuditSink::disabled(), AuditGuard::inert()));
        }
        let (out, reopen): (Box<dyn Write + Send>, Option<Reopen>) = match config.output {
            AuditOutput::Stdout => (Box::new(std::io::stdout()), None),
            AuditOutput::File => {
                let dir = config.dir.clone().ok_or(SinkError::NoDir)?;
                // 0750 when popgate creates it, files 0640 (see `files`).
                files::prepare_dir(&dir, files::DIR_MODE, "audit").map_err(|source| {
                    SinkError::Dir {
                        dir: dir.clone(),
                        source,
                    }
                })?;
                let naming = files::Dated::audit(config.rotation);
                files::precreate(&dir, naming);
                let rotation = match config.rotation {
                    AuditRotation::Daily => Rotation::DAILY,
                    AuditRotation::Hourly => Rotation::HOURLY,
                };
                // No `max_log_files`: it ranks files by birth time and prunes at every
                // (re)open. `Private` prunes by the date in the name (see `files`).
                let builder = RollingFileAppender::builder()
                    .rotation(rotation)
                    .filename_prefix("audit")
                    .filename_suffix("jsonl");
                let keep_days = config.keep_days;
                let appender = builder.build(&dir).map_err(|source| SinkError::Open {
                    dir: dir.clone(),
                    source,
                })?;
                let private = files::Private::new(appender, &dir, naming, keep_days, true);
                let reopen: Reopen = Box::new(move || {
                    // A file moved away: the fresh one is created 0640 too. A reopen deletes
                    // nothing: expiry waits for the next period.
                    files::precreate(&dir, naming);
                    let fresh = builder.build(&dir).map_err(|source| SinkError::Reopen {
                        dir: dir.clone(),
                        source,
                    })?;
                    let fresh = files::Private::new(fresh, &dir, naming, keep_days, false);
                    Ok(Box::new(fresh) as Box<dyn Write + Send>)
                });
                (Box::new(private), Some(reopen))
            }
        };
        let (mut sink, guard) =
            AuditSink::start_writer(out, reopen, config.queue, config.on_overflow)?;
        if let Some(inner) = sink.inner.as_mut().and_then(Arc::get_mut) {
            inner.instance = Some(config.instance_name());
        }
        Ok((sink, guard))
    }

    /// Start a writer thread writing JSON lines to `out` (tests, custom outputs).
    #[cfg(test)]
    pub(crate) fn start_with_writer(
        out: Box<dyn Write + Send>,
        queue: usize,
        overflow: Overflow,
    ) -> Result<(AuditSink, AuditGuard), SinkError> {
        AuditSink::start_writer(out, None, queue, overflow)
    }

    fn start_writer(
        out: Box<dyn Write + Send>,
        reopen: Option<Reopen>,
        queue: usize,
        overflow: Overflow,
    ) -> Result<(AuditSink, AuditGuard), SinkError> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let (done_tx, done_rx) = oneshot::channel();
        let stats = Arc::new(Stats::default());
        let thread_stats = stats.clone();
        let handle = std::thread::Builder::new()
            .name("popgate-audit".into())
            .spawn(move || {
                writer_loop(rx, out, reopen, &thread_stats);
                let _ = done_tx.send(());
            })
            .map_err(SinkError::Spawn)?;
        let guard = AuditGuard {
            tx: Some(tx.clone()),
            done: Some(done_rx),
            thread: Some(handle),
        };
        let sink = AuditSink {
            inner: Some(Arc::new(Inner {
                instance: None,
                tx,
                overflow,
                stats,
            })),
        };
        Ok((sink, guard))
    }

    /// Whether events go anywhere. Callers may skip building events when not.
    pub(crate) fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Queue an event. In `drop` mode this never waits (a full queue drops and counts the
    /// event); in `block` mode it waits for queue space.
    pub async fn emit(&self, mut event: AuditEvent) {
        let Some(inner) = &self.inner else { return };
        inner.stamp(&mut event);
        match inner.overflow {
            Overflow::Drop => {
                self.try_emit(event);
            }
            Overflow::Block => {
                if inner.tx.send(Msg::Event(Box::new(event))).await.is_err() {
                    inner.lost("audit writer closed: event dropped");
                }
            }
        }
    }

    /// Queue an event without ever waiting, whatever the overflow mode (for code that cannot
    /// await). Returns false when the event was dropped (and counted).
    pub(crate) fn try_emit(&self, mut event: AuditEvent) -> bool {
        let Some(inner) = &self.inner else {
            return true;
        };
        inner.stamp(&mut event);
        match inner.tx.try_send(Msg::Event(Box::new(event))) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                inner.lost("audit queue full: event dropped");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                inner.lost("audit writer closed: event dropped");
                false
            }
        }
    }

    /// Wait until every event emitted before this call is written and flushed.
    pub async fn flush(&self) {
        let Some(inner) = &self.inner else { return };
        let (tx, rx) = oneshot::channel();
        if inner.tx.send(Msg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Write everything queued so far, then reopen the audit file at its configured path
    /// (after logrotate moved it away: SIGUSR1). Nothing to do when audit is off or goes to
    /// stdout. On an error the old file stays in use.
    pub async fn reopen(&self) -> Result<(), SinkError> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        let (tx, rx) = oneshot::channel();
        inner
            .tx
            .send(Msg::Reopen(tx))
            .await
            .map_err(|_| SinkError::Closed)?;
        rx.await.map_err(|_| SinkError::Closed)?
    }

    /// Messages waiting for the writer now, and how many the queue holds (`(0, 0)` when audit
    /// is off): `popgate_audit_queue_depth` and `_capacity`.
    pub(crate) fn queue(&self) -> (usize, usize) {
        self.inner.as_ref().map_or((0, 0), |i| {
            let max = i.tx.max_capacity();
            (max - i.tx.capacity(), max)
        })
    }

    /// Events lost so far: dropped on a full queue, or emitted after the writer closed
    /// (`popgate_audit_events_dropped_total`).
    pub(crate) fn dropped(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.stats.dropped.load(Ordering::Relaxed))
    }
}

impl Inner {
    fn stamp(&self, event: &mut AuditEvent) {
        if event.instance.is_none() {
            event.instance.clone_from(&self.instance);
        }
    }

    fn lost(&self, msg: &'static str) {
        let n = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if n == 1 || n.is_multiple_of(LOG_EVERY) {
            tracing::error!(dropped_total = n, "{msg}");
        }
    }
}

/// Owns the writer thread. [`AuditGuard::close`] drains the queue, flushes and stops it.
///
/// Dropping the guard without `close` stops the writer too: outside a tokio runtime it waits
/// for the queue to be written; inside one it only asks the thread to stop after the queued
/// events (it cannot wait there), so prefer `close().await`.
pub(crate) struct AuditGuard {
    tx: Option<mpsc::Sender<Msg>>,
    done: Option<oneshot::Receiver<()>>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for AuditGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditGuard")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl AuditGuard {
    pub(crate) fn inert() -> AuditGuard {
        AuditGuard {
            tx: None,
            done: None,
            thread: None,
        }
    }

    /// Write and flush everything queued, then stop the writer thread. Events emitted later
    /// are dropped and counted.
    pub async fn close(mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Msg::Close).await;
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
        // The thread has signalled its end; let it finish on its own.
        self.thread.take();
    }

    fn stop_blocking(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.blocking_send(Msg::Close);
        }
        self.done.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for AuditGuard {
    fn drop(&mut self) {
        if self.tx.is_none() {
            return;
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            // Cannot block here: ask for a stop after the queued events and let it run.
            if let Some(tx) = self.tx.take()
                && tx.try_send(Msg::Close).is_err()
            {
                tracing::warn!(
                    "audit guard dropped inside the runtime with a full queue; \
                     use AuditGuard::close().await"
                );
            }
            self.done.take();
            self.thread.take();
        } else {
            self.stop_blocking();
        }
    }
}

fn writer_loop(
    mut rx: mpsc::Receiver<Msg>,
    mut out: Box<dyn Write + Send>,
    mut reopen: Option<Reopen>,
    stats: &Stats,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(8 * 1024);
    let mut acks: Vec<oneshot::Sender<()>> = Vec::new();
    let mut reopens: Vec<oneshot::Sender<Result<(), SinkError>>> = Vec::new();
    let mut closing = false;
    let mut failures: u64 = 0;
    while let Some(first) = rx.blocking_recv() {
        let mut events: u64 = 0;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Event(ev) => {
                    if serde_json::to_writer(&mut buf, &ev).is_ok() {
                        buf.push(b'\n');
                        events += 1;
                    }
                }
                Msg::Flush(ack) => acks.push(ack),
                Msg::Reopen(ack) => reopens.push(ack),
                Msg::Close => closing = true,
            }
            if closing || !reopens.is_empty() || buf.len() >= BATCH_BYTES {
                break;
            }
            next = rx.try_recv().ok();
        }
        // One write per batch: a line is never split between two rotated files.
        let result = if buf.is_empty() {
            out.flush()
        } else {
            out.write_all(&buf).and_then(|()| out.flush())
        };
        if let Err(e) = result {
            stats.write_errors.fetch_add(events, Ordering::Relaxed);
            failures += 1;
            if failures == 1 || failures.is_multiple_of(LOG_EVERY) {
                tracing::error!(error = %e, failures, "cannot write audit events");
            }
        }
        buf.clear();
        if buf.capacity() > 4 * BATCH_BYTES {
            buf.shrink_to(BATCH_BYTES);
        }
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
        for ack in reopens.drain(..) {
            let result = match reopen.as_mut() {
                Some(open) => open().map(|fresh| out = fresh),
                None => Ok(()),
            };
            let _ = ack.send(result);
        }
        if closing {
            break;
        }
    }
    // Whatever raced with the close is lost: count it, and release flush waiters.
    rx.close();
    while let Ok(msg) = rx.try_recv() {
        match msg {
            Msg::Event(_) => {
                let n = stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n == 1 || n.is_multiple_of(LOG_EVERY) {
                    tracing::error!(dropped_total = n, "audit writer closed: event dropped");
                }
            }
            Msg::Flush(ack) => {
                let _ = ack.send(());
            }
            Msg::Reopen(ack) => {
                let _ = ack.send(Err(SinkError::Closed));
            }
            Msg::Close => {}
        }
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::model::event::{AuditEventKind, Reset};
    use std::sync::Mutex;
    use std::sync::mpsc as std_mpsc;
    use std::time::Duration;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl SharedBuf {
        fn lines(&self) -> Vec<AuditEvent> {
            let data = self.0.lock().unwrap().clone();
            String::from_utf8(data)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        }
    }

    /// A writer whose first write blocks until the test releases it, and which tells the
    /// test when that write has begun.
    struct Gate {
        entered: Option<std_mpsc::Sender<()>>,
        release: std_mpsc::Receiver<()>,
        out: SharedBuf,
    }

    impl Write for Gate {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if let Some(e) = self.entered.take() {
                e.send(()).unwrap();
                self.release.recv().unwrap();
            }
            self.out.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn gated(
        queue: usize,
        overflow: Overflow,
    ) -> (
        AuditSink,
        AuditGuard,
        SharedBuf,
        std_mpsc::Receiver<()>,
        std_mpsc::Sender<()>,
    ) {
        let (etx, erx) = std_mpsc::channel();
        let (rtx, rrx) = std_mpsc::channel();
        let out = SharedBuf::default();
        let gate = Gate {
            entered: Some(etx),
            release: rrx,
            out: out.clone(),
        };
        let (sink, guard) = AuditSink::start_with_writer(Box::new(gate), queue, overflow).unwrap();
        (sink, guard, out, erx, rtx)
    }

    fn ev(n: u64) -> AuditEvent {
        AuditEvent::new(
            n,
            Reset {
                user: Some(format!("u{n}").into()),
            },
        )
    }

    #[tokio::test]
    async fn events_are_written_in_order_and_flush_waits() {
        let out = SharedBuf::default();
        let (sink, guard) =
            AuditSink::start_with_writer(Box::new(out.clone()), 100, Overflow::Drop).unwrap();
        for i in 0..50 {
            sink.emit(ev(i)).await;
        }
        sink.flush().await;
        let got = out.lines();
        assert_eq!(got.len(), 50);
        assert!(got.iter().enumerate().all(|(i, e)| e.session == i as u64));
        let clone = sink.clone();
        clone.emit(ev(50)).await;
        guard.close().await;
        assert_eq!(out.lines().len(), 51);
        assert_eq!(sink.dropped(), 0);
        // After close: counted, never a panic or a hang.
        assert!(!sink.try_emit(ev(99)));
        sink.emit(ev(100)).await;
        sink.flush().await;
        assert_eq!(sink.dropped(), 2);
    }

    #[tokio::test]
    async fn drop_mode_never_waits_and_counts() {
        let (sink, guard, out, entered, release) = gated(4, Overflow::Drop);
        sink.emit(ev(0)).await;
        // The writer holds event 0 in a blocked write: the queue is empty again.
        entered.recv_timeout(Duration::from_secs(10)).unwrap();
        for i in 1..=4 {
            sink.emit(ev(i)).await;
        }
        assert_eq!(sink.dropped(), 0);
        for i in 5..=14 {
            // Must not wait even though the queue is full.
            tokio::time::timeout(Duration::from_secs(1), sink.emit(ev(i)))
                .await
                .unwrap();
        }
        assert_eq!(sink.dropped(), 10);
        release.send(()).unwrap();
        guard.close().await;
        let got: Vec<u64> = out.lines().iter().map(|e| e.session).collect();
        assert_eq!(got, [0, 1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn block_mode_waits_for_space_and_loses_nothing() {
        let (sink, guard, out, entered, release) = gated(2, Overflow::Block);
        sink.emit(ev(0)).await;
        entered.recv_timeout(Duration::from_secs(10)).unwrap();
        sink.emit(ev(1)).await;
        sink.emit(ev(2)).await;
        // Queue full: the next emit waits.
        let blocked = tokio::time::timeout(Duration::from_millis(200), sink.emit(ev(3))).await;
        assert!(blocked.is_err(), "emit should wait in block mode");
        release.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), sink.emit(ev(3)))
            .await
            .unwrap();
        guard.close().await;
        assert_eq!(sink.dropped(), 0);
        let got: Vec<u64> = out.lines().iter().map(|e| e.session).collect();
        assert_eq!(got, [0, 1, 2, 3]);
        // try_emit never waits, whatever the mode.
        assert!(!sink.try_emit(ev(4)));
    }

    #[tokio::test]
    async fn disabled_sink_is_a_no_op() {
        let sink = AuditSink::disabled();
        assert!(!sink.is_enabled());
        sink.emit(ev(1)).await;
        assert!(sink.try_emit(ev(2)));
        sink.flush().await;
        assert_eq!(sink.dropped(), 0);
        let (sink, guard) = AuditSink::start(&AuditConfig::default()).unwrap();
        assert!(!sink.is_enabled());
        guard.close().await;
    }

    #[test]
    fn guard_drop_outside_runtime_writes_everything() {
        let out = SharedBuf::default();
        let (sink, guard) =
            AuditSink::start_with_writer(Box::new(out.clone()), 10, Overflow::Drop).unwrap();
        for i in 0..10 {
            assert!(sink.try_emit(ev(i)));
        }
        drop(guard);
        assert_eq!(out.lines().len(), 10);
    }

    /// Files are named by the UTC day: a test that counts them waits out the last seconds
    /// of a day, so that its events do not straddle midnight into two files.
    fn away_from_midnight() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let left = 86_400 - now % 86_400;
        if left <= 10 {
            std::thread::sleep(std::time::Duration::from_secs(left + 1));
        }
    }

    #[tokio::test]
    async fn rotating_files_in_a_directory() {
        away_from_midnight();
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig {
            enabled: true,
            dir: Some(dir.path().join("sub")),
            ..AuditConfig::default()
        };
        let (sink, guard) = AuditSink::start(&config).unwrap();
        for i in 0..3 {
            sink.emit(ev(i)).await;
        }
        guard.close().await;
        let files: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1);
        let name = files[0].file_name().unwrap().to_str().unwrap().to_owned();
        assert!(
            name.starts_with("audit.") && name.ends_with(".jsonl"),
            "{name}"
        );
        assert_eq!(name.len(), "audit.2026-03-01.jsonl".len(), "{name}");
        let text = std::fs::read_to_string(&files[0]).unwrap();
        let evs: Vec<AuditEvent> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(evs.len(), 3);
        assert!(matches!(evs[2].kind, AuditEventKind::Reset(_)));
    }

    #[tokio::test]
    async fn reopen_starts_a_fresh_file_after_a_move() {
        away_from_midnight();
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig {
            enabled: true,
            dir: Some(dir.path().to_owned()),
            ..AuditConfig::default()
        };
        let (sink, guard) = AuditSink::start(&config).unwrap();
        sink.emit(ev(0)).await;
        sink.flush().await;
        let [file]: [std::path::PathBuf; 1] = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect::<Vec<_>>()
            .try_into()
            .unwrap();
        let moved = dir.path().join("moved");
        std::fs::rename(&file, &moved).unwrap();
        sink.emit(ev(1)).await;
        sink.reopen().await.unwrap();
        sink.emit(ev(2)).await;
        guard.close().await;
        let sessions = |p: &std::path::Path| -> Vec<u64> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<AuditEvent>(l).unwrap().session)
                .collect()
        };
        // Queued before the reopen: still the old file.
        assert_eq!(sessions(&moved), [0, 1]);
        assert_eq!(sessions(&file), [2]);
        // After close there is nothing to reopen.
        assert!(sink.reopen().await.is_err());
    }

    #[test]
    fn unusable_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let config = AuditConfig {
            enabled: true,
            dir: Some(file.join("below")),
            ..AuditConfig::default()
        };
        let err = AuditSink::start(&config).unwrap_err();
        assert!(err.to_string().contains("plain-file"), "{err}");
    }
}
