//! One websocket client's task: reads (to answer pings and closes, notice liveness and enforce
//! limits), flushes what the hub could not write at once, and closes.
//!
//! Frames normally reach the socket without this task: the fan-out writes them directly (see
//! [`crate::fanout::outbox`]), the heartbeat's websocket Ping included. The task wakes only for
//! what the client sends, for a backlog to flush when the socket becomes writable again, once
//! per pong timeout to see whether the client was heard from, and to close. A client that has
//! not been heard from (any bytes, pongs included) within the pong timeout is dropped: that is
//! how a vanished peer (pulled cable, expired NAT entry) is found.
//!
//! After its close frame (its own, an echo, or one that fails the connection on a protocol
//! error) the server ends the TCP connection itself (RFC 6455 §7.1.1): it sends its FIN at
//! once, and lets go of the socket within [`CLOSE_TIMEOUT`] of that frame.

use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

use super::Expiry;
use super::frames::{ClientEvent, FrameReader, ProtocolError};
use crate::fanout::{CloseReason, Registration};
use crate::message::websocket;
use crate::metrics::Metrics;

/// How long a close handshake may take, from the server's close frame to the end of the TCP
/// connection: writing the frame out, the client's answer when the server started the
/// handshake, and the client closing its side after the server's FIN. Under a second, so that
/// whatever the client does, its descriptor is free within a second of the close.
const CLOSE_TIMEOUT: Duration = Duration::from_millis(800);

/// The same for a client closed as too slow: its socket was full, so it is not reading, and its
/// close frame goes out only if it happens to read now. Waiting longer would only hold its
/// descriptor.
const SLOW_CLOSE_TIMEOUT: Duration = Duration::from_millis(250);

/// Bytes read from a client per `read`: clients send only pongs and closes, so a small buffer
/// (part of the task, no allocation) keeps an idle connection cheap.
const READ_CHUNK: usize = 512;

/// Liveness and limit settings shared by every client.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    /// Silence after which a client is taken for vanished (the heartbeat's Pings come every
    /// PingInterval, from the fan-out).
    pub pong_timeout: Duration,
    /// The largest message a client may send.
    pub max_message: usize,
}

pub struct Subscriber {
    pub stream: Arc<TcpStream>,
    /// Bytes the client sent right after its handshake, already read by the HTTP layer.
    pub leftover: Bytes,
    pub registration: Registration,
    pub peer: SocketAddr,
    pub liveness: Liveness,
    /// When the client's signed token expires, if it does: the connection ends then (4001).
    pub expires: Option<SystemTime>,
    pub metrics: Arc<Metrics>,
}

/// How a client's session ended.
enum End {
    /// The hub or shutdown asked us to close.
    Stopped(CloseReason),
    /// The client sent a close (with this code).
    ClientClosed(Option<u16>),
    /// The client broke the protocol or a limit.
    Protocol(ProtocolError),
    /// The connection ended or failed: nothing more to send.
    Gone(String),
    /// The client answered nothing within the pong timeout.
    Unresponsive,
}

impl Subscriber {
    pub async fn run(mut self) {
        let id = self.registration.id;
        let peer = self.peer;
        let client = self.registration.client.clone();
        client.out.attach(self.stream.clone());
        log::debug!("client {id} ({peer}): connected");
        let mut reader = FrameReader::new(self.liveness.max_message);
        // The leftover may share hyper's whole request buffer: release it before serving.
        let leftover = std::mem::take(&mut self.leftover);
        let early_end = self.absorb(&mut reader, &leftover);
        drop(leftover);
        let end = match early_end {
            Some(end) => end,
            None => self.serve(&mut reader).await,
        };
        match end {
            End::Stopped(reason) => {
                let close = websocket::close_frame(reason.code(), reason.text());
                let too_slow = reason == CloseReason::TooSlow;
                client.out.seal_with(close, too_slow);
                let deadline = Instant::now()
                    + if too_slow {
                        SLOW_CLOSE_TIMEOUT
                    } else {
                        CLOSE_TIMEOUT
                    };
                let _ = timeout_at(deadline, self.drain_outbox()).await;
                if matches!(reason, CloseReason::GoingAway | CloseReason::TokenExpired) {
                    // Give the client the chance to answer, so it sees a clean close.
                    let _ = timeout_at(deadline, self.await_close(&mut reader)).await;
                }
                self.hang_up(deadline).await;
                log::debug!("client {id} ({peer}): closed ({})", reason.text());
            }
            End::ClientClosed(code) => {
                // Echo the client's close (RFC 6455 §5.5.1); the reader let through only codes
                // an endpoint may send.
                let echo = match code {
                    Some(code) => websocket::close_frame(code, ""),
                    None => websocket::encode(websocket::opcode::CLOSE, b""),
                };
                client.out.seal_with(echo, false);
                let deadline = Instant::now() + CLOSE_TIMEOUT;
                let _ = timeout_at(deadline, self.drain_outbox()).await;
                self.hang_up(deadline).await;
                log::debug!("client {id} ({peer}): closed by the client");
            }
            End::Protocol(err) => {
                // Failing the connection (RFC 6455 §7.1.7): the close frame says why, and the
                // connection ends without waiting for an answer that could not be parsed.
                client.out.seal_with(
                    websocket::close_frame(err.close_code(), &err.to_string()),
                    true,
                );
                let deadline = Instant::now() + CLOSE_TIMEOUT;
                let _ = timeout_at(deadline, self.drain_outbox()).await;
                self.hang_up(deadline).await;
                log::info!("client {id} ({peer}): closed, {err}");
            }
            End::Gone(why) => log::debug!("client {id} ({peer}): gone ({why})"),
            End::Unresponsive => {
                self.metrics.clients_disconnected_unresponsive.inc();
                log::info!(
                    "client {id} ({peer}): dropped, nothing heard within {:?}",
                    self.liveness.pong_timeout
                );
            }
        }
    }

    async fn serve(&self, reader: &mut FrameReader) -> End {
        let client = &self.registration.client;
        let pong_timeout = self.liveness.pong_timeout;
        // The Pings themselves go out with the fan-out's heartbeat; this only looks at whether
        // the client has answered anything lately. A read only notes the time; the timer is
        // moved when it fires and finds the client heard since, so a client that answers every
        // Ping wakes this task for it once per pong timeout rather than once per interval.
        let mut last_heard = Instant::now();
        let silence = tokio::time::sleep_until(last_heard + pong_timeout);
        tokio::pin!(silence);
        let mut buf = [0u8; READ_CHUNK];
        let mut expiry = Expiry::at(self.expires);
        loop {
            // Readiness futures do not spend tokio's cooperative budget: without this, a client
            // that floods frames would keep its worker thread (and what is queued on it, the
            // receiver or the accept loop) to itself.
            tokio::task::consume_budget().await;
            let backlog = client.out.has_backlog();
            tokio::select! {
                biased;
                _ = client.control.stopped() => return End::Stopped(client.control.reason()),
                _ = expiry.reached() => return End::Stopped(CloseReason::TokenExpired),
                readable = self.stream.readable() => {
                    if let Err(err) = readable {
                        return End::Gone(err.to_string());
                    }
                    match self.stream.try_read(&mut buf) {
                        Ok(0) => return End::Gone("connection closed".to_owned()),
                        Ok(n) => {
                            last_heard = Instant::now();
                            if let Some(end) = self.absorb(reader, &buf[..n]) {
                                return end;
                            }
                        }
                        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(err) => return End::Gone(err.to_string()),
                    }
                }
                writable = self.stream.writable(), if backlog => {
                    if let Err(err) = writable.and_then(|()| client.out.flush()) {
                        return End::Gone(err.to_string());
                    }
                }
                _ = client.out.backlog_signalled(), if !backlog => {}
                () = &mut silence => {
                    let deadline = last_heard + pong_timeout;
                    if deadline <= Instant::now() {
                        return End::Unresponsive;
                    }
                    silence.as_mut().reset(deadline);
                }
            }
        }
    }

    /// Parses what the client sent, answering pings; `Some` when the session must end.
    fn absorb(&self, reader: &mut FrameReader, data: &[u8]) -> Option<End> {
        let out = &self.registration.client.out;
        let mut closed = None;
        let parsed = reader.feed(data, &mut |event| match event {
            ClientEvent::Ping(payload) if closed.is_none() => {
                out.send_control(websocket::encode(websocket::opcode::PONG, &payload));
            }
            ClientEvent::Close(code) => {
                closed.get_or_insert(code);
            }
            _ => {}
        });
        match (closed, parsed) {
            (Some(code), _) => Some(End::ClientClosed(code)),
            (None, Err(err)) => Some(End::Protocol(err)),
            (None, Ok(())) => None,
        }
    }

    /// Writes the outbox out as the socket allows.
    async fn drain_outbox(&self) {
        let out = &self.registration.client.out;
        loop {
            match out.flush() {
                Ok(true) | Err(_) => return,
                Ok(false) => {
                    if self.stream.writable().await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Reads until the client's close arrives or the connection ends.
    async fn await_close(&self, reader: &mut FrameReader) {
        self.read_while(|data| {
            let mut closed = false;
            let parsed = reader.feed(data, &mut |event| {
                closed |= matches!(event, ClientEvent::Close(_));
            });
            !closed && parsed.is_ok()
        })
        .await;
    }

    /// Reads what the client sends, a piece at a time, for as long as `more` asks for more and
    /// the connection lasts (until the client closes its side or the connection fails).
    async fn read_while(&self, mut more: impl FnMut(&[u8]) -> bool) {
        let mut buf = [0u8; READ_CHUNK];
        loop {
            // A client that floods never leaves `readable()` pending: spend the budget so that
            // the caller's timeout gets polled.
            tokio::task::consume_budget().await;
            if self.stream.readable().await.is_err() {
                return;
            }
            match self.stream.try_read(&mut buf) {
                Ok(0) => return,
                Ok(n) if !more(&buf[..n]) => return,
                Ok(_) => {}
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }

    /// Ends the TCP connection once the server's close frame is out: a FIN at once, then
    /// whatever the client still sends (the rest of a frame that failed, its answer to the
    /// close) is read and dropped until it closes its side too, or until `deadline`. The
    /// descriptor itself closes when this task lets go of the client; had unread data been
    /// left in it, the kernel would answer with a reset, which can destroy the close frame
    /// before the client has read it.
    async fn hang_up(&self, deadline: Instant) {
        let _ = SockRef::from(&*self.stream).shutdown(Shutdown::Write);
        let _ = timeout_at(deadline, self.read_while(|_| true)).await;
    }
}
