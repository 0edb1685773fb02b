//! Local users of the OAuth2 bridge (`credentials_file`): the client's password is checked
//! here against an Argon2 PHC hash and never goes upstream.
//!
//! File format (TOML): `user = "<PHC hash>"`, or `user = { hash = "<PHC hash>", mailbox =
//! "name@upstream" }` when the upstream mailbox differs from the local user name.

use std::collections::HashMap;
use std::path::Path;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Argon2, password_hash::rand_core::OsRng};
use serde::Deserialize;

/// One local user: the hash (kept as text, parsed again per check; it was parsed at load) and
/// the upstream mailbox.
#[derive(Debug, Clone)]
struct Entry {
    hash: String,
    mailbox: String,
}

/// The users of one bridge, loaded at start and reload.
#[derive(Debug, Clone)]
pub(crate) struct Credentials {
    users: HashMap<String, Entry>,
    /// Verified when the user is unknown, so that an unknown user costs the same time as a
    /// wrong password (no user enumeration by timing): made with the costliest parameters
    /// found in the file, so a user with heavier ones is no slower than an unknown one.
    dummy: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawEntry {
    Hash(String),
    Full {
        hash: String,
        #[serde(default)]
        mailbox: Option<String>,
    },
}

impl Credentials {
    /// Reads and checks `path`: TOML as above, every hash a valid PHC string.
    pub(crate) fn load(path: &Path) -> Result<Credentials, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses the file's text (see the module docs).
    pub(crate) fn parse(text: &str) -> Result<Credentials, String> {
        let raw: HashMap<String, RawEntry> = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut users = HashMap::with_capacity(raw.len());
        let mut costliest: Option<(u64, Argon2<'static>)> = None;
        for (user, entry) in raw {
            let (hash, mailbox) = match entry {
                RawEntry::Hash(h) => (h, None),
                RawEntry::Full { hash, mailbox } => (hash, mailbox),
            };
            let parsed = PasswordHash::new(&hash)
                .map_err(|e| format!("user {user:?}: not a PHC password hash: {e}"))?;
            if let Some(a) = hasher_of(&parsed) {
                let p = a.params();
                let cost = u64::from(p.m_cost()) * u64::from(p.t_cost());
                if costliest.as_ref().is_none_or(|(c, _)| cost > *c) {
                    costliest = Some((cost, a));
                }
            }
            let mailbox = mailbox.unwrap_or_else(|| user.clone());
            users.insert(user, Entry { hash, mailbox });
        }
        let hasher = costliest.map_or_else(Argon2::default, |(_, a)| a);
        let salt = SaltString::generate(&mut OsRng);
        let dummy = hasher
            .hash_password(b"popgate-dummy-password", &salt)
            .map_err(|e| format!("cannot make the dummy hash: {e}"))?
            .to_string();
        Ok(Credentials { users, dummy })
    }

    /// How many users there are.
    pub(crate) fn len(&self) -> usize {
        self.users.len()
    }

    /// The upstream mailbox of `user` if `password` is right; `None` otherwise (also for an
    /// unknown user, after the same amount of work). CPU-heavy by design: call it off the
    /// async workers (`spawn_blocking`).
    pub(crate) fn check(&self, user: &str, password: &[u8]) -> Option<String> {
        match self.users.get(user) {
            Some(e) => verify(&e.hash, password).then(|| e.mailbox.clone()),
            None => {
                let _ = verify(&self.dummy, password);
                None
            }
        }
    }
}

/// The Argon2 hasher with the algorithm, version and parameters of `hash` (None for a hash
/// that is not Argon2's; its verification fails anyway).
fn hasher_of(hash: &PasswordHash<'_>) -> Option<Argon2<'static>> {
    let algorithm = argon2::Algorithm::try_from(hash.algorithm).ok()?;
    let version = match hash.version {
        Some(v) => argon2::Version::try_from(v).ok()?,
        None => argon2::Version::default(),
    };
    let params = argon2::Params::try_from(hash).ok()?;
    Some(Argon2::new(algorithm, version, params))
}

fn verify(hash: &str, password: &[u8]) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default().verify_password(password, &parsed).is_ok(),
        Err(_) => false,
    }
}

/// A new Argon2id PHC hash of `password` with a random salt and the crate's default
/// parameters (`popgate oauth2 hash-password`).
pub fn hash_password(password: &[u8]) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password, &salt)?
        .to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn right_wrong_unknown_and_mailbox() {
        let h = hash_password(b"pw1").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        let text =
            format!("alice = {h:?}\nbob = {{ hash = {h:?}, mailbox = \"bob@contoso.example\" }}\n");
        let c = Credentials::parse(&text).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c.check("alice", b"pw1").as_deref(), Some("alice"));
        assert_eq!(c.check("alice", b"pw2"), None);
        assert_eq!(
            c.check("bob", b"pw1").as_deref(),
            Some("bob@contoso.example")
        );
        assert_eq!(c.check("nobody", b"pw1"), None);
    }

    /// A hash of `pw` with memory `m` KiB and `t` passes.
    fn hash_with(pw: &[u8], m: u32, t: u32) -> String {
        let params = argon2::Params::new(m, t, 1, None).unwrap();
        let a = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        a.hash_password(pw, &SaltString::generate(&mut OsRng))
            .unwrap()
            .to_string()
    }

    /// The shortest of five runs of `f`.
    fn fastest(mut f: impl FnMut()) -> std::time::Duration {
        (0..5)
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed()
            })
            .min()
            .unwrap()
    }

    #[test]
    fn unknown_users_cost_as_much_as_the_heaviest_user() {
        // One user with the defaults, one with 4x the memory and 2x the passes (8x the work):
        // a wrong password for the heavy one must not take much longer than an unknown user,
        // or timing tells which names exist.
        let light = hash_with(b"pw", 19_456, 2);
        let heavy = hash_with(b"pw", 4 * 19_456, 4);
        let c = Credentials::parse(&format!("light = {light:?}\nheavy = {heavy:?}\n")).unwrap();
        assert!(c.dummy.contains("m=77824,t=4"), "{}", c.dummy);
        let wrong_heavy = fastest(|| assert_eq!(c.check("heavy", b"nope"), None));
        let unknown = fastest(|| assert_eq!(c.check("nobody", b"nope"), None));
        let ratio = wrong_heavy.as_secs_f64() / unknown.as_secs_f64();
        // Same work: about 1. With a default-parameter dummy it is about 8.
        assert!(
            ratio < 2.0,
            "wrong password for the heavy user {wrong_heavy:?}, unknown user {unknown:?}"
        );
    }

    #[test]
    fn bad_hash_is_refused_at_load() {
        let e = Credentials::parse("alice = \"plain-text\"\n").unwrap_err();
        assert!(e.contains("alice") && e.contains("PHC"), "{e}");
    }
}
