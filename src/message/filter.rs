//! Server-side filters on the agents' own fields: which messages a client wants.
//!
//! A client may ask for the messages whose top-level `agent_id`, `check_id`, `scan_id` or
//! `action` equals one of the values it names. A message without that field (or with `null`)
//! is a broadcast as far as the field goes, and still reaches the client: an agent filtered on
//! its own id gets the messages addressed to it and the ones addressed to everyone. Several
//! values of one field mean any of them; different fields must all match.
//!
//! The values a message carries are read by the payload check ([`super::check`]), which parses
//! every payload once anyway, with the keys matched as agents match them; the fan-out uses
//! them to find the clients a message is for without a pass over every client.

use std::fmt;

/// One of the fields a client may filter on, in the order a client is indexed by: the first
/// field of its filter in this order is the most selective one it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    AgentId,
    CheckId,
    ScanId,
    Action,
}

impl Field {
    pub const ALL: [Field; 4] = [Field::AgentId, Field::CheckId, Field::ScanId, Field::Action];

    /// A small index, for per-field tables.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The field's name: the JSON key, the query parameter and the claim's key.
    pub fn as_str(self) -> &'static str {
        match self {
            Field::AgentId => "agent_id",
            Field::CheckId => "check_id",
            Field::ScanId => "scan_id",
            Field::Action => "action",
        }
    }

    /// The field named exactly `name` (query parameters and claims are case-sensitive).
    pub fn named(name: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|field| field.as_str() == name)
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The values of the agents' fields in one message: `None` where the field is absent or null.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentFields([Option<Box<str>>; 4]);

impl AgentFields {
    pub fn get(&self, field: Field) -> Option<&str> {
        self.0[field.index()].as_deref()
    }

    /// Sets a field; a later key of the same field replaces an earlier one, as agents decode it.
    pub fn set(&mut self, field: Field, value: Option<Box<str>>) {
        self.0[field.index()] = value;
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }

    /// Heap bytes the values take, for the history's bound.
    pub fn heap_size(&self) -> usize {
        self.0.iter().flatten().map(|value| value.len()).sum()
    }
}

/// What a client asked to receive: for each field it names, the values it accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter([Option<Vec<Box<str>>>; 4]);

/// A narrowing that would widen what a token allows: the field, and a value it does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}={value:?} is outside what the token's filter allows")]
pub struct Widened {
    pub field: Field,
    pub value: String,
}

impl Filter {
    /// Adds `value` to the values accepted for `field` (repeating a field means any of them).
    pub fn allow(&mut self, field: Field, value: &str) {
        let values = self.0[field.index()].get_or_insert_with(Vec::new);
        if !values.iter().any(|v| &**v == value) {
            values.push(value.into());
        }
    }

    /// No field named: every message matches.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }

    /// The values accepted for `field`; `None` when the filter does not name it.
    pub fn values(&self, field: Field) -> Option<&[Box<str>]> {
        self.0[field.index()].as_deref()
    }

    /// The field a client with this filter is indexed by (the most selective it names), and its
    /// values; `None` for an empty filter.
    pub fn key(&self) -> Option<(Field, &[Box<str>])> {
        Field::ALL
            .into_iter()
            .find_map(|field| self.values(field).map(|values| (field, values)))
    }

    /// Whether a message with these fields is for the client: every field the filter names is
    /// absent or null in the message, or one of the values.
    pub fn matches(&self, fields: &AgentFields) -> bool {
        Field::ALL
            .into_iter()
            .all(|field| match (self.values(field), fields.get(field)) {
                (Some(values), Some(value)) => values.iter().any(|v| &**v == value),
                _ => true,
            })
    }

    /// The filter of a client whose token imposes `self` and whose request asks for `asked`:
    /// the request may narrow the token's filter, never widen it.
    pub fn narrowed_by(&self, asked: &Filter) -> Result<Filter, Widened> {
        let mut combined = self.clone();
        for field in Field::ALL {
            let Some(wanted) = asked.values(field) else {
                continue;
            };
            if let Some(allowed) = self.values(field) {
                if let Some(value) = wanted.iter().find(|v| !allowed.contains(v)) {
                    return Err(Widened {
                        field,
                        value: value.to_string(),
                    });
                }
            }
            combined.0[field.index()] = Some(wanted.to_vec());
        }
        Ok(combined)
    }
}

impl fmt::Display for Filter {
    /// As query parameters: `agent_id=a&agent_id=b&action=abort` (for logs and `/clients`),
    /// values form-encoded as a query string would carry them, so that a value holding `&` or
    /// `=` reads back unambiguously.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for field in Field::ALL {
            for value in self.values(field).unwrap_or_default() {
                if !first {
                    f.write_str("&")?;
                }
                first = false;
                f.write_str(field.as_str())?;
                f.write_str("=")?;
                for part in form_urlencoded::byte_serialize(value.as_bytes()) {
                    f.write_str(part)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(Field, &str)]) -> AgentFields {
        let mut fields = AgentFields::default();
        for (field, value) in pairs {
            fields.set(*field, Some((*value).into()));
        }
        fields
    }

    fn filter(pairs: &[(Field, &str)]) -> Filter {
        let mut filter = Filter::default();
        for (field, value) in pairs {
            filter.allow(*field, value);
        }
        filter
    }

    #[test]
    fn a_filter_keeps_its_values_and_broadcasts() {
        let agent_a = filter(&[(Field::AgentId, "A")]);
        assert!(agent_a.matches(&fields(&[(Field::AgentId, "A")])));
        assert!(!agent_a.matches(&fields(&[(Field::AgentId, "B")])));
        // No agent_id: a broadcast.
        assert!(agent_a.matches(&fields(&[(Field::Action, "abort")])));
        assert!(agent_a.matches(&AgentFields::default()));
        assert!(Filter::default().matches(&fields(&[(Field::AgentId, "B")])));
    }

    #[test]
    fn repeated_fields_are_or_and_different_fields_are_and() {
        let f = filter(&[
            (Field::AgentId, "A"),
            (Field::AgentId, "B"),
            (Field::Action, "abort"),
        ]);
        assert!(f.matches(&fields(&[(Field::AgentId, "B"), (Field::Action, "abort")])));
        assert!(!f.matches(&fields(&[(Field::AgentId, "B"), (Field::Action, "ping")])));
        assert!(!f.matches(&fields(&[(Field::AgentId, "C"), (Field::Action, "abort")])));
        assert_eq!(
            f.key().map(|(field, v)| (field, v.len())),
            Some((Field::AgentId, 2))
        );
        assert_eq!(f.to_string(), "agent_id=A&agent_id=B&action=abort");
        assert_eq!(
            filter(&[(Field::ScanId, "a b&c=d/é")]).to_string(),
            "scan_id=a+b%26c%3Dd%2F%C3%A9"
        );
        assert_eq!(
            filter(&[(Field::Action, "x")])
                .key()
                .map(|(field, _)| field),
            Some(Field::Action)
        );
    }

    #[test]
    fn a_request_narrows_a_token_but_never_widens_it() {
        let token = filter(&[(Field::AgentId, "A"), (Field::AgentId, "B")]);
        let asked = filter(&[(Field::AgentId, "A"), (Field::Action, "abort")]);
        assert_eq!(
            token.narrowed_by(&asked),
            Ok(filter(&[(Field::AgentId, "A"), (Field::Action, "abort")]))
        );
        assert_eq!(token.narrowed_by(&Filter::default()), Ok(token.clone()));
        assert_eq!(
            token.narrowed_by(&filter(&[(Field::AgentId, "C")])),
            Err(Widened {
                field: Field::AgentId,
                value: "C".to_owned()
            })
        );
        assert_eq!(Field::named("agent_id"), Some(Field::AgentId));
        assert_eq!(Field::named("Agent_ID"), None);
    }
}
