//! The merge: for each setting, the environment's value over the file's (the default is
//! applied by validation, since some defaults derive from other settings). The result keeps
//! where each value came from, so that validation can name the variable or key to fix.

use super::ConfigError;
use super::env::EnvSettings;
use super::file::FileSettings;

/// One setting's value as found, and where.
pub(super) enum Raw {
    /// A variable's name and its (non-empty) text.
    Env { name: &'static str, value: String },
    /// `Section.Key` as documented, and the file's value of any TOML type.
    File {
        key: &'static str,
        value: toml::Value,
    },
}

/// Every setting's value before validation; `None` where neither source sets it.
pub(super) struct Settings {
    pub log_file: Option<Raw>,
    pub log_level: Option<Raw>,
    pub db_host: Option<Raw>,
    pub db_port: Option<Raw>,
    pub db_name: Option<Raw>,
    pub db_user: Option<Raw>,
    pub db_pass: Option<Raw>,
    pub db_ssl_mode: Option<Raw>,
    pub db_ca: Option<Raw>,
    pub db_ssl_cert: Option<Raw>,
    pub db_ssl_key: Option<Raw>,
    pub stream_channel: Option<Raw>,
    pub channels: Option<Raw>,
    pub health_check_interval: Option<Raw>,
    pub health_check_timeout: Option<Raw>,
    pub source: Option<Raw>,
    pub max_payload: Option<Raw>,
    pub retention: Option<Raw>,
    pub poll_interval: Option<Raw>,
    pub http_port: Option<Raw>,
    pub http_stream: Option<Raw>,
    pub ping_interval: Option<Raw>,
    pub pong_timeout: Option<Raw>,
    pub client_queue: Option<Raw>,
    pub handshake_timeout: Option<Raw>,
    pub max_frame_size: Option<Raw>,
    pub max_clients: Option<Raw>,
    pub history_messages: Option<Raw>,
    pub history_bytes: Option<Raw>,
    pub history_age: Option<Raw>,
    pub stream_token: Option<Raw>,
    pub admin_token: Option<Raw>,
    pub allowed_origins: Option<Raw>,
    pub jwt_secret: Option<Raw>,
    pub jwt_public_key: Option<Raw>,
    pub jwt_audience: Option<Raw>,
    pub jwt_issuer: Option<Raw>,
}

impl Settings {
    /// The environment over the file. A field of either that is not read here is dead code, which
    /// the compiler reports, so a setting cannot be forgotten.
    pub(super) fn merge(env: EnvSettings, file: FileSettings) -> Settings {
        let logger = file.logger;
        let receiver = file.receiver;
        let sender = file.sender;
        Settings {
            // No variable: the Docker image logs to stderr.
            log_file: from_file("Logger.LogFile", logger.log_file),
            log_level: from_env("LOG_LEVEL", env.log_level)
                .or(from_file("Logger.LogLevel", logger.log_level)),
            db_host: from_env("PG_HOST", env.pg_host)
                .or(from_file("Receiver.DBHost", receiver.db_host)),
            db_port: from_env("PG_PORT", env.pg_port)
                .or(from_file("Receiver.DBPort", receiver.db_port)),
            db_name: from_env("PG_DB", env.pg_db)
                .or(from_file("Receiver.DBName", receiver.db_name)),
            db_user: from_env("PG_USER", env.pg_user)
                .or(from_file("Receiver.DBUser", receiver.db_user)),
            db_pass: from_env("PG_PASSWORD", env.pg_password)
                .or(from_env("PG_PWD", env.pg_pwd))
                .or(from_file("Receiver.DBPass", receiver.db_pass)),
            db_ssl_mode: from_env("PG_SSLMODE", env.pg_sslmode)
                .or(from_file("Receiver.DBSSLMode", receiver.db_ssl_mode)),
            db_ca: from_env("PG_CA_B64", env.pg_ca_b64)
                .or(from_file("Receiver.DBCA", receiver.db_ca)),
            db_ssl_cert: from_env("PG_SSLCERT_B64", env.pg_sslcert_b64)
                .or(from_file("Receiver.DBSSLCert", receiver.db_ssl_cert)),
            db_ssl_key: from_env("PG_SSLKEY_B64", env.pg_sslkey_b64)
                .or(from_file("Receiver.DBSSLKey", receiver.db_ssl_key)),
            stream_channel: from_env("PG_CHANNEL", env.pg_channel)
                .or(from_file("Receiver.StreamChannel", receiver.stream_channel)),
            channels: from_env("PG_CHANNELS", env.pg_channels)
                .or(from_file("Receiver.Channels", receiver.channels)),
            health_check_interval: from_env("PG_HEALTH_INTERVAL", env.pg_health_interval).or(
                from_file(
                    "Receiver.HealthCheckInterval",
                    receiver.health_check_interval,
                ),
            ),
            health_check_timeout: from_env("PG_HEALTH_TIMEOUT", env.pg_health_timeout).or(
                from_file("Receiver.HealthCheckTimeout", receiver.health_check_timeout),
            ),
            source: from_env("PG_SOURCE", env.pg_source)
                .or(from_file("Receiver.Source", receiver.source)),
            max_payload: from_env("PG_MAX_PAYLOAD", env.pg_max_payload)
                .or(from_file("Receiver.MaxPayload", receiver.max_payload)),
            retention: from_env("PG_RETENTION", env.pg_retention)
                .or(from_file("Receiver.Retention", receiver.retention)),
            poll_interval: from_env("PG_POLL_INTERVAL", env.pg_poll_interval)
                .or(from_file("Receiver.PollInterval", receiver.poll_interval)),
            http_port: from_env("PORT", env.port)
                .or(from_file("Sender.HTTPPort", sender.http_port)),
            http_stream: from_env("STREAM", env.stream)
                .or(from_file("Sender.HTTPStream", sender.http_stream)),
            ping_interval: from_env("PING_INTERVAL", env.ping_interval)
                .or(from_file("Sender.PingInterval", sender.ping_interval)),
            pong_timeout: from_env("PONG_TIMEOUT", env.pong_timeout)
                .or(from_file("Sender.PongTimeout", sender.pong_timeout)),
            client_queue: from_env("CLIENT_QUEUE", env.client_queue)
                .or(from_file("Sender.ClientQueue", sender.client_queue)),
            handshake_timeout: from_env("HANDSHAKE_TIMEOUT", env.handshake_timeout).or(from_file(
                "Sender.HandshakeTimeout",
                sender.handshake_timeout,
            )),
            max_frame_size: from_env("MAX_FRAME_SIZE", env.max_frame_size)
                .or(from_file("Sender.MaxFrameSize", sender.max_frame_size)),
            max_clients: from_env("MAX_CLIENTS", env.max_clients)
                .or(from_file("Sender.MaxClients", sender.max_clients)),
            history_messages: from_env("HISTORY_MESSAGES", env.history_messages)
                .or(from_file("Sender.HistoryMessages", sender.history_messages)),
            history_bytes: from_env("HISTORY_BYTES", env.history_bytes)
                .or(from_file("Sender.HistoryBytes", sender.history_bytes)),
            history_age: from_env("HISTORY_AGE", env.history_age)
                .or(from_file("Sender.HistoryAge", sender.history_age)),
            stream_token: from_env("STREAM_TOKEN", env.stream_token)
                .or(from_file("Sender.StreamToken", sender.stream_token)),
            admin_token: from_env("ADMIN_TOKEN", env.admin_token)
                .or(from_file("Sender.AdminToken", sender.admin_token)),
            allowed_origins: from_env("ALLOWED_ORIGINS", env.allowed_origins)
                .or(from_file("Sender.AllowedOrigins", sender.allowed_origins)),
            jwt_secret: from_env("JWT_SECRET", env.jwt_secret)
                .or(from_file("Sender.JwtSecret", sender.jwt_secret)),
            jwt_public_key: from_env("JWT_PUBLIC_KEY", env.jwt_public_key)
                .or(from_file("Sender.JwtPublicKey", sender.jwt_public_key)),
            jwt_audience: from_env("JWT_AUDIENCE", env.jwt_audience)
                .or(from_file("Sender.JwtAudience", sender.jwt_audience)),
            jwt_issuer: from_env("JWT_ISSUER", env.jwt_issuer)
                .or(from_file("Sender.JwtIssuer", sender.jwt_issuer)),
        }
    }
}

/// An empty variable counts as unset: the original's start script wrote every variable into
/// the file, empty or not, and a deployment clears a setting by leaving it empty.
fn from_env(name: &'static str, value: Option<String>) -> Option<Raw> {
    value
        .filter(|value| !value.is_empty())
        .map(|value| Raw::Env { name, value })
}

fn from_file(key: &'static str, value: Option<toml::Value>) -> Option<Raw> {
    value.map(|value| Raw::File { key, value })
}

impl Raw {
    /// The variable or `Section.Key` that set the value.
    pub(super) fn origin(&self) -> &'static str {
        match self {
            Raw::Env { name, .. } => name,
            Raw::File { key, .. } => key,
        }
    }

    /// The text of the value, or `None` for a file value that is not a string.
    pub(super) fn text(&self) -> Option<&str> {
        match self {
            Raw::Env { value, .. } => Some(value),
            Raw::File { value, .. } => value.as_str(),
        }
    }

    /// The value as messages show it: quoted if text, as TOML otherwise, cut when long.
    fn shown(&self) -> String {
        match self {
            Raw::Env { value, .. }
            | Raw::File {
                value: toml::Value::String(value),
                ..
            } => {
                format!("{:?}", preview(value))
            }
            Raw::File { value, .. } => preview(&value.to_string()).to_owned(),
        }
    }

    /// `origin=value`, for a message about another setting that this one's value rules out.
    pub(super) fn describe(&self) -> String {
        format!("{}={}", self.origin(), self.shown())
    }

    /// An error naming the origin and the value.
    pub(super) fn invalid(&self, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin().to_owned(),
            value: self.shown(),
            reason: reason.into(),
        }
    }

    /// Like [`Raw::invalid`], for a secret: the value is not shown.
    pub(super) fn invalid_secret(&self, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin().to_owned(),
            value: "<redacted>".to_owned(),
            reason: reason.into(),
        }
    }

    /// Parses the value as text; integers in the file are accepted where the text parser
    /// accepts their decimal form (so `DBPort = 5432` and `PG_PORT=5432` share one parser).
    pub(super) fn parse<T>(
        &self,
        parser: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let parsed = match self {
            Raw::Env { value, .. }
            | Raw::File {
                value: toml::Value::String(value),
                ..
            } => parser(value),
            Raw::File {
                value: toml::Value::Integer(i),
                ..
            } => parser(&i.to_string()),
            Raw::File { value: other, .. } => {
                return Err(self.invalid(format!(
                    "expected a string or an integer, found a {}",
                    other.type_str()
                )));
            }
        };
        parsed.map_err(|reason| self.invalid(reason))
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
