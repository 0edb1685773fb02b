//! Rule loading errors: each says which file, which rule and what is wrong with it.

use std::fmt;
use std::path::PathBuf;

/// Which rule of a file an error is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleRef {
    /// A rule with a readable `name`, and its 1-based position in the file.
    Named {
        /// The rule's `name`.
        name: String,
        /// 1-based position among the file's `[[rule]]` tables.
        index: usize,
    },
    /// A rule whose name is missing or unreadable: only its 1-based position.
    Index(usize),
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleRef::Named { name, index } => write!(f, "rule `{name}` (#{index})"),
            RuleRef::Index(index) => write!(f, "rule #{index}"),
        }
    }
}

/// Why rules could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// A rule file or directory could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A `rules` pattern matched no file.
    #[error("rules pattern `{pattern}` matches no file in {}", dir.display())]
    NoMatch {
        /// The pattern as configured.
        pattern: String,
        /// The directory that was searched.
        dir: PathBuf,
    },
    /// A `rules` pattern this loader cannot expand.
    #[error("rules pattern `{pattern}`: {reason}")]
    BadPattern {
        /// The pattern as configured.
        pattern: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The file is not valid TOML, or its top level holds something other than `[[rule]]`.
    #[error("{}: {message}", file.display())]
    Syntax {
        /// The rule file.
        file: PathBuf,
        /// The parser's message (with line and column where known).
        message: String,
    },
    /// One rule is invalid.
    #[error("{}: {rule}: {problem}", file.display())]
    Rule {
        /// The rule file.
        file: PathBuf,
        /// Which rule.
        rule: RuleRef,
        /// What is wrong.
        problem: Problem,
    },
}

/// What is wrong with one rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// A required key is absent.
    #[error("missing key `{0}`")]
    MissingKey(&'static str),
    /// A key no rule has.
    #[error("unknown key `{key}`{}", did_you_mean(*.suggestion))]
    UnknownKey {
        /// The key as written.
        key: String,
        /// A known key it resembles.
        suggestion: Option<&'static str>,
    },
    /// A value of the wrong type or an unknown word (from the TOML decoder).
    #[error("{0}")]
    BadValue(String),
    /// A value of the right type that makes no sense.
    #[error("`{key}`: {reason}")]
    InvalidValue {
        /// The key.
        key: &'static str,
        /// Why.
        reason: String,
    },
    /// A regex that does not compile.
    #[error("bad regex in `{key}`: {message}")]
    BadRegex {
        /// `user`, `args`, `text` or `replace`.
        key: &'static str,
        /// The regex crate's message.
        message: String,
    },
    /// An entry of `client` that is not an address or CIDR network.
    #[error("bad CIDR `{value}` in `client`: {reason}")]
    BadCidr {
        /// The entry as written.
        value: String,
        /// Why.
        reason: String,
    },
    /// An action that cannot be carried out on this event.
    #[error("action `{action}` is not possible on `{event}` events{hint}")]
    ActionNotAllowed {
        /// The action.
        action: &'static str,
        /// The event (`on`).
        event: &'static str,
        /// Advice, starting with "; " when present.
        hint: &'static str,
    },
    /// A matcher that can never hold on this event.
    #[error("matcher `{key}` cannot be used on `{event}` events{hint}")]
    MatcherNotAllowed {
        /// The matcher key.
        key: &'static str,
        /// The event (`on`).
        event: &'static str,
        /// Advice, starting with "; " when present.
        hint: &'static str,
    },
    /// A key that belongs to another action.
    #[error("key `{key}` has no meaning for action `{action}`")]
    KeyNotForAction {
        /// The key.
        key: &'static str,
        /// The rule's action.
        action: &'static str,
    },
    /// A log message template with an unknown field or unbalanced braces.
    #[error("bad `message` template: {0}")]
    BadTemplate(String),
    /// Another rule already has this name.
    #[error("duplicate rule name (also used in {})", .0.display())]
    DuplicateName(PathBuf),
}

fn did_you_mean(s: Option<&'static str>) -> String {
    s.map(|k| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default()
}
