//! vulcan-stream: every PostgreSQL NOTIFY on one channel, broadcast to every websocket client.
//!
//! # Layout
//! - [`config`]: the Go original's TOML file plus environment, validated into [`Config`].
//! - [`logging`]: level names and the log target.
//! - [`event`]: payload → validated, shared [`event::Frame`]; the ping frame.
//! - [`pg`]: connection options and libpq's sslmodes on native-tls.
//! - [`receiver`]: the LISTEN connection, its health checks and reconnects.
//! - [`hub`]: connected clients, `publish`, the heartbeat.
//! - [`fanout`]: the threads that write published frames into the clients' sockets.
//! - [`client`]: one client's outgoing side: direct writes, the bounded outbox.
//! - [`subscriber`]: one client's task: reads, backlog flushes, liveness, close.
//! - [`wire`]: websocket framing (encode server frames, parse client frames).
//! - [`server`]: HTTP routes and the accept loop.
//! - [`shutdown`]: signal handling.
//! - [`limits`]: the open-files limit.
//! - [`metrics`]: Prometheus counters and gauges.
//! - [`test_client`]: the end-to-end probe behind `vulcan-stream-test-client`.
//!
//! # Flow
//! A NOTIFY reaches [`receiver::Receiver`] as a notification; [`event`] checks it once and
//! frames the original bytes once; [`hub::Hub::publish_batch`] queues that one buffer for the
//! [`fanout`] threads, each of which writes it to its share of the clients without waiting on
//! any: [`client::ClientOut`] writes it into the socket directly, or queues what the socket did
//! not take for the client's [`subscriber::Subscriber`] task to flush.

pub mod bench;
pub mod client;
pub mod config;
pub mod error;
pub mod event;
pub mod fanout;
pub mod hub;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod pg;
pub mod receiver;
pub mod server;
pub mod shutdown;
pub mod subscriber;
pub mod test_client;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use error::{ConfigError, Error};

use hub::Hub;
use metrics::Metrics;
use receiver::{ListenerState, Receiver};
use server::AppState;

/// How long clients get to receive their close frames after a stop signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Runs the service until `shutdown` is cancelled, then closes every client (1001) and the
/// database connection, waiting at most [`SHUTDOWN_GRACE`].
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    match limits::raise_open_files_limit() {
        Ok((before, after)) if before != after => {
            log::info!("open files limit raised from {before} to {after}")
        }
        Ok((_, after)) => log::info!("open files limit is {after}"),
        Err(err) => log::warn!("cannot raise the open files limit: {err}"),
    }
    let tls = pg::tls_connector(&config.receiver)?;
    let listener = server::bind(config.sender.port).await?;
    let local = listener.local_addr().map_err(|source| Error::Bind {
        addr: std::net::SocketAddr::from(([0, 0, 0, 0], config.sender.port)),
        source,
    })?;
    log::info!(
        "vulcan-stream {} listening on {local} (websocket path /{})",
        env!("CARGO_PKG_VERSION"),
        config.sender.stream_path
    );

    let metrics = Arc::new(Metrics::new());
    let hub = Arc::new(Hub::new(
        config.sender.client_queue,
        shutdown.clone(),
        metrics.clone(),
    ));
    let (state_tx, state_rx) = watch::channel(ListenerState::Connecting);
    let tasks = TaskTracker::new();

    tasks.spawn(
        Receiver {
            config: config.receiver.clone(),
            tls,
            hub: hub.clone(),
            metrics: metrics.clone(),
            state: state_tx,
            shutdown: shutdown.clone(),
        }
        .run(),
    );
    tasks.spawn(hub.clone().run_pinger(config.sender.ping_interval));
    let app = Arc::new(AppState {
        hub,
        metrics,
        listener_state: state_rx,
        sender: config.sender.clone(),
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
    });
    tasks.spawn(server::serve(listener, app));

    shutdown.cancelled().await;
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        log::warn!("some clients did not close within {SHUTDOWN_GRACE:?}; exiting anyway");
    }
    log::info!("stopped");
    Ok(())
}
