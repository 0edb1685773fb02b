//! Building a [`RuleSet`]: each rule of the model is validated once, its matchers and effect
//! compiled, and the set indexed by event kind and verb (plus dense per-rule [`Hot`] data and
//! shared [`RegexSet`]s) for [`super::eval`] to walk.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use regex::bytes::{Regex, RegexSet};
use tracing::Level;

use super::EventKind;
use super::error::{Problem, RuleError};
use super::model::{OneOrMany, RawRule, RuleAction, decode_file};
use super::template::Template;
use crate::cidr::Cidr;
use crate::pop3::command::Verb;
use crate::pop3::replies;
use crate::pop3::response::Status;
use crate::pop3::tracker::State;

/// Index slots per event kind: one per [`Verb`] (known verbs and `Unknown`) plus one for
/// events without a verb.
pub(super) const VERB_SLOTS: usize = Verb::ALL.len() + 2;
const NO_VERB: usize = VERB_SLOTS - 1;

/// The index slot of a verb. `Verb` is a field-less enum, so its discriminant is a dense
/// 0-based number; a test checks that every verb gets its own slot below [`NO_VERB`].
pub(super) fn verb_slot(v: Option<Verb>) -> usize {
    match v {
        Some(v) => v as usize,
        None => NO_VERB,
    }
}

pub(super) fn state_bit(s: State) -> u8 {
    match s {
        State::Authorization => 1,
        State::Transaction => 2,
        State::Update => 4,
    }
}

/// The regex matchers, by position in [`Matchers::re`].
pub(super) const USER: usize = 0;
pub(super) const ARGS: usize = 1;
pub(super) const TEXT: usize = 2;
const REGEX_FIELDS: [&str; 3] = ["user", "args", "text"];

/// From this many candidate rules with a regex on the same field, one [`RegexSet`] search
/// over that field replaces the individual searches (measured: 250 user regexes cost 0.9 to
/// 4.4 µs one by one, 40 ns as a set).
pub(super) const SET_THRESHOLD: u16 = 4;

/// The longest tarpit a rule may ask for: the RFC 1939 autologout minimum.
const MAX_DELAY: Duration = Duration::from_secs(600);

/// Conditions of one rule; `None`/`0` means "any".
#[derive(Debug, Default)]
pub(super) struct Matchers {
    pub(super) listener: Option<Box<[Box<str>]>>,
    pub(super) client: Option<Box<[Cidr]>>,
    /// Networks of the original destination; never holds without one.
    pub(super) destination: Option<Box<[Cidr]>>,
    pub(super) tls: Option<bool>,
    /// Bit set of [`state_bit`]s.
    pub(super) states: u8,
    /// Bit set of [`verb_slot`]s (`verbs` or `answers`).
    pub(super) verbs: u32,
    pub(super) status: Option<Status>,
    /// `size`: a comparison with the size a RETR/TOP/LIST response states.
    pub(super) size: Option<super::size::SizeCmp>,
    /// `user`, `args`, `text` regexes.
    pub(super) re: [Option<Regex>; 3],
}

impl Matchers {
    /// The event bits (see `event_bits` in [`super::eval`]) this rule accepts.
    fn allowed_bits(&self) -> u16 {
        let tls = match self.tls {
            None => TLS_OFF | TLS_ON,
            Some(false) => TLS_OFF,
            Some(true) => TLS_ON,
        };
        let states = if self.states == 0 {
            0b111
        } else {
            u16::from(self.states)
        };
        let status = match self.status {
            None => STATUS_NONE | STATUS_OK | STATUS_ERR | STATUS_CONTINUE,
            Some(s) => status_bit(Some(s)),
        };
        tls | states << 2 | status
    }
}

pub(super) const TLS_OFF: u16 = 1 << 0;
pub(super) const TLS_ON: u16 = 1 << 1;
// Bits 2..=4: the state bits of `state_bit`, shifted by 2.
const STATUS_NONE: u16 = 1 << 5;
const STATUS_OK: u16 = 1 << 6;
const STATUS_ERR: u16 = 1 << 7;
const STATUS_CONTINUE: u16 = 1 << 8;

pub(super) fn status_bit(s: Option<Status>) -> u16 {
    match s {
        None => STATUS_NONE,
        Some(Status::Ok) => STATUS_OK,
        Some(Status::Err) => STATUS_ERR,
        Some(Status::Continue) => STATUS_CONTINUE,
    }
}

/// Per-rule flags in [`Hot`].
pub(super) const ADDS_ITEMS: u8 = 1;
pub(super) const DENY_OR_REWRITE: u8 = 2;
pub(super) const COLD: u8 = 4;
/// A `deny` with a `user` matcher: it also holds on a SASL answer line that names the user
/// (the session then cancels the exchange); no other deny or rewrite touches those lines.
pub(super) const DENIES_A_USER: u8 = 8;
pub(super) const NO_SET: u32 = u32::MAX;

/// The part of a rule that evaluation looks at for every candidate, kept dense (16 bytes) so
/// that rejecting a rule does not touch the rule itself: with 1000 rules a scan stays in L1.
#[derive(Debug, Clone, Copy)]
pub(super) struct Hot {
    /// [`Matchers::allowed_bits`].
    pub(super) allow: u16,
    /// [`ADDS_ITEMS`], [`DENY_OR_REWRITE`], [`COLD`] (listener, client, destination or size
    /// matchers).
    pub(super) flags: u8,
    /// Bit set of the regex fields present.
    pub(super) regexes: u8,
    /// Each regex's pattern number in its kind's [`RegexSet`], or [`NO_SET`].
    pub(super) set_id: [u32; 3],
}

/// What a matched rule does.
#[derive(Debug)]
pub(super) enum Effect {
    Allow,
    Deny {
        reply: String,
        close_after: Option<u32>,
    },
    Drop,
    /// Regex replacement (or whole-value replacement when `re` is `None`).
    Replace {
        re: Option<Regex>,
        with: Box<[u8]>,
        keep_apop: bool,
    },
    RemoveItem,
    AddItems(Box<[String]>),
    Log {
        level: Level,
        template: Template,
    },
    /// Labels; `session`: for the rest of the session too, not only this event's record.
    Tag {
        tags: Box<[Arc<str>]>,
        session: bool,
    },
    Delay(Duration),
    Trace,
    /// Routing mode: the upstream's name (looked up by [`RuleSet::route`] only).
    Route(Arc<str>),
    /// Scanners for the body the command retrieves.
    Scan(Box<[Arc<str>]>),
}

#[derive(Debug)]
pub(super) struct Rule {
    pub(super) name: Arc<str>,
    pub(super) file: usize,
    pub(super) on: EventKind,
    pub(super) action: RuleAction,
    pub(super) when: Matchers,
    pub(super) effect: Effect,
}

/// A loaded, validated and indexed set of rules. Immutable: share it in an `Arc`; a reload
/// builds a new one, so sessions keep the set they started with.
pub struct RuleSet {
    pub(super) files: Vec<PathBuf>,
    /// Problems that do not stop loading (a wildcard pattern that matched no file).
    pub(super) warnings: Vec<String>,
    pub(super) rules: Vec<Rule>,
    /// Parallel to `rules`.
    pub(super) hot: Box<[Hot]>,
    /// `kind * VERB_SLOTS + verb_slot` → indexes into `rules`, in load order.
    pub(super) index: Box<[Box<[u32]>]>,
    /// Per index list: how many of its rules have a `user`, `args`, `text` regex.
    pub(super) regex_counts: Box<[[u16; 3]]>,
    /// Per event kind and regex field: the union of those regexes (`None` when unused or too
    /// big to build, then the rules' own regexes are used).
    pub(super) sets: Box<[[Option<RegexSet>; 3]]>,
}

impl fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rules: Vec<String> = self
            .rules
            .iter()
            .map(|r| format!("{} ({} → {})", r.name, r.on, r.action.as_str()))
            .collect();
        f.debug_struct("RuleSet")
            .field("files", &self.files)
            .field("rules", &rules)
            .finish()
    }
}

impl Default for RuleSet {
    fn default() -> Self {
        RuleSet::empty()
    }
}

/// A summary of one rule, for `popgate check` and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RuleInfo<'a> {
    /// The rule's name.
    pub name: &'a str,
    /// The file it came from.
    pub file: &'a Path,
    /// Its event.
    pub on: EventKind,
    /// Its action.
    pub action: RuleAction,
}

impl RuleSet {
    /// No rules: every event gets the default (empty) verdict.
    pub(crate) fn empty() -> RuleSet {
        Builder::default().finish()
    }

    /// Load every file `patterns` name, relative to `base` (the config file's directory).
    /// Patterns are globs with `*`/`?` in the file name only (`rules/*.toml`); each pattern's
    /// files load in name order, patterns in the order given; a file named twice loads once.
    /// A file named without wildcards that does not exist is an error; a wildcard pattern that
    /// matches no file is a warning ([`RuleSet::warnings`]).
    pub fn load(patterns: &[String], base: &Path) -> Result<RuleSet, RuleError> {
        let mut b = Builder::default();
        let (files, warnings) = super::glob::expand(patterns, base)?;
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|source| RuleError::Io {
                path: file.clone(),
                source,
            })?;
            b.add_file(&text, &file)?;
        }
        let mut set = b.finish();
        set.warnings = warnings;
        Ok(set)
    }

    /// What loading found questionable without failing (one line each).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Compile the rules of one file's `text`; `file` is used in errors and [`RuleSet::files`].
    pub fn parse(text: &str, file: &Path) -> Result<RuleSet, RuleError> {
        let mut b = Builder::default();
        b.add_file(text, file)?;
        Ok(b.finish())
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules at all.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The files loaded, in load order (including files that hold no rule).
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Every rule in evaluation order.
    pub(crate) fn rules(&self) -> impl ExactSizeIterator<Item = RuleInfo<'_>> + '_ {
        self.rules.iter().map(|r| RuleInfo {
            name: &r.name,
            file: &self.files[r.file],
            on: r.on,
            action: r.action,
        })
    }

    /// Whether any rule is about `kind`: lets the session skip work (e.g. collecting a CAPA
    /// list item by item) that no rule would look at.
    pub(crate) fn has_rules_for(&self, kind: EventKind) -> bool {
        self.rules.iter().any(|r| r.on == kind)
    }

    /// Every `route` rule's name and upstream, in load order.
    #[cfg(test)]
    pub(crate) fn routes(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.routes_in_files().map(|(_, r, u)| (r, u))
    }

    /// Every `route` rule's file, name and upstream, in load order.
    pub(crate) fn routes_in_files(&self) -> impl Iterator<Item = (&Path, &str, &str)> + '_ {
        self.rules.iter().filter_map(|r| match &r.effect {
            Effect::Route(u) => Some((self.files[r.file].as_path(), &*r.name, &**u)),
            _ => None,
        })
    }

    /// Every scanner name a `scan` rule gives: the rule's file, name and the scanner, in load
    /// order (for `popgate check`: each must be a `[[scanner]]`).
    pub(crate) fn scanners_in_files(&self) -> impl Iterator<Item = (&Path, &str, &str)> + '_ {
        self.rules.iter().flat_map(move |r| {
            let names: &[Arc<str>] = match &r.effect {
                Effect::Scan(names) => names,
                _ => &[],
            };
            names
                .iter()
                .map(move |n| (self.files[r.file].as_path(), &*r.name, &**n))
        })
    }

    /// Every `scan` rule that selects `RETR` but not `TOP`: its file and name. `TOP n 999999`
    /// retrieves a whole message, which such a rule leaves unscanned.
    pub(crate) fn scan_rules_without_top(&self) -> impl Iterator<Item = (&Path, &str)> + '_ {
        let bit = |v: Verb| 1u32 << verb_slot(Some(v));
        self.rules.iter().filter_map(move |r| {
            let selects = |v| r.when.verbs == 0 || r.when.verbs & bit(v) != 0;
            (matches!(r.effect, Effect::Scan(_)) && selects(Verb::Retr) && !selects(Verb::Top))
                .then(|| (self.files[r.file].as_path(), &*r.name))
        })
    }

    /// Every `delay` rule on `connect` events: its file, name and delay, in load order (for
    /// `popgate check`: the delay counts into `limits.login_timeout`).
    pub(crate) fn connect_delays(&self) -> impl Iterator<Item = (&Path, &str, Duration)> + '_ {
        self.rules.iter().filter_map(|r| match r.effect {
            Effect::Delay(d) if r.on == EventKind::Connect => {
                Some((self.files[r.file].as_path(), &*r.name, d))
            }
            _ => None,
        })
    }

    /// Every rule whose `user` regex has an ASCII capital letter (outside escapes such as `\S`
    /// or `\p{Lu}`) and no `(?i)`: its file, name and pattern. Against user names folded to
    /// lower case (`upstream.user_names = "fold"`) such a pattern may never match.
    pub(crate) fn user_patterns_with_capitals(
        &self,
    ) -> impl Iterator<Item = (&Path, &str, &str)> + '_ {
        self.rules.iter().filter_map(|r| {
            let pattern = r.when.re[0].as_ref()?.as_str();
            has_literal_capital(pattern).then(|| (self.files[r.file].as_path(), &*r.name, pattern))
        })
    }
}

/// Whether `pattern` has an ASCII capital letter that is not part of an escape (`\A`, `\S`,
/// `\p{Lu}`) and is not made case-insensitive by an `i` flag. A heuristic for a warning.
fn has_literal_capital(pattern: &str) -> bool {
    if pattern.contains("(?i") || (pattern.contains("(?") && pattern.contains("i)")) {
        return false;
    }
    let b = pattern.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => {
                // `\p{..}` / `\P{..}` / `\x{..}` name classes or code points: skip the braces.
                let next = b.get(i + 1).copied();
                i += 2;
                if matches!(next, Some(b'p' | b'P' | b'x')) && b.get(i) == Some(&b'{') {
                    while i < b.len() && b[i] != b'}' {
                        i += 1;
                    }
                } else if matches!(next, Some(b'p' | b'P')) {
                    // `\pL`: a one-letter class name.
                    i += 1;
                }
            }
            c if c.is_ascii_uppercase() => return true,
            _ => i += 1,
        }
    }
    false
}

#[cfg(test)]
#[test]
fn capitals_in_user_patterns_are_found_outside_escapes() {
    for p in ["^EVE$", "^Alice@", "[A-Z]x", "\\SBob"] {
        assert!(has_literal_capital(p), "{p}");
    }
    for p in [
        "^eve$",
        "(?i)^EVE$",
        "(?xi)^EVE$",
        "\\S+@\\w+\\.org\\A\\z",
        "\\p{Lu}\\P{Greek}\\pL\\x{C9}",
    ] {
        assert!(!has_literal_capital(p), "{p}");
    }
}

/// Accumulates files and rules; checks name uniqueness across files.
#[derive(Default)]
struct Builder {
    files: Vec<PathBuf>,
    rules: Vec<Rule>,
    names: HashMap<Arc<str>, usize>,
}

impl Builder {
    fn add_file(&mut self, text: &str, file: &Path) -> Result<(), RuleError> {
        let decoded = decode_file(text, file)?;
        let file_idx = self.files.len();
        self.files.push(file.to_path_buf());
        for (rule_ref, raw) in decoded {
            let bad = |problem| RuleError::Rule {
                file: file.to_path_buf(),
                rule: rule_ref.clone(),
                problem,
            };
            let rule = compile(raw, file_idx).map_err(bad)?;
            if let Some(&other) = self.names.get(&rule.name) {
                return Err(bad(Problem::DuplicateName(self.files[other].clone())));
            }
            self.names.insert(rule.name.clone(), file_idx);
            self.rules.push(rule);
        }
        Ok(())
    }

    fn finish(self) -> RuleSet {
        let lists = EventKind::ALL.len() * VERB_SLOTS;
        let mut index = vec![Vec::new(); lists];
        let mut regex_counts = vec![[0u16; 3]; lists];
        for (i, r) in self.rules.iter().enumerate() {
            let base = r.on as usize * VERB_SLOTS;
            for slot in 0..VERB_SLOTS {
                if r.when.verbs == 0 || r.when.verbs & (1 << slot) != 0 {
                    // More than u32::MAX rules cannot be loaded from memory-sized files anyway.
                    index[base + slot].push(u32::try_from(i).unwrap_or(u32::MAX));
                    for (re, c) in r.when.re.iter().zip(regex_counts[base + slot].iter_mut()) {
                        if re.is_some() {
                            *c = c.saturating_add(1);
                        }
                    }
                }
            }
        }
        let mut hot: Vec<Hot> = self
            .rules
            .iter()
            .map(|r| {
                let mut flags = 0;
                if matches!(r.effect, Effect::AddItems(_)) {
                    flags |= ADDS_ITEMS;
                }
                if matches!(r.action, RuleAction::Deny | RuleAction::Rewrite) {
                    flags |= DENY_OR_REWRITE;
                }
                if matches!(r.action, RuleAction::Deny) && r.when.re[USER].is_some() {
                    flags |= DENIES_A_USER;
                }
                if r.when.listener.is_some()
                    || r.when.client.is_some()
                    || r.when.destination.is_some()
                    || r.when.size.is_some()
                {
                    flags |= COLD;
                }
                let regexes = (0..3)
                    .filter(|&f| r.when.re[f].is_some())
                    .fold(0, |acc, f| acc | 1 << f);
                Hot {
                    allow: r.when.allowed_bits(),
                    flags,
                    regexes,
                    set_id: [NO_SET; 3],
                }
            })
            .collect();
        let sets = EventKind::ALL
            .iter()
            .map(|&kind| [USER, ARGS, TEXT].map(|f| self.regex_set(kind, f, &mut hot)))
            .collect();
        RuleSet {
            files: self.files,
            warnings: Vec::new(),
            rules: self.rules,
            hot: hot.into_boxed_slice(),
            index: index.into_iter().map(Vec::into_boxed_slice).collect(),
            regex_counts: regex_counts.into_boxed_slice(),
            sets,
        }
    }

    /// The union of the `f` regexes of `kind`'s rules, numbering each rule's pattern; `None`
    /// when too few rules would use it or it cannot be built (size limits): then each rule's
    /// own regex is used.
    fn regex_set(&self, kind: EventKind, f: usize, hot: &mut [Hot]) -> Option<RegexSet> {
        let patterns: Vec<&str> = self
            .rules
            .iter()
            .filter(|r| r.on == kind)
            .filter_map(|r| r.when.re[f].as_ref().map(Regex::as_str))
            .collect();
        if patterns.len() < usize::from(SET_THRESHOLD) {
            return None;
        }
        let set = RegexSet::new(&patterns).ok()?;
        let mut id = 0;
        for (r, h) in self.rules.iter().zip(hot.iter_mut()) {
            if r.on == kind && r.when.re[f].is_some() {
                h.set_id[f] = id;
                id += 1;
            }
        }
        Some(set)
    }
}

fn not_on(key: &'static str, on: EventKind, hint: &'static str) -> Problem {
    Problem::MatcherNotAllowed {
        key,
        event: on.as_str(),
        hint,
    }
}

fn invalid(key: &'static str, reason: impl Into<String>) -> Problem {
    Problem::InvalidValue {
        key,
        reason: reason.into(),
    }
}

fn regex(key: &'static str, pattern: &str) -> Result<Regex, Problem> {
    Regex::new(pattern).map_err(|e| Problem::BadRegex {
        key,
        message: e.to_string(),
    })
}

fn non_empty(key: &'static str, list: OneOrMany) -> Result<Vec<String>, Problem> {
    if list.0.is_empty() {
        return Err(invalid(
            key,
            "an empty list never matches; leave the key out",
        ));
    }
    Ok(list.0)
}

fn printable(key: &'static str, s: &str) -> Result<(), Problem> {
    if s.chars().any(char::is_control) {
        return Err(invalid(
            key,
            "must not contain line breaks or control characters",
        ));
    }
    Ok(())
}

/// Validate one rule and compile its matchers and effect.
fn compile(raw: RawRule, file: usize) -> Result<Rule, Problem> {
    use EventKind as E;
    let on = raw.on;
    let action = raw.action;
    if raw.name.trim().is_empty() {
        return Err(invalid("name", "must not be empty"));
    }
    printable("name", &raw.name)?;

    // Which matchers can hold on which event.
    if raw.user.is_some() && matches!(on, E::Connect | E::Greeting) {
        return Err(not_on(
            "user",
            on,
            "; the user is only known after USER/APOP/AUTH",
        ));
    }
    if raw.verbs.is_some() && !matches!(on, E::Command | E::Login) {
        let hint = if on == E::Response {
            "; use `answers` for the command a response answers"
        } else {
            ""
        };
        return Err(not_on("verbs", on, hint));
    }
    if raw.answers.is_some() && on != E::Response {
        let hint = if on == E::Command {
            "; use `verbs`"
        } else {
            ""
        };
        return Err(not_on("answers", on, hint));
    }
    if raw.args.is_some() && on != E::Command {
        return Err(not_on(
            "args",
            on,
            "; `text` matches status lines and CAPA items",
        ));
    }
    if raw.status.is_some() && !matches!(on, E::Greeting | E::Response | E::Login) {
        return Err(not_on("status", on, ""));
    }
    if raw.size.is_some() && on != E::Response {
        return Err(not_on(
            "size",
            on,
            "; it matches the size a RETR, TOP or LIST response states",
        ));
    }
    if raw.text.is_some() && !matches!(on, E::Greeting | E::Response | E::Capa) {
        let hint = if on == E::Command { "; use `args`" } else { "" };
        return Err(not_on("text", on, hint));
    }

    // Which actions can be carried out on which event.
    let refuse = |hint: &'static str| {
        Err(Problem::ActionNotAllowed {
            action: action.as_str(),
            event: on.as_str(),
            hint,
        })
    };
    match (action, on) {
        (RuleAction::Deny, E::Command | E::Connect) => {}
        (RuleAction::Deny, E::Response) => {
            return refuse("; rewrite the line instead (its status indicator must stay)");
        }
        (RuleAction::Deny, E::Greeting) => {
            return refuse("; deny on `connect` refuses a client before the greeting");
        }
        (RuleAction::Deny, E::Login) => {
            return refuse("; the server has already answered: use `drop` to end the session");
        }
        (RuleAction::Deny, E::Capa) => return refuse("; use `rewrite` with `remove = true`"),
        (RuleAction::Rewrite, E::Command | E::Response | E::Greeting | E::Capa) => {}
        (RuleAction::Rewrite, _) => {
            return refuse(
                "; only command arguments, status lines and CAPA items can be rewritten",
            );
        }
        (RuleAction::Route, E::Command) => {}
        (RuleAction::Route, _) => {
            return refuse("; a route is chosen when the login is known (`on = \"command\"`)");
        }
        (RuleAction::Scan, E::Command) => {}
        (RuleAction::Scan, _) => {
            return refuse("; a scan is chosen with the RETR or TOP that retrieves the message");
        }
        (RuleAction::Deny | RuleAction::Drop | RuleAction::Delay | RuleAction::Trace, E::Close) => {
            return refuse("; the session is already over");
        }
        _ => {}
    }

    // Keys that belong to other actions.
    let keys: [(&'static str, bool, &[RuleAction]); 14] = [
        ("upstream", raw.upstream.is_some(), &[RuleAction::Route]),
        ("scan", raw.scan.is_some(), &[RuleAction::Scan]),
        ("scope", raw.scope.is_some(), &[RuleAction::Tag]),
        (
            "message",
            raw.message.is_some(),
            &[RuleAction::Deny, RuleAction::Log],
        ),
        ("code", raw.code.is_some(), &[RuleAction::Deny]),
        (
            "close_after",
            raw.close_after.is_some(),
            &[RuleAction::Deny],
        ),
        ("level", raw.level.is_some(), &[RuleAction::Log]),
        ("tags", raw.tags.is_some(), &[RuleAction::Tag]),
        ("delay", raw.delay.is_some(), &[RuleAction::Delay]),
        ("replace", raw.replace.is_some(), &[RuleAction::Rewrite]),
        ("with", raw.with.is_some(), &[RuleAction::Rewrite]),
        ("remove", raw.remove.is_some(), &[RuleAction::Rewrite]),
        ("add", raw.add.is_some(), &[RuleAction::Rewrite]),
        ("keep_apop", raw.keep_apop.is_some(), &[RuleAction::Rewrite]),
    ];
    for (key, present, actions) in keys {
        if present && !actions.contains(&action) {
            return Err(Problem::KeyNotForAction {
                key,
                action: action.as_str(),
            });
        }
    }

    let name = Arc::from(raw.name.as_str());
    let when = matchers(&raw)?;
    let effect = effect(raw, on, action)?;
    if matches!(effect, Effect::AddItems(_)) && when.re[TEXT].is_some() {
        return Err(invalid(
            "add",
            "`add` runs once at the end of the CAPA list, where there is no item for `text` to match",
        ));
    }
    Ok(Rule {
        name,
        file,
        on,
        action,
        when,
        effect,
    })
}

fn matchers(raw: &RawRule) -> Result<Matchers, Problem> {
    let mut m = Matchers {
        tls: raw.tls,
        ..Matchers::default()
    };
    if let Some(l) = &raw.listener {
        let names = non_empty("listener", l.clone())?;
        m.listener = Some(names.into_iter().map(String::into_boxed_str).collect());
    }
    if let Some(c) = &raw.client {
        let mut nets = Vec::new();
        for value in non_empty("client", c.clone())? {
            let net = Cidr::parse(&value).map_err(|reason| Problem::BadCidr {
                value: value.clone(),
                reason,
            })?;
            nets.push(net);
        }
        m.client = Some(nets.into_boxed_slice());
    }
    if let Some(c) = &raw.destination {
        let mut nets = Vec::new();
        for value in non_empty("destination", c.clone())? {
            let net = Cidr::parse(&value).map_err(|reason| Problem::BadCidr {
                value: value.clone(),
                reason,
            })?;
            nets.push(net);
        }
        m.destination = Some(nets.into_boxed_slice());
    }
    if let Some(s) = &raw.state {
        for name in non_empty("state", s.clone())? {
            m.states |= match name.to_ascii_lowercase().as_str() {
                "authorization" => state_bit(State::Authorization),
                "transaction" => state_bit(State::Transaction),
                "update" => state_bit(State::Update),
                _ => {
                    return Err(invalid(
                        "state",
                        format!("unknown state `{name}` (authorization, transaction or update)"),
                    ));
                }
            };
        }
    }
    for (key, list) in [("verbs", &raw.verbs), ("answers", &raw.answers)] {
        let Some(list) = list else { continue };
        for word in non_empty(key, list.clone())? {
            let verb = parse_verb(&word).ok_or_else(|| {
                let known: Vec<&str> = Verb::ALL.iter().map(|v| v.as_str()).collect();
                invalid(
                    key,
                    format!(
                        "unknown verb `{word}` (known: {}, or UNKNOWN for commands popgate does not know)",
                        known.join(" ")
                    ),
                )
            })?;
            if raw.on == EventKind::Login && !matches!(verb, Verb::Pass | Verb::Apop | Verb::Auth) {
                return Err(invalid(
                    key,
                    format!("logins complete with PASS, APOP or AUTH, never with `{word}`"),
                ));
            }
            m.verbs |= 1 << verb_slot(Some(verb));
        }
    }
    if let Some(text) = &raw.size {
        m.size = Some(super::size::SizeCmp::parse(text).map_err(|r| invalid("size", r))?);
        let sized = [Verb::Retr, Verb::Top, Verb::List].map(|v| 1u32 << verb_slot(Some(v)));
        let sized = sized.iter().fold(0, |a, b| a | b);
        if m.verbs & !sized != 0 {
            return Err(invalid(
                "size",
                "only RETR, TOP and LIST responses state a size: limit `answers` to them",
            ));
        }
        if m.verbs == 0 {
            // Indexed under these verbs only: other responses never hold.
            m.verbs = sized;
        }
    }
    if let Some(s) = &raw.status {
        let status = match s.to_ascii_lowercase().as_str() {
            "ok" => Status::Ok,
            "err" => Status::Err,
            "continue" if raw.on == EventKind::Response => Status::Continue,
            "continue" => {
                return Err(invalid(
                    "status",
                    "`continue` (SASL `+ ` challenge) only occurs on response events",
                ));
            }
            _ => {
                return Err(invalid(
                    "status",
                    format!("unknown status `{s}` (ok, err or continue)"),
                ));
            }
        };
        m.status = Some(status);
    }
    for (f, pattern) in [&raw.user, &raw.args, &raw.text].into_iter().enumerate() {
        m.re[f] = pattern
            .as_deref()
            .map(|p| regex(REGEX_FIELDS[f], p))
            .transpose()?;
    }
    Ok(m)
}

fn parse_verb(word: &str) -> Option<Verb> {
    if word.eq_ignore_ascii_case("UNKNOWN") {
        return Some(Verb::Unknown);
    }
    Some(Verb::from_keyword(word.as_bytes())).filter(|v| *v != Verb::Unknown)
}

/// A response code as in RFC 2449: levels separated by `/`, no spaces or brackets.
fn valid_code(code: &str) -> bool {
    !code.is_empty()
        && code.split('/').all(|level| {
            !level.is_empty()
                && level
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'[' && b != b']')
        })
}

fn effect(raw: RawRule, on: EventKind, action: RuleAction) -> Result<Effect, Problem> {
    Ok(match action {
        RuleAction::Allow => Effect::Allow,
        RuleAction::Drop => Effect::Drop,
        RuleAction::Trace => Effect::Trace,
        RuleAction::Deny => {
            let message = raw.message.unwrap_or_else(|| {
                if on == EventKind::Connect {
                    replies::DENY_CONNECTION_MESSAGE.into()
                } else {
                    replies::DENY_COMMAND_MESSAGE.into()
                }
            });
            printable("message", &message)?;
            let reply = match raw.code {
                Some(code) if valid_code(&code) => replies::deny(Some(&code), &message),
                Some(code) => {
                    return Err(invalid(
                        "code",
                        format!(
                            "`{code}` is not a response code: write it without brackets, e.g. \"AUTH\" or \"SYS/PERM\""
                        ),
                    ));
                }
                None => replies::deny(None, &message),
            };
            let close_after = match (raw.close_after, on) {
                (None, _) => None,
                (Some(0), _) => return Err(invalid("close_after", "must be at least 1")),
                (Some(n), EventKind::Command) => Some(n),
                (Some(_), _) => {
                    return Err(invalid(
                        "close_after",
                        "only for deny on command events (a refused connection closes anyway)",
                    ));
                }
            };
            Effect::Deny { reply, close_after }
        }
        RuleAction::Log => {
            let message = raw.message.ok_or(Problem::MissingKey("message"))?;
            let template = Template::parse(&message).map_err(Problem::BadTemplate)?;
            let level = match raw.level.as_deref().map(str::to_ascii_lowercase).as_deref() {
                None | Some("info") => Level::INFO,
                Some("error") => Level::ERROR,
                Some("warn") => Level::WARN,
                Some("debug") => Level::DEBUG,
                Some("trace") => Level::TRACE,
                Some(other) => {
                    return Err(invalid(
                        "level",
                        format!("unknown level `{other}` (error, warn, info, debug or trace)"),
                    ));
                }
            };
            Effect::Log { level, template }
        }
        RuleAction::Tag => {
            let tags = non_empty("tags", raw.tags.ok_or(Problem::MissingKey("tags"))?)?;
            for t in &tags {
                if t.is_empty() || t.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    return Err(invalid(
                        "tags",
                        format!("`{t}`: tags are non-empty words without spaces"),
                    ));
                }
            }
            let session = match raw.scope.as_deref() {
                Some("session") => true,
                None | Some("event") => false,
                Some(other) => {
                    return Err(invalid(
                        "scope",
                        format!("unknown scope `{other}` (event or session)"),
                    ));
                }
            };
            if !session && matches!(on, EventKind::Greeting | EventKind::Capa) {
                return Err(invalid(
                    "scope",
                    format!(
                        "`{on}` events have no audit record of their own: write scope = \"session\""
                    ),
                ));
            }
            Effect::Tag {
                tags: tags.into_iter().map(Arc::from).collect(),
                session,
            }
        }
        RuleAction::Delay => {
            let d = raw.delay.ok_or(Problem::MissingKey("delay"))?;
            if d.is_zero() || d > MAX_DELAY {
                return Err(invalid("delay", "must be more than 0 and at most 10m"));
            }
            Effect::Delay(d)
        }
        RuleAction::Rewrite => rewrite_effect(raw, on)?,
        RuleAction::Route => {
            let name = raw.upstream.ok_or(Problem::MissingKey("upstream"))?;
            // As `config::is_upstream_name` (rules may not use config).
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !valid {
                return Err(invalid(
                    "upstream",
                    format!("`{name}` is not an upstream name"),
                ));
            }
            Effect::Route(Arc::from(name))
        }
        RuleAction::Scan => {
            let names = non_empty("scan", raw.scan.ok_or(Problem::MissingKey("scan"))?)?;
            let mut out: Vec<Arc<str>> = Vec::with_capacity(names.len());
            for n in names {
                if n.is_empty() || n.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    return Err(invalid(
                        "scan",
                        format!("`{n}`: scanner names are non-empty words without spaces"),
                    ));
                }
                if !out.iter().any(|o| **o == *n) {
                    out.push(Arc::from(n));
                }
            }
            Effect::Scan(out.into_boxed_slice())
        }
    })
}

fn rewrite_effect(raw: RawRule, on: EventKind) -> Result<Effect, Problem> {
    if raw.keep_apop.is_some() && on != EventKind::Greeting {
        return Err(invalid(
            "keep_apop",
            "only greeting rewrites can lose the APOP timestamp",
        ));
    }
    let modes = usize::from(raw.with.is_some())
        + usize::from(raw.remove.is_some())
        + usize::from(raw.add.is_some());
    if modes > 1 {
        return Err(invalid(
            "action",
            "a rewrite does one thing: `with` (and `replace`), `remove` or `add`; use several rules",
        ));
    }
    if raw.replace.is_some() && raw.with.is_none() {
        return Err(Problem::MissingKey("with"));
    }
    if let Some(remove) = raw.remove {
        if on != EventKind::Capa {
            return Err(invalid("remove", "only CAPA items can be removed"));
        }
        if !remove {
            return Err(invalid(
                "remove",
                "`remove = false` does nothing; leave it out",
            ));
        }
        return Ok(Effect::RemoveItem);
    }
    if let Some(add) = raw.add {
        if on != EventKind::Capa {
            return Err(invalid("add", "only CAPA lists get items added"));
        }
        let items = non_empty("add", add)?;
        for item in &items {
            printable("add", item)?;
            if item.trim().is_empty() {
                return Err(invalid("add", "capability items must not be empty"));
            }
        }
        return Ok(Effect::AddItems(items.into_boxed_slice()));
    }
    let Some(with) = raw.with else {
        return Err(invalid(
            "action",
            "`rewrite` needs `with` (optionally with `replace`), `remove = true` or `add = [...]`",
        ));
    };
    printable("with", &with)?;
    let re = raw
        .replace
        .as_deref()
        .map(|p| regex("replace", p))
        .transpose()?;
    Ok(Effect::Replace {
        re,
        with: with.into_bytes().into_boxed_slice(),
        keep_apop: raw.keep_apop.unwrap_or(true),
    })
}
