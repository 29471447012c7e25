//! `resume`: what a server does for clients that come back. Every client reads the stream as a
//! `vulcan-stream.v1` websocket; they all disconnect; messages are published while they are
//! away (and the run waits until the server has forwarded them, so they are in its history and
//! nobody receives them live); then every client reconnects at once with `?since=` the last
//! position it saw, while a publisher goes on at a steady rate. A client has caught up when it
//! has every message it missed; the figure is the time from the reconnect until the last one
//! has.
//!
//! Three publishers, one per phase (before, while away, live), each with its own sequence, so
//! that each phase is counted exactly; and every client checks positions across both sessions:
//! the first message after the reconnect must be the one after its `since`, and every one after
//! that the next, through the hand-over from the history to live messages.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::Instant;

use crate::clients::{
    self, ClientEnd, Conn, Dial, Format, PositionTrack, Positions, Shared, Target,
};
use crate::db::Db;
use crate::error::BenchError;
use crate::options::{self, ResumeArgs};
use crate::payload::Clock;
use crate::publisher::{self, Counters, Plan, Published};
use crate::report::{Report, Resume, ServerUse, Settings};
use crate::scenario::{self, OwnStart, REGISTER_LIMIT, cpus};
use crate::stats::{Counts, Percentiles, SeqState, new_histogram};
use crate::status::StatusUrl;

/// The three publishers: before the disconnect, while away, live during the reconnect.
const BEFORE: usize = 0;
const MISSED: usize = 1;
const LIVE: usize = 2;

/// How long the live frames may take to arrive once the live publisher has stopped.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

pub async fn run(args: ResumeArgs, pg: Handle) -> Result<Report, BenchError> {
    args.clients.check(false)?;
    args.output.check()?;
    options::check_payload_size(args.payload_size)?;
    if args.before == 0 || args.missed == 0 {
        return Err(BenchError::Usage(
            "--before and --missed must be at least 1: a client resumes from a message it saw"
                .to_owned(),
        ));
    }
    if !(1..=100_000).contains(&args.batch) {
        return Err(BenchError::Usage(
            "--batch must be between 1 and 100000".to_owned(),
        ));
    }
    if !(args.live_rate.is_finite() && args.live_rate >= 0.0) || args.resume_timeout.is_zero() {
        return Err(BenchError::Usage(
            "--live-rate must be 0 or more and --resume-timeout positive".to_owned(),
        ));
    }
    let pid = args.server.server_pid;
    scenario::check_server_pid(pid)?;
    let status = scenario::status_url(&args.server)?.ok_or_else(|| {
        BenchError::Usage("resume reads the server's /status: give --status-url".to_owned())
    })?;
    let n = args.clients.clients;
    let db = Db::from_args(&args.db)?;
    let clock = Clock::new();
    let run: u32 = rand::random();
    let mut report = Report {
        mode: "resume".to_owned(),
        run,
        settings: Settings {
            channel: Some(db.channel.clone()),
            publishers: 3,
            batch: args.batch,
            payload_size: args.payload_size,
            messages: Some(args.missed),
            rate: (args.live_rate > 0.0).then_some(args.live_rate),
            format: Format::V1,
            ..Settings::of_clients(&args.server.url, &args.clients, args.output.threads)
        },
        cpus: cpus(),
        ..Report::default()
    };
    let target = Target::resolve(&args.server.url, args.clients.read_buffer)
        .await?
        .with_format(Format::V1);
    let plan = |messages: Option<u64>, rate: Option<f64>, batch: usize| Plan {
        messages,
        duration: messages.is_none().then_some(args.resume_timeout),
        rate,
        batch,
        payload_size: args.payload_size,
        survive: false,
    };

    // The first session: every client reads `before` messages.
    let first = Arc::new(Shared::new(run, clock, 3, n));
    let (connected, stats) = clients::open_all(
        &target,
        0,
        n,
        args.clients.connect_concurrency,
        &Dial::default(),
    )
    .await;
    if stats.failed > 0 {
        return Err(BenchError::Server {
            url: args.server.url.clone(),
            cause: format!(
                "{} of {n} clients could not connect (first: {})",
                stats.failed,
                stats.first_error.clone().unwrap_or_default()
            ),
        });
    }
    report.connect = Some(stats);
    let readers: Vec<_> = connected
        .into_iter()
        .map(|(id, conn)| tokio::spawn(clients::read(id, conn, first.clone())))
        .collect();
    status
        .wait_for_clients(n as u64, REGISTER_LIMIT)
        .await
        .map_err(|why| BenchError::Run(format!("{}: {why}", status.display())))?;
    let before = publish(
        &db,
        &pg,
        plan(Some(args.before), None, args.batch),
        clock,
        run,
        BEFORE,
    )
    .await?;
    if scenario::drain(&first, None, before.total, DRAIN_LIMIT).await {
        return Err(BenchError::Run(format!(
            "the clients did not all receive the first {} messages",
            before.total
        )));
    }

    // Everyone leaves: each reader drops its connection, keeping what it counted.
    first.stop.cancel();
    let away = scenario::collect(readers).await;
    let mut closes = Vec::new();
    let mut kept: Vec<Option<(Vec<SeqState>, PositionTrack)>> = vec![None; n];
    for result in away {
        if result.end != ClientEnd::Open {
            closes.push(scenario::describe(&result.end));
        }
        if let Some(track) = result.positions.filter(|t| t.last().is_some()) {
            kept[result.id] = Some((result.states, track));
        }
    }
    status
        .wait_for_clients_at_most(0, REGISTER_LIMIT)
        .await
        .map_err(|why| BenchError::Run(format!("{}: {why}", status.display())))?;

    // Published while nobody is connected, and forwarded (so in the history) before anyone
    // comes back.
    let forwarded = status.forwarded().await.map_err(BenchError::Run)?;
    let missed = publish(
        &db,
        &pg,
        plan(Some(args.missed), None, args.batch),
        clock,
        run,
        MISSED,
    )
    .await?;
    wait_forwarded(&status, forwarded + missed.total, args.resume_timeout).await?;
    let resumes_before = status
        .metric("vulcan_stream_resumes_served_total")
        .await
        .ok();
    let resets_before = status.metric_sum("vulcan_stream_resets_total").await.ok();

    let server_before = scenario::sample_server(pid)?;
    let own = OwnStart::now();

    // Everyone comes back at once, each with its own `since`, while the live publisher runs.
    let second = Arc::new(Shared::new(run, clock, 3, n));
    let counters = Arc::new(Counters::default());
    let live = if args.live_rate > 0.0 {
        let (db, counters) = (db.clone(), counters.clone());
        let plan = plan(None, Some(args.live_rate), 1);
        let clients = {
            let db = db.clone();
            pg.spawn(async move { publisher::connect(&db, 1).await })
                .await
                .map_err(scenario::lost_task)??
        };
        Some(pg.spawn(async move {
            publisher::run_as(&db, clients, plan, clock, run, LIVE as u32, None, counters).await
        }))
    } else {
        None
    };
    let targets: Vec<Target> = kept
        .iter()
        .map(|k| match k.as_ref().and_then(|(_, track)| track.last()) {
            Some(since) => target.with_query("since", since),
            None => target.clone(),
        })
        .collect();
    let caught = Arc::new(CaughtUp::new(n));
    let reconnect_ns = clock.now_ns();
    let mut readers = Vec::with_capacity(n);
    let dial = Dial::default();
    let reconnect = clients::dial_each(
        &targets,
        0..n,
        args.clients.connect_concurrency.max(n),
        |target, id| target.open(&dial, id),
        |id, conn| {
            let before = kept[id].take();
            readers.push(tokio::spawn(come_back(
                id,
                conn,
                second.clone(),
                before,
                missed.total,
                caught.clone(),
            )));
        },
    )
    .await;
    let deadline = Instant::now() + args.resume_timeout;
    while caught.count.load(Ordering::Relaxed) < reconnect.connected
        && second.live() > 0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    counters.stop.store(true, Ordering::Relaxed);
    let live = match live {
        Some(task) => task.await.map_err(scenario::lost_task)??,
        None => Published {
            per_publisher: vec![0],
            ..Published::default()
        },
    };
    let drain_timed_out =
        scenario::drain(&second, None, missed.total + live.total, DRAIN_LIMIT).await;
    let server_after = scenario::sample_server(pid)?;
    let own = own.end();
    let resumes_after = status
        .metric("vulcan_stream_resumes_served_total")
        .await
        .ok();
    let resets_after = status.metric_sum("vulcan_stream_resets_total").await.ok();
    second.stop.cancel();
    let results = scenario::collect(readers).await;

    let published = [before.total, missed.total, live.total];
    let mut counts = Counts::default();
    let mut positions = Positions::default();
    let mut bad_handovers = 0;
    for result in &results {
        counts.add(&Counts::from_states(&result.states, &published));
        if let Some(track) = &result.positions {
            positions.add(&track.counts);
            bad_handovers += usize::from(!track.counts.is_clean());
        }
        if result.end != ClientEnd::Open {
            closes.push(scenario::describe(&result.end));
        }
    }
    counts.lost += (n - results.len()) as u64 * published.iter().sum::<u64>();
    let mut after = new_histogram();
    let mut last = 0u64;
    for at in &caught.at_ns {
        let at = at.load(Ordering::Relaxed);
        if at > 0 {
            let took = at.saturating_sub(reconnect_ns);
            last = last.max(took);
            after.saturating_record(took.max(1));
        }
    }
    let caught_up = caught.count.load(Ordering::Relaxed);
    let delta = |before: Option<f64>, after: Option<f64>| after.zip(before).map(|(a, b)| a - b);
    let resume = Resume {
        clients: n,
        before: before.total,
        missed: missed.total,
        live: live.total,
        reconnect,
        caught_up,
        caught_up_all_ms: (caught_up == n).then(|| last as f64 / 1e6),
        caught_up_after: Percentiles::of(&after),
        counts,
        positions,
        bad_handovers,
        closes: scenario::summarise(closes),
        resumes_served: delta(resumes_before, resumes_after),
        resets: delta(resets_before, resets_after),
    };
    problems(&resume, drain_timed_out, &mut report.problems);
    report.resume = Some(resume);
    report.published = Some(Published {
        per_publisher: published.to_vec(),
        total: published.iter().sum(),
        statements: before.statements + missed.statements + live.statements,
        ..missed
    });
    report.server = ServerUse::between(pid, server_before, server_after, None);
    own.record(&mut report, args.output.threads, None);
    Ok(report)
}

/// What fails the run.
fn problems(r: &Resume, drain_timed_out: bool, problems: &mut Vec<String>) {
    if r.reconnect.failed > 0 {
        problems.push(format!(
            "{} clients could not reconnect (first: {})",
            r.reconnect.failed,
            r.reconnect.first_error.clone().unwrap_or_default()
        ));
    }
    if r.caught_up < r.clients {
        problems.push(format!(
            "{} of {} clients did not get every missed message",
            r.clients - r.caught_up,
            r.clients
        ));
    }
    if !r.counts.is_clean() {
        problems.push(format!(
            "clients: {} lost, {} duplicated, {} out of order",
            r.counts.lost, r.counts.duplicated, r.counts.out_of_order
        ));
    }
    if !r.positions.is_clean() {
        problems.push(format!(
            "positions: {} gaps, {} repeats, {} resets, {} epoch changes ({} clients)",
            r.positions.gaps,
            r.positions.repeats,
            r.positions.resets,
            r.positions.epoch_changes,
            r.bad_handovers
        ));
    }
    if !r.closes.is_empty() {
        problems.push(format!("clients closed: {}", r.closes.join(", ")));
    }
    if r.resumes_served.is_some_and(|v| v != r.clients as f64) {
        problems.push(format!(
            "the server counted {} resumes served, not {}",
            r.resumes_served.unwrap_or_default(),
            r.clients
        ));
    }
    if r.resets.is_some_and(|v| v != 0.0) {
        problems.push(format!(
            "the server counted {} resets",
            r.resets.unwrap_or_default()
        ));
    }
    if drain_timed_out {
        problems.push("the live messages did not all arrive".to_owned());
    }
}

/// When each reconnected client had every missed message ([`Clock::now_ns`]; 0: not yet).
struct CaughtUp {
    at_ns: Vec<AtomicU64>,
    count: AtomicUsize,
}

impl CaughtUp {
    fn new(n: usize) -> CaughtUp {
        CaughtUp {
            at_ns: (0..n).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicUsize::new(0),
        }
    }
}

/// Reads a client's second session, going on from what it had, and notes when it has every
/// one of the `missed` messages.
async fn come_back(
    id: usize,
    conn: Conn,
    shared: Arc<Shared>,
    before: Option<(Vec<SeqState>, PositionTrack)>,
    missed: u64,
    caught: Arc<CaughtUp>,
) -> clients::ClientResult {
    let Conn::Ws { ws, .. } = conn else {
        unreachable!("resume opens v1 websockets")
    };
    let (states, track) = before.unwrap_or_default();
    let tally = clients::Tally::new(id, &shared, Some(track)).resume(states);
    let clock = shared.clock;
    let mut done = false;
    let (tally, end) = clients::read_ws(*ws, tally, true, |tally, _| {
        if !done && tally.states[MISSED].unique >= missed {
            done = true;
            caught.at_ns[id].store(clock.now_ns().max(1), Ordering::Relaxed);
            caught.count.fetch_add(1, Ordering::Relaxed);
        }
    })
    .await;
    tally.finish(id, end)
}

/// Publishes `plan` as publisher `id` on a connection of its own.
async fn publish(
    db: &Db,
    pg: &Handle,
    plan: Plan,
    clock: Clock,
    run: u32,
    id: usize,
) -> Result<Published, BenchError> {
    let db = db.clone();
    pg.spawn(async move {
        let clients = publisher::connect(&db, 1).await?;
        let counters = Arc::new(Counters::default());
        publisher::run_as(&db, clients, plan, clock, run, id as u32, None, counters).await
    })
    .await
    .map_err(scenario::lost_task)?
}

/// Waits until the server reports `target` notifications forwarded.
async fn wait_forwarded(
    status: &StatusUrl,
    target: u64,
    limit: Duration,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + limit;
    loop {
        let seen = status.forwarded().await.map_err(BenchError::Run)?;
        if seen >= target {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(BenchError::Run(format!(
                "the server forwarded {seen} of {target} notifications within {limit:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
