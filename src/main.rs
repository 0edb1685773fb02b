//! The popgate binary: parse the CLI, set up logging, load config, run.

use std::path::Path;

use anyhow::{Context, Result};
use clap::Parser;
use popgate::Config;
use popgate::cli::{Cli, CliCommand};
use popgate::config::{LogConfig, LogFormat, Rotation};
use tracing_appender::non_blocking::WorkerGuard;

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        CliCommand::Check { config } => {
            let c = Config::load(&config)?;
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
            let _guard = init_logging(&c.log)?;
            runtime.block_on(async {
                let proxy = popgate::Proxy::bind(c).await?;
                proxy.run(shutdown_signal()).await;
                Ok(())
            })
        }
        CliCommand::Demo { bind } => {
            let log = LogConfig {
                level: cli.log_level.unwrap_or_else(|| "info".into()),
                ..LogConfig::default()
            };
            let _guard = init_logging(&log)?;
            runtime.block_on(run_demo(bind))?;
            Ok(())
        }
    }
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

/// `popgate demo`: the demo POP3 server on an ephemeral loopback port, the proxy in front of it.
async fn run_demo(bind: std::net::SocketAddr) -> Result<()> {
    use popgate::demo::{DemoServer, ServerOptions, sample_mailboxes};
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
    let text = format!(
        "[[listener]]\nname = \"demo\"\nbind = \"{bind}\"\n[upstream]\naddress = \"{}\"\n",
        server.local_addr()
    );
    let config = Config::parse(&text, Path::new("<demo>"))?;
    config.validate(Path::new("<demo>"))?;
    let proxy = popgate::Proxy::bind(config).await?;
    let addr = proxy
        .local_addrs()
        .first()
        .map(|(_, a)| *a)
        .context("demo listener has no address")?;
    let user = &mailboxes[0];
    let host = match addr {
        std::net::SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        std::net::SocketAddr::V4(a) => a.to_string(),
    };
    println!(
        "popgate demo: proxy on {addr}, demo POP3 server on {}",
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
        "  curl pop3://{}:{}@{host}/      # list messages",
        user.user, user.password
    );
    println!(
        "  curl pop3://{}:{}@{host}/1     # retrieve message 1",
        user.user, user.password
    );
    println!("press Ctrl-C to stop");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    proxy.run(shutdown_signal()).await;
    server.shutdown();
    Ok(())
}
