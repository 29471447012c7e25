//! What the clients receive: each accepted payload, and the stream's own events (the heartbeat,
//! resets), encoded once per wire format and shared by every client of that format.
//!
//! - [`check`]: the payload check, once per notification.
//! - [`position`]: where a message stands (epoch and offset).
//! - [`websocket`]: server websocket frames.
//!
//! Three formats exist: the legacy websocket frames that the Go original sent (the payload, and
//! `{"action":"ping"}`), byte for byte; the `vulcan-stream.v1` websocket frames, which carry
//! positions; and Server-Sent Events. Every format is encoded when the message is made, so that
//! the fan-out only copies references, and a message's size (for the history's bound) is exact.

pub mod check;
pub mod filter;
pub mod position;
pub mod websocket;

use std::fmt;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

pub use check::{Rejected, check, preview, validate};
pub use filter::{AgentFields, Field, Filter};
pub use position::{Epoch, Position, PositionError};

/// How a client wants its frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Format {
    /// The Go original's frames, unchanged: payloads and `{"action":"ping"}`.
    #[default]
    Legacy,
    /// Websocket `vulcan-stream.v1`: `{"id":…,"data":…}` and `{"event":…}` objects.
    V1,
    /// Server-Sent Events.
    Sse,
}

impl Format {
    pub const ALL: [Format; 3] = [Format::Legacy, Format::V1, Format::Sse];

    /// A small index, for per-format tables.
    pub fn index(self) -> usize {
        self as usize
    }

    /// As in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Legacy => "legacy",
            Format::V1 => "v1",
            Format::Sse => "sse",
        }
    }
}

/// One of the channels the stream carries: an index into the configured channels, the
/// default one first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(pub u16);

impl ChannelId {
    /// The default channel (`Receiver.StreamChannel`).
    pub const DEFAULT: ChannelId = ChannelId(0);

    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// Why a client is told that it cannot continue from where it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResetReason {
    /// The LISTEN connection was lost: NOTIFYs of the gap are gone, and a new epoch started.
    ListenGap,
    /// The position is older than anything the history still holds.
    Evicted,
    /// The position belongs to an epoch that is not the current one.
    OtherEpoch,
    /// The position is past the newest message.
    Ahead,
}

impl ResetReason {
    pub const ALL: [ResetReason; 4] = [
        ResetReason::ListenGap,
        ResetReason::Evicted,
        ResetReason::OtherEpoch,
        ResetReason::Ahead,
    ];

    /// As sent to clients and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ResetReason::ListenGap => "listen-gap",
            ResetReason::Evicted => "evicted",
            ResetReason::OtherEpoch => "other-epoch",
            ResetReason::Ahead => "ahead",
        }
    }
}

/// One thing every client of a stream is sent, in each format; `None` where a format has no
/// such frame (legacy clients get no resets).
#[derive(Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The position of a message, the head for a ping, where to resume for a reset.
    position: Position,
    /// The channel it was published on: only that channel's clients get it.
    channel: ChannelId,
    /// A message's values of the agents' fields, for filtered clients (`None`: none of them,
    /// or not a message); every client gets the stream's own events.
    fields: Option<Box<AgentFields>>,
    /// For a message: its payload, within the legacy frame.
    payload_at: Option<usize>,
    frames: [Option<Bytes>; 3],
    /// For a message: when the stream accepted it, the start of the fan-out delay that the
    /// shard threads measure. Read from the monotonic clock once per message (tens of ns).
    received: Option<Instant>,
}

/// The text of the legacy heartbeat frame, as the original sent it.
pub const PING_PAYLOAD: &str = r#"{"action":"ping"}"#;

/// [`PING_PAYLOAD`] as a text frame (FIN + text opcode, length 17), then a websocket Ping
/// (FIN + ping opcode, length 4): a legacy client's heartbeat, both frames in one write.
const PING_FRAMES: &[u8] = b"\x81\x11{\"action\":\"ping\"}\x89\x04ping";

/// Sent once to each SSE client before anything else: how long a browser waits before it
/// reconnects (milliseconds).
pub const SSE_PREAMBLE: &[u8] = b"retry: 2000\n\n";

impl Outgoing {
    /// A message: `payload` (already checked) at `position` of the default channel, as if it
    /// named none of the agents' fields.
    pub fn message(position: Position, payload: &str) -> Outgoing {
        Outgoing::accepted(
            ChannelId::DEFAULT,
            position,
            payload,
            AgentFields::default(),
        )
    }

    /// A message on `channel`: `payload`, checked, whose agents' fields are `fields`.
    pub fn accepted(
        channel: ChannelId,
        position: Position,
        payload: &str,
        fields: AgentFields,
    ) -> Outgoing {
        let legacy = websocket::text(payload.as_bytes());
        let v1 = format!(r#"{{"id":"{position}","data":{payload}}}"#);
        let mut sse = BytesMut::with_capacity(payload.len() + 48);
        sse.put_slice(format!("id: {position}\n").as_bytes());
        sse_data(&mut sse, payload);
        Outgoing {
            position,
            channel,
            fields: (!fields.is_empty()).then(|| Box::new(fields)),
            payload_at: Some(websocket::header_len(payload.len())),
            frames: [
                Some(legacy),
                Some(websocket::text(v1.as_bytes())),
                Some(sse.freeze()),
            ],
            received: Some(Instant::now()),
        }
    }

    /// The heartbeat, naming the newest message (`head`). A websocket client gets its
    /// heartbeat message and a websocket Ping together, written once per client by the fan-out
    /// rather than the Ping by each client's own task: the Pong it answers is how a vanished
    /// client is found.
    pub fn ping(channel: ChannelId, head: Position) -> Outgoing {
        let v1 = format!(r#"{{"event":"ping","id":"{head}"}}"#);
        let mut v1_frames = BytesMut::from(&websocket::text(v1.as_bytes())[..]);
        v1_frames.extend_from_slice(websocket::PING);
        Outgoing {
            position: head,
            channel,
            fields: None,
            payload_at: None,
            frames: [
                Some(Bytes::from_static(PING_FRAMES)),
                Some(v1_frames.freeze()),
                Some(Bytes::from(format!(": ping {head}\n\n"))),
            ],
            received: None,
        }
    }

    /// Tells opted-in clients to continue from `position` and why; legacy clients get nothing.
    pub fn reset(channel: ChannelId, position: Position, reason: ResetReason) -> Outgoing {
        let reason = reason.as_str();
        let v1 = format!(r#"{{"event":"reset","id":"{position}","reason":"{reason}"}}"#);
        let sse = format!("event: reset\nid: {position}\ndata: {{\"reason\":\"{reason}\"}}\n\n");
        Outgoing {
            position,
            channel,
            fields: None,
            payload_at: None,
            frames: [
                None,
                Some(websocket::text(v1.as_bytes())),
                Some(Bytes::from(sse)),
            ],
            received: None,
        }
    }

    pub fn position(&self) -> Position {
        self.position
    }

    pub fn channel(&self) -> ChannelId {
        self.channel
    }

    /// When the stream accepted this message; `None` for the stream's own events.
    pub fn received(&self) -> Option<Instant> {
        self.received
    }

    /// A message's values of the agents' fields; `None` when it names none (a broadcast to
    /// every filter) or is one of the stream's own events.
    pub fn fields(&self) -> Option<&AgentFields> {
        self.fields.as_deref()
    }

    /// Whether a client with `filter` gets this: the stream's own events and messages that name
    /// none of the fields reach every client.
    pub fn is_for(&self, filter: Option<&Filter>) -> bool {
        match (filter, self.fields()) {
            (Some(filter), Some(fields)) => filter.matches(fields),
            _ => true,
        }
    }

    /// The frame for clients of `format`, if they get one.
    pub fn frame(&self, format: Format) -> Option<&Bytes> {
        self.frames[format.index()].as_ref()
    }

    /// A message's payload, as NOTIFY'd; `None` for the stream's own events.
    pub fn payload(&self) -> Option<&str> {
        let at = self.payload_at?;
        let legacy = self.frames[Format::Legacy.index()].as_ref()?;
        Some(std::str::from_utf8(&legacy[at..]).expect("frames are built from &str payloads"))
    }

    /// Memory this holds: every encoding, plus the fixed part. Exact, so that a bound on the
    /// sum of these is a bound on memory.
    pub fn size(&self) -> usize {
        std::mem::size_of::<Outgoing>()
            + self.frames.iter().flatten().map(Bytes::len).sum::<usize>()
            + self.fields.as_ref().map_or(0, |fields| {
                std::mem::size_of::<AgentFields>() + fields.heap_size()
            })
    }
}

/// Appends `payload` as SSE `data:` lines and the blank line that ends the event. Every line
/// break (LF, CR or CRLF, all line ends to an `EventSource`) starts a new `data:` line, so the
/// browser rebuilds the payload with LF between its lines.
fn sse_data(out: &mut BytesMut, payload: &str) {
    let mut rest = payload;
    loop {
        let end = rest.find(['\r', '\n']).unwrap_or(rest.len());
        out.put_slice(b"data: ");
        out.put_slice(&rest.as_bytes()[..end]);
        out.put_u8(b'\n');
        if end == rest.len() {
            break;
        }
        let skip = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + skip..];
    }
    out.put_u8(b'\n');
}

impl fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.payload() {
            Some(payload) => write!(f, "Message({}, {:?})", self.position, preview(payload)),
            None => write!(f, "Event({})", self.position),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of(frame: &Bytes) -> &str {
        let at = match frame[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        std::str::from_utf8(&frame[at..]).expect("utf-8")
    }

    #[test]
    fn a_message_is_encoded_once_per_format() {
        let position: Position = "00ab-7".parse().expect("position");
        let payload = r#"{"action":"abort","check_id":"c"}"#;
        let message = Outgoing::message(position, payload);
        let legacy = message.frame(Format::Legacy).expect("legacy");
        assert_eq!(&legacy[2..], payload.as_bytes());
        assert_eq!(legacy[0], 0x81);
        assert_eq!(message.payload(), Some(payload));
        let v1 = message.frame(Format::V1).expect("v1");
        assert_eq!(
            text_of(v1),
            r#"{"id":"00000000000000ab-7","data":{"action":"abort","check_id":"c"}}"#
        );
        let sse = message.frame(Format::Sse).expect("sse");
        assert_eq!(
            &sse[..],
            b"id: 00000000000000ab-7\ndata: {\"action\":\"abort\",\"check_id\":\"c\"}\n\n"
        );
        let encoded: usize = [legacy, v1, sse].iter().map(|b| b.len()).sum();
        assert_eq!(message.size(), std::mem::size_of::<Outgoing>() + encoded);
    }

    #[test]
    fn sse_splits_payload_lines() {
        let position: Position = "1-1".parse().expect("position");
        let message = Outgoing::message(position, "{\n\"a\": 1,\r\n\"b\":2\r}");
        assert_eq!(
            &message.frame(Format::Sse).expect("sse")[..],
            b"id: 0000000000000001-1\ndata: {\ndata: \"a\": 1,\ndata: \"b\":2\ndata: }\n\n"
        );
    }

    #[test]
    fn events_carry_positions_and_legacy_clients_keep_the_original_ping() {
        let head: Position = "2-5".parse().expect("position");
        let ping = Outgoing::ping(ChannelId::DEFAULT, head);
        // The original's heartbeat text frame, then a websocket Ping in the same write.
        let legacy = ping.frame(Format::Legacy).expect("legacy");
        let (text, control) = legacy.split_at(legacy.len() - websocket::PING.len());
        assert_eq!(&text[..2], b"\x81\x11");
        assert_eq!(&text[2..], PING_PAYLOAD.as_bytes());
        assert_eq!(control, websocket::PING);
        let v1 = ping.frame(Format::V1).expect("v1");
        let (text, control) = v1.split_at(v1.len() - websocket::PING.len());
        assert_eq!(
            text_of(&Bytes::copy_from_slice(text)),
            r#"{"event":"ping","id":"0000000000000002-5"}"#
        );
        assert_eq!(control, websocket::PING);
        assert!(ping.frame(Format::Sse).expect("sse").starts_with(b":"));
        assert_eq!(ping.payload(), None);
        let reset = Outgoing::reset(ChannelId::DEFAULT, head, ResetReason::Evicted);
        assert_eq!(reset.frame(Format::Legacy), None);
        assert_eq!(
            text_of(reset.frame(Format::V1).expect("v1")),
            r#"{"event":"reset","id":"0000000000000002-5","reason":"evicted"}"#
        );
        assert_eq!(
            &reset.frame(Format::Sse).expect("sse")[..],
            b"event: reset\nid: 0000000000000002-5\ndata: {\"reason\":\"evicted\"}\n\n"
        );
    }
}
