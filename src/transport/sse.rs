//! Server-Sent Events on the stream path: the same stream as the websockets get, for a browser's
//! `EventSource` and for `curl -N`, with resume from `Last-Event-ID`.
//!
//! hyper owns a connection's socket and gives it back only after a 101, but an event stream is a
//! 200 whose body is the rest of the connection. So the accept loop looks at a connection's
//! first request head before hyper does ([`classify`]): a `GET` of the stream path that accepts
//! `text/event-stream` is served here, on the raw socket, and everything else goes to hyper
//! untouched. Here the request is admitted as a websocket upgrade is (token, Origin,
//! `MaxClients`: the same refusals), the client joins the fan-out at its start position, the
//! response head and the preamble go out, and only then is the socket attached to the client's
//! outbox: what is published after the join waits in the outbox until then, so it can neither
//! overtake the head nor be missed. From there on the fan-out writes the shared, pre-encoded SSE
//! frames into the socket directly, as it does for websocket clients.
//!
//! The response has neither a length nor chunked encoding: the body ends when the connection
//! closes (RFC 9112 §6.3), so the head says `Connection: close`; `EventSource` accepts that, and
//! reconnects after the preamble's `retry` when the connection ends. `Cache-Control: no-cache`
//! and `X-Accel-Buffering: no` keep caches and nginx from holding events back.
//!
//! An SSE client cannot answer pings, so the server sends none. The heartbeat comment goes out
//! every PingInterval, and the socket's `TCP_USER_TIMEOUT` is the pong timeout: a peer that has
//! vanished leaves those bytes unacknowledged, and the kernel ends the connection.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use hyper::Uri;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::admission::{self, AllowOrigin};
use super::upgrade::header_has_token;
use super::{AppState, Response, read_flushing, start};
use crate::fanout::{CloseReason, Registration};
use crate::message::{Format, SSE_PREAMBLE};
use crate::metrics::Metrics;
use crate::stream::Joined;

/// Headers parsed from a request head at most, as many as hyper's parser takes: a head with
/// more is left to hyper, which refuses it.
const MAX_HEADERS: usize = 100;

/// Bytes read from a client per `read`: an SSE client sends nothing after its request, and what
/// it sends anyway is discarded, so a small buffer (part of the task, no allocation) will do.
const READ_CHUNK: usize = 512;

/// The media type of an event stream.
const EVENT_STREAM: &str = "text/event-stream";

/// An event-stream request, from its head.
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
    /// Anything else, malformed heads included: hyper answers it.
    Other,
}

/// Reads the request head at the start of `bytes`: an event-stream request is a `GET` of
/// `/<stream_path>` (any query) whose `Accept` lists `text/event-stream`, and which does not
/// ask for a websocket.
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
    if !accepts_event_stream(&map) || header_has_token(&map, header::UPGRADE, "websocket") {
        return Head::Other;
    }
    Head::EventStream {
        len,
        request: Request {
            headers: map,
            query: uri.query().unwrap_or_default().to_owned(),
        },
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

/// Serves an event-stream request whose head has been taken from `stream`: refuses it as a
/// websocket upgrade would be refused, or registers the client and starts its task.
pub async fn serve(
    state: Arc<AppState>,
    peer: SocketAddr,
    mut stream: TcpStream,
    request: Request,
) {
    let Request { headers, query } = request;
    let admitted = match admission::refusal(&state, peer, &headers, &query) {
        Some(refusal) => Err(refusal),
        None => start::for_event_stream(&headers, &query).map_err(|bad| bad.response()),
    };
    let start = match admitted {
        Ok(start) => start,
        Err(refusal) => {
            state.metrics.clients_rejected.inc();
            let answer = plain_response(&refusal);
            let sent = timeout(state.sender.handshake_timeout, async {
                stream.write_all(&answer).await?;
                stream.shutdown().await
            });
            if let Ok(Err(err)) = sent.await {
                log::debug!("event stream from {peer}: refusal not sent: {err}");
            }
            return;
        }
    };
    let head = response_head(admission::allowed_origin(&state.sender, &headers));
    drop(headers);
    if let Err(err) = drop_when_unacknowledged(&stream, state.sender.pong_timeout) {
        log::debug!("event stream from {peer}: TCP_USER_TIMEOUT not set: {err}");
    }

    // Join first: frames published from here on wait in the outbox, which gets the socket only
    // after the head and the preamble are written.
    let (registration, joined) = match state.stream.join_resuming(Format::Sse, start).await {
        Ok(joined) => joined,
        Err(unavailable) => {
            state.metrics.clients_rejected.inc();
            log::info!("event stream from {peer}: resume refused: {unavailable}");
            let refusal = super::routes::text_owned(
                hyper::StatusCode::SERVICE_UNAVAILABLE,
                unavailable.to_string(),
            );
            let answer = plain_response(&refusal);
            let sent = timeout(state.sender.handshake_timeout, async {
                stream.write_all(&answer).await?;
                stream.shutdown().await
            });
            if let Ok(Err(err)) = sent.await {
                log::debug!("event stream from {peer}: refusal not sent: {err}");
            }
            return;
        }
    };
    let id = registration.id;
    if joined != Joined::Live {
        log::debug!("client {id} ({peer}): {joined:?}");
    }
    match timeout(state.sender.handshake_timeout, stream.write_all(&head)).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return log::debug!("client {id} ({peer}): response not sent: {err}"),
        Err(_) => return log::debug!("client {id} ({peer}): response not taken in time"),
    }
    state.tasks.spawn(
        EventStream {
            stream: Arc::new(stream),
            registration,
            peer,
            metrics: state.metrics.clone(),
        }
        .run(),
    );
}

/// The 200 that opens the stream, and the preamble: what every event stream starts with.
fn response_head(origin: Option<AllowOrigin>) -> Bytes {
    let mut head = BytesMut::with_capacity(256);
    head.put_slice(
        b"HTTP/1.1 200 OK\r\n\
          Content-Type: text/event-stream\r\n\
          Cache-Control: no-cache\r\n\
          Connection: close\r\n\
          X-Accel-Buffering: no\r\n",
    );
    match origin {
        None => {}
        Some(AllowOrigin::Any) => head.put_slice(b"Access-Control-Allow-Origin: *\r\n"),
        Some(AllowOrigin::Echo(origin)) => {
            head.put_slice(b"Access-Control-Allow-Origin: ");
            head.put_slice(origin.as_bytes());
            head.put_slice(b"\r\nVary: Origin\r\n");
        }
    }
    head.put_slice(b"\r\n");
    head.put_slice(SSE_PREAMBLE);
    head.freeze()
}

/// `response` as an HTTP/1.1 message on a connection that closes after it: refusals are the
/// same answers hyper gives a websocket upgrade, written by hand because hyper never saw this
/// connection.
fn plain_response(response: &Response) -> Vec<u8> {
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

/// Makes the kernel end the connection when bytes it sent stay unacknowledged for `limit`: with
/// a heartbeat every PingInterval, that is how a vanished SSE client is found.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn drop_when_unacknowledged(stream: &TcpStream, limit: Duration) -> io::Result<()> {
    socket2::SockRef::from(stream).set_tcp_user_timeout(Some(limit))
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn drop_when_unacknowledged(_stream: &TcpStream, _limit: Duration) -> io::Result<()> {
    Ok(())
}

/// One SSE client's task: flushes what the fan-out could not write at once, reads and discards
/// what the client sends, and ends when the client goes or is told to stop.
struct EventStream {
    stream: Arc<TcpStream>,
    registration: Registration,
    peer: SocketAddr,
    metrics: Arc<Metrics>,
}

/// How an event stream ended.
enum End {
    /// Kicked as too slow, or shutdown. The client reconnects (to this server or another) from
    /// the last id it received, so what was still queued is not lost to it.
    Stopped(CloseReason),
    /// The connection ended or failed.
    Gone(io::Error),
}

impl EventStream {
    async fn run(self) {
        let id = self.registration.id;
        let peer = self.peer;
        self.registration.client.out.attach(self.stream.clone());
        log::debug!("client {id} ({peer}): event stream connected");
        match self.serve().await {
            End::Stopped(reason) => {
                log::debug!(
                    "client {id} ({peer}): event stream closed ({})",
                    reason.text()
                );
            }
            End::Gone(err) if err.kind() == io::ErrorKind::TimedOut => {
                self.metrics.clients_disconnected_unresponsive.inc();
                log::info!("client {id} ({peer}): dropped, its event stream went unacknowledged");
            }
            End::Gone(err) => log::debug!("client {id} ({peer}): gone ({err})"),
        }
        // Dropping the registration takes the socket out of the outbox: the connection closes.
    }

    async fn serve(&self) -> End {
        let client = &self.registration.client;
        let mut buf = [0u8; READ_CHUNK];
        loop {
            tokio::select! {
                biased;
                _ = client.control.stopped() => return End::Stopped(client.control.reason()),
                // What the client sends is discarded: the stream is one-way.
                read = read_flushing(&self.stream, &client.out, &mut buf) => match read {
                    Ok(0) => return End::Gone(io::ErrorKind::UnexpectedEof.into()),
                    Ok(_) => {}
                    Err(err) => return End::Gone(err),
                },
            }
        }
    }
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
            "GET /stream HTTP/1.1\r\nAccept: text/event-stream\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\n\r\n",
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
    fn the_response_head_names_an_allowed_origin() {
        let plain = response_head(None);
        let text = std::str::from_utf8(&plain).expect("ascii");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nretry: 2000\n\n"), "{text}");
        assert!(!text.contains("Access-Control"), "{text}");
        let any = response_head(Some(AllowOrigin::Any));
        assert!(
            std::str::from_utf8(&any)
                .expect("ascii")
                .contains("Allow-Origin: *\r\n")
        );
        let echo = response_head(Some(AllowOrigin::Echo(HeaderValue::from_static(
            "https://a.example",
        ))));
        assert!(
            std::str::from_utf8(&echo)
                .expect("ascii")
                .contains("Allow-Origin: https://a.example\r\nVary: Origin\r\n")
        );
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
