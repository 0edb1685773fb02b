//! Cost of `RuleSet::evaluate` for one command with 10, 100 and 1000 rules.
//!
//! The rules are generated: a mix of verb-specific and verb-less rules, with argument, user
//! and client matchers, most of which do not hold for the benchmarked command (as in a real
//! policy, where few rules concern any one command). Run: `cargo bench --bench rules`.

use std::hint::black_box;
use std::net::IpAddr;
use std::path::Path;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use popgate::pop3::command::Verb;
use popgate::pop3::tracker::State;
use popgate::rules::{Event, EventKind, RuleSet};

const VERBS: [&str; 8] = [
    "USER", "PASS", "RETR", "DELE", "TOP", "LIST", "UIDL", "NOOP",
];

/// `n` rules of four kinds, in rotation.
fn rules(n: usize) -> String {
    let mut t = String::new();
    for i in 0..n {
        let verb = VERBS[i % VERBS.len()];
        let body = match i % 4 {
            // Verb-specific, argument regex that almost never holds.
            0 => format!(
                "on = \"command\"\nverbs = [\"{verb}\"]\nargs = '^{i}-[a-z]+$'\naction = \"log\"\nmessage = \"{{command}}\""
            ),
            // Verb-less, user regex.
            1 => format!(
                "on = \"command\"\nuser = '^user{i}@example\\.org$'\naction = \"tag\"\ntags = [\"t{i}\"]"
            ),
            // Verb-specific, cheap matchers only.
            2 => format!(
                "on = \"command\"\nverbs = [\"{verb}\", \"STAT\"]\ntls = false\nstate = \"transaction\"\naction = \"deny\"\nmessage = \"no\""
            ),
            // Verb-less, client network and argument regex.
            _ => format!(
                "on = \"command\"\nclient = [\"10.{}.0.0/16\"]\nargs = '(?i)x{i}y'\naction = \"log\"\nmessage = \"{{user}}\"",
                i % 256
            ),
        };
        t.push_str(&format!("[[rule]]\nname = \"r{i}\"\n{body}\n\n"));
    }
    t
}

fn bench(c: &mut Criterion) {
    let client: IpAddr = "10.1.2.3".parse().unwrap_or(IpAddr::from([10, 1, 2, 3]));
    let ev = Event {
        verb: Some(Verb::Retr),
        args: Some(b"17"),
        user: Some("bob@example.org"),
        tls: true,
        state: State::Transaction,
        ..Event::new(EventKind::Command, "pop3", client)
    };
    let mut group = c.benchmark_group("evaluate_command");
    for n in [10, 100, 1000] {
        let set = match RuleSet::parse(&rules(n), Path::new("bench.toml")) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(set.len(), n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &set, |b, set| {
            b.iter(|| set.evaluate(black_box(&ev)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
