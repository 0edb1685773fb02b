//! Content scanning end to end (issue 23): the real popgate binary in front of a real Dovecot,
//! with a real clamd (one custom signature) and a real rspamd (test rules), retrieved by real
//! clients (curl, poplib, fetchmail, mpop) and by a raw socket client.
//!
//! - clean mail arrives byte-identical to direct (an `X-Popgate-Scan:` line added with
//!   `header = true`, nothing else); infected mail is replaced by a notice and stays on the
//!   server; spam is tagged; the audit trail has one `scan` event per scanner with the UIDL;
//! - a 30 MB message over `max_size` passes unscanned and tagged, popgate's memory flat;
//! - a 5 MB message under `spool_memory = "1MB"` is held in an unlinked 0600 file in
//!   `spool_dir` (seen through /proc while a slow scanner holds it), gone afterwards;
//! - clamd killed mid-scan: `on_error = "tempfail"` answers `-ERR [SYS/TEMP]` (and protects the
//!   DELE), a retry after clamd is back succeeds; `"pass"` delivers unscanned and tagged;
//! - a pipelined `RETR 1` `RETR 2` `DELE 1` `QUIT` is answered in order;
//! - what the clients make of a message whose size differs from LIST (docs/scanning.md,
//!   "Clients").
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::clients::{
    MdaRun, RawPop, b64, curl_retr, fetchmail_run, mpop_run, pop_raw, poplib, poplib_spec,
};
use common::dovecot::{Dovecot, DovecotOpts, lf_only, served};
use common::proxy::{PopgateOpts, PopgateProcess, push_varied_lines};
use common::scanners::{Clamd, Rspamd, VIRUS_NAME};
use serde_json::{Value, json};

const USER: &str = "alice";
const PASS: &str = "scan-pass-23";

// ---------------------------------------------------------------------------------------------
// Mail (LF line ends, as stored in a maildir)

/// A well-formed message with dot lines in its body; `extra` is put in the body.
fn message(n: usize, subject: &str, extra: &str) -> Vec<u8> {
    format!(
        "From: Sender {n} <s{n}@example.org>\n\
         To: Alice <alice@example.com>\n\
         Subject: {subject}\n\
         Date: Mon, 7 Dec 2026 10:0{n}:00 +0000\n\
         Message-ID: <{n}.scan@example.org>\n\
         MIME-Version: 1.0\n\
         Content-Type: text/plain; charset=us-ascii\n\
         \n\
         Hello Alice,\n\
         .a line that starts with a dot\n\
         ..and one with two\n\
         {extra}\n\
         Regards,\n\
         Sender {n}\n"
    )
    .into_bytes()
}

fn clean(n: usize) -> Vec<u8> {
    message(
        n,
        &format!("Minutes of meeting {n}"),
        "The minutes are below.",
    )
}

fn infected(n: usize) -> Vec<u8> {
    message(
        n,
        &format!("Invoice {n}"),
        &format!("attachment: {}", common::scanners::VIRUS_MARK),
    )
}

fn spam(n: usize) -> Vec<u8> {
    message(n, &format!("Cheap offer {n}"), common::scanners::SPAM_MARK)
}

/// A message of about `size` octets (lines of varying length, many starting with a dot).
fn sized(n: usize, size: usize) -> Vec<u8> {
    let mut m = message(n, &format!("Large {n}"), "Large body follows.");
    push_varied_lines(&mut m, size, b"\n");
    m
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// `[[scanner]]` for a clamd at `address`.
fn clamd_table(address: &str, extra: &str) -> String {
    format!(
        "[[scanner]]\nname = \"clamav\"\nkind = \"clamd\"\naddress = \"{address}\"\n\
         timeout = \"10s\"\n{extra}\n"
    )
}

/// `[[scanner]]` for an rspamd at `url`.
fn rspamd_table(url: &str) -> String {
    format!(
        "[[scanner]]\nname = \"rspamd\"\nkind = \"rspamd\"\naddress = \"{url}\"\ntimeout = \"20s\"\n"
    )
}

/// The UIDLs Dovecot gives `USER`'s messages, asked directly.
fn uidls(dv: &Dovecot) -> Vec<String> {
    let mut spec = poplib_spec(dv.pop3, USER, PASS);
    spec["actions"] = json!([["uidl"]]);
    let r = poplib(spec);
    common::clients::b64_lines(&r["results"][0])
        .iter()
        .map(|l| {
            let l = String::from_utf8_lossy(l).into_owned();
            l.split(' ').nth(1).expect("uidl line").to_owned()
        })
        .collect()
}

/// Message `n` as poplib gets it (CRLF lines, dot-unstuffed), from `addr`.
fn poplib_retr(addr: SocketAddr, n: usize) -> Vec<u8> {
    let mut spec = poplib_spec(addr, USER, PASS);
    spec["actions"] = json!([["retr", n]]);
    let r = poplib(spec);
    assert_eq!(r["results"][0]["ok"], true, "poplib RETR {n}: {r}");
    b64(&r["results"][0]["data_b64"])
}

/// `cmd` (LIST or UIDL) at `addr` after a login: the listing, raw.
fn listing(addr: SocketAddr, cmd: &str) -> Vec<u8> {
    let mut c = login(addr);
    let (status, body) = c.cmd_multi(cmd);
    assert!(status.starts_with("+OK"), "{cmd}: {status}");
    c.cmd("QUIT");
    body.unwrap()
}

/// Replies received in one piece, read line by line.
struct Replies<'a>(&'a [u8]);

impl Replies<'_> {
    /// The next line without its CRLF (empty at the end).
    fn line(&mut self) -> String {
        let raw = self.line_raw();
        String::from_utf8_lossy(&raw)
            .trim_end_matches(['\r', '\n'])
            .to_owned()
    }

    fn line_raw(&mut self) -> Vec<u8> {
        let end = self
            .0
            .iter()
            .position(|&b| b == b'\n')
            .map_or(self.0.len(), |i| i + 1);
        let (line, rest) = self.0.split_at(end);
        self.0 = rest;
        line.to_vec()
    }

    /// A multi-line body up to and excluding the `.` line, raw (still dot-stuffed).
    fn body(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line = self.line_raw();
            assert!(
                !line.is_empty(),
                "the replies end inside a multi-line answer"
            );
            if line == b".\r\n" {
                return body;
            }
            body.extend_from_slice(&line);
        }
    }
}

/// The `scan` events of the audit trail, once `n` of them are written (bounded wait).
fn scan_events(p: &PopgateProcess, n: usize) -> Vec<Value> {
    let dir = p.path("audit");
    let mut evs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        evs = common::audit_events(&dir)
            .into_iter()
            .filter(|e| e["event"] == "scan")
            .collect();
        if evs.len() >= n {
            return evs;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{} scan events, not {n}: {evs:?}", evs.len());
}

/// `got` is `original` with header lines put before it: those lines (without line ends).
fn added_lines(got: &[u8], original: &[u8]) -> Vec<String> {
    assert!(
        got.len() > original.len() && got.ends_with(original),
        "not the original with lines added before it: got {} octets:\n{}",
        got.len(),
        String::from_utf8_lossy(&got[..got.len().min(600)])
    );
    let prefix = String::from_utf8_lossy(&got[..got.len() - original.len()]).into_owned();
    prefix
        .lines()
        .map(|l| l.trim_end_matches('\r').to_owned())
        .collect()
}

/// The header block of `msg` (up to the first empty line), unfolded lines without line ends.
fn header_lines(msg: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(msg).replace("\r\n", "\n");
    let head = text.split("\n\n").next().unwrap_or_default();
    let mut out: Vec<String> = Vec::new();
    for l in head.lines() {
        if l.starts_with([' ', '\t'])
            && let Some(last) = out.last_mut()
        {
            last.push_str(l);
            continue;
        }
        out.push(l.to_owned());
    }
    out
}

/// The value of header `name` in `msg`.
fn header(msg: &[u8], name: &str) -> Option<String> {
    header_lines(msg).into_iter().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

/// Checks that `notice` (as a client got it, CRLF or LF) is the notice for `original`
/// (LF form), found infected by `signature`, naming `uidl` if given.
fn assert_notice(notice: &[u8], original: &[u8], signature: &str, uidl: Option<&str>) {
    let text = String::from_utf8_lossy(notice).into_owned();
    assert!(text.is_ascii(), "the notice is not ASCII:\n{text}");
    assert_eq!(
        header(notice, "From").as_deref(),
        Some("MAILER-DAEMON"),
        "{text}"
    );
    let subject = header(notice, "Subject").expect("notice has a Subject");
    let orig_subject = header(original, "Subject").unwrap();
    assert!(
        subject.contains(&orig_subject),
        "notice Subject {subject:?} lacks {orig_subject:?}"
    );
    assert!(header(notice, "Date").is_some(), "{text}");
    let mid = header(notice, "Message-ID").expect("notice has a Message-ID");
    assert_ne!(
        Some(&mid),
        header(original, "Message-ID").as_ref(),
        "a new Message-ID"
    );
    assert!(
        header(notice, "Content-Type")
            .unwrap()
            .starts_with("text/plain"),
        "{text}"
    );
    let facts = [
        signature.to_owned(),
        header(original, "From").unwrap(),
        header(original, "Message-ID").unwrap(),
    ];
    for fact in facts.iter().chain(uidl.map(str::to_owned).as_ref()) {
        assert!(
            text.contains(fact.as_str()),
            "the notice does not say {fact:?}:\n{text}"
        );
    }
    assert!(
        !text.contains(common::scanners::VIRUS_MARK),
        "the notice carries the infected content"
    );
}

// ---------------------------------------------------------------------------------------------
// A slow clamd stand-in: takes INSTREAM like clamd, waits, answers `stream: OK`

/// A TCP "clamd" that records what it was sent (un-stuffed message bytes) and answers each
/// scan `stream: OK` after `delay`.
struct SlowClamd {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl SlowClamd {
    fn start(delay: Duration) -> SlowClamd {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let seen = got.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { return };
                let seen = seen.clone();
                std::thread::spawn(move || {
                    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let mut cmd = [0u8; 10];
                    if c.read_exact(&mut cmd).is_err() || &cmd != b"zINSTREAM\0" {
                        return;
                    }
                    let mut body = Vec::new();
                    loop {
                        let mut len = [0u8; 4];
                        if c.read_exact(&mut len).is_err() {
                            return;
                        }
                        let len = u32::from_be_bytes(len) as usize;
                        if len == 0 {
                            break;
                        }
                        let start = body.len();
                        body.resize(start + len, 0);
                        if c.read_exact(&mut body[start..]).is_err() {
                            return;
                        }
                    }
                    seen.lock().unwrap().push(body);
                    std::thread::sleep(delay);
                    let _ = c.write_all(b"stream: OK\0");
                });
            }
        });
        SlowClamd { addr, got }
    }
}

/// The files popgate has open whose path is in `dir` and that are deleted: `(fd, mode)`.
fn deleted_files_in(pid: u32, dir: &Path) -> Vec<(String, u32)> {
    let fds = PathBuf::from(format!("/proc/{pid}/fd"));
    let Ok(rd) = std::fs::read_dir(&fds) else {
        return Vec::new();
    };
    let prefix = dir.to_string_lossy().into_owned();
    rd.filter_map(Result::ok)
        .filter_map(|e| {
            let target = std::fs::read_link(e.path()).ok()?;
            let target = target.to_string_lossy().into_owned();
            if !(target.starts_with(&prefix) && target.ends_with(" (deleted)")) {
                return None;
            }
            // `stat -L`: the mode of the open (unlinked) file itself.
            let mode = std::fs::metadata(e.path()).ok()?.permissions().mode();
            Some((e.file_name().to_string_lossy().into_owned(), mode & 0o7777))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The set-up of every scenario: Dovecot, the scanners, popgate

/// One scenario's set-up: Dovecot with `mail` for `USER`; a real clamd (with these extra
/// `[[scanner]]` keys), a slow stand-in clamd (answering after this delay) and/or a real
/// rspamd; popgate with the `[scan]` keys `scan` and one rule that has every RETR and TOP
/// scanned by all of them, auditing to `audit/`.
#[derive(Default)]
struct Setup {
    mail: Vec<Vec<u8>>,
    clamd: Option<&'static str>,
    slow_clamd: Option<Duration>,
    rspamd: bool,
    scan: String,
}

/// A started [`Setup`]. popgate stops first, then the scanners, then Dovecot.
struct Running {
    p: PopgateProcess,
    clamd: Option<Clamd>,
    slow: Option<SlowClamd>,
    /// Kept running until the scenario ends.
    _rspamd: Option<Rspamd>,
    dv: Dovecot,
}

impl Setup {
    fn start(self) -> Running {
        let dv = Dovecot::start(DovecotOpts::default().user(USER, PASS, self.mail));
        let clamd = self.clamd.map(|extra| (Clamd::start(), extra));
        let slow = self.slow_clamd.map(SlowClamd::start);
        let rspamd = self.rspamd.then(Rspamd::start);
        let mut tables = String::new();
        let mut names = Vec::new();
        if let Some((c, extra)) = &clamd {
            tables += &clamd_table(&c.unix_address(), extra);
            names.push("clamav");
        }
        if let Some(s) = &slow {
            tables += &clamd_table(&s.addr.to_string(), "");
            names.push("clamav");
        }
        if let Some(r) = &rspamd {
            tables += &rspamd_table(&r.url());
            names.push("rspamd");
        }
        let rule = format!(
            "[[rule]]\nname = \"scan-all\"\non = \"command\"\nverbs = [\"RETR\", \"TOP\"]\n\
             action = \"scan\"\nscan = {names:?}\n"
        );
        let p = PopgateProcess::run(
            dv.pop3,
            PopgateOpts::new()
                .top("rules = [\"scan.toml\"]\n")
                .file("scan.toml", rule)
                .tables(&format!(
                    "{tables}[scan]\n{}\n[audit]\nenabled = true\ndir = \"audit\"\n",
                    self.scan
                )),
        );
        Running {
            p,
            clamd: clamd.map(|(c, _)| c),
            slow,
            _rspamd: rspamd,
            dv,
        }
    }
}

/// A raw client at `addr`, logged in.
fn login(addr: SocketAddr) -> RawPop {
    let mut c = RawPop::connect(addr);
    assert!(c.cmd(&format!("USER {USER}")).starts_with("+OK"));
    assert!(c.cmd(&format!("PASS {PASS}")).starts_with("+OK"));
    c
}

/// `body` (a RETR's, as on the wire) is message `original` with header lines put before it:
/// those lines.
fn added_on_the_wire(body: &[u8], original: &[u8]) -> Vec<String> {
    added_lines(body, &common::dovecot::dot_stuffed(&served(original)))
}

// ---------------------------------------------------------------------------------------------
// 1. Clean, infected, spam with curl, poplib, fetchmail and mpop: one row each

/// What every client gets for a message.
enum Gets {
    /// The server's message, byte-identical.
    Original,
    /// The server's message with one header line per prefix put before it, in this order;
    /// the same lines for every client.
    Tagged(&'static [&'static str]),
    /// The notice for it (see [`assert_notice`]), naming the UIDL (but for mpop).
    Notice,
}

/// A message of a row: what clients get for it, and what each scanner's `scan` event says.
struct Mail {
    body: Vec<u8>,
    gets: Gets,
    verdict: &'static str,
    action: &'static str,
}

/// One row: `mail` on Dovecot, scanned by a real clamd (`clamd`) and/or rspamd, popgate with
/// `[scan]` keys `scan`; fetchmail runs with `fetchmail_args` too.
struct EveryClient {
    mail: Vec<Mail>,
    clamd: bool,
    rspamd: bool,
    scan: &'static str,
    fetchmail_args: &'static [&'static str],
}

impl EveryClient {
    /// LIST and UIDL are the server's; curl, poplib, fetchmail and mpop (both keeping) each
    /// retrieve every message and get what its row says; everything stays on the server
    /// unchanged; the audit trail has one `scan` event per scanner and retrieval, with the
    /// row's verdict and action, the user, the UIDL, the Message-ID and the duration. Returns
    /// fetchmail's run.
    fn run(self) -> MdaRun {
        let running = Setup {
            mail: self.mail.iter().map(|m| m.body.clone()).collect(),
            clamd: self.clamd.then_some(""),
            rspamd: self.rspamd,
            scan: self.scan.to_owned(),
            ..Setup::default()
        }
        .start();
        let (dv, p) = (&running.dv, &running.p);
        let uidls = uidls(dv);
        for cmd in ["LIST", "UIDL"] {
            assert_eq!(listing(p.addr, cmd), listing(dv.pop3, cmd), "{cmd}");
        }
        // The lines each tagged message got from curl, which every other client must get.
        let mut tags: Vec<Option<Vec<String>>> = vec![None; self.mail.len()];
        let mut check = |client: &str, i: usize, got: &[u8], lf: bool, uidl: Option<&str>| {
            let m = &self.mail[i];
            let original = if lf {
                lf_only(&m.body)
            } else {
                served(&m.body)
            };
            match m.gets {
                Gets::Original => {
                    assert!(got == original, "{client}: message {} changed", i + 1)
                }
                Gets::Tagged(prefixes) => {
                    let added = added_lines(got, &original);
                    assert_eq!(added.len(), prefixes.len(), "{client}: {added:?}");
                    for (line, prefix) in added.iter().zip(prefixes) {
                        assert!(line.starts_with(prefix), "{client}: {added:?}");
                    }
                    let first = tags[i].get_or_insert_with(|| added.clone());
                    assert_eq!(&added, first, "{client}: not the lines curl got");
                }
                Gets::Notice => assert_notice(got, &m.body, VIRUS_NAME, uidl),
            }
        };
        for (i, _) in self.mail.iter().enumerate() {
            let uidl = Some(uidls[i].as_str());
            check(
                "curl",
                i,
                &curl_retr(p.addr, USER, PASS, i + 1),
                false,
                uidl,
            );
            check("poplib", i, &poplib_retr(p.addr, i + 1), false, uidl);
        }
        let fetchmail = fetchmail_run(p.addr, USER, PASS, true, self.fetchmail_args);
        assert_eq!(fetchmail.status, 0, "{fetchmail:?}");
        assert_eq!(fetchmail.messages.len(), self.mail.len(), "{fetchmail:?}");
        for (i, got) in fetchmail.messages.iter().enumerate() {
            check("fetchmail", i, got, true, Some(&uidls[i]));
        }
        // mpop lists every UIDL (multi-line) before it retrieves: the hop learns ids from
        // `UIDL n` answers only (its own lookups, or the client's), so its notice names no UIDL.
        let mpop = mpop_run(p.addr, USER, PASS, true, &[]);
        assert_eq!(mpop.status, 0, "{mpop:?}");
        assert_eq!(mpop.messages.len(), self.mail.len(), "{mpop:?}");
        for (i, got) in mpop.messages.iter().enumerate() {
            check("mpop", i, got, true, None);
        }

        // The originals are still on the server, unchanged (asked directly).
        assert_eq!(dv.message_count(USER), self.mail.len());
        for (i, m) in self.mail.iter().enumerate() {
            assert!(curl_retr(dv.pop3, USER, PASS, i + 1) == served(&m.body));
        }

        let scanners: Vec<&str> = [(self.clamd, "clamav"), (self.rspamd, "rspamd")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
        let per_scanner = 4 * self.mail.len();
        let evs = scan_events(p, per_scanner * scanners.len());
        assert_eq!(evs.len(), per_scanner * scanners.len(), "{evs:?}");
        for e in &evs {
            let n = e["msg"].as_u64().unwrap() as usize;
            let m = &self.mail[n - 1];
            assert_eq!(e["verdict"], m.verdict, "{e}");
            assert_eq!(e["action"], m.action, "{e}");
            assert_eq!(e["user"], USER, "{e}");
            assert_eq!(e["uidl"], uidls[n - 1], "{e}");
            assert_eq!(e["message_id"], format!("<{n}.scan@example.org>"), "{e}");
            assert!(e["duration_ms"].is_u64(), "{e}");
            match m.verdict {
                "infected" => {
                    assert_eq!(e["scanner"], "clamav", "{e}");
                    assert!(e["name"].as_str().unwrap().contains(VIRUS_NAME), "{e}");
                }
                "spam" => {
                    assert_eq!(e["scanner"], "rspamd", "{e}");
                    assert!(e["score"].is_number(), "{e}");
                }
                _ => {}
            }
        }
        for s in scanners {
            let n = evs.iter().filter(|e| e["scanner"] == s).count();
            assert_eq!(n, per_scanner, "{s}");
        }
        fetchmail
    }
}

fn original(body: Vec<u8>) -> Mail {
    Mail {
        body,
        gets: Gets::Original,
        verdict: "clean",
        action: "delivered",
    }
}

/// Clean mail through popgate with clamd and rspamd scanning: every client gets exactly what it
/// gets directly from Dovecot; the audit trail has a clean verdict from each scanner, with the
/// message's UIDL and Message-ID.
#[test]
#[ignore = "needs dovecot, clamd, rspamd, curl, fetchmail, mpop (run .ci/run)"]
fn clean_mail_reaches_every_client_byte_identical() {
    EveryClient {
        mail: vec![original(clean(1)), original(clean(2))],
        clamd: true,
        rspamd: true,
        scan: "",
        fetchmail_args: &[],
    }
    .run();
}

/// With `header = true` a clean message gets one `X-Popgate-Scan:` line before its first
/// header, and is otherwise the server's.
#[test]
#[ignore = "needs dovecot, clamd, curl, fetchmail, mpop (run .ci/run)"]
fn clean_mail_with_header_gets_one_line_added() {
    EveryClient {
        mail: vec![Mail {
            gets: Gets::Tagged(&["X-Popgate-Scan: clean"]),
            ..original(clean(1))
        }],
        clamd: true,
        rspamd: false,
        scan: "header = true\n",
        fetchmail_args: &[],
    }
    .run();
}

/// An infected message is replaced by the notice for every client (the clean ones around it
/// untouched), UIDL and LIST stay the server's, the original stays on the server unchanged,
/// and the audit trail says `infected`/`replaced` with the signature name and the UIDL.
#[test]
#[ignore = "needs dovecot, clamd, curl, fetchmail, mpop (run .ci/run)"]
fn infected_mail_is_replaced_by_a_notice_and_stays_on_the_server() {
    EveryClient {
        mail: vec![
            original(clean(1)),
            Mail {
                body: infected(2),
                gets: Gets::Notice,
                verdict: "infected",
                action: "replaced",
            },
            original(clean(3)),
        ],
        clamd: true,
        rspamd: false,
        scan: "on_virus = \"replace\"\n",
        fetchmail_args: &[],
    }
    .run();
}

/// Spam (judged by rspamd: its test rule's mark) is tagged with `X-Spam-Status:` and
/// `X-Spam-Score:` before its first header, the rest byte-identical; fetchmail notices the size
/// differs from LIST (with `-v -v`) and delivers it anyway.
#[test]
#[ignore = "needs dovecot, rspamd, curl, fetchmail, mpop (run .ci/run)"]
fn spam_is_tagged_for_every_client() {
    let fetchmail = EveryClient {
        mail: vec![Mail {
            body: spam(1),
            gets: Gets::Tagged(&["X-Spam-Status: Yes, score=", "X-Spam-Score: "]),
            verdict: "spam",
            action: "tagged",
        }],
        clamd: false,
        rspamd: true,
        scan: "on_spam = \"tag\"\n",
        // fetchmail remarks on the size at its most verbose (`-v -v`) only, and delivers.
        fetchmail_args: &["-v"],
    }
    .run();
    assert!(
        fetchmail.output().contains("was not the expected length"),
        "fetchmail no longer remarks on the size: update docs/scanning.md: {fetchmail:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Sizes: too large for the scanners, and a spool on disk

/// A 30 MB message with `max_size = "10MB"`: relayed at once, unscanned, tagged; popgate's
/// peak RSS does not grow with it (nothing is held).
#[test]
#[ignore = "needs dovecot, clamd (run .ci/run)"]
fn message_over_max_size_passes_unscanned_and_tagged_with_memory_flat() {
    let msgs = vec![clean(1), sized(2, 30 << 20)];
    let r = Setup {
        mail: msgs.clone(),
        clamd: Some("max_size = \"10MB\"\n"),
        scan: "spool_memory = \"1MB\"\n".into(),
        ..Setup::default()
    }
    .start();
    let mut c = login(r.p.addr);
    // Warm up with the small one (scanned), then measure around the large one.
    let (status, _) = c.cmd_multi("RETR 1");
    assert!(status.starts_with("+OK"), "{status}");
    let (before, _) = r.p.memory_kib();
    let (status, body) = c.cmd_multi("RETR 2");
    let (peak, _) = r.p.memory_kib();
    assert!(status.starts_with("+OK"), "{status}");
    assert!(c.cmd("QUIT").starts_with("+OK"));
    let added = added_on_the_wire(&body.unwrap(), &msgs[1]);
    assert_eq!(added, ["X-Popgate-Scan: unscanned (too large)"]);
    eprintln!("popgate VmHWM before {before} KiB, after the 30 MB RETR {peak} KiB");
    assert!(
        peak < before + 8 * 1024,
        "peak RSS grew by {} KiB",
        peak - before
    );

    let evs = scan_events(&r.p, 2);
    let big: Vec<&Value> = evs.iter().filter(|e| e["msg"] == 2).collect();
    assert_eq!(big.len(), 1, "{evs:?}");
    assert_eq!(big[0]["verdict"], "too_large", "{}", big[0]);
    assert_eq!(big[0]["action"], "unscanned", "{}", big[0]);
}

/// A 5 MB message under `spool_memory = "1MB"` is held in a file in `spool_dir`: while the
/// (slow) scanner judges it, popgate has it open, unlinked, mode 0600; afterwards the file
/// is gone and the client got the message byte-identical; the scanner got it un-stuffed.
#[test]
#[ignore = "needs dovecot and curl (run .ci/run)"]
fn large_message_spools_to_an_unlinked_0600_file() {
    let msgs = vec![sized(1, 5 << 20)];
    let spool = tempfile::Builder::new().prefix("spool").tempdir().unwrap();
    let r = Setup {
        mail: msgs.clone(),
        slow_clamd: Some(Duration::from_secs(3)),
        scan: format!("spool_memory = \"1MB\"\nspool_dir = {:?}\n", spool.path()),
        ..Setup::default()
    }
    .start();
    let pid = r.p.child.id();
    let addr = r.p.addr;
    let client = std::thread::spawn(move || curl_retr(addr, USER, PASS, 1));
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.is_empty() && Instant::now() < deadline {
        seen = deleted_files_in(pid, spool.path());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        seen.len(),
        1,
        "no spool file seen open in {:?}",
        spool.path()
    );
    assert_eq!(seen[0].1, 0o600, "spool file mode {:o}", seen[0].1);
    assert!(
        std::fs::read_dir(spool.path()).unwrap().next().is_none(),
        "the spool file has a name in spool_dir"
    );
    let got = client.join().unwrap();
    assert!(
        got == served(&msgs[0]),
        "the client got {} octets",
        got.len()
    );
    assert!(
        deleted_files_in(pid, spool.path()).is_empty(),
        "spool file still open"
    );
    let scanned = r.slow.as_ref().unwrap().got.lock().unwrap().clone();
    assert_eq!(scanned.len(), 1);
    assert!(
        scanned[0] == served(&msgs[0]),
        "the scanner got {} octets",
        scanned[0].len()
    );
}

/// A spool that cannot be written (here `spool_dir` turned into a regular file, as good as a
/// full disk): the client gets `-ERR [SYS/TEMP]`, never a cut message, and a pipelined DELE
/// never reaches the server: the message stays.
#[test]
#[ignore = "needs dovecot (run .ci/run)"]
fn a_spool_that_cannot_be_written_tempfails_the_retrieval_and_loses_nothing() {
    let dir = tempfile::Builder::new().prefix("spool").tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let r = Setup {
        mail: vec![sized(1, 3 << 20)],
        slow_clamd: Some(Duration::from_millis(10)),
        scan: format!("spool_memory = \"1MB\"\nspool_dir = {spool:?}\n"),
        ..Setup::default()
    }
    .start();
    // Gone once popgate checked it, a file in its place.
    std::fs::remove_dir(&spool).unwrap();
    std::fs::write(&spool, b"").unwrap();
    let mut c = login(r.p.addr);
    c.send("RETR 1\r\nDELE 1\r\nQUIT");
    let line = c.line();
    assert!(
        line.starts_with("-ERR [SYS/TEMP]"),
        "RETR 1 answered {line:?}"
    );
    let slow = r.slow.as_ref().unwrap();
    assert!(slow.got.lock().unwrap().is_empty(), "nothing was scanned");
    drop(c);
    assert_eq!(uidls(&r.dv).len(), 1, "the message stays on the server");
}

// ---------------------------------------------------------------------------------------------
// 3. clamd killed mid-scan

/// A 2 MB message scanned by clamd with `on_error`; a logged-in client sends `RETR 1` while
/// clamd is stopped (the connection waits in its backlog), then clamd is killed: the status
/// line popgate answers with, and the client to go on with.
fn clamd_killed_mid_scan(on_error: &str) -> (Running, Vec<u8>, RawPop, String) {
    let msg = sized(1, 2 << 20);
    let mut r = Setup {
        mail: vec![msg.clone()],
        clamd: Some(""),
        scan: format!("on_error = \"{on_error}\"\n"),
        ..Setup::default()
    }
    .start();
    let mut c = login(r.p.addr);
    let clamd = r.clamd.as_mut().unwrap();
    clamd.pause();
    c.send("RETR 1");
    // The body is read and the scan started: popgate waits on the stopped clamd.
    std::thread::sleep(Duration::from_millis(1500));
    clamd.kill();
    let status = c.line();
    (r, msg, c, status)
}

/// `on_error = "tempfail"`: clamd killed mid-scan gives `-ERR [SYS/TEMP]`, a DELE of that
/// message is refused locally (not relayed), the message stays; after clamd is back, a retry
/// gets it.
#[test]
#[ignore = "needs dovecot, clamd, curl (run .ci/run)"]
fn clamd_killed_mid_scan_tempfails_and_a_retry_succeeds() {
    let (mut r, msg, mut c, status) = clamd_killed_mid_scan("tempfail");
    let (dv, p) = (&r.dv, &r.p);
    assert!(status.starts_with("-ERR [SYS/TEMP]"), "{status}");
    let dele = c.cmd("DELE 1");
    assert!(dele.starts_with("-ERR [SYS/TEMP]"), "{dele}");
    assert!(c.cmd("QUIT").starts_with("+OK"));
    assert_eq!(dv.message_count(USER), 1, "the message was deleted");
    assert!(
        !dv.log().contains("del=1/"),
        "Dovecot saw a DELE: {}",
        dv.log()
    );

    // clamd still down: fetchmail (--nokeep) skips the message and deletes nothing; mpop
    // (keep off) stops at it, exit 76 (docs/scanning.md, "Clients").
    let run = fetchmail_run(p.addr, USER, PASS, false, &[]);
    assert!(run.messages.is_empty(), "{run:?}");
    assert!(run.output().contains("[SYS/TEMP]"), "{run:?}");
    assert!(!run.output().contains("POP3> DELE"), "{run:?}");
    let run = mpop_run(p.addr, USER, PASS, false, &[]);
    assert_eq!(run.status, 76, "{run:?}");
    assert!(run.messages.is_empty(), "{run:?}");
    assert!(run.output().contains("[SYS/TEMP]"), "{run:?}");
    assert_eq!(dv.message_count(USER), 1, "the message was deleted");

    r.clamd.as_mut().unwrap().restart();
    let p = &r.p;
    assert!(curl_retr(p.addr, USER, PASS, 1) == served(&msg), "retry");
    let evs = scan_events(p, 4);
    assert_eq!(evs.len(), 4, "{evs:?}");
    for e in &evs[..3] {
        assert_eq!(e["verdict"], "error", "{e}");
        assert_eq!(e["action"], "tempfailed", "{e}");
    }
    assert_eq!(evs[3]["verdict"], "clean", "{}", evs[3]);
    assert_eq!(evs[3]["action"], "delivered", "{}", evs[3]);
}

/// `on_error = "pass"`: clamd killed mid-scan, the message arrives, tagged unscanned.
#[test]
#[ignore = "needs dovecot, clamd (run .ci/run)"]
fn clamd_killed_mid_scan_with_pass_delivers_unscanned_and_tagged() {
    let (r, msg, mut c, status) = clamd_killed_mid_scan("pass");
    assert!(status.starts_with("+OK"), "{status}");
    let body = c.body();
    assert!(c.cmd("QUIT").starts_with("+OK"));
    let added = added_on_the_wire(&body, &msg);
    assert_eq!(added.len(), 1, "{added:?}");
    assert!(
        added[0].starts_with("X-Popgate-Scan: unscanned"),
        "{added:?}"
    );
    let evs = scan_events(&r.p, 1);
    assert_eq!(evs[0]["verdict"], "error", "{}", evs[0]);
    // Relayed without a verdict: `unscanned`, as a message too large to scan (SCHEMA.md).
    assert_eq!(evs[0]["action"], "unscanned", "{}", evs[0]);
}

// ---------------------------------------------------------------------------------------------
// 4. Pipelining

/// `RETR 1` `RETR 2` `DELE 1` `QUIT` in one write, message 2 infected: the answers come in
/// order (message 1, the notice for 2, DELE, QUIT); message 1 is deleted, 2 stays.
#[test]
#[ignore = "needs dovecot, clamd (run .ci/run)"]
fn pipelined_retrievals_and_dele_are_answered_in_order() {
    let msgs = vec![clean(1), infected(2)];
    let r = Setup {
        mail: msgs.clone(),
        clamd: Some(""),
        ..Setup::default()
    }
    .start();
    let (dv, p) = (&r.dv, &r.p);
    let uidls = uidls(dv);
    let out = pop_raw(
        p.addr,
        &[
            &format!("USER {USER}"),
            &format!("PASS {PASS}"),
            "RETR 1",
            "RETR 2",
            "DELE 1",
            "QUIT",
        ],
    );
    let mut r = Replies(&out);
    assert!(r.line().starts_with("+OK"), "greeting");
    assert!(r.line().starts_with("+OK"), "USER");
    assert!(r.line().starts_with("+OK"), "PASS");
    let s1 = r.line();
    assert!(s1.starts_with("+OK"), "RETR 1: {s1}");
    let b1 = r.body();
    assert!(
        b1 == common::dovecot::dot_stuffed(&served(&msgs[0])),
        "RETR 1 body"
    );
    let s2 = r.line();
    assert!(s2.starts_with("+OK"), "RETR 2: {s2}");
    let b2 = r.body();
    assert_notice(&b2, &msgs[1], VIRUS_NAME, Some(&uidls[1]));
    let d = r.line();
    assert!(d.starts_with("+OK"), "DELE 1: {d}");
    let q = r.line();
    assert!(q.starts_with("+OK"), "QUIT: {q}");
    assert!(r.line().is_empty(), "more after QUIT");
    common::wait_until("Dovecot removed message 1", || dv.message_count(USER) == 1);
    assert!(
        curl_retr(dv.pop3, USER, PASS, 1) == served(&msgs[1]),
        "message 2 stays"
    );
}
