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
/// How long a login waits for another instance's refresh (`[state] backend = "redis"`): the
/// refresh lock's expiry and a little more, after which it takes the lock itself.
const FLEET_WAIT: Duration = Duration::from_secs(25);
/// How often a waiting login looks for that result.
const FLEET_POLL: Duration = Duration::from_millis(50);

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

/// The largest token or device-authorization response popgate reads (a real one is a few
/// KiB): a hostile or spoofed endpoint cannot make popgate buffer more.
pub(crate) const MAX_RESPONSE: usize = 64 * 1024;
/// Timeout of the connection to the token endpoint (within [`HTTP_TIMEOUT`]).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The HTTP client for token requests: rustls (ring), system roots, no redirects (the oauth2
/// crate's advice: a redirect could carry the request elsewhere), [`HTTP_TIMEOUT`] for the
/// whole exchange (connect to the last byte of the body), at most [`MAX_RESPONSE`] read.
#[derive(Debug, Clone)]
pub(crate) struct Http(reqwest::Client);

/// A token request failed below OAuth2 (connection, timeout, size).
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpError {
    /// The request or the response failed (connect, TLS, timeout...).
    #[error("{}", chain(.0))]
    Request(#[from] reqwest::Error),
    /// The response was longer than [`MAX_RESPONSE`].
    #[error("the response is larger than {MAX_RESPONSE} bytes")]
    TooLarge,
    /// The response could not be handed on.
    #[error("{0}")]
    Http(#[from] oauth2::http::Error),
}

/// Builds the client (see [`Http`]).
pub(crate) fn http_client() -> Result<Http, String> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(HTTP_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .build()
        .map(Http)
        .map_err(|e| format!("cannot build the HTTP client: {}", chain(&e)))
}

impl<'c> oauth2::AsyncHttpClient<'c> for Http {
    type Error = HttpError;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<oauth2::HttpResponse, HttpError>> + Send + Sync + 'c>,
    >;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(async move {
            let mut response = self.0.execute(request.try_into()?).await?;
            if response
                .content_length()
                .is_some_and(|n| n > MAX_RESPONSE as u64)
            {
                return Err(HttpError::TooLarge);
            }
            let mut builder = oauth2::http::Response::builder().status(response.status());
            for (name, value) in response.headers() {
                builder = builder.header(name, value);
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                if body.len() + chunk.len() > MAX_RESPONSE {
                    return Err(HttpError::TooLarge);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(builder.body(lenient_expires_in(body))?)
        })
    }
}

/// RFC 6749 makes `expires_in` a number of seconds, and some servers send `3600.0` or
/// `"3600"`; the oauth2 crate reads only an unsigned integer and would call the whole response
/// unreadable. Such a value is rewritten as whole seconds (rounded down); anything else is
/// left as it came.
fn lenient_expires_in(body: Vec<u8>) -> Vec<u8> {
    let Ok(serde_json::Value::Object(mut map)) = serde_json::from_slice(&body) else {
        return body;
    };
    let seconds = match map.get("expires_in") {
        Some(serde_json::Value::Number(n)) if n.as_u64().is_none() => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
        _ => return body,
    };
    let Some(seconds) = seconds.filter(|s| s.is_finite()) else {
        return body;
    };
    // `as` saturates: a negative value is 0, an enormous one u64::MAX.
    map.insert("expires_in".into(), (seconds.floor() as u64).into());
    serde_json::to_vec(&map).unwrap_or(body)
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
    pub(crate) http: Http,
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
    /// new one from the token endpoint. One request per mailbox at a time; with `[state]
    /// backend = "redis"`, one in the whole fleet ([`TokenSource::token_from_fleet`]).
    pub(crate) async fn token(
        &self,
        mailbox: &str,
        refused: Option<&str>,
    ) -> Result<String, TokenError> {
        let key = self.key(mailbox);
        let slot = cache().slot(&key);
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
        let result = match crate::state::token_store() {
            Some(store) => {
                self.token_from_fleet(&store, &key, mailbox, refused, &mut slot)
                    .await
            }
            None => {
                slot.token = None;
                self.fetch(mailbox).await.map(|(access, lifetime)| {
                    let lifetime = lifetime.unwrap_or(DEFAULT_LIFETIME);
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
                    access
                })
            }
        };
        match result {
            Ok(access) => {
                slot.failed = None;
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

    /// The fleet's token (`[state] backend = "redis"`): the one in the store while it is
    /// fresh; otherwise the instance that gets the refresh lock refreshes (and writes the
    /// rotated refresh token and the new access token to the store, fenced, before anyone
    /// uses them) while the others poll the store for its result, for at most
    /// [`FLEET_WAIT`]. While the store does not answer, the token cached here serves until it
    /// expires; no refresh is made without the store (it would spend a refresh token the
    /// others may still hold).
    async fn token_from_fleet(
        &self,
        store: &crate::state::Store,
        key: &str,
        mailbox: &str,
        refused: Option<&str>,
        slot: &mut Slot,
    ) -> Result<String, String> {
        let down = |slot: &mut Slot, e: crate::state::StoreError| match &slot.token {
            Some(c) if refused != Some(c.access.as_str()) && Instant::now() < c.expires => {
                Ok(c.access.clone())
            }
            _ => Err(format!(
                "the token store does not answer ({e}) and no unexpired token is cached here"
            )),
        };
        let deadline = Instant::now() + FLEET_WAIT;
        loop {
            let shared = match store.token_read(key).await {
                Ok(t) => t,
                Err(e) => return down(slot, e),
            };
            if let Some(c) = self.usable(&shared, refused) {
                slot.token = Some(c.clone());
                return Ok(c.access);
            }
            match store.token_lock(key).await {
                Err(e) => return down(slot, e),
                Ok(Some(fence)) => {
                    let result = self
                        .refresh_for_fleet(store, key, mailbox, fence, refused, slot)
                        .await;
                    store.token_unlock(key, fence).await;
                    return result;
                }
                Ok(None) if Instant::now() >= deadline => {
                    return Err(format!(
                        "another instance is refreshing this token and gave no result within \
                         {FLEET_WAIT:?}"
                    ));
                }
                Ok(None) => tokio::time::sleep(FLEET_POLL).await,
            }
        }
    }

    /// `shared` as a cached token, if it can be used now.
    fn usable(
        &self,
        shared: &crate::state::tokens::SharedToken,
        refused: Option<&str>,
    ) -> Option<Cached> {
        if shared.access.is_empty() || refused == Some(shared.access.as_str()) {
            return None;
        }
        let lifetime = Duration::from_millis(shared.lifetime_ms);
        let ahead = self.refresh_ahead.min(lifetime / 2);
        let now_ms = crate::state::tokens::unix_ms();
        let left = Duration::from_millis(shared.expires_ms.saturating_sub(now_ms));
        (left > ahead).then(|| Cached {
            access: shared.access.clone(),
            expires: Instant::now() + left,
            lifetime,
        })
    }

    /// The refresh, holding the fleet's lock under `fence`.
    async fn refresh_for_fleet(
        &self,
        store: &crate::state::Store,
        key: &str,
        mailbox: &str,
        fence: u64,
        refused: Option<&str>,
        slot: &mut Slot,
    ) -> Result<String, String> {
        // The previous holder may have written between our read and our lock.
        let shared = store
            .token_read(key)
            .await
            .map_err(|e| format!("the token store does not answer: {e}"))?;
        if let Some(c) = self.usable(&shared, refused) {
            slot.token = Some(c.clone());
            return Ok(c.access);
        }
        let got = match self.grant {
            Oauth2Grant::ClientCredentials => self.exchange(None).await.map_err(|(why, _)| why)?,
            Oauth2Grant::RefreshToken => {
                let file = self.store.as_ref().ok_or("no tokens_file")?;
                // The tokens_file seeds the store and is its backup.
                let seed = file.get(mailbox)?;
                let current = shared
                    .refresh
                    .clone()
                    .or_else(|| seed.clone())
                    .ok_or_else(|| {
                        format!(
                            "no refresh token for this mailbox in the store or in {} (run `popgate \
                         oauth2 login`)",
                            file.path().display()
                        )
                    })?;
                match self.exchange(Some(&current)).await {
                    Ok(got) => got,
                    // The store's token was refused, and the file has another one (`popgate
                    // oauth2 login` ran since): that one.
                    Err((_, true)) if seed.as_ref().is_some_and(|s| *s != current) => {
                        let seed = seed.unwrap_or_default();
                        tracing::info!(upstream = %self.label, mailbox,
                            "oauth2: the store's refresh token was refused; trying the tokens_file's");
                        let mut got = self.exchange(Some(&seed)).await.map_err(|(why, _)| why)?;
                        got.2 = got.2.or(Some(seed));
                        got
                    }
                    Err((why, _)) => return Err(why),
                }
            }
        };
        let (access, lifetime, rotated) = got;
        let lifetime = lifetime.unwrap_or(DEFAULT_LIFETIME);
        let lifetime_ms = u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX);
        let token = crate::state::tokens::SharedToken {
            access: access.clone(),
            expires_ms: crate::state::tokens::unix_ms().saturating_add(lifetime_ms),
            lifetime_ms,
            refresh: rotated.clone(),
        };
        match store.token_write(key, fence, &token).await {
            Ok(true) => {}
            Ok(false) => tracing::warn!(upstream = %self.label, mailbox,
                "oauth2: a newer refresh wrote to the token store first (this one took longer \
                 than the lock)"),
            Err(e) => tracing::warn!(upstream = %self.label, mailbox, error = %e,
                "oauth2: the new token could not be written to the token store; kept here and \
                 in the tokens_file"),
        }
        if let (Some(rotated), Some(file)) = (&rotated, &self.store)
            && let Err(e) = file.set(mailbox, rotated)
        {
            tracing::warn!(upstream = %self.label, mailbox,
                "oauth2: cannot save the rotated refresh token in the tokens_file: {e}");
        }
        tracing::debug!(upstream = %self.label, mailbox, fence,
            lifetime_s = lifetime.as_secs(), "oauth2: new access token for the fleet");
        slot.token = Some(Cached {
            access: access.clone(),
            expires: Instant::now() + lifetime,
            lifetime,
        });
        Ok(access)
    }

    async fn fetch(&self, mailbox: &str) -> Result<(String, Option<Duration>), String> {
        match self.grant {
            Oauth2Grant::RefreshToken => {
                let store = self.store.as_ref().ok_or("no tokens_file")?;
                let refresh = store.get(mailbox)?.ok_or_else(|| {
                    format!(
                        "no refresh token for this mailbox in {} (run `popgate oauth2 login`)",
                        store.path().display()
                    )
                })?;
                let (access, lifetime, rotated) = self
                    .exchange(Some(&refresh))
                    .await
                    .map_err(|(why, _)| why)?;
                if let Some(rotated) = rotated {
                    store
                        .set(mailbox, &rotated)
                        .map_err(|e| format!("cannot save the rotated refresh token: {e}"))?;
                }
                Ok((access, lifetime))
            }
            Oauth2Grant::ClientCredentials => {
                let (access, lifetime, _) = self.exchange(None).await.map_err(|(why, _)| why)?;
                Ok((access, lifetime))
            }
        }
    }

    /// One token request: with `refresh`, the refresh_token grant, else client_credentials.
    /// The access token, its lifetime and a rotated refresh token; on failure the reason and
    /// whether the server said `invalid_grant`.
    async fn exchange(
        &self,
        refresh: Option<&str>,
    ) -> Result<(String, Option<Duration>, Option<String>), (String, bool)> {
        let client = BasicClient::new(ClientId::new(self.client_id.clone()))
            .set_client_secret(ClientSecret::new(self.secret.clone()))
            .set_token_uri(self.token_url.clone());
        let scopes = self.scopes.iter().map(|s| Scope::new(s.clone()));
        let resp = match refresh {
            Some(refresh) => {
                client
                    .exchange_refresh_token(&RefreshToken::new(refresh.to_owned()))
                    .add_scopes(scopes)
                    .request_async(&self.http)
                    .await
            }
            None => {
                client
                    .exchange_client_credentials()
                    .add_scopes(scopes)
                    .request_async(&self.http)
                    .await
            }
        };
        match resp {
            Ok(resp) => Ok((
                resp.access_token().secret().clone(),
                resp.expires_in(),
                resp.refresh_token().map(|r| r.secret().clone()),
            )),
            Err(e) => {
                let invalid_grant = matches!(&e, RequestTokenError::ServerResponse(r)
                    if *r.error() == oauth2::basic::BasicErrorResponseType::InvalidGrant);
                Err((describe(e), invalid_grant))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn expires(body: &str) -> serde_json::Value {
        let out = lenient_expires_in(body.as_bytes().to_vec());
        serde_json::from_slice::<serde_json::Value>(&out).unwrap()["expires_in"].clone()
    }

    #[test]
    fn expires_in_with_a_fraction_or_as_text_is_read_as_seconds() {
        assert_eq!(expires(r#"{"expires_in": 4.0}"#), 4);
        assert_eq!(expires(r#"{"expires_in": 3599.9}"#), 3599);
        assert_eq!(expires(r#"{"expires_in": "3600"}"#), 3600);
        assert_eq!(expires(r#"{"expires_in": -5.0}"#), 0);
        assert_eq!(expires(r#"{"expires_in": 60}"#), 60);
        // Not JSON, or no expires_in: untouched.
        assert_eq!(lenient_expires_in(b"not json".to_vec()), b"not json");
        let plain = br#"{"access_token":"x"}"#.to_vec();
        assert_eq!(lenient_expires_in(plain.clone()), plain);
    }
}
