//! Storms: every client dropping and reconnecting at once (`reconnect-storm`, what a replica
//! restart does to its clients), and a storm of new connections while readers and health
//! probes are measured (`accept-storm`, run as a side activity of a load run). The accept
//! storm's connections close once upgraded (unless held), so that the readers' fan-out stays
//! what it was and what the storm adds is its accepts and handshakes, not more clients.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::clients::{self, ClientEnd, ConnectStats, Dial, Shared, Target, Ws};
use crate::db::Db;
use crate::error::BenchError;
use crate::options::{self, AcceptStormArgs, ReconnectStormArgs};
use crate::payload::{self, Clock, Parsed};
use crate::procstat;
use crate::publisher::{self, Counters, Plan};
use crate::report::{Report, ServerUse, Settings, fmt_int, fmt_us};
use crate::scenario::{self, OwnUse, cpus};
use crate::stats::{Percentiles, new_histogram};
use crate::status::StatusUrl;

/// How long to wait for the server to report every client registered.
const REGISTER_LIMIT: Duration = Duration::from_secs(30);
/// A probe that has no answer within this long counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What `reconnect-storm` measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReconnectStorm {
    /// Clients connected before the drop.
    pub clients: usize,
    /// The reconnections, all opened from the drop on.
    pub reconnect: ConnectStats,
    pub notify_every_ms: f64,
    /// NOTIFYs published during the storm.
    pub notifies: u64,
    /// From the drop until the last client had its 101 again.
    pub upgraded_all_ms: Option<f64>,
    /// Reconnected clients that received a NOTIFY.
    pub served: usize,
    /// From the drop until the last client had received a NOTIFY; `None` when some never did.
    pub served_all_ms: Option<f64>,
    /// Per client, drop → first NOTIFY received (microseconds, as every percentile here).
    pub served_after: Percentiles,
    /// Reconnected clients whose connection ended during the storm, and how.
    pub closes: Vec<String>,
    /// The server's client count once the storm was over.
    pub server_clients_after: Option<u64>,
}

impl ReconnectStorm {
    pub fn rows(&self, rows: &mut Vec<(&'static str, String)>) {
        let ms = |v: Option<f64>| v.map_or("never".to_owned(), |ms| format!("{ms:.0} ms"));
        rows.push((
            "storm",
            format!(
                "{} clients dropped at once and reconnected ({} failed{}); all upgraded after {}, \
                 {} of {} served a NOTIFY (one every {:.0} ms, {} sent), the last after {}",
                fmt_int(self.clients as u64),
                self.reconnect.failed,
                self.reconnect
                    .first_error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default(),
                ms(self.upgraded_all_ms),
                fmt_int(self.served as u64),
                fmt_int(self.reconnect.connected as u64),
                self.notify_every_ms,
                self.notifies,
                ms(self.served_all_ms)
            ),
        ));
        let p = &self.served_after;
        rows.push((
            "served",
            format!(
                "drop → first NOTIFY: p50 {}  p99 {}  max {}; closed during the storm: {}; \
                 server clients after: {}",
                fmt_us(p.p50_us),
                fmt_us(p.p99_us),
                fmt_us(p.max_us),
                if self.closes.is_empty() {
                    "none".to_owned()
                } else {
                    self.closes.join(", ")
                },
                self.server_clients_after
                    .map_or("n/a".to_owned(), |c| c.to_string())
            ),
        ));
    }
}

/// Per reconnected client: when its 101 came and when its first NOTIFY did (0: not yet).
struct Timeline {
    upgraded: Vec<AtomicU64>,
    served: Vec<AtomicU64>,
    served_count: AtomicU64,
}

impl Timeline {
    fn new(n: usize) -> Timeline {
        Timeline {
            upgraded: (0..n).map(|_| AtomicU64::new(0)).collect(),
            served: (0..n).map(|_| AtomicU64::new(0)).collect(),
            served_count: AtomicU64::new(0),
        }
    }
}

/// Reads a reconnected client: notes its first NOTIFY of this run, then keeps reading (so that
/// pings are answered and nothing piles up) until stopped.
async fn serve_one(
    id: usize,
    mut ws: Ws,
    run: u32,
    clock: Clock,
    timeline: Arc<Timeline>,
    stop: CancellationToken,
) -> ClientEnd {
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let message = tokio::select! {
            biased;
            _ = &mut stopped => return ClientEnd::Open,
            message = ws.next() => message,
        };
        match message {
            Some(Ok(Message::Text(text))) => {
                if matches!(payload::parse(text.as_str(), run), Parsed::Bench(_))
                    && timeline.served[id].load(Ordering::Relaxed) == 0
                {
                    timeline.served[id].store(clock.now_ns().max(1), Ordering::Relaxed);
                    timeline.served_count.fetch_add(1, Ordering::Relaxed);
                }
            }
            Some(Ok(Message::Close(frame))) => {
                return ClientEnd::Closed {
                    code: frame.as_ref().map(|f| u16::from(f.code)),
                    reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                };
            }
            Some(Ok(_)) => {}
            Some(Err(err)) => {
                return ClientEnd::Dropped {
                    error: err.to_string(),
                };
            }
            None => {
                return ClientEnd::Dropped {
                    error: "connection closed without a close frame".to_owned(),
                };
            }
        }
    }
}

/// `reconnect-storm`: connect N clients, drop them all at once, reconnect them all at once while
/// a NOTIFY goes out every `--notify-every`, and time until each has one.
pub async fn reconnect(args: ReconnectStormArgs, pg: Handle) -> Result<Report, BenchError> {
    args.clients.check(false)?;
    args.clients.check_legacy("reconnect-storm")?;
    args.output.check()?;
    options::check_payload_size(args.payload_size)?;
    if args.notify_every.is_zero() || args.storm_timeout.is_zero() {
        return Err(BenchError::Usage(
            "--notify-every and --storm-timeout must be positive".to_owned(),
        ));
    }
    let pid = args.server.server_pid;
    scenario::check_server_pid(pid)?;
    let n = args.clients.clients;
    let storm_concurrency = args.storm_concurrency.unwrap_or(n).max(1);
    let db = Db::from_args(&args.db)?;
    let clock = Clock::new();
    let run: u32 = rand::random();
    let mut report = Report {
        mode: "reconnect-storm".to_owned(),
        run,
        settings: Settings {
            channel: Some(db.channel.clone()),
            publishers: 1,
            batch: 1,
            payload_size: args.payload_size,
            rate: Some(1.0 / args.notify_every.as_secs_f64()),
            ..Settings::of_clients(&args.server.url, &args.clients, args.output.threads)
        },
        cpus: cpus(),
        ..Report::default()
    };
    let target = Target::resolve(&args.server.url, args.clients.read_buffer).await?;
    let targets = std::slice::from_ref(&target);
    let status = scenario::status_url(&args.server)?;
    let dial = Dial::default();

    let (first, stats) =
        clients::connect_all(&target, 0, n, args.clients.connect_concurrency, &dial).await;
    if first.is_empty() {
        return Err(BenchError::Server {
            url: args.server.url.clone(),
            cause: stats.first_error.unwrap_or_default(),
        });
    }
    if stats.failed > 0 {
        report.problems.push(format!(
            "{} clients could not connect before the storm",
            stats.failed
        ));
    }
    let dropped = first.len();
    report.connect = Some(stats);
    if let Some(status) = &status {
        if let Err(why) = status
            .wait_for_clients(dropped as u64, REGISTER_LIMIT)
            .await
        {
            report.notes.push(format!("{}: {why}", status.display()));
        }
    }
    let db_clients = {
        let db = db.clone();
        pg.spawn(async move { publisher::connect(&db, 1).await })
            .await
            .map_err(scenario::lost_task)??
    };

    let server_before = scenario::sample_server(pid)?;
    let own_before = procstat::own();
    let machine_before = procstat::machine();
    let wall = Instant::now();
    let timeline = Arc::new(Timeline::new(n));
    let stop = CancellationToken::new();
    let counters = Arc::new(Counters::default());

    // The storm: every connection closes at once, and every client dials again at once.
    let dropped_ns = clock.now_ns();
    drop(first);
    let plan = Plan {
        messages: None,
        duration: Some(args.storm_timeout),
        rate: report.settings.rate,
        batch: 1,
        payload_size: args.payload_size,
        survive: false,
    };
    let publishing = {
        let (db, counters) = (db.clone(), counters.clone());
        pg.spawn(
            async move { publisher::run(&db, db_clients, plan, clock, run, None, counters).await },
        )
    };
    let mut readers = Vec::with_capacity(n);
    let reconnect = clients::connect_each(targets, 0..n, storm_concurrency, &dial, |id, ws| {
        timeline.upgraded[id].store(clock.now_ns(), Ordering::Relaxed);
        readers.push(tokio::spawn(serve_one(
            id,
            ws,
            run,
            clock,
            timeline.clone(),
            stop.clone(),
        )));
    })
    .await;
    let deadline = Instant::now()
        + args
            .storm_timeout
            .saturating_sub(Duration::from_nanos(clock.now_ns() - dropped_ns));
    while timeline.served_count.load(Ordering::Relaxed) < reconnect.connected as u64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    counters.stop.store(true, Ordering::Relaxed);
    let published = publishing.await.map_err(scenario::lost_task)??;

    let server_after = scenario::sample_server(pid)?;
    let own_after = procstat::own();
    let machine_after = procstat::machine();
    let wall_s = wall.elapsed().as_secs_f64();
    let server_clients_after = match &status {
        Some(status) => status.clients().await.ok(),
        None => None,
    };
    stop.cancel();
    let ends = scenario::collect(readers).await;
    let closes: Vec<String> = ends
        .iter()
        .filter(|e| **e != ClientEnd::Open)
        .map(scenario::describe)
        .collect();

    let since_drop = |ns: u64| ns.saturating_sub(dropped_ns);
    let mut served_hist = new_histogram();
    let (mut served, mut last_served, mut last_upgraded) = (0usize, 0u64, 0u64);
    for (upgraded, at) in timeline.upgraded.iter().zip(&timeline.served) {
        let (upgraded, at) = (upgraded.load(Ordering::Relaxed), at.load(Ordering::Relaxed));
        last_upgraded = last_upgraded.max(upgraded);
        if at > 0 {
            served += 1;
            last_served = last_served.max(at);
            served_hist.saturating_record(since_drop(at).max(1));
        }
    }
    let ms = |ns: u64| since_drop(ns) as f64 / 1e6;
    let all_served = served == n;
    if reconnect.failed > 0 {
        report.problems.push(format!(
            "{} clients could not reconnect{}",
            reconnect.failed,
            reconnect
                .first_error
                .as_ref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        ));
    }
    if !all_served {
        report.problems.push(format!(
            "{} of {n} clients were not served a NOTIFY within {:?} of the drop",
            n - served,
            args.storm_timeout
        ));
    }
    if !closes.is_empty() {
        report.problems.push(format!(
            "{} reconnected clients were closed during the storm",
            closes.len()
        ));
    }
    report.reconnect_storm = Some(ReconnectStorm {
        clients: dropped,
        notify_every_ms: args.notify_every.as_secs_f64() * 1e3,
        notifies: published.total,
        upgraded_all_ms: (reconnect.connected == n).then(|| ms(last_upgraded)),
        served,
        served_all_ms: all_served.then(|| ms(last_served)),
        served_after: Percentiles::of(&served_hist),
        closes: scenario::summarise(closes),
        server_clients_after,
        reconnect,
    });
    report.server = ServerUse::between(pid, server_before, server_after, None);
    OwnUse {
        own: (own_before, own_after),
        machine: (machine_before, machine_after),
        wall_s,
    }
    .record(&mut report, args.output.threads, None);
    report.published = Some(published);
    Ok(report)
}

/// Latencies before, during and after a storm, in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PhaseLatency {
    pub before: Percentiles,
    pub during: Percentiles,
    pub after: Percentiles,
    /// Probes that failed or did not answer 200 (any phase).
    pub failed: usize,
    pub first_error: Option<String>,
}

impl PhaseLatency {
    /// What the storm added: the worst latency during it or after it, less the median before.
    pub fn added_max_us(&self) -> f64 {
        (self.during.max_us.max(self.after.max_us) - self.before.p50_us).max(0.0)
    }

    fn text(&self) -> String {
        let mut text = format!(
            "before p50 {} p99 {}; during p50 {} p99 {} max {}; after max {} ({} + {} + {} samples); added {}",
            fmt_us(self.before.p50_us),
            fmt_us(self.before.p99_us),
            fmt_us(self.during.p50_us),
            fmt_us(self.during.p99_us),
            fmt_us(self.during.max_us),
            fmt_us(self.after.max_us),
            self.before.count,
            self.during.count,
            self.after.count,
            fmt_us(self.added_max_us())
        );
        if self.failed > 0 {
            text.push_str(&format!(
                "; {} failed{}",
                self.failed,
                self.first_error
                    .as_ref()
                    .map(|e| format!(" (first: {e})"))
                    .unwrap_or_default()
            ));
        }
        text
    }
}

/// What `accept-storm` measured beside the readers' delivery.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AcceptStorm {
    pub storm: ConnectStats,
    /// Storm start to the last storm connection's 101.
    pub storm_s: f64,
    pub baseline_s: f64,
    pub tail_s: f64,
    pub status: PhaseLatency,
    pub ready: PhaseLatency,
    /// NOTIFY → frame at the readers, by when the message was sent.
    pub delivery: PhaseLatency,
    pub notes: Vec<String>,
}

impl AcceptStorm {
    pub fn rows(&self, rows: &mut Vec<(&'static str, String)>) {
        rows.push((
            "storm",
            format!(
                "{} of {} new connections in {:.2} s ({} at a time), {} failed{}; baseline {:.1} s before, {:.1} s after",
                fmt_int(self.storm.connected as u64),
                fmt_int(self.storm.attempted as u64),
                self.storm_s,
                self.storm.concurrency,
                self.storm.failed,
                self.storm
                    .first_error
                    .as_ref()
                    .map(|e| format!(" (first: {e})"))
                    .unwrap_or_default(),
                self.baseline_s,
                self.tail_s
            ),
        ));
        rows.push(("/status", self.status.text()));
        rows.push(("/ready", self.ready.text()));
        rows.push(("delivery", self.delivery.text()));
    }
}

/// One GET: when it started and how long it took ([`Clock`] nanoseconds).
struct Probe {
    at_ns: u64,
    took_ns: u64,
    error: Option<String>,
}

/// GETs `path` every `interval`, one at a time, each on a new connection, until stopped.
async fn probe_loop(
    status: StatusUrl,
    path: &'static str,
    interval: Duration,
    clock: Clock,
    stop: CancellationToken,
) -> Vec<Probe> {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probes = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let at_ns = clock.now_ns();
        let error = match timeout(PROBE_TIMEOUT, status.probe(path)).await {
            Ok(Ok(200)) => None,
            Ok(Ok(code)) => Some(format!("{path} answered {code}")),
            Ok(Err(err)) => Some(format!("{path}: {err}")),
            Err(_) => Some(format!("{path}: no answer within {PROBE_TIMEOUT:?}")),
        };
        probes.push(Probe {
            at_ns,
            took_ns: clock.now_ns() - at_ns,
            error,
        });
    }
    probes
}

/// Splits probes by start time: before `start`, up to `end`, after.
fn probe_phases(probes: &[Probe], start: u64, end: u64) -> PhaseLatency {
    let mut histograms = [new_histogram(), new_histogram(), new_histogram()];
    let mut latency = PhaseLatency::default();
    for probe in probes {
        if let Some(error) = &probe.error {
            latency.failed += 1;
            latency.first_error.get_or_insert_with(|| error.clone());
        }
        let phase = usize::from(probe.at_ns >= start) + usize::from(probe.at_ns > end);
        histograms[phase].saturating_record(probe.took_ns.max(1));
    }
    let [before, during, after] = histograms.map(|h| Percentiles::of(&h));
    PhaseLatency {
        before,
        during,
        after,
        ..latency
    }
}

/// A runtime of its own, so that what runs there does not queue behind the readers (or they
/// behind it).
pub(crate) fn side_runtime(name: &str) -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .map_err(|err| format!("cannot start the {name} runtime: {err}"))
}

/// The storm and the probes of `accept-storm`, run beside a load run's readers.
pub struct AcceptStormSide {
    pub target: Target,
    pub status: StatusUrl,
    pub storm: usize,
    pub concurrency: usize,
    pub hold: bool,
    pub baseline: Duration,
    pub tail: Duration,
    pub probe_interval: Duration,
    pub storm_timeout: Duration,
}

impl AcceptStormSide {
    pub fn new(args: &AcceptStormArgs, target: Target, status: StatusUrl) -> AcceptStormSide {
        AcceptStormSide {
            target,
            status,
            storm: args.storm,
            concurrency: args.storm_concurrency.unwrap_or(args.storm).max(1),
            hold: args.storm_hold,
            baseline: args.baseline,
            tail: args.tail,
            probe_interval: args.probe_interval,
            storm_timeout: args.storm_timeout,
        }
    }

    /// Probes throughout; after the baseline, the storm (on a runtime of its own); after the
    /// tail, stops the publishers. The readers' latencies are split at the storm's bounds.
    pub async fn run(
        self,
        clock: Clock,
        shared: Arc<Shared>,
        counters: Arc<Counters>,
    ) -> AcceptStorm {
        let mut notes = Vec::new();
        let probes_stop = CancellationToken::new();
        let probe = |path| {
            tokio::spawn(probe_loop(
                self.status.clone(),
                path,
                self.probe_interval,
                clock,
                probes_stop.clone(),
            ))
        };
        let (status_probes, ready_probes) = (probe("/status"), probe("/ready"));
        tokio::time::sleep(self.baseline).await;

        let start = clock.now_ns();
        if let Some(phases) = &shared.phases {
            phases.begin(1, start);
        }
        let storm = self.storm(&mut notes).await;
        let end = clock.now_ns();
        if let Some(phases) = &shared.phases {
            phases.begin(2, end);
        }
        tokio::time::sleep(self.tail).await;
        probes_stop.cancel();
        counters.stop.store(true, Ordering::Relaxed);
        let status_probes = status_probes.await.unwrap_or_default();
        let ready_probes = ready_probes.await.unwrap_or_default();
        let stats = match storm {
            Some(storm) => storm.release().await,
            None => ConnectStats::default(),
        };
        AcceptStorm {
            storm: stats,
            storm_s: (end - start) as f64 / 1e9,
            baseline_s: self.baseline.as_secs_f64(),
            tail_s: self.tail.as_secs_f64(),
            status: probe_phases(&status_probes, start, end),
            ready: probe_phases(&ready_probes, start, end),
            // Filled in by the load run from the readers' phases.
            delivery: PhaseLatency::default(),
            notes,
        }
    }

    /// Opens the storm's connections on a runtime of their own, which closes each once it has
    /// its 101, or with `hold` keeps them until released.
    async fn storm(&self, notes: &mut Vec<String>) -> Option<HeldStorm> {
        let runtime = match side_runtime("storm") {
            Ok(runtime) => runtime,
            Err(why) => {
                notes.push(why);
                return None;
            }
        };
        let (stats_tx, stats_rx) = oneshot::channel();
        let (release, released) = oneshot::channel::<()>();
        let (target, storm, concurrency, hold) =
            (self.target.clone(), self.storm, self.concurrency, self.hold);
        let task = runtime.spawn(async move {
            let mut held = Vec::new();
            let targets = std::slice::from_ref(&target);
            let stats =
                clients::connect_each(targets, 0..storm, concurrency, &Dial::default(), |_, ws| {
                    if hold {
                        held.push(ws);
                    }
                })
                .await;
            let _ = stats_tx.send(stats);
            let _ = released.await;
            drop(held);
        });
        let stats = match timeout(self.storm_timeout, stats_rx).await {
            Ok(Ok(stats)) => stats,
            Ok(Err(_)) => {
                notes.push("the storm's task ended early".to_owned());
                ConnectStats::default()
            }
            Err(_) => {
                notes.push(format!(
                    "the storm had not connected within {:?}",
                    self.storm_timeout
                ));
                ConnectStats::default()
            }
        };
        Some(HeldStorm {
            stats,
            release,
            task,
            runtime,
        })
    }
}

/// The storm's connections, open on their own runtime until released.
struct HeldStorm {
    stats: ConnectStats,
    release: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    runtime: tokio::runtime::Runtime,
}

impl HeldStorm {
    /// Closes the connections and stops their runtime; returns how connecting went.
    async fn release(self) -> ConnectStats {
        let _ = self.release.send(());
        let _ = self.task.await;
        self.runtime.shutdown_background();
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_split_by_start_time() {
        let probe = |at_ns: u64, took_ms: u64, error: Option<&str>| Probe {
            at_ns,
            took_ns: took_ms * 1_000_000,
            error: error.map(str::to_owned),
        };
        let probes = [
            probe(10, 1, None),
            probe(20, 3, None),
            probe(100, 50, None),
            probe(150, 120, Some("/ready answered 503")),
            probe(250, 2, None),
        ];
        let phases = probe_phases(&probes, 100, 200);
        assert_eq!(
            (phases.before.count, phases.during.count, phases.after.count),
            (2, 2, 1)
        );
        assert_eq!(phases.failed, 1);
        assert_eq!(phases.first_error.as_deref(), Some("/ready answered 503"));
        // The worst during the storm, less the median before it (1 ms; histograms keep three
        // significant digits).
        let added = phases.added_max_us();
        assert!((added - 119_000.0).abs() < 200.0, "{added}");
    }
}
