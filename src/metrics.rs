//! Counters and gauges, exported at `/metrics` in the Prometheus text format.
//!
//! Each metric is an atomic: incrementing one on the hot path is one relaxed add, no lock.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::message::ResetReason;

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
            "build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Metrics { registry, ..m }
    }

    /// Counts one reset event of `reason`.
    pub fn count_reset(&self, reason: ResetReason) {
        self.resets
            .get_or_create(&vec![("cause", reason.as_str())])
            .inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
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
    }
}
