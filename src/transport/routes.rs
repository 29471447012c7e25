//! Which path answers what. Paths match exactly, so that `/stream/` and `/STREAM` are 404 as
//! they were in the original.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{HeaderMap, Method, Request, StatusCode};

use super::admission::{self, AllowOrigin};
use super::{AppState, Response, upgrade};
use crate::auth;
use crate::stream::ListenerState;

/// Answers one request from `peer`.
pub async fn route(
    state: &Arc<AppState>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response {
    let Some(rest) = request.uri().path().strip_prefix('/') else {
        return text(StatusCode::NOT_FOUND, "not found");
    };
    match rest {
        "status" => status(state),
        "ready" => ready(state),
        "metrics" => metrics(state),
        "clients" => clients(state, peer, request.headers()),
        _ if rest == state.sender.stream_path && request.method() == Method::OPTIONS => {
            preflight(state, request.headers())
        }
        _ if rest == state.sender.stream_path => upgrade::upgrade(state, peer, request).await,
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

/// The answer to a CORS preflight of the stream path (Fetch standard §3.2), which a browser
/// sends before a `fetch` of the event stream that sets `Authorization` or `Last-Event-ID`
/// itself (an `EventSource` never needs one): 204 with the method and headers the stream
/// reads, for an allowed origin; without the allow headers otherwise, which the browser takes
/// as a refusal.
fn preflight(state: &AppState, headers: &HeaderMap) -> Response {
    let mut response = Response::new(String::new());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let Some(origin) = admission::allowed_origin(&state.sender, headers) else {
        return response;
    };
    let h = response.headers_mut();
    match origin {
        AllowOrigin::Any => {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
        }
        AllowOrigin::Echo(origin) => {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            h.insert(header::VARY, HeaderValue::from_static("Origin"));
        }
    }
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, last-event-id, accept"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    response
}

/// A plain-text answer: the status and one line saying why.
pub fn text(status: StatusCode, body: &'static str) -> Response {
    text_owned(status, body.to_owned())
}

/// [`text`] for a line made at run time.
pub fn text_owned(status: StatusCode, mut body: String) -> Response {
    body.push('\n');
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Liveness: always 200, with what an operator wants to see first.
fn status(state: &AppState) -> Response {
    let head = state.stream.head();
    let (history_bytes, history_messages) = state.stream.history_size();
    let body = serde_json::json!({
        "status": "ok",
        "listener": state.listener_state.borrow().as_str(),
        "clients": state.hub.client_count(),
        "notifications_forwarded": state.metrics.notifications_forwarded.get(),
        "epoch": head.epoch.to_string(),
        "head": head.to_string(),
        "history_bytes": history_bytes,
        "history_messages": history_messages,
        "version": env!("CARGO_PKG_VERSION"),
    });
    let mut response = Response::new(body.to_string());
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

/// The connected clients, for an operator who presents the admin token: what this node
/// serves, to whom, and how each keeps up. Only while `AdminToken` is set (else 404, as any
/// unknown path); a missing or wrong token is 401, compared in constant time and never logged.
fn clients(state: &AppState, peer: SocketAddr, headers: &HeaderMap) -> Response {
    let Some(expected) = &state.sender.admin_token else {
        return text(StatusCode::NOT_FOUND, "not found");
    };
    let presented = auth::bearer_token(headers).unwrap_or_default();
    if !auth::constant_time_eq(presented.as_bytes(), expected.0.as_bytes()) {
        log::info!("/clients request from {peer} refused: missing or wrong admin token");
        let mut response = text(
            StatusCode::UNAUTHORIZED,
            "unauthorized: admin token required",
        );
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    let names = state.stream.channel_names();
    let clients: Vec<serde_json::Value> = state
        .hub
        .clients()
        .into_iter()
        .map(|(id, client)| {
            let info = client.info.get();
            serde_json::json!({
                "id": id,
                "remote_address": info.map(|i| i.peer.to_string()),
                "transport": client.format.as_str(),
                "channel": names.get(client.channel.index()),
                "filter": client.filter.as_ref().map(ToString::to_string),
                "subject": info.and_then(|i| i.subject.as_deref()),
                "queue_depth": client.out.queued(),
                "frames_sent": client.frames_sent(),
                "connected_since": info.map(|i| i.since),
            })
        })
        .collect();
    let body = serde_json::json!({ "clients": clients });
    let mut response = Response::new(body.to_string());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn metrics(state: &AppState) -> Response {
    let mut response = Response::new(state.metrics.render());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        // prometheus-client writes OpenMetrics, which Prometheus scrapes when told so.
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}
