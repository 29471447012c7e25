//! A burst that keeps the server busy for several health intervals is not a lost connection:
//! with a health query every second that must answer within a second, thousands of clients
//! and one burst of notifications, the server keeps its LISTEN connection (the same epoch, no
//! reconnect, no "lost" line) and every client gets every message, in order, none closed.
//!
//! The clients are the load generator's (the workspace's other package, built for the test),
//! which checks every client's sequence. The client queue holds the whole burst and the pong
//! timeout outlasts it, so that no client is closed for being behind while it keeps reading
//! (its Ping waits behind the frames in its socket buffers): on two cores the generator reads
//! on the same cores the server writes with, and only the LISTEN connection is under test.

use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::harness::{PgCluster, Server, ServerOpts, build_bench, raise_own_open_files_limit};

/// As many as a debug server and generator deliver well within a minute here: 2 million
/// frames, which took them about 10 s on two cores (600 clients took 5.7 s), several health
/// intervals.
const CLIENTS: usize = 1_000;
const MESSAGES: usize = 2_000;
/// The health interval plus its timeout: a burst shorter than this would test nothing.
const HEALTH_WINDOW: Duration = Duration::from_secs(2);
/// A failure guard for the generator's whole run.
const RUN_LIMIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_under_one_second_health_checks_keeps_the_listen_and_loses_nothing() -> Result<()> {
    raise_own_open_files_limit()?;
    let bench = tokio::task::spawn_blocking(build_bench).await??;
    let pg = PgCluster::shared().await;
    let channel = "burst-health";
    let server = Server::spawn(
        ServerOpts::with_db(pg, channel)
            .env("PG_HEALTH_INTERVAL", "1")
            .env("PG_HEALTH_TIMEOUT", "1")
            .env("CLIENT_QUEUE", MESSAGES + 1024)
            .env("PONG_TIMEOUT", 600),
    )
    .await?;
    let epoch = server.status().await?["epoch"].clone();
    let reconnects = server
        .metric("vulcan_stream_listener_reconnects_total")
        .await?;

    let dir = tempfile::tempdir().context("report dir")?;
    let report_path = dir.path().join("burst.json");
    let mut generator = tokio::process::Command::new(&bench);
    generator
        .arg("fanout")
        .args(["--url", &format!("ws://127.0.0.1:{}/stream", server.port())])
        .args(["--server-pid", &server.pid().to_string()])
        .args(["--clients", &CLIENTS.to_string()])
        .args(["--messages", &MESSAGES.to_string()])
        .args(["--window", "0", "--threads", "2", "--strict"])
        .arg("--save")
        .arg(&report_path)
        .env("PG_CHANNEL", channel)
        .envs(pg.env())
        .kill_on_drop(true);
    let output = tokio::time::timeout(RUN_LIMIT, generator.output())
        .await
        .context("the generator's run took too long")?
        .context("running the generator")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "the generator found problems ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&report_path).context("the generator's report")?,
    )
    .context("the report is JSON")?;

    let delivery = &report["delivery"];
    let expected = (CLIENTS * MESSAGES) as u64;
    assert_eq!(delivery["delivered"], expected, "{stdout}");
    for count in ["lost", "duplicated", "out_of_order", "clients_closed"] {
        assert_eq!(delivery[count], 0, "{count}:\n{stdout}");
    }
    assert_eq!(delivery["clients_complete"], CLIENTS, "{stdout}");
    let elapsed = Duration::from_secs_f64(delivery["elapsed_s"].as_f64().unwrap_or_default());
    ensure!(
        elapsed > HEALTH_WINDOW,
        "the burst was delivered in {elapsed:?}, within one health interval and timeout: \
         it tested nothing; raise CLIENTS or MESSAGES\n{stdout}"
    );

    // The server's own word, besides what the generator read: the same epoch, no reconnect,
    // nothing said about a loss.
    assert_eq!(server.status().await?["epoch"], epoch, "a new epoch began");
    assert_eq!(
        server
            .metric("vulcan_stream_listener_reconnects_total")
            .await?,
        reconnects,
        "the LISTEN connection was re-established"
    );
    let lost = server.log_lines(&["lost"]);
    assert!(lost.is_empty(), "the server logged a loss: {lost:#?}");
    assert_eq!(
        report["listener"]["epoch_before"],
        report["listener"]["epoch_after"]
    );
    eprintln!(
        "{CLIENTS} clients × {MESSAGES} messages delivered in {elapsed:?} under 1 s health \
         checks; epoch {epoch} kept"
    );
    Ok(())
}
