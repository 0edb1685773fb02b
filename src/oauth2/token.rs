//! Access tokens: obtained from the token endpoint with the `oauth2` crate (reqwest, rustls
//! with ring), cached per mailbox, refreshed ahead of expiry, at most one request in flight per
//! mailbox (concurrent logins wait for it and share its result), rotated refresh tokens saved.
//!
//! The cache is process-wide ([`cache`]), keyed by token endpoint, client, scope and mailbox:
//! a reload builds new bridges, and they find the tokens the old ones got.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use oauth2::basic::BasicClient;
use oauth2::{
    ClientId, ClientSecret, RefreshToken, RequestTokenError, Scope, TokenResponse as _, TokenUrl,
};

use super::store::TokenStore;
use crate::config::Oauth2Grant;

/// Lifetime assumed when the server does not say (`expires_in` is optional in RFC 6749).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// After a failed request, further logins for the mailbox get the same error for this long
/// instead of each asking again (one log line, one request, while the endpoint is down).
const FAILURE_HOLD: Duration = Duration::from_secs(2);
/// Timeout of one token request.
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

/// A cached access token.
#[derive(Clone)]
struct Cached {
    access: String,
    expires: Instant,
    lifetime: Duration,
}

#[derive(Default)]
struct Slot {
    token: Option<Cached>,
    failed: Option<(Instant, String)>,
}

type SlotRef = Arc<tokio::sync::Mutex<Slot>>;

/// Every cached token of the process.
#[derive(Default)]
pub(crate) struct TokenCache {
    slots: Mutex<HashMap<String, SlotRef>>,
}

/// The process-wide token cache (it outlives reloads).
pub(crate) fn cache() -> &'static TokenCache {
    static CACHE: OnceLock<TokenCache> = OnceLock::new();
    CACHE.get_or_init(TokenCache::default)
}

impl TokenCache {
    fn slot(&self, key: &str) -> SlotRef {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(key.to_owned()).or_default().clone()
    }
}

/// Why no token could be had; the text names no token or secret.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub(crate) struct TokenError(pub(crate) String);

/// The HTTP client for token requests: rustls (ring), system roots, no redirects (the oauth2
/// crate's advice: a redirect could carry the request elsewhere).
pub(crate) fn http_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(HTTP_TIMEOUT)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {}", chain(&e)))
}

/// Where one bridge gets its tokens.
pub(crate) struct TokenSource {
    /// Upstream label, for log lines.
    pub(crate) label: String,
    pub(crate) token_url: TokenUrl,
    pub(crate) client_id: String,
    pub(crate) secret: String,
    pub(crate) grant: Oauth2Grant,
    pub(crate) scopes: Vec<String>,
    pub(crate) refresh_ahead: Duration,
    /// `grant = "refresh_token"` only.
    pub(crate) store: Option<TokenStore>,
    pub(crate) http: reqwest::Client,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("label", &self.label)
            .field("token_url", &self.token_url.as_str())
            .field("client_id", &self.client_id)
            .field("secret", &"<redacted>")
            .field("grant", &self.grant)
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    fn key(&self, mailbox: &str) -> String {
        let who = match self.grant {
            Oauth2Grant::RefreshToken => mailbox,
            // One application token for every mailbox.
            Oauth2Grant::ClientCredentials => "",
        };
        format!(
            "{}\n{}\n{}\n{:?}\n{who}",
            self.token_url.as_str(),
            self.client_id,
            self.scopes.join(" "),
            self.grant
        )
    }

    /// An access token for `mailbox`: the cached one while it is fresh (not within
    /// `refresh_ahead` of expiry, and not `refused`, a token the upstream just refused), else a
    /// new one from the token endpoint. One request per mailbox at a time.
    pub(crate) async fn token(
        &self,
        mailbox: &str,
        refused: Option<&str>,
    ) -> Result<String, TokenError> {
        let slot = cache().slot(&self.key(mailbox));
        let mut slot = slot.lock().await;
        let now = Instant::now();
        if let Some(c) = &slot.token {
            // A token whose whole life is shorter than refresh_ahead would never be used.
            let ahead = self.refresh_ahead.min(c.lifetime / 2);
            if refused != Some(c.access.as_str()) && now + ahead < c.expires {
                return Ok(c.access.clone());
            }
        }
        if let (None, Some((at, why))) = (refused, &slot.failed)
            && now.duration_since(*at) < FAILURE_HOLD
        {
            return Err(TokenError(why.clone()));
        }
        slot.token = None;
        match self.fetch(mailbox).await {
            Ok((access, lifetime)) => {
                let lifetime = lifetime.unwrap_or(DEFAULT_LIFETIME);
                slot.failed = None;
                slot.token = Some(Cached {
                    access: access.clone(),
                    expires: Instant::now() + lifetime,
                    lifetime,
                });
                tracing::debug!(
                    upstream = %self.label,
                    mailbox,
                    lifetime_s = lifetime.as_secs(),
                    "oauth2: new access token"
                );
                Ok(access)
            }
            Err(why) => {
                tracing::warn!(
                    upstream = %self.label,
                    mailbox,
                    token_url = %self.token_url.as_str(),
                    grant = ?self.grant,
                    "oauth2: no access token: {why}"
                );
                slot.failed = Some((Instant::now(), why.clone()));
                Err(TokenError(why))
            }
        }
    }

    async fn fetch(&self, mailbox: &str) -> Result<(String, Option<Duration>), String> {
        let client = BasicClient::new(ClientId::new(self.client_id.clone()))
            .set_client_secret(ClientSecret::new(self.secret.clone()))
            .set_token_uri(self.token_url.clone());
        let scopes = self.scopes.iter().map(|s| Scope::new(s.clone()));
        match self.grant {
            Oauth2Grant::RefreshToken => {
                let store = self.store.as_ref().ok_or("no tokens_file")?;
                let refresh = store.get(mailbox)?.ok_or_else(|| {
                    format!(
                        "no refresh token for this mailbox in {} (run `popgate oauth2 login`)",
                        store.path().display()
                    )
                })?;
                let resp = client
                    .exchange_refresh_token(&RefreshToken::new(refresh))
                    .add_scopes(scopes)
                    .request_async(&self.http)
                    .await
                    .map_err(describe)?;
                if let Some(rotated) = resp.refresh_token() {
                    store
                        .set(mailbox, rotated.secret())
                        .map_err(|e| format!("cannot save the rotated refresh token: {e}"))?;
                }
                Ok((resp.access_token().secret().clone(), resp.expires_in()))
            }
            Oauth2Grant::ClientCredentials => {
                let resp = client
                    .exchange_client_credentials()
                    .add_scopes(scopes)
                    .request_async(&self.http)
                    .await
                    .map_err(describe)?;
                Ok((resp.access_token().secret().clone(), resp.expires_in()))
            }
        }
    }
}

/// A token request's failure, without anything from the response body but the error code and
/// description (a body that failed to parse might hold a token).
pub(crate) fn describe<RE, T>(e: RequestTokenError<RE, T>) -> String
where
    RE: std::error::Error + 'static,
    T: oauth2::ErrorResponse + std::fmt::Display + 'static,
{
    match e {
        RequestTokenError::ServerResponse(r) => format!("token endpoint refused: {r}"),
        RequestTokenError::Request(e) => format!("token request failed: {}", chain(&e)),
        RequestTokenError::Parse(_, _) => "token endpoint sent an unreadable response".into(),
        RequestTokenError::Other(s) => format!("token endpoint: {s}"),
    }
}

/// `e` and its sources, `: `-joined (reqwest says "error sending request", the cause is below).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        cur = s.source();
    }
    out
}
