//! The module graph stays one-way (see ARCHITECTURE.md): each top-level module of `src/` may
//! use only the modules listed for it below, the protocol core has no I/O, and nothing but the
//! crate root reaches into `session`. Reads the sources as text: `crate::module` paths in code
//! (comments are skipped).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Who may use whom. Lower layers first; a module missing here may not exist.
const ALLOWED: &[(&str, &[&str])] = &[
    ("pop3", &[]),
    ("cidr", &[]),
    ("rules", &["pop3", "cidr"]),
    ("audit", &["pop3", "cidr"]),
    ("config", &["audit", "cidr"]),
    ("limits", &["config"]),
    // Routing mode's choice of upstream: the map file and the precedence of rule, map and
    // default; it reads upstream names from the config.
    ("routing", &["config"]),
    // Logging, privilege drop, sd_notify: the `[log]`/`[process]` tables, audit dirs.
    // The log writer escapes peer text with the protocol core's `printable` (a pure function).
    ("daemon", &["config", "audit", "pop3"]),
    ("proxy", &["pop3", "rules", "audit", "config"]),
    // The upstream connect drives the protocol core's dialogue (`proxy::dialogue`).
    ("net", &["config", "audit", "limits", "pop3", "proxy"]),
    // The OAuth2 bridge: its config types; tokens and credentials (the upstream SASL exchange
    // is the protocol core's). `limits::WorkGate` bounds its Argon2 checks and the penalty is
    // waited before them. Its client replies are `pop3::replies`' texts.
    ("oauth2", &["config", "limits", "pop3"]),
    // Metrics and health: counters the driver records into (the core only hands over plain
    // data), polled counts of the audit sink and the limits, and the HTTP endpoint.
    ("metrics", &["config", "audit", "limits"]),
    (
        "session",
        &[
            "proxy", "net", "audit", "pop3", "rules", "config", "limits", "metrics", "routing",
            "oauth2",
        ],
    ),
    // What `check` and every reload verify; loads what a config names (and names the
    // `[metrics]` bind error among the start errors).
    (
        "check",
        &[
            "config",
            "net",
            "rules",
            "audit",
            "metrics",
            "routing",
            "oauth2",
            "reference",
        ],
    ),
    // The configuration reference (every key, default, reload behaviour; popgate.toml(5)):
    // plain data, used by `check --print` and the man page.
    ("reference", &[]),
    // The PID file and `popgate reload`'s signal: nothing of popgate's.
    ("pidfile", &[]),
    // The crate root's run loop, split out of lib.rs: the snapshot sessions start with, the
    // accept loops, reload and drain. Like the root it starts sessions. Its one refusal is a
    // `pop3::replies` text.
    (
        "runtime",
        &[
            "check", "config", "audit", "limits", "metrics", "net", "session", "pop3",
        ],
    ),
    // The crate root and the CLI are the edge: they may use everything.
    ("lib", &["*"]),
    ("cli", &["*"]),
];

/// Crates a module must not use: the protocol core and the parsers do no I/O.
const FORBIDDEN_CRATES: &[(&str, &[&str])] = &[
    (
        "pop3",
        &[
            "tokio",
            "tokio_rustls",
            "rustls",
            "std::net::TcpStream",
            "std::fs",
        ],
    ),
    (
        "proxy",
        &[
            "tokio",
            "tokio_rustls",
            "rustls",
            "std::net::TcpStream",
            "std::fs",
        ],
    ),
    ("rules", &["tokio", "tokio_rustls", "rustls"]),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to (`src/proxy/hop.rs` → `proxy`, `src/lib.rs` → `lib`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// The code of a file without `//` comments (doc comments name modules freely).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `crate::name` paths used in `code`.
fn crate_uses(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        // `popgate_crate::x` or `$crate::` are not ours.
        let before = rest[..i].chars().last();
        if !name.is_empty()
            && !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        {
            out.insert(name);
        }
        rest = after;
    }
    out
}

#[test]
fn modules_import_only_downwards() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 20, "read only {} files", files.len());
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for f in &files {
        let module = module_of(&src, f);
        if module == "main" {
            continue;
        }
        seen.insert(module.clone());
        let Some(may) = allowed.get(module.as_str()) else {
            problems.push(format!(
                "{}: module `{module}` is not in the map",
                f.display()
            ));
            continue;
        };
        let text = code(&std::fs::read_to_string(f).unwrap());
        for used in crate_uses(&text) {
            if used == module || may.contains(&"*") || may.contains(&used.as_str()) {
                continue;
            }
            problems.push(format!("{}: `{module}` uses `crate::{used}`", f.display()));
        }
        for (m, crates) in FORBIDDEN_CRATES {
            if *m != module {
                continue;
            }
            for c in *crates {
                if text.contains(&format!("{c}::")) || text.contains(&format!("use {c};")) {
                    problems.push(format!(
                        "{}: `{module}` must do no I/O but uses {c}",
                        f.display()
                    ));
                }
            }
        }
    }
    // Every module of the map exists (a renamed module must be placed again).
    for (m, _) in ALLOWED {
        if !seen.contains(*m) {
            problems.push(format!("module `{m}` is in the map but not in src/"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_checker_sees_violations() {
    let uses = crate_uses(&code(
        "use crate::session::Shared;\n// use crate::net::x;\nlet a = crate::pop3::printable(b);\n$crate::x",
    ));
    assert_eq!(
        uses.into_iter().collect::<Vec<_>>(),
        vec!["pop3".to_owned(), "session".to_owned()]
    );
}
