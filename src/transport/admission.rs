//! Who may open the stream: the shared token, the allowed Origins, and `MaxClients`. Checked
//! after the handshake is known to be valid and before the client joins the fan-out.

use std::net::SocketAddr;

use hyper::StatusCode;
use hyper::header::{self, HeaderMap, HeaderValue};

use super::routes::text;
use super::{AppState, Response};
use crate::auth;

/// Auth, origin and capacity checks; `Some` is the refusal to send.
pub fn refusal(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    query: &str,
) -> Option<Response> {
    let sender = &state.sender;
    if let Some(expected) = &sender.stream_token {
        if !auth::presents_token(headers, query, &expected.0) {
            log::info!("upgrade from {peer} refused: missing or wrong token");
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
        if let Some(origin) = headers.get(header::ORIGIN) {
            let allowed = origin.to_str().is_ok_and(|o| {
                sender
                    .allowed_origins
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case(o))
            });
            if !allowed {
                log::info!("upgrade from {peer} refused: origin {origin:?} not allowed");
                return Some(text(StatusCode::FORBIDDEN, "forbidden: origin not allowed"));
            }
        }
    }
    if state.hub.client_count() >= sender.max_clients {
        log::warn!(
            "upgrade from {peer} refused: {} clients connected (MaxClients)",
            sender.max_clients
        );
        return Some(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "service unavailable: too many clients",
        ));
    }
    None
}
