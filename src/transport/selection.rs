//! Which messages a client asks for, from its query string: `?channel=<name>` and the filters
//! `?agent_id=`, `?check_id=`, `?scan_id=`, `?action=` (a field repeated means any of its
//! values; different fields must all match).
//!
//! Clients of the new protocols (websocket `vulcan-stream.v1` and Server-Sent Events) get 400
//! for a parameter the server does not know: a misspelled filter must not silently deliver
//! everything. Legacy clients keep the original's leniency (any query string is ignored but
//! these), so no existing deployment breaks.

use hyper::StatusCode;

use super::Response;
use super::routes::text_owned;
use crate::message::{Field, Filter, preview};

/// The parameters the stream path knows besides the filter fields.
const OTHER_PARAMETERS: [&str; 3] = ["channel", "since", "token"];

/// What a client's query string selects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// `?channel=`; `None`: the default channel.
    pub channel: Option<String>,
    pub filter: Filter,
}

/// A query string the server refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadSelection {
    #[error(
        "bad request: unknown query parameter {0:?} (known: channel, since, token, agent_id, \
         check_id, scan_id, action)"
    )]
    Unknown(String),
    #[error("bad request: channel is given more than once")]
    TwoChannels,
    #[error("not found: channel {0:?} is not one this server carries")]
    NoSuchChannel(String),
}

impl BadSelection {
    pub fn response(&self) -> Response {
        let status = match self {
            BadSelection::NoSuchChannel(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_REQUEST,
        };
        text_owned(status, self.to_string())
    }
}

/// Reads the selection from `query`; `strict` (the new protocols) refuses unknown parameters.
pub fn from_query(query: &str, strict: bool) -> Result<Selection, BadSelection> {
    let mut selection = Selection::default();
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if let Some(field) = Field::named(&name) {
            selection.filter.allow(field, &value);
        } else if name == "channel" {
            if selection.channel.is_some() {
                return Err(BadSelection::TwoChannels);
            }
            selection.channel = Some(value.into_owned());
        } else if strict && !OTHER_PARAMETERS.contains(&&*name) {
            return Err(BadSelection::Unknown(preview(&name)));
        }
    }
    Ok(selection)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_channel_and_the_filter() {
        let selection = from_query(
            "channel=jobs&agent_id=A&agent_id=B&action=abort&since=1-2",
            true,
        )
        .expect("valid");
        assert_eq!(selection.channel.as_deref(), Some("jobs"));
        assert_eq!(
            selection.filter.to_string(),
            "agent_id=A&agent_id=B&action=abort"
        );
        assert_eq!(from_query("", true), Ok(Selection::default()));
        assert_eq!(
            from_query("agent_id=a%20b", false)
                .expect("valid")
                .filter
                .values(Field::AgentId)
                .map(|v| v.to_vec()),
            Some(vec!["a b".into()])
        );
    }

    #[test]
    fn unknown_parameters_are_refused_only_for_the_new_protocols() {
        let refused = from_query("agentid=A", true).expect_err("misspelled");
        assert_eq!(refused, BadSelection::Unknown("agentid".to_owned()));
        assert_eq!(refused.response().status(), StatusCode::BAD_REQUEST);
        assert!(from_query("agentid=A&x=1", false).is_ok());
        assert_eq!(
            from_query("channel=a&channel=b", false),
            Err(BadSelection::TwoChannels)
        );
        assert_eq!(
            BadSelection::NoSuchChannel("x".to_owned())
                .response()
                .status(),
            StatusCode::NOT_FOUND
        );
    }
}
