//! Fan-out threads: the clients are split into shards, and each shard has a thread of its own
//! that writes published frames into its clients' sockets.
//!
//! Why threads apart from the receiver: writing one frame into a thousand sockets is a thousand
//! `writev`s, milliseconds of kernel time. Done on the receiver's task, it kept the LISTEN
//! connection unread meanwhile, so the receiver fell behind PostgreSQL as soon as there were
//! many clients; and it used one core only. Here the receiver only appends a batch to each
//! shard's queue and wakes its thread; the shards write in parallel, each on its own core when
//! there is one. Why OS threads rather than tokio tasks: a pass over thousands of clients never
//! waits, so as a task it would hold a runtime worker for its whole length and starve the
//! receiver and the HTTP side; the OS scheduler shares the cores fairly instead.
//!
//! A shard that wakes to several queued batches writes them together, one `writev` per client:
//! the busier the stream, the more frames each system call carries. How far the receiver may
//! read ahead of a shard is bounded (in frames, by a semaphore): beyond it the receiver waits,
//! and notifications wait in PostgreSQL rather than in memory here.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::client::Delivery;
use crate::hub::{Client, CloseReason};
use crate::metrics::Metrics;

/// Frames published together, shared by every shard.
pub type Batch = Arc<[Bytes]>;

/// One batch waiting in a shard's queue, with the read-ahead room it holds.
struct Queued {
    frames: Batch,
    room: usize,
}

/// What the publishers, the registrations and the shard's thread share under one lock. The
/// lock is held only to move batches and to change membership, never during a pass.
#[derive(Default)]
struct ShardState {
    queue: Vec<Queued>,
    members: HashMap<u64, Arc<Client>>,
    /// Bumped on every membership change, so that the thread rebuilds its list only then.
    generation: u64,
    stopped: bool,
}

/// One shard: some of the clients, and the queue of batches its thread has yet to write.
pub struct Shard {
    state: Mutex<ShardState>,
    wake: Condvar,
    /// Frames the receiver may queue ahead of this shard's thread.
    room: Semaphore,
    /// The semaphore's size: no single batch may hold more.
    read_ahead: u32,
}

impl Shard {
    fn lock(&self) -> MutexGuard<'_, ShardState> {
        // Every critical section leaves the state whole before anything can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a client; every batch queued from now on reaches it.
    pub fn join(&self, id: u64, client: Arc<Client>) {
        let mut state = self.lock();
        state.members.insert(id, client);
        state.generation += 1;
    }

    /// Removes a client (gone, or kicked); nothing more is written to it.
    pub fn leave(&self, id: u64) {
        let mut state = self.lock();
        if state.members.remove(&id).is_some() {
            state.generation += 1;
        }
    }

    /// Waits for room to queue `len` frames (at most the whole read-ahead). The room goes back
    /// by itself if the caller gives up before [`Shard::enqueue`], so a publisher cancelled
    /// while waiting (shutdown, a lost connection) leaks nothing.
    pub async fn reserve(&self, len: usize) -> Room<'_> {
        let wanted = u32::try_from(len)
            .unwrap_or(u32::MAX)
            .clamp(1, self.read_ahead);
        // The semaphore is never closed; were it, the batch would go out without accounting.
        Room(self.room.acquire_many(wanted).await.ok())
    }

    /// Queues a batch for this shard's thread, with the room reserved for it, which the thread
    /// hands back once the batch is written.
    pub fn enqueue(&self, frames: Batch, room: Room<'_>) {
        let room = room.0.map_or(0, |permit| {
            let count = permit.num_permits();
            permit.forget();
            count
        });
        self.lock().queue.push(Queued { frames, room });
        self.wake.notify_one();
    }
}

/// Room reserved in a shard's queue: see [`Shard::reserve`].
pub struct Room<'a>(Option<SemaphorePermit<'a>>);

/// The shards and their threads; the threads stop when this is dropped.
pub struct FanOut {
    shards: Vec<Arc<Shard>>,
    threads: Vec<JoinHandle<()>>,
}

impl FanOut {
    /// Starts `count` shards (at least one). `read_ahead` bounds, in frames, how far the
    /// receiver may get ahead of each; `capacity` is the clients' outbox size, for log lines.
    pub fn start(count: usize, read_ahead: usize, capacity: usize, metrics: Arc<Metrics>) -> Self {
        let read_ahead = u32::try_from(read_ahead.max(1)).unwrap_or(u32::MAX);
        let mut shards = Vec::new();
        let mut threads = Vec::new();
        for index in 0..count.max(1) {
            let shard = Arc::new(Shard {
                state: Mutex::default(),
                wake: Condvar::new(),
                room: Semaphore::new(read_ahead as usize),
                read_ahead,
            });
            let worker = Worker {
                shard: shard.clone(),
                metrics: metrics.clone(),
                capacity,
            };
            let thread = std::thread::Builder::new()
                .name(format!("fanout-{index}"))
                .spawn(move || worker.run())
                .expect("spawning a fan-out thread");
            shards.push(shard);
            threads.push(thread);
        }
        FanOut { shards, threads }
    }

    pub fn shards(&self) -> &[Arc<Shard>] {
        &self.shards
    }

    /// The shard a client belongs to.
    pub fn shard_of(&self, id: u64) -> &Arc<Shard> {
        &self.shards[(id % self.shards.len() as u64) as usize]
    }
}

impl Drop for FanOut {
    fn drop(&mut self) {
        for shard in &self.shards {
            shard.lock().stopped = true;
            shard.wake.notify_one();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A shard's thread.
struct Worker {
    shard: Arc<Shard>,
    metrics: Arc<Metrics>,
    capacity: usize,
}

impl Worker {
    fn run(self) {
        let mut members: Vec<(u64, Arc<Client>)> = Vec::new();
        let mut seen = None;
        loop {
            // Take the batches first, the member list second: a client that joined after a
            // batch was published may get it, but one that joined before never misses it.
            let queued = {
                let mut state = self.shard.lock();
                while state.queue.is_empty() && !state.stopped {
                    state = self
                        .shard
                        .wake
                        .wait(state)
                        .unwrap_or_else(|p| p.into_inner());
                }
                if state.queue.is_empty() {
                    return;
                }
                if seen != Some(state.generation) {
                    members.clear();
                    members.extend(state.members.iter().map(|(id, c)| (*id, c.clone())));
                    seen = Some(state.generation);
                }
                std::mem::take(&mut state.queue)
            };
            let room: usize = queued.iter().map(|q| q.room).sum();
            let outcome = catch_unwind(AssertUnwindSafe(|| self.pass(&members, &queued)));
            if outcome.is_err() {
                log::error!("fan-out pass panicked; its frames may be lost for some clients");
            }
            self.shard.room.add_permits(room);
        }
    }

    /// Writes the queued batches, in order, to every member.
    fn pass(&self, members: &[(u64, Arc<Client>)], queued: &[Queued]) {
        let joined: Vec<Bytes>;
        let frames: &[Bytes] = match queued {
            [one] => &one.frames,
            many => {
                joined = many.iter().flat_map(|q| q.frames.iter().cloned()).collect();
                &joined
            }
        };
        let mut taken = 0u64;
        let mut leaving = Vec::new();
        for (id, client) in members {
            match client.out.send(frames) {
                Delivery::Accepted => taken += 1,
                Delivery::Overflow => {
                    self.metrics.clients_disconnected_slow.inc();
                    log::warn!(
                        "client {id}: disconnected, more than {} frames waiting (client too slow)",
                        self.capacity
                    );
                    client.control.kick(CloseReason::TooSlow);
                    leaving.push(*id);
                }
                // The client's task ends on its own; its registration leaves the shard too.
                Delivery::Closed => leaving.push(*id),
            }
        }
        self.metrics.frames_sent.inc_by(taken * frames.len() as u64);
        for id in leaving {
            self.shard.leave(id);
        }
    }
}
