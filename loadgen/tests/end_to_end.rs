//! popgate-load end to end: `popgate-load serve` as the upstream, popgate in-process (its library
//! `Proxy`) in front, and `popgate-load run` for each scenario at tiny scale. Checks the JSON
//! report (zero errors, counts, the process figures of `--pid`); no timing assertions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

const LOAD: &str = env!("CARGO_BIN_EXE_popgate-load");

fn certs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../certs")
}

/// `popgate-load serve` on an ephemeral port; killed on drop.
struct Upstream {
    child: Child,
    addr: SocketAddr,
}

impl Upstream {
    fn start() -> Upstream {
        let mut child = Command::new(LOAD)
            .args([
                "serve",
                "--users",
                "200",
                "--big-users",
                "2",
                "--big-mb",
                "1",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn popgate-load serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the listening line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        Upstream { child, addr }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// popgate in-process: listeners plain, STLS and implicit TLS in front of `upstream`.
fn proxy(rt: &tokio::runtime::Runtime, upstream: SocketAddr) -> Vec<SocketAddr> {
    let c = certs();
    let toml = format!(
        "[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\n\
         [[listener]]\nname = \"stls\"\nbind = \"127.0.0.1:0\"\ntls = \"starttls\"\n\
         [[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\ntls = \"implicit\"\n\
         [upstream]\naddress = \"{upstream}\"\n\
         [tls]\ncert = \"{}\"\nkey = \"{}\"\n\
         [limits]\nmax_sessions_per_ip = 0\n\
         [log]\nlevel = \"warn\"\n",
        c.join("localhost.crt").display(),
        c.join("localhost.key").display(),
    );
    let path = Path::new("<test>");
    let config = popgate::Config::parse(&toml, path).expect("config parses");
    config.validate(path).expect("config valid");
    let proxy = rt
        .block_on(popgate::Proxy::bind(config))
        .expect("bind proxy");
    let addrs = proxy.local_addrs().into_iter().map(|(_, a)| a).collect();
    rt.spawn(proxy.run(std::future::pending::<()>()));
    addrs
}

/// Run `popgate-load run ARGS --pid <this process>` and parse its report.
fn run(args: &[&str]) -> Value {
    let pid = std::process::id().to_string();
    let out = Command::new(LOAD)
        .arg("run")
        .args(args)
        .args(["--pid", &pid, "--op-timeout", "20"])
        .output()
        .expect("run popgate-load");
    assert!(out.status.success(), "popgate-load {args:?}: {out:?}");
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out:?}"));
    assert_eq!(report["errors"]["total"], 0, "{args:?}: {report:#}");
    report
}

#[test]
fn every_scenario_through_popgate() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let up = Upstream::start();
    let addrs = proxy(&rt, up.addr);
    let (plain, stls, tls) = (
        addrs[0].to_string(),
        addrs[1].to_string(),
        addrs[2].to_string(),
    );
    let ca = certs().join("dev-ca.crt");
    let ca = ca.to_str().expect("utf-8 path");

    let mut reports = Vec::new();
    // cycle, closed loop: 50 sessions from 4 source addresses.
    let r = run(&[
        "cycle",
        "--addr",
        &plain,
        "-c",
        "5",
        "-n",
        "50",
        "--sources",
        "4",
    ]);
    assert_eq!(r["scenario"], "cycle");
    assert_eq!(r["counts"]["units_ok"], 50);
    assert_eq!(r["counts"]["sessions"], 50);
    assert_eq!(r["latency_us"]["samples"], 50);
    assert!(r["counts"]["bytes"].as_u64() > Some(50 * 100));
    assert!(r["proc"]["per_unit"]["cpu_ms_per_1000_sessions"].is_number());
    assert!(r["proc"]["after"]["rss_kib"].as_u64() > Some(0));
    reports.push(r);

    // cycle, open loop over STLS.
    let r = run(&[
        "cycle", "--addr", &stls, "--tls", "stls", "--ca", ca, "--rate", "200", "-n", "10",
    ]);
    assert_eq!(r["params"]["mode"], "open");
    assert_eq!(r["counts"]["units_ok"], 10);

    // bulk over implicit TLS: the 1 MiB message of the first two users.
    let r = run(&[
        "bulk", "--addr", &tls, "--tls", "implicit", "--ca", ca, "--users", "2", "-n", "2",
    ]);
    assert_eq!(r["counts"]["units_ok"], 2);
    assert!(r["counts"]["bytes"].as_u64() > Some(2 << 20));
    assert!(r["proc"]["per_unit"]["cpu_s_per_gb"].is_number());

    // noop: round trips on 2 sessions.
    let r = run(&["noop", "--addr", &plain, "-c", "2", "-n", "40"]);
    assert_eq!(r["counts"]["units_ok"], 40);
    assert_eq!(r["counts"]["sessions"], 2);

    // idle: 20 sessions, RSS sampled at 0, 5, 10, 15, 20.
    let r = run(&[
        "idle",
        "--addr",
        &plain,
        "--sessions",
        "20",
        "-c",
        "8",
        "--hold",
        "0.2",
    ]);
    assert_eq!(r["counts"]["sessions"], 20);
    assert_eq!(r["idle"]["points"].as_array().map(Vec::len), Some(5));
    assert!(r["idle"]["rss_kib_per_session"].is_number());
    reports.push(r);

    // handshake with and without resumption (whether the proxy resumes is its business).
    let r = run(&[
        "handshake",
        "--addr",
        &tls,
        "--tls",
        "implicit",
        "--ca",
        ca,
        "-n",
        "5",
    ]);
    assert_eq!(r["counts"]["units_ok"], 5);
    let r = run(&[
        "handshake",
        "--addr",
        &tls,
        "--tls",
        "implicit",
        "--ca",
        ca,
        "-n",
        "5",
        "--no-resume",
    ]);
    assert_eq!(r["counts"]["resumed"], 0);
    documented_keys_exist(&reports);
}

fn keys(v: &Value, out: &mut std::collections::BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                out.insert(k.clone());
                keys(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| keys(v, out)),
        _ => {}
    }
}

/// Every key benches/README.md names in its description of the report is in a real report.
fn documented_keys_exist(reports: &[Value]) {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/README.md"))
            .expect("benches/README.md");
    let start = readme.find("\n- Output:").expect("an Output bullet");
    let rest = &readme[start + 1..];
    let end = rest[1..].find("\n- ").map_or(rest.len(), |e| e + 1);
    let documented: Vec<&str> = rest[..end]
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| {
            !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
        .collect();
    assert!(documented.len() > 20, "{documented:?}");
    let mut seen = std::collections::BTreeSet::new();
    reports.iter().for_each(|r| keys(r, &mut seen));
    let missing: Vec<&&str> = documented.iter().filter(|k| !seen.contains(**k)).collect();
    assert!(
        missing.is_empty(),
        "documented but not in the report: {missing:?}"
    );
}

#[test]
fn errors_are_counted_not_fatal() {
    // Nothing listens: every session is a connect error, and the report still comes out.
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    drop(l);
    let out = Command::new(LOAD)
        .args(["run", "cycle", "--addr", &addr, "-n", "3"])
        .output()
        .expect("run popgate-load");
    let r: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(r["errors"]["total"], 3);
    assert_eq!(r["errors"]["by_kind"]["connect"], 3);
    assert_eq!(r["counts"]["units_ok"], 0);
}
