//! Plain relay through popgate in front of the scriptable demo upstream, driven by real clients.
//! Faults (upstream and client side) are in `tests/it/faults.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use common::clients::{self, RawPop, curl_list, curl_retr, pop_raw, poplib, poplib_spec};
use common::proxy::{Harness, PopgateProcess, big_message, mailbox, tricky_messages};
use popgate_demo::{ServerOptions, apop_digest};
use serde_json::json;

const USER: &str = "alice";
const PASS: &str = "s3cret-relay";

fn opts(messages: Vec<Vec<u8>>) -> ServerOptions {
    ServerOptions {
        apop: true,
        ..ServerOptions::new(vec![mailbox(USER, PASS, messages)])
    }
}

#[test]
fn curl_retrieves_byte_identical_messages() {
    let h = Harness::new();
    let msgs = tricky_messages(3 << 20);
    let up = h.upstream(opts(msgs.clone()));
    let p = h.proxy(up.local_addr(), "");
    assert_eq!(
        curl_list(p.addr, USER, PASS),
        curl_list(up.local_addr(), USER, PASS)
    );
    for (i, m) in msgs.iter().enumerate() {
        let via = curl_retr(p.addr, USER, PASS, i + 1);
        let direct = curl_retr(up.local_addr(), USER, PASS, i + 1);
        assert_eq!(via.len(), direct.len(), "message {}", i + 1);
        assert!(via == direct, "message {} differs", i + 1);
        // curl unstuffs dots and drops the terminator: what it got is the stored message.
        assert!(via == *m, "message {} is not the stored one", i + 1);
    }
}

#[test]
fn poplib_retrieves_byte_identical_messages_with_user_and_apop() {
    let h = Harness::new();
    let msgs = tricky_messages(1 << 20);
    let up = h.upstream(opts(msgs.clone()));
    let p = h.proxy(up.local_addr(), "");
    for login in ["user", "apop"] {
        let mut spec_via = poplib_spec(p.addr, USER, PASS);
        spec_via["login"] = json!(login);
        spec_via["actions"] = json!([
            ["stat"],
            ["uidl"],
            ["retr", 1],
            ["retr", 2],
            ["retr", 3],
            ["top", 1, 1],
            ["quit"]
        ]);
        let mut spec_direct = spec_via.clone();
        spec_direct["port"] = json!(up.local_addr().port());
        let via = poplib(spec_via);
        let direct = poplib(spec_direct);
        assert_eq!(via["results"], direct["results"], "login {login}");
        for (i, m) in msgs.iter().enumerate() {
            let got = clients::b64(&via["results"][2 + i]["data_b64"]);
            assert!(&got == m, "poplib {login}: message {} differs", i + 1);
        }
    }
}

#[test]
#[ignore = "needs fetchmail (run .ci/run)"]
fn fetchmail_through_proxy_matches_direct_and_deletes_only_without_keep() {
    let h = Harness::new();
    let msgs = tricky_messages(1 << 20);
    let up = h.upstream(opts(msgs.clone()));
    let p = h.proxy(up.local_addr(), "");
    let direct = clients::fetchmail(up.local_addr(), USER, PASS, true, &[]);
    let via = clients::fetchmail(p.addr, USER, PASS, true, &[]);
    assert_eq!(via.len(), msgs.len());
    assert!(via == direct, "fetchmail via popgate differs from direct");
    assert_eq!(up.messages(USER).len(), msgs.len(), "--keep must keep");
    let via = clients::fetchmail(p.addr, USER, PASS, false, &[]);
    assert!(via == direct);
    assert!(
        up.messages(USER).is_empty(),
        "without --keep all are deleted"
    );
    assert_eq!(up.quit_count(), 3);
}

/// A whole pipelined dialogue in one write gives the same bytes through popgate as direct.
#[test]
fn pipelined_dialogue_is_transparent() {
    let h = Harness::new();
    let msgs = tricky_messages(200_000);
    let script = [
        "CAPA",
        "USER alice",
        "PASS s3cret-relay",
        "STAT",
        "LIST",
        "LIST 2",
        "UIDL",
        "UIDL 1",
        "RETR 1",
        "TOP 3 5",
        "RETR 9",
        "DELE 1",
        "LIST",
        "RETR 1",
        "RSET",
        "RETR 2",
        "RETR 3",
        "NOOP",
        "QUIT",
    ];
    let up_direct = h.upstream(opts(msgs.clone()));
    let direct = pop_raw(up_direct.local_addr(), &script);
    let up = h.upstream(opts(msgs.clone()));
    let p = h.proxy(up.local_addr(), "");
    let via = pop_raw(p.addr, &script);
    // Greetings differ only in the APOP timestamp; the rest must be identical.
    let cut = |b: &[u8]| b[b.iter().position(|&c| c == b'\n').unwrap() + 1..].to_vec();
    assert!(cut(&via) == cut(&direct), "pipelined responses differ");
    assert!(String::from_utf8_lossy(&via).contains("\r\n+OK popgate-demo signing off"));
    assert_eq!(up.messages(USER).len(), 3, "DELE was reset by RSET");
}

#[test]
fn dele_is_committed_only_by_the_clients_quit() {
    let h = Harness::new();
    let up = h.upstream(opts(tricky_messages(0)));
    let p = h.proxy(up.local_addr(), "");
    // DELE, then the client vanishes: nothing deleted, no QUIT sent upstream.
    let mut c = RawPop::connect(p.addr);
    assert!(c.cmd(&format!("USER {USER}")).starts_with("+OK"));
    assert!(c.cmd(&format!("PASS {PASS}")).starts_with("+OK"));
    assert!(c.cmd("DELE 1").starts_with("+OK"));
    c.abort();
    wait_until(|| !up.is_locked(USER));
    assert_eq!(up.messages(USER).len(), 2);
    assert_eq!(
        up.quit_count(),
        0,
        "popgate sent a QUIT the client did not send"
    );
    // DELE + QUIT: deleted.
    let mut c = RawPop::connect(p.addr);
    c.cmd(&format!("USER {USER}"));
    c.cmd(&format!("PASS {PASS}"));
    assert!(c.cmd("DELE 1").starts_with("+OK"));
    assert!(c.cmd("QUIT").starts_with("+OK"));
    assert!(c.read_to_end().is_empty());
    assert_eq!(up.messages(USER).len(), 1);
    assert_eq!(up.quit_count(), 1);
}

/// Unknown commands and malformed lines are answered locally, in their place in the pipeline,
/// and never reach the upstream.
#[test]
fn local_rejections_keep_pipeline_order() {
    let h = Harness::new();
    let up = h.upstream(opts(tricky_messages(0)));
    let p = h.proxy(up.local_addr(), "");
    let out = pop_raw(
        p.addr,
        &[
            "USER alice",
            "PASS s3cret-relay",
            "RETR 1",
            "XYZZY 1",
            "RETR",
            "STAT",
            "STLS",
            "QUIT",
        ],
    );
    let text = String::from_utf8_lossy(&out);
    let statuses: Vec<&str> = text
        .split("\r\n")
        .filter(|l| l.starts_with("+OK") || l.starts_with("-ERR"))
        .collect();
    assert_eq!(statuses.len(), 9, "{text}");
    assert!(statuses[3].starts_with("+OK"), "RETR 1: {}", statuses[3]);
    assert_eq!(statuses[4], "-ERR unknown command");
    assert!(
        statuses[5].starts_with("-ERR invalid arguments"),
        "{}",
        statuses[5]
    );
    assert!(statuses[6].starts_with("+OK 2 "), "STAT: {}", statuses[6]);
    assert!(statuses[7].starts_with("-ERR STLS"), "{}", statuses[7]);
    assert!(statuses[8].starts_with("+OK"));
    let received = up.received();
    assert!(
        received
            .iter()
            .all(|l| !l.starts_with(b"XYZZY") && !l.starts_with(b"STLS"))
    );
    assert!(!received.iter().any(|l| l == b"RETR\r\n"));
}

#[test]
fn unknown_commands_forwarded_in_single_line_mode() {
    let h = Harness::new();
    let up = h.upstream(opts(tricky_messages(0)));
    let p = h.proxy(
        up.local_addr(),
        "[limits]\nunknown_commands = \"single-line\"\n",
    );
    let out = pop_raw(p.addr, &["XYZZY", "NOOP", "QUIT"]);
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("-ERR unknown command\r\n"), "{text}");
    assert!(up.received().iter().any(|l| l == b"XYZZY\r\n"));
}

/// On tokio's paused clock: the 300 ms idle timeout asserted exactly, in no real time.
#[tokio::test(start_paused = true)]
async fn idle_timeout_closes_without_quit() {
    use common::paused::{self, Pop, Popgate};
    let up = paused::demo(opts(tricky_messages(0))).await;
    let p = Popgate::start(&format!(
        "[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n\
         [upstream]\naddress = \"{}\"\nconnect_timeout = \"2s\"\n\
         [limits]\nidle_timeout = \"300ms\"\n",
        up.local_addr()
    ))
    .await;
    let mut c = Pop::connect(p.addr).await;
    c.cmd(&format!("USER {USER}")).await;
    c.cmd(&format!("PASS {PASS}")).await;
    assert!(c.cmd("DELE 1").await.starts_with("+OK"));
    let t = tokio::time::Instant::now();
    let rest = c.read_to_end().await;
    common::took(t.elapsed(), Duration::from_millis(300));
    assert_eq!(rest, b"-ERR autologout: idle for too long\r\n");
    paused::settle("the maildrop is unlocked", || !up.is_locked(USER)).await;
    assert_eq!(up.quit_count(), 0);
    assert_eq!(up.messages(USER).len(), 2);
}

#[test]
fn shutdown_closes_sessions_without_quit() {
    let h = Harness::new();
    let up = h.upstream(opts(tricky_messages(0)));
    let mut p = h.proxy(up.local_addr(), "");
    let mut c = RawPop::connect(p.addr);
    c.cmd(&format!("USER {USER}"));
    c.cmd(&format!("PASS {PASS}"));
    assert!(c.cmd("DELE 2").starts_with("+OK"));
    p.shutdown(&h);
    assert_eq!(c.read_to_end(), b"-ERR [SYS/TEMP] proxy shutting down\r\n");
    wait_until(|| !up.is_locked(USER));
    assert_eq!(up.quit_count(), 0);
    assert_eq!(up.messages(USER).len(), 2);
}

#[test]
fn sasl_plain_and_login_through_the_proxy() {
    let h = Harness::new();
    let msgs = tricky_messages(0);
    let up = h.upstream(opts(msgs.clone()));
    let p = h.proxy(up.local_addr(), "");
    for mech in ["AUTH=PLAIN", "AUTH=LOGIN", "AUTH=+APOP"] {
        let got = clients::curl_ok(&[
            "-u",
            &format!("{USER}:{PASS}"),
            "--login-options",
            mech,
            &clients::url("pop3", p.addr, "2"),
        ]);
        assert!(got == msgs[1], "{mech}");
    }
    // SASL continuation lines are not parsed as commands: "*" cancels, then USER works.
    let mut c = RawPop::connect(p.addr);
    assert!(c.cmd("AUTH PLAIN").starts_with("+ "));
    assert!(c.cmd("*").starts_with("-ERR"));
    assert!(c.cmd(&format!("USER {USER}")).starts_with("+OK"));
    let ts = c.greeting.split_whitespace().last().unwrap().to_string();
    let _ = apop_digest(&ts, PASS);
}

/// A 50 MB message through the real binary: popgate's peak memory stays far below the size.
#[test]
fn fifty_megabyte_retr_keeps_memory_flat() {
    let h = Harness::new();
    let big = big_message(50 << 20);
    let up = h.upstream(opts(vec![big.clone()]));
    let proc = PopgateProcess::start(up.local_addr(), "");
    let (before, _) = proc.memory_kib();
    let got = curl_retr(proc.addr, USER, PASS, 1);
    assert!(got == big, "50 MB message differs");
    let (peak, _) = proc.memory_kib();
    eprintln!("popgate VmHWM before {before} KiB, after 50 MB RETR {peak} KiB");
    assert!(
        peak < before + 8 * 1024,
        "peak RSS grew by {} KiB",
        peak - before
    );
}

fn wait_until(mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not met in time"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// IPv6 on both hops: a listener on `[::1]` in front of an upstream on `[::1]`, with curl.
#[test]
fn ipv6_listener_and_upstream() {
    let h = Harness::new();
    let msgs = tricky_messages(0);
    let up =
        h.rt.block_on(popgate_demo::DemoServer::start(
            "[::1]:0".parse().unwrap(),
            opts(msgs.clone()),
        ))
        .expect("demo upstream on ::1");
    let p = h.proxy_toml(&format!(
        "[[listener]]\nname = \"v6\"\nbind = \"[::1]:0\"\n[upstream]\naddress = \"{}\"\n",
        up.local_addr()
    ));
    assert!(p.addr.is_ipv6() && up.local_addr().is_ipv6());
    assert_eq!(curl_retr(p.addr, USER, PASS, 2), msgs[1]);
    assert!(up.received().iter().any(|l| l.starts_with(b"RETR 2")));
}
