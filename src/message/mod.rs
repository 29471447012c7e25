//! One accepted message: a NOTIFY payload, validated once, and its encodings, each made once
//! and shared by every client (today the websocket text [`Frame`]).
//!
//! Agents decode every frame into a struct with four string fields (`action`, `check_id`,
//! `agent_id`, `scan_id`), matching keys case-insensitively as Go's `encoding/json` does; a frame
//! they cannot decode breaks them. So a payload is forwarded only if it is one JSON object whose
//! fields of those names are strings or null. The check runs once per notification; the
//! original bytes are kept verbatim (no re-encoding), framed once as a websocket text frame, in
//! a reference-counted buffer that every client's outbox shares.

use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

pub mod websocket;

/// One websocket text frame, header included, encoded once; cloning is a reference count.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    wire: Bytes,
    payload_at: usize,
}

impl Frame {
    /// The periodic application-level heartbeat agents expect.
    pub fn ping() -> Frame {
        Frame {
            wire: Bytes::from_static(PING_FRAME),
            payload_at: 2,
        }
    }

    fn text(payload: &str) -> Frame {
        Frame {
            wire: websocket::encode(websocket::opcode::TEXT, payload.as_bytes()),
            payload_at: websocket::header_len(payload.len()),
        }
    }

    /// The payload, as sent.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.wire[self.payload_at..])
            .expect("frames are built from &str payloads")
    }

    /// The whole frame as it goes on the wire.
    pub fn wire(&self) -> &Bytes {
        &self.wire
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Frame({:?})", preview(self.as_str()))
    }
}

/// The text of the heartbeat frame, as the original sent it.
pub const PING_PAYLOAD: &str = r#"{"action":"ping"}"#;

/// [`PING_PAYLOAD`] as a text frame: FIN + text opcode, length 17.
const PING_FRAME: &[u8] = b"\x81\x11{\"action\":\"ping\"}";

/// Why a payload is not forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("empty payload")]
    Empty,
    #[error("not a JSON object: {0}")]
    Invalid(String),
}

/// Validates a payload and wraps its bytes, unchanged, for broadcast.
pub fn frame_from_payload(payload: &str) -> Result<Frame, Rejected> {
    validate(payload)?;
    Ok(Frame::text(payload))
}

/// Checks a payload without copying it.
pub fn validate(payload: &str) -> Result<(), Rejected> {
    if payload.trim().is_empty() {
        return Err(Rejected::Empty);
    }
    let mut de = serde_json::Deserializer::from_str(payload);
    de.deserialize_any(AgentMessage)
        .and_then(|()| de.end())
        .map_err(|err| Rejected::Invalid(err.to_string()))
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

/// The fields agents decode as strings.
const AGENT_FIELDS: [&str; 4] = ["action", "check_id", "agent_id", "scan_id"];

/// Go's `encoding/json` matches a key to a field with Unicode case folding; besides ASCII case,
/// the only letters that fold onto these field names are the Kelvin sign (k) and long s (s).
fn is_agent_field(key: &str) -> bool {
    AGENT_FIELDS.iter().any(|field| {
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

/// Accepts exactly one JSON object whose agent fields are strings or null.
struct AgentMessage;

impl<'de> Visitor<'de> for AgentMessage {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<KeyName<'de>>()? {
            if key.is_agent_field {
                map.next_value::<StringOrNull>()?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// A key, borrowed when it has no escapes; only whether it names an agent field is kept.
struct KeyName<'de> {
    is_agent_field: bool,
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
                    is_agent_field: is_agent_field(key),
                    _borrowed: std::marker::PhantomData,
                })
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// An agent field's value: a string or null, nothing else.
struct StringOrNull;

impl<'de> de::Deserialize<'de> for StringOrNull {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ValueVisitor;
        impl Visitor<'_> for ValueVisitor {
            type Value = StringOrNull;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or null for action, check_id, agent_id and scan_id")
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<StringOrNull, E> {
                Ok(StringOrNull)
            }
            fn visit_unit<E: de::Error>(self) -> Result<StringOrNull, E> {
                Ok(StringOrNull)
            }
        }
        deserializer.deserialize_any(ValueVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_objects_verbatim() {
        for payload in [
            r#"{"action":"test", "check_id":"00000000-0000-0000-0000-000000000000"}"#,
            r#"{"zeta":1,"action":"a","alpha":[1,{"x":null}]}"#,
            r#"  {"action":null,"check_id":"x","scan_id":"ñ✓😀"}  "#,
            r#"{"action":"a\u0041\"<&>"}"#,
            r#"{}"#,
            r#"{"Action":"upper case is fine when it is a string"}"#,
        ] {
            let frame = frame_from_payload(payload).expect(payload);
            assert_eq!(frame.as_str(), payload);
            assert_eq!(frame.wire()[0], 0x81);
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

    #[test]
    fn ping_is_the_original_heartbeat() {
        assert_eq!(Frame::ping().as_str(), r#"{"action":"ping"}"#);
        assert_eq!(Frame::ping(), Frame::text(PING_PAYLOAD));
        assert!(validate(Frame::ping().as_str()).is_ok());
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
