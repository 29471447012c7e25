//! Websockets opened by hand, for the abusers: the upgrade request is written here, client
//! frames are masked here and server frames parsed here, so that a client can send what no
//! websocket library would (a 10 MB frame header, a text frame that is not UTF-8, a request
//! head one byte at a time) and still see which close code the server answers with.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout, timeout_at};

use crate::clients::{Dial, Target};

pub const OP_TEXT: u8 = 0x1;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Every frame is masked with this key (RFC 6455 §5.3 asks for a fresh random one per frame, to
/// protect proxies; a server must accept any).
const MASK: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// The `Sec-WebSocket-Key` of every upgrade request (the RFC's own example: the key only
/// proves that the server understood a websocket request, so it need not be fresh here).
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// The `Sec-WebSocket-Accept` a server answers [`KEY`] with (RFC 6455 §1.3).
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Whether a response head carries the `Sec-WebSocket-Accept` that answers [`KEY`].
fn accepts_key(head: &str) -> bool {
    head.lines().skip(1).any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("sec-websocket-accept") && value.trim() == ACCEPT
        })
    })
}

/// The upgrade request of `target`.
pub fn upgrade_request(target: &Target) -> String {
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        target.path, target.authority
    )
}

/// The header of a final, masked client frame announcing `len` payload bytes.
pub fn frame_head(opcode: u8, len: u64) -> Vec<u8> {
    let mut head = vec![0x80 | opcode];
    match len {
        0..=125 => head.push(0x80 | len as u8),
        126..=0xFFFF => {
            head.push(0x80 | 126);
            head.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            head.push(0x80 | 127);
            head.extend_from_slice(&len.to_be_bytes());
        }
    }
    head.extend_from_slice(&MASK);
    head
}

/// Masks payload bytes that start `offset` bytes into their frame's payload.
pub fn mask(payload: &mut [u8], offset: u64) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= MASK[((offset + i as u64) % 4) as usize];
    }
}

/// A whole client frame: header and masked payload.
pub fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = frame_head(opcode, payload.len() as u64);
    let start = out.len();
    out.extend_from_slice(payload);
    mask(&mut out[start..], 0);
    out
}

/// A frame from the server, as far as an abuser cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    Close(Option<u16>),
    Pong(Vec<u8>),
    /// Data and pings.
    Other,
}

/// A server frame's header, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    pub fin: bool,
    /// The reserved bits (RSV1-3), which no extension was negotiated to use.
    pub rsv: u8,
    pub opcode: u8,
    /// The masking key: servers must not mask (RFC 6455 §5.1), but a masked frame is still
    /// read as what it says.
    pub mask: Option<[u8; 4]>,
    /// Header bytes, before the payload.
    pub len: usize,
    pub payload_len: u64,
}

impl FrameHead {
    /// The header at the start of `buf`; `None` until it is whole.
    pub fn parse(buf: &[u8]) -> Option<FrameHead> {
        let (&b0, &b1) = (buf.first()?, buf.get(1)?);
        let (payload_len, mut len) = match b1 & 0x7F {
            126 => (
                u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
                4,
            ),
            127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
            short => (u64::from(short), 2),
        };
        let mask = if b1 & 0x80 != 0 {
            let key = buf.get(len..len + 4)?.try_into().ok()?;
            len += 4;
            Some(key)
        } else {
            None
        };
        Some(FrameHead {
            fin: b0 & 0x80 != 0,
            rsv: (b0 >> 4) & 0x07,
            opcode: b0 & 0x0F,
            mask,
            len,
            payload_len,
        })
    }

    /// Header and payload bytes, when they fit in memory.
    pub fn total_len(&self) -> Option<usize> {
        self.len
            .checked_add(usize::try_from(self.payload_len).ok()?)
    }

    /// Unmasks the payload in place, when the frame was masked.
    pub fn unmask(&self, payload: &mut [u8]) {
        if let Some(key) = self.mask {
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= key[i % 4];
            }
        }
    }
}

/// A close frame's payload as its code and reason (the reason lossily decoded).
pub fn close_parts(payload: &[u8]) -> (Option<u16>, String) {
    match payload {
        [hi, lo, reason @ ..] => (
            Some(u16::from_be_bytes([*hi, *lo])),
            String::from_utf8_lossy(reason).into_owned(),
        ),
        _ => (None, String::new()),
    }
}

/// Takes the first whole frame off `buf`, if there is one.
fn take_frame(buf: &mut Vec<u8>) -> Option<ServerFrame> {
    let head = FrameHead::parse(buf)?;
    let end = head.total_len()?;
    if buf.len() < end {
        return None;
    }
    let mut payload = buf[head.len..end].to_vec();
    head.unmask(&mut payload);
    buf.drain(..end);
    Some(match head.opcode {
        OP_CLOSE => ServerFrame::Close(close_parts(&payload).0),
        OP_PONG => ServerFrame::Pong(payload),
        _ => ServerFrame::Other,
    })
}

/// How reading a connection's frames stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadEnd {
    /// The callback asked to stop at this frame.
    Frame(ServerFrame),
    /// The connection ended without a close frame.
    Ended(String),
    /// Nothing decided before the time limit.
    TimedOut,
}

/// Reads server frames, `buf` first (what was read before), until `stop_at` returns true for
/// one, the connection ends, or `limit` passes. What is left of a frame stays in `buf`.
pub async fn read_frames<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    limit: Duration,
    mut stop_at: impl FnMut(&ServerFrame) -> bool,
) -> ReadEnd {
    let deadline = Instant::now() + limit;
    let mut chunk = [0u8; 16 * 1024];
    loop {
        while let Some(frame) = take_frame(buf) {
            if stop_at(&frame) {
                return ReadEnd::Frame(frame);
            }
        }
        match timeout_at(deadline, reader.read(&mut chunk)).await {
            Err(_) => return ReadEnd::TimedOut,
            Ok(Ok(0)) => {
                return ReadEnd::Ended("connection closed without a close frame".to_owned());
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(err)) => return ReadEnd::Ended(err.to_string()),
        }
    }
}

/// Reads until the server's close frame: its code, or how the connection ended without one.
pub async fn read_close<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    limit: Duration,
) -> ReadEnd {
    read_frames(reader, buf, limit, |f| matches!(f, ServerFrame::Close(_))).await
}

/// A websocket whose handshake is done.
pub struct RawWs {
    pub stream: TcpStream,
    /// Bytes read after the 101's head: the start of the first server frames.
    pub buf: Vec<u8>,
}

impl RawWs {
    /// Connects and upgrades; `recv_buffer` and `send_buffer` set the kernel's socket buffers.
    pub async fn open(
        target: &Target,
        recv_buffer: Option<u32>,
        send_buffer: Option<u32>,
    ) -> Result<RawWs, String> {
        let attempt = async {
            let socket = if target.addr.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
            .map_err(|err| err.to_string())?;
            if let Some(size) = recv_buffer {
                socket
                    .set_recv_buffer_size(size)
                    .map_err(|e| e.to_string())?;
            }
            if let Some(size) = send_buffer {
                socket
                    .set_send_buffer_size(size)
                    .map_err(|e| e.to_string())?;
            }
            let stream = socket
                .connect(target.addr)
                .await
                .map_err(|err| err.to_string())?;
            let _ = stream.set_nodelay(true);
            RawWs::upgrade(stream, target).await
        };
        timeout(HANDSHAKE_LIMIT, attempt)
            .await
            .map_err(|_| format!("no 101 within {HANDSHAKE_LIMIT:?}"))?
    }

    /// Connects client `id` as `dial` says (source address, receive buffer) and upgrades.
    pub async fn dial(target: &Target, dial: &Dial, id: usize) -> Result<RawWs, String> {
        let attempt = async {
            let stream = target.dial_tcp(dial, id).await?;
            RawWs::upgrade(stream, target).await
        };
        timeout(HANDSHAKE_LIMIT, attempt)
            .await
            .map_err(|_| format!("no 101 within {HANDSHAKE_LIMIT:?}"))?
    }

    /// Sends the upgrade request on a connected `stream` and reads the answer up to the end
    /// of its head: a 101 that accepts the request's key.
    async fn upgrade(mut stream: TcpStream, target: &Target) -> Result<RawWs, String> {
        let (head, buf) = Target::request_head(&mut stream, &upgrade_request(target)).await?;
        let status = head.lines().next().unwrap_or_default();
        if !status.starts_with("HTTP/1.1 101") {
            return Err(format!("answered {status:?}"));
        }
        if !accepts_key(&head) {
            return Err("the 101 does not accept the request's Sec-WebSocket-Key".to_owned());
        }
        Ok(RawWs { stream, buf })
    }

    /// Reads until the server's close frame (see [`read_close`]).
    pub async fn read_close(&mut self, limit: Duration) -> ReadEnd {
        read_close(&mut self.stream, &mut self.buf, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_masked_and_sized() {
        let ping = frame(OP_PING, b"abc");
        assert_eq!(&ping[..2], &[0x89, 0x83]);
        assert_eq!(&ping[2..6], &MASK);
        let unmasked: Vec<u8> = ping[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ MASK[i % 4])
            .collect();
        assert_eq!(unmasked, b"abc");
        assert_eq!(&frame_head(OP_TEXT, 300)[..4], &[0x81, 0xFE, 0x01, 0x2C]);
        let big = frame_head(OP_TEXT, 10_000_000);
        assert_eq!(&big[..2], &[0x81, 0xFF]);
        assert_eq!(
            u64::from_be_bytes(big[2..10].try_into().unwrap()),
            10_000_000
        );
        // A payload masked in two pieces is masked as in one.
        let mut whole = *b"hello world";
        mask(&mut whole, 0);
        let (mut first, mut second) = (*b"hello", *b" world");
        mask(&mut first, 0);
        mask(&mut second, 5);
        assert_eq!([&first[..], &second[..]].concat(), whole);
    }

    #[test]
    fn server_frames_are_taken_whole() {
        let mut buf = vec![
            0x81, 0x02, b'h', b'i', 0x8A, 0x01, b'p', 0x88, 0x05, 0x03, 0xF1,
        ];
        assert_eq!(take_frame(&mut buf), Some(ServerFrame::Other));
        assert_eq!(take_frame(&mut buf), Some(ServerFrame::Pong(b"p".to_vec())));
        // The close frame is not whole yet.
        assert_eq!(take_frame(&mut buf), None);
        buf.extend_from_slice(b"big");
        assert_eq!(take_frame(&mut buf), Some(ServerFrame::Close(Some(1009))));
        assert!(buf.is_empty());
        let mut long = vec![0x81, 126, 0x01, 0x00];
        long.extend(std::iter::repeat_n(b'x', 256));
        long.extend_from_slice(&[0x88, 0x00]);
        assert_eq!(take_frame(&mut long), Some(ServerFrame::Other));
        assert_eq!(take_frame(&mut long), Some(ServerFrame::Close(None)));
    }
}
