//! NOTIFY payloads: any text is either refused or framed unchanged as one websocket text frame.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vulcan_stream::message::{self, websocket};

fuzz_target!(|payload: &str| {
    let checked = message::validate(payload);
    let framed = message::frame_from_payload(payload);
    assert_eq!(
        checked.is_ok(),
        framed.is_ok(),
        "validate and frame_from_payload disagree"
    );
    let _ = message::preview(payload);
    let Ok(frame) = framed else {
        return;
    };
    assert_eq!(frame.as_str(), payload, "the payload is sent unchanged");
    let wire = frame.wire();
    let header = websocket::header_len(payload.len());
    assert_eq!(wire.len(), header + payload.len());
    assert_eq!(
        wire[0],
        0x80 | websocket::opcode::TEXT,
        "one final text frame"
    );
    assert_eq!(&wire[header..], payload.as_bytes());
});
