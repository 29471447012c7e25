//! Operating the service: readiness while the database comes up, exact metrics, client limits
//! (MaxClients, open files, MaxFrameSize), the stream token and allowed origins.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{
    HttpResponse, PgCluster, Server, ServerOpts, TIMEOUT, Ws, free_port, http_get, metric_value,
    next_event, next_event_within, notify, raise_own_open_files_limit, upgrade, ws_connect,
    ws_connect_with,
};

/// Every client in `clients` receives `payload` next (pings aside).
async fn all_receive(clients: &mut [Ws], payload: &str) -> Result<()> {
    let reads = clients.iter_mut().enumerate().map(|(i, ws)| async move {
        let got = next_event(ws)
            .await
            .with_context(|| format!("client {i}"))?;
        ensure!(
            got == payload,
            "client {i} got {got:?}, expected {payload:?}"
        );
        Ok(())
    });
    futures::future::try_join_all(reads).await.map(drop)
}

// ---------------------------------------------------------------------------------------------
// Readiness and metrics
// ---------------------------------------------------------------------------------------------

/// The first connection after start may take a few backoff rounds.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Forwards every connection accepted on `listener` to 127.0.0.1:`target`: a database that
/// appears on `listener`'s port when the test says so.
async fn forward(listener: TcpListener, target: u16) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        tokio::spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_turns_200_when_the_database_comes_up_and_status_stays_200() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "ops-late-db";
    // Nothing listens on `port` yet: the database is unreachable.
    let port = free_port();
    let opts = ServerOpts::with_db(pg, channel)
        .env("PG_PORT", port)
        .no_wait_ready();
    let server = Server::spawn(opts).await?;
    let ready = http_get(server.port(), "/ready").await?;
    assert_eq!(
        ready.status, 503,
        "/ready with the database down: {ready:?}"
    );
    assert_eq!(server.status().await?["listener"], "connecting");
    assert_eq!(server.metric("vulcan_stream_listener_up").await?, 0.0);

    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("bind 127.0.0.1:{port} for the database"))?;
    let _database = tokio::spawn(forward(listener, pg.port()));
    // Until the listener is up, /status (liveness) answers 200 on every probe.
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        let status = http_get(server.port(), "/status").await?;
        assert_eq!(status.status, 200, "/status while connecting: {status:?}");
        let ready = http_get(server.port(), "/ready").await?;
        if ready.status == 200 {
            break;
        }
        assert_eq!(ready.status, 503, "/ready: {ready:?}");
        ensure!(
            Instant::now() < deadline,
            "/ready still {} {CONNECT_TIMEOUT:?} after the database appeared",
            ready.status
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(server.status().await?["listener"], "listening");
    assert_eq!(server.metric("vulcan_stream_listener_up").await?, 1.0);
    // The first connection is not a reconnect.
    assert_eq!(
        server
            .metric("vulcan_stream_listener_reconnects_total")
            .await?,
        0.0
    );
    let mut ws = server.ws().await?;
    server.wait_for_clients(1).await?;
    let payload = r#"{"action":"late-db"}"#;
    pg.notify(channel, payload).await?;
    assert_eq!(next_event(&mut ws).await?, payload);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_a_known_sequence_exactly() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "ops-metrics";
    let server = Server::spawn(ServerOpts::with_db(pg, channel)).await?;
    let mut clients = vec![server.ws().await?, server.ws().await?];
    server.wait_for_clients(2).await?;

    let valid = [
        r#"{"action":"m1"}"#,
        r#"{"action":"m2","check_id":null}"#,
        r#"{"action":"m3"}"#,
    ];
    let db = pg.client().await?;
    notify(&db, channel, valid[0]).await?;
    notify(&db, channel, "not json").await?;
    notify(&db, channel, valid[1]).await?;
    notify(&db, channel, r#"{"action":1}"#).await?;
    notify(&db, channel, valid[2]).await?;
    for payload in valid {
        all_receive(&mut clients, payload).await?;
    }

    let expected = [
        ("vulcan_stream_notifications_received_total", 5.0),
        ("vulcan_stream_notifications_forwarded_total", 3.0),
        ("vulcan_stream_notifications_invalid_total", 2.0),
        ("vulcan_stream_clients_connected", 2.0),
        ("vulcan_stream_clients_disconnected_slow_total", 0.0),
        ("vulcan_stream_listener_up", 1.0),
        ("vulcan_stream_listener_reconnects_total", 0.0),
    ];
    // The frames have arrived; a counter bumped after the write may lag by a moment.
    let settled = |r: &HttpResponse| {
        let text = r.text();
        expected
            .iter()
            .all(|(name, value)| metric_value(&text, name) == Some(*value))
            && metric_value(&text, "vulcan_stream_frames_sent_total").is_some_and(|v| v >= 6.0)
    };
    let resp = server
        .wait_http(settled, "/metrics", "the expected counters")
        .await;
    let resp = match resp {
        Ok(resp) => resp,
        Err(err) => {
            let text = server.metrics().await?;
            for (name, value) in expected {
                assert_eq!(metric_value(&text, name), Some(value), "{name} in:\n{text}");
            }
            return Err(err.context(format!("frames_sent_total < 6 in:\n{text}")));
        }
    };

    let text = resp.text();
    assert!(
        text.lines()
            .any(|l| l.starts_with("vulcan_stream_build_info{")
                && l.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))),
        "build_info without the version label:\n{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_in_the_format_their_content_type_declares() -> Result<()> {
    let pg = PgCluster::shared().await;
    let server = Server::spawn(ServerOpts::with_db(pg, "ops-metrics-format")).await?;
    let resp = http_get(server.port(), "/metrics").await?;
    assert_eq!(resp.status, 200, "{resp:?}");
    // Prometheus text (0.0.4) or OpenMetrics, as long as the body is what the header says.
    let content_type = resp.header("content-type").unwrap_or_default();
    let text = resp.text();
    if let Err(problems) = check_exposition(content_type, &text) {
        panic!(
            "/metrics is not what its content type {content_type:?} promises, so Prometheus \
             (which picks its parser by content type) cannot scrape it:\n{}\n--- body ---\n{text}",
            problems.join("\n")
        );
    }
    Ok(())
}

/// Checks `text` against the exposition format that `content_type` declares, as Prometheus reads
/// it: `text/plain; version=0.0.4` (Prometheus text) or `application/openmetrics-text`
/// (OpenMetrics 1.0). Returns every problem found.
fn check_exposition(content_type: &str, text: &str) -> Result<(), Vec<String>> {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let openmetrics = match media.as_str() {
        "text/plain" => false,
        "application/openmetrics-text" => true,
        _ => {
            return Err(vec![format!(
                "{content_type:?} is not a Prometheus exposition format"
            )]);
        }
    };
    let types: &[&str] = if openmetrics {
        &[
            "counter",
            "gauge",
            "histogram",
            "gaugehistogram",
            "summary",
            "info",
            "stateset",
            "unknown",
        ]
    } else {
        &["counter", "gauge", "histogram", "summary", "untyped"]
    };
    let mut problems = Vec::new();
    let mut families: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            if !types.contains(&kind) {
                problems.push(format!(
                    "invalid metric type {kind:?} for {family} ({line:?})"
                ));
            }
            families.push((family.to_owned(), kind.to_owned()));
        } else if line.is_empty() || line.starts_with('#') {
            continue;
        } else {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            // The sample names each family type allows.
            let belongs = families.iter().any(|(family, kind)| {
                let suffixes: &[&str] = match (openmetrics, kind.as_str()) {
                    (false, "histogram") => &["_bucket", "_sum", "_count"],
                    (false, "summary") => &["", "_sum", "_count"],
                    (false, _) => &[""],
                    (true, "counter") => &["_total", "_created"],
                    (true, "info") => &["_info"],
                    (true, "histogram" | "gaugehistogram") => {
                        &["_bucket", "_sum", "_count", "_gsum", "_gcount", "_created"]
                    }
                    (true, "summary") => &["", "_sum", "_count", "_created"],
                    (true, _) => &[""],
                };
                suffixes
                    .iter()
                    .any(|suffix| name == format!("{family}{suffix}"))
            });
            if !belongs {
                problems.push(format!(
                    "sample {name} has no matching # TYPE line ({line:?})"
                ));
            }
        }
    }
    if openmetrics && text.lines().last() != Some("# EOF") {
        problems.push("OpenMetrics text must end with `# EOF`".to_owned());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

#[test]
fn check_exposition_knows_both_formats() {
    let prometheus = "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n\
                      # TYPE g gauge\ng 2\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\n\
                      h_count 1\n";
    let openmetrics = "# TYPE a counter\na_total 1\n# TYPE b info\nb_info{version=\"1\"} 1\n\
                       # TYPE g gauge\ng 2\n# EOF\n";
    let text_plain = "text/plain; version=0.0.4; charset=utf-8";
    let om = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    assert_eq!(check_exposition(text_plain, prometheus), Ok(()));
    assert_eq!(check_exposition(om, openmetrics), Ok(()));
    // OpenMetrics served as Prometheus text: `info` is no type there, `a_total` is not `a`.
    let problems = check_exposition(text_plain, openmetrics).unwrap_err();
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(check_exposition(om, prometheus).is_err());
    assert!(check_exposition("application/json", prometheus).is_err());
}

// ---------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn max_clients_refuses_the_next_upgrade_with_503() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "ops-max-clients";
    let server = Server::spawn(ServerOpts::with_db(pg, channel).env("MAX_CLIENTS", 3)).await?;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(server.ws().await?);
    }
    server.wait_for_clients(3).await?;

    let refused = upgrade(server.port(), "/stream", &[]).await?;
    assert_eq!(refused.status, 503, "4th upgrade: {refused:?}");
    assert!(
        server.ws().await.is_err(),
        "a 4th websocket client was accepted"
    );
    // Nothing else degrades: the three still get what is sent, the routes answer.
    let payload = r#"{"action":"max-clients-1"}"#;
    pg.notify(channel, payload).await?;
    all_receive(&mut clients, payload).await?;
    assert_eq!(server.status().await?["clients"], 3);
    assert_eq!(http_get(server.port(), "/ready").await?.status, 200);

    // One leaves: a new one is accepted.
    let mut leaving = clients.pop().expect("three clients");
    leaving.close(None).await?;
    drop(leaving);
    server.wait_for_clients(2).await?;
    clients.push(server.ws().await?);
    server.wait_for_clients(3).await?;
    let payload = r#"{"action":"max-clients-2"}"#;
    pg.notify(channel, payload).await?;
    all_receive(&mut clients, payload).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn more_clients_than_the_default_open_files_limit() -> Result<()> {
    const SOFT: u64 = 1024;
    const CLIENTS: usize = 1100;
    // This process holds one socket per client too.
    let own = raise_own_open_files_limit()?;
    ensure!(
        own >= 2 * CLIENTS as u64 + 256,
        "open-files hard limit {own} is too low for {CLIENTS} clients in the test process \
         (raise it, e.g. `ulimit -Hn 65536`)"
    );
    let pg = PgCluster::shared().await;
    let channel = "ops-many-clients";
    let opts = ServerOpts::with_db(pg, channel).open_files_soft_limit(SOFT);
    let server = Server::spawn(opts).await?;
    let log = server.stderr();
    assert!(
        log.contains(&format!("open files limit raised from {SOFT} to ")),
        "no `open files limit raised` line:\n{log}"
    );

    let port = server.port();
    let mut clients: Vec<Ws> = futures::stream::iter(0..CLIENTS)
        .map(|i| async move {
            ws_connect(port, "/stream")
                .await
                .with_context(|| format!("client {i}"))
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    server
        .wait_http_within(
            Duration::from_secs(30),
            |r| {
                serde_json::from_slice::<serde_json::Value>(&r.body)
                    .is_ok_and(|v| v["clients"].as_u64() == Some(CLIENTS as u64))
            },
            "/status",
            &format!("\"clients\":{CLIENTS}"),
        )
        .await?;
    let payload = r#"{"action":"many-clients"}"#;
    pg.notify(channel, payload).await?;
    all_receive(&mut clients, payload).await?;
    assert_eq!(
        server.metric("vulcan_stream_clients_connected").await?,
        CLIENTS as f64
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_frame_larger_than_max_frame_size_closes_that_connection() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "ops-max-frame";
    let server =
        Server::spawn(ServerOpts::with_db(pg, channel).env("MAX_FRAME_SIZE", 1024)).await?;
    let mut big = server.ws().await?;
    let mut other = server.ws().await?;
    server.wait_for_clients(2).await?;

    // Within the limit: read and discarded, nothing happens.
    other.send(Message::text("x".repeat(1000))).await?;
    big.send(Message::text("y".repeat(4096))).await?;
    // The oversized client's connection ends: a close frame, an error or EOF, not silence.
    let ended = tokio::time::timeout(TIMEOUT, async {
        loop {
            match big.next().await {
                Some(Ok(Message::Close(frame))) => return format!("close frame {frame:?}"),
                Some(Ok(_)) => continue,
                Some(Err(err)) => return format!("error {err}"),
                None => return "EOF".to_owned(),
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "connection still open {TIMEOUT:?} after a 4096-byte frame"
    );
    server.wait_for_clients(1).await?;

    let payload = r#"{"action":"max-frame"}"#;
    pg.notify(channel, payload).await?;
    assert_eq!(next_event(&mut other).await?, payload);
    let _new = server.ws().await?;
    server.wait_for_clients(2).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Stream token and allowed origins
// ---------------------------------------------------------------------------------------------

/// With characters that need URL encoding in a query string.
const TOKEN: &str = "t0k+en/wi=th&sp?ec%ial#~";

fn url_encoded(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_token_is_required_as_bearer_or_query_parameter() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "ops-token";
    let opts = ServerOpts::with_db(pg, channel)
        .env("STREAM_TOKEN", TOKEN)
        .env("LOG_LEVEL", "debug");
    let server = Server::spawn(opts).await?;
    let port = server.port();
    let bearer = format!("Bearer {TOKEN}");
    let encoded = url_encoded(TOKEN);
    assert_ne!(encoded, TOKEN, "the token needs encoding");

    let prefix = &TOKEN[..TOKEN.len() - 1];
    let refused: Vec<(String, Option<String>)> = vec![
        ("/stream".into(), None),
        ("/stream".into(), Some(format!("Bearer {prefix}"))),
        ("/stream".into(), Some(format!("Bearer {TOKEN}x"))),
        ("/stream".into(), Some(format!("Basic {TOKEN}"))),
        (format!("/stream?token={}", url_encoded(prefix)), None),
        ("/stream?token=".into(), None),
        // Only `token` counts.
        (format!("/stream?tok={encoded}"), None),
    ];
    for (path, authorization) in &refused {
        let headers: Vec<(&str, &str)> = authorization
            .iter()
            .map(|a| ("Authorization", a.as_str()))
            .collect();
        let resp = upgrade(port, path, &headers).await?;
        assert_eq!(resp.status, 401, "GET {path} with {headers:?}: {resp:?}");
    }

    let resp = upgrade(port, "/stream", &[("Authorization", &bearer)]).await?;
    assert_eq!(resp.status, 101, "right bearer token: {resp:?}");
    let query_path = format!("/stream?token={encoded}");
    let resp = upgrade(port, &query_path, &[]).await?;
    assert_eq!(resp.status, 101, "right token in the query: {resp:?}");

    // Real clients stream with either form.
    let mut with_header = ws_connect_with(port, "/stream", &[("Authorization", &bearer)]).await?;
    let mut with_query = ws_connect(port, &format!("/stream?x=1&token={encoded}")).await?;
    server.wait_for_clients(2).await?;
    let payload = r#"{"action":"token"}"#;
    pg.notify(channel, payload).await?;
    assert_eq!(next_event(&mut with_header).await?, payload);
    assert_eq!(next_event(&mut with_query).await?, payload);

    // The other routes need no token.
    for path in ["/status", "/metrics", "/ready"] {
        let resp = http_get(port, path).await?;
        assert_eq!(resp.status, 200, "{path} without a token: {resp:?}");
    }
    let log = server.stderr();
    for secret in [TOKEN, encoded.as_str(), prefix] {
        assert!(
            !log.contains(secret),
            "stderr reveals a token ({secret:?}):\n{log}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn allowed_origins_refuse_other_origins_with_403() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "ops-origins";
    let opts = ServerOpts::with_db(pg, channel)
        .env("ALLOWED_ORIGINS", "https://a.example,https://b.example");
    let server = Server::spawn(opts).await?;
    let port = server.port();
    for origin in [
        "https://evil.example",
        "https://a.example.evil.example",
        "http://a.example",
        "null",
    ] {
        let resp = upgrade(port, "/stream", &[("Origin", origin)]).await?;
        assert_eq!(resp.status, 403, "Origin {origin}: {resp:?}");
    }
    for origin in ["https://a.example", "https://b.example"] {
        let resp = upgrade(port, "/stream", &[("Origin", origin)]).await?;
        assert_eq!(resp.status, 101, "Origin {origin}: {resp:?}");
    }
    // Without Origin (not a browser): accepted.
    let resp = upgrade(port, "/stream", &[]).await?;
    assert_eq!(resp.status, 101, "no Origin: {resp:?}");

    let mut allowed = ws_connect_with(port, "/stream", &[("Origin", "https://a.example")]).await?;
    server.wait_for_clients(1).await?;
    let payload = r#"{"action":"origin"}"#;
    pg.notify(channel, payload).await?;
    assert_eq!(next_event_within(&mut allowed, TIMEOUT).await?, payload);
    Ok(())
}

/// CPU time (user + system) the process has used, in clock ticks.
fn cpu_ticks(pid: i32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

/// Out of descriptors at accept (EMFILE): the server pauses accepts with one WARN and without
/// spinning a core, keeps delivering to its clients, and accepts again once descriptors free up.
#[tokio::test(flavor = "multi_thread")]
async fn running_out_of_descriptors_pauses_accepts_and_recovers() -> Result<()> {
    const LIMIT: u64 = 64;
    let pg = PgCluster::shared().await;
    let channel = "ops-emfile";
    let opts = ServerOpts::with_db(pg, channel)
        .open_files_limit(LIMIT)
        .env("HANDSHAKE_TIMEOUT", 120);
    let server = Server::spawn(opts).await?;
    let port = server.port();
    let mut ws = server.ws().await?;
    server.wait_for_clients(1).await?;

    // Connections that never send a request each hold a descriptor until the handshake
    // timeout; more of them than the limit leaves the accept loop without descriptors.
    let mut hogs = Vec::new();
    for _ in 0..LIMIT + 16 {
        hogs.push(TcpStream::connect(("127.0.0.1", port)).await?);
    }
    server
        .wait_log(|log| log.contains("cannot accept connections"))
        .await?;
    let before = cpu_ticks(server.pid())?;
    let window = Instant::now();
    notify(&pg.client().await?, channel, r#"{"action":"still-here"}"#).await?;
    assert_eq!(next_event(&mut ws).await?, r#"{"action":"still-here"}"#);
    tokio::time::sleep(Duration::from_secs(1).saturating_sub(window.elapsed())).await;
    let used = cpu_ticks(server.pid())? - before;
    // Clock ticks are 1/100 s: a spinning accept loop would use about 100 in this second.
    ensure!(
        used < 30,
        "{used} ticks of CPU in one second while out of descriptors"
    );

    drop(hogs);
    server
        .wait_log(|log| log.contains("accepting connections again"))
        .await?;
    let mut again = server.ws().await?;
    server.wait_for_clients(2).await?;
    notify(&pg.client().await?, channel, r#"{"action":"back"}"#).await?;
    assert_eq!(next_event(&mut again).await?, r#"{"action":"back"}"#);
    let warns = server.log_lines(&[" WARN ", "cannot accept connections"]);
    assert_eq!(
        warns.len(),
        1,
        "one WARN while out of descriptors: {warns:#?}"
    );
    Ok(())
}
