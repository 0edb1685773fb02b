//! Every `-ERR` line popgate writes itself is in `src/pop3/replies.rs`: no other source file
//! (outside its tests) starts a string literal with `-ERR`. Reads the sources as text.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

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

/// The code of `text` before its test module, without comment lines.
fn code(text: &str) -> String {
    let end = text.find("#[cfg(test)]\nmod ").unwrap_or(text.len());
    text[..end]
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn err_replies_are_written_only_in_pop3_replies() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut found = Vec::new();
    for f in files {
        let rel = f
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        // The session simulator's model server writes its own (tagged) replies.
        if rel == "pop3/replies.rs" || rel.ends_with("tests.rs") || rel == "proxy/sim.rs" {
            continue;
        }
        let text = code(&std::fs::read_to_string(&f).unwrap());
        for line in text.lines() {
            if line.contains("\"-ERR") {
                found.push(format!("src/{rel}: {}", line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "-ERR texts outside src/pop3/replies.rs:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_sees_a_literal() {
    assert!(code("let x = b\"-ERR no\\r\\n\";\n#[cfg(test)]\nmod t {}").contains("\"-ERR"));
    assert!(!code("// \"-ERR\" in a comment\n").contains("\"-ERR"));
    assert!(!code("#[cfg(test)]\nmod tests { \"-ERR\" }").contains("\"-ERR"));
}
