//! A bare LISTEN connection in the generator: what PostgreSQL itself delivers to one listener
//! from the same publishers, with no server in between (the LISTEN ceiling).
//!
//! It runs on a thread and runtime of its own: on the generator's runtime it would wait behind
//! thousands of websocket readers, and measure the generator rather than PostgreSQL.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use hdrhistogram::Histogram;
use tokio::sync::oneshot;
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{AsyncMessage, Connection, NoTls, Socket};
use tokio_util::sync::CancellationToken;

use crate::db::Db;
use crate::error::BenchError;
use crate::payload::{self, Clock, Parsed};
use crate::procstat;
use crate::stats::{Arrival, SeqState, new_histogram};

/// A running listener; [`RawListener::finish`] stops it and returns what it saw.
pub struct RawListener {
    done: oneshot::Receiver<RawResult>,
    /// Distinct bench notifications received so far.
    pub progress: Arc<AtomicU64>,
    stop: CancellationToken,
}

pub struct RawResult {
    pub states: Vec<SeqState>,
    pub latency: Histogram<u64>,
    pub last_new_ns: u64,
    pub error: Option<String>,
    /// The listener thread's own CPU time from LISTEN to the end, in seconds: what a bare
    /// LISTEN connection costs a process on this machine, apart from the publishers beside it.
    pub cpu_s: Option<f64>,
}

impl RawResult {
    fn failed(error: String) -> RawResult {
        RawResult {
            states: Vec::new(),
            latency: new_histogram(),
            last_new_ns: 0,
            error: Some(error),
            cpu_s: None,
        }
    }
}

impl RawListener {
    /// Connects and LISTENs; returns once the LISTEN is active.
    pub async fn start(
        db: &Db,
        clock: Clock,
        run: u32,
        publishers: usize,
    ) -> Result<RawListener, BenchError> {
        let progress = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), BenchError>>();
        let (done_tx, done_rx) = oneshot::channel();
        let listener = Listener {
            db: db.clone(),
            clock,
            run,
            publishers,
            progress: progress.clone(),
            stop: stop.clone(),
        };
        std::thread::Builder::new()
            .name("raw-listen".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = ready_tx.send(Err(BenchError::Run(format!(
                            "cannot start the listener's runtime: {err}"
                        ))));
                        return;
                    }
                };
                let result = runtime.block_on(listener.run(ready_tx));
                let _ = done_tx.send(result);
            })
            .map_err(|err| BenchError::Run(format!("cannot start the listener thread: {err}")))?;
        ready_rx
            .await
            .map_err(|_| BenchError::Run("the listener thread ended early".to_owned()))??;
        Ok(RawListener {
            done: done_rx,
            progress,
            stop,
        })
    }

    pub async fn finish(self) -> RawResult {
        self.stop.cancel();
        self.done
            .await
            .unwrap_or_else(|_| RawResult::failed("the listener thread ended early".to_owned()))
    }
}

struct Listener {
    db: Db,
    clock: Clock,
    run: u32,
    publishers: usize,
    progress: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Listener {
    async fn run(self, ready: oneshot::Sender<Result<(), BenchError>>) -> RawResult {
        let (client, connection) = match self.db.config.connect(NoTls).await {
            Ok(pair) => pair,
            Err(err) => {
                let cause = format!("{err:#}");
                let _ = ready.send(Err(BenchError::Database {
                    target: self.db.target.clone(),
                    cause: cause.clone(),
                }));
                return RawResult::failed(cause);
            }
        };
        let listen_sql = self.db.listen_sql();
        let target = self.db.target.clone();
        let stop = self.stop.clone();
        // The connection must be driven while LISTEN runs: receive on a task of this runtime.
        let receiving = tokio::spawn(self.receive(connection));
        match client.batch_execute(&listen_sql).await {
            Ok(()) => {
                let _ = ready.send(Ok(()));
            }
            Err(err) => {
                let _ = ready.send(Err(BenchError::Database {
                    target,
                    cause: format!("LISTEN failed: {err:#}"),
                }));
                stop.cancel();
            }
        }
        let result = receiving
            .await
            .unwrap_or_else(|join| RawResult::failed(join.to_string()));
        drop(client);
        result
    }

    async fn receive(self, mut connection: Connection<Socket, NoTlsStream>) -> RawResult {
        // Notifications arrive only through poll_message: the connection is driven here
        // rather than awaited.
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        let cpu_before = procstat::own_thread_cpu_s();
        let mut result = RawResult {
            states: vec![SeqState::default(); self.publishers],
            latency: new_histogram(),
            last_new_ns: 0,
            error: None,
            cpu_s: None,
        };
        let mut unique = 0;
        let stopped = self.stop.cancelled();
        tokio::pin!(stopped);
        loop {
            let message = tokio::select! {
                biased;
                _ = &mut stopped => break,
                message = messages.next() => message,
            };
            match message {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    let Parsed::Bench(stamp) = payload::parse(n.payload(), self.run) else {
                        continue;
                    };
                    let Some(state) = result.states.get_mut(stamp.publisher as usize) else {
                        continue;
                    };
                    if state.record(stamp.seq) == Arrival::Duplicate {
                        continue;
                    }
                    let now = self.clock.now_ns();
                    unique += 1;
                    result.last_new_ns = now;
                    self.progress.store(unique, Ordering::Relaxed);
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
        result.cpu_s = cpu_before
            .zip(procstat::own_thread_cpu_s())
            .map(|(before, after)| after - before);
        result
    }
}
