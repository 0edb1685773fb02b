//! The refresh tokens of one bridge (`tokens_file`): TOML `mailbox = "refresh token"`, one
//! line per mailbox. popgate reads it at every refresh (so `popgate oauth2 login` needs no
//! reload) and rewrites it when the server rotates a token: a temp file (mode 0600) in the same
//! directory, fsync, rename, so a reader sees the old or the new file, never half of one.
//!
//! The directory may be writable by others than popgate (it should not be, but a shared
//! `/etc/popgate` happens): the temp file has a random name and is created exclusively
//! (`O_EXCL`), and neither the tokens file nor the lock file is opened through a symbolic
//! link (`O_NOFOLLOW`), so a planted link cannot redirect a write. Every read-modify-write
//! holds an advisory lock (`flock`) on `.{name}.lock` beside the file, so the daemon, a
//! reload's second store and `popgate oauth2 login` never lose each other's rotated tokens.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};

use argon2::password_hash::rand_core::{OsRng, RngCore as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A tokens file; one writer at a time within this process.
#[derive(Debug)]
pub(crate) struct TokenStore {
    path: PathBuf,
    write: Mutex<()>,
}

impl TokenStore {
    /// A store at `path` (not read yet).
    pub(crate) fn new(path: PathBuf) -> TokenStore {
        TokenStore {
            path,
            write: Mutex::new(()),
        }
    }

    /// The file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// All tokens; a missing file is empty, a symbolic link an error.
    pub(crate) fn read_all(&self) -> Result<BTreeMap<String, String>, String> {
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(NOFOLLOW)
            .open(&self.path);
        let mut text = String::new();
        match opened.and_then(|mut f| f.read_to_string(&mut text)) {
            Ok(_) => toml::from_str(&text)
                .map_err(|e| format!("{}: not a tokens file: {e}", self.path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(format!("{}: cannot read: {}", self.path.display(), why(&e))),
        }
    }

    /// The refresh token of `mailbox`.
    pub(crate) fn get(&self, mailbox: &str) -> Result<Option<String>, String> {
        Ok(self.read_all()?.remove(mailbox))
    }

    /// Sets the refresh token of `mailbox` (read, change, write atomically).
    pub(crate) fn set(&self, mailbox: &str, token: &str) -> Result<(), String> {
        let _one_writer = self.write.lock().unwrap_or_else(|p| p.into_inner());
        // Across processes and stores: held until the rename is done.
        let _locked = self.lock_file()?;
        let mut all = self.read_all()?;
        if all.get(mailbox).map(String::as_str) == Some(token) {
            return Ok(());
        }
        all.insert(mailbox.to_owned(), token.to_owned());
        let text = toml::to_string(&all).map_err(|e| e.to_string())?;
        write_atomically(&self.path, text.as_bytes())
            .map_err(|e| format!("{}: cannot write: {e}", self.path.display()))
    }
}

impl TokenStore {
    /// The advisory lock of the file, taken (blocks while another writer holds it).
    fn lock_file(&self) -> Result<std::fs::File, String> {
        let (dir, name) = dir_and_name(&self.path);
        let path = dir.join(format!(".{name}.lock"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(NOFOLLOW)
            .open(&path)
            .map_err(|e| format!("{}: cannot open the lock: {}", path.display(), why(&e)))?;
        file.lock()
            .map_err(|e| format!("{}: cannot lock: {e}", path.display()))?;
        Ok(file)
    }
}

/// `O_NOFOLLOW`: a symbolic link as the last part of a path is an error (ELOOP), not followed.
const NOFOLLOW: i32 = nix::fcntl::OFlag::O_NOFOLLOW.bits();

/// An I/O error's text; ELOOP (a symbolic link where the file should be) said plainly.
fn why(e: &std::io::Error) -> String {
    if e.raw_os_error() == Some(nix::libc::ELOOP) {
        "is a symbolic link (not followed)".to_owned()
    } else {
        e.to_string()
    }
}

fn dir_and_name(path: &Path) -> (&Path, String) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    (dir, name)
}

fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let (dir, name) = dir_and_name(path);
    // A random name, created exclusively: nothing planted in advance is opened (O_EXCL also
    // refuses a symbolic link at that name).
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", OsRng.next_u64()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(NOFOLLOW)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        // rename replaces a link at `path` itself, it does not write through it.
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Whether `path` can be read by others than its owner (a warning of `popgate check`).
pub(crate) fn too_open(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o077 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn set_get_rotate_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::new(dir.path().join("tokens.toml"));
        assert_eq!(s.get("alice").unwrap(), None);
        s.set("alice", "r1").unwrap();
        s.set("bob@example.com", "r2").unwrap();
        s.set("alice", "r3").unwrap();
        assert_eq!(s.get("alice").unwrap().as_deref(), Some("r3"));
        assert_eq!(s.get("bob@example.com").unwrap().as_deref(), Some("r2"));
        let mode = std::fs::metadata(s.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!too_open(s.path()));
        // no temp files left behind (the lock file stays)
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, [".tokens.toml.lock", "tokens.toml"]);
    }

    #[test]
    fn a_planted_symlink_redirects_no_write() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let path = dir.path().join("tokens.toml");
        let s = TokenStore::new(path.clone());
        // Links at the temp names the old code used (pid-based), and at the lock file's name.
        let old_tmp = dir
            .path()
            .join(format!(".tokens.toml.{}.tmp", std::process::id()));
        symlink(&victim, &old_tmp).unwrap();
        s.set("alice", "r1").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        assert_eq!(s.get("alice").unwrap().as_deref(), Some("r1"));
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
        // The tokens file replaced by a link: read and write refuse it, the victim is intact.
        std::fs::remove_file(&path).unwrap();
        symlink(&victim, &path).unwrap();
        let e = s.get("alice").unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        let e = s.set("alice", "r2").unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        // A link at the lock file: refused too, nothing written through it.
        std::fs::remove_file(&path).unwrap();
        let lock = dir.path().join(".tokens.toml.lock");
        std::fs::remove_file(&lock).unwrap();
        symlink(&victim, &lock).unwrap();
        let e = s.set("alice", "r3").unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    }

    #[test]
    fn two_stores_writing_at_once_lose_no_token() {
        // The daemon and `popgate oauth2 login` (or a reload's second store): two stores of
        // one file, each with its own in-process lock, rotating different mailboxes at once.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let writers: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|who| {
                let store = TokenStore::new(path.clone());
                std::thread::spawn(move || {
                    for i in 0..100 {
                        store.set(&format!("{who}{i}"), &format!("r{i}")).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let all = TokenStore::new(path).read_all().unwrap();
        assert_eq!(all.len(), 200, "tokens were lost: {}", 200 - all.len());
    }
}
