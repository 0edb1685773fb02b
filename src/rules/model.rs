//! The serde shape of a rule file: `[[rule]]` tables, as written, before validation.
//!
//! The reference for every key is `rules/README.md`. Decoding is done one rule at a time (see
//! [`decode_file`]) so that every error can name the rule it is about.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::EventKind;
use super::error::{Problem, RuleError, RuleRef};

/// What a rule does when its matchers hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    /// Stop evaluating: the event proceeds as usual.
    Allow,
    /// Stop evaluating: answer locally with `-ERR` (command), or refuse the connection.
    Deny,
    /// Rewrite the command's arguments, the status line, or a CAPA item; evaluation goes on.
    Rewrite,
    /// Emit a log message; evaluation goes on.
    Log,
    /// Attach audit labels; evaluation goes on.
    Tag,
    /// Stop evaluating: close both sides at once, the upstream without QUIT.
    Drop,
    /// Wait before acting (tarpit); evaluation goes on.
    Delay,
    /// Start a traffic transcript for the session; evaluation goes on.
    Trace,
    /// Routing mode: send this login to the upstream named by `upstream`. Evaluated once per
    /// login, apart from the other rules (see `rules/README.md`).
    Route,
    /// Hold the body a `RETR`/`TOP` retrieves until the scanners named by `scan` have judged
    /// it (see `docs/scanning.md`); evaluation goes on.
    Scan,
}

impl RuleAction {
    /// The lower-case name used in rule files.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleAction::Allow => "allow",
            RuleAction::Deny => "deny",
            RuleAction::Rewrite => "rewrite",
            RuleAction::Log => "log",
            RuleAction::Tag => "tag",
            RuleAction::Drop => "drop",
            RuleAction::Delay => "delay",
            RuleAction::Trace => "trace",
            RuleAction::Route => "route",
            RuleAction::Scan => "scan",
        }
    }
}

/// One word or a list of words: `verbs = "DELE"` and `verbs = ["DELE"]` are the same.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct OneOrMany(pub(crate) Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_string()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<OneOrMany, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(OneOrMany(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// One `[[rule]]` table as written; every key is decoded on its own (see
/// [`RawRule::from_table`]) so that a bad value is reported with its key.
#[derive(Debug, Clone)]
pub(crate) struct RawRule {
    /// Unique name, shown in logs, audit and errors.
    pub(crate) name: String,
    /// The event this rule is about.
    pub(crate) on: EventKind,
    /// Matcher: listener names.
    pub(crate) listener: Option<OneOrMany>,
    /// Matcher: client networks (CIDR or single addresses).
    pub(crate) client: Option<OneOrMany>,
    /// Matcher: original destination networks (transparent interception).
    pub(crate) destination: Option<OneOrMany>,
    /// Matcher: client-side TLS on or off.
    pub(crate) tls: Option<bool>,
    /// Matcher: session states (`authorization`, `transaction`, `update`).
    pub(crate) state: Option<OneOrMany>,
    /// Matcher: user name regex.
    pub(crate) user: Option<String>,
    /// Matcher: command verbs (`command`, `login` events).
    pub(crate) verbs: Option<OneOrMany>,
    /// Matcher: command argument regex.
    pub(crate) args: Option<String>,
    /// Matcher: `ok`, `err` or `continue`.
    pub(crate) status: Option<String>,
    /// Matcher: status line / capability item regex.
    pub(crate) text: Option<String>,
    /// Matcher: verbs a response answers (`response` events).
    pub(crate) answers: Option<OneOrMany>,
    /// Matcher: the message size a RETR/TOP/LIST response states, e.g. `"> 10M"`.
    pub(crate) size: Option<String>,
    /// The action.
    pub(crate) action: RuleAction,
    /// `deny`: the reply text; `log`: the message template.
    pub(crate) message: Option<String>,
    /// `deny`: response code, e.g. `AUTH` or `SYS/PERM`.
    pub(crate) code: Option<String>,
    /// `deny` on `command`: close the session after this many denials by this rule.
    pub(crate) close_after: Option<u32>,
    /// `log`: error, warn, info (default), debug or trace.
    pub(crate) level: Option<String>,
    /// `tag`: labels.
    pub(crate) tags: Option<OneOrMany>,
    /// `delay`: how long, e.g. `"2s"`.
    pub(crate) delay: Option<Duration>,
    /// `rewrite`: regex to replace (all matches); without it `with` is the whole new value.
    pub(crate) replace: Option<String>,
    /// `rewrite`: replacement (`$1`, `${name}` refer to `replace` groups).
    pub(crate) with: Option<String>,
    /// `rewrite` on `capa`: remove the item.
    pub(crate) remove: Option<bool>,
    /// `rewrite` on `capa`: items to add at the end of the list.
    pub(crate) add: Option<OneOrMany>,
    /// `rewrite` on `greeting`: put the APOP timestamp back if the rewrite lost it (default true).
    pub(crate) keep_apop: Option<bool>,
    /// `tag`: `event` (default: the event's own audit record) or `session` (also every later one).
    pub(crate) scope: Option<String>,
    /// `route`: the upstream's name.
    pub(crate) upstream: Option<String>,
    /// `scan`: the scanners' names (`[[scanner]]` entries).
    pub(crate) scan: Option<OneOrMany>,
}

/// Every key a rule may have, for unknown-key messages.
pub(crate) const KEYS: [&str; 29] = [
    "name",
    "on",
    "listener",
    "client",
    "destination",
    "tls",
    "state",
    "user",
    "verbs",
    "args",
    "status",
    "text",
    "answers",
    "size",
    "action",
    "message",
    "code",
    "close_after",
    "level",
    "tags",
    "delay",
    "replace",
    "with",
    "remove",
    "add",
    "keep_apop",
    "scope",
    "upstream",
    "scan",
];

/// Decode a file into its rules, each with its [`RuleRef`]. Only `[[rule]]` tables may appear
/// at the top level; an empty file (or one with only comments) holds no rule and is valid.
pub(crate) fn decode_file(text: &str, file: &Path) -> Result<Vec<(RuleRef, RawRule)>, RuleError> {
    let syntax = |message: String| RuleError::Syntax {
        file: file.to_path_buf(),
        message,
    };
    let mut top: toml::Table = toml::from_str(text).map_err(|e| syntax(e.to_string()))?;
    let rules = match top.remove("rule") {
        None => Vec::new(),
        Some(toml::Value::Array(a)) => a,
        Some(_) => return Err(syntax("`rule` must be written as [[rule]] tables".into())),
    };
    if let Some(key) = top.keys().next() {
        return Err(syntax(format!(
            "unknown top-level key `{key}`: a rule file holds only [[rule]] tables"
        )));
    }
    let mut out = Vec::with_capacity(rules.len());
    for (i, value) in rules.into_iter().enumerate() {
        let index = i + 1;
        let bad = |rule: RuleRef, problem: Problem| RuleError::Rule {
            file: file.to_path_buf(),
            rule,
            problem,
        };
        let toml::Value::Table(table) = value else {
            return Err(syntax("`rule` must be written as [[rule]] tables".into()));
        };
        let rule = match table.get("name") {
            Some(toml::Value::String(name)) => RuleRef::Named {
                name: name.clone(),
                index,
            },
            _ => RuleRef::Index(index),
        };
        for key in table.keys() {
            if !KEYS.contains(&key.as_str()) {
                let problem = Problem::UnknownKey {
                    key: key.clone(),
                    suggestion: suggest(key),
                };
                return Err(bad(rule, problem));
            }
        }
        let raw = RawRule::from_table(table).map_err(|p| bad(rule.clone(), p))?;
        out.push((rule, raw));
    }
    Ok(out)
}

/// A duration written like `"500ms"` or `"2s"`.
#[derive(Deserialize)]
#[serde(transparent)]
struct HumanDuration(#[serde(with = "humantime_serde")] Duration);

/// Remove `key` from `t` and decode it.
fn take<T: serde::de::DeserializeOwned>(
    t: &mut toml::Table,
    key: &'static str,
) -> Result<Option<T>, Problem> {
    t.remove(key)
        .map(|v| {
            v.try_into()
                .map_err(|e| Problem::BadValue(format!("`{key}`: {}", tidy(&e))))
        })
        .transpose()
}

fn required<T: serde::de::DeserializeOwned>(
    t: &mut toml::Table,
    key: &'static str,
) -> Result<T, Problem> {
    take(t, key)?.ok_or(Problem::MissingKey(key))
}

impl RawRule {
    /// Decode one `[[rule]]` table whose keys are all known.
    pub(crate) fn from_table(mut t: toml::Table) -> Result<RawRule, Problem> {
        let t = &mut t;
        let raw = RawRule {
            name: required(t, "name")?,
            on: required(t, "on")?,
            action: required(t, "action")?,
            listener: take(t, "listener")?,
            client: take(t, "client")?,
            destination: take(t, "destination")?,
            tls: take(t, "tls")?,
            state: take(t, "state")?,
            user: take(t, "user")?,
            verbs: take(t, "verbs")?,
            args: take(t, "args")?,
            status: take(t, "status")?,
            text: take(t, "text")?,
            answers: take(t, "answers")?,
            size: take(t, "size")?,
            message: take(t, "message")?,
            code: take(t, "code")?,
            close_after: take(t, "close_after")?,
            level: take(t, "level")?,
            tags: take(t, "tags")?,
            delay: take::<HumanDuration>(t, "delay")?.map(|d| d.0),
            replace: take(t, "replace")?,
            with: take(t, "with")?,
            remove: take(t, "remove")?,
            add: take(t, "add")?,
            keep_apop: take(t, "keep_apop")?,
            scope: take(t, "scope")?,
            upstream: take(t, "upstream")?,
            scan: take(t, "scan")?,
        };
        // Keys listed in KEYS but not decoded above would otherwise be ignored silently.
        if let Some(key) = t.keys().next() {
            return Err(Problem::UnknownKey {
                key: key.clone(),
                suggestion: None,
            });
        }
        Ok(raw)
    }
}

/// The decoder's message on one line.
fn tidy(e: &toml::de::Error) -> String {
    e.message().trim().replace('\n', " ")
}

/// The known key closest to `key` (edit distance ≤ 2, or singular/plural), if any.
fn suggest(key: &str) -> Option<&'static str> {
    let key = key.to_ascii_lowercase();
    KEYS.iter()
        .map(|k| (distance(&key, k), *k))
        .filter(|&(d, _)| d <= 2)
        .min_by_key(|&(d, _)| d)
        .map(|(_, k)| k)
}

/// Levenshtein distance of two short ASCII-ish keys.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(suggest("verb"), Some("verbs"));
        assert_eq!(suggest("acton"), Some("action"));
        assert_eq!(suggest("Close_After"), Some("close_after"));
        assert_eq!(suggest("frobnicate"), None);
    }

    #[test]
    fn one_or_many() {
        let r: toml::Table = toml::from_str("a = \"x\"\nb = [\"y\", \"z\"]").unwrap();
        let a: OneOrMany = r["a"].clone().try_into().unwrap();
        let b: OneOrMany = r["b"].clone().try_into().unwrap();
        assert_eq!(a.0, vec!["x"]);
        assert_eq!(b.0, vec!["y", "z"]);
        let e = toml::Value::Integer(3).try_into::<OneOrMany>().unwrap_err();
        assert!(
            e.to_string().contains("a string or a list of strings"),
            "{e}"
        );
    }

    #[test]
    fn every_key_is_decoded() {
        let text = r#"
            name = "n"
            on = "capa"
            listener = "l"
            client = "10.0.0.0/8"
            destination = "192.0.2.0/24"
            tls = true
            state = "authorization"
            user = "u"
            verbs = "DELE"
            args = "a"
            status = "ok"
            text = "t"
            answers = "RETR"
            size = "> 1k"
            action = "rewrite"
            message = "m"
            code = "C"
            close_after = 1
            level = "info"
            tags = "t"
            delay = "1s"
            replace = "r"
            with = "w"
            remove = true
            add = "X"
            keep_apop = true
            scope = "session"
            upstream = "u"
            scan = ["clamav", "rspamd"]
        "#;
        let table: toml::Table = toml::from_str(text).unwrap();
        assert_eq!(table.len(), KEYS.len());
        let raw = RawRule::from_table(table).unwrap();
        assert_eq!(raw.delay, Some(Duration::from_secs(1)));
        assert_eq!(raw.on, EventKind::Capa);
        assert_eq!(raw.action, RuleAction::Rewrite);
        assert_eq!(
            raw.scan.map(|s| s.0),
            Some(vec!["clamav".into(), "rspamd".into()])
        );
    }

    #[test]
    fn empty_file_is_valid() {
        assert!(
            decode_file("# nothing yet\n", Path::new("x.toml"))
                .unwrap()
                .is_empty()
        );
    }
}
