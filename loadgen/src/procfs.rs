//! CPU time and memory of a process and its descendants, from /proc (Linux).

use std::collections::HashMap;

use serde_json::{Value, json};

/// Clock ticks per second of /proc times: USER_HZ, 100 on every Linux architecture (the
/// kernel scales to it whatever its internal HZ).
const USER_HZ: f64 = 100.0;

/// One reading of a process tree.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// utime + stime + cutime + cstime of the process and of every live descendant, seconds.
    /// A child that exits between two samples moves into its parent's cutime/cstime once it is
    /// reaped, so the sum stays continuous (process-per-connection servers included).
    pub cpu_s: f64,
    /// VmRSS summed over the tree, KiB (pages shared between processes count once per process).
    pub rss_kib: u64,
    /// VmHWM (peak RSS) summed over the tree, KiB.
    pub hwm_kib: u64,
    /// Proportional set size (`Pss` of smaps_rollup) summed over the tree, KiB: pages shared by
    /// n processes count 1/n in each, so a process-per-connection server is not overcounted.
    pub pss_kib: u64,
    /// Processes in the tree.
    pub procs: usize,
}

/// The four CPU times (seconds) in a `/proc/PID/stat` line, and the parent pid.
pub fn parse_stat(stat: &str) -> Option<(f64, u32)> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): field n is f[n - 3].
    let ppid = f.get(1)?.parse().ok()?;
    let mut ticks = 0u64;
    for n in 14..=17 {
        ticks += f.get(n - 3)?.parse::<u64>().ok()?;
    }
    Some((ticks as f64 / USER_HZ, ppid))
}

/// A `kB` field (`VmRSS`, `VmHWM`) of `/proc/PID/status`.
pub fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn read(pid: u32, file: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()
}

/// `pid` and all its live descendants.
fn tree(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some((_, ppid)) = read(p, "stat").as_deref().and_then(parse_stat) {
                children.entry(ppid).or_default().push(p);
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c);
        }
        i += 1;
    }
    out
}

/// Read the tree under `pid`; None if `pid` itself is gone.
pub fn sample(pid: u32) -> Option<Sample> {
    let (own, _) = read(pid, "stat").as_deref().and_then(parse_stat)?;
    let mut s = Sample {
        cpu_s: own,
        ..Sample::default()
    };
    for p in tree(pid) {
        if p != pid {
            match read(p, "stat").as_deref().and_then(parse_stat) {
                Some((cpu, _)) => s.cpu_s += cpu,
                None => continue,
            }
        }
        if let Some(st) = read(p, "status") {
            s.rss_kib += status_kib(&st, "VmRSS").unwrap_or(0);
            s.hwm_kib += status_kib(&st, "VmHWM").unwrap_or(0);
        }
        if let Some(rollup) = read(p, "smaps_rollup") {
            s.pss_kib += status_kib(&rollup, "Pss").unwrap_or(0);
        }
        s.procs += 1;
    }
    Some(s)
}

/// A sample as JSON.
pub fn to_json(s: &Sample) -> Value {
    json!({"cpu_s": s.cpu_s, "rss_kib": s.rss_kib, "hwm_kib": s.hwm_kib, "pss_kib": s.pss_kib,
           "procs": s.procs})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_the_name() {
        let line = "4242 (my (odd) proc) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 50 7 3 20 0 1 0 100 1000 200 18446744073709551615";
        assert_eq!(parse_stat(line), Some((3.1, 1)));
    }

    #[test]
    fn status_fields_in_kib() {
        let st = "Name:\tpopgate\nVmHWM:\t   48200 kB\nVmRSS:\t   12000 kB\n";
        assert_eq!(status_kib(st, "VmRSS"), Some(12000));
        assert_eq!(status_kib(st, "VmHWM"), Some(48200));
        assert_eq!(status_kib(st, "VmSwap"), None);
        let rollup = "55d0-7ffd ---p 00000000 00:00 0  [rollup]\nRss:  9000 kB\nPss:  7000 kB\n";
        assert_eq!(status_kib(rollup, "Pss"), Some(7000));
    }

    #[test]
    fn own_process_is_sampled() {
        let s = sample(std::process::id());
        assert!(s.is_some_and(|s| s.rss_kib > 0 && s.pss_kib > 0 && s.procs >= 1));
    }
}
