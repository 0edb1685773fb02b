//! The standard `process_*` metrics of Prometheus client libraries, read from `/proc/self`
//! (Linux) at each scrape: resident and virtual memory, open and allowed file descriptors, CPU
//! time, start time. prometheus-client has no process collector; each figure is one small file
//! read or system call. Where one cannot be read (another OS, a restricted `/proc`) its metric
//! is left out rather than reported as 0.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The figures of one scrape; `None` where unreadable.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Process {
    /// Resident set size, in bytes (`VmRSS`).
    pub(crate) resident_bytes: Option<u64>,
    /// Virtual memory size, in bytes (`VmSize`).
    pub(crate) virtual_bytes: Option<u64>,
    /// Open file descriptors.
    pub(crate) open_fds: Option<u64>,
    /// The soft `RLIMIT_NOFILE`.
    pub(crate) max_fds: Option<u64>,
    /// User and system CPU time, in seconds.
    pub(crate) cpu_seconds: Option<f64>,
}

impl Process {
    /// Read the figures now.
    pub(crate) fn read() -> Process {
        let status = std::fs::read_to_string("/proc/self/status").ok();
        let kib = |field: &str| -> Option<u64> {
            let line = status.as_deref()?.lines().find(|l| l.starts_with(field))?;
            let n: u64 = line[field.len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            n.checked_mul(1024)
        };
        let cpu_seconds = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
            .ok()
            .map(|u| {
                let secs = |t: nix::sys::time::TimeVal| {
                    t.tv_sec() as f64 + t.tv_usec() as f64 / 1_000_000.0
                };
                secs(u.user_time()) + secs(u.system_time())
            });
        Process {
            resident_bytes: kib("VmRSS:"),
            virtual_bytes: kib("VmSize:"),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as u64),
            max_fds: rlimit::getrlimit(rlimit::Resource::NOFILE)
                .ok()
                .map(|(soft, _)| soft),
            cpu_seconds,
        }
    }
}

/// When the process started, in seconds since the Unix epoch: its start in clock ticks after
/// boot (`/proc/self/stat`) plus the boot time (`/proc/stat`); `None` where unreadable.
pub(crate) fn start_time_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let (_, rest) = stat.rsplit_once(')')?;
    // Fields from 3 (`state`) on; `starttime` is field 22.
    let ticks: u64 = rest.split_whitespace().nth(22 - 3)?.parse().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&hz| hz > 0)?;
    let boot: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(boot as f64 + ticks as f64 / hz as f64)
}

/// Now, in seconds since the Unix epoch.
pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_of_this_process_are_plausible() {
        let p = Process::read();
        assert!(p.resident_bytes.unwrap() > 1024 * 1024, "{p:?}");
        assert!(
            p.virtual_bytes.unwrap() >= p.resident_bytes.unwrap(),
            "{p:?}"
        );
        // stdin, stdout, stderr at least (other tests open and close more meanwhile).
        assert!(p.open_fds.unwrap() >= 3, "{p:?}");
        assert!(p.max_fds.unwrap() >= p.open_fds.unwrap());
        assert!(p.cpu_seconds.unwrap() >= 0.0);
        let started = start_time_seconds().unwrap();
        let now = unix_now();
        // Started before now, and not before this test binary could have been built.
        assert!(
            started <= now + 1.0 && started > now - 86_400.0,
            "{started} {now}"
        );
    }
}
