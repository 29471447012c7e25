//! Where a client asks to start: `?since=<position>` (and, for Server-Sent Events, the
//! `Last-Event-ID` header that browsers send on their own when they reconnect).

use hyper::StatusCode;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
