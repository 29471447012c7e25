//! The client registry and broadcast: every frame goes to every client.
//!
//! [`Hub::publish_batch`] never waits on a client: it queues the frames, encoded once and
//! shared, for the fan-out threads ([`crate::fanout`]), which hand them to each client's
//! [`crate::client::ClientOut`]: written straight into the socket when it takes them, otherwise
//! queued in a bounded outbox. A client whose outbox is full is removed and told to close as
//! too slow (policy violation, 1008), so one stuck agent costs the others nothing. The only
//! wait is for the fan-out itself, when the receiver gets more than the read-ahead in front
//! of it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::client::ClientOut;
use crate::event::Frame;
use crate::fanout::{Batch, FanOut};
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

    pub(crate) fn kick(&self, reason: CloseReason) {
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
    fanout: FanOut,
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
        self.hub.fanout.shard_of(self.id).leave(self.id);
        self.hub.live.fetch_sub(1, Ordering::Relaxed);
        self.hub.metrics.clients_connected.dec();
    }
}

impl Hub {
    /// A hub whose clients have outboxes of `queue_capacity` frames, served by one fan-out
    /// thread per available core.
    pub fn new(queue_capacity: usize, shutdown: CancellationToken, metrics: Arc<Metrics>) -> Hub {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Hub::with_fanout_threads(threads, queue_capacity, shutdown, metrics)
    }

    /// A hub with `threads` fan-out threads. The receiver may read ahead of each by as many
    /// frames as one client may have waiting.
    pub fn with_fanout_threads(
        threads: usize,
        queue_capacity: usize,
        shutdown: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Hub {
        Hub {
            fanout: FanOut::start(threads, queue_capacity, queue_capacity, metrics.clone()),
            next_id: AtomicU64::new(1),
            live: AtomicUsize::new(0),
            queue_capacity,
            shutdown,
            metrics,
        }
    }

    /// Adds a client. Every frame published from this moment reaches it.
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
        self.fanout.shard_of(id).join(id, client.clone());
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

    /// Sends one frame to every client.
    pub async fn publish(&self, frame: &Frame) {
        self.publish_batch(std::slice::from_ref(frame)).await
    }

    /// Queues frames, in order, for every client. Waits only while the fan-out threads are a
    /// full read-ahead behind; cancelling the wait publishes nothing.
    pub async fn publish_batch(&self, frames: &[Frame]) {
        if frames.is_empty() {
            return;
        }
        let batch: Batch = frames.iter().map(|f| f.wire().clone()).collect();
        let mut rooms = Vec::with_capacity(self.fanout.shards().len());
        for shard in self.fanout.shards() {
            rooms.push(shard.reserve(batch.len()).await);
        }
        for (shard, room) in self.fanout.shards().iter().zip(rooms) {
            shard.enqueue(batch.clone(), room);
        }
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
                    self.publish(&ping).await;
                    log::debug!("ping sent to {} clients", self.client_count());
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
        Arc::new(Hub::with_fanout_threads(
            3,
            capacity,
            CancellationToken::new(),
            Arc::new(Metrics::new()),
        ))
    }

    async fn attached(hub: &Arc<Hub>) -> (Registration, tokio::net::TcpStream) {
        let reg = hub.register();
        let (server, peer) = socket_pair().await;
        reg.client.out.attach(server);
        (reg, peer)
    }

    async fn expect_bytes(peer: &mut tokio::net::TcpStream, expected: &[u8]) {
        let mut got = vec![0; expected.len()];
        peer.read_exact(&mut got).await.expect("read");
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn every_client_gets_every_frame_in_order_across_shards() {
        let hub = hub(16);
        let mut clients = Vec::new();
        for _ in 0..5 {
            clients.push(attached(&hub).await);
        }
        let mut expected = Vec::new();
        for i in 0..10 {
            let frame = frame_from_payload(&format!(r#"{{"n":{i}}}"#)).expect("valid");
            expected.extend_from_slice(frame.wire());
            hub.publish(&frame).await;
        }
        for (_, peer) in &mut clients {
            expect_bytes(peer, &expected).await;
        }
        assert_eq!(hub.client_count(), 5);
        let (gone, _) = clients.remove(0);
        drop(gone);
        assert_eq!(hub.client_count(), 4);
        hub.publish(&Frame::ping()).await;
        for (_, peer) in &mut clients {
            expect_bytes(peer, Frame::ping().wire()).await;
        }
    }

    #[tokio::test]
    async fn a_full_outbox_kicks_only_that_client() {
        let hub = hub(2);
        let (_reader, mut peer) = attached(&hub).await;
        // Never upgraded, so nothing drains its outbox.
        let stuck = hub.register();
        for _ in 0..3 {
            hub.publish(&Frame::ping()).await;
        }
        stuck.client.control.stopped().await;
        assert_eq!(stuck.client.control.reason(), CloseReason::TooSlow);
        assert_eq!(hub.metrics.clients_disconnected_slow.get(), 1);
        hub.publish(&Frame::ping()).await;
        expect_bytes(&mut peer, &Frame::ping().wire().repeat(4)).await;
    }

    #[tokio::test]
    async fn the_receiver_waits_when_a_shard_is_a_full_read_ahead_behind() {
        let hub = Arc::new(Hub::with_fanout_threads(
            1,
            4,
            CancellationToken::new(),
            Arc::new(Metrics::new()),
        ));
        let reg = hub.register();
        // Holding the shard's room stands in for a pass that has not finished.
        let shard = hub.fanout.shard_of(reg.id);
        let held = shard.reserve(4).await;
        let ping = Frame::ping();
        let publish = hub.publish(&ping);
        tokio::pin!(publish);
        assert!(futures::poll!(publish.as_mut()).is_pending());
        drop(held);
        publish.await;
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
