//! The scenarios and the two ways of driving them: closed loop (N workers, each starts its next
//! unit when the last one ends) and open loop (units start at a target rate whatever the
//! server's pace; latency counts from the scheduled start, so a slow server is not hidden).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::client::{ClientError, Session, Target, connect};
use crate::procfs;
use crate::stats::Stats;

/// What one unit of work is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// A whole session: connect, greeting, USER/PASS, STAT, LIST, RETR (small), QUIT.
    Cycle,
    /// A session that RETRs a big message, counting octets and checking the terminator.
    Bulk,
    /// Hold N logged-in sessions; RSS per session of `--pid`.
    Idle,
    /// NOOP round trips on logged-in sessions (latency).
    Noop,
    /// Connect, TLS handshake (implicit or STLS), QUIT: handshakes per second.
    Handshake,
}

impl Scenario {
    /// Name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Cycle => "cycle",
            Scenario::Bulk => "bulk",
            Scenario::Idle => "idle",
            Scenario::Noop => "noop",
            Scenario::Handshake => "handshake",
        }
    }
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The scenario.
    pub scenario: Scenario,
    /// Where to connect.
    pub target: Target,
    /// User name; `{i}` is replaced by the session number modulo `users`.
    pub user: String,
    /// Number of distinct users to rotate through.
    pub users: u64,
    /// Password of every user.
    pub pass: String,
    /// Message RETRed by `cycle`.
    pub small_msg: u32,
    /// Message RETRed by `bulk`.
    pub big_msg: u32,
    /// Closed loop: workers (and sessions held by `noop`); `idle`: sessions opened at once.
    pub concurrency: usize,
    /// Open loop: units started per second (`cycle`, `bulk`, `handshake`).
    pub rate: Option<f64>,
    /// Open loop: most units in flight; a start beyond it is counted as dropped.
    pub max_inflight: usize,
    /// Stop starting units after this long.
    pub duration: Option<Duration>,
    /// Stop after this many units.
    pub count: Option<u64>,
    /// `idle`: sessions to hold.
    pub sessions: usize,
    /// `idle`: how long to hold them.
    pub hold: Duration,
    /// Wait this long before the last process sample (`idle`: after the sessions closed).
    pub settle: Duration,
    /// `cycle`: every this-many-th session (0: none) idles 0.2-0.8 s between RETR and QUIT,
    /// as a slow client would (the soak test's mix).
    pub pause_every: u64,
    /// Process to sample.
    pub pid: Option<u32>,
}

impl Plan {
    fn user(&self, i: u64) -> String {
        self.user
            .replace("{i}", &(i % self.users.max(1)).to_string())
    }

    fn buf_cap(&self) -> usize {
        match self.scenario {
            Scenario::Bulk => 64 * 1024,
            _ => 2 * 1024,
        }
    }
}

/// Shared stop condition for the unit loops.
struct Gate {
    started: AtomicU64,
    count: Option<u64>,
    deadline: Option<Instant>,
}

impl Gate {
    /// Claim the next unit number, or None when the run is over.
    fn next(&self) -> Option<u64> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        let i = self.started.fetch_add(1, Ordering::Relaxed);
        match self.count {
            Some(c) if i >= c => None,
            _ => Some(i),
        }
    }
}

/// Login as user number `i`.
async fn login(plan: &Plan, i: u64) -> Result<Session, ClientError> {
    let mut c = connect(&plan.target, i, plan.buf_cap()).await?;
    c.login(&plan.user(i), &plan.pass).await?;
    Ok(c)
}

/// One unit of `cycle`, `bulk` or `handshake`; adds octets and resumptions to `st`.
async fn unit(plan: &Plan, i: u64, st: &mut Stats) -> Result<(), ClientError> {
    match plan.scenario {
        Scenario::Handshake => {
            let mut c = connect(&plan.target, i, plan.buf_cap()).await?;
            st.sessions += 1;
            st.resumed += u64::from(c.resumed);
            c.quit().await
        }
        Scenario::Cycle => {
            let mut c = login(plan, i).await?;
            st.sessions += 1;
            st.resumed += u64::from(c.resumed);
            c.command("STAT", "STAT").await?;
            let (_, n) = c.multiline("LIST", "LIST").await?;
            st.bytes += n;
            st.bytes += c.retr(plan.small_msg).await?;
            if plan.pause_every > 0 && i.is_multiple_of(plan.pause_every) {
                // Spread over 0.2-0.8 s by the session number: repeatable, no RNG needed.
                let ms = 200 + (i.wrapping_mul(7919) % 601);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            c.quit().await
        }
        Scenario::Bulk => {
            let mut c = login(plan, i).await?;
            st.sessions += 1;
            st.resumed += u64::from(c.resumed);
            st.bytes += c.retr(plan.big_msg).await?;
            c.quit().await
        }
        Scenario::Idle | Scenario::Noop => Ok(()),
    }
}

async fn closed_worker(plan: Arc<Plan>, gate: Arc<Gate>) -> Stats {
    let mut st = Stats::default();
    while let Some(i) = gate.next() {
        let t0 = Instant::now();
        match unit(&plan, i, &mut st).await {
            Ok(()) => st.record(t0.elapsed()),
            Err(e) => st.error(&e),
        }
    }
    st
}

async fn noop_worker(plan: Arc<Plan>, gate: Arc<Gate>, w: u64) -> Stats {
    let mut st = Stats::default();
    let mut c = match login(&plan, w).await {
        Ok(c) => c,
        Err(e) => {
            st.error(&e);
            return st;
        }
    };
    st.sessions += 1;
    while gate.next().is_some() {
        let t0 = Instant::now();
        match c.command("NOOP", "NOOP").await {
            Ok(()) => st.record(t0.elapsed()),
            Err(e) => {
                st.error(&e);
                return st;
            }
        }
    }
    if let Err(e) = c.quit().await {
        st.error(&e);
    }
    st
}

async fn closed(plan: &Arc<Plan>, gate: &Arc<Gate>) -> Stats {
    let mut set = JoinSet::new();
    for w in 0..plan.concurrency.max(1) {
        let (p, g) = (Arc::clone(plan), Arc::clone(gate));
        if plan.scenario == Scenario::Noop {
            set.spawn(noop_worker(p, g, w as u64));
        } else {
            set.spawn(closed_worker(p, g));
        }
    }
    join_all(set).await
}

async fn join_all(mut set: JoinSet<Stats>) -> Stats {
    let mut total = Stats::default();
    while let Some(r) = set.join_next().await {
        if let Ok(st) = r {
            total.merge(st);
        }
    }
    total
}

/// Open loop: a unit every 1/rate s; returns the figures and the number of dropped starts.
async fn open(plan: &Arc<Plan>, gate: &Arc<Gate>, rate: f64) -> (Stats, u64) {
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    let mut total = Stats::default();
    let mut dropped = 0u64;
    let mut k = 0u32;
    while let Some(i) = gate.next() {
        let due = t0 + period * k;
        k = k.saturating_add(1);
        tokio::time::sleep_until(due.into()).await;
        while let Some(r) = set.try_join_next() {
            if let Ok(st) = r {
                total.merge(st);
            }
        }
        if set.len() >= plan.max_inflight {
            dropped += 1;
            continue;
        }
        let p = Arc::clone(plan);
        set.spawn(async move {
            let mut st = Stats::default();
            match unit(&p, i, &mut st).await {
                // From the scheduled start: a server that falls behind shows in the latency.
                Ok(()) => st.record(due.elapsed()),
                Err(e) => st.error(&e),
            }
            st
        });
    }
    total.merge(join_all(set).await);
    (total, dropped)
}

/// `idle`: open `plan.sessions` logged-in sessions in four steps (sampling `--pid` after each),
/// hold them, close them, sample again after `settle`.
async fn idle(plan: &Arc<Plan>) -> (Stats, Value) {
    let mut st = Stats::default();
    let mut held: Vec<Session> = Vec::with_capacity(plan.sessions);
    let mut points = Vec::new();
    let point = |n: usize| {
        plan.pid.and_then(procfs::sample).map(|s| {
            json!({"sessions": n, "rss_kib": s.rss_kib, "pss_kib": s.pss_kib,
                            "procs": s.procs, "cpu_s": s.cpu_s})
        })
    };
    points.extend(point(0));
    let steps = 4;
    let sem = Arc::new(tokio::sync::Semaphore::new(plan.concurrency.max(1)));
    for step in 1..=steps {
        let upto = plan.sessions * step / steps;
        let mut set = JoinSet::new();
        for i in held.len()..upto {
            let (p, sem) = (Arc::clone(plan), Arc::clone(&sem));
            set.spawn(async move {
                let _permit = sem.acquire_owned().await;
                let t0 = Instant::now();
                (login(&p, i as u64).await, t0.elapsed())
            });
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok((Ok(c), took)) => {
                    st.sessions += 1;
                    st.resumed += u64::from(c.resumed);
                    st.record(took);
                    held.push(c);
                }
                Ok((Err(e), _)) => st.error(&e),
                Err(_) => {}
            }
        }
        // Let the proxy finish its side of the last logins before reading its memory.
        tokio::time::sleep(Duration::from_millis(200)).await;
        points.extend(point(held.len()));
    }
    tokio::time::sleep(plan.hold).await;
    let at_hold_end = point(held.len());
    let mut set = JoinSet::new();
    for mut c in held.drain(..) {
        set.spawn(async move { c.quit().await });
    }
    while let Some(r) = set.join_next().await {
        if let Ok(Err(e)) = r {
            st.error(&e);
        }
    }
    tokio::time::sleep(plan.settle).await;
    let after_close = point(0);
    // PSS, not RSS: equal for one process, and not overcounted for a process per session.
    let rss = |v: &Option<Value>| v.as_ref().and_then(|v| v["pss_kib"].as_f64());
    let first = points.first().cloned();
    let last = points.last().cloned();
    let slope = match (rss(&first), rss(&last), last.as_ref()) {
        (Some(a), Some(b), Some(l)) => l["sessions"]
            .as_f64()
            .filter(|n| *n > 0.0)
            .map(|n| (b - a) / n),
        _ => None,
    };
    let returned = match (rss(&first), rss(&last), rss(&after_close)) {
        // Share of the growth given back after the sessions closed (1.0: all of it).
        (Some(a), Some(b), Some(c)) if b > a => Some((b - c) / (b - a)),
        _ => None,
    };
    let idle = json!({
        "points": points,
        "at_hold_end": at_hold_end,
        "after_close": after_close,
        "rss_kib_per_session": slope,
        "growth_returned": returned,
    });
    (st, idle)
}

/// Run `plan` and build the report.
pub async fn run(plan: Plan, params: Value) -> Value {
    let plan = Arc::new(plan);
    let gate = Arc::new(Gate {
        started: AtomicU64::new(0),
        count: plan.count,
        deadline: plan.duration.map(|d| Instant::now() + d),
    });
    let before = plan.pid.and_then(procfs::sample);
    let t0 = Instant::now();
    let mut dropped = 0;
    let mut idle_report = Value::Null;
    let mut st = match (plan.scenario, plan.rate) {
        (Scenario::Idle, _) => {
            let (st, v) = idle(&plan).await;
            idle_report = v;
            st
        }
        (Scenario::Noop, _) | (_, None) => closed(&plan, &gate).await,
        (_, Some(rate)) => {
            let (st, d) = open(&plan, &gate, rate).await;
            dropped = d;
            st
        }
    };
    let elapsed = t0.elapsed().as_secs_f64();
    if plan.scenario != Scenario::Idle && !plan.settle.is_zero() {
        tokio::time::sleep(plan.settle).await;
    }
    let after = plan.pid.and_then(procfs::sample);
    let gib = st.bytes as f64 / f64::from(1u32 << 30);
    let proc_json = match (before, after) {
        (Some(b), Some(a)) => {
            let cpu = a.cpu_s - b.cpu_s;
            let per_gb = (st.bytes > 0).then(|| cpu / gib);
            let per_1000 = (st.sessions > 0).then(|| cpu * 1e6 / st.sessions as f64);
            let per_unit = (st.ok > 0).then(|| cpu * 1e6 / st.ok as f64);
            json!({
                "pid": plan.pid,
                "before": procfs::to_json(&b),
                "after": procfs::to_json(&a),
                "cpu_s": cpu,
                "per_unit": {
                    "cpu_s_per_gb": per_gb,
                    "cpu_ms_per_1000_sessions": per_1000,
                    "cpu_us_per_unit": per_unit,
                    "rss_kib_per_session": idle_report.get("rss_kib_per_session"),
                },
            })
        }
        _ => Value::Null,
    };
    json!({
        "scenario": plan.scenario.name(),
        "params": params,
        "counts": {
            "units_ok": st.ok,
            "sessions": st.sessions,
            "bytes": st.bytes,
            "resumed": st.resumed,
            "dropped": dropped,
        },
        "errors": st.errors_json(),
        "latency_us": st.latency_json(),
        "elapsed_s": elapsed,
        "throughput": {
            "units_per_s": st.ok as f64 / elapsed.max(1e-9),
            "mb_per_s": st.bytes as f64 / 1e6 / elapsed.max(1e-9),
        },
        "proc": proc_json,
        "idle": idle_report,
    })
}
