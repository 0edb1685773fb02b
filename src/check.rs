//! What `popgate check`, the start and every reload verify beyond [`Config::validate`], in one
//! place so that the three agree: directories popgate writes to, certificates (readable, key
//! matching, not expired; a warning within [`EXPIRY_WARNING`]), rule files (an empty wildcard is a
//! warning), trace rules with nowhere to write. [`prepare`] loads everything a config names
//! without starting anything; [`effective_toml`] prints the config with defaults filled in.

use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{Config, ConfigError};
use crate::net::listener::BindError;
use crate::net::tls::{self, TlsError, TlsSetup};
use crate::rules::{self, RuleError, RuleSet};

/// A certificate that expires sooner than this is reported (a warning, not an error).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// Starting or reloading the proxy failed; nothing was started or changed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Certificates or keys could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The audit trail could not be opened.
    #[error("audit: {0}")]
    Audit(#[from] crate::audit::SinkError),
    /// Rule files could not be loaded.
    #[error(transparent)]
    Rules(#[from] RuleError),
    /// The new log settings could not be applied.
    #[error("log: {0}")]
    Log(String),
    /// The routing map file is unreadable or wrong (file:line).
    #[error(transparent)]
    Map(#[from] crate::routing::MapError),
    /// The `[metrics]` endpoint could not bind.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::http::MetricsBindError),
    /// The `[state]` store could not be set up.
    #[error("state: {0}")]
    State(#[from] crate::state::StoreError),
    /// A `[[scanner]]` cannot be used.
    #[error(transparent)]
    Scanner(#[from] crate::scan::ScannerError),
}

/// Everything a config names, loaded and checked; nothing started yet.
#[derive(Debug)]
pub(crate) struct Prepared {
    /// The config.
    pub(crate) config: Config,
    /// Its certificates and upstream TLS client.
    pub(crate) tls: TlsSetup,
    /// Its rules.
    pub(crate) rules: RuleSet,
    /// Its routing map file (`[routing] map`), parsed.
    pub(crate) routes: Option<crate::routing::RouteMap>,
    /// What `check` warns about (expiring certificates, empty rule globs).
    pub(crate) warnings: Vec<String>,
    /// The OAuth2 bridges of upstreams with `[upstream.oauth2]` (secrets and credentials read).
    pub(crate) oauth2: crate::oauth2::Bridges,
    /// Hashes of the files the config names, to tell a reload what changed on disk.
    pub(crate) files: FileHashes,
    /// The content scanners (`[[scanner]]`), when there are any.
    pub(crate) scanners: Option<crate::scan::Scanners>,
}

/// Hashes of the contents of referenced files (certificates and keys; rule files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct FileHashes {
    /// `[tls]` and `[upstream]` certificate, key and CA files.
    pub(crate) certs: u64,
    /// Rule files, in load order.
    pub(crate) rules: u64,
    /// The routing map file.
    pub(crate) map: u64,
    /// The OAuth2 bridges' `credentials_file`s (local users and their hashes).
    pub(crate) credentials: u64,
}

/// Check `config` (already validated) as `popgate run` would use it and load what it names;
/// `path` is the config file, used in messages. Touches the file system only to probe that
/// directories are writable.
pub(crate) fn prepare(config: Config, path: &Path) -> Result<Prepared, StartError> {
    config.check_dirs(path)?;
    let mut warnings = Vec::new();
    certificates(&config, path, SystemTime::now(), &mut warnings)?;
    let tls = TlsSetup::new(&config)?;
    let rules = RuleSet::load(&config.rules, &config.base_dir)?;
    warnings.extend(rules.warnings().iter().cloned());
    check_trace_rules(&config, &rules)?;
    check_route_rules(&config, &rules, path)?;
    check_scan_rules(&config, &rules, path)?;
    warnings.extend(scan_rules_without_top(&rules));
    warnings.extend(connect_delays_past_login_timeout(&config, &rules));
    if config
        .upstreams
        .iter()
        .any(|u| u.user_names == crate::config::UserNames::Fold)
    {
        for (file, rule, pattern) in rules.user_patterns_with_capitals() {
            warnings.push(format!(
                "{}: rule {rule:?}: user = {pattern:?} has capital letters, but user names are \
                 compared lowercased (upstream.user_names = \"fold\", the default, as \
                 Dovecot): it may never match; write it in lower case or with (?i)",
                file.display()
            ));
        }
    }
    let map_file = config.routing.as_ref().and_then(|r| r.map.clone());
    let routes = match &map_file {
        Some(m) => Some(crate::routing::RouteMap::load(m, &config)?),
        None => None,
    };
    let oauth2 = crate::oauth2::from_config(&config, path, &mut warnings)?;
    let scanners = if config.scanners.is_empty() {
        None
    } else {
        Some(crate::scan::Scanners::new(&config.scanners, &config.scan)?)
    };
    let files = FileHashes {
        certs: hash_files(cert_files(&config)),
        rules: hash_files(rules.files().iter()),
        map: hash_files(map_file.iter()),
        credentials: hash_files(credential_files(&config).iter()),
    };
    Ok(Prepared {
        config,
        tls,
        rules,
        routes,
        warnings,
        oauth2,
        files,
        scanners,
    })
}

/// The directory of `pid_file` is writable (or can be created). Checked by `popgate check`
/// and at start, not by a reload: the file is written once, at start (as root before a
/// privilege drop), and a reload does not move it.
pub(crate) fn check_pid_dir(config: &Config, path: &Path) -> Result<(), ConfigError> {
    if let Some(pid) = &config.pid_file {
        let dir = match pid.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        crate::config::writable_dir(dir).map_err(|reason| ConfigError::Invalid {
            path: path.to_owned(),
            key: "pid_file".into(),
            reason,
        })?;
    }
    Ok(())
}

/// `route` rules need routing mode and an upstream of the name they give.
fn check_route_rules(config: &Config, rules: &RuleSet, path: &Path) -> Result<(), ConfigError> {
    for (file, rule, upstream) in rules.routes_in_files() {
        let file = file.display();
        let reason = if !config.routing_mode() {
            format!(
                "{file}: rule {rule:?} routes to {upstream:?}, but routing mode is off (add \
                 [routing] or more upstreams)"
            )
        } else if config.upstream_index(upstream).is_none() {
            format!("{file}: rule {rule:?} routes to {upstream:?}: no upstream has that name")
        } else {
            continue;
        };
        return Err(ConfigError::Invalid {
            path: path.to_owned(),
            key: "rules".into(),
            reason,
        });
    }
    Ok(())
}

/// A warning for each `scan` rule that scans `RETR` but not `TOP`: a client reads a whole
/// message unscanned with `TOP n 999999`.
fn scan_rules_without_top(rules: &RuleSet) -> Vec<String> {
    rules
        .scan_rules_without_top()
        .map(|(file, rule)| {
            format!(
                "{}: rule {rule:?} scans RETR but not TOP: `TOP n 999999` retrieves a whole \
                 message unscanned; add \"TOP\" to its verbs",
                file.display()
            )
        })
        .collect()
}

/// A warning for each `connect` rule whose delay reaches `limits.login_timeout`: that timeout
/// counts from the connect, so every session the rule delays ends at the greeting, unanswered.
fn connect_delays_past_login_timeout(config: &Config, rules: &RuleSet) -> Vec<String> {
    let timeout = config.limits.login_timeout;
    rules
        .connect_delays()
        .filter(|(_, _, d)| *d >= timeout)
        .map(|(file, rule, d)| {
            format!(
                "{}: rule {rule:?} delays connections by {d:?}, not less than                  limits.login_timeout ({timeout:?}), which counts from the connect: every                  session it delays is closed before its greeting",
                file.display()
            )
        })
        .collect()
}

/// `scan` rules name `[[scanner]]` entries.
fn check_scan_rules(config: &Config, rules: &RuleSet, path: &Path) -> Result<(), ConfigError> {
    for (file, rule, scanner) in rules.scanners_in_files() {
        if config.scanners.iter().any(|s| s.name == scanner) {
            continue;
        }
        return Err(ConfigError::Invalid {
            path: path.to_owned(),
            key: "rules".into(),
            reason: format!(
                "{}: rule {rule:?} scans with {scanner:?}: no [[scanner]] has that name",
                file.display()
            ),
        });
    }
    Ok(())
}

/// The config as TOML with every default filled in (`popgate check --print`): `log.output`
/// and `audit.instance` as they take effect, paths and rule patterns absolute (joined to the
/// config's directory), so it loads back to the same config from any directory. Keys without
/// a value (`pid_file`, `[metrics]` when off, ...) are listed in a closing comment with their
/// defaults from [`crate::reference::KEYS`].
pub fn effective_toml(config: &Config) -> Result<String, String> {
    let mut c = config.clone();
    let base = std::path::absolute(&c.base_dir).unwrap_or_else(|_| c.base_dir.clone());
    c.resolve_paths(&base);
    for pattern in &mut c.rules {
        if Path::new(pattern).is_relative() {
            let joined: std::path::PathBuf = base.join(&*pattern).components().collect();
            *pattern = joined.to_string_lossy().into_owned();
        }
    }
    c.log.output = Some(c.log.effective_output());
    c.audit.instance = Some(c.audit.instance_name());
    let text = toml::to_string(&c).map_err(|e| e.to_string())?;
    let value: toml::Table = toml::from_str(&text).map_err(|e| e.to_string())?;
    let mut unset = String::new();
    let mut absent_tables: Vec<&str> = Vec::new();
    for key in crate::reference::KEYS {
        if has_key(&value, key.key) {
            continue;
        }
        // A table that is not there at all (`[routing]`, `[upstream.oauth2]`) is named once.
        match key.key.rsplit_once('.') {
            Some((table, _)) if !has_table(&value, table) => {
                if !absent_tables.contains(&table) {
                    absent_tables.push(table);
                    unset.push_str(&format!("#   [{table}]: not set\n"));
                }
            }
            _ if key.default == "not set" => {
                unset.push_str(&format!("#   {}: not set\n", key.key));
            }
            _ => unset.push_str(&format!(
                "#   {}: not set (default: {})\n",
                key.key, key.default
            )),
        }
    }
    if unset.is_empty() {
        return Ok(text);
    }
    Ok(format!("{text}\n# Not set here:\n{unset}"))
}

/// The tables at a dotted path (`""`: `table` itself), every entry of an array of tables
/// counted.
fn tables_at<'a>(table: &'a toml::Table, path: &str) -> Vec<&'a toml::Table> {
    if path.is_empty() {
        return vec![table];
    }
    let (head, rest) = path.split_once('.').unwrap_or((path, ""));
    let entries: Vec<&toml::Table> = match table.get(head) {
        Some(toml::Value::Table(t)) => vec![t],
        Some(toml::Value::Array(items)) => items.iter().filter_map(toml::Value::as_table).collect(),
        _ => Vec::new(),
    };
    entries
        .into_iter()
        .flat_map(|t| tables_at(t, rest))
        .collect()
}

/// Whether a dotted table path is there as a table or a non-empty array of tables.
fn has_table(table: &toml::Table, path: &str) -> bool {
    !tables_at(table, path).is_empty()
}

/// Whether a dotted key has a value in `table` (in any entry of an array of tables).
fn has_key(table: &toml::Table, key: &str) -> bool {
    let (path, leaf) = key.rsplit_once('.').unwrap_or(("", key));
    tables_at(table, path).iter().any(|t| t.contains_key(leaf))
}

/// A certificate file the config names: its config key, the file, and its key file (with
/// that one's config key) unless it is a CA file.
type CertEntry<'a> = (String, &'a PathBuf, Option<(String, &'a PathBuf)>);

/// Each certificate the config names.
fn cert_entries(config: &Config) -> Vec<CertEntry<'_>> {
    let mut out = Vec::new();
    if let Some(t) = &config.tls {
        if let (Some(c), Some(k)) = (&t.cert, &t.key) {
            out.push(("tls.cert".into(), c, Some(("tls.key".into(), k))));
        }
        for (i, c) in t.certificates.iter().enumerate() {
            out.push((
                format!("tls.certificate[{i}].cert"),
                &c.cert,
                Some((format!("tls.certificate[{i}].key"), &c.key)),
            ));
        }
    }
    let many = config.upstreams.len() > 1;
    for (i, u) in config.upstreams.iter().enumerate() {
        let key = |k: &str| {
            if many {
                format!("upstream[{i}].{k}")
            } else {
                format!("upstream.{k}")
            }
        };
        if let (Some(c), Some(k)) = (&u.client_cert, &u.client_key) {
            out.push((key("client_cert"), c, Some((key("client_key"), k))));
        }
        if let Some(ca) = &u.ca_file {
            out.push((key("ca_file"), ca, None));
        }
    }
    out
}

fn cert_files(config: &Config) -> impl Iterator<Item = &PathBuf> {
    cert_entries(config)
        .into_iter()
        .flat_map(|(_, c, k)| std::iter::once(c).chain(k.map(|(_, k)| k)))
        .collect::<Vec<_>>()
        .into_iter()
}

fn credential_files(config: &Config) -> Vec<PathBuf> {
    config
        .upstreams
        .iter()
        .filter_map(|u| {
            u.oauth2
                .as_ref()
                .map(|o| config.base_dir.join(&o.credentials_file))
        })
        .collect()
}

fn hash_files<'a>(files: impl Iterator<Item = &'a PathBuf>) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        f.hash(&mut h);
        std::fs::read(f).unwrap_or_default().hash(&mut h);
    }
    h.finish()
}

/// Every certificate readable, matching its key and valid at `now`; one expiring within
/// [`EXPIRY_WARNING`] is a warning. Errors name the config key.
fn certificates(
    config: &Config,
    path: &Path,
    now: SystemTime,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let invalid = |key: &str, reason: String| ConfigError::Invalid {
        path: path.to_owned(),
        key: key.to_owned(),
        reason,
    };
    for (key, cert, pair) in cert_entries(config) {
        let chain = tls::load_certs(cert).map_err(|e| invalid(&key, e.to_string()))?;
        if let Some((key_key, key_file)) = &pair {
            // An unreadable key (e.g. 0600 root after `[process] user`'s switch, at a
            // reload) is that, not a key of another certificate.
            if let Err(e) = std::fs::File::open(key_file) {
                return Err(invalid(key_key, unreadable(config, key_file, &e)));
            }
            tls::check_pair(cert, key_file).map_err(|e| {
                invalid(
                    key_key,
                    format!(
                        "{} does not go with the certificate {} ({key}): {e}",
                        key_file.display(),
                        cert.display()
                    ),
                )
            })?;
        }
        // The leaf (first) certificate; for a CA file every one counts.
        let checked = if pair.is_some() {
            &chain[..1]
        } else {
            &chain[..]
        };
        for der in checked {
            let Ok((_, x509)) = x509_parser::parse_x509_certificate(der) else {
                return Err(invalid(
                    &key,
                    format!("{}: not a valid X.509 certificate", cert.display()),
                ));
            };
            let not_after = x509.validity().not_after.timestamp();
            let expiry = UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64);
            let when = humantime::format_rfc3339_seconds(expiry);
            let subject = x509.subject().to_string();
            match expiry.duration_since(now) {
                Err(_) => {
                    return Err(invalid(
                        &key,
                        format!(
                            "{}: certificate `{subject}` expired on {when}",
                            cert.display()
                        ),
                    ));
                }
                Ok(left) if left < EXPIRY_WARNING => warnings.push(format!(
                    "{}: key `{key}`: {}: certificate `{subject}` expires on {when} (in {} days)",
                    path.display(),
                    cert.display(),
                    left.as_secs() / 86_400
                )),
                Ok(_) => {}
            }
        }
    }
    Ok(())
}

/// Why `file` cannot be read, with a hint when popgate runs as `[process] user` already (a
/// reload after the switch).
fn unreadable(config: &Config, file: &Path, e: &std::io::Error) -> String {
    let dropped = config.process.user.is_some() && !nix::unistd::geteuid().is_root();
    if dropped && e.kind() == std::io::ErrorKind::PermissionDenied {
        format!(
            "{}: cannot read it: {e} (popgate runs as process.user {:?} since the start: make \
             it readable for that user, e.g. mode 0640 with the user's group)",
            file.display(),
            config.process.user.as_deref().unwrap_or_default()
        )
    } else {
        format!("{}: cannot read it: {e}", file.display())
    }
}

/// The files a reload reads again, by config key: the config file itself, certificates,
/// keys and CA files, rule files, the routing map. `rules` are the loaded rule files.
pub(crate) fn reread_files<'a>(
    config: &'a Config,
    path: &'a Path,
    rules: &'a [PathBuf],
) -> Vec<(String, &'a Path)> {
    let mut out: Vec<(String, &Path)> = vec![("the config file".into(), path)];
    for (key, cert, pair) in cert_entries(config) {
        out.push((key, cert.as_path()));
        if let Some((k, f)) = pair {
            out.push((k, f.as_path()));
        }
    }
    out.extend(rules.iter().map(|f| ("rules".to_owned(), f.as_path())));
    if let Some(m) = config.routing.as_ref().and_then(|r| r.map.as_deref()) {
        out.push(("routing.map".into(), m));
    }
    out
}

/// A `trace` rule needs somewhere to write transcripts.
fn check_trace_rules(config: &Config, rules: &RuleSet) -> Result<(), StartError> {
    if config.audit.transcript.dir.is_none()
        && let Some(r) = rules.rules().find(|r| r.action == rules::RuleAction::Trace)
    {
        return Err(ConfigError::Invalid {
            path: r.file.to_owned(),
            key: "audit.transcript.dir".into(),
            reason: format!(
                "rule `{}` starts transcripts, but no transcript dir is set",
                r.name
            ),
        }
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `localhost` valid until 2030-01-01, and its key, written
    /// to `dir` as `name.crt` / `name.key`.
    fn cert(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2030, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn config(extra: &str) -> Config {
        let text = format!(
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\n\
             [upstream]\naddress = \"127.0.0.1:110\"\n{extra}"
        );
        Config::parse(&text, Path::new("t.toml")).unwrap()
    }

    fn at(date: &str) -> SystemTime {
        humantime::parse_rfc3339(date).unwrap()
    }

    #[test]
    fn certificate_dates_and_keys_name_the_config_key() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1) = cert(dir.path(), "one");
        let (c2, k2) = cert(dir.path(), "two");
        let good = config(&format!(
            "[tls]\ncert = {c1:?}\nkey = {k1:?}\n\
             [[tls.certificate]]\nserver_names = [\"x\"]\ncert = {c2:?}\nkey = {k2:?}\n"
        ));
        let p = Path::new("t.toml");
        let mut w = Vec::new();
        certificates(&good, p, at("2029-01-01T00:00:00Z"), &mut w).unwrap();
        assert!(w.is_empty(), "{w:?}");
        // Within 30 days of the end: a warning for each, naming the key.
        certificates(&good, p, at("2029-12-22T00:00:00Z"), &mut w).unwrap();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("`tls.cert`") && w[0].contains("2030-01-01"),
            "{w:?}"
        );
        assert!(w[1].contains("`tls.certificate[0].cert`"), "{w:?}");
        assert!(w[0].contains("in 10 days"), "{w:?}");
        // Past the end: an error.
        let e = certificates(&good, p, at("2030-01-02T00:00:00Z"), &mut w)
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `tls.cert`") && e.contains("expired"), "{e}");
        // A key of another certificate: the key's config key is named.
        let mixed = config(&format!(
            "[tls]\ncert = {c1:?}\nkey = {k1:?}\n\
             [[tls.certificate]]\nserver_names = [\"x\"]\ncert = {c2:?}\nkey = {k1:?}\n"
        ));
        let e = certificates(&mixed, p, at("2029-01-01T00:00:00Z"), &mut w)
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `tls.certificate[0].key`"), "{e}");
        assert!(e.contains("tls.certificate[0].cert"), "{e}");
    }

    #[test]
    fn a_scan_rule_for_retr_without_top_is_warned_about() {
        let load = |verbs: &str| {
            RuleSet::parse(
                &format!(
                    "[[rule]]\nname = \"s\"\non = \"command\"\n{verbs}action = \"scan\"\n\
                     scan = [\"clamav\"]\n"
                ),
                Path::new("r.toml"),
            )
            .unwrap()
        };
        let w = scan_rules_without_top(&load("verbs = [\"RETR\"]\n"));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("rule \"s\" scans RETR but not TOP"), "{w:?}");
        assert!(scan_rules_without_top(&load("verbs = [\"RETR\", \"TOP\"]\n")).is_empty());
        assert!(
            scan_rules_without_top(&load("")).is_empty(),
            "no verbs: every verb"
        );
        assert!(scan_rules_without_top(&load("verbs = [\"TOP\"]\n")).is_empty());
    }

    #[test]
    fn a_connect_delay_as_long_as_the_login_timeout_is_warned_about() {
        let rules = RuleSet::parse(
            "[[rule]]\nname = \"slow\"\non = \"connect\"\naction = \"delay\"\n\
             delay = \"60s\"\n\
             [[rule]]\nname = \"stat\"\non = \"command\"\naction = \"delay\"\n\
             delay = \"10m\"\n",
            Path::new("r.toml"),
        )
        .unwrap();
        let w = connect_delays_past_login_timeout(&config(""), &rules);
        assert_eq!(w.len(), 1, "the default 1m: {w:?}");
        assert!(
            w[0].starts_with("r.toml: rule \"slow\" delays connections by 60s"),
            "{w:?}"
        );
        let longer = config("[limits]\nlogin_timeout = \"61s\"\n");
        assert!(connect_delays_past_login_timeout(&longer, &rules).is_empty());
    }

    #[test]
    fn scan_rules_must_name_configured_scanners() {
        let rules = RuleSet::parse(
            "[[rule]]\nname = \"s\"\non = \"command\"\naction = \"scan\"\n\
             scan = [\"clamav\", \"rspamd\"]\n",
            Path::new("r.toml"),
        )
        .unwrap();
        let one =
            config("[[scanner]]\nname = \"clamav\"\nkind = \"clamd\"\naddress = \"unix:/x\"\n");
        let e = check_scan_rules(&one, &rules, Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("r.toml: rule \"s\" scans with \"rspamd\": no [[scanner]]"),
            "{e}"
        );
        let both = config(
            "[[scanner]]\nname = \"clamav\"\nkind = \"clamd\"\naddress = \"unix:/x\"\n\
             [[scanner]]\nname = \"rspamd\"\nkind = \"rspamd\"\n\
             address = \"http://127.0.0.1:11333\"\n",
        );
        check_scan_rules(&both, &rules, Path::new("t.toml")).unwrap();
    }

    #[test]
    fn effective_config_round_trips_with_defaults() {
        let c = config("[limits]\nmax_sessions = 7\n");
        let text = effective_toml(&c).unwrap();
        assert!(text.contains("max_sessions = 7"), "{text}");
        assert!(
            text.contains("idle_timeout = \"10m\""),
            "defaults filled in: {text}"
        );
        assert!(text.contains("shutdown_grace = \"30s\""), "{text}");
        let back = Config::parse(&text, Path::new("printed.toml")).unwrap();
        back.validate(Path::new("printed.toml")).unwrap();
        assert_eq!(effective_toml(&back).unwrap(), text);
    }
}

#[cfg(test)]
/// `src/reference.rs` against what the parser and `check --print` do: the reference names
/// exactly the keys a config can set, and its TOML defaults are the ones filled in.
mod reference_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeSet;
    use std::path::Path;

    use super::effective_toml;
    use crate::config::Config;
    use crate::reference::KEYS;

    /// Every leaf key path of a printed config, `[[x]]` entries folded to `x`.
    fn leaf_keys(value: &toml::Value, prefix: &str, out: &mut BTreeSet<String>) {
        match value {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    leaf_keys(v, &path, out);
                }
            }
            toml::Value::Array(items)
                if items.iter().all(toml::Value::is_table) && !items.is_empty() =>
            {
                for item in items {
                    leaf_keys(item, prefix, out);
                }
            }
            _ => {
                out.insert(prefix.to_owned());
            }
        }
    }

    /// What `check --print` prints for `text`, parsed back.
    fn printed(text: &str) -> toml::Value {
        let mut c = Config::parse(text, Path::new("t.toml")).expect("parses");
        c.resolve_paths(Path::new("/etc/popgate"));
        toml::from_str(&effective_toml(&c).expect("prints")).expect("printed TOML parses")
    }

    /// A config that sets every key popgate knows.
    const EVERY_KEY: &str = r#"
rules = ["r.toml"]
pid_file = "/run/popgate/popgate.pid"
shutdown_grace = "5s"
[[listener]]
name = "pop3"
bind = "127.0.0.1:1110"
tls = "starttls"
proxy_protocol = true
trusted_proxies = ["10.0.0.1"]
proxy_timeout = "2s"
[[upstream]]
name = "a"
address = ["127.0.0.1:110"]
dead_for = "5s"
tls = "starttls"
connect_timeout = "5s"
ca_file = "ca.pem"
server_name = "mail"
client_cert = "c.pem"
client_key = "k.pem"
verify = true
forward_client = "xclient"
user_names = "exact"
[upstream.oauth2]
token_url = "https://idp/token"
client_id = "id"
client_secret_file = "secret"
client_secret_env = "SECRET"
grant = "refresh_token"
scope = "pop"
mechanism = "oauthbearer"
tokens_file = "tokens.toml"
credentials_file = "users.toml"
device_authorization_url = "https://idp/device"
refresh_ahead = "30s"
max_concurrent_verifications = 4
allow_insecure_token_url = true
[[upstream]]
name = "b"
address = "127.0.0.1:111"
[routing]
default = "a"
map = "users.map"
greeting = "hi"
[tls]
cert = "c.pem"
key = "k.pem"
handshake_timeout = "5s"
[[tls.certificate]]
server_names = ["mail.example.org"]
cert = "c2.pem"
key = "k2.pem"
[limits]
idle_timeout = "5m"
max_line = 4096
unknown_commands = "single-line"
max_sessions = 10
max_sessions_per_ip = 5
max_pipeline = 16
login_timeout = "30s"
greeting_timeout = "10s"
login_fail_delay = "2s"
login_fail_delay_max = "10s"
login_fail_window = "5m"
[log]
level = "debug"
format = "json"
output = "file"
dir = "/var/log/popgate"
rotation = "hourly"
keep_days = 14
syslog_address = "/dev/log"
syslog_facility = "mail"
[process]
user = "popgate"
group = "popgate"
[metrics]
bind = "127.0.0.1:9110"
health_window = "10s"
[control]
socket = "/run/popgate/control.sock"
group = "popgate"
[state]
backend = "redis"
url = "redis://127.0.0.1:6379/0"
key_prefix = "mail:"
timeout = "1s"
on_unavailable = "closed"
slot_ttl = "30s"
[audit]
enabled = true
output = "file"
dir = "/var/log/popgate/audit"
rotation = "hourly"
keep_days = 7
message_ids = "always"
queue = 100
on_overflow = "block"
headers = ["Subject"]
max_header_bytes = 4096
instance = "edge-1"
[audit.transcript]
dir = "/var/log/popgate/t"
listeners = ["pop3"]
networks = ["127.0.0.0/8"]
full_bodies = true
summary_lines = 3
[[scanner]]
name = "clamav"
kind = "clamd"
address = "unix:/run/clamav/clamd.ctl"
timeout = "20s"
max_size = "10MB"
[scan]
spool_memory = "2MB"
spool_dir = "/var/spool/popgate"
on_virus = "deny"
on_spam = "replace"
on_error = "pass"
header = true
max_concurrent = 8
notice_from = "Mail Proxy <postmaster@example.org>"
contact = "postmaster@example.org"
"#;

    #[test]
    fn the_reference_names_exactly_the_keys_check_print_prints() {
        let mut printed_keys = BTreeSet::new();
        leaf_keys(&printed(EVERY_KEY), "", &mut printed_keys);
        let documented: BTreeSet<String> = KEYS.iter().map(|k| k.key.to_owned()).collect();
        let undocumented: Vec<_> = printed_keys.difference(&documented).collect();
        let unknown: Vec<_> = documented.difference(&printed_keys).collect();
        assert!(
            undocumented.is_empty(),
            "keys printed but not in src/reference.rs: {undocumented:?}"
        );
        assert!(
            unknown.is_empty(),
            "keys in src/reference.rs that a config setting every key does not print: {unknown:?}"
        );
        assert_eq!(documented.len(), KEYS.len(), "a key is listed twice");
    }

    /// Every key the parser accepts, table by table, read from its own "unknown field, expected
    /// one of ..." message: a key added to a config struct but not to the reference (or to
    /// `EVERY_KEY`) fails here even when it is skipped in the printed output.
    #[test]
    fn the_reference_names_every_key_the_parser_accepts() {
        const BASE: &str = "[[listener]]\nname = \"p\"\nbind = \"127.0.0.1:1110\"\n";
        let tables: &[(&str, &str)] = &[
            (
                "",
                "zzz = 1\n[[listener]]\nname = \"p\"\nbind = \"127.0.0.1:1110\"\n",
            ),
            (
                "listener",
                "[[listener]]\nname = \"p\"\nbind = \"127.0.0.1:1110\"\nzzz = 1\n",
            ),
            ("upstream", "[upstream]\naddress = \"a:1\"\nzzz = 1\n"),
            (
                "upstream.oauth2",
                "[upstream]\naddress = \"a:1\"\n[upstream.oauth2]\nzzz = 1\n",
            ),
            ("routing", "[routing]\nzzz = 1\n"),
            ("tls", "[tls]\nzzz = 1\n"),
            ("tls.certificate", "[[tls.certificate]]\nzzz = 1\n"),
            ("limits", "[limits]\nzzz = 1\n"),
            ("log", "[log]\nzzz = 1\n"),
            ("process", "[process]\nzzz = 1\n"),
            ("metrics", "[metrics]\nzzz = 1\n"),
            ("control", "[control]\nzzz = 1\n"),
            ("state", "[state]\nzzz = 1\n"),
            ("audit", "[audit]\nzzz = 1\n"),
            ("audit.transcript", "[audit.transcript]\nzzz = 1\n"),
            ("scanner", "[[scanner]]\nzzz = 1\n"),
            ("scan", "[scan]\nzzz = 1\n"),
        ];
        // Fields that are tables of their own, checked in their own entry above.
        let sub_tables = [
            "listener",
            "upstream",
            "routing",
            "tls",
            "limits",
            "log",
            "process",
            "metrics",
            "control",
            "state",
            "audit",
            "upstream.oauth2",
            "tls.certificate",
            "audit.transcript",
            "scanner",
            "scan",
        ];
        let mut accepted = BTreeSet::new();
        for (table, text) in tables {
            let text = if table.is_empty() || *table == "listener" {
                (*text).to_owned()
            } else {
                format!("{BASE}{text}")
            };
            let err = Config::parse(&text, Path::new("t.toml"))
                .expect_err("zzz is refused")
                .to_string();
            let list = err
                .split_once("expected one of ")
                .or_else(|| err.split_once("expected "))
                .unwrap_or_else(|| panic!("{table}: no list of fields in {err}"))
                .1;
            let fields: Vec<&str> = list.split('`').skip(1).step_by(2).collect();
            assert!(!fields.is_empty(), "{table}: {err}");
            for field in fields {
                let key = if table.is_empty() {
                    field.to_owned()
                } else {
                    format!("{table}.{field}")
                };
                if sub_tables.contains(&key.as_str()) {
                    continue;
                }
                assert!(
                    KEYS.iter().any(|k| k.key == key),
                    "the parser accepts `{key}` but src/reference.rs does not name it"
                );
                accepted.insert(key);
            }
        }
        let unknown: Vec<_> = KEYS
            .iter()
            .filter(|k| !accepted.contains(k.key))
            .map(|k| k.key)
            .collect();
        assert!(
            unknown.is_empty(),
            "in src/reference.rs, not accepted: {unknown:?}"
        );
    }

    #[test]
    fn documented_defaults_are_the_defaults_check_print_shows() {
        let minimal = "[[listener]]\nname = \"p\"\nbind = \"127.0.0.1:1110\"\n\
                       [upstream]\naddress = \"127.0.0.1:110\"\n\
                       [tls]\n[routing]\n[metrics]\nbind = \"127.0.0.1:9110\"\n";
        let mut keys = BTreeSet::new();
        let value = printed(minimal);
        leaf_keys(&value, "", &mut keys);
        let mut checked = 0;
        for k in KEYS {
            // Defaults written as TOML values (not phrases such as "not set").
            let Ok(expected) = toml::from_str::<toml::Table>(&format!("v = {}", k.default)) else {
                continue;
            };
            // Tables the minimal config leaves out (`[upstream.oauth2]`) have no defaults to show.
            let mut at = Some(&value);
            for part in k.key.split('.') {
                at = match at {
                    Some(toml::Value::Array(a)) => a.first().and_then(|t| t.get(part)),
                    Some(v) => v.get(part),
                    None => None,
                };
            }
            let Some(at) = at else { continue };
            assert_eq!(&expected["v"], at, "{}: documented default", k.key);
            checked += 1;
        }
        assert!(checked > 40, "only {checked} defaults compared");
    }
}

#[cfg(test)]
mod print_round_trip {
    use super::*;

    /// Every kind of config `check --print` may meet (routing, the OAuth2 bridge, several
    /// upstreams, SNI certificates, rules) with paths holding spaces, quotes, a backslash and
    /// non-ASCII letters: what it prints loads back to the same config, printed the same.
    #[test]
    fn check_print_round_trips_paths_with_spaces_and_quotes_in_every_table() {
        let text = r#"
rules = ["rules dir/it's \"mine\".toml", "/abs/r\\x.toml"]
pid_file = "run dir/pop gate.pid"
[[listener]]
name = "pop 3"
bind = "127.0.0.1:1110"
tls = "starttls"
[[upstream]]
name = "old"
address = ["127.0.0.1:110", "127.0.0.1:111"]
ca_file = "c a/\"ca\".pem"
user_names = "exact"
[upstream.oauth2]
token_url = "https://idp.example/token"
client_id = "id"
client_secret_file = "sec ret's"
tokens_file = "tok ens.toml"
credentials_file = "crédits.toml"
[[upstream]]
name = "new"
address = "127.0.0.1:112"
[routing]
default = "new"
map = "maps/us ers\".map"
[tls]
cert = "certs/a b.crt"
key = "certs/a b.key"
[[tls.certificate]]
server_names = ["mail.example.org", "*.example.net"]
cert = "certs/it's.crt"
key = "certs/it's.key"
[log]
dir = "log dir"
[audit]
enabled = true
dir = "audit \"dir\""
"#;
        let mut c = Config::parse(text, Path::new("/etc/pop gate/popgate.toml")).unwrap();
        c.resolve_paths(Path::new("/etc/pop gate"));
        let printed = effective_toml(&c).unwrap();
        let mut back = Config::parse(&printed, Path::new("/elsewhere/printed.toml"))
            .unwrap_or_else(|e| panic!("{e}\n{printed}"));
        back.resolve_paths(Path::new("/elsewhere"));
        assert_eq!(effective_toml(&back).unwrap(), printed);
        let t: toml::Table = toml::from_str(&printed).unwrap();
        assert_eq!(
            t["rules"][0].as_str(),
            Some("/etc/pop gate/rules dir/it's \"mine\".toml")
        );
        assert_eq!(
            t["pid_file"].as_str(),
            Some("/etc/pop gate/run dir/pop gate.pid")
        );
        assert_eq!(
            t["routing"]["map"].as_str(),
            Some("/etc/pop gate/maps/us ers\".map")
        );
        assert_eq!(
            t["tls"]["certificate"][0]["cert"].as_str(),
            Some("/etc/pop gate/certs/it's.crt")
        );
        assert_eq!(
            t["upstream"][0]["oauth2"]["credentials_file"].as_str(),
            Some("/etc/pop gate/crédits.toml")
        );
    }
}
