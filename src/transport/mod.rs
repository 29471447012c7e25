//! Transport: HTTP, websocket and Server-Sent Events, the edge of the process.
//!
//! - [`accept`]: the listening socket, the accept loop, and each connection: its first request
//!   head is looked at before hyper reads it ([`head`]); a websocket handshake of the stream
//!   path goes to [`upgrade`], an event-stream request to [`sse`], anything else to hyper (one
//!   request per connection).
//! - [`head`]: that first request head, and refusals written without hyper.
//! - [`routes`]: which path answers what: the stream, `/status`, `/ready`, `/metrics`, and
//!   `/clients` for an operator with the admin token.
//! - [`upgrade`]: the websocket handshake (RFC 6455 §4.2), which registers the client with the
//!   fan-out before its 101 goes out.
//! - [`sse`]: Server-Sent Events on the stream path: the request, its 200 and preamble written
//!   on the raw socket, and one SSE client's task.
//! - [`admission`]: who may connect, by either transport, and what they read: token and claims,
//!   channel and filter, Origin, `MaxClients`.
//! - [`selection`]: the channel and filter a query string asks for.
//! - [`start`]: where a client asks to start (`since`, or an event stream's `Last-Event-ID`).
//! - [`subscriber`]: one websocket client's task once upgraded.
//! - [`frames`]: the parser of what clients send.
//! - [`utf8`]: the incremental UTF-8 check of the text messages clients send.
//!
//! Nothing imports this room: it is the top of the flow source → stream → fan-out → transport.

pub mod accept;
pub mod admission;
pub mod frames;
pub mod head;
pub mod routes;
pub mod selection;
pub mod sse;
pub mod start;
pub mod subscriber;
pub mod upgrade;
pub mod utf8;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::SenderConfig;
use crate::fanout::{ClientOut, Hub};
use crate::metrics::Metrics;
use crate::stream::{ListenerState, Stream};

/// When a client's signed token expires: the moment its connection ends.
pub struct Expiry(Option<Pin<Box<Sleep>>>);

impl Expiry {
    /// At `expires` (a token's `exp`), or never. Boxed, so that a client without one carries
    /// only a pointer's worth of it.
    pub fn at(expires: Option<SystemTime>) -> Expiry {
        Expiry(expires.map(|at| {
            let left = at.duration_since(SystemTime::now()).unwrap_or_default();
            Box::pin(tokio::time::sleep(left))
        }))
    }

    /// Resolves when the token expires; never for a client without one.
    pub async fn reached(&mut self) {
        match &mut self.0 {
            Some(sleep) => sleep.as_mut().await,
            None => std::future::pending().await,
        }
    }
}

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

/// A client task's wait for what its client sends: reads into `buf` once the socket has
/// something (`Ok(0)`: the client closed the connection), and meanwhile flushes the client's
/// outbox whenever the socket can take more of it. Cancel-safe: a task selects it against its
/// stop signal and its timers.
pub async fn read_flushing(
    socket: &TcpStream,
    out: &ClientOut,
    buf: &mut [u8],
) -> io::Result<usize> {
    loop {
        // Readiness futures do not spend tokio's cooperative budget: without this, a client
        // that floods would keep its worker thread (and what is queued on it, the receiver or
        // the accept loop) to itself.
        tokio::task::consume_budget().await;
        let backlog = out.has_backlog();
        tokio::select! {
            biased;
            readable = socket.readable() => {
                readable?;
                match socket.try_read(buf) {
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    read => return read,
                }
            }
            writable = socket.writable(), if backlog => {
                writable.and_then(|()| out.flush())?;
            }
            _ = out.backlog_signalled(), if !backlog => {}
        }
    }
}
