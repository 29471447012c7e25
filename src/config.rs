//! Configuration: the Go original's TOML file, overridden by the environment, validated into a
//! typed [`Config`] before anything starts.
//!
//! Section and key names match case-insensitively, as they did in the original. Every key has a
//! default, so the file is optional. Values are parsed in two steps: [`Sources`] finds the raw
//! value (environment first, then file, then default) and remembers where it came from, so that
//! an error can name the exact key or variable and value the operator has to fix.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use log::LevelFilter;

use crate::error::ConfigError;
use crate::source::pg::{CaCertificates, SslMode};

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub logger: LoggerConfig,
    pub receiver: ReceiverConfig,
    pub sender: SenderConfig,
}

/// `[Logger]`.
#[derive(Debug, Clone)]
pub struct LoggerConfig {
    /// `None` logs to stderr.
    pub file: Option<PathBuf>,
    pub level: LevelFilter,
}

/// `[Receiver]`: the PostgreSQL connection that LISTENs.
#[derive(Clone)]
pub struct ReceiverConfig {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    pub password: String,
    pub sslmode: SslMode,
    pub ca: Option<CaCertificates>,
    /// The LISTEN channel, used as a quoted identifier (case-sensitive).
    pub channel: String,
    /// How often the LISTEN connection is checked with a query.
    pub health_interval: Duration,
    /// How long that query may take before the connection counts as lost.
    pub health_timeout: Duration,
}

/// Hand-written so that the password can never reach a log line or an error message.
impl fmt::Debug for ReceiverConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("sslmode", &self.sslmode)
            .field("ca", &self.ca)
            .field("channel", &self.channel)
            .field("health_interval", &self.health_interval)
            .field("health_timeout", &self.health_timeout)
            .finish()
    }
}

/// `[Sender]`: the HTTP and websocket side.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// 0 binds an ephemeral port (logged at start).
    pub port: u16,
    /// The websocket path segment, without slashes: `stream` serves `/stream`.
    pub stream_path: String,
    /// Period of the `{"action":"ping"}` frame and of websocket Ping frames.
    pub ping_interval: Duration,
    /// A client that has not answered (any frame, pongs included) for this long is dropped.
    pub pong_timeout: Duration,
    /// Frames a client may have queued before it is disconnected as too slow.
    pub client_queue: usize,
    /// A connection that has not completed its HTTP request head within this time is dropped.
    pub handshake_timeout: Duration,
    /// The largest websocket frame or message a client may send.
    pub max_frame_size: usize,
    /// Upgrades beyond this many connected clients get 503.
    pub max_clients: usize,
    /// When set, `/<stream>` requires it as a bearer token or `?token=`.
    pub stream_token: Option<Secret>,
    /// When non-empty, a browser's `Origin` must be one of these (requests without `Origin`,
    /// as agents send them, are not affected).
    pub allowed_origins: Vec<String>,
}

/// A value that must never be printed: `Debug` shows only that it is set.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A loaded configuration plus what the file held that nobody reads, for one WARN line once
/// logging is up.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub unknown_keys: Vec<String>,
}

impl Config {
    /// Reads the optional file and the environment (through `env`, so that tests can pass a map).
    pub fn load(
        path: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Loaded, ConfigError> {
        let file = match path {
            Some(path) => FileValues::read(path)?,
            None => FileValues::default(),
        };
        let sources = Sources { file, env };
        let config = Config::from_sources(&sources)?;
        Ok(Loaded {
            config,
            unknown_keys: sources.file.unused(),
        })
    }

    /// Loads with the process environment.
    pub fn load_from_process_env(path: Option<&Path>) -> Result<Loaded, ConfigError> {
        Config::load(path, &|name| std::env::var(name).ok())
    }

    fn from_sources(s: &Sources<'_>) -> Result<Config, ConfigError> {
        let logger = LoggerConfig {
            file: s
                .string("Logger", "LogFile", &[])?
                .filter(|f| !f.is_empty())
                .map(PathBuf::from),
            level: s
                .parse("Logger", "LogLevel", &["LOG_LEVEL"], parse_level)?
                .unwrap_or(LevelFilter::Info),
        };
        let sslmode = match s.raw("Receiver", "DBSSLMode", &["PG_SSLMODE"]) {
            // The original's driver read an empty mode as `require`.
            Some(raw) if raw.text().is_some_and(str::is_empty) => SslMode::Require,
            Some(raw) => raw.parse(SslMode::parse)?,
            None => SslMode::Disable,
        };
        let receiver = ReceiverConfig {
            host: s.string_or("Receiver", "DBHost", &["PG_HOST"], "localhost")?,
            port: s
                .parse("Receiver", "DBPort", &["PG_PORT"], parse_port)?
                .unwrap_or(5432),
            dbname: s.string_or("Receiver", "DBName", &["PG_DB"], "stream")?,
            user: s.string_or("Receiver", "DBUser", &["PG_USER"], "postgres")?,
            password: s.secret("Receiver", "DBPass", &["PG_PASSWORD", "PG_PWD"])?,
            sslmode,
            ca: s.parse("Receiver", "DBCA", &["PG_CA_B64"], parse_ca_b64)?,
            channel: s
                .parse("Receiver", "StreamChannel", &["PG_CHANNEL"], parse_channel)?
                .unwrap_or_else(|| "events".to_owned()),
            health_interval: s
                .parse(
                    "Receiver",
                    "HealthCheckInterval",
                    &["PG_HEALTH_INTERVAL"],
                    parse_seconds,
                )?
                .unwrap_or(Duration::from_secs(30)),
            health_timeout: s
                .parse(
                    "Receiver",
                    "HealthCheckTimeout",
                    &["PG_HEALTH_TIMEOUT"],
                    parse_seconds,
                )?
                .unwrap_or(Duration::from_secs(10)),
        };
        let ping_interval = s
            .parse("Sender", "PingInterval", &["PING_INTERVAL"], parse_seconds)?
            .unwrap_or(Duration::from_secs(5));
        let sender = SenderConfig {
            port: s
                .parse("Sender", "HTTPPort", &["PORT"], parse_port)?
                .unwrap_or(8080),
            stream_path: s
                .parse("Sender", "HTTPStream", &["STREAM"], parse_stream_path)?
                .unwrap_or_else(|| "stream".to_owned()),
            ping_interval,
            pong_timeout: s
                .parse("Sender", "PongTimeout", &["PONG_TIMEOUT"], parse_seconds)?
                .unwrap_or(ping_interval * 3),
            client_queue: s
                .parse("Sender", "ClientQueue", &["CLIENT_QUEUE"], parse_positive)?
                .unwrap_or(1024),
            handshake_timeout: s
                .parse(
                    "Sender",
                    "HandshakeTimeout",
                    &["HANDSHAKE_TIMEOUT"],
                    parse_seconds,
                )?
                .unwrap_or(Duration::from_secs(10)),
            max_frame_size: s
                .parse(
                    "Sender",
                    "MaxFrameSize",
                    &["MAX_FRAME_SIZE"],
                    parse_positive,
                )?
                .unwrap_or(64 * 1024),
            max_clients: s
                .parse("Sender", "MaxClients", &["MAX_CLIENTS"], parse_positive)?
                .unwrap_or(20_000),
            stream_token: Some(s.secret("Sender", "StreamToken", &["STREAM_TOKEN"])?)
                .filter(|token| !token.is_empty())
                .map(Secret),
            allowed_origins: s.list("Sender", "AllowedOrigins", &["ALLOWED_ORIGINS"])?,
        };
        Ok(Config {
            logger,
            receiver,
            sender,
        })
    }
}

/// The file's values keyed by lower-cased `(section, key)`, remembering which were read.
#[derive(Default)]
struct FileValues {
    values: BTreeMap<(String, String), FileValue>,
    /// Lower-cased `(section, key)` pairs that a setting looked up; the rest are unknown.
    used: Mutex<HashSet<(String, String)>>,
}

struct FileValue {
    /// As spelled in the file, for messages: `Sender.HTTPPort`.
    origin: String,
    value: toml::Value,
}

impl FileValues {
    fn read(path: &Path) -> Result<FileValues, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let table: toml::Table = toml::from_str(&text).map_err(|err| ConfigError::Syntax {
            path: path.to_owned(),
            message: describe_toml_error(&text, &err),
        })?;
        let mut values = BTreeMap::new();
        for (section, body) in table {
            match body {
                toml::Value::Table(keys) => {
                    for (key, value) in keys {
                        let id = (section.to_lowercase(), key.to_lowercase());
                        let origin = format!("{section}.{key}");
                        values.insert(id, FileValue { origin, value });
                    }
                }
                value => {
                    // A key outside any section: nothing reads it, but keep it to warn about.
                    let id = (String::new(), section.to_lowercase());
                    values.insert(
                        id,
                        FileValue {
                            origin: section,
                            value,
                        },
                    );
                }
            }
        }
        Ok(FileValues {
            values,
            used: Mutex::default(),
        })
    }

    fn get(&self, section: &str, key: &str) -> Option<&FileValue> {
        let id = (section.to_lowercase(), key.to_lowercase());
        let found = self.values.get(&id);
        self.used
            .lock()
            .expect("the set is only inserted into; a panic cannot leave it torn")
            .insert(id);
        found
    }

    fn unused(&self) -> Vec<String> {
        let used = self
            .used
            .lock()
            .expect("the set is only inserted into; a panic cannot leave it torn");
        self.values
            .iter()
            .filter(|(id, _)| !used.contains(*id))
            .map(|(_, v)| v.origin.clone())
            .collect()
    }
}

/// One line for a TOML error: toml's own Display spans several lines with a source excerpt.
fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim_end_matches('\n').replace('\n', "; ");
    match err.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

/// Where settings come from: the environment beats the file.
struct Sources<'a> {
    file: FileValues,
    env: &'a dyn Fn(&str) -> Option<String>,
}

/// A value found for a setting, with where it came from.
enum Raw<'a> {
    Env { name: &'static str, value: String },
    File(&'a FileValue),
}

impl Raw<'_> {
    fn origin(&self) -> &str {
        match self {
            Raw::Env { name, .. } => name,
            Raw::File(v) => &v.origin,
        }
    }

    /// The text of the value, or `None` for a file value that is not a string.
    fn text(&self) -> Option<&str> {
        match self {
            Raw::Env { value, .. } => Some(value),
            Raw::File(v) => v.value.as_str(),
        }
    }

    /// The value as it should appear in a message: quoted text, or TOML for other types.
    fn shown(&self) -> String {
        match self {
            Raw::Env { value, .. } => format!("{:?}", preview(value)),
            Raw::File(v) => match &v.value {
                toml::Value::String(s) => format!("{:?}", preview(s)),
                other => preview(&other.to_string()).to_owned(),
            },
        }
    }

    fn invalid(&self, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin().to_owned(),
            value: self.shown(),
            reason: reason.into(),
        }
    }

    /// Parses the value as text; integers in the file are accepted where the text parser
    /// accepts their decimal form (so `DBPort = 5432` and `PG_PORT=5432` share one parser).
    fn parse<T>(&self, parser: impl Fn(&str) -> Result<T, String>) -> Result<T, ConfigError> {
        let text = match self {
            Raw::Env { value, .. } => value.clone(),
            Raw::File(v) => match &v.value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                other => {
                    return Err(self.invalid(format!(
                        "expected a string or an integer, found a {}",
                        other.type_str()
                    )));
                }
            },
        };
        parser(&text).map_err(|reason| self.invalid(reason))
    }
}

/// Long values (a base64 certificate) are cut in messages.
fn preview(value: &str) -> &str {
    const MAX: usize = 60;
    if value.len() <= MAX {
        return value;
    }
    let mut end = MAX;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

impl Sources<'_> {
    fn raw(&self, section: &str, key: &str, vars: &[&'static str]) -> Option<Raw<'_>> {
        let from_env = vars.iter().find_map(|name| {
            (self.env)(name)
                .filter(|v| !v.is_empty())
                .map(|value| Raw::Env { name, value })
        });
        // Look the file up even when the environment wins, so the key does not count as unknown.
        let from_file = self.file.get(section, key).map(Raw::File);
        from_env.or(from_file)
    }

    fn parse<T>(
        &self,
        section: &str,
        key: &str,
        vars: &[&'static str],
        parser: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        self.raw(section, key, vars)
            .map(|raw| raw.parse(parser))
            .transpose()
    }

    /// A text setting: file values must be TOML strings.
    fn string(
        &self,
        section: &str,
        key: &str,
        vars: &[&'static str],
    ) -> Result<Option<String>, ConfigError> {
        match self.raw(section, key, vars) {
            None => Ok(None),
            Some(raw) => match raw.text() {
                Some(text) => Ok(Some(text.to_owned())),
                None => Err(raw.invalid("expected a string")),
            },
        }
    }

    /// A list: a TOML array of strings, or one comma-separated string (the environment's form).
    fn list(
        &self,
        section: &str,
        key: &str,
        vars: &[&'static str],
    ) -> Result<Vec<String>, ConfigError> {
        let Some(raw) = self.raw(section, key, vars) else {
            return Ok(Vec::new());
        };
        let items: Vec<String> = match (&raw, raw.text()) {
            (_, Some(text)) => text.split(',').map(|item| item.trim().to_owned()).collect(),
            (Raw::File(v), None) => match &v.value {
                toml::Value::Array(values) => values
                    .iter()
                    .map(|value| value.as_str().map(|s| s.trim().to_owned()))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| raw.invalid("expected an array of strings"))?,
                _ => return Err(raw.invalid("expected an array of strings")),
            },
            (Raw::Env { .. }, None) => unreachable!("environment values are text"),
        };
        Ok(items.into_iter().filter(|item| !item.is_empty()).collect())
    }

    fn string_or(
        &self,
        section: &str,
        key: &str,
        vars: &[&'static str],
        default: &str,
    ) -> Result<String, ConfigError> {
        Ok(self
            .string(section, key, vars)?
            .unwrap_or_else(|| default.to_owned()))
    }

    /// Like [`Sources::string`], but a wrong type is reported without the value.
    fn secret(
        &self,
        section: &str,
        key: &str,
        vars: &[&'static str],
    ) -> Result<String, ConfigError> {
        match self.raw(section, key, vars) {
            None => Ok(String::new()),
            Some(raw) => match raw.text() {
                Some(text) => Ok(text.to_owned()),
                None => Err(ConfigError::Invalid {
                    origin: raw.origin().to_owned(),
                    value: "<redacted>".to_owned(),
                    reason: "expected a string".to_owned(),
                }),
            },
        }
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    text.trim()
        .parse::<u16>()
        .map_err(|_| "not a port number (0-65535)".to_owned())
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    match text.trim().parse::<u64>() {
        Ok(0) => Err("must be at least 1 second".to_owned()),
        Ok(secs) if secs <= 86_400 => Ok(Duration::from_secs(secs)),
        _ => Err("not a whole number of seconds (1-86400)".to_owned()),
    }
}

fn parse_positive(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) | Err(_) => Err("not a positive whole number".to_owned()),
        Ok(n) => Ok(n),
    }
}

/// Log level names of the original (DEBUG … PANIC) in any case, plus TRACE and OFF.
pub fn parse_level(text: &str) -> Result<LevelFilter, String> {
    Ok(match text.trim().to_ascii_uppercase().as_str() {
        "TRACE" => LevelFilter::Trace,
        "DEBUG" => LevelFilter::Debug,
        "INFO" => LevelFilter::Info,
        "WARN" | "WARNING" => LevelFilter::Warn,
        "ERROR" | "FATAL" | "PANIC" => LevelFilter::Error,
        "OFF" => LevelFilter::Off,
        _ => {
            return Err(
                "not a log level (DEBUG, INFO, WARN, ERROR, FATAL, PANIC, TRACE, OFF)".to_owned(),
            );
        }
    })
}

/// PostgreSQL channel names are identifiers: at most 63 bytes, and no NUL.
fn parse_channel(text: &str) -> Result<String, String> {
    if text.is_empty() {
        Err("the channel name is empty".to_owned())
    } else if text.len() > 63 {
        Err("a channel name is at most 63 bytes".to_owned())
    } else if text.contains('\0') {
        Err("a channel name cannot contain NUL".to_owned())
    } else {
        Ok(text.to_owned())
    }
}

/// One path segment; a leading slash is tolerated (`/stream` and `stream` both mean `/stream`).
fn parse_stream_path(text: &str) -> Result<String, String> {
    let segment = text.strip_prefix('/').unwrap_or(text);
    if segment.is_empty() {
        return Err("the stream path is empty".to_owned());
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-._~".contains(c);
    if !segment.chars().all(allowed) {
        return Err(
            "the stream path is one URL path segment (letters, digits, '-', '.', '_', '~')"
                .to_owned(),
        );
    }
    Ok(segment.to_owned())
}

/// `PG_CA_B64`: base64 of a PEM bundle or of one DER certificate, decoded in process.
fn parse_ca_b64(text: &str) -> Result<CaCertificates, String> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|err| format!("not base64 ({err})"))?;
    CaCertificates::parse(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::Write as _;

    fn load(file: Option<&str>, env: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.toml");
        if let Some(text) = file {
            let mut f = std::fs::File::create(&path).expect("create config");
            f.write_all(text.as_bytes()).expect("write config");
        }
        Config::load(file.map(|_| path.as_path()), &|name| env.get(name).cloned())
    }

    fn error(file: Option<&str>, env: &[(&str, &str)]) -> String {
        load(file, env).expect_err("should be rejected").to_string()
    }

    #[test]
    fn defaults_without_file() {
        let c = load(None, &[]).expect("defaults load").config;
        assert_eq!(c.receiver.port, 5432);
        assert_eq!(c.receiver.channel, "events");
        assert_eq!(c.receiver.sslmode, SslMode::Disable);
        assert_eq!(c.sender.port, 8080);
        assert_eq!(c.sender.stream_path, "stream");
        assert_eq!(c.sender.ping_interval, Duration::from_secs(5));
        assert_eq!(c.sender.pong_timeout, Duration::from_secs(15));
        assert_eq!(c.logger.level, LevelFilter::Info);
    }

    #[test]
    fn go_file_with_unknown_section_loads_case_insensitively() {
        let file = r#"
            [logger]
            loglevel = "warn"
            [RECEIVER]
            DBNAME = "vulcan"
            dbport = 6543
            DBSSLMode = ""
            StreamChannel = "My-Events"
            [Sender]
            HTTPPORT = 8092
            PingInterval = 10
            [Metrics]
            enabled = true
        "#;
        let loaded = load(Some(file), &[]).expect("loads");
        let c = loaded.config;
        assert_eq!(c.logger.level, LevelFilter::Warn);
        assert_eq!(c.receiver.dbname, "vulcan");
        assert_eq!(c.receiver.port, 6543);
        assert_eq!(c.receiver.sslmode, SslMode::Require);
        assert_eq!(c.receiver.channel, "My-Events");
        assert_eq!(c.sender.port, 8092);
        assert_eq!(c.sender.ping_interval, Duration::from_secs(10));
        assert_eq!(loaded.unknown_keys, vec!["Metrics.enabled".to_owned()]);
    }

    #[test]
    fn environment_beats_file_and_empty_means_unset() {
        let file = "[Receiver]\nDBHost = \"filehost\"\nDBPort = 1\n[Sender]\nHTTPPort = 1\n";
        let c = load(
            Some(file),
            &[
                ("PG_HOST", "envhost"),
                ("PORT", "9000"),
                ("PG_PORT", ""),
                ("PG_PWD", "old"),
                ("PG_PASSWORD", "new"),
            ],
        )
        .expect("loads")
        .config;
        assert_eq!(c.receiver.host, "envhost");
        assert_eq!(c.receiver.port, 1);
        assert_eq!(c.sender.port, 9000);
        assert_eq!(c.receiver.password, "new");
    }

    #[test]
    fn bad_values_name_the_culprit() {
        assert_eq!(
            error(None, &[("PG_PORT", "abc")]),
            r#"PG_PORT="abc": not a port number (0-65535)"#
        );
        assert!(error(None, &[("PORT", "70000")]).starts_with(r#"PORT="70000""#));
        assert!(error(None, &[("PG_SSLMODE", "bogus")]).starts_with(r#"PG_SSLMODE="bogus""#));
        assert!(error(None, &[("LOG_LEVEL", "verbose")]).starts_with(r#"LOG_LEVEL="verbose""#));
        assert!(error(Some("[Receiver]\nDBPort = \"x\"\n"), &[]).starts_with("Receiver.DBPort"));
        assert!(error(Some("[Receiver]\nDBPort = true\n"), &[]).contains("found a boolean"));
        assert!(
            error(Some("[Sender]\nPingInterval = 0\n"), &[]).starts_with("Sender.PingInterval=0")
        );
        assert!(error(Some("[Receiver]\nStreamChannel = \"\"\n"), &[]).contains("empty"));
        assert!(error(None, &[("PG_CA_B64", "!!!")]).contains("not base64"));
        assert!(error(None, &[("PG_CA_B64", "aGVsbG8=")]).contains("certificate"));
    }

    #[test]
    fn syntax_error_is_one_line_with_its_position() {
        let message = error(Some("[Sender]\nHTTPPort = = 3\n"), &[]);
        assert!(message.contains("line 2"), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn password_is_never_shown() {
        let message = error(Some("[Receiver]\nDBPass = 1234\n"), &[]);
        assert!(!message.contains("1234"), "{message}");
        let c = load(None, &[("PG_PASSWORD", "hunter2")])
            .expect("loads")
            .config;
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn limits_and_auth_settings() {
        let file = "[Sender]\nAllowedOrigins = [\"https://a.example\", \"https://b.example\"]\nMaxClients = 5\n";
        let c = load(Some(file), &[("STREAM_TOKEN", "t0k")])
            .expect("loads")
            .config;
        assert_eq!(c.sender.allowed_origins.len(), 2);
        assert_eq!(c.sender.max_clients, 5);
        assert_eq!(c.sender.stream_token, Some(Secret("t0k".to_owned())));
        assert!(!format!("{c:?}").contains("t0k"));
        let c = load(
            None,
            &[("ALLOWED_ORIGINS", "https://a.example, https://c.example")],
        )
        .expect("loads")
        .config;
        assert_eq!(
            c.sender.allowed_origins,
            ["https://a.example", "https://c.example"]
        );
        assert!(error(Some("[Sender]\nAllowedOrigins = [1]\n"), &[]).contains("array of strings"));
        assert!(error(None, &[("MAX_CLIENTS", "0")]).starts_with("MAX_CLIENTS"));
    }

    #[test]
    fn stream_path_tolerates_a_leading_slash() {
        let c = load(None, &[("STREAM", "/agents")]).expect("loads").config;
        assert_eq!(c.sender.stream_path, "agents");
        assert!(error(None, &[("STREAM", "a/b")]).starts_with("STREAM"));
    }
}
