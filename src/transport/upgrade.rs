//! The websocket handshake (RFC 6455 §4.2.1), completed by hand rather than by a websocket
//! library: the client joins the fan-out *before* the 101 goes out (so a client that saw its
//! 101 misses nothing), and its raw socket goes to the fan-out, which writes shared,
//! pre-encoded frames into it directly.
//!
//! A handshake is normally served on the raw socket, from the head the accept loop read
//! ([`serve`]), with nothing of hyper's made or kept. hyper answers only the heads the accept
//! loop leaves to it ([`upgrade`]), with the same checks.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::admission::Ticket;
use super::head::{Request, refuse};
use super::routes::text_owned;
use super::subscriber::{Liveness, Subscriber};
use super::{AppState, Response, admission, start};
use crate::fanout::Registration;
use crate::message::Format;
use crate::stream::{Joined, Start};

/// The websocket subprotocol of clients that want positions, resume and resets.
pub const V1: &str = "vulcan-stream.v1";

/// What the client of an accepted handshake asked for.
struct Admitted {
    key: Vec<u8>,
    start: Start,
    offers_v1: bool,
    ticket: Ticket,
}

/// Checks a handshake, and whether this client may connect and where it starts: what it asked
/// for, or the answer that refuses it (counted).
fn admit(
    state: &AppState,
    peer: SocketAddr,
    method: &Method,
    headers: &HeaderMap,
    query: &str,
) -> Result<Admitted, Box<Response>> {
    let refusal = match check_handshake(method, headers) {
        Err(bad) => bad.response(),
        Ok(key) => {
            let offers_v1 = header_has_token(headers, header::SEC_WEBSOCKET_PROTOCOL, V1);
            let start = start::from_query(query);
            // Clients that neither offer the protocol nor resume get exactly the original
            // frames.
            let format = if offers_v1 || start != Ok(Start::Live) {
                Format::V1
            } else {
                Format::Legacy
            };
            match admission::admit(state, peer, headers, query, format) {
                Err(refusal) => *refusal,
                Ok(ticket) => match start {
                    Err(bad) => bad.response(),
                    Ok(start) => {
                        return Ok(Admitted {
                            key,
                            start,
                            offers_v1,
                            ticket,
                        });
                    }
                },
            }
        }
    };
    state.metrics.clients_rejected.inc();
    Err(Box::new(refusal))
}

/// Joins the fan-out at the client's start: frames published from here on are queued for it.
/// In table mode a resume may have to read the table first, and is refused (503, counted)
/// while the table cannot be read.
async fn join(
    state: &AppState,
    peer: SocketAddr,
    admitted: &Admitted,
) -> Result<Registration, Box<Response>> {
    let subscription = admitted.ticket.subscription.clone();
    let (registration, joined) = match state
        .stream
        .join_resuming(subscription, admitted.start)
        .await
    {
        Ok(joined) => joined,
        Err(unavailable) => {
            state.metrics.clients_rejected.inc();
            log::info!("client {peer}: resume refused: {unavailable}");
            return Err(Box::new(text_owned(
                StatusCode::SERVICE_UNAVAILABLE,
                unavailable.to_string(),
            )));
        }
    };
    let _ = registration.client.info.set(admitted.ticket.info(peer));
    if joined != Joined::Live {
        log::debug!("client {} ({peer}): {joined:?}", registration.id);
    }
    Ok(registration)
}

fn liveness(state: &AppState) -> Liveness {
    Liveness {
        pong_timeout: state.sender.pong_timeout,
        max_message: state.sender.max_frame_size,
    }
}

/// Serves a websocket handshake whose head the accept loop has taken from `stream`, without
/// hyper: refuses it, or registers the client, writes the 101 and starts the client's task.
/// The socket goes to the client's outbox only after the 101 (in [`Subscriber::run`]): what is
/// published meanwhile waits in the outbox, so it can neither overtake the 101 nor be missed.
pub async fn serve(
    state: Arc<AppState>,
    peer: SocketAddr,
    mut stream: TcpStream,
    request: Request,
) {
    let joined = match admit(&state, peer, &Method::GET, &request.headers, &request.query) {
        Ok(admitted) => {
            drop(request);
            join(&state, peer, &admitted)
                .await
                .map(|registration| (admitted, registration))
        }
        Err(refusal) => Err(refusal),
    };
    let (admitted, registration) = match joined {
        Ok(joined) => joined,
        Err(refusal) => {
            let sent = refuse(&mut stream, &refusal, state.sender.handshake_timeout).await;
            if let Err(err) = sent {
                log::debug!("websocket handshake from {peer}: refusal not sent: {err}");
            }
            return;
        }
    };
    let head = switching_protocols(&admitted);
    match timeout(state.sender.handshake_timeout, stream.write_all(&head)).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            return log::debug!("client {} ({peer}): 101 not sent: {err}", registration.id);
        }
        Err(_) => return log::debug!("client {} ({peer}): 101 not taken in time", registration.id),
    }
    drop(head);
    // A task of its own, as small as the client's session needs: this one, sized for the
    // handshake's states too, ends here.
    state.tasks.spawn(
        Subscriber {
            stream: Arc::new(stream),
            leftover: Bytes::new(),
            registration,
            peer,
            liveness: liveness(&state),
            expires: admitted.ticket.expires,
            metrics: state.metrics.clone(),
        }
        .run(),
    );
}

/// The 101 of an accepted handshake, as bytes for the socket.
fn switching_protocols(admitted: &Admitted) -> Vec<u8> {
    let mut head = Vec::with_capacity(160);
    head.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-accept: ",
    );
    head.extend_from_slice(derive_accept_key(&admitted.key).as_bytes());
    head.extend_from_slice(b"\r\n");
    if admitted.offers_v1 {
        head.extend_from_slice(b"sec-websocket-protocol: ");
        head.extend_from_slice(V1.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// The same handshake when hyper has read it (a head the accept loop could not classify, such
/// as one that arrived in pieces after the client stopped sending): validates it, registers
/// the client, and answers 101, or says what is wrong.
pub async fn upgrade(
    state: &Arc<AppState>,
    peer: SocketAddr,
    mut request: hyper::Request<Incoming>,
) -> Response {
    let query = request.uri().query().unwrap_or_default();
    let admitted = match admit(state, peer, request.method(), request.headers(), query) {
        Ok(admitted) => admitted,
        Err(refusal) => return *refusal,
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    let registration = match join(state, peer, &admitted).await {
        Ok(registration) => registration,
        Err(refusal) => return *refusal,
    };
    let liveness = liveness(state);
    let expires = admitted.ticket.expires;
    let metrics = state.metrics.clone();
    let shutdown = state.shutdown.clone();
    state.tasks.spawn(async move {
        let upgraded = tokio::select! {
            _ = shutdown.cancelled() => return,
            upgraded = on_upgrade => match upgraded {
                Ok(upgraded) => upgraded,
                Err(err) => {
                    log::debug!("client {} ({peer}): upgrade failed: {err}", registration.id);
                    return;
                }
            },
        };
        // The accept loop serves every connection as a `TokioIo<TcpStream>`, so the socket
        // comes back as such; taking it whole lets the fan-out write to it directly.
        let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
            log::error!(
                "client {} ({peer}): upgraded connection is not a TCP stream",
                registration.id
            );
            return;
        };
        Subscriber {
            stream: Arc::new(parts.io.into_inner()),
            leftover: parts.read_buf,
            registration,
            peer,
            liveness,
            expires,
            metrics,
        }
        .run()
        .await;
    });

    let mut response = Response::new(String::new());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept_value(&admitted.key));
    if admitted.offers_v1 {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(V1));
    }
    response
}

/// The `Sec-WebSocket-Accept` value answering the client's key (RFC 6455 §4.2.2).
pub fn accept_value(key: &[u8]) -> HeaderValue {
    HeaderValue::from_str(&derive_accept_key(key)).expect("base64 text is a valid header value")
}

/// Why a request to the stream path is not a websocket handshake this server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("method not allowed: use GET")]
    Method,
    #[error(
        "bad request: this is a websocket endpoint (send Connection: Upgrade and Upgrade: \
         websocket) or an event stream (send Accept: text/event-stream)"
    )]
    NotUpgrade,
    #[error("unsupported websocket version: use Sec-WebSocket-Version: 13")]
    Version,
    #[error("bad request: missing or invalid Sec-WebSocket-Key")]
    Key,
}

impl HandshakeError {
    /// The answer that says what is missing.
    pub fn response(self) -> Response {
        let status = match self {
            HandshakeError::Method => StatusCode::METHOD_NOT_ALLOWED,
            HandshakeError::NotUpgrade | HandshakeError::Key => StatusCode::BAD_REQUEST,
            HandshakeError::Version => StatusCode::UPGRADE_REQUIRED,
        };
        let mut response = text_owned(status, self.to_string());
        if self == HandshakeError::Version {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        response
    }
}

/// The client's key when the request is a valid websocket handshake. Public for the fuzz
/// target that feeds it arbitrary request heads.
pub fn check_handshake(method: &Method, headers: &HeaderMap) -> Result<Vec<u8>, HandshakeError> {
    if method != Method::GET {
        return Err(HandshakeError::Method);
    }
    let wants_upgrade = header_has_token(headers, header::CONNECTION, "upgrade")
        && header_has_token(headers, header::UPGRADE, "websocket");
    if !wants_upgrade {
        return Err(HandshakeError::NotUpgrade);
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err(HandshakeError::Version);
    }
    match headers.get(header::SEC_WEBSOCKET_KEY) {
        Some(key) if is_valid_key(key.as_bytes()) => Ok(key.as_bytes().to_vec()),
        _ => Err(HandshakeError::Key),
    }
}

/// Whether a header holds `token` in its comma-separated list (case-insensitive).
pub(super) fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|part| part.trim().eq_ignore_ascii_case(token))
        })
    })
}

/// RFC 6455 asks for the base64 of 16 random bytes, but the original accepted any key, and its
/// README's curl example sends the base64 of 13 (`Hello, world!`): accept any short base64.
fn is_valid_key(key: &[u8]) -> bool {
    key.len() <= 64
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|bytes| !bytes.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_original_readme_key() {
        assert!(is_valid_key(b"SGVsbG8sIHdvcmxkIQ=="));
        assert!(is_valid_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!is_valid_key(b""));
        assert!(!is_valid_key(b"not base64!"));
    }

    #[test]
    fn the_method_is_checked_before_the_headers() {
        let refused = check_handshake(&Method::POST, &HeaderMap::new());
        assert_eq!(refused, Err(HandshakeError::Method));
        assert_eq!(
            HandshakeError::Method.response().status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        let refused = check_handshake(&Method::GET, &HeaderMap::new());
        assert_eq!(refused, Err(HandshakeError::NotUpgrade));
        let version = HandshakeError::Version.response();
        assert_eq!(version.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(version.headers()[header::SEC_WEBSOCKET_VERSION], "13");
    }
}
