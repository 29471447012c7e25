//! Upgrade request heads: any bytes a client sends before its 101, parsed as hyper parses them
//! (httparse), then checked as a websocket handshake. Nothing panics, and an accepted key
//! always makes a valid `Sec-WebSocket-Accept` header.

#![no_main]

use hyper::http::{HeaderName, HeaderValue, Method, Request};
use libfuzzer_sys::fuzz_target;
use vulcan_stream::transport::upgrade::{accept_value, check_handshake};

/// hyper's default limit of headers in a request head.
const MAX_HEADERS: usize = 100;

fuzz_target!(|bytes: &[u8]| {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = head.parse(bytes) else {
        return;
    };
    let (Some(method), Some(path)) = (head.method, head.path) else {
        return;
    };
    // hyper refuses a head whose method, target or headers http cannot represent; so do we.
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let mut builder = Request::builder().method(method).uri(path);
    for header in head.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(header.name.as_bytes()),
            HeaderValue::from_bytes(header.value),
        ) else {
            return;
        };
        builder = builder.header(name, value);
    }
    let Ok(request) = builder.body(()) else {
        return;
    };
    if let Ok(key) = check_handshake(request.method(), request.headers()) {
        assert_eq!(request.method(), Method::GET);
        let accept = accept_value(&key);
        assert_eq!(accept.len(), 28, "base64 of a SHA-1 digest");
    }
});
