//! Evaluating one [`Event`] against a compiled [`RuleSet`]: walk the rules indexed under its
//! kind and verb, check their matchers, and fold their effects into a [`Verdict`]. No I/O.

use std::borrow::Cow;
use std::sync::Arc;

use regex::bytes::SetMatches;
use tracing::Level;

use super::compile::{
    ADDS_ITEMS, ARGS, COLD, DENIES_A_USER, DENY_OR_REWRITE, Effect, Matchers, NO_SET, RuleSet,
    SET_THRESHOLD, TEXT, TLS_OFF, TLS_ON, USER, VERB_SLOTS, state_bit, status_bit, verb_slot,
};
use super::{Event, EventKind, RuleLog, RuleOutcome, Verdict};
use crate::pop3::response::StatusLine;

/// The value a regex field is matched against.
fn field<'a>(ev: &Event<'a>, f: usize) -> Option<&'a [u8]> {
    match f {
        USER => ev.user.map(str::as_bytes),
        ARGS => ev.args,
        _ => ev.text,
    }
}

impl Matchers {
    /// The checks [`Hot`](super::compile::Hot) leaves open: listener, client, destination, size, and the regex fields in `fields`
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
        if let Some(nets) = &self.destination
            && !ev
                .destination
                .is_some_and(|d| nets.iter().any(|n| n.contains(d)))
        {
            return false;
        }
        if let Some(cmp) = self.size
            && !ev.size.is_some_and(|s| cmp.holds(s))
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
}

/// One bit per category (TLS, state, status) describing the event; a rule holds only if its
/// [`Matchers::allowed_bits`] include all of them.
fn event_bits(ev: &Event<'_>) -> u16 {
    (if ev.tls { TLS_ON } else { TLS_OFF })
        | u16::from(state_bit(ev.state)) << 2
        | status_bit(ev.status)
}

impl RuleSet {
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
            // A SASL answer is never rewritten; it is denied only for the user it names (the
            // session cancels the exchange rather than let that user log in).
            let sasl_blocked = h.flags & DENY_OR_REWRITE != 0 && h.flags & DENIES_A_USER == 0;
            if sasl_line && (h.regexes & (1 << ARGS) != 0 || sasl_blocked) {
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
            if matches!(r.effect, Effect::Route(_)) {
                // Chosen apart, once per login: see `RuleSet::route`.
                continue;
            }
            v.matched.push(r.name.clone());
            match &r.effect {
                Effect::Allow => {
                    v.outcome = RuleOutcome::Allow {
                        rule: r.name.clone(),
                    };
                    break;
                }
                Effect::Deny { reply, close_after } => {
                    v.outcome = RuleOutcome::Deny {
                        reply: reply.clone(),
                        rule: r.name.clone(),
                        close_after: *close_after,
                    };
                    break;
                }
                Effect::Drop => {
                    v.outcome = RuleOutcome::Drop {
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
                        Err(why) => v.logs.push(RuleLog {
                            level: Level::WARN,
                            rule: r.name.clone(),
                            message: format!("rule `{}`: rewrite ignored: {why}", r.name),
                        }),
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
                    v.logs.push(RuleLog {
                        level: *level,
                        rule: r.name.clone(),
                        message: template.render(ev, &r.name),
                    });
                }
                Effect::Tag { tags, session } => {
                    let to = if *session {
                        &mut v.session_tags
                    } else {
                        &mut v.tags
                    };
                    for t in tags.iter() {
                        if !to.contains(t) {
                            to.push(t.clone());
                        }
                    }
                }
                Effect::Delay(d) => {
                    v.delay = Some(v.delay.unwrap_or_default().saturating_add(*d));
                }
                Effect::Trace => v.trace = true,
                Effect::Scan(names) => {
                    for n in names.iter() {
                        if !v.scan.contains(n) {
                            v.scan.push(n.clone());
                        }
                    }
                }
                Effect::Route(_) => {}
            }
        }
        if !v.passes() {
            // Nothing is forwarded: rewrites have nothing to apply to, nor scans.
            v.remove = false;
            v.add_capa.clear();
            v.scan.clear();
        } else if ev.kind == EventKind::Capa && current.as_deref().is_some_and(is_blank) {
            // A CAPA item rewritten to nothing is removed.
            v.remove = true;
        } else if !v.remove {
            v.rewritten = current.filter(|c| Some(c.as_slice()) != original);
        }
        v
    }
}

impl RuleSet {
    /// The first `route` rule whose matchers hold for `ev` (a login's command event): its
    /// name and upstream. Other rules are not evaluated.
    pub fn route(&self, ev: &Event<'_>) -> Option<(Arc<str>, Arc<str>)> {
        let list = ev.kind as usize * VERB_SLOTS + verb_slot(ev.verb);
        let bits = event_bits(ev);
        self.index[list].iter().find_map(|&i| {
            let r = &self.rules[i as usize];
            let Effect::Route(upstream) = &r.effect else {
                return None;
            };
            let h = &self.hot[i as usize];
            (bits & !h.allow == 0 && r.when.hold_cold(ev, 0b111))
                .then(|| (r.name.clone(), upstream.clone()))
        })
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
