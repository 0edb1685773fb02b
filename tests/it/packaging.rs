//! Packaging: `popgate --version` build facts, the man pages and shell completions generated
//! from the clap definition, the systemd unit, the logrotate snippet and the cargo-deb recipe
//! with the script that generates its files.
//!
//! Tests that need a system tool (man, systemd-analyze, logrotate, zsh, fish) say why they
//! skip when it is missing; with `POPGATE_REQUIRE_TOOLS=1` (set by .ci/run, which installs
//! them) a missing tool fails the test instead.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::clients::run_bounded;
use common::find_exe;
use common::proxy::popgate_bin;

const LIMIT: Duration = Duration::from_secs(30);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn popgate(args: &[&str]) -> Output {
    let out = run_bounded(Command::new(popgate_bin()).args(args), None, LIMIT);
    assert!(
        out.status.success(),
        "popgate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The path of a system tool, or `None` after saying why the test skips (a panic instead
/// when POPGATE_REQUIRE_TOOLS is set, as in CI).
fn tool(name: &str, test: &str) -> Option<PathBuf> {
    let found = find_exe(name);
    if found.is_none() {
        assert!(
            std::env::var_os("POPGATE_REQUIRE_TOOLS").is_none(),
            "{test}: `{name}` is not installed but POPGATE_REQUIRE_TOOLS is set"
        );
        eprintln!("{test}: skipped, `{name}` is not installed");
    }
    found
}

/// The generated man pages and completions, as contrib/deb.sh makes them for the package.
fn generated() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = run_bounded(
        Command::new("sh")
            .arg(repo().join("contrib/deb.sh"))
            .env("POPGATE_BIN", popgate_bin())
            .env("PACKAGING_DIR", dir.path())
            .env("GENERATE_ONLY", "1"),
        None,
        LIMIT,
    );
    assert!(
        out.status.success(),
        "contrib/deb.sh: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    dir
}

const SUBCOMMANDS: &[&str] = &["run", "check", "audit", "demo", "completions", "man"];

#[test]
fn version_names_commit_target_profile_and_tls_provider() {
    let long = text(&popgate(&["--version"]).stdout);
    let lines: Vec<&str> = long.lines().collect();
    assert_eq!(
        lines[0],
        concat!("popgate ", env!("CARGO_PKG_VERSION")),
        "{long}"
    );
    let field = |name: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name}: line in {long}"))
            .trim()
            .to_owned()
    };
    // The triple this test was built for: the test and the binary come from one build.
    let target = field("target");
    assert!(
        target.starts_with(std::env::consts::ARCH) && target.contains(std::env::consts::OS),
        "{target}"
    );
    let profile = field("profile");
    assert_eq!(
        profile,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    assert!(field("tls").contains("ring"), "{long}");
    // In a git checkout: the commit HEAD points at; elsewhere "unknown", never a build failure.
    let commit = field("commit");
    let head = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(repo())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| text(&o.stdout).trim().to_owned());
    match head {
        Some(head) if std::env::var_os("POPGATE_GIT_COMMIT").is_none() => {
            assert!(
                commit.len() >= 7 && head.starts_with(&commit),
                "{commit} vs {head}"
            )
        }
        _ => assert!(!commit.is_empty(), "{long}"),
    }
    // -V stays the one-line short form.
    let short = text(&popgate(&["-V"]).stdout);
    assert_eq!(
        short.trim(),
        concat!("popgate ", env!("CARGO_PKG_VERSION")),
        "{short}"
    );
}

/// `popgate man` renders with man(1) and lists the subcommands; `--dir` writes a page per
/// subcommand that renders too and shows that subcommand's options.
#[test]
fn man_pages_render_with_man() {
    let Some(man) = tool("man", "man_pages_render_with_man") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("popgate.1");
    std::fs::write(&page, popgate(&["man"]).stdout).unwrap();
    let render = |p: &Path| {
        let out = run_bounded(
            Command::new(&man).arg("-l").arg(p).env("MANWIDTH", "80"),
            None,
            LIMIT,
        );
        assert!(
            out.status.success(),
            "man -l {}: {}",
            p.display(),
            text(&out.stderr)
        );
        // Without a terminal man marks bold and underline by overstriking ("c\x08c"); drop it.
        let mut plain = String::new();
        for c in text(&out.stdout).chars() {
            if c == '\u{8}' {
                plain.pop();
            } else {
                plain.push(c);
            }
        }
        plain
    };
    let shown = render(&page);
    assert!(shown.contains("popgate - A transparent"), "{shown}");
    for sub in SUBCOMMANDS {
        assert!(
            shown.contains(&format!("popgate-{sub}(1)")),
            "{sub}: {shown}"
        );
    }
    assert!(shown.contains("--log-level"), "{shown}");
    assert!(!shown.contains("popgate-help"), "{shown}");
    for section in [
        "SIGNALS",
        "FILES",
        "EXIT STATUS",
        "SIGHUP",
        "SIGUSR1",
        "popgate.toml(5)",
    ] {
        assert!(
            shown.contains(section),
            "popgate(1) lacks {section}: {shown}"
        );
    }
    let pages = generated();
    // Installed gzipped, as Debian policy wants; man reads them as they are.
    let config_page = render(&pages.path().join("man/popgate.toml.5.gz"));
    for key in popgate::reference::KEYS {
        let short = key.key.rsplit('.').next().unwrap();
        assert!(
            config_page.contains(short),
            "popgate.toml(5) lacks {}",
            key.key
        );
    }
    for text in [
        "idle_timeout (default: \"10m\"; reload)",
        "[limits]",
        "restart",
    ] {
        assert!(
            config_page.contains(text),
            "popgate.toml(5) lacks {text}: {config_page}"
        );
    }
    let main_page = render(&pages.path().join("man/popgate.1.gz"));
    assert!(main_page.contains("EXIT STATUS"), "{main_page}");
    for sub in SUBCOMMANDS {
        let page = pages.path().join(format!("man/popgate-{sub}.1.gz"));
        assert!(page.is_file(), "{} missing", page.display());
        let shown = render(&page);
        assert!(shown.contains(&format!("popgate-{sub}")), "{shown}");
    }
    let run = render(&pages.path().join("man/popgate-run.1.gz"));
    assert!(run.contains("--config"), "{run}");
    let demo = render(&pages.path().join("man/popgate-demo.1.gz"));
    assert!(demo.contains("--tls-bind"), "{demo}");
}

/// The bash completion parses (`bash -n`) and, loaded, completes subcommands and options;
/// zsh and fish parse theirs when installed.
#[test]
fn shell_completions_parse_and_complete() {
    let dir = generated();
    let bash_file = dir.path().join("completions/popgate.bash");
    let script = std::fs::read_to_string(&bash_file).unwrap();
    assert_eq!(
        script,
        text(&popgate(&["completions", "bash"]).stdout),
        "contrib/deb.sh and `popgate completions bash` differ"
    );
    let bash = tool("bash", "shell_completions_parse_and_complete").unwrap_or_else(|| {
        // bash is essential on every Linux this runs on.
        panic!("bash missing")
    });
    let out = run_bounded(Command::new(&bash).arg("-n").arg(&bash_file), None, LIMIT);
    assert!(out.status.success(), "bash -n: {}", text(&out.stderr));
    // Loaded into bash: `popgate <TAB>` offers the subcommands, `popgate run --<TAB>` --config.
    let probe = format!(
        "source {}\n\
         COMP_WORDS=(popgate ''); COMP_CWORD=1; COMP_LINE='popgate '; COMP_POINT=8\n\
         _popgate popgate '' popgate; echo \"subs: ${{COMPREPLY[*]}}\"\n\
         COMP_WORDS=(popgate run --); COMP_CWORD=2; COMP_LINE='popgate run --'; COMP_POINT=14\n\
         _popgate popgate -- run; echo \"run: ${{COMPREPLY[*]}}\"\n",
        bash_file.display()
    );
    let out = run_bounded(Command::new(&bash).arg("-c").arg(&probe), None, LIMIT);
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{shown}{}", text(&out.stderr));
    let subs = shown.lines().find(|l| l.starts_with("subs:")).unwrap();
    for sub in SUBCOMMANDS {
        assert!(subs.split_whitespace().any(|w| w == *sub), "{sub}: {shown}");
    }
    let run = shown.lines().find(|l| l.starts_with("run:")).unwrap();
    assert!(run.contains("--config"), "{shown}");
    if let Some(zsh) = tool("zsh", "shell_completions_parse_and_complete (zsh)") {
        let out = run_bounded(
            Command::new(zsh)
                .arg("-n")
                .arg(dir.path().join("completions/_popgate")),
            None,
            LIMIT,
        );
        assert!(out.status.success(), "zsh -n: {}", text(&out.stderr));
    }
    // fish is not in CI's package list (zsh is): parsed only where it is installed.
    if let Some(fish) = find_exe("fish") {
        let out = run_bounded(
            Command::new(fish)
                .arg("--no-execute")
                .arg(dir.path().join("completions/popgate.fish")),
            None,
            LIMIT,
        );
        assert!(out.status.success(), "fish -n: {}", text(&out.stderr));
    } else {
        eprintln!("shell_completions_parse_and_complete: fish not installed, its script unchecked");
    }
}

/// A copy of contrib/popgate.service whose ExecStart and ExecStartPre point at the built
/// binary (verify wants them to exist) and the generated man page on MANPATH (verify checks
/// `Documentation=man:popgate(1)`).
fn unit_for_test(dir: &Path) -> PathBuf {
    let unit = std::fs::read_to_string(repo().join("contrib/popgate.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/popgate run"), "{unit}");
    let unit = unit.replace("/usr/bin/popgate", popgate_bin().to_str().unwrap());
    let path = dir.join("popgate.service");
    std::fs::write(&path, unit).unwrap();
    let man1 = dir.join("man/man1");
    std::fs::create_dir_all(&man1).unwrap();
    std::fs::write(man1.join("popgate.1"), popgate(&["man"]).stdout).unwrap();
    path
}

/// `systemd-analyze verify` accepts the unit without a single warning (it exits 0 on unknown
/// keys and bad values, so its output must be empty too), the hardening the issue asks for is
/// there, and `systemd-analyze security` rates the exposure low.
#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let unit = std::fs::read_to_string(repo().join("contrib/popgate.service")).unwrap();
    for line in [
        "Type=notify",
        "ExecReload=/usr/bin/popgate reload --pid $MAINPID",
        "RuntimeDirectory=popgate",
        "User=popgate",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "LogsDirectory=popgate",
        "LimitNOFILE=",
    ] {
        assert!(
            unit.lines().any(|l| l.starts_with(line)),
            "unit lacks {line}"
        );
    }
    assert!(!unit.contains("PIDFile"), "Type=notify needs no PID file");
    let Some(analyze) = tool("systemd-analyze", "systemd_unit_verifies_and_is_hardened") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = unit_for_test(dir.path());
    let out = run_bounded(
        Command::new(&analyze)
            .arg("verify")
            .arg(&path)
            .env("MANPATH", dir.path().join("man"))
            .env("SYSTEMD_LOG_COLOR", "0"),
        None,
        LIMIT,
    );
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    // The check is real: a misspelt key is reported.
    let broken = dir.path().join("broken/popgate.service");
    std::fs::create_dir_all(broken.parent().unwrap()).unwrap();
    std::fs::write(
        &broken,
        std::fs::read_to_string(&path)
            .unwrap()
            .replace("ProtectSystem=", "ProtectSystm="),
    )
    .unwrap();
    let out = run_bounded(
        Command::new(&analyze)
            .arg("verify")
            .arg(&broken)
            .env("MANPATH", dir.path().join("man")),
        None,
        LIMIT,
    );
    assert!(
        text(&out.stderr).contains("ProtectSystm"),
        "verify missed a bad key: {}",
        text(&out.stderr)
    );
    // Offline exposure score, 0 (locked down) .. 10 (unprotected).
    let out = run_bounded(
        Command::new(&analyze)
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&path)
            .env("MANPATH", dir.path().join("man"))
            .env("SYSTEMD_COLORS", "0"),
        None,
        LIMIT,
    );
    let report = text(&out.stdout);
    if let Some(line) = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
    {
        let score: f64 = line
            .split(':')
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{line}"));
        eprintln!("systemd-analyze security: {}", line.trim());
        assert!(score <= 2.0, "exposure {score}: {report}");
    } else {
        // `security --offline` came with systemd 250; older ones only verify.
        eprintln!(
            "systemd-analyze security --offline unsupported here: {}",
            text(&out.stderr)
        );
    }
}

/// logrotate accepts the snippet (`-d`, with the `create` owner mapped to one that exists
/// here), and a real rotation of a popgate.log moves the file and runs the postrotate step.
#[test]
fn logrotate_snippet_is_accepted_and_rotates() {
    let snippet = std::fs::read_to_string(repo().join("contrib/popgate.logrotate")).unwrap();
    assert!(
        snippet.contains("/var/log/popgate/popgate.log {"),
        "{snippet}"
    );
    assert!(
        snippet.contains("postrotate") && snippet.contains("USR1"),
        "{snippet}"
    );
    let Some(logrotate) = tool("logrotate", "logrotate_snippet_is_accepted_and_rotates") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let me = text(&Command::new("id").arg("-un").output().unwrap().stdout);
    let group = text(&Command::new("id").arg("-gn").output().unwrap().stdout);
    let owned = snippet.replace(
        "create 0640 popgate popgate",
        &format!("create 0640 {} {}", me.trim(), group.trim()),
    );
    assert_ne!(owned, snippet, "create line changed");
    let conf = dir.path().join("popgate");
    std::fs::write(&conf, &owned).unwrap();
    let state = dir.path().join("state");
    let out = run_bounded(
        Command::new(&logrotate)
            .arg("-d")
            .arg("-s")
            .arg(&state)
            .arg(&conf),
        None,
        LIMIT,
    );
    let said = text(&out.stderr);
    assert!(
        out.status.success() && !said.contains("error"),
        "logrotate -d: {said}"
    );
    // For real, in a temp dir: the postrotate step touches a file instead of signalling.
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    std::fs::write(logs.join("popgate.log"), "a line\n").unwrap();
    let marker = dir.path().join("postrotate-ran");
    let (pre, post) = owned.split_once("postrotate").unwrap();
    let (_, after) = post.split_once("endscript").unwrap();
    let real = format!(
        "{}postrotate\n        touch {}\n    endscript{after}",
        pre.replace("/var/log/popgate", logs.to_str().unwrap()),
        marker.display()
    );
    std::fs::write(&conf, real).unwrap();
    let out = run_bounded(
        Command::new(&logrotate)
            .arg("-f")
            .arg("-s")
            .arg(&state)
            .arg(&conf),
        None,
        LIMIT,
    );
    assert!(out.status.success(), "logrotate -f: {}", text(&out.stderr));
    assert!(logs.join("popgate.log.1").is_file(), "not rotated");
    assert!(logs.join("popgate.log").is_file(), "no new popgate.log");
    assert!(marker.exists(), "postrotate did not run");
}

/// Every file the cargo-deb recipe installs exists (the generated ones after contrib/deb.sh),
/// the unit and maintainer scripts are where cargo-deb looks, and the scripts parse.
#[test]
fn cargo_deb_recipe_names_existing_files() {
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(repo().join("Cargo.toml")).unwrap()).unwrap();
    let deb = manifest["package"]["metadata"]["deb"].as_table().unwrap();
    let generated = generated();
    let assets = deb["assets"].as_array().unwrap();
    let mut installed = Vec::new();
    for asset in assets {
        let asset = asset.as_array().unwrap();
        let (src, dest) = (asset[0].as_str().unwrap(), asset[1].as_str().unwrap());
        installed.push(dest.to_owned());
        let src_path = match src.strip_prefix("target/release/packaging/") {
            Some(rest) => generated.path().join(rest),
            None if src == "target/release/popgate" => popgate_bin(),
            None => repo().join(src),
        };
        let pattern = src_path.to_str().unwrap();
        let found = glob::glob(pattern).unwrap().filter_map(Result::ok).count();
        assert!(found > 0, "asset {src} matches no file ({pattern})");
    }
    for dest in [
        "usr/bin/",
        "usr/share/man/man1/",
        "usr/share/bash-completion/completions/popgate",
        "etc/popgate/popgate.toml",
        "etc/popgate/rules/",
        "etc/logrotate.d/popgate",
    ] {
        assert!(
            installed.iter().any(|d| d == dest),
            "nothing goes to {dest}"
        );
    }
    let scripts = repo().join(deb["maintainer-scripts"].as_str().unwrap());
    let units = deb["systemd-units"]["unit-scripts"].as_str().unwrap();
    assert!(repo().join(units).join("popgate.service").is_file());
    for script in ["postinst", "postrm"] {
        let path = scripts.join(script);
        let body = std::fs::read_to_string(&path).unwrap();
        // cargo-deb inserts the systemd snippets there and refuses scripts without it.
        assert!(body.contains("#DEBHELPER#"), "{script}");
        let out = run_bounded(Command::new("sh").arg("-n").arg(&path), None, LIMIT);
        assert!(
            out.status.success(),
            "sh -n {script}: {}",
            text(&out.stderr)
        );
    }
    let postinst = std::fs::read_to_string(scripts.join("postinst")).unwrap();
    assert!(postinst.contains("adduser --system"), "{postinst}");
    assert!(
        installed.iter().any(|d| d == "usr/share/man/man5/"),
        "no popgate.toml(5)"
    );
}

/// The package's copyright file is a real DEP-5 file for the crate's licence (cargo-deb writes
/// a "Copyright information missing" stub without `license-file`), the repository carries the
/// licence texts `Cargo.toml` names, and a changelog.
#[test]
fn package_ships_licence_copyright_and_changelog() {
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(repo().join("Cargo.toml")).unwrap()).unwrap();
    let license = manifest["package"]["license"].as_str().unwrap();
    assert_eq!(license, "MIT OR Apache-2.0");
    let deb = manifest["package"]["metadata"]["deb"].as_table().unwrap();
    let file = deb["license-file"].as_array().unwrap();
    assert_eq!(file[1].as_str(), Some("0"), "header lines must not be cut");
    let copyright = std::fs::read_to_string(repo().join(file[0].as_str().unwrap())).unwrap();
    assert!(copyright.starts_with(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
    ));
    for needle in [
        "Upstream-Name: popgate",
        "Files: *",
        "License: MIT or Apache-2.0",
        "License: MIT\n Permission is hereby granted",
        "License: Apache-2.0\n",
        "/usr/share/common-licenses/Apache-2.0",
    ] {
        assert!(copyright.contains(needle), "copyright lacks {needle:?}");
    }
    // DEP-5: continuation lines start with a space, paragraphs are separated by empty lines.
    for line in copyright.lines() {
        assert!(
            line.is_empty() || line.starts_with(' ') || line.contains(": "),
            "not DEP-5: {line:?}"
        );
    }
    let mit = std::fs::read_to_string(repo().join("LICENSE-MIT")).unwrap();
    assert!(mit.contains("Permission is hereby granted"));
    let apache = std::fs::read_to_string(repo().join("LICENSE-APACHE")).unwrap();
    assert!(apache.contains("Apache License") && apache.contains("Version 2.0"));
    let changelog = std::fs::read_to_string(repo().join("CHANGELOG.md")).unwrap();
    assert!(changelog.contains("## [Unreleased]") && changelog.contains("## [0.1.0]"));
}

/// `contrib/deb.sh` puts the generated files under `$CARGO_TARGET_DIR/release/packaging`, where
/// cargo-deb looks for `target/release/...` assets when the target dir is elsewhere; man pages
/// are gzipped without a time stamp (the package builds reproducibly).
#[test]
fn deb_script_honours_cargo_target_dir() {
    let target = tempfile::tempdir().unwrap();
    let out = run_bounded(
        Command::new("sh")
            .arg(repo().join("contrib/deb.sh"))
            .env("POPGATE_BIN", popgate_bin())
            .env("CARGO_TARGET_DIR", target.path())
            .env_remove("PACKAGING_DIR")
            .env("GENERATE_ONLY", "1"),
        None,
        LIMIT,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let man = target.path().join("release/packaging/man");
    for page in ["popgate.1.gz", "popgate-run.1.gz", "popgate.toml.5.gz"] {
        let bytes = std::fs::read(man.join(page)).unwrap();
        assert_eq!(&bytes[..2], b"\x1f\x8b", "{page} is not gzip");
        // gzip -n: no modification time in the header (bytes 4..8).
        assert_eq!(&bytes[4..8], &[0, 0, 0, 0], "{page} carries a time stamp");
    }
}

/// What the package installs works as installed: the example config (/etc/popgate/popgate.toml)
/// with the shipped rules next to it and the certificate contrib/make-cert.sh makes (postinst
/// runs it) passes `popgate check`, and the key is not world-readable.
#[test]
fn packaged_config_passes_check_with_the_generated_certificate() {
    use std::os::unix::fs::PermissionsExt as _;
    let Some(_) = tool(
        "openssl",
        "packaged_config_passes_check_with_the_generated_certificate",
    ) else {
        return;
    };
    let etc = tempfile::tempdir().unwrap();
    std::fs::copy(repo().join("popgate.toml"), etc.path().join("popgate.toml")).unwrap();
    std::fs::create_dir(etc.path().join("rules")).unwrap();
    for f in std::fs::read_dir(repo().join("rules")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, etc.path().join("rules").join(f.file_name().unwrap())).unwrap();
    }
    let out = run_bounded(
        Command::new("sh")
            .arg(repo().join("contrib/make-cert.sh"))
            .arg(etc.path().join("certs")),
        None,
        LIMIT,
    );
    assert!(out.status.success(), "make-cert.sh: {}", text(&out.stderr));
    let key = etc.path().join("certs/localhost.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o007, 0, "key mode {mode:o}");
    let config = etc.path().join("popgate.toml");
    let out = popgate(&["check", "--config", config.to_str().unwrap()]);
    assert!(text(&out.stdout).contains("OK"), "{}", text(&out.stdout));
}

/// contrib/popgate.socket (socket activation, restarts without refused clients) verifies
/// beside the service it activates, and listens on the POP3 ports.
#[test]
fn systemd_socket_unit_verifies() {
    let socket = std::fs::read_to_string(repo().join("contrib/popgate.socket")).unwrap();
    for line in [
        "ListenStream=110",
        "ListenStream=995",
        "WantedBy=sockets.target",
    ] {
        assert!(
            socket.lines().any(|l| l == line),
            "socket unit lacks {line}"
        );
    }
    let Some(analyze) = tool("systemd-analyze", "systemd_socket_unit_verifies") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    unit_for_test(dir.path());
    let path = dir.path().join("popgate.socket");
    std::fs::write(&path, &socket).unwrap();
    let out = run_bounded(
        Command::new(&analyze)
            .arg("verify")
            .arg(&path)
            .arg(dir.path().join("popgate.service"))
            .env("MANPATH", dir.path().join("man"))
            .env("SYSTEMD_LOG_COLOR", "0"),
        None,
        LIMIT,
    );
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}
