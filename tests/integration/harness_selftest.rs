//! The harness itself: the cluster delivers notifications, survives stop/start, and the raw HTTP
//! client parses what servers send.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::AsyncMessage;

use crate::harness::{PgCluster, TIMEOUT, http_get, metric_value, seq_payload};

/// A LISTEN connection on database `stream` yielding notification payloads.
async fn listen(
    pg: &PgCluster,
    channel: &str,
) -> Result<tokio::sync::mpsc::UnboundedReceiver<String>> {
    let (client, mut connection) =
        tokio_postgres::connect(&pg.conn_str("stream"), tokio_postgres::NoTls).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(msg)) = messages.next().await {
            if let AsyncMessage::Notification(n) = msg {
                if tx.send(n.payload().to_owned()).is_err() {
                    break;
                }
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .await
        .context("LISTEN")?;
    // Keep the client alive as long as the connection task runs.
    std::mem::forget(client);
    Ok(rx)
}

async fn recv(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> Result<String> {
    tokio::time::timeout(TIMEOUT, rx.recv())
        .await
        .context("no notification in time")?
        .context("listener gone")
}

#[tokio::test(flavor = "multi_thread")]
async fn shared_cluster_delivers_notifications_in_order() -> Result<()> {
    let pg = PgCluster::shared().await;
    let mut rx = listen(pg, "harness-Self").await?;
    pg.notify("harness-Self", r#"{"action":"one"}"#).await?;
    assert_eq!(recv(&mut rx).await?, r#"{"action":"one"}"#);
    pg.notify_seq("harness-Self", 500).await?;
    for i in 0..500 {
        assert_eq!(recv(&mut rx).await?, seq_payload(i));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn private_cluster_stops_and_starts_with_its_data() -> Result<()> {
    let pg = PgCluster::private().await?;
    pg.client()
        .await?
        .batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42);")
        .await?;
    pg.stop().await?;
    ensure!(
        tokio_postgres::connect(&pg.conn_str("stream"), tokio_postgres::NoTls)
            .await
            .is_err(),
        "cluster still accepts connections after stop"
    );
    pg.start().await?;
    let row = pg
        .client()
        .await?
        .query_one("SELECT v FROM kept", &[])
        .await?;
    assert_eq!(row.get::<_, i32>(0), 42);
    Ok(())
}

/// Serves one canned response to one connection.
async fn canned(response: &'static [u8]) -> Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        if let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = sock.read(&mut buf).await;
            let _ = sock.write_all(response).await;
            let _ = sock.shutdown().await;
        }
    });
    Ok(port)
}

#[tokio::test]
async fn raw_http_reads_length_chunked_and_eof_bodies() -> Result<()> {
    let port = canned(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello").await?;
    let r = http_get(port, "/").await?;
    assert_eq!(
        (r.status, r.text().as_str(), r.header("x-a")),
        (200, "hello", Some("b"))
    );

    let port = canned(
        b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
    )
    .await?;
    let r = http_get(port, "/").await?;
    assert_eq!((r.status, r.text().as_str()), (404, "abcde"));

    let port = canned(b"HTTP/1.1 400 Bad Request\r\n\r\nno length").await?;
    let r = http_get(port, "/").await?;
    assert_eq!((r.status, r.text().as_str()), (400, "no length"));
    Ok(())
}

#[test]
fn metric_values_are_parsed() {
    let text = "# HELP x_total X.\n# TYPE x_total counter\nx_total 3\nx_total_more 9\n\
                y{a=\"1\"} 2\ny{a=\"2\"} 5.5\n";
    assert_eq!(metric_value(text, "x_total"), Some(3.0));
    assert_eq!(metric_value(text, "y"), Some(7.5));
    assert_eq!(metric_value(text, "z"), None);
    let _ = Duration::ZERO;
}
