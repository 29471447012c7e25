//! Server websocket frames (RFC 6455 §5): unmasked, final, encoded once per message and shared
//! by every client, whatever their number.
//!
//! This is the one piece of the websocket format below the transport: a message's frame is made
//! where the message is accepted, so that the fan-out only copies a reference.

use bytes::{BufMut, Bytes, BytesMut};

/// A websocket Ping. It carries a payload so that no NUL byte goes out: a plain `curl` on the
/// stream (the README's example) stops at the first NUL it would print to a terminal.
pub const PING: &[u8] = b"\x89\x04ping";

/// Frame opcodes (RFC 6455 §5.2).
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// Close codes (RFC 6455 §7.4.1).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text message, or a close reason, that is not UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;

    /// Whether an endpoint may put `code` in a close frame (RFC 6455 §7.4): the codes defined
    /// by the RFC for that use (1000–1003, 1007–1011), those IANA registered since (1012–1014:
    /// service restart, try again later, bad gateway), and the ranges for libraries,
    /// frameworks and applications (3000–4999). 1004 is reserved; 1005, 1006 and 1015 stand
    /// for "no code", "no close frame" and "TLS failure" and must never be sent; the rest of
    /// 1000–2999 is unassigned, and nothing below 1000 or above 4999 is used.
    pub const fn may_be_sent(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// Encodes one unmasked, final frame.
pub fn encode(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    out.put_u8(0x80 | opcode);
    match payload.len() {
        len if len < 126 => out.put_u8(len as u8),
        len if len <= usize::from(u16::MAX) => {
            out.put_u8(126);
            out.put_u16(len as u16);
        }
        len => {
            out.put_u8(127);
            out.put_u64(len as u64);
        }
    }
    out.put_slice(payload);
    out.freeze()
}

/// A text frame of `payload`.
pub fn text(payload: &[u8]) -> Bytes {
    encode(opcode::TEXT, payload)
}

/// How many header bytes [`encode`] puts before a payload of `len` bytes.
pub fn header_len(len: usize) -> usize {
    match len {
        len if len < 126 => 2,
        len if len <= usize::from(u16::MAX) => 4,
        _ => 10,
    }
}

/// A close frame with a code and a reason (the reason is cut to fit a control frame).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(opcode::CLOSE, &payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_each_length_form() {
        assert_eq!(&encode(opcode::TEXT, b"hi")[..], b"\x81\x02hi");
        let mid = encode(opcode::TEXT, &[b'a'; 300]);
        assert_eq!(&mid[..4], &[0x81, 126, 0x01, 0x2C]);
        assert_eq!(mid.len(), 304);
        let big = encode(opcode::BINARY, &vec![0; 70_000]);
        assert_eq!(&big[..2], &[0x82, 127]);
        assert_eq!(big.len(), 70_010);
        for len in [0, 125, 126, 65_535, 65_536] {
            assert_eq!(
                encode(opcode::TEXT, &vec![0; len]).len(),
                header_len(len) + len
            );
        }
    }

    #[test]
    fn only_codes_an_endpoint_may_send_are_valid() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1014,
        ] {
            assert!(close_code::may_be_sent(code), "{code}");
        }
        for code in [3000, 3999, 4000, 4999] {
            assert!(close_code::may_be_sent(code), "{code}");
        }
        // Autobahn 7.9.x's invalid codes, and the edges of each valid range.
        for code in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!close_code::may_be_sent(code), "{code}");
        }
    }

    #[test]
    fn close_frame_carries_code_and_reason() {
        let frame = close_frame(1001, "bye");
        assert_eq!(&frame[..], b"\x88\x05\x03\xe9bye");
        assert!(close_frame(1008, &"é".repeat(100)).len() <= 127);
    }
}
