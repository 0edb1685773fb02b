//! systemd's service notification protocol (`Type=notify`, sd_notify(3)): datagrams to
//! `$NOTIFY_SOCKET`. Without that variable (not started by systemd) every call does nothing.
//! With `WatchdogSec=` in the unit, [`watchdog`] keeps systemd's watchdog fed.
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

/// How often to send `WATCHDOG=1`: half the `WATCHDOG_USEC` systemd sets with `WatchdogSec=`
/// (as sd_watchdog_enabled(3) advises), when it is meant for this process (`WATCHDOG_PID`);
/// `None` when systemd does not ask.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

/// Send `WATCHDOG=1` every [`watchdog_interval`], for as long as the runtime this runs on
/// keeps scheduling tasks: a popgate whose runtime hangs stops pinging and systemd restarts
/// it. Returns at once when systemd does not ask for pings. Upstream trouble does not stop the
/// pings: a proxy in front of a dead server is not helped by restarts (`/health` says 503).
pub async fn watchdog() {
    let Some(every) = watchdog_interval() else {
        return;
    };
    tracing::debug!(interval = ?every, "systemd watchdog: pinging");
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        send("watchdog", &[NotifyState::Watchdog]);
    }
}
