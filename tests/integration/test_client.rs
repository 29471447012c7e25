//! `vulcan-stream-test-client`: 0 when its notification comes back, 1 when the server is
//! unreachable or nothing arrives in time, 2 on bad input.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::harness::{
    BinOutput, CLIENT_BIN, PgCluster, Server, ServerOpts, TIMEOUT, free_port, run_bin,
};

/// Guard well above every timeout the client is given.
const GUARD: Duration = Duration::from_secs(30);

/// The client's environment: the cluster, `channel`, and PORT=`port`.
fn client_env(pg: &PgCluster, channel: &str, port: u16) -> Vec<(String, String)> {
    let mut env = pg.env();
    env.push(("PG_CHANNEL".into(), channel.into()));
    env.push(("PORT".into(), port.to_string()));
    env.push(("LOG_LEVEL".into(), "info".into()));
    env
}

fn assert_one_stderr_line(out: &BinOutput) {
    assert_eq!(
        out.stderr.trim_end().lines().count(),
        1,
        "expected one stderr line: {out:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn succeeds_against_a_running_server() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "client-ok";
    let server = Server::spawn(ServerOpts::with_db(pg, channel)).await?;
    let env = client_env(pg, channel, server.port());
    let out = run_bin(CLIENT_BIN, &["--timeout", "10"], &env, GUARD).await?;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(!out.stdout.trim().is_empty(), "no line on stdout: {out:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn url_option_overrides_the_port() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "client-url";
    let server = Server::spawn(ServerOpts::with_db(pg, channel)).await?;
    // PORT points nowhere; only --url leads to the server.
    let env = client_env(pg, channel, free_port());
    let url = format!("ws://127.0.0.1:{}/stream", server.port());
    let out = run_bin(CLIENT_BIN, &["--timeout", "10", "--url", &url], &env, GUARD).await?;
    assert_eq!(out.code, Some(0), "{out:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn fails_fast_when_no_server_listens() -> Result<()> {
    let pg = PgCluster::shared().await;
    let env = client_env(pg, "client-no-server", free_port());
    let out = run_bin(CLIENT_BIN, &[], &env, GUARD).await?;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.elapsed < Duration::from_secs(5),
        "took {:?} to notice",
        out.elapsed
    );
    assert_one_stderr_line(&out);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn times_out_when_its_notification_never_arrives() -> Result<()> {
    let pg = PgCluster::shared().await;
    // The server listens on one channel, the client notifies another.
    let server = Server::spawn(ServerOpts::with_db(pg, "client-server-side")).await?;
    let env = client_env(pg, "client-other-side", server.port());
    let out = run_bin(CLIENT_BIN, &["--timeout", "2"], &env, GUARD).await?;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.elapsed >= Duration::from_millis(1900) && out.elapsed < Duration::from_secs(8),
        "timeout 2 s took {:?}",
        out.elapsed
    );
    assert_one_stderr_line(&out);
    Ok(())
}

#[tokio::test]
async fn bad_input_exits_2() -> Result<()> {
    let base = [("PORT", "8080"), ("PG_HOST", "127.0.0.1")];
    let with = |extra: (&'static str, &'static str)| {
        let mut env = base.to_vec();
        env.push(extra);
        env
    };
    for (args, env) in [
        (vec!["--timeout", "abc"], base.to_vec()),
        (vec![], with(("PG_PORT", "abc"))),
        (vec![], with(("PORT", "70000"))),
        (vec![], with(("PG_SSLMODE", "bogus"))),
        (vec!["/nonexistent/vulcan-stream.toml"], base.to_vec()),
    ] {
        let out = run_bin(CLIENT_BIN, &args, &env, GUARD).await?;
        assert_eq!(out.code, Some(2), "{args:?} {env:?}: {out:?}");
        if args.is_empty() {
            assert_one_stderr_line(&out);
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn succeeds_over_server_sent_events_and_websocket_v1() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "client-sse";
    let server = Server::spawn(ServerOpts::with_db(pg, channel)).await?;
    let env = client_env(pg, channel, server.port());
    for transport in ["--sse", "--v1"] {
        let out = run_bin(CLIENT_BIN, &["--timeout", "10", transport], &env, GUARD).await?;
        assert_eq!(out.code, Some(0), "{transport}: {out:?}");
        assert!(out.stdout.starts_with("ok: "), "{transport}: {out:?}");
    }
    let url = format!("http://127.0.0.1:{}/stream", server.port());
    let out = run_bin(CLIENT_BIN, &["--sse", "--url", &url], &env, GUARD).await?;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains(&url), "{out:?}");
    Ok(())
}

/// The SSE probe against a server that refuses it says why, on one line.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_event_stream_is_one_line_and_exit_1() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "client-sse-refused";
    let opts = ServerOpts::with_db(pg, channel).env("STREAM_TOKEN", "s3cret");
    let server = Server::spawn(opts).await?;
    let env = client_env(pg, channel, server.port());
    let out = run_bin(CLIENT_BIN, &["--sse"], &env, GUARD).await?;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("HTTP 401"), "{out:?}");
    assert_one_stderr_line(&out);
    Ok(())
}

/// `--follow` prints each message as it arrives, one line each (with its position over SSE),
/// until it is stopped.
#[tokio::test(flavor = "multi_thread")]
async fn follow_prints_each_message_as_it_arrives() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "client-follow";
    let server = Server::spawn(ServerOpts::with_db(pg, channel)).await?;
    let env = client_env(pg, channel, server.port());
    let first = r#"{"action":"follow","n":1}"#;
    let second = "{\"action\": \"follow\",\n \"n\": 2}";
    let mut followers = Vec::new();
    for (transport, clients) in [(None, 1), (Some("--sse"), 2), (Some("--v1"), 3)] {
        let mut args = vec!["--follow"];
        args.extend(transport);
        let mut child = tokio::process::Command::new(CLIENT_BIN)
            .args(&args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        // The followers before this one are still connected (killed only at the end).
        server.wait_for_clients(clients).await?;
        pg.notify(channel, first).await?;
        pg.notify(channel, second).await?;
        let mut got = Vec::new();
        for _ in 0..2 {
            let line = tokio::time::timeout(TIMEOUT, lines.next_line())
                .await
                .with_context(|| format!("{args:?}: no line"))??
                .with_context(|| format!("{args:?}: stdout ended"))?;
            got.push(line);
        }
        let one_line = second.replace('\n', " ");
        if transport.is_none() {
            assert_eq!(got, [first.to_owned(), one_line], "{args:?}");
        } else {
            for (line, payload) in got.iter().zip([first, one_line.as_str()]) {
                let (id, rest) = line.split_once(' ').context("a position first")?;
                assert!(id.contains('-'), "{args:?}: {line:?}");
                assert_eq!(rest, payload, "{args:?}");
            }
        }
        // Left running while the next one is checked: the stream reaches every follower.
        followers.push((child, lines));
    }
    for (mut child, _) in followers {
        child.kill().await?;
    }
    server.wait_for_clients(0).await?;
    Ok(())
}
