//! vulcan-stream: every PostgreSQL NOTIFY on its channels (or every row of its durable table),
//! delivered to the websocket and Server-Sent Events clients that want it, with positions so
//! that a client that reconnects misses nothing in silence.
//!
//! # Layout
//! One room per job; data flows one way, **source → stream → fan-out → transport**, and no
//! import points back up.
//! - [`config`]: the Go original's TOML file plus environment, validated into [`Config`].
//! - [`message`]: one accepted payload and its encodings (legacy and `vulcan-stream.v1`
//!   websocket frames, Server-Sent Events), each made once and shared; positions; the channel
//!   it came on and the agents' fields it names, which clients filter on.
//! - [`source`]: where messages come from: the `LISTEN` connection ([`source::notify`]) or the
//!   durable table ([`source::table`], its schema in [`source::schema`]), and their PostgreSQL
//!   connection options ([`source::pg`]).
//! - [`stream`]: the one path from a source to the clients: each payload checked once, given
//!   its position on its channel, kept in that channel's bounded history and published in
//!   order; resumes; epochs and resets; the heartbeat; whether the source is live.
//! - [`fanout`]: delivery: the connected clients ([`fanout::Hub`]), the shard threads that
//!   write into their sockets, each indexing its clients by channel and filter
//!   ([`fanout::shard`]), each client's outbox ([`fanout::outbox`]).
//! - [`transport`]: HTTP routes, the accept loop, the websocket handshake, Server-Sent Events,
//!   admission, and each client's task.
//! - [`auth`]: the shared token, and signed tokens (JWT) with their claims.
//! - Shared leaves: [`metrics`], [`error`], [`logging`], [`shutdown`], [`limits`].
//! - [`test_client`]: the end-to-end probe behind `vulcan-stream-test-client`.
//!
//! Who imports whom: `transport` uses `fanout`, `stream`, `auth` and `message`; `source` uses
//! `stream`; `stream` uses `fanout` and `message`; `fanout` uses `message`; the leaves
//! (`config`, `message`, `metrics`, `error`) import none of these rooms.
//!
//! # Flow
//! A NOTIFY reaches [`source::notify::Receiver`] (on a thread and a runtime of its own, so that
//! client tasks cannot delay its reads or its health check), which hands the payload to
//! [`stream::Stream::accept`]: checked once, given the next position, encoded once per format.
//! In table mode a row reaches [`source::table::TableReader`] with the position the
//! [`source::table::Sequencer`] gave it in the table, and [`stream::Stream::accept_at`] keeps it.
//! [`stream::Stream::publish`] appends the batch to the history and queues it, under one lock,
//! for the fan-out's shard threads ([`fanout::Hub::enqueue`]); each writes every client's
//! format to its share of the clients without waiting on any: the client's
//! [`fanout::ClientOut`] writes it into the socket directly, or queues what the socket did not
//! take for the client's task to flush ([`transport::subscriber::Subscriber`] for a websocket,
//! the one in [`transport::sse`] for an event stream). A client that resumes joins through
//! [`stream::Stream::join`] under the same lock: what it missed goes into its outbox first, and
//! it gets every batch queued after that, so the hand-over has neither gap nor duplicate. In
//! table mode [`stream::Stream::join_resuming`] first reads what the history no longer holds
//! from the table ([`source::table::TableArchive`]).

pub mod auth;
pub mod config;
pub mod error;
pub mod fanout;
pub mod limits;
pub mod logging;
pub mod message;
pub mod metrics;
pub mod shutdown;
pub mod source;
pub mod stream;
pub mod test_client;
pub mod transport;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use error::{ConfigError, Error};

use config::SourceKind;
use fanout::Hub;
use metrics::Metrics;
use source::notify::Receiver;
use source::table::{Sequencer, TableArchive, TableReader};
use stream::Stream;
use transport::AppState;

/// Starts the source (the LISTEN receiver, or the table's sequencer and reader) on a thread
/// named `name` and a runtime of its own; returns a future that ends when it does, for the
/// task tracker.
///
/// On the shared runtime the receiver queued behind thousands of client tasks, each flushing a
/// burst from its outbox: it went unpolled for over a second, its health query was not even
/// written before its deadline passed, and a live connection was dropped (a new epoch for every
/// client). Its own thread keeps its reads and its health check on time whatever the clients
/// do; it shares only the stream's lock and the fan-out's room with them.
fn spawn_source(
    name: &str,
    source: impl Future<Output = ()> + Send + 'static,
) -> Result<impl Future<Output = ()>, Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::ReceiverThread)?;
    let (done, ended) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            runtime.block_on(source);
            drop(done);
        })
        .map_err(Error::ReceiverThread)?;
    Ok(async move {
        let _ = ended.await;
    })
}

/// How long clients get to receive their close frames after a stop signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// `vulcan-stream migrate`: creates or upgrades the durable mode's schema (see
/// [`source::schema`]).
pub async fn migrate(config: &Config) -> Result<source::schema::Migrated, Error> {
    let tls = source::pg::tls_connector(&config.receiver)?;
    let done = source::schema::migrate(&config.receiver, &tls).await?;
    log::info!(
        "schema vulcan_stream at version {} (was {}) on {}, lineage {}",
        done.to,
        done.from,
        source::schema::target(&config.receiver),
        done.epoch
    );
    Ok(done)
}

/// Runs the service until `shutdown` is cancelled, then closes every client (1001) and the
/// database connection, waiting at most [`SHUTDOWN_GRACE`].
pub async fn run(mut config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let open_files = match limits::raise_open_files_limit() {
        Ok((before, after)) => {
            if before == after {
                log::info!("open files limit is {after}");
            } else {
                log::info!("open files limit raised from {before} to {after}");
            }
            Some(after)
        }
        Err(err) => {
            log::warn!("cannot raise the open files limit: {err}");
            None
        }
    };
    // A client holds a descriptor: past the limit, accepts fail instead of answering 503.
    if let Some(limit) = open_files {
        let fits = limits::client_capacity(limit);
        if config.sender.max_clients > fits {
            log::info!(
                "MaxClients lowered from {} to {fits}: the open files limit is {limit}, and {} \
                 descriptors are kept for the database, handshakes and HTTP requests",
                config.sender.max_clients,
                limits::reserved_descriptors(limit)
            );
            config.sender.max_clients = fits;
        }
    }
    if config.receiver.sslmode == config::SslMode::Disable && config.receiver.ca.is_some() {
        log::warn!(
            "PG_CA_B64 (Receiver.DBCA) is set, but sslmode is disable: the connection to \
             PostgreSQL is not encrypted and the CA is not used; set PG_SSLMODE to verify-full \
             to use it"
        );
    }
    let tls = source::pg::tls_connector(&config.receiver)?;
    let listener = transport::accept::bind(config.sender.port).await?;
    let local = listener.local_addr().map_err(|source| Error::Bind {
        addr: std::net::SocketAddr::from(([0, 0, 0, 0], config.sender.port)),
        source,
    })?;
    log::info!(
        "vulcan-stream {} listening on {local} (stream path /{}, websocket and SSE)",
        env!("CARGO_PKG_VERSION"),
        config.sender.stream_path
    );

    let metrics = Arc::new(Metrics::new());
    let hub = Arc::new(Hub::new(
        config.sender.client_queue,
        shutdown.clone(),
        metrics.clone(),
    ));
    let limits = stream::HistoryLimits {
        max_messages: config.sender.history_messages,
        max_bytes: config.sender.history_bytes,
        max_age: config.sender.history_age,
    };
    let channels = config.receiver.channels();
    let stream = Arc::new(match config.receiver.source {
        SourceKind::Notify => Stream::with_channels(hub.clone(), metrics.clone(), limits, channels),
        SourceKind::Table => {
            let archive = TableArchive::new(config.receiver.clone(), tls.clone());
            Stream::new_durable(
                hub.clone(),
                metrics.clone(),
                limits,
                channels,
                Arc::new(archive),
            )
        }
    });
    let tasks = TaskTracker::new();

    match config.receiver.source {
        SourceKind::Notify => {
            let receiver = Receiver {
                config: config.receiver.clone(),
                tls,
                stream: stream.clone(),
                metrics: metrics.clone(),
                shutdown: shutdown.clone(),
            };
            tasks.spawn(spawn_source("receiver", receiver.run())?);
        }
        SourceKind::Table => {
            let sequencer = Sequencer {
                config: config.receiver.clone(),
                tls: tls.clone(),
                metrics: metrics.clone(),
                shutdown: shutdown.clone(),
            };
            let reader = TableReader {
                config: config.receiver.clone(),
                tls,
                stream: stream.clone(),
                metrics: metrics.clone(),
                shutdown: shutdown.clone(),
            };
            let source = async move {
                tokio::join!(sequencer.run(), reader.run());
            };
            tasks.spawn(spawn_source("table-source", source)?);
        }
    }
    tasks.spawn(
        stream
            .clone()
            .run_heartbeat(config.sender.ping_interval, shutdown.clone()),
    );
    let app = Arc::new(AppState {
        hub,
        metrics,
        listener_state: stream.listener_state(),
        stream: stream.clone(),
        sender: config.sender.clone(),
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
    });
    tasks.spawn(transport::accept::serve(listener, app));

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
