//! The listening socket, the accept loop, and each connection's HTTP/1 server.
//!
//! The accept loop is ours, not a framework's: hyper's connection builder is where the
//! handshake timeout and the header size limit live, and every connection is served as a
//! `TokioIo<TcpStream>`, so that an upgraded websocket comes back as the raw socket.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;

use super::{AppState, routes};
use crate::error::Error;

/// The largest request head (request line plus headers) accepted; hyper's minimum is 8 KiB.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

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

async fn serve_connection(stream: TcpStream, peer: SocketAddr, state: Arc<AppState>) {
    let _ = stream.set_nodelay(true);
    let routed = state.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let response = routes::route(&routed, peer, request);
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
