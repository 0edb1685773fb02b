//! `popgate oauth2 login`: the device authorization grant (RFC 8628) that gets a mailbox's
//! first refresh token. popgate prints where to go and which code to enter, polls the token
//! endpoint until the user has approved, and stores the refresh token in `tokens_file`.

use std::path::Path;

use oauth2::basic::BasicClient;
use oauth2::{
    ClientId, ClientSecret, DeviceAuthorizationUrl, Scope, StandardDeviceAuthorizationResponse,
    TokenResponse as _, TokenUrl,
};

use super::store::TokenStore;
use super::token::{describe, http_client};
use crate::config::Oauth2Config;

/// `popgate oauth2 login` failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceLoginError {
    /// The config lacks something the flow needs.
    #[error("config: {0}")]
    Config(String),
    /// The authorization server refused or could not be reached.
    #[error("{0}")]
    Server(String),
    /// The token could not be stored.
    #[error("tokens_file: {0}")]
    Store(String),
}

/// Runs the device flow for `mailbox` with the bridge config `cfg` (paths relative to
/// `base_dir`); `say` gets the lines for the user (URL and code). Returns the tokens file.
pub async fn device_login(
    cfg: &Oauth2Config,
    base_dir: &Path,
    mailbox: &str,
    mut say: impl FnMut(&str),
) -> Result<std::path::PathBuf, DeviceLoginError> {
    let conf = DeviceLoginError::Config;
    let device_url = cfg
        .device_authorization_url
        .clone()
        .ok_or_else(|| conf("oauth2.device_authorization_url is not set".into()))?;
    let tokens_file = cfg
        .tokens_file
        .as_ref()
        .ok_or_else(|| conf("oauth2.tokens_file is not set".into()))?;
    super::check_url(&cfg.token_url, cfg.allow_insecure_token_url)
        .map_err(|e| conf(format!("token_url: {e}")))?;
    super::check_url(&device_url, cfg.allow_insecure_token_url)
        .map_err(|e| conf(format!("device_authorization_url: {e}")))?;
    let store = TokenStore::new(base_dir.join(tokens_file));
    let secret = super::read_secret(cfg, base_dir).map_err(|(k, e)| conf(format!("{k}: {e}")))?;
    let http = http_client().map_err(DeviceLoginError::Server)?;
    let mut client = BasicClient::new(ClientId::new(cfg.client_id.clone()))
        .set_token_uri(
            TokenUrl::new(cfg.token_url.clone()).map_err(|e| conf(format!("token_url: {e}")))?,
        )
        .set_device_authorization_url(
            DeviceAuthorizationUrl::new(device_url)
                .map_err(|e| conf(format!("device_authorization_url: {e}")))?,
        );
    if !secret.is_empty() {
        client = client.set_client_secret(ClientSecret::new(secret));
    }
    let scopes: Vec<Scope> = cfg
        .scope
        .as_deref()
        .unwrap_or_default()
        .split_whitespace()
        .map(|s| Scope::new(s.to_owned()))
        .collect();
    let details: StandardDeviceAuthorizationResponse = client
        .exchange_device_code()
        .add_scopes(scopes)
        .request_async(&http)
        .await
        .map_err(|e| DeviceLoginError::Server(describe(e)))?;
    say(&format!(
        "To let popgate read {mailbox}, open {} and enter the code {}",
        details.verification_uri().as_str(),
        details.user_code().secret()
    ));
    if let Some(complete) = details.verification_uri_complete() {
        say(&format!("(or open {})", complete.secret()));
    }
    say("Waiting for the approval...");
    let token = client
        .exchange_device_access_token(&details)
        .request_async(&http, tokio::time::sleep, None)
        .await
        .map_err(|e| DeviceLoginError::Server(describe(e)))?;
    let refresh = token.refresh_token().ok_or_else(|| {
        DeviceLoginError::Server(
            "the server gave no refresh token (for Microsoft, add offline_access to scope)".into(),
        )
    })?;
    store
        .set(mailbox, refresh.secret())
        .map_err(DeviceLoginError::Store)?;
    Ok(store.path().to_owned())
}
