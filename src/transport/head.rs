//! A connection's first request head, read by the accept loop before hyper is given the
//! connection: requests of the stream path (websocket handshakes and event streams) are served
//! on the raw socket, without hyper, and everything else goes to hyper untouched.
//!
//! hyper owns a connection's socket and gives it back only after a 101, and never for an event
//! stream (a 200 whose body is the rest of the connection). A websocket handshake served by
//! hand costs less, too: no HTTP connection state, no second task for the upgraded socket, no
//! buffers kept past the 101. Both are a few hundred bytes of request, answered with one write.

use hyper::Uri;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::Response;
use super::upgrade::header_has_token;

/// Headers parsed from a request head at most, as many as hyper's parser takes: a head with
/// more is left to hyper, which refuses it.
const MAX_HEADERS: usize = 100;

/// The media type of an event stream.
const EVENT_STREAM: &str = "text/event-stream";

/// A request of the stream path that is served without hyper, from its head.
#[derive(Debug)]
pub struct Request {
    pub headers: HeaderMap,
    /// The query string, without `?`.
    pub query: String,
}

/// What a connection's first bytes are.
#[derive(Debug)]
pub enum Head {
    /// The request head is not complete yet.
    Partial,
    /// An event-stream request, whose head is the first `len` bytes.
    EventStream { len: usize, request: Request },
    /// A websocket handshake (a `GET` of the stream path asking to upgrade to `websocket`),
    /// whose head is the first `len` bytes: valid or not, it is answered by
    /// [`super::upgrade::serve`].
    Websocket { len: usize, request: Request },
    /// Anything else, malformed heads included: hyper answers it.
    Other,
}

/// Reads the request head at the start of `bytes`. A `GET` of `/<stream_path>` (any query) is a
/// websocket handshake when it asks to upgrade to `websocket`, and otherwise an event-stream
/// request when its `Accept` lists `text/event-stream`.
pub fn classify(bytes: &[u8], stream_path: &str) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::Other,
    };
    if parsed.method != Some("GET") {
        return Head::Other;
    }
    // As hyper reads it, so that both agree on which path this is (origin or absolute form).
    let Some(uri) = parsed.path.and_then(|target| target.parse::<Uri>().ok()) else {
        return Head::Other;
    };
    if uri.path().strip_prefix('/') != Some(stream_path) {
        return Head::Other;
    }
    let mut map = HeaderMap::with_capacity(parsed.headers.len());
    for field in parsed.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(field.name.as_bytes()),
            HeaderValue::from_bytes(field.value),
        ) else {
            return Head::Other;
        };
        map.append(name, value);
    }
    let request = Request {
        query: uri.query().unwrap_or_default().to_owned(),
        headers: map,
    };
    if header_has_token(&request.headers, header::UPGRADE, "websocket") {
        Head::Websocket { len, request }
    } else if accepts_event_stream(&request.headers) {
        Head::EventStream { len, request }
    } else {
        Head::Other
    }
}

/// Whether an `Accept` header lists `text/event-stream` (RFC 9110 §12.5.1: comma-separated media
/// ranges with parameters after `;`, a weight of 0 meaning "not acceptable"). `*/*` does not
/// count: that is what `curl` sends by default, and a plain `GET` of the stream path is answered
/// as before (400, with what to send).
fn accepts_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|range| {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or_default().trim();
            media.eq_ignore_ascii_case(EVENT_STREAM) && !parts.any(is_zero_weight)
        })
}

/// Whether a media-range parameter is `q=0` (or `q=0.000`).
fn is_zero_weight(param: &str) -> bool {
    param.split_once('=').is_some_and(|(name, value)| {
        name.trim().eq_ignore_ascii_case("q") && value.trim().parse::<f32>() == Ok(0.0)
    })
}

/// `response` as an HTTP/1.1 message on a connection that closes after it: refusals are the
/// same answers hyper would give, written by hand because hyper never saw this connection.
pub fn plain_response(response: &Response) -> Vec<u8> {
    let status = response.status();
    let body = response.body().as_bytes();
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in response.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    out.extend_from_slice(b"connection: close\r\n\r\n");
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::StatusCode;

    fn event_stream(head: &str) -> Option<(usize, Request)> {
        match classify(head.as_bytes(), "stream") {
            Head::EventStream { len, request } => Some((len, request)),
            _ => None,
        }
    }

    #[test]
    fn an_event_stream_request_is_a_get_of_the_stream_path_accepting_text_event_stream() {
        let head = "GET /stream?since=1-2&token=t HTTP/1.1\r\nHost: x\r\n\
                    Accept: text/event-stream\r\nLast-Event-ID: 1-3\r\n\r\nrest";
        let (len, request) = event_stream(head).expect("an event stream");
        assert_eq!(len, head.len() - "rest".len());
        assert_eq!(request.query, "since=1-2&token=t");
        assert_eq!(request.headers["last-event-id"], "1-3");
        // Media ranges, in any case, among others, with parameters.
        for accept in [
            "TEXT/Event-Stream",
            "text/html, text/event-stream;q=0.5",
            "text/event-stream; charset=utf-8",
        ] {
            let head = format!("GET /stream HTTP/1.1\r\nAccept: {accept}\r\n\r\n");
            assert!(event_stream(&head).is_some(), "{accept}");
        }
        // HTTP/1.0, the absolute form, and several Accept fields.
        for head in [
            "GET /stream HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n",
            "GET http://h:1/stream?x HTTP/1.1\r\nAccept: text/event-stream\r\n\r\n",
            "GET /stream HTTP/1.1\r\nAccept: */*\r\nAccept: text/event-stream\r\n\r\n",
        ] {
            assert!(event_stream(head).is_some(), "{head:?}");
        }
    }

    #[test]
    fn everything_else_is_left_to_hyper() {
        for head in [
            "GET /stream HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /stream HTTP/1.1\r\nAccept: */*\r\n\r\n",
            "GET /stream HTTP/1.1\r\nAccept: text/event-stream;q=0\r\n\r\n",
            "GET /stream HTTP/1.1\r\nAccept: text/event-streams\r\n\r\n",
            "POST /stream HTTP/1.1\r\nAccept: text/event-stream\r\n\r\n",
            "HEAD /stream HTTP/1.1\r\nAccept: text/event-stream\r\n\r\n",
            "GET /stream/ HTTP/1.1\r\nAccept: text/event-stream\r\n\r\n",
            "GET /STREAM HTTP/1.1\r\nAccept: text/event-stream\r\n\r\n",
            "GET /status HTTP/1.1\r\nAccept: text/event-stream\r\n\r\n",
            // Malformed: hyper answers 400.
            "GET /stream HTTP/1.1\r\nAccept text/event-stream\r\n\r\n",
            "GET /stream HTTP/9.9\r\nAccept: text/event-stream\r\n\r\n",
            "GET  HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(classify(head.as_bytes(), "stream"), Head::Other),
                "{head:?}"
            );
        }
        for partial in [
            "",
            "GET /stream HTTP/1.1\r\n",
            "GET /stream HTTP/1.1\r\nAccept: t",
        ] {
            assert!(
                matches!(classify(partial.as_bytes(), "stream"), Head::Partial),
                "{partial:?}"
            );
        }
    }

    /// RFC 9112 §2.2: a line may end in a bare LF; RFC 9110 §5.5: optional white space around a
    /// field value.
    #[test]
    fn the_standard_s_leniencies_are_accepted() {
        let head = "GET /stream HTTP/1.1\nAccept:text/event-stream  \n\n";
        let (len, _) = event_stream(head).expect("an event stream");
        assert_eq!(len, head.len());
    }

    #[test]
    fn too_many_headers_are_left_to_hyper() {
        let mut head = String::from("GET /stream HTTP/1.1\r\nAccept: text/event-stream\r\n");
        for i in 0..=MAX_HEADERS {
            head.push_str(&format!("X-{i}: y\r\n"));
        }
        head.push_str("\r\n");
        assert!(matches!(classify(head.as_bytes(), "stream"), Head::Other));
    }

    #[test]
    fn websocket_handshakes_of_the_stream_path_are_taken_whatever_else_they_say() {
        for head in [
            "GET /stream HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET /stream?since=a-1 HTTP/1.1\r\nUpgrade: WebSocket\r\n\r\n",
            "GET /stream HTTP/1.1\r\nAccept: text/event-stream\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\n\r\n",
        ] {
            match classify(head.as_bytes(), "stream") {
                Head::Websocket { len, .. } => assert_eq!(len, head.len()),
                other => panic!("{head:?}: {other:?}"),
            }
        }
        for head in [
            "GET /status HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "POST /stream HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET /stream HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
        ] {
            assert!(
                matches!(classify(head.as_bytes(), "stream"), Head::Other),
                "{head:?}"
            );
        }
    }

    #[test]
    fn a_refusal_is_a_complete_message_that_closes() {
        let mut refusal = super::super::routes::text(StatusCode::UNAUTHORIZED, "no");
        refusal
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        let bytes = plain_response(&refusal);
        assert_eq!(
            std::str::from_utf8(&bytes).expect("ascii"),
            "HTTP/1.1 401 Unauthorized\r\ncontent-type: text/plain; charset=utf-8\r\n\
             www-authenticate: Bearer\r\ncontent-length: 3\r\nconnection: close\r\n\r\nno\n"
        );
    }
}
