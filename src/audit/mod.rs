//! The audit trail, traffic transcripts and the audit reader.
//!
//! - `model`: the pure event model (no I/O): event types and their JSON form (schema in
//!   `SCHEMA.md`), header extraction from bodies, the `[audit]` table ([`AuditConfig`]).
//! - `writer`: the non-blocking, bounded audit writer ([`AuditSink`], `AuditGuard`), its
//!   files and rotation, and per-session transcript files.
//! - `reader`: reading, filtering and printing audit files (`popgate audit`).
//!
//! Secrets never enter any of these outputs: events have no field for them, transcripts
//! redact command lines and write SASL lines as `***`.

pub(crate) mod model;
pub(crate) mod reader;
pub(crate) mod writer;

pub use model::config::{AuditConfig, AuditOutput, AuditRotation, Overflow, TranscriptConfig};
pub use model::event::{
    AuditEvent, AuditEventKind, DeleteMarked, Deleted, Denied, Headers, LoginEvent,
    LoginEventOutcome, Reset, Retrieve, RetrieveVerb, ScanEvent, ScanEventAction, SessionClose,
    SessionOpen, TlsEvent, TlsSide, Update, UpdateOutcome,
};
pub(crate) use model::headers::HeaderExtractor;
pub use model::headers::HeaderSet;
pub use reader::{
    AuditFilter, AuditRead, AuditRecord, BadLine, ReaderError, format_json, format_table,
    read_audit, read_events,
};
pub(crate) use writer::sink::AuditGuard;
pub use writer::sink::{AuditSink, SinkError};
pub use writer::transcript::Transcript;
