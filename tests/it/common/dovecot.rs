//! A real Dovecot POP3 server as the upstream in tests.
//!
//! Each [`Dovecot`] is a separate `dovecot -F` master with its own config, base_dir, state_dir,
//! log, mail and ports, so tests running in parallel threads do not see each other.
//!
//! Dovecot runs as root here (CI does); `default_internal_user` (`dovecot`) and
//! `default_login_user` (`dovenull`) are left at their defaults, the users the Debian package
//! creates. Mail belongs to `nobody` (65534), which the static userdb maps every user to.
//!
//! Things worth knowing about Dovecot (2.3.19, Debian 12) as an upstream:
//! - Maildir files are written with LF line ends; Dovecot serves them with CRLF and dot-stuffs
//!   on RETR/TOP. [`served`] gives the CRLF form, [`dot_stuffed`] the form on the wire.
//! - A connection whose remote IP equals its local IP (127.0.0.1 -> 127.0.0.1) counts as
//!   "secured", so even `ssl = required` allows plaintext logins from it. That is why an
//!   `ssl_required` Dovecot listens on 127.0.0.2 by default: connections to it come from
//!   127.0.0.1 and are refused plaintext (`-ERR [AUTH] Plaintext authentication disallowed ...`,
//!   and APOP gets `-ERR [AUTH] Authentication not allowed until SSL/TLS is enabled.`).
//! - CAPA before login lists `STLS`, `USER` and `SASL PLAIN LOGIN CRAM-MD5` (APOP is offered by
//!   the `<...>` timestamp in the greeting, not in CAPA); after login it lists neither.
//! - UIDLs follow `pop3_uidl_format = %08Xu%08Xv`: 8 hex digits of the UID, then of the
//!   UIDVALIDITY (which is time-based, so it differs between instances).
//! - DELE without a following QUIT deletes nothing; the file goes away on QUIT.
//! - Failed logins are answered at once here (`auth_failure_delay = 0`; Dovecot's default
//!   waits 2 s).

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::certs::TestPki;

/// The message to panic with when Dovecot is missing.
pub const NOT_INSTALLED: &str =
    "dovecot not installed: run .ci/run or apt-get install dovecot-pop3d";

/// How a test Dovecot is set up.
#[derive(Clone, Debug, Default)]
pub struct DovecotOpts {
    /// `(user, password, messages)`. Passwords are stored `{PLAIN}` so APOP and CRAM-MD5 work.
    /// Messages become maildir files in this order (message 1 first); CRLF is written as LF,
    /// as in real maildirs, and Dovecot serves it as CRLF again.
    pub users: Vec<(String, String, Vec<Vec<u8>>)>,
    /// `ssl = required`: no login of any kind before STLS / outside 995.
    /// Also moves the default listen address to 127.0.0.2 (see the module notes).
    pub ssl_required: bool,
    /// Address of both listeners; default 127.0.0.1 (127.0.0.2 when `ssl_required`).
    pub listen: Option<IpAddr>,
    /// Raw lines appended to dovecot.conf (e.g. `pop3_lock_session = yes`, or
    /// `auth_failure_delay = 2s` to get back Dovecot's delay, set to 0 here).
    pub extra_conf: String,
    /// Raw lines put inside `inet_listener pop3 { }`.
    pub pop3_listener_extra: String,
    /// Two more listeners that expect a PROXY header (`haproxy = yes`) from 127.0.0.1
    /// (`haproxy_trusted_networks`): plain [`Dovecot::pop3_haproxy`] and implicit-TLS
    /// [`Dovecot::pop3s_haproxy`] (header before the handshake).
    pub haproxy_listener: bool,
    /// OAuth2-only Dovecot: `passdb { driver = oauth2 }` validating tokens by RFC 7662
    /// introspection (`introspection_mode = post`) at this URL (`http://id:secret@host/path`,
    /// basic auth from the URL), `auth_mechanisms = xoauth2 oauthbearer`, no password passdb.
    /// The users' passwords are then unused (their mail is still written).
    pub oauth2_introspection_url: Option<String>,
}

impl DovecotOpts {
    /// A Dovecot that trusts popgate (127.0.0.1) to name the client: XCLIENT
    /// (`login_trusted_networks`) and PROXY headers on the extra `haproxy = yes` listeners.
    pub fn trusting_popgate() -> DovecotOpts {
        DovecotOpts {
            haproxy_listener: true,
            extra_conf: "login_trusted_networks = 127.0.0.1/32\n".into(),
            ..DovecotOpts::default()
        }
    }

    /// An OAuth2-only Dovecot (see [`DovecotOpts::oauth2_introspection_url`]).
    pub fn oauth2(introspection_url: &str) -> DovecotOpts {
        DovecotOpts {
            oauth2_introspection_url: Some(introspection_url.to_string()),
            ..DovecotOpts::default()
        }
    }

    /// Adds a user (builder style).
    pub fn user(mut self, name: &str, password: &str, messages: Vec<Vec<u8>>) -> Self {
        self.users
            .push((name.to_string(), password.to_string(), messages));
        self
    }
}

/// A running Dovecot; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Dovecot {
    /// Plain POP3 listener (STLS offered).
    pub pop3: SocketAddr,
    /// Implicit-TLS POP3 listener (like port 995).
    pub pop3s: SocketAddr,
    /// The plain `haproxy = yes` listener, with [`DovecotOpts::haproxy_listener`].
    pub pop3_haproxy: Option<SocketAddr>,
    /// The implicit-TLS `haproxy = yes` listener, with [`DovecotOpts::haproxy_listener`].
    pub pop3s_haproxy: Option<SocketAddr>,
    /// Holds config, log, run dir and mail.
    pub dir: TempDir,
    /// The CA that signed Dovecot's certificate (for `localhost`, 127.0.0.1, 127.0.0.2, ::1).
    pub pki: TestPki,
    child: Child,
}

impl Dovecot {
    /// Writes the config and mail, starts `dovecot -F`, and waits (at most 10 s) for the
    /// `+OK` greeting on the POP3 port. Panics with the log if it does not come up.
    pub fn start(opts: DovecotOpts) -> Dovecot {
        let exe = super::find_exe("dovecot").unwrap_or_else(|| panic!("{NOT_INSTALLED}"));
        // A short path: base_dir holds unix sockets (108-byte limit), so stay out of a long TMPDIR.
        let dir = tempfile::Builder::new()
            .prefix("dv")
            .tempdir_in("/tmp")
            .expect("create dovecot temp dir");
        // Login processes (dovenull) and mail processes (nobody) must traverse it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod dovecot dir");
        let pki = TestPki::new();
        let (cert, key) = pki.issue(&["localhost", "127.0.0.1", "127.0.0.2", "::1"]);
        write_passwd(dir.path(), &opts);
        write_mail(dir.path(), &opts);
        let ip = opts.listen.unwrap_or(if opts.ssl_required {
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))
        } else {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        });

        let mut attempt = 0;
        loop {
            attempt += 1;
            let ports = distinct_ports(ip, 4);
            let (pop3, pop3s) = (SocketAddr::new(ip, ports[0]), SocketAddr::new(ip, ports[1]));
            let haproxy = opts
                .haproxy_listener
                .then(|| (SocketAddr::new(ip, ports[2]), SocketAddr::new(ip, ports[3])));
            let conf = config(dir.path(), &opts, pop3, pop3s, haproxy, &cert, &key);
            let conf_path = dir.path().join("dovecot.conf");
            std::fs::write(&conf_path, conf).expect("write dovecot.conf");
            let out = std::fs::File::create(dir.path().join("stderr.log")).expect("stderr.log");
            let mut child = Command::new(&exe)
                .arg("-F")
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("dup log fd"))
                .stderr(out)
                .spawn()
                .expect("spawn dovecot");
            match wait_ready(&mut child, pop3, pop3s, Duration::from_secs(10)) {
                Ok(()) => {
                    return Dovecot {
                        pop3,
                        pop3s,
                        pop3_haproxy: haproxy.map(|h| h.0),
                        pop3s_haproxy: haproxy.map(|h| h.1),
                        dir,
                        pki,
                        child,
                    };
                }
                Err(why) => {
                    stop_child(&mut child);
                    let logs = all_logs(dir.path());
                    if attempt < 3 && logs.contains("Address already in use") {
                        // Someone took a port between free_port() and Dovecot's bind: new ports.
                        continue;
                    }
                    panic!("dovecot did not come up: {why}\n--- dovecot logs ---\n{logs}");
                }
            }
        }
    }

    /// The plain POP3 address (same as `self.pop3`).
    pub fn addr(&self) -> SocketAddr {
        self.pop3
    }

    /// The CA certificate that Dovecot's certificate chains to.
    pub fn ca_path(&self) -> &Path {
        self.pki.ca_path()
    }

    /// `user`'s Maildir.
    pub fn maildir(&self, user: &str) -> PathBuf {
        maildir(self.dir.path(), user)
    }

    /// How many messages `user` has on disk (files in Maildir/cur and Maildir/new).
    pub fn message_count(&self, user: &str) -> usize {
        let md = self.maildir(user);
        ["cur", "new"]
            .iter()
            .map(|sub| {
                std::fs::read_dir(md.join(sub))
                    .map(|rd| {
                        rd.filter_map(Result::ok)
                            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                            .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
                            .count()
                    })
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Drops a new message into `user`'s Maildir/new while Dovecot runs; it is seen by the
    /// next session, after the existing messages.
    pub fn deliver(&self, user: &str, message: &[u8]) {
        let md = self.maildir(user);
        let n = std::fs::read_dir(md.join("new"))
            .map(|r| r.count())
            .unwrap_or(0)
            + std::fs::read_dir(md.join("cur"))
                .map(|r| r.count())
                .unwrap_or(0);
        let name = format!("{}.M{n}P2.popgate", 2_000_000_000u64 + n as u64);
        let tmp = md.join("tmp").join(&name);
        std::fs::write(&tmp, lf_only(message)).expect("write message");
        chown_nobody(&tmp);
        std::fs::rename(&tmp, md.join("new").join(&name)).expect("move message to new/");
    }

    /// The `rip=` (client address) of each `Login:` line in Dovecot's log, in order.
    pub fn login_rips(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains("Login: user=<"))
            .filter_map(|l| l.split("rip=").nth(1))
            .map(|r| r.split(',').next().unwrap_or_default().to_owned())
            .collect()
    }

    /// Dovecot's own log (`log_path`). Per session it says how the client logged in
    /// (`Login: user=<alice>, method=PLAIN`) and how the session ended: `Disconnected: Logged
    /// out` after QUIT, `Disconnected: Connection closed` without QUIT, with `del=N/M`.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default()
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

fn wait_ready(
    child: &mut Child,
    pop3: SocketAddr,
    pop3s: SocketAddr,
    limit: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    let mut last = String::from("no attempt");
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("try_wait dovecot") {
            return Err(format!("dovecot exited early: {status}"));
        }
        match greeting(pop3) {
            Ok(line) if line.starts_with("+OK") => {
                // The master binds both listeners before forking anything; check anyway.
                return TcpStream::connect_timeout(&pop3s, Duration::from_secs(2))
                    .map(drop)
                    .map_err(|e| format!("pop3s port {pop3s}: {e}"));
            }
            Ok(line) => last = format!("unexpected greeting {line:?}"),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "no +OK greeting on {pop3} within {limit:?} (last: {last})"
    ))
}

fn all_logs(base: &Path) -> String {
    let read = |f: &str| std::fs::read_to_string(base.join(f)).unwrap_or_default();
    format!(
        "[stderr]\n{}\n[log_path]\n{}",
        read("stderr.log"),
        read("dovecot.log")
    )
}

/// SIGTERM (the master then stops its children), up to 5 s grace, then SIGKILL.
fn stop_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// The message as Dovecot serves it in RETR, before dot-stuffing: every line end CRLF.
/// (This is also what curl prints for RETR.)
pub fn served(message: &[u8]) -> Vec<u8> {
    let lf = lf_only(message);
    let mut out = Vec::with_capacity(lf.len() + lf.len() / 16);
    for &b in &lf {
        if b == b'\n' {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// `body` (CRLF lines) with a `.` put before every line that starts with `.`: the bytes on
/// the wire between `+OK ...\r\n` and the closing `.\r\n`.
pub fn dot_stuffed(body: &[u8]) -> Vec<u8> {
    popgate::pop3::response::dot_stuff(body)
}

// ---------------------------------------------------------------------------------------------
// Messages (LF line ends, as stored in a maildir)

/// Lines that must be dot-stuffed on the wire: ".dot line", "..two dots", "." and ". space".
pub fn msg_dots() -> Vec<u8> {
    b"From: Alice <alice@example.com>\n\
To: Bob <bob@example.com>\n\
Subject: dots\n\
Message-ID: <dots@example.com>\n\
\n\
hello\n\
.dot line\n\
..two dots\n\
.\n\
. space\n\
end\n"
        .to_vec()
}

/// 8-bit bytes (Latin-1, UTF-8, every byte from 0x80 to 0xff) in header and body.
pub fn msg_8bit() -> Vec<u8> {
    let mut m = b"From: \xe9t\xe9@example.com\nTo: bob@example.com\nSubject: caf\xe9\n\n".to_vec();
    m.extend_from_slice(b"Latin-1: caf\xe9 \xe0 \xff\xfe\x80\x81\n");
    m.extend((0x80u8..=0xff).collect::<Vec<u8>>());
    m.extend_from_slice(
        b"\n\xc3\xa9t\xc3\xa9 (UTF-8)\nTabs\tand trailing spaces  \n.\xff dot then 8-bit\n",
    );
    m
}

/// About 3.3 MB of lines of varying length, every seventh starting with '.'.
pub fn msg_big() -> Vec<u8> {
    let mut m = b"From: dave@example.com\nTo: bob@example.com\nSubject: big\n\n".to_vec();
    super::proxy::push_varied_lines(&mut m, 3_300_000, b"\n");
    m.extend_from_slice(b"last line\n");
    m
}

/// [`msg_dots`], [`msg_8bit`] and [`msg_big`], in that order.
pub fn alice_msgs() -> Vec<Vec<u8>> {
    vec![msg_dots(), msg_8bit(), msg_big()]
}

/// Twelve small messages, `Subject: bob N`, each with a line starting with a dot.
pub fn bob_msgs() -> Vec<Vec<u8>> {
    (1..=12)
        .map(|i| format!("Subject: bob {i}\n\nmessage number {i}\n.line {i}\n").into_bytes())
        .collect()
}

// ---------------------------------------------------------------------------------------------

/// CRLF -> LF (how a message is stored in a maildir).
pub fn lf_only(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len());
    let mut i = 0;
    while i < message.len() {
        if message[i] == b'\r' && message.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(message[i]);
        i += 1;
    }
    out
}

fn greeting(addr: SocketAddr) -> std::io::Result<String> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line)
}

fn distinct_ports(ip: IpAddr, n: usize) -> Vec<u16> {
    let ip = ip.to_string();
    let mut ports: Vec<u16> = Vec::with_capacity(n);
    while ports.len() < n {
        let p = super::free_port_on(&ip);
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    ports
}

fn maildir(base: &Path, user: &str) -> PathBuf {
    base.join("mail").join(user).join("Maildir")
}

/// Gives `path` to nobody (65534), the uid the static userdb maps every user to. Only root can;
/// as any other user the error is ignored (Dovecot could not run as configured then anyway).
fn chown_nobody(path: &Path) {
    let _ = std::os::unix::fs::chown(path, Some(65534), Some(65534));
}

fn write_passwd(base: &Path, opts: &DovecotOpts) {
    let mut passwd = String::new();
    for (user, pass, _) in &opts.users {
        assert!(
            !user.contains([':', '\n', '/']) && !user.is_empty(),
            "user name unusable in passwd-file: {user:?}"
        );
        assert!(
            !pass.contains([':', '\n']),
            "password unusable in passwd-file: {pass:?}"
        );
        passwd.push_str(&format!("{user}:{{PLAIN}}{pass}\n"));
    }
    let path = base.join("passwd");
    std::fs::write(&path, passwd).expect("write passwd");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
}

fn write_mail(base: &Path, opts: &DovecotOpts) {
    let mail = base.join("mail");
    std::fs::create_dir_all(&mail).expect("mkdir mail");
    for (user, _, messages) in &opts.users {
        let home = mail.join(user);
        let md = home.join("Maildir");
        for sub in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(md.join(sub)).expect("mkdir maildir");
        }
        for (i, msg) in messages.iter().enumerate() {
            // Fixed-width "timestamps" so Dovecot's UID order is the order given.
            let name = format!("{}.M{i}P1.popgate:2,S", 1_000_000_000u64 + i as u64);
            std::fs::write(md.join("cur").join(name), lf_only(msg)).expect("write message");
        }
        chown_tree(&home);
    }
}

fn chown_tree(path: &Path) {
    chown_nobody(path);
    if path.is_dir() {
        for entry in std::fs::read_dir(path).expect("read_dir") {
            chown_tree(&entry.expect("dir entry").path());
        }
    }
}

fn config(
    base: &Path,
    opts: &DovecotOpts,
    pop3: SocketAddr,
    pop3s: SocketAddr,
    haproxy_listeners: Option<(SocketAddr, SocketAddr)>,
    cert: &Path,
    key: &Path,
) -> String {
    let haproxy = match haproxy_listeners {
        Some((plain, tls)) => format!(
            "  inet_listener pop3-haproxy {{\n    address = {}\n    port = {}\n    \
             haproxy = yes\n  }}\n  inet_listener pop3s-haproxy {{\n    address = {}\n    \
             port = {}\n    ssl = yes\n    haproxy = yes\n  }}\n",
            plain.ip(),
            plain.port(),
            tls.ip(),
            tls.port()
        ),
        None => String::new(),
    };
    let haproxy_trusted = if haproxy_listeners.is_some() {
        "haproxy_trusted_networks = 127.0.0.1/32\n"
    } else {
        ""
    };
    let b = base.display();
    let ip = pop3.ip();
    let ssl = if opts.ssl_required { "required" } else { "yes" };
    let name = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let passdb = match &opts.oauth2_introspection_url {
        Some(url) => {
            let args = base.join("oauth2.conf");
            let text = format!(
                "introspection_mode = post\nintrospection_url = {url}\n\
                 username_attribute = username\nactive_attribute = active\nactive_value = true\n"
            );
            std::fs::write(&args, text).expect("write oauth2.conf");
            format!(
                "auth_mechanisms = xoauth2 oauthbearer\npassdb {{\n  driver = oauth2\n  \
                 mechanisms = xoauth2 oauthbearer\n  args = {}\n}}\n",
                args.display()
            )
        }
        None => format!(
            "auth_mechanisms = plain login apop cram-md5\npassdb {{\n  driver = passwd-file\n  \
             args = scheme=PLAIN {b}/passwd\n}}\n"
        ),
    };
    format!(
        r#"# written by tests/it/common/dovecot.rs
protocols = pop3
listen = {ip}
instance_name = {name}
base_dir = {b}/run
state_dir = {b}/state
log_path = {b}/dovecot.log
auth_verbose = yes
# Failed logins answer at once (the default waits 2 s): keeps wrong-password tests fast.
auth_failure_delay = 0
ssl = {ssl}
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = no
{passdb}userdb {{
  driver = static
  args = uid=65534 gid=65534 home={b}/mail/%u
}}
first_valid_uid = 1000
last_valid_uid = 0
mail_location = maildir:~/Maildir
pop3_uidl_format = %08Xu%08Xv
service pop3-login {{
  inet_listener pop3 {{
    address = {ip}
    port = {p1}
{listener_extra}
  }}
  inet_listener pop3s {{
    address = {ip}
    port = {p2}
    ssl = yes
  }}
{haproxy}}}
{haproxy_trusted}{extra}
"#,
        p1 = pop3.port(),
        p2 = pop3s.port(),
        cert = cert.display(),
        key = key.display(),
        listener_extra = opts.pop3_listener_extra,
        extra = opts.extra_conf,
    )
}
