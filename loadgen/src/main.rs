//! `popgate-load`: load driver for popgate benchmarks (see benches/README.md).
//!
//! `popgate-load run SCENARIO --addr ADDR ...` runs a scenario (cycle, bulk, idle, noop,
//! handshake) against a POP3 server or proxy and prints one JSON object; with `--pid` it adds
//! that process tree's CPU seconds and memory, and the cost per unit of work.
//! `popgate-load serve ...` is the fast in-memory upstream.
//! A separate workspace member: it is never part of the `popgate` binary.

mod client;
mod procfs;
mod scenario;
mod serve;
mod stats;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rustls::pki_types::ServerName;
use serde_json::json;

use client::{Target, TlsMode};
use scenario::{Plan, Scenario};

#[derive(Debug, Parser)]
#[command(
    name = "popgate-load",
    about = "POP3 load driver for popgate benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run one scenario and print a JSON report on stdout.
    Run(Box<RunArgs>),
    /// Serve in-memory maildrops (the demo server) until killed.
    Serve {
        /// Address to listen on (port 0: pick one; the first stdout line names it).
        #[arg(long, default_value = "127.0.0.1:0")]
        bind: SocketAddr,
        /// Users are PREFIX0, PREFIX1, ...
        #[arg(long, default_value = "load")]
        prefix: String,
        #[arg(long, default_value_t = 10_000)]
        users: usize,
        #[arg(long, default_value = "pass")]
        pass: String,
        /// The first N users also hold message 2, the big one (each its own copy in memory).
        #[arg(long, default_value_t = 2)]
        big_users: usize,
        /// Size of the big message in MiB.
        #[arg(long, default_value_t = 50)]
        big_mb: usize,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// What one unit of work is.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Server or proxy address.
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long, value_enum, default_value_t = TlsMode::None)]
    tls: TlsMode,
    /// PEM file of the CA(s) that sign the server certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Accept any server certificate (self-signed test setups).
    #[arg(long)]
    insecure: bool,
    /// Name checked against the certificate and sent as SNI.
    #[arg(long, default_value = "localhost")]
    sni: String,
    /// Turn TLS session resumption off (every handshake is a full one).
    #[arg(long)]
    no_resume: bool,
    /// User name; `{i}` becomes the session number modulo --users.
    #[arg(long, default_value = "load{i}")]
    user: String,
    #[arg(long, default_value_t = 1000)]
    users: u64,
    #[arg(long, default_value = "pass")]
    pass: String,
    /// Message RETRed by `cycle`.
    #[arg(long, default_value_t = 1)]
    small_msg: u32,
    /// Message RETRed by `bulk`.
    #[arg(long, default_value_t = 2)]
    big_msg: u32,
    /// Closed loop workers (`noop`: sessions; `idle`: logins in parallel).
    #[arg(long, short = 'c', default_value_t = 1)]
    concurrency: usize,
    /// Open loop: units started per second (cycle, bulk, handshake); replaces the workers.
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop: most units in flight; starts beyond it are counted as dropped.
    #[arg(long, default_value_t = 10_000)]
    max_inflight: usize,
    /// Stop starting units after this many seconds.
    #[arg(long, short = 'd')]
    duration: Option<f64>,
    /// Stop after this many units.
    #[arg(long, short = 'n')]
    count: Option<u64>,
    /// `idle`: sessions to hold.
    #[arg(long, default_value_t = 100)]
    sessions: usize,
    /// `idle`: seconds to hold them.
    #[arg(long, default_value_t = 1.0)]
    hold: f64,
    /// Seconds to wait before the last process sample (`idle`: after closing the sessions).
    #[arg(long, default_value_t = 0.0)]
    settle: f64,
    /// `cycle`: every N-th session idles 0.2-0.8 s before QUIT (0: none); the soak mix is 5.
    #[arg(long, default_value_t = 0)]
    pause_every: u64,
    /// Process (with its descendants) whose CPU and memory to sample: the proxy.
    #[arg(long)]
    pid: Option<u32>,
    /// Spread client source addresses over 127.0.0.1..=127.0.0.N.
    #[arg(long, default_value_t = 1)]
    sources: u8,
    /// Seconds allowed for each operation (connect, handshake, one reply).
    #[arg(long, default_value_t = 30.0)]
    op_timeout: f64,
    /// Free-form label copied into the report (e.g. the proxy's name).
    #[arg(long)]
    label: Option<String>,
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)
}

fn plan(a: &RunArgs) -> Result<Plan, String> {
    if a.duration.is_none() && a.count.is_none() && a.scenario != Scenario::Idle {
        return Err("give --duration or --count".into());
    }
    let tls_config = match a.tls {
        TlsMode::None => None,
        _ => Some(
            client::tls_config(a.ca.as_deref(), a.insecure, !a.no_resume)
                .map_err(|e| e.to_string())?,
        ),
    };
    let sni = ServerName::try_from(a.sni.clone()).map_err(|e| format!("--sni: {e}"))?;
    Ok(Plan {
        scenario: a.scenario,
        target: Target {
            addr: a.addr,
            tls: a.tls,
            tls_config,
            sni,
            sources: a.sources,
            op_timeout: secs(a.op_timeout),
        },
        user: a.user.clone(),
        users: a.users,
        pass: a.pass.clone(),
        small_msg: a.small_msg,
        big_msg: a.big_msg,
        concurrency: a.concurrency,
        rate: a.rate,
        max_inflight: a.max_inflight,
        duration: a.duration.map(secs),
        count: a.count,
        sessions: a.sessions,
        hold: secs(a.hold),
        settle: secs(a.settle),
        pause_every: a.pause_every,
        pid: a.pid,
    })
}

fn params(a: &RunArgs) -> serde_json::Value {
    json!({
        "label": a.label,
        "addr": a.addr.to_string(),
        "tls": format!("{:?}", a.tls).to_lowercase(),
        "resume": a.tls != TlsMode::None && !a.no_resume,
        "mode": if a.rate.is_some() && matches!(a.scenario, Scenario::Cycle | Scenario::Bulk | Scenario::Handshake) { "open" } else { "closed" },
        "concurrency": a.concurrency,
        "rate": a.rate,
        "duration_s": a.duration,
        "count": a.count,
        "sessions": a.sessions,
        "hold_s": a.hold,
        "users": a.users,
        "small_msg": a.small_msg,
        "big_msg": a.big_msg,
        "sources": a.sources,
        "pid": a.pid,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("popgate-load: runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.cmd {
        Cmd::Serve {
            bind,
            prefix,
            users,
            pass,
            big_users,
            big_mb,
        } => {
            let spec = serve::Mailboxes {
                prefix,
                users,
                pass,
                big_users,
                big_bytes: big_mb << 20,
            };
            match rt.block_on(serve::serve(bind, &spec)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("popgate-load serve: {bind}: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Run(args) => {
            let plan = match plan(&args) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("popgate-load: {e}");
                    return ExitCode::from(2);
                }
            };
            let report = rt.block_on(scenario::run(plan, params(&args)));
            println!("{report}");
            ExitCode::SUCCESS
        }
    }
}
