//! Server-Sent Events clients, by hand over raw TCP as [`crate::rawws`] does websockets: a
//! `GET` with `Accept: text/event-stream`, the 200 and its content type checked, then the
//! stream parsed incrementally as the bytes arrive, with no buffer beyond one unfinished line.
//!
//! The parser follows the HTML standard's event-stream interpretation: lines end with LF, CR
//! or CRLF; a line starting with `:` is a comment; `field: value` (one space after the colon
//! dropped) sets `data` (several `data` lines joined with LF), `event`, `id` or `retry`; a blank
//! line dispatches the event, and an event with no data is not dispatched. Every event's data
//! is counted as the websocket clients count a frame, and its `id` checked as a position.

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use crate::clients::{ClientEnd, Dial, Tally, Target};

/// The longest line accepted: a payload is at most 8,000 bytes, its `data:` line a few more.
const MAX_LINE: usize = 64 * 1024;
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;

/// One thing the parser found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SseItem<'a> {
    /// A dispatched event: its type (`message` when none was given), the `id` it set, if any,
    /// and its data.
    Event {
        event: &'a str,
        id: Option<&'a str>,
        data: &'a str,
    },
    /// A comment line, without its `:` and leading spaces.
    Comment(&'a str),
}

/// The incremental event-stream parser.
#[derive(Debug, Default)]
pub struct SseParser {
    /// The start of a line whose end has not arrived yet.
    line: Vec<u8>,
    /// The last chunk ended with a CR: an LF at the start of the next one belongs to it.
    after_cr: bool,
    event: String,
    data: String,
    has_data: bool,
    id: String,
    has_id: bool,
    /// The last `retry` the server sent, in milliseconds.
    pub retry_ms: Option<u64>,
}

impl SseParser {
    /// Parses `bytes`, handing every whole event and comment to `on`; what is left of a line
    /// waits for the next call. Fails on a line that is not UTF-8 or is too long.
    pub fn feed(&mut self, bytes: &[u8], on: &mut impl FnMut(SseItem<'_>)) -> Result<(), String> {
        let mut rest = bytes;
        if self.after_cr {
            self.after_cr = false;
            if let Some(tail) = rest.strip_prefix(b"\n") {
                rest = tail;
            }
        }
        while let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            let cr = rest[end] == b'\r';
            if self.line.is_empty() {
                self.line_done(&rest[..end], on)?;
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&rest[..end]);
                self.line_done(&line, on)?;
                line.clear();
                self.line = line;
            }
            rest = &rest[end + 1..];
            if cr {
                match rest.first() {
                    Some(b'\n') => rest = &rest[1..],
                    None => self.after_cr = true,
                    Some(_) => {}
                }
            }
        }
        if self.line.len() + rest.len() > MAX_LINE {
            return Err(format!("an event-stream line longer than {MAX_LINE} bytes"));
        }
        self.line.extend_from_slice(rest);
        Ok(())
    }

    fn line_done(&mut self, line: &[u8], on: &mut impl FnMut(SseItem<'_>)) -> Result<(), String> {
        if line.is_empty() {
            if self.has_data {
                on(SseItem::Event {
                    event: if self.event.is_empty() {
                        "message"
                    } else {
                        &self.event
                    },
                    id: self.has_id.then_some(self.id.as_str()),
                    data: &self.data,
                });
            }
            self.event.clear();
            self.data.clear();
            self.has_data = false;
            self.has_id = false;
            return Ok(());
        }
        let line = std::str::from_utf8(line)
            .map_err(|err| format!("an event-stream line is not UTF-8: {err}"))?;
        if let Some(comment) = line.strip_prefix(':') {
            on(SseItem::Comment(comment.trim_start_matches(' ')));
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => {
                self.event.clear();
                self.event.push_str(value);
            }
            // An id with a NUL is ignored, as a browser ignores it.
            "id" if !value.contains('\0') => {
                self.id.clear();
                self.id.push_str(value);
                self.has_id = true;
            }
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry_ms = value.parse().ok();
            }
            _ => {}
        }
        Ok(())
    }
}

/// An event stream whose response head has been read and checked.
pub struct SseStream {
    stream: TcpStream,
    /// What came after the head in the same reads.
    rest: Vec<u8>,
}

impl SseStream {
    /// Connects client `id` as `dial` says, sends the GET and checks the answer: 200 with
    /// `Content-Type: text/event-stream`.
    pub async fn open(target: &Target, dial: &Dial, id: usize) -> Result<SseStream, String> {
        let attempt = async {
            let mut stream = target.dial_tcp(dial, id).await?;
            let request = format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\
                 Cache-Control: no-cache\r\n\r\n",
                target.path, target.authority
            );
            let (head, rest) = Target::request_head(&mut stream, &request).await?;
            check_head(&head)?;
            Ok(SseStream { stream, rest })
        };
        timeout(crate::clients::CONNECT_TIMEOUT, attempt)
            .await
            .map_err(|_| {
                format!(
                    "no event-stream head within {:?}",
                    crate::clients::CONNECT_TIMEOUT
                )
            })?
    }

    /// Reads events into `tally` until `stop` or until the connection ends: each message's data
    /// is counted as a frame and its `id` checked as a position; a `reset` event moves the
    /// expected position; a `ping` comment is the heartbeat.
    pub async fn read<'a>(
        mut self,
        mut tally: Tally<'a>,
        stop: &CancellationToken,
    ) -> (Tally<'a>, ClientEnd) {
        let mut parser = SseParser::default();
        let mut on = |item: SseItem<'_>| match item {
            SseItem::Event {
                event: "message",
                id,
                data,
            } => {
                if let (Some(positions), Some(id)) = (&mut tally.positions, id) {
                    positions.message(id);
                }
                tally.payload(data);
            }
            SseItem::Event {
                event: "reset", id, ..
            } => {
                if let Some(positions) = &mut tally.positions {
                    match id {
                        Some(id) => positions.reset(id),
                        None => positions.counts.resets += 1,
                    }
                }
            }
            SseItem::Event { .. } => tally.other += 1,
            SseItem::Comment(text) if text.starts_with("ping") => tally.pings += 1,
            SseItem::Comment(_) => {}
        };
        let rest = std::mem::take(&mut self.rest);
        if let Err(error) = parser.feed(&rest, &mut on) {
            return (tally, ClientEnd::Dropped { error });
        }
        let mut chunk = vec![0u8; READ_CHUNK];
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        let end = loop {
            let read = tokio::select! {
                biased;
                _ = &mut stopped => break ClientEnd::Open,
                read = self.stream.read(&mut chunk) => read,
            };
            match read {
                Ok(0) => {
                    break ClientEnd::Dropped {
                        error: "the event stream ended".to_owned(),
                    };
                }
                Ok(n) => {
                    if let Err(error) = parser.feed(&chunk[..n], &mut on) {
                        break ClientEnd::Dropped { error };
                    }
                }
                Err(err) => {
                    break ClientEnd::Dropped {
                        error: err.to_string(),
                    };
                }
            }
        };
        (tally, end)
    }
}

/// Checks an event stream's response head: 200 and the event-stream content type.
fn check_head(head: &str) -> Result<(), String> {
    let status = head.lines().next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!("answered {status:?}"));
    }
    let content_type = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.trim().to_ascii_lowercase());
    match content_type {
        Some(value) if value.starts_with("text/event-stream") => Ok(()),
        Some(value) => Err(format!("answered 200 with Content-Type {value:?}")),
        None => Err("answered 200 without a Content-Type".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    enum Seen {
        Event(String, Option<String>, String),
        Comment(String),
    }

    fn parse_in_pieces(input: &[u8], piece: usize) -> (Vec<Seen>, Option<u64>) {
        let mut parser = SseParser::default();
        let mut seen = Vec::new();
        let mut on = |item: SseItem<'_>| {
            seen.push(match item {
                SseItem::Event { event, id, data } => {
                    Seen::Event(event.to_owned(), id.map(str::to_owned), data.to_owned())
                }
                SseItem::Comment(text) => Seen::Comment(text.to_owned()),
            })
        };
        for chunk in input.chunks(piece) {
            parser.feed(chunk, &mut on).expect("valid stream");
        }
        (seen, parser.retry_ms)
    }

    #[test]
    fn events_comments_and_retry_in_any_pieces() {
        let stream = b"retry: 2000\n\nid: e-1\ndata: {\"a\":1}\n\n: ping e-1\n\
            id: e-2\ndata: {\ndata: \"b\": 2}\n\nevent: reset\nid: e-9\ndata: {\"reason\":\"evicted\"}\n\n";
        let expected = vec![
            Seen::Event("message".into(), Some("e-1".into()), "{\"a\":1}".into()),
            Seen::Comment("ping e-1".into()),
            Seen::Event("message".into(), Some("e-2".into()), "{\n\"b\": 2}".into()),
            Seen::Event(
                "reset".into(),
                Some("e-9".into()),
                "{\"reason\":\"evicted\"}".into(),
            ),
        ];
        for piece in [1, 2, 3, 7, 64, stream.len()] {
            let (seen, retry) = parse_in_pieces(stream, piece);
            assert_eq!(seen, expected, "pieces of {piece}");
            assert_eq!(retry, Some(2000));
        }
    }

    #[test]
    fn cr_and_crlf_end_lines_and_empty_events_are_not_dispatched() {
        let stream = b"data:x\r\rdata: y\r\ndata:  z\r\n\r\nid: 1\n\n:\n";
        for piece in [1, 2, stream.len()] {
            let (seen, _) = parse_in_pieces(stream, piece);
            assert_eq!(
                seen,
                vec![
                    Seen::Event("message".into(), None, "x".into()),
                    Seen::Event("message".into(), None, "y\n z".into()),
                    Seen::Comment(String::new()),
                ],
                "pieces of {piece}"
            );
        }
    }

    #[test]
    fn invalid_utf8_and_endless_lines_fail() {
        let mut parser = SseParser::default();
        assert!(parser.feed(b"data: \xff\n", &mut |_| {}).is_err());
        let mut parser = SseParser::default();
        assert!(parser.feed(&vec![b'x'; MAX_LINE + 1], &mut |_| {}).is_err());
    }

    #[test]
    fn heads() {
        let ok = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";
        assert_eq!(check_head(ok), Ok(()));
        assert!(check_head("HTTP/1.1 503 Service Unavailable\r\n\r\n").is_err());
        assert!(check_head("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n").is_err());
        assert!(check_head("HTTP/1.1 200 OK\r\n\r\n").is_err());
    }
}
