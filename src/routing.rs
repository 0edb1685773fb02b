//! Routing mode's choice of upstream for a user: the map file (`user upstream`,
//! `@domain upstream`) and the order of precedence (a `route` rule, then the map's exact user,
//! then its `@domain`, then `[routing] default`). No I/O but reading the map file.
//!
//! Case: user names are compared as the servers compare them ([`Config::routing_user_names`]):
//! folded to ASCII lower case (Dovecot's default `auth_username_format = %Lu` lowercases the
//! name before it looks it up, so `ALICE` is alice's mailbox, and must be routed where `alice`
//! is), or byte for byte when every upstream is `user_names = "exact"`. With folding the map's
//! user keys are folded too (`Alice old` is the `alice` line; `alice` and `ALICE` on two lines
//! are the same user). Non-ASCII letters are never folded: Dovecot's `%L` does not fold them
//! either. A USER name with white space never gets here: the front refuses it. Domains are
//! case-insensitive (DNS names): the part after the last `@`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::config::{Config, UserNames};

/// A map file problem, with the file and line.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The file could not be read.
    #[error("{path}: cannot read the routing map: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A line is wrong.
    #[error("{path}:{line}: {reason}")]
    Line {
        /// File.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// The map file, parsed: exact users and lower-cased domains to upstream names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteMap {
    users: HashMap<String, String>,
    domains: HashMap<String, String>,
    /// How user keys and looked-up names compare.
    names: UserNames,
}

/// Why a login went where it went (the routed-login log line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteReason {
    /// A `route` rule of this name.
    Rule(String),
    /// The map's line for this user.
    MapUser,
    /// The map's `@domain` line.
    MapDomain,
    /// `[routing] default` (or the only upstream).
    Default,
}

impl std::fmt::Display for RouteReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteReason::Rule(r) => write!(f, "rule {r}"),
            RouteReason::MapUser => f.write_str("map user"),
            RouteReason::MapDomain => f.write_str("map domain"),
            RouteReason::Default => f.write_str("default"),
        }
    }
}

impl RouteMap {
    /// Parse map text. `known` says whether an upstream name exists; `names` how user names
    /// compare (see [`Config::routing_user_names`]); `path` is for messages.
    pub fn parse(
        text: &str,
        path: &Path,
        names: UserNames,
        known: impl Fn(&str) -> bool,
    ) -> Result<RouteMap, MapError> {
        let mut map = RouteMap {
            names,
            ..RouteMap::default()
        };
        for (i, raw) in text.lines().enumerate() {
            let err = |reason: String| MapError::Line {
                path: path.to_owned(),
                line: i + 1,
                reason,
            };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(key), Some(upstream), None) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(err(format!(
                    "expected `user upstream` or `@domain upstream`, got {line:?}"
                )));
            };
            if !known(upstream) {
                return Err(err(format!("no upstream is named {upstream:?}")));
            }
            let (table, key) = match key.strip_prefix('@') {
                Some("") => return Err(err("`@` without a domain".into())),
                Some(d) if d.contains('@') => {
                    return Err(err(format!("{key:?}: a domain has no `@`")));
                }
                Some(d) => (&mut map.domains, d.to_ascii_lowercase()),
                None => (&mut map.users, names.apply(key).into_owned()),
            };
            if let Some(prev) = table.insert(key.clone(), upstream.to_owned())
                && prev != upstream
            {
                return Err(err(format!(
                    "{key:?} is already routed to {prev:?} on an earlier line"
                )));
            }
        }
        Ok(map)
    }

    /// Read and parse the map file `path` for `config`'s upstreams.
    pub fn load(path: &Path, config: &Config) -> Result<RouteMap, MapError> {
        let text = std::fs::read_to_string(path).map_err(|source| MapError::Read {
            path: path.to_owned(),
            source,
        })?;
        RouteMap::parse(&text, path, config.routing_user_names(), |n| {
            config.upstream_index(n).is_some()
        })
    }

    /// Entries (users and domains).
    pub fn len(&self) -> usize {
        self.users.len() + self.domains.len()
    }

    /// Whether the map has no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The map's upstream for `user`: the user (folded if the map folds), else the domain
    /// after its last `@`.
    pub fn lookup(&self, user: &str) -> Option<(&str, RouteReason)> {
        if let Some(u) = self.users.get(&*self.names.apply(user)) {
            return Some((u, RouteReason::MapUser));
        }
        let (_, domain) = user.rsplit_once('@')?;
        self.domains
            .get(&domain.to_ascii_lowercase())
            .map(|u| (u.as_str(), RouteReason::MapDomain))
    }
}

/// The upstream for `user`: the `rule` route (rule name, upstream) first, then the map, then
/// `default`.
pub fn choose<'a>(
    user: &str,
    rule: Option<(&'a str, &'a str)>,
    map: Option<&'a RouteMap>,
    default: &'a str,
) -> (&'a str, RouteReason) {
    if let Some((rule, upstream)) = rule {
        return (upstream, RouteReason::Rule(rule.to_owned()));
    }
    map.and_then(|m| m.lookup(user))
        .unwrap_or((default, RouteReason::Default))
}

/// Where a routed login goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    /// The upstream's index in the config.
    pub(crate) index: usize,
    /// Why there.
    pub(crate) why: RouteReason,
    /// The user name as that upstream sees it (folded if it folds): what rules, the audit and
    /// an OAuth2 bridge see.
    pub(crate) user: String,
}

/// The whole choice for a login by `user` (as the client typed it): route rules (`rule`, asked
/// with the name folded as the servers compare names) and the map see `ALICE` where they see
/// `alice`; an upstream name that is not configured falls back to the default.
pub(crate) fn route(
    config: &Config,
    user: &str,
    rule: impl FnOnce(&str) -> Option<(std::sync::Arc<str>, std::sync::Arc<str>)>,
    map: Option<&RouteMap>,
) -> Route {
    let routed = config.routing_user_names().apply(user);
    let rule = rule(&routed);
    let default = config.default_upstream().label();
    let (name, why) = choose(
        &routed,
        rule.as_ref().map(|(r, u)| (&**r, &**u)),
        map,
        default,
    );
    let index = config
        .upstream_index(name)
        .unwrap_or_else(|| config.default_index());
    Route {
        index,
        why,
        user: config.upstreams[index].user_names.apply(user).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_upstreams(fold_new: bool) -> Config {
        let text = format!(
            "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\n\
             [routing]\ndefault = \"old\"\n\
             [[upstream]]\nname = \"old\"\naddress = \"127.0.0.1:1\"\nuser_names = \"exact\"\n\
             [[upstream]]\nname = \"new\"\naddress = \"127.0.0.1:2\"\nuser_names = \"{}\"\n",
            if fold_new { "fold" } else { "exact" }
        );
        Config::parse(&text, Path::new("t.toml")).unwrap()
    }

    #[test]
    fn a_login_is_routed_by_rule_then_map_then_default_without_sockets() {
        let config = two_upstreams(true);
        let m = RouteMap::parse("carol new\n", Path::new("m.map"), UserNames::Fold, |n| {
            ["old", "new"].contains(&n)
        })
        .unwrap();
        // A rule wins, and is asked with the folded name.
        let r = route(
            &config,
            "Dave",
            |u| (u == "dave").then(|| ("r".into(), "new".into())),
            Some(&m),
        );
        assert_eq!(r.index, 1);
        assert_eq!(r.why, RouteReason::Rule("r".into()));
        assert_eq!(r.user, "dave", "the chosen upstream folds");
        // The map, folded.
        let r = route(&config, "CAROL", |_| None, Some(&m));
        assert_eq!(
            (r.index, r.why, r.user.as_str()),
            (1, RouteReason::MapUser, "carol")
        );
        // The default, which compares exactly: the name as typed.
        let r = route(&config, "Erin", |_| None, Some(&m));
        assert_eq!(
            (r.index, r.why, r.user.as_str()),
            (0, RouteReason::Default, "Erin")
        );
        // A rule naming no configured upstream: the default.
        let r = route(&config, "x", |_| Some(("r".into(), "gone".into())), None);
        assert_eq!(r.index, 0);
    }

    fn map(text: &str) -> Result<RouteMap, MapError> {
        RouteMap::parse(text, Path::new("m.map"), UserNames::Exact, |n| {
            ["old", "new"].contains(&n)
        })
    }

    fn folding(text: &str) -> Result<RouteMap, MapError> {
        RouteMap::parse(text, Path::new("m.map"), UserNames::Fold, |n| {
            ["old", "new"].contains(&n)
        })
    }

    #[test]
    fn folding_map_routes_every_ascii_case_of_a_user_and_no_other_name() {
        let m = folding("Alice old\nbob@Example.org new\n\u{c9}mile old\n").unwrap();
        for variant in ["alice", "ALICE", "Alice", "aLiCe"] {
            assert_eq!(
                m.lookup(variant),
                Some(("old", RouteReason::MapUser)),
                "{variant:?}"
            );
        }
        assert_eq!(
            m.lookup("BOB@EXAMPLE.ORG"),
            Some(("new", RouteReason::MapUser))
        );
        // Only ASCII folds (as Dovecot's %L): the key keeps its É, é is another name.
        assert_eq!(m.lookup("\u{c9}MILE"), Some(("old", RouteReason::MapUser)));
        assert_eq!(m.lookup("\u{e9}mile"), None);
        for other in ["alice ", " alice", "alicE@", "al1ce"] {
            assert_eq!(m.lookup(other), None, "{other:?}");
        }
        // Two lines for one folded user to two upstreams are a mistake.
        let e = folding("alice old\nALICE new\n").unwrap_err().to_string();
        assert!(e.contains("already routed"), "{e}");
    }

    #[test]
    fn parses_users_domains_comments_and_blank_lines() {
        let m =
            map("# migration\n\nalice old\n  @Example.ORG   new  \nbob@example.org old\n").unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m.lookup("alice"), Some(("old", RouteReason::MapUser)));
        assert_eq!(
            m.lookup("carol@example.org"),
            Some(("new", RouteReason::MapDomain))
        );
        // The exact user beats the domain.
        assert_eq!(
            m.lookup("bob@example.org"),
            Some(("old", RouteReason::MapUser))
        );
        // Domains are case-insensitive; the part after the last `@` counts.
        assert_eq!(
            m.lookup("x@y@EXAMPLE.org"),
            Some(("new", RouteReason::MapDomain))
        );
        assert_eq!(m.lookup("dave"), None);
    }

    #[test]
    fn users_are_exact() {
        let m = map("alice old\n").unwrap();
        for variant in ["ALICE", "Alice", "alice ", "alice\t", " alice", "alice@"] {
            assert_eq!(m.lookup(variant), None, "{variant:?}");
        }
    }

    #[test]
    fn errors_name_file_and_line() {
        for (text, line, what) in [
            (
                "alice old\nbob nowhere\n",
                2,
                "no upstream is named \"nowhere\"",
            ),
            ("# c\nalice\n", 2, "expected"),
            ("alice old extra\n", 1, "expected"),
            ("@ old\n", 1, "without a domain"),
            ("alice old\nalice new\n", 2, "already routed"),
            ("@a@b old\n", 1, "a domain has no"),
        ] {
            let e = map(text).unwrap_err().to_string();
            assert!(e.starts_with(&format!("m.map:{line}: ")), "{e}");
            assert!(e.contains(what), "{e}");
        }
        // The same line twice is harmless.
        assert!(map("alice old\nalice old\n").is_ok());
    }

    #[test]
    fn precedence_rule_map_default() {
        let m = map("alice old\n@example.org old\n").unwrap();
        assert_eq!(
            choose("alice", Some(("vip", "new")), Some(&m), "new").1,
            RouteReason::Rule("vip".into())
        );
        assert_eq!(
            choose("alice", None, Some(&m), "new"),
            ("old", RouteReason::MapUser)
        );
        assert_eq!(
            choose("zed", None, Some(&m), "new"),
            ("new", RouteReason::Default)
        );
        assert_eq!(
            choose("zed", None, None, "new"),
            ("new", RouteReason::Default)
        );
    }
}
