//! Shutdown: SIGTERM closes every client with 1001 and exits 0.

use std::time::Duration;

use anyhow::{Context, Result};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::harness::{PgCluster, Server, ServerOpts, next_close};

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_sends_close_1001_and_exits_0() -> Result<()> {
    let pg = PgCluster::shared().await;
    let mut server = Server::spawn(ServerOpts::with_db(pg, "lifecycle-sigterm")).await?;
    let mut first = server.ws().await?;
    let mut second = server.ws().await?;
    server.wait_for_clients(2).await?;

    server.signal(libc::SIGTERM)?;
    for ws in [&mut first, &mut second] {
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
async fn sigint_exits_0() -> Result<()> {
    let pg = PgCluster::shared().await;
    let mut server = Server::spawn(ServerOpts::with_db(pg, "lifecycle-sigint")).await?;
    let mut ws = server.ws().await?;
    server.wait_for_clients(1).await?;
    server.signal(libc::SIGINT)?;
    let frame = next_close(&mut ws)
        .await?
        .context("close frame without a code")?;
    assert_eq!(frame.code, CloseCode::Away, "close frame {frame:?}");
    let status = server.wait_exit(Duration::from_secs(10)).await?;
    assert_eq!(status.code(), Some(0), "exit status {status}");
    Ok(())
}
