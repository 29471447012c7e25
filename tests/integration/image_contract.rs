//! The Docker image runs `vulcan-stream /app/config.toml` with the repository's `config.toml` and
//! the variables of `local.env`. Run it that way, with the database and port variables pointed at
//! the test cluster, and check the overrides are what is used.

use std::path::Path;

use anyhow::{Context, Result};

use crate::harness::{PgCluster, Server, ServerOpts, next_event, ws_connect};

/// `KEY=VALUE` lines of an env file (as `docker run --env-file` reads it: no quote removal).
fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .collect()
}

/// `key` of `[section]` in a TOML table, names compared case-insensitively.
fn lookup<'a>(table: &'a toml::Table, section: &str, key: &str) -> Option<&'a toml::Value> {
    let (_, section) = table
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(section))?;
    let (_, value) = section
        .as_table()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))?;
    Some(value)
}

#[tokio::test(flavor = "multi_thread")]
async fn image_config_with_local_env_uses_the_overridden_values() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = std::fs::read_to_string(root.join("config.toml"))
        .context("the image's config.toml at the repository root")?;
    let local_env = std::fs::read_to_string(root.join("local.env"))
        .context("local.env at the repository root")?;
    let table: toml::Table = config.parse().context("config.toml is not valid TOML")?;
    let file_port = lookup(&table, "Sender", "HTTPPort").and_then(toml::Value::as_integer);

    let pg = PgCluster::shared().await;
    let mut env = parse_env_file(&local_env);
    let overrides = [
        ("PG_HOST", "127.0.0.1".to_string()),
        ("PG_PORT", pg.port().to_string()),
        ("PG_DB", crate::harness::DB_NAME.to_string()),
        ("PG_USER", "postgres".to_string()),
        ("PG_PASSWORD", "not-the-local-env-password".to_string()),
        ("PORT", "0".to_string()),
    ];
    env.retain(|(k, _)| !overrides.iter().any(|(o, _)| o == k));
    env.extend(overrides.iter().map(|(k, v)| (k.to_string(), v.clone())));

    let lookup_env = |key: &str| {
        env.iter()
            .find(|(k, v)| k == key && !v.is_empty())
            .map(|(_, v)| v.clone())
    };
    let channel = lookup_env("PG_CHANNEL")
        .or_else(|| {
            lookup(&table, "Receiver", "StreamChannel")
                .and_then(toml::Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| "events".to_string());
    let stream = lookup_env("STREAM")
        .or_else(|| {
            lookup(&table, "Sender", "HTTPStream")
                .and_then(toml::Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| "stream".to_string());

    // Exactly the image's environment: nothing from ServerOpts::new.
    let mut opts = ServerOpts::new()
        .unset("PORT")
        .unset("LOG_LEVEL")
        .config(config);
    opts.env.extend(env);
    let server = Server::spawn(opts).await?;
    if let Some(file_port) = file_port {
        assert_ne!(i64::from(server.port()), file_port, "PORT=0 not used");
    }

    let mut ws = ws_connect(server.port(), &format!("/{stream}")).await?;
    server.wait_for_clients(1).await?;
    let payload = r#"{"action":"image","check_id":"c"}"#;
    pg.notify(&channel, payload).await?;
    assert_eq!(next_event(&mut ws).await?, payload);
    Ok(())
}
