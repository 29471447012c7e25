//! Server-Sent Events on the stream path: the same stream as the websockets get, for a browser's
//! `EventSource` and for `curl -N`, with resume from `Last-Event-ID`.
//!
//! hyper owns a connection's socket and gives it back only after a 101, but an event stream is a
//! 200 whose body is the rest of the connection. So the accept loop looks at a connection's
//! first request head before hyper does ([`super::head::classify`]): a `GET` of the stream path that accepts
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
use std::time::{Duration, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::admission::{self, AllowOrigin};
use super::head::{Request, refuse};
use super::{AppState, Expiry, read_flushing, start};
use crate::fanout::{CloseReason, Registration};
use crate::message::{Format, SSE_PREAMBLE};
use crate::metrics::Metrics;
use crate::stream::Joined;

/// Bytes read from a client per `read`: an SSE client sends nothing after its request, and what
/// it sends anyway is discarded, so a small buffer (part of the task, no allocation) will do.
const READ_CHUNK: usize = 512;

/// Serves an event-stream request whose head has been taken from `stream`: refuses it as a
/// websocket upgrade would be refused, or registers the client and starts its task.
pub async fn serve(
    state: Arc<AppState>,
    peer: SocketAddr,
    mut stream: TcpStream,
    request: Request,
) {
    let Request { headers, query } = request;
    let admitted =
        admission::admit(&state, peer, &headers, &query, Format::Sse).and_then(|ticket| {
            let start = start::for_event_stream(&headers, &query)
                .map_err(|bad| Box::new(bad.response()))?;
            Ok((start, ticket))
        });
    let (start, ticket) = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => {
            state.metrics.clients_rejected.inc();
            let sent = refuse(&mut stream, &refusal, state.sender.handshake_timeout).await;
            if let Err(err) = sent {
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
    let expires = ticket.expires;
    let info = ticket.info(peer);
    let (registration, joined) = match state.stream.join_resuming(ticket.subscription, start).await
    {
        Ok(joined) => joined,
        Err(unavailable) => {
            state.metrics.clients_rejected.inc();
            log::info!("event stream from {peer}: resume refused: {unavailable}");
            let refusal = super::routes::text_owned(
                hyper::StatusCode::SERVICE_UNAVAILABLE,
                unavailable.to_string(),
            );
            let sent = refuse(&mut stream, &refusal, state.sender.handshake_timeout).await;
            if let Err(err) = sent {
                log::debug!("event stream from {peer}: refusal not sent: {err}");
            }
            return;
        }
    };
    let id = registration.id;
    let _ = registration.client.info.set(info);
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
            expires,
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
    /// When the client's signed token expires, if it does: the stream ends then.
    expires: Option<SystemTime>,
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
        let mut expiry = Expiry::at(self.expires);
        loop {
            tokio::select! {
                biased;
                _ = client.control.stopped() => return End::Stopped(client.control.reason()),
                _ = expiry.reached() => return End::Stopped(CloseReason::TokenExpired),
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
    use hyper::header::HeaderValue;

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
}
