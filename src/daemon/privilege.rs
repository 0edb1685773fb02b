//! The privilege drop (`[process] user`/`group`): after the listeners are bound (ports below
//! 1024 need root) and the log and audit files are open, popgate switches to an ordinary
//! user for good, as nginx's workers or Dovecot's login processes do.
//!
//! The switch itself (setgroups, setgid, setuid in that order) is the `privdrop` crate's;
//! here: resolving the names, handing the files opened as root to the user (so that a reopen
//! on SIGUSR1 can append to them), checking that the directories popgate writes to later
//! (rotated and reopened files, transcripts) are writable for the user, and verifying that
//! root cannot be regained.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Group, Uid, User};

use crate::config::{Config, LogOutput, ProcessConfig};

/// The privilege drop is impossible or failed; popgate does not start.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// `process.user` names no user.
    #[error("process.user {0:?}: no such user")]
    NoUser(String),
    /// `process.group` names no group.
    #[error("process.group {0:?}: no such group")]
    NoGroup(String),
    /// Switching users needs root.
    #[error("process.user/group: switching to {target} needs root, but popgate runs as uid {uid}")]
    NotRoot {
        /// `user:group` asked for.
        target: String,
        /// Our uid.
        uid: u32,
    },
    /// The switch failed, or root could be regained after it.
    #[error("cannot switch to {target}: {reason}")]
    Switch {
        /// `user:group`.
        target: String,
        /// What went wrong.
        reason: String,
    },
    /// A directory popgate writes to is not writable for the user.
    #[error(
        "{key} {}: not writable for {target} (owner uid {uid}, gid {gid}, mode {mode:04o}): \
         chown it to the user, or make it group-writable for process.group",
        dir.display()
    )]
    NotWritable {
        /// Config key.
        key: &'static str,
        /// The directory (or its nearest existing parent).
        dir: PathBuf,
        /// `user:group`.
        target: String,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
        /// Permission bits.
        mode: u32,
    },
}

/// The user and group to switch to.
#[derive(Debug, Clone)]
struct Ids {
    uid: Option<Uid>,
    gid: Gid,
    shown: String,
}

/// Resolve `[process]` into ids; `None` when no switch is configured.
fn resolve(p: &ProcessConfig) -> Result<Option<Ids>, PrivilegeError> {
    let user = match &p.user {
        None => None,
        Some(name) => Some(lookup_user(name).ok_or_else(|| PrivilegeError::NoUser(name.clone()))?),
    };
    let gid = match (&p.group, &user) {
        (Some(name), _) => {
            lookup_group(name).ok_or_else(|| PrivilegeError::NoGroup(name.clone()))?
        }
        (None, Some((_, gid))) => *gid,
        (None, None) => return Ok(None),
    };
    let shown = format!(
        "{}:{}",
        p.user.as_deref().unwrap_or("-"),
        p.group.clone().unwrap_or_else(|| gid.as_raw().to_string())
    );
    Ok(Some(Ids {
        uid: user.map(|(u, _)| u),
        gid,
        shown,
    }))
}

fn lookup_user(name: &str) -> Option<(Uid, Gid)> {
    let by_name = User::from_name(name).ok().flatten();
    let user = match by_name {
        Some(u) => Some(u),
        None => name
            .parse()
            .ok()
            .and_then(|id| User::from_uid(Uid::from_raw(id)).ok().flatten()),
    };
    user.map(|u| (u.uid, u.gid))
}

fn lookup_group(name: &str) -> Option<Gid> {
    match Group::from_name(name).ok().flatten() {
        Some(g) => Some(g.gid),
        None => name.parse().ok().map(Gid::from_raw),
    }
}

/// The directories popgate creates files in while running, with their config keys.
fn write_dirs(config: &Config) -> Vec<(&'static str, &Path)> {
    let mut dirs = Vec::new();
    if config.log.effective_output() == LogOutput::File
        && let Some(d) = &config.log.dir
    {
        dirs.push(("log.dir", d.as_path()));
    }
    if config.audit.enabled
        && config.audit.output == crate::audit::AuditOutput::File
        && let Some(d) = &config.audit.dir
    {
        dirs.push(("audit.dir", d.as_path()));
    }
    if let Some(d) = &config.audit.transcript.dir {
        dirs.push(("audit.transcript.dir", d.as_path()));
    }
    // The pid file and the reload status file beside it: rewritten after each reload and
    // removed at exit, as the user.
    if let Some(d) = config
        .pid_file
        .as_deref()
        .and_then(Path::parent)
        .filter(|d| !d.as_os_str().is_empty())
    {
        dirs.push(("pid_file", d));
    }
    dirs
}

/// With `[process] user`/`group` set: check that the user exists and that every directory
/// popgate writes to after the switch (`log.dir`, `audit.dir`, `audit.transcript.dir`, the
/// directory of `pid_file`) is writable for it. A directory that does not exist yet is
/// fine: popgate creates it as root at start and hands it to the user (whoever owns the
/// parent). `popgate check` and `run` call this.
pub fn check_dirs_for_user(config: &Config) -> Result<(), PrivilegeError> {
    let Some(ids) = resolve(&config.process)? else {
        return Ok(());
    };
    if ids.uid.is_some_and(|u| u.is_root()) {
        return Ok(());
    }
    for (key, dir) in write_dirs(config) {
        let existing = dir;
        // Missing: created at start and handed over.
        let Ok(meta) = std::fs::metadata(existing) else {
            continue;
        };
        let mode = meta.mode() & 0o7777;
        let writable = match ids.uid {
            Some(uid) if meta.uid() == uid.as_raw() => mode & 0o300 == 0o300,
            _ if meta.gid() == ids.gid.as_raw() => mode & 0o030 == 0o030,
            _ => mode & 0o003 == 0o003,
        };
        if !writable {
            return Err(PrivilegeError::NotWritable {
                key,
                dir: existing.to_owned(),
                target: ids.shown.clone(),
                uid: meta.uid(),
                gid: meta.gid(),
                mode,
            });
        }
    }
    Ok(())
}

/// Whether the user `ids` may access `path` with `bits` (0o4 read, 0o1 search), by the
/// permission bits of the file and of every directory above it (owner, then the group, then
/// others; the switch leaves the group as the only supplementary group). `None`: it cannot
/// be told (e.g. a missing file, reported elsewhere).
fn user_may(ids: &Ids, path: &Path, bits: u32) -> Option<bool> {
    let allowed = |meta: &std::fs::Metadata, want: u32| {
        let mode = meta.mode();
        let shift = match ids.uid {
            Some(uid) if meta.uid() == uid.as_raw() => 6,
            _ if meta.gid() == ids.gid.as_raw() => 3,
            _ => 0,
        };
        (mode >> shift) & want == want
    };
    let path = std::path::absolute(path).ok()?;
    for dir in path.ancestors().skip(1) {
        if !allowed(&std::fs::metadata(dir).ok()?, 0o1) {
            return Some(false);
        }
    }
    Some(allowed(&std::fs::metadata(&path).ok()?, bits))
}

/// Run as root with `[process] user` set: a warning for each of `files` (config key, path)
/// that the user could not read after the switch, that is at the next reload (the reload
/// would be refused). Empty when no user is set (or it names no user: [`check_dirs_for_user`]
/// says so), it is root, or popgate does not run as root.
pub fn unreadable_for_user(process: &ProcessConfig, files: &[(String, &Path)]) -> Vec<String> {
    let Ok(Some(ids)) = resolve(process) else {
        return Vec::new();
    };
    if ids.uid.is_none_or(|u| u.is_root()) || !nix::unistd::geteuid().is_root() {
        return Vec::new();
    }
    files
        .iter()
        .filter(|(_, f)| user_may(&ids, f, 0o4) == Some(false))
        .map(|(key, f)| {
            format!(
                "{key}: {} is not readable for {}: popgate starts (it reads it as root) but a \
                 reload after the switch will fail; make it readable for the user (e.g. mode \
                 0640 with the user's group, directories searchable)",
                f.display(),
                ids.shown
            )
        })
        .collect()
}

/// A privilege drop prepared before the files are opened (see [`PrivilegeDrop::prepare`])
/// and applied after the listeners are bound ([`PrivilegeDrop::apply`]).
#[derive(Debug)]
pub struct PrivilegeDrop {
    ids: Ids,
    /// The directories popgate writes to (those that exist at `apply`).
    dirs: Vec<PathBuf>,
    /// Parts of those paths that did not exist before popgate started: popgate creates
    /// them as root, and hands them to the user.
    missing: Vec<PathBuf>,
}

impl PrivilegeDrop {
    /// With `[process] user`/`group` set: resolve them, make sure popgate runs as root, and
    /// note which directories popgate is about to create. Call before opening the log and
    /// audit files. `None` when no switch is configured.
    pub fn prepare(config: &Config) -> Result<Option<PrivilegeDrop>, PrivilegeError> {
        let Some(ids) = resolve(&config.process)? else {
            return Ok(None);
        };
        let me = nix::unistd::geteuid();
        if !me.is_root() {
            return Err(PrivilegeError::NotRoot {
                target: ids.shown,
                uid: me.as_raw(),
            });
        }
        let mut missing = Vec::new();
        let mut dirs = Vec::new();
        for (_, dir) in write_dirs(config) {
            dirs.push(dir.to_owned());
            let mut part = Some(dir);
            while let Some(p) = part.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
                missing.push(p.to_owned());
                part = p.parent();
            }
        }
        Ok(Some(PrivilegeDrop { ids, dirs, missing }))
    }

    /// Switch for good: hand the directories popgate created and the files it has open in
    /// its log and audit directories to the user, set the supplementary groups to the group
    /// alone, set the group, set the user, then make sure root cannot be regained. Returns
    /// the new `(uid, gid)`. Any failure is an error: popgate must not run as root by
    /// mistake.
    pub fn apply(self) -> Result<(u32, u32), PrivilegeError> {
        let ids = self.ids;
        let fail = |reason: String| PrivilegeError::Switch {
            target: ids.shown.clone(),
            reason,
        };
        let dirs: Vec<PathBuf> = self
            .dirs
            .iter()
            .filter_map(|d| d.canonicalize().ok())
            .collect();
        let created = self.missing.into_iter().filter(|p| p.is_dir());
        for path in created.chain(open_files_in(&dirs)) {
            nix::unistd::chown(&path, ids.uid, Some(ids.gid))
                .map_err(|e| fail(format!("chown {}: {e}", path.display())))?;
        }
        let mut drop = privdrop::PrivDrop::default()
            .fallback_to_ids_if_names_are_numeric()
            .group(ids.gid.as_raw().to_string());
        if let Some(uid) = ids.uid {
            drop = drop.user(uid.as_raw().to_string());
        }
        drop.apply().map_err(|e| fail(e.to_string()))?;
        let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
        if ids
            .uid
            .is_some_and(|want| uid != want || nix::unistd::geteuid() != want)
            || gid != ids.gid
        {
            return Err(fail(format!("still uid {uid}, gid {gid} afterwards")));
        }
        if ids.uid.is_some_and(|u| !u.is_root()) && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
            return Err(fail("root could be regained afterwards".into()));
        }
        Ok((uid.as_raw(), gid.as_raw()))
    }
}

/// Regular files this process has open below one of `dirs` (Linux: `/proc/self/fd`).
fn open_files_in(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = fds
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|p| dirs.iter().any(|d| p.starts_with(d)) && p.is_file())
        .collect();
    files.sort();
    files.dedup();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_resolve() {
        let p = |user: Option<&str>, group: Option<&str>| ProcessConfig {
            user: user.map(str::to_owned),
            group: group.map(str::to_owned),
        };
        assert!(resolve(&p(None, None)).unwrap().is_none());
        let root = resolve(&p(Some("root"), None)).unwrap().unwrap();
        assert_eq!(
            (root.uid, root.gid),
            (Some(Uid::from_raw(0)), Gid::from_raw(0))
        );
        let num = resolve(&p(Some("0"), Some("0"))).unwrap().unwrap();
        assert_eq!(num.uid, Some(Uid::from_raw(0)));
        let e = resolve(&p(Some("no-such-user-popgate"), None)).unwrap_err();
        assert!(e.to_string().contains("process.user"), "{e}");
        let e = resolve(&p(Some("root"), Some("no-such-group-popgate"))).unwrap_err();
        assert!(e.to_string().contains("process.group"), "{e}");
    }
}
