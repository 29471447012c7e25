//! Websocket clients: connecting many at once, reading and checking every frame, and clients
//! that never read.
//!
//! Each client is one task owning its socket and its per-publisher sequence state; what other
//! tasks need while it runs (its progress, for flow control and for knowing when everything has
//! arrived) is one atomic on a cache line of its own. tungstenite's buffers are sized for
//! frames of a few hundred bytes, so ten thousand clients cost the generator little memory.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{StreamExt, stream};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use crate::error::BenchError;
use crate::payload::{self, Clock, Parsed, Stamp};
use crate::stats::{Arrival, LocalLatency, Percentiles, SeqState, SharedLatency, new_histogram};

pub type Ws = WebSocketStream<TcpStream>;

/// A client that has stopped progressing (closed or failed) shows this progress, so that flow
/// control and the drain stop waiting for it.
pub const GONE: u64 = u64::MAX;

pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest response head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// The stream to connect to, resolved once.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
    /// The URL's host and port, as a `Host` header names them.
    pub authority: String,
    /// The URL's path and query.
    pub path: String,
    pub config: WebSocketConfig,
    /// What the clients ask for: plain websocket frames, `vulcan-stream.v1` (the subprotocol)
    /// or Server-Sent Events on the same path.
    pub format: Format,
}

/// The wire format a reading client asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The Go original's frames: each payload as a text frame.
    #[default]
    Legacy,
    /// A websocket offering the `vulcan-stream.v1` subprotocol: `{"id":…,"data":…}` frames.
    V1,
    /// Server-Sent Events (`Accept: text/event-stream`) over a plain HTTP/1.1 GET.
    Sse,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Legacy => "legacy",
            Format::V1 => "v1",
            Format::Sse => "sse",
        }
    }
}

/// The subprotocol that opts a websocket into positions and resume.
pub const V1_PROTOCOL: &str = "vulcan-stream.v1";

impl Target {
    /// Resolves the host of a `ws://` URL. `read_buffer` is tungstenite's read buffer per
    /// client (its default, 128 KiB, would cost 1.3 GB for 10,000 clients).
    pub async fn resolve(url: &str, read_buffer: usize) -> Result<Target, BenchError> {
        let usage = |why: &str| BenchError::Usage(format!("--url {url:?}: {why}"));
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| usage("only ws:// URLs are supported"))?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
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
            authority: authority.to_owned(),
            path,
            config,
            format: Format::Legacy,
        })
    }

    /// The same stream, read in `format`.
    pub fn with_format(mut self, format: Format) -> Target {
        self.format = format;
        self
    }

    /// The same stream with `name=value` added to the query (a resume's `since`).
    pub fn with_query(&self, name: &str, value: &str) -> Target {
        let separator = if self.path.contains('?') { '&' } else { '?' };
        let mut target = self.clone();
        target.path = format!("{}{separator}{name}={value}", self.path);
        target.url = format!("{}{separator}{name}={value}", self.url);
        target
    }

    /// A TCP connection to the stream's address as `dial` says, for client `id`.
    pub async fn dial_tcp(&self, dial: &Dial, id: usize) -> Result<TcpStream, String> {
        let socket = if self.addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|err| err.to_string())?;
        if let Some(size) = dial.recv_buffer {
            socket
                .set_recv_buffer_size(size)
                .map_err(|err| err.to_string())?;
        }
        if let Some(source) = dial.source(id) {
            bind_source(&socket, source)?;
        }
        let stream = socket
            .connect(self.addr)
            .await
            .map_err(|err| err.to_string())?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Sends `request` on a connected `stream` and reads the response up to the end of its
    /// head: the head as text, and the bytes that followed it in the same reads.
    pub async fn request_head(
        stream: &mut TcpStream,
        request: &str,
    ) -> Result<(String, Vec<u8>), String> {
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|err| err.to_string())?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > MAX_HEAD {
                return Err("response head too long".to_owned());
            }
            match stream.read(&mut chunk).await {
                Ok(0) => return Err("connection closed before the response head".to_owned()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(err) => return Err(err.to_string()),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        Ok((head, buf))
    }

    /// Opens reading client number `id` in the target's format.
    pub async fn open(&self, dial: &Dial, id: usize) -> Result<Conn, String> {
        match self.format {
            Format::Sse => crate::sse::SseStream::open(self, dial, id)
                .await
                .map(|sse| Conn::Sse(Box::new(sse))),
            Format::Legacy | Format::V1 => self.connect(dial, id).await.map(|ws| Conn::Ws {
                ws: Box::new(ws),
                v1: self.format == Format::V1,
            }),
        }
    }

    /// Opens websocket number `id` as `dial` says; with the v1 format it offers the
    /// subprotocol (tungstenite then requires the server to accept it).
    pub async fn connect(&self, dial: &Dial, id: usize) -> Result<Ws, String> {
        let attempt = async {
            let stream = self.dial_tcp(dial, id).await?;
            let mut request = self
                .url
                .as_str()
                .into_client_request()
                .map_err(|err| err.to_string())?;
            if self.format == Format::V1 {
                request.headers_mut().insert(
                    "Sec-WebSocket-Protocol",
                    HeaderValue::from_static(V1_PROTOCOL),
                );
            }
            let (ws, _) =
                tokio_tungstenite::client_async_with_config(request, stream, Some(self.config))
                    .await
                    .map_err(|err| err.to_string())?;
            Ok(ws)
        };
        timeout(CONNECT_TIMEOUT, attempt)
            .await
            .map_err(|_| format!("no websocket within {CONNECT_TIMEOUT:?}"))?
    }
}

/// A reading client's connection: a websocket (v1 or not) or an event stream.
pub enum Conn {
    Ws { ws: Box<Ws>, v1: bool },
    Sse(Box<crate::sse::SseStream>),
}

impl Conn {
    /// A plain websocket, read as legacy frames.
    pub fn legacy(ws: Ws) -> Conn {
        Conn::Ws {
            ws: Box::new(ws),
            v1: false,
        }
    }
}

/// How clients open their connections.
#[derive(Debug, Clone, Default)]
pub struct Dial {
    /// Shrinks the kernel's receive buffer (stuck clients use it so that they stall after a
    /// few kilobytes rather than a few megabytes).
    pub recv_buffer: Option<u32>,
    /// Local addresses to connect from, client `id` from `sources[id % len]` (none: the
    /// kernel's choice). Each local address has its own ephemeral ports.
    pub sources: Vec<IpAddr>,
}

impl Dial {
    pub fn recv_buffer(size: Option<u32>) -> Dial {
        Dial {
            recv_buffer: size,
            sources: Vec::new(),
        }
    }

    fn source(&self, id: usize) -> Option<IpAddr> {
        (!self.sources.is_empty()).then(|| self.sources[id % self.sources.len()])
    }
}

/// Binds `socket` to `source` before it connects. The port is left to `connect`
/// (`IP_BIND_ADDRESS_NO_PORT`), which needs it unique only per destination: a plain bind to
/// port 0 would take one of the address's ports for good, whatever the destination.
fn bind_source(socket: &TcpSocket, source: IpAddr) -> Result<(), String> {
    if source.is_ipv4() {
        let on: libc::c_int = 1;
        // SAFETY: the descriptor is the socket's own, the option value an int that outlives the
        // call, and its length is given.
        let set = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&raw const on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(format!(
                "IP_BIND_ADDRESS_NO_PORT: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|err| format!("cannot bind to {source}: {err}"))
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

/// Connects `count` websockets, at most `concurrency` at a time; returns them numbered from
/// `first_id`.
pub async fn connect_all(
    target: &Target,
    first_id: usize,
    count: usize,
    concurrency: usize,
    dial: &Dial,
) -> (Vec<(usize, Ws)>, ConnectStats) {
    let ids = first_id..first_id + count;
    dial_all(target, ids, concurrency, |t, id| t.connect(dial, id)).await
}

/// [`connect_all`] in the target's format: websockets or event streams.
pub async fn open_all(
    target: &Target,
    first_id: usize,
    count: usize,
    concurrency: usize,
    dial: &Dial,
) -> (Vec<(usize, Conn)>, ConnectStats) {
    let ids = first_id..first_id + count;
    dial_all(target, ids, concurrency, |t, id| t.open(dial, id)).await
}

/// [`dial_each`] to one target, collecting the connections.
async fn dial_all<'t, C, Open>(
    target: &'t Target,
    ids: Range<usize>,
    concurrency: usize,
    open: impl Fn(&'t Target, usize) -> Open,
) -> (Vec<(usize, C)>, ConnectStats)
where
    Open: Future<Output = Result<C, String>>,
{
    let mut clients = Vec::with_capacity(ids.len());
    let targets = std::slice::from_ref(target);
    let stats = dial_each(targets, ids, concurrency, open, |id, conn| {
        clients.push((id, conn));
    })
    .await;
    (clients, stats)
}

/// Connects the websockets numbered `ids`, client `id` to `targets[id % targets.len()]`, at
/// most `concurrency` at a time, handing each to `connected` as soon as it has its 101.
pub async fn connect_each(
    targets: &[Target],
    ids: Range<usize>,
    concurrency: usize,
    dial: &Dial,
    connected: impl FnMut(usize, Ws),
) -> ConnectStats {
    dial_each(
        targets,
        ids,
        concurrency,
        |t, id| t.connect(dial, id),
        connected,
    )
    .await
}

/// Opens the connections numbered `ids` with `open`, connection `id` to
/// `targets[id % targets.len()]`, at most `concurrency` at a time, handing each to `connected`
/// as soon as it is open.
pub async fn dial_each<'t, C, Open>(
    targets: &'t [Target],
    ids: Range<usize>,
    concurrency: usize,
    open: impl Fn(&'t Target, usize) -> Open,
    mut connected: impl FnMut(usize, C),
) -> ConnectStats
where
    Open: Future<Output = Result<C, String>>,
{
    let started = Instant::now();
    let mut times = new_histogram();
    let mut stats = ConnectStats {
        attempted: ids.len(),
        concurrency,
        ..ConnectStats::default()
    };
    let open = &open;
    let mut attempts = stream::iter(ids)
        .map(|id| async move {
            let t = Instant::now();
            let result = open(&targets[id % targets.len()], id).await;
            (id, result, t.elapsed())
        })
        .buffer_unordered(concurrency.max(1));
    while let Some((id, result, took)) = attempts.next().await {
        match result {
            Ok(conn) => {
                times.saturating_record(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
                stats.connected += 1;
                connected(id, conn);
            }
            Err(err) => {
                stats.failed += 1;
                stats.first_error.get_or_insert(err);
            }
        }
    }
    stats.total_s = started.elapsed().as_secs_f64();
    stats.each = Percentiles::of(&times);
    stats
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
    /// The same latencies split by when each message was sent, when a mode asks for it.
    pub phases: Option<Phases>,
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
            phases: None,
            stop: CancellationToken::new(),
        }
    }

    /// [`Shared::new`], with latencies also kept per phase.
    pub fn with_phases(run: u32, clock: Clock, publishers: usize, clients: usize) -> Shared {
        Shared {
            phases: Some(Phases::new()),
            ..Shared::new(run, clock, publishers, clients)
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

/// Latencies in three phases by send time: before the first bound, up to the second, after.
/// Bounds are [`Clock::now_ns`] values; until set they are `u64::MAX`, so everything counts as
/// before.
pub struct Phases {
    bounds: [AtomicU64; 2],
    pub latency: [SharedLatency; 3],
}

impl Phases {
    fn new() -> Phases {
        Phases {
            bounds: [AtomicU64::new(u64::MAX), AtomicU64::new(u64::MAX)],
            latency: std::array::from_fn(|_| SharedLatency::new(4)),
        }
    }

    /// Messages sent from `at_ns` on belong to phase `phase` (1 or 2).
    pub fn begin(&self, phase: usize, at_ns: u64) {
        self.bounds[phase - 1].store(at_ns, Ordering::Relaxed);
    }

    fn phase_of(&self, sent_ns: u64) -> usize {
        self.bounds
            .iter()
            .take_while(|b| sent_ns >= b.load(Ordering::Relaxed))
            .count()
    }

    fn locals(&self, id: usize) -> [LocalLatency; 3] {
        std::array::from_fn(|phase| self.latency[phase].local(id))
    }

    fn record(&self, locals: &mut [LocalLatency; 3], sent_ns: u64, ns: u64) {
        let phase = self.phase_of(sent_ns);
        if locals[phase].push(ns) {
            self.latency[phase].flush(&mut locals[phase]);
        }
    }

    fn flush(&self, locals: &mut [LocalLatency; 3]) {
        for (shared, local) in self.latency.iter().zip(locals) {
            shared.flush(local);
        }
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

/// What a client that reads positions (v1, SSE) saw of them. Every message of the stream has
/// the position after the one before it, so a client that checks them sees what no sequence of
/// its own could: a message of another run or publisher lost or repeated, and whether a resume
/// went on exactly where it left off.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Positions {
    /// Messages whose position was read.
    pub seen: u64,
    /// Messages more than one past the previous one of their epoch: some were skipped.
    pub gaps: u64,
    /// Messages not after the previous one of their epoch: repeated or reordered.
    pub repeats: u64,
    /// Messages of an epoch other than the previous message's, without a reset between.
    pub epoch_changes: u64,
    /// Reset events received.
    pub resets: u64,
}

impl Positions {
    pub fn add(&mut self, other: &Positions) {
        self.seen += other.seen;
        self.gaps += other.gaps;
        self.repeats += other.repeats;
        self.epoch_changes += other.epoch_changes;
        self.resets += other.resets;
    }

    /// Nothing skipped, repeated or reset.
    pub fn is_clean(&self) -> bool {
        self.gaps == 0 && self.repeats == 0 && self.epoch_changes == 0 && self.resets == 0
    }
}

/// Follows one client's positions: the last one it saw, and what broke the sequence.
#[derive(Debug, Clone, Default)]
pub struct PositionTrack {
    pub counts: Positions,
    /// The last position seen (message or reset), as the server wrote it; empty before any.
    last: String,
    /// Its epoch (the part before the last `-`) and offset.
    epoch_len: usize,
    offset: u64,
}

impl PositionTrack {
    /// Starts after `position` (a resume's `since`).
    pub fn after(position: &str) -> PositionTrack {
        let mut track = PositionTrack::default();
        track.set(position);
        track
    }

    /// The last position seen, to resume from.
    pub fn last(&self) -> Option<&str> {
        (!self.last.is_empty()).then_some(self.last.as_str())
    }

    /// A message at `position`.
    pub fn message(&mut self, position: &str) {
        self.counts.seen += 1;
        match split_position(position) {
            Some((epoch, offset)) if !self.last.is_empty() => {
                if epoch != &self.last[..self.epoch_len] {
                    self.counts.epoch_changes += 1;
                } else if offset > self.offset + 1 {
                    self.counts.gaps += 1;
                } else if offset <= self.offset {
                    self.counts.repeats += 1;
                }
            }
            Some(_) => {}
            None => self.counts.gaps += 1,
        }
        self.set(position);
    }

    /// A reset: the stream goes on after `position`.
    pub fn reset(&mut self, position: &str) {
        self.counts.resets += 1;
        self.set(position);
    }

    fn set(&mut self, position: &str) {
        self.last.clear();
        self.last.push_str(position);
        if let Some((epoch, offset)) = split_position(position) {
            self.epoch_len = epoch.len();
            self.offset = offset;
        } else {
            self.epoch_len = 0;
            self.offset = 0;
        }
    }
}

/// `EPOCH-OFFSET` as its epoch and offset.
fn split_position(position: &str) -> Option<(&str, u64)> {
    let (epoch, offset) = position.rsplit_once('-')?;
    Some((epoch, offset.parse().ok()?))
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
    /// For v1 and SSE clients: the positions they saw.
    pub positions: Option<PositionTrack>,
    pub end: ClientEnd,
}

/// What one reading client has counted so far; the websocket and the event-stream readers
/// feed it alike.
pub struct Tally<'a> {
    shared: &'a Shared,
    pub states: Vec<SeqState>,
    latency: LocalLatency,
    phased: Option<[LocalLatency; 3]>,
    progress: &'a AtomicU64,
    unique: u64,
    pub pings: u64,
    pub other: u64,
    last_new_ns: u64,
    pub positions: Option<PositionTrack>,
}

impl<'a> Tally<'a> {
    /// A client's tally, `positions` for a client whose frames carry them.
    pub fn new(id: usize, shared: &'a Shared, positions: Option<PositionTrack>) -> Tally<'a> {
        Tally {
            shared,
            states: vec![SeqState::default(); shared.publishers],
            latency: shared.latency.local(id),
            phased: shared.phases.as_ref().map(|p| p.locals(id)),
            progress: &shared.progress[id].0,
            unique: 0,
            pings: 0,
            other: 0,
            last_new_ns: 0,
            positions,
        }
    }

    /// Goes on from `states`, what the client had before it reconnected.
    pub fn resume(mut self, states: Vec<SeqState>) -> Tally<'a> {
        if states.len() == self.states.len() {
            self.states = states;
        }
        self
    }

    /// A payload (a legacy frame, a v1 frame, an SSE event's data): counted, its latency
    /// recorded; returns its stamp when it was new to this client.
    pub fn payload(&mut self, text: &str) -> Option<Stamp> {
        match payload::parse(text, self.shared.run) {
            Parsed::Bench(stamp) => {
                let Some(state) = self.states.get_mut(stamp.publisher as usize) else {
                    self.other += 1;
                    return None;
                };
                if state.record(stamp.seq) == Arrival::Duplicate {
                    return None;
                }
                let now = self.shared.clock.now_ns();
                self.unique += 1;
                self.last_new_ns = now;
                self.progress.store(self.unique, Ordering::Relaxed);
                let ns = now.saturating_sub(stamp.sent_ns);
                if self.latency.push(ns) {
                    self.shared.latency.flush(&mut self.latency);
                }
                if let (Some(phases), Some(locals)) = (&self.shared.phases, &mut self.phased) {
                    phases.record(locals, stamp.sent_ns, ns);
                }
                Some(stamp)
            }
            Parsed::Ping => {
                self.pings += 1;
                None
            }
            Parsed::Other => {
                self.other += 1;
                None
            }
        }
    }

    /// A `vulcan-stream.v1` text frame: its position checked, then its payload counted.
    pub fn v1_frame(&mut self, text: &str) -> Option<Stamp> {
        if let Some(positions) = &mut self.positions {
            if let Some(id) = v1_field(text, r#"{"id":""#) {
                positions.message(id);
            } else if text.starts_with(r#"{"event":"reset""#) {
                match v1_field(text, r#""id":""#) {
                    Some(id) => positions.reset(id),
                    None => positions.counts.resets += 1,
                }
            }
        }
        self.payload(text)
    }

    /// Ends the tally: flushes the latencies and marks a client that stopped as gone.
    pub fn finish(mut self, id: usize, end: ClientEnd) -> ClientResult {
        self.shared.latency.flush(&mut self.latency);
        if let (Some(phases), Some(locals)) = (&self.shared.phases, &mut self.phased) {
            phases.flush(locals);
        }
        if end != ClientEnd::Open {
            self.progress.store(GONE, Ordering::Relaxed);
        }
        ClientResult {
            id,
            states: self.states,
            pings: self.pings,
            other: self.other,
            last_new_ns: self.last_new_ns,
            positions: self.positions,
            end,
        }
    }
}

/// The string value that follows `key` (which ends with its opening quote) in a v1 frame.
fn v1_field<'t>(text: &'t str, key: &str) -> Option<&'t str> {
    let at = text.find(key)? + key.len();
    let rest = &text[at..];
    Some(&rest[..rest.find('"')?])
}

/// Reads and checks every frame until the run stops or the connection ends.
pub async fn read(id: usize, conn: Conn, shared: Arc<Shared>) -> ClientResult {
    read_from(id, conn, shared, None).await
}

/// [`read`], going on from what the client had counted before (`states`) and, for a client
/// that reads positions, from the position it resumed after.
pub async fn read_from(
    id: usize,
    conn: Conn,
    shared: Arc<Shared>,
    before: Option<(Vec<SeqState>, Option<PositionTrack>)>,
) -> ClientResult {
    let (states, positions) = before.unwrap_or_default();
    match conn {
        Conn::Ws { ws, v1 } => {
            let positions = v1.then(|| positions.unwrap_or_default());
            let tally = Tally::new(id, &shared, positions).resume(states);
            let (tally, end) = read_ws(*ws, tally, v1, |_, _| {}).await;
            tally.finish(id, end)
        }
        Conn::Sse(sse) => {
            let tally = Tally::new(id, &shared, Some(positions.unwrap_or_default()));
            let (tally, end) = sse.read(tally.resume(states), &shared.stop).await;
            tally.finish(id, end)
        }
    }
}

/// Reads a websocket into `tally` until the run stops or the connection ends; `after_frame`
/// looks at the tally after each text frame, with the frame's stamp when it was new.
pub async fn read_ws<'a>(
    mut ws: Ws,
    mut tally: Tally<'a>,
    v1: bool,
    mut after_frame: impl FnMut(&Tally<'a>, Option<Stamp>),
) -> (Tally<'a>, ClientEnd) {
    // One stop future for the whole session: creating one per frame costs a waiter
    // registration each time.
    let shared: &'a Shared = tally.shared;
    let stopped = shared.stop.cancelled();
    tokio::pin!(stopped);
    let end = loop {
        let message = tokio::select! {
            biased;
            _ = &mut stopped => break ClientEnd::Open,
            message = ws.next() => message,
        };
        match message {
            Some(Ok(Message::Text(text))) => {
                let stamp = if v1 {
                    tally.v1_frame(text.as_str())
                } else {
                    tally.payload(text.as_str())
                };
                after_frame(&tally, stamp);
            }
            Some(Ok(Message::Close(frame))) => {
                break ClientEnd::Closed {
                    code: frame.as_ref().map(|f| u16::from(f.code)),
                    reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                };
            }
            // Binary frames are not part of the protocol; websocket pings are answered by
            // tungstenite while we read.
            Some(Ok(Message::Binary(_))) => tally.other += 1,
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
    (tally, end)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_follow_one_another_within_an_epoch() {
        let mut track = PositionTrack::after("00ab-10");
        for position in ["00ab-11", "00ab-12", "00ab-14", "00ab-14", "00ab-13"] {
            track.message(position);
        }
        assert_eq!(
            track.counts,
            Positions {
                seen: 5,
                gaps: 1,
                repeats: 2,
                ..Positions::default()
            }
        );
        // A reset names where to go on from; the next message follows it.
        track.reset("00cd-0");
        track.message("00cd-1");
        assert_eq!((track.counts.resets, track.counts.epoch_changes), (1, 0));
        track.message("00ef-2");
        assert_eq!(track.counts.epoch_changes, 1);
        assert_eq!(track.last(), Some("00ef-2"));
        assert!(!track.counts.is_clean());
        assert!(PositionTrack::default().last().is_none());
    }

    #[test]
    fn v1_fields_are_read_without_parsing_json() {
        let frame = r#"{"id":"00ab-7","data":{"action":"x"}}"#;
        assert_eq!(v1_field(frame, r#"{"id":""#), Some("00ab-7"));
        let reset = r#"{"event":"reset","id":"00ab-9","reason":"evicted"}"#;
        assert_eq!(v1_field(reset, r#""id":""#), Some("00ab-9"));
        assert_eq!(v1_field(r#"{"action":"ping"}"#, r#"{"id":""#), None);
    }

    #[tokio::test]
    async fn a_resume_adds_since_to_the_query() {
        let target = Target::resolve("ws://127.0.0.1:9/stream", 4096)
            .await
            .expect("a ws URL");
        let resumed = target.with_query("since", "00ab-7");
        assert_eq!(resumed.path, "/stream?since=00ab-7");
        assert_eq!(resumed.url, "ws://127.0.0.1:9/stream?since=00ab-7");
        let again = resumed.with_query("token", "t");
        assert_eq!(again.path, "/stream?since=00ab-7&token=t");
    }
}
