//! Client frames (RFC 6455 §5), parsed incrementally.
//!
//! The server reads client frames only to answer pings and closes, to notice liveness, and to
//! enforce limits: data is discarded as it streams past, so a client frame costs no buffer
//! beyond a control frame's 125 bytes. What the RFC asks of every endpoint is still checked on
//! the way: text messages must be UTF-8 (checked piece by piece, see [`super::utf8`]), and a
//! close frame must carry a code a peer may send and a UTF-8 reason. The frames the server
//! writes are encoded once per message in [`crate::message::websocket`].

use super::utf8::Utf8Check;
use crate::message::websocket::{close_code, opcode};

/// What a client said, as far as the server cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// A ping: answer with a pong carrying the same payload.
    Ping(Vec<u8>),
    Pong,
    /// A close, with its status code if it carried one.
    Close(Option<u16>),
    /// A complete data frame (its content was discarded).
    Data,
}

/// Why a client's byte stream is not acceptable websocket; each maps to a close code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("unmasked frame from a client")]
    Unmasked,
    #[error("reserved bits set")]
    ReservedBits,
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    #[error("control frame fragmented or longer than 125 bytes")]
    BadControlFrame,
    #[error("continuation frame outside a fragmented message, or a new message inside one")]
    BadFragmentation,
    #[error("close frame with a 1-byte payload")]
    BadClose,
    #[error("close code {0} is not one an endpoint may send")]
    InvalidCloseCode(u16),
    #[error("close reason is not valid UTF-8")]
    CloseReasonNotUtf8,
    #[error("text message is not valid UTF-8")]
    TextNotUtf8,
    #[error("message of {size} bytes exceeds the limit of {max}")]
    TooBig { size: u64, max: u64 },
}

impl ProtocolError {
    pub fn close_code(&self) -> u16 {
        match self {
            ProtocolError::TooBig { .. } => close_code::TOO_BIG,
            ProtocolError::CloseReasonNotUtf8 | ProtocolError::TextNotUtf8 => {
                close_code::INVALID_PAYLOAD
            }
            ProtocolError::Unmasked
            | ProtocolError::ReservedBits
            | ProtocolError::UnknownOpcode(_)
            | ProtocolError::BadControlFrame
            | ProtocolError::BadFragmentation
            | ProtocolError::BadClose
            | ProtocolError::InvalidCloseCode(_) => close_code::PROTOCOL_ERROR,
        }
    }
}

/// Incremental parser of client frames: feed it whatever the socket returned.
#[derive(Debug)]
pub struct FrameReader {
    max_message: u64,
    header: [u8; 14],
    header_len: usize,
    /// Set once the whole header is in: (opcode, fin, mask, payload length).
    frame: Option<FrameHead>,
    /// Payload bytes of the current frame consumed so far.
    consumed: u64,
    control: Vec<u8>,
    /// Bytes of the fragmented data message in progress, if one is.
    message: Option<u64>,
    /// Where the UTF-8 check stands in the text message in progress; `None` between messages
    /// and in a binary one (binary payloads are not checked).
    text: Option<Utf8Check>,
}

#[derive(Debug, Clone, Copy)]
struct FrameHead {
    opcode: u8,
    fin: bool,
    mask: [u8; 4],
    len: u64,
}

impl FrameReader {
    /// `max_message` bounds a data frame and a fragmented message alike.
    pub fn new(max_message: usize) -> FrameReader {
        FrameReader {
            max_message: max_message as u64,
            header: [0; 14],
            header_len: 0,
            frame: None,
            consumed: 0,
            control: Vec::new(),
            message: None,
            text: None,
        }
    }

    /// Consumes `data`, reporting each complete frame to `on_event`.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        on_event: &mut impl FnMut(ClientEvent),
    ) -> Result<(), ProtocolError> {
        while !data.is_empty() {
            let Some(head) = self.frame else {
                let taken = self.read_header(data)?;
                data = &data[taken..];
                if let Some(head) = self.frame.filter(|h| h.len == 0) {
                    self.finish_frame(head, on_event)?;
                }
                continue;
            };
            let wanted = head.len - self.consumed;
            let take = usize::try_from(wanted)
                .unwrap_or(usize::MAX)
                .min(data.len());
            let piece = &data[..take];
            if head.opcode >= opcode::CLOSE {
                let start = self.control.len();
                self.control.extend_from_slice(piece);
                unmask(head.mask, self.consumed, &mut self.control[start..]);
            } else if let Some(text) = &mut self.text {
                check_text(text, head.mask, self.consumed, piece)?;
            }
            self.consumed += take as u64;
            data = &data[take..];
            if self.consumed == head.len {
                self.finish_frame(head, on_event)?;
            }
        }
        Ok(())
    }

    /// Takes header bytes from `data`; returns how many it took. Validates the header once
    /// complete, before any payload is accepted.
    fn read_header(&mut self, data: &[u8]) -> Result<usize, ProtocolError> {
        let mut taken = 0;
        loop {
            let needed = self.header_needed();
            if self.header_len == needed {
                break;
            }
            let Some(&byte) = data.get(taken) else {
                return Ok(taken);
            };
            self.header[self.header_len] = byte;
            self.header_len += 1;
            taken += 1;
        }
        let h = &self.header;
        let fin = h[0] & 0x80 != 0;
        if h[0] & 0x70 != 0 {
            return Err(ProtocolError::ReservedBits);
        }
        let opcode = h[0] & 0x0F;
        if h[1] & 0x80 == 0 {
            return Err(ProtocolError::Unmasked);
        }
        let (len, mask_at) = match h[1] & 0x7F {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
            127 => (
                u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
                10,
            ),
            short => (u64::from(short), 2),
        };
        let mask = [h[mask_at], h[mask_at + 1], h[mask_at + 2], h[mask_at + 3]];
        match opcode {
            opcode::CLOSE | opcode::PING | opcode::PONG => {
                if !fin || len > 125 {
                    return Err(ProtocolError::BadControlFrame);
                }
            }
            opcode::TEXT | opcode::BINARY | opcode::CONTINUATION => {
                let so_far = match (opcode, self.message) {
                    (opcode::CONTINUATION, Some(so_far)) => so_far,
                    (opcode::CONTINUATION, None) | (_, Some(_)) => {
                        return Err(ProtocolError::BadFragmentation);
                    }
                    (_, None) => 0,
                };
                let size = so_far.saturating_add(len);
                if size > self.max_message {
                    return Err(ProtocolError::TooBig {
                        size,
                        max: self.max_message,
                    });
                }
                self.message = (!fin).then_some(size);
                match opcode {
                    opcode::TEXT => self.text = Some(Utf8Check::new()),
                    opcode::BINARY => self.text = None,
                    _ => {}
                }
            }
            other => return Err(ProtocolError::UnknownOpcode(other)),
        }
        self.frame = Some(FrameHead {
            opcode,
            fin,
            mask,
            len,
        });
        self.consumed = 0;
        Ok(taken)
    }

    /// Header bytes needed, as far as the bytes read so far tell.
    fn header_needed(&self) -> usize {
        if self.header_len < 2 {
            return 2;
        }
        match self.header[1] & 0x7F {
            126 => 2 + 2 + 4,
            127 => 2 + 8 + 4,
            _ => 2 + 4,
        }
    }

    fn finish_frame(
        &mut self,
        head: FrameHead,
        on_event: &mut impl FnMut(ClientEvent),
    ) -> Result<(), ProtocolError> {
        self.frame = None;
        self.header_len = 0;
        let control = std::mem::take(&mut self.control);
        let event = match head.opcode {
            opcode::PING => ClientEvent::Ping(control),
            opcode::PONG => ClientEvent::Pong,
            opcode::CLOSE => ClientEvent::Close(close_payload(&control)?),
            _ if head.fin => {
                // The message ends here: its text must not stop inside a character.
                if self.text.take().is_some_and(|text| !text.is_complete()) {
                    return Err(ProtocolError::TextNotUtf8);
                }
                ClientEvent::Data
            }
            // A fragment of a message still in progress: nothing to report yet.
            _ => return Ok(()),
        };
        on_event(event);
        Ok(())
    }
}

/// The status code of a close frame's payload, checked with its reason (RFC 6455 §5.5.1, §7.4).
fn close_payload(payload: &[u8]) -> Result<Option<u16>, ProtocolError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ProtocolError::BadClose),
        [high, low, reason @ ..] => {
            let code = u16::from_be_bytes([*high, *low]);
            if !close_code::may_be_sent(code) {
                return Err(ProtocolError::InvalidCloseCode(code));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(ProtocolError::CloseReasonNotUtf8);
            }
            Ok(Some(code))
        }
    }
}

/// Unmasks `bytes` in place, which start `offset` bytes into their frame's payload.
fn unmask(mask: [u8; 4], offset: u64, bytes: &mut [u8]) {
    let start = (offset % 4) as usize;
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte ^= mask[(start + i) % 4];
    }
}

/// Checks a piece of a text message, `offset` bytes into its frame's payload, as UTF-8.
fn check_text(
    text: &mut Utf8Check,
    mask: [u8; 4],
    offset: u64,
    piece: &[u8],
) -> Result<(), ProtocolError> {
    // Unmasked a stack buffer at a time: the payload itself is not kept.
    let mut buf = [0u8; 256];
    let mut offset = offset;
    for chunk in piece.chunks(buf.len()) {
        let plain = &mut buf[..chunk.len()];
        plain.copy_from_slice(chunk);
        unmask(mask, offset, plain);
        text.feed(plain).map_err(|_| ProtocolError::TextNotUtf8)?;
        offset += chunk.len() as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame as a browser would send it.
    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![first];
        match payload.len() {
            len if len < 126 => out.push(0x80 | len as u8),
            len if len <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn events(reader: &mut FrameReader, bytes: &[u8]) -> Result<Vec<ClientEvent>, ProtocolError> {
        let mut seen = Vec::new();
        reader.feed(bytes, &mut |e| seen.push(e))?;
        Ok(seen)
    }

    /// Feeds `bytes` one at a time, as a trickling client would send them.
    fn events_bytewise(
        reader: &mut FrameReader,
        bytes: &[u8],
    ) -> Result<Vec<ClientEvent>, ProtocolError> {
        let mut seen = Vec::new();
        for byte in bytes {
            reader.feed(std::slice::from_ref(byte), &mut |e| seen.push(e))?;
        }
        Ok(seen)
    }

    /// The verdict on `bytes`, which must not depend on how they are split.
    fn verdict(bytes: &[u8]) -> Result<Vec<ClientEvent>, ProtocolError> {
        let whole = events(&mut FrameReader::new(1 << 20), bytes);
        let bytewise = events_bytewise(&mut FrameReader::new(1 << 20), bytes);
        assert_eq!(whole, bytewise, "fed whole and byte by byte");
        whole
    }

    #[test]
    fn reports_control_frames_and_discards_data() {
        let mut reader = FrameReader::new(1024);
        let mut bytes = masked(0x81, b"hello");
        bytes.extend(masked(0x89, b"abc"));
        bytes.extend(masked(0x8A, b""));
        bytes.extend(masked(0x88, &1000u16.to_be_bytes()));
        assert_eq!(
            events(&mut reader, &bytes).expect("valid"),
            [
                ClientEvent::Data,
                ClientEvent::Ping(b"abc".to_vec()),
                ClientEvent::Pong,
                ClientEvent::Close(Some(1000)),
            ]
        );
    }

    #[test]
    fn parses_byte_by_byte() {
        let mut reader = FrameReader::new(100_000);
        let mut bytes = masked(0x82, &[7; 70_000]);
        bytes.extend(masked(0x89, b"p"));
        let mut seen = Vec::new();
        for byte in &bytes {
            reader
                .feed(std::slice::from_ref(byte), &mut |e| seen.push(e))
                .expect("valid");
        }
        assert_eq!(seen, [ClientEvent::Data, ClientEvent::Ping(b"p".to_vec())]);
    }

    #[test]
    fn fragmented_messages_count_against_the_limit() {
        let mut reader = FrameReader::new(10);
        let mut bytes = masked(0x01, b"12345");
        bytes.extend(masked(0x89, b""));
        bytes.extend(masked(0x80, b"678"));
        assert_eq!(
            events(&mut reader, &bytes).expect("valid"),
            [ClientEvent::Ping(Vec::new()), ClientEvent::Data]
        );
        let mut bytes = masked(0x01, b"12345");
        bytes.extend(masked(0x80, b"678901"));
        assert!(matches!(
            events(&mut reader, &bytes),
            Err(ProtocolError::TooBig { size: 11, max: 10 })
        ));
    }

    #[test]
    fn rejects_protocol_violations_before_reading_payloads() {
        let cases: [(Vec<u8>, ProtocolError); 6] = [
            (b"\x81\x05hello".to_vec(), ProtocolError::Unmasked),
            (masked(0xC1, b"x"), ProtocolError::ReservedBits),
            (masked(0x83, b"x"), ProtocolError::UnknownOpcode(3)),
            (masked(0x09, b"x"), ProtocolError::BadControlFrame),
            (masked(0x80, b"x"), ProtocolError::BadFragmentation),
            (masked(0x88, b"x"), ProtocolError::BadClose),
        ];
        for (bytes, expected) in cases {
            let mut reader = FrameReader::new(1024);
            assert_eq!(events(&mut reader, &bytes), Err(expected));
        }
        // A 10 MB frame is refused from its header alone.
        let mut reader = FrameReader::new(65_536);
        let header = [0x82, 0xFF, 0, 0, 0, 0, 0, 0xA0, 0, 0, 1, 2, 3, 4];
        assert_eq!(
            events(&mut reader, &header),
            Err(ProtocolError::TooBig {
                size: 10_485_760,
                max: 65_536
            })
        );
    }

    #[test]
    fn close_codes_an_endpoint_may_not_send_are_protocol_errors() {
        for code in [
            0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            let close = masked(0x88, &code.to_be_bytes());
            let err = ProtocolError::InvalidCloseCode(code);
            assert_eq!(verdict(&close), Err(err.clone()), "{code}");
            assert_eq!(err.close_code(), close_code::PROTOCOL_ERROR);
        }
        for code in [
            1000u16, 1001, 1002, 1003, 1007, 1011, 1012, 1014, 3000, 4999,
        ] {
            let close = masked(0x88, &code.to_be_bytes());
            assert_eq!(verdict(&close), Ok(vec![ClientEvent::Close(Some(code))]));
        }
    }

    #[test]
    fn a_close_reason_must_be_utf8() {
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice("bye ✓".as_bytes());
        assert_eq!(
            verdict(&masked(0x88, &payload)),
            Ok(vec![ClientEvent::Close(Some(1000))])
        );
        // Autobahn 7.5.1's reason: valid up to a surrogate.
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload
            .extend_from_slice(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited");
        let err = verdict(&masked(0x88, &payload)).expect_err("invalid reason");
        assert_eq!(err, ProtocolError::CloseReasonNotUtf8);
        assert_eq!(err.close_code(), close_code::INVALID_PAYLOAD);
    }

    #[test]
    fn text_messages_must_be_utf8_and_binary_ones_need_not() {
        let invalid = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited";
        let err = verdict(&masked(0x81, invalid)).expect_err("invalid text");
        assert_eq!(err, ProtocolError::TextNotUtf8);
        assert_eq!(err.close_code(), close_code::INVALID_PAYLOAD);
        assert_eq!(verdict(&masked(0x82, invalid)), Ok(vec![ClientEvent::Data]));
        // Long enough to take several unmasking buffers, with characters across their edges.
        let long = "aé€\u{10348}".repeat(200);
        assert_eq!(
            verdict(&masked(0x81, long.as_bytes())),
            Ok(vec![ClientEvent::Data])
        );
        // A message may not end inside a character, even if what came was valid so far.
        assert_eq!(
            verdict(&masked(0x81, &"€".as_bytes()[..2])),
            Err(ProtocolError::TextNotUtf8)
        );
    }

    #[test]
    fn a_character_may_span_fragments_and_a_ping_between_them() {
        let euro = "€".as_bytes();
        let mut bytes = masked(0x01, &euro[..1]);
        bytes.extend(masked(0x89, b"p"));
        bytes.extend(masked(0x00, &euro[1..2]));
        bytes.extend(masked(0x80, &euro[2..]));
        assert_eq!(
            verdict(&bytes),
            Ok(vec![ClientEvent::Ping(b"p".to_vec()), ClientEvent::Data])
        );
        // A binary message after a text one is not checked, and the next text one starts anew.
        let mut bytes = masked(0x01, &euro[..1]);
        bytes.extend(masked(0x80, &euro[1..]));
        bytes.extend(masked(0x82, b"\xff"));
        bytes.extend(masked(0x81, b"ok"));
        assert_eq!(verdict(&bytes), Ok(vec![ClientEvent::Data; 3]));
        // Fragments that are each valid alone can make an invalid message.
        let mut bytes = masked(0x01, &euro[..2]);
        bytes.extend(masked(0x80, b"x"));
        assert_eq!(verdict(&bytes), Err(ProtocolError::TextNotUtf8));
    }

    #[test]
    fn invalid_text_fails_before_its_frame_or_message_ends() {
        // Autobahn 6.4.1: a valid fragment, then one holding U+110000: the error comes with the
        // second fragment's first wrong byte, not when the message ends.
        let part1 = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5";
        let mut reader = FrameReader::new(1024);
        assert_eq!(events(&mut reader, &masked(0x01, part1)), Ok(vec![]));
        let part2 = masked(0x00, b"\xf4\x90\x80\x80");
        let header = 6;
        assert_eq!(events(&mut reader, &part2[..header + 1]), Ok(vec![]));
        assert_eq!(
            events(&mut reader, &part2[header + 1..header + 2]),
            Err(ProtocolError::TextNotUtf8)
        );
        // Autobahn 6.4.3: one frame of 1000 bytes announced, the invalid bytes among the first.
        let mut reader = FrameReader::new(4096);
        let mut payload = part1.to_vec();
        payload.extend_from_slice(b"\xf4\x90\x80\x80");
        payload.resize(1000, b'a');
        let frame = masked(0x81, &payload);
        assert_eq!(events(&mut reader, &frame[..8 + 11]), Ok(vec![]));
        assert_eq!(
            events(&mut reader, &frame[8 + 11..8 + 13]),
            Err(ProtocolError::TextNotUtf8)
        );
    }
}
