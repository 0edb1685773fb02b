//! CIDR networks (`10.0.0.0/8`, `2001:db8::/32`, or a bare address) matched on `IpAddr`.

use std::net::IpAddr;

/// An IPv4 or IPv6 network, kept as a masked integer for a two-instruction match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cidr {
    V4 { net: u32, mask: u32 },
    V6 { net: u128, mask: u128 },
}

impl Cidr {
    /// Parse `addr/len` or a bare address (a single host). Host bits set below the prefix are
    /// an error: `10.0.0.1/8` is almost always a typo for `10.0.0.0/8` or `10.0.0.1/32`.
    pub(crate) fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let ip: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{addr}` is not an IP address"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len: u32 =
            match len {
                None => max,
                Some(l) => l.trim().parse().ok().filter(|&n| n <= max).ok_or_else(|| {
                    format!("prefix length `{l}` is not a number from 0 to {max}")
                })?,
            };
        let cidr = match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                let bits = u32::from(v4);
                if bits & !mask != 0 {
                    return Err(host_bits(ip, len));
                }
                Cidr::V4 { net: bits, mask }
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                let bits = u128::from(v6);
                if bits & !mask != 0 {
                    return Err(host_bits(ip, len));
                }
                Cidr::V6 { net: bits, mask }
            }
        };
        Ok(cidr)
    }

    /// Whether `ip` lies in this network; an IPv4-mapped IPv6 address counts as IPv4.
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        match (self, ip.to_canonical()) {
            (Cidr::V4 { net, mask }, IpAddr::V4(a)) => u32::from(a) & mask == *net,
            (Cidr::V6 { net, mask }, IpAddr::V6(a)) => u128::from(a) & mask == *net,
            _ => false,
        }
    }
}

fn host_bits(ip: IpAddr, len: u32) -> String {
    format!("host bits are set below /{len} (the network address of {ip}/{len} is wanted)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v4_networks() {
        let c = Cidr::parse("192.0.2.0/24").unwrap();
        assert!(c.contains(ip("192.0.2.0")));
        assert!(c.contains(ip("192.0.2.255")));
        assert!(!c.contains(ip("192.0.3.0")));
        assert!(!c.contains(ip("::1")));
        // IPv4-mapped IPv6 (dual-stack sockets) matches the IPv4 network.
        assert!(c.contains(ip("::ffff:192.0.2.7")));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains(ip("203.0.113.9")));
        assert!(!all.contains(ip("2001:db8::1")));
        let host = Cidr::parse("198.51.100.7").unwrap();
        assert!(host.contains(ip("198.51.100.7")));
        assert!(!host.contains(ip("198.51.100.8")));
    }

    #[test]
    fn v6_networks() {
        let c = Cidr::parse("2001:db8::/32").unwrap();
        assert!(c.contains(ip("2001:db8:1::5")));
        assert!(!c.contains(ip("2001:db9::")));
        assert!(!c.contains(ip("192.0.2.1")));
        let lo = Cidr::parse("::1/128").unwrap();
        assert!(lo.contains(ip("::1")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("fe80::1")));
    }

    #[test]
    fn rejects_mistakes() {
        assert!(Cidr::parse("10.0.0.1/8").unwrap_err().contains("host bits"));
        assert!(Cidr::parse("10.0.0.0/33").unwrap_err().contains("0 to 32"));
        assert!(Cidr::parse("::/129").unwrap_err().contains("0 to 128"));
        assert!(Cidr::parse("10.0.0/8").unwrap_err().contains("not an IP"));
        assert!(Cidr::parse("10.0.0.0/x").is_err());
        assert!(Cidr::parse("").is_err());
    }
}
