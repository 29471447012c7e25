//! A real browser as the client: headless Chromium (Debian's `chromium`) driven by
//! `playwright-core` (`tests/browser/follow.mjs`) follows the stream over an `EventSource` and a
//! `vulcan-stream.v1` WebSocket, through a proxy that the test cuts while a publisher runs. The
//! browser reconnects on its own (`Last-Event-ID`; `since` for the WebSocket page code) and
//! must miss nothing and see nothing twice. `scripts/test` installs Chromium and playwright-core.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::harness::{PgCluster, Proxy, Server, ServerOpts, TIMEOUT, notify};

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// What the browser test needs, or why it cannot run (a failure, not a skip).
fn check_prerequisites() -> Result<()> {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    ensure!(
        Path::new(&chromium).exists(),
        "{chromium} not found: scripts/test installs Debian's chromium (apt-get install chromium)"
    );
    ensure!(
        browser_dir().join("node_modules/playwright-core").exists(),
        "playwright-core not installed: scripts/test runs `npm ci` in tests/browser"
    );
    Ok(())
}

fn seqs(transport: &Value) -> Result<Vec<u64>> {
    transport["seqs"]
        .as_array()
        .context("seqs")?
        .iter()
        .map(|v| v.as_u64().context("seq"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_browser_reconnects_over_sse_and_websocket_and_misses_nothing() -> Result<()> {
    const COUNT: u64 = 200;
    check_prerequisites()?;
    let pg = PgCluster::shared().await;
    let channel = "browser-follow";
    let server = Server::spawn(ServerOpts::with_db(pg, channel)).await?;
    let proxy = Proxy::start(server.port()).await?;

    let mut node = Command::new("node")
        .arg(browser_dir().join("follow.mjs"))
        .env(
            "STREAM_URL",
            format!("http://127.0.0.1:{}/stream", proxy.port()),
        )
        .env("COUNT", COUNT.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting node tests/browser/follow.mjs")?;
    let mut lines = BufReader::new(node.stdout.take().context("stdout")?).lines();
    let ready = tokio::time::timeout(TIMEOUT * 4, lines.next_line())
        .await
        .context("the browser did not connect")??
        .context("the browser script ended before connecting")?;
    ensure!(ready.contains("ready"), "unexpected first line: {ready}");
    server.wait_for_clients(2).await?;

    let db = pg.client().await?;
    for seq in 0..COUNT {
        notify(&db, channel, &format!(r#"{{"seq":{seq}}}"#)).await?;
        if seq == COUNT / 3 || seq == 2 * COUNT / 3 {
            proxy.cut();
        }
        // Paced, so that the cuts fall while messages are still being published.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }

    let report = tokio::time::timeout(TIMEOUT * 8, lines.next_line())
        .await
        .context("the browser did not report")??
        .context("the browser script ended without a report")?;
    let status = node.wait().await?;
    ensure!(status.success(), "follow.mjs failed ({status}): {report}");
    let report: Value = serde_json::from_str(&report).with_context(|| report.clone())?;
    let expected: Vec<u64> = (0..COUNT).collect();
    for transport in ["sse", "ws"] {
        let got = &report[transport];
        if seqs(got)? != expected {
            bail!("{transport}: not every message exactly once, in order: {got}");
        }
        assert_eq!(got["resets"], serde_json::json!([]), "{transport}: {got}");
    }
    assert!(
        report["sse"]["opens"].as_u64() >= Some(2),
        "the EventSource reconnected: {}",
        report["sse"]
    );
    assert!(
        report["ws"]["opens"].as_u64() >= Some(2),
        "the WebSocket reconnected: {}",
        report["ws"]
    );
    Ok(())
}
