//! A small Server-Sent Events client: enough HTTP/1.1 to open an `http://` event stream, and a
//! parser of the event-stream format as the HTML standard defines it ("Parsing an event
//! stream"), which is what a browser's `EventSource` runs.

use std::collections::VecDeque;
use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest response head read.
const MAX_HEAD: usize = 16 * 1024;

/// Bytes read from the server per `read`.
const READ_CHUNK: usize = 8 * 1024;

/// One thing an event stream says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A dispatched event: its type (`message` unless an `event:` field named another), the
    /// `id` field it carried if any, and its `data:` lines joined with LF.
    Event {
        kind: String,
        id: Option<String>,
        data: String,
    },
    /// A comment line, without its colon and the one space after it.
    Comment(String),
    /// A `retry:` field: how long to wait before reconnecting, in milliseconds.
    Retry(u64),
}

/// Turns the bytes of an event stream into [`Item`]s, fed in pieces of any size.
#[derive(Debug, Default)]
pub struct Parser {
    line: Vec<u8>,
    /// The last byte was a CR: an LF right after it ends no second line.
    after_cr: bool,
    /// The first line has begun (a byte-order mark before it is dropped).
    started: bool,
    kind: String,
    id: Option<String>,
    /// Data lines, each followed by LF.
    data: String,
}

impl Parser {
    /// Parses `bytes`, appending every complete item to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Item>) {
        if self.started {
            return self.feed_lines(bytes, out);
        }
        // The first bytes wait until they can be told from a byte-order mark.
        const BOM: &[u8] = b"\xef\xbb\xbf";
        self.line.extend_from_slice(bytes);
        if self.line.len() < BOM.len() && BOM.starts_with(&self.line) {
            return;
        }
        self.started = true;
        let held = std::mem::take(&mut self.line);
        self.feed_lines(held.strip_prefix(BOM).unwrap_or(&held), out);
    }

    fn feed_lines(&mut self, bytes: &[u8], out: &mut Vec<Item>) {
        for &byte in bytes {
            match byte {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\r' | b'\n' => {
                    self.after_cr = byte == b'\r';
                    let line = std::mem::take(&mut self.line);
                    self.end_line(&String::from_utf8_lossy(&line), out);
                }
                _ => {
                    self.after_cr = false;
                    self.line.push(byte);
                }
            }
        }
    }

    fn end_line(&mut self, line: &str, out: &mut Vec<Item>) {
        if line.is_empty() {
            return self.dispatch(out);
        }
        if let Some(comment) = line.strip_prefix(':') {
            let comment = comment.strip_prefix(' ').unwrap_or(comment);
            return out.push(Item::Comment(comment.to_owned()));
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => value.clone_into(&mut self.kind),
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                if let Ok(millis) = value.parse() {
                    out.push(Item::Retry(millis));
                }
            }
            _ => {}
        }
    }

    /// A blank line: the event gathered so far goes out, if it has data.
    fn dispatch(&mut self, out: &mut Vec<Item>) {
        let kind = std::mem::take(&mut self.kind);
        let id = self.id.take();
        let mut data = std::mem::take(&mut self.data);
        if data.is_empty() {
            return;
        }
        data.pop();
        out.push(Item::Event {
            kind: if kind.is_empty() {
                "message".to_owned()
            } else {
                kind
            },
            id,
            data,
        });
    }
}

/// Why an event stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{url:?} is not an http:// URL with a host")]
    Url { url: String },
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("HTTP {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("not an event stream: {0}")]
    NotEventStream(String),
}

/// An open event stream.
pub struct EventStream {
    stream: TcpStream,
    headers: Vec<(String, String)>,
    parser: Parser,
    items: VecDeque<Item>,
}

impl EventStream {
    /// Sends `GET` with `Accept: text/event-stream` and `extra` headers to `url`
    /// (`http://host[:port]/path[?query]`), and reads the response head: a 200 of type
    /// `text/event-stream`, or the refusal's status and first line.
    pub async fn open(url: &str, extra: &[(&str, &str)]) -> Result<EventStream, OpenError> {
        let bad_url = || OpenError::Url {
            url: url.to_owned(),
        };
        let rest = url.strip_prefix("http://").ok_or_else(bad_url)?;
        let (authority, target) = match rest.find(['/', '?']) {
            Some(at) => (&rest[..at], rest[at..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        let target = if target.starts_with('?') {
            format!("/{target}")
        } else {
            target
        };
        let address = match authority.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => {
                let port: u16 = port.parse().map_err(|_| bad_url())?;
                (host.trim_start_matches('[').trim_end_matches(']'), port)
            }
            _ => (authority.trim_start_matches('[').trim_end_matches(']'), 80),
        };
        if address.0.is_empty() {
            return Err(bad_url());
        }
        let mut stream = TcpStream::connect(address).await?;
        let mut request = format!(
            "GET {target} HTTP/1.1\r\nHost: {authority}\r\nAccept: text/event-stream\r\n\
             Cache-Control: no-cache\r\n"
        );
        for (name, value) in extra {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await?;

        let mut buf = Vec::new();
        let (status, headers, len) = loop {
            let mut fields = [httparse::EMPTY_HEADER; 64];
            let mut response = httparse::Response::new(&mut fields);
            match response.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let headers = response
                        .headers
                        .iter()
                        .map(|h| {
                            let value = String::from_utf8_lossy(h.value).into_owned();
                            (h.name.to_owned(), value)
                        })
                        .collect::<Vec<_>>();
                    break (response.code.unwrap_or_default(), headers, len);
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                Ok(httparse::Status::Partial) => {
                    return Err(OpenError::NotEventStream("response head too large".into()));
                }
                Err(err) => return Err(OpenError::NotEventStream(err.to_string())),
            }
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(OpenError::NotEventStream(
                    "the connection closed before the response head".into(),
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let mut opened = EventStream {
            stream,
            headers,
            parser: Parser::default(),
            items: VecDeque::new(),
        };
        let body = buf.split_off(len);
        if status != 200 {
            return Err(opened.refusal(status, body).await);
        }
        let content_type = opened.header("content-type").unwrap_or_default();
        if !content_type.starts_with("text/event-stream") {
            return Err(OpenError::NotEventStream(format!(
                "Content-Type {content_type:?}"
            )));
        }
        opened.absorb(&body);
        Ok(opened)
    }

    /// The first line of a refusal's body, read as far as its length says (within reason).
    async fn refusal(&mut self, status: u16, mut body: Vec<u8>) -> OpenError {
        let wanted: usize = self
            .header("content-length")
            .and_then(|len| len.trim().parse().ok())
            .unwrap_or(0)
            .min(4096);
        while body.len() < wanted {
            let mut chunk = [0u8; 1024];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
            }
        }
        let text = String::from_utf8_lossy(&body);
        OpenError::Refused {
            status,
            message: text.lines().next().unwrap_or_default().to_owned(),
        }
    }

    /// The response's header fields, as received.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The first header field named `name` (in any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn absorb(&mut self, bytes: &[u8]) {
        let mut out = Vec::new();
        self.parser.feed(bytes, &mut out);
        self.items.extend(out);
    }

    /// The next item; `None` when the server closed the stream.
    pub async fn next(&mut self) -> io::Result<Option<Item>> {
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            if let Some(item) = self.items.pop_front() {
                return Ok(Some(item));
            }
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            self.absorb(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(text: &[u8], piece: usize) -> Vec<Item> {
        let mut parser = Parser::default();
        let mut out = Vec::new();
        for chunk in text.chunks(piece) {
            parser.feed(chunk, &mut out);
        }
        out
    }

    fn event(kind: &str, id: Option<&str>, data: &str) -> Item {
        Item::Event {
            kind: kind.to_owned(),
            id: id.map(str::to_owned),
            data: data.to_owned(),
        }
    }

    /// The examples of the HTML standard's "Event stream interpretation", and the server's own
    /// frames, fed whole and byte by byte.
    #[test]
    fn parses_the_standard_s_examples_in_any_pieces() {
        let cases: Vec<(&[u8], Vec<Item>)> = vec![
            (
                b"data: YHOO\ndata: +2\ndata: 10\n\n",
                vec![event("message", None, "YHOO\n+2\n10")],
            ),
            (
                b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\n\
                  data:  third event\n\n",
                vec![
                    Item::Comment("test stream".into()),
                    event("message", Some("1"), "first event"),
                    event("message", Some(""), "second event"),
                    event("message", None, " third event"),
                ],
            ),
            (
                b"data\n\ndata\ndata\n\ndata:",
                vec![event("message", None, ""), event("message", None, "\n")],
            ),
            (
                b"data:test\n\ndata: test\n\n",
                vec![
                    event("message", None, "test"),
                    event("message", None, "test"),
                ],
            ),
            (
                b"\xef\xbb\xbfretry: 2000\r\n\r\nevent: reset\rid: 1-0\r\ndata: {}\r\n\r\n\
                  retry: x\n: ping 1-0\n\n",
                vec![
                    Item::Retry(2000),
                    event("reset", Some("1-0"), "{}"),
                    Item::Comment("ping 1-0".into()),
                ],
            ),
        ];
        for (text, expected) in cases {
            for piece in [text.len(), 1, 2, 3] {
                assert_eq!(
                    parse_in_pieces(text, piece),
                    expected,
                    "{:?} in pieces of {piece}",
                    String::from_utf8_lossy(text)
                );
            }
        }
    }
}
