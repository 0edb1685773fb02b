//! Starting popgate for tests: in-process (the library's `Proxy`) in front of the demo server or
//! any upstream, or as the real binary (`popgate run`) for CLI and memory tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use popgate::Config;
use popgate::demo::{DemoServer, Mailbox, ServerOptions};
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

    /// popgate with a complete config text (listeners should bind port 0).
    pub fn proxy_toml(&self, toml: &str) -> ProxyHandle {
        let path = Path::new("<test>");
        let config = Config::parse(toml, path).expect("test config parses");
        config.validate(path).expect("test config valid");
        let proxy = self
            .rt
            .block_on(popgate::Proxy::bind(config))
            .expect("bind proxy");
        let addrs: Vec<SocketAddr> = proxy.local_addrs().into_iter().map(|(_, a)| a).collect();
        let (tx, rx) = oneshot::channel::<()>();
        let done = self.rt.spawn(proxy.run(async {
            let _ = rx.await;
        }));
        ProxyHandle {
            addr: addrs[0],
            addrs,
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
    let mut i: usize = 0;
    while m.len() < size {
        if i.is_multiple_of(7) {
            m.push(b'.');
        }
        let len = (i * 37) % 990;
        m.extend((0..len).map(|k| b'a' + ((k + i) % 26) as u8));
        m.extend_from_slice(b"\r\n");
        i += 1;
    }
    m
}

/// One mailbox `user`/`pass` holding `messages`.
pub fn mailbox(user: &str, pass: &str, messages: Vec<Vec<u8>>) -> Mailbox {
    Mailbox::new(user, pass, messages)
}

/// The popgate binary built by cargo for the tests.
pub fn popgate_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_popgate"))
}

/// A `popgate run` process, killed on drop.
pub struct PopgateProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl PopgateProcess {
    /// Start `popgate run` in front of `upstream` on a free port and wait until it accepts.
    pub fn start(upstream: SocketAddr, extra: &str) -> PopgateProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = super::free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let cfg = dir.path().join("popgate.toml");
        std::fs::write(
            &cfg,
            format!(
                "[[listener]]\nname = \"bin\"\nbind = \"{addr}\"\n\
                 [upstream]\naddress = \"{upstream}\"\n{extra}"
            ),
        )
        .unwrap();
        let child = Command::new(popgate_bin())
            .args(["run", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn popgate");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "popgate did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        PopgateProcess { child, addr, dir }
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
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
