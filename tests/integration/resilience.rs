//! Resilience: the database going away in every way it can, slow and vanished clients, and
//! shutdown. Every wait is on an event; timeouts only turn a hang into a failure, and the bounds
//! asserted are the ones an operator can rely on.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::harness::{
    CLIENT_BIN, DB_NAME, Ending, PING, PgCluster, RawWs, Server, ServerOpts, TIMEOUT, Ws, http_get,
    next_close, next_event, next_event_within, notify,
};

/// Reconnect backoff is capped by the server; a restart of a second or two needs a few seconds.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The application_name of the server's LISTEN connection.
const APP_NAME: &str = "vulcan-stream";

/// A client of `server` that has been seen to receive `payload`, notified on `channel`: the
/// service is delivering before the test breaks something.
async fn receiving_client(
    server: &Server,
    pg: &PgCluster,
    channel: &str,
    payload: &str,
) -> Result<Ws> {
    let mut ws = server.ws().await?;
    server.wait_for_clients(1).await?;
    pg.notify(channel, payload).await?;
    assert_eq!(next_event(&mut ws).await?, payload);
    Ok(ws)
}

#[tokio::test(flavor = "multi_thread")]
async fn survives_a_database_restart() -> Result<()> {
    let pg = PgCluster::private().await?;
    let channel = "resilience-restart";
    let server = Server::spawn(ServerOpts::with_db(&pg, channel)).await?;
    let mut ws = receiving_client(&server, &pg, channel, r#"{"action":"before-restart"}"#).await?;

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
        .wait_ready_within(RECONNECT_TIMEOUT, "/ready = 200")
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

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// WARN lines of the server's stderr that contain `needle`.
fn warn_lines(server: &Server, needle: &str) -> Vec<String> {
    server.log_lines(&[" WARN ", needle])
}

/// The retry delays the receiver announced ("next in 187.3ms", "retrying in 1.2s"), in order.
fn retry_delays(log: &str) -> Vec<Duration> {
    log.lines()
        .filter_map(|line| {
            let rest = line
                .split_once("(next in ")
                .or_else(|| line.split_once("retrying in "))?
                .1;
            let text: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == 'µ')
                .collect();
            parse_debug_duration(&text)
        })
        .collect()
}

/// Parses `Duration`'s Debug form: `187.3ms`, `1.2s`, `950µs`.
fn parse_debug_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| c.is_alphabetic() || c == 'µ')?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => value,
        "ms" => value / 1e3,
        "µs" => value / 1e6,
        "ns" => value / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(seconds))
}

/// Waits until the receiver has failed `n` times in a row with the same cause (the DEBUG line
/// of the n-th attempt; needs LOG_LEVEL=debug).
async fn wait_attempts(server: &Server, n: u64) -> Result<String> {
    let needle = format!("(attempt {n})");
    server
        .wait_log_within(RECONNECT_TIMEOUT, |log| log.contains(&needle))
        .await
        .with_context(|| format!("waiting for connection attempt {n}"))
}

/// Checks the connection-failure logging of a server that could not connect `attempts` times:
/// one WARN naming `cause`, the repeats at DEBUG only, growing delays, and no `secret`.
fn assert_failure_logged_once(server: &Server, cause: &str, secrets: &[&str]) {
    let log = server.stderr();
    let warns = warn_lines(server, "cannot connect to");
    assert_eq!(
        warns.len(),
        1,
        "one WARN for the failure, got {warns:#?}\n{log}"
    );
    assert!(
        warns[0].contains(cause),
        "the WARN names the cause {cause:?}: {:?}",
        warns[0]
    );
    let repeats = server.log_lines(&[" DEBUG ", "cannot connect to", cause]);
    assert!(repeats.len() >= 2, "repeats logged at DEBUG:\n{log}");
    let delays = retry_delays(&log);
    assert!(
        delays.len() >= 3 && delays[2] > delays[0],
        "backoff grows: {delays:?}\n{log}"
    );
    for secret in secrets {
        assert!(
            !log.contains(secret),
            "the password {secret:?} appears in stderr:\n{log}"
        );
    }
}

/// Reads `ws` in a task (so that websocket pings are answered) and forwards every text frame
/// other than the heartbeat.
fn spawn_reader(mut ws: Ws) -> mpsc::UnboundedReceiver<Result<String>> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let item = match ws.next().await {
                Some(Ok(Message::Text(text))) if text.as_str() == PING => continue,
                Some(Ok(Message::Text(text))) => Ok(text.as_str().to_owned()),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => Err(anyhow::anyhow!("unexpected message {other:?}")),
                Some(Err(err)) => Err(anyhow::anyhow!("websocket read: {err}")),
                None => Err(anyhow::anyhow!("websocket ended")),
            };
            let failed = item.is_err();
            if tx.send(item).is_err() || failed {
                return;
            }
        }
    });
    rx
}

async fn recv_event(rx: &mut mpsc::UnboundedReceiver<Result<String>>) -> Result<String> {
    tokio::time::timeout(TIMEOUT, rx.recv())
        .await
        .context("no event within the timeout")?
        .context("reader task ended")?
}

/// Sends `signal` to `pid`.
fn kill(pid: i32, signal: i32) -> Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, signal) };
    ensure!(
        rc == 0,
        "kill({pid}, {signal}): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Sends SIGCONT to a stopped process when dropped, so that a failing test does not leave a
/// frozen PostgreSQL backend behind (the cluster could not shut down).
struct ContinueOnDrop(i32);

impl Drop for ContinueOnDrop {
    fn drop(&mut self) {
        let _ = kill(self.0, libc::SIGCONT);
    }
}

/// A NOTIFY payload of exactly [`BULK_SIZE`] bytes carrying `seq`.
fn bulk_payload(seq: usize) -> String {
    let head = format!(r#"{{"action":"bulk","seq":{seq},"pad":""#);
    let pad = BULK_SIZE - head.len() - 2;
    format!("{head}{}\"}}", "x".repeat(pad))
}

const BULK_SIZE: usize = 1024;

/// Publishes [`bulk_payload`]`(i)` for i in start..start + count in one statement, so in one
/// transaction.
async fn notify_bulk(
    db: &tokio_postgres::Client,
    channel: &str,
    start: i32,
    count: i32,
) -> Result<()> {
    db.execute(
        r#"SELECT pg_notify($1, format('{"action":"bulk","seq":%s,"pad":"%s"}', g,
                  repeat('x', $4 - 33 - length(g::text))))
           FROM generate_series($2::int, $2::int + $3::int - 1) AS g"#,
        &[&channel, &start, &count, &(BULK_SIZE as i32)],
    )
    .await
    .with_context(|| format!("notify {count} bulk payloads on {channel}"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The database side
// ---------------------------------------------------------------------------------------------

/// The service starts with PostgreSQL down, serves clients meanwhile, and begins delivering as
/// soon as the database is up, without a restart and to the clients already connected.
#[tokio::test(flavor = "multi_thread")]
async fn starts_while_the_database_is_down_and_connects_when_it_comes_up() -> Result<()> {
    let pg = PgCluster::private().await?;
    pg.stop().await?;
    let channel = "resilience-start-down";
    let server = Server::spawn(
        ServerOpts::with_db(&pg, channel)
            .env("LOG_LEVEL", "debug")
            .no_wait_ready(),
    )
    .await?;
    let status = server.status().await?;
    assert_eq!(status["listener"], "connecting", "{status}");
    let ready = http_get(server.port(), "/ready").await?;
    assert_eq!(ready.status, 503, "{ready:?}");
    let mut ws = server.ws().await?;
    server.wait_for_clients(1).await?;

    wait_attempts(&server, 3).await?;
    assert_failure_logged_once(&server, "Connection refused", &[]);
    assert_eq!(server.status().await?["listener"], "connecting");

    pg.start().await?;
    server
        .wait_ready_within(RECONNECT_TIMEOUT, "/ready = 200")
        .await?;
    let payload = r#"{"action":"first-after-start"}"#;
    pg.notify(channel, payload).await?;
    assert_eq!(next_event(&mut ws).await?, payload);
    assert_eq!(server.status().await?["listener"], "listening");
    let active = server.log_lines(&[" INFO ", "LISTEN \"resilience-start-down\" active"]);
    assert_eq!(active.len(), 1, "{active:#?}");
    Ok(())
}

/// `pg_terminate_backend` of the LISTEN connection: one WARN with the cause, a reconnect, and the
/// same websocket connection receives what is notified afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn terminated_listener_reconnects_and_clients_keep_receiving() -> Result<()> {
    let pg = PgCluster::private().await?;
    let channel = "resilience-terminate";
    let server = Server::spawn(ServerOpts::with_db(&pg, channel)).await?;
    let mut ws =
        receiving_client(&server, &pg, channel, r#"{"action":"before-terminate"}"#).await?;

    let pids = pg.backend_pids(APP_NAME).await?;
    ensure!(pids.len() == 1, "one LISTEN backend expected: {pids:?}");
    let killed: bool = pg
        .connect("postgres")
        .await?
        .query_one("SELECT pg_terminate_backend($1)", &[&pids[0]])
        .await?
        .get(0);
    ensure!(killed, "pg_terminate_backend({}) returned false", pids[0]);

    server
        .wait_metric(
            "vulcan_stream_listener_reconnects_total",
            RECONNECT_TIMEOUT,
            |v| v >= 1.0,
        )
        .await?;
    let after = pg.backend_pids(APP_NAME).await?;
    assert!(
        after.len() == 1 && after[0] != pids[0],
        "a new LISTEN backend replaces {}: {after:?}",
        pids[0]
    );
    let payload = r#"{"action":"after-terminate"}"#;
    pg.notify(channel, payload).await?;
    assert_eq!(next_event(&mut ws).await?, payload);
    assert_eq!(server.status().await?["clients"], 1);

    let lost = warn_lines(&server, "lost");
    assert_eq!(lost.len(), 1, "one WARN about the loss: {lost:#?}");
    assert!(
        lost[0].contains("administrator command"),
        "the WARN gives the cause: {:?}",
        lost[0]
    );
    Ok(())
}

/// A wrong password is no crash: the server serves, retries with backoff, logs the cause once
/// (never the password), and connects as soon as the password is right, without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_is_retried_and_logged_once() -> Result<()> {
    const ROLE: &str = "resil_agent";
    const CONFIGURED: &str = "Configured-pw-8e1f";
    const ACTUAL: &str = "Actual-pw-55c2";
    let pg = PgCluster::private().await?;
    let admin = pg.connect("postgres").await?;
    admin
        .batch_execute(&format!(
            "SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE {ROLE} LOGIN PASSWORD '{ACTUAL}'"
        ))
        .await?;
    // postgres keeps trust (the harness connects as postgres); everyone else needs a password.
    pg.set_hba(
        "local all all trust\n\
         host all postgres 127.0.0.1/32 trust\n\
         host all all 127.0.0.1/32 scram-sha-256\n",
    )
    .await?;
    // The reload is asynchronous: wait until a wrong password is refused.
    let probe = format!(
        "host=127.0.0.1 port={} user={ROLE} password=wrong dbname={DB_NAME}",
        pg.port()
    );
    let deadline = Instant::now() + TIMEOUT;
    while tokio_postgres::connect(&probe, tokio_postgres::NoTls)
        .await
        .is_ok()
    {
        ensure!(
            Instant::now() < deadline,
            "pg_hba.conf reload not in effect"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let channel = "resilience-password";
    let server = Server::spawn(
        ServerOpts::with_db(&pg, channel)
            .env("PG_USER", ROLE)
            .env("PG_PASSWORD", CONFIGURED)
            .env("LOG_LEVEL", "debug")
            .no_wait_ready(),
    )
    .await?;
    let mut ws = server.ws().await?;
    server.wait_for_clients(1).await?;
    wait_attempts(&server, 3).await?;
    let status = server.status().await?;
    assert_eq!(status["listener"], "connecting", "{status}");
    assert_eq!(http_get(server.port(), "/ready").await?.status, 503);
    assert_failure_logged_once(
        &server,
        "password authentication failed",
        &[CONFIGURED, ACTUAL],
    );

    admin
        .batch_execute(&format!("ALTER ROLE {ROLE} PASSWORD '{CONFIGURED}'"))
        .await?;
    server
        .wait_ready_within(RECONNECT_TIMEOUT, "/ready = 200 once the password is right")
        .await?;
    let payload = r#"{"action":"after-password-fix"}"#;
    pg.notify(channel, payload).await?;
    assert_eq!(next_event(&mut ws).await?, payload);
    let log = server.stderr();
    assert!(!log.contains(CONFIGURED) && !log.contains(ACTUAL), "{log}");
    Ok(())
}

/// A missing database: served, retried, the cause names the database; CREATE DATABASE and it
/// connects without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn missing_database_is_retried_until_it_exists() -> Result<()> {
    const DB: &str = "resil_created_later";
    let pg = PgCluster::shared().await;
    let channel = "resilience-missing-db";
    let server = Server::spawn(
        ServerOpts::with_db(pg, channel)
            .env("PG_DB", DB)
            .env("LOG_LEVEL", "debug")
            .no_wait_ready(),
    )
    .await?;
    let mut ws = server.ws().await?;
    server.wait_for_clients(1).await?;
    wait_attempts(&server, 3).await?;
    assert_eq!(server.status().await?["listener"], "connecting");
    assert_failure_logged_once(&server, &format!("database \"{DB}\" does not exist"), &[]);

    pg.connect("postgres")
        .await?
        .batch_execute(&format!("CREATE DATABASE {DB}"))
        .await?;
    server
        .wait_ready_within(RECONNECT_TIMEOUT, "/ready = 200 once the database exists")
        .await?;
    // NOTIFY is per database: publish in the one the server listens in.
    let payload = r#"{"action":"after-create-database"}"#;
    notify(&pg.connect(DB).await?, channel, payload).await?;
    assert_eq!(next_event(&mut ws).await?, payload);
    Ok(())
}

/// A database path that dies silently (the LISTEN backend frozen with SIGSTOP: no FIN, no RST,
/// no answer) is declared lost by the health query within interval + timeout, and replaced.
#[tokio::test(flavor = "multi_thread")]
async fn silently_dead_listener_is_detected_by_the_health_query() -> Result<()> {
    let pg = PgCluster::private().await?;
    let channel = "resilience-sigstop";
    let server = Server::spawn(
        ServerOpts::with_db(&pg, channel)
            .env("PG_HEALTH_INTERVAL", "1")
            .env("PG_HEALTH_TIMEOUT", "1"),
    )
    .await?;
    let mut ws = receiving_client(&server, &pg, channel, r#"{"action":"before-freeze"}"#).await?;

    let pids = pg.backend_pids(APP_NAME).await?;
    ensure!(pids.len() == 1, "one LISTEN backend expected: {pids:?}");
    let frozen = pids[0];
    // Declared after `pg`, so dropped first: the backend runs again before the cluster stops.
    let _thaw = ContinueOnDrop(frozen);
    kill(frozen, libc::SIGSTOP)?;
    let stopped_at = Instant::now();

    server
        .wait_metric(
            "vulcan_stream_listener_reconnects_total",
            RECONNECT_TIMEOUT,
            |v| v >= 1.0,
        )
        .await?;
    let detected = stopped_at.elapsed();
    // Health interval 1 s + timeout 1 s + the first backoff (≤ 200 ms) + scheduling.
    assert!(
        detected < Duration::from_secs(5),
        "loss noticed and repaired after {detected:?}"
    );
    let now = pg.backend_pids(APP_NAME).await?;
    assert!(
        now.iter().any(|&pid| pid != frozen),
        "a new LISTEN backend besides the frozen {frozen}: {now:?}"
    );
    let payload = r#"{"action":"after-freeze"}"#;
    pg.notify(channel, payload).await?;
    assert_eq!(next_event(&mut ws).await?, payload);

    let lost = warn_lines(&server, "lost");
    assert_eq!(lost.len(), 1, "one WARN about the loss: {lost:#?}");
    assert!(
        lost[0].contains("health query unanswered"),
        "the WARN gives the cause: {:?}",
        lost[0]
    );
    eprintln!("frozen LISTEN backend replaced after {detected:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The client side
// ---------------------------------------------------------------------------------------------

/// A client that never reads while 50,000 messages of 1 kB are published, `batch` per
/// transaction (the next once the reading client has the previous): the reading client gets
/// every one in order and promptly; the stuck one is closed (1008), counted and logged once.
/// `queue` is ClientQueue (None: the default, 1024).
async fn stuck_client_scenario(channel: &str, queue: Option<usize>, batch: usize) -> Result<()> {
    const MESSAGES: usize = 50_000;
    /// Generous for 50 MB through debug builds on a loaded 2-core machine; typically 3-8 s.
    const DELIVERY_BOUND: Duration = Duration::from_secs(30);
    let pg = PgCluster::shared().await;
    let mut opts = ServerOpts::with_db(pg, channel);
    if let Some(queue) = queue {
        opts = opts.env("CLIENT_QUEUE", queue);
    }
    let server = Server::spawn(opts).await?;
    let mut stuck = RawWs::connect_with_recv_buffer(server.port(), 4096).await?;
    let mut reader = server.ws().await?;
    server.wait_for_clients(2).await?;

    let db = pg.client().await?;
    let started = Instant::now();
    for first in (0..MESSAGES).step_by(batch) {
        let count = batch.min(MESSAGES - first);
        notify_bulk(&db, channel, first as i32, count as i32).await?;
        for i in first..first + count {
            let left = DELIVERY_BOUND.saturating_sub(started.elapsed());
            let got = next_event_within(&mut reader, left)
                .await
                .with_context(|| format!("reading client, message {i} of {MESSAGES}"))?;
            if got != bulk_payload(i) {
                bail!("message {i} is {got:?}");
            }
        }
    }
    let elapsed = started.elapsed();

    server.wait_slow_disconnects(1).await?;
    server.wait_for_clients(1).await?;
    let (ending, frames) = stuck.read_to_end(TIMEOUT).await?;
    assert!(
        matches!(
            ending,
            Ending::Close(Some(1008)) | Ending::Eof | Ending::Reset
        ),
        "the stuck client ends with 1008 or a dropped connection: {ending:?}"
    );
    assert!(
        (frames as usize) < MESSAGES,
        "the stuck client got only what was buffered before it was closed ({frames} frames)"
    );
    let slow = warn_lines(&server, "too slow");
    assert_eq!(slow.len(), 1, "one line for the slow client: {slow:#?}");
    eprintln!(
        "{MESSAGES} × {BULK_SIZE} B in batches of {batch} delivered in {elapsed:?}; stuck \
         client: {frames} frames, then {ending:?}"
    );
    Ok(())
}

/// Batches of 1,000 stay within the default queue even if no client task runs during a burst
/// (see the next test).
#[tokio::test(flavor = "multi_thread")]
async fn stuck_client_is_closed_and_others_get_everything() -> Result<()> {
    stuck_client_scenario("resilience-stuck", None, 1000).await
}

/// The same in one transaction with a small queue: a client that reads as fast as it can must
/// not be taken for a slow one, although the receiver hands each client up to 256
/// notifications at once (one batch per read from PostgreSQL): only what the socket does not
/// take counts against the queue.
#[tokio::test(flavor = "multi_thread")]
async fn stuck_client_is_closed_and_others_get_everything_in_one_burst() -> Result<()> {
    stuck_client_scenario("resilience-stuck-burst", Some(64), 50_000).await
}

/// A client process that vanishes without a close (SIGSTOP: the kernel still ACKs, nothing
/// answers) is dropped after the pong timeout; a client that answers pings stays.
#[tokio::test(flavor = "multi_thread")]
async fn vanished_client_is_dropped_after_the_pong_timeout() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "resilience-vanish";
    let server = Server::spawn(
        ServerOpts::with_db(pg, channel)
            .env("PING_INTERVAL", "1")
            .env("PONG_TIMEOUT", "2"),
    )
    .await?;
    let mut alive = spawn_reader(server.ws().await?);
    // The test client is a real websocket client in its own process: it answers pings while it
    // waits for its check_id, which it sends on another channel so that it waits until killed.
    let child = tokio::process::Command::new(CLIENT_BIN)
        .args(["--timeout", "120", "--url"])
        .arg(format!("ws://127.0.0.1:{}/stream", server.port()))
        .env_clear()
        .envs(pg.env())
        .env("PG_CHANNEL", "resilience-vanish-elsewhere")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("spawn the test client")?;
    server.wait_for_clients(2).await?;

    let pid = i32::try_from(child.id().context("child pid")?)?;
    kill(pid, libc::SIGSTOP)?;
    let stopped_at = Instant::now();
    server
        .wait_http_within(
            Duration::from_secs(15),
            |r| {
                serde_json::from_slice::<serde_json::Value>(&r.body)
                    .is_ok_and(|v| v["clients"] == 1)
            },
            "/status",
            "\"clients\":1 after the SIGSTOP",
        )
        .await?;
    let dropped = stopped_at.elapsed();
    // The last answer came at most a ping interval (1 s) before the stop; the pong timeout
    // (2 s) runs from it.
    assert!(
        dropped < Duration::from_secs(6),
        "vanished client dropped after {dropped:?}"
    );
    assert_eq!(
        server
            .metric("vulcan_stream_clients_disconnected_unresponsive_total")
            .await?,
        1.0,
        "only the stopped client counts as unresponsive"
    );
    // The server logs before the client leaves, but its stderr is read through a pipe.
    server
        .wait_log(|line| line.contains("dropped, nothing heard within"))
        .await?;
    assert_eq!(
        server.log_lines(&["dropped, nothing heard within"]).len(),
        1
    );
    // The client that answers pings is the one left, and it still receives.
    let payload = r#"{"action":"after-vanish"}"#;
    pg.notify(channel, payload).await?;
    assert_eq!(recv_event(&mut alive).await?, payload);
    drop(child);
    eprintln!("stopped client dropped after {dropped:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_closes_every_client_with_1001_and_exits_0_within_5_s() -> Result<()> {
    const CLIENTS: usize = 5;
    let pg = PgCluster::shared().await;
    let mut server = Server::spawn(ServerOpts::with_db(pg, "resilience-sigterm")).await?;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(server.ws().await?);
    }
    server.wait_for_clients(CLIENTS as u64).await?;

    let signalled = Instant::now();
    server.signal(libc::SIGTERM)?;
    for (i, ws) in clients.iter_mut().enumerate() {
        let frame = next_close(ws)
            .await
            .with_context(|| format!("client {i}"))?
            .with_context(|| format!("client {i}: close frame without a code"))?;
        assert_eq!(frame.code, CloseCode::Away, "client {i}: {frame:?}");
    }
    let status = server.wait_exit(Duration::from_secs(5)).await?;
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(took < Duration::from_secs(5), "exited after {took:?}");
    eprintln!("{CLIENTS} clients closed, exit 0 after {took:?}");
    Ok(())
}

/// Fills the stuck client's socket so that its close frame cannot be written: the queue holds
/// fewer frames than ClientQueue (so it is not closed as too slow), the kernel buffers are full.
async fn server_with_a_stuck_client(channel: &str) -> Result<(Server, RawWs, Ws)> {
    const PAYLOAD: usize = 7000;
    let pg = PgCluster::shared().await;
    let server =
        Server::spawn(ServerOpts::with_db(pg, channel).env("CLIENT_QUEUE", "4096")).await?;
    let stuck = RawWs::connect_with_recv_buffer(server.port(), 4096).await?;
    let mut good = server.ws().await?;
    server.wait_for_clients(2).await?;
    // More than the largest send buffer the kernel may grant, plus the receive buffer.
    let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|t| t.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20);
    let count = (wmem_max * 3 / 2) / PAYLOAD + 100;
    ensure!(
        count < 4000,
        "tcp_wmem max {wmem_max} too large for ClientQueue"
    );
    pg.client()
        .await?
        .execute(
            r#"SELECT pg_notify($1, format('{"action":"fill","seq":%s,"pad":"%s"}', g,
                      repeat('x', $3)))
               FROM generate_series(1, $2) AS g"#,
            &[&channel, &(count as i32), &(PAYLOAD as i32)],
        )
        .await?;
    for i in 0..count {
        next_event(&mut good)
            .await
            .with_context(|| format!("fill message {i}"))?;
    }
    Ok((server, stuck, good))
}

/// A client that cannot take its close frame does not hold the process beyond the grace period.
#[tokio::test(flavor = "multi_thread")]
async fn stuck_client_does_not_hold_shutdown() -> Result<()> {
    let (mut server, _stuck, mut good) =
        server_with_a_stuck_client("resilience-stuck-stop").await?;
    let signalled = Instant::now();
    server.signal(libc::SIGTERM)?;
    let frame = next_close(&mut good)
        .await?
        .context("close without a code")?;
    assert_eq!(frame.code, CloseCode::Away);
    let status = server.wait_exit(Duration::from_secs(10)).await?;
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    // The grace period is 5 s; the stuck client's close and drain take 2 s each at most.
    assert!(took < Duration::from_secs(7), "exited after {took:?}");
    eprintln!("shutdown with a stuck client took {took:?}");
    Ok(())
}

/// A second SIGTERM during a slow shutdown exits at once.
#[tokio::test(flavor = "multi_thread")]
async fn second_sigterm_exits_at_once() -> Result<()> {
    let (mut server, _stuck, mut good) = server_with_a_stuck_client("resilience-twice").await?;
    let first = Instant::now();
    server.signal(libc::SIGTERM)?;
    let frame = next_close(&mut good)
        .await?
        .context("close without a code")?;
    assert_eq!(frame.code, CloseCode::Away);
    server
        .wait_log(|log| log.contains("SIGTERM received"))
        .await?;
    // The stuck client keeps the graceful stop going for seconds; cut it short.
    let second = Instant::now();
    server.signal(libc::SIGTERM)?;
    let status = server.wait_exit(Duration::from_secs(5)).await?;
    let took = second.elapsed();
    assert_eq!(status.code(), Some(143), "exit status {status}");
    assert!(
        took < Duration::from_secs(1),
        "exited {took:?} after the second signal ({:?} after the first)",
        first.elapsed()
    );
    assert_eq!(server.log_lines(&["second SIGTERM"]).len(), 1);
    eprintln!("second SIGTERM: exit 143 after {took:?}");
    Ok(())
}
