//! `vulcan-stream [CONFIG]`: the server; `vulcan-stream migrate [CONFIG]`: creates or upgrades
//! the durable mode's schema. Exit codes: 0 after a clean stop (or a migration done), 1 when it
//! cannot run (port taken, log file unwritable, database unreachable), 2 on bad configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use vulcan_stream::{Config, logging, shutdown};

/// Broadcasts every PostgreSQL NOTIFY on a channel to every websocket client of /stream.
#[derive(Parser)]
#[command(
    version,
    args_conflicts_with_subcommands = true,
    after_help = "Environment variables override the file; see README.md."
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file (the Go original's format); every key has a default.
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Creates or upgrades the schema vulcan_stream (table mode), then exits.
    Migrate {
        /// The server's configuration file: the database settings and MaxPayload.
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (migrating, path) = match args.command {
        Some(Command::Migrate { config }) => (true, config),
        None => (false, args.config),
    };
    let loaded = match Config::load_from_process_env(path.as_deref()) {
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
    let result = if migrating {
        migrate(loaded.config)
    } else {
        serve(loaded.config)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            log::error!("{err:#}");
            eprintln!("vulcan-stream: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn migrate(config: Config) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(vulcan_stream::migrate(&config))?;
    Ok(())
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
