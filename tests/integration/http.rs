//! HTTP routes: the websocket path, `/status`, `/ready`, `/metrics`, everything else 404.

use anyhow::Result;

use crate::harness::{PgCluster, Server, ServerOpts, free_port, http_get, http_request};

const UPGRADE_HEADERS: [(&str, &str); 4] = [
    ("Connection", "Upgrade"),
    ("Upgrade", "websocket"),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
];

#[tokio::test(flavor = "multi_thread")]
async fn stream_without_upgrade_is_400_with_a_one_line_body() -> Result<()> {
    let pg = PgCluster::shared().await;
    let server = Server::spawn(ServerOpts::with_db(pg, "http-400")).await?;
    let resp = http_get(server.port(), "/stream").await?;
    assert_eq!(resp.status, 400, "{resp:?}");
    let body = resp.text();
    assert!(
        !body.trim().is_empty() && body.trim().lines().count() == 1,
        "body is not one line: {resp:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn non_get_upgrade_is_405() -> Result<()> {
    let pg = PgCluster::shared().await;
    let server = Server::spawn(ServerOpts::with_db(pg, "http-405")).await?;
    let resp = http_request(server.port(), "POST", "/stream", &UPGRADE_HEADERS).await?;
    assert_eq!(resp.status, 405, "{resp:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn other_paths_are_404() -> Result<()> {
    let pg = PgCluster::shared().await;
    let server = Server::spawn(ServerOpts::with_db(pg, "http-404")).await?;
    for path in ["/nope", "/stream/", "/STREAM", "/streams", "/", "/status/x"] {
        let resp = http_get(server.port(), path).await?;
        assert_eq!(resp.status, 404, "GET {path}: {resp:?}");
        let resp = http_request(server.port(), "GET", path, &UPGRADE_HEADERS).await?;
        assert_eq!(
            resp.status, 404,
            "GET {path} with upgrade headers: {resp:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_listener_clients_and_version() -> Result<()> {
    let pg = PgCluster::shared().await;
    let server = Server::spawn(ServerOpts::with_db(pg, "http-status")).await?;

    let resp = http_get(server.port(), "/status").await?;
    assert_eq!(resp.status, 200, "{resp:?}");
    let content_type = resp.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "content-type {content_type:?}"
    );
    let status: serde_json::Value = serde_json::from_slice(&resp.body)?;
    assert_eq!(status["status"], "ok", "{status}");
    assert_eq!(status["listener"], "listening", "{status}");
    assert_eq!(status["clients"], 0, "{status}");
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"), "{status}");

    let first = server.ws().await?;
    let _second = server.ws().await?;
    server.wait_for_clients(2).await?;
    assert_eq!(server.status().await?["clients"], 2);

    // Any method.
    let resp = http_request(server.port(), "POST", "/status", &[("Content-Length", "0")]).await?;
    assert_eq!(resp.status, 200, "POST /status: {resp:?}");

    // A client that goes away is no longer counted.
    drop(first);
    server.wait_for_clients(1).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_is_200_while_listening() -> Result<()> {
    let pg = PgCluster::shared().await;
    let server = Server::spawn(ServerOpts::with_db(pg, "http-ready")).await?;
    let resp = http_get(server.port(), "/ready").await?;
    assert_eq!(resp.status, 200, "{resp:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_http_while_the_database_is_down() -> Result<()> {
    // Nothing listens on this port: the server keeps retrying and serves meanwhile.
    let opts = ServerOpts::new()
        .env("PG_HOST", "127.0.0.1")
        .env("PG_PORT", free_port())
        .env("PG_SSLMODE", "disable")
        .env("PG_CHANNEL", "http-db-down")
        .no_wait_ready();
    let server = Server::spawn(opts).await?;
    let resp = http_get(server.port(), "/ready").await?;
    assert_eq!(resp.status, 503, "{resp:?}");
    let status = server.status().await?;
    assert_eq!(status["listener"], "connecting", "{status}");
    let _ws = server.ws().await?;
    server.wait_for_clients(1).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_lists_every_series() -> Result<()> {
    let pg = PgCluster::shared().await;
    let server = Server::spawn(ServerOpts::with_db(pg, "http-metrics")).await?;
    let text = server.metrics().await?;
    for name in [
        "vulcan_stream_notifications_received_total",
        "vulcan_stream_notifications_forwarded_total",
        "vulcan_stream_notifications_invalid_total",
        "vulcan_stream_frames_sent_total",
        "vulcan_stream_clients_connected",
        "vulcan_stream_clients_disconnected_slow_total",
        "vulcan_stream_listener_up",
        "vulcan_stream_listener_reconnects_total",
        "vulcan_stream_build_info",
    ] {
        assert!(
            crate::harness::metric_value(&text, name).is_some(),
            "{name} missing from /metrics:\n{text}"
        );
    }
    assert_eq!(
        crate::harness::metric_value(&text, "vulcan_stream_listener_up"),
        Some(1.0)
    );
    Ok(())
}
