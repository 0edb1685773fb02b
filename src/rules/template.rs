//! `log` message templates: `"{user} fetched {command} from {client}"`, parsed once.

use std::fmt::Write as _;

use super::{Event, EventKind};

/// A field a template can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    User,
    Client,
    Listener,
    Command,
    Verb,
    Args,
    State,
    Status,
    Text,
    Rule,
    Tls,
    Event,
}

const FIELDS: [(&str, Field); 12] = [
    ("user", Field::User),
    ("client", Field::Client),
    ("listener", Field::Listener),
    ("command", Field::Command),
    ("verb", Field::Verb),
    ("args", Field::Args),
    ("state", Field::State),
    ("status", Field::Status),
    ("text", Field::Text),
    ("rule", Field::Rule),
    ("tls", Field::Tls),
    ("event", Field::Event),
];

#[derive(Debug, Clone)]
enum Piece {
    Lit(String),
    Field(Field),
}

/// A compiled template.
#[derive(Debug, Clone)]
pub(crate) struct Template(Vec<Piece>);

impl Template {
    /// Parse `{field}` placeholders; `{{` and `}}` stand for literal braces.
    pub(crate) fn parse(s: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(format!("unclosed `{{{name}`")),
                        }
                    }
                    let field = FIELDS
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|&(_, f)| f)
                        .ok_or_else(|| {
                            let known: Vec<String> =
                                FIELDS.iter().map(|(n, _)| format!("{{{n}}}")).collect();
                            format!(
                                "unknown field `{{{name}}}` (known: {}; `{{{{` for a brace)",
                                known.join(" ")
                            )
                        })?;
                    if !lit.is_empty() {
                        pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                    }
                    pieces.push(Piece::Field(field));
                }
                '}' => return Err("unmatched `}` (write `}}` for a brace)".into()),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            pieces.push(Piece::Lit(lit));
        }
        Ok(Template(pieces))
    }

    /// Fill in the fields from `ev`; absent values render as `-`, control characters are
    /// escaped (no log injection), and secrets (PASS/APOP/AUTH arguments) as `***`.
    pub(crate) fn render(&self, ev: &Event<'_>, rule: &str) -> String {
        let mut out = String::new();
        for piece in &self.0 {
            match piece {
                Piece::Lit(s) => out.push_str(s),
                Piece::Field(f) => render_field(&mut out, *f, ev, rule),
            }
        }
        out
    }
}

fn render_field(out: &mut String, f: Field, ev: &Event<'_>, rule: &str) {
    match f {
        Field::User => push_clean(out, ev.user.map(str::as_bytes)),
        Field::Client => {
            let _ = write!(out, "{}", ev.client.to_canonical());
        }
        Field::Listener => push_clean(out, Some(ev.listener.as_bytes())),
        Field::Command => match ev.verb {
            None => out.push('-'),
            Some(v) => {
                out.push_str(v.as_str());
                if ev.kind == EventKind::Command {
                    match ev.args {
                        Some([]) => {}
                        _ => {
                            out.push(' ');
                            push_args(out, ev);
                        }
                    }
                }
            }
        },
        Field::Verb => out.push_str(ev.verb.map_or("-", |v| v.as_str())),
        Field::Args => push_args(out, ev),
        Field::State => out.push_str(ev.state.as_str()),
        Field::Status => out.push_str(ev.status.map_or("-", |s| s.as_str())),
        Field::Text => push_clean(out, ev.text),
        Field::Rule => out.push_str(rule),
        Field::Tls => out.push_str(if ev.tls { "yes" } else { "no" }),
        Field::Event => out.push_str(ev.kind.as_str()),
    }
}

/// Command arguments, masked for secret-bearing verbs and for SASL continuation lines.
fn push_args(out: &mut String, ev: &Event<'_>) {
    if ev.kind != EventKind::Command {
        out.push('-');
        return;
    }
    match ev.args {
        // A SASL continuation line: base64 credentials.
        None => out.push_str("***"),
        Some(a) if ev.verb.is_some_and(|v| v.has_secret_args()) && !a.is_empty() => {
            out.push_str("***")
        }
        Some(a) => push_clean(out, Some(a)),
    }
}

fn push_clean(out: &mut String, v: Option<&[u8]>) {
    let Some(v) = v else {
        out.push('-');
        return;
    };
    for c in String::from_utf8_lossy(v).chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pop3::command::Verb;
    use crate::pop3::response::Status;
    use crate::pop3::tracker::State;

    fn ev(kind: EventKind) -> Event<'static> {
        Event {
            user: Some("bob"),
            state: State::Transaction,
            tls: true,
            ..Event::new(kind, "pop3s", "::ffff:192.0.2.9".parse().unwrap())
        }
    }

    #[test]
    fn renders_every_field() {
        let t = Template::parse(
            "{user} {client} {listener} {command} {verb} {args} {state} {status} {text} {rule} {tls} {event} {{x}}",
        )
        .unwrap();
        let e = Event {
            verb: Some(Verb::Retr),
            args: Some(b"7"),
            ..ev(EventKind::Command)
        };
        assert_eq!(
            t.render(&e, "r1"),
            "bob 192.0.2.9 pop3s RETR 7 RETR 7 transaction - - r1 yes command {x}"
        );
        let e = Event {
            verb: Some(Verb::Retr),
            status: Some(Status::Ok),
            text: Some(b"+OK 120 octets"),
            ..ev(EventKind::Response)
        };
        assert_eq!(
            t.render(&e, "r1"),
            "bob 192.0.2.9 pop3s RETR RETR - transaction +OK +OK 120 octets r1 yes response {x}"
        );
    }

    #[test]
    fn masks_secrets_and_escapes_controls() {
        let t = Template::parse("{command}|{args}|{user}").unwrap();
        for verb in [Verb::Pass, Verb::Apop, Verb::Auth] {
            let e = Event {
                verb: Some(verb),
                args: Some(b"hunter2"),
                ..ev(EventKind::Command)
            };
            let s = t.render(&e, "r");
            assert!(!s.contains("hunter2"), "{s}");
            assert_eq!(s, format!("{} ***|***|bob", verb.as_str()));
        }
        let sasl = Event {
            verb: Some(Verb::Auth),
            args: None,
            ..ev(EventKind::Command)
        };
        assert_eq!(t.render(&sasl, "r"), "AUTH ***|***|bob");
        let quit = Event {
            verb: Some(Verb::Quit),
            args: Some(b""),
            user: Some("evil\r\nFAKE LOG"),
            ..ev(EventKind::Command)
        };
        assert_eq!(t.render(&quit, "r"), "QUIT||evil\\r\\nFAKE LOG");
    }

    #[test]
    fn parse_errors() {
        assert!(
            Template::parse("{nope}")
                .unwrap_err()
                .contains("unknown field `{nope}`")
        );
        assert!(Template::parse("{user").unwrap_err().contains("unclosed"));
        assert!(Template::parse("a } b").unwrap_err().contains("unmatched"));
        assert!(Template::parse("plain").is_ok());
    }
}
