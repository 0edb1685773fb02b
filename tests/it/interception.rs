//! Transparent interception (`upstream.address = "original-destination"`), for real: a client,
//! a gateway and a server, each in a network namespace this test creates, the client talking
//! to the server's address, the gateway's iptables / ip6tables `REDIRECT` sending the
//! connection to popgate (the real binary, run in the gateway's namespace), and popgate
//! connecting on to the original destination.
//!
//! ```text
//!  client 10.231.1.2        gw 10.231.1.1 | 10.231.2.1        server 10.231.2.2
//!         fd00:231:1::2  ──►   fd00:231:1::1 | fd00:231:2::1 ──►     fd00:231:2::2
//!                            PREROUTING REDIRECT → popgate          demo POP3 server
//! ```
//!
//! Needs root (network namespaces, iptables), `ip`, `iptables`, `ip6tables`, curl and python3:
//! without them each test says why and skips, unless POPGATE_REQUIRE_TOOLS is set (as in CI),
//! which makes a missing capability a failure. Namespaces are named after this process and a
//! counter, and deleted when the test ends, also on panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::certs::{TestPki, rustls_server};
use common::clients::{pop_py, run_bounded, tail};
use common::proxy::{mailbox, popgate_bin, tricky_messages};
use common::{audit_events, find_exe};
use popgate_demo::{DemoServer, ServerOptions};
use serde_json::{Value, json};

const CLIENT_V4: &str = "10.231.1.2";
const GW_IN_V4: &str = "10.231.1.1";
const GW_OUT_V4: &str = "10.231.2.1";
const SERVER_V4: &str = "10.231.2.2";
const CLIENT_V6: &str = "fd00:231:1::2";
const GW_IN_V6: &str = "fd00:231:1::1";
const GW_OUT_V6: &str = "fd00:231:2::1";
const SERVER_V6: &str = "fd00:231:2::2";

const USER: &str = "alice";
const PASS: &str = "alice-pw";
/// A user a rule refuses at `USER`.
const BLOCKED: &str = "mallory";

const LIMIT: Duration = Duration::from_secs(20);

/// Whether `test` can run here; otherwise says why (or fails, with POPGATE_REQUIRE_TOOLS).
fn capable(test: &str) -> bool {
    let required = std::env::var_os("POPGATE_REQUIRE_TOOLS").is_some();
    let mut missing: Vec<String> = ["ip", "iptables", "ip6tables", "curl", "python3"]
        .into_iter()
        .filter(|t| find_exe(t).is_none())
        .map(|t| format!("`{t}` is not installed"))
        .collect();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("not running as root (network namespaces and iptables need it)".into());
    }
    if missing.is_empty() {
        return true;
    }
    let why = missing.join(", ");
    assert!(!required, "{test}: {why}, but POPGATE_REQUIRE_TOOLS is set");
    eprintln!("{test}: skipped: {why}");
    false
}

/// `cmd` bounded in time; panics with its output unless it exits 0.
fn run_ok(cmd: &mut Command) -> Output {
    let what = format!("{cmd:?}");
    let out = run_bounded(cmd, None, LIMIT);
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip(args: &[&str]) {
    run_ok(Command::new(find_exe("ip").unwrap()).args(args));
}

/// `ip netns exec ns ARGS...` (not checked).
fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(find_exe("ip").unwrap());
    cmd.args(["netns", "exec", ns]).args(args);
    cmd
}

/// Three namespaces wired client ↔ gw ↔ server; deleted (with their links) on drop.
struct Net {
    client: String,
    gw: String,
    server: String,
}

impl Net {
    fn new() -> Net {
        static N: AtomicUsize = AtomicUsize::new(0);
        let tag = format!(
            "{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let net = Net {
            client: format!("pgic{tag}"),
            gw: format!("pgig{tag}"),
            server: format!("pgis{tag}"),
        };
        // Registered for deletion before it exists: a failure half-way cleans up too.
        for ns in [&net.client, &net.gw, &net.server] {
            ip(&["netns", "add", ns]);
        }
        let (c, g, s) = (&net.client, &net.gw, &net.server);
        ip(&[
            "link", "add", "pgic", "netns", c, "type", "veth", "peer", "name", "pgig", "netns", g,
        ]);
        ip(&[
            "link", "add", "pgis", "netns", s, "type", "veth", "peer", "name", "pgio", "netns", g,
        ]);
        for (ns, dev, v4, v6) in [
            (c, "pgic", CLIENT_V4, CLIENT_V6),
            (g, "pgig", GW_IN_V4, GW_IN_V6),
            (g, "pgio", GW_OUT_V4, GW_OUT_V6),
            (s, "pgis", SERVER_V4, SERVER_V6),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        for ns in [c, g, s] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        for (ns, v4, v6) in [(c, GW_IN_V4, GW_IN_V6), (s, GW_OUT_V4, GW_OUT_V6)] {
            ip(&["-n", ns, "route", "add", "default", "via", v4]);
            ip(&["-n", ns, "-6", "route", "add", "default", "via", v6]);
        }
        run_ok(&mut in_ns(
            g,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ],
        ));
        net
    }

    /// In the gateway: TCP to port `port` (IPv4 and IPv6) is redirected to popgate's `to`.
    fn redirect(&self, port: u16, to: u16) {
        for tables in ["iptables", "ip6tables"] {
            run_ok(&mut in_ns(
                &self.gw,
                &[
                    tables,
                    "-t",
                    "nat",
                    "-A",
                    "PREROUTING",
                    "-p",
                    "tcp",
                    "--dport",
                    &port.to_string(),
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    &to.to_string(),
                ],
            ));
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.client, &self.gw, &self.server] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Demo POP3 servers running in a namespace: a thread of this test enters it (setns) and runs
/// them on its own tokio runtime; every socket they open is in that namespace.
struct Servers {
    servers: Vec<DemoServer>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Servers {
    fn start(ns: &str, specs: Vec<(&str, ServerOptions)>) -> Servers {
        let path = PathBuf::from(format!("/run/netns/{ns}"));
        let specs: Vec<(SocketAddr, ServerOptions)> = specs
            .into_iter()
            .map(|(a, o)| (a.parse().unwrap(), o))
            .collect();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("open the namespace");
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut servers = Vec::new();
                for (addr, opts) in specs {
                    servers.push(DemoServer::start(addr, opts).await.expect("demo server"));
                }
                ready_tx.send(servers).unwrap();
                let _ = stop_rx.await;
            });
        });
        let servers = ready_rx
            .recv_timeout(LIMIT)
            .expect("demo servers in the namespace");
        Servers {
            servers,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.servers.clear();
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `popgate run` in the gateway's namespace, with its config, log (stderr) and audit trail in
/// a temp dir; killed (by pid) on drop.
struct Gate {
    child: Child,
    dir: tempfile::TempDir,
}

impl Gate {
    /// Start with `toml` (an `[audit]` table writing to `audit/` is added) and wait until all
    /// `listeners` listen.
    fn start(net: &Net, toml: &str, listeners: usize) -> Gate {
        Gate::start_in(&net.gw, toml, listeners)
    }

    /// Like [`Gate::start`] in the namespace `ns`.
    fn start_in(ns: &str, toml: &str, listeners: usize) -> Gate {
        let dir = tempfile::Builder::new()
            .prefix("popgate-intercept")
            .tempdir()
            .unwrap();
        let cfg = dir.path().join("popgate.toml");
        std::fs::write(
            &cfg,
            format!("shutdown_grace = \"2s\"\n{toml}\n[audit]\nenabled = true\ndir = \"audit\"\n"),
        )
        .unwrap();
        let child = in_ns(ns, &[popgate_bin().to_str().unwrap(), "run", "--config"])
            .arg(&cfg)
            .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
            .spawn()
            .unwrap();
        let mut gate = Gate { child, dir };
        let deadline = Instant::now() + LIMIT;
        while gate.log().matches("listening").count() < listeners {
            if let Some(st) = gate.child.try_wait().unwrap() {
                panic!("popgate exited with {st}:\n{}", gate.log());
            }
            assert!(
                Instant::now() < deadline,
                "popgate did not start:\n{}",
                gate.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        gate
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.dir.path().join("stderr")).unwrap_or_default())
            .into_owned()
    }

    /// SIGTERM and wait for the clean exit (audit flushed); then the audit trail.
    fn stop(&mut self) -> Vec<Value> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "popgate exited with {st}:\n{}", self.log());
                break;
            }
            assert!(Instant::now() < deadline, "popgate did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        audit_events(&self.dir.path().join("audit"))
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// curl in the client's namespace (`-s -S --max-time`), whatever its exit status.
fn curl_in(net: &Net, args: &[&str]) -> Output {
    let mut cmd = in_ns(&net.client, &["curl", "-s", "-S", "--max-time", "15"]);
    cmd.args(args);
    run_bounded(&mut cmd, None, LIMIT)
}

fn curl_ok(net: &Net, args: &[&str]) -> Vec<u8> {
    let out = curl_in(net, args);
    assert!(
        out.status.success(),
        "curl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Python's poplib (tests/clients/pop.py) in the client's namespace.
fn poplib_in(net: &Net, spec: Value) -> Value {
    let mut cmd = in_ns(&net.client, &["python3", pop_py().to_str().unwrap()]);
    let out = run_bounded(&mut cmd, Some(&serde_json::to_vec(&spec).unwrap()), LIMIT);
    assert!(
        out.status.success(),
        "pop.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The first line a client gets when it connects to `addr` from the client's namespace
/// (empty if none within a few seconds).
fn first_line(net: &Net, addr: &str, port: u16) -> String {
    let script = format!(
        "import socket\ns = socket.create_connection(({addr:?}, {port}), 5)\ns.settimeout(5)\n\
         data = b''\n\
         while not data.endswith(b'\\n'):\n    chunk = s.recv(512)\n    if not chunk: break\n    data += chunk\n\
         print(data.decode(errors='replace'), end='')\n"
    );
    let out = run_bounded(
        &mut in_ns(&net.client, &["python3", "-c", &script]),
        None,
        LIMIT,
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn canonical(ip: &str) -> IpAddr {
    ip.parse::<IpAddr>().unwrap().to_canonical()
}

/// The demo server's clients, canonical (a dual-stack socket shows IPv4 as `::ffff:a.b.c.d`).
fn peers(s: &DemoServer) -> Vec<IpAddr> {
    s.peers().iter().map(|p| p.ip().to_canonical()).collect()
}

fn opens(audit: &[Value]) -> Vec<&Value> {
    audit
        .iter()
        .filter(|e| e["event"] == "session_open")
        .collect()
}

const RULES: &str = "[[rule]]\nname = \"no-mallory\"\non = \"command\"\nverbs = \"USER\"\n\
                     args = \"^mallory$\"\naction = \"deny\"\nmessage = \"not here\"\n\
                     [[rule]]\nname = \"to-v4\"\non = \"connect\"\n\
                     destination = \"10.231.2.0/24\"\naction = \"tag\"\ntags = \"server-v4\"\n";

/// The deployment guide's interception example (the one `toml` block of docs/deployment.md that
/// says `original-destination`).
fn deployment_example() -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/deployment.md"))
        .unwrap();
    let blocks: Vec<&str> = doc
        .split("```toml\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .filter(|b| b.contains("original-destination"))
        .collect();
    assert_eq!(blocks.len(), 1, "the interception example");
    blocks[0].to_owned()
}

#[test]
fn the_deployment_interception_example_is_a_valid_config() {
    let path = std::path::Path::new("docs/deployment.md");
    let config = popgate::Config::parse(&deployment_example(), path).expect("parses");
    config.validate(path).expect("valid");
    assert!(config.default_upstream().original_destination());
    assert_eq!(config.listeners[0].bind, "[::]:8110".parse().unwrap());
}

/// Unprivileged, on loopback (runs everywhere): a client that connects to popgate directly is
/// refused, whether the kernel tracks the connection (its original destination is popgate
/// itself) or not (no original destination).
#[test]
fn without_a_redirect_the_client_is_refused() {
    let h = common::proxy::Harness::new();
    let p = h.proxy_toml(
        "[[listener]]\nname = \"intercept\"\nbind = \"127.0.0.1:0\"\n\
         [upstream]\naddress = \"original-destination\"\n\
         [metrics]\nbind = \"127.0.0.1:0\"\n",
    );
    let mut c = common::clients::RawPop::connect(p.addr);
    assert_eq!(
        c.greeting,
        "-ERR [SYS/TEMP] no original destination to connect to"
    );
    assert!(c.read_to_end().is_empty(), "closed after the refusal");
    let metrics = common::clients::curl_ok(&[&format!("http://{}/metrics", p.metrics.unwrap())]);
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("popgate_sessions_refused_total{reason=\"original_destination\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("popgate_sessions_total{listener=\"intercept\"} 0\n"),
        "{metrics}"
    );
    // /health has no one upstream to probe: healthy while the listeners are.
    let health =
        common::clients::curl_ok(&["-f", &format!("http://{}/health", p.metrics.unwrap())]);
    let health = String::from_utf8_lossy(&health);
    assert!(health.contains("original destination"), "{health}");
}

/// `popgate check` refuses `original-destination` with a `proxy_protocol` listener, and takes
/// it with TLS upstream and no `server_name` (the name is chosen per session).
#[test]
fn check_refuses_original_destination_behind_a_balancer() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let check = |name: &str, text: &str| {
        let cfg = dir.path().join(name);
        std::fs::write(&cfg, text).unwrap();
        run_bounded(
            Command::new(popgate_bin())
                .args(["check", "--config"])
                .arg(&cfg),
            None,
            LIMIT,
        )
    };
    let out = check(
        "balanced.toml",
        "[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:0\"\nproxy_protocol = true\n\
         trusted_proxies = [\"127.0.0.1\"]\n\
         [upstream]\naddress = \"original-destination\"\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("listener[0].proxy_protocol") && err.contains("original-destination"),
        "{err}"
    );
    let out = check(
        "tls.toml",
        &format!(
            "[[listener]]\nname = \"intercept\"\nbind = \"[::]:8995\"\n\
             [upstream]\naddress = \"original-destination\"\ntls = \"implicit\"\n\
             ca_file = {:?}\n",
            pki.ca_path()
        ),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn redirected_sessions_reach_the_original_server_over_ipv4_and_ipv6() {
    if !capable("redirected_sessions_reach_the_original_server_over_ipv4_and_ipv6") {
        return;
    }
    let net = Net::new();
    net.redirect(110, 8110);
    let msgs = tricky_messages(300_000);
    let servers = Servers::start(
        &net.server,
        vec![(
            "[::]:110",
            ServerOptions::new(vec![
                mailbox(USER, PASS, msgs.clone()),
                mailbox(BLOCKED, "m-pw", msgs.clone()),
            ]),
        )],
    );
    let rules_dir = tempfile::tempdir().unwrap();
    let rules = rules_dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    // The deployment guide's configuration (one dual-stack listener: IPv4 clients arrive as
    // ::ffff:a.b.c.d), with rules and the audit trail.
    let mut gate = Gate::start(
        &net,
        &format!("rules = [{rules:?}]\n{}", deployment_example()),
        1,
    );

    // IPv4, curl: each message byte-identical (curl unstuffs: what it got is what is stored).
    let up = format!("{USER}:{PASS}");
    for (i, m) in msgs.iter().enumerate() {
        let got = curl_ok(
            &net,
            &["-u", &up, &format!("pop3://{SERVER_V4}:110/{}", i + 1)],
        );
        assert!(&got == m, "message {} differs over IPv4", i + 1);
    }
    // IPv6, Python's poplib.
    let spec = json!({"host": SERVER_V6, "port": 110, "user": USER, "pass": PASS,
        "actions": [["retr", 1], ["retr", 3]]});
    let r = poplib_in(&net, spec);
    assert_eq!(r["login"]["ok"], true, "{r}");
    for (k, n) in [(0, 1), (1, 3)] {
        let got = common::clients::b64(&r["results"][k]["data_b64"]);
        assert!(got == msgs[n - 1], "message {n} differs over IPv6");
    }
    // A rule applies: the blocked user never reaches the server (poplib logs in with USER).
    let r = poplib_in(
        &net,
        json!({"host": SERVER_V4, "port": 110, "user": BLOCKED, "pass": "m-pw", "actions": []}),
    );
    assert_ne!(r["login"]["ok"], true, "the rule let {BLOCKED} in: {r}");
    let received = servers.servers[0].received();
    assert!(
        !received.iter().any(|l| l.starts_with(b"USER mallory")),
        "USER mallory reached the server"
    );
    assert!(received.iter().any(|l| l == b"USER alice\r\n"));

    // The server saw popgate's gateway address, never the client's.
    let seen = peers(&servers.servers[0]);
    assert!(seen.contains(&canonical(GW_OUT_V4)), "{seen:?}");
    assert!(seen.contains(&canonical(GW_OUT_V6)), "{seen:?}");
    assert!(
        seen.iter()
            .all(|p| *p == canonical(GW_OUT_V4) || *p == canonical(GW_OUT_V6)),
        "{seen:?}"
    );

    let log = gate.log();
    assert!(
        log.contains(&format!("original_dst={SERVER_V4}:110")),
        "{}",
        tail(&log, 3000)
    );
    let audit = gate.stop();
    let opens = opens(&audit);
    // IPv4: 3 retrievals (curl) and the blocked user (poplib); IPv6: 1 (poplib).
    assert_eq!(opens.len(), 5, "{opens:?}");
    let v4 = format!("{SERVER_V4}:110");
    let v6 = format!("[{SERVER_V6}]:110");
    assert_eq!(
        opens
            .iter()
            .filter(|e| e["original_dst"] == v4.as_str())
            .count(),
        4,
        "{opens:?}"
    );
    let o6: Vec<_> = opens
        .iter()
        .filter(|e| e["original_dst"] == v6.as_str())
        .collect();
    assert_eq!(o6.len(), 1, "{opens:?}");
    assert!(
        o6[0]["client"]
            .as_str()
            .unwrap()
            .starts_with(&format!("[{CLIENT_V6}]:")),
        "{o6:?}"
    );
    assert!(
        opens
            .iter()
            .filter(|e| e["original_dst"] == v4.as_str())
            .all(|e| e["client"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{CLIENT_V4}:"))),
        "{opens:?}"
    );
    // The `destination` matcher: the IPv4 server's sessions are tagged, the IPv6 one is not.
    for e in &opens {
        let tagged = e["tags"]
            .as_array()
            .is_some_and(|t| t.contains(&json!("server-v4")));
        assert_eq!(tagged, e["original_dst"] == v4.as_str(), "{e}");
    }
    assert!(
        audit
            .iter()
            .any(|e| e["event"] == "denied" && e["rule"] == "no-mallory"),
        "{audit:?}"
    );
}

#[test]
fn a_connection_to_popgate_itself_is_refused_without_dialling() {
    if !capable("a_connection_to_popgate_itself_is_refused_without_dialling") {
        return;
    }
    let net = Net::new();
    net.redirect(110, 8110);
    let servers = Servers::start(
        &net.server,
        vec![(
            "[::]:110",
            ServerOptions::new(vec![mailbox(USER, PASS, tricky_messages(0))]),
        )],
    );
    // A second listener on port 110 of every address of the gateway: a client that asks for
    // the gateway's own port 110 is redirected, and its original destination is that listener.
    let mut gate = Gate::start(
        &net,
        "[[listener]]\nname = \"intercept\"\nbind = \"[::]:8110\"\n\
         [[listener]]\nname = \"direct\"\nbind = \"0.0.0.0:110\"\n\
         [upstream]\naddress = \"original-destination\"\nconnect_timeout = \"5s\"\n",
        2,
    );
    // Straight to popgate's port (no redirect), IPv4 and IPv6; and to the gateway's port 110
    // (redirected, but to popgate's own listener).
    for (addr, port) in [(GW_IN_V4, 8110), (GW_IN_V6, 8110), (GW_IN_V4, 110)] {
        let line = first_line(&net, addr, port);
        assert!(
            line.starts_with("-ERR [SYS/TEMP] "),
            "{addr} port {port}: {line:?}\n{}",
            tail(&gate.log(), 3000)
        );
    }
    // A redirected client still gets through (the refusals are not a general failure).
    let got = curl_ok(
        &net,
        &[
            "-u",
            &format!("{USER}:{PASS}"),
            &format!("pop3://{SERVER_V4}:110/1"),
        ],
    );
    assert!(got == tricky_messages(0)[0]);
    // Where no connection is tracked (no NAT rule in the client's namespace), the kernel
    // knows no original destination: refused as well.
    let mut local = Gate::start_in(
        &net.client,
        "[[listener]]\nname = \"local\"\nbind = \"127.0.0.1:8110\"\n\
         [upstream]\naddress = \"original-destination\"\n",
        1,
    );
    let line = first_line(&net, "127.0.0.1", 8110);
    assert!(line.starts_with("-ERR [SYS/TEMP] "), "{line:?}");
    assert!(
        local.log().contains("no redirect recorded"),
        "{}",
        tail(&local.log(), 3000)
    );
    local.stop();
    let log = gate.log();
    assert_eq!(
        log.matches("refusing to connect to itself").count(),
        3,
        "{}",
        tail(&log, 3000)
    );
    assert!(
        !log.contains("upstream unavailable"),
        "{}",
        tail(&log, 3000)
    );
    // Nothing was dialled but the one real session.
    assert_eq!(servers.servers[0].connections(), 1);
    let audit = gate.stop();
    assert_eq!(
        opens(&audit).len(),
        1,
        "refused connections are no sessions"
    );
}

#[test]
fn tls_to_the_original_server_is_verified_for_the_clients_sni_or_the_ip() {
    if !capable("tls_to_the_original_server_is_verified_for_the_clients_sni_or_the_ip") {
        return;
    }
    let net = Net::new();
    net.redirect(995, 8995);
    let pki = TestPki::new();
    let (up_cert, up_key) = pki.issue(&["pop.example.test", SERVER_V4, SERVER_V6]);
    let (gate_cert, gate_key) = pki.issue(&[
        "pop.example.test",
        "other.example.test",
        SERVER_V4,
        SERVER_V6,
    ]);
    let msgs = tricky_messages(100_000);
    let mut opts = ServerOptions::new(vec![mailbox(USER, PASS, msgs.clone())]);
    opts.tls = Some(rustls_server(&up_cert, &up_key));
    opts.implicit_tls = true;
    let servers = Servers::start(&net.server, vec![("[::]:995", opts)]);
    let ca = pki.ca_path().to_str().unwrap().to_owned();
    // Unlike the other tests, IPv4-only and IPv6-only listening sockets.
    let mut gate = Gate::start(
        &net,
        &format!(
            "[[listener]]\nname = \"tls-v4\"\nbind = \"0.0.0.0:8995\"\ntls = \"implicit\"\n\
             [[listener]]\nname = \"tls-v6\"\nbind = \"[{GW_IN_V6}]:8995\"\ntls = \"implicit\"\n\
             [tls]\ncert = {gate_cert:?}\nkey = {gate_key:?}\n\
             [upstream]\naddress = \"original-destination\"\ntls = \"implicit\"\n\
             ca_file = {ca:?}\nconnect_timeout = \"5s\"\n"
        ),
        2,
    );
    let up = format!("{USER}:{PASS}");
    // By IP (curl sends no SNI for an address): popgate verifies the address, an IP SAN.
    for url in [
        format!("pop3s://{SERVER_V4}:995/3"),
        format!("pop3s://[{SERVER_V6}]:995/3"),
    ] {
        let got = curl_ok(&net, &["--cacert", &ca, "-u", &up, &url]);
        assert!(got == msgs[2], "{url}: message differs");
    }
    // By name: the client's SNI is what popgate verifies the server for.
    let got = curl_ok(
        &net,
        &[
            "--cacert",
            &ca,
            "--connect-to",
            &format!("pop.example.test:995:{SERVER_V4}:995"),
            "-u",
            &up,
            "pop3s://pop.example.test:995/1",
        ],
    );
    assert!(got == msgs[0]);
    // A name the server's certificate lacks (the same address would pass): refused.
    let out = curl_in(
        &net,
        &[
            "--cacert",
            &ca,
            "--connect-to",
            &format!("other.example.test:995:{SERVER_V4}:995"),
            "-u",
            &up,
            "pop3s://other.example.test:995/1",
        ],
    );
    assert!(!out.status.success(), "other.example.test was accepted");
    let log = gate.log();
    assert_eq!(
        log.matches("upstream unavailable").count(),
        1,
        "{}",
        tail(&log, 3000)
    );
    assert!(
        log.contains("not valid for name \"other.example.test\""),
        "{}",
        tail(&log, 3000)
    );
    assert_eq!(servers.servers[0].connections(), 4);
    let audit = gate.stop();
    let upstream_tls = audit
        .iter()
        .filter(|e| e["event"] == "tls" && e["side"] == "upstream")
        .count();
    assert_eq!(upstream_tls, 3, "{audit:?}");
    let dsts: Vec<_> = opens(&audit)
        .iter()
        .map(|e| e["original_dst"].as_str().unwrap_or("-").to_owned())
        .collect();
    assert_eq!(
        dsts.iter()
            .filter(|d| **d == format!("{SERVER_V4}:995"))
            .count(),
        3,
        "{dsts:?}"
    );
}

/// The deployment guide's allow-list: a `connect` rule allows the sessions whose original
/// destination is one of "your own" servers, the next drops the rest. A dropped destination is never dialled,
/// over IPv4 or IPv6, whatever the client sends.
#[test]
fn a_destination_allow_list_drops_other_servers_without_dialling() {
    if !capable("a_destination_allow_list_drops_other_servers_without_dialling") {
        return;
    }
    let net = Net::new();
    net.redirect(110, 8110);
    let servers = Servers::start(
        &net.server,
        vec![(
            "[::]:110",
            ServerOptions::new(vec![mailbox(USER, PASS, tricky_messages(0))]),
        )],
    );
    let rules_dir = tempfile::tempdir().unwrap();
    let rules = rules_dir.path().join("rules.toml");
    // Only the IPv4 address of the server is "ours"; its IPv6 address is not.
    std::fs::write(
        &rules,
        format!(
            "[[rule]]\nname = \"our-servers\"\non = \"connect\"\n\
             destination = [\"{SERVER_V4}/32\"]\naction = \"allow\"\n\
             [[rule]]\nname = \"others\"\non = \"connect\"\naction = \"drop\"\n"
        ),
    )
    .unwrap();
    let mut gate = Gate::start(
        &net,
        &format!("rules = [{rules:?}]\n{}", deployment_example()),
        1,
    );
    let got = curl_ok(
        &net,
        &[
            "-u",
            &format!("{USER}:{PASS}"),
            &format!("pop3://{SERVER_V4}:110/1"),
        ],
    );
    assert!(got == tricky_messages(0)[0]);
    // IPv6 to the same server, and IPv4 to another address of that network: dropped.
    for (addr, port) in [(SERVER_V6, 110), (GW_OUT_V4, 110)] {
        let line = first_line(&net, addr, port);
        assert_eq!(line, "", "{addr}: {line:?}\n{}", tail(&gate.log(), 3000));
    }
    assert_eq!(servers.servers[0].connections(), 1, "only the allowed one");
    let audit = gate.stop();
    let dropped: Vec<&Value> = audit
        .iter()
        .filter(|e| {
            e["event"] == "session_close" && e["reason"] == "rule_drop" && e["rule"] == "others"
        })
        .collect();
    assert_eq!(dropped.len(), 2, "{audit:?}");
}
