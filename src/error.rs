//! Typed errors. Session errors say which side failed: client, upstream or popgate itself.

use std::path::PathBuf;

/// A configuration problem; the message names the file, the key and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The TOML did not parse into the config types (message names key and line).
    #[error("{path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{path}: key `{key}`: {reason}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// Dotted key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// Starting the proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind.
    #[error("listener {name}: cannot bind {addr}: {source}")]
    Bind {
        /// Listener name.
        name: String,
        /// Address.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Certificates or keys could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The audit trail could not be opened.
    #[error("audit: {0}")]
    Audit(#[from] crate::audit::SinkError),
    /// Rule files could not be loaded.
    #[error(transparent)]
    Rules(#[from] crate::rules::RuleError),
}

/// Which side of a session failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The POP3 client.
    Client,
    /// The POP3 server.
    Upstream,
    /// popgate itself.
    Internal,
}

/// Why a session ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Socket error on one side.
    #[error("{side:?} I/O error: {source}")]
    Io {
        /// Side.
        side: Side,
        /// Cause.
        source: std::io::Error,
    },
    /// The upstream could not be reached.
    #[error("cannot connect to upstream {address}: {reason}")]
    Connect {
        /// Upstream address.
        address: String,
        /// Cause.
        reason: String,
    },
    /// The server broke the protocol.
    #[error("upstream protocol error: {0}")]
    Protocol(#[from] crate::pop3::tracker::ProtocolError),
}

impl SessionError {
    /// The side at fault.
    pub fn side(&self) -> Side {
        match self {
            SessionError::Io { side, .. } => *side,
            SessionError::Connect { .. } | SessionError::Protocol(_) => Side::Upstream,
        }
    }

    /// Whether this is an ordinary disconnect (reset, broken pipe), not worth a warning.
    pub fn is_disconnect(&self) -> bool {
        use std::io::ErrorKind::*;
        matches!(self, SessionError::Io { source, .. }
            if matches!(source.kind(), ConnectionReset | BrokenPipe | UnexpectedEof | ConnectionAborted))
    }
}
