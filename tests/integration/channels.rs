//! Several channels (`PG_CHANNELS`, chosen with `?channel=`), server-side filters on the agents'
//! fields (`?agent_id=` …), and signed tokens whose claims bind both: real websocket and SSE
//! clients of a real server on a real PostgreSQL.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

use crate::harness::{
    PgCluster, Server, ServerOpts, Ws, next_event, notify, sse_connect, sse_event, upgrade,
    ws_connect, ws_connect_with,
};

const PROTOCOL: (&str, &str) = ("Sec-WebSocket-Protocol", "vulcan-stream.v1");

/// The payloads a client reads up to and including the one whose `n` is `last`, skipping
/// heartbeats; v1 frames are unwrapped to their `data`.
async fn read_up_to(ws: &mut Ws, last: u64) -> Result<Vec<u64>> {
    let mut seen = Vec::new();
    loop {
        let text = next_event(ws).await?;
        let mut frame: Value = serde_json::from_str(&text).with_context(|| text.clone())?;
        if frame["event"] == "ping" {
            continue;
        }
        if frame.get("data").is_some() {
            frame = frame["data"].take();
        }
        let n = frame["n"]
            .as_u64()
            .with_context(|| format!("no n in {text}"))?;
        seen.push(n);
        if n == last {
            return Ok(seen);
        }
    }
}

fn v1_id(text: &str) -> Result<String> {
    let frame: Value = serde_json::from_str(text)?;
    Ok(frame["id"].as_str().context("id")?.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn each_client_reads_the_channel_it_chose_with_positions_of_its_own() -> Result<()> {
    let pg = PgCluster::shared().await;
    let (main, jobs, audit) = ("chan-main", "chan-jobs", "chan-audit");
    let opts = ServerOpts::with_db(pg, main).env("PG_CHANNELS", format!("{jobs}, {audit},{main}"));
    let server = Server::spawn(opts).await?;
    let port = server.port();
    let mut default = ws_connect(port, "/stream").await?;
    let mut on_jobs = ws_connect(port, &format!("/stream?channel={jobs}")).await?;
    let mut jobs_v1 =
        ws_connect_with(port, &format!("/stream?channel={jobs}"), &[PROTOCOL]).await?;
    let mut on_audit = sse_connect(port, &format!("/stream?channel={audit}"), &[]).await?;
    server.wait_for_clients(4).await?;

    for (status, path) in [
        (404, "/stream?channel=nope".to_owned()),
        (404, format!("/stream?channel={}", "x".repeat(200))),
        (400, format!("/stream?channel={jobs}&channel={main}")),
    ] {
        let response = upgrade(port, &path, &[]).await?;
        assert_eq!(response.status, status, "{path}: {}", response.text());
    }
    let sse_refused = sse_connect(port, "/stream?channel=nope", &[]).await;
    let refusal = format!(
        "{:#}",
        sse_refused.err().context("SSE to a missing channel")?
    );
    ensure!(refusal.contains("404"), "{refusal}");

    let db = pg.client().await?;
    notify(&db, main, r#"{"n":1}"#).await?;
    notify(&db, jobs, r#"{"n":2}"#).await?;
    notify(&db, audit, r#"{"n":3}"#).await?;
    notify(&db, jobs, r#"{"n":4}"#).await?;
    notify(&db, main, r#"{"n":5}"#).await?;
    notify(&db, "chan-not-carried", r#"{"n":6}"#).await?;
    notify(&db, audit, r#"{"n":7}"#).await?;
    assert_eq!(read_up_to(&mut default, 5).await?, [1, 5]);
    assert_eq!(read_up_to(&mut on_jobs, 4).await?, [2, 4]);
    let first = next_event(&mut jobs_v1).await?;
    let second = next_event(&mut jobs_v1).await?;
    // Positions count per channel: the jobs channel's messages are its 1st and 2nd.
    let (first_id, second_id) = (v1_id(&first)?, v1_id(&second)?);
    ensure!(
        first_id.ends_with("-1") && second_id.ends_with("-2"),
        "{first} {second}"
    );
    for n in [3, 7] {
        let event = sse_event(&mut on_audit).await?;
        assert_eq!(event.data, format!(r#"{{"n":{n}}}"#));
    }

    // A resume on a channel reads that channel's history.
    let mut resumed = ws_connect(port, &format!("/stream?channel={jobs}&since={first_id}")).await?;
    let replayed = next_event(&mut resumed).await?;
    assert_eq!(v1_id(&replayed)?, second_id);
    ensure!(replayed.contains(r#"{"n":4}"#), "{replayed}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn filters_keep_the_matching_messages_and_the_broadcasts() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "chan-filters";
    let server = Server::spawn(ServerOpts::with_db(pg, channel)).await?;
    let port = server.port();
    let mut everything = ws_connect(port, "/stream").await?;
    let mut agent_a = ws_connect(port, "/stream?agent_id=A").await?;
    let mut b_or_c = ws_connect_with(port, "/stream?agent_id=B&agent_id=C", &[PROTOCOL]).await?;
    let mut aborts_of_k = sse_connect(port, "/stream?check_id=k&action=abort", &[]).await?;
    // A legacy client keeps the original's leniency; the new protocols refuse a typo.
    let mut lenient = ws_connect(port, "/stream?agentid=A&x=1").await?;
    server.wait_for_clients(5).await?;
    let typo = upgrade(port, "/stream?agentid=A", &[PROTOCOL]).await?;
    assert_eq!(typo.status, 400, "{}", typo.text());
    ensure!(typo.text().contains("\"agentid\""), "{}", typo.text());
    let sse_typo = sse_connect(port, "/stream?agent=A", &[]).await;
    ensure!(
        format!("{:#}", sse_typo.err().context("SSE with a typo")?).contains("400"),
        "an event stream with an unknown parameter is refused"
    );

    let db = pg.client().await?;
    let published = [
        r#"{"n":1,"agent_id":"A"}"#,
        r#"{"n":2,"agent_id":"B","check_id":"k","action":"abort"}"#,
        r#"{"n":3,"action":"ping"}"#,
        r#"{"n":4,"agent_id":"C","action":"abort"}"#,
        r#"{"n":5,"Agent_ID":"A","check_id":"k","action":"abort"}"#,
        r#"{"n":6,"agent_id":null,"check_id":"other"}"#,
        r#"{"n":7,"agent_id":"D"}"#,
        r#"{"n":8}"#,
    ];
    for payload in published {
        notify(&db, channel, payload).await?;
    }
    assert_eq!(
        read_up_to(&mut everything, 8).await?,
        [1, 2, 3, 4, 5, 6, 7, 8]
    );
    assert_eq!(read_up_to(&mut lenient, 8).await?, [1, 2, 3, 4, 5, 6, 7, 8]);
    // Keys match as agents match them: `Agent_ID` is the agent's id.
    assert_eq!(read_up_to(&mut agent_a, 8).await?, [1, 3, 5, 6, 8]);
    assert_eq!(read_up_to(&mut b_or_c, 8).await?, [2, 3, 4, 6, 8]);
    let mut got = Vec::new();
    while got.last() != Some(&8) {
        let event = sse_event(&mut aborts_of_k).await?;
        let data: Value = serde_json::from_str(&event.data)?;
        got.push(data["n"].as_u64().context("n")?);
    }
    assert_eq!(got, [1, 2, 4, 5, 7, 8]);

    // A resume is filtered as the live stream is.
    let first = server.status().await?["epoch"]
        .as_str()
        .context("epoch")?
        .to_owned();
    let since = format!("{first}-0");
    let mut resumed = ws_connect(port, &format!("/stream?since={since}&agent_id=B")).await?;
    assert_eq!(read_up_to(&mut resumed, 8).await?, [2, 3, 6, 8]);
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tokens_claims_bind_its_channel_and_its_filter() -> Result<()> {
    let pg = PgCluster::shared().await;
    let (main, agents) = ("chan-claims", "chan-claims-agents");
    let secret = "chan-claims-secret";
    let opts = ServerOpts::with_db(pg, main)
        .env("PG_CHANNELS", agents)
        .env("JWT_SECRET", secret);
    let server = Server::spawn(opts).await?;
    let port = server.port();
    let token = encode(
        &Header::new(Algorithm::HS256),
        &json!({"exp": unix_now() + 600, "sub": "agent-A", "channels": [agents],
                "filter": {"agent_id": "A"}}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )?;
    let bearer = format!("Bearer {token}");
    let auth = [("Authorization", bearer.as_str())];
    let refused = upgrade(port, "/stream", &auth).await?;
    assert_eq!(
        refused.status, 403,
        "the default channel is not in its claims"
    );
    let widened = upgrade(port, &format!("/stream?channel={agents}&agent_id=B"), &auth).await?;
    assert_eq!(widened.status, 403, "{}", widened.text());
    let mut agent = ws_connect_with(port, &format!("/stream?channel={agents}"), &auth).await?;
    server.wait_for_clients(1).await?;
    let db = pg.client().await?;
    for payload in [
        r#"{"n":1,"agent_id":"B","action":"abort"}"#,
        r#"{"n":2,"agent_id":"A","action":"abort"}"#,
        r#"{"n":3,"action":"disconnect"}"#,
    ] {
        notify(&db, agents, payload).await?;
    }
    assert_eq!(read_up_to(&mut agent, 3).await?, [2, 3]);
    ensure!(
        !server.stderr().contains(&token),
        "the token appears in the server's log"
    );
    Ok(())
}
