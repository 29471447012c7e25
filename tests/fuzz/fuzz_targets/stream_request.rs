//! The first bytes of a connection, as the accept loop reads them to find the stream path's
//! websocket handshakes and Server-Sent Events requests before hyper: any bytes are classified
//! without a panic; a complete head of either kind lies within the bytes and reads the same
//! from its own bytes; its start position (`since`, and an event stream's `Last-Event-ID`) is
//! read without a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vulcan_stream::transport::head::{Head, classify};
use vulcan_stream::transport::start;

fuzz_target!(|bytes: &[u8]| {
    let (len, request, websocket) = match classify(bytes, "stream") {
        Head::EventStream { len, request } => (len, request, false),
        Head::Websocket { len, request } => (len, request, true),
        Head::Partial | Head::Other => return,
    };
    assert!(len <= bytes.len(), "the head lies within the bytes");
    match classify(&bytes[..len], "stream") {
        Head::EventStream { len: again, .. } if !websocket => assert_eq!(again, len),
        Head::Websocket { len: again, .. } if websocket => assert_eq!(again, len),
        other => panic!("the head alone reads differently: {other:?}"),
    }
    if websocket {
        let _ = start::from_query(&request.query);
    } else {
        let _ = start::for_event_stream(&request.headers, &request.query);
    }
});
