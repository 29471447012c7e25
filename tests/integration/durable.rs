//! Table mode (`PG_SOURCE=table`): the schema and `migrate`, publishing in the publisher's
//! transaction, the payload check, commit order, positions shared by replicas, and nothing
//! lost or doubled across restarts of the server and of PostgreSQL.

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tokio::sync::OnceCell;

use crate::harness::{
    PgCluster, Proxy, SERVER_BIN, Server, ServerOpts, TIMEOUT, Ws, next_event, run_bin,
    sse_connect, sse_event, ws_connect, ws_connect_with,
};

const PROTOCOL: (&str, &str) = ("Sec-WebSocket-Protocol", "vulcan-stream.v1");

/// Runs `vulcan-stream migrate` against `pg` with `extra` environment.
async fn migrate_with(pg: &PgCluster, extra: &[(&str, &str)]) -> Result<crate::harness::BinOutput> {
    let mut env = pg.env();
    env.push(("LOG_LEVEL".to_owned(), "info".to_owned()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    run_bin(SERVER_BIN, &["migrate"], &env, TIMEOUT * 3).await
}

/// The shared cluster, migrated once for this process.
async fn shared() -> Result<&'static PgCluster> {
    static MIGRATED: OnceCell<()> = OnceCell::const_new();
    let pg = PgCluster::shared().await;
    MIGRATED
        .get_or_try_init(|| async {
            let out = migrate_with(pg, &[]).await?;
            ensure!(out.code == Some(0), "migrate failed: {out:?}");
            Ok(())
        })
        .await?;
    Ok(pg)
}

/// A table-mode server on `channel`.
fn table_opts(pg: &PgCluster, channel: &str) -> ServerOpts {
    ServerOpts::with_db(pg, channel).env("PG_SOURCE", "table")
}

/// `SELECT vulcan_stream.publish(channel, payload)`.
async fn publish(
    client: &impl tokio_postgres::GenericClient,
    channel: &str,
    payload: &str,
) -> Result<()> {
    client
        .execute(
            "SELECT vulcan_stream.publish($1, $2)",
            &[&channel, &payload],
        )
        .await
        .with_context(|| format!("publish on {channel}: {payload:?}"))?;
    Ok(())
}

fn seq_payload(i: u64) -> String {
    format!(r#"{{"action":"seq","seq":{i}}}"#)
}

/// The next v1 frame that is not a heartbeat.
async fn next_v1(ws: &mut Ws) -> Result<Value> {
    loop {
        let text = next_event(ws).await?;
        let frame: Value =
            serde_json::from_str(&text).with_context(|| format!("v1 frame {text:?}"))?;
        if frame["event"] != "ping" {
            return Ok(frame);
        }
    }
}

/// The next v1 message (fails on a reset): its position and its `seq`.
async fn next_message(ws: &mut Ws) -> Result<(String, u64)> {
    let frame = next_v1(ws).await?;
    ensure!(frame.get("data").is_some(), "a message expected: {frame}");
    let id = frame["id"].as_str().context("id")?.to_owned();
    let seq = frame["data"]["seq"].as_u64().context("seq")?;
    Ok((id, seq))
}

fn offset(id: &str) -> Result<u64> {
    id.rsplit_once('-')
        .and_then(|(_, offset)| offset.parse().ok())
        .with_context(|| format!("position {id:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_is_idempotent_safe_in_parallel_and_exits_as_the_server() -> Result<()> {
    let pg = PgCluster::private().await?;
    let runs = futures::future::join_all((0..4).map(|_| migrate_with(&pg, &[]))).await;
    for out in runs {
        let out = out?;
        ensure!(out.code == Some(0), "a concurrent migrate failed: {out:?}");
    }
    let again = migrate_with(&pg, &[("PG_MAX_PAYLOAD", "65536")]).await?;
    ensure!(again.code == Some(0), "{again:?}");
    assert!(
        again
            .stderr
            .contains("schema vulcan_stream at version 2 (was 2)"),
        "{again:?}"
    );
    let db = pg.client().await?;
    let versions: i64 = db
        .query_one("SELECT count(*) FROM vulcan_stream.schema_version", &[])
        .await?
        .get(0);
    assert_eq!(versions, 2);
    let row = db
        .query_one(
            "SELECT epoch, vulcan_stream.max_payload() FROM vulcan_stream.lineage",
            &[],
        )
        .await?;
    let epoch: String = row.get(0);
    assert!(epoch.len() == 16 && epoch.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(row.get::<_, i32>(1), 65_536);

    // The shipped SQL files are the ones the binary runs: applying them again by hand, in
    // order, changes nothing.
    for file in SQL_FILES {
        db.batch_execute(&format!("BEGIN; {} COMMIT;", sql_file(file)?))
            .await?;
    }
    let same: String = db
        .query_one("SELECT epoch FROM vulcan_stream.lineage", &[])
        .await?
        .get(0);
    assert_eq!(same, epoch);

    let bad = migrate_with(&pg, &[("PG_SOURCE", "outbox")]).await?;
    assert_eq!(bad.code, Some(2), "{bad:?}");
    assert!(bad.stderr.contains(r#"PG_SOURCE="outbox""#), "{bad:?}");
    let port = crate::harness::free_port().to_string();
    let down = migrate_with(&pg, &[("PG_PORT", &port)]).await?;
    assert_eq!(down.code, Some(1), "{down:?}");
    assert!(down.stderr.contains("cannot connect"), "{down:?}");
    Ok(())
}

/// The migration files, in order.
const SQL_FILES: [&str; 2] = ["001_schema.sql", "002_cheaper_check.sql"];

fn sql_file(name: &str) -> Result<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("_resources/sql")
        .join(name);
    std::fs::read_to_string(&path).with_context(|| path.display().to_string())
}

/// A schema of version 1 (the first file applied by hand, as a team that runs its own
/// migrations would have) is upgraded by `migrate`, keeping its lineage and its messages.
#[tokio::test(flavor = "multi_thread")]
async fn migrate_upgrades_a_version_1_schema() -> Result<()> {
    let pg = PgCluster::private().await?;
    let db = pg.client().await?;
    db.batch_execute(&format!("BEGIN; {} COMMIT;", sql_file(SQL_FILES[0])?))
        .await?;
    publish(&db, "durable-upgrade", r#"{"action":"kept"}"#).await?;
    let epoch: String = db
        .query_one("SELECT epoch FROM vulcan_stream.lineage", &[])
        .await?
        .get(0);
    // A server of this build does not read a schema it would not write.
    let out = migrate_with(&pg, &[]).await?;
    ensure!(out.code == Some(0), "{out:?}");
    assert!(
        out.stderr
            .contains("schema vulcan_stream at version 2 (was 1)"),
        "{out:?}"
    );
    let row = db
        .query_one(
            "SELECT epoch, (SELECT count(*) FROM vulcan_stream.messages) \
             FROM vulcan_stream.lineage",
            &[],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), epoch);
    assert_eq!(row.get::<_, i64>(1), 1);
    let refused = publish(&db, "durable-upgrade", &nested(10_001)).await;
    ensure!(
        refused.is_err(),
        "the upgraded check let 10,001 levels through"
    );
    publish(&db, "durable-upgrade", r#"{"action":"after"}"#).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_in_table_mode_without_the_schema_says_to_migrate() -> Result<()> {
    let pg = PgCluster::private().await?;
    let server = Server::spawn(table_opts(&pg, "durable-unmigrated").no_wait_ready()).await?;
    server
        .wait_log(|log| log.contains("run `vulcan-stream migrate`"))
        .await?;
    let ready = crate::harness::http_get(server.port(), "/ready").await?;
    assert_eq!(ready.status, 503);
    // A resume cannot be answered without the table's lineage: 503, and the client retries.
    let request = "GET /stream?since=00ab-1 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n\
                   Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let refused = crate::harness::http_raw(server.port(), request.as_bytes()).await?;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.text().contains("retry"), "{refused:?}");
    let out = migrate_with(&pg, &[]).await?;
    ensure!(out.code == Some(0), "{out:?}");
    // The reader retries with backoff (up to 30 s between attempts; some seconds by now).
    server
        .wait_ready_within(TIMEOUT * 3, "/ready after migrate")
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_exists_only_if_its_transaction_commits() -> Result<()> {
    let pg = shared().await?;
    let channel = "durable-rollback";
    let server = Server::spawn(table_opts(pg, channel)).await?;
    let mut ws = ws_connect_with(server.port(), "/stream", &[PROTOCOL]).await?;
    let mut legacy = ws_connect(server.port(), "/stream").await?;
    server.wait_for_clients(2).await?;
    let mut db = pg.client().await?;
    let tx = db.transaction().await?;
    publish(&tx, channel, &seq_payload(0)).await?;
    tx.rollback().await?;
    // A plain INSERT is a publish too.
    db.execute(
        "INSERT INTO vulcan_stream.messages (channel, payload) VALUES ($1, $2)",
        &[&channel, &seq_payload(1)],
    )
    .await?;
    let (id, seq) = next_message(&mut ws).await?;
    assert_eq!(seq, 1, "the rolled-back message was delivered");
    assert_eq!(next_event(&mut legacy).await?, seq_payload(1));
    // The head is at least the message (other channels' rows move it too).
    let status = server.status().await?;
    assert!(offset(status["head"].as_str().context("head")?)? >= offset(&id)?);
    let epoch: String = db
        .query_one("SELECT epoch FROM vulcan_stream.lineage", &[])
        .await?
        .get(0);
    assert_eq!(status["epoch"].as_str(), Some(epoch.as_str()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_payload_fails_the_publishers_statement_with_a_clear_error() -> Result<()> {
    let pg = shared().await?;
    let channel = "durable-bad-payload";
    let db = pg.client().await?;
    let max: i32 = db
        .query_one("SELECT vulcan_stream.max_payload()", &[])
        .await?
        .get(0);
    let too_big = format!(r#"{{"x":"{}"}}"#, "y".repeat(usize::try_from(max)?));
    // One level deeper than agents decode, and deep enough to exhaust PostgreSQL's parser.
    let too_deep = nested(10_001);
    let far_too_deep = nested(200_000);
    let cases: [(&str, &str, &str); 19] = [
        (r#"{"ACTION":[1]}"#, "22023", "field 'ACTION'"),
        (r#"{"x":"action","action":1}"#, "22023", "field 'action'"),
        (r#"{"\u0061ction":1}"#, "22023", "field 'action'"),
        ("{\"chec\u{212A}_id\":true}", "22023", "is a JSON boolean"),
        (
            r#"{"scan_id":1,"agent_id":"a"}"#,
            "22023",
            "field 'scan_id'",
        ),
        ("nope", "22P02", "is not JSON: Token \"nope\" is invalid"),
        ("   ", "22P02", "empty payload"),
        ("[1,2]", "22023", "is a JSON array, not an object"),
        (r#"{"action":1}"#, "22023", "field 'action'"),
        (r#"{"Check_ID":{}}"#, "22023", "field 'Check_ID'"),
        (r#"{"action":"ok","action":5}"#, "22023", "is a JSON number"),
        (r#"{"action":"x"} y"#, "22P02", "is not JSON"),
        (&too_big, "54000", "exceeds the limit"),
        (&too_deep, "54000", "nested deeper than 10000 levels"),
        (&far_too_deep, "54000", "nested deeper than 10000 levels"),
        // The cheap look that spares the walk over the fields must not miss these.
        (r#"{"action" :  2}"#, "22023", "field 'action'"),
        ("{\"\u{17F}can_id\":1}", "22023", "is a JSON number"),
        (r#"{"CHECK_ID":false}"#, "22023", "field 'CHECK_ID'"),
        (r#"{"a":"\"","agent_id":[]}"#, "22023", "field 'agent_id'"),
    ];
    for (payload, code, needle) in cases {
        let err = db
            .execute(
                "SELECT vulcan_stream.publish($1, $2)",
                &[&channel, &payload],
            )
            .await
            .err()
            .with_context(|| format!("{payload:?} was accepted"))?;
        let db_err = err.as_db_error().context("a database error")?;
        assert_eq!(db_err.code().code(), code, "{payload:?}: {db_err}");
        let message = db_err.message();
        assert!(
            message.starts_with("vulcan_stream: ") && message.contains(needle),
            "{payload:?}: {message}"
        );
        // A plain INSERT is checked the same way.
        let insert = db
            .execute(
                "INSERT INTO vulcan_stream.messages (channel, payload) VALUES ($1, $2)",
                &[&channel, &payload],
            )
            .await;
        ensure!(insert.is_err(), "INSERT of {payload:?} accepted");
    }
    // What agents decode is accepted, as the server accepts it.
    for payload in [
        r#"{"action":null,"check_id":"x","scan_id":"ñ✓😀"}"#,
        r#"{"zeta":1,"alpha":[1,{"x":null}]}"#,
        "{}",
        r#"{"Action":"x","nested":{"action":1},"note":"action"}"#,
        r#"{"actİon":5}"#,
        &nested(10_000),
    ] {
        publish(&db, channel, payload).await?;
    }
    let stored: i64 = db
        .query_one(
            "SELECT count(*) FROM vulcan_stream.messages WHERE channel = $1",
            &[&channel],
        )
        .await?
        .get(0);
    assert_eq!(stored, 6);
    Ok(())
}

/// `{"a":[[…]]}`, nested `depth` levels in all (the outer object included).
fn nested(depth: usize) -> String {
    format!(
        r#"{{"a":{}{}}}"#,
        "[".repeat(depth - 1),
        "]".repeat(depth - 1)
    )
}

/// What the table's check accepts, the server forwards: a payload as deep as agents decode
/// reaches the client, and one a level deeper is refused at publish, and dropped by the server
/// when it skips the check.
#[tokio::test(flavor = "multi_thread")]
async fn the_check_and_the_server_agree_on_nesting() -> Result<()> {
    let pg = shared().await?;
    let channel = "durable-deep-json";
    let server = Server::spawn(table_opts(pg, channel)).await?;
    let mut ws = ws_connect(server.port(), "/stream").await?;
    server.wait_for_clients(1).await?;
    let db = pg.client().await?;
    let refused = publish(&db, channel, &nested(10_001)).await;
    ensure!(refused.is_err(), "10,001 levels accepted");
    // Past the check (a session in replica mode fires no trigger), the server drops it too.
    let unchecked = pg.client().await?;
    unchecked
        .batch_execute("SET session_replication_role = replica")
        .await?;
    unchecked
        .execute(
            "INSERT INTO vulcan_stream.messages (channel, payload) VALUES ($1, $2)",
            &[&channel, &nested(10_001)],
        )
        .await?;
    let deepest = nested(10_000);
    publish(&db, channel, &deepest).await?;
    publish(&db, channel, r#"{"action":"after"}"#).await?;
    assert_eq!(next_event(&mut ws).await?, deepest);
    assert_eq!(next_event(&mut ws).await?, r#"{"action":"after"}"#);
    let invalid = server
        .metric("vulcan_stream_notifications_invalid_total")
        .await?;
    assert_eq!(
        invalid, 1.0,
        "only the row that skipped the check is dropped"
    );
    Ok(())
}

/// The outbox bug: a transaction that took the smaller id commits last. Its row must still be
/// delivered, after the other.
#[tokio::test(flavor = "multi_thread")]
async fn two_transactions_committing_in_reverse_order_skip_nothing() -> Result<()> {
    let pg = shared().await?;
    let channel = "durable-commit-order";
    let server = Server::spawn(table_opts(pg, channel)).await?;
    let mut ws = ws_connect_with(server.port(), "/stream", &[PROTOCOL]).await?;
    server.wait_for_clients(1).await?;
    let mut first_db = pg.client().await?;
    let mut second_db = pg.client().await?;
    let first = first_db.transaction().await?;
    publish(&first, channel, &seq_payload(1)).await?;
    let second = second_db.transaction().await?;
    publish(&second, channel, &seq_payload(2)).await?;
    let ids: Vec<i64> = pg
        .client()
        .await?
        .query(
            "SELECT id FROM vulcan_stream.messages WHERE channel = $1",
            &[&channel],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(ids.is_empty(), "uncommitted rows are invisible: {ids:?}");
    second.commit().await?;
    let (second_id, seq) = next_message(&mut ws).await?;
    assert_eq!(seq, 2);
    first.commit().await?;
    let (first_id, seq) = next_message(&mut ws).await?;
    assert_eq!(seq, 1, "the row of the transaction that committed last");
    assert!(offset(&first_id)? > offset(&second_id)?);

    // A client resuming from before both gets both, in position order, from the table.
    let since = format!(
        "{}-{}",
        second_id.split('-').next().context("epoch")?,
        offset(&second_id)? - 1
    );
    let mut late = ws_connect(server.port(), &format!("/stream?since={since}")).await?;
    assert_eq!(next_message(&mut late).await?, (second_id, 2));
    assert_eq!(next_message(&mut late).await?, (first_id, 1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_unrelated_open_transaction_does_not_stall_delivery() -> Result<()> {
    let pg = shared().await?;
    let channel = "durable-open-transaction";
    let server = Server::spawn(table_opts(pg, channel)).await?;
    let mut ws = ws_connect_with(server.port(), "/stream", &[PROTOCOL]).await?;
    server.wait_for_clients(1).await?;
    // One transaction that holds an xid and a snapshot, and one that published and stays open.
    let mut idle_db = pg.client().await?;
    let idle = idle_db.transaction().await?;
    idle.batch_execute("CREATE TEMP TABLE hold (x int); INSERT INTO hold VALUES (1)")
        .await?;
    let mut pending_db = pg.client().await?;
    let pending = pending_db.transaction().await?;
    publish(&pending, channel, &seq_payload(999)).await?;

    let db = pg.client().await?;
    for i in 0..20 {
        publish(&db, channel, &seq_payload(i)).await?;
        let (_, seq) = next_message(&mut ws).await?;
        assert_eq!(seq, i);
    }
    pending.commit().await?;
    assert_eq!(next_message(&mut ws).await?.1, 999);
    idle.rollback().await?;
    Ok(())
}

/// Three servers on one database give every message the same position, and a client that hops
/// from one to the next with `since` misses nothing and gets nothing twice.
#[tokio::test(flavor = "multi_thread")]
async fn replicas_share_positions_and_a_client_hops_between_them() -> Result<()> {
    const MESSAGES: u64 = 300;
    let pg = shared().await?;
    let channel = "durable-replicas";
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(Server::spawn(table_opts(pg, channel).env("HISTORY_MESSAGES", 50)).await?);
    }
    let mut watchers = Vec::new();
    for server in &servers {
        watchers.push(ws_connect_with(server.port(), "/stream", &[PROTOCOL]).await?);
        server.wait_for_clients(1).await?;
    }
    let db = pg.client().await?;
    let publisher = tokio::spawn(async move {
        for i in 0..MESSAGES {
            publish(&db, channel, &seq_payload(i)).await?;
        }
        anyhow::Ok(())
    });

    // The hopper reads a third on each server, resuming on the next from its last position.
    let mut hopper = ws_connect_with(servers[0].port(), "/stream", &[PROTOCOL]).await?;
    let mut seen = Vec::new();
    let mut hopper_ids = Vec::new();
    for hop in 0..3 {
        while seen.len() < ((hop + 1) * MESSAGES as usize) / 3 {
            let (id, seq) = next_message(&mut hopper).await?;
            seen.push(seq);
            hopper_ids.push(id);
        }
        if hop < 2 {
            let last = hopper_ids.last().context("a position")?;
            let next = &servers[hop + 1];
            hopper = ws_connect(next.port(), &format!("/stream?since={last}")).await?;
        }
    }
    publisher.await??;
    let expected: Vec<u64> = (0..MESSAGES).collect();
    assert_eq!(
        seen, expected,
        "every message once, in order, across the hops"
    );

    let mut all_ids = Vec::new();
    for watcher in &mut watchers {
        let mut ids = Vec::new();
        for i in 0..MESSAGES {
            let (id, seq) = next_message(watcher).await?;
            assert_eq!(seq, i);
            ids.push(id);
        }
        all_ids.push(ids);
    }
    assert_eq!(all_ids[0], all_ids[1], "same positions on two replicas");
    assert_eq!(all_ids[0], all_ids[2], "same positions on three replicas");
    assert_eq!(all_ids[0], hopper_ids, "the hopper saw the same positions");
    let mut sequencers = 0.0;
    for server in &servers {
        sequencers += server.metric("vulcan_stream_sequencer_active").await?;
    }
    assert!(sequencers <= 1.0, "{sequencers} replicas sequence at once");
    Ok(())
}

/// Messages committed while the server is down (killed) reach a client that resumes with its
/// last position once a server is back; positions stay valid across the restart.
#[tokio::test(flavor = "multi_thread")]
async fn messages_committed_while_the_server_was_down_reach_a_resuming_client() -> Result<()> {
    let pg = shared().await?;
    let channel = "durable-server-down";
    let db = pg.client().await?;
    let server = Server::spawn(table_opts(pg, channel)).await?;
    let mut ws = ws_connect_with(server.port(), "/stream", &[PROTOCOL]).await?;
    server.wait_for_clients(1).await?;
    let mut last = String::new();
    for i in 0..10 {
        publish(&db, channel, &seq_payload(i)).await?;
        let (id, seq) = next_message(&mut ws).await?;
        assert_eq!(seq, i);
        last = id;
    }
    drop(ws);
    server.signal(libc::SIGKILL)?;
    drop(server);
    for i in 10..30 {
        publish(&db, channel, &seq_payload(i)).await?;
    }
    let server = Server::spawn(table_opts(pg, channel)).await?;
    let mut ws = ws_connect(server.port(), &format!("/stream?since={last}")).await?;
    // A browser's EventSource resumes with Last-Event-ID.
    let mut sse = sse_connect(server.port(), "/stream", &[("Last-Event-ID", &last)]).await?;
    for i in 10..30 {
        let (_, seq) = next_message(&mut ws).await?;
        assert_eq!(seq, i);
        let event = sse_event(&mut sse).await?;
        assert_eq!(event.data, seq_payload(i), "{event:?}");
    }
    publish(&db, channel, &seq_payload(30)).await?;
    assert_eq!(next_message(&mut ws).await?.1, 30);
    assert_eq!(sse_event(&mut sse).await?.data, seq_payload(30));
    Ok(())
}

/// The reader's and the sequencer's backends terminated, then PostgreSQL restarted: a client
/// that stays connected gets every message exactly once, in order, and no reset.
#[tokio::test(flavor = "multi_thread")]
async fn a_terminated_backend_and_a_postgres_restart_lose_and_double_nothing() -> Result<()> {
    let pg = PgCluster::private().await?;
    let out = migrate_with(&pg, &[]).await?;
    ensure!(out.code == Some(0), "{out:?}");
    let channel = "durable-faults";
    let server = Server::spawn(table_opts(&pg, channel)).await?;
    let mut ws = ws_connect_with(server.port(), "/stream", &[PROTOCOL]).await?;
    let mut legacy = ws_connect(server.port(), "/stream").await?;
    server.wait_for_clients(2).await?;
    let mut seen = Vec::new();
    let mut next = 0;
    let mut round = |from: u64, to: u64| {
        let range = from..to;
        next = to;
        range
    };

    let db = pg.client().await?;
    for i in round(0, 20) {
        publish(&db, channel, &seq_payload(i)).await?;
    }
    while seen.len() < 10 {
        seen.push(next_message(&mut ws).await?.1);
    }
    let admin = pg.connect("postgres").await?;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name IN ('vulcan-stream', 'vulcan-stream sequencer')",
            &[],
        )
        .await?;
    for i in round(20, 40) {
        publish(&db, channel, &seq_payload(i)).await?;
    }
    while seen.len() < 30 {
        seen.push(next_message(&mut ws).await?.1);
    }
    server
        .wait_log(|log| log.contains("table reader's connection"))
        .await?;

    pg.stop().await?;
    pg.start().await?;
    let db = pg.client().await?;
    for i in round(40, 60) {
        publish(&db, channel, &seq_payload(i)).await?;
    }
    while seen.len() < next as usize {
        seen.push(next_message(&mut ws).await?.1);
    }
    let expected: Vec<u64> = (0..next).collect();
    assert_eq!(seen, expected, "every message once, in order, no reset");
    for i in 0..next {
        assert_eq!(next_event(&mut legacy).await?, seq_payload(i));
    }
    let unique: BTreeSet<u64> = seen.iter().copied().collect();
    ensure!(unique.len() == seen.len(), "duplicates: {seen:?}");
    if server.metrics().await?.contains("cause=\"listen-gap\"} 1") {
        bail!("table mode reported a listen gap");
    }
    let reconnects = server
        .metric("vulcan_stream_listener_reconnects_total")
        .await?;
    assert!(reconnects >= 2.0, "{reconnects} reconnects counted");
    Ok(())
}

/// A position older than the history is served from the table, page by page, then live.
#[tokio::test(flavor = "multi_thread")]
async fn a_resume_older_than_the_history_is_served_from_the_table_in_pages() -> Result<()> {
    const MESSAGES: i64 = 2_500;
    let pg = shared().await?;
    let channel = "durable-deep-resume";
    let server = Server::spawn(table_opts(pg, channel).env("HISTORY_MESSAGES", 10)).await?;
    let mut ws = ws_connect_with(server.port(), "/stream", &[PROTOCOL]).await?;
    server.wait_for_clients(1).await?;
    let db = pg.client().await?;
    publish(&db, channel, &seq_payload(0)).await?;
    let (first, _) = next_message(&mut ws).await?;
    db.execute(
        r#"INSERT INTO vulcan_stream.messages (channel, payload)
           SELECT $1, format('{"action":"seq","seq":%s}', g) FROM generate_series(1, $2::bigint) AS g"#,
        &[&channel, &MESSAGES],
    )
    .await?;
    let mut last = String::new();
    for i in 1..=MESSAGES {
        let (id, seq) = next_message(&mut ws).await?;
        assert_eq!(seq, u64::try_from(i)?);
        last = id;
    }
    let mut late = ws_connect(server.port(), &format!("/stream?since={first}")).await?;
    for i in 1..=MESSAGES {
        let (_, seq) = next_message(&mut late).await?;
        assert_eq!(seq, u64::try_from(i)?, "from the table, then the history");
    }
    publish(&db, channel, &seq_payload(u64::try_from(MESSAGES)? + 1)).await?;
    let (id, _) = next_message(&mut late).await?;
    assert!(offset(&id)? > offset(&last)?);
    assert_eq!(
        server.metric("vulcan_stream_resumes_served_total").await?,
        1.0
    );
    Ok(())
}

/// Several channels in one table: each client reads its channel, filtered, live and when it
/// resumes from further back than the history (from the table), with the table's positions.
#[tokio::test(flavor = "multi_thread")]
async fn channels_and_filters_hold_in_table_mode_and_in_a_resume_from_the_table() -> Result<()> {
    let pg = shared().await?;
    let (main, jobs) = ("durable-chan-main", "durable-chan-jobs");
    let opts = table_opts(pg, main)
        .env("PG_CHANNELS", jobs)
        .env("HISTORY_MESSAGES", 1);
    let server = Server::spawn(opts).await?;
    let port = server.port();
    let mut all_jobs =
        ws_connect_with(port, &format!("/stream?channel={jobs}"), &[PROTOCOL]).await?;
    let mut main_a = ws_connect_with(port, "/stream?agent_id=A", &[PROTOCOL]).await?;
    server.wait_for_clients(2).await?;
    let db = pg.client().await?;
    let rows = [
        (main, r#"{"action":"seq","seq":1,"agent_id":"A"}"#),
        (jobs, r#"{"action":"seq","seq":2,"agent_id":"A"}"#),
        (main, r#"{"action":"seq","seq":3,"agent_id":"B"}"#),
        (jobs, r#"{"action":"seq","seq":4,"agent_id":"B"}"#),
        (main, r#"{"action":"seq","seq":5}"#),
        (jobs, r#"{"action":"seq","seq":6}"#),
    ];
    for (channel, payload) in rows {
        publish(&db, channel, payload).await?;
    }
    let mut jobs_ids = Vec::new();
    for seq in [2, 4, 6] {
        let (id, got) = next_message(&mut all_jobs).await?;
        assert_eq!(got, seq);
        jobs_ids.push(id);
    }
    let mut main_ids = Vec::new();
    for seq in [1, 5] {
        let (id, got) = next_message(&mut main_a).await?;
        assert_eq!(got, seq);
        main_ids.push(id);
    }
    // The table's positions are shared by the channels: the offsets interleave.
    assert!(offset(&main_ids[0])? < offset(&jobs_ids[0])?);
    assert!(offset(&jobs_ids[1])? < offset(&main_ids[1])?);
    // The history holds one message: this resume is read from the table, on its channel only,
    // with its filter.
    let since = format!("{}-0", jobs_ids[0].rsplit_once('-').context("id")?.0);
    let mut resumed = ws_connect(
        port,
        &format!("/stream?channel={jobs}&agent_id=B&since={since}"),
    )
    .await?;
    for seq in [4, 6] {
        assert_eq!(next_message(&mut resumed).await?.1, seq);
    }
    publish(&db, jobs, r#"{"action":"seq","seq":7,"agent_id":"A"}"#).await?;
    publish(&db, jobs, r#"{"action":"seq","seq":8,"agent_id":"B"}"#).await?;
    assert_eq!(next_message(&mut resumed).await?.1, 8);
    Ok(())
}

/// Rows past retention are deleted (by the sequencing replica, in small batches), and a client
/// resuming from before them is told with a reset rather than served with a gap.
#[tokio::test(flavor = "multi_thread")]
async fn rows_past_retention_are_deleted_and_a_resume_from_before_them_is_reset() -> Result<()> {
    let pg = PgCluster::private().await?;
    let out = migrate_with(&pg, &[]).await?;
    ensure!(out.code == Some(0), "{out:?}");
    let channel = "durable-retention";
    let server = Server::spawn(
        table_opts(&pg, channel)
            .env("PG_RETENTION", 3600)
            .env("HISTORY_MESSAGES", 2),
    )
    .await?;
    let mut ws = ws_connect_with(server.port(), "/stream", &[PROTOCOL]).await?;
    server.wait_for_clients(1).await?;
    let db = pg.client().await?;
    let mut ids = Vec::new();
    for i in 0..10 {
        publish(&db, channel, &seq_payload(i)).await?;
        ids.push(next_message(&mut ws).await?.0);
    }
    // The first five were published two hours ago, as far as retention can tell.
    db.execute(
        "UPDATE vulcan_stream.messages SET created_at = now() - interval '2 hours' \
         WHERE channel = $1 AND pos <= $2",
        &[&channel, &i64::try_from(offset(&ids[4])?)?],
    )
    .await?;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let left: i64 = db
            .query_one(
                "SELECT count(*) FROM vulcan_stream.messages WHERE channel = $1",
                &[&channel],
            )
            .await?
            .get(0);
        if left == 5 {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{left} rows left after {TIMEOUT:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // From before the deleted rows: a reset naming the head.
    let mut stale = ws_connect(server.port(), &format!("/stream?since={}", ids[1])).await?;
    let reset = next_v1(&mut stale).await?;
    assert_eq!(reset["event"], "reset", "{reset}");
    assert_eq!(reset["reason"], "evicted", "{reset}");
    assert_eq!(reset["id"].as_str(), Some(ids[9].as_str()), "{reset}");
    // From a kept one, older than the history: served from the table.
    let mut kept = ws_connect(server.port(), &format!("/stream?since={}", ids[5])).await?;
    for i in 6..10 {
        assert_eq!(next_message(&mut kept).await?.1, i);
    }
    assert_eq!(
        server.metric("vulcan_stream_rows_expired_total").await?,
        5.0
    );
    assert_eq!(server.metric("vulcan_stream_sequencer_active").await?, 1.0);
    Ok(())
}

/// A measurement rather than a check (run with `--ignored --nocapture`): publish → frame
/// latency in table mode at 500 messages a second for ten seconds, one v1 client, the default
/// PollInterval (or `PG_POLL_INTERVAL` from the environment).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement: run by hand"]
async fn table_mode_latency_at_500_messages_a_second() -> Result<()> {
    const RATE: u64 = 500;
    const SECONDS: u64 = 10;
    let pg = shared().await?;
    let channel = "durable-latency";
    // PG_POLL_INTERVAL in the test's environment tries another interval.
    let poll = std::env::var("PG_POLL_INTERVAL").unwrap_or_else(|_| "5".to_owned());
    let server = Server::spawn(table_opts(pg, channel).env("PG_POLL_INTERVAL", &poll)).await?;
    let mut ws = ws_connect_with(server.port(), "/stream", &[PROTOCOL]).await?;
    server.wait_for_clients(1).await?;
    let db = pg.client().await?;
    let started = std::time::Instant::now();
    let epoch = std::time::SystemTime::now();
    let publisher = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(std::time::Duration::from_micros(1_000_000 / RATE));
        for i in 0..RATE * SECONDS {
            ticker.tick().await;
            let sent = epoch.elapsed()?.as_micros();
            let payload = format!(r#"{{"action":"seq","seq":{i},"sent":{sent}}}"#);
            publish(&db, channel, &payload).await?;
        }
        anyhow::Ok(())
    });
    let mut latencies = Vec::new();
    while latencies.len() < usize::try_from(RATE * SECONDS)? {
        let i = latencies.len() as u64;
        let text = next_event(&mut ws).await?;
        let now = epoch.elapsed()?.as_micros();
        let frame: Value = serde_json::from_str(&text)?;
        if frame["event"] == "ping" {
            continue;
        }
        assert_eq!(frame["data"]["seq"].as_u64(), Some(i));
        let sent = u128::from(frame["data"]["sent"].as_u64().context("sent")?);
        latencies.push(now - sent);
    }
    publisher.await??;
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    eprintln!(
        "table mode, PollInterval {poll} ms, {RATE} msg/s for {:?}: publish → frame p50 {} µs, \
         p99 {} µs, max {} µs",
        started.elapsed(),
        at(0.5),
        at(0.99),
        latencies[latencies.len() - 1]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_test_client_proves_a_table_mode_deployment() -> Result<()> {
    let pg = shared().await?;
    let channel = "durable-test-client";
    let server = Server::spawn(table_opts(pg, channel)).await?;
    let mut env = pg.env();
    for (key, value) in [
        ("PG_CHANNEL", channel.to_owned()),
        ("PG_SOURCE", "table".to_owned()),
        ("PORT", server.port().to_string()),
    ] {
        env.push((key.to_owned(), value));
    }
    for mode in [&[][..], &["--v1"][..], &["--sse"][..]] {
        let out = run_bin(crate::harness::CLIENT_BIN, mode, &env, TIMEOUT * 2).await?;
        ensure!(out.code == Some(0), "{mode:?}: {out:?}");
        assert!(out.stdout.starts_with("ok: "), "{out:?}");
    }
    Ok(())
}

/// Positions are shared by every channel: a restarted server whose head moved on through
/// other channels' rows serves a resume with nothing new on its channel without a reset.
#[tokio::test(flavor = "multi_thread")]
async fn a_resume_with_nothing_new_on_its_channel_gets_no_reset() -> Result<()> {
    let pg = shared().await?;
    let channel = "durable-quiet-channel";
    let db = pg.client().await?;
    let server = Server::spawn(table_opts(pg, channel)).await?;
    let mut ws = ws_connect_with(server.port(), "/stream", &[PROTOCOL]).await?;
    server.wait_for_clients(1).await?;
    publish(&db, channel, &seq_payload(0)).await?;
    let (last, _) = next_message(&mut ws).await?;
    drop(ws);
    drop(server);
    for i in 0..5 {
        publish(&db, "durable-quiet-other", &seq_payload(i)).await?;
    }
    let server = Server::spawn(table_opts(pg, channel)).await?;
    // Some replica sequences them (this one, if no other server runs).
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let other_head = loop {
        let row = db
            .query_one(
                "SELECT max(pos), count(*) FILTER (WHERE pos IS NULL) FROM vulcan_stream.messages \
                 WHERE channel = 'durable-quiet-other'",
                &[],
            )
            .await?;
        if row.get::<_, i64>(1) == 0 {
            break row.get::<_, Option<i64>>(0).context("sequenced")?;
        }
        ensure!(tokio::time::Instant::now() < deadline, "not sequenced");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    server
        .wait_http(
            |r| {
                serde_json::from_slice::<Value>(&r.body).is_ok_and(|v| {
                    v["head"]
                        .as_str()
                        .and_then(|h| offset(h).ok())
                        .is_some_and(|o| o >= u64::try_from(other_head).unwrap_or(u64::MAX))
                })
            },
            "/status",
            "the head past the other channel's rows",
        )
        .await?;
    let mut ws = ws_connect(server.port(), &format!("/stream?since={last}")).await?;
    publish(&db, channel, &seq_payload(1)).await?;
    assert_eq!(
        next_message(&mut ws).await?.1,
        1,
        "no reset, nothing missed"
    );
    Ok(())
}

/// A wake-up that never comes (as in a network partition): the reader's periodic check still
/// finds the row. The row is positioned here by hand, in the sequencer's way but without its
/// NOTIFY.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_wake_up_is_made_up_by_the_periodic_check() -> Result<()> {
    let pg = shared().await?;
    let channel = "durable-lost-wake-up";
    let server = Server::spawn(table_opts(pg, channel)).await?;
    let mut ws = ws_connect_with(server.port(), "/stream", &[PROTOCOL]).await?;
    server.wait_for_clients(1).await?;
    let mut db = pg.client().await?;
    let tx = db.transaction().await?;
    let head: i64 = tx
        .query_one("SELECT head FROM vulcan_stream.lineage FOR UPDATE", &[])
        .await?
        .get(0);
    tx.execute(
        "INSERT INTO vulcan_stream.messages (channel, payload) VALUES ($1, $2)",
        &[&channel, &seq_payload(7)],
    )
    .await?;
    tx.execute(
        "UPDATE vulcan_stream.messages SET pos = $2 WHERE channel = $1",
        &[&channel, &(head + 1)],
    )
    .await?;
    tx.execute("UPDATE vulcan_stream.lineage SET head = $1", &[&(head + 1)])
        .await?;
    tx.commit().await?;
    let (id, seq) = next_message(&mut ws).await?;
    assert_eq!(seq, 7);
    assert_eq!(offset(&id)?, u64::try_from(head + 1)?);
    Ok(())
}

/// A network partition between the server and PostgreSQL: the proxy on the server's way to the
/// database stops forwarding without closing anything, while a publisher goes on committing
/// straight to PostgreSQL; then it heals. The server notices the silence (its periodic read
/// gets no answer within `HealthCheckTimeout`), and once the network is back everything
/// committed reaches the connected client exactly once, in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_network_partition_loses_and_doubles_nothing() -> Result<()> {
    let pg = PgCluster::private().await?;
    let out = migrate_with(&pg, &[]).await?;
    ensure!(out.code == Some(0), "migrate failed: {out:?}");
    let channel = "durable-partition";
    let proxy = Proxy::start(pg.port()).await?;
    let server = Server::spawn(
        table_opts(&pg, channel)
            .env("PG_PORT", proxy.port())
            .env("PG_HEALTH_INTERVAL", 1)
            .env("PG_HEALTH_TIMEOUT", 1),
    )
    .await?;
    let mut ws = ws_connect_with(server.port(), "/stream", &[PROTOCOL]).await?;
    server.wait_for_clients(1).await?;
    let db = pg.client().await?;
    let mut seen = Vec::new();
    let mut positions = Vec::new();
    for i in 0..10 {
        publish(&db, channel, &seq_payload(i)).await?;
    }
    while seen.len() < 10 {
        let (id, seq) = next_message(&mut ws).await?;
        positions.push(offset(&id)?);
        seen.push(seq);
    }

    proxy.blackhole();
    for i in 10..40 {
        publish(&db, channel, &seq_payload(i)).await?;
    }
    server
        .wait_log(|line| line.contains("table reader's connection") && line.contains("lost"))
        .await?;
    proxy.heal();
    publish(&db, channel, &seq_payload(40)).await?;
    while seen.len() < 41 {
        let (id, seq) = next_message(&mut ws).await?;
        positions.push(offset(&id)?);
        seen.push(seq);
    }
    let expected: Vec<u64> = (0..41).collect();
    assert_eq!(seen, expected, "every message once, in order");
    ensure!(
        positions.windows(2).all(|w| w[1] == w[0] + 1),
        "positions follow each other: {positions:?}"
    );
    Ok(())
}

/// A measurement rather than a check (run with `--ignored --nocapture`): commits per second of
/// 8 concurrent publishers for 5 s each way, `pg_notify` against `vulcan_stream.publish`, on
/// one cluster in one run, with a server of each mode running; with `fsync` off (as the tests
/// run PostgreSQL) and on (as production does: a notifying commit holds NOTIFY's cluster-wide
/// lock while its commit record is flushed).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement: run by hand"]
async fn publisher_throughput_table_against_notify() -> Result<()> {
    const PUBLISHERS: usize = 8;
    let pg = PgCluster::private().await?;
    let out = migrate_with(&pg, &[]).await?;
    ensure!(out.code == Some(0), "{out:?}");
    let channel = "durable-throughput";
    let _server = Server::spawn(table_opts(&pg, channel)).await?;
    let _listener = Server::spawn(ServerOpts::with_db(&pg, channel)).await?;
    let admin = pg.connect("postgres").await?;
    for fsync in ["off", "on"] {
        // ALTER SYSTEM cannot share a statement batch (an implicit transaction).
        admin
            .batch_execute(&format!("ALTER SYSTEM SET fsync = {fsync}"))
            .await?;
        admin.batch_execute("SELECT pg_reload_conf()").await?;
        for (name, sql) in [
            ("notify", "SELECT pg_notify($1, $2)"),
            ("table", "SELECT vulcan_stream.publish($1, $2)"),
            ("notify", "SELECT pg_notify($1, $2)"),
            ("table", "SELECT vulcan_stream.publish($1, $2)"),
        ] {
            let stop = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let mut tasks = Vec::new();
            for p in 0..PUBLISHERS {
                let db = pg.client().await?;
                tasks.push(tokio::spawn(async move {
                    let mut count = 0u64;
                    while std::time::Instant::now() < stop {
                        let payload =
                            format!(r#"{{"action":"seq","publisher":{p},"seq":{count}}}"#);
                        db.execute(sql, &[&channel, &payload]).await?;
                        count += 1;
                    }
                    anyhow::Ok(count)
                }));
            }
            let mut total = 0;
            for task in tasks {
                total += task.await??;
            }
            eprintln!(
                "fsync {fsync}, {name}: {PUBLISHERS} publishers, {} commits/s",
                total / 5
            );
        }
    }
    Ok(())
}

/// A short chaos run: a publisher at a steady rate and a client that resumes on whichever
/// replica is up, while the reader's and the sequencer's backends are terminated, PostgreSQL
/// restarts, and a replica is killed (SIGKILL) and started again. Every message arrives once,
/// in order, without a reset.
#[tokio::test(flavor = "multi_thread")]
async fn chaos_loses_doubles_and_reorders_nothing() -> Result<()> {
    const MESSAGES: u64 = 400;
    let pg = std::sync::Arc::new(PgCluster::private().await?);
    let out = migrate_with(&pg, &[]).await?;
    ensure!(out.code == Some(0), "{out:?}");
    let channel = "durable-chaos";
    let mut first = Server::spawn(table_opts(&pg, channel)).await?;
    let second = Server::spawn(table_opts(&pg, channel)).await?;
    let (ports_tx, ports) = tokio::sync::watch::channel(vec![first.port(), second.port()]);
    let (seen_tx, mut seen_rx) = tokio::sync::watch::channel(0usize);

    // Publishes each message exactly once: after an error (the database restarting), it
    // reconnects and checks whether the message was committed before trying again.
    let publisher_pg = pg.clone();
    let publisher = tokio::spawn(async move {
        let mut db = publisher_pg.client().await?;
        let deadline = tokio::time::Instant::now() + TIMEOUT * 6;
        let mut ticker = tokio::time::interval(std::time::Duration::from_millis(5));
        for i in 0..MESSAGES {
            ticker.tick().await;
            let payload = seq_payload(i);
            loop {
                ensure!(
                    tokio::time::Instant::now() < deadline,
                    "publisher stuck at {i}"
                );
                if publish(&db, channel, &payload).await.is_ok() {
                    break;
                }
                let Ok(client) = publisher_pg.client().await else {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                db = client;
                let stored = db
                    .query_one(
                        "SELECT count(*) FROM vulcan_stream.messages \
                         WHERE channel = $1 AND payload = $2",
                        &[&channel, &payload],
                    )
                    .await;
                if matches!(stored, Ok(row) if row.get::<_, i64>(0) > 0) {
                    break;
                }
            }
        }
        anyhow::Ok(())
    });

    // Reads, and on any failure resumes from its last position on the next replica listed.
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut last: Option<String> = None;
        let mut hop = 0usize;
        let deadline = tokio::time::Instant::now() + TIMEOUT * 6;
        while seen.len() < usize::try_from(MESSAGES)? {
            ensure!(
                tokio::time::Instant::now() < deadline,
                "reader stuck after {seen:?}"
            );
            let list = ports.borrow().clone();
            let port = list[hop % list.len()];
            hop += 1;
            let path = match &last {
                Some(id) => format!("/stream?since={id}"),
                None => "/stream".to_owned(),
            };
            let Ok(mut ws) = ws_connect_with(port, &path, &[PROTOCOL]).await else {
                continue;
            };
            while let Ok(frame) = next_v1(&mut ws).await {
                ensure!(
                    frame.get("data").is_some(),
                    "a reset in table mode: {frame}"
                );
                let id = frame["id"].as_str().context("id")?.to_owned();
                seen.push(frame["data"]["seq"].as_u64().context("seq")?);
                last = Some(id);
                seen_tx.send_replace(seen.len());
                if seen.len() == usize::try_from(MESSAGES)? {
                    break;
                }
            }
        }
        anyhow::Ok(seen)
    });

    let mut progress = async |count: usize| {
        tokio::time::timeout(TIMEOUT * 2, seen_rx.wait_for(|seen| *seen >= count))
            .await
            .with_context(|| format!("{count} messages not seen in time"))?
            .context("reader ended")?;
        anyhow::Ok(())
    };
    progress(50).await?;
    pg.connect("postgres")
        .await?
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name IN ('vulcan-stream', 'vulcan-stream sequencer')",
            &[],
        )
        .await?;
    progress(120).await?;
    pg.stop().await?;
    pg.start().await?;
    progress(200).await?;
    first.signal(libc::SIGKILL)?;
    first.quiet_on_drop();
    first = Server::spawn(table_opts(&pg, channel)).await?;
    ports_tx.send_replace(vec![first.port(), second.port()]);
    progress(280).await?;
    pg.connect("postgres")
        .await?
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'vulcan-stream'",
            &[],
        )
        .await?;

    publisher.await??;
    let seen = reader.await??;
    let expected: Vec<u64> = (0..MESSAGES).collect();
    assert_eq!(seen, expected, "every message once, in order");
    drop(first);
    Ok(())
}

/// The replica that gives positions is killed: another takes the sequencer lock over and
/// delivery goes on; a stop signal still ends a table-mode server cleanly.
#[tokio::test(flavor = "multi_thread")]
async fn another_replica_takes_over_when_the_sequencer_dies() -> Result<()> {
    let pg = PgCluster::private().await?;
    let out = migrate_with(&pg, &[]).await?;
    ensure!(out.code == Some(0), "{out:?}");
    let channel = "durable-takeover";
    let mut servers = vec![
        Server::spawn(table_opts(&pg, channel)).await?,
        Server::spawn(table_opts(&pg, channel)).await?,
    ];
    // Exactly one of them sequences.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let holder = loop {
        let mut active = Vec::new();
        for server in &servers {
            active.push(server.metric("vulcan_stream_sequencer_active").await?);
        }
        if active.iter().sum::<f64>() == 1.0 {
            break active.iter().position(|a| *a == 1.0).context("a holder")?;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "sequencers: {active:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    };
    let mut killed = servers.remove(holder);
    let mut survivor = servers.remove(0);
    let mut ws = ws_connect_with(survivor.port(), "/stream", &[PROTOCOL]).await?;
    survivor.wait_for_clients(1).await?;
    killed.signal(libc::SIGKILL)?;
    killed.quiet_on_drop();
    killed.wait_exit(TIMEOUT).await?;
    let db = pg.client().await?;
    for i in 0..5 {
        publish(&db, channel, &seq_payload(i)).await?;
    }
    for i in 0..5 {
        assert_eq!(next_message(&mut ws).await?.1, i);
    }
    assert_eq!(
        survivor.metric("vulcan_stream_sequencer_active").await?,
        1.0
    );
    survivor.signal(libc::SIGTERM)?;
    let status = survivor
        .wait_exit(std::time::Duration::from_secs(5))
        .await?;
    assert_eq!(status.code(), Some(0), "{status}");
    Ok(())
}
