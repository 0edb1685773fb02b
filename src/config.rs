//! Configuration: TOML (serde, unknown keys rejected) → CLI overrides → [`Config::validate`].

pub mod scan;
pub mod state;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A configuration problem; the message names the file, the key and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The TOML did not parse into the config types (message names key and line).
    #[error("{path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{path}: key `{key}`: {reason}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// Dotted key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// TLS mode of a listener or of the upstream connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain TCP.
    #[default]
    None,
    /// Plain TCP upgraded with STLS (RFC 2595).
    Starttls,
    /// TLS from the first byte (port 995 style, RFC 8314).
    Implicit,
}

/// What to do with commands popgate does not know.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownCommands {
    /// Answer `-ERR` locally: an unknown response shape could desynchronise the session.
    #[default]
    Reject,
    /// Forward, expecting a single-line reply.
    SingleLine,
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where clients connect (`[[listener]]`, one or more).
    #[serde(rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// The POP3 server(s) behind popgate: one `[upstream]` table, or several named
    /// `[[upstream]]` entries (routing mode). Never empty after [`Config::validate`].
    #[serde(
        rename = "upstream",
        deserialize_with = "upstreams::deserialize",
        serialize_with = "upstreams::serialize"
    )]
    pub upstreams: Vec<UpstreamConfig>,
    /// `[routing]`: how a login picks its upstream (routing mode; see [`Config::routing_mode`]).
    #[serde(default)]
    pub routing: Option<RoutingConfig>,
    /// Limits on what clients and servers may do.
    #[serde(default)]
    pub limits: Limits,
    /// Operational logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Certificates popgate serves to clients (needed by `starttls`/`implicit` listeners).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Rule files, as globs relative to the config file (`["rules/*.toml"]`), loaded in order.
    #[serde(default)]
    pub rules: Vec<String>,
    /// Write popgate's process id here once the listeners are bound; removed at exit.
    /// `popgate reload --config` reads it to find the process to signal.
    #[serde(default)]
    pub pid_file: Option<PathBuf>,
    /// On SIGTERM popgate stops accepting at once and lets open sessions finish for this long;
    /// then it closes the rest (upstream without QUIT).
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Audit trail and traffic transcripts (`[audit]`).
    #[serde(default)]
    pub audit: crate::audit::AuditConfig,
    /// How the process runs as a daemon (`[process]`: privilege drop).
    #[serde(default)]
    pub process: ProcessConfig,
    /// Prometheus metrics and the health endpoint (`[metrics]`); off when absent.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// The control socket (`[control]`: `popgate sessions`, `kick`, `tap`); off when absent.
    #[serde(default)]
    pub control: Option<ControlConfig>,
    /// Fleet state (`[state]`): local, or shared by the instances through Redis.
    #[serde(default)]
    pub state: state::StateConfig,
    /// Content scanners (`[[scanner]]`), named by `scan` rules; none when absent.
    #[serde(default, rename = "scanner")]
    pub scanners: Vec<scan::ScannerConfig>,
    /// What scanning does with held messages and verdicts (`[scan]`).
    #[serde(default)]
    pub scan: scan::ScanConfig,
    /// Directory relative paths and rule globs are resolved against (the config file's).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// `[process]`: the user and group popgate runs as once its listeners are bound.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessConfig {
    /// Switch to this user (name or numeric id) after binding the listeners and opening the
    /// log and audit files. Needs root; popgate refuses to start if the switch fails.
    pub user: Option<String>,
    /// Switch to this group (name or numeric id); default: the user's primary group. It is
    /// also the only supplementary group left.
    pub group: Option<String>,
}

/// `[control]`: the Unix socket of `popgate sessions`, `status`, `kick`, `tap` and `reload`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// The socket's path; default `control.sock` in `$RUNTIME_DIRECTORY` (systemd's
    /// `RuntimeDirectory=`). Created with mode 0660, owned by the user popgate runs as.
    pub socket: Option<PathBuf>,
    /// The socket's group (name or numeric id): its members may use it too.
    pub group: Option<String>,
}

/// `[tls]`: the certificates popgate presents to clients.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Default certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, RSA or EC; RSA, ECDSA and Ed25519 keys).
    pub key: Option<PathBuf>,
    /// Further certificates chosen by SNI (`[[tls.certificate]]`).
    #[serde(default, rename = "certificate")]
    pub certificates: Vec<SniCertificate>,
    /// How long a client may take to complete the TLS handshake.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

/// A certificate served to clients asking for one of `server_names` (SNI).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SniCertificate {
    /// Names (`mail.example.org`, or `*.example.org` for one level).
    pub server_names: Vec<String>,
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

/// One listening socket.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Name used in logs (and later in rules).
    pub name: String,
    /// Address and port; IPv4 or IPv6 (`[::1]:1110`). Port 0 picks a free port.
    pub bind: SocketAddr,
    /// Client-side TLS mode.
    #[serde(default)]
    pub tls: TlsMode,
    /// Expect a PROXY protocol header (v1 or v2, as HAProxy's `send-proxy`/`send-proxy-v2`)
    /// at the start of every connection, and take the client address from it.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Peers allowed to send that header (`["10.0.0.0/8", "192.0.2.7"]`); connections from
    /// anyone else are closed. Required with `proxy_protocol`.
    #[serde(default)]
    pub trusted_proxies: Vec<crate::types::Network>,
    /// How long a trusted peer may take to send the whole header.
    #[serde(default = "default_proxy_timeout", with = "humantime_serde")]
    pub proxy_timeout: Duration,
}

fn default_proxy_timeout() -> Duration {
    Duration::from_secs(5)
}

/// How the upstream learns the real client address (`upstream.forward_client`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardClient {
    /// Not at all: the server sees popgate's address.
    #[default]
    None,
    /// A PROXY protocol v1 (text) header before anything else on the connection.
    ProxyV1,
    /// A PROXY protocol v2 (binary) header before anything else on the connection.
    ProxyV2,
    /// Dovecot's `XCLIENT` command after the greeting, when the greeting offers it.
    Xclient,
}

/// How an upstream compares user names (`upstream.user_names`), and so how popgate must
/// compare them to route, apply rules and audit the user the server actually logs in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UserNames {
    /// The server lowercases names before it looks them up (Dovecot's default
    /// `auth_username_format = %Lu`): popgate folds ASCII `A`-`Z` to `a`-`z` (as Dovecot's `%L`
    /// does; other letters are kept) and routes, rules and audits on the folded name.
    #[default]
    Fold,
    /// The server compares names byte for byte (popa3d and other servers that look users up in
    /// the system's password database): popgate uses the name as the client sent it.
    Exact,
}

impl UserNames {
    /// `name` as this server sees it (folded by [`crate::types`]' one rule, or as it is).
    pub fn apply(self, name: &str) -> std::borrow::Cow<'_, str> {
        match self {
            UserNames::Fold => crate::types::fold_user_name(name),
            UserNames::Exact => name.into(),
        }
    }
}

/// `[metrics]`: an HTTP endpoint with `/metrics` (Prometheus text) and `/health`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint, e.g. `127.0.0.1:9110` (keep it off public networks:
    /// there is no authentication).
    pub bind: SocketAddr,
    /// `/health` trusts an upstream connect that succeeded this recently; otherwise it dials
    /// the upstream itself (a TCP connect) before it answers.
    #[serde(default = "default_health_window", with = "humantime_serde")]
    pub health_window: Duration,
}

fn default_health_window() -> Duration {
    Duration::from_secs(30)
}

/// One upstream POP3 server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Name used by `[routing]`, the map file and `route` rules; required when there is more
    /// than one upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `host:port` (a name is resolved at each connection), or a list of them tried in order
    /// (failover). Kept as plain strings. `["original-destination"]`: the address each client
    /// connected to before an iptables `REDIRECT` (Linux only, direct mode only).
    #[serde(with = "addresses")]
    pub address: Vec<String>,
    /// How long an address that failed at the TCP stage (or timed out) is skipped.
    #[serde(default = "default_dead_for", with = "humantime_serde")]
    pub dead_for: Duration,
    /// Upstream TLS mode.
    #[serde(default)]
    pub tls: TlsMode,
    /// How long to wait for the TCP (and TLS) connection.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// CA certificates (PEM) to verify the upstream with, instead of the system store.
    pub ca_file: Option<PathBuf>,
    /// Name to send as SNI and to verify; default: the host part of `address`.
    pub server_name: Option<String>,
    /// Client certificate (PEM) presented to the upstream.
    pub client_cert: Option<PathBuf>,
    /// Its key.
    pub client_key: Option<PathBuf>,
    /// Verify the upstream certificate. `false` is insecure and logged loudly.
    #[serde(default = "yes")]
    pub verify: bool,
    /// Pass the real client address on: `none`, `proxy-v1`, `proxy-v2` or `xclient`.
    #[serde(default)]
    pub forward_client: ForwardClient,
    /// How the server compares user names: `fold` (default, as Dovecot: lowercased) or
    /// `exact`. Routing, rules and the audit use the name as this server sees it.
    #[serde(default)]
    pub user_names: UserNames,
    /// `[upstream.oauth2]`: log in upstream with an OAuth2 token instead of the client's
    /// password (the OAuth2 bridge, src/oauth2/).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<Oauth2Config>,
}

/// The `upstream.address` that makes each session connect to the address its client
/// connected to before an iptables `REDIRECT` sent it to popgate (transparent interception).
pub const ORIGINAL_DESTINATION: &str = "original-destination";

impl UpstreamConfig {
    /// Whether `address` is [`ORIGINAL_DESTINATION`]: the upstream is chosen per connection.
    pub fn original_destination(&self) -> bool {
        matches!(&self.address[..], [a] if a == ORIGINAL_DESTINATION)
    }
}

fn yes() -> bool {
    true
}

fn default_dead_for() -> Duration {
    Duration::from_secs(10)
}

impl UpstreamConfig {
    /// The name in logs and metrics: `name`, or `default` for an unnamed single upstream.
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or("default")
    }
}

/// `[routing]`: routing mode, in which popgate greets the client itself, reads the login,
/// and only then connects to the upstream the user is routed to.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// The upstream of users neither a `route` rule nor the map names; required with more
    /// than one upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// Map file: lines `user upstream` or `@domain upstream` (relative to the config file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<PathBuf>,
    /// Text of popgate's own greeting (`+OK <text>`, never an APOP timestamp).
    #[serde(default = "default_greeting")]
    pub greeting: String,
}

fn default_greeting() -> String {
    "popgate ready".into()
}

/// `upstream` is one table or an array of tables.
mod upstreams {
    use super::UpstreamConfig;
    use serde::de::{self, MapAccess, SeqAccess, Visitor};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<UpstreamConfig>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<UpstreamConfig>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an [upstream] table or [[upstream]] entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                UpstreamConfig::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|u| vec![u])
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                let v: Vec<UpstreamConfig> =
                    Vec::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                if v.is_empty() {
                    return Err(de::Error::custom("at least one upstream is needed"));
                }
                Ok(v)
            }
        }
        d.deserialize_any(V)
    }

    pub(super) fn serialize<S: Serializer>(u: &[UpstreamConfig], s: S) -> Result<S::Ok, S::Error> {
        match u {
            [one] if one.name.is_none() => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

/// `address` is one string or an array of strings.
mod addresses {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        Ok(match OneOrMany::deserialize(d)? {
            OneOrMany::One(a) => vec![a],
            OneOrMany::Many(v) => v,
        })
    }

    pub(super) fn serialize<S: Serializer>(a: &[String], s: S) -> Result<S::Ok, S::Error> {
        match a {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(30)
}

/// Limits on what a session may do.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Close a session (upstream without QUIT) after this long without traffic.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Longest command line or non-body response line, in octets.
    pub max_line: usize,
    /// What to do with commands popgate does not know.
    pub unknown_commands: UnknownCommands,
    /// Most sessions at once; further clients get `-ERR [SYS/TEMP]` and are closed.
    pub max_sessions: usize,
    /// Most sessions at once from one client IP (0: no limit); further ones get `-ERR`.
    pub max_sessions_per_ip: usize,
    /// Most commands outstanding per session before popgate stops reading the client.
    pub max_pipeline: usize,
    /// Close a session that has not logged in this long after it connected, whatever
    /// trickles in meanwhile (slow-loris).
    #[serde(with = "humantime_serde")]
    pub login_timeout: Duration,
    /// How long the upstream may take to send its greeting once connected; then the client
    /// gets `-ERR [SYS/TEMP]`.
    #[serde(with = "humantime_serde")]
    pub greeting_timeout: Duration,
    /// First delay of a failed-login reply, after two free failures from one IP; doubles with
    /// each further failure. 0 turns the penalty off.
    #[serde(with = "humantime_serde")]
    pub login_fail_delay: Duration,
    /// Longest delay of a failed-login reply.
    #[serde(with = "humantime_serde")]
    pub login_fail_delay_max: Duration,
    /// An IP's failed logins are forgotten this long after its last one.
    #[serde(with = "humantime_serde")]
    pub login_fail_window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            idle_timeout: Duration::from_secs(600),
            max_line: 8192,
            unknown_commands: UnknownCommands::Reject,
            max_sessions: 10_000,
            max_sessions_per_ip: 50,
            max_pipeline: 256,
            login_timeout: Duration::from_secs(60),
            greeting_timeout: Duration::from_secs(30),
            login_fail_delay: Duration::from_secs(1),
            login_fail_delay_max: Duration::from_secs(15),
            login_fail_window: Duration::from_secs(600),
        }
    }
}

/// Operational log settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing filter such as `popgate=debug`.
    pub level: String,
    /// `text` or `json` (stderr, file and syslog output; journald entries are structured).
    pub format: LogFormat,
    /// Where log lines go; unset: `file` when `dir` is set, else `stderr`
    /// (see [`LogConfig::effective_output`]).
    pub output: Option<LogOutput>,
    /// Directory of the log files (`output = "file"`).
    pub dir: Option<PathBuf>,
    /// Rotation of log files: `daily`, `hourly` or `never`.
    pub rotation: Rotation,
    /// Dated log files (`popgate.YYYY-MM-DD[-HH].log`) dated before the last this many days
    /// are deleted, by the date in their name; 0 keeps all.
    pub keep_days: u32,
    /// Where syslog lines go (`output = "syslog"`): a Unix datagram socket path
    /// (default `/dev/log`), or `udp://host:port` / `tcp://host:port`.
    pub syslog_address: String,
    /// Syslog facility: `daemon` (default), `mail`, `local0` .. `local7`, ...
    pub syslog_facility: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
            output: None,
            dir: None,
            rotation: Rotation::Daily,
            keep_days: 30,
            syslog_address: "/dev/log".into(),
            syslog_facility: "daemon".into(),
        }
    }
}

impl LogConfig {
    /// `output` as set, or `file` when only `dir` is set (configs from before `output`
    /// existed), or `stderr`.
    pub fn effective_output(&self) -> LogOutput {
        match (self.output, &self.dir) {
            (Some(o), _) => o,
            (None, Some(_)) => LogOutput::File,
            (None, None) => LogOutput::Stderr,
        }
    }
}

/// Where operational log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogOutput {
    /// Standard error (colours only when it is a terminal).
    Stderr,
    /// Files in `log.dir`, rotated by `log.rotation`; SIGUSR1 reopens them.
    File,
    /// The syslog daemon at `log.syslog_address` (RFC 3164 lines).
    Syslog,
    /// The systemd journal, with each field as a journal field.
    Journald,
}

impl LogOutput {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            LogOutput::Stderr => "stderr",
            LogOutput::File => "file",
            LogOutput::Syslog => "syslog",
            LogOutput::Journald => "journald",
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// How often a log file is rotated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rotation {
    /// A new file every day.
    #[default]
    Daily,
    /// A new file every hour.
    Hourly,
    /// One file.
    Never,
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Config {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse(&text, path)?;
        let base = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        config.resolve_paths(base);
        config.validate(path)?;
        Ok(config)
    }

    /// Parse TOML text (no validation); `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Make relative file paths relative to `base` (the config file's directory).
    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        self.base_dir = base.to_owned();
        // `components()` drops inner `.` parts: `./certs/a.crt` under `/etc/popgate` reads
        // `/etc/popgate/certs/a.crt`, not `/etc/popgate/./certs/a.crt`.
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p).components().collect();
            }
        };
        if let Some(t) = &mut self.tls {
            for p in [&mut t.cert, &mut t.key].into_iter().flatten() {
                fix(p);
            }
            for c in &mut t.certificates {
                fix(&mut c.cert);
                fix(&mut c.key);
            }
        }
        for u in &mut self.upstreams {
            for p in [&mut u.ca_file, &mut u.client_cert, &mut u.client_key]
                .into_iter()
                .flatten()
            {
                fix(p);
            }
            if let Some(o) = &mut u.oauth2 {
                for p in [&mut o.client_secret_file, &mut o.tokens_file]
                    .into_iter()
                    .flatten()
                {
                    fix(p);
                }
                fix(&mut o.credentials_file);
            }
        }
        if let Some(m) = self.routing.as_mut().and_then(|r| r.map.as_mut()) {
            fix(m);
        }
        if let Some(d) = &mut self.log.dir {
            fix(d);
        }
        if let Some(p) = &mut self.pid_file {
            fix(p);
        }
        if let Some(p) = self.control.as_mut().and_then(|c| c.socket.as_mut()) {
            fix(p);
        }
        fix(&mut self.scan.spool_dir);
        self.audit.resolve_paths(base);
    }

    /// Check what the types cannot: every error names the key and what is wrong.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            reason,
        };
        self.state
            .validate()
            .map_err(|(key, reason)| invalid(key, reason))?;
        scan::validate(&self.scanners, &self.scan)
            .map_err(|(key, reason)| invalid(&key, reason))?;
        if self.listeners.is_empty() {
            return Err(invalid(
                "listener",
                "at least one [[listener]] is needed".into(),
            ));
        }
        for (i, l) in self.listeners.iter().enumerate() {
            // Port 0 picks a fresh port each time: only fixed ports can clash.
            if l.bind.port() != 0 && self.listeners[..i].iter().any(|o| o.bind == l.bind) {
                return Err(invalid(
                    &format!("listener[{i}].bind"),
                    format!("{} is already the address of another listener", l.bind),
                ));
            }
            if l.name.trim().is_empty() {
                return Err(invalid(
                    &format!("listener[{i}].name"),
                    "must not be empty".into(),
                ));
            }
            if self.listeners[..i].iter().any(|o| o.name == l.name) {
                return Err(invalid(
                    &format!("listener[{i}].name"),
                    format!("duplicate listener name {:?}", l.name),
                ));
            }
            let has_cert = self
                .tls
                .as_ref()
                .is_some_and(|t| t.cert.is_some() || !t.certificates.is_empty());
            if l.proxy_protocol && l.trusted_proxies.is_empty() {
                return Err(invalid(
                    &format!("listener[{i}].trusted_proxies"),
                    "proxy_protocol = true needs the addresses of the proxies allowed to send \
                     the header (e.g. [\"127.0.0.1\"])"
                        .into(),
                ));
            }
            if !l.proxy_protocol && !l.trusted_proxies.is_empty() {
                return Err(invalid(
                    &format!("listener[{i}].trusted_proxies"),
                    "set, but proxy_protocol is not true on this listener".into(),
                ));
            }
            if l.proxy_protocol && l.proxy_timeout.is_zero() {
                return Err(invalid(
                    &format!("listener[{i}].proxy_timeout"),
                    "must be more than 0".into(),
                ));
            }
            if l.tls != TlsMode::None && !has_cert {
                return Err(invalid(
                    &format!("listener[{i}].tls"),
                    "needs a certificate: set [tls] cert and key".into(),
                ));
            }
        }
        if let Some(m) = &self.metrics
            && m.bind.port() != 0
            && self.listeners.iter().any(|l| l.bind == m.bind)
        {
            return Err(invalid(
                "metrics.bind",
                format!("{} is already the address of a listener", m.bind),
            ));
        }
        self.validate_upstreams(path)?;
        if let Some(i) = self.upstreams.iter().position(|u| u.original_destination()) {
            if !cfg!(target_os = "linux") {
                return Err(invalid(
                    "upstream.address",
                    format!("{ORIGINAL_DESTINATION:?} needs Linux (SO_ORIGINAL_DST)"),
                ));
            }
            if self.routing_mode() {
                return Err(invalid(
                    &format!("upstream[{i}].address"),
                    format!(
                        "{ORIGINAL_DESTINATION:?} needs direct mode: one [upstream], no [routing] \
                         (the destination comes from the connection, not from the user)"
                    ),
                ));
            }
            if let Some(i) = self.listeners.iter().position(|l| l.proxy_protocol) {
                return Err(invalid(
                    &format!("listener[{i}].proxy_protocol"),
                    format!(
                        "cannot be combined with upstream.address = {ORIGINAL_DESTINATION:?}: \
                         behind a balancer the redirected connection is the balancer's"
                    ),
                ));
            }
        }
        if let Some(t) = &self.tls {
            if t.cert.is_some() != t.key.is_some() {
                return Err(invalid("tls", "cert and key go together".into()));
            }
            for (i, c) in t.certificates.iter().enumerate() {
                if c.server_names.is_empty() {
                    return Err(invalid(
                        &format!("tls.certificate[{i}].server_names"),
                        "must list at least one name".into(),
                    ));
                }
            }
        }

        for (key, d) in [
            ("limits.idle_timeout", self.limits.idle_timeout),
            ("limits.login_timeout", self.limits.login_timeout),
            ("limits.greeting_timeout", self.limits.greeting_timeout),
            (
                "metrics.health_window",
                self.metrics
                    .as_ref()
                    .map_or(Duration::MAX, |m| m.health_window),
            ),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be more than 0".into()));
            }
        }
        if !(64..=1024 * 1024).contains(&self.limits.max_line) {
            return Err(invalid(
                "limits.max_line",
                format!("{} is outside 64..=1048576", self.limits.max_line),
            ));
        }
        if self.limits.max_sessions == 0 {
            return Err(invalid("limits.max_sessions", "must be at least 1".into()));
        }
        if self.limits.max_sessions > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(invalid(
                "limits.max_sessions",
                format!(
                    "{} is more than the most popgate can count ({})",
                    self.limits.max_sessions,
                    tokio::sync::Semaphore::MAX_PERMITS
                ),
            ));
        }
        if self.limits.login_fail_delay_max < self.limits.login_fail_delay {
            return Err(invalid(
                "limits.login_fail_delay_max",
                "must be at least limits.login_fail_delay".into(),
            ));
        }
        if !self.limits.login_fail_delay.is_zero() && self.limits.login_fail_window.is_zero() {
            return Err(invalid(
                "limits.login_fail_window",
                "must be more than 0 (set limits.login_fail_delay = \"0s\" to turn the penalty off)"
                    .into(),
            ));
        }
        if !(1..=100_000).contains(&self.limits.max_pipeline) {
            return Err(invalid(
                "limits.max_pipeline",
                "must be within 1..=100000".into(),
            ));
        }
        self.audit
            .validate()
            .map_err(|e| invalid(&e.key, e.reason.clone()))?;
        for (i, name) in self.audit.transcript.listeners.iter().enumerate() {
            if !self.listeners.iter().any(|l| &l.name == name) {
                return Err(invalid(
                    &format!("audit.transcript.listeners[{i}]"),
                    format!("no listener is named {name:?}"),
                ));
            }
        }
        check_log_level(&self.log.level).map_err(|reason| invalid("log.level", reason))?;
        self.check_log_output(path)?;
        for (key, v) in [
            ("process.user", &self.process.user),
            ("process.group", &self.process.group),
        ] {
            if v.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(invalid(key, "must not be empty".into()));
            }
        }
        Ok(())
    }
}

impl Config {
    /// Whether popgate greets clients itself and connects after the login is known:
    /// `[routing]` is present, there is more than one upstream, or an upstream has
    /// `[upstream.oauth2]` (popgate must read the password itself).
    pub fn routing_mode(&self) -> bool {
        self.routing.is_some()
            || self.upstreams.len() > 1
            || self.upstreams.iter().any(|u| u.oauth2.is_some())
    }

    /// The index of the upstream of direct mode, and of users nothing routes elsewhere:
    /// `[routing] default`, else the first.
    pub fn default_index(&self) -> usize {
        let name = self.routing.as_ref().and_then(|r| r.default.as_deref());
        name.and_then(|n| self.upstream_index(n)).unwrap_or(0)
    }

    /// The upstream of direct mode, and of users nothing routes elsewhere (a validated config
    /// has at least one; `upstream = []` does not parse).
    pub fn default_upstream(&self) -> &UpstreamConfig {
        &self.upstreams[self.default_index()]
    }

    /// How routing mode compares the name of a login before it knows the upstream (route
    /// rules and the map): folded unless every upstream is `user_names = "exact"`, so that a
    /// name in other case never escapes a map line or a rule to reach a server that folds it.
    pub fn routing_user_names(&self) -> UserNames {
        if self
            .upstreams
            .iter()
            .all(|u| u.user_names == UserNames::Exact)
        {
            UserNames::Exact
        } else {
            UserNames::Fold
        }
    }

    /// The upstream called `name`, and its index.
    pub fn upstream_index(&self, name: &str) -> Option<usize> {
        self.upstreams
            .iter()
            .position(|u| u.name.as_deref() == Some(name))
    }

    /// The upstream called `name`.
    pub fn upstream_named(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstream_index(name).map(|i| &self.upstreams[i])
    }

    fn validate_upstreams(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            reason,
        };
        let many = self.upstreams.len() > 1;
        if self.upstreams.is_empty() {
            return Err(invalid(
                "upstream",
                "at least one upstream is needed".into(),
            ));
        }
        for (i, u) in self.upstreams.iter().enumerate() {
            let key = |k: &str| {
                if many {
                    format!("upstream[{i}].{k}")
                } else {
                    format!("upstream.{k}")
                }
            };
            match &u.name {
                None if many => {
                    return Err(invalid(
                        &key("name"),
                        "needed when there is more than one upstream".into(),
                    ));
                }
                Some(n) if !is_upstream_name(n) => {
                    return Err(invalid(
                        &key("name"),
                        format!("{n:?}: use letters, digits, '-', '_' and '.'"),
                    ));
                }
                Some(n)
                    if self.upstreams[..i]
                        .iter()
                        .any(|o| o.name.as_ref() == Some(n)) =>
                {
                    return Err(invalid(
                        &key("name"),
                        format!("duplicate upstream name {n:?}"),
                    ));
                }
                _ => {}
            }
            if u.address.is_empty() {
                return Err(invalid(
                    &key("address"),
                    "must list at least one host:port".into(),
                ));
            }
            if u.address.len() > 1 && u.address.iter().any(|a| a == ORIGINAL_DESTINATION) {
                return Err(invalid(
                    &key("address"),
                    format!("{ORIGINAL_DESTINATION:?} stands alone, not in a list"),
                ));
            }
            for a in &u.address {
                if a != ORIGINAL_DESTINATION && split_host_port(a).is_none() {
                    return Err(invalid(&key("address"), format!("{a:?} is not host:port")));
                }
            }
            if u.client_cert.is_some() != u.client_key.is_some() {
                return Err(invalid(
                    &key("client_cert"),
                    "client_cert and client_key go together".into(),
                ));
            }
            if u.tls == TlsMode::None && (u.ca_file.is_some() || u.client_cert.is_some()) {
                return Err(invalid(
                    &key("tls"),
                    "ca_file/client_cert are set but upstream.tls is \"none\"".into(),
                ));
            }
            if u.connect_timeout.is_zero() {
                return Err(invalid(
                    &key("connect_timeout"),
                    "must be more than 0".into(),
                ));
            }
        }
        let default = self.routing.as_ref().and_then(|r| r.default.as_deref());
        match default {
            None if many => {
                return Err(invalid(
                    "routing.default",
                    "needed when there is more than one upstream".into(),
                ));
            }
            Some(d) if self.upstream_named(d).is_none() => {
                return Err(invalid(
                    "routing.default",
                    format!("no upstream is named {d:?}"),
                ));
            }
            _ => {}
        }
        if let Some(r) = &self.routing
            && (r.greeting.trim().is_empty() || r.greeting.contains(['\r', '\n', '<']))
        {
            return Err(invalid(
                "routing.greeting",
                "must be one non-empty line without '<' (no APOP timestamp)".into(),
            ));
        }
        Ok(())
    }

    fn check_log_output(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            reason,
        };
        let log = &self.log;
        match log.effective_output() {
            LogOutput::File if log.dir.is_none() => {
                return Err(invalid("log.dir", "needed with output = \"file\"".into()));
            }
            LogOutput::File => {}
            other if log.dir.is_some() => {
                return Err(invalid(
                    "log.dir",
                    format!("only used with output = \"file\", not {:?}", other.as_str()),
                ));
            }
            _ => {}
        }
        if syslog_facility(&log.syslog_facility).is_none() {
            return Err(invalid(
                "log.syslog_facility",
                format!(
                    "{:?} is not a syslog facility (daemon, mail, user, local0 .. local7, ...)",
                    log.syslog_facility
                ),
            ));
        }
        if let Err(reason) = SyslogAddress::parse(&log.syslog_address) {
            return Err(invalid("log.syslog_address", reason));
        }
        Ok(())
    }
}

/// Whether `name` may name an upstream (it appears in map files and logs).
pub(crate) fn is_upstream_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The syslog facility named `name` (`daemon`, `local0`, ...), case-insensitive.
pub(crate) fn syslog_facility(name: &str) -> Option<syslog::Facility> {
    name.parse().ok()
}

/// Where syslog lines are sent (`log.syslog_address`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SyslogAddress {
    /// A Unix datagram (or stream) socket such as `/dev/log`.
    Unix(PathBuf),
    /// `udp://host:port`.
    Udp(String),
    /// `tcp://host:port`.
    Tcp(String),
}

impl SyslogAddress {
    /// Parse `log.syslog_address`; the error says what is wrong.
    pub(crate) fn parse(text: &str) -> Result<SyslogAddress, String> {
        let net = |rest: &str| {
            split_host_port(rest)
                .map(|_| rest.to_owned())
                .ok_or_else(|| format!("{text:?}: {rest:?} is not host:port"))
        };
        if let Some(rest) = text.strip_prefix("udp://") {
            Ok(SyslogAddress::Udp(net(rest)?))
        } else if let Some(rest) = text.strip_prefix("tcp://") {
            Ok(SyslogAddress::Tcp(net(rest)?))
        } else if text.starts_with('/') {
            Ok(SyslogAddress::Unix(PathBuf::from(text)))
        } else {
            Err(format!(
                "{text:?} is neither an absolute socket path nor udp://host:port or tcp://host:port"
            ))
        }
    }
}

impl Config {
    /// Check that every directory popgate writes to (`log.dir`, `audit.dir` with file output,
    /// `audit.transcript.dir`) is a writable directory, or can be created (its nearest existing
    /// parent is a writable directory), as `popgate run` would need. Touches the file system:
    /// creates and removes a probe file; `path` is only used in messages.
    pub fn check_dirs(&self, path: &Path) -> Result<(), ConfigError> {
        let audit_dir = match (self.audit.enabled, self.audit.output) {
            (true, crate::audit::AuditOutput::File) => self.audit.dir.as_ref(),
            _ => None,
        };
        // Held messages over scan.spool_memory go there (created at start if missing).
        let spool_dir = (!self.scanners.is_empty()).then_some(&self.scan.spool_dir);
        let dirs = [
            ("log.dir", self.log.dir.as_ref()),
            ("audit.dir", audit_dir),
            ("audit.transcript.dir", self.audit.transcript.dir.as_ref()),
            ("scan.spool_dir", spool_dir),
        ];
        for (key, dir) in dirs {
            let Some(dir) = dir else { continue };
            writable_dir(dir).map_err(|reason| ConfigError::Invalid {
                path: path.to_owned(),
                key: key.to_owned(),
                reason,
            })?;
        }
        Ok(())
    }
}

/// Whether `dir` is, or can be created as, a directory popgate can write in.
pub(crate) fn writable_dir(dir: &Path) -> Result<(), String> {
    // The missing part of the path is created at run time: what must be writable is the nearest
    // part that exists.
    let mut existing = dir;
    while std::fs::symlink_metadata(existing).is_err() {
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p,
            _ => {
                existing = Path::new(".");
                break;
            }
        }
    }
    let shown = dir.display();
    let meta = std::fs::metadata(existing)
        .map_err(|e| format!("{shown}: cannot use {}: {e}", existing.display()))?;
    if !meta.is_dir() {
        return Err(format!(
            "{shown}: {} is not a directory",
            existing.display()
        ));
    }
    let probe = existing.join(format!(".popgate-check-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) if existing == dir => Err(format!("{shown}: cannot write there: {e}")),
        Err(e) => Err(format!(
            "{shown} does not exist and cannot be created in {}: {e}",
            existing.display()
        )),
    }
}

/// A `log.level` must be a level or a tracing filter whose every directive sets a level.
/// `EnvFilter` itself takes any bare word as a target name, so `"verbose"` or `"warning"` would
/// silently turn every popgate log line off.
fn check_log_level(level: &str) -> Result<(), String> {
    use tracing_subscriber::filter::LevelFilter;
    const LEVELS: &str = "error, warn, info, debug, trace or off";
    if level.trim().is_empty() {
        return Err(format!("must not be empty: use {LEVELS}"));
    }
    for directive in level.split(',').map(str::trim) {
        if directive.is_empty() || directive.contains('[') {
            // Span filters (`target[span{field=value}]=level`) are left to EnvFilter.
            continue;
        }
        let (target, lvl) = match directive.rsplit_once('=') {
            Some((t, l)) => (Some(t), l.trim()),
            None => (None, directive),
        };
        if lvl.parse::<LevelFilter>().is_err() || lvl.is_empty() {
            return Err(match target {
                None => format!(
                    "{directive:?} is not a level ({LEVELS}) nor a `target=level` directive"
                ),
                Some(t) => format!("{lvl:?} in {directive:?} is not a level for {t:?} ({LEVELS})"),
            });
        }
    }
    tracing_subscriber::EnvFilter::try_new(level)
        .map(drop)
        .map_err(|e| format!("{level:?} is not a valid filter: {e}"))
}

/// Split `host:port` (`[v6]:port` too) into host and port.
pub(crate) fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || port == 0 {
        return None;
    }
    Some((host, port))
}

/// `[upstream.oauth2]`: the OAuth2 bridge of one upstream. Clients log in to popgate with a
/// local password (`credentials_file`); popgate logs in upstream with `AUTH XOAUTH2` or
/// `OAUTHBEARER` and an access token from `token_url`. Checked by `popgate check` and at start
/// (files readable, hashes parse, secret present); relative paths are relative to the config.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Oauth2Config {
    /// The authorization server's token endpoint.
    pub token_url: String,
    /// The OAuth2 client (application) id.
    pub client_id: String,
    /// File holding the client secret (first line); never the secret itself in the config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
    /// Environment variable holding the client secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_env: Option<String>,
    /// How tokens are obtained.
    #[serde(default)]
    pub grant: Oauth2Grant,
    /// Scopes asked for, space separated (e.g. `https://outlook.office365.com/.default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// SASL mechanism used upstream.
    #[serde(default)]
    pub mechanism: Oauth2Mechanism,
    /// `grant = "refresh_token"`: one refresh token per mailbox (TOML `mailbox = "token"`),
    /// rewritten atomically (temp file + rename, mode 0600) when tokens rotate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_file: Option<PathBuf>,
    /// Local users: TOML `user = "<argon2 PHC hash>"`, or `user = { hash = "...",
    /// mailbox = "..." }` when the upstream mailbox name differs.
    pub credentials_file: PathBuf,
    /// Device authorization endpoint (RFC 8628), for `popgate oauth2 login`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_authorization_url: Option<String>,
    /// Refresh an access token this long before it expires.
    #[serde(default = "default_refresh_ahead", with = "humantime_serde")]
    pub refresh_ahead: Duration,
    /// At most this many local password checks (Argon2) run at once; further logins wait in
    /// a bounded line and get `-ERR [SYS/TEMP]` when it is full or after a short wait.
    /// Default: the number of CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_verifications: Option<usize>,
    /// Allow an `http://` `token_url` that is not on loopback (the client secret and tokens
    /// then travel in clear).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_insecure_token_url: bool,
}

fn default_refresh_ahead() -> Duration {
    Duration::from_secs(60)
}

/// `oauth2.grant`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Oauth2Grant {
    /// A refresh token per mailbox (from `popgate oauth2 login`), rotated as the server says.
    #[default]
    RefreshToken,
    /// One application token for every mailbox (Microsoft's app-only POP access).
    ClientCredentials,
}

/// `oauth2.mechanism`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Oauth2Mechanism {
    /// `AUTH XOAUTH2` (Google, Microsoft).
    #[default]
    Xoauth2,
    /// `AUTH OAUTHBEARER` (RFC 7628).
    Oauthbearer,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("test.toml")
    }

    const MINIMAL: &str = r#"
        [[listener]]
        name = "pop3"
        bind = "127.0.0.1:1110"
        [upstream]
        address = "127.0.0.1:110"
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL, p()).unwrap();
        c.validate(p()).unwrap();
        assert_eq!(c.limits.max_line, 8192);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(600));
        assert_eq!(c.upstreams[0].connect_timeout, Duration::from_secs(10));
        assert_eq!(c.listeners[0].tls, TlsMode::None);
    }

    #[test]
    fn durations_and_ipv6() {
        let text = MINIMAL.replace("127.0.0.1:1110", "[::1]:1110")
            + "[limits]\nidle_timeout = \"90s\"\nunknown_commands = \"single-line\"\n";
        let c = Config::parse(&text, p()).unwrap();
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(90));
        assert!(c.listeners[0].bind.is_ipv6());
        assert_eq!(c.limits.unknown_commands, UnknownCommands::SingleLine);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = Config::parse(&(MINIMAL.to_owned() + "[limits]\nmax_lines = 5\n"), p())
            .unwrap_err()
            .to_string();
        assert!(e.contains("test.toml") && e.contains("max_lines"), "{e}");
    }

    fn invalid_key(extra: &str) -> String {
        let c = Config::parse(&(MINIMAL.to_owned() + extra), p()).unwrap();
        c.validate(p()).unwrap_err().to_string()
    }

    #[test]
    fn proxy_protocol_needs_trusted_peers_and_they_need_it() {
        let listener = |keys: &str| {
            format!(
                "[[listener]]\nname = \"lb\"\nbind = \"127.0.0.1:1111\"\n{keys}\n\
                 [upstream]\naddress = \"127.0.0.1:110\"\n"
            )
        };
        let invalid = |keys: &str| {
            let c = Config::parse(&listener(keys), p()).unwrap();
            c.validate(p()).unwrap_err().to_string()
        };
        let e = invalid("proxy_protocol = true");
        assert!(e.contains("listener[0].trusted_proxies"), "{e}");
        let e = invalid("trusted_proxies = [\"10.0.0.0/8\"]");
        assert!(e.contains("listener[0].trusted_proxies"), "{e}");
        let e = invalid(
            "proxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\"]\nproxy_timeout = \"0s\"",
        );
        assert!(e.contains("listener[0].proxy_timeout"), "{e}");
        let e = Config::parse(
            &listener("proxy_protocol = true\ntrusted_proxies = [\"10.0.0.300\"]"),
            p(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("10.0.0.300"), "{e}");
        let c = Config::parse(
            &(listener("proxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\"]")
                + "forward_client = \"xclient\"\n"),
            p(),
        )
        .unwrap();
        c.validate(p()).unwrap();
        assert_eq!(c.listeners[0].proxy_timeout, Duration::from_secs(5));
        assert_eq!(c.upstreams[0].forward_client, ForwardClient::Xclient);
        let e = Config::parse(&(MINIMAL.to_owned() + "forward_client = \"proxy\"\n"), p())
            .unwrap_err()
            .to_string();
        assert!(e.contains("forward_client"), "{e}");
    }

    #[test]
    fn limits_defaults() {
        let c = Config::parse(MINIMAL, p()).unwrap();
        assert_eq!(c.limits.max_sessions_per_ip, 50);
        assert_eq!(c.limits.login_fail_delay, Duration::from_secs(1));
        assert_eq!(c.limits.login_fail_delay_max, Duration::from_secs(15));
        assert_eq!(c.limits.login_fail_window, Duration::from_secs(600));
    }

    #[test]
    fn log_levels_that_would_silence_everything_are_refused() {
        for bad in ["verbose", "warning", "", "popgate=loud", "info,chatty"] {
            let e = invalid_key(&format!("[log]\nlevel = {bad:?}\n"));
            assert!(e.contains("log.level"), "{bad:?}: {e}");
        }
        for good in [
            "warn",
            "WARN",
            "off",
            "3",
            "popgate=debug,popgate::rules=info",
            "info,popgate::session=trace",
        ] {
            let c = Config::parse(&format!("{MINIMAL}[log]\nlevel = {good:?}\n"), p()).unwrap();
            c.validate(p()).unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
        // What EnvFilter alone would let through: a bare word is a target name.
        assert!(tracing_subscriber::EnvFilter::try_new("warning").is_ok());
    }

    #[test]
    fn log_output_defaults_and_mistakes() {
        let out = |extra: &str| {
            let c = Config::parse(&format!("{MINIMAL}{extra}"), p()).unwrap();
            c.validate(p()).map(|()| c.log.effective_output())
        };
        // Configs from before `output`: `dir` alone means files.
        assert_eq!(out("").unwrap(), LogOutput::Stderr);
        assert_eq!(out("[log]\ndir = \"/tmp\"\n").unwrap(), LogOutput::File);
        assert_eq!(
            out("[log]\noutput = \"syslog\"\nsyslog_address = \"udp://127.0.0.1:514\"\nsyslog_facility = \"local3\"\n")
                .unwrap(),
            LogOutput::Syslog
        );
        assert_eq!(
            out("[log]\noutput = \"journald\"\n").unwrap(),
            LogOutput::Journald
        );
        for (extra, key) in [
            ("[log]\noutput = \"file\"\n", "log.dir"),
            ("[log]\noutput = \"syslog\"\ndir = \"/tmp\"\n", "log.dir"),
            (
                "[log]\noutput = \"syslog\"\nsyslog_facility = \"mail2\"\n",
                "log.syslog_facility",
            ),
            (
                "[log]\noutput = \"syslog\"\nsyslog_address = \"dev/log\"\n",
                "log.syslog_address",
            ),
            (
                "[log]\nsyslog_address = \"udp://nohost\"\n",
                "log.syslog_address",
            ),
            ("[process]\nuser = \"\"\n", "process.user"),
        ] {
            let e = out(extra).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{extra}: {e}");
        }
        assert!(Config::parse(&format!("{MINIMAL}[log]\noutput = \"stdout\"\n"), p()).is_err());
    }

    #[test]
    fn max_sessions_beyond_the_semaphore_is_refused() {
        let max = tokio::sync::Semaphore::MAX_PERMITS;
        let e = invalid_key(&format!("[limits]\nmax_sessions = {}\n", max + 1));
        assert!(e.contains("limits.max_sessions"), "{e}");
        let c = Config::parse(&format!("{MINIMAL}[limits]\nmax_sessions = {max}\n"), p()).unwrap();
        c.validate(p()).unwrap();
    }

    #[test]
    fn login_delay_bounds() {
        let e = invalid_key("[limits]\nlogin_fail_delay = \"20s\"\n");
        assert!(e.contains("limits.login_fail_delay_max"), "{e}");
        let e = invalid_key("[limits]\nlogin_fail_window = \"0s\"\n");
        assert!(e.contains("limits.login_fail_window"), "{e}");
    }

    #[test]
    fn duplicate_bind_addresses_are_refused() {
        let e = invalid_key("[[listener]]\nname = \"two\"\nbind = \"127.0.0.1:1110\"\n");
        assert!(e.contains("listener[1].bind"), "{e}");
        // Port 0 twice is two different ports.
        let text =
            MINIMAL.replace("1110", "0") + "[[listener]]\nname = \"two\"\nbind = \"127.0.0.1:0\"\n";
        Config::parse(&text, p()).unwrap().validate(p()).unwrap();
    }

    #[test]
    fn directories_must_be_writable_or_creatable() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let with = |key: &str, dir: &Path| {
            let table = match key {
                "log.dir" => format!("[log]\ndir = {dir:?}\n"),
                "audit.dir" => format!("[audit]\nenabled = true\ndir = {dir:?}\n"),
                _ => format!("[audit.transcript]\ndir = {dir:?}\n"),
            };
            Config::parse(&(MINIMAL.to_owned() + &table), p()).unwrap()
        };
        for key in ["log.dir", "audit.dir", "audit.transcript.dir"] {
            // Exists, or can be created: fine, and nothing is left behind.
            with(key, tmp.path()).check_dirs(p()).unwrap();
            with(key, &tmp.path().join("new/sub"))
                .check_dirs(p())
                .unwrap();
            assert!(!tmp.path().join("new").exists());
            for bad in [file.clone(), file.join("sub"), "/proc/popgate-none".into()] {
                let e = with(key, &bad).check_dirs(p()).unwrap_err().to_string();
                assert!(e.contains(&format!("`{key}`")), "{key} {bad:?}: {e}");
            }
        }
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            1,
            "probe files removed"
        );
    }

    #[test]
    fn validation_names_the_key() {
        let c = Config::parse(&(MINIMAL.to_owned() + "[limits]\nmax_line = 10\n"), p()).unwrap();
        let e = c.validate(p()).unwrap_err().to_string();
        assert!(
            e.contains("limits.max_line") && e.contains("test.toml"),
            "{e}"
        );
        let c = Config::parse(&MINIMAL.replace("127.0.0.1:110", "nohost"), p()).unwrap();
        let e = c.validate(p()).unwrap_err().to_string();
        assert!(e.contains("upstream.address"), "{e}");
    }

    #[test]
    fn original_destination_is_an_address_but_not_behind_a_balancer() {
        let text = MINIMAL.replace("127.0.0.1:110", ORIGINAL_DESTINATION);
        let c = Config::parse(&text, p()).unwrap();
        assert!(c.default_upstream().original_destination());
        if cfg!(target_os = "linux") {
            c.validate(p()).unwrap();
        } else {
            let e = c.validate(p()).unwrap_err().to_string();
            assert!(e.contains("needs Linux"), "{e}");
        }
        let balanced = text.replace(
            "[upstream]",
            "proxy_protocol = true\ntrusted_proxies = [\"10.0.0.1\"]\n[upstream]",
        );
        let c = Config::parse(&balanced, p()).unwrap();
        let e = c.validate(p()).unwrap_err().to_string();
        if cfg!(target_os = "linux") {
            assert!(
                e.contains("listener[0].proxy_protocol") && e.contains("original-destination"),
                "{e}"
            );
        }
        let c = Config::parse(&MINIMAL.replace("127.0.0.1:110", "original-dest"), p()).unwrap();
        assert!(!c.default_upstream().original_destination());
        assert!(c.validate(p()).is_err(), "a near miss is not host:port");
        if cfg!(target_os = "linux") {
            let routed = text.replace("[upstream]", "[routing]\n[upstream]");
            let e = Config::parse(&routed, p())
                .unwrap()
                .validate(p())
                .unwrap_err();
            assert!(e.to_string().contains("needs direct mode"), "{e}");
            let listed = MINIMAL.replace(
                "\"127.0.0.1:110\"",
                "[\"127.0.0.1:110\", \"original-destination\"]",
            );
            let e = Config::parse(&listed, p())
                .unwrap()
                .validate(p())
                .unwrap_err();
            assert!(e.to_string().contains("stands alone"), "{e}");
        }
    }

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("[::1]:110"), Some(("::1", 110)));
        assert_eq!(
            split_host_port("mail.example:995"),
            Some(("mail.example", 995))
        );
        assert_eq!(split_host_port("x"), None);
        assert_eq!(split_host_port(":110"), None);
    }

    const LISTENER: &str = "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\n";

    fn routed(tables: &str) -> Result<Config, String> {
        let c = Config::parse(&format!("{LISTENER}{tables}"), p()).map_err(|e| e.to_string())?;
        c.validate(p()).map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn one_upstream_table_or_named_entries_and_address_lists() {
        let c = routed("[upstream]\naddress = \"a:1\"\n").unwrap();
        assert!(!c.routing_mode());
        assert_eq!(c.default_upstream().address, ["a:1"]);
        assert_eq!(c.default_upstream().label(), "default");
        assert_eq!(c.upstreams[0].dead_for, Duration::from_secs(10));
        let c = routed(
            "[[upstream]]\nname = \"x\"\naddress = [\"a:1\", \"b:2\"]\n\
             [[upstream]]\nname = \"y\"\naddress = \"c:3\"\n\
             [routing]\ndefault = \"y\"\n",
        )
        .unwrap();
        assert!(c.routing_mode());
        assert_eq!(c.upstreams[0].address, ["a:1", "b:2"]);
        assert_eq!(c.default_upstream().label(), "y");
        assert_eq!(c.routing.as_ref().unwrap().greeting, "popgate ready");
        // `[routing]` alone turns routing mode on for one upstream.
        let c = routed("[upstream]\naddress = \"a:1\"\n[routing]\n").unwrap();
        assert!(c.routing_mode());
        // Unknown keys in an entry still name the key.
        let e = routed("[[upstream]]\nname = \"x\"\naddress = \"a:1\"\nadress = 1\n").unwrap_err();
        assert!(e.contains("adress"), "{e}");
        let e = Config::parse(&format!("upstream = []\n{LISTENER}"), p())
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least one upstream"), "{e}");
    }

    #[test]
    fn upstream_and_routing_mistakes_name_the_key() {
        for (tables, key) in [
            (
                "[[upstream]]\naddress = \"a:1\"\n[[upstream]]\nname = \"y\"\naddress = \"b:1\"\n",
                "upstream[0].name",
            ),
            (
                "[[upstream]]\nname = \"y\"\naddress = \"a:1\"\n[[upstream]]\nname = \"y\"\naddress = \"b:1\"\n",
                "upstream[1].name",
            ),
            (
                "[[upstream]]\nname = \"x\"\naddress = \"a:1\"\n[[upstream]]\nname = \"y\"\naddress = \"b:1\"\n",
                "routing.default",
            ),
            (
                "[upstream]\nname = \"x\"\naddress = \"a:1\"\n[routing]\ndefault = \"z\"\n",
                "routing.default",
            ),
            ("[upstream]\naddress = []\n", "upstream.address"),
            (
                "[upstream]\naddress = [\"a:1\", \"nope\"]\n",
                "upstream.address",
            ),
            (
                "[upstream]\nname = \"a b\"\naddress = \"a:1\"\n",
                "upstream.name",
            ),
            (
                "[upstream]\naddress = \"a:1\"\n[routing]\ngreeting = \"hi <1@x>\"\n",
                "routing.greeting",
            ),
        ] {
            let e = routed(tables).unwrap_err();
            assert!(e.contains(&format!("`{key}`")), "{tables}: {e}");
        }
    }
}
