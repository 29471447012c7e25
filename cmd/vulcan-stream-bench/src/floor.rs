//! `send-floor`: the kernel's cost of the server's low-rate fan-out, measured without a server.
//!
//! At a low message rate the server writes one small frame per client per message, one `send`
//! each, and on loopback the receiving socket's TCP processing runs inside that `send` and is
//! charged to the sender. This mode does only that: a dedicated thread sends one websocket text
//! frame to each of N loopback TCP sockets per tick, while a tokio runtime reads the peers as
//! the generator's clients would, and the sender's own CPU time per send is the floor that the
//! server's CPU per frame at the same rate can be read against.

use std::io;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncReadExt as _;
use tokio::sync::Notify;

use crate::error::BenchError;
use crate::options::SendFloorArgs;
use crate::payload::{self, Stamp};
use crate::procstat;
use crate::report::{Floor, Report, Settings, fmt_int};
use crate::scenario::{OwnUse, cpus};

/// After the last send, how long the readers get to read everything: loopback delivers within
/// microseconds, so reaching this means bytes were lost, not late.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// Each reader's buffer: a frame is a few hundred bytes, and a reader that falls behind reads
/// several at once.
const READ_BUFFER: usize = 4096;

/// Runs the mode on its own runtime and thread; returns its report.
pub fn run(args: &SendFloorArgs) -> Result<Report, BenchError> {
    args.check()?;
    let threads = args.threads.unwrap_or_else(cpus);
    let frame = frame(args.payload_size);
    let ticks = ticks(args.duration, args.rate);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("floor-reader")
        .enable_all()
        .build()
        .map_err(|err| BenchError::Run(format!("cannot start the runtime: {err}")))?;
    let (writers, readers) = connect_pairs(args.sockets)?;

    let shared = Arc::new(Received::default());
    for reader in readers {
        let reader = {
            let _context = runtime.enter();
            tokio::net::TcpStream::from_std(reader)
                .map_err(|err| BenchError::Run(format!("cannot register a reader: {err}")))?
        };
        runtime.spawn(read(reader, shared.clone()));
    }

    let own_before = procstat::own();
    let machine_before = procstat::machine();
    let wall = Instant::now();
    let sent = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("send-floor".to_owned())
            .spawn_scoped(scope, || send_ticks(&writers, &frame, ticks, args.rate))
            .map_err(|err| BenchError::Run(format!("cannot start the writer thread: {err}")))?
            .join()
            .map_err(|_| BenchError::Run("the writer thread panicked".to_owned()))
    })?
    .map_err(|err| BenchError::Run(format!("cannot read the writer's CPU time: {err}")))?;
    let all_read = runtime.block_on(shared.wait_for(sent.bytes, DRAIN_LIMIT));
    let own_after = procstat::own();
    let machine_after = procstat::machine();
    let wall_s = wall.elapsed().as_secs_f64();
    // Nothing is left to read; the readers end with the runtime, and their peers after.
    runtime.shutdown_background();
    drop(writers);

    let floor = Floor {
        sockets: args.sockets,
        rate: args.rate,
        frame_bytes: frame.len(),
        reader_threads: threads,
        ticks,
        sends: sent.sends,
        would_block: sent.would_block,
        send_errors: sent.errors,
        late_ticks: sent.late_ticks,
        writer_cpu_s: sent.cpu.as_secs_f64(),
        wall_s: sent.wall.as_secs_f64(),
        us_per_send: (sent.sends > 0).then(|| sent.cpu.as_secs_f64() * 1e6 / sent.sends as f64),
        bytes_expected: sent.bytes,
        bytes_received: shared.bytes.load(Ordering::SeqCst),
    };
    let mut report = Report {
        mode: "send-floor".to_owned(),
        settings: Settings {
            payload_size: args.payload_size,
            duration_s: Some(args.duration.as_secs_f64()),
            rate: Some(args.rate),
            threads,
            ..Settings::default()
        },
        cpus: cpus(),
        ..Report::default()
    };
    report.problems = problems(&floor, &sent, &shared, all_read);
    if floor.late_ticks > 0 {
        report.notes.push(format!(
            "the writer started {} of {} ticks after the next was due: the cores were busy, so \
             it sent at less than {}/s",
            fmt_int(floor.late_ticks),
            fmt_int(floor.ticks),
            floor.rate
        ));
    }
    report.floor = Some(floor);
    OwnUse {
        own: (own_before, own_after),
        machine: (machine_before, machine_after),
        wall_s,
    }
    .record(&mut report, threads, None);
    Ok(report)
}

/// What the server would write for a payload of `size` bytes: one unmasked text frame.
fn frame(size: usize) -> Bytes {
    let mut body = String::with_capacity(size);
    payload::encode(
        Stamp {
            run: 0,
            publisher: 0,
            seq: 0,
            sent_ns: 0,
        },
        size,
        &mut body,
    );
    text_frame(body.as_bytes())
}

/// A final, unmasked text frame (RFC 6455 §5.2): FIN and opcode 1, the payload length in 7,
/// 7+16 or 7+64 bits, then the payload. The only frame a server sends per notification, so
/// the generator frames it itself rather than borrowing a server's encoder.
fn text_frame(payload: &[u8]) -> Bytes {
    const FIN_TEXT: u8 = 0x81;
    let len = payload.len();
    let mut frame = Vec::with_capacity(10 + len);
    frame.push(FIN_TEXT);
    if len < 126 {
        frame.push(len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        frame.push(126);
        frame.extend_from_slice(&short.to_be_bytes());
    } else {
        frame.push(127);
        frame.extend_from_slice(&(len as u64).to_be_bytes());
    }
    frame.extend_from_slice(payload);
    frame.into()
}

/// Ticks in `duration` at `rate`, at least one.
fn ticks(duration: Duration, rate: f64) -> u64 {
    (duration.as_secs_f64() * rate).round().max(1.0) as u64
}

/// Opens `count` loopback connections; returns the writing ends (the server's side, accepted)
/// and the reading ends (the clients' side), pair by pair, with Nagle off on both as the
/// server and the generator have it.
fn connect_pairs(count: usize) -> Result<(Vec<TcpStream>, Vec<TcpStream>), BenchError> {
    let failed = |what: &str, err: io::Error| {
        BenchError::Run(format!(
            "{what}: {err} ({count} sockets need {} descriptors)",
            2 * count + 1
        ))
    };
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|err| failed("cannot listen on 127.0.0.1", err))?;
    let addr = listener
        .local_addr()
        .map_err(|err| failed("cannot listen on 127.0.0.1", err))?;
    let mut writers = Vec::with_capacity(count);
    let mut readers = Vec::with_capacity(count);
    for _ in 0..count {
        let reader = TcpStream::connect(addr).map_err(|err| failed("cannot connect", err))?;
        let (writer, peer) = listener
            .accept()
            .map_err(|err| failed("cannot accept", err))?;
        let ours = reader
            .local_addr()
            .map_err(|err| failed("cannot connect", err))?;
        if peer != ours {
            return Err(BenchError::Run(format!(
                "{addr} accepted {peer}, not this process's {ours}"
            )));
        }
        for stream in [&writer, &reader] {
            stream
                .set_nodelay(true)
                .map_err(|err| failed("cannot set TCP_NODELAY", err))?;
        }
        reader
            .set_nonblocking(true)
            .map_err(|err| failed("cannot make a reader non-blocking", err))?;
        writers.push(writer);
        readers.push(reader);
    }
    Ok((writers, readers))
}

/// What the readers have read, and a wake-up for the one waiting for all of it.
#[derive(Default)]
struct Received {
    bytes: AtomicU64,
    /// What the waiter wants; `u64::MAX` (never reached) until the writer is done.
    goal: AtomicU64,
    notify: Notify,
    readers_failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Received {
    /// Waits until `goal` bytes were read or `limit` passed; whether they were.
    async fn wait_for(&self, goal: u64, limit: Duration) -> bool {
        // SeqCst on both sides: either a reader sees this goal or this load sees its bytes.
        self.goal.store(goal, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.bytes.load(Ordering::SeqCst) >= goal {
                return true;
            }
            if tokio::time::timeout_at(deadline, self.notify.notified())
                .await
                .is_err()
            {
                return self.bytes.load(Ordering::SeqCst) >= goal;
            }
        }
    }

    fn failed(&self, err: io::Error) {
        self.readers_failed.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert_with(|| err.to_string());
    }
}

/// One peer: reads until the end, counting bytes; the frames themselves are not looked at.
async fn read(mut stream: tokio::net::TcpStream, shared: Arc<Received>) {
    let mut buffer = [0u8; READ_BUFFER];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) => return,
            Ok(n) => {
                let total = shared.bytes.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                if total >= shared.goal.load(Ordering::SeqCst) {
                    // notify_one keeps a permit when nobody waits yet: no wake-up is lost.
                    shared.notify.notify_one();
                }
            }
            Err(err) => return shared.failed(err),
        }
    }
}

/// What the writer did.
#[derive(Debug, Default)]
struct Sent {
    sends: u64,
    /// Accepted by the kernel, partial sends included.
    bytes: u64,
    would_block: u64,
    errors: u64,
    first_error: Option<String>,
    late_ticks: u64,
    /// The thread's own CPU time, first tick to last send.
    cpu: Duration,
    wall: Duration,
}

/// Sends `frame` to every socket once per tick, `ticks` times at `rate` per second, the way the
/// server's fan-out does: `send` with `MSG_DONTWAIT | MSG_NOSIGNAL`, never waiting on a socket.
fn send_ticks(sockets: &[TcpStream], frame: &[u8], ticks: u64, rate: f64) -> io::Result<Sent> {
    let fds: Vec<RawFd> = sockets.iter().map(AsRawFd::as_raw_fd).collect();
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut sent = Sent::default();
    let start = Instant::now();
    let cpu_start = thread_cpu()?;
    for tick in 0..ticks {
        // From the start, not from the previous tick: sleeping late does not add up.
        let due = start + Duration::from_secs_f64(tick as f64 / rate);
        let now = Instant::now();
        if now < due {
            std::thread::sleep(due - now);
        } else if now >= due + period {
            sent.late_ticks += 1;
        }
        for &fd in &fds {
            // SAFETY: `frame` is a live buffer of `frame.len()` bytes for the duration of the
            // call, and `fd` belongs to a socket in `sockets`, open until we return.
            let n = unsafe { libc::send(fd, frame.as_ptr().cast(), frame.len(), flags) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::WouldBlock {
                    sent.would_block += 1;
                } else {
                    sent.errors += 1;
                    sent.first_error.get_or_insert_with(|| err.to_string());
                }
                continue;
            }
            sent.bytes += n as u64;
            if n as usize == frame.len() {
                sent.sends += 1;
            } else {
                sent.errors += 1;
                sent.first_error
                    .get_or_insert_with(|| format!("a send took {n} of {} bytes", frame.len()));
            }
        }
    }
    sent.cpu = thread_cpu()?.saturating_sub(cpu_start);
    sent.wall = start.elapsed();
    Ok(sent)
}

/// The calling thread's CPU time, user and system: what its sends cost, including the
/// receiving side's processing that loopback runs in them, and nothing of the readers'.
fn thread_cpu() -> io::Result<Duration> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; the clock id is valid on Linux.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Duration::new(now.tv_sec as u64, now.tv_nsec as u32))
}

/// What makes the figure untrustworthy: sends that did not go out whole, bytes that did not
/// arrive, readers that failed.
fn problems(floor: &Floor, sent: &Sent, received: &Received, all_read: bool) -> Vec<String> {
    let mut problems = Vec::new();
    if floor.would_block > 0 {
        problems.push(format!(
            "{} sends would have blocked (a socket buffer was full): the readers did not keep \
             up, so the floor was not measured at this rate",
            fmt_int(floor.would_block)
        ));
    }
    if floor.send_errors > 0 {
        problems.push(format!(
            "{} sends failed or went out in part (first: {})",
            fmt_int(floor.send_errors),
            sent.first_error.as_deref().unwrap_or("?")
        ));
    }
    let failed = received.readers_failed.load(Ordering::Relaxed);
    if failed > 0 {
        let first = received
            .first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        problems.push(format!(
            "{failed} readers failed (first: {})",
            first.as_deref().unwrap_or("?")
        ));
    }
    if !all_read {
        problems.push(format!(
            "{} of {} bytes sent were not read within {DRAIN_LIMIT:?}",
            fmt_int(floor.bytes_expected.saturating_sub(floor.bytes_received)),
            fmt_int(floor.bytes_expected)
        ));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::ReportArgs;

    #[test]
    fn frame_is_what_the_server_writes() {
        let frame = frame(200);
        assert_eq!(frame.len(), 4 + 200);
        assert_eq!(frame[..4], [0x81, 126, 0, 200]);
        assert!(frame[4..].starts_with(b"{"), "{frame:?}");
        assert_eq!(ticks(Duration::from_secs(10), 50.0), 500);
        assert_eq!(ticks(Duration::from_millis(10), 1.0), 1);
    }

    #[test]
    fn text_frame_lengths_take_the_shortest_form() {
        let header = |len: usize| {
            let payload = vec![b'x'; len];
            let frame = text_frame(&payload);
            assert!(frame.ends_with(&payload), "the payload follows the header");
            frame[..frame.len() - len].to_vec()
        };
        assert_eq!(header(0), [0x81, 0]);
        assert_eq!(header(125), [0x81, 125]);
        assert_eq!(header(126), [0x81, 126, 0, 126]);
        assert_eq!(header(65_535), [0x81, 126, 0xff, 0xff]);
        assert_eq!(header(65_536), [0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn sends_and_reads_every_byte() {
        let args = SendFloorArgs {
            sockets: 20,
            rate: 40.0,
            duration: Duration::from_millis(500),
            payload_size: 200,
            threads: Some(1),
            report: ReportArgs {
                json: false,
                strict: true,
                save: None,
            },
        };
        let report = run(&args).expect("runs");
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        let floor = report.floor.as_ref().expect("a floor");
        assert_eq!((floor.ticks, floor.sends), (20, 400));
        assert_eq!(floor.bytes_expected, 400 * floor.frame_bytes as u64);
        assert_eq!(floor.bytes_received, floor.bytes_expected);
        assert!(floor.writer_cpu_s > 0.0 && floor.us_per_send.is_some());
        assert!(
            report.table().contains("every byte read"),
            "{}",
            report.table()
        );
    }
}
