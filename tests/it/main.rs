//! popgate's integration tests, one binary (ripgrep's layout): one module per behaviour, all
//! sharing `common` (the real `popgate` binary on loopback, Dovecot, real clients, certificates).
//! `cargo test --test it` runs them; `cargo test --test it -- relay::` one module. The Dovecot,
//! HAProxy, fetchmail and root tests are `#[ignore]`d: `-- --include-ignored` (as `.ci/run`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod architecture;
mod audit;
mod audit_hygiene;
mod audit_reader;
mod cli;
mod control;
mod daemon;
mod docs;
mod dovecot;
mod faults;
mod fetchmail_tls;
mod fleet;
mod harness_dovecot;
mod interception;
mod limits;
mod metrics;
mod no_capa;
mod oauth2;
mod packaging;
mod proxy_protocol;
mod redaction;
mod relay;
mod reload;
mod replies;
mod routing;
mod rules;
mod rules_check;
mod scale_out;
mod scanners;
mod scanning;
mod security;
mod session_timers;
mod tls;
mod transparency;
mod user_names;
