//! Dialling the POP3 server behind popgate.

use tokio::net::TcpStream;

use crate::config::UpstreamConfig;
use crate::error::SessionError;
use crate::tls::Stream;

/// Open a connection to the upstream within its connect timeout.
pub async fn connect(cfg: &UpstreamConfig) -> Result<Stream, SessionError> {
    let fail = |reason: String| SessionError::Connect {
        address: cfg.address.clone(),
        reason,
    };
    let tcp = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(&cfg.address))
        .await
        .map_err(|_| fail(format!("timed out after {:?}", cfg.connect_timeout)))?
        .map_err(|e| fail(e.to_string()))?;
    // Commands and short responses must not wait for Nagle.
    tcp.set_nodelay(true).map_err(|e| fail(e.to_string()))?;
    Ok(Stream::Plain(tcp))
}
