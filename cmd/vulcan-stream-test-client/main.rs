//! `vulcan-stream-test-client [CONFIG] [--timeout SECS] [--url URL] [--sse | --v1] [--follow]`:
//! proves a deployment end to end, or (`--follow`) prints what the stream delivers until
//! interrupted. Exit codes: 0 when its message came back (or on Ctrl-C when following), 1 when
//! it did not (unreachable, timeout, the stream ended), 2 on bad input.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vulcan_stream::Config;
use vulcan_stream::test_client::{Delivered, Transport, default_url, follow, probe};

/// NOTIFYs a fresh check_id and waits for it on the stream; or follows the stream.
#[derive(Parser)]
#[command(
    version,
    after_help = "Environment variables override the file; see README.md."
)]
struct Args {
    /// TOML configuration file (the server's); every key has a default.
    config: Option<PathBuf>,
    /// Seconds to wait for the message (with --follow: for the connection) before failing.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
    /// URL of the stream [default: ws://localhost:<HTTPPort>/<HTTPStream>, http://… with --sse].
    #[arg(long)]
    url: Option<String>,
    /// Use Server-Sent Events instead of a websocket.
    #[arg(long)]
    sse: bool,
    /// Offer the websocket subprotocol vulcan-stream.v1: messages carry their positions.
    #[arg(long, conflicts_with = "sse")]
    v1: bool,
    /// Print every message as it arrives, one per line (its position first with --sse or
    /// --v1), until interrupted; publish nothing.
    #[arg(long)]
    follow: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load_from_process_env(args.config.as_deref()) {
        Ok(loaded) => loaded.config,
        Err(err) => {
            eprintln!("vulcan-stream-test-client: {:#}", anyhow::Error::from(err));
            return ExitCode::from(2);
        }
    };
    let transport = match (args.sse, args.v1) {
        (true, _) => Transport::Sse,
        (false, true) => Transport::WebsocketV1,
        (false, false) => Transport::Websocket,
    };
    let url = args.url.unwrap_or_else(|| default_url(&config, transport));
    let limit = Duration::from_secs(args.timeout);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("vulcan-stream-test-client: cannot start: {err}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        if !args.follow {
            let report = probe(&config, &url, transport, limit).await?;
            println!(
                "ok: check_id {} received from {url} in {:?} ({} other frames ignored)",
                report.check_id, report.elapsed, report.ignored
            );
            return Ok(());
        }
        tokio::select! {
            followed = follow(&url, transport, limit, print) => followed,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("vulcan-stream-test-client: {err}");
            ExitCode::from(1)
        }
    }
}

/// A message on stdout, one line; a reset on stderr. When stdout is gone (`| head -2`), the
/// follower has done its job.
fn print(delivered: &Delivered) {
    if let Some(line) = delivered.line() {
        if writeln!(std::io::stdout(), "{line}").is_err() {
            std::process::exit(0);
        }
    } else if let Delivered::Reset { id, reason } = delivered {
        eprintln!("vulcan-stream-test-client: reset ({reason}): continuing after {id}");
    }
}
