//! Delivery: the connected clients, and the threads that write each published frame into
//! their sockets.
//!
//! [`Hub::publish_batch`] never waits on a client: it queues the frames, encoded once and
//! shared, for the shard threads ([`shard`]), which hand them to each client's
//! [`ClientOut`]: written straight into the socket when it takes them, otherwise queued in a
//! bounded outbox. A client whose outbox is full is removed and told to close as too slow
//! (policy violation, 1008), so one stuck agent costs the others nothing. The only wait is for
//! the fan-out itself, when the source gets more than the read-ahead in front of it.
//!
//! - [`client`]: one client: its outbox and how it is told to stop.
//! - [`outbox`]: direct writes into a client's socket, and what waits when it is full.
//! - [`shard`]: the clients split into shards, each written by a thread of its own.

pub mod client;
pub mod outbox;
pub mod shard;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio_util::sync::CancellationToken;

use crate::message::Frame;
use crate::metrics::Metrics;
pub use client::{Client, ClientControl, CloseReason};
pub use outbox::{ClientOut, Delivery};
use shard::{Batch, Shards};

/// The set of connected clients.
pub struct Hub {
    shards: Shards,
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
        self.hub.shards.shard_of(self.id).leave(self.id);
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
            shards: Shards::start(threads, queue_capacity, queue_capacity, metrics.clone()),
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
            control: ClientControl::new(self.shutdown.child_token()),
        });
        self.live.fetch_add(1, Ordering::Relaxed);
        self.metrics.clients_connected.inc();
        self.shards.shard_of(id).join(id, client.clone());
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
        let mut rooms = Vec::with_capacity(self.shards.shards().len());
        for shard in self.shards.shards() {
            rooms.push(shard.reserve(batch.len()).await);
        }
        for (shard, room) in self.shards.shards().iter().zip(rooms) {
            shard.enqueue(batch.clone(), room);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::outbox::test_support::socket_pair;
    use super::*;
    use crate::message::frame_from_payload;
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
        let shard = hub.shards.shard_of(reg.id);
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
}
