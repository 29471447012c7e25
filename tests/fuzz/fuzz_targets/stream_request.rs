//! The first bytes of a connection, as the accept loop reads them to find the stream path's
//! websocket handshakes and Server-Sent Events requests before hyper: any bytes are classified
//! without a panic; a complete head of either kind lies within the bytes and reads the same
//! from its own bytes; its start position (`since`, and an event stream's `Last-Event-ID`) and
//! its selection (`channel` and the filters) are read without a panic, and a selection read
//! leniently holds every filter value the query names.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vulcan_stream::message::Field;
use vulcan_stream::transport::head::{Head, classify};
use vulcan_stream::transport::{selection, start};

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
    let _ = selection::from_query(&request.query, true);
    if let Ok(lenient) = selection::from_query(&request.query, false) {
        for (name, value) in form_urlencoded::parse(request.query.as_bytes()) {
            if let Some(field) = Field::named(&name) {
                let values = lenient.filter.values(field).expect("a named field is kept");
                assert!(
                    values.iter().any(|v| **v == *value),
                    "{field}={value:?} kept"
                );
            }
        }
    }
});
