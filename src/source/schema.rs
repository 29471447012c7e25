//! The durable mode's schema, `vulcan_stream`: the SQL that creates it (shipped in
//! `_resources/sql/` for teams that run their own migrations, and embedded here), the migration
//! that `vulcan-stream migrate` runs, and the names and lock keys the table source shares with it.
//!
//! Every migration file is idempotent and the whole run is one transaction that first takes a
//! transaction-level advisory lock, so replicas that migrate at once wait for each other and the
//! later ones find nothing to do.

use postgres_native_tls::MakeTlsConnector;
use tokio_postgres::Client;

use super::pg;
use crate::config::ReceiverConfig;
pub use crate::error::SchemaError;

/// The migration files, in order: (schema version, SQL).
pub const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../_resources/sql/001_schema.sql")),
    (
        2,
        include_str!("../../_resources/sql/002_cheaper_check.sql"),
    ),
];

pub use crate::error::SCHEMA_VERSION;

/// The first key of every advisory lock this service takes (the two-key form, so that it
/// cannot collide with an application's single-key locks): "vs".
pub const LOCK_CLASS: i32 = 30323;
/// Held for the migration's transaction.
pub const LOCK_MIGRATE: i32 = 1;
/// Held by the replica that sequences, for as long as its session lives.
pub const LOCK_SEQUENCER: i32 = 2;

/// The channel the sequencer NOTIFYs after each step: a wake-up for every reader; the payload
/// is the new head.
pub const WAKE_CHANNEL: &str = "vulcan_stream";

/// What a migration found and left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// The version before (0: no schema).
    pub from: i32,
    pub to: i32,
    /// The lineage: the epoch of every position in this database.
    pub epoch: String,
}

/// `PostgreSQL host:port/db`, for messages.
pub fn target(config: &ReceiverConfig) -> String {
    format!(
        "PostgreSQL {}:{}/{}",
        config.host, config.port, config.dbname
    )
}

/// Creates or upgrades the schema in one transaction, and records `MaxPayload` for the
/// publishers' check (`vulcan_stream.max_payload()`).
pub async fn migrate(
    config: &ReceiverConfig,
    tls: &MakeTlsConnector,
) -> Result<Migrated, SchemaError> {
    let target = target(config);
    let (mut client, connection) = pg::connect(config, tls, "vulcan-stream migrate")
        .await
        .map_err(|err| SchemaError::Connect {
            target: target.clone(),
            cause: pg::describe_error(&err),
        })?;
    let driver = tokio::spawn(connection);
    let result = migrate_on(&mut client, config, &target).await;
    drop(client);
    let _ = driver.await;
    result
}

async fn migrate_on(
    client: &mut Client,
    config: &ReceiverConfig,
    target: &str,
) -> Result<Migrated, SchemaError> {
    let failed = |version: i32| {
        move |err: tokio_postgres::Error| SchemaError::Migrate {
            version,
            target: target.to_owned(),
            cause: pg::describe_error(&err),
        }
    };
    let tx = client.transaction().await.map_err(failed(0))?;
    // The SQL's "already exists, skipping" notices say nothing an operator needs.
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await
        .map_err(failed(0))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, $2)",
        &[&LOCK_CLASS, &LOCK_MIGRATE],
    )
    .await
    .map_err(failed(0))?;
    let exists: bool = tx
        .query_one(
            "SELECT to_regclass('vulcan_stream.schema_version') IS NOT NULL",
            &[],
        )
        .await
        .map_err(failed(0))?
        .get(0);
    let from: i32 = if exists {
        tx.query_one(
            "SELECT coalesce(max(version), 0) FROM vulcan_stream.schema_version",
            &[],
        )
        .await
        .map_err(failed(0))?
        .get(0)
    } else {
        0
    };
    if from > SCHEMA_VERSION {
        return Err(SchemaError::Newer {
            target: target.to_owned(),
            found: from,
        });
    }
    for (version, sql) in MIGRATIONS {
        if *version > from {
            tx.batch_execute(sql).await.map_err(failed(*version))?;
        }
    }
    // A constant in a function, so that the publishers' check costs no lookup. The value is a
    // validated integer (at most 256 MiB), so formatting it into the statement is safe.
    let max_payload = i32::try_from(config.max_payload).unwrap_or(i32::MAX);
    tx.batch_execute(&format!(
        "CREATE OR REPLACE FUNCTION vulcan_stream.max_payload() RETURNS integer \
         LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT {max_payload}'"
    ))
    .await
    .map_err(failed(SCHEMA_VERSION))?;
    let epoch: String = tx
        .query_one("SELECT epoch FROM vulcan_stream.lineage", &[])
        .await
        .map_err(failed(SCHEMA_VERSION))?
        .get(0);
    tx.commit().await.map_err(failed(SCHEMA_VERSION))?;
    Ok(Migrated {
        from,
        to: SCHEMA_VERSION,
        epoch,
    })
}

/// The lineage as a reader needs it: the epoch, the head, and the largest payload publishers
/// may store. Fails with [`SchemaError::Missing`] when `migrate` has not been run.
pub async fn lineage(client: &Client, target: &str) -> Result<(String, i64), SchemaError> {
    let row = client
        .query_one(
            "SELECT l.epoch, l.head, (SELECT max(version) FROM vulcan_stream.schema_version) \
             FROM vulcan_stream.lineage l",
            &[],
        )
        .await
        .map_err(|err| {
            let missing = err
                .as_db_error()
                .is_some_and(|db| matches!(db.code().code(), "42P01" | "3F000"));
            let cause = pg::describe_error(&err);
            if missing {
                SchemaError::Missing {
                    target: target.to_owned(),
                    cause,
                }
            } else {
                SchemaError::Query {
                    target: target.to_owned(),
                    cause,
                }
            }
        })?;
    let version: Option<i32> = row.get(2);
    match version {
        Some(found) if found > SCHEMA_VERSION => Err(SchemaError::Newer {
            target: target.to_owned(),
            found,
        }),
        Some(SCHEMA_VERSION) => Ok((row.get(0), row.get(1))),
        other => Err(SchemaError::Missing {
            target: target.to_owned(),
            cause: format!("schema version {}", other.unwrap_or(0)),
        }),
    }
}
