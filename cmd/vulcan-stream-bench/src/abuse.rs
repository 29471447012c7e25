//! The abusers of `abuse`, run beside a soak's readers on a runtime of their own: each kind
//! keeps its slots busy until the soak ends, one connection after another, and every
//! connection's end is checked against what the server should do to it.
//!
//! - ping flood: sends 125-byte Pings and never reads. The server owes it one pong at a time,
//!   so the flood costs it no memory; the frames it cannot deliver pile up until the client is
//!   closed as too slow (1008). The flooder notices when the server stops reading it (its
//!   writes stall) and then reads, to see the close frame; where the server gave up on the
//!   close first, it sees a reset, and the server's count of slow closes is the cross-check.
//! - slowloris: sends its request head one byte at a time; it must be dropped at the server's
//!   handshake timeout, not before and not much later.
//! - big frame: announces a 10 MB text frame and sends it; closed with 1009 (too big).
//! - invalid UTF-8: a text frame that is not UTF-8, then a Ping; closed with 1007. A server
//!   that answers the Ping instead does not validate text frames: the check is reported as not
//!   made, not as failed.
//! - churn: opens websockets at a fixed rate and closes each at once with 1000; the server
//!   must echo 1000.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

use crate::clients::{Dial, Target};
use crate::options::AbuseArgs;
use crate::rawws::{self, OP_PING, OP_TEXT, RawWs, ReadEnd, ServerFrame};
use crate::report::fmt_int;
use crate::status::StatusUrl;

/// A flooder whose write has not gone through for this long takes it that the server stopped
/// reading it, and reads.
const STALL: Duration = Duration::from_millis(200);
/// How long a stalled flooder reads before it floods again.
const STALL_READ: Duration = Duration::from_secs(3);
/// How long a big-frame or invalid-UTF-8 client waits for its close.
const CLOSE_LIMIT: Duration = Duration::from_secs(10);
/// A slowloris connection must be dropped within this long after the handshake timeout...
const SLOWLORIS_LATE: Duration = Duration::from_secs(2);
/// ... and not more than this before it.
const SLOWLORIS_EARLY: Duration = Duration::from_millis(500);
/// Churn connections in flight at most; a tick that finds them all busy is skipped.
const CHURN_IN_FLIGHT: usize = 256;
/// The payload of the Ping that follows an invalid text frame.
const UTF8_PROBE: &[u8] = b"utf-8?";
/// A text frame that is not UTF-8: "κόσμε" with an encoded surrogate (ED A0 80) in the middle.
const NOT_UTF8: &[u8] = &[
    0xCE, 0xBA, 0xE1, 0xBD, 0xB9, 0xCF, 0x83, 0xCE, 0xBC, 0xCE, 0xB5, 0xED, 0xA0, 0x80, 0x65, 0x64,
    0x69, 0x74, 0x65, 0x64,
];

/// How one abuser's connection ended, against what was expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Right,
    Wrong,
    /// Still going when the run ended, and not yet due to be closed.
    Open,
    /// The expected end could not be checked (the server does not validate UTF-8).
    NotChecked,
}

/// One kind of abuser over the whole run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AbuseClass {
    pub name: String,
    /// What the server should do to it.
    pub expected: String,
    pub attempts: u64,
    pub right: u64,
    pub wrong: u64,
    pub open_at_end: u64,
    pub not_checked: u64,
    /// Each way a connection ended, counted.
    pub ends: Vec<String>,
    /// Slowloris: the shortest and longest time to be dropped, in seconds.
    pub dropped_after_s: Option<(f64, f64)>,
}

impl AbuseClass {
    /// Whether the server did right by this kind: nothing wrong, and at least one connection
    /// ended as expected (or, where the check cannot be made, was found so).
    pub fn passed(&self) -> bool {
        self.wrong == 0 && self.right > 0
    }

    pub fn text(&self) -> String {
        let mut text = format!(
            "{} connections: {} as expected ({}), {} not, {} open at the end",
            fmt_int(self.attempts),
            fmt_int(self.right),
            self.expected,
            fmt_int(self.wrong),
            fmt_int(self.open_at_end)
        );
        if self.not_checked > 0 {
            text.push_str(&format!(", {} not checked", fmt_int(self.not_checked)));
        }
        if let Some((first, last)) = self.dropped_after_s {
            text.push_str(&format!("; dropped after {first:.2} to {last:.2} s"));
        }
        text.push_str(&format!(" [{}]", self.ends.join(", ")));
        text
    }
}

/// What the abusers saw, beside the soak's RSS and readers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Abuse {
    pub classes: Vec<AbuseClass>,
    /// Clients the server counted as closed for being too slow (its
    /// `vulcan_stream_clients_disconnected_slow_total`) during the run: at least every ping
    /// flooder that ended. `None` when the server's /metrics does not say.
    pub slow_closes: Option<u64>,
    pub churn_rate: f64,
    /// Churn connections achieved per second, and ticks skipped because CHURN_IN_FLIGHT
    /// connections were still in flight.
    pub churn_achieved_per_s: f64,
    pub churn_skipped: u64,
    pub notes: Vec<String>,
}

impl Abuse {
    pub fn class(&self, name: &str) -> Option<&AbuseClass> {
        self.classes.iter().find(|c| c.name == name)
    }

    /// Whether the server did right by kind `name`: [`AbuseClass::passed`], and for the ping
    /// flood, the server counted at least as many closes for slowness as flooders ended.
    pub fn passed(&self, class: &AbuseClass) -> bool {
        class.passed()
            && (class.name != PING_FLOOD || self.slow_closes.is_none_or(|n| n >= class.right))
    }

    pub fn rows(&self, rows: &mut Vec<(&'static str, String)>) {
        for class in &self.classes {
            let key = match class.name.as_str() {
                PING_FLOOD => "ping flood",
                SLOWLORIS => "slowloris",
                BIG_FRAME => "big frame",
                BAD_UTF8 => "bad UTF-8",
                _ => "churn",
            };
            rows.push((key, class.text()));
        }
        if let Some(n) = self.slow_closes {
            rows.push((
                "slow closes",
                format!(
                    "{} clients closed as too slow (1008), by the server's count",
                    fmt_int(n)
                ),
            ));
        }
        rows.push((
            "churn rate",
            format!(
                "{:.0}/s of {:.0}/s asked ({} skipped with {CHURN_IN_FLIGHT} in flight)",
                self.churn_achieved_per_s,
                self.churn_rate,
                fmt_int(self.churn_skipped)
            ),
        ));
        for note in &self.notes {
            rows.push(("abuse note", note.clone()));
        }
    }
}

pub const PING_FLOOD: &str = "ping flood";
pub const SLOWLORIS: &str = "slowloris";
pub const BIG_FRAME: &str = "big frame";
pub const BAD_UTF8: &str = "invalid UTF-8";
pub const CHURN: &str = "churn";

/// A class's tally while the run goes on.
#[derive(Default)]
struct Tally {
    attempts: u64,
    marks: [u64; 4],
    ends: BTreeMap<String, u64>,
    dropped_after: Option<(f64, f64)>,
}

#[derive(Clone, Default)]
struct SharedTally(Arc<Mutex<Tally>>);

impl SharedTally {
    fn record(&self, end: String, mark: Mark) {
        let mut tally = self.0.lock().unwrap_or_else(|p| p.into_inner());
        tally.attempts += 1;
        tally.marks[mark as usize] += 1;
        *tally.ends.entry(end).or_default() += 1;
    }

    fn dropped_after(&self, seconds: f64) {
        let mut tally = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (low, high) = tally.dropped_after.unwrap_or((seconds, seconds));
        tally.dropped_after = Some((low.min(seconds), high.max(seconds)));
    }

    fn class(&self, name: &str, expected: String) -> AbuseClass {
        let tally = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let [right, wrong, open_at_end, not_checked] = tally.marks;
        AbuseClass {
            name: name.to_owned(),
            expected,
            attempts: tally.attempts,
            right,
            wrong,
            open_at_end,
            not_checked,
            ends: tally
                .ends
                .iter()
                .map(|(end, n)| format!("{}× {end}", fmt_int(*n)))
                .collect(),
            dropped_after_s: tally.dropped_after,
        }
    }
}

/// The abusers of one run.
pub struct AbuseSide {
    target: Target,
    status: Option<StatusUrl>,
    ping_flooders: usize,
    ping_rate: u32,
    slowloris: usize,
    slowloris_interval: Duration,
    handshake_timeout: Duration,
    big_frames: usize,
    big_frame_size: u64,
    bad_utf8: usize,
    pause: Duration,
    churn_rate: f64,
}

impl AbuseSide {
    pub fn new(args: &AbuseArgs, target: Target, status: Option<StatusUrl>) -> AbuseSide {
        AbuseSide {
            target,
            status,
            ping_flooders: args.ping_flooders,
            ping_rate: args.ping_rate,
            slowloris: args.slowloris,
            slowloris_interval: args.slowloris_interval,
            handshake_timeout: args.handshake_timeout,
            big_frames: args.big_frames,
            big_frame_size: args.big_frame_size,
            bad_utf8: args.bad_utf8,
            pause: args.abuse_pause,
            churn_rate: args.churn_rate,
        }
    }

    /// Runs every abuser until `stop`, on the current runtime; returns what they saw.
    pub async fn run(self, stop: CancellationToken) -> Abuse {
        let side = Arc::new(self);
        let slow_before = side.slow_closes().await;
        let kinds = [
            (Kind::PingFlood, side.ping_flooders),
            (Kind::Slowloris, side.slowloris),
            (Kind::BigFrame, side.big_frames),
            (Kind::BadUtf8, side.bad_utf8),
        ];
        let tallies: [SharedTally; 4] = Default::default();
        let mut slots = Vec::new();
        for (&(kind, count), tally) in kinds.iter().zip(&tallies) {
            for _ in 0..count {
                slots.push(tokio::spawn(repeat(
                    side.clone(),
                    kind,
                    tally.clone(),
                    stop.clone(),
                )));
            }
        }
        let churn = SharedTally::default();
        let started = Instant::now();
        let churning = (side.churn_rate > 0.0).then(|| {
            tokio::spawn(churn_at(
                side.target.clone(),
                side.churn_rate,
                churn.clone(),
                stop.clone(),
            ))
        });
        stop.cancelled().await;
        for slot in slots {
            let _ = slot.await;
        }
        let churn_skipped = match churning {
            Some(task) => task.await.unwrap_or(0),
            None => 0,
        };
        let elapsed = started.elapsed().as_secs_f64();
        let slow_closes = match (slow_before, side.slow_closes().await) {
            (Some(before), Some(after)) => Some(after.saturating_sub(before)),
            _ => None,
        };
        let mut classes: Vec<AbuseClass> = kinds
            .iter()
            .zip(&tallies)
            .map(|(&(kind, _), tally)| tally.class(kind.name(), side.expected(kind)))
            .collect();
        let churn_class = churn.class(CHURN, "close 1000 echoed".to_owned());
        let achieved = if elapsed > 0.0 {
            churn_class.attempts as f64 / elapsed
        } else {
            0.0
        };
        classes.push(churn_class);
        classes.retain(|c| c.attempts > 0);
        Abuse {
            classes,
            slow_closes,
            churn_rate: side.churn_rate,
            churn_achieved_per_s: achieved,
            churn_skipped,
            notes: Vec::new(),
        }
    }

    /// The server's count of clients closed as too slow.
    async fn slow_closes(&self) -> Option<u64> {
        let status = self.status.as_ref()?;
        let count = status
            .metric("vulcan_stream_clients_disconnected_slow_total")
            .await
            .ok()?;
        Some(count as u64)
    }

    fn expected(&self, kind: Kind) -> String {
        match kind {
            Kind::PingFlood => "closed as too slow (1008) once its queue overflows".to_owned(),
            Kind::Slowloris => format!(
                "dropped {:?} after connecting (HandshakeTimeout)",
                self.handshake_timeout
            ),
            Kind::BigFrame => "close 1009".to_owned(),
            Kind::BadUtf8 => "close 1007".to_owned(),
        }
    }

    /// One connection of `kind`, from connect to its end (or the end of the run).
    async fn attempt(
        &self,
        kind: Kind,
        stop: &CancellationToken,
        tally: &SharedTally,
    ) -> (String, Mark) {
        match kind {
            Kind::PingFlood => ping_flood(&self.target, self.ping_rate, stop).await,
            Kind::Slowloris => self.slowloris(stop, tally).await,
            Kind::BigFrame => {
                until_stopped(stop, big_frame(&self.target, self.big_frame_size)).await
            }
            Kind::BadUtf8 => until_stopped(stop, bad_utf8(&self.target)).await,
        }
    }

    /// One slowloris connection: a byte of its request head every `slowloris_interval` until
    /// the server drops it.
    async fn slowloris(&self, stop: &CancellationToken, tally: &SharedTally) -> (String, Mark) {
        let opened = Instant::now();
        let mut stream = match TcpStream::connect(self.target.addr).await {
            Ok(stream) => stream,
            Err(err) => return (format!("cannot connect: {err}"), Mark::Wrong),
        };
        let head = rawws::upgrade_request(&self.target).into_bytes();
        let (mut rd, mut wr) = stream.split();
        let mut answer = Vec::new();
        let mut chunk = [0u8; 1024];
        let mut sent = 0;
        let dropped = 'trickle: loop {
            if sent < head.len() {
                if wr.write_all(&head[sent..=sent]).await.is_err() {
                    break 'trickle true;
                }
                sent += 1;
            }
            let next = Instant::now() + self.slowloris_interval;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => {
                        let age = opened.elapsed();
                        return if age > self.handshake_timeout + SLOWLORIS_LATE {
                            (format!("still open after {:.1} s", age.as_secs_f64()), Mark::Wrong)
                        } else {
                            ("open at the end".to_owned(), Mark::Open)
                        };
                    }
                    _ = tokio::time::sleep_until(next) => continue 'trickle,
                    read = rd.read(&mut chunk) => match read {
                        Ok(0) | Err(_) => break 'trickle true,
                        Ok(n) => answer.extend_from_slice(&chunk[..n]),
                    },
                }
            }
        };
        let age = opened.elapsed();
        let answered = String::from_utf8_lossy(&answer)
            .lines()
            .next()
            .map(|line| format!(" after answering {line:?}"))
            .unwrap_or_default();
        if !dropped || answer.starts_with(b"HTTP/1.1 101") {
            return (format!("its head was accepted{answered}"), Mark::Wrong);
        }
        tally.dropped_after(age.as_secs_f64());
        let due = self.handshake_timeout;
        if age + SLOWLORIS_EARLY >= due && age <= due + SLOWLORIS_LATE {
            (
                format!("dropped at the handshake timeout{answered}"),
                Mark::Right,
            )
        } else {
            (
                format!("dropped after {:.1} s{answered}", age.as_secs_f64()),
                Mark::Wrong,
            )
        }
    }
}

/// The kinds of abuser that hold a connection each (churn is a rate, not slots).
#[derive(Debug, Clone, Copy)]
enum Kind {
    PingFlood,
    Slowloris,
    BigFrame,
    BadUtf8,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::PingFlood => PING_FLOOD,
            Kind::Slowloris => SLOWLORIS,
            Kind::BigFrame => BIG_FRAME,
            Kind::BadUtf8 => BAD_UTF8,
        }
    }
}

/// One slot: connections of `kind`, one after another, until `stop`, each end recorded. Big
/// frames and invalid UTF-8 pause between two, the others reconnect at once.
async fn repeat(side: Arc<AbuseSide>, kind: Kind, tally: SharedTally, stop: CancellationToken) {
    let pause = match kind {
        Kind::BigFrame | Kind::BadUtf8 => side.pause,
        Kind::PingFlood | Kind::Slowloris => Duration::ZERO,
    };
    while !stop.is_cancelled() {
        let (end, mark) = side.attempt(kind, &stop, &tally).await;
        tally.record(end, mark);
        if mark == Mark::Open {
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// `attempt`, or "open at the end" when the run stops first.
async fn until_stopped(
    stop: &CancellationToken,
    attempt: impl Future<Output = (String, Mark)>,
) -> (String, Mark) {
    tokio::select! {
        _ = stop.cancelled() => ("open at the end".to_owned(), Mark::Open),
        end = attempt => end,
    }
}

/// Names how reading for a close ended.
fn describe(end: &ReadEnd) -> String {
    match end {
        ReadEnd::Frame(ServerFrame::Close(Some(code))) => format!("close {code}"),
        ReadEnd::Frame(ServerFrame::Close(None)) => "close without a code".to_owned(),
        ReadEnd::Frame(other) => format!("{other:?}"),
        ReadEnd::Ended(why) => format!("dropped: {why}"),
        ReadEnd::TimedOut => "not closed".to_owned(),
    }
}

/// Right when the server closed with `code`.
fn closed_with(end: &ReadEnd, code: u16) -> (String, Mark) {
    let mark = if *end == ReadEnd::Frame(ServerFrame::Close(Some(code))) {
        Mark::Right
    } else {
        Mark::Wrong
    };
    (describe(end), mark)
}

/// How a flooder ended. The server closes it with 1008 once its queue overflows; but a client
/// that does not read is handed that close frame only if it starts reading before the server
/// gives up on the close (2 s): mostly it sees the connection reset instead, since the server
/// closes a socket with its pings unread. Both count here; the server's own count of clients it
/// closed as too slow is the cross-check (see [`Abuse::slow_closes`]).
fn flood_end(end: &ReadEnd) -> (String, Mark) {
    match end {
        ReadEnd::Frame(ServerFrame::Close(Some(1008))) => ("close 1008".to_owned(), Mark::Right),
        ReadEnd::Ended(why) => (
            format!("dropped once the server stopped reading ({why})"),
            Mark::Right,
        ),
        other => (describe(other), Mark::Wrong),
    }
}

/// One flooder: Pings at `rate` a second, never reading, until the server stops reading it;
/// then it reads, to see how it was closed. A server that only paused is flooded again.
async fn ping_flood(target: &Target, rate: u32, stop: &CancellationToken) -> (String, Mark) {
    // Small buffers: the server's frames back up after a few kilobytes, and the flooder's own
    // writes stall soon after the server stops reading.
    let mut ws = match RawWs::open(target, Some(4096), Some(64 * 1024)).await {
        Ok(ws) => ws,
        Err(err) => return (format!("no websocket: {err}"), Mark::Wrong),
    };
    const TICK: Duration = Duration::from_millis(10);
    let per_tick = (rate as usize / 100).max(1);
    let burst = rawws::frame(OP_PING, &[b'p'; 125]).repeat(per_tick);
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut unsent: &[u8] = &[];
    loop {
        if unsent.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => return ("flooding at the end".to_owned(), Mark::Open),
                _ = ticker.tick() => unsent = &burst,
            }
        }
        // Written with `write`, not `write_all`: a write that times out has written nothing,
        // so the frames stay whole when the flood resumes.
        match timeout(STALL, ws.stream.write(unsent)).await {
            Ok(Ok(n)) => unsent = &unsent[n..],
            Ok(Err(_)) => return flood_end(&ws.read_close(CLOSE_LIMIT).await),
            Err(_) => match ws.read_close(STALL_READ).await {
                ReadEnd::TimedOut => {}
                end => return flood_end(&end),
            },
        }
    }
}

/// One client that announces a frame of `size` bytes and sends it until the server hangs up.
async fn big_frame(target: &Target, size: u64) -> (String, Mark) {
    let mut ws = match RawWs::open(target, None, None).await {
        Ok(ws) => ws,
        Err(err) => return (format!("no websocket: {err}"), Mark::Wrong),
    };
    let (mut rd, mut wr) = ws.stream.split();
    let write = async {
        wr.write_all(&rawws::frame_head(OP_TEXT, size)).await?;
        // Zeros masked: the chunk's length is a multiple of 4, so every chunk is the same.
        let mut chunk = vec![0u8; 64 * 1024];
        rawws::mask(&mut chunk, 0);
        let mut sent = 0u64;
        while sent < size {
            let n = (size - sent).min(chunk.len() as u64) as usize;
            wr.write_all(&chunk[..n]).await?;
            sent += n as u64;
        }
        std::io::Result::Ok(())
    };
    let read = rawws::read_close(&mut rd, &mut ws.buf, CLOSE_LIMIT);
    tokio::pin!(read, write);
    let end = tokio::select! {
        end = &mut read => end,
        _ = &mut write => read.await,
    };
    closed_with(&end, 1009)
}

/// One client that sends a text frame that is not UTF-8, then a Ping.
async fn bad_utf8(target: &Target) -> (String, Mark) {
    let mut ws = match RawWs::open(target, None, None).await {
        Ok(ws) => ws,
        Err(err) => return (format!("no websocket: {err}"), Mark::Wrong),
    };
    let mut frames = rawws::frame(OP_TEXT, NOT_UTF8);
    frames.extend(rawws::frame(OP_PING, UTF8_PROBE));
    if let Err(err) = ws.stream.write_all(&frames).await {
        return (format!("cannot send: {err}"), Mark::Wrong);
    }
    let end = rawws::read_frames(&mut ws.stream, &mut ws.buf, CLOSE_LIMIT, |frame| {
        matches!(frame, ServerFrame::Close(_)) || *frame == ServerFrame::Pong(UTF8_PROBE.to_vec())
    })
    .await;
    if let ReadEnd::Frame(ServerFrame::Pong(_)) = end {
        let _ = ws
            .stream
            .write_all(&rawws::frame(rawws::OP_CLOSE, &1000u16.to_be_bytes()))
            .await;
        return (
            "answered the Ping after it: the server does not validate UTF-8".to_owned(),
            Mark::NotChecked,
        );
    }
    closed_with(&end, 1007)
}

/// Opens websockets at `rate` a second, each closed at once; returns the ticks skipped.
async fn churn_at(target: Target, rate: f64, tally: SharedTally, stop: CancellationToken) -> u64 {
    let target = Arc::new(target);
    let in_flight = Arc::new(Semaphore::new(CHURN_IN_FLIGHT));
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    // Ticks missed while the thread was busy are made up for, as far as connections in flight
    // allow: the rate holds on average.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut skipped = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            skipped += 1;
            continue;
        };
        let (target, tally) = (target.clone(), tally.clone());
        tokio::spawn(async move {
            let (end, mark) = churn_one(&target).await;
            tally.record(end, mark);
            drop(permit);
        });
    }
    // The last ones finish their close handshakes (each is bounded by CLOSE_LIMIT).
    let _ = in_flight.acquire_many(CHURN_IN_FLIGHT as u32).await;
    skipped
}

/// One churn connection: upgrade, close with 1000, read the echo.
async fn churn_one(target: &Target) -> (String, Mark) {
    let mut ws = match target.connect(&Dial::default(), 0).await {
        Ok(ws) => ws,
        Err(err) => return (format!("no websocket: {err}"), Mark::Wrong),
    };
    let close = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    if let Err(err) = ws.close(Some(close)).await {
        return (format!("cannot close: {err}"), Mark::Wrong);
    }
    let echo = timeout(CLOSE_LIMIT, async {
        while let Some(message) = ws.next().await {
            match message {
                Ok(Message::Close(frame)) => return Some(frame.map(|f| u16::from(f.code))),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    })
    .await;
    match echo {
        Ok(Some(Some(1000))) => ("close 1000 echoed".to_owned(), Mark::Right),
        Ok(Some(Some(code))) => (format!("close {code}"), Mark::Wrong),
        Ok(Some(None)) => ("close without a code".to_owned(), Mark::Wrong),
        Ok(None) => ("dropped without an echo".to_owned(), Mark::Wrong),
        Err(_) => ("no echo".to_owned(), Mark::Wrong),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_count_marks_and_ends() {
        let tally = SharedTally::default();
        tally.record("close 1009".to_owned(), Mark::Right);
        tally.record("close 1009".to_owned(), Mark::Right);
        tally.record("close 1002".to_owned(), Mark::Wrong);
        tally.record("open at the end".to_owned(), Mark::Open);
        tally.dropped_after(9.9);
        tally.dropped_after(10.2);
        let class = tally.class(BIG_FRAME, "close 1009".to_owned());
        assert_eq!(
            (class.attempts, class.right, class.wrong, class.open_at_end),
            (4, 2, 1, 1)
        );
        assert_eq!(
            class.ends,
            ["1× close 1002", "2× close 1009", "1× open at the end"]
        );
        assert_eq!(class.dropped_after_s, Some((9.9, 10.2)));
        assert!(!class.passed());
        assert_eq!(
            closed_with(&ReadEnd::Frame(ServerFrame::Close(Some(1009))), 1009),
            ("close 1009".to_owned(), Mark::Right)
        );
        assert_eq!(
            closed_with(&ReadEnd::Ended("reset".to_owned()), 1008).1,
            Mark::Wrong
        );
    }
}
