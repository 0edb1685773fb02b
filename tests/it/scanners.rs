//! The scanner clients (`popgate::scan`) against the real daemons: clamd (`INSTREAM` over its
//! Unix and TCP sockets) and rspamd (`/checkv2`), started by `common::scanners` with test
//! signatures and rules. Clean, infected, spam, too large, down, killed mid-scan, timed out,
//! a file spool, several scanners at once.
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

fn clamd(name: &str, address: String) -> ScannerConfig {
    ScannerConfig {
        name: name.into(),
        kind: ScannerKind::Clamd,
        address,
        timeout: Duration::from_secs(20),
        max_size: ByteSize(25 << 20),
    }
}

fn scan_config(dir: &std::path::Path) -> ScanConfig {
    ScanConfig {
        spool_dir: dir.to_owned(),
        ..ScanConfig::default()
    }
}

fn names(n: &[&str]) -> Vec<Arc<str>> {
    n.iter().map(|&s| Arc::from(s)).collect()
}

/// A spool of `msg` as the wire has it (dot-stuffed), written in pieces of `piece` octets.
async fn spool_of(scanners: &Scanners, msg: &[u8], piece: usize) -> Spool {
    let mut spool = scanners.spool();
    for p in dot_stuffed(msg).chunks(piece) {
        spool.write(p).await.unwrap();
    }
    spool
}

async fn scan_one(scanners: &Scanners, name: &str, msg: &[u8]) -> ScanReport {
    let spool = spool_of(scanners, msg, 4096).await;
    let mut reports = scanners.scan(&names(&[name]), &spool).await;
    assert_eq!(reports.len(), 1);
    reports.remove(0)
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

#[tokio::test]
#[ignore = "needs clamd (run .ci/run)"]
async fn clamd_says_clean_and_infected_over_unix_and_tcp_sockets() {
    let daemon = Clamd::start();
    let dir = tempfile::tempdir().unwrap();
    let scanners = Scanners::new(
        &[
            clamd("unix", daemon.unix_address()),
            clamd("tcp", daemon.tcp_address()),
        ],
        &scan_config(dir.path()),
    )
    .unwrap();
    for name in ["unix", "tcp"] {
        let r = scan_one(&scanners, name, &clean_mail()).await;
        assert_eq!((r.verdict, r.detail.as_deref()), (ScanVerdict::Clean, None));
        assert_eq!(&*r.scanner, name);
        let r = scan_one(&scanners, name, &infected_mail()).await;
        assert_eq!(
            (r.verdict, r.detail.as_deref()),
            (ScanVerdict::Infected, Some(VIRUS_NAME)),
            "{name}"
        );
        assert_eq!(r.score, None);
    }
}

#[tokio::test]
#[ignore = "needs clamd (run .ci/run)"]
async fn clamd_gets_the_message_unstuffed_at_every_piece_size() {
    let daemon = Clamd::start();
    let dir = tempfile::tempdir().unwrap();
    let scanners = Scanners::new(
        &[clamd("c", daemon.unix_address())],
        &scan_config(dir.path()),
    )
    .unwrap();
    let msg = format!("Subject: dots\r\n\r\n{STUFFED_MARK}\r\n..\r\n").into_bytes();
    let wire = dot_stuffed(&msg);
    assert!(
        !wire
            .windows(STUFFED_MARK.len())
            .any(|w| w == STUFFED_MARK.as_bytes())
    );
    for piece in 1..=wire.len() {
        let spool = spool_of(&scanners, &msg, piece).await;
        let r = scanners.scan(&names(&["c"]), &spool).await.remove(0);
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
    let daemon = Clamd::start();
    let dir = tempfile::tempdir().unwrap();
    let config = ScanConfig {
        spool_memory: ByteSize(64 << 10),
        ..scan_config(dir.path())
    };
    let scanners = Scanners::new(&[clamd("c", daemon.tcp_address())], &config).unwrap();
    let msg = big_mail(3 << 20, VIRUS_MARK);
    let spool = spool_of(&scanners, &msg, 16 << 10).await;
    assert!(spool.on_disk());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    let r = scanners.scan(&names(&["c"]), &spool).await.remove(0);
    assert_eq!(
        (r.verdict, r.detail.as_deref()),
        (ScanVerdict::Infected, Some(VIRUS_NAME))
    );
    let clean = spool_of(&scanners, &big_mail(3 << 20, "the end"), 16 << 10).await;
    let r = scanners.scan(&names(&["c"]), &clean).await.remove(0);
    assert_eq!(r.verdict, ScanVerdict::Clean, "{r:?}");
}

#[tokio::test]
#[ignore = "needs clamd (run .ci/run)"]
async fn a_message_over_max_size_is_too_large_without_asking_the_scanner() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens there: asking would be an error.
    let dead = format!("127.0.0.1:{}", crate::common::free_port());
    let mut c = clamd("c", dead);
    c.max_size = ByteSize(1000);
    let scanners = Scanners::new(&[c], &scan_config(dir.path())).unwrap();
    let r = scan_one(&scanners, "c", &big_mail(1001, "x")).await;
    assert_eq!(r.verdict, ScanVerdict::TooLarge, "{r:?}");
    let r = scan_one(&scanners, "c", &clean_mail()).await;
    assert_eq!(r.verdict, ScanVerdict::Error, "{r:?}");
    assert!(r.detail.unwrap().starts_with("cannot connect"));
}

#[tokio::test]
#[ignore = "needs clamd (run .ci/run)"]
async fn clamd_refusing_a_stream_over_its_limit_is_an_error() {
    let daemon = Clamd::start_with(ClamdOpts {
        stream_max_length: "1M".into(),
    });
    let dir = tempfile::tempdir().unwrap();
    let scanners = Scanners::new(
        &[clamd("c", daemon.unix_address())],
        &scan_config(dir.path()),
    )
    .unwrap();
    let r = scan_one(&scanners, "c", &big_mail(4 << 20, "end")).await;
    assert_eq!(r.verdict, ScanVerdict::Error, "{r:?}");
    assert!(
        r.detail.as_deref().unwrap().contains("size limit exceeded"),
        "{r:?}"
    );
}

#[tokio::test]
#[ignore = "needs clamd (run .ci/run)"]
async fn clamd_down_killed_mid_scan_and_back() {
    let mut daemon = Clamd::start();
    let dir = tempfile::tempdir().unwrap();
    let scanners = Scanners::new(
        &[
            clamd("unix", daemon.unix_address()),
            clamd("tcp", daemon.tcp_address()),
        ],
        &scan_config(dir.path()),
    )
    .unwrap();
    let msg = big_mail(8 << 20, "end");
    let spool = spool_of(&scanners, &msg, 64 << 10).await;

    // Paused, it accepts and reads nothing: both scans are under way when it is killed.
    daemon.pause();
    let started = Instant::now();
    let both = names(&["unix", "tcp"]);
    let scan = scanners.scan(&both, &spool);
    let kill = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        daemon.kill();
    };
    let (reports, ()) = tokio::join!(scan, kill);
    for r in &reports {
        assert_eq!(r.verdict, ScanVerdict::Error, "{r:?}");
        assert!(r.duration >= Duration::from_millis(400), "{r:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(10), "not a timeout");

    // Down: cannot connect.
    for r in scanners.scan(&names(&["unix", "tcp"]), &spool).await {
        assert_eq!(r.verdict, ScanVerdict::Error);
        assert!(
            r.detail.as_deref().unwrap().starts_with("cannot connect"),
            "{r:?}"
        );
    }
    let check = scanners.check().await;
    assert!(check.iter().all(|(_, ok)| ok.is_err()), "{check:?}");

    // Back: the same scanners work again.
    daemon.restart();
    for r in scanners.scan(&names(&["unix", "tcp"]), &spool).await {
        assert_eq!(r.verdict, ScanVerdict::Clean, "{r:?}");
    }
    let check = scanners.check().await;
    assert_eq!(
        check,
        vec![(Arc::from("unix"), Ok(())), (Arc::from("tcp"), Ok(()))]
    );
}

#[tokio::test]
#[ignore = "needs clamd (run .ci/run)"]
async fn a_hanging_clamd_times_out_after_its_timeout() {
    let daemon = Clamd::start();
    let dir = tempfile::tempdir().unwrap();
    let mut c = clamd("c", daemon.unix_address());
    c.timeout = Duration::from_secs(1);
    let scanners = Scanners::new(&[c], &scan_config(dir.path())).unwrap();
    daemon.pause();
    let r = scan_one(&scanners, "c", &infected_mail()).await;
    daemon.resume();
    assert_eq!(
        (r.verdict, r.detail.as_deref()),
        (ScanVerdict::Error, Some("timed out after 1s"))
    );
    assert!(
        r.duration >= Duration::from_secs(1) && r.duration < Duration::from_secs(5),
        "{r:?}"
    );
    let r = scan_one(&scanners, "c", &infected_mail()).await;
    assert_eq!(r.verdict, ScanVerdict::Infected, "after resuming: {r:?}");
}

#[tokio::test]
#[ignore = "needs clamd (run .ci/run)"]
async fn several_scanners_at_once_report_in_the_order_asked() {
    let daemon = Clamd::start();
    let dir = tempfile::tempdir().unwrap();
    let scanners = Scanners::new(
        &[
            clamd("a", daemon.unix_address()),
            clamd("b", daemon.tcp_address()),
        ],
        &scan_config(dir.path()),
    )
    .unwrap();
    let spool = spool_of(&scanners, &infected_mail(), 100).await;
    let reports = scanners.scan(&names(&["b", "nope", "a"]), &spool).await;
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
    let daemon = Clamd::start();
    let dir = tempfile::tempdir().unwrap();
    // A scanner that accepts and never answers holds the one slot for its whole timeout.
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut slow = clamd("slow", hang.local_addr().unwrap().to_string());
    slow.timeout = Duration::from_secs(2);
    let mut live = clamd("live", daemon.unix_address());
    live.timeout = Duration::from_secs(1);
    for (max_concurrent, live_verdict) in [(1, ScanVerdict::Error), (2, ScanVerdict::Clean)] {
        let config = ScanConfig {
            max_concurrent,
            ..scan_config(dir.path())
        };
        let scanners = Scanners::new(&[slow.clone(), live.clone()], &config).unwrap();
        let spool = spool_of(&scanners, &clean_mail(), 100).await;
        let reports = scanners.scan(&names(&["slow", "live"]), &spool).await;
        assert_eq!(reports[0].verdict, ScanVerdict::Error);
        assert_eq!(
            reports[1].verdict, live_verdict,
            "max_concurrent {max_concurrent}: {:?}",
            reports[1]
        );
    }
}

fn rspamd(name: &str, address: String) -> ScannerConfig {
    ScannerConfig {
        name: name.into(),
        kind: ScannerKind::Rspamd,
        address,
        timeout: Duration::from_secs(20),
        max_size: ByteSize(25 << 20),
    }
}

#[tokio::test]
#[ignore = "needs rspamd (run .ci/run)"]
async fn rspamd_says_clean_or_spam_with_its_action_and_scores() {
    let daemon = Rspamd::start();
    let dir = tempfile::tempdir().unwrap();
    let scanners = Scanners::new(&[rspamd("r", daemon.url())], &scan_config(dir.path())).unwrap();
    let r = scan_one(&scanners, "r", &clean_mail()).await;
    assert_eq!(
        (r.verdict, r.detail.as_deref(), r.score),
        (
            ScanVerdict::Clean,
            Some("no action"),
            Some((0.0, RSPAMD_REJECT_SCORE))
        )
    );
    let r = scan_one(&scanners, "r", &spam_mail()).await;
    assert_eq!(
        (r.verdict, r.detail.as_deref(), r.score),
        (
            ScanVerdict::Spam,
            Some("add header"),
            Some((10.0, RSPAMD_REJECT_SCORE))
        )
    );
    let reject = format!("Subject: x\r\n\r\n{REJECT_MARK}\r\n").into_bytes();
    let r = scan_one(&scanners, "r", &reject).await;
    assert_eq!(
        (r.verdict, r.detail.as_deref(), r.score),
        (
            ScanVerdict::Spam,
            Some("reject"),
            Some((20.0, RSPAMD_REJECT_SCORE))
        )
    );
    assert_eq!(scanners.check().await, vec![(Arc::from("r"), Ok(()))]);
}

#[tokio::test]
#[ignore = "needs rspamd (run .ci/run)"]
async fn rspamd_gets_the_message_unstuffed_and_streamed_from_a_file_spool() {
    let daemon = Rspamd::start();
    let dir = tempfile::tempdir().unwrap();
    let config = ScanConfig {
        spool_memory: ByteSize(64 << 10),
        ..scan_config(dir.path())
    };
    let scanners = Scanners::new(&[rspamd("r", daemon.url())], &config).unwrap();
    let small = format!("Subject: dots\r\n\r\n{STUFFED_SPAM_LINE}\r\n").into_bytes();
    for piece in [1, 2, 5, 17, small.len()] {
        let spool = spool_of(&scanners, &small, piece).await;
        let r = scanners.scan(&names(&["r"]), &spool).await.remove(0);
        assert_eq!(r.verdict, ScanVerdict::Spam, "piece {piece}: {r:?}");
    }
    // 5 MB in a file, the mark at its end.
    let big = big_mail(5 << 20, &format!("\r\n{STUFFED_SPAM_LINE}"));
    let spool = spool_of(&scanners, &big, 64 << 10).await;
    assert!(spool.on_disk());
    let r = scanners.scan(&names(&["r"]), &spool).await.remove(0);
    assert_eq!(r.verdict, ScanVerdict::Spam, "{r:?}");
    let clean = spool_of(&scanners, &big_mail(5 << 20, "end"), 64 << 10).await;
    let r = scanners.scan(&names(&["r"]), &clean).await.remove(0);
    assert_eq!(r.verdict, ScanVerdict::Clean, "{r:?}");
}

#[tokio::test]
#[ignore = "needs rspamd (run .ci/run)"]
async fn rspamd_hanging_or_down_is_an_error() {
    let mut daemon = Rspamd::start();
    let dir = tempfile::tempdir().unwrap();
    let mut c = rspamd("r", daemon.url());
    c.timeout = Duration::from_secs(1);
    let scanners = Scanners::new(&[c], &scan_config(dir.path())).unwrap();
    daemon.pause();
    let r = scan_one(&scanners, "r", &spam_mail()).await;
    assert_eq!(
        (r.verdict, r.detail.as_deref()),
        (ScanVerdict::Error, Some("timed out after 1s"))
    );
    let check = scanners.check().await;
    assert_eq!(check[0].1, Err("timed out after 1s".into()));
    daemon.resume();
    assert_eq!(
        scan_one(&scanners, "r", &spam_mail()).await.verdict,
        ScanVerdict::Spam
    );
    daemon.kill();
    let r = scan_one(&scanners, "r", &spam_mail()).await;
    assert_eq!(r.verdict, ScanVerdict::Error);
    assert!(
        r.detail.as_deref().unwrap().starts_with("cannot connect"),
        "{r:?}"
    );
    assert!(scanners.check().await[0].1.is_err());
}

#[tokio::test]
#[ignore = "needs clamd and rspamd (run .ci/run)"]
async fn clamd_and_rspamd_scan_one_message_at_once() {
    let (clam, spam) = (Clamd::start(), Rspamd::start());
    let dir = tempfile::tempdir().unwrap();
    let config = ScanConfig {
        spool_memory: ByteSize(1 << 10),
        ..scan_config(dir.path())
    };
    let scanners = Scanners::new(
        &[
            clamd("clamav", clam.unix_address()),
            rspamd("rspamd", spam.url()),
        ],
        &config,
    )
    .unwrap();
    let msg = big_mail(300 << 10, &format!("{VIRUS_MARK} {SPAM_MARK}"));
    let spool = spool_of(&scanners, &msg, 1000).await;
    assert!(spool.on_disk());
    let reports = scanners.scan(&names(&["clamav", "rspamd"]), &spool).await;
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
