//! Table mode's resume: a client that comes back with a position older than the history is
//! served from the table (through an [`Archive`] the source provides), page by page, until the
//! history takes over; then it joins under the stream's lock as any resuming client does, so the
//! hand-over has neither gap nor duplicate.
//!
//! The stream cannot import the source, so the table is reached through the [`Archive`] trait,
//! which the table source implements and `run` wires in.
//!
//! A resume is bounded: at most [`RESUME_MAX_MESSAGES`] messages and the history's byte bound
//! (at least [`RESUME_MIN_BYTES`]) are read for one request; a client further behind gets a reset (`evicted`), as it would
//! from a history that no longer holds its position.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::{Joined, Start, Stream, frames_for};
use crate::fanout::{Registration, Subscription};
use crate::message::{self, ChannelId, Epoch, Outgoing, Position, ResetReason};

/// Rows read from the table per query.
pub const PAGE: usize = 1000;
/// Messages one resume may read from the table.
pub const RESUME_MAX_MESSAGES: usize = 100_000;
/// The least a resume may read from the table, whatever the history's byte bound.
pub const RESUME_MIN_BYTES: usize = 64 << 20;
/// How long a resume waits for the source: to learn the lineage after a start, or to reach a
/// position another replica has already served.
pub const RESUME_WAIT: Duration = Duration::from_secs(5);

/// One stored message: its position's offset and its payload as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedRow {
    pub offset: u64,
    pub payload: String,
}

/// A page of the table after some offset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// In offset order, at most the limit asked for.
    pub rows: Vec<ArchivedRow>,
    /// The oldest offset the table still holds on any channel (`None`: empty table): rows
    /// before it were deleted by retention.
    pub oldest: Option<u64>,
}

/// The table, as the stream reads it for resumes.
pub trait Archive: Send + Sync + 'static {
    /// The messages of `channel` after `offset`, at most `limit`; the error says why the table
    /// could not be read.
    fn after<'a>(
        &'a self,
        channel: &'a str,
        offset: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Page, String>>;
}

/// A resume could not be answered now (the table is unreachable, or its lineage not yet
/// known); the client should retry. Transports answer 503.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the stream's table cannot be read now ({0}); retry")]
pub struct Unavailable(pub String);

/// The durable part of a stream.
pub(super) struct Durable {
    archive: Arc<dyn Archive>,
    /// The table's lineage once the source has read it.
    pub(super) lineage: watch::Sender<Option<Epoch>>,
    /// Woken after every publish, for resumes that wait for the head to reach their position.
    pub(super) published: Notify,
    max_bytes: usize,
}

impl Durable {
    pub(super) fn new(archive: Arc<dyn Archive>, max_bytes: usize) -> Durable {
        Durable {
            archive,
            lineage: watch::Sender::new(None),
            published: Notify::new(),
            // A history of 0 bytes (none kept) must not turn every resume into a reset.
            max_bytes: max_bytes.max(RESUME_MIN_BYTES),
        }
    }
}

/// What a resume read from the table, before the history takes over.
struct Fetched {
    /// The messages for the client.
    messages: Vec<Arc<Outgoing>>,
    /// Rows read, and their size, for the resume's bound.
    rows: usize,
    bytes: usize,
}

impl Stream {
    /// Adds a client that wants `format`, starting as `start` says; in table mode a position
    /// older than the history is served from the table first. Notify mode joins at once, as
    /// [`Stream::join`].
    pub async fn join_resuming(
        &self,
        subscription: Subscription,
        start: Start,
    ) -> Result<(Registration, Joined), Unavailable> {
        let (Some(durable), Start::After(since)) = (&self.durable, start) else {
            return Ok(self.join(subscription, start));
        };
        let epoch = self.lineage(durable).await?;
        if since.epoch != epoch {
            return Ok(self.join(subscription, start));
        }
        let channel = subscription.channel;
        self.wait_for_head(durable, channel, since.offset).await;
        let mut cursor = since;
        let mut fetched = Fetched {
            messages: Vec::new(),
            rows: 0,
            bytes: 0,
        };
        loop {
            {
                let mut guard = self.lock();
                let log = guard.of(channel);
                let head = log.head;
                if head.epoch != epoch {
                    // The lineage changed under us: the client gets that reset.
                    drop(guard);
                    return Ok(self.join(subscription, start));
                }
                if cursor == since && since.offset > head.offset {
                    // Still ahead after the wait: the history's answer (a reset) is the right one.
                    drop(guard);
                    return Ok(self.join(subscription, start));
                }
                let from_history = if cursor.offset >= head.offset {
                    // The table was read up to (or past) what the stream has published: what it
                    // publishes next follows the last message kept.
                    fetched
                        .messages
                        .retain(|m| m.position().offset <= head.offset);
                    Ok(Vec::new())
                } else {
                    log.history.after(Instant::now(), cursor, head)
                };
                match from_history {
                    Ok(missed) => {
                        fetched.messages.extend(missed);
                        let frames = frames_for(&subscription, &fetched.messages);
                        let count = frames.len();
                        self.metrics.resumes_served.inc();
                        let registration = self.hub.register_after(subscription, frames);
                        return Ok((registration, Joined::Resumed(count)));
                    }
                    Err(ResetReason::Evicted) => {}
                    Err(_) => {
                        drop(guard);
                        return Ok(self.join(subscription, Start::After(cursor)));
                    }
                }
            }
            let name = &self.channel_names()[channel.index()];
            let page = durable
                .archive
                .after(name, cursor.offset, super::durable::PAGE)
                .await
                .map_err(Unavailable)?;
            if page.oldest.is_some_and(|oldest| oldest > cursor.offset + 1) {
                // Retention deletes a prefix of the positions: rows after the cursor are gone.
                return Ok(self.reset_join(subscription, ResetReason::Evicted));
            }
            let Some(last) = page.rows.last().map(|row| row.offset) else {
                // Nothing of this channel after the cursor (retention keeps the newest row, so
                // an empty table means nothing was deleted): the stream's next message follows.
                return Ok(self.join_with(subscription, &fetched.messages, epoch));
            };
            for row in page.rows {
                let position = Position {
                    epoch,
                    offset: row.offset,
                };
                fetched.rows += 1;
                if let Ok(fields) = message::check(&row.payload) {
                    let message = Outgoing::accepted(channel, position, &row.payload, fields);
                    // Only what the client's filter wants is kept; every row read counts.
                    fetched.bytes += message.size();
                    if message.is_for(subscription.filter.as_ref()) {
                        fetched.messages.push(Arc::new(message));
                    }
                }
            }
            cursor = Position {
                epoch,
                offset: last,
            };
            if fetched.rows > RESUME_MAX_MESSAGES || fetched.bytes > durable.max_bytes {
                log::info!(
                    "a resume from {since} is more than {RESUME_MAX_MESSAGES} messages or {} \
                     bytes behind: reset",
                    durable.max_bytes
                );
                return Ok(self.reset_join(subscription, ResetReason::Evicted));
            }
        }
    }

    /// Joins after `fetched`: every message of the channel after the client's position that
    /// the table holds. The reader publishes only rows the table showed it, in order, so that
    /// reaches the head; what the stream publishes next follows.
    fn join_with(
        &self,
        subscription: Subscription,
        fetched: &[Arc<Outgoing>],
        epoch: Epoch,
    ) -> (Registration, Joined) {
        let log = self.lock();
        let head = log.at(subscription.channel).head;
        if head.epoch != epoch {
            drop(log);
            return self.reset_join(subscription, ResetReason::OtherEpoch);
        }
        let kept: Vec<Arc<Outgoing>> = fetched
            .iter()
            .filter(|m| m.position().offset <= head.offset)
            .cloned()
            .collect();
        let frames = frames_for(&subscription, &kept);
        let count = frames.len();
        self.metrics.resumes_served.inc();
        let registration = self.hub.register_after(subscription, frames);
        drop(log);
        (registration, Joined::Resumed(count))
    }

    /// Joins with a reset naming the head.
    fn reset_join(
        &self,
        subscription: Subscription,
        reason: ResetReason,
    ) -> (Registration, Joined) {
        let log = self.lock();
        self.metrics.count_reset(reason);
        let reset = Outgoing::reset(
            subscription.channel,
            log.at(subscription.channel).head,
            reason,
        );
        let frames = reset
            .frame(subscription.format)
            .cloned()
            .into_iter()
            .collect();
        let registration = self.hub.register_after(subscription, frames);
        drop(log);
        (registration, Joined::Reset(reason))
    }

    /// The table's lineage, waiting up to [`RESUME_WAIT`] for the source to read it.
    async fn lineage(&self, durable: &Durable) -> Result<Epoch, Unavailable> {
        let mut lineage = durable.lineage.subscribe();
        let known = tokio::time::timeout(RESUME_WAIT, lineage.wait_for(Option::is_some)).await;
        match known {
            Ok(Ok(epoch)) => Ok(epoch.expect("waited for it to be known")),
            _ => Err(Unavailable(
                "the table source has not connected yet".to_owned(),
            )),
        }
    }

    /// Waits, at most [`RESUME_WAIT`], until the stream has published up to `offset`: a client
    /// that comes from a replica a little ahead of this one is then served as it expects,
    /// rather than reset as `ahead`.
    async fn wait_for_head(&self, durable: &Durable, channel: ChannelId, offset: u64) {
        let deadline = Instant::now() + RESUME_WAIT;
        loop {
            let published = durable.published.notified();
            let mut published = std::pin::pin!(published);
            published.as_mut().enable();
            if self.lock().at(channel).head.offset >= offset {
                return;
            }
            if tokio::time::timeout_at(deadline, published).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::Hub;
    use crate::fanout::outbox::test_support::socket_pair;
    use crate::message::Format;
    use crate::metrics::Metrics;
    use crate::stream::HistoryLimits;
    use tokio::io::AsyncReadExt;
    use tokio_util::sync::CancellationToken;

    /// The table as a list: rows after an offset, and the oldest position kept.
    struct FakeTable {
        rows: Vec<(u64, String)>,
        oldest: Option<u64>,
    }

    impl Archive for FakeTable {
        fn after<'a>(
            &'a self,
            _channel: &'a str,
            offset: u64,
            limit: usize,
        ) -> BoxFuture<'a, Result<Page, String>> {
            let rows = self
                .rows
                .iter()
                .filter(|(o, _)| *o > offset)
                .take(limit)
                .map(|(o, p)| ArchivedRow {
                    offset: *o,
                    payload: p.clone(),
                })
                .collect();
            Box::pin(std::future::ready(Ok(Page {
                rows,
                oldest: self.oldest,
            })))
        }
    }

    fn payload(offset: u64) -> String {
        format!(r#"{{"n":{offset}}}"#)
    }

    fn table(offsets: impl IntoIterator<Item = u64>, oldest: Option<u64>) -> Arc<FakeTable> {
        Arc::new(FakeTable {
            rows: offsets.into_iter().map(|o| (o, payload(o))).collect(),
            oldest,
        })
    }

    fn stream(archive: Arc<FakeTable>, history: usize) -> (Stream, CancellationToken) {
        let root = CancellationToken::new();
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(16, root.clone(), metrics.clone()));
        let limits = HistoryLimits {
            max_messages: history,
            ..HistoryLimits::default()
        };
        let channels = vec!["events".to_owned()];
        (
            Stream::new_durable(hub, metrics, limits, channels, archive),
            root,
        )
    }

    /// Publishes the messages at `offsets`, as the table reader would.
    async fn publish(stream: &Stream, epoch: Epoch, offsets: impl IntoIterator<Item = u64>) {
        let mut batch: Vec<_> = offsets
            .into_iter()
            .filter_map(|offset| {
                stream.accept_at("events", &payload(offset), Position { epoch, offset })
            })
            .collect();
        stream.publish(&mut batch).await;
    }

    /// The v1 frames a registration's backlog holds, as `(event or offset)` strings.
    async fn backlog(registration: &Registration, count: usize) -> Vec<String> {
        let (server, mut peer) = socket_pair().await;
        registration.client.out.attach(server);
        assert!(registration.client.out.flush().expect("flush"));
        let mut text = Vec::new();
        let mut got = Vec::new();
        while got.len() < count {
            let mut buf = [0u8; 4096];
            let n = peer.read(&mut buf).await.expect("read");
            text.extend_from_slice(&buf[..n]);
            got = String::from_utf8_lossy(&text)
                .split('{')
                .filter_map(|part| {
                    part.strip_prefix("\"id\":\"")
                        .and_then(|rest| rest.split('"').next())
                        .map(|id| id.rsplit('-').next().unwrap_or_default().to_owned())
                        .or_else(|| part.contains("reset").then(|| "reset".to_owned()))
                })
                .collect();
        }
        got
    }

    #[tokio::test]
    async fn a_resume_older_than_the_history_reads_the_table_then_the_history() {
        let (stream, _root) = stream(table(1..=10, Some(1)), 3);
        let epoch = Epoch::new_after(None);
        stream.continue_at(epoch.start()).await;
        publish(&stream, epoch, 1..=10).await;
        let since = Position { epoch, offset: 2 };
        let (registration, joined) = stream
            .join_resuming(Subscription::everything(Format::V1), Start::After(since))
            .await
            .expect("served");
        assert_eq!(joined, Joined::Resumed(8));
        let offsets: Vec<String> = (3..=10).map(|o: u64| o.to_string()).collect();
        assert_eq!(backlog(&registration, 8).await, offsets);
    }

    #[tokio::test]
    async fn nothing_of_the_channel_after_the_position_joins_without_a_reset() {
        let (stream, _root) = stream(table([5], Some(1)), 3);
        let epoch = Epoch::new_after(None);
        stream.continue_at(epoch.start()).await;
        publish(&stream, epoch, [5]).await;
        // Other channels' rows moved the head on.
        stream.advance_to(50);
        let since = Position { epoch, offset: 5 };
        let (_, joined) = stream
            .join_resuming(Subscription::everything(Format::V1), Start::After(since))
            .await
            .expect("served");
        assert_eq!(joined, Joined::Resumed(0));
        // A restarted replica, whose history is empty, answers the same.
        let (restarted, _root) = self::stream(table([5], Some(1)), 3);
        restarted.continue_at(Position { epoch, offset: 50 }).await;
        let (_, joined) = restarted
            .join_resuming(Subscription::everything(Format::V1), Start::After(since))
            .await
            .expect("served");
        assert_eq!(joined, Joined::Resumed(0));
    }

    #[tokio::test]
    async fn rows_gone_to_retention_reset_as_evicted() {
        let (stream, _root) = stream(table(20..=30, Some(20)), 3);
        let epoch = Epoch::new_after(None);
        stream.continue_at(Position { epoch, offset: 19 }).await;
        publish(&stream, epoch, 20..=30).await;
        let since = Position { epoch, offset: 5 };
        let (registration, joined) = stream
            .join_resuming(Subscription::everything(Format::V1), Start::After(since))
            .await
            .expect("answered");
        assert_eq!(joined, Joined::Reset(ResetReason::Evicted));
        assert_eq!(backlog(&registration, 1).await, ["reset"]);
        let other = Epoch::new_after(Some(epoch)).start();
        let (_, joined) = stream
            .join_resuming(Subscription::everything(Format::V1), Start::After(other))
            .await
            .expect("answered");
        assert_eq!(joined, Joined::Reset(ResetReason::OtherEpoch));
    }

    #[tokio::test(start_paused = true)]
    async fn before_the_lineage_is_known_a_resume_is_unavailable() {
        let (stream, _root) = stream(table([], None), 3);
        let since = Position {
            epoch: Epoch::new_after(None),
            offset: 1,
        };
        let refused = stream
            .join_resuming(Subscription::everything(Format::V1), Start::After(since))
            .await;
        assert!(refused.is_err());
        let (_, joined) = stream
            .join_resuming(Subscription::everything(Format::V1), Start::Live)
            .await
            .expect("live needs nothing");
        assert_eq!(joined, Joined::Live);
    }
}
