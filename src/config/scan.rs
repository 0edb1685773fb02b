//! `[[scanner]]` and `[scan]`: content scanners (clamd, rspamd) and what popgate does with
//! their verdicts on the messages a `scan` rule selects (see `docs/scanning.md`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::types::ByteSize;

/// One `[[scanner]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScannerConfig {
    /// The name `scan` rules use.
    pub name: String,
    /// `clamd` or `rspamd`.
    pub kind: ScannerKind,
    /// clamd: `"unix:/run/clamav/clamd.ctl"` or `"host:port"`; rspamd: the controller or
    /// normal worker's URL, e.g. `"http://127.0.0.1:11333"`.
    pub address: String,
    /// The longest one scan may take, queueing included; then the verdict is `error`.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Larger messages are not sent to this scanner (verdict `too_large`).
    #[serde(default = "default_max_size")]
    pub max_size: ByteSize,
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_max_size() -> ByteSize {
    ByteSize(25 << 20)
}

/// `scanner.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScannerKind {
    /// ClamAV's daemon, `INSTREAM`.
    Clamd,
    /// rspamd, `POST /checkv2`.
    Rspamd,
}

/// `[scan]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScanConfig {
    /// A held message is kept in memory up to this size, then in a file in `spool_dir`.
    pub spool_memory: ByteSize,
    /// Where larger held messages go: a 0600 file, unlinked as soon as it is created.
    pub spool_dir: PathBuf,
    /// What an infected message becomes.
    pub on_virus: OnVirus,
    /// What a spam message becomes.
    pub on_spam: OnSpam,
    /// What happens when a scanner is down, times out or answers nonsense.
    pub on_error: OnScanError,
    /// Add an `X-Popgate-Scan:` header line to every scanned message (clean ones too).
    pub header: bool,
    /// At most this many scans run at once (process-wide); more wait, within their timeout.
    pub max_concurrent: usize,
    /// The `From:` of the notice that replaces a message (`on_virus`/`on_spam = "replace"`).
    pub notice_from: String,
    /// Whom the notice sends its reader to for the original, e.g. an address or a URL.
    pub contact: String,
}

impl Default for ScanConfig {
    fn default() -> Self {
        ScanConfig {
            spool_memory: ByteSize(1 << 20),
            spool_dir: std::env::temp_dir(),
            on_virus: OnVirus::Replace,
            on_spam: OnSpam::Tag,
            on_error: OnScanError::Tempfail,
            header: false,
            max_concurrent: 16,
            notice_from: "MAILER-DAEMON".into(),
            contact: "your mail administrator".into(),
        }
    }
}

/// `scan.on_virus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnVirus {
    /// The client gets a notice in place of the message; the original stays on the server.
    Replace,
    /// The message is relayed with `X-Popgate-Scan: infected ...` added.
    Tag,
    /// The client gets `-ERR` for this message.
    Deny,
}

/// `scan.on_spam`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnSpam {
    /// `X-Spam-Status:` and `X-Spam-Score:` are added.
    Tag,
    /// The client gets a notice in place of the message; the original stays on the server.
    Replace,
}

/// `scan.on_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnScanError {
    /// The message is relayed unscanned, with `X-Popgate-Scan: unscanned ...` added.
    Pass,
    /// The client gets `-ERR [SYS/TEMP]` for this message and retries later.
    Tempfail,
}
