//! The audit trail, traffic transcripts and the audit reader.
//!
//! - `config`: the `[audit]` table ([`AuditConfig`]) and its validation.
//! - `event`: event types, serialized as one JSON object per line (schema in `SCHEMA.md`).
//! - `headers`: pure, streaming header extraction from RETR/TOP bodies.
//! - `files`: modes of audit files (0640) and of the directory popgate creates (0750).
//! - `sink`: the non-blocking, bounded audit writer ([`AuditSink`], `AuditGuard`).
//! - `transcript`: per-session `C:`/`S:` transcript files and command-line redaction.
//! - `reader`: reading, filtering and printing audit files (`popgate audit`).
//!
//! Secrets never enter any of these outputs: events have no field for them, transcripts
//! redact command lines and write SASL lines as `***`.

pub(crate) mod config;
pub(crate) mod event;
pub(crate) mod files;
pub(crate) mod headers;
pub(crate) mod reader;
pub(crate) mod sink;
pub(crate) mod transcript;

pub use config::{AuditConfig, AuditOutput, AuditRotation, Overflow, TranscriptConfig};
pub use event::{
    AuditEvent, DeleteMarked, Deleted, Denied, EventKind, Headers, Login, Outcome, Reset, Retrieve,
    RetrieveVerb, SessionClose, SessionOpen, TlsEvent, TlsSide, Update, UpdateOutcome,
};
pub(crate) use headers::HeaderExtractor;
pub use headers::HeaderSet;
pub use reader::{
    AuditRead, AuditRecord, BadLine, Filter, ReaderError, format_json, format_table, read_audit,
    read_events,
};
pub(crate) use sink::AuditGuard;
pub use sink::{AuditSink, SinkError};
pub use transcript::Transcript;
