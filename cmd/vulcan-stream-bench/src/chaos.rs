//! `chaos`: publishers at a steady rate and `vulcan-stream.v1` clients that resume by
//! position, while, again and again, the servers' PostgreSQL backends are terminated,
//! PostgreSQL is restarted and a replica is killed with SIGKILL and started again.
//!
//! The run starts the replicas itself (the server binary, this process's environment with
//! `PORT` and `PG_SOURCE` set), so that it can kill and restart them. A client that loses its
//! connection dials the next replica with `?since=` the last position it saw. Publishers go on
//! through every fault: a statement that fails is retried on a new connection, and the message
//! it carried is uncertain (it may have committed) until it is looked up (see
//! [`Published::uncertain`]).
//!
//! At the end, for the table source, every committed message must have reached every client
//! once and in order, with no reset; for the notify source, what was lost is counted, and every
//! client whose stream broke must have been told (a reset event). In notify mode each replica's
//! notifications are its own: a client that moves to a replica which is behind the one it left
//! may also receive a message again after the reset, which is counted as duplicated.
//! How long each fault interrupted delivery is the longest publish → frame delay of a frame that
//! arrived between that fault and the next, beside the longest before the first fault; and, for
//! the faults that stop publishing (a PostgreSQL restart), how long the publishers could not
//! commit.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::runtime::Handle;
use tokio::time::Instant;

use crate::clients::{self, ClientEnd, Dial, Format, PositionTrack, Positions, Shared, Target};
use crate::db::{Db, Source};
use crate::error::BenchError;
use crate::options::{self, ChaosArgs};
use crate::payload::{Clock, Stamp};
use crate::publisher::{self, Counters, Plan, Published};
use crate::report::{Report, Settings, fmt_int, fmt_us};
use crate::scenario::{OwnStart, collect, cpus, lost_task};
use crate::stats::{Counts, Percentiles, SeqState};
use crate::status::StatusUrl;

/// The faults a run takes turns at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// `pg_terminate_backend` of every server's LISTEN or reader connection and of the
    /// sequencer's.
    Terminate,
    /// PostgreSQL restarted (`--restart-db`).
    RestartDb,
    /// A replica killed with SIGKILL and started again on its port, the replicas in turn.
    KillReplica,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Fault::Terminate => "terminate",
            Fault::RestartDb => "restart-db",
            Fault::KillReplica => "kill-replica",
        }
    }
}

/// One fault as it happened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultRecord {
    pub kind: Fault,
    /// Since the first publish.
    pub at_s: f64,
    /// How long the fault's action took (a restart: until the database or replica was back).
    pub action_ms: f64,
    pub detail: String,
    pub error: Option<String>,
    /// The longest publish → frame delay of a frame that arrived between this fault and the
    /// next (or the end).
    pub max_delay_ms: Option<f64>,
    /// The longest time a publisher could not commit, from a failure that began in the same
    /// window.
    pub publishers_blocked_ms: Option<f64>,
}

/// What `chaos` measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Chaos {
    pub source: Source,
    pub replicas: usize,
    pub clients: usize,
    /// Messages committed (the uncertain ones found committed included).
    pub published: u64,
    /// Over every client.
    pub counts: Counts,
    pub positions: Positions,
    /// Clients whose stream broke: a message lost, or (notify source: after moving to another
    /// replica, whose notifications are its own, and which may be behind the one left) a
    /// message received twice or out of order.
    pub clients_with_loss: usize,
    /// Of those, the clients that received a reset event.
    pub clients_with_loss_signalled: usize,
    /// Websocket sessions opened, over every client (the first included), and failed dials.
    pub sessions: u64,
    pub dial_failures: u64,
    /// The longest publish → frame delay before the first fault.
    pub baseline_max_delay_ms: Option<f64>,
    pub faults: Vec<FaultRecord>,
}

impl Chaos {
    /// The worst delay and the number of faults of `kind`.
    pub fn worst(&self, kind: Fault) -> (usize, Option<f64>) {
        let of_kind = self.faults.iter().filter(|f| f.kind == kind);
        let count = of_kind.clone().count();
        let worst = of_kind.filter_map(|f| f.max_delay_ms).reduce(f64::max);
        (count, worst)
    }

    /// One line per kind of fault: how often, and the worst interruption.
    pub fn interruptions(&self) -> String {
        let mut parts = Vec::new();
        for kind in [Fault::Terminate, Fault::RestartDb, Fault::KillReplica] {
            let (count, worst) = self.worst(kind);
            if count == 0 {
                continue;
            }
            let blocked = self
                .faults
                .iter()
                .filter(|f| f.kind == kind)
                .filter_map(|f| f.publishers_blocked_ms)
                .reduce(f64::max);
            parts.push(format!(
                "{} ×{count}: delivery ≤ {}{}",
                kind.as_str(),
                worst.map_or("-".to_owned(), |ms| fmt_us(ms * 1e3)),
                blocked.map_or(String::new(), |ms| format!(
                    ", publishers blocked ≤ {}",
                    fmt_us(ms * 1e3)
                ))
            ));
        }
        parts.join("; ")
    }

    pub fn rows(&self, rows: &mut Vec<(&'static str, String)>) {
        rows.push((
            "chaos",
            format!(
                "{} source, {} replicas, {} v1 clients; {} sessions, {} failed dials",
                self.source.as_str(),
                self.replicas,
                fmt_int(self.clients as u64),
                fmt_int(self.sessions),
                fmt_int(self.dial_failures)
            ),
        ));
        rows.push((
            "checked",
            format!(
                "{} committed; lost {}, duplicated {}, out of order {}; {} clients' streams \
                 broke, {} of them told by a reset; positions: {} gaps, {} repeats, {} resets, \
                 {} epoch changes",
                fmt_int(self.published),
                fmt_int(self.counts.lost),
                fmt_int(self.counts.duplicated),
                fmt_int(self.counts.out_of_order),
                self.clients_with_loss,
                self.clients_with_loss_signalled,
                self.positions.gaps,
                self.positions.repeats,
                self.positions.resets,
                self.positions.epoch_changes
            ),
        ));
        rows.push((
            "baseline",
            format!(
                "longest delay before the first fault {}",
                self.baseline_max_delay_ms
                    .map_or("-".to_owned(), |ms| fmt_us(ms * 1e3))
            ),
        ));
        rows.push(("faults", self.interruptions()));
        for f in &self.faults {
            rows.push((
                "fault",
                format!(
                    "{:>7.2} s {}: {} ({}); delivery delay after it ≤ {}{}",
                    f.at_s,
                    f.kind.as_str(),
                    f.error.as_deref().unwrap_or(&f.detail),
                    fmt_us(f.action_ms * 1e3),
                    f.max_delay_ms.map_or("-".to_owned(), |ms| fmt_us(ms * 1e3)),
                    f.publishers_blocked_ms.map_or(String::new(), |ms| format!(
                        ", publishers blocked {}",
                        fmt_us(ms * 1e3)
                    ))
                ),
            ));
        }
    }
}

/// How long a started replica may take to become ready.
const READY_LIMIT: Duration = Duration::from_secs(30);
/// The most faults a run records delays for.
const MAX_FAULTS: usize = 4096;

/// One server process of the run.
struct Replica {
    port: u16,
    child: Child,
}

/// The server binary and how to start it.
struct Servers {
    bin: PathBuf,
    source: Source,
    logs: Option<PathBuf>,
}

impl Servers {
    /// Starts replica `n` on `port` and waits until it is ready.
    async fn start(&self, n: usize, port: u16) -> Result<Replica, String> {
        let log = match &self.logs {
            Some(dir) => {
                let path = dir.join(format!("chaos-{}-{n}.log", self.source.as_str()));
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|err| format!("{}: {err}", path.display()))?;
                Stdio::from(file)
            }
            None => Stdio::null(),
        };
        let child = Command::new(&self.bin)
            .env("PORT", port.to_string())
            .env("PG_SOURCE", self.source.as_str())
            .env("LOG_LEVEL", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| format!("{}: {err}", self.bin.display()))?;
        let replica = Replica { port, child };
        replica.wait_ready().await?;
        Ok(replica)
    }

    /// `vulcan-stream migrate` with this process's environment.
    async fn migrate(&self) -> Result<(), BenchError> {
        let output = Command::new(&self.bin)
            .arg("migrate")
            .env("PG_SOURCE", "table")
            .output()
            .await
            .map_err(|err| BenchError::Run(format!("{}: {err}", self.bin.display())))?;
        if !output.status.success() {
            return Err(BenchError::Run(format!(
                "{} migrate failed ({}): {}",
                self.bin.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
    }
}

impl Replica {
    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/stream", self.port)
    }

    async fn wait_ready(&self) -> Result<(), String> {
        let status = StatusUrl::beside(&self.url()).expect("a ws:// URL has a status URL");
        let deadline = Instant::now() + READY_LIMIT;
        while Instant::now() < deadline {
            if status.probe("/ready").await == Ok(200) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!(
            "replica on port {} not ready within {READY_LIMIT:?}",
            self.port
        ))
    }

    /// SIGKILL, and waits for the process to be gone.
    async fn kill(&mut self) -> Result<(), String> {
        self.child.start_kill().map_err(|err| err.to_string())?;
        self.child.wait().await.map_err(|err| err.to_string())?;
        Ok(())
    }

    /// SIGTERM, then SIGKILL after a few seconds.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill only sends a signal to our own child, which has not been reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.kill().await;
        }
    }
}

/// A free port of 127.0.0.1 (free when asked; the replica binds it at once).
fn free_port() -> Result<u16, BenchError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|err| BenchError::Run(format!("no free port: {err}")))
}

/// What the clients report while they read: how much each has, and the longest delay of the
/// frames that arrived after each fault.
struct Watch {
    clock: Clock,
    /// Distinct messages each client has, over all its sessions.
    have: Vec<AtomicU64>,
    /// When each fault began ([`Clock::now_ns`]), in order.
    faults: Mutex<Vec<u64>>,
    /// Index 0: before the first fault; i: after fault i - 1.
    max_delay_ns: Vec<AtomicU64>,
}

impl Watch {
    fn new(clock: Clock, clients: usize) -> Watch {
        Watch {
            clock,
            have: (0..clients).map(|_| AtomicU64::new(0)).collect(),
            faults: Mutex::new(Vec::new()),
            max_delay_ns: (0..=MAX_FAULTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn frame(&self, id: usize, states: &[SeqState], stamp: Option<Stamp>) {
        let Some(stamp) = stamp else { return };
        let now = self.clock.now_ns();
        self.have[id].store(states.iter().map(|s| s.unique).sum(), Ordering::Relaxed);
        let window = self
            .faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .partition_point(|&at| at <= now);
        if let Some(max) = self.max_delay_ns.get(window) {
            max.fetch_max(now.saturating_sub(stamp.sent_ns), Ordering::Relaxed);
        }
    }

    fn fault_begins(&self) -> u64 {
        let now = self.clock.now_ns();
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(now);
        now
    }

    fn max_delay_ms(&self, window: usize) -> Option<f64> {
        let ns = self.max_delay_ns.get(window)?.load(Ordering::Relaxed);
        (ns > 0).then_some(ns as f64 / 1e6)
    }
}

/// One client over all its sessions.
struct ClientOutcome {
    states: Vec<SeqState>,
    track: PositionTrack,
    sessions: u64,
    dial_failures: u64,
}

/// Reads as a v1 client until the run stops; on a lost connection, dials the next replica with
/// `since` the last position seen.
async fn client(
    id: usize,
    targets: Arc<Vec<Target>>,
    shared: Arc<Shared>,
    watch: Arc<Watch>,
) -> ClientOutcome {
    let mut outcome = ClientOutcome {
        states: vec![SeqState::default(); shared.publishers],
        track: PositionTrack::default(),
        sessions: 0,
        dial_failures: 0,
    };
    let mut replica = id % targets.len();
    let dial = Dial::default();
    while !shared.stop.is_cancelled() {
        let target = match outcome.track.last() {
            Some(position) => targets[replica].with_query("since", position),
            None => targets[replica].clone(),
        };
        let dialled = tokio::select! {
            _ = shared.stop.cancelled() => break,
            dialled = target.connect(&dial, id) => dialled,
        };
        let Ok(ws) = dialled else {
            outcome.dial_failures += 1;
            replica = (replica + 1) % targets.len();
            tokio::select! {
                _ = shared.stop.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            continue;
        };
        outcome.sessions += 1;
        let tally = clients::Tally::new(id, &shared, Some(std::mem::take(&mut outcome.track)))
            .resume(std::mem::take(&mut outcome.states));
        let (tally, end) = clients::read_ws(ws, tally, true, |tally, stamp| {
            watch.frame(id, &tally.states, stamp)
        })
        .await;
        let result = tally.finish(id, end.clone());
        outcome.states = result.states;
        outcome.track = result.positions.unwrap_or_default();
        if end == ClientEnd::Open {
            break;
        }
        replica = (replica + 1) % targets.len();
    }
    outcome
}

/// Does one fault; a description of what was done.
async fn inject(
    kind: Fault,
    args: &ChaosArgs,
    db: &Db,
    servers: &Servers,
    replicas: &mut [Replica],
    turn: usize,
) -> Result<String, String> {
    match kind {
        Fault::Terminate => {
            let admin = db.connect().await.map_err(|err| err.to_string())?;
            let row = admin
                .query_one(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE application_name IN ('vulcan-stream', 'vulcan-stream sequencer')",
                    &[],
                )
                .await
                .map_err(|err| format!("{err:#}"))?;
            Ok(format!("{} backends terminated", row.get::<_, i64>(0)))
        }
        Fault::RestartDb => {
            let command = args
                .restart_db
                .as_deref()
                .ok_or("no --restart-db command")?;
            // Without pipes: a restarted postmaster inherits the command's descriptors, and
            // would hold a pipe open for as long as it runs.
            let status = Command::new("sh")
                .arg("-c")
                .arg(command)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await
                .map_err(|err| err.to_string())?;
            if !status.success() {
                return Err(format!("--restart-db failed ({status})"));
            }
            Ok("PostgreSQL restarted".to_owned())
        }
        Fault::KillReplica => {
            let n = turn % replicas.len();
            let replica = &mut replicas[n];
            replica.kill().await?;
            let killed = Instant::now();
            *replica = servers.start(n, replica.port).await?;
            Ok(format!(
                "replica {} killed; ready again after {}",
                n + 1,
                fmt_us(killed.elapsed().as_secs_f64() * 1e6)
            ))
        }
    }
}

pub async fn run(args: ChaosArgs, pg: Handle) -> Result<Report, BenchError> {
    args.clients.check(false)?;
    args.output.check()?;
    options::check_payload_size(args.payload_size)?;
    if !(1..=64).contains(&args.replicas) || !(1..=256).contains(&args.publishers) {
        return Err(BenchError::Usage(
            "--replicas must be 1 to 64 and --publishers 1 to 256".to_owned(),
        ));
    }
    if !(args.rate.is_finite() && args.rate > 0.0) || args.fault_every.is_zero() {
        return Err(BenchError::Usage(
            "--rate and --fault-every must be positive".to_owned(),
        ));
    }
    let mut faults = args.faults.clone();
    if faults.is_empty() {
        faults = vec![Fault::Terminate, Fault::RestartDb, Fault::KillReplica];
        if args.restart_db.is_none() {
            faults.retain(|f| *f != Fault::RestartDb);
        }
    }
    if faults.contains(&Fault::RestartDb) && args.restart_db.is_none() {
        return Err(BenchError::Usage(
            "--fault restart-db needs --restart-db COMMAND".to_owned(),
        ));
    }
    let db = Db::from_args(&args.db)?;
    let servers = Servers {
        bin: args.server_bin.clone(),
        source: db.source,
        logs: args.server_log_dir.clone(),
    };
    if db.source == Source::Table {
        servers.migrate().await?;
    }
    let mut replicas = Vec::with_capacity(args.replicas);
    for n in 0..args.replicas {
        let replica = servers
            .start(n, free_port()?)
            .await
            .map_err(BenchError::Run)?;
        replicas.push(replica);
    }
    let mut targets = Vec::with_capacity(replicas.len());
    for replica in &replicas {
        targets.push(
            Target::resolve(&replica.url(), args.clients.read_buffer)
                .await?
                .with_format(Format::V1),
        );
    }
    let targets = Arc::new(targets);

    let clock = Clock::new();
    let run: u32 = rand::random();
    let n = args.clients.clients;
    let shared = Arc::new(Shared::new(run, clock, args.publishers, n));
    let watch = Arc::new(Watch::new(clock, n));
    let mut report = Report {
        mode: "chaos".to_owned(),
        run,
        settings: Settings {
            publishers: args.publishers,
            batch: 1,
            payload_size: args.payload_size,
            duration_s: Some(args.duration.as_secs_f64()),
            rate: Some(args.rate),
            source: db.source,
            ..Settings::of_clients(&replicas[0].url(), &args.clients, args.output.threads)
        },
        cpus: cpus(),
        ..Report::default()
    };
    report.settings.format = Format::V1;
    let readers: Vec<_> = (0..n)
        .map(|id| tokio::spawn(client(id, targets.clone(), shared.clone(), watch.clone())))
        .collect();
    // Every client registered before the first publish, so that each has the whole stream.
    wait_registered(&replicas, n as u64).await;

    let own = OwnStart::now();
    let plan = Plan {
        messages: None,
        duration: Some(args.duration),
        rate: Some(args.rate),
        batch: 1,
        payload_size: args.payload_size,
        survive: true,
    };
    let counters = Arc::new(Counters::default());
    let publishing = {
        let db = db.clone();
        let counters = counters.clone();
        pg.spawn(async move {
            let clients = publisher::connect(&db, args.publishers).await?;
            publisher::run(&db, clients, plan, clock, run, None, counters).await
        })
    };

    let started = Instant::now();
    let deadline = started + args.duration;
    let mut records = Vec::new();
    let mut next = started + args.fault_every;
    let mut turn = 0;
    while next + args.fault_every / 2 <= deadline && records.len() < MAX_FAULTS {
        tokio::time::sleep_until(next).await;
        next += args.fault_every;
        let kind = faults[turn % faults.len()];
        let at_ns = watch.fault_begins();
        let began = Instant::now();
        let outcome = inject(
            kind,
            &args,
            &db,
            &servers,
            &mut replicas,
            turn / faults.len(),
        )
        .await;
        turn += 1;
        let (detail, error) = match outcome {
            Ok(detail) => (detail, None),
            Err(error) => (String::new(), Some(error)),
        };
        records.push((
            at_ns,
            FaultRecord {
                kind,
                at_s: 0.0,
                action_ms: began.elapsed().as_secs_f64() * 1e3,
                detail,
                error,
                max_delay_ms: None,
                publishers_blocked_ms: None,
            },
        ));
    }
    let published: Published = publishing.await.map_err(lost_task)??;

    // Until every client has every committed message, or nothing new arrives for a while
    // (the notify source loses messages: its clients never have them all).
    let expected = published.total;
    let mut last_sum = None;
    let mut last_change = Instant::now();
    loop {
        let have: Vec<u64> = watch
            .have
            .iter()
            .map(|h| h.load(Ordering::Relaxed))
            .collect();
        if have.iter().all(|&h| h >= expected) {
            break;
        }
        let sum: u64 = have.iter().sum();
        if last_sum != Some(sum) {
            last_sum = Some(sum);
            last_change = Instant::now();
        } else if last_change.elapsed() >= args.drain_timeout {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let own = own.end();
    shared.stop.cancel();
    let outcomes = collect(readers).await;
    for replica in replicas {
        replica.stop().await;
    }

    let mut chaos = Chaos {
        source: db.source,
        replicas: args.replicas,
        clients: n,
        published: published.total,
        baseline_max_delay_ms: watch.max_delay_ms(0),
        ..Chaos::default()
    };
    let mut clients_never = 0;
    for outcome in &outcomes {
        let counts = Counts::from_states(&outcome.states, &published.per_publisher);
        chaos.counts.add(&counts);
        chaos.positions.add(&outcome.track.counts);
        chaos.sessions += outcome.sessions;
        chaos.dial_failures += outcome.dial_failures;
        if outcome.sessions == 0 {
            clients_never += 1;
        }
        if !counts.is_clean() {
            chaos.clients_with_loss += 1;
            if outcome.track.counts.resets > 0 {
                chaos.clients_with_loss_signalled += 1;
            }
        }
    }
    let first_send = published.first_send_ns;
    let starts: Vec<u64> = records.iter().map(|(at, _)| *at).collect();
    for (i, (at_ns, mut record)) in records.into_iter().enumerate() {
        let until = starts.get(i + 1).copied().unwrap_or(u64::MAX);
        record.at_s = at_ns.saturating_sub(first_send) as f64 / 1e9;
        record.max_delay_ms = watch.max_delay_ms(i + 1);
        record.publishers_blocked_ms = published
            .outages
            .iter()
            .filter(|(from, _)| (at_ns..until).contains(from))
            .map(|(from, to)| to.saturating_sub(*from) as f64 / 1e6)
            .reduce(f64::max);
        if let Some(error) = &record.error {
            report.problems.push(format!(
                "fault {} at {:.2} s failed: {error}",
                record.kind.as_str(),
                record.at_s
            ));
        }
        chaos.faults.push(record);
    }
    if clients_never > 0 {
        report
            .problems
            .push(format!("{clients_never} clients never connected"));
    }
    let c = &chaos.counts;
    let p = &chaos.positions;
    match db.source {
        Source::Table => {
            if !c.is_clean() || !p.is_clean() {
                report.problems.push(format!(
                    "table source: {} lost, {} duplicated, {} out of order; positions: {} gaps, \
                     {} repeats, {} resets, {} epoch changes",
                    c.lost,
                    c.duplicated,
                    c.out_of_order,
                    p.gaps,
                    p.repeats,
                    p.resets,
                    p.epoch_changes
                ));
            }
        }
        Source::Notify => {
            if p.repeats > 0 {
                report.problems.push(format!(
                    "notify source: {} positions repeated within an epoch",
                    p.repeats
                ));
            }
            if chaos.clients_with_loss_signalled < chaos.clients_with_loss
                || p.gaps > 0
                || p.epoch_changes > 0
            {
                report.problems.push(format!(
                    "notify source: a break went unsignalled: {} of {} clients that lost, \
                     repeated or reordered messages got no reset; {} position gaps, {} epoch \
                     changes without a reset",
                    chaos.clients_with_loss - chaos.clients_with_loss_signalled,
                    chaos.clients_with_loss,
                    p.gaps,
                    p.epoch_changes
                ));
            }
        }
    }
    if published.uncertain > 0 {
        report.notes.push(match db.source {
            Source::Table => format!(
                "{} messages were uncertain (their statement failed); {} of them were found \
                 in the table and are counted as committed",
                published.uncertain, published.uncertain_committed
            ),
            Source::Notify => format!(
                "{} messages were uncertain (their statement failed) and are counted as \
                 committed: what is lost is an upper bound",
                published.uncertain
            ),
        });
    }
    report.latency = Some(Percentiles::of(&shared.latency.merged()));
    report.chaos = Some(chaos);
    report.published = Some(published);
    own.record(&mut report, args.output.threads, None);
    Ok(report)
}

/// Waits (up to a limit) until the replicas together report `want` clients.
async fn wait_registered(replicas: &[Replica], want: u64) {
    let deadline = Instant::now() + crate::scenario::REGISTER_LIMIT;
    while Instant::now() < deadline {
        let mut total = 0;
        for replica in replicas {
            let status = StatusUrl::beside(&replica.url()).expect("a ws:// URL has a status URL");
            total += status.clients().await.unwrap_or(0);
        }
        if total >= want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
