//! HTTP: `/<stream>` (websocket), `/status`, `/ready`, `/metrics`; our own accept loop.
//!
//! warp routes each request, but the accept loop and the websocket upgrade are ours: hyper's
//! connection builder is where the handshake timeout and the header size limit live, and
//! completing the upgrade by hand lets the client join the hub *before* the 101 goes out (so a
//! client that saw its 101 misses nothing) and hands the raw socket to [`crate::client`], which
//! writes shared, pre-encoded frames into it directly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hyper::StatusCode;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::filters::path::FullPath;
use warp::http::Method;
use warp::hyper::body::Bytes;
use warp::reply::Response;

use crate::config::SenderConfig;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::receiver::ListenerState;
use crate::subscriber::{Liveness, Subscriber};

/// The largest request head (request line plus headers) accepted; hyper's minimum is 8 KiB.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// Everything a request handler needs.
pub struct AppState {
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub listener_state: watch::Receiver<ListenerState>,
    pub sender: SenderConfig,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

/// The client's address, put into each request's extensions by the accept loop.
#[derive(Debug, Clone, Copy)]
struct PeerAddr(SocketAddr);

/// Pending connections the kernel may hold before `accept` (capped by `net.core.somaxconn`).
/// The usual 128 overflows when thousands of agents reconnect at once, and an overflowed SYN is
/// retried only after a second.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds `[::]:port` (dual-stack), or `0.0.0.0:port` where IPv6 is unavailable.
pub async fn bind(port: u16) -> Result<TcpListener, crate::error::Error> {
    let v6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
    match listen_on(v6) {
        Ok(listener) => Ok(listener),
        // No IPv6 on this host: fall back to IPv4 only.
        Err(err)
            if err.raw_os_error() == Some(libc::EAFNOSUPPORT)
                || err.kind() == std::io::ErrorKind::AddrNotAvailable =>
        {
            let v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port));
            listen_on(v4).map_err(|source| crate::error::Error::Bind { addr: v4, source })
        }
        Err(source) => Err(crate::error::Error::Bind { addr: v6, source }),
    }
}

fn listen_on(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv6() {
        tokio::net::TcpSocket::new_v6()?
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts connections until shutdown, then lets in-flight plain requests finish.
pub async fn serve(listener: TcpListener, state: Arc<AppState>) {
    let routes = routes(state.clone());
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = state.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    log::warn!("accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let routes = routes.clone();
        let state = state.clone();
        connections.spawn(serve_connection(stream, peer, routes, state));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    routes: BoxedFilter<(Response,)>,
    state: Arc<AppState>,
) {
    let _ = stream.set_nodelay(true);
    let service = TowerToHyperService::new(warp::service(routes));
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(PeerAddr(peer));
        hyper::service::Service::call(&service, req)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(state.sender.handshake_timeout)
        .max_buf_size(MAX_REQUEST_HEAD);
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(err) = result {
                log::debug!("connection from {peer}: {err}");
            }
        }
        _ = state.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
        }
    }
}

/// One filter extracts what every route needs; [`route`] dispatches on the exact path, so that
/// `/stream/` and `/STREAM` are 404 as they were in the original.
fn routes(state: Arc<AppState>) -> BoxedFilter<(Response,)> {
    warp::path::full()
        .and(warp::method())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<OnUpgrade>())
        .and(warp::ext::optional::<PeerAddr>())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .map(
            move |path: FullPath,
                  method: Method,
                  headers: HeaderMap,
                  on_upgrade: Option<OnUpgrade>,
                  peer: Option<PeerAddr>,
                  query: String| {
                let request = RequestParts {
                    method,
                    headers,
                    query,
                    on_upgrade,
                    peer: peer.map(|PeerAddr(addr)| addr),
                };
                route(&state, path.as_str(), request)
            },
        )
        .boxed()
}

struct RequestParts {
    method: Method,
    headers: HeaderMap,
    /// The raw query string; only `token` is read from it.
    query: String,
    on_upgrade: Option<OnUpgrade>,
    peer: Option<SocketAddr>,
}

fn route(state: &Arc<AppState>, path: &str, request: RequestParts) -> Response {
    let Some(rest) = path.strip_prefix('/') else {
        return text(StatusCode::NOT_FOUND, "not found");
    };
    match rest {
        "status" => status(state),
        "ready" => ready(state),
        "metrics" => metrics(state),
        _ if rest == state.sender.stream_path => upgrade(state, request),
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response {
    let mut response = Response::new(format!("{body}\n").into());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Liveness: always 200, with what an operator wants to see first.
fn status(state: &AppState) -> Response {
    let body = serde_json::json!({
        "status": "ok",
        "listener": state.listener_state.borrow().as_str(),
        "clients": state.hub.client_count(),
        "notifications_forwarded": state.metrics.notifications_forwarded.get(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    let mut response = Response::new(body.to_string().into());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Readiness: 200 only while the LISTEN is active.
fn ready(state: &AppState) -> Response {
    match *state.listener_state.borrow() {
        ListenerState::Listening => text(StatusCode::OK, "ready"),
        ListenerState::Connecting => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: LISTEN connection not established",
        ),
    }
}

fn metrics(state: &AppState) -> Response {
    let mut response = Response::new(state.metrics.render().into());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        // prometheus-client writes OpenMetrics, which Prometheus scrapes when told so.
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

/// Whether a header holds `token` in its comma-separated list (case-insensitive).
fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|part| part.trim().eq_ignore_ascii_case(token))
        })
    })
}

/// Validates the handshake (RFC 6455 §4.2.1), registers the client, and answers 101.
fn upgrade(state: &Arc<AppState>, request: RequestParts) -> Response {
    let headers = &request.headers;
    let wants_upgrade = header_has_token(headers, header::CONNECTION, "upgrade")
        && header_has_token(headers, header::UPGRADE, "websocket");
    if request.method != Method::GET {
        state.metrics.clients_rejected.inc();
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use GET",
        );
    }
    if !wants_upgrade {
        state.metrics.clients_rejected.inc();
        return text(
            StatusCode::BAD_REQUEST,
            "bad request: this is a websocket endpoint (send Connection: Upgrade and Upgrade: websocket)",
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        state.metrics.clients_rejected.inc();
        let mut response = text(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported websocket version: use Sec-WebSocket-Version: 13",
        );
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return response;
    }
    let key = match headers.get(header::SEC_WEBSOCKET_KEY) {
        Some(key) if is_valid_key(key.as_bytes()) => key.as_bytes().to_vec(),
        _ => {
            state.metrics.clients_rejected.inc();
            return text(
                StatusCode::BAD_REQUEST,
                "bad request: missing or invalid Sec-WebSocket-Key",
            );
        }
    };
    if let Some(refusal) = admission(state, &request) {
        state.metrics.clients_rejected.inc();
        return refusal;
    }
    let Some(on_upgrade) = request.on_upgrade else {
        state.metrics.clients_rejected.inc();
        return text(
            StatusCode::BAD_REQUEST,
            "bad request: connection cannot be upgraded",
        );
    };

    // Join the hub now: frames published from here on are queued for this client.
    let registration = state.hub.register();
    let peer = request
        .peer
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let liveness = Liveness {
        ping_interval: state.sender.ping_interval,
        pong_timeout: state.sender.pong_timeout,
        max_message: state.sender.max_frame_size,
    };
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
        // comes back as such; taking it whole lets the hub write to it directly.
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
            metrics,
        }
        .run()
        .await;
    });

    let mut response = Response::new(Bytes::new().into());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&derive_accept_key(&key))
            .expect("base64 text is a valid header value"),
    );
    response
}

/// Auth, origin and capacity checks; `Some` is the refusal to send.
fn admission(state: &AppState, request: &RequestParts) -> Option<Response> {
    let sender = &state.sender;
    if let Some(expected) = &sender.stream_token {
        let presented = bearer_token(&request.headers).or_else(|| query_token(&request.query));
        let accepted = presented
            .is_some_and(|token| constant_time_eq(token.as_bytes(), expected.0.as_bytes()));
        if !accepted {
            log::info!(
                "upgrade from {} refused: missing or wrong token",
                describe_peer(request.peer)
            );
            let mut response = text(
                StatusCode::UNAUTHORIZED,
                "unauthorized: a valid token is required",
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return Some(response);
        }
    }
    if !sender.allowed_origins.is_empty() {
        if let Some(origin) = request.headers.get(header::ORIGIN) {
            let allowed = origin.to_str().is_ok_and(|o| {
                sender
                    .allowed_origins
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case(o))
            });
            if !allowed {
                log::info!(
                    "upgrade from {} refused: origin {:?} not allowed",
                    describe_peer(request.peer),
                    origin
                );
                return Some(text(StatusCode::FORBIDDEN, "forbidden: origin not allowed"));
            }
        }
    }
    if state.hub.client_count() >= sender.max_clients {
        log::warn!(
            "upgrade from {} refused: {} clients connected (MaxClients)",
            describe_peer(request.peer),
            sender.max_clients
        );
        return Some(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "service unavailable: too many clients",
        ));
    }
    None
}

fn describe_peer(peer: Option<SocketAddr>) -> String {
    peer.map_or_else(|| "unknown peer".to_owned(), |p| p.to_string())
}

/// `Authorization: Bearer <token>`.
fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

/// `?token=<token>`, for browsers, which cannot set headers on a websocket.
fn query_token(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "token")
        .map(|(_, value)| value.into_owned())
}

/// Compares without an early exit, so that timing does not reveal how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let len = a.len().max(b.len());
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..len {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
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
    fn compares_tokens_exactly() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn finds_tokens_in_header_and_query() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer_token(&headers).as_deref(), Some("abc"));
        assert_eq!(query_token("x=1&token=a%2Bb").as_deref(), Some("a+b"));
        assert_eq!(query_token("x=1"), None);
    }

    #[test]
    fn accepts_the_original_readme_key() {
        assert!(is_valid_key(b"SGVsbG8sIHdvcmxkIQ=="));
        assert!(is_valid_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!is_valid_key(b""));
        assert!(!is_valid_key(b"not base64!"));
    }
}
