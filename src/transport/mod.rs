//! Transport: HTTP and websocket, the edge of the process.
//!
//! - [`accept`]: the listening socket, the accept loop and each connection's HTTP/1 server.
//! - [`routes`]: which path answers what: the stream, `/status`, `/ready`, `/metrics`.
//! - [`upgrade`]: the websocket handshake (RFC 6455 §4.2), which registers the client with the
//!   fan-out before its 101 goes out.
//! - [`admission`]: who may connect: token, Origin, `MaxClients`.
//! - [`start`]: where a client asks to start (`since`).
//! - [`subscriber`]: one websocket client's task once upgraded.
//! - [`frames`]: the parser of what clients send.
//! - [`utf8`]: the incremental UTF-8 check of the text messages clients send.
//!
//! Nothing imports this room: it is the top of the flow source → stream → fan-out → transport.

pub mod accept;
pub mod admission;
pub mod frames;
pub mod routes;
pub mod start;
pub mod subscriber;
pub mod upgrade;
pub mod utf8;

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::SenderConfig;
use crate::fanout::Hub;
use crate::metrics::Metrics;
use crate::stream::{ListenerState, Stream};

/// Every response carries a small text body, built whole.
pub type Response = hyper::Response<String>;

/// Everything a request handler needs.
pub struct AppState {
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub listener_state: watch::Receiver<ListenerState>,
    pub stream: Arc<Stream>,
    pub sender: SenderConfig,
    pub shutdown: CancellationToken,
    /// Client tasks join it, so that shutdown waits for their close handshakes.
    pub tasks: TaskTracker,
}
