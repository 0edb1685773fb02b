//! The control socket's server side: a Unix socket (mode 0660, optional group) answering
//! protocol v1 lines; each command is logged with the peer's credentials (`SO_PEERCRED`).

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};
use tracing::{info, warn};

use super::protocol::{self, Command, Response, Status};
use super::registry::Matcher;
use super::tap::Subscriber;
use super::{ControlError, Host};

/// Control connections served at once; more are answered with an error line and closed.
pub(crate) const MAX_CONNECTIONS: usize = 16;

/// The bound control socket; removes its file when dropped.
#[derive(Debug)]
pub(crate) struct ControlSocket {
    listener: Option<UnixListener>,
    path: PathBuf,
}

impl ControlSocket {
    /// The socket's path.
    #[cfg(test)]
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Bind `path` with mode 0660 (and group `group`, if given). A stale socket file (nobody
/// answers on it) is replaced; a live one is an error. The socket is bound under a temporary
/// name and renamed into place once its mode and group are set, so it is never reachable with
/// looser permissions.
pub(crate) fn bind(path: &Path, group: Option<&str>) -> Result<ControlSocket, ControlError> {
    let err = |what: &str, e: std::io::Error| ControlError::Bind {
        path: path.to_owned(),
        reason: format!("{what}: {e}"),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| err("creating its directory", e))?;
    }
    if std::fs::symlink_metadata(path).is_ok() {
        use std::os::unix::fs::FileTypeExt as _;
        let is_socket = std::fs::symlink_metadata(path)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false);
        if !is_socket {
            return Err(ControlError::Bind {
                path: path.to_owned(),
                reason: "exists and is not a socket".into(),
            });
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::Bind {
                path: path.to_owned(),
                reason: "another popgate answers on it".into(),
            });
        }
        std::fs::remove_file(path).map_err(|e| err("removing the stale socket", e))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(|e| err("binding", e))?;
    let placed = (|| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660))
            .map_err(|e| err("setting mode 0660", e))?;
        if let Some(g) = group {
            let gid = lookup_group(g).map_err(|reason| ControlError::Bind {
                path: path.to_owned(),
                reason,
            })?;
            nix::unistd::chown(&tmp, None, Some(gid))
                .map_err(|e| err(&format!("changing its group to {g}"), e.into()))?;
        }
        std::fs::rename(&tmp, path).map_err(|e| err("renaming into place", e))
    })();
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(ControlSocket {
        listener: Some(listener),
        path: path.to_owned(),
    })
}

fn lookup_group(g: &str) -> Result<nix::unistd::Gid, String> {
    if let Ok(n) = g.parse::<u32>() {
        return Ok(nix::unistd::Gid::from_raw(n));
    }
    match nix::unistd::Group::from_name(g) {
        Ok(Some(group)) => Ok(group.gid),
        Ok(None) => Err(format!("no group {g:?}")),
        Err(e) => Err(format!("looking up group {g:?}: {e}")),
    }
}

/// Serve the socket until `stop` turns true.
pub(crate) async fn serve(
    mut socket: ControlSocket,
    host: Arc<Host>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(listener) = socket.listener.take() else {
        return;
    };
    info!(path = %socket.path.display(), "control socket listening");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            r = listener.accept() => r,
        };
        {
            match accepted {
                Ok((mut stream, _)) => match slots.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let host = host.clone();
                        tokio::spawn(async move {
                            connection(stream, host).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        warn!("control connection refused: {MAX_CONNECTIONS} already open");
                        let line = Response::error(format!(
                            "too many control connections (at most {MAX_CONNECTIONS})"
                        ))
                        .to_line();
                        tokio::spawn(async move {
                            let _ = tokio::time::timeout(
                                std::time::Duration::from_secs(1),
                                stream.write_all(line.as_bytes()),
                            )
                            .await;
                        });
                    }
                },
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
    drop(listener);
    drop(socket);
}

/// What a request line turned out to be.
enum Line {
    Eof,
    Request,
    TooLong,
}

/// Read one line (at most [`protocol::MAX_REQUEST`] octets) into `buf`, without its newline;
/// an overlong line is skipped to its end, never buffered.
async fn read_line<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    buf: &mut Vec<u8>,
) -> std::io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    loop {
        let avail = rd.fill_buf().await?;
        if avail.is_empty() {
            return Ok(match (too_long, buf.is_empty()) {
                (true, _) => Line::TooLong,
                (false, true) => Line::Eof,
                (false, false) => Line::Request,
            });
        }
        match memchr::memchr(b'\n', avail) {
            Some(i) => {
                if !too_long && buf.len() + i < protocol::MAX_REQUEST {
                    buf.extend_from_slice(&avail[..i]);
                } else {
                    too_long = true;
                    buf.clear();
                }
                rd.consume(i + 1);
                if buf.last() == Some(&b'\r') {
                    buf.pop();
                }
                return Ok(if too_long {
                    Line::TooLong
                } else {
                    Line::Request
                });
            }
            None => {
                let n = avail.len();
                if !too_long && buf.len() + n < protocol::MAX_REQUEST {
                    buf.extend_from_slice(avail);
                } else {
                    too_long = true;
                    buf.clear();
                }
                rd.consume(n);
            }
        }
    }
}

async fn connection(stream: UnixStream, host: Arc<Host>) {
    let (uid, gid, pid) = match stream.peer_cred() {
        Ok(c) => (Some(c.uid()), Some(c.gid()), c.pid()),
        Err(_) => (None, None, None),
    };
    let who = format!(
        "uid {} pid {}",
        uid.map_or("?".into(), |u| u.to_string()),
        pid.map_or("?".into(), |p| p.to_string())
    );
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut buf = Vec::new();
    loop {
        let line = match read_line(&mut rd, &mut buf).await {
            Ok(l) => l,
            Err(_) => return,
        };
        let command = match line {
            Line::Eof => return,
            Line::TooLong => {
                warn!(uid, gid, pid, "control request refused: longer than 64 KiB");
                Err(format!(
                    "request longer than {} octets",
                    protocol::MAX_REQUEST
                ))
            }
            Line::Request if buf.iter().all(u8::is_ascii_whitespace) => continue,
            Line::Request => protocol::parse_request(&buf),
        };
        let command = match command {
            Ok(c) => c,
            Err(e) => {
                warn!(uid, gid, pid, error = %e, "control request refused");
                if wr
                    .write_all(Response::error(e).to_line().as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
        };
        let name = match &command {
            Command::Sessions { .. } => "sessions",
            Command::Status => "status",
            Command::Kick { .. } => "kick",
            Command::Tap { .. } => "tap",
            Command::Reload => "reload",
        };
        // The request as sent (JSON, no secrets), cut for the log.
        let shown: String = String::from_utf8_lossy(&buf).chars().take(512).collect();
        info!(uid, gid, pid, command = name, request = %shown, "control command");
        let answer = match command {
            Command::Sessions { filter } => match matcher(&filter) {
                Ok(m) => Response {
                    sessions: Some(host.registry.rows(&m)),
                    ..Response::ok()
                },
                Err(e) => Response::error(e),
            },
            Command::Status => Response {
                status: Some(status(&host)),
                ..Response::ok()
            },
            Command::Kick { filter } => match matcher(&filter) {
                Ok(m) if m.is_empty() => {
                    Response::error("kick needs a session, user or client to match")
                }
                Ok(m) => {
                    let ids = host.registry.kick(&m, &who);
                    info!(uid, pid, sessions = ?ids, "control: sessions kicked");
                    Response {
                        kicked: Some(ids),
                        ..Response::ok()
                    }
                }
                Err(e) => Response::error(e),
            },
            Command::Reload => match &host.reload {
                Some(reload) => match reload().await {
                    Ok(line) => Response {
                        reload: Some(line),
                        ..Response::ok()
                    },
                    Err(line) => Response {
                        reload: Some(line.clone()),
                        ..Response::error(line)
                    },
                },
                None => Response::error("this popgate has no config file to reload"),
            },
            Command::Tap { filter, bodies } => match matcher(&filter) {
                Ok(m) => {
                    tap(&host, m, bodies, rd, wr).await;
                    info!(uid, pid, "control: tap detached");
                    return;
                }
                Err(e) => Response::error(e),
            },
        };
        if wr.write_all(answer.to_line().as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Stream tap lines until the client closes its end (or writes fail): then detach.
async fn tap(
    host: &Host,
    m: Matcher,
    bodies: bool,
    mut rd: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut wr: tokio::net::unix::OwnedWriteHalf,
) {
    let (sub, mut rx) = Subscriber::new(m, bodies);
    let ids = host.registry.subscribe(&sub);
    let first = Response {
        tap_attached: Some(ids),
        ..Response::ok()
    };
    let mut scratch = [0u8; 512];
    if wr.write_all(first.to_line().as_bytes()).await.is_ok() {
        loop {
            tokio::select! {
                line = rx.recv() => {
                    let Some(line) = line else { break };
                    let out = Response { tap: Some(line), ..Response::ok() }.to_line();
                    if wr.write_all(out.as_bytes()).await.is_err() {
                        break;
                    }
                }
                // Anything the client sends while tapping is ignored; its close detaches.
                r = rd.read(&mut scratch) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                },
            }
        }
    }
    host.registry.unsubscribe(&sub);
}

fn matcher(f: &protocol::SessionSelector) -> Result<Matcher, String> {
    let client = match &f.client {
        Some(c) => {
            Some(crate::cidr::Cidr::parse_masked(c).map_err(|e| format!("client {c:?}: {e}"))?)
        }
        None => None,
    };
    Ok(Matcher {
        session: f.session,
        user: f.user.clone(),
        client,
        listener: f.listener.clone(),
    })
}

fn status(host: &Host) -> Status {
    let by_listener = host.registry.counts();
    Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        started: humantime::format_rfc3339_seconds(host.registry.started_at()).to_string(),
        uptime_s: host.registry.uptime().as_secs(),
        config_digest: (host.digest)(),
        last_reload: (host.last_reload)(),
        sessions: by_listener.values().flat_map(|m| m.values()).sum(),
        by_listener,
        taps: host.registry.taps() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The socket is 0660; a stale socket file is replaced, a live one and a regular file are
    /// refused; the file goes when the socket is dropped.
    #[tokio::test]
    async fn bind_replaces_a_stale_socket_and_refuses_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("control.sock");
        let first = bind(&path, None).unwrap();
        assert_eq!(first.path(), path);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660);
        let live = bind(&path, None).unwrap_err().to_string();
        assert!(live.contains("another popgate"), "{live}");
        // A stale one: bound by a std listener that is gone, its file left behind.
        drop(first);
        assert!(!path.exists());
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let again = bind(&path, Some("0")).unwrap();
        drop(again);
        std::fs::write(&path, b"not a socket").unwrap();
        let file = bind(&path, None).unwrap_err().to_string();
        assert!(file.contains("not a socket"), "{file}");
    }
}
