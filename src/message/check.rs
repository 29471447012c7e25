//! The payload check: what agents can decode, checked once per notification.
//!
//! Agents decode every frame into a struct with four string fields (`action`, `check_id`,
//! `agent_id`, `scan_id`), matching keys case-insensitively as Go's `encoding/json` does; a frame
//! they cannot decode breaks them. So a payload is forwarded only if it is one JSON object whose
//! fields of those names are strings or null. The original bytes are kept verbatim (no
//! re-encoding).

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

use super::filter::{AgentFields, Field};

/// Why a payload is not forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("empty payload")]
    Empty,
    #[error("not a JSON object: {0}")]
    Invalid(String),
    #[error("nested deeper than {MAX_DEPTH} levels, which agents do not decode")]
    TooDeep,
}

/// The deepest nesting of objects and arrays forwarded (the outer object is level 1): agents
/// decode with Go's `encoding/json`, which refuses a document nested deeper than 10,000 levels.
/// The durable table's check refuses the same (`vulcan_stream.max_depth()`), so that a payload
/// it accepts is one the server forwards.
pub const MAX_DEPTH: usize = 10_000;

/// Checks a payload without copying it.
pub fn validate(payload: &str) -> Result<(), Rejected> {
    check(payload).map(drop)
}

/// Checks a payload and reads the agents' fields from it, for the clients' filters: the one
/// parse a payload gets.
pub fn check(payload: &str) -> Result<AgentFields, Rejected> {
    if payload.trim().is_empty() {
        return Err(Rejected::Empty);
    }
    // serde_json skips the values of other fields without counting their depth, so it is
    // counted here.
    if nested_deeper_than(payload, MAX_DEPTH) {
        return Err(Rejected::TooDeep);
    }
    let mut de = serde_json::Deserializer::from_str(payload);
    de.deserialize_any(AgentMessage)
        .and_then(|fields| de.end().map(|()| fields))
        .map_err(|err| Rejected::Invalid(err.to_string()))
}

/// Whether objects and arrays nest more than `limit` levels, brackets in strings not counted.
/// A payload with no more brackets than `limit` cannot, which spares the walk; the walk keeps
/// no stack, so any depth costs one pass and no recursion.
fn nested_deeper_than(payload: &str, limit: usize) -> bool {
    let bytes = payload.as_bytes();
    if bytes.iter().filter(|&&b| b == b'[' || b == b'{').count() <= limit {
        return false;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// The first characters of a payload, for log lines (payloads may be up to 8 kB).
pub fn preview(payload: &str) -> String {
    const MAX_CHARS: usize = 80;
    let mut chars = payload.chars();
    let head: String = chars.by_ref().take(MAX_CHARS).collect();
    if chars.next().is_some() {
        format!("{head}…")
    } else {
        head
    }
}

/// Go's `encoding/json` matches a key to a field with Unicode case folding; besides ASCII case,
/// the only letters that fold onto these field names are the Kelvin sign (k) and long s (s).
fn agent_field(key: &str) -> Option<Field> {
    Field::ALL.into_iter().find(|field| {
        let field = field.as_str();
        key.chars().count() == field.len()
            && key.chars().zip(field.chars()).all(|(k, f)| {
                let k = match k {
                    '\u{212A}' => 'k',
                    '\u{017F}' => 's',
                    other => other.to_ascii_lowercase(),
                };
                k == f
            })
    })
}

/// Accepts exactly one JSON object whose agent fields are strings or null, and keeps their
/// values (the last of a repeated key, as agents decode it).
struct AgentMessage;

impl<'de> Visitor<'de> for AgentMessage {
    type Value = AgentFields;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AgentFields, A::Error> {
        let mut fields = AgentFields::default();
        while let Some(key) = map.next_key::<KeyName<'de>>()? {
            match key.field {
                // Go leaves a string field as it was on `null`: an earlier value stays.
                Some(field) => {
                    if let Some(value) = map.next_value::<StringOrNull>()?.0 {
                        fields.set(field, Some(value));
                    }
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(fields)
    }
}

/// A key, borrowed when it has no escapes; only which agent field it names is kept.
struct KeyName<'de> {
    field: Option<Field>,
    _borrowed: std::marker::PhantomData<&'de ()>,
}

impl<'de> de::Deserialize<'de> for KeyName<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = KeyName<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<KeyName<'de>, E> {
                Ok(KeyName {
                    field: agent_field(key),
                    _borrowed: std::marker::PhantomData,
                })
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// An agent field's value: a string or null, nothing else.
struct StringOrNull(Option<Box<str>>);

impl<'de> de::Deserialize<'de> for StringOrNull {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ValueVisitor;
        impl Visitor<'_> for ValueVisitor {
            type Value = StringOrNull;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or null for action, check_id, agent_id and scan_id")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<StringOrNull, E> {
                Ok(StringOrNull(Some(value.into())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<StringOrNull, E> {
                Ok(StringOrNull(None))
            }
        }
        deserializer.deserialize_any(ValueVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_objects_agents_decode() {
        for payload in [
            r#"{"action":"test", "check_id":"00000000-0000-0000-0000-000000000000"}"#,
            r#"{"zeta":1,"action":"a","alpha":[1,{"x":null}]}"#,
            r#"  {"action":null,"check_id":"x","scan_id":"ñ✓😀"}  "#,
            r#"{"action":"a\u0041\"<&>"}"#,
            r#"{}"#,
            r#"{"Action":"upper case is fine when it is a string"}"#,
        ] {
            validate(payload).expect(payload);
        }
    }

    #[test]
    fn drops_what_agents_cannot_decode() {
        for payload in [
            "",
            "   ",
            "not json",
            "[1,2]",
            r#""a string""#,
            "42",
            "null",
            r#"{"action":1}"#,
            r#"{"check_id":{}}"#,
            r#"{"agent_id":["a"]}"#,
            r#"{"scan_id":true}"#,
            r#"{"ACTION":2}"#,
            "{\"chec\u{212A}_id\":3}",
            r#"{"action":"ok","action":5}"#,
            r#"{"action":"x"} y"#,
            r#"{"action":"x"}{}"#,
            r#"{"action":"x""#,
        ] {
            assert!(validate(payload).is_err(), "accepted {payload:?}");
        }
    }

    /// `{"a":[[…]]}` with `depth` levels in all, the outer object included.
    fn nested(depth: usize) -> String {
        format!(
            r#"{{"a":{}{},"b":"[[[{{"}}"#,
            "[".repeat(depth - 1),
            "]".repeat(depth - 1)
        )
    }

    #[test]
    fn nesting_is_forwarded_as_deep_as_agents_decode_and_no_deeper() {
        validate(&nested(MAX_DEPTH)).expect("10,000 levels");
        assert_eq!(validate(&nested(MAX_DEPTH + 1)), Err(Rejected::TooDeep));
        assert_eq!(validate(&nested(200_000)), Err(Rejected::TooDeep));
        // Brackets in strings do not count.
        let in_strings = format!(r#"{{"a":"{}"}}"#, "[".repeat(MAX_DEPTH + 5));
        validate(&in_strings).expect("brackets in a string");
        let escaped = format!(r#"{{"a":"\"{}"}}"#, "{".repeat(MAX_DEPTH + 5));
        validate(&escaped).expect("brackets after an escaped quote");
    }

    #[test]
    fn reads_the_agent_fields_as_agents_decode_them() {
        let fields = check(r#"{"Agent_ID":"a\u0041","action":null,"x":{"agent_id":"no"},"scan_id":"s","scan_id":"t","check_id":"c","check_id":null}"#)
            .expect("valid");
        assert_eq!(fields.get(Field::AgentId), Some("aA"));
        assert_eq!(fields.get(Field::Action), None);
        assert_eq!(fields.get(Field::CheckId), Some("c"));
        assert_eq!(fields.get(Field::ScanId), Some("t"));
        assert!(check("{}").expect("valid").is_empty());
    }

    #[test]
    fn preview_cuts_long_payloads_on_char_boundaries() {
        let long = "é".repeat(200);
        let shown = preview(&long);
        assert_eq!(shown.chars().count(), 81);
        assert!(shown.ends_with('…'));
        assert_eq!(preview("short"), "short");
    }
}
