//! One client's outgoing side, shared by the shard thread that writes to it and the client's
//! task, which flushes what could not be written at once.
//!
//! A shard thread writes straight into a writable socket: one non-blocking `sendmsg` per client
//! per batch of notifications, with no wakeup of the client's task. Only what the kernel does
//! not take at once goes into the client's outbox, bounded in frames; the client's task then
//! waits for the socket to become writable and flushes. Until the websocket upgrade completes
//! there is no socket yet, and frames wait in the outbox too: that is how a client registered
//! before its 101 misses nothing.
//!
//! The shard threads send on the socket's descriptor (through [`socket2::SockRef`]), not
//! through tokio: tokio's readiness bookkeeping costs a cache miss per client per write, which
//! at a thousand clients per message is a visible share of the CPU. The descriptor stays valid
//! because the stream is held here for as long as it is used. The client's task writes through
//! tokio ([`TcpStream::try_io`]), so that a refused write clears tokio's readiness before it
//! waits for the socket to become writable; a refusal on the direct path leaves tokio thinking
//! the socket is writable, which costs the task at most one extra attempt.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::{Buf, Bytes};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// At most this many buffers go into one `writev`.
const MAX_IOVECS: usize = 128;

/// What happened to frames handed to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Written or queued.
    Accepted,
    /// The outbox is full: the client does not keep up.
    Overflow,
    /// The client is closing or its socket failed; it takes nothing more.
    Closed,
}

/// Frames not yet written, the first possibly in part.
#[derive(Debug, Default)]
struct Outbox {
    frames: VecDeque<Bytes>,
    /// No more frames are accepted (closing, or the socket failed).
    sealed: bool,
    /// The first frame has been written in part: it cannot be dropped without corrupting the
    /// stream.
    head_started: bool,
}

impl Outbox {
    /// Writes as much as the socket takes now, through tokio (this is the client task's path);
    /// returns whether everything went out.
    fn write_to(&mut self, socket: &Attached) -> io::Result<bool> {
        let (done, offset) = write_frames(self.frames.make_contiguous(), |slices| {
            socket
                .stream
                .try_io(Interest::WRITABLE, || send_vectored(&socket.stream, slices))
        })?;
        self.frames.drain(..done);
        if offset > 0 {
            self.frames
                .front_mut()
                .expect("a partly written frame is still queued")
                .advance(offset);
        }
        if done > 0 || offset > 0 {
            self.head_started = offset > 0;
        }
        Ok(self.frames.is_empty())
    }
}

/// Sends `slices` without blocking: `send` for one buffer, `sendmsg` for several. socket2 adds
/// `MSG_NOSIGNAL`, so a vanished peer is an `EPIPE` error rather than a `SIGPIPE`.
fn send_vectored(stream: &TcpStream, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    let socket = SockRef::from(stream);
    match slices {
        [one] => socket.send_with_flags(one, libc::MSG_DONTWAIT),
        _ => socket.send_vectored_with_flags(slices, libc::MSG_DONTWAIT),
    }
}

/// Writes `frames` in order with as few sends as the socket allows, until it would block.
/// Returns how many frames went out whole and how many bytes of the next one.
fn write_frames(
    frames: &[Bytes],
    mut send: impl FnMut(&[IoSlice<'_>]) -> io::Result<usize>,
) -> io::Result<(usize, usize)> {
    let mut done = 0;
    let mut offset = 0;
    while done < frames.len() {
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let pending = &frames[done..];
        let count = pending.len().min(MAX_IOVECS);
        slices[0] = IoSlice::new(&pending[0][offset..]);
        for (slot, frame) in slices[1..count].iter_mut().zip(&pending[1..]) {
            *slot = IoSlice::new(frame);
        }
        let mut written = match send(&slices[..count]) {
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
            Err(err) => return Err(err),
        };
        while written > 0 {
            let left = frames[done].len() - offset;
            if written >= left {
                written -= left;
                done += 1;
                offset = 0;
            } else {
                offset += written;
                written = 0;
            }
        }
    }
    Ok((done, offset))
}

/// The client's socket, once the upgrade completed.
#[derive(Debug)]
struct Attached {
    /// Keeps the descriptor open for as long as this is reachable.
    stream: Arc<TcpStream>,
}

/// The shared outgoing state of one client.
#[derive(Debug)]
pub struct ClientOut {
    outbox: Mutex<Outbox>,
    /// Set once the upgrade completed.
    stream: OnceLock<Attached>,
    /// Tells the client's task that the outbox holds frames it must flush.
    backlog: Notify,
    capacity: usize,
}

impl ClientOut {
    /// `capacity` bounds the frames waiting in the outbox.
    pub fn new(capacity: usize) -> ClientOut {
        ClientOut {
            outbox: Mutex::default(),
            stream: OnceLock::new(),
            backlog: Notify::new(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Outbox> {
        // Each critical section leaves the outbox consistent before anything can panic.
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives the socket, once the upgrade completed. Frames queued until now are flushed by
    /// the client's task, which is told through [`ClientOut::backlog_signalled`].
    pub fn attach(&self, stream: Arc<TcpStream>) {
        let outbox = self.lock();
        let _ = self.stream.set(Attached { stream });
        if !outbox.frames.is_empty() {
            self.backlog.notify_one();
        }
    }

    /// Hands frames to the client: written at once when the socket takes them, else queued.
    /// Only what the socket did not take counts against the capacity, so a client that reads
    /// as fast as frames come is never taken for a slow one, whatever the batch size.
    pub fn send(&self, frames: &[Bytes]) -> Delivery {
        let mut outbox = self.lock();
        if outbox.sealed {
            return Delivery::Closed;
        }
        let mut rest = frames;
        let stream = self.stream.get();
        if let Some(socket) = stream.filter(|_| outbox.frames.is_empty()) {
            match write_frames(frames, |slices| send_vectored(&socket.stream, slices)) {
                Ok((done, 0)) => rest = &frames[done..],
                Ok((done, offset)) => {
                    // The stream now holds part of this frame: the rest of it must follow.
                    outbox.frames.push_back(frames[done].slice(offset..));
                    outbox.head_started = true;
                    rest = &frames[done + 1..];
                }
                Err(_) => {
                    // The task sees the same error on its next read and ends.
                    outbox.sealed = true;
                    return Delivery::Closed;
                }
            }
        }
        let was_idle = outbox.frames.is_empty();
        if outbox.frames.len() + rest.len() > self.capacity {
            return Delivery::Overflow;
        }
        outbox.frames.extend(rest.iter().cloned());
        if stream.is_some() && !outbox.frames.is_empty() && (was_idle || outbox.head_started) {
            self.backlog.notify_one();
        }
        Delivery::Accepted
    }

    /// Writes a control frame (pong, ping) ahead of nothing: it queues behind data like any
    /// frame, but does not count against the capacity.
    pub fn send_control(&self, frame: Bytes) {
        let mut outbox = self.lock();
        if outbox.sealed {
            return;
        }
        let was_idle = outbox.frames.is_empty();
        outbox.frames.push_back(frame);
        if let Some(stream) = self.stream.get().filter(|_| was_idle) {
            match outbox.write_to(stream) {
                Ok(true) => {}
                Ok(false) => self.backlog.notify_one(),
                Err(_) => outbox.sealed = true,
            }
        }
    }

    /// Ends the stream with `close`: nothing is accepted after it. When `drop_queued` (a client
    /// too slow to keep up), frames not yet started are discarded so the close goes out next.
    pub fn seal_with(&self, close: Bytes, drop_queued: bool) {
        let mut outbox = self.lock();
        if outbox.sealed {
            return;
        }
        if drop_queued {
            let keep = usize::from(outbox.head_started);
            outbox.frames.truncate(keep);
        }
        outbox.frames.push_back(close);
        outbox.sealed = true;
    }

    /// Whether frames wait to be flushed.
    pub fn has_backlog(&self) -> bool {
        !self.lock().frames.is_empty()
    }

    /// Resolves when a sender queued frames that the client's task must flush.
    pub async fn backlog_signalled(&self) {
        self.backlog.notified().await;
    }

    /// Writes what the socket takes now; `Ok(true)` when the outbox is empty.
    pub fn flush(&self) -> io::Result<bool> {
        let Some(stream) = self.stream.get() else {
            return Ok(false);
        };
        let mut outbox = self.lock();
        let result = outbox.write_to(stream);
        if result.is_err() {
            outbox.sealed = true;
            outbox.frames.clear();
        }
        result
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair on loopback: (the server's side, shared as the hub holds it; the peer).
    pub async fn socket_pair() -> (Arc<TcpStream>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connect = TcpStream::connect(addr);
        let (accepted, connected) = tokio::join!(listener.accept(), connect);
        (
            Arc::new(accepted.expect("accept").0),
            connected.expect("connect"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::socket_pair as pair;
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn queues_until_attached_then_writes_directly() {
        let out = ClientOut::new(8);
        assert_eq!(out.send(&[Bytes::from_static(b"ab")]), Delivery::Accepted);
        assert!(out.has_backlog());
        let (server, mut peer) = pair().await;
        out.attach(server);
        out.backlog_signalled().await;
        assert!(out.flush().expect("flush"));
        assert_eq!(out.send(&[Bytes::from_static(b"cd")]), Delivery::Accepted);
        assert!(!out.has_backlog());
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"abcd");
    }

    #[tokio::test]
    async fn overflows_when_the_peer_does_not_read() {
        let out = ClientOut::new(4);
        let (server, _peer) = pair().await;
        out.attach(server);
        let big = Bytes::from(vec![0u8; 1 << 20]);
        let mut result = Delivery::Accepted;
        for _ in 0..256 {
            result = out.send(std::slice::from_ref(&big));
            if result != Delivery::Accepted {
                break;
            }
        }
        assert_eq!(result, Delivery::Overflow);
        out.seal_with(Bytes::from_static(b"close"), true);
        assert_eq!(out.send(&[big]), Delivery::Closed);
    }
}

#[cfg(test)]
mod batch_tests {
    use super::test_support::socket_pair;
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_batch_larger_than_the_capacity_goes_out_when_the_socket_takes_it() {
        let out = ClientOut::new(4);
        let (server, mut peer) = socket_pair().await;
        out.attach(server);
        let frames: Vec<Bytes> = (0..100u8).map(|i| Bytes::from(vec![i; 10])).collect();
        assert_eq!(out.send(&frames), Delivery::Accepted);
        assert!(!out.has_backlog());
        let mut got = vec![0; 1000];
        peer.read_exact(&mut got).await.expect("read");
        assert!(
            got.chunks(10)
                .enumerate()
                .all(|(i, c)| c.iter().all(|&b| b == i as u8))
        );
    }
}
