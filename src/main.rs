//! The popgate binary: parse the CLI, set up logging, load config, run.

use std::path::Path;

use anyhow::{Context, Result};
use clap::Parser;
use popgate::Config;
use popgate::cli::{Cli, CliCommand};
use popgate::config::{LogConfig, LogFormat, Rotation};
use tracing_appender::non_blocking::WorkerGuard;

/// jemalloc instead of glibc malloc: after a load of many concurrent sessions glibc kept the
/// freed, fragmented session memory in the worker threads' arenas and RSS stayed at its peak;
/// jemalloc's background thread returns it to the OS. See benches/SOAK.md and Cargo.toml.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> Result<()> {
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
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        CliCommand::Check { config } => {
            let c = Config::load(&config)?;
            c.check_dirs(&config)?;
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
            if let Some(level) = cli.log_level {
                c.log.level = level;
                c.validate(&config)?;
            }
            c.check_dirs(&config)?;
            let _guard = init_logging(&c.log)?;
            runtime.block_on(async {
                let proxy = popgate::Proxy::bind(c).await?;
                spawn_reload_on_sighup(proxy.reloader(Some(config.clone())));
                proxy.run(shutdown_signal()).await;
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
            use popgate::audit::{Filter, format_json, format_table, read_audit};
            let filter = Filter::from_args(user, since.as_deref(), &event)?;
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
        CliCommand::Completions { .. } | CliCommand::Man { .. } => Ok(()),
        CliCommand::Demo { bind, tls_bind } => {
            let log = LogConfig {
                level: cli.log_level.unwrap_or_else(|| "info".into()),
                ..LogConfig::default()
            };
            let _guard = init_logging(&log)?;
            runtime.block_on(run_demo(bind, tls_bind))?;
            Ok(())
        }
    }
}

/// popgate(1) to stdout, or popgate.1 plus popgate-SUBCOMMAND.1 (which popgate.1 refers to)
/// into `dir`.
fn write_man(dir: Option<&Path>) -> Result<()> {
    use clap::CommandFactory as _;
    // The man page's VERSION section is one paragraph: the build facts on one line. No `help`
    // subcommand there (`generate_to` drops it too), so popgate.1 names only real pages.
    let cmd = Cli::command()
        .long_version(popgate::cli::VERSION_LINE)
        .disable_help_subcommand(true);
    let Some(dir) = dir else {
        clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
        return Ok(());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(cmd, dir).with_context(|| format!("writing to {}", dir.display()))?;
    Ok(())
}

/// Stderr or rotated files, text or JSON. The guard flushes the non-blocking writer at exit.
fn init_logging(log: &LogConfig) -> Result<WorkerGuard> {
    let filter = tracing_subscriber::EnvFilter::try_new(&log.level)
        .with_context(|| format!("invalid log level {:?}", log.level))?;
    let (writer, guard) = match &log.dir {
        Some(dir) => {
            let rotation = match log.rotation {
                Rotation::Daily => tracing_appender::rolling::Rotation::DAILY,
                Rotation::Hourly => tracing_appender::rolling::Rotation::HOURLY,
                Rotation::Never => tracing_appender::rolling::Rotation::NEVER,
            };
            let appender = tracing_appender::rolling::RollingFileAppender::builder()
                .rotation(rotation)
                .filename_prefix("popgate")
                .filename_suffix("log")
                .build(Path::new(dir))
                .with_context(|| format!("opening log directory {}", dir.display()))?;
            tracing_appender::non_blocking(appender)
        }
        None => tracing_appender::non_blocking(std::io::stderr()),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(log.dir.is_none());
    match log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(guard)
}

/// SIGHUP reloads certificates; a broken new set keeps the old one and logs why.
fn spawn_reload_on_sighup(reloader: popgate::Reloader) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP: reload disabled");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading");
            if let Err(e) = reloader.reload() {
                tracing::error!(
                    error = %e,
                    "reload failed; what failed to load (rules or certificates) stays as it was"
                );
            }
        }
    });
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
         [[listener]]\nname = \"demo\"\nbind = \"{bind}\"\ntls = \"starttls\"\n\
         [[listener]]\nname = \"demo-tls\"\nbind = \"{tls_bind}\"\ntls = \"implicit\"\n\
         [upstream]\naddress = \"{}\"\n\
         [tls]\ncert = \"localhost.crt\"\nkey = \"localhost.key\"\n\
         [limits]\nmax_sessions = 1000\n",
        server.local_addr(),
    );
    let config_path = dir.join("popgate.toml");
    std::fs::write(&config_path, text)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let config = Config::load(&config_path)?;
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
    println!("press Ctrl-C to stop");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    proxy.run(shutdown_signal()).await;
    server.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
