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

/// The largest `scan.spool_memory`: a held message above it goes to a file (each session
/// holding one message, memory would otherwise grow with the sessions scanning at once).
pub const MAX_SPOOL_MEMORY: u64 = 64 << 20;

/// The largest `scan.max_concurrent`.
pub const MAX_CONCURRENT: usize = 65_536;

/// Where a clamd listens (`scanner.address` of a `kind = "clamd"` scanner).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClamdAddress {
    /// `unix:/path`: clamd's `LocalSocket`.
    Unix(PathBuf),
    /// `host:port`: clamd's `TCPSocket`/`TCPAddr`, resolved at each connect.
    Tcp(String),
}

impl ClamdAddress {
    /// Parse `scanner.address` of a clamd scanner; the error says what is expected.
    pub(crate) fn parse(text: &str) -> Result<ClamdAddress, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!(
                    "`{text}`: a Unix socket needs an absolute path, e.g. \
                     \"unix:/run/clamav/clamd.ctl\""
                ));
            }
            return Ok(ClamdAddress::Unix(PathBuf::from(path)));
        }
        let port_ok = text
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty())
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .is_some_and(|p| p != 0);
        if !port_ok || text.contains('/') {
            return Err(format!(
                "`{text}`: \"unix:/path\" or \"host:port\" (e.g. \"127.0.0.1:3310\") is expected"
            ));
        }
        Ok(ClamdAddress::Tcp(text.to_owned()))
    }
}

/// The URLs of `/checkv2` and `/ping` under `scanner.address` of an rspamd scanner (an
/// `http://` or `https://` URL, possibly with a path prefix); the error says what is expected.
pub(crate) fn rspamd_urls(text: &str) -> Result<(reqwest::Url, reqwest::Url), String> {
    let expected = || {
        format!("`{text}`: an http:// or https:// URL is expected, e.g. \"http://127.0.0.1:11333\"")
    };
    let url = reqwest::Url::parse(text).map_err(|_| expected())?;
    if !matches!(url.scheme(), "http" | "https")
        || url.host_str().is_none_or(str::is_empty)
        || url.query().is_some()
        || url.fragment().is_some()
        || !url.username().is_empty()
    {
        return Err(expected());
    }
    let base = url.as_str().trim_end_matches('/');
    let join = |path: &str| reqwest::Url::parse(&format!("{base}/{path}")).map_err(|_| expected());
    Ok((join("checkv2")?, join("ping")?))
}

/// `[[scanner]]` and `[scan]` as `Config::validate` checks them: `(key, reason)` of the first
/// problem.
pub(crate) fn validate(
    scanners: &[ScannerConfig],
    scan: &ScanConfig,
) -> Result<(), (String, String)> {
    for (i, s) in scanners.iter().enumerate() {
        let key = |field: &str| format!("scanner[{i}].{field}");
        if s.name.trim().is_empty() {
            return Err((key("name"), "must not be empty".into()));
        }
        if scanners[..i].iter().any(|o| o.name == s.name) {
            return Err((key("name"), format!("duplicate scanner name {:?}", s.name)));
        }
        let address = match s.kind {
            ScannerKind::Clamd => ClamdAddress::parse(&s.address).map(drop),
            ScannerKind::Rspamd => rspamd_urls(&s.address).map(drop),
        };
        address.map_err(|reason| (key("address"), reason))?;
        if s.timeout.is_zero() {
            return Err((key("timeout"), "must be longer than 0s".into()));
        }
    }
    if !(1..=MAX_CONCURRENT).contains(&scan.max_concurrent) {
        return Err((
            "scan.max_concurrent".into(),
            format!("must be from 1 to {MAX_CONCURRENT}"),
        ));
    }
    if scan.spool_memory.0 > MAX_SPOOL_MEMORY {
        return Err((
            "scan.spool_memory".into(),
            format!(
                "{} is more than the {} a held message may take in memory; larger ones go to \
                 scan.spool_dir",
                scan.spool_memory,
                ByteSize(MAX_SPOOL_MEMORY)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn clamd_addresses_are_unix_paths_or_host_and_port() {
        assert_eq!(
            ClamdAddress::parse("unix:/run/clamav/clamd.ctl"),
            Ok(ClamdAddress::Unix("/run/clamav/clamd.ctl".into()))
        );
        for ok in ["127.0.0.1:3310", "localhost:3310", "[::1]:3310"] {
            assert_eq!(
                ClamdAddress::parse(ok),
                Ok(ClamdAddress::Tcp(ok.into())),
                "{ok}"
            );
        }
        for bad in [
            "unix:relative",
            "127.0.0.1",
            ":3310",
            "host:0",
            "host:99999",
            "http://x:1",
        ] {
            assert!(ClamdAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rspamd_addresses_are_http_urls_with_an_optional_prefix() {
        let (c, p) = rspamd_urls("http://127.0.0.1:11333").unwrap();
        assert_eq!(
            (c.as_str(), p.as_str()),
            (
                "http://127.0.0.1:11333/checkv2",
                "http://127.0.0.1:11333/ping"
            )
        );
        let (c, _) = rspamd_urls("https://rspamd.example.org/spam/").unwrap();
        assert_eq!(c.as_str(), "https://rspamd.example.org/spam/checkv2");
        for bad in [
            "127.0.0.1:11333",
            "ftp://x",
            "http://",
            "http://x/?q=1",
            "http://u:p@x/",
            "unix:/run/rspamd.sock",
        ] {
            assert!(rspamd_urls(bad).is_err(), "{bad}");
        }
    }

    fn scanner(name: &str, kind: ScannerKind, address: &str) -> ScannerConfig {
        ScannerConfig {
            name: name.into(),
            kind,
            address: address.into(),
            timeout: default_timeout(),
            max_size: default_max_size(),
        }
    }

    #[test]
    fn scanners_need_unique_names_and_addresses_of_their_kind() {
        let scan = ScanConfig::default();
        let clamd = scanner("clamav", ScannerKind::Clamd, "unix:/run/clamd.ctl");
        let rspamd = scanner("rspamd", ScannerKind::Rspamd, "http://127.0.0.1:11333");
        validate(&[clamd.clone(), rspamd.clone()], &scan).unwrap();
        let err = |list: &[ScannerConfig], scan: &ScanConfig| validate(list, scan).unwrap_err();
        assert_eq!(
            err(&[clamd.clone(), clamd.clone()], &scan).0,
            "scanner[1].name"
        );
        assert_eq!(
            err(&[scanner(" ", ScannerKind::Clamd, "h:1")], &scan).0,
            "scanner[0].name"
        );
        let crossed = scanner("x", ScannerKind::Clamd, "http://127.0.0.1:11333");
        assert_eq!(err(&[crossed], &scan).0, "scanner[0].address");
        let crossed = scanner("x", ScannerKind::Rspamd, "127.0.0.1:11333");
        assert_eq!(err(&[crossed], &scan).0, "scanner[0].address");
        let zero = ScanConfig {
            max_concurrent: 0,
            ..ScanConfig::default()
        };
        assert_eq!(err(&[], &zero).0, "scan.max_concurrent");
        let many = ScanConfig {
            max_concurrent: MAX_CONCURRENT + 1,
            ..ScanConfig::default()
        };
        assert_eq!(err(&[], &many).0, "scan.max_concurrent");
        let huge = ScanConfig {
            spool_memory: ByteSize(65 << 20),
            ..ScanConfig::default()
        };
        assert!(err(&[], &huge).1.contains("64MB"), "{:?}", err(&[], &huge));
        let most = ScanConfig {
            spool_memory: ByteSize(64 << 20),
            ..ScanConfig::default()
        };
        validate(&[], &most).unwrap();
    }
}
