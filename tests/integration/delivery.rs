//! NOTIFY to websocket: end to end, fan-out and order.

use std::time::Duration;

use anyhow::{Result, ensure};

use crate::harness::{
    PgCluster, Server, ServerOpts, next_event, next_event_within, seq_payload, ws_send,
};

#[tokio::test(flavor = "multi_thread")]
async fn notify_reaches_client_with_exact_payload() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "delivery-e2e";
    let server = Server::spawn(ServerOpts::with_db(pg, channel)).await?;
    let mut ws = server.ws().await?;
    server.wait_for_clients(1).await?;

    let payload = r#"{"action":"hello","check_id":"3f0c7a52-4b1e-4f2a-9c51-0d6e1f2a3b4c"}"#;
    pg.notify(channel, payload).await?;
    assert_eq!(next_event(&mut ws).await?, payload);
    Ok(())
}

/// The client is registered before the 101 is sent: a NOTIFY committed right after the handshake
/// reaches it without any other synchronisation.
#[tokio::test(flavor = "multi_thread")]
async fn notify_right_after_handshake_is_delivered() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "delivery-after-101";
    let server = Server::spawn(ServerOpts::with_db(pg, channel)).await?;
    let db = pg.client().await?;
    for i in 0..20 {
        let mut ws = server.ws().await?;
        let payload = format!(r#"{{"action":"fresh","seq":{i}}}"#);
        crate::harness::notify(&db, channel, &payload).await?;
        assert_eq!(next_event(&mut ws).await?, payload, "client {i}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_clients_each_get_all_500_messages_in_order() -> Result<()> {
    const CLIENTS: usize = 50;
    const MESSAGES: usize = 500;
    let pg = PgCluster::shared().await;
    let channel = "delivery-fanout";
    let server = Server::spawn(ServerOpts::with_db(pg, channel)).await?;
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(server.ws().await?);
    }
    server.wait_for_clients(CLIENTS as u64).await?;

    pg.notify_seq(channel, MESSAGES as i32).await?;

    let readers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(c, mut ws)| {
            tokio::spawn(async move {
                for i in 0..MESSAGES {
                    let got = next_event_within(&mut ws, Duration::from_secs(30)).await?;
                    ensure!(
                        got == seq_payload(i),
                        "client {c}: message {i} is {got:?}, expected {:?}",
                        seq_payload(i)
                    );
                }
                Ok(ws)
            })
        })
        .collect();
    for reader in readers {
        reader.await??;
    }
    // Every message was handed to the fan-out exactly once, whatever the number of clients.
    assert_eq!(
        server.status().await?["notifications_forwarded"],
        MESSAGES as u64
    );
    Ok(())
}

/// What clients send is read and discarded: it reaches nobody and does not disturb the stream.
#[tokio::test(flavor = "multi_thread")]
async fn client_messages_are_discarded() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "delivery-client-talks";
    let server = Server::spawn(ServerOpts::with_db(pg, channel)).await?;
    let mut talker = server.ws().await?;
    let mut listener = server.ws().await?;
    server.wait_for_clients(2).await?;

    for text in [r#"{"action":"from-client"}"#, "not json", ""] {
        ws_send(&mut talker, text).await?;
    }
    let payload = r#"{"action":"after-client-talk"}"#;
    pg.notify(channel, payload).await?;
    assert_eq!(next_event(&mut listener).await?, payload);
    assert_eq!(next_event(&mut talker).await?, payload);
    Ok(())
}
