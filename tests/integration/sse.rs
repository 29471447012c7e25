//! Server-Sent Events on the stream path: the real server and PostgreSQL, read by an event-stream
//! client that parses as a browser's `EventSource` does (and by `curl` where it is installed).

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::harness::{
    EventStream, HttpResponse, PgCluster, Server, ServerOpts, SseEvent, SseItem, TIMEOUT,
    http_request, next_event, notify, read_until_closed, sse_connect, sse_event, sse_next_within,
    ws_connect,
};

const ACCEPT: (&str, &str) = ("Accept", "text/event-stream");

/// A payload that spans lines: it arrives as one `data:` line per line.
const MULTILINE: &str = "{\n  \"action\": \"multi\",\n  \"check_id\": \"line-breaks\"\n}";

/// The head position the server reports.
async fn head(server: &Server) -> Result<String> {
    let status = server.status().await?;
    status["head"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no head in {status}"))
}

/// The offset of a position `EPOCH-OFFSET`.
fn offset(position: &str) -> u64 {
    position
        .rsplit_once('-')
        .and_then(|(_, offset)| offset.parse().ok())
        .unwrap_or_else(|| panic!("{position:?} is not a position"))
}

/// The epoch of a position.
fn epoch(position: &str) -> &str {
    position
        .split_once('-')
        .map_or(position, |(epoch, _)| epoch)
}

/// A GET of `path` as an `EventSource` would send it, with extra headers; the whole answer.
async fn sse_request(port: u16, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
    let mut all = vec![ACCEPT];
    all.extend_from_slice(headers);
    http_request(port, "GET", path, &all).await
}

/// A refusal: `status`, one line naming the problem, and a connection that closes.
fn assert_refused(response: &HttpResponse, status: u16, line_has: &str) {
    assert_eq!(response.status, status, "{response:?}");
    let body = response.text();
    assert_eq!(body.trim_end().lines().count(), 1, "one line: {response:?}");
    assert!(body.contains(line_has), "{line_has:?} in {response:?}");
    assert_eq!(response.header("connection"), Some("close"), "{response:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn payloads_arrive_as_data_lines_with_positions_as_ids_and_comments_as_heartbeats()
-> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "sse-basic";
    let opts = ServerOpts::with_db(pg, channel).env("PING_INTERVAL", "1");
    let server = Server::spawn(opts).await?;
    let mut stream = sse_connect(server.port(), "/stream", &[]).await?;
    for (name, value) in [
        ("content-type", "text/event-stream"),
        ("cache-control", "no-cache"),
        ("connection", "close"),
        ("x-accel-buffering", "no"),
    ] {
        assert_eq!(stream.header(name), Some(value), "{:?}", stream.headers());
    }
    for absent in [
        "content-length",
        "transfer-encoding",
        "access-control-allow-origin",
    ] {
        assert_eq!(stream.header(absent), None, "{:?}", stream.headers());
    }
    // The preamble comes first, and once.
    assert_eq!(
        sse_next_within(&mut stream, TIMEOUT).await?,
        SseItem::Retry(2000)
    );
    let mut ws = ws_connect(server.port(), "/stream").await?;
    server.wait_for_clients(2).await?;

    pg.notify(channel, MULTILINE).await?;
    let first = sse_event(&mut stream).await?;
    assert_eq!(first.kind, "message");
    assert_eq!(
        first.data, MULTILINE,
        "the lines rebuild the payload exactly"
    );
    assert_eq!(first.id.as_deref(), Some(head(&server).await?.as_str()));
    assert_eq!(
        next_event(&mut ws).await?,
        MULTILINE,
        "websockets get it too"
    );
    let second_payload = r#"{"action":"second"}"#;
    pg.notify(channel, second_payload).await?;
    let second = sse_event(&mut stream).await?;
    assert_eq!(second.data, second_payload);
    let (first_id, second_id) = (first.id.unwrap_or_default(), second.id.unwrap_or_default());
    assert_eq!(epoch(&second_id), epoch(&first_id));
    assert_eq!(offset(&second_id), offset(&first_id) + 1);

    // A comment naming the head every PingInterval (1 s), and no second retry.
    let mut beats = Vec::new();
    while beats.len() < 3 {
        match sse_next_within(&mut stream, Duration::from_secs(5)).await? {
            SseItem::Comment(text) => {
                assert_eq!(text, format!("ping {second_id}"));
                beats.push(Instant::now());
            }
            other => bail!("only heartbeats expected now, got {other:?}"),
        }
    }
    for pair in beats.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap > Duration::from_millis(500) && gap < Duration::from_millis(2500),
            "heartbeats {gap:?} apart with PingInterval 1 s"
        );
    }
    Ok(())
}

/// Publishes `{"seq":n}` for n = 0, 1, … until told to stop; returns how many it published.
fn publisher(
    db: tokio_postgres::Client,
    channel: &'static str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<usize>>,
) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut seq = 0;
        while stopped.try_recv().is_err() {
            notify(&db, channel, &format!(r#"{{"seq":{seq}}}"#)).await?;
            seq += 1;
        }
        Ok(seq)
    });
    (stop, task)
}

/// A server on `channel`, an event stream reading it from the start, and a [`publisher`]
/// started after the stream joined.
async fn publishing_server(
    channel: &'static str,
) -> Result<(
    Server,
    EventStream,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<usize>>,
)> {
    let pg = PgCluster::shared().await;
    let server = Server::spawn(ServerOpts::with_db(pg, channel)).await?;
    let stream = sse_connect(server.port(), "/stream", &[]).await?;
    server.wait_for_clients(1).await?;
    let (stop, publishing) = publisher(pg.client().await?, channel);
    Ok((server, stream, stop, publishing))
}

/// Reads messages until `wanted` have been collected in all (positions and sequence numbers).
async fn collect(
    stream: &mut EventStream,
    got: &mut Vec<(String, usize)>,
    wanted: usize,
) -> Result<()> {
    while got.len() < wanted {
        let SseEvent { kind, id, data } = sse_event(stream).await?;
        ensure!(kind == "message", "unexpected {kind} event: {data}");
        let value: serde_json::Value = serde_json::from_str(&data)?;
        let seq = value["seq"]
            .as_u64()
            .with_context(|| format!("no seq in {data}"))?;
        got.push((id.context("a message without an id")?, seq as usize));
    }
    Ok(())
}

/// While a publisher runs, a client reconnects three times, from the last id it got: with
/// `Last-Event-ID`, with `?since=`, and with both (the header wins over an older `since`, as
/// when a browser reconnects to the page's original URL). It gets every message once, in order.
#[tokio::test(flavor = "multi_thread")]
async fn resuming_with_last_event_id_or_since_loses_and_repeats_nothing() -> Result<()> {
    let (server, mut stream, stop, publishing) = publishing_server("sse-resume").await?;
    let port = server.port();

    let mut got = Vec::new();
    collect(&mut stream, &mut got, 50).await?;
    let oldest = got[0].0.clone();
    for (round, wanted) in [(0, 100), (1, 150), (2, 200)] {
        drop(stream);
        let last = got.last().map(|(id, _)| id.clone()).unwrap_or_default();
        ensure!(!publishing.is_finished(), "the publisher stopped early");
        stream = match round {
            0 => sse_connect(port, "/stream", &[("Last-Event-ID", &last)]).await?,
            1 => sse_connect(port, &format!("/stream?since={last}"), &[]).await?,
            _ => {
                let path = format!("/stream?since={oldest}");
                sse_connect(port, &path, &[("Last-Event-ID", &last)]).await?
            }
        };
        collect(&mut stream, &mut got, wanted).await?;
    }
    stop.send(()).ok();
    let published = publishing.await??;
    collect(&mut stream, &mut got, published).await?;

    let seqs: Vec<usize> = got.iter().map(|(_, seq)| *seq).collect();
    assert_eq!(seqs, (0..published).collect::<Vec<_>>());
    let offsets: Vec<u64> = got.iter().map(|(id, _)| offset(id)).collect();
    assert!(
        offsets.windows(2).all(|w| w[1] == w[0] + 1),
        "ids are consecutive positions"
    );
    ensure!(server.metric("vulcan_stream_resumes_served_total").await? >= 3.0);
    eprintln!("{published} messages across four connections");
    Ok(())
}

/// While a publisher runs flat out, clients keep joining from one position: each gets the 200,
/// then the preamble, then every message after that position in order, although messages were
/// published between its join and the moment its head went out.
#[tokio::test(flavor = "multi_thread")]
async fn the_head_and_preamble_come_first_and_nothing_is_missed_while_publishing() -> Result<()> {
    let (server, mut first, stop, publishing) = publishing_server("sse-join-order").await?;
    let port = server.port();
    let mut got = Vec::new();
    collect(&mut first, &mut got, 1).await?;
    let (from, from_seq) = got[0].clone();
    for join in 0..20 {
        let mut stream = sse_connect(port, "/stream", &[("Last-Event-ID", &from)]).await?;
        let preamble = sse_next_within(&mut stream, TIMEOUT).await?;
        ensure!(
            preamble == SseItem::Retry(2000),
            "join {join}: {preamble:?} first"
        );
        let mut after = Vec::new();
        collect(&mut stream, &mut after, 30).await?;
        let seqs: Vec<usize> = after.iter().map(|(_, seq)| *seq).collect();
        let expected: Vec<usize> = (from_seq + 1..from_seq + 31).collect();
        ensure!(seqs == expected, "join {join}: {seqs:?}");
    }
    ensure!(!publishing.is_finished(), "the publisher stopped early");
    stop.send(()).ok();
    let published = publishing.await??;
    eprintln!("20 joins while {published} messages were published");
    Ok(())
}

/// A position the history no longer holds: a `reset` naming the head comes first, then the
/// stream goes on; an `EventSource` takes the reset's id as its own, so its next reconnect
/// resumes from there.
#[tokio::test(flavor = "multi_thread")]
async fn an_evicted_position_gets_a_reset_first() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "sse-evicted";
    let server =
        Server::spawn(ServerOpts::with_db(pg, channel).env("HISTORY_MESSAGES", "2")).await?;
    let mut live = sse_connect(server.port(), "/stream", &[]).await?;
    server.wait_for_clients(1).await?;
    let db = pg.client().await?;
    let mut ids = Vec::new();
    for seq in 0..5 {
        notify(&db, channel, &format!(r#"{{"seq":{seq}}}"#)).await?;
        ids.push(sse_event(&mut live).await?.id.context("an id")?);
    }

    let mut late = sse_connect(server.port(), "/stream", &[("Last-Event-ID", &ids[0])]).await?;
    let reset = sse_event(&mut late).await?;
    assert_eq!(
        reset,
        SseEvent {
            kind: "reset".into(),
            id: Some(ids[4].clone()),
            data: r#"{"reason":"evicted"}"#.into(),
        }
    );
    let payload = r#"{"seq":5}"#;
    notify(&db, channel, payload).await?;
    let next = sse_event(&mut late).await?;
    assert_eq!(
        (next.kind.as_str(), next.data.as_str()),
        ("message", payload)
    );
    assert_eq!(
        offset(next.id.as_deref().unwrap_or_default()),
        offset(&ids[4]) + 1
    );

    // From the reset's id: nothing missed, no reset.
    let mut again = sse_connect(server.port(), "/stream", &[("Last-Event-ID", &ids[4])]).await?;
    let resumed = sse_event(&mut again).await?;
    assert_eq!(resumed, next);
    Ok(())
}

/// `pg_terminate_backend` of the LISTEN connection: NOTIFYs of the gap are lost, so the SSE
/// client is told, with a reset naming the new epoch's start, before the next message.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_listen_connection_sends_a_reset_with_the_new_epoch_before_the_next_message()
-> Result<()> {
    let pg = PgCluster::private().await?;
    let channel = "sse-listen-gap";
    let server = Server::spawn(ServerOpts::with_db(&pg, channel)).await?;
    let mut stream = sse_connect(server.port(), "/stream", &[]).await?;
    server.wait_for_clients(1).await?;
    pg.notify(channel, r#"{"action":"before"}"#).await?;
    let before = sse_event(&mut stream).await?.id.context("an id")?;

    let pids = pg.backend_pids("vulcan-stream").await?;
    ensure!(pids.len() == 1, "one LISTEN backend expected: {pids:?}");
    pg.connect("postgres")
        .await?
        .execute("SELECT pg_terminate_backend($1)", &[&pids[0]])
        .await?;
    server
        .wait_metric(
            "vulcan_stream_listener_reconnects_total",
            Duration::from_secs(30),
            |v| v >= 1.0,
        )
        .await?;
    server.wait_ready().await?;
    let payload = r#"{"action":"after"}"#;
    pg.notify(channel, payload).await?;

    let reset = sse_event(&mut stream).await?;
    assert_eq!(reset.kind, "reset", "{reset:?}");
    assert_eq!(reset.data, r#"{"reason":"listen-gap"}"#);
    let start = reset.id.context("the reset names the new start")?;
    assert_ne!(epoch(&start), epoch(&before), "a new epoch");
    assert_eq!(offset(&start), 0);
    let next = sse_event(&mut stream).await?;
    assert_eq!(next.data, payload);
    assert_eq!(next.id, Some(format!("{}-1", epoch(&start))));
    Ok(())
}

/// The token (Bearer or `?token=`) and the Origin allow-list apply as to websockets, with the
/// same refusals; an allowed origin is named in `Access-Control-Allow-Origin`.
#[tokio::test(flavor = "multi_thread")]
async fn token_and_origin_rules_apply_and_an_allowed_origin_may_read() -> Result<()> {
    let pg = PgCluster::shared().await;
    let opts = ServerOpts::with_db(pg, "sse-auth")
        .env("STREAM_TOKEN", "s3cret")
        .env("ALLOWED_ORIGINS", "https://ok.example");
    let server = Server::spawn(opts).await?;
    let port = server.port();
    let bearer = ("Authorization", "Bearer s3cret");

    let missing = sse_request(port, "/stream", &[]).await?;
    assert_refused(&missing, 401, "token");
    assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
    let wrong = sse_request(port, "/stream?token=nope", &[]).await?;
    assert_refused(&wrong, 401, "token");
    let evil = sse_request(
        port,
        "/stream",
        &[bearer, ("Origin", "https://evil.example")],
    )
    .await?;
    assert_refused(&evil, 403, "origin");

    let by_header = sse_connect(port, "/stream", &[bearer]).await?;
    assert_eq!(by_header.header("access-control-allow-origin"), None);
    let _by_query = sse_connect(port, "/stream?token=s3cret", &[]).await?;
    let browser = sse_connect(
        port,
        "/stream?token=s3cret",
        &[("Origin", "https://ok.example")],
    )
    .await?;
    assert_eq!(
        browser.header("access-control-allow-origin"),
        Some("https://ok.example")
    );
    assert_eq!(browser.header("vary"), Some("Origin"));
    server.wait_for_clients(3).await?;
    assert_eq!(
        server
            .metric("vulcan_stream_clients_rejected_total")
            .await?,
        3.0
    );

    // Without an allow-list every origin may read.
    let open = Server::spawn(ServerOpts::with_db(pg, "sse-any-origin")).await?;
    let any = sse_connect(open.port(), "/stream", &[("Origin", "https://any.example")]).await?;
    assert_eq!(any.header("access-control-allow-origin"), Some("*"));
    Ok(())
}

/// A browser's CORS preflight (before a `fetch` of the stream that sends `Authorization`) is
/// answered 204, naming what the stream accepts for an allowed origin and nothing for another;
/// it needs no token, as the Fetch standard sends none with it.
#[tokio::test(flavor = "multi_thread")]
async fn a_cors_preflight_of_an_allowed_origin_is_answered() -> Result<()> {
    let pg = PgCluster::shared().await;
    let opts = ServerOpts::with_db(pg, "sse-preflight")
        .env("STREAM_TOKEN", "s3cret")
        .env("ALLOWED_ORIGINS", "https://ok.example");
    let server = Server::spawn(opts).await?;
    let port = server.port();
    let preflight = |origin: &'static str| async move {
        let headers = [
            ("Origin", origin),
            ("Access-Control-Request-Method", "GET"),
            ("Access-Control-Request-Headers", "authorization"),
        ];
        http_request(port, "OPTIONS", "/stream", &headers).await
    };
    let allowed = preflight("https://ok.example").await?;
    assert_eq!(allowed.status, 204, "{allowed:?}");
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("https://ok.example")
    );
    assert_eq!(allowed.header("access-control-allow-methods"), Some("GET"));
    let headers = allowed
        .header("access-control-allow-headers")
        .unwrap_or_default();
    ensure!(
        headers.contains("authorization") && headers.contains("last-event-id"),
        "{allowed:?}"
    );
    let other = preflight("https://evil.example").await?;
    assert_eq!(other.status, 204, "{other:?}");
    assert_eq!(other.header("access-control-allow-origin"), None);
    assert_eq!(other.header("access-control-allow-headers"), None);
    Ok(())
}

/// SSE clients count against MaxClients with websocket clients, and are refused the same way.
#[tokio::test(flavor = "multi_thread")]
async fn max_clients_counts_event_streams_too() -> Result<()> {
    let pg = PgCluster::shared().await;
    let server = Server::spawn(ServerOpts::with_db(pg, "sse-max").env("MAX_CLIENTS", "1")).await?;
    let port = server.port();
    let first = sse_connect(port, "/stream", &[]).await?;
    server.wait_for_clients(1).await?;
    assert_refused(
        &sse_request(port, "/stream", &[]).await?,
        503,
        "too many clients",
    );
    ensure!(
        ws_connect(port, "/stream").await.is_err(),
        "the websocket is refused too"
    );
    drop(first);
    server.wait_for_clients(0).await?;
    let _ws = ws_connect(port, "/stream").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_last_event_id_or_since_is_400_naming_it() -> Result<()> {
    let pg = PgCluster::shared().await;
    let server = Server::spawn(ServerOpts::with_db(pg, "sse-400")).await?;
    let port = server.port();
    let header = sse_request(port, "/stream", &[("Last-Event-ID", "nope")]).await?;
    assert_refused(&header, 400, "Last-Event-ID=\"nope\" is not a position");
    let query = sse_request(port, "/stream?since=nope", &[]).await?;
    assert_refused(&query, 400, "since=\"nope\" is not a position");
    // Without the event-stream Accept, a plain GET is told what to send.
    let plain = http_request(port, "GET", "/stream", &[]).await?;
    assert_refused(&plain, 400, "Accept: text/event-stream");
    assert_eq!(
        server
            .metric("vulcan_stream_clients_rejected_total")
            .await?,
        3.0
    );
    Ok(())
}

/// An SSE client that stops reading while much is published is closed as too slow (its queue
/// is 4 frames); the server goes on serving.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_event_stream_reader_is_closed() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "sse-slow";
    let server = Server::spawn(ServerOpts::with_db(pg, channel).env("CLIENT_QUEUE", "4")).await?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut stuck = socket
        .connect(([127, 0, 0, 1], server.port()).into())
        .await?;
    stuck
        .write_all(b"GET /stream HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        .await?;
    server.wait_for_clients(1).await?;

    // 2,000 messages of 4 kB in one transaction (distinct: PostgreSQL folds identical ones).
    const COUNT: usize = 2000;
    pg.client()
        .await?
        .execute(
            "SELECT pg_notify($1, json_build_object('action', 'bulk', 'seq', i, \
             'pad', repeat('x', 4000))::text) FROM generate_series(1, 2000) AS i",
            &[&channel],
        )
        .await?;
    server.wait_slow_disconnects(1).await?;
    server.wait_for_clients(0).await?;
    let (received, _) = read_until_closed(&mut stuck, TIMEOUT).await?;
    let text = String::from_utf8_lossy(&received);
    assert!(
        text.starts_with("HTTP/1.1 200 OK\r\n"),
        "{:?}",
        &text[..text.len().min(200)]
    );
    assert!(
        received.len() < COUNT * 4000,
        "it got only part of the burst: {} bytes",
        received.len()
    );

    // Once the burst is through, a new client gets what comes next.
    server
        .wait_metric(
            "vulcan_stream_notifications_forwarded_total",
            TIMEOUT,
            |v| v >= COUNT as f64,
        )
        .await?;
    let mut fresh = sse_connect(server.port(), "/stream", &[]).await?;
    server.wait_for_clients(1).await?;
    pg.notify(channel, r#"{"action":"after"}"#).await?;
    assert_eq!(sse_event(&mut fresh).await?.data, r#"{"action":"after"}"#);
    Ok(())
}

/// Every plain HTTP request is the only one on its connection (keep-alive is off), so that an
/// event-stream request is always the first request of a connection.
#[tokio::test(flavor = "multi_thread")]
async fn plain_requests_close_their_connection_after_one_answer() -> Result<()> {
    let pg = PgCluster::shared().await;
    let server = Server::spawn(ServerOpts::with_db(pg, "sse-one-request")).await?;
    let mut conn = TcpStream::connect(("127.0.0.1", server.port())).await?;
    let request = "GET /status HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n";
    let sse = "GET /stream HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n";
    conn.write_all(format!("{request}{sse}").as_bytes()).await?;
    let (received, _) = read_until_closed(&mut conn, TIMEOUT).await?;
    let text = String::from_utf8_lossy(&received);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    assert!(text.contains("connection: close\r\n"), "{text}");
    Ok(())
}

/// On SIGTERM an event stream simply ends (the browser reconnects, from its last id, to
/// whichever server answers), and the server exits 0.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_event_streams() -> Result<()> {
    let pg = PgCluster::shared().await;
    let mut server = Server::spawn(ServerOpts::with_db(pg, "sse-sigterm")).await?;
    let mut stream = sse_connect(server.port(), "/stream", &[]).await?;
    server.wait_for_clients(1).await?;
    let signalled = Instant::now();
    server.signal(libc::SIGTERM)?;
    loop {
        match tokio::time::timeout(TIMEOUT, stream.next()).await {
            Ok(Ok(Some(_))) => {}
            Ok(_) => break,
            Err(_) => bail!("the event stream is still open {TIMEOUT:?} after SIGTERM"),
        }
    }
    let status = server.wait_exit(TIMEOUT).await?;
    assert_eq!(status.code(), Some(0));
    assert!(signalled.elapsed() < Duration::from_secs(5));
    Ok(())
}

/// Opens `count` idle clients (each after the previous one's answer) with `open`; returns the
/// server's RSS growth per client in KiB.
async fn rss_per_client<F, Fut, C>(server: &Server, count: usize, open: F) -> Result<(f64, Vec<C>)>
where
    F: Fn(u16) -> Fut,
    Fut: std::future::Future<Output = Result<C>>,
{
    let (before, _) = server.memory_kib()?;
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count {
        clients.push(open(server.port()).await?);
    }
    server.wait_for_clients(count as u64).await?;
    let (after, _) = server.memory_kib()?;
    Ok(((after as f64 - before as f64) / count as f64, clients))
}

/// An idle SSE client costs no more server memory than an idle websocket client: no buffer of
/// its own beyond the websocket task's (the request head is read into memory only while it is
/// served). Measured on two fresh servers, 1,000 clients each.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_event_stream_costs_no_more_than_an_idle_websocket() -> Result<()> {
    const CLIENTS: usize = 1000;
    crate::harness::ensure_open_files(2 * CLIENTS as u64 + 1024)?;
    let pg = PgCluster::shared().await;
    // Quiet clients: no heartbeat, and the raw websockets are not dropped for silence.
    let opts = |channel| {
        ServerOpts::with_db(pg, channel)
            .env("PING_INTERVAL", "3600")
            .env("PONG_TIMEOUT", "3600")
    };
    let ws_server = Server::spawn(opts("sse-memory-ws")).await?;
    let (ws, _ws_clients) = rss_per_client(&ws_server, CLIENTS, |port| async move {
        crate::harness::RawWs::connect(port).await
    })
    .await?;
    let sse_server = Server::spawn(opts("sse-memory-sse")).await?;
    let (sse, _sse_clients) = rss_per_client(&sse_server, CLIENTS, |port| async move {
        sse_connect(port, "/stream", &[]).await
    })
    .await?;
    eprintln!("idle server RSS per client: websocket {ws:.2} KiB, event stream {sse:.2} KiB");
    assert!(
        sse <= ws * 1.1 + 0.5,
        "an idle event stream costs {sse:.2} KiB, an idle websocket {ws:.2} KiB"
    );
    Ok(())
}

/// `curl -N -H 'Accept: text/event-stream'`, as the README shows it: the raw lines, one `data:`
/// line per line of the payload.
#[tokio::test(flavor = "multi_thread")]
async fn curl_reads_the_stream() -> Result<()> {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: curl is not installed; the curl check did not run");
        return Ok(());
    }
    let pg = PgCluster::shared().await;
    let channel = "sse-curl";
    let server = Server::spawn(ServerOpts::with_db(pg, channel)).await?;
    let url = format!("http://127.0.0.1:{}/stream", server.port());
    let mut curl = tokio::process::Command::new("curl")
        .args(["-sN", "-H", "Accept: text/event-stream", &url])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawn curl")?;
    let mut lines = BufReader::new(curl.stdout.take().context("stdout")?).lines();
    let mut next_line = async || -> Result<String> {
        tokio::time::timeout(TIMEOUT, lines.next_line())
            .await
            .context("no line from curl")??
            .context("curl ended")
    };
    assert_eq!(next_line().await?, "retry: 2000");
    assert_eq!(next_line().await?, "");
    server.wait_for_clients(1).await?;
    pg.notify(channel, MULTILINE).await?;
    let mut event = Vec::new();
    loop {
        let line = next_line().await?;
        // A heartbeat (a comment, then the blank line that ends it) may come first.
        if line.starts_with(':') {
            continue;
        }
        if line.is_empty() {
            if event.is_empty() {
                continue;
            }
            break;
        }
        event.push(line);
    }
    let expected_id = format!("id: {}", head(&server).await?);
    let mut expected = vec![expected_id];
    expected.extend(MULTILINE.lines().map(|line| format!("data: {line}")));
    assert_eq!(event, expected);
    curl.kill().await?;
    Ok(())
}
