//! In-process popgate on tokio's paused clock (`#[tokio::test(start_paused = true)]`): popgate,
//! its upstreams and the test's clients all run on the test's one current-thread runtime, so
//! the timeouts they wait for pass in no real time, and [`took`](super::took) asserts them
//! exactly on the virtual clock.
//!
//! The paused clock jumps to the next timer whenever the runtime is idle, so everything a test
//! waits for must be a task of this runtime or the kernel (a listener that never accepts), never
//! a thread or another process (their work does not keep the clock from jumping).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use popgate_demo::{DemoServer, ServerOptions};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Longest (virtual) wait for a line: a session that never answers fails the test, at once.
pub const LINE_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// popgate (the library's `Proxy`) running on the test's runtime; stopped on drop.
pub struct Popgate {
    /// The first listener's address.
    pub addr: SocketAddr,
    /// The `[metrics]` endpoint's address, when configured.
    pub metrics: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    _done: JoinHandle<()>,
}

impl Popgate {
    /// popgate with the complete config `toml` (listeners bind port 0). Unless the text sets
    /// `shutdown_grace`, it is 0.
    pub async fn start(toml: &str) -> Popgate {
        let toml = if toml.contains("shutdown_grace") {
            toml.to_owned()
        } else {
            format!("shutdown_grace = \"0s\"\n{toml}")
        };
        let path = Path::new("<test>");
        let config = popgate::Config::parse(&toml, path).expect("test config parses");
        config.validate(path).expect("test config valid");
        let proxy = popgate::Proxy::bind(config).await.expect("bind proxy");
        let addr = proxy.local_addrs()[0].1;
        let metrics = proxy.metrics_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(proxy.run(async {
            let _ = stopped.await;
        }));
        Popgate {
            addr,
            metrics,
            stop: Some(stop),
            _done: done,
        }
    }
}

impl Drop for Popgate {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The demo server with `opts`, on the test's runtime, on an ephemeral loopback port.
pub async fn demo(opts: ServerOptions) -> DemoServer {
    DemoServer::start("127.0.0.1:0".parse().unwrap(), opts)
        .await
        .expect("start demo upstream")
}

/// Wait until `f` holds without letting virtual time pass: the runtime's other tasks and its
/// I/O run meanwhile (a lock released when popgate closes a connection). Bounded: 10 s of real
/// time, then panics naming `what`.
pub async fn settle(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "{what}: not in time");
        tokio::task::yield_now().await;
    }
}

/// How long [`let_io_land`] holds the clock, in real time.
const LANDING: Duration = Duration::from_millis(20);

/// Hold the paused clock for a moment of real time while the runtime goes on polling its
/// sockets, so that bytes just written land before virtual time may move. Under heavy load the
/// kernel may deliver a loopback packet late (its softirq work deferred to ksoftirqd); an idle
/// runtime would meanwhile jump the clock to the next timer, as if popgate had not heard from
/// the client in time. (Tokio does not advance the clock while a blocking task runs.) This
/// narrows the window, it does not close it: next to the metrics tests' flood of half-sent
/// heads, deliveries came more than 20 ms late.
pub async fn let_io_land() {
    tokio::task::spawn_blocking(|| std::thread::sleep(LANDING))
        .await
        .unwrap();
}

/// A line-at-a-time POP3 client on the test's runtime.
pub struct Pop {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
    /// The greeting line, without CRLF.
    pub greeting: String,
}

impl Pop {
    /// Connect to `addr` and read the greeting.
    pub async fn connect(addr: SocketAddr) -> Pop {
        let stream = TcpStream::connect(addr).await.unwrap();
        let_io_land().await;
        // As popgate and the demo server do: with Nagle a small write could wait for a
        // delayed ACK in real time while the paused clock runs ahead to the next timer.
        stream.set_nodelay(true).unwrap();
        let (r, w) = stream.into_split();
        let mut c = Pop {
            r: BufReader::new(r),
            w,
            greeting: String::new(),
        };
        c.greeting = c.line().await;
        c
    }

    /// One line without CRLF; empty at EOF. Panics when none comes within [`LINE_LIMIT`].
    pub async fn line(&mut self) -> String {
        let mut line = String::new();
        tokio::time::timeout(LINE_LIMIT, self.r.read_line(&mut line))
            .await
            .expect("a line (or EOF) comes")
            .unwrap_or(0);
        line.trim_end().to_owned()
    }

    /// Everything until the server closes. Panics when it does not within [`LINE_LIMIT`].
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        tokio::time::timeout(LINE_LIMIT, self.r.read_to_end(&mut rest))
            .await
            .expect("the connection ends")
            .unwrap();
        rest
    }

    /// Send `line` and CRLF (and [`let_io_land`]).
    pub async fn send(&mut self, line: &str) {
        self.w
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
        let_io_land().await;
    }

    /// Send `line`, read the one-line reply.
    pub async fn cmd(&mut self, line: &str) -> String {
        self.send(line).await;
        self.line().await
    }
}
