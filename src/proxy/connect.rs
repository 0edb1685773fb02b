//! The connect phase's decisions, no I/O: what the `connect` rules say about a new session
//! (wait first, refuse with a line, drop silently, or let it in) and how its upstream is
//! reached (direct mode: which dialogue plan). The driver (`session::open`) carries them out.

use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use crate::pop3::replies;
use crate::rules::Event;

use super::policy::{Policy, Terminal};

/// What the `connect` rules decided for a new session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Admission {
    /// Wait this long before anything else (tarpit rules).
    pub(crate) delay: Option<Duration>,
    /// Refused: the session ends after the delay, with the rule's reply if any.
    pub(crate) refusal: Option<ConnectRefusal>,
    /// The connect event's own tags (for the audit trail's close record of a refusal).
    pub(crate) tags: Vec<Arc<str>>,
}

/// A session the `connect` rules refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnectRefusal {
    /// The refusing rule.
    pub(crate) rule: Arc<str>,
    /// `deny`: the line to write (CRLF included) before closing; `drop`: none.
    pub(crate) reply: Option<Vec<u8>>,
}

/// Evaluate the `connect` event: the rules run (and log, tag, count) once, here.
pub(crate) fn admit(policy: &mut Policy, event: &Event<'_>) -> Admission {
    let verdict = policy.evaluate(event);
    let refusal = match policy.terminal(&verdict) {
        Terminal::Pass => None,
        Terminal::Deny { reply, rule, .. } => {
            info!(%rule, "connection denied by rule");
            Some(ConnectRefusal {
                rule,
                reply: Some(replies::line(&reply)),
            })
        }
        Terminal::Drop { rule } => {
            info!(%rule, "connection dropped by rule");
            Some(ConnectRefusal { rule, reply: None })
        }
    };
    Admission {
        delay: verdict.delay,
        refusal,
        tags: verdict.tags,
    }
}

/// Direct mode: whether the upstream set-up reads the greeting. With one address the session
/// awaits it itself (`limits.greeting_timeout`); with several it is part of the set-up, so
/// that an address that accepts but never greets is failed over.
pub(crate) fn greeting_in_setup(addresses: usize) -> bool {
    addresses > 1
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::rules::{EventKind, RuleSet};

    fn admission(rules: &str, client: &str) -> Admission {
        let set = Arc::new(RuleSet::parse(rules, Path::new("t.toml")).unwrap());
        let mut policy = Policy::new(set);
        let ip = client.parse().unwrap();
        admit(&mut policy, &Event::new(EventKind::Connect, "pop3", ip))
    }

    const RULES: &str = "[[rule]]\nname = \"slow\"\non = \"connect\"\nclient = \"10.0.0.0/8\"\n\
        action = \"delay\"\ndelay = \"2s\"\n\
        [[rule]]\nname = \"mark\"\non = \"connect\"\naction = \"tag\"\ntags = \"seen\"\n\
        [[rule]]\nname = \"no-lab\"\non = \"connect\"\nclient = \"10.1.0.0/16\"\n\
        action = \"deny\"\ncode = \"SYS/PERM\"\n\
        [[rule]]\nname = \"silent\"\non = \"connect\"\nclient = \"192.0.2.0/24\"\n\
        action = \"drop\"\n";

    #[test]
    fn connect_rules_delay_deny_drop_or_pass_without_sockets() {
        let a = admission(RULES, "10.2.3.4");
        assert_eq!(a.delay, Some(Duration::from_secs(2)));
        assert_eq!(a.refusal, None);
        assert_eq!(a.tags, vec![Arc::<str>::from("seen")]);
        let a = admission(RULES, "10.1.2.3");
        assert_eq!(a.delay, Some(Duration::from_secs(2)));
        assert_eq!(
            a.refusal,
            Some(ConnectRefusal {
                rule: "no-lab".into(),
                reply: Some(b"-ERR [SYS/PERM] connection not allowed by policy\r\n".to_vec()),
            })
        );
        let a = admission(RULES, "192.0.2.7");
        assert_eq!(a.delay, None);
        assert_eq!(
            a.refusal,
            Some(ConnectRefusal {
                rule: "silent".into(),
                reply: None
            })
        );
        assert_eq!(admission(RULES, "203.0.113.1").refusal, None);
    }

    #[test]
    fn the_greeting_is_part_of_the_setup_only_with_several_addresses() {
        assert!(!greeting_in_setup(1));
        assert!(greeting_in_setup(2));
    }
}
