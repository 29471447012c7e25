//! `vulcan-stream [CONFIG]`: the server. Exit codes: 0 after a clean stop, 1 when it cannot
//! run (port taken, log file unwritable), 2 on bad configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use vulcan_stream::{Config, logging, shutdown};

/// Broadcasts every PostgreSQL NOTIFY on a channel to every websocket client of /stream.
#[derive(Parser)]
#[command(
    version,
    after_help = "Environment variables override the file; see README.md."
)]
struct Args {
    /// TOML configuration file (the Go original's format); every key has a default.
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let loaded = match Config::load_from_process_env(args.config.as_deref()) {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("vulcan-stream: {:#}", anyhow::Error::from(err));
            return ExitCode::from(2);
        }
    };
    if let Err(err) = logging::init(&loaded.config.logger) {
        eprintln!("vulcan-stream: {:#}", anyhow::Error::from(err));
        return ExitCode::from(1);
    }
    if !loaded.unknown_keys.is_empty() {
        log::warn!(
            "ignoring unknown configuration keys: {}",
            loaded.unknown_keys.join(", ")
        );
    }
    match serve(loaded.config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            log::error!("{err:#}");
            eprintln!("vulcan-stream: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let token = CancellationToken::new();
        shutdown::install(token.clone())?;
        vulcan_stream::run(config, token).await?;
        Ok(())
    })
}
