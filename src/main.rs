//! The popgate binary: parse the CLI, set up logging, load config, run.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use popgate::Config;
use popgate::cli::{Cli, CliCommand};
use popgate::config::LogConfig;
use popgate::daemon::{Logging, notify};

/// jemalloc instead of glibc malloc: after a load of many concurrent sessions glibc kept the
/// freed, fragmented session memory in the worker threads' arenas and RSS stayed at its peak;
/// jemalloc's background thread returns it to the OS. See benches/SOAK.md and Cargo.toml.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        CliCommand::Check { config } => {
            let c = Config::load(&config)?;
            c.check_dirs(&config)?;
            popgate::daemon::check_dirs_for_user(&c)
                .with_context(|| format!("{}", config.display()))?;
            // Loads certificates and keys too, so unreadable or mismatched files show up here.
            let c = popgate::prepare(c)
                .with_context(|| format!("{}: loading referenced files", config.display()))?
                .config
                .clone();
            println!(
                "{}: OK ({} listener(s), upstream {})",
                config.display(),
                c.listeners.len(),
                c.upstream.address
            );
            Ok(())
        }
        CliCommand::Run { config } => {
            let mut c = Config::load(&config)?;
            let level_override = cli.log_level.clone();
            if let Some(level) = level_override.clone() {
                c.log.level = level;
                c.validate(&config)?;
            }
            c.check_dirs(&config)?;
            popgate::daemon::check_dirs_for_user(&c)
                .with_context(|| format!("{}", config.display()))?;
            // Before any file or directory is created: which ones popgate makes as root.
            let privdrop = popgate::daemon::PrivilegeDrop::prepare(&c)?;
            let logging = Arc::new(Logging::init(&c.log)?);
            runtime.block_on(async {
                let proxy = popgate::Proxy::bind(c).await?;
                // Listeners bound and files open: root is no longer needed.
                if let Some(drop) = privdrop {
                    let (uid, gid) = drop.apply()?;
                    tracing::info!(uid, gid, "switched to process.user/group");
                }
                spawn_reload_on_sighup(
                    proxy.reloader(Some(config.clone())),
                    logging.clone(),
                    level_override,
                );
                spawn_reopen_on_usr1(proxy.reopener(), logging.clone());
                notify::ready();
                proxy
                    .run(async {
                        shutdown_signal().await;
                        notify::stopping();
                    })
                    .await;
                Ok(())
            })
        }
        CliCommand::Audit {
            files,
            user,
            since,
            event,
            json,
        } => {
            use popgate::audit::{Filter, format_json, format_table, read_events};
            let filter = Filter::from_args(user, since.as_deref(), &event)?;
            let records = read_events(&files, &filter)?;
            let out = if json {
                format_json(&records)
            } else {
                format_table(&records)
            };
            print!("{out}");
            Ok(())
        }
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

/// SIGHUP reloads certificates and rules (a broken new set keeps the old one and logs why),
/// then the `[log]` table (level, format, output) through [`Logging::apply`]; systemd hears
/// RELOADING=1 before and READY=1 after. The signal handler is installed before this returns.
fn spawn_reload_on_sighup(
    reloader: popgate::Reloader,
    logging: Arc<Logging>,
    level_override: Option<String>,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP: reload disabled");
            return;
        };
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading");
                notify::reloading();
                let status = match reload(&reloader, &logging, level_override.as_deref()) {
                    Ok(()) => "reloaded".to_owned(),
                    Err(e) => {
                        tracing::error!(
                            error = %format!("{e:#}"),
                            "reload failed; what failed to load stays as it was"
                        );
                        format!("reload failed: {e:#}")
                    }
                };
                notify::reloaded(&status);
            }
        });
    }
}

fn reload(
    reloader: &popgate::Reloader,
    logging: &Logging,
    level_override: Option<&str>,
) -> Result<()> {
    reloader.reload()?;
    if let Some(path) = reloader.path() {
        let mut fresh = Config::load(path)?;
        if let Some(level) = level_override {
            fresh.log.level = level.to_owned();
        }
        logging.apply(&fresh.log)?;
    }
    Ok(())
}

/// SIGUSR1 (logrotate's `postrotate`): reopen the log file, the audit file and the transcript
/// files at their configured paths. The handler is installed before this returns, so the
/// signal's default action (exit) no longer applies.
fn spawn_reopen_on_usr1(reopener: popgate::Reopener, logging: Arc<Logging>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
            tracing::warn!("cannot listen for SIGUSR1: reopening files disabled");
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
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// The development certificate (certs/, regenerated by certs/generate.sh), built in so that
/// `popgate demo` works from any directory.
const DEMO_CERT: &str = include_str!("../certs/localhost.crt");
const DEMO_KEY: &str = include_str!("../certs/localhost.key");

/// `popgate demo`: the demo POP3 server on an ephemeral loopback port, the proxy in front of
/// it with a plain+STLS listener and an implicit-TLS listener.
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
    std::fs::create_dir_all(&dir).context("creating a temp dir for the demo certificate")?;
    let (cert, key) = (dir.join("localhost.crt"), dir.join("localhost.key"));
    std::fs::write(&cert, DEMO_CERT)?;
    std::fs::write(&key, DEMO_KEY)?;
    let text = format!(
        "[[listener]]\nname = \"demo\"\nbind = \"{bind}\"\ntls = \"starttls\"\n\
         [[listener]]\nname = \"demo-tls\"\nbind = \"{tls_bind}\"\ntls = \"implicit\"\n\
         [upstream]\naddress = \"{}\"\n[tls]\ncert = {:?}\nkey = {:?}\n\
         [limits]\nmax_sessions = 1000\n",
        server.local_addr(),
        cert,
        key
    );
    let config = Config::parse(&text, Path::new("<demo>"))?;
    config.validate(Path::new("<demo>"))?;
    let proxy = popgate::Proxy::bind(config).await?;
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
    println!("try:");
    println!(
        "  curl pop3://{creds}@{}/      # list messages",
        hostport(plain)
    );
    println!(
        "  curl pop3://{creds}@{}/1     # retrieve message 1",
        hostport(plain)
    );
    println!(
        "  curl --ssl-reqd --cacert certs/dev-ca.crt pop3://{creds}@localhost:{}/2   # over STLS",
        plain.port()
    );
    println!(
        "  curl --cacert certs/dev-ca.crt pop3s://{creds}@localhost:{}/3   # implicit TLS",
        tls.port()
    );
    println!("press Ctrl-C to stop");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    proxy.run(shutdown_signal()).await;
    server.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
