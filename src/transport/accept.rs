//! The listening socket, the accept loop, and each connection's HTTP/1 server.
//!
//! The accept loop is ours, not a framework's: hyper's connection builder is where the
//! handshake timeout and the header size limit live, and every connection is served as a
//! `TokioIo<TcpStream>`, so that an upgraded websocket comes back as the raw socket.
//!
//! Before hyper reads anything, the connection's first request head is *peeked* at (left in
//! the socket) until it is complete, within the same timeout and size limit
//! ([`head::classify`]): a websocket handshake or an event-stream request of the stream path is
//! taken out of the socket and served on it by [`upgrade`] or [`sse`] (hyper would never give
//! up the socket of a 200, and a handshake costs less without it). Every other connection goes
//! to hyper with its bytes untouched, and keep-alive off: every answer but a 101 says
//! `Connection: close`, so hyper closes the connection after it, each request is the first on
//! its connection, and a request of the stream path can never arrive on a connection hyper
//! already holds. (Not through hyper's `keep_alive(false)`: that also appends `close` to a
//! 101's `Connection: upgrade`, which websocket clients such as tungstenite refuse.)

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout_at};
use tokio_util::task::TaskTracker;

use super::head::{self, Head};
use super::{AppState, routes, sse, upgrade};
use crate::error::Error;

/// The largest request head (request line plus headers) accepted; hyper's minimum is 8 KiB.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// What the first peek looks at; the buffer doubles while a head fills it, up to
/// [`MAX_REQUEST_HEAD`]. Most request heads are a few hundred bytes.
const FIRST_PEEK: usize = 1024;

/// Pending connections the kernel may hold before `accept` (capped by `net.core.somaxconn`).
/// The usual 128 overflows when thousands of agents reconnect at once, and an overflowed SYN is
/// retried only after a second.
const LISTEN_BACKLOG: u32 = 4096;

/// The first pause of the accept loop after a failed accept.
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);

/// The longest pause while out of descriptors: how late, at worst, accepts resume after one
/// frees up.
const ACCEPT_PAUSE_MAX: Duration = Duration::from_millis(500);

/// Whether an accept failed because the process (EMFILE) or the system (ENFILE) has no
/// descriptor left, or the kernel no memory for the socket.
fn is_out_of_descriptors(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Binds `[::]:port` (dual-stack), or `0.0.0.0:port` where IPv6 is unavailable.
pub async fn bind(port: u16) -> Result<TcpListener, Error> {
    let v6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
    match listen_on(v6) {
        Ok(listener) => Ok(listener),
        // No IPv6 on this host: fall back to IPv4 only.
        Err(err)
            if err.raw_os_error() == Some(libc::EAFNOSUPPORT)
                || err.kind() == std::io::ErrorKind::AddrNotAvailable =>
        {
            let v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port));
            listen_on(v4).map_err(|source| Error::Bind { addr: v4, source })
        }
        Err(source) => Err(Error::Bind { addr: v6, source }),
    }
}

fn listen_on(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv6() {
        tokio::net::TcpSocket::new_v6()?
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts connections until shutdown, then lets in-flight plain requests finish.
pub async fn serve(listener: TcpListener, state: Arc<AppState>) {
    let connections = TaskTracker::new();
    // Set while accepts are paused for want of descriptors: the current pause.
    let mut starved: Option<Duration> = None;
    loop {
        let accepted = tokio::select! {
            _ = state.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let pause = match accepted {
            Ok((stream, peer)) => {
                if starved.take().is_some() {
                    log::info!("accepting connections again: file descriptors are available");
                }
                connections.spawn(serve_connection(stream, peer, state.clone()));
                continue;
            }
            // The pending connection stays in the backlog and the listener stays readable: a
            // retry now would spin a core. Pause, longer each time, until a descriptor frees up.
            Err(err) if is_out_of_descriptors(&err) => {
                let pause = match starved {
                    None => {
                        log::warn!(
                            "cannot accept connections: {err}; pausing accepts until file                              descriptors free up (raise the open-files limit or lower MaxClients)"
                        );
                        ACCEPT_PAUSE_MIN
                    }
                    Some(pause) => (pause * 2).min(ACCEPT_PAUSE_MAX),
                };
                state.metrics.accept_pauses.inc();
                starved = Some(pause);
                pause
            }
            // A connection reset before it was accepted, and the like: that one is gone.
            Err(err) => {
                log::debug!("accept failed: {err}");
                ACCEPT_PAUSE_MIN
            }
        };
        tokio::select! {
            _ = state.shutdown.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

async fn serve_connection(mut stream: TcpStream, peer: SocketAddr, state: Arc<AppState>) {
    let _ = stream.set_nodelay(true);
    let deadline = Instant::now() + state.sender.handshake_timeout;
    let peeked = tokio::select! {
        _ = state.shutdown.cancelled() => return,
        peeked = timeout_at(deadline, first_head(&stream, &state.sender.stream_path)) => peeked,
    };
    match peeked {
        Ok(Ok(Peeked::StreamPath(len, kind, request))) => {
            // The head is in the socket already: this read does not wait. (On the heap, not in
            // this task, whose size every client pays for as long as it is connected.)
            let mut taken = vec![0; len];
            match timeout_at(deadline, stream.read_exact(&mut taken)).await {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => return log::debug!("connection from {peer}: {err}"),
                Err(_) => return,
            }
            drop(taken);
            return match kind {
                StreamPath::Websocket => upgrade::serve(state, peer, stream, request).await,
                StreamPath::EventStream => sse::serve(state, peer, stream, request).await,
            };
        }
        Ok(Ok(Peeked::Http)) => {}
        Ok(Ok(Peeked::Closed)) => return,
        Ok(Err(err)) => return log::debug!("connection from {peer}: {err}"),
        // No complete head within the handshake timeout: dropped, as hyper drops it.
        Err(_) => return,
    }
    let routed = state.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let mut response = routes::route(&routed, peer, request);
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            // One request per connection: see the module's doc.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(state.sender.handshake_timeout)
        .max_buf_size(MAX_REQUEST_HEAD);
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(err) = result {
                log::debug!("connection from {peer}: {err}");
            }
        }
        _ = state.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
        }
    }
}

/// Which request of the stream path a head is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamPath {
    Websocket,
    EventStream,
}

/// What a connection's first request is.
#[derive(Debug)]
enum Peeked {
    /// A request of the stream path served without hyper, whose head is the first `.0` bytes
    /// in the socket.
    StreamPath(usize, StreamPath, head::Request),
    /// Anything else (malformed and oversized heads too): for hyper, which answers it.
    Http,
    /// The client closed the connection without sending anything.
    Closed,
}

/// Looks at the bytes waiting in `stream`, without taking them, until they hold a whole
/// request head, or more than [`MAX_REQUEST_HEAD`] bytes, or the client stops sending.
async fn first_head(stream: &TcpStream, stream_path: &str) -> io::Result<Peeked> {
    let mut buf = Vec::new();
    // Bytes the last peek saw: a peek that sees no more waits for the next arrival.
    let mut seen = 0;
    loop {
        // Readiness futures do not spend tokio's cooperative budget: should a wait ever return
        // at once again and again, this still lets the worker thread's other tasks run.
        tokio::task::consume_budget().await;
        let ready = stream.ready(Interest::READABLE).await?;
        // The client will send no more: decide on what is there.
        let finished = ready.is_read_closed();
        if buf.is_empty() {
            // Allocated only once the client has sent something: idle connections cost none.
            buf.resize(FIRST_PEEK, 0);
        }
        // Inside `try_io`, a peek that finds nothing new clears the readiness it was woken by,
        // unless more bytes arrived meanwhile, so the next wait is for new bytes.
        let peeked = stream.try_io(Interest::READABLE, || match peek(stream, &mut buf)? {
            n if n == seen && n > 0 && !finished => Err(io::ErrorKind::WouldBlock.into()),
            n => Ok(n),
        });
        let n = match peeked {
            Ok(0) => return Ok(Peeked::Closed),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err),
        };
        seen = n;
        match head::classify(&buf[..n], stream_path) {
            Head::Websocket { len, request } => {
                return Ok(Peeked::StreamPath(len, StreamPath::Websocket, request));
            }
            Head::EventStream { len, request } => {
                return Ok(Peeked::StreamPath(len, StreamPath::EventStream, request));
            }
            Head::Other => return Ok(Peeked::Http),
            // hyper reads what there is and answers it (or sees the end) as it always did.
            Head::Partial if finished || n >= MAX_REQUEST_HEAD => return Ok(Peeked::Http),
            Head::Partial if n == buf.len() => buf.resize((2 * n).min(MAX_REQUEST_HEAD), 0),
            Head::Partial => {}
        }
    }
}

/// `recv(MSG_PEEK)` without waiting: copies what waits in the socket into `buf`, leaving it
/// there for whoever reads the connection next.
fn peek(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the descriptor stays open while `stream` is borrowed, and recv writes at most
        // `buf.len()` bytes into `buf`, which it borrows mutably.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match usize::try_from(n) {
            Ok(n) => return Ok(n),
            Err(_) => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::outbox::test_support::socket_pair;
    use tokio::io::AsyncWriteExt;

    const HEAD: &[u8] = b"GET /stream?since=1-1 HTTP/1.1\r\nAccept: text/event-stream\r\n\r\n";

    /// CPU time this thread has used.
    fn thread_cpu() -> Duration {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the struct we own; the clock id is valid.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
        assert_eq!(rc, 0, "clock_gettime");
        Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
    }

    /// A head sent in pieces is seen whole when its last piece arrives, and stays in the
    /// socket; between pieces the peek waits for new bytes rather than peeking again and again
    /// (which would spin a core).
    #[tokio::test(flavor = "current_thread")]
    async fn a_head_in_pieces_is_peeked_whole_without_spinning_and_left_in_the_socket() {
        let (server, mut client) = socket_pair().await;
        let (first, rest) = HEAD.split_at(20);
        client.write_all(first).await.expect("write");
        let peeked = {
            let peek = first_head(&server, "stream");
            tokio::pin!(peek);
            let before = thread_cpu();
            let waited = tokio::time::timeout(Duration::from_millis(300), peek.as_mut()).await;
            assert!(waited.is_err(), "a partial head is not a request");
            let spent = thread_cpu() - before;
            assert!(
                spent < Duration::from_millis(100),
                "peeking spun: {spent:?}"
            );
            client.write_all(rest).await.expect("write");
            peek.await.expect("peek")
        };
        let Peeked::StreamPath(len, StreamPath::EventStream, request) = peeked else {
            panic!("not an event stream");
        };
        assert_eq!(len, HEAD.len());
        assert_eq!(request.query, "since=1-1");
        let mut taken = vec![0; HEAD.len()];
        let mut server = Arc::into_inner(server).expect("one owner");
        server
            .read_exact(&mut taken)
            .await
            .expect("the head is still there");
        assert_eq!(taken, HEAD);
    }

    #[tokio::test]
    async fn heads_larger_than_the_buffer_grow_it_up_to_the_limit() {
        let (server, mut client) = socket_pair().await;
        let filler = "a".repeat(5000);
        let head = format!(
            "GET /stream HTTP/1.1\r\nX-Filler: {filler}\r\nAccept: text/event-stream\r\n\r\n"
        );
        client.write_all(head.as_bytes()).await.expect("write");
        let peeked = first_head(&server, "stream").await.expect("peek");
        assert!(
            matches!(peeked, Peeked::StreamPath(len, StreamPath::EventStream, _) if len == head.len())
        );

        let (server, mut client) = socket_pair().await;
        let huge = format!(
            "GET /stream HTTP/1.1\r\nX-Filler: {}\r\n",
            "a".repeat(20_000)
        );
        client.write_all(huge.as_bytes()).await.expect("write");
        let peeked = first_head(&server, "stream").await.expect("peek");
        assert!(
            matches!(peeked, Peeked::Http),
            "hyper answers 431: {peeked:?}"
        );
    }

    #[tokio::test]
    async fn a_client_that_stops_sending_ends_the_peek() {
        let (server, mut client) = socket_pair().await;
        client.shutdown().await.expect("shutdown");
        assert!(matches!(
            first_head(&server, "stream").await,
            Ok(Peeked::Closed)
        ));

        let (server, mut client) = socket_pair().await;
        client.write_all(&HEAD[..20]).await.expect("write");
        client.shutdown().await.expect("shutdown");
        assert!(matches!(
            first_head(&server, "stream").await,
            Ok(Peeked::Http)
        ));

        let (server, mut client) = socket_pair().await;
        client
            .write_all(b"GET /status HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        assert!(matches!(
            first_head(&server, "stream").await,
            Ok(Peeked::Http)
        ));
    }
}
