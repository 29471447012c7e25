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

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
pub use client::{Client, ClientControl, ClientInfo, CloseReason, Subscription};
pub use outbox::{ClientOut, Delivery};
pub use shard::{Batch, Slice};
use shard::{Room, Shards};

/// About how often the heartbeat sends a slice of it ([`Hub::heartbeat_slices`]): often enough
/// that a slice is a few dozen clients, seldom enough that an idle server hardly wakes.
const HEARTBEAT_TICK: std::time::Duration = std::time::Duration::from_millis(20);

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

/// One client's place in the hub, which it leaves when dropped: the client's task holds it
/// for as long as it serves the connection.
pub struct Registration {
    pub id: u64,
    pub client: Arc<Client>,
    hub: Arc<Hub>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        // A shard thread's list of members may hold this client until its next batch: the
        // socket must not wait for that to close.
        self.client.out.detach();
        self.hub.shards.shard_of(self.id).leave(self.id);
        self.hub.live.fetch_sub(1, Ordering::Relaxed);
        self.hub.metrics.clients_connected.dec();
        let client = &self.client;
        if let Some(labelled) = self.hub.metrics.channel(client.channel, client.format) {
            labelled.clients.dec();
        }
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

    /// Adds a client that wants `subscription`. Every batch queued from this moment reaches it.
    pub fn register(self: &Arc<Self>, subscription: Subscription) -> Registration {
        self.register_after(subscription, Vec::new())
    }

    /// Adds a client whose first frames are `backlog` (what it missed), then every batch queued
    /// from this moment. The backlog does not count against the client's queue capacity.
    pub fn register_after(
        self: &Arc<Self>,
        subscription: Subscription,
        backlog: Vec<Bytes>,
    ) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let out = ClientOut::new(self.queue_capacity);
        out.preload(backlog);
        let client = Arc::new(Client::new(
            out,
            ClientControl::new(self.shutdown.child_token()),
            subscription,
        ));
        self.live.fetch_add(1, Ordering::Relaxed);
        self.metrics.clients_connected.inc();
        if let Some(labelled) = self.metrics.channel(client.channel, client.format) {
            labelled.clients.inc();
        }
        self.shards.shard_of(id).join(id, client.clone());
        Registration {
            id,
            client,
            hub: self.clone(),
        }
    }

    /// The clients connected now (those kicked and still closing included), by id, for the
    /// operator's list. Each shard's lock is held only to copy its members' handles.
    pub fn clients(&self) -> Vec<(u64, Arc<Client>)> {
        let mut clients = Vec::with_capacity(self.client_count());
        for shard in self.shards.shards() {
            shard.members_into(&mut clients);
        }
        clients.sort_unstable_by_key(|(id, _)| *id);
        clients
    }

    /// Connected clients, for `/status`.
    pub fn client_count(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Queues a batch, in order, for the clients it is for. Waits only while the fan-out threads are
    /// a full read-ahead behind; cancelling the wait publishes nothing.
    pub async fn publish_batch(&self, batch: Batch) {
        let rooms = self.reserve(batch.len()).await;
        self.enqueue(batch, rooms);
    }

    /// Waits for room to queue `len` items in every shard. The room goes back if the caller
    /// gives up before [`Hub::enqueue`].
    pub async fn reserve(&self, len: usize) -> Rooms<'_> {
        self.reserve_for(len, None).await
    }

    /// Waits for room to queue `len` items for the clients of `only` (all when `None`): in
    /// every shard that may hold one of them.
    pub async fn reserve_for(&self, len: usize, only: Option<Slice>) -> Rooms<'_> {
        let shards = self.shards.shards();
        let mut rooms = Vec::with_capacity(shards.len());
        for (index, shard) in shards.iter().enumerate() {
            let holds = only.is_none_or(|slice| self.shards.may_hold(index, slice));
            rooms.push(match holds {
                true => Some(shard.reserve(len).await),
                false => None,
            });
        }
        Rooms { rooms, only }
    }

    /// Queues a batch, with the room reserved for it, for the shards that hold a client it may
    /// be for. It never waits, so the caller may hold a lock that orders batches against
    /// registrations.
    pub fn enqueue(&self, batch: Batch, rooms: Rooms<'_>) {
        if batch.is_empty() {
            return;
        }
        for (shard, room) in self.shards.shards().iter().zip(rooms.rooms) {
            if let Some(room) = room {
                shard.enqueue(batch.clone(), room, rooms.only);
            }
        }
    }

    /// How many slices the heartbeat of `interval` is sent in, one after another
    /// ([`Slice`]): one about every [`HEARTBEAT_TICK`], and a multiple of the shard count, so
    /// that each slice's clients are all in one shard and a slice wakes one thread.
    pub fn heartbeat_slices(&self, interval: std::time::Duration) -> u64 {
        let shards = self.shards.shards().len() as u64;
        let per_shard = interval.as_nanos() / (HEARTBEAT_TICK.as_nanos() * u128::from(shards));
        u64::try_from(per_shard).unwrap_or(u64::MAX).clamp(1, 1024) * shards
    }
}

/// Room reserved in the shards a batch is for: see [`Hub::reserve_for`].
pub struct Rooms<'a> {
    /// Per shard; `None` for a shard that holds none of the clients of `only`.
    rooms: Vec<Option<Room<'a>>>,
    only: Option<Slice>,
}

#[cfg(test)]
mod tests {
    use super::outbox::test_support::{read_until_closed, socket_pair};
    use super::*;
    use crate::message::{ChannelId, Format, Outgoing, Position};
    use tokio::io::AsyncReadExt;

    fn one(item: Outgoing) -> Batch {
        Arc::from(vec![Arc::new(item)])
    }

    fn ping() -> Outgoing {
        Outgoing::ping(ChannelId::DEFAULT, "1-0".parse().expect("position"))
    }

    fn ping_bytes() -> Bytes {
        ping().frame(Format::Legacy).expect("legacy").clone()
    }

    fn hub(capacity: usize) -> Arc<Hub> {
        Arc::new(Hub::with_fanout_threads(
            3,
            capacity,
            CancellationToken::new(),
            Arc::new(Metrics::new()),
        ))
    }

    async fn attached(hub: &Arc<Hub>) -> (Registration, tokio::net::TcpStream) {
        let reg = hub.register(Subscription::everything(Format::Legacy));
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
            let position: Position = format!("1-{i}").parse().expect("position");
            let message = Outgoing::message(position, &format!(r#"{{"n":{i}}}"#));
            expected.extend_from_slice(message.frame(Format::Legacy).expect("legacy"));
            hub.publish_batch(one(message)).await;
        }
        for (_, peer) in &mut clients {
            expect_bytes(peer, &expected).await;
        }
        assert_eq!(hub.client_count(), 5);
        let (gone, _) = clients.remove(0);
        drop(gone);
        assert_eq!(hub.client_count(), 4);
        hub.publish_batch(one(ping())).await;
        for (_, peer) in &mut clients {
            expect_bytes(peer, &ping_bytes()).await;
        }
    }

    #[tokio::test]
    async fn a_full_outbox_kicks_only_that_client() {
        let hub = hub(2);
        let (_reader, mut peer) = attached(&hub).await;
        // Never upgraded, so nothing drains its outbox.
        let stuck = hub.register(Subscription::everything(Format::Legacy));
        for _ in 0..3 {
            hub.publish_batch(one(ping())).await;
        }
        stuck.client.control.stopped().await;
        assert_eq!(stuck.client.control.reason(), CloseReason::TooSlow);
        assert_eq!(hub.metrics.clients_disconnected_slow.get(), 1);
        hub.publish_batch(one(ping())).await;
        expect_bytes(&mut peer, &ping_bytes().repeat(4)).await;
    }

    /// A client told to close (here kicked) and then let go by its task closes its socket at
    /// once, although no batch follows: the shard thread's list of members, rebuilt only when
    /// a batch arrives, still holds the client.
    #[tokio::test]
    async fn a_client_let_go_closes_its_socket_although_no_batch_follows() {
        let hub = hub(4);
        let (reg, mut peer) = attached(&hub).await;
        hub.publish_batch(one(ping())).await;
        // Read: the shard thread has listed the client.
        expect_bytes(&mut peer, &ping_bytes()).await;
        reg.client.control.kick(CloseReason::TooSlow);
        drop(reg);
        assert_eq!(read_until_closed(&mut peer).await, b"");
        assert_eq!(hub.client_count(), 0);
    }

    #[tokio::test]
    async fn the_receiver_waits_when_a_shard_is_a_full_read_ahead_behind() {
        let hub = Arc::new(Hub::with_fanout_threads(
            1,
            4,
            CancellationToken::new(),
            Arc::new(Metrics::new()),
        ));
        let reg = hub.register(Subscription::everything(Format::Legacy));
        // Holding the shard's room stands in for a pass that has not finished.
        let shard = hub.shards.shard_of(reg.id);
        let held = shard.reserve(4).await;
        let publish = hub.publish_batch(one(ping()));
        tokio::pin!(publish);
        assert!(futures::poll!(publish.as_mut()).is_pending());
        drop(held);
        publish.await;
    }

    /// Each slice lies in one shard, and the slices come about every 20 ms, at least one per
    /// shard however short the interval.
    #[test]
    fn heartbeat_slices_are_a_multiple_of_the_shards() {
        let hub = hub(4);
        let slices = hub.heartbeat_slices(std::time::Duration::from_secs(5));
        assert_eq!(slices, 249);
        assert_eq!(
            hub.heartbeat_slices(std::time::Duration::from_millis(10)),
            3
        );
        for index in 0..slices {
            let slice = Slice::new(index, slices);
            let holding = (0..3).filter(|s| hub.shards.may_hold(*s, slice)).count();
            assert_eq!(holding, 1);
        }
    }

    #[tokio::test]
    async fn shutdown_stops_clients_as_going_away() {
        let root = CancellationToken::new();
        let hub = Arc::new(Hub::new(4, root.clone(), Arc::new(Metrics::new())));
        let reg = hub.register(Subscription::everything(Format::Legacy));
        root.cancel();
        reg.client.control.stopped().await;
        assert_eq!(reg.client.control.reason(), CloseReason::GoingAway);
    }
}
