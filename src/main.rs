//! The popgate binary: parse the CLI, set up logging, load config, run.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use popgate::Config;
use popgate::cli::{Cli, CliCommand, Oauth2Command};
use popgate::config::LogConfig;
use popgate::daemon::{Logging, notify};
use tokio::signal::unix::{Signal, SignalKind};

/// jemalloc instead of glibc malloc: after a load of many concurrent sessions glibc kept the
/// freed, fragmented session memory in the worker threads' arenas and RSS stayed at its peak;
/// jemalloc's background thread returns it to the OS. See benches/SOAK.md and Cargo.toml.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Errors print as one message (`popgate: outer: cause: cause`) and exit 1, whatever
/// `RUST_BACKTRACE` says: a config mistake is not a crash, so no backtrace block.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("popgate: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    // Packaging helpers: print and leave, no runtime needed.
    match &cli.command {
        CliCommand::Completions { shell } => {
            use clap::CommandFactory as _;
            let mut cmd = Cli::command();
            clap_complete::generate(*shell, &mut cmd, "popgate", &mut std::io::stdout());
            return Ok(());
        }
        CliCommand::Man { dir } => return write_man(dir.as_deref()),
        _ => {}
    }
    // Sockets passed by systemd (popgate.socket): taken before any thread starts, since it
    // clears LISTEN_FDS/LISTEN_PID from the environment.
    let inherited = match &cli.command {
        CliCommand::Run { .. } => popgate::Inherited::from_env(),
        _ => popgate::Inherited::default(),
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        CliCommand::Check { config, print } => {
            let mut c = Config::load(&config)?;
            if let Some(level) = cli.log_level {
                c.log.level = level;
                c.validate(&config)?;
            }
            // Directories the `[process] user` could not write in after the switch.
            popgate::daemon::check_dirs_for_user(&c)
                .with_context(|| format!("{}", config.display()))?;
            // The same checks as a start and a reload: directories, certificates and keys,
            // rule files.
            let checked = match popgate::check(c, &config) {
                Ok(c) => c,
                // Config errors name the file already; the others name only the file they
                // are about.
                Err(e @ popgate::StartError::Config(_)) => return Err(e.into()),
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("{}: loading referenced files", config.display())));
                }
            };
            let mut warnings = checked.warnings;
            // `[state] backend = "redis"`: connect, authenticate, a round trip.
            let state_line = match runtime.block_on(popgate::state::check(&checked.config.state)) {
                popgate::state::StateCheck::Local => None,
                popgate::state::StateCheck::Ok(line) => Some(line),
                popgate::state::StateCheck::Unreachable(why) => {
                    warnings.push(why);
                    None
                }
                popgate::state::StateCheck::Failed(why) => {
                    anyhow::bail!("{}: {why}", config.display())
                }
            };
            // Each `[[scanner]]` answers its ping; one that does not is a warning (scanning
            // follows scan.on_error until it does).
            let mut scanner_lines = Vec::new();
            for (name, outcome) in runtime.block_on(popgate::scan::check(&checked.config.scanners))
            {
                match outcome {
                    Ok(()) => scanner_lines.push(format!("scanner {name:?}: answers")),
                    Err(why) => warnings.push(format!(
                        "scanner {name:?} does not answer ({why}): scans with it are errors \
                         (scan.on_error) until it does"
                    )),
                }
            }
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            for line in &scanner_lines {
                eprintln!("{line}");
            }
            if let Some(line) = state_line {
                eprintln!("{line}");
            }
            let c = checked.config;
            if print {
                println!(
                    "# {}: the effective configuration, defaults filled in",
                    config.display()
                );
                print!(
                    "{}",
                    popgate::effective_toml(&c).map_err(anyhow::Error::msg)?
                );
            } else {
                println!(
                    "{}: OK ({} listener(s), upstream {}{})",
                    config.display(),
                    c.listeners.len(),
                    c.upstreams
                        .iter()
                        .map(|u| match &u.name {
                            Some(n) => format!("{n}={}", u.address.join(",")),
                            None => u.address.join(","),
                        })
                        .collect::<Vec<_>>()
                        .join(" "),
                    match warnings.len() {
                        0 => String::new(),
                        n => format!(", {n} warning(s)"),
                    }
                );
            }
            Ok(())
        }
        CliCommand::Reload {
            socket,
            pid_file,
            config,
            pid,
            timeout,
        } => {
            use popgate::pidfile::ReloadTarget;
            // The control socket when there is one: the outcome comes back on it.
            let via_socket = match (&socket, &config) {
                (Some(s), _) => Some(s.clone()),
                (None, Some(config)) => match Config::load(config)?.control {
                    Some(c) => Some(popgate::control::socket_path(&c)?),
                    None => None,
                },
                _ => None,
            };
            if let Some(path) = via_socket {
                use popgate::control::{client, protocol::Command};
                return match client::request(&path, Command::Reload) {
                    Ok(answer) => {
                        println!("popgate: {}", answer.reload.unwrap_or_default());
                        Ok(())
                    }
                    Err(e) => Err(e.into()),
                };
            }
            let target = match (pid_file, config, pid) {
                (Some(p), _, _) => ReloadTarget::PidFile(p),
                (None, Some(config), _) => ReloadTarget::PidFile(
                    Config::load(&config)?
                        .pid_file
                        .with_context(|| format!("{}: no pid_file is set", config.display()))?,
                ),
                (None, None, Some(pid)) => ReloadTarget::Pid(pid),
                (None, None, None) => anyhow::bail!("give --pid-file, --config or --pid"),
            };
            let wait = std::time::Duration::from_secs(timeout);
            match popgate::pidfile::reload_and_wait(&target, wait)? {
                None => {
                    println!("sent SIGHUP to popgate; the result is in its log");
                    Ok(())
                }
                Some(outcome) if outcome.ok => {
                    println!("popgate (pid {}): {}", outcome.pid, outcome.line);
                    Ok(())
                }
                Some(outcome) => {
                    anyhow::bail!("popgate (pid {}): {}", outcome.pid, outcome.line)
                }
            }
        }
        CliCommand::Run { config } => {
            let mut c = Config::load(&config)?;
            if let Some(level) = cli.log_level {
                c.log.level = level;
                c.validate(&config)?;
            }
            c.check_dirs(&config)?;
            popgate::daemon::check_dirs_for_user(&c)
                .with_context(|| format!("{}", config.display()))?;
            // Before any file or directory is created: which ones popgate makes as root.
            let privdrop = popgate::daemon::PrivilegeDrop::prepare(&c)?;
            let logging = Arc::new(Logging::init(&c.log)?);
            let pid_path = c.pid_file.clone();
            runtime.block_on(async {
                // Every signal popgate handles is caught from here on, before any listener
                // answers: a SIGTERM, SIGHUP or SIGUSR1 sent as soon as the port is open is
                // handled, never the default action (exit).
                let shutdown = shutdown_signal();
                let hup = signal_stream(SignalKind::hangup(), "SIGHUP: reload disabled");
                let usr1 =
                    signal_stream(SignalKind::user_defined1(), "SIGUSR1: reopening files disabled");
                let proxy = popgate::Proxy::bind_inherited(c, &config, inherited).await?;
                // Written once the listeners are bound; removed when dropped, at exit (the
                // directory is the user's after a privilege drop). The reload status file
                // beside it (or under systemd's RuntimeDirectory) tells `popgate reload` the
                // outcome.
                let _pid = pid_path
                    .as_deref()
                    .map(popgate::pidfile::PidFile::create)
                    .transpose()?;
                let status = match pid_path.as_deref() {
                    Some(p) => Some(popgate::pidfile::status_path(p)),
                    None => popgate::pidfile::runtime_status_path(),
                };
                // Without it `popgate reload` cannot wait, but popgate serves on.
                let status = status.as_deref().and_then(|p| {
                    popgate::pidfile::ReloadStatus::create(p)
                        .inspect_err(|e| {
                            tracing::error!(error = %e, "no reload status file: `popgate reload` cannot wait for the outcome")
                        })
                        .ok()
                });
                // Listeners bound and files open: root is no longer needed.
                if let Some(drop) = privdrop {
                    let (uid, gid) = drop.apply()?;
                    tracing::info!(uid, gid, "switched to process.user/group");
                }
                let mut proxy = proxy;
                // The control socket, as the user popgate runs as from here on.
                if let Some(path) = proxy.start_control(Some(proxy.reloader(Some(config.clone()))))? {
                    tracing::info!(path = %path.display(), "control socket ready");
                }
                let reloader = proxy.reloader(Some(config.clone()));
                let hook_logging = logging.clone();
                reloader.set_log_hook(Box::new(move |new: &LogConfig| {
                    hook_logging.apply(new).map_err(|e| e.to_string())
                }));
                spawn_reload_on_sighup(hup, reloader, status);
                spawn_reopen_on_usr1(usr1, proxy.reopener(), logging.clone());
                notify::ready();
                tokio::spawn(notify::watchdog());
                proxy
                    .run(async {
                        shutdown.await;
                        notify::stopping();
                    })
                    .await;
                Ok(())
            })
        }
        CliCommand::Sessions {
            socket,
            filter,
            json,
        } => {
            use popgate::control::{client, protocol};
            let path = control_socket(&socket)?;
            let answer = client::request(
                &path,
                protocol::Command::Sessions {
                    filter: filter.into(),
                },
            )?;
            let rows = answer.sessions.unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", client::format_sessions(&rows, colour()));
            }
            Ok(())
        }
        CliCommand::Status { socket, json } => {
            use popgate::control::{client, protocol};
            let path = control_socket(&socket)?;
            let answer = client::request(&path, protocol::Command::Status)?;
            let status = answer
                .status
                .context("popgate answered status without one")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", client::format_status(&status));
            }
            Ok(())
        }
        CliCommand::Kick { socket, filter } => {
            use popgate::control::{client, protocol};
            let path = control_socket(&socket)?;
            let answer = client::request(
                &path,
                protocol::Command::Kick {
                    filter: filter.into(),
                },
            )?;
            let ids = answer.kicked.unwrap_or_default();
            if ids.is_empty() {
                anyhow::bail!("no session matched");
            }
            let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
            println!("kicked {} session(s): {}", ids.len(), ids.join(" "));
            Ok(())
        }
        CliCommand::Tap {
            socket,
            filter,
            bodies,
            json,
        } => {
            use popgate::control::{client, protocol};
            use std::io::Write as _;
            let path = control_socket(&socket)?;
            let color = colour();
            let command = protocol::Command::Tap {
                filter: filter.into(),
                bodies,
            };
            let mut out = std::io::stdout().lock();
            client::tap(
                &path,
                command,
                |ids| {
                    let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
                    eprintln!(
                        "popgate tap: attached to {} session(s) now{}{}; later ones attach as they match",
                        ids.len(),
                        if ids.is_empty() { "" } else { ": " },
                        ids.join(" ")
                    );
                },
                |line| {
                    let text = if json {
                        serde_json::to_string(line).unwrap_or_default()
                    } else {
                        client::format_tap_line(line, color)
                    };
                    // A closed pipe (`| head`) ends the tap.
                    writeln!(out, "{text}").and_then(|()| out.flush()).is_ok()
                },
            )?;
            eprintln!("popgate tap: detached (popgate closed the connection or the output)");
            Ok(())
        }
        CliCommand::Audit {
            files,
            user,
            since,
            until,
            uidl,
            message_id,
            msg_user,
            event,
            json,
        } => {
            use popgate::audit::{AuditFilter, format_json, format_table, read_audit};
            let filter = AuditFilter {
                uidl,
                message_id,
                msg_user,
                ..AuditFilter::from_args(user, since.as_deref(), &event)?.until(until.as_deref())?
            };
            let read = read_audit(&files, &filter)?;
            let out = if json {
                format_json(&read.records)
            } else {
                format_table(&read.records)
            };
            print!("{out}");
            // Lines that are not events are shown, never skipped silently; only damaged
            // complete lines fail the command (a last line being written is normal).
            for b in &read.bad {
                eprintln!("popgate audit: {b}");
            }
            let damaged = read.bad.iter().filter(|b| !b.incomplete).count();
            if damaged > 0 {
                anyhow::bail!(
                    "{damaged} unreadable line(s) in the audit files (listed above); \
                     the other events are shown"
                );
            }
            Ok(())
        }
        CliCommand::Oauth2 { action } => runtime.block_on(oauth2_command(action)),
        CliCommand::Completions { .. } | CliCommand::Man { .. } => Ok(()),
        CliCommand::Demo { bind, tls_bind } => {
            let log = LogConfig {
                level: cli.log_level.unwrap_or_else(|| "info".into()),
                ..LogConfig::default()
            };
            let _logging = Logging::init(&log)?;
            runtime.block_on(run_demo(bind, tls_bind))?;
            Ok(())
        }
    }
}

/// The control socket `--socket` names, or the `[control]` one of `--config`.
fn control_socket(args: &popgate::cli::SocketArgs) -> Result<std::path::PathBuf> {
    if let Some(s) = &args.socket {
        return Ok(s.clone());
    }
    let Some(config) = &args.config else {
        anyhow::bail!("give --config or --socket");
    };
    let c = Config::load(config)?;
    let control = c.control.with_context(|| {
        format!(
            "{}: no [control] table (no control socket)",
            config.display()
        )
    })?;
    popgate::control::socket_path(&control).with_context(|| format!("{}", config.display()))
}

/// Whether stdout is a terminal (colour then, plain text in a pipe).
fn colour() -> bool {
    use std::io::IsTerminal as _;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// `popgate oauth2 hash-password | login`.
async fn oauth2_command(action: Oauth2Command) -> Result<()> {
    match action {
        Oauth2Command::HashPassword => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the password from stdin")?;
            let password = line.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(!password.is_empty(), "empty password on stdin");
            let hash = popgate::oauth2::hash_password(password.as_bytes())
                .map_err(|e| anyhow::anyhow!("hashing: {e}"))?;
            println!("{hash}");
            Ok(())
        }
        Oauth2Command::Login {
            config,
            upstream,
            user,
        } => {
            let c = Config::load(&config)?;
            let with_oauth2: Vec<_> = c.upstreams.iter().filter(|u| u.oauth2.is_some()).collect();
            let u = match upstream.as_deref() {
                Some(name) => c
                    .upstream_named(name)
                    .or_else(|| c.upstreams.iter().find(|u| u.label() == name))
                    .with_context(|| format!("{}: no upstream {name:?}", config.display()))?,
                None => match with_oauth2.as_slice() {
                    [one] => one,
                    [] => anyhow::bail!("{}: no upstream has [oauth2]", config.display()),
                    _ => anyhow::bail!(
                        "{}: several upstreams have [oauth2]: pick one with --upstream",
                        config.display()
                    ),
                },
            };
            let o = u.oauth2.as_ref().with_context(|| {
                format!(
                    "{}: upstream {} has no [oauth2]",
                    config.display(),
                    u.label()
                )
            })?;
            let file = popgate::oauth2::device_login(o, &c.base_dir, &user, |line| {
                println!("{line}");
            })
            .await?;
            println!("refresh token for {user} stored in {}", file.display());
            Ok(())
        }
    }
}

/// popgate(1) to stdout, or popgate.1, popgate-SUBCOMMAND.1 (which popgate.1 refers to) and
/// popgate.toml(5) into `dir`.
fn write_man(dir: Option<&Path>) -> Result<()> {
    use clap::CommandFactory as _;
    // The man page's VERSION section is one paragraph: the build facts on one line. No `help`
    // subcommand there (`generate_to` drops it too), so popgate.1 names only real pages.
    let cmd = Cli::command()
        .long_version(popgate::cli::VERSION_LINE)
        .disable_help_subcommand(true);
    let mut main_page = Vec::new();
    render_main_page(cmd.clone(), &mut main_page)?;
    let Some(dir) = dir else {
        use std::io::Write as _;
        std::io::stdout().write_all(&main_page)?;
        return Ok(());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(cmd, dir).with_context(|| format!("writing to {}", dir.display()))?;
    for (name, text) in [
        ("popgate.1", main_page),
        (
            "popgate.toml.5",
            popgate::reference::man_page(env!("CARGO_PKG_VERSION")).into_bytes(),
        ),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// popgate(1): clap's sections, then SIGNALS, FILES, EXIT STATUS and SEE ALSO.
fn render_main_page(cmd: clap::Command, out: &mut Vec<u8>) -> Result<()> {
    use std::io::Write as _;
    let man = clap_mangen::Man::new(cmd);
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    man.render_subcommands_section(out)?;
    out.write_all(MAN_EXTRA.as_bytes())?;
    man.render_version_section(out)?;
    Ok(())
}

/// The sections of popgate(1) that clap does not know.
const MAN_EXTRA: &str = r#".SH SIGNALS
.TP
\fBSIGHUP\fR
Reload the whole configuration and every file it names; applied whole or not at all.
\fBpopgate reload\fR sends it and waits for the outcome.
.TP
\fBSIGUSR1\fR
Reopen the log file, the audit file and open transcripts (logrotate's postrotate).
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Stop accepting, let open sessions finish for \fBshutdown_grace\fR, then close the rest with
\-ERR [SYS/TEMP] and the upstream without QUIT (nothing is deleted), and exit 0.
.SH FILES
.TP
\fI/etc/popgate/popgate.toml\fR
The configuration (see \fBpopgate.toml\fR(5)); \fBpopgate check \-\-print\fR shows it
with every default.
.TP
\fI/etc/popgate/rules/\fR
Rule files named by the \fBrules\fR key.
.TP
\fI/run/popgate/popgate.pid\fR
The process id, when \fBpid_file\fR is set; removed at exit.
.TP
\fI/var/log/popgate/\fR
Operational logs (\fBlog.dir\fR), the audit trail (\fBaudit.dir\fR,
audit.YYYY\-MM\-DD.jsonl) and transcripts, when configured.
.SH EXIT STATUS
.TP
\fB0\fR
Success; for \fBrun\fR, a clean stop after SIGTERM or SIGINT.
.TP
\fB1\fR
An error, printed as one line on standard error: a configuration that does not pass the
checks, a listener that cannot be bound, a failed reload (\fBpopgate reload\fR), unreadable
audit lines (\fBpopgate audit\fR).
.TP
\fB2\fR
A command line that cannot be parsed.
.SH SEE ALSO
\fBpopgate.toml\fR(5), \fBpopgate\-run\fR(1), \fBpopgate\-check\fR(1), \fBdovecot\fR(1),
\fBhaproxy\fR(1)
"#;

/// SIGHUP reloads the whole config; a config that fails the checks changes nothing. systemd
/// hears RELOADING=1 before and READY=1 (with the outcome as STATUS) after. The handler is
/// installed before this returns.
fn spawn_reload_on_sighup(
    hup: Option<Signal>,
    reloader: popgate::Reloader,
    mut status: Option<popgate::pidfile::ReloadStatus>,
) {
    let Some(mut hup) = hup else {
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading");
            notify::reloading();
            // Before the config is read: `popgate reload` tells this reload from one
            // that read the config before its signal.
            if let Some(s) = status.as_mut()
                && let Err(e) = s.begin()
            {
                tracing::error!(error = %e, "cannot write the reload status file");
            }
            let (ok, line) = match reloader.reload().await {
                Ok(line) => {
                    tracing::info!("{line}");
                    (true, line)
                }
                Err(e) => {
                    tracing::error!("reload failed, nothing changed: {e}");
                    (false, format!("reload failed, nothing changed: {e}"))
                }
            };
            // For `popgate reload`, which waits for it.
            if let Some(s) = status.as_mut()
                && let Err(e) = s.record(ok, &line)
            {
                tracing::error!(error = %e, "cannot write the reload status file");
            }
            notify::reloaded(&line);
        }
    });
}

/// SIGUSR1 (logrotate's `postrotate`): reopen the log file, the audit file and the transcript
/// files at their configured paths. The handler is installed before this returns, so the
/// signal's default action (exit) no longer applies.
fn spawn_reopen_on_usr1(usr1: Option<Signal>, reopener: popgate::Reopener, logging: Arc<Logging>) {
    let Some(mut usr1) = usr1 else {
        return;
    };
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            if let Err(e) = logging.reopen() {
                tracing::error!(error = %e, "SIGUSR1: cannot reopen the log file");
            }
            match reopener.reopen().await {
                Ok(()) => tracing::info!("SIGUSR1: log, audit and transcript files reopened"),
                Err(e) => tracing::error!(error = %e, "SIGUSR1: cannot reopen the audit file"),
            }
        }
    });
}

/// A stream of `kind`, or `None` after a warning (`what` says what is lost).
fn signal_stream(kind: SignalKind, what: &str) -> Option<Signal> {
    match tokio::signal::unix::signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for {what}");
            None
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled: a signal that arrives between the call and the first poll
/// (a test or systemd stopping popgate right after its listeners answer) still drains instead
/// of killing the process.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let term = signal_stream(SignalKind::terminate(), "SIGTERM");
    let int = signal_stream(SignalKind::interrupt(), "SIGINT");
    async move {
        match (term, int) {
            (Some(mut term), Some(mut int)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            (Some(mut one), None) | (None, Some(mut one)) => {
                one.recv().await;
            }
            (None, None) => std::future::pending().await,
        }
    }
}

/// The development certificate and its CA (certs/, regenerated by certs/generate.sh) and the
/// shipped require-tls rules, built in so that `popgate demo` works from any directory.
const DEMO_CERT: &str = include_str!("../certs/localhost.crt");
const DEMO_KEY: &str = include_str!("../certs/localhost.key");
const DEMO_CA: &str = include_str!("../certs/dev-ca.crt");
const DEMO_RULES: &str = include_str!("../rules/require-tls.toml");

/// `popgate demo`: the demo POP3 server on an ephemeral loopback port, the proxy in front of
/// it with a plain+STLS listener and an implicit-TLS listener. Its config, certificates, CA
/// and rules go to a temp directory (removed at exit) whose absolute paths the printed
/// commands use, and `require-tls` is on: no password before STLS.
async fn run_demo(bind: std::net::SocketAddr, tls_bind: std::net::SocketAddr) -> Result<()> {
    use popgate_demo::{DemoServer, ServerOptions, sample_mailboxes};
    let mailboxes = sample_mailboxes();
    let server = DemoServer::start(
        "127.0.0.1:0".parse()?,
        ServerOptions {
            mailboxes: mailboxes.clone(),
            apop: true,
            ..ServerOptions::default()
        },
    )
    .await
    .context("starting the demo POP3 server")?;
    let dir = std::env::temp_dir().join(format!("popgate-demo-{}", std::process::id()));
    // A short grace (shutdown_grace): Ctrl-C ends the demo within a second or two even with
    // sessions open.
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    std::fs::create_dir_all(&dir).context("creating a temp dir for the demo files")?;
    let ca = dir.join("dev-ca.crt");
    for (name, text) in [
        ("localhost.crt", DEMO_CERT),
        ("localhost.key", DEMO_KEY),
        ("dev-ca.crt", DEMO_CA),
        ("require-tls.toml", DEMO_RULES),
    ] {
        std::fs::write(dir.join(name), text)
            .with_context(|| format!("writing {}", dir.join(name).display()))?;
    }
    let text = format!(
        "# written by `popgate demo`; paths are relative to this file\n\
         rules = [\"require-tls.toml\"]\n\
         shutdown_grace = \"1s\"\n\
         [[listener]]\nname = \"demo\"\nbind = \"{bind}\"\ntls = \"starttls\"\n\
         [[listener]]\nname = \"demo-tls\"\nbind = \"{tls_bind}\"\ntls = \"implicit\"\n\
         [upstream]\naddress = \"{}\"\n\
         [tls]\ncert = \"localhost.crt\"\nkey = \"localhost.key\"\n\
         [limits]\nmax_sessions = 1000\n\
         [control]\nsocket = \"control.sock\"\n",
        server.local_addr(),
    );
    let config_path = dir.join("popgate.toml");
    std::fs::write(&config_path, text)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let config = Config::load(&config_path)?;
    let mut proxy = popgate::Proxy::bind(config).await?;
    let control = proxy.start_control(None)?;
    let addrs = proxy.local_addrs();
    let (Some((_, plain)), Some((_, tls))) = (addrs.first(), addrs.get(1)) else {
        anyhow::bail!("demo listeners have no address");
    };
    let hostport = |a: &std::net::SocketAddr| match a {
        std::net::SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        std::net::SocketAddr::V4(a) => a.to_string(),
    };
    let user = &mailboxes[0];
    let creds = format!("{}:{}", user.user, user.password);
    // The certificate is for `localhost`; curl checks it against the printed CA.
    let cacert = format!("--cacert {}", ca.display());
    println!(
        "popgate demo: proxy on {plain} (plain, STLS) and {tls} (implicit TLS), demo POP3 server on {}",
        server.local_addr()
    );
    println!(
        "user {:?}, password {:?}, {} messages",
        user.user,
        user.password,
        user.messages.len()
    );
    println!(
        "config {} with rules/require-tls.toml: no password before TLS",
        config_path.display()
    );
    println!("try:");
    println!(
        "  curl --ssl-reqd {cacert} pop3://{creds}@localhost:{}/     # list messages (STLS first)",
        plain.port()
    );
    println!(
        "  curl --ssl-reqd {cacert} pop3://{creds}@localhost:{}/1    # retrieve message 1 (STLS)",
        plain.port()
    );
    println!(
        "  curl {cacert} pop3s://{creds}@localhost:{}/2    # retrieve message 2 (implicit TLS)",
        tls.port()
    );
    println!(
        "  curl pop3://{creds}@{}/3    # refused: require-tls, no login before STLS (curl exits 67)",
        hostport(plain)
    );
    if let Some(socket) = control {
        println!("watch, list and end sessions live (docs/control.md):");
        println!(
            "  popgate tap --user {} --socket {}     # follow {}'s sessions, redacted",
            user.user,
            socket.display(),
            user.user
        );
        println!("  popgate sessions --socket {}", socket.display());
        println!(
            "  popgate kick --user {} --socket {}",
            user.user,
            socket.display()
        );
    }
    println!("press Ctrl-C to stop");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    proxy.run(shutdown_signal()).await;
    server.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
