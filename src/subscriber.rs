//! One websocket client: its queue to its socket, its reads discarded, its close.
//!
//! The task writes queued frames in batches (everything already queued goes out in one flush),
//! reads and discards what the client sends (tungstenite answers pings and echoes closes while
//! reading), sends a websocket Ping every interval and drops a client that has not been heard
//! from within the pong timeout: that is how a vanished peer (pulled cable, expired NAT entry)
//! is found. Every write races the stop signal, so a client whose socket is stuck can still be
//! kicked or shut down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::hub::Registration;
use crate::metrics::Metrics;

/// The socket type after an HTTP upgrade.
pub type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// At most this many queued frames go into one flush, so that a steady stream still yields to
/// reads and pings now and then.
const MAX_BATCH: usize = 256;

/// How long a close handshake may take before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Liveness settings shared by every client.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
}

pub struct Subscriber {
    pub socket: Socket,
    pub registration: Registration,
    pub peer: SocketAddr,
    pub liveness: Liveness,
    pub metrics: Arc<Metrics>,
}

/// How a client's session ended.
enum End {
    /// The hub or shutdown asked us to close: send a close frame with that reason.
    Stopped,
    /// The client closed, vanished or broke the protocol: nothing more to send.
    Gone(String),
    /// The client answered nothing within the pong timeout.
    Unresponsive,
}

impl Subscriber {
    pub async fn run(mut self) {
        let id = self.registration.id;
        let peer = self.peer;
        log::debug!("client {id} ({peer}): connected");
        let end = self.serve().await;
        let mut socket = self.socket;
        match end {
            End::Stopped => {
                let reason = self.registration.control.reason();
                let frame = CloseFrame {
                    code: CloseCode::from(reason.code()),
                    reason: reason.text().into(),
                };
                // A stuck client never drains the close; the timeout bounds the wait.
                let _ = timeout(CLOSE_TIMEOUT, socket.close(Some(frame))).await;
                let _ = timeout(CLOSE_TIMEOUT, drain(&mut socket)).await;
                log::debug!("client {id} ({peer}): closed ({})", reason.text());
            }
            End::Gone(why) => {
                // Flush the echo of the client's close, if that is how it left.
                let _ = timeout(CLOSE_TIMEOUT, socket.flush()).await;
                log::debug!("client {id} ({peer}): gone ({why})");
            }
            End::Unresponsive => {
                self.metrics.clients_disconnected_unresponsive.inc();
                log::info!(
                    "client {id} ({peer}): dropped, no answer within {:?}",
                    self.liveness.pong_timeout
                );
            }
        }
    }

    async fn serve(&mut self) -> End {
        let control = self.registration.control.clone();
        let interval = self.liveness.ping_interval;
        let mut pinger = tokio::time::interval_at(Instant::now() + interval, interval);
        pinger.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = control.stopped() => return End::Stopped,
                incoming = self.socket.next() => match incoming {
                    None => return End::Gone("connection closed".to_owned()),
                    Some(Err(err)) => return End::Gone(err.to_string()),
                    Some(Ok(Message::Close(_))) => return End::Gone("client closed".to_owned()),
                    Some(Ok(_)) => last_heard = Instant::now(),
                },
                _ = pinger.tick() => {
                    if last_heard.elapsed() > self.liveness.pong_timeout {
                        return End::Unresponsive;
                    }
                    let ping = self.socket.send(Message::Ping(Default::default()));
                    tokio::select! {
                        _ = control.stopped() => return End::Stopped,
                        sent = ping => if let Err(err) = sent {
                            return End::Gone(err.to_string());
                        },
                    }
                }
                frame = self.registration.frames.recv() => {
                    // The hub dropped our queue: we were kicked (the stop arm says why).
                    let Some(frame) = frame else { return End::Stopped };
                    tokio::select! {
                        _ = control.stopped() => return End::Stopped,
                        written = write_batch(&mut self.socket, &mut self.registration, frame) => {
                            match written {
                                Ok(n) => { self.metrics.frames_sent.inc_by(n); }
                                Err(err) => return End::Gone(err.to_string()),
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Writes `first` and whatever else is already queued, then flushes once.
async fn write_batch(
    socket: &mut Socket,
    registration: &mut Registration,
    first: crate::event::Frame,
) -> Result<u64, tokio_tungstenite::tungstenite::Error> {
    socket.feed(Message::Text(first.to_utf8_bytes())).await?;
    let mut written = 1;
    while written < MAX_BATCH as u64 {
        match registration.frames.try_recv() {
            Ok(frame) => {
                socket.feed(Message::Text(frame.to_utf8_bytes())).await?;
                written += 1;
            }
            Err(_) => break,
        }
    }
    socket.flush().await?;
    Ok(written)
}

/// Reads until the peer's close arrives or the connection ends.
async fn drain(socket: &mut Socket) {
    while let Some(Ok(_)) = socket.next().await {}
}
