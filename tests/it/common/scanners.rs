//! Real content scanners for the tests: ClamAV's `clamd` (Debian `clamav-daemon`) and rspamd
//! (Debian `rspamd`), each started in the foreground with a temporary config on loopback and
//! killed when its guard is dropped.
//!
//! clamd loads only a custom signature ([`VIRUS_MARK`] in a message makes it report
//! [`VIRUS_NAME`]), so no virus database (and no freshclam download) is needed, and it starts
//! in about a second. [`Clamd::pause`], [`Clamd::kill`] and [`Clamd::restart`] make a scanner
//! that hangs, dies mid-scan or comes back.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A message containing this is infected for the test clamd.
pub const VIRUS_MARK: &str = "POPGATE-TEST-VIRUS-5f0c2a";
/// What the test clamd calls it (clamd adds `.UNOFFICIAL` to signatures of its own databases).
pub const VIRUS_NAME: &str = "Popgate.Test.Signature.UNOFFICIAL";
/// A message containing this (a line starting with a dot) is infected for the test clamd
/// ([`STUFFED_NAME`]); on the wire, dot-stuffed, the pattern is not there: it proves that the
/// scanner got the message un-stuffed.
pub const STUFFED_MARK: &str = "popgate-stuffed-line\r\n.dot-line";
/// What the test clamd calls [`STUFFED_MARK`].
pub const STUFFED_NAME: &str = "Popgate.Test.Stuffed.UNOFFICIAL";
/// Why a clamd test cannot run here.
pub const CLAMD_MISSING: &str =
    "clamd not found: run .ci/run (it installs clamav-daemon), or apt-get install clamav-daemon";

/// The clamd binary (`$CLAMD`, or `clamd` on PATH or in /usr/sbin).
pub fn clamd_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CLAMD") {
        return Some(PathBuf::from(p));
    }
    super::find_exe("clamd")
}

/// A clean message (CRLF), dot-free.
pub fn clean_mail() -> Vec<u8> {
    b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: hello\r\n\
      Message-ID: <clean-1@example.org>\r\n\r\nNothing to see here.\r\n"
        .to_vec()
}

/// A message the test clamd finds [`VIRUS_NAME`] in (CRLF, dot-free).
pub fn infected_mail() -> Vec<u8> {
    format!(
        "From: mallory@example.org\r\nTo: bob@example.org\r\nSubject: invoice\r\n\
         Message-ID: <infected-1@example.org>\r\n\r\nPlease open: {VIRUS_MARK}\r\n"
    )
    .into_bytes()
}

/// `msg` (CRLF lines) as a POP3 server sends it after `+OK`: lines starting with `.` get
/// another one; without the terminator line (as the spool holds it).
pub fn dot_stuff(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + 16);
    let mut line_start = true;
    for &b in msg {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    out
}

/// A running clamd; killed (and its files removed) on drop.
pub struct Clamd {
    dir: tempfile::TempDir,
    conf: PathBuf,
    child: Option<Child>,
    /// Its Unix socket.
    pub socket: PathBuf,
    /// Its TCP address on loopback.
    pub tcp: SocketAddr,
}

/// What a test clamd is started with.
#[derive(Debug, Clone)]
pub struct ClamdOpts {
    /// clamd's `StreamMaxLength`: a longer INSTREAM is refused (`... size limit exceeded`).
    pub stream_max_length: String,
}

impl Default for ClamdOpts {
    fn default() -> Self {
        ClamdOpts {
            stream_max_length: "100M".into(),
        }
    }
}

impl Clamd {
    /// Start one with the default options; waits until it answers `PING`.
    pub fn start() -> Clamd {
        Clamd::start_with(ClamdOpts::default())
    }

    /// Start one with `opts`; waits until it answers `PING`.
    pub fn start_with(opts: ClamdOpts) -> Clamd {
        let bin = clamd_binary().unwrap_or_else(|| panic!("{CLAMD_MISSING}"));
        let mut dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("db");
        std::fs::create_dir(&db).unwrap();
        let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
        std::fs::write(
            db.join("popgate-test.ndb"),
            format!(
                "Popgate.Test.Signature:0:*:{}\nPopgate.Test.Stuffed:0:*:{}\n",
                hex(VIRUS_MARK),
                hex(STUFFED_MARK)
            ),
        )
        .unwrap();
        let socket = dir.path().join("clamd.sock");
        let conf = dir.path().join("clamd.conf");
        // A port taken between free_port and clamd's bind: try another.
        for _ in 0..5 {
            let port = super::free_port();
            std::fs::write(
                &conf,
                format!(
                    "Foreground yes\nLocalSocket {sock}\nTCPSocket {port}\nTCPAddr 127.0.0.1\n\
                     DatabaseDirectory {db}\nLogFile {log}\nPidFile {pid}\n\
                     StreamMaxLength {max}\nMaxThreads 4\nSelfCheck 3600\n",
                    sock = socket.display(),
                    db = db.display(),
                    log = dir.path().join("clamd.log").display(),
                    pid = dir.path().join("clamd.pid").display(),
                    max = opts.stream_max_length,
                ),
            )
            .unwrap();
            let mut c = Clamd {
                conf: conf.clone(),
                child: None,
                socket: socket.clone(),
                tcp: SocketAddr::from(([127, 0, 0, 1], port)),
                dir,
            };
            if c.spawn(&bin) {
                return c;
            }
            dir = c.take_dir();
        }
        panic!("clamd did not start");
    }

    fn take_dir(mut self) -> tempfile::TempDir {
        self.stop();
        let placeholder = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, placeholder)
    }

    /// Start the process; true once it answers PING on both sockets.
    fn spawn(&mut self, bin: &Path) -> bool {
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new(bin)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn clamd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(c) = &mut self.child
                && let Ok(Some(_)) = c.try_wait()
            {
                self.child = None;
                return false;
            }
            if self.pings() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("clamd did not answer PING within 60 s: {}", self.log());
    }

    /// Whether it answers `PING` on its Unix socket and on TCP now.
    pub fn pings(&self) -> bool {
        let ask = |mut s: Box<dyn ReadWrite>| {
            s.write_all(b"zPING\0").is_ok() && {
                let mut buf = [0u8; 16];
                matches!(s.read(&mut buf), Ok(5) if &buf[..5] == b"PONG\0")
            }
        };
        let unix = UnixStream::connect(&self.socket)
            .ok()
            .map(|s| {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                ask(Box::new(s))
            })
            .unwrap_or(false);
        let tcp = std::net::TcpStream::connect_timeout(&self.tcp, Duration::from_secs(2))
            .ok()
            .map(|s| {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                ask(Box::new(s))
            })
            .unwrap_or(false);
        unix && tcp
    }

    /// `scanner.address` for its Unix socket: `unix:/...`.
    pub fn unix_address(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    /// `scanner.address` for its TCP socket: `127.0.0.1:port`.
    pub fn tcp_address(&self) -> String {
        self.tcp.to_string()
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
        }
    }

    /// Stop it (SIGSTOP): connections are still accepted by the kernel, nothing is answered;
    /// a scan hangs until [`Clamd::resume`] or its timeout.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Let a paused clamd go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Kill it (SIGKILL) and reap it: scans in progress see their connection reset, later
    /// ones cannot connect.
    pub fn kill(&mut self) {
        self.stop();
    }

    /// Start it again after [`Clamd::kill`], on the same socket and port; waits until it
    /// answers `PING`.
    pub fn restart(&mut self) {
        self.stop();
        let bin = clamd_binary().unwrap_or_else(|| panic!("{CLAMD_MISSING}"));
        assert!(self.spawn(&bin), "clamd did not restart: {}", self.log());
    }

    /// clamd's log file.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("clamd.log")).unwrap_or_default()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Clamd {
    fn drop(&mut self) {
        self.stop();
    }
}

trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}
