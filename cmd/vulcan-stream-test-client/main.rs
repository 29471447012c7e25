//! `vulcan-stream-test-client [CONFIG] [--timeout SECS] [--url WS_URL]`: proves a deployment end
//! to end. Exit codes: 0 when its message came back, 1 when it did not (unreachable, timeout),
//! 2 on bad input.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vulcan_stream::Config;
use vulcan_stream::test_client::{default_url, probe};

/// NOTIFYs a fresh check_id and waits for it on the websocket stream.
#[derive(Parser)]
#[command(
    version,
    after_help = "Environment variables override the file; see README.md."
)]
struct Args {
    /// TOML configuration file (the server's); every key has a default.
    config: Option<PathBuf>,
    /// Seconds to wait for the message before failing.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
    /// Websocket URL of the stream [default: ws://localhost:<HTTPPort>/<HTTPStream>].
    #[arg(long)]
    url: Option<String>,
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
    let url = args.url.unwrap_or_else(|| default_url(&config));
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("vulcan-stream-test-client: cannot start: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(probe(&config, &url, Duration::from_secs(args.timeout))) {
        Ok(report) => {
            println!(
                "ok: check_id {} received from {url} in {:?} ({} other frames ignored)",
                report.check_id, report.elapsed, report.ignored
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("vulcan-stream-test-client: {err}");
            ExitCode::from(1)
        }
    }
}
