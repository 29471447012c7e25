//! Configuration: the Go original's TOML file, overridden by the environment, validated into
//! a typed [`Config`] before anything starts. Every setting has a default, so the file is
//! optional.
//!
//! # Layout
//! One file per step, run in this order by [`Config::load`]:
//! - `file.rs`: reads the TOML file into serde structs. Names are lower-cased first, because
//!   the original matched them case-insensitively and deployed files rely on it. Names nothing
//!   reads are kept for one warning.
//! - `env.rs`: reads the environment into a struct of optional strings with envy.
//! - `merge.rs`: for each setting, the variable over the file key, remembering which one it
//!   was, so that an error names what the operator has to fix.
//! - `validate.rs`: gives each value its type (parsers in `values.rs`) or its default.
//! - `tls.rs`: the database's TLS settings: `sslmode`, the CA certificates, the client
//!   certificate and key (`private_key.rs` brings the key to the PKCS#8 form native-tls reads).
//! - `error.rs`: [`ConfigError`].
//!
//! Configuration is a leaf of the crate: it imports nothing from the rooms that use it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::LevelFilter;

mod env;
mod error;
mod file;
mod jwt;
mod merge;
mod private_key;
mod tls;
mod validate;
mod values;

pub use error::ConfigError;
pub use jwt::JwtKeys;
pub use tls::{CaCertificates, ClientIdentity, SslMode};
pub use validate::DEFAULT_RETENTION_SECS;
pub use values::parse_level;

use env::EnvSettings;
use file::ConfigFile;
use merge::Settings;

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
    /// The certificate and key presented to the server (libpq's `sslcert` and `sslkey`); set
    /// only with an sslmode other than `disable`.
    pub client_identity: Option<ClientIdentity>,
    /// The LISTEN channel, used as a quoted identifier (case-sensitive): the default channel,
    /// which clients get when they name none.
    pub channel: String,
    /// The other channels (`Receiver.Channels`), LISTENed on the same connection (in table
    /// mode, read from the same table); none repeats the default.
    pub extra_channels: Vec<String>,
    /// How often the LISTEN connection is checked with a query.
    pub health_interval: Duration,
    /// How long that query may take before the connection counts as lost.
    pub health_timeout: Duration,
    /// Where messages come from: NOTIFY payloads, or rows of `vulcan_stream.messages`.
    pub source: SourceKind,
    /// Table mode: the largest payload a publisher may store (bytes); larger rows are refused
    /// by the database and, should one get there, dropped by the reader.
    pub max_payload: usize,
    /// Table mode: how long rows are kept for clients that resume.
    pub retention: Duration,
    /// Table mode: how often the sequencer looks for newly committed rows.
    pub poll_interval: Duration,
}

/// `Receiver.Source` / `PG_SOURCE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// `LISTEN` on the channel: what was committed while nobody listened is gone.
    Notify,
    /// Rows of `vulcan_stream.messages`: durable, with positions shared by every replica.
    Table,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Notify => "notify",
            SourceKind::Table => "table",
        }
    }
}

impl ReceiverConfig {
    /// Every channel the stream carries, the default first.
    pub fn channels(&self) -> Vec<String> {
        std::iter::once(self.channel.clone())
            .chain(self.extra_channels.iter().cloned())
            .collect()
    }
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
            .field("client_identity", &self.client_identity)
            .field("channel", &self.channel)
            .field("extra_channels", &self.extra_channels)
            .field("health_interval", &self.health_interval)
            .field("health_timeout", &self.health_timeout)
            .field("source", &self.source)
            .field("max_payload", &self.max_payload)
            .field("retention", &self.retention)
            .field("poll_interval", &self.poll_interval)
            .finish()
    }
}

/// `[Sender]`: the HTTP and websocket side.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// 0 binds an ephemeral port (logged at start).
    pub port: u16,
    /// The stream path segment, without slashes: `stream` serves `/stream` (websocket and SSE).
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
    /// Clients (websocket or SSE) beyond this many connected get 503.
    pub max_clients: usize,
    /// The history that resuming clients are served from: at most this many messages (0 keeps
    /// none), ...
    pub history_messages: usize,
    /// ... this many bytes, every encoding of a message counted, ...
    pub history_bytes: usize,
    /// ... and none older than this.
    pub history_age: Duration,
    /// When set, `/<stream>` requires it as a bearer token or `?token=`.
    pub stream_token: Option<Secret>,
    /// When set, `/clients` lists the connected clients to a request bearing it; without it
    /// the route does not exist (404), so a node never shows its clients by default.
    pub admin_token: Option<Secret>,
    /// When non-empty, a browser's `Origin` must be one of these (requests without `Origin`,
    /// as agents send them, are not affected).
    pub allowed_origins: Vec<String>,
    /// When set, `/<stream>` admits a client whose signed token these keys verify (besides
    /// `stream_token`, which keeps working).
    pub jwt: Option<JwtKeys>,
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
            Some(path) => ConfigFile::read(path)?,
            None => ConfigFile::default(),
        };
        let env = EnvSettings::read(env)?;
        let config = Settings::merge(env, file.settings).validate()?;
        Ok(Loaded {
            config,
            unknown_keys: file.unknown_keys,
        })
    }

    /// Loads with the process environment.
    pub fn load_from_process_env(path: Option<&Path>) -> Result<Loaded, ConfigError> {
        Config::load(path, &|name| std::env::var(name).ok())
    }
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
        assert_eq!(c.receiver.source, SourceKind::Notify);
        assert_eq!(c.receiver.max_payload, 1 << 20);
        assert_eq!(c.receiver.retention, Duration::from_secs(7 * 86_400));
        assert_eq!(c.receiver.poll_interval, Duration::from_millis(5));
    }

    #[test]
    fn table_mode_keys_from_file_and_environment() {
        let file = "[Receiver]\nSource = \"table\"\nMaxPayload = 65536\nRetention = 3600\nPollInterval = 2\n";
        let c = load(Some(file), &[]).expect("loads").config;
        assert_eq!(c.receiver.source, SourceKind::Table);
        assert_eq!(c.receiver.max_payload, 65_536);
        assert_eq!(c.receiver.retention, Duration::from_secs(3600));
        assert_eq!(c.receiver.poll_interval, Duration::from_millis(2));
        let c = load(Some(file), &[("PG_SOURCE", "notify")])
            .expect("loads")
            .config;
        assert_eq!(c.receiver.source, SourceKind::Notify);
        assert_eq!(
            error(None, &[("PG_SOURCE", "outbox")]),
            r#"PG_SOURCE="outbox": not a source (notify, table)"#
        );
        assert!(
            error(Some("[Receiver]\nMaxPayload = 10\n"), &[])
                .starts_with("Receiver.MaxPayload=10: not a size in bytes")
        );
        assert!(error(None, &[("PG_RETENTION", "1")]).starts_with(r#"PG_RETENTION="1""#));
        assert!(error(None, &[("PG_POLL_INTERVAL", "0")]).starts_with(r#"PG_POLL_INTERVAL="0""#));
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
    fn channels_come_from_the_file_or_the_environment() {
        let file = "[Receiver]\nStreamChannel = \"main\"\nChannels = [\"jobs\", \"main\", \"audit\", \"jobs\"]\n";
        let c = load(Some(file), &[]).expect("loads").config;
        assert_eq!(c.receiver.channels(), ["main", "jobs", "audit"]);
        let c = load(Some(file), &[("PG_CHANNELS", " a, b ,,")])
            .expect("loads")
            .config;
        assert_eq!(c.receiver.channels(), ["main", "a", "b"]);
        let c = load(None, &[]).expect("loads").config;
        assert_eq!(c.receiver.channels(), ["events"]);
        assert_eq!(
            error(None, &[("PG_CHANNELS", &format!("ok,{}", "x".repeat(64)))]),
            format!(
                "PG_CHANNELS={:?}: a channel name is at most 63 bytes",
                "x".repeat(64)
            )
        );
        assert!(error(Some("[Receiver]\nChannels = 3\n"), &[]).starts_with("Receiver.Channels=3"));
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
        assert_eq!(c.sender.admin_token, None);
        let c = load(Some("[Sender]\nAdminToken = \"adm1n\"\n"), &[])
            .expect("loads")
            .config;
        assert_eq!(c.sender.admin_token, Some(Secret("adm1n".to_owned())));
        assert!(!format!("{c:?}").contains("adm1n"));
        let c = load(None, &[("ADMIN_TOKEN", "env-admin")])
            .expect("loads")
            .config;
        assert_eq!(c.sender.admin_token, Some(Secret("env-admin".to_owned())));
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
    fn client_certificate_and_key_come_together_and_need_tls() {
        let b64 =
            |text: &str| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, text);
        let cert = b64("-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n");
        let key = b64(
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXJrZXI=\n-----END PRIVATE KEY-----\n",
        );
        let tls = ("PG_SSLMODE", "verify-full");
        assert_eq!(
            error(None, &[tls, ("PG_SSLCERT_B64", &cert)]),
            "PG_SSLCERT_B64 is set without PG_SSLKEY_B64 or Receiver.DBSSLKey: \
             a client certificate needs its private key"
        );
        let message = error(Some(&format!("[Receiver]\nDBSSLKey = \"{key}\"\n")), &[tls]);
        assert!(
            message.starts_with(
                "Receiver.DBSSLKey is set without PG_SSLCERT_B64 or Receiver.DBSSLCert"
            ),
            "{message}"
        );
        assert!(!message.contains(&key), "{message}");
        let both = [
            ("PG_SSLCERT_B64", cert.as_str()),
            ("PG_SSLKEY_B64", key.as_str()),
        ];
        assert!(error(None, &both).starts_with(
            "PG_SSLCERT_B64 and PG_SSLKEY_B64 cannot be used with sslmode disable (the default)"
        ));
        let file = "[Receiver]\nDBSSLMode = \"disable\"\n";
        assert!(
            error(Some(file), &both)
                .contains(r#"cannot be used with Receiver.DBSSLMode="disable": "#)
        );
    }

    #[test]
    fn a_bad_client_certificate_or_key_is_named_and_the_key_never_shown() {
        let b64 =
            |text: &str| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, text);
        let cert = b64("hello");
        let marker = "c2VjcmV0LWtleS1tYXJrZXI";
        let tls = ("PG_SSLMODE", "require");
        // The key's base64 is checked before either is parsed.
        let message = error(
            None,
            &[
                tls,
                ("PG_SSLCERT_B64", &cert),
                ("PG_SSLKEY_B64", &format!("{marker}*")),
            ],
        );
        assert_eq!(message, "PG_SSLKEY_B64=<redacted>: not base64");
        let key = b64(&format!(
            "-----BEGIN EC PRIVATE KEY-----\n{marker}=\n-----END EC PRIVATE KEY-----\n"
        ));
        let message = error(
            None,
            &[tls, ("PG_SSLCERT_B64", &cert), ("PG_SSLKEY_B64", &key)],
        );
        assert!(
            message.starts_with(&format!("PG_SSLCERT_B64={cert:?}: not a PEM certificate")),
            "{message}"
        );
        let pem_cert = b64("-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n");
        let message = error(
            None,
            &[tls, ("PG_SSLCERT_B64", &pem_cert), ("PG_SSLKEY_B64", &key)],
        );
        assert!(message.starts_with("PG_SSLCERT_B64="), "{message}");
        let file = format!(
            "[Receiver]\nDBSSLMode = \"require\"\nDBSSLCert = \"{cert}\"\nDBSSLKey = 1234\n"
        );
        assert_eq!(
            error(Some(&file), &[]),
            "Receiver.DBSSLKey=<redacted>: expected a string"
        );
        let message = error(
            None,
            &[
                tls,
                ("PG_SSLCERT_B64", &cert),
                ("PG_SSLKEY_B64", "-----BEGIN PRIVATE KEY-----"),
            ],
        );
        assert!(message.contains("base64 -w0"), "{message}");
    }

    #[test]
    fn stream_path_tolerates_a_leading_slash() {
        let c = load(None, &[("STREAM", "/agents")]).expect("loads").config;
        assert_eq!(c.sender.stream_path, "agents");
        assert!(error(None, &[("STREAM", "a/b")]).starts_with("STREAM"));
    }
}
