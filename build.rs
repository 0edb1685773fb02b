//! Build facts for `popgate --version`: git commit, target triple and build profile.
//!
//! Never fails: outside a git checkout (a source tarball, `cargo install` from crates.io) or
//! without git the commit is "unknown". Packagers building from a tarball can set
//! `POPGATE_GIT_COMMIT` themselves.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=POPGATE_GIT_COMMIT");
    let commit = std::env::var("POPGATE_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=POPGATE_GIT_COMMIT={}", commit.trim());
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=POPGATE_TARGET={target}");
    // "debug" or "release": the profile this build inherits from (custom profiles name theirs).
    let profile = std::env::var("PROFILE").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=POPGATE_PROFILE={profile}");
}

/// A git command's trimmed output, or `None` if git is missing or fails.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8(out.stdout).ok()?.trim().to_owned())
}

/// `git rev-parse --short=12 HEAD`, and rebuild when HEAD moves (the files git reads for it,
/// also in a worktree, whose HEAD lives apart from the shared refs).
fn git_commit() -> Option<String> {
    // Only popgate's own checkout: a source tree unpacked inside some other repository (a
    // packager's) must not report that repository's commit.
    let top = PathBuf::from(git(&["rev-parse", "--show-toplevel"])?);
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").ok()?);
    if top.canonicalize().ok()? != manifest.canonicalize().ok()? {
        return None;
    }
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    let git_dir = PathBuf::from(git(&["rev-parse", "--absolute-git-dir"])?);
    println!("cargo:rerun-if-changed={}", git_dir.join("HEAD").display());
    if let Some(common) = git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]) {
        let common = PathBuf::from(common);
        let mut watch = vec![common.join("packed-refs")];
        if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watch.push(common.join(head_ref));
        }
        // A watched file that does not exist would make cargo rerun this script every build.
        for f in watch.iter().filter(|f| f.exists()) {
            println!("cargo:rerun-if-changed={}", f.display());
        }
    }
    Some(commit)
}
