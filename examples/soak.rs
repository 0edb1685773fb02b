//! Soak-test driver for `benches/soak.sh` (loopback only).
//!
//! `soak upstream --bind ADDR --users N`: the demo POP3 server with users `soak0`..`soakN-1`
//! (password `soak`, the three demo messages each), not recording lines.
//!
//! `soak client --addr ADDR --pid PID ...`: rounds of `--concurrency` workers, each running
//! sessions (connect, greeting, USER/PASS, STAT, LIST, RETR, sometimes an idle pause, QUIT)
//! until `--duration` is over; counts errors (unexpected reply, connect failure, timeout) and
//! samples the RSS of process PID. Exits 1 on any error or when RSS after the last round exceeds
//! RSS after round 1 by more than both `--tolerance-pct` percent and `--tolerance-mb` MiB.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use popgate_demo::{DemoServer, Mailbox, ServerOptions, sample_mailboxes};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Users per worker: a worker rotates through its own users so that the upstream's maildrop
/// lock of the previous session (released just after the QUIT reply) is never in the way.
const USERS_PER_WORKER: usize = 4;

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the demo POP3 server with many users until killed.
    Upstream {
        #[arg(long)]
        bind: SocketAddr,
        /// Number of users (at least concurrency x 4 for the client).
        #[arg(long)]
        users: usize,
    },
    /// Run the load and report.
    Client {
        /// popgate's listener.
        #[arg(long)]
        addr: SocketAddr,
        /// popgate's process id, for /proc/PID/status.
        #[arg(long)]
        pid: u32,
        #[arg(long, default_value_t = 1000)]
        concurrency: usize,
        /// Seconds per round.
        #[arg(long, default_value_t = 60)]
        duration: u64,
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Seconds to wait after a round before reading RSS (sessions finish closing).
        #[arg(long, default_value_t = 3)]
        settle: u64,
        /// Per-operation timeout in seconds.
        #[arg(long, default_value_t = 15)]
        op_timeout: u64,
        /// Workers start spread over this many milliseconds (not all in the same instant, which
        /// only measures the kernel's listen backlog).
        #[arg(long, default_value_t = 1000)]
        ramp_ms: u64,
        #[arg(long, default_value_t = 10.0)]
        tolerance_pct: f64,
        #[arg(long, default_value_t = 2.0)]
        tolerance_mb: f64,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("soak: runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match cli.cmd {
        Cmd::Upstream { bind, users } => rt.block_on(upstream(bind, users)),
        Cmd::Client {
            addr,
            pid,
            concurrency,
            duration,
            rounds,
            settle,
            op_timeout,
            ramp_ms,
            tolerance_pct,
            tolerance_mb,
        } => rt.block_on(client(Load {
            addr,
            pid,
            concurrency,
            duration: Duration::from_secs(duration),
            rounds,
            settle: Duration::from_secs(settle),
            op_timeout: Duration::from_secs(op_timeout),
            ramp: Duration::from_millis(ramp_ms),
            tolerance_pct,
            tolerance_mb,
        })),
    }
}

async fn upstream(bind: SocketAddr, users: usize) -> std::process::ExitCode {
    let messages = sample_mailboxes()
        .into_iter()
        .next()
        .map(|m| m.messages)
        .unwrap_or_default();
    let mailboxes = (0..users)
        .map(|i| Mailbox::new(format!("soak{i}"), "soak", messages.clone()))
        .collect();
    let opts = ServerOptions {
        mailboxes,
        forget_lines: true,
        ..ServerOptions::default()
    };
    match DemoServer::start(bind, opts).await {
        Ok(srv) => {
            println!("soak upstream on {} with {users} users", srv.local_addr());
            std::future::pending::<()>().await;
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("soak upstream: bind {bind}: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

struct Load {
    addr: SocketAddr,
    pid: u32,
    concurrency: usize,
    duration: Duration,
    rounds: usize,
    settle: Duration,
    op_timeout: Duration,
    ramp: Duration,
    tolerance_pct: f64,
    tolerance_mb: f64,
}

#[derive(Default)]
struct Counters {
    sessions: AtomicU64,
    errors: AtomicU64,
    peak_rss_kb: AtomicU64,
}

/// VmRSS and VmHWM of `pid` in KiB.
fn mem_kb(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

async fn client(load: Load) -> std::process::ExitCode {
    let Some((start_rss, _)) = mem_kb(load.pid) else {
        eprintln!("soak: cannot read /proc/{}/status", load.pid);
        return std::process::ExitCode::from(2);
    };
    println!(
        "soak: {} workers x {} s x {} round(s) against {} (popgate pid {})",
        load.concurrency,
        load.duration.as_secs(),
        load.rounds,
        load.addr,
        load.pid
    );
    println!("popgate RSS at start: {:.1} MiB", mb(start_rss));
    let counters = Arc::new(Counters::default());
    counters.peak_rss_kb.store(start_rss, Ordering::Relaxed);
    let mut round_end = Vec::new();
    let mut total_errors = 0;
    for round in 1..=load.rounds {
        let before = counters.sessions.load(Ordering::Relaxed);
        let errors_before = counters.errors.load(Ordering::Relaxed);
        let t0 = tokio::time::Instant::now();
        let deadline = t0 + load.duration;
        let sampler = {
            let counters = Arc::clone(&counters);
            let pid = load.pid;
            tokio::spawn(async move {
                loop {
                    if let Some((rss, _)) = mem_kb(pid) {
                        counters.peak_rss_kb.fetch_max(rss, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        };
        let mut workers = Vec::with_capacity(load.concurrency);
        for w in 0..load.concurrency {
            let counters = Arc::clone(&counters);
            let (addr, op_timeout) = (load.addr, load.op_timeout);
            let start = t0 + load.ramp.mul_f64(w as f64 / load.concurrency as f64);
            workers.push(tokio::spawn(async move {
                tokio::time::sleep_until(start).await;
                worker(w, addr, t0, deadline, op_timeout, &counters).await;
            }));
        }
        for w in workers {
            let _ = w.await;
        }
        tokio::time::sleep(load.settle).await;
        sampler.abort();
        let (rss, hwm) = mem_kb(load.pid).unwrap_or((0, 0));
        counters.peak_rss_kb.fetch_max(hwm, Ordering::Relaxed);
        let done = counters.sessions.load(Ordering::Relaxed) - before;
        let errors = counters.errors.load(Ordering::Relaxed) - errors_before;
        total_errors += errors;
        println!(
            "round {round}: {done} sessions completed, {errors} errors, RSS at end {:.1} MiB, peak (VmHWM) {:.1} MiB",
            mb(rss),
            mb(hwm)
        );
        round_end.push(rss);
    }
    let peak = counters.peak_rss_kb.load(Ordering::Relaxed);
    let total = counters.sessions.load(Ordering::Relaxed);
    println!(
        "total: {total} sessions, {total_errors} errors; RSS start {:.1} MiB, peak {:.1} MiB, {}",
        mb(start_rss),
        mb(peak),
        round_end
            .iter()
            .enumerate()
            .map(|(i, r)| format!("end of round {} {:.1} MiB", i + 1, mb(*r)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut ok = total_errors == 0;
    if let (Some(first), Some(last)) = (round_end.first(), round_end.last())
        && round_end.len() > 1
    {
        let growth_mb = mb(last.saturating_sub(*first));
        let growth_pct = 100.0 * growth_mb / mb(*first).max(f64::MIN_POSITIVE);
        let grew_too_much = growth_mb > load.tolerance_mb && growth_pct > load.tolerance_pct;
        println!(
            "RSS growth from end of round 1 to end of round {}: {growth_mb:.1} MiB ({growth_pct:.1} %); tolerance {} MiB or {} % -> {}",
            round_end.len(),
            load.tolerance_mb,
            load.tolerance_pct,
            if grew_too_much { "FAIL" } else { "ok" }
        );
        ok &= !grew_too_much;
    }
    if ok {
        println!("soak: PASS");
        std::process::ExitCode::SUCCESS
    } else {
        println!("soak: FAIL");
        std::process::ExitCode::FAILURE
    }
}

async fn worker(
    w: usize,
    addr: SocketAddr,
    round_start: tokio::time::Instant,
    deadline: tokio::time::Instant,
    op_timeout: Duration,
    counters: &Counters,
) {
    let mut n: usize = 0;
    while tokio::time::Instant::now() < deadline {
        let user = w * USERS_PER_WORKER + n % USERS_PER_WORKER;
        // Roughly one session in five idles a little before QUIT (a cheap deterministic mix).
        let idle = (w + n).is_multiple_of(5);
        let msg = 1 + (w + n) % 3;
        n += 1;
        let t0 = Instant::now();
        match session(addr, user, msg, idle, op_timeout).await {
            Ok(()) => {
                counters.sessions.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                let prior = counters.errors.fetch_add(1, Ordering::Relaxed);
                if prior < 20 {
                    eprintln!(
                        "soak: worker {w} user soak{user}: {e} ({} ms into the session, {} ms into the round)",
                        t0.elapsed().as_millis(),
                        round_start.elapsed().as_millis()
                    );
                }
                // Do not hammer a broken proxy.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

struct Conn {
    r: BufReader<TcpStream>,
    op_timeout: Duration,
}

impl Conn {
    async fn line(&mut self) -> Result<String, String> {
        let mut buf = Vec::new();
        match timeout(self.op_timeout, self.r.read_until(b'\n', &mut buf)).await {
            Err(_) => Err("timeout waiting for a line".into()),
            Ok(Err(e)) => Err(format!("read: {e}")),
            Ok(Ok(0)) => Err("unexpected EOF".into()),
            Ok(Ok(_)) if !buf.ends_with(b"\r\n") => Err("line without CRLF".into()),
            Ok(Ok(_)) => Ok(String::from_utf8_lossy(&buf).into_owned()),
        }
    }

    async fn ok(&mut self, what: &str) -> Result<String, String> {
        let l = self.line().await.map_err(|e| format!("{what}: {e}"))?;
        if l.starts_with("+OK") {
            Ok(l)
        } else {
            Err(format!("{what}: unexpected reply {:?}", l.trim_end()))
        }
    }

    async fn cmd(&mut self, cmd: &str) -> Result<String, String> {
        match timeout(
            self.op_timeout,
            self.r.get_mut().write_all(format!("{cmd}\r\n").as_bytes()),
        )
        .await
        {
            Err(_) => return Err(format!("{cmd}: write timeout")),
            Ok(Err(e)) => return Err(format!("{cmd}: write: {e}")),
            Ok(Ok(())) => {}
        }
        let verb = cmd.split(' ').next().unwrap_or(cmd);
        self.ok(verb).await
    }

    /// A multi-line body up to the terminating `.`; returns its line count.
    async fn body(&mut self, what: &str) -> Result<usize, String> {
        let mut lines = 0;
        loop {
            let l = self.line().await.map_err(|e| format!("{what} body: {e}"))?;
            if l == ".\r\n" {
                return Ok(lines);
            }
            lines += 1;
        }
    }
}

async fn session(
    addr: SocketAddr,
    user: usize,
    msg: usize,
    idle: bool,
    op_timeout: Duration,
) -> Result<(), String> {
    let stream = match timeout(op_timeout, TcpStream::connect(addr)).await {
        Err(_) => return Err("connect timeout".into()),
        Ok(Err(e)) => return Err(format!("connect: {e}")),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    let mut c = Conn {
        r: BufReader::new(stream),
        op_timeout,
    };
    c.ok("greeting").await?;
    c.cmd(&format!("USER soak{user}")).await?;
    c.cmd("PASS soak").await?;
    let stat = c.cmd("STAT").await?;
    if !stat.starts_with("+OK 3 ") {
        return Err(format!("STAT: unexpected {:?}", stat.trim_end()));
    }
    c.cmd("LIST").await?;
    let listed = c.body("LIST").await?;
    if listed != 3 {
        return Err(format!("LIST: {listed} entries, expected 3"));
    }
    c.cmd(&format!("RETR {msg}")).await?;
    if c.body("RETR").await? == 0 {
        return Err("RETR: empty message".into());
    }
    if idle {
        tokio::time::sleep(Duration::from_millis(200 + (user as u64 % 7) * 100)).await;
    }
    c.cmd("QUIT").await?;
    Ok(())
}
