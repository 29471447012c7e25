//! NOTIFY payloads: any text is either refused, or made into one message whose every encoding
//! carries it unchanged: the legacy text frame holds its bytes, the `vulcan-stream.v1` frame is
//! JSON whose `data` is the payload's JSON, and the SSE event's `data:` lines give it back. The
//! agents' fields read from it are what filters see: a filter on a field's value keeps the
//! message, a filter on another value does not.

#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use vulcan_stream::message::{self, ChannelId, Epoch, Field, Filter, Format, Outgoing, websocket};

/// The payload of one unmasked, final server text frame.
fn text_payload(frame: &[u8]) -> &[u8] {
    assert_eq!(
        frame[0],
        0x80 | websocket::opcode::TEXT,
        "one final text frame"
    );
    let header = match frame[1] {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    &frame[header..]
}

fuzz_target!(|payload: &str| {
    let _ = message::preview(payload);
    let Ok(fields) = message::check(payload) else {
        assert!(message::validate(payload).is_err());
        return;
    };
    let position = Epoch::new_after(None).start().next();
    let outgoing = Outgoing::accepted(ChannelId::DEFAULT, position, payload, fields.clone());
    for field in Field::ALL {
        let (mut same, mut other) = (Filter::default(), Filter::default());
        let value = fields.get(field);
        same.allow(field, value.unwrap_or("any"));
        other.allow(field, &format!("{}-other", value.unwrap_or("any")));
        assert!(outgoing.is_for(Some(&same)), "{field}={value:?} kept");
        // Without the field the message is a broadcast: every filter keeps it.
        assert_eq!(outgoing.is_for(Some(&other)), value.is_none());
    }
    assert_eq!(outgoing.payload(), Some(payload));

    let legacy = outgoing.frame(Format::Legacy).expect("a legacy frame");
    assert_eq!(text_payload(legacy), payload.as_bytes(), "sent unchanged");

    // Read as raw text: a checked payload may hold numbers beyond what an f64 holds.
    let v1 = outgoing.frame(Format::V1).expect("a v1 frame");
    let v1: BTreeMap<String, Box<RawValue>> =
        serde_json::from_slice(text_payload(v1)).expect("v1 is JSON");
    let keys: Vec<&str> = v1.keys().map(String::as_str).collect();
    assert_eq!(keys, ["data", "id"]);
    let json_space: &[char] = &[' ', '\t', '\n', '\r'];
    assert_eq!(v1["data"].get(), payload.trim_matches(json_space));
    assert_eq!(v1["id"].get(), format!("\"{position}\""));

    let sse = outgoing.frame(Format::Sse).expect("an SSE event");
    let sse = std::str::from_utf8(sse).expect("SSE is text");
    let event = sse
        .strip_suffix("\n\n")
        .expect("an event ends with a blank line");
    let mut lines = event.split('\n');
    assert_eq!(lines.next(), Some(format!("id: {position}").as_str()));
    let data: Vec<&str> = lines
        .map(|line| line.strip_prefix("data: ").expect("a data line"))
        .collect();
    let expected = payload.replace("\r\n", "\n").replace('\r', "\n");
    assert_eq!(
        data.join("\n"),
        expected,
        "the browser rebuilds the payload"
    );
});
