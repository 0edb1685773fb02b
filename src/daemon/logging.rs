//! Operational logging: the `[log]` table put into effect, changeable while running.
//!
//! [`Logging::init`] installs the global tracing subscriber once; [`Logging::apply`] puts a
//! new [`LogConfig`] into effect (level, format, output, directory) without a restart, and
//! [`Logging::reopen`] reopens the log file (SIGUSR1, after logrotate moved it) or reconnects
//! to syslog.
//!
//! How: the level is a reloadable `EnvFilter`. Every format/output pair is a formatting layer
//! that is always installed (plain text, text with colours when stderr is a terminal, text
//! without time stamps for syslog, JSON, and journald when it is reachable); a switch says
//! which one writes events. All of them record span fields all the time, so switching the
//! format at run time finds the fields of sessions opened before in the form it needs (the
//! JSON formatter panics on a span whose fields it did not record). The text and JSON layers
//! write to one swappable [`Target`]: a non-blocking stderr or file writer, or syslog.

use std::io::{IsTerminal as _, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tracing::{Event, Level, Metadata, Subscriber};
use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};
use tracing_appender::rolling::RollingFileAppender;

use crate::audit::writer::files::{Dated, Period, Private, precreate};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, MakeWriter};
use tracing_subscriber::layer::{Context, Filter, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer as _, Registry, reload};

use crate::config::{LogConfig, LogFormat, LogOutput, Rotation, SyslogAddress, syslog_facility};

/// Setting up or changing the operational log failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// `log.level` is not a filter.
    #[error("log.level {level:?}: {reason}")]
    Level {
        /// The value.
        level: String,
        /// Parser message.
        reason: String,
    },
    /// The log directory or file could not be opened.
    #[error("log.dir {}: {source}", dir.display())]
    Dir {
        /// `log.dir`.
        dir: PathBuf,
        /// Cause.
        source: tracing_appender::rolling::InitError,
    },
    /// The syslog daemon could not be reached.
    #[error("log.syslog_address {address:?}: {reason}")]
    Syslog {
        /// `log.syslog_address`.
        address: String,
        /// Cause.
        reason: String,
    },
    /// journald could not be reached.
    #[error(
        "log.output = \"journald\": journald is not reachable ({0}); is this running under systemd?"
    )]
    Journald(String),
    /// The output cannot be switched to at run time (needs a restart).
    #[error("{0}")]
    NeedsRestart(String),
    /// A global subscriber was installed already.
    #[error("logging is set up already: {0}")]
    Installed(String),
}

/// Which formatting layer writes events.
const TEXT: u8 = 0;
const TEXT_ANSI: u8 = 1;
const TEXT_SYSLOG: u8 = 2;
const JSON: u8 = 3;
const JOURNALD: u8 = 4;

/// The running operational log (see the module docs). Keep it alive for the life of the
/// process: dropping it flushes and stops the non-blocking writer.
pub struct Logging {
    filter: reload::Handle<EnvFilter, Registry>,
    active: Arc<AtomicU8>,
    target: Target,
    /// stderr was a terminal at start: text to stderr gets colours.
    ansi: bool,
    /// The journald layer is installed (journald was reachable at start).
    journald: bool,
    state: Mutex<State>,
}

impl std::fmt::Debug for Logging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logging")
            .field("active", &self.active.load(Ordering::Relaxed))
            .field("ansi", &self.ansi)
            .field("journald", &self.journald)
            .finish_non_exhaustive()
    }
}

/// What the current output holds on to.
struct State {
    config: LogConfig,
    output: Output,
}

/// An opened output: what the target writes to, and what must live as long as it does.
struct Output {
    sink: Sink,
    slot: u8,
    file: Option<Arc<FileOut>>,
    syslog: Option<Arc<SyslogOut>>,
    /// Flushes and stops the non-blocking writer thread when the output is dropped.
    _guard: Option<WorkerGuard>,
}

impl Logging {
    /// Install the global subscriber for `config`. When syslog or journald cannot be reached,
    /// logs go to stderr instead and the first line says why (a service manager keeps
    /// stderr); an unusable `log.dir` or level is an error.
    pub fn init(config: &LogConfig) -> Result<Logging, LogError> {
        let (subscriber, logging, fallback) = Logging::build(config)?;
        tracing::subscriber::set_global_default(subscriber)
            .map_err(|e| LogError::Installed(e.to_string()))?;
        if let Some(e) = fallback {
            tracing::error!(error = %e, "logging to stderr instead");
        }
        Ok(logging)
    }

    /// The subscriber and its handle, not installed (tests use it with `with_default`); the
    /// third value is why the configured output was replaced by stderr, if it was.
    pub(crate) fn build(
        config: &LogConfig,
    ) -> Result<
        (
            impl Subscriber + Send + Sync + 'static,
            Logging,
            Option<LogError>,
        ),
        LogError,
    > {
        let filter = env_filter(&config.level)?;
        let ansi = std::io::stderr().is_terminal();
        let journald = tracing_journald::layer().ok();
        let has_journald = journald.is_some();
        let (output, fallback) = match open_output(config, ansi, has_journald) {
            Ok(o) => (o, None),
            Err(e @ (LogError::Syslog { .. } | LogError::Journald(_))) => {
                (stderr_output(config.format, ansi), Some(e))
            }
            Err(e) => return Err(e),
        };
        let active = Arc::new(AtomicU8::new(output.slot));
        let target = Target {
            sink: Arc::new(RwLock::new(output.sink.clone())),
            escape: Escape::Text,
        };
        let (filter, filter_handle) = reload::Layer::new(filter);
        let slot = |me: u8| Slot {
            me,
            active: active.clone(),
        };
        let text = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(target.escaping(Escape::Text))
            .with_filter(slot(TEXT));
        let text_ansi = ansi.then(|| {
            tracing_subscriber::fmt::layer()
                .with_ansi(true)
                .with_writer(target.escaping(Escape::Colours))
                .with_filter(slot(TEXT_ANSI))
        });
        let text_syslog = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .without_time()
            .with_writer(target.escaping(Escape::Text))
            .with_filter(slot(TEXT_SYSLOG));
        let json = tracing_subscriber::fmt::layer()
            .json()
            .event_format(TagsAsArray(format().json()))
            .with_writer(target.escaping(Escape::Json))
            .with_filter(slot(JSON));
        let journald = journald.map(|j| j.with_filter(slot(JOURNALD)));
        let subscriber = tracing_subscriber::registry()
            .with(filter)
            .with(text)
            .with(text_ansi)
            .with(text_syslog)
            .with(json)
            .with(journald);
        let logging = Logging {
            filter: filter_handle,
            active,
            target,
            ansi,
            journald: has_journald,
            state: Mutex::new(State {
                config: config.clone(),
                output,
            }),
        };
        Ok((subscriber, logging, fallback))
    }

    /// Put `config` into effect: level, format, output, directory, rotation, syslog address.
    /// Either all of it takes effect or, on an error, nothing changes.
    pub fn apply(&self, config: &LogConfig) -> Result<(), LogError> {
        let filter = env_filter(&config.level)?;
        let mut state = lock(&self.state);
        let same_output = same_output(&state.config, config);
        let new_output =
            if same_output {
                None
            } else {
                Some(open_output(config, self.ansi, self.journald).map_err(|e| match e {
                LogError::Journald(why) => LogError::NeedsRestart(format!(
                    "log.output = \"journald\" needs journald at start ({why}); restart popgate"
                )),
                e => e,
            })?)
            };
        self.filter
            .reload(filter)
            .map_err(|e| LogError::Installed(e.to_string()))?;
        let slot = match new_output {
            Some(output) => {
                let slot = output.slot;
                *self.target.sink.write().unwrap_or_else(|p| p.into_inner()) = output.sink.clone();
                // The old writer is flushed and stopped when `old` drops, after the swap.
                let old = std::mem::replace(&mut state.output, output);
                drop(old);
                slot
            }
            None => slot_for(config.effective_output(), config.format, self.ansi),
        };
        state.output.slot = slot;
        self.active.store(slot, Ordering::Relaxed);
        state.config = config.clone();
        Ok(())
    }

    /// Reopen the log file at its configured path (after logrotate moved it away), or
    /// reconnect to syslog; nothing to do for stderr and journald.
    pub fn reopen(&self) -> Result<(), LogError> {
        let state = lock(&self.state);
        if let Some(file) = &state.output.file {
            file.reopen()?;
        }
        if let Some(syslog) = &state.output.syslog {
            syslog.disconnect();
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn env_filter(level: &str) -> Result<EnvFilter, LogError> {
    EnvFilter::try_new(level).map_err(|e| LogError::Level {
        level: level.to_owned(),
        reason: e.to_string(),
    })
}

/// Whether two configs write to the same place (only level or format differ).
fn same_output(a: &LogConfig, b: &LogConfig) -> bool {
    let out = a.effective_output();
    out == b.effective_output()
        && match out {
            LogOutput::Stderr | LogOutput::Journald => true,
            LogOutput::File => {
                a.dir == b.dir && a.rotation == b.rotation && a.keep_days == b.keep_days
            }
            LogOutput::Syslog => {
                a.syslog_address == b.syslog_address && a.syslog_facility == b.syslog_facility
            }
        }
}

fn slot_for(output: LogOutput, format: LogFormat, ansi: bool) -> u8 {
    match (output, format) {
        (LogOutput::Journald, _) => JOURNALD,
        (_, LogFormat::Json) => JSON,
        (LogOutput::Stderr, LogFormat::Text) if ansi => TEXT_ANSI,
        (LogOutput::Syslog, LogFormat::Text) => TEXT_SYSLOG,
        (_, LogFormat::Text) => TEXT,
    }
}

fn stderr_output(format: LogFormat, ansi: bool) -> Output {
    let (nb, guard) = tracing_appender::non_blocking(std::io::stderr());
    Output {
        sink: Sink::Stream(nb),
        slot: slot_for(LogOutput::Stderr, format, ansi),
        file: None,
        syslog: None,
        _guard: Some(guard),
    }
}

fn open_output(config: &LogConfig, ansi: bool, journald: bool) -> Result<Output, LogError> {
    let output = config.effective_output();
    let slot = slot_for(output, config.format, ansi);
    match output {
        LogOutput::Stderr => Ok(stderr_output(config.format, ansi)),
        LogOutput::File => {
            let dir = config.dir.clone().unwrap_or_else(|| PathBuf::from("."));
            let file = Arc::new(FileOut::open(dir, config.rotation, config.keep_days)?);
            let (nb, guard) = tracing_appender::non_blocking(FileWriter(file.clone()));
            Ok(Output {
                sink: Sink::Stream(nb),
                slot,
                file: Some(file),
                syslog: None,
                _guard: Some(guard),
            })
        }
        LogOutput::Syslog => {
            let syslog = Arc::new(SyslogOut::connect(config)?);
            Ok(Output {
                sink: Sink::Syslog(syslog.clone()),
                slot,
                file: None,
                syslog: Some(syslog),
                _guard: None,
            })
        }
        LogOutput::Journald if journald => Ok(Output {
            sink: Sink::Discard,
            slot,
            file: None,
            syslog: None,
            _guard: None,
        }),
        LogOutput::Journald => Err(match tracing_journald::layer() {
            Ok(_) => LogError::NeedsRestart(
                "journald became reachable after start: restart popgate to log there".into(),
            ),
            Err(e) => LogError::Journald(e.to_string()),
        }),
    }
}

/// A per-layer filter that lets a layer see every span (so it records their fields) but
/// write events only while it is the active one.
#[derive(Clone)]
struct Slot {
    me: u8,
    active: Arc<AtomicU8>,
}

impl<S> Filter<S> for Slot {
    fn enabled(&self, _: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, _: &Event<'_>, _: &Context<'_, S>) -> bool {
        self.active.load(Ordering::Relaxed) == self.me
    }
}

/// Where formatted lines go (the sink is swapped whole by [`Logging::apply`]), and how each
/// layer's lines are escaped on the way ([`escape_line`]).
#[derive(Clone)]
struct Target {
    sink: Arc<RwLock<Sink>>,
    escape: Escape,
}

#[derive(Clone)]
enum Sink {
    /// stderr or a file, through a non-blocking writer thread.
    Stream(NonBlocking),
    /// One syslog message per line, with the line's level as severity.
    Syslog(Arc<SyslogOut>),
    /// Nothing (journald has its own layer).
    Discard,
}

/// One event's writer (see [`Target`]).
struct SinkWriter {
    to: SinkTo,
    escape: Escape,
}

enum SinkTo {
    Stream(NonBlocking),
    Syslog(Arc<SyslogOut>, Level),
    Discard,
}

impl Target {
    /// The same sink, lines escaped as `escape` says.
    fn escaping(&self, escape: Escape) -> Target {
        Target {
            sink: self.sink.clone(),
            escape,
        }
    }

    fn writer(&self, level: Level) -> SinkWriter {
        let to = match &*self.sink.read().unwrap_or_else(|p| p.into_inner()) {
            Sink::Stream(nb) => SinkTo::Stream(nb.clone()),
            Sink::Syslog(s) => SinkTo::Syslog(s.clone(), level),
            Sink::Discard => SinkTo::Discard,
        };
        SinkWriter {
            to,
            escape: self.escape,
        }
    }
}

impl<'a> MakeWriter<'a> for Target {
    type Writer = SinkWriter;

    fn make_writer(&'a self) -> SinkWriter {
        self.writer(Level::INFO)
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> SinkWriter {
        self.writer(*meta.level())
    }
}

impl Write for SinkWriter {
    /// `buf` is one whole formatted event (the fmt layer formats, then writes once).
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let line = escape_line(buf, self.escape);
        match &mut self.to {
            SinkTo::Stream(nb) => nb.write_all(&line)?,
            SinkTo::Syslog(s, level) => s.send(*level, &line)?,
            SinkTo::Discard => {}
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.to {
            SinkTo::Stream(nb) => nb.flush(),
            _ => Ok(()),
        }
    }
}

/// The log file(s) in `log.dir`, reopenable. Files are created `0640` like the audit
/// trail's, and dated ones expire by the date in their name after `log.keep_days` (see
/// `audit::writer::files`): at start and when a new period begins, never on a reopen.
struct FileOut {
    dir: PathBuf,
    rotation: Rotation,
    keep_days: u32,
    current: Mutex<Private<RollingFileAppender>>,
}

fn naming(rotation: Rotation) -> Dated {
    Dated {
        prefix: "popgate",
        suffix: "log",
        period: match rotation {
            Rotation::Daily => Period::Daily,
            Rotation::Hourly => Period::Hourly,
            Rotation::Never => Period::Never,
        },
    }
}

impl FileOut {
    fn open(dir: PathBuf, rotation: Rotation, keep_days: u32) -> Result<FileOut, LogError> {
        precreate(&dir, naming(rotation));
        let appender = appender(&dir, rotation)?;
        Ok(FileOut {
            current: Mutex::new(Private::new(
                appender,
                &dir,
                naming(rotation),
                keep_days,
                true,
            )),
            dir,
            rotation,
            keep_days,
        })
    }

    /// A fresh appender opens (or creates) the file at the configured path; the old one,
    /// possibly renamed by logrotate, is closed once replaced.
    fn reopen(&self) -> Result<(), LogError> {
        precreate(&self.dir, naming(self.rotation));
        let fresh = appender(&self.dir, self.rotation)?;
        let fresh = Private::new(
            fresh,
            &self.dir,
            naming(self.rotation),
            self.keep_days,
            false,
        );
        let old = std::mem::replace(&mut *lock(&self.current), fresh);
        drop(old);
        Ok(())
    }
}

fn appender(dir: &std::path::Path, rotation: Rotation) -> Result<RollingFileAppender, LogError> {
    let rotation = match rotation {
        Rotation::Daily => tracing_appender::rolling::Rotation::DAILY,
        Rotation::Hourly => tracing_appender::rolling::Rotation::HOURLY,
        Rotation::Never => tracing_appender::rolling::Rotation::NEVER,
    };
    RollingFileAppender::builder()
        .rotation(rotation)
        .filename_prefix("popgate")
        .filename_suffix("log")
        .build(dir)
        .map_err(|source| LogError::Dir {
            dir: dir.to_owned(),
            source,
        })
}

/// The writer the non-blocking thread owns: whatever file is current.
struct FileWriter(Arc<FileOut>);

impl Write for FileWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0.current).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        lock(&self.0.current).flush()
    }
}

type SyslogLogger = syslog::Logger<syslog::LoggerBackend, syslog::Formatter3164>;

/// A syslog connection, made again after an error or [`Logging::reopen`].
struct SyslogOut {
    address: SyslogAddress,
    formatter: syslog::Formatter3164,
    logger: Mutex<Option<SyslogLogger>>,
}

impl SyslogOut {
    fn connect(config: &LogConfig) -> Result<SyslogOut, LogError> {
        let err = |reason: String| LogError::Syslog {
            address: config.syslog_address.clone(),
            reason,
        };
        let address = SyslogAddress::parse(&config.syslog_address).map_err(err)?;
        let facility = syslog_facility(&config.syslog_facility)
            .ok_or_else(|| err(format!("unknown facility {:?}", config.syslog_facility)))?;
        // The local daemon adds the host name itself; a remote one needs it in the line.
        let hostname = match address {
            SyslogAddress::Unix(_) => None,
            _ => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned()),
        };
        let out = SyslogOut {
            address,
            formatter: syslog::Formatter3164 {
                facility,
                hostname,
                process: "popgate".into(),
                pid: std::process::id(),
            },
            logger: Mutex::new(None),
        };
        let logger = out.open().map_err(|e| err(e.to_string()))?;
        *lock(&out.logger) = Some(logger);
        Ok(out)
    }

    fn open(&self) -> syslog::Result<SyslogLogger> {
        let f = self.formatter.clone();
        match &self.address {
            SyslogAddress::Unix(path) => syslog::unix_custom(f, path),
            SyslogAddress::Udp(server) => {
                let local = if server.starts_with('[') {
                    "[::]:0"
                } else {
                    "0.0.0.0:0"
                };
                syslog::udp(f, local, server.as_str())
            }
            SyslogAddress::Tcp(server) => syslog::tcp(f, server.as_str()),
        }
    }

    fn disconnect(&self) {
        *lock(&self.logger) = None;
    }

    /// Send one formatted line; on an error, connect again and retry once.
    fn send(&self, level: Level, line: &[u8]) -> std::io::Result<()> {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\n', '\r']);
        let mut guard = lock(&self.logger);
        for attempt in 0..2 {
            if guard.is_none() || attempt == 1 {
                *guard = Some(self.open().map_err(std::io::Error::other)?);
            }
            let Some(logger) = guard.as_mut() else {
                continue;
            };
            let sent = match level {
                Level::ERROR => logger.err(text),
                Level::WARN => logger.warning(text),
                Level::INFO => logger.info(text),
                _ => logger.debug(text),
            };
            match sent {
                Ok(()) => return Ok(()),
                Err(e) if attempt == 1 => return Err(std::io::Error::other(e)),
                Err(_) => {}
            }
        }
        Ok(())
    }
}

/// How a layer's lines are escaped by [`escape_line`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    /// Plain text (file, stderr, syslog).
    Text,
    /// Text with the formatter's colours (stderr on a terminal): its SGR sequences stay.
    Colours,
    /// One JSON object per line.
    Json,
}

/// The one place where log lines are made safe for whoever reads them: every formatted event
/// of the text and JSON formats passes here on its way to the file, stderr or syslog, so text
/// from peers in any field (client commands and user names, upstream lines, the token
/// endpoint's `error_description`, PROXY TLVs, certificate names) cannot start a line of its
/// own, move a terminal's cursor or hide behind a NUL. Control characters (C0 but TAB, DEL, C1)
/// become `\xNN` as [`crate::pop3::printable`] writes them everywhere else; the event's final
/// newline stays. In JSON, whose encoder writes control characters as `\n` or `\u001b`, these
/// become the same `\xNN` text, so a decoded field reads as the plain line does. With
/// [`Escape::Colours`], SGR sequences (`ESC [ digits m`, colours only) are kept.
fn escape_line(buf: &[u8], escape: Escape) -> std::borrow::Cow<'_, [u8]> {
    let (body, end) = match buf.strip_suffix(b"\n") {
        Some(body) => (body, &b"\n"[..]),
        None => (buf, &b""[..]),
    };
    let unsafe_byte = |b: &u8| (*b < 0x20 && *b != b'\t') || *b == 0x7f;
    let has_c1 = || {
        body.windows(2)
            .any(|w| w[0] == 0xc2 && (0x80..0xa0).contains(&w[1]))
    };
    let json_control = || escape == Escape::Json && body.contains(&b'\\');
    if !body.iter().any(unsafe_byte) && !has_c1() && !json_control() {
        return std::borrow::Cow::Borrowed(buf);
    }
    let mut out = match escape {
        Escape::Text => crate::pop3::printable(body),
        Escape::Colours => printable_keeping_sgr(body),
        Escape::Json => json_controls_as_text(&String::from_utf8_lossy(body)),
    }
    .into_bytes();
    out.extend_from_slice(end);
    std::borrow::Cow::Owned(out)
}

/// [`crate::pop3::printable`], except for SGR sequences (`ESC [` digits and `;`, then `m`).
fn printable_keeping_sgr(body: &[u8]) -> String {
    let mut out = String::with_capacity(body.len());
    let mut rest = body;
    while let Some(at) = rest.iter().position(|&b| b == 0x1b) {
        out.push_str(&crate::pop3::printable(&rest[..at]));
        let seq = &rest[at..];
        let digits = seq.get(2..).map_or(0, |r| {
            r.iter()
                .take_while(|b| b.is_ascii_digit() || **b == b';')
                .count()
        });
        if seq.get(1) == Some(&b'[') && seq.get(2 + digits) == Some(&b'm') {
            out.push_str(&String::from_utf8_lossy(&seq[..3 + digits]));
            rest = &seq[3 + digits..];
        } else {
            out.push_str(&crate::pop3::printable(&seq[..1]));
            rest = &seq[1..];
        }
    }
    out.push_str(&crate::pop3::printable(rest));
    out
}

/// A JSON text with every control character in its strings (escaped by the encoder as `\n`,
/// `\u001b`..., or DEL and C1 written raw) turned into the text `\xNN`, still valid JSON.
fn json_controls_as_text(json: &str) -> String {
    let mut out = String::with_capacity(json.len() + 16);
    let mut chars = json.chars().peekable();
    let hex = |out: &mut String, c: u32| {
        // `\\x1b` in JSON decodes to the four characters `\x1b`.
        out.push_str(&format!("\\\\x{c:02x}"));
    };
    while let Some(c) = chars.next() {
        if c != '\\' {
            if c.is_control() && c != '\t' {
                hex(&mut out, u32::from(c));
            } else {
                out.push(c);
            }
            continue;
        }
        match chars.next() {
            Some('n') => hex(&mut out, 0x0a),
            Some('r') => hex(&mut out, 0x0d),
            Some('b') => hex(&mut out, 0x08),
            Some('f') => hex(&mut out, 0x0c),
            Some('u') => {
                let code: String = chars.by_ref().take(4).collect();
                match u32::from_str_radix(&code, 16).ok().and_then(char::from_u32) {
                    Some(c) if c.is_control() && c != '\t' => hex(&mut out, u32::from(c)),
                    _ => {
                        out.push_str("\\u");
                        out.push_str(&code);
                    }
                }
            }
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// The JSON event format, with the `tags` field as a JSON array: sessions log it as the text
/// of a JSON array (tracing fields are strings, numbers or booleans), and this turns that
/// text back into the array it is.
struct TagsAsArray<F>(F);

impl<S, N, F> FormatEvent<S, N> for TagsAsArray<F>
where
    F: FormatEvent<S, N>,
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        if event.metadata().fields().field("tags").is_none() {
            return self.0.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        writer.write_str(&tags_as_array(line))
    }
}

fn format() -> format::Format {
    format::Format::default()
}

/// `{"fields":{"tags":"[\"a\"]"}}` → `{"fields":{"tags":["a"]}}`; anything else unchanged.
fn tags_as_array(line: String) -> String {
    let Ok(mut value) = serde_json::from_str::<serde_json::Value>(&line) else {
        return line;
    };
    let tags = value.get_mut("fields").and_then(|f| f.get_mut("tags"));
    let Some(tags) = tags else { return line };
    let parsed = tags
        .as_str()
        .and_then(|s| serde_json::from_str::<Vec<String>>(s).ok());
    let Some(list) = parsed else { return line };
    *tags = serde_json::Value::from(list);
    let mut out = value.to_string();
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_config(dir: &std::path::Path, format: LogFormat) -> LogConfig {
        LogConfig {
            level: "info".into(),
            format,
            dir: Some(dir.to_owned()),
            rotation: Rotation::Never,
            ..LogConfig::default()
        }
    }

    fn read(dir: &std::path::Path) -> String {
        std::fs::read_to_string(dir.join("popgate.log")).unwrap_or_default()
    }

    /// The non-blocking writer writes on its own thread: wait (bounded) for the line.
    fn wait_for(dir: &std::path::Path, needle: &str) -> String {
        for _ in 0..200 {
            let text = read(dir);
            if text.contains(needle) {
                return text;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("{needle:?} not logged; log: {}", read(dir));
    }

    const EVIL: &str = "bad\r\nINJECTED \u{1b}[2J\u{0}\u{7f}\u{9b}end";

    #[test]
    fn text_lines_escape_controls_and_keep_their_newline() {
        let line = format!("INFO user={EVIL}\n");
        let out = escape_line(line.as_bytes(), Escape::Text);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "INFO user=bad\\x0d\\x0aINJECTED \\x1b[2J\\x00\\x7f\\x9bend\n"
        );
        // A clean line is not copied.
        assert!(matches!(
            escape_line(b"INFO all\tfine\n", Escape::Text),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn colour_lines_keep_sgr_and_escape_everything_else() {
        let line = format!("\u{1b}[32mINFO\u{1b}[0m \u{1b}[3muser\u{1b}[0m={EVIL}\n");
        let out = escape_line(line.as_bytes(), Escape::Colours);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "\u{1b}[32mINFO\u{1b}[0m \u{1b}[3muser\u{1b}[0m=bad\\x0d\\x0aINJECTED \\x1b[2J\\x00\\x7f\\x9bend\n"
        );
    }

    #[test]
    fn json_lines_carry_the_same_escapes_and_stay_json() {
        let line =
            serde_json::json!({"fields": {"user": EVIL, "typed": "a\\nb\ttab"}}).to_string() + "\n";
        let out = escape_line(line.as_bytes(), Escape::Json);
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.ends_with("}\n") && !text[..text.len() - 1].contains('\n'));
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(
            v["fields"]["user"],
            "bad\\x0d\\x0aINJECTED \\x1b[2J\\x00\\x7f\\x9bend"
        );
        // A backslash the peer typed, and TAB, are text, not escapes.
        assert_eq!(v["fields"]["typed"], "a\\nb\ttab");
    }

    #[test]
    fn every_field_of_every_format_is_escaped_on_the_way_out() {
        for format in [LogFormat::Text, LogFormat::Json] {
            let tmp = tempfile::tempdir().unwrap();
            let (subscriber, logging, _) =
                Logging::build(&file_config(tmp.path(), format)).unwrap();
            tracing::subscriber::with_default(subscriber, || {
                tracing::info!(peer = %EVIL, "message from {EVIL}");
            });
            drop(logging);
            let text = wait_for(tmp.path(), "INJECTED");
            assert_eq!(text.lines().count(), 1, "{format:?}: {text:?}");
            assert!(
                !text
                    .trim_end_matches('\n')
                    .contains(|c: char| c.is_control() && c != '\t'),
                "{format:?}: {text:?}"
            );
            // In JSON the backslash of `\x0d` is itself escaped; decoded, it reads the same.
            let needle = match format {
                LogFormat::Text => "bad\\x0d\\x0aINJECTED \\x1b[2J\\x00",
                LogFormat::Json => "bad\\\\x0d\\\\x0aINJECTED \\\\x1b[2J\\\\x00",
            };
            assert_eq!(text.matches(needle).count(), 2, "{format:?}: {text}");
        }
    }

    #[test]
    fn tags_become_an_array_and_other_lines_stay() {
        let line = r#"{"level":"INFO","fields":{"message":"x","tags":"[\"big\",\"a b\"]"}}"#;
        let fixed: serde_json::Value = serde_json::from_str(&tags_as_array(line.into())).unwrap();
        assert_eq!(fixed["fields"]["tags"], serde_json::json!(["big", "a b"]));
        let plain = r#"{"fields":{"tags":"not json"}}"#.to_owned();
        assert_eq!(tags_as_array(plain.clone()), plain);
    }

    #[test]
    fn format_level_and_output_change_at_run_time() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
        let (sub, logging, fallback) =
            Logging::build(&file_config(&dir_a, LogFormat::Text)).unwrap();
        assert!(fallback.is_none());
        tracing::subscriber::with_default(sub, || {
            // A span opened under the text format, an event in it after the switch to JSON:
            // the JSON layer must have recorded the span's fields too.
            let span = tracing::info_span!("session", id = 7);
            let _e = span.enter();
            tracing::info!(tags = %r#"["t1"]"#, "text line");
            wait_for(&dir_a, "text line");
            logging
                .apply(&file_config(&dir_a, LogFormat::Json))
                .unwrap();
            tracing::info!(tags = %r#"["t1","t2"]"#, rule = "r", "json line");
            let text = wait_for(&dir_a, "json line");
            let json: serde_json::Value =
                serde_json::from_str(text.lines().last().unwrap()).unwrap();
            assert_eq!(json["fields"]["tags"], serde_json::json!(["t1", "t2"]));
            assert_eq!(json["fields"]["rule"], "r");
            assert_eq!(json["span"]["id"], 7);
            assert!(!text.contains('\x1b'), "no colours in files: {text:?}");

            // Level: debug lines appear only after the change.
            tracing::debug!("hidden debug");
            let mut debug = file_config(&dir_b, LogFormat::Text);
            debug.level = "debug".into();
            logging.apply(&debug).unwrap();
            tracing::debug!("shown debug");
            let b = wait_for(&dir_b, "shown debug");
            assert!(!b.contains("hidden debug") && !read(&dir_a).contains("debug"));

            // A failing change changes nothing.
            let mut bad = debug.clone();
            bad.dir = Some(dir_b.join("popgate.log").join("x"));
            assert!(logging.apply(&bad).is_err());
            tracing::info!("still b");
            wait_for(&dir_b, "still b");
        });
    }

    #[test]
    fn reopen_writes_to_a_fresh_file_at_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (sub, logging, _) = Logging::build(&file_config(dir, LogFormat::Text)).unwrap();
        tracing::subscriber::with_default(sub, || {
            tracing::info!("before the move");
            wait_for(dir, "before the move");
            std::fs::rename(dir.join("popgate.log"), dir.join("popgate.log.1")).unwrap();
            tracing::info!("between");
            logging.reopen().unwrap();
            tracing::info!("after the reopen");
            let fresh = wait_for(dir, "after the reopen");
            assert!(!fresh.contains("before the move"), "{fresh}");
            let moved = std::fs::read_to_string(dir.join("popgate.log.1")).unwrap();
            assert!(moved.contains("before the move"), "{moved}");
        });
    }
}
