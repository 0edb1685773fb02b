//! Live control (`[control]`): a Unix socket through which `popgate sessions`, `status`,
//! `kick`, `tap` and `reload` see, follow and end sessions while popgate runs.
//!
//! - `registry`: every live session, its stop signal and its taps.
//! - [`protocol`]: the versioned line-delimited JSON spoken on the socket (docs/control.md).
//! - `server`: the socket (mode 0660, optional group, peer credentials logged per command).
//! - [`tap`]: the live, redacted transcript feed.
//! - [`client`]: the subcommands' side.

pub mod client;
pub mod protocol;
pub(crate) mod registry;
pub(crate) mod server;
pub mod tap;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Binding, placing or configuring the socket failed.
    #[error("control socket {path}: {reason}")]
    Bind {
        /// The socket's path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// `[control]` is configured without `socket` and there is no runtime directory.
    #[error("control.socket is not set and there is no $RUNTIME_DIRECTORY to put it in")]
    NoPath,
}

/// A reload run on behalf of a control client: the outcome line, `Err` when it failed.
pub(crate) type ReloadFn =
    Box<dyn Fn() -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>> + Send + Sync>;

/// What the control server needs from the running proxy.
pub(crate) struct Host {
    pub(crate) registry: std::sync::Arc<registry::Registry>,
    /// A digest of the config in force and the files it names.
    pub(crate) digest: Box<dyn Fn() -> String + Send + Sync>,
    /// The last reload's outcome.
    pub(crate) last_reload: Box<dyn Fn() -> Option<protocol::ReloadInfo> + Send + Sync>,
    /// Reload the config file (none: started from an in-memory config).
    pub(crate) reload: Option<ReloadFn>,
}

/// The socket path `[control]` asks for: `socket`, else `control.sock` in
/// `$RUNTIME_DIRECTORY` (systemd's `RuntimeDirectory=`).
pub fn socket_path(config: &crate::config::ControlConfig) -> Result<PathBuf, ControlError> {
    if let Some(p) = &config.socket {
        return Ok(p.clone());
    }
    let dirs = std::env::var_os("RUNTIME_DIRECTORY").ok_or(ControlError::NoPath)?;
    let first = std::env::split_paths(&dirs)
        .next()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or(ControlError::NoPath)?;
    Ok(first.join("control.sock"))
}
