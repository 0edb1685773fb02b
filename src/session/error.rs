//! Why a session ended abnormally, and which side failed: the client or the upstream.

/// Which side of a session failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The POP3 client.
    Client,
    /// The POP3 server.
    Upstream,
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
    #[error(transparent)]
    Connect(#[from] crate::net::upstream::ConnectError),
    /// The server broke the protocol.
    #[error("upstream protocol error: {0}")]
    Protocol(#[from] crate::pop3::tracker::ProtocolError),
}

impl SessionError {
    /// The side at fault.
    pub fn side(&self) -> Side {
        match self {
            SessionError::Io { side, .. } => *side,
            SessionError::Connect(_) | SessionError::Protocol(_) => Side::Upstream,
        }
    }

    /// Whether this is an ordinary disconnect (reset, broken pipe), not worth a warning.
    pub fn is_disconnect(&self) -> bool {
        use std::io::ErrorKind::*;
        matches!(self, SessionError::Io { source, .. }
            if matches!(source.kind(), ConnectionReset | BrokenPipe | UnexpectedEof | ConnectionAborted))
    }
}
