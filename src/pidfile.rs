//! The PID file (`pid_file`): written once the listeners are bound, removed at exit; the
//! reload status file beside it, where the running popgate reports the outcome of each
//! reload ([`ReloadStatus`]); and `popgate reload`, which sends SIGHUP to the process and waits
//! for that outcome ([`reload_and_wait`]).
//!
//! The status file works under a privilege drop without any socket: the daemon writes it (as
//! the user, in the pid file's directory, which is the user's) and any process that may
//! signal popgate may read it. Its first line is `PID GENERATION ok|failed`, the rest the
//! outcome line; the generation grows by one with every reload, so a reader knows which
//! outcome answers its signal.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A PID file problem, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum PidError {
    /// The file could not be written or read.
    #[error("pid file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file does not hold a process id.
    #[error("pid file {}: {text:?} is not a process id", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What it holds.
        text: String,
    },
    /// The reload was asked for, but its outcome never appeared in the status file.
    #[error("popgate (pid {pid}) did not report the reload's outcome in {}: {reason}", path.display())]
    NoOutcome {
        /// The process signalled.
        pid: i32,
        /// The status file.
        path: PathBuf,
        /// What happened instead.
        reason: String,
    },
    /// The signal could not be sent (no such process, or not allowed).
    #[error("cannot signal process {pid} (from {}): {source}", path.display())]
    Signal {
        /// The file.
        path: PathBuf,
        /// The process id it named.
        pid: i32,
        /// Cause.
        source: nix::Error,
    },
}

/// Where a popgate with this `pid_file` reports its reloads: `<pid_file>.reload`.
pub fn status_path(pid_file: &Path) -> PathBuf {
    let mut p = pid_file.as_os_str().to_owned();
    p.push(".reload");
    PathBuf::from(p)
}

/// Where a popgate without `pid_file` reports its reloads under systemd: `popgate.reload` in
/// the unit's `RuntimeDirectory=` (systemd passes it as `$RUNTIME_DIRECTORY` to the service
/// and to its `ExecReload=` command alike).
pub fn runtime_status_path() -> Option<PathBuf> {
    let dirs = std::env::var_os("RUNTIME_DIRECTORY")?;
    let first = std::env::split_paths(&dirs).next()?;
    (!first.as_os_str().is_empty()).then(|| first.join("popgate.reload"))
}

/// The outcome of one reload, as the running popgate reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// The process that reloaded.
    pub pid: i32,
    /// Counts reloads since the start (0: none yet).
    pub generation: u64,
    /// Whether the new config is in force.
    pub ok: bool,
    /// The outcome line (`reloaded: …`, or why nothing changed).
    pub line: String,
}

/// The status file's content: an outcome, or a reload in progress (`ok` is `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Status {
    pid: i32,
    generation: u64,
    ok: Option<bool>,
    line: String,
}

impl Status {
    fn parse(text: &str) -> Option<Status> {
        let (head, line) = text.split_once('\n').unwrap_or((text, ""));
        let mut f = head.split(' ');
        let pid = f.next()?.parse().ok()?;
        let generation = f.next()?.parse().ok()?;
        let ok = match f.next()? {
            "ok" => Some(true),
            "failed" => Some(false),
            "reloading" => None,
            _ => return None,
        };
        Some(Status {
            pid,
            generation,
            ok,
            line: line.trim_end().to_owned(),
        })
    }
}

/// Read the reload status file `path`; `None` when it is missing or not one.
fn read_status(path: &Path) -> Option<Status> {
    Status::parse(&read_bounded(path).ok()?)
}

/// The running popgate's reload status file: written at start (generation 0), when a reload
/// starts (`reloading`, before the config is read) and with its outcome; removed when dropped
/// (if it is still this process's).
#[derive(Debug)]
pub struct ReloadStatus {
    path: PathBuf,
    generation: u64,
}

impl ReloadStatus {
    /// Start the file at `path` (generation 0, `started`).
    pub fn create(path: &Path) -> Result<ReloadStatus, PidError> {
        let status = ReloadStatus {
            path: path.to_owned(),
            generation: 0,
        };
        status.write(true, "started")?;
        Ok(status)
    }

    /// A reload starts (call before the config is read): the next generation, `reloading`.
    pub fn begin(&mut self) -> Result<(), PidError> {
        self.generation += 1;
        self.write_state("reloading", "")
    }

    /// Record the outcome of the reload [`ReloadStatus::begin`] started.
    pub fn record(&mut self, ok: bool, line: &str) -> Result<(), PidError> {
        self.write(ok, line)
    }

    fn write(&self, ok: bool, line: &str) -> Result<(), PidError> {
        self.write_state(if ok { "ok" } else { "failed" }, line)
    }

    fn write_state(&self, state: &str, line: &str) -> Result<(), PidError> {
        let text = format!(
            "{} {} {state}\n{line}\n",
            std::process::id(),
            self.generation
        );
        write_atomically(&self.path, &text)
    }
}

impl Drop for ReloadStatus {
    fn drop(&mut self) {
        if read_status(&self.path).is_some_and(|s| s.pid == std::process::id() as i32) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Write `text` to `path` via a temporary file and a rename: a reader never sees a partial
/// file. The temporary file is created new (`O_EXCL`), never through a link (`O_NOFOLLOW`),
/// under a name nobody can plant in advance: popgate writes these files as root at start, in
/// a directory that belongs to `process.user` after the privilege drop, so a link planted at
/// a fixed name such as `popgate.pid.tmp` would have root overwrite any file it names. The
/// rename replaces a link at `path` itself; it never writes through it.
fn write_atomically(path: &Path, text: &str) -> Result<(), PidError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| PidError::Io {
        path: path.to_owned(),
        source,
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let dir = path.parent().unwrap_or(Path::new(""));
    let mut attempt = 0u32;
    let (tmp, mut file) = loop {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let tmp = dir.join(format!(
            ".{name}.{}.{nanos:08x}{attempt}.tmp",
            std::process::id()
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&tmp)
        {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 16 => {
                attempt += 1;
            }
            Err(e) => return Err(io(e)),
        }
    };
    let written = file
        .write_all(text.as_bytes())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}

/// At most this much of a pid or status file is read: a file replaced by a link to a device
/// or a huge file must not exhaust `popgate reload`.
const MAX_READ: u64 = 64 * 1024;

/// Read up to [`MAX_READ`] bytes of `path` as text.
fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_READ)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// How `popgate reload` finds the process and its outcome.
#[derive(Debug, Clone)]
pub enum ReloadTarget {
    /// The pid file (the status file is beside it).
    PidFile(PathBuf),
    /// A process id (systemd's `$MAINPID`); its status file is under `$RUNTIME_DIRECTORY`.
    Pid(i32),
}

/// Send SIGHUP to the popgate `target` names and wait up to `timeout` for the outcome of that
/// reload. `Ok(None)`: signalled, but there is no status file to wait on (a `--pid` without
/// `$RUNTIME_DIRECTORY`).
pub fn reload_and_wait(
    target: &ReloadTarget,
    timeout: Duration,
) -> Result<Option<ReloadOutcome>, PidError> {
    let (pid, status, shown) = match target {
        ReloadTarget::PidFile(f) => (read_pid(f)?, Some(status_path(f)), f.clone()),
        ReloadTarget::Pid(pid) => (*pid, runtime_status_path(), PathBuf::from("--pid")),
    };
    // The outcome answering this signal is that of the first reload to start after it: a
    // higher generation than the file shows now. A reload in progress now (`reloading`, its
    // config possibly read before the caller changed it) is not it: its generation is the
    // one shown, and the signal makes another one follow.
    let wanted = status
        .as_deref()
        .and_then(read_status)
        .filter(|s| s.pid == pid)
        .map_or(1, |s| s.generation + 1);
    kill(Pid::from_raw(pid), Signal::SIGHUP).map_err(|source| PidError::Signal {
        path: shown.clone(),
        pid,
        source,
    })?;
    let Some(status) = status else {
        return Ok(None);
    };
    let start = Instant::now();
    loop {
        if let Some(s) = read_status(&status)
            && s.pid == pid
            && s.generation >= wanted
            && let Some(ok) = s.ok
        {
            return Ok(Some(ReloadOutcome {
                pid,
                generation: s.generation,
                ok,
                line: s.line,
            }));
        }
        if kill(Pid::from_raw(pid), None).is_err() {
            return Err(PidError::NoOutcome {
                pid,
                path: status,
                reason: "the process is gone".into(),
            });
        }
        if start.elapsed() >= timeout {
            return Err(PidError::NoOutcome {
                pid,
                path: status,
                reason: format!("no outcome within {timeout:?}"),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// This process's PID file; removed when dropped (if it still names this process).
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Write this process's id to `path` (via a temporary file and a rename, so a reader never
    /// sees a partial file), creating its directory if needed. A stale file is replaced.
    pub fn create(path: &Path) -> Result<PidFile, PidError> {
        let io = |source| PidError::Io {
            path: path.to_owned(),
            source,
        };
        if let Ok(old) = read_pid(path)
            && old != std::process::id() as i32
            && kill(Pid::from_raw(old), None).is_ok()
        {
            tracing::warn!(
                pid = old,
                file = %path.display(),
                "the pid file names a process that is still running; replacing it"
            );
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        write_atomically(path, &format!("{}\n", std::process::id()))?;
        Ok(PidFile {
            path: path.to_owned(),
        })
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Another popgate may have taken the file over meanwhile: leave it to that one.
        if read_pid(&self.path).is_ok_and(|p| p == std::process::id() as i32) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The process id in the PID file `path`.
pub fn read_pid(path: &Path) -> Result<i32, PidError> {
    let text = read_bounded(path).map_err(|source| PidError::Io {
        path: path.to_owned(),
        source,
    })?;
    match text.trim().parse::<i32>() {
        Ok(pid) if pid > 0 => Ok(pid),
        _ => Err(PidError::Invalid {
            path: path.to_owned(),
            text: text.trim().to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_read_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("popgate.pid");
        let f = PidFile::create(&path).unwrap();
        assert_eq!(read_pid(&path).unwrap(), std::process::id() as i32);
        assert_eq!(f.path(), path);
        drop(f);
        assert!(!path.exists());
        std::fs::write(&path, "nonsense\n").unwrap();
        assert!(matches!(read_pid(&path), Err(PidError::Invalid { .. })));
    }

    /// A link planted where the old code put its temporary files (`<file>.tmp`) must not make
    /// popgate (root at start, in a directory `process.user` owns) write through it.
    #[test]
    fn a_link_planted_at_a_temporary_name_is_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let pid = dir.path().join("popgate.pid");
        let status = status_path(&pid);
        for planted in ["popgate.pid.tmp", "popgate.pid.reload.tmp"] {
            std::os::unix::fs::symlink(&victim, dir.path().join(planted)).unwrap();
        }
        let f = PidFile::create(&pid).unwrap();
        let mut s = ReloadStatus::create(&status).unwrap();
        s.begin().unwrap();
        s.record(true, "reloaded: nothing changed").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        assert_eq!(read_pid(&pid).unwrap(), std::process::id() as i32);
        assert_eq!(read_status(&status).unwrap().generation, 1);
        // A link at the file's own name is replaced, not written through.
        drop((f, s));
        std::os::unix::fs::symlink(&victim, &pid).unwrap();
        let f = PidFile::create(&pid).unwrap();
        assert!(!std::fs::symlink_metadata(&pid).unwrap().is_symlink());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        drop(f);
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp") && n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        // A status or pid file that is a link to an endless device is read to a bound.
        let zero = dir.path().join("zero.pid");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert!(matches!(read_pid(&zero), Err(PidError::Invalid { .. })));
        assert!(read_status(&zero).is_none());
    }

    #[test]
    fn reload_status_counts_generations_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = status_path(&dir.path().join("popgate.pid"));
        assert_eq!(path, dir.path().join("popgate.pid.reload"));
        let mut s = ReloadStatus::create(&path).unwrap();
        let me = std::process::id() as i32;
        let started = read_status(&path).unwrap();
        assert_eq!(
            (started.pid, started.generation, started.ok),
            (me, 0, Some(true))
        );
        s.begin().unwrap();
        let reloading = read_status(&path).unwrap();
        assert_eq!((reloading.generation, reloading.ok), (1, None));
        s.record(false, "reload failed, nothing changed: a\nb")
            .unwrap();
        let failed = read_status(&path).unwrap();
        assert_eq!((failed.generation, failed.ok), (1, Some(false)));
        assert_eq!(failed.line, "reload failed, nothing changed: a\nb");
        s.begin().unwrap();
        s.record(true, "reloaded: nothing changed").unwrap();
        assert_eq!(read_status(&path).unwrap().generation, 2);
        drop(s);
        assert!(!path.exists());
    }
}
