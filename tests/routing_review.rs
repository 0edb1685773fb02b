//! Adversarial review of routing mode (issue 13, part 1): attempts to route a login somewhere
//! other than where the README says, upstreams that misbehave during the replayed login, and
//! the SASL and pre-login corner cases of popgate's own front.
//!
//! The scripted upstreams here are the demo server (with its faults) and, for what the demo
//! server cannot do (speak out of turn, greet with `-ERR`, hang up after USER), a one-thread
//! TCP script that plays one connection's lines.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::base64;
use common::clients::RawPop;
use common::proxy::{Harness, ProxyHandle, mailbox};
use popgate_demo::{DemoServer, Faults, ServerOptions, Verb};

const PW: &str = "pw";
const UNAVAILABLE: &str = "-ERR [SYS/TEMP] upstream server unavailable, try again later";

/// A demo server holding `users` (password `pw`, one message naming the server).
fn server(h: &Harness, name: &str, users: &[&str], faults: Faults) -> DemoServer {
    h.upstream(ServerOptions {
        faults,
        ..ServerOptions::new(
            users
                .iter()
                .map(|u| {
                    mailbox(
                        u,
                        PW,
                        vec![format!("Subject: {u} on {name}\r\n\r\nhi\r\n").into_bytes()],
                    )
                })
                .collect(),
        )
    })
}

/// Routing mode: upstreams `old` (address list `old`) and `new` (default), a map file, and
/// `extra` (more tables) appended.
fn routing_proxy(h: &Harness, old: &str, new: &str, map: &str, extra: &str) -> Routed {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.map");
    std::fs::write(&path, map).unwrap();
    let proxy = h.proxy_toml(&format!(
        "[[listener]]\nname = \"test\"\nbind = \"127.0.0.1:0\"\n\
         [[upstream]]\nname = \"old\"\naddress = {old}\nconnect_timeout = \"2s\"\n\
         [[upstream]]\nname = \"new\"\naddress = {new}\nconnect_timeout = \"2s\"\n\
         [routing]\ndefault = \"new\"\nmap = {path:?}\n{extra}"
    ));
    Routed { proxy, _dir: dir }
}

struct Routed {
    proxy: ProxyHandle,
    _dir: tempfile::TempDir,
}

fn quoted(a: SocketAddr) -> String {
    format!("\"{a}\"")
}

/// One scripted upstream connection: sends `first` on connect, then for each line it receives
/// the next of `replies` (`None`: hang up instead). Records the lines it received.
struct Script {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<String>>>,
}

fn script(first: &'static [u8], replies: Vec<Option<&'static [u8]>>) -> Script {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let rec = received.clone();
    std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut w = s.try_clone().unwrap();
        w.write_all(first).unwrap();
        let mut r = BufReader::new(s);
        for reply in replies {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            rec.lock().unwrap().push(line);
            match reply {
                Some(bytes) => w.write_all(bytes).unwrap(),
                None => return,
            }
        }
        // Then wait for the client to leave.
        let mut rest = String::new();
        while r.read_line(&mut rest).unwrap_or(0) > 0 {
            rec.lock().unwrap().push(std::mem::take(&mut rest));
        }
    });
    Script { addr, received }
}

/// USER with white space in its argument: POP3 servers split it differently (the demo server
/// and others take the first word, Dovecot the whole rest of the line), so the name popgate
/// routes on would not be the name the server checks. `USER alice x` would be routed as
/// "alice x" (the default) and log in alice there, past the map's `alice old`.
#[test]
fn a_user_name_with_white_space_is_refused_not_routed_as_another_name() {
    let h = Harness::new();
    let old = server(&h, "old", &["alice"], Faults::default());
    let new = server(&h, "new", &["alice", "carol"], Faults::default());
    let r = routing_proxy(
        &h,
        &quoted(old.local_addr()),
        &quoted(new.local_addr()),
        "alice old\n@legacy.example old\n",
        "",
    );
    for variant in [
        "USER alice x",
        "USER alice ",
        "USER alice\t",
        "USER  alice",
        "USER\t\talice",
        "USER carol x@legacy.example",
    ] {
        let mut c = RawPop::connect(r.proxy.addr);
        let reply = c.cmd(variant);
        assert!(reply.starts_with("-ERR"), "{variant:?}: {reply}");
        assert_eq!(c.cmd("PASS pw"), "-ERR USER first", "{variant:?}");
        // The client may go on with a proper name.
        assert_eq!(c.cmd("USER alice"), "+OK");
        assert!(c.cmd("PASS pw").starts_with("+OK"), "{variant:?}");
        let (_, body) = c.cmd_multi("RETR 1");
        assert!(
            String::from_utf8(body.unwrap())
                .unwrap()
                .contains("alice on old"),
            "{variant:?}"
        );
        c.cmd("QUIT");
    }
    assert_eq!(
        new.connections(),
        0,
        "no variant reached the default server"
    );
    assert!(
        old.received()
            .iter()
            .all(|l| l == b"USER alice\r\n" || !l.starts_with(b"USER")),
        "{:?}",
        old.received()
    );
}
