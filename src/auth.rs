//! Who may read the stream: the shared token, presented as a Bearer header or `?token=`.

use hyper::header::{self, HeaderMap};

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

/// Whether the request presents `expected`, in its `Authorization` header or its query.
pub fn presents_token(headers: &HeaderMap, query: &str, expected: &str) -> bool {
    bearer_token(headers)
        .or_else(|| query_token(query))
        .is_some_and(|token| constant_time_eq(token.as_bytes(), expected.as_bytes()))
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
        assert!(presents_token(&headers, "", "abc"));
        assert!(presents_token(&HeaderMap::new(), "token=abc", "abc"));
        assert!(!presents_token(&HeaderMap::new(), "token=abd", "abc"));
    }
}
