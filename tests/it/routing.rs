//! Routing mode: named upstreams, per-user routes (map file, `route` rules, default), popgate's
//! own greeting and CAPA before login, login replay (USER/PASS, AUTH PLAIN, AUTH LOGIN),
//! failover over several addresses, map reloads and `popgate check`.
//!
//! Two demo servers ("old" and "new") hold mailboxes of the same names with different
//! contents, so what a client retrieves shows where it was routed; the demo server also
//! records every line it received and counts its connections.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::net::SocketAddr;

use common::base64;
use common::clients::{RawPop, b64_lines, curl_ok, curl_retr, poplib, poplib_spec, url};
use common::proxy::{
    Harness, PopgateOpts, PopgateProcess, ProxyHandle, mailbox, popgate_bin, rule_file,
};
use popgate_demo::{DemoServer, ServerOptions};
use serde_json::json;

const PW: &str = "pw";

fn msg(server: &str, user: &str) -> Vec<u8> {
    format!(
        "From: {server}@example.org\r\nSubject: {user} on {server}\r\n\r\n\
         .dot line for {user}\r\nbody of {user} on {server}\r\n"
    )
    .into_bytes()
}

/// A demo server named `server` with a mailbox (password `pw`) for each of `users`.
fn server(h: &Harness, name: &str, users: &[&str]) -> DemoServer {
    h.upstream(ServerOptions::new(
        users
            .iter()
            .map(|u| mailbox(u, PW, vec![msg(name, u)]))
            .collect(),
    ))
}

/// The users each server knows.
const OLD_USERS: &[&str] = &[
    "alice",
    "bob@example.org",
    "dave@example.org",
    "dave@EXAMPLE.ORG",
    "mallory",
];
const NEW_USERS: &[&str] = &[
    "alice",
    "bob@example.org",
    "carol",
    "zed",
    "ALICE",
    "dave@example.org",
];

/// A map file in its own temp dir.
struct MapFile {
    dir: tempfile::TempDir,
}

impl MapFile {
    fn new(text: &str) -> MapFile {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("routes.map"), text).unwrap();
        MapFile { dir }
    }
    fn path(&self) -> String {
        self.dir
            .path()
            .join("routes.map")
            .to_str()
            .unwrap()
            .to_owned()
    }
}

const MAP: &str = "# migration\nalice old\n@example.org old\nbob@example.org new\n";

/// `[[upstream]]` old and new, `[routing]` with default new and `routing_extra`. The demo
/// servers compare user names exactly (`ALICE` and `alice` are two mailboxes on new), and
/// say so: `user_names = "exact"` (tests/it/user_names.rs has servers that fold, as Dovecot).
fn upstreams(old: &str, new: &str, routing_extra: &str) -> String {
    format!(
        "[[upstream]]\nname = \"old\"\naddress = {old}\nconnect_timeout = \"2s\"\n\
         user_names = \"exact\"\n\
         [[upstream]]\nname = \"new\"\naddress = {new}\nconnect_timeout = \"2s\"\n\
         user_names = \"exact\"\n\
         [routing]\ndefault = \"new\"\n{routing_extra}"
    )
}

fn quoted(a: SocketAddr) -> String {
    format!("\"{a}\"")
}

struct Setup {
    old: DemoServer,
    new: DemoServer,
    proxy: ProxyHandle,
    _map: MapFile,
    _rules: Option<common::proxy::RuleFile>,
    /// Runs the servers; dropped last.
    _h: Harness,
}

fn setup_with(top: &str, rules: Option<&str>) -> Setup {
    let h = Harness::new();
    let old = server(&h, "old", OLD_USERS);
    let new = server(&h, "new", NEW_USERS);
    let map = MapFile::new(MAP);
    let rules = rules.map(rule_file);
    let rules_key = match &rules {
        Some(r) => format!("rules = [{:?}]\n", r.path),
        None => String::new(),
    };
    let proxy = h.proxy_toml(&format!(
        "{rules_key}{top}[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n{}",
        upstreams(
            &quoted(old.local_addr()),
            &quoted(new.local_addr()),
            &format!("map = {:?}\n", map.path())
        )
    ));
    Setup {
        _h: h,
        old,
        new,
        proxy,
        _map: map,
        _rules: rules,
    }
}

fn setup() -> Setup {
    setup_with("", None)
}

/// Log in as `user` with USER/PASS and retrieve message 1 (raw, dot-stuffed body).
fn retr_as(addr: SocketAddr, user: &str) -> Result<Vec<u8>, String> {
    let mut c = RawPop::connect(addr);
    assert!(c.cmd(&format!("USER {user}")).starts_with("+OK"));
    let r = c.cmd(&format!("PASS {PW}"));
    if !r.starts_with("+OK") {
        return Err(r);
    }
    let (status, body) = c.cmd_multi("RETR 1");
    assert!(status.starts_with("+OK"), "{status}");
    assert!(c.cmd("QUIT").starts_with("+OK"));
    Ok(body.unwrap())
}

fn stuffed(server: &str, user: &str) -> Vec<u8> {
    let m = msg(server, user);
    String::from_utf8(m)
        .unwrap()
        .replace(".dot line", "..dot line")
        .into_bytes()
}

#[test]
fn two_users_through_one_listener_land_on_two_servers_byte_identical() {
    let s = setup();
    // curl: alice is on old (map), carol on new (default); byte-identical to fetching directly.
    for (user, server) in [("alice", &s.old), ("carol", &s.new)] {
        let through = curl_retr(s.proxy.addr, user, PW, 1);
        let direct = curl_retr(server.local_addr(), user, PW, 1);
        assert_eq!(through, direct, "{user}");
    }
    assert_eq!(
        curl_retr(s.proxy.addr, "alice", PW, 1),
        msg("old", "alice"),
        "curl unstuffs"
    );
    assert_eq!(curl_retr(s.proxy.addr, "carol", PW, 1), msg("new", "carol"));
    // python poplib: the same.
    for (user, server) in [("alice", &s.old), ("carol", &s.new)] {
        let run = |addr| {
            let mut spec = poplib_spec(addr, user, PW);
            spec["actions"] = json!([["list"], ["retr", 1]]);
            let r = poplib(spec);
            (r["results"].clone(), b64_lines(&r["results"][1]))
        };
        assert_eq!(run(s.proxy.addr), run(server.local_addr()), "{user}");
    }
    // Nobody else's server was asked to log anyone in.
    let users_on = |srv: &DemoServer| -> Vec<String> {
        srv.received()
            .iter()
            .map(|l| String::from_utf8_lossy(l).trim_end().to_owned())
            .filter(|l| l.starts_with("USER "))
            .collect()
    };
    assert!(users_on(&s.old).iter().all(|u| u == "USER alice"));
    assert!(users_on(&s.new).iter().all(|u| u == "USER carol"));
}

#[test]
fn map_precedence_exact_user_then_domain_then_default() {
    let s = setup();
    let a = s.proxy.addr;
    // Unknown user: the default.
    assert_eq!(retr_as(a, "zed").unwrap(), stuffed("new", "zed"));
    // `@example.org old`.
    assert_eq!(
        retr_as(a, "dave@example.org").unwrap(),
        stuffed("old", "dave@example.org")
    );
    // Domains are case-insensitive (the user part is passed on as sent).
    assert_eq!(
        retr_as(a, "dave@EXAMPLE.ORG").unwrap(),
        stuffed("old", "dave@EXAMPLE.ORG")
    );
    // The exact user line beats the domain line.
    assert_eq!(
        retr_as(a, "bob@example.org").unwrap(),
        stuffed("new", "bob@example.org")
    );
}

#[test]
fn a_route_rule_beats_the_map() {
    let rules = "[[rule]]\nname = \"alice-to-new\"\non = \"command\"\nuser = \"^alice$\"\n\
                 action = \"route\"\nupstream = \"new\"\n";
    let s = setup_with("", Some(rules));
    assert_eq!(
        retr_as(s.proxy.addr, "alice").unwrap(),
        stuffed("new", "alice")
    );
    assert_eq!(s.old.connections(), 0);
    // Others still follow the map.
    assert_eq!(
        retr_as(s.proxy.addr, "dave@example.org").unwrap(),
        stuffed("old", "dave@example.org")
    );
}

#[test]
fn auth_plain_and_auth_login_are_routed_and_replayed_in_two_steps() {
    let s = setup();
    // AUTH PLAIN with an initial response: replayed as `AUTH PLAIN`, then the payload.
    let payload = base64(b"\0alice\0pw");
    let mut c = RawPop::connect(s.proxy.addr);
    let r = c.cmd(&format!("AUTH PLAIN {payload}"));
    assert!(r.starts_with("+OK"), "{r}");
    let (_, body) = c.cmd_multi("RETR 1");
    assert_eq!(body.unwrap(), stuffed("old", "alice"));
    c.cmd("QUIT");
    let got = s.old.received();
    let i = got
        .iter()
        .position(|l| l == b"AUTH PLAIN\r\n")
        .expect("AUTH PLAIN");
    assert_eq!(got[i + 1], format!("{payload}\r\n").into_bytes());
    // AUTH PLAIN without one.
    let mut c = RawPop::connect(s.proxy.addr);
    assert_eq!(c.cmd("AUTH PLAIN"), "+ ");
    assert!(c.cmd(&base64(b"\0carol\0pw")).starts_with("+OK"));
    assert_eq!(c.cmd_multi("RETR 1").1.unwrap(), stuffed("new", "carol"));
    // AUTH LOGIN: two continuations, routed on the user name.
    let mut c = RawPop::connect(s.proxy.addr);
    assert_eq!(c.cmd("AUTH LOGIN"), "+ VXNlcm5hbWU6");
    assert_eq!(c.cmd(&base64(b"dave@example.org")), "+ UGFzc3dvcmQ6");
    assert!(c.cmd(&base64(b"pw")).starts_with("+OK"));
    assert_eq!(
        c.cmd_multi("RETR 1").1.unwrap(),
        stuffed("old", "dave@example.org")
    );
    // curl with each mechanism.
    for mech in ["PLAIN", "LOGIN"] {
        let out = curl_ok(&[
            "-u",
            "alice:pw",
            "--login-options",
            &format!("AUTH={mech}"),
            &url("pop3", s.proxy.addr, "1"),
        ]);
        assert_eq!(out, msg("old", "alice"), "{mech}");
    }
}

#[test]
fn before_login_popgate_greets_and_answers_capa_itself() {
    let s = setup();
    let mut c = RawPop::connect(s.proxy.addr);
    assert_eq!(c.greeting, "+OK popgate ready");
    assert!(!c.greeting.contains('<'), "no APOP timestamp");
    let (status, body) = c.cmd_multi("CAPA");
    assert!(status.starts_with("+OK"));
    let capa = String::from_utf8(body.unwrap()).unwrap();
    let items: Vec<&str> = capa.lines().collect();
    for want in ["USER", "SASL PLAIN LOGIN", "RESP-CODES", "PIPELINING"] {
        assert!(items.contains(&want), "{capa}");
    }
    assert!(
        !items.iter().any(|i| i.starts_with("APOP") || *i == "TOP"),
        "{capa}"
    );
    let r = c.cmd("APOP alice 0123456789abcdef0123456789abcdef");
    assert!(r.starts_with("-ERR") && r.contains("APOP"), "{r}");
    // Nothing was dialled for any of it.
    assert_eq!((s.old.connections(), s.new.connections()), (0, 0));
    // After login CAPA is the server's own.
    c.cmd("USER carol");
    assert!(c.cmd("PASS pw").starts_with("+OK"));
    let (_, body) = c.cmd_multi("CAPA");
    let capa = String::from_utf8(body.unwrap()).unwrap();
    assert!(
        capa.lines().any(|l| l == "TOP") && !capa.lines().any(|l| l == "IMPLEMENTATION popgate"),
        "{capa}"
    );
}

#[test]
fn quit_before_login_dials_nothing() {
    let s = setup();
    let mut c = RawPop::connect(s.proxy.addr);
    assert_eq!(c.cmd("USER alice"), "+OK");
    assert!(c.cmd("QUIT").starts_with("+OK"));
    assert!(c.read_to_end().is_empty(), "closed after QUIT");
    assert_eq!((s.old.connections(), s.new.connections()), (0, 0));
}

#[test]
fn a_failed_login_lets_the_client_retry_as_another_user_elsewhere() {
    let s = setup();
    let mut c = RawPop::connect(s.proxy.addr);
    c.cmd("USER alice");
    let r = c.cmd("PASS wrong");
    assert!(r.starts_with("-ERR"), "{r}");
    assert_eq!(s.old.connections(), 1);
    // Still in AUTHORIZATION with popgate: another user, another server.
    assert_eq!(c.cmd("USER carol"), "+OK");
    assert!(c.cmd("PASS pw").starts_with("+OK"));
    assert!(c.cmd("STAT").starts_with("+OK 1 "));
    assert_eq!(c.cmd_multi("RETR 1").1.unwrap(), stuffed("new", "carol"));
    // The refused upstream got no QUIT; the other one gets the client's.
    assert!(c.cmd("QUIT").starts_with("+OK"));
    assert_eq!(s.old.quit_count(), 0);
    common::wait_until("QUIT reaches new", || s.new.quit_count() == 1);
}

#[test]
fn pipelined_user_pass_stat_in_one_segment() {
    let s = setup();
    let mut c = RawPop::connect(s.proxy.addr);
    c.send_raw(b"USER alice\r\nPASS pw\r\nSTAT\r\nLIST\r\n");
    assert_eq!(c.line(), "+OK");
    assert!(c.line().starts_with("+OK"));
    assert!(c.line().starts_with("+OK 1 "));
    assert!(c.line().starts_with("+OK"));
    assert!(c.body().starts_with(b"1 "));
    // A failed pipelined login: what follows is answered in AUTHORIZATION.
    let mut c = RawPop::connect(s.proxy.addr);
    c.send_raw(b"USER alice\r\nPASS bad\r\nSTAT\r\nUSER carol\r\nPASS pw\r\nSTAT\r\n");
    assert_eq!(c.line(), "+OK");
    assert!(c.line().starts_with("-ERR"));
    assert!(c.line().starts_with("-ERR"), "STAT before login");
    assert_eq!(c.line(), "+OK");
    assert!(c.line().starts_with("+OK"));
    assert!(c.line().starts_with("+OK 1 "));
}

#[test]
fn attacker_variants_of_the_user_name_are_routed_as_sent() {
    let s = setup();
    let a = s.proxy.addr;
    // Case: these servers compare names exactly (`user_names = "exact"`); ALICE is not
    // alice, goes to the default (where it exists).
    assert_eq!(retr_as(a, "ALICE").unwrap(), stuffed("new", "ALICE"));
    // White space in the name (servers split it differently, so the name routed on need not
    // be the name checked): refused, nothing dialled (tests/it/routing/hostile_servers_and_logins.rs has more).
    let before = s.new.connections();
    for variant in ["alice\t", "alice ", "alice x"] {
        let mut c = RawPop::connect(a);
        let r = c.cmd(&format!("USER {variant}"));
        assert!(r.starts_with("-ERR [AUTH]"), "{variant:?}: {r}");
        assert_eq!(c.cmd("PASS pw"), "-ERR USER first");
        c.cmd("QUIT");
    }
    assert_eq!(s.old.connections(), 0, "no variant reached old");
    assert_eq!(s.new.connections(), before, "no variant reached new");
    // USER a, then USER b before PASS: routed on the last.
    let mut c = RawPop::connect(a);
    c.cmd("USER carol");
    c.cmd("USER alice");
    assert!(c.cmd("PASS pw").starts_with("+OK"));
    assert_eq!(c.cmd_multi("RETR 1").1.unwrap(), stuffed("old", "alice"));
    c.cmd("QUIT");
    // AUTH PLAIN: the same case rule.
    let mut c = RawPop::connect(a);
    let r = c.cmd(&format!("AUTH PLAIN {}", base64(b"\0ALICE\0pw")));
    assert!(r.starts_with("+OK"), "{r}");
    assert_eq!(c.cmd_multi("RETR 1").1.unwrap(), stuffed("new", "ALICE"));
}

#[test]
fn auth_plain_routes_on_the_authzid_when_there_is_one() {
    let s = setup();
    // mallory authenticates, asking to act as alice: routed as alice (old), where the server
    // decides (the demo server refuses proxy authorization).
    let mut c = RawPop::connect(s.proxy.addr);
    let r = c.cmd(&format!("AUTH PLAIN {}", base64(b"alice\0mallory\0pw")));
    assert!(r.starts_with("-ERR"), "{r}");
    assert_eq!((s.old.connections(), s.new.connections()), (1, 0));
    // Empty authzid: the authcid routes (carol: default new).
    let r = c.cmd(&format!("AUTH PLAIN {}", base64(b"\0carol\0pw")));
    assert!(r.starts_with("+OK"), "{r}");
    assert_eq!(s.new.connections(), 1);
}

#[test]
fn stls_required_rules_still_refuse_plaintext_logins() {
    let rules = "[[rule]]\nname = \"tls-only\"\non = \"command\"\ntls = false\n\
                 verbs = [\"USER\", \"PASS\", \"AUTH\", \"APOP\"]\naction = \"deny\"\n\
                 code = \"AUTH\"\nmessage = \"TLS first\"\n";
    let s = setup_with("", Some(rules));
    let mut c = RawPop::connect(s.proxy.addr);
    assert_eq!(c.cmd("USER alice"), "-ERR [AUTH] TLS first");
    assert_eq!(c.cmd("PASS pw"), "-ERR [AUTH] TLS first");
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", base64(b"\0alice\0pw"))),
        "-ERR [AUTH] TLS first"
    );
    assert_eq!((s.old.connections(), s.new.connections()), (0, 0));
}

#[test]
fn an_unreachable_upstream_answers_sys_temp_and_the_client_may_retry() {
    let h = Harness::new();
    let new = server(&h, "new", NEW_USERS);
    let dead = format!("\"127.0.0.1:{}\"", common::free_port());
    let proxy = h.proxy_toml(&format!(
        "[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n{}",
        upstreams(&dead, &quoted(new.local_addr()), "")
    ));
    let mut c = RawPop::connect(proxy.addr);
    c.cmd("AUTH PLAIN");
    // Routed by a rule-free, map-free config: everyone goes to the default (new)...
    assert!(c.cmd(&base64(b"\0zed\0pw")).starts_with("+OK"));
    drop(c);
    // ...and a config whose default is unreachable answers the login with SYS/TEMP.
    let proxy2 = h.proxy_toml(&format!(
        "[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n{}",
        upstreams(&quoted(new.local_addr()), &dead, "")
    ));
    let mut c = RawPop::connect(proxy2.addr);
    c.cmd("USER zed");
    assert_eq!(
        c.cmd("PASS pw"),
        "-ERR [SYS/TEMP] upstream server unavailable, try again later"
    );
    assert!(c.cmd("QUIT").starts_with("+OK"));
}

/// popgate (the binary, logging to a file) with `upstream_tables`, and a map file.
fn popgate_with(upstream_tables: &str, map: &str) -> PopgateProcess {
    PopgateProcess::run(
        "127.0.0.1:1".parse().unwrap(),
        PopgateOpts::new()
            .upstreams(upstream_tables)
            .file("routes.map", map)
            .log_to_dir("info")
            .wait_for_log(),
    )
}

#[test]
fn a_dead_first_address_fails_over_and_is_skipped_next_time() {
    let h = Harness::new();
    let old = server(&h, "old", OLD_USERS);
    let new = server(&h, "new", NEW_USERS);
    let dead = format!("127.0.0.1:{}", common::free_port());
    let p = popgate_with(
        &upstreams(
            &format!("[\"{dead}\", \"{}\"]", old.local_addr()),
            &quoted(new.local_addr()),
            "map = \"routes.map\"\n",
        ),
        MAP,
    );
    for _ in 0..3 {
        assert_eq!(retr_as(p.addr, "alice").unwrap(), stuffed("old", "alice"));
    }
    let log = p.wait_log("login routed", 3);
    // Three sessions, one failed attempt on the dead address: it was skipped afterwards.
    assert_eq!(
        log.matches("upstream address failed; trying the next one")
            .count(),
        1,
        "{log}"
    );
    assert!(log.contains(&dead), "{log}");
    assert!(
        log.contains(&format!("address={}", old.local_addr())),
        "{log}"
    );
    assert!(log.contains("why=map user"), "{log}");
    assert_eq!(old.connections(), 3);
}

#[test]
fn direct_mode_fails_over_too() {
    let h = Harness::new();
    let old = server(&h, "old", OLD_USERS);
    let dead = format!("127.0.0.1:{}", common::free_port());
    let proxy = h.proxy_toml(&format!(
        "[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n\
         [upstream]\naddress = [\"{dead}\", \"{}\"]\nconnect_timeout = \"2s\"\n",
        old.local_addr()
    ));
    let c = RawPop::connect(proxy.addr);
    // Direct mode: the server's own greeting is relayed.
    assert!(c.greeting.starts_with("+OK") && c.greeting != "+OK popgate ready");
    assert_eq!(
        retr_as(proxy.addr, "alice").unwrap(),
        stuffed("old", "alice")
    );
}

#[test]
fn sighup_reloads_the_map_and_a_broken_map_is_refused() {
    let h = Harness::new();
    let old = server(&h, "old", OLD_USERS);
    let new = server(&h, "new", NEW_USERS);
    let p = popgate_with(
        &upstreams(
            &quoted(old.local_addr()),
            &quoted(new.local_addr()),
            "map = \"routes.map\"\n",
        ),
        "alice old\n",
    );
    assert_eq!(retr_as(p.addr, "alice").unwrap(), stuffed("old", "alice"));
    // Migrated: alice now lives on new.
    std::fs::write(p.path("routes.map"), "alice new\n").unwrap();
    p.hup();
    let log = p.wait_log("reloaded", 1);
    assert!(log.contains("routing map"), "{log}");
    assert_eq!(retr_as(p.addr, "alice").unwrap(), stuffed("new", "alice"));
    // A broken map: refused, the old one stays.
    std::fs::write(p.path("routes.map"), "alice new\nbob nowhere\n").unwrap();
    p.hup();
    let log = p.wait_log("reload failed", 1);
    assert!(
        log.contains("routes.map:2: no upstream is named \\\"nowhere\\\"")
            || log.contains("routes.map:2: no upstream is named \"nowhere\""),
        "{log}"
    );
    assert_eq!(retr_as(p.addr, "alice").unwrap(), stuffed("new", "alice"));
}

fn check(config: &str, files: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let path = dir.path().join("popgate.toml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(popgate_bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

const LISTENER: &str = "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\n";

#[test]
fn check_reports_map_rule_and_default_mistakes() {
    let base = upstreams(
        "\"127.0.0.1:1\"",
        "\"127.0.0.1:2\"",
        "map = \"routes.map\"\n",
    );
    let cfg = format!("{LISTENER}{base}");
    let (ok, out) = check(&cfg, &[("routes.map", "alice old\n# c\nbob nowhere\n")]);
    assert!(!ok);
    assert!(
        out.contains("routes.map:3: no upstream is named \"nowhere\""),
        "{out}"
    );
    let (ok, out) = check(&cfg, &[("routes.map", "alice old\n@example.org new\n")]);
    assert!(ok, "{out}");
    assert!(out.contains("old=127.0.0.1:1"), "{out}");
    // An unknown default.
    let cfg2 = cfg.replace("default = \"new\"", "default = \"newer\"");
    let (ok, out) = check(&cfg2, &[("routes.map", "")]);
    assert!(
        !ok && out.contains("routing.default") && out.contains("newer"),
        "{out}"
    );
    // More than one upstream without names or default.
    let (ok, out) = check(
        &format!(
            "{LISTENER}[[upstream]]\naddress = \"127.0.0.1:1\"\n[[upstream]]\nname = \"b\"\naddress = \"127.0.0.1:2\"\n"
        ),
        &[],
    );
    assert!(!ok && out.contains("upstream[0].name"), "{out}");
    // A route rule to an unknown upstream, and one without routing mode.
    let rule =
        "[[rule]]\nname = \"r\"\non = \"command\"\naction = \"route\"\nupstream = \"gone\"\n";
    let (ok, out) = check(
        &format!("rules = [\"r.toml\"]\n{cfg}"),
        &[("routes.map", ""), ("r.toml", rule)],
    );
    assert!(
        !ok && out.contains("r.toml: rule \"r\" routes to \"gone\""),
        "{out}"
    );
    let (ok, out) = check(
        &format!("rules = [\"r.toml\"]\n{LISTENER}[upstream]\naddress = \"127.0.0.1:1\"\n"),
        &[("r.toml", &rule.replace("gone", "x"))],
    );
    assert!(!ok && out.contains("routing mode is off"), "{out}");
    // `route` only on command events.
    let (ok, out) = check(
        &format!("rules = [\"r.toml\"]\n{cfg}"),
        &[
            ("routes.map", ""),
            (
                "r.toml",
                &rule.replace("gone", "old").replace("command", "login"),
            ),
        ],
    );
    assert!(!ok && out.contains("route"), "{out}");
}

#[test]
fn check_print_round_trips_named_upstreams() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.map"), "alice old\n").unwrap();
    let cfg = format!(
        "{LISTENER}{}",
        upstreams(
            "[\"127.0.0.1:1\", \"127.0.0.1:3\"]",
            "\"127.0.0.1:2\"",
            "map = \"routes.map\"\ngreeting = \"mail gateway ready\"\n"
        )
    );
    let path = dir.path().join("popgate.toml");
    std::fs::write(&path, &cfg).unwrap();
    let out = std::process::Command::new(popgate_bin())
        .args(["check", "--print", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let again = dir.path().join("again.toml");
    std::fs::write(&again, &printed).unwrap();
    let a = popgate::Config::load(&path).unwrap();
    let b = popgate::Config::load(&again).unwrap();
    assert_eq!(
        popgate::effective_toml(&a).unwrap(),
        popgate::effective_toml(&b).unwrap()
    );
    assert_eq!(b.upstreams.len(), 2);
    assert_eq!(b.upstreams[0].address, ["127.0.0.1:1", "127.0.0.1:3"]);
    assert!(b.routing_mode());
}

#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn a_dovecot_user_and_a_demo_user_through_one_listener_byte_identical() {
    use common::dovecot::{Dovecot, DovecotOpts, alice_msgs, served};
    let dv = Dovecot::start(DovecotOpts::default().user("alice", "alice-secret", alice_msgs()));
    let h = Harness::new();
    let new = server(&h, "new", NEW_USERS);
    let map = MapFile::new("alice old\n");
    let proxy = h.proxy_toml(&format!(
        "[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n{}",
        upstreams(
            &quoted(dv.addr()),
            &quoted(new.local_addr()),
            &format!("map = {:?}\n", map.path())
        )
    ));
    // curl: every message of alice's (Dovecot) and carol's (demo), byte for byte.
    for (i, m) in alice_msgs().iter().enumerate() {
        let via = curl_retr(proxy.addr, "alice", "alice-secret", i + 1);
        let direct = curl_retr(dv.addr(), "alice", "alice-secret", i + 1);
        assert!(via == direct, "RETR {} differs through popgate", i + 1);
        assert!(via == served(m), "RETR {} is not the stored message", i + 1);
    }
    assert_eq!(
        curl_retr(proxy.addr, "carol", PW, 1),
        curl_retr(new.local_addr(), "carol", PW, 1)
    );
    // poplib: LIST, UIDL and every RETR alike.
    for (user, pass, direct) in [
        ("alice", "alice-secret", dv.addr()),
        ("carol", PW, new.local_addr()),
    ] {
        let run = |addr| {
            let mut spec = poplib_spec(addr, user, pass);
            spec["actions"] = json!([["list"], ["uidl"], ["retr", 1]]);
            let r = poplib(spec);
            (r["results"].clone(), b64_lines(&r["results"][2]))
        };
        assert!(run(proxy.addr) == run(direct), "{user}");
    }
    // Dovecot saw alice only, the demo server carol only.
    let log = dv.log();
    assert!(
        log.contains("user=<alice>") && !log.contains("user=<carol>"),
        "{log}"
    );
    assert!(!new.received().iter().any(|l| l.starts_with(b"USER alice")));
}

#[test]
fn deployment_routing_examples_are_valid() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/deployment.md"))
        .unwrap();
    let section = doc
        .split("## Routing several servers")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    let blocks: Vec<&str> = section
        .split("```")
        .skip(1)
        .step_by(2)
        .map(|b| b.split_once('\n').unwrap().1)
        .collect();
    assert_eq!(blocks.len(), 4, "config, map, rule, curl");
    let path = std::path::Path::new("docs/deployment.md");
    let config = popgate::Config::parse(blocks[0], path).expect("parses");
    config.validate(path).expect("valid");
    assert!(config.routing_mode());
    assert_eq!(config.upstreams[0].address.len(), 2);
    let map =
        popgate::routing::RouteMap::parse(blocks[1], path, config.routing_user_names(), |n| {
            config.upstream_index(n).is_some()
        })
        .expect("map parses");
    assert_eq!(map.len(), 3);
    let rules = popgate::rules::RuleSet::parse(blocks[2], path).expect("rule parses");
    assert_eq!(rules.len(), 1);
}

#[test]
fn stls_in_routing_mode_with_the_shipped_require_tls_rules() {
    let h = Harness::new();
    let old = server(&h, "old", OLD_USERS);
    let new = server(&h, "new", NEW_USERS);
    let map = MapFile::new(MAP);
    let pki = common::certs::TestPki::new();
    let (cert, key) = pki.issue(&["localhost", "127.0.0.1"]);
    let proxy = h.proxy_toml(&format!(
        "rules = [{:?}]\n[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\ntls = \"starttls\"\n\
         [tls]\ncert = {cert:?}\nkey = {key:?}\n{}",
        common::shipped_rules("require-tls.toml"),
        upstreams(
            &quoted(old.local_addr()),
            &quoted(new.local_addr()),
            &format!("map = {:?}\n", map.path())
        )
    ));
    // Plaintext: popgate's CAPA offers STLS (and, by the rules, no USER); logins are refused.
    let mut c = RawPop::connect(proxy.addr);
    let capa = String::from_utf8(c.cmd_multi("CAPA").1.unwrap()).unwrap();
    assert!(capa.lines().any(|l| l == "STLS"), "{capa}");
    assert!(!capa.lines().any(|l| l == "USER"), "{capa}");
    assert!(c.cmd("USER alice").starts_with("-ERR [AUTH]"));
    drop(c);
    // curl with STLS: routed and retrieved.
    let ca = pki.ca_path().to_str().unwrap().to_owned();
    let out = curl_ok(&[
        "--ssl-reqd",
        "--cacert",
        &ca,
        "-u",
        "alice:pw",
        &url("pop3", proxy.addr, "1"),
    ]);
    assert_eq!(out, msg("old", "alice"));
    assert_eq!(new.connections(), 0);
}

#[test]
fn the_audit_login_event_names_the_upstream() {
    let audit = tempfile::tempdir().unwrap();
    let s = setup_with(
        &format!("[audit]\nenabled = true\ndir = {:?}\n", audit.path()),
        None,
    );
    retr_as(s.proxy.addr, "alice").unwrap();
    assert!(retr_as(s.proxy.addr, "nobody").is_err());
    let logins = || -> Vec<serde_json::Value> {
        common::audit_events(audit.path())
            .into_iter()
            .filter(|e| e["event"] == "login")
            .collect()
    };
    common::wait_until("two login events", || logins().len() == 2);
    let l = logins();
    assert_eq!(
        (&l[0]["user"], &l[0]["outcome"], &l[0]["upstream"]),
        (&json!("alice"), &json!("success"), &json!("old"))
    );
    assert_eq!(
        (&l[1]["user"], &l[1]["outcome"], &l[1]["upstream"]),
        (&json!("nobody"), &json!("failure"), &json!("new"))
    );
}

#[test]
fn routed_logins_never_log_secrets() {
    let h = Harness::new();
    let old = h.upstream(ServerOptions::new(vec![mailbox(
        "alice",
        "s3cret-pw",
        vec![msg("old", "alice")],
    )]));
    let new = server(&h, "new", NEW_USERS);
    let p = PopgateProcess::run(
        "127.0.0.1:1".parse().unwrap(),
        PopgateOpts::new()
            .upstreams(&upstreams(
                &quoted(old.local_addr()),
                &quoted(new.local_addr()),
                "map = \"routes.map\"\n",
            ))
            .file("routes.map", "alice old\n")
            .log_to_dir("trace")
            .wait_for_log(),
    );
    let plain = base64(b"\0alice\0s3cret-pw");
    let login_pw = base64(b"s3cret-pw");
    let mut c = RawPop::connect(p.addr);
    c.cmd("USER alice");
    assert!(c.cmd("PASS s3cret-pw").starts_with("+OK"));
    c.cmd("QUIT");
    let mut c = RawPop::connect(p.addr);
    assert!(c.cmd(&format!("AUTH PLAIN {plain}")).starts_with("+OK"));
    c.cmd("QUIT");
    let mut c = RawPop::connect(p.addr);
    c.cmd("AUTH LOGIN");
    c.cmd(&base64(b"alice"));
    assert!(c.cmd(&login_pw).starts_with("+OK"));
    c.cmd("QUIT");
    let log = p.wait_log("login routed", 3);
    for secret in ["s3cret-pw", &plain, &login_pw] {
        assert!(!log.contains(secret), "{secret} logged:\n{log}");
    }
}

#[test]
fn each_upstream_has_its_own_tls_settings() {
    let h = Harness::new();
    // old: plaintext; new: implicit TLS (the test CA), then STLS with another CA's name check.
    let old = server(&h, "old", OLD_USERS);
    let pki = common::certs::TestPki::new();
    let (cert, key) = pki.issue(&["localhost", "127.0.0.1"]);
    let new = h.upstream(ServerOptions {
        tls: Some(common::certs::rustls_server(&cert, &key)),
        implicit_tls: true,
        ..ServerOptions::new(vec![mailbox("carol", PW, vec![msg("new", "carol")])])
    });
    let map = MapFile::new(MAP);
    let tables = format!(
        "[[upstream]]\nname = \"old\"\naddress = \"{}\"\n\
         [[upstream]]\nname = \"new\"\naddress = \"{}\"\ntls = \"implicit\"\n\
         ca_file = {:?}\nserver_name = \"localhost\"\nconnect_timeout = \"3s\"\n\
         [routing]\ndefault = \"new\"\nmap = {:?}\n",
        old.local_addr(),
        new.local_addr(),
        pki.ca_path(),
        map.path()
    );
    let proxy = h.proxy_toml(&format!(
        "[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n{tables}"
    ));
    assert_eq!(
        retr_as(proxy.addr, "carol").unwrap(),
        stuffed("new", "carol")
    );
    assert_eq!(
        retr_as(proxy.addr, "alice").unwrap(),
        stuffed("old", "alice")
    );
    // Without the CA, the handshake fails and is not failed over: SYS/TEMP.
    let untrusting = tables.replace(&format!("ca_file = {:?}\n", pki.ca_path()), "");
    let other = common::certs::TestPki::new();
    let untrusting = untrusting.replace(
        "server_name = \"localhost\"\n",
        &format!(
            "server_name = \"localhost\"\nca_file = {:?}\n",
            other.ca_path()
        ),
    );
    let proxy = h.proxy_toml(&format!(
        "[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n{untrusting}"
    ));
    assert_eq!(
        retr_as(proxy.addr, "carol").unwrap_err(),
        "-ERR [SYS/TEMP] upstream server unavailable, try again later"
    );
    assert_eq!(
        retr_as(proxy.addr, "alice").unwrap(),
        stuffed("old", "alice")
    );
}

mod hostile_servers_and_logins;
