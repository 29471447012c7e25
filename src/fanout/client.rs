//! One client as the fan-out sees it: its outbox, and how it is told to stop and why.
//!
//! The close reason lives here, beside the client, because the fan-out threads are what kick
//! a client that does not keep up; the transport only turns the reason into a close frame.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_util::sync::CancellationToken;

use super::outbox::ClientOut;
use crate::message::websocket::close_code;
use crate::message::{ChannelId, Filter, Format};

/// Why the server ends a client's connection, and the close frame that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client's outbox overflowed: it does not read fast enough.
    TooSlow,
    /// The server is shutting down.
    GoingAway,
    /// The client's signed token expired (`exp`).
    TokenExpired,
}

impl CloseReason {
    /// RFC 6455 close code.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::TooSlow => close_code::POLICY_VIOLATION,
            CloseReason::GoingAway => close_code::GOING_AWAY,
            CloseReason::TokenExpired => close_code::TOKEN_EXPIRED,
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            CloseReason::TooSlow => "client too slow: outgoing queue overflowed",
            CloseReason::GoingAway => "server shutting down",
            CloseReason::TokenExpired => "token expired",
        }
    }
}

/// How the hub tells one client's task to stop, and why.
#[derive(Debug)]
pub struct ClientControl {
    /// A child of the root shutdown token: cancelled on shutdown or when the client is kicked.
    stop: CancellationToken,
    reason: OnceLock<CloseReason>,
}

impl ClientControl {
    /// `stop` is a child of the root shutdown token, so shutdown reaches every client.
    pub fn new(stop: CancellationToken) -> ClientControl {
        ClientControl {
            stop,
            reason: OnceLock::new(),
        }
    }

    /// Resolves when the client must close.
    pub async fn stopped(&self) {
        self.stop.cancelled().await;
    }

    /// The close to send; without a recorded reason the stop came from shutdown.
    pub fn reason(&self) -> CloseReason {
        self.reason.get().copied().unwrap_or(CloseReason::GoingAway)
    }

    pub(crate) fn kick(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.stop.cancel();
    }
}

/// What a client receives: one channel, in one format, filtered or not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscription {
    pub channel: ChannelId,
    pub format: Format,
    /// `None`: every message of the channel.
    pub filter: Option<Filter>,
}

impl Subscription {
    /// Every message of the default channel, in `format`.
    pub fn everything(format: Format) -> Subscription {
        Subscription {
            channel: ChannelId::DEFAULT,
            format,
            filter: None,
        }
    }
}

/// What the transport knows of a client and the fan-out does not need, for the operator's
/// list of clients (`/clients`): set once, after the client joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// The remote address of its connection.
    pub peer: SocketAddr,
    /// Its signed token's `sub`, if it came with one.
    pub subject: Option<Box<str>>,
    /// When it connected, in seconds since the Unix epoch (half the size of a `SystemTime`).
    pub since: u64,
}

/// What the hub and a client's task share.
#[derive(Debug)]
pub struct Client {
    pub out: ClientOut,
    pub control: ClientControl,
    /// Which encoding of each message this client is sent.
    pub format: Format,
    /// The channel whose messages it is sent.
    pub channel: ChannelId,
    /// Which of them (`None`: all).
    pub filter: Option<Filter>,
    /// Set by the transport once the client joined. Inline rather than boxed: 64 bytes on a
    /// client that holds about 3 KiB, and no allocation of its own.
    pub info: OnceLock<ClientInfo>,
    /// Frames handed to it by the fan-out threads (pings included, a resume's backlog not).
    frames_sent: AtomicU64,
}

impl Client {
    /// A client of `subscription` whose frames go through `out`.
    pub fn new(out: ClientOut, control: ClientControl, subscription: Subscription) -> Client {
        let Subscription {
            channel,
            format,
            filter,
        } = subscription;
        Client {
            out,
            control,
            format,
            channel,
            filter,
            info: OnceLock::new(),
            frames_sent: AtomicU64::new(0),
        }
    }

    /// Frames handed to it so far.
    pub fn frames_sent(&self) -> u64 {
        self.frames_sent.load(Ordering::Relaxed)
    }

    /// Counts `count` frames handed to it; only its shard's thread calls this.
    pub(crate) fn count_sent(&self, count: u64) {
        self.frames_sent.fetch_add(count, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server holds tens of thousands of clients: what the operator's view adds to each
    /// stays small.
    #[test]
    fn the_operators_view_adds_little_to_a_client() {
        let added = std::mem::size_of::<OnceLock<ClientInfo>>() + std::mem::size_of::<AtomicU64>();
        assert!(added <= 72, "{added} bytes");
    }
}
