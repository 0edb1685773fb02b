//! rspamd: `POST /checkv2` with the message (un-stuffed) as the body, streamed from the spool
//! through a small channel (a file spool is never loaded into memory), and the JSON reply
//! read up to [`MAX_REPLY`] octets. The verdict is rspamd's `action`.

use bytes::Bytes;
use http_body_util::channel::Channel;
use serde::Deserialize;

use super::spool::{CHUNK, Spool};
use super::{Finding, ScanError, printable};
use crate::types::ScanVerdict;

/// A longer reply is refused: rspamd's answer is a few KiB even with many symbols.
pub(crate) const MAX_REPLY: usize = 64 << 10;

/// An rspamd worker (normal or proxy; the controller answers `/checkv2` too).
#[derive(Debug)]
pub(crate) struct Client {
    checkv2: reqwest::Url,
    ping: reqwest::Url,
    http: reqwest::Client,
}

impl Client {
    /// A client of the rspamd at `address` (`http://host:port`, maybe with a path prefix).
    pub(crate) fn new(address: &str) -> Result<Client, String> {
        let (checkv2, ping) = crate::config::scan::rspamd_urls(address)?;
        let http = reqwest::Client::builder()
            // rspamd is a local service: an HTTP_PROXY meant for the outside does not apply.
            .no_proxy()
            // A connection per scan, as with clamd: a pooled one that a restarted rspamd
            // closed would fail a scan (a streamed body cannot be sent again); a connect to
            // a nearby rspamd costs far less than the scan.
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Client {
            checkv2,
            ping,
            http,
        })
    }

    /// Scan the message in `spool`; the caller bounds the time.
    pub(crate) async fn scan(&self, spool: &Spool) -> Result<Finding, ScanError> {
        let (mut tx, body) = Channel::<Bytes, std::io::Error>::new(2);
        let pump = async move {
            let mut reader = spool.unstuffed();
            loop {
                match reader.next(Vec::with_capacity(CHUNK)).await {
                    Ok(Some(piece)) => {
                        if tx.send_data(Bytes::from(piece)).await.is_err() {
                            return; // the request is over
                        }
                    }
                    Ok(None) => return, // dropping the sender ends the body
                    Err(e) => return tx.abort(e),
                }
            }
        };
        let request = async {
            let response = self
                .http
                .post(self.checkv2.clone())
                .body(reqwest::Body::wrap(body))
                .send()
                .await
                .map_err(http_error)?;
            let status = response.status();
            let reply = read_bounded(response).await?;
            if !status.is_success() {
                return Err(ScanError::Refused(format!(
                    "rspamd: HTTP {status}{}",
                    error_text(&reply)
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )));
            }
            parse_reply(&reply)
        };
        let (outcome, ()) = tokio::join!(request, pump);
        outcome
    }

    /// `GET /ping` -> 200.
    pub(crate) async fn ping(&self) -> Result<(), ScanError> {
        let response = self
            .http
            .get(self.ping.clone())
            .send()
            .await
            .map_err(http_error)?;
        let status = response.status();
        let reply = read_bounded(response).await?;
        if status.is_success() && reply.trim_ascii() == b"pong" {
            Ok(())
        } else {
            Err(ScanError::Unexpected(format!(
                "HTTP {status}: {}",
                printable(&reply[..reply.len().min(200)])
            )))
        }
    }
}

/// A reqwest error with its causes (reqwest's own text alone says little).
fn http_error(e: reqwest::Error) -> ScanError {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    if e.is_connect() {
        ScanError::Connect(std::io::Error::other(text))
    } else {
        ScanError::Http(text)
    }
}

async fn read_bounded(mut response: reqwest::Response) -> Result<Vec<u8>, ScanError> {
    if response
        .content_length()
        .is_some_and(|n| n > MAX_REPLY as u64)
    {
        return Err(ScanError::ReplyTooLong(MAX_REPLY));
    }
    let mut reply = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(http_error)? {
        if reply.len() + chunk.len() > MAX_REPLY {
            return Err(ScanError::ReplyTooLong(MAX_REPLY));
        }
        reply.extend_from_slice(&chunk);
    }
    Ok(reply)
}

/// The part of `/checkv2`'s reply popgate reads.
#[derive(Debug, Deserialize)]
struct Reply {
    #[serde(default)]
    is_skipped: bool,
    score: Option<f64>,
    required_score: Option<f64>,
    action: Option<String>,
}

/// `{"error": "..."}`, rspamd's error replies.
fn error_text(reply: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct E {
        error: String,
    }
    let e: E = serde_json::from_slice(reply).ok()?;
    Some(printable(&e.error.as_bytes()[..e.error.len().min(200)]))
}

/// The verdict of a `/checkv2` reply: by `action` (`no action` and `greylist` are clean;
/// `add header`, `rewrite subject`, `soft reject` and `reject` spam). A message rspamd skipped
/// (`is_skipped`, e.g. by its settings) without an action that says spam was not scanned: an
/// error. A pre-filter's decision (`is_skipped` with `reject`, as for GTUBE) stands.
pub(crate) fn parse_reply(reply: &[u8]) -> Result<Finding, ScanError> {
    let r: Reply = serde_json::from_slice(reply).map_err(|e| {
        ScanError::Unexpected(format!(
            "not rspamd's JSON ({e}): {}",
            printable(&reply[..reply.len().min(100)])
        ))
    })?;
    let Some(action) = r.action else {
        return Err(ScanError::Unexpected("rspamd's reply has no action".into()));
    };
    let verdict = match action.as_str() {
        "no action" | "greylist" => ScanVerdict::Clean,
        "add header" | "rewrite subject" | "soft reject" | "reject" => ScanVerdict::Spam,
        other => {
            return Err(ScanError::Unexpected(format!(
                "unknown rspamd action {:?}",
                printable(&other.as_bytes()[..other.len().min(64)])
            )));
        }
    };
    if r.is_skipped && verdict == ScanVerdict::Clean {
        return Err(ScanError::Refused(format!(
            "rspamd skipped the message (action {action})"
        )));
    }
    let score = match (r.score, r.required_score) {
        (Some(s), Some(req)) if s.is_finite() && req.is_finite() => Some((s, req)),
        _ => None,
    };
    Ok(Finding {
        verdict,
        detail: Some(action),
        score,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    type Parsed = (ScanVerdict, Option<String>, Option<(f64, f64)>);

    fn verdict(json: &str) -> Result<Parsed, String> {
        parse_reply(json.as_bytes())
            .map(|f| (f.verdict, f.detail, f.score))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_action_decides_the_verdict() {
        for (action, want) in [
            ("no action", ScanVerdict::Clean),
            ("greylist", ScanVerdict::Clean),
            ("add header", ScanVerdict::Spam),
            ("rewrite subject", ScanVerdict::Spam),
            ("soft reject", ScanVerdict::Spam),
            ("reject", ScanVerdict::Spam),
        ] {
            let json = format!(
                r#"{{"is_skipped":false,"score":7.5,"required_score":15.0,"action":"{action}","symbols":{{}}}}"#
            );
            assert_eq!(
                verdict(&json),
                Ok((want, Some(action.to_owned()), Some((7.5, 15.0))))
            );
        }
    }

    #[test]
    fn skipped_unknown_and_malformed_replies_are_errors() {
        assert_eq!(
            verdict(r#"{"is_skipped":true,"score":0,"required_score":15,"action":"no action"}"#),
            Err("rspamd skipped the message (action no action)".into())
        );
        // GTUBE: a pre-filter's reject, marked skipped.
        assert_eq!(
            verdict(r#"{"is_skipped":true,"score":15,"required_score":15,"action":"reject"}"#),
            Ok((ScanVerdict::Spam, Some("reject".into()), Some((15.0, 15.0))))
        );
        assert!(
            verdict(r#"{"action":"discard"}"#)
                .unwrap_err()
                .contains("unknown")
        );
        assert!(verdict(r#"{"score":1}"#).unwrap_err().contains("no action"));
        assert!(
            verdict("<html>")
                .unwrap_err()
                .starts_with("unexpected reply")
        );
        assert_eq!(
            verdict(r#"{"action":"no action"}"#),
            Ok((ScanVerdict::Clean, Some("no action".into()), None))
        );
    }
}
