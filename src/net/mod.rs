//! The network edge: listening sockets ([`listener`]: accept, caps), the upstream connection
//! ([`upstream`]: dial, STLS or implicit TLS), and TLS itself ([`tls`]: rustls, SNI, reload).
//! Nothing here knows the POP3 session; sessions are handed accepted connections.

pub mod listener;
pub mod tls;
pub mod upstream;
