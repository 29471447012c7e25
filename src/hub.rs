//! The client registry and broadcast: every frame goes to every client's bounded queue.
//!
//! [`Hub::publish`] never waits on a client: it `try_send`s a reference-counted [`Frame`] into
//! each queue. A client whose queue is full is removed and told to close as too slow (policy
//! violation, 1008), so one stuck agent costs the others nothing and the receiver never blocks.
//! The registry is a `std` mutex because it is held only for that synchronous loop, never
//! across an `.await`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;

use crate::event::Frame;
use crate::metrics::Metrics;

/// Why the server ends a client's connection, and the close frame that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client's queue overflowed: it does not read fast enough.
    TooSlow,
    /// The server is shutting down.
    GoingAway,
}

impl CloseReason {
    /// RFC 6455 close code.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::TooSlow => 1008,
            CloseReason::GoingAway => 1001,
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            CloseReason::TooSlow => "client too slow: outgoing queue overflowed",
            CloseReason::GoingAway => "server shutting down",
        }
    }
}

/// How the hub tells one client's task to stop, and why.
#[derive(Debug)]
pub struct ClientControl {
    /// A child of the root shutdown token: cancelled on shutdown or when the client is kicked.
    stop: CancellationToken,
    reason: OnceLock<CloseReason>,
}

impl ClientControl {
    /// Resolves when the client must close.
    pub async fn stopped(&self) {
        self.stop.cancelled().await;
    }

    /// The close to send; without a recorded reason the stop came from shutdown.
    pub fn reason(&self) -> CloseReason {
        self.reason.get().copied().unwrap_or(CloseReason::GoingAway)
    }

    fn kick(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.stop.cancel();
    }
}

struct ClientEntry {
    queue: mpsc::Sender<Frame>,
    control: Arc<ClientControl>,
}

/// The set of connected clients.
pub struct Hub {
    clients: Mutex<HashMap<u64, ClientEntry>>,
    next_id: AtomicU64,
    /// Registrations alive (including clients that were kicked and are still closing).
    live: AtomicUsize,
    queue_capacity: usize,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
}

/// One client's end of the hub: its queue, its stop signal, and its place in the registry,
/// which it leaves when dropped.
pub struct Registration {
    pub id: u64,
    pub frames: mpsc::Receiver<Frame>,
    pub control: Arc<ClientControl>,
    hub: Arc<Hub>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.lock().remove(&self.id);
        self.hub.live.fetch_sub(1, Ordering::Relaxed);
        self.hub.metrics.clients_connected.dec();
    }
}

impl Hub {
    pub fn new(queue_capacity: usize, shutdown: CancellationToken, metrics: Arc<Metrics>) -> Hub {
        Hub {
            clients: Mutex::default(),
            next_id: AtomicU64::new(1),
            live: AtomicUsize::new(0),
            queue_capacity,
            shutdown,
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, ClientEntry>> {
        // A panic while holding the lock cannot leave the map torn (each operation is a single
        // insert, remove or retain), so a poisoned lock is still safe to use.
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a client. From this moment it receives every published frame.
    pub fn register(self: &Arc<Self>) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (queue, frames) = mpsc::channel(self.queue_capacity);
        let control = Arc::new(ClientControl {
            stop: self.shutdown.child_token(),
            reason: OnceLock::new(),
        });
        self.live.fetch_add(1, Ordering::Relaxed);
        self.metrics.clients_connected.inc();
        self.lock().insert(
            id,
            ClientEntry {
                queue,
                control: control.clone(),
            },
        );
        Registration {
            id,
            frames,
            control,
            hub: self.clone(),
        }
    }

    /// Connected clients, for `/status`.
    pub fn client_count(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Queues `frame` for every client; returns how many got it. Never blocks on a client.
    pub fn publish(&self, frame: &Frame) -> usize {
        let mut kicked = Vec::new();
        let mut clients = self.lock();
        clients.retain(|id, client| match client.queue.try_send(frame.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                client.control.kick(CloseReason::TooSlow);
                kicked.push(*id);
                false
            }
            // The client's task ended; its registration removes it too.
            Err(TrySendError::Closed(_)) => false,
        });
        let delivered = clients.len();
        drop(clients);
        for id in kicked {
            self.metrics.clients_disconnected_slow.inc();
            log::warn!(
                "client {id}: disconnected, its queue of {} frames is full (client too slow)",
                self.queue_capacity
            );
        }
        delivered
    }

    /// Sends the `{"action":"ping"}` heartbeat every `interval` until shutdown.
    pub async fn run_pinger(self: Arc<Self>, interval: Duration) {
        let start = tokio::time::Instant::now() + interval;
        let mut ticker = tokio::time::interval_at(start, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ping = Frame::ping();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = ticker.tick() => {
                    let n = self.publish(&ping);
                    log::debug!("ping sent to {n} clients");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::frame_from_payload;

    fn hub(capacity: usize) -> Arc<Hub> {
        Arc::new(Hub::new(
            capacity,
            CancellationToken::new(),
            Arc::new(Metrics::new()),
        ))
    }

    #[tokio::test]
    async fn every_client_gets_every_frame_in_order() {
        let hub = hub(16);
        let mut a = hub.register();
        let mut b = hub.register();
        for i in 0..10 {
            let frame = frame_from_payload(&format!(r#"{{"n":{i}}}"#)).expect("valid");
            assert_eq!(hub.publish(&frame), 2);
        }
        for reg in [&mut a, &mut b] {
            for i in 0..10 {
                let frame = reg.frames.recv().await.expect("frame");
                assert_eq!(frame.as_str(), format!(r#"{{"n":{i}}}"#));
            }
        }
        assert_eq!(hub.client_count(), 2);
        drop(a);
        assert_eq!(hub.client_count(), 1);
        assert_eq!(hub.publish(&Frame::ping()), 1);
    }

    #[tokio::test]
    async fn a_full_queue_kicks_only_that_client() {
        let hub = hub(2);
        let mut reader = hub.register();
        let stuck = hub.register();
        for _ in 0..3 {
            hub.publish(&Frame::ping());
            reader.frames.recv().await.expect("reader keeps up");
        }
        stuck.control.stopped().await;
        assert_eq!(stuck.control.reason(), CloseReason::TooSlow);
        assert_eq!(hub.publish(&Frame::ping()), 1);
        assert_eq!(hub.metrics.clients_disconnected_slow.get(), 1);
    }

    #[tokio::test]
    async fn shutdown_stops_clients_as_going_away() {
        let root = CancellationToken::new();
        let hub = Arc::new(Hub::new(4, root.clone(), Arc::new(Metrics::new())));
        let client = hub.register();
        root.cancel();
        client.control.stopped().await;
        assert_eq!(client.control.reason(), CloseReason::GoingAway);
    }

    #[tokio::test(start_paused = true)]
    async fn pinger_sends_the_heartbeat_each_interval() {
        let root = CancellationToken::new();
        let hub = Arc::new(Hub::new(4, root.clone(), Arc::new(Metrics::new())));
        let mut client = hub.register();
        let pinger = tokio::spawn(hub.clone().run_pinger(Duration::from_secs(5)));
        for _ in 0..2 {
            let frame = client.frames.recv().await.expect("ping");
            assert_eq!(frame, Frame::ping());
        }
        root.cancel();
        pinger.await.expect("pinger stops on shutdown");
    }
}
