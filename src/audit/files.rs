//! File modes of the audit trail: the files name users and subjects, so they are not for
//! every local account.
//!
//! - A directory popgate creates is `0750`; one that exists is left as the admin made it, with
//!   a warning when it is world-readable (popgate does not second-guess an admin's choice).
//! - Audit files are created `0640` (owner writes, the admin group reads). The rotating
//!   appender creates files with the default mode, so [`Private`] creates each period's file
//!   first, and the next period's file shortly before the boundary, with the right mode; the
//!   appender then only opens it for appending.
//!
//! Transcripts (full dialogues) are stricter, `0600` in a `0700` directory (made or checked
//! at start by the sink, created per session by `transcript`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::config::AuditRotation;

/// Mode of a directory popgate creates for audit files.
pub(crate) const DIR_MODE: u32 = 0o750;
/// Mode of an audit file.
pub(crate) const FILE_MODE: u32 = 0o640;
/// How long before a rotation boundary the next file is created.
const AHEAD: Duration = Duration::from_secs(5);

/// Create `dir` with `mode` (exactly, whatever the umask) when it does not exist; warn when
/// an existing one is world-readable or searchable.
pub(crate) fn prepare_dir(dir: &Path, mode: u32, what: &str) -> std::io::Result<()> {
    match std::fs::metadata(dir) {
        Ok(meta) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let m = meta.permissions().mode() & 0o777;
                if m & 0o007 != 0 {
                    tracing::warn!(
                        dir = %dir.display(),
                        mode = format!("{m:04o}"),
                        "{what} directory is accessible to every local user; consider chmod o-rwx"
                    );
                }
            }
            let _ = meta;
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut b = std::fs::DirBuilder::new();
            b.recursive(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::DirBuilderExt;
                b.mode(mode);
            }
            b.create(dir)?;
            set_mode(dir, mode)
        }
        Err(e) => Err(e),
    }
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_: &Path, _: u32) -> std::io::Result<()> {
    Ok(())
}

/// Create `path` with [`FILE_MODE`] unless it exists (an existing file keeps its mode).
pub(crate) fn create_private(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.append(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(FILE_MODE);
    }
    match options.open(path) {
        Ok(_) => set_mode(path, FILE_MODE),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// The name the rolling appender gives the file of the period containing `t` (UTC):
/// `audit.YYYY-MM-DD.jsonl` or `audit.YYYY-MM-DD-HH.jsonl`.
pub(crate) fn file_name(t: SystemTime, rotation: AuditRotation) -> String {
    // "2026-03-01T09:15:02Z"
    let stamp = humantime::format_rfc3339_seconds(t).to_string();
    match rotation {
        AuditRotation::Daily => format!("audit.{}.jsonl", &stamp[..10]),
        AuditRotation::Hourly => format!("audit.{}-{}.jsonl", &stamp[..10], &stamp[11..13]),
    }
}

/// A writer that makes sure the file the appender is about to write (and, near a rotation
/// boundary, the next one) exists with [`FILE_MODE`] before every write.
pub(crate) struct Private<W> {
    inner: W,
    dir: PathBuf,
    rotation: AuditRotation,
    /// Files already ensured, newest last (at most two are kept).
    ensured: Vec<String>,
}

impl<W: Write> Private<W> {
    /// Wrap `inner`, which writes rotated files into `dir`; creates the current file now.
    pub(crate) fn new(inner: W, dir: &Path, rotation: AuditRotation) -> Private<W> {
        let mut p = Private {
            inner,
            dir: dir.to_owned(),
            rotation,
            ensured: Vec::new(),
        };
        p.ensure(SystemTime::now());
        p
    }

    fn ensure(&mut self, now: SystemTime) {
        for t in [now, now + AHEAD] {
            let name = file_name(t, self.rotation);
            if self.ensured.contains(&name) {
                continue;
            }
            if let Err(e) = create_private(&self.dir.join(&name)) {
                tracing::warn!(file = %name, error = %e, "cannot create the audit file with mode 0640");
            }
            self.ensured.push(name);
            if self.ensured.len() > 2 {
                self.ensured.remove(0);
            }
        }
    }
}

/// Create the file of the current period with [`FILE_MODE`] before an appender does; call
/// before building the appender in `dir`.
pub(crate) fn precreate(dir: &Path, rotation: AuditRotation) {
    let _ = create_private(&dir.join(file_name(SystemTime::now(), rotation)));
}

impl<W: Write> Write for Private<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.ensure(SystemTime::now());
        self.inner.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        // One ensure per batch (the sink writes a batch with one write_all).
        self.ensure(SystemTime::now());
        self.inner.write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_appender() {
        let t = humantime::parse_rfc3339("2026-03-01T09:15:02Z").unwrap();
        assert_eq!(file_name(t, AuditRotation::Daily), "audit.2026-03-01.jsonl");
        assert_eq!(
            file_name(t, AuditRotation::Hourly),
            "audit.2026-03-01-09.jsonl"
        );
    }

    #[cfg(unix)]
    #[test]
    fn modes() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        prepare_dir(&dir, DIR_MODE, "audit").unwrap();
        assert_eq!(mode(&dir), 0o750);
        // An existing directory is left alone.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_dir(&dir, DIR_MODE, "audit").unwrap();
        assert_eq!(mode(&dir), 0o755);
        let f = dir.join("x.jsonl");
        create_private(&f).unwrap();
        assert_eq!(mode(&f), 0o640);
        // An existing file keeps its mode and its content.
        std::fs::write(&f, "keep").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        create_private(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "keep");
    }
}
