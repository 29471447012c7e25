//! Websocket clients: connecting many at once, reading and checking every frame, and clients
//! that never read.
//!
//! Each client is one task owning its socket and its per-publisher sequence state; what other
//! tasks need while it runs (its progress, for flow control and for knowing when everything has
//! arrived) is one atomic on a cache line of its own. tungstenite's buffers are sized for
//! frames of a few hundred bytes, so ten thousand clients cost the generator little memory.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{StreamExt, stream};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use crate::error::BenchError;
use crate::payload::{self, Clock, Parsed};
use crate::stats::{Arrival, Percentiles, SeqState, SharedLatency, new_histogram};

pub type Ws = WebSocketStream<TcpStream>;

/// A client that has stopped progressing (closed or failed) shows this progress, so that flow
/// control and the drain stop waiting for it.
pub const GONE: u64 = u64::MAX;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The stream to connect to, resolved once.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
    pub config: WebSocketConfig,
}

impl Target {
    /// Resolves the host of a `ws://` URL. `read_buffer` is tungstenite's read buffer per
    /// client (its default, 128 KiB, would cost 1.3 GB for 10,000 clients).
    pub async fn resolve(url: &str, read_buffer: usize) -> Result<Target, BenchError> {
        let usage = |why: &str| BenchError::Usage(format!("--url {url:?}: {why}"));
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| usage("only ws:// URLs are supported"))?;
        let authority = rest.split('/').next().unwrap_or_default();
        let with_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let addr = tokio::net::lookup_host(with_port.as_str())
            .await
            .map_err(|err| BenchError::Server {
                url: url.to_owned(),
                cause: format!("cannot resolve {authority:?}: {err}"),
            })?
            .next()
            .ok_or_else(|| usage("the host has no address"))?;
        let config = WebSocketConfig::default()
            .read_buffer_size(read_buffer)
            // Clients only send pongs and a close: write them at once, buffer nothing.
            .write_buffer_size(0)
            .max_write_buffer_size(64 * 1024)
            .max_message_size(Some(1 << 20))
            .max_frame_size(Some(1 << 20));
        Ok(Target {
            url: url.to_owned(),
            addr,
            config,
        })
    }

    /// Opens one websocket; `recv_buffer` shrinks the kernel's receive buffer (stuck clients
    /// use it so that they stall after a few kilobytes rather than a few megabytes).
    pub async fn connect(&self, recv_buffer: Option<u32>) -> Result<Ws, String> {
        let attempt = async {
            let socket = if self.addr.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
            .map_err(|err| err.to_string())?;
            if let Some(size) = recv_buffer {
                socket
                    .set_recv_buffer_size(size)
                    .map_err(|err| err.to_string())?;
            }
            let stream = socket
                .connect(self.addr)
                .await
                .map_err(|err| err.to_string())?;
            let _ = stream.set_nodelay(true);
            let (ws, _) =
                tokio_tungstenite::client_async_with_config(&self.url, stream, Some(self.config))
                    .await
                    .map_err(|err| err.to_string())?;
            Ok(ws)
        };
        timeout(CONNECT_TIMEOUT, attempt)
            .await
            .map_err(|_| format!("no websocket within {CONNECT_TIMEOUT:?}"))?
    }
}

/// How connecting went.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectStats {
    pub attempted: usize,
    pub connected: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    /// From the first attempt until the last client has its 101.
    pub total_s: f64,
    /// Per-connection times (TCP connect plus upgrade), in microseconds.
    pub each: Percentiles,
    pub concurrency: usize,
}

/// Connects `count` clients, at most `concurrency` at a time; returns them numbered from
/// `first_id`.
pub async fn connect_all(
    target: &Target,
    first_id: usize,
    count: usize,
    concurrency: usize,
    recv_buffer: Option<u32>,
) -> (Vec<(usize, Ws)>, ConnectStats) {
    let started = Instant::now();
    let mut times = new_histogram();
    let mut stats = ConnectStats {
        attempted: count,
        concurrency,
        ..ConnectStats::default()
    };
    let mut clients = Vec::with_capacity(count);
    let mut attempts = stream::iter(first_id..first_id + count)
        .map(|id| async move {
            let t = Instant::now();
            (id, target.connect(recv_buffer).await, t.elapsed())
        })
        .buffer_unordered(concurrency.max(1));
    while let Some((id, result, took)) = attempts.next().await {
        match result {
            Ok(ws) => {
                times.saturating_record(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
                clients.push((id, ws));
            }
            Err(err) => {
                stats.failed += 1;
                stats.first_error.get_or_insert(err);
            }
        }
    }
    stats.total_s = started.elapsed().as_secs_f64();
    stats.connected = clients.len();
    stats.each = Percentiles::of(&times);
    (clients, stats)
}

/// A counter on a cache line of its own: written by one client, read by the publishers.
#[repr(align(64))]
#[derive(Debug, Default)]
pub struct Progress(pub AtomicU64);

/// What the reading clients share.
pub struct Shared {
    pub run: u32,
    pub clock: Clock,
    pub publishers: usize,
    /// Distinct bench frames each client has received, or [`GONE`].
    pub progress: Vec<Progress>,
    pub latency: SharedLatency,
    pub stop: CancellationToken,
}

impl Shared {
    pub fn new(run: u32, clock: Clock, publishers: usize, clients: usize) -> Shared {
        Shared {
            run,
            clock,
            publishers,
            progress: (0..clients).map(|_| Progress::default()).collect(),
            latency: SharedLatency::new(16),
            stop: CancellationToken::new(),
        }
    }

    /// The least progress of the clients still reading (`None`: none is).
    pub fn min_progress(&self) -> Option<u64> {
        self.progress
            .iter()
            .map(|p| p.0.load(Ordering::Relaxed))
            .filter(|&p| p != GONE)
            .min()
    }

    /// Clients still reading.
    pub fn live(&self) -> usize {
        self.progress
            .iter()
            .filter(|p| p.0.load(Ordering::Relaxed) != GONE)
            .count()
    }

    /// Sum of the progress of the clients still reading.
    pub fn total_progress(&self) -> u64 {
        self.progress
            .iter()
            .map(|p| p.0.load(Ordering::Relaxed))
            .filter(|&p| p != GONE)
            .sum()
    }
}

/// How a reading client's session ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ClientEnd {
    /// Still connected when the run ended.
    Open,
    /// The server sent a close frame.
    Closed { code: Option<u16>, reason: String },
    /// The connection ended without a close frame, or broke.
    Dropped { error: String },
}

/// One reading client's outcome.
#[derive(Debug, Clone)]
pub struct ClientResult {
    pub id: usize,
    pub states: Vec<SeqState>,
    pub pings: u64,
    pub other: u64,
    /// Arrival ([`Clock::now_ns`]) of the last frame that was new to this client.
    pub last_new_ns: u64,
    pub end: ClientEnd,
}

/// Reads and checks every frame until the run stops or the connection ends.
pub async fn read(id: usize, mut ws: Ws, shared: Arc<Shared>) -> ClientResult {
    let mut states = vec![SeqState::default(); shared.publishers];
    let mut latency = shared.latency.local(id);
    let progress = &shared.progress[id].0;
    let (mut unique, mut pings, mut other, mut last_new_ns) = (0u64, 0u64, 0u64, 0u64);
    // One stop future for the whole session: creating one per frame costs a waiter
    // registration each time.
    let stopped = shared.stop.cancelled();
    tokio::pin!(stopped);
    let end = loop {
        let message = tokio::select! {
            biased;
            _ = &mut stopped => break ClientEnd::Open,
            message = ws.next() => message,
        };
        match message {
            Some(Ok(Message::Text(text))) => match payload::parse(text.as_str(), shared.run) {
                Parsed::Bench(stamp) => {
                    let Some(state) = states.get_mut(stamp.publisher as usize) else {
                        other += 1;
                        continue;
                    };
                    if state.record(stamp.seq) == Arrival::Duplicate {
                        continue;
                    }
                    let now = shared.clock.now_ns();
                    unique += 1;
                    last_new_ns = now;
                    progress.store(unique, Ordering::Relaxed);
                    if latency.push(now.saturating_sub(stamp.sent_ns)) {
                        shared.latency.flush(&mut latency);
                    }
                }
                Parsed::Ping => pings += 1,
                Parsed::Other => other += 1,
            },
            Some(Ok(Message::Close(frame))) => {
                break ClientEnd::Closed {
                    code: frame.as_ref().map(|f| u16::from(f.code)),
                    reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                };
            }
            // Binary frames are not part of the protocol; websocket pings are answered by
            // tungstenite while we read.
            Some(Ok(Message::Binary(_))) => other += 1,
            Some(Ok(_)) => {}
            Some(Err(err)) => {
                break ClientEnd::Dropped {
                    error: err.to_string(),
                };
            }
            None => {
                break ClientEnd::Dropped {
                    error: "connection closed without a close frame".to_owned(),
                };
            }
        }
    };
    shared.latency.flush(&mut latency);
    if end != ClientEnd::Open {
        progress.store(GONE, Ordering::Relaxed);
    }
    ClientResult {
        id,
        states,
        pings,
        other,
        last_new_ns,
        end,
    }
}

/// Whether the server closed a client that never read; found by finally reading what it
/// left in the socket, until `deadline`.
pub async fn stuck_end(ws: &mut Ws, deadline: Instant) -> ClientEnd {
    loop {
        match timeout_at(deadline, ws.next()).await {
            Err(_) => return ClientEnd::Open,
            Ok(Some(Ok(Message::Close(frame)))) => {
                return ClientEnd::Closed {
                    code: frame.as_ref().map(|f| u16::from(f.code)),
                    reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                };
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(err))) => {
                return ClientEnd::Dropped {
                    error: err.to_string(),
                };
            }
            Ok(None) => {
                return ClientEnd::Dropped {
                    error: "connection closed without a close frame".to_owned(),
                };
            }
        }
    }
}
