//! The OAuth2 bridge: clients log in to popgate with a local password, popgate logs in to an
//! OAuth-only upstream (Microsoft 365, Google, Dovecot's oauth2 passdb) with `AUTH XOAUTH2` or
//! `AUTH OAUTHBEARER` and an access token it obtains and refreshes itself.
//!
//! One [`Bridge`] per upstream with `[upstream.oauth2]`, all of them in [`Bridges`] (built by
//! `check::prepare` at start and reload, kept in the session snapshot). A login is two calls,
//! so that a wrong password never dials the upstream:
//! 1. [`Bridge::authorize`] before connecting: checks the password against the local
//!    credential (Argon2, off the async workers, at most `max_concurrent_verifications` at
//!    once through a `limits::WorkGate`, after the client's login penalty) and gets
//!    an access token (cached or new);
//! 2. on the connected stream (greeting read), the protocol core's bearer login
//!    (`proxy::dialogue`) with [`Authorized::token`], and once more with
//!    [`Bridge::fresh_token`] if the server refuses the first.
//!
//! Errors come with the status line for the client ([`BridgeError::client_reply`]). Tokens,
//! refresh tokens, the client secret and the password never reach a log line or an error text.

mod credentials;
mod login;
mod store;
mod token;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{Config, ConfigError, Oauth2Config, Oauth2Grant, Oauth2Mechanism};

pub use credentials::hash_password;
pub use login::{DeviceLoginError, device_login};

use credentials::Credentials;
use store::TokenStore;
use token::{TokenError, TokenSource};

/// A login through the bridge failed; [`BridgeError::client_reply`] is what the client gets.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// Unknown user or wrong password (local check; the upstream was not asked).
    #[error("wrong local user or password")]
    BadPassword,
    /// Too many password checks at once: the login was turned away before its check.
    #[error("password check not run: {0}")]
    Busy(crate::limits::Busy),
    /// No access token (token endpoint down, 5xx, invalid_grant, no refresh token...).
    #[error("no OAuth2 access token: {0}")]
    Token(String),
    /// The upstream refused a fresh token too (its `-ERR` line).
    #[error("upstream refused the OAuth2 token: {}", String::from_utf8_lossy(.0).trim_end())]
    Refused(Vec<u8>),
    /// The upstream answered something unexpected to `AUTH` (mechanism not offered?).
    #[error("unexpected upstream answer to AUTH: {}", String::from_utf8_lossy(.0).trim_end())]
    Unexpected(Vec<u8>),
    /// The upstream connection failed during the exchange.
    #[error("upstream I/O during AUTH: {0}")]
    Io(#[from] std::io::Error),
}

impl BridgeError {
    /// The status line for the client (with CRLF).
    pub fn client_reply(&self) -> Vec<u8> {
        use crate::pop3::replies;
        replies::line(match self {
            BridgeError::BadPassword => replies::OAUTH2_BAD_PASSWORD,
            BridgeError::Busy(_) => replies::OAUTH2_BUSY,
            BridgeError::Token(_) => replies::OAUTH2_NO_TOKEN,
            BridgeError::Refused(_) | BridgeError::Unexpected(_) => replies::OAUTH2_REFUSED,
            BridgeError::Io(_) => replies::OAUTH2_LOST_CONNECTION,
        })
    }

    /// Whether this is a failed login of the client's own making (the login penalty applies).
    pub fn is_bad_password(&self) -> bool {
        matches!(self, BridgeError::BadPassword)
    }
}

impl From<TokenError> for BridgeError {
    fn from(e: TokenError) -> Self {
        BridgeError::Token(e.0)
    }
}

/// A client that passed the local check, with the token to log in with. Not `Debug`-printed
/// with its token.
pub struct Authorized {
    mailbox: String,
    token: String,
}

impl std::fmt::Debug for Authorized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorized")
            .field("mailbox", &self.mailbox)
            .finish_non_exhaustive()
    }
}

impl Authorized {
    /// The upstream mailbox the client logs in to.
    pub fn mailbox(&self) -> &str {
        &self.mailbox
    }

    /// The access token to log in with (never to be logged).
    pub fn token(&self) -> &str {
        &self.token
    }
}

/// The OAuth2 bridge of one upstream.
#[derive(Debug)]
pub struct Bridge {
    label: String,
    credentials: Arc<Credentials>,
    tokens: TokenSource,
    mechanism: Oauth2Mechanism,
    host: String,
    port: u16,
    /// Bounds the password checks running and waiting (`max_concurrent_verifications`);
    /// shared with the bridge of the same upstream before and after a reload ([`gate_for`]).
    gate: Arc<crate::limits::WorkGate>,
}

/// Password checks that may wait for a place, per place to run one: the line holds this many
/// times `max_concurrent_verifications` (one place per client address).
const VERIFY_QUEUE_PER_SLOT: usize = 16;
/// How long a login waits for its password check to start before `-ERR [SYS/TEMP]`.
const VERIFY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The gate of the bridge of upstream `label` with `credentials`, for `slots` checks at once:
/// the one the bridge had before a reload while the setting stays, so that checks still running
/// on the old bridge count against the new one's bound too.
fn gate_for(label: &str, credentials: &Path, slots: usize) -> Arc<crate::limits::WorkGate> {
    type Gates =
        std::sync::Mutex<HashMap<(String, PathBuf), (usize, Arc<crate::limits::WorkGate>)>>;
    static GATES: std::sync::OnceLock<Gates> = std::sync::OnceLock::new();
    let mut gates = GATES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let key = (label.to_owned(), credentials.to_owned());
    match gates.get(&key) {
        Some((n, gate)) if *n == slots => gate.clone(),
        _ => {
            let gate = Arc::new(crate::limits::WorkGate::new(
                slots,
                slots.saturating_mul(VERIFY_QUEUE_PER_SLOT),
                VERIFY_WAIT,
            ));
            gates.insert(key, (slots, gate.clone()));
            gate
        }
    }
}

/// The default `max_concurrent_verifications`: one check per CPU.
fn default_verifications() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

impl Bridge {
    /// Builds the bridge of upstream `label` (at `address`, `host:port`): reads the client
    /// secret and the credentials file. `Err((key, reason))` names the bad `oauth2` key.
    fn new(
        label: &str,
        address: &str,
        cfg: &Oauth2Config,
        base_dir: &Path,
        http: &token::Http,
    ) -> Result<Bridge, (&'static str, String)> {
        let token_url = oauth2::TokenUrl::new(cfg.token_url.clone())
            .map_err(|e| ("token_url", format!("not a URL: {e}")))?;
        check_url(&cfg.token_url, cfg.allow_insecure_token_url).map_err(|e| ("token_url", e))?;
        if let Some(url) = &cfg.device_authorization_url {
            check_url(url, cfg.allow_insecure_token_url)
                .map_err(|e| ("device_authorization_url", e))?;
        }
        let secret = read_secret(cfg, base_dir)?;
        let store = match cfg.grant {
            Oauth2Grant::RefreshToken => {
                let path = cfg.tokens_file.as_ref().ok_or((
                    "tokens_file",
                    "required with grant = \"refresh_token\"".to_owned(),
                ))?;
                let store = TokenStore::new(base_dir.join(path));
                store.read_all().map_err(|e| ("tokens_file", e))?;
                Some(store)
            }
            Oauth2Grant::ClientCredentials => None,
        };
        let credentials = Credentials::load(&base_dir.join(&cfg.credentials_file))
            .map_err(|e| ("credentials_file", e))?;
        let (host, port) = crate::config::split_host_port(address)
            .ok_or(("address", format!("{address:?} is not host:port")))?;
        let slots = match cfg.max_concurrent_verifications {
            Some(0) => {
                return Err((
                    "max_concurrent_verifications",
                    "must be at least 1".to_owned(),
                ));
            }
            Some(n) => n,
            None => default_verifications(),
        };
        Ok(Bridge {
            label: label.to_owned(),
            credentials: Arc::new(credentials),
            tokens: TokenSource {
                label: label.to_owned(),
                token_url,
                client_id: cfg.client_id.clone(),
                secret,
                grant: cfg.grant,
                scopes: cfg
                    .scope
                    .as_deref()
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect(),
                refresh_ahead: cfg.refresh_ahead,
                store,
                http: http.clone(),
            },
            mechanism: cfg.mechanism,
            host: host.to_owned(),
            port,
            gate: gate_for(label, &base_dir.join(&cfg.credentials_file), slots),
        })
    }

    /// Step 1, before dialling: the local password check, then an access token for the
    /// user's mailbox. A wrong password is [`BridgeError::BadPassword`] (and costs the same
    /// time for unknown users). `client` is the client's address; `penalty` the failed-login
    /// delay it is under, waited before the check (an address guessing passwords pays its
    /// penalty before it costs popgate a hash, not after). Checks run at most
    /// `max_concurrent_verifications` at once; a login that finds no place within a short wait
    /// is [`BridgeError::Busy`].
    pub async fn authorize(
        &self,
        user: &str,
        password: &[u8],
        client: std::net::IpAddr,
        penalty: Option<std::time::Duration>,
    ) -> Result<Authorized, BridgeError> {
        if let Some(d) = penalty {
            tokio::time::sleep(d).await;
        }
        let permit = match self.gate.enter(client).await {
            Ok(p) => p,
            Err(busy) => {
                tracing::warn!(
                    upstream = %self.label,
                    user,
                    client = %client,
                    "oauth2: password check turned away ({busy}): too many logins at once"
                );
                return Err(BridgeError::Busy(busy));
            }
        };
        let creds = self.credentials.clone();
        let (user_owned, pw) = (user.to_owned(), password.to_vec());
        // The permit moves into the check: a session that goes away meanwhile does not free
        // its place before the hash is done.
        let mailbox = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            creds.check(&user_owned, &pw)
        })
        .await
        .ok()
        .flatten();
        let Some(mailbox) = mailbox else {
            tracing::info!(upstream = %self.label, user, "oauth2: local password check failed");
            return Err(BridgeError::BadPassword);
        };
        let token = self.tokens.token(&mailbox, None).await?;
        Ok(Authorized { mailbox, token })
    }

    /// Step 2 is the protocol core's bearer login on the upstream connection (the session
    /// drives it): `AUTH` with [`Authorized::token`] as this bridge's
    /// [`Bridge::mechanism`] says; if the server refuses it, once more with
    /// [`Bridge::fresh_token`] (a token revoked at the server before its expiry).
    pub fn mechanism(&self) -> Oauth2Mechanism {
        self.mechanism
    }

    /// The upstream host and port (OAUTHBEARER's `host=` and `port=`).
    pub fn host_port(&self) -> (&str, u16) {
        (&self.host, self.port)
    }

    /// A fresh token for `who` after the server refused `stale`.
    pub async fn fresh_token(&self, who: &Authorized, stale: &str) -> Result<String, BridgeError> {
        tracing::info!(
            upstream = %self.label,
            mailbox = %who.mailbox,
            "oauth2: upstream refused the access token, retrying with a fresh one"
        );
        Ok(self.tokens.token(&who.mailbox, Some(stale)).await?)
    }

    /// The server refused a fresh token too (its `line`): logged, as the error.
    pub fn refused(&self, who: &Authorized, line: Vec<u8>) -> BridgeError {
        tracing::warn!(
            upstream = %self.label,
            mailbox = %who.mailbox,
            answer = %String::from_utf8_lossy(&line).trim_end(),
            "oauth2: upstream refused a fresh access token too"
        );
        BridgeError::Refused(line)
    }

    /// The server answered the login with something unexpected (`line`): logged, as the
    /// error.
    pub fn unexpected(&self, who: &Authorized, line: Vec<u8>) -> BridgeError {
        tracing::warn!(
            upstream = %self.label,
            mailbox = %who.mailbox,
            answer = %String::from_utf8_lossy(&line).trim_end(),
            "oauth2: unexpected upstream answer to AUTH {:?}",
            self.mechanism
        );
        BridgeError::Unexpected(line)
    }
}

/// The client secret from `client_secret_file` (first line) or `client_secret_env`.
fn read_secret(cfg: &Oauth2Config, base_dir: &Path) -> Result<String, (&'static str, String)> {
    match (&cfg.client_secret_file, &cfg.client_secret_env) {
        (Some(_), Some(_)) => Err((
            "client_secret_file",
            "set client_secret_file or client_secret_env, not both".into(),
        )),
        (Some(f), None) => {
            let path = base_dir.join(f);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| ("client_secret_file", format!("{}: {e}", path.display())))?;
            let secret = text.lines().next().unwrap_or_default().trim().to_owned();
            if secret.is_empty() {
                return Err(("client_secret_file", format!("{} is empty", path.display())));
            }
            Ok(secret)
        }
        (None, Some(var)) => match std::env::var(var) {
            Ok(s) if !s.is_empty() => Ok(s),
            _ => Err((
                "client_secret_env",
                format!("environment variable {var} is not set"),
            )),
        },
        // A public client (device flow apps often are): no secret.
        (None, None) => Ok(String::new()),
    }
}

/// The bridges of all upstreams with `[upstream.oauth2]`, by upstream label.
#[derive(Debug, Default)]
pub struct Bridges {
    by_upstream: HashMap<String, Arc<Bridge>>,
}

impl Bridges {
    /// Builds a bridge for each `(key prefix, label, address, oauth2)`; `path` is the config
    /// file (for messages), `base_dir` its directory. Warnings (for `popgate check` and the
    /// log) go to `warnings`.
    pub(crate) fn build<'a>(
        upstreams: impl IntoIterator<Item = (String, &'a str, &'a str, &'a Oauth2Config)>,
        base_dir: &Path,
        path: &Path,
        warnings: &mut Vec<String>,
    ) -> Result<Bridges, ConfigError> {
        let mut by_upstream = HashMap::new();
        let mut http = None;
        for (prefix, label, address, cfg) in upstreams {
            let invalid = |(key, reason): (&str, String)| ConfigError::Invalid {
                path: path.to_owned(),
                key: format!("{prefix}.{key}"),
                reason,
            };
            let client = match &http {
                Some(c) => c,
                None => http.insert(token::http_client().map_err(|e| invalid(("token_url", e)))?),
            };
            let bridge = Bridge::new(label, address, cfg, base_dir, client).map_err(invalid)?;
            warnings.extend(bridge_warnings(&prefix, cfg, base_dir, &bridge));
            by_upstream.insert(label.to_owned(), Arc::new(bridge));
        }
        Ok(Bridges { by_upstream })
    }

    /// The bridge of the upstream labelled `label` (`"default"` for an unnamed one).
    pub fn get(&self, label: &str) -> Option<&Arc<Bridge>> {
        self.by_upstream.get(label)
    }

    /// Whether no upstream uses OAuth2.
    pub fn is_empty(&self) -> bool {
        self.by_upstream.is_empty()
    }
}

fn bridge_warnings(prefix: &str, cfg: &Oauth2Config, base_dir: &Path, b: &Bridge) -> Vec<String> {
    let mut out = Vec::new();
    if !cfg.token_url.starts_with("https://") && !is_loopback_url(&cfg.token_url) {
        out.push(format!(
            "{prefix}.token_url: {} is not https: the client secret and tokens travel in clear",
            cfg.token_url
        ));
    }
    if let Some(f) = &cfg.tokens_file {
        let p: PathBuf = base_dir.join(f);
        if store::too_open(&p) {
            out.push(format!(
                "{prefix}.tokens_file: {} is readable by others (chmod 600)",
                p.display()
            ));
        }
        if !p.exists() {
            out.push(format!(
                "{prefix}.tokens_file: {} does not exist yet (popgate oauth2 login creates it)",
                p.display()
            ));
        }
    }
    if let Some(f) = &cfg.client_secret_file {
        let p = base_dir.join(f);
        if store::too_open(&p) {
            out.push(format!(
                "{prefix}.client_secret_file: {} is readable by others (chmod 600)",
                p.display()
            ));
        }
    }
    if b.credentials.len() == 0 {
        out.push(format!("{prefix}.credentials_file: no users"));
    }
    out
}

/// Whether `url` is `http://` to a loopback address (`127.0.0.0/8`, `::1`, `localhost`).
fn is_loopback_url(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    let host = u.host_str().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    u.scheme() == "http"
        && match bare.parse::<std::net::IpAddr>() {
            Ok(ip) => ip.is_loopback(),
            Err(_) => host.eq_ignore_ascii_case("localhost"),
        }
}

/// An endpoint URL popgate may send the client secret and tokens to: `https://`, or `http://`
/// to loopback, or any `http://` with `allow_insecure_token_url = true`.
fn check_url(url: &str, allow_insecure: bool) -> Result<(), String> {
    let scheme = reqwest::Url::parse(url)
        .map_err(|e| format!("not a URL: {e}"))?
        .scheme()
        .to_owned();
    match scheme.as_str() {
        "https" => Ok(()),
        "http" if allow_insecure || is_loopback_url(url) => Ok(()),
        "http" => Err(format!(
            "{url} is http:// to a host that is not loopback: the client secret and tokens \
             would travel in clear (use https://, or set allow_insecure_token_url = true)"
        )),
        other => Err(format!("{url}: scheme {other:?} is not http or https")),
    }
}

/// The config's bridges (secret and credentials read), one per upstream with
/// `[upstream.oauth2]`, by its label; warnings (insecure token URL, tokens file readable by
/// others...) go to `warnings`.
pub fn from_config(
    config: &Config,
    path: &Path,
    warnings: &mut Vec<String>,
) -> Result<Bridges, ConfigError> {
    let many = config.upstreams.len() > 1;
    Bridges::build(
        config.upstreams.iter().enumerate().filter_map(|(i, u)| {
            // The key names of Config::validate: `upstream[i].x` when there are several.
            let prefix = if many {
                format!("upstream[{i}].oauth2")
            } else {
                "upstream.oauth2".to_owned()
            };
            let address = u.address.first().map_or("", String::as_str);
            u.oauth2.as_ref().map(|o| (prefix, u.label(), address, o))
        }),
        &config.base_dir,
        path,
        warnings,
    )
}
