//! systemd's service notification protocol (`Type=notify`, sd_notify(3)): datagrams to
//! `$NOTIFY_SOCKET`. Without that variable (not started by systemd) every call does nothing.
//!
//! A failed notification is logged and otherwise ignored: systemd then times the start out
//! itself, which says more than popgate refusing to run would.

use sd_notify::NotifyState;

fn send(what: &str, states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd ({what})");
    }
}

/// `READY=1`: the listeners are bound and accepting.
pub fn ready() {
    send("ready", &[NotifyState::Ready]);
}

/// `RELOADING=1` with `MONOTONIC_USEC` (systemd 253 and later want the time stamp for
/// `Type=notify-reload`); follow with [`reloaded`].
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send("reloading", &[NotifyState::Reloading, now]),
        Err(_) => send("reloading", &[NotifyState::Reloading]),
    }
}

/// `READY=1` after a reload, with a status line saying how it went.
pub fn reloaded(status: &str) {
    // One line: a newline would start another assignment.
    let status = status.replace(['\n', '\r'], " ");
    send(
        "reloaded",
        &[NotifyState::Ready, NotifyState::Status(&status)],
    );
}

/// `STOPPING=1`: shutdown has begun.
pub fn stopping() {
    send("stopping", &[NotifyState::Stopping]);
}
