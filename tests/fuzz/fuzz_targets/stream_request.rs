//! The first bytes of a connection, as the accept loop reads them to find Server-Sent Events
//! requests before hyper: any bytes are classified without a panic; a complete event-stream
//! head lies within the bytes, reads the same from its own bytes, and its start position
//! (`Last-Event-ID`, `since`) is read without a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vulcan_stream::transport::sse::{Head, classify};
use vulcan_stream::transport::start;

fuzz_target!(|bytes: &[u8]| {
    if let Head::EventStream { len, request } = classify(bytes, "stream") {
        assert!(len <= bytes.len(), "the head lies within the bytes");
        match classify(&bytes[..len], "stream") {
            Head::EventStream { len: again, .. } => assert_eq!(again, len),
            other => panic!("the head alone reads differently: {other:?}"),
        }
        let _ = start::for_event_stream(&request.headers, &request.query);
    }
});
