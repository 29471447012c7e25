//! The environment overlay, read with envy into a struct of optional strings.
//!
//! Each field is a variable, named as its field in upper case (`pg_port` is `PG_PORT`; envy
//! lower-cases the names it is given). Values stay text: validation parses them, so that an
//! error names the variable and its value in the same words as for the file. An empty value
//! counts as unset there, as the Docker start script of the original left unset variables empty.
//!
//! The source is a lookup function rather than the process environment, so tests pass a map.
//! envy reads name-value pairs, so the loader asks the lookup for each field's variable; the
//! names come from the struct itself (see [`variable_names`]), so the two cannot drift apart.

use serde::Deserialize;
use serde::de::{self, Visitor};

use super::ConfigError;

/// The variables this service reads. Their meaning is in README.md and in [`super::merge`],
/// which says which file key each one overrides.
#[derive(Debug, Default, Deserialize)]
pub(super) struct EnvSettings {
    pub log_level: Option<String>,
    pub pg_host: Option<String>,
    pub pg_port: Option<String>,
    pub pg_db: Option<String>,
    pub pg_user: Option<String>,
    pub pg_password: Option<String>,
    /// The password's name in the original's README; `PG_PASSWORD` wins when both are set.
    pub pg_pwd: Option<String>,
    pub pg_sslmode: Option<String>,
    pub pg_ca_b64: Option<String>,
    pub pg_sslcert_b64: Option<String>,
    pub pg_sslkey_b64: Option<String>,
    pub pg_channel: Option<String>,
    pub pg_channels: Option<String>,
    pub pg_health_interval: Option<String>,
    pub pg_health_timeout: Option<String>,
    pub pg_source: Option<String>,
    pub pg_max_payload: Option<String>,
    pub pg_retention: Option<String>,
    pub pg_poll_interval: Option<String>,
    pub port: Option<String>,
    pub stream: Option<String>,
    pub ping_interval: Option<String>,
    pub pong_timeout: Option<String>,
    pub client_queue: Option<String>,
    pub handshake_timeout: Option<String>,
    pub max_frame_size: Option<String>,
    pub max_clients: Option<String>,
    pub history_messages: Option<String>,
    pub history_bytes: Option<String>,
    pub history_age: Option<String>,
    pub stream_token: Option<String>,
    pub admin_token: Option<String>,
    pub allowed_origins: Option<String>,
    pub jwt_secret: Option<String>,
    pub jwt_public_key: Option<String>,
    pub jwt_audience: Option<String>,
    pub jwt_issuer: Option<String>,
}

impl EnvSettings {
    /// Reads every variable of [`EnvSettings`] through `lookup`.
    pub(super) fn read(
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<EnvSettings, ConfigError> {
        let pairs = variable_names().iter().filter_map(|field| {
            let name = field.to_ascii_uppercase();
            lookup(&name).map(|value| (name, value))
        });
        envy::from_iter(pairs).map_err(ConfigError::Environment)
    }
}

/// The field names of [`EnvSettings`], as serde's derive declares them.
///
/// A derived `Deserialize` hands its field names to the deserializer's `deserialize_struct`;
/// [`FieldNames`] records them there and stops. Nothing is deserialized.
fn variable_names() -> &'static [&'static str] {
    let mut names: &'static [&'static str] = &[];
    // The call always "fails": FieldNames only records the names.
    let _ = EnvSettings::deserialize(FieldNames(&mut names));
    names
}

/// A deserializer that only records the field names a struct asks for.
struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> de::Deserializer<'de> for FieldNames<'_> {
    type Error = de::value::Error;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("only the field names are read"))
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("only a struct's field names can be read"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn every_field_is_a_variable_named_in_upper_case() {
        let names = variable_names();
        assert!(names.contains(&"pg_password") && names.contains(&"allowed_origins"));
        let env: HashMap<String, String> = names
            .iter()
            .map(|name| (name.to_ascii_uppercase(), format!("value of {name}")))
            .collect();
        let read = EnvSettings::read(&|name| env.get(name).cloned()).expect("reads");
        assert_eq!(read.pg_port.as_deref(), Some("value of pg_port"));
        assert_eq!(read.pg_pwd.as_deref(), Some("value of pg_pwd"));
        assert_eq!(read.stream.as_deref(), Some("value of stream"));
    }

    #[test]
    fn unset_variables_stay_none() {
        let read =
            EnvSettings::read(&|name| (name == "PORT").then(|| "8080".to_owned())).expect("reads");
        assert_eq!(read.port.as_deref(), Some("8080"));
        assert_eq!(read.pg_port, None);
    }
}
