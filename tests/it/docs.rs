//! The documentation is tested like the code: the configuration reference against the key table
//! behind `popgate check --print` and `popgate.toml(5)` (`src/reference.rs`), every relative link
//! and `#anchor` of the Markdown pages against the files and headings it names (offline), and
//! the README's front door against what it promises (its two commands first, at most 400 lines,
//! an example configuration that loads).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use popgate::reference::{KEYS, Reload};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// The configuration reference

/// The header row of the tables in docs/configuration.md that document keys.
const KEY_TABLE_HEADER: &str = "| key | default | reload | meaning |";

/// One documented key: its default and reload cells as written.
#[derive(Debug, PartialEq)]
struct Row {
    default: String,
    reload: String,
}

/// The rows of every key table of `doc` (tables headed [`KEY_TABLE_HEADER`]), by key; a key
/// documented twice is an error.
fn documented_keys(doc: &str) -> Result<BTreeMap<String, Row>, String> {
    let mut rows = BTreeMap::new();
    let mut in_table = false;
    for line in doc.lines() {
        if line.trim() == KEY_TABLE_HEADER {
            in_table = true;
            continue;
        }
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        if !in_table || line.starts_with("|---") {
            continue;
        }
        let cells: Vec<&str> = line.split(" | ").map(str::trim).collect();
        let key = cells[0].trim_start_matches('|').trim();
        let Some(key) = key.strip_prefix('`').and_then(|k| k.strip_suffix('`')) else {
            return Err(format!("a key row whose key is not `code`: {line}"));
        };
        if cells.len() < 4 {
            return Err(format!(
                "{key}: a row without default, reload and meaning: {line}"
            ));
        }
        let default = cells[1];
        let default = default
            .strip_prefix('`')
            .and_then(|d| d.strip_suffix('`'))
            .unwrap_or(default);
        let row = Row {
            default: default.to_owned(),
            reload: cells[2].to_owned(),
        };
        if rows.insert(key.to_owned(), row).is_some() {
            return Err(format!("{key} is documented twice"));
        }
    }
    Ok(rows)
}

/// What is wrong between `doc` and the reference table `keys` (key, default, reload), one line
/// per problem, naming the keys.
fn reference_mismatches(doc: &str, keys: &[(&str, &str, &str)]) -> Vec<String> {
    let rows = match documented_keys(doc) {
        Ok(rows) => rows,
        Err(e) => return vec![e],
    };
    let mut problems = Vec::new();
    let known: BTreeSet<&str> = keys.iter().map(|(k, _, _)| *k).collect();
    let missing: Vec<&str> = keys
        .iter()
        .map(|(k, _, _)| *k)
        .filter(|k| !rows.contains_key(*k))
        .collect();
    if !missing.is_empty() {
        problems.push(format!("not documented: {}", missing.join(", ")));
    }
    let unknown: Vec<&str> = rows
        .keys()
        .map(String::as_str)
        .filter(|k| !known.contains(k))
        .collect();
    if !unknown.is_empty() {
        problems.push(format!(
            "documented but not in src/reference.rs: {}",
            unknown.join(", ")
        ));
    }
    for (key, default, reload) in keys {
        if let Some(row) = rows.get(*key) {
            if row.default != *default {
                problems.push(format!(
                    "{key}: default `{}` documented, `{default}` in src/reference.rs",
                    row.default
                ));
            }
            if row.reload != *reload {
                problems.push(format!(
                    "{key}: reload `{}` documented, `{reload}` in src/reference.rs",
                    row.reload
                ));
            }
        }
    }
    problems
}

/// Every key of `src/reference.rs` (what `check --print` and `popgate.toml(5)` use) has one row
/// in docs/configuration.md with the same default and reload behaviour, and no row names a key
/// popgate does not read.
#[test]
fn configuration_reference_documents_exactly_the_keys_popgate_reads() {
    let keys: Vec<(&str, &str, &str)> = KEYS
        .iter()
        .map(|k| {
            let reload = match k.reload {
                Reload::Applied => "reload",
                Reload::Restart => "restart",
            };
            (k.key, k.default, reload)
        })
        .collect();
    let problems = reference_mismatches(&read("docs/configuration.md"), &keys);
    assert!(
        problems.is_empty(),
        "docs/configuration.md vs src/reference.rs:\n{}",
        problems.join("\n")
    );
}

/// The checker above sees a missing key, an unknown one, a wrong default and a wrong reload.
#[test]
fn the_reference_checker_names_missing_unknown_and_wrong_keys() {
    let doc = format!(
        "# x\n\n{KEY_TABLE_HEADER}\n|---|---|---|---|\n\
         | `a.one` | `\"5s\"` | reload | fine |\n\
         | `a.two` | `7` | reload | wrong default |\n\
         | `a.three` | not set | reload | wrong reload |\n\
         | `a.ghost` | `1` | reload | unknown |\n\n\
         | signal | what |\n|---|---|\n| `SIGHUP` | not a key table |\n"
    );
    let keys = [
        ("a.one", "\"5s\"", "reload"),
        ("a.two", "8", "reload"),
        ("a.three", "not set", "restart"),
        ("a.four", "1", "reload"),
    ];
    let problems = reference_mismatches(&doc, &keys);
    assert_eq!(
        problems,
        [
            "not documented: a.four",
            "documented but not in src/reference.rs: a.ghost",
            "a.two: default `7` documented, `8` in src/reference.rs",
            "a.three: reload `reload` documented, `restart` in src/reference.rs",
        ],
    );
    let twice = format!(
        "{KEY_TABLE_HEADER}\n| `a.one` | 1 | reload | x |\n\
         | `a.one` | 1 | reload | y |\n"
    );
    assert_eq!(
        reference_mismatches(&twice, &keys[..1]),
        ["a.one is documented twice"]
    );
}

// ---------------------------------------------------------------------------------------------
// Links and anchors

/// The Markdown pages whose links are checked, relative to the repository.
fn pages() -> Vec<String> {
    let mut pages = vec!["README.md".to_owned(), "rules/README.md".to_owned()];
    for dir in ["docs", "benches"] {
        let mut found: Vec<String> = std::fs::read_dir(root().join(dir))
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".md"))
            .map(|n| format!("{dir}/{n}"))
            .collect();
        found.sort();
        pages.extend(found);
    }
    pages
}

/// The lines of `text` outside fenced code blocks, with inline code spans blanked out (their
/// text kept without backticks, so a heading's slug still sees it).
fn prose_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fence: Option<&str> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if let Some(f) = fence {
            if trimmed.starts_with(f) {
                fence = None;
            }
            continue;
        }
        if trimmed.starts_with("```") {
            fence = Some("```");
            continue;
        }
        if trimmed.starts_with("~~~") {
            fence = Some("~~~");
            continue;
        }
        out.push(line.to_owned());
    }
    out
}

/// `line` with every inline code span replaced by `replace(content)`.
fn map_code_spans(line: &str, replace: impl Fn(&str) -> String) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(start) = rest.find('`') {
        let ticks = rest[start..].len() - rest[start..].trim_start_matches('`').len();
        let fence = &rest[start..start + ticks];
        let after = &rest[start + ticks..];
        match after.find(fence) {
            Some(end) => {
                out.push_str(&rest[..start]);
                out.push_str(&replace(&after[..end]));
                rest = &after[end + ticks..];
            }
            None => {
                out.push_str(&rest[..start + ticks]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// GitHub's anchor for a heading's text: the rendered text (code without backticks, link text
/// without its target, no emphasis markers), lowercased, with everything but letters, digits,
/// `_`, `-` and spaces removed and spaces turned into `-`.
fn slug(heading: &str) -> String {
    let text = map_code_spans(heading, str::to_owned);
    let link = regex::Regex::new(r"\[([^\]]*)\]\([^)]*\)").unwrap();
    let text = link.replace_all(&text, "$1");
    text.trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '_' || c == '-' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a page's headings, with GitHub's `-1`, `-2` suffixes for repeated ones.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for line in prose_lines(text) {
        let level = line.len() - line.trim_start_matches('#').len();
        if !(1..=6).contains(&level) || !line[level..].starts_with(' ') {
            continue;
        }
        let base = slug(line[level..].trim().trim_end_matches('#').trim());
        let n = seen.entry(base.clone()).or_insert(0);
        out.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    out
}

/// The link targets of a page: inline links and images `[text](target "title")` and reference
/// definitions `[label]: target`, outside code.
fn link_targets(text: &str) -> Vec<String> {
    let inline = regex::Regex::new(r#"\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)"#).unwrap();
    let definition = regex::Regex::new(r"^\s{0,3}\[[^\]]+\]:\s+<?([^\s>]+)").unwrap();
    let mut out = Vec::new();
    for line in prose_lines(text) {
        let line = map_code_spans(&line, |_| "code".to_owned());
        out.extend(inline.captures_iter(&line).map(|c| c[1].to_owned()));
        out.extend(definition.captures_iter(&line).map(|c| c[1].to_owned()));
    }
    out
}

/// What is wrong with the relative links of `page` (a path relative to `base`), one line each.
fn broken_links(base: &Path, page: &str) -> Vec<String> {
    let text = std::fs::read_to_string(base.join(page)).unwrap();
    let dir = Path::new(page).parent().unwrap_or(Path::new(""));
    let mut problems = Vec::new();
    for target in link_targets(&text) {
        if target.contains("://") || target.starts_with("mailto:") {
            continue;
        }
        let (path, anchor) = match target.split_once('#') {
            Some((p, a)) => (p, Some(a)),
            None => (target.as_str(), None),
        };
        if path.starts_with('/') {
            problems.push(format!("{page}: `{target}`: absolute path"));
            continue;
        }
        let rel: PathBuf = if path.is_empty() {
            PathBuf::from(page)
        } else {
            normalize(&dir.join(path))
        };
        let file = base.join(&rel);
        if !file.exists() {
            problems.push(format!(
                "{page}: `{target}`: no such file {}",
                rel.display()
            ));
            continue;
        }
        let Some(anchor) = anchor else { continue };
        if rel.extension().is_none_or(|e| e != "md") {
            continue;
        }
        let headings = anchors(&std::fs::read_to_string(&file).unwrap());
        if !headings.contains(anchor) {
            problems.push(format!(
                "{page}: `{target}`: no heading with the anchor #{anchor} in {}",
                rel.display()
            ));
        }
    }
    problems
}

/// `a/b/../c` as `a/c` (without touching the file system), so that pending pages compare.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Every relative link of README.md, docs/*.md, rules/README.md and benches/*.md names a file
/// that exists, and every `#anchor` a heading of that page (GitHub's slugs). No network.
#[test]
fn every_relative_link_and_anchor_of_the_documentation_resolves() {
    let pages = pages();
    assert!(
        pages.iter().any(|p| p == "docs/configuration.md"),
        "{pages:?}"
    );
    let problems: Vec<String> = pages
        .iter()
        .flat_map(|page| broken_links(root(), page))
        .collect();
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
}

/// The link checker sees a missing file, a missing anchor, an anchor of the same page, links in
/// code that are not links, GitHub's slugs (punctuation dropped, code kept, repeats numbered).
#[test]
fn the_link_checker_sees_missing_files_and_anchors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("docs")).unwrap();
    std::fs::write(
        dir.path().join("docs/a.md"),
        "# Page A\n\n## What `popgate check` verifies\n\n## Notes\n\n## Notes\n\n\
         ```sh\n# not a heading\n[not a link](gone.md)\n```\n\n\
         See [B](../b.md#signals-privilege-drop-and-systemd), [here](#notes-1), \
         [there](#what-popgate-check-verifies), `[code](gone.md)`, \
         [web](https://example.org/x.md).\n\
         Broken: [no file](missing.md), [no anchor](../b.md#nowhere), [self](#not-a-heading).\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.md"),
        "# B\n\n### Signals, privilege drop and systemd\n",
    )
    .unwrap();
    assert_eq!(
        broken_links(dir.path(), "docs/a.md"),
        [
            "docs/a.md: `missing.md`: no such file docs/missing.md",
            "docs/a.md: `../b.md#nowhere`: no heading with the anchor #nowhere in b.md",
            "docs/a.md: `#not-a-heading`: no heading with the anchor #not-a-heading in docs/a.md",
        ]
    );
    assert_eq!(
        slug("OAuth2 bridge: the real login (issue 18 item 1), 2026-12-07 05:35 UTC"),
        "oauth2-bridge-the-real-login-issue-18-item-1-2026-12-07-0535-utc"
    );
    assert_eq!(slug("`[upstream.oauth2]`"), "upstreamoauth2");
    assert_eq!(slug("[[listener]] and [x](y.md)"), "listener-and-x");
}

// ---------------------------------------------------------------------------------------------
// The README

/// The README is the front door: the two commands a newcomer needs come first, exactly, and it
/// stays at most 400 lines (the rest lives under docs/).
#[test]
fn readme_is_a_front_door_with_the_two_commands_first() {
    let readme = read("README.md");
    let lines = readme.lines().count();
    assert!(lines <= 400, "README.md has {lines} lines (at most 400)");
    let first = readme
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a first sh block");
    let commands: Vec<&str> = first
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .collect();
    assert_eq!(commands, ["cargo run --release -- demo", "cargo test"]);
    let before = &readme[..readme.find("```sh\n").unwrap()];
    assert!(
        !before.contains("```"),
        "the two commands are the first block"
    );
}

/// The README's deployment example (Dovecot behind popgate, STLS enforced) is a valid config
/// that enforces TLS the way the text says, and its rule example is a valid rule file.
#[test]
fn readme_examples_are_a_valid_config_and_rule_file() {
    let readme = read("README.md");
    let blocks: Vec<&str> = readme
        .split("```toml\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .collect();
    let path = Path::new("README.md");
    let config_text = blocks
        .iter()
        .find(|b| b.contains("[[listener]]"))
        .expect("a config example");
    let config = popgate::Config::parse(config_text, path).expect("parses");
    config.validate(path).expect("valid");
    assert_eq!(config.listeners.len(), 2);
    let upstream = config.default_upstream();
    assert_eq!(upstream.address.len(), 1);
    assert_eq!(
        upstream.forward_client,
        popgate::config::ForwardClient::Xclient
    );
    assert!(
        config_text.contains("rules = [\"rules/require-tls.toml\"]"),
        "{config_text}"
    );
    // The rule file it names exists, relative to the shipped config's directory as to the repo.
    assert!(root().join("rules/require-tls.toml").is_file());
    let rules_text = blocks
        .iter()
        .find(|b| b.contains("[[rule]]"))
        .expect("a rule example");
    let rules = popgate::rules::RuleSet::parse(rules_text, path).expect("rule parses");
    assert_eq!(rules.len(), 1);
}
