//! The binary's command line: help, check (good and each kind of mistake), and the demo with
//! the exact curl commands it prints.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::clients::run_bounded;
use common::proxy::popgate_bin;

fn popgate(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(popgate_bin());
    cmd.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    run_bounded(&mut cmd, None, Duration::from_secs(20))
}

#[test]
fn help_lists_subcommands() {
    let out = popgate(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["run", "check", "demo", "--log-level"] {
        assert!(text.contains(word), "help lacks {word}: {text}");
    }
}

#[test]
fn check_accepts_the_example_config() {
    let out = popgate(&["check", "--config", "popgate.toml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
}

/// Each class of mistake: the message names the file, the key and what is wrong.
/// `check --print` shows every setting with its default, and what it prints loads back to the
/// same config.
#[test]
fn check_print_shows_defaults_and_round_trips() {
    let example = format!("{}/popgate.toml", env!("CARGO_MANIFEST_DIR"));
    let out = popgate(&["check", "--print", "--config", &example]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    for line in [
        "max_sessions = 10000",
        "idle_timeout = \"10m\"",
        "shutdown_grace = \"30s\"",
        "[audit.transcript]",
    ] {
        assert!(printed.contains(line), "{line} missing:\n{printed}");
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("printed.toml");
    std::fs::write(&copy, &printed).unwrap();
    let again = popgate(&["check", "--print", "--config", copy.to_str().unwrap()]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let strip = |t: &str| {
        t.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        strip(&String::from_utf8_lossy(&again.stdout)),
        strip(&printed)
    );
}

/// `check --print` run with a relative `--config` from the config's own directory prints
/// absolute paths (so the output works from any directory), the effective `log.output` and
/// `audit.instance`, and names every key it has no value for, from the same table as
/// popgate.toml(5).
#[test]
fn check_print_names_every_key_with_paths_that_work_anywhere() {
    let mut cmd = Command::new(popgate_bin());
    cmd.args(["check", "--print", "--config", "popgate.toml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    let out = run_bounded(&mut cmd, None, Duration::from_secs(20));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let repo = env!("CARGO_MANIFEST_DIR");
    for line in [
        format!("cert = \"{repo}/certs/localhost.crt\""),
        format!("rules = [\"{repo}/rules/require-tls.toml\"]"),
        "output = \"stderr\"".to_owned(),
        "instance = \"".to_owned(),
        "#   pid_file: not set".to_owned(),
        "#   [metrics]: not set".to_owned(),
    ] {
        assert!(printed.contains(&line), "{line} missing:\n{printed}");
    }
    assert!(!printed.contains("\"./"), "a relative path:\n{printed}");
    // Loaded from another directory, the printed config still finds its files.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("printed.toml"), &printed).unwrap();
    let mut cmd = Command::new(popgate_bin());
    cmd.args(["check", "--config", "printed.toml"])
        .current_dir(dir.path());
    let again = run_bounded(&mut cmd, None, Duration::from_secs(20));
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

/// `check` refuses what `run` would fail on: a key that does not belong to its certificate,
/// naming the config key.
#[test]
fn check_names_a_mismatched_key() {
    let pki = common::certs::TestPki::new();
    let (c1, _k1) = pki.issue(&["localhost"]);
    let (_c2, k2) = pki.issue(&["localhost"]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cfg.toml");
    std::fs::write(
        &path,
        format!(
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\ntls = \"implicit\"\n\
             [upstream]\naddress = \"127.0.0.1:110\"\n[tls]\ncert = {c1:?}\nkey = {k2:?}\n"
        ),
    )
    .unwrap();
    let out = popgate(&["check", "--config", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("key `tls.key`"), "{err}");
}

#[test]
fn check_reports_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let base = "[[listener]]\nname = \"p\"\nbind = \"127.0.0.1:1110\"\n[upstream]\naddress = \"127.0.0.1:110\"\n";
    let cases: &[(&str, String, &[&str])] = &[
        (
            "unknown-key",
            format!("{base}[limits]\nmax_lines = 5\n"),
            &["max_lines", "unknown field"],
        ),
        (
            "bad-type",
            format!("{base}[limits]\nmax_line = \"big\"\n"),
            &["max_line", "invalid type"],
        ),
        (
            "bad-duration",
            format!("{base}[limits]\nidle_timeout = \"soon\"\n"),
            &["idle_timeout"],
        ),
        (
            "range",
            format!("{base}[limits]\nmax_line = 10\n"),
            &["limits.max_line", "outside"],
        ),
        (
            "bad-upstream",
            base.replace("127.0.0.1:110", "nowhere"),
            &["upstream.address", "host:port"],
        ),
        (
            "tls-without-cert",
            base.replace(
                "bind = \"127.0.0.1:1110\"",
                "bind = \"127.0.0.1:1110\"\ntls = \"implicit\"",
            ),
            &["listener[0].tls", "certificate"],
        ),
        (
            "missing-cert-file",
            format!("{base}[tls]\ncert = \"nope.crt\"\nkey = \"nope.key\"\n"),
            &["nope.crt"],
        ),
        (
            "bad-mode",
            base.replace(
                "address = \"127.0.0.1:110\"",
                "address = \"127.0.0.1:110\"\ntls = \"maybe\"",
            ),
            &["maybe", "unknown variant"],
        ),
    ];
    for (name, text, needles) in cases {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = popgate(&["check", "--config", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: accepted");
        assert!(
            err.contains(&format!("{name}.toml")),
            "{name}: file not named: {err}"
        );
        for n in *needles {
            assert!(err.contains(n), "{name}: {n:?} missing in: {err}");
        }
    }
    let out = popgate(&["check", "--config", "/nonexistent/popgate.toml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/popgate.toml"));
}

/// A failing command prints one clean message and exits 1, also with `RUST_BACKTRACE=1` in
/// the environment (as systemd units and CI often set it): no `Stack backtrace:` block, no
/// Debug-formatted error.
#[test]
fn errors_print_as_one_message_whatever_rust_backtrace_says() {
    for bt in ["1", "full", "0"] {
        let mut cmd = Command::new(popgate_bin());
        cmd.args(["check", "--config", "/nonexistent/popgate.toml"])
            .env("RUST_BACKTRACE", bt)
            .env("RUST_LIB_BACKTRACE", bt);
        let out = run_bounded(&mut cmd, None, Duration::from_secs(20));
        assert_eq!(out.status.code(), Some(1), "RUST_BACKTRACE={bt}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            err.lines().count(),
            1,
            "RUST_BACKTRACE={bt}: not one line: {err}"
        );
        assert!(err.starts_with("popgate: "), "RUST_BACKTRACE={bt}: {err}");
        assert!(err.contains("/nonexistent/popgate.toml"), "{err}");
        for noise in ["backtrace", "Caused by", "Error {", "Os {"] {
            assert!(
                !err.contains(noise),
                "RUST_BACKTRACE={bt}: {noise:?} in {err}"
            );
        }
    }
}

/// Each class of rule mistake: the message names the config, the rule file, the rule (name
/// and position) and the reason. Rule paths are relative to the config file's directory.
#[test]
fn check_reports_rule_file_rule_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let rule = |name: &str, body: &str| format!("[[rule]]\nname = \"{name}\"\n{body}");
    let cases: &[(&str, String, &[&str])] = &[
        (
            "unknown-key",
            rule(
                "ro",
                "on = \"command\"\nverb = \"DELE\"\naction = \"deny\"\n",
            ),
            &["rule `ro` (#1)", "unknown key `verb`", "verbs"],
        ),
        (
            "bad-regex",
            rule(
                "re",
                "on = \"command\"\nargs = \"(open\"\naction = \"deny\"\n",
            ),
            &["rule `re` (#1)", "bad regex in `args`", "unclosed group"],
        ),
        (
            "impossible",
            rule(
                "hide",
                "on = \"connect\"\naction = \"rewrite\"\nwith = \"x\"\n",
            ),
            &["rule `hide` (#1)", "`rewrite` is not possible on `connect`"],
        ),
        (
            "bad-cidr",
            rule(
                "lan",
                "on = \"connect\"\nclient = [\"10.0.0.1/8\"]\naction = \"drop\"\n",
            ),
            &["rule `lan` (#1)", "10.0.0.1/8", "host bits"],
        ),
        (
            "bad-template",
            rule(
                "l",
                "on = \"command\"\naction = \"log\"\nmessage = \"{nope}\"\n",
            ),
            &["rule `l` (#1)", "unknown field `{nope}`"],
        ),
        (
            "bad-event",
            rule("ev", "on = \"commands\"\naction = \"allow\"\n"),
            &["rule `ev` (#1)", "unknown variant `commands`"],
        ),
        (
            "bad-code",
            format!(
                "{}{}",
                rule("ok", "on = \"close\"\naction = \"tag\"\ntags = [\"x\"]\n"),
                rule(
                    "code",
                    "on = \"command\"\naction = \"deny\"\ncode = \"[AUTH]\"\n"
                )
            ),
            &["rule `code` (#2)", "`[AUTH]` is not a response code"],
        ),
        (
            "duplicate",
            rule(
                "tls-log",
                "on = \"close\"\naction = \"tag\"\ntags = [\"x\"]\n",
            )
            .repeat(2),
            &["rule `tls-log` (#2)", "duplicate rule name"],
        ),
    ];
    let config = |rules: &str| {
        format!(
            "rules = [\"{rules}\"]\n[[listener]]\nname = \"p\"\nbind = \"127.0.0.1:1110\"\n\
             [upstream]\naddress = \"127.0.0.1:110\"\n"
        )
    };
    std::fs::create_dir(dir.path().join("rules")).unwrap();
    for (name, text, needles) in cases {
        std::fs::write(dir.path().join(format!("rules/{name}.toml")), text).unwrap();
        let path = dir.path().join(format!("cfg-{name}.toml"));
        std::fs::write(&path, config(&format!("rules/{name}.toml"))).unwrap();
        let out = popgate(&["check", "--config", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: accepted");
        assert!(
            err.contains(&format!("cfg-{name}.toml")),
            "{name}: config not named: {err}"
        );
        assert!(
            err.contains(&format!("rules/{name}.toml: rule `")),
            "{name}: rule file not named: {err}"
        );
        for n in *needles {
            assert!(err.contains(n), "{name}: {n:?} missing in: {err}");
        }
    }
    // A wildcard that matches nothing is a warning (an empty rules.d is a valid setup); a
    // named file that does not exist is an error.
    let path = dir.path().join("cfg-nomatch.toml");
    std::fs::write(&path, config("rules/nothing-*.toml")).unwrap();
    let out = popgate(&["check", "--config", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "nomatch: refused: {err}");
    assert!(
        err.contains("warning: ") && err.contains("`rules/nothing-*.toml` matches no file"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 warning(s)"));
    let path = dir.path().join("cfg-missing.toml");
    std::fs::write(&path, config("rules/missing.toml")).unwrap();
    let out = popgate(&["check", "--config", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "missing file: accepted");
    assert!(
        err.contains("`rules/missing.toml` matches no file"),
        "{err}"
    );
    // And a good rule file passes.
    std::fs::write(
        dir.path().join("rules/good.toml"),
        cases[0].1.replace("verb ", "verbs "),
    )
    .unwrap();
    let path = dir.path().join("cfg-good.toml");
    std::fs::write(&path, config("rules/good.toml")).unwrap();
    let out = popgate(&["check", "--config", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `popgate demo` prints curl commands; each works as printed, also from a directory other
/// than the source tree (absolute CA path), and require-tls is on: the plain-text login it
/// prints is refused, the same login after STLS works.
#[test]
fn demo_prints_working_curl_commands() {
    let cwd = tempfile::tempdir().unwrap();
    let mut child = Command::new(popgate_bin())
        .args(["demo", "--bind", "127.0.0.1:0", "--tls-bind", "127.0.0.1:0"])
        .current_dir(cwd.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut commands = Vec::new();
    let mut plain = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "demo did not finish printing");
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!("demo exited early");
        }
        if let Some(rest) = line.strip_prefix("popgate demo: proxy on ") {
            plain = rest.split_whitespace().next().map(str::to_owned);
        }
        if let Some(cmd) = line.trim().strip_prefix("curl ") {
            let (args, comment) = cmd.split_once('#').unwrap();
            commands.push((args.trim().to_string(), comment.trim().to_string()));
        }
        if line.starts_with("press Ctrl-C") {
            break;
        }
    }
    assert_eq!(commands.len(), 4, "{commands:?}");
    let curl = |c: &str| {
        let args: Vec<&str> = c.split_whitespace().collect();
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-S", "--max-time", "10"])
            .args(&args)
            .current_dir(cwd.path());
        run_bounded(&mut cmd, None, Duration::from_secs(20))
    };
    let run = |c: &str| {
        let o = curl(c);
        assert!(
            o.status.success(),
            "curl {c}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    // The TLS lines name the CA by an absolute path that exists.
    let ca = commands[0]
        .0
        .split_whitespace()
        .skip_while(|a| *a != "--cacert")
        .nth(1)
        .unwrap();
    assert!(
        std::path::Path::new(ca).is_absolute() && std::path::Path::new(ca).is_file(),
        "{ca}"
    );
    assert!(commands[0].0.contains("--ssl-reqd"), "{:?}", commands[0]);
    let list = run(&commands[0].0);
    assert_eq!(list.lines().count(), 3, "{list}");
    assert!(run(&commands[1].0).contains("Subject: Welcome to popgate"));
    assert!(
        run(&commands[2].0).contains("Subject: Nightly build report"),
        "implicit TLS"
    );
    // The plain-text line is announced as refused, and is: curl's login is denied (67).
    let (refused, comment) = &commands[3];
    assert!(comment.contains("refused"), "{comment}");
    assert!(refused.starts_with("pop3://"), "{refused}");
    let o = curl(refused);
    assert_eq!(
        o.status.code(),
        Some(67),
        "plain login not refused: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // By hand: before STLS, USER gets the require-tls refusal and CAPA offers no USER.
    let plain: std::net::SocketAddr = plain.expect("no proxy address line").parse().unwrap();
    let mut pop = common::clients::RawPop::connect(plain);
    let capa = pop.cmd_multi("CAPA");
    let capa = String::from_utf8_lossy(&capa.1.unwrap()).into_owned();
    assert!(capa.contains("STLS") && !capa.contains("USER"), "{capa}");
    let refusal = pop.cmd("USER demo");
    assert!(
        refusal.starts_with("-ERR [AUTH] Encryption required"),
        "{refusal}"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "demo exit status {status}");
            break;
        }
        assert!(Instant::now() < deadline, "demo did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its temp files (config, key, CA) go with it.
    assert!(!std::path::Path::new(ca).exists(), "{ca} left behind");
}
