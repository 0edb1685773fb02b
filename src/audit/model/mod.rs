//! The audit trail's event model: what is recorded and how it is written as text, without
//! any I/O (no files, threads or locks; `tests/it/architecture.rs` checks it).
//!
//! - `event`: event types, serialized as one JSON object per line (schema in `../SCHEMA.md`).
//! - `headers`: pure, streaming header extraction from RETR/TOP bodies.
//! - `redact`: display and redaction of POP3 lines (transcripts and the live tap).
//! - `config`: the `[audit]` table ([`AuditConfig`]) and its validation.

pub(crate) mod config;
pub(crate) mod event;
pub(crate) mod headers;
pub(crate) mod redact;
