//! The durable source (`Receiver.Source = "table"`): messages are rows of
//! `vulcan_stream.messages`, and their positions come from the table, so that every replica
//! gives a message the same position and a position outlives restarts.
//!
//! Three parts, each with its own connection:
//! - [`Sequencer`]: on one replica at a time (the holder of a session-level advisory lock; any
//!   other takes over within [`STANDBY_INTERVAL`] when the holder's session ends), it calls
//!   `vulcan_stream.assign_positions` every `PollInterval`: one short transaction that gives
//!   the committed rows without a position the next positions in insert order, then NOTIFYs
//!   the readers. Steps follow each other (the lineage row's lock), so positions become
//!   visible in order and a reader that reads `pos > last` never skips a row, whatever order
//!   publishers committed in; an unrelated open transaction holds nothing it waits for.
//!   Publishers do not NOTIFY: that would take PostgreSQL's cluster-wide NOTIFY lock at every
//!   commit, which is what table mode exists to avoid.
//!   The same replica deletes rows older than `Retention`, a small batch at a time between two
//!   steps ([`RETENTION_INTERVAL`]), oldest positions first.
//! - [`TableReader`]: on every replica, LISTENs for the sequencer's wake-up and also reads
//!   every [`CHECK_INTERVAL`] (a lost wake-up, in a network partition say, then costs at most
//!   that), reading the channel's rows `pos > cursor ORDER BY pos`, page by page, into the
//!   stream. Its cursor survives reconnects, so a lost connection or a PostgreSQL restart
//!   loses and doubles nothing.
//! - [`TableArchive`]: the stream reads the table through it for clients that resume from
//!   further back than the history.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use postgres_native_tls::MakeTlsConnector;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;

use super::notify::Backoff;
use super::pg::{self, PgConnection};
use super::schema::{self, LOCK_CLASS, LOCK_SEQUENCER, WAKE_CHANNEL};
use crate::config::ReceiverConfig;
use crate::message::{Epoch, Position};
use crate::metrics::Metrics;
use crate::stream::{Archive, ArchivedRow, ListenerState, Page, Stream};

/// How often a reader reads even without a wake-up.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How often a replica that does not sequence tries to take the sequencer's lock.
pub const STANDBY_INTERVAL: Duration = Duration::from_secs(1);
/// Rows a sequencer step positions at most (a backlog takes several steps, back to back).
const SEQUENCER_BATCH: i32 = 10_000;
/// Rows deleted by retention per statement: small, so that no statement holds many row locks
/// or runs long.
const RETENTION_BATCH: i32 = 1000;
/// How often the sequencer looks for rows past retention.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(1);
/// Rows a reader reads per query.
const READ_PAGE: i64 = 1000;

/// Reads the channel's rows in position order, for the life of the service.
pub struct TableReader {
    pub config: ReceiverConfig,
    pub tls: MakeTlsConnector,
    pub stream: Arc<Stream>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
}

/// Why a session with the database ended.
enum SessionEnd {
    Shutdown,
    /// Never got to reading (connection, LISTEN or the schema).
    Failed(String),
    /// Was reading, then lost it.
    Lost(String),
}

/// The last position read: the lineage and the offset.
type Cursor = Option<(Epoch, u64)>;

impl TableReader {
    pub async fn run(self) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut cursor: Cursor = None;
        let mut last_cause: Option<String> = None;
        loop {
            let end = self.session(&mut cursor, &mut backoff).await;
            self.stream.set_listener_state(ListenerState::Connecting);
            let delay = backoff.next_delay();
            match end {
                SessionEnd::Shutdown => {
                    log::info!("table reader stopped");
                    return;
                }
                SessionEnd::Lost(cause) => {
                    log::warn!(
                        "table reader's connection to {} lost: {cause}; reconnecting (nothing is \
                         lost: it continues from its last position)",
                        schema::target(&self.config)
                    );
                    last_cause = None;
                }
                SessionEnd::Failed(cause) => {
                    if last_cause.as_deref() == Some(cause.as_str()) {
                        log::debug!("table reader: {cause}; retrying in {delay:.1?}");
                    } else {
                        log::warn!("table reader: {cause}; retrying with backoff");
                        last_cause = Some(cause);
                    }
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    log::info!("table reader stopped");
                    return;
                }
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn session(&self, cursor: &mut Cursor, backoff: &mut Backoff) -> SessionEnd {
        let target = schema::target(&self.config);
        let (client, connection) = match connect(
            &self.config,
            &self.tls,
            "vulcan-stream",
            &self.shutdown,
            &target,
        )
        .await
        {
            Ok(pair) => pair,
            Err(end) => return end,
        };
        let wake = Notify::new();
        let mut connection = std::pin::pin!(drive(connection, &wake));
        let channels = self.config.channels();
        let setup = async {
            let listen = format!("LISTEN {}", pg::quote_ident(WAKE_CHANNEL));
            client
                .batch_execute(&listen)
                .await
                .map_err(|err| pg::describe_error(&err))?;
            let (epoch, head) = schema::lineage(&client, &target)
                .await
                .map_err(|err| err.to_string())?;
            let epoch = parse_epoch(&epoch)?;
            // One channel reads by the (channel, pos) index; several, by the position index.
            let on_channels = if channels.len() == 1 {
                "channel = ($1::text[])[1]"
            } else {
                "channel = ANY($1::text[])"
            };
            let statement = client
                .prepare(&format!(
                    "WITH h AS (SELECT head FROM vulcan_stream.lineage) \
                     SELECT h.head, m.pos, m.payload, m.channel FROM h LEFT JOIN LATERAL \
                     (SELECT pos, payload, channel FROM vulcan_stream.messages \
                      WHERE {on_channels} AND pos > $2 AND pos <= h.head ORDER BY pos LIMIT $3) m \
                     ON true",
                ))
                .await
                .map_err(|err| pg::describe_error(&err))?;
            Ok::<_, String>((epoch, head, statement))
        };
        let (epoch, head, statement) = tokio::select! {
            _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
            ended = &mut connection => return SessionEnd::Failed(ended),
            result = setup => match result {
                Ok(found) => found,
                Err(cause) => return SessionEnd::Failed(cause),
            },
        };
        let start = match *cursor {
            Some((known, offset)) if known == epoch => offset,
            _ => u64::try_from(head).unwrap_or(0),
        };
        tokio::select! {
            _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
            () = self.stream.continue_at(Position { epoch, offset: start }) => {}
        }
        let reconnected = cursor.is_some();
        *cursor = Some((epoch, start));
        self.stream.set_listener_state(ListenerState::Listening);
        backoff.reset();
        if reconnected {
            self.metrics.listener_reconnects.inc();
        }
        log::info!(
            "reading channels {channels:?} from table vulcan_stream.messages on {target} after \
             position {}",
            Position {
                epoch,
                offset: start
            }
        );
        let timeout = self.config.health_timeout;
        loop {
            // Everything there is, page by page.
            loop {
                let offset = cursor.map_or(0, |(_, offset)| offset);
                let after = i64::try_from(offset).unwrap_or(i64::MAX);
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                    [&channels, &after, &READ_PAGE];
                let query = client.query(&statement, &params);
                let rows = tokio::select! {
                    _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
                    ended = &mut connection => return SessionEnd::Lost(ended),
                    result = tokio::time::timeout(timeout, query) => match result {
                        Ok(Ok(rows)) => rows,
                        Ok(Err(err)) => return SessionEnd::Lost(pg::describe_error(&err)),
                        Err(_) => return SessionEnd::Lost(format!("read unanswered after {timeout:?}")),
                    },
                };
                let mut batch = Vec::with_capacity(rows.len());
                let mut table_head = offset;
                let mut read = 0;
                let mut last = offset;
                for row in &rows {
                    let head: i64 = row.get(0);
                    table_head = u64::try_from(head).unwrap_or(0);
                    let Some(pos) = row.get::<_, Option<i64>>(1) else {
                        continue;
                    };
                    read += 1;
                    let pos = u64::try_from(pos).unwrap_or(0);
                    last = pos;
                    let payload: &str = row.get(2);
                    let channel: &str = row.get(3);
                    let position = Position { epoch, offset: pos };
                    if payload.len() > self.config.max_payload {
                        self.metrics.notifications_received.inc();
                        self.metrics.notifications_invalid.inc();
                        log::warn!(
                            "row {position} on {channel:?} dropped: {} bytes, above MaxPayload \
                             ({})",
                            payload.len(),
                            self.config.max_payload
                        );
                        continue;
                    }
                    if let Some(message) = self.stream.accept_at(channel, payload, position) {
                        batch.push(message);
                    }
                }
                tokio::select! {
                    _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
                    () = self.stream.publish(&mut batch) => {}
                }
                *cursor = Some((epoch, last));
                if read < READ_PAGE {
                    // Every row of the channel up to the table's head is read.
                    if table_head > last {
                        *cursor = Some((epoch, table_head));
                        self.stream.advance_to(table_head);
                    }
                    break;
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
                ended = &mut connection => return SessionEnd::Lost(ended),
                () = wake.notified() => {}
                () = tokio::time::sleep(CHECK_INTERVAL) => {}
            }
        }
    }
}

/// The lineage as stored: 1 to 16 lower-case hexadecimal digits.
fn parse_epoch(text: &str) -> Result<Epoch, String> {
    format!("{text}-0")
        .parse::<Position>()
        .map(|position| position.epoch)
        .map_err(|err| format!("vulcan_stream.lineage.epoch {text:?} is not an epoch: {err}"))
}

/// Drives a connection until it ends, turning the sequencer's NOTIFYs into wake-ups. Returns
/// why it ended.
/// Connects as `application`, unless shutdown comes first; either way a failure is the
/// session's end.
async fn connect(
    config: &ReceiverConfig,
    tls: &MakeTlsConnector,
    application: &str,
    shutdown: &CancellationToken,
    target: &str,
) -> Result<(Client, PgConnection), SessionEnd> {
    tokio::select! {
        _ = shutdown.cancelled() => Err(SessionEnd::Shutdown),
        result = pg::connect(config, tls, application) => result.map_err(|err| {
            let failure = pg::describe_connect_error(&err, config);
            SessionEnd::Failed(format!("cannot connect to {target}: {}", failure.text))
        }),
    }
}

async fn drive(mut connection: PgConnection, wake: &Notify) -> String {
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(message) = messages.next().await {
        match message {
            Ok(AsyncMessage::Notification(n)) if n.channel() == WAKE_CHANNEL => wake.notify_one(),
            Ok(AsyncMessage::Notice(notice)) => {
                log::debug!("PostgreSQL notice: {}", notice.message());
            }
            Ok(_) => {}
            Err(err) => return pg::describe_error(&err),
        }
    }
    "connection closed by the server".to_owned()
}

/// Gives committed rows their positions, on one replica at a time.
pub struct Sequencer {
    pub config: ReceiverConfig,
    pub tls: MakeTlsConnector,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
}

impl Sequencer {
    pub async fn run(self) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut last_cause: Option<String> = None;
        loop {
            let end = self.session(&mut backoff).await;
            // The lock went with the session.
            self.metrics.sequencer_active.set(0);
            let cause = match end {
                SessionEnd::Shutdown => return,
                SessionEnd::Lost(cause) | SessionEnd::Failed(cause) => cause,
            };
            if last_cause.as_deref() == Some(cause.as_str()) {
                log::debug!("sequencer: {cause}; retrying");
            } else {
                log::warn!("sequencer: {cause}; retrying with backoff");
                last_cause = Some(cause);
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    async fn session(&self, backoff: &mut Backoff) -> SessionEnd {
        let target = schema::target(&self.config);
        let (client, connection) = match connect(
            &self.config,
            &self.tls,
            "vulcan-stream sequencer",
            &self.shutdown,
            &target,
        )
        .await
        {
            Ok(pair) => pair,
            Err(end) => return end,
        };
        let ignored = Notify::new();
        let mut connection = std::pin::pin!(drive(connection, &ignored));
        let timeout = self.config.health_timeout;
        // A holder cut off by a network partition keeps its lock until PostgreSQL notices the
        // session is gone; an idle timeout (PostgreSQL 14 and later) bounds that, since a
        // holder that is alive queries every PollInterval.
        let idle = format!(
            "SET idle_session_timeout = {}",
            (timeout.as_millis() * 2).max(1000)
        );
        tokio::select! {
            _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
            ended = &mut connection => return SessionEnd::Failed(ended),
            result = client.batch_execute(&idle) => if let Err(err) = result {
                log::debug!("sequencer: {idle} refused ({}); relying on TCP keepalive", pg::describe_error(&err));
            },
        }
        let mut announced = false;
        loop {
            let attempt = client.query_one(
                "SELECT pg_try_advisory_lock($1, $2)",
                &[&LOCK_CLASS, &LOCK_SEQUENCER],
            );
            let held: bool = tokio::select! {
                _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
                ended = &mut connection => return SessionEnd::Lost(ended),
                result = tokio::time::timeout(timeout, attempt) => match result {
                    Ok(Ok(row)) => row.get(0),
                    Ok(Err(err)) => return SessionEnd::Lost(pg::describe_error(&err)),
                    Err(_) => return SessionEnd::Lost(format!("lock query unanswered after {timeout:?}")),
                },
            };
            backoff.reset();
            if held {
                break;
            }
            if !announced {
                log::info!("sequencer on standby: another replica gives positions");
                announced = true;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
                ended = &mut connection => return SessionEnd::Lost(ended),
                () = tokio::time::sleep(STANDBY_INTERVAL) => {}
            }
        }
        log::info!("this replica now gives positions to new rows (it holds the sequencer lock)");
        self.metrics.sequencer_active.set(1);
        let statement = tokio::select! {
            _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
            ended = &mut connection => return SessionEnd::Lost(ended),
            result = client.prepare("SELECT vulcan_stream.assign_positions($1)") => match result {
                Ok(statement) => statement,
                Err(err) => return SessionEnd::Failed(pg::describe_error(&err)),
            },
        };
        let expire = tokio::select! {
            _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
            ended = &mut connection => return SessionEnd::Lost(ended),
            result = client.prepare("SELECT vulcan_stream.expire(make_interval(secs => $1), $2)") => match result {
                Ok(statement) => statement,
                Err(err) => return SessionEnd::Failed(pg::describe_error(&err)),
            },
        };
        let retention = self.config.retention.as_secs_f64();
        let mut next_expiry = tokio::time::Instant::now();
        let mut previous: Option<i64> = None;
        loop {
            if tokio::time::Instant::now() >= next_expiry {
                // One small batch between two steps: sequencing never waits for more.
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
                    [&retention, &RETENTION_BATCH];
                let batch = client.query_one(&expire, &params);
                let deleted: i32 = tokio::select! {
                    _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
                    ended = &mut connection => return SessionEnd::Lost(ended),
                    result = tokio::time::timeout(timeout, batch) => match result {
                        Ok(Ok(row)) => row.get(0),
                        Ok(Err(err)) => return SessionEnd::Lost(pg::describe_error(&err)),
                        Err(_) => return SessionEnd::Lost(format!("retention unanswered after {timeout:?}")),
                    },
                };
                if deleted > 0 {
                    self.metrics
                        .rows_expired
                        .inc_by(u64::from(deleted.unsigned_abs()));
                    log::debug!("retention: {deleted} row(s) deleted");
                }
                if deleted < RETENTION_BATCH {
                    next_expiry = tokio::time::Instant::now() + RETENTION_INTERVAL;
                }
            }
            let step = client.query_one(&statement, &[&SEQUENCER_BATCH]);
            let head: i64 = tokio::select! {
                _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
                ended = &mut connection => return SessionEnd::Lost(ended),
                result = tokio::time::timeout(timeout, step) => match result {
                    Ok(Ok(row)) => row.get(0),
                    Ok(Err(err)) => return SessionEnd::Lost(pg::describe_error(&err)),
                    Err(_) => return SessionEnd::Lost(format!("step unanswered after {timeout:?}")),
                },
            };
            let full = previous.is_some_and(|p| head - p >= i64::from(SEQUENCER_BATCH));
            previous = Some(head);
            if full {
                continue;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
                ended = &mut connection => return SessionEnd::Lost(ended),
                () = tokio::time::sleep(self.config.poll_interval) => {}
            }
        }
    }
}

/// The table, for resumes beyond the history: one connection, opened when first needed and
/// again after it is lost.
pub struct TableArchive {
    config: ReceiverConfig,
    tls: MakeTlsConnector,
    client: Mutex<Option<Arc<Client>>>,
}

impl TableArchive {
    pub fn new(config: ReceiverConfig, tls: MakeTlsConnector) -> TableArchive {
        TableArchive {
            config,
            tls,
            client: Mutex::new(None),
        }
    }

    async fn client(&self) -> Result<Arc<Client>, String> {
        let current = self
            .client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(client) = current.filter(|c| !c.is_closed()) {
            return Ok(client);
        }
        let (client, connection) = pg::connect(&self.config, &self.tls, "vulcan-stream resume")
            .await
            .map_err(|err| pg::describe_connect_error(&err, &self.config).text)?;
        // The task ends when the client is dropped or the connection is lost.
        tokio::spawn(connection);
        let client = Arc::new(client);
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = Some(client.clone());
        Ok(client)
    }
}

impl Archive for TableArchive {
    fn after<'a>(
        &'a self,
        channel: &'a str,
        offset: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Page, String>> {
        Box::pin(async move {
            let client = self.client().await?;
            let after = i64::try_from(offset).unwrap_or(i64::MAX);
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                [&channel, &after, &limit];
            let query = client.query(
                "SELECT pos, payload, (SELECT min(pos) FROM vulcan_stream.messages) \
                 FROM (SELECT 1) one LEFT JOIN LATERAL \
                 (SELECT pos, payload FROM vulcan_stream.messages \
                  WHERE channel = $1 AND pos > $2 ORDER BY pos LIMIT $3) m ON true",
                &params,
            );
            let timeout = self.config.health_timeout;
            let rows = tokio::time::timeout(timeout, query)
                .await
                .map_err(|_| format!("resume query unanswered after {timeout:?}"))?
                .map_err(|err| pg::describe_error(&err))?;
            let mut page = Page::default();
            for row in rows {
                page.oldest = row
                    .get::<_, Option<i64>>(2)
                    .and_then(|o| u64::try_from(o).ok());
                let (Some(pos), Some(payload)) = (
                    row.get::<_, Option<i64>>(0),
                    row.get::<_, Option<String>>(1),
                ) else {
                    continue;
                };
                if payload.len() <= self.config.max_payload {
                    page.rows.push(ArchivedRow {
                        offset: u64::try_from(pos).unwrap_or(0),
                        payload,
                    });
                }
            }
            Ok(page)
        })
    }
}
