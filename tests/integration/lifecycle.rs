//! Shutdown: SIGTERM closes every client with 1001 and exits 0.

use std::time::Duration;

use anyhow::{Context, Result};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::harness::{PgCluster, Server, ServerOpts, Ws, next_close};

/// Sends `signal` and expects every client to get a 1001 close, then the process to exit 0.
async fn expect_clean_stop(server: &mut Server, signal: i32, clients: &mut [Ws]) -> Result<()> {
    server.signal(signal)?;
    for ws in clients {
        let frame = next_close(ws)
            .await?
            .context("close frame without a code")?;
        assert_eq!(frame.code, CloseCode::Away, "close frame {frame:?}");
    }
    let status = server.wait_exit(Duration::from_secs(10)).await?;
    assert_eq!(status.code(), Some(0), "exit status {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_sends_close_1001_and_exits_0() -> Result<()> {
    let pg = PgCluster::shared().await;
    let mut server = Server::spawn(ServerOpts::with_db(pg, "lifecycle-sigterm")).await?;
    let mut clients = [server.ws().await?, server.ws().await?];
    server.wait_for_clients(2).await?;
    expect_clean_stop(&mut server, libc::SIGTERM, &mut clients).await
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_exits_0() -> Result<()> {
    let pg = PgCluster::shared().await;
    let mut server = Server::spawn(ServerOpts::with_db(pg, "lifecycle-sigint")).await?;
    let mut clients = [server.ws().await?];
    server.wait_for_clients(1).await?;
    expect_clean_stop(&mut server, libc::SIGINT, &mut clients).await
}
