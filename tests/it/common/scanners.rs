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

/// A message containing this gets 10 points from the test rspamd: action `add header`.
pub const SPAM_MARK: &str = "POPGATE-TEST-SPAM-4d1e";
/// A message containing this gets 20 points from the test rspamd: action `reject`.
pub const REJECT_MARK: &str = "POPGATE-TEST-REJECT-4d1e";
/// A message with a line that is this (it starts with a dot) gets 10 points from the test
/// rspamd; on the wire, dot-stuffed, the line is not there: rspamd got the message un-stuffed.
pub const STUFFED_SPAM_LINE: &str = ".popgate-stuffed-spam-line";
/// The test rspamd's thresholds: `add header` at 6 points, `reject` at 15.
pub const RSPAMD_REJECT_SCORE: f64 = 15.0;
/// Why an rspamd test cannot run here.
pub const RSPAMD_MISSING: &str =
    "rspamd not found: run .ci/run (it installs rspamd), or apt-get install rspamd";

/// A message the test rspamd calls spam ([`SPAM_MARK`]: `add header`, 10 points).
pub fn spam_mail() -> Vec<u8> {
    format!(
        "From: spammer@example.org\r\nTo: bob@example.org\r\nSubject: cheap\r\n\
         Message-ID: <spam-1@example.org>\r\n\r\nBuy now: {SPAM_MARK}\r\n"
    )
    .into_bytes()
}

/// A running rspamd (one normal worker on a loopback port, a minimal config of its own: only
/// the test rules, no DNS, no Redis); its process group is killed on drop.
pub struct Rspamd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Where its normal worker listens.
    pub addr: SocketAddr,
}

impl Rspamd {
    /// Start one; waits until it answers `/ping` (about a second).
    pub fn start() -> Rspamd {
        use std::os::unix::process::CommandExt as _;
        let bin = super::find_exe("rspamd").unwrap_or_else(|| panic!("{RSPAMD_MISSING}"));
        let mut dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path().to_owned();
        std::fs::write(
            d.join("rules.lua"),
            format!(
                "local function mark(m)\n\
                 \x20 return function(task)\n\
                 \x20   local c = task:get_content()\n\
                 \x20   return c ~= nil and tostring(c):find(m, 1, true) ~= nil\n\
                 \x20 end\n\
                 end\n\
                 rspamd_config.POPGATE_TEST_SPAM = {{ callback = mark('{SPAM_MARK}'), \
                 score = 10.0, description = 'popgate test spam mark' }}\n\
                 rspamd_config.POPGATE_TEST_REJECT = {{ callback = mark('{REJECT_MARK}'), \
                 score = 20.0, description = 'popgate test reject mark' }}\n\
                 rspamd_config.POPGATE_TEST_STUFFED = {{ callback = mark('\\n{STUFFED_SPAM_LINE}'), \
                 score = 10.0, description = 'popgate test: a line that starts with a dot' }}\n"
            ),
        )
        .unwrap();
        // The full public suffix list takes rspamd ~20 s to compile: a short one will do.
        std::fs::write(d.join("tld.dat"), "com\norg\nnet\n").unwrap();
        for _ in 0..5 {
            let port = super::free_port();
            std::fs::write(
                d.join("rspamd.conf"),
                format!(
                    "lua = \"{d}/rules.lua\";\n\
                     options {{\n  pidfile = \"{d}/rspamd.pid\";\n  url_tld = \"{d}/tld.dat\";\n\
                     \x20 tempdir = \"{d}\";\n\
                     \x20 dns {{ nameserver = [\"127.0.0.1:1\"]; timeout = 1s; retransmits = 1; }}\n}}\n\
                     logging {{ type = \"file\"; filename = \"{d}/rspamd.log\"; level = \"info\"; }}\n\
                     worker \"normal\" {{ bind_socket = \"127.0.0.1:{port}\"; count = 1; \
                     task_timeout = 20s; }}\n\
                     actions {{ reject = {RSPAMD_REJECT_SCORE}; add_header = 6; greylist = 4; }}\n",
                    d = d.display()
                ),
            )
            .unwrap();
            // Its own process group: rspamd forks workers, all of them go on drop.
            let child = Command::new(&bin)
                .args(["-f", "-i", "-u", "root", "-g", "root", "-c"])
                .arg(d.join("rspamd.conf"))
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn rspamd");
            let mut r = Rspamd {
                dir,
                child: Some(child),
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
            };
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if r.pings() {
                    return r;
                }
                if let Some(c) = &mut r.child
                    && let Ok(Some(_)) = c.try_wait()
                {
                    break; // the port was taken: try another
                }
                assert!(
                    Instant::now() < deadline,
                    "rspamd did not answer /ping within 60 s: {}",
                    r.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            r.stop();
            let placeholder = tempfile::tempdir().unwrap();
            dir = std::mem::replace(&mut r.dir, placeholder);
        }
        panic!("rspamd did not start");
    }

    /// Whether its worker answers `GET /ping` now.
    pub fn pings(&self) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))
        else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /ping HTTP/1.1\r\nHost: rspamd\r\nConnection: close\r\n\r\n")
            .is_err()
        {
            return false;
        }
        // Read until the answer is there (the connection may stay open).
        let mut reply = Vec::new();
        let mut buf = [0u8; 512];
        while let Ok(n @ 1..) = s.read(&mut buf) {
            reply.extend_from_slice(&buf[..n]);
            if reply.starts_with(b"HTTP/1.1 200") && reply.windows(4).any(|w| w == b"pong") {
                return true;
            }
        }
        false
    }

    /// `scanner.address`: `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([sig, "--", &format!("-{}", c.id())])
                .status();
        }
    }

    /// Stop all its processes (SIGSTOP): connections are accepted, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Let a paused rspamd go on.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Kill all its processes.
    pub fn kill(&mut self) {
        self.stop();
    }

    /// rspamd's log file.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("rspamd.log")).unwrap_or_default()
    }

    fn stop(&mut self) {
        self.signal("-KILL");
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
            // The worker is a child of the main process: it is gone (its socket closed) a
            // moment after the main one is reaped. Until then a connection would be accepted
            // and reset instead of refused.
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200))
                .is_ok()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Rspamd {
    fn drop(&mut self) {
        self.stop();
    }
}
