//! Who may open the stream, over a websocket or as an event stream: the shared token or a signed
//! token and its claims, the allowed Origins, and `MaxClients`. Checked after the request is known to be valid and before
//! the client joins the fan-out. Also what an admitted browser is told about its Origin (CORS).

use std::net::SocketAddr;

use hyper::StatusCode;
use hyper::header::{self, HeaderMap, HeaderValue};

use super::routes::{text, text_owned};
use super::{AppState, Response};
use crate::auth::{self, Denied, Grant};
use crate::config::SenderConfig;

/// Auth, origin and capacity checks: what a signed token grants the client (`None` without
/// one), or the refusal to send.
pub fn admit(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    query: &str,
) -> Result<Option<Grant>, Box<Response>> {
    let sender = &state.sender;
    let grant = auth::authorize(
        sender.stream_token.as_ref(),
        sender.jwt.as_ref(),
        headers,
        query,
    )
    .and_then(|grant| match &grant {
        Some(grant) => within_claims(grant, &state.channel).map(|()| Some(grant.clone())),
        None => Ok(None),
    });
    let grant = match grant {
        Ok(grant) => grant,
        Err(denied @ (Denied::Missing | Denied::Invalid(_))) => {
            log::info!("stream request from {peer} refused: {denied}");
            let mut response =
                text_owned(StatusCode::UNAUTHORIZED, format!("unauthorized: {denied}"));
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return Err(Box::new(response));
        }
        Err(denied @ Denied::Forbidden(_)) => {
            log::info!("stream request from {peer} refused: {denied}");
            return Err(Box::new(text_owned(
                StatusCode::FORBIDDEN,
                format!("forbidden: {denied}"),
            )));
        }
    };
    if !sender.allowed_origins.is_empty() {
        if let Some(origin) = headers.get(header::ORIGIN) {
            if !origin_allowed(sender, origin) {
                log::info!("stream request from {peer} refused: origin {origin:?} not allowed");
                return Err(Box::new(text(
                    StatusCode::FORBIDDEN,
                    "forbidden: origin not allowed",
                )));
            }
        }
    }
    if state.hub.client_count() >= sender.max_clients {
        log::warn!(
            "stream request from {peer} refused: {} clients connected (MaxClients)",
            sender.max_clients
        );
        return Err(Box::new(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "service unavailable: too many clients",
        )));
    }
    Ok(grant)
}

/// Whether what a token's claims allow covers this request: its `channels` must list the
/// stream's channel, and a `filter` cannot be honoured by a server that delivers every message
/// of its channel, so it is refused rather than ignored.
fn within_claims(grant: &Grant, channel: &str) -> Result<(), Denied> {
    if let Some(channels) = &grant.channels {
        if !channels.iter().any(|c| c == channel) {
            return Err(Denied::Forbidden(format!(
                "its channels claim does not list {channel:?}"
            )));
        }
    }
    if grant.filtered {
        return Err(Denied::Forbidden(
            "its filter claim cannot be applied: this server delivers every message of the \
             channel"
                .to_owned(),
        ));
    }
    Ok(())
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
