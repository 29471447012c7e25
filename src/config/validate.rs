//! Validation: each merged value gets its type, each unset one its default, and the result is
//! the typed [`Config`]. An error names the variable or key and the value (never a secret's).

use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::DecodingKey;
use log::LevelFilter;

use super::jwt;
use super::merge::{Raw, Settings};
use super::tls::{IdentityError, decode_base64, decode_secret_base64};
use super::values::{
    parse_channel, parse_count, parse_level, parse_max_payload, parse_poll_interval, parse_port,
    parse_positive, parse_retention, parse_seconds, parse_source, parse_stream_path,
};
use super::{
    CaCertificates, ClientIdentity, Config, ConfigError, JwtKeys, LoggerConfig, ReceiverConfig,
    Secret, SenderConfig, SourceKind, SslMode,
};

/// Seven days: a week-end's outage of every replica still resumes, at a table size an operator
/// can plan for (rows × payload size × a week).
pub const DEFAULT_RETENTION_SECS: u64 = 7 * 86_400;

impl Settings {
    pub(super) fn validate(self) -> Result<Config, ConfigError> {
        let logger = LoggerConfig {
            file: text(self.log_file)?
                .filter(|file| !file.is_empty())
                .map(PathBuf::from),
            level: parsed(self.log_level, parse_level)?.unwrap_or(LevelFilter::Info),
        };
        let sslmode_setting = self.db_ssl_mode.as_ref().map(Raw::describe);
        let channel =
            parsed(self.stream_channel, parse_channel)?.unwrap_or_else(|| "events".to_owned());
        let extra_channels = channels(self.channels, &channel)?;
        let sslmode = ssl_mode(self.db_ssl_mode)?;
        let receiver = ReceiverConfig {
            host: text(self.db_host)?.unwrap_or_else(|| "localhost".to_owned()),
            port: parsed(self.db_port, parse_port)?.unwrap_or(5432),
            dbname: text(self.db_name)?.unwrap_or_else(|| "stream".to_owned()),
            user: text(self.db_user)?.unwrap_or_else(|| "postgres".to_owned()),
            password: secret(self.db_pass)?.unwrap_or_default(),
            sslmode,
            ca: parsed(self.db_ca, CaCertificates::parse_base64)?,
            client_identity: client_identity(
                self.db_ssl_cert,
                self.db_ssl_key,
                (sslmode, sslmode_setting),
            )?,
            channel,
            extra_channels,
            health_interval: parsed(self.health_check_interval, parse_seconds)?
                .unwrap_or(Duration::from_secs(30)),
            health_timeout: parsed(self.health_check_timeout, parse_seconds)?
                .unwrap_or(Duration::from_secs(10)),
            source: parsed(self.source, parse_source)?.unwrap_or(SourceKind::Notify),
            max_payload: parsed(self.max_payload, parse_max_payload)?.unwrap_or(1 << 20),
            retention: parsed(self.retention, parse_retention)?
                .unwrap_or(Duration::from_secs(DEFAULT_RETENTION_SECS)),
            poll_interval: parsed(self.poll_interval, parse_poll_interval)?
                .unwrap_or(Duration::from_millis(5)),
        };
        let ping_interval =
            parsed(self.ping_interval, parse_seconds)?.unwrap_or(Duration::from_secs(5));
        let sender = SenderConfig {
            port: parsed(self.http_port, parse_port)?.unwrap_or(8080),
            stream_path: parsed(self.http_stream, parse_stream_path)?
                .unwrap_or_else(|| "stream".to_owned()),
            ping_interval,
            pong_timeout: parsed(self.pong_timeout, parse_seconds)?.unwrap_or(ping_interval * 3),
            client_queue: parsed(self.client_queue, parse_positive)?.unwrap_or(1024),
            handshake_timeout: parsed(self.handshake_timeout, parse_seconds)?
                .unwrap_or(Duration::from_secs(10)),
            max_frame_size: parsed(self.max_frame_size, parse_positive)?.unwrap_or(64 * 1024),
            max_clients: parsed(self.max_clients, parse_positive)?.unwrap_or(20_000),
            history_messages: parsed(self.history_messages, parse_count)?.unwrap_or(10_000),
            history_bytes: parsed(self.history_bytes, parse_count)?.unwrap_or(64 << 20),
            history_age: parsed(self.history_age, parse_seconds)?
                .unwrap_or(Duration::from_secs(3600)),
            stream_token: secret(self.stream_token)?
                .filter(|token| !token.is_empty())
                .map(Secret),
            admin_token: secret(self.admin_token)?
                .filter(|token| !token.is_empty())
                .map(Secret),
            allowed_origins: list(self.allowed_origins)?,
            jwt: jwt_keys(
                self.jwt_secret,
                self.jwt_public_key,
                self.jwt_audience,
                self.jwt_issuer,
            )?,
        };
        Ok(Config {
            logger,
            receiver,
            sender,
        })
    }
}

/// The token keys, when a secret or a public key is set; an audience or issuer needs one of
/// them, since without a key no token is verified at all.
fn jwt_keys(
    secret_raw: Option<Raw>,
    public_raw: Option<Raw>,
    audience: Option<Raw>,
    issuer: Option<Raw>,
) -> Result<Option<JwtKeys>, ConfigError> {
    let secret_text = secret(secret_raw)?.filter(|s| !s.is_empty());
    let public = match public_raw {
        Some(raw) if raw.text().is_some_and(|t| !t.trim().is_empty()) => {
            Some(raw.parse(jwt::parse_public_key)?)
        }
        Some(raw) if raw.text().is_none() => return Err(raw.invalid("expected a string")),
        _ => None,
    };
    let audience_set = audience.as_ref().map(|raw| raw.origin().to_owned());
    let issuer_set = issuer.as_ref().map(|raw| raw.origin().to_owned());
    let audience = text(audience)?.filter(|s| !s.is_empty());
    let issuer = text(issuer)?.filter(|s| !s.is_empty());
    if secret_text.is_none() && public.is_none() {
        if let Some(set) = audience_set
            .filter(|_| audience.is_some())
            .or(issuer_set.filter(|_| issuer.is_some()))
        {
            return Err(ConfigError::Unpaired {
                set,
                missing: "JWT_SECRET (Sender.JwtSecret) or JWT_PUBLIC_KEY (Sender.JwtPublicKey)"
                    .to_owned(),
                reason: "tokens are verified only with a key",
            });
        }
        return Ok(None);
    }
    Ok(Some(JwtKeys {
        secret: secret_text.map(|s| DecodingKey::from_secret(s.as_bytes())),
        public,
        audience,
        issuer,
    }))
}

/// A value read by a text parser (see [`Raw::parse`]).
fn parsed<T>(
    raw: Option<Raw>,
    parser: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, ConfigError> {
    raw.map(|raw| raw.parse(parser)).transpose()
}

/// Text taken as it is; in the file it must be a TOML string.
fn text(raw: Option<Raw>) -> Result<Option<String>, ConfigError> {
    raw.map(|raw| match raw.text() {
        Some(text) => Ok(text.to_owned()),
        None => Err(raw.invalid("expected a string")),
    })
    .transpose()
}

/// Like [`text`], but a wrong type is reported without the value.
fn secret(raw: Option<Raw>) -> Result<Option<String>, ConfigError> {
    raw.map(|raw| match raw.text() {
        Some(text) => Ok(text.to_owned()),
        None => Err(raw.invalid_secret("expected a string")),
    })
    .transpose()
}

/// A TOML array of strings, or one comma-separated string (the environment's form). Items are
/// trimmed and blank ones dropped.
/// The channels beyond the default one, each an identifier, in order, without repeats (the
/// default channel listed again is the default channel).
fn channels(raw: Option<Raw>, default: &str) -> Result<Vec<String>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    let origin = raw.origin();
    let mut channels: Vec<String> = Vec::new();
    for name in list(Some(raw))? {
        let name = parse_channel(&name).map_err(|reason| ConfigError::Invalid {
            origin: origin.to_owned(),
            value: format!("{name:?}"),
            reason,
        })?;
        if name != default && !channels.contains(&name) {
            channels.push(name);
        }
    }
    if channels.len() >= usize::from(u16::MAX) {
        return Err(ConfigError::Invalid {
            origin: origin.to_owned(),
            value: format!("{} channels", channels.len()),
            reason: "at most 65,534 channels besides the default one".to_owned(),
        });
    }
    Ok(channels)
}

fn list(raw: Option<Raw>) -> Result<Vec<String>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    let items = match &raw {
        Raw::File {
            value: toml::Value::Array(values),
            ..
        } => values.iter().map(toml::Value::as_str).collect(),
        _ => raw.text().map(|text| text.split(',').collect::<Vec<_>>()),
    }
    .ok_or_else(|| raw.invalid("expected an array of strings"))?;
    Ok(items
        .into_iter()
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect())
}

/// The client certificate and its key: both or neither, and not with sslmode `disable` (which
/// would silently leave them unused: `disable` is the default, so forgetting `PG_SSLMODE` is the
/// likely mistake). `sslmode` comes with the setting that chose it, if one did. The key's value
/// is never shown.
fn client_identity(
    cert: Option<Raw>,
    key: Option<Raw>,
    sslmode: (SslMode, Option<String>),
) -> Result<Option<ClientIdentity>, ConfigError> {
    let (cert, key) = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        (Some(cert), None) => {
            return Err(ConfigError::Unpaired {
                set: cert.origin().to_owned(),
                missing: "PG_SSLKEY_B64 or Receiver.DBSSLKey".to_owned(),
                reason: "a client certificate needs its private key",
            });
        }
        (None, Some(key)) => {
            return Err(ConfigError::Unpaired {
                set: key.origin().to_owned(),
                missing: "PG_SSLCERT_B64 or Receiver.DBSSLCert".to_owned(),
                reason: "a private key needs its client certificate",
            });
        }
    };
    if let (SslMode::Disable, setting) = sslmode {
        return Err(ConfigError::Conflict {
            origin: format!("{} and {}", cert.origin(), key.origin()),
            other: setting.unwrap_or_else(|| "sslmode disable (the default)".to_owned()),
            reason: "a client certificate is sent only over TLS; set PG_SSLMODE or \
                     Receiver.DBSSLMode to require, verify-ca or verify-full",
        });
    }
    let cert_pem = cert.parse(decode_base64)?;
    let key_text = key
        .text()
        .ok_or_else(|| key.invalid_secret("expected a string"))?;
    let key_pem = decode_secret_base64(key_text).map_err(|reason| key.invalid_secret(reason))?;
    let identity = ClientIdentity::parse(&cert_pem, &key_pem).map_err(|err| match err {
        IdentityError::Certificate(reason) => cert.invalid(reason),
        IdentityError::Key(reason) => key.invalid_secret(reason),
        IdentityError::Mismatch(reason) => key.invalid_secret(format!(
            "does not go with the certificate of {} ({reason})",
            cert.origin()
        )),
    })?;
    Ok(Some(identity))
}

/// Unset is `disable`. A file's `DBSSLMode = ""` is `require`, as the original's driver read it
/// (an empty variable never gets here: it counts as unset).
fn ssl_mode(raw: Option<Raw>) -> Result<SslMode, ConfigError> {
    match raw {
        None => Ok(SslMode::Disable),
        Some(raw) if raw.text().is_some_and(str::is_empty) => Ok(SslMode::Require),
        Some(raw) => raw.parse(SslMode::parse),
    }
}
