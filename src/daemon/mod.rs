//! Daemon conventions: the operational log ([`Logging`]: outputs, run-time changes, reopen on
//! SIGUSR1), the privilege drop after binding ([`PrivilegeDrop`]) and systemd's readiness
//! protocol ([`notify`]).
//!
//! The binary calls these; signals themselves are wired in `main.rs`.

mod logging;
pub mod notify;
mod privilege;

pub use logging::{LogError, Logging};
pub use privilege::{PrivilegeDrop, PrivilegeError, check_dirs_for_user, unreadable_for_user};
