//! What a run measured, as JSON (`--json`) or as a human-readable table.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::abuse::Abuse;
use crate::broadcast::Broadcast;
use crate::chaos::Chaos;
use crate::clients::{ConnectStats, Format, Positions};
use crate::db::Source;
use crate::options::ClientArgs;
use crate::procstat::ProcSample;
use crate::publisher::Published;
use crate::stats::{Counts, Percentiles};
use crate::storm::{AcceptStorm, ReconnectStorm};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub mode: String,
    /// The run id stamped into every payload.
    pub run: u32,
    pub settings: Settings,
    pub connect: Option<ConnectStats>,
    pub published: Option<Published>,
    pub delivery: Option<Delivery>,
    /// NOTIFY sent → frame read by a client.
    pub latency: Option<Percentiles>,
    pub raw_listen: Option<RawListen>,
    pub receiver: Option<KeepUp>,
    pub stuck: Option<Stuck>,
    pub idle: Option<Idle>,
    pub soak: Option<Soak>,
    pub server: Option<ServerUse>,
    /// `send-floor` only; absent from reports written before the mode existed.
    #[serde(default)]
    pub floor: Option<Floor>,
    #[serde(default)]
    pub reconnect_storm: Option<ReconnectStorm>,
    #[serde(default)]
    pub accept_storm: Option<AcceptStorm>,
    #[serde(default)]
    pub broadcast: Option<Broadcast>,
    #[serde(default)]
    pub abuse: Option<Abuse>,
    /// The server's LISTEN connection across the run, when its `/status` tells.
    #[serde(default)]
    pub listener: Option<ListenerCheck>,
    #[serde(default)]
    pub resume: Option<Resume>,
    #[serde(default)]
    pub history: Option<HistoryFill>,
    #[serde(default)]
    pub isolation: Option<crate::filtered::Isolation>,
    #[serde(default)]
    pub targeted: Option<crate::filtered::Targeted>,
    #[serde(default)]
    pub chaos: Option<Chaos>,
    pub generator: GeneratorUse,
    /// Share of all CPUs busy during the measured window (server, generator, PostgreSQL and
    /// anything else).
    pub machine_busy_pct: f64,
    /// Interrupt and softirq time during the window (where the kernel processes loopback
    /// TCP; charged to no process), in percent of one core.
    pub irq_pct_of_core: f64,
    /// CPU time of every process but the server and the generator during the window
    /// (PostgreSQL, and whatever else runs on the machine), in percent of one core.
    pub others_pct_of_core: f64,
    pub cpus: usize,
    pub clients: Vec<ClientRow>,
    pub notes: Vec<String>,
    /// What `--strict` fails on.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Settings {
    pub url: Option<String>,
    pub channel: Option<String>,
    pub clients: usize,
    pub stuck: usize,
    pub publishers: usize,
    pub batch: usize,
    pub payload_size: usize,
    pub messages: Option<u64>,
    pub duration_s: Option<f64>,
    pub rate: Option<f64>,
    /// Flow-control window (messages); `None`: open loop.
    pub window: Option<u64>,
    pub threads: usize,
    pub read_buffer: usize,
    pub connect_concurrency: usize,
    /// What the reading clients asked for (legacy websocket frames when absent).
    #[serde(default)]
    pub format: Format,
    /// The reading clients' kernel receive buffer, when set.
    #[serde(default)]
    pub recv_buffer: Option<u32>,
    /// How the publishers published (notify when absent: reports from before table mode).
    #[serde(default)]
    pub source: Source,
}

impl Settings {
    /// The settings of `clients` websocket clients of `url` (the rest default).
    pub fn of_clients(url: &str, clients: &ClientArgs, threads: usize) -> Settings {
        Settings {
            url: Some(url.to_owned()),
            clients: clients.clients,
            threads,
            read_buffer: clients.read_buffer,
            connect_concurrency: clients.connect_concurrency,
            format: clients.format,
            recv_buffer: clients.recv_buffer,
            ..Settings::default()
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Delivery {
    /// Messages committed by the publishers.
    pub published: u64,
    /// Frames every reading client should have had: published × clients.
    pub expected: u64,
    #[serde(flatten)]
    pub counts: Counts,
    pub pings: u64,
    /// Frames that were neither this run's payloads nor pings.
    pub other: u64,
    pub clients_complete: usize,
    pub clients_with_loss: usize,
    /// Reading clients whose connection ended during the run, and how.
    pub clients_closed: usize,
    pub closes: Vec<String>,
    pub min_client_delivered: u64,
    pub max_client_delivered: u64,
    /// First send to last new frame.
    pub elapsed_s: f64,
    pub frames_per_s: f64,
    /// The drain gave up before everything arrived.
    pub drain_timed_out: bool,
    /// v1 and SSE clients: what their positions showed, summed over the clients.
    #[serde(default)]
    pub positions: Option<Positions>,
}

/// The server's LISTEN connection before and after a run, from `/status` and `/metrics`: a
/// new epoch or a reconnect means the server lost (or thought it lost) its connection, and
/// with it whatever was committed in the gap.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ListenerCheck {
    pub epoch_before: String,
    pub epoch_after: String,
    /// `vulcan_stream_listener_reconnects_total` after, less before.
    pub reconnects: Option<f64>,
}

impl ListenerCheck {
    /// The same epoch, and no reconnect counted.
    pub fn held(&self) -> bool {
        self.epoch_before == self.epoch_after && self.reconnects.is_none_or(|n| n == 0.0)
    }

    pub fn text(&self) -> String {
        format!(
            "epoch {} → {}{}, reconnects {}",
            self.epoch_before,
            self.epoch_after,
            if self.epoch_before == self.epoch_after {
                " (unchanged)"
            } else {
                " (CHANGED)"
            },
            self.reconnects
                .map_or("n/a".to_owned(), |n| format!("{n:.0}"))
        )
    }
}

/// What `resume` measured: every client away while messages were published, then back with
/// the position it last saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Resume {
    pub clients: usize,
    /// Messages each client had before it disconnected.
    pub before: u64,
    /// Messages published while every client was away.
    pub missed: u64,
    /// Messages published live while the clients came back.
    pub live: u64,
    pub reconnect: ConnectStats,
    /// Clients that had every missed message.
    pub caught_up: usize,
    /// From the reconnect until the last client had every missed message; `None` when some
    /// never did.
    pub caught_up_all_ms: Option<f64>,
    /// Per client, reconnect → last missed message (microseconds).
    pub caught_up_after: Percentiles,
    /// Over every client and both sessions.
    pub counts: Counts,
    pub positions: Positions,
    /// Clients whose first frame after the reconnect was not the message after its `since`.
    pub bad_handovers: usize,
    pub closes: Vec<String>,
    /// The server's `resumes_served` and resets (every cause) during the reconnect.
    pub resumes_served: Option<f64>,
    pub resets: Option<f64>,
}

impl Resume {
    pub fn rows(&self, rows: &mut Vec<(&'static str, String)>) {
        rows.push((
            "resume",
            format!(
                "{} clients, {} messages each before, {} while away, {} live after; reconnected {} \
                 in {:.2} s ({} failed); {} of {} caught up, the last after {}",
                fmt_int(self.clients as u64),
                fmt_int(self.before),
                fmt_int(self.missed),
                fmt_int(self.live),
                fmt_int(self.reconnect.connected as u64),
                self.reconnect.total_s,
                self.reconnect.failed,
                fmt_int(self.caught_up as u64),
                fmt_int(self.clients as u64),
                self.caught_up_all_ms
                    .map_or("never".to_owned(), |ms| fmt_us(ms * 1e3)),
            ),
        ));
        let p = &self.caught_up_after;
        rows.push((
            "caught up",
            format!(
                "reconnect → last missed message: p50 {}  p99 {}  max {}",
                fmt_us(p.p50_us),
                fmt_us(p.p99_us),
                fmt_us(p.max_us)
            ),
        ));
        rows.push((
            "checked",
            format!(
                "{}; positions: {} gaps, {} repeats, {} resets, {} epoch changes; {} bad \
                 hand-overs; closed: {}",
                fmt_counts(&self.counts),
                self.positions.gaps,
                self.positions.repeats,
                self.positions.resets,
                self.positions.epoch_changes,
                self.bad_handovers,
                if self.closes.is_empty() {
                    "none".to_owned()
                } else {
                    self.closes.join(", ")
                }
            ),
        ));
        rows.push((
            "server",
            format!(
                "resumes served {}, resets {}",
                self.resumes_served
                    .map_or("n/a".to_owned(), |n| format!("{n:.0}")),
                self.resets.map_or("n/a".to_owned(), |n| format!("{n:.0}"))
            ),
        ));
    }
}

/// What `history` measured: the server's RSS once its history is full to the byte bound and
/// evicting, against the bound.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HistoryFill {
    /// The server's `HISTORY_BYTES`.
    pub bound_bytes: u64,
    /// Messages published: enough to fill the bound more than once.
    pub published: u64,
    /// What `/status` says the history holds, before and after.
    pub history_bytes_before: Option<u64>,
    pub history_bytes_after: Option<u64>,
    pub history_messages_after: Option<u64>,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    /// (RSS after − RSS before) / bound.
    pub rss_growth_per_bound: Option<f64>,
}

impl HistoryFill {
    /// An upper bound on what one message of `payload_size` bytes counts against the history's
    /// bound: its three encodings, each a little longer than the payload, and a fixed part.
    pub fn largest_message(payload_size: usize) -> u64 {
        4 * payload_size as u64 + 512
    }

    /// The history is at its bound: fuller than the bound less the largest message (a message
    /// evicts only as much as it needs).
    pub fn at_bound(&self, largest_message: u64) -> bool {
        self.history_bytes_after
            .is_some_and(|b| b <= self.bound_bytes && b + largest_message > self.bound_bytes)
    }

    pub fn text(&self) -> String {
        let kib = |v: Option<u64>| v.map_or("n/a".to_owned(), fmt_int);
        format!(
            "bound {} bytes; {} published; history {} → {} bytes ({} messages); RSS {} → {} KiB: \
             growth {} of the bound",
            fmt_int(self.bound_bytes),
            fmt_int(self.published),
            kib(self.history_bytes_before),
            kib(self.history_bytes_after),
            kib(self.history_messages_after),
            kib(self.rss_before_kib),
            kib(self.rss_after_kib),
            self.rss_growth_per_bound
                .map_or("n/a".to_owned(), |r| format!("{r:.2}×"))
        )
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RawListen {
    #[serde(flatten)]
    pub counts: Counts,
    /// First send to last notification.
    pub elapsed_s: f64,
    pub msgs_per_s: f64,
    pub latency: Percentiles,
    pub error: Option<String>,
    /// The listener thread's CPU time over the run, in seconds.
    #[serde(default)]
    pub cpu_s: Option<f64>,
}

/// The server's receiver against the bare listener on the same publishers. When the server's
/// `/status` reports its forwarded count, the receiver is timed by it; otherwise by the first
/// client to complete, a bound (a server cannot hand message M to any client before its
/// receiver has it) that also includes the fan-out.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KeepUp {
    pub messages: u64,
    pub raw_done_ms: f64,
    /// When the server's receiver had forwarded every message to its fan-out.
    #[serde(default)]
    pub receiver_done_ms: Option<f64>,
    pub first_client_done_ms: f64,
    pub last_client_done_ms: f64,
    pub raw_msgs_per_s: f64,
    /// The server receiver's rate: from `receiver_done_ms` when known, else the rate reaching
    /// the first complete client (a lower bound).
    pub server_msgs_per_s: f64,
    /// server_msgs_per_s / raw_msgs_per_s.
    pub ratio: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stuck {
    pub count: usize,
    pub closed: usize,
    pub ends: Vec<String>,
    /// The server's client count after the run (should be the readers only).
    pub server_clients_after: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Idle {
    pub clients: usize,
    pub registered: Option<u64>,
    pub settle_s: f64,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    pub rss_per_client_kib: Option<f64>,
    pub generator_rss_per_client_kib: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Soak {
    pub warmup_s: f64,
    pub interval_s: f64,
    /// (seconds since publishing started, RSS KiB).
    pub samples: Vec<(f64, u64)>,
    pub first_kib: u64,
    pub last_kib: u64,
    pub max_kib: u64,
    pub growth_kib: i64,
    pub growth_pct: f64,
    /// Means of the first and the last third of the samples after warm-up.
    #[serde(default)]
    pub first_third_mean_kib: f64,
    #[serde(default)]
    pub last_third_mean_kib: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerUse {
    pub pid: u32,
    pub before: ProcSample,
    pub after: ProcSample,
    pub cpu_s: f64,
    /// Server CPU time per delivered frame, in microseconds.
    pub cpu_us_per_frame: Option<f64>,
}

impl ServerUse {
    /// The server's use between two readings of process `pid`, and its CPU per frame when
    /// `frames` were delivered; `None` without both readings.
    pub fn between(
        pid: Option<u32>,
        before: Option<ProcSample>,
        after: Option<ProcSample>,
        frames: Option<u64>,
    ) -> Option<ServerUse> {
        let (pid, before, after) = (pid?, before?, after?);
        let cpu_s = after.cpu_s - before.cpu_s;
        Some(ServerUse {
            pid,
            before,
            after,
            cpu_s,
            cpu_us_per_frame: frames.filter(|&n| n > 0).map(|n| cpu_s * 1e6 / n as f64),
        })
    }
}

/// The bare-send floor (`send-floor`): what the kernel alone charges a thread that writes one
/// small frame to each of many loopback sockets per tick. On loopback the receiving side's TCP
/// processing runs in the sender's system call, so this is the part of the server's CPU per
/// frame at low rates that no change to the server can remove.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Floor {
    pub sockets: usize,
    /// Ticks per second, each one frame to every socket.
    pub rate: f64,
    /// Bytes per send: the websocket text frame of a `--payload-size` payload.
    pub frame_bytes: usize,
    pub reader_threads: usize,
    pub ticks: u64,
    /// Sends that took the whole frame.
    pub sends: u64,
    /// Sends refused because the socket buffer was full; none are expected at these rates.
    pub would_block: u64,
    /// Sends that took part of the frame or failed.
    pub send_errors: u64,
    /// Ticks that began after the next one was due: the writer could not keep the rate.
    pub late_ticks: u64,
    /// The writer thread's own CPU time (`CLOCK_THREAD_CPUTIME_ID`), first tick to last send.
    pub writer_cpu_s: f64,
    /// First tick to last send.
    pub wall_s: f64,
    /// writer_cpu_s per send, in microseconds.
    pub us_per_send: Option<f64>,
    /// What the sends accepted, and what the readers read of it.
    pub bytes_expected: u64,
    pub bytes_received: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GeneratorUse {
    pub threads: usize,
    pub cpu_s: f64,
    pub wall_s: f64,
    /// cpu_s / wall_s, in percent of one core.
    pub cpu_pct_of_core: f64,
    pub rss_kib: u64,
    pub cpu_us_per_frame: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientRow {
    pub id: usize,
    #[serde(flatten)]
    pub counts: Counts,
    pub pings: u64,
    pub other: u64,
    pub end: String,
}

/// Microseconds as a short human duration.
pub fn fmt_us(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

/// An integer with thousands separators.
pub fn fmt_int(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn fmt_latency(p: &Percentiles) -> String {
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  ({} samples)",
        fmt_us(p.p50_us),
        fmt_us(p.p90_us),
        fmt_us(p.p99_us),
        fmt_us(p.p999_us),
        fmt_us(p.max_us),
        fmt_int(p.count)
    )
}

/// The `floor` row: sockets, rate, sends, the writer's CPU and whether every byte arrived.
pub fn fmt_floor(f: &Floor) -> String {
    let mut out = format!(
        "{} sockets at {}/s: {} sends, writer CPU {:.2} s{}",
        fmt_int(f.sockets as u64),
        f.rate,
        fmt_int(f.sends),
        f.writer_cpu_s,
        f.us_per_send
            .map(|us| format!(" ({us:.2} µs per send)"))
            .unwrap_or_default()
    );
    if f.would_block > 0 {
        let _ = write!(out, ", {} would have blocked", fmt_int(f.would_block));
    }
    if f.send_errors > 0 {
        let _ = write!(out, ", {} failed", fmt_int(f.send_errors));
    }
    if f.bytes_received == f.bytes_expected {
        out.push_str(", every byte read");
    } else {
        let _ = write!(
            out,
            ", {} of {} bytes read",
            fmt_int(f.bytes_received),
            fmt_int(f.bytes_expected)
        );
    }
    out
}

fn fmt_counts(c: &Counts) -> String {
    format!(
        "lost {}  duplicated {}  out-of-order {}",
        fmt_int(c.lost),
        fmt_int(c.duplicated),
        fmt_int(c.out_of_order)
    )
}

impl Report {
    /// The human-readable table.
    pub fn table(&self) -> String {
        let s = &self.settings;
        let mut rows: Vec<(&str, String)> = Vec::new();
        let mut head = format!("vulcan-stream-bench {}", self.mode);
        if s.clients > 0 {
            let _ = write!(head, ": {} clients", fmt_int(s.clients as u64));
            if s.format != Format::Legacy {
                let _ = write!(head, " ({})", s.format.as_str());
            }
        }
        if s.stuck > 0 {
            let _ = write!(head, " + {} stuck", s.stuck);
        }
        if s.source != Source::Notify {
            let _ = write!(head, ", publishing to the {} source", s.source.as_str());
        }
        if let Some(p) = &self.published {
            let _ = write!(
                head,
                ", {} publisher(s), batch {}, {}-byte payloads, {}",
                p.per_publisher.len(),
                s.batch,
                s.payload_size,
                match (s.rate, s.window) {
                    (Some(rate), _) => format!("{rate} msg/s"),
                    (None, Some(w)) => format!("max rate, window {w}"),
                    (None, None) => "max rate, open loop".to_owned(),
                }
            );
        }
        if let Some(c) = &self.connect {
            rows.push((
                "connect",
                format!(
                    "{} of {} in {:.2} s (each p50 {}, p99 {}, max {}; {} at a time), {} failed{}",
                    fmt_int(c.connected as u64),
                    fmt_int(c.attempted as u64),
                    c.total_s,
                    fmt_us(c.each.p50_us),
                    fmt_us(c.each.p99_us),
                    fmt_us(c.each.max_us),
                    c.concurrency,
                    c.failed,
                    c.first_error
                        .as_ref()
                        .map(|e| format!(" (first: {e})"))
                        .unwrap_or_default()
                ),
            ));
        }
        if let Some(p) = &self.published {
            rows.push((
                "published",
                format!(
                    "{} messages in {} statements at {:.0} msg/s (flow-control wait {:.2} s)",
                    fmt_int(p.total),
                    fmt_int(p.statements),
                    p.rate,
                    p.flow_wait_s
                ),
            ));
        }
        if let Some(d) = &self.delivery {
            rows.push((
                "delivered",
                format!(
                    "{} of {} frames  {}",
                    fmt_int(d.counts.delivered),
                    fmt_int(d.expected),
                    fmt_counts(&d.counts)
                ),
            ));
            rows.push((
                "clients",
                format!(
                    "{} complete, {} with loss, {} closed during the run{}; per client {}..{} frames; {} pings, {} other frames",
                    d.clients_complete,
                    d.clients_with_loss,
                    d.clients_closed,
                    if d.closes.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", d.closes.join(", "))
                    },
                    fmt_int(d.min_client_delivered),
                    fmt_int(d.max_client_delivered),
                    fmt_int(d.pings),
                    fmt_int(d.other)
                ),
            ));
            rows.push((
                "throughput",
                format!(
                    "{} frames/s over {:.2} s{}",
                    fmt_int(d.frames_per_s.round() as u64),
                    d.elapsed_s,
                    if d.drain_timed_out {
                        " (drain timed out)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        if let Some(p) = self.delivery.as_ref().and_then(|d| d.positions.as_ref()) {
            rows.push((
                "positions",
                format!(
                    "{} read: {} gaps, {} repeats, {} resets, {} epoch changes",
                    fmt_int(p.seen),
                    p.gaps,
                    p.repeats,
                    p.resets,
                    p.epoch_changes
                ),
            ));
        }
        if let Some(l) = &self.latency {
            rows.push(("latency", fmt_latency(l)));
        }
        if let Some(l) = &self.listener {
            rows.push(("LISTEN", l.text()));
        }
        if let Some(r) = &self.resume {
            r.rows(&mut rows);
        }
        if let Some(c) = &self.chaos {
            c.rows(&mut rows);
        }
        if let Some(h) = &self.history {
            rows.push(("history", h.text()));
        }
        if let Some(r) = &self.raw_listen {
            rows.push((
                "raw LISTEN",
                format!(
                    "{} notifications at {} msg/s over {:.3} s  {}{}",
                    fmt_int(r.counts.delivered),
                    fmt_int(r.msgs_per_s.round() as u64),
                    r.elapsed_s,
                    fmt_counts(&r.counts),
                    r.error
                        .as_ref()
                        .map(|e| format!(" (error: {e})"))
                        .unwrap_or_default()
                ),
            ));
            rows.push(("raw latency", fmt_latency(&r.latency)));
            if let Some(cpu) = r.cpu_s {
                let per = cpu * 1e6 / r.counts.delivered.max(1) as f64;
                rows.push((
                    "raw CPU",
                    format!("the listener thread {cpu:.2} s ({per:.2} µs per notification)"),
                ));
            }
        }
        if let Some(k) = &self.receiver {
            rows.push((
                "receiver",
                format!(
                    "{} messages: raw LISTEN done at {:.1} ms, server receiver {}, first client at {:.1} ms, last at {:.1} ms; {} vs {} msg/s (ratio {:.2})",
                    fmt_int(k.messages),
                    k.raw_done_ms,
                    k.receiver_done_ms
                        .map_or("not timed".to_owned(), |ms| format!("at {ms:.1} ms")),
                    k.first_client_done_ms,
                    k.last_client_done_ms,
                    fmt_int(k.server_msgs_per_s.round() as u64),
                    fmt_int(k.raw_msgs_per_s.round() as u64),
                    k.ratio
                ),
            ));
        }
        if let Some(st) = &self.stuck {
            rows.push((
                "stuck",
                format!(
                    "{} of {} closed by the server ({}); server clients after: {}",
                    st.closed,
                    st.count,
                    st.ends.join(", "),
                    st.server_clients_after
                        .map_or("n/a".to_owned(), |c| c.to_string())
                ),
            ));
        }
        if let Some(i) = &self.idle {
            rows.push((
                "idle",
                format!(
                    "{} clients ({} registered), RSS {} → {} KiB after {:.0} s: {} KiB per connection; generator {:.1} KiB per connection",
                    fmt_int(i.clients as u64),
                    i.registered.map_or("?".to_owned(), fmt_int),
                    i.rss_before_kib.map_or("n/a".to_owned(), fmt_int),
                    i.rss_after_kib.map_or("n/a".to_owned(), fmt_int),
                    i.settle_s,
                    i.rss_per_client_kib
                        .map_or("n/a".to_owned(), |v| format!("{v:.1}")),
                    i.generator_rss_per_client_kib
                ),
            ));
        }
        if let Some(so) = &self.soak {
            rows.push((
                "soak RSS",
                format!(
                    "after {:.0} s warm-up: first {} KiB, last {} KiB, max {} KiB, growth {} KiB ({:+.1} %); mean of the first third {} KiB, of the last {} KiB; {} samples every {:.0} s",
                    so.warmup_s,
                    fmt_int(so.first_kib),
                    fmt_int(so.last_kib),
                    fmt_int(so.max_kib),
                    so.growth_kib,
                    so.growth_pct,
                    fmt_int(so.first_third_mean_kib.round() as u64),
                    fmt_int(so.last_third_mean_kib.round() as u64),
                    so.samples.len(),
                    so.interval_s
                ),
            ));
        }
        crate::filtered::table_rows(self, &mut rows);
        if let Some(sv) = &self.server {
            rows.push((
                "server",
                format!(
                    "pid {}: CPU {:.2} s{}, RSS {} → {} KiB",
                    sv.pid,
                    sv.cpu_s,
                    sv.cpu_us_per_frame
                        .map(|v| format!(" ({v:.2} µs per frame)"))
                        .unwrap_or_default(),
                    fmt_int(sv.before.rss_kib),
                    fmt_int(sv.after.rss_kib)
                ),
            ));
        }
        if let Some(f) = &self.floor {
            rows.push(("floor", fmt_floor(f)));
        }
        if let Some(storm) = &self.reconnect_storm {
            storm.rows(&mut rows);
        }
        if let Some(storm) = &self.accept_storm {
            storm.rows(&mut rows);
        }
        if let Some(broadcast) = &self.broadcast {
            broadcast.rows(&mut rows);
        }
        if let Some(abuse) = &self.abuse {
            abuse.rows(&mut rows);
        }
        let g = &self.generator;
        rows.push((
            "generator",
            format!(
                "CPU {:.2} s in {:.2} s ({:.0} % of one core{}), RSS {} KiB, {} thread(s)",
                g.cpu_s,
                g.wall_s,
                g.cpu_pct_of_core,
                g.cpu_us_per_frame
                    .map(|v| format!(", {v:.2} µs per frame"))
                    .unwrap_or_default(),
                fmt_int(g.rss_kib),
                g.threads
            ),
        ));
        rows.push((
            "machine",
            format!(
                "{:.0} % of {} CPUs busy during the run; softirq {:.0} % and other processes (PostgreSQL...) {:.0} % of one core",
                self.machine_busy_pct, self.cpus, self.irq_pct_of_core, self.others_pct_of_core
            ),
        ));
        for note in &self.notes {
            rows.push(("note", note.clone()));
        }
        for problem in &self.problems {
            rows.push(("PROBLEM", problem.clone()));
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = format!("{head}\n");
        for (key, value) in rows {
            let _ = writeln!(out, "  {key:<width$}  {value}");
        }
        if !self.clients.is_empty() {
            let _ = writeln!(
                out,
                "\n  {:>6} {:>12} {:>10} {:>10} {:>10} {:>7} {:>7}  end",
                "client", "delivered", "lost", "dup", "ooo", "pings", "other"
            );
            for c in &self.clients {
                let _ = writeln!(
                    out,
                    "  {:>6} {:>12} {:>10} {:>10} {:>10} {:>7} {:>7}  {}",
                    c.id,
                    c.counts.delivered,
                    c.counts.lost,
                    c.counts.duplicated,
                    c.counts.out_of_order,
                    c.pings,
                    c.other,
                    c.end
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting() {
        assert_eq!(fmt_int(0), "0");
        assert_eq!(fmt_int(1234567), "1,234,567");
        assert_eq!(fmt_int(100), "100");
        assert_eq!(fmt_us(12.4), "12 µs");
        assert_eq!(fmt_us(2500.0), "2.50 ms");
        assert_eq!(fmt_us(3_200_000.0), "3.20 s");
    }

    #[test]
    fn json_round_trip_and_table() {
        let report = Report {
            mode: "fanout".to_owned(),
            settings: Settings {
                clients: 3,
                ..Settings::default()
            },
            delivery: Some(Delivery {
                published: 10,
                expected: 30,
                counts: Counts {
                    delivered: 29,
                    lost: 1,
                    ..Counts::default()
                },
                ..Delivery::default()
            }),
            ..Report::default()
        };
        let json = serde_json::to_string(&report).expect("serialises");
        let back: Report = serde_json::from_str(&json).expect("parses");
        assert_eq!(back.delivery.expect("delivery").counts.lost, 1);
        let table = report.table();
        assert!(table.contains("29 of 30 frames"), "{table}");
    }

    #[test]
    fn reports_without_a_floor_still_load() {
        let mut json = serde_json::to_value(Report::default()).expect("serialises");
        json.as_object_mut().expect("an object").remove("floor");
        let back: Report = serde_json::from_value(json).expect("parses");
        assert!(back.floor.is_none());
    }

    #[test]
    fn floor_line() {
        let floor = Floor {
            sockets: 1000,
            rate: 50.0,
            sends: 500_000,
            writer_cpu_s: 2.95,
            us_per_send: Some(5.9),
            bytes_expected: 102_000_000,
            bytes_received: 102_000_000,
            ..Floor::default()
        };
        assert_eq!(
            fmt_floor(&floor),
            "1,000 sockets at 50/s: 500,000 sends, writer CPU 2.95 s (5.90 µs per send), every byte read"
        );
        let short = Floor {
            rate: 12.5,
            would_block: 3,
            bytes_received: 101_999_400,
            ..floor.clone()
        };
        assert_eq!(
            fmt_floor(&short),
            "1,000 sockets at 12.5/s: 500,000 sends, writer CPU 2.95 s (5.90 µs per send), 3 would have blocked, 101,999,400 of 102,000,000 bytes read"
        );
        let table = Report {
            mode: "send-floor".to_owned(),
            floor: Some(floor),
            ..Report::default()
        }
        .table();
        assert!(table.contains("  floor      1,000 sockets"), "{table}");
    }
}
