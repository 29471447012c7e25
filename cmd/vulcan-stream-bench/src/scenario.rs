//! The modes: each connects what it needs, measures one window of activity, and fills a
//! [`Report`].
//!
//! A load run goes: connect the clients (and the stuck ones), wait until the server has
//! registered them, connect the publishers (and the bare listener), read the server's and our
//! own resource use, publish, wait until every live client has every message (or nothing has
//! arrived for `--drain-timeout`), read resource use again, then look at the stuck clients and
//! stop the readers. Rates and CPU per frame cover the window from the first send to the last
//! frame.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::abuse::{Abuse, AbuseSide};
use crate::broadcast;
use crate::clients::{self, ClientEnd, Dial, Format, GONE, Positions, Shared, Target};
use crate::db::{Db, Source};
use crate::error::BenchError;
use crate::listen::RawListener;
use crate::options::{
    AbuseArgs, AcceptStormArgs, ClientArgs, Command, DbArgs, FanoutArgs, HistoryArgs, IdleArgs,
    LoadArgs, OutputArgs, RawListenArgs, ServerArgs, SoakArgs, StuckArgs,
};
use crate::payload::Clock;
use crate::procstat::{self, ProcSample};
use crate::publisher::{self, Counters, Flow, Plan};
use crate::report::{
    ClientRow, Delivery, GeneratorUse, HistoryFill, Idle, KeepUp, ListenerCheck, RawListen, Report,
    ServerUse, Settings, Soak, Stuck,
};
use crate::resume;
use crate::stats::{Counts, Percentiles};
use crate::status::StatusUrl;
use crate::storm::{self, AcceptStorm, AcceptStormSide, PhaseLatency, side_runtime};

/// How long to wait for the server to report every client registered.
pub(crate) const REGISTER_LIMIT: Duration = Duration::from_secs(30);

/// Runs one mode with websocket clients (not `targets` or `send-floor`); the publishers run on
/// `publishers`, a runtime apart from the readers'.
pub async fn run(command: Command, publishers: Handle) -> Result<Report, BenchError> {
    match command {
        Command::Fanout(a) => load(LoadSpec::fanout(a)?, publishers).await,
        Command::RawListen(a) => load(LoadSpec::raw_listen(a)?, publishers).await,
        Command::Publish(a) => load(LoadSpec::publish(a)?, publishers).await,
        Command::Stuck(a) => load(LoadSpec::stuck(a)?, publishers).await,
        Command::Soak(a) => load(LoadSpec::soak(a)?, publishers).await,
        Command::AcceptStorm(a) => load(LoadSpec::accept_storm(a)?, publishers).await,
        Command::Abuse(a) => load(LoadSpec::abuse(a)?, publishers).await,
        Command::Idle(a) => idle(a).await,
        Command::ReconnectStorm(a) => storm::reconnect(a, publishers).await,
        Command::Resume(a) => resume::run(a, publishers).await,
        Command::History(a) => load(LoadSpec::history(a)?, publishers).await,
        Command::Broadcast(a) => broadcast::run(a, publishers).await,
        Command::Isolation(a) => crate::filtered::isolation(a, publishers).await,
        Command::Targeted(a) => crate::filtered::targeted(a, publishers).await,
        Command::Chaos(a) => crate::chaos::run(a, publishers).await,
        Command::Targets(_) | Command::SendFloor(_) | Command::BroadcastWorker(_) => {
            Err(BenchError::Usage(
                "targets, send-floor and broadcast-worker are not load modes".to_owned(),
            ))
        }
    }
}

struct LoadSpec {
    mode: &'static str,
    server: Option<ServerArgs>,
    clients: ClientArgs,
    db: Db,
    load: LoadArgs,
    messages: Option<u64>,
    duration: Option<Duration>,
    raw_listen: bool,
    stuck: usize,
    stuck_recv_buffer: u32,
    stuck_wait: Duration,
    /// Sample interval and warm-up.
    soak: Option<(Duration, Duration)>,
    /// What runs beside the readers.
    side: Option<SideSpec>,
    /// The server's history byte bound, for `history`.
    history_bound: Option<u64>,
    output: OutputArgs,
}

/// What a load run does beside its readers and publishers.
enum SideSpec {
    /// A storm of connections and health probes; it ends the publishing when it is done.
    AcceptStorm(Box<AcceptStormArgs>),
    /// Abusers, until the publishing ends.
    Abuse(Box<AbuseArgs>),
}

/// A side activity under way.
enum Side {
    AcceptStorm(JoinHandle<AcceptStorm>),
    Abuse {
        task: JoinHandle<Abuse>,
        stop: CancellationToken,
        runtime: tokio::runtime::Runtime,
    },
}

impl Side {
    /// Starts `spec` against `target`.
    fn start(
        spec: SideSpec,
        target: &Target,
        status: Option<&StatusUrl>,
        clock: Clock,
        shared: &Arc<Shared>,
        counters: &Arc<Counters>,
    ) -> Result<Side, BenchError> {
        match spec {
            SideSpec::AcceptStorm(args) => {
                let status = status.cloned().ok_or_else(|| {
                    BenchError::Usage("accept-storm probes /status: give --status-url".to_owned())
                })?;
                let storm = AcceptStormSide::new(&args, target.clone(), status);
                Ok(Side::AcceptStorm(tokio::spawn(storm.run(
                    clock,
                    shared.clone(),
                    counters.clone(),
                ))))
            }
            SideSpec::Abuse(args) => {
                // Abusers that flood must not delay the readers: a runtime of their own.
                let runtime = side_runtime("abuse").map_err(BenchError::Run)?;
                let stop = CancellationToken::new();
                let abuse = AbuseSide::new(&args, target.clone(), status.cloned());
                let task = runtime.spawn(abuse.run(stop.clone()));
                Ok(Side::Abuse {
                    task,
                    stop,
                    runtime,
                })
            }
        }
    }

    /// Ends it (the storm has ended by itself) and puts what it saw in `report`.
    async fn finish(self, report: &mut Report) {
        match self {
            Side::AcceptStorm(task) => {
                let Ok(storm) = task.await else {
                    report.problems.push("the storm's task failed".to_owned());
                    return;
                };
                if storm.storm.failed > 0 {
                    report.problems.push(format!(
                        "{} storm connections failed (first: {})",
                        storm.storm.failed,
                        storm.storm.first_error.clone().unwrap_or_default()
                    ));
                }
                for (path, probes) in [("/status", &storm.status), ("/ready", &storm.ready)] {
                    if probes.failed > 0 {
                        report.problems.push(format!(
                            "{} {path} probes failed (first: {})",
                            probes.failed,
                            probes.first_error.clone().unwrap_or_default()
                        ));
                    }
                }
                report.notes.extend(storm.notes.iter().cloned());
                report.accept_storm = Some(storm);
            }
            Side::Abuse {
                task,
                stop,
                runtime,
            } => {
                stop.cancel();
                let abuse = task.await;
                runtime.shutdown_background();
                let Ok(abuse) = abuse else {
                    report.problems.push("the abusers' task failed".to_owned());
                    return;
                };
                for class in &abuse.classes {
                    if !abuse.passed(class) && class.wrong == 0 && class.right > 0 {
                        report.problems.push(format!(
                            "{}: {} ended, but the server counted {} closed as too slow",
                            class.name,
                            class.right,
                            abuse.slow_closes.unwrap_or(0)
                        ));
                    }
                    if class.wrong > 0 {
                        report.problems.push(format!(
                            "{}: {} of {} connections did not end as expected ({})",
                            class.name,
                            class.wrong,
                            class.attempts,
                            class.ends.join(", ")
                        ));
                    }
                    if class.not_checked > 0 && class.right == 0 {
                        report.notes.push(format!(
                            "{}: not checked, the server does not validate UTF-8",
                            class.name
                        ));
                    }
                }
                report.abuse = Some(abuse);
            }
        }
    }
}

impl LoadSpec {
    fn new(
        mode: &'static str,
        server: Option<ServerArgs>,
        clients: ClientArgs,
        db: &DbArgs,
        load: LoadArgs,
        output: OutputArgs,
        default_messages: u64,
    ) -> Result<LoadSpec, BenchError> {
        clients.check(server.is_none())?;
        load.check()?;
        output.check()?;
        check_server_pid(server.as_ref().and_then(|s| s.server_pid))?;
        let db = Db::from_args(db)?;
        let (messages, duration) = match (load.messages, load.duration) {
            (None, None) => (Some(default_messages), None),
            other => other,
        };
        Ok(LoadSpec {
            mode,
            server,
            clients,
            db,
            load,
            messages,
            duration,
            raw_listen: false,
            stuck: 0,
            stuck_recv_buffer: 0,
            stuck_wait: Duration::ZERO,
            soak: None,
            side: None,
            history_bound: None,
            output,
        })
    }

    fn fanout(a: FanoutArgs) -> Result<LoadSpec, BenchError> {
        let mut spec = LoadSpec::new(
            "fanout",
            Some(a.server),
            a.clients,
            &a.db,
            a.load,
            a.output,
            10_000,
        )?;
        spec.raw_listen = a.raw_listen;
        Ok(spec)
    }

    /// A fanout that publishes enough to fill the history twice over, unless told how much.
    fn history(a: HistoryArgs) -> Result<LoadSpec, BenchError> {
        if a.history_bytes == 0 {
            return Err(BenchError::Usage(
                "--history-bytes must be positive".to_owned(),
            ));
        }
        let mut fanout = a.fanout;
        if fanout.load.messages.is_none() && fanout.load.duration.is_none() {
            let per_message = 3 * fanout.load.payload_size as u64;
            fanout.load.messages = Some((2 * a.history_bytes).div_ceil(per_message));
        }
        let mut spec = LoadSpec::fanout(fanout)?;
        spec.mode = "history";
        spec.history_bound = Some(a.history_bytes);
        Ok(spec)
    }

    fn raw_listen(a: RawListenArgs) -> Result<LoadSpec, BenchError> {
        if a.db.source != Source::Notify {
            return Err(BenchError::Usage(
                "raw-listen LISTENs for what the publishers NOTIFY: no --source table".to_owned(),
            ));
        }
        let mut spec = LoadSpec::publish(a)?;
        spec.mode = "raw-listen";
        spec.raw_listen = true;
        Ok(spec)
    }

    /// Publishers without clients: what they commit per second.
    fn publish(a: RawListenArgs) -> Result<LoadSpec, BenchError> {
        let clients = ClientArgs {
            clients: 0,
            connect_concurrency: 1,
            read_buffer: 4096,
            format: Format::Legacy,
            recv_buffer: None,
        };
        LoadSpec::new("publish", None, clients, &a.db, a.load, a.output, 100_000)
    }

    fn stuck(a: StuckArgs) -> Result<LoadSpec, BenchError> {
        let mut spec = LoadSpec::new(
            "stuck",
            Some(a.server),
            a.clients,
            &a.db,
            a.load,
            a.output,
            10_000,
        )?;
        spec.stuck = a.stuck;
        spec.stuck_recv_buffer = a.stuck_recv_buffer;
        spec.stuck_wait = a.stuck_wait;
        Ok(spec)
    }

    fn soak(a: SoakArgs) -> Result<LoadSpec, BenchError> {
        let mut load = a.load;
        if load.messages.is_none() && load.duration.is_none() {
            load.duration = Some(Duration::from_secs(600));
        }
        if load.rate.is_none() {
            load.rate = Some(100.0);
        }
        if a.sample_interval.is_zero() {
            return Err(BenchError::Usage(
                "--sample-interval must be positive".to_owned(),
            ));
        }
        let mut spec = LoadSpec::new("soak", Some(a.server), a.clients, &a.db, load, a.output, 0)?;
        spec.soak = Some((a.sample_interval, a.warmup));
        Ok(spec)
    }

    fn accept_storm(a: AcceptStormArgs) -> Result<LoadSpec, BenchError> {
        let mut load = a.load.clone();
        if load.messages.is_some() || load.duration.is_some() {
            return Err(BenchError::Usage(
                "accept-storm publishes until the storm is over: no --messages or --duration"
                    .to_owned(),
            ));
        }
        if a.storm == 0 || a.probe_interval.is_zero() || a.storm_timeout.is_zero() {
            return Err(BenchError::Usage(
                "--storm, --probe-interval and --storm-timeout must be positive".to_owned(),
            ));
        }
        // A bound only: the storm stops the publishers once its tail is over.
        load.duration = Some(a.baseline + a.storm_timeout + a.tail + Duration::from_secs(10));
        load.rate.get_or_insert(20.0);
        let mut spec = LoadSpec::new(
            "accept-storm",
            Some(a.server.clone()),
            a.clients.clone(),
            &a.db,
            load,
            a.output.clone(),
            0,
        )?;
        spec.side = Some(SideSpec::AcceptStorm(Box::new(a)));
        Ok(spec)
    }

    /// A soak (`--rate` 100 msg/s and `--duration` 10m unless given) with the abusers beside.
    fn abuse(a: AbuseArgs) -> Result<LoadSpec, BenchError> {
        if a.slowloris_interval.is_zero() {
            return Err(BenchError::Usage(
                "--slowloris-interval must be positive".to_owned(),
            ));
        }
        if !(a.churn_rate.is_finite() && a.churn_rate >= 0.0) {
            return Err(BenchError::Usage(
                "--churn-rate must be a number, 0 or more".to_owned(),
            ));
        }
        let mut spec = LoadSpec::soak(a.soak.clone())?;
        spec.mode = "abuse";
        spec.side = Some(SideSpec::Abuse(Box::new(a)));
        Ok(spec)
    }

    fn settings(&self) -> Settings {
        let flow = self.load.rate.is_none() && self.load.window > 0 && self.clients.clients > 0;
        Settings {
            url: self.server.as_ref().map(|s| s.url.clone()),
            channel: Some(self.db.channel.clone()),
            clients: self.clients.clients,
            stuck: self.stuck,
            publishers: self.load.publishers,
            batch: self.load.batch(),
            payload_size: self.load.payload_size,
            messages: self.messages,
            duration_s: self.duration.map(|d| d.as_secs_f64()),
            rate: self.load.rate,
            window: flow.then_some(self.load.window),
            threads: self.output.threads,
            read_buffer: self.clients.read_buffer,
            connect_concurrency: self.clients.connect_concurrency,
            format: self.clients.format,
            recv_buffer: self.clients.recv_buffer,
            source: self.db.source,
        }
    }
}

pub(crate) fn status_url(server: &ServerArgs) -> Result<Option<StatusUrl>, BenchError> {
    match &server.status_url {
        Some(url) => StatusUrl::parse(url)
            .map(Some)
            .map_err(|why| BenchError::Usage(format!("--status-url: {why}"))),
        None => Ok(StatusUrl::beside(&server.url)),
    }
}

/// A `--server-pid` must name a live process.
pub(crate) fn check_server_pid(pid: Option<u32>) -> Result<(), BenchError> {
    match pid {
        Some(pid) if !procstat::exists(pid) => Err(BenchError::Usage(format!(
            "--server-pid {pid}: no such process"
        ))),
        _ => Ok(()),
    }
}

pub(crate) fn sample_server(pid: Option<u32>) -> Result<Option<ProcSample>, BenchError> {
    pid.map(|pid| {
        procstat::sample(pid).map_err(|err| BenchError::Run(format!("server pid {pid}: {err}")))
    })
    .transpose()
}

pub(crate) fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Describes how a connection ended, for counting alike ends together.
pub(crate) fn describe(end: &ClientEnd) -> String {
    match end {
        ClientEnd::Open => "open".to_owned(),
        ClientEnd::Closed { code, reason } => match code {
            Some(code) if reason.is_empty() => format!("close {code}"),
            Some(code) => format!("close {code} {reason:?}"),
            None => "close without code".to_owned(),
        },
        ClientEnd::Dropped { error } => format!("dropped: {error}"),
    }
}

pub(crate) fn summarise(ends: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut counted: BTreeMap<String, usize> = BTreeMap::new();
    for end in ends {
        *counted.entry(end).or_default() += 1;
    }
    counted
        .into_iter()
        .map(|(end, n)| format!("{n}× {end}"))
        .collect()
}

pub(crate) async fn collect<T>(readers: Vec<JoinHandle<T>>) -> Vec<T> {
    let mut results = Vec::with_capacity(readers.len());
    for reader in readers {
        if let Ok(result) = reader.await {
            results.push(result);
        }
    }
    results
}

/// Times the server's receiver: reads `/status` back to back until the server reports `target`
/// notifications forwarded, and returns when that was seen (on `clock`); `None` when stopped
/// first or when `/status` stops answering. Back to back, because the whole burst may take only
/// milliseconds: a poll costs the server one small HTTP request.
async fn watch_forwarded(
    status: StatusUrl,
    clock: Clock,
    target: u64,
    stop: CancellationToken,
) -> Option<u64> {
    while !stop.is_cancelled() {
        match status.forwarded().await {
            Ok(count) if count >= target => return Some(clock.now_ns()),
            Ok(_) => tokio::task::yield_now().await,
            Err(_) => return None,
        }
    }
    None
}

/// Waits until every live client (and the raw listener) has `total` messages; true when it
/// gave up after `limit` without progress.
pub(crate) async fn drain(
    shared: &Shared,
    raw: Option<&AtomicU64>,
    total: u64,
    limit: Duration,
) -> bool {
    let mut last_sum = None;
    let mut last_change = Instant::now();
    loop {
        let clients_done = shared.min_progress().is_none_or(|m| m >= total);
        let raw_done = raw.is_none_or(|r| r.load(Ordering::Relaxed) >= total);
        if clients_done && raw_done {
            return false;
        }
        let sum = shared.total_progress() + raw.map_or(0, |r| r.load(Ordering::Relaxed));
        if last_sum != Some(sum) {
            last_sum = Some(sum);
            last_change = Instant::now();
        } else if last_change.elapsed() >= limit {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The server's epoch and its count of LISTEN reconnects, when its `/status` has an epoch.
async fn listener_state(status: &StatusUrl) -> Option<(String, Option<f64>)> {
    let epoch = status.epoch().await.ok()?;
    let reconnects = status
        .metric("vulcan_stream_listener_reconnects_total")
        .await
        .ok();
    Some((epoch, reconnects))
}

/// Reads the server's RSS every `interval` until stopped: (seconds since start, KiB).
async fn sample_rss(pid: u32, interval: Duration, stop: CancellationToken) -> Vec<(f64, u64)> {
    let start = Instant::now();
    let mut ticker = tokio::time::interval(interval);
    let mut samples = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {
                if let Ok(s) = procstat::sample(pid) {
                    samples.push((start.elapsed().as_secs_f64(), s.rss_kib));
                }
            }
        }
    }
    if let Ok(s) = procstat::sample(pid) {
        samples.push((start.elapsed().as_secs_f64(), s.rss_kib));
    }
    samples
}

fn soak_summary(samples: Vec<(f64, u64)>, interval: Duration, warmup: Duration) -> Soak {
    let warm = warmup.as_secs_f64();
    let judged: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t >= warm)
        .map(|&(_, kib)| kib)
        .collect();
    let judged = if judged.is_empty() {
        samples.iter().map(|&(_, kib)| kib).collect()
    } else {
        judged
    };
    let first = judged.first().copied().unwrap_or(0);
    let last = judged.last().copied().unwrap_or(0);
    let third = judged.len() / 3;
    let mean = |kib: &[u64]| {
        if kib.is_empty() {
            0.0
        } else {
            kib.iter().sum::<u64>() as f64 / kib.len() as f64
        }
    };
    let growth = last as i64 - first as i64;
    Soak {
        warmup_s: warm,
        interval_s: interval.as_secs_f64(),
        first_kib: first,
        last_kib: last,
        max_kib: judged.iter().copied().max().unwrap_or(0),
        growth_kib: growth,
        growth_pct: if first > 0 {
            growth as f64 * 100.0 / first as f64
        } else {
            0.0
        },
        first_third_mean_kib: mean(&judged[..third]),
        last_third_mean_kib: mean(&judged[judged.len() - third..]),
        samples,
    }
}

pub(crate) fn lost_task(err: tokio::task::JoinError) -> BenchError {
    BenchError::Run(format!("publisher task failed: {err}"))
}

async fn load(spec: LoadSpec, pg: Handle) -> Result<Report, BenchError> {
    let clock = Clock::new();
    let run: u32 = rand::random();
    let n = spec.clients.clients;
    let publishers = spec.load.publishers;
    let shared = Arc::new(match spec.side {
        Some(SideSpec::AcceptStorm(_)) => Shared::with_phases(run, clock, publishers, n),
        _ => Shared::new(run, clock, publishers, n),
    });
    let pid = spec.server.as_ref().and_then(|s| s.server_pid);
    let mut report = Report {
        mode: spec.mode.to_owned(),
        run,
        settings: spec.settings(),
        cpus: cpus(),
        ..Report::default()
    };

    let mut readers = Vec::new();
    let mut stuck = Vec::new();
    let mut status = None;
    let mut target = None;
    if let Some(server) = &spec.server {
        let target = target.insert(
            Target::resolve(&server.url, spec.clients.read_buffer)
                .await?
                .with_format(spec.clients.format),
        );
        status = status_url(server)?;
        let (connected, stats) = clients::open_all(
            target,
            0,
            n,
            spec.clients.connect_concurrency,
            &Dial::recv_buffer(spec.clients.recv_buffer),
        )
        .await;
        if connected.is_empty() {
            return Err(BenchError::Server {
                url: server.url.clone(),
                cause: stats.first_error.unwrap_or_default(),
            });
        }
        for p in &shared.progress {
            p.0.store(GONE, Ordering::Relaxed);
        }
        for (id, conn) in connected {
            shared.progress[id].0.store(0, Ordering::Relaxed);
            readers.push(tokio::spawn(clients::read(id, conn, shared.clone())));
        }
        if stats.failed > 0 {
            report
                .problems
                .push(format!("{} clients could not connect", stats.failed));
        }
        report.connect = Some(stats);
        if spec.stuck > 0 {
            let (connected, stats) = clients::connect_all(
                target,
                n,
                spec.stuck,
                spec.clients.connect_concurrency,
                &Dial::recv_buffer(Some(spec.stuck_recv_buffer)),
            )
            .await;
            if stats.failed > 0 {
                report
                    .problems
                    .push(format!("{} stuck clients could not connect", stats.failed));
            }
            stuck = connected.into_iter().map(|(_, ws)| ws).collect::<Vec<_>>();
        }
        if let Some(status) = &status {
            let want = (readers.len() + stuck.len()) as u64;
            if let Err(why) = status.wait_for_clients(want, REGISTER_LIMIT).await {
                report.notes.push(format!("{}: {why}", status.display()));
            }
        }
    }

    let db_clients = {
        let db = spec.db.clone();
        pg.spawn(async move { publisher::connect(&db, publishers).await })
            .await
            .map_err(lost_task)??
    };
    let raw = if spec.raw_listen {
        Some(RawListener::start(&spec.db, clock, run, publishers).await?)
    } else {
        None
    };

    let watch_stop = CancellationToken::new();
    let watcher = match (&raw, &status, spec.messages) {
        (Some(_), Some(status), Some(messages)) => match status.forwarded().await {
            Ok(before) => Some(pg.spawn(watch_forwarded(
                status.clone(),
                clock,
                before + messages,
                watch_stop.clone(),
            ))),
            Err(why) => {
                report.notes.push(format!(
                    "{}: {why}; the receiver is timed by the first client",
                    status.display()
                ));
                None
            }
        },
        _ => None,
    };

    let listener_before = match &status {
        Some(status) => listener_state(status).await,
        None => None,
    };
    let history_bytes_before = match (&status, spec.history_bound) {
        (Some(status), Some(_)) => status.document().await.ok(),
        _ => None,
    }
    .and_then(|doc| doc["history_bytes"].as_u64());
    let server_before = sample_server(pid)?;
    let own_before = procstat::own();
    let machine_before = procstat::machine();
    let wall = Instant::now();
    let sampler_stop = CancellationToken::new();
    let sampler = match (spec.soak, pid) {
        (Some((interval, _)), Some(pid)) => Some(tokio::spawn(sample_rss(
            pid,
            interval,
            sampler_stop.clone(),
        ))),
        _ => None,
    };

    let plan = Plan {
        messages: spec.messages,
        duration: spec.duration,
        rate: spec.load.rate,
        batch: spec.load.batch(),
        payload_size: spec.load.payload_size,
        survive: false,
    };
    let flow = report.settings.window.map(|window| {
        let shared = shared.clone();
        Arc::new(Flow {
            window,
            delivered: Box::new(move || shared.min_progress()),
        })
    });
    let counters = Arc::new(Counters::default());
    let side = match (spec.side, &target) {
        (Some(side), Some(target)) => Some(Side::start(
            side,
            target,
            status.as_ref(),
            clock,
            &shared,
            &counters,
        )?),
        _ => None,
    };
    let published = {
        let db = spec.db.clone();
        pg.spawn(
            async move { publisher::run(&db, db_clients, plan, clock, run, flow, counters).await },
        )
        .await
        .map_err(lost_task)??
    };
    let drain_timed_out = drain(
        &shared,
        raw.as_ref().map(|r| r.progress.as_ref()),
        published.total,
        spec.load.drain_timeout,
    )
    .await;

    if let Some(side) = side {
        side.finish(&mut report).await;
    }
    watch_stop.cancel();
    let receiver_done = match watcher {
        Some(watcher) => watcher.await.ok().flatten(),
        None => None,
    };

    let server_after = sample_server(pid)?;
    let own_after = procstat::own();
    let machine_after = procstat::machine();
    let wall_s = wall.elapsed().as_secs_f64();
    sampler_stop.cancel();
    if let (Some(status), Some((epoch_before, reconnects_before))) = (&status, listener_before) {
        if let Some((epoch_after, reconnects_after)) = listener_state(status).await {
            let check = ListenerCheck {
                epoch_before,
                epoch_after,
                reconnects: reconnects_before
                    .zip(reconnects_after)
                    .map(|(before, after)| after - before),
            };
            if !check.held() {
                report.problems.push(format!(
                    "the server's LISTEN connection did not hold: {}",
                    check.text()
                ));
            }
            report.listener = Some(check);
        }
    }
    if let (Some(status), Some(bound)) = (&status, spec.history_bound) {
        let doc = status.document().await.ok();
        let field = |name: &str| doc.as_ref().and_then(|d| d[name].as_u64());
        let rss = |s: Option<ProcSample>| s.map(|s| s.rss_kib);
        let fill = HistoryFill {
            bound_bytes: bound,
            published: published.total,
            history_bytes_before,
            history_bytes_after: field("history_bytes"),
            history_messages_after: field("history_messages"),
            rss_before_kib: rss(server_before),
            rss_after_kib: rss(server_after),
            rss_growth_per_bound: server_before
                .zip(server_after)
                .map(|(b, a)| (a.rss_kib as f64 - b.rss_kib as f64) * 1024.0 / bound as f64),
        };
        if !fill.at_bound(HistoryFill::largest_message(spec.load.payload_size)) {
            report.problems.push(format!(
                "the history did not fill to its bound: {} of {bound} bytes",
                fill.history_bytes_after
                    .map_or("not reported".to_owned(), |b| b.to_string())
            ));
        }
        report.history = Some(fill);
    }
    if let (Some(sampler), Some((interval, warmup))) = (sampler, spec.soak) {
        let samples = sampler.await.unwrap_or_default();
        report.soak = Some(soak_summary(samples, interval, warmup));
    }

    if spec.stuck > 0 {
        let deadline = Instant::now() + spec.stuck_wait;
        let ends =
            futures::future::join_all(stuck.iter_mut().map(|ws| clients::stuck_end(ws, deadline)))
                .await;
        drop(stuck);
        let closed = ends.iter().filter(|e| **e != ClientEnd::Open).count();
        let mut server_clients_after = None;
        if let Some(status) = &status {
            // A kicked client leaves the server's count once its close completes.
            let until = Instant::now() + Duration::from_secs(5);
            while let Ok(count) = status.clients().await {
                server_clients_after = Some(count);
                if count <= readers.len() as u64 || Instant::now() >= until {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if closed < spec.stuck {
            report.problems.push(format!(
                "{} of {} stuck clients still open",
                spec.stuck - closed,
                spec.stuck
            ));
        }
        report.stuck = Some(Stuck {
            count: spec.stuck,
            closed,
            ends: summarise(ends.iter().map(describe)),
            server_clients_after,
        });
    }

    shared.stop.cancel();
    let results = collect(readers).await;
    // The readers have flushed their latencies: split them at the storm's bounds.
    if let (Some(storm), Some(phases)) = (&mut report.accept_storm, &shared.phases) {
        let [before, during, after] =
            std::array::from_fn(|i| Percentiles::of(&phases.latency[i].merged()));
        storm.delivery = PhaseLatency {
            before,
            during,
            after,
            ..PhaseLatency::default()
        };
    }
    let raw_result = match raw {
        Some(raw) => Some(raw.finish().await),
        None => None,
    };

    let first_send = published.first_send_ns;
    let per_pub = published.per_publisher.clone();
    let mut total = Counts::default();
    let (mut pings, mut other, mut complete, mut with_loss) = (0, 0, 0, 0);
    let (mut first_done, mut last_done, mut last_arrival) = (u64::MAX, 0u64, 0u64);
    let (mut min_d, mut max_d) = (u64::MAX, 0u64);
    let mut closes = Vec::new();
    let mut positions: Option<Positions> = None;
    for r in &results {
        if let Some(track) = &r.positions {
            positions
                .get_or_insert_with(Positions::default)
                .add(&track.counts);
        }
        let c = Counts::from_states(&r.states, &per_pub);
        total.add(&c);
        pings += r.pings;
        other += r.other;
        if c.lost == 0 {
            complete += 1;
            first_done = first_done.min(r.last_new_ns);
            last_done = last_done.max(r.last_new_ns);
        } else {
            with_loss += 1;
        }
        last_arrival = last_arrival.max(r.last_new_ns);
        min_d = min_d.min(c.delivered);
        max_d = max_d.max(c.delivered);
        if r.end != ClientEnd::Open {
            closes.push(describe(&r.end));
        }
        if spec.output.per_client {
            report.clients.push(ClientRow {
                id: r.id,
                counts: c,
                pings: r.pings,
                other: r.other,
                end: describe(&r.end),
            });
        }
    }
    let span_s = |end_ns: u64| end_ns.saturating_sub(first_send) as f64 / 1e9;
    let delivered = total.delivered;
    if !results.is_empty() {
        let elapsed_s = span_s(last_arrival);
        report.delivery = Some(Delivery {
            published: published.total,
            expected: published.total * results.len() as u64,
            counts: total,
            pings,
            other,
            clients_complete: complete,
            clients_with_loss: with_loss,
            clients_closed: closes.len(),
            closes: summarise(closes.iter().cloned()),
            min_client_delivered: if min_d == u64::MAX { 0 } else { min_d },
            max_client_delivered: max_d,
            elapsed_s,
            frames_per_s: if elapsed_s > 0.0 {
                delivered as f64 / elapsed_s
            } else {
                0.0
            },
            drain_timed_out,
            positions: positions.clone(),
        });
        report.latency = Some(Percentiles::of(&shared.latency.merged()));
        if let Some(p) = positions.filter(|p| !p.is_clean()) {
            report.problems.push(format!(
                "positions: {} gaps, {} repeats, {} resets, {} epoch changes",
                p.gaps, p.repeats, p.resets, p.epoch_changes
            ));
        }
        if !total.is_clean() {
            report.problems.push(format!(
                "clients: {} lost, {} duplicated, {} out of order",
                total.lost, total.duplicated, total.out_of_order
            ));
        }
        if !closes.is_empty() {
            report.problems.push(format!(
                "{} reading clients were closed during the run",
                closes.len()
            ));
        }
    }
    if drain_timed_out {
        report.problems.push(format!(
            "gave up waiting for missing frames after {:?} without progress",
            spec.load.drain_timeout
        ));
    }
    if let Some(raw) = raw_result {
        let counts = Counts::from_states(&raw.states, &per_pub);
        let elapsed_s = span_s(raw.last_new_ns);
        if !counts.is_clean() || raw.error.is_some() {
            report.problems.push(format!(
                "raw listener: {} lost{}",
                counts.lost,
                raw.error
                    .as_ref()
                    .map(|e| format!(", {e}"))
                    .unwrap_or_default()
            ));
        }
        let raw_rate = if elapsed_s > 0.0 {
            counts.delivered as f64 / elapsed_s
        } else {
            0.0
        };
        if complete > 0 && counts.lost == 0 {
            let first_client_s = span_s(first_done);
            let receiver_s = receiver_done.map(span_s);
            let server_s = receiver_s.unwrap_or(first_client_s);
            let server_rate = if server_s > 0.0 {
                published.total as f64 / server_s
            } else {
                0.0
            };
            report.receiver = Some(KeepUp {
                messages: published.total,
                raw_done_ms: elapsed_s * 1e3,
                receiver_done_ms: receiver_s.map(|s| s * 1e3),
                first_client_done_ms: first_client_s * 1e3,
                last_client_done_ms: span_s(last_done) * 1e3,
                raw_msgs_per_s: raw_rate,
                server_msgs_per_s: server_rate,
                ratio: if raw_rate > 0.0 {
                    server_rate / raw_rate
                } else {
                    0.0
                },
            });
        }
        report.raw_listen = Some(RawListen {
            counts,
            elapsed_s,
            msgs_per_s: raw_rate,
            latency: Percentiles::of(&raw.latency),
            error: raw.error,
            cpu_s: raw.cpu_s,
        });
    }
    report.server = ServerUse::between(pid, server_before, server_after, Some(delivered));
    OwnUse {
        own: (own_before, own_after),
        machine: (machine_before, machine_after),
        wall_s,
    }
    .record(&mut report, spec.output.threads, Some(delivered));
    report.published = Some(published);
    Ok(report)
}

async fn idle(args: IdleArgs) -> Result<Report, BenchError> {
    args.clients.check(false)?;
    args.output.check()?;
    let pid = args.server.server_pid;
    check_server_pid(pid)?;
    let n = args.clients.clients;
    let clock = Clock::new();
    let run: u32 = rand::random();
    let mut report = Report {
        mode: "idle".to_owned(),
        run,
        settings: Settings::of_clients(&args.server.url, &args.clients, args.output.threads),
        cpus: cpus(),
        ..Report::default()
    };
    let target = Target::resolve(&args.server.url, args.clients.read_buffer)
        .await?
        .with_format(args.clients.format);
    let status = status_url(&args.server)?;
    let server_before = sample_server(pid)?;
    let own_before = procstat::own();
    let machine_before = procstat::machine();
    let wall = Instant::now();

    let (connected, stats) = clients::open_all(
        &target,
        0,
        n,
        args.clients.connect_concurrency,
        &Dial::default(),
    )
    .await;
    if connected.is_empty() {
        return Err(BenchError::Server {
            url: args.server.url.clone(),
            cause: stats.first_error.unwrap_or_default(),
        });
    }
    let count = connected.len();
    if stats.failed > 0 {
        report
            .problems
            .push(format!("{} clients could not connect", stats.failed));
    }
    report.connect = Some(stats);
    let shared = Arc::new(Shared::new(run, clock, 1, n));
    let readers: Vec<_> = connected
        .into_iter()
        .map(|(id, conn)| tokio::spawn(clients::read(id, conn, shared.clone())))
        .collect();
    let mut registered = None;
    if let Some(status) = &status {
        match status.wait_for_clients(count as u64, REGISTER_LIMIT).await {
            Ok(seen) => registered = Some(seen),
            Err(why) => report.notes.push(format!("{}: {why}", status.display())),
        }
    }
    tokio::time::sleep(args.settle).await;

    let server_after = sample_server(pid)?;
    let own_after = procstat::own();
    let machine_after = procstat::machine();
    let wall_s = wall.elapsed().as_secs_f64();
    shared.stop.cancel();
    let results = collect(readers).await;
    let closes: Vec<String> = results
        .iter()
        .filter(|r| r.end != ClientEnd::Open)
        .map(|r| describe(&r.end))
        .collect();
    if !closes.is_empty() {
        report.problems.push(format!(
            "{} clients were closed while idle ({})",
            closes.len(),
            summarise(closes).join(", ")
        ));
    }
    let per_client = |before: u64, after: u64| (after as f64 - before as f64) / count as f64;
    report.idle = Some(Idle {
        clients: count,
        registered,
        settle_s: args.settle.as_secs_f64(),
        rss_before_kib: server_before.map(|s| s.rss_kib),
        rss_after_kib: server_after.map(|s| s.rss_kib),
        rss_per_client_kib: server_before
            .zip(server_after)
            .map(|(b, a)| per_client(b.rss_kib, a.rss_kib)),
        generator_rss_per_client_kib: per_client(own_before.rss_kib, own_after.rss_kib),
    });
    report.server = ServerUse::between(pid, server_before, server_after, None);
    OwnUse {
        own: (own_before, own_after),
        machine: (machine_before, machine_after),
        wall_s,
    }
    .record(&mut report, args.output.threads, None);
    Ok(report)
}

/// The generator's own readings and the machine's at the start of a measured period.
pub(super) struct OwnStart {
    own: procstat::ProcSample,
    machine: procstat::MachineTicks,
    wall: Instant,
}

impl OwnStart {
    pub(super) fn now() -> OwnStart {
        OwnStart {
            own: procstat::own(),
            machine: procstat::machine(),
            wall: Instant::now(),
        }
    }

    /// Ends the period now.
    pub(super) fn end(self) -> OwnUse {
        OwnUse {
            own: (self.own, procstat::own()),
            machine: (self.machine, procstat::machine()),
            wall_s: self.wall.elapsed().as_secs_f64(),
        }
    }
}

/// The generator's own readings and the machine's, before and after a measured period.
pub(super) struct OwnUse {
    pub own: (procstat::ProcSample, procstat::ProcSample),
    pub machine: (procstat::MachineTicks, procstat::MachineTicks),
    pub wall_s: f64,
}

impl OwnUse {
    /// Fills the report's generator and machine figures; with `frames`, the generator's CPU
    /// per frame too.
    pub(super) fn record(&self, report: &mut Report, threads: usize, frames: Option<u64>) {
        let (before, after) = self.own;
        let cpu_s = after.cpu_s - before.cpu_s;
        report.generator = GeneratorUse {
            threads,
            cpu_s,
            wall_s: self.wall_s,
            cpu_pct_of_core: if self.wall_s > 0.0 {
                cpu_s * 100.0 / self.wall_s
            } else {
                0.0
            },
            rss_kib: after.rss_kib,
            cpu_us_per_frame: frames.filter(|&n| n > 0).map(|n| cpu_s * 1e6 / n as f64),
        };
        let (m_before, m_after) = self.machine;
        report.machine_busy_pct = procstat::busy_percent(m_before, m_after);
        report.irq_pct_of_core = procstat::irq_percent(m_before, m_after) * report.cpus as f64;
        report.others_pct_of_core = others_pct(report);
    }
}

/// What neither the server, the generator nor interrupts used of the busy CPU time, in percent
/// of one core (the server counts only when its PID was given).
pub(super) fn others_pct(report: &Report) -> f64 {
    let wall = report.generator.wall_s;
    if wall <= 0.0 {
        return 0.0;
    }
    let busy_cores = report.machine_busy_pct / 100.0 * report.cpus as f64;
    let irq = report.irq_pct_of_core / 100.0;
    let server = report.server.as_ref().map_or(0.0, |s| s.cpu_s / wall);
    let generator = report.generator.cpu_s / wall;
    ((busy_cores - irq - server - generator) * 100.0).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soak_growth_after_warmup() {
        let samples = vec![
            (0.0, 1000),
            (5.0, 5000),
            (10.0, 6000),
            (15.0, 6100),
            (20.0, 6060),
        ];
        let s = soak_summary(samples, Duration::from_secs(5), Duration::from_secs(10));
        assert_eq!((s.first_kib, s.last_kib, s.max_kib), (6000, 6060, 6100));
        assert_eq!(s.growth_kib, 60);
        assert!((s.growth_pct - 1.0).abs() < 1e-9);
        // Three samples after warm-up: a third is one sample each.
        assert_eq!(
            (s.first_third_mean_kib, s.last_third_mean_kib),
            (6000.0, 6060.0)
        );
    }

    #[test]
    fn ends_are_counted_together() {
        let ends = [
            ClientEnd::Closed {
                code: Some(1008),
                reason: String::new(),
            },
            ClientEnd::Closed {
                code: Some(1008),
                reason: String::new(),
            },
            ClientEnd::Open,
        ];
        assert_eq!(
            summarise(ends.iter().map(describe)),
            vec!["2× close 1008".to_owned(), "1× open".to_owned()]
        );
    }
}
