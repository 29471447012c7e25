//! Command-line options, parsed by clap in the binary and checked here.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::clients::Format;
use crate::db::Source;
use crate::error::BenchError;
use crate::payload;

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// N clients; publish M messages (or for a duration) as fast as the slowest client allows
    /// (flow-controlled by --window) or at --rate.
    Fanout(FanoutArgs),
    /// Connect N clients, wait until the server has registered them, and measure the server's
    /// RSS per connection.
    Idle(IdleArgs),
    /// The LISTEN ceiling: a bare LISTEN connection receives what the publishers send; no
    /// server involved.
    RawListen(RawListenArgs),
    /// Publishers only, no clients: what K connections commit per second (with --batch 1, one
    /// message per commit). With --source table against a server in table mode, its sequencer
    /// works beside them as it would in production.
    Publish(RawListenArgs),
    /// N reading clients plus S that connect and never read.
    Stuck(StuckArgs),
    /// Steady traffic for --duration, sampling the server's RSS.
    Soak(SoakArgs),
    /// The kernel's floor under the server's CPU per frame: a bare thread sending one frame
    /// to each of N loopback sockets per tick, and its CPU time per send; no server involved.
    SendFloor(SendFloorArgs),
    /// N clients drop their connections at once and reconnect at once, as after a replica
    /// restart: the time until every one is upgraded again and has received a NOTIFY.
    ReconnectStorm(ReconnectStormArgs),
    /// Readers at a steady rate while a storm of new connections arrives, with /status and
    /// /ready probed throughout: what the storm adds to probe and delivery latency.
    AcceptStorm(AcceptStormArgs),
    /// N clients on each of one or more servers, spread over several generator processes and
    /// local addresses: the time to connect, one NOTIFY's time to reach them all, each server's
    /// RSS per connection and the kernel's socket memory.
    Broadcast(BroadcastArgs),
    /// One generator process of a `broadcast` run (started by it, not by hand).
    #[command(hide = true)]
    BroadcastWorker(WorkerArgs),
    /// A soak with abusers beside the readers: ping floods, slowloris request heads, oversized
    /// frames, invalid UTF-8, connect/disconnect churn; RSS, the readers' sequences and how
    /// each abuser was closed.
    Abuse(AbuseArgs),
    /// Every v1 client disconnects, messages are published while they are away, then all
    /// reconnect at once with `?since=` the last position each saw: the time until every one
    /// has every missed message, checked for gaps, duplicates and order through the hand-over
    /// to live messages.
    Resume(ResumeArgs),
    /// Publish enough to fill the server's history past its byte bound (`HISTORY_BYTES`),
    /// read as fanout does: the server's RSS growth against the bound, and what `/status` says
    /// the history holds.
    History(HistoryArgs),
    /// Clients on two channels; a steady modest rate on one throughout, and a flood on the
    /// other in the middle: the quiet channel's latency during the flood against before it.
    Isolation(crate::filtered::IsolationArgs),
    /// Clients each filtered on an agent_id of its own, messages each for one random agent at a
    /// steady rate, then broadcasts beside them: the server's CPU per targeted message, their
    /// latency, and the broadcasts' time to all against unfiltered clients'.
    Targeted(crate::filtered::TargetedArgs),
    /// Publishers at a steady rate and resuming `vulcan-stream.v1` clients on replicas this
    /// run starts itself, while the servers' database connections are terminated, PostgreSQL
    /// is restarted and replicas are killed and restarted, in turn: what was lost, duplicated
    /// or reordered, whether every loss was signalled, and how long each fault interrupted
    /// delivery.
    Chaos(ChaosArgs),
    /// Judges the performance targets from the JSON reports of the standard scenarios.
    Targets(TargetsArgs),
}

/// The server under test.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// The websocket stream.
    #[arg(long, default_value = "ws://127.0.0.1:8080/stream")]
    pub url: String,
    /// The server's status JSON with a "clients" count [default: /status beside --url].
    #[arg(long)]
    pub status_url: Option<String>,
    /// The server's process: its RSS and CPU time are read from /proc/<PID>.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
}

/// The websocket clients.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Reading websocket clients.
    #[arg(long, short = 'n', default_value_t = 100)]
    pub clients: usize,
    /// Connections being opened at the same time.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// tungstenite's read buffer per client, in bytes (`broadcast`'s clients, read by hand,
    /// share one buffer per reader thread instead).
    #[arg(long, default_value_t = 4096)]
    pub read_buffer: usize,
    /// What the clients ask for: legacy websocket frames, `vulcan-stream.v1` websocket frames
    /// (the subprotocol) or Server-Sent Events. v1 and SSE clients also check that each
    /// message's position follows the one before.
    #[arg(long, value_enum, default_value_t = Format::Legacy)]
    pub format: Format,
    /// The kernel's receive buffer of each reading client, in bytes [default: the kernel's,
    /// which grows with the traffic]. A small one keeps a burst to thousands of clients out of
    /// the kernel's TCP memory: past its limit (`net.ipv4.tcp_mem`) loopback segments are
    /// dropped and retransmitted after timeouts that back off to minutes.
    #[arg(long, value_name = "BYTES")]
    pub recv_buffer: Option<u32>,
}

/// PostgreSQL.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// Connection string, e.g. "host=127.0.0.1 port=5432 user=postgres dbname=stream"
    /// [default: from PG_HOST, PG_PORT, PG_DB, PG_USER, PG_PASSWORD as the server reads them].
    #[arg(long)]
    pub db: Option<String>,
    /// The NOTIFY channel [default: PG_CHANNEL, else "events"].
    #[arg(long)]
    pub channel: Option<String>,
    /// How to publish, as the server's PG_SOURCE reads: `notify` (pg_notify) or `table`
    /// (vulcan_stream.publish, for a server in table mode).
    #[arg(long, value_enum, default_value_t = Source::Notify)]
    pub source: Source,
}

/// What to publish and how fast.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Publisher connections, each with its own sequence.
    #[arg(long, short = 'k', default_value_t = 1)]
    pub publishers: usize,
    /// Notifications per statement [default: 100 as fast as possible, 1 with --rate].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Bytes per payload.
    #[arg(long, default_value_t = 200)]
    pub payload_size: usize,
    /// Messages in total over all publishers [default: depends on the mode].
    #[arg(long, short = 'm', conflicts_with = "duration")]
    pub messages: Option<u64>,
    /// Publish for this long instead (e.g. 30s, 10m).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Messages per second over all publishers [default: as fast as possible].
    #[arg(long)]
    pub rate: Option<f64>,
    /// Without --rate: publish only while the slowest client is fewer than this many
    /// messages behind (0: no flow control). Keep it below the server's client queue.
    #[arg(long, default_value_t = 512)]
    pub window: u64,
    /// After publishing, give up waiting for missing frames after this long without progress.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub drain_timeout: Duration,
}

/// How to report, for the modes with websocket clients.
#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    #[command(flatten)]
    pub report: ReportArgs,
    /// List every client's counts.
    #[arg(long)]
    pub per_client: bool,
    /// The generator's worker threads (it shares the cores with the server).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// Where the report goes and what fails the run; every mode but `targets` has these.
#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Exit with 3 when the report lists a problem: anything lost, duplicated, reordered or
    /// left open (send-floor: a send that would have blocked or failed, a byte not read).
    #[arg(long)]
    pub strict: bool,
    /// Also write the JSON report to this file.
    #[arg(long, value_name = "FILE")]
    pub save: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub clients: ClientArgs,
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Also run a bare LISTEN connection on the same publishers and compare the server's
    /// receiver with it.
    #[arg(long)]
    pub raw_listen: bool,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ResumeArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The v1 websocket clients (--format is v1 whatever is given).
    #[command(flatten)]
    pub clients: ClientArgs,
    #[command(flatten)]
    pub db: DbArgs,
    /// Messages every client receives before they all disconnect.
    #[arg(long, default_value_t = 10)]
    pub before: u64,
    /// Messages published while the clients are away.
    #[arg(long, default_value_t = 1000)]
    pub missed: u64,
    /// Notifications per statement, before and while away (one statement is one commit).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Messages per second published while the clients come back, so that the hand-over from
    /// the history to live messages is checked (0: none).
    #[arg(long, default_value_t = 50.0)]
    pub live_rate: f64,
    /// Bytes per payload.
    #[arg(long, default_value_t = 200)]
    pub payload_size: usize,
    /// Give up on clients that have not caught up this long after the reconnect.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub resume_timeout: Duration,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ChaosArgs {
    /// The server binary: the run starts its replicas (with this process's environment, PORT
    /// and PG_SOURCE from --source), kills and restarts them, and stops them at the end; with
    /// --source table it runs `migrate` first.
    #[arg(long, value_name = "PATH")]
    pub server_bin: PathBuf,
    /// Server processes on the one PostgreSQL.
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    /// The clients, spread over the replicas (always v1 websockets: they resume by position).
    #[command(flatten)]
    pub clients: ClientArgs,
    #[command(flatten)]
    pub db: DbArgs,
    /// Publisher connections, each with its own sequence, one message per commit.
    #[arg(long, default_value_t = 2)]
    pub publishers: usize,
    /// Messages per second over all publishers.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Bytes per payload.
    #[arg(long, default_value_t = 200)]
    pub payload_size: usize,
    /// How long to publish.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub duration: Duration,
    /// A fault this often, the kinds in turn.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub fault_every: Duration,
    /// The faults to take turns at; repeat it [default: terminate, restart-db (when
    /// --restart-db is given) and kill-replica].
    #[arg(long = "fault", value_enum)]
    pub faults: Vec<crate::chaos::Fault>,
    /// A shell command that restarts PostgreSQL and returns once it accepts connections
    /// again, e.g. "pg_ctl -D DATADIR -m fast -w restart".
    #[arg(long, value_name = "COMMAND")]
    pub restart_db: Option<String>,
    /// Append each replica's log to DIR/chaos-SOURCE-N.log [default: discarded].
    #[arg(long, value_name = "DIR")]
    pub server_log_dir: Option<PathBuf>,
    /// After publishing, stop waiting for missing frames after this long without progress.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub drain_timeout: Duration,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Clone, Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub fanout: FanoutArgs,
    /// The server's HISTORY_BYTES. Without --messages, enough messages are published to fill
    /// it twice over, counting three encodings of each payload.
    #[arg(long, value_name = "BYTES")]
    pub history_bytes: u64,
}

#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub clients: ClientArgs,
    /// Wait this long after registration before reading the RSS (longer than the server's
    /// ping interval, so that what a heartbeat allocates is counted).
    #[arg(long, value_parser = parse_duration, default_value = "6s")]
    pub settle: Duration,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Clone, Args)]
pub struct RawListenArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Clone, Args)]
pub struct StuckArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub clients: ClientArgs,
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Clients that connect and never read.
    #[arg(long, default_value_t = 2)]
    pub stuck: usize,
    /// Kernel receive buffer of a stuck client, in bytes (small: it stalls sooner).
    #[arg(long, default_value_t = 4096)]
    pub stuck_recv_buffer: u32,
    /// After the run, how long to wait for the stuck clients' connections to end.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub stuck_wait: Duration,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub clients: ClientArgs,
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Read the server's RSS this often.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub sample_interval: Duration,
    /// RSS samples before this are warm-up and not judged.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub warmup: Duration,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ReconnectStormArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub clients: ClientArgs,
    #[command(flatten)]
    pub db: DbArgs,
    /// Reconnections opened at the same time [default: all of them at once].
    #[arg(long)]
    pub storm_concurrency: Option<usize>,
    /// During the storm, a NOTIFY this often: a client is served when one reaches it.
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    pub notify_every: Duration,
    /// Give up on clients not served this long after the drop.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub storm_timeout: Duration,
    /// Bytes per payload.
    #[arg(long, default_value_t = 200)]
    pub payload_size: usize,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Clone, Args)]
pub struct AcceptStormArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The readers, connected before the storm (--clients) and measured throughout.
    #[command(flatten)]
    pub clients: ClientArgs,
    #[command(flatten)]
    pub db: DbArgs,
    /// The readers' traffic: --rate defaults to 20 msg/s; it runs until the storm is over.
    #[command(flatten)]
    pub load: LoadArgs,
    /// New connections in the storm; each closes once it has its 101.
    #[arg(long, default_value_t = 10_000)]
    pub storm: usize,
    /// Keep the storm's connections open until the end: they then receive the readers'
    /// traffic too, and the delivery latency measured includes the larger fan-out.
    #[arg(long)]
    pub storm_hold: bool,
    /// Storm connections opened at the same time [default: all of them at once].
    #[arg(long)]
    pub storm_concurrency: Option<usize>,
    /// Probing and reading before the storm: the baseline.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pub baseline: Duration,
    /// Probing and reading after the storm.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub tail: Duration,
    /// One GET of /status and one of /ready this often, each on a new connection.
    #[arg(long, value_parser = parse_duration, default_value = "10ms")]
    pub probe_interval: Duration,
    /// Give up on storm connections after this long.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub storm_timeout: Duration,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Clone, Args)]
pub struct BroadcastArgs {
    /// A server's websocket stream; repeat for several servers (replicas on one PostgreSQL).
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    /// A server's process, in the order of --url: its RSS is read from /proc/<PID> and its
    /// open-files limit tells how many clients it admits.
    #[arg(long = "server-pid", value_name = "PID")]
    pub server_pids: Vec<u32>,
    /// Clients per server (--clients), opened --connect-concurrency at a time per process.
    #[command(flatten)]
    pub clients: ClientArgs,
    #[command(flatten)]
    pub db: DbArgs,
    /// Generator processes [default: as few as this process's open-files limit allows].
    #[arg(long)]
    pub processes: Option<usize>,
    /// A local address to connect from (e.g. 127.0.0.2), one per process in turn; repeat it.
    /// Each address has its own ephemeral ports.
    #[arg(long = "source-addr", value_name = "IP")]
    pub source_addrs: Vec<IpAddr>,
    /// NOTIFYs published, in one statement, once every client is connected.
    #[arg(long, default_value_t = 1)]
    pub messages: u64,
    /// Bytes per payload.
    #[arg(long, default_value_t = 200)]
    pub payload_size: usize,
    /// After every client is registered, wait this long before reading the servers' RSS
    /// (longer than the ping interval counts what a heartbeat allocates).
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub settle: Duration,
    /// Give up waiting for the NOTIFY after this long.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub drain_timeout: Duration,
    /// Give up connecting after this long.
    #[arg(long, value_parser = parse_duration, default_value = "300s")]
    pub connect_timeout: Duration,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// What to do, as JSON.
    #[arg(long)]
    pub spec: String,
}

#[derive(Debug, Clone, Args)]
pub struct AbuseArgs {
    /// The soak: the well-behaved readers (--clients) and their traffic (--rate defaults to
    /// 100 msg/s, --duration to 10m), the RSS samples.
    #[command(flatten)]
    pub soak: SoakArgs,
    /// Clients that send websocket Pings and never read.
    #[arg(long, default_value_t = 2)]
    pub ping_flooders: usize,
    /// Pings per second from each flooder (125-byte payloads).
    #[arg(long, default_value_t = 20_000)]
    pub ping_rate: u32,
    /// Connections that send their request head one byte at a time.
    #[arg(long, default_value_t = 50)]
    pub slowloris: usize,
    /// A slowloris connection sends its next byte after this long.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub slowloris_interval: Duration,
    /// The server's HandshakeTimeout: slowloris connections must be dropped then.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub handshake_timeout: Duration,
    /// Clients that, one after another, announce a frame of --big-frame-size bytes and send it.
    #[arg(long, default_value_t = 1)]
    pub big_frames: usize,
    #[arg(long, default_value_t = 10_000_000)]
    pub big_frame_size: u64,
    /// Clients that, one after another, send a text frame that is not UTF-8.
    #[arg(long, default_value_t = 1)]
    pub bad_utf8: usize,
    /// Pause of a big-frame or invalid-UTF-8 client between two attempts.
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    pub abuse_pause: Duration,
    /// Websockets opened and closed again per second.
    #[arg(long, default_value_t = 500.0)]
    pub churn_rate: f64,
}

/// Sockets, rate and frame as in the target "1,000 clients at 50 msg/s", so that the
/// server's CPU per frame there can be read against what the kernel alone costs.
#[derive(Debug, Clone, Args)]
pub struct SendFloorArgs {
    /// Loopback TCP connections, each written once per tick.
    #[arg(long, default_value_t = 1000)]
    pub sockets: usize,
    /// Ticks per second: one frame to every socket each.
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// How long to send (e.g. 10s, 1m).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Bytes of the frame's payload, as the fanout's --payload-size (the frame sent is a
    /// websocket text frame of that payload, what the server writes for it).
    #[arg(long, default_value_t = 200)]
    pub payload_size: usize,
    /// Reader threads; they share the cores with the writer as the clients share them with
    /// the server [default: one per CPU].
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub report: ReportArgs,
}

/// The JSON reports of the standard scenarios (each optional).
#[derive(Debug, Clone, Args)]
pub struct TargetsArgs {
    /// idle, 10,000 clients.
    #[arg(long)]
    pub idle: Option<PathBuf>,
    /// fanout, 1,000 clients, as fast as possible.
    #[arg(long)]
    pub fanout_max: Option<PathBuf>,
    /// fanout, 1,000 clients at 50 msg/s.
    #[arg(long)]
    pub fanout_rate: Option<PathBuf>,
    /// fanout, 10,000 clients with --raw-listen.
    #[arg(long)]
    pub connect_10k: Option<PathBuf>,
    /// stuck with --stuck 0 (the baseline).
    #[arg(long)]
    pub stuck_baseline: Option<PathBuf>,
    /// stuck with --stuck 2.
    #[arg(long)]
    pub stuck: Option<PathBuf>,
    /// soak.
    #[arg(long)]
    pub soak: Option<PathBuf>,
    /// reconnect-storm, 10,000 clients.
    #[arg(long)]
    pub reconnect_storm: Option<PathBuf>,
    /// accept-storm, 10,000 connections.
    #[arg(long)]
    pub accept_storm: Option<PathBuf>,
    /// broadcast, 19,000 clients on one server.
    #[arg(long)]
    pub connect_19k: Option<PathBuf>,
    /// broadcast, 100,000 clients over replica servers on one PostgreSQL.
    #[arg(long)]
    pub replicas: Option<PathBuf>,
    /// abuse.
    #[arg(long)]
    pub abuse: Option<PathBuf>,
    /// fanout at the maximum rate with --format legacy, v1 or sse; repeat it, one per run,
    /// rounds alternating: each format's server CPU per frame against legacy's.
    #[arg(long = "format-run", value_name = "FILE")]
    pub format_runs: Vec<PathBuf>,
    /// resume, 1,000 v1 clients.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// history, one per bound (repeat it).
    #[arg(long = "history", value_name = "FILE")]
    pub histories: Vec<PathBuf>,
    /// fanout, the 8,000-client burst with 1-second health checks.
    #[arg(long)]
    pub burst: Option<PathBuf>,
    /// The table scenario's runs, repeat it: fanout at the maximum rate, fanout at a rate and
    /// publish, each with --source table and with --source notify (alternating, so that what
    /// else runs on the machine weighs on both alike); table mode is judged against notify
    /// mode in the same run.
    #[arg(long = "table-run", value_name = "FILE")]
    pub table_runs: Vec<PathBuf>,
    /// chaos, one per source (repeat it).
    #[arg(long = "chaos", value_name = "FILE")]
    pub chaos: Vec<PathBuf>,
    /// send-floor, 1,000 sockets at 50/s: shown beside the server's CPU per frame at 50 msg/s
    /// (it does not change the verdict).
    #[arg(long)]
    pub send_floor: Option<PathBuf>,
    /// isolation: a flood on one channel beside a quiet one.
    #[arg(long)]
    pub isolation: Option<PathBuf>,
    /// targeted, 10,000 agents each filtered on its own agent_id.
    #[arg(long)]
    pub targeted: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Parses `10`, `10s`, `500ms`, `1.5s`, `10m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 30s, 500ms, 10m)"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{s:?} is out of range"))
}

impl ClientArgs {
    pub fn check(&self, allow_zero: bool) -> Result<(), BenchError> {
        if self.clients == 0 && !allow_zero {
            return usage("--clients must be at least 1");
        }
        if self.connect_concurrency == 0 {
            return usage("--connect-concurrency must be at least 1");
        }
        if !(256..=16 << 20).contains(&self.read_buffer) {
            return usage("--read-buffer must be between 256 and 16777216 bytes");
        }
        if self
            .recv_buffer
            .is_some_and(|b| !(1024..=64 << 20).contains(&b))
        {
            return usage("--recv-buffer must be between 1024 and 67108864 bytes");
        }
        Ok(())
    }

    /// For the modes whose clients are plain websockets only.
    pub fn check_legacy(&self, mode: &str) -> Result<(), BenchError> {
        if self.format != Format::Legacy {
            return usage(&format!(
                "{mode} reads legacy websocket frames only: no --format {}",
                self.format.as_str()
            ));
        }
        Ok(())
    }
}

impl LoadArgs {
    pub fn check(&self) -> Result<(), BenchError> {
        if !(1..=256).contains(&self.publishers) {
            return usage("--publishers must be between 1 and 256");
        }
        if self.batch.is_some_and(|b| !(1..=100_000).contains(&b)) {
            return usage("--batch must be between 1 and 100000");
        }
        check_payload_size(self.payload_size)?;
        if self.messages == Some(0) {
            return usage("--messages must be at least 1");
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            return usage("--duration must be positive");
        }
        if self.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
            return usage("--rate must be a positive number");
        }
        Ok(())
    }

    /// The batch size: as given, else 100 as fast as possible and 1 at a rate.
    pub fn batch(&self) -> usize {
        self.batch
            .unwrap_or(if self.rate.is_some() { 1 } else { 100 })
    }
}

impl OutputArgs {
    pub fn check(&self) -> Result<(), BenchError> {
        if !(1..=256).contains(&self.threads) {
            return usage("--threads must be between 1 and 256");
        }
        Ok(())
    }
}

impl SendFloorArgs {
    pub fn check(&self) -> Result<(), BenchError> {
        if !(1..=100_000).contains(&self.sockets) {
            return usage("--sockets must be between 1 and 100000");
        }
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= 100_000.0) {
            return usage("--rate must be a positive number of at most 100000");
        }
        if self.duration.is_zero() {
            return usage("--duration must be positive");
        }
        check_payload_size(self.payload_size)?;
        if self.threads.is_some_and(|t| !(1..=256).contains(&t)) {
            return usage("--threads must be between 1 and 256");
        }
        Ok(())
    }
}

/// `--payload-size` must hold the stamp and fit a NOTIFY.
pub fn check_payload_size(size: usize) -> Result<(), BenchError> {
    if !(payload::MIN_SIZE..=payload::MAX_SIZE).contains(&size) {
        return usage(&format!(
            "--payload-size must be between {} and {} bytes",
            payload::MIN_SIZE,
            payload::MAX_SIZE
        ));
    }
    Ok(())
}

fn usage(message: &str) -> Result<(), BenchError> {
    Err(BenchError::Usage(message.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5 days").is_err());
    }

    fn load() -> LoadArgs {
        LoadArgs {
            publishers: 1,
            batch: None,
            payload_size: 200,
            messages: None,
            duration: None,
            rate: None,
            window: 512,
            drain_timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn load_checks_and_defaults() {
        assert!(load().check().is_ok());
        assert_eq!(load().batch(), 100);
        let at_rate = LoadArgs {
            rate: Some(50.0),
            ..load()
        };
        assert_eq!(at_rate.batch(), 1);
        for bad in [
            LoadArgs {
                publishers: 0,
                ..load()
            },
            LoadArgs {
                payload_size: 10,
                ..load()
            },
            LoadArgs {
                rate: Some(-1.0),
                ..load()
            },
            LoadArgs {
                messages: Some(0),
                ..load()
            },
            LoadArgs {
                batch: Some(0),
                ..load()
            },
        ] {
            assert!(matches!(bad.check(), Err(BenchError::Usage(_))), "{bad:?}");
        }
    }
}
