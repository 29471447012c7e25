//! Shard threads: the clients are split into shards, and each shard has a thread of its own
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
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::client::{Client, CloseReason};
use super::outbox::Delivery;
use crate::message::{ChannelId, Field, Filter, Format, Outgoing};
use crate::metrics::Metrics;

/// What is published together, shared by every shard; each client gets its format's frames.
pub type Batch = Arc<[Arc<Outgoing>]>;

/// One batch waiting in a shard's queue, with the read-ahead room it holds.
struct Queued {
    frames: Batch,
    room: usize,
    /// The batch's place in the shard's order: a client gets only batches queued after it
    /// joined.
    seq: u64,
    /// For a batch addressed to part of the clients only (a slice of the heartbeat): which.
    only: Option<Slice>,
}

/// Part of the clients, by id: those whose id leaves `index` when divided by `count`.
///
/// Why: the heartbeat goes to every client once per interval. Sent to all at once it is a pass
/// of thousands of writes (hundreds of milliseconds with ten thousand clients on two cores), and
/// every message queued behind it waits that long. Sent one slice at a time, spread over the
/// interval, it is many passes of a few dozen writes, and a message waits at most for one. A
/// client's slice never changes, so it still gets exactly one heartbeat per interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    index: u64,
    count: u64,
}

impl Slice {
    /// Slice `index` of `count` (at least one); `index` is taken modulo `count`.
    pub fn new(index: u64, count: u64) -> Slice {
        let count = count.max(1);
        Slice {
            index: index % count,
            count,
        }
    }

    pub fn count(self) -> u64 {
        self.count
    }

    pub fn contains(self, id: u64) -> bool {
        id % self.count == self.index
    }
}

/// What a shard's members want, counted as they join and leave, so that a batch for none of
/// them is not queued and does not wake the shard's thread: a message for one agent among
/// thousands wakes only the thread that holds that agent's client. It answers "maybe" as the
/// thread's index does ([`FilterIndex::for_each_candidate`]): the filter itself decides later.
#[derive(Default)]
struct Interest {
    channels: Vec<ChannelInterest>,
}

#[derive(Default)]
struct ChannelInterest {
    everything: usize,
    filtered: usize,
    /// Filtered members by the first field their filter names, as the thread indexes them.
    keyed: [KeyInterest; 4],
}

#[derive(Default)]
struct KeyInterest {
    all: usize,
    by_value: HashMap<Box<str>, usize>,
}

impl Interest {
    fn add(&mut self, client: &Client) {
        let index = client.channel.index();
        if self.channels.len() <= index {
            self.channels
                .resize_with(index + 1, ChannelInterest::default);
        }
        let channel = &mut self.channels[index];
        match client.filter.as_ref().and_then(Filter::key) {
            None => channel.everything += 1,
            Some((field, values)) => {
                channel.filtered += 1;
                let key = &mut channel.keyed[field.index()];
                key.all += 1;
                for value in values {
                    *key.by_value.entry(value.clone()).or_default() += 1;
                }
            }
        }
    }

    fn remove(&mut self, client: &Client) {
        let Some(channel) = self.channels.get_mut(client.channel.index()) else {
            return;
        };
        match client.filter.as_ref().and_then(Filter::key) {
            None => channel.everything -= 1,
            Some((field, values)) => {
                channel.filtered -= 1;
                let key = &mut channel.keyed[field.index()];
                key.all -= 1;
                for value in values {
                    if let Some(count) = key.by_value.get_mut(&**value) {
                        *count -= 1;
                        if *count == 0 {
                            key.by_value.remove(&**value);
                        }
                    }
                }
            }
        }
    }

    /// Whether `item` may be for one of the members.
    fn wants(&self, item: &Outgoing) -> bool {
        let Some(channel) = self.channels.get(item.channel().index()) else {
            return false;
        };
        if channel.everything > 0 {
            return true;
        }
        if channel.filtered == 0 {
            return false;
        }
        let Some(fields) = item.fields() else {
            return true;
        };
        Field::ALL.iter().any(|field| {
            let key = &channel.keyed[field.index()];
            match fields.get(*field) {
                Some(value) => key.by_value.contains_key(value),
                None => key.all > 0,
            }
        })
    }
}

/// A member of a shard: the client, and the first batch it is to receive.
struct Member {
    client: Arc<Client>,
    first_seq: u64,
}

/// What the publishers, the registrations and the shard's thread share under one lock. The
/// lock is held only to move batches and to change membership, never during a pass.
#[derive(Default)]
struct ShardState {
    queue: Vec<Queued>,
    members: HashMap<u64, Member>,
    interest: Interest,
    /// Batches queued so far: the `seq` of the next one.
    queued: u64,
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

    /// Adds a client; every batch queued from now on reaches it, and no batch queued before.
    pub fn join(&self, id: u64, client: Arc<Client>) {
        let mut state = self.lock();
        let first_seq = state.queued;
        state.interest.add(&client);
        if let Some(replaced) = state.members.insert(id, Member { client, first_seq }) {
            state.interest.remove(&replaced.client);
        }
        state.generation += 1;
    }

    /// Appends this shard's members to `into`, under the lock only for the copy.
    pub fn members_into(&self, into: &mut Vec<(u64, Arc<Client>)>) {
        let state = self.lock();
        into.extend(
            state
                .members
                .iter()
                .map(|(id, member)| (*id, member.client.clone())),
        );
    }

    /// Removes a client (gone, or kicked); nothing more is written to it.
    pub fn leave(&self, id: u64) {
        let mut state = self.lock();
        if let Some(member) = state.members.remove(&id) {
            state.interest.remove(&member.client);
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
    /// hands back once the batch is written; for the members of `only`, when given. A batch
    /// for none of the members is dropped here, its room given back at once.
    pub fn enqueue(&self, frames: Batch, room: Room<'_>, only: Option<Slice>) {
        let mut state = self.lock();
        // Under the lock that joins take too: a member that joined before this batch counts.
        if !frames.iter().any(|item| state.interest.wants(item)) {
            return;
        }
        let room = room.0.map_or(0, |permit| {
            let count = permit.num_permits();
            permit.forget();
            count
        });
        let seq = state.queued;
        state.queued += 1;
        state.queue.push(Queued {
            frames,
            room,
            seq,
            only,
        });
        drop(state);
        self.wake.notify_one();
    }
}

/// Room reserved in a shard's queue: see [`Shard::reserve`].
pub struct Room<'a>(Option<SemaphorePermit<'a>>);

/// The shards and their threads; the threads stop when this is dropped.
pub struct Shards {
    shards: Vec<Arc<Shard>>,
    threads: Vec<JoinHandle<()>>,
}

impl Shards {
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
        Shards { shards, threads }
    }

    pub fn shards(&self) -> &[Arc<Shard>] {
        &self.shards
    }

    /// The shard a client belongs to.
    pub fn shard_of(&self, id: u64) -> &Arc<Shard> {
        &self.shards[(id % self.shards.len() as u64) as usize]
    }

    /// Whether shard `index` may hold a client of `slice`: when the slices are a multiple of
    /// the shards, each slice's clients are all in one shard.
    pub fn may_hold(&self, index: usize, slice: Slice) -> bool {
        let shards = self.shards.len() as u64;
        slice.count() % shards != 0 || slice.index % shards == index as u64
    }
}

impl Drop for Shards {
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

/// Frames a filtered member's pending list keeps room for between passes.
const KEPT_PENDING: usize = 16;

/// A member as the shard's thread lists it: id, client, and the first batch it gets.
type Entry = (u64, Arc<Client>, u64);

/// The shard's thread's index of its members, by channel and by the values they filter on,
/// rebuilt only when membership changes. It makes a message's cost follow the clients it is
/// for: a pass visits only the channels its batches are on, and a message that names an agent
/// reaches that agent's filtered clients by one lookup rather than a look at every client.
#[derive(Default)]
struct View {
    channels: Vec<ChannelView>,
}

impl View {
    fn build(members: &HashMap<u64, Member>) -> View {
        let mut view = View::default();
        for (id, member) in members {
            let client = &member.client;
            let index = client.channel.index();
            if view.channels.len() <= index {
                view.channels.resize_with(index + 1, ChannelView::default);
            }
            let channel = &mut view.channels[index];
            let entry = (*id, client.clone(), member.first_seq);
            match client.filter.as_ref().and_then(Filter::key) {
                None => channel.everything.push(entry),
                Some((field, values)) => {
                    let at = channel.filtered.len();
                    let key = &mut channel.index.0[field.index()];
                    key.all.push(at);
                    for value in values {
                        key.by_value.entry(value.clone()).or_default().push(at);
                    }
                    channel.filtered.push(entry);
                    channel.pending.push(Vec::new());
                }
            }
        }
        view
    }
}

/// One channel's members of the shard.
#[derive(Default)]
struct ChannelView {
    /// Unfiltered: every message of the channel.
    everything: Vec<Entry>,
    /// Filtered, each indexed under the first field its filter names ([`Filter::key`]).
    filtered: Vec<Entry>,
    index: FilterIndex,
    /// Per filtered member, the frames of the current pass that are for it; reused.
    pending: Vec<Vec<Bytes>>,
    /// The filtered members with pending frames, in the order they got their first.
    touched: Vec<usize>,
}

/// The filtered members, by field ([`Field::index`]).
#[derive(Default)]
struct FilterIndex([KeyIndex; 4]);

/// The filtered members indexed under one field: by each value they accept, and all of them
/// (what a message without that field reaches).
#[derive(Default)]
struct KeyIndex {
    by_value: HashMap<Box<str>, Vec<usize>>,
    all: Vec<usize>,
}

impl FilterIndex {
    /// Calls `visit` with each filtered member a message may be for: those indexed under a
    /// field by the message's value of it, or under a field the message lacks; each at most
    /// once. A message that names none of the fields (or an event) is for all `members`.
    fn for_each_candidate(&self, item: &Outgoing, members: usize, mut visit: impl FnMut(usize)) {
        let Some(fields) = item.fields() else {
            return (0..members).for_each(visit);
        };
        for field in Field::ALL {
            let key = &self.0[field.index()];
            let listed = match fields.get(field) {
                Some(value) => key.by_value.get(value).map_or(&[][..], Vec::as_slice),
                None => key.all.as_slice(),
            };
            listed.iter().for_each(|at| visit(*at));
        }
    }
}

impl Worker {
    fn run(self) {
        let mut view = View::default();
        let mut seen = None;
        loop {
            // Batches and members are taken under one lock, so every member that joined before
            // a batch was queued is in the list; one that joined after skips it by its seq.
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
                    view = View::build(&state.members);
                    seen = Some(state.generation);
                }
                std::mem::take(&mut state.queue)
            };
            let room: usize = queued.iter().map(|q| q.room).sum();
            // Batches for a slice of the members go in passes of their own.
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                for part in queued.chunk_by(|a, b| a.only == b.only) {
                    self.pass(&mut view, part);
                }
            }));
            if outcome.is_err() {
                log::error!("fan-out pass panicked; its frames may be lost for some clients");
                // Its pending frames must not reach a client after later ones.
                view = View::default();
                seen = None;
            }
            self.shard.room.add_permits(room);
        }
    }

    /// Writes the queued batches, in order, to every member they are for, in its format, each
    /// from the first batch queued after it joined. The batches are all for the same members
    /// (`only`).
    fn pass(&self, view: &mut View, queued: &[Queued]) {
        let only = queued.first().and_then(|q| q.only);
        let outside = |id: u64| only.is_some_and(|slice| !slice.contains(id));
        let mut sent = 0u64;
        let mut leaving = Vec::new();
        // The channels of this pass, each with its number of items. The quietest goes first:
        // a channel with one message in the pass is not kept waiting while a flooded one's
        // clients are written hundreds of frames each (the clients of one channel are apart
        // from another's, so the order between channels is free).
        let mut on: Vec<(ChannelId, usize)> = Vec::new();
        for item in queued.iter().flat_map(|q| q.frames.iter()) {
            match on.iter_mut().find(|(id, _)| *id == item.channel()) {
                Some((_, items)) => *items += 1,
                None => on.push((item.channel(), 1)),
            }
        }
        on.sort_by_key(|(_, items)| *items);
        for (channel_id, _) in on {
            let Some(channel) = view.channels.get_mut(channel_id.index()) else {
                continue;
            };
            let mut by_format: [Option<FormatFrames>; 3] = Default::default();
            let mut sent_by_format = [0u64; 3];
            for (id, client, joined) in &channel.everything {
                if outside(*id) {
                    continue;
                }
                let frames = by_format[client.format.index()]
                    .get_or_insert_with(|| FormatFrames::new(queued, channel_id, client.format))
                    .queued_since(queued, *joined);
                sent_by_format[client.format.index()] +=
                    self.deliver(*id, client, frames, &mut leaving);
            }
            self.deliver_filtered(
                channel,
                channel_id,
                queued,
                &outside,
                &mut sent_by_format,
                &mut leaving,
            );
            if channel.everything.is_empty() && channel.filtered.is_empty() {
                continue;
            }
            self.count(channel_id, queued, sent_by_format);
            sent += sent_by_format.iter().sum::<u64>();
        }
        self.metrics.frames_sent.inc_by(sent);
        for id in leaving {
            self.shard.leave(id);
        }
    }

    /// Counts the frames of one channel's part of a pass by transport, and the fan-out delay of
    /// each of its messages: now is when the last of its clients in this shard was written.
    fn count(&self, channel_id: ChannelId, queued: &[Queued], sent_by_format: [u64; 3]) {
        let done = Instant::now();
        let received = queued
            .iter()
            .flat_map(|q| q.frames.iter())
            .filter(|item| item.channel() == channel_id)
            .filter_map(|item| item.received());
        for at in received {
            self.metrics
                .observe_fanout_delay(done.saturating_duration_since(at));
        }
        for format in Format::ALL {
            let sent = sent_by_format[format.index()];
            if sent > 0 {
                if let Some(labelled) = self.metrics.channel(channel_id, format) {
                    labelled.frames_sent.inc_by(sent);
                }
            }
        }
    }

    /// Hands the filtered members of one channel the frames of this pass that are for them.
    fn deliver_filtered(
        &self,
        channel: &mut ChannelView,
        channel_id: ChannelId,
        queued: &[Queued],
        outside: &dyn Fn(u64) -> bool,
        sent_by_format: &mut [u64; 3],
        leaving: &mut Vec<u64>,
    ) {
        if channel.filtered.is_empty() {
            return;
        }
        for q in queued {
            for item in q.frames.iter().filter(|item| item.channel() == channel_id) {
                let members = channel.filtered.len();
                channel.index.for_each_candidate(item, members, |at| {
                    let (id, client, joined) = &channel.filtered[at];
                    if q.seq < *joined || outside(*id) || !item.is_for(client.filter.as_ref()) {
                        return;
                    }
                    let Some(frame) = item.frame(client.format) else {
                        return;
                    };
                    let pending = &mut channel.pending[at];
                    if pending.is_empty() {
                        channel.touched.push(at);
                    }
                    pending.push(frame.clone());
                });
            }
        }
        // A member's list is emptied, not dropped, so that a pass of a few messages allocates
        // nothing per member (a broadcast touches every one); a list grown by a burst (at most
        // the read-ahead, `ClientQueue` frames) is freed, so no member keeps its peak.
        for at in std::mem::take(&mut channel.touched) {
            let (id, client, _) = &channel.filtered[at];
            let frames = &mut channel.pending[at];
            sent_by_format[client.format.index()] += self.deliver(*id, client, frames, leaving);
            if frames.capacity() > KEPT_PENDING {
                *frames = Vec::new();
            } else {
                frames.clear();
            }
        }
    }

    /// Hands one member its frames of this pass, and says how many it took; a member that
    /// overflows is kicked as too slow.
    fn deliver(&self, id: u64, client: &Client, frames: &[Bytes], leaving: &mut Vec<u64>) -> u64 {
        if frames.is_empty() {
            return 0;
        }
        match client.out.send(frames) {
            Delivery::Accepted => {
                let count = frames.len() as u64;
                client.count_sent(count);
                return count;
            }
            Delivery::Overflow => {
                self.metrics.clients_disconnected_slow.inc();
                log::warn!(
                    "client {id}: disconnected, more than {} frames waiting (client too slow)",
                    self.capacity
                );
                client.control.kick(CloseReason::TooSlow);
                leaving.push(id);
            }
            // The client's task ends on its own; its registration leaves the shard too.
            Delivery::Closed => leaving.push(id),
        }
        0
    }
}

/// The frames of one pass for one channel in one format: each batch's encoding for that format,
/// in order, built once per pass, channel and format (a reference count per frame), never per
/// client.
#[derive(Default)]
struct FormatFrames {
    frames: Vec<Bytes>,
    /// Where each queued batch's frames start in `frames`.
    starts: Vec<usize>,
}

impl FormatFrames {
    fn new(queued: &[Queued], channel: ChannelId, format: Format) -> FormatFrames {
        let mut frames = Vec::new();
        let mut starts = Vec::with_capacity(queued.len());
        for q in queued {
            starts.push(frames.len());
            frames.extend(
                q.frames
                    .iter()
                    .filter(|o| o.channel() == channel)
                    .filter_map(|o| o.frame(format))
                    .cloned(),
            );
        }
        FormatFrames { frames, starts }
    }

    /// The frames of the batches queued at or after `seq`.
    fn queued_since(&self, queued: &[Queued], seq: u64) -> &[Bytes] {
        let first = queued.partition_point(|q| q.seq < seq);
        let start = self.starts.get(first).copied().unwrap_or(self.frames.len());
        &self.frames[start..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::outbox::ClientOut;
    use crate::fanout::outbox::test_support::socket_pair;
    use crate::fanout::{ClientControl, Subscription};
    use tokio::io::AsyncReadExt;
    use tokio_util::sync::CancellationToken;

    fn message(offset: u64, payload: &str) -> Arc<Outgoing> {
        let position = format!("1-{offset}").parse().expect("position");
        Arc::new(Outgoing::message(position, payload))
    }

    fn legacy(items: &[&Arc<Outgoing>]) -> Vec<u8> {
        items
            .iter()
            .flat_map(|o| o.frame(Format::Legacy).expect("legacy").to_vec())
            .collect()
    }

    /// A shard of `capacity` frames of read-ahead, and its worker, which the test drives.
    fn shard_with_worker(capacity: u32) -> (Arc<Shard>, Worker) {
        let shard = Arc::new(Shard {
            state: Mutex::default(),
            wake: Condvar::new(),
            room: Semaphore::new(capacity as usize),
            read_ahead: capacity,
        });
        let worker = Worker {
            shard: shard.clone(),
            metrics: Arc::new(Metrics::new()),
            capacity: capacity as usize,
        };
        (shard, worker)
    }

    /// A batch queued before a client joined, but not yet written when it did, is not sent
    /// to it: its first frame is the first one published after it joined.
    #[tokio::test]
    async fn a_client_gets_only_batches_queued_after_it_joined() {
        let (shard, worker) = shard_with_worker(16);
        let client = |server, format| {
            let client = Arc::new(Client::new(
                ClientOut::new(16),
                ClientControl::new(CancellationToken::new()),
                Subscription::everything(format),
            ));
            client.out.attach(server);
            client
        };
        let (old, new) = (message(1, r#"{"n":1}"#), message(2, r#"{"n":2}"#));
        let (early_socket, mut early_peer) = socket_pair().await;
        shard.join(1, client(early_socket, Format::Legacy));
        shard.enqueue(Arc::from(vec![old.clone()]), shard.reserve(1).await, None);
        let (late_socket, mut late_peer) = socket_pair().await;
        shard.join(2, client(late_socket, Format::Legacy));
        let (v1_socket, mut v1_peer) = socket_pair().await;
        shard.join(3, client(v1_socket, Format::V1));
        shard.enqueue(Arc::from(vec![new.clone()]), shard.reserve(1).await, None);

        let (queued, mut view) = {
            let mut state = shard.lock();
            let view = View::build(&state.members);
            (std::mem::take(&mut state.queue), view)
        };
        worker.pass(&mut view, &queued);

        let expected = legacy(&[&old, &new]);
        let mut early = vec![0u8; expected.len()];
        early_peer.read_exact(&mut early).await.expect("early");
        assert_eq!(early, expected);
        let expected = legacy(&[&new]);
        let mut late = vec![0u8; expected.len()];
        late_peer.read_exact(&mut late).await.expect("late");
        assert_eq!(late, expected);
        let expected = new.frame(Format::V1).expect("v1");
        let mut v1 = vec![0u8; expected.len()];
        v1_peer.read_exact(&mut v1).await.expect("v1");
        assert_eq!(&v1[..], &expected[..]);
        assert_eq!(worker.metrics.frames_sent.get(), 4);
        let members = shard
            .lock()
            .members
            .values()
            .map(|m| m.client.clone())
            .collect::<Vec<_>>();
        let mut counts: Vec<u64> = members.iter().map(|c| c.frames_sent()).collect();
        counts.sort_unstable();
        assert_eq!(counts, [1, 1, 2]);
        // One delay per message in the pass: both went to clients of the default channel.
        assert_eq!(worker.metrics.fanout_delay_count(), 2);
    }

    fn member(channel: ChannelId, filter: Option<Filter>) -> Arc<Client> {
        Arc::new(Client::new(
            ClientOut::new(16),
            ClientControl::new(CancellationToken::new()),
            Subscription {
                channel,
                format: Format::Legacy,
                filter,
            },
        ))
    }

    fn targeted(agent: &str) -> Arc<Outgoing> {
        let payload = format!(r#"{{"agent_id":"{agent}"}}"#);
        let fields = crate::message::check(&payload).expect("valid");
        let position = "1-1".parse().expect("position");
        Arc::new(Outgoing::accepted(
            ChannelId::DEFAULT,
            position,
            &payload,
            fields,
        ))
    }

    /// A batch for none of a shard's members is not queued, and its room is back at once; one
    /// that may be for a member is, until that member leaves.
    #[tokio::test]
    async fn a_batch_for_none_of_the_members_is_not_queued() {
        let (shard, _worker) = shard_with_worker(4);
        let queued = |shard: &Shard| shard.lock().queue.len();
        let agent_a = Some(filter(&[(Field::AgentId, "A")]));
        shard.join(1, member(ChannelId::DEFAULT, agent_a.clone()));
        shard.join(2, member(ChannelId(1), None));
        shard.enqueue(Arc::from(vec![targeted("B")]), shard.reserve(4).await, None);
        assert_eq!(queued(&shard), 0);
        assert_eq!(shard.room.available_permits(), 4);
        shard.enqueue(Arc::from(vec![targeted("A")]), shard.reserve(1).await, None);
        assert_eq!(queued(&shard), 1);
        // An event reaches every filter; another channel's unfiltered member wants it all.
        let ping = |channel| Arc::new(Outgoing::ping(channel, "1-1".parse().expect("position")));
        shard.enqueue(
            Arc::from(vec![ping(ChannelId::DEFAULT)]),
            shard.reserve(1).await,
            None,
        );
        shard.enqueue(
            Arc::from(vec![ping(ChannelId(1))]),
            shard.reserve(1).await,
            None,
        );
        assert_eq!(queued(&shard), 3);
        shard.leave(1);
        shard.enqueue(Arc::from(vec![targeted("A")]), shard.reserve(1).await, None);
        shard.enqueue(
            Arc::from(vec![ping(ChannelId::DEFAULT)]),
            shard.reserve(1).await,
            None,
        );
        assert_eq!(queued(&shard), 3);
        // A second member with the same value keeps it wanted until both have left.
        shard.join(3, member(ChannelId::DEFAULT, agent_a.clone()));
        shard.join(4, member(ChannelId::DEFAULT, agent_a));
        shard.leave(3);
        shard.enqueue(Arc::from(vec![targeted("A")]), shard.reserve(1).await, None);
        assert_eq!(queued(&shard), 4);
    }

    /// A batch for a slice reaches only the members of that slice, filtered or not, and a
    /// pass of it is apart from the batches for everyone around it.
    #[tokio::test]
    async fn a_slice_reaches_only_its_members() {
        let (shard, worker) = shard_with_worker(16);
        let mut peers = Vec::new();
        for id in 0..4u64 {
            let filter = (id >= 2).then(|| filter(&[(Field::AgentId, "A")]));
            let client = member(ChannelId::DEFAULT, filter);
            let (socket, peer) = socket_pair().await;
            client.out.attach(socket);
            shard.join(id, client);
            peers.push(peer);
        }
        let ping = Arc::new(Outgoing::ping(
            ChannelId::DEFAULT,
            "1-1".parse().expect("position"),
        ));
        let before = targeted("A");
        let after = message(2, r#"{"n":2}"#);
        shard.enqueue(
            Arc::from(vec![before.clone()]),
            shard.reserve(1).await,
            None,
        );
        let odd = Some(Slice::new(1, 2));
        shard.enqueue(Arc::from(vec![ping.clone()]), shard.reserve(1).await, odd);
        shard.enqueue(Arc::from(vec![after.clone()]), shard.reserve(1).await, None);
        let queued = std::mem::take(&mut shard.lock().queue);
        let mut view = View::build(&shard.lock().members);
        for part in queued.chunk_by(|a, b| a.only == b.only) {
            worker.pass(&mut view, part);
        }
        for (id, peer) in peers.iter_mut().enumerate() {
            let got: Vec<&Arc<Outgoing>> = [&before, &ping, &after]
                .into_iter()
                .filter(|item| !Arc::ptr_eq(item, &ping) || id % 2 == 1)
                .collect();
            let expected = legacy(&got);
            let mut read = vec![0u8; expected.len()];
            peer.read_exact(&mut read).await.expect("frames");
            assert_eq!(read, expected, "member {id}");
        }
        assert!(Slice::new(5, 2).contains(3));
        assert!(!Slice::new(0, 3).contains(4));
    }

    fn filter(pairs: &[(Field, &str)]) -> Filter {
        let mut filter = Filter::default();
        for (field, value) in pairs {
            filter.allow(*field, value);
        }
        filter
    }

    /// Each client gets, in order, exactly the messages of its channel that its filter keeps
    /// (and every message that names none of the fields), whatever field it is indexed by.
    #[tokio::test]
    async fn a_pass_delivers_by_channel_and_filter() {
        let (shard, worker) = shard_with_worker(64);
        let other = ChannelId(1);
        let subscriptions = [
            (ChannelId::DEFAULT, None),
            (ChannelId::DEFAULT, Some(filter(&[(Field::AgentId, "A")]))),
            (
                ChannelId::DEFAULT,
                Some(filter(&[(Field::AgentId, "B"), (Field::AgentId, "C")])),
            ),
            (
                ChannelId::DEFAULT,
                Some(filter(&[(Field::CheckId, "k"), (Field::Action, "abort")])),
            ),
            (other, None),
            (other, Some(filter(&[(Field::AgentId, "A")]))),
        ];
        let mut peers = Vec::new();
        for (id, (channel, filter)) in subscriptions.iter().enumerate() {
            let (socket, peer) = socket_pair().await;
            let client = Arc::new(Client::new(
                ClientOut::new(64),
                ClientControl::new(CancellationToken::new()),
                Subscription {
                    channel: *channel,
                    format: Format::Legacy,
                    filter: filter.clone(),
                },
            ));
            client.out.attach(socket);
            shard.join(id as u64, client);
            peers.push(peer);
        }
        let on = |channel, offset, payload: &str| {
            let position = format!("1-{offset}").parse().expect("position");
            let fields = crate::message::check(payload).expect("valid");
            Arc::new(Outgoing::accepted(channel, position, payload, fields))
        };
        let items = [
            on(ChannelId::DEFAULT, 1, r#"{"agent_id":"A"}"#),
            on(ChannelId::DEFAULT, 2, r#"{"agent_id":"C","check_id":"k"}"#),
            on(ChannelId::DEFAULT, 3, r#"{"action":"ping"}"#),
            on(other, 1, r#"{"agent_id":"A"}"#),
            on(
                ChannelId::DEFAULT,
                4,
                r#"{"check_id":"k","action":"abort"}"#,
            ),
            on(ChannelId::DEFAULT, 5, r#"{"agent_id":null,"n":1}"#),
            on(other, 2, r#"{"agent_id":"B"}"#),
        ];
        for item in &items {
            shard.enqueue(Arc::from(vec![item.clone()]), shard.reserve(1).await, None);
        }
        let (queued, mut view) = {
            let mut state = shard.lock();
            let view = View::build(&state.members);
            (std::mem::take(&mut state.queue), view)
        };
        worker.pass(&mut view, &queued);
        let expected: [&[usize]; 6] = [
            &[0, 1, 2, 4, 5],
            &[0, 2, 4, 5],
            &[1, 2, 4, 5],
            &[0, 1, 4, 5],
            &[3, 6],
            &[3],
        ];
        for (peer, wanted) in peers.iter_mut().zip(expected) {
            let frames: Vec<&Arc<Outgoing>> = wanted.iter().map(|i| &items[*i]).collect();
            let expected = legacy(&frames);
            let mut got = vec![0u8; expected.len()];
            peer.read_exact(&mut got).await.expect("frames");
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&expected)
            );
        }
        // Nothing more was written to anyone: a ping now is each one's next frame.
        let ping = |channel| Arc::new(Outgoing::ping(channel, "1-9".parse().expect("position")));
        let pings = [ping(ChannelId::DEFAULT), ping(other)];
        shard.enqueue(Arc::from(pings.to_vec()), shard.reserve(2).await, None);
        let queued = std::mem::take(&mut shard.lock().queue);
        worker.pass(&mut view, &queued);
        for (peer, (channel, _)) in peers.iter_mut().zip(&subscriptions) {
            let expected = legacy(&[&pings[channel.index()]]);
            let mut got = vec![0u8; expected.len()];
            peer.read_exact(&mut got).await.expect("ping");
            assert_eq!(got, expected);
        }
    }
}
