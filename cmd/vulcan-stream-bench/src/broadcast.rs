//! `broadcast`: many clients on one or more servers (replicas on one PostgreSQL); the time to
//! connect them, one NOTIFY's time to reach them all, each server's RSS per connection and the
//! kernel's socket memory.
//!
//! The clients are spread over worker processes, because a process holds fewer descriptors
//! than a hundred thousand clients, and over local addresses (127.0.0.2, 127.0.0.3, ...), each
//! with its own ephemeral ports. The process that runs `broadcast` holds no client: it plans
//! the run against the machine's limits, starts the workers (`broadcast-worker`, this same
//! executable), publishes and reports. Every process stamps and reads time on one clock origin,
//! so a worker's arrival times compare with the parent's send time.
//!
//! A worker writes one JSON line on stdout once its clients are connected, one once they all
//! have the messages, and one with its results once told `stop` on its stdin (or when stdin
//! closes): its clients stay open until then, so that the servers' RSS and the kernel's socket
//! counts are read with every connection still there.

use std::net::IpAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::runtime::Handle;
use tokio::time::{Instant, timeout};

use crate::clients::{self, ClientEnd, ConnectStats, Dial, GONE, Shared, Target};
use crate::db::Db;
use crate::error::BenchError;
use crate::fleet::{self, Readers};
use crate::limits::{self, HostLimits};
use crate::options::{self, BroadcastArgs, WorkerArgs};
use crate::payload::Clock;
use crate::procstat::{self, ProcSample, SockStat};
use crate::publisher::{self, Counters, Plan};
use crate::report::{Report, Settings, fmt_int, fmt_us};
use crate::scenario::{self, OwnUse, cpus};
use crate::stats::{Counts, Percentiles, new_histogram};
use crate::status::StatusUrl;

/// Descriptors a worker keeps for everything but its clients.
const PROCESS_RESERVE: u64 = 64;
/// What a connection costs, both of its ends on this machine (the generator's client, the
/// server's, and the kernel's two sockets), for the plan's memory check: a generous round
/// figure above what 19,000 clients measured, so that a plan it passes fits.
const MEMORY_PER_CONNECTION_KIB: u64 = 48;
/// How long every server gets to report its clients registered.
const REGISTER_LIMIT: Duration = Duration::from_secs(60);
/// How long a worker gets to report once told to stop.
const WORKER_STOP_LIMIT: Duration = Duration::from_secs(30);

/// One worker's share of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub urls: Vec<String>,
    /// Client ids `first_id..first_id + count`; client `id` goes to `urls[id % urls.len()]`.
    pub first_id: usize,
    pub count: usize,
    /// Local addresses to connect from, client `id` from `sources[id % sources.len()]`.
    pub sources: Vec<IpAddr>,
    pub concurrency: usize,
    pub read_buffer: usize,
    pub run: u32,
    /// The parent's [`Clock`] origin.
    pub clock_origin_ns: u64,
    /// Messages each client waits for.
    pub messages: u64,
    pub threads: usize,
}

/// What a worker reports, one line each.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum WorkerLine {
    Connected {
        stats: ConnectStats,
        started_ns: u64,
        finished_ns: u64,
        /// Clients connected to each server, in the order of `urls`.
        per_server: Vec<usize>,
    },
    /// Every client has every message (the clients stay open until `stop`).
    Reached,
    Done {
        readers: usize,
        complete: usize,
        counts: Counts,
        closes: Vec<String>,
        /// For each client that has every message: when the last one arrived.
        reached_ns: Vec<u64>,
        rss_kib: u64,
        cpu_s: f64,
    },
}

/// One server of the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerShare {
    pub url: String,
    pub pid: Option<u32>,
    /// Its open-files limit and the clients that leaves room for.
    pub open_files: Option<u64>,
    pub capacity: Option<u64>,
    pub clients: usize,
    pub registered: Option<u64>,
    pub rss_before_kib: Option<u64>,
    /// Once every client was registered (and the settle time passed).
    pub rss_connected_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    /// (The larger of connected and after, less before) per client.
    pub rss_per_client_kib: Option<f64>,
    pub cpu_s: Option<f64>,
}

/// What `broadcast` measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Broadcast {
    pub servers: Vec<ServerShare>,
    pub requested_per_server: usize,
    pub planned_per_server: usize,
    /// The limits that lowered the plan below what was asked, each named.
    pub limits: Vec<String>,
    pub processes: usize,
    pub source_addrs: Vec<IpAddr>,
    /// Summed over the workers; `total_s` from the first attempt of any to the last 101 of
    /// any, and `each` the worst worker's.
    pub connect: ConnectStats,
    pub messages: u64,
    /// Clients that had every message.
    pub reached: usize,
    /// Send → last message, per client (microseconds).
    pub reach: Percentiles,
    /// Send → the last client's last message; `None` when some client never had it.
    pub reach_all_ms: Option<f64>,
    pub counts: Counts,
    pub closes: Vec<String>,
    pub sockstat_before: Option<SockStat>,
    pub sockstat_connected: Option<SockStat>,
    pub sockstat_after: Option<SockStat>,
    /// The workers' RSS and CPU, summed.
    pub generator_rss_kib: u64,
    pub generator_cpu_s: f64,
}

impl Broadcast {
    /// Clients connected over all servers.
    pub fn clients(&self) -> usize {
        self.servers.iter().map(|s| s.clients).sum()
    }

    /// Kernel TCP buffer memory (sockstat `mem`) added once everything was connected, per
    /// connection.
    pub fn kernel_kib_per_client(&self) -> Option<f64> {
        let (before, connected) = (self.sockstat_before?, self.sockstat_connected?);
        let clients = self.clients().max(1) as f64;
        Some((connected.tcp_mem_kib() as f64 - before.tcp_mem_kib() as f64) / clients)
    }

    /// The worst server's RSS per client.
    pub fn worst_rss_per_client_kib(&self) -> Option<f64> {
        self.servers
            .iter()
            .filter_map(|s| s.rss_per_client_kib)
            .reduce(f64::max)
    }

    /// Sockstat figures as text: sockets and TCP buffer memory before, connected and after.
    pub fn sockstat_text(&self) -> String {
        let show = |s: &Option<SockStat>| {
            s.map_or("n/a".to_owned(), |s| {
                format!(
                    "{} TCP sockets, mem {} pages ({} KiB)",
                    fmt_int(s.tcp_sockets()),
                    fmt_int(s.tcp_mem_pages),
                    fmt_int(s.tcp_mem_kib())
                )
            })
        };
        format!(
            "before {}; connected {}; after {}",
            show(&self.sockstat_before),
            show(&self.sockstat_connected),
            show(&self.sockstat_after)
        )
    }

    pub fn rows(&self, rows: &mut Vec<(&'static str, String)>) {
        rows.push((
            "plan",
            format!(
                "{} server(s) × {} clients (asked {}), {} worker process(es), source addresses {}",
                self.servers.len(),
                fmt_int(self.planned_per_server as u64),
                fmt_int(self.requested_per_server as u64),
                self.processes,
                if self.source_addrs.is_empty() {
                    "the kernel's choice".to_owned()
                } else {
                    self.source_addrs
                        .iter()
                        .map(IpAddr::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
        ));
        for limit in &self.limits {
            rows.push(("LIMIT", limit.clone()));
        }
        rows.push((
            "broadcast",
            format!(
                "{} of {} clients had all {} message(s); send → last client {}; per client p50 {}  p99 {}  max {}",
                fmt_int(self.reached as u64),
                fmt_int(self.clients() as u64),
                self.messages,
                self.reach_all_ms
                    .map_or("never".to_owned(), |ms| format!("{ms:.1} ms")),
                fmt_us(self.reach.p50_us),
                fmt_us(self.reach.p99_us),
                fmt_us(self.reach.max_us)
            ),
        ));
        for s in &self.servers {
            rows.push((
                "server",
                format!(
                    "{} (pid {}): {} clients ({} registered), RSS {} → {} → {} KiB: {} KiB per connection; open files {} (room for {}); CPU {}",
                    s.url,
                    s.pid.map_or("?".to_owned(), |p| p.to_string()),
                    fmt_int(s.clients as u64),
                    s.registered.map_or("?".to_owned(), fmt_int),
                    s.rss_before_kib.map_or("n/a".to_owned(), fmt_int),
                    s.rss_connected_kib.map_or("n/a".to_owned(), fmt_int),
                    s.rss_after_kib.map_or("n/a".to_owned(), fmt_int),
                    s.rss_per_client_kib
                        .map_or("n/a".to_owned(), |v| format!("{v:.2}")),
                    s.open_files.map_or("?".to_owned(), fmt_int),
                    s.capacity.map_or("?".to_owned(), fmt_int),
                    s.cpu_s.map_or("n/a".to_owned(), |c| format!("{c:.2} s"))
                ),
            ));
        }
        rows.push((
            "sockstat",
            format!(
                "{}: {} KiB per connection",
                self.sockstat_text(),
                self.kernel_kib_per_client()
                    .map_or("n/a".to_owned(), |v| format!("{v:.2}"))
            ),
        ));
        rows.push((
            "workers",
            format!(
                "RSS {} KiB ({:.1} KiB per client), CPU {:.2} s",
                fmt_int(self.generator_rss_kib),
                self.generator_rss_kib as f64 / self.clients().max(1) as f64,
                self.generator_cpu_s
            ),
        ));
    }
}

/// How many clients go where: per server, in how many processes, and why fewer than asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub per_server: usize,
    pub processes: usize,
    pub limits: Vec<String>,
}

/// Fits `requested` clients on each of `servers` servers (of which the smallest admits
/// `capacity`, from its open-files limit) to this machine's limits, over at least `processes`
/// workers and `sources` local addresses (0: the kernel's choice).
pub fn layout(
    requested: usize,
    servers: usize,
    capacity: Option<(u64, u64)>,
    processes: Option<usize>,
    sources: usize,
    host: &HostLimits,
) -> Layout {
    let servers_u = servers.max(1) as u64;
    let mut per_server = requested as u64;
    let mut limits = Vec::new();
    if let Some((open_files, room)) = capacity {
        if per_server > room {
            per_server = room;
            limits.push(format!(
                "open files per server process: its limit of {} leaves room for {} clients \
                 (the server keeps {} descriptors and lowers MaxClients to the rest), so {} \
                 server(s) hold {} rather than {}",
                fmt_int(open_files),
                fmt_int(room),
                fmt_int(open_files - room),
                servers,
                fmt_int(room * servers_u),
                fmt_int(requested as u64 * servers_u)
            ));
        }
    }
    // Both ends of every connection are on this machine.
    let files_room = host.files_free().saturating_sub(10_000) / 2 / servers_u;
    if per_server > files_room {
        per_server = files_room;
        limits.push(format!(
            "descriptors machine-wide (fs.file-max {}, {} in use): room for {} connections, \
             two descriptors each",
            fmt_int(host.file_max),
            fmt_int(host.files_in_use),
            fmt_int(files_room * servers_u)
        ));
    }
    let memory_room = host.mem_available_kib / MEMORY_PER_CONNECTION_KIB / servers_u;
    if per_server > memory_room {
        per_server = memory_room;
        limits.push(format!(
            "memory: {} MiB available, at about {MEMORY_PER_CONNECTION_KIB} KiB per connection \
             (generator, server and kernel), room for {}",
            fmt_int(host.mem_available_kib / 1024),
            fmt_int(memory_room * servers_u)
        ));
    }
    let per_process = host.open_files.saturating_sub(PROCESS_RESERVE).max(1);
    let needed = (per_server * servers_u).div_ceil(per_process) as usize;
    let processes = processes.unwrap_or(1).max(needed).max(1);
    // A local address's ephemeral ports bound its connections to one server.
    let share = address_share(sources, processes);
    let ports_room = (host.port_count() as f64 / share) as u64;
    if per_server > ports_room {
        per_server = ports_room;
        limits.push(format!(
            "ephemeral ports: {} per local address and server ({}-{}), and one address \
             carries {:.0} % of each server's clients: room for {} per server (add \
             --source-addr)",
            fmt_int(host.port_count()),
            host.ports.0,
            host.ports.1,
            share * 100.0,
            fmt_int(ports_room)
        ));
    }
    Layout {
        per_server: per_server as usize,
        processes,
        limits,
    }
}

/// The local addresses worker `p` of `processes` connects from: its share of `sources` when
/// there are at least as many as workers, else one, taken in turn.
fn sources_of(sources: &[IpAddr], p: usize, processes: usize) -> Vec<IpAddr> {
    if sources.len() >= processes {
        sources.iter().skip(p).step_by(processes).copied().collect()
    } else if sources.is_empty() {
        Vec::new()
    } else {
        vec![sources[p % sources.len()]]
    }
}

/// The largest share of one server's clients that one local address carries, with `sources`
/// addresses (0: the kernel's one) spread over `processes` workers by [`sources_of`].
fn address_share(sources: usize, processes: usize) -> f64 {
    if sources == 0 {
        1.0
    } else if sources >= processes {
        // Every worker has the same share of clients, spread over its own addresses.
        1.0 / (processes * (sources / processes)) as f64
    } else {
        // An address serves up to ⌈processes / sources⌉ workers.
        processes.div_ceil(sources) as f64 / processes as f64
    }
}

/// A started worker.
struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Worker {
    fn start(spec: &WorkerSpec) -> Result<Worker, BenchError> {
        let exe = std::env::current_exe()
            .map_err(|err| BenchError::Run(format!("cannot find this executable: {err}")))?;
        let spec = serde_json::to_string(spec).expect("specs serialise");
        let mut child = Command::new(exe)
            .args(["broadcast-worker", "--spec", &spec])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| BenchError::Run(format!("cannot start a worker: {err}")))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        Ok(Worker {
            stdin: child.stdin.take(),
            lines: BufReader::new(stdout).lines(),
            child,
        })
    }

    /// The worker's next report, within `limit`.
    async fn next(&mut self, limit: Duration) -> Result<WorkerLine, String> {
        match timeout(limit, self.lines.next_line()).await {
            Err(_) => Err(format!("no report within {limit:?}")),
            Ok(Err(err)) => Err(err.to_string()),
            Ok(Ok(None)) => Err(match self.child.try_wait() {
                Ok(Some(status)) => format!("ended ({status})"),
                _ => "closed its output".to_owned(),
            }),
            Ok(Ok(Some(line))) => {
                serde_json::from_str(&line).map_err(|err| format!("{err}: {line:?}"))
            }
        }
    }

    async fn stop(&mut self) {
        if let Some(stdin) = &mut self.stdin {
            let _ = stdin.write_all(b"stop\n").await;
            let _ = stdin.flush().await;
        }
    }

    /// Closes its stdin (which ends it) and waits for it, killing it after `limit`.
    async fn finish(mut self, limit: Duration) {
        drop(self.stdin.take());
        if timeout(limit, self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

struct Server {
    url: String,
    pid: Option<u32>,
    status: StatusUrl,
    open_files: Option<u64>,
}

fn usage(message: String) -> BenchError {
    BenchError::Usage(message)
}

fn sample_all(servers: &[Server]) -> Vec<Option<ProcSample>> {
    servers
        .iter()
        .map(|s| s.pid.and_then(|pid| procstat::sample(pid).ok()))
        .collect()
}

/// `broadcast`: plans, starts the workers, waits for every client, publishes, and reports.
pub async fn run(args: BroadcastArgs, pg: Handle) -> Result<Report, BenchError> {
    args.clients.check(false)?;
    args.clients.check_legacy("broadcast")?;
    args.output.check()?;
    options::check_payload_size(args.payload_size)?;
    if !(1..=100_000).contains(&args.messages) {
        return Err(usage("--messages must be between 1 and 100000".to_owned()));
    }
    if !args.server_pids.is_empty() && args.server_pids.len() != args.urls.len() {
        return Err(usage(format!(
            "{} --server-pid for {} --url: give one per server, in the same order",
            args.server_pids.len(),
            args.urls.len()
        )));
    }
    let mut servers = Vec::new();
    for (i, url) in args.urls.iter().enumerate() {
        let pid = args.server_pids.get(i).copied();
        scenario::check_server_pid(pid)?;
        Target::resolve(url, args.clients.read_buffer).await?;
        servers.push(Server {
            url: url.clone(),
            pid,
            status: StatusUrl::beside(url)
                .ok_or_else(|| usage(format!("--url {url:?}: no /status beside it")))?,
            open_files: pid.and_then(limits::process_open_files),
        });
    }
    let db = Db::from_args(&args.db)?;
    let host = HostLimits::read();
    let capacity = servers
        .iter()
        .filter_map(|s| s.open_files)
        .min()
        .map(|limit| (limit, limits::server_capacity(limit)));
    let layout = layout(
        args.clients.clients,
        servers.len(),
        capacity,
        args.processes,
        args.source_addrs.len(),
        &host,
    );
    if layout.per_server == 0 {
        return Err(BenchError::Run(format!(
            "no client fits: {}",
            layout.limits.join("; ")
        )));
    }
    let total = layout.per_server * servers.len();
    let clock = Clock::new();
    let run: u32 = rand::random();
    let mut report = Report {
        mode: "broadcast".to_owned(),
        run,
        settings: Settings {
            channel: Some(db.channel.clone()),
            clients: total,
            publishers: 1,
            batch: args.messages as usize,
            payload_size: args.payload_size,
            messages: Some(args.messages),
            ..Settings::of_clients(&args.urls[0], &args.clients, args.output.threads)
        },
        cpus: cpus(),
        ..Report::default()
    };
    let db_clients = {
        let db = db.clone();
        pg.spawn(async move { publisher::connect(&db, 1).await })
            .await
            .map_err(scenario::lost_task)??
    };

    let sockstat_before = procstat::sockstat().ok();
    let rss_before = sample_all(&servers);
    let own_before = procstat::own();
    let machine_before = procstat::machine();
    let wall = Instant::now();
    let mut workers = Vec::new();
    for p in 0..layout.processes {
        let first_id = total * p / layout.processes;
        let spec = WorkerSpec {
            urls: args.urls.clone(),
            first_id,
            count: total * (p + 1) / layout.processes - first_id,
            sources: sources_of(&args.source_addrs, p, layout.processes),
            concurrency: args.clients.connect_concurrency,
            read_buffer: args.clients.read_buffer,
            run,
            clock_origin_ns: clock.origin_ns(),
            messages: args.messages,
            threads: args.output.threads,
        };
        workers.push(Worker::start(&spec)?);
    }

    let mut connect = ConnectStats {
        concurrency: args.clients.connect_concurrency,
        ..ConnectStats::default()
    };
    let (mut started, mut finished) = (u64::MAX, 0u64);
    let mut per_server = vec![0usize; servers.len()];
    let connected_lines = futures::future::join_all(
        workers
            .iter_mut()
            .map(|w| w.next(args.connect_timeout + Duration::from_secs(10))),
    )
    .await;
    for (p, line) in connected_lines.into_iter().enumerate() {
        match line {
            Ok(WorkerLine::Connected {
                stats,
                started_ns,
                finished_ns,
                per_server: theirs,
            }) => {
                connect.attempted += stats.attempted;
                connect.connected += stats.connected;
                connect.failed += stats.failed;
                if connect.first_error.is_none() {
                    connect.first_error = stats.first_error.clone();
                }
                if stats.each.p99_us > connect.each.p99_us {
                    connect.each = stats.each;
                }
                started = started.min(started_ns);
                finished = finished.max(finished_ns);
                for (mine, theirs) in per_server.iter_mut().zip(theirs) {
                    *mine += theirs;
                }
            }
            Ok(other) => report
                .problems
                .push(format!("worker {p}: unexpected report {other:?}")),
            Err(why) => report.problems.push(format!("worker {p}: {why}")),
        }
    }
    connect.total_s = finished.saturating_sub(started) as f64 / 1e9;
    if connect.failed > 0 {
        report.problems.push(format!(
            "{} clients could not connect (first: {})",
            connect.failed,
            connect.first_error.clone().unwrap_or_default()
        ));
    }

    let mut registered = Vec::new();
    for (server, &want) in servers.iter().zip(&per_server) {
        match server
            .status
            .wait_for_clients(want as u64, REGISTER_LIMIT)
            .await
        {
            Ok(seen) => registered.push(Some(seen)),
            Err(why) => {
                report
                    .notes
                    .push(format!("{}: {why}", server.status.display()));
                registered.push(None);
            }
        }
    }
    tokio::time::sleep(args.settle).await;
    let rss_connected = sample_all(&servers);
    let sockstat_connected = procstat::sockstat().ok();

    let plan = Plan {
        messages: Some(args.messages),
        duration: None,
        rate: None,
        batch: args.messages as usize,
        payload_size: args.payload_size,
        survive: false,
    };
    let published = {
        let db = db.clone();
        let counters = Arc::new(Counters::default());
        pg.spawn(
            async move { publisher::run(&db, db_clients, plan, clock, run, None, counters).await },
        )
        .await
        .map_err(scenario::lost_task)??
    };

    let deadline = Instant::now() + args.drain_timeout;
    let mut reached = vec![false; workers.len()];
    for (p, worker) in workers.iter_mut().enumerate() {
        match worker
            .next(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            Ok(WorkerLine::Reached) => reached[p] = true,
            Ok(other) => report
                .problems
                .push(format!("worker {p}: unexpected report {other:?}")),
            // Late: it is told to stop below, and reports what it has.
            Err(_) => {}
        }
    }
    let rss_after = sample_all(&servers);
    let sockstat_after = procstat::sockstat().ok();
    let own_after = procstat::own();
    let machine_after = procstat::machine();
    let wall_s = wall.elapsed().as_secs_f64();
    let mut done = Vec::new();
    for (p, worker) in workers.iter_mut().enumerate() {
        worker.stop().await;
        let mut line = worker.next(WORKER_STOP_LIMIT).await;
        if !reached[p] && matches!(line, Ok(WorkerLine::Reached)) {
            line = worker.next(WORKER_STOP_LIMIT).await;
        }
        match line {
            Ok(line @ WorkerLine::Done { .. }) => done.push(line),
            Ok(other) => report
                .problems
                .push(format!("worker {p}: unexpected report {other:?}")),
            Err(why) => report.problems.push(format!("worker {p}: {why}")),
        }
    }
    for worker in workers {
        worker.finish(Duration::from_secs(10)).await;
    }

    let mut broadcast = Broadcast {
        requested_per_server: args.clients.clients,
        planned_per_server: layout.per_server,
        limits: layout.limits,
        processes: layout.processes,
        source_addrs: args.source_addrs.clone(),
        connect,
        messages: args.messages,
        sockstat_before,
        sockstat_connected,
        sockstat_after,
        ..Broadcast::default()
    };
    let mut reach = new_histogram();
    let mut last = 0u64;
    let mut closes = Vec::new();
    let mut readers = 0;
    for line in done {
        let WorkerLine::Done {
            readers: theirs,
            complete,
            counts,
            closes: their_closes,
            reached_ns,
            rss_kib,
            cpu_s,
        } = line
        else {
            continue;
        };
        readers += theirs;
        broadcast.reached += complete;
        broadcast.counts.add(&counts);
        closes.extend(their_closes);
        for at in reached_ns {
            let took = at.saturating_sub(published.first_send_ns);
            last = last.max(took);
            reach.saturating_record(took.max(1));
        }
        broadcast.generator_rss_kib += rss_kib;
        broadcast.generator_cpu_s += cpu_s;
    }
    broadcast.reach = Percentiles::of(&reach);
    let everyone = broadcast.connect.connected;
    broadcast.reach_all_ms =
        (everyone > 0 && broadcast.reached == everyone).then(|| last as f64 / 1e6);
    if broadcast.reached < everyone {
        report.problems.push(format!(
            "{} of {} clients did not have every message within {:?}",
            everyone - broadcast.reached,
            everyone,
            args.drain_timeout
        ));
    }
    if readers < everyone {
        report.problems.push(format!(
            "{} connected clients were not accounted for by their workers",
            everyone - readers
        ));
    }
    if !closes.is_empty() {
        report.problems.push(format!(
            "{} clients were closed during the run ({})",
            closes.len(),
            scenario::summarise(closes.iter().cloned()).join(", ")
        ));
    }
    broadcast.closes = scenario::summarise(closes);
    for (i, server) in servers.iter().enumerate() {
        let clients = per_server[i];
        let (before, connected, after) = (rss_before[i], rss_connected[i], rss_after[i]);
        let peak = connected.map(|s| s.rss_kib).max(after.map(|s| s.rss_kib));
        broadcast.servers.push(ServerShare {
            url: server.url.clone(),
            pid: server.pid,
            open_files: server.open_files,
            capacity: server.open_files.map(limits::server_capacity),
            clients,
            registered: registered[i],
            rss_before_kib: before.map(|s| s.rss_kib),
            rss_connected_kib: connected.map(|s| s.rss_kib),
            rss_after_kib: after.map(|s| s.rss_kib),
            rss_per_client_kib: before
                .zip(peak)
                .filter(|_| clients > 0)
                .map(|(b, peak)| (peak as f64 - b.rss_kib as f64) / clients as f64),
            cpu_s: before.zip(after).map(|(b, a)| a.cpu_s - b.cpu_s),
        });
    }
    if !broadcast.limits.is_empty() {
        report.notes.push(format!(
            "planned {} clients per server rather than {}: {}",
            fmt_int(layout.per_server as u64),
            fmt_int(args.clients.clients as u64),
            broadcast.limits.join("; ")
        ));
    }
    // The servers and the workers are this run's too, not "other processes".
    let ours_cpu_s = broadcast.generator_cpu_s
        + broadcast
            .servers
            .iter()
            .filter_map(|s| s.cpu_s)
            .sum::<f64>();
    report.connect = Some(broadcast.connect.clone());
    report.broadcast = Some(broadcast);
    OwnUse {
        own: (own_before, own_after),
        machine: (machine_before, machine_after),
        wall_s,
    }
    .record(&mut report, args.output.threads, None);
    if wall_s > 0.0 {
        report.others_pct_of_core =
            (report.others_pct_of_core - ours_cpu_s * 100.0 / wall_s).max(0.0);
    }
    report.published = Some(published);
    Ok(report)
}

/// `broadcast-worker`: connects its share, says so, waits for the messages (or `stop`), and
/// reports; on a runtime of its own.
pub fn worker(args: &WorkerArgs) -> Result<(), BenchError> {
    let spec: WorkerSpec =
        serde_json::from_str(&args.spec).map_err(|err| usage(format!("--spec: {err}")))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(spec.threads.max(1))
        .enable_all()
        .build()
        .map_err(|err| BenchError::Run(format!("cannot start the runtime: {err}")))?;
    let result = runtime.block_on(work(spec));
    // Tens of thousands of sockets close faster without waiting for each task.
    runtime.shutdown_background();
    result
}

fn say(line: &WorkerLine) -> Result<(), BenchError> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, line).expect("reports serialise");
    stdout
        .write_all(b"\n")
        .and_then(|()| stdout.flush())
        .map_err(|err| BenchError::Run(format!("cannot report to the parent: {err}")))
}

async fn work(spec: WorkerSpec) -> Result<(), BenchError> {
    let clock = Clock::from_origin(spec.clock_origin_ns);
    let mut targets = Vec::new();
    for url in &spec.urls {
        targets.push(Target::resolve(url, spec.read_buffer).await?);
    }
    let dial = Dial {
        recv_buffer: None,
        sources: spec.sources.clone(),
    };
    let shared = Arc::new(Shared::new(spec.run, clock, 1, spec.count));
    for progress in &shared.progress {
        progress.0.store(GONE, Ordering::Relaxed);
    }
    // Reading from the first 101 on, so that a heartbeat during a long connect is answered.
    let readers = Readers::start(&shared, spec.threads)?;
    let mut per_server = vec![0; targets.len()];
    let started_ns = clock.now_ns();
    let ids = spec.first_id..spec.first_id + spec.count;
    let open = |target, id| fleet::open(target, &dial, id);
    let stats = clients::dial_each(&targets, ids, spec.concurrency, open, |id, opened| {
        let local = id - spec.first_id;
        per_server[id % targets.len()] += 1;
        shared.progress[local].0.store(0, Ordering::Relaxed);
        readers.add(local, opened);
    })
    .await;
    say(&WorkerLine::Connected {
        stats,
        started_ns,
        finished_ns: clock.now_ns(),
        per_server,
    })?;

    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut reached = false;
    loop {
        if !reached && shared.min_progress().is_none_or(|m| m >= spec.messages) {
            reached = true;
            say(&WorkerLine::Reached)?;
        }
        tokio::select! {
            line = stdin.next_line() => match line {
                Ok(Some(line)) if line.trim() != "stop" => {}
                // Told to stop, or the parent is gone.
                _ => break,
            },
            // Every client's arrival time is its own; this only says when all are in.
            _ = tokio::time::sleep(Duration::from_millis(10)), if !reached => {}
        }
    }
    shared.stop.cancel();
    let (results, sockets) = readers.finish()?;
    let mut counts = Counts::default();
    let (mut complete, mut reached_ns, mut closes) = (0, Vec::new(), Vec::new());
    for r in &results {
        let c = Counts::from_states(&r.states, &[spec.messages]);
        counts.add(&c);
        if c.lost == 0 {
            complete += 1;
            reached_ns.push(r.last_new_ns);
        }
        if r.end != ClientEnd::Open {
            closes.push(scenario::describe(&r.end));
        }
    }
    let own = procstat::own();
    say(&WorkerLine::Done {
        readers: results.len(),
        complete,
        counts,
        closes,
        reached_ns,
        rss_kib: own.rss_kib,
        cpu_s: own.cpu_s,
    })?;
    // Closed once reported: closing tens of thousands of sockets takes the kernel a while.
    drop(sockets);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostLimits {
        HostLimits {
            open_files: 20_000,
            file_max: 10_000_000,
            files_in_use: 1_000,
            ports: (32768, 60999),
            mem_available_kib: 24 << 20,
        }
    }

    #[test]
    fn a_server_at_its_open_files_limit_caps_the_plan_and_says_so() {
        let plan = layout(20_000, 5, Some((20_000, 19_744)), None, 5, &host());
        assert_eq!(plan.per_server, 19_744);
        // 98,720 clients at 19,936 a process: 5 processes, one per source address.
        assert_eq!(plan.processes, 5);
        assert_eq!(plan.limits.len(), 1);
        assert!(
            plan.limits[0].starts_with("open files per server process: its limit of 20,000"),
            "{:?}",
            plan.limits
        );
        assert!(plan.limits[0].contains("hold 98,720 rather than 100,000"));
    }

    #[test]
    fn processes_follow_the_open_files_limit_and_the_sources() {
        let plan = layout(19_000, 1, Some((20_000, 19_744)), None, 0, &host());
        assert_eq!((plan.per_server, plan.processes), (19_000, 1));
        assert!(plan.limits.is_empty());
        let small = HostLimits {
            open_files: 1_024,
            ..host()
        };
        let plan = layout(19_000, 1, None, Some(2), 3, &small);
        // 19,000 at 960 a process.
        assert_eq!(plan.processes, 20);
        assert!(plan.limits.is_empty());
    }

    #[test]
    fn addresses_are_shared_out_over_the_workers() {
        let ip = |last: u8| IpAddr::from([127, 0, 0, last]);
        let four = [ip(2), ip(3), ip(4), ip(5)];
        assert_eq!(sources_of(&four, 0, 1), four);
        assert_eq!(sources_of(&four, 1, 2), [ip(3), ip(5)]);
        assert_eq!(sources_of(&four[..2], 4, 5), [ip(2)]);
        assert!(sources_of(&[], 0, 3).is_empty());
        assert_eq!(address_share(0, 3), 1.0);
        assert_eq!(address_share(4, 1), 0.25);
        assert_eq!(address_share(5, 2), 0.25);
        assert_eq!(address_share(2, 5), 0.6);
    }

    #[test]
    fn ports_memory_and_descriptors_are_limits_too() {
        let plan = layout(50_000, 1, None, None, 0, &host());
        assert_eq!(plan.per_server, 28_232);
        assert!(
            plan.limits[0].starts_with("ephemeral ports"),
            "{:?}",
            plan.limits
        );
        let poor = HostLimits {
            mem_available_kib: 480_000,
            ..host()
        };
        let plan = layout(20_000, 2, None, None, 2, &poor);
        assert_eq!(plan.per_server, 5_000);
        assert!(plan.limits[0].starts_with("memory"), "{:?}", plan.limits);
        let crowded = HostLimits {
            file_max: 50_000,
            ..host()
        };
        let plan = layout(20_000, 1, None, None, 2, &crowded);
        assert_eq!(plan.per_server, 19_500);
        assert!(
            plan.limits[0].starts_with("descriptors"),
            "{:?}",
            plan.limits
        );
    }
}
