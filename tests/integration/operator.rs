//! The operator's view: `/clients` behind the admin token, the metrics by channel and transport
//! and the fan-out delay, and the Grafana dashboard, whose every metric a running server
//! exports.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tokio_tungstenite::MaybeTlsStream;

use crate::harness::{
    PgCluster, Server, ServerOpts, Ws, http_get, http_request, next_event, notify, sse_connect,
    sse_event, ws_connect, ws_connect_with,
};

const ADMIN: &str = "the-operators-token";
const SHARED: &str = "the-agents-token";
const SECRET: &str = "a-secret-of-the-issuer";
const PROTOCOL: (&str, &str) = ("Sec-WebSocket-Protocol", "vulcan-stream.v1");

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// The local address of a websocket client's connection: the server's remote address for it.
fn local_addr(ws: &Ws) -> Result<SocketAddr> {
    match ws.get_ref() {
        MaybeTlsStream::Plain(tcp) => Ok(tcp.local_addr()?),
        _ => bail!("not a plain TCP connection"),
    }
}

/// `/clients` with `authorization` (if any).
async fn clients(server: &Server, authorization: Option<&str>) -> Result<(u16, String)> {
    let headers: Vec<(&str, &str)> = authorization
        .map(|value| ("Authorization", value))
        .into_iter()
        .collect();
    let response = http_request(server.port(), "GET", "/clients", &headers).await?;
    Ok((response.status, response.text()))
}

/// The listed clients, by remote address.
async fn listed(server: &Server) -> Result<Vec<Value>> {
    let (status, body) = clients(server, Some(&format!("Bearer {ADMIN}"))).await?;
    ensure!(status == 200, "/clients: {status} {body}");
    let listing: Value = serde_json::from_str(&body).with_context(|| body.clone())?;
    Ok(listing["clients"]
        .as_array()
        .with_context(|| format!("no clients array in {body}"))?
        .clone())
}

fn entry_of<'a>(clients: &'a [Value], peer: &str) -> Result<&'a Value> {
    clients
        .iter()
        .find(|c| c["remote_address"] == peer)
        .with_context(|| format!("no client from {peer} in {clients:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_lists_each_client_with_what_it_reads_only_for_the_admin_token() -> Result<()> {
    let pg = PgCluster::shared().await;
    let (main, jobs) = ("operator-main", "operator-jobs");
    let opts = ServerOpts::with_db(pg, main)
        .env("PG_CHANNELS", jobs)
        .env("ADMIN_TOKEN", ADMIN)
        .env("STREAM_TOKEN", SHARED)
        .env("JWT_SECRET", SECRET)
        .env("PING_INTERVAL", 3600)
        .env("LOG_LEVEL", "debug");
    let server = Server::spawn(opts).await?;
    let port = server.port();

    for authorization in [
        None,
        Some("Bearer wrong".to_owned()),
        Some(format!("Bearer {ADMIN}x")),
        Some(format!("Basic {ADMIN}")),
        Some(format!("Bearer {SHARED}")),
    ] {
        let (status, body) = clients(&server, authorization.as_deref()).await?;
        assert_eq!(status, 401, "{authorization:?}: {body}");
    }

    let started = unix_now();
    let mut legacy = ws_connect(port, &format!("/stream?token={SHARED}")).await?;
    let v1 = ws_connect_with(
        port,
        &format!("/stream?channel={jobs}&agent_id=A&action=abort&token={SHARED}"),
        &[PROTOCOL],
    )
    .await?;
    let mut sse = sse_connect(port, &format!("/stream?token={SHARED}"), &[]).await?;
    let jwt = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "agent-7", "exp": unix_now() + 600, "filter": {"agent_id": "agent-7"}}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )?;
    let signed = ws_connect_with(
        port,
        "/stream",
        &[("Authorization", &format!("Bearer {jwt}"))],
    )
    .await?;
    server.wait_for_clients(4).await?;

    // One message on the default channel: the legacy and SSE clients get it, the agent's
    // client (filtered on agent-7) too, as a broadcast.
    let db = pg.client().await?;
    notify(&db, main, r#"{"n":1}"#).await?;
    assert_eq!(next_event(&mut legacy).await?, r#"{"n":1}"#);
    assert_eq!(sse_event(&mut sse).await?.data, r#"{"n":1}"#);

    // The fan-out counts a client's frames right after writing them: wait for the count.
    let deadline = Instant::now() + Duration::from_secs(10);
    let clients = loop {
        let clients = listed(&server).await?;
        let counted = clients.iter().filter(|c| c["frames_sent"] == 1).count();
        if counted == 3 || Instant::now() > deadline {
            break clients;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(clients.len(), 4, "{clients:?}");
    let legacy_peer = local_addr(&legacy)?.to_string();
    let entry = entry_of(&clients, &legacy_peer)?;
    assert_eq!(entry["transport"], "legacy", "{entry}");
    assert_eq!(entry["channel"], main, "{entry}");
    assert_eq!(entry["filter"], Value::Null, "{entry}");
    assert_eq!(entry["subject"], Value::Null, "{entry}");
    let entry = entry_of(&clients, &local_addr(&v1)?.to_string())?;
    assert_eq!(entry["transport"], "v1", "{entry}");
    assert_eq!(entry["channel"], jobs, "{entry}");
    assert_eq!(entry["filter"], "agent_id=A&action=abort", "{entry}");
    assert_eq!(entry["frames_sent"], 0, "{entry}");
    let signed_entry = entry_of(&clients, &local_addr(&signed)?.to_string())?;
    assert_eq!(signed_entry["transport"], "legacy", "{signed_entry}");
    assert_eq!(signed_entry["subject"], "agent-7", "{signed_entry}");
    assert_eq!(signed_entry["filter"], "agent_id=agent-7", "{signed_entry}");
    let sse_entry = clients
        .iter()
        .find(|c| c["transport"] == "sse")
        .with_context(|| format!("no SSE client in {clients:?}"))?;
    assert_eq!(sse_entry["channel"], main, "{sse_entry}");
    ensure!(
        sse_entry["remote_address"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{sse_entry}"
    );
    let mut ids = BTreeSet::new();
    for client in &clients {
        ids.insert(client["id"].as_u64().context("id")?);
        assert_eq!(client["queue_depth"], 0, "{client}");
        let since = client["connected_since"].as_u64().context("since")?;
        ensure!(
            since >= started && since <= unix_now(),
            "connected_since {since}: {client}"
        );
    }
    assert_eq!(ids.len(), 4, "ids are distinct: {clients:?}");
    // The message went to the three clients of the default channel, the agent's as a
    // broadcast.
    for entry in [entry_of(&clients, &legacy_peer)?, sse_entry, signed_entry] {
        assert_eq!(entry["frames_sent"], 1, "{entry}");
    }

    drop(legacy);
    server.wait_for_clients(3).await?;
    let clients = listed(&server).await?;
    ensure!(
        clients
            .iter()
            .all(|c| c["remote_address"] != legacy_peer.as_str()),
        "a client that left is not listed: {clients:?}"
    );
    let log = server.stderr();
    ensure!(!log.contains(ADMIN), "the admin token is logged:\n{log}");
    Ok(())
}

/// The value of `name{labels}` in Prometheus text, labels exactly as rendered.
fn labelled(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_and_frames_are_counted_by_channel_and_transport() -> Result<()> {
    let pg = PgCluster::shared().await;
    let (main, jobs) = ("operator-metrics-main", "operator-metrics-jobs");
    let opts = ServerOpts::with_db(pg, main)
        .env("PG_CHANNELS", jobs)
        .env("PING_INTERVAL", 3600);
    let server = Server::spawn(opts).await?;
    let port = server.port();

    // Without an admin token the route does not exist, whatever the request says.
    let (status, _) = clients(&server, Some(&format!("Bearer {ADMIN}"))).await?;
    assert_eq!(status, 404);
    assert_eq!(http_get(port, "/clients").await?.status, 404);

    let _legacy = ws_connect(port, "/stream").await?;
    let mut v1 = ws_connect_with(port, &format!("/stream?channel={jobs}"), &[PROTOCOL]).await?;
    let mut sse = sse_connect(port, &format!("/stream?channel={jobs}"), &[]).await?;
    server.wait_for_clients(3).await?;
    let text = server.metrics().await?;
    for (channel, transport, count) in [
        (main, "legacy", 1.0),
        (main, "v1", 0.0),
        (main, "sse", 0.0),
        (jobs, "legacy", 0.0),
        (jobs, "v1", 1.0),
        (jobs, "sse", 1.0),
    ] {
        let labels = format!(r#"channel="{channel}",transport="{transport}""#);
        assert_eq!(
            labelled(&text, "vulcan_stream_channel_clients", &labels),
            Some(count),
            "{labels} in:\n{text}"
        );
    }

    let db = pg.client().await?;
    for n in 1..=3 {
        notify(&db, jobs, &format!(r#"{{"n":{n}}}"#)).await?;
    }
    for _ in 1..=3 {
        next_event(&mut v1).await?;
        sse_event(&mut sse).await?;
    }
    let frames = |transport: &str| format!(r#"channel="{jobs}",transport="{transport}""#);
    server
        .wait_http(
            |r| {
                let text = r.text();
                labelled(
                    &text,
                    "vulcan_stream_channel_frames_sent_total",
                    &frames("v1"),
                ) == Some(3.0)
                    && labelled(
                        &text,
                        "vulcan_stream_channel_frames_sent_total",
                        &frames("sse"),
                    ) == Some(3.0)
                    && crate::harness::metric_value(&text, "vulcan_stream_frames_sent_total")
                        == Some(6.0)
            },
            "/metrics",
            "3 frames to each client of the jobs channel",
        )
        .await?;
    let text = server.metrics().await?;
    let main_legacy = format!(r#"channel="{main}",transport="legacy""#);
    assert_eq!(
        labelled(
            &text,
            "vulcan_stream_channel_frames_sent_total",
            &main_legacy
        ),
        Some(0.0),
        "{text}"
    );
    // One delay per message and fan-out thread with clients on its channel.
    let delays = crate::harness::metric_value(&text, "vulcan_stream_fanout_delay_seconds_count")
        .context("the fan-out delay histogram")?;
    ensure!((3.0..=6.0).contains(&delays), "{delays} delays in:\n{text}");
    ensure!(
        text.contains(r#"vulcan_stream_fanout_delay_seconds_bucket{le="+Inf"}"#),
        "{text}"
    );

    drop(sse);
    server.wait_for_clients(2).await?;
    let text = server.metrics().await?;
    assert_eq!(
        labelled(&text, "vulcan_stream_channel_clients", &frames("sse")),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        crate::harness::metric_value(&text, "vulcan_stream_clients_connected"),
        Some(2.0)
    );
    Ok(())
}

/// The metric names a PromQL expression uses.
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    const PREFIX: &str = "vulcan_stream_";
    let mut rest = expr;
    while let Some(at) = rest.find(PREFIX) {
        let starts_word = rest[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        let end = rest[at..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .map_or(rest.len(), |len| at + len);
        if starts_word {
            into.insert(rest[at..end].to_owned());
        }
        rest = &rest[end..];
    }
}

/// Every query of the dashboard: panels' `expr`, and the template variables' queries.
fn queries(value: &Value, into: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "query" | "definition", Value::String(query)) => {
                        into.push(query.clone())
                    }
                    _ => queries(value, into),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| queries(item, into)),
        _ => {}
    }
}

/// The sample names a scrape can hold: each sample line's, and for each `# TYPE` the names of
/// its kind (a family without samples yet still counts).
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let mut parts = declared.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total", "_created"],
                "histogram" => &["_bucket", "_sum", "_count", "_created"],
                "info" => &["_info"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|suffix| format!("{name}{suffix}")));
        } else if !line.starts_with('#') {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_of_the_dashboard_is_exported() -> Result<()> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/_resources/grafana/vulcan-stream.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path)?)
        .with_context(|| format!("{path} is not JSON"))?;
    let mut found = Vec::new();
    queries(&dashboard, &mut found);
    let mut used = BTreeSet::new();
    for query in &found {
        metric_names(query, &mut used);
    }
    ensure!(
        used.len() >= 10,
        "too few metrics in the dashboard: {used:?}"
    );
    for kind in [
        "vulcan_stream_channel_clients",
        "vulcan_stream_fanout_delay_seconds_bucket",
        "vulcan_stream_clients_disconnected_slow_total",
        "vulcan_stream_listener_reconnects_total",
        "vulcan_stream_resets_total",
    ] {
        ensure!(used.contains(kind), "the dashboard does not show {kind}");
    }

    let pg = PgCluster::shared().await;
    let server = Server::spawn(ServerOpts::with_db(pg, "operator-dashboard")).await?;
    let text = server.metrics().await?;
    let exported = exported(&text);
    let missing: Vec<&String> = used.difference(&exported).collect();
    ensure!(
        missing.is_empty(),
        "the dashboard queries metrics the server does not export: {missing:?}\n{text}"
    );
    Ok(())
}

#[test]
fn metric_names_are_read_from_promql() {
    let mut names = BTreeSet::new();
    metric_names(
        r#"histogram_quantile(0.99, sum by (le) (rate(vulcan_stream_fanout_delay_seconds_bucket{instance=~"$i"}[5m]))) / my_vulcan_stream_x + vulcan_stream_up"#,
        &mut names,
    );
    let expected: BTreeSet<String> = [
        "vulcan_stream_fanout_delay_seconds_bucket",
        "vulcan_stream_up",
    ]
    .map(str::to_owned)
    .into();
    assert_eq!(names, expected);
}
