//! Expansion of `rules` patterns such as `rules/*.toml`.
//!
//! Deliberately tiny: `*` (any run of characters) and `?` (one character) in the *file name*
//! only; the directory part is taken literally. Like a shell, a wildcard never matches a
//! leading `.`, so editor lock files such as `.#x.toml` are not loaded.

use std::path::{Path, PathBuf};

use super::error::RuleError;

/// The files `patterns` name, relative to `base`: each pattern's matches sorted by name,
/// patterns in order, a file named twice kept at its first position.
pub(crate) fn expand(patterns: &[String], base: &Path) -> Result<Vec<PathBuf>, RuleError> {
    let mut files: Vec<PathBuf> = Vec::new();
    for pattern in patterns {
        for f in expand_one(pattern, base)? {
            if !files.contains(&f) {
                files.push(f);
            }
        }
    }
    Ok(files)
}

fn expand_one(pattern: &str, base: &Path) -> Result<Vec<PathBuf>, RuleError> {
    let (dir, name) = match pattern.rfind('/') {
        Some(i) => (&pattern[..=i], &pattern[i + 1..]),
        None => ("", pattern),
    };
    if has_wildcard(dir) {
        return Err(RuleError::BadPattern {
            pattern: pattern.to_string(),
            reason: "wildcards are only supported in the file name, not in directories",
        });
    }
    if name.is_empty() {
        return Err(RuleError::BadPattern {
            pattern: pattern.to_string(),
            reason: "names a directory, not files (try `dir/*.toml`)",
        });
    }
    let dir = base.join(dir);
    let no_match = || RuleError::NoMatch {
        pattern: pattern.to_string(),
        dir: dir.clone(),
    };
    if !has_wildcard(name) {
        let path = dir.join(name);
        return if path.is_file() {
            Ok(vec![path])
        } else {
            Err(no_match())
        };
    }
    let entries = std::fs::read_dir(&dir).map_err(|source| RuleError::Io {
        path: dir.clone(),
        source,
    })?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| RuleError::Io {
            path: dir.clone(),
            source,
        })?;
        // Names that are not UTF-8 cannot match a UTF-8 pattern with literal parts reliably;
        // skip them rather than guess.
        let Ok(file_name) = entry.file_name().into_string() else {
            continue;
        };
        if matches(name.as_bytes(), file_name.as_bytes()) && entry.path().is_file() {
            names.push(file_name);
        }
    }
    if names.is_empty() {
        return Err(no_match());
    }
    names.sort();
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?'])
}

/// Whether `name` matches the glob `pat` (`*`, `?`, everything else literal).
pub(crate) fn matches(pat: &[u8], name: &[u8]) -> bool {
    if name.first() == Some(&b'.') && pat.first() != Some(&b'.') {
        return false;
    }
    // Classic linear-time wildcard match: remember the last `*` and retry from it.
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pat.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                // `?` takes one whole UTF-8 character, not one byte.
                n += if c == b'?' { utf8_len(name[n]) } else { 1 };
                p += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pat[p.min(pat.len())..].iter().all(|&c| c == b'*')
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_matching() {
        assert!(matches(b"*.toml", b"require-tls.toml"));
        assert!(matches(b"*.toml", b"x.toml"));
        assert!(!matches(b"*.toml", b"x.toml.bak"));
        assert!(!matches(b"*.toml", b".#x.toml"));
        assert!(matches(b".*.toml", b".x.toml"));
        assert!(matches(b"a?c", b"abc"));
        assert!(matches(b"a?c", "aéc".as_bytes()));
        assert!(!matches(b"a?c", b"ac"));
        assert!(matches(b"*", b"anything"));
        assert!(matches(b"a*b*c", b"aXXbYYbc"));
        assert!(!matches(b"a*b*c", b"aXXbYYb"));
        assert!(matches(b"exact", b"exact"));
        assert!(!matches(b"exact", b"exacter"));
        assert!(matches(b"**x", b"x"));
    }

    fn touch(dir: &Path, name: &str) {
        std::fs::write(dir.join(name), "").unwrap();
    }

    #[test]
    fn expands_sorted_and_dedups() {
        let tmp = tempfile::tempdir().unwrap();
        let rules = tmp.path().join("rules");
        std::fs::create_dir(&rules).unwrap();
        for n in ["b.toml", "a.toml", "c.txt", ".#a.toml"] {
            touch(&rules, n);
        }
        std::fs::create_dir(rules.join("d.toml")).unwrap(); // a directory is not a file
        let pats = vec!["rules/b.toml".to_string(), "rules/*.toml".to_string()];
        let files = expand(&pats, tmp.path()).unwrap();
        assert_eq!(files, vec![rules.join("b.toml"), rules.join("a.toml")]);
    }

    #[test]
    fn errors() {
        let tmp = tempfile::tempdir().unwrap();
        let e = expand(&["*.toml".into()], tmp.path()).unwrap_err();
        assert!(matches!(e, RuleError::NoMatch { .. }), "{e}");
        assert!(e.to_string().contains("`*.toml` matches no file"), "{e}");
        let e = expand(&["missing.toml".into()], tmp.path()).unwrap_err();
        assert!(matches!(e, RuleError::NoMatch { .. }), "{e}");
        let e = expand(&["*/x.toml".into()], tmp.path()).unwrap_err();
        assert!(
            e.to_string().contains("only supported in the file name"),
            "{e}"
        );
        let e = expand(&["rules/".into()], tmp.path()).unwrap_err();
        assert!(matches!(e, RuleError::BadPattern { .. }), "{e}");
        let e = expand(&["nodir/*.toml".into()], tmp.path()).unwrap_err();
        assert!(matches!(e, RuleError::Io { .. }), "{e}");
        assert!(e.to_string().contains("nodir"), "{e}");
    }
}
