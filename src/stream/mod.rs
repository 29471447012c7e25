//! The ordered stream between a source and the fan-out: every payload a source delivers is
//! checked here once, given its position on its channel, kept in the channel's history, and
//! published to the clients that want it, in the source's order.
//!
//! A source (LISTEN, or the durable table) only hands payloads over and reports whether it is live; it knows
//! nothing of clients. The fan-out only writes what it is given; it knows nothing of
//! PostgreSQL. The stream is the one place that sees every message in order, so positions and
//! history live here, and so does the hand-over of a resuming client: under one lock, the
//! client is given what it missed and joins the fan-out, while publishing appends and queues
//! under the same lock, so the hand-over has neither gap nor duplicate.

pub mod durable;
pub mod history;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::fanout::{Batch, Hub, Registration, Slice, Subscription};
use crate::message::{self, ChannelId, Epoch, Outgoing, Position, ResetReason};
use crate::metrics::Metrics;
pub use durable::{Archive, ArchivedRow, Page, Unavailable};
pub use history::{History, HistoryLimits};

/// Whether the stream's source is live, as `/status` and `/ready` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerState {
    Connecting,
    Listening,
}

impl ListenerState {
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerState::Connecting => "connecting",
            ListenerState::Listening => "listening",
        }
    }
}

/// What is ordered under the stream's lock: each channel's log, by [`ChannelId`].
#[derive(Debug)]
struct Log {
    channels: Vec<ChannelLog>,
}

impl Log {
    fn at(&self, channel: ChannelId) -> &ChannelLog {
        &self.channels[channel.index()]
    }

    fn of(&mut self, channel: ChannelId) -> &mut ChannelLog {
        &mut self.channels[channel.index()]
    }

    /// Every channel starts over at `start` (a new epoch, or the table's lineage).
    fn restart_at(&mut self, start: Position) {
        for channel in &mut self.channels {
            channel.head = start;
            channel.next = start.next();
            channel.history.clear();
        }
    }
}

/// One channel's place in the stream. Channels share the epoch; each has its own offsets
/// (in table mode the table's positions, shared by all channels) and its own history.
#[derive(Debug)]
struct ChannelLog {
    /// The newest published message, or the epoch's start.
    head: Position,
    /// The position the next accepted payload gets.
    next: Position,
    history: History,
}

/// How a client joins: from now, or after a position it already has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The first message published after it joined.
    Live,
    /// The message after this position, from the history; a `reset` first when that cannot be.
    After(Position),
}

/// How a resume went, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    Live,
    /// This many messages came from the history.
    Resumed(usize),
    /// The client was told to start over from the head.
    Reset(ResetReason),
}

/// The stream: the one path from a source to the clients.
pub struct Stream {
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    /// The channels' names, the default first: a [`ChannelId`] is an index into it.
    channels: Vec<String>,
    state: watch::Sender<ListenerState>,
    log: Mutex<Log>,
    /// Table mode only: where resumes beyond the history are served from.
    durable: Option<durable::Durable>,
}

impl Stream {
    /// A stream of one channel, `events`.
    pub fn new(hub: Arc<Hub>, metrics: Arc<Metrics>, limits: HistoryLimits) -> Stream {
        Stream::with_channels(hub, metrics, limits, vec!["events".to_owned()])
    }

    /// A stream of `channels` (the default first; at least one), each with a history bounded
    /// by `limits`.
    pub fn with_channels(
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        limits: HistoryLimits,
        channels: Vec<String>,
    ) -> Stream {
        assert!(
            !channels.is_empty() && channels.len() <= usize::from(u16::MAX),
            "a stream has a default channel and at most 65,535 in all"
        );
        let start = Epoch::new_after(None).start();
        let logs = channels
            .iter()
            .map(|_| ChannelLog {
                head: start,
                next: start.next(),
                history: History::new(limits),
            })
            .collect();
        // Before any client joins: the fan-out counts clients and frames by channel name.
        metrics.set_channels(&channels);
        Stream {
            hub,
            metrics,
            channels,
            state: watch::Sender::new(ListenerState::Connecting),
            log: Mutex::new(Log { channels: logs }),
            durable: None,
        }
    }

    /// The channel named `name`, if the stream carries it.
    pub fn channel_id(&self, name: &str) -> Option<ChannelId> {
        let index = self.channels.iter().position(|c| c == name)?;
        Some(ChannelId(
            u16::try_from(index).expect("at most 65,535 channels"),
        ))
    }

    /// The channels' names, the default first.
    pub fn channel_names(&self) -> &[String] {
        &self.channels
    }

    fn channel_ids(&self) -> impl Iterator<Item = ChannelId> + use<> {
        (0..self.channels.len()).map(|i| ChannelId(i as u16))
    }

    /// A stream whose positions come from its source (table mode): each message keeps the
    /// position the source gives it ([`Stream::accept_at`]), the epoch is the table's lineage
    /// ([`Stream::continue_at`]), and a client that resumes from further back than the history
    /// is served from `archive`.
    pub fn new_durable(
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        limits: HistoryLimits,
        channels: Vec<String>,
        archive: Arc<dyn Archive>,
    ) -> Stream {
        let mut stream = Stream::with_channels(hub, metrics, limits, channels);
        stream.durable = Some(durable::Durable::new(archive, limits.max_bytes));
        stream
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        // Every critical section leaves the log whole before anything can panic.
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Follows the source's state, for the HTTP side.
    pub fn listener_state(&self) -> watch::Receiver<ListenerState> {
        self.state.subscribe()
    }

    /// Records whether the source is live.
    pub fn set_listener_state(&self, state: ListenerState) {
        self.metrics
            .listener_up
            .set(i64::from(state == ListenerState::Listening));
        self.state.send_replace(state);
    }

    /// The default channel's newest position, for `/status`.
    pub fn head(&self) -> Position {
        self.head_of(ChannelId::DEFAULT)
    }

    /// A channel's newest position.
    pub fn head_of(&self, channel: ChannelId) -> Position {
        self.lock().at(channel).head
    }

    /// Bytes and messages the histories hold in all, read together, for `/status`.
    pub fn history_size(&self) -> (usize, usize) {
        let log = self.lock();
        log.channels.iter().fold((0, 0), |(bytes, len), channel| {
            (bytes + channel.history.bytes(), len + channel.history.len())
        })
    }

    /// Starts a new epoch after the source lost continuity (what was published meanwhile is
    /// gone), and tells every opted-in client to continue from its start.
    pub async fn restart_epoch(&self) {
        let rooms = self.hub.reserve(self.channels.len()).await;
        let mut log = self.lock();
        let start = Epoch::new_after(Some(log.at(ChannelId::DEFAULT).head.epoch)).start();
        log.restart_at(start);
        self.metrics.count_reset(ResetReason::ListenGap);
        self.hub.enqueue(
            self.every_channel(|c| Outgoing::reset(c, start, ResetReason::ListenGap)),
            rooms,
        );
        log::info!(
            "new stream epoch {}: the source lost continuity",
            start.epoch
        );
    }

    /// One event for every channel, as a batch.
    fn every_channel(&self, event: impl Fn(ChannelId) -> Outgoing) -> Batch {
        self.channel_ids().map(|c| Arc::new(event(c))).collect()
    }

    /// Checks one payload from `channel` and gives it the next position; invalid ones are
    /// counted and logged, never forwarded, as are payloads of a channel the stream does not
    /// carry.
    pub fn accept(&self, channel: &str, payload: &str) -> Option<Arc<Outgoing>> {
        let id = self.channel_id(channel)?;
        self.metrics.notifications_received.inc();
        match message::check(payload) {
            Ok(fields) => {
                log::debug!("notification on {channel:?}: {}", message::preview(payload));
                let mut log = self.lock();
                let log = log.of(id);
                let position = log.next;
                log.next = position.next();
                Some(Arc::new(Outgoing::accepted(id, position, payload, fields)))
            }
            Err(rejected) => {
                self.metrics.notifications_invalid.inc();
                log::warn!(
                    "notification on {channel:?} dropped ({rejected}): {:?}",
                    message::preview(payload)
                );
                None
            }
        }
    }

    /// Table mode: checks one row's payload; it keeps the position the table gave it. Invalid
    /// ones are counted and logged, never forwarded (their position is simply not used).
    pub fn accept_at(
        &self,
        channel: &str,
        payload: &str,
        position: Position,
    ) -> Option<Arc<Outgoing>> {
        let id = self.channel_id(channel)?;
        self.metrics.notifications_received.inc();
        match message::check(payload) {
            Ok(fields) => {
                log::debug!("row {position}: {}", message::preview(payload));
                Some(Arc::new(Outgoing::accepted(id, position, payload, fields)))
            }
            Err(rejected) => {
                self.metrics.notifications_invalid.inc();
                log::warn!(
                    "row {position} on {channel:?} dropped ({rejected}): {:?}",
                    message::preview(payload)
                );
                None
            }
        }
    }

    /// Table mode: the source (re)connected and reads after `head`, in the table's lineage
    /// `head.epoch`. The same lineage as before means nothing was lost (the source continues
    /// from its own cursor); a first call sets the epoch; a different lineage (the schema was
    /// created again) starts over, and opted-in clients are told with a reset.
    pub async fn continue_at(&self, head: Position) {
        let Some(durable) = &self.durable else {
            return;
        };
        let previous = *durable.lineage.borrow();
        if previous == Some(head.epoch) {
            return;
        }
        let rooms = self.hub.reserve(self.channels.len()).await;
        let mut log = self.lock();
        log.restart_at(head);
        if previous.is_some() {
            self.metrics.count_reset(ResetReason::OtherEpoch);
            self.hub.enqueue(
                self.every_channel(|c| Outgoing::reset(c, head, ResetReason::OtherEpoch)),
                rooms,
            );
            log::warn!(
                "the table's lineage changed to {} (its schema was created again): clients \
                 resume from {head}",
                head.epoch
            );
        } else {
            drop(rooms);
            log::info!("stream lineage {}: continuing after {head}", head.epoch);
        }
        drop(log);
        durable.lineage.send_replace(Some(head.epoch));
    }

    /// Table mode: the source has read every row of the stream's channels up to `offset` (the
    /// table's head), so every channel's head moves there even when none of them was on it; a
    /// client that resumes from a position another replica gave up to there is then current.
    pub fn advance_to(&self, offset: u64) {
        let Some(durable) = &self.durable else {
            return;
        };
        let mut log = self.lock();
        let mut moved = false;
        for channel in &mut log.channels {
            if offset > channel.head.offset {
                channel.head.offset = offset;
                channel.next.offset = offset + 1;
                moved = true;
            }
        }
        drop(log);
        if moved {
            durable.published.notify_waiters();
        }
    }

    /// Publishes accepted messages, in order, to the clients of their channels that want them,
    /// and keeps them in their channels' histories;
    /// empties `batch`. Waits only while the fan-out is a full read-ahead behind; cancelling
    /// the wait publishes nothing.
    pub async fn publish(&self, batch: &mut Vec<Arc<Outgoing>>) {
        if batch.is_empty() {
            return;
        }
        let rooms = self.hub.reserve(batch.len()).await;
        let count = batch.len();
        let items: Batch = Arc::from(std::mem::take(batch));
        let now = Instant::now();
        let mut log = self.lock();
        for message in items.iter() {
            let channel = log.of(message.channel());
            channel.history.push(now, message.clone());
            channel.head = message.position();
        }
        self.hub.enqueue(items, rooms);
        drop(log);
        if let Some(durable) = &self.durable {
            durable.published.notify_waiters();
        }
        self.metrics.notifications_forwarded.inc_by(count as u64);
        log::debug!(
            "{count} notification(s) forwarded to {} clients",
            self.hub.client_count()
        );
    }

    /// Adds a client that wants `subscription`, starting as `start` says. What it missed is
    /// filtered as the live messages are: a resumed client gets the same messages it would
    /// have got had it stayed.
    pub fn join(&self, subscription: Subscription, start: Start) -> (Registration, Joined) {
        let mut log = self.lock();
        let Start::After(since) = start else {
            return (self.hub.register(subscription), Joined::Live);
        };
        let channel = log.of(subscription.channel);
        let head = channel.head;
        let (backlog, joined) = match channel.history.after(Instant::now(), since, head) {
            Ok(missed) => {
                self.metrics.resumes_served.inc();
                let frames = frames_for(&subscription, &missed);
                let joined = Joined::Resumed(frames.len());
                (frames, joined)
            }
            Err(reason) => {
                self.metrics.count_reset(reason);
                let reset = Outgoing::reset(subscription.channel, head, reason);
                (
                    reset
                        .frame(subscription.format)
                        .cloned()
                        .into_iter()
                        .collect(),
                    Joined::Reset(reason),
                )
            }
        };
        (self.hub.register_after(subscription, backlog), joined)
    }

    /// Sends the heartbeat every `interval` until `shutdown`: `{"action":"ping"}` to legacy
    /// clients, the head position to the others. It goes out in slices ([`Slice`]), one after
    /// another over the interval, each client always in the same slice: every client gets one
    /// heartbeat per interval, and no pass over all of them holds up the messages.
    pub async fn run_heartbeat(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let slices = self.hub.heartbeat_slices(interval);
        let tick = interval / u32::try_from(slices).unwrap_or(u32::MAX);
        // The first round starts an interval from now, as a heartbeat to all at once did.
        let mut ticker = tokio::time::interval_at(Instant::now() + interval, tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {
                    let slice = Slice::new(next, slices);
                    next = (next + 1) % slices;
                    let rooms = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        rooms = self.hub.reserve_for(self.channels.len(), Some(slice)) => rooms,
                    };
                    let log = self.lock();
                    let pings = self.every_channel(|c| Outgoing::ping(c, log.at(c).head));
                    self.hub.enqueue(pings, rooms);
                    drop(log);
                }
            }
        }
    }
}

/// The frames of `messages` that a client of `subscription` gets, in order.
fn frames_for(subscription: &Subscription, messages: &[Arc<Outgoing>]) -> Vec<bytes::Bytes> {
    let filter = subscription.filter.as_ref();
    messages
        .iter()
        .filter(|m| m.is_for(filter))
        .filter_map(|m| m.frame(subscription.format))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::outbox::test_support::socket_pair;
    use crate::message::Format;
    use bytes::Bytes;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    fn stream(shutdown: &CancellationToken, limits: HistoryLimits) -> Arc<Stream> {
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(4, shutdown.clone(), metrics.clone()));
        Arc::new(Stream::new(hub, metrics, limits))
    }

    /// A client of `format` starting at `start`, with its socket attached; and its peer.
    async fn client(stream: &Stream, format: Format, start: Start) -> (Registration, TcpStream) {
        let (registration, _) = stream.join(Subscription::everything(format), start);
        let (server, peer) = socket_pair().await;
        attach(&registration, server);
        (registration, peer)
    }

    /// Gives the client its socket and writes out its backlog, as its task would.
    fn attach(registration: &Registration, server: Arc<TcpStream>) {
        registration.client.out.attach(server);
        assert!(
            registration.client.out.flush().expect("flush"),
            "backlog written"
        );
    }

    async fn expect(peer: &mut TcpStream, frames: &[&Bytes]) {
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.to_vec()).collect();
        let mut got = vec![0; expected.len()];
        peer.read_exact(&mut got).await.expect("frames");
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&expected)
        );
    }

    /// Accepts and publishes `count` messages; returns them.
    async fn publish(stream: &Stream, count: usize) -> Vec<Arc<Outgoing>> {
        let mut batch: Vec<_> = (0..count)
            .filter_map(|i| stream.accept("events", &format!(r#"{{"n":{i}}}"#)))
            .collect();
        let published = batch.clone();
        stream.publish(&mut batch).await;
        published
    }

    fn frames(items: &[Arc<Outgoing>], format: Format) -> Vec<&Bytes> {
        items.iter().filter_map(|m| m.frame(format)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_goes_out_each_interval_in_each_format() {
        let root = CancellationToken::new();
        let stream = stream(&root, HistoryLimits::default());
        let (_legacy, mut legacy_peer) = client(&stream, Format::Legacy, Start::Live).await;
        let (_v1, mut v1_peer) = client(&stream, Format::V1, Start::Live).await;
        let heartbeat = tokio::spawn(
            stream
                .clone()
                .run_heartbeat(Duration::from_secs(5), root.clone()),
        );
        let ping = Outgoing::ping(ChannelId::DEFAULT, stream.head());
        for _ in 0..2 {
            expect(
                &mut legacy_peer,
                &[ping.frame(Format::Legacy).expect("legacy")],
            )
            .await;
            expect(&mut v1_peer, &[ping.frame(Format::V1).expect("v1")]).await;
        }
        root.cancel();
        heartbeat.await.expect("the heartbeat stops on shutdown");
    }

    #[tokio::test]
    async fn valid_payloads_get_consecutive_positions_and_are_counted() {
        let root = CancellationToken::new();
        let stream = stream(&root, HistoryLimits::default());
        let (_reg, mut peer) = client(&stream, Format::Legacy, Start::Live).await;
        let start = stream.head();
        let mut batch: Vec<_> = [r#"{"n":1}"#, "not json", r#"{"n":2}"#]
            .into_iter()
            .filter_map(|p| stream.accept("events", p))
            .collect();
        let published = batch.clone();
        stream.publish(&mut batch).await;
        assert!(batch.is_empty());
        let offsets: Vec<u64> = published.iter().map(|m| m.position().offset).collect();
        assert_eq!(offsets, [1, 2]);
        assert_eq!(stream.head(), published[1].position());
        assert_eq!(stream.head().epoch, start.epoch);
        expect(&mut peer, &frames(&published, Format::Legacy)).await;
        assert_eq!(stream.metrics.notifications_received.get(), 3);
        assert_eq!(stream.metrics.notifications_invalid.get(), 1);
        assert_eq!(stream.metrics.notifications_forwarded.get(), 2);
    }

    #[tokio::test]
    async fn a_resumed_client_gets_what_it_missed_then_live_with_no_gap_or_duplicate() {
        let root = CancellationToken::new();
        let stream = stream(&root, HistoryLimits::default());
        let first = publish(&stream, 5).await;
        let since = first[1].position();
        let (joined_reg, joined) =
            stream.join(Subscription::everything(Format::V1), Start::After(since));
        assert_eq!(joined, Joined::Resumed(3));
        let later = publish(&stream, 2).await;
        let (server, mut peer) = socket_pair().await;
        attach(&joined_reg, server);
        let mut expected = frames(&first[2..], Format::V1);
        expected.extend(frames(&later, Format::V1));
        expect(&mut peer, &expected).await;
        assert_eq!(stream.metrics.resumes_served.get(), 1);
    }

    #[tokio::test]
    async fn an_unservable_position_gets_a_reset_naming_the_head() {
        let root = CancellationToken::new();
        let limits = HistoryLimits {
            max_messages: 2,
            ..HistoryLimits::default()
        };
        let stream = stream(&root, limits);
        let published = publish(&stream, 5).await;
        let head = stream.head();
        let (_reg, mut peer) =
            client(&stream, Format::V1, Start::After(published[0].position())).await;
        let reset = Outgoing::reset(ChannelId::DEFAULT, head, ResetReason::Evicted);
        let next = publish(&stream, 1).await;
        expect(
            &mut peer,
            &[
                reset.frame(Format::V1).expect("v1"),
                next[0].frame(Format::V1).expect("v1"),
            ],
        )
        .await;
        let (_, joined) = stream.join(
            Subscription::everything(Format::V1),
            Start::After(Epoch::new_after(None).start()),
        );
        assert_eq!(joined, Joined::Reset(ResetReason::OtherEpoch));
    }

    #[tokio::test]
    async fn a_new_epoch_resets_opted_in_clients_and_legacy_ones_see_nothing() {
        let root = CancellationToken::new();
        let stream = stream(&root, HistoryLimits::default());
        let before = publish(&stream, 2).await;
        let (_legacy, mut legacy_peer) = client(&stream, Format::Legacy, Start::Live).await;
        let (_v1, mut v1_peer) = client(&stream, Format::V1, Start::Live).await;
        stream.restart_epoch().await;
        let start = stream.head();
        assert_ne!(start.epoch, before[0].position().epoch);
        assert_eq!(start.offset, 0);
        let after = publish(&stream, 1).await;
        assert_eq!(after[0].position(), start.next());
        let reset = Outgoing::reset(ChannelId::DEFAULT, start, ResetReason::ListenGap);
        expect(
            &mut v1_peer,
            &[
                reset.frame(Format::V1).expect("v1"),
                after[0].frame(Format::V1).expect("v1"),
            ],
        )
        .await;
        expect(&mut legacy_peer, &frames(&after, Format::Legacy)).await;
        let (_, joined) = stream.join(
            Subscription::everything(Format::V1),
            Start::After(before[1].position()),
        );
        assert_eq!(joined, Joined::Reset(ResetReason::OtherEpoch));
    }

    #[test]
    fn the_state_is_reported_and_exported() {
        let root = CancellationToken::new();
        let stream = stream(&root, HistoryLimits::default());
        let state = stream.listener_state();
        assert_eq!(*state.borrow(), ListenerState::Connecting);
        stream.set_listener_state(ListenerState::Listening);
        assert_eq!(*state.borrow(), ListenerState::Listening);
        assert_eq!(stream.metrics.listener_up.get(), 1);
    }
}
