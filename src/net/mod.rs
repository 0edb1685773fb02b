//! The network edge: listening sockets ([`listener`]: accept, caps, PROXY header), the upstream
//! connection ([`upstream`]: dial, STLS or implicit TLS, the client's address passed on), the
//! PROXY protocol itself ([`proxy_header`]), TLS ([`tls`]: rustls, SNI, reload), and the original
//! destination of a redirected connection ([`intercept`]).
//! Nothing here knows the POP3 session; sessions are handed accepted connections.

pub(crate) mod intercept;
pub mod listener;
pub mod pool;
pub(crate) mod proxy_header;
pub mod tls;
pub mod upstream;
