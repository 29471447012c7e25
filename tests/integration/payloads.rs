//! Which payloads are forwarded (verbatim) and which are dropped (and counted).

use anyhow::Result;

use crate::harness::{PgCluster, Server, ServerOpts, next_event};

const INVALID_TOTAL: &str = "vulcan_stream_notifications_invalid_total";

#[tokio::test(flavor = "multi_thread")]
async fn payloads_are_forwarded_byte_identical() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "payloads-verbatim";
    let server = Server::spawn(ServerOpts::with_db(pg, channel)).await?;
    let mut ws = server.ws().await?;
    server.wait_for_clients(1).await?;

    let payloads = [
        // Unknown fields kept, key order kept.
        r#"{"zeta":1,"action":"a","alpha":[1,2]}"#,
        // Unicode, not escaped or re-encoded.
        r#"{"action":"ñ✓😀","check_id":"ñ"}"#,
        // Escapes kept as written.
        r#"{"action":"\u00f1\n<&>","agent_id":"a\"b"}"#,
        // Whitespace inside and around kept.
        " { \"action\" :\t\"spaced\" ,\n  \"scan_id\" : \"s\" }\n",
        // All four known fields, mixed-case keys.
        r#"{"Action":"x","CHECK_ID":"c","agent_ID":"a","Scan_Id":"s","n":1.50}"#,
        // No known field at all.
        r#"{}"#,
        r#"{"other":{"nested":[true,false,null]}}"#,
    ];
    for payload in payloads {
        pg.notify(channel, payload).await?;
        assert_eq!(next_event(&mut ws).await?, payload);
    }
    assert_eq!(server.metric(INVALID_TOTAL).await?, 0.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn payload_of_7999_bytes_arrives_intact() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "payloads-7999";
    let server = Server::spawn(ServerOpts::with_db(pg, channel)).await?;
    let mut ws = server.ws().await?;
    server.wait_for_clients(1).await?;

    // PostgreSQL's limit is "shorter than 8000 bytes"; multi-byte characters count as bytes.
    let head = r#"{"action":"big","check_id":"é","data":""#;
    let tail = r#""}"#;
    let mut payload = String::from(head);
    let mut i = 0u32;
    while payload.len() + tail.len() < 7999 {
        payload.push(char::from(b'a' + (i % 26) as u8));
        i += 1;
    }
    payload.push_str(tail);
    assert_eq!(payload.len(), 7999);

    pg.notify(channel, &payload).await?;
    let got = next_event(&mut ws).await?;
    assert_eq!(got.len(), 7999);
    assert!(got == payload, "7999-byte payload changed in transit");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn null_fields_are_forwarded() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "payloads-null";
    let server = Server::spawn(ServerOpts::with_db(pg, channel)).await?;
    let mut ws = server.ws().await?;
    server.wait_for_clients(1).await?;

    for payload in [
        r#"{"action":null,"check_id":"x"}"#,
        r#"{"action":"y","check_id":null,"agent_id":null,"scan_id":null}"#,
    ] {
        pg.notify(channel, payload).await?;
        assert_eq!(next_event(&mut ws).await?, payload);
    }
    Ok(())
}

/// Each bad payload is followed by a good sentinel; the next frame the client sees must be the
/// sentinel. All kinds are tried before failing, so one failure does not hide the others.
#[tokio::test(flavor = "multi_thread")]
async fn invalid_payloads_are_dropped_counted_and_the_stream_goes_on() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "payloads-invalid";
    let server = Server::spawn(ServerOpts::with_db(pg, channel)).await?;
    let mut ws = server.ws().await?;
    server.wait_for_clients(1).await?;
    let before = server.metric(INVALID_TOTAL).await?;

    let bad = [
        ("not JSON", "hello"),
        ("empty payload", ""),
        ("array", r#"[{"action":"x"}]"#),
        ("bare string", r#""action""#),
        ("number", "42"),
        ("null", "null"),
        ("numeric action", r#"{"action":1}"#),
        ("object check_id", r#"{"check_id":{}}"#),
        ("upper-case key ACTION with a number", r#"{"ACTION":2}"#),
        ("boolean agent_id", r#"{"Agent_Id":true}"#),
        ("array scan_id", r#"{"scan_id":["s"]}"#),
        ("trailing garbage", r#"{"action":"x"} y"#),
        ("two objects", r#"{"action":"x"}{"action":"y"}"#),
        ("truncated object", r#"{"action":"x""#),
    ];
    let db = pg.client().await?;
    let mut failures = Vec::new();
    for (i, (kind, payload)) in bad.iter().enumerate() {
        let sentinel = format!(r#"{{"action":"sentinel","seq":{i}}}"#);
        crate::harness::notify(&db, channel, payload).await?;
        crate::harness::notify(&db, channel, &sentinel).await?;
        let mut got = next_event(&mut ws).await?;
        if got != sentinel {
            failures.push(format!("{kind} ({payload:?}) was forwarded as {got:?}"));
            while got != sentinel {
                got = next_event(&mut ws).await?;
            }
        }
    }
    assert!(failures.is_empty(), "not dropped:\n{}", failures.join("\n"));

    let after = server.metric(INVALID_TOTAL).await?;
    assert_eq!(
        after - before,
        bad.len() as f64,
        "{INVALID_TOTAL} went from {before} to {after}"
    );
    Ok(())
}
