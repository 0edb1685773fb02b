//! The audit trail's writer: where events and transcript lines go (the writer thread, files,
//! their modes and rotation, stdout).
//!
//! - `sink`: the non-blocking, bounded audit writer ([`AuditSink`], `AuditGuard`).
//! - `files`: modes of audit files (0640) and of the directory popgate creates (0750), dated
//!   file names, retention.
//! - `transcript`: per-session `C:`/`S:` transcript files and command-line redaction.
//!
//! [`AuditSink`]: sink::AuditSink

pub(crate) mod files;
pub(crate) mod sink;
pub(crate) mod transcript;
