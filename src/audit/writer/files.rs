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
//! - Retention ([`prune_dated`]) goes by the date in a file's name, never by its inode times:
//!   a restored or copied file of an old day goes, yesterday's file stays whatever its mtime.
//!   It runs when a writer starts and when a new period begins, never on a reopen (SIGUSR1).
//!   The operational log files (`popgate.YYYY-MM-DD.log`) use the same writer and rules.
//!
//! Transcripts (full dialogues) are stricter, `0600` in a `0700` directory (made or checked
//! at start by the sink, created per session by `transcript`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::audit::model::config::AuditRotation;

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

/// How a rolling appender names its files: `prefix.YYYY-MM-DD.suffix` (daily),
/// `prefix.YYYY-MM-DD-HH.suffix` (hourly) or `prefix.suffix` (never rotated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dated {
    /// `audit`, `popgate`.
    pub(crate) prefix: &'static str,
    /// `jsonl`, `log`.
    pub(crate) suffix: &'static str,
    /// How often a new file begins.
    pub(crate) period: Period,
}

/// How often a [`Dated`] file begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Period {
    /// Each UTC day.
    Daily,
    /// Each UTC hour.
    Hourly,
    /// One file, no date in its name.
    Never,
}

impl Dated {
    /// The audit files of `rotation`.
    pub(crate) fn audit(rotation: AuditRotation) -> Dated {
        Dated {
            prefix: "audit",
            suffix: "jsonl",
            period: match rotation {
                AuditRotation::Daily => Period::Daily,
                AuditRotation::Hourly => Period::Hourly,
            },
        }
    }

    /// The name of the file of the period containing `t` (UTC).
    pub(crate) fn name(&self, t: SystemTime) -> String {
        // "2026-03-01T09:15:02Z"
        let stamp = humantime::format_rfc3339_seconds(t).to_string();
        let (p, s) = (self.prefix, self.suffix);
        match self.period {
            Period::Daily => format!("{p}.{}.{s}", &stamp[..10]),
            Period::Hourly => format!("{p}.{}-{}.{s}", &stamp[..10], &stamp[11..13]),
            Period::Never => format!("{p}.{s}"),
        }
    }

    /// The date (`YYYY-MM-DD`) in a file name of this kind, daily or hourly (a change of
    /// `rotation` leaves files of the other kind behind: they expire too).
    fn date_of<'a>(&self, name: &'a str) -> Option<&'a str> {
        let mid = name
            .strip_prefix(self.prefix)?
            .strip_prefix('.')?
            .strip_suffix(self.suffix)?
            .strip_suffix('.')?;
        let b = mid.as_bytes();
        let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
        let date_ok = b.len() >= 10
            && digits(0..4)
            && b[4] == b'-'
            && digits(5..7)
            && b[7] == b'-'
            && digits(8..10);
        let rest_ok = b.len() == 10 || (b.len() == 13 && b[10] == b'-' && digits(11..13));
        (date_ok && rest_ok).then(|| &mid[..10])
    }
}

/// The name the rolling appender gives the audit file of the period containing `t` (UTC):
/// `audit.YYYY-MM-DD.jsonl` or `audit.YYYY-MM-DD-HH.jsonl`.
#[cfg(test)]
pub(crate) fn file_name(t: SystemTime, rotation: AuditRotation) -> String {
    Dated::audit(rotation).name(t)
}

/// Delete the files of kind `naming` in `dir` whose name dates them before the last
/// `keep_days` UTC days (today is one of them); `0` keeps everything. Only the name counts,
/// never the file's times. Files of other names, and entries that are no regular files, are
/// left alone. Returns the files deleted; failures are logged.
pub(crate) fn prune_dated(
    dir: &Path,
    naming: Dated,
    keep_days: u32,
    now: SystemTime,
) -> Vec<PathBuf> {
    let mut gone = Vec::new();
    if keep_days == 0 || naming.period == Period::Never {
        return gone;
    }
    let back = Duration::from_secs(86_400 * (u64::from(keep_days) - 1));
    let oldest_kept =
        humantime::format_rfc3339_seconds(now.checked_sub(back).unwrap_or(SystemTime::UNIX_EPOCH))
            .to_string();
    let oldest_kept = &oldest_kept[..10];
    let Ok(entries) = std::fs::read_dir(dir) else {
        return gone;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(date) = naming.date_of(name) else {
            continue;
        };
        // ISO dates compare as strings.
        if date >= oldest_kept || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(file = %path.display(), keep_days, "expired file deleted");
                gone.push(path);
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot delete an expired file");
            }
        }
    }
    gone
}

/// A writer that makes sure the file the appender is about to write (and, near a rotation
/// boundary, the next one) exists with [`FILE_MODE`] before every write, and deletes expired
/// files ([`prune_dated`]) when a new period begins.
pub(crate) struct Private<W> {
    inner: W,
    dir: PathBuf,
    naming: Dated,
    keep_days: u32,
    /// The file of the period last written in (a change is a rollover: prune).
    period: Option<String>,
    /// Files already ensured, newest last (at most two are kept).
    ensured: Vec<String>,
}

impl<W: Write> Private<W> {
    /// Wrap `inner`, which writes rotated files named `naming` into `dir`; creates the current
    /// file now. With `prune`, expired files are deleted now too (a start, not a reopen).
    pub(crate) fn new(
        inner: W,
        dir: &Path,
        naming: Dated,
        keep_days: u32,
        prune: bool,
    ) -> Private<W> {
        let now = SystemTime::now();
        let mut p = Private {
            inner,
            dir: dir.to_owned(),
            naming,
            keep_days,
            period: (!prune).then(|| naming.name(now)),
            ensured: Vec::new(),
        };
        p.ensure(now);
        p
    }

    fn ensure(&mut self, now: SystemTime) {
        let current = self.naming.name(now);
        if self.period.as_deref() != Some(current.as_str()) {
            prune_dated(&self.dir, self.naming, self.keep_days, now);
            self.period = Some(current);
        }
        for t in [now, now + AHEAD] {
            let name = self.naming.name(t);
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
pub(crate) fn precreate(dir: &Path, naming: Dated) {
    let _ = create_private(&dir.join(naming.name(SystemTime::now())));
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

    fn at(s: &str) -> SystemTime {
        humantime::parse_rfc3339(s).unwrap()
    }

    /// Plant files named for `dates` (with an old mtime for all of them), prune, and return
    /// what is left, sorted.
    fn left_after(naming: Dated, names: &[&str], keep_days: u32, now: &str) -> Vec<String> {
        let tmp = tempfile::tempdir().unwrap();
        for n in names {
            let p = tmp.path().join(n);
            std::fs::write(
                &p, "{}
",
            )
            .unwrap();
            let f = std::fs::File::options().write(true).open(&p).unwrap();
            f.set_modified(at("2001-01-01T00:00:00Z")).unwrap();
        }
        prune_dated(tmp.path(), naming, keep_days, at(now));
        let mut left: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        left
    }

    #[test]
    fn retention_goes_by_the_date_in_the_name() {
        let daily = Dated::audit(AuditRotation::Daily);
        let names = [
            "audit.2020-01-01.jsonl",
            "audit.2026-02-27.jsonl",
            "audit.2026-02-28.jsonl",
            "audit.2026-02-28-23.jsonl",
            "audit.2026-03-01.jsonl",
            "audit.2026-03-01-09.jsonl",
            "audit.2026-03-02.jsonl",
            "audit.jsonl",
            "audit.2020-01-01.jsonl.gz",
            "notes.2020-01-01.jsonl",
            "audit.2020-1-01.jsonl",
        ];
        // keep_days = 2: today and yesterday, whatever their mtime (all 2001 here).
        assert_eq!(
            left_after(daily, &names, 2, "2026-03-01T00:00:01Z"),
            [
                "audit.2020-01-01.jsonl.gz",
                "audit.2020-1-01.jsonl",
                "audit.2026-02-28-23.jsonl",
                "audit.2026-02-28.jsonl",
                "audit.2026-03-01-09.jsonl",
                "audit.2026-03-01.jsonl",
                "audit.2026-03-02.jsonl",
                "audit.jsonl",
                "notes.2020-01-01.jsonl",
            ]
        );
        // keep_days = 1: today only.
        assert_eq!(
            left_after(daily, &names[..6], 1, "2026-03-01T23:59:59Z"),
            ["audit.2026-03-01-09.jsonl", "audit.2026-03-01.jsonl"]
        );
        // 0 keeps everything, and an unrotated file has nothing to expire.
        assert_eq!(
            left_after(daily, &names, 0, "2030-01-01T00:00:00Z").len(),
            names.len()
        );
        let never = Dated {
            prefix: "popgate",
            suffix: "log",
            period: Period::Never,
        };
        assert_eq!(
            left_after(
                never,
                &["popgate.log", "popgate.2020-01-01.log"],
                1,
                "2026-03-01T00:00:00Z"
            )
            .len(),
            2
        );
        // Operational logs: popgate.YYYY-MM-DD.log.
        let logs = Dated {
            prefix: "popgate",
            suffix: "log",
            period: Period::Daily,
        };
        assert_eq!(
            left_after(
                logs,
                &[
                    "popgate.2020-01-01.log",
                    "popgate.2026-02-28.log",
                    "audit.2020-01-01.jsonl"
                ],
                2,
                "2026-03-01T12:00:00Z"
            ),
            ["audit.2020-01-01.jsonl", "popgate.2026-02-28.log"]
        );
    }

    #[test]
    fn a_reopen_deletes_nothing_a_new_period_prunes() {
        let tmp = tempfile::tempdir().unwrap();
        let naming = Dated::audit(AuditRotation::Daily);
        let old = tmp.path().join("audit.2020-01-01.jsonl");
        std::fs::write(&old, "").unwrap();
        let p = Private::new(Vec::new(), tmp.path(), naming, 2, false);
        assert!(old.exists(), "a reopen keeps even an expired file");
        let mut p = p;
        // The next period begins: expired files go.
        p.period = Some("audit.2000-01-01.jsonl".into());
        p.write_all(b"x\n").unwrap();
        assert!(!old.exists());
        std::fs::write(&old, "").unwrap();
        let _ = Private::new(Vec::new(), tmp.path(), naming, 2, true);
        assert!(!old.exists(), "a start prunes");
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
