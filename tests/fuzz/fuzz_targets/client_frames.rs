//! Client frames: whatever bytes a client sends, split wherever the socket splits them, the
//! reader reports the same events and the same error as when it gets them in one piece.
//!
//! Input: 2 bytes of message size limit (big-endian, kept small so that limits are hit too), 1
//! byte giving the number of cuts, 2 bytes per cut (big-endian, taken modulo the length), then
//! the bytes the client sends.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vulcan_stream::message::websocket::close_code;
use vulcan_stream::transport::frames::{ClientEvent, FrameReader, ProtocolError};

/// Feeds `pieces` in order until the first error.
fn run<'a>(
    max_message: usize,
    pieces: impl IntoIterator<Item = &'a [u8]>,
) -> (Vec<ClientEvent>, Result<(), ProtocolError>) {
    let mut reader = FrameReader::new(max_message);
    let mut events = Vec::new();
    for piece in pieces {
        if let Err(err) = reader.feed(piece, &mut |event| events.push(event)) {
            return (events, Err(err));
        }
    }
    (events, Ok(()))
}

fuzz_target!(|input: &[u8]| {
    let [high, low, count, rest @ ..] = input else {
        return;
    };
    let max_message = usize::from(u16::from_be_bytes([*high, *low]));
    let cuts_len = (usize::from(*count) * 2).min(rest.len());
    let (cuts, bytes) = rest.split_at(cuts_len);

    let whole = run(max_message, [bytes]);

    let mut cuts: Vec<usize> = cuts
        .chunks_exact(2)
        .map(|cut| usize::from(u16::from_be_bytes([cut[0], cut[1]])) % (bytes.len() + 1))
        .collect();
    cuts.sort_unstable();
    let mut pieces = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for cut in cuts.into_iter().chain([bytes.len()]) {
        pieces.push(&bytes[start..cut]);
        start = cut;
    }
    let split = run(max_message, pieces);
    assert_eq!(whole, split, "fed whole and in pieces");

    // A byte at a time, as a trickling client sends, agrees too.
    let bytewise = run(max_message, bytes.chunks(1));
    assert_eq!(whole, bytewise, "fed whole and byte by byte");

    // An error always names a close code the server may send.
    if let Err(err) = &whole.1 {
        assert!(close_code::may_be_sent(err.close_code()), "{err:?}");
    }
    // A close the reader reports carries a code a peer may send.
    for event in &whole.0 {
        if let ClientEvent::Close(Some(code)) = event {
            assert!(close_code::may_be_sent(*code), "{code}");
        }
    }
});
