//! The scanner clients (`popgate::scan`) against the real daemons: clamd (`INSTREAM` over its
//! Unix and TCP sockets) and rspamd (`/checkv2`), started by `common::scanners` with test
//! signatures and rules. Clean, infected, spam, too large, down, killed mid-scan, timed out,
//! a file spool, several scanners at once.
//!
//! Every scenario is a [`Setup`] (its scanners and the `[scan]` keys it changes) started by
//! one runner ([`Setup::start`]).
//!
//! Needs clamd and rspamd (Debian clamav-daemon, rspamd): `cargo test --test it -- scanners::
//! --include-ignored` after `.ci/run` installed them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use popgate::config::scan::{ScanConfig, ScannerConfig, ScannerKind};
use popgate::scan::{Scanners, Spool};
use popgate::types::{ByteSize, ScanReport, ScanVerdict};

use crate::common::dovecot::dot_stuffed;
use crate::common::scanners::{
    Clamd, ClamdOpts, REJECT_MARK, RSPAMD_REJECT_SCORE, Rspamd, SPAM_MARK, STUFFED_MARK,
    STUFFED_NAME, STUFFED_SPAM_LINE, VIRUS_MARK, VIRUS_NAME, clean_mail, infected_mail, spam_mail,
};

// ---------------------------------------------------------------------------------------------
// The set-up and the checks

/// Where a scanner of a [`Setup`] is.
#[derive(Debug, Clone, Copy)]
enum At {
    /// The test clamd's Unix socket.
    ClamdUnix,
    /// The test clamd's TCP socket.
    ClamdTcp,
    /// The test rspamd.
    Rspamd,
    /// A free port: nothing listens there.
    Nowhere,
    /// A listener that accepts and never answers.
    Hang,
}

/// One `[[scanner]]` of a [`Setup`]: its name, where it is, and its `timeout` (20 s unless
/// changed) and `max_size` (25 MB unless changed).
struct Scanner {
    name: &'static str,
    at: At,
    timeout: Duration,
    max_size: ByteSize,
}

fn scanner(name: &'static str, at: At) -> Scanner {
    Scanner {
        name,
        at,
        timeout: Duration::from_secs(20),
        max_size: ByteSize(25 << 20),
    }
}

/// One scenario: its scanners (the daemons they need are started), the test clamd's options,
/// and the `[scan]` keys it changes (`spool_dir` is always a fresh temp dir).
struct Setup {
    scanners: Vec<Scanner>,
    clamd: ClamdOpts,
    spool_memory: Option<ByteSize>,
    max_concurrent: Option<usize>,
}

impl Setup {
    fn of(scanners: Vec<Scanner>) -> Setup {
        Setup {
            scanners,
            clamd: ClamdOpts::default(),
            spool_memory: None,
            max_concurrent: None,
        }
    }

    fn start(self) -> Fix {
        let uses = |f: fn(At) -> bool| self.scanners.iter().any(|s| f(s.at));
        let clamd = uses(|a| matches!(a, At::ClamdUnix | At::ClamdTcp))
            .then(|| Clamd::start_with(self.clamd.clone()));
        let rspamd = uses(|a| matches!(a, At::Rspamd)).then(Rspamd::start);
        let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let configs: Vec<ScannerConfig> = self
            .scanners
            .iter()
            .map(|s| ScannerConfig {
                name: s.name.into(),
                kind: match s.at {
                    At::Rspamd => ScannerKind::Rspamd,
                    _ => ScannerKind::Clamd,
                },
                address: match s.at {
                    At::ClamdUnix => clamd.as_ref().unwrap().unix_address(),
                    At::ClamdTcp => clamd.as_ref().unwrap().tcp_address(),
                    At::Rspamd => rspamd.as_ref().unwrap().url(),
                    At::Nowhere => format!("127.0.0.1:{}", crate::common::free_port()),
                    At::Hang => hang.local_addr().unwrap().to_string(),
                },
                timeout: s.timeout,
                max_size: s.max_size,
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let defaults = ScanConfig::default();
        let config = ScanConfig {
            spool_dir: dir.path().to_owned(),
            spool_memory: self.spool_memory.unwrap_or(defaults.spool_memory),
            max_concurrent: self.max_concurrent.unwrap_or(defaults.max_concurrent),
            ..defaults
        };
        let scanners = Scanners::new(&configs, &config).unwrap();
        Fix {
            scanners,
            dir,
            clamd,
            rspamd,
            _hang: hang,
        }
    }
}

/// A started [`Setup`]: the scanner clients, the spool directory, the daemons.
struct Fix {
    scanners: Scanners,
    dir: tempfile::TempDir,
    clamd: Option<Clamd>,
    rspamd: Option<Rspamd>,
    /// Kept listening until the scenario ends.
    _hang: std::net::TcpListener,
}

impl Fix {
    fn clamd(&mut self) -> &mut Clamd {
        self.clamd.as_mut().expect("a clamd in the set-up")
    }

    fn rspamd(&mut self) -> &mut Rspamd {
        self.rspamd.as_mut().expect("an rspamd in the set-up")
    }

    /// A spool of `msg` as the wire has it (dot-stuffed), written in pieces of `piece` octets.
    async fn spool_of(&self, msg: &[u8], piece: usize) -> Spool {
        let mut spool = self.scanners.spool();
        for p in dot_stuffed(msg).chunks(piece) {
            spool.write(p).await.unwrap();
        }
        spool
    }

    /// The reports of the scanners `names` on `spool`.
    async fn scan(&self, names: &[&str], spool: &Spool) -> Vec<ScanReport> {
        let names: Vec<Arc<str>> = names.iter().map(|&s| Arc::from(s)).collect();
        self.scanners.scan(&names, spool).await
    }

    /// Scanner `name`'s report on `msg` (spooled in 4 KiB pieces).
    async fn scan_one(&self, name: &str, msg: &[u8]) -> ScanReport {
        let spool = self.spool_of(msg, 4096).await;
        let mut reports = self.scan(&[name], &spool).await;
        assert_eq!(reports.len(), 1);
        assert_eq!(&*reports[0].scanner, name);
        reports.remove(0)
    }
}

/// A message of about `len` octets, many lines (some starting with a dot), `tail` at the end.
fn big_mail(len: usize, tail: &str) -> Vec<u8> {
    let mut m = b"Subject: big\r\n\r\n".to_vec();
    let mut i = 0;
    while m.len() < len {
        i += 1;
        m.extend_from_slice(format!(".line {i} of a long message, quite ordinary\r\n").as_bytes());
    }
    m.extend_from_slice(tail.as_bytes());
    m.extend_from_slice(b"\r\n");
    m
}

// ---------------------------------------------------------------------------------------------
// clamd

#[tokio::test]
#[ignore = "needs clamd (run .ci/run)"]
async fn clamd_says_clean_and_infected_over_unix_and_tcp_sockets() {
    let f = Setup::of(vec![
        scanner("unix", At::ClamdUnix),
        scanner("tcp", At::ClamdTcp),
    ])
    .start();
    for name in ["unix", "tcp"] {
        let r = f.scan_one(name, &clean_mail()).await;
        assert_eq!((r.verdict, r.detail.as_deref()), (ScanVerdict::Clean, None));
        let r = f.scan_one(name, &infected_mail()).await;
        assert_eq!(
            (r.verdict, r.detail.as_deref(), r.score),
            (ScanVerdict::Infected, Some(VIRUS_NAME), None),
            "{name}"
        );
    }
}

#[tokio::test]
#[ignore = "needs clamd (run .ci/run)"]
async fn clamd_gets_the_message_unstuffed_at_every_piece_size() {
    let f = Setup::of(vec![scanner("c", At::ClamdUnix)]).start();
    let msg = format!("Subject: dots\r\n\r\n{STUFFED_MARK}\r\n..\r\n").into_bytes();
    let wire = dot_stuffed(&msg);
    assert!(
        !wire
            .windows(STUFFED_MARK.len())
            .any(|w| w == STUFFED_MARK.as_bytes())
    );
    for piece in 1..=wire.len() {
        let spool = f.spool_of(&msg, piece).await;
        let r = f.scan(&["c"], &spool).await.remove(0);
        assert_eq!(
            (r.verdict, r.detail.as_deref()),
            (ScanVerdict::Infected, Some(STUFFED_NAME)),
            "piece size {piece}"
        );
    }
}

#[tokio::test]
#[ignore = "needs clamd (run .ci/run)"]
async fn clamd_scans_a_file_spool_to_its_end() {
    let f = Setup {
        spool_memory: Some(ByteSize(64 << 10)),
        ..Setup::of(vec![scanner("c", At::ClamdTcp)])
    }
    .start();
    let spool = f.spool_of(&big_mail(3 << 20, VIRUS_MARK), 16 << 10).await;
    assert!(spool.on_disk());
    assert_eq!(std::fs::read_dir(f.dir.path()).unwrap().count(), 0);
    let r = f.scan(&["c"], &spool).await.remove(0);
    assert_eq!(
        (r.verdict, r.detail.as_deref()),
        (ScanVerdict::Infected, Some(VIRUS_NAME))
    );
    let clean = f.spool_of(&big_mail(3 << 20, "the end"), 16 << 10).await;
    let r = f.scan(&["c"], &clean).await.remove(0);
    assert_eq!(r.verdict, ScanVerdict::Clean, "{r:?}");
}

#[tokio::test]
#[ignore = "needs clamd (run .ci/run)"]
async fn a_message_over_max_size_is_too_large_without_asking_the_scanner() {
    // Nothing listens there: asking would be an error.
    let f = Setup::of(vec![Scanner {
        max_size: ByteSize(1000),
        ..scanner("c", At::Nowhere)
    }])
    .start();
    let r = f.scan_one("c", &big_mail(1001, "x")).await;
    assert_eq!(r.verdict, ScanVerdict::TooLarge, "{r:?}");
    let r = f.scan_one("c", &clean_mail()).await;
    assert_eq!(r.verdict, ScanVerdict::Error, "{r:?}");
    assert!(r.detail.unwrap().starts_with("cannot connect"));
}

#[tokio::test]
#[ignore = "needs clamd (run .ci/run)"]
async fn clamd_refusing_a_stream_over_its_limit_is_an_error() {
    let f = Setup {
        clamd: ClamdOpts {
            stream_max_length: "1M".into(),
        },
        ..Setup::of(vec![scanner("c", At::ClamdUnix)])
    }
    .start();
    let r = f.scan_one("c", &big_mail(4 << 20, "end")).await;
    assert_eq!(r.verdict, ScanVerdict::Error, "{r:?}");
    assert!(
        r.detail.as_deref().unwrap().contains("size limit exceeded"),
        "{r:?}"
    );
}

#[tokio::test]
#[ignore = "needs clamd (run .ci/run)"]
async fn clamd_down_killed_mid_scan_and_back() {
    let mut f = Setup::of(vec![
        scanner("unix", At::ClamdUnix),
        scanner("tcp", At::ClamdTcp),
    ])
    .start();
    let spool = f.spool_of(&big_mail(8 << 20, "end"), 64 << 10).await;
    let both = ["unix", "tcp"];

    // Paused, it accepts and reads nothing: both scans are under way when it is killed.
    f.clamd().pause();
    let started = Instant::now();
    let names = [Arc::from("unix"), Arc::from("tcp")];
    let (scanners, clamd) = (&f.scanners, f.clamd.as_mut().unwrap());
    let scan = scanners.scan(&names, &spool);
    let kill = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        clamd.kill();
    };
    let (reports, ()) = tokio::join!(scan, kill);
    for r in &reports {
        assert_eq!(r.verdict, ScanVerdict::Error, "{r:?}");
        assert!(r.duration >= Duration::from_millis(400), "{r:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(10), "not a timeout");

    // Down: cannot connect.
    for r in f.scan(&both, &spool).await {
        assert_eq!(r.verdict, ScanVerdict::Error);
        assert!(
            r.detail.as_deref().unwrap().starts_with("cannot connect"),
            "{r:?}"
        );
    }
    let check = f.scanners.check().await;
    assert!(check.iter().all(|(_, ok)| ok.is_err()), "{check:?}");

    // Back: the same scanners work again.
    f.clamd().restart();
    for r in f.scan(&both, &spool).await {
        assert_eq!(r.verdict, ScanVerdict::Clean, "{r:?}");
    }
    let check = f.scanners.check().await;
    assert_eq!(
        check,
        vec![(Arc::from("unix"), Ok(())), (Arc::from("tcp"), Ok(()))]
    );
}

#[tokio::test]
#[ignore = "needs clamd (run .ci/run)"]
async fn a_hanging_clamd_times_out_after_its_timeout() {
    let mut f = Setup::of(vec![Scanner {
        timeout: Duration::from_secs(1),
        ..scanner("c", At::ClamdUnix)
    }])
    .start();
    f.clamd().pause();
    let r = f.scan_one("c", &infected_mail()).await;
    f.clamd().resume();
    assert_eq!(
        (r.verdict, r.detail.as_deref()),
        (ScanVerdict::Error, Some("timed out after 1s"))
    );
    assert!(
        r.duration >= Duration::from_secs(1) && r.duration < Duration::from_secs(5),
        "{r:?}"
    );
    let r = f.scan_one("c", &infected_mail()).await;
    assert_eq!(r.verdict, ScanVerdict::Infected, "after resuming: {r:?}");
}

#[tokio::test]
#[ignore = "needs clamd (run .ci/run)"]
async fn several_scanners_at_once_report_in_the_order_asked() {
    let f = Setup::of(vec![
        scanner("a", At::ClamdUnix),
        scanner("b", At::ClamdTcp),
    ])
    .start();
    let spool = f.spool_of(&infected_mail(), 100).await;
    let reports = f.scan(&["b", "nope", "a"], &spool).await;
    let got: Vec<(&str, ScanVerdict)> = reports.iter().map(|r| (&*r.scanner, r.verdict)).collect();
    assert_eq!(
        got,
        [
            ("b", ScanVerdict::Infected),
            ("nope", ScanVerdict::Error),
            ("a", ScanVerdict::Infected)
        ]
    );
    assert_eq!(
        reports[1].detail.as_deref(),
        Some("no [[scanner]] of this name")
    );
}

#[tokio::test]
#[ignore = "needs clamd (run .ci/run)"]
async fn waiting_for_a_scan_slot_counts_into_the_timeout() {
    // A scanner that accepts and never answers holds the one slot for its whole timeout.
    for (max_concurrent, live_verdict) in [(1, ScanVerdict::Error), (2, ScanVerdict::Clean)] {
        let f = Setup {
            max_concurrent: Some(max_concurrent),
            ..Setup::of(vec![
                Scanner {
                    timeout: Duration::from_secs(2),
                    ..scanner("slow", At::Hang)
                },
                Scanner {
                    timeout: Duration::from_secs(1),
                    ..scanner("live", At::ClamdUnix)
                },
            ])
        }
        .start();
        let spool = f.spool_of(&clean_mail(), 100).await;
        let reports = f.scan(&["slow", "live"], &spool).await;
        assert_eq!(reports[0].verdict, ScanVerdict::Error);
        assert_eq!(
            reports[1].verdict, live_verdict,
            "max_concurrent {max_concurrent}: {:?}",
            reports[1]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// rspamd

#[tokio::test]
#[ignore = "needs rspamd (run .ci/run)"]
async fn rspamd_says_clean_or_spam_with_its_action_and_scores() {
    let f = Setup::of(vec![scanner("r", At::Rspamd)]).start();
    let reject = format!("Subject: x\r\n\r\n{REJECT_MARK}\r\n").into_bytes();
    for (msg, verdict, action, score) in [
        (clean_mail(), ScanVerdict::Clean, "no action", 0.0),
        (spam_mail(), ScanVerdict::Spam, "add header", 10.0),
        (reject, ScanVerdict::Spam, "reject", 20.0),
    ] {
        let r = f.scan_one("r", &msg).await;
        assert_eq!(
            (r.verdict, r.detail.as_deref(), r.score),
            (verdict, Some(action), Some((score, RSPAMD_REJECT_SCORE)))
        );
    }
    assert_eq!(f.scanners.check().await, vec![(Arc::from("r"), Ok(()))]);
}

#[tokio::test]
#[ignore = "needs rspamd (run .ci/run)"]
async fn rspamd_gets_the_message_unstuffed_and_streamed_from_a_file_spool() {
    let f = Setup {
        spool_memory: Some(ByteSize(64 << 10)),
        ..Setup::of(vec![scanner("r", At::Rspamd)])
    }
    .start();
    let small = format!("Subject: dots\r\n\r\n{STUFFED_SPAM_LINE}\r\n").into_bytes();
    for piece in [1, 2, 5, 17, small.len()] {
        let spool = f.spool_of(&small, piece).await;
        let r = f.scan(&["r"], &spool).await.remove(0);
        assert_eq!(r.verdict, ScanVerdict::Spam, "piece {piece}: {r:?}");
    }
    // 5 MB in a file, the mark at its end.
    let big = big_mail(5 << 20, &format!("\r\n{STUFFED_SPAM_LINE}"));
    let spool = f.spool_of(&big, 64 << 10).await;
    assert!(spool.on_disk());
    let r = f.scan(&["r"], &spool).await.remove(0);
    assert_eq!(r.verdict, ScanVerdict::Spam, "{r:?}");
    let clean = f.spool_of(&big_mail(5 << 20, "end"), 64 << 10).await;
    let r = f.scan(&["r"], &clean).await.remove(0);
    assert_eq!(r.verdict, ScanVerdict::Clean, "{r:?}");
}

#[tokio::test]
#[ignore = "needs rspamd (run .ci/run)"]
async fn rspamd_hanging_or_down_is_an_error() {
    let mut f = Setup::of(vec![Scanner {
        timeout: Duration::from_secs(1),
        ..scanner("r", At::Rspamd)
    }])
    .start();
    f.rspamd().pause();
    let r = f.scan_one("r", &spam_mail()).await;
    assert_eq!(
        (r.verdict, r.detail.as_deref()),
        (ScanVerdict::Error, Some("timed out after 1s"))
    );
    let check = f.scanners.check().await;
    assert_eq!(check[0].1, Err("timed out after 1s".into()));
    f.rspamd().resume();
    assert_eq!(
        f.scan_one("r", &spam_mail()).await.verdict,
        ScanVerdict::Spam
    );
    f.rspamd().kill();
    let r = f.scan_one("r", &spam_mail()).await;
    assert_eq!(r.verdict, ScanVerdict::Error);
    assert!(
        r.detail.as_deref().unwrap().starts_with("cannot connect"),
        "{r:?}"
    );
    assert!(f.scanners.check().await[0].1.is_err());
}

#[tokio::test]
#[ignore = "needs clamd and rspamd (run .ci/run)"]
async fn clamd_and_rspamd_scan_one_message_at_once() {
    let f = Setup {
        spool_memory: Some(ByteSize(1 << 10)),
        ..Setup::of(vec![
            scanner("clamav", At::ClamdUnix),
            scanner("rspamd", At::Rspamd),
        ])
    }
    .start();
    let msg = big_mail(300 << 10, &format!("{VIRUS_MARK} {SPAM_MARK}"));
    let spool = f.spool_of(&msg, 1000).await;
    assert!(spool.on_disk());
    let reports = f.scan(&["clamav", "rspamd"], &spool).await;
    let got: Vec<_> = reports
        .iter()
        .map(|r| (&*r.scanner, r.verdict, r.detail.as_deref()))
        .collect();
    assert_eq!(
        got,
        [
            ("clamav", ScanVerdict::Infected, Some(VIRUS_NAME)),
            ("rspamd", ScanVerdict::Spam, Some("add header"))
        ]
    );
    let mut wire = Vec::new();
    spool.copy_to(&mut wire).await.unwrap();
    assert!(wire == dot_stuffed(&msg), "the client gets the wire bytes");
}

// ---------------------------------------------------------------------------------------------
// popgate check

/// `popgate check`: a scanner that answers is named on stderr; one that does not is a
/// warning, not an error (exit status 0).
#[test]
#[ignore = "needs clamd (run .ci/run)"]
fn popgate_check_pings_each_scanner_and_warns_about_a_dead_one() {
    let daemon = Clamd::start();
    let dir = tempfile::tempdir().unwrap();
    let dead = crate::common::free_port();
    let config = dir.path().join("popgate.toml");
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nname = \"p\"\nbind = \"127.0.0.1:0\"\n\
             [upstream]\naddress = \"127.0.0.1:110\"\n\
             [[scanner]]\nname = \"live\"\nkind = \"clamd\"\naddress = \"{}\"\n\
             [[scanner]]\nname = \"dead\"\nkind = \"clamd\"\naddress = \"127.0.0.1:{dead}\"\n\
             [scan]\nspool_dir = \"{}\"\n",
            daemon.unix_address(),
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_popgate"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("scanner \"live\": answers"), "{stderr}");
    assert!(
        stderr.contains("warning: scanner \"dead\" does not answer (cannot connect"),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 warning(s)"),
        "{stderr}"
    );
    // check creates nothing.
    assert!(!dir.path().join("spool").exists());
}
