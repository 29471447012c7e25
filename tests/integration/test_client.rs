//! `vulcan-stream-test-client`: 0 when its notification comes back, 1 when the server is
//! unreachable or nothing arrives in time, 2 on bad input.

use std::time::Duration;

use anyhow::Result;

use crate::harness::{BinOutput, CLIENT_BIN, PgCluster, Server, ServerOpts, free_port, run_bin};

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
