//! Bad input: exit code 2, one stderr line naming the culprit and its value, nothing started;
//! passwords never printed. Also `--help` and `--version`.

use std::time::Duration;

use anyhow::Result;
use base64::Engine;

use crate::harness::{BinOutput, CLIENT_BIN, SERVER_BIN, run_bin};

/// Guard for a binary that should exit at once: one that starts serving instead is killed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the server with `config` (if any) as its file and `env` over PORT=0 and LOG_LEVEL=info.
async fn run_server(config: Option<&str>, env: &[(&str, &str)]) -> Result<BinOutput> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.toml");
    let mut args = Vec::new();
    if let Some(content) = config {
        std::fs::write(&path, content)?;
        args.push(path.to_str().expect("utf-8 temp path"));
    }
    let mut full_env = vec![("PORT", "0"), ("LOG_LEVEL", "info")];
    full_env.retain(|(k, _)| !env.iter().any(|(e, _)| e == k));
    full_env.extend_from_slice(env);
    run_bin(SERVER_BIN, &args, &full_env, EXIT_TIMEOUT).await
}

/// Exit code 2 and exactly one stderr line.
fn assert_bad_input(out: &BinOutput) -> String {
    assert_eq!(out.code, Some(2), "expected exit code 2: {out:?}");
    let stderr = out.stderr.trim_end();
    assert_eq!(
        stderr.lines().count(),
        1,
        "expected exactly one stderr line: {out:?}"
    );
    stderr.to_string()
}

/// `line` names `key` (any case).
fn assert_names(line: &str, key: &str) {
    assert!(
        line.to_lowercase().contains(&key.to_lowercase()),
        "stderr does not name {key:?}: {line:?}"
    );
}

/// `line` contains `value` as a whole word (so a one-letter value is not found inside words).
fn assert_value(line: &str, value: &str) {
    let found = line.match_indices(value).any(|(at, _)| {
        let before = line[..at].chars().next_back();
        let after = line[at + value.len()..].chars().next();
        let is_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        !is_word(before) && !is_word(after)
    });
    assert!(found, "stderr does not show the value {value:?}: {line:?}");
}

#[tokio::test]
async fn missing_config_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("does-not-exist.toml");
    let path = path.to_str().expect("utf-8 temp path");
    let out = run_bin(SERVER_BIN, &[path], &[("PORT", "0")], EXIT_TIMEOUT).await?;
    let line = assert_bad_input(&out);
    assert!(
        line.contains("does-not-exist.toml"),
        "path not named: {line:?}"
    );
    Ok(())
}

#[tokio::test]
async fn toml_syntax_error_names_the_line() -> Result<()> {
    let config = "[Receiver]\nDBName = \"stream\"\nDBUser = \"postgres\"\n\nStreamChannel = \"events\n[Sender]\n";
    let out = run_server(Some(config), &[]).await?;
    let line = assert_bad_input(&out);
    let lower = line.to_lowercase();
    let number = lower.split_once("line").map(|(_, rest)| {
        rest.trim_start_matches(|c: char| !c.is_ascii_digit())
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
    });
    assert_eq!(number.as_deref(), Some("5"), "line 5 not named: {line:?}");
    Ok(())
}

#[tokio::test]
async fn wrong_type_for_db_port() -> Result<()> {
    let out = run_server(Some("[Receiver]\nDBPort = \"x\"\n"), &[]).await?;
    let line = assert_bad_input(&out);
    assert_names(&line, "DBPort");
    assert_value(&line, "x");
    Ok(())
}

#[tokio::test]
async fn pg_port_not_a_number() -> Result<()> {
    let line = assert_bad_input(&run_server(None, &[("PG_PORT", "abc")]).await?);
    assert_names(&line, "PG_PORT");
    assert_value(&line, "abc");
    Ok(())
}

#[tokio::test]
async fn port_out_of_range() -> Result<()> {
    let line = assert_bad_input(&run_server(None, &[("PORT", "70000")]).await?);
    assert_names(&line, "PORT");
    assert_value(&line, "70000");
    Ok(())
}

#[tokio::test]
async fn unknown_sslmode() -> Result<()> {
    let line = assert_bad_input(&run_server(None, &[("PG_SSLMODE", "bogus")]).await?);
    assert_names(&line, "PG_SSLMODE");
    assert_value(&line, "bogus");
    Ok(())
}

#[tokio::test]
async fn ca_not_base64() -> Result<()> {
    let env = [("PG_SSLMODE", "verify-ca"), ("PG_CA_B64", "!!!")];
    let line = assert_bad_input(&run_server(None, &env).await?);
    assert_names(&line, "PG_CA_B64");
    assert!(line.contains("!!!"), "value not shown: {line:?}");
    Ok(())
}

#[tokio::test]
async fn ca_not_a_certificate() -> Result<()> {
    let hello = base64::engine::general_purpose::STANDARD.encode("hello");
    let env = [("PG_SSLMODE", "verify-ca"), ("PG_CA_B64", hello.as_str())];
    let line = assert_bad_input(&run_server(None, &env).await?);
    assert_names(&line, "PG_CA_B64");
    assert!(line.contains(&hello), "value {hello:?} not shown: {line:?}");
    Ok(())
}

#[tokio::test]
async fn client_key_not_base64_is_named_but_not_shown() -> Result<()> {
    let cert = base64::engine::general_purpose::STANDARD.encode("hello");
    let key = "c2VjcmV0LWtleS1tYXJrZXI*";
    let env = [
        ("PG_SSLMODE", "verify-full"),
        ("PG_SSLCERT_B64", cert.as_str()),
        ("PG_SSLKEY_B64", key),
    ];
    let out = run_server(None, &env).await?;
    let line = assert_bad_input(&out);
    assert_names(&line, "PG_SSLKEY_B64");
    assert!(line.contains("not base64"), "no reason: {line:?}");
    assert!(!out.stderr.contains(&key[..20]), "key shown: {out:?}");
    Ok(())
}

#[tokio::test]
async fn client_certificate_without_its_key() -> Result<()> {
    let cert = base64::engine::general_purpose::STANDARD.encode("hello");
    let config = format!("[Receiver]\nDBSSLMode = \"require\"\nDBSSLCert = \"{cert}\"\n");
    let line = assert_bad_input(&run_server(Some(&config), &[]).await?);
    assert_names(&line, "Receiver.DBSSLCert");
    assert_names(&line, "PG_SSLKEY_B64");
    assert_names(&line, "Receiver.DBSSLKey");
    Ok(())
}

#[tokio::test]
async fn ping_interval_zero() -> Result<()> {
    let line = assert_bad_input(&run_server(Some("[Sender]\nPingInterval = 0\n"), &[]).await?);
    assert_names(&line, "PingInterval");
    assert_value(&line, "0");
    Ok(())
}

#[tokio::test]
async fn empty_stream_channel() -> Result<()> {
    let line =
        assert_bad_input(&run_server(Some("[Receiver]\nStreamChannel = \"\"\n"), &[]).await?);
    assert_names(&line, "StreamChannel");
    Ok(())
}

#[tokio::test]
async fn unknown_log_level() -> Result<()> {
    let line = assert_bad_input(&run_server(None, &[("LOG_LEVEL", "verbose")]).await?);
    assert_names(&line, "LOG_LEVEL");
    assert_value(&line, "verbose");
    Ok(())
}

#[tokio::test]
async fn passwords_are_not_printed() -> Result<()> {
    let out = run_server(None, &[("PG_PASSWORD", "s3cr3t-pw"), ("PG_PORT", "abc")]).await?;
    assert_bad_input(&out);
    assert!(
        !out.stderr.contains("s3cr3t-pw"),
        "password leaked: {out:?}"
    );

    let out = run_server(None, &[("PG_PWD", "s3cr3t-alias"), ("PG_PORT", "abc")]).await?;
    assert_bad_input(&out);
    assert!(
        !out.stderr.contains("s3cr3t-alias"),
        "password leaked: {out:?}"
    );

    let config = "[Receiver]\nDBPass = \"s3cr3t-file\"\nDBPort = \"x\"\n";
    let out = run_server(Some(config), &[]).await?;
    assert_bad_input(&out);
    assert!(
        !out.stderr.contains("s3cr3t-file"),
        "password leaked: {out:?}"
    );
    Ok(())
}

#[tokio::test]
async fn help_and_version_exit_0() -> Result<()> {
    for bin in [SERVER_BIN, CLIENT_BIN] {
        let no_env: [(&str, &str); 0] = [];
        let help = run_bin(bin, &["--help"], &no_env, EXIT_TIMEOUT).await?;
        assert_eq!(help.code, Some(0), "{bin} --help: {help:?}");
        assert!(
            !help.stdout.trim().is_empty(),
            "{bin} --help printed nothing"
        );

        let version = run_bin(bin, &["--version"], &no_env, EXIT_TIMEOUT).await?;
        assert_eq!(version.code, Some(0), "{bin} --version: {version:?}");
        assert!(
            version.stdout.contains(env!("CARGO_PKG_VERSION")),
            "{bin} --version: {version:?}"
        );
    }
    Ok(())
}
