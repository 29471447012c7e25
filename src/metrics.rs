//! Counters and gauges, exported at `/metrics` in the Prometheus text format.
//!
//! Each metric is an atomic: incrementing one on the hot path is one relaxed add, no lock.
//! The metrics by channel and transport are looked up once, when the channels are known, and
//! kept in a table indexed by channel and format, so the fan-out never hashes a label set.
//! Their cardinality is bounded by the configuration: channels × 3 transports, no label per
//! client or per value.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::message::{ChannelId, Format, ResetReason};

/// The labels of a metric by channel and transport.
type ChannelLabels = Vec<(&'static str, String)>;

/// One channel's metrics for clients of one transport (format).
#[derive(Debug, Clone, Default)]
pub struct ChannelMetrics {
    /// Clients of this channel and transport connected now.
    pub clients: Gauge,
    /// Frames the fan-out handed to them.
    pub frames_sent: Counter,
}

/// Every metric the service keeps, plus the registry that exports them.
pub struct Metrics {
    pub notifications_received: Counter,
    pub notifications_forwarded: Counter,
    pub notifications_invalid: Counter,
    pub frames_sent: Counter,
    pub clients_connected: Gauge,
    pub clients_disconnected_slow: Counter,
    pub clients_disconnected_unresponsive: Counter,
    pub clients_rejected: Counter,
    pub listener_up: Gauge,
    pub listener_reconnects: Counter,
    pub accept_pauses: Counter,
    pub resumes_served: Counter,
    /// Table mode: 1 on the replica that gives positions (holds the sequencer lock).
    pub sequencer_active: Gauge,
    /// Table mode: rows deleted by retention on this replica.
    pub rows_expired: Counter,
    /// Resets by cause: one per LISTEN gap (sent to every opted-in client), one per client
    /// whose `since` could not be served.
    resets: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// Seconds from a message's acceptance by the stream to the end of a fan-out thread's
    /// writes for its channel in the pass that carried it: one observation per message and
    /// fan-out thread with clients on that channel.
    pub fanout_delay: Histogram,
    channel_clients: Family<ChannelLabels, Gauge>,
    channel_frames: Family<ChannelLabels, Counter>,
    /// By [`ChannelId`], then [`Format::index`]: set once the channels are known.
    by_channel: OnceLock<Vec<[ChannelMetrics; 3]>>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("vulcan_stream");
        let m = Metrics {
            notifications_received: Counter::default(),
            notifications_forwarded: Counter::default(),
            notifications_invalid: Counter::default(),
            frames_sent: Counter::default(),
            clients_connected: Gauge::default(),
            clients_disconnected_slow: Counter::default(),
            clients_disconnected_unresponsive: Counter::default(),
            clients_rejected: Counter::default(),
            listener_up: Gauge::default(),
            listener_reconnects: Counter::default(),
            accept_pauses: Counter::default(),
            resumes_served: Counter::default(),
            sequencer_active: Gauge::default(),
            rows_expired: Counter::default(),
            resets: Family::default(),
            // 50 µs to about 1.6 s: a pass takes microseconds per client written.
            fanout_delay: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            channel_clients: Family::default(),
            channel_frames: Family::default(),
            by_channel: OnceLock::new(),
            registry: Registry::default(),
        };
        registry.register(
            "notifications_received",
            "NOTIFY payloads received on the channel",
            m.notifications_received.clone(),
        );
        registry.register(
            "notifications_forwarded",
            "Payloads broadcast to clients",
            m.notifications_forwarded.clone(),
        );
        registry.register(
            "notifications_invalid",
            "Payloads dropped because agents could not decode them",
            m.notifications_invalid.clone(),
        );
        registry.register(
            "frames_sent",
            "Text frames written to clients, pings included",
            m.frames_sent.clone(),
        );
        registry.register(
            "clients_connected",
            "Clients connected now, websocket and event stream",
            m.clients_connected.clone(),
        );
        registry.register(
            "clients_disconnected_slow",
            "Clients closed because their queue overflowed",
            m.clients_disconnected_slow.clone(),
        );
        registry.register(
            "clients_disconnected_unresponsive",
            "Clients dropped as unresponsive: no answer to pings, or an event stream left unacknowledged",
            m.clients_disconnected_unresponsive.clone(),
        );
        registry.register(
            "clients_rejected",
            "Stream requests refused, websocket and event stream",
            m.clients_rejected.clone(),
        );
        registry.register(
            "listener_up",
            "1 while the LISTEN connection is active",
            m.listener_up.clone(),
        );
        registry.register(
            "listener_reconnects",
            "LISTEN connections re-established after a loss",
            m.listener_reconnects.clone(),
        );
        registry.register(
            "accept_pauses",
            "Pauses of the accept loop for want of file descriptors",
            m.accept_pauses.clone(),
        );
        registry.register(
            "resumes_served",
            "Clients that resumed from a position with every missed message from the history",
            m.resumes_served.clone(),
        );
        registry.register(
            "sequencer_active",
            "Table mode: 1 while this replica gives positions to new rows",
            m.sequencer_active.clone(),
        );
        registry.register(
            "rows_expired",
            "Table mode: rows deleted by retention on this replica",
            m.rows_expired.clone(),
        );
        registry.register(
            "resets",
            "Reset events by cause: listen-gap (one per lost LISTEN connection), evicted, \
             other-epoch, ahead (one per client whose position could not be served)",
            m.resets.clone(),
        );
        registry.register(
            "fanout_delay_seconds",
            "Seconds from a message's acceptance to the end of a fan-out thread's writes for its \
             channel in the pass that carried it (written to the socket, or queued in the \
             outbox of a client whose socket was full), one per message and fan-out thread \
             with clients on the channel",
            m.fanout_delay.clone(),
        );
        registry.register(
            "channel_clients",
            "Clients connected now, by channel and transport (legacy, v1, sse)",
            m.channel_clients.clone(),
        );
        registry.register(
            "channel_frames_sent",
            "Frames handed to clients by the fan-out, pings included, by channel and transport",
            m.channel_frames.clone(),
        );
        registry.register(
            "build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        // Every cause is exported from the start, at zero: a dashboard's query finds the
        // series before the first reset.
        for reason in ResetReason::ALL {
            m.count_reset_by(reason, 0);
        }
        Metrics { registry, ..m }
    }

    /// Counts one reset event of `reason`.
    pub fn count_reset(&self, reason: ResetReason) {
        self.count_reset_by(reason, 1);
    }

    fn count_reset_by(&self, reason: ResetReason, count: u64) {
        self.resets
            .get_or_create(&vec![("cause", reason.as_str())])
            .inc_by(count);
    }

    /// Creates the metrics of each channel (by name, the default first) and transport, so
    /// that all are exported, at zero until used. Only the first call counts: the channels
    /// are fixed at start.
    pub fn set_channels(&self, names: &[String]) {
        self.by_channel.get_or_init(|| {
            names
                .iter()
                .map(|name| {
                    Format::ALL.map(|format| {
                        let labels = vec![
                            ("channel", name.clone()),
                            ("transport", format.as_str().to_owned()),
                        ];
                        ChannelMetrics {
                            clients: self.channel_clients.get_or_create(&labels).clone(),
                            frames_sent: self.channel_frames.get_or_create(&labels).clone(),
                        }
                    })
                })
                .collect()
        });
    }

    /// The metrics of clients of `format` on `channel`; `None` before [`Metrics::set_channels`]
    /// or for a channel it did not name.
    pub fn channel(&self, channel: ChannelId, format: Format) -> Option<&ChannelMetrics> {
        self.by_channel
            .get()?
            .get(channel.index())
            .map(|formats| &formats[format.index()])
    }

    /// Records one message's fan-out delay.
    pub fn observe_fanout_delay(&self, delay: Duration) {
        self.fanout_delay.observe(delay.as_secs_f64());
    }

    /// Fan-out delays observed so far.
    #[cfg(test)]
    pub fn fanout_delay_count(&self) -> u64 {
        metric_value(&self.render(), "vulcan_stream_fanout_delay_seconds_count")
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The value of an unlabelled sample in `text`, for tests.
#[cfg(test)]
fn metric_value(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_conventional_names() {
        let m = Metrics::new();
        m.notifications_received.inc();
        m.clients_connected.set(3);
        let text = m.render();
        assert!(
            text.contains("vulcan_stream_notifications_received_total 1"),
            "{text}"
        );
        assert!(text.contains("vulcan_stream_clients_connected 3"), "{text}");
        assert!(text.contains("vulcan_stream_build_info{version="), "{text}");
        assert!(
            text.contains("vulcan_stream_fanout_delay_seconds_count 0"),
            "{text}"
        );
    }

    #[test]
    fn channel_metrics_are_exported_for_every_channel_and_transport() {
        let m = Metrics::new();
        assert!(m.channel(ChannelId::DEFAULT, Format::Sse).is_none());
        m.set_channels(&["events".to_owned(), "jobs".to_owned()]);
        let jobs_v1 = m.channel(ChannelId(1), Format::V1).expect("configured");
        jobs_v1.clients.inc();
        jobs_v1.frames_sent.inc_by(3);
        assert!(m.channel(ChannelId(2), Format::V1).is_none());
        let text = m.render();
        assert!(
            text.contains(r#"vulcan_stream_channel_clients{channel="jobs",transport="v1"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"vulcan_stream_channel_frames_sent_total{channel="jobs",transport="v1"} 3"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"vulcan_stream_channel_clients{channel="events",transport="legacy"} 0"#
            ),
            "{text}"
        );
    }
}
