//! Hostile input: malformed upgrades, huge headers, frame floods, oversized frames, slow and
//! silent connections, thousands of idle connections. After each, the server still answers
//! `/status` and a NOTIFY still reaches a well-behaved client.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures::{StreamExt, TryStreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{
    Ending, OP_CLOSE, OP_TEXT, PING, PgCluster, RawWs, Server, ServerOpts, TIMEOUT, Ws,
    accept_queue_on_port, client_frame, client_frame_head, ensure_open_files, established_on_port,
    http_request, next_event, next_event_within, read_until_closed, upgrade_request, ws_connect,
};

/// The server still works: `/status` answers, a new client connects, and it and `ws` (a client
/// that was connected throughout) receive a NOTIFY.
async fn assert_still_serving(
    server: &Server,
    pg: &PgCluster,
    channel: &str,
    ws: &mut Ws,
) -> Result<()> {
    let status = server.status().await.context("/status after the attack")?;
    assert_eq!(status["status"], "ok", "{status}");
    let mut fresh = server.ws().await.context("a new client after the attack")?;
    let payload = format!(r#"{{"action":"still-serving","channel":"{channel}"}}"#);
    pg.notify(channel, &payload).await?;
    assert_eq!(
        next_event(ws).await?,
        payload,
        "the client connected throughout"
    );
    assert_eq!(next_event(&mut fresh).await?, payload, "a new client");
    Ok(())
}

/// A server and one well-behaved client.
async fn server_and_client(opts: ServerOpts) -> Result<(Server, Ws)> {
    let server = Server::spawn(opts).await?;
    let ws = server.ws().await?;
    server.wait_for_clients(1).await?;
    Ok((server, ws))
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_upgrades_are_refused() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "hostile-malformed";
    let (server, mut ws) = server_and_client(ServerOpts::with_db(pg, channel)).await?;
    let base = [("Connection", "Upgrade"), ("Upgrade", "websocket")];
    let version_13 = ("Sec-WebSocket-Version", "13");
    let good_key = ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==");
    type Headers<'a> = Vec<(&'a str, &'a str)>;
    let cases: [(&str, Headers, u16); 5] = [
        ("missing Sec-WebSocket-Key", vec![version_13], 400),
        (
            "invalid Sec-WebSocket-Key",
            vec![version_13, ("Sec-WebSocket-Key", "not base64!")],
            400,
        ),
        (
            "empty Sec-WebSocket-Key",
            vec![version_13, ("Sec-WebSocket-Key", "")],
            400,
        ),
        (
            "Sec-WebSocket-Version: 8",
            vec![("Sec-WebSocket-Version", "8"), good_key],
            426,
        ),
        ("missing Sec-WebSocket-Version", vec![good_key], 426),
    ];
    for (what, extra, expected) in cases {
        let headers: Vec<(&str, &str)> = base.iter().copied().chain(extra).collect();
        let resp = http_request(server.port(), "GET", "/stream", &headers).await?;
        assert_eq!(resp.status, expected, "{what}: {resp:?}");
        if expected == 426 {
            assert_eq!(
                resp.header("sec-websocket-version"),
                Some("13"),
                "{what}: 426 names the supported version: {resp:?}"
            );
        }
    }
    assert_eq!(
        server.status().await?["clients"],
        1,
        "no refused client joined"
    );
    assert_still_serving(&server, pg, channel, &mut ws).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_40_kb_header_gets_431() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "hostile-big-header";
    let (server, mut ws) = server_and_client(ServerOpts::with_db(pg, channel)).await?;
    let request = format!(
        "GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(40 * 1024)
    );
    let mut stream = TcpStream::connect(("127.0.0.1", server.port())).await?;
    // The server may answer and close before it has read everything: a failed write is fine.
    let _ = stream.write_all(request.as_bytes()).await;
    let (answer, _) = read_until_closed(&mut stream, TIMEOUT).await?;
    let head = String::from_utf8_lossy(&answer);
    assert!(
        head.starts_with("HTTP/1.1 431"),
        "expected 431, got {:?}",
        head.lines().next()
    );
    assert_still_serving(&server, pg, channel, &mut ws).await
}

/// Invalid text, an invalid close code, a close reason that is not UTF-8 each get the close
/// code RFC 6455 names, and a valid close its echo; each time the server then ends the TCP
/// connection itself with a FIN, at once, although the client does not answer the server's
/// close and the next ping is a minute away. Each client has sent more after the frame that
/// ends its session (as a client failed mid-message has): left unread, that would have the
/// kernel answer with a reset rather than a FIN when the server closes the socket.
#[tokio::test(flavor = "multi_thread")]
async fn protocol_errors_and_closes_end_with_the_right_code_and_the_server_hanging_up() -> Result<()>
{
    /// The server's FIN follows its close frame at once; this leaves room for a loaded machine.
    const HANG_UP_BOUND: Duration = Duration::from_secs(1);
    let pg = PgCluster::shared().await;
    let channel = "hostile-close-codes";
    let opts = ServerOpts::with_db(pg, channel).env("PING_INTERVAL", 60);
    let (server, mut ws) = server_and_client(opts).await?;
    let close = |code: u16, reason: &[u8]| {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason);
        client_frame(OP_CLOSE, &payload)
    };
    let cases = [
        (
            "text that is not UTF-8",
            client_frame(OP_TEXT, b"caf\xc3\x28"),
            1007,
        ),
        ("close code 1005", close(1005, b""), 1002),
        ("close code 2999", close(2999, b""), 1002),
        (
            "a close reason that is not UTF-8",
            close(1000, b"\xed\xa0\x80"),
            1007,
        ),
        ("a valid close", close(3000, "au revoir".as_bytes()), 3000),
    ];
    for (what, frame, expected) in cases {
        let mut raw = RawWs::connect(server.port()).await?;
        // Once it has received a batch, a fan-out thread holds the client until its next one:
        // the connection must end without waiting for that.
        let payload = format!(r#"{{"action":"before","case":"{what}"}}"#);
        pg.notify(channel, &payload).await?;
        assert_eq!(next_event(&mut ws).await?, payload);
        let frame_in = tokio::time::timeout(TIMEOUT, raw.next_data_frame()).await;
        let received = frame_in
            .context("the notification")??
            .context("closed early")?;
        assert_eq!(received.payload, payload.as_bytes(), "{what}");
        let mut sent = frame;
        sent.extend(client_frame(OP_TEXT, &[b'x'; 1000]));
        raw.stream.write_all(&sent).await?;
        let (ending, _) = raw.read_to_end(TIMEOUT).await.context(what)?;
        assert_eq!(ending, Ending::Close(Some(expected)), "{what}");
        let closed = Instant::now();
        let after = tokio::time::timeout(TIMEOUT, raw.next_frame())
            .await
            .with_context(|| format!("{what}: the connection stays open"))?;
        assert!(
            matches!(after, Ok(None)),
            "{what}: expected the server's FIN, got {after:?}"
        );
        let took = closed.elapsed();
        assert!(took < HANG_UP_BOUND, "{what}: FIN {took:?} after the close");
    }
    assert_still_serving(&server, pg, channel, &mut ws).await
}

/// A client that sends the same burst of frames over and over as fast as it can, from a thread
/// of its own with blocking writes: an attacker independent of the test's runtime (which a task
/// that never waits could starve).
struct Flood {
    stop: Arc<AtomicBool>,
    sent: watch::Receiver<u64>,
    thread: std::thread::JoinHandle<Result<u64>>,
}

impl Flood {
    /// Starts flooding `burst` on `stream`, an upgraded websocket connection.
    fn start(stream: RawWs, burst: Vec<u8>) -> Result<Flood> {
        let RawWs { stream, .. } = stream;
        let mut stream = stream.into_std()?;
        stream.set_nonblocking(false)?;
        // A server that stops reading must not hang the thread (and the test) for good.
        stream.set_write_timeout(Some(Duration::from_secs(2)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (sent_tx, sent) = watch::channel(0u64);
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    std::io::Write::write_all(&mut stream, &burst)?;
                    sent += burst.len() as u64;
                    sent_tx.send_replace(sent);
                }
                Ok(sent)
            }
        });
        Ok(Flood { stop, sent, thread })
    }

    /// Returns once the first burst is out.
    async fn started(&mut self) -> Result<()> {
        self.sent.wait_for(|&sent| sent > 0).await?;
        Ok(())
    }

    fn sent(&self) -> u64 {
        *self.sent.borrow()
    }

    /// Whether the flood goes on (it ends early when a write fails or times out).
    fn running(&self) -> bool {
        !self.thread.is_finished()
    }

    /// Stops the flood; returns how many bytes it sent, or why it ended early.
    async fn stop(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || self.thread.join())
            .await?
            .map_err(|_| anyhow::anyhow!("flood thread panicked"))?
    }
}

/// 64 text frames of 1 kB.
fn text_burst() -> Vec<u8> {
    (0..64)
        .flat_map(|i| client_frame(OP_TEXT, format!("{i:>1000}").as_bytes()))
        .collect()
}

/// A client sending text frames as fast as it can does not slow delivery to others nor the HTTP
/// side, and the server's memory does not grow with what it is sent. (`readable()` always
/// resolves at once for such a client; a task that did not spend tokio's cooperative budget
/// would keep its worker, and the receiver or accept loop queued on it, to itself.)
#[tokio::test(flavor = "multi_thread")]
async fn frame_flood_does_not_stop_others_from_receiving() -> Result<()> {
    /// At least this much is flooded while notifications are being checked.
    const FLOOD_BYTES: u64 = 16 << 20;
    /// A stall lasts as long as the flood, which goes on while we wait: a bound of seconds
    /// catches it and leaves room for a loaded 2-core machine (about 1 s seen at worst).
    const ROUND_BOUND: Duration = Duration::from_secs(5);
    let pg = PgCluster::shared().await;
    let channel = "hostile-flood";
    let (server, mut ws) = server_and_client(ServerOpts::with_db(pg, channel)).await?;
    let flooder = RawWs::connect(server.port()).await?;
    server.wait_for_clients(2).await?;
    let (rss_before, _) = server.memory_kib()?;
    let mut flood = Flood::start(flooder, text_burst())?;
    flood.started().await?;

    let db = pg.client().await?;
    let mut worst = Duration::ZERO;
    let mut i = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while i < 20 || flood.sent() < FLOOD_BYTES {
        ensure!(
            Instant::now() < deadline,
            "flood too slow: {} bytes",
            flood.sent()
        );
        let payload = format!(r#"{{"action":"during-flood","seq":{i}}}"#);
        let sent = Instant::now();
        crate::harness::notify(&db, channel, &payload).await?;
        let got = next_event_within(&mut ws, ROUND_BOUND)
            .await
            .with_context(|| format!("notification {i} during the flood"))?;
        assert_eq!(got, payload);
        let status = tokio::time::timeout(ROUND_BOUND, server.status())
            .await
            .with_context(|| format!("/status unanswered during the flood (round {i})"))?;
        assert_eq!(status?["status"], "ok");
        worst = worst.max(sent.elapsed());
        i += 1;
    }
    let flooded = flood.stop().await?;
    let (rss_after, _) = server.memory_kib()?;
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB while {flooded} bytes were flooded"
    );
    eprintln!(
        "flood of {} MiB: {i} notifications and /status requests, worst round trip {worst:?}; \
         RSS {rss_before} -> {rss_after} KiB",
        flooded >> 20
    );
    assert_still_serving(&server, pg, channel, &mut ws).await
}

/// SIGTERM while a client floods: the well-behaved client gets its 1001 and the process exits
/// within the grace period (5 s), although the flooding client's task always has input.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_frame_flood_exits_within_5_s() -> Result<()> {
    let pg = PgCluster::shared().await;
    let (mut server, mut ws) =
        server_and_client(ServerOpts::with_db(pg, "hostile-flood-sigterm")).await?;
    let flooder = RawWs::connect(server.port()).await?;
    server.wait_for_clients(2).await?;
    let mut flood = Flood::start(flooder, text_burst())?;
    flood.started().await?;
    let signalled = Instant::now();
    server.signal(libc::SIGTERM)?;
    let exited = server.wait_exit(Duration::from_secs(15)).await;
    let took = signalled.elapsed();
    // The flood ends with the server (its writes fail), or here.
    let _ = flood.stop().await;
    let status = exited?;
    assert!(
        took < Duration::from_secs(5),
        "exited {took:?} after SIGTERM"
    );
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let frame = crate::harness::next_close(&mut ws)
        .await?
        .context("close frame without a code")?;
    assert_eq!(u16::from(frame.code), 1001, "{frame:?}");
    Ok(())
}

/// A client that floods pings carrying 125 bytes (the most a control frame may) and never reads
/// what the server sends: the server owes it at most one pong at a time (RFC 6455 §5.5.3 lets
/// it answer only the most recent ping), so its memory does not grow with the pings it is sent.
/// Each ping used to queue a pong without bound: RSS went from 11 MB to 1.4 GB in 5 s.
#[tokio::test(flavor = "multi_thread")]
async fn ping_flood_without_reading_does_not_grow_memory() -> Result<()> {
    /// The flood ends after this much, or after `FLOOD_TIME`, whichever comes first.
    const FLOOD_BYTES: u64 = 200 << 20;
    const FLOOD_TIME: Duration = Duration::from_secs(5);
    /// How much RSS may grow: room for the allocator and the sockets' buffers, far below what
    /// one pong per ping costs (about 200 kB per 1,000 pings).
    const GROWTH_KIB: u64 = 10 * 1024;
    const OP_PING: u8 = 0x9;
    let pg = PgCluster::shared().await;
    let channel = "hostile-ping-flood";
    // No heartbeat and no server pings meanwhile: nothing but the flood reaches the fan-out.
    let opts = ServerOpts::with_db(pg, channel).env("PING_INTERVAL", 3600);
    let (server, mut ws) = server_and_client(opts).await?;
    let flooder = RawWs::connect(server.port()).await?;
    server.wait_for_clients(2).await?;
    let (rss_before, _) = server.memory_kib()?;
    let ping = client_frame(OP_PING, &[b'p'; 125]);
    let mut flood = Flood::start(flooder, ping.repeat(512))?;
    flood.started().await?;

    // RSS is sampled while the flood goes on, so that memory freed at the end does not hide
    // what was held meanwhile.
    let started = Instant::now();
    let mut rss_most = rss_before;
    while flood.sent() < FLOOD_BYTES && started.elapsed() < FLOOD_TIME && flood.running() {
        rss_most = rss_most.max(server.memory_kib()?.0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let flood_time = started.elapsed();
    let sent = flood.sent();
    // A write that timed out means the server stopped reading for a while (its buffers full),
    // which it may do; any other failure is the test's own.
    if let Err(err) = flood.stop().await {
        let timed_out = err.downcast_ref::<std::io::Error>().is_some_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )
        });
        ensure!(timed_out, "ping flood: {err:#}");
    }
    let (rss_after, _) = server.memory_kib()?;
    rss_most = rss_most.max(rss_after);
    eprintln!(
        "ping flood: {} MiB ({} pings) in {flood_time:?}; RSS {rss_before} KiB before, at most \
         {rss_most} KiB during, {rss_after} KiB after",
        sent >> 20,
        sent / ping.len() as u64
    );
    ensure!(
        sent >= 16 << 20,
        "only {sent} bytes of pings went out in {flood_time:?}"
    );
    assert!(
        rss_most < rss_before + GROWTH_KIB,
        "RSS grew from {rss_before} KiB to {rss_most} KiB while {sent} bytes of pings came in"
    );
    assert_still_serving(&server, pg, channel, &mut ws).await
}

/// A single frame of 10 MB (MaxFrameSize is 64 KiB) closes that connection; the server neither
/// buffers it nor stops serving.
#[tokio::test(flavor = "multi_thread")]
async fn ten_megabyte_frame_closes_the_connection() -> Result<()> {
    const SIZE: usize = 10 << 20;
    let pg = PgCluster::shared().await;
    let channel = "hostile-big-frame";
    let (server, mut ws) = server_and_client(ServerOpts::with_db(pg, channel)).await?;
    let mut raw = RawWs::connect(server.port()).await?;
    server.wait_for_clients(2).await?;
    let (_, peak_before) = server.memory_kib()?;

    let (mut rd, mut wr) = raw.stream.split();
    let write = async {
        // The head announces 10 MB; the payload follows in chunks until the server hangs up.
        let mut sent = 0;
        if wr
            .write_all(&client_frame_head(OP_TEXT, SIZE as u64))
            .await
            .is_ok()
        {
            let chunk = vec![0u8; 64 * 1024];
            while sent < SIZE && wr.write_all(&chunk).await.is_ok() {
                sent += chunk.len();
            }
        }
        sent
    };
    let started = Instant::now();
    let (sent, closed) = tokio::join!(write, read_until_closed(&mut rd, TIMEOUT));
    let (_, ending) = closed.context("the connection that sent 10 MB stays open")?;
    let took = started.elapsed();
    server.wait_for_clients(1).await?;
    let (_, peak_after) = server.memory_kib()?;
    assert!(
        peak_after < peak_before + 8 * 1024,
        "peak RSS grew from {peak_before} KiB to {peak_after} KiB: the frame was buffered"
    );
    eprintln!(
        "10 MB frame: connection ended ({ending:?}) after {took:?}, {sent} payload bytes \
         written; peak RSS {peak_before} -> {peak_after} KiB"
    );
    assert_still_serving(&server, pg, channel, &mut ws).await
}

/// Opens a connection that sends nothing: returns when the server closes it, how long that
/// took and what the server sent first.
async fn silent_connection(port: u16) -> Result<(Duration, Vec<u8>)> {
    let opened = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let (received, _) = read_until_closed(&mut stream, Duration::from_secs(10))
        .await
        .context("silent connection")?;
    Ok((opened.elapsed(), received))
}

/// Opens a connection that sends a valid upgrade request one byte every 500 ms: returns when
/// the server closes it and how long that took; an error if the server takes the whole request.
async fn trickling_connection(port: u16) -> Result<Duration> {
    let request = upgrade_request(port).into_bytes();
    let opened = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut rd, mut wr) = stream.split();
    let trickle = async {
        let mut sent = 0;
        for byte in &request {
            if wr.write_all(std::slice::from_ref(byte)).await.is_err() {
                break;
            }
            sent += 1;
            // The attack itself: one byte every 500 ms.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        sent
    };
    // The trickle would take request.len() / 2 s; the server must hang up long before.
    tokio::select! {
        closed = read_until_closed(&mut rd, Duration::from_secs(10)) => {
            closed.context("byte-by-byte connection")?;
            Ok(opened.elapsed())
        }
        sent = trickle => anyhow::bail!("the server took all {sent} bytes, one per 500 ms"),
    }
}

/// A connection that sends nothing and one that sends its request head one byte every 500 ms
/// are both dropped at the handshake timeout (2 s here), not before the timeout and not later.
#[tokio::test(flavor = "multi_thread")]
async fn silent_and_byte_by_byte_request_heads_are_dropped_after_the_handshake_timeout()
-> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "hostile-slow-head";
    let opts = ServerOpts::with_db(pg, channel).env("HANDSHAKE_TIMEOUT", "2");
    let (server, mut ws) = server_and_client(opts).await?;
    let (silent, trickling) = while_reading(&mut ws, async {
        tokio::join!(
            silent_connection(server.port()),
            trickling_connection(server.port())
        )
    })
    .await?;
    let ((silent, received), trickling) = (silent?, trickling?);
    for (what, took) in [("silent", silent), ("byte-by-byte", trickling)] {
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
            "{what} connection closed after {took:?} (HandshakeTimeout 2 s)"
        );
    }
    eprintln!(
        "silent connection closed after {silent:?} (it received {:?}); byte-by-byte request \
         head dropped after {trickling:?}",
        String::from_utf8_lossy(&received)
    );
    assert_still_serving(&server, pg, channel, &mut ws).await
}

/// Runs `work` while reading `ws`, so that the client answers the server's pings meanwhile;
/// anything but a heartbeat or a ping on `ws` is an error.
async fn while_reading<T>(ws: &mut Ws, work: impl std::future::Future<Output = T>) -> Result<T> {
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return Ok(done),
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) if text.as_str() == PING => {}
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => anyhow::bail!("unexpected on the well-behaved client: {other:?}"),
            },
        }
    }
}

/// 2,000 TCP connections that never send a byte, opened as fast as the listen backlog allows:
/// a client connected throughout keeps receiving, new clients are served, and the server lets
/// go of every idle connection at the handshake timeout (the default, 10 s: opening them can
/// take seconds on a loaded machine, and all of them must be open at the same time).
#[tokio::test(flavor = "multi_thread")]
async fn two_thousand_idle_connections_do_not_disturb_clients() -> Result<()> {
    const IDLE: usize = 2000;
    const HANDSHAKE_TIMEOUT: u64 = 10;
    /// Connection attempts in flight at once. More than the listen backlog (128, the tokio
    /// default) would overflow it: the kernel then answers with SYN cookies, and an idle client
    /// whose final ACK found the accept queue full believes it is connected while the server
    /// never hears of it. Real clients send their request at once, which repairs that.
    const IN_FLIGHT: usize = 64;
    ensure_open_files(IDLE as u64 + 1024)?;
    let pg = PgCluster::shared().await;
    let channel = "hostile-idle";
    let (server, mut ws) = server_and_client(ServerOpts::with_db(pg, channel)).await?;
    let (rss_before, _) = server.memory_kib()?;
    let port = server.port();

    let started = Instant::now();
    let opening = tokio::spawn(async move {
        let idle: Vec<TcpStream> = futures::stream::iter(0..IDLE)
            .map(|_| TcpStream::connect(("127.0.0.1", port)))
            .buffer_unordered(IN_FLIGHT)
            .try_collect()
            .await?;
        // Every one of them reaches the server: established, and none left in the queue.
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let (established, queued) = (established_on_port(port)?, accept_queue_on_port(port)?);
            if established >= IDLE && queued == 0 {
                return anyhow::Ok((idle, established));
            }
            ensure!(
                Instant::now() < deadline,
                "{established} of {IDLE} connections established on the server side, {queued} \
                 not accepted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    // Delivery goes on while the connections pile in.
    let db = pg.client().await?;
    for i in 0..20 {
        let payload = format!(r#"{{"action":"during-connect-storm","seq":{i}}}"#);
        crate::harness::notify(&db, channel, &payload).await?;
        assert_eq!(
            next_event_within(&mut ws, Duration::from_secs(5)).await?,
            payload
        );
    }
    let (idle, held) = opening.await?.context("open the idle connections")?;
    let opened = started.elapsed();
    let (rss_during, _) = server.memory_kib()?;
    assert_still_serving(&server, pg, channel, &mut ws).await?;

    // The server lets go of all of them: only the websocket client stays established.
    let released = while_reading(&mut ws, async {
        let deadline = Instant::now() + Duration::from_secs(HANDSHAKE_TIMEOUT + 5);
        loop {
            let left = established_on_port(port)?;
            if left <= 1 {
                return Ok(started.elapsed());
            }
            ensure!(
                Instant::now() < deadline,
                "{left} connections still established {:?} after opening",
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await??;
    eprintln!(
        "{IDLE} idle connections opened in {opened:?}, {held} held by the server at once; RSS \
         {rss_before} -> {rss_during} KiB; all released {released:?} after the first connect"
    );
    drop(idle);
    assert_still_serving(&server, pg, channel, &mut ws).await
}

/// 1,000 clients leave, half with a close handshake and half by dropping the connection: the
/// server closes every one of their sockets at once, with no traffic at all afterwards. A fan-out
/// thread rebuilds its list of members only when a batch arrives; that list used to hold each
/// departed client's socket open until then (up to a PingInterval when the channel is quiet).
#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_clients_that_leave_release_their_descriptors_at_once() -> Result<()> {
    const CLIENTS: usize = 1000;
    /// Handshakes in flight at once: below the listen backlog (see the idle-connections test).
    const IN_FLIGHT: usize = 64;
    /// Failure guard: the descriptors are normally back within milliseconds of the last leave.
    const RELEASE_BOUND: Duration = Duration::from_secs(5);
    ensure_open_files(CLIENTS as u64 + 1024)?;
    let pg = PgCluster::shared().await;
    let channel = "hostile-leave";
    // No heartbeat: after the one notification below, nothing wakes the fan-out threads.
    let opts = ServerOpts::with_db(pg, channel).env("PING_INTERVAL", 3600);
    let server = Server::spawn(opts).await?;
    let port = server.port();
    let baseline = server.open_fds()?;

    let mut clients: Vec<Ws> = futures::stream::iter(0..CLIENTS)
        .map(|_| ws_connect(port, "/stream"))
        .buffer_unordered(IN_FLIGHT)
        .try_collect()
        .await?;
    server.wait_for_clients(CLIENTS as u64).await?;
    let connected = server.open_fds()?;
    // The baseline may still count the connection of the last readiness probe, which the
    // server closes as soon as it notices the probe's end.
    ensure!(
        connected + 1 >= baseline + CLIENTS,
        "{connected} descriptors open with {CLIENTS} clients, {baseline} before"
    );
    // One notification, read by every client: every fan-out thread has then listed them all.
    let payload = format!(r#"{{"action":"before-leaving","channel":"{channel}"}}"#);
    pg.notify(channel, &payload).await?;
    futures::future::try_join_all(clients.iter_mut().map(|ws| async {
        let got = next_event(ws).await?;
        ensure!(got == payload, "got {got:?}");
        anyhow::Ok(())
    }))
    .await?;

    let dropped = clients.split_off(CLIENTS / 2);
    drop(dropped);
    futures::stream::iter(clients)
        .map(|mut ws| async move {
            ws.close(None).await.context("send a close")?;
            // Until the server's echo (or the end of the stream); then the client lets go.
            tokio::time::timeout(TIMEOUT, async {
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        break;
                    }
                }
            })
            .await
            .context("close handshake: no echo")
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    let left = Instant::now();
    server.wait_for_clients(0).await?;

    let deadline = left + RELEASE_BOUND;
    let mut open = server.open_fds()?;
    while open > baseline {
        ensure!(
            Instant::now() < deadline,
            "{open} descriptors still open {RELEASE_BOUND:?} after {CLIENTS} clients left \
             ({baseline} before they connected, {connected} with them)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        open = server.open_fds()?;
    }
    eprintln!(
        "{CLIENTS} clients: {baseline} descriptors before, {connected} connected, {open} within \
         {:?} of the last leave",
        left.elapsed()
    );
    Ok(())
}

/// A client that stops reading is closed as too slow, and its descriptor is free within a
/// second of that, with no traffic at all afterwards: its close frame cannot be written into a
/// full socket, and the server does not wait for a client that does not read.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_closed_as_too_slow_releases_its_descriptor_within_a_second() -> Result<()> {
    const RELEASE_BOUND: Duration = Duration::from_secs(1);
    let pg = PgCluster::shared().await;
    let channel = "hostile-kicked";
    let opts = ServerOpts::with_db(pg, channel)
        .env("CLIENT_QUEUE", 16)
        .env("PING_INTERVAL", 3600);
    let server = Server::spawn(opts).await?;
    let baseline = server.open_fds()?;
    let _stuck = RawWs::connect_with_recv_buffer(server.port(), 4096).await?;
    server.wait_for_clients(1).await?;

    // 20,000 messages of about 1 kB: far more than the socket buffers (the server's may grow to
    // a few MB) and 16 queued frames hold.
    let db = pg.client().await?;
    db.execute(
        "SELECT pg_notify($1, json_build_object('action', 'fill', 'seq', i, \
         'pad', repeat('x', 1000))::text) FROM generate_series(1, 20000) i",
        &[&channel],
    )
    .await?;
    server.wait_slow_disconnects(1).await?;
    let kicked = Instant::now();
    let mut open = server.open_fds()?;
    while open > baseline {
        ensure!(
            kicked.elapsed() < RELEASE_BOUND,
            "{open} descriptors open {RELEASE_BOUND:?} after the slow client was closed \
             ({baseline} before it connected)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        open = server.open_fds()?;
    }
    eprintln!(
        "slow client's descriptor released within {:?} of its close being counted",
        kicked.elapsed()
    );
    Ok(())
}
