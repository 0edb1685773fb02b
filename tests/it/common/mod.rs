//! Shared helpers for the integration tests: a real Dovecot upstream, real POP3 clients
//! (curl, Python's poplib, fetchmail, a raw socket client) and throw-away certificates.
//!
//! Every integration test crate that says `mod common;` compiles all of this, and each uses
//! only part of it, hence `dead_code` is allowed here.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod authserver;
pub mod certs;
pub mod clients;
pub mod dovecot;
pub mod paused;
pub mod popa3d;
pub mod proxy;
pub mod proxy_header;
pub mod scanners;

use std::net::TcpListener;
use std::path::{Path, PathBuf};

/// A TCP port that was free on 127.0.0.1 a moment ago (bound, then dropped).
///
/// Another process may take it before it is used again; `Dovecot::start` retries on a
/// bind failure for that reason.
pub fn free_port() -> u16 {
    free_port_on("127.0.0.1")
}

/// Like [`free_port`] for another local address, e.g. `"127.0.0.2"` or `"::1"`.
///
/// Ports come from below the kernel's ephemeral range (`ip_local_port_range`), so that no
/// outgoing connection of any test (they take ephemeral ports) can be given the port
/// between this probe and the bind that uses it; each is handed out once per test run, from
/// a start that depends on the process id (two test runs on one machine rarely meet).
/// Where that range leaves no room, the kernel picks (port 0).
pub fn free_port_on(ip: &str) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let ip: std::net::IpAddr = ip.parse().expect("free_port_on: not an IP address");
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    const LOW: u32 = 10_000;
    let span = ephemeral_low.saturating_sub(LOW);
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if span >= 2_000 {
        let base = std::process::id().wrapping_mul(7919) % span;
        for _ in 0..span {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = (LOW + (base + n % span) % span) as u16;
            if given.contains(&port) {
                continue;
            }
            if TcpListener::bind((ip, port)).is_ok() {
                given.push(port);
                return port;
            }
        }
    }
    // The kernel may hand the same port out again once its probe socket is closed: no port
    // is given out twice by this process.
    loop {
        let listener = TcpListener::bind((ip, 0)).expect("bind to port 0");
        let port = listener.local_addr().expect("local_addr").port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Whether `cmd` is an executable on PATH (or in /usr/sbin or /sbin, which a non-root PATH
/// may lack and where `dovecot` lives).
pub fn have(cmd: &str) -> bool {
    find_exe(cmd).is_some()
}

/// The full path of the executable `cmd`, looked up like [`have`].
pub fn find_exe(cmd: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_exe = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if cmd.contains('/') {
        let p = PathBuf::from(cmd);
        return is_exe(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(cmd))
        .find(|p| is_exe(p))
}

/// The path of a shipped rule file (`rules/NAME` in the repository).
pub fn shipped_rules(name: &str) -> String {
    format!("{}/rules/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Standard base64 of `data` (SASL payloads).
pub fn base64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// `elapsed`, measured on tokio's paused clock, is `want` (within the odd millisecond of
/// real work): a timeout test on paused time asserts the virtual duration exactly.
pub fn took(elapsed: std::time::Duration, want: std::time::Duration) {
    assert!(
        elapsed >= want && elapsed < want + std::time::Duration::from_millis(100),
        "took {elapsed:?}, want {want:?}"
    );
}

/// Wait (at most 10 s) until `f` holds; panics naming `what` otherwise.
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "{what}: not in time");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Every complete line of the audit files in `dir`, in file-name (= time) order, parsed (a
/// line that is not JSON fails); a line still being written is left out.
pub fn audit_events(dir: &Path) -> Vec<serde_json::Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for line in text.split_inclusive('\n') {
            if let Some(line) = line.strip_suffix('\n') {
                out.push(serde_json::from_str(line).expect("audit line is JSON"));
            }
        }
    }
    out
}
