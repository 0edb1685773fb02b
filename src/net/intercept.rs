//! Transparent interception (`upstream.address = "original-destination"`): the address a client
//! connected to before an iptables / nftables `REDIRECT` sent its connection to popgate, read
//! from netfilter's connection tracking with `SO_ORIGINAL_DST` (IPv4) or
//! `IP6T_SO_ORIGINAL_DST` (IPv6), and the check that popgate would not connect to itself.
//!
//! Only `REDIRECT` (and DNAT to popgate) is supported: `TPROXY` needs `IP_TRANSPARENT` on the
//! listening socket, which popgate does not set.

use std::net::{IpAddr, SocketAddr};

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

/// Why a session with `original-destination` is refused before anything is dialled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// The kernel knows no original destination (no conntrack entry, a non-Linux system).
    #[error("no original destination ({0}): was the connection redirected to popgate?")]
    Unknown(String),
    /// The original destination is popgate itself: the client connected to a listener
    /// directly, without a redirect, or was redirected to a port popgate listens on; connecting
    /// there would loop.
    #[error("original destination {0} is popgate's own address: refusing to connect to itself")]
    Loop(SocketAddr),
}

/// The original destination of `tcp` (accepted on `local`), or why it cannot be used:
/// unknown, or one of popgate's own addresses (`local`, or any of `listeners`, the addresses
/// popgate listens on).
pub(crate) fn original_destination(
    tcp: &TcpStream,
    local: SocketAddr,
    listeners: &[SocketAddr],
) -> Result<SocketAddr, Refusal> {
    let dst = read(tcp, local).map_err(|e| {
        Refusal::Unknown(if e.kind() == std::io::ErrorKind::NotFound {
            // ENOENT: connection tracking has no NAT record of this connection.
            "the kernel has no redirect recorded for this connection".into()
        } else {
            e.to_string()
        })
    })?;
    if is_own(dst, local, listeners, is_local_ip) {
        return Err(Refusal::Loop(dst));
    }
    Ok(dst)
}

#[cfg(target_os = "linux")]
fn read(tcp: &TcpStream, local: SocketAddr) -> std::io::Result<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    // An IPv4 client on a dual-stack (`[::]`) listener is tracked as IPv4: SOL_IP works on
    // that IPv6 socket too (the kernel hands it to the IPv4 code).
    let dst = match local {
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_none() => {
            let sa = getsockopt(tcp, sockopt::Ip6tOriginalDst)?;
            SocketAddr::V6(std::net::SocketAddrV6::new(
                sa.sin6_addr.s6_addr.into(),
                u16::from_be(sa.sin6_port),
                0,
                sa.sin6_scope_id,
            ))
        }
        _ => {
            let sa = getsockopt(tcp, sockopt::OriginalDst)?;
            SocketAddr::new(
                IpAddr::V4(u32::from_be(sa.sin_addr.s_addr).into()),
                u16::from_be(sa.sin_port),
            )
        }
    };
    Ok(dst)
}

#[cfg(not(target_os = "linux"))]
fn read(_tcp: &TcpStream, _local: SocketAddr) -> std::io::Result<SocketAddr> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "SO_ORIGINAL_DST is Linux only",
    ))
}

/// Whether `dst` is popgate itself: the address the connection arrived on (a connection that
/// was not redirected has itself as original destination), or a listener's address; a
/// listener on the unspecified address (`0.0.0.0`, `[::]`) covers every address of this host
/// (`is_local` says which are).
fn is_own(
    dst: SocketAddr,
    local: SocketAddr,
    listeners: &[SocketAddr],
    is_local: impl Fn(IpAddr) -> bool,
) -> bool {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let dst = canon(dst);
    if dst == canon(local) {
        return true;
    }
    listeners.iter().any(|&l| {
        let l = canon(l);
        l.port() == dst.port()
            && (l.ip() == dst.ip() || (l.ip().is_unspecified() && is_local(dst.ip())))
    })
}

/// Whether `ip` is an address of this host (in popgate's network namespace): binding a UDP
/// socket to it succeeds only then. Nothing is sent.
fn is_local_ip(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// The name popgate verifies the original server's certificate for (and sends as SNI) when
/// `upstream.server_name` is not set: the name the client asked for in its own TLS handshake
/// with popgate (implicit-TLS listeners), else the IP address it connected to (the
/// certificate then needs that IP address as a subject alternative name).
pub(crate) fn server_name(client_sni: Option<&str>, dst: IpAddr) -> ServerName<'static> {
    client_sni
        .and_then(|n| ServerName::try_from(n.to_owned()).ok())
        .unwrap_or_else(|| ServerName::IpAddress(dst.to_canonical().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn own_addresses_are_loops() {
        let never = |_: IpAddr| false;
        let local = a("10.0.0.1:8110");
        // A redirected connection: elsewhere, port 110.
        assert!(!is_own(
            a("192.0.2.7:110"),
            local,
            &[a("0.0.0.0:8110")],
            never
        ));
        // Not redirected: its original destination is the listener it reached.
        assert!(is_own(local, local, &[], never));
        assert!(is_own(a("[::ffff:10.0.0.1]:8110"), local, &[], never));
        // Another listener of popgate, by address.
        assert!(is_own(
            a("10.0.0.2:995"),
            local,
            &[a("10.0.0.2:995")],
            never
        ));
        assert!(is_own(
            a("[fd00::1]:995"),
            local,
            &[a("[fd00::1]:995")],
            never
        ));
        // A listener on 0.0.0.0 / [::] is every local address, on its port only.
        let this_host = |ip: IpAddr| ip == a("10.0.0.3:0").ip() || ip == a("[fd00::3]:0").ip();
        let any = [a("0.0.0.0:995"), a("[::]:2110")];
        assert!(is_own(a("10.0.0.3:995"), local, &any, this_host));
        assert!(is_own(a("[fd00::3]:2110"), local, &any, this_host));
        assert!(!is_own(a("10.0.0.3:110"), local, &any, this_host));
        assert!(!is_own(a("192.0.2.7:995"), local, &any, this_host));
    }

    #[test]
    fn loopback_and_bindable_addresses_are_local() {
        assert!(is_local_ip("127.0.0.1".parse().unwrap()));
        assert!(is_local_ip("127.3.4.5".parse().unwrap()));
        // TEST-NET-1 is never configured on a test machine.
        assert!(!is_local_ip("192.0.2.77".parse().unwrap()));
    }

    #[test]
    fn tls_name_is_the_clients_sni_else_the_ip() {
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(
            server_name(Some("pop.example.org"), ip),
            ServerName::try_from("pop.example.org").unwrap()
        );
        assert_eq!(server_name(None, ip), ServerName::IpAddress(ip.into()));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(server_name(None, mapped), ServerName::IpAddress(ip.into()));
    }
}
