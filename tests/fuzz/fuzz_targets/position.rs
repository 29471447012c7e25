//! Positions as clients send them back (`since`, `Last-Event-ID`): any text is refused or read
//! as a position that prints within the limit, URL-safe, and reads back the same.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vulcan_stream::message::Position;
use vulcan_stream::message::position::MAX_LEN;

fuzz_target!(|text: &str| {
    let Ok(position) = text.parse::<Position>() else {
        return;
    };
    let printed = position.to_string();
    assert!(printed.len() <= MAX_LEN);
    assert!(
        printed
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
    assert_eq!(printed.parse::<Position>(), Ok(position));
});
