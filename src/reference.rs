//! The configuration reference: every key of `popgate.toml`, its default, what a reload does
//! with it and what it means, in one table.
//!
//! The `popgate.toml(5)` man page is generated from [`KEYS`], `popgate check --print` names the
//! keys it has no value for from it, and the tests below compare it with what `check --print`
//! prints for a config that sets every key, so the reference cannot drift from the code.
//! `docs/configuration.md` documents the same keys with the same defaults and reload behaviour
//! (`tests/it/docs.rs` compares the two).

/// What a reload (`SIGHUP`, `popgate reload`) does with a changed key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// Applied by a reload: new sessions get the new value, open ones keep theirs.
    Applied,
    /// Read at start only: a reload reports it as needing a restart.
    Restart,
}

/// One key of the configuration file.
#[derive(Debug)]
pub struct Key {
    /// Dotted path: `limits.idle_timeout`, `listener.bind` (for `[[listener]]` entries).
    pub key: &'static str,
    /// The default as written in TOML, or a phrase (`"not set"`, `"system store"`).
    pub default: &'static str,
    /// What a reload does with it.
    pub reload: Reload,
    /// What it means, one paragraph.
    pub doc: &'static str,
}

const fn k(key: &'static str, default: &'static str, reload: Reload, doc: &'static str) -> Key {
    Key {
        key,
        default,
        reload,
        doc,
    }
}

use Reload::{Applied as A, Restart as R};

/// Every key popgate reads, in the order of the man page's sections.
pub const KEYS: &[Key] = &[
    // Top level.
    k(
        "rules",
        "[]",
        A,
        "Rule files (globs relative to the config file), loaded in order; see rules/README.md.",
    ),
    k(
        "pid_file",
        "not set",
        R,
        "Write popgate's process id here once the listeners are bound (its directory is created); removed at exit. `popgate reload --config` finds the process through it.",
    ),
    k(
        "shutdown_grace",
        "\"30s\"",
        A,
        "On SIGTERM, open sessions may finish for this long; then the rest are closed (upstream without QUIT). \"0s\" closes them at once.",
    ),
    // [[listener]]
    k(
        "listener.name",
        "required",
        A,
        "Name in logs, rules and metrics.",
    ),
    k(
        "listener.bind",
        "required",
        A,
        "Address and port: 127.0.0.1:1110, [::1]:1110, 0.0.0.0:995; port 0 picks one. Two listeners cannot share one. A listener whose bind stays the same keeps its socket across a reload.",
    ),
    k(
        "listener.tls",
        "\"none\"",
        A,
        "\"none\", \"starttls\" (popgate answers STLS itself) or \"implicit\" (TLS handshake at accept, port 995 style).",
    ),
    k(
        "listener.proxy_protocol",
        "false",
        A,
        "Expect a PROXY protocol header (v1 or v2) before anything else and take the client address from it.",
    ),
    k(
        "listener.trusted_proxies",
        "[]",
        A,
        "Required with proxy_protocol: the balancers' addresses or networks; anyone else is closed.",
    ),
    k(
        "listener.proxy_timeout",
        "\"5s\"",
        A,
        "The whole PROXY header must arrive within this.",
    ),
    // [upstream] / [[upstream]]
    k(
        "upstream.name",
        "not set",
        A,
        "Name of an [[upstream]] entry (routing several servers); a single [upstream] needs none.",
    ),
    k(
        "upstream.address",
        "required",
        A,
        "host:port of the POP3 server, resolved per connection; or a list tried in order (failover); \"original-destination\" for transparent interception.",
    ),
    k(
        "upstream.dead_for",
        "\"10s\"",
        A,
        "An address that refused the connection or timed out is skipped this long (unless all are).",
    ),
    k(
        "upstream.tls",
        "\"none\"",
        A,
        "\"none\", \"starttls\" (STLS first; a refusal is an error, never a plaintext fall-back) or \"implicit\".",
    ),
    k(
        "upstream.connect_timeout",
        "\"10s\"",
        A,
        "TCP and TLS setup (and the greeting in routing mode, with several addresses, with STLS or XCLIENT); clients get -ERR [SYS/TEMP] past it.",
    ),
    k(
        "upstream.ca_file",
        "system store",
        A,
        "PEM CA certificate(s) to verify the server with.",
    ),
    k(
        "upstream.server_name",
        "host of address",
        A,
        "SNI and the name verified in the server's certificate.",
    ),
    k(
        "upstream.client_cert",
        "not set",
        A,
        "Client certificate (PEM) presented to the upstream.",
    ),
    k("upstream.client_key", "not set", A, "Its key (PEM)."),
    k(
        "upstream.verify",
        "true",
        A,
        "false accepts any server certificate (logged as a warning at start).",
    ),
    k(
        "upstream.forward_client",
        "\"none\"",
        A,
        "How the server learns the client's address: \"proxy-v1\", \"proxy-v2\" (a PROXY header first), \"xclient\" (Dovecot's XCLIENT after the greeting) or \"none\".",
    ),
    k(
        "upstream.user_names",
        "\"fold\"",
        A,
        "How the server compares user names: \"fold\" (ASCII lowercase, like Dovecot's default %Lu; rules, routing and audit see the lowercased name) or \"exact\".",
    ),
    k(
        "upstream.oauth2.token_url",
        "required",
        A,
        "OAuth2 bridge: the authorization server's token endpoint.",
    ),
    k(
        "upstream.oauth2.client_id",
        "required",
        A,
        "The OAuth2 client (application) id.",
    ),
    k(
        "upstream.oauth2.client_secret_file",
        "not set",
        A,
        "File holding the client secret (first line).",
    ),
    k(
        "upstream.oauth2.client_secret_env",
        "not set",
        A,
        "Environment variable holding the client secret.",
    ),
    k(
        "upstream.oauth2.grant",
        "\"refresh_token\"",
        A,
        "\"refresh_token\" (one per mailbox, from popgate oauth2 login) or \"client_credentials\" (one application token).",
    ),
    k(
        "upstream.oauth2.scope",
        "not set",
        A,
        "Scopes asked for, space separated.",
    ),
    k(
        "upstream.oauth2.mechanism",
        "\"xoauth2\"",
        A,
        "SASL mechanism used upstream: \"xoauth2\" or \"oauthbearer\".",
    ),
    k(
        "upstream.oauth2.tokens_file",
        "not set",
        A,
        "With grant = \"refresh_token\": one refresh token per mailbox, rewritten atomically (mode 0600) when tokens rotate.",
    ),
    k(
        "upstream.oauth2.credentials_file",
        "required",
        A,
        "Local users and their Argon2 password hashes (and upstream mailbox names).",
    ),
    k(
        "upstream.oauth2.device_authorization_url",
        "not set",
        A,
        "Device authorization endpoint (RFC 8628) for popgate oauth2 login.",
    ),
    k(
        "upstream.oauth2.refresh_ahead",
        "\"60s\"",
        A,
        "Refresh an access token this long before it expires.",
    ),
    k(
        "upstream.oauth2.max_concurrent_verifications",
        "the number of CPUs",
        A,
        "At most this many local password checks (Argon2) run at once; further logins wait in a bounded line (one place per client address) and get -ERR [SYS/TEMP] when it is full or after 5 s.",
    ),
    k(
        "upstream.oauth2.allow_insecure_token_url",
        "false",
        A,
        "Allow an http:// token_url or device_authorization_url that is not on loopback (the client secret and tokens then travel in clear).",
    ),
    // [routing]
    k(
        "routing.default",
        "not set",
        A,
        "Routing mode: the upstream of users no rule and no map line routes (required with several upstreams).",
    ),
    k(
        "routing.map",
        "not set",
        A,
        "Map file: lines `user upstream` or `@domain upstream`.",
    ),
    k(
        "routing.greeting",
        "\"popgate ready\"",
        A,
        "Text of popgate's own +OK greeting in routing mode.",
    ),
    // [tls]
    k(
        "tls.cert",
        "not set",
        A,
        "Default certificate chain for TLS listeners (PEM; RSA, ECDSA or Ed25519).",
    ),
    k("tls.key", "not set", A, "Its private key (PEM)."),
    k(
        "tls.certificate.server_names",
        "required",
        A,
        "[[tls.certificate]]: the SNI names this certificate is chosen for (*.example.org matches one level).",
    ),
    k(
        "tls.certificate.cert",
        "required",
        A,
        "[[tls.certificate]]: its certificate chain.",
    ),
    k(
        "tls.certificate.key",
        "required",
        A,
        "[[tls.certificate]]: its key.",
    ),
    k(
        "tls.handshake_timeout",
        "\"30s\"",
        A,
        "Client TLS handshake limit.",
    ),
    // [limits]
    k(
        "limits.idle_timeout",
        "\"10m\"",
        A,
        "Close (upstream without QUIT) after this long without traffic.",
    ),
    k(
        "limits.max_line",
        "8192",
        A,
        "Longest command or status line in octets; longer commands get -ERR, endless junk a close.",
    ),
    k(
        "limits.unknown_commands",
        "\"reject\"",
        A,
        "\"reject\" answers unknown commands with -ERR locally; \"single-line\" forwards them expecting one line (never where a rule would refuse PASS).",
    ),
    k(
        "limits.max_sessions",
        "10000",
        A,
        "Concurrent sessions over all listeners; a further client gets -ERR [SYS/TEMP] and is closed.",
    ),
    k(
        "limits.max_sessions_per_ip",
        "50",
        A,
        "Concurrent sessions from one client IP (0: no limit).",
    ),
    k(
        "limits.max_pipeline",
        "256",
        A,
        "Outstanding commands per session before popgate stops reading that client.",
    ),
    k(
        "limits.login_timeout",
        "\"1m\"",
        A,
        "A session not logged in this long after connecting (a connect rule's delay included) is closed.",
    ),
    k(
        "limits.greeting_timeout",
        "\"30s\"",
        A,
        "An upstream that accepts but does not greet within this gets the client -ERR [SYS/TEMP].",
    ),
    k(
        "limits.login_fail_delay",
        "\"1s\"",
        A,
        "After two failed logins from one IP, each further failure reply is held back this long, doubling each time (\"0s\": no penalty).",
    ),
    k(
        "limits.login_fail_delay_max",
        "\"15s\"",
        A,
        "The longest a failure reply is held back.",
    ),
    k(
        "limits.login_fail_window",
        "\"10m\"",
        A,
        "An IP's failed logins are forgotten this long after its last one.",
    ),
    // [log]
    k(
        "log.level",
        "\"info\"",
        A,
        "error, warn, info, debug, trace, or a filter such as \"popgate=debug\"; --log-level overrides it until the next reload.",
    ),
    k("log.format", "\"text\"", A, "\"text\" or \"json\"."),
    k(
        "log.output",
        "\"file\" if dir is set, else \"stderr\"",
        A,
        "\"stderr\", \"file\", \"syslog\" or \"journald\".",
    ),
    k(
        "log.dir",
        "not set",
        A,
        "With output = \"file\": directory of the popgate.YYYY-MM-DD.log files.",
    ),
    k(
        "log.rotation",
        "\"daily\"",
        A,
        "\"daily\", \"hourly\" or \"never\".",
    ),
    k(
        "log.keep_days",
        "30",
        A,
        "Dated log files before the last this many UTC days are deleted (by the date in their name), at start and when a new file begins, never on a reopen; 0 keeps all.",
    ),
    k(
        "log.syslog_address",
        "\"/dev/log\"",
        A,
        "With output = \"syslog\": a Unix socket path, udp://host:port or tcp://host:port.",
    ),
    k(
        "log.syslog_facility",
        "\"daemon\"",
        A,
        "Any syslog facility name.",
    ),
    // [process]
    k(
        "process.user",
        "not set",
        R,
        "Switch to this user after binding the listeners (popgate must start as root).",
    ),
    k(
        "process.group",
        "the user's primary group",
        R,
        "Switch to this group.",
    ),
    // [metrics]
    k(
        "metrics.bind",
        "not set (off)",
        R,
        "HTTP endpoint for /metrics and /health; no authentication, keep it on loopback or a management network.",
    ),
    k(
        "metrics.health_window",
        "\"30s\"",
        R,
        "/health trusts an upstream connect this recent; otherwise it dials the upstream itself.",
    ),
    // [control]
    k(
        "control.socket",
        "control.sock in $RUNTIME_DIRECTORY",
        R,
        "The control socket of popgate sessions/status/kick/tap/reload (docs/control.md): a Unix socket, mode 0660, owned by the user popgate runs as. Without the [control] table there is none.",
    ),
    k(
        "control.group",
        "not set",
        R,
        "The socket's group: its members may use the control socket too (besides the owner and root).",
    ),
    // [state]
    k(
        "state.backend",
        "\"local\"",
        R,
        "Where fleet state lives: \"local\" (each instance counts for itself) or \"redis\" (the failed-login penalty, max_sessions_per_ip and the OAuth2 tokens are shared by every instance with the same url and key_prefix; see docs/fleet.md).",
    ),
    k(
        "state.url",
        "not set",
        R,
        "The Redis (or Valkey) server: redis://[user:password@]host[:port][/db], rediss://... (TLS, verified against the system's roots) or unix:///path/redis.sock. Required with backend = \"redis\".",
    ),
    k(
        "state.key_prefix",
        "\"popgate:\"",
        R,
        "Put before every key popgate writes, so that several fleets can share one Redis.",
    ),
    k(
        "state.timeout",
        "\"500ms\"",
        R,
        "The longest one store operation may take before it counts as failed.",
    ),
    k(
        "state.on_unavailable",
        "\"open\"",
        R,
        "While the store cannot be reached: \"open\" (each instance's own limits apply; a warning, the popgate_state_errors metric, /health degraded) or \"closed\" (new sessions refused while max_sessions_per_ip is set, failed logins held back login_fail_delay_max). Open sessions are never cut.",
    ),
    k(
        "state.slot_ttl",
        "\"1m\"",
        R,
        "A fleet session slot expires this long after its instance last refreshed it (every third of it): the slots of an instance that died are free again after this. At least 3s.",
    ),
    // [audit]
    k(
        "audit.enabled",
        "false",
        A,
        "Write the audit trail (JSON lines, src/audit/SCHEMA.md).",
    ),
    k(
        "audit.output",
        "\"file\"",
        A,
        "\"file\" (rotated files in dir) or \"stdout\".",
    ),
    k(
        "audit.dir",
        "not set",
        A,
        "Directory of the audit.YYYY-MM-DD.jsonl files (needed for output = \"file\").",
    ),
    k("audit.rotation", "\"daily\"", A, "\"daily\" or \"hourly\"."),
    k(
        "audit.keep_days",
        "30",
        A,
        "Audit files dated (by the date in their name, not their mtime) before the last this many UTC days are deleted, at start and when a new file begins, never on a reopen; 0 keeps all.",
    ),
    k(
        "audit.message_ids",
        "\"seen\"",
        A,
        "When a deletion records the message's Message-ID: \"seen\" (the session retrieved it) or \"always\" (popgate asks the server with TOP n 0 before the DELE of a message not retrieved).",
    ),
    k(
        "audit.queue",
        "10000",
        A,
        "Length of the bounded queue between sessions and the audit writer.",
    ),
    k(
        "audit.on_overflow",
        "\"drop\"",
        A,
        "When the queue is full: \"drop\" (counted and logged; the relay never waits) or \"block\".",
    ),
    k(
        "audit.headers",
        "[\"Message-ID\", \"From\", \"To\", \"Subject\", \"Date\"]",
        A,
        "Header fields copied into retrieve events.",
    ),
    k(
        "audit.max_header_bytes",
        "16384",
        A,
        "The header block of a retrieved message is scanned at most this far.",
    ),
    k(
        "audit.instance",
        "the host name",
        A,
        "The instance field of every event: which popgate wrote it.",
    ),
    k(
        "audit.transcript.dir",
        "not set",
        A,
        "Directory of per-session traffic transcripts (redacted).",
    ),
    k(
        "audit.transcript.listeners",
        "[]",
        A,
        "Transcribe every session accepted on these listeners.",
    ),
    k(
        "audit.transcript.networks",
        "[]",
        A,
        "Transcribe every session from these client networks.",
    ),
    k(
        "audit.transcript.full_bodies",
        "false",
        A,
        "Write message bodies in full instead of their first lines and an octet count.",
    ),
    k(
        "audit.transcript.summary_lines",
        "5",
        A,
        "In summary mode, how many body lines are written before the octet count.",
    ),
    // [[scanner]]
    k(
        "scanner.name",
        "required",
        A,
        "The name scan rules use (scan = [\"clamav\"]); unique.",
    ),
    k(
        "scanner.kind",
        "required",
        A,
        "\"clamd\" (ClamAV's daemon, INSTREAM) or \"rspamd\" (POST /checkv2).",
    ),
    k(
        "scanner.address",
        "required",
        A,
        "clamd: \"unix:/run/clamav/clamd.ctl\" or \"host:port\"; rspamd: its worker's URL, e.g. \"http://127.0.0.1:11333\".",
    ),
    k(
        "scanner.timeout",
        "\"30s\"",
        A,
        "The longest one scan may take, waiting for a scan slot included; then the verdict is error (scan.on_error). The longest a client waits for a scanned message.",
    ),
    k(
        "scanner.max_size",
        "\"25MB\"",
        A,
        "A larger message is not sent to this scanner: it is relayed unscanned and tagged (verdict too_large).",
    ),
    // [scan]
    k(
        "scan.spool_memory",
        "\"1MB\"",
        A,
        "A held message is kept in memory up to this size (at most 64MB), then in a file in spool_dir.",
    ),
    k(
        "scan.spool_dir",
        "the system temp dir",
        A,
        "Where larger held messages go: a 0600 file, unlinked as soon as it is created (so nothing is left behind); created (0700) when first needed.",
    ),
    k(
        "scan.on_virus",
        "\"replace\"",
        A,
        "An infected message: \"replace\" (a notice instead; the original stays on the server), \"tag\" (relayed with X-Popgate-Scan) or \"deny\" (-ERR).",
    ),
    k(
        "scan.on_spam",
        "\"tag\"",
        A,
        "A spam message: \"tag\" (X-Spam-Status and X-Spam-Score added) or \"replace\" (a notice instead).",
    ),
    k(
        "scan.on_error",
        "\"tempfail\"",
        A,
        "A scanner down, timed out or confused: \"tempfail\" (-ERR [SYS/TEMP], the client retries later) or \"pass\" (relayed unscanned and tagged).",
    ),
    k(
        "scan.header",
        "false",
        A,
        "Add an X-Popgate-Scan header line to every scanned message, clean ones too.",
    ),
    k(
        "scan.max_concurrent",
        "16",
        A,
        "At most this many scans at once (per scanner and message, process-wide; 1 to 65536); more wait within their scanner's timeout.",
    ),
    k(
        "scan.notice_from",
        "\"MAILER-DAEMON\"",
        A,
        "The From: of the notice that replaces an infected or spam message (on_virus/on_spam = \"replace\").",
    ),
    k(
        "scan.contact",
        "\"your mail administrator\"",
        A,
        "Whom the notice tells its reader to ask for the original (an address, a URL, a team).",
    ),
];

/// The entry of a dotted key.
pub fn key(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.key == name)
}

/// The table (section) a key belongs to, as the man page heads it.
fn section_of(key: &str) -> &'static str {
    const TABLES: &[(&str, &str)] = &[
        ("listener.", "[[listener]]"),
        ("upstream.oauth2.", "[upstream.oauth2]"),
        ("upstream.", "[upstream] and [[upstream]]"),
        ("routing.", "[routing]"),
        ("tls.certificate.", "[[tls.certificate]]"),
        ("tls.", "[tls]"),
        ("limits.", "[limits]"),
        ("log.", "[log]"),
        ("process.", "[process]"),
        ("metrics.", "[metrics]"),
        ("control.", "[control]"),
        ("state.", "[state]"),
        ("audit.transcript.", "[audit.transcript]"),
        ("scanner.", "[[scanner]]"),
        ("scan.", "[scan]"),
        ("audit.", "[audit]"),
    ];
    TABLES
        .iter()
        .find(|(p, _)| key.starts_with(p))
        .map_or("TOP-LEVEL KEYS", |(_, t)| t)
}

/// Escape text for roff: backslashes, and a leading `.` or `'` that would read as a request.
fn roff(text: &str) -> String {
    let t = text.replace('\\', "\\e").replace('-', "\\-");
    if t.starts_with('.') || t.starts_with('\'') {
        format!("\\&{t}")
    } else {
        t
    }
}

/// `popgate.toml(5)`: every key with its default and reload behaviour, in roff.
pub fn man_page(version: &str) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        ".TH POPGATE.TOML 5 \"\" \"popgate {}\" \"File Formats\"\n",
        roff(version)
    ));
    out.push_str(".SH NAME\npopgate.toml \\- configuration file of popgate, the POP3 proxy\n");
    out.push_str(
        ".SH DESCRIPTION\n\
         popgate reads one TOML file, given with \\fB\\-\\-config\\fR. Unknown keys are errors. \
         Durations take units (\"500ms\", \"10s\", \"10m\", \"1h\"). Relative file paths are \
         relative to the config file. Top\\-level keys must come before the first table.\n\
         .PP\n\
         \\fBpopgate check \\-\\-print \\-\\-config\\fR \\fIFILE\\fR prints the effective \
         configuration with every default filled in.\n\
         .PP\n\
         A reload (SIGHUP or \\fBpopgate reload\\fR) applies the whole file or nothing. Keys \
         marked \\fIrestart\\fR are read at start only; a reload that changes them says they \
         need a restart. Open sessions keep the settings they started with.\n",
    );
    let mut current = "";
    for key in KEYS {
        let section = section_of(key.key);
        if section != current {
            out.push_str(&format!(".SH \"{}\"\n", roff(section)));
            current = section;
        }
        let short = key.key.rsplit('.').next().unwrap_or(key.key);
        let reload = match key.reload {
            Reload::Applied => "reload",
            Reload::Restart => "restart",
        };
        out.push_str(&format!(
            ".TP\n\\fB{}\\fR (default: {}; {})\n{}\n",
            roff(short),
            roff(key.default),
            reload,
            roff(key.doc)
        ));
    }
    out.push_str(
        ".SH FILES\n/etc/popgate/popgate.toml\n\
         .SH SEE ALSO\n\\fBpopgate\\fR(1), \\fBpopgate\\-check\\fR(1), \\fBpopgate\\-reload\\fR(1)\n",
    );
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn the_man_page_has_every_key_and_a_valid_header() {
        let page = man_page("1.2.3");
        assert!(page.starts_with(".TH POPGATE.TOML 5"));
        for k in KEYS {
            let short = k.key.rsplit('.').next().unwrap();
            assert!(
                page.contains(&format!("\\fB{}\\fR (default: ", roff(short))),
                "{} missing",
                k.key
            );
        }
        // No line may start with a stray roff request from the text.
        for line in page.lines() {
            if let Some(rest) = line.strip_prefix('.') {
                let req = rest.split_whitespace().next().unwrap_or("");
                assert!(
                    ["TH", "SH", "TP", "PP"].contains(&req),
                    "stray request: {line}"
                );
            }
        }
    }
}
