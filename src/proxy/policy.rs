//! The per-session side of the rule engine: evaluates events, emits rule logs, keeps the tags,
//! the trace flag and the denial counts (`close_after`) of one session.

use std::collections::HashMap;
use std::sync::Arc;

use tracing::Level;

use crate::rules::{Event, RuleOutcome, RuleSet, Verdict};

/// What a terminal rule outcome means for the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Terminal {
    /// No terminal rule, or `allow`.
    Pass,
    /// Answer locally with this line (no CRLF); `close` when `close_after` was reached.
    Deny {
        /// The `-ERR` line.
        reply: String,
        /// The rule.
        rule: Arc<str>,
        /// Close the session after the reply.
        close: bool,
    },
    /// Close both sides now (upstream without QUIT).
    Drop {
        /// The rule.
        rule: Arc<str>,
    },
}

/// Rule activity since the driver last asked ([`Policy::take_tally`]), for metrics: plain data,
/// the driver records it.
#[derive(Debug, Default)]
pub(crate) struct RuleTally {
    /// Names of rules whose matchers held, once per evaluation.
    pub(crate) matched: Vec<Arc<str>>,
    /// Rules that denied an event (`deny`).
    pub(crate) denied: Vec<Arc<str>>,
    /// Rules that dropped the session (`drop`).
    pub(crate) dropped: Vec<Arc<str>>,
}

impl RuleTally {
    /// Nothing happened.
    pub(crate) fn is_empty(&self) -> bool {
        self.matched.is_empty() && self.denied.is_empty() && self.dropped.is_empty()
    }
}

/// Rule state of one session. The rule set is the one in force when the session started.
#[derive(Debug)]
pub struct Policy {
    rules: Arc<RuleSet>,
    /// Labels attached by `tag` rules with `scope = "session"`: on every later audit record.
    pub tags: Vec<Arc<str>>,
    /// Set by a `trace` rule: record a transcript of this session.
    pub trace: bool,
    denials: HashMap<Arc<str>, u32>,
    /// Boxed while there is any (the driver takes it at every step): an idle session carries
    /// a null pointer, not three empty lists.
    tally: Option<Box<RuleTally>>,
}

impl Policy {
    /// A policy over `rules`.
    pub fn new(rules: Arc<RuleSet>) -> Policy {
        Policy {
            rules,
            tags: Vec::new(),
            trace: false,
            denials: HashMap::new(),
            tally: None,
        }
    }

    /// Whether any rule listens for `kind` (lets the session skip work, e.g. CAPA per item).
    pub fn wants(&self, kind: crate::rules::EventKind) -> bool {
        self.rules.has_rules_for(kind)
    }

    /// Evaluate, emit the rules' log lines, remember tags and trace.
    pub fn evaluate(&mut self, ev: &Event<'_>) -> Verdict {
        if !self.rules.has_rules_for(ev.kind) {
            return Verdict::default();
        }
        let v = self.rules.evaluate(ev);
        if !v.matched.is_empty() {
            self.tally_mut().matched.extend(v.matched.iter().cloned());
        }
        for log in &v.logs {
            let (rule, msg) = (&*log.rule, &log.message);
            match log.level {
                Level::ERROR => tracing::error!(target: "popgate::rules", rule, "{msg}"),
                Level::WARN => tracing::warn!(target: "popgate::rules", rule, "{msg}"),
                Level::INFO => tracing::info!(target: "popgate::rules", rule, "{msg}"),
                Level::DEBUG => tracing::debug!(target: "popgate::rules", rule, "{msg}"),
                _ => tracing::trace!(target: "popgate::rules", rule, "{msg}"),
            }
        }
        // `scope = "session"` tags stay; event tags are for the event's own record only.
        for t in &v.session_tags {
            if !self.tags.contains(t) {
                self.tags.push(t.clone());
            }
        }
        self.trace |= v.trace;
        v
    }

    /// Routing mode: the first `route` rule that holds for `ev` (its name and upstream).
    pub(crate) fn route(&self, ev: &Event<'_>) -> Option<(Arc<str>, Arc<str>)> {
        self.rules.route(ev)
    }

    /// Whether a terminal rule would deny or drop `ev`; nothing is logged or counted.
    pub fn would_stop(&self, ev: &Event<'_>) -> bool {
        self.rules.has_rules_for(ev.kind)
            && matches!(
                self.rules.evaluate(ev).outcome,
                RuleOutcome::Deny { .. } | RuleOutcome::Drop { .. }
            )
    }

    /// Rule activity since the last call (matches, denials, drops), leaving an empty tally.
    pub(crate) fn take_tally(&mut self) -> RuleTally {
        self.tally.take().map(|t| *t).unwrap_or_default()
    }

    fn tally_mut(&mut self) -> &mut RuleTally {
        self.tally.get_or_insert_default()
    }

    /// Interpret a verdict's outcome, counting denials for `close_after`.
    pub fn terminal(&mut self, v: &Verdict) -> Terminal {
        match &v.outcome {
            RuleOutcome::Continue | RuleOutcome::Allow { .. } => Terminal::Pass,
            RuleOutcome::Drop { rule } => {
                self.tally_mut().dropped.push(rule.clone());
                Terminal::Drop { rule: rule.clone() }
            }
            RuleOutcome::Deny {
                reply,
                rule,
                close_after,
            } => {
                self.tally_mut().denied.push(rule.clone());
                let n = self.denials.entry(rule.clone()).or_insert(0);
                *n += 1;
                Terminal::Deny {
                    reply: reply.clone(),
                    rule: rule.clone(),
                    close: close_after.is_some_and(|limit| *n >= limit),
                }
            }
        }
    }
}
