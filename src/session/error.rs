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
    /// A body held for scanning could not be written to its spool (`scan.spool_dir` full or
    /// unwritable). The client has had no part of it; the session ends without QUIT, so the
    /// server deletes nothing.
    #[error("cannot spool a message for scanning: {0}")]
    Spool(std::io::Error),
}

impl SessionError {
    /// The side at fault.
    pub fn side(&self) -> Side {
        match self {
            SessionError::Io { side, .. } => *side,
            // The server's message could not be held: counted with the upstream's failures.
            SessionError::Connect(_) | SessionError::Protocol(_) | SessionError::Spool(_) => {
                Side::Upstream
            }
        }
    }

    /// Whether this is an ordinary disconnect (reset, broken pipe), not worth a warning.
    pub fn is_disconnect(&self) -> bool {
        use std::io::ErrorKind::*;
        matches!(self, SessionError::Io { source, .. }
            if matches!(source.kind(), ConnectionReset | BrokenPipe | UnexpectedEof | ConnectionAborted))
    }
}
