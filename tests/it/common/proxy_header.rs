//! PROXY protocol headers as a balancer sends them (built with the `ppp` crate, as popgate
//! parses them), and address shorthands for tests that play several clients.

use std::net::{IpAddr, SocketAddr};

/// `"127.0.0.5"` as an address.
pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `"192.0.2.7:40000"` as a socket address.
pub fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A PROXY v2 header for `client` connecting to `local`.
pub fn v2(client: &str, local: &str) -> Vec<u8> {
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (sa(client), sa(local)),
    )
    .build()
    .unwrap()
}

/// A PROXY v1 header for `client` connecting to `local`.
pub fn v1(client: &str, local: &str) -> Vec<u8> {
    ppp::v1::Addresses::from((sa(client), sa(local)))
        .to_string()
        .into_bytes()
}
