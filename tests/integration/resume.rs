//! Positions, resume and the gap signal for websocket clients that opt in (`vulcan-stream.v1`
//! or `?since=`), and that legacy clients see none of it.

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::harness::{
    HttpResponse, PgCluster, Server, ServerOpts, TIMEOUT, Ws, http_raw, next_event, notify,
    ws_connect, ws_connect_with, ws_handshake,
};

const V1: &str = "vulcan-stream.v1";
const PROTOCOL: (&str, &str) = ("Sec-WebSocket-Protocol", V1);

/// The next v1 frame that is not a heartbeat, as sent.
async fn next_v1_text(ws: &mut Ws) -> Result<String> {
    loop {
        let text = next_event(ws).await?;
        let frame: Value =
            serde_json::from_str(&text).with_context(|| format!("v1 frame {text:?}"))?;
        if frame["event"] != "ping" {
            return Ok(text);
        }
    }
}

/// The next v1 frame that is not a heartbeat, parsed.
async fn next_v1(ws: &mut Ws) -> Result<Value> {
    let text = next_v1_text(ws).await?;
    serde_json::from_str(&text).with_context(|| format!("v1 frame {text:?}"))
}

/// A v1 message's position and its payload, re-serialised.
fn message(frame: &Value) -> Result<(String, String)> {
    let id = frame["id"].as_str().context("id")?.to_owned();
    ensure!(frame.get("data").is_some(), "not a message: {frame}");
    Ok((id, frame["data"].to_string()))
}

fn seq(frame: &Value) -> Result<u64> {
    frame["data"]["seq"].as_u64().context("seq")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_subprotocol_is_echoed_and_messages_carry_positions() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "resume-v1-frames";
    let server = Server::spawn(ServerOpts::with_db(pg, channel)).await?;
    let (mut ws, response) = ws_handshake(server.port(), "/stream", &[PROTOCOL]).await?;
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes()),
        Some(V1.as_bytes())
    );
    server.wait_for_clients(1).await?;
    let payload = r#"{"action":"abort","check_id":"c-1",  "extra":[1, 2]}"#;
    notify(&pg.client().await?, channel, payload).await?;
    let text = next_v1_text(&mut ws).await?;
    let status = server.status().await?;
    let head = status["head"].as_str().context("head")?;
    assert_eq!(text, format!(r#"{{"id":"{head}","data":{payload}}}"#));
    assert!(head.starts_with(status["epoch"].as_str().context("epoch")?));
    assert!(head.len() <= 64 && head.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));

    // A legacy client on the same server gets the payload itself, as ever.
    let mut legacy = ws_connect(server.port(), "/stream").await?;
    server.wait_for_clients(2).await?;
    notify(&pg.client().await?, channel, payload).await?;
    assert_eq!(next_event(&mut legacy).await?, payload);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_client_resumes_with_since_while_a_publisher_runs() -> Result<()> {
    const MESSAGES: u64 = 400;
    let pg = PgCluster::shared().await;
    let channel = "resume-publisher";
    let server = Server::spawn(ServerOpts::with_db(pg, channel)).await?;
    let mut ws = ws_connect_with(server.port(), "/stream", &[PROTOCOL]).await?;
    server.wait_for_clients(1).await?;

    let db = pg.client().await?;
    let publisher = tokio::spawn(async move {
        for i in 0..MESSAGES {
            notify(&db, channel, &format!(r#"{{"seq":{i}}}"#)).await?;
        }
        anyhow::Ok(())
    });
    let mut seen = Vec::new();
    let mut last = String::new();
    while seen.len() < 50 {
        let frame = next_v1(&mut ws).await?;
        last = message(&frame)?.0;
        seen.push(seq(&frame)?);
    }
    drop(ws);
    let path = format!("/stream?since={last}");
    let mut ws = ws_connect(server.port(), &path).await?;
    while seen.last() != Some(&(MESSAGES - 1)) {
        let frame = next_v1(&mut ws).await?;
        ensure!(frame.get("event").is_none(), "no reset expected: {frame}");
        seen.push(seq(&frame)?);
    }
    publisher.await??;
    let expected: Vec<u64> = (0..MESSAGES).collect();
    assert_eq!(seen, expected, "every message once, in order");
    assert_eq!(
        server.metric("vulcan_stream_resumes_served_total").await?,
        1.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_evicted_position_gets_a_reset_naming_the_head_first() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "resume-evicted";
    let opts = ServerOpts::with_db(pg, channel).env("HISTORY_MESSAGES", 5);
    let server = Server::spawn(opts).await?;
    let mut reader = ws_connect_with(server.port(), "/stream", &[PROTOCOL]).await?;
    server.wait_for_clients(1).await?;
    let db = pg.client().await?;
    let mut ids = Vec::new();
    for i in 0..20 {
        notify(&db, channel, &format!(r#"{{"seq":{i}}}"#)).await?;
        ids.push(message(&next_v1(&mut reader).await?)?.0);
    }
    let path = format!("/stream?since={}", ids[2]);
    let mut late = ws_connect(server.port(), &path).await?;
    let reset = next_v1(&mut late).await?;
    assert_eq!(reset["event"], "reset", "{reset}");
    assert_eq!(reset["reason"], "evicted", "{reset}");
    assert_eq!(reset["id"].as_str(), Some(ids[19].as_str()), "{reset}");
    assert!(reset.get("data").is_none());
    notify(&db, channel, r#"{"seq":20}"#).await?;
    assert_eq!(seq(&next_v1(&mut late).await?)?, 20);

    // From the reset's id, nothing is missed.
    let path = format!("/stream?since={}", ids[17]);
    let mut recent = ws_connect(server.port(), &path).await?;
    for expected in [18, 19, 20] {
        assert_eq!(seq(&next_v1(&mut recent).await?)?, expected);
    }
    let metrics = server.metrics().await?;
    assert!(
        metrics.contains(r#"vulcan_stream_resets_total{cause="evicted"} 1"#),
        "{metrics}"
    );
    Ok(())
}

async fn upgrade_with_since(port: u16, since: &str) -> Result<HttpResponse> {
    let request = format!(
        "GET /stream?since={since} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: \
         websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    http_raw(port, request.as_bytes()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_since_is_refused_with_400_naming_it() -> Result<()> {
    let pg = PgCluster::shared().await;
    let server = Server::spawn(ServerOpts::with_db(pg, "resume-bad-since")).await?;
    for since in ["nope", "12-x", "ZZ-1", "%20"] {
        let resp = upgrade_with_since(server.port(), since).await?;
        assert_eq!(resp.status, 400, "since={since}: {resp:?}");
        let text = resp.text();
        assert!(
            text.starts_with("bad request: since=") && text.contains("is not a position"),
            "{text}"
        );
        assert_eq!(text.trim_end().lines().count(), 1, "{text}");
    }
    let resp = upgrade_with_since(server.port(), "00ab-1").await?;
    assert_eq!(
        resp.status, 101,
        "a well-formed position is accepted: {resp:?}"
    );
    Ok(())
}

/// `pg_terminate_backend` of the listener: opted-in clients are told with a reset for the new
/// epoch before the next message; legacy clients' frames do not change.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_listen_connection_resets_v1_clients_and_not_legacy_ones() -> Result<()> {
    let pg = PgCluster::private().await?;
    let channel = "resume-gap";
    let server = Server::spawn(ServerOpts::with_db(&pg, channel)).await?;
    let mut v1 = ws_connect_with(server.port(), "/stream", &[PROTOCOL]).await?;
    let mut legacy = ws_connect(server.port(), "/stream").await?;
    server.wait_for_clients(2).await?;
    let before = r#"{"seq":1}"#;
    pg.notify(channel, before).await?;
    assert_eq!(next_event(&mut legacy).await?, before);
    let (old_id, _) = message(&next_v1(&mut v1).await?)?;
    let old_epoch = server.status().await?["epoch"].clone();

    let pids = pg.backend_pids("vulcan-stream").await?;
    ensure!(pids.len() == 1, "one LISTEN backend expected: {pids:?}");
    pg.connect("postgres")
        .await?
        .query_one("SELECT pg_terminate_backend($1)", &[&pids[0]])
        .await?;
    let reset = next_v1(&mut v1).await?;
    assert_eq!(reset["event"], "reset", "{reset}");
    assert_eq!(reset["reason"], "listen-gap", "{reset}");
    let status = server.status().await?;
    assert_ne!(status["epoch"], old_epoch);
    let epoch = status["epoch"].as_str().context("epoch")?;
    assert_eq!(reset["id"].as_str(), Some(format!("{epoch}-0").as_str()));

    server.wait_ready().await?;
    let after = r#"{"seq":2}"#;
    pg.notify(channel, after).await?;
    assert_eq!(next_event(&mut legacy).await?, after);
    let (new_id, data) = message(&next_v1(&mut v1).await?)?;
    assert_eq!(new_id, format!("{epoch}-1"));
    assert_eq!(data, after);

    // A position from before the gap cannot be continued.
    let mut stale = ws_connect(server.port(), &format!("/stream?since={old_id}")).await?;
    let reset = next_v1(&mut stale).await?;
    assert_eq!(reset["reason"], "other-epoch", "{reset}");
    let metrics = server.metrics().await?;
    assert!(
        metrics.contains(r#"vulcan_stream_resets_total{cause="listen-gap"} 1"#),
        "{metrics}"
    );
    Ok(())
}

/// Heartbeats name the head, so a client can tell that it is behind.
#[tokio::test(flavor = "multi_thread")]
async fn the_v1_heartbeat_names_the_head() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "resume-heartbeat";
    let server = Server::spawn(ServerOpts::with_db(pg, channel).env("PING_INTERVAL", 1)).await?;
    let mut ws = ws_connect_with(server.port(), "/stream", &[PROTOCOL]).await?;
    server.wait_for_clients(1).await?;
    notify(&pg.client().await?, channel, r#"{"seq":1}"#).await?;
    let (id, _) = message(&next_v1(&mut ws).await?)?;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let text = crate::harness::next_text_within(
            &mut ws,
            deadline.saturating_duration_since(tokio::time::Instant::now()),
        )
        .await?;
        if text == crate::harness::PING {
            bail!("a v1 client got the legacy heartbeat");
        }
        let frame: Value = serde_json::from_str(&text)?;
        if frame["event"] == "ping" {
            assert_eq!(frame["id"].as_str(), Some(id.as_str()), "{frame}");
            break;
        }
    }
    Ok(())
}
