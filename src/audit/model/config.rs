//! The `[audit]` configuration table and its validation.
//!
//! Pure data: parsing (serde, unknown keys rejected) and [`AuditConfig::validate`], which names
//! the offending key in every error. Nothing here opens a file.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::headers::HeaderSet;
use crate::types::{MessageIds, Network};

/// Largest accepted `max_header_bytes`: the header extractor holds at most this much per
/// retrieval in flight, so it is a per-session memory bound.
pub(crate) const MAX_HEADER_BYTES_LIMIT: usize = 1024 * 1024;

/// `[audit]`: the audit trail (JSON lines) and traffic transcripts.
///
/// The default is a disabled audit trail and no transcripts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Write audit events at all.
    pub enabled: bool,
    /// Where events go: rotated files in [`AuditConfig::dir`] or stdout.
    pub output: AuditOutput,
    /// Directory of the `audit.YYYY-MM-DD[-HH].jsonl` files (needed for `output = "file"`).
    pub dir: Option<PathBuf>,
    /// How often a new file is started.
    pub rotation: AuditRotation,
    /// Files dated (by their name) before the last this many days are deleted; 0 keeps all.
    pub keep_days: u32,
    /// Length of the bounded queue between sessions and the writer thread.
    pub queue: usize,
    /// What `emit` does when the queue is full.
    pub on_overflow: Overflow,
    /// Header fields copied into `retrieve` events, matched case-insensitively.
    pub headers: Vec<String>,
    /// The header block of a retrieved message is scanned at most this far (octets).
    pub max_header_bytes: usize,
    /// `[audit.transcript]`: per-session traffic transcripts.
    pub transcript: TranscriptConfig,
    /// The `instance` field of every event: which popgate wrote it (default: the host name).
    pub instance: Option<String>,
    /// When the Message-ID of a deleted message is recorded: `seen` (it was retrieved in the
    /// session) or `always` (popgate asks the server with `TOP n 0`).
    pub message_ids: MessageIds,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: false,
            output: AuditOutput::File,
            dir: None,
            rotation: AuditRotation::Daily,
            keep_days: 30,
            queue: 10_000,
            on_overflow: Overflow::Drop,
            headers: ["Message-ID", "From", "To", "Subject", "Date"]
                .into_iter()
                .map(String::from)
                .collect(),
            max_header_bytes: 16 * 1024,
            transcript: TranscriptConfig::default(),
            instance: None,
            message_ids: MessageIds::Seen,
        }
    }
}

/// Where audit events are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditOutput {
    /// Rotated files in `audit.dir`.
    #[default]
    File,
    /// Standard output (for containers and journald).
    Stdout,
}

/// How often a new audit file is started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditRotation {
    /// `audit.YYYY-MM-DD.jsonl`
    #[default]
    Daily,
    /// `audit.YYYY-MM-DD-HH.jsonl`
    Hourly,
}

/// What happens to an event when the audit queue is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// Drop it, count it (`AuditSink::dropped`) and log an error: the relay never waits.
    #[default]
    Drop,
    /// Wait for space: the session stalls until the writer catches up (no event is lost).
    Block,
}

/// `[audit.transcript]`: which sessions get a `C:`/`S:` transcript file, and how bodies appear.
///
/// Transcripts are independent of `audit.enabled`: they are a debugging aid, switched on by
/// listing listeners or client networks here (or, later, by a rule action `trace`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TranscriptConfig {
    /// Directory for transcript files (needed when any session is to be transcribed).
    pub dir: Option<PathBuf>,
    /// Transcribe every session accepted on these listeners (by name).
    pub listeners: Vec<String>,
    /// Transcribe every session whose client address lies in one of these networks.
    pub networks: Vec<Network>,
    /// Write message bodies in full instead of their first lines and an octet count.
    pub full_bodies: bool,
    /// In summary mode, how many body lines are written before `[... N octets]`.
    pub summary_lines: usize,
}

impl Default for TranscriptConfig {
    fn default() -> Self {
        TranscriptConfig {
            dir: None,
            listeners: Vec::new(),
            networks: Vec::new(),
            full_bodies: false,
            summary_lines: 5,
        }
    }
}

impl TranscriptConfig {
    /// Whether a session on `listener` from `client` is to be transcribed by configuration
    /// (a rule action may switch a transcript on for other sessions as well).
    pub(crate) fn wants(&self, listener: &str, client: IpAddr) -> bool {
        self.dir.is_some()
            && (self.listeners.iter().any(|l| l == listener)
                || self.networks.iter().any(|n| n.contains(client)))
    }
}

/// An invalid `[audit]` value; `key` is the dotted key (`audit.queue`, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key `{key}`: {reason}")]
pub(crate) struct AuditConfigError {
    /// Dotted key, e.g. `audit.dir`.
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> AuditConfigError {
    AuditConfigError {
        key: key.into(),
        reason: reason.into(),
    }
}

impl AuditConfig {
    /// Check what the types cannot. Every error names the key.
    pub(crate) fn validate(&self) -> Result<(), AuditConfigError> {
        if self.enabled && self.output == AuditOutput::File {
            match &self.dir {
                None => {
                    return Err(invalid(
                        "audit.dir",
                        "needed when audit is enabled with output = \"file\"",
                    ));
                }
                Some(d) if d.as_os_str().is_empty() => {
                    return Err(invalid("audit.dir", "must not be empty"));
                }
                Some(_) => {}
            }
        }
        if self.queue == 0 {
            return Err(invalid("audit.queue", "must be at least 1"));
        }
        if self.queue > 10_000_000 {
            return Err(invalid("audit.queue", "must be at most 10000000"));
        }
        if self.max_header_bytes == 0 || self.max_header_bytes > MAX_HEADER_BYTES_LIMIT {
            return Err(invalid(
                "audit.max_header_bytes",
                format!("must be between 1 and {MAX_HEADER_BYTES_LIMIT}"),
            ));
        }
        for (i, h) in self.headers.iter().enumerate() {
            let key = format!("audit.headers[{i}]");
            if h.is_empty() || h.len() > 76 {
                return Err(invalid(key, "a header name has 1 to 76 characters"));
            }
            // RFC 5322 field-name: printable ASCII except colon.
            if let Some(c) = h.chars().find(|&c| !(c.is_ascii_graphic() && c != ':')) {
                return Err(invalid(
                    key,
                    format!("{h:?} is not a header name (character {c:?})"),
                ));
            }
            if self.headers[..i].iter().any(|o| o.eq_ignore_ascii_case(h)) {
                return Err(invalid(key, format!("duplicate header {h:?}")));
            }
        }
        if let Some(i) = &self.instance
            && (i.is_empty()
                || i.len() > 255
                || i.chars().any(|c| c.is_control() || c.is_whitespace()))
        {
            return Err(invalid(
                "audit.instance",
                "1 to 255 characters without spaces or control characters",
            ));
        }
        let t = &self.transcript;
        if t.dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
            return Err(invalid("audit.transcript.dir", "must not be empty"));
        }
        if t.dir.is_none() && (!t.listeners.is_empty() || !t.networks.is_empty()) {
            return Err(invalid(
                "audit.transcript.dir",
                "needed when transcript listeners or networks are set",
            ));
        }
        if t.summary_lines > 1000 {
            return Err(invalid(
                "audit.transcript.summary_lines",
                "must be at most 1000",
            ));
        }
        Ok(())
    }

    /// Make relative directories relative to `base` (the config file's directory).
    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        for d in [&mut self.dir, &mut self.transcript.dir]
            .into_iter()
            .flatten()
        {
            if d.is_relative() {
                *d = base.join(&*d);
            }
        }
    }

    /// `instance`, or the host name when it is not set (`"unknown"` if there is none). The
    /// host name is what an admin sees in every other log of the machine, and it tells apart
    /// the popgates whose audit files end up in one place.
    pub(crate) fn instance_name(&self) -> String {
        if let Some(i) = &self.instance {
            return i.clone();
        }
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let host: String = host
            .chars()
            .filter(|c| !c.is_control() && !c.is_whitespace())
            .collect();
        if host.is_empty() {
            "unknown".into()
        } else {
            host
        }
    }

    /// The compiled header list for [`super::HeaderExtractor`]s, built once and shared by all
    /// sessions.
    pub(crate) fn header_set(&self) -> Arc<HeaderSet> {
        Arc::new(HeaderSet::new(&self.headers, self.max_header_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AuditConfig, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn default_is_disabled_and_valid() {
        let c = AuditConfig::default();
        assert!(!c.enabled);
        assert_eq!(c.queue, 10_000);
        assert_eq!(c.headers.len(), 5);
        c.validate().unwrap();
        assert_eq!(parse("").unwrap(), c);
    }

    #[test]
    fn full_table_parses() {
        let c = parse(
            r#"
            enabled = true
            output = "file"
            dir = "/var/log/popgate"
            rotation = "hourly"
            keep_days = 2
            queue = 50
            on_overflow = "block"
            headers = ["Message-ID", "Subject"]
            max_header_bytes = 4096
            instance = "mx1.example.org"
            [transcript]
            dir = "/tmp/t"
            listeners = ["pop3"]
            networks = ["192.0.2.0/24", "2001:db8::/32", "10.1.2.3"]
            full_bodies = true
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.rotation, AuditRotation::Hourly);
        assert_eq!(c.on_overflow, Overflow::Block);
        assert_eq!(c.keep_days, 2);
        assert_eq!(c.instance_name(), "mx1.example.org");
        assert_eq!(c.transcript.networks.len(), 3);
        assert!(c.transcript.wants("pop3", "127.0.0.1".parse().unwrap()));
        assert!(c.transcript.wants("other", "192.0.2.77".parse().unwrap()));
        assert!(
            c.transcript
                .wants("other", "::ffff:192.0.2.77".parse().unwrap())
        );
        assert!(c.transcript.wants("other", "10.1.2.3".parse().unwrap()));
        assert!(!c.transcript.wants("other", "10.1.2.4".parse().unwrap()));
        assert!(c.transcript.wants("x", "2001:db8:1::5".parse().unwrap()));
        assert!(!c.transcript.wants("x", "2001:db9::5".parse().unwrap()));
    }

    #[test]
    fn unknown_keys_and_values_are_rejected() {
        assert!(parse("enabeld = true").is_err());
        assert!(parse("output = \"syslog\"").is_err());
        assert!(parse("on_overflow = \"wait\"").is_err());
        assert!(parse("[transcript]\nfull_body = true").is_err());
        assert!(parse("[transcript]\nnetworks = [\"10.0.0.0/33\"]").is_err());
    }

    #[test]
    fn validate_names_the_key() {
        let key = |c: AuditConfig| c.validate().unwrap_err().key;
        let on = AuditConfig {
            enabled: true,
            dir: Some("/x".into()),
            ..AuditConfig::default()
        };
        on.validate().unwrap();
        assert_eq!(
            key(AuditConfig {
                dir: None,
                ..on.clone()
            }),
            "audit.dir"
        );
        // stdout needs no directory
        AuditConfig {
            dir: None,
            output: AuditOutput::Stdout,
            ..on.clone()
        }
        .validate()
        .unwrap();
        assert_eq!(
            key(AuditConfig {
                queue: 0,
                ..on.clone()
            }),
            "audit.queue"
        );
        assert_eq!(
            key(AuditConfig {
                max_header_bytes: 0,
                ..on.clone()
            }),
            "audit.max_header_bytes"
        );
        assert_eq!(
            key(AuditConfig {
                headers: vec!["Subject".into(), "Bad Name".into()],
                ..on.clone()
            }),
            "audit.headers[1]"
        );
        assert_eq!(
            key(AuditConfig {
                headers: vec!["Subject".into(), "subject".into()],
                ..on.clone()
            }),
            "audit.headers[1]"
        );
        for bad in ["", "two words", "tab\there", &"x".repeat(256)] {
            assert_eq!(
                key(AuditConfig {
                    instance: Some(bad.to_owned()),
                    ..on.clone()
                }),
                "audit.instance",
                "{bad:?}"
            );
        }
        // Unset: the host name, never empty.
        assert!(!on.instance_name().is_empty());
        let mut t = on.clone();
        t.transcript.listeners = vec!["pop3".into()];
        assert_eq!(key(t), "audit.transcript.dir");
        let e = AuditConfig { queue: 0, ..on }.validate().unwrap_err();
        assert!(e.to_string().contains("audit.queue"), "{e}");
    }

    #[test]
    fn relative_dirs_are_resolved() {
        let mut c = AuditConfig {
            dir: Some("logs".into()),
            ..AuditConfig::default()
        };
        c.transcript.dir = Some("/abs".into());
        c.resolve_paths(Path::new("/etc/popgate"));
        assert_eq!(c.dir.unwrap(), Path::new("/etc/popgate/logs"));
        assert_eq!(c.transcript.dir.unwrap(), Path::new("/abs"));
    }
}
