//! The end-to-end probe: connect to the stream, NOTIFY a fresh `check_id` over an own database
//! connection, and wait for it to come back.
//!
//! The websocket is open before the NOTIFY is sent, and the server registers a client before
//! answering 101, so no sleep is needed. Other frames (pings, live traffic) are counted, not
//! treated as failures.

use std::time::Duration;

use futures::StreamExt;
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::tungstenite::Message;

use crate::config::Config;
use crate::source::pg;

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
}

/// The stream URL the server of `config` serves on this host.
pub fn default_url(config: &Config) -> String {
    format!(
        "ws://localhost:{}/{}",
        config.sender.port, config.sender.stream_path
    )
}

/// Runs the probe against `url`, giving up after `limit` in total.
pub async fn probe(config: &Config, url: &str, limit: Duration) -> Result<Report, ProbeError> {
    let started = Instant::now();
    let deadline = started + limit;
    let check_id = uuid::Uuid::new_v4().to_string();
    let timed_out = |ignored| ProbeError::Timeout {
        check_id: check_id.clone(),
        after: limit,
        ignored,
        channel: config.receiver.channel.clone(),
    };

    let (mut socket, _) = timeout_at(deadline, tokio_tungstenite::connect_async(url))
        .await
        .map_err(|_| timed_out(0))?
        .map_err(|err| ProbeError::Server {
            url: url.to_owned(),
            cause: err.to_string(),
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
        client.execute("SELECT pg_notify($1, $2)", &[&db.channel, &payload]),
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
        let frame = match timeout_at(deadline, socket.next()).await {
            Err(_) => return Err(timed_out(ignored)),
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => {
                return Err(ProbeError::Closed { check_id, ignored });
            }
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(_))) => continue,
        };
        if carries_check_id(frame.as_str(), &check_id) {
            let _ = socket.close(None).await;
            return Ok(Report {
                check_id,
                elapsed: started.elapsed(),
                ignored,
            });
        }
        ignored += 1;
    }
}

fn carries_check_id(frame: &str, check_id: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(frame)
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
}
