//! The database going away and coming back.

use std::time::Duration;

use anyhow::Result;

use crate::harness::{PgCluster, Server, ServerOpts, next_event};

/// Reconnect backoff is capped by the server; a restart of a second or two needs a few seconds.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn survives_a_database_restart() -> Result<()> {
    let pg = PgCluster::private().await?;
    let channel = "resilience-restart";
    let server = Server::spawn(ServerOpts::with_db(&pg, channel)).await?;
    let mut ws = server.ws().await?;
    server.wait_for_clients(1).await?;
    let before = r#"{"action":"before-restart"}"#;
    pg.notify(channel, before).await?;
    assert_eq!(next_event(&mut ws).await?, before);

    pg.stop().await?;
    server
        .wait_http(
            |r| r.status == 503,
            "/ready",
            "/ready = 503 with the database down",
        )
        .await?;
    assert_eq!(server.status().await?["listener"], "connecting");

    pg.start().await?;
    server
        .wait_http_within(
            RECONNECT_TIMEOUT,
            |r| r.status == 200,
            "/ready",
            "/ready = 200",
        )
        .await?;
    // The client stayed connected through the outage and gets what follows it.
    let after = r#"{"action":"after-restart"}"#;
    pg.notify(channel, after).await?;
    assert_eq!(next_event(&mut ws).await?, after);
    assert!(
        server
            .metric("vulcan_stream_listener_reconnects_total")
            .await?
            >= 1.0
    );
    Ok(())
}
