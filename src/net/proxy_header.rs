//! The PROXY protocol (HAProxy's, v1 text and v2 binary): the header a load balancer puts
//! before a client's first byte to say who the client is. Read on listeners with
//! `proxy_protocol = true`; written to the upstream with `forward_client = "proxy-v1"` or
//! `"proxy-v2"`. Parsing and encoding are the `ppp` crate's; this module decides how much to
//! read (never a byte past the header: the client's own bytes, or its TLS ClientHello, follow).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ppp::PartialResult as _;
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

/// Longest header accepted. v1 is at most 107 bytes; v2 carries TLVs (HAProxy's unique id, SSL
/// details, authority) that stay far below this.
const MAX_HEADER: usize = 4096;

/// Where a proxied connection really comes from, as its header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Origin {
    /// The client's address.
    pub(crate) client: SocketAddr,
    /// The address the client connected to (the balancer's frontend).
    pub(crate) local: SocketAddr,
}

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HeaderError {
    /// Not all of it arrived in time.
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    /// The peer closed before the header was complete.
    #[error("connection closed before a complete PROXY header")]
    Closed,
    /// The bytes are not a valid header (or a client spoke POP3 straight away).
    #[error("invalid PROXY header: {0}")]
    Invalid(String),
    /// Reading failed.
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// The state of a header in `buf`, which holds the first bytes of a connection.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A header of `len` bytes; `origin` is `None` for v2 `LOCAL` and v1 `UNKNOWN`
    /// (the balancer's own connection, e.g. a health check).
    Done { len: usize, origin: Option<Origin> },
    /// Not a header.
    Invalid(String),
}

fn parse(buf: &[u8]) -> Parsed {
    const V1: &[u8] = b"PROXY ";
    let starts = |sig: &[u8]| {
        let n = buf.len().min(sig.len());
        buf[..n] == sig[..n]
    };
    if starts(ppp::v2::PROTOCOL_PREFIX) {
        parse_v2(buf)
    } else if starts(V1) {
        parse_v1(buf)
    } else {
        Parsed::Invalid("no PROXY header (v1 or v2) at the start of the connection".into())
    }
}

fn origin(
    client: impl Into<IpAddr>,
    client_port: u16,
    local: impl Into<IpAddr>,
    local_port: u16,
) -> Origin {
    // IPv4-mapped IPv6 (`PROXY TCP6 ::ffff:…`) is the IPv4 client it names.
    Origin {
        client: canonical(SocketAddr::new(client.into(), client_port)),
        local: canonical(SocketAddr::new(local.into(), local_port)),
    }
}

fn parse_v2(buf: &[u8]) -> Parsed {
    use ppp::v2::{Addresses, Command, Protocol};
    if buf.len() >= 16 {
        let declared = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if declared > MAX_HEADER {
            return Parsed::Invalid(format!("v2 header of {declared} bytes is too long"));
        }
    }
    let header = match ppp::v2::Header::try_from(buf) {
        Ok(h) => h,
        Err(e) if e.is_incomplete() => return Parsed::Incomplete,
        Err(e) => return Parsed::Invalid(e.to_string()),
    };
    let origin = match (header.command, header.addresses) {
        (Command::Local, _) | (Command::Proxy, Addresses::Unspecified) => None,
        (Command::Proxy, _) if header.protocol != Protocol::Stream => {
            return Parsed::Invalid("v2 header is not for a TCP (stream) connection".into());
        }
        (Command::Proxy, Addresses::IPv4(a)) => Some(origin(
            a.source_address,
            a.source_port,
            a.destination_address,
            a.destination_port,
        )),
        (Command::Proxy, Addresses::IPv6(a)) => Some(origin(
            a.source_address,
            a.source_port,
            a.destination_address,
            a.destination_port,
        )),
        (Command::Proxy, Addresses::Unix(_)) => {
            return Parsed::Invalid("v2 header gives a unix socket, not a TCP client".into());
        }
    };
    Parsed::Done {
        len: header.len(),
        origin,
    }
}

fn parse_v1(buf: &[u8]) -> Parsed {
    use ppp::v1::Addresses;
    /// The longest v1 line, CRLF included (the spec's figure).
    const V1_MAX: usize = 107;
    // Judge the line only once it is complete: a cut field reads as a malformed one.
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Parsed::Invalid(format!("v1 line longer than {V1_MAX} bytes"))
        } else {
            Parsed::Incomplete
        };
    };
    let line = &buf[..end + 1];
    match ppp::v1::Header::try_from(line) {
        Ok(h) => {
            let origin = match h.addresses {
                Addresses::Unknown => None,
                Addresses::Tcp4(a) => Some(origin(
                    a.source_address,
                    a.source_port,
                    a.destination_address,
                    a.destination_port,
                )),
                Addresses::Tcp6(a) => Some(origin(
                    a.source_address,
                    a.source_port,
                    a.destination_address,
                    a.destination_port,
                )),
            };
            Parsed::Done {
                len: h.header.len(),
                origin,
            }
        }
        Err(e) => Parsed::Invalid(format!("v1: {e}")),
    }
}

/// Read a PROXY header from the start of `tcp` within `timeout`, consuming exactly its
/// bytes. `Ok(None)`: the header names no client (v2 `LOCAL`, v1 `UNKNOWN`).
pub(crate) async fn read(
    tcp: &mut TcpStream,
    timeout: Duration,
) -> Result<Option<Origin>, HeaderError> {
    tokio::time::timeout(timeout, read_exact_header(tcp))
        .await
        .map_err(|_| HeaderError::Timeout(timeout))?
}

async fn read_exact_header(tcp: &mut TcpStream) -> Result<Option<Origin>, HeaderError> {
    // Peek, then consume only what is known to be header: bytes of an incomplete header are
    // all header, and of a complete one exactly `len` are.
    let mut head: Vec<u8> = Vec::new();
    let mut peeked = [0u8; 512];
    loop {
        let n = tcp.peek(&mut peeked).await?;
        if n == 0 {
            return Err(HeaderError::Closed);
        }
        let start = head.len();
        head.extend_from_slice(&peeked[..n]);
        match parse(&head) {
            Parsed::Done { len, origin } => {
                let mut rest = vec![0u8; len - start];
                tcp.read_exact(&mut rest).await?;
                return Ok(origin);
            }
            Parsed::Incomplete if head.len() >= MAX_HEADER => {
                return Err(HeaderError::Invalid("header too long".into()));
            }
            Parsed::Incomplete => {
                tcp.read_exact(&mut peeked[..n]).await?;
            }
            Parsed::Invalid(why) => return Err(HeaderError::Invalid(why)),
        }
    }
}

/// PP2 TLV types and the SSL TLV's client flag (the PROXY protocol spec, section 2.2).
const PP2_TYPE_AUTHORITY: u8 = 0x02;
const PP2_TYPE_SSL: u8 = 0x20;
const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
const PP2_CLIENT_SSL: u8 = 0x01;

/// The header that tells the upstream about `client`, who connected to `local`.
/// `version` is 1 (text) or 2 (binary). With `tls` (the client's TLS to popgate), a v2 header
/// carries the SSL TLV (client flag, version, cipher) and the server name as the AUTHORITY
/// TLV, as HAProxy's `send-proxy-v2-ssl` does: Dovecot then counts the connection as secured
/// and allows plaintext authentication under `disable_plaintext_auth = yes`. v1 cannot say it.
pub(crate) fn encode(
    version: u8,
    client: SocketAddr,
    local: SocketAddr,
    tls: Option<&crate::types::TlsInfo>,
) -> Vec<u8> {
    let (src, dst) = same_family(client, local);
    if version == 1 {
        ppp::v1::Addresses::from((src, dst))
            .to_string()
            .into_bytes()
    } else {
        use ppp::v2::{Builder, Command, Protocol, Version};
        let mut b =
            Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (src, dst));
        // Writing into a Vec does not fail; a header without its TLVs would be refused below.
        if let Some(t) = tls {
            if let Some(sni) = t.sni.as_deref().filter(|s| s.len() <= 255) {
                b = match b.write_tlv(PP2_TYPE_AUTHORITY, sni.as_bytes()) {
                    Ok(b) => b,
                    Err(_) => return Vec::new(),
                };
            }
            b = match b.write_tlv(PP2_TYPE_SSL, &ssl_tlv(t)) {
                Ok(b) => b,
                Err(_) => return Vec::new(),
            };
        }
        // An empty header would be refused upstream.
        b.build().unwrap_or_default()
    }
}

/// The value of a PP2_TYPE_SSL TLV: the client byte (the connection used TLS; no client
/// certificate), `verify` (non-zero: no verified client certificate), then the version and
/// cipher sub-TLVs, in the spellings HAProxy uses (`TLSv1.3`, the IANA cipher name).
fn ssl_tlv(t: &crate::types::TlsInfo) -> Vec<u8> {
    let mut v = vec![PP2_CLIENT_SSL];
    v.extend_from_slice(&1u32.to_be_bytes());
    let version = t.version.replace("TLSv1_", "TLSv1.");
    let cipher = match t.cipher.strip_prefix("TLS13_") {
        Some(rest) => format!("TLS_{rest}"),
        None => t.cipher.clone(),
    };
    for (kind, value) in [
        (PP2_SUBTYPE_SSL_VERSION, version.as_bytes()),
        (PP2_SUBTYPE_SSL_CIPHER, cipher.as_bytes()),
    ] {
        let value = &value[..value.len().min(255)];
        v.push(kind);
        v.extend_from_slice(&(value.len() as u16).to_be_bytes());
        v.extend_from_slice(value);
    }
    v
}

/// `addr` with an IPv4-mapped IPv6 address (`[::ffff:192.0.2.7]:1`, as a dual-stack socket or
/// a balancer's `TCP6` header gives it) written as IPv4 (`192.0.2.7:1`): one client, one key
/// for per-IP limits and penalties, one spelling in logs and the audit trail.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Both addresses in one family, as the header needs: IPv4-mapped IPv6 addresses become
/// IPv4, and if one is still IPv6 the other is written IPv4-mapped.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (a, b) = (canonical(a), canonical(b));
    let v6 = |s: SocketAddr| match s.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), s.port()),
        IpAddr::V6(_) => s,
    };
    if a.is_ipv4() == b.is_ipv4() {
        (a, b)
    } else {
        (v6(a), v6(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn round_trips_v1_and_v2_at_every_split() {
        for (client, local) in [
            (sa("192.0.2.7:40000"), sa("198.51.100.1:110")),
            (sa("[2001:db8::7]:40000"), sa("[2001:db8::1]:995")),
        ] {
            for version in [1, 2] {
                let mut wire = encode(version, client, local, None);
                let len = wire.len();
                wire.extend_from_slice(b"USER bob\r\n");
                for cut in 0..len {
                    assert_eq!(
                        parse(&wire[..cut]),
                        Parsed::Incomplete,
                        "v{version} cut {cut}"
                    );
                }
                assert_eq!(
                    parse(&wire),
                    Parsed::Done {
                        len,
                        origin: Some(Origin { client, local })
                    },
                    "v{version}"
                );
            }
        }
    }

    #[test]
    fn local_and_unknown_name_no_client() {
        let local = ppp::v2::Builder::new(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::AddressFamily::Unspecified | ppp::v2::Protocol::Unspecified,
        )
        .build()
        .unwrap();
        assert_eq!(
            parse(&local),
            Parsed::Done {
                len: 16,
                origin: None
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n+rest"),
            Parsed::Done {
                len: 15,
                origin: None
            }
        );
    }

    #[test]
    fn refuses_what_is_not_a_header() {
        for bad in [
            &b"USER bob\r\n"[..],
            b"CAPA\r\n",
            b"\x16\x03\x01\x02\x00", // a TLS ClientHello
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 999.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        ] {
            assert!(
                matches!(parse(bad), Parsed::Invalid(_)),
                "{:?}: {:?}",
                String::from_utf8_lossy(bad),
                parse(bad)
            );
        }
        // A v1 line that never ends is refused at 107 bytes, not waited for.
        let mut long = b"PROXY TCP4 ".to_vec();
        long.resize(120, b'1');
        assert!(matches!(parse(&long), Parsed::Invalid(_)));
        // A v2 header announcing more than MAX_HEADER bytes is refused before they arrive.
        let mut big = encode(2, sa("192.0.2.7:1"), sa("192.0.2.8:2"), None);
        big[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(matches!(parse(&big[..16]), Parsed::Invalid(_)));
    }

    #[test]
    fn ipv4_mapped_header_addresses_read_as_ipv4() {
        let want = Some(Origin {
            client: sa("192.0.2.7:1"),
            local: sa("198.51.100.1:110"),
        });
        // Written by hand: `encode` would already make them IPv4.
        let (client, local) = (sa("[::ffff:192.0.2.7]:1"), sa("[::ffff:198.51.100.1]:110"));
        let v1 = ppp::v1::Addresses::from((client, local))
            .to_string()
            .into_bytes();
        let v2 = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (client, local),
        )
        .build()
        .unwrap();
        for wire in [v1, v2] {
            assert_eq!(
                parse(&wire),
                Parsed::Done {
                    len: wire.len(),
                    origin: want
                }
            );
        }
    }

    #[test]
    fn a_tls_client_is_announced_in_the_ssl_and_authority_tlvs() {
        let tls = crate::types::TlsInfo {
            version: "TLSv1_3".into(),
            cipher: "TLS13_AES_256_GCM_SHA384".into(),
            sni: Some("pop.example.org".into()),
        };
        let wire = encode(2, sa("192.0.2.7:1"), sa("192.0.2.1:995"), Some(&tls));
        // Still a header this parser (and Dovecot) reads, of the full length.
        assert_eq!(
            parse(&wire),
            Parsed::Done {
                len: wire.len(),
                origin: Some(Origin {
                    client: sa("192.0.2.7:1"),
                    local: sa("192.0.2.1:995")
                })
            }
        );
        let header = ppp::v2::Header::try_from(&wire[..]).unwrap();
        let tlvs: Vec<(u8, Vec<u8>)> = header
            .tlvs()
            .map(|t| {
                let t = t.unwrap();
                (t.kind, t.value.to_vec())
            })
            .collect();
        assert_eq!(tlvs[0], (0x02, b"pop.example.org".to_vec()));
        let mut ssl = vec![0x01, 0, 0, 0, 1, 0x21, 0, 7];
        ssl.extend_from_slice(b"TLSv1.3");
        ssl.extend_from_slice(&[0x23, 0, 22]);
        ssl.extend_from_slice(b"TLS_AES_256_GCM_SHA384");
        assert_eq!(tlvs[1], (0x20, ssl));
        assert_eq!(tlvs.len(), 2);
        // A plaintext client: no TLV at all; v1 has no room for it.
        let plain = encode(2, sa("192.0.2.7:1"), sa("192.0.2.1:110"), None);
        assert_eq!(
            ppp::v2::Header::try_from(&plain[..])
                .unwrap()
                .tlvs()
                .count(),
            0
        );
        assert_eq!(
            encode(1, sa("192.0.2.7:1"), sa("192.0.2.1:995"), Some(&tls)),
            encode(1, sa("192.0.2.7:1"), sa("192.0.2.1:995"), None)
        );
    }

    #[test]
    fn mixed_families_are_written_as_ipv6() {
        let wire = encode(1, sa("[2001:db8::7]:1"), sa("192.0.2.1:110"), None);
        assert_eq!(
            String::from_utf8(wire).unwrap(),
            "PROXY TCP6 2001:db8::7 ::ffff:192.0.2.1 1 110\r\n"
        );
        let wire = encode(1, sa("[::ffff:192.0.2.7]:1"), sa("192.0.2.1:110"), None);
        assert_eq!(
            String::from_utf8(wire).unwrap(),
            "PROXY TCP4 192.0.2.7 192.0.2.1 1 110\r\n"
        );
    }
}
