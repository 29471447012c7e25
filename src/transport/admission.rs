//! Who may open the stream, over a websocket or as an event stream, and what they read: the
//! shared token or a signed token and its claims, the channel and filter asked for
//! ([`super::selection`]) within those claims, the allowed Origins, and `MaxClients`. Checked after the request is known to be valid and before
//! the client joins the fan-out. Also what an admitted browser is told about its Origin (CORS).

use std::net::SocketAddr;
use std::time::SystemTime;

use hyper::StatusCode;
use hyper::header::{self, HeaderMap, HeaderValue};

use super::routes::{text, text_owned};
use super::selection::{self, BadSelection};
use super::{AppState, Response};
use crate::auth::{self, Denied, Grant};
use crate::config::SenderConfig;
use crate::fanout::{ClientInfo, Subscription};
use crate::message::{Filter, Format, preview};

/// What an admitted client gets: what it reads, and what its token says of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub subscription: Subscription,
    /// When its signed token expires, if it came with one that does.
    pub expires: Option<SystemTime>,
    /// Its signed token's `sub`.
    pub subject: Option<String>,
}

impl Ticket {
    /// What the operator's list of clients shows of a client admitted with this ticket from
    /// `peer`, connected now.
    pub fn info(&self, peer: SocketAddr) -> ClientInfo {
        ClientInfo {
            // An IPv4 client of the dual-stack socket is shown as IPv4, as it connected.
            peer: SocketAddr::new(peer.ip().to_canonical(), peer.port()),
            subject: self.subject.as_deref().map(Box::from),
            since: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |since| since.as_secs()),
        }
    }
}

/// Auth, selection, origin and capacity checks for a client that wants `format`: its ticket,
/// or the refusal to send (401 without a valid token, 400 for a bad query, 404 for a channel
/// the server does not carry, 403 outside the token's claims or the allowed Origins, 503 at
/// `MaxClients`).
pub fn admit(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    query: &str,
    format: Format,
) -> Result<Ticket, Box<Response>> {
    let sender = &state.sender;
    let grant = match auth::authorize(
        sender.stream_token.as_ref(),
        sender.jwt.as_ref(),
        headers,
        query,
    ) {
        Ok(grant) => grant,
        Err(denied) => return Err(Box::new(refusal(peer, &denied))),
    };
    let selection = selection::from_query(query, format != Format::Legacy).map_err(|bad| {
        log::info!("stream request from {peer} refused: {bad}");
        Box::new(bad.response())
    })?;
    let names = state.stream.channel_names();
    let name = selection.channel.as_deref().unwrap_or(&names[0]);
    let Some(channel) = state.stream.channel_id(name) else {
        let bad = BadSelection::NoSuchChannel(preview(name));
        log::info!("stream request from {peer} refused: {bad}");
        return Err(Box::new(bad.response()));
    };
    let filter = match &grant {
        Some(grant) => within_claims(grant, name, &selection.filter)
            .map_err(|denied| Box::new(refusal(peer, &denied)))?,
        None => selection.filter,
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
    let (expires, subject) = grant.map_or((None, None), |grant| (grant.expires, grant.subject));
    Ok(Ticket {
        subscription: Subscription {
            channel,
            format,
            filter: (!filter.is_empty()).then_some(filter),
        },
        expires,
        subject,
    })
}

/// The answer to a request whose token is missing, invalid or too narrow for it (logged).
fn refusal(peer: SocketAddr, denied: &Denied) -> Response {
    log::info!("stream request from {peer} refused: {denied}");
    match denied {
        Denied::Missing | Denied::Invalid(_) => {
            let mut response =
                text_owned(StatusCode::UNAUTHORIZED, format!("unauthorized: {denied}"));
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
        Denied::Forbidden(_) => text_owned(StatusCode::FORBIDDEN, format!("forbidden: {denied}")),
    }
}

/// The filter of a client whose token granted `grant`, if the request stays within it: its
/// `channels` must list the channel, and the request may narrow its `filter`, never widen it.
fn within_claims(grant: &Grant, channel: &str, asked: &Filter) -> Result<Filter, Denied> {
    if let Some(channels) = &grant.channels {
        if !channels.iter().any(|c| c == channel) {
            return Err(Denied::Forbidden(format!(
                "its channels claim does not list {:?}",
                preview(channel)
            )));
        }
    }
    match &grant.filter {
        Some(imposed) => imposed
            .narrowed_by(asked)
            .map_err(|widened| Denied::Forbidden(widened.to_string())),
        None => Ok(asked.clone()),
    }
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
