//! A real popa3d (Openwall's RFC 1939 server: no CAPA, no STLS, no SASL) as an upstream.
//!
//! popa3d conflicts with dovecot-pop3d as a Debian package, so `.ci/run` unpacks the package
//! (`apt-get download popa3d`, `dpkg-deb -x`) into `/opt/popa3d` instead of installing it; the
//! binary is `$POPA3D` or `/opt/popa3d/usr/sbin/popa3d` (or `popa3d` on PATH). It runs
//! inetd-style: one process per connection on stdin/stdout, here spawned for each connection
//! accepted on a loopback port. It needs root: it authenticates system users through PAM
//! (service `popa3d`, written to /etc/pam.d if missing), reads `/var/mail/USER` (mbox), then
//! drops to the `popa3d` user and chroots to `/var/lib/popa3d` (both created if missing).
//!
//! Each [`Popa3d`] creates its own system users (names unique per test) and removes them and
//! their mailboxes when dropped.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Why a popa3d test cannot run here.
pub const NOT_INSTALLED: &str =
    "popa3d not found: run .ci/run (it unpacks the Debian package into /opt/popa3d), as root";

/// The popa3d binary, if there is one.
pub fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("POPA3D") {
        return Some(PathBuf::from(p));
    }
    let unpacked = PathBuf::from("/opt/popa3d/usr/sbin/popa3d");
    if unpacked.is_file() {
        return Some(unpacked);
    }
    super::find_exe("popa3d")
}

/// A popa3d on a loopback port with its system users; stopped and cleaned up on drop.
pub struct Popa3d {
    /// Where it listens.
    pub addr: SocketAddr,
    users: Vec<String>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    children: Arc<Mutex<Vec<Child>>>,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run a system command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The popa3d account, chroot directory and PAM service, as the package's postinst makes them.
fn system_setup() {
    let exists = |user: &str| {
        Command::new("getent")
            .args(["passwd", user])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !exists("popa3d") {
        let _ = Command::new("useradd")
            .args([
                "--system",
                "--home-dir",
                "/var/lib/popa3d",
                "--no-create-home",
            ])
            .args(["--shell", "/usr/sbin/nologin", "popa3d"])
            .output();
    }
    std::fs::create_dir_all("/var/lib/popa3d").expect("mkdir /var/lib/popa3d");
    std::fs::create_dir_all("/var/mail").expect("mkdir /var/mail");
    let pam = std::path::Path::new("/etc/pam.d/popa3d");
    if !pam.exists() {
        std::fs::write(pam, "@include common-auth\n@include common-account\n")
            .expect("write /etc/pam.d/popa3d");
    }
}

impl Popa3d {
    /// Creates the system users `(name, password, messages)` (each message becomes one mbox
    /// entry; LF line ends, no line may start with `From `) and starts accepting.
    pub fn start(users: &[(&str, &str, Vec<Vec<u8>>)]) -> Popa3d {
        let bin = binary().unwrap_or_else(|| panic!("{NOT_INSTALLED}"));
        system_setup();
        let mut names = Vec::new();
        for (name, password, messages) in users {
            let _ = Command::new("userdel").arg(name).output();
            run(Command::new("useradd").args(["-M", "-s", "/usr/sbin/nologin", name]));
            let mut chpasswd = Command::new("chpasswd")
                .stdin(Stdio::piped())
                .spawn()
                .expect("chpasswd");
            use std::io::Write as _;
            chpasswd
                .stdin
                .take()
                .unwrap()
                .write_all(format!("{name}:{password}\n").as_bytes())
                .unwrap();
            assert!(chpasswd.wait().unwrap().success(), "chpasswd {name}");
            let mut mbox = Vec::new();
            for m in messages {
                assert!(!m.starts_with(b"From ") && !m.windows(6).any(|w| w == b"\nFrom "));
                mbox.extend_from_slice(b"From popgate-test Mon Jan  1 00:00:00 2024\n");
                mbox.extend_from_slice(m);
                if !m.ends_with(b"\n") {
                    mbox.push(b'\n');
                }
                mbox.push(b'\n');
            }
            let path = format!("/var/mail/{name}");
            std::fs::write(&path, mbox).expect("write mbox");
            run(Command::new("chown").args([*name, &path]));
            run(Command::new("chmod").args(["600", &path]));
            names.push((*name).to_string());
        }
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind popa3d port");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let children: Arc<Mutex<Vec<Child>>> = Arc::default();
        let accept = {
            let (stop, children) = (stop.clone(), children.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            conn.set_nonblocking(false).unwrap();
                            let input = OwnedFd::from(conn.try_clone().unwrap());
                            let output = OwnedFd::from(conn);
                            let child = Command::new(&bin)
                                .stdin(Stdio::from(input))
                                .stdout(Stdio::from(output))
                                .stderr(Stdio::null())
                                .spawn()
                                .expect("spawn popa3d");
                            children.lock().unwrap().push(child);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Popa3d {
            addr,
            users: names,
            stop,
            accept: Some(accept),
            children,
        }
    }

    /// The mbox of `user` as it is now.
    pub fn mbox(&self, user: &str) -> Vec<u8> {
        std::fs::read(format!("/var/mail/{user}")).unwrap_or_default()
    }
}

impl Drop for Popa3d {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for mut c in self.children.lock().unwrap().drain(..) {
            // Sessions end with their clients; one still running is killed (by its own pid).
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        for u in &self.users {
            let _ = Command::new("userdel").arg(u).output();
            let _ = std::fs::remove_file(format!("/var/mail/{u}"));
        }
    }
}
