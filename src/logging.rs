//! Logging setup: the configured level (refined by `RUST_LOG`), to stderr or appended to a file.

use std::fs::OpenOptions;
use std::io::Write as _;

use crate::config::LoggerConfig;
use crate::error::Error;

/// Installs the global logger. `RUST_LOG` directives, when set, are applied on top of the
/// configured level (e.g. `RUST_LOG=vulcan_stream::receiver=trace`).
pub fn init(config: &LoggerConfig) -> Result<(), Error> {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(config.level);
    // Dependencies are chatty at debug (hyper, tokio-postgres); keep them at info unless
    // RUST_LOG asks for more.
    for noisy in [
        "hyper",
        "hyper_util",
        "tokio_postgres",
        "tungstenite",
        "tokio_tungstenite",
    ] {
        builder.filter_module(noisy, config.level.min(log::LevelFilter::Info));
    }
    if let Ok(directives) = std::env::var("RUST_LOG") {
        builder.parse_filters(&directives);
    }
    builder.format(|buf, record| {
        writeln!(
            buf,
            "{} {:<5} {}",
            buf.timestamp_millis(),
            record.level(),
            record.args()
        )
    });
    if let Some(path) = &config.file {
        let mut options = OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(path).map_err(|source| Error::LogFile {
            path: path.clone(),
            source,
        })?;
        builder.target(env_logger::Target::Pipe(Box::new(file)));
    }
    // A second init (tests) keeps the first logger.
    let _ = builder.try_init();
    Ok(())
}
