//! The architecture of `docs/ARCHITECTURE.md`, held by reading the sources as text (`//`
//! comments skipped):
//!
//! - the module graph stays one-way: each top-level module of `src/` may use only the modules
//!   listed for it in [`ALLOWED`], and `docs/ARCHITECTURE.md`'s module map is that table;
//! - the protocol core (`src/pop3/`, `src/proxy/`) does no I/O: no sockets or TLS, no clock
//!   reads, threads, locks or file I/O, and it does not use `audit` ([`CORE_FORBIDDEN`]);
//!   violations being removed are listed in [`KNOWN_VIOLATIONS`] with their issue;
//! - the audit event model and the shared value types do no I/O either;
//! - no two crate-visible types share a name.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Who may use whom (`docs/ARCHITECTURE.md`'s module map is this table). Lower layers first;
/// a module missing here may not exist.
const ALLOWED: &[(&str, &[&str])] = &[
    ("cidr", &[]),
    // Value types shared by the core, the config, the drivers and the audit trail.
    ("types", &["cidr"]),
    // The tracker reports who a login is for as `types::Identity`.
    ("pop3", &["types"]),
    ("rules", &["pop3", "cidr", "types"]),
    ("audit", &["pop3", "cidr", "types"]),
    ("config", &["audit", "cidr", "types"]),
    ("limits", &["config"]),
    // Routing mode's choice of upstream: the map file and the precedence of rule, map and
    // default; it reads upstream names from the config.
    ("routing", &["config"]),
    // Logging, privilege drop, sd_notify: the `[log]`/`[process]` tables, audit dirs.
    // The log writer escapes peer text with the protocol core's `printable` (a pure function).
    ("daemon", &["config", "audit", "pop3"]),
    ("proxy", &["pop3", "rules", "types", "config"]),
    // The upstream connect drives the protocol core's dialogue (`proxy::dialogue`).
    ("net", &["config", "types", "limits", "pop3", "proxy"]),
    // The OAuth2 bridge: its config types; tokens and credentials (the upstream SASL exchange
    // is the protocol core's). `limits::WorkGate` bounds its Argon2 checks and the penalty is
    // waited before them. Its client replies are `pop3::replies`' texts.
    ("oauth2", &["config", "limits", "pop3", "state"]),
    // Metrics and health: counters the driver records into (the core only hands over plain
    // data), polled counts of the audit sink and the limits, and the HTTP endpoint.
    ("metrics", &["config", "audit", "limits"]),
    // Live control (`[control]`): the session registry, taps (with the transcript's
    // redaction), the control socket and its client.
    ("control", &["config", "audit", "pop3", "cidr"]),
    // Fleet state (`[state]`): the store behind the login penalty, the per-address session
    // slots and the OAuth2 tokens; counts into the limiter and the metrics.
    ("state", &["config", "limits", "metrics", "audit"]),
    // Content scanning (issue 23): the spool of a held message and the clamd/rspamd clients;
    // its config tables, the verdict types, and the scan metrics it records.
    ("scan", &["config", "types", "metrics"]),
    (
        "session",
        &[
            "proxy", "net", "audit", "pop3", "rules", "config", "limits", "metrics", "routing",
            "oauth2", "types", "control", "state", "scan",
        ],
    ),
    // What `check` and every reload verify; loads what a config names (and names the
    // `[metrics]` bind error among the start errors); builds the `[[scanner]]` clients.
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
            "state",
            "scan",
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
            "check", "config", "audit", "limits", "metrics", "net", "session", "control", "pop3",
            "state",
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
            if *m != module || is_test_code(&f.to_string_lossy()) {
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
    assert!(
        problems.is_empty(),
        "{}\n(a dependency that belongs goes into ALLOWED here and into the module map of \
         docs/ARCHITECTURE.md, with the reason)",
        problems.join("\n")
    );
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

/// The protocol core: its files, except the `tests.rs` files, the harnesses and inline
/// `#[cfg(test)]` modules (tests drive the core with whatever they need).
const CORE: &[&str] = &["pop3", "proxy"];

/// Test and fuzz harnesses inside the core, compiled only for tests and the `fuzzing` feature:
/// `proxy/sim.rs` plays driver, client, server and clock around the session machine.
const HARNESSES: &[&str] = &["proxy/sim.rs"];

/// Whether `file` is test code: a `tests.rs` file or a harness.
fn is_test_code(file: &str) -> bool {
    file.ends_with("/tests.rs") || HARNESSES.iter().any(|h| file.ends_with(&format!("/{h}")))
}

/// What the core must not contain, with the reason named in a failure. A pattern matches
/// where it does not continue an identifier on the left (nor on the right when it ends with
/// one): `Mutex` does not match `MutexFree` or `no_Mutex`. File I/O is spotted by its paths
/// (`fs::`, `File::`), so an enum variant named `File` is not a violation.
const CORE_FORBIDDEN: &[(&str, &str)] = &[
    (
        "Instant::now",
        "a clock read (time is an input: handlers take `now`)",
    ),
    (
        "SystemTime::now",
        "a clock read (time is an input: handlers take `now`)",
    ),
    (
        "tokio::time",
        "a clock or timer (the driver owns the one clock)",
    ),
    ("std::thread", "a thread"),
    ("thread::sleep", "a blocking sleep"),
    ("tokio::spawn", "a task"),
    ("Mutex", "a lock"),
    ("RwLock", "a lock"),
    ("std::fs", "file I/O"),
    ("fs::", "file I/O (`std::fs`, `tokio::fs`)"),
    ("File::", "file I/O"),
    ("OpenOptions", "file I/O"),
    (
        "crate::audit",
        "the audit trail (an I/O module; value types are in `types`)",
    ),
    (
        "Sleep(",
        "a blocking delay (a delay is a deadline the core reports, input is read meanwhile)",
    ),
    (
        ".elapsed()",
        "a clock read (`Instant::elapsed` reads the clock; subtract from `now`)",
    ),
    ("std::sync::atomic", "state shared between threads"),
    ("TcpStream", "a socket (the driver dials)"),
    ("TcpListener", "a socket (the run loop listens)"),
    ("UdpSocket", "a socket"),
    ("tokio::net", "a socket"),
    ("std::net::Tcp", "a socket"),
    ("std::process", "a process"),
];

/// Violations of [`CORE_FORBIDDEN`] that are being removed, allowed here by name and
/// reported on every run: (file, pattern, issue). An entry whose violation is gone fails the
/// test, so the table only shrinks.
/// (Issue 20 item 2 removed the last one: `Sleep(` in `src/proxy/hop.rs`.)
const KNOWN_VIOLATIONS: &[(&str, &str, &str)] = &[];

/// Outside the core, modules that must stay pure too: the audit event model (clock reads
/// allowed: an event may be stamped `now`) and the shared value types.
const PURE: &[(&str, &[&str])] = &[
    (
        "src/audit/model",
        &[
            "fs::",
            "File::",
            "OpenOptions",
            "tokio",
            "std::thread",
            "Mutex",
            "RwLock",
            "std::net::TcpStream",
            // The model is what the writer and the reader share; it uses neither.
            "writer::",
            "reader::",
        ],
    ),
    (
        "src/types.rs",
        &[
            "fs::",
            "File::",
            "OpenOptions",
            "tokio",
            "std::thread",
            "Mutex",
            "RwLock",
            "std::net::TcpStream",
            "Instant::now",
            "SystemTime::now",
        ],
    ),
];

fn ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Whether `code` contains `pattern` not as part of a longer identifier.
fn mentions(code: &str, pattern: &str) -> bool {
    let ends_ident = pattern.chars().last().is_some_and(ident_char);
    code.match_indices(pattern).any(|(i, _)| {
        let before = code[..i].chars().last();
        let after = code[i + pattern.len()..].chars().next();
        let joins_left = before.is_some_and(ident_char);
        let joins_right = ends_ident && after.is_some_and(ident_char);
        !(joins_left || joins_right)
    })
}

/// `code` without its inline test modules: from a `#[cfg(test)]` line followed by a
/// top-level `mod name {` line up to the `}` closing it at column 0 (rustfmt's layout).
fn without_test_modules(code: &str) -> String {
    let mut out = Vec::new();
    let mut lines = code.lines().peekable();
    while let Some(line) = lines.next() {
        let opens_test_mod = line.trim() == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|n| n.starts_with("mod ") && n.trim_end().ends_with('{'));
        if opens_test_mod {
            for inner in lines.by_ref() {
                if inner == "}" {
                    break;
                }
            }
            continue;
        }
        out.push(line);
    }
    out.join("\n")
}

/// The patterns of `forbidden` that `code` uses.
fn violations<'a>(code: &str, forbidden: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    forbidden
        .into_iter()
        .filter(|p| mentions(code, p))
        .collect()
}

/// Source files as `(path relative to the crate, text)`.
fn sources(under: &str) -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join(under);
    let mut files = Vec::new();
    if dir.is_dir() {
        rust_files(&dir, &mut files);
    } else {
        files.push(dir);
    }
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let rel = f.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            (rel, std::fs::read_to_string(&f).unwrap())
        })
        .collect()
}

#[test]
fn the_core_reads_no_clock_and_has_no_threads_locks_files_or_audit() {
    let mut found = Vec::new();
    for module in CORE {
        for (file, text) in sources(&format!("src/{module}")) {
            if is_test_code(&file) {
                continue;
            }
            let code = without_test_modules(&code(&text));
            for p in violations(&code, CORE_FORBIDDEN.iter().map(|(p, _)| *p)) {
                found.push((file.clone(), p));
            }
        }
    }
    let (known, problems) = judge(&found, KNOWN_VIOLATIONS);
    for k in known {
        eprintln!("known core violation: {k}");
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Sorts `found` core violations (file, pattern) by `known` (file, pattern, issue): the
/// known ones to report, and the problems: new violations, and known ones no longer found.
fn judge(found: &[(String, &str)], known: &[(&str, &str, &str)]) -> (Vec<String>, Vec<String>) {
    let mut reported = Vec::new();
    let mut problems = Vec::new();
    for (file, pattern) in found {
        match known.iter().find(|(f, p, _)| f == file && p == pattern) {
            Some((_, _, issue)) => reported.push(format!("{file}: `{pattern}` ({issue})")),
            None => {
                let why = CORE_FORBIDDEN
                    .iter()
                    .find(|(p, _)| p == pattern)
                    .map_or("forbidden", |(_, why)| why);
                problems.push(format!(
                    "{file}: the protocol core uses `{pattern}`: {why} (docs/ARCHITECTURE.md)"
                ));
            }
        }
    }
    for (file, pattern, issue) in known {
        if !found.iter().any(|(f, p)| f == file && p == pattern) {
            problems.push(format!(
                "{file} no longer uses `{pattern}` ({issue}): remove it from KNOWN_VIOLATIONS"
            ));
        }
    }
    (reported, problems)
}

#[test]
fn the_audit_model_and_the_shared_types_do_no_io() {
    let mut problems = Vec::new();
    for (under, forbidden) in PURE {
        let files = sources(under);
        assert!(!files.is_empty(), "{under} is gone: place it again");
        for (file, text) in files {
            let code = without_test_modules(&code(&text));
            for p in violations(&code, forbidden.iter().copied()) {
                problems.push(format!("{file}: must do no I/O but uses `{p}`"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Crate-visible (`pub`, `pub(crate)`, `pub(super)`, `pub(in ..)`) type names defined in
/// `code`: structs, enums, unions, traits and type aliases.
fn visible_type_names(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in code.lines() {
        let Some(rest) = line.trim_start().strip_prefix("pub") else {
            continue;
        };
        let rest = match rest.strip_prefix('(') {
            Some(r) => match r.find(')') {
                Some(i) => &r[i + 1..],
                None => continue,
            },
            None => rest,
        };
        let mut words = rest.split_whitespace();
        let Some(mut kw) = words.next() else {
            continue;
        };
        if kw == "unsafe" {
            kw = words.next().unwrap_or("");
        }
        if !matches!(kw, "struct" | "enum" | "union" | "trait" | "type") {
            continue;
        }
        let name: String = words
            .next()
            .unwrap_or("")
            .chars()
            .take_while(|c| ident_char(*c))
            .collect();
        if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

/// No two crate-visible types of `src/` share a name, so a name says which type it is
/// wherever it is read (`Outcome` was three types). Private types are scoped to their module
/// and may repeat a name: `State` is private in `proxy/front.rs`, `proxy/dialogue/mod.rs` and
/// `daemon/logging.rs` and names `pop3::tracker::State` nowhere else.
#[test]
fn crate_visible_type_names_are_unique() {
    let mut defined: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (file, text) in sources("src") {
        for name in visible_type_names(&code(&text)) {
            defined.entry(name).or_default().push(file.clone());
        }
    }
    assert!(
        defined.len() > 100,
        "read only {} type names",
        defined.len()
    );
    let dups: Vec<String> = defined
        .iter()
        .filter(|(_, files)| files.len() > 1)
        .map(|(name, files)| format!("`{name}` is defined in {}", files.join(", ")))
        .collect();
    assert!(dups.is_empty(), "{}", dups.join("\n"));
}

/// The rows of the table under `## Module map` in `docs/ARCHITECTURE.md`: the module and the
/// backquoted names of the modules it may use (`*` for all).
fn documented_map(doc: &str) -> BTreeMap<String, BTreeSet<String>> {
    let section = doc
        .split("\n## ")
        .find(|s| s.starts_with("Module map"))
        .expect("docs/ARCHITECTURE.md has a `## Module map` section");
    let mut map = BTreeMap::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 || !cells[1].starts_with('`') {
            continue;
        }
        let ticked = |cell: &str| -> BTreeSet<String> {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect()
        };
        let module = cells[1].trim_matches('`').to_owned();
        map.insert(module, ticked(cells[2]));
    }
    map
}

#[test]
fn the_documented_module_map_is_the_enforced_one() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/ARCHITECTURE.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let documented = documented_map(&doc);
    let enforced: BTreeMap<String, BTreeSet<String>> = ALLOWED
        .iter()
        .map(|(m, uses)| {
            let uses = uses.iter().map(|u| (*u).to_owned()).collect();
            ((*m).to_owned(), uses)
        })
        .collect();
    let mut problems = Vec::new();
    for (m, uses) in &enforced {
        match documented.get(m) {
            None => problems.push(format!("`{m}` is not in the documented map")),
            Some(d) if d != uses => problems.push(format!(
                "`{m}`: documented {d:?}, enforced {uses:?} (ALLOWED)"
            )),
            Some(_) => {}
        }
    }
    for m in documented.keys() {
        if !enforced.contains_key(m) {
            problems.push(format!("`{m}` is documented but not in ALLOWED"));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/ARCHITECTURE.md's module map and ALLOWED differ:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_core_checker_sees_violations() {
    let sample = code(
        "use std::sync::Mutex;\n\
         // let t = Instant::now();\n\
         let f: FileType = AuditOutput::File;\n\
         let now = std::time::Instant::now();\n\
         actions.push(Action::Sleep(d));\n\
         #[cfg(test)]\n\
         mod tests {\n    use std::fs;\n    let t = tokio::time::sleep(d);\n}\n\
         let s = crate::audit::Sink;",
    );
    let seen = violations(
        &without_test_modules(&sample),
        CORE_FORBIDDEN.iter().map(|(p, _)| *p),
    );
    assert_eq!(
        seen,
        vec!["Instant::now", "Mutex", "crate::audit", "Sleep("],
        "a comment, `FileType`, a variant `File` and an inline test module are not violations"
    );
    assert!(mentions("let f = File::open(p)?;", "File::"));
    assert!(mentions("use std::fs::{self, File};", "fs::"));
    assert!(mentions("let t = tokio::fs::read(p);", "fs::"));
    assert!(!mentions("let f = my_fs::read(p);", "fs::"));
    assert!(!mentions("Mutexes are not used", "Mutex"));
    assert_eq!(
        visible_type_names(
            "pub struct A;\npub(crate) enum B {\n    pub(super) type C = u8;\nstruct D;\n\
             pub(in crate::x) trait E {}\npub fn f() {}\npub use x::F;"
        ),
        vec!["A", "B", "C", "E"]
    );
    let known = [
        ("src/proxy/hop.rs", "Sleep(", "issue 20"),
        ("src/pop3/a.rs", "Mutex", "x"),
    ];
    let found = [
        ("src/proxy/hop.rs".to_owned(), "Sleep("),
        ("src/proxy/hop.rs".to_owned(), "Mutex"),
    ];
    let (reported, problems) = judge(&found, &known);
    assert_eq!(reported, vec!["src/proxy/hop.rs: `Sleep(` (issue 20)"]);
    assert_eq!(
        problems.len(),
        2,
        "a new violation and a stale entry: {problems:?}"
    );
    assert!(problems[0].contains("uses `Mutex`: a lock"), "{problems:?}");
    assert!(
        problems[1].contains("src/pop3/a.rs no longer uses `Mutex`"),
        "{problems:?}"
    );
    let doc = "# x\n## Module map\n| module | may use | why |\n|---|---|---|\n\
               | `pop3` | nothing | core |\n| `proxy` | `pop3`, `types` | core |\n\
               | `lib` | `*` | edge |\n## Next\n| `net` | `x` | no |\n";
    let map = documented_map(doc);
    assert_eq!(map.len(), 3, "{map:?}");
    assert!(map["pop3"].is_empty());
    assert_eq!(
        map["proxy"].iter().cloned().collect::<Vec<_>>(),
        vec!["pop3", "types"]
    );
}
