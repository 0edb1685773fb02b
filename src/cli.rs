//! Command-line interface (clap derive).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// `popgate --version`: what was built, from which commit, for which target, with which TLS
/// library (`-V` prints the first line only). The facts come from build.rs.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ncommit:  ",
    env!("POPGATE_GIT_COMMIT"),
    "\ntarget:  ",
    env!("POPGATE_TARGET"),
    "\nprofile: ",
    env!("POPGATE_PROFILE"),
    "\ntls:     rustls with the ring crypto provider",
);

/// The same facts on one line (the man page's VERSION section).
pub const VERSION_LINE: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("POPGATE_GIT_COMMIT"),
    ", ",
    env!("POPGATE_TARGET"),
    ", ",
    env!("POPGATE_PROFILE"),
    " build, rustls with ring)",
);

/// popgate: a transparent, logging and filtering POP3 proxy.
///
/// Put it in front of a POP3 server to enforce encryption, audit mail retrieval, apply policy
/// and debug client/server traffic without changing clients or server.
#[derive(Debug, Parser)]
#[command(name = "popgate", version, long_version = LONG_VERSION, about, long_about)]
pub struct Cli {
    /// Log level or tracing filter (error, warn, info, debug, trace); overrides log.level in the config.
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: CliCommand,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// Run the proxy with a config file.
    Run {
        /// Path to the TOML config (see popgate.toml in the repository).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Check a config file as `run` (and a reload) would and exit: non-zero with a message
    /// naming file, key and problem; warnings (certificates expiring within 30 days, rule
    /// patterns matching no file) go to stderr.
    Check {
        /// Path to the TOML config.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Print the effective config (TOML, every default filled in) instead of a summary.
        #[arg(long)]
        print: bool,
    },
    /// Tell a running popgate to reload its config and wait for the outcome: prints it, and
    /// exits non-zero when the reload failed (nothing changed) or no outcome came. Through the
    /// control socket when the config has `[control]` (or with --socket), else by SIGHUP.
    #[command(group = clap::ArgGroup::new("target").required(true))]
    Reload {
        /// The control socket of the running popgate.
        #[arg(long, value_name = "PATH", group = "target")]
        socket: Option<PathBuf>,
        /// The PID file of the running popgate (the outcome is read beside it).
        #[arg(long, value_name = "FILE", group = "target")]
        pid_file: Option<PathBuf>,
        /// The config of the running popgate: its `pid_file` names the process.
        #[arg(short, long, value_name = "FILE", group = "target")]
        config: Option<PathBuf>,
        /// The process id (systemd's `$MAINPID`); the outcome is read from
        /// `$RUNTIME_DIRECTORY/popgate.reload`.
        #[arg(long, value_name = "PID", group = "target")]
        pid: Option<i32>,
        /// How long to wait for the outcome, in seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        timeout: u64,
    },
    /// List the live sessions (through the control socket): id, client, listener, user,
    /// state, upstream, TLS, bytes, age, idle time, tags.
    Sessions {
        /// Where the control socket is.
        #[command(flatten)]
        socket: SocketArgs,
        /// Which sessions.
        #[command(flatten)]
        filter: SessionFilter,
        /// Print the rows as JSON (one array) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show popgate's version, uptime, config digest, last reload and session counts.
    Status {
        /// Where the control socket is.
        #[command(flatten)]
        socket: SocketArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// End the matching sessions as a shutdown does: `-ERR [SYS/TEMP]` to the client, the
    /// upstream closed without QUIT (pending deletions are not committed), audited as a kick.
    #[command(group = SessionFilter::required())]
    Kick {
        /// Where the control socket is.
        #[command(flatten)]
        socket: SocketArgs,
        /// Which sessions (at least one criterion).
        #[command(flatten)]
        filter: SessionFilter,
    },
    /// Follow the matching sessions, present and future, live: their commands and the
    /// server's replies, redacted as transcripts are, until interrupted.
    #[command(group = SessionFilter::required())]
    Tap {
        /// Where the control socket is.
        #[command(flatten)]
        socket: SocketArgs,
        /// Which sessions (at least one criterion).
        #[command(flatten)]
        filter: SessionFilter,
        /// Show message bodies instead of a size line.
        #[arg(long)]
        bodies: bool,
        /// Print JSON lines instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show audit trail events (JSON lines files) as a table: who fetched or deleted what.
    Audit {
        /// Audit files (`audit.YYYY-MM-DD.jsonl`), in any order.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Only this user's sessions.
        #[arg(long, value_name = "USER")]
        user: Option<String>,
        /// Only events at or after this time: RFC 3339 (`2026-03-01T09:00:00Z`), a date
        /// (`2026-03-01`), `today`, `yesterday` or an age (`2h`, `3d`).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Only events before this time (a date, `today` or `yesterday` includes the whole day).
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// Who retrieved or deleted this message: its events (`retrieve`, `delete_marked`,
        /// `update`) by UIDL, with the client address of their sessions.
        #[arg(long, value_name = "UIDL")]
        uidl: Option<String>,
        /// The same, by Message-ID (angle brackets optional).
        #[arg(long, value_name = "ID")]
        message_id: Option<String>,
        /// Only message events (retrieve, delete) in this user's mailbox.
        #[arg(long, value_name = "USER")]
        msg_user: Option<String>,
        /// Only these events (repeat or comma-separate): retrieve, delete_marked, update, ...
        #[arg(long, value_name = "EVENT")]
        event: Vec<String>,
        /// Print the matching JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Start popgate on loopback in front of a built-in demo POP3 server and print how to try it.
    Demo {
        /// Where the proxy's plain listener (with STLS) listens.
        #[arg(long, default_value = "127.0.0.1:1110", value_name = "ADDR")]
        bind: SocketAddr,
        /// Where the proxy's implicit-TLS (pop3s) listener listens.
        #[arg(long, default_value = "127.0.0.1:1995", value_name = "ADDR")]
        tls_bind: SocketAddr,
    },
    /// OAuth2 bridge helpers: make a local password hash, get a mailbox's first refresh token.
    Oauth2 {
        /// What to do.
        #[command(subcommand)]
        action: Oauth2Command,
    },
    /// Print a shell completion script to stdout (e.g. `popgate completions bash > /etc/bash_completion.d/popgate`).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page popgate(1), in roff, to stdout (e.g. `popgate man | man -l -`).
    Man {
        /// Instead write popgate.1 and one page per subcommand (popgate-run.1, ...) into DIR.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// Where a control subcommand finds the control socket.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct SocketArgs {
    /// The config of the running popgate: its `[control] socket`.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The control socket itself.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// Which sessions `popgate sessions`, `kick` and `tap` are about: every criterion given must
/// hold (`sessions` lists all without one; `kick` and `tap` need one, see
/// [`SessionFilter::required`]). The control protocol's selector, as options.
#[derive(Debug, clap::Args)]
pub struct SessionFilter {
    /// The session with this id.
    #[arg(long, value_name = "ID")]
    pub session: Option<u64>,
    /// Sessions of this user (a tap attaches once the session names its user).
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Sessions from this address or network.
    #[arg(long, value_name = "CIDR")]
    pub client: Option<String>,
    /// Sessions on this listener.
    #[arg(long, value_name = "NAME")]
    pub listener: Option<String>,
}

impl SessionFilter {
    /// The group that makes at least one criterion required (`kick`, `tap`).
    pub fn required() -> clap::ArgGroup {
        clap::ArgGroup::new("which")
            .args(["session", "user", "client", "listener"])
            .required(true)
            .multiple(true)
    }
}

impl From<SessionFilter> for crate::control::protocol::SessionSelector {
    fn from(f: SessionFilter) -> Self {
        crate::control::protocol::SessionSelector {
            session: f.session,
            user: f.user,
            client: f.client,
            listener: f.listener,
        }
    }
}

/// `popgate oauth2 ...`.
#[derive(Debug, Subcommand)]
pub enum Oauth2Command {
    /// Read a password from stdin (one line) and print its Argon2id hash for `credentials_file`.
    HashPassword,
    /// Get a mailbox's first refresh token with the device-code flow (RFC 8628): prints a URL
    /// and a code to enter there, waits for the approval, stores the token in `tokens_file`.
    Login {
        /// Path to the TOML config.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// The upstream (`name` of an `[[upstream]]`); default: the one with `[upstream.oauth2]`.
        #[arg(long, value_name = "NAME")]
        upstream: Option<String>,
        /// The upstream mailbox (e.g. user@contoso.com).
        #[arg(long, value_name = "MAILBOX")]
        user: String,
    },
}
