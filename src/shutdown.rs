//! Signals: the first SIGTERM or SIGINT starts a graceful stop, a second one exits at once.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Exit code used when a second signal cuts the graceful stop short (128 + SIGTERM).
pub const FORCED_EXIT_CODE: i32 = 143;

/// Cancels `token` on the first signal; exits the process on the second.
pub fn install(token: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        log::info!("{name} received: closing clients and stopping (send again to exit at once)");
        token.cancel();
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        log::warn!("second {name}: exiting now");
        std::process::exit(FORCED_EXIT_CODE);
    });
    Ok(())
}
