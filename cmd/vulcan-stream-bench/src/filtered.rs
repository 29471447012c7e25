//! `isolation` and `targeted`: what several channels and server-side filters cost the clients
//! they are not for.
//!
//! - `isolation`: clients on two channels of one server. The quiet channel gets a steady modest
//!   rate throughout; the flooded channel gets nothing, then as much as one publisher drives
//!   (held back only by its own clients' window, so that they are never closed as slow), then
//!   nothing again. The figure is the quiet channel's p99 while the other floods against its
//!   p99 before the flood, in the same run: one busy channel must not slow the others.
//! - `targeted`: N clients each filtered on an `agent_id` of its own and a publisher sending
//!   messages each addressed to one random agent at a steady rate. The server's CPU per
//!   targeted message is measured over a window without anything else, then broadcasts (no
//!   `agent_id`, so for everyone) go out beside the targeted traffic and their time to reach all
//!   N is compared with the same broadcasts to N unfiltered clients, connected first in the same
//!   run. Every agent must get exactly its own messages and every broadcast.
//!
//! `targeted` keeps every frame a client reads (publisher, sequence, send and read time) rather
//! than per-publisher sequence state: a filtered client sees a sparse subset of a sequence, and
//! only the list of who was sent what tells a lost message from one delivered to the wrong agent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Args;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::clients::{self, ClientEnd, ConnectStats, Dial, Shared, Target, Ws};
use crate::db::Db;
use crate::error::BenchError;
use crate::listen::RawListener;
use crate::options::{self, ClientArgs, DbArgs, OutputArgs, ServerArgs, parse_duration};
use crate::payload::{self, Clock, Parsed, Stamp};
use crate::procstat;
use crate::publisher::{self, Counters, Flow, Plan, Published};
use crate::report::{Report, ServerUse, Settings, fmt_int, fmt_us};
use crate::scenario::{self, OwnUse, REGISTER_LIMIT, cpus};
use crate::stats::{Counts, Percentiles, new_histogram};
use crate::status::StatusUrl;
use crate::storm;

/// `isolation`'s publishers: each has a sequence of its own.
const FLOOD: usize = 0;
const QUIET: usize = 1;

/// `targeted`'s publishers.
const TARGETED: u32 = 0;
const BROADCAST: u32 = 1;
const BASELINE: u32 = 2;
/// Targeted messages sent beside the broadcasts, apart from the measured window's.
const BESIDE: u32 = 3;

/// Room for the stamp at its longest and `,"agent_id":"agent-4294967295"`.
const ADDRESSED_MIN_SIZE: usize = payload::MIN_SIZE + 32;

/// The quiet channel's p99 during the flood may be at most this many times its p99 before.
pub const ISOLATION_RATIO: f64 = 2.0;
/// Server CPU per targeted message, in microseconds.
pub const TARGETED_CPU_US: f64 = 10.0;
/// p99 NOTIFY → frame of a targeted message, in milliseconds.
pub const TARGETED_P99_MS: f64 = 5.0;
/// A broadcast to filtered clients is "as fast" as to unfiltered ones when its median time to
/// reach all of them is at most this many times theirs (the two are measured seconds apart on
/// a machine the generator shares).
pub const BROADCAST_RATIO: f64 = 1.25;

#[derive(Debug, Clone, Args)]
pub struct IsolationArgs {
    /// The server; the flooded channel's clients use --url as it is, the quiet channel's add
    /// `channel=` to it.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Clients on each channel (--clients).
    #[command(flatten)]
    pub clients: ClientArgs,
    /// --channel is the flooded channel.
    #[command(flatten)]
    pub db: DbArgs,
    /// The quiet channel; the server must carry it (PG_CHANNELS).
    #[arg(long, default_value = "quiet")]
    pub quiet_channel: String,
    /// Messages per second on the quiet channel, one per statement, throughout.
    #[arg(long, default_value_t = 100.0)]
    pub quiet_rate: f64,
    /// Length of each of the three phases: quiet alone, the flood beside it, quiet alone.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub phase: Duration,
    /// Notifications per statement of the flood.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// The flood waits while its slowest client is more than this many messages behind
    /// (below the server's client queue, so that nobody is closed as too slow).
    #[arg(long, default_value_t = 512)]
    pub window: u64,
    /// Bytes per payload.
    #[arg(long, default_value_t = 200)]
    pub payload_size: usize,
    /// After publishing, give up waiting for missing frames after this long without progress.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub drain_timeout: Duration,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Clone, Args)]
pub struct TargetedArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The agents (--clients): client i reads with `?agent_id=agent-i`; as many unfiltered
    /// clients read the baseline broadcasts first.
    #[command(flatten)]
    pub clients: ClientArgs,
    #[command(flatten)]
    pub db: DbArgs,
    /// Targeted messages per second, one per statement, each to a random agent.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// The measured window of targeted messages alone.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Broadcasts, to the unfiltered clients and again to the agents beside targeted traffic.
    #[arg(long, default_value_t = 10)]
    pub broadcasts: u64,
    /// Time between two broadcasts.
    #[arg(long, value_parser = parse_duration, default_value = "300ms")]
    pub broadcast_interval: Duration,
    /// With the agents connected and nothing published, read the server's CPU for this long:
    /// what heartbeats cost it, shown beside the CPU per message (0s: skip).
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pub idle: Duration,
    /// Bytes per payload.
    #[arg(long, default_value_t = 200)]
    pub payload_size: usize,
    /// After publishing, give up waiting for missing frames after this long without progress.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub drain_timeout: Duration,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `isolation`'s figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Isolation {
    pub clients_per_channel: usize,
    pub flooded_channel: String,
    pub quiet_channel: String,
    pub quiet_rate: f64,
    pub phase_s: f64,
    /// The flood: committed messages and their rate.
    pub flood_messages: u64,
    pub flood_rate: f64,
    /// Frames per second the flooded channel's clients were sent during the flood.
    pub flood_frames_per_s: f64,
    /// The quiet channel's NOTIFY → frame latency by when each message was sent.
    pub quiet_before: Percentiles,
    pub quiet_during: Percentiles,
    pub quiet_after: Percentiles,
    /// p99 during the flood over p99 before.
    pub p99_ratio: Option<f64>,
    /// A bare LISTEN connection on the quiet channel, in the generator, with no server in
    /// between: what PostgreSQL itself delivers before and during the flood. All channels
    /// share PostgreSQL's one notification queue, so this is the floor of any LISTEN bridge.
    #[serde(default)]
    pub raw_before: Option<Percentiles>,
    #[serde(default)]
    pub raw_during: Option<Percentiles>,
    pub flooded_counts: Counts,
    pub quiet_counts: Counts,
    /// Frames of the other channel's publisher that a client received.
    pub crossed: u64,
    pub closes: Vec<String>,
}

impl Isolation {
    /// The bare listener's p99 before and during the flood, for the target row.
    fn raw_text(&self) -> String {
        match (&self.raw_before, &self.raw_during) {
            (Some(before), Some(during)) if before.count > 0 && during.count > 0 => format!(
                "; a bare LISTEN on the quiet channel, no server: p99 {} vs {} ({:.2}×)",
                fmt_us(during.p99_us),
                fmt_us(before.p99_us),
                during.p99_us / before.p99_us.max(1.0)
            ),
            _ => String::new(),
        }
    }
}

/// Broadcasts and the time each took to reach every client.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reach {
    pub sent: u64,
    /// Broadcasts that reached every client.
    pub reached_all: u64,
    /// NOTIFY → frame read by the last client, per broadcast that reached all.
    pub to_all: Percentiles,
}

/// `targeted`'s figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Targeted {
    pub clients: usize,
    pub connect: ConnectStats,
    pub rate: f64,
    /// The measured window: targeted messages alone.
    pub messages: u64,
    pub window_s: f64,
    pub latency: Percentiles,
    pub server_cpu_s: f64,
    pub cpu_us_per_message: Option<f64>,
    /// The server's CPU per second with the agents connected and nothing published, and what
    /// that share of the window comes to per message.
    pub idle_cpu_ms_per_s: Option<f64>,
    pub idle_us_per_message: Option<f64>,
    /// Targeted messages sent beside the broadcasts, and their latency.
    pub beside_messages: u64,
    pub beside_latency: Percentiles,
    /// The same broadcasts to as many unfiltered clients, then to the agents.
    pub baseline: Reach,
    pub filtered: Reach,
    /// Median time to all, the agents' over the unfiltered clients'.
    pub broadcast_ratio: Option<f64>,
    /// Targeted messages no client got, got twice, or got by an agent they were not for.
    pub targeted_lost: u64,
    pub targeted_duplicated: u64,
    pub misdelivered: u64,
    pub broadcast_lost: u64,
    pub broadcast_duplicated: u64,
    /// Frames of this run that no publisher of the phase sent (e.g. a baseline broadcast read
    /// by an agent).
    pub unexpected: u64,
    pub closes: Vec<String>,
}

pub async fn isolation(args: IsolationArgs, pg: Handle) -> Result<Report, BenchError> {
    args.clients.check(false)?;
    args.clients.check_legacy("isolation")?;
    args.output.check()?;
    options::check_payload_size(args.payload_size)?;
    if !(args.quiet_rate.is_finite() && args.quiet_rate > 0.0) || args.phase.is_zero() {
        return usage("--quiet-rate and --phase must be positive");
    }
    if !(1..=100_000).contains(&args.batch) {
        return usage("--batch must be between 1 and 100000");
    }
    let pid = args.server.server_pid;
    scenario::check_server_pid(pid)?;
    let status = needs_status(&args.server, "isolation")?;
    notify_only(&args.db, "isolation")?;
    let flood_db = Db::new(args.db.db.as_deref(), args.db.channel.as_deref())?;
    let quiet_db = Db::new(args.db.db.as_deref(), Some(&args.quiet_channel))?;
    if flood_db.channel == quiet_db.channel {
        return usage("--quiet-channel must differ from the flooded --channel");
    }
    let n = args.clients.clients;
    let clock = Clock::new();
    let run: u32 = rand::random();
    let mut report = Report {
        mode: "isolation".to_owned(),
        run,
        settings: Settings {
            channel: Some(flood_db.channel.clone()),
            publishers: 2,
            batch: args.batch,
            payload_size: args.payload_size,
            window: Some(args.window),
            ..Settings::of_clients(&args.server.url, &args.clients, args.output.threads)
        },
        cpus: cpus(),
        ..Report::default()
    };
    let flood_target = Target::resolve(&args.server.url, args.clients.read_buffer).await?;
    let quiet_target = flood_target.with_query("channel", &args.quiet_channel);
    let dial = Dial::recv_buffer(args.clients.recv_buffer);
    let flooded = Arc::new(Shared::new(run, clock, 2, n));
    let quiet = Arc::new(Shared::with_phases(run, clock, 2, n));
    // The quiet channel's clients connect and read on a runtime of their own: on the flooded
    // clients' workers, their frames would wait behind the flood's in the generator itself.
    let side = Side(Some(storm::side_runtime("quiet").map_err(BenchError::Run)?));
    let mut readers = Vec::with_capacity(2);
    for (target, shared, runtime) in [
        (&flood_target, &flooded, Handle::current()),
        (&quiet_target, &quiet, side.handle()),
    ] {
        let (target, shared, dial) = (target.clone(), shared.clone(), dial.clone());
        let concurrency = args.clients.connect_concurrency;
        let (set, stats) = runtime
            .spawn(async move {
                let (connected, stats) = clients::open_all(&target, 0, n, concurrency, &dial).await;
                let set: Vec<_> = connected
                    .into_iter()
                    .map(|(id, conn)| tokio::spawn(clients::read(id, conn, shared.clone())))
                    .collect();
                (set, stats)
            })
            .await
            .map_err(|err| BenchError::Run(format!("connecting failed: {err}")))?;
        all_connected(&args.server.url, n, &stats)?;
        readers.push(set);
    }
    status
        .wait_for_clients(2 * n as u64, REGISTER_LIMIT)
        .await
        .map_err(|why| BenchError::Run(format!("{}: {why}", status.display())))?;

    let plan = |rate: Option<f64>, batch: usize| Plan {
        messages: None,
        // An upper bound: the quiet publisher is stopped once the third phase is over.
        duration: Some(if rate.is_some() {
            args.phase * 4
        } else {
            args.phase
        }),
        rate,
        batch,
        payload_size: args.payload_size,
        survive: false,
    };
    let quiet_counters = Arc::new(Counters::default());
    let raw_before = RawListener::start(&quiet_db, clock, run, 2).await?;
    let quiet_publisher = {
        let (db, counters) = (quiet_db.clone(), quiet_counters.clone());
        let plan = plan(Some(args.quiet_rate), 1);
        pg.spawn(async move {
            let conns = publisher::connect(&db, 1).await?;
            publisher::run_as(&db, conns, plan, clock, run, QUIET as u32, None, counters).await
        })
    };
    tokio::time::sleep(args.phase).await;

    let phases = quiet.phases.as_ref().expect("made with phases");
    let flood_conns = {
        let db = flood_db.clone();
        pg.spawn(async move { publisher::connect(&db, 1).await })
            .await
            .map_err(scenario::lost_task)??
    };
    let flow = Arc::new(Flow {
        window: args.window,
        delivered: Box::new({
            let flooded = flooded.clone();
            move || flooded.min_progress()
        }),
    });
    let server_before = scenario::sample_server(pid)?;
    let own_before = procstat::own();
    let machine_before = procstat::machine();
    let wall = Instant::now();
    let raw_before = raw_before.finish().await;
    let raw_during = RawListener::start(&quiet_db, clock, run, 2).await?;
    let flood_start = clock.now_ns();
    phases.begin(1, flood_start);
    let flood = {
        let db = flood_db.clone();
        let plan = plan(None, args.batch);
        let counters = Arc::new(Counters::default());
        pg.spawn(async move {
            publisher::run_as(
                &db,
                flood_conns,
                plan,
                clock,
                run,
                FLOOD as u32,
                (args.window > 0).then_some(flow),
                counters,
            )
            .await
        })
        .await
        .map_err(scenario::lost_task)??
    };
    let flood_end = clock.now_ns();
    phases.begin(2, flood_end);
    let raw_during = raw_during.finish().await;
    let server_after = scenario::sample_server(pid)?;
    let own_after = procstat::own();
    let machine_after = procstat::machine();
    let wall_s = wall.elapsed().as_secs_f64();
    tokio::time::sleep(args.phase).await;
    quiet_counters.stop.store(true, Ordering::Relaxed);
    let quiet_published = quiet_publisher.await.map_err(scenario::lost_task)??;

    let flood_timed_out = scenario::drain(&flooded, None, flood.total, args.drain_timeout).await;
    let quiet_timed_out =
        scenario::drain(&quiet, None, quiet_published.total, args.drain_timeout).await;
    flooded.stop.cancel();
    quiet.stop.cancel();
    let mut sets = Vec::with_capacity(2);
    for set in readers {
        sets.push(scenario::collect(set).await);
    }
    drop(side);

    let mut closes = Vec::new();
    let mut counted = [Counts::default(), Counts::default()];
    let mut crossed = 0;
    let published = [flood.total, quiet_published.total];
    for (own, results) in [FLOOD, QUIET].into_iter().zip(&sets) {
        for result in results {
            counted[own].add(&Counts::from_states(
                &result.states[own..=own],
                &published[own..=own],
            ));
            crossed += result.states[1 - own].unique;
            if result.end != ClientEnd::Open {
                closes.push(scenario::describe(&result.end));
            }
        }
        counted[own].lost += (n - results.len()) as u64 * published[own];
    }
    let latency = |phase: usize| Percentiles::of(&phases.latency[phase].merged());
    let flood_s = flood_end.saturating_sub(flood_start) as f64 / 1e9;
    let isolation = Isolation {
        clients_per_channel: n,
        flooded_channel: flood_db.channel.clone(),
        quiet_channel: quiet_db.channel.clone(),
        quiet_rate: args.quiet_rate,
        phase_s: args.phase.as_secs_f64(),
        flood_messages: flood.total,
        flood_rate: flood.rate,
        flood_frames_per_s: if flood_s > 0.0 {
            (flood.total * n as u64) as f64 / flood_s
        } else {
            0.0
        },
        quiet_before: latency(0),
        quiet_during: latency(1),
        quiet_after: latency(2),
        p99_ratio: None,
        raw_before: raw_before
            .error
            .is_none()
            .then(|| Percentiles::of(&raw_before.latency)),
        raw_during: raw_during
            .error
            .is_none()
            .then(|| Percentiles::of(&raw_during.latency)),
        flooded_counts: counted[FLOOD],
        quiet_counts: counted[QUIET],
        crossed,
        closes: scenario::summarise(closes),
    };
    let isolation = Isolation {
        p99_ratio: (isolation.quiet_before.count > 0 && isolation.quiet_during.count > 0)
            .then(|| isolation.quiet_during.p99_us / isolation.quiet_before.p99_us.max(1.0)),
        ..isolation
    };
    if flood_timed_out || quiet_timed_out {
        report
            .problems
            .push("not every frame arrived before the drain timeout".to_owned());
    }
    isolation_problems(&isolation, &mut report.problems);
    report.latency = Some(isolation.quiet_during);
    report.published = Some(Published {
        per_publisher: published.to_vec(),
        total: published.iter().sum(),
        statements: flood.statements + quiet_published.statements,
        ..flood
    });
    report.server = ServerUse::between(
        pid,
        server_before,
        server_after,
        Some(flood.total * n as u64),
    );
    report.isolation = Some(isolation);
    OwnUse {
        own: (own_before, own_after),
        machine: (machine_before, machine_after),
        wall_s,
    }
    .record(&mut report, args.output.threads, None);
    Ok(report)
}

/// A runtime beside the main one, shut down without waiting when dropped (what an async
/// context allows), on every way out of the run.
struct Side(Option<tokio::runtime::Runtime>);

impl Side {
    fn handle(&self) -> Handle {
        self.0
            .as_ref()
            .expect("present until dropped")
            .handle()
            .clone()
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

fn isolation_problems(i: &Isolation, problems: &mut Vec<String>) {
    for (channel, counts) in [
        (&i.flooded_channel, &i.flooded_counts),
        (&i.quiet_channel, &i.quiet_counts),
    ] {
        if !counts.is_clean() {
            problems.push(format!(
                "channel {channel}: {} lost, {} duplicated, {} out of order",
                counts.lost, counts.duplicated, counts.out_of_order
            ));
        }
    }
    if i.crossed > 0 {
        problems.push(format!(
            "{} frames reached clients of the other channel",
            i.crossed
        ));
    }
    if !i.closes.is_empty() {
        problems.push(format!("clients closed: {}", i.closes.join(", ")));
    }
    if i.quiet_before.count == 0 || i.quiet_during.count == 0 {
        problems.push("the quiet channel had no message before or during the flood".to_owned());
    }
}

/// One frame of this run as a `targeted` client read it.
#[derive(Debug, Clone, Copy)]
struct Got {
    publisher: u32,
    seq: u64,
    sent_ns: u64,
    read_ns: u64,
}

/// What a `targeted` phase's readers share: their stop, and the count of frames of this run
/// they have read together (one atomic: at most a broadcast's worth of increments at once).
struct Board {
    run: u32,
    clock: Clock,
    frames: AtomicU64,
    stop: CancellationToken,
}

impl Board {
    fn new(run: u32, clock: Clock) -> Arc<Board> {
        Arc::new(Board {
            run,
            clock,
            frames: AtomicU64::new(0),
            stop: CancellationToken::new(),
        })
    }

    /// Waits until the readers have `total` frames, or nothing arrived for `limit`; true when
    /// it gave up.
    async fn drain(&self, total: u64, limit: Duration) -> bool {
        let mut last = self.frames.load(Ordering::Relaxed);
        let mut last_change = Instant::now();
        loop {
            let now = self.frames.load(Ordering::Relaxed);
            if now >= total {
                return false;
            }
            if now != last {
                (last, last_change) = (now, Instant::now());
            } else if last_change.elapsed() >= limit {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// A `targeted` client's frames, in the order read, and how its session ended.
struct Tape {
    id: usize,
    got: Vec<Got>,
    end: ClientEnd,
}

/// Reads one websocket until the board stops, keeping every frame of this run.
async fn tape(id: usize, mut ws: Ws, board: Arc<Board>) -> Tape {
    let mut got = Vec::new();
    let stopped = board.stop.cancelled();
    tokio::pin!(stopped);
    let end = loop {
        let frame = tokio::select! {
            biased;
            _ = &mut stopped => break ClientEnd::Open,
            frame = ws.next() => frame,
        };
        let text = match frame {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(close))) => {
                break ClientEnd::Closed {
                    code: close.as_ref().map(|f| u16::from(f.code)),
                    reason: close.map(|f| f.reason.to_string()).unwrap_or_default(),
                };
            }
            Some(Ok(_)) => continue,
            Some(Err(err)) => {
                break ClientEnd::Dropped {
                    error: err.to_string(),
                };
            }
            None => {
                break ClientEnd::Dropped {
                    error: "connection closed without a close frame".to_owned(),
                };
            }
        };
        if let Parsed::Bench(Stamp {
            publisher,
            seq,
            sent_ns,
            ..
        }) = payload::parse(text.as_str(), board.run)
        {
            got.push(Got {
                publisher,
                seq,
                sent_ns,
                read_ns: board.clock.now_ns(),
            });
            board.frames.fetch_add(1, Ordering::Relaxed);
        }
    };
    Tape { id, got, end }
}

/// Connects one websocket per target (client `id` to `targets[id]`) and starts its tape.
async fn connect_tapes(
    targets: &[Target],
    concurrency: usize,
    dial: &Dial,
    board: &Arc<Board>,
) -> Result<(Vec<tokio::task::JoinHandle<Tape>>, ConnectStats), BenchError> {
    let mut readers = Vec::with_capacity(targets.len());
    let stats = clients::connect_each(targets, 0..targets.len(), concurrency, dial, |id, ws| {
        readers.push(tokio::spawn(tape(id, ws, board.clone())));
    })
    .await;
    let url = targets.first().map_or("", |t| t.url.as_str());
    all_connected(url, targets.len(), &stats)?;
    Ok((readers, stats))
}

/// What a paced publisher sent: for each sequence number, its send time and the agent it was
/// for (`None`: everyone).
#[derive(Debug, Default)]
struct Sent {
    sent_ns: Vec<u64>,
    to: Vec<Option<u32>>,
    first_ns: u64,
    last_ns: u64,
}

/// One statement per message, `count` of them (or until `stop`) at `rate`, as publisher
/// `publisher`: to a random one of `agents` agents each, or with no `agent_id` (a broadcast)
/// when `agents` is 0.
#[allow(clippy::too_many_arguments)]
async fn paced(
    db: Db,
    publisher: u32,
    agents: u32,
    count: Option<u64>,
    rate: f64,
    size: usize,
    clock: Clock,
    run: u32,
    stop: Arc<Counters>,
) -> Result<Sent, BenchError> {
    let failed = |err: tokio_postgres::Error| BenchError::Publish {
        target: db.target.clone(),
        cause: format!("{err:#}"),
    };
    let client = db.connect().await?;
    let statement = client
        .prepare("SELECT pg_notify($1, $2)")
        .await
        .map_err(failed)?;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut next = Instant::now();
    let mut sent = Sent::default();
    let mut text = String::with_capacity(size);
    let mut name = String::new();
    while count.is_none_or(|c| (sent.to.len() as u64) < c) && !stop.stop.load(Ordering::Relaxed) {
        // An absolute schedule: a late statement does not delay the ones after it.
        tokio::time::sleep_until(next).await;
        next += interval;
        let to = (agents > 0).then(|| rand::random_range(0..agents));
        name.clear();
        if let Some(agent) = to {
            use std::fmt::Write as _;
            let _ = write!(name, "agent-{agent}");
        }
        let stamp = Stamp {
            run,
            publisher,
            seq: sent.to.len() as u64,
            sent_ns: clock.now_ns(),
        };
        text.clear();
        payload::encode_addressed(
            stamp,
            to.map(|_| ("agent_id", name.as_str())),
            size,
            &mut text,
        );
        client
            .query_one(&statement, &[&db.channel, &text])
            .await
            .map_err(failed)?;
        if sent.to.is_empty() {
            sent.first_ns = stamp.sent_ns;
        }
        sent.sent_ns.push(stamp.sent_ns);
        sent.to.push(to);
        sent.last_ns = clock.now_ns();
    }
    Ok(sent)
}

/// Spawns [`paced`] on the publishers' runtime.
#[allow(clippy::too_many_arguments)]
fn spawn_paced(
    pg: &Handle,
    db: &Db,
    publisher: u32,
    agents: u32,
    count: Option<u64>,
    rate: f64,
    size: usize,
    clock: Clock,
    run: u32,
    stop: &Arc<Counters>,
) -> tokio::task::JoinHandle<Result<Sent, BenchError>> {
    let (db, stop) = (db.clone(), stop.clone());
    pg.spawn(paced(
        db, publisher, agents, count, rate, size, clock, run, stop,
    ))
}

async fn finished(
    task: tokio::task::JoinHandle<Result<Sent, BenchError>>,
) -> Result<Sent, BenchError> {
    task.await.map_err(scenario::lost_task)?
}

pub async fn targeted(args: TargetedArgs, pg: Handle) -> Result<Report, BenchError> {
    args.clients.check(false)?;
    args.clients.check_legacy("targeted")?;
    args.output.check()?;
    options::check_payload_size(args.payload_size)?;
    if args.payload_size < ADDRESSED_MIN_SIZE {
        return usage(&format!(
            "--payload-size must be at least {ADDRESSED_MIN_SIZE} bytes: the stamp and an agent_id"
        ));
    }
    if !(args.rate.is_finite() && args.rate > 0.0) || args.duration.is_zero() {
        return usage("--rate and --duration must be positive");
    }
    if args.broadcasts == 0 || args.broadcast_interval.is_zero() {
        return usage("--broadcasts and --broadcast-interval must be positive");
    }
    let n = args.clients.clients;
    let agents =
        u32::try_from(n).map_err(|_| BenchError::Usage("--clients is too large".to_owned()))?;
    let pid = args.server.server_pid;
    scenario::check_server_pid(pid)?;
    let status = needs_status(&args.server, "targeted")?;
    notify_only(&args.db, "targeted")?;
    let db = Db::new(args.db.db.as_deref(), args.db.channel.as_deref())?;
    let clock = Clock::new();
    let run: u32 = rand::random();
    let mut report = Report {
        mode: "targeted".to_owned(),
        run,
        settings: Settings {
            channel: Some(db.channel.clone()),
            publishers: 2,
            batch: 1,
            payload_size: args.payload_size,
            rate: Some(args.rate),
            ..Settings::of_clients(&args.server.url, &args.clients, args.output.threads)
        },
        cpus: cpus(),
        ..Report::default()
    };
    let target = Target::resolve(&args.server.url, args.clients.read_buffer).await?;
    let dial = Dial::recv_buffer(args.clients.recv_buffer);
    let concurrency = args.clients.connect_concurrency;
    let size = args.payload_size;
    let broadcast_rate = 1.0 / args.broadcast_interval.as_secs_f64();
    let never = Arc::new(Counters::default());
    let mut closes = Vec::new();

    // The baseline: the broadcasts to as many clients without a filter.
    let board = Board::new(run, clock);
    let (readers, _) = connect_tapes(&vec![target.clone(); n], concurrency, &dial, &board).await?;
    wait_clients(&status, n, true).await?;
    let baseline = spawn_paced(
        &pg,
        &db,
        BASELINE,
        0,
        Some(args.broadcasts),
        broadcast_rate,
        size,
        clock,
        run,
        &never,
    );
    let baseline = finished(baseline).await?;
    let mut timed_out = board
        .drain(args.broadcasts * n as u64, args.drain_timeout)
        .await;
    board.stop.cancel();
    let tapes = scenario::collect(readers).await;
    let mut check = Check::new(n);
    check.tapes(&tapes, &mut closes, |got| {
        (got.publisher == BASELINE).then_some(&baseline)
    });
    let baseline_reach = check.reach(BASELINE, &baseline);
    let baseline_lost = check.lost(&[BASELINE], &[&baseline]);
    let baseline_duplicated = check.duplicated[BASELINE as usize];
    let baseline_unexpected = check.unexpected + check.misdelivered;
    wait_clients(&status, 0, false).await?;

    // The agents.
    let board = Board::new(run, clock);
    let targets: Vec<Target> = (0..n)
        .map(|i| target.with_query("agent_id", &format!("agent-{i}")))
        .collect();
    let (readers, connect) = connect_tapes(&targets, concurrency, &dial, &board).await?;
    report.connect = Some(connect.clone());
    wait_clients(&status, n, true).await?;
    let idle = if args.idle.is_zero() {
        None
    } else {
        let before = scenario::sample_server(pid)?;
        tokio::time::sleep(args.idle).await;
        let after = scenario::sample_server(pid)?;
        before
            .zip(after)
            .map(|(b, a)| (a.cpu_s - b.cpu_s) / args.idle.as_secs_f64())
    };

    // The measured window: targeted messages alone.
    let server_before = scenario::sample_server(pid)?;
    let own_before = procstat::own();
    let machine_before = procstat::machine();
    let wall = Instant::now();
    let count = (args.rate * args.duration.as_secs_f64()).round().max(1.0) as u64;
    let alone = spawn_paced(
        &pg,
        &db,
        TARGETED,
        agents,
        Some(count),
        args.rate,
        size,
        clock,
        run,
        &never,
    );
    let alone = finished(alone).await?;
    timed_out |= board.drain(alone.to.len() as u64, args.drain_timeout).await;
    let server_after = scenario::sample_server(pid)?;
    let own_after = procstat::own();
    let machine_after = procstat::machine();
    let wall_s = wall.elapsed().as_secs_f64();

    // The broadcasts beside targeted traffic.
    let beside_stop = Arc::new(Counters::default());
    let beside = spawn_paced(
        &pg,
        &db,
        BESIDE,
        agents,
        None,
        args.rate,
        size,
        clock,
        run,
        &beside_stop,
    );
    let broadcasts = spawn_paced(
        &pg,
        &db,
        BROADCAST,
        0,
        Some(args.broadcasts),
        broadcast_rate,
        size,
        clock,
        run,
        &never,
    );
    let broadcasts = finished(broadcasts).await;
    beside_stop.stop.store(true, Ordering::Relaxed);
    let (broadcasts, beside) = (broadcasts?, finished(beside).await?);
    let total = (alone.to.len() + beside.to.len()) as u64 + broadcasts.to.len() as u64 * n as u64;
    timed_out |= board.drain(total, args.drain_timeout).await;
    board.stop.cancel();
    let tapes = scenario::collect(readers).await;

    let mut check = Check::new(n);
    check.tapes(&tapes, &mut closes, |got| match got.publisher {
        TARGETED => Some(&alone),
        BESIDE => Some(&beside),
        BROADCAST => Some(&broadcasts),
        _ => None,
    });
    let window_s = alone.last_ns.saturating_sub(alone.first_ns) as f64 / 1e9;
    let server = ServerUse::between(pid, server_before, server_after, None);
    let messages = alone.to.len() as u64;
    let per_message = |cpu_s: f64| (messages > 0).then(|| cpu_s * 1e6 / messages as f64);
    let filtered_reach = check.reach(BROADCAST, &broadcasts);
    let targeted = Targeted {
        clients: n,
        connect,
        rate: args.rate,
        messages,
        window_s,
        latency: check.latency(TARGETED),
        server_cpu_s: server.as_ref().map_or(0.0, |s| s.cpu_s),
        cpu_us_per_message: server.as_ref().and_then(|s| per_message(s.cpu_s)),
        idle_cpu_ms_per_s: idle.map(|cpu| cpu * 1e3),
        idle_us_per_message: idle.and_then(|cpu| per_message(cpu * wall_s)),
        beside_messages: beside.to.len() as u64,
        beside_latency: check.latency(BESIDE),
        broadcast_ratio: (baseline_reach.reached_all > 0 && filtered_reach.reached_all > 0)
            .then(|| filtered_reach.to_all.p50_us / baseline_reach.to_all.p50_us.max(1.0)),
        baseline: baseline_reach,
        filtered: filtered_reach,
        targeted_lost: check.lost(&[TARGETED, BESIDE], &[&alone, &beside]),
        targeted_duplicated: check.duplicated[TARGETED as usize]
            + check.duplicated[BESIDE as usize],
        misdelivered: check.misdelivered,
        broadcast_lost: check.lost(&[BROADCAST], &[&broadcasts]) + baseline_lost,
        broadcast_duplicated: check.duplicated[BROADCAST as usize] + baseline_duplicated,
        unexpected: check.unexpected + baseline_unexpected,
        closes: scenario::summarise(closes),
    };
    if timed_out {
        report
            .problems
            .push("not every frame arrived before the drain timeout".to_owned());
    }
    targeted_problems(&targeted, &mut report.problems);
    report.latency = Some(targeted.latency);
    report.server = server.map(|s| ServerUse {
        cpu_us_per_frame: targeted.cpu_us_per_message,
        ..s
    });
    report.targeted = Some(targeted);
    OwnUse {
        own: (own_before, own_after),
        machine: (machine_before, machine_after),
        wall_s,
    }
    .record(&mut report, args.output.threads, None);
    Ok(report)
}

fn targeted_problems(t: &Targeted, problems: &mut Vec<String>) {
    if t.targeted_lost + t.targeted_duplicated + t.misdelivered > 0 {
        problems.push(format!(
            "targeted messages: {} lost, {} duplicated, {} delivered to another agent",
            t.targeted_lost, t.targeted_duplicated, t.misdelivered
        ));
    }
    if t.broadcast_lost + t.broadcast_duplicated + t.unexpected > 0 {
        problems.push(format!(
            "broadcasts: {} lost, {} duplicated; {} unexpected frames",
            t.broadcast_lost, t.broadcast_duplicated, t.unexpected
        ));
    }
    if !t.closes.is_empty() {
        problems.push(format!("clients closed: {}", t.closes.join(", ")));
    }
}

/// Who got what, from the tapes of one phase.
struct Check {
    clients: usize,
    /// Per publisher: how many clients got each sequence number.
    hits: [Vec<u32>; 4],
    /// Per publisher: the latest read of each sequence number.
    last_read_ns: [Vec<u64>; 4],
    latency: [hdrhistogram::Histogram<u64>; 4],
    /// Per publisher: frames a client had already read.
    duplicated: [u64; 4],
    misdelivered: u64,
    unexpected: u64,
}

impl Check {
    fn new(clients: usize) -> Check {
        Check {
            clients,
            hits: Default::default(),
            last_read_ns: Default::default(),
            latency: std::array::from_fn(|_| new_histogram()),
            duplicated: [0; 4],
            misdelivered: 0,
            unexpected: 0,
        }
    }

    /// Counts every frame of `tapes`; `sent` names the publisher of a frame when it is one of
    /// the phase's.
    fn tapes<'s>(
        &mut self,
        tapes: &[Tape],
        closes: &mut Vec<String>,
        sent: impl Fn(&Got) -> Option<&'s Sent>,
    ) {
        for tape in tapes {
            let mut seen = std::collections::HashSet::with_capacity(tape.got.len());
            for got in &tape.got {
                let Some(by) = sent(got) else {
                    self.unexpected += 1;
                    continue;
                };
                let p = got.publisher as usize;
                let Some(to) = usize::try_from(got.seq).ok().and_then(|s| by.to.get(s)) else {
                    self.unexpected += 1;
                    continue;
                };
                if to.is_some_and(|agent| agent as usize != tape.id) {
                    self.misdelivered += 1;
                    continue;
                }
                if !seen.insert((got.publisher, got.seq)) {
                    self.duplicated[p] += 1;
                    continue;
                }
                let seq = got.seq as usize;
                if self.hits[p].len() < by.to.len() {
                    self.hits[p].resize(by.to.len(), 0);
                    self.last_read_ns[p].resize(by.to.len(), 0);
                }
                self.hits[p][seq] += 1;
                self.last_read_ns[p][seq] = self.last_read_ns[p][seq].max(got.read_ns);
                self.latency[p].saturating_record(got.read_ns.saturating_sub(got.sent_ns).max(1));
            }
            if tape.end != ClientEnd::Open {
                closes.push(scenario::describe(&tape.end));
            }
        }
    }

    fn latency(&self, publisher: u32) -> Percentiles {
        Percentiles::of(&self.latency[publisher as usize])
    }

    /// How many clients each of `sent`'s messages should have reached.
    fn wanted(&self, to: &Option<u32>) -> u32 {
        match to {
            Some(_) => 1,
            None => self.clients as u32,
        }
    }

    /// Deliveries missing: each message of `sent[i]` (by `publishers[i]`) to each client it
    /// was for. Duplicates were not counted as hits, so they cannot hide a loss.
    fn lost(&self, publishers: &[u32], sent: &[&Sent]) -> u64 {
        let mut lost = 0;
        for (&p, sent) in publishers.iter().zip(sent) {
            let hits = &self.hits[p as usize];
            for (seq, to) in sent.to.iter().enumerate() {
                let got = hits.get(seq).copied().unwrap_or(0);
                lost += u64::from(self.wanted(to).saturating_sub(got));
            }
        }
        lost
    }

    /// Each broadcast of `sent` (by `publisher`): its time from NOTIFY to its read by the
    /// last client.
    fn reach(&self, publisher: u32, sent: &Sent) -> Reach {
        let p = publisher as usize;
        let mut to_all = new_histogram();
        let mut reached_all = 0;
        for (seq, sent_ns) in sent.sent_ns.iter().enumerate() {
            let hits = self.hits[p].get(seq).copied().unwrap_or(0);
            if hits as usize >= self.clients {
                reached_all += 1;
                let last = self.last_read_ns[p][seq];
                to_all.saturating_record(last.saturating_sub(*sent_ns).max(1));
            }
        }
        Reach {
            sent: sent.to.len() as u64,
            reached_all,
            to_all: Percentiles::of(&to_all),
        }
    }
}

/// A judged row for `targets`: the target, its threshold, and what was measured with whether
/// it passed (`None` when the report lacks it).
pub type TargetRow = (&'static str, String, Option<(String, bool)>);

/// The judged rows of both modes, for `targets`.
pub fn target_rows(isolation: Option<&Report>, targeted: Option<&Report>) -> Vec<TargetRow> {
    let i = isolation.and_then(|r| r.isolation.as_ref());
    let t = targeted.and_then(|r| r.targeted.as_ref());
    vec![
        (
            "channels: quiet channel's p99 during a flood of another",
            format!("≤ {ISOLATION_RATIO}× its p99 without"),
            i.map(|i| {
                let clean = i.flooded_counts.is_clean()
                    && i.quiet_counts.is_clean()
                    && i.crossed == 0
                    && i.closes.is_empty();
                (
                    format!(
                        "{} vs {} ({}) at {} msg/s while {} flooded at {} msg/s; {}{}",
                        fmt_us(i.quiet_during.p99_us),
                        fmt_us(i.quiet_before.p99_us),
                        i.p99_ratio.map_or("n/a".to_owned(), |r| format!("{r:.2}×")),
                        i.quiet_rate,
                        i.flooded_channel,
                        fmt_int(i.flood_rate.round() as u64),
                        if clean {
                            "nothing lost or crossed"
                        } else {
                            "LOSS or crossing"
                        },
                        i.raw_text()
                    ),
                    clean && i.p99_ratio.is_some_and(|r| r <= ISOLATION_RATIO),
                )
            }),
        ),
        (
            "filters: server CPU per targeted message",
            format!("≤ {TARGETED_CPU_US} µs"),
            t.and_then(|t| {
                let cpu = t.cpu_us_per_message?;
                Some((
                    format!(
                        "{cpu:.2} µs ({} messages to {} agents{})",
                        fmt_int(t.messages),
                        fmt_int(t.clients as u64),
                        t.idle_us_per_message
                            .map(|v| format!(", of which heartbeats {v:.2} µs"))
                            .unwrap_or_default()
                    ),
                    cpu <= TARGETED_CPU_US,
                ))
            }),
        ),
        (
            "filters: p99 NOTIFY → frame of a targeted message",
            format!("≤ {TARGETED_P99_MS} ms"),
            t.map(|t| {
                let clean = t.targeted_lost + t.targeted_duplicated + t.misdelivered == 0;
                (
                    format!(
                        "{} (p50 {}); {}",
                        fmt_us(t.latency.p99_us),
                        fmt_us(t.latency.p50_us),
                        if clean {
                            "each agent got exactly its messages".to_owned()
                        } else {
                            format!(
                                "{} lost, {} duplicated, {} to another agent",
                                t.targeted_lost, t.targeted_duplicated, t.misdelivered
                            )
                        }
                    ),
                    clean && t.latency.p99_us <= TARGETED_P99_MS * 1000.0,
                )
            }),
        ),
        (
            "filters: broadcast to every agent, median time to all",
            format!("≤ {BROADCAST_RATIO}× unfiltered"),
            t.map(|t| {
                let clean = t.broadcast_lost + t.broadcast_duplicated + t.unexpected == 0
                    && t.closes.is_empty();
                (
                    format!(
                        "{} vs {} unfiltered ({}); {}",
                        fmt_us(t.filtered.to_all.p50_us),
                        fmt_us(t.baseline.to_all.p50_us),
                        t.broadcast_ratio
                            .map_or("n/a".to_owned(), |r| format!("{r:.2}×")),
                        if clean {
                            "every broadcast reached every client once".to_owned()
                        } else {
                            format!(
                                "{} lost, {} duplicated",
                                t.broadcast_lost, t.broadcast_duplicated
                            )
                        }
                    ),
                    clean && t.broadcast_ratio.is_some_and(|r| r <= BROADCAST_RATIO),
                )
            }),
        ),
    ]
}

/// The report table's rows of both modes.
pub fn table_rows(report: &Report, rows: &mut Vec<(&'static str, String)>) {
    if let Some(i) = &report.isolation {
        for (label, channel, p) in [
            ("quiet before", &i.quiet_channel, &i.quiet_before),
            ("quiet during", &i.quiet_channel, &i.quiet_during),
            ("quiet after", &i.quiet_channel, &i.quiet_after),
        ] {
            rows.push((label, format!("{channel}: {}", percentiles(p))));
        }
        rows.push((
            "flood",
            format!(
                "{}: {} messages at {} msg/s, {} frames/s to its clients",
                i.flooded_channel,
                fmt_int(i.flood_messages),
                fmt_int(i.flood_rate.round() as u64),
                fmt_int(i.flood_frames_per_s.round() as u64)
            ),
        ));
    }
    if let Some(t) = &report.targeted {
        rows.push((
            "targeted",
            format!(
                "{} messages in {:.1} s: {}",
                fmt_int(t.messages),
                t.window_s,
                percentiles(&t.latency)
            ),
        ));
        rows.push((
            "server CPU",
            format!(
                "{:.3} s: {} per targeted message; idle {}",
                t.server_cpu_s,
                t.cpu_us_per_message
                    .map_or("n/a".to_owned(), |v| format!("{v:.2} µs")),
                t.idle_cpu_ms_per_s
                    .map_or("not measured".to_owned(), |v| format!("{v:.1} ms/s"))
            ),
        ));
        rows.push((
            "beside",
            format!(
                "{} targeted beside the broadcasts: {}",
                fmt_int(t.beside_messages),
                percentiles(&t.beside_latency)
            ),
        ));
        for (label, reach) in [("broadcasts", &t.filtered), ("unfiltered", &t.baseline)] {
            rows.push((
                label,
                format!(
                    "{} of {} reached all; time to all {}",
                    reach.reached_all,
                    reach.sent,
                    percentiles(&reach.to_all)
                ),
            ));
        }
    }
}

fn percentiles(p: &Percentiles) -> String {
    format!(
        "p50 {}, p99 {}, max {} ({} samples)",
        fmt_us(p.p50_us),
        fmt_us(p.p99_us),
        fmt_us(p.max_us),
        fmt_int(p.count)
    )
}

fn needs_status(server: &ServerArgs, mode: &str) -> Result<StatusUrl, BenchError> {
    scenario::status_url(server)?.ok_or_else(|| {
        BenchError::Usage(format!(
            "{mode} reads the server's /status: give --status-url"
        ))
    })
}

fn all_connected(url: &str, wanted: usize, stats: &ConnectStats) -> Result<(), BenchError> {
    if stats.failed == 0 {
        return Ok(());
    }
    Err(BenchError::Server {
        url: url.to_owned(),
        cause: format!(
            "{} of {wanted} clients could not connect (first: {})",
            stats.failed,
            stats.first_error.clone().unwrap_or_default()
        ),
    })
}

/// Waits until the server counts `n` clients: at least (`at_least`) or at most.
async fn wait_clients(status: &StatusUrl, n: usize, at_least: bool) -> Result<(), BenchError> {
    let waited = if at_least {
        status.wait_for_clients(n as u64, REGISTER_LIMIT).await
    } else {
        status
            .wait_for_clients_at_most(n as u64, REGISTER_LIMIT)
            .await
    };
    waited
        .map(drop)
        .map_err(|why| BenchError::Run(format!("{}: {why}", status.display())))
}

/// The two modes publish with `pg_notify`: a table-mode server would not see their messages.
fn notify_only(db: &DbArgs, mode: &str) -> Result<(), BenchError> {
    match db.source {
        crate::db::Source::Notify => Ok(()),
        crate::db::Source::Table => usage(&format!("{mode} publishes with pg_notify only")),
    }
}

fn usage<T>(message: &str) -> Result<T, BenchError> {
    Err(BenchError::Usage(message.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(to: Vec<Option<u32>>) -> Sent {
        Sent {
            sent_ns: (0..to.len() as u64).map(|i| i * 1000).collect(),
            to,
            ..Sent::default()
        }
    }

    fn got(publisher: u32, seq: u64, read_ns: u64) -> Got {
        Got {
            publisher,
            seq,
            sent_ns: seq * 1000,
            read_ns,
        }
    }

    #[test]
    fn each_agent_must_get_exactly_its_messages_and_every_broadcast() {
        let targeted = sent(vec![Some(0), Some(1), Some(1)]);
        let broadcasts = sent(vec![None, None]);
        let tapes = vec![
            Tape {
                id: 0,
                // Its message, both broadcasts, and agent 1's second message.
                got: vec![
                    got(TARGETED, 0, 10),
                    got(BROADCAST, 0, 20),
                    got(BROADCAST, 1, 1500),
                    got(TARGETED, 1, 30),
                ],
                end: ClientEnd::Open,
            },
            Tape {
                id: 1,
                // One of its two messages twice, the other not at all; one broadcast.
                got: vec![
                    got(TARGETED, 2, 2500),
                    got(TARGETED, 2, 2600),
                    got(BROADCAST, 0, 40),
                    got(BASELINE, 0, 50),
                ],
                end: ClientEnd::Open,
            },
        ];
        let mut check = Check::new(2);
        let mut closes = Vec::new();
        check.tapes(&tapes, &mut closes, |g| match g.publisher {
            TARGETED => Some(&targeted),
            BROADCAST => Some(&broadcasts),
            _ => None,
        });
        assert_eq!(check.misdelivered, 1);
        assert_eq!(check.unexpected, 1);
        assert_eq!(check.lost(&[TARGETED], &[&targeted]), 1);
        assert_eq!(check.duplicated[TARGETED as usize], 1);
        assert_eq!(check.lost(&[BROADCAST], &[&broadcasts]), 1);
        let reach = check.reach(BROADCAST, &broadcasts);
        assert_eq!((reach.sent, reach.reached_all), (2, 1));
        assert_eq!(reach.to_all.count, 1);
        assert!(closes.is_empty());
    }
}
