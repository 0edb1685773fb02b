//! IP networks in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`, or a bare address), matched
//! on `IpAddr`. One implementation for rule matchers and transcript networks.
//!
//! The network arithmetic (masking, containment, display) is `ipnet`'s. The text front end
//! stays here: `ipnet`'s own parser rejects bare addresses (a single host here), says only
//! "invalid IP address syntax", and cannot tell a typo such as `10.0.0.1/8` (host bits set)
//! from a network, while rule and config errors name what is wrong.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// An IPv4 or IPv6 network: its address with host bits cleared, and its prefix length. The
/// first and last address are kept too, so a match (per rule, per command) is two compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cidr(IpNet, IpAddr, IpAddr);

impl Cidr {
    fn new(net: IpNet) -> Cidr {
        Cidr(net, net.network(), net.broadcast())
    }
}

impl Cidr {
    /// Parse `addr/len` or a bare address (a single host). Host bits set below the prefix are
    /// an error: `10.0.0.1/8` is almost always a typo for `10.0.0.0/8` or `10.0.0.1/32`.
    pub(crate) fn parse(s: &str) -> Result<Cidr, String> {
        let (cidr, host_bits) = Cidr::parse_parts(s)?;
        if host_bits {
            return Err(format!(
                "host bits are set below /{len} (the network address of {s} is wanted)",
                len = cidr.0.prefix_len()
            ));
        }
        Ok(cidr)
    }

    /// Like [`Cidr::parse`], but host bits are cleared instead of refused
    /// (`192.0.2.77/24` is `192.0.2.0/24`).
    pub(crate) fn parse_masked(s: &str) -> Result<Cidr, String> {
        Cidr::parse_parts(s).map(|(c, _)| c)
    }

    /// The network, and whether the text had host bits set below the prefix.
    fn parse_parts(s: &str) -> Result<(Cidr, bool), String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let ip: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{addr}` is not an IP address"))?;
        let max: u8 = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match len {
            None => max,
            // Digits only: "+8" or " 8" are typos, not prefixes.
            Some(l) => Some(l)
                .filter(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|l| l.parse::<u8>().ok())
                .filter(|&n| n <= max)
                .ok_or_else(|| format!("prefix length `{l}` is not a number from 0 to {max}"))?,
        };
        let net = IpNet::new(ip, prefix)
            .map_err(|_| format!("prefix length `{prefix}` is not a number from 0 to {max}"))?;
        let network = net.trunc();
        let host_bits = network.addr() != ip;
        // `::ffff:192.0.2.0/120` (as `ss` shows dual-stack clients) is the IPv4 network it
        // names: addresses are matched in their IPv4 form, so it would otherwise match nothing.
        let network = match network {
            IpNet::V6(n) if n.prefix_len() >= 96 => match n.addr().to_ipv4_mapped() {
                Some(v4) => IpNet::new(IpAddr::V4(v4), n.prefix_len() - 96).unwrap_or(network),
                None => network,
            },
            n => n,
        };
        Ok((Cidr::new(network), host_bits))
    }

    /// Whether `ip` lies in this network; an IPv4-mapped IPv6 address counts as IPv4.
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        // IpAddr orders every IPv4 address before every IPv6 one: no family mix-up.
        let ip = ip.to_canonical();
        self.1 <= ip && ip <= self.2
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
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
        assert!(Cidr::parse("10.0.0.0/+8").is_err());
        assert!(Cidr::parse("").is_err());
    }

    #[test]
    fn ipv4_mapped_networks_match_ipv4_clients() {
        // As `ss` shows clients of a dual-stack socket; addresses are matched as IPv4.
        let c = Cidr::parse("::ffff:192.0.2.0/120").unwrap();
        assert!(c.contains(ip("192.0.2.7")));
        assert!(c.contains(ip("::ffff:192.0.2.7")));
        assert!(!c.contains(ip("192.0.3.7")));
        let host = Cidr::parse("::ffff:198.51.100.7").unwrap();
        assert!(host.contains(ip("198.51.100.7")));
        assert!(!host.contains(ip("198.51.100.8")));
    }

    #[test]
    fn masked_clears_host_bits() {
        let n = Cidr::parse_masked("192.0.2.77/24").unwrap();
        assert_eq!(n.to_string(), "192.0.2.0/24");
        assert!(n.contains(ip("192.0.2.1")));
        assert!(Cidr::parse_masked("10.0.0.1/33").is_err());
    }
}
