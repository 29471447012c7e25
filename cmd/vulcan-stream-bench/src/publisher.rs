//! Publishers: K PostgreSQL connections calling `pg_notify` (or, for a server in table mode,
//! `vulcan_stream.publish`), each with its own sequence, optionally batched, paced to a rate or
//! held back by a flow-control window.
//!
//! A batch is one statement, `SELECT count(pg_notify($1, p)) FROM unnest($2::text[])`, so one
//! round trip and one commit carry many messages in order; the generator builds the
//! payloads, which keeps their size exact. Every payload of a batch carries the time the
//! statement was sent, so its latency includes the statement and the commit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_postgres::{Client, Statement};

use crate::db::{Db, Source};
use crate::error::BenchError;
use crate::payload::{self, Clock, Stamp};

/// How much to publish and how fast.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Messages in total, spread over the publishers; `None` with a `duration`.
    pub messages: Option<u64>,
    pub duration: Option<Duration>,
    /// Messages per second in total; `None`: as fast as possible.
    pub rate: Option<f64>,
    /// Notifications per statement.
    pub batch: usize,
    pub payload_size: usize,
    /// Go on through a lost connection or a database restart: reconnect, and count a statement
    /// that failed as uncertain rather than failing the run (see [`Published::uncertain`]).
    pub survive: bool,
}

/// Holds publishers back while the slowest receiver is more than `window` messages behind.
pub struct Flow {
    pub window: u64,
    /// The least number of messages any live receiver has; `None` when none is left.
    pub delivered: Box<dyn Fn() -> Option<u64> + Send + Sync>,
}

/// Shared between the publishers while they run and read by the others.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages handed to PostgreSQL (committed or in flight).
    pub issued: AtomicU64,
    /// First statement's send time ([`Clock::now_ns`]); `u64::MAX` before.
    pub first_send_ns: AtomicU64,
    /// Set to end the publishers before their plan does (after the statement in flight).
    pub stop: AtomicBool,
}

/// What the publishers did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Published {
    /// Committed messages per publisher.
    pub per_publisher: Vec<u64>,
    pub total: u64,
    pub statements: u64,
    pub first_send_ns: u64,
    pub last_commit_ns: u64,
    /// Committed messages per second, from the first send to the last commit.
    pub rate: f64,
    /// Time spent waiting for the flow-control window, summed over publishers (seconds).
    pub flow_wait_s: f64,
    /// With [`Plan::survive`]: messages whose statement failed, so that whether they committed
    /// was unknown. To the table source they are looked up afterwards, and those found count
    /// as committed in `per_publisher`; a NOTIFY cannot be looked up, so to the notify source
    /// they all count as committed, and what is lost is an upper bound.
    #[serde(default)]
    pub uncertain: u64,
    /// Of the uncertain messages, those found committed (table source only).
    #[serde(default)]
    pub uncertain_committed: u64,
    /// With [`Plan::survive`]: each time publishing failed, from the first failed statement
    /// to the next that succeeded ([`Clock::now_ns`]), over every publisher.
    #[serde(default)]
    pub outages: Vec<(u64, u64)>,
}

/// Opens `count` publisher connections.
pub async fn connect(db: &Db, count: usize) -> Result<Vec<Client>, BenchError> {
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count {
        clients.push(db.connect().await?);
    }
    Ok(clients)
}

/// Publishes `plan` from every connection in `clients` and waits for them.
pub async fn run(
    db: &Db,
    clients: Vec<Client>,
    plan: Plan,
    clock: Clock,
    run: u32,
    flow: Option<Arc<Flow>>,
    counters: Arc<Counters>,
) -> Result<Published, BenchError> {
    run_as(db, clients, plan, clock, run, 0, flow, counters).await
}

/// [`run`], the publishers numbered from `first_id`: a mode that publishes in phases gives
/// each phase its own publisher numbers, so that each keeps a sequence of its own.
#[allow(clippy::too_many_arguments)]
pub async fn run_as(
    db: &Db,
    clients: Vec<Client>,
    plan: Plan,
    clock: Clock,
    run: u32,
    first_id: u32,
    flow: Option<Arc<Flow>>,
    counters: Arc<Counters>,
) -> Result<Published, BenchError> {
    counters.first_send_ns.store(u64::MAX, Ordering::Relaxed);
    let k = clients.len() as u64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let quota = plan.messages.map(|m| m / k + u64::from((i as u64) < m % k));
        let task = PublisherTask {
            id: first_id + i as u32,
            client,
            db: db.clone(),
            plan,
            quota,
            deadline: plan.duration.map(|d| started + d),
            per_publisher_rate: plan.rate.map(|r| r / k as f64),
            clock,
            run,
            flow: flow.clone(),
            counters: counters.clone(),
        };
        tasks.push(tokio::spawn(task.run()));
    }
    let mut published = Published::default();
    let mut failure = None;
    let mut uncertain = Vec::new();
    for task in tasks {
        match task.await {
            Ok(Ok(done)) => {
                published.uncertain += done.uncertain.len() as u64;
                published.outages.extend(done.outages);
                uncertain.push(done.uncertain);
                published.per_publisher.push(done.committed);
                published.statements += done.statements;
                published.last_commit_ns = published.last_commit_ns.max(done.last_commit_ns);
                published.flow_wait_s += done.flow_wait.as_secs_f64();
            }
            Ok(Err(cause)) => {
                uncertain.push(Vec::new());
                published.per_publisher.push(0);
                failure.get_or_insert(cause);
            }
            Err(join) => {
                uncertain.push(Vec::new());
                published.per_publisher.push(0);
                failure.get_or_insert(join.to_string());
            }
        }
    }
    if let Some(cause) = failure {
        return Err(BenchError::Publish {
            target: db.target.clone(),
            cause,
        });
    }
    for (committed, payloads) in published.per_publisher.iter_mut().zip(&uncertain) {
        let found = match db.source {
            Source::Notify => payloads.len() as u64,
            Source::Table => committed_rows(db, payloads).await?,
        };
        *committed += found;
        published.uncertain_committed += found;
    }
    if db.source == Source::Notify {
        published.uncertain_committed = 0;
    }
    published.total = published.per_publisher.iter().sum();
    published.first_send_ns = counters.first_send_ns.load(Ordering::Relaxed);
    let span = published
        .last_commit_ns
        .saturating_sub(published.first_send_ns);
    if span > 0 && published.first_send_ns != u64::MAX {
        published.rate = published.total as f64 * 1e9 / span as f64;
    }
    Ok(published)
}

/// How many of `payloads` are rows of the table: the uncertain messages that committed.
async fn committed_rows(db: &Db, payloads: &[String]) -> Result<u64, BenchError> {
    if payloads.is_empty() {
        return Ok(0);
    }
    let client = db.connect().await?;
    let row = client
        .query_one(
            "SELECT count(*) FROM vulcan_stream.messages WHERE channel = $1 AND payload = ANY($2)",
            &[&db.channel, &payloads],
        )
        .await
        .map_err(|err| BenchError::Publish {
            target: db.target.clone(),
            cause: format!("looking up the uncertain messages: {err:#}"),
        })?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

struct PublisherTask {
    id: u32,
    client: Client,
    db: Db,
    plan: Plan,
    quota: Option<u64>,
    deadline: Option<Instant>,
    per_publisher_rate: Option<f64>,
    clock: Clock,
    run: u32,
    flow: Option<Arc<Flow>>,
    counters: Arc<Counters>,
}

struct Done {
    committed: u64,
    statements: u64,
    last_commit_ns: u64,
    flow_wait: Duration,
    /// With [`Plan::survive`]: the payloads of statements that failed, which may or may not
    /// have committed.
    uncertain: Vec<String>,
    /// With [`Plan::survive`]: when a statement first failed and when one next succeeded.
    outages: Vec<(u64, u64)>,
}

/// A statement that takes longer than this is given up as failed, with [`Plan::survive`]: a
/// connection whose packets vanish would otherwise hold the publisher forever.
const SURVIVE_STATEMENT_LIMIT: Duration = Duration::from_secs(10);

/// A publisher connection with its two statements prepared.
struct Prepared {
    client: Client,
    one: Statement,
    batch: Statement,
}

impl Prepared {
    async fn new(client: Client, source: Source) -> Result<Prepared, String> {
        let batch = client
            .prepare(source.batch_sql())
            .await
            .map_err(|e| format!("{e:#}"))?;
        let one = client
            .prepare(source.one_sql())
            .await
            .map_err(|e| format!("{e:#}"))?;
        Ok(Prepared { client, one, batch })
    }

    async fn publish(&self, channel: &String, payloads: &Vec<String>) -> Result<(), String> {
        let result = if payloads.len() == 1 {
            self.client
                .query_one(&self.one, &[channel, &payloads[0]])
                .await
        } else {
            self.client
                .query_one(&self.batch, &[channel, payloads])
                .await
        };
        result.map(drop).map_err(|e| format!("{e:#}"))
    }
}

impl PublisherTask {
    async fn run(self) -> Result<Done, String> {
        let mut conn = Some(Prepared::new(self.client, self.db.source).await?);
        let batch = self.plan.batch.max(1) as u64;
        let interval = self
            .per_publisher_rate
            .map(|rate| Duration::from_secs_f64(batch as f64 / rate));
        let mut next_send = Instant::now();
        let mut done = Done {
            committed: 0,
            statements: 0,
            last_commit_ns: 0,
            flow_wait: Duration::ZERO,
            uncertain: Vec::new(),
            outages: Vec::new(),
        };
        // The next sequence number: past the committed ones and any that failed.
        let mut next_seq = 0;
        let mut failing_since = None;
        let mut payloads: Vec<String> = Vec::new();
        loop {
            let left = self.quota.map_or(u64::MAX, |q| q - done.committed);
            if left == 0
                || self.deadline.is_some_and(|d| Instant::now() >= d)
                || self.counters.stop.load(Ordering::Relaxed)
            {
                break;
            }
            let Some(prepared) = &conn else {
                // Only with `survive`: reconnect, and retry soon while the database is away.
                let reconnected =
                    match tokio::time::timeout(SURVIVE_STATEMENT_LIMIT, self.db.connect()).await {
                        Ok(Ok(client)) => Prepared::new(client, self.db.source).await.ok(),
                        _ => None,
                    };
                if reconnected.is_none() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                conn = reconnected;
                continue;
            };
            let n = batch.min(left);
            if let Some(flow) = &self.flow {
                let waited = Instant::now();
                while let Some(delivered) = (flow.delivered)() {
                    let issued = self.counters.issued.load(Ordering::Relaxed);
                    if issued + n <= delivered + flow.window {
                        break;
                    }
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
                done.flow_wait += waited.elapsed();
            }
            if let Some(interval) = interval {
                // An absolute schedule: a late statement does not delay the ones after it.
                tokio::time::sleep_until(next_send).await;
                next_send += interval;
                if self.counters.stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            let sent_ns = self.clock.now_ns();
            self.counters
                .first_send_ns
                .fetch_min(sent_ns, Ordering::Relaxed);
            payloads.clear();
            for seq in next_seq..next_seq + n {
                let mut p = String::with_capacity(self.plan.payload_size);
                let stamp = Stamp {
                    run: self.run,
                    publisher: self.id,
                    seq,
                    sent_ns,
                };
                payload::encode(stamp, self.plan.payload_size, &mut p);
                payloads.push(p);
            }
            next_seq += n;
            self.counters.issued.fetch_add(n, Ordering::Relaxed);
            let result = if self.plan.survive {
                tokio::time::timeout(
                    SURVIVE_STATEMENT_LIMIT,
                    prepared.publish(&self.db.channel, &payloads),
                )
                .await
                .unwrap_or_else(|_| Err("no answer".to_owned()))
            } else {
                prepared.publish(&self.db.channel, &payloads).await
            };
            match result {
                Ok(()) => {
                    done.committed += n;
                    done.statements += 1;
                    done.last_commit_ns = self.clock.now_ns();
                    if let Some(since) = failing_since.take() {
                        done.outages.push((since, done.last_commit_ns));
                    }
                }
                Err(cause) if !self.plan.survive => return Err(cause),
                Err(_) => {
                    failing_since.get_or_insert(sent_ns);
                    done.uncertain.append(&mut payloads);
                    conn = None;
                }
            }
        }
        if let Some(since) = failing_since {
            done.outages.push((since, self.clock.now_ns()));
        }
        Ok(done)
    }
}
