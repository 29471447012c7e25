//! `vulcan-stream-bench`: a load generator for any server of this protocol (PostgreSQL
//! NOTIFY in, one websocket text frame per notification out), and the judge of the project's
//! performance targets.
//!
//! # Layout
//! - [`options`]: the command line (clap) and its checks.
//! - [`payload`]: the stamped, padded JSON payload, its parser, the shared monotonic clock.
//! - [`clients`]: connecting many clients (websockets, legacy or `vulcan-stream.v1`, or event
//!   streams), reading and checking frames and positions, stuck clients; [`sse`], the
//!   Server-Sent Events client.
//! - [`db`], [`publisher`]: PostgreSQL connections; batched, paced, flow-controlled
//!   `pg_notify`, or `vulcan_stream.publish` for a server in table mode (`--source table`).
//! - [`listen`]: a bare LISTEN connection, the ceiling the server is compared with.
//! - [`stats`]: lost / duplicated / out-of-order bookkeeping and latency histograms.
//! - [`procstat`]: RSS and CPU time from `/proc` and `getrusage`; the kernel's socket counts.
//! - [`status`]: the server's `/status` counts, health probes and `/metrics` counters.
//! - [`scenario`]: the modes, each one measured window.
//! - [`storm`]: `reconnect-storm`, every client reconnecting at once; `accept-storm`, a storm
//!   of new connections beside readers and health probes.
//! - [`broadcast`]: `broadcast`, many clients on one or more servers from several worker
//!   processes and local addresses; [`limits`], the machine's limits it plans against;
//!   [`fleet`], its clients, raw websockets read by a few epoll threads.
//! - [`abuse`]: the abusers of `abuse`, a soak beside ping floods, slowloris, oversized
//!   frames, invalid UTF-8 and connect churn; [`rawws`], the hand-made websocket they use.
//! - [`resume`]: `resume`, every v1 client reconnecting at once with the position it last
//!   saw, and the time until each has what it missed.
//! - [`filtered`]: `isolation`, a flood on one channel beside a quiet one; `targeted`, messages
//!   each for one of thousands of filtered clients, beside broadcasts to all.
//! - [`chaos`]: `chaos`, publishers and resuming clients on replicas it starts itself, while
//!   database connections are terminated, PostgreSQL restarts and replicas are killed.
//! - [`floor`]: `send-floor`, the kernel's cost of bare loopback sends, without a server.
//! - [`report`]: the result as JSON or a table.
//! - [`targets`]: the project's targets judged from the reports of the standard scenarios.
//!
//! # Measuring
//! Payloads carry the send time on the generator's monotonic clock, so NOTIFY → frame latency
//! needs no clock synchronisation. The generator shares the machine with the server and
//! PostgreSQL, so it reports its own CPU time next to the server's, and the server's CPU per
//! delivered frame, which does not depend on how the cores were shared.

pub mod abuse;
pub mod broadcast;
pub mod chaos;
pub mod clients;
pub mod db;
pub mod error;
pub mod filtered;
pub mod fleet;
pub mod floor;
pub mod limits;
pub mod listen;
pub mod options;
pub mod payload;
pub mod procstat;
pub mod publisher;
pub mod rawws;
pub mod report;
pub mod resume;
pub mod scenario;
pub mod sse;
pub mod stats;
pub mod status;
pub mod storm;
pub mod targets;

pub use error::BenchError;
pub use options::Command;
pub use report::Report;

/// What to print and how to exit.
#[derive(Debug)]
pub struct Output {
    pub text: String,
    /// 0: fine; 3: `--strict` and something was lost, or a target failed.
    pub exit_code: u8,
    /// One line per problem, for stderr.
    pub problems: Vec<String>,
}

/// Runs one command to completion on its own runtime.
pub fn run(command: Command) -> Result<Output, BenchError> {
    // Best effort: a run too big for the limit left fails when it opens the socket too many,
    // and says so.
    let _ = raise_open_files_limit();
    let output = match &command {
        Command::Targets(args) => {
            let (text, passed) = targets::run(args)?;
            return Ok(Output {
                text,
                exit_code: if passed { 0 } else { 3 },
                problems: Vec::new(),
            });
        }
        Command::SendFloor(args) => return finish(floor::run(args)?, &args.report),
        Command::BroadcastWorker(args) => {
            broadcast::worker(args)?;
            return Ok(Output {
                text: String::new(),
                exit_code: 0,
                problems: Vec::new(),
            });
        }
        Command::Fanout(a) => a.output.clone(),
        Command::Idle(a) => a.output.clone(),
        Command::RawListen(a) | Command::Publish(a) => a.output.clone(),
        Command::Stuck(a) => a.output.clone(),
        Command::Soak(a) => a.output.clone(),
        Command::ReconnectStorm(a) => a.output.clone(),
        Command::AcceptStorm(a) => a.output.clone(),
        Command::Broadcast(a) => a.output.clone(),
        Command::Abuse(a) => a.soak.output.clone(),
        Command::Resume(a) => a.output.clone(),
        Command::History(a) => a.fanout.output.clone(),
        Command::Isolation(a) => a.output.clone(),
        Command::Targeted(a) => a.output.clone(),
        Command::Chaos(a) => a.output.clone(),
    };
    let report = run_load(command, output.threads)?;
    finish(report, &output.report)
}

/// Lifts the soft limit on open files to the hard limit and returns it: thousands of sockets
/// would stop at the usual soft limit of 1024, and raising it up to the hard limit needs no
/// privilege.
fn raise_open_files_limit() -> std::io::Result<libc::rlim_t> {
    let mut nofile = std::mem::MaybeUninit::<libc::rlimit>::uninit();
    // SAFETY: getrlimit fills the struct when it returns 0, and only then is it read.
    let nofile = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, nofile.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        nofile.assume_init()
    };
    let lifted = libc::rlimit {
        rlim_cur: nofile.rlim_max,
        ..nofile
    };
    // SAFETY: setrlimit only reads the struct, which lives across the call.
    match unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lifted) } {
        0 => Ok(lifted.rlim_cur),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Runs a mode with websocket clients: the readers on `threads` workers, the publishers apart.
fn run_load(command: Command, threads: usize) -> Result<Report, BenchError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .map_err(|err| BenchError::Run(format!("cannot start the runtime: {err}")))?;
    // The publishers get a thread of their own: on the readers' runtime, an open-loop
    // publisher would wait behind thousands of websocket readers and slow itself down.
    let publishers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("publishers")
        .enable_all()
        .build()
        .map_err(|err| BenchError::Run(format!("cannot start the runtime: {err}")))?;
    let report = runtime.block_on(scenario::run(command, publishers.handle().clone()));
    // Tens of thousands of sockets close faster without waiting for each task.
    runtime.shutdown_background();
    publishers.shutdown_background();
    report
}

/// Saves and formats a report; with `--strict`, a report with problems exits with 3.
fn finish(report: Report, output: &options::ReportArgs) -> Result<Output, BenchError> {
    let json = serde_json::to_string_pretty(&report).expect("reports serialise") + "\n";
    if let Some(path) = &output.save {
        std::fs::write(path, &json)
            .map_err(|err| BenchError::Run(format!("{}: {err}", path.display())))?;
    }
    let text = if output.json { json } else { report.table() };
    Ok(Output {
        text,
        exit_code: if output.strict && !report.problems.is_empty() {
            3
        } else {
            0
        },
        problems: report.problems,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn open_files_limit_is_lifted_to_the_hard_limit() {
        let lifted = super::raise_open_files_limit().expect("getrlimit and setrlimit work");
        assert_eq!(super::raise_open_files_limit().ok(), Some(lifted));
    }
}
