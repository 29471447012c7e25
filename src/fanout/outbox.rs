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
//! Control frames (the pongs the client's pings ask for, the server's own pings) do not queue:
//! each kind has one slot, and a newer frame replaces one not yet begun (RFC 6455 §5.5.3 lets
//! a pong answer only the most recent ping). A client that floods pings and never reads thus
//! costs one pong, not one per ping.
//!
//! The shard threads send on the socket's descriptor (through [`socket2::SockRef`]), not
//! through tokio: tokio's readiness bookkeeping costs a cache miss per client per write, which
//! at a thousand clients per message is a visible share of the CPU. The socket is held under
//! the outbox's lock, which every send holds, so the descriptor stays valid while it is used;
//! when the client's task is done with the connection it takes the socket out
//! ([`ClientOut::detach`]), so that the descriptor closes then, although a shard thread's list
//! of members may keep this `ClientOut` alive until its next batch. The client's task writes
//! through tokio ([`TcpStream::try_io`]), so that a refused write clears tokio's readiness
//! before it waits for the socket to become writable; a refusal on the direct path leaves
//! tokio thinking the socket is writable, which costs the task at most one extra attempt.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Buf, Bytes};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::message::websocket::opcode;

/// At most this many buffers go into one `writev`.
const MAX_IOVECS: usize = 128;

/// The control frames that wait in slots rather than in the queue, in the order they go out.
const CONTROL_OPCODES: [u8; 2] = [opcode::PONG, opcode::PING];

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

/// Frames not yet written, the first possibly in part, and the socket they are for.
#[derive(Debug, Default)]
struct Outbox {
    frames: VecDeque<Bytes>,
    /// One control frame of each kind in [`CONTROL_OPCODES`], not yet begun. They go out at the
    /// next frame boundary, ahead of queued data; one the socket begins moves to the head of
    /// `frames`, so that a slot never holds a frame that must be finished.
    control: [Option<Bytes>; CONTROL_OPCODES.len()],
    /// Set once the upgrade completed; taken out when the client's task is done with it.
    socket: Option<Arc<TcpStream>>,
    /// No more frames are accepted (closing, gone, or the socket failed).
    sealed: bool,
    /// The first frame has been written in part: it cannot be dropped without corrupting the
    /// stream.
    head_started: bool,
    /// How many of the first frames are a resumed client's backlog, which does not count
    /// against the capacity: only frames published since it joined do.
    backlog: usize,
}

impl Outbox {
    /// Nothing waits to be written.
    fn is_empty(&self) -> bool {
        self.frames.is_empty() && self.control.iter().all(Option::is_none)
    }

    /// Takes nothing more and lets go of what waits: the socket failed or the client is gone.
    fn fail(&mut self) {
        self.sealed = true;
        self.frames.clear();
        self.control = Default::default();
        self.backlog = 0;
    }

    /// Writes what waits, as much as the socket takes now through `send`: the frame begun
    /// first (a frame cannot be interrupted), then the control frames, then the queue. Returns
    /// whether everything went out; without a socket, nothing does.
    fn write_with(
        &mut self,
        send: fn(&TcpStream, &[IoSlice<'_>]) -> io::Result<usize>,
    ) -> io::Result<bool> {
        let Some(socket) = self.socket.as_deref() else {
            return Ok(false);
        };
        // The control frames join the queue for this write only: those the socket does not
        // begin go back to their slots, where a newer one may still replace them.
        let at = usize::from(self.head_started);
        let mut joined = [0; CONTROL_OPCODES.len()];
        let mut count = 0;
        for (slot, frame) in self.control.iter_mut().enumerate() {
            if let Some(frame) = frame.take() {
                self.frames.insert(at + count, frame);
                joined[count] = slot;
                count += 1;
            }
        }
        let (done, offset) =
            write_frames(self.frames.make_contiguous(), |slices| send(socket, slices))?;
        let mut controls_done = 0;
        for (i, &slot) in joined[..count].iter().enumerate().rev() {
            let index = at + i;
            let begun = index < done || (index == done && offset > 0);
            if !begun {
                self.control[slot] = self.frames.remove(index);
            }
            controls_done += usize::from(index < done);
        }
        self.frames.drain(..done);
        // The backlog is data at the front: control frames written ahead of it are not part.
        self.backlog = self.backlog.saturating_sub(done - controls_done);
        if offset > 0 {
            self.frames
                .front_mut()
                .expect("a partly written frame is still queued")
                .advance(offset);
        }
        if done > 0 || offset > 0 {
            self.head_started = offset > 0;
        }
        Ok(self.is_empty())
    }

    /// The shard thread's write: what waits goes first, and `batch` follows straight into the
    /// socket only when the socket took all of that. Returns the frames of `batch` it did not
    /// take, to be queued; a frame it took in part is queued already, as the head. It writes
    /// past tokio (see the module's doc), whose readiness may say "not writable" long after
    /// the client has read.
    fn write_batch<'b>(&mut self, batch: &'b [Bytes]) -> io::Result<&'b [Bytes]> {
        if !self.is_empty() && !self.write_with(send_vectored)? {
            return Ok(batch);
        }
        let Some(socket) = self.socket.as_deref() else {
            return Ok(batch);
        };
        match write_frames(batch, |slices| send_vectored(socket, slices))? {
            (done, 0) => Ok(&batch[done..]),
            (done, offset) => {
                // The stream now holds part of this frame: the rest of it must follow.
                self.frames.push_back(batch[done].slice(offset..));
                self.head_started = true;
                Ok(&batch[done + 1..])
            }
        }
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

/// [`send_vectored`] through tokio: a refusal clears tokio's write readiness, so that the
/// client's task then waits for the socket to become writable. For the client's task only: a
/// shard thread must not trust that readiness, which only the task's runtime updates.
fn send_through_tokio(stream: &TcpStream, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    stream.try_io(Interest::WRITABLE, || send_vectored(stream, slices))
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

/// The shared outgoing state of one client.
#[derive(Debug)]
pub struct ClientOut {
    outbox: Mutex<Outbox>,
    /// Tells the client's task that the outbox holds frames it must flush. Given whenever the
    /// outbox of an attached client goes from empty to not empty (or on attach): the task
    /// waits for it only while the outbox is empty, and for the socket otherwise.
    backlog: Notify,
    capacity: usize,
}

impl ClientOut {
    /// `capacity` bounds the frames waiting in the outbox.
    pub fn new(capacity: usize) -> ClientOut {
        ClientOut {
            outbox: Mutex::default(),
            backlog: Notify::new(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Outbox> {
        // Each critical section leaves the outbox consistent before anything can panic.
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives the socket, once the upgrade completed. Frames queued until now are flushed by
    /// the client's task, which is told through [`ClientOut::backlog_signalled`]. The task
    /// attaches before anything seals the outbox; a client detached already keeps no socket.
    pub fn attach(&self, stream: Arc<TcpStream>) {
        let mut outbox = self.lock();
        if outbox.sealed {
            return;
        }
        outbox.socket = Some(stream);
        if !outbox.is_empty() {
            self.backlog.notify_one();
        }
    }

    /// Lets go of the socket and of whatever still waits: the client's task is done with the
    /// connection. Its descriptor then closes with the task's own handle, at once, rather than
    /// when a shard thread next rebuilds its list of members (which holds this `ClientOut`,
    /// and happens only when a batch arrives: up to a PingInterval on a quiet channel).
    pub fn detach(&self) {
        let mut outbox = self.lock();
        outbox.fail();
        let socket = outbox.socket.take();
        drop(outbox);
        // Closing a descriptor (and leaving tokio's reactor) is done outside the lock.
        drop(socket);
    }

    /// Hands frames to the client: written at once when the socket takes them, else queued.
    /// Only frames that truly wait count against the capacity: what already waits is flushed
    /// first, and when the socket took all of it the batch goes straight in after it. So a
    /// client that reads as fast as frames come is never taken for a slow one, whatever the
    /// batch size, nor for one frame left half written by the previous batch.
    ///
    /// With nothing waiting (the usual case) this is one `sendmsg` under the outbox's lock.
    pub fn send(&self, frames: &[Bytes]) -> Delivery {
        let mut outbox = self.lock();
        if outbox.sealed {
            return Delivery::Closed;
        }
        let idle = outbox.is_empty();
        let rest = match outbox.write_batch(frames) {
            Ok(rest) => rest,
            Err(_) => {
                // The task sees the same error on its next read and ends.
                outbox.fail();
                return Delivery::Closed;
            }
        };
        if outbox.frames.len() - outbox.backlog + rest.len() > self.capacity {
            return Delivery::Overflow;
        }
        outbox.frames.extend(rest.iter().cloned());
        if idle && outbox.socket.is_some() && !outbox.is_empty() {
            self.backlog.notify_one();
        }
        Delivery::Accepted
    }

    /// Queues what a resuming client missed, ahead of anything published, before it joins.
    pub fn preload(&self, backlog: Vec<Bytes>) {
        let mut outbox = self.lock();
        outbox.backlog += backlog.len();
        outbox.frames.extend(backlog);
    }

    /// Writes a control frame (pong, ping): at once when nothing waits, else at the next frame
    /// boundary, ahead of queued data. It does not count against the capacity; instead a
    /// pending frame of the same kind not yet begun is replaced, so at most one of each waits.
    pub fn send_control(&self, frame: Bytes) {
        let kind = frame.first().map(|b| b & 0x0f);
        let slot = CONTROL_OPCODES
            .iter()
            .position(|&op| Some(op) == kind)
            .expect("only pongs and pings are sent as control frames; a close seals");
        let mut outbox = self.lock();
        if outbox.sealed {
            return;
        }
        let was_idle = outbox.is_empty();
        outbox.control[slot] = Some(frame);
        if outbox.socket.is_some() && was_idle {
            match outbox.write_with(send_through_tokio) {
                Ok(true) => {}
                Ok(false) => self.backlog.notify_one(),
                Err(_) => outbox.fail(),
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
            outbox.backlog = outbox.backlog.min(keep);
            outbox.control = Default::default();
        }
        outbox.frames.push_back(close);
        outbox.sealed = true;
    }

    /// Frames waiting in the outbox (a resume's backlog included, control frames not), for the
    /// operator's list of clients.
    pub fn queued(&self) -> usize {
        self.lock().frames.len()
    }

    /// Whether frames wait to be flushed.
    pub fn has_backlog(&self) -> bool {
        !self.lock().is_empty()
    }

    /// Resolves when a sender queued frames that the client's task must flush.
    pub async fn backlog_signalled(&self) {
        self.backlog.notified().await;
    }

    /// Writes what the socket takes now; `Ok(true)` when the outbox is empty.
    pub fn flush(&self) -> io::Result<bool> {
        let mut outbox = self.lock();
        let result = outbox.write_with(send_through_tokio);
        if result.is_err() {
            outbox.fail();
        }
        result
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    /// What the peer receives until the server's side closes; panics if it stays open for
    /// seconds (a failure guard: it closes at once or never).
    pub async fn read_until_closed(peer: &mut TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), peer.read_to_end(&mut got))
            .await
            .expect("the socket is closed")
            .expect("read");
        got
    }

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
    use super::test_support::{read_until_closed, socket_pair as pair};
    use super::*;
    use crate::message::websocket::encode;
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

    /// Once the client's task lets go, the descriptor closes although the outbox lives on (a
    /// shard thread's list of members holds it until its next batch).
    #[tokio::test]
    async fn detach_closes_the_socket_while_the_outbox_lives_on() {
        let out = ClientOut::new(4);
        let (server, mut peer) = pair().await;
        out.attach(server);
        assert_eq!(out.send(&[Bytes::from_static(b"bye")]), Delivery::Accepted);
        out.detach();
        assert_eq!(read_until_closed(&mut peer).await, b"bye");
        assert_eq!(out.send(&[Bytes::from_static(b"late")]), Delivery::Closed);
        assert!(!out.has_backlog());
    }

    /// A client that pings without reading is owed one pong, the newest, however many pings
    /// it sends; the server's own pings are bounded the same way.
    #[tokio::test]
    async fn one_pong_and_one_ping_wait_at_most_and_the_newest_wins() {
        let out = ClientOut::new(4);
        let (server, mut peer) = pair().await;
        out.attach(server.clone());
        // More than the socket takes while the peer does not read: its rest waits.
        let big = Bytes::from(vec![b'd'; 32 << 20]);
        assert_eq!(out.send(std::slice::from_ref(&big)), Delivery::Accepted);
        assert!(
            out.has_backlog(),
            "the socket took all of {} bytes",
            big.len()
        );
        for i in 0..1000u32 {
            out.send_control(encode(opcode::PONG, &i.to_be_bytes()));
            out.send_control(encode(opcode::PING, &i.to_be_bytes()));
        }
        {
            let outbox = out.lock();
            assert_eq!(
                outbox.frames.len(),
                1,
                "only the big frame's rest is queued"
            );
            assert!(outbox.control.iter().all(Option::is_some));
        }
        let last = [
            encode(opcode::PONG, &999u32.to_be_bytes()),
            encode(opcode::PING, &999u32.to_be_bytes()),
        ]
        .concat();
        let expected = big.len() + last.len();
        let reader = tokio::spawn(async move {
            let mut got = vec![0; expected];
            peer.read_exact(&mut got).await.expect("read");
            got
        });
        while !out.flush().expect("flush") {
            server.writable().await.expect("writable");
        }
        let got = reader.await.expect("reader");
        assert!(got[..big.len()].iter().all(|&b| b == b'd'));
        assert_eq!(&got[big.len()..], &last[..]);
    }

    /// A control frame waits for the end of a frame begun, then goes ahead of queued data.
    #[tokio::test]
    async fn a_control_frame_goes_out_at_the_next_frame_boundary() {
        let out = ClientOut::new(4);
        let (server, mut peer) = pair().await;
        {
            // As after a frame the socket took in part (its rest is queued), then another.
            let mut outbox = out.lock();
            outbox
                .frames
                .extend([Bytes::from_static(b"rest,"), Bytes::from_static(b"next,")]);
            outbox.head_started = true;
        }
        let pong = encode(opcode::PONG, b"p");
        out.send_control(pong.clone());
        out.attach(server);
        assert!(out.flush().expect("flush"));
        let expected = [&b"rest,"[..], &pong, b"next,"].concat();
        let mut got = vec![0; expected.len()];
        peer.read_exact(&mut got).await.expect("read");
        assert_eq!(got, expected);
    }
}

#[cfg(test)]
mod backlog_tests {
    use super::test_support::socket_pair;
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A resumed client's backlog goes out first and does not make it look slow.
    #[tokio::test]
    async fn a_backlog_goes_first_and_does_not_count_against_the_capacity() {
        let out = ClientOut::new(2);
        let backlog: Vec<Bytes> = (0..10u8).map(|i| Bytes::from(vec![i])).collect();
        out.preload(backlog);
        assert_eq!(out.send(&[Bytes::from_static(b"a")]), Delivery::Accepted);
        assert_eq!(out.send(&[Bytes::from_static(b"b")]), Delivery::Accepted);
        assert_eq!(out.send(&[Bytes::from_static(b"c")]), Delivery::Overflow);
        let (server, mut peer) = socket_pair().await;
        out.attach(server);
        assert!(out.flush().expect("flush"));
        let mut got = [0u8; 12];
        peer.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09ab");
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

    /// A frame left half written by the previous batch does not make the next one wait when
    /// the socket has room: what waits is flushed first, and the batch, larger than the
    /// capacity, goes straight in. (Counting the whole batch as waiting kicked such a client
    /// as too slow.)
    #[tokio::test]
    async fn a_half_written_frame_does_not_count_a_batch_the_socket_takes() {
        let out = ClientOut::new(4);
        let (server, mut peer) = socket_pair().await;
        out.attach(server);
        {
            // As after a batch whose last frame the socket took in part, the peer having
            // read everything since.
            let mut outbox = out.lock();
            outbox.frames.push_back(Bytes::from_static(b"tail."));
            outbox.head_started = true;
        }
        let frames: Vec<Bytes> = (0..10u8).map(|i| Bytes::from(vec![b'a' + i; 10])).collect();
        assert_eq!(out.send(&frames), Delivery::Accepted);
        assert!(!out.has_backlog());
        let expected = [&b"tail."[..], &frames.concat()].concat();
        let mut got = vec![0; expected.len()];
        peer.read_exact(&mut got).await.expect("read");
        assert_eq!(got, expected);
    }
}
