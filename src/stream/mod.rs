//! The ordered stream between a source and the fan-out: every payload a source delivers is
//! checked here once, and what passes is published to every client, in the source's order.
//!
//! A source (LISTEN today) only hands payloads over and reports whether it is live; it knows
//! nothing of clients. The fan-out only writes what it is given; it knows nothing of
//! PostgreSQL. Keeping the one check and the publish here gives the stream one place that sees
//! every message in order, which is where positions and history belong.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::fanout::Hub;
use crate::message::{self, Frame};
use crate::metrics::Metrics;

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

/// The stream: the one path from a source to the clients.
pub struct Stream {
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    state: watch::Sender<ListenerState>,
}

impl Stream {
    pub fn new(hub: Arc<Hub>, metrics: Arc<Metrics>) -> Stream {
        Stream {
            hub,
            metrics,
            state: watch::Sender::new(ListenerState::Connecting),
        }
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

    /// Checks one payload from `channel`; invalid ones are counted and logged, never forwarded.
    pub fn accept(&self, channel: &str, payload: &str) -> Option<Frame> {
        self.metrics.notifications_received.inc();
        match message::frame_from_payload(payload) {
            Ok(frame) => {
                log::debug!("notification: {}", message::preview(payload));
                Some(frame)
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

    /// Publishes accepted frames, in order, to every client, and empties `batch`. Waits only
    /// while the fan-out is a full read-ahead behind; cancelling the wait publishes nothing.
    pub async fn publish(&self, batch: &mut Vec<Frame>) {
        if batch.is_empty() {
            return;
        }
        self.hub.publish_batch(batch).await;
        self.metrics
            .notifications_forwarded
            .inc_by(batch.len() as u64);
        log::debug!(
            "{} notification(s) forwarded to {} clients",
            batch.len(),
            self.hub.client_count()
        );
        batch.clear();
    }

    /// Sends the `{"action":"ping"}` heartbeat every `interval` until `shutdown`.
    pub async fn run_heartbeat(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let start = tokio::time::Instant::now() + interval;
        let mut ticker = tokio::time::interval_at(start, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ping = Frame::ping();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {
                    self.hub.publish(&ping).await;
                    log::debug!("ping sent to {} clients", self.hub.client_count());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::outbox::test_support::socket_pair;
    use tokio::io::AsyncReadExt;

    fn stream(shutdown: &CancellationToken) -> (Arc<Hub>, Arc<Stream>) {
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(4, shutdown.clone(), metrics.clone()));
        (hub.clone(), Arc::new(Stream::new(hub, metrics)))
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_goes_out_each_interval() {
        let root = CancellationToken::new();
        let (hub, stream) = stream(&root);
        let reg = hub.register();
        let (server, mut peer) = socket_pair().await;
        reg.client.out.attach(server);
        let heartbeat = tokio::spawn(stream.run_heartbeat(Duration::from_secs(5), root.clone()));
        let ping = Frame::ping();
        for _ in 0..2 {
            let mut got = vec![0; ping.wire().len()];
            peer.read_exact(&mut got).await.expect("ping");
            assert_eq!(&got[..], &ping.wire()[..]);
        }
        root.cancel();
        heartbeat.await.expect("the heartbeat stops on shutdown");
    }

    #[tokio::test]
    async fn only_valid_payloads_are_published_and_counted() {
        let root = CancellationToken::new();
        let (hub, stream) = stream(&root);
        let reg = hub.register();
        let (server, mut peer) = socket_pair().await;
        reg.client.out.attach(server);
        let mut batch: Vec<Frame> = [r#"{"n":1}"#, "not json", r#"{"n":2}"#]
            .into_iter()
            .filter_map(|p| stream.accept("events", p))
            .collect();
        assert_eq!(batch.len(), 2);
        let expected: Vec<u8> = batch.iter().flat_map(|f| f.wire().to_vec()).collect();
        stream.publish(&mut batch).await;
        assert!(batch.is_empty());
        let mut got = vec![0; expected.len()];
        peer.read_exact(&mut got).await.expect("frames");
        assert_eq!(got, expected);
        assert_eq!(stream.metrics.notifications_received.get(), 3);
        assert_eq!(stream.metrics.notifications_invalid.get(), 1);
        assert_eq!(stream.metrics.notifications_forwarded.get(), 2);
    }

    #[test]
    fn the_state_is_reported_and_exported() {
        let root = CancellationToken::new();
        let (_, stream) = stream(&root);
        let state = stream.listener_state();
        assert_eq!(*state.borrow(), ListenerState::Connecting);
        stream.set_listener_state(ListenerState::Listening);
        assert_eq!(*state.borrow(), ListenerState::Listening);
        assert_eq!(stream.metrics.listener_up.get(), 1);
    }
}
