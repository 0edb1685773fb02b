//! The PID file (`pid_file`): written once the listeners are bound, removed at exit; and
//! `popgate reload`, which sends SIGHUP to the process it names.

use std::path::{Path, PathBuf};

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
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, format!("{}\n", std::process::id())).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
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
    let text = std::fs::read_to_string(path).map_err(|source| PidError::Io {
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

/// Send SIGHUP (reload) to the process named in `path`; returns its id.
pub fn signal_reload(path: &Path) -> Result<i32, PidError> {
    let pid = read_pid(path)?;
    kill(Pid::from_raw(pid), Signal::SIGHUP).map_err(|source| PidError::Signal {
        path: path.to_owned(),
        pid,
        source,
    })?;
    Ok(pid)
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
}
