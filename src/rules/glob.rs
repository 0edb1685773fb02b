//! Expansion of `rules` patterns such as `rules/*.toml`.
//!
//! Deliberately tiny: `*` (any run of characters) and `?` (one character) in the *file name*
//! only; the directory part is taken literally. Like a shell, a wildcard never matches a
//! leading `.`, so editor lock files such as `.#x.toml` are not loaded.
//!
//! The name match is the `glob` crate's. Its directory walk (`glob::glob`) is not used: it
//! takes the base directory as pattern text (a config dir with `[` or a non-UTF-8 name would
//! need escaping or fail), allows wildcards in directories, and says nothing about which
//! pattern matched nothing. `[`/`]` stay literal as they always were here, and a run of `*`
//! means one `*` (the crate reserves `**` for whole directory components).

use std::path::{Path, PathBuf};

use super::error::RuleError;

/// The files `patterns` name, relative to `base`: each pattern's matches sorted by name,
/// patterns in order, a file named twice kept at its first position. A wildcard pattern that
/// matches nothing is no error (an empty `rules.d/` is a valid setup) but gives a warning, the
/// second part of the result; a file named without wildcards must exist.
pub(crate) fn expand(
    patterns: &[String],
    base: &Path,
) -> Result<(Vec<PathBuf>, Vec<String>), RuleError> {
    let mut files: Vec<PathBuf> = Vec::new();
    let mut warnings = Vec::new();
    for pattern in patterns {
        match expand_one(pattern, base) {
            Err(e @ RuleError::NoMatch { .. }) if has_wildcard(pattern) => {
                warnings.push(e.to_string());
            }
            r => {
                for f in r? {
                    if !files.contains(&f) {
                        files.push(f);
                    }
                }
            }
        }
    }
    Ok((files, warnings))
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
        if matches(name, &file_name) && entry.path().is_file() {
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
pub(crate) fn matches(pat: &str, name: &str) -> bool {
    let mut escaped = String::with_capacity(pat.len());
    for c in pat.chars() {
        match c {
            '*' if escaped.ends_with('*') => {}
            '[' => escaped.push_str("[[]"),
            ']' => escaped.push_str("[]]"),
            c => escaped.push(c),
        }
    }
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: true,
    };
    // Every `[` is escaped and `*` runs are single: the pattern always compiles.
    glob::Pattern::new(&escaped).is_ok_and(|p| p.matches_with(name, options))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_matching() {
        assert!(matches("*.toml", "require-tls.toml"));
        assert!(matches("*.toml", "x.toml"));
        assert!(!matches("*.toml", "x.toml.bak"));
        assert!(!matches("*.toml", ".#x.toml"));
        assert!(matches(".*.toml", ".x.toml"));
        assert!(matches("a?c", "abc"));
        assert!(matches("a?c", "aéc"));
        assert!(!matches("a?c", "ac"));
        assert!(matches("*", "anything"));
        assert!(matches("a*b*c", "aXXbYYbc"));
        assert!(!matches("a*b*c", "aXXbYYb"));
        assert!(matches("exact", "exact"));
        assert!(!matches("exact", "exacter"));
        assert!(matches("**x", "x"));
        // Brackets are literal, not character classes.
        assert!(matches("[ab].toml", "[ab].toml"));
        assert!(!matches("[ab].toml", "a.toml"));
        assert!(matches("x]*", "x]y"));
        assert!(!matches("?x", ".x"));
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
        let (files, warnings) = expand(&pats, tmp.path()).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(files, vec![rules.join("b.toml"), rules.join("a.toml")]);
    }

    #[test]
    fn errors() {
        let tmp = tempfile::tempdir().unwrap();
        // A wildcard matching nothing is a warning.
        let (files, warnings) = expand(&["*.toml".into()], tmp.path()).unwrap();
        assert!(files.is_empty());
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("`*.toml` matches no file"),
            "{warnings:?}"
        );
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
