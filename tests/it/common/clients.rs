//! Drivers for real POP3 clients: curl, Python's poplib, fetchmail, mpop, and a raw socket
//! client.
//!
//! Every external client is bounded in time ([`CLIENT_LIMIT`]) and killed when it overruns; a
//! client that hangs makes the test panic with whatever it printed so far.
//!
//! What each client hands back for `RETR` of a message stored with LF line ends (Dovecot sends
//! it as CRLF lines, dot-stuffed, ending in `.\r\n`):
//! - curl: the body with CRLF line ends, dot-unstuffed, without the `+OK` line and without the
//!   closing `.` line; equal to `dovecot::served(msg)`. `LIST`/`UIDL` output is the raw listing
//!   lines with CRLF (no `+OK`, no `.`).
//! - poplib: a list of lines without line ends, dot-unstuffed ([`poplib`] returns them base64'd;
//!   `data_b64` joins them with CRLF plus a final CRLF: again `served(msg)`).
//! - fetchmail (`--mda`): the message with LF line ends, dot-unstuffed, nothing added
//!   (`--invisible` drops the Received header, `--norewrite` keeps addresses): the stored file.
//! - mpop (`delivery mda`, `received_header off`): the message with LF line ends,
//!   dot-unstuffed, nothing added: again the stored file.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;

/// How long any external client may run before it is killed.
pub const CLIENT_LIMIT: Duration = Duration::from_secs(30);

/// Runs `cmd` with `stdin` (or /dev/null), collecting stdout and stderr; kills it and panics
/// (showing its output) if it runs longer than `limit`.
pub fn run_bounded(cmd: &mut Command, stdin: Option<&[u8]>, limit: Duration) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let writer = stdin.map(|data| {
        let mut pipe = child.stdin.take().expect("stdin pipe");
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    let reader = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let out_thread = reader(Box::new(child.stdout.take().expect("stdout pipe")));
    let err_thread = reader(Box::new(child.stderr.take().expect("stderr pipe")));
    let deadline = Instant::now() + limit;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait after kill");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = out_thread.join().expect("stdout reader");
    let stderr = err_thread.join().expect("stderr reader");
    if timed_out {
        panic!(
            "{cmd:?} did not finish within {limit:?}\n--- stdout (end) ---\n{}\n--- stderr (end) ---\n{}",
            tail(&String::from_utf8_lossy(&stdout), 4000),
            tail(&String::from_utf8_lossy(&stderr), 4000)
        );
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

fn check(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({})\n--- stdout (end) ---\n{}\n--- stderr (end) ---\n{}",
        out.status,
        tail(&String::from_utf8_lossy(&out.stdout), 4000),
        tail(&String::from_utf8_lossy(&out.stderr), 4000)
    );
}

// ---------------------------------------------------------------------------------------------
// curl

/// `scheme://addr/path`; IPv6 addresses come out in brackets (`pop3://[::1]:1110/1`).
pub fn url(scheme: &str, addr: SocketAddr, path: &str) -> String {
    format!("{scheme}://{addr}/{path}")
}

/// Runs `curl -s -S --max-time 30 ARGS...` and returns its output whatever the exit status
/// (e.g. 67 = login denied, 35 = TLS handshake failed, 60 = certificate not trusted,
/// 64 = `--ssl-reqd` but no STLS offered).
///
/// Useful args: `-u user:pass`, `--ssl-reqd` (STLS or fail), `--cacert ca.pem`,
/// `pop3s://` URLs (implicit TLS), `--login-options AUTH=PLAIN|LOGIN|+APOP`, `-v`.
/// By default curl logs in with the best SASL mechanism in CAPA (CRAM-MD5 on Dovecot), else
/// APOP if the greeting has a timestamp, else USER/PASS.
pub fn curl(args: &[&str]) -> Output {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-S", "--max-time", "30"]).args(args);
    run_bounded(&mut cmd, None, CLIENT_LIMIT + Duration::from_secs(5))
}

/// Like [`curl`], panicking unless curl exits 0; returns stdout.
pub fn curl_ok(args: &[&str]) -> Vec<u8> {
    let out = curl(args);
    check(&format!("curl {args:?}"), &out);
    out.stdout
}

/// `LIST` via curl: the listing lines (`"1 123\r\n2 456\r\n"`), without `+OK` and `.`.
pub fn curl_list(addr: SocketAddr, user: &str, pass: &str) -> String {
    let up = format!("{user}:{pass}");
    let out = curl_ok(&["-u", &up, &url("pop3", addr, "")]);
    String::from_utf8(out).expect("LIST output is not UTF-8")
}

/// `RETR n` via curl: the message with CRLF line ends, dot-unstuffed, no `+OK`, no final `.`.
pub fn curl_retr(addr: SocketAddr, user: &str, pass: &str, n: usize) -> Vec<u8> {
    let up = format!("{user}:{pass}");
    curl_ok(&["-u", &up, &url("pop3", addr, &n.to_string())])
}

/// `DELE n` then `QUIT` via curl (`-X DELE -I pop3://.../n`: `-I` tells curl the answer is a
/// single line). The message is gone once this returns.
pub fn curl_dele(addr: SocketAddr, user: &str, pass: &str, n: usize) {
    let up = format!("{user}:{pass}");
    curl_ok(&[
        "-u",
        &up,
        "-X",
        "DELE",
        "-I",
        &url("pop3", addr, &n.to_string()),
    ]);
}

// ---------------------------------------------------------------------------------------------
// Python poplib

/// Path of the poplib driver script.
pub fn pop_py() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/pop.py"))
}

/// A poplib spec for `addr` with USER/PASS login and no actions yet; add `mode`, `cafile`,
/// `login`, `actions`... to it (see tests/clients/pop.py for the format).
pub fn poplib_spec(addr: SocketAddr, user: &str, pass: &str) -> Value {
    serde_json::json!({
        "host": addr.ip().to_string(),
        "port": addr.port(),
        "user": user,
        "pass": pass,
        "actions": [],
    })
}

/// Runs tests/clients/pop.py with `spec` and returns its JSON result:
/// `{"welcome", "tls", "login", "results": [...], "implicit_quit"}` (or `connect_error`).
pub fn poplib(spec: Value) -> Value {
    let mut cmd = Command::new("python3");
    cmd.arg(pop_py());
    let input = serde_json::to_vec(&spec).expect("serialize spec");
    let out = run_bounded(
        &mut cmd,
        Some(&input),
        CLIENT_LIMIT + Duration::from_secs(10),
    );
    check("python3 pop.py", &out);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "pop.py printed no JSON ({e}): {}\n{}",
            tail(&String::from_utf8_lossy(&out.stdout), 4000),
            tail(&String::from_utf8_lossy(&out.stderr), 4000)
        )
    })
}

/// `v` as JSON with every string longer than 200 characters replaced by `"<N chars>"`: for
/// assertion messages about results that hold whole messages.
pub fn brief(v: &Value) -> String {
    fn shrink(v: &Value) -> Value {
        match v {
            Value::String(s) if s.len() > 200 => Value::String(format!("<{} chars>", s.len())),
            Value::Array(a) if a.len() > 50 => Value::String(format!("<{} items>", a.len())),
            Value::Array(a) => Value::Array(a.iter().map(shrink).collect()),
            Value::Object(o) => {
                Value::Object(o.iter().map(|(k, v)| (k.clone(), shrink(v))).collect())
            }
            other => other.clone(),
        }
    }
    shrink(v).to_string()
}

/// Decodes a base64 JSON string from a poplib result (`data_b64`, an element of `lines_b64`).
pub fn b64(v: &Value) -> Vec<u8> {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("not a base64 string: {v}"));
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("bad base64 from pop.py")
}

/// The lines of a multi-line poplib result, decoded (no line ends, dot-unstuffed).
pub fn b64_lines(result: &Value) -> Vec<Vec<u8>> {
    result["lines_b64"]
        .as_array()
        .unwrap_or_else(|| panic!("no lines_b64 in {result}"))
        .iter()
        .map(b64)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// fetchmail and mpop: a config file in a temp home, one run, the messages its MDA got

/// What one run of fetchmail or mpop did. Its `Debug` shows message sizes and the end of the
/// output only.
pub struct MdaRun {
    /// Exit status. fetchmail: 0 mail delivered, 1 no mail, 2 socket/TLS error, 3
    /// authentication failed...; mpop (sysexits.h): 0 success (mail or none), 69 service
    /// unavailable, 76 protocol error, 77 authentication failed...
    pub status: i32,
    /// The delivered messages in order, as the MDA got them.
    pub messages: Vec<Vec<u8>>,
    /// The protocol trace: fetchmail's `-v` (`POP3> ...` / `POP3< ...`; passwords shown as
    /// `*`), mpop's `--debug` (`<-- ...` / `--> ...`; it shows the PASS argument: test
    /// passwords only) and its messages.
    pub stdout: String,
    pub stderr: String,
}

impl MdaRun {
    /// stdout and stderr together (fetchmail's warnings go to either, depending on `-v`).
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Debug for MdaRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sizes: Vec<usize> = self.messages.iter().map(Vec::len).collect();
        f.debug_struct("MdaRun")
            .field("status", &self.status)
            .field("message_sizes", &sizes)
            .field("stdout_tail", &tail(&self.stdout, 3000))
            .field("stderr_tail", &tail(&self.stderr, 3000))
            .finish()
    }
}

/// The last `n` bytes of `s` or so (cut at a char boundary).
pub fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// `s` in double quotes, `\` and `"` escaped: a value in a fetchmail or mpop config file.
fn rc_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Where one run of fetchmail or mpop keeps its files: a temp dir that is its HOME, its
/// config file in there (written mode 0600) and the MDA script, which files each message it is
/// handed in `out/` (the client delivers one message at a time, so counting the files gives
/// the order).
struct MdaHome<'a> {
    home: &'a Path,
    rc: &'a Path,
    mda: &'a Path,
}

/// Runs a client once in a fresh [`MdaHome`] and returns what its MDA got: `rc` gives the text
/// of its config file `rc_name`, `command` the command line.
fn run_with_mda(
    prefix: &str,
    rc_name: &str,
    rc: impl FnOnce(&MdaHome<'_>) -> String,
    command: impl FnOnce(&MdaHome<'_>) -> Command,
) -> MdaRun {
    let home = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir for the client");
    let out_dir = home.path().join("out");
    std::fs::create_dir(&out_dir).expect("mkdir out");
    let mda = home.path().join("mda.sh");
    std::fs::write(
        &mda,
        format!(
            "#!/bin/sh\nd='{}'\nn=$(ls \"$d\" | wc -l)\nexec cat > \"$d/$(printf %06d \"$n\")\"\n",
            out_dir.display()
        ),
    )
    .expect("write mda");
    std::fs::set_permissions(&mda, std::fs::Permissions::from_mode(0o755)).expect("chmod mda");
    let rc_path = home.path().join(rc_name);
    let at = MdaHome {
        home: home.path(),
        rc: &rc_path,
        mda: &mda,
    };
    std::fs::write(&rc_path, rc(&at)).expect("write the config file");
    std::fs::set_permissions(&rc_path, std::fs::Permissions::from_mode(0o600)).expect("chmod rc");

    let mut cmd = command(&at);
    cmd.env("HOME", home.path());
    let out = run_bounded(&mut cmd, None, CLIENT_LIMIT);

    let mut files: Vec<_> = std::fs::read_dir(&out_dir)
        .expect("read out dir")
        .map(|e| e.expect("dir entry").path())
        .collect();
    files.sort();
    MdaRun {
        status: out.status.code().unwrap_or(-1),
        messages: files
            .iter()
            .map(|p| std::fs::read(p).expect("read delivered message"))
            .collect(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs fetchmail once (no daemon) against `addr` and returns what it delivered.
///
/// Fixed options: `-v -N --nosyslog --invisible --norewrite -p POP3 --port P -u USER --fetchall
/// --mda <script>` plus `--keep` or `--nokeep`; HOME and FETCHMAILHOME are a temp dir holding
/// the rcfile (mode 0600, password only), the lock (`--pidfile`) and the id file.
///
/// fetchmail upgrades with STLS on its own whenever CAPA lists STLS, and then checks the
/// certificate against the system store and fails. So unless `extra` has an option starting
/// with `--ssl` (e.g. `["--sslcertfile", ca]`, `["--ssl", "--sslcertfile", ca]` for implicit
/// TLS), `--sslproto ''` is added: plaintext only.
pub fn fetchmail_run(
    addr: SocketAddr,
    user: &str,
    pass: &str,
    keep: bool,
    extra: &[&str],
) -> MdaRun {
    let host = addr.ip().to_string();
    let rc = |_: &MdaHome<'_>| {
        format!(
            "poll {} user {} password {}\n",
            rc_quote(&host),
            rc_quote(user),
            rc_quote(pass)
        )
    };
    run_with_mda("fm", "fetchmailrc", rc, |at| {
        let port = addr.port().to_string();
        let mut cmd = Command::new("fetchmail");
        cmd.env("FETCHMAILHOME", at.home)
            .arg("-f")
            .arg(at.rc)
            // Run as root, fetchmail locks /var/run/fetchmail.pid whatever FETCHMAILHOME says,
            // and a second fetchmail (a test running in parallel) exits 8: lock per run instead.
            .arg("--pidfile")
            .arg(at.home.join("fetchmail.pid"))
            .args(["-v", "-N", "--nosyslog", "--invisible", "--norewrite"])
            .args(["-p", "POP3", "--port", &port, "-u", user, "--fetchall"])
            .arg("--mda")
            .arg(at.mda)
            .arg(if keep { "--keep" } else { "--nokeep" });
        if !extra.iter().any(|a| a.starts_with("--ssl")) {
            cmd.args(["--sslproto", ""]);
        }
        cmd.args(extra).arg(&host);
        cmd
    })
}

/// [`fetchmail_run`], panicking unless fetchmail exits 0 (mail) or 1 (no mail); returns the
/// delivered messages in order (LF line ends, dot-unstuffed, as stored by Dovecot).
pub fn fetchmail(
    addr: SocketAddr,
    user: &str,
    pass: &str,
    keep: bool,
    extra: &[&str],
) -> Vec<Vec<u8>> {
    let run = fetchmail_run(addr, user, pass, keep, extra);
    assert!(
        run.status == 0 || run.status == 1,
        "fetchmail exited {}: {run:?}",
        run.status
    );
    run.messages
}

/// Runs mpop once (`--debug`) against `addr` and returns what it delivered.
///
/// The config file (mode 0600, in a temp dir that is also HOME) has one account with `tls off`,
/// `auth user` (USER/PASS), `received_header off`, `only_new off` (every message, whatever an
/// earlier run got: the UIDL file is fresh anyway), `keep on|off`, `timeout 30` and `delivery
/// mda` into numbered files; `extra` lines (e.g. `pipelining off`) come last.
pub fn mpop_run(addr: SocketAddr, user: &str, pass: &str, keep: bool, extra: &[&str]) -> MdaRun {
    let rc = |at: &MdaHome<'_>| {
        let mut rc = format!(
            "account test\nhost {}\nport {}\nuser {}\npassword {}\ntls off\nauth user\n\
             received_header off\nonly_new off\nkeep {}\ntimeout 30\nuidls_file {}\n\
             delivery mda {}\n",
            addr.ip(),
            addr.port(),
            rc_quote(user),
            rc_quote(pass),
            if keep { "on" } else { "off" },
            at.home.join("uidls").display(),
            at.mda.display(),
        );
        for line in extra {
            rc.push_str(line);
            rc.push('\n');
        }
        rc
    };
    run_with_mda("mpop", "mpoprc", rc, |at| {
        let mut cmd = Command::new("mpop");
        cmd.arg("-C").arg(at.rc).args(["--debug", "test"]);
        cmd
    })
}

// ---------------------------------------------------------------------------------------------
// raw sockets

/// Connects, sends every line of `script` (CRLF added) in one write — pipelined — and returns
/// everything received until the server closes, 10 s pass without data, or 30 s in all.
pub fn pop_raw(addr: SocketAddr, script: &[&str]) -> Vec<u8> {
    let mut input = Vec::new();
    for line in script {
        input.extend_from_slice(line.as_bytes());
        input.extend_from_slice(b"\r\n");
    }
    pop_raw_bytes(addr, &input, Duration::from_secs(10))
}

/// Like [`pop_raw`] with arbitrary bytes and a chosen idle limit.
pub fn pop_raw_bytes(addr: SocketAddr, input: &[u8], idle: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(idle)).expect("set_read_timeout");
    s.set_write_timeout(Some(CLIENT_LIMIT))
        .expect("set_write_timeout");
    // Write from a thread: a large script must not deadlock against unread responses.
    let mut w = s.try_clone().expect("clone socket");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&input);
    });
    let deadline = Instant::now() + CLIENT_LIMIT;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                break;
            }
            Err(_) => break,
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    out
}

/// A hand-driven POP3 connection, for step-by-step tests. Reads time out after 30 s (panic).
pub struct RawPop {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The greeting line, without CRLF.
    pub greeting: String,
}

/// A TCP connection to `to` from the local address `from` (any 127.0.0.0/8 address works on
/// Linux loopback: a test can be several clients), connected within 5 s.
pub fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )
    .expect("socket");
    socket
        .bind(&SocketAddr::new(from, 0).into())
        .unwrap_or_else(|e| panic!("bind {from}: {e}"));
    socket
        .connect_timeout(&to.into(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {to} from {from}: {e}"));
    socket.into()
}

impl RawPop {
    /// Connects and reads the greeting.
    pub fn connect(addr: SocketAddr) -> RawPop {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        let mut raw = RawPop::over(s);
        raw.greeting = raw.line();
        raw
    }

    /// A client on an open connection, before the greeting is read (e.g. after sending a
    /// PROXY header, or from [`connect_from`]); reads time out after [`CLIENT_LIMIT`].
    pub fn over(s: TcpStream) -> RawPop {
        s.set_read_timeout(Some(CLIENT_LIMIT))
            .expect("set_read_timeout");
        RawPop {
            writer: s.try_clone().expect("clone socket"),
            reader: BufReader::new(s),
            greeting: String::new(),
        }
    }

    /// Sends `line` plus CRLF.
    pub fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\r\n").as_bytes());
    }

    /// Sends bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write to server");
    }

    /// Sends bytes to a server that may have closed already (an attack that popgate cuts
    /// short: a closing denial): a write error is not the test's failure.
    pub fn send_raw_lenient(&mut self, bytes: &[u8]) {
        let _ = self.writer.write_all(bytes);
    }

    /// One line, raw, including its line end (empty at EOF).
    pub fn line_raw(&mut self) -> Vec<u8> {
        let mut line = Vec::new();
        self.reader
            .read_until(b'\n', &mut line)
            .expect("read from server");
        line
    }

    /// One line without its CRLF, lossy UTF-8 (empty at EOF).
    pub fn line(&mut self) -> String {
        let raw = self.line_raw();
        let s = String::from_utf8_lossy(&raw);
        s.trim_end_matches(['\r', '\n']).to_string()
    }

    /// Sends `line` and reads the one-line answer.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(line);
        self.line()
    }

    /// Reads a multi-line body up to and excluding the `.\r\n` line, raw (still dot-stuffed).
    pub fn body(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line = self.line_raw();
            assert!(
                !line.is_empty(),
                "connection closed inside a multi-line answer"
            );
            if line == b".\r\n" {
                return body;
            }
            body.extend_from_slice(&line);
        }
    }

    /// Sends `line`; returns the status line and, if it is `+OK`, the raw body.
    pub fn cmd_multi(&mut self, line: &str) -> (String, Option<Vec<u8>>) {
        let status = self.cmd(line);
        if status.starts_with("+OK") {
            let body = self.body();
            (status, Some(body))
        } else {
            (status, None)
        }
    }

    /// Everything until the server closes (or the read timeout).
    pub fn read_to_end(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = self.reader.read_to_end(&mut out);
        out
    }

    /// Closes both directions without QUIT.
    pub fn abort(self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Both);
    }
}

/// The `subject=` line of the certificate served at `addr` for SNI `servername` (openssl s_client).
pub fn served_cert_subject(addr: SocketAddr, servername: &str, ca: &Path) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &addr.to_string(),
        "-servername",
        servername,
        "-CAfile",
    ])
    .arg(ca);
    let out = run_bounded(&mut cmd, Some(b"QUIT\r\n"), Duration::from_secs(20));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.starts_with("subject="))
        .unwrap_or_else(|| panic!("no subject in {text}"))
        .to_string()
}
