//! Who may read the stream: the shared token, or a signed token (JWT) with claims, presented
//! as a Bearer header, as `?token=`, or (for browsers, whose websocket cannot set headers) as a
//! websocket subprotocol entry `token.<jwt>`.
//!
//! No token ever reaches a log line, a metric or an error message: refusals say what was wrong
//! with a token, never what it was.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::header::{self, HeaderMap};
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;

use crate::config::{JwtKeys, Secret};
use crate::message::{Field, Filter};

/// The prefix of a token carried as a websocket subprotocol entry.
pub const PROTOCOL_TOKEN_PREFIX: &str = "token.";

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY_S: u64 = 5;

/// What a signed token grants its client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    /// When the client must be disconnected (`exp`); `None` for a token without one.
    pub expires: Option<SystemTime>,
    /// The channels it may read (`channels`); `None` when the claim is absent (any).
    pub channels: Option<Vec<String>>,
    /// The filter imposed on it (`filter`); `None` when the claim is absent or empty.
    pub filter: Option<Filter>,
    /// Who it is (`sub`), for the operator's list of clients.
    pub subject: Option<String>,
}

/// Why a request is not admitted: 401 for the first two, 403 for the last.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("a valid token is required")]
    Missing,
    #[error("the token is not accepted: {0}")]
    Invalid(String),
    #[error("the token does not allow this: {0}")]
    Forbidden(String),
}

/// The claims read from a verified token; others are ignored.
#[derive(Deserialize)]
struct Claims {
    exp: Option<u64>,
    channels: Option<Vec<String>>,
    filter: Option<serde_json::Map<String, serde_json::Value>>,
    sub: Option<String>,
}

/// Decides who the request is: `Ok(None)` when no token is needed or the shared token was
/// presented, `Ok(Some(grant))` for a verified signed token.
pub fn authorize(
    stream_token: Option<&Secret>,
    jwt: Option<&JwtKeys>,
    headers: &HeaderMap,
    query: &str,
) -> Result<Option<Grant>, Denied> {
    if stream_token.is_none() && jwt.is_none() {
        return Ok(None);
    }
    let token = bearer_token(headers)
        .or_else(|| query_token(query))
        .or_else(|| protocol_token(headers))
        .ok_or(Denied::Missing)?;
    if let Some(expected) = stream_token {
        if constant_time_eq(token.as_bytes(), expected.0.as_bytes()) {
            return Ok(None);
        }
    }
    match jwt {
        Some(keys) => verify(keys, &token).map(Some),
        None => Err(Denied::Invalid("wrong token".to_owned())),
    }
}

/// Verifies a signed token with the key of its algorithm and reads its claims.
fn verify(keys: &JwtKeys, token: &str) -> Result<Grant, Denied> {
    let header = jsonwebtoken::decode_header(token)
        .map_err(|_| Denied::Invalid("not a signed token".to_owned()))?;
    let key = match (header.alg, &keys.secret, &keys.public) {
        (Algorithm::HS256, Some(secret), _) => secret,
        (alg, _, Some((accepted, public))) if alg == *accepted => public,
        (alg, _, _) => {
            return Err(Denied::Invalid(format!(
                "algorithm {alg:?} is not accepted"
            )));
        }
    };
    let mut validation = Validation::new(header.alg);
    validation.leeway = LEEWAY_S;
    validation.validate_nbf = true;
    // A token without `exp` is valid until revoked by a new key: a choice left to the issuer.
    validation.required_spec_claims.clear();
    match &keys.audience {
        Some(audience) => validation.set_audience(&[audience]),
        None => validation.validate_aud = false,
    }
    if let Some(issuer) = &keys.issuer {
        validation.set_issuer(&[issuer]);
    }
    let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|err| {
        use jsonwebtoken::errors::ErrorKind;
        Denied::Invalid(
            match err.kind() {
                ErrorKind::ExpiredSignature => "expired",
                ErrorKind::ImmatureSignature => "not valid yet (nbf)",
                ErrorKind::InvalidAudience => "wrong audience",
                ErrorKind::InvalidIssuer => "wrong issuer",
                ErrorKind::InvalidSignature => "bad signature",
                ErrorKind::Json(_) => "malformed claims",
                _ => "malformed",
            }
            .to_owned(),
        )
    })?;
    let claims = data.claims;
    Ok(Grant {
        expires: claims.exp.map(|exp| UNIX_EPOCH + Duration::from_secs(exp)),
        channels: claims.channels,
        filter: claims.filter.map(filter_claim).transpose()?,
        subject: claims.sub,
    })
}

/// The `filter` claim: `{"agent_id": "A"}`, or several values of a field as an array
/// (`{"agent_id": ["A", "B"]}`). A field the server cannot filter on, or a value that is not a
/// string, refuses the token: ignoring it would deliver more than the issuer allowed.
fn filter_claim(claim: serde_json::Map<String, serde_json::Value>) -> Result<Filter, Denied> {
    use serde_json::Value;
    let mut filter = Filter::default();
    for (name, value) in &claim {
        let field = Field::named(name).ok_or_else(|| {
            Denied::Forbidden(format!(
                "its filter claim names {name:?}, which is not one of agent_id, check_id, \
                 scan_id and action"
            ))
        })?;
        let values: Vec<&Value> = match value {
            Value::Array(values) => values.iter().collect(),
            value => vec![value],
        };
        if values.is_empty() {
            return Err(Denied::Forbidden(format!(
                "its filter claim gives {field} no value"
            )));
        }
        for value in values {
            let Value::String(value) = value else {
                return Err(Denied::Forbidden(format!(
                    "its filter claim's {field} is not a string or an array of strings"
                )));
            };
            filter.allow(field, value);
        }
    }
    Ok(filter)
}

/// `Sec-WebSocket-Protocol: token.<jwt>`, the one way a browser's websocket can carry a token
/// without putting it in the URL.
pub fn protocol_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find_map(|entry| entry.trim().strip_prefix(PROTOCOL_TOKEN_PREFIX))
        .map(str::to_owned)
}

/// `Authorization: Bearer <token>`.
pub fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

/// `?token=<token>`, for browsers, which cannot set headers on a websocket.
pub fn query_token(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "token")
        .map(|(_, value)| value.into_owned())
}

/// Compares without an early exit, so that timing does not reveal how much of a guess matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let len = a.len().max(b.len());
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..len {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

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
        let shared = Secret("abc".to_owned());
        let by = |headers: &HeaderMap, query: &str| authorize(Some(&shared), None, headers, query);
        assert_eq!(by(&headers, ""), Ok(None));
        assert_eq!(by(&HeaderMap::new(), "token=abc"), Ok(None));
        assert!(matches!(
            by(&HeaderMap::new(), "token=abd"),
            Err(Denied::Invalid(_))
        ));
        assert_eq!(by(&HeaderMap::new(), ""), Err(Denied::Missing));
        let mut protocol = HeaderMap::new();
        protocol.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("vulcan-stream.v1, token.abc"),
        );
        assert_eq!(protocol_token(&protocol).as_deref(), Some("abc"));
        assert_eq!(by(&protocol, ""), Ok(None));
    }
}
