//! Where a client asks to start: `?since=<position>` (and, for Server-Sent Events, the
//! `Last-Event-ID` header that browsers send on their own when they reconnect).

use hyper::StatusCode;
use hyper::header::HeaderMap;

use super::Response;
use super::routes::text_owned;
use crate::message::{Position, PositionError, preview};
use crate::stream::Start;

/// A `since` that is not a position: refused with 400 and a line saying why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad request: {name}={value:?} is not a position: {reason}")]
pub struct BadPosition {
    /// Where it came from: `since` or `Last-Event-ID`.
    pub name: &'static str,
    /// What the client sent, shortened for the answer.
    pub value: String,
    pub reason: PositionError,
}

impl BadPosition {
    pub fn response(&self) -> Response {
        text_owned(StatusCode::BAD_REQUEST, self.to_string())
    }
}

/// The value of `name` in a query string, percent-decoded; the last one wins.
pub fn query_value(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .filter(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
        .last()
}

/// Parses a client's position, naming where it came from when it is not one.
pub fn parse_position(name: &'static str, value: &str) -> Result<Position, BadPosition> {
    value.parse().map_err(|reason| BadPosition {
        name,
        value: preview(value),
        reason,
    })
}

/// Where a client starts: after `since` when the query has one, live otherwise.
pub fn from_query(query: &str) -> Result<Start, BadPosition> {
    match query_value(query, "since") {
        Some(since) => Ok(Start::After(parse_position("since", &since)?)),
        None => Ok(Start::Live),
    }
}

/// The header an `EventSource` sends when it reconnects: the id of the last event it received.
pub const LAST_EVENT_ID: &str = "last-event-id";

/// Where an event-stream client starts: after its `Last-Event-ID` when it sends one, else as
/// [`from_query`] says. The header wins because a browser that reconnects sends it beside the
/// page's original URL, whose `since` is older. An empty header counts as absent: that is what
/// an `EventSource` that has seen no id would send, if it sent one.
pub fn for_event_stream(headers: &HeaderMap, query: &str) -> Result<Start, BadPosition> {
    match headers.get(LAST_EVENT_ID) {
        Some(value) if !value.is_empty() => {
            let text = String::from_utf8_lossy(value.as_bytes());
            Ok(Start::After(parse_position("Last-Event-ID", &text)?))
        }
        _ => from_query(query),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn since_is_read_from_the_query() {
        assert_eq!(from_query(""), Ok(Start::Live));
        assert_eq!(from_query("token=x"), Ok(Start::Live));
        let Ok(Start::After(position)) = from_query("token=x&since=00ff-12") else {
            panic!("since not read");
        };
        assert_eq!(position.to_string(), "00000000000000ff-12");
        let bad = from_query("since=nope").expect_err("not a position");
        assert_eq!(bad.name, "since");
        assert_eq!(
            bad.to_string(),
            "bad request: since=\"nope\" is not a position: expected EPOCH-OFFSET, as sent in \
             a message's \"id\""
        );
        assert_eq!(bad.response().status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn last_event_id_wins_over_since() {
        let mut headers = HeaderMap::new();
        assert_eq!(for_event_stream(&headers, ""), Ok(Start::Live));
        let Ok(Start::After(since)) = for_event_stream(&headers, "since=1-2") else {
            panic!("since not read");
        };
        assert_eq!(since.to_string(), "0000000000000001-2");
        headers.insert(LAST_EVENT_ID, HeaderValue::from_static(""));
        assert_eq!(
            for_event_stream(&headers, "since=1-2"),
            Ok(Start::After(since))
        );
        headers.insert(LAST_EVENT_ID, HeaderValue::from_static("1-5"));
        let Ok(Start::After(last)) = for_event_stream(&headers, "since=1-2") else {
            panic!("Last-Event-ID not read");
        };
        assert_eq!(last.offset, 5);
        // The header wins even over a since that is not a position.
        assert_eq!(
            for_event_stream(&headers, "since=nope"),
            Ok(Start::After(last))
        );
        headers.insert(LAST_EVENT_ID, HeaderValue::from_static("nope"));
        let bad = for_event_stream(&headers, "since=1-2").expect_err("not a position");
        assert_eq!(
            bad.to_string(),
            "bad request: Last-Event-ID=\"nope\" is not a position: expected EPOCH-OFFSET, as \
             sent in a message's \"id\""
        );
        let bytes = HeaderValue::from_bytes(b"\xff-1").expect("obs-text is a header value");
        headers.insert(LAST_EVENT_ID, bytes);
        assert!(for_event_stream(&headers, "").is_err());
    }
}
