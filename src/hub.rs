//! The client registry and broadcast: every frame goes to every client.
//!
//! [`Hub::publish`] never waits on a client: it hands the frames, encoded once and shared, to
//! each client's [`ClientOut`], which writes them straight into the socket when it takes them
//! and otherwise queues them in a bounded outbox. A client whose outbox is full is removed and
//! told to close as too slow (policy violation, 1008), so one stuck agent costs the others
//! nothing and the receiver never blocks. The registry is a `std` mutex because it is held only
//! for that synchronous loop, never across an `.await`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::client::{ClientOut, Delivery};
use crate::event::Frame;
use crate::metrics::Metrics;
use crate::wire::close_code;

/// Why the server ends a client's connection, and the close frame that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client's outbox overflowed: it does not read fast enough.
    TooSlow,
    /// The server is shutting down.
    GoingAway,
}

impl CloseReason {
    /// RFC 6455 close code.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::TooSlow => close_code::POLICY_VIOLATION,
            CloseReason::GoingAway => close_code::GOING_AWAY,
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

/// What the hub and a client's task share.
#[derive(Debug)]
pub struct Client {
    pub out: ClientOut,
    pub control: ClientControl,
}

/// The set of connected clients.
pub struct Hub {
    clients: Mutex<HashMap<u64, Arc<Client>>>,
    next_id: AtomicU64,
    /// Registrations alive (including clients that were kicked and are still closing).
    live: AtomicUsize,
    queue_capacity: usize,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
}

/// One client's place in the hub, which it leaves when dropped.
pub struct Registration {
    pub id: u64,
    pub client: Arc<Client>,
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

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Client>>> {
        // A panic while holding the lock cannot leave the map torn (each operation is a single
        // insert, remove or retain), so a poisoned lock is still safe to use.
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a client. From this moment it receives every published frame.
    pub fn register(self: &Arc<Self>) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let client = Arc::new(Client {
            out: ClientOut::new(self.queue_capacity),
            control: ClientControl {
                stop: self.shutdown.child_token(),
                reason: OnceLock::new(),
            },
        });
        self.live.fetch_add(1, Ordering::Relaxed);
        self.metrics.clients_connected.inc();
        self.lock().insert(id, client.clone());
        Registration {
            id,
            client,
            hub: self.clone(),
        }
    }

    /// Connected clients, for `/status`.
    pub fn client_count(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Sends one frame to every client; returns how many took it.
    pub fn publish(&self, frame: &Frame) -> usize {
        self.publish_batch(std::slice::from_ref(frame))
    }

    /// Sends frames, in order, to every client; returns how many clients took them. Never
    /// blocks on a client: each gets at most one non-blocking write.
    pub fn publish_batch(&self, frames: &[Frame]) -> usize {
        if frames.is_empty() {
            return 0;
        }
        let wires: Vec<Bytes> = frames.iter().map(|f| f.wire().clone()).collect();
        let mut kicked = Vec::new();
        let mut clients = self.lock();
        clients.retain(|id, client| match client.out.send(&wires) {
            Delivery::Accepted => true,
            Delivery::Overflow => {
                client.control.kick(CloseReason::TooSlow);
                kicked.push(*id);
                false
            }
            // The client's task ends on its own; its registration removes it too.
            Delivery::Closed => false,
        });
        let delivered = clients.len();
        drop(clients);
        self.metrics
            .frames_sent
            .inc_by((delivered * frames.len()) as u64);
        for id in kicked {
            self.metrics.clients_disconnected_slow.inc();
            log::warn!(
                "client {id}: disconnected, more than {} frames waiting (client too slow)",
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
    use crate::client::test_support::socket_pair;
    use crate::event::frame_from_payload;
    use tokio::io::AsyncReadExt;

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
        let (a, b) = (hub.register(), hub.register());
        let mut peers = Vec::new();
        for reg in [&a, &b] {
            let (server, peer) = socket_pair().await;
            reg.client.out.attach(server);
            peers.push(peer);
        }
        let mut expected = Vec::new();
        for i in 0..10 {
            let frame = frame_from_payload(&format!(r#"{{"n":{i}}}"#)).expect("valid");
            expected.extend_from_slice(frame.wire());
            assert_eq!(hub.publish(&frame), 2);
        }
        for peer in &mut peers {
            let mut got = vec![0; expected.len()];
            peer.read_exact(&mut got).await.expect("read");
            assert_eq!(got, expected);
        }
        assert_eq!(hub.client_count(), 2);
        drop(a);
        assert_eq!(hub.client_count(), 1);
        assert_eq!(hub.publish(&Frame::ping()), 1);
        assert_eq!(hub.metrics.frames_sent.get(), 21);
    }

    #[tokio::test]
    async fn a_full_outbox_kicks_only_that_client() {
        let hub = hub(2);
        let reader = hub.register();
        let (server, _peer) = socket_pair().await;
        reader.client.out.attach(server);
        // Never upgraded, so nothing drains its outbox.
        let stuck = hub.register();
        for _ in 0..3 {
            hub.publish(&Frame::ping());
        }
        stuck.client.control.stopped().await;
        assert_eq!(stuck.client.control.reason(), CloseReason::TooSlow);
        assert_eq!(hub.publish(&Frame::ping()), 1);
        assert_eq!(hub.metrics.clients_disconnected_slow.get(), 1);
    }

    #[tokio::test]
    async fn shutdown_stops_clients_as_going_away() {
        let root = CancellationToken::new();
        let hub = Arc::new(Hub::new(4, root.clone(), Arc::new(Metrics::new())));
        let reg = hub.register();
        root.cancel();
        reg.client.control.stopped().await;
        assert_eq!(reg.client.control.reason(), CloseReason::GoingAway);
    }

    #[tokio::test(start_paused = true)]
    async fn pinger_sends_the_heartbeat_each_interval() {
        let root = CancellationToken::new();
        let hub = Arc::new(Hub::new(4, root.clone(), Arc::new(Metrics::new())));
        let reg = hub.register();
        let (server, mut peer) = socket_pair().await;
        reg.client.out.attach(server);
        let pinger = tokio::spawn(hub.clone().run_pinger(Duration::from_secs(5)));
        let ping = Frame::ping();
        for _ in 0..2 {
            let mut got = vec![0; ping.wire().len()];
            peer.read_exact(&mut got).await.expect("ping");
            assert_eq!(&got[..], &ping.wire()[..]);
        }
        root.cancel();
        pinger.await.expect("pinger stops on shutdown");
    }
}
