//! Compiled rules: validated once, indexed by event kind and verb, evaluated without I/O.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use regex::bytes::{Regex, RegexSet, SetMatches};
use tracing::Level;

use super::error::{Problem, RuleError};
use super::model::{Action, OneOrMany, RawRule, decode_file};
use super::template::Template;
use super::{Event, EventKind, Outcome, Verdict};
use crate::cidr::Cidr;
use crate::pop3::command::Verb;
use crate::pop3::response::{Status, StatusLine};
use crate::pop3::tracker::State;

/// Index slots per event kind: one per [`Verb`] (known verbs and `Unknown`) plus one for
/// events without a verb.
const VERB_SLOTS: usize = Verb::ALL.len() + 2;
const NO_VERB: usize = VERB_SLOTS - 1;

/// The index slot of a verb. `Verb` is a field-less enum, so its discriminant is a dense
/// 0-based number; a test checks that every verb gets its own slot below [`NO_VERB`].
fn verb_slot(v: Option<Verb>) -> usize {
    match v {
        Some(v) => v as usize,
        None => NO_VERB,
    }
}

fn state_bit(s: State) -> u8 {
    match s {
        State::Authorization => 1,
        State::Transaction => 2,
        State::Update => 4,
    }
}

/// The regex matchers, by position in [`Matchers::re`].
const USER: usize = 0;
const ARGS: usize = 1;
const TEXT: usize = 2;
const REGEX_FIELDS: [&str; 3] = ["user", "args", "text"];

/// From this many candidate rules with a regex on the same field, one [`RegexSet`] search
/// over that field replaces the individual searches (measured: 250 user regexes cost 0.9 to
/// 4.4 µs one by one, 40 ns as a set).
const SET_THRESHOLD: u16 = 4;

/// The value a regex field is matched against.
fn field<'a>(ev: &Event<'a>, f: usize) -> Option<&'a [u8]> {
    match f {
        USER => ev.user.map(str::as_bytes),
        ARGS => ev.args,
        _ => ev.text,
    }
}

/// The longest tarpit a rule may ask for: the RFC 1939 autologout minimum.
const MAX_DELAY: Duration = Duration::from_secs(600);

/// Conditions of one rule; `None`/`0` means "any".
#[derive(Debug, Default)]
struct Matchers {
    listener: Option<Box<[Box<str>]>>,
    client: Option<Box<[Cidr]>>,
    tls: Option<bool>,
    /// Bit set of [`state_bit`]s.
    states: u8,
    /// Bit set of [`verb_slot`]s (`verbs` or `answers`).
    verbs: u32,
    status: Option<Status>,
    /// `user`, `args`, `text` regexes.
    re: [Option<Regex>; 3],
}

impl Matchers {
    /// The checks [`Hot`] leaves open: listener, client, and the regex fields in `fields`
    /// (a bit set) that no set search answered.
    fn hold_cold(&self, ev: &Event<'_>, fields: u8) -> bool {
        if let Some(names) = &self.listener
            && !names.iter().any(|n| **n == *ev.listener)
        {
            return false;
        }
        if let Some(nets) = &self.client
            && !nets.iter().any(|n| n.contains(ev.client))
        {
            return false;
        }
        (0..3).all(|f| {
            fields & (1 << f) == 0
                || match (&self.re[f], field(ev, f)) {
                    (Some(re), Some(value)) => re.is_match(value),
                    _ => true,
                }
        })
    }

    /// The event bits (see [`event_bits`]) this rule accepts.
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

const TLS_OFF: u16 = 1 << 0;
const TLS_ON: u16 = 1 << 1;
// Bits 2..=4: the state bits of `state_bit`, shifted by 2.
const STATUS_NONE: u16 = 1 << 5;
const STATUS_OK: u16 = 1 << 6;
const STATUS_ERR: u16 = 1 << 7;
const STATUS_CONTINUE: u16 = 1 << 8;

fn status_bit(s: Option<Status>) -> u16 {
    match s {
        None => STATUS_NONE,
        Some(Status::Ok) => STATUS_OK,
        Some(Status::Err) => STATUS_ERR,
        Some(Status::Continue) => STATUS_CONTINUE,
    }
}

/// One bit per category (TLS, state, status) describing the event; a rule holds only if its
/// [`Matchers::allowed_bits`] include all of them.
fn event_bits(ev: &Event<'_>) -> u16 {
    (if ev.tls { TLS_ON } else { TLS_OFF })
        | u16::from(state_bit(ev.state)) << 2
        | status_bit(ev.status)
}

/// Per-rule flags in [`Hot`].
const ADDS_ITEMS: u8 = 1;
const DENY_OR_REWRITE: u8 = 2;
const COLD: u8 = 4;
const NO_SET: u32 = u32::MAX;

/// The part of a rule that evaluation looks at for every candidate, kept dense (16 bytes) so
/// that rejecting a rule does not touch the rule itself: with 1000 rules a scan stays in L1.
#[derive(Debug, Clone, Copy)]
struct Hot {
    /// [`Matchers::allowed_bits`].
    allow: u16,
    /// [`ADDS_ITEMS`], [`DENY_OR_REWRITE`], [`COLD`] (listener or client matchers).
    flags: u8,
    /// Bit set of the regex fields present.
    regexes: u8,
    /// Each regex's pattern number in its kind's [`RegexSet`], or [`NO_SET`].
    set_id: [u32; 3],
}

/// What a matched rule does.
#[derive(Debug)]
enum Effect {
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
    Tag(Box<[Arc<str>]>),
    Delay(Duration),
    Trace,
}

#[derive(Debug)]
struct Rule {
    name: Arc<str>,
    file: usize,
    on: EventKind,
    action: Action,
    when: Matchers,
    effect: Effect,
}

/// A loaded, validated and indexed set of rules. Immutable: share it in an `Arc`; a reload
/// builds a new one, so sessions keep the set they started with.
pub struct RuleSet {
    files: Vec<PathBuf>,
    rules: Vec<Rule>,
    /// Parallel to `rules`.
    hot: Box<[Hot]>,
    /// `kind * VERB_SLOTS + verb_slot` → indexes into `rules`, in load order.
    index: Box<[Box<[u32]>]>,
    /// Per index list: how many of its rules have a `user`, `args`, `text` regex.
    regex_counts: Box<[[u16; 3]]>,
    /// Per event kind and regex field: the union of those regexes (`None` when unused or too
    /// big to build, then the rules' own regexes are used).
    sets: Box<[[Option<RegexSet>; 3]]>,
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
pub struct RuleInfo<'a> {
    /// The rule's name.
    pub name: &'a str,
    /// The file it came from.
    pub file: &'a Path,
    /// Its event.
    pub on: EventKind,
    /// Its action.
    pub action: Action,
}

impl RuleSet {
    /// No rules: every event gets the default (empty) verdict.
    pub fn empty() -> RuleSet {
        Builder::default().finish()
    }

    /// Load every file `patterns` name, relative to `base` (the config file's directory).
    /// Patterns are globs with `*`/`?` in the file name only (`rules/*.toml`); each pattern's
    /// files load in name order, patterns in the order given; a file named twice loads once.
    /// A pattern that matches no file is an error.
    pub fn load(patterns: &[String], base: &Path) -> Result<RuleSet, RuleError> {
        let mut b = Builder::default();
        for file in super::glob::expand(patterns, base)? {
            let text = std::fs::read_to_string(&file).map_err(|source| RuleError::Io {
                path: file.clone(),
                source,
            })?;
            b.add_file(&text, &file)?;
        }
        Ok(b.finish())
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
    pub fn rules(&self) -> impl ExactSizeIterator<Item = RuleInfo<'_>> + '_ {
        self.rules.iter().map(|r| RuleInfo {
            name: &r.name,
            file: &self.files[r.file],
            on: r.on,
            action: r.action,
        })
    }

    /// Whether any rule is about `kind`: lets the session skip work (e.g. collecting a CAPA
    /// list item by item) that no rule would look at.
    pub fn has_rules_for(&self, kind: EventKind) -> bool {
        self.rules.iter().any(|r| r.on == kind)
    }

    /// Decide about one event: visit the rules indexed under its kind and verb in load order,
    /// collect the effects of those whose matchers hold, stop at `allow`, `deny` or `drop`.
    pub fn evaluate(&self, ev: &Event<'_>) -> Verdict {
        let mut v = Verdict::default();
        let list = ev.kind as usize * VERB_SLOTS + verb_slot(ev.verb);
        let candidates = &self.index[list];
        if candidates.is_empty() {
            return v;
        }
        let mut pre: [Option<SetMatches>; 3] = [None, None, None];
        for (f, found) in pre.iter_mut().enumerate() {
            if self.regex_counts[list][f] >= SET_THRESHOLD
                && let (Some(set), Some(value)) = (&self.sets[ev.kind as usize][f], field(ev, f))
            {
                *found = Some(set.matches(value));
            }
        }
        let original = match ev.kind {
            EventKind::Command => ev.args,
            EventKind::Greeting | EventKind::Response | EventKind::Capa => ev.text,
            _ => None,
        };
        // A SASL continuation line carries credentials, not arguments.
        let sasl_line = ev.kind == EventKind::Command && ev.args.is_none();
        let capa_end = ev.kind == EventKind::Capa && ev.text.is_none();
        let mut current: Option<Vec<u8>> = None;
        let bits = event_bits(ev);
        let values = [field(ev, USER), field(ev, ARGS), field(ev, TEXT)];
        'rules: for &i in candidates.iter() {
            let i = i as usize;
            let h = &self.hot[i];
            if bits & !h.allow != 0 {
                continue;
            }
            if ev.kind == EventKind::Capa && capa_end != (h.flags & ADDS_ITEMS != 0) {
                continue;
            }
            if sasl_line && (h.regexes & (1 << ARGS) != 0 || h.flags & DENY_OR_REWRITE != 0) {
                continue;
            }
            let mut cold_regexes = 0;
            for f in 0..3 {
                if h.regexes & (1 << f) == 0 {
                    continue;
                }
                match (values[f], &pre[f]) {
                    (None, _) => continue 'rules,
                    (Some(_), Some(found)) if h.set_id[f] != NO_SET => {
                        if !found.matched(h.set_id[f] as usize) {
                            continue 'rules;
                        }
                    }
                    (Some(_), _) => cold_regexes |= 1 << f,
                }
            }
            let r = &self.rules[i];
            if (h.flags & COLD != 0 || cold_regexes != 0) && !r.when.hold_cold(ev, cold_regexes) {
                continue;
            }
            v.matched.push(r.name.clone());
            match &r.effect {
                Effect::Allow => {
                    v.outcome = Outcome::Allow {
                        rule: r.name.clone(),
                    };
                    break;
                }
                Effect::Deny { reply, close_after } => {
                    v.outcome = Outcome::Deny {
                        reply: reply.clone(),
                        rule: r.name.clone(),
                        close_after: *close_after,
                    };
                    break;
                }
                Effect::Drop => {
                    v.outcome = Outcome::Drop {
                        rule: r.name.clone(),
                    };
                    break;
                }
                Effect::Replace {
                    re,
                    with,
                    keep_apop,
                } => {
                    let Some(orig) = original else { continue };
                    let cur = current.as_deref().unwrap_or(orig);
                    let new = match re {
                        Some(re) => match re.replace_all(cur, &with[..]) {
                            Cow::Borrowed(_) => continue,
                            Cow::Owned(new) => new,
                        },
                        None => with.to_vec(),
                    };
                    match checked_rewrite(ev.kind, orig, new, *keep_apop) {
                        Ok(new) => current = Some(new),
                        Err(why) => v.logs.push((
                            Level::WARN,
                            format!("rule `{}`: rewrite ignored: {why}", r.name),
                        )),
                    }
                }
                Effect::RemoveItem => v.remove = true,
                Effect::AddItems(items) => {
                    for item in items.iter() {
                        if !v.add_capa.contains(item) {
                            v.add_capa.push(item.clone());
                        }
                    }
                }
                Effect::Log { level, template } => {
                    v.logs.push((*level, template.render(ev, &r.name)));
                }
                Effect::Tag(tags) => {
                    for t in tags.iter() {
                        if !v.tags.contains(t) {
                            v.tags.push(t.clone());
                        }
                    }
                }
                Effect::Delay(d) => {
                    v.delay = Some(v.delay.unwrap_or_default().saturating_add(*d));
                }
                Effect::Trace => v.trace = true,
            }
        }
        if !v.passes() {
            // Nothing is forwarded: rewrites have nothing to apply to.
            v.remove = false;
            v.add_capa.clear();
        } else if ev.kind == EventKind::Capa && current.as_deref().is_some_and(is_blank) {
            // A CAPA item rewritten to nothing is removed.
            v.remove = true;
        } else if !v.remove {
            v.rewritten = current.filter(|c| Some(c.as_slice()) != original);
        }
        v
    }
}

fn is_blank(b: &[u8]) -> bool {
    b.iter().all(u8::is_ascii_whitespace)
}

/// Make sure a rewrite cannot desynchronise the protocol: no line breaks (they would inject
/// lines), and a status line keeps its status indicator (which decides whether a body
/// follows). A greeting rewrite that lost the APOP timestamp gets it back when `keep_apop`.
fn checked_rewrite(
    kind: EventKind,
    orig: &[u8],
    mut new: Vec<u8>,
    keep_apop: bool,
) -> Result<Vec<u8>, &'static str> {
    if new.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0) {
        return Err("the result contains CR, LF or NUL");
    }
    if matches!(kind, EventKind::Greeting | EventKind::Response) {
        let status = |l: &[u8]| StatusLine::parse(l).ok().map(|s| s.status);
        if status(&new) != status(orig) {
            return Err("the result changes the status indicator (+OK/-ERR/+)");
        }
    }
    if kind == EventKind::Greeting
        && keep_apop
        && let Some(ts) = apop_timestamp(orig)
        && memchr::memmem::find(&new, ts).is_none()
    {
        new.push(b' ');
        new.extend_from_slice(ts);
    }
    Ok(new)
}

/// The RFC 1939 APOP timestamp (`<...@...>`) in a greeting, if any.
fn apop_timestamp(line: &[u8]) -> Option<&[u8]> {
    let mut from = 0;
    while let Some(start) = memchr::memchr(b'<', &line[from..]).map(|i| from + i) {
        let end = start + memchr::memchr(b'>', &line[start..])?;
        let inner = &line[start + 1..end];
        if inner.contains(&b'@') && !inner.iter().any(|b| b.is_ascii_whitespace() || *b == b'<') {
            return Some(&line[start..=end]);
        }
        from = start + 1;
    }
    None
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
                if matches!(r.action, Action::Deny | Action::Rewrite) {
                    flags |= DENY_OR_REWRITE;
                }
                if r.when.listener.is_some() || r.when.client.is_some() {
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
        (Action::Deny, E::Command | E::Connect) => {}
        (Action::Deny, E::Response) => {
            return refuse("; rewrite the line instead (its status indicator must stay)");
        }
        (Action::Deny, E::Greeting) => {
            return refuse("; deny on `connect` refuses a client before the greeting");
        }
        (Action::Deny, E::Login) => {
            return refuse("; the server has already answered: use `drop` to end the session");
        }
        (Action::Deny, E::Capa) => return refuse("; use `rewrite` with `remove = true`"),
        (Action::Rewrite, E::Command | E::Response | E::Greeting | E::Capa) => {}
        (Action::Rewrite, _) => {
            return refuse(
                "; only command arguments, status lines and CAPA items can be rewritten",
            );
        }
        (Action::Deny | Action::Drop | Action::Delay | Action::Trace, E::Close) => {
            return refuse("; the session is already over");
        }
        _ => {}
    }

    // Keys that belong to other actions.
    let keys: [(&'static str, bool, &[Action]); 11] = [
        (
            "message",
            raw.message.is_some(),
            &[Action::Deny, Action::Log],
        ),
        ("code", raw.code.is_some(), &[Action::Deny]),
        ("close_after", raw.close_after.is_some(), &[Action::Deny]),
        ("level", raw.level.is_some(), &[Action::Log]),
        ("tags", raw.tags.is_some(), &[Action::Tag]),
        ("delay", raw.delay.is_some(), &[Action::Delay]),
        ("replace", raw.replace.is_some(), &[Action::Rewrite]),
        ("with", raw.with.is_some(), &[Action::Rewrite]),
        ("remove", raw.remove.is_some(), &[Action::Rewrite]),
        ("add", raw.add.is_some(), &[Action::Rewrite]),
        ("keep_apop", raw.keep_apop.is_some(), &[Action::Rewrite]),
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

fn effect(raw: RawRule, on: EventKind, action: Action) -> Result<Effect, Problem> {
    Ok(match action {
        Action::Allow => Effect::Allow,
        Action::Drop => Effect::Drop,
        Action::Trace => Effect::Trace,
        Action::Deny => {
            let message = raw.message.unwrap_or_else(|| {
                if on == EventKind::Connect {
                    "connection not allowed by policy".into()
                } else {
                    "command not allowed by policy".into()
                }
            });
            printable("message", &message)?;
            let reply = match raw.code {
                Some(code) if valid_code(&code) => format!("-ERR [{code}] {message}"),
                Some(code) => {
                    return Err(invalid(
                        "code",
                        format!(
                            "`{code}` is not a response code: write it without brackets, e.g. \"AUTH\" or \"SYS/PERM\""
                        ),
                    ));
                }
                None => format!("-ERR {message}"),
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
        Action::Log => {
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
        Action::Tag => {
            let tags = non_empty("tags", raw.tags.ok_or(Problem::MissingKey("tags"))?)?;
            for t in &tags {
                if t.is_empty() || t.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    return Err(invalid(
                        "tags",
                        format!("`{t}`: tags are non-empty words without spaces"),
                    ));
                }
            }
            Effect::Tag(tags.into_iter().map(Arc::from).collect())
        }
        Action::Delay => {
            let d = raw.delay.ok_or(Problem::MissingKey("delay"))?;
            if d.is_zero() || d > MAX_DELAY {
                return Err(invalid("delay", "must be more than 0 and at most 10m"));
            }
            Effect::Delay(d)
        }
        Action::Rewrite => rewrite_effect(raw, on)?,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_apop_timestamps() {
        let ts = |l: &[u8]| apop_timestamp(l).map(|t| String::from_utf8_lossy(t).into_owned());
        assert_eq!(ts(b"+OK ready <1.2@h>").as_deref(), Some("<1.2@h>"));
        assert_eq!(
            ts(b"+OK <not one> then <1.2@h> end").as_deref(),
            Some("<1.2@h>")
        );
        assert_eq!(ts(b"+OK<1.2@h>").as_deref(), Some("<1.2@h>"));
        assert_eq!(ts(b"+OK <no-at> here"), None);
        assert_eq!(ts(b"+OK <a@b"), None);
        assert_eq!(ts(b"+OK ready"), None);
    }

    #[test]
    fn rewrites_cannot_break_framing() {
        let ok = |k, o: &[u8], n: &[u8]| checked_rewrite(k, o, n.to_vec(), true);
        assert!(ok(EventKind::Command, b"a", b"b\r\nDELE 1").is_err());
        assert!(ok(EventKind::Capa, b"TOP", b"TOP\0").is_err());
        assert!(ok(EventKind::Response, b"+OK 5 octets", b"-ERR no").is_err());
        assert!(ok(EventKind::Response, b"+OK 5 octets", b"+OKAY").is_err());
        assert!(ok(EventKind::Response, b"+ abc", b"+ def").is_ok());
        assert!(ok(EventKind::Greeting, b"-ERR busy", b"+OK").is_err());
        assert_eq!(
            ok(EventKind::Greeting, b"+OK x <1@h>", b"+OK y").unwrap(),
            b"+OK y <1@h>"
        );
        assert_eq!(ok(EventKind::Command, b"a", b"b").unwrap(), b"b");
    }
}
