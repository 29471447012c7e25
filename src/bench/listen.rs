//! A bare LISTEN connection in the generator: what PostgreSQL itself delivers to one listener
//! from the same publishers, with no server in between (the LISTEN ceiling).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use hdrhistogram::Histogram;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_util::sync::CancellationToken;

use super::db::Db;
use super::error::BenchError;
use super::payload::{self, Clock, Parsed};
use super::stats::{Arrival, SeqState, new_histogram};

/// A running listener; [`RawListener::finish`] stops it and returns what it saw.
pub struct RawListener {
    /// Kept so the connection stays open.
    _client: Client,
    task: JoinHandle<RawResult>,
    /// Distinct bench notifications received so far.
    pub progress: Arc<AtomicU64>,
    stop: CancellationToken,
}

pub struct RawResult {
    pub states: Vec<SeqState>,
    pub latency: Histogram<u64>,
    pub last_new_ns: u64,
    pub error: Option<String>,
}

impl RawListener {
    pub async fn start(
        db: &Db,
        clock: Clock,
        run: u32,
        publishers: usize,
    ) -> Result<RawListener, BenchError> {
        let (client, mut connection) =
            db.config
                .connect(NoTls)
                .await
                .map_err(|err| BenchError::Database {
                    target: db.target.clone(),
                    cause: format!("{err:#}"),
                })?;
        let progress = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let progress = progress.clone();
            let stop = stop.clone();
            async move {
                // Notifications arrive only through poll_message: the connection is driven
                // here rather than awaited.
                let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                let mut result = RawResult {
                    states: vec![SeqState::default(); publishers],
                    latency: new_histogram(),
                    last_new_ns: 0,
                    error: None,
                };
                let mut unique = 0;
                let stopped = stop.cancelled();
                tokio::pin!(stopped);
                loop {
                    let message = tokio::select! {
                        biased;
                        _ = &mut stopped => break,
                        message = messages.next() => message,
                    };
                    match message {
                        Some(Ok(AsyncMessage::Notification(n))) => {
                            let Parsed::Bench(stamp) = payload::parse(n.payload(), run) else {
                                continue;
                            };
                            let Some(state) = result.states.get_mut(stamp.publisher as usize)
                            else {
                                continue;
                            };
                            if state.record(stamp.seq) == Arrival::Duplicate {
                                continue;
                            }
                            let now = clock.now_ns();
                            unique += 1;
                            result.last_new_ns = now;
                            progress.store(unique, Ordering::Relaxed);
                            result
                                .latency
                                .saturating_record(now.saturating_sub(stamp.sent_ns).max(1));
                        }
                        Some(Ok(_)) => {}
                        Some(Err(err)) => {
                            result.error = Some(format!("{err:#}"));
                            break;
                        }
                        None => {
                            result.error = Some("connection closed".to_owned());
                            break;
                        }
                    }
                }
                result
            }
        });
        client
            .batch_execute(&db.listen_sql())
            .await
            .map_err(|err| BenchError::Database {
                target: db.target.clone(),
                cause: format!("LISTEN failed: {err:#}"),
            })?;
        Ok(RawListener {
            _client: client,
            task,
            progress,
            stop,
        })
    }

    pub async fn finish(self) -> RawResult {
        self.stop.cancel();
        match self.task.await {
            Ok(result) => result,
            Err(join) => RawResult {
                states: Vec::new(),
                latency: new_histogram(),
                last_new_ns: 0,
                error: Some(join.to_string()),
            },
        }
    }
}
