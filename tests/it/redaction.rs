//! Redaction everywhere: a login with a password unique to this test run, through every login
//! method (USER/PASS, APOP, AUTH PLAIN with an initial response and via a continuation, AUTH
//! LOGIN with and without an initial response), by hand and with real clients, through the real
//! binary (`popgate run`) with every sink on: trace-level operational logs (text and JSON, to
//! files and to stderr), the audit trail (files and stdout), full-body transcripts, and `log`
//! rules rendering the commands. Then every file popgate wrote is searched for the password, its
//! base64 forms (alone, as the whole PLAIN payload) and the APOP digests: none may appear. The
//! same files must contain the user name, so the search cannot pass for lack of output.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use common::base64;
use common::clients::{self, RawPop, brief, poplib, poplib_spec};
use common::proxy::{Harness, PopgateOpts, PopgateProcess, mailbox};
use popgate_demo::{DemoServer, ServerOptions, apop_digest};
use serde_json::json;

/// A token no earlier run and no other test has produced: random (std's per-process random
/// hasher keys), time and pid.
fn unique(tag: &str) -> String {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    h.write(tag.as_bytes());
    let a = h.finish();
    let mut h2 = RandomState::new().build_hasher();
    h2.write_u64(a);
    format!("{a:016x}{:08x}", h2.finish() as u32)
}

/// The secrets of one run and everything derived from them that must never be written.
struct Secrets {
    user: String,
    pass: String,
    /// A second password, used in a failed attempt.
    wrong: String,
    /// APOP digests sent in this run (one per greeting).
    digests: Vec<String>,
}

impl Secrets {
    fn new() -> Secrets {
        Secrets {
            user: format!("rd-user-{}", &unique("user")[..12]),
            pass: format!("Pw-{}-x", unique("pass")),
            wrong: format!("Wr-{}-y", unique("wrong")),
            digests: Vec::new(),
        }
    }

    /// Every string that must not appear anywhere.
    fn needles(&self) -> Vec<String> {
        let mut n = Vec::new();
        for pw in [&self.pass, &self.wrong] {
            n.push(pw.clone());
            // The random core alone, in case a password is cut or quoted.
            n.push(pw[3..pw.len() - 2].to_owned());
            n.push(base64(pw.as_bytes()));
            n.push(base64(format!("\0{}\0{pw}", self.user).as_bytes()));
            n.push(base64(format!("{0}\0{0}\0{pw}", self.user).as_bytes()));
        }
        n.extend(self.digests.iter().cloned());
        n
    }
}

/// Which sinks a run uses.
#[derive(Clone, Copy, Debug)]
struct Sinks {
    /// `text` or `json`.
    log_format: &'static str,
    /// Operational log to files in `log/` (else stderr).
    log_to_dir: bool,
    /// Audit trail to stdout (else files in `audit/`).
    audit_stdout: bool,
}

/// `log` rules that render every command, response and login (with its arguments), so the
/// template's own redaction is exercised at every step, plus a `trace` rule.
const RULES: &str = r#"
[[rule]]
name = "log-every-command"
on = "command"
action = "log"
message = "rule-log command={command} verb={verb} args={args} user={user}"

[[rule]]
name = "log-every-response"
on = "response"
action = "log"
level = "debug"
message = "rule-log response={text} user={user}"

[[rule]]
name = "log-login"
on = "login"
action = "log"
message = "rule-log login user={user} status={status} verb={verb}"

[[rule]]
name = "trace-logins"
on = "login"
action = "trace"
"#;

/// `popgate run` with every sink on, in a temp dir holding config, rules and all output. Waits
/// for the "listening" log line rather than probing the port (a probe would be a session of its
/// own).
fn start(upstream: SocketAddr, sinks: Sinks) -> PopgateProcess {
    let log_dir = if sinks.log_to_dir {
        "dir = \"log\"\nrotation = \"never\"\n"
    } else {
        ""
    };
    let audit_out = if sinks.audit_stdout {
        "output = \"stdout\"\n"
    } else {
        "dir = \"audit\"\n"
    };
    let opts = PopgateOpts::new()
        .top("rules = [\"rules.toml\"]\n")
        .file("rules.toml", RULES)
        .tables(&format!(
            "[log]\nlevel = \"trace\"\nformat = \"{}\"\n{log_dir}\
             [audit]\nenabled = true\n{audit_out}\
             [audit.transcript]\ndir = \"transcripts\"\nlisteners = [\"bin\"]\nfull_bodies = true\n",
            sinks.log_format
        ))
        .wait_for_log();
    let opts = if sinks.log_to_dir {
        opts.log_dir("log")
    } else {
        opts
    };
    PopgateProcess::run(upstream, opts)
}

/// Every regular file under `dir`, recursively, in name order.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The `<...>` APOP timestamp of a greeting.
fn timestamp(greeting: &str) -> String {
    let start = greeting.find('<').expect("APOP timestamp in greeting");
    let end = greeting[start..].find('>').unwrap() + start;
    greeting[start..=end].to_owned()
}

fn ok(line: &str, what: &str) {
    assert!(line.starts_with("+OK"), "{what}: {line}");
}

/// After a login: fetch a message (full bodies go to the transcript) and QUIT.
fn retr_and_quit(c: &mut RawPop) {
    let (st, body) = c.cmd_multi("RETR 1");
    ok(&st, "RETR 1");
    assert!(body.is_some());
    ok(&c.cmd("QUIT"), "QUIT");
    let _ = c.read_to_end();
}

/// Every login method once, by hand and with real clients. Returns the number of sessions.
fn log_in_every_way(addr: SocketAddr, s: &mut Secrets) -> usize {
    let (user, pass) = (s.user.clone(), s.pass.clone());
    let mut sessions = 0;

    // USER/PASS, after a failed attempt with another unique password.
    let mut c = RawPop::connect(addr);
    ok(&c.cmd(&format!("USER {user}")), "USER");
    let bad = c.cmd(&format!("PASS {}", s.wrong));
    assert!(bad.starts_with("-ERR"), "{bad}");
    ok(&c.cmd(&format!("USER {user}")), "USER");
    ok(&c.cmd(&format!("PASS {pass}")), "PASS");
    retr_and_quit(&mut c);
    sessions += 1;

    // APOP.
    let mut c = RawPop::connect(addr);
    let digest = apop_digest(&timestamp(&c.greeting), &pass);
    s.digests.push(digest.clone());
    ok(&c.cmd(&format!("APOP {user} {digest}")), "APOP");
    retr_and_quit(&mut c);
    sessions += 1;

    // AUTH PLAIN with an initial response.
    let plain = base64(format!("\0{user}\0{pass}").as_bytes());
    let mut c = RawPop::connect(addr);
    ok(&c.cmd(&format!("AUTH PLAIN {plain}")), "AUTH PLAIN ir");
    retr_and_quit(&mut c);
    sessions += 1;

    // AUTH PLAIN via a continuation (with an authzid this time).
    let plain_z = base64(format!("{user}\0{user}\0{pass}").as_bytes());
    let mut c = RawPop::connect(addr);
    assert!(c.cmd("AUTH PLAIN").starts_with("+ "));
    ok(&c.cmd(&plain_z), "AUTH PLAIN continuation");
    retr_and_quit(&mut c);
    sessions += 1;

    // AUTH LOGIN: user name and password as continuations.
    let mut c = RawPop::connect(addr);
    assert!(c.cmd("AUTH LOGIN").starts_with("+ "));
    assert!(c.cmd(&base64(user.as_bytes())).starts_with("+ "));
    ok(&c.cmd(&base64(pass.as_bytes())), "AUTH LOGIN");
    retr_and_quit(&mut c);
    sessions += 1;

    // AUTH LOGIN with the user name as initial response.
    let mut c = RawPop::connect(addr);
    assert!(
        c.cmd(&format!("AUTH LOGIN {}", base64(user.as_bytes())))
            .starts_with("+ ")
    );
    ok(&c.cmd(&base64(pass.as_bytes())), "AUTH LOGIN ir");
    retr_and_quit(&mut c);
    sessions += 1;

    // A failed AUTH PLAIN with the wrong password, then a cancelled exchange.
    let mut c = RawPop::connect(addr);
    let bad = c.cmd(&format!(
        "AUTH PLAIN {}",
        base64(format!("\0{user}\0{}", s.wrong).as_bytes())
    ));
    assert!(bad.starts_with("-ERR"), "{bad}");
    assert!(c.cmd("AUTH LOGIN").starts_with("+ "));
    assert!(c.cmd("*").starts_with("-ERR"));
    ok(&c.cmd("QUIT"), "QUIT");
    sessions += 1;

    // A SASL answer sent out of turn: the exchange already failed, so the base64 line reaches
    // popgate as an "unknown command"; it must still never be shown.
    let mut c = RawPop::connect(addr);
    assert!(c.cmd("AUTH CRAM-MD5").starts_with("-ERR"));
    assert!(c.cmd(&plain).starts_with("-ERR"));
    ok(&c.cmd("QUIT"), "QUIT");
    sessions += 1;

    // Real clients: curl (PLAIN with and without SASL-IR, LOGIN), poplib (USER, APOP).
    let up = format!("{user}:{pass}");
    for opts in [
        &["--login-options", "AUTH=PLAIN", "--sasl-ir"][..],
        &["--login-options", "AUTH=PLAIN"][..],
        &["--login-options", "AUTH=LOGIN"][..],
        &["--login-options", "AUTH=LOGIN", "--sasl-ir"][..],
    ] {
        let mut args = vec!["-u", up.as_str()];
        args.extend_from_slice(opts);
        let url = clients::url("pop3", addr, "1");
        args.push(&url);
        clients::curl_ok(&args);
        sessions += 1;
    }
    for login in ["user", "apop"] {
        let mut spec = poplib_spec(addr, &user, &pass);
        spec["login"] = json!(login);
        spec["actions"] = json!([["retr", 1], ["quit"]]);
        let r = poplib(spec);
        assert_eq!(r["login"]["ok"], json!(true), "{}", brief(&r));
        // poplib's APOP digest depends on its greeting: recompute it.
        if login == "apop" {
            let greeting = r["welcome"].as_str().unwrap();
            s.digests.push(apop_digest(&timestamp(greeting), &pass));
        }
        sessions += 1;
    }
    sessions
}

fn upstream(h: &Harness, s: &Secrets) -> DemoServer {
    h.upstream(ServerOptions {
        apop: true,
        ..ServerOptions::new(vec![mailbox(
            &s.user,
            &s.pass,
            vec![
                b"From: a@example.org\r\nSubject: redaction test\r\n\r\nnothing secret here\r\n.dot\r\n"
                    .to_vec(),
            ],
        )])
    })
}

/// Search every file of the run for the needles; check the sinks wrote something that names
/// the user.
fn check_run(sinks: Sinks) {
    let h = Harness::new();
    let mut s = Secrets::new();
    let up = upstream(&h, &s);
    let mut run = start(up.local_addr(), sinks);
    let sessions = log_in_every_way(run.addr, &mut s);
    run.stop();

    // Every file popgate wrote (and the config it read, which holds no secret).
    let files = files_under(run.dir.path());
    let needles = s.needles();
    for f in &files {
        let data = std::fs::read(f).unwrap();
        let text = String::from_utf8_lossy(&data);
        for n in &needles {
            if let Some(at) = text.find(n.as_str()) {
                let from = at.saturating_sub(200);
                let to = (at + n.len() + 200).min(text.len());
                panic!(
                    "{sinks:?}: secret {n:?} found in {}:\n...{}...",
                    f.display(),
                    text.get(from..to).unwrap_or(&text)
                );
            }
        }
    }

    // The sinks did write, and about this user: the search above was not vacuous.
    let user = s.user.as_str();
    let log = run.log();
    assert!(log.contains(user), "{sinks:?}: log does not name the user");
    // Trace level really is on: the per-command debug lines are there.
    assert!(
        log.contains("DEBUG") && log.contains("PASS ***"),
        "{sinks:?}"
    );
    assert!(
        log.contains("rule-log command=PASS ***"),
        "{sinks:?}: {}",
        clients::tail(&log, 3000)
    );
    // Rule templates render the arguments of PASS, APOP and AUTH, and SASL lines, as ***.
    assert!(
        log.contains("rule-log command=AUTH *** verb=AUTH args=***"),
        "{sinks:?}"
    );
    assert!(
        log.contains("rule-log command=APOP *** verb=APOP args=***"),
        "{sinks:?}"
    );
    if sinks.log_format == "json" {
        for l in log.lines() {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}"));
        }
    }
    let audit = if sinks.audit_stdout {
        run.read("stdout")
    } else {
        files_under(&run.path("audit"))
            .iter()
            .map(|f| std::fs::read_to_string(f).unwrap())
            .collect()
    };
    let logins: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["event"] == "login")
        .collect();
    let methods: Vec<(&str, &str, &str)> = logins
        .iter()
        .map(|e| {
            (
                e["user"].as_str().unwrap_or("-"),
                e["method"].as_str().unwrap(),
                e["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    let ok_ = "success";
    let no = "failure";
    assert_eq!(
        methods,
        [
            (user, "USER", no),
            (user, "USER", ok_),
            (user, "APOP", ok_),
            (user, "AUTH PLAIN", ok_),
            (user, "AUTH PLAIN", ok_),
            (user, "AUTH LOGIN", ok_),
            (user, "AUTH LOGIN", ok_),
            (user, "AUTH PLAIN", no),
            // Cancelled before naming anyone: no user carried over from the attempt before.
            ("-", "AUTH LOGIN", no),
            ("-", "AUTH CRAM-MD5", no),
            (user, "AUTH PLAIN", ok_),
            (user, "AUTH PLAIN", ok_),
            (user, "AUTH LOGIN", ok_),
            (user, "AUTH LOGIN", ok_),
            (user, "USER", ok_),
            (user, "APOP", ok_),
        ],
        "{sinks:?}: login events"
    );
    let transcripts = files_under(&run.path("transcripts"));
    assert_eq!(
        transcripts.len(),
        sessions,
        "{sinks:?}: one transcript per session"
    );
    let mut all = String::new();
    for t in &transcripts {
        let text = std::fs::read_to_string(t).unwrap();
        assert!(text.contains("S: +OK"), "{}: {text}", t.display());
        all.push_str(&text);
    }
    // curl asks CAPA: the list as the client got it is in the transcript too.
    assert!(
        all.contains("S: PIPELINING"),
        "{sinks:?}: no CAPA list in transcripts"
    );
    assert!(all.contains(&format!("C: USER {user}")), "{sinks:?}");
    assert!(all.contains("C: PASS ***"), "{sinks:?}");
    assert!(all.contains(&format!("C: APOP {user} ***")), "{sinks:?}");
    assert!(all.contains("C: AUTH PLAIN ***"), "{sinks:?}");
    assert!(all.contains("C: ***"), "{sinks:?}: SASL continuation lines");
    // Full bodies: the message text is there.
    assert!(all.contains("S: nothing secret here"), "{sinks:?}");
}

#[test]
fn nothing_secret_in_text_logs_audit_files_and_transcripts() {
    check_run(Sinks {
        log_format: "text",
        log_to_dir: true,
        audit_stdout: false,
    });
}

#[test]
fn nothing_secret_in_json_logs_audit_files_and_transcripts() {
    check_run(Sinks {
        log_format: "json",
        log_to_dir: true,
        audit_stdout: false,
    });
}

#[test]
fn nothing_secret_on_stderr_and_stdout() {
    check_run(Sinks {
        log_format: "text",
        log_to_dir: false,
        audit_stdout: true,
    });
}

// ---------------------------------------------------------------------------------------------
// The OAuth2 bridge: local passwords in, tokens out

/// Every login method with a local password through the OAuth2 bridge to an OAuth-only Dovecot
/// (tests/it/oauth2.rs has the set-up), plus a wrong password, a token revoked at the server (the
/// retry path) and the token endpoint down; trace logs (text, to files), audit files, full
/// transcripts, `log` rules. No file popgate wrote holds the local passwords (or their base64
/// forms), an access or refresh token the server issued (or the XOAUTH2 line built from one),
/// or the client secret.
#[test]
#[ignore = "needs dovecot and python3-authlib (run .ci/run)"]
fn nothing_secret_with_the_oauth2_bridge() {
    use common::authserver::{AuthServer, CLIENT};
    use common::dovecot::{Dovecot, DovecotOpts, msg_dots};

    let s = Secrets::new();
    let auth = AuthServer::start(60);
    let dv = Dovecot::start(DovecotOpts::oauth2(&auth.introspection_url()).user(
        "alice",
        "unused",
        vec![msg_dots()],
    ));
    let bridge = tempfile::tempdir().unwrap();
    let b = bridge.path();
    let hash = popgate::oauth2::hash_password(s.pass.as_bytes()).unwrap();
    std::fs::write(
        b.join("users.toml"),
        format!(
            "{:?} = {{ hash = {hash:?}, mailbox = \"alice\" }}\n",
            s.user
        ),
    )
    .unwrap();
    std::fs::write(
        b.join("tokens.toml"),
        format!("alice = {:?}\n", auth.mint("alice")),
    )
    .unwrap();
    let opts = PopgateOpts::new()
        .top("rules = [\"rules.toml\"]\n")
        .file("rules.toml", RULES)
        .tables(&format!(
            "[upstream.oauth2]\ntoken_url = \"{}\"\nclient_id = \"{}\"\n\
             client_secret_env = \"RD_OAUTH2_SECRET\"\ntokens_file = {:?}\n\
             credentials_file = {:?}\n\
             [limits]\nlogin_fail_delay = \"0s\"\n\
             [log]\nlevel = \"trace\"\nformat = \"text\"\ndir = \"log\"\nrotation = \"never\"\n\
             [audit]\nenabled = true\ndir = \"audit\"\n\
             [audit.transcript]\ndir = \"transcripts\"\nlisteners = [\"bin\"]\nfull_bodies = true\n",
            auth.url("/token"),
            CLIENT.0,
            b.join("tokens.toml"),
            b.join("users.toml"),
        ))
        .env("RD_OAUTH2_SECRET", CLIENT.1)
        .log_dir("log")
        .wait_for_log();
    let mut run = PopgateProcess::run(dv.addr(), opts);
    let (user, pass) = (s.user.as_str(), s.pass.as_str());
    let plain = base64(format!("\0{user}\0{pass}").as_bytes());
    let logins: Vec<Vec<String>> = vec![
        vec![format!("USER {user}"), format!("PASS {pass}")],
        vec![format!("AUTH PLAIN {plain}")],
        vec!["AUTH PLAIN".into(), plain.clone()],
        vec![
            "AUTH LOGIN".into(),
            base64(user.as_bytes()),
            base64(pass.as_bytes()),
        ],
    ];
    let log_in = |lines: &[String]| -> String {
        let mut c = RawPop::connect(run.addr);
        let mut last = String::new();
        for l in lines {
            last = c.cmd(l);
        }
        if last.starts_with("+OK") {
            let (status, _) = c.cmd_multi("RETR 1");
            assert!(status.starts_with("+OK"), "{status}");
            c.cmd("QUIT");
        }
        last
    };
    for (i, l) in logins.iter().enumerate() {
        if i == 2 {
            // the next login's token is refused once, and replaced
            auth.revoke("alice");
        }
        let r = log_in(l);
        assert!(r.starts_with("+OK"), "{l:?}: {r}");
    }
    let r = log_in(&[format!("USER {user}"), format!("PASS {}", s.wrong)]);
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    // expire the cache (revoke) and take the endpoint down: [SYS/TEMP]
    auth.revoke("alice");
    std::thread::sleep(std::time::Duration::from_millis(100));
    auth.set_down(true);
    let r = {
        // the cached token is still "fresh" for popgate: it is refused upstream, and the
        // refresh for the retry fails
        log_in(&logins[0])
    };
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    auth.set_down(false);
    run.stop();

    let tokens = auth.all_tokens();
    assert!(tokens.len() >= 4, "{tokens:?}");
    let mut needles = s.needles();
    needles.push(CLIENT.1.to_owned());
    for t in &tokens {
        needles.push(t.clone());
        needles.push(base64(
            format!("user=alice\x01auth=Bearer {t}\x01\x01").as_bytes(),
        ));
    }
    for f in files_under(run.dir.path()) {
        let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned();
        for n in &needles {
            assert!(
                !text.contains(n.as_str()),
                "secret {n:?} found in {}",
                f.display()
            );
        }
    }
    // not vacuous: the log and the transcripts name the user, the log the bridge's lines
    let log = run.log();
    assert!(log.contains(user), "{}", clients::tail(&log, 2000));
    assert!(
        log.contains("oauth2: no access token"),
        "{}",
        clients::tail(&log, 2000)
    );
    assert!(
        log.contains("refused the access token, retrying"),
        "{}",
        clients::tail(&log, 2000)
    );
    let transcripts = files_under(&run.dir.path().join("transcripts"));
    assert!(!transcripts.is_empty());
}
