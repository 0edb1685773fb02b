//! The local OAuth2 authorization server of tests/fixtures/authserver.py (Authlib + Flask from
//! Debian's python3-authlib / python3-flask), one per test, on an ephemeral loopback port.
//!
//! Clients: `popgate` (secret `popgate-secret`; refresh_token, client_credentials and
//! device_code grants) and `dovecot` (secret `dovecot-secret`), the introspecting resource
//! server: [`AuthServer::introspection_url`] is what [`super::dovecot::DovecotOpts::oauth2`]
//! takes. Access tokens live [`AuthServer::start`]'s `access_ttl` seconds.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// The message to panic with when Authlib or Flask is missing.
pub const NOT_INSTALLED: &str = "python3-authlib / python3-flask not installed: run .ci/run or \
     apt-get install python3-authlib python3-flask";

/// The popgate client's id and secret at the server.
pub const CLIENT: (&str, &str) = ("popgate", "popgate-secret");

/// A running authorization server; killed on drop.
pub struct AuthServer {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Holds the port file and the server's log.
    pub dir: TempDir,
    child: Child,
}

/// A Python 3 that has Authlib and Flask: `python3` on PATH, else Debian's /usr/bin/python3
/// (a PATH python3 from pyenv or a venv does not see Debian's packages).
pub fn python() -> Option<PathBuf> {
    ["python3", "/usr/bin/python3"]
        .iter()
        .filter_map(|p| super::find_exe(p))
        .find(|p| {
            Command::new(p)
                .args(["-c", "import authlib, flask"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

impl AuthServer {
    /// Starts the server with access tokens living `access_ttl` seconds; waits (at most 10 s)
    /// for its port.
    pub fn start(access_ttl: u32) -> AuthServer {
        Self::start_with(access_ttl, "")
    }

    /// Like [`AuthServer::start`]; client_credentials (application) tokens introspect as
    /// `app_user` (Dovecot needs a user name that matches the login).
    pub fn start_with(access_ttl: u32, app_user: &str) -> AuthServer {
        let py = python().unwrap_or_else(|| panic!("{NOT_INSTALLED}"));
        let dir = tempfile::tempdir().expect("temp dir");
        let port_file = dir.path().join("port");
        let log = std::fs::File::create(dir.path().join("server.log")).expect("log");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/authserver.py");
        let mut child = Command::new(py)
            .arg(script)
            .arg("--port-file")
            .arg(&port_file)
            .arg("--client")
            .arg(format!(
                "{}:{}:refresh_token,client_credentials,device_code",
                CLIENT.0, CLIENT.1
            ))
            .arg("--introspector")
            .arg("dovecot:dovecot-secret")
            .arg("--access-ttl")
            .arg(access_ttl.to_string())
            .arg("--app-user")
            .arg(app_user)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn authserver.py");
        let deadline = Instant::now() + Duration::from_secs(10);
        let port = loop {
            if let Ok(p) = std::fs::read_to_string(&port_file) {
                break p.trim().to_owned();
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
                panic!("authserver.py exited ({status}):\n{log}");
            }
            assert!(Instant::now() < deadline, "authserver.py: no port in 10 s");
            std::thread::sleep(Duration::from_millis(30));
        };
        AuthServer {
            base: format!("http://127.0.0.1:{port}"),
            dir,
            child,
        }
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The introspection URL with the `dovecot` client's basic-auth credentials in it.
    pub fn introspection_url(&self) -> String {
        self.url("/introspect")
            .replace("http://", "http://dovecot:dovecot-secret@")
    }

    fn post(&self, path: &str, form: &[(&str, &str)]) -> Value {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", "-X", "POST"]);
        for (k, v) in form {
            cmd.arg("--data-urlencode").arg(format!("{k}={v}"));
        }
        let out = cmd.arg(self.url(path)).output().expect("run curl");
        assert!(out.status.success(), "curl {path}: {out:?}");
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {:?}", out.stdout))
    }

    /// The server's counters: `issued`, `refresh_token`, `client_credentials`,
    /// `device_code`, `introspections`, `introspections_active`, `refused_down`, `minted`.
    pub fn counters(&self) -> Value {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .arg(self.url("/test/counters"))
            .output()
            .expect("curl");
        serde_json::from_slice(&out.stdout).expect("counters JSON")
    }

    /// One counter.
    pub fn counter(&self, name: &str) -> u64 {
        self.counters()[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// Every access token and refresh token the server issued or minted.
    pub fn all_tokens(&self) -> Vec<String> {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .arg(self.url("/test/tokens"))
            .output()
            .expect("curl");
        let v: Value = serde_json::from_slice(&out.stdout).expect("tokens JSON");
        ["access", "refresh"]
            .iter()
            .flat_map(|k| v[k].as_array().cloned().unwrap_or_default())
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect()
    }

    /// Token and device endpoints answer 503 (`on`) or work again.
    pub fn set_down(&self, on: bool) {
        self.post(&format!("/test/down?on={}", u8::from(on)), &[]);
    }

    /// A refresh token for `user` (what a first login would have given).
    pub fn mint(&self, user: &str) -> String {
        self.post("/test/mint", &[("user", user), ("client_id", CLIENT.0)])["refresh_token"]
            .as_str()
            .expect("refresh_token")
            .to_owned()
    }

    /// The user approves the device code `user_code` as `user`.
    pub fn approve(&self, user_code: &str, user: &str) {
        self.post("/test/approve", &[("user_code", user_code), ("user", user)]);
    }

    /// Revokes every access token of `user` (refresh tokens stay valid).
    pub fn revoke(&self, user: &str) -> u64 {
        self.post("/test/revoke", &[("user", user)])["revoked"]
            .as_u64()
            .expect("revoked")
    }

    /// The server's log (requests, tracebacks).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
