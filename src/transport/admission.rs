//! Who may open the stream, over a websocket or as an event stream: the shared token, the
//! allowed Origins, and `MaxClients`. Checked after the request is known to be valid and before
//! the client joins the fan-out. Also what an admitted browser is told about its Origin (CORS).

use std::net::SocketAddr;

use hyper::StatusCode;
use hyper::header::{self, HeaderMap, HeaderValue};

use super::routes::text;
use super::{AppState, Response};
use crate::auth;
use crate::config::SenderConfig;

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
            log::info!("stream request from {peer} refused: missing or wrong token");
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
            if !origin_allowed(sender, origin) {
                log::info!("stream request from {peer} refused: origin {origin:?} not allowed");
                return Some(text(StatusCode::FORBIDDEN, "forbidden: origin not allowed"));
            }
        }
    }
    if state.hub.client_count() >= sender.max_clients {
        log::warn!(
            "stream request from {peer} refused: {} clients connected (MaxClients)",
            sender.max_clients
        );
        return Some(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "service unavailable: too many clients",
        ));
    }
    None
}

fn origin_allowed(sender: &SenderConfig, origin: &HeaderValue) -> bool {
    origin.to_str().is_ok_and(|o| {
        sender
            .allowed_origins
            .iter()
            .any(|a| a.eq_ignore_ascii_case(o))
    })
}

/// The `Access-Control-Allow-Origin` of an admitted request that has an `Origin`, so that a page
/// of that origin may read the response (an `EventSource` of another origin needs it; a
/// websocket does not). With no allow-list every origin may read, and `*` says so; with one,
/// the request's origin (admitted, so listed) is echoed, and the answer varies with it.
/// Credentials are never allowed: the stream authenticates by token, not by cookie.
pub fn allowed_origin(sender: &SenderConfig, headers: &HeaderMap) -> Option<AllowOrigin> {
    let origin = headers.get(header::ORIGIN)?;
    if sender.allowed_origins.is_empty() {
        Some(AllowOrigin::Any)
    } else if origin_allowed(sender, origin) {
        Some(AllowOrigin::Echo(origin.clone()))
    } else {
        None
    }
}

/// See [`allowed_origin`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowOrigin {
    /// `Access-Control-Allow-Origin: *`.
    Any,
    /// `Access-Control-Allow-Origin: <origin>` and `Vary: Origin`.
    Echo(HeaderValue),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_admitted_origin_is_echoed() {
        let defaults = crate::Config::load(None, &|_| None).expect("the defaults load");
        let mut sender = defaults.config.sender;
        let mut headers = HeaderMap::new();
        assert_eq!(allowed_origin(&sender, &headers), None);
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://a.example"),
        );
        assert_eq!(allowed_origin(&sender, &headers), Some(AllowOrigin::Any));
        sender.allowed_origins = vec!["https://A.example".to_owned()];
        assert_eq!(
            allowed_origin(&sender, &headers),
            Some(AllowOrigin::Echo(HeaderValue::from_static(
                "https://a.example"
            )))
        );
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://b.example"),
        );
        assert_eq!(allowed_origin(&sender, &headers), None);
    }
}
