//! The TOML file, in the Go original's format, read into serde structs.
//!
//! The original matched section and key names case-insensitively (`[sender] httpport = 8092`
//! works) and deployed files rely on it, while serde matches names exactly. So the names of the
//! parsed table are lower-cased before it is deserialized, and every serde name below is the
//! lower-cased key. Two spellings of one name (`DBPort` and `dbport`) are an error rather than
//! a silent choice; sections spelled twice (`[Sender]`, `[sender]`) are merged.
//!
//! Values stay `toml::Value`s here. Validation gives them their types, because there an error
//! can name the documented key, the value and what is wrong with it (serde's message names
//! neither, and would show a password).
//!
//! What no struct reads is collected in the `unknown` maps and reported as the file spells it,
//! for one warning at start: the original's Docker file carries a `[Metrics]` section that this
//! service does not read, and such files must keep loading.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use toml::{Table, Value};

use super::ConfigError;

/// A file's settings and the names in it that nothing reads.
#[derive(Debug, Default)]
pub(super) struct ConfigFile {
    pub settings: FileSettings,
    /// `Section.Key` (or a top-level key) as spelled in the file, in name order.
    pub unknown_keys: Vec<String>,
}

/// The sections this service reads; each may be absent, as may each key (`None`).
///
/// Defaults are per field, not `#[serde(default)]` on the section structs: that would read
/// every field of a default section, and hide from the compiler a key that nothing reads.
#[derive(Debug, Default, Deserialize)]
pub(super) struct FileSettings {
    #[serde(default)]
    pub logger: LoggerSection,
    #[serde(default)]
    pub receiver: ReceiverSection,
    #[serde(default)]
    pub sender: SenderSection,
    /// Other sections, and keys outside any section.
    #[serde(flatten)]
    unknown: Table,
}

/// `[Logger]`.
#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a [Logger] section (a table)")]
pub(super) struct LoggerSection {
    #[serde(rename = "logfile")]
    pub log_file: Option<Value>,
    #[serde(rename = "loglevel")]
    pub log_level: Option<Value>,
    #[serde(flatten)]
    unknown: Table,
}

/// `[Receiver]`.
#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a [Receiver] section (a table)")]
pub(super) struct ReceiverSection {
    #[serde(rename = "dbhost")]
    pub db_host: Option<Value>,
    #[serde(rename = "dbport")]
    pub db_port: Option<Value>,
    #[serde(rename = "dbname")]
    pub db_name: Option<Value>,
    #[serde(rename = "dbuser")]
    pub db_user: Option<Value>,
    #[serde(rename = "dbpass")]
    pub db_pass: Option<Value>,
    #[serde(rename = "dbsslmode")]
    pub db_ssl_mode: Option<Value>,
    #[serde(rename = "dbca")]
    pub db_ca: Option<Value>,
    #[serde(rename = "dbsslcert")]
    pub db_ssl_cert: Option<Value>,
    #[serde(rename = "dbsslkey")]
    pub db_ssl_key: Option<Value>,
    #[serde(rename = "streamchannel")]
    pub stream_channel: Option<Value>,
    #[serde(rename = "channels")]
    pub channels: Option<Value>,
    #[serde(rename = "healthcheckinterval")]
    pub health_check_interval: Option<Value>,
    #[serde(rename = "healthchecktimeout")]
    pub health_check_timeout: Option<Value>,
    #[serde(rename = "source")]
    pub source: Option<Value>,
    #[serde(rename = "maxpayload")]
    pub max_payload: Option<Value>,
    #[serde(rename = "retention")]
    pub retention: Option<Value>,
    #[serde(rename = "pollinterval")]
    pub poll_interval: Option<Value>,
    #[serde(flatten)]
    unknown: Table,
}

/// `[Sender]`.
#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a [Sender] section (a table)")]
pub(super) struct SenderSection {
    #[serde(rename = "httpport")]
    pub http_port: Option<Value>,
    #[serde(rename = "httpstream")]
    pub http_stream: Option<Value>,
    #[serde(rename = "pinginterval")]
    pub ping_interval: Option<Value>,
    #[serde(rename = "pongtimeout")]
    pub pong_timeout: Option<Value>,
    #[serde(rename = "clientqueue")]
    pub client_queue: Option<Value>,
    #[serde(rename = "handshaketimeout")]
    pub handshake_timeout: Option<Value>,
    #[serde(rename = "maxframesize")]
    pub max_frame_size: Option<Value>,
    #[serde(rename = "maxclients")]
    pub max_clients: Option<Value>,
    #[serde(rename = "historymessages")]
    pub history_messages: Option<Value>,
    #[serde(rename = "historybytes")]
    pub history_bytes: Option<Value>,
    #[serde(rename = "historyage")]
    pub history_age: Option<Value>,
    #[serde(rename = "streamtoken")]
    pub stream_token: Option<Value>,
    #[serde(rename = "admintoken")]
    pub admin_token: Option<Value>,
    #[serde(rename = "allowedorigins")]
    pub allowed_origins: Option<Value>,
    #[serde(rename = "jwtsecret")]
    pub jwt_secret: Option<Value>,
    #[serde(rename = "jwtpublickey")]
    pub jwt_public_key: Option<Value>,
    #[serde(rename = "jwtaudience")]
    pub jwt_audience: Option<Value>,
    #[serde(rename = "jwtissuer")]
    pub jwt_issuer: Option<Value>,
    #[serde(flatten)]
    unknown: Table,
}

impl ConfigFile {
    pub(super) fn read(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let table: Table = toml::from_str(&text).map_err(|err| ConfigError::Syntax {
            path: path.to_owned(),
            message: describe_toml_error(&text, &err),
        })?;
        let mut spellings = Spellings::default();
        let mut lowered = Table::new();
        lower_case_names(&mut lowered, table, ("", ""), &mut spellings).map_err(
            |SameName { first, second }| ConfigError::SameName {
                path: path.to_owned(),
                first,
                second,
            },
        )?;
        let settings: FileSettings =
            lowered
                .try_into()
                .map_err(|err: toml::de::Error| ConfigError::Syntax {
                    path: path.to_owned(),
                    message: one_line(err.message()),
                })?;
        let unknown_keys = settings.unknown_keys(&spellings);
        Ok(ConfigFile {
            settings,
            unknown_keys,
        })
    }
}

impl FileSettings {
    /// The unread names, as dotted lower-case paths mapped back to the file's spelling.
    fn unknown_keys(&self, spellings: &Spellings) -> Vec<String> {
        let mut paths = Vec::new();
        for (name, value) in &self.unknown {
            match value {
                // An unknown section: name each of its keys, as for a known one.
                Value::Table(keys) => paths.extend(keys.keys().map(|key| format!("{name}.{key}"))),
                _ => paths.push(name.clone()),
            }
        }
        for (section, unknown) in [
            ("logger", &self.logger.unknown),
            ("receiver", &self.receiver.unknown),
            ("sender", &self.sender.unknown),
        ] {
            paths.extend(unknown.keys().map(|key| format!("{section}.{key}")));
        }
        paths.sort();
        paths.iter().map(|path| spellings.of(path)).collect()
    }
}

/// Dotted lower-case paths (`sender.httpport`) mapped to the file's spelling (`Sender.HTTPPort`),
/// so that messages use the operator's own words.
#[derive(Default)]
struct Spellings(BTreeMap<String, String>);

impl Spellings {
    fn of(&self, lower_path: &str) -> String {
        self.0
            .get(lower_path)
            .cloned()
            .unwrap_or_else(|| lower_path.to_owned())
    }
}

/// Two names of one table that differ only in case, as spelled.
struct SameName {
    first: String,
    second: String,
}

/// Moves `table`'s entries into `into` under lower-cased names, at every depth, merging tables
/// whose names differ only in case. `path` is the table's dotted path, lower-cased and as
/// spelled (both empty at the top).
fn lower_case_names(
    into: &mut Table,
    table: Table,
    path: (&str, &str),
    spellings: &mut Spellings,
) -> Result<(), SameName> {
    for (name, value) in table {
        let lower = name.to_lowercase();
        let lower_path = dotted(path.0, &lower);
        let spelled_path = dotted(path.1, &name);
        let inner_path = (lower_path.as_str(), spelled_path.as_str());
        match (into.get_mut(&lower), value) {
            (None, Value::Table(inner)) => {
                let mut lowered = Table::new();
                lower_case_names(&mut lowered, inner, inner_path, spellings)?;
                into.insert(lower, Value::Table(lowered));
            }
            (None, value) => {
                into.insert(lower, value);
            }
            (Some(Value::Table(existing)), Value::Table(inner)) => {
                lower_case_names(existing, inner, inner_path, spellings)?;
            }
            (Some(_), _) => {
                return Err(SameName {
                    first: spellings.of(&lower_path),
                    second: spelled_path,
                });
            }
        }
        spellings.0.entry(lower_path).or_insert(spelled_path);
    }
    Ok(())
}

fn dotted(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

/// One line for a TOML error: toml's own Display spans several lines with a source excerpt.
fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    let message = one_line(err.message());
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

fn one_line(message: &str) -> String {
    message.trim_end_matches('\n').replace('\n', "; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<ConfigFile, ConfigError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).expect("write config");
        ConfigFile::read(&path)
    }

    #[test]
    fn sections_spelled_twice_are_merged() {
        let file = read("[Sender]\nHTTPPort = 1\n[sender]\npinginterval = 2\n").expect("reads");
        let sender = file.settings.sender;
        assert_eq!(sender.http_port, Some(Value::Integer(1)));
        assert_eq!(sender.ping_interval, Some(Value::Integer(2)));
        assert!(file.unknown_keys.is_empty());
    }

    #[test]
    fn one_key_spelled_twice_is_an_error_naming_both() {
        let err = read("[Receiver]\nDBPort = 1\ndbport = 2\n").expect_err("ambiguous");
        let message = err.to_string();
        assert!(
            message.contains("Receiver.DBPort and Receiver.dbport"),
            "{message}"
        );
    }

    #[test]
    fn unknown_names_are_reported_as_spelled() {
        let file = read(
            "Top = 1\n[Metrics]\nEnabled = true\n[Sender]\nHTTPPort = 1\nExtra = \"x\"\n[Metrics.Sub]\nx = 1\n",
        )
        .expect("reads");
        assert_eq!(
            file.unknown_keys,
            ["Metrics.Enabled", "Metrics.Sub", "Sender.Extra", "Top"]
        );
    }

    #[test]
    fn values_keep_their_case() {
        let file = read("[Receiver]\nStreamChannel = \"My-Events\"\n").expect("reads");
        assert_eq!(
            file.settings.receiver.stream_channel,
            Some(Value::String("My-Events".to_owned()))
        );
    }

    #[test]
    fn a_section_that_is_not_a_table_is_an_error() {
        let message = read("Sender = 5\n").expect_err("not a table").to_string();
        assert!(message.contains("config.toml"), "{message}");
        assert!(
            message.ends_with("invalid type: integer `5`, expected a [Sender] section (a table)"),
            "{message}"
        );
    }
}
