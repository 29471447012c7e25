//! Many websocket clients read by a few threads: the readers of the scale scenarios, where the
//! generator reads tens of thousands of sockets on the cores the servers write them with.
//!
//! A client here is a socket upgraded by hand ([`RawWs`]) and a little state; no task, no
//! websocket library. Each reader thread owns its share of the sockets and waits for them with
//! one level-triggered epoll set: a socket that becomes readable costs one `read` (a tokio task
//! reads until the socket says "would block", two reads per frame, and is woken, scheduled and
//! polled first) and the frames in it are parsed in place. The arrival of a frame is stamped
//! and counted as the tungstenite clients do it (a [`Tally`] each), so the reports mean the
//! same; the servers' Pings are answered with Pongs at once, so that the servers do not drop
//! the clients as vanished; a server's close frame ends its client, as does anything a
//! websocket client would refuse (an unknown opcode, reserved bits, a text message that is not
//! UTF-8, a message over 1 MiB).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::clients::{ClientEnd, ClientResult, Dial, GONE, Shared, Tally, Target};
use crate::error::BenchError;
use crate::rawws::{self, FrameHead, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, RawWs};

const OP_CONTINUATION: u8 = 0x0;
const OP_BINARY: u8 = 0x2;
/// The largest frame or message taken, as for the tungstenite clients.
const MAX_MESSAGE: u64 = 1 << 20;
/// What one `read` takes at most: a reader that fell behind gets many frames per call.
const READ_CHUNK: usize = 64 * 1024;
/// Sockets one `epoll_wait` reports at most.
const MAX_EVENTS: usize = 1024;
/// How long a reader thread waits for sockets before it looks for new clients and at the
/// stop token.
const IDLE_WAIT: Duration = Duration::from_millis(20);

/// An upgraded connection, taken out of tokio for a reader thread.
pub struct Opened {
    socket: TcpStream,
    /// What followed the 101's head: the start of the first frames.
    buf: Vec<u8>,
}

/// Connects client `id` of `target` as `dial` says and upgrades it by hand.
pub async fn open(target: &Target, dial: &Dial, id: usize) -> Result<Opened, String> {
    let ws = RawWs::dial(target, dial, id).await?;
    // Deregistered from tokio; the socket stays non-blocking.
    let socket = ws
        .stream
        .into_std()
        .map_err(|err| format!("cannot take the socket from tokio: {err}"))?;
    Ok(Opened {
        socket,
        buf: ws.buf,
    })
}

/// The reader threads; clients join them while they run.
pub struct Readers {
    joins: Vec<Sender<(usize, Opened)>>,
    threads: Vec<JoinHandle<Result<Finished, String>>>,
}

/// What a reader thread hands back: its clients' results, and their sockets, still open so
/// that the caller decides when tens of thousands of them close.
struct Finished {
    results: Vec<ClientResult>,
    sockets: Vec<TcpStream>,
}

impl Readers {
    /// Starts `threads` readers of clients that count into `shared`; they run until
    /// `shared.stop` is cancelled.
    pub fn start(shared: &Arc<Shared>, threads: usize) -> Result<Readers, BenchError> {
        let mut readers = Readers {
            joins: Vec::new(),
            threads: Vec::new(),
        };
        for index in 0..threads.max(1) {
            let (join, joined) = mpsc::channel();
            let shared = shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("reader-{index}"))
                .spawn(move || read_loop(&shared, &joined))
                .map_err(|err| BenchError::Run(format!("cannot start a reader thread: {err}")))?;
            readers.joins.push(join);
            readers.threads.push(thread);
        }
        Ok(readers)
    }

    /// Hands client `id` (its index in `Shared::progress`) to a reader.
    pub fn add(&self, id: usize, opened: Opened) {
        // A reader ends only after the stop, or on an error that `finish` reports.
        let _ = self.joins[id % self.joins.len()].send((id, opened));
    }

    /// Waits for the readers (stopped by `shared.stop`): every client's result, and the
    /// sockets, to be dropped when the caller is ready for them to close.
    pub fn finish(self) -> Result<(Vec<ClientResult>, Vec<TcpStream>), BenchError> {
        drop(self.joins);
        let (mut results, mut sockets) = (Vec::new(), Vec::new());
        for thread in self.threads {
            let finished = thread
                .join()
                .map_err(|_| BenchError::Run("a reader thread panicked".to_owned()))?
                .map_err(|why| BenchError::Run(format!("a reader thread failed: {why}")))?;
            results.extend(finished.results);
            sockets.extend(finished.sockets);
        }
        Ok((results, sockets))
    }
}

/// One reader thread: registers the clients handed to it, reads whatever is readable, and
/// stops when told to.
fn read_loop(shared: &Shared, joined: &Receiver<(usize, Opened)>) -> Result<Finished, String> {
    let epoll = Epoll::new().map_err(|err| format!("epoll_create1: {err}"))?;
    let mut clients: Vec<Client<'_>> = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
    let mut chunk = vec![0u8; READ_CHUNK];
    while !shared.stop.is_cancelled() {
        while let Ok((id, opened)) = joined.try_recv() {
            let slot = clients.len() as u64;
            let mut client = Client::new(id, slot, opened.socket, shared);
            client.end = client.feed(&opened.buf);
            if client.end.is_none() {
                epoll
                    .control(libc::EPOLL_CTL_ADD, client.fd(), libc::EPOLLIN as u32, slot)
                    .map_err(|err| format!("epoll_ctl: {err}"))?;
                client.update_interest(&epoll)?;
            } else {
                client.gone();
            }
            clients.push(client);
        }
        let ready = epoll
            .wait(&mut events, IDLE_WAIT)
            .map_err(|err| format!("epoll_wait: {err}"))?;
        for event in &events[..ready] {
            // Copied out: the struct is packed on x86-64.
            let (flags, slot) = (event.events, event.u64);
            let Some(client) = usize::try_from(slot).ok().and_then(|s| clients.get_mut(s)) else {
                continue;
            };
            if client.end.is_some() {
                continue;
            }
            let mut end = None;
            if flags & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
                end = client.readable(&mut chunk);
            }
            if end.is_none() && flags & libc::EPOLLOUT as u32 != 0 {
                end = client.flush().err();
            }
            match end {
                None => client.update_interest(&epoll)?,
                Some(end) => {
                    // The descriptor stays open until the run ends: it must leave the set.
                    let _ = epoll.control(libc::EPOLL_CTL_DEL, client.fd(), 0, 0);
                    client.end = Some(end);
                    client.gone();
                }
            }
        }
    }
    let mut finished = Finished {
        results: Vec::with_capacity(clients.len()),
        sockets: Vec::with_capacity(clients.len()),
    };
    for client in clients {
        let end = client.end.unwrap_or(ClientEnd::Open);
        finished.results.push(client.tally.finish(client.id, end));
        finished.sockets.push(client.socket);
    }
    Ok(finished)
}

/// One client of a reader thread.
struct Client<'a> {
    id: usize,
    /// Its index in the thread's list, the token the epoll set reports it with.
    slot: u64,
    socket: TcpStream,
    /// The start of a frame whose end has not arrived yet.
    partial: Vec<u8>,
    /// A fragmented message so far: its opcode and payload.
    message: Option<(u8, Vec<u8>)>,
    /// Frames the socket did not take yet (Pongs, a close), written when it becomes writable.
    unsent: Vec<u8>,
    /// Whether the epoll set waits for the socket to become writable too.
    watching_writable: bool,
    tally: Tally<'a>,
    shared: &'a Shared,
    end: Option<ClientEnd>,
}

impl<'a> Client<'a> {
    fn new(id: usize, slot: u64, socket: TcpStream, shared: &'a Shared) -> Client<'a> {
        Client {
            id,
            slot,
            socket,
            partial: Vec::new(),
            message: None,
            unsent: Vec::new(),
            watching_writable: false,
            tally: Tally::new(id, shared, None),
            shared,
            end: None,
        }
    }

    fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Marks the client as no longer progressing, at once, so that whoever waits for every
    /// client's messages stops waiting for it.
    fn gone(&self) {
        self.shared.progress[self.id]
            .0
            .store(GONE, Ordering::Relaxed);
    }

    /// One read: the socket is level-triggered, so whatever is left is reported again.
    fn readable(&mut self, chunk: &mut [u8]) -> Option<ClientEnd> {
        match (&self.socket).read(chunk) {
            Ok(0) => Some(dropped("connection closed without a close frame")),
            Ok(n) => self.feed(&chunk[..n]),
            Err(err) if would_block(&err) => None,
            Err(err) => Some(dropped(err)),
        }
    }

    /// Takes in bytes read: every whole frame is handled; the start of the next one waits.
    fn feed(&mut self, data: &[u8]) -> Option<ClientEnd> {
        if self.partial.is_empty() {
            let (used, end) = self.frames(data);
            if end.is_none() {
                self.partial.extend_from_slice(&data[used..]);
            }
            end
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(data);
            let (used, end) = self.frames(&buf);
            buf.drain(..used);
            self.partial = buf;
            end
        }
    }

    /// Handles the whole frames at the start of `data`: how many bytes they took, and how the
    /// client ended if one ended it.
    fn frames(&mut self, data: &[u8]) -> (usize, Option<ClientEnd>) {
        let mut used = 0;
        while let Some(head) = FrameHead::parse(&data[used..]) {
            if head.payload_len > MAX_MESSAGE {
                let why = format!("a frame of {} bytes, over 1 MiB", head.payload_len);
                return (used, Some(dropped(why)));
            }
            let Some(end) = head.total_len().map(|len| used + len) else {
                return (used, Some(dropped("a frame too long for memory")));
            };
            if end > data.len() {
                break;
            }
            let payload = &data[used + head.len..end];
            used = end;
            let ended = if head.mask.is_some() {
                let mut unmasked = payload.to_vec();
                head.unmask(&mut unmasked);
                self.frame(head, &unmasked)
            } else {
                self.frame(head, payload)
            };
            if ended.is_some() {
                return (used, ended);
            }
        }
        (used, None)
    }

    /// Handles one frame, unmasked.
    fn frame(&mut self, head: FrameHead, payload: &[u8]) -> Option<ClientEnd> {
        if head.rsv != 0 {
            return Some(dropped("a frame with reserved bits set"));
        }
        if head.opcode >= OP_CLOSE && (!head.fin || payload.len() > 125) {
            return Some(dropped("a fragmented or oversized control frame"));
        }
        match head.opcode {
            OP_PING => self.send(&rawws::frame(OP_PONG, payload)),
            OP_PONG => None,
            OP_CLOSE => {
                // Echoed, as the websocket clients do; the code alone is enough.
                let _ = self.send(&rawws::frame(OP_CLOSE, payload.get(..2).unwrap_or(&[])));
                let (code, reason) = rawws::close_parts(payload);
                Some(ClientEnd::Closed { code, reason })
            }
            OP_TEXT | OP_BINARY if self.message.is_some() => {
                Some(dropped("a new message inside a fragmented one"))
            }
            OP_TEXT | OP_BINARY if head.fin => self.message(head.opcode, payload),
            OP_TEXT | OP_BINARY => {
                self.message = Some((head.opcode, payload.to_vec()));
                None
            }
            OP_CONTINUATION => {
                let Some((_, so_far)) = &mut self.message else {
                    return Some(dropped("a continuation frame without a message"));
                };
                so_far.extend_from_slice(payload);
                if so_far.len() as u64 > MAX_MESSAGE {
                    return Some(dropped("a message over 1 MiB"));
                }
                if !head.fin {
                    return None;
                }
                let (opcode, whole) = self.message.take().expect("a message is being read");
                self.message(opcode, &whole)
            }
            other => Some(dropped(format!("a frame of unknown opcode {other:#x}"))),
        }
    }

    /// A whole message: a text one is counted as the tungstenite clients count it.
    fn message(&mut self, opcode: u8, payload: &[u8]) -> Option<ClientEnd> {
        if opcode == OP_BINARY {
            self.tally.other += 1;
            return None;
        }
        match std::str::from_utf8(payload) {
            Ok(text) => {
                self.tally.payload(text);
                None
            }
            Err(_) => Some(dropped("a text message that is not UTF-8")),
        }
    }

    /// Writes `frame` after whatever waits; what the socket does not take waits for it to
    /// become writable.
    fn send(&mut self, frame: &[u8]) -> Option<ClientEnd> {
        self.unsent.extend_from_slice(frame);
        self.flush().err()
    }

    /// Writes what waits, as far as the socket takes it.
    fn flush(&mut self) -> Result<(), ClientEnd> {
        while !self.unsent.is_empty() {
            match (&self.socket).write(&self.unsent) {
                Ok(0) => return Err(dropped("the socket takes nothing")),
                Ok(n) => {
                    self.unsent.drain(..n);
                }
                Err(err) if would_block(&err) => break,
                Err(err) => return Err(dropped(err)),
            }
        }
        Ok(())
    }

    /// Waits for the socket to become writable only while something waits to be written.
    fn update_interest(&mut self, epoll: &Epoll) -> Result<(), String> {
        let wanted = !self.unsent.is_empty();
        if wanted != self.watching_writable {
            let mut flags = libc::EPOLLIN as u32;
            if wanted {
                flags |= libc::EPOLLOUT as u32;
            }
            epoll
                .control(libc::EPOLL_CTL_MOD, self.fd(), flags, self.slot)
                .map_err(|err| format!("epoll_ctl: {err}"))?;
            self.watching_writable = wanted;
        }
        Ok(())
    }
}

fn would_block(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

fn dropped(error: impl ToString) -> ClientEnd {
    ClientEnd::Dropped {
        error: error.to_string(),
    }
}

/// An epoll set (level-triggered), closed when dropped.
struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> io::Result<Epoll> {
        // SAFETY: no pointer is passed; a non-negative result is a new descriptor we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by epoll_create1 and nothing else owns it.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Adds, changes or removes `fd` (`op`), reported with `token`.
    fn control(&self, op: libc::c_int, fd: RawFd, flags: u32, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: flags,
            u64: token,
        };
        // SAFETY: the event lives across the call, which only reads it.
        match unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut event) } {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    }

    /// Waits up to `limit` for ready descriptors; how many of `events` it filled.
    fn wait(&self, events: &mut [libc::epoll_event], limit: Duration) -> io::Result<usize> {
        let max = libc::c_int::try_from(events.len()).unwrap_or(libc::c_int::MAX);
        let ms = libc::c_int::try_from(limit.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: the kernel writes at most `max` events into the slice, which is that long.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), max, ms) };
        match usize::try_from(n) {
            Ok(n) => Ok(n),
            Err(_) => {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    Ok(0)
                } else {
                    Err(err)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;

    use super::*;
    use crate::payload::{self, Clock, Stamp};

    /// An unmasked server frame.
    fn server_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![first];
        match payload.len() {
            len @ 0..=125 => frame.push(len as u8),
            len => {
                frame.push(126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(payload);
        frame
    }

    fn bench_text(run: u32, seq: u64, size: usize) -> String {
        let mut text = String::new();
        let stamp = Stamp {
            run,
            publisher: 0,
            seq,
            sent_ns: 1,
        };
        payload::encode(stamp, size, &mut text);
        text
    }

    /// Waits for `what` to hold, for a few seconds at most.
    fn eventually(what: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !what() {
            assert!(Instant::now() < deadline, "not within 5 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn frames_split_anywhere_are_counted_pings_answered_and_a_close_ends_the_client() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let socket = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        socket.set_nonblocking(true).expect("non-blocking");
        let (mut server, _) = listener.accept().expect("accept");
        let shared = Arc::new(Shared::new(7, Clock::new(), 1, 1));
        let readers = Readers::start(&shared, 2).expect("readers");

        // Bench messages: the first whole in what followed the 101, the second (with a
        // 16-bit length) split inside its header, the third fragmented in two frames.
        let first = server_frame(0x81, bench_text(7, 0, 100).as_bytes());
        let second = server_frame(0x81, bench_text(7, 1, 300).as_bytes());
        let third = bench_text(7, 2, 100);
        let (a, b) = third.as_bytes().split_at(40);
        readers.add(0, Opened { socket, buf: first });
        server.write_all(&second[..3]).expect("write");
        eventually(|| shared.progress[0].0.load(Ordering::Relaxed) == 1);
        server.write_all(&second[3..]).expect("write");
        server.write_all(&server_frame(0x01, a)).expect("write");
        // A ping between the fragments is answered at once, with its payload, masked.
        server.write_all(&server_frame(0x89, b"hb")).expect("write");
        let mut pong = [0u8; 8];
        server.read_exact(&mut pong).expect("the pong");
        assert_eq!(&pong[..2], &[0x8A, 0x82]);
        let key = &pong[2..6];
        assert_eq!([pong[6] ^ key[0], pong[7] ^ key[1]], *b"hb");
        server.write_all(&server_frame(0x80, b)).expect("write");
        eventually(|| shared.progress[0].0.load(Ordering::Relaxed) == 3);

        server
            .write_all(&server_frame(0x88, b"\x03\xe8bye"))
            .expect("write");
        // The close is echoed, and the client no longer counts as progressing.
        let mut echo = [0u8; 8];
        server.read_exact(&mut echo).expect("the close echo");
        assert_eq!(&echo[..2], &[0x88, 0x82]);
        eventually(|| shared.progress[0].0.load(Ordering::Relaxed) == GONE);

        shared.stop.cancel();
        let (results, sockets) = readers.finish().expect("finish");
        assert_eq!((results.len(), sockets.len()), (1, 1));
        assert_eq!(results[0].states[0].unique, 3);
        assert_eq!(
            results[0].end,
            ClientEnd::Closed {
                code: Some(1000),
                reason: "bye".to_owned()
            }
        );
    }

    #[test]
    fn what_a_websocket_client_refuses_ends_the_client() {
        let cases: [(&[u8], &str); 4] = [
            (&[0x83, 0x00], "unknown opcode 0x3"),
            (&[0xC1, 0x00], "reserved bits"),
            (&[0x81, 0x02, 0xC3, 0x28], "not UTF-8"),
            (&[0x80, 0x00], "continuation frame without a message"),
        ];
        for (bytes, why) in cases {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let socket = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
            let shared = Shared::new(1, Clock::new(), 1, 1);
            let mut client = Client::new(0, 0, socket, &shared);
            match client.feed(bytes) {
                Some(ClientEnd::Dropped { error }) => assert!(error.contains(why), "{error}"),
                other => panic!("{why}: {other:?}"),
            }
        }
        // A frame over 1 MiB is refused from its header.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let socket = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let shared = Shared::new(1, Clock::new(), 1, 1);
        let mut client = Client::new(0, 0, socket, &shared);
        let mut huge = vec![0x81, 127];
        huge.extend_from_slice(&(2u64 << 20).to_be_bytes());
        assert!(matches!(
            client.feed(&huge),
            Some(ClientEnd::Dropped { .. })
        ));
    }
}
