//! The `size` matcher: a comparison with the message size a response states (`> 10M`,
//! `< 1024`, `>= 512k`).
//!
//! The number and its unit are a config size ([`ByteSize`]): binary, case-insensitive units
//! (`k` = 1024, `M` = 1024², `G` = 1024³, optionally followed by `B` or `iB`), one parser and
//! one set of error texts for both.

use crate::types::ByteSize;

/// How a size is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SizeCmp {
    /// `> n`
    Above(u64),
    /// `>= n`
    AtLeast(u64),
    /// `< n`
    Below(u64),
    /// `<= n`
    AtMost(u64),
}

impl SizeCmp {
    /// Parse `"> 10MB"` and friends; the error says what is expected.
    pub(crate) fn parse(text: &str) -> Result<SizeCmp, String> {
        let t = text.trim();
        let (ctor, rest): (fn(u64) -> SizeCmp, &str) = if let Some(r) = t.strip_prefix(">=") {
            (SizeCmp::AtLeast, r)
        } else if let Some(r) = t.strip_prefix("<=") {
            (SizeCmp::AtMost, r)
        } else if let Some(r) = t.strip_prefix('>') {
            (SizeCmp::Above, r)
        } else if let Some(r) = t.strip_prefix('<') {
            (SizeCmp::Below, r)
        } else {
            return Err(format!(
                "`{text}`: start with >, >=, < or <=, e.g. \"> 10M\" or \"< 1024\""
            ));
        };
        ByteSize::parse_within(rest, text).map(|n| ctor(n.0))
    }

    /// Whether `size` (octets) satisfies the comparison.
    pub(crate) fn holds(self, size: u64) -> bool {
        match self {
            SizeCmp::Above(n) => size > n,
            SizeCmp::AtLeast(n) => size >= n,
            SizeCmp::Below(n) => size < n,
            SizeCmp::AtMost(n) => size <= n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_and_units() {
        let p = |s| SizeCmp::parse(s).unwrap();
        assert_eq!(p("> 10MB"), SizeCmp::Above(10 << 20));
        assert_eq!(p(">10m"), SizeCmp::Above(10 << 20));
        assert_eq!(p("< 1024"), SizeCmp::Below(1024));
        assert_eq!(p("<= 2 k"), SizeCmp::AtMost(2048));
        assert_eq!(p(">= 1GiB"), SizeCmp::AtLeast(1 << 30));
        assert_eq!(p("  > 0 B "), SizeCmp::Above(0));
        assert!(p("> 1k").holds(1025) && !p("> 1k").holds(1024));
        assert!(p(">= 1k").holds(1024) && !p(">= 1k").holds(1023));
        assert!(p("< 10").holds(9) && !p("< 10").holds(10));
        assert!(p("<= 10").holds(10) && !p("<= 10").holds(11));
    }

    #[test]
    fn malformed() {
        for (bad, why) in [
            ("10MB", "start with"),
            ("= 10", "start with"),
            ("", "start with"),
            (">", "whole number"),
            ("> -1", "whole number"),
            ("> 1.5M", "unknown unit"),
            ("> 10XB", "unknown unit"),
            ("> 10 octets", "unknown unit"),
            ("> 99999999999999999999", "too large"),
            ("> 99999999999G", "too large"),
            ("=> 10", "start with"),
        ] {
            let e = SizeCmp::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
