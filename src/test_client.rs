//! The end-to-end probe: connect to the stream, NOTIFY a fresh `check_id` over an own database
//! connection, and wait for it to come back; and `follow`, which prints what the stream delivers
//! as it arrives, an operator's `tail -f`.
//!
//! Both speak any of the three wire formats ([`Transport`]): websocket with the original frames,
//! websocket `vulcan-stream.v1` (positions), and Server-Sent Events ([`sse`]).
//!
//! The stream is open before the NOTIFY is sent, and the server registers a client before
//! answering (the 101, or the event stream's 200), so no sleep is needed. Other frames (pings,
//! live traffic) are counted, not treated as failures.

pub mod sse;

use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::config::Config;
use crate::message::PING_PAYLOAD;
use crate::source::pg;

/// The websocket subprotocol of clients that want positions (as the server names it).
const V1_PROTOCOL: &str = "vulcan-stream.v1";

/// How the client reaches the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A websocket with the Go original's frames: payloads, and `{"action":"ping"}`.
    Websocket,
    /// A websocket offering `vulcan-stream.v1`: messages carry their positions.
    WebsocketV1,
    /// Server-Sent Events: messages carry their positions as event ids.
    Sse,
}

/// What the probe saw when it succeeded.
#[derive(Debug)]
pub struct Report {
    pub check_id: String,
    pub elapsed: Duration,
    /// Frames that were not ours (pings, other traffic).
    pub ignored: u64,
}

/// Why the probe failed; each is one line for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot connect to the stream at {url}: {cause}")]
    Server { url: String, cause: String },
    #[error("cannot connect to PostgreSQL at {target}: {cause}")]
    Database { target: String, cause: String },
    #[error("NOTIFY on channel {channel:?} failed: {cause}")]
    Notify { channel: String, cause: String },
    #[error("the stream closed before check_id {check_id} arrived ({ignored} other frames seen)")]
    Closed { check_id: String, ignored: u64 },
    #[error(
        "check_id {check_id} did not arrive within {after:?} ({ignored} other frames seen; is the server listening on channel {channel:?}?)"
    )]
    Timeout {
        check_id: String,
        after: Duration,
        ignored: u64,
        channel: String,
    },
    #[error("the stream at {url} ended")]
    Ended { url: String },
}

/// The stream URL the server of `config` serves on this host, for `transport`.
pub fn default_url(config: &Config, transport: Transport) -> String {
    let scheme = match transport {
        Transport::Websocket | Transport::WebsocketV1 => "ws",
        Transport::Sse => "http",
    };
    format!(
        "{scheme}://localhost:{}/{}",
        config.sender.port, config.sender.stream_path
    )
}

/// One thing the stream delivered, whatever the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// A message: its payload as NOTIFY'd, and its position where the transport gives it.
    Message { id: Option<String>, payload: String },
    /// The client must continue after `id`: what came between is gone (`reason`).
    Reset { id: String, reason: String },
    /// Anything else: heartbeats, the SSE preamble, frames of no known shape.
    Other,
}

impl Delivered {
    /// A message as one line: its position (when known) and its payload. Line breaks in a
    /// payload (only ever JSON white space: the server forwards JSON objects only) print as
    /// spaces, so that each message is one line.
    pub fn line(&self) -> Option<String> {
        let Delivered::Message { id, payload } = self else {
            return None;
        };
        let payload = payload.replace("\r\n", " ").replace(['\r', '\n'], " ");
        Some(match id {
            Some(id) => format!("{id} {payload}"),
            None => payload,
        })
    }
}

/// A v1 frame: `{"id":…,"data":…}` or `{"event":…,"id":…,…}`.
#[derive(Deserialize)]
struct V1Frame<'a> {
    id: Option<String>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    event: Option<String>,
    reason: Option<String>,
}

/// The data of an SSE `reset` event.
#[derive(Deserialize)]
struct ResetData {
    reason: String,
}

type Websocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// An open stream.
enum Connection {
    Websocket { socket: Websocket, v1: bool },
    Sse(sse::EventStream),
}

impl Connection {
    async fn open(url: &str, transport: Transport) -> Result<Connection, String> {
        match transport {
            Transport::Sse => sse::EventStream::open(url, &[])
                .await
                .map(Connection::Sse)
                .map_err(|err| err.to_string()),
            Transport::Websocket | Transport::WebsocketV1 => {
                let mut request = url.into_client_request().map_err(|err| err.to_string())?;
                let v1 = transport == Transport::WebsocketV1;
                if v1 {
                    request.headers_mut().insert(
                        "sec-websocket-protocol",
                        HeaderValue::from_static(V1_PROTOCOL),
                    );
                }
                let (socket, _) = tokio_tungstenite::connect_async(request)
                    .await
                    .map_err(|err| err.to_string())?;
                Ok(Connection::Websocket { socket, v1 })
            }
        }
    }

    /// The next thing delivered; `None` once the stream has ended or failed.
    async fn next(&mut self) -> Option<Delivered> {
        match self {
            Connection::Websocket { socket, v1 } => loop {
                match socket.next().await? {
                    Ok(Message::Text(text)) => return Some(from_websocket(text.as_str(), *v1)),
                    Ok(Message::Close(_)) | Err(_) => return None,
                    Ok(_) => {}
                }
            },
            Connection::Sse(stream) => match stream.next().await.ok()?? {
                sse::Item::Event { kind, id, data } => Some(from_sse(&kind, id, data)),
                sse::Item::Comment(_) | sse::Item::Retry(_) => Some(Delivered::Other),
            },
        }
    }

    async fn close(self) {
        if let Connection::Websocket { mut socket, .. } = self {
            let _ = socket.close(None).await;
        }
    }
}

fn from_websocket(text: &str, v1: bool) -> Delivered {
    if !v1 {
        return match text {
            PING_PAYLOAD => Delivered::Other,
            payload => Delivered::Message {
                id: None,
                payload: payload.to_owned(),
            },
        };
    }
    match serde_json::from_str::<V1Frame>(text) {
        Ok(V1Frame {
            id,
            data: Some(data),
            event: None,
            ..
        }) => Delivered::Message {
            id,
            payload: data.get().to_owned(),
        },
        Ok(V1Frame {
            id: Some(id),
            event: Some(event),
            reason: Some(reason),
            ..
        }) if event == "reset" => Delivered::Reset { id, reason },
        _ => Delivered::Other,
    }
}

fn from_sse(kind: &str, id: Option<String>, data: String) -> Delivered {
    match (kind, id) {
        ("message", id) => Delivered::Message { id, payload: data },
        ("reset", Some(id)) => match serde_json::from_str::<ResetData>(&data) {
            Ok(ResetData { reason }) => Delivered::Reset { id, reason },
            Err(_) => Delivered::Other,
        },
        _ => Delivered::Other,
    }
}

/// Runs the probe against `url` over `transport`, giving up after `limit` in total.
pub async fn probe(
    config: &Config,
    url: &str,
    transport: Transport,
    limit: Duration,
) -> Result<Report, ProbeError> {
    let started = Instant::now();
    let deadline = started + limit;
    let check_id = uuid::Uuid::new_v4().to_string();
    let timed_out = |ignored| ProbeError::Timeout {
        check_id: check_id.clone(),
        after: limit,
        ignored,
        channel: config.receiver.channel.clone(),
    };

    let mut stream = timeout_at(deadline, Connection::open(url, transport))
        .await
        .map_err(|_| timed_out(0))?
        .map_err(|cause| ProbeError::Server {
            url: url.to_owned(),
            cause,
        })?;

    let db = &config.receiver;
    let target = format!("{}:{}/{}", db.host, db.port, db.dbname);
    let tls = pg::tls_connector(db).map_err(|err| ProbeError::Database {
        target: target.clone(),
        cause: format!("{err:#}"),
    })?;
    let (client, connection) =
        timeout_at(deadline, pg::connect(db, &tls, "vulcan-stream-test-client"))
            .await
            .map_err(|_| timed_out(0))?
            .map_err(|err| ProbeError::Database {
                target,
                cause: pg::describe_connect_error(&err, db).text,
            })?;
    let driver = tokio::spawn(connection);

    let payload = serde_json::json!({"action": "test", "check_id": check_id}).to_string();
    let notified = timeout_at(
        deadline,
        // In table mode the server reads rows, not NOTIFYs: publish as a backend would.
        client.execute(
            match db.source {
                crate::config::SourceKind::Notify => "SELECT pg_notify($1, $2)",
                crate::config::SourceKind::Table => "SELECT vulcan_stream.publish($1, $2)",
            },
            &[&db.channel, &payload],
        ),
    )
    .await
    .map_err(|_| timed_out(0))?;
    driver.abort();
    notified.map_err(|err| ProbeError::Notify {
        channel: db.channel.clone(),
        cause: pg::describe_error(&err),
    })?;

    let mut ignored = 0;
    loop {
        let delivered = match timeout_at(deadline, stream.next()).await {
            Err(_) => return Err(timed_out(ignored)),
            Ok(None) => return Err(ProbeError::Closed { check_id, ignored }),
            Ok(Some(delivered)) => delivered,
        };
        if let Delivered::Message { payload, .. } = &delivered {
            if carries_check_id(payload, &check_id) {
                stream.close().await;
                return Ok(Report {
                    check_id,
                    elapsed: started.elapsed(),
                    ignored,
                });
            }
        }
        ignored += 1;
    }
}

/// Connects to `url` over `transport` (within `connect_limit`) and hands every delivery to
/// `on`, as it arrives, until the stream ends (an error: the caller wanted it to go on).
pub async fn follow(
    url: &str,
    transport: Transport,
    connect_limit: Duration,
    mut on: impl FnMut(&Delivered),
) -> Result<(), ProbeError> {
    let unreachable = |cause| ProbeError::Server {
        url: url.to_owned(),
        cause,
    };
    let mut stream = timeout(connect_limit, Connection::open(url, transport))
        .await
        .map_err(|_| unreachable(format!("no answer within {connect_limit:?}")))?
        .map_err(unreachable)?;
    while let Some(delivered) = stream.next().await {
        on(&delivered);
    }
    Err(ProbeError::Ended {
        url: url.to_owned(),
    })
}

fn carries_check_id(payload: &str, check_id: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| {
            v.get("check_id")
                .and_then(|c| c.as_str().map(str::to_owned))
        })
        .is_some_and(|c| c == check_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_its_own_message_only() {
        assert!(carries_check_id(
            r#"{"action":"test","check_id":"abc"}"#,
            "abc"
        ));
        assert!(!carries_check_id(r#"{"action":"ping"}"#, "abc"));
        assert!(!carries_check_id(r#"{"check_id":"abd"}"#, "abc"));
        assert!(!carries_check_id("not json", "abc"));
    }

    #[test]
    fn every_format_gives_payloads_and_positions() {
        let message = |id: Option<&str>, payload: &str| Delivered::Message {
            id: id.map(str::to_owned),
            payload: payload.to_owned(),
        };
        assert_eq!(
            from_websocket(r#"{"a": 1}"#, false),
            message(None, r#"{"a": 1}"#)
        );
        assert_eq!(from_websocket(PING_PAYLOAD, false), Delivered::Other);
        assert_eq!(
            from_websocket(r#"{"id":"1-2","data":{"b":[1, 2]}}"#, true),
            message(Some("1-2"), r#"{"b":[1, 2]}"#)
        );
        assert_eq!(
            from_websocket(r#"{"event":"ping","id":"1-2"}"#, true),
            Delivered::Other
        );
        let reset = Delivered::Reset {
            id: "1-0".into(),
            reason: "evicted".into(),
        };
        assert_eq!(
            from_websocket(r#"{"event":"reset","id":"1-0","reason":"evicted"}"#, true),
            reset
        );
        assert_eq!(
            from_sse("message", Some("1-2".into()), "{\n}".into()),
            message(Some("1-2"), "{\n}")
        );
        assert_eq!(
            from_sse(
                "reset",
                Some("1-0".into()),
                r#"{"reason":"evicted"}"#.into()
            ),
            reset
        );
        assert_eq!(
            message(Some("1-2"), "{\r\n\"a\":\r1\n}").line().as_deref(),
            Some("1-2 { \"a\": 1 }")
        );
        assert_eq!(message(None, "{}").line().as_deref(), Some("{}"));
        assert_eq!(reset.line(), None);
    }
}
