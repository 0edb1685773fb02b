//! Starting popgate for tests: in-process (the library's `Proxy`) in front of the demo server or
//! any upstream, or as the real binary (`popgate run`) for CLI and memory tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use popgate::Config;
use popgate_demo::{DemoServer, Mailbox, ServerOptions};
use tokio::sync::oneshot;

/// A tokio runtime that owns the in-process servers of one test.
pub struct Harness {
    pub rt: tokio::runtime::Runtime,
}

impl Harness {
    pub fn new() -> Harness {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        Harness { rt }
    }

    /// The demo server as the scriptable upstream, on an ephemeral loopback port.
    pub fn upstream(&self, opts: ServerOptions) -> DemoServer {
        self.rt
            .block_on(DemoServer::start("127.0.0.1:0".parse().unwrap(), opts))
            .expect("start demo upstream")
    }

    /// popgate in front of `upstream`, with extra TOML appended (e.g. a `[limits]` table).
    pub fn proxy(&self, upstream: SocketAddr, extra: &str) -> ProxyHandle {
        self.proxy_toml(&format!(
            "[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n\
             [upstream]\naddress = \"{upstream}\"\nconnect_timeout = \"2s\"\n{extra}"
        ))
    }

    /// popgate with `rules` (paths; a top-level key, so it comes before any table), one
    /// listener `test` (`listener_extra` in its table), in front of `upstream` (`upstream_extra`
    /// in its table, e.g. `connect_timeout`), then `rest` (more tables).
    pub fn proxy_with_rules(
        &self,
        rules: &[&str],
        listener_extra: &str,
        upstream: SocketAddr,
        upstream_extra: &str,
        rest: &str,
    ) -> ProxyHandle {
        self.proxy_toml(&format!(
            "rules = {rules:?}\n\
             [[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n{listener_extra}\n\
             [upstream]\naddress = \"{upstream}\"\n{upstream_extra}\n\
             {rest}"
        ))
    }

    /// popgate with a complete config text (listeners should bind port 0). Unless the text
    /// sets `shutdown_grace`, it is 0: a shutdown closes open sessions at once.
    pub fn proxy_toml(&self, toml: &str) -> ProxyHandle {
        let path = Path::new("<test>");
        let toml = if toml.contains("shutdown_grace") {
            toml.to_owned()
        } else {
            format!("shutdown_grace = \"0s\"\n{toml}")
        };
        let config = Config::parse(&toml, path).expect("test config parses");
        config.validate(path).expect("test config valid");
        let proxy = self
            .rt
            .block_on(popgate::Proxy::bind(config))
            .expect("bind proxy");
        let addrs: Vec<SocketAddr> = proxy.local_addrs().into_iter().map(|(_, a)| a).collect();
        let metrics = proxy.metrics_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let done = self.rt.spawn(proxy.run(async {
            let _ = rx.await;
        }));
        ProxyHandle {
            addr: addrs[0],
            addrs,
            metrics,
            stop: Some(tx),
            done: Some(done),
        }
    }
}

/// A running in-process proxy; stopped on drop.
pub struct ProxyHandle {
    /// First listener's address.
    pub addr: SocketAddr,
    /// All listeners' addresses, in config order.
    pub addrs: Vec<SocketAddr>,
    /// The `[metrics]` endpoint's address, when configured.
    pub metrics: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl ProxyHandle {
    /// Signal shutdown and wait (bounded) until the proxy has closed its sessions.
    pub fn shutdown(&mut self, h: &Harness) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            h.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(15), done)
                    .await
                    .expect("proxy did not stop in time")
                    .expect("proxy task panicked");
            });
        }
    }

    /// [`shutdown`](Self::shutdown), which must be over within `limit` (`what` waited: for
    /// the failure message).
    pub fn shutdown_within(&mut self, h: &Harness, limit: Duration, what: &str) {
        let started = std::time::Instant::now();
        self.shutdown(h);
        let took = started.elapsed();
        assert!(took < limit, "shutdown waited {took:?} for {what}");
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Messages that break sloppy relays: dot lines, 8-bit bytes, a CRLF.CRLF look-alike, and
/// (with `big`) a multi-megabyte message. Wire form (CRLF), not dot-stuffed.
pub fn tricky_messages(big: usize) -> Vec<Vec<u8>> {
    let mut msgs = vec![
        b"From: a@example.org\r\nTo: b@example.org\r\nSubject: dots\r\n\r\n.\r\n..\r\n.hidden\r\n. space\r\nend\r\n"
            .to_vec(),
        {
            let mut m = b"From: \xe9t\xe9@example.org\r\nSubject: =?utf-8?q?8bit?=\r\n\r\n".to_vec();
            m.extend((0x80u8..=0xff).collect::<Vec<u8>>());
            m.extend_from_slice(b"\r\nr\xc3\xa9sum\xc3\xa9 \x00nul\r\n\r\n.\r\n");
            m
        },
    ];
    if big > 0 {
        msgs.push(big_message(big));
    }
    msgs
}

/// A message of about `size` octets whose lines vary in length and often start with a dot.
pub fn big_message(size: usize) -> Vec<u8> {
    let mut m = b"From: big@example.org\r\nSubject: big\r\n\r\n".to_vec();
    push_varied_lines(&mut m, size, b"\r\n");
    m
}

/// Append lines ending in `eol` to `m` until it holds at least `size` octets: lengths vary from
/// 0 to 989 letters and every seventh line starts with a dot.
pub fn push_varied_lines(m: &mut Vec<u8>, size: usize, eol: &[u8]) {
    let mut i: usize = 0;
    while m.len() < size {
        if i.is_multiple_of(7) {
            m.push(b'.');
        }
        let len = (i * 37) % 990;
        m.extend((0..len).map(|k| b'a' + ((k + i) % 26) as u8));
        m.extend_from_slice(eol);
        i += 1;
    }
}

/// One mailbox `user`/`pass` holding `messages`.
pub fn mailbox(user: &str, pass: &str, messages: Vec<Vec<u8>>) -> Mailbox {
    Mailbox::new(user, pass, messages)
}

/// A rule file written to its own temp dir; the dir lives as long as the value.
pub struct RuleFile {
    _dir: tempfile::TempDir,
    /// Absolute path of the file.
    pub path: String,
}

/// A [`RuleFile`] holding `text`.
pub fn rule_file(text: &str) -> RuleFile {
    let dir = tempfile::Builder::new().prefix("rules").tempdir().unwrap();
    let path = dir.path().join("rules.toml");
    std::fs::write(&path, text).unwrap();
    RuleFile {
        path: path.to_str().unwrap().to_owned(),
        _dir: dir,
    }
}

/// The popgate binary built by cargo for the tests.
pub fn popgate_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_popgate"))
}

/// How [`PopgateProcess::run`] configures and starts `popgate run`. The config it writes is
/// `top` (with `shutdown_grace = "2s"` unless `top` sets it), one listener `bin` on a free
/// loopback port (plus `listener` keys), `[upstream]` with the address, then `tables`.
#[derive(Default)]
pub struct PopgateOpts {
    top: String,
    listener: String,
    tables: String,
    files: Vec<(String, Vec<u8>)>,
    log_dir: Option<String>,
    wait_for_log: bool,
    env: Vec<(String, String)>,
    upstreams: Option<String>,
}

impl PopgateOpts {
    pub fn new() -> PopgateOpts {
        PopgateOpts::default()
    }

    /// Top-level TOML before the tables, e.g. `rules = ["policy.toml"]`.
    pub fn top(mut self, toml: &str) -> PopgateOpts {
        self.top.push_str(toml);
        self
    }

    /// More keys in the `[[listener]]` table, e.g. `tls = "implicit"`.
    pub fn listener(mut self, toml: &str) -> PopgateOpts {
        self.listener.push_str(toml);
        self
    }

    /// Tables appended after `[upstream]` (in call order).
    pub fn tables(mut self, toml: &str) -> PopgateOpts {
        self.tables.push_str(toml);
        self
    }

    /// A file written into the process's dir (next to the config) before the start.
    pub fn file(mut self, name: &str, contents: impl AsRef<[u8]>) -> PopgateOpts {
        self.files
            .push((name.to_owned(), contents.as_ref().to_vec()));
        self
    }

    /// The operational log is written to files in `dir` (relative to the process's dir), so
    /// [`PopgateProcess::log`] reads those; without this it reads stderr.
    pub fn log_dir(mut self, dir: &str) -> PopgateOpts {
        self.log_dir = Some(dir.to_owned());
        self
    }

    /// `[log]` at `level` to files in `log/`, never rotated (and [`Self::log_dir`] set to it).
    pub fn log_to_dir(self, level: &str) -> PopgateOpts {
        self.tables(&format!(
            "[log]\nlevel = \"{level}\"\ndir = \"log\"\nrotation = \"never\"\n"
        ))
        .log_dir("log")
    }

    /// Upstream tables (`[[upstream]]` entries, routing) written instead of the `[upstream]`
    /// table with the address given to [`PopgateProcess::run`].
    pub fn upstreams(mut self, toml: &str) -> PopgateOpts {
        self.upstreams = Some(toml.to_owned());
        self
    }

    /// An environment variable for the process (e.g. `NOTIFY_SOCKET`).
    pub fn env(mut self, name: &str, value: &str) -> PopgateOpts {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Wait for the "listening" log line instead of probing the port (a probe would be a
    /// session of its own: audited, logged, counted).
    pub fn wait_for_log(mut self) -> PopgateOpts {
        self.wait_for_log = true;
        self
    }
}

/// A `popgate run` process with its config, stdout and stderr (files `stdout`, `stderr`) in a
/// temp dir; killed on drop.
pub struct PopgateProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    log_dir: Option<PathBuf>,
}

impl PopgateProcess {
    /// Start `popgate run` in front of `upstream` on a free port and wait until it accepts;
    /// `extra` (tables) is appended to the config.
    pub fn start(upstream: SocketAddr, extra: &str) -> PopgateProcess {
        PopgateProcess::run(upstream, PopgateOpts::new().tables(extra))
    }

    /// Start `popgate run` as `opts` say and wait (bounded) until it is listening.
    pub fn run(upstream: SocketAddr, opts: PopgateOpts) -> PopgateProcess {
        let dir = tempfile::Builder::new()
            .prefix("popgate")
            .tempdir()
            .expect("tempdir");
        let addr: SocketAddr = format!("127.0.0.1:{}", super::free_port()).parse().unwrap();
        for (name, contents) in &opts.files {
            std::fs::write(dir.path().join(name), contents).unwrap();
        }
        let cfg = dir.path().join("popgate.toml");
        let grace = if opts.top.contains("shutdown_grace") {
            ""
        } else {
            "shutdown_grace = \"2s\"\n"
        };
        let upstreams = opts
            .upstreams
            .clone()
            .unwrap_or_else(|| format!("[upstream]\naddress = \"{upstream}\"\n"));
        std::fs::write(
            &cfg,
            format!(
                "{grace}{}[[listener]]\nname = \"bin\"\nbind = \"{addr}\"\n{}\
                 {upstreams}{}",
                opts.top, opts.listener, opts.tables
            ),
        )
        .unwrap();
        let child = Command::new(popgate_bin())
            .args(["run", "--config"])
            .arg(&cfg)
            .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .expect("spawn popgate");
        let log_dir = opts.log_dir.as_ref().map(|d| dir.path().join(d));
        let mut p = PopgateProcess {
            child,
            addr,
            dir,
            log_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = if opts.wait_for_log {
                p.log().contains("listening")
            } else {
                std::net::TcpStream::connect(addr).is_ok()
            };
            p.assert_running();
            if up {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "popgate did not start listening:\n{}\n{}",
                p.log(),
                p.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Panics (with stderr) if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!("popgate exited with {st}: {}", self.stderr());
        }
    }

    /// `rel` in the process's dir.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The file `rel` of the process's dir as text (empty if missing).
    pub fn read(&self, rel: &str) -> String {
        String::from_utf8_lossy(&std::fs::read(self.path(rel)).unwrap_or_default()).into_owned()
    }

    /// What popgate wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.read("stderr")
    }

    /// The operational log so far: all files in the log dir (in name order) if one was set,
    /// else stderr.
    pub fn log(&self) -> String {
        let Some(log_dir) = &self.log_dir else {
            return self.stderr();
        };
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(log_dir) {
            let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
            files.sort();
            for f in files {
                // A file listed a moment ago may be gone: a reload that changes `[log]` prunes
                // or moves files while the test reads them.
                if let Ok(bytes) = std::fs::read(f) {
                    out.push_str(&String::from_utf8_lossy(&bytes));
                }
            }
        }
        out
    }

    /// Wait (bounded) until `needle` occurs at least `n` times in the log; returns the log.
    pub fn wait_log(&self, needle: &str, n: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if log.matches(needle).count() >= n {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} not logged {n} time(s); log:\n{}",
                super::clients::tail(&log, 4000)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send SIGHUP (reload).
    pub fn hup(&self) {
        self.signal("-HUP");
    }

    /// Send SIGTERM without waiting (see [`Self::stop`]).
    pub fn term(&self) {
        self.signal("-TERM");
    }

    /// Wait (bounded by `limit`) for the process to exit; its status.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "popgate did not exit in {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The config file.
    pub fn config_path(&self) -> PathBuf {
        self.path("popgate.toml")
    }

    /// Send a signal by `kill` name, e.g. `"-USR1"`.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig} failed");
    }

    /// SIGTERM, then wait (bounded, 15 s) for a clean exit: logs, audit and transcripts are
    /// flushed and closed.
    pub fn stop(&mut self) {
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "popgate exited with {st}: {}", self.stderr());
                return;
            }
            assert!(Instant::now() < deadline, "popgate did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap (no clean shutdown).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Peak resident memory (VmHWM) and current RSS of the process, in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmHWM:"), field("VmRSS:"))
    }
}

impl Drop for PopgateProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
