//! `Command::parse` and `redacted()` on arbitrary bytes: no panic, and the redacted form of a
//! PASS/APOP/AUTH line never contains its secret argument.
//!
//! The check is structural, so it has no false alarms when a password happens to equal the
//! keyword or the user name: the redacted line must be the public prefix (keyword; APOP's user
//! or AUTH's mechanism) followed by nothing or ` ***`, so no byte of the secret can be in it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use popgate::pop3::command::{Command, Verb, trim_eol};

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    let Ok(cmd) = Command::parse(data) else {
        return;
    };
    assert_eq!(cmd.raw, data);
    let line = trim_eol(data);
    assert!(contains(line, cmd.keyword) && contains(line, cmd.args));
    let red = cmd.redacted();
    let args: Vec<&[u8]> = cmd.arg_list().collect();
    let kw = String::from_utf8_lossy(cmd.keyword);
    let show = || String::from_utf8_lossy(line).into_owned();
    match cmd.verb {
        Verb::Pass => {
            // Everything after the keyword is the password (it may contain spaces).
            assert_eq!(red, format!("{kw} ***"), "PASS line {:?}", show());
        }
        Verb::Apop | Verb::Auth => {
            let first = args
                .first()
                .and_then(|a| std::str::from_utf8(a).ok())
                .map(|a| format!("{kw} {a}"));
            let public = first.unwrap_or_else(|| kw.clone().into_owned());
            let tail = red.strip_prefix(&public).unwrap_or_else(|| {
                panic!("{red:?} does not start with {public:?} for {:?}", show())
            });
            assert!(
                tail.is_empty() || tail == " ***",
                "{:?} redacted to {red:?}",
                show()
            );
        }
        _ => {}
    }
});
