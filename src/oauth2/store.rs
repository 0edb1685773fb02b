//! The refresh tokens of one bridge (`tokens_file`): TOML `mailbox = "refresh token"`, one
//! line per mailbox. popgate reads it at every refresh (so `popgate oauth2 login` needs no
//! reload) and rewrites it when the server rotates a token: a temp file (mode 0600) in the same
//! directory, fsync, rename, so a reader sees the old or the new file, never half of one.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
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

    /// All tokens; a missing file is empty.
    pub(crate) fn read_all(&self) -> Result<BTreeMap<String, String>, String> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => toml::from_str(&text)
                .map_err(|e| format!("{}: not a tokens file: {e}", self.path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(format!("{}: cannot read: {e}", self.path.display())),
        }
    }

    /// The refresh token of `mailbox`.
    pub(crate) fn get(&self, mailbox: &str) -> Result<Option<String>, String> {
        Ok(self.read_all()?.remove(mailbox))
    }

    /// Sets the refresh token of `mailbox` (read, change, write atomically).
    pub(crate) fn set(&self, mailbox: &str, token: &str) -> Result<(), String> {
        let _one_writer = self.write.lock().unwrap_or_else(|p| p.into_inner());
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

fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // An existing temp file keeps its mode through open(): set it again.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(data)?;
        f.sync_all()?;
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
        // no temp files left behind
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
