//! The config file is honoured: case-insensitive names, the Go format with unknown sections, and
//! the environment overriding it.

use std::time::Duration;

use anyhow::Result;

use crate::harness::{
    PING, PgCluster, Server, ServerOpts, free_port, http_get, next_event, next_text_within,
    ws_connect,
};

#[tokio::test(flavor = "multi_thread")]
async fn file_section_and_key_names_are_case_insensitive() -> Result<()> {
    let pg = PgCluster::shared().await;
    let http_port = free_port();
    let channel = "config-case-keys";
    // Nothing but PATH and LOG_LEVEL in the environment: port, database and channel come only
    // from the file.
    let config = format!(
        r#"[SENDER]
HTTPPORT = {http_port}

[receiver]
dbhost = "127.0.0.1"
dbport = {pg_port}
DBNAME = "stream"
DbUser = "postgres"
dbsslmode = "disable"
streamchannel = "{channel}"
"#,
        pg_port = pg.port()
    );
    let opts = ServerOpts::new().unset("PORT").config(config);
    let server = Server::spawn(opts).await?;
    assert_eq!(server.port(), http_port, "HTTPPORT from [SENDER] not used");

    let mut ws = server.ws().await?;
    server.wait_for_clients(1).await?;
    let payload = r#"{"action":"from-file"}"#;
    pg.notify(channel, payload).await?;
    assert_eq!(next_event(&mut ws).await?, payload);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn go_format_file_with_metrics_section_loads_with_a_warning() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "config-go-format";
    // The layout of the Go original's Docker config, [Metrics] included.
    let config = format!(
        r#"[Logger]
LogFile = ""
LogLevel = "DEBUG"

[Receiver]
DBName = "stream"
DBUser = "postgres"
DBPass = ""
DBHost = "127.0.0.1"
DBPort = {pg_port}
DBSSLMode = "disable"
StreamChannel = "{channel}"

[Sender]
HTTPPort = 8080
HTTPStream = "stream"
PingInterval = 10

[Metrics]
enabled = true
"#,
        pg_port = pg.port()
    );
    let opts = ServerOpts::new().unset("LOG_LEVEL").config(config);
    let server = Server::spawn(opts).await?;

    let stderr = server.stderr();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("WARN") && l.contains("Metrics")),
        "no WARN line naming Metrics in:\n{stderr}"
    );

    let mut ws = server.ws().await?;
    server.wait_for_clients(1).await?;
    let payload = r#"{"action":"go-format"}"#;
    pg.notify(channel, payload).await?;
    assert_eq!(next_event(&mut ws).await?, payload);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn environment_overrides_the_file() -> Result<()> {
    let pg = PgCluster::shared().await;
    let file_port = free_port();
    let file_channel = "config-env-file-a";
    let env_channel = "config-env-file-b";
    // Every value here is wrong for the test and overridden by the environment.
    let config = format!(
        r#"[Logger]
LogLevel = "ERROR"
[Receiver]
DBHost = "192.0.2.1"
DBPort = 1
DBName = "nope"
DBUser = "nobody"
DBSSLMode = "verify-full"
StreamChannel = "{file_channel}"
[Sender]
HTTPPort = {file_port}
HTTPStream = "from-file"
"#
    );
    // ServerOpts sets PORT=0, LOG_LEVEL=info and the PG_* variables.
    let opts = ServerOpts::with_db(pg, env_channel)
        .env("STREAM", "from-env")
        .config(config);
    let server = Server::spawn(opts).await?;
    assert_ne!(server.port(), file_port, "PORT=0 did not override HTTPPort");

    assert_eq!(http_get(server.port(), "/from-file").await?.status, 404);
    let mut ws = ws_connect(server.port(), "/from-env").await?;
    server.wait_for_clients(1).await?;
    // If the file's channel were used, its payload would arrive first.
    pg.notify(file_channel, r#"{"action":"file-channel"}"#)
        .await?;
    let payload = r#"{"action":"env-channel"}"#;
    pg.notify(env_channel, payload).await?;
    assert_eq!(next_event(&mut ws).await?, payload);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn ping_frames_arrive_every_ping_interval() -> Result<()> {
    let pg = PgCluster::shared().await;
    let opts = ServerOpts::with_db(pg, "config-ping").config("[Sender]\nPingInterval = 1\n");
    let server = Server::spawn(opts).await?;
    let mut ws = server.ws().await?;
    for _ in 0..2 {
        assert_eq!(
            next_text_within(&mut ws, Duration::from_secs(5)).await?,
            PING
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn ping_interval_variable_overrides_the_file() -> Result<()> {
    let pg = PgCluster::shared().await;
    let opts = ServerOpts::with_db(pg, "config-ping-env")
        .env("PING_INTERVAL", "1")
        .config("[Sender]\nPingInterval = 600\n");
    let server = Server::spawn(opts).await?;
    let mut ws = server.ws().await?;
    assert_eq!(
        next_text_within(&mut ws, Duration::from_secs(5)).await?,
        PING
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn mixed_case_channel_with_dash_is_listened_to_exactly() -> Result<()> {
    let pg = PgCluster::shared().await;
    let server = Server::spawn(ServerOpts::with_db(pg, "My-Events")).await?;
    let mut ws = server.ws().await?;
    server.wait_for_clients(1).await?;

    // The channel is a quoted identifier: `my-events` is another channel.
    pg.notify("my-events", r#"{"action":"lower-case"}"#).await?;
    let payload = r#"{"action":"My-Events"}"#;
    pg.client()
        .await?
        .batch_execute(&format!(r#"NOTIFY "My-Events", '{payload}'"#))
        .await?;
    assert_eq!(next_event(&mut ws).await?, payload);
    Ok(())
}
