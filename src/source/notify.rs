//! The LISTEN source: connect, `LISTEN "<channel>"`, hand each notification to the stream,
//! notice a lost connection, reconnect with capped jittered backoff.
//!
//! tokio-postgres delivers notifications only through `Connection::poll_message`, so this task
//! drives the connection itself instead of spawning it. A loss is noticed by the connection
//! ending or erroring, by TCP keepalive (see [`super::pg`]), and by a health query every
//! `HealthCheckInterval` that must answer within `HealthCheckTimeout`. Notifications sent while no
//! connection is listening are lost: PostgreSQL queues them only for sessions that LISTEN.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use postgres_native_tls::MakeTlsConnector;
use rand::Rng;
use tokio::time::Instant;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::pg::{self, ConnectFailure, PgConnection};
use crate::config::ReceiverConfig;
use crate::message::Outgoing;
use crate::metrics::Metrics;
use crate::stream::{ListenerState, Stream};

/// At most this many notifications go out as one batch, so that a flood still reaches clients
/// in bounded slices.
const MAX_BATCH: usize = 256;

/// Capped exponential backoff with jitter: the n-th wait is uniform in [d/2, d] where
/// d = min(cap, base × 2ⁿ), so that replicas restarting together do not retry in lockstep.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        let ceiling = self.base.saturating_mul(factor).min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let floor = ceiling / 2;
        rand::rng().random_range(floor..=ceiling)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Owns the LISTEN connection for the life of the service.
pub struct Receiver {
    pub config: ReceiverConfig,
    pub tls: MakeTlsConnector,
    pub stream: Arc<Stream>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
}

/// Why a session with the database ended.
enum SessionEnd {
    Shutdown,
    /// Never reached LISTEN.
    ConnectFailed(ConnectFailure),
    /// Was listening, then lost it.
    Lost(String),
}

impl Receiver {
    pub async fn run(self) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        // The kind of cause last logged at WARN (see [`ConnectFailure::kind`]): a repeat of it
        // is logged at DEBUG only.
        let mut last_cause: Option<String> = None;
        let mut attempts: u64 = 0;
        let mut listened_before = false;
        loop {
            attempts += 1;
            let end = self
                .session(
                    &mut backoff,
                    &mut listened_before,
                    &mut last_cause,
                    attempts,
                )
                .await;
            self.set_state(ListenerState::Connecting);
            let cause = match end {
                SessionEnd::Shutdown => {
                    log::info!("listener stopped");
                    return;
                }
                SessionEnd::Lost(cause) => {
                    log::warn!(
                        "LISTEN connection to {} lost: {cause}; reconnecting",
                        self.target()
                    );
                    attempts = 0;
                    last_cause = Some(cause);
                    None
                }
                SessionEnd::ConnectFailed(cause) => Some(cause),
            };
            let delay = backoff.next_delay();
            if let Some(ConnectFailure { text, kind }) = cause {
                if last_cause.as_deref() == Some(kind.as_str()) {
                    log::debug!(
                        "cannot connect to {} (attempt {attempts}): {text}; retrying in {delay:.1?}",
                        self.target()
                    );
                } else {
                    log::warn!(
                        "cannot connect to {}: {text}; retrying with backoff (next in {delay:.1?})",
                        self.target()
                    );
                    last_cause = Some(kind);
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    log::info!("listener stopped");
                    return;
                }
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn target(&self) -> String {
        format!(
            "PostgreSQL {}:{}/{} (sslmode {})",
            self.config.host,
            self.config.port,
            self.config.dbname,
            self.config.sslmode.as_str()
        )
    }

    fn set_state(&self, state: ListenerState) {
        self.stream.set_listener_state(state);
    }

    async fn session(
        &self,
        backoff: &mut Backoff,
        listened_before: &mut bool,
        last_cause: &mut Option<String>,
        attempts: u64,
    ) -> SessionEnd {
        let connect = pg::connect(&self.config, &self.tls, "vulcan-stream");
        let (client, connection) = tokio::select! {
            _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
            result = connect => match result {
                Ok(pair) => pair,
                Err(err) => {
                    return SessionEnd::ConnectFailed(pg::describe_connect_error(&err, &self.config));
                }
            },
        };
        let activity = Activity::default();
        let mut connection = std::pin::pin!(self.forward_notifications(connection, &activity));
        let listen = self
            .config
            .channels()
            .iter()
            .map(|channel| format!("LISTEN {}", pg::quote_ident(channel)))
            .collect::<Vec<_>>()
            .join("; ");
        tokio::select! {
            _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
            ended = &mut connection => return SessionEnd::ConnectFailed(ConnectFailure::new(ended)),
            result = client.batch_execute(&listen) => if let Err(err) = result {
                return SessionEnd::ConnectFailed(ConnectFailure::new(pg::describe_error(&err)));
            },
        }
        self.set_state(ListenerState::Listening);
        backoff.reset();
        *last_cause = None;
        if *listened_before {
            // NOTIFYs committed while nothing listened are gone: say so before the next one.
            tokio::select! {
                _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
                () = self.stream.restart_epoch() => {}
            }
            self.metrics.listener_reconnects.inc();
            log::info!(
                "LISTEN {} active again on {} after {attempts} attempt(s)",
                self.listed_channels(),
                self.target()
            );
        } else {
            log::info!(
                "LISTEN {} active on {}",
                self.listed_channels(),
                self.target()
            );
        }
        *listened_before = true;
        let health_timeout = self.config.health_timeout;
        let mut health = tokio::time::interval(self.config.health_interval);
        health.tick().await;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
                ended = &mut connection => return SessionEnd::Lost(ended),
                _ = health.tick() => {
                    let mut check = std::pin::pin!(client.simple_query(""));
                    let mut deadline = Instant::now() + health_timeout;
                    let mut seen = activity.read.load(Ordering::Relaxed);
                    loop {
                        // Biased, in this order: a task polled late (its thread kept off
                        // busy cores) finds its deadline passed and the answer waiting in the
                        // socket at once. The connection must read it, and the check see it,
                        // before the deadline is judged; polled in random order, the timer
                        // could win and a live connection be dropped.
                        tokio::select! {
                            biased;
                            _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
                            ended = &mut connection => return SessionEnd::Lost(ended),
                            result = &mut check => match result {
                                Ok(_) => {
                                    log::debug!("listener health check passed");
                                    break;
                                }
                                Err(err) => return SessionEnd::Lost(pg::describe_error(&err)),
                            },
                            _ = tokio::time::sleep_until(deadline) => {
                                // The answer queues behind every notification sent before it:
                                // a connection that delivers, or waits on the fan-out, is alive.
                                let read = activity.read.load(Ordering::Relaxed);
                                if read == seen && !activity.waiting_for_room.load(Ordering::Relaxed) {
                                    return SessionEnd::Lost(format!(
                                        "health query unanswered after {health_timeout:?}"
                                    ));
                                }
                                seen = read;
                                deadline = Instant::now() + health_timeout;
                            }
                        }
                    }
                }
            }
        }
    }

    /// The channels as log lines name them: `"events"`, or `"events", "jobs"`.
    fn listed_channels(&self) -> String {
        let quoted: Vec<String> = self
            .config
            .channels()
            .iter()
            .map(|channel| format!("{channel:?}"))
            .collect();
        quoted.join(", ")
    }

    /// Drives the connection until it ends, broadcasting each notification on our channel.
    /// Notifications that arrived together (one read from the server) are published as one
    /// batch, so that each client gets one write for all of them. Returns why it ended.
    async fn forward_notifications(
        &self,
        mut connection: PgConnection,
        activity: &Activity,
    ) -> String {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        let mut batch = Vec::new();
        loop {
            let Some(mut message) = messages.next().await else {
                return "connection closed by the server".to_owned();
            };
            loop {
                activity.read.fetch_add(1, Ordering::Relaxed);
                match message {
                    // The stream drops what is on a channel it does not carry.
                    Ok(AsyncMessage::Notification(n)) => {
                        if let Some(frame) = self.stream.accept(n.channel(), n.payload()) {
                            batch.push(frame);
                        }
                    }
                    Ok(AsyncMessage::Notice(notice)) => {
                        log::info!("PostgreSQL notice: {}", notice.message());
                    }
                    Ok(_) => {}
                    Err(err) => {
                        self.publish(&mut batch, activity).await;
                        return pg::describe_error(&err);
                    }
                }
                if batch.len() >= MAX_BATCH {
                    break;
                }
                match messages.next().now_or_never() {
                    Some(Some(next)) => message = next,
                    Some(None) => {
                        self.publish(&mut batch, activity).await;
                        return "connection closed by the server".to_owned();
                    }
                    None => break,
                }
            }
            self.publish(&mut batch, activity).await;
        }
    }
}

/// What the health check needs to tell a lost connection from a busy one: the answer to its
/// query waits behind every notification PostgreSQL sent before it, and behind the fan-out
/// when the receiver waits for room. Both are shared by the session's two halves.
#[derive(Debug, Default)]
struct Activity {
    /// Messages read from the connection.
    read: AtomicU64,
    /// Set while a publish waits for fan-out room (the connection is not read meanwhile).
    waiting_for_room: AtomicBool,
}

impl Receiver {
    /// Publishes a batch; while that waits for fan-out room, `activity` says so.
    async fn publish(&self, batch: &mut Vec<Arc<Outgoing>>, activity: &Activity) {
        let mut publish = std::pin::pin!(self.stream.publish(batch));
        if futures::poll!(publish.as_mut()).is_ready() {
            return;
        }
        activity.waiting_for_room.store(true, Ordering::Relaxed);
        publish.await;
        activity.waiting_for_room.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..40 {
            assert!(b.next_delay() <= Duration::from_secs(2));
        }
        let late = b.next_delay();
        assert!(late >= Duration::from_secs(1), "{late:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
